"""The server's side of the legacy gRPC path (server.py): certificates, the port, signals.

What flwr.server.start_server leaves to server.py: checking the --certificates files
before gRPC reads them (federation/tls.py), saying why nothing can listen on --address
(start_server says "port ... already in use" for every failure), and stopping on
SIGINT/SIGTERM with an exception rather than Flower's exit status 0 (InterruptibleServer).
"""

import errno
import pathlib
import signal
import socket

from flwr.server import Server
from flwr.server.history import History

from federation.server_setup import SetupError
from federation.tls import CERTIFICATE_FILES, certificates_problem


def load_certificates(directory: str | None) -> tuple[bytes, bytes, bytes] | None:
    """(CA certificate, server certificate, server key) from a make_certificates.py dir."""
    if directory is None:
        return None
    paths = [pathlib.Path(directory) / name for name in CERTIFICATE_FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SetupError(f"--certificates: {', '.join(missing)} not found "
                         "(create them with make_certificates.py)")
    pems = tuple(p.read_bytes() for p in paths)
    problem = certificates_problem(*pems)
    if problem:
        raise SetupError(f"--certificates {directory}: {problem} (create them with "
                         "make_certificates.py)")
    return pems  # type: ignore[return-value]


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived during the run; args[0] is the signal number.

    A BaseException, like KeyboardInterrupt: the handler raises it wherever the main
    thread is, and an `except Exception` there (logging's emit has one) must not swallow
    it, or the server would carry on after the signal.
    """

    saved = "no round was saved"  # set by run(), which knows the strategy


class InterruptibleServer(Server):
    """Flower's Server, but SIGINT/SIGTERM stop it with an exception, not exit status 0.

    start_server installs handlers that log "terminated gracefully" and exit 0, the same
    as a finished run, and offers no way to change that; it calls fit() after installing
    them, so the handlers set here replace them for the whole run.
    """

    def fit(self, num_rounds: int, timeout: float | None) -> tuple[History, float]:
        """Run the rounds with our signal handlers in place."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._interrupt)
        return super().fit(num_rounds, timeout)

    def _interrupt(self, signum: int, _frame: object) -> None:
        """Close every client stream (so no round waits on one), then unwind the run."""
        self.client_manager().disconnect_all()
        raise Interrupted(signum)


def listen_problem(address: str) -> str | None:
    """Why nothing can listen on address, other than the port being in use, or None.

    start_server says "port ... already in use" for every failure to listen, also for a
    host that is not an address of this machine: a plain bind says which it is.
    """
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"cannot listen on {address}: the host is unknown ({e.strerror})"
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return f"cannot listen on {address}: {e.strerror}"
    return None
