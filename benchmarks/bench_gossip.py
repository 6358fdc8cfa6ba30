"""No server: FedAvg against gossip on a ring, a torus, an exponential and a complete graph.

Every run is computed in one process: FedAvg by federation/simulation.py (= server.py +
client.py, bit for bit), gossip by federation/gossip_simulation.py (= peer.py's
processes, bit for bit; tests/test_peer.py), with the same local recipe (model.py's
default: 3 epochs of Adam, batch 32), the same key rule and the same initial model. The
data: Debian's Fashion-MNIST IDX files split for 10 clients/peers by partition_data.py
(IID, Dirichlet 0.5, Dirichlet 0.1; 10% of each shard held out for validation).

Per round it records, for gossip: the mean and the worst peer's test accuracy, the
accuracy of the peers' average model (which no peer holds), the consensus distance
sqrt(mean_i ||x_i - x̄||²), and the bytes each peer sends and receives; for FedAvg: the
global model's test accuracy (every client holds it: mean = worst = average). The most
bytes through any one process per round: the FedAvg server's 2 x clients x model
against the busiest peer's 2 x degree x model.

Runs go split by split, Dirichlet 0.5 first (the most telling partial result), and each
run's record is appended to --json when it ends, so a stopped benchmark keeps what it
finished, and a restarted one skips the runs already there.

    nohup nice -n 15 python benchmarks/bench_gossip.py --json docs/gossip.jsonl \\
        --plot docs/gossip.png > gossip-bench.log 2>&1 &      # ~15 runs x 20 rounds
    python benchmarks/bench_gossip.py --from-json docs/gossip.jsonl --plot docs/gossip.png
    python benchmarks/bench_gossip.py --rounds 2 --train-fraction 0.02 --splits iid \\
        --json /tmp/gossip.jsonl                                 # a one-minute check
"""

import argparse
import json
import os
import pathlib
import sys
import textwrap
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import model  # noqa: E402  (the repo root is on sys.path only after the line above)
from _common import add_data_flags  # noqa: E402  (benchmarks/ is on sys.path: this directory)
from bench_noniid import make_split, with_fraction  # noqa: E402
from federation import gossip, gossip_simulation, peer_round, shards, simulation  # noqa: E402
from federation.peer_round import GossipSettings  # noqa: E402
from federation.server_setup import ServerSettings  # noqa: E402

SPLITS = ("dir0.5", "iid", "dir0.1")  # in the order they run
TITLES = {"iid": "IID", "dir0.5": "Dirichlet α = 0.5", "dir0.1": "Dirichlet α = 0.1"}
METHODS = ("fedavg", *gossip.TOPOLOGIES)
PEERS = 10  # bench_noniid.make_split's 10 partitions


def run_fedavg(partitions: list[shards.Partition], test_set: tuple[np.ndarray, np.ndarray],
               rounds: int, epochs: int, seed: int, label: str) -> list[dict]:
    """FedAvg's rounds 1..rounds, in the gossip runs' terms."""
    n, size = len(partitions), peer_round.model_bytes()
    settings = ServerSettings(rounds=rounds, min_clients=n, local_epochs=epochs, seed=seed)
    history = []

    def progress(done: simulation.Round) -> None:
        r, accuracy = done.record["round"], done.record["centralized_accuracy"]
        if r:
            history.append({"round": r, "mean_test_accuracy": accuracy,
                            "worst_test_accuracy": accuracy, "average_model_accuracy": accuracy,
                            "consensus_distance": 0.0, "bytes_sent_per_peer": size,
                            "bytes_received_per_peer": size, "busiest_process_bytes": 2 * n * size})
            print(f"  {label} round {r}/{rounds}: {100 * accuracy:.2f}%", file=sys.stderr,
                  flush=True)

    simulation.run(settings, partitions, test_set, federated_evaluation=False, on_round=progress)
    return history


