"""peer.py as real processes: 4 peers on a ring on the shards of conftest.py's data_dir.

The processes must give, bit for bit, what federation/gossip_simulation.py computes in
this process (an uninterrupted run); a killed peer must stop the others within --timeout,
each with one line, and --resume on every peer must still end there.
"""

import json
import signal
import socket
import time

import numpy as np
import pytest

from federation import gossip
from helpers import free_port, wait_until

PEERS = 4
ROUNDS = 2
TIMEOUT = 10  # peer.py --timeout in the fault test: the others wait this long for a peer


def peer_args(port: int, data_dir, results, rank: int, *extra) -> list:
    return ["--rank", rank, "--peers", PEERS, "--coordinator", f"127.0.0.1:{port}",
            "--data-dir", data_dir, "--results-dir", results, "--rounds", ROUNDS,
            "--local-epochs", 1, *extra]


def start_peers(procs, name: str, port: int, data_dir, results, *extra) -> None:
    for rank in range(PEERS):
        procs.start(f"{name}_{rank}", "peer.py", *peer_args(port, data_dir, results, rank, *extra))


@pytest.fixture(scope="module")
def simulated(data_dir):
    """The same run in one process."""
    from federation import gossip_simulation, shards  # noqa: PLC0415
    from federation.peer_round import GossipSettings  # noqa: PLC0415
    partitions, test_set = shards.load_all(data_dir)
    return gossip_simulation.run(GossipSettings("ring", rounds=ROUNDS, local_epochs=1),
                                 partitions[:PEERS], test_set)


def assert_equal_to(simulated, results) -> None:
    """Every peer's model (bits) and metrics.json (all but the clock) are the simulation's."""
    import model  # noqa: PLC0415
    from federation import results as results_dir  # noqa: PLC0415
    from federation.peer_round import PEER_FIELDS  # noqa: PLC0415
    for rank in range(PEERS):
        with np.load(results / f"peer_{rank}" / "global_model.npz", allow_pickle=False) as saved:
            for (name, _), array in zip(model.param_spec(), simulated.models[rank], strict=True):
                assert saved[name].tobytes() == array.tobytes(), (rank, name)
        real = json.loads((results / f"peer_{rank}" / "metrics.json").read_text())
        expected = [results_dir.saved_record(r.peers[rank], PEER_FIELDS)
                    for r in simulated.rounds]
        for record in real + expected:
            record.pop("round_seconds")
        assert real == expected, rank


def test_a_gossip_step_over_real_processes_is_w_times_x(procs, tmp_path):
    """Random weights, one exchange on the complete graph of 4 (3 ppermutes each)."""
    from gossip_probe import random_model  # noqa: PLC0415
    port = free_port()
    for rank in range(PEERS):
        procs.start(f"probe_{rank}", "tests/gossip_probe.py", rank, PEERS, port, "complete",
                    tmp_path / f"{rank}.npz")
    for rank in range(PEERS):
        assert procs.wait(f"probe_{rank}", timeout=120) == 0, procs.log(f"probe_{rank}")
    models = [random_model(rank) for rank in range(PEERS)]
    w = gossip.metropolis_hastings(gossip.topology("complete", PEERS))
    expected = gossip.gossip_step(w, models)
    for rank in range(PEERS):
        with np.load(tmp_path / f"{rank}.npz") as out:
            assert list(out["senders"]) == [j for j in range(PEERS) if j != rank]
            assert out["exact"].all()  # the neighbours' weights arrived bit for bit
            for k in range(2):
                assert out[f"arr_{k}"].tobytes() == expected[rank][k].tobytes()
                x = np.stack([m[k].astype(np.float64) for m in models])
                np.testing.assert_allclose(out[f"arr_{k}"], np.tensordot(w, x, axes=1)[rank],
                                           rtol=0, atol=1e-6)


