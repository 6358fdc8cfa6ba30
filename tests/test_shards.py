"""Tests for federation/shards.py: what clients and the server accept, and the one-line errors for the rest."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from federation import shards
from federation.shards import DataError

REPO = pathlib.Path(__file__).resolve().parent.parent


def good_partition(n_train: int = 12, n_val: int = 3) -> dict:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_val": rng.integers(0, 256, size=(n_val, 28, 28), dtype=np.uint8),
        "y_val": (np.arange(n_val) % 10).astype(np.int64),
    }


def write(path: pathlib.Path, arrays: dict) -> pathlib.Path:
    np.savez(path, **arrays)
    return path


def test_paths():
    assert shards.partition_path("data", 3) == pathlib.Path("data/partition_3.npz")
    assert shards.test_set_path("data") == pathlib.Path("data/test.npz")
    assert shards.manifest_path("data") == pathlib.Path("data/manifest.json")


def test_load_partition_round_trip(tmp_path):
    arrays = good_partition()
    part = shards.load_partition(write(tmp_path / "p.npz", arrays))
    np.testing.assert_array_equal(part.x_train, arrays["x_train"])
    np.testing.assert_array_equal(part.y_val, arrays["y_val"])
    assert part.x_train.dtype == np.uint8 and part.x_train.shape == (12, 28, 28)
    assert part.y_train.dtype == np.int32 and part.y_val.dtype == np.int32


def test_load_partition_accepts_an_empty_validation_split(tmp_path):
    part = shards.load_partition(write(tmp_path / "p.npz", good_partition(n_val=0)))
    assert part.x_val.shape == (0, 28, 28) and part.y_val.shape == (0,)


def test_load_test_set_round_trip(tmp_path):
    x = np.zeros((5, 28, 28), np.uint8)
    y = np.array([0, 1, 2, 3, 9])
    x_test, y_test = shards.load_test_set(write(tmp_path / "test.npz", {"x_test": x, "y_test": y}))
    np.testing.assert_array_equal(x_test, x)
    assert y_test.tolist() == [0, 1, 2, 3, 9] and y_test.dtype == np.int32


def _changed(**changes):
    arrays = good_partition()
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


BAD_PARTITIONS = {  # case: (arrays, a fragment of the message)
    "missing key": (_changed(y_val=None), "missing y_val"),
    "float images": (_changed(x_train=np.zeros((12, 28, 28), np.float32)), "expected uint8 images"),
    "wrong image shape": (_changed(x_train=np.zeros((12, 28, 27), np.uint8)), "(12, 28, 27)"),
    "flat images": (_changed(x_train=np.zeros((12, 784), np.uint8)), "expected uint8 images"),
    "float labels": (_changed(y_train=np.zeros(12, np.float32)), "expected integer labels"),
    "2-D labels": (_changed(y_train=np.zeros((12, 1), np.int64)), "expected integer labels"),
    "label 10": (_changed(y_train=np.full(12, 10, np.uint8)), "labels must be in 0-9, found 10 (12 out of range)"),
    "label -1": (_changed(y_val=np.array([0, -1, 2])), "found -1"),
    "count mismatch": (_changed(y_train=np.zeros(11, np.uint8)), "12 images but 11 labels"),
    "no training examples": (
        _changed(x_train=np.zeros((0, 28, 28), np.uint8), y_train=np.zeros(0, np.uint8)),
        "no training examples",
    ),
}


@pytest.mark.parametrize("case", BAD_PARTITIONS)
def test_load_partition_rejects(tmp_path, case):
    arrays, message = BAD_PARTITIONS[case]
    with pytest.raises(DataError) as error:
        shards.load_partition(write(tmp_path / "p.npz", arrays))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_load_partition_missing_file_says_how_to_make_it(tmp_path):
    with pytest.raises(DataError, match="run `python partition_data.py` first"):
        shards.load_partition(tmp_path / "partition_0.npz")


@pytest.mark.parametrize(
    "content", [b"", b"not a zip at all", b"PK\x03\x04 truncated zip", np.lib.format.MAGIC_PREFIX + b"npy"]
)
def test_load_partition_rejects_files_that_are_not_npz(tmp_path, content):
    path = tmp_path / "p.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="not an .npz archive|not a readable .npz"):
        shards.load_partition(path)


def test_load_partition_refuses_pickles(tmp_path):
    arrays = good_partition()
    arrays["y_train"] = np.array([object()] * 12, dtype=object)  # np.savez pickles object arrays
    with pytest.raises(DataError, match="not a readable .npz"):
        shards.load_partition(write(tmp_path / "p.npz", arrays))


def test_load_test_set_rejects_partition_files(tmp_path):
    with pytest.raises(DataError, match="missing x_test, y_test"):
        shards.load_test_set(write(tmp_path / "p.npz", good_partition()))


def test_load_manifest(tmp_path):
    with pytest.raises(DataError, match="not found"):
        shards.load_manifest(tmp_path)
    path = shards.manifest_path(tmp_path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="not readable JSON"):
        shards.load_manifest(tmp_path)
    path.write_text(json.dumps({"format_version": 2}))
    with pytest.raises(DataError, match="format_version 2, expected 1"):
        shards.load_manifest(tmp_path)
    path.write_text(json.dumps({"format_version": 1, "num_partitions": 3}))
    assert shards.load_manifest(tmp_path) == {"format_version": 1, "num_partitions": 3}
    assert shards.manifest_sha256(tmp_path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_importing_shards_stays_light():
    # Clients and the server import federation/shards.py, demo.py federation/sources.py (for
    # partition_data.py's choices): neither may drag in tfds, Flower Datasets or JAX.
    heavy = ("jax", "tensorflow_datasets", "absl", "datasets", "flwr_datasets")
    code = ("import sys, federation.shards, federation.sources; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_client_and_server_start_without_datasets():
    # Only partition_data.py needs Flower Datasets: `datasets`, pandas and seaborn take seconds
    # to import, which every client process would pay at start-up.
    heavy = ("datasets", "flwr_datasets", "federation.partitioners", "huggingface_hub", "seaborn")
    code = ("import sys, client, server, client_app, server_app; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            check=True, env=env)
    assert result.stdout.strip() == "[]"
