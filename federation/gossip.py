"""Decentralised averaging: topologies, Metropolis–Hastings mixing weights, one gossip step.

With no server, every peer trains on its own data and then averages with its neighbours
only: X <- W X, where row i of the mixing matrix W says how much of each neighbour's
model peer i takes (D-PSGD, Lian et al. 2017, "Can Decentralized Algorithms Outperform
Centralized Algorithms?", here with local epochs between two averagings). W is symmetric
and doubly stochastic, so the peers' mean never moves, and the spread around it shrinks
by at least |λ₂| (W's second largest eigenvalue in absolute value) per step: the
spectral gap 1 - |λ₂| says how fast a graph mixes (Boyd et al. 2006, "Randomized Gossip
Algorithms"). For 10 peers: ring 0.873, 2 x 5 torus 0.655, exponential graph 0.429,
complete graph 0 (one step is the exact average, i.e. FedAvg with equal weights).

Every topology is a set of *shifts*: permutations that send each peer's model to one of
its neighbours. One shift is one `lax.ppermute` in the multi-process run
(federation/gossip_transport.py), so a peer sends exactly its degree's worth of models.

This file is pure: NumPy only, no I/O, no processes. The one-process run
(federation/gossip_simulation.py) and every peer process (peer.py) call `mix_row`, the
same float64 sum in the same order, and so hold the same bits.
"""

import math
from fractions import Fraction
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Arrays = list[np.ndarray]  # one model: float32 arrays in model.param_spec() order

TOPOLOGIES = ("ring", "torus", "exponential", "complete")


@dataclass(frozen=True)
class Topology:
    """An undirected graph on peers 0..size-1, given by its shifts.

    shifts[k][i] is the peer that peer i sends to in shift k; every shift is a
    permutation, and the set of shifts is closed under inversion (the graph is
    undirected), so the peers i sends to are the peers it receives from.
    """

    name: str
    size: int
    shifts: tuple[tuple[int, ...], ...]

    def neighbours(self, peer: int) -> list[int]:
        """The peers this one exchanges models with, ascending."""
        return sorted({shift[peer] for shift in self.shifts})

    def degree(self, peer: int) -> int:
        """The number of neighbours (= models sent = models received per step)."""
        return len(self.neighbours(peer))

    def senders(self, peer: int) -> list[int]:
        """sender[k]: the peer whose model reaches this one in shift k."""
        return [shift.index(peer) for shift in self.shifts]


