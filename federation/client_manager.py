"""A Flower client manager that gives up after a timeout and samples clients reproducibly.

Flower's SimpleClientManager waits up to 24 hours for clients and samples them with an
unseeded random.sample over connection ids, which differ from run to run (gRPC peer
addresses, random SuperNode ids). Here the sample of a round is a function of the seed,
the round and the *partitions* of the connected clients, so the same run gives the same
clients, and the same global model, on every transport.
"""

import concurrent.futures
import time
from logging import INFO, WARNING

import numpy as np
from flwr.common import GetPropertiesIns, log
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion


class NotEnoughClients(RuntimeError):
    """Fewer clients than needed stayed connected for longer than the timeout."""


class TimeoutClientManager(SimpleClientManager):
    """Flower's SimpleClientManager, but waiting at most `timeout` s (not 24 h) for clients.

    sample() raises NotEnoughClients instead of blocking a day or silently returning no
    clients, so a server whose clients are gone stops with a clear message.
    """

    def __init__(self, timeout: float, seed: int = 0) -> None:
        super().__init__()
        self.timeout = timeout
        self.seed = seed
        self._partitions: dict[str, int] = {}  # cid -> the partition the client reported

    def wait_for(self, num_clients: int, timeout: float | None = None) -> bool:
        """Wait until num_clients are connected; log the count while waiting."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        logged = -1
        with self._cv:
            while len(self.clients) < num_clients:
                if len(self.clients) != logged:
                    logged = len(self.clients)
                    log(INFO, "waiting for clients: %d of %d connected", logged, num_clients)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cv.wait(timeout=remaining)
            return True

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Criterion | None = None) -> list[ClientProxy]:
        """Sample clients uniformly (Flower's unseeded random.sample), at least min_num_clients."""
        needed = num_clients if min_num_clients is None else min_num_clients
        if not self.wait_for(needed):
            raise NotEnoughClients(
                f"only {len(self.clients)} of the {needed} clients needed are connected after "
                f"waiting {self.timeout:g} s (see --min-clients, --round-timeout)")
        # A client may leave between the wait and here: sample what is still connected.
        clients = super().sample(min(num_clients, len(self.clients)), 0, criterion)
        if len(clients) < needed:
            raise NotEnoughClients(f"only {len(clients)} of the {needed} clients needed are "
                                   "connected")
        return clients

    def sample_round(self, num_clients: int, min_num_clients: int, server_round: int,
                     purpose: int = 0) -> list[ClientProxy]:
        """num_clients of the connected clients, chosen by (seed, round, purpose) alone.

        Waits for min_num_clients like sample(). When not every client is taken, the
        clients are ordered by the partition each one reports (asked once per client with
        get_properties) and a generator seeded with [seed, server_round, purpose] picks
        among them; purpose 0 is training, 1 federated evaluation.
        """
        if not self.wait_for(min_num_clients):
            raise NotEnoughClients(
                f"only {len(self.clients)} of the {min_num_clients} clients needed are "
                f"connected after waiting {self.timeout:g} s (see --min-clients, "
                "--round-timeout)")
        clients = list(self.all().values())  # all(), not .clients: the App path refreshes here
        if num_clients >= len(clients):
            return clients
        by_partition = sorted(self._identify(clients).items())
        rng = np.random.default_rng([self.seed, server_round, purpose])
        picked = rng.choice(len(by_partition), size=min(num_clients, len(by_partition)),
                            replace=False)
        return [by_partition[i][1] for i in sorted(picked)]

    def _identify(self, clients: list[ClientProxy]) -> dict[int, ClientProxy]:
        """partition -> client, asking clients not asked before (in parallel, once each)."""
        unknown = [c for c in clients if c.cid not in self._partitions]

        def ask(proxy: ClientProxy) -> object:
            res = proxy.get_properties(GetPropertiesIns({}), timeout=self.timeout,
                                       group_id=None)
            return res.properties.get("partition")

        if unknown:
            with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
                futures = {pool.submit(ask, c): c for c in unknown}
                for future in concurrent.futures.as_completed(futures):
                    proxy = futures[future]
                    try:
                        partition = future.result()
                    except Exception as e:  # pylint: disable=broad-except  # any client fault
                        log(WARNING, "client %s did not say its partition: %s", proxy.cid, e)
                        continue
                    if isinstance(partition, int) and not isinstance(partition, bool):
                        self._partitions[proxy.cid] = partition
        known: dict[int, ClientProxy] = {}
        for proxy in clients:
            partition = self._partitions.get(proxy.cid)
            if partition is not None and partition not in known:
                known[partition] = proxy
        return known

    def unregister(self, client: ClientProxy) -> None:
        """Forget a client that left (its cid may come back as another partition)."""
        self._partitions.pop(client.cid, None)
        super().unregister(client)

    def disconnect_all(self) -> None:
        """Close every client's gRPC stream (so no server thread waits on it forever)."""
        for proxy in list(self.clients.values()):
            bridge = getattr(proxy, "bridge", None)  # grpc-bidi ClientProxy only
            if bridge is not None:
                bridge.close()
