"""Protection, README Part 5: robust aggregation rules, DP-FedAvg and its accountant, attacks.

The rules and DP are checked against numbers worked out by hand or from first
principles; the end-to-end tests run real server and client processes.
"""

import json
import math
import pathlib
import time

import numpy as np
import pytest
from scipy.stats import norm

from federation import attacks, privacy
from federation.aggregation import aggregate, krum, median, trimmed_mean
from federation.server_setup import ServerSettings
from helpers import CLIENTS, client_args, free_port, records, server_args


def updates(*rows, counts=None):
    """One-array models from rows of numbers (float32), with example counts."""
    counts = counts or [1] * len(rows)
    return [([np.array(row, np.float32)], n) for row, n in zip(rows, counts)]


# ------------------------------------------------------------------ robust rules

def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    got = median(updates([1, 2], [3, 10], [2, -4], [100, 0], counts=[1, 5, 1, 1]))
    np.testing.assert_array_equal(got[0], np.array([2.5, 1.0], np.float32))  # counts ignored
    np.testing.assert_array_equal(median(updates([1], [7], [3]))[0], [3.0])


def test_trimmed_mean_drops_the_ends_per_coordinate():
    rows = updates([1, 50], [2, -6], [3, 0], [4, 2], [100, 4])
    # int(0.2 * 5) = 1 value cut at each end, per coordinate: mean of the middle three.
    np.testing.assert_array_equal(trimmed_mean(rows, 0.2)[0], np.array([3.0, 2.0], np.float32))
    # 0.19 * 5 < 1 cuts nothing: the plain (unweighted) mean.
    np.testing.assert_allclose(trimmed_mean(rows, 0.19)[0], [22.0, 10.0], rtol=0, atol=1e-6)
    # At the edge 0.49 of 4 values, one is cut at each end: the middle two are left.
    np.testing.assert_array_equal(trimmed_mean(updates([0], [1], [2], [9]), 0.49)[0], [1.5])
    with pytest.raises(ValueError):
        trimmed_mean(rows, 0.5)  # nothing would be left


def test_krum_picks_the_model_closest_to_its_neighbours():
    # Squared distances from a = [1, 2]: b 68, c 37, d 9,805; f = 1 -> score = the
    # n - f - 2 = 1 nearest: a 37, b 68, c 37, d 9,509. a and c tie; the first one wins.
    got = krum(updates([1, 2], [3, 10], [2, -4], [100, 0]), num_malicious=1)
    np.testing.assert_array_equal(got[0], [1.0, 2.0])
    # f = 2 of 5: each scored by its 1 nearest; the four corners tie at 1, the outlier loses.
    rows = updates([0, 0], [1, 0], [0, 1], [1, 1], [50, 50])
    np.testing.assert_array_equal(krum(rows, num_malicious=2)[0], [0.0, 0.0])
    # f = 0 of 5: each scored by its 3 nearest (squared distances along the diagonal):
    # a 0.5 + 2 + 3,200; b 0.5 + 0.5 + 3,120.5; c 2 + 0.5 + 3,042 = 3,044.5 (least);
    # d 2 + 3,042 + 3,120.5; e more. Krum takes c, not the middle of the honest three.
    far = updates([0, 0], [0.5, 0.5], [1, 1], [40, 40], [41, 41])
    np.testing.assert_array_equal(krum(far, num_malicious=0)[0], [1.0, 1.0])


def test_aggregate_dispatches_and_refuses_unknown_rules():
    rows = updates([1.0], [3.0], counts=[1, 3])
    np.testing.assert_array_equal(aggregate("fedavg", rows)[0], [2.5])  # weighted
    np.testing.assert_array_equal(aggregate("median", rows)[0], [2.0])  # not weighted
    with pytest.raises(ValueError, match="unknown aggregation rule 'mean'"):
        aggregate("mean", rows)


