"""The wire between peers: JAX's multi-process runtime, and nothing else.

`jax.distributed.initialize` connects this process to the coordination service that
peer 0 runs (a rendezvous, a small key-value store and a health check: it carries no
model). The models travel over JAX's CPU collectives (gloo): inside `shard_map` over a
mesh of one device per peer, one `lax.ppermute` per shift of the topology
(federation/gossip.py) sends this peer's model to one neighbour and receives one
neighbour's model. No process ever receives more than its neighbours' models, and none
computes the average of all peers.

What the key-value store carries, all of it small: each peer's settings and resume
point (so that peers that disagree stop before training), "ready for round r" before
every exchange (so that a peer that died or hangs is *named*, instead of leaving the
others inside a collective that never ends), and each peer's neighbour distance (one
float) after it.

Why not a library: Flower has no peer-to-peer mode (flwrlabs/flower#3149), and the
gossip libraries on PyPI need other frameworks or old NumPy (docs/guides/no-server.md).
"""

import os
import socket
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from federation.gossip import Arrays, Topology

AXIS = "peers"


class PeerMissing(Exception):
    """Some peers did not arrive within the timeout; .ranks names them."""

    def __init__(self, message: str, ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.ranks = list(ranks)


class CoordinatorLost(Exception):
    """The coordination service (run by peer 0) stopped answering."""


def coordinator_problem(coordinator: str, rank: int, timeout: float) -> str | None:
    """Why this peer cannot reach (or, as peer 0, run) the coordinator, or None.

    Checked in Python first because JAX ends the process with a fatal log and a C++
    stack trace when its connection fails (jaxlib offers no way to be told instead).
    Peer 0 must be able to listen on the port; the others wait up to `timeout` s for
    something to listen there.
    """
    host, _, port = coordinator.rpartition(":")
    host = host.strip("[]")
    if rank == 0:
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                # As gRPC (the coordination service) binds: a port whose last run's
                # connections linger in TIME_WAIT is free, one with a listener is not.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", int(port)))
                sock.listen()
        except OSError as e:
            return f"peer 0 cannot run the coordinator on port {port}: {e.strerror}"
        return None
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return None
        except OSError as e:
            if time.monotonic() >= deadline:
                return (f"no coordinator answered at {coordinator} within {timeout:g} s "
                        f"({e.strerror or e}); start peer 0 with the same --coordinator")
            time.sleep(0.2)


def connect(coordinator: str, peers: int, rank: int, start_timeout: float,
            timeout: float) -> None:
    """Join the run: jax.distributed.initialize with timeouts that fit ours.

    initialization_timeout (start_timeout): how long to wait for the coordinator and the
    other peers. heartbeat_timeout: JAX ends every process once one stopped sending
    heartbeats for this long, with a fatal log of its own; it is set past `timeout` (the
    wait at each exchange), so that our wait (wait_for_all) names the missing peer first.
    shutdown_timeout: how long a finished peer waits for the others at exit.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    seconds = max(int(timeout), 1)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=peers,
                               process_id=rank,
                               initialization_timeout=max(int(start_timeout), 1),
                               heartbeat_timeout_seconds=2 * seconds + 30,
                               shutdown_timeout_seconds=seconds + 30)


def _client():  # noqa: ANN202  (jaxlib's DistributedRuntimeClient)
    """The coordination service's client that jax.distributed.initialize made."""
    from jax._src import distributed  # noqa: PLC0415  (no public handle on the client)
    return distributed.global_state.client


def publish(key: str, value: str) -> None:
    """Put one small value into the run's key-value store (each key once)."""
    try:
        _client().key_value_set(key, value)
    except Exception as e:  # jaxlib's XlaRuntimeError: the service is gone
        raise CoordinatorLost(first_line(e)) from None


def wait_for_all(prefix: str, peers: int, timeout: float, what: str,
                 also: Sequence[str] = ()) -> list[str]:
    """The values of prefix/0 .. prefix/peers-1, waiting up to `timeout` s in all.

    Raises PeerMissing naming the ranks whose value did not arrive in time, leaving
    out those with a value under one of the `also` prefixes (peers that said why
    they could not go on, e.g. failed/ROUND).
    """
    return wait_for_ranks(prefix, range(peers), timeout, what, peers, also)


def wait_for_ranks(prefix: str, ranks: Sequence[int], timeout: float, what: str = "",
                   peers: int | None = None, also: Sequence[str] = ()) -> list[str]:
    """The values of prefix/RANK for these ranks (wait_for_all for some of them)."""
    peers = peers if peers is not None else max(ranks, default=-1) + 1
    client, deadline, values = _client(), time.monotonic() + timeout, []
    for rank in ranks:
        left = max(deadline - time.monotonic(), 0.001)
        try:
            values.append(client.blocking_key_value_get(f"{prefix}/{rank}", int(1000 * left)))
        except Exception as e:  # DEADLINE_EXCEEDED, or the service is gone
            text = first_line(e)
            if "DEADLINE_EXCEEDED" not in text and "timed out" not in text.lower():
                raise CoordinatorLost(text) from None
            missing = _missing((prefix, *also), peers) or _missing((prefix,), peers) or [rank]
            raise PeerMissing(f"{ranks_named(missing)} did not reach {what} within "
                              f"{timeout:g} s (gone or hung)", missing) from None
    return values


def absent(prefixes: Sequence[str], peers: int, timeout: float) -> list[int]:
    """The ranks with a value under none of these prefixes, waiting up to `timeout` s.

    How a peer learns who broke a collective: gloo's error names no rank, so every
    peer that sees one says so under failed/ROUND, and the ranks that never answer
    (neither failed/ROUND nor the round's next key) are the ones gone.
    """
    deadline = time.monotonic() + timeout
    while True:
        missing = _missing(prefixes, peers, strict=True)
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.1)


