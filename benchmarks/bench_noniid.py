"""Non-IID data: FedAvg, FedProx, FedAvgM and FedAdam compared on Fashion-MNIST (issue 12).

The federated run equals federation/simulation.py's run in one process bit for bit
(tests/test_federation.py and, with FedProx and FedAdam, tests/test_noniid.py), so this
benchmark runs that, like sweep_recipe.py: every client trains with server.py's settings
for the method (--proximal-mu, --server-optimizer and its rate and momentum,
--client-optimizer, --learning-rate), and the new global model is evaluated on the 10,000
test images after every round. What it measures is what server.py + client.py would
produce with the same flags, minus the processes and gRPC.

The data: Debian's Fashion-MNIST IDX files, split for 10 clients by partition_data.py in
four ways (IID, Dirichlet alpha 0.5, Dirichlet alpha 0.1, exactly 2 labels per client),
10% of each client's images held out for validation as the federation does (54,000 train).
The methods: METHODS below, a small grid for each; --method picks others, e.g.
"fedprox:mu=0.05", "fedavgm:lr=1,m=0.9", "fedadam:lr=0.003,m=0.9", "fedyogi:lr=0.01",
and both families at once, "fedavgm:lr=1,m=0.9,mu=0.1" (FedProx's clients, FedAvgM's server).
--client-optimizer sgd (and --learning-rate) change the clients' recipe as server.py's
flags do; each run's JSON line records it, and the table and plot mark it "[sgd 0.01]".

It prints one line per run (accuracy after rounds 10, 25 and 50 as far as the run goes,
after its last round, the best, and the first round at --target),
appends every run's history to --json, and draws the best setting of every method per
split into --plot. --from-json redraws the table and plot without training.

    python benchmarks/bench_noniid.py                      # full scale: 50 rounds x 3 epochs
    nice -n 19 python benchmarks/bench_noniid.py --rounds 20 --local-epochs 1 \\
        --train-fraction 0.2 --target 0.8 --method fedavg fedprox:mu=0.01 \\
        fedprox:mu=0.1 fedavgm:lr=1,m=0.5 fedadam:lr=0.003 fedadam:lr=0.01 \\
        --json /tmp/noniid.jsonl                            # the README's reduced scale
    python benchmarks/bench_noniid.py --from-json docs/noniid_comparison.jsonl --target 0.8 \\
        --plot /tmp/noniid.png                              # its table and plot again

Full scale is 4 splits x 9 settings x 50 rounds of 10 clients x 3 epochs: one run took
~32 minutes (~38 s a round) with two runs side by side on 2 CPU cores, so the default grid
is ~19 hours; the README's full-scale table ran chosen runs with --splits and --method
(and --client-optimizer).
The reduced scale above took ~37 minutes of CPU. Timings are wall clock on a shared machine.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import model  # noqa: E402  (the repo root is on sys.path only after the line above)
from _common import add_data_flags  # noqa: E402  (benchmarks/ is on sys.path: this directory)
from federation import server_optimizers, shards, simulation  # noqa: E402
from federation.server_setup import ServerSettings  # noqa: E402

# Split name -> partition_data.py flags (10 clients, the federation's 10% validation).
SPLITS = {
    "iid": ["--scheme", "iid"],
    "dir0.5": ["--scheme", "dirichlet", "--alpha", "0.5"],
    "dir0.1": ["--scheme", "dirichlet", "--alpha", "0.1"],
    "2labels": ["--scheme", "pathological", "--classes-per-client", "2"],
}
TITLES = {"iid": "IID", "dir0.5": "Dirichlet α = 0.5", "dir0.1": "Dirichlet α = 0.1",
          "2labels": "2 labels per client"}
# The default grid: FedAvg, and 2-4 settings of each remedy.
METHODS = ["fedavg",
           "fedprox:mu=0.001", "fedprox:mu=0.01", "fedprox:mu=0.1",
           "fedavgm:lr=1,m=0.5", "fedavgm:lr=0.5,m=0.9",
           "fedadam:lr=0.001", "fedadam:lr=0.003", "fedadam:lr=0.01"]
REPORT_ROUNDS = (10, 25, 50)


def parse_method(spec: str) -> tuple[str, float, dict]:
    """"fedprox:mu=0.01" -> (family, proximal_mu, server-optimizer settings).

    A server optimizer with a mu is both methods at once ("fedavgm:m=0.9,mu=0.1", the
    flags --server-optimizer fedavgm --server-momentum 0.9 --proximal-mu 0.1): its family
    is "fedprox+fedavgm".
    """
    family, _, rest = spec.partition(":")
    try:
        values = {k: float(v) for k, v in (kv.split("=") for kv in rest.split(",") if kv)}
    except ValueError:
        raise ValueError(f"method {spec!r}: not FAMILY[:mu=|lr=|m=...]") from None
    mu = values.pop("mu", 0.0)
    optimizer = "fedavg" if family == "fedprox" else family
    if family not in ("fedprox", *server_optimizers.NAMES) or set(values) - {"lr", "m"}:
        raise ValueError(f"method {spec!r}: not FAMILY[:mu=|lr=|m=...]")
    problem = server_optimizers.problem(optimizer, values.get("lr"), values.get("m"))
    if problem or mu < 0 or (family == "fedavg" and mu):
        problem = problem or ("mu must be >= 0" if mu < 0 else "fedavg with a mu is fedprox")
        raise ValueError(f"method {spec!r}: {problem}")
    if mu and family != "fedprox":
        family = f"fedprox+{family}"
    return family, mu, server_optimizers.settings(optimizer, values.get("lr"), values.get("m"))


def make_split(name: str, idx_dir: pathlib.Path, out: pathlib.Path, seed: int) -> pathlib.Path:
    """partition_data.py's files for one split (made once, reused while they exist)."""
    if not shards.manifest_path(out).exists():
        made = subprocess.run([sys.executable, str(REPO / "partition_data.py"), "--source", "idx",
                               "--dataset", "fashion_mnist", "--idx-dir", str(idx_dir),
                               "--num-partitions", "10", "--seed", str(seed), "--out-dir",
                               str(out), *SPLITS[name]], capture_output=True, text=True)
        if made.returncode:  # partition_data.py's own one-line error says what is wrong
            raise shards.DataError(made.stderr.strip().splitlines()[-1])
    return out


