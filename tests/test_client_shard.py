"""A client's checks of its own shard, on loading it (federation/mnist_client.py's load_client_data).

With a manifest.json beside it, a shard from another split (another seed, scheme or
dataset: another SHA-256 than the manifest records) is refused in one line and a
non-zero exit, before the client connects; a shard whose training examples hold one
label loads with a one-line warning (such a client can be real: extreme label skew).
"""

import logging
import shutil
import subprocess
import sys

import numpy as np

from helpers import ENV, REPO, client_args, free_port


def test_a_shard_from_another_split_is_refused_in_one_line(tmp_path, data_dir):
    data = shutil.copytree(data_dir, tmp_path / "data")
    shutil.copyfile(data / "partition_1.npz", data / "partition_0.npz")  # valid, but not 0
    proc = subprocess.run([sys.executable, str(REPO / "client.py"),
                           *map(str, client_args(free_port(), data, 0)), "--max-wait", "1"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"client.py: error: {data}/partition_0.npz is not the shard that "
        f"{data}/manifest.json describes (its SHA-256 is ")
    from federation import mnist_client  # noqa: PLC0415
    assert len(mnist_client.load_client_data(data, 1).y_train) > 0  # the matching shard loads


def test_a_one_label_shard_warns_in_one_line_and_loads(tmp_path, caplog):
    from federation import mnist_client  # noqa: PLC0415
    images = np.zeros((20, 28, 28), np.uint8)
    np.savez(tmp_path / "partition_0.npz", x_train=images, y_train=np.full(20, 7, np.uint8),
             x_val=images[:4], y_val=np.arange(4, dtype=np.uint8))
    with caplog.at_level(logging.WARNING):
        data = mnist_client.load_client_data(tmp_path, 0)
    assert len(data.y_train) == 20  # it still trains
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["partition 0: all 20 training examples have label 7; this client can "
                        "only teach the model that one class"]
    np.savez(tmp_path / "partition_1.npz", x_train=images, y_train=np.arange(20) % 2,
             x_val=images[:4], y_val=np.arange(4, dtype=np.uint8))
    caplog.clear()
    mnist_client.load_client_data(tmp_path, 1)  # two labels: nothing to say
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
