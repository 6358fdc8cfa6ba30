"""FedAvg (McMahan et al. 2017) as a Flower strategy that checks every update and keeps a
crash-safe record of the run.

FedAvg ("Communication-Efficient Learning of Deep Networks from Decentralized Data") sets
the new global model to the average of the clients' models, each weighted by the number
of examples it trained on: w = sum_k (n_k / n) w_k. Flower's stock FedAvg does exactly
that with whatever comes back. A server that runs for a long time against processes it
does not control needs a little more, and it lives here, free of JAX and of any CLI, so
that server.py (flwr.server.start_server) and a later ServerApp can share it:

1. Validation (validation.py): an update with the wrong arrays, NaN/Inf, an absurd
   norm or an impossible example count is rejected with a logged reason and counted
   as a failure.
2. Determinism: accepted updates are sorted by partition and summed in float64, so the
   same updates give the same global model bit for bit, in whatever order they arrive.
3. Results (results.py): after every round the global model and the metrics are
   written atomically to the results directory, which is also the checkpoint a
   stopped run resumes from.
4. Liveness (client_manager.py): a client manager that admits only clients that say
   which partition they train, and gives up after a timeout instead of Flower's 24 h.
   --min-clients decides when a round may start; a round that has started is recorded
   and saved with whichever clients are left (evaluation does not wait for more).
5. The rule (rounds.py, with aggregation.py and privacy.py): FedAvg by default; a
   robust rule (median, trimmed mean, Krum) against poisoning clients; or DP-FedAvg
   (clip, average, add seeded Gaussian noise), with the privacy spent so far (ε) in every
   round's record.

Under secure aggregation (SecAgg+, server_app.py with `secagg = true`) the server sees only
the clients' weighted average, so 1. shrinks to checks on that average (_aggregate_secure).
2. still holds on the server, whose masked sum is integer arithmetic, but SecAgg+'s clients
round their weights stochastically (NumPy's unseeded global generator, in Flower's
quantize), so two such runs differ within the quantization error.
"""

import time
from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING
from typing import TYPE_CHECKING

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    log,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
    serde,
)
from flwr.proto.transport_pb2 import ClientMessage  # pylint: disable=no-name-in-module
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from federation import privacy, rounds
from federation.aggregation import Arrays
from federation.client_manager import TimeoutClientManager
from federation.results import ResultsDir
from federation.validation import (MAX_UPDATE_RATIO, validate_arrays, validate_evaluation,
                                   validate_update)


if TYPE_CHECKING:  # server_optimizers.py needs JAX; this file does not
    from federation.server_optimizers import ServerOptimizer


def print_progress(line: str) -> None:
    """The default progress sink: one line on stdout, flushed so pipes see it at once."""
    print(line, flush=True)


def _failure_reason(failure: tuple[ClientProxy, FitRes | EvaluateRes] | BaseException) -> str:
    """A readable reason for something Flower put in `failures`."""
    if isinstance(failure, BaseException):
        if type(failure).__name__ == "GrpcBridgeClosed":
            return "connection closed"
        return f"{type(failure).__name__}: {failure}"
    return f"status {failure[1].status.code.name}: {failure[1].status.message}"


def _app_failure_cause(error: BaseException, round_timeout: float | None) -> str | None:
    """What a failure on the App path (Flower's GridClientProxy) means, in one phrase, or
    None for a failure of another kind. The proxy raises ValueError for every reply it
    cannot use: no reply when its wait ended, or the SuperLink's error reply (its text
    names the cause: the message's TTL, which is the round timeout, ran out, or the
    SuperNode missed its heartbeats)."""
    text = str(error)
    if not isinstance(error, ValueError) or not text.startswith(
            ("Message contains an Error", "Expected one Message")):
        return None
    timeout = "the round timeout" if round_timeout is None else (
        f"the {round_timeout:g} s round timeout")
    if "Node Unavailable" in text:
        return ("its SuperNode stopped sending heartbeats (it stopped, crashed or lost "
                "the network)")
    if "Message Unavailable" in text or "got: 0" in text:  # TTL ran out, or no reply
        return f"sent no reply within {timeout}"
    return f"the node replied with an error: {text}"


