"""One peer of a run with no server: what peer.py runs, in its worker process.

peer.py parses the flags and starts this in a child process (federation/peer_supervisor.py
says why: JAX's multi-process runtime ends a process with a fatal log that only a parent
can turn into one line). Here: check the data and the results directory, join the run
(federation/gossip_transport.py), agree with the others on the settings and the round to
resume after, then train (federation/peer_round.py) and gossip with the neighbours
(federation/gossip.py) round after round, saving each round atomically. A peer that
dies or hangs is named by the others within --timeout; every stop says one line.
"""

import argparse
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np

import model
from federation import (compile_cache, gossip, gossip_transport, memory, peer_round,
                        peer_supervisor, run_lock, shards)
from federation.mnist_client import load_client_data  # the client's checks: range, manifest hash
from federation.peer_round import GossipSettings
from federation.results import ResultsDir

PROG = "peer.py"
GRACE = 2.0  # s past --timeout for peers stuck in the same exchange to say so (failed/R)


class PeerError(Exception):
    """A problem found before training (settings, data, results, peers); one line."""


@dataclasses.dataclass
class State:
    """Where this peer stands, for the one line it says when it stops early."""

    results_dir: pathlib.Path
    rank: int = 0
    peers: int = 0
    timeout: float = 0.0
    connected: bool = False     # in the run's coordination service
    last_saved: int | None = None
    neighbours: tuple[int, ...] = ()
    diagnosing: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    saving: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def saved(self) -> str:
        """E.g. "round 2 is its last saved round in results/peer_1"."""
        if self.last_saved is None:
            return f"nothing was saved in {self.results_dir}"
        return f"round {self.last_saved} is its last saved round in {self.results_dir}"


def stop(state: State, text: str, code: int, missing: Sequence[int] = ()) -> None:
    """Say one line and leave at once (between two saves, never inside one).

    Peer 0 runs the coordination service, and JAX ends every process whose service
    vanishes, with a fatal log of its own: so the others say that they stop (one key
    each) and peer 0 leaves last, once every live peer has, or after --timeout.
    """
    with state.saving:
        print(f"{PROG}: {text}; {state.saved()} (restart every peer with --resume)",
              file=sys.stderr, flush=True)
        if state.connected:
            try:
                gossip_transport.publish(f"stopped/{state.rank}", "1")
                if state.rank == 0:
                    gossip_transport.wait_for_ranks(
                        "stopped", [r for r in range(state.peers) if r not in missing],
                        state.timeout)
            except Exception:  # noqa: BLE001  (leaving anyway: the others time out too)
                pass
        leave(state, code)


def quit_orphaned(state: State) -> None:
    """peer.py's process is gone (killed): leave too, between two saves."""
    with state.saving:
        leave(state, 1)


def leave(state: State, code: int) -> None:
    """Let go of the results directory, then exit at once (gossip_transport.leave_now)."""
    run_lock.release(state.results_dir)  # os._exit skips run_lock's atexit hook
    gossip_transport.leave_now(code)


def stop_on_signals(state: State) -> None:
    """SIGINT/SIGTERM end the peer at once, even inside a collective.

    A Python signal handler runs only when the main thread is back in Python, and a
    peer spends its waits inside JAX's C++ (the exchange, the key-value store); JAX's
    preemption notifier also takes SIGTERM for itself. So the signals only wake a
    thread (signal.set_wakeup_fd), which stops the process.
    """
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)

    def watch() -> None:
        signum = os.read(read, 1)[0]
        stop(state, f"stopped by {signal.Signals(signum).name}", 128 + signum)
    threading.Thread(target=watch, daemon=True, name="signals").start()


def run_config(args: argparse.Namespace, settings: GossipSettings, manifest: str) -> dict:
    """Every setting of this peer's run, and what identifies its data and model."""
    return {**dataclasses.asdict(settings), "peers": args.peers, "rank": args.rank,
            "coordinator": args.coordinator, "timeout": args.timeout,
            "data_dir": str(args.data_dir), "results_dir": str(results_dir(args)),
            "manifest_sha256": manifest,
            "model": {name: "x".join(map(str, shape)) for name, shape in model.param_spec()},
            "versions": {p: importlib.metadata.version(p) for p in ("flwr", "jax", "numpy")},
            "resumed_after": []}


