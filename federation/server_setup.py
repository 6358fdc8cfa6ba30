"""Everything a FedAvg server needs before its first round, for every way of running one.

server.py (Flower's gRPC `start_server`) and server_app.py (a Flower `ServerApp` under
`flwr run`) are thin shells: each turns its own input (command-line flags, a run config)
into one `ServerSettings` (federation/settings.py), and this file does the rest the same
way for both: check the settings, load the test set and the manifest, set up the results
directory (fresh or resumed) and build the `CheckedFedAvg` strategy.
"""

import dataclasses
import importlib.metadata
import logging
from collections.abc import Callable
from logging import INFO
from typing import Any

import jax
import numpy as np
from flwr.common import log

import model
from federation import flower_internals, privacy, run_lock, server_optimizers, shards
from federation.aggregation import Arrays
from federation.results import ResultsDir, resume_mismatch
# ServerSettings and SetupError are declared in settings.py (with every setting's flag and
# run-config key); imported from here too, by the code that builds a run.
from federation.settings import ServerSettings, SetupError
from federation.strategy import CheckedFedAvg


def centralized_evaluator(x_test: np.ndarray,
                          y_test: np.ndarray) -> Callable[[Arrays], tuple[float, float]]:
    """arrays -> (loss, accuracy) of the model on the server's test set."""
    def evaluate(arrays: Arrays) -> tuple[float, float]:
        loss, accuracy = model.evaluate(model.ndarrays_to_params(arrays), x_test, y_test)
        return float(loss), float(accuracy)
    return evaluate


def server_optimizer_config(settings: ServerSettings) -> dict[str, Any]:
    """The server optimizer with every setting filled in, as run_config.json records it."""
    return server_optimizers.settings(settings.server_optimizer, settings.server_learning_rate,
                                      settings.server_momentum)


def fit_config(settings: ServerSettings) -> dict[str, Any]:
    """The local-training settings sent to every client each round (with "server_round"),
    and under DP with SecAgg+ the clipping norm the clients' fixedclipping_mod reads."""
    clipping = ({flower_internals.KEY_CLIPPING_NORM: settings.dp_clipping_norm}
                if settings.secagg and settings.dp else {})
    return {"local_epochs": settings.local_epochs, "batch_size": settings.batch_size,
            "client_optimizer": settings.client_optimizer,
            "learning_rate": settings.learning_rate, "proximal_mu": settings.proximal_mu,
            **clipping}


def run_config(settings: ServerSettings, manifest_sha256: str) -> dict:
    """Every setting of this run, plus what identifies its data and model (run_config.json)."""
    return {
        "rounds": settings.rounds, "min_clients": settings.min_clients,
        "fraction_fit": settings.fraction_fit, "local_epochs": settings.local_epochs,
        "batch_size": settings.batch_size, "client_optimizer": settings.client_optimizer,
        "learning_rate": settings.learning_rate, "seed": settings.seed,
        "round_timeout": settings.round_timeout,
        "aggregation": settings.aggregation,
        # A rule's own setting is recorded (and must match on resume) only with that rule.
        "trim_fraction": (settings.trim_fraction if settings.aggregation == "trimmed-mean"
                          else None),
        "krum_malicious": settings.krum_malicious if settings.aggregation == "krum" else None,
        "dp": dataclasses.asdict(settings.dp) if settings.dp else None,
        "proximal_mu": settings.proximal_mu,
        "server_optimizer": server_optimizer_config(settings),
        **settings.transport,
        "secagg": settings.secagg,
        **({"num_shares": settings.num_shares,
            "reconstruction_threshold": settings.reconstruction_threshold,
            "clipping_range": settings.clipping_range} if settings.secagg else {}),
        "data_dir": str(settings.data_dir), "results_dir": str(settings.results_dir),
        "manifest_sha256": manifest_sha256,
        "model": {name: "x".join(map(str, shape)) for name, shape in model.param_spec()},
        "versions": {p: importlib.metadata.version(p) for p in ("flwr", "jax", "numpy")},
        "resumed_after": [],
    }


def resume_state(settings: ServerSettings, config: dict,
                 results: ResultsDir) -> tuple[list[dict], Arrays] | None:
    """(records, global model) to resume from, after checking this run may resume that one.

    Returns None if the saved run already has `rounds` rounds. Adds the resumed round to
    config["resumed_after"].
    """
    try:
        saved, records, arrays = results.load_checkpoint()
    except ValueError as e:
        raise SetupError(f"cannot resume: {e}") from e
    try:
        model.ndarrays_to_params(arrays)
    except ValueError as e:
        raise SetupError(f"cannot resume {settings.results_dir}: its model does not fit "
                         f"model.py ({e})") from e
    mismatch = resume_mismatch(saved, config)
    if mismatch:
        raise SetupError(f"cannot resume {settings.results_dir}: {mismatch}; resume with the "
                         "same settings, or start a new run with --overwrite")
    done = records[-1]["round"]
    if done >= settings.rounds:
        print(f"{settings.results_dir} already holds round {done} of {settings.rounds}; "
              "raise --rounds to continue the run", flush=True)
        return None
    config["resumed_after"] = saved.get("resumed_after", []) + [done]
    log(INFO, "resuming %s after round %d of %d", settings.results_dir, done, settings.rounds)
    return records, arrays


