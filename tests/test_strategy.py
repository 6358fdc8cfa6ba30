"""Unit tests for federation/: FedAvg arithmetic, update validation, results files, resume
rules, the client manager's timeout and one round through the strategy, driven by hand
the way Flower's Server drives it. NumPy and Flower objects only: no processes, no JAX."""

import json
import logging
import math
import threading
import time

import numpy as np
import pytest
from flwr.common import (Code, EvaluateRes, FitIns, FitRes, GetPropertiesRes, Status,
                         ndarray_to_bytes, ndarrays_to_parameters, parameters_to_ndarrays)
from flwr.server.client_proxy import ClientProxy

from federation import (aggregation, client_manager, flower_internals, results, run_record,
                        secure_aggregation, strategy, validation)

GLOBAL = [np.zeros((2, 3), np.float32), np.zeros(3, np.float32)]
NAMES = ["dense/w", "dense/b"]
SHARDS = [100, 50]  # training examples of partitions 0 and 1


def _update(value: float) -> list[np.ndarray]:
    return [np.full((2, 3), value, np.float32), np.full(3, value, np.float32)]


def _why(arrays=None, num_examples=10, **metrics) -> str | None:
    metrics = {"partition": 1, **metrics}
    return validation.validate_update(_update(0.5) if arrays is None else arrays, num_examples,
                                    metrics, GLOBAL, SHARDS, names=NAMES)


# ---------------------------------------------------------------------------- FedAvg

def test_fedavg_is_the_example_weighted_mean():
    # Two toy clients: 1 example with weights 1, 3 examples with weights 3 -> (1*1 + 3*3)/4.
    out = aggregation.fedavg([(_update(1.0), 1), (_update(3.0), 3)])
    assert [a.dtype for a in out] == [np.float32, np.float32]
    np.testing.assert_array_equal(out[0], np.full((2, 3), 2.5, np.float32))
    np.testing.assert_array_equal(out[1], np.full(3, 2.5, np.float32))


def test_fedavg_hand_computed_per_element():
    a = [np.array([0.0, 10.0, -4.0], np.float32)]
    b = [np.array([6.0, 20.0, 4.0], np.float32)]
    c = [np.array([3.0, 0.0, 1.0], np.float32)]
    out = aggregation.fedavg([(a, 1), (b, 2), (c, 3)])
    # (1*a + 2*b + 3*c) / 6
    np.testing.assert_array_equal(out[0], np.array([21 / 6, 50 / 6, 7 / 6], np.float32))


def test_fedavg_one_client_returns_its_weights_exactly():
    w = [np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)]
    np.testing.assert_array_equal(aggregation.fedavg([(w, 7)])[0], w[0])


def test_fedavg_rejects_no_examples():
    with pytest.raises(ValueError):
        aggregation.fedavg([])
    with pytest.raises(ValueError):
        aggregation.fedavg([(_update(1.0), 0)])


def test_weighted_mean_is_exact_and_order_free():
    values = [(0.1, 3), (0.7, 1), (1e-9, 5)]
    assert aggregation.weighted_mean(values) == aggregation.weighted_mean(values[::-1])
    assert aggregation.weighted_mean([(1.0, 1), (4.0, 3)]) == 3.25
    assert aggregation.weighted_mean([]) is None


# ------------------------------------------------------------------------ validation

def test_a_good_update_passes():
    assert _why() is None
    assert _why(num_examples=50) is None  # exactly the partition's size is fine


