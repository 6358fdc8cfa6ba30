"""What several benchmarks share: a free port, the peak memory of a process, the flags
that say where Fashion-MNIST is and where its splits go.

Not a benchmark itself. The scripts here run as `python benchmarks/NAME.py`, which puts
this directory on sys.path, so they import it as `_common`. Loading a data directory is
federation.shards.load_all; running a federation in one process is federation.simulation.
"""

import argparse
import pathlib
import socket
import tempfile

FASHION_MNIST_IDX = pathlib.Path("/usr/share/datasets/fashion-mnist")  # Debian's package


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set size) of a running process in MiB; 0 once it is gone."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def add_data_flags(parser: argparse.ArgumentParser, bench: str) -> None:
    """--idx-dir (Fashion-MNIST's IDX files) and --data-root (the splits, one directory
    each, under the temporary directory by default, named after the benchmark)."""
    parser.add_argument("--idx-dir", type=pathlib.Path, default=FASHION_MNIST_IDX,
                        help="Fashion-MNIST's IDX files (default: %(default)s, Debian's "
                             "dataset-fashion-mnist)")
    parser.add_argument("--data-root", type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / bench,
                        help="where the splits are written, one directory each "
                             "(default: %(default)s)")
