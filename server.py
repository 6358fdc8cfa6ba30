"""The Flower server: federated averaging over gRPC, with results, checkpoints and resume.

Runs FedAvg (McMahan et al. 2017) with flwr.server.start_server: every round it sends the
global model and the local-training settings to the clients, checks and averages what
they send back (weighted by their number of examples), evaluates the new global model on
the held-out test set (centralized) and on every client's validation split (federated),
and saves it all to --results-dir. The algorithm lives in federation/ (strategy.py, and
server_setup.py, which server_app.py shares), the gRPC plumbing (certificates, the port,
signals) in federation/grpc_server.py; this file is the command line around it.

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
import logging
import pathlib
import signal
import sys
from logging import INFO

from flwr.common import log
from flwr.common.logger import update_console_handler
from flwr.server import ServerConfig, start_server

import model
from federation import compile_cache, memory, settings, shards
from federation.client_manager import NotEnoughClients, TimeoutClientManager
from federation.flower_internals import trigger_exit_handlers
from federation.grpc_server import (
    Interrupted,
    InterruptibleServer,
    listen_problem,
    load_certificates,
)
from federation.server_setup import SetupError, TrueRoundLogFilter, build_strategy
from federation.strategy import CheckedFedAvg


def last_saved(strategy: CheckedFedAvg) -> str:
    """E.g. "round 2 is the last saved round" (for messages when the server stops)."""
    if not strategy.records:
        return "no round was saved"
    return f"round {strategy.records[-1]['round']} is the last saved round"


# The run's settings from the command line (tests and benchmarks build theirs this way).
settings_from_args = settings.from_args


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
