"""FedProx and the server optimizers (issue 12): settings, checks and the run's plumbing.

The training side of FedProx (mu = 0 is plain training bit for bit, mu > 0 stays nearer
the global model, no recompilation) is tested in test_model.py.
"""

import pytest

import server
import server_app
from federation import results
from federation.server_setup import ServerSettings, SetupError, build_strategy


# ------------------------------------------------------------------------------ FedProx

def test_proximal_mu_reaches_the_fit_config_from_both_entry_points(data_dir, tmp_path):
    cli = server.settings_from_args(server.parse_args(
        ["--proximal-mu", "0.01", "--data-dir", str(data_dir),
         "--results-dir", str(tmp_path / "r"), "--min-clients", "1"]))
    app = server_app.settings_from_run_config({"proximal-mu": 0.01})
    assert cli.proximal_mu == app.proximal_mu == 0.01
    strategy, _ = build_strategy(cli)
    assert strategy.fit_config["proximal_mu"] == 0.01
    assert strategy.run_config["proximal_mu"] == 0.01
    assert ServerSettings().proximal_mu == 0.0  # default: FedAvg


def test_resume_refuses_another_mu_and_reads_older_runs_as_mu_0():
    saved = {"seed": 0, "fraction_fit": 1.0, "local_epochs": 1, "batch_size": 32,
             "learning_rate": 0.001, "manifest_sha256": "ab", "model": {"w": "2x3"}}
    assert results.resume_mismatch(saved, dict(saved, proximal_mu=0.0)) is None
    assert results.resume_mismatch(dict(saved, proximal_mu=0.0), dict(saved, proximal_mu=0.1)) == (
        "proximal_mu was 0.0, now 0.1")
    assert results.resume_mismatch(saved, dict(saved, proximal_mu=0.1)) == (
        "proximal_mu was 0.0, now 0.1")  # a run from before FedProx was a mu = 0 run


@pytest.mark.parametrize("flags, message", [
    (["--proximal-mu", "-0.1"], "--proximal-mu must be a number >= 0, got -0.1"),
    (["--proximal-mu", "nan"], "--proximal-mu must be a number >= 0, got nan"),
    (["--proximal-mu", "inf"], "--proximal-mu must be a number >= 0, got inf"),
])
def test_bad_server_flags_are_one_line_before_anything_starts(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        server.parse_args(flags)
    assert exit_info.value.code == 2
    # argparse's usage line, then one line (its program name is pytest's in this process)
    assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")


@pytest.mark.parametrize("config, message", [
    ({"proximal-mu": -1}, "proximal-mu must be a number >= 0, got -1.0"),
    ({"proximal-mu": "big"}, "run-config proximal-mu = 'big' must be a number"),
])
def test_bad_run_config_is_one_line(config, message):
    with pytest.raises(SetupError) as error:
        build_strategy(server_app.settings_from_run_config(config))
    assert str(error.value) == message
