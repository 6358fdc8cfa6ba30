"""FedAvg (McMahan et al. 2017) as a Flower strategy that checks every update and keeps a
crash-safe record of the run.

FedAvg ("Communication-Efficient Learning of Deep Networks from Decentralized Data") sets
the new global model to the average of the clients' models, each weighted by the number
of examples it trained on: w = sum_k (n_k / n) w_k. Flower's stock FedAvg does exactly
that with whatever comes back. A server that runs for a long time against processes it
does not control needs a little more, and it lives here, free of JAX and of any CLI, so
that server.py (flwr.server.start_server) and a later ServerApp can share it:

1. Validation (replies.py, validation.py): an update with the wrong arrays, NaN/Inf, an
   absurd norm or an impossible example count is rejected with a logged reason and
   counted as a failure.
2. Determinism: accepted updates are sorted by partition and summed in float64, so the
   same updates give the same global model bit for bit, in whatever order they arrive.
3. Results (run_record.py, results.py): after every round the global model and the
   metrics are written atomically to the results directory, which is also the checkpoint a
   stopped run resumes from.
4. Liveness (client_manager.py): a client manager that admits only clients that say
   which partition they train, and gives up after a timeout instead of Flower's 24 h.
   --min-clients decides when a round may start; a round that has started is recorded
   and saved with whichever clients are left (evaluation does not wait for more).
   Who is asked: sampling.py; a warning naming each client that failed: failures.py.
5. The rule (rounds.py, with aggregation.py and privacy.py): FedAvg by default; a
   robust rule (median, trimmed mean, Krum) against poisoning clients; or DP-FedAvg
   (clip, average, add seeded Gaussian noise), with the privacy spent so far (ε) in every
   round's record.

Under secure aggregation (SecAgg+, server_app.py with `secagg = true`) the server sees only
the clients' weighted average, so validation shrinks to checks on that average
(secure_aggregation.py). Determinism still holds on the server, whose masked sum is integer
arithmetic, but SecAgg+'s clients round their weights stochastically (NumPy's unseeded
global generator, in Flower's quantize), so two such runs differ within the quantization
error.
"""

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from flwr.common import (EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar,
                         ndarrays_to_parameters, parameters_to_ndarrays)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from federation import privacy, replies, rounds, sampling, secure_aggregation
from federation.aggregation import Arrays
from federation.failures import FailureLog
from federation.results import ResultsDir
from federation.run_record import RunRecord, initial_record, print_progress
from federation.validation import MAX_UPDATE_RATIO