def test_a_sign_flip_attacker_moves_fedavg_but_not_the_median():
    honest = [[np.array([1.0, 1.0], np.float32)] for _ in range(4)]
    g = [np.zeros(2, np.float32)]
    evil = attacks.sign_flip(g, [np.array([1.0, 1.0], np.float32)], boost=10)
    np.testing.assert_array_equal(evil[0], [-10.0, -10.0])
    rows = [(a, 1) for a in honest + [evil]]
    np.testing.assert_allclose(aggregate("fedavg", rows)[0], [-1.2, -1.2], rtol=1e-6)
    np.testing.assert_array_equal(aggregate("median", rows)[0], [1.0, 1.0])
    np.testing.assert_array_equal(attacks.flip_labels(np.arange(10, dtype=np.uint8)),
                                  np.arange(9, -1, -1))


# --------------------------------------------------------------------- DP-FedAvg

def test_clipping_bounds_every_update_and_keeps_small_ones():
    rng = np.random.default_rng(0)
    for scale in (0.01, 1.0, 100.0):
        update = [rng.normal(0, scale, (30, 7)), rng.normal(0, scale, (5,))]
        clipped, before = privacy.clip(update, 2.0)
        after = math.sqrt(sum(float(np.sum(c ** 2)) for c in clipped))
        assert after <= 2.0 * (1 + 1e-12)
        if before <= 2.0:  # inside the ball: untouched
            assert all(np.array_equal(c, u) for c, u in zip(clipped, update))
        else:  # scaled, direction kept
            assert after == pytest.approx(2.0, rel=1e-12)
            np.testing.assert_allclose(clipped[0] * before / 2.0, update[0], rtol=1e-12)


def test_dp_fedavg_is_the_mean_of_clipped_updates_over_the_sampled_clients():
    g = [np.array([1.0, 1.0], np.float32)]
    clients = [[np.array([4.0, 5.0], np.float32)],    # update (3, 4), norm 5 -> (0.6, 0.8)
               [np.array([1.5, 1.0], np.float32)]]    # update (0.5, 0), inside the ball
    config = privacy.DPConfig(noise_multiplier=0.0, clipping_norm=1.0)
    new, norms = privacy.dp_fedavg(g, clients, config, num_sampled=4,
                                   rng=np.random.default_rng(0))
    assert norms == [5.0, 0.5]
    # Divided by the 4 clients sampled, not the 2 that answered: (1.1, 0.8) / 4.
    np.testing.assert_array_equal(new[0], np.array([1.275, 1.2], np.float32))


def test_dp_noise_has_the_stated_standard_deviation():
    """σ·C on the sum, so σ·C/m on the average; 400,000 draws, a fixed seed."""
    g = [np.zeros((400, 500), np.float32), np.zeros(3, np.float32)]
    config = privacy.DPConfig(noise_multiplier=1.5, clipping_norm=2.0)
    new, _ = privacy.dp_fedavg(g, [g, g, g], config, num_sampled=3,
                               rng=np.random.default_rng([0, 1, 2]))
    noise = new[0].astype(np.float64).ravel()
    assert config.noise_std(3) == 1.0
    # The sample std of 200,000 normals is within 3 standard errors (0.16%) of the truth.
    assert abs(noise.std() - 1.0) < 3 * 1.0 / math.sqrt(2 * noise.size)
    assert abs(noise.mean()) < 3 / math.sqrt(noise.size)
    again, _ = privacy.dp_fedavg(g, [g, g, g], config, 3, np.random.default_rng([0, 1, 2]))
    other, _ = privacy.dp_fedavg(g, [g, g, g], config, 3, np.random.default_rng([0, 2, 2]))
    assert np.array_equal(again[0], new[0]) and not np.array_equal(other[0], new[0])