def _reply_bytes(res: FitRes) -> int:
    """The size of a fit reply as protobuf, i.e. on the wire (plain FedAvg)."""
    return ClientMessage(fit_res=serde.fit_res_to_proto(res)).ByteSize()


def _masked_reply_bytes(res: FitRes, global_arrays: Arrays) -> int:
    """What one client sends in SecAgg+'s masked-vector stage: its reply without arrays (as
    protobuf), plus its masked model: int64 arrays of the model's shapes and its weight,
    as np.save bytes (secaggplus_mod). SecAgg+'s key-exchange messages are not counted."""
    shapes = [(1,), *(a.shape for a in global_arrays)]
    masked = sum(len(ndarray_to_bytes(np.zeros(shape, np.int64))) for shape in shapes)
    metadata = FitRes(res.status, Parameters([], ""), res.num_examples, res.metrics)
    return _reply_bytes(metadata) + masked


def _sample(client_manager: ClientManager, num_clients: int, min_clients: int,
            true_round: int) -> list[ClientProxy]:
    """The round's trainers: seeded by TimeoutClientManager, else Flower's random sample."""
    if isinstance(client_manager, TimeoutClientManager):
        return client_manager.sample_round(num_clients, min_clients, true_round)
    return client_manager.sample(num_clients=num_clients, min_num_clients=min_clients)


def _partition_of(client_manager: ClientManager | None, proxy: ClientProxy) -> int | None:
    """The partition a client said it trains (TimeoutClientManager), else None."""
    return getattr(client_manager, "partition", lambda _: None)(proxy)


