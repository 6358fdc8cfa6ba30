"""A Flower client: one process per data partition, training the global model locally.

In FedAvg (McMahan et al. 2017) every client starts a round from the server's global
model, trains it for a few epochs on data that never leaves the client, and sends back
only the new weights and its number of training examples. This file runs that client:

- MnistClient (federation/mnist_client.py), a flwr.client.NumPyClient built from the
  shard of --partition and a seed; client_app.py wraps the same class unchanged.
- run_client, which connects to server.py over gRPC, waiting (with backoff) for a server
  that is not up yet or that went away, for up to --max-wait seconds. A TLS mismatch
  (no CA, wrong CA, or a CA for a plaintext server) is reported at once instead.

    python client.py --partition 0        # one per partition, before or after server.py
    python client.py --partition 9 --attack sign-flip   # a poisoning client (README Part 5)
"""

import argparse
import logging
import os
import pathlib
import signal
import socket
import ssl
import sys
import time
from logging import INFO, WARNING

import grpc
from flwr.client import start_client
from flwr.common import log
from flwr.common.logger import update_console_handler

from federation import attacks, cli, compile_cache, memory, shards
from federation.mnist_client import MnistClient, load_client_data


# -------------------------------------------------------------------- connection

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


def _tls_handshake(host: str, port: int, context: ssl.SSLContext,
                   timeout: float) -> bytes | None:
    """The server's certificate (DER) after one TLS handshake, or None if it has no TLS.

    Raises OSError if nobody answers, ssl.SSLCertVerificationError if `context` rejects
    the certificate.
    """
    context.set_alpn_protocols(["h2"])  # as gRPC does: its server rejects TLS without it
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                return tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError:
        raise
    except (ssl.SSLError, ConnectionResetError):
        return None  # it answered, but not with TLS (a plaintext gRPC server hangs up)


def _signed_by(certificate_der: bytes, ca_pem: bytes) -> bool:
    """Whether a CA certificate in ca_pem signed the certificate."""
    from cryptography import x509  # noqa: PLC0415  (a dependency of flwr; TLS only)
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415
    certificate = x509.load_der_x509_certificate(certificate_der)
    for ca in x509.load_pem_x509_certificates(ca_pem):
        try:
            certificate.verify_directly_issued_by(ca)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