@pytest.mark.parametrize("arrays, num_examples, metrics, reason", [
    (None, 10, {"error": "ValueError: boom"}, "client error: ValueError: boom"),
    (None, 10, {"partition": 2}, "partition 2 is not one of 0..1"),
    (None, 10, {"partition": "1"}, "partition '1' is not one of 0..1"),
    (None, 0, {}, "num_examples 0 is not positive"),
    (None, -5, {}, "num_examples -5 is not positive"),
    (None, 51, {}, "num_examples 51 exceeds the 50 training examples of partition 1"),
    (_update(0.5)[:1], 10, {}, "1 arrays, expected 2"),
    ([np.zeros((3, 2), np.float32), np.zeros(3, np.float32)], 10, {},
     "dense/w is float32 (3, 2), expected float32 (2, 3)"),
    ([np.zeros((2, 3), np.float64), np.zeros(3, np.float32)], 10, {},
     "dense/w is float64 (2, 3), expected float32 (2, 3)"),
    ([np.zeros((2, 3), np.float32), np.array([0, np.nan, 0], np.float32)], 10, {},
     "dense/b contains NaN or Inf"),
    ([np.full((2, 3), np.inf, np.float32), np.zeros(3, np.float32)], 10, {},
     "dense/w contains NaN or Inf"),
])
def test_bad_updates_are_rejected_with_a_reason(arrays, num_examples, metrics, reason):
    assert _why(arrays, num_examples, **metrics) == reason


def test_update_norm_threshold_is_relative_to_the_global_model():
    # ||global|| = 0 -> the reference norm is 1, so a move of norm 3 is fine at ratio 100...
    assert _why(_update(3 / math.sqrt(9))) is None
    # ...and a move of norm 300.3 is not.
    assert _why(_update(100.1)) == (
        "update norm 300 is more than 100x the global model's norm 1")
    # Relative to a big global model, the same move is fine.
    big = [np.full((2, 3), 100.0, np.float32), np.full(3, 100.0, np.float32)]
    assert validation.validate_update(_update(200.0), 10, {"partition": 0}, big, SHARDS) is None


def test_evaluation_validation():
    ok = {"partition": 0, "accuracy": 0.5}
    vals = [20, 10]
    assert validation.validate_evaluation(0.3, 20, ok, vals) is None
    assert validation.validate_evaluation(0.3, 21, ok, vals).startswith("num_examples 21")
    assert validation.validate_evaluation(0.3, 0, ok, vals).startswith("num_examples 0")
    assert validation.validate_evaluation(math.nan, 5, ok, vals) == "loss nan is not finite"
    assert validation.validate_evaluation(0.3, 5, {"partition": 0, "accuracy": 1.5},
                                        vals) == "accuracy 1.5 is not in [0, 1]"
    assert validation.validate_evaluation(0.3, 5, {"error": "x"}, vals) == "client error: x"


# ---------------------------------------------------------------- results and resume

def test_results_dir_round_trip(tmp_path):
    rdir = results.ResultsDir(tmp_path / "results", NAMES)
    rdir.write_config({"seed": 0})
    records = [{"round": 0, "centralized_loss": 2.3, "centralized_accuracy": 0.1},
               {"round": 1, "centralized_loss": math.nan, "centralized_accuracy": 0.5,
                "federated_accuracy": 0.25, "clients_fit": 2, "failures": 1}]
    rdir.save_round(records[:1], _update(1.0))
    rdir.save_round(records, _update(2.0))
    config, saved, arrays = rdir.load_checkpoint()
    assert config == {"seed": 0}
    assert [r["round"] for r in saved] == [0, 1]
    assert saved[1]["centralized_loss"] is None  # NaN is not JSON: recorded as null
    assert list(saved[1]) == list(results.METRIC_FIELDS)
    np.testing.assert_array_equal(arrays[0], _update(2.0)[0])
    np.testing.assert_array_equal(rdir.load_arrays(rdir.model_path(0))[1], _update(1.0)[1])
    np.testing.assert_array_equal(rdir.load_arrays(tmp_path / "results" / "global_model.npz")[0],
                                  _update(2.0)[0])
    csv_lines = (tmp_path / "results" / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(results.METRIC_FIELDS)
    assert csv_lines[2].startswith("1,,0.5,,0.25,")
    # No temp files are left behind.
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "global_model.npz", "metrics.csv", "metrics.json", "model_round_0.npz",
        "model_round_1.npz", "run_config.json"]


