"""FedProx and the server optimizers (issue 12): hand-computed steps, checkpoints, bad
input, and a resumed FedAdam + FedProx run of real processes.

The training side of FedProx (mu = 0 is plain training bit for bit, mu > 0 stays nearer
the global model, no recompilation) is tested in test_model.py.
"""

import shutil
import signal

import numpy as np
import optax
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

import server
import server_app
from federation import aggregation, results, server_optimizers, strategy
from federation.server_setup import ServerSettings, SetupError, build_strategy
from helpers import (
    CLIENTS,
    client_args,
    free_port,
    last_line,
    records,
    server_args,
    snapshot,
    wait_until,
)


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


# ---------------------------------------------------------------- the client optimizer

def test_client_optimizer_reaches_the_fit_config_with_its_own_default_rate(data_dir, tmp_path):
    cli = server.settings_from_args(server.parse_args(
        ["--client-optimizer", "sgd", "--data-dir", str(data_dir),
         "--results-dir", str(tmp_path / "r"), "--min-clients", "1"]))
    app = server_app.settings_from_run_config({"client-optimizer": "sgd"})
    assert (cli.client_optimizer, cli.learning_rate) == (app.client_optimizer,
                                                         app.learning_rate) == ("sgd", 0.01)
    strategy, _ = build_strategy(cli)
    assert (strategy.fit_config["client_optimizer"], strategy.fit_config["learning_rate"]) == (
        "sgd", 0.01)
    assert strategy.run_config["client_optimizer"] == "sgd"
    assert (ServerSettings().client_optimizer, ServerSettings().learning_rate) == ("adam", 4e-3)
    assert ServerSettings(client_optimizer="sgd", learning_rate=0.05).learning_rate == 0.05
    assert server_app.settings_from_run_config({"client-optimizer": "rmsprop"}).problem() == (
        "client-optimizer 'rmsprop' is not one of adam, sgd")


def test_resume_reads_older_runs_as_adam_clients():
    saved = {"seed": 0, "fraction_fit": 1.0, "local_epochs": 1, "batch_size": 32,
             "learning_rate": 0.004, "manifest_sha256": "ab", "model": {"w": "2x3"}}
    assert results.resume_mismatch(saved, dict(saved, client_optimizer="adam")) is None
    assert results.resume_mismatch(saved, dict(saved, client_optimizer="sgd")) == (
        "client_optimizer was 'adam', now 'sgd'")


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
    (["--client-optimizer", "rmsprop"], "--client-optimizer 'rmsprop' is not one of adam, sgd"),
    (["--client-optimizer", "sgd", "--learning-rate", "0"], "--learning-rate must be > 0, got 0.0"),
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


# -------------------------------------------------------------- server optimizers, by hand

def _step_twice(name: str, x, first_average, second_average, **chosen):
    """Two rounds of a server optimizer on one toy array "w": (model after 1, after 2)."""
    opt = server_optimizers.ServerOptimizer(server_optimizers.settings(name, **chosen),
                                            [np.asarray(x, np.float32)], ["w"])
    after_1 = opt.step([np.asarray(x, np.float32)], [np.asarray(first_average, np.float32)])
    after_2 = opt.step(after_1, [np.asarray(second_average, np.float32)])
    return after_1[0], after_2[0]


def test_fedavgm_is_momentum_sgd_on_global_minus_average():
    # eta 0.5, beta 0.5: exact in binary, so exact in float32.
    # Round 1: g = [1, 2] - [0.5, 2.5] = [0.5, -0.5]; v = g;           x = x - 0.5 v = [0.75, 2.25]
    # Round 2: g = [0.75, 2.25] - [0.25, 2.25] = [0.5, 0]; v = 0.5 v + g = [0.75, -0.25];
    #          x = [0.75, 2.25] - 0.5 v = [0.375, 2.375]
    after_1, after_2 = _step_twice("fedavgm", [1.0, 2.0], [0.5, 2.5], [0.25, 2.25],
                                   learning_rate=0.5, momentum=0.5)
    np.testing.assert_array_equal(after_1, np.array([0.75, 2.25], np.float32))
    np.testing.assert_array_equal(after_2, np.array([0.375, 2.375], np.float32))


