"""Settings shared by every test: no test talks to anything but 127.0.0.1."""

import os

import pytest

from federation import compile_cache

# Flower's start_server/start_client send anonymous usage events to Flower's servers by
# default. Tests (and the processes they start, which inherit this) must stay offline.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"


@pytest.fixture(scope="session", autouse=True)
def jax_cache_dir(tmp_path_factory):
    """One JAX compilation cache (federation/compile_cache.py) for every process of the
    session, in a directory of its own: tests never write to the user's cache."""
    path = tmp_path_factory.mktemp("jax_cache")
    os.environ[compile_cache.ENV_VAR] = str(path)
    return path