def with_fraction(partitions: list[shards.Partition], fraction: float,
                  seed: int) -> list[shards.Partition]:
    """The partitions with a seeded `fraction` of each one's training images."""
    kept = []
    for index, part in enumerate(partitions):
        n = len(part.x_train)
        keep = np.sort(np.random.default_rng([seed, index]).choice(
            n, max(1, round(fraction * n)), replace=False))
        kept.append(dataclasses.replace(part, x_train=part.x_train[keep],
                                        y_train=part.y_train[keep]))
    return kept


def run(partitions: list[shards.Partition], test_set: tuple[np.ndarray, np.ndarray], *,
        mu: float, optimizer: dict, rounds: int, epochs: int, seed: int,
        client_optimizer: str = model.OPTIMIZER, learning_rate: float = model.LEARNING_RATE,
        label: str = "") -> list[float]:
    """Test accuracy after each round of the federation (simulation.py), in one process.

    A progress line per round goes to stderr (a full-scale run is about half an hour).
    """
    settings = ServerSettings(
        rounds=rounds, min_clients=len(partitions), local_epochs=epochs,
        client_optimizer=client_optimizer, learning_rate=learning_rate, seed=seed,
        proximal_mu=mu, server_optimizer=optimizer["name"],
        server_learning_rate=optimizer.get("learning_rate"),
        server_momentum=optimizer.get("momentum"))

    def progress(done: simulation.Round) -> None:
        if done.record["round"]:
            print(f"  {label} round {done.record['round']}/{rounds}: "
                  f"{100 * done.record['centralized_accuracy']:.2f}%", file=sys.stderr,
                  flush=True)

    result = simulation.run(settings, partitions, test_set, federated_evaluation=False,
                            on_round=progress)
    return [r["centralized_accuracy"] for r in result.records[1:]]


def recipe(result: dict) -> str:
    """The clients' optimizer and learning rate when not the federation's ("" if they are).

    JSON lines written before --client-optimizer existed ran Adam at its default rate.
    """
    optimizer = result.get("client_optimizer", model.OPTIMIZER)
    learning_rate = result.get("learning_rate", model.LEARNING_RATES[optimizer])
    if (optimizer, learning_rate) == (model.OPTIMIZER, model.LEARNING_RATE):
        return ""
    return f"{optimizer} {learning_rate:g}"