def test_dp_under_secagg_is_dp_fedavg_from_the_unmasked_average():
    """SecAgg+ hands the server only the average of the clients' clipped models, each of
    weight 1 (client_app.py): 2 of 3 sampled here. K x (average - w) is the sum of the
    clipped updates; the noise and the division by m = 3 are DP-FedAvg's, to the bit."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters  # noqa: PLC0415

    from federation import rounds, secure_aggregation  # noqa: PLC0415
    g = [np.array([[0.5, -1.0]], np.float32), np.array([2.0], np.float32)]
    clients = [[np.array([[3.5, 3.0]], np.float32), np.array([2.0], np.float32)],  # norm 5
               [np.array([[0.5, -0.5]], np.float32), np.array([2.0], np.float32)]]  # 0.5
    config = privacy.DPConfig(noise_multiplier=0.5, clipping_norm=1.0)
    clipped = [[w + d for w, d in zip(g, privacy.clip([c - w for c, w in zip(arrays, g)],
                                                       1.0)[0])] for arrays in clients]
    average = [(a + b) / 2 for a, b in zip(*clipped)]  # what SecAgg+ unmasks (float64)
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(average), 1, {})
    got, stats = secure_aggregation.checked_average(
        4, [(None, res), (None, res)], [Exception("dropped")], 3, g, 8.0, 100.0, ["a", "b"],
        config, seed=7)
    want, _ = privacy.dp_fedavg(g, clients, config, 3, rounds.dp_noise_rng(7, 4))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert (stats["clients_fit"], stats["failures"], stats["clipped"]) == (2, 1, None)
    noiseless, _ = privacy.dp_fedavg(g, clients, privacy.DPConfig(0.0, 1.0), 3,
                                     rounds.dp_noise_rng(7, 4))
    assert np.abs(got[0] - noiseless[0]).min() > 1e-3  # the noise is there


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact ε of a Gaussian mechanism with sensitivity/σ = mu at δ (Balle & Wang 2018,
    Theorem 8), by bisection: δ(ε) = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2)."""
    lo, hi = 0.0, 500.0
    for _ in range(200):
        eps = (lo + hi) / 2
        d = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
        lo, hi = (eps, hi) if d > delta else (lo, eps)
    return hi


def test_epsilon_grows_with_rounds_and_matches_theory_for_full_participation():
    eps = [privacy.epsilon(1.0, 1.0, r, 1e-5) for r in range(6)]
    assert eps[0] == 0 and all(a < b for a, b in zip(eps, eps[1:]))
    # q = 1: the PLD accountant gives the exact ε of the Gaussian mechanism (its grid errs
    # upwards, by less than 1%); the RDP bound lies above it, and tightly, unlike the
    # textbook RDP conversion min_a T a / (2 σ²) + log(1/δ) / (a - 1).
    exact = gaussian_epsilon(math.sqrt(5) / 1.0, 1e-5)
    rdp = privacy.epsilon(1.0, 1.0, 5, 1e-5, "rdp")
    textbook = min(5 * a / 2 + math.log(1e5) / (a - 1) for a in range(2, 257))
    assert exact <= eps[5] < 1.01 * exact
    assert eps[5] < rdp < min(textbook, 1.15 * exact)
    # Sampling a fraction of the clients each round spends far less.
    assert privacy.epsilon(1.0, 0.01, 5, 1e-5) < 0.2 * eps[5]
    assert privacy.epsilon(0.0, 1.0, 5, 1e-5) == math.inf
    assert privacy.spent(privacy.DPConfig(1.0, 1.0), 1.0, 5) == {"epsilon": eps[5],
                                                                 "epsilon_rdp": rdp}


@pytest.mark.parametrize("sigma, rounds", [(1.0, 1), (1.0, 5), (2.0, 4), (0.5, 3)])
def test_t_rounds_at_sigma_are_one_round_at_sigma_over_sqrt_t(sigma, rounds):
    """q = 1: T Gaussian mechanisms of σ compose to one of σ / sqrt(T), exactly."""
    one = sigma / math.sqrt(rounds)
    exact = gaussian_epsilon(1 / one, 1e-5)
    for accountant, tolerance in (("pld", 0.01), ("rdp", 1e-9)):
        many = privacy.epsilon(sigma, 1.0, rounds, 1e-5, accountant)
        assert many == pytest.approx(privacy.epsilon(one, 1.0, 1, 1e-5, accountant),
                                     rel=tolerance)
    assert exact <= privacy.epsilon(sigma, 1.0, rounds, 1e-5) < 1.01 * exact