def test_a_write_that_fails_midway_leaves_the_old_file_whole(tmp_path):
    """A real fault in the middle of a write (here: the writer raises after half the
    bytes, as a full disk would): the file still holds the old bytes, no temp is left."""
    path = tmp_path / "metrics.json"
    results.write_atomic(path, lambda f: f.write(b'[{"round": 0}]\n'))

    def half_then_fail(f):
        f.write(b'[{"round": 0}, {"rou')
        f.flush()  # the half really reached the file system
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        results.write_atomic(path, half_then_fail)
    assert path.read_bytes() == b'[{"round": 0}]\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_load_checkpoint_explains_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="nothing to resume"):
        results.ResultsDir(tmp_path, NAMES).load_checkpoint()


def test_clear_removes_the_run_and_its_plot_only(tmp_path):
    rdir = results.ResultsDir(tmp_path, NAMES)
    rdir.save_round([{"round": 0}], _update(1.0))
    (tmp_path / "accuracy.png").write_bytes(b"png")  # drawn from the old run: stale
    (tmp_path / "logs").mkdir()                      # demo.py's logs of the new run
    (tmp_path / "notes.txt").write_text("mine")
    assert [p.name for p in rdir.run_files()] == [
        "global_model.npz", "metrics.csv", "metrics.json", "model_round_0.npz"]
    rdir.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "notes.txt"]
    assert rdir.run_files() == []


def test_results_dir_problem_names_the_file_in_the_way(tmp_path):
    (tmp_path / "file").write_text("x")
    assert results.ResultsDir(tmp_path / "new/sub", NAMES).problem() is None
    assert results.ResultsDir(tmp_path / "file", NAMES).problem() == (
        f"{tmp_path}/file is a file, not a directory")
    assert results.ResultsDir(tmp_path / "file/sub/deeper", NAMES).problem() == (
        f"{tmp_path}/file/sub/deeper cannot be a directory: {tmp_path}/file is a file")


def test_resume_mismatch_names_the_setting():
    saved = {"seed": 0, "fraction_fit": 1.0, "local_epochs": 1, "batch_size": 32,
             "learning_rate": 0.001, "manifest_sha256": "ab", "model": {"w": "2x3"},
             "rounds": 5, "address": "0.0.0.0:8080", "min_clients": 10}
    allowed = dict(saved, rounds=8, address="127.0.0.1:9000", min_clients=9)
    assert results.resume_mismatch(saved, allowed) is None
    assert results.resume_mismatch(saved, dict(saved, learning_rate=0.01)) == (
        "learning_rate was 0.001, now 0.01")
    assert results.resume_mismatch(saved, dict(saved, manifest_sha256="cd")) == (
        "manifest_sha256 was 'ab', now 'cd'")
    # Settings newer than a saved run: it ran with plain FedAvg and no DP.
    assert results.resume_mismatch(saved, dict(saved, aggregation="fedavg", dp=None)) is None
    assert results.resume_mismatch(saved, dict(saved, aggregation="median")) == (
        "aggregation was 'fedavg', now 'median'")
    dp = {"noise_multiplier": 1.0, "clipping_norm": 1.0, "delta": 1e-5}
    assert results.resume_mismatch(dict(saved, dp=dp), dict(saved, dp=dict(dp, delta=1e-6))) == (
        f"dp was {dp!r}, now {dict(dp, delta=1e-6)!r}")
    assert json.loads(json.dumps(saved)) == saved  # what is compared survives JSON


def test_progress_lines():
    r0 = {"round": 0, "centralized_accuracy": 0.098, "centralized_loss": 2.30258}
    assert run_record.progress_line(r0, 5) == (
        "round 0/5  accuracy  9.80%  loss 2.3026  (initial global model)")
    r1 = {"round": 1, "centralized_accuracy": 0.91234, "centralized_loss": 0.28712,
          "clients_fit": 10, "clients_sampled": 10, "failures": 0, "round_seconds": 12.34}
    assert run_record.progress_line(r1, 5) == (
        "round 1/5  accuracy 91.23%  loss 0.2871  clients 10/10  failures 0  (12.3 s)")


