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
from logging import ERROR

from flwr.common import Context, log
from flwr.server import Grid, LegacyContext, ServerApp, ServerAppComponents, ServerConfig
from flwr.server.compat import start_grid

from federation import compile_cache, run_lock, shards
from federation.client_manager import TimeoutClientManager
from federation.secure_aggregation import secagg_workflow
from federation.server_setup import SetupError, TrueRoundLogFilter, build_strategy
# ServerSettings from the run config: every key, its type and its default are declared
# once, in federation/settings.py (a test checks pyproject.toml's defaults against it).
from federation.settings import from_run_config as settings_from_run_config


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
