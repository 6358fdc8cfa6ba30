"""Draw the learning curves of one or more federated runs into a PNG.

Reads the `metrics.json` that server.py writes after every round (one record
per round, round 0 = the initial global model) and plots two panels:

  * accuracy: centralized accuracy on the held-out test set (solid line, what
    the server measures on the aggregated FedAvg model, McMahan et al. 2017)
    and federated accuracy (dashed line, the clients' own validation splits,
    weighted by their number of examples);
  * loss: the same two measurements, on a log scale.

One directory:      python plot_results.py results              -> results/accuracy.png
Several directories are overlaid, one colour per run, labelled by directory
name or by --labels; the picture goes to --out (default results/comparison.png):
    python plot_results.py results_iid results_dirichlet --labels IID Dirichlet

A directory of peers (peer.py, demo.py --engine gossip: results/peer_0, peer_1, ...)
draws every peer's test accuracy, their mean, and how far the peers are from their
neighbours (peer.py's mean_neighbour_distance):
    python plot_results.py results                              -> results/accuracy.png
"""

import argparse
import json
import math
import os
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")  # headless: no display needed, works over SSH and in CI
import matplotlib.pyplot as plt  # noqa: E402  (must come after matplotlib.use)
from matplotlib.ticker import (  # noqa: E402
    FuncFormatter, LogLocator, MaxNLocator, NullFormatter, PercentFormatter)

METRICS_FILE = "metrics.json"
SINGLE_RUN_PNG = "accuracy.png"
DEFAULT_COMPARISON_PNG = pathlib.Path("results") / "comparison.png"

Record = dict[str, float | int | None]


class ResultsError(Exception):
    """A results directory that cannot be plotted; str(e) is a one-line message."""