def run_gossip(topology: str, partitions: list[shards.Partition],
               test_set: tuple[np.ndarray, np.ndarray], rounds: int, epochs: int, seed: int,
               label: str) -> list[dict]:
    """Gossip's rounds 1..rounds (gossip_simulation's summaries, with the busiest peer)."""
    settings = GossipSettings(topology, rounds=rounds, local_epochs=epochs, seed=seed)
    history = []

    def progress(done: gossip_simulation.Round) -> None:
        s = done.summary
        if s["round"]:
            history.append({**s, "busiest_process_bytes": (s["bytes_sent_per_peer"]
                                                           + s["bytes_received_per_peer"])})
            print(f"  {label} round {s['round']}/{rounds}: mean {100 * s['mean_test_accuracy']:.2f}%"
                  f" worst {100 * s['worst_test_accuracy']:.2f}% average model "
                  f"{100 * s['average_model_accuracy']:.2f}% consensus "
                  f"{s['consensus_distance']:.3f}", file=sys.stderr, flush=True)

    gossip_simulation.run(settings, partitions, test_set, on_round=progress)
    return history


def header() -> str:
    """The table's head line."""
    return (f"{'split':7s} {'method':12s} {'|λ₂|':>5s} {'mean':>6s} {'worst':>6s} "
            f"{'avg':>6s} {'consensus':>9s} {'MB/peer':>7s} {'MB busiest':>10s} {'s/rnd':>6s}")


def row(result: dict) -> str:
    """One table line: the last round of a run."""
    last = result["history"][-1]
    return (f"{result['split']:7s} {result['method']:12s} {result['lambda2']:5.3f} "
            f"{100 * last['mean_test_accuracy']:6.2f} {100 * last['worst_test_accuracy']:6.2f} "
            f"{100 * last['average_model_accuracy']:6.2f} {last['consensus_distance']:9.3f} "
            f"{(last['bytes_sent_per_peer'] + last['bytes_received_per_peer']) / 1e6:7.2f} "
            f"{last['busiest_process_bytes'] / 1e6:10.2f} "
            f"{result['seconds'] / len(result['history']):6.1f}")


