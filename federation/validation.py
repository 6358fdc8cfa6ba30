"""Checks on what a client sends back, before it may touch the global model.

An update with the wrong arrays, NaN/Inf, an absurd norm or an impossible example count
is rejected with a one-line reason (and the strategy counts it as a failure). Pure
functions, no Flower and no JAX.
"""

import math
from collections.abc import Mapping, Sequence

import numpy as np

from federation.aggregation import Arrays, global_norm, update_norm

# An update further than this many times the global model's norm from the global model is
# not training, it is a bug or an attack. Honest local training moves the model by a
# fraction of its norm per round, so the threshold is generous.
MAX_UPDATE_RATIO = 100.0


def _partition_index(metrics: Mapping[str, object], num_partitions: int) -> int | str:
    """The partition index a client reported, or the reason it is unusable."""
    p = metrics.get("partition")
    if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < num_partitions:
        return f"partition {p!r} is not one of 0..{num_partitions - 1}"
    return p


def validate_update(arrays: Arrays, num_examples: int, metrics: Mapping[str, object],
                    global_arrays: Arrays, shard_sizes: Sequence[int],
                    max_update_ratio: float = MAX_UPDATE_RATIO,
                    names: Sequence[str] | None = None) -> str | None:
    """Why a client's fit result must not be averaged in, or None if it is acceptable.

    Args:
      arrays, num_examples, metrics: what the client sent back from fit.
      global_arrays: the global model the client was asked to train (the reference for
        shapes, dtypes and the update norm).
      shard_sizes: training examples per partition, from the data manifest; a client may
        not claim more examples than its partition holds.
      max_update_ratio: reject ||update - global|| > ratio * max(||global||, 1).
      names: array names for messages (default: the array's index).
    Returns:
      A one-line reason, or None.
    """
    if "error" in metrics:
        return f"client error: {metrics['error']}"
    partition = _partition_index(metrics, len(shard_sizes))
    if isinstance(partition, str):
        return partition
    if not isinstance(num_examples, int) or num_examples <= 0:
        return f"num_examples {num_examples} is not positive"
    if num_examples > shard_sizes[partition]:
        return (f"num_examples {num_examples} exceeds the {shard_sizes[partition]} training "
                f"examples of partition {partition}")
    return validate_arrays(arrays, global_arrays, max_update_ratio, names)


def validate_arrays(arrays: Arrays, global_arrays: Arrays,
                    max_update_ratio: float = MAX_UPDATE_RATIO,
                    names: Sequence[str] | None = None) -> str | None:
    """Why arrays cannot stand for a model next to the global one, or None.

    The part of validate_update that looks at the arrays alone: the same number, shapes
    and dtypes as the global model, finite, and at most max_update_ratio * max(||global||,
    1) away from it. Under SecAgg+ it is all that can be checked, on the aggregate.
    """
    if len(arrays) != len(global_arrays):
        return f"{len(arrays)} arrays, expected {len(global_arrays)}"
    names = names or [f"array {i}" for i in range(len(arrays))]
    for name, a, g in zip(names, arrays, global_arrays):
        if a.shape != g.shape or a.dtype != g.dtype:
            return f"{name} is {a.dtype} {a.shape}, expected {g.dtype} {g.shape}"
    for name, a in zip(names, arrays):
        if not np.isfinite(a).all():
            return f"{name} contains NaN or Inf"
    delta = update_norm(arrays, global_arrays)
    reference = max(global_norm(global_arrays), 1.0)
    if delta > max_update_ratio * reference:
        return (f"update norm {delta:.3g} is more than {max_update_ratio:g}x the global "
                f"model's norm {reference:.3g}")
    return None


def validate_evaluation(loss: float, num_examples: int, metrics: Mapping[str, object],
                        val_sizes: Sequence[int]) -> str | None:
    """Why a client's evaluate result must not be averaged in, or None."""
    if "error" in metrics:
        return f"client error: {metrics['error']}"
    partition = _partition_index(metrics, len(val_sizes))
    if isinstance(partition, str):
        return partition
    if not isinstance(num_examples, int) or not 0 < num_examples <= val_sizes[partition]:
        return (f"num_examples {num_examples} is not in 1..{val_sizes[partition]} "
                f"(partition {partition}'s validation split)")
    accuracy = metrics.get("accuracy")
    if not isinstance(accuracy, float | int) or not 0.0 <= accuracy <= 1.0:
        return f"accuracy {accuracy!r} is not in [0, 1]"
    if not math.isfinite(loss):
        return f"loss {loss} is not finite"
    return None
