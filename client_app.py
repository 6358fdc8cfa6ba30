"""The Flower ClientApp: MnistClient (federation/), run by a SuperNode or the Simulation Engine.

Each node holds one partition. `client_fn` reads which one from the node config:
`partition-id` (the Simulation Engine sets it for virtual node i to i; a real SuperNode
gets it with `flower-supernode --node-config "partition-id=3 data-dir='/data'"`) and
`data-dir` (node config first, then the run config, then "data"). It then loads that
shard and returns the same MnistClient that client.py runs over gRPC, unchanged.

The Deployment Engine starts a fresh ClientApp process for every message, so every
message would compile the model's programs again; the persistent compilation cache
(federation/compile_cache.py: $FL_JAX_CACHE_DIR on the SuperNode, else ~/.cache/...)
makes every process after the first load them instead.

With the run config's `secagg = true`, Flower's secaggplus_mod masks every model this
client sends, so that the server learns only the sum (server_app.py runs the server's side).
With DP on as well (`dp-noise-multiplier`), Flower's fixedclipping_mod first clips the
update to the norm the server sends, and the model counts once in the sum, whatever this
client's data: DP-FedAvg's clipping, done here because the server sees no single update
(federation/secure_aggregation.py adds the noise).
"""

from flwr.app.message_type import MessageType
from flwr.client import Client, ClientApp
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Context, Message
from flwr.compat.common import recorddict_compat

from federation import compile_cache, shards
from federation.mnist_client import MnistClient, load_client_data


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


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's secaggplus_mod if the run config says `secagg = true`; else nothing.

    secaggplus_mod is not a no-op in plain runs: it expects SecAgg+'s record in every
    training message and fails plain FedAvg's with a KeyError. The run config decides
    here, not the message, so a client of a SecAgg+ run never sends unmasked weights.
    """
    if context.run_config.get("secagg") is not True:
        return call_next(msg, context)
    fit = _raise_training_errors(call_next)
    if context.run_config.get("dp-noise-multiplier", "off") != "off":
        fit = _clipped_with_weight_one(fit)
    return secaggplus_mod(msg, context, fit)


def _clipped_with_weight_one(call_next: ClientAppCallable) -> ClientAppCallable:
    """call_next, but a fit reply carries w + clip(w_k - w, C) and weight 1 (DP under SecAgg+).

    Flower's fixedclipping_mod clips the update to the norm C in the fit config (sent by
    the server; a message without it fails this client, which then drops out: no update
    leaves unclipped). SecAgg+ weighs each model by its num_examples, but DP-FedAvg sums
    the clipped updates with weight 1 each (one client moves the sum by at most C): so
    the reply says 1, and the server's train loss and accuracy weigh clients equally too.
    """
    def call(msg: Message, context: Context) -> Message:
        reply = fixedclipping_mod(msg, context, call_next)
        if msg.metadata.message_type == MessageType.TRAIN and reply.has_content():
            res = recorddict_compat.recorddict_to_fitres(reply.content, True)
            res.num_examples = 1
            reply.content = recorddict_compat.fitres_to_recorddict(res, True)
        return reply
    return call


def _raise_training_errors(call_next: ClientAppCallable) -> ClientAppCallable:
    """call_next, but a failed fit raises instead of replying with an empty model.

    MnistClient.fit reports a training error as ([], 0, {"error": ...}). SecAgg+ would mask
    that empty model and add it to the others' (breaking the sum); raised, the error makes
    this client drop out of the round, which SecAgg+ recovers from.
    """
    def call(msg: Message, context: Context) -> Message:
        reply = call_next(msg, context)
        # secaggplus_mod passes evaluation messages through here too: only fit replies count.
        if msg.metadata.message_type == MessageType.TRAIN and reply.has_content():
            metrics = recorddict_compat.recorddict_to_fitres(reply.content, True).metrics
            if "error" in metrics:
                raise RuntimeError(f"training failed: {metrics['error']}")
        return reply
    return call


app = ClientApp(client_fn=client_fn, mods=[secagg_mod])
