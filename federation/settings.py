"""Every server setting, declared once: name, type, default, help text and run-config key.

`ServerSettings` holds the settings of one federated run, and its fields are the table:
each field has its type and default, and its metadata (a `Setting`) the help text and
how it is spelled outside Python: server.py's flag (`--min-clients`) and the Flower App's
run-config key (`min-clients`, in pyproject.toml's [tool.flwr.app.config]). From that one
table come

- server.py's flags (`add_arguments`) and its settings (`from_args`), with the flags of
  its transport (`TRANSPORT_FLAGS`: --address, --certificates, --jax-cache);
- server_app.py's run-config parser (`from_run_config`);
- the flags and the run config demo.py starts a run with (`as_flags`, `as_run_config`);
- pyproject.toml's defaults, which a test compares with `run_config_defaults()`.

A new setting is one field here, plus its line in pyproject.toml (the test asks for it).
The checks of a whole run (`ServerSettings.problem`) are here too; what a run builds from
its settings is in federation/server_setup.py. A dataclass with field metadata, not a
config library: argparse and Flower's run config are the two readers, and each is a few
lines over this table.
"""

import argparse
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import model
from federation import cli, compile_cache, server_optimizers, shards
from federation.aggregation import RULES, krum_minimum_clients

if typing.TYPE_CHECKING:
    from federation.privacy import DPConfig


class SetupError(Exception):
    """A problem with the settings, the data or the results directory; str(e) is one line."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one setting is spelled and explained outside the code (a field's metadata)."""

    help: str                            # argparse's help text (with %(default)s)
    key: str | None = None               # run-config key; None: the name with hyphens
    metavar: str | None = None           # argparse's name for the value in --help
    choices: Sequence[str] | None = None
    path: bool = False                   # a directory: not empty on the command line,
                                         # absolute in the run config (shards.resolve_dir)
    off: bool = False                    # None is written "off" in the run config
    flag: bool = True                    # False: the App path only (no server.py flag)


def setting(default: Any, help: str, **spelling: Any) -> Any:
    """A ServerSettings field: its default, and how it is spelled and explained."""
    return dataclasses.field(default=default, metadata={"setting": Setting(help, **spelling)})


def _default_learning_rates() -> str:
    """'0.004 for adam, 0.01 for sgd' (--learning-rate's help)."""
    return ", ".join(f"{v:g} for {k}" for k, v in model.LEARNING_RATES.items())


def _default_server_learning_rates() -> str:
    """'1.0 for fedavgm, 0.01 for fedadam and fedyogi' (--server-learning-rate's help)."""
    by_rate: dict[float, list[str]] = {}
    for name, defaults in server_optimizers.DEFAULTS.items():
        if "learning_rate" in defaults:
            by_rate.setdefault(defaults["learning_rate"], []).append(name)
    return ", ".join(f"{rate} for {' and '.join(names)}" for rate, names in by_rate.items())


