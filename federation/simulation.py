"""The whole federation in one process: every round of server.py + client.py, computed here,
bit for bit, without processes or a network.

fedjax (and McMahan et al.'s own experiments) run federated learning as one loop, and so
can this repository: with the same ServerSettings, `run` gives the global model and the
metrics.json records that server.py and one client.py per partition give over gRPC (or
the Flower App), in the same bits on the same machine. tests/test_federation.py,
test_protection.py and test_noniid.py check that against real processes; the benchmarks
use it to measure 1,000 clients or a 50-round grid on a laptop.

It runs the code the federation runs, not a copy of it:

    sample       client_manager.choose([seed, round, 0]), as TimeoutClientManager picks
    train        local_training.fit, as MnistClient.fit (key rule, FedProx, attacks)
    check        validation.validate_update, as CheckedFedAvg does before averaging
    aggregate    rounds.aggregate_updates: FedAvg, median, trimmed mean, Krum, DP-FedAvg
    server step  server_optimizers.ServerOptimizer: FedAvg, FedAvgM, FedAdam, FedYogi
    evaluate     server_setup.centralized_evaluator on the test set, then local_training.
                 evaluate on the seeded clients' validation splits ([seed, round, 1])
    account      privacy.spent, the ε of DP-FedAvg after each round (PLD, and RDP beside it)

Every partition given is a connected client (partition k is the k-th); none fails, times
out or leaves. What crosses the network crosses it as server.py's gRPC carries it (a
client's validation loss as a 32-bit float). What it leaves out: the processes and the
network (bytes_received is None), SecAgg+ (its clients round at random), a results
directory and resuming.
"""

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from logging import WARNING

import jax
import numpy as np
from flwr.common import log

import model
from federation import local_training, privacy, rounds, server_optimizers, server_setup
from federation.aggregation import Arrays
from federation.attacks import ATTACKS
from federation.client_manager import choose
from federation.server_setup import ServerSettings
from federation.shards import Partition
from federation.validation import validate_evaluation, validate_update

TRAIN, EVALUATE = 0, 1  # the purposes of client_manager.choose's seeded streams


@dataclasses.dataclass(frozen=True)
class Round:
    """One finished round: what on_round receives."""

    record: dict        # the round's metrics.json record (round_seconds: this process's)
    arrays: Arrays      # the global model after the round
    sampled: list[int]  # the partitions asked to train (none in round 0)


@dataclasses.dataclass(frozen=True)
class Result:
    """A whole run: the records of rounds 0..settings.rounds and the final global model."""

    records: list[dict]
    arrays: Arrays


def problem(settings: ServerSettings, num_partitions: int,
            attackers: Mapping[int, str]) -> str | None:
    """Why these settings cannot run in one process (one line), or None."""
    if settings.secagg:
        return "secagg: SecAgg+ runs only in a real federation (server_app.py)"
    if settings.resume:
        return "resume: a run in one process does not resume (it writes no results directory)"
    if settings.min_clients > num_partitions:
        return (f"min-clients {settings.min_clients}, but only {num_partitions} partitions "
                "(one client each)")
    for partition, attack in attackers.items():
        if not 0 <= partition < num_partitions or attack not in ATTACKS:
            return (f"attacker {partition}: {attack!r} on partitions 0..{num_partitions - 1} "
                    f"(attacks: {', '.join(ATTACKS)})")
    return settings.problem()