def with_recipe(name: str, result: dict) -> str:
    """name, and the run's client recipe if it is not the default: "fedavg [sgd 0.01]"."""
    return name + (f" [{recipe(result)}]" if recipe(result) else "")


def label(result: dict) -> str:
    """The run's method spec with its client recipe, for the table and the legend."""
    return with_recipe(result["method"], result)


def rounds_to(history: list[float], target: float) -> int | None:
    """The first round whose accuracy is >= target (None: never)."""
    return next((r for r, a in enumerate(history, 1) if a >= target), None)


def report_rounds(rounds: int) -> list[int]:
    """The rounds of the table: 10, 25 and 50 as far as the run went, and its last."""
    return [r for r in REPORT_ROUNDS if r < rounds] + [rounds]


def header(rounds: int, target: float) -> str:
    """The table's head line."""
    return (f"{'split':8s} {'method [clients]':38s} "
            + " ".join(f"{'r' + str(r):>6s}" for r in report_rounds(rounds))
            + f"  {'best':>6s}  {'to ' + str(round(100 * target)) + '%':>6s}  {'s/rnd':>6s}")


def row(result: dict, target: float) -> str:
    """One table line: split, method, accuracy at report_rounds, best, rounds to target."""
    h = result["history"]
    at = [f"{100 * h[r - 1]:6.2f}" for r in report_rounds(len(h))]
    reached = rounds_to(h, target)
    return (f"{result['split']:8s} {label(result):38s} " + " ".join(at)
            + f"  {100 * max(h):6.2f}  {reached if reached else 'never':>6}"
            + f"  {result['seconds'] / len(h):6.1f}")


def best_per_method(results: list[dict]) -> dict[tuple[str, str], dict]:
    """(split, family [clients]) -> the run of that family with the best final accuracy.

    Runs whose clients used another optimizer or learning rate form their own families.
    """
    best: dict[tuple[str, str], dict] = {}
    for r in results:
        key = (r["split"], with_recipe(parse_method(r["method"])[0], r))
        if key not in best or r["history"][-1] > best[key]["history"][-1]:
            best[key] = r
    return best


def plot(results: list[dict], path: pathlib.Path, title: str) -> None:
    """One panel per split: test accuracy per round of each method's best setting."""
    import matplotlib  # noqa: PLC0415  (only when plotting)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    splits = [s for s in SPLITS if any(r["split"] == s for r in results)]
    columns = 2 if len(splits) > 2 else len(splits)
    rows = -(-len(splits) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows),
                             squeeze=False)
    best = best_per_method(results)
    families = sorted({family for _, family in best})
    colour = {f: f"C{i}" for i, f in enumerate(families)}  # one colour per method everywhere
    for ax, split in zip(axes.flat, splits):
        for (s, family), r in sorted(best.items()):
            if s == split:
                ax.plot(range(1, len(r["history"]) + 1), [100 * a for a in r["history"]],
                        label=label(r), color=colour[family])
        ax.set_title(TITLES[split], fontsize=10), ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)  # rounds: no 2.5
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[-1]:
        ax.set_xlabel("round")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)")
    for ax in list(axes.flat)[len(splits):]:
        ax.set_visible(False)
    if any(recipe(r) for r in results):
        title += (f"\nclients: {model.OPTIMIZER} {model.LEARNING_RATE:g} unless the label "
                  "says [optimizer rate]")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(results: list[dict], target: float, plot_path: pathlib.Path | None,
           title: str) -> None:
    """The table of every run, then each method's best per split; the plot."""
    print(f"\nbest setting of each method (by final accuracy), target {100 * target:.0f}%")
    print(header(len(results[0]["history"]), target))
    for _, r in sorted(best_per_method(results).items(),
                       key=lambda kv: (list(SPLITS).index(kv[0][0]), kv[0][1])):
        print(row(r, target))
    if plot_path:
        plot(results, plot_path, title)
        print(f"plot: {plot_path}")


