"""A round's replies, from Flower's FitRes/EvaluateRes to the ones that count.

Each reply is decoded and checked (validation.py); at most one per partition counts, and
those that count come back in partition order, so that the same replies give the same
global model bit for bit, in whatever order they arrived. Each reply left out gets one
warning with its reason. CheckedFedAvg (strategy.py) calls these from aggregate_fit and
aggregate_evaluate, with fit_counts: what the fit stage adds to the round's record.
"""

from collections.abc import Mapping, Sequence
from logging import WARNING

from flwr.common import EvaluateRes, FitRes, log, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy

from federation import flower_internals, rounds
from federation.aggregation import Arrays
from federation.validation import validate_evaluation, validate_update


def _check_fit_result(res: FitRes, accepted: dict, global_arrays: Arrays,
                      shard_sizes: Sequence[int], max_update_ratio: float,
                      array_names: Sequence[str]) -> str | None:
    """Add a valid result to `accepted` (keyed by partition); else return why not."""
    try:
        arrays = parameters_to_ndarrays(res.parameters)
    except Exception as e:  # pylint: disable=broad-except  # any garbage bytes
        return f"arrays cannot be decoded ({type(e).__name__}: {e})"
    reason = validate_update(arrays, res.num_examples, res.metrics, global_arrays,
                             shard_sizes, max_update_ratio, array_names)
    if reason is None and res.metrics["partition"] in accepted:
        reason = "another client already sent an update for this partition this round"
    if reason is None:
        accepted[res.metrics["partition"]] = (arrays, res.num_examples, res.metrics)
    return reason


def accepted_updates(true_round: int, results: list[tuple[ClientProxy, FitRes]],
                     global_arrays: Arrays, shard_sizes: Sequence[int],
                     max_update_ratio: float, array_names: Sequence[str],
                     ) -> tuple[list[tuple[Arrays, int, Mapping]], int]:
    """The valid updates as (arrays, num_examples, metrics) in partition order, and how
    many were rejected (each with a warning; one more if none is valid)."""
    accepted: dict[int, tuple[Arrays, int, Mapping]] = {}
    rejected = 0
    for _, res in results:
        reason = _check_fit_result(res, accepted, global_arrays, shard_sizes,
                                   max_update_ratio, array_names)
        if reason is None:
            continue
        rejected += 1
        log(WARNING, "round %d: rejected update from partition %s: %s", true_round,
            res.metrics.get("partition", "?"), reason)
    if not accepted:
        log(WARNING, "round %d: no valid update; the global model stays as it was", true_round)
    return [accepted[p] for p in sorted(accepted)], rejected


def fit_counts(results: list[tuple[ClientProxy, FitRes]], failures: list,
               accepted: Sequence[tuple[Arrays, int, Mapping]], rejected: int) -> dict:
    """The round's record of its fit stage: clients_fit, failures (a rejected update
    counts as one), bytes_received (every reply as protobuf, i.e. on the wire) and the
    accepted clients' train loss/accuracy (rounds.train_metrics)."""
    fit_replies = [res for _, res in results + [f for f in failures if isinstance(f, tuple)]]
    return dict(clients_fit=len(accepted), failures=len(failures) + rejected,
                bytes_received=sum(map(flower_internals.fit_res_wire_bytes, fit_replies)),
                **rounds.train_metrics([(n, m) for _, n, m in accepted]))


def evaluation_counts(true_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                      failures: list, val_sizes: Sequence[int]) -> dict:
    """The round's record of its evaluate stage: the valid evaluations' averages
    (rounds.evaluation_metrics) and evaluate_failures (an ignored evaluation counts)."""
    ordered = accepted_evaluations(true_round, results, val_sizes)
    metrics = rounds.evaluation_metrics([(r.loss, r.num_examples, r.metrics)
                                         for r in ordered])
    return dict(metrics, evaluate_failures=len(failures) + len(results) - len(ordered))


def accepted_evaluations(true_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                         val_sizes: Sequence[int]) -> list[EvaluateRes]:
    """The valid evaluations in partition order (each one ignored gets a warning)."""
    valid = {}
    for _, res in results:
        reason = validate_evaluation(res.loss, res.num_examples, res.metrics, val_sizes)
        if reason is None and res.metrics["partition"] in valid:
            reason = "another client already evaluated this partition this round"
        if reason is not None:
            log(WARNING, "round %d: ignored evaluation from partition %s: %s", true_round,
                res.metrics.get("partition", "?"), reason)
            continue
        valid[res.metrics["partition"]] = res
    return [valid[p] for p in sorted(valid)]