def results_dir(args: argparse.Namespace) -> pathlib.Path:
    """RESULTS_DIR/peer_RANK."""
    return pathlib.Path(args.results_dir) / f"peer_{args.rank}"


def prepare(args: argparse.Namespace, state: State) -> tuple:
    """Everything before connecting: data, settings, results directory (locked).

    Returns (settings, partition, test set, ResultsDir, config, records, model: None for
    a new run). No JAX here: jax.distributed.initialize must come before JAX's backend.
    """
    settings = GossipSettings(args.topology, rounds=args.rounds, local_epochs=args.local_epochs,
                              seed=args.seed)
    data = load_client_data(args.data_dir, args.rank)
    test_set = shards.load_test_set(shards.test_set_path(args.data_dir))
    config = run_config(args, settings, shards.manifest_sha256(args.data_dir))
    names = [name for name, _ in model.param_spec()]
    results = ResultsDir(state.results_dir, names, peer_round.PEER_FIELDS)
    problem = results.problem()
    if problem:
        raise PeerError(f"--results-dir: {problem}")
    try:
        run_lock.acquire(state.results_dir)  # one live run per directory, as server.py
    except run_lock.Busy as e:
        raise PeerError(str(e)) from None
    if not args.resume and not args.overwrite and results.run_files():
        raise PeerError(f"{state.results_dir} already holds a run: continue it with --resume, "
                        "replace it with --overwrite, or choose another --results-dir")
    if not args.resume:
        return settings, data, test_set, results, config, [], None
    try:
        saved, records, arrays = results.load_checkpoint()
        shapes = [(np.shape(a), np.asarray(a).dtype) for a in arrays]
        if shapes != [(shape, np.float32) for _, shape in model.param_spec()]:
            raise ValueError(f"its model does not fit model.py ({shapes})")
    except ValueError as e:
        raise PeerError(f"cannot resume: {e}") from None
    for key in peer_round.RESUME_MUST_MATCH:
        if saved.get(key) != config[key]:
            raise PeerError(f"cannot resume {state.results_dir}: {key} was {saved.get(key)!r}, "
                            f"now {config[key]!r}; resume with the same settings, or start "
                            "a new run with --overwrite")
    config["resumed_after"] = saved.get("resumed_after", [])
    state.last_saved = records[-1]["round"] if records else None  # what the stop line says
    return settings, data, test_set, results, config, records, arrays


def agree(args: argparse.Namespace, config: dict, records: list[dict]) -> int:
    """Check that every peer runs the same computation; return the round all resume after.

    Each peer publishes its settings and its last saved round (scalars, through the
    coordination service). A peer that died between the exchange and its save is one
    round behind the others: all go back to the earliest saved round (every round's
    model is kept), so they continue in step and bit-identically.
    """
    shared = ("topology", "peers", "seed", "rounds", "local_epochs", "batch_size",
              "client_optimizer", "learning_rate", "manifest_sha256")
    mine = {k: config[k] for k in shared}
    gossip_transport.publish(f"config/{args.rank}", json.dumps(mine))
    for rank, text in enumerate(gossip_transport.wait_for_all(
            "config", args.peers, args.start_timeout, "the start")):
        theirs = json.loads(text)
        for key in shared:
            if theirs[key] != mine[key]:
                raise PeerError(f"peer {rank} runs with {key} {theirs[key]!r}, this peer with "
                                f"{mine[key]!r}: start every peer with the same settings and data")
    done = records[-1]["round"] if records else -1
    gossip_transport.publish(f"resume/{args.rank}", str(done))
    rounds = [int(v) for v in gossip_transport.wait_for_all("resume", args.peers,
                                                             args.start_timeout, "the start")]
    if -1 in rounds and max(rounds) >= 0:
        fresh = [r for r, d in enumerate(rounds) if d < 0]
        raise PeerError(f"peer(s) {fresh} start a new run while others resume: give every "
                        "peer --resume, or every peer --overwrite")
    return min(rounds)


