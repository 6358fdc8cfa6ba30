"""What the server computes from a round's replies, free of Flower's types: the aggregate
of the accepted updates (a rule, or DP-FedAvg) and the round's averaged metrics.

CheckedFedAvg (strategy.py: server.py and the ServerApp) and simulation.py (the whole
federation in one process) both call these functions, so both give the same bits. The
server optimizer's step from the aggregate is server_optimizers.ServerOptimizer.step.
"""

import math
from collections.abc import Mapping, Sequence
from logging import WARNING

import numpy as np
from flwr.common import log

from federation import privacy
from federation.aggregation import (Arrays, Update, aggregate, krum_minimum_clients,
                                    update_norm, weighted_mean)

# The seeded random streams of a round are np.random.default_rng([seed, round, stream]):
# 0 picks the clients that train, 1 those that evaluate (client_manager.py), 2 draws
# DP-FedAvg's noise. One stream per purpose: no draw ever reuses another's numbers.
DP_NOISE_STREAM = 2


def aggregate_updates(global_arrays: Arrays, updates: Sequence[Update], *, server_round: int,
                      seed: int, aggregation: str = "fedavg", trim_fraction: float = 0.0,
                      krum_malicious: int = 0, dp: privacy.DPConfig | None = None,
                      num_sampled: int | None = None) -> tuple[Arrays, dict]:
    """The aggregate of the accepted updates (in partition order), and the round's statistics
    {"update_norm": median norm of the updates[, "clipped": how many DP-FedAvg clipped]}.

    With dp, DP-FedAvg over the num_sampled clients asked this round (its denominator),
    its noise drawn from [seed, server_round, DP_NOISE_STREAM]; else the rule `aggregation`.
    """
    norms = [update_norm(arrays, global_arrays) for arrays, _ in updates]
    stats: dict = {"update_norm": float(np.median(norms))}
    if dp is not None:
        new, _ = privacy.dp_fedavg(global_arrays, [a for a, _ in updates], dp, num_sampled,
                                   dp_noise_rng(seed, server_round))
        stats["clipped"] = sum(n > dp.clipping_norm for n in norms)
        return new, stats
    if aggregation == "krum" and len(updates) < krum_minimum_clients(krum_malicious):
        log(WARNING, "round %d: Krum with %d updates cannot tolerate --krum-malicious %d "
            "(it needs %d); aggregating anyway", server_round, len(updates),
            krum_malicious, krum_minimum_clients(krum_malicious))
    return aggregate(aggregation, updates, trim_fraction=trim_fraction,
                     num_malicious=krum_malicious), stats


def dp_noise_rng(seed: int, server_round: int) -> np.random.Generator:
    """The generator of this round's DP noise (DP-FedAvg, and DP under SecAgg+)."""
    return np.random.default_rng([seed, server_round, DP_NOISE_STREAM])


def train_metrics(replies: Sequence[tuple[int, Mapping]]) -> dict:
    """The clients' training loss and accuracy, weighted by their (examples, metrics)."""
    return {"train_loss": weighted_mean([(m.get("train_loss", math.nan), n)
                                         for n, m in replies]),
            "train_accuracy": weighted_mean([(m.get("train_accuracy", math.nan), n)
                                             for n, m in replies])}


def evaluation_metrics(replies: Sequence[tuple[float, int, Mapping]]) -> dict:
    """The federated validation loss and accuracy, weighted by the clients' examples, from
    their accepted (loss, examples, metrics) in partition order."""
    return {"federated_loss": weighted_mean([(loss, n) for loss, n, _ in replies]),
            "federated_accuracy": weighted_mean([(float(m["accuracy"]), n)
                                                 for _, n, m in replies])}