def main() -> None:
    """Check the flags, then compare (or only report --from-json); bad input is one line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_flags(p, "bench_noniid")
    p.add_argument("--splits", nargs="+", choices=list(SPLITS), default=list(SPLITS),
                   help="data splits (default: all)")
    p.add_argument("--method", nargs="+", default=METHODS,
                   help="methods and settings, FAMILY[:mu=|lr=|m=...] (default: the grid "
                        "in METHODS)")
    p.add_argument("--rounds", type=int, default=50, help="rounds (default: %(default)s)")
    p.add_argument("--local-epochs", type=int, default=model.LOCAL_EPOCHS,
                   help="local epochs per round (default: %(default)s, the federation's)")
    p.add_argument("--client-optimizer", choices=model.OPTIMIZERS, default=model.OPTIMIZER,
                   help="clients' optimizer, server.py's --client-optimizer "
                        "(default: %(default)s, the federation's)")
    p.add_argument("--learning-rate", type=float,
                   help="clients' peak learning rate, server.py's --learning-rate (default: "
                        "the client optimizer's, "
                        + ", ".join(f"{v:g} for {k}" for k, v in model.LEARNING_RATES.items())
                        + ")")
    p.add_argument("--train-fraction", type=float, default=1.0,
                   help="fraction of each client's training images used, a seeded sample "
                        "(default: %(default)s: all 54,000)")
    p.add_argument("--target", type=float, default=0.85,
                   help="accuracy whose first round is reported (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument("--json", type=pathlib.Path, help="append one JSON line per run here")
    p.add_argument("--from-json", type=pathlib.Path,
                   help="do not train: report the runs in this file")
    p.add_argument("--plot", type=pathlib.Path, help="write the comparison plot here (PNG)")
    args = p.parse_args()
    try:
        methods = {spec: parse_method(spec) for spec in args.method}
    except ValueError as e:
        p.error(str(e))
    if args.rounds < 1 or args.local_epochs < 1:
        p.error("--rounds and --local-epochs must be >= 1")
    if args.learning_rate is None:
        args.learning_rate = model.LEARNING_RATES[args.client_optimizer]
    if not 0 < args.learning_rate < float("inf"):
        p.error("--learning-rate must be a number > 0")
    if not 0 < args.train_fraction <= 1 or not 0 < args.target <= 1:
        p.error("--train-fraction and --target must be in (0, 1]")
    if args.from_json:
        try:
            results = [json.loads(line) for line in args.from_json.read_text().splitlines()]
            report(results, args.target, args.plot, results[0]["scale"])
        except OSError as e:
            sys.exit(f"bench_noniid.py: error: {e}")
        except (ValueError, KeyError, IndexError) as e:  # ValueError: not JSON at all
            sys.exit(f"bench_noniid.py: error: {args.from_json}: not this script's JSON "
                     f"lines ({e!r})")
        return
    try:
        if args.json:  # a wrong path fails now, not after the first half-hour run
            args.json.open("a").close()
        compare(args, methods)
    except (OSError, shards.DataError) as e:  # a wrong --idx-dir, --data-root or --json
        sys.exit(f"bench_noniid.py: error: {e}")


def compare(args: argparse.Namespace, methods: dict[str, tuple[str, float, dict]]) -> None:
    """Run every (split, method) pair; print the table; append the JSON lines; plot."""
    scale = (f"Fashion-MNIST, 10 clients, {args.rounds} rounds x {args.local_epochs} local "
             f"epoch(s), {100 * args.train_fraction:g}% of the 54,000 training images")
    print(f"{os.cpu_count()} CPUs, jax {jax.__version__}; {scale}", flush=True)
    print(header(args.rounds, args.target), flush=True)
    results = []
    for split in args.splits:
        data_dir = make_split(split, args.idx_dir, args.data_root / split, args.seed)
        partitions, test_set = shards.load_all(data_dir)
        clients = with_fraction(partitions, args.train_fraction, args.seed)
        for spec, (_, mu, optimizer) in methods.items():
            start = time.perf_counter()
            history = run(clients, test_set, mu=mu, optimizer=optimizer,
                          rounds=args.rounds, epochs=args.local_epochs, seed=args.seed,
                          client_optimizer=args.client_optimizer,
                          learning_rate=args.learning_rate, label=f"{split} {spec}")
            result = {"split": split, "method": spec, "history": history,
                      "seconds": time.perf_counter() - start, "scale": scale,
                      "train_images": sum(len(c.x_train) for c in clients),
                      "local_epochs": args.local_epochs,
                      "client_optimizer": args.client_optimizer,
                      "learning_rate": args.learning_rate}
            results.append(result)
            print(row(result, args.target), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(result) + "\n")
    report(results, args.target, args.plot, scale)


if __name__ == "__main__":
    main()