def test_fedadam_by_hand():
    # eta 0.1, b1 0.5, b2 0.99, tau 1e-3; bias-corrected moments (optax's Adam).
    # Round 1: g = +-0.5; m = 0.5 g; v = 0.01 g^2; m^ = m / 0.5 = g; v^ = v / 0.01 = 0.25
    #          x = x - 0.1 * g / (0.5 + 1e-3)
    after_1, after_2 = _step_twice("fedadam", [1.0, 2.0], [0.5, 2.5], [0.5, 2.5],
                                   learning_rate=0.1, momentum=0.5)
    assert after_1.tolist() == pytest.approx([0.9001996007984032, 2.0998003992015968], rel=1e-7)
    # Round 2: g2 = x1 - [0.5, 2.5] (exact in float32); m = 0.5 m + 0.5 g2;
    #          v = 0.99 v + 0.01 g2^2; m^ = m / (1 - 0.5^2); v^ = v / (1 - 0.99^2)
    g1 = np.array([0.5, -0.5])
    g2 = after_1.astype(np.float64) - [0.5, 2.5]
    m = 0.5 * (0.5 * g1) + 0.5 * g2
    v = 0.99 * (0.01 * g1**2) + 0.01 * g2**2
    expected = after_1 - 0.1 * (m / 0.75) / (np.sqrt(v / (1 - 0.99**2)) + 1e-3)
    assert after_2.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert after_2[0] < after_1[0] and after_2[1] > after_1[1]  # momentum: same direction


def test_fedyogi_by_hand():
    # eta 0.1, b1 0.5, b2 0.99, tau 1e-3; m and v start at 1e-6 (optax's, = tau^2).
    # Round 1: g = +-0.5, g^2 = 0.25 > v: v = 1e-6 + 0.01 * 0.25 = 0.002501 (Yogi adds)
    #          m = 0.5e-6 + 0.5 g; m^ = m / 0.5; v^ = v / 0.01 = 0.2501
    after_1, after_2 = _step_twice("fedyogi", [1.0, 2.0], [0.5, 2.5], [0.9, 2.1],
                                   learning_rate=0.1, momentum=0.5)
    m1 = 0.5e-6 + 0.5 * np.array([0.5, -0.5])
    assert after_1.tolist() == pytest.approx(
        [1 - 0.1 * (m1[0] / 0.5) / (np.sqrt(0.2501) + 1e-3),
         2 - 0.1 * (m1[1] / 0.5) / (np.sqrt(0.2501) + 1e-3)], rel=1e-7)
    # Round 2: a small g2 (~0.0002, g2^2 < v): Yogi's v shrinks by 0.01 g2^2, Adam's would
    # decay by 0.99 (the difference: v = 0.002501 - 0.01 g2^2, not 0.99 * 0.002501 + ...).
    g2 = after_1.astype(np.float64) - np.asarray(np.array([0.9, 2.1], np.float32), np.float64)
    m = 0.5 * m1 + 0.5 * g2
    v = 0.002501 - 0.01 * g2**2
    expected = after_1 - 0.1 * (m / 0.75) / (np.sqrt(v / (1 - 0.99**2)) + 1e-3)
    assert after_2.tolist() == pytest.approx(expected.tolist(), rel=1e-6)


def test_defaults_are_the_papers_where_it_gives_them():
    assert server_optimizers.settings("fedadam") == {
        "name": "fedadam", "learning_rate": 0.01, "momentum": 0.9, "b2": 0.99, "tau": 1e-3}
    assert server_optimizers.settings("fedyogi", 0.03) == {
        "name": "fedyogi", "learning_rate": 0.03, "momentum": 0.9, "b2": 0.99, "tau": 1e-3}
    assert server_optimizers.settings("fedavgm", momentum=0) == {
        "name": "fedavgm", "learning_rate": 1.0, "momentum": 0.0}
    assert server_optimizers.settings("fedavg") == {"name": "fedavg"}


