"""How soon is the global model good, counted from launch? Start-up, memory and accuracy.

Three parts, each printing its figures (not a test; timings are wall clock, so run it on
a quiet machine and repeat what matters):

--fresh-process   One fresh Python process doing what client.py (or server.py) does
                  before it talks to anyone: imports, data, JAX's compilation cache,
                  warm-up (compilation). Seconds and peak RSS (VmHWM) after each step,
                  with the cache off, cold (empty directory) and warm (the same again).
                  A Flower Deployment Engine starts such a process per message.
--federation      server.py + N client.py launched at the same moment on a cold cache,
                  then on the warm one: seconds from launch to the start of round 1
                  (the server sends the first fit: every client connected and ready),
                  to round 5's result and to the exit of every process, the peak RSS of
                  every process, and
                  the accuracy after each round with its time since launch. Then the
                  same training (same data, keys and evaluations) in ONE fresh process,
                  launch to end, warm cache, and the ratio of the two.
--plot PNG        accuracy against seconds since launch for every --federation run
                  recorded in --json (e.g. old and new defaults, two datasets).

    python benchmarks/bench_startup.py --fresh-process --data-dir /tmp/fmnist
    python benchmarks/bench_startup.py --federation --data-dir /tmp/fmnist --label new \\
        --json /tmp/startup.jsonl
    python benchmarks/bench_startup.py --federation --data-dir /tmp/fmnist --label old \\
        --json /tmp/startup.jsonl -- --local-epochs 1 --learning-rate 0.002
    python benchmarks/bench_startup.py --plot docs/time_to_accuracy.png --json /tmp/startup.jsonl

Flags after -- go to server.py (the local-training settings it sends to clients).
"""

import argparse
import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

from _common import free_port, peak_rss_mib  # benchmarks/ is on sys.path (this directory)

REPO = pathlib.Path(__file__).resolve().parents[1]
if "--repo" in sys.argv:  # another checkout's scripts, e.g. the code before issue 8
    REPO = pathlib.Path(sys.argv[sys.argv.index("--repo") + 1]).resolve()
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
PROGRESS = re.compile(r"^round (\d+)/\d+\s+accuracy\s+([\d.]+)%", re.M)