def _default_server_momentum() -> str:
    """'0.9' (--server-momentum's help): the same for every optimizer that has one."""
    values = {d["momentum"] for d in server_optimizers.DEFAULTS.values() if "momentum" in d}
    return ", ".join(map(str, sorted(values)))


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """The settings of one federated run; the defaults run the tutorial as-is.

    The order of the fields is the order of server.py --help and of the run-config keys.
    """

    rounds: int = setting(
        5, "federated rounds, counting rounds already done when resuming "
           "(default: %(default)s)", key="num-server-rounds")
    min_clients: int = setting(
        10, "clients that must be connected before a round starts "
            "(default: %(default)s, one per partition)")
    fraction_fit: float = setting(
        1.0, "fraction of connected clients that train (and evaluate) each round; "
             "< 1 samples them by --seed and round, reproducibly (default: %(default)s)")
    local_epochs: int = setting(
        model.LOCAL_EPOCHS, "epochs each client trains per round (default: %(default)s)")
    batch_size: int = setting(
        model.BATCH_SIZE, "clients' mini-batch size (default: %(default)s)")
    client_optimizer: str = setting(
        model.OPTIMIZER, "clients' local optimizer: adam, or sgd (momentum "
                         f"{model.SGD_MOMENTUM}), better on extreme label skew "
                         "(default: %(default)s)", metavar="NAME")
    # None: the client optimizer's default peak rate (__post_init__). Not in pyproject.toml,
    # like the two below: their default depends on an optimizer, and TOML has no null.
    learning_rate: float | None = setting(
        None, f"clients' peak learning rate (default: {_default_learning_rates()})")
    proximal_mu: float = setting(
        0.0, "FedProx (Li et al. 2020): clients add MU/2 ||w - w_global||^2 to their loss, "
             "which limits their drift on non-IID data; 0 is FedAvg (default: %(default)s)",
        metavar="MU")
    server_optimizer: str = setting(
        "fedavg", "how the server moves the global model to the clients' average: fedavg "
                  "(it becomes the average), or an optimizer step on global - average "
                  "(Reddi et al. 2021): fedavgm (momentum), fedadam, fedyogi "
                  "(default: %(default)s)", metavar="NAME")
    server_learning_rate: float | None = setting(
        None, "the server optimizer's step size (default: "
              f"{_default_server_learning_rates()}; fedavg takes none)", metavar="ETA")
    server_momentum: float | None = setting(
        None, "fedavgm's momentum, fedadam's and fedyogi's beta1, in [0, 1) (default: "
              f"{_default_server_momentum()}; fedavg takes none)", metavar="BETA")
    data_dir: str = setting(
        "data", "directory written by partition_data.py; the server reads manifest.json "
                "and test.npz (default: %(default)s)", path=True)
    results_dir: str = setting(
        "results", "where metrics and models are written (default: %(default)s)", path=True)
    seed: int = setting(0, "seed of the initial global model (default: %(default)s)")
    round_timeout: float = setting(
        300.0, "seconds a client may take to answer, and to wait for --min-clients to be "
               "connected before giving up (default: %(default)s)")
    aggregation: str = setting(
        "fedavg", "how the clients' models become the global model: fedavg (weighted "
                  "mean), or a rule robust to poisoning clients: median, trimmed-mean, "
                  "krum (default: %(default)s)", choices=RULES)
    trim_fraction: float = setting(
        0.2, "trimmed-mean: fraction of the values dropped at each end, per coordinate, "
             "in [0, 0.5) (default: %(default)s)")
    krum_malicious: int = setting(
        2, "krum: how many malicious clients it must tolerate; needs more than 2f + 2 "
           "clients per round (default: %(default)s)")
    dp_noise_multiplier: float | None = setting(  # None: no DP
        None, "turn on DP-FedAvg (user-level differential privacy): Gaussian noise of std "
              "SIGMA x --dp-clipping-norm on the sum of clipped updates; 0 clips without "
              "noise (no privacy) (default: off)", metavar="SIGMA", off=True)
    dp_clipping_norm: float = setting(
        1.0, "DP-FedAvg: every update (client model minus global model) is scaled down "
             "to this L2 norm at most (default: %(default)s)")
    dp_delta: float = setting(
        1e-5, "DP-FedAvg: the delta of the (epsilon, delta) guarantee reported each round "
              "(default: %(default)s)")
    resume: bool = setting(False, "continue the run in --results-dir from its newest round")
    overwrite: bool = setting(
        False, "replace the run already in --results-dir (its metrics and models are "
               "deleted once this server is listening); without it, a directory that "
               "holds a run is refused")
    # Secure aggregation (SecAgg+, App path only): the server learns only the clients' sum.
    secagg: bool = setting(
        False, "run the rounds through Flower's SecAgg+ workflow: the server learns only "
               "the sum of the clients' models", flag=False)
    num_shares: int = setting(
        5, "SecAgg+: shares of each client's secrets, itself included (odd, at most the "
           "clients sampled per round)", flag=False)
    reconstruction_threshold: int = setting(
        3, "SecAgg+: shares that unmask a client or recover a dropout", flag=False)
    clipping_range: float = setting(
        8.0, "SecAgg+: weights are quantized in +-this (the largest seen: 2.6)", flag=False)
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
    def dp(self) -> "DPConfig | None":
        """DP-FedAvg's settings, or None when it is off."""
        if self.dp_noise_multiplier is None:
            return None
        # Imported here: dp-accounting takes most of a second to import, and demo.py
        # reads this table (for its flags) without ever needing it.
        from federation import privacy  # noqa: PLC0415
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
        if self.aggregation != "fedavg":  # a robust rule compares the clients' own updates
            return (f"secagg cannot be combined with aggregation {self.aggregation}: it needs "
                    "each client's own update, and SecAgg+ shows the server only their sum")
        # DP under SecAgg+: a client sends w + Δ with ||Δ|| <= C, so one weight by up to
        # w_i + C, clipped to +-clipping-range before masking (a cut update is no longer
        # DP-FedAvg's). The server warns once a weight |w_i| passes half the range
        # (secure_aggregation.checked_average); C <= half keeps w_i + Δ_i within it.
        if self.dp_noise_multiplier is not None and self.dp_clipping_norm > self.clipping_range / 2:
            return (f"dp-clipping-norm {self.dp_clipping_norm:g} is more than half of "
                    f"clipping-range {self.clipping_range:g}: under SecAgg+ a client sends "
                    "its weights plus its clipped update, and the range must carry both; "
                    f"raise clipping-range to at least {2 * self.dp_clipping_norm:g}")
        return None