def test_fedavg_is_the_average_itself_bit_for_bit(tmp_path):
    """fedavg returns the aggregate untouched: through the strategy, a round gives exactly
    aggregation.fedavg. optax.sgd(1.0) on g = x - x_avg is the same algorithm, but not the
    same bits: x - (x - x_avg) loses x_avg's low bits (here all of them)."""
    x, x_avg = [np.array([1.0], np.float32)], [np.array([1e-8], np.float32)]
    fedavg = server_optimizers.ServerOptimizer({"name": "fedavg"}, x, ["w"])
    assert fedavg.step(x, x_avg)[0].tobytes() == x_avg[0].tobytes()
    assert fedavg.state_arrays() is None  # nothing to checkpoint
    sgd = optax.sgd(1.0)
    update, _ = sgd.update([x[0] - x_avg[0]], sgd.init(x), x)
    assert optax.apply_updates(x, update)[0][0] == 0.0  # 1e-8 lost: why fedavg is special

    rng = np.random.default_rng(0)
    names = ["dense/w", "dense/b"]
    start = [rng.standard_normal((2, 3)).astype(np.float32),
             rng.standard_normal(3).astype(np.float32)]
    updates = [[a + rng.standard_normal(a.shape).astype(np.float32) for a in start]
               for _ in range(3)]
    s = strategy.CheckedFedAvg(
        initial_arrays=start, array_names=names, shard_sizes=[100] * 3, val_sizes=[10] * 3,
        evaluate_fn=lambda arrays: (0.0, 0.0), results=results.ResultsDir(tmp_path, names),
        total_rounds=1, min_clients=3, fit_config={},
        server_optimizer=server_optimizers.ServerOptimizer({"name": "fedavg"}, start, names))
    fits = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(u), n, {"partition": k}))
            for k, (u, n) in enumerate(zip(updates, (10, 30, 60)))]
    new, _ = s.aggregate_fit(1, fits, [])
    expected = aggregation.fedavg(list(zip(updates, (10, 30, 60))))
    for a, b in zip(parameters_to_ndarrays(new), expected):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", server_optimizers.NAMES)
def test_a_checkpointed_state_continues_bit_for_bit(name, tmp_path):
    """Four rounds in one go == two rounds, the state saved to a results directory and
    loaded into a new optimizer (as --resume does), then two more."""
    rng = np.random.default_rng(1)
    names = ["conv/w", "dense/b"]
    start = [rng.standard_normal((3, 3, 1, 4)).astype(np.float32),
             rng.standard_normal(4).astype(np.float32)]
    averages = [[a + 0.1 * rng.standard_normal(a.shape).astype(np.float32) for a in start]
                for _ in range(4)]
    config = server_optimizers.settings(name)

    def run(opt, arrays, rounds):
        for average in rounds:
            arrays = opt.step(arrays, average)
        return arrays

    straight = run(server_optimizers.ServerOptimizer(config, start, names), start, averages)
    first = server_optimizers.ServerOptimizer(config, start, names)
    halfway = run(first, start, averages[:2])
    rdir = results.ResultsDir(tmp_path, names)
    rdir.save_round([{"round": 2}], halfway, first.state_arrays())
    second = server_optimizers.ServerOptimizer(config, halfway, names)
    if name != "fedavg":
        second.load_state(rdir.load_server_state(2))
    resumed = run(second, halfway, averages[2:])
    for a, b in zip(resumed, straight):
        assert a.tobytes() == b.tobytes()
    if name != "fedavg":  # the state mattered: without it, another model
        fresh = run(server_optimizers.ServerOptimizer(config, halfway, names), halfway,
                    averages[2:])
        assert fresh[0].tobytes() != straight[0].tobytes()
    assert name != "fedavg" or not list(tmp_path.glob("server_optimizer_round_*"))