@pytest.mark.parametrize("sigma, q, rounds", [
    (1.0, 0.1, 30), (1.0, 0.01, 30), (0.5, 0.1, 30), (2.0, 0.1, 30), (0.1, 1.0, 5),
    (0.01, 1.0, 5), (1.0, 0.1, 300), (5.0, 0.5, 10)])
def test_pld_epsilon_is_at_most_the_rdp_bound_and_fast(sigma, q, rounds):
    privacy.epsilon.cache_clear()  # time the computation, not the cache
    start = time.perf_counter()
    tight = privacy.epsilon(sigma, q, rounds, 1e-5)
    seconds = time.perf_counter() - start
    assert 0 < tight <= privacy.epsilon(sigma, q, rounds, 1e-5, "rdp")
    assert seconds < 5.0  # every round of a run computes it (0.01-0.3 s measured, unloaded)


def test_an_unknown_accountant_is_one_line():
    with pytest.raises(ValueError, match=r"^unknown accountant 'moments'; known: pld, rdp$"):
        privacy.epsilon(1.0, 1.0, 5, 1e-5, "moments")


@pytest.mark.parametrize("changes, message", [
    ({"dp_noise_multiplier": -0.5}, "dp-noise-multiplier must be >= 0, got -0.5"),
    ({"dp_noise_multiplier": 1.0, "dp_clipping_norm": 0.0}, "dp-clipping-norm must be > 0"),
    ({"dp_noise_multiplier": 1.0, "dp_delta": 1.0}, "dp-delta must be in (0, 1), got 1.0"),
    ({"aggregation": "trimmed-mean", "trim_fraction": 0.5},
     "trim-fraction must be in [0, 0.5) so that some updates are left, got 0.5"),
    ({"aggregation": "krum", "krum_malicious": 4},
     "krum-malicious 4 needs at least 11 clients per round for krum (n > 2f + 2), but "
     "min-clients x fraction-fit gives 10"),
    ({"aggregation": "median", "dp_noise_multiplier": 1.0},
     "dp-noise-multiplier works with aggregation fedavg only"),
    ({"aggregation": "mean"}, "aggregation 'mean' is not one of fedavg, median, "),
    # DP under SecAgg+: a client sends w + Δ (each |Δ_i| <= C) in +-clipping-range, and
    # the server keeps |w_i| under half of it: C must fit in the other half.
    ({"secagg": True, "dp_noise_multiplier": 1.0, "dp_clipping_norm": 4.5},
     "dp-clipping-norm 4.5 is more than half of clipping-range 8: under SecAgg+ a client "
     "sends its weights plus its clipped update, and the range must carry both; raise "
     "clipping-range to at least 9"),
    ({"secagg": True, "aggregation": "krum"},
     "secagg cannot be combined with aggregation krum: it needs each client's own update"),
])
def test_bad_protection_settings_are_one_line(changes, message):
    problem = ServerSettings(**changes).problem()
    assert problem.startswith(message) and "\n" not in problem


def test_dp_under_secagg_is_allowed_while_the_range_carries_the_clipping_norm():
    for norm in (1.0, 4.0):  # 4.0: exactly half of the default range 8
        assert ServerSettings(secagg=True, dp_noise_multiplier=1.0,
                              dp_clipping_norm=norm).problem() is None
    assert ServerSettings(secagg=True, dp_noise_multiplier=1.0, dp_clipping_norm=4.5,
                          clipping_range=9.0).problem() is None


