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
from federation import cli, compile_cache, memory, shards
from federation.aggregation import RULES
from federation.client_manager import NotEnoughClients, TimeoutClientManager
from federation.flower_internals import trigger_exit_handlers
from federation.grpc_server import (
    Interrupted,
    InterruptibleServer,
    listen_problem,
    load_certificates,
)
from federation.server_setup import (
    ServerSettings,
    SetupError,
    TrueRoundLogFilter,
    build_strategy,
)
from federation.strategy import CheckedFedAvg


def last_saved(strategy: CheckedFedAvg) -> str:
    """E.g. "round 2 is the last saved round" (for messages when the server stops)."""
    if not strategy.records:
        return "no round was saved"
    return f"round {strategy.records[-1]['round']} is the last saved round"


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The run's settings from the command line (the transport's own flags recorded aside)."""
    return ServerSettings(
        rounds=args.rounds, min_clients=args.min_clients, fraction_fit=args.fraction_fit,
        local_epochs=args.local_epochs, batch_size=args.batch_size,
        client_optimizer=args.client_optimizer, learning_rate=args.learning_rate,
        seed=args.seed, round_timeout=args.round_timeout,
        proximal_mu=args.proximal_mu, server_optimizer=args.server_optimizer,
        server_learning_rate=args.server_learning_rate, server_momentum=args.server_momentum,
        data_dir=args.data_dir, results_dir=args.results_dir, resume=args.resume,
        overwrite=args.overwrite, aggregation=args.aggregation,
        trim_fraction=args.trim_fraction, krum_malicious=args.krum_malicious,
        dp_noise_multiplier=args.dp_noise_multiplier, dp_clipping_norm=args.dp_clipping_norm,
        dp_delta=args.dp_delta,
        transport={"address": args.address, "certificates": args.certificates})


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
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default="0.0.0.0:8080",
                   help="host:port to listen on (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5,
                   help="federated rounds, counting rounds already done when resuming "
                        "(default: %(default)s)")
    p.add_argument("--min-clients", type=int, default=10,
                   help="clients that must be connected before a round starts "
                        "(default: %(default)s, one per partition)")
    p.add_argument("--fraction-fit", type=float, default=1.0,
                   help="fraction of connected clients that train (and evaluate) each round; "
                        "< 1 samples them by --seed and round, reproducibly "
                        "(default: %(default)s)")
    p.add_argument("--local-epochs", type=int, default=model.LOCAL_EPOCHS,
                   help="epochs each client trains per round (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=model.BATCH_SIZE,
                   help="clients' mini-batch size (default: %(default)s)")
    p.add_argument("--client-optimizer", default=model.OPTIMIZER, metavar="NAME",
                   help="clients' local optimizer: adam, or sgd (momentum "
                        f"{model.SGD_MOMENTUM}), better on extreme label skew "
                        "(default: %(default)s)")
    p.add_argument("--learning-rate", type=float,
                   help="clients' peak learning rate (default: "
                        + ", ".join(f"{v:g} for {k}" for k, v in model.LEARNING_RATES.items())
                        + ")")
    p.add_argument("--proximal-mu", type=float, default=0.0, metavar="MU",
                   help="FedProx (Li et al. 2020): clients add MU/2 ||w - w_global||^2 to "
                        "their loss, which limits their drift on non-IID data; 0 is FedAvg "
                        "(default: %(default)s)")
    p.add_argument("--server-optimizer", default="fedavg", metavar="NAME",
                   help="how the server moves the global model to the clients' average: "
                        "fedavg (it becomes the average), or an optimizer step on "
                        "global - average (Reddi et al. 2021): fedavgm (momentum), fedadam, "
                        "fedyogi (default: %(default)s)")
    p.add_argument("--server-learning-rate", type=float, metavar="ETA",
                   help="the server optimizer's step size (default: 1.0 for fedavgm, 0.01 "
                        "for fedadam and fedyogi; fedavg takes none)")
    p.add_argument("--server-momentum", type=float, metavar="BETA",
                   help="fedavgm's momentum, fedadam's and fedyogi's beta1, in [0, 1) "
                        "(default: 0.9; fedavg takes none)")
    p.add_argument("--data-dir", default="data", type=cli.nonempty,
                   help="directory written by partition_data.py; the server reads "
                        "manifest.json and test.npz (default: %(default)s)")
    p.add_argument("--results-dir", default="results", type=cli.nonempty,
                   help="where metrics and models are written (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial global model (default: %(default)s)")
    p.add_argument("--round-timeout", type=float, default=300.0,
                   help="seconds a client may take to answer, and to wait for --min-clients "
                        "to be connected before giving up (default: %(default)s)")
    defaults = ServerSettings()
    p.add_argument("--aggregation", choices=RULES, default=defaults.aggregation,
                   help="how the clients' models become the global model: fedavg (weighted "
                        "mean), or a rule robust to poisoning clients: median, trimmed-mean, "
                        "krum (default: %(default)s)")
    p.add_argument("--trim-fraction", type=float, default=defaults.trim_fraction,
                   help="trimmed-mean: fraction of the values dropped at each end, per "
                        "coordinate, in [0, 0.5) (default: %(default)s)")
    p.add_argument("--krum-malicious", type=int, default=defaults.krum_malicious,
                   help="krum: how many malicious clients it must tolerate; needs more than "
                        "2f + 2 clients per round (default: %(default)s)")
    p.add_argument("--dp-noise-multiplier", type=float, metavar="SIGMA",
                   help="turn on DP-FedAvg (user-level differential privacy): Gaussian noise "
                        "of std SIGMA x --dp-clipping-norm on the sum of clipped updates; 0 "
                        "clips without noise (no privacy) (default: off)")
    p.add_argument("--dp-clipping-norm", type=float, default=defaults.dp_clipping_norm,
                   help="DP-FedAvg: every update (client model minus global model) is scaled "
                        "down to this L2 norm at most (default: %(default)s)")
    p.add_argument("--dp-delta", type=float, default=defaults.dp_delta,
                   help="DP-FedAvg: the delta of the (epsilon, delta) guarantee reported "
                        "each round (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --results-dir from its newest round")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --results-dir (its metrics and models "
                        "are deleted once this server is listening); without it, a "
                        "directory that holds a run is refused")
    p.add_argument("--certificates", metavar="DIR", type=cli.nonempty,
                   help="enable TLS with DIR/ca.crt, DIR/server.pem, DIR/server.key from "
                        "make_certificates.py (default: plaintext)")
    p.add_argument("--jax-cache", metavar="DIR", type=cli.nonempty,
                   help="JAX's persistent compilation cache, shared by every process on this "
                        f"machine; 'off' disables it (default: ${compile_cache.ENV_VAR}, else "
                        f"{compile_cache.default_dir()})")
    args = p.parse_args(argv)
    problem = cli.address_problem(args.address)
    if problem:
        p.error(f"--address {args.address!r} {problem}")
    problem = settings_from_args(args).problem()
    if problem:
        p.error(f"--{problem}")
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
