"""A Flower client manager: identified clients only, a timeout, reproducible sampling.

Flower's SimpleClientManager waits up to 24 hours for clients, counts every stream that
opens as a client, and samples with an unseeded random.sample over connection ids, which
differ from run to run (gRPC peer addresses, random SuperNode ids). Here a connection
counts once it has said which partition it holds (gRPC path), the wait has a timeout,
and the sample of a round is a function of the seed, the round and the *partitions* of
the connected clients: the same run gives the same clients, and the same global model,
on every transport.
"""

import concurrent.futures
import threading
import time
from logging import INFO, WARNING

import numpy as np
from flwr.common import GetPropertiesIns, ReconnectIns, log
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion

IDENTIFY_TIMEOUT = 5.0  # seconds a new connection has to say which partition it trains on


def choose(seed: int, server_round: int, purpose: int, num_candidates: int,
           num_clients: int) -> list[int]:
    """Which of num_candidates (ordered by partition) take part: sorted indices, drawn
    without replacement by np.random.default_rng([seed, server_round, purpose])."""
    rng = np.random.default_rng([seed, server_round, purpose])
    picked = rng.choice(num_candidates, size=min(num_clients, num_candidates), replace=False)
    return sorted(int(i) for i in picked)


class NotEnoughClients(RuntimeError):
    """Fewer clients than needed stayed connected for longer than the timeout."""


