"""Poisoning attacks, for measuring the robust aggregation rules: pure NumPy.

A federated server cannot see the clients' data or check their training, so a client
can send anything that passes validation. Two classic attacks (README Part 5):

- sign-flip (a model-poisoning attack): train honestly, then send the update reversed and
  boosted, global - boost * (local - global), to drag the average the wrong way;
- label-flip (a data-poisoning attack): train on labels 9 - y, so the model learns a
  consistently wrong mapping. Its update looks like an honest one.

client.py --attack turns one on; tests and benchmarks use the same functions.
"""

import numpy as np

ATTACKS = ("sign-flip", "label-flip")
NUM_CLASSES = 10


def sign_flip(global_arrays: list[np.ndarray], local_arrays: list[np.ndarray],
              boost: float) -> list[np.ndarray]:
    """global - boost * (local - global), computed in float64, returned in the local dtype."""
    return [(np.asarray(g, np.float64) - boost * (np.asarray(w, np.float64) - g)).astype(w.dtype)
            for g, w in zip(global_arrays, local_arrays, strict=True)]


def flip_labels(labels: np.ndarray) -> np.ndarray:
    """Label y becomes 9 - y (0 <-> 9, 1 <-> 8, ...): every example is mislabelled."""
    return (NUM_CLASSES - 1 - labels).astype(labels.dtype)