def tls_problem(address: str, root_certificates: bytes | None, root_name: str,
                timeout: float = 5.0) -> str | None:
    """Why this client's TLS setting cannot work with the server at address, or None.

    gRPC reports a failed handshake only as "not ready", which looks the same as a
    server that is down; it retries, and both sides log an error each time. Python's ssl
    module tells exactly what is wrong, so ask it first. The first handshake verifies
    nothing (so the server sees a normal handshake, not a rejected one, and logs
    nothing); the certificate it returns is then checked against the CA. None also when
    nobody listens or the answer is unclear: the gRPC connection then decides.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
    try:
        certificate = _tls_handshake(host, int(port), unverified, timeout)
    except (OSError, ValueError):
        return None  # nobody listens (yet), or it does not answer: let gRPC decide
    if certificate is None:
        return (f"the server at {address} does not use TLS: drop --root-certificate, or "
                "start server.py with --certificates" if root_certificates else None)
    if root_certificates is None:
        return (f"the server at {address} uses TLS: pass --root-certificate with the CA "
                "that signed its certificate (ca.crt from make_certificates.py)")
    if not _signed_by(certificate, root_certificates):
        return (f"the server at {address} uses TLS and its certificate is not signed by "
                f"{root_name} (pass the ca.crt from the server's make_certificates.py)")
    try:  # signed by our CA; what gRPC also checks: the host name and the dates
        _tls_handshake(host, int(port),
                       ssl.create_default_context(cadata=root_certificates.decode("ascii")),
                       timeout)
    except ssl.SSLCertVerificationError as e:
        return f"the certificate of the server at {address} is not valid: {e.verify_message}"
    except (OSError, ValueError):
        return None
    return None


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


# --------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--partition", type=int, required=True,
                   help="index N of the shard to train on: DATA_DIR/partition_N.npz")
    p.add_argument("--server-address", default="127.0.0.1:8080", type=cli.address,
                   help="host:port of server.py (default: %(default)s)")
    p.add_argument("--data-dir", default="data", type=cli.nonempty,
                   help="directory written by partition_data.py (default: %(default)s)")
    p.add_argument("--seed", type=cli.seed, default=0,
                   help="seed of this client's shuffling; round r uses "
                        "fold_in(fold_in(key(seed), r), partition) (default: %(default)s)")
    p.add_argument("--max-wait", type=cli.seconds, default=60.0,
                   help="seconds to keep retrying while the server is not reachable, at "
                        "start or after it went away (default: %(default)s)")
    p.add_argument("--root-certificate", metavar="FILE", type=cli.nonempty,
                   help="CA certificate (PEM) to verify a TLS server, e.g. certificates/ca.crt "
                        "from make_certificates.py (default: plaintext)")
    p.add_argument("--attack", choices=attacks.ATTACKS,
                   help="turn this client into an attacker, to measure the server's robust "
                        "--aggregation rules: sign-flip sends global - BOOST x (local - "
                        "global); label-flip trains on labels 9 - y (default: honest)")
    p.add_argument("--attack-boost", type=cli.number(float, 0, low_open=True), default=10.0,
                   metavar="BOOST",
                   help="sign-flip: how far the reversed update is pushed "
                        "(default: %(default)s)")
    p.add_argument("--jax-cache", metavar="DIR", type=cli.nonempty,
                   help="JAX's persistent compilation cache, shared by every process on this "
                        f"machine; 'off' disables it (default: ${compile_cache.ENV_VAR}, else "
                        f"{compile_cache.default_dir()})")
    return p.parse_args(argv)


def stop_on_ctrl_c(_signum: int, _frame: object) -> None:
    """SIGINT: say so in one line and end the process at once, with exit status 1.

    Not a KeyboardInterrupt: raised inside Flower's gRPC connection (a blocking receive,
    or the channel's cleanup in a `finally`), it sometimes left the client hanging
    instead of stopping. The client has nothing to save (it writes no file, and the
    server keeps the model), so ending the process on the spot loses nothing.
    """
    print("client.py: interrupted", file=sys.stderr, flush=True)
    os._exit(1)


def main(argv: list[str] | None = None) -> None:
    """Load this client's shard and serve the server until the run ends."""
    args = parse_args(argv)
    signal.signal(signal.SIGINT, stop_on_ctrl_c)
    memory.limit_malloc_arenas()  # before gRPC and XLA start their threads
    update_console_handler(colored=sys.stderr.isatty())  # no escape codes in log files
    try:
        data = load_client_data(args.data_dir, args.partition)
        certificate = (load_root_certificate(args.root_certificate)
                       if args.root_certificate else None)
    except (shards.DataError, ConnectionProblem, OSError) as e:
        sys.exit(f"client.py: error: {e}")
    log(INFO, "partition %d: %d training / %d validation examples", args.partition,
        len(data.x_train), len(data.x_val))
    cache = compile_cache.enable(args.jax_cache)
    client = MnistClient(data, args.partition, args.seed, args.attack, args.attack_boost)
    if args.attack:
        log(WARNING, "partition %d is an ATTACKER (%s): its updates poison the global model",
            args.partition, args.attack)
    start = time.perf_counter()
    with compile_cache.compiling("client warm-up"):
        client.warm_up()
    log(INFO, "compiled training and evaluation in %.1f s (JAX cache: %s)",
        time.perf_counter() - start, cache or "off")
    try:
        run_client(client, args.server_address, certificate, args.max_wait,
                   args.root_certificate or "")
    except (ServerUnreachable, ConnectionProblem) as e:
        sys.exit(f"client.py: error: {e}")
    print("client.py: the server ended the run", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
