"""The gossip algorithm (federation/gossip.py) on exact numbers, and its one-process run
(federation/gossip_simulation.py) against FedAvg. No processes: tests/test_peer.py runs
the peers."""

import numpy as np
import pytest

from federation import gossip

N = 10


def random_models(n: int, seed: int = 0, shapes=((3, 4), (5,))) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(n)]


@pytest.mark.parametrize("name", gossip.TOPOLOGIES)
@pytest.mark.parametrize("n", [2, 4, 6, 10, 16])
def test_mixing_matrix_is_symmetric_and_doubly_stochastic(name, n):
    if name == "torus" and n == 2:
        pytest.skip("no torus of 2")
    topo = gossip.topology(name, n)
    w = gossip.metropolis_hastings(topo)
    assert np.array_equal(w, w.T)
    assert np.allclose(w.sum(axis=0), 1.0, atol=1e-15)
    assert np.allclose(w.sum(axis=1), 1.0, atol=1e-15)
    assert (w >= 0).all()
    for i in range(n):  # W_ij > 0 exactly on the edges (and the diagonal)
        assert [j for j in range(n) if j != i and w[i, j] > 0] == topo.neighbours(i)
        assert sorted(topo.senders(i)) == topo.neighbours(i)  # one shift per neighbour


def test_second_eigenvalues_of_ten_peers():
    expected = {"ring": 0.873, "torus": 0.655, "exponential": 0.429, "complete": 0.0}
    for name, value in expected.items():
        w = gossip.metropolis_hastings(gossip.topology(name, N))
        assert round(gossip.second_eigenvalue(w), 3) == value, name
    # The ring's closed form: (1 + 2 cos(2 pi / n)) / 3.
    ring = gossip.metropolis_hastings(gossip.topology("ring", N))
    assert gossip.second_eigenvalue(ring) == pytest.approx((1 + 2 * np.cos(2 * np.pi / N)) / 3,
                                                           abs=1e-12)


def test_degrees_of_ten_peers():
    degrees = {name: gossip.topology(name, N).degree(0) for name in gossip.TOPOLOGIES}
    # A 2 x 5 torus: up and down are the same neighbour. Exponential: +-1, +-2, +-4 (+8 = -2).
    assert degrees == {"ring": 2, "torus": 3, "exponential": 6, "complete": 9}
    assert gossip.topology("exponential", N).neighbours(0) == [1, 2, 4, 6, 8, 9]


@pytest.mark.parametrize("name,n,words", [("torus", 7, "7 is prime"), ("torus", 3, "too few"),
                                          ("ring", 1, "at least 2"), ("star", 4, "unknown")])
def test_topologies_that_cannot_be_built_are_refused_in_one_line(name, n, words):
    with pytest.raises(ValueError, match=words) as e:
        gossip.topology(name, n)
    assert "\n" not in str(e.value)


def test_gossip_step_is_w_times_x():
    models = random_models(N)
    w = gossip.metropolis_hastings(gossip.topology("ring", N))
    mixed = gossip.gossip_step(w, models)
    for k in range(2):
        x = np.stack([m[k].astype(np.float64) for m in models])       # (n, ...)
        expected = np.tensordot(w, x, axes=1).astype(np.float32)
        for i in range(N):
            assert mixed[i][k].dtype == np.float32
            np.testing.assert_allclose(mixed[i][k], expected[i], rtol=0, atol=1e-6)
    # Ring: peer 3 takes a third of 2, 3 and 4, summed in float64 in that order.
    third = 1 / 3
    by_hand = ((third * models[2][0].astype(np.float64) + third * models[3][0].astype(np.float64))
               + third * models[4][0].astype(np.float64)).astype(np.float32)
    assert mixed[3][0].tobytes() == by_hand.tobytes()


def test_a_peer_mixes_from_its_neighbours_alone():
    models = random_models(N)
    w = gossip.metropolis_hastings(gossip.topology("ring", N))
    full = gossip.gossip_step(w, models)
    local = gossip.mix_row(w, 0, {j: models[j] for j in (9, 0, 1)})
    assert all(a.tobytes() == b.tobytes() for a, b in zip(local, full[0]))
    with pytest.raises(ValueError, match=r"neighbour\(s\) \[9\]"):
        gossip.mix_row(w, 0, {j: models[j] for j in (0, 1)})


@pytest.mark.parametrize("name", gossip.TOPOLOGIES)
def test_without_training_the_mean_stays_and_the_spread_shrinks_by_lambda2(name):
    """Learning rate 0: gossip alone. ||X_t - mean|| <= |λ₂|^t ||X_0 - mean||."""
    models = random_models(N, seed=1)
    w = gossip.metropolis_hastings(gossip.topology(name, N))
    lam = gossip.second_eigenvalue(w)
    mean0, d0 = gossip.mean_model(models), gossip.consensus_distance(models)
    for t in range(1, 11):
        models = gossip.gossip_step(w, models)
        d = gossip.consensus_distance(models)
        assert d <= lam**t * d0 + 1e-6, (t, d, lam**t * d0)  # + float32 rounding
        for a, b in zip(gossip.mean_model(models), mean0):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_the_slowest_mode_shrinks_by_exactly_lambda2():
    """Peers placed along W's second eigenvector: the bound is met with equality."""
    w = gossip.metropolis_hastings(gossip.topology("ring", N))
    values, vectors = np.linalg.eigh(w)
    slow = vectors[:, np.argsort(np.abs(values))[-2]]
    models = [[np.full(4, v, np.float32)] for v in slow]
    d0 = gossip.consensus_distance(models)
    for _ in range(5):
        models = gossip.gossip_step(w, models)
    assert gossip.consensus_distance(models) == pytest.approx(
        gossip.second_eigenvalue(w) ** 5 * d0, rel=1e-5)


def test_complete_graph_is_one_exact_average():
    models = random_models(N, seed=2)
    w = gossip.metropolis_hastings(gossip.topology("complete", N))
    mixed = gossip.gossip_step(w, models)
    for i in range(N):  # every peer sums the same terms in the same order: the same bits
        assert all(a.tobytes() == b.tobytes() for a, b in zip(mixed[i], mixed[0]))
    for a, b in zip(mixed[0], gossip.mean_model(models)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert gossip.consensus_distance(mixed) == 0.0


def test_consensus_distance_by_hand():
    a = [np.array([0.0, 0.0], np.float32)]
    b = [np.array([3.0, 4.0], np.float32)]
    # mean (1.5, 2); each peer is 2.5 from it.
    assert gossip.consensus_distance([a, b]) == 2.5
    assert gossip.distance(a, b) == 5.0
    assert gossip.rms([3.0, 4.0]) == pytest.approx(np.sqrt(12.5))
