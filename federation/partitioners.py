"""Flower Datasets (flwr-datasets) partitioners for partition_data.py: the split and its picture.

partition_data.py puts the training labels into an in-memory ``datasets.Dataset``
and splits it with a Flower Datasets partitioner, exactly as a Flower user would
split a Hugging Face dataset:

* ``dirichlet``: ``DirichletPartitioner`` (label skew, Hsu et al. 2019; the
  "at least N examples per client" redraw of Yurochkin et al. 2019).
* ``pathological``: ``PathologicalPartitioner`` (K labels per client, Li et al.
  2022, "Federated learning on non-IID data silos: an experimental study").
* ``iid`` and ``shards``: two partitioners of ours, written against the same
  ``Partitioner`` interface; each class says why the library's own is not used.

``label_distribution_png`` draws every client's label counts with
``flwr_datasets.visualization.plot_label_distributions``: it plots a partitioner,
so it lives beside them (plot_results.py draws metrics and needs no ``datasets``).
Where the images come from (``--source hf`` through ``FederatedDataset`` too) is
federation/sources.py's job.

Only partition_data.py imports this module: ``datasets``, pandas and matplotlib
take seconds to import, and clients and the server never need them.
"""

from __future__ import annotations

import io
import warnings

from federation.sources import telemetry_off_by_default

telemetry_off_by_default()  # before flwr_datasets is imported below

import datasets  # noqa: E402
import flwr_datasets  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from flwr_datasets.partitioner import (  # noqa: E402
    DirichletPartitioner,
    Partitioner,
    PathologicalPartitioner,
)
from flwr_datasets.visualization import plot_label_distributions  # noqa: E402

from federation.shards import DataError  # noqa: E402

