"""The results directory: metrics, run settings and one model per round, written atomically.

It is also the checkpoint a stopped run resumes from: metrics.json is the commit point,
written after the round's model, so a round listed there always has its model on disk
(and, with a server optimizer that keeps state, that state: server_optimizer_round_<r>.npz).
"""

import csv
import io
import json
import math
import os
import pathlib
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from federation.aggregation import Arrays

# Columns of metrics.json records and metrics.csv, in order.
METRIC_FIELDS = (
    "round", "centralized_loss", "centralized_accuracy", "federated_loss",
    "federated_accuracy", "train_loss", "train_accuracy", "clients_sampled", "clients_fit",
    "failures", "evaluate_failures", "round_seconds", "bytes_received", "update_norm",
    "clipped", "epsilon", "epsilon_rdp")

# Files a run writes (besides model_round_<r>.npz); their presence means the directory holds a run.
RUN_FILES = ("metrics.json", "metrics.csv", "run_config.json", "global_model.npz")

# run_config.json keys that define the computation: a resumed run must match them all.
# Everything else may change on --resume: --rounds (to extend a run), --min-clients and
# --round-timeout (liveness policy), --address, --certificates and the directory paths.
RESUME_MUST_MATCH = ("seed", "fraction_fit", "local_epochs", "batch_size", "client_optimizer",
                     "learning_rate", "manifest_sha256", "model", "aggregation",
                     "trim_fraction", "krum_malicious", "dp", "secagg", "proximal_mu",
                     "server_optimizer")

# A run_config.json written before a setting existed ran with that setting's value here.
SAVED_BEFORE_SETTING = {"client_optimizer": "adam", "aggregation": "fedavg",
                        "trim_fraction": None, "krum_malicious": None, "dp": None,
                        "secagg": False, "proximal_mu": 0.0,
                        "server_optimizer": {"name": "fedavg"}}


def resume_mismatch(saved: Mapping, current: Mapping) -> str | None:
    """The first setting that differs between a saved run_config and this run's, or None."""
    for key in RESUME_MUST_MATCH:
        before, now = (c.get(key, SAVED_BEFORE_SETTING.get(key)) for c in (saved, current))
        if before != now:
            return f"{key} was {before!r}, now {now!r}"
    return None



def write_atomic(path: pathlib.Path, write: Callable[[io.BufferedWriter], None]) -> None:
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


def saved_record(record: Mapping, fields: Sequence[str] = METRIC_FIELDS) -> dict:
    """A round's record as metrics.json holds it: every key of fields, NaN/Inf as null."""
    return {k: _finite_or_none(record.get(k)) for k in fields}


def metrics_csv(records: Sequence[Mapping], fields: Sequence[str] = METRIC_FIELDS) -> str:
    """The records as CSV with these columns; None becomes an empty cell."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if record.get(k) is None else record[k] for k in fields})
    return out.getvalue()


class ResultsDir:
    """metrics.json/.csv, run_config.json and model_round_<r>.npz in one directory.

    The model file of a round is written before metrics.json, so metrics.json is the
    commit point: a round listed there always has its model on disk. fields: the columns
    of the records (a server's METRIC_FIELDS; a peer's are peer_round.PEER_FIELDS).
    """

    def __init__(self, root: str | os.PathLike, array_names: Sequence[str],
                 fields: Sequence[str] = METRIC_FIELDS) -> None:
        self.root = pathlib.Path(root)
        self.array_names = list(array_names)
        self.fields = tuple(fields)

    def model_path(self, server_round: int) -> pathlib.Path:
        """Where the global model after `server_round` is saved."""
        return self.root / f"model_round_{server_round}.npz"

    def server_state_path(self, server_round: int) -> pathlib.Path:
        """Where the server optimizer's state after `server_round` is saved."""
        return self.root / f"server_optimizer_round_{server_round}.npz"

    def problem(self) -> str | None:
        """Why this path cannot be a results directory (one line), or None. Reads only."""
        for path in (self.root, *self.root.parents):
            if path.exists():
                if not path.is_dir():
                    return (f"{self.root} cannot be a directory: {path} is a file"
                            if path != self.root else f"{self.root} is a file, not a directory")
                if not os.access(path, os.W_OK | os.X_OK):
                    return f"{path} is not writable"
                return None
        return None

    def run_files(self) -> list[pathlib.Path]:
        """The files of a run in this directory (empty if it holds none)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if p.name in RUN_FILES or p.match("model_round_*.npz")
                      or p.match("server_optimizer_round_*.npz"))

    def clear(self) -> None:
        """Remove the files a previous run left: the ones this class writes, and the plot
        drawn from them (plot_results.py's accuracy.png), which would show the old run."""
        self.root.mkdir(parents=True, exist_ok=True)
        for path in self.run_files() + [self.root / "accuracy.png"]:
            path.unlink(missing_ok=True)

    def begin(self, config: Mapping | None, clear: bool) -> None:
        """Start writing a run: clear the old one's files if asked, write run_config.json."""
        if clear:
            self.clear()
        if config is not None:
            self.write_config(config)

    def write_config(self, config: Mapping) -> None:
        """Write run_config.json."""
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(config, indent=2) + "\n"
        write_atomic(self.root / "run_config.json", lambda f: f.write(text.encode()))

    def save_round(self, records: Sequence[Mapping], arrays: Arrays,
                   server_state: Mapping[str, np.ndarray] | None = None) -> None:
        """Save the global model after the last record's round (and the server optimizer's
        state, if it keeps one), then the metrics."""
        server_round = records[-1]["round"]
        named = dict(zip(self.array_names, arrays, strict=True))
        self.root.mkdir(parents=True, exist_ok=True)
        if server_state is not None:
            write_atomic(self.server_state_path(server_round),
                          lambda f: np.savez(f, **server_state))
        for path in (self.model_path(server_round), self.root / "global_model.npz"):
            write_atomic(path, lambda f: np.savez(f, **named))
        clean = [saved_record(r, self.fields) for r in records]
        text = json.dumps(clean, indent=2) + "\n"
        write_atomic(self.root / "metrics.csv",
                     lambda f: f.write(metrics_csv(clean, self.fields).encode()))
        write_atomic(self.root / "metrics.json", lambda f: f.write(text.encode()))
        # Committed: older optimizer states are never resumed from (only the newest round
        # is), and each is twice the model's size.
        for path in self.root.glob("server_optimizer_round_*.npz"):
            if path != self.server_state_path(server_round):
                path.unlink(missing_ok=True)

    def load_arrays(self, path: pathlib.Path) -> Arrays:
        """Arrays of a saved model, in array_names order."""
        try:
            with np.load(path, allow_pickle=False) as npz:
                if sorted(npz.files) != sorted(self.array_names):
                    raise ValueError(f"{path} holds {sorted(npz.files)}, "
                                     f"expected {self.array_names}")
                return [npz[name] for name in self.array_names]
        except (EOFError, zipfile.BadZipFile) as e:  # np.load's word for a cut-short file
            raise ValueError(f"{path} is damaged or cut short ({e})") from e

    def load_server_state(self, server_round: int) -> dict[str, np.ndarray]:
        """The server optimizer's saved state after `server_round`; ValueError if none."""
        path = self.server_state_path(server_round)
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"the server optimizer's state of round {server_round} cannot "
                             f"be read ({type(e).__name__}: {e})") from e

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
