"""A stranger for the fault tests: opens Flower's Join stream and never answers.

It is what any script can do against a grpc-bidi server (Flower's start_server has no
client authentication). It prints the kind and size of every message the server sends
it, and how the stream ended, so a test can check that it received no model.

    python tests/rogue_stream.py HOST:PORT
"""

import sys
import time

import grpc
from flwr.proto.transport_pb2_grpc import FlowerServiceStub  # pylint: disable=no-name-in-module


def silence():
    """Client messages that never come."""
    while True:
        time.sleep(3600)
        yield from ()


def main() -> None:
    """Join, print what arrives, print how the stream ended."""
    with grpc.insecure_channel(sys.argv[1]) as channel:
        try:
            for message in FlowerServiceStub(channel).Join(silence()):
                print(f"received {message.WhichOneof('msg')} ({message.ByteSize()} bytes)",
                      flush=True)
            print("stream ended: OK", flush=True)
        except grpc.RpcError as e:
            print(f"stream ended: {e.code().name}", flush=True)


if __name__ == "__main__":
    main()
