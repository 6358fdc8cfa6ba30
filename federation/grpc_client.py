"""The client's side of the legacy gRPC path (client.py): connect, wait, reconnect.

Flower's start_client (its grpc-bidi transport) fails at once when nobody listens, and
sees a TLS mismatch only as a connection that never gets ready. run_client serves a
client to server.py until the server ends the run: it waits (with backoff) for a server
that is not up yet or that went away, for up to --max-wait seconds, and reports a TLS
mismatch (federation/tls.py) or a refused partition at once, in one line.
"""

import logging
import pathlib
import ssl
import time
from logging import INFO, WARNING

import grpc
from flwr.client import start_client
from flwr.common import log

from federation.mnist_client import MnistClient
from federation.tls import tls_problem


class ServerUnreachable(Exception):
    """No gRPC connection to the server could be made within --max-wait."""


class ConnectionProblem(Exception):
    """The server cannot be used with these settings (TLS mismatch, refused partition)."""


def load_root_certificate(path: str) -> bytes:
    """The PEM CA certificate at path; ConnectionProblem (one line) if it is not one."""
    try:
        pem = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise ConnectionProblem(f"--root-certificate: {e.strerror}: {path}") from None
    try:
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            raise ValueError("no PEM certificate in it")
        ssl.create_default_context(cadata=pem.decode("ascii"))
    except (ValueError, ssl.SSLError) as e:  # UnicodeDecodeError is a ValueError
        raise ConnectionProblem(f"--root-certificate {path} is not a PEM CA certificate "
                                f"({e}); use ca.crt from make_certificates.py") from None
    return pem


def wait_for_server(address: str, root_certificates: bytes | None, max_wait: float,
                    root_name: str = "--root-certificate") -> None:
    """Return once a gRPC channel to address is ready; retry with backoff up to max_wait s.

    Flower's grpc-bidi client (start_client) fails at once when nobody listens: its
    max_retries/max_wait_time are ignored by that transport. Hence this probe. Raises
    ConnectionProblem at once on a TLS mismatch (see tls_problem).
    """
    start, delay = time.monotonic(), 0.25
    while True:
        problem = tls_problem(address, root_certificates, root_name)
        if problem:
            raise ConnectionProblem(problem)
        credentials = grpc.ssl_channel_credentials(root_certificates) if root_certificates else None
        channel = (grpc.secure_channel(address, credentials) if credentials
                   else grpc.insecure_channel(address))
        try:
            remaining = max_wait - (time.monotonic() - start)
            grpc.channel_ready_future(channel).result(timeout=max(min(delay, remaining), 0.01))
            if delay > 0.25:
                log(INFO, "server %s answered after %.1f s", address, time.monotonic() - start)
            return
        except grpc.FutureTimeoutError:
            pass
        finally:
            channel.close()
        if time.monotonic() - start >= max_wait:
            raise ServerUnreachable(
                f"no server answered at {address} within {max_wait:g} s (is server.py running? "
                "with TLS, does --root-certificate match the server's --certificates?)")
        if delay == 0.25:
            log(INFO, "waiting for the server at %s (up to %g s)", address, max_wait)
        delay = min(2 * delay, 2.0)


class _Once(logging.Filter):
    """Lets through the first record whose message starts with `prefix`, drops the rest."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a repeat of the prefixed message."""
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def run_client(client: MnistClient, server_address: str, root_certificates: bytes | None,
               max_wait: float, root_name: str = "--root-certificate") -> None:
    """Serve the server until it ends the run; reconnect if the connection breaks.

    A server that is restarted (e.g. with --resume) within max_wait seconds gets this
    client back; the client is stateless between rounds, so nothing is lost. Raises
    ConnectionProblem if the server refuses this client or the TLS settings differ.
    """
    # start_client logs its deprecation banner on every call, i.e. on every reconnect.
    logging.getLogger("flwr").addFilter(_Once("DEPRECATED FEATURE"))
    while True:
        wait_for_server(server_address, root_certificates, max_wait, root_name)
        try:
            start_client(server_address=server_address, client=client.to_client(),
                         root_certificates=root_certificates)
            # The server sent "reconnect: never": the run is over, or we were refused.
            if client.refused:
                raise ConnectionProblem(f"the server at {server_address} refused this "
                                        f"client: {client.refused}")
            return
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else type(e).__name__
            log(WARNING, "lost the server (%s); reconnecting for up to %g s", code, max_wait)
