"""The Flower App's run config: pyproject.toml's defaults and server_app's checks (no processes)."""

import dataclasses
import pathlib
import tomllib

import pytest

import server
import server_app
from federation.server_setup import ServerSettings, SetupError

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_server_py_defaults():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(config) == set(server_app.RUN_CONFIG_KEYS)
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