# -------------------------------------------------------------------- client manager

def test_client_manager_gives_up_after_its_timeout():
    manager = client_manager.TimeoutClientManager(timeout=0.2)
    start = time.monotonic()
    assert manager.wait_for(1) is False
    with pytest.raises(client_manager.NotEnoughClients, match="only 0 of the 2 clients"):
        manager.sample(2)
    # It waited its 0.2 s twice, and then gave up (not Flower's default of 24 h). The upper
    # bound only has to tell seconds from hours: a busy CI machine must not fail it.
    assert 0.4 <= time.monotonic() - start < 60


# ------------------------------------------------------ one round through the strategy

class _Proxy(ClientProxy):
    """A stand-in for a connected client: the strategy only samples and counts them."""

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def _fit_res(arrays, num_examples, **metrics) -> FitRes:
    return FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(arrays),
                  num_examples=num_examples, metrics=metrics)


def _eval_res(loss, num_examples, **metrics) -> EvaluateRes:
    return EvaluateRes(status=Status(Code.OK, ""), loss=loss, num_examples=num_examples,
                       metrics=metrics)


def _run_round(tmp_path, fit_results, eval_results, lines):
    """Round 0 and round 1 through CheckedFedAvg, as Flower's Server would call it."""
    s = strategy.CheckedFedAvg(
        initial_arrays=GLOBAL, array_names=NAMES, shard_sizes=SHARDS, val_sizes=[10, 30],
        evaluate_fn=lambda arrays: (float(arrays[1][0]), 0.5),  # "loss" = one weight
        results=results.ResultsDir(tmp_path, NAMES), total_rounds=1, min_clients=2,
        fit_config={"local_epochs": 1}, progress=lines.append)
    manager = client_manager.TimeoutClientManager(timeout=1)
    for cid in ("a", "b", "c"):
        manager.register(_Proxy(cid))
    params = s.initialize_parameters(manager)
    s.evaluate(0, params)
    instructions = s.configure_fit(1, params, manager)
    assert len(instructions) == 3
    assert instructions[0][1].config == {"local_epochs": 1, "server_round": 1}
    new, _ = s.aggregate_fit(1, [(None, r) for r in fit_results], [TimeoutError("late")])
    s.evaluate(1, new)
    s.configure_evaluate(1, new, manager)
    s.aggregate_evaluate(1, [(None, r) for r in eval_results], [])
    return parameters_to_ndarrays(new), json.loads((tmp_path / "metrics.json").read_text())


def test_a_round_validates_sorts_averages_and_records(tmp_path):
    fits = [_fit_res(_update(3.0), 30, partition=1, train_loss=0.2, train_accuracy=0.9),
            _fit_res(_update(np.nan), 10, partition=0),           # rejected: NaN
            _fit_res(_update(1.0), 10, partition=0, train_loss=0.6, train_accuracy=0.5),
            _fit_res(_update(2.0), 10, partition=0)]              # rejected: duplicate
    evals = [_eval_res(0.5, 30, partition=1, accuracy=0.8),
             _eval_res(1.0, 10, partition=0, accuracy=0.4),
             _eval_res(9.0, 11, partition=0, accuracy=0.4)]       # ignored: 11 > 10
    lines = []
    arrays, records = _run_round(tmp_path, fits, evals, lines)
    # FedAvg of the two accepted updates: (10 * 1 + 30 * 3) / 40 = 2.5.
    np.testing.assert_array_equal(arrays[0], np.full((2, 3), 2.5, np.float32))
    r = records[1]
    assert (r["round"], r["clients_sampled"], r["clients_fit"], r["failures"]) == (1, 3, 2, 3)
    assert (r["train_loss"], r["train_accuracy"]) == ((0.6 * 10 + 0.2 * 30) / 40, 0.8)
    assert (r["federated_loss"], r["federated_accuracy"]) == (0.625, 0.7)
    assert r["evaluate_failures"] == 1 and r["centralized_loss"] == 2.5
    assert r["bytes_received"] > 4 * 9 * 4
    assert lines[0] == "round 0/1  accuracy 50.00%  loss 0.0000  (initial global model)"
    assert lines[1].startswith("round 1/1  accuracy 50.00%  loss 2.5000  clients 2/3  failures 3")
    assert (tmp_path / "model_round_1.npz").is_file()


