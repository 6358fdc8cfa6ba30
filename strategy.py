"""FedAvg (McMahan et al. 2017) as a Flower strategy that checks every update and keeps a
crash-safe record of the run.

FedAvg ("Communication-Efficient Learning of Deep Networks from Decentralized Data") sets
the new global model to the average of the clients' models, each weighted by the number
of examples it trained on: w = sum_k (n_k / n) w_k. Flower's stock FedAvg does exactly
that with whatever comes back. A server that runs for a long time against processes it
does not control needs a little more, and it lives here, free of JAX and of any CLI, so
that server.py (flwr.server.start_server) and a later ServerApp can share it:

1. Validation: an update with the wrong arrays, NaN/Inf, an absurd norm or an impossible
   example count is rejected with a logged reason and counted as a failure.
2. Determinism: accepted updates are sorted by partition and summed in float64, so the
   same updates give the same global model bit for bit, in whatever order they arrive.
3. Results: after every round the global model and the metrics are written atomically to
   the results directory, which is also the checkpoint a stopped run resumes from.
4. Liveness: a client manager that gives up after a timeout instead of Flower's 24 h.
"""

import csv
import io
import json
import math
import os
import pathlib
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    log,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
    serde,
)
from flwr.proto.transport_pb2 import ClientMessage  # pylint: disable=no-name-in-module
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import FedAvg

Arrays = list[np.ndarray]
Update = tuple[Arrays, int]  # (model arrays, number of training examples)

# An update further than this many times the global model's norm from the global model is
# not training, it is a bug or an attack. Honest local training moves the model by a
# fraction of its norm per round, so the threshold is generous.
MAX_UPDATE_RATIO = 100.0

# Columns of metrics.json records and metrics.csv, in order.
METRIC_FIELDS = (
    "round", "centralized_loss", "centralized_accuracy", "federated_loss",
    "federated_accuracy", "train_loss", "train_accuracy", "clients_sampled", "clients_fit",
    "failures", "evaluate_failures", "round_seconds", "bytes_received")

# run_config.json keys that define the computation: a resumed run must match them all.
# Everything else may change on --resume: --rounds (to extend a run), --min-clients and
# --round-timeout (liveness policy), --address, --certificates and the directory paths.
RESUME_MUST_MATCH = ("seed", "fraction_fit", "local_epochs", "batch_size", "learning_rate",
                     "manifest_sha256", "model")


# ------------------------------------------------------------------ aggregation (pure)

def fedavg(updates: Sequence[Update]) -> Arrays:
    """FedAvg's rule, sum_k n_k w_k / sum_k n_k, accumulated in float64, returned as float32.

    Summing in float64 in the caller's order makes the result independent of float32
    rounding order; the caller sorts updates (by partition) to make it reproducible.
    """
    total = sum(n for _, n in updates)
    if not updates or total <= 0:
        raise ValueError("fedavg needs at least one update with num_examples > 0")
    averaged = []
    for layer in zip(*(arrays for arrays, _ in updates)):
        acc = np.zeros(layer[0].shape, np.float64)
        for array, (_, n) in zip(layer, updates):
            acc += n * array.astype(np.float64)
        averaged.append((acc / total).astype(np.float32))
    return averaged


def weighted_mean(values: Sequence[tuple[float, int]]) -> float | None:
    """Mean of values weighted by example counts; None for no values.

    math.fsum is exactly rounded, so the result does not depend on the order of values.
    """
    total = sum(n for _, n in values)
    if total <= 0:
        return None
    return math.fsum(float(v) * n for v, n in values) / total


def global_norm(arrays: Arrays) -> float:
    """L2 norm of all arrays taken together, in float64."""
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


# ------------------------------------------------------------------- validation (pure)

def _partition_index(metrics: Mapping[str, Scalar], num_partitions: int) -> int | str:
    """The partition index a client reported, or the reason it is unusable."""
    p = metrics.get("partition")
    if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < num_partitions:
        return f"partition {p!r} is not one of 0..{num_partitions - 1}"
    return p