def _is_number(value: object) -> bool:
    """True for a finite int/float (bool excluded: JSON true is not a metric)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_record(record: object, where: str) -> None:
    """Raise ResultsError unless `record` looks like one round written by server.py."""
    if not isinstance(record, dict):
        raise ResultsError(f"{where}: expected an object per round, got {type(record).__name__}")
    for key in ("round", "centralized_accuracy", "centralized_loss"):
        if not _is_number(record.get(key)):
            raise ResultsError(f"{where}: missing or non-numeric {key!r}")
    for key in ("federated_accuracy", "federated_loss"):
        if record.get(key) is not None and not _is_number(record[key]):
            raise ResultsError(f"{where}: {key!r} must be a number or null")
    if not 0.0 <= record["centralized_accuracy"] <= 1.0:
        raise ResultsError(f"{where}: centralized_accuracy must be a fraction in [0, 1]")


def load_metrics(results_dir: str | os.PathLike) -> list[Record]:
    """Read and validate results_dir/metrics.json; records sorted by round."""
    results_dir = pathlib.Path(results_dir)
    path = results_dir / METRICS_FILE
    if not results_dir.is_dir():
        raise ResultsError(f"{results_dir} is not a directory (run server.py or demo.py first)")
    if not path.is_file():
        raise ResultsError(f"{path} not found (run server.py or demo.py first)")
    try:
        records = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(records, list) or not records:
        raise ResultsError(f"{path} should be a non-empty list of per-round records")
    for i, record in enumerate(records):
        _check_record(record, f"{path} record {i}")
    return sorted(records, key=lambda r: r["round"])


def peer_dirs(results_dir: str | os.PathLike) -> list[pathlib.Path]:
    """results_dir/peer_0, peer_1, ... that hold a metrics.json, by rank (peer.py's)."""
    found = [p for p in pathlib.Path(results_dir).glob("peer_*")
             if p.name[5:].isdigit() and (p / METRICS_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def load_peers(results_dir: str | os.PathLike) -> list[list[Record]]:
    """Every peer's records (peer.py's metrics.json), by rank; ResultsError if unusable."""
    peers = []
    for path in peer_dirs(results_dir):
        try:
            records = json.loads((path / METRICS_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ResultsError(f"{path / METRICS_FILE} is not valid JSON ({e})") from None
        if (not isinstance(records, list) or not records or not all(
                isinstance(r, dict) and _is_number(r.get("round"))
                and _is_number(r.get("test_accuracy")) for r in records)):
            raise ResultsError(f"{path / METRICS_FILE}: not peer.py's per-round records")
        peers.append(sorted(records, key=lambda r: r["round"]))
    if not peers:
        raise ResultsError(f"{results_dir} holds no peer_*/metrics.json (run peer.py first)")
    return peers


def plot_peers(peers: list[list[Record]], out_path: str | os.PathLike) -> pathlib.Path:
    """Each peer's test accuracy (thin) and their mean over the rounds all have (thick);
    the network's neighbour distance (log scale). Written atomically, like plot_runs."""
    fig, (ax_acc, ax_gap) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for rank, records in enumerate(peers):
        ax_acc.plot(*_series(records, "test_accuracy", 100), "-", linewidth=0.8, alpha=0.6,
                    label=f"peer {rank}" if len(peers) <= 10 else None)
    common = min(len(records) for records in peers)
    mean = [sum(records[i]["test_accuracy"] for records in peers) * 100 / len(peers)
            for i in range(common)]
    ax_acc.plot([peers[0][i]["round"] for i in range(common)], mean, "o-", color="black",
                linewidth=2, label=f"mean, final {mean[-1]:.2f}%")
    ax_gap.plot(*_series([r for r in peers[0] if r["round"] > 0], "mean_neighbour_distance"),
                "o-", color="black", label="all peers (root mean square)")
    ax_acc.set(title=f"Test accuracy of {len(peers)} peers (no server)", xlabel="round",
               ylabel="accuracy")
    ax_acc.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
    ax_gap.set(title="Distance to the neighbours' average", xlabel="round",
               ylabel="||own - mixed|| (log scale)")
    ax_gap.set_yscale("log")
    ax_gap.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax_gap.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    for ax, corner in ((ax_acc, "lower right"), (ax_gap, "upper right")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(loc=corner, fontsize="x-small", ncol=2 if ax is ax_acc else 1)
    return _save(fig, out_path)


def _series(records: list[Record], key: str, scale: float = 1.0) -> tuple[list, list]:
    """(rounds, values) for the records where `key` is not null."""
    points = [(r["round"], r[key] * scale) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: list[tuple[str, list[Record]]], out_path: str | os.PathLike) -> pathlib.Path:
    """Draw accuracy and loss panels for each labelled run; write the PNG atomically.

    Args:
      runs: (label, records) pairs, records as returned by load_metrics.
      out_path: where the PNG goes; its parent directory is created if needed.
    Returns:
      The path written.
    """
    # DP-FedAvg runs (server.py --dp-noise-multiplier) record the privacy spent, ε (PLD, and
    # the RDP bound beside it): a third panel shows how it grows with the rounds.
    private = any(_is_number(r.get("epsilon")) for _, records in runs for r in records)
    fig, axes = plt.subplots(1, 3 if private else 2, figsize=(16 if private else 11, 4.2),
                             constrained_layout=True)
    ax_acc, ax_loss = axes[:2]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, records) in enumerate(runs):
        colour = colours[i % len(colours)]
        final = records[-1]["centralized_accuracy"] * 100
        name = f"{label}: " if len(runs) > 1 else ""
        ax_acc.plot(*_series(records, "centralized_accuracy", 100), "o-", color=colour,
                    label=f"{name}centralized (test set), final {final:.2f}%")
        ax_acc.plot(*_series(records, "federated_accuracy", 100), "s--", color=colour,
                    alpha=0.7, label=f"{name}federated (clients' validation)")
        ax_loss.plot(*_series(records, "centralized_loss"), "o-", color=colour,
                     label=f"{name}centralized")
        ax_loss.plot(*_series(records, "federated_loss"), "s--", color=colour,
                     alpha=0.7, label=f"{name}federated")
        if private:
            spent = [r for r in records if _is_number(r.get("epsilon"))]
            if spent:
                axes[2].plot(*_series(spent, "epsilon"), "o-", color=colour,
                             label=f"{name}final ε {spent[-1]['epsilon']:.2f} (PLD)")
            # The looser RDP bound of the same runs, as a cross-check (runs recorded
            # before it existed have none).
            bound = [r for r in records if _is_number(r.get("epsilon_rdp"))]
            if bound:
                axes[2].plot(*_series(bound, "epsilon_rdp"), ":", color=colour, alpha=0.7,
                             label=f"{name}RDP bound {bound[-1]['epsilon_rdp']:.2f}")

    ax_acc.set(title="Accuracy of the global model", xlabel="round", ylabel="accuracy")
    ax_acc.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
    ax_acc.set_ylim(top=100)
    ax_loss.set(title="Loss (cross-entropy)", xlabel="round", ylabel="loss (log scale)")
    ax_loss.set_yscale("log")  # the loss drops by orders of magnitude in the first rounds
    ax_loss.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_loss.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))  # 0.5, not 5x10^-1
    ax_loss.yaxis.set_minor_formatter(NullFormatter())
    if private:
        axes[2].set(title="Privacy spent (DP-FedAvg)", xlabel="round",
                    ylabel="ε at the run's δ (lower is more private)")
    # Curves rise (accuracy, ε) or fall (loss) from the left: those corners stay free.
    for ax, corner in zip(axes, ("lower right", "upper right", "lower right")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.grid(True, alpha=0.3)
        ax.legend(loc=corner, fontsize="small")

    return _save(fig, out_path)


def _save(fig: "plt.Figure", out_path: str | os.PathLike) -> pathlib.Path:
    """Write the figure to out_path atomically and close it."""
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    try:
        fig.savefig(tmp_path, format="png", dpi=110)
        os.replace(tmp_path, out_path)  # readers never see a half-written PNG
    except BaseException:
        tmp_path.unlink(missing_ok=True)  # nor a leftover half of one
        raise
    finally:
        plt.close(fig)
    return out_path


def out_problem(out_path: pathlib.Path) -> str | None:
    """Why the PNG cannot be written to out_path (one line), or None. Reads only."""
    if out_path.is_dir():
        return f"--out {out_path} is a directory; name the PNG file to write"
    for parent in out_path.parents:
        if parent.exists():
            return None if parent.is_dir() else (
                f"--out {out_path}: {parent} is a file, not a directory")
    return None


def default_out_path(results_dirs: list[pathlib.Path]) -> pathlib.Path:
    """DIR/accuracy.png for one run; results/comparison.png when comparing several."""
    return results_dirs[0] / SINGLE_RUN_PNG if len(results_dirs) == 1 else DEFAULT_COMPARISON_PNG


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dirs", nargs="*", type=pathlib.Path, default=[pathlib.Path("results")],
                        help="results directories written by server.py (default: results)")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="legend label per directory (default: the directory names)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="PNG to write (default: DIR/accuracy.png for one directory, "
                             f"{DEFAULT_COMPARISON_PNG} for several)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    labels = args.labels or [d.resolve().name for d in args.results_dirs]
    if len(labels) != len(args.results_dirs):
        sys.exit(f"plot_results.py: error: {len(labels)} labels for {len(args.results_dirs)} directories")
    out_path = args.out or default_out_path(args.results_dirs)
    try:
        problem = out_problem(out_path)
    except OSError as e:  # e.g. a name too long: is_dir() raises rather than say False
        problem = f"--out {out_path}: {e.strerror}"
    if problem:
        sys.exit(f"plot_results.py: error: {problem}")
    try:
        if (len(args.results_dirs) == 1 and peer_dirs(args.results_dirs[0])
                and not (args.results_dirs[0] / METRICS_FILE).exists()):
            out_path = plot_peers(load_peers(args.results_dirs[0]), out_path)
            print(f"wrote {out_path}")
            return
        runs = [(label, load_metrics(d)) for label, d in zip(labels, args.results_dirs)]
        out_path = plot_runs(runs, out_path)
    except (ResultsError, OSError) as e:
        sys.exit(f"plot_results.py: error: {e}")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
