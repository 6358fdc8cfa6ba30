"""What a client computes in one round, free of Flower and of I/O: train the global model on
its partition, or evaluate it there.

mnist_client.py's MnistClient (over gRPC, and inside the ClientApp) and simulation.py (the whole
federation in one process) both call these functions, so a client trains with the same
PRNG key, settings and attack in either, and the two give the same bits.
"""

from collections.abc import Mapping

import jax

import model
from federation import attacks
from federation.aggregation import Arrays
from federation.shards import Partition

# What the server's fit config must hold (server_setup.fit_config, plus the round).
ROUND_CONFIG_KEYS = ("server_round", "local_epochs", "batch_size", "learning_rate")


@jax.jit  # one small program instead of three (integer arithmetic: the same bits)
def round_key(seed: int, server_round: int, partition: int) -> jax.Array:
    """The PRNG key of one client in one round: fresh per (round, partition), never reused."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), server_round), partition)


def eval_batch_size(num_examples: int) -> int:
    """The whole split in one batch, up to model.EVAL_BATCH_SIZE: no padded rows wasted."""
    return max(1, min(model.EVAL_BATCH_SIZE, num_examples))


def check_fit_config(config: Mapping[str, object]) -> None:
    """ValueError (one line) if the server's fit config lacks a setting training needs."""
    missing = [k for k in ROUND_CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"fit config lacks {missing}")


def fit(data: Partition, arrays: Arrays, config: Mapping[str, object], *, seed: int,
        partition: int, attack: str | None = None,
        attack_boost: float = 10.0) -> tuple[Arrays, int, dict]:
    """One round of local training with the settings the server sent (its fit config).

    Returns what a client sends back: (weights, number of training examples, metrics).
    attack (one of attacks.ATTACKS) makes it a poisoning client: label-flip trains on
    flipped labels, sign-flip reverses and boosts the trained update.
    """
    check_fit_config(config)
    labels = attacks.flip_labels(data.y_train) if attack == "label-flip" else data.y_train
    params, metrics = model.train(
        model.ndarrays_to_params(arrays), data.x_train, labels,
        epochs=int(config["local_epochs"]), batch_size=int(config["batch_size"]),
        learning_rate=float(config["learning_rate"]),
        key=round_key(seed, int(config["server_round"]), partition),
        proximal_mu=float(config.get("proximal_mu", 0.0)),  # FedProx; none sent: 0
        optimizer=str(config.get("client_optimizer", model.OPTIMIZER)))
    trained = model.params_to_ndarrays(params)
    if attack == "sign-flip":
        trained = attacks.sign_flip(arrays, trained, attack_boost)
    # FedAvg weighs by the local dataset size n_k (not by steps or epochs).
    return trained, len(data.x_train), {
        "partition": partition, "train_loss": float(metrics["loss"]),
        "train_accuracy": float(metrics["accuracy"]),
        "examples_seen": int(metrics["num_examples"])}


def evaluate(data: Partition, arrays: Arrays, partition: int) -> tuple[float, int, dict]:
    """(loss, number of validation examples, metrics) of the global model on the partition's
    validation split, as a client sends them back."""
    loss, accuracy = model.evaluate(model.ndarrays_to_params(arrays), data.x_val, data.y_val,
                                    eval_batch_size(len(data.x_val)))
    return float(loss), len(data.x_val), {"partition": partition, "accuracy": float(accuracy)}
