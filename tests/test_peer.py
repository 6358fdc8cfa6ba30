"""peer.py as real processes: 4 peers on a ring on the shards of conftest.py's data_dir.

The processes must give, bit for bit, what federation/gossip_simulation.py computes in
this process (an uninterrupted run); a killed peer must stop the others within --timeout,
each with one line, and --resume on every peer must still end there.
"""

import json
import shutil
import signal
import socket
import time

import numpy as np
import psutil
import pytest

from federation import gossip
from helpers import NUM_PARTITIONS, free_port, processes_mentioning, wait_until

PEERS = 4
ROUNDS = 3
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
    peers = len(simulated.models)
    import model  # noqa: PLC0415
    from federation import results as results_dir  # noqa: PLC0415
    from federation.peer_round import PEER_FIELDS  # noqa: PLC0415
    for rank in range(peers):
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


def test_peers_equal_the_one_process_run_through_two_kills_and_resumes(procs, data_dir,
                                                                       tmp_path, simulated):
    """4 peers on a ring, 3 rounds, stopped twice.

    Peer 2 is SIGKILLed where it is hardest to name: inside an exchange (peers 1 and 3
    are paused until peer 2 waits for them at the next exchange, then go on without it;
    gloo's error names no rank). The others stop within --timeout, each with one line
    naming it and their last saved round. After --resume on all 4, peer.py
    of peer 0 is SIGKILLed once round 2 is saved: its worker follows it, the coordinator
    it ran vanishes, and each other peer says so in one line, where JAX alone would end
    them with a fatal log. A last --resume finishes the run, and every peer's model and
    every record equal the one-process run's, bit for bit. (One test, not three: real
    processes cost seconds each.)"""
    results = tmp_path / "results"
    start_peers(procs, "first", free_port(), data_dir, results, "--timeout", TIMEOUT)
    wait_until(lambda: saved_round(results, 2) >= 1, 180, "peer 2 to save round 1")
    paused = [worker(procs, f"first_{rank}") for rank in (1, 3)]  # not peer 0: the coordinator
    for proc in paused:
        proc.suspend()
    peer_2 = worker(procs, "first_2")
    wait_until(lambda: idle(peer_2), 30, "peer 2 to wait for peers 1 and 3")
    procs.procs["first_2"].send_signal(signal.SIGKILL)  # peer.py; its worker follows
    psutil.wait_procs([peer_2], timeout=10)
    killed = time.monotonic()
    for proc in paused:
        proc.resume()
    for rank in (0, 1, 3):
        assert procs.wait(f"first_{rank}", timeout=2 * TIMEOUT + 60) == 1
        last = procs.err(f"first_{rank}").strip().splitlines()[-1]
        assert_names_peer_2(last, rank, saved_round(results, rank), results)
    assert time.monotonic() - killed < 2 * TIMEOUT + 60  # peer 0 leaves last
    resumed_after = [min(saved_round(results, rank) for rank in range(PEERS))]

    start_peers(procs, "second", free_port(), data_dir, results, "--timeout", 60, "--resume")
    wait_until(lambda: saved_round(results, 0) >= 2, 180, "peer 0 to save round 2")
    peer_0 = worker(procs, "second_0")
    procs.procs["second_0"].send_signal(signal.SIGKILL)  # peer.py's parent process alone
    for rank in (1, 2, 3):
        assert procs.wait(f"second_{rank}", timeout=30) == 1
        lines = procs.err(f"second_{rank}").strip().splitlines()
        assert lines[-1] == (
            f"peer.py: peer {rank} stops: the coordinator stopped answering: peer 0 is gone; "
            f"round {saved_round(results, rank)} is its last saved round in "
            f"{results / f'peer_{rank}'} (restart every peer with --resume)")
        assert not any("Check failure" in line or "@ 0x" in line for line in lines)
    peer_0.wait(timeout=10)  # it followed its parent
    resumed_after.append(min(saved_round(results, rank) for rank in range(PEERS)))

    start_peers(procs, "third", free_port(), data_dir, results, "--timeout", 60, "--resume")
    for rank in range(PEERS):
        assert procs.wait(f"third_{rank}", timeout=180) == 0, procs.log(f"third_{rank}")
    assert_equal_to(simulated, results)
    # All resume after the earliest round every peer saved: where the kills landed.
    assert resumed_after[0] >= 1 and resumed_after[1] >= 1
    assert json.loads((results / "peer_0" / "run_config.json").read_text())[
        "resumed_after"] == resumed_after
    assert "round 3/3  peer 1  test accuracy" in procs.out("third_1")
    # The peers drift apart while they train and gossip pulls them back: by round 2, less
    # than after round 1 (round 3 drifts again a little, 0.877 -> 0.904: training on
    # unequal shards keeps pushing them apart).
    summaries = [r.summary for r in simulated.rounds]
    assert 0 < summaries[2]["consensus_distance"] < summaries[1]["consensus_distance"]
    network = [r["mean_neighbour_distance"] for r in
               json.loads((results / "peer_0" / "metrics.json").read_text())]
    assert 0 < network[2] < network[1]
    import plot_results  # noqa: PLC0415  (matplotlib: only here)
    peers = plot_results.load_peers(results)
    assert [len(p) for p in peers] == [ROUNDS + 1] * PEERS
    assert plot_results.plot_peers(peers, tmp_path / "peers.png").stat().st_size > 10_000


