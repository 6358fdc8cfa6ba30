"""A small CNN for MNIST in pure JAX + optax, and the local training a FedAvg client runs.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data") trains a copy of one model on every client and averages the weights.
This file is that model and its local training, with no I/O and no Flower. Only
`params_to_ndarrays` and `ndarrays_to_params` cross into Flower.
The measurements behind the choices below: docs/guides/benchmarks.md.

Architecture
------------
The paper's MNIST CNN (two 5x5 convs of 32 and 64 channels, each with 2x2 max-pooling, a
512-unit dense layer: 1,663,370 parameters) in the same shape, conv-pool-conv-pool-dense,
made small enough for 10 clients to share a laptop CPU: 8x fewer parameters and ~10x
fewer multiply-adds. With a pool between them, the two 3x3 convs still see 8x8 pixels.

    input (B, 28, 28) -> 3x3 conv 16 + ReLU + 2x2 max-pool -> (B, 14, 14, 16)      160
                      -> 3x3 conv 32 + ReLU + 2x2 max-pool -> (B, 7, 7, 32)      4,640
                      -> flatten 1,568 -> dense 128 + ReLU                     200,832
                      -> dense 10 (logits; softmax lives in the loss)            1,290
                                                                     total   206,922

Training choices
----------------
* He-normal initialisation before every ReLU, one key per layer; the output layer starts
  at zero, so the first prediction is uniform (loss exactly ln 10) instead of confidently
  wrong (max-pooling inflates activations).
* The recipe a client runs every round, chosen by measuring FedAvg itself
  (benchmarks/sweep_recipe.py): 3 local epochs of Adam, batch 32, the step size warmed up
  linearly to 4e-3 over the first 10% of the local steps, then decayed along a half cosine
  to ~0 (optax.warmup_cosine_decay_schedule). More local work per round pays because
  FedAvg's averaging loses less than the extra epochs gain, and a round's fixed cost
  (messages, evaluations, stragglers) is shared by more work. A wider CNN, weight decay
  and dropout did not pay for themselves.
* Warm-up: every round starts a FRESH Adam state (the moments and the schedule never
  outlive one `train` call), and Adam's first steps have full size whatever the
  gradient; warming up lifts round 1 and lets a higher peak rate pay off later.
* The learning rate is an argument of the jitted step (a traced float32 scalar), so the
  schedule and the server's per-round rate never trigger a recompilation.
* FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks") for
  non-IID clients: `train(..., proximal_mu=mu)` minimises loss + mu/2 ||w - w_global||^2,
  which keeps each client near the round's global model. Its gradient, mu (w - w_global),
  is added to the loss's gradient inside the one train_step, with mu a traced scalar like
  the learning rate. mu = 0 skips the term (a lax.cond): plain FedAvg training, bit for bit.
* The client optimizer: Adam (above) or, with `train(..., optimizer="sgd")`, SGD with
  momentum 0.9 under the same schedule (peak 0.01 by default): the local optimizer of
  NIID-Bench (Li et al. 2022), and the better choice on label-skewed data. Our reading,
  not measured: Adam takes full-size steps even on the small, consistent gradients that
  push a client's missing classes down.
  The optimizer is a static argument of the jitted step: one program for each.
* Pad-and-mask: the last partial batch is padded to `batch_size` and the padding is
  masked out of the loss and the counts, so every example is used, small shards too,
  and there is only one batch shape to compile. (Its gradient averages fewer examples.)
* Batches are cut on the host with NumPy and dispatched asynchronously: copying a batch
  to the device costs less than indexing an epoch already there, so the plain loop is
  also the fast one.
"""

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = dict[str, dict[str, jax.Array]]

NUM_CLASSES = 10
# Defaults the server sends to clients every round (its CLI defaults).
LOCAL_EPOCHS = 3
BATCH_SIZE = 32
LEARNING_RATE = 4e-3  # the peak of the schedule below, for Adam
OPTIMIZER = "adam"
SCHEDULE = "wcos"  # local_learning_rate's shape, by its name in benchmarks/sweep_recipe.py
_SCHEDULE_CHUNK = 1024  # local steps evaluated at a time (_learning_rates)
# Evaluation batch: 100 is faster on 2 cores than 500 (0.79 s vs 1.38 s for 10,000 images)
# and its activations take 5x less memory (~14 MB instead of ~70 MB at the peak).
EVAL_BATCH_SIZE = 100

# Pixel mean and standard deviation of the MNIST training set: conv inputs are ~N(0, 1).
_MEAN, _STD = 0.1307, 0.3081

# (layer, weight shape) in the fixed wire order of params_to_ndarrays. Convs are HWIO.
_LAYERS: list[tuple[str, tuple[int, ...]]] = [
    ("conv1", (3, 3, 1, 16)),
    ("conv2", (3, 3, 16, 32)),
    ("dense1", (7 * 7 * 32, 128)),
    ("dense2", (128, NUM_CLASSES)),
]

