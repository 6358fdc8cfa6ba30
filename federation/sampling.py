"""Which clients a round asks: the trainers, then the evaluators.

With TimeoutClientManager (client_manager.py) both choices are seeded by the run's seed,
the round and the clients' partitions, so a rerun asks the same partitions; with another
client manager, Flower's random sample. Federated evaluation asks only clients whose
partition has validation examples, and does not wait for --min-clients: the round has
aggregated, and it is recorded with whoever is left.
"""

from collections.abc import Callable, Sequence

from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from federation.client_manager import TimeoutClientManager


def partition_of(client_manager: ClientManager | None, proxy: ClientProxy) -> int | None:
    """The partition a client said it trains (TimeoutClientManager), else None."""
    return getattr(client_manager, "partition", lambda _: None)(proxy)


def trainers(client_manager: ClientManager,
             sample_size: Callable[[int], tuple[int, int]], true_round: int) -> list[ClientProxy]:
    """The round's trainers: seeded by TimeoutClientManager, else Flower's random sample.

    sample_size: how many clients are available -> (how many train, how many must be
    connected before the round starts), e.g. FedAvg.num_fit_clients.
    """
    num_clients, min_clients = sample_size(client_manager.num_available())
    if isinstance(client_manager, TimeoutClientManager):
        return client_manager.sample_round(num_clients, min_clients, true_round)
    return client_manager.sample(num_clients=num_clients, min_num_clients=min_clients)


def has_validation(partition: int | None, val_sizes: Sequence[int]) -> bool:
    """Whether a partition has validation examples (unknown partitions: assume so)."""
    return partition is None or not 0 <= partition < len(val_sizes) or (
        val_sizes[partition] > 0)


def evaluators(client_manager: ClientManager, val_sizes: Sequence[int],
               sample_size: Callable[[int], int], true_round: int) -> list[ClientProxy]:
    """The clients still connected whose partition has validation examples; with
    TimeoutClientManager, the seeded sample_size(how many there are) of them."""
    clients = [c for c in client_manager.all().values()
               if has_validation(partition_of(client_manager, c), val_sizes)]
    if isinstance(client_manager, TimeoutClientManager):  # the seeded fraction of them
        clients = client_manager.pick(clients, sample_size(len(clients)), true_round,
                                      purpose=1)
    return clients
