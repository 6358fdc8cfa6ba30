"""One live run per directory: a lock held for the whole run, with its owner written beside it.

A second server.py pointed at the results directory of a run that is still going would
delete that run's models (--overwrite) or rewrite its run_config.json (--resume) under
it, and the first run would finish into a directory it no longer matches. So every
process that writes a results directory (server.py and the ServerApp, through
server_setup.build_strategy; demo.py for its logs/) takes that directory's lock before
it reads or writes anything there, and keeps it until its run ends:

- the lock: the operating system's exclusive lock (flock) on the directory itself, taken
  with the filelock package's ``lock_descriptor``. The kernel drops it when the holder
  exits, however it exits (SIGKILL and power loss included), so a crashed run never
  blocks the next one, and nothing needs cleaning up. filelock's ``FileLock`` would
  lock a ``.lock`` file that it creates in the directory; locking the directory's own
  descriptor (possible on Linux and macOS, where this tutorial runs) adds no file
  there, and it is the same library's lock.
- the owner: a lock says nothing about who holds it, so the holder writes
  ``.run_owner.json`` (PID, host, command line, start time) into the directory, by a
  temporary file and os.replace, and deletes it when it lets go. A refused process reads
  it to say which run is alive. A holder killed by SIGKILL leaves it behind: it is only
  believed while the lock is held and its PID is alive, and the next holder replaces it.

A process holds a directory's lock from acquire() until release() or its exit (an
atexit hook then removes its owner file). Locks are per process: acquire() on a
directory this process already holds is a no-op.
"""

import atexit
import datetime
import json
import os
import pathlib
import shlex
import socket
import sys

import filelock

from federation.results import write_atomic

OWNER_FILE = ".run_owner.json"
COMMAND_CHARS = 160  # a refusal quotes the live command line up to this length

_held: dict[pathlib.Path, int] = {}  # directory -> the open descriptor that holds its lock
_PID = os.getpid()


class Busy(Exception):
    """Another live process holds the directory's lock; str(e) is one line naming it."""


def _key(directory: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(directory).resolve()


def _open(directory: pathlib.Path) -> int:
    """A read-only descriptor of the directory itself: what the lock is taken on."""
    return os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def acquire(directory: str | os.PathLike) -> None:
    """Take the directory's lock for this process, creating the directory if needed.

    Raises Busy, changing nothing, if another process holds it; OSError if the directory
    cannot be created or opened.
    """
    path = _key(directory)
    if path in _held:
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = _open(path)
    try:
        locked = filelock.lock_descriptor(fd, blocking=False)
    except BaseException:
        os.close(fd)
        raise
    if not locked:
        os.close(fd)
        raise Busy(refusal(directory))
    _held[path] = fd
    try:
        _write_owner(path)
    except BaseException:
        release(path)
        raise


def release(directory: str | os.PathLike) -> None:
    """Let go of the directory's lock (a no-op if this process does not hold it)."""
    path = _key(directory)
    fd = _held.pop(path, None)
    if fd is None:
        return
    try:
        (path / OWNER_FILE).unlink(missing_ok=True)  # while still locked: never a successor's
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def check(directory: str | os.PathLike) -> None:
    """Raise Busy if another process holds the directory's lock. Creates and changes nothing."""
    path = _key(directory)
    if path in _held or not path.is_dir():
        return
    fd = _open(path)
    try:
        if not filelock.lock_descriptor(fd, blocking=False):
            raise Busy(refusal(directory))
        filelock.unlock_descriptor(fd)
    finally:
        os.close(fd)


def refusal(directory: str | os.PathLike) -> str:
    """The one line that says the directory is in use, naming the live run if it is known."""
    return (f"{directory} is in use by a live run ({describe_owner(_key(directory))}); "
            "wait for it to end or stop it, or choose another results directory")


def describe_owner(path: pathlib.Path) -> str:
    """E.g. "PID 4242: python server.py --rounds 5, since 2026-12-05 23:40:07 UTC"."""
    try:
        owner = json.loads((path / OWNER_FILE).read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
        command, started = str(owner["command"]), str(owner["started"])
    except (OSError, ValueError, TypeError, KeyError):
        return "its owner has not recorded itself"
    if host == socket.gethostname() and not _alive(pid):
        # The record of a holder that died (SIGKILL); the live one has not written its own yet.
        return "its owner has not recorded itself"
    command = " ".join(command.split())  # one line, whatever the arguments hold
    if len(command) > COMMAND_CHARS:
        command = command[:COMMAND_CHARS - 3] + "..."
    where = "" if host == socket.gethostname() else f" on {host}"
    return f"PID {pid}{where}: {command}, since {started}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _write_owner(path: pathlib.Path) -> None:
    """Write .run_owner.json by a temporary file and os.replace: a reader never sees half."""
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "command": shlex.join(sys.orig_argv),
             "started": datetime.datetime.now(datetime.timezone.utc).strftime(
                 "%Y-%m-%d %H:%M:%S UTC")}
    text = json.dumps(owner) + "\n"
    write_atomic(path / OWNER_FILE, lambda f: f.write(text.encode()))


@atexit.register
def _release_all() -> None:
    """At exit, remove this process's owner files (the kernel drops the locks by itself)."""
    if os.getpid() != _PID:  # a forked child that exits normally: the locks are its parent's
        return
    for path in list(_held):
        release(path)