def validate_update(arrays: Arrays, num_examples: int, metrics: Mapping[str, Scalar],
                    global_arrays: Arrays, shard_sizes: Sequence[int],
                    max_update_ratio: float = MAX_UPDATE_RATIO,
                    names: Sequence[str] | None = None) -> str | None:
    """Why a client's fit result must not be averaged in, or None if it is acceptable.

    Args:
      arrays, num_examples, metrics: what the client sent back from fit.
      global_arrays: the global model the client was asked to train (the reference for
        shapes, dtypes and the update norm).
      shard_sizes: training examples per partition, from the data manifest; a client may
        not claim more examples than its partition holds.
      max_update_ratio: reject ||update - global|| > ratio * max(||global||, 1).
      names: array names for messages (default: the array's index).
    Returns:
      A one-line reason, or None.
    """
    if "error" in metrics:
        return f"client error: {metrics['error']}"
    partition = _partition_index(metrics, len(shard_sizes))
    if isinstance(partition, str):
        return partition
    if not isinstance(num_examples, int) or num_examples <= 0:
        return f"num_examples {num_examples} is not positive"
    if num_examples > shard_sizes[partition]:
        return (f"num_examples {num_examples} exceeds the {shard_sizes[partition]} training "
                f"examples of partition {partition}")
    if len(arrays) != len(global_arrays):
        return f"{len(arrays)} arrays, expected {len(global_arrays)}"
    names = names or [f"array {i}" for i in range(len(arrays))]
    for name, a, g in zip(names, arrays, global_arrays):
        if a.shape != g.shape or a.dtype != g.dtype:
            return f"{name} is {a.dtype} {a.shape}, expected {g.dtype} {g.shape}"
    for name, a in zip(names, arrays):
        if not np.isfinite(a).all():
            return f"{name} contains NaN or Inf"
    delta = global_norm([a.astype(np.float64) - g for a, g in zip(arrays, global_arrays)])
    reference = max(global_norm(global_arrays), 1.0)
    if delta > max_update_ratio * reference:
        return (f"update norm {delta:.3g} is more than {max_update_ratio:g}x the global "
                f"model's norm {reference:.3g}")
    return None


def validate_evaluation(loss: float, num_examples: int, metrics: Mapping[str, Scalar],
                        val_sizes: Sequence[int]) -> str | None:
    """Why a client's evaluate result must not be averaged in, or None."""
    if "error" in metrics:
        return f"client error: {metrics['error']}"
    partition = _partition_index(metrics, len(val_sizes))
    if isinstance(partition, str):
        return partition
    if not isinstance(num_examples, int) or not 0 < num_examples <= val_sizes[partition]:
        return (f"num_examples {num_examples} is not in 1..{val_sizes[partition]} "
                f"(partition {partition}'s validation split)")
    accuracy = metrics.get("accuracy")
    if not isinstance(accuracy, float | int) or not 0.0 <= accuracy <= 1.0:
        return f"accuracy {accuracy!r} is not in [0, 1]"
    if not math.isfinite(loss):
        return f"loss {loss} is not finite"
    return None


def resume_mismatch(saved: Mapping, current: Mapping) -> str | None:
    """The first setting that differs between a saved run_config and this run's, or None."""
    for key in RESUME_MUST_MATCH:
        if saved.get(key) != current.get(key):
            return f"{key} was {saved.get(key)!r}, now {current.get(key)!r}"
    return None


# ------------------------------------------------------------- results directory (I/O)