def run(settings: ServerSettings, partitions: Sequence[Partition],
        test_set: tuple[np.ndarray, np.ndarray], *,
        attackers: Mapping[int, str] | None = None, attack_boost: float = 10.0,
        federated_evaluation: bool = True, initial_arrays: Arrays | None = None,
        on_round: Callable[[Round], None] | None = None) -> Result:
    """Run settings.rounds rounds of the federation over `partitions`, in this process.

    Args:
      settings: the server's settings (server.py's flags or the run config); the results
        directory, the transport and the timeouts are not used.
      partitions: one connected client each; partition k is partitions[k].
      test_set: (x_test, y_test) for the centralized evaluation, as server.py loads it.
      attackers: partition -> attack (attacks.ATTACKS), as client.py --attack.
      attack_boost: sign-flip's boost, as client.py --attack-boost.
      federated_evaluation: False skips the clients' validation (federated_loss and
        federated_accuracy stay None): less work when only the test accuracy counts.
      initial_arrays: the round-0 global model (default: model.init_params(key(seed))).
      on_round: called after round 0 and after every round, e.g. to print progress.
    Returns:
      The records of rounds 0..settings.rounds, metrics.json's (results.saved_record gives
      their saved form: every column, NaN/Inf as null), and the final global model.
    Raises:
      ValueError (one line) for settings that cannot run.
    """
    attackers = dict(attackers or {})
    reason = problem(settings, len(partitions), attackers)
    if reason:
        raise ValueError(reason)
    names = [name for name, _ in model.param_spec()]
    arrays = (list(initial_arrays) if initial_arrays is not None else
              model.params_to_ndarrays(model.init_params(jax.random.key(settings.seed))))
    optimizer = server_optimizers.ServerOptimizer(
        server_setup.server_optimizer_config(settings), arrays, names)
    evaluate = server_setup.centralized_evaluator(*test_set)
    fit_config = server_setup.fit_config(settings)
    shard_sizes = [len(p.x_train) for p in partitions]
    val_sizes = [len(p.x_val) for p in partitions]
    # FedAvg.num_fit_clients with CheckedFedAvg's minimum: fraction_fit of the connected
    # clients, at least fraction_fit of min_clients (and one).
    per_round = max(int(len(partitions) * settings.fraction_fit), settings.clients_per_round())

    def finish(record: dict, start: float, sampled: list[int]) -> None:
        """Time, account and hand on the round (CheckedFedAvg._finish_round)."""
        record["round_seconds"] = round(time.perf_counter() - start, 3)
        if settings.dp is not None:
            record.update(privacy.spent(settings.dp, settings.fraction_fit, record["round"]))
        records.append(record)
        if on_round is not None:
            on_round(Round(record, arrays, sampled))

    records: list[dict] = []
    start = time.perf_counter()
    loss, accuracy = evaluate(arrays)
    finish({"round": 0, "centralized_loss": loss, "centralized_accuracy": accuracy,
            "clients_sampled": 0, "clients_fit": 0, "failures": 0, "evaluate_failures": 0,
            "bytes_received": 0}, start, [])
    for r in range(1, settings.rounds + 1):
        start = time.perf_counter()
        sampled = choose(settings.seed, r, TRAIN, len(partitions), per_round)
        accepted = []  # (arrays, examples, metrics), in partition order
        for k in sampled:
            reply = local_training.fit(partitions[k], arrays, {**fit_config, "server_round": r},
                                       seed=settings.seed, partition=k,
                                       attack=attackers.get(k), attack_boost=attack_boost)
            reason = validate_update(*reply, arrays, shard_sizes, names=names)
            if reason is not None:
                log(WARNING, "round %d: rejected update from partition %d: %s", r, k, reason)
                continue
            accepted.append(reply)
        record = {"round": r, "clients_sampled": len(sampled), "clients_fit": len(accepted),
                  "failures": len(sampled) - len(accepted), "bytes_received": None,
                  **rounds.train_metrics([(n, m) for _, n, m in accepted])}
        if accepted:
            aggregated, stats = rounds.aggregate_updates(
                arrays, [(a, n) for a, n, _ in accepted], server_round=r, seed=settings.seed,
                aggregation=settings.aggregation, trim_fraction=settings.trim_fraction,
                krum_malicious=settings.krum_malicious, dp=settings.dp,
                num_sampled=len(sampled))
            record.update(stats)
            arrays = optimizer.step(arrays, aggregated)
        else:
            log(WARNING, "round %d: no valid update; the global model stays as it was", r)
        loss, accuracy = evaluate(arrays)
        record.update(centralized_loss=loss, centralized_accuracy=accuracy)
        record.update(_evaluate_clients(partitions, val_sizes, arrays, settings, r)
                      if federated_evaluation else
                      {"federated_loss": None, "federated_accuracy": None,
                       "evaluate_failures": 0})
        finish(record, start, sampled)
    return Result(records, arrays)


def _evaluate_clients(partitions: Sequence[Partition], val_sizes: list[int], arrays: Arrays,
                      settings: ServerSettings, r: int) -> dict:
    """Federated evaluation as CheckedFedAvg.configure_evaluate and aggregate_evaluate do
    it: the seeded fraction_fit of the clients with validation examples, checked, averaged."""
    candidates = [k for k, size in enumerate(val_sizes) if size > 0]
    # FedAvg.num_evaluation_clients, with fraction_evaluate = fraction_fit (CheckedFedAvg).
    wanted = max(int(len(candidates) * settings.fraction_fit), settings.clients_per_round())
    picked = [candidates[i] for i in choose(settings.seed, r, EVALUATE, len(candidates), wanted)]
    accepted = []
    for k in picked:
        loss, num_examples, metrics = local_training.evaluate(partitions[k], arrays, k)
        # What the server receives: server.py's gRPC carries the loss as a protobuf float
        # (32 bits; Flower's EvaluateRes), so the average is taken over float32 losses.
        reply = float(np.float32(loss)), num_examples, metrics
        reason = validate_evaluation(*reply, val_sizes)
        if reason is not None:
            log(WARNING, "round %d: ignored evaluation from partition %d: %s", r, k, reason)
            continue
        accepted.append(reply)
    if not picked:  # nobody to ask: recorded as such (CheckedFedAvg.configure_evaluate)
        return {"federated_loss": None, "federated_accuracy": None, "evaluate_failures": 0}
    return {**rounds.evaluation_metrics(accepted),
            "evaluate_failures": len(picked) - len(accepted)}