def test_only_the_newest_committed_state_is_kept_and_clear_removes_it(tmp_path):
    names = ["w"]
    rdir = results.ResultsDir(tmp_path, names)
    opt = server_optimizers.ServerOptimizer(server_optimizers.settings("fedadam"),
                                            [np.zeros(2, np.float32)], names)
    for r in range(3):
        rdir.save_round([{"round": k} for k in range(r + 1)], [np.zeros(2, np.float32)],
                        opt.state_arrays())
    assert sorted(p.name for p in tmp_path.glob("server_optimizer_*")) == [
        "server_optimizer_round_2.npz"]
    assert sorted(rdir.load_server_state(2)) == ["0/count", "0/mu/w", "0/nu/w"]
    with pytest.raises(ValueError, match="the server optimizer's state of round 1 cannot be read"):
        rdir.load_server_state(1)
    rdir.clear()
    assert list(tmp_path.iterdir()) == []


def test_a_state_that_does_not_fit_is_refused_in_one_line():
    zeros = [np.zeros(2, np.float32)]
    adam = server_optimizers.ServerOptimizer(server_optimizers.settings("fedadam"), zeros, ["w"])
    state = adam.state_arrays()
    with pytest.raises(ValueError, match="it holds 1 arrays, fedadam has 3"):
        adam.load_state({"0/trace/w": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match=r"0/mu/w is float32 \(3,\), expected float32 \(2,\)"):
        adam.load_state({**state, "0/mu/w": np.zeros(3, np.float32)})


# ------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags, message", [
    (["--server-optimizer", "adam"],
     "--server-optimizer 'adam' is not one of fedavg, fedavgm, fedadam, fedyogi"),
    (["--server-optimizer", "fedadam", "--server-learning-rate", "0"],
     "--server-learning-rate must be a number > 0, got 0.0"),
    (["--server-optimizer", "fedyogi", "--server-learning-rate", "-0.01"],
     "--server-learning-rate must be a number > 0, got -0.01"),
    (["--server-optimizer", "fedavgm", "--server-momentum", "1"],
     "--server-momentum must be in [0, 1), got 1.0"),
    (["--server-optimizer", "fedavgm", "--server-momentum", "-0.5"],
     "--server-momentum must be in [0, 1), got -0.5"),
    (["--server-learning-rate", "0.5"],
     "--server-optimizer fedavg takes no server-learning-rate or server-momentum (the new "
     "model is the average); use fedavgm, fedadam or fedyogi"),
])
def test_bad_server_optimizer_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        server.parse_args(flags)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")


def test_server_optimizer_run_config_keys():
    settings = server_app.settings_from_run_config(
        {"server-optimizer": "fedadam", "server-learning-rate": 1, "server-momentum": 0.5})
    assert (settings.server_optimizer, settings.server_learning_rate,
            settings.server_momentum) == ("fedadam", 1.0, 0.5)
    assert isinstance(settings.server_learning_rate, float)
    with pytest.raises(SetupError, match="run-config server-optimizer = 2 must be a string"):
        server_app.settings_from_run_config({"server-optimizer": 2})
    assert settings.problem() is None
    assert server_app.settings_from_run_config({"server-optimizer": "sgd"}).problem() == (
        "server-optimizer 'sgd' is not one of fedavg, fedavgm, fedadam, fedyogi")


# ------------------------------------------------- a resumed run of real processes

