"""The record of a run as the server keeps it: one dict per round, saved every round, and
one progress line per round.

CheckedFedAvg (strategy.py) fills a round's record as the round goes (clients, failures,
bytes, train and evaluation metrics); once the round ends, RunRecord adds its time and,
under DP-FedAvg, the privacy spent so far (ε), writes the records and the global model
through results.py (atomically: it is also the checkpoint a stopped run resumes from), and
hands one line to the progress sink.
"""

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from federation import privacy
from federation.aggregation import Arrays
from federation.results import ResultsDir

if TYPE_CHECKING:  # server_optimizers.py needs JAX; this file does not
    from federation.server_optimizers import ServerOptimizer


def print_progress(line: str) -> None:
    """The default progress sink: one line on stdout, flushed so pipes see it at once."""
    print(line, flush=True)


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


def initial_record(loss: float, accuracy: float, seconds: float) -> dict:
    """Round 0's record: the initial global model, evaluated before any training."""
    return {"round": 0, "centralized_loss": loss, "centralized_accuracy": accuracy,
            "clients_sampled": 0, "clients_fit": 0, "failures": 0,
            "evaluate_failures": 0, "bytes_received": 0, "round_seconds": round(seconds, 3)}


class RunRecord:
    """The records of the rounds done so far, and where they go at the end of each round."""

    def __init__(self, results: ResultsDir, total_rounds: int, *, records: Sequence[dict] = (),
                 run_config: Mapping | None = None,
                 progress: Callable[[str], None] = print_progress,
                 dp: privacy.DPConfig | None = None, fraction_fit: float = 1.0,
                 server_optimizer: "ServerOptimizer | None" = None) -> None:
        """Args:
          results: where metrics and models go.
          total_rounds: the last round of the whole run (for the progress line).
          records: metric records of the rounds already done (when resuming).
          run_config: written to run_config.json when the run starts (None: not written).
          progress: receives one line per round.
          dp, fraction_fit: DP-FedAvg's settings (None: no ε) and the sampling rate.
          server_optimizer: its state is saved with the model (None: FedAvg, no state).
        """
        self.results, self.total_rounds = results, total_rounds
        self.records = list(records)
        self.offset = self.records[-1]["round"] if self.records else 0  # rounds already done
        self.run_config, self.progress = run_config, progress
        self.dp, self.fraction_fit = dp, fraction_fit
        self.server_optimizer = server_optimizer

    def begin(self) -> None:
        """The run has started: results.begin (a resumed run keeps its earlier rounds).

        CheckedFedAvg calls this from evaluate(0), which Flower calls once the server is up
        (its port bound): only then may the results directory change, so a server that
        fails to start leaves it alone.
        """
        self.results.begin(self.run_config, clear=not self.records)

    def finish(self, record: dict, global_arrays: Arrays) -> None:
        """Append the round's record, save model + metrics, print the progress line."""
        if "start" in record:
            record["round_seconds"] = round(time.perf_counter() - record.pop("start"), 3)
        if self.dp is not None:  # the privacy spent after this many rounds of the run
            record.update(privacy.spent(self.dp, self.fraction_fit, record["round"]))
        self.records.append(record)
        server_state = None if self.server_optimizer is None else (
            self.server_optimizer.state_arrays())
        self.results.save_round(self.records, global_arrays, server_state)
        self.progress(progress_line(record, self.total_rounds))