# The client optimizers without their step size: train_step multiplies by the (scheduled)
# learning rate. Adam's moment estimates; SGD's heavy-ball momentum (v <- 0.9 v + g).
SGD_MOMENTUM = 0.9
_OPTIMIZERS = {"adam": optax.scale_by_adam(), "sgd": optax.trace(decay=SGD_MOMENTUM)}
OPTIMIZERS = tuple(_OPTIMIZERS)
# The peak learning rate of each when none is given: 4e-3 from the recipe sweep; 0.01 is
# NIID-Bench's for SGD.
LEARNING_RATES = {"adam": LEARNING_RATE, "sgd": 1e-2}


def param_spec() -> list[tuple[str, tuple[int, ...]]]:
    """("layer/w" or "layer/b", shape) for every array, in the fixed wire order."""
    spec = []
    for name, shape in _LAYERS:
        spec += [(f"{name}/w", shape), (f"{name}/b", (shape[-1],))]
    return spec


@jax.jit  # one program instead of a dozen small ones, each compiled (and kept) separately
def init_params(key: jax.Array) -> Params:
    """He-normal weights before each ReLU, a zero output layer, zero biases."""
    params = {}
    for (name, shape), k in zip(_LAYERS, jax.random.split(key, len(_LAYERS))):
        fan_in = int(np.prod(shape[:-1]))
        w = jax.random.normal(k, shape, jnp.float32) * np.sqrt(2.0 / fan_in)
        if name == _LAYERS[-1][0]:
            w = jnp.zeros(shape, jnp.float32)  # uniform first prediction: loss ln 10
        params[name] = {"w": w, "b": jnp.zeros(shape[-1], jnp.float32)}
    return params


def num_params(params: Params) -> int:
    """Total number of scalars in the model."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def _normalize(images: jax.Array) -> jax.Array:
    """uint8 or float in [0, 255], (B, 28, 28[, 1]) -> standardised float32 (B, 28, 28, 1)."""
    x = images.astype(jnp.float32).reshape(images.shape[0], 28, 28, 1)
    return (x / 255.0 - _MEAN) / _STD


def _conv_block(x: jax.Array, layer: dict[str, jax.Array]) -> jax.Array:
    """3x3 'same' conv + ReLU + 2x2 max-pool: (B, H, W, C) -> (B, H/2, W/2, C')."""
    y = jax.lax.conv_general_dilated(
        x, layer["w"], window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.relu(y + layer["b"])
    b, h, w, c = y.shape
    return y.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))  # 2x2 windows


def apply(params: Params, images: jax.Array) -> jax.Array:
    """Logits (B, 10) for uint8 or float images in [0, 255], (B, 28, 28) or (B, 28, 28, 1)."""
    x = _normalize(images)                                    # (B, 28, 28, 1)
    x = _conv_block(x, params["conv1"])                       # (B, 14, 14, 16)
    x = _conv_block(x, params["conv2"])                       # (B, 7, 7, 32)
    x = x.reshape(x.shape[0], -1)                             # (B, 1568)
    x = jax.nn.relu(x @ params["dense1"]["w"] + params["dense1"]["b"])  # (B, 128)
    return x @ params["dense2"]["w"] + params["dense2"]["b"]             # (B, 10)


def _losses_and_hits(params: Params, images: jax.Array,
                     labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example cross-entropy (B,) and 1.0 where the prediction is right (B,)."""
    logits = apply(params, images)                                          # (B, 10)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return losses, (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def _masked_loss(params: Params, images: jax.Array, labels: jax.Array,
                 mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over the real (mask 1) examples, and their number correct."""
    losses, hits = _losses_and_hits(params, images, labels)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0), jnp.sum(hits * mask)


@functools.partial(jax.jit, static_argnames="optimizer")
def train_step(params: Params, opt_state: Any, learning_rate: jax.Array, images: jax.Array,
               labels: jax.Array, mask: jax.Array, global_params: Params,
               proximal_mu: jax.Array,
               optimizer: str = OPTIMIZER) -> tuple[Params, Any, jax.Array, jax.Array]:
    """One step of `optimizer` (adam | sgd) on a padded batch.

    Returns (params, opt_state, mean loss, number correct).

    The loss is the cross-entropy plus FedProx's proximal_mu/2 ||params - global_params||^2;
    the mean loss returned is the cross-entropy alone (comparable across mu).
    """
    (loss, correct), grads = jax.value_and_grad(_masked_loss, has_aux=True)(
        params, images, labels, mask)
    # The proximal term enters by its gradient, mu (w - w_global). lax.cond, not an add of
    # zeros: mu = 0 must be plain training bit for bit, and an elementwise term that XLA
    # fuses into the gradient's own kernels changes their rounding (measured: ~40,000
    # weights an ulp off after 2 epochs). The branch not taken costs nothing.
    grads = jax.lax.cond(
        proximal_mu == 0, lambda: grads,
        lambda: jax.tree_util.tree_map(lambda g, w, w0: g + proximal_mu * (w - w0),
                                       grads, params, global_params))
    updates, opt_state = _OPTIMIZERS[optimizer].update(grads, opt_state)
    params = optax.apply_updates(params, optax.tree.scale(-learning_rate, updates))
    return params, opt_state, loss, correct


