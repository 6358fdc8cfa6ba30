"""Every use this project makes of Flower's non-public modules, in one place.

Flower's public API (flwr.app, flwr.client, flwr.common's __all__, flwr.server,
flwr.serverapp, ...) serves almost everything here. For the few things below it offers
nothing, and each says why; tests/test_flower_internals.py fails with the symbol's name if
an upgrade of Flower moves or changes one of them.
"""

from flwr.common import FitRes, serde
from flwr.proto.transport_pb2 import ClientMessage  # pylint: disable=no-name-in-module


def is_closed_connection(error: BaseException) -> bool:
    """Whether a failure is the legacy gRPC server's "the client's stream closed"."""
    return type(error).__name__ == "GrpcBridgeClosed"


def fit_res_wire_bytes(res: FitRes) -> int:
    """The size of a fit reply as protobuf, i.e. on the wire (plain FedAvg)."""
    return ClientMessage(fit_res=serde.fit_res_to_proto(res)).ByteSize()
