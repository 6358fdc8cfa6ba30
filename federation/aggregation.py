"""FedAvg's aggregation rule and its helpers: pure functions on lists of NumPy arrays.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data") sets the new global model to the average of the clients' models,
each weighted by the number of examples it trained on: w = sum_k (n_k / n) w_k.
No Flower and no JAX here, so every rule is tested with exact numbers.
"""

import math
from collections.abc import Sequence

import numpy as np

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