def torus_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of the squarest 2-D torus of n peers, both >= 2; ValueError if none."""
    rows = max((r for r in range(2, math.isqrt(n) + 1) if n % r == 0), default=None)
    if rows is None:
        raise ValueError(f"a 2-D torus needs peers = rows x columns with both >= 2, and {n} "
                         f"{'is prime' if n > 3 else 'is too few'}: use 4, 6, 8, 9, 10, ... "
                         "peers, or another topology")
    return rows, n // rows


def _circulant(n: int, offsets: Sequence[int]) -> list[tuple[int, ...]]:
    """Shift i -> i + d (mod n) for each offset d."""
    return [tuple((i + d) % n for i in range(n)) for d in offsets]


def topology(name: str, n: int) -> Topology:
    """The named topology on n peers; ValueError (one line) if it cannot be built.

    ring: i ~ i +- 1. torus: a rows x columns grid with wrap-around, i ~ its 4 grid
    neighbours (torus_shape). exponential: i ~ i +- 2^k for every 2^k < n (the undirected
    exponential graph of Ying et al. 2021). complete: everyone.
    """
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    if n < 2:
        raise ValueError(f"{name}: gossip needs at least 2 peers, got {n}")
    if name == "ring":
        shifts = _circulant(n, [1, -1])
    elif name == "exponential":
        shifts = _circulant(n, [s * 2**k for k in range(int(math.log2(n - 1)) + 1)
                                for s in (1, -1)])
    elif name == "complete":
        shifts = _circulant(n, range(1, n))
    else:
        rows, columns = torus_shape(n)
        cells = [(i // columns, i % columns) for i in range(n)]
        shifts = [tuple(((r + dr) % rows) * columns + (c + dc) % columns for r, c in cells)
                  for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    unique = list(dict.fromkeys(shifts))  # +1 and -1 are one shift on a ring of 2, etc.
    return Topology(name, n, tuple(unique))


def metropolis_hastings(topo: Topology) -> np.ndarray:
    """The mixing matrix W (n, n), float64: W_ij = 1 / (1 + max(deg i, deg j)) for
    neighbours, W_ii = 1 - the rest of row i. Symmetric and doubly stochastic for any
    undirected graph, with no global knowledge: a peer needs only its neighbours' degrees.
    """
    n = topo.size
    degrees = [topo.degree(i) for i in range(n)]
    w = np.zeros((n, n))
    for i in range(n):
        # Exact fractions, rounded once: on a regular graph W_ii is then the same float
        # as every W_ij (1 - 9 x 0.1 in floats is not 0.1), so on a complete graph all
        # peers sum the same terms and hold the same bits.
        row = {j: Fraction(1, 1 + max(degrees[i], degrees[j])) for j in topo.neighbours(i)}
        row[i] = 1 - sum(row.values())
        for j, value in row.items():
            w[i, j] = float(value)
    return w


def second_eigenvalue(w: np.ndarray) -> float:
    """|λ₂|: the second largest absolute eigenvalue of a symmetric mixing matrix."""
    magnitudes = np.sort(np.abs(np.linalg.eigvalsh(w)))[::-1]
    return float(magnitudes[1]) if len(magnitudes) > 1 else 0.0


def mix_row(w: np.ndarray, peer: int, models: Mapping[int, Arrays]) -> Arrays:
    """Peer `peer`'s model after one gossip step: sum_j W_ij x_j over itself and its
    neighbours, accumulated in float64 in ascending j, then cast to float32.

    models holds (at least) the models of every j with W_ij != 0. The fixed order and the
    float64 sum make the result one exact function of those float32 inputs: the same
    bits in one process and in N.
    """
    terms = [(j, float(w[peer, j])) for j in range(len(w)) if w[peer, j] != 0.0]
    missing = [j for j, _ in terms if j not in models]
    if missing:
        raise ValueError(f"peer {peer}: no model from neighbour(s) {missing}")
    mixed = []
    for layer in range(len(models[peer])):
        acc = np.zeros(np.shape(models[peer][layer]), np.float64)
        for j, weight in terms:
            acc += weight * np.asarray(models[j][layer], np.float64)
        mixed.append(acc.astype(np.float32))
    return mixed


def gossip_step(w: np.ndarray, models: Sequence[Arrays]) -> list[Arrays]:
    """X <- W X: every peer's model after one gossip step (mix_row for each peer)."""
    if len(models) != len(w):
        raise ValueError(f"{len(models)} models for a mixing matrix of {len(w)} peers")
    by_peer = dict(enumerate(models))
    return [mix_row(w, i, by_peer) for i in range(len(w))]


def flatten(arrays: Arrays) -> np.ndarray:
    """One model as a float64 vector (distances are taken in float64)."""
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def mean_model(models: Sequence[Arrays]) -> Arrays:
    """The peers' average model (float64 sum in peer order, cast to float32).

    Only for measuring, in one process: no peer process ever computes it.
    """
    return [(sum(np.asarray(m[k], np.float64) for m in models) / len(models)).astype(np.float32)
            for k in range(len(models[0]))]


def consensus_distance(models: Sequence[Arrays]) -> float:
    """sqrt(mean_i ||x_i - x̄||²): how far the peers are from their mean (0: consensus)."""
    x = np.stack([flatten(m) for m in models])
    return float(np.sqrt(np.mean(np.sum((x - x.mean(axis=0)) ** 2, axis=1))))


def distance(a: Arrays, b: Arrays) -> float:
    """||a - b||, in float64."""
    return float(np.linalg.norm(flatten(a) - flatten(b)))


def rms(values: Sequence[float]) -> float:
    """sqrt(mean of squares), summed in the given order."""
    return math.sqrt(math.fsum(v * v for v in values) / len(values))