@jax.jit
def eval_step(params: Params, images: jax.Array, labels: jax.Array,
              mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy and number correct over the real examples of a padded batch."""
    losses, hits = _losses_and_hits(params, images, labels)
    return jnp.sum(losses * mask), jnp.sum(hits * mask)


# One program, not one per leaf shape.
@functools.partial(jax.jit, static_argnames="optimizer")
def init_opt_state(params: Params, optimizer: str = OPTIMIZER) -> Any:
    """Fresh moments (zeros): a client starts every round with a new state."""
    return _OPTIMIZERS[optimizer].init(params)


def check_optimizer(optimizer: str) -> None:
    """ValueError (one line) unless optimizer is one of OPTIMIZERS."""
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"unknown client optimizer {optimizer!r}; known: "
                         f"{', '.join(OPTIMIZERS)}")


def compile_steps(batch_size: int | None = None, eval_batch_size: int | None = None,
                  optimizer: str = OPTIMIZER) -> None:
    """Compile train_step (for batch_size, with the learning-rate schedule's ops) and
    eval_step (for eval_batch_size) now.

    One fully masked batch of zeros each (mask 0: it changes nothing and costs one step),
    through the same calls as train() and evaluate(), so that they find the compiled
    programs in JAX's in-memory cache: no throw-away epoch, no compilation in round 1.
    """
    params = ndarrays_to_params([np.zeros(shape, np.float32) for _, shape in param_spec()])
    if batch_size is not None:
        outputs = train_step(params, init_opt_state(params, optimizer=optimizer),
                             np.float32(0.0), np.zeros((batch_size, 28, 28), np.uint8),
                             np.zeros(batch_size, np.int32), np.zeros(batch_size, np.float32),
                             params, np.float32(0.0), optimizer=optimizer)
        jax.block_until_ready(outputs)
        local_learning_rate(0.0, 0, 1)  # optax's schedule: its ops, for their one shape
    if eval_batch_size is not None:
        jax.block_until_ready(eval_step(
            params, np.zeros((eval_batch_size, 28, 28), np.uint8),
            np.zeros(eval_batch_size, np.int32), np.zeros(eval_batch_size, np.float32)))


def local_learning_rate(learning_rate: float, step: int, total_steps: int) -> np.float32:
    """The SCHEDULE: linear warm-up over the first 10% of the steps, then half-cosine to 0."""
    return _learning_rates(float(learning_rate), total_steps)[step]


@functools.lru_cache(maxsize=64)  # every round of a client asks for the same schedule
def _learning_rates(learning_rate: float, total_steps: int) -> np.ndarray:
    """The rate of every local step, float32 (total_steps,), from optax's schedule.

    Evaluated here, on the host, once per (peak, number of steps), and handed to train_step
    step by step as a traced scalar: the schedule never enters (or recompiles) the step.
    """
    warm = max(1, total_steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warm,
        decay_steps=max(total_steps, warm + 1))  # > warmup_steps, as optax requires
    # The warm-up's first step already moves: warm-up step s takes the rate of count s + 1
    # (peak * (s + 1) / warm), so the peak is taken twice, by the warm-up's last step and
    # the cosine's first (count warm), and no step is spent at rate 0.
    steps = np.arange(total_steps)
    counts = np.where(steps < warm, steps + 1, steps)
    # optax runs op by op here, and JAX compiles each op once per shape: counts go in
    # chunks of one fixed length, so another peak or number of steps compiles nothing.
    chunks = np.pad(counts, (0, -total_steps % _SCHEDULE_CHUNK)).reshape(-1, _SCHEDULE_CHUNK)
    # float64 on the CPU, then float32: the rates the recipe was measured with, bit for bit
    # (float32 arithmetic would move about half of them by an ulp or more).
    # local_devices: under jax.distributed (peer.py), devices("cpu")[0] is peer 0's.
    with jax.enable_x64(True), jax.default_device(jax.local_devices(backend="cpu")[0]):
        rates = np.concatenate([np.asarray(schedule(c), np.float32) for c in chunks])
    rates = rates[:total_steps]
    rates.flags.writeable = False  # shared by every call that hits the cache
    return rates


@functools.partial(jax.jit, static_argnums=2)  # one program per shard size, not ~12 small ones
def _permutation(key: jax.Array, epoch: int, n: int) -> jax.Array:
    return jax.random.permutation(jax.random.fold_in(key, epoch), n)


def epoch_order(key: jax.Array, epoch: int, n: int) -> np.ndarray:
    """The shuffled example order of one epoch, from its own key fold_in(key, epoch)."""
    return np.asarray(_permutation(key, epoch, n))


def padded_batches(order: np.ndarray,
                   batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices, mask), both (batch_size,); the last batch is padded with index 0, mask 0."""
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        mask = np.zeros(batch_size, np.float32)
        mask[:len(idx)] = 1.0
        yield np.pad(idx, (0, batch_size - len(idx))), mask


def train(params: Params, images: np.ndarray, labels: np.ndarray, *, epochs: int,
          batch_size: int, learning_rate: float, key: jax.Array,
          proximal_mu: float = 0.0, optimizer: str = OPTIMIZER) -> tuple[Params, dict]:
    """Local training: `epochs` of mini-batch Adam (or SGD), reshuffled every epoch.

    Args:
      params: the starting weights (this round's global model).
      images: uint8 (N, 28, 28); labels: int (N,) in 0..9.
      epochs, batch_size, learning_rate: the local settings the server sends.
      key: PRNG key for the shuffles; epoch e uses fold_in(key, e).
      proximal_mu: FedProx's mu: the loss adds mu/2 ||w - params||^2 (0: plain FedAvg).
      optimizer: "adam" or "sgd" (momentum SGD_MOMENTUM); a fresh state every call.
    Returns:
      (new params, {"loss": mean training loss, "accuracy": fraction of training batches
      predicted right while training, "num_examples": examples seen = epochs * N}).
    """
    check_optimizer(optimizer)
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    global_params, mu = params, np.float32(proximal_mu)  # float32: one program for every mu
    opt_state = init_opt_state(params, optimizer=optimizer)
    total_steps = epochs * -(-len(images) // batch_size)  # ceil: partial batches count
    losses, corrects, sizes = [], [], []
    for epoch in range(epochs):
        for idx, mask in padded_batches(epoch_order(key, epoch, len(images)), batch_size):
            lr = local_learning_rate(learning_rate, len(losses), total_steps)
            params, opt_state, loss, correct = train_step(
                params, opt_state, lr, images[idx], labels[idx], mask, global_params, mu,
                optimizer=optimizer)
            # Kept on device: float(loss) here would wait for each step to finish.
            losses.append(loss), corrects.append(correct), sizes.append(mask.sum())
    seen = int(np.sum(sizes))
    if seen == 0:
        return params, {"loss": 0.0, "accuracy": 0.0, "num_examples": 0}
    # device_get, not jnp.stack: stacking compiles a program for every number of steps.
    loss_sum = float(np.dot(np.asarray(jax.device_get(losses)), sizes))
    correct = float(np.sum(np.asarray(jax.device_get(corrects)), dtype=np.float64))
    return params, {"loss": loss_sum / seen, "accuracy": correct / seen, "num_examples": seen}


def evaluate(params: Params, images: np.ndarray, labels: np.ndarray,
             batch_size: int = EVAL_BATCH_SIZE) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the whole set, exact, in padded batches."""
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    loss_sum, correct = 0.0, 0.0
    for idx, mask in padded_batches(np.arange(len(images)), batch_size):
        loss, hits = eval_step(params, images[idx], labels[idx], mask)
        loss_sum, correct = loss_sum + float(loss), correct + float(hits)
    n = max(len(images), 1)
    return loss_sum / n, correct / n


def params_to_ndarrays(params: Params) -> list[np.ndarray]:
    """Params -> float32 NumPy arrays in param_spec() order: conv1/w, conv1/b, ..., dense2/b."""
    return [np.asarray(params[layer][leaf], np.float32)
            for layer, leaf in (name.split("/") for name, _ in param_spec())]


def ndarrays_to_params(arrays: list[np.ndarray]) -> Params:
    """Inverse of params_to_ndarrays; ValueError on a wrong count, shape or dtype."""
    spec = param_spec()
    if len(arrays) != len(spec):
        raise ValueError(f"expected {len(spec)} arrays ({', '.join(n for n, _ in spec)}), "
                         f"got {len(arrays)}")
    params: Params = {}
    for (name, shape), array in zip(spec, arrays):
        array = np.asarray(array)
        if array.shape != shape or array.dtype != np.float32:
            raise ValueError(f"{name}: expected float32 {shape}, got {array.dtype} {array.shape}")
        layer, leaf = name.split("/")
        # device_put, not jnp.asarray: that compiles a copy program for every shape.
        params.setdefault(layer, {})[leaf] = jax.device_put(array)
    return params
