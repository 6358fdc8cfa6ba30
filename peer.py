"""A peer with no server: train on your own shard, then average with your neighbours only.

Decentralised training (D-PSGD, Lian et al. 2017, with local epochs between averagings):
N copies of this script, one per data partition, each train a client's round
(federation/peer_round.py: the same recipe and key rule as client.py), then send their
model to their neighbours in --topology and take the Metropolis–Hastings average of
their own and their neighbours' (federation/gossip.py). No process ever holds or
computes the average of all peers. The models travel over JAX's multi-process runtime
(federation/gossip_transport.py): jax.distributed for the rendezvous, gloo collectives
(`lax.ppermute` inside `shard_map`) for the weights.

    python peer.py --rank 0 --peers 10 &     # peer 0 also runs the coordinator
    python peer.py --rank 1 --peers 10 &     # ... one per partition, in any order
    python peer.py --rank 9 --peers 10

Every peer evaluates its model on its validation split and on the test set each round
and writes its own results into RESULTS_DIR/peer_RANK (metrics.json, a model per round,
atomically, one live run per directory, as server.py does). A peer that dies or hangs
stops the others within --timeout seconds, each with one line naming it and its own last
saved round; `--resume` on every peer continues bit-identically to an uninterrupted run.
The whole run in one process, bit for bit: federation/gossip_simulation.py.

This file is the shell: the flags, and a small parent process that imports no JAX and
runs the peer itself (federation/peer_worker.py) as its child, so that where JAX's
multi-process runtime would end the peer with a fatal log (a rank taken twice, peers
that never arrive, peer 0 gone) you read one line (federation/peer_supervisor.py).
"""

import argparse
import pathlib
import sys

from federation import cli, compile_cache, gossip, peer_supervisor

PROG = "peer.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags, checked (argparse's one-line error, exit status 2)."""
    import model  # noqa: PLC0415  (JAX: parsed in the worker, never in the parent)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=cli.number(int, 0), required=True,
                   help="this peer's number, 0..PEERS-1; it trains DATA_DIR/partition_RANK.npz; "
                        "peer 0 also runs the coordinator")
    p.add_argument("--peers", type=cli.number(int, 2), default=10,
                   help="how many peers the run has, all started with the same flags but "
                        "--rank (default: %(default)s)")
    p.add_argument("--coordinator", type=cli.address, default="127.0.0.1:8476",
                   help="HOST:PORT of the coordinator that peer 0 runs (rendezvous and "
                        "health checks; no model goes through it); every peer passes the same "
                        "(default: %(default)s)")
    p.add_argument("--topology", choices=gossip.TOPOLOGIES, default="ring",
                   help="who averages with whom: ring (2 neighbours), torus (a 2-D grid with "
                        "wrap-around, 4), exponential (i +- 2^k), complete (everyone: FedAvg "
                        "without a server) (default: %(default)s)")
    p.add_argument("--data-dir", type=cli.path, default=pathlib.Path("data"),
                   help="directory written by partition_data.py; this peer reads only its own "
                        "partition, the manifest and test.npz (default: %(default)s)")
    p.add_argument("--rounds", type=cli.count, default=5,
                   help="rounds of local training + gossip, counting rounds already done when "
                        "resuming (default: %(default)s)")
    p.add_argument("--local-epochs", type=cli.count, default=model.LOCAL_EPOCHS,
                   help="epochs each peer trains per round (default: %(default)s)")
    p.add_argument("--seed", type=cli.seed, default=0,
                   help="seed of the common initial model; round r of peer i shuffles with "
                        "fold_in(fold_in(key(seed), r), i), as client.py (default: %(default)s)")
    p.add_argument("--results-dir", type=cli.path, default=pathlib.Path("results"),
                   help="each peer writes RESULTS_DIR/peer_RANK (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RESULTS_DIR/peer_RANK; give it to every peer")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in RESULTS_DIR/peer_RANK (deleted once all "
                        "peers have met); without it, a directory that holds a run is refused")
    p.add_argument("--timeout", type=cli.number(float, 1, cli.MAX_SECONDS), default=300.0,
                   help="seconds a peer waits for the others at every exchange, beyond its "
                        "own training; a peer that dies or hangs stops the rest after this "
                        "long, each naming it (default: %(default)s)")
    p.add_argument("--start-timeout", type=cli.number(float, 1, cli.MAX_SECONDS),
                   default=300.0,
                   help="seconds a peer waits for the coordinator and for all --peers to "
                        "meet at the start (default: %(default)s)")
    compile_cache.add_flag(p)
    args = p.parse_args(argv)
    if args.rank >= args.peers:
        p.error(f"--rank {args.rank} must be below --peers {args.peers} (ranks 0.."
                f"{args.peers - 1})")
    try:
        gossip.topology(args.topology, args.peers)
    except ValueError as e:
        p.error(f"--topology {args.topology} with --peers {args.peers}: {e}")
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite contradict each other: choose one")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the peer in a worker process and leave with its exit status; in the worker,
    parse the flags (argparse's one-line error, status 2) and run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not peer_supervisor.in_worker():
        sys.exit(peer_supervisor.run_worker(
            [sys.executable, str(pathlib.Path(__file__).resolve()), *argv]))
    from federation import peer_worker  # noqa: PLC0415  (JAX: only in the worker)
    peer_worker.main(parse_args(argv))


if __name__ == "__main__":
    main()
