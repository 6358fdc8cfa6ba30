"""Tests for model.py: shapes, parameter count, training, exact evaluation, wire format."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import model


def _toy_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n random ink-on-black uint8 images (n, 28, 28) and labels (n,), like a tiny shard."""
    rng = np.random.default_rng(seed)
    # ~13% of pixels at 255, the rest 0: about MNIST's pixel mean and spread.
    images = np.where(rng.random((n, 28, 28)) < 0.13, 255, 0).astype(np.uint8)
    return images, rng.integers(0, 10, n)


def _busy_params(seed: int = 0) -> model.Params:
    """init_params with a random output layer too (init leaves it 0: all logits 0)."""
    params = model.init_params(jax.random.key(seed))
    w = params["dense2"]["w"]
    params["dense2"]["w"] = 0.1 * jax.random.normal(jax.random.key(seed + 1), w.shape)
    return params


def test_apply_output_shape_and_input_layouts():
    params = _busy_params()
    images, _ = _toy_data(5)
    apply = jax.jit(model.apply)  # one compilation instead of one per operation
    logits = apply(params, images)
    assert logits.shape == (5, model.NUM_CLASSES) and logits.dtype == jnp.float32
    # (B, 28, 28) uint8 and (B, 28, 28, 1) float in [0, 255] are the same input.
    as_float = apply(params, images[..., None].astype(np.float32))
    np.testing.assert_allclose(as_float, logits, rtol=1e-6, atol=1e-6)
    assert np.std(logits, axis=0).min() > 1e-3  # logits really depend on the image


def test_exact_parameter_count_and_spec():
    params = model.init_params(jax.random.key(0))
    # conv1 3*3*1*16+16, conv2 3*3*16*32+32, dense1 1568*128+128, dense2 128*10+10.
    assert model.num_params(params) == 160 + 4_640 + 200_832 + 1_290 == 206_922
    assert [name for name, _ in model.param_spec()] == [
        "conv1/w", "conv1/b", "conv2/w", "conv2/b", "dense1/w", "dense1/b", "dense2/w", "dense2/b"]
    assert sum(int(np.prod(shape)) for _, shape in model.param_spec()) == 206_922


def test_init_params_is_float32_and_depends_on_key():
    a, b = model.init_params(jax.random.key(0)), model.init_params(jax.random.key(1))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(a))
    assert not np.array_equal(a["conv1"]["w"], b["conv1"]["w"])
    # The output layer starts at zero: a uniform first prediction, loss exactly ln(10).
    images, labels = _toy_data(64)
    loss, _ = model.evaluate(a, images, labels)
    assert loss == pytest.approx(np.log(10), rel=1e-6)


def test_loss_falls_on_a_fixed_tiny_batch():
    params = model.init_params(jax.random.key(0))
    opt_state = model.init_opt_state(params)
    images, labels = _toy_data(8)
    mask = np.ones(8, np.float32)
    losses = []
    for _ in range(10):
        params, opt_state, loss, _ = model.train_step(
            params, opt_state, np.float32(1e-3), images, labels, mask, params, np.float32(0.0))
        losses.append(float(loss))
    assert losses[-1] < 0.25 * losses[0], losses


def _constant_logit_params(bias: np.ndarray) -> model.Params:
    """Params whose logits are `bias` for every image: every weight and other bias is 0."""
    arrays = [np.zeros(shape, np.float32) for _, shape in model.param_spec()]
    arrays[-1] = np.asarray(bias, np.float32)
    return model.ndarrays_to_params(arrays)


def test_evaluate_exact_on_hand_built_case_with_partial_batch():
    bias = np.zeros(10, np.float32)
    bias[3] = np.log(9.0)  # softmax: p(3) = 9 / (9 + 9) = 0.5, every other class 1/18
    params = _constant_logit_params(bias)
    images, _ = _toy_data(7)
    labels = np.array([3, 3, 3, 0, 1, 2, 4])  # every image is predicted "3": 3 of 7 right
    # batch_size 3 -> batches of 3, 3, 1: the padded last batch must count as 1 example.
    loss, accuracy = model.evaluate(params, images, labels, batch_size=3)
    assert accuracy == 3 / 7
    expected_loss = (3 * np.log(2.0) + 4 * np.log(18.0)) / 7
    assert loss == pytest.approx(expected_loss, rel=1e-6)


