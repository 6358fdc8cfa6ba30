"""A test ClientApp: client_app.py's, except that partition 2 drops out of round 1 midway.

Under SecAgg+ it fails in the stage where it would send its masked model, i.e. after the
key exchange (its key shares are with its neighbours, so the server must recover its
masks); in a plain run it fails the training message. tests/test_secagg.py runs it as the
`clientapp` of a copy of the Flower App.
"""

from flwr.app import MessageType
from flwr.client import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Context, Message

import client_app
from federation.flower_internals import RECORD_KEY_CONFIGS, Key, Stage

DROP_PARTITION, DROP_ROUND = 2, 1


def drop_out(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Raise, as a crashed node would, in DROP_PARTITION's training stage of DROP_ROUND."""
    if (msg.metadata.message_type == MessageType.TRAIN
            and msg.metadata.group_id == str(DROP_ROUND)
            and context.node_config.get("partition-id") == DROP_PARTITION):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs[Key.STAGE] if configs is not None else "fit"
        if stage in ("fit", Stage.COLLECT_MASKED_VECTORS):
            raise RuntimeError(f"partition {DROP_PARTITION} drops out (stage {stage})")
    return call_next(msg, context)


app = ClientApp(client_fn=client_app.client_fn, mods=[drop_out, client_app.secagg_mod])
