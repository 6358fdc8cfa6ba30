"""federation/compile_cache.py: where the cache lives, and what fresh processes compile.

The process tests start tests/cache_probe.py (client.py's start-up on toy data) as real,
separate processes, each printing how many programs XLA compiled and how many it loaded
from the persistent cache. Counts, not timings: a cache hit is a hit on any machine.
"""

import json
import os
import pathlib
import subprocess
import sys


from federation import compile_cache

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_flag_beats_environment_beats_default(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    assert compile_cache.resolve() == tmp_path / "xdg" / "flower-jax-tutorial" / "jax"
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.resolve() == tmp_path / "env"
    assert compile_cache.resolve(str(tmp_path / "flag")) == tmp_path / "flag"
    assert compile_cache.resolve("off") is None and compile_cache.resolve("OFF") is None
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.resolve() is None
    assert compile_cache.resolve(str(tmp_path / "flag")) == tmp_path / "flag"


def probe(cache: str) -> subprocess.Popen:
    """Start one cache_probe.py process (stdout: one JSON line of counts)."""
    env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV_VAR}
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "cache_probe.py"),
                             "--jax-cache", cache], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def counts(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_a_second_fresh_process_loads_everything_from_the_cache(tmp_path):
    first = counts(probe(str(tmp_path / "cache")))
    assert first["compiled"] > 0 and first["hits"] == 0
    assert any((tmp_path / "cache").glob("jit_train_step-*"))
    second = counts(probe(str(tmp_path / "cache")))
    assert second == {"requests": first["requests"], "hits": first["requests"], "compiled": 0,
                      "in_round_1": 0}


def test_the_warm_up_leaves_nothing_to_compile_for_round_1(tmp_path):
    assert counts(probe("off"))["in_round_1"] == 0


def test_off_disables_the_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an "off" directory must not appear either
    result = counts(probe("off"))
    assert result["requests"] == result["hits"] == 0 and result["compiled"] > 0
    assert list(tmp_path.iterdir()) == []


def test_processes_starting_together_on_a_cold_cache_compile_once(tmp_path):
    alone = counts(probe(str(tmp_path / "alone")))["compiled"]
    procs = [probe(str(tmp_path / "shared")) for _ in range(3)]
    results = [counts(p) for p in procs]
    # One of them compiled everything while the others waited on the lock, then loaded.
    assert sorted(r["compiled"] for r in results) == [0, 0, alone], results
    assert sorted(r["hits"] for r in results) == [0, alone, alone], results
