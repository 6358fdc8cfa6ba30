"""Aggregation rules: pure functions from the clients' models to the new global model.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data") sets the new global model to the average of the clients' models,
each weighted by the number of examples it trained on: w = sum_k (n_k / n) w_k.

One client can move an average anywhere it likes. The robust rules bound what a few
poisoning clients can do, at some cost in accuracy (they ignore the example counts, and
on non-IID data honest but unusual clients look like outliers):

- median: the coordinate-wise median of the models (Yin et al. 2018);
- trimmed-mean: per coordinate, drop the `trim_fraction` largest and smallest values
  and average the rest (Yin et al. 2018);
- krum: the one model closest to its n - f - 2 nearest neighbours, for at most f
  malicious clients out of n > 2f + 2 (Blanchard et al. 2017).

The robust rules are Flower's own (flwr.server.strategy.aggregate: pure NumPy, no
Flower objects), behind one signature here. No JAX here, and every rule is tested with
exact numbers. The caller passes updates in a fixed order (by partition), so the
results do not depend on the order in which clients answered.
"""

import math
from collections.abc import Sequence

import numpy as np
from flwr.server.strategy.aggregate import (aggregate_krum, aggregate_median,
                                            aggregate_trimmed_avg)

Arrays = list[np.ndarray]
Update = tuple[Arrays, int]  # (model arrays, number of training examples)


def fedavg(updates: Sequence[Update]) -> Arrays:
    """FedAvg's rule, sum_k n_k w_k / sum_k n_k, accumulated in float64, returned as float32.

    Summing in float64 in the caller's order makes the result independent of float32
    rounding order; the caller sorts updates (by partition) to make it reproducible.
    """
    total = sum(n for _, n in updates)
    if not updates or total <= 0:
        raise ValueError("fedavg needs at least one update with num_examples > 0")
    averaged = []
    for layer in zip(*(arrays for arrays, _ in updates)):
        acc = np.zeros(layer[0].shape, np.float64)
        for array, (_, n) in zip(layer, updates):
            acc += n * array.astype(np.float64)
        averaged.append((acc / total).astype(np.float32))
    return averaged


def weighted_mean(values: Sequence[tuple[float, int]]) -> float | None:
    """Mean of values weighted by example counts; None for no values.

    math.fsum is exactly rounded, so the result does not depend on the order of values.
    """
    total = sum(n for _, n in values)
    if total <= 0:
        return None
    return math.fsum(float(v) * n for v, n in values) / total


def global_norm(arrays: Arrays) -> float:
    """L2 norm of all arrays taken together, in float64."""
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


def update_norm(arrays: Arrays, global_arrays: Arrays) -> float:
    """L2 norm of a client's update (its model minus the global model), in float64."""
    return global_norm([np.asarray(a, np.float64) - g for a, g in zip(arrays, global_arrays,
                                                                       strict=True)])


RULES = ("fedavg", "median", "trimmed-mean", "krum")


def median(updates: Sequence[Update]) -> Arrays:
    """Coordinate-wise median of the models (the mean of the middle two for an even count)."""
    return [np.asarray(a, np.float32) for a in aggregate_median(list(updates))]


def trimmed_mean(updates: Sequence[Update], trim_fraction: float) -> Arrays:
    """Per coordinate, the mean after dropping int(trim_fraction * n) values at each end."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    return [np.asarray(a, np.float32)
            for a in aggregate_trimmed_avg(list(updates), trim_fraction)]


def krum_minimum_clients(num_malicious: int) -> int:
    """Krum's guarantee needs n > 2f + 2 models for f malicious clients."""
    return 2 * num_malicious + 3


def krum(updates: Sequence[Update], num_malicious: int) -> Arrays:
    """The model whose summed squared distance to its n - f - 2 nearest others is least.

    Ties go to the earlier update.
    """
    return [np.asarray(a, np.float32)
            for a in aggregate_krum(list(updates), num_malicious, to_keep=0)]


def aggregate(rule: str, updates: Sequence[Update], *, trim_fraction: float = 0.0,
              num_malicious: int = 0) -> Arrays:
    """The new global model from the clients' (models, example counts) by `rule`."""
    if not updates:
        raise ValueError("no update to aggregate")
    if rule == "fedavg":
        return fedavg(updates)
    if rule == "median":
        return median(updates)
    if rule == "trimmed-mean":
        return trimmed_mean(updates, trim_fraction)
    if rule == "krum":
        return krum(updates, num_malicious)
    raise ValueError(f"unknown aggregation rule {rule!r}; known: {', '.join(RULES)}")