def run(args: argparse.Namespace, state: State) -> None:
    """Prepare, connect, agree, then train and gossip until --rounds are done."""
    settings, data, test_set, results, config, records, arrays = prepare(args, state)
    topo = gossip.topology(settings.topology, args.peers)
    w = gossip.metropolis_hastings(topo)
    cache = compile_cache.enable(args.jax_cache)
    problem = gossip_transport.coordinator_problem(args.coordinator, args.rank,
                                                   args.start_timeout)
    if problem:
        raise PeerError(problem)
    peer_supervisor.expect(f"{PROG}: error: peer {args.rank} cannot join the run at "
                           f"{args.coordinator}: {{reason}}")
    try:
        gossip_transport.connect(args.coordinator, args.peers, args.rank, args.start_timeout,
                                 args.timeout)
    except Exception as e:  # jaxlib's XlaRuntimeError: nobody answered, or a rank clash
        raise PeerError(connect_problem(args, e)) from None
    state.connected = True
    expect_stop(state)
    stop_on_signals(state)  # after initialize, whose preemption notifier takes SIGTERM
    if arrays is None:
        arrays = peer_round.initial_model(args.seed)
    start = agree(args, config, records)
    if records:
        records = [r for r in records if r["round"] <= start]
        arrays = results.load_arrays(results.model_path(start))
        if start >= settings.rounds:
            print(f"{state.results_dir} already holds round {start} of {settings.rounds}; raise "
                  "--rounds to continue the run", flush=True)
            return
        config["resumed_after"].append(start)
    # The run has really started: only now is a previous run's directory replaced.
    results.begin(config, clear=args.overwrite and not args.resume)
    exchange = gossip_transport.Exchange(topo, args.rank)
    state.neighbours = tuple(topo.neighbours(args.rank))
    evaluate = peer_round.test_evaluator(*test_set)
    with compile_cache.compiling("peer warm-up"):
        model.compile_steps(settings.batch_size, model.EVAL_BATCH_SIZE)
    print(f"peer {args.rank}/{args.peers} on a {topo.name} (neighbours "
          f"{topo.neighbours(args.rank)}, |λ₂| {gossip.second_eigenvalue(w):.3f}); "
          f"{len(data.x_train)} training examples; JAX cache: {cache or 'off'}", flush=True)
    if not records:
        save(state, results, records, arrays, peer_round.record(
            0, args.rank, peer_round.evaluate(data, arrays, args.rank, evaluate), {}, None,
            arrays, None, topo.degree(args.rank)), 0.0)
    for r in range(start + 1 if start >= 0 else 1, settings.rounds + 1):
        began = time.perf_counter()
        trained, train_metrics = peer_round.train(data, arrays, settings, r, args.rank)
        gossip_transport.publish(f"ready/{r}/{args.rank}", "1")
        gossip_transport.wait_for_all(f"ready/{r}", args.peers, args.timeout,
                                      f"round {r}'s exchange")
        began_exchange = time.monotonic()
        watchdog = threading.Timer(args.timeout, exchange_broke, (state, r, began_exchange))
        watchdog.daemon = True
        watchdog.start()
        try:
            received, failure = exchange(trained), None
        except Exception as e:  # gloo: a peer's connection broke
            received, failure = None, e
        finally:
            watchdog.cancel()
        if failure is not None:
            exchange_broke(state, r, began_exchange, failure)
        arrays = gossip.mix_row(w, args.rank, {args.rank: trained, **received})
        own = gossip.distance(trained, arrays)
        gossip_transport.publish(f"distance/{r}/{args.rank}", repr(own))
        distances = [float(v) for v in gossip_transport.wait_for_all(
            f"distance/{r}", args.peers, args.timeout, f"the end of round {r}",
            also=(f"failed/{r}",))]
        record = peer_round.record(r, args.rank,
                                   peer_round.evaluate(data, arrays, args.rank, evaluate),
                                   train_metrics, trained, arrays, distances,
                                   topo.degree(args.rank))
        save(state, results, records, arrays, record, time.perf_counter() - began)
        print(f"round {r}/{settings.rounds}  peer {args.rank}  test accuracy "
              f"{100 * record['test_accuracy']:.2f}%  neighbour distance {own:.4f}  network "
              f"{record['mean_neighbour_distance']:.4f}  ({record['round_seconds']:.1f} s)",
              flush=True)
    print(f"done: peer {args.rank}'s model in {state.results_dir / 'global_model.npz'}",
          flush=True)