def test_server_refuses_bad_protection_flags_before_starting(tmp_path, procs, data_dir):
    procs.start("server", "server.py", "--dp-noise-multiplier", "1", "--dp-delta", "0",
                "--data-dir", data_dir, "--results-dir", tmp_path / "r")
    assert procs.wait("server", 60) == 2
    assert procs.err("server").strip().splitlines()[-1] == (
        "server.py: error: --dp-delta must be in (0, 1), got 0.0")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------- end to end, gRPC

@pytest.mark.slow
def test_dp_fedavg_over_grpc_matches_the_simulation_and_reports_epsilon(procs, tmp_path,
                                                                        data_dir,
                                                                        matches_simulation):
    """DP-FedAvg over gRPC gives federation/simulation.py's bits: the clipped sum, the noise
    from the documented stream default_rng([seed, round, 2]), ε (dp_fedavg and the
    accountant are checked by hand above)."""
    port, results = free_port(), tmp_path / "results"
    dp = ["--dp-noise-multiplier", "0.3", "--dp-clipping-norm", "0.5", "--dp-delta", "1e-4"]
    flags = [*server_args(port, data_dir, results, 2), *dp]
    procs.start("server", "server.py", *flags)
    for i in range(CLIENTS):
        procs.start(f"client_{i}", "client.py", *client_args(port, data_dir, i))
    codes = {name: procs.wait(name, 150) for name in list(procs.procs)}
    assert set(codes.values()) == {0}, procs.log("server")
    recs = records(results)
    for r in recs[1:]:
        assert r["epsilon"] == privacy.epsilon(0.3, 1.0, r["round"], 1e-4)
        assert r["epsilon_rdp"] == privacy.epsilon(0.3, 1.0, r["round"], 1e-4, "rdp")
        assert r["clipped"] == CLIENTS and r["update_norm"] > 0.5
    assert recs[0]["epsilon"] == 0.0 and recs[1]["epsilon"] < recs[2]["epsilon"]
    assert f"ε {recs[2]['epsilon']:.2f}" in procs.out("server").splitlines()[2]
    assert "DP-FedAvg: updates clipped to norm 0.5, noise multiplier 0.3" in procs.err("server")
    saved = json.loads((results / "run_config.json").read_text())
    assert saved["dp"] == {"noise_multiplier": 0.3, "clipping_norm": 0.5, "delta": 1e-4}
    matches_simulation(results, flags, CLIENTS)


def attack_run(procs, tmp_path, data_dir, rule: str) -> tuple[float, pathlib.Path, list]:
    """Five clients, the last of them a sign-flip attacker, 2 rounds: (final accuracy, the
    results directory, the server's flags)."""
    port, results = free_port(), tmp_path / rule
    flags = [*server_args(port, data_dir, results, 2, 5), "--aggregation", rule]
    procs.start(f"server_{rule}", "server.py", *flags)
    for i in range(5):
        attack = ["--attack", "sign-flip"] if i == 4 else []
        procs.start(f"client_{rule}_{i}", "client.py", *client_args(port, data_dir, i, *attack))
    codes = {name: procs.wait(name, 180) for name in list(procs.procs) if rule in name}
    assert set(codes.values()) == {0}, procs.log(f"server_{rule}")
    assert "ATTACKING the federation with sign-flip (boost 10)" in procs.err(f"client_{rule}_4")
    return records(results)[-1]["centralized_accuracy"], results, flags


@pytest.mark.slow
def test_one_sign_flip_attacker_of_five_breaks_fedavg_but_not_the_median(
        procs, tmp_path, data_dir, matches_simulation):
    """... and the median's run with its attacker gives federation/simulation.py's bits."""
    fedavg, _, _ = attack_run(procs, tmp_path, data_dir, "fedavg")
    robust, results, flags = attack_run(procs, tmp_path, data_dir, "median")
    matches_simulation(results, flags, 5, attackers={4: "sign-flip"})
    # Measured on the test data (5 partitions of the 5k digits, 2 rounds): median about
    # 0.8, FedAvg near chance.
    assert robust > 0.7, robust
    assert robust - fedavg > 0.4, (fedavg, robust)
