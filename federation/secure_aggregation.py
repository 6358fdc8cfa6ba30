"""Secure aggregation (SecAgg+) on the server: Flower's workflow, and what is left to check.

With SecAgg+ (Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning"; SecAgg+: Bell et al. 2020) the clients mask their models so that the
server learns only their weighted sum: Flower's SecAggPlusWorkflow runs the key exchange,
collects the masked models and unmasks the sum, then hands CheckedFedAvg (strategy.py) the
average. Per-client validation and robust rules are then impossible; this file holds what
remains: checks on the average, the round's counts, and the bytes the clients sent.
server_app.py runs the workflow with `secagg = true`; client_app.py switches the clients'
side on from the same key.

DP under SecAgg+ (with `dp-noise-multiplier`) is DP-FedAvg (privacy.py) with its clipping
moved to the clients, as in Flower's fl-dp-sa example: each client sends w + clip(w_k - w, C)
with weight 1 (client_app.py), so the unmasked average is w + Σ_k Δ_k / K over the K
clients in it; the server adds N(0, σ²C²) to K times (average - w), the sum of the clipped
updates, and divides by the m clients sampled: privacy.noised_average, the same step and
the same seeded noise as DP-FedAvg. Only SecAgg+'s quantization differs (tests/test_secagg.py).
"""

from collections.abc import Sequence
from logging import WARNING
from typing import Protocol

import numpy as np
from flwr.common import (Context, FitRes, Parameters, log, ndarray_to_bytes,
                         parameters_to_ndarrays)
from flwr.server import Grid
from flwr.server.client_proxy import ClientProxy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from federation import flower_internals, privacy, rounds
from federation.aggregation import Arrays
from federation.failures import failure_reason
from federation.settings import ServerSettings
from federation.validation import validate_arrays

class RoundState(Protocol):
    """What the workflow needs of the strategy (CheckedFedAvg, which imports this file)."""

    shard_sizes: Sequence[int]
    round_record: dict


def secagg_workflow(settings: ServerSettings, strategy: RoundState) -> DefaultWorkflow:
    """FedAvg's rounds with SecAgg+ in place of the plain fit round."""
    secagg = SecAggPlusWorkflow(
        num_shares=settings.num_shares,
        reconstruction_threshold=settings.reconstruction_threshold,
        clipping_range=settings.clipping_range,
        # A client sends its weights times n_k / max_weight, quantized after clipping to
        # +-clipping_range. With the largest shard as max_weight that factor is <= 1, so
        # the clipping never cuts an honest weight smaller than clipping_range (Flower's
        # default, 1,000, would multiply a 5,400-example client's weights by 5.4 first).
        # Under DP every client sends weight 1 (client_app.py: DP-FedAvg counts each client
        # once, whatever its data), so max_weight 1 keeps that factor exactly 1.
        max_weight=1.0 if settings.dp else float(max(strategy.shard_sizes)),
        timeout=settings.round_timeout)  # per stage: a round has four

    def fit_round(grid: Grid, context: Context) -> None:
        secagg(grid, context)
        record_unaggregated_round(strategy.round_record)  # too many dropped out to unmask the sum

    return DefaultWorkflow(fit_workflow=fit_round)


def warn_secure_aggregation(clipping_range: float) -> None:
    """Say what the server can no longer check under SecAgg+ (once per run)."""
    log(WARNING, "SecAgg+ is on: the server sees only the clients' weighted average, so "
        "per-client update validation and robust aggregation are off (a bad update "
        "cannot be detected or left out). Honest clients clip every weight to +-%g "
        "before masking, which bounds a buggy client; a client running modified code "
        "is not bound by it. The server still checks the average: array count, shapes, "
        "finite values, distance from the global model.", clipping_range)


def masked_reply_bytes(res: FitRes, global_arrays: Arrays) -> int:
    """What one client sends in SecAgg+'s masked-vector stage: its reply without arrays (as
    protobuf), plus its masked model: int64 arrays of the model's shapes and its weight,
    as np.save bytes (secaggplus_mod). SecAgg+'s key-exchange messages are not counted."""
    shapes = [(1,), *(a.shape for a in global_arrays)]
    masked = sum(len(ndarray_to_bytes(np.zeros(shape, np.int64))) for shape in shapes)
    metadata = FitRes(res.status, Parameters([], ""), res.num_examples, res.metrics)
    return flower_internals.fit_res_wire_bytes(metadata) + masked


