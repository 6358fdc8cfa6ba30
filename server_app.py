"""The Flower ServerApp: the same FedAvg as server.py, run by `flwr run` on Flower's engines.

`flwr run .` hands this app to a SuperLink, which runs it against the Simulation Engine
(virtual clients on one machine) or the Deployment Engine (SuperNodes on other machines).
Like server.py, it is a thin shell: it turns the run config ([tool.flwr.app.config] in
pyproject.toml, overridden with `--run-config`) into a ServerSettings and leaves the rest
(data checks, results directory, resume, CheckedFedAvg) to federation/server_setup.py.

    flwr run . --run-config "num-server-rounds=10 data-dir='/abs/path/data'"

With `secagg = true` the rounds run through Flower's SecAgg+ workflow (Bonawitz et al.
2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning"; SecAgg+:
Bell et al. 2020): the clients mask their models so that the server learns only their
weighted sum (federation/secure_aggregation.py; client_app.py switches the clients' side
on from the same key).

    flwr run . --run-config "secagg=true num-shares=5 reconstruction-threshold=3"
"""

import logging
from collections.abc import Mapping
from logging import ERROR

from flwr.common import Context, log
from flwr.server import Grid, LegacyContext, ServerApp, ServerAppComponents, ServerConfig
from flwr.server.compat import start_grid

from federation import compile_cache, run_lock, shards
from federation.client_manager import TimeoutClientManager
from federation.secure_aggregation import secagg_workflow
from federation.server_setup import (ServerSettings, SetupError, TrueRoundLogFilter,
                                     build_strategy)

# Run-config key -> (ServerSettings field, accepted types). The keys and defaults are in
# pyproject.toml; a test checks that they equal server.py's.
RUN_CONFIG_KEYS = {
    "num-server-rounds": ("rounds", int),
    "min-clients": ("min_clients", int),
    "fraction-fit": ("fraction_fit", (int, float)),
    "local-epochs": ("local_epochs", int),
    "batch-size": ("batch_size", int),
    "client-optimizer": ("client_optimizer", str),
    "learning-rate": ("learning_rate", (int, float)),
    "proximal-mu": ("proximal_mu", (int, float)),
    "server-optimizer": ("server_optimizer", str),
    "server-learning-rate": ("server_learning_rate", (int, float)),
    "server-momentum": ("server_momentum", (int, float)),
    "seed": ("seed", int),
    "round-timeout": ("round_timeout", (int, float)),
    "resume": ("resume", bool),
    "overwrite": ("overwrite", bool),
    "aggregation": ("aggregation", str),
    "trim-fraction": ("trim_fraction", (int, float)),
    "krum-malicious": ("krum_malicious", int),
    "dp-noise-multiplier": ("dp_noise_multiplier", (int, float)),
    "dp-clipping-norm": ("dp_clipping_norm", (int, float)),
    "dp-delta": ("dp_delta", (int, float)),
    "data-dir": ("data_dir", str),
    "results-dir": ("results_dir", str),
    "secagg": ("secagg", bool),
    "num-shares": ("num_shares", int),
    "reconstruction-threshold": ("reconstruction_threshold", int),
    "clipping-range": ("clipping_range", (int, float)),
}
OFF_KEYS = {"dp-noise-multiplier"}  # keys whose "off" is server.py's default of None
# Keys whose default depends on client-optimizer or server-optimizer: not in pyproject.toml
# (TOML has no null).
DEFAULT_FROM_OPTIMIZER = ("learning-rate", "server-learning-rate", "server-momentum")


def settings_from_run_config(run_config: Mapping[str, object]) -> ServerSettings:
    """ServerSettings from the run config; SetupError on an unknown or ill-typed key."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise SetupError(f"unknown run-config key(s) {', '.join(unknown)}; known: "
                         f"{', '.join(RUN_CONFIG_KEYS)}")
    values = {}
    for key, (field, types) in RUN_CONFIG_KEYS.items():
        if key not in run_config:
            continue
        value = run_config[key]
        if key in OFF_KEYS and value == "off":  # TOML has no null: "off" stands for None
            values[field] = None
            continue
        # bool is an int in Python: `num-server-rounds = true` must not pass as 1.
        if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
            expected = {int: "an integer", bool: "true or false", str: "a string"}.get(
                types, "a number") + (" or 'off'" if key in OFF_KEYS else "")
            raise SetupError(f"run-config {key} = {value!r} must be {expected}")
        values[field] = float(value) if types == (int, float) else value
    for field in ("data_dir", "results_dir"):
        if field in values:
            values[field] = shards.resolve_dir(values[field])
    return ServerSettings(**values)


def server_fn(context: Context) -> ServerAppComponents:
    """Build the strategy and the round settings from the run config."""
    compile_cache.enable()  # $FL_JAX_CACHE_DIR, else the user-level default
    try:
        settings = settings_from_run_config(context.run_config)
        built = build_strategy(settings)
        if built is None:
            raise SetupError(f"{settings.results_dir} already holds round {settings.rounds}; "
                             "raise num-server-rounds to continue the run")
    except (SetupError, shards.DataError) as e:
        # One readable line first; the exception then makes Flower mark the run as failed
        # (a SystemExit would end it as "completed").
        log(ERROR, "server_app: error: %s", e)
        raise SetupError(str(e)) from None
    strategy, rounds_left = built
    logging.getLogger("flwr").addFilter(TrueRoundLogFilter(strategy.offset))  # resumed runs
    return ServerAppComponents(
        strategy=strategy,
        client_manager=TimeoutClientManager(settings.round_timeout, seed=settings.seed),
        config=ServerConfig(num_rounds=rounds_left, round_timeout=settings.round_timeout))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds: Flower's plain FedAvg loop, or SecAgg+ with `secagg = true`."""
    # A bad run config, or a results-dir that a live run holds, fails the run here, with
    # one line; otherwise this process holds the results-dir's run lock until the end.
    components = server_fn(context)
    settings = settings_from_run_config(context.run_config)  # checked by server_fn
    try:
        if not settings.secagg:
            # Exactly what ServerApp(server_fn=server_fn) runs: Flower's legacy server loop.
            start_grid(grid=grid, config=components.config, strategy=components.strategy,
                       client_manager=components.client_manager)
            return
        legacy = LegacyContext(context, config=components.config,
                               strategy=components.strategy,
                               client_manager=components.client_manager)
        secagg_workflow(settings, components.strategy)(grid, legacy)
    finally:
        run_lock.release(settings.results_dir)