class CheckedFedAvg(FedAvg):
    """FedAvg with validated updates, deterministic aggregation, results and resume.

    Rounds are numbered as in the whole run: after resuming from round r, Flower's round k
    is round r + k here, in the fit config sent to clients, in the log and in results.
    """

    def __init__(self, *, initial_arrays: Arrays, array_names: Sequence[str],
                 shard_sizes: Sequence[int], val_sizes: Sequence[int],
                 evaluate_fn: Callable[[Arrays], tuple[float, float]],
                 results: ResultsDir, total_rounds: int, min_clients: int,
                 fit_config: Mapping[str, Scalar], fraction_fit: float = 1.0,
                 records: Sequence[dict] = (), max_update_ratio: float = MAX_UPDATE_RATIO,
                 progress: Callable[[str], None] = print_progress,
                 run_config: Mapping | None = None,
                 round_timeout: float | None = None, seed: int = 0,
                 aggregation: str = "fedavg", trim_fraction: float = 0.0,
                 krum_malicious: int = 0, dp: privacy.DPConfig | None = None,
                 secagg_clipping_range: float | None = None,
                 server_optimizer: "ServerOptimizer | None" = None) -> None:
        """Args:
          initial_arrays: the global model to start from (round 0, or the resumed round).
          array_names: one name per array, for checkpoints and messages.
          shard_sizes, val_sizes: training / validation examples of each partition.
          evaluate_fn: centralized evaluation, arrays -> (loss, accuracy).
          results: where metrics and models go.
          total_rounds: the last round of the whole run (for the progress line).
          min_clients: clients needed to start a round (fit and evaluate).
          fit_config: sent to clients every round, plus "server_round".
          fraction_fit: fraction of connected clients that train each round.
          records: metric records of the rounds already done (when resuming).
          max_update_ratio: see validate_update.
          progress: receives one line per round.
          run_config: written to run_config.json when the run starts (None: not written).
          round_timeout: the server's --round-timeout, to tell a timeout from a crash.
          seed: the run's seed (DP-FedAvg's noise is drawn from [seed, round, 2]).
          aggregation, trim_fraction, krum_malicious: the rule (aggregation.aggregate).
          dp: DP-FedAvg's settings, or None for no differential privacy.
          secagg_clipping_range: not None: the rounds run under SecAgg+, whose clients clip
            every weight to +-this before masking (see _aggregate_secure).
          server_optimizer: takes the step from the aggregate to the new global model and
            keeps its state (server_optimizers.py); None: the aggregate itself (FedAvg).
        """
        super().__init__(
            # Wait for min_clients, train on fraction_fit of those connected (at least one),
            # evaluate on as many of whoever is still connected (configure_evaluate): a
            # round costs what its sampled clients cost, not what every client would.
            fraction_fit=fraction_fit, fraction_evaluate=fraction_fit,
            min_fit_clients=max(1, int(fraction_fit * min_clients)),
            min_evaluate_clients=max(1, int(fraction_fit * min_clients)),
            min_available_clients=min_clients,
            initial_parameters=ndarrays_to_parameters(initial_arrays))
        self.array_names = list(array_names)
        self.shard_sizes, self.val_sizes = list(shard_sizes), list(val_sizes)
        self.centralized_evaluate = evaluate_fn
        self.results = results
        self.total_rounds = total_rounds
        self.fit_config = dict(fit_config)
        self.records = list(records)
        self.max_update_ratio = max_update_ratio
        self.progress = progress
        self.offset = self.records[-1]["round"] if self.records else 0  # rounds already done
        self.run_config = run_config
        self.round_timeout = round_timeout
        self.secagg_clipping_range = secagg_clipping_range
        self.server_optimizer = server_optimizer
        self._global: Arrays = list(initial_arrays)
        self._round: dict = {}
        self._sampled: list[ClientProxy] = []
        self._client_manager: ClientManager | None = None
        # Client id -> the partition its replies named: on the App path the client manager
        # never asks (with fraction-fit 1), so this is how a lost node's partition is known.
        self._replied_partition: dict[str, int] = {}
        self._round_clock = 0.0
        self.seed = seed
        self.aggregation, self.trim_fraction = aggregation, trim_fraction
        self.krum_malicious = krum_malicious
        self.dp = dp

    def __repr__(self) -> str:
        return (f"CheckedFedAvg(min_clients={self.min_available_clients}, "
                f"fraction_fit={self.fraction_fit}, aggregation={self.aggregation!r}, "
                f"dp={self.dp})")

    # -- round 0 and centralized evaluation

    def evaluate(self, server_round: int,
                 parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Centralized evaluation of the global model on the server's test set."""
        if server_round == 0:
            # Flower calls this once the server is up (its port bound): only now may the
            # results directory change, so a server that fails to start leaves it alone.
            self.results.begin(self.run_config, clear=not self.records)
        if server_round == 0 and self.records:  # resumed (after round 0, too): recorded
            return None
        arrays = parameters_to_ndarrays(parameters)
        start = time.perf_counter()
        loss, accuracy = self.centralized_evaluate(arrays)
        self._global = arrays
        if server_round == 0:
            record = {"round": 0, "centralized_loss": loss, "centralized_accuracy": accuracy,
                      "clients_sampled": 0, "clients_fit": 0, "failures": 0,
                      "evaluate_failures": 0, "bytes_received": 0,
                      "round_seconds": round(time.perf_counter() - start, 3)}
            self._finish_round(record)
        else:
            self._round.update(centralized_loss=loss, centralized_accuracy=accuracy)
        return loss, {"accuracy": accuracy}

    # -- training

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Send every sampled client the global model and this round's settings."""
        true_round = self.offset + server_round
        if self.secagg_clipping_range is not None and not self._round:  # once, in round 1
            self._warn_secure_aggregation()
        self._global = parameters_to_ndarrays(parameters)
        sample_size, min_clients = self.num_fit_clients(client_manager.num_available())
        clients = _sample(client_manager, sample_size, min_clients, true_round)
        # The round's clock starts once its clients are there, not while waiting for them.
        self._round = {"round": true_round, "start": time.perf_counter(),
                       "clients_sampled": len(clients)}
        self._sampled, self._client_manager = list(clients), client_manager
        self._round_clock = time.monotonic()  # the clock of --round-timeout (see _lost_reason)
        fit_ins = FitIns(parameters, {**self.fit_config, "server_round": true_round})
        return [(client, fit_ins) for client in clients]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate each update, then FedAvg the accepted ones in partition order."""
        if self.secagg_clipping_range is not None:
            return self._aggregate_secure(server_round, results, failures)
        true_round = self.offset + server_round
        self._log_failures(true_round, "failed", results, failures)
        accepted: dict[int, tuple[Arrays, int, Mapping]] = {}
        rejected = 0
        for _, res in results:
            reason = self._check_fit_result(res, accepted)
            if reason is None:
                continue
            rejected += 1
            log(WARNING, "round %d: rejected update from partition %s: %s", true_round,
                res.metrics.get("partition", "?"), reason)
        self._round.update(
            clients_fit=len(accepted), failures=len(failures) + rejected,
            bytes_received=sum(  # the size of each reply as protobuf, i.e. on the wire
                _reply_bytes(res)
                for _, res in results + [f for f in failures if isinstance(f, tuple)]))
        ordered = [accepted[p] for p in sorted(accepted)]
        self._round.update(rounds.train_metrics([(n, m) for _, n, m in ordered]))
        if not ordered:
            log(WARNING, "round %d: no valid update; the global model stays as it was", true_round)
            return None, {}
        aggregated = self._aggregate([(arrays, n) for arrays, n, _ in ordered], true_round)
        new_global = self._server_step(aggregated)
        return ndarrays_to_parameters(new_global), {
            "train_loss": self._round["train_loss"],
            "train_accuracy": self._round["train_accuracy"]}

    def _aggregate(self, updates: list[tuple[Arrays, int]], true_round: int) -> Arrays:
        """The aggregate of the accepted updates (in partition order): rounds.py."""
        aggregated, stats = rounds.aggregate_updates(
            self._global, updates, server_round=true_round, seed=self.seed,
            aggregation=self.aggregation, trim_fraction=self.trim_fraction,
            krum_malicious=self.krum_malicious, dp=self.dp,
            num_sampled=self._round["clients_sampled"] if self.dp is not None else None)
        self._round.update(stats)
        return aggregated

    def _server_step(self, aggregated: Arrays) -> Arrays:
        """The server optimizer's step from this round's global model (FedAvg: the aggregate)."""
        if self.server_optimizer is None:
            return aggregated
        return self.server_optimizer.step(self._global, aggregated)

    def _check_fit_result(self, res: FitRes, accepted: dict) -> str | None:
        """Add a valid result to `accepted` (keyed by partition); else return why not."""
        try:
            arrays = parameters_to_ndarrays(res.parameters)
        except Exception as e:  # pylint: disable=broad-except  # any garbage bytes
            return f"arrays cannot be decoded ({type(e).__name__}: {e})"
        reason = validate_update(arrays, res.num_examples, res.metrics, self._global,
                                 self.shard_sizes, self.max_update_ratio, self.array_names)
        if reason is None and res.metrics["partition"] in accepted:
            reason = "another client already sent an update for this partition this round"
        if reason is None:
            accepted[res.metrics["partition"]] = (arrays, res.num_examples, res.metrics)
        return reason

    # -- training under secure aggregation (SecAgg+)

    def _warn_secure_aggregation(self) -> None:
        """Say, once per run, what the server can no longer check under SecAgg+."""
        log(WARNING, "SecAgg+ is on: the server sees only the clients' weighted average, so "
            "per-client update validation and robust aggregation are off (a bad update "
            "cannot be detected or left out). Honest clients clip every weight to +-%g "
            "before masking, which bounds a buggy client; a client running modified code "
            "is not bound by it. The server still checks the average: array count, shapes, "
            "finite values, distance from the global model.", self.secagg_clipping_range)

    def _aggregate_secure(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                          failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Accept SecAgg+'s average after the checks that are left; record the round.

        Flower's SecAggPlusWorkflow calls this once it has unmasked the sum: `results` are
        the clients whose masked models are in it, and every one of them carries the same
        parameters, the average sum_k n_k w_k / sum_k n_k (float64, dequantized). Their
        num_examples and metrics are their own (SecAgg+ masks only the arrays). `failures`
        holds an error for each client that dropped out, at any stage, but Flower 1.41 and 1.42
        reports a dropout in the masked-model stage twice, and one in the unmask stage,
        whose model is in the average, too: so the round's failures are the sampled
        clients whose model is not in the average.
        """
        true_round = self.offset + server_round
        for reason in dict.fromkeys(map(_failure_reason, failures)):  # each reason once
            log(WARNING, "round %d: a client dropped out of SecAgg+: %s", true_round, reason)
        replies = [res for _, res in results]
        self._round.update(
            clients_fit=len(replies), failures=self._round["clients_sampled"] - len(replies),
            bytes_received=sum(_masked_reply_bytes(res, self._global) for res in replies),
            **rounds.train_metrics([(r.num_examples, r.metrics) for r in replies]))
        if not replies:
            log(WARNING, "round %d: no masked model; the global model stays as it was",
                true_round)
            return None, {}
        # The same float32 arrays FedAvg would give (arrays too large for float32 become Inf).
        average = [a.astype(np.float32) for a in parameters_to_ndarrays(replies[0].parameters)]
        reason = validate_arrays(average, self._global, self.max_update_ratio, self.array_names)
        if reason is not None:
            log(WARNING, "round %d: rejected the securely aggregated model: %s; the global "
                "model stays as it was", true_round, reason)
            return None, {}
        largest = max(float(np.abs(a).max(initial=0.0)) for a in average)
        if largest > self.secagg_clipping_range / 2:  # honest weights may soon be clipped
            log(WARNING, "round %d: the largest weight, %.3g, is over half of SecAgg+'s "
                "clipping range %g; raise clipping-range", true_round, largest,
                self.secagg_clipping_range)
        return ndarrays_to_parameters(self._server_step(average)), {
            "train_loss": self._round["train_loss"],
            "train_accuracy": self._round["train_accuracy"]}

    def record_unaggregated_round(self) -> None:
        """Record the fit of a round that ended without aggregate_fit (SecAgg+ gave up: too
        few clients left to unmask the sum); every sampled client counts as failed."""
        if not self._round or "clients_fit" in self._round:
            return
        log(WARNING, "round %d: SecAgg+ stopped (too few clients left to unmask the sum); "
            "the global model stays as it was", self._round["round"])
        self._round.update(clients_fit=0, failures=self._round["clients_sampled"],
                           bytes_received=0, train_loss=None, train_accuracy=None)

    # -- federated evaluation, end of round

    def _log_failures(self, true_round: int, what: str, results: list,
                      failures: list) -> None:
        """One warning per failed client, naming its partition and timeout vs. crash."""
        for proxy, res in results:
            partition = res.metrics.get("partition")
            if proxy is not None and isinstance(partition, int) and not isinstance(
                    partition, bool):
                self._replied_partition[proxy.cid] = partition
        answered = {id(f[0]) for f in results + failures if isinstance(f, tuple)}
        lost = [c for c in self._sampled if id(c) not in answered]
        errors = [f for f in failures if isinstance(f, BaseException)]
        # The App path's errors say why, but not whose: one cause for all lost nodes is
        # only known when their errors agree.
        app_causes = {_app_failure_cause(e, self.round_timeout) for e in errors}
        app_cause = app_causes.pop() if len(app_causes) == 1 else None
        for failure in failures:
            if isinstance(failure, tuple) or len(lost) != len(errors):
                log(WARNING, "round %d: a client %s: %s", true_round, what,
                    _failure_reason(failure))
        if len(lost) == len(errors):
            for proxy in lost:
                partition = _partition_of(self._client_manager, proxy)
                if partition is None:
                    partition = self._replied_partition.get(proxy.cid)
                if app_cause is None:
                    log(WARNING, "round %d: partition %s %s: %s", true_round, partition,
                        what, self._lost_reason(proxy))
                else:
                    log(WARNING, "round %d: partition %s (node %s) %s: %s", true_round,
                        "unknown" if partition is None else partition, proxy.cid, what,
                        app_cause)

    def _lost_reason(self, proxy: ClientProxy) -> str:
        """Why a client sent nothing: it timed out, or its connection closed earlier."""
        left_at = getattr(self._client_manager, "left_at", lambda _: None)(proxy)
        if (left_at is not None and self.round_timeout is not None
                and left_at - self._round_clock >= self.round_timeout):
            return (f"no answer within --round-timeout ({self.round_timeout:g} s); "
                    "the server closed its connection")
        return "connection closed (the client stopped or crashed)"

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Ask the clients still connected (fraction_fit of them, seeded) to evaluate the new
        model on their validation split.

        This does not wait for --min-clients: the round has aggregated, and it is
        recorded with whoever is left. Partitions without validation examples are not
        asked; if nobody is asked, the round is recorded here (Flower then skips
        aggregate_evaluate).
        """
        clients = [c for c in client_manager.all().values()
                   if self._has_validation(_partition_of(client_manager, c))]
        if isinstance(client_manager, TimeoutClientManager):  # the seeded fraction of them
            clients = client_manager.pick(clients, self.num_evaluation_clients(len(clients))[0],
                                          self.offset + server_round, purpose=1)
        self._sampled, self._client_manager = clients, client_manager
        self._round_clock = time.monotonic()
        if not clients:
            self._finish_round(dict(self._round, federated_loss=None, federated_accuracy=None,
                                    evaluate_failures=0))
            return []
        evaluate_ins = EvaluateIns(parameters, {"server_round": self.offset + server_round})
        return [(client, evaluate_ins) for client in clients]

    def _has_validation(self, partition: int | None) -> bool:
        """Whether a partition has validation examples (unknown partitions: assume so)."""
        return partition is None or not 0 <= partition < len(self.val_sizes) or (
            self.val_sizes[partition] > 0)

    def aggregate_evaluate(self, server_round: int,
                           results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list) -> tuple[float | None, dict[str, Scalar]]:
        """Average validation loss/accuracy by examples, then record and save the round."""
        true_round = self.offset + server_round
        valid = {}
        self._log_failures(true_round, "failed to evaluate", results, failures)
        for _, res in results:
            reason = validate_evaluation(res.loss, res.num_examples, res.metrics, self.val_sizes)
            if reason is None and res.metrics["partition"] in valid:
                reason = "another client already evaluated this partition this round"
            if reason is not None:
                log(WARNING, "round %d: ignored evaluation from partition %s: %s", true_round,
                    res.metrics.get("partition", "?"), reason)
                continue
            valid[res.metrics["partition"]] = res
        ordered = [valid[p] for p in sorted(valid)]
        metrics = rounds.evaluation_metrics([(r.loss, r.num_examples, r.metrics)
                                             for r in ordered])
        self._finish_round(dict(self._round, **metrics,
                                evaluate_failures=len(failures) + len(results) - len(ordered)))
        loss, accuracy = metrics["federated_loss"], metrics["federated_accuracy"]
        return loss, ({} if accuracy is None else {"accuracy": accuracy})

    def _finish_round(self, record: dict) -> None:
        """Append the round's record, save model + metrics, print the progress line."""
        if "start" in record:
            record["round_seconds"] = round(time.perf_counter() - record.pop("start"), 3)
        if self.dp is not None:  # the privacy spent after this many rounds of the run
            record.update(privacy.spent(self.dp, self.fraction_fit, record["round"]))
        self.records.append(record)
        server_state = None if self.server_optimizer is None else (
            self.server_optimizer.state_arrays())
        self.results.save_round(self.records, self._global, server_state)
        self.progress(progress_line(record, self.total_rounds))


def progress_line(record: Mapping, total_rounds: int) -> str:
    """E.g. 'round 1/5  accuracy 91.23%  loss 0.2871  clients 10/10  failures 0  (12.3 s)'."""
    head = (f"round {record['round']}/{total_rounds}  "
            f"accuracy {100 * record['centralized_accuracy']:5.2f}%  "
            f"loss {record['centralized_loss']:.4f}")
    if record["round"] == 0:
        return f"{head}  (initial global model)"
    privacy_spent = ("" if record.get("epsilon") is None
                     else f"  ε {record['epsilon']:.2f}")
    return (f"{head}  clients {record['clients_fit']}/{record['clients_sampled']}  "
            f"failures {record['failures']}{privacy_spent}  ({record['round_seconds']:.1f} s)")
