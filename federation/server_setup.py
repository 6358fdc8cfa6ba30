"""Everything a FedAvg server needs before its first round, for every way of running one.

server.py (Flower's gRPC `start_server`) and server_app.py (a Flower `ServerApp` under
`flwr run`) are thin shells: each turns its own input (command-line flags, a run config)
into one `ServerSettings`, and this file does the rest the same way for both: check the
settings, load the test set and the manifest, set up the results directory (fresh or
resumed) and build the `CheckedFedAvg` strategy.
"""

import dataclasses
import importlib.metadata
import logging
import math
from collections.abc import Callable, Mapping
from logging import INFO
from typing import Any

import jax
import numpy as np
from flwr.common import log

import model
from federation import cli, privacy, run_lock, server_optimizers, shards
from federation.aggregation import RULES, Arrays, krum_minimum_clients
from federation.results import ResultsDir, resume_mismatch
from federation.strategy import CheckedFedAvg


class SetupError(Exception):
    """A problem with the settings, the data or the results directory; str(e) is one line."""


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """The settings of one federated run; the defaults run the tutorial as-is."""

    rounds: int = 5                     # the last round of the whole run
    min_clients: int = 10               # clients that must be connected before a round starts
    fraction_fit: float = 1.0           # fraction of connected clients that train each round
    local_epochs: int = model.LOCAL_EPOCHS
    batch_size: int = model.BATCH_SIZE
    client_optimizer: str = model.OPTIMIZER  # adam | sgd, sent to clients
    learning_rate: float | None = None  # None: the client optimizer's default peak rate
    seed: int = 0                       # seed of the initial global model
    proximal_mu: float = 0.0            # FedProx's mu, sent to clients (0: plain FedAvg)
    server_optimizer: str = "fedavg"    # fedavg | fedavgm | fedadam | fedyogi
    server_learning_rate: float | None = None  # None: the server optimizer's default
    server_momentum: float | None = None       # None: the server optimizer's default
    round_timeout: float = 300.0        # seconds to wait for clients and for their answers
    data_dir: str = "data"
    results_dir: str = "results"
    resume: bool = False                # continue the run in results_dir from its newest round
    overwrite: bool = False             # replace a run already in results_dir
    aggregation: str = "fedavg"         # one of aggregation.RULES
    trim_fraction: float = 0.2          # trimmed-mean: share dropped at each end
    krum_malicious: int = 2             # krum: malicious clients it must tolerate
    dp_noise_multiplier: float | None = None  # DP-FedAvg's σ; None: no DP
    dp_clipping_norm: float = 1.0       # DP-FedAvg's C: the largest update norm that counts
    dp_delta: float = 1e-5              # the δ at which ε is reported
    # Secure aggregation (SecAgg+, App path only): the server learns only the clients' sum.
    secagg: bool = False
    num_shares: int = 5                 # each client's secrets go to itself + 4 neighbours
    reconstruction_threshold: int = 3   # shares that unmask a client / recover a dropout
    clipping_range: float = 8.0         # SecAgg+ quantizes weights in +-this (largest seen: 2.6)
    # Settings of the transport (address, certificates, ...): recorded, never compared.
    transport: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        """A learning rate of None becomes the client optimizer's default (if it has one)."""
        if self.learning_rate is None and self.client_optimizer in model.LEARNING_RATES:
            object.__setattr__(self, "learning_rate",
                               model.LEARNING_RATES[self.client_optimizer])

    def problem(self) -> str | None:
        """Why these settings cannot run (one line), or None."""
        if self.client_optimizer not in model.OPTIMIZERS:
            return (f"client-optimizer {self.client_optimizer!r} is not one of "
                    f"{', '.join(model.OPTIMIZERS)}")
        for name in ("rounds", "min_clients", "local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                return f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
        if not 0.0 < self.fraction_fit <= 1.0:
            return f"fraction-fit must be in (0, 1], got {self.fraction_fit}"
        for name in ("learning_rate", "round_timeout"):
            if not getattr(self, name) > 0:
                return f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)}"
        if not 0.0 <= self.proximal_mu < math.inf:
            return f"proximal-mu must be a number >= 0, got {self.proximal_mu}"
        problem = server_optimizers.problem(self.server_optimizer, self.server_learning_rate,
                                            self.server_momentum)
        if problem:
            return problem
        if self.resume and self.overwrite:
            return "resume and --overwrite contradict each other: choose one"
        problem = self.number_problem()
        if problem:
            return problem
        return (self.rule_problem() or (self.dp.problem() if self.dp else None)
                or (self.secagg_problem() if self.secagg else None))

    def number_problem(self) -> str | None:
        """The first setting that is not a finite number, or out of its range, or None.

        Checked after the rules above (which already name some ranges) and before the
        ones below: inf and nan pass comparisons like `> 0` and would fail mid-run (an
        infinite timeout overflows a wait, an infinite DP noise trains a NaN model).
        """
        ranges = {"seed": (0, cli.MAX_SEED), "round_timeout": (0, cli.MAX_SECONDS)}
        for name, (low, high) in ranges.items():
            problem = cli.number_problem(getattr(self, name), low, high)
            if problem:
                return f"{name.replace('_', '-')} {problem}"
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                return f"{field.name.replace('_', '-')} must be a finite number, got {value}"
        return None

    @property
    def dp(self) -> privacy.DPConfig | None:
        """DP-FedAvg's settings, or None when it is off."""
        if self.dp_noise_multiplier is None:
            return None
        return privacy.DPConfig(self.dp_noise_multiplier, self.dp_clipping_norm, self.dp_delta)

    def clients_per_round(self) -> int:
        """Clients sampled each round when min_clients are connected."""
        return max(1, int(self.fraction_fit * self.min_clients))

    def rule_problem(self) -> str | None:
        """Why the aggregation rule cannot work with these settings (one line), or None."""
        if self.aggregation not in RULES:
            return f"aggregation {self.aggregation!r} is not one of {', '.join(RULES)}"
        if self.aggregation == "trimmed-mean" and not 0 <= self.trim_fraction < 0.5:
            return (f"trim-fraction must be in [0, 0.5) so that some updates are left, "
                    f"got {self.trim_fraction}")
        if self.aggregation == "krum":
            needed = krum_minimum_clients(self.krum_malicious)
            if self.krum_malicious < 0:
                return f"krum-malicious must be >= 0, got {self.krum_malicious}"
            if self.clients_per_round() < needed:
                return (f"krum-malicious {self.krum_malicious} needs at least {needed} "
                        f"clients per round for krum (n > 2f + 2), but min-clients x "
                        f"fraction-fit gives {self.clients_per_round()}")
        if self.dp_noise_multiplier is not None and self.aggregation != "fedavg":
            return (f"dp-noise-multiplier works with aggregation fedavg only (DP-FedAvg sizes "
                    f"its noise for an average), not {self.aggregation}")
        return None

    def secagg_problem(self) -> str | None:
        """Why Flower's SecAgg+ cannot run with these settings (one line), or None."""
        sampled = self.clients_per_round()  # CheckedFedAvg's minimum
        if self.num_shares < 3 or self.num_shares % 2 == 0:
            # Flower needs > 2, and builds each client's ring of neighbours from
            # num_shares // 2 on each side: an even number breaks its clients' key sharing.
            return f"num-shares must be an odd number >= 3, got {self.num_shares}"
        if not 2 <= self.reconstruction_threshold < self.num_shares:
            return (f"reconstruction-threshold must be >= 2 and less than num-shares "
                    f"({self.num_shares}), got {self.reconstruction_threshold}")
        if self.num_shares > sampled:
            return (f"num-shares {self.num_shares} is more than the {sampled} clients sampled "
                    f"per round (min-clients x fraction-fit)")
        if not self.clipping_range > 0:
            return f"clipping-range must be > 0, got {self.clipping_range}"
        if self.needs_individual_updates():
            return (f"secagg cannot be combined with {', '.join(self.needs_individual_updates())}"
                    ": it needs each client's own update, and SecAgg+ shows the server only "
                    "their sum")
        return None

    def needs_individual_updates(self) -> list[str]:
        """The settings switched on that need every client's own update, not just the sum.

        DP-FedAvg here clips each update on the server, and a robust rule compares them.
        (Clipping on the clients, Flower's fixedclipping_mod, would work with SecAgg+;
        this repository does not offer that combination yet.)
        """
        return ([f"aggregation {self.aggregation}"] if self.aggregation != "fedavg" else []) + (
            ["dp-noise-multiplier"] if self.dp_noise_multiplier is not None else [])


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
    """The local-training settings sent to every client each round (with "server_round")."""
    return {"local_epochs": settings.local_epochs, "batch_size": settings.batch_size,
            "client_optimizer": settings.client_optimizer,
            "learning_rate": settings.learning_rate, "proximal_mu": settings.proximal_mu}


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
        log(INFO, "DP-FedAvg: updates clipped to norm %g, noise multiplier %g (noise std %.3g "
            "on the average of %d clients); after %d rounds ε = %.3g at δ = %g", dp.clipping_norm,
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