def markdown(results: list[dict]) -> str:
    """The guide's table: one line per run, after its last round."""
    lines = ["| split | method | \\|λ₂\\| | mean peer | worst peer | peers' average | "
             "consensus distance | MB per peer per round (sent + received) | "
             "MB through the busiest process |", "|---" * 9 + "|"]
    for r in sorted(results, key=lambda r: (SPLITS.index(r["split"]),
                                            METHODS.index(r["method"]))):
        last = r["history"][-1]
        lines.append(
            f"| {TITLES[r['split']]} | {r['method']} | {r['lambda2']:.3f} | "
            f"{100 * last['mean_test_accuracy']:.2f}% | {100 * last['worst_test_accuracy']:.2f}% "
            f"| {100 * last['average_model_accuracy']:.2f}% | {last['consensus_distance']:.3f} | "
            f"{(last['bytes_sent_per_peer'] + last['bytes_received_per_peer']) / 1e6:.2f} | "
            f"{last['busiest_process_bytes'] / 1e6:.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: pathlib.Path, title: str) -> None:
    """One column per split: mean (solid) and worst (dotted) peer test accuracy per round,
    and below it the consensus distance."""
    import matplotlib  # noqa: PLC0415  (only when plotting)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    splits = [s for s in SPLITS if any(r["split"] == s for r in results)]
    fig, axes = plt.subplots(2, len(splits), figsize=(4.6 * len(splits), 6.4), squeeze=False,
                             sharex="col", gridspec_kw={"height_ratios": [2, 1]})
    colour = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for column, split in enumerate(splits):
        top, bottom = axes[0, column], axes[1, column]
        for r in sorted((r for r in results if r["split"] == split),
                        key=lambda r: METHODS.index(r["method"])):
            rounds = [h["round"] for h in r["history"]]
            top.plot(rounds, [100 * h["mean_test_accuracy"] for h in r["history"]],
                     color=colour[r["method"]], label=r["method"])
            if r["method"] != "fedavg":
                top.plot(rounds, [100 * h["worst_test_accuracy"] for h in r["history"]],
                         color=colour[r["method"]], linestyle=":", linewidth=1)
                bottom.plot(rounds, [h["consensus_distance"] for h in r["history"]],
                            color=colour[r["method"]], label=r["method"])
        top.set_title(TITLES[split], fontsize=10)
        top.grid(alpha=0.3), bottom.grid(alpha=0.3)
        top.legend(fontsize=7, loc="lower right")
        bottom.set_xlabel("round")
        bottom.xaxis.get_major_locator().set_params(integer=True)
    axes[0, 0].set_ylabel("test accuracy (%)\nsolid: mean peer, dotted: worst")
    axes[1, 0].set_ylabel("consensus distance")
    fig.suptitle("\n".join(textwrap.wrap(title, 40 * len(splits) + 20)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(results: list[dict], plot_path: pathlib.Path | None) -> None:
    """The table (plain and Markdown) and the plot."""
    print("\n" + header())
    for r in sorted(results, key=lambda r: (SPLITS.index(r["split"]),
                                            METHODS.index(r["method"]))):
        print(row(r))
    print("\n" + markdown(results))
    if plot_path:
        plot(results, plot_path, results[0]["scale"])
        print(f"plot: {plot_path}")


def read_json(path: pathlib.Path) -> list[dict]:
    """The runs recorded in a --json file (none if it does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    """Check the flags, then compare (or only report --from-json); bad input is one line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_flags(p, "bench_gossip")
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                   help="data splits, run in this order (default: %(default)s)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="fedavg and gossip topologies (default: all)")
    p.add_argument("--rounds", type=int, default=20, help="rounds (default: %(default)s)")
    p.add_argument("--local-epochs", type=int, default=model.LOCAL_EPOCHS,
                   help="local epochs per round (default: %(default)s, the federation's)")
    p.add_argument("--train-fraction", type=float, default=1.0,
                   help="fraction of each shard's training images used, a seeded sample "
                        "(default: %(default)s: all 54,000)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument("--json", type=pathlib.Path,
                   help="append one JSON line per run here; runs already there are skipped")
    p.add_argument("--from-json", type=pathlib.Path,
                   help="do not train: report the runs in this file")
    p.add_argument("--plot", type=pathlib.Path, help="write the comparison plot here (PNG)")
    args = p.parse_args()
    if args.rounds < 1 or args.local_epochs < 1 or not 0 < args.train_fraction <= 1:
        p.error("--rounds and --local-epochs must be >= 1, --train-fraction in (0, 1]")
    try:
        if args.from_json:
            results = read_json(args.from_json)
            if not results:
                sys.exit(f"bench_gossip.py: error: {args.from_json} holds no runs")
            report(results, args.plot)
            return
        if args.json:  # a wrong path fails now, not after the first run
            args.json.open("a").close()
        compare(args)
    except (OSError, shards.DataError) as e:
        sys.exit(f"bench_gossip.py: error: {e}")
    except (ValueError, KeyError, IndexError) as e:
        sys.exit(f"bench_gossip.py: error: not this script's JSON lines ({e!r})")


def compare(args: argparse.Namespace) -> None:
    """Run every (split, method) pair not in --json yet; append each; report them all."""
    scale = (f"Fashion-MNIST, {PEERS} peers/clients, {args.rounds} rounds x "
             f"{args.local_epochs} local epoch(s), {100 * args.train_fraction:g}% of the "
             "54,000 training images")
    print(f"{os.cpu_count()} CPUs, jax {jax.__version__}; {scale}", flush=True)
    done = read_json(args.json) if args.json else []
    done = [r for r in done if r["scale"] == scale]
    results = list(done)
    for split in args.splits:
        data_dir = make_split(split, args.idx_dir, args.data_root / split, args.seed)
        partitions, test_set = shards.load_all(data_dir)
        partitions = with_fraction(partitions, args.train_fraction, args.seed)
        for method in args.methods:
            if any((r["split"], r["method"]) == (split, method) for r in done):
                continue
            start, label = time.perf_counter(), f"{split} {method}"
            if method == "fedavg":
                history, lam, degree = run_fedavg(partitions, test_set, args.rounds,
                                                  args.local_epochs, args.seed, label), 0.0, 1
            else:
                topo = gossip.topology(method, len(partitions))
                lam = gossip.second_eigenvalue(gossip.metropolis_hastings(topo))
                degree = topo.degree(0)
                history = run_gossip(method, partitions, test_set, args.rounds,
                                     args.local_epochs, args.seed, label)
            result = {"split": split, "method": method, "lambda2": lam, "degree": degree,
                      "history": history, "seconds": time.perf_counter() - start,
                      "scale": scale, "train_images": sum(len(c.x_train) for c in partitions)}
            results.append(result)
            print(row(result), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(result) + "\n")
    report(results, args.plot)


if __name__ == "__main__":
    main()
