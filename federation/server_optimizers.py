"""Server optimizers for non-IID clients: FedAvg, FedAvgM, FedAdam and FedYogi, with optax.

Reddi et al. 2021 ("Adaptive Federated Optimization") read a round of FedAvg as one step
of an optimizer on the server. With x the global model sent out and x_avg the clients'
example-weighted average, the pseudo-gradient g = x - x_avg is where the clients went,
reversed, and any optimizer can take the step:

    fedavg   x <- x - g = x_avg                                      (SGD, learning rate 1)
    fedavgm  v <- beta v + g;  x <- x - eta v                 (SGD with momentum; Hsu 2019)
    fedadam  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  x <- x - eta m^ / (sqrt(v^) + tau)
    fedyogi  as fedadam, but v <- v - (1 - b2) g^2 sign(v - g^2)   (v grows slowly, adds up)

Each is the stock optax optimizer applied to g: optax.sgd(eta, beta), optax.adam(eta, b1,
b2, eps=tau), optax.yogi(eta, b1, b2, eps=tau). The momentum methods carry state (v, m)
from round to round; it is saved with every round (results.py) and restored on --resume.

Settings. From the paper: b1 = 0.9 and b2 = 0.99 for FedAdam/FedYogi, tau = 1e-3 (its
adaptivity parameter, optax's eps), and momentum 0.9 for FedAvgM. The paper tunes eta per
task, so the defaults are chosen here: eta = 1.0 for FedAvgM (FedAvg's own step size) and
eta = 0.01 for FedAdam/FedYogi (Flower's FedYogi default); benchmarks/bench_noniid.py
measures a grid around them. --server-momentum sets FedAvgM's beta and FedAdam's/FedYogi's
b1.
Two differences from the paper's pseudo-code, both optax's (and Kingma & Ba's) Adam: m and
v are bias-corrected (m^ = m / (1 - b1^t)), as Flower's FedAdam also does; Yogi's m and v
start at optax's 1e-6 = tau^2 (the paper asks for v >= tau^2).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from federation.aggregation import Arrays

NAMES = ("fedavg", "fedavgm", "fedadam", "fedyogi")
# The defaults of --server-learning-rate and --server-momentum, per optimizer (see above).
DEFAULTS: dict[str, dict[str, float]] = {
    "fedavg": {},
    "fedavgm": {"learning_rate": 1.0, "momentum": 0.9},
    "fedadam": {"learning_rate": 1e-2, "momentum": 0.9},
    "fedyogi": {"learning_rate": 1e-2, "momentum": 0.9},
}
ADAPTIVE = {"b2": 0.99, "tau": 1e-3}  # fixed: the paper's values for FedAdam and FedYogi


def problem(name: str, learning_rate: float | None, momentum: float | None) -> str | None:
    """Why these server-optimizer settings cannot run (one line, flag names), or None."""
    if name not in NAMES:
        return f"server-optimizer {name!r} is not one of {', '.join(NAMES)}"
    if name == "fedavg" and (learning_rate is not None or momentum is not None):
        return ("server-optimizer fedavg takes no server-learning-rate or server-momentum "
                "(the new model is the average); use fedavgm, fedadam or fedyogi")
    if learning_rate is not None and not 0 < learning_rate < float("inf"):
        return f"server-learning-rate must be a number > 0, got {learning_rate}"
    if momentum is not None and not 0 <= momentum < 1:
        return f"server-momentum must be in [0, 1), got {momentum}"
    return None


def settings(name: str, learning_rate: float | None = None,
             momentum: float | None = None) -> dict[str, Any]:
    """Every setting of the optimizer, defaults filled in (run_config.json's record)."""
    chosen = {"learning_rate": learning_rate, "momentum": momentum}
    full = {"name": name, **{k: v if chosen[k] is None else float(chosen[k])
                             for k, v in DEFAULTS[name].items()}}
    return {**full, **ADAPTIVE} if name in ("fedadam", "fedyogi") else full


def transformation(config: Mapping[str, Any]) -> optax.GradientTransformation | None:
    """The optax optimizer for settings(...) (None for fedavg: no optimizer step at all)."""
    name = config["name"]
    if name == "fedavg":
        return None
    if name == "fedavgm":
        return optax.sgd(config["learning_rate"], momentum=config["momentum"])
    make = {"fedadam": optax.adam, "fedyogi": optax.yogi}[name]
    return make(config["learning_rate"], b1=config["momentum"], b2=config["b2"],
                eps=config["tau"])


class ServerOptimizer:
    """Takes each round's step from the global model and the clients' average; keeps the
    optimizer's state between rounds and hands it to the checkpoint.

    Arrays go in and come out as NumPy float32 in the model's wire order; inside they are a
    dict by array name, so the saved state reads e.g. "0/mu/conv1/w".
    """

    def __init__(self, config: Mapping[str, Any], initial: Arrays,
                 names: Sequence[str]) -> None:
        self.config = dict(config)
        self.names = list(names)
        self.optimizer = transformation(config)
        self.state = None if self.optimizer is None else self.optimizer.init(
            self._tree(initial))
        self._jitted_step = None if self.optimizer is None else jax.jit(self._step)

    def _tree(self, arrays: Arrays) -> dict[str, jax.Array]:
        """{name: array}, on the device (device_put: no copy program per shape)."""
        return {name: jax.device_put(np.asarray(a)) for name, a in zip(self.names, arrays,
                                                                        strict=True)}

    def _step(self, state: Any, x: dict, x_avg: dict) -> tuple[dict, Any]:
        """One optax step on the pseudo-gradient g = x - x_avg (jitted: one program)."""
        pseudo_gradient = jax.tree_util.tree_map(jnp.subtract, x, x_avg)
        updates, state = self.optimizer.update(pseudo_gradient, state, x)
        return optax.apply_updates(x, updates), state

    def step(self, global_arrays: Arrays, average: Arrays) -> Arrays:
        """The new global model, from the round's global model and the clients' average."""
        if self.optimizer is None:
            # FedAvg is optax.sgd(1.0) on g, but x - (x - x_avg) is x_avg only in exact
            # arithmetic: in float32, x = 1 and x_avg = 1e-8 give x - x_avg = 1 and then
            # 0, not 1e-8. fedavg returns the average itself, so it stays the FedAvg it
            # was before server optimizers existed, bit for bit.
            return list(average)
        new, self.state = self._jitted_step(self.state, self._tree(global_arrays),
                                            self._tree(average))
        return [np.asarray(new[name], np.float32) for name in self.names]

    def state_arrays(self) -> dict[str, np.ndarray] | None:
        """The optimizer's state as named NumPy arrays, for the checkpoint (None: stateless)."""
        if self.state is None:
            return None
        leaves, _ = jax.tree_util.tree_flatten_with_path(self.state)
        return {jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
                for path, leaf in leaves}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Continue from a state saved by state_arrays; ValueError (one line) if it does not
        fit this optimizer and model."""
        expected = self.state_arrays()
        if expected is None:
            raise ValueError(f"{self.config['name']} keeps no state, but one was given")
        if sorted(arrays) != sorted(expected):
            raise ValueError(f"it holds {len(arrays)} arrays, {self.config['name']} has "
                             f"{len(expected)} ({', '.join(list(expected)[:3])}, ...)")
        for key, array in expected.items():
            if arrays[key].shape != array.shape or arrays[key].dtype != array.dtype:
                raise ValueError(f"{key} is {arrays[key].dtype} {arrays[key].shape}, "
                                 f"expected {array.dtype} {array.shape}")
        treedef = jax.tree_util.tree_structure(self.state)
        self.state = jax.tree_util.tree_unflatten(
            treedef, [jax.device_put(arrays[key]) for key in expected])