class TimeoutClientManager(SimpleClientManager):
    """Flower's SimpleClientManager, but waiting at most `timeout` s (not 24 h) for clients.

    sample() raises NotEnoughClients instead of blocking a day or silently returning no
    clients, so a server whose clients are gone stops with a clear message.

    With num_partitions set, a connection counts as a client only once it has identified
    itself: the manager asks it for its properties and admits it if it answers within
    IDENTIFY_TIMEOUT with a "partition" in range that no connected client holds. Flower's
    grpc-bidi server registers every stream that calls Join, before a single message is
    exchanged, and has no client authentication; this check keeps strangers and
    duplicates out of rounds (see README, "Running across machines").
    """

    def __init__(self, timeout: float, num_partitions: int | None = None,
                 identify_timeout: float = IDENTIFY_TIMEOUT, seed: int = 0) -> None:
        super().__init__()
        self.timeout = timeout
        self.seed = seed
        self.num_partitions = num_partitions
        self.identify_timeout = identify_timeout
        self._partition: dict[str, int] = {}      # cid -> partition, of every admitted client
        self._pending: dict[str, ClientProxy] = {}  # cid -> proxy, not identified yet
        self._left: dict[str, float] = {}         # cid -> time.monotonic() it went away

    # -- identification

    def register(self, client: ClientProxy) -> bool:
        """Accept the stream; count the client once it has identified itself (a thread).

        Flower calls this from the stream's handler before any message can flow, so the
        question cannot be asked here: it would wait on the stream it is blocking.
        """
        if self.num_partitions is None:
            return super().register(client)
        with self._cv:
            self._pending[client.cid] = client
        threading.Thread(target=self._identify, args=(client,), daemon=True,
                         name=f"identify-{client.cid[:8]}").start()
        return True

    def _identify(self, client: ClientProxy) -> None:
        """Ask a new connection for its partition; admit it, refuse it or drop it."""
        try:
            res = client.get_properties(GetPropertiesIns(config={}),
                                        timeout=self.identify_timeout, group_id=None)
            partition = res.properties.get("partition")
        except Exception:  # pylint: disable=broad-except  # the stream closed or timed out
            partition = None
        with self._cv:
            self._pending.pop(client.cid, None)
            refusal = self._refusal(partition)
            if refusal is None and client.cid not in self._left:  # still connected
                self._partition[client.cid] = partition
                self.clients[client.cid] = client
                self._cv.notify_all()
                log(INFO, "partition %d connected (%d clients)", partition, len(self.clients))
                return
        if partition is not None and client.cid in self._left:
            return  # it answered, then went away
        if partition is None:
            log(WARNING, "dropped a connection that did not say which partition it trains "
                "within %g s (not a client.py of this run?)", self.identify_timeout)
            _close(client)
            return
        log(WARNING, "refused a client: %s", refusal)
        try:  # tell it why, then end its session the way Flower ends a run
            client.get_properties(GetPropertiesIns(config={"refused": refusal}),
                                  timeout=self.identify_timeout, group_id=None)
            client.reconnect(ReconnectIns(seconds=None), timeout=self.identify_timeout,
                             group_id=None)
        except Exception:  # pylint: disable=broad-except  # it may be gone already
            pass
        _close(client)

    def _refusal(self, partition: object) -> str | None:
        """Why a client answering with `partition` may not join (one line), or None."""
        if not isinstance(partition, int) or isinstance(partition, bool) or not (
                0 <= partition < self.num_partitions):
            return (f"partition {partition!r} is not one of this run's 0.."
                    f"{self.num_partitions - 1}")
        if partition in {self._partition[cid] for cid in self.clients}:
            return f"partition {partition} is already connected (one client per partition)"
        return None

    def unregister(self, client: ClientProxy) -> None:
        """Forget a client whose stream ended (Flower calls this)."""
        with self._cv:  # its partition stays known, for the messages about it
            self._left[client.cid] = time.monotonic()
        super().unregister(client)

    def partition(self, client: ClientProxy) -> int | None:
        """The partition an admitted client trains on (None without identification)."""
        return self._partition.get(client.cid)

    def left_at(self, client: ClientProxy) -> float | None:
        """time.monotonic() when the client's stream ended, or None if it is connected."""
        return self._left.get(client.cid)

    # -- waiting

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
        """Wait for min_num_clients like sample(), then pick() num_clients of them."""
        if not self.wait_for(min_num_clients):
            raise NotEnoughClients(
                f"only {len(self.clients)} of the {min_num_clients} clients needed are "
                f"connected after waiting {self.timeout:g} s (see --min-clients, "
                "--round-timeout)")
        # all(), not .clients: on the App path Flower refreshes the node list in all().
        return self.pick(list(self.all().values()), num_clients, server_round, purpose)

    def pick(self, clients: list[ClientProxy], num_clients: int, server_round: int,
             purpose: int = 0) -> list[ClientProxy]:
        """num_clients of `clients`, chosen by (seed, round, purpose) and their partitions.

        When not every client is taken, the clients are ordered by the partition each one
        reports and a generator seeded with [seed, server_round, purpose] picks among
        them; purpose 0 is training, 1 federated evaluation.
        """
        if num_clients >= len(clients):
            return clients
        by_partition = sorted(self._partitions_of(clients).items())
        picked = choose(self.seed, server_round, purpose, len(by_partition), num_clients)
        return [by_partition[i][1] for i in picked]

    def _partitions_of(self, clients: list[ClientProxy]) -> dict[int, ClientProxy]:
        """partition -> client. Clients not identified yet (on the App path, where
        SuperNodes are admitted by the SuperLink, not here) are asked once, in parallel."""
        unknown = [c for c in clients if c.cid not in self._partition]

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
                        self._partition[proxy.cid] = partition
        known: dict[int, ClientProxy] = {}
        for proxy in clients:
            partition = self._partition.get(proxy.cid)
            if partition is not None and partition not in known:
                known[partition] = proxy
        return known

    def disconnect_all(self) -> None:
        """Close every stream, admitted or not (so no server thread waits on it forever)."""
        with self._cv:
            proxies = list(self.clients.values()) + list(self._pending.values())
        for proxy in proxies:
            _close(proxy)


def _close(proxy: ClientProxy) -> None:
    """Close a grpc-bidi client's stream (other proxies have none)."""
    bridge = getattr(proxy, "bridge", None)
    if bridge is not None:
        bridge.close()
