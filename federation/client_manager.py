"""A Flower client manager that gives up after a timeout instead of waiting 24 hours."""

import time
from logging import INFO

from flwr.common import log
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

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

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

    def disconnect_all(self) -> None:
        """Close every client's gRPC stream (so no server thread waits on it forever)."""
        for proxy in list(self.clients.values()):
            bridge = getattr(proxy, "bridge", None)  # grpc-bidi ClientProxy only
            if bridge is not None:
                bridge.close()