def ranks_named(ranks: Sequence[int]) -> str:
    """E.g. "peer 2", "peers 1, 3"."""
    return f"peer{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _missing(prefixes: Sequence[str], peers: int, strict: bool = False) -> list[int]:
    """The ranks with no value under any of these prefixes yet.

    Only for a message: [] where the service does not answer, unless `strict`
    (then CoordinatorLost).
    """
    present = set()
    try:
        for prefix in prefixes:
            present |= {int(key.rsplit("/", 1)[1]) for key, _ in
                        _client().key_value_dir_get(prefix + "/")}
    except Exception as e:  # noqa: BLE001  (jaxlib's XlaRuntimeError)
        if strict:
            raise CoordinatorLost(first_line(e)) from None
        return []
    return [rank for rank in range(peers) if rank not in present]


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class Exchange:
    """One gossip exchange: this peer's model to its neighbours, theirs back."""

    def __init__(self, topo: Topology, rank: int) -> None:
        self.topo, self.rank = topo, rank
        devices = sorted(jax.devices(), key=lambda d: d.process_index)
        if [d.process_index for d in devices] != list(range(topo.size)):
            raise RuntimeError(f"expected one CPU device per peer, got {devices}")
        self.mesh = Mesh(np.array(devices), (AXIS,))
        self.sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
        shifts = [[(i, shift[i]) for i in range(topo.size)] for shift in topo.shifts]

        def send_along_shifts(x: jax.Array) -> jax.Array:  # (1, P) -> (1, shifts, P)
            return jnp.stack([jax.lax.ppermute(x[0], AXIS, perm) for perm in shifts])[None]

        self._step = jax.jit(jax.shard_map(send_along_shifts, mesh=self.mesh,
                                           in_specs=PartitionSpec(AXIS),
                                           out_specs=PartitionSpec(AXIS)))

    def __call__(self, arrays: Arrays) -> dict[int, Arrays]:
        """{neighbour rank: its model} (float32, the exact bits it sent)."""
        flat = np.concatenate([np.asarray(a, np.float32).ravel() for a in arrays])[None]
        local = jax.device_put(flat, jax.local_devices()[0])
        x = jax.make_array_from_single_device_arrays((self.topo.size, flat.shape[1]),
                                                     self.sharding, [local])
        received = np.asarray(self._step(x).addressable_shards[0].data)[0]  # (shifts, P)
        models = {}
        for vector, sender in zip(received, self.topo.senders(self.rank)):
            parts, start = [], 0
            for a in arrays:
                parts.append(vector[start:start + a.size].reshape(np.shape(a)).copy())
                start += a.size
            models[sender] = parts
        return models


def leave_now(code: int) -> None:
    """Exit at once, skipping JAX's exit-time shutdown barrier (which would wait for the
    peer that is gone): only after a fault, once everything is saved and said."""
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)
