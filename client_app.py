"""The Flower ClientApp: client.py's MnistClient, run by a SuperNode or the Simulation Engine.

Each node holds one partition. `client_fn` reads which one from the node config:
`partition-id` (the Simulation Engine sets it for virtual node i to i; a real SuperNode
gets it with `flower-supernode --node-config "partition-id=3 data-dir='/data'"`) and
`data-dir` (node config first, then the run config, then "data"). It then loads that
shard and returns the same MnistClient that client.py runs over gRPC, unchanged.

The Deployment Engine starts a fresh ClientApp process for every message, so every
message would compile the model's programs again; the persistent compilation cache
(federation/compile_cache.py: $FL_JAX_CACHE_DIR on the SuperNode, else ~/.cache/...)
makes every process after the first load them instead.
"""

from flwr.client import Client, ClientApp
from flwr.common import Context

from client import MnistClient, load_client_data
from federation import compile_cache, shards


def client_fn(context: Context) -> Client:
    """The client of this node: its partition's shard, the run's seed."""
    compile_cache.enable()  # before anything compiles in this process
    partition = context.node_config.get("partition-id")
    if not isinstance(partition, int) or isinstance(partition, bool):
        raise shards.DataError(
            f"node config partition-id = {partition!r}: set it to the partition this node "
            "holds, e.g. flower-supernode --node-config \"partition-id=0 data-dir='/data'\"")
    data_dir = context.node_config.get("data-dir", context.run_config.get("data-dir", "data"))
    data = load_client_data(shards.resolve_dir(str(data_dir)), partition)
    return MnistClient(data, partition, int(context.run_config.get("seed", 0))).to_client()


app = ClientApp(client_fn=client_fn)
