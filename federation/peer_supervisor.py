"""Speak for a peer that JAX's multi-process runtime ends: one line, not a fatal log.

jax.distributed ends a process with a fatal log (SIGABRT and a C++ stack trace, dozens
of lines) whenever its coordination service reports an error: a second process joined
with the same rank, not every peer arrived within the start timeout, or the coordinator
(peer 0's process) vanished mid-run. Nothing inside that process can step in: jaxlib's
hook for these errors (`missed_heartbeat_callback` of get_distributed_runtime_client)
cannot be used from Python in jaxlib 0.10 (there is no conversion for its absl::Status
argument: the call fails with std::bad_cast), and a SIGABRT raised in C++ never reaches
a Python handler.

So peer.py runs the peer as a child process, the worker, and stays a small parent that
imports no JAX (`run_worker`): it relays the worker's output, keeps JAX's own log lines
aside, forwards SIGINT and SIGTERM, and when JAX's fatal log ends the worker it prints
the one line the worker left for that case (`expect`), with the reason read from the
log. A worker whose parent is gone (say, SIGKILLed) leaves within a second
(`follow_parent`).
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

ENV_VAR = "FL_PEER_SUPERVISOR_FD"  # set in the worker: the pipe its lines for the parent go to

# glog's line prefix (severity, date, time, thread, file:line]): JAX's C++ log lines.
_GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] ")
_FATAL = re.compile(r"^F\d{4} ")

# What JAX's fatal log says, and what it means for a peer (jaxlib 0.10's wording;
# tests/test_peer.py makes each of them happen).
_REASONS = (
    (re.compile(r"ALREADY_EXISTS.*incarnation", re.S),
     "another process joined the run with the same --rank"),
    (re.compile(r"DEADLINE_EXCEEDED.*RegisterTask", re.S),
     "not every peer joined within --start-timeout (one is not started, or has another "
     "--peers or --coordinator)"),
    (re.compile(r"UNAVAILABLE|PollForError|heartbeat", re.I),
     "the coordinator stopped answering: peer 0 is gone"),
)


def in_worker() -> bool:
    """True in the worker process that run_worker started."""
    return ENV_VAR in os.environ


def run_worker(command: Sequence[str]) -> int:
    """Run the worker to its end and return the exit status to leave with.

    The worker's stdout is this process's; its stderr is relayed line by line, except
    JAX's log lines, which are kept aside: when the worker ends by JAX's fatal log, one
    line (expect's, with the reason) replaces them all; otherwise they follow at the end.
    The worker runs in its own process group, so that a Ctrl-C in the terminal reaches
    it once, from here.
    """
    notes_read, notes_write = os.pipe()
    worker = subprocess.Popen(command, stderr=subprocess.PIPE,
                              env={**os.environ, ENV_VAR: str(notes_write)},
                              pass_fds=(notes_write,), process_group=0)
    os.close(notes_write)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _frame: _forward(worker, signum))
    notes: list[str] = []
    reader = threading.Thread(target=_read_notes, args=(notes_read, notes), daemon=True)
    reader.start()
    held, fatal = [], []
    for raw in worker.stderr:
        line = raw.decode(errors="replace")
        if fatal or _FATAL.match(line):
            fatal.append(line)
        elif _GLOG.match(line):
            held.append(line)
        else:
            sys.stderr.write(line)
            sys.stderr.flush()
    code = worker.wait()
    reader.join(timeout=1.0)
    if code < 0 and notes and (fatal or code != -signal.SIGABRT):
        why = reason("".join(fatal)) if fatal else (
            f"its process was ended by {signal.Signals(-code).name}")
        print(notes[-1].replace("{reason}", why), file=sys.stderr, flush=True)
        return 1 if fatal else 128 - code
    sys.stderr.writelines(held + fatal)
    sys.stderr.flush()
    return code if code >= 0 else 128 - code


def reason(log: str) -> str:
    """What JAX's fatal log means, in a peer's terms (its status line if not known)."""
    for pattern, meaning in _REASONS:
        if pattern.search(log):
            return meaning
    status = re.search(r"absl::Status: ([^\n]*)", log)
    return f"JAX's distributed runtime failed: {status[1] if status else log.strip()[:200]}"


def expect(line: str) -> None:
    """In the worker: the line the parent prints if JAX's fatal log ends this process
    from now on; "{reason}" in it becomes what the log says. A no-op outside a worker."""
    fd = os.environ.get(ENV_VAR)
    if fd is not None:
        try:
            os.write(int(fd), (line.replace("\n", " ") + "\n").encode())
        except OSError:  # the parent is gone: follow_parent ends this process
            pass


def follow_parent(on_orphan: Callable[[], None], every: float = 0.5) -> None:
    """In the worker: call on_orphan() (which should exit) once the parent is gone."""
    if not in_worker():
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        on_orphan()
    threading.Thread(target=watch, daemon=True, name="parent").start()


def _forward(worker: subprocess.Popen, signum: int) -> None:
    if worker.poll() is None:
        worker.send_signal(signum)


def _read_notes(fd: int, notes: list[str]) -> None:
    with os.fdopen(fd, "rb") as pipe:
        for raw in pipe:
            notes.append(raw.decode(errors="replace").rstrip("\n"))
