"""What an update, or the final model, reveals about the data behind it: two attacks, measured.

Gradient inversion rebuilds a training image from an update. Zhu et al. 2019 ("Deep
Leakage from Gradients") optimise a dummy image until its gradient matches the observed
one; Geiping et al. 2020 ("Inverting Gradients") match the gradient's *direction* (cosine
similarity, which ignores the learning rate) and add a total-variation prior, with Adam on
the image and a box constraint. Here, on this project's CNN (model.py):

    x* = argmin_{x in [0, 1]}  1 - cos(∇_w L(w; x, y), -Δ)  +  α TV(x)

where Δ is the observed update (for one SGD step, -lr ∇_w L: its direction is the
gradient's) and y the label. For one image the label is read off the update itself (Zhao
et al. 2020, "iDLG"): the gradient of the output bias is softmax - onehot(y), negative only
at the true class. For a batch the attacker is given the labels, as in Geiping et al.

Membership inference asks whether an image was in the training set. The loss-threshold
attack of Yeom et al. 2018 ("Privacy Risk in Machine Learning") calls an image a member
when the model's loss on it is low; its AUC over all thresholds and its true-positive rate
at 1% false positives say how well that separates members from non-members.

Pure JAX and optax, no I/O: benchmarks/bench_leakage.py runs the cases and draws them.
PSNR, SSIM and the AUC are a few lines each: none of the project's dependencies has them
in JAX (scikit-image and dm-pix are not among them, scikit-learn works on NumPy only).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import model

Params = model.Params

# Geiping et al.'s settings, scaled to a 28x28 grey image: Adam at 0.1 on the pixels in
# [0, 1], the step divided by 10 at 3/8, 5/8 and 7/8 of the steps, the TV weight below.
INVERSION_STEPS = 1000
INVERSION_LEARNING_RATE = 0.1
TV_WEIGHT = 1e-2
RESTARTS = 4  # random starts, run side by side; the one with the lowest loss wins


def _mean_loss(params: Params, images01: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of images in [0, 1] (B, 28, 28), as model.py trains on them."""
    logits = model.apply(params, 255.0 * images01)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@jax.jit
def gradient(params: Params, images01: jax.Array, labels: jax.Array) -> Params:
    """∇_w of the mean cross-entropy of a batch of images in [0, 1]."""
    return jax.grad(_mean_loss)(params, images01, labels)


def sgd_update(params: Params, images01: jax.Array, labels: jax.Array,
               learning_rate: float = 0.1) -> Params:
    """What one local SGD step on this batch sends back: new weights - old = -lr ∇_w L."""
    return jax.tree_util.tree_map(lambda g: -learning_rate * g,
                                  gradient(params, images01, labels))


def difference(new: Params, old: Params) -> Params:
    """new - old, leaf by leaf: the update a client's trained model reveals."""
    return jax.tree_util.tree_map(jnp.subtract, new, old)


def add(updates: list[Params]) -> Params:
    """The sum of several clients' updates: all the server learns under SecAgg+."""
    return jax.tree_util.tree_map(lambda *leaves: sum(leaves), *updates)


def clip_and_noise(update: Params, clipping_norm: float, noise_multiplier: float,
                   key: jax.Array) -> Params:
    """DP-FedAvg's treatment of one update: clipped to L2 norm C, plus N(0, σ²C²) per weight."""
    clipped, _ = optax.clip_by_global_norm(clipping_norm).update(update, optax.EmptyState())
    leaves, tree = jax.tree_util.tree_flatten(clipped)
    keys = jax.random.split(key, len(leaves))
    noisy = [leaf + noise_multiplier * clipping_norm * jax.random.normal(k, leaf.shape)
             for leaf, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, noisy)


def infer_label(update: Params) -> int:
    """The label of a one-image update (iDLG): the only class whose output-bias gradient is
    negative is the true one, so its entry of the update (-lr × gradient) is the largest."""
    return int(jnp.argmax(update["dense2"]["b"]))


def _flat(tree: Params) -> jax.Array:
    return jnp.concatenate([leaf.ravel() for leaf in jax.tree_util.tree_leaves(tree)])


def total_variation(images01: jax.Array) -> jax.Array:
    """Mean absolute difference between neighbouring pixels (B, 28, 28): the image prior."""
    return (jnp.abs(jnp.diff(images01, axis=1)).mean()
            + jnp.abs(jnp.diff(images01, axis=2)).mean())


def inversion_loss(images01: jax.Array, params: Params, labels: jax.Array,
                   target: jax.Array, tv_weight: float) -> jax.Array:
    """1 - cos(gradient of the dummy images, target direction) + tv_weight · TV."""
    g = _flat(gradient(params, images01, labels))
    cosine = jnp.dot(g, target) / (jnp.linalg.norm(g) * jnp.linalg.norm(target) + 1e-12)
    return 1.0 - cosine + tv_weight * total_variation(images01)