def test_a_round_does_not_depend_on_arrival_order(tmp_path):
    rng = np.random.default_rng(0)
    updates = [[rng.standard_normal((2, 3)).astype(np.float32),
                rng.standard_normal(3).astype(np.float32)] for _ in range(2)]
    fits = [_fit_res(updates[0], 7, partition=0), _fit_res(updates[1], 13, partition=1)]
    evals = [_eval_res(0.1, 5, partition=0, accuracy=0.5)]
    a, _ = _run_round(tmp_path / "a", fits, evals, [])
    b, _ = _run_round(tmp_path / "b", fits[::-1], evals, [])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_five_updates_give_the_same_bits_in_any_arrival_order(tmp_path):
    """The global model is a function of the accepted updates, not of who answered first.

    Two updates sum to the same float64 in either order; five need not. Element [0, 0]
    cancels (+30, -30) next to a tiny 1e-20: summed in one order the tiny term survives,
    in another it is lost, so the float32 result differs unless the strategy fixes the
    order (it sorts by partition)."""
    rng = np.random.default_rng(0)
    updates = [[rng.standard_normal((2, 3)).astype(np.float32),
                rng.standard_normal(3).astype(np.float32)] for _ in range(5)]
    for update, value in zip(updates, [30.0, -30.0, 1e-20, 0.0, 0.0]):
        update[0][0, 0] = value
    sizes = [10, 10, 10, 30, 30]  # within each partition's 100 examples

    def naive_sum(order):  # the weighted sum in arrival order, in float64
        return sum(sizes[k] * updates[k][0].astype(np.float64) for k in order)[0, 0]
    assert naive_sum([0, 1, 2, 3, 4]) != naive_sum([0, 2, 1, 3, 4])  # a case that can go wrong

    def aggregate(order):
        s = strategy.CheckedFedAvg(
            initial_arrays=GLOBAL, array_names=NAMES, shard_sizes=[100] * 5,
            val_sizes=[10] * 5, evaluate_fn=lambda arrays: (0.0, 0.0),
            results=results.ResultsDir(tmp_path, NAMES), total_rounds=1, min_clients=5,
            fit_config={})
        fits = [(None, _fit_res(updates[k], sizes[k], partition=k)) for k in order]
        new, _ = s.aggregate_fit(1, fits, [])
        return parameters_to_ndarrays(new)

    orders = [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [0, 2, 1, 3, 4], [2, 4, 0, 3, 1],
              [3, 0, 4, 2, 1]]
    first = aggregate(orders[0])
    for order in orders[1:]:
        assert all(np.array_equal(x, y) for x, y in zip(first, aggregate(order))), order