def test_evaluate_matches_one_unbatched_computation():
    params = _busy_params()
    images, labels = _toy_data(50)
    logits = np.asarray(model.apply(params, images), np.float64)  # (50, 10)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected_loss = -log_probs[np.arange(50), labels].mean()
    expected_accuracy = (logits.argmax(1) == labels).mean()
    assert 0 < expected_accuracy < 1 and np.ptp(logits) > 0.1  # a case that can go wrong
    for batch_size in (7, 50, 64):  # partial last batch, exact fit, one padded batch
        loss, accuracy = model.evaluate(params, images, labels, batch_size=batch_size)
        assert accuracy == expected_accuracy
        assert loss == pytest.approx(expected_loss, rel=1e-5)


def test_numpy_round_trip_is_exact():
    params = model.init_params(jax.random.key(0))
    arrays = model.params_to_ndarrays(params)
    assert [a.shape for a in arrays] == [shape for _, shape in model.param_spec()]
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays)
    back = model.ndarrays_to_params(arrays)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("change, message", [
    (lambda a: a[:-1], "expected 8 arrays \\(conv1/w, .*\\), got 7"),
    (lambda a: a[:2] + [a[2][..., :10]] + a[3:], r"conv2/w: expected float32 \(3, 3, 16, 32\)"),
    (lambda a: a[:-1] + [a[-1].astype(np.float64)], "dense2/b: expected float32"),
])
def test_ndarrays_to_params_rejects_bad_input(change, message):
    arrays = model.params_to_ndarrays(model.init_params(jax.random.key(0)))
    with pytest.raises(ValueError, match=message):
        model.ndarrays_to_params(change(arrays))


def test_train_is_deterministic_and_uses_every_example():
    params = model.init_params(jax.random.key(0))
    images, labels = _toy_data(70)  # 70 = 2 * 32 + 6: a partial last batch
    run = lambda key: model.train(params, images, labels, epochs=2, batch_size=32,
                                  learning_rate=1e-3, key=key)
    (a, metrics_a), (b, metrics_b) = run(jax.random.key(1)), run(jax.random.key(1))
    for x, y in zip(model.params_to_ndarrays(a), model.params_to_ndarrays(b)):
        np.testing.assert_array_equal(x, y)  # bit-identical
    assert metrics_a == metrics_b and metrics_a["num_examples"] == 140
    assert 0.0 <= metrics_a["accuracy"] <= 1.0 and metrics_a["loss"] > 0
    c, _ = run(jax.random.key(2))  # another shuffle, other weights
    assert not np.array_equal(model.params_to_ndarrays(a)[0], model.params_to_ndarrays(c)[0])


def _plain_step(params, opt_state, lr, images, labels, mask):
    """model.train_step without the proximal term (mu = 0)."""
    return model.train_step(params, opt_state, lr, images, labels, mask, params, np.float32(0))