# ------------------------------------------------------------------- reading the table

@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of the table: a ServerSettings field with its type and spelling."""

    name: str                            # the field: min_clients
    kind: type                           # int, float, str or bool (None stripped)
    default: Any
    setting: Setting

    @property
    def flag(self) -> str:
        """server.py's flag: --min-clients."""
        return "--" + self.name.replace("_", "-")

    @property
    def key(self) -> str:
        """The run-config key: min-clients."""
        return self.setting.key or self.name.replace("_", "-")


@functools.cache
def table() -> tuple[Entry, ...]:
    """Every setting of ServerSettings, in field order."""
    hints = typing.get_type_hints(ServerSettings)
    entries = []
    for field in dataclasses.fields(ServerSettings):
        if "setting" not in field.metadata:
            continue  # transport: not a setting of its own
        kind = hints[field.name]
        if isinstance(kind, types.UnionType):  # float | None
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        entries.append(Entry(field.name, kind, field.default, field.metadata["setting"]))
    return tuple(entries)


# ------------------------------------------------------------------- server.py's flags

@dataclasses.dataclass(frozen=True)
class TransportFlag:
    """A flag of server.py's own, not a setting of the run (how it listens and caches)."""

    name: str
    help: str
    default: str | None = None
    metavar: str | None = None
    path: bool = True                    # a directory: not empty (cli.nonempty)
    recorded: bool = True                # kept in ServerSettings.transport (run_config.json)
    check: Callable[[str], str | None] | None = None  # why a value is wrong, after parsing

    @property
    def flag(self) -> str:
        """--jax-cache."""
        return "--" + self.name.replace("_", "-")


ADDRESS = TransportFlag("address", "host:port to listen on (default: %(default)s)",
                        default="0.0.0.0:8080", path=False, check=cli.address_problem)
TRANSPORT_FLAGS = (
    ADDRESS,
    TransportFlag("certificates", "enable TLS with DIR/ca.crt, DIR/server.pem, "
                  "DIR/server.key from make_certificates.py (default: plaintext)",
                  metavar="DIR"),
    TransportFlag("jax_cache", "JAX's persistent compilation cache, shared by every "
                  "process on this machine; 'off' disables it (default: "
                  f"${compile_cache.ENV_VAR}, else {compile_cache.default_dir()})",
                  metavar="DIR", recorded=False),
)


def _add_transport_flag(parser: argparse.ArgumentParser, flag: TransportFlag) -> None:
    """One of TRANSPORT_FLAGS."""
    parser.add_argument(flag.flag, default=flag.default, metavar=flag.metavar,
                        type=cli.nonempty if flag.path else None, help=flag.help)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """server.py's flags: --address, one per setting with a flag, --certificates, --jax-cache."""
    _add_transport_flag(parser, ADDRESS)
    for entry in table():
        s = entry.setting
        if not s.flag:
            continue
        if entry.kind is bool:
            parser.add_argument(entry.flag, action="store_true", help=s.help)
            continue
        kind = cli.nonempty if s.path else None if entry.kind is str else entry.kind
        parser.add_argument(entry.flag, type=kind, default=entry.default, metavar=s.metavar,
                            choices=s.choices, help=s.help)
    for flag in TRANSPORT_FLAGS:
        if flag is not ADDRESS:
            _add_transport_flag(parser, flag)