def checked_average(true_round: int, results: list[tuple[ClientProxy, FitRes]],
                    failures: list, clients_sampled: int, global_arrays: Arrays,
                    clipping_range: float, max_update_ratio: float,
                    array_names: Sequence[str], dp: privacy.DPConfig | None = None,
                    seed: int = 0) -> tuple[Arrays | None, dict]:
    """SecAgg+'s average if it passes the checks that are left (else None), and the
    round's counts: clients_fit, failures, bytes_received, train loss/accuracy.

    With dp, the average of the clients' clipped models becomes DP-FedAvg's noised one
    (see above), its noise drawn as DP-FedAvg's, from `seed` and the round. The server sees
    no client's own update, so the record's update_norm and clipped stay empty (None).

    Flower's SecAggPlusWorkflow calls aggregate_fit once it has unmasked the sum:
    `results` are the clients whose masked models are in it, and every one of them
    carries the same parameters, the average sum_k n_k w_k / sum_k n_k (float64,
    dequantized). Their num_examples and metrics are their own (SecAgg+ masks only the
    arrays). `failures` holds an error for each client that dropped out, at any stage, but
    Flower 1.41 and 1.42 reports a dropout in the masked-model stage twice, and one in the
    unmask stage, whose model is in the average, too: so the round's failures are the
    sampled clients whose model is not in the average.
    """
    for reason in dict.fromkeys(map(failure_reason, failures)):  # each reason once
        log(WARNING, "round %d: a client dropped out of SecAgg+: %s", true_round, reason)
    replies = [res for _, res in results]
    stats = dict(
        clients_fit=len(replies), failures=clients_sampled - len(replies),
        bytes_received=sum(masked_reply_bytes(res, global_arrays) for res in replies),
        **rounds.train_metrics([(r.num_examples, r.metrics) for r in replies]))
    if not replies:
        log(WARNING, "round %d: no masked model; the global model stays as it was",
            true_round)
        return None, stats
    unmasked = parameters_to_ndarrays(replies[0].parameters)  # float64
    # The same float32 arrays FedAvg would give (arrays too large for float32 become Inf).
    average = [a.astype(np.float32) for a in unmasked]
    reason = validate_arrays(average, global_arrays, max_update_ratio, array_names)
    if reason is not None:
        log(WARNING, "round %d: rejected the securely aggregated model: %s; the global "
            "model stays as it was", true_round, reason)
        return None, stats
    if dp is not None:
        stats.update(update_norm=None, clipped=None)
        clipped_sum = [len(replies) * (a - np.asarray(g, np.float64))
                       for a, g in zip(unmasked, global_arrays, strict=True)]
        average = privacy.noised_average(global_arrays, clipped_sum, dp, clients_sampled,
                                         rounds.dp_noise_rng(seed, true_round))
    # The clients send this model's weights (plus, under DP, their update) next round.
    largest = max(float(np.abs(a).max(initial=0.0)) for a in average)
    if largest > clipping_range / 2:  # honest weights may soon be clipped
        log(WARNING, "round %d: the largest weight, %.3g, is over half of SecAgg+'s "
            "clipping range %g; raise clipping-range", true_round, largest,
            clipping_range)
    return average, stats


def record_unaggregated_round(round_record: dict) -> None:
    """Record the fit of a round that ended without aggregate_fit (SecAgg+ gave up: too
    few clients left to unmask the sum); every sampled client counts as failed. A round
    that aggregated, or none begun, is left as it is."""
    if not round_record or "clients_fit" in round_record:
        return
    log(WARNING, "round %d: SecAgg+ stopped (too few clients left to unmask the sum); "
        "the global model stays as it was", round_record["round"])
    round_record.update(clients_fit=0, failures=round_record["clients_sampled"],
                        bytes_received=0, train_loss=None, train_accuracy=None)
