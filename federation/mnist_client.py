"""The Flower client of one partition: train and evaluate the global model on its shard.

In FedAvg (McMahan et al. 2017) every client starts a round from the server's global
model, trains it for a few epochs on data that never leaves the client, and sends back
only the new weights and its number of training examples. This file is that client,
shared by every transport:

- MnistClient, a flwr.client.NumPyClient built from one Partition and a seed. It holds
  no Flower plumbing beyond fit/evaluate: client.py serves it over gRPC
  (federation/grpc_client.py) and client_app.py wraps it in a ClientApp, unchanged.
- load_client_data, which loads the client's shard and checks it against the manifest.

The computation itself (the key rule, fit, evaluate) is federation/local_training.py,
which simulation.py shares.
"""

import os
import time
from logging import ERROR, INFO, WARNING

import numpy as np
from flwr.client import NumPyClient
from flwr.common import Scalar, log

import model
from federation import attacks, local_training, shards
# The key rule and the evaluation batch live with the client's computation, which
# simulation.py shares; imported here under the names the client has always had.
from federation.local_training import eval_batch_size, round_key


class MnistClient(NumPyClient):
    """Trains and evaluates the global model on one partition (a NumPyClient).

    An exception in training or evaluation is not allowed to kill the process: it is
    sent to the server as a result carrying metrics["error"], which the server rejects
    and logs as a failure, and the client stays up for the next round.

    attack (None, or one of attacks.ATTACKS) makes it a poisoning client, for measuring
    the server's robust aggregation rules; it says so in its log every round.
    """

    def __init__(self, data: shards.Partition, partition: int, seed: int,
                 attack: str | None = None, attack_boost: float = 10.0) -> None:
        if attack is not None and attack not in attacks.ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; known: {', '.join(attacks.ATTACKS)}")
        self.data = data
        self.partition = partition
        self.seed = seed
        self.attack, self.attack_boost = attack, attack_boost
        self.eval_batch_size = eval_batch_size(len(data.x_val))
        self.refused: str | None = None  # why the server refused this client, if it did

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """Say which partition this client trains: the server admits one client per partition
        (gRPC path) and samples clients by partition (every transport).

        A server that refuses the client says why in config["refused"], then ends the
        session; run_client reports it.
        """
        if "refused" in config:
            self.refused = str(config["refused"])
            return {}
        return {"partition": self.partition}

    def warm_up(self, batch_size: int = model.BATCH_SIZE) -> None:
        """Compile local training and evaluation now rather than inside round 1.

        XLA compiles once per process and input shape (or loads the program from the
        persistent cache, federation/compile_cache.py). This compiles what fit() and
        evaluate() run, without training: the training and evaluation steps on one
        masked batch each (model.compile_steps), and this shard's shuffle. A --batch-size
        or --client-optimizer from the server other than the defaults compiles again in
        round 1 (or loads from the persistent cache).
        """
        model.compile_steps(batch_size, self.eval_batch_size)
        model.epoch_order(round_key(self.seed, 0, self.partition), 0, len(self.data.x_train))

    def fit(self, parameters: list[np.ndarray],
            config: dict[str, Scalar]) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        """Train the global model; return (weights, #training examples, metrics)."""
        try:
            return self.train_round(parameters, config)
        except Exception as e:  # pylint: disable=broad-except  # report, stay up
            log(ERROR, "training failed; reporting it to the server", exc_info=e)
            return [], 0, {"partition": self.partition, "error": f"{type(e).__name__}: {e}"}

    def train_round(self, parameters: list[np.ndarray],
                    config: dict[str, Scalar]) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        """One round of local training with the settings the server sent."""
        local_training.check_fit_config(config)
        server_round, epochs = int(config["server_round"]), int(config["local_epochs"])
        log(INFO, "round %d: training %d epoch(s) on %d examples", server_round, epochs,
            len(self.data.x_train))
        if self.attack is not None:
            log(WARNING, "round %d: ATTACKING the federation with %s%s", server_round,
                self.attack, f" (boost {self.attack_boost:g})" if self.attack == "sign-flip"
                else "")
        start = time.perf_counter()
        arrays, num_examples, metrics = local_training.fit(
            self.data, parameters, config, seed=self.seed, partition=self.partition,
            attack=self.attack, attack_boost=self.attack_boost)
        log(INFO, "round %d: train loss %.4f, accuracy %.2f%% (%.1f s)", server_round,
            metrics["train_loss"], 100 * metrics["train_accuracy"], time.perf_counter() - start)
        return arrays, num_examples, metrics

    def evaluate(self, parameters: list[np.ndarray],
                 config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        """Loss and accuracy of the global model on this partition's validation split."""
        try:
            loss, num_examples, metrics = local_training.evaluate(self.data, parameters,
                                                                  self.partition)
        except Exception as e:  # pylint: disable=broad-except  # report, stay up
            log(ERROR, "evaluation failed; reporting it to the server", exc_info=e)
            return 0.0, 0, {"partition": self.partition, "error": f"{type(e).__name__}: {e}"}
        log(INFO, "round %s: validation loss %.4f, accuracy %.2f%%",
            config.get("server_round", "?"), loss, 100 * metrics["accuracy"])
        return loss, num_examples, metrics


# -------------------------------------------------------------------------- data

def load_client_data(data_dir: str | os.PathLike, partition: int) -> shards.Partition:
    """This client's shard, with a one-line DataError for every way it can be unusable.

    With a manifest.json beside it, the shard must be the one the manifest describes (its
    SHA-256); a shard with fewer than two labels loads with a one-line warning.
    """
    num_partitions = manifest = None
    if shards.manifest_path(data_dir).exists():
        manifest = shards.load_manifest(data_dir)
        num_partitions = manifest["num_partitions"]
    if partition < 0 or (num_partitions is not None and partition >= num_partitions):
        known = f"0..{num_partitions - 1}" if num_partitions else "0 or more"
        raise shards.DataError(f"--partition {partition} is out of range: {data_dir} holds "
                               f"partitions {known}")
    path = shards.partition_path(data_dir, partition)
    if not path.exists():
        raise shards.DataError(f"{path} not found: create the shards with partition_data.py "
                               "or point --data-dir at them")
    data = shards.load_partition(path)  # first: an unreadable file is said to be one
    if manifest is not None:
        shards.check_shard_hash(path, manifest)
    labels = np.unique(data.y_train)
    if len(labels) < 2:
        # It still trains: a client that sees one class can be real (extreme label skew).
        log(WARNING, "partition %d: all %d training examples have label %d; this client "
            "can only teach the model that one class", partition, len(data.y_train), labels[0])
    return data