def test_peers_equal_the_one_process_run_through_a_kill_and_resume(procs, data_dir, tmp_path,
                                                                   simulated):
    """4 peers on a ring, 2 rounds. Peer 2 is killed once it saved round 1: the others
    stop within --timeout, each with one line naming it and their last saved round.
    --resume on all 4 finishes the run, and every peer's model and every record equal
    the one-process run's, bit for bit: round 1 came from the first processes, round 2
    from the resumed ones. (One test, not two: real processes cost seconds each.)"""
    results = tmp_path / "results"
    start_peers(procs, "first", free_port(), data_dir, results, "--timeout", TIMEOUT)
    metrics = results / "peer_2" / "metrics.json"
    wait_until(lambda: metrics.exists() and '"round": 1' in metrics.read_text(), 180,
               "peer 2 to save round 1")
    procs.procs["first_2"].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    for rank in (0, 1, 3):
        assert procs.wait(f"first_{rank}", timeout=2 * TIMEOUT + 60) == 1
        last = procs.err(f"first_{rank}").strip().splitlines()[-1]
        assert last == (f"peer.py: peer {rank} stops: peer 2 did not reach round 2's exchange "
                        f"within {TIMEOUT} s (gone or hung); round 1 is its last saved round in "
                        f"{results / f'peer_{rank}'} (restart every peer with --resume)")
    assert time.monotonic() - killed < 2 * TIMEOUT + 60  # peer 0 leaves last
    start_peers(procs, "again", free_port(), data_dir, results, "--timeout", 60, "--resume")
    for rank in range(PEERS):
        assert procs.wait(f"again_{rank}", timeout=180) == 0, procs.log(f"again_{rank}")
    assert_equal_to(simulated, results)
    assert json.loads((results / "peer_0" / "run_config.json").read_text())[
        "resumed_after"] == [1]
    assert "round 2/2  peer 1  test accuracy" in procs.out("again_1")
    # The peers drift apart while they train and gossip pulls them back: less each round.
    summaries = [r.summary for r in simulated.rounds]
    assert 0 < summaries[2]["consensus_distance"] < summaries[1]["consensus_distance"]
    network = [r["mean_neighbour_distance"] for r in
               json.loads((results / "peer_0" / "metrics.json").read_text())]
    assert 0 < network[2] < network[1]
    import plot_results  # noqa: PLC0415  (matplotlib: only here)
    peers = plot_results.load_peers(results)
    assert [len(p) for p in peers] == [ROUNDS + 1] * PEERS
    assert plot_results.plot_peers(peers, tmp_path / "peers.png").stat().st_size > 10_000


@pytest.mark.parametrize("flags,words", [
    (["--rank", "4", "--peers", "4"], "--rank 4 must be below --peers 4"),
    (["--rank", "0", "--peers", "7", "--topology", "torus"], "7 is prime"),
    (["--rank", "0", "--resume", "--overwrite"], "contradict"),
    (["--rank", "0", "--coordinator", "localhost"], "is not HOST:PORT"),
])
def test_bad_flags_are_refused_while_parsing(flags, words, capsys):
    import peer  # noqa: PLC0415
    with pytest.raises(SystemExit) as e:
        peer.parse_args(flags)
    assert e.value.code == 2
    assert words in capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_input_is_one_line_before_any_training(procs, data_dir, tmp_path):
    """A missing shard, a results directory that holds a run, nobody at the coordinator:
    one line each, a non-zero exit, nothing written."""
    port = free_port()
    held = tmp_path / "held"
    (held / "peer_1").mkdir(parents=True)
    (held / "peer_1" / "metrics.json").write_text("[]")
    cases = {
        "shard": (["--data-dir", tmp_path / "nothing"], "partition_1.npz not found"),
        "held": (["--results-dir", held], "already holds a run"),
        "nobody": (["--start-timeout", 1], f"no coordinator answered at 127.0.0.1:{port}"),
    }
    for name, (extra, _) in cases.items():
        procs.start(name, "peer.py", *peer_args(port, data_dir, tmp_path / name, 1),
                    *extra)
    for name, (_, words) in cases.items():
        assert procs.wait(name, timeout=60) == 1
        lines = procs.err(name).strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("peer.py: error: ") and words in lines[0]
        assert not list((tmp_path / name).rglob("*.json")) or name == "held"
    assert sorted(p.name for p in (held / "peer_1").iterdir()) == ["metrics.json"]


def test_the_coordinator_port_of_a_finished_run_is_free_and_a_live_one_is_not():
    """demo.py (server on 8080) and then demo.py --engine gossip (coordinator on 8080): the
    first run's connections linger in TIME_WAIT, which does not stop a new listener (gRPC
    binds with SO_REUSEADDR); a port with a listener is refused in one line."""
    from federation.gossip_transport import coordinator_problem  # noqa: PLC0415

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the listening side closes first: its end waits in TIME_WAIT
        client.close()
        assert coordinator_problem(f"127.0.0.1:{port}", 0, 1.0).startswith(
            f"peer 0 cannot run the coordinator on port {port}")  # still listening
    assert coordinator_problem(f"127.0.0.1:{port}", 0, 1.0) is None
