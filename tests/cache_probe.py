"""A fresh process doing client.py's start-up on toy data; prints what XLA compiled.

    python tests/cache_probe.py --jax-cache DIR|off

Prints one JSON line: {"requests": programs that went through the persistent cache,
"hits": those loaded from it, "compiled": programs XLA built in this process (all three
during the warm-up), "in_round_1": programs compiled or loaded during a round of fit()
and evaluate() that follows}. Used by
tests/test_compile_cache.py as a real, separate process (JAX decides once per process
whether to use the cache, so in-process tests could not show it).
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import jax  # noqa: E402
import numpy as np  # noqa: E402

import model  # noqa: E402
from federation import compile_cache, shards  # noqa: E402
from federation.mnist_client import MnistClient  # noqa: E402

counts = {"requests": 0, "hits": 0, "compiled": 0}
EVENTS = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
          "/jax/compilation_cache/cache_hits": "hits"}


def count(event: str, **kwargs) -> None:
    if event in EVENTS:
        counts[EVENTS[event]] += 1


def count_compile(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        counts["compiled"] += 1  # every program handed to XLA, from the cache or not


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jax-cache", required=True)
    args = p.parse_args()
    jax.monitoring.register_event_listener(count)
    jax.monitoring.register_event_duration_secs_listener(count_compile)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (70, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 70).astype(np.int32)
    data = shards.Partition(images[:60], labels[:60], images[60:], labels[60:])
    compile_cache.enable(args.jax_cache)
    with compile_cache.compiling("client warm-up"):
        MnistClient(data, 0, 0).warm_up()
    warm_up_compiles, warm_up_hits, warm_up_requests = (
        counts["compiled"], counts["hits"], counts["requests"])
    # Round 1 as the server would send it: nothing left to compile (or to load).
    arrays = model.params_to_ndarrays(model.init_params(jax.random.key(0)))  # the server's
    before = counts["compiled"] + counts["hits"]
    c = MnistClient(data, 0, 0)
    config = {"server_round": 1, "local_epochs": 2, "batch_size": model.BATCH_SIZE,
              "learning_rate": model.LEARNING_RATE}
    c.evaluate(c.fit(arrays, config)[0], config)
    counts["in_round_1"] = counts["compiled"] + counts["hits"] - before
    counts["compiled"] = warm_up_compiles - warm_up_hits  # not loaded from the cache
    counts["hits"], counts["requests"] = warm_up_hits, warm_up_requests
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
