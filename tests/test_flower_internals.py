"""Flower's non-public symbols this project relies on (federation/flower_internals.py, and
tests/rogue_stream.py's stub) still exist and still behave as the project expects.

A Flower upgrade may move or change any of them without notice: each test names the
symbol it checks, so a failure says what to look for in the new release. In-process and
fast: no server, no client.
"""

import importlib

import flwr
import numpy as np
import pytest
from flwr.common import (Code, FitIns, FitRes, Message, RecordDict, Status,
                         ndarrays_to_parameters)

# (module, name): every non-public symbol imported anywhere in the project.
INTERNALS = [
    ("flwr.common.serde", "fit_res_to_proto"),
    ("flwr.common.serde", "recorddict_to_proto"),
    ("flwr.proto.transport_pb2", "ClientMessage"),
    ("flwr.proto.transport_pb2_grpc", "FlowerServiceStub"),  # tests/rogue_stream.py
    ("flwr.server.superlink.fleet.grpc_bidi.grpc_bridge", "GrpcBridgeClosed"),
    ("flwr.supercore.exit.exit_handler", "trigger_exit_handlers"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "RECORD_KEY_CONFIGS"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "Key"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "Stage"),
    ("flwr.supercore.task_identity", "TaskIdentity"),
    ("flwr.supercore.differential_privacy", "KEY_CLIPPING_NORM"),
    ("flwr.server.compat.grid_client_proxy", "GridClientProxy"),
    ("flwr.server.superlink.linkstate.utils", "create_message_error_unavailable_res_message"),
]


def _gone(symbol: str, error: Exception) -> str:
    return (f"flwr {flwr.__version__} no longer has {symbol} ({type(error).__name__}: "
            f"{error}); federation/flower_internals.py relies on it")


@pytest.mark.parametrize("module, name", INTERNALS, ids=[f"{m}.{n}" for m, n in INTERNALS])
def test_flower_still_has(module, name):
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        pytest.fail(_gone(f"{module}.{name}", e))


def test_a_closed_stream_is_told_from_other_failures():
    from flwr.server.superlink.fleet.grpc_bidi.grpc_bridge import GrpcBridgeClosed  # noqa: PLC0415
    from federation import failures, flower_internals  # noqa: PLC0415
    assert flower_internals.is_closed_connection(GrpcBridgeClosed())
    assert not flower_internals.is_closed_connection(ValueError("GrpcBridgeClosed"))
    assert failures.failure_reason(GrpcBridgeClosed()) == "connection closed"


def test_the_wire_size_of_a_fit_reply_is_its_protobuf_size():
    """serde.fit_res_to_proto into transport_pb2.ClientMessage: the bytes_received of every
    round in metrics.json (and the guides' byte counts) depend on this exact size."""
    from federation import flower_internals  # noqa: PLC0415
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.zeros(100, np.float32)]),
                 10, {"partition": 3})
    size = flower_internals.fit_res_wire_bytes(res)
    assert size == 573, (f"a 100-float fit reply is {size} bytes on the wire, was 573: "
                         "serde.fit_res_to_proto or transport_pb2.ClientMessage changed")
    assert flower_internals.record_dict_wire_bytes(RecordDict()) == 0


def test_trigger_exit_handlers_runs_the_handlers_start_server_registers():
    """start_server registers its gRPC server's stop with add_exit_handler (default phase);
    server.py runs that phase with trigger_exit_handlers(run_before_force_exit=False)."""
    from flwr.supercore.exit import add_exit_handler  # noqa: PLC0415
    from federation.flower_internals import trigger_exit_handlers  # noqa: PLC0415
    ran = []
    add_exit_handler(lambda: ran.append("stopped"))
    try:
        trigger_exit_handlers(run_before_force_exit=False)
    except TypeError as e:
        pytest.fail(_gone("trigger_exit_handlers(run_before_force_exit=...)", e))
    assert ran == ["stopped"], "trigger_exit_handlers no longer runs add_exit_handler's handlers"


def test_secagg_constants_name_the_stage_a_mod_reads():
    from federation.flower_internals import RECORD_KEY_CONFIGS, Key, Stage  # noqa: PLC0415
    for symbol, value in (("Key.STAGE", "STAGE"), ("Stage.COLLECT_MASKED_VECTORS",
                                                   "COLLECT_MASKED_VECTORS")):
        owner = Key if symbol.startswith("Key") else Stage
        assert hasattr(owner, value), _gone(f"secaggplus_constants.{symbol}",
                                            AttributeError(value))
    assert isinstance(RECORD_KEY_CONFIGS, str)


def test_task_identity_lets_a_test_build_a_message_and_is_restored():
    from federation import flower_internals  # noqa: PLC0415
    from flwr.supercore.task_identity import TaskIdentity  # noqa: PLC0415
    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)  # pylint: disable=protected-access
    with flower_internals.task_identity(run_id=7, node_id=8):
        msg = Message(RecordDict(), dst_node_id=2, message_type="train")
    assert (msg.metadata.run_id, msg.metadata.src_node_id) == (7, 8), (
        "Message no longer takes its run and node ids from TaskIdentity")
    assert (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id) == before  # pylint: disable=protected-access


def test_an_expired_reply_is_a_value_error_naming_the_cause():
    """failures.app_failure_cause reads the text of the ValueError GridClientProxy raises
    for the SuperLink's "message unavailable" reply."""
    from federation import failures, flower_internals  # noqa: PLC0415

    class ExpiredGrid:
        def send_and_receive(self, messages, timeout=None):
            return [flower_internals.app_path_expired_reply(m) for m in messages]

    proxy = flower_internals.grid_client_proxy(5, ExpiredGrid(), run_id=1)
    with flower_internals.task_identity(), pytest.raises(ValueError) as error:
        proxy.fit(FitIns(ndarrays_to_parameters([np.zeros(1, np.float32)]), {}), 30.0, 1)
    assert failures.app_failure_cause(error.value, 30.0) == (
        "sent no reply within the 30 s round timeout"), (
        f"GridClientProxy's error for an expired reply changed: {error.value}")