def _train_by_hand(params, images, labels, orders, batch_size, learning_rate,
                   step=_plain_step):
    """model.train written out, with the example order of each epoch given explicitly."""
    opt_state = model.init_opt_state(params)
    total = len(orders) * -(-len(images) // batch_size)
    done = 0
    for order in orders:
        for idx, mask in model.padded_batches(order, batch_size):
            lr = model.local_learning_rate(learning_rate, done, total)
            params, opt_state, _, _ = step(params, opt_state, lr, images[idx], labels[idx], mask)
            done += 1
    return model.params_to_ndarrays(params)


def _schedule_before_optax(learning_rate, step, total_steps):
    """model.local_learning_rate as it was before optax's schedule (issue 21), verbatim:
    the rates every recipe measurement was made with."""
    warm = max(1, total_steps // 10)
    if step < warm:
        return np.float32(learning_rate * (step + 1) / warm)
    progress = (step - warm) / (total_steps - warm)  # 0 -> 1 after the warm-up
    return np.float32(learning_rate * 0.5 * (1.0 + np.cos(np.pi * progress)))


@pytest.mark.parametrize("learning_rate", [4e-3, 1e-2, 0.05])
def test_optax_schedule_gives_the_rates_of_the_hand_written_one_bit_for_bit(learning_rate):
    """Every local step's rate, for every number of steps up to 40 (the warm-up's
    boundaries), a client's 3 epochs of 5,400 or 6,000 images, and more than one of
    model._SCHEDULE_CHUNK."""
    for total in (*range(1, 41), 507, 564, 2100):
        expected = [_schedule_before_optax(learning_rate, s, total) for s in range(total)]
        rates = [model.local_learning_rate(learning_rate, s, total) for s in range(total)]
        assert all(type(r) is np.float32 for r in rates)
        np.testing.assert_array_equal(rates, expected, err_msg=f"{total} steps")


def test_train_reshuffles_every_epoch_from_fold_in_key_epoch():
    """Two epochs inside train() see two different orders: permutation(fold_in(key, e))."""
    params = model.init_params(jax.random.key(0))
    images, labels = _toy_data(70)
    key = jax.random.key(3)
    trained, _ = model.train(params, images, labels, epochs=2, batch_size=32,
                             learning_rate=1e-3, key=key)
    orders = [np.asarray(jax.random.permutation(jax.random.fold_in(key, e), 70)) for e in (0, 1)]
    assert not np.array_equal(*orders)
    expected = _train_by_hand(params, images, labels, orders, 32, 1e-3)
    for x, y in zip(model.params_to_ndarrays(trained), expected):
        np.testing.assert_array_equal(x, y)
    # The same first epoch twice is another model: the test can tell the two apart.
    same_twice = _train_by_hand(params, images, labels, [orders[0]] * 2, 32, 1e-3)
    assert not np.array_equal(same_twice[0], expected[0])


def test_the_loss_of_a_padded_batch_is_the_loss_of_its_real_examples():
    """6 real examples padded to 32 (as padded_batches pads: index 0, mask 0) give the
    same loss, and the same step, as the 6 alone."""
    params = _busy_params()
    images, labels = _toy_data(40)
    idx, mask = list(model.padded_batches(np.arange(32, 38), 32))[0]
    assert mask.sum() == 6 and (idx[6:] == 0).all()
    opt_state = model.init_opt_state(params)
    lr = np.float32(1e-3)
    no_prox = (params, np.float32(0.0))
    padded = model.train_step(params, opt_state, lr, images[idx], labels[idx], mask, *no_prox)
    alone = model.train_step(params, opt_state, lr, images[32:38], labels[32:38],
                             np.ones(6, np.float32), *no_prox)
    assert float(padded[2]) == pytest.approx(float(alone[2]), rel=1e-6)  # mean loss
    assert float(padded[3]) == float(alone[3])                           # number correct
    for x, y in zip(model.params_to_ndarrays(padded[0]), model.params_to_ndarrays(alone[0])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_train_reports_the_mean_loss_of_the_real_examples():
    """At learning rate 0 the model does not move, so train()'s loss over 38 examples
    (a batch of 32, one of 6 padded to 32) must be evaluate()'s loss of the 38."""
    params = _busy_params()
    images, labels = _toy_data(38)
    _, metrics = model.train(params, images, labels, epochs=1, batch_size=32,
                             learning_rate=0.0, key=jax.random.key(0))
    loss, accuracy = model.evaluate(params, images, labels)
    assert metrics["num_examples"] == 38
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-9)


# ------------------------------------------------------------------------------ FedProx

@jax.jit
def _step_before_fedprox(params, opt_state, learning_rate, images, labels, mask):
    """model.train_step as it was before FedProx (issue 12), verbatim: the reference."""
    (loss, correct), grads = jax.value_and_grad(model._masked_loss, has_aux=True)(
        params, images, labels, mask)
    updates, opt_state = optax.scale_by_adam().update(grads, opt_state)  # then model._ADAM
    params = jax.tree_util.tree_map(lambda p, u: p - learning_rate * u, params, updates)
    return params, opt_state, loss, correct


def test_fedprox_with_mu_0_is_the_training_before_fedprox_bit_for_bit():
    """mu = 0 (and no mu at all, as a client that is sent none) trains exactly as before.
    Adding mu (w - w_global) = 0 inside the same kernels would not: XLA fuses it into the
    gradient's computation and its rounding changes (model.train_step says how it's kept)."""
    params = model.init_params(jax.random.key(0))
    images, labels = _toy_data(200)  # 7 steps per epoch, the last one padded
    key = jax.random.key(4)
    orders = [model.epoch_order(key, e, 200) for e in (0, 1)]
    before = _train_by_hand(params, images, labels, orders, 32, 4e-3, _step_before_fedprox)
    for kwargs in ({}, {"proximal_mu": 0.0}):
        trained, _ = model.train(params, images, labels, epochs=2, batch_size=32,
                                 learning_rate=4e-3, key=key, **kwargs)
        for x, y in zip(model.params_to_ndarrays(trained), before):
            np.testing.assert_array_equal(x, y)


def _distance(a: model.Params, b: model.Params) -> float:
    """||a - b|| over every weight, in float64."""
    return float(np.sqrt(sum(np.sum((x.astype(np.float64) - y) ** 2) for x, y in zip(
        model.params_to_ndarrays(a), model.params_to_ndarrays(b)))))


def test_fedprox_keeps_the_local_model_closer_to_the_global_model():
    """The larger mu, the nearer the client's model ends to the round's global model."""
    start = _busy_params()
    images, labels = _toy_data(200)
    distances = []
    for mu in (0.0, 0.1, 1.0):
        trained, _ = model.train(start, images, labels, epochs=3, batch_size=32,
                                       learning_rate=4e-3, key=jax.random.key(1),
                                       proximal_mu=mu)
        distances.append(_distance(trained, start))
    assert distances[0] > distances[1] > distances[2] > 0, distances
    assert distances[2] < 0.7 * distances[0], distances  # not a rounding-sized effect


def test_fedprox_gradient_is_that_of_mu_over_2_times_the_squared_distance():
    """The gradient a step with mu feeds to Adam is the gradient of
    cross-entropy + mu/2 ||w - w_global||^2, taken by autodiff of the whole objective.
    Compared through Adam's first moment (0.1 g after one step from a fresh state): the
    step itself, ~sign(g) at Adam's first step, would hide a wrong factor."""
    global_params, params = model.init_params(jax.random.key(0)), _busy_params(3)
    images, labels = _toy_data(32)
    mask, mu = np.ones(32, np.float32), np.float32(0.5)
    opt_state = model.init_opt_state(params)

    def objective(p):
        loss, _ = model._masked_loss(p, images, labels, mask)
        squared = sum(jnp.sum((w - w0) ** 2) for w, w0 in zip(
            jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(global_params)))
        return loss + mu / 2 * squared

    _, expected = model._OPTIMIZERS["adam"].update(jax.grad(objective)(params), opt_state)
    _, stepped, _, _ = model.train_step(params, opt_state, np.float32(1e-3), images, labels,
                                        mask, global_params, mu)
    cross_entropy = lambda p: model._masked_loss(p, images, labels, mask)[0]
    _, without_mu = model._OPTIMIZERS["adam"].update(jax.grad(cross_entropy)(params), opt_state)
    for x, y in zip(jax.tree_util.tree_leaves(stepped.mu), jax.tree_util.tree_leaves(expected.mu)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    # The case can go wrong: the proximal part of that gradient is not small.
    prox = [x - y for x, y in zip(jax.tree_util.tree_leaves(expected.mu),
                                  jax.tree_util.tree_leaves(without_mu.mu))]
    assert max(float(jnp.max(jnp.abs(d))) for d in prox) > 1e-3


# ------------------------------------------------------------------ the client optimizer

def test_sgd_clients_take_heavy_ball_momentum_steps_under_the_same_schedule():
    """optimizer="sgd": v <- 0.9 v + g, w <- w - lr_t v, v = 0 at the start of every call,
    lr_t the same warm-up + cosine as Adam's; written out here with jax.grad."""
    params, (images, labels), key = _busy_params(), _toy_data(70), jax.random.key(5)
    trained, metrics = model.train(params, images, labels, epochs=2, batch_size=32,
                                   learning_rate=0.05, key=key, optimizer="sgd")
    grad = jax.jit(jax.grad(lambda p, x, y, m: model._masked_loss(p, x, y, m)[0]))
    w, v, done = params, jax.tree_util.tree_map(jnp.zeros_like, params), 0
    for epoch in (0, 1):
        for idx, mask in model.padded_batches(model.epoch_order(key, epoch, 70), 32):
            g = grad(w, images[idx], labels[idx], mask)
            v = jax.tree_util.tree_map(lambda v, g: 0.9 * v + g, v, g)
            lr = model.local_learning_rate(0.05, done, 6)  # 2 epochs x 3 batches
            w, done = jax.tree_util.tree_map(lambda w, v: w - lr * v, w, v), done + 1
    for x, y in zip(model.params_to_ndarrays(trained), model.params_to_ndarrays(w)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert metrics["num_examples"] == 140
    adam, _ = model.train(params, images, labels, epochs=2, batch_size=32,
                          learning_rate=0.05, key=key)  # the default: another model
    assert _distance(adam, trained) > 10 * _distance(trained, w) + 1e-3


def test_an_unknown_client_optimizer_is_one_line():
    images, labels = _toy_data(8)
    with pytest.raises(ValueError, match="^unknown client optimizer 'rmsprop'; known: "
                                         "adam, sgd$"):
        model.train(model.init_params(jax.random.key(0)), images, labels, epochs=1,
                    batch_size=8, learning_rate=1e-3, key=jax.random.key(0),
                    optimizer="rmsprop")


def test_each_epoch_has_its_own_shuffle():
    key = jax.random.key(0)
    first, second = model.epoch_order(key, 0, 100), model.epoch_order(key, 1, 100)
    assert sorted(first) == sorted(second) == list(range(100))
    assert not np.array_equal(first, second)


def test_padded_batches_cover_every_example_once():
    order = np.random.default_rng(0).permutation(70)
    batches = list(model.padded_batches(order, 32))
    assert [len(idx) for idx, _ in batches] == [32, 32, 32]  # one shape: one compilation
    real = np.concatenate([idx[mask == 1] for idx, mask in batches])
    np.testing.assert_array_equal(real, order)
    assert batches[-1][1].sum() == 6


class _CompileCounter:
    """Counts programs handed to XLA (jax.monitoring, a public API): any jitted function,
    any shape, compiled or loaded from the persistent cache."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        if event == self.EVENT:
            self.count += 1

    def __enter__(self) -> "_CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self)


def test_a_round_after_the_warm_up_compiles_nothing():
    """A client's first round (training + evaluation) compiles what it needs; the next
    round compiles nothing at all, though everything that may change between rounds
    changes: new params arriving as NumPy arrays (as from Flower), another learning rate,
    more epochs, another key, FedProx's mu switched on and changed, and evaluation of a set
    of another size."""
    images, labels = _toy_data(70)  # 3 steps per epoch, the last one padded
    with _CompileCounter():  # the warm-up (other tests may have compiled it already)
        params, _ = model.train(model.init_params(jax.random.key(0)), images, labels,
                                epochs=1, batch_size=32, learning_rate=1e-3,
                                key=jax.random.key(1))
        model.evaluate(params, images, labels)
    new_params = model.ndarrays_to_params(
        model.params_to_ndarrays(model.init_params(jax.random.key(5))))
    other_images, other_labels = _toy_data(45, seed=1)
    with _CompileCounter() as next_round:
        new_params, _ = model.train(new_params, images, labels, epochs=2, batch_size=32,
                                    learning_rate=3e-4, key=jax.random.key(2), proximal_mu=0.01)
        new_params, _ = model.train(new_params, images, labels, epochs=1, batch_size=32,
                                    learning_rate=3e-4, key=jax.random.key(3), proximal_mu=1)
        model.evaluate(new_params, other_images, other_labels)
    assert next_round.count == 0, f"{next_round.count} programs compiled after the warm-up"
    # The counter sees compilations: a shape not seen before compiles the step again.
    with _CompileCounter() as new_shape:
        model.train(new_params, images, labels, epochs=1, batch_size=17, learning_rate=1e-3,
                    key=jax.random.key(2))
    assert new_shape.count >= 1, "the counter missed a compilation"