def build_strategy(settings: ServerSettings) -> tuple[CheckedFedAvg, int] | None:
    """Check settings, load data, set up the results dir (fresh or resumed), build FedAvg.

    Returns (strategy, rounds left to run), or None if a resumed run is already complete.
    Raises SetupError or shards.DataError with a one-line message.

    Before reading the results directory it takes the directory's run lock
    (federation/run_lock.py), refusing one that a live run holds. This process keeps the
    lock for the whole run, until run_lock.release(settings.results_dir) or its exit; it
    is released here if nothing is built.
    """
    try:
        built = _build_strategy(settings)
    except BaseException:
        run_lock.release(settings.results_dir)
        raise
    if built is None:
        run_lock.release(settings.results_dir)
    return built


def lock_results_dir(results_dir: str) -> None:
    """Take the results directory's run lock; SetupError naming the live run that holds it."""
    try:
        run_lock.acquire(results_dir)
    except run_lock.Busy as e:
        raise SetupError(str(e)) from None
    except OSError as e:
        raise SetupError(f"--results-dir: cannot lock {results_dir} ({e.strerror})") from None


def _build_strategy(settings: ServerSettings) -> tuple[CheckedFedAvg, int] | None:
    """What build_strategy does (build_strategy releases the run lock if this raises)."""
    problem = settings.problem()
    if problem:
        raise SetupError(problem)
    manifest = shards.load_manifest(settings.data_dir)
    partitions = sorted(manifest["partitions"], key=lambda p: p["index"])
    if settings.min_clients > len(partitions):
        raise SetupError(f"min-clients {settings.min_clients}, but {settings.data_dir} has "
                         f"only {len(partitions)} partitions (one client each)")
    x_test, y_test = shards.load_test_set(shards.test_set_path(settings.data_dir))
    config = run_config(settings, shards.manifest_sha256(settings.data_dir))
    names = [name for name, _ in model.param_spec()]
    results = ResultsDir(settings.results_dir, names)
    problem = results.problem()
    if problem:
        raise SetupError(f"--results-dir: {problem}")
    lock_results_dir(settings.results_dir)  # before anything there is read or written
    if not settings.resume and not settings.overwrite and results.run_files():
        raise SetupError(f"{settings.results_dir} already holds a run: continue it with "
                         "--resume, replace it with --overwrite, or choose another "
                         "--results-dir")
    # Nothing is written here: the strategy sets up the directory once the server is up.
    if settings.resume:
        resumed = resume_state(settings, config, results)
        if resumed is None:
            return None
        records, arrays = resumed
        done = records[-1]["round"]
    else:
        records, done = [], 0
        arrays = model.params_to_ndarrays(model.init_params(jax.random.key(settings.seed)))
    server_optimizer = server_optimizers.ServerOptimizer(server_optimizer_config(settings),
                                                         arrays, names)
    if settings.resume and server_optimizer.state is not None:
        try:
            server_optimizer.load_state(results.load_server_state(done))
        except ValueError as e:
            raise SetupError(f"cannot resume {settings.results_dir}: {e}") from e
    log_rule(settings)
    return CheckedFedAvg(
        initial_arrays=arrays, array_names=names,
        shard_sizes=[p["num_train"] for p in partitions],
        val_sizes=[p["num_val"] for p in partitions],
        evaluate_fn=centralized_evaluator(x_test, y_test), results=results,
        total_rounds=settings.rounds, min_clients=settings.min_clients,
        fraction_fit=settings.fraction_fit, records=records,
        fit_config=fit_config(settings),
        run_config=config, round_timeout=settings.round_timeout, seed=settings.seed,
        aggregation=settings.aggregation, trim_fraction=settings.trim_fraction,
        krum_malicious=settings.krum_malicious, dp=settings.dp,
        secagg_clipping_range=settings.clipping_range if settings.secagg else None,
        server_optimizer=server_optimizer,
    ), settings.rounds - done


def log_rule(settings: ServerSettings) -> None:
    """Say how this run aggregates, and what DP-FedAvg will have spent at the end."""
    dp = settings.dp
    if dp is not None:
        m = settings.clients_per_round()
        log(INFO, "DP-FedAvg: updates clipped %sto norm %g, noise multiplier %g (noise std %.3g "
            "on the average of %d clients); after %d rounds ε = %.3g at δ = %g",
            "by the clients, under SecAgg+, " if settings.secagg else "", dp.clipping_norm,
            dp.noise_multiplier, dp.noise_std(m), m, settings.rounds,
            privacy.epsilon(dp.noise_multiplier, settings.fraction_fit, settings.rounds,
                            dp.delta), dp.delta)
    elif settings.aggregation != "fedavg":
        extra = {"trimmed-mean": f" (trim fraction {settings.trim_fraction:g})",
                 "krum": f" (tolerating {settings.krum_malicious} malicious)"}
        log(INFO, "aggregation: %s%s", settings.aggregation, extra.get(settings.aggregation, ""))


class TrueRoundLogFilter(logging.Filter):
    """Makes Flower's "[ROUND k]" log line say the run's round, offset + k, when resuming.

    Flower's Server.fit numbers the rounds it runs from 1; after resuming from round r
    the strategy adds r (CheckedFedAvg.offset), and so does this filter for the log.
    """

    def __init__(self, offset: int) -> None:
        super().__init__()
        self.offset = offset

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the round number of Flower's per-round lines; keep every record."""
        if record.msg in ("[ROUND %s]", "fit progress: (%s, %s, %s, %s)") and record.args:
            record.args = (self.offset + int(record.args[0]), *record.args[1:])
        return True
