"""Compile once per machine, not once per process: JAX's persistent compilation cache.

Every client.py and server.py is a fresh Python process, and XLA compiles a process's
programs (the training step, evaluation, the shuffle, ...) the first time it runs them:
seconds of CPU and ~100 MB of memory each time, ten times over when ten clients start
together. JAX can keep compiled programs on disk (its persistent compilation cache,
https://docs.jax.dev/en/latest/persistent_compilation_cache.html), so the second and
later processes load them instead. This file turns that cache on, in one place for
client.py, server.py, demo.py (through the environment of its children) and the tests:

- where: ``--jax-cache DIR`` on each script, else the environment variable
  ``FL_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/flower-jax-tutorial/jax`` (by default
  ``~/.cache/flower-jax-tutorial/jax``). The value ``off`` turns the cache off.
- what: every program, however small or quick to compile (JAX's own defaults skip
  programs that compile in under a second, which is all of ours, one by one).
- when ten processes start at once on a cold cache: ``compiling()`` is a file lock
  (the ``filelock`` package; flock, so a crashed holder releases it) around a process's
  warm-up. The first process compiles and fills the cache while the others wait, then
  they all load from the cache at once, instead of ten processes compiling the same
  programs side by side on two cores. (Everyone holding the lock in turn would queue
  even the loads: ten clients took ~10 s to get through a warm cache that way.)

The cache is keyed by JAX on the program, the jax/jaxlib version, the XLA flags and the
machine's CPU, so a stale entry is never used; deleting the directory is always safe.
Call ``enable`` before anything is compiled: JAX decides once per process whether to
use the cache, at its first compilation.
"""

import argparse
import contextlib
import os
import pathlib
import time
from collections.abc import Iterator
from logging import INFO, WARNING

from federation import cli

ENV_VAR = "FL_JAX_CACHE_DIR"
OFF = "off"
LOCK_TIMEOUT = 300.0  # seconds; past that a waiting process compiles by itself

_enabled: pathlib.Path | None = None


def default_dir() -> pathlib.Path:
    """The user-level default: $XDG_CACHE_HOME (or ~/.cache)/flower-jax-tutorial/jax."""
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "flower-jax-tutorial" / "jax"


def add_flag(parser: argparse.ArgumentParser,
             shared_by: str = "every process on this machine") -> None:
    """--jax-cache DIR, as every script that compiles (or starts processes that do) has it."""
    parser.add_argument("--jax-cache", metavar="DIR", type=cli.nonempty, default=None,
                        help=f"JAX's persistent compilation cache, shared by {shared_by}; "
                             f"'off' disables it (default: ${ENV_VAR}, else {default_dir()})")


def resolve(flag: str | None = None) -> pathlib.Path | None:
    """The cache directory to use: the flag, else $FL_JAX_CACHE_DIR, else the default.

    Returns None when the chosen value is "off" (or empty): no persistent cache.
    """
    value = flag if flag is not None else os.environ.get(ENV_VAR)
    if value is None:
        return default_dir()
    if value.strip().lower() in (OFF, ""):
        return None
    return pathlib.Path(value).expanduser()


def enable(flag: str | None = None) -> pathlib.Path | None:
    """Point JAX's persistent cache at resolve(flag) and cache every program; returns the dir.

    With "off" it sets nothing and returns None. A directory that cannot be created
    turns the cache off with a warning rather than stopping the process.
    """
    global _enabled
    import jax  # noqa: PLC0415  (demo.py uses resolve() without importing JAX)
    from flwr.common import log  # noqa: PLC0415

    directory = resolve(flag)
    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log(WARNING, "JAX compilation cache off: cannot create %s (%s)", directory,
                e.strerror)
            directory = None
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        _enabled = None
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Our programs each compile in 0.05-2 s and take 10-500 kB on disk: cache them all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _enabled = directory
    return directory


@contextlib.contextmanager
def compiling(what: str) -> Iterator[None]:
    """Around a warm-up: the first process to arrive compiles, later ones wait, then load.

    `what` names the set of programs (e.g. "client warm-up"); each set has its own lock
    file in the cache directory. The process that gets the lock at once runs the block
    holding it (compiling, or loading if the cache is already warm). A process that finds
    it taken waits until it is released, then runs the block without it: the programs
    are in the cache by then, so the waiters load them side by side instead of queueing.
    A no-op when the cache is off; a lock not freed within LOCK_TIMEOUT seconds (a stuck
    holder) is skipped with a warning.
    """
    if _enabled is None:
        yield
        return
    import filelock  # noqa: PLC0415
    from flwr.common import log  # noqa: PLC0415

    lock = filelock.FileLock(_enabled / f"{what.replace(' ', '-')}.lock")
    held = False
    try:
        lock.acquire(timeout=0)
        held = True
    except filelock.Timeout:  # another process is compiling these programs: let it finish
        start = time.monotonic()
        try:
            with lock.acquire(timeout=LOCK_TIMEOUT):
                pass
            log(INFO, "%s: waited %.1f s for another process to fill the JAX cache", what,
                time.monotonic() - start)
        except filelock.Timeout:
            log(WARNING, "%s: %s still locked after %g s; compiling without waiting", what,
                lock.lock_file, LOCK_TIMEOUT)
    except OSError as e:  # (Timeout is one, too) e.g. a read-only cache: JAX only warns there
        log(WARNING, "%s: cannot lock %s (%s); compiling without it", what, lock.lock_file,
            e.strerror)
    try:
        yield
    finally:
        if held:
            lock.release()
