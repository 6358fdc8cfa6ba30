"""Time and memory of partition_data.py on a full 60,000 + 10,000 dataset.

Runs the real script (IDX source, 10 IID partitions) as a child process a few
times and prints the wall time of each run and the child's peak RSS, against
the targets: under 5 s and under 1 GB on a 2-core machine.

    python benchmarks/bench_partition.py [--idx-dir /usr/share/datasets/fashion-mnist]
"""

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
TARGET_SECONDS = 5.0
TARGET_RSS_MB = 1024.0


def run_once(idx_dir: str, dataset: str, out_dir: pathlib.Path) -> float:
    """Run partition_data.py once; returns its wall time in seconds."""
    cmd = [sys.executable, str(REPO / "partition_data.py"), "--source", "idx",
           "--idx-dir", idx_dir, "--dataset", dataset, "--num-partitions", "10",
           "--scheme", "iid", "--out-dir", str(out_dir)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idx-dir", default="/usr/share/datasets/fashion-mnist",
                        help="directory with the four full-size IDX files (default: %(default)s)")
    parser.add_argument("--dataset", default="fashion_mnist", choices=["mnist", "fashion_mnist"],
                        help="what the IDX files hold (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="number of runs (default: %(default)s)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = pathlib.Path(tmp) / "data"
        times = [run_once(args.idx_dir, args.dataset, out_dir) for _ in range(args.repeats)]
        manifest = json.loads((out_dir / "manifest.json").read_text())
    # ru_maxrss of RUSAGE_CHILDREN: the peak RSS of the largest waited-for child, in KiB on Linux.
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    num_train = sum(p["num_train"] + p["num_val"] for p in manifest["partitions"])

    num_test = manifest["test"]["num_examples"]
    print(f"partition_data.py: {num_train} train + {num_test} test examples "
          f"-> {manifest['num_partitions']} IID partitions, {args.repeats} runs")
    print(f"wall time  min {min(times):.2f} s  median {statistics.median(times):.2f} s  "
          f"max {max(times):.2f} s   (target < {TARGET_SECONDS:.0f} s)")
    print(f"peak RSS   {peak_mb:.0f} MB   (target < {TARGET_RSS_MB:.0f} MB)")
    met = statistics.median(times) < TARGET_SECONDS and peak_mb < TARGET_RSS_MB
    print("targets met" if met else "TARGETS MISSED")
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