def memory_mib() -> tuple[float, float]:
    """(VmHWM, VmRSS) of this process in MiB: peak and current resident memory."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "VmRSS"))


# ------------------------------------------------------------------ fresh process

def probe(role: str, data_dir: str, jax_cache: str) -> None:
    """Run inside the fresh process: client.py's (or server.py's) start-up, step by step."""
    start, steps = time.perf_counter(), []

    def step(name: str) -> None:
        steps.append((name, time.perf_counter() - start, *memory_mib()))

    from federation import compile_cache  # noqa: PLC0415
    if role == "client":
        import client  # noqa: PLC0415, F401  (what client.py imports: jax, optax, flwr.client, grpc)
        from federation import mnist_client  # noqa: PLC0415
        step("imports")
        data = mnist_client.load_client_data(data_dir, 0)
        step("data")
        compile_cache.enable(jax_cache)
        c = mnist_client.MnistClient(data, 0, 0)
        with compile_cache.compiling("client warm-up"):
            c.warm_up()
        step("warm-up")
    else:
        import model  # noqa: PLC0415
        import server  # noqa: PLC0415, F401  (flwr.server)
        from federation.server_setup import ServerSettings, build_strategy  # noqa: PLC0415
        step("imports")
        compile_cache.enable(jax_cache)
        with tempfile.TemporaryDirectory() as results, compile_cache.compiling("server start-up"):
            fedavg, _ = build_strategy(ServerSettings(data_dir=data_dir, results_dir=results))
            model.compile_steps(eval_batch_size=model.EVAL_BATCH_SIZE)
            step("data, model, compile")
            fedavg.evaluate(0, fedavg.initial_parameters)
        step("round-0 evaluation")
    print(json.dumps(steps))


def fresh_process(args: argparse.Namespace) -> None:
    """Client and server start-up with the cache off, cold and warm."""
    print(f"fresh-process start-up, {os.cpu_count()} CPUs ({args.data_dir}); seconds since "
          "process start / peak RSS MiB after each step")
    with tempfile.TemporaryDirectory() as tmp:
        for role in ("client", "server"):
            cache = str(pathlib.Path(tmp) / role)
            for label, where in (("off", "off"), ("cold", cache), ("warm", cache)):
                for _ in range(args.repeat):
                    out = subprocess.run(
                        [sys.executable, __file__, "--probe", role, "--data-dir",
                         str(args.data_dir), "--jax-cache", where],
                        env=ENV, capture_output=True, text=True, check=True).stdout
                    steps = json.loads(out.strip().splitlines()[-1])
                    print(f"{role:6s} cache {label:4s}  " + "   ".join(
                        f"{name} {t:5.2f} s {hwm:4.0f} MiB" for name, t, hwm, _ in steps))
                    if label == "cold":
                        break  # the second one would be warm


# ---------------------------------------------------------------------- federation

def launch(data_dir: pathlib.Path, results: pathlib.Path, cache: str, args) -> dict:
    """server.py + N client.py started at once; timings, peaks and accuracy per round."""
    port = free_port()
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**ENV, "FL_JAX_CACHE_DIR": cache}
    commands = {"server": ["server.py", "--address", f"127.0.0.1:{port}", "--rounds",
                           str(args.rounds), "--min-clients", str(args.clients), "--data-dir",
                           str(data_dir), "--results-dir", str(results), *args.server_args]}
    for i in range(args.clients):
        commands[f"client_{i}"] = ["client.py", "--partition", str(i), "--server-address",
                                   f"127.0.0.1:{port}", "--data-dir", str(data_dir)]
    peaks = dict.fromkeys(commands, 0.0)
    round1, progress, seen = None, [], 0
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        procs = {}
        for name, (script, *flags) in commands.items():
            out = stack.enter_context(open(logs / f"{name}.out", "wb"))
            err = stack.enter_context(open(logs / f"{name}.err", "wb"))
            procs[name] = subprocess.Popen([sys.executable, str(REPO / script), *flags],
                                           env=env, stdout=out, stderr=err)
            stack.callback(procs[name].wait)
            stack.callback(lambda p=procs[name]: p.poll() is None and p.kill())
        while any(p.poll() is None for p in procs.values()):
            now = time.perf_counter() - start
            for name, proc in procs.items():
                peaks[name] = max(peaks[name], peak_rss_mib(proc.pid))
            # Round 1 starts when the server has sampled its clients (all connected).
            if round1 is None and "configure_fit:" in (logs / "server.err").read_text():
                round1 = now
            found = PROGRESS.findall((logs / "server.out").read_text())
            for r, accuracy in found[seen:]:
                progress.append((now, int(r), float(accuracy) / 100))
            seen = len(found)
            time.sleep(0.05)
            if now > args.timeout:
                raise RuntimeError(f"federated run exceeded {args.timeout} s; see {logs}")
    total = time.perf_counter() - start
    if any(p.returncode for p in procs.values()):
        raise RuntimeError(f"a process failed; see {logs}")
    return {"round1": round1, "last_round": progress[-1][0], "total": total, "peaks": peaks,
            "progress": progress}


def single_process(args: argparse.Namespace) -> None:
    """Run inside a fresh process: the federation's training in one process
    (federation/simulation.py, timed by the caller from launch), with server.py's settings:
    the same keys, data and evaluations."""
    import model  # noqa: PLC0415
    import server  # noqa: PLC0415
    from federation import compile_cache, shards, simulation  # noqa: PLC0415
    settings = server.settings_from_args(server.parse_args(
        ["--data-dir", str(args.data_dir), "--min-clients", str(args.clients),
         "--rounds", str(args.rounds), *args.server_args]))
    parts, test_set = shards.load_all(args.data_dir)
    compile_cache.enable()
    model.compile_steps(settings.batch_size, model.EVAL_BATCH_SIZE)
    result = simulation.run(settings, parts[:args.clients], test_set)
    print(json.dumps([r["centralized_accuracy"] for r in result.records]))


def federation(args: argparse.Namespace) -> None:
    """Cold and warm federated launches, then the single fresh process; print and record."""
    import numpy as np  # noqa: PLC0415
    print(f"server + {args.clients} clients launched at once, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs, {args.data_dir}, server flags {args.server_args or 'none'}")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.jax_cache or str(pathlib.Path(tmp) / "jax_cache")
        for label in args.runs:
            runs[label] = launch(args.data_dir, pathlib.Path(tmp) / label, cache, args)
        models = [np.load(pathlib.Path(tmp) / label / "global_model.npz") for label in runs]
        same = all(np.array_equal(models[0][k], models[-1][k]) for k in models[0].files)
        if args.no_single:
            single, out = float("nan"), "[]"
        else:
            out, single = run_single(args, cache)
    report(args, runs, single, json.loads(out.strip().splitlines()[-1]), same)


def run_single(args: argparse.Namespace, cache: str) -> tuple[str, float]:
    """The same training in one fresh process, warm cache: (its output, seconds)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--single", "--repo", str(REPO),
                          "--data-dir", str(args.data_dir), "--clients", str(args.clients),
                          "--rounds", str(args.rounds), "--", *args.server_args],
                         env={**ENV, "FL_JAX_CACHE_DIR": cache}, capture_output=True,
                         text=True, check=True).stdout
    return out, time.perf_counter() - start


