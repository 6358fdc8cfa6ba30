"""Every use this project makes of Flower's non-public modules, in one place.

Flower's public API (what flwr.app, flwr.client, flwr.clientapp, flwr.common, flwr.server
and flwr.serverapp export) serves almost everything the project does. For the few things
below it offers nothing; each says why. tests/test_flower_internals.py imports every
symbol named here and fails with its name if an upgrade of Flower moves or changes one.
(tests/rogue_stream.py also opens Flower's gRPC stream with the generated FlowerServiceStub:
it stands for any script on the network, so it imports nothing of the project; the same
test checks that symbol.)
"""

import contextlib
from collections.abc import Iterator

from flwr.common import FitRes, Message, RecordDict
# Flower's generated protobuf classes and their conversion (serde) are the wire format
# itself; the public flwr.common.ClientMessage is a plain dataclass with no size.
from flwr.common import serde
from flwr.common.secure_aggregation.secaggplus_constants import (  # noqa: F401
    RECORD_KEY_CONFIGS, Key, Stage)
from flwr.proto.transport_pb2 import ClientMessage  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.grpc_bidi.grpc_bridge import GrpcBridgeClosed
# The fit-config key in which Flower's fixedclipping_mod (client_app.py, DP under SecAgg+)
# expects the clipping norm: Flower's server-side DP wrappers send it, and export no name.
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
# server.py calls trigger_exit_handlers(run_before_force_exit=False) to stop the gRPC server
# that flwr.server.start_server leaves running when it raises: start_server stops it only
# when it returns, and otherwise only through this exit handler (run on Flower's own signal
# exits). Flower offers no public handle to the server or to its exit handlers.
from flwr.supercore.exit.exit_handler import trigger_exit_handlers

# SecAgg+'s record key, config keys and stage names (re-exported above): what a ClientApp
# mod reads to know the stage a SecAgg+ message belongs to. Flower keeps them in
# flwr.common.secure_aggregation, outside flwr.common's exports.
__all__ = ["KEY_CLIPPING_NORM", "RECORD_KEY_CONFIGS", "Key", "Stage", "app_path_expired_reply",
           "fit_res_wire_bytes", "grid_client_proxy", "is_closed_connection",
           "record_dict_wire_bytes", "task_identity", "trigger_exit_handlers"]


def is_closed_connection(error: BaseException) -> bool:
    """Whether a failure is the legacy gRPC server's "the client's stream closed".

    Flower's start_server puts the bridge's exception in a round's `failures` when a
    client's stream ends; its class is not exported.
    """
    return isinstance(error, GrpcBridgeClosed)


def fit_res_wire_bytes(res: FitRes) -> int:
    """The size of a fit reply as protobuf, i.e. on the wire (plain FedAvg).

    Flower exposes no message size; this is what its gRPC transport serializes.
    """
    return ClientMessage(fit_res=serde.fit_res_to_proto(res)).ByteSize()


def record_dict_wire_bytes(content: RecordDict) -> int:
    """The size of a Message's content as protobuf, as it travels on the App path."""
    return serde.recorddict_to_proto(content).ByteSize()


# -- For tests that drive Flower's objects in one process, standing in for what Flower's
#    own processes set up.

@contextlib.contextmanager
def task_identity(run_id: int = 1, node_id: int = 1, task_id: int = 1) -> Iterator[None]:
    """The process identity Flower stamps on every Message it creates (a ServerApp or
    ClientApp process sets it; without it, Message(...) raises). Restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity  # noqa: PLC0415
    names = {"_run_id": run_id, "_node_id": node_id, "_task_id": task_id}
    saved = {name: getattr(TaskIdentity, name) for name in names}
    for name, value in names.items():
        setattr(TaskIdentity, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


def app_path_expired_reply(message: Message) -> Message:
    """The SuperLink's error reply to a message whose TTL ran out before its node
    answered: what a ServerApp gets back for a node that sent nothing in time."""
    from flwr.server.superlink.linkstate.utils import (  # noqa: PLC0415
        create_message_error_unavailable_res_message)
    return create_message_error_unavailable_res_message(message.metadata, "msg_unavail")


def grid_client_proxy(node_id: int, grid: object, run_id: int) -> object:
    """Flower's client proxy on the App path (start_grid makes one per node)."""
    from flwr.server.compat.grid_client_proxy import GridClientProxy  # noqa: PLC0415
    return GridClientProxy(node_id, grid, run_id=run_id)