@functools.partial(jax.jit, static_argnames=("num_images", "steps", "restarts"))
def _invert(params: Params, target: jax.Array, labels: jax.Array, key: jax.Array,
            num_images: int, steps: int, restarts: int, learning_rate: float,
            tv_weight: float) -> tuple[jax.Array, jax.Array]:
    schedule = optax.piecewise_constant_schedule(
        learning_rate, {int(steps * f): 0.1 for f in (3 / 8, 5 / 8, 7 / 8)})
    optimizer = optax.adam(schedule)
    loss_and_grad = jax.value_and_grad(inversion_loss)

    def one_start(k: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = jax.random.uniform(k, (num_images, 28, 28))

        def step(carry, _):
            x, state = carry
            loss, g = loss_and_grad(x, params, labels, target, tv_weight)
            updates, state = optimizer.update(g, state)
            x = jnp.clip(optax.apply_updates(x, updates), 0.0, 1.0)  # the box [0, 1]
            return (x, state), loss

        (x, _), _ = jax.lax.scan(step, (x, optimizer.init(x)), None, length=steps)
        return x, inversion_loss(x, params, labels, target, tv_weight)

    images, losses = jax.vmap(one_start)(jax.random.split(key, restarts))
    return images, losses


def invert(params: Params, update: Params, labels: np.ndarray | list[int], key: jax.Array, *,
           steps: int = INVERSION_STEPS, restarts: int = RESTARTS,
           learning_rate: float = INVERSION_LEARNING_RATE,
           tv_weight: float = TV_WEIGHT) -> np.ndarray:
    """Images in [0, 1], (len(labels), 28, 28), whose gradient at params points along -update.

    Args:
      params: the global model the update was computed from (the server knows it).
      update: what the server observed (a client's new weights - params, or a sum of them).
      labels: one per image to rebuild (infer_label(update) for one image).
      key: PRNG key of the random starts.
    Returns:
      The rebuilt images of the start whose final loss is lowest (no true image consulted).
    """
    labels = jnp.asarray(labels, jnp.int32)
    target = -_flat(update)
    images, losses = _invert(params, target, labels, key, num_images=int(labels.shape[0]),
                             steps=steps, restarts=restarts,
                             learning_rate=learning_rate, tv_weight=tv_weight)
    return np.asarray(images[jnp.argmin(losses)])


# ---------------------------------------------------------------- image similarity

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1] (inf when equal)."""
    mse = float(jnp.mean((jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> jax.Array:
    x = jnp.arange(size) - (size - 1) / 2
    w = jnp.exp(-x**2 / (2 * sigma**2))
    return jnp.outer(w, w) / jnp.sum(w) ** 2


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two images in [0, 1] (28, 28) (Wang et al. 2004: 11x11
    Gaussian window of σ 1.5, K1 = 0.01, K2 = 0.03, valid positions averaged); 1 when equal."""
    c1, c2 = 0.01**2, 0.03**2
    window = _gaussian_window()[:, :, None, None]  # (11, 11, 1, 1) HWIO

    def blur(x: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(x[None, :, :, None], window, (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))[0, :, :, 0]

    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
             / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(jnp.mean(index))


def best_match(rebuilt: np.ndarray, originals: np.ndarray) -> tuple[int, float, float]:
    """(index of the original closest to the rebuilt image by PSNR, that PSNR, its SSIM)."""
    scores = [psnr(rebuilt, o) for o in originals]
    i = int(np.argmax(scores))
    return i, scores[i], ssim(rebuilt, originals[i])


# ---------------------------------------------------------------- membership inference

def example_losses(params: Params, images: np.ndarray, labels: np.ndarray,
                   batch_size: int = model.EVAL_BATCH_SIZE) -> np.ndarray:
    """The model's cross-entropy on every example (N,), uint8 images in [0, 255]."""
    losses = []
    for start in range(0, len(images), batch_size):
        logits = model.apply(params, jnp.asarray(images[start:start + batch_size]))
        losses.append(np.asarray(optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.asarray(labels[start:start + batch_size], jnp.int32))))
    return np.concatenate(losses) if losses else np.zeros(0, np.float32)


def auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """Area under the ROC curve of "member if score > t": the probability that a random
    member scores above a random non-member, ties counting half (Mann-Whitney)."""
    m, n = jnp.asarray(member_scores), jnp.sort(jnp.asarray(nonmember_scores))
    below = jnp.searchsorted(n, m, side="left")    # non-members scoring less than each member
    ties = jnp.searchsorted(n, m, side="right") - below
    return float((jnp.sum(below) + 0.5 * jnp.sum(ties)) / (m.size * n.size))


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray,
               fpr: float = 0.01) -> float:
    """The fraction of members caught by the threshold that at most `fpr` of the
    non-members pass (Carlini et al. 2022's low-false-positive view of an attack)."""
    nonmember = np.sort(np.asarray(nonmember_scores))[::-1]
    allowed = int(np.floor(fpr * len(nonmember)))  # non-members allowed above the threshold
    threshold = nonmember[allowed] if allowed < len(nonmember) else -np.inf
    return float(np.mean(np.asarray(member_scores) > threshold))


def membership(params: Params, members: tuple[np.ndarray, np.ndarray],
               nonmembers: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Yeom et al.'s loss-threshold attack: {"auc", "tpr_at_1pct_fpr"}, score = -loss."""
    member = -example_losses(params, *members)
    nonmember = -example_losses(params, *nonmembers)
    return {"auc": auc(member, nonmember), "tpr_at_1pct_fpr": tpr_at_fpr(member, nonmember)}