def test_a_round_waits_for_min_clients_before_sampling_a_fraction(tmp_path):
    """--min-clients 4 --fraction-fit 0.5: with 3 connected, configure_fit waits (it
    would have enough clients to sample 1); the 4th to connect lets it sample 2."""
    s = strategy.CheckedFedAvg(
        initial_arrays=GLOBAL, array_names=NAMES, shard_sizes=[100] * 4, val_sizes=[10] * 4,
        evaluate_fn=lambda arrays: (0.0, 0.0), results=results.ResultsDir(tmp_path, NAMES),
        total_rounds=1, min_clients=4, fit_config={}, fraction_fit=0.5)
    manager = client_manager.TimeoutClientManager(timeout=120, seed=0)
    for i in range(3):
        manager.register(PartitionProxy(str(i), i))
    waiting = threading.Event()
    handler = _OnMessage("waiting for clients: 3 of 4 connected", waiting)
    logging.getLogger("flwr").addHandler(handler)
    sampled = []
    thread = threading.Thread(target=lambda: sampled.append(
        s.configure_fit(1, ndarrays_to_parameters(GLOBAL), manager)), daemon=True)
    try:
        thread.start()
        assert waiting.wait(60), "configure_fit never waited for the 4th client"
        assert thread.is_alive() and not sampled  # still waiting with 3 of 4 connected
        manager.register(PartitionProxy("3", 3))
        thread.join(60)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert not thread.is_alive() and len(sampled[0]) == 2


class _OnMessage(logging.Handler):
    """Sets an event when a log record's message starts with `prefix`."""

    def __init__(self, prefix: str, event: threading.Event) -> None:
        super().__init__()
        self.prefix, self.event = prefix, event

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            self.event.set()


def test_fraction_fit_samples_a_fraction_but_waits_for_min_clients(tmp_path):
    s = strategy.CheckedFedAvg(
        initial_arrays=GLOBAL, array_names=NAMES, shard_sizes=SHARDS, val_sizes=[10, 10],
        evaluate_fn=lambda arrays: (0.0, 0.0), results=results.ResultsDir(tmp_path, NAMES),
        total_rounds=1, min_clients=10, fit_config={}, fraction_fit=0.5)
    assert s.num_fit_clients(10) == (5, 10)
    # Evaluation is sampled like training, so a round costs what its sampled clients cost.
    assert s.num_evaluation_clients(10) == (5, 10)


class PartitionProxy(_Proxy):
    """A connected client that only answers get_properties, with its partition."""

    def __init__(self, cid: str, partition: int) -> None:
        super().__init__(cid)
        self.partition, self.asked = partition, 0

    def get_properties(self, ins, timeout, group_id):
        self.asked += 1
        return GetPropertiesRes(Status(Code.OK, ""), {"partition": self.partition})


def _sampled_partitions(cids: list[str], seed: int, server_round: int, purpose: int = 0):
    manager = client_manager.TimeoutClientManager(timeout=1.0, seed=seed)
    proxies = [PartitionProxy(cid, partition) for partition, cid in enumerate(cids)]
    for proxy in reversed(proxies):  # connection order must not matter either
        manager.register(proxy)
    picked = manager.sample_round(3, 10, server_round, purpose)
    manager.sample_round(3, 10, server_round + 1, purpose)
    assert all(p.asked == 1 for p in proxies)  # each client is asked once, not every round
    return sorted(p.partition for p in picked)


def test_sampling_depends_on_seed_round_and_partitions_not_on_connection_ids():
    ids_a = [f"ipv4:127.0.0.1:{5000 + i}" for i in range(10)]
    ids_b = [str(10**18 - 7 * i) for i in range(10)]  # SuperNode ids: random ints
    def expected(seed, server_round, purpose=0):  # the documented rule, written out
        rng = np.random.default_rng([seed, server_round, purpose])
        return sorted(rng.choice(10, 3, replace=False).tolist())

    assert _sampled_partitions(ids_a, 0, 1) == _sampled_partitions(ids_b, 0, 1) == expected(0, 1)
    assert _sampled_partitions(ids_a, 0, 1, purpose=1) == expected(0, 1, 1)
    assert _sampled_partitions(ids_a, 7, 3) == expected(7, 3)
    rounds = {tuple(_sampled_partitions(ids_a, 0, r)) for r in range(1, 6)}
    assert len(rounds) > 1  # a new sample every round


def test_sampling_everyone_asks_no_one():
    manager = client_manager.TimeoutClientManager(timeout=1.0, seed=0)
    proxies = [PartitionProxy(str(i), i) for i in range(4)]
    for proxy in proxies:
        manager.register(proxy)
    assert len(manager.sample_round(4, 4, 1)) == 4 and all(p.asked == 0 for p in proxies)


