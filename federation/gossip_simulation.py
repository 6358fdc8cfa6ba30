"""Decentralised training in one process: every peer of peer.py, computed here, bit for bit.

Like simulation.py for FedAvg, `run` gives every peer's model and metrics.json records
that N peer.py processes give over jax.distributed, in the same bits on the same
machine (tests/test_peer.py checks it), so experiments (benchmarks/bench_gossip.py) need
no processes. Each round, every peer

    train      peer_round.train: local_training.fit, a client's recipe and key rule
    mix        gossip.mix_row: sum_j W_ij x_j over itself and its neighbours
    evaluate   peer_round.evaluate: its validation split and the test set

Being in one process, it also measures what no peer can: the accuracy of the peers'
average model and the exact consensus distance, sqrt(mean_i ||x_i - x̄||²).
"""

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence

import numpy as np

from federation import gossip, peer_round
from federation.peer_round import Arrays, GossipSettings
from federation.shards import Partition


@dataclasses.dataclass(frozen=True)
class Round:
    """One finished round: the network's summary, every peer's record and model."""

    summary: dict             # round, mean/worst test accuracy, average model, consensus
    peers: list[dict]         # peer_round.record of each peer (what its metrics.json holds)
    models: list[Arrays]      # every peer's model after the round


@dataclasses.dataclass(frozen=True)
class Result:
    """A whole run: rounds 0..settings.rounds and every peer's final model."""

    rounds: list[Round]
    models: list[Arrays]


def summarize(server_round: int, peers: Sequence[dict], models: Sequence[Arrays],
              average_accuracy: float, trained: Sequence[Arrays] | None) -> dict:
    """The round's network-wide numbers (the benchmark's and the progress line's)."""
    accuracies = [p["test_accuracy"] for p in peers]
    return {"round": server_round, "mean_test_accuracy": float(np.mean(accuracies)),
            "worst_test_accuracy": min(accuracies),
            "average_model_accuracy": average_accuracy,
            "consensus_distance": gossip.consensus_distance(models),
            "consensus_distance_trained": (gossip.consensus_distance(trained)
                                           if trained is not None else 0.0),
            "mean_neighbour_distance": peers[0]["mean_neighbour_distance"],
            "bytes_sent_per_peer": max(p["bytes_sent"] for p in peers),
            "bytes_received_per_peer": max(p["bytes_received"] for p in peers)}


def run(settings: GossipSettings, partitions: Sequence[Partition],
        test_set: tuple[np.ndarray, np.ndarray], *,
        initial_models: Sequence[Arrays] | None = None,
        on_round: Callable[[Round], None] | None = None) -> Result:
    """Run settings.rounds rounds of gossip over `partitions` (peer i trains partition i).

    Args:
      settings: the peers' settings (peer.py's flags).
      partitions: one peer each.
      test_set: (x_test, y_test), on which every peer evaluates its model each round.
      initial_models: each peer's round-0 model (default: all start from
        peer_round.initial_model(seed), as peer.py does).
      on_round: called after round 0 and after every round.
    Raises:
      ValueError (one line) for settings that cannot run.
    """
    n = len(partitions)
    problem = settings.problem(n)
    if problem:
        raise ValueError(problem)
    topo = gossip.topology(settings.topology, n)
    w = gossip.metropolis_hastings(topo)
    test = _cached(peer_round.test_evaluator(*test_set))
    models = ([list(m) for m in initial_models] if initial_models is not None else
              [peer_round.initial_model(settings.seed)] * n)
    rounds: list[Round] = []

    def finish(r: int, trained: list[Arrays] | None, metrics: list[dict], start: float) -> None:
        distances = ([gossip.distance(t, m) for t, m in zip(trained, models)]
                     if trained is not None else None)
        peers = [peer_round.record(r, i, peer_round.evaluate(partitions[i], models[i], i, test),
                                   metrics[i], trained[i] if trained else None, models[i],
                                   distances, topo.degree(i)) for i in range(n)]
        average = test(gossip.mean_model(models))[1]
        seconds = round(time.perf_counter() - start, 3)
        for p in peers:
            p["round_seconds"] = seconds
        done = Round(summarize(r, peers, models, average, trained), peers, list(models))
        rounds.append(done)
        if on_round is not None:
            on_round(done)

    finish(0, None, [{}] * n, time.perf_counter())
    for r in range(1, settings.rounds + 1):
        start = time.perf_counter()
        results = [peer_round.train(partitions[i], models[i], settings, r, i) for i in range(n)]
        trained = [t for t, _ in results]
        models = gossip.gossip_step(w, trained)
        finish(r, trained, [m for _, m in results], start)
    return Result(rounds, models)


def _cached(evaluate: Callable[[Arrays], tuple[float, float]]
            ) -> Callable[[Arrays], tuple[float, float]]:
    """evaluate, remembering the last round's answers by the model's bytes: peers that
    hold the same model (all of them in round 0, and on a complete graph) cost one."""
    seen: dict[bytes, tuple[float, float]] = {}

    def cached(arrays: Arrays) -> tuple[float, float]:
        digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes()
                                         for a in arrays)).digest()
        if digest not in seen:
            if len(seen) > 64:
                seen.clear()
            seen[digest] = evaluate(arrays)
        return seen[digest]
    return cached
