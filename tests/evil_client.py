"""A misbehaving client for the federation tests: client.py, but its updates are corrupt.

It runs the real Flower client (MnistClient through run_client, from federation/) and only
replaces local training with one corruption per round, cycling through --mode:

  shape     first array has the wrong shape         dtype     first array is float64
  count     one array missing                       nan       a NaN in the last array
  inf       an Inf in the first array               norm      weights scaled by 1e4
  negative  num_examples = -5                       huge      num_examples = 10**9
  error     local training raises (the client must report it and stay up)
  sleep     local training never ends (so a test can kill the client mid-round)

    python tests/evil_client.py --mode shape,nan --partition 2 --server-address HOST:PORT
"""

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import client  # noqa: E402  (the repo root is only on sys.path after the line above)
from federation.grpc_client import run_client  # noqa: E402
from federation.mnist_client import MnistClient, load_client_data  # noqa: E402

MODES = ("shape", "dtype", "count", "nan", "inf", "norm", "negative", "huge", "error", "sleep")


def corrupt(mode: str, arrays: list[np.ndarray], num_examples: int) -> tuple[list[np.ndarray], int]:
    """A corrupted copy of (arrays, num_examples) for one mode."""
    arrays = [a.copy() for a in arrays]
    if mode == "shape":
        arrays[0] = arrays[0][..., :-1]
    elif mode == "dtype":
        arrays[0] = arrays[0].astype(np.float64)
    elif mode == "count":
        arrays = arrays[:-1]
    elif mode == "nan":
        arrays[-1][0] = np.nan
    elif mode == "inf":
        arrays[0].flat[0] = np.inf
    elif mode == "norm":
        arrays = [a * np.float32(1e4) for a in arrays]
    elif mode == "negative":
        num_examples = -5
    elif mode == "huge":
        num_examples = 10**9
    return arrays, num_examples


class EvilClient(MnistClient):
    """MnistClient whose train_round returns the global model, corrupted."""

    def __init__(self, *args, modes: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.modes = modes

    def train_round(self, parameters, config):
        """Skip training; corrupt the global model according to this round's mode."""
        mode = self.modes[(int(config["server_round"]) - 1) % len(self.modes)]
        if mode == "error":
            raise RuntimeError("simulated crash in local training")
        if mode == "sleep":
            print(f"round {config['server_round']}: sleeping in fit", file=sys.stderr, flush=True)
            time.sleep(3600)
        arrays, n = corrupt(mode, parameters, len(self.data.x_train))
        return arrays, n, {"partition": self.partition}


def main() -> None:
    """Parse --mode, then the usual client.py flags, and serve like client.py."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", required=True,
                   help=f"comma-separated modes, one per round, cycling: {', '.join(MODES)}")
    args, rest = p.parse_known_args()
    modes = args.mode.split(",")
    if not set(modes) <= set(MODES):
        p.error(f"unknown mode in {args.mode!r}")
    cargs = client.parse_args(rest)
    data = load_client_data(cargs.data_dir, cargs.partition)
    run_client(EvilClient(data, cargs.partition, cargs.seed, modes=modes),
               cargs.server_address, None, cargs.max_wait)


if __name__ == "__main__":
    main()
