"""A Flower client: one process per data partition, training the global model locally.

In FedAvg (McMahan et al. 2017) every client starts a round from the server's global
model, trains it for a few epochs on data that never leaves the client, and sends back
only the new weights and its number of training examples. This file runs that client:

- MnistClient (federation/mnist_client.py), a flwr.client.NumPyClient built from the
  shard of --partition and a seed; client_app.py wraps the same class unchanged.
- run_client (federation/grpc_client.py), which connects to server.py over gRPC,
  waiting (with backoff) for a server that is not up yet or that went away, for up to
  --max-wait seconds. A TLS mismatch (no CA, wrong CA, or a CA for a plaintext server)
  is reported at once instead.

    python client.py --partition 0        # one per partition, before or after server.py
    python client.py --partition 9 --attack sign-flip   # a poisoning client (README Part 5)
"""

import argparse
import os
import signal
import sys
import time
from logging import INFO, WARNING

from flwr.common import log
from flwr.common.logger import update_console_handler

from federation import attacks, cli, compile_cache, memory, shards
from federation.grpc_client import (
    ConnectionProblem,
    ServerUnreachable,
    load_root_certificate,
    run_client,
)
from federation.mnist_client import MnistClient, load_client_data


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
    compile_cache.add_flag(p)
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
