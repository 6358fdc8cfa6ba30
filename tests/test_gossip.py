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


@pytest.mark.parametrize("name,n", [(name, n) for name in gossip.TOPOLOGIES
                                    for n in (2, 4, 6, 10, 16) if (name, n) != ("torus", 2)])
def test_mixing_matrix_is_symmetric_and_doubly_stochastic(name, n):
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


# ------------------------------------------------------ the one-process gossip run

def tiny_partitions(n: int, size: int = 48, seed: int = 0):
    """n equal shards of random images and labels (the numbers, not the accuracy, count)."""
    from federation.shards import Partition  # noqa: PLC0415
    rng = np.random.default_rng(seed)
    return [Partition(rng.integers(0, 256, (size, 28, 28), np.uint8),
                      rng.integers(0, 10, size).astype(np.int32),
                      rng.integers(0, 256, (8, 28, 28), np.uint8),
                      rng.integers(0, 10, 8).astype(np.int32)) for _ in range(n)]


def tiny_test_set():
    rng = np.random.default_rng(99)
    return rng.integers(0, 256, (50, 28, 28), np.uint8), rng.integers(0, 10, 50).astype(np.int32)


def test_complete_graph_with_equal_shards_is_fedavg():
    """One round: FedAvg weighs clients by examples, the complete graph weighs peers
    1/n; with equal shards both are the plain mean of the same trained models."""
    from federation import gossip_simulation, simulation  # noqa: PLC0415
    from federation.peer_round import GossipSettings  # noqa: PLC0415
    from federation.server_setup import ServerSettings  # noqa: PLC0415
    parts, test_set = tiny_partitions(4), tiny_test_set()
    fedavg = simulation.run(ServerSettings(rounds=1, min_clients=4, local_epochs=1),
                            parts, test_set, federated_evaluation=False)
    peers = gossip_simulation.run(GossipSettings("complete", rounds=1, local_epochs=1),
                                  parts, test_set)
    for model in peers.models:
        for a, b in zip(model, fedavg.arrays):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    summary = peers.rounds[1].summary
    assert summary["consensus_distance"] == 0.0  # one exact average: all peers agree
    assert summary["consensus_distance_trained"] > 0  # their trained models did not
    assert summary["average_model_accuracy"] == summary["worst_test_accuracy"]
    # Each peer sent its model to the 3 others and received theirs.
    from federation.peer_round import model_bytes  # noqa: PLC0415
    assert peers.rounds[1].peers[0]["bytes_sent"] == 3 * model_bytes() == 3 * 4 * 206_922


def test_learning_rate_zero_is_gossip_alone():
    """Distinct starting models and no learning: the peers' mean stays, and the spread
    shrinks at least as fast as |λ₂|^t, through the whole training path."""
    from federation import gossip_simulation  # noqa: PLC0415
    from federation.peer_round import GossipSettings, initial_model  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import model  # noqa: PLC0415
    n = 4
    starts = [model.params_to_ndarrays(model.init_params(jax.random.key(k))) for k in range(n)]
    settings = GossipSettings("ring", rounds=3, local_epochs=1, learning_rate=0.0)
    run = gossip_simulation.run(settings, tiny_partitions(n, size=8), tiny_test_set(),
                                initial_models=starts)
    lam = gossip.second_eigenvalue(gossip.metropolis_hastings(gossip.topology("ring", n)))
    d0 = run.rounds[0].summary["consensus_distance"]
    assert d0 > 0 and initial_model(0)[0].tobytes() == starts[0][0].tobytes()
    for t, done in enumerate(run.rounds[1:], 1):
        assert done.summary["consensus_distance"] <= lam**t * d0 + 1e-5
        assert done.summary["consensus_distance_trained"] == pytest.approx(
            run.rounds[t - 1].summary["consensus_distance"])  # training moved nothing
    for a, b in zip(gossip.mean_model(run.models), gossip.mean_model(starts)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
