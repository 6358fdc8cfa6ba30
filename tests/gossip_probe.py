"""One process of tests/test_peer.py's check that a gossip step over real processes is W·X.

    python tests/gossip_probe.py RANK PEERS PORT TOPOLOGY OUT.npz

Peer RANK makes its random model (seeded by its rank), sends it through
gossip_transport.Exchange (jax.distributed + shard_map + ppermute), mixes what its
neighbours sent with gossip.mix_row, and saves the result and who sent what.
"""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from federation import gossip, gossip_transport  # noqa: E402


def random_model(rank: int) -> list[np.ndarray]:
    """Peer rank's model: two float32 arrays of normal noise (the test makes the same)."""
    rng = np.random.default_rng(rank)
    return [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=7).astype(np.float32)]


if __name__ == "__main__":
    rank, peers, port, name, out = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                    sys.argv[4], sys.argv[5])
    gossip_transport.connect(f"127.0.0.1:{port}", peers, rank, start_timeout=60, timeout=60)
    topo = gossip.topology(name, peers)
    received = gossip_transport.Exchange(topo, rank)(random_model(rank))
    mixed = gossip.mix_row(gossip.metropolis_hastings(topo), rank,
                           {rank: random_model(rank), **received})
    np.savez(out, *mixed, senders=np.array(sorted(received)),
             exact=np.array([all(a.tobytes() == b.tobytes() for a, b in
                                 zip(received[j], random_model(j))) for j in sorted(received)]))