@pytest.mark.slow
def test_resume_with_fedadam_and_fedprox_after_a_kill_is_bit_identical(procs, tmp_path,
                                                                       data_dir,
                                                                       matches_simulation):
    """server.py --server-optimizer fedadam --proximal-mu 0.1 --client-optimizer sgd,
    SIGKILLed once round 1 is saved, then --resume: the model and the records equal an
    uninterrupted run bit for bit, as federation/simulation.py computes it (so the
    optimizer's state was restored, and the clients trained with mu and SGD at its default
    rate). Resuming with another optimizer or other settings is then refused in one line,
    changing nothing."""
    port, run_dir = free_port(), tmp_path / "results"
    sgd = ["--client-optimizer", "sgd"]
    method = ["--server-optimizer", "fedadam", "--proximal-mu", "0.1", *sgd]
    args = [*server_args(port, data_dir, run_dir, 3), *method]
    procs.start("server", "server.py", *args)
    for i in range(CLIENTS):
        procs.start(f"client_{i}", "client.py", *client_args(port, data_dir, i))
    wait_until(lambda: (run_dir / "metrics.json").exists() and len(records(run_dir)) >= 2,
               90, "round 1 to be saved")
    procs.procs["server"].send_signal(signal.SIGKILL)  # no chance to save anything more
    procs.wait("server", 10)
    killed_after = records(run_dir)[-1]["round"]
    assert killed_after < 3, "the run finished before the kill; nothing left to resume"
    assert (run_dir / f"server_optimizer_round_{killed_after}.npz").is_file()
    procs.start("resumed", "server.py", *args, "--resume")
    assert procs.wait("resumed", 120) == 0, procs.log("resumed")
    for i in range(CLIENTS):
        assert procs.wait(f"client_{i}", 30) == 0, procs.log(f"client_{i}")
    assert [r["round"] for r in records(run_dir)] == [0, 1, 2, 3]
    matches_simulation(run_dir, args, CLIENTS)  # the same run in one process, never stopped
    assert sorted(p.name for p in run_dir.glob("server_optimizer_*")) == [
        "server_optimizer_round_3.npz"]

    before = snapshot(run_dir)
    adam = "{'name': 'fedadam', 'learning_rate': 0.01, 'momentum': 0.9, 'b2': 0.99, 'tau': 0.001}"
    refusals = {
        "yogi": (["--server-optimizer", "fedyogi", "--proximal-mu", "0.1", *sgd],
                 f"server_optimizer was {adam}, now {{'name': 'fedyogi', 'learning_rate': "
                 "0.01, 'momentum': 0.9, 'b2': 0.99, 'tau': 0.001}"),
        "rate": ([*method, "--server-learning-rate", "0.02"],
                 f"server_optimizer was {adam}, now {adam.replace('0.01', '0.02')}"),
        "fedavg": (["--proximal-mu", "0.1", *sgd],
                   f"server_optimizer was {adam}, now {{'name': 'fedavg'}}"),
        "mu": (["--server-optimizer", "fedadam", *sgd], "proximal_mu was 0.1, now 0.0"),
        "adam": (method[:4], "client_optimizer was 'sgd', now 'adam'"),
        "sgd rate": ([*method, "--learning-rate", "0.02"], "learning_rate was 0.01, now 0.02"),
    }
    # All at once, each on its own copy of the run (copy2 keeps every mtime): a refused
    # server holds its directory's lock while it checks, so servers sharing one directory
    # would be refused for that instead (federation/run_lock.py).
    copies = {name: run_dir.with_name(f"copy {name}") for name in refusals}
    for name, (flags, _) in refusals.items():
        shutil.copytree(run_dir, copies[name])
        assert snapshot(copies[name]) == before
        procs.start(name, "server.py", *server_args(free_port(), data_dir, copies[name], 4),
                    *flags, "--resume")
    for name, (_, mismatch) in refusals.items():
        assert procs.wait(name, 60) == 1, procs.log(name)
        assert last_line(procs.err(name)) == (
            f"server.py: error: cannot resume {copies[name]}: {mismatch}; resume with the "
            "same settings, or start a new run with --overwrite")
        assert snapshot(copies[name]) == before  # not a byte, not a timestamp
    assert snapshot(run_dir) == before  # not a byte, not a timestamp