# ------------------------------------------------------ secure aggregation (SecAgg+)

def _secure_round(tmp_path, fit_results, failures, lines):
    """Round 1 through CheckedFedAvg in SecAgg+ mode, as Flower's SecAggPlusWorkflow drives
    it: every result carries the same (float64) average; the strategy never sees a model."""
    s = strategy.CheckedFedAvg(
        initial_arrays=GLOBAL, array_names=NAMES, shard_sizes=SHARDS, val_sizes=[10, 30],
        evaluate_fn=lambda arrays: (float(arrays[1][0]), 0.5),
        results=results.ResultsDir(tmp_path, NAMES), total_rounds=1, min_clients=2,
        fit_config={}, progress=lines.append, secagg_clipping_range=8.0)
    manager = client_manager.TimeoutClientManager(timeout=1)
    for cid in ("a", "b", "c"):
        manager.register(_Proxy(cid))
    params = s.initialize_parameters(manager)
    s.evaluate(0, params)
    s.configure_fit(1, params, manager)
    new, _ = s.aggregate_fit(1, [(None, r) for r in fit_results], failures)
    secure_aggregation.record_unaggregated_round(s.round_record)  # what server_app does after every SecAgg+ fit round
    s.evaluate(1, new if new is not None else params)
    s.configure_evaluate(1, new, manager)
    s.aggregate_evaluate(1, [], [])
    return new, json.loads((tmp_path / "metrics.json").read_text())[1]


def test_secure_aggregation_accepts_the_average_it_cannot_look_behind(tmp_path, caplog):
    average = [a.astype(np.float64) + 0.25 for a in _update(1.0)]  # as SecAgg+ dequantizes
    fits = [_fit_res(average, 30, partition=1, train_loss=0.2, train_accuracy=0.9),
            _fit_res(average, 10, partition=0, train_loss=0.6, train_accuracy=0.5)]
    with caplog.at_level(logging.WARNING):
        # Flower reports a client that drops out before sending its masked model twice.
        new, record = _secure_round(tmp_path, fits, [Exception("node 3 dropped")] * 2, [])
    arrays = parameters_to_ndarrays(new)
    assert [a.dtype for a in arrays] == [np.float32, np.float32]  # the model's dtype again
    np.testing.assert_array_equal(arrays[0], np.full((2, 3), 1.25, np.float32))
    assert (record["clients_fit"], record["failures"]) == (2, 1)
    assert (record["train_loss"], record["train_accuracy"]) == (0.3, 0.8)
    # Counted: each client's masked model (int64 arrays + its weight) and its metadata.
    masked = sum(len(ndarray_to_bytes(np.zeros(s, np.int64))) for s in [(1,), (2, 3), (3,)])
    assert masked < record["bytes_received"] / 2 < masked + 200
    assert caplog.text.count("SecAgg+ is on") == 1
    assert caplog.text.count("a client dropped out of SecAgg+: Exception: node 3 dropped") == 1


@pytest.mark.parametrize("average, reason", [
    ([np.full((2, 3), np.nan), np.zeros(3)], "dense/w contains NaN or Inf"),
    ([np.zeros((2, 3))], "1 arrays, expected 2"),  # e.g. a client's empty model in the sum
    ([np.full((2, 3), 1e3), np.zeros(3)], "update norm 2.45e+03 is more than 100x"),
])
def test_secure_aggregation_still_rejects_a_bad_average(tmp_path, caplog, average, reason):
    lines = []
    new, record = _secure_round(tmp_path, [_fit_res(average, 10, partition=0)], [], lines)
    assert new is None and (record["clients_fit"], record["failures"]) == (1, 2)
    assert f"rejected the securely aggregated model: {reason}" in caplog.text
    assert record["centralized_loss"] == 0.0  # the global model stayed as it was


