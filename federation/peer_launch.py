"""N peer.py processes on one machine: start them, follow their metrics, stop them.

demo.py --engine gossip runs a decentralised run with this; each peer writes its own
RESULTS_DIR/peer_RANK/metrics.json, and a round is done once every peer has saved it.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]


def start_peers(peers: int, flags: Sequence[str], log_dir: pathlib.Path,
                children: dict[str, subprocess.Popen], env: dict | None = None) -> None:
    """Start `python peer.py --rank I --peers N FLAGS` for every rank, each in its own
    session (a Ctrl-C in the terminal reaches only the caller, who stops them in order),
    its output in log_dir/peer_I.log; each is added to `children` as soon as it runs."""
    env = dict(env or os.environ, PYTHONUNBUFFERED="1")
    for rank in range(peers):
        with open(log_dir / f"peer_{rank}.log", "w") as log:
            children[f"peer_{rank}"] = subprocess.Popen(
                [sys.executable, str(REPO / "peer.py"), "--rank", str(rank), "--peers",
                 str(peers), *flags], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def round_summary(results_dir: pathlib.Path, peers: int, server_round: int,
                  since: float = 0.0) -> dict | None:
    """Mean and worst peer test accuracy and the network's neighbour distance after a
    round, once every peer has saved it (None before). A metrics.json older than `since`
    (a time.time()) is an earlier run's, which this run replaces once it has started."""
    records = []
    for rank in range(peers):
        path = results_dir / f"peer_{rank}" / "metrics.json"
        try:
            if path.stat().st_mtime < since:
                return None
            saved = json.loads(path.read_text())
            records.append(next(r for r in saved if r["round"] == server_round))
        except (OSError, ValueError, StopIteration, KeyError, TypeError):
            return None
    accuracies = [r["test_accuracy"] for r in records]
    return {"round": server_round, "mean_test_accuracy": sum(accuracies) / peers,
            "worst_test_accuracy": min(accuracies),
            "mean_neighbour_distance": records[0]["mean_neighbour_distance"],
            "round_seconds": max(r["round_seconds"] or 0.0 for r in records)}


def follow_peers(children: dict[str, subprocess.Popen], results_dir: pathlib.Path,
                 rounds: int, on_round: Callable[[dict], None],
                 on_wait: Callable[[int], None] | None = None) -> str | None:
    """Call on_round(summary) for rounds 0..rounds as the peers finish them.

    Returns None once every peer has exited with status 0, else the name of the first
    peer that failed (the others stop by themselves within peer.py's --timeout).
    """
    peers, next_round, since = len(children), 0, time.time()
    while True:
        while next_round <= rounds and (s := round_summary(results_dir, peers, next_round,
                                                           since)):
            on_round(s)
            next_round += 1
        failed = [name for name, p in children.items() if p.poll() not in (None, 0)]
        if failed:
            return failed[0]
        if all(p.poll() == 0 for p in children.values()):
            return None
        if on_wait is not None:
            on_wait(next_round)
        time.sleep(0.25)


def stop_peers(children: dict[str, subprocess.Popen], grace: float = 10.0) -> list[int]:
    """SIGTERM every live peer (peer.py saves nothing half and says its last saved
    round), SIGKILL whatever is left after `grace` s; returns the PIDs that outlived that."""
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in children.values():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            proc.kill()
    left = []
    for proc in children.values():
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            left.append(proc.pid)
    return left