def from_args(args: argparse.Namespace) -> ServerSettings:
    """The run's settings from server.py's flags (the transport's own recorded aside)."""
    return ServerSettings(
        **{e.name: getattr(args, e.name) for e in table() if e.setting.flag},
        transport={f.name: getattr(args, f.name) for f in TRANSPORT_FLAGS if f.recorded})


def args_problem(args: argparse.Namespace) -> str | None:
    """Why server.py's parsed flags cannot run, as argparse's error line, or None."""
    for flag in TRANSPORT_FLAGS:
        value = getattr(args, flag.name)
        problem = flag.check(value) if flag.check else None
        if problem:
            return f"{flag.flag} {value!r} {problem}"
    problem = from_args(args).problem()
    return f"--{problem}" if problem else None


def as_flags(**values: Any) -> list[str]:
    """server.py's command line for these settings: rounds=3, overwrite=True ->
    ['--rounds', '3', '--overwrite']. None (and False for a switch) leaves a flag out."""
    flags = {e.name: e.flag for e in table() if e.setting.flag}
    flags.update((f.name, f.flag) for f in TRANSPORT_FLAGS)
    argv = []
    for name, value in values.items():
        if value is None or value is False:
            continue
        argv += [flags[name]] if value is True else [flags[name], str(value)]
    return argv


# ------------------------------------------------------------ the Flower App's run config

def _run_config_types(entry: Entry) -> type | tuple[type, ...]:
    """What a run-config value may be: a float setting takes an integer too (TOML's 1)."""
    return (int, float) if entry.kind is float else entry.kind


def from_run_config(run_config: Mapping[str, object]) -> ServerSettings:
    """ServerSettings from the run config; SetupError on an unknown or ill-typed key."""
    entries = {e.key: e for e in table()}
    unknown = sorted(set(run_config) - set(entries))
    if unknown:
        raise SetupError(f"unknown run-config key(s) {', '.join(unknown)}; known: "
                         f"{', '.join(entries)}")
    values: dict[str, Any] = {}
    for key, entry in entries.items():
        if key not in run_config:
            continue
        value = run_config[key]
        if entry.setting.off and value == "off":  # TOML has no null: "off" stands for None
            values[entry.name] = None
            continue
        types_ = _run_config_types(entry)
        # bool is an int in Python: `num-server-rounds = true` must not pass as 1.
        if not isinstance(value, types_) or (isinstance(value, bool) and entry.kind is not bool):
            expected = {int: "an integer", bool: "true or false", str: "a string"}.get(
                entry.kind, "a number") + (" or 'off'" if entry.setting.off else "")
            raise SetupError(f"run-config {key} = {value!r} must be {expected}")
        if entry.setting.path:
            value = shards.resolve_dir(value)
        values[entry.name] = float(value) if entry.kind is float else value
    return ServerSettings(**values)


def run_config_defaults() -> dict[str, Any]:
    """The defaults pyproject.toml's [tool.flwr.app.config] must hold, key by key.

    A setting whose default is None is there only if the run config has a word for None
    ("off"); the others' defaults depend on an optimizer, and TOML has no null.
    """
    return {e.key: "off" if e.default is None else e.default for e in table()
            if e.default is not None or e.setting.off}


def as_run_config(**values: Any) -> str:
    """`flwr run --run-config` text for these settings: rounds=3, overwrite=True ->
    "num-server-rounds=3 overwrite=true". None leaves a key out."""
    entries = {e.name: e for e in table()}
    pairs = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif entries[name].kind in (int, float):
            text = str(value)
        else:  # a string (or a path)
            text = f"'{value}'"
        pairs.append(f"{entries[name].key}={text}")
    return " ".join(pairs)
