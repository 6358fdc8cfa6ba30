"""Read the data shards that partition_data.py writes, and check them.

Every federated client loads its own ``partition_N.npz`` and the server loads
``test.npz`` for centralized evaluation, so both go through this one module. It
imports only NumPy so that starting a client stays fast.

A shard that does not match what the model expects (a missing key, float
pixels, a label 11, ...) fails here with a one-line ``DataError`` instead of a
shape error deep inside a jitted training step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import zipfile

import numpy as np

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
MANIFEST_FORMAT_VERSION = 1
PARTITION_KEYS = ("x_train", "y_train", "x_val", "y_val")
TEST_KEYS = ("x_test", "y_test")

PathLike = str | os.PathLike


class DataError(Exception):
    """Data that cannot be used; str(error) is a one-line message for the user."""


@dataclasses.dataclass(frozen=True)
class Partition:
    """One client's examples: uint8 images (N, 28, 28), int32 labels (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def partition_path(data_dir: PathLike, index: int) -> pathlib.Path:
    """Path of client ``index``'s shard."""
    return pathlib.Path(data_dir) / f"partition_{index}.npz"


def test_set_path(data_dir: PathLike) -> pathlib.Path:
    """Path of the held-out test set used by the server."""
    return pathlib.Path(data_dir) / "test.npz"


def manifest_path(data_dir: PathLike) -> pathlib.Path:
    """Path of the manifest describing how the shards were made."""
    return pathlib.Path(data_dir) / "manifest.json"


def resolve_dir(path: str) -> str:
    """A run config's directory: absolute stays as it is, relative is from the working dir.

    Under `flwr run` the app runs from a copy Flower installs under $FLWR_HOME/apps/, not
    from your checkout, so a path is never taken relative to the app's files. The working
    directory is the one the SuperLink was started in (for `flwr run` on a fresh local
    SuperLink: where you ran it). Pass absolute paths when in doubt; demo.py always does.
    """
    return str(pathlib.Path(os.path.expanduser(path)).resolve())


def check_examples(images: np.ndarray, labels: np.ndarray, what: str) -> None:
    """Raise DataError unless images are uint8 (N, 28, 28) and labels are ints (N,) in 0..9."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{what}: expected uint8 images of shape (N, 28, 28), "
            f"got {images.dtype} {images.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise DataError(
            f"{what}: expected integer labels of shape (N,), got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(f"{what}: {len(images)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
        raise DataError(
            f"{what}: labels must be in 0-{NUM_CLASSES - 1}, "
            f"found {bad[0]} ({bad.size} out of range)"
        )


def read_npz(path: PathLike, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Load the named arrays from an .npz archive, turning every failure into DataError."""
    try:
        if not pathlib.Path(path).exists():
            raise FileNotFoundError(path)
        # np.load would try anything that is not a zip archive as a pickle.
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path}: not an .npz archive")
        # allow_pickle=False: an .npz from elsewhere must not be able to run code.
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                found = ", ".join(npz.files) or "nothing"
                raise DataError(f"{path}: missing {', '.join(missing)} (found {found})")
            return {k: npz[k] for k in keys}
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        # ValueError also covers object arrays, which allow_pickle=False refuses.
        raise DataError(f"{path}: not a readable .npz file ({e})") from None


def _read_shard(path: PathLike, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """read_npz, with a hint for the usual cause of a missing shard."""
    if not pathlib.Path(path).exists():
        raise DataError(f"{path}: not found; run `python partition_data.py` first")
    return read_npz(path, keys)


def _images_and_labels(
    arrays: dict[str, np.ndarray], x: str, y: str, path: PathLike
) -> tuple[np.ndarray, np.ndarray]:
    """Validate one (images, labels) pair and return labels as int32."""
    check_examples(arrays[x], arrays[y], f"{path} [{x}, {y}]")
    return arrays[x], arrays[y].astype(np.int32)


def load_partition(path: PathLike) -> Partition:
    """Load and validate one client's shard (raises DataError)."""
    arrays = _read_shard(path, PARTITION_KEYS)
    x_train, y_train = _images_and_labels(arrays, "x_train", "y_train", path)
    x_val, y_val = _images_and_labels(arrays, "x_val", "y_val", path)
    if len(x_train) == 0:
        raise DataError(f"{path}: no training examples")
    return Partition(x_train, y_train, x_val, y_val)


def load_test_set(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load and validate the server's test set as (x_test, y_test) (raises DataError)."""
    arrays = _read_shard(path, TEST_KEYS)
    x_test, y_test = _images_and_labels(arrays, "x_test", "y_test", path)
    if len(x_test) == 0:
        raise DataError(f"{path}: no test examples")
    return x_test, y_test


def load_all(data_dir: PathLike) -> tuple[list[Partition], tuple[np.ndarray, np.ndarray]]:
    """Every partition of a data directory, by index, and its test set (raises DataError):
    the data of a whole federation in one process (simulation.py)."""
    manifest = load_manifest(data_dir)
    partitions = [load_partition(partition_path(data_dir, p["index"]))
                  for p in sorted(manifest["partitions"], key=lambda p: p["index"])]
    return partitions, load_test_set(test_set_path(data_dir))


def load_manifest(data_dir: PathLike) -> dict:
    """Parse manifest.json (raises DataError if missing, corrupt or of another format)."""
    path = manifest_path(data_dir)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run `python partition_data.py` first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != MANIFEST_FORMAT_VERSION:
        raise DataError(f"{path}: format_version {version!r}, expected {MANIFEST_FORMAT_VERSION}")
    return manifest


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_shard_hash(path: PathLike, manifest: dict) -> None:
    """Raise DataError unless the file's SHA-256 is the one the manifest records for it.

    partition_data.py records every file's hash; a shard copied in from another split
    (another seed, scheme or dataset) has another hash, and would otherwise train quietly
    on data that the server's manifest, test set and results do not describe. A manifest
    that records no hash for the file checks nothing. Hashing reads the file once more:
    milliseconds for a shard.
    """
    path = pathlib.Path(path)
    recorded = (manifest.get("sha256") or {}).get(path.name)
    if recorded is None:
        return
    try:
        actual = file_sha256(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if actual != recorded:
        raise DataError(
            f"{path} is not the shard that {manifest_path(path.parent)} describes (its SHA-256 "
            f"is {actual[:12]}..., the manifest records {recorded[:12]}...): it comes from "
            "another split, or was changed since; recreate the data with partition_data.py, "
            "or use the manifest.json made with this shard")


def manifest_sha256(data_dir: PathLike) -> str:
    """SHA-256 of manifest.json; it lists every shard's hash, so it identifies the whole split."""
    path = manifest_path(data_dir)
    try:
        return file_sha256(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
