"""client_app.py's ClientApp, plus a mod that records the size of every message it handles.

For benchmarks/bench_secagg.py, which runs it as the `clientapp` of a copy of the Flower
App. Each message in and each reply out is one JSON line appended to the file named by
$FL_MESSAGE_SIZES: run, round, message type, SecAgg+ stage (null in plain rounds), partition
and bytes in and out: the message's content serialized as protobuf, as it travels.
(Flower's own message_size_mod would crash here: its ConfigRecord.count_bytes fails on an
empty list, which SecAgg+'s unmask stage sends when no neighbour dropped out.)
"""

import json
import os

from flwr.client import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Context, Message

import client_app
from federation.flower_internals import RECORD_KEY_CONFIGS, Key, record_dict_wire_bytes


def _size(msg: Message) -> int:
    return record_dict_wire_bytes(msg.content)


def record_sizes(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Append the incoming and outgoing sizes of this message to $FL_MESSAGE_SIZES."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)  # secaggplus_mod pops it
    line = {"run": context.run_id, "round": msg.metadata.group_id, "type": msg.metadata.message_type,
            "stage": configs.get(Key.STAGE) if configs is not None else None,
            "partition": context.node_config.get("partition-id"), "in": _size(msg)}
    reply = call_next(msg, context)
    line["out"] = _size(reply) if reply.has_content() else 0
    with open(os.environ["FL_MESSAGE_SIZES"], "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")  # one short append per message
    return reply


app = ClientApp(client_fn=client_app.client_fn, mods=[record_sizes, client_app.secagg_mod])
