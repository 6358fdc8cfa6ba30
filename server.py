"""The Flower server: federated averaging over gRPC, with results, checkpoints and resume.

Runs FedAvg (McMahan et al. 2017) with flwr.server.start_server: every round it sends the
global model and the local-training settings to the clients, checks and averages what
they send back (weighted by their number of examples), evaluates the new global model on
the held-out test set (centralized) and on every client's validation split (federated),
and saves it all to --results-dir. The algorithm lives in federation/ (strategy.py, and
server_setup.py, which server_app.py shares); this file is the command line around it.

    python server.py                        # 5 rounds, waits for 10 clients on port 8080
    python server.py --rounds 8 --resume    # continue a stopped (or finished) run

A new run refuses a --results-dir that already holds one (continue it with --resume, or
replace it with --overwrite); nothing there changes until the server is listening. One
live run per directory: while a server (or a ServerApp) runs into it, another is refused,
with --resume or --overwrite too, in one line naming it (federation/run_lock.py).
SIGINT/SIGTERM stop the server with exit status 130/143, naming the last saved round.

Protection (README Part 5): --aggregation median|trimmed-mean|krum against poisoning
clients; --dp-noise-multiplier for DP-FedAvg, with the privacy spent (epsilon) recorded
every round.

    python server.py --aggregation median
    python server.py --dp-noise-multiplier 1.0 --dp-clipping-norm 1.0

Resume: --resume restarts from the newest round in --results-dir and numbers rounds on
from there. Allowed to change: --rounds (to extend a run), --min-clients,
--round-timeout, --address, --certificates and the directory paths. Everything else
(seed, --fraction-fit, local-training settings, the aggregation rule, DP, the data and
the model) must match, or the server refuses. A resumed run ends bit-identical to an uninterrupted one: which
clients train in a round depends only on --seed, the round and the connected partitions.
The server optimizer and its settings must match too; its state is part of the checkpoint.
"""

import argparse
import errno
import logging
import pathlib
import signal
import socket
import sys
from logging import INFO

from flwr.common import log
from flwr.common.logger import update_console_handler
from flwr.server import Server, ServerConfig, start_server
from flwr.server.history import History
from flwr.supercore.exit.exit_handler import trigger_exit_handlers

import model
from federation import compile_cache, memory, settings, shards
from federation.client_manager import NotEnoughClients, TimeoutClientManager
from federation.server_setup import SetupError, TrueRoundLogFilter, build_strategy
from federation.strategy import CheckedFedAvg

CERTIFICATE_FILES = ("ca.crt", "server.pem", "server.key")  # as make_certificates.py writes


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


def certificates_problem(ca: bytes, certificate: bytes, key: bytes) -> str | None:
    """Why the three PEM files cannot serve TLS, or None.

    gRPC reads them only once the server starts, and then fails with a traceback (or
    a bare "SSL_CTX_use_PrivateKey" log line): `cryptography`, a dependency of Flower,
    says which file is wrong first.
    """
    from cryptography import x509  # noqa: PLC0415  (TLS only)
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    try:
        x509.load_pem_x509_certificates(ca)
    except ValueError:
        return f"{CERTIFICATE_FILES[0]} is not a PEM certificate"
    try:
        server_certificate = x509.load_pem_x509_certificate(certificate)
    except ValueError:
        return f"{CERTIFICATE_FILES[1]} is not a PEM certificate"
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # TypeError: it has a passphrase
        return f"{CERTIFICATE_FILES[2]} is not an unencrypted PEM private key"
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (private_key.public_key().public_bytes(serialization.Encoding.PEM, public)
            != server_certificate.public_key().public_bytes(serialization.Encoding.PEM, public)):
        return f"{CERTIFICATE_FILES[2]} is not the private key of {CERTIFICATE_FILES[1]}"
    return None


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


def last_saved(strategy: CheckedFedAvg) -> str:
    """E.g. "round 2 is the last saved round" (for messages when the server stops)."""
    if not strategy.records:
        return "no round was saved"
    return f"round {strategy.records[-1]['round']} is the last saved round"


# The run's settings from the command line (tests and benchmarks build theirs this way).
settings_from_args = settings.from_args


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


def run(args: argparse.Namespace) -> None:
    """Run (or resume) the federation until --rounds are done."""
    certificates = load_certificates(args.certificates)
    cache = compile_cache.enable(args.jax_cache)
    log(INFO, "JAX compilation cache: %s", cache or "off")
    with compile_cache.compiling("server start-up"):
        prepared = build_strategy(settings_from_args(args))
        model.compile_steps(eval_batch_size=model.EVAL_BATCH_SIZE)  # before round 0
    if prepared is None:
        return
    fedavg, rounds_left = prepared
    if certificates is None:
        log(INFO, "TLS is off: updates travel unencrypted (fine on one machine; "
            "see --certificates)")
    client_manager = TimeoutClientManager(timeout=args.round_timeout,
                                          num_partitions=len(fedavg.shard_sizes), seed=args.seed)
    server = InterruptibleServer(client_manager=client_manager, strategy=fedavg)
    round_filter = TrueRoundLogFilter(fedavg.offset)
    logging.getLogger("flwr").addFilter(round_filter)
    try:
        start_server(server_address=args.address, server=server, certificates=certificates,
                     config=ServerConfig(num_rounds=rounds_left,
                                         round_timeout=args.round_timeout))
    except SystemExit as e:  # start_server exits with a bare message if the port is taken
        if isinstance(e.code, str):
            raise SetupError(listen_problem(args.address)
                             or e.code.strip().rstrip(".").replace("Port", "port", 1)) from e
        raise
    except Interrupted as e:
        e.saved = last_saved(fedavg)
        raise
    except NotEnoughClients as e:
        # Tell the clients still connected that the run is over (as Flower does at the
        # end of a finished run), or they would wait --max-wait for a server that is gone.
        server.disconnect_all_clients(timeout=5)
        raise SetupError(f"stopping: {e}; {last_saved(fedavg)} "
                         "(continue with --resume)") from e
    finally:
        logging.getLogger("flwr").removeFilter(round_filter)
        # start_server leaves its gRPC server running when it raises: close the clients'
        # streams, or the threads serving them would keep this process from exiting, and
        # stop the server (Flower registered that as an exit handler, run on its own
        # signal exits), or a client connecting while Python shuts down gets a traceback.
        client_manager.disconnect_all()
        trigger_exit_handlers(run_before_force_exit=False)
    print(f"done: global model in {pathlib.Path(args.results_dir) / 'global_model.npz'}",
          flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags: one per setting of federation/settings.py, and the transport's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    settings.add_arguments(p)
    args = p.parse_args(argv)
    problem = settings.args_problem(args)
    if problem:
        p.error(problem)
    return args


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run the server; one line on stderr, exit 1 on failure, 128+N on signal N."""
    args = parse_args(argv)
    memory.limit_malloc_arenas()  # before gRPC and XLA start their threads
    update_console_handler(colored=sys.stderr.isatty())  # no escape codes in log files
    try:
        run(args)
    except (SetupError, shards.DataError) as e:
        sys.exit(f"server.py: error: {e}")
    except KeyboardInterrupt:  # before the server was up: nothing was written
        print("server.py: interrupted before the server started", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # e.g. the results directory became unwritable
        sys.exit(f"server.py: error: {e}")
    except Interrupted as e:
        signum = e.args[0]
        print(f"server.py: stopped by {signal.Signals(signum).name}; {e.saved} in "
              f"{args.results_dir} (continue with --resume)", file=sys.stderr, flush=True)
        sys.exit(128 + signum)


if __name__ == "__main__":
    main()
