"""What one peer computes in one round of decentralised training, free of I/O and processes.

A peer of peer.py and a peer of the one-process run (federation/gossip_simulation.py)
both call these functions, so they train with the same recipe, PRNG keys and settings,
and give the same bits. The local training is a client's (local_training.fit): the
default recipe of model.py, a fresh optimizer state every round, and the key rule
round_key(seed, round, rank), so every peer's key is distinct and never reused.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

import model
from federation import cli, gossip, local_training
from federation.shards import Partition

Arrays = gossip.Arrays

# The columns of a peer's metrics.json records and metrics.csv, in order.
PEER_FIELDS = (
    "round", "peer", "test_loss", "test_accuracy", "val_loss", "val_accuracy", "train_loss",
    "train_accuracy", "neighbour_distance", "mean_neighbour_distance", "bytes_sent",
    "bytes_received", "round_seconds")

# run_config.json keys that define the computation: a resumed peer must match them all.
RESUME_MUST_MATCH = ("topology", "peers", "rank", "seed", "local_epochs", "batch_size",
                     "client_optimizer", "learning_rate", "manifest_sha256", "model")


@dataclasses.dataclass(frozen=True)
class GossipSettings:
    """The settings every peer of one run shares; the defaults run the tutorial as-is."""

    topology: str = "ring"              # one of gossip.TOPOLOGIES
    rounds: int = 5                     # the last round of the whole run
    local_epochs: int = model.LOCAL_EPOCHS
    batch_size: int = model.BATCH_SIZE
    client_optimizer: str = model.OPTIMIZER
    learning_rate: float | None = None  # None: the optimizer's default peak rate
    seed: int = 0                       # seed of the common initial model and of the keys

    def __post_init__(self) -> None:
        """A learning rate of None becomes the optimizer's default."""
        if self.learning_rate is None and self.client_optimizer in model.LEARNING_RATES:
            object.__setattr__(self, "learning_rate",
                               model.LEARNING_RATES[self.client_optimizer])

    def problem(self, peers: int) -> str | None:
        """Why these settings cannot run on `peers` peers (one line), or None."""
        try:
            gossip.topology(self.topology, peers)
            model.check_optimizer(self.client_optimizer)
        except ValueError as e:
            return str(e)
        for name in ("rounds", "local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                return f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
        problem = cli.number_problem(self.learning_rate, 0)
        return f"learning-rate {problem}" if problem else None

    def fit_config(self, server_round: int) -> dict[str, Any]:
        """local_training.fit's config for one round: what a server would send a client."""
        return {"server_round": server_round, "local_epochs": self.local_epochs,
                "batch_size": self.batch_size, "client_optimizer": self.client_optimizer,
                "learning_rate": self.learning_rate, "proximal_mu": 0.0}


def test_evaluator(x_test: np.ndarray,
                   y_test: np.ndarray) -> Callable[[Arrays], tuple[float, float]]:
    """arrays -> (loss, accuracy) on the test set: what a FedAvg server measures
    (server_setup.centralized_evaluator, the same calls), for every peer's own model."""
    def evaluate(arrays: Arrays) -> tuple[float, float]:
        loss, accuracy = model.evaluate(model.ndarrays_to_params(arrays), x_test, y_test)
        return float(loss), float(accuracy)
    return evaluate


def model_bytes() -> int:
    """The size of one model on the wire: float32, every parameter once."""
    return 4 * sum(int(np.prod(shape)) for _, shape in model.param_spec())


def train(data: Partition, arrays: Arrays, settings: GossipSettings, server_round: int,
          rank: int) -> tuple[Arrays, dict]:
    """Local training of one round, as a client does it: (trained model, train metrics)."""
    trained, _, metrics = local_training.fit(data, arrays, settings.fit_config(server_round),
                                             seed=settings.seed, partition=rank)
    return trained, {"train_loss": metrics["train_loss"],
                     "train_accuracy": metrics["train_accuracy"]}


def evaluate(data: Partition, arrays: Arrays, rank: int,
             test: Callable[[Arrays], tuple[float, float]]) -> dict:
    """The peer's model on its own validation split and on the test set."""
    if len(data.x_val):
        val_loss, _, metrics = local_training.evaluate(data, arrays, rank)
        val_accuracy = metrics["accuracy"]
    else:
        val_loss = val_accuracy = None
    test_loss, test_accuracy = test(arrays)
    return {"test_loss": test_loss, "test_accuracy": test_accuracy, "val_loss": val_loss,
            "val_accuracy": val_accuracy}


def record(server_round: int, rank: int, evaluation: Mapping, train_metrics: Mapping,
           trained: Arrays | None, mixed: Arrays, neighbour_distances: list[float] | None,
           degree: int) -> dict:
    """The peer's metrics.json record of a round (round_seconds added by the caller).

    neighbour_distance: ||trained - mixed||, how far this round's gossip step moved the
    peer (0 when it already agreed with its neighbours); mean_neighbour_distance: the
    root mean square of every peer's, the network's disagreement, learnt from scalars
    alone (no peer sees another's model beyond its neighbours').
    """
    sent = degree * model_bytes() if trained is not None else 0
    return {"round": server_round, "peer": rank, **evaluation,
            "train_loss": train_metrics.get("train_loss"),
            "train_accuracy": train_metrics.get("train_accuracy"),
            "neighbour_distance": (gossip.distance(trained, mixed) if trained is not None
                                   else 0.0),
            "mean_neighbour_distance": (gossip.rms(neighbour_distances)
                                        if neighbour_distances else 0.0),
            "bytes_sent": sent, "bytes_received": sent}


def initial_model(seed: int) -> Arrays:
    """Every peer starts from the same model, FedAvg's round-0 global model."""
    return model.params_to_ndarrays(model.init_params(jax.random.key(seed)))