def worker(procs, name: str) -> psutil.Process:
    """The peer itself: peer.py's child (federation/peer_worker.py)."""
    return psutil.Process(procs.procs[name].pid).children()[0]


def idle(proc: psutil.Process) -> bool:
    """Blocked (under 0.05 s of CPU in 1 s): a peer that waits for the others."""
    before = sum(proc.cpu_times()[:2])
    time.sleep(1.0)
    return sum(proc.cpu_times()[:2]) - before < 0.05


def assert_names_peer_2(line: str, rank: int, saved: int, results) -> None:
    """The line a peer says when peer 2 died inside the exchange of the round after
    `saved` (>= 1, the round the others saved last): the peer's own exchange broke
    (gloo's error) or hung (its watchdog); either way peer 2 is named."""
    r = saved + 1
    assert saved >= 1, line
    tail = (f"; round {saved} is its last saved round in {results / f'peer_{rank}'} "
            "(restart every peer with --resume)")
    assert line.endswith(tail), line
    head = line[:-len(tail)]
    prefix = f"peer.py: peer {rank} stops: round {r}'s exchange "
    assert (head.startswith(f"{prefix}failed: peer 2 is gone or hung (") or
            head == f"{prefix}did not finish within {TIMEOUT} s: peer 2 is gone or hung"), line