if TYPE_CHECKING:  # server_optimizers.py needs JAX; this file does not
    from federation.server_optimizers import ServerOptimizer


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
                 run_config: Mapping | None = None, round_timeout: float | None = None,
                 seed: int = 0, aggregation: str = "fedavg", trim_fraction: float = 0.0,
                 krum_malicious: int = 0, dp: privacy.DPConfig | None = None,
                 secagg_clipping_range: float | None = None,
                 server_optimizer: "ServerOptimizer | None" = None) -> None:
        """Args:
          initial_arrays, array_names: the global model to start from (round 0, or the
            resumed round) and one name per array, for checkpoints and messages.
          shard_sizes, val_sizes: training / validation examples of each partition.
          evaluate_fn: centralized evaluation, arrays -> (loss, accuracy).
          results, total_rounds, records, run_config, progress: see run_record.RunRecord.
          min_clients, fraction_fit: clients needed to start a round (fit and evaluate),
            and the fraction of those connected that train each round.
          fit_config: sent to clients every round, plus "server_round".
          max_update_ratio, round_timeout: see validate_update and failures.FailureLog.
          seed, aggregation, trim_fraction, krum_malicious, dp: the rule, or DP-FedAvg
            (dp not None), as in rounds.aggregate_updates.
          secagg_clipping_range: not None: SecAgg+'s (see secure_aggregation.py).
          server_optimizer: the step from the aggregate to the new global model, with its
            state (server_optimizers.py); None: the aggregate itself (FedAvg).
        """
        # Wait for min_clients, train on fraction_fit of those connected (at least one),
        # evaluate as many of those still connected: a round costs what its clients cost.
        sampled = max(1, int(fraction_fit * min_clients))
        super().__init__(
            fraction_fit=fraction_fit, fraction_evaluate=fraction_fit, min_fit_clients=sampled,
            min_evaluate_clients=sampled, min_available_clients=min_clients,
            initial_parameters=ndarrays_to_parameters(initial_arrays))
        self.array_names, self.centralized_evaluate = list(array_names), evaluate_fn
        self.shard_sizes, self.val_sizes = list(shard_sizes), list(val_sizes)
        self.fit_config, self.run_config = dict(fit_config), run_config
        self.run = RunRecord(results, total_rounds, records=records, run_config=run_config,
                             progress=progress, dp=dp, fraction_fit=fraction_fit,
                             server_optimizer=server_optimizer)
        self.records, self.offset = self.run.records, self.run.offset  # the same list
        self.max_update_ratio, self.aggregation, self.dp = max_update_ratio, aggregation, dp
        self.rule = functools.partial(  # the round's aggregate: FedAvg, a robust rule, DP
            rounds.aggregate_updates, seed=seed, aggregation=aggregation,
            trim_fraction=trim_fraction, krum_malicious=krum_malicious, dp=dp)
        self.secagg_clipping_range, self.server_optimizer = secagg_clipping_range, server_optimizer
        self.failure_log = FailureLog(round_timeout)  # who was asked; why they failed
        self._global: Arrays = list(initial_arrays)
        self.round_record: dict = {}  # the round in progress (none yet)

    def __repr__(self) -> str:
        return (f"CheckedFedAvg(min_clients={self.min_available_clients}, fraction_fit="
                f"{self.fraction_fit}, aggregation={self.aggregation!r}, dp={self.dp})")

    def evaluate(self, server_round: int,
                 parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Centralized evaluation of the global model on the server's test set."""
        if server_round == 0:
            self.run.begin()  # the server is up: see RunRecord.begin
            if self.records:  # resumed (after round 0, too): recorded
                return None
        self._global, start = parameters_to_ndarrays(parameters), time.perf_counter()
        loss, accuracy = self.centralized_evaluate(self._global)
        if server_round == 0:
            self.run.finish(initial_record(loss, accuracy, time.perf_counter() - start),
                            self._global)
        else:
            self.round_record.update(centralized_loss=loss, centralized_accuracy=accuracy)
        return loss, {"accuracy": accuracy}

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Send every sampled client the global model and this round's settings."""
        true_round = self.offset + server_round
        if self.secagg_clipping_range is not None and not self.round_record:  # once, in round 1
            secure_aggregation.warn_secure_aggregation(self.secagg_clipping_range)
        self._global = parameters_to_ndarrays(parameters)
        clients = sampling.trainers(client_manager, self.num_fit_clients, true_round)
        self.round_record = {"round": true_round, "start": time.perf_counter(),  # clients
                             "clients_sampled": len(clients)}  # there: the clock starts
        self.failure_log.asked(clients, client_manager)  # and --round-timeout's clock
        fit_ins = FitIns(parameters, {**self.fit_config, "server_round": true_round})
        return [(client, fit_ins) for client in clients]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate each update, then FedAvg the accepted ones in partition order."""
        true_round = self.offset + server_round
        if self.secagg_clipping_range is not None:  # SecAgg+: only the average to check
            average, stats = secure_aggregation.checked_average(
                true_round, results, failures, self.round_record["clients_sampled"], self._global,
                self.secagg_clipping_range, self.max_update_ratio, self.array_names, self.dp,
                self.rule.keywords["seed"])  # with DP, the noise goes on the unmasked sum
            self.round_record.update(stats)
            return self._new_global(average)
        self.failure_log.log(true_round, "failed", results, failures)
        ordered, rejected = replies.accepted_updates(
            true_round, results, self._global, self.shard_sizes, self.max_update_ratio,
            self.array_names)
        self.round_record.update(replies.fit_counts(results, failures, ordered, rejected))
        if not ordered:  # replies.accepted_updates said so
            return None, {}
        aggregated, stats = self.rule(
            self._global, [(arrays, n) for arrays, n, _ in ordered], server_round=true_round,
            num_sampled=self.round_record["clients_sampled"] if self.dp is not None else None)
        self.round_record.update(stats)
        return self._new_global(aggregated)

    def _new_global(self, aggregate: Arrays | None) -> tuple[Parameters | None, dict]:
        """The server optimizer's step from the global model (FedAvg: to the aggregate)."""
        if aggregate is None:  # nothing accepted: the global model stays as it was
            return None, {}
        if self.server_optimizer is not None:
            aggregate = self.server_optimizer.step(self._global, aggregate)
        train = ("train_loss", "train_accuracy")  # Flower logs them in its History
        return ndarrays_to_parameters(aggregate), {k: self.round_record[k] for k in train}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Ask the clients still connected (fraction_fit of them, seeded) to evaluate the new
        model on their validation split (sampling.evaluators). If nobody is asked, the round
        is recorded here (Flower then skips aggregate_evaluate)."""
        clients = sampling.evaluators(client_manager, self.val_sizes,
                                      lambda n: self.num_evaluation_clients(n)[0],
                                      self.offset + server_round)
        self.failure_log.asked(clients, client_manager)
        if not clients:
            self.run.finish(dict(self.round_record, federated_loss=None,
                                 federated_accuracy=None, evaluate_failures=0), self._global)
            return []
        evaluate_ins = EvaluateIns(parameters, {"server_round": self.offset + server_round})
        return [(client, evaluate_ins) for client in clients]

    def aggregate_evaluate(self, server_round: int,
                           results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list) -> tuple[float | None, dict[str, Scalar]]:
        """Average validation loss/accuracy by examples, then record and save the round."""
        true_round = self.offset + server_round
        self.failure_log.log(true_round, "failed to evaluate", results, failures)
        metrics = replies.evaluation_counts(true_round, results, failures, self.val_sizes)
        self.run.finish(dict(self.round_record, **metrics), self._global)
        loss, accuracy = metrics["federated_loss"], metrics["federated_accuracy"]
        return loss, ({} if accuracy is None else {"accuracy": accuracy})
