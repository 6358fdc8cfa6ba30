"""plot_results.py: real PNGs from small metrics.json files, one-line errors on bad input."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import plot_results  # noqa: E402
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(results_dir: pathlib.Path, rounds: int = 3, final_accuracy: float = 0.95) -> None:
    """A metrics.json shaped like server.py's: round 0 has no federated numbers."""
    results_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for r in range(rounds + 1):
        accuracy = 0.1 + (final_accuracy - 0.1) * r / rounds
        records.append({
            "round": r, "centralized_loss": 2.3 / (r + 1), "centralized_accuracy": accuracy,
            "federated_loss": None if r == 0 else 2.4 / (r + 1),
            "federated_accuracy": None if r == 0 else accuracy - 0.01,
            "clients_fit": 0 if r == 0 else 2, "failures": 0,
            "round_seconds": 0.0 if r == 0 else 1.5, "bytes_received": 0 if r == 0 else 1000,
        })
    (results_dir / "metrics.json").write_text(json.dumps(records))


def run_plot(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "plot_results.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_drawn_png(path: pathlib.Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    # An empty 11x4.2 in. figure at 110 dpi compresses to a few KB; two panels with
    # lines, ticks and legends are tens of KB.
    assert len(data) > 20_000


def test_one_dir_writes_accuracy_png(tmp_path):
    write_metrics(tmp_path / "results")
    proc = run_plot("results", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "results" / "accuracy.png"
    assert proc.stdout.strip() == f"wrote {pathlib.Path('results') / 'accuracy.png'}"
    assert_drawn_png(out)
    assert not list((tmp_path / "results").glob("*.tmp"))  # the temp file was renamed away


def test_default_dir_is_results(tmp_path):
    write_metrics(tmp_path / "results")
    proc = run_plot(cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_drawn_png(tmp_path / "results" / "accuracy.png")


def test_two_dirs_overlay_to_default_comparison_png(tmp_path):
    write_metrics(tmp_path / "iid", final_accuracy=0.97)
    write_metrics(tmp_path / "dirichlet", rounds=5, final_accuracy=0.90)
    proc = run_plot("iid", "dirichlet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_drawn_png(tmp_path / "results" / "comparison.png")
    assert not (tmp_path / "iid" / "accuracy.png").exists()


def test_plot_runs_creates_parent_dir_and_returns_path(tmp_path):
    write_metrics(tmp_path / "a")
    write_metrics(tmp_path / "b")
    runs = [("IID", plot_results.load_metrics(tmp_path / "a")),
            ("Dirichlet", plot_results.load_metrics(tmp_path / "b"))]
    out = plot_results.plot_runs(runs, tmp_path / "nested" / "cmp.png")
    assert out == tmp_path / "nested" / "cmp.png"
    assert_drawn_png(out)


def test_labels_and_out_flag(tmp_path):
    write_metrics(tmp_path / "a")
    write_metrics(tmp_path / "b")
    proc = run_plot("a", "b", "--labels", "IID", "Dirichlet", "--out", "cmp.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_drawn_png(tmp_path / "cmp.png")


def test_round_zero_only_still_plots(tmp_path):
    write_metrics(tmp_path / "results", rounds=1)
    records = json.loads((tmp_path / "results" / "metrics.json").read_text())[:1]
    (tmp_path / "results" / "metrics.json").write_text(json.dumps(records))
    proc = run_plot("results", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_drawn_png(tmp_path / "results" / "accuracy.png")


def test_records_are_sorted_by_round(tmp_path):
    write_metrics(tmp_path / "r", rounds=3)
    records = json.loads((tmp_path / "r" / "metrics.json").read_text())
    (tmp_path / "r" / "metrics.json").write_text(json.dumps(records[::-1]))
    assert [r["round"] for r in plot_results.load_metrics(tmp_path / "r")] == [0, 1, 2, 3]


BAD_METRICS = {
    "empty_file": "",
    "corrupt_json": '[{"round": 0, "centralized_',
    "empty_list": "[]",
    "not_a_list": '{"round": 0}',
    "missing_accuracy": '[{"round": 0, "centralized_loss": 2.3}]',
    "accuracy_in_percent": '[{"round": 0, "centralized_loss": 2.3, "centralized_accuracy": 98.1}]',
    "string_loss": '[{"round": 0, "centralized_loss": "2.3", "centralized_accuracy": 0.1}]',
    "bad_federated": ('[{"round": 1, "centralized_loss": 2.3, "centralized_accuracy": 0.1,'
                      ' "federated_accuracy": "high"}]'),
}


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("plot_results.py: error: ")
    assert fragment in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", sorted(BAD_METRICS))
def test_bad_metrics_is_one_line_error(tmp_path, case):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "metrics.json").write_text(BAD_METRICS[case])
    proc = run_plot("results", cwd=tmp_path)
    assert_one_line_error(proc, "metrics.json")
    assert not (tmp_path / "results" / "accuracy.png").exists()


def test_missing_dir_is_one_line_error(tmp_path):
    assert_one_line_error(run_plot("no_such_dir", cwd=tmp_path), "no_such_dir")


def test_empty_dir_is_one_line_error(tmp_path):
    (tmp_path / "results").mkdir()
    assert_one_line_error(run_plot("results", cwd=tmp_path), "metrics.json not found")


def test_one_bad_dir_among_several_fails(tmp_path):
    write_metrics(tmp_path / "good")
    proc = run_plot("good", "missing", cwd=tmp_path)
    assert_one_line_error(proc, "missing")
    assert not (tmp_path / "results" / "comparison.png").exists()


def test_label_count_mismatch_is_one_line_error(tmp_path):
    write_metrics(tmp_path / "a")
    write_metrics(tmp_path / "b")
    assert_one_line_error(run_plot("a", "b", "--labels", "only-one", cwd=tmp_path), "labels")


def png_width(path: pathlib.Path) -> int:
    """Width in pixels, from the PNG's IHDR chunk."""
    return int.from_bytes(path.read_bytes()[16:20], "big")


def test_a_dp_run_gets_a_privacy_panel(tmp_path):
    write_metrics(tmp_path / "plain")
    write_metrics(tmp_path / "dp")
    records = json.loads((tmp_path / "dp" / "metrics.json").read_text())
    for r in records:
        r["epsilon"] = 0.0 if r["round"] == 0 else 1.5 * r["round"]
        r["epsilon_rdp"] = 1.2 * r["epsilon"]  # the RDP bound: a dotted line beside
    (tmp_path / "dp" / "metrics.json").write_text(json.dumps(records))
    plain = plot_results.plot_runs([("a", plot_results.load_metrics(tmp_path / "plain"))],
                                   tmp_path / "plain.png")
    private = plot_results.plot_runs([("a", plot_results.load_metrics(tmp_path / "plain")),
                                      ("b", plot_results.load_metrics(tmp_path / "dp"))],
                                     tmp_path / "dp.png")
    # Two panels are 11 in. wide at 110 dpi; three (accuracy, loss, ε) are 16 in.
    assert (png_width(plain), png_width(private)) == (1210, 1760)
    assert_drawn_png(private)
