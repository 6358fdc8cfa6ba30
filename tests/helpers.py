"""What the tests share that is not a fixture: constants, process helpers, small readers.

Fixtures (data_dir, procs, jax_cache_dir, app_data, flwr_env, ...) are in conftest.py;
everything a test imports by name is here. Test modules import this module and never
one another (test_test_imports.py checks it), so that running one test file runs only
its own tests and a helper has one definition.
"""

import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# The `flwr` command of this interpreter's environment (Flower's CLI).
FLWR = str(pathlib.Path(sys.executable).parent / "flwr")
# conftest.py makes the data: NUM_PARTITIONS (5) partitions; most runs use three clients.
NUM_PARTITIONS = 5
CLIENTS = 3
# Small local training keeps a round to a second or two on a laptop CPU.
FAST = ["--local-epochs", "1", "--batch-size", "32"]
# The same local training in run-config form (the Flower App).
APP_FAST = {"local-epochs": 1, "batch-size": 32}
# The environment of every process a test starts (conftest.py adds the compilation cache).
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0",  # no telemetry requests from Flower
       "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------------ small helpers

def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, what: str) -> None:
    """Poll condition() every 10 ms; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def snapshot(directory: pathlib.Path) -> dict[str, tuple[bytes, int]]:
    """Every file under directory with its bytes and modification time."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def records(results: pathlib.Path) -> list[dict]:
    """The metrics.json of a results directory."""
    return json.loads((results / "metrics.json").read_text())


def load_model(path: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


# ------------------------------------------------------------- server.py and client.py

class Processes:
    """Starts scripts of this repo (or other commands) with their output in log files;
    kills leftovers."""

    def __init__(self, log_dir: pathlib.Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, script: str, *args: str) -> subprocess.Popen:
        """Run `python script args...`; stdout -> name.out, stderr -> name.err."""
        return self.start_command(name, [sys.executable, REPO / script, *args], ENV)

    def start_command(self, name: str, cmd: list, env: dict) -> subprocess.Popen:
        """Run cmd (e.g. flower-superlink) with env; stdout -> name.out, stderr -> name.err."""
        with open(self.log_dir / f"{name}.out", "wb") as out, \
                open(self.log_dir / f"{name}.err", "wb") as err:
            self.procs[name] = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=env,
                                                stdout=out, stderr=err)
        return self.procs[name]

    def wait(self, name: str, timeout: float) -> int:
        """Exit code of a process; fail the test if it runs longer than timeout."""
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} still running after {timeout} s; its log:\n{self.log(name)}")

    def out(self, name: str) -> str:
        return (self.log_dir / f"{name}.out").read_text()

    def err(self, name: str) -> str:
        return (self.log_dir / f"{name}.err").read_text()

    def log(self, name: str) -> str:
        return self.out(name) + self.err(name)

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def server_args(port: int, data_dir: pathlib.Path, results: pathlib.Path, rounds: int,
                min_clients: int = CLIENTS, *extra: str) -> list:
    return ["--address", f"127.0.0.1:{port}", "--rounds", rounds, "--min-clients", min_clients,
            "--data-dir", data_dir, "--results-dir", results, *FAST, *extra]


def client_args(port: int, data_dir: pathlib.Path, partition: int, *extra: str) -> list:
    return ["--partition", partition, "--server-address", f"127.0.0.1:{port}",
            "--data-dir", data_dir, *extra]


# ---------------------------------------------------------------------------- demo.py

def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes whose arguments contain `text` (our tmp dirs).

    psutil, not /proc: the demo runs on Linux and macOS, and so do its tests."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["pid"] == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])  # None: exited, or not ours to read
        if text in cmdline:
            found.append(cmdline)
    return found


def kill_demo(proc: subprocess.Popen) -> None:
    """Kill the demo and everything it started. Its server and clients lead sessions of
    their own (so that a Ctrl-C reaches the demo alone): killing the demo would leave
    them running, so each one's process group is killed too."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.kill()
    for child in children:
        try:
            if os.getpgid(child.pid) == child.pid:  # a group leader: the demo's server/clients
                os.killpg(child.pid, signal.SIGKILL)
            else:
                child.kill()
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass  # it exited meanwhile
    psutil.wait_procs(children, timeout=30)
    proc.wait()


def run_demo(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run for demo.py, except that a demo still running after `timeout` is
    killed with all its children (kill_demo) and fails the test."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_demo(proc)
        out, err = proc.communicate()
        pytest.fail(f"demo.py still running after {timeout} s; killed it and its children\n"
                    f"{out}{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ------------------------------------------------------- the Flower App under `flwr run`

def start_flwr_run(env: dict, run_config: dict, num_supernodes: int = CLIENTS,
                   app: pathlib.Path = REPO) -> subprocess.Popen:
    """Start `flwr run . --stream` in `app` with these settings (env: conftest's flwr_env);
    finish_flwr_run waits for it. Runs started together share the SuperLink and take
    turns on the CPU: most of a run's time is start-up and waiting."""
    config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}"
                      for k, v in run_config.items())
    cmd = [FLWR, "run", ".", "--stream", "--run-config", config,
           "--federation-config", f"num-supernodes={num_supernodes}"]
    return subprocess.Popen(cmd, cwd=app, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish_flwr_run(env: dict, proc: subprocess.Popen, timeout: float = 240) -> tuple[str, dict]:
    """Wait for a start_flwr_run -> (output, the run's `flwr ls` record)."""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"{shlex.join(proc.args)} still running after {timeout} s:\n{output}")
    assert proc.returncode == 0, f"{shlex.join(proc.args)} failed:\n{output}"
    listed = subprocess.run([FLWR, "ls", "--format", "json"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    runs = json.loads(listed.stdout)["runs"]
    run_id = next(line.split()[-1] for line in output.splitlines()
                  if line.startswith("Successfully started run"))
    return output, next(r for r in runs if r["run-id"] == run_id)


def flwr_run(env: dict, run_config: dict, num_supernodes: int = CLIENTS,
             app: pathlib.Path = REPO) -> tuple[str, dict]:
    """`flwr run . --stream` in `app` with these settings -> (output, the run's `flwr ls`
    record). env: conftest's flwr_env."""
    return finish_flwr_run(env, start_flwr_run(env, run_config, num_supernodes, app))


def app_config(data: pathlib.Path, results: pathlib.Path, **settings) -> dict:
    """A run config for CLIENTS SuperNodes with APP_FAST training, plus settings."""
    return {"data-dir": str(data), "results-dir": str(results), "min-clients": CLIENTS,
            **APP_FAST, **settings}


def supernode_key(path: pathlib.Path) -> None:
    """An ECDSA P-384 key pair in OpenSSH format, as `ssh-keygen -t ecdsa -b 384` makes."""
    from cryptography.hazmat.primitives import serialization as ser  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH,
                                       ser.NoEncryption()))
    path.with_suffix(".pub").write_bytes(key.public_key().public_bytes(
        ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH))
