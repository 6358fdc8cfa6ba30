"""A small CNN for MNIST in pure JAX + optax, and the local training a FedAvg client runs.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data") trains a copy of one model on every client and averages the weights.
This file is that model and its local training, with no I/O and no Flower: the only two
functions that cross into Flower are `params_to_ndarrays` and `ndarrays_to_params`.

Architecture (draft; figures are filled in after measurement).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = dict[str, dict[str, jax.Array]]

NUM_CLASSES = 10
LOCAL_EPOCHS = 1
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
EVAL_BATCH_SIZE = 1000

# Per-pixel statistics of the MNIST training set: inputs to the first conv are ~N(0, 1).
_MEAN, _STD = 0.1307, 0.3081

# (layer, kernel shape) in the fixed wire order of params_to_ndarrays. Convs are HWIO.
_LAYERS: list[tuple[str, tuple[int, ...]]] = [
    ("conv1", (3, 3, 1, 32)),
    ("conv2", (3, 3, 32, 64)),
    ("dense1", (7 * 7 * 64, 128)),
    ("dense2", (128, NUM_CLASSES)),
]


def param_spec() -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of every array, in the fixed order used on the wire."""
    spec = []
    for name, shape in _LAYERS:
        spec += [(f"{name}/w", shape), (f"{name}/b", (shape[-1],))]
    return spec


def init_params(key: jax.Array) -> Params:
    """He-normal weights (suits ReLU), zero biases; one key per layer."""
    params = {}
    for (name, shape), k in zip(_LAYERS, jax.random.split(key, len(_LAYERS))):
        fan_in = int(np.prod(shape[:-1]))
        w = jax.random.normal(k, shape, jnp.float32) * np.sqrt(2.0 / fan_in)
        params[name] = {"w": w, "b": jnp.zeros(shape[-1], jnp.float32)}
    return params