LABEL = "label"
ROW = "row"  # an example's position in the training arrays: how a partition maps back to images
LABEL_NAMES = {
    "mnist": [str(digit) for digit in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
}


def labels_dataset(labels: np.ndarray, dataset: str) -> datasets.Dataset:
    """The training labels and their row numbers as an in-memory ``datasets.Dataset``.

    Only labels go in: the partitioners read nothing else, and the images stay in
    one NumPy array that partition_data.py indexes with each partition's rows.
    """
    features = datasets.Features({
        LABEL: datasets.ClassLabel(names=LABEL_NAMES[dataset]),
        ROW: datasets.Value("int64"),
    })
    columns = {LABEL: labels.astype(np.int64), ROW: np.arange(len(labels))}
    # Arrow format: a column comes back as one pyarrow array that NumPy and pandas read at
    # once; the default Python format builds an object per row (30 s for 60,000 labels).
    return datasets.Dataset.from_dict(columns, features=features).with_format("arrow")


# ---------------------------------------------------------------------------
# Our two partitioners


def split_iid(
    labels: np.ndarray, num_partitions: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Deal the examples out like cards, label by label.

    Every partition gets floor or ceil of (examples of label c) / num_partitions
    for every label c, and partition sizes differ by at most 1.
    """
    shuffled = rng.permutation(len(labels))
    # Grouped by label, in random order within each label.
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    return [by_label[p::num_partitions] for p in range(num_partitions)]


def _shards_per_label(class_sizes: np.ndarray, num_shards: int) -> np.ndarray:
    """One shard per label, then each further shard to the label whose shards are largest."""
    shards = np.ones(len(class_sizes), dtype=np.int64)
    for _ in range(num_shards - len(class_sizes)):
        shards[np.argmax(class_sizes / shards)] += 1
    return shards


def split_shards(
    labels: np.ndarray, num_partitions: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """McMahan et al. 2017: sort by label, cut into shards, give each client `shards_per_client`.

    Shards are cut within a label, never across two, so a client holds at most
    `shards_per_client` labels. Shard sizes are equal up to the differences
    between label sizes.
    """
    classes, class_sizes = np.unique(labels, return_counts=True)
    num_shards = num_partitions * shards_per_client
    if num_shards < len(classes):
        raise DataError(
            f"--scheme shards needs at least {len(classes)} shards (one per label) but "
            f"{num_partitions} partitions x {shards_per_client} shards per client make {num_shards}"
        )
    if num_shards > len(labels):
        raise DataError(f"{num_shards} shards but only {len(labels)} training examples")
    shards: list[np.ndarray] = []
    for label, count in zip(classes, _shards_per_label(class_sizes, num_shards)):
        shards += np.array_split(rng.permutation(np.flatnonzero(labels == label)), count)
    deal = rng.permutation(num_shards).reshape(num_partitions, shards_per_client)
    return [np.concatenate([shards[s] for s in row]) for row in deal]


class _RowsPartitioner(Partitioner):
    """A Partitioner that computes every partition's rows at once from the labels."""

    def __init__(self, num_partitions: int, partition_by: str, seed: int) -> None:
        super().__init__()
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._seed = seed
        self._rows: list[np.ndarray] | None = None

    def _split(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        raise NotImplementedError

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        """The examples of partition `partition_id`."""
        if self._rows is None:
            labels = self.dataset[self._partition_by].to_numpy()
            self._rows = self._split(labels, np.random.default_rng(self._seed))
        return self.dataset.select(self._rows[partition_id])

    @property
    def num_partitions(self) -> int:
        """Total number of partitions."""
        return self._num_partitions


class StratifiedIidPartitioner(_RowsPartitioner):
    """IID: each label dealt out like cards, so every partition gets the same label mix."""

    # Ours, not IidPartitioner: that one cuts the dataset into contiguous blocks, so label
    # mixes differ by chance; here they differ by at most one example per label.
    def _split(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        return split_iid(labels, self._num_partitions, rng)


class LabelShardPartitioner(_RowsPartitioner):
    """McMahan et al.'s shards, each cut from a single label (see split_shards)."""

    # Ours, not ShardPartitioner: its shards straddle label boundaries (2 shards can mean 4
    # labels) and it drops the last len(dataset) % num_shards examples.
    def __init__(self, num_partitions: int, partition_by: str, shards_per_client: int,
                 seed: int) -> None:
        super().__init__(num_partitions, partition_by, seed)
        self._shards_per_client = shards_per_client

    def _split(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        return split_shards(labels, self._num_partitions, self._shards_per_client, rng)


# ---------------------------------------------------------------------------
# Splitting and drawing


def make_partitioner(
    scheme: str,
    num_partitions: int,
    seed: int,
    *,
    alpha: float,
    min_partition_size: int,
    classes_per_client: int,
    shards_per_client: int,
) -> Partitioner:
    """The partitioner for `scheme`, seeded with `seed` so the split is reproducible."""
    if scheme == "iid":
        return StratifiedIidPartitioner(num_partitions, LABEL, seed)
    if scheme == "dirichlet":
        return DirichletPartitioner(
            num_partitions, LABEL, alpha=alpha, min_partition_size=min_partition_size, seed=seed
        )
    if scheme == "pathological":
        # "first-deterministic", the paper's setting: client p's first label is p mod 10,
        # so with 10 or more clients every label has a home.
        return PathologicalPartitioner(
            num_partitions, LABEL, num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic", seed=seed,
        )
    if scheme == "shards":
        return LabelShardPartitioner(num_partitions, LABEL, shards_per_client, seed)
    raise ValueError(f"unknown scheme {scheme!r}")


def partition_rows(partitioner: Partitioner, dataset: datasets.Dataset, hint: str) -> list[np.ndarray]:
    """Give `dataset` to `partitioner` and return each partition's rows (training-set indices).

    The library's ValueErrors (a split it cannot make) become one DataError line
    ending in `hint`, the flag to change.
    """
    partitioner.dataset = dataset
    name = type(partitioner).__name__
    with warnings.catch_warnings():
        # DirichletPartitioner warns before each redraw and PathologicalPartitioner about
        # labels no client got; partition_data.py checks both outcomes and says so in one line.
        warnings.simplefilter("ignore", UserWarning)
        try:
            return [
                partitioner.load_partition(p)[ROW].to_numpy()
                for p in range(partitioner.num_partitions)
            ]
        except ValueError as e:
            reason = " ".join(str(e).split())
            raise DataError(f"{name} cannot split {len(dataset)} examples: {reason} ({hint})") from None


def describe(partitioner: Partitioner) -> str:
    """Which partitioner made the split, and from where (another version may split differently)."""
    name = type(partitioner).__name__
    if isinstance(partitioner, _RowsPartitioner):
        return f"{name} (federation/partitioners.py)"
    return f"{name} (flwr-datasets {flwr_datasets.__version__})"


def label_distribution_png(partitioner: Partitioner, title: str) -> bytes:
    """Every partition's label counts as a stacked bar chart (Flower Datasets' plot), PNG bytes."""
    figure, _, _ = plot_label_distributions(
        partitioner, LABEL, plot_type="bar", size_unit="absolute", legend=True,
        legend_title="label", title=title,
    )
    buffer = io.BytesIO()
    # No date in Matplotlib's PNG metadata: the same split gives the same bytes.
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()