def report(args: argparse.Namespace, runs: dict, single: float, single_acc: list,
           same: bool) -> None:
    """Print the federated runs against the single process; append them to --json."""
    for label, run in runs.items():
        clients = [v for k, v in run["peaks"].items() if k != "server"]
        print(f"{label} cache: launch -> round 1 {run['round1']:.1f} s, -> round "
              f"{args.rounds}'s result {run['last_round']:.1f} s = "
              f"{run['last_round'] / single:.2f} x one fresh process ({single:.1f} s, warm "
              f"cache), -> all exited {run['total']:.1f} s; peak RSS server "
              f"{run['peaks']['server']:.0f} MiB, clients {min(clients):.0f}-"
              f"{max(clients):.0f} MiB")
        print("   " + "  ".join(f"r{r} {100 * a:.2f}% @{t:.1f}s" for t, r, a in run["progress"]))
    fed_acc = [round(100 * a, 2) for _, _, a in run["progress"]]  # as printed
    single_acc_printed = [round(100 * a, 2) for a in single_acc]
    print(f"{' and '.join(runs)} runs give the same model bit for bit: {same}; "
          "single-process accuracies "
          f"{'equal' if fed_acc == single_acc_printed else 'DIFFER' if single_acc else 'not run'}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"label": args.label, "data": str(args.data_dir),
                                "repo": str(REPO), "rounds": args.rounds,
                                "server_args": args.server_args, "single": single,
                                "single_accuracy": single_acc, **runs}) + "\n")


# ---------------------------------------------------------------------------- plot

def plot(args: argparse.Namespace) -> None:
    """Accuracy against seconds since launch, one line per recorded (warm-cache) run."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    runs = [json.loads(line) for line in open(args.json)]
    datasets = sorted({r["data"] for r in runs})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.6), squeeze=False)
    for ax, data in zip(axes[0], datasets):
        for run in (r for r in runs if r["data"] == data):
            for cache, style in (("warm", "-"), ("cold", ":")):
                if cache not in run:
                    continue
                t = [p[0] for p in run[cache]["progress"]]  # round 0 (10%) is below the axis
                a = [p[2] * 100 for p in run[cache]["progress"]]
                cached = (pathlib.Path(run["repo"]) / "federation/compile_cache.py").exists()
                launch_name = (f"{cache} cache" if cached else
                               f"no cache, {'first' if cache == 'cold' else 'second'} launch")
                ax.plot(t, a, style, marker="o", markersize=3,
                        label=f"{run['label']}, {launch_name}")
        manifest = json.loads((pathlib.Path(data) / "manifest.json").read_text())
        ax.set(title=f"{manifest['dataset']} ({manifest['source']}), "
                     f"{manifest['num_partitions']} {manifest['scheme']} clients",
               xlabel="seconds since launch (server + clients)", ylabel="test accuracy (%)")
        finals = [p[2] * 100 for r in runs if r["data"] == data
                  for c in ("warm", "cold") if c in r for p in r[c]["progress"]]
        ax.set_ylim(max(0, min(a for a in finals if a > 10.5) - 5), 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=80)
    print(f"wrote {args.plot}")


def main() -> None:
    """Parse flags; run the parts asked for."""
    argv = sys.argv[1:]
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fresh-process", action="store_true", help="fresh-process start-up")
    p.add_argument("--federation", action="store_true", help="server + clients, cold and warm")
    p.add_argument("--plot", metavar="PNG", help="time-to-accuracy plot of the --json runs")
    p.add_argument("--data-dir", type=pathlib.Path, help="partition_data.py output")
    p.add_argument("--clients", type=int, default=10, help="clients (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=1, help="fresh-process runs per setting")
    p.add_argument("--label", default="defaults", help="name of this run in --json and plots")
    p.add_argument("--json", help="append --federation results here / read them for --plot")
    p.add_argument("--timeout", type=float, default=900, help="give up after this many s")
    p.add_argument("--repo", help="run the scripts of another checkout of this repository "
                                  "(e.g. `git archive` of the code before issue 8)")
    p.add_argument("--runs", nargs="+", choices=["cold", "warm"], default=["cold", "warm"],
                   help="federated launches, in order (default: cold warm); 'cold' expects "
                        "an empty cache")
    p.add_argument("--jax-cache", help="cache directory for --federation (default: a new "
                                       "temporary one, i.e. cold)")
    p.add_argument("--no-single", action="store_true", help="skip the single-process run")
    p.add_argument("--probe", choices=["client", "server"], help=argparse.SUPPRESS)
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.server_args = server_args
    if args.federation and not args.no_single and not (
            REPO / "federation" / "simulation.py").exists():
        p.error(f"--repo {REPO} has no federation/simulation.py for the single-process run; "
                "add --no-single")
    if args.probe:
        probe(args.probe, str(args.data_dir), args.jax_cache)
    elif args.single:
        single_process(args)
    else:
        if args.fresh_process:
            fresh_process(args)
        if args.federation:
            federation(args)
        if args.plot:
            plot(args)


if __name__ == "__main__":
    main()