def _write_atomic(path: pathlib.Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through `write(file)` to a temp file next to path, then os.replace it.

    A reader (or a crash) sees the old file or the new one, never half of one.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _finite_or_none(value: object) -> object:
    """JSON has no NaN/Inf: a diverged loss is recorded as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def metrics_csv(records: Sequence[Mapping]) -> str:
    """The records as CSV with METRIC_FIELDS columns; None becomes an empty cell."""
    out = io.StringIO()
    writer = csv.DictWriter(out, METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if record.get(k) is None else record[k] for k in METRIC_FIELDS})
    return out.getvalue()


class ResultsDir:
    """metrics.json/.csv, run_config.json and model_round_<r>.npz in one directory.

    The model file of a round is written before metrics.json, so metrics.json is the
    commit point: a round listed there always has its model on disk.
    """

    def __init__(self, root: str | os.PathLike, array_names: Sequence[str]) -> None:
        self.root = pathlib.Path(root)
        self.array_names = list(array_names)

    def model_path(self, server_round: int) -> pathlib.Path:
        """Where the global model after `server_round` is saved."""
        return self.root / f"model_round_{server_round}.npz"

    def clear(self) -> None:
        """Remove the files a previous run left (only the ones this class writes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        stale = [self.root / n for n in ("metrics.json", "metrics.csv", "run_config.json",
                                         "global_model.npz")]
        for path in stale + list(self.root.glob("model_round_*.npz")):
            path.unlink(missing_ok=True)

    def write_config(self, config: Mapping) -> None:
        """Write run_config.json."""
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(config, indent=2) + "\n"
        _write_atomic(self.root / "run_config.json", lambda f: f.write(text.encode()))

    def save_round(self, records: Sequence[Mapping], arrays: Arrays) -> None:
        """Save the global model after the last record's round, then the metrics."""
        server_round = records[-1]["round"]
        named = dict(zip(self.array_names, arrays, strict=True))
        self.root.mkdir(parents=True, exist_ok=True)
        for path in (self.model_path(server_round), self.root / "global_model.npz"):
            _write_atomic(path, lambda f: np.savez(f, **named))
        clean = [{k: _finite_or_none(r.get(k)) for k in METRIC_FIELDS} for r in records]
        text = json.dumps(clean, indent=2) + "\n"
        _write_atomic(self.root / "metrics.csv", lambda f: f.write(metrics_csv(clean).encode()))
        _write_atomic(self.root / "metrics.json", lambda f: f.write(text.encode()))

    def load_arrays(self, path: pathlib.Path) -> Arrays:
        """Arrays of a saved model, in array_names order."""
        with np.load(path, allow_pickle=False) as npz:
            if sorted(npz.files) != sorted(self.array_names):
                raise ValueError(f"{path} holds {sorted(npz.files)}, expected {self.array_names}")
            return [npz[name] for name in self.array_names]

    def load_checkpoint(self) -> tuple[dict, list[dict], Arrays]:
        """(run_config, metric records, global model after the last recorded round).

        Raises ValueError with a one-line message if there is nothing usable to resume.
        """
        try:
            config = json.loads((self.root / "run_config.json").read_text())
            records = json.loads((self.root / "metrics.json").read_text())
            last = records[-1]["round"]
            return config, records, self.load_arrays(self.model_path(last))
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"nothing to resume in {self.root}: {e}") from e


# --------------------------------------------------------------------- client manager

class NotEnoughClients(RuntimeError):
    """Fewer clients than needed stayed connected for longer than the timeout."""


class TimeoutClientManager(SimpleClientManager):
    """Flower's SimpleClientManager, but waiting at most `timeout` s (not 24 h) for clients.

    sample() raises NotEnoughClients instead of blocking a day or silently returning no
    clients, so a server whose clients are gone stops with a clear message.
    """

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def wait_for(self, num_clients: int, timeout: float | None = None) -> bool:
        """Wait until num_clients are connected; log the count while waiting."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        logged = -1
        with self._cv:
            while len(self.clients) < num_clients:
                if len(self.clients) != logged:
                    logged = len(self.clients)
                    log(INFO, "waiting for clients: %d of %d connected", logged, num_clients)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cv.wait(timeout=remaining)
            return True

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Criterion | None = None) -> list[ClientProxy]:
        """Sample clients uniformly (Flower's unseeded random.sample), at least min_num_clients."""
        needed = num_clients if min_num_clients is None else min_num_clients
        if not self.wait_for(needed):
            raise NotEnoughClients(
                f"only {len(self.clients)} of the {needed} clients needed are connected after "
                f"waiting {self.timeout:g} s (see --min-clients, --round-timeout)")
        # A client may leave between the wait and here: sample what is still connected.
        clients = super().sample(min(num_clients, len(self.clients)), 0, criterion)
        if len(clients) < needed:
            raise NotEnoughClients(f"only {len(clients)} of the {needed} clients needed are "
                                   "connected")
        return clients

    def disconnect_all(self) -> None:
        """Close every client's gRPC stream (so no server thread waits on it forever)."""
        for proxy in list(self.clients.values()):
            bridge = getattr(proxy, "bridge", None)  # grpc-bidi ClientProxy only
            if bridge is not None:
                bridge.close()


# ---------------------------------------------------------------------------- strategy

def print_progress(line: str) -> None:
    """The default progress sink: one line on stdout, flushed so pipes see it at once."""
    print(line, flush=True)


def _failure_reason(failure: tuple[ClientProxy, FitRes | EvaluateRes] | BaseException) -> str:
    """A readable reason for something Flower put in `failures`."""
    if isinstance(failure, BaseException):
        if type(failure).__name__ == "GrpcBridgeClosed":
            return "connection closed (client stopped, crashed or exceeded --round-timeout)"
        return f"{type(failure).__name__}: {failure}"
    return f"status {failure[1].status.code.name}: {failure[1].status.message}"


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
                 progress: Callable[[str], None] = print_progress) -> None:
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
        """
        super().__init__(
            # Wait for min_clients, train on fraction_fit of those connected (at least one),
            # evaluate on all of them.
            fraction_fit=fraction_fit, fraction_evaluate=1.0,
            min_fit_clients=max(1, int(fraction_fit * min_clients)),
            min_evaluate_clients=min_clients, min_available_clients=min_clients,
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
        self._global: Arrays = list(initial_arrays)
        self._round: dict = {}

    def __repr__(self) -> str:
        return (f"CheckedFedAvg(min_clients={self.min_available_clients}, "
                f"fraction_fit={self.fraction_fit})")

    # -- round 0 and centralized evaluation

    def evaluate(self, server_round: int,
                 parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Centralized evaluation of the global model on the server's test set."""
        if server_round == 0 and self.offset:
            log(INFO, "resuming after round %d: Flower's [ROUND k] below is round %d + k",
                self.offset, self.offset)
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
        self._global = parameters_to_ndarrays(parameters)
        sample_size, min_clients = self.num_fit_clients(client_manager.num_available())
        clients = client_manager.sample(num_clients=sample_size, min_num_clients=min_clients)
        # The round's clock starts once its clients are there, not while waiting for them.
        self._round = {"round": true_round, "start": time.perf_counter(),
                       "clients_sampled": len(clients)}
        fit_ins = FitIns(parameters, {**self.fit_config, "server_round": true_round})
        return [(client, fit_ins) for client in clients]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate each update, then FedAvg the accepted ones in partition order."""
        true_round = self.offset + server_round
        for failure in failures:
            log(WARNING, "round %d: a client failed: %s", true_round, _failure_reason(failure))
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
                ClientMessage(fit_res=serde.fit_res_to_proto(res)).ByteSize()
                for _, res in results + [f for f in failures if isinstance(f, tuple)]))
        ordered = [accepted[p] for p in sorted(accepted)]
        self._round.update(
            train_loss=weighted_mean([(m.get("train_loss", math.nan), n) for _, n, m in ordered]),
            train_accuracy=weighted_mean([(m.get("train_accuracy", math.nan), n)
                                          for _, n, m in ordered]))
        if not ordered:
            log(WARNING, "round %d: no valid update; the global model stays as it was", true_round)
            return None, {}
        aggregated = fedavg([(arrays, n) for arrays, n, _ in ordered])
        return ndarrays_to_parameters(aggregated), {
            "train_loss": self._round["train_loss"],
            "train_accuracy": self._round["train_accuracy"]}

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

    # -- federated evaluation, end of round

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Ask every connected client to evaluate the new global model on its validation split."""
        sample_size, min_clients = self.num_evaluation_clients(client_manager.num_available())
        clients = client_manager.sample(num_clients=sample_size, min_num_clients=min_clients)
        evaluate_ins = EvaluateIns(parameters, {"server_round": self.offset + server_round})
        return [(client, evaluate_ins) for client in clients]

    def aggregate_evaluate(self, server_round: int,
                           results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list) -> tuple[float | None, dict[str, Scalar]]:
        """Average validation loss/accuracy by examples, then record and save the round."""
        true_round = self.offset + server_round
        valid = {}
        for failure in failures:
            log(WARNING, "round %d: a client failed to evaluate: %s", true_round,
                _failure_reason(failure))
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
        loss = weighted_mean([(r.loss, r.num_examples) for r in ordered])
        accuracy = weighted_mean([(float(r.metrics["accuracy"]), r.num_examples) for r in ordered])
        record = dict(self._round, federated_loss=loss, federated_accuracy=accuracy,
                      evaluate_failures=len(failures) + len(results) - len(ordered))
        record["round_seconds"] = round(time.perf_counter() - record.pop("start"), 3)
        self._finish_round(record)
        return loss, ({} if accuracy is None else {"accuracy": accuracy})

    def _finish_round(self, record: dict) -> None:
        """Append the round's record, save model + metrics, print the progress line."""
        self.records.append(record)
        self.results.save_round(self.records, self._global)
        self.progress(progress_line(record, self.total_rounds))


def progress_line(record: Mapping, total_rounds: int) -> str:
    """E.g. 'round 1/5  accuracy 91.23%  loss 0.2871  clients 10/10  failures 0  (12.3 s)'."""
    head = (f"round {record['round']}/{total_rounds}  "
            f"accuracy {100 * record['centralized_accuracy']:5.2f}%  "
            f"loss {record['centralized_loss']:.4f}")
    if record["round"] == 0:
        return f"{head}  (initial global model)"
    return (f"{head}  clients {record['clients_fit']}/{record['clients_sampled']}  "
            f"failures {record['failures']}  ({record['round_seconds']:.1f} s)")