def exchange_broke(state: State, r: int, began: float, error: Exception | None = None) -> None:
    """Round r's exchange failed (`error`) or has not returned within --timeout: stop.

    The main thread calls this when gloo raises; the watchdog thread when the main
    thread is still inside gloo after --timeout. The first of the two says why and ends
    the process; the second waits for it. gloo's error names no rank, so this peer says
    under failed/R that it cannot finish round R, and the ranks that neither say so
    nor finish the round (distance/R) are the ones gone. Every live peer has done one
    or the other by --timeout past the exchange's start (its error or its watchdog),
    plus a short grace.
    """
    if not state.diagnosing.acquire(blocking=False):
        threading.Event().wait()  # the other thread is saying why; it ends the process
    try:
        gossip_transport.publish(f"failed/{r}/{state.rank}", "1")
        gone = gossip_transport.absent((f"distance/{r}", f"failed/{r}"), state.peers,
                                       began + state.timeout + GRACE - time.monotonic())
    except gossip_transport.CoordinatorLost:
        gone = []
    if gone:
        who = (f"{gossip_transport.ranks_named(gone)} {'is' if len(gone) == 1 else 'are'} "
               "gone or hung")
    else:
        who = f"the link to a neighbour ({', '.join(map(str, state.neighbours))}) broke"
    what = (f"round {r}'s exchange failed: {who} ({gossip_transport.first_line(error)})"
            if error is not None else
            f"round {r}'s exchange did not finish within {state.timeout:g} s: {who}")
    stop(state, f"peer {state.rank} stops: {what}", 1, gone)


def save(state: State, results: ResultsDir, records: list[dict], arrays: gossip.Arrays,
         record: dict, seconds: float) -> None:
    """Append the round's record and save it with the model (never cut by a stop)."""
    record["round_seconds"] = round(seconds, 3)
    records.append(record)
    with state.saving:
        results.save_round(records, arrays)
        state.last_saved = record["round"]
        expect_stop(state)


def expect_stop(state: State) -> None:
    """The line peer.py says for this peer if JAX's fatal log ends it now."""
    peer_supervisor.expect(f"{PROG}: peer {state.rank} stops: {{reason}}; {state.saved()} "
                           "(restart every peer with --resume)")


def connect_problem(args: argparse.Namespace, error: Exception) -> str:
    """One line for a failed jax.distributed.initialize."""
    text = gossip_transport.first_line(error)
    if args.rank == 0 and ("bind" in text.lower() or "address" in text.lower()):
        return f"cannot run the coordinator on {args.coordinator}: {text}"
    if "DEADLINE_EXCEEDED" in text or "timed out" in text.lower() or "UNAVAILABLE" in text:
        return (f"no coordinator (peer 0) and peers answered at {args.coordinator} within "
                f"{args.start_timeout:g} s; start peer 0 with the same --coordinator and all "
                f"--peers {args.peers} peers ({text})")
    return f"cannot join the run at {args.coordinator}: {text}"


def main(args: argparse.Namespace) -> None:
    """Run this peer (peer.py's flags); one line on stderr and a non-zero exit on failure."""
    memory.limit_malloc_arenas()  # before XLA starts its threads
    state = State(results_dir(args), args.rank, args.peers, args.timeout)
    peer_supervisor.follow_parent(lambda: quit_orphaned(state))
    try:
        run(args, state)
    except (PeerError, shards.DataError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        leave(state, 1)  # others may be gone: no exit-time barrier
    except (gossip_transport.PeerMissing, gossip_transport.CoordinatorLost) as e:
        what = (f"lost the coordinator at {args.coordinator} (peer 0): {e}"
                if isinstance(e, gossip_transport.CoordinatorLost) else str(e))
        stop(state, f"peer {args.rank} stops: {what}", 1, getattr(e, "ranks", ()))
    except KeyboardInterrupt:  # before the signal thread started: nothing was written
        print(f"{PROG}: interrupted before the run started", file=sys.stderr)
        leave(state, 130)


if __name__ == "__main__":
    main()