def num_params(params: Params) -> int:
    """Total number of scalars in the model."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def _normalize(images: jax.Array) -> jax.Array:
    """uint8 or [0, 255] float (B, 28, 28[, 1]) -> standardised float32 (B, 28, 28, 1)."""
    x = images.astype(jnp.float32).reshape(images.shape[0], 28, 28, 1)
    return (x / 255.0 - _MEAN) / _STD


def _conv(x: jax.Array, layer: dict[str, jax.Array]) -> jax.Array:
    """3x3 'same' convolution + ReLU + 2x2 max-pool: (B, H, W, C) -> (B, H/2, W/2, C')."""
    y = jax.lax.conv_general_dilated(
        x, layer["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.relu(y + layer["b"])
    b, h, w, c = y.shape
    return y.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def apply(params: Params, images: jax.Array) -> jax.Array:
    """Logits (B, 10) for uint8 or float images in [0, 255], (B, 28, 28) or (B, 28, 28, 1)."""
    x = _normalize(images)                             # (B, 28, 28, 1)
    x = _conv(x, params["conv1"])                      # (B, 14, 14, 32)
    x = _conv(x, params["conv2"])                      # (B, 7, 7, 64)
    x = x.reshape(x.shape[0], -1)                      # (B, 3136)
    x = jax.nn.relu(x @ params["dense1"]["w"] + params["dense1"]["b"])  # (B, 128)
    return x @ params["dense2"]["w"] + params["dense2"]["b"]             # (B, 10)


def _masked_loss(params: Params, images: jax.Array, labels: jax.Array, mask: jax.Array):
    """Mean cross-entropy over the real (mask=1) examples; also returns #correct."""
    logits = apply(params, images)                                         # (B, 10)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)   # (B,)
    loss = jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
    return loss, correct


def make_optimizer() -> optax.GradientTransformation:
    """Adam whose learning rate lives in opt_state, so a new rate does not recompile."""
    return optax.inject_hyperparams(optax.adam)(learning_rate=LEARNING_RATE)


def init_opt_state(params: Params, learning_rate: float) -> Any:
    """Fresh Adam state with the given learning rate (as a float32 array, not a constant)."""
    state = make_optimizer().init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    return state


@jax.jit
def train_step(params: Params, opt_state: Any, images: jax.Array, labels: jax.Array,
               mask: jax.Array) -> tuple[Params, Any, jax.Array, jax.Array]:
    """One Adam step on a (possibly padded) batch; returns new params, state, loss, #correct."""
    (loss, correct), grads = jax.value_and_grad(_masked_loss, has_aux=True)(
        params, images, labels, mask)
    updates, opt_state = make_optimizer().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, correct


@jax.jit
def eval_step(params: Params, images: jax.Array, labels: jax.Array,
              mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy and #correct over the real examples of one padded batch."""
    logits = apply(params, images)                                         # (B, 10)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)   # (B,)
    return jnp.sum(ce * mask), jnp.sum((jnp.argmax(logits, -1) == labels) * mask)


def _batches(order: np.ndarray, batch_size: int):
    """Yield (indices, mask) of shape (batch_size,); the last batch is padded with index 0."""
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        pad = batch_size - len(idx)
        mask = np.concatenate([np.ones(len(idx), np.float32), np.zeros(pad, np.float32)])
        yield np.concatenate([idx, np.zeros(pad, idx.dtype)]), mask


def train(params: Params, images: np.ndarray, labels: np.ndarray, *, epochs: int,
          batch_size: int, learning_rate: float, key: jax.Array) -> tuple[Params, dict]:
    """Run `epochs` of mini-batch Adam on one client's data, reshuffling every epoch.

    Args:
      params: starting weights (the global model this round).
      images: uint8 (N, 28, 28); labels: int (N,).
      epochs, batch_size, learning_rate: local training settings sent by the server.
      key: PRNG key for shuffling; epoch e uses fold_in(key, e).
    Returns:
      (new params, {"loss": mean loss, "accuracy": fraction, "num_examples": examples seen}).
    """
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    opt_state = init_opt_state(params, learning_rate)
    loss_sum, correct, seen = 0.0, 0, 0
    for epoch in range(epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), len(images)))
        for idx, mask in _batches(order, batch_size):
            params, opt_state, loss, c = train_step(
                params, opt_state, images[idx], labels[idx], mask)
            n = int(mask.sum())
            loss_sum, correct, seen = loss_sum + float(loss) * n, correct + int(c), seen + n
    return params, {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1),
                    "num_examples": seen}


def evaluate(params: Params, images: np.ndarray, labels: np.ndarray,
             batch_size: int = EVAL_BATCH_SIZE) -> tuple[float, float]:
    """Exact mean cross-entropy and accuracy over the whole set, in padded batches."""
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    loss_sum, correct = 0.0, 0
    for idx, mask in _batches(np.arange(len(images)), batch_size):
        loss, c = eval_step(params, images[idx], labels[idx], mask)
        loss_sum, correct = loss_sum + float(loss), correct + int(c)
    return loss_sum / max(len(images), 1), correct / max(len(images), 1)


def params_to_ndarrays(params: Params) -> list[np.ndarray]:
    """Params -> float32 NumPy arrays in param_spec() order (conv1/w, conv1/b, ..., dense2/b)."""
    return [np.asarray(params[name.split("/")[0]][name.split("/")[1]], np.float32)
            for name, _ in param_spec()]


def ndarrays_to_params(arrays: list[np.ndarray]) -> Params:
    """Inverse of params_to_ndarrays; ValueError on wrong count, shape or dtype."""
    spec = param_spec()
    if len(arrays) != len(spec):
        raise ValueError(f"expected {len(spec)} arrays, got {len(arrays)}")
    params: Params = {}
    for (name, shape), a in zip(spec, arrays):
        a = np.asarray(a)
        if a.shape != shape or a.dtype != np.float32:
            raise ValueError(f"{name}: expected float32 {shape}, got {a.dtype} {a.shape}")
        layer, leaf = name.split("/")
        params.setdefault(layer, {})[leaf] = jnp.asarray(a)
    return params