def test_a_secure_round_that_gave_up_is_recorded_as_failed(tmp_path, caplog):
    s_lines = []
    s = strategy.CheckedFedAvg(
        initial_arrays=GLOBAL, array_names=NAMES, shard_sizes=SHARDS, val_sizes=[10, 30],
        evaluate_fn=lambda arrays: (0.0, 0.5), results=results.ResultsDir(tmp_path, NAMES),
        total_rounds=1, min_clients=2, fit_config={}, progress=s_lines.append,
        secagg_clipping_range=8.0)
    manager = client_manager.TimeoutClientManager(timeout=1)
    for cid in ("a", "b"):
        manager.register(_Proxy(cid))
    params = s.initialize_parameters(manager)
    s.evaluate(0, params)
    s.configure_fit(1, params, manager)  # ... and SecAgg+ stops: no aggregate_fit
    secure_aggregation.record_unaggregated_round(s.round_record)
    s.evaluate(1, params)
    s.configure_evaluate(1, params, manager)
    s.aggregate_evaluate(1, [], [])
    record = json.loads((tmp_path / "metrics.json").read_text())[1]
    assert (record["clients_sampled"], record["clients_fit"], record["failures"]) == (2, 0, 2)
    assert "round 1: SecAgg+ stopped" in caplog.text
    assert s_lines[1].startswith("round 1/1  accuracy 50.00%  loss 0.0000  clients 0/2")


def _expired_reply_error(node_id: int) -> ValueError:
    """What Flower's App path raises for a node that sent nothing before the round's TTL:
    its GridClientProxy gets the SuperLink's "reply message expired" error reply."""
    class ExpiredGrid:  # the SuperLink's answer once the message's TTL has run out
        def send_and_receive(self, messages, timeout=None):
            return [flower_internals.app_path_expired_reply(m) for m in messages]

    proxy = flower_internals.grid_client_proxy(node_id, ExpiredGrid(), run_id=1)
    with flower_internals.task_identity(), pytest.raises(ValueError) as failure:
        proxy.fit(FitIns(ndarrays_to_parameters(GLOBAL), {}), 300.0, 1)
    return failure.value


def test_a_lost_node_on_the_app_path_is_named_by_partition_and_cause(tmp_path, caplog):
    """On the App path the client manager knows no partitions (fraction-fit 1): the lost
    node's partition comes from its earlier replies, the cause from Flower's error."""
    s = strategy.CheckedFedAvg(
        initial_arrays=GLOBAL, array_names=NAMES, shard_sizes=SHARDS, val_sizes=[10, 30],
        evaluate_fn=lambda arrays: (0.0, 0.5), results=results.ResultsDir(tmp_path, NAMES),
        total_rounds=2, min_clients=2, fit_config={}, progress=lambda line: None,
        round_timeout=300.0)
    manager = client_manager.TimeoutClientManager(timeout=1)
    for cid in ("1234", "5678"):  # SuperNode ids
        manager.register(_Proxy(cid))
    params = s.initialize_parameters(manager)
    s.evaluate(0, params)
    proxies = [p for p, _ in s.configure_fit(1, params, manager)]
    by_cid = {p.cid: p for p in proxies}
    new, _ = s.aggregate_fit(1, [(by_cid["1234"], _fit_res(_update(1.0), 10, partition=0)),
                                 (by_cid["5678"], _fit_res(_update(1.0), 10, partition=1))], [])
    s.evaluate(1, new)
    s.configure_evaluate(1, new, manager)
    s.aggregate_evaluate(1, [], [])
    s.configure_fit(2, new, manager)
    with caplog.at_level(logging.WARNING):
        s.aggregate_fit(2, [(by_cid["1234"], _fit_res(_update(1.0), 10, partition=0))],
                        [_expired_reply_error(5678)])
    assert ("round 2: partition 1 (node 5678) failed: sent no reply within the 300 s round "
            "timeout") in caplog.text
    assert "connection closed" not in caplog.text