def saved_round(results, rank: int) -> int:
    """The last round peer `rank` saved (-1: none yet)."""
    try:
        return json.loads((results / f"peer_{rank}" / "metrics.json").read_text())[-1]["round"]
    except (OSError, ValueError, IndexError, KeyError):
        return -1


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
    """A missing shard, a shard from another split, a results directory that holds a
    run, nobody at the coordinator, a rank taken twice while another never comes: one
    line each, a non-zero exit, nothing written."""
    port, clash = free_port(), free_port()
    held = tmp_path / "held"
    (held / "peer_1").mkdir(parents=True)
    (held / "peer_1" / "metrics.json").write_text("[]")
    foreign = shutil.copytree(data_dir, tmp_path / "foreign_data")
    shutil.copyfile(foreign / "partition_0.npz", foreign / "partition_1.npz")  # valid, not 1
    cases = {
        "shard": (1, ["--data-dir", tmp_path / "nothing"], "partition_1.npz not found"),
        "foreign": (1, ["--data-dir", foreign], f"{foreign}/partition_1.npz is not the shard "
                    f"that {foreign}/manifest.json describes (its SHA-256 is "),
        "held": (1, ["--results-dir", held], "already holds a run"),
        "nobody": (1, ["--start-timeout", 1], f"no coordinator answered at 127.0.0.1:{port}"),
    }
    for name, (rank, extra, _) in cases.items():
        procs.start(name, "peer.py", *peer_args(port, data_dir, tmp_path / name, rank), *extra)
    # Peers 0, 1 and 1 again of 3 (peer 2 never comes): JAX would end all three with a
    # fatal log; peer.py's parent says one line for each (federation/peer_supervisor.py).
    for name, rank in (("twice_0", 0), ("twice_1", 1), ("twice_1_again", 1)):
        procs.start(name, "peer.py", *peer_args(clash, data_dir, tmp_path / name, rank),
                    "--peers", 3, "--start-timeout", 8)
        time.sleep(1.0)  # the second rank 1 joins after the first
    joined = f"peer.py: error: peer {{}} cannot join the run at 127.0.0.1:{clash}: "
    late = joined + ("not every peer joined within --start-timeout (one is not started, or "
                     "has another --peers or --coordinator)")
    twice = joined + "another process joined the run with the same --rank"
    for name, (_, _, words) in cases.items():
        assert procs.wait(name, timeout=60) == 1
        lines = procs.err(name).strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("peer.py: error: ") and words in lines[0]
        assert not list((tmp_path / name).rglob("*.json")) or name == "held"
    said = {}
    for name in ("twice_0", "twice_1", "twice_1_again"):
        assert procs.wait(name, timeout=60) == 1, procs.log(name)
        lines = [line for line in procs.err(name).strip().splitlines() if "warm-up" not in line]
        assert len(lines) == 1 and lines[0].startswith("peer.py: error: peer "), lines
        said[name] = lines[0]
        # JAX's abort leaves the run lock's owner note, as a SIGKILL would (run_lock.py
        # takes no notice of a dead owner's note); nothing else.
        assert {p.name for p in (tmp_path / name).rglob("*") if p.is_file()} <= {
            ".run_owner.json"}
    assert said["twice_0"] == late.format(0)
    # The older of the two is refused (the first, unless the machine is slow to start
    # it); the newer waits for peer 2 with peer 0.
    assert {said["twice_1"], said["twice_1_again"]} == {twice.format(1), late.format(1)}
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


def test_demo_runs_the_peers_to_the_one_process_result_and_ctrl_c_stops_them(procs, data_dir,
                                                                            tmp_path):
    """demo.py --engine gossip, twice at once on conftest's 5 shards: a 2-round run ends
    with every peer's model and records equal to the one-process run's (no kill: the
    uninterrupted processes); a 20-round run gets SIGINT once every peer saved round 1 and
    ends with status 130, one line naming the last round every peer saved, no process
    left and no file changed afterwards."""
    from federation import gossip_simulation, shards  # noqa: PLC0415
    from federation.peer_round import GossipSettings  # noqa: PLC0415
    runs = {"whole": (tmp_path / "whole", 2), "stopped": (tmp_path / "stopped", 20)}
    for name, (results, rounds) in runs.items():
        procs.start(name, "demo.py", "--engine", "gossip", "--clients", NUM_PARTITIONS,
                    "--rounds", rounds, "--local-epochs", 1, "--data-dir", data_dir,
                    "--results-dir", results, "--port", free_port())
    stopped = tmp_path / "stopped"
    wait_until(lambda: all(saved_round(stopped, r) >= 1 for r in range(NUM_PARTITIONS)), 180,
               "every peer of the stopped run to save round 1")
    procs.procs["stopped"].send_signal(signal.SIGINT)
    assert procs.wait("stopped", 60) == 130, procs.log("stopped")
    assert not processes_mentioning(str(stopped))
    last = {r: saved_round(stopped, r) for r in range(NUM_PARTITIONS)}
    assert procs.err("stopped").strip().splitlines()[-1] == (
        "demo.py: stopped by SIGINT: every process it started has ended; round "
        f"{min(last.values())} is the last round every peer saved in {stopped}/peer_*/")
    files = {p: p.stat().st_mtime_ns for p in stopped.rglob("*") if p.is_file()}
    time.sleep(3)
    assert {p: p.stat().st_mtime_ns for p in stopped.rglob("*") if p.is_file()} == files

    assert procs.wait("whole", 180) == 0, procs.log("whole")
    out = procs.out("whole")
    assert "round 2/2  accuracy mean" in out and "5 peers on a ring" in out
    partitions, test_set = shards.load_all(data_dir)
    assert_equal_to(gossip_simulation.run(GossipSettings("ring", rounds=2, local_epochs=1),
                                          partitions, test_set), tmp_path / "whole")
    assert (tmp_path / "whole" / "accuracy.png").stat().st_size > 10_000
