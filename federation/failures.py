"""Why a client failed a round, in one readable warning per client.

Flower hands a strategy its round's `failures` as a bare list: an exception (the
connection closed; on the App path, a ValueError whose text names the SuperLink's error)
or a reply whose status is not OK. A client that sent nothing at all can be missing from
the list entirely, or be one of several identical errors that say why but not whose. This
file turns them into warnings that name the client's partition and say whether it timed
out or crashed: the diagnosis CheckedFedAvg (strategy.py) logs after every fit and
evaluate stage.
"""

import time
from collections.abc import Sequence
from logging import WARNING

from flwr.common import EvaluateRes, FitRes, log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from federation import flower_internals
from federation.sampling import partition_of


def failure_reason(failure: tuple[ClientProxy, FitRes | EvaluateRes] | BaseException) -> str:
    """A readable reason for something Flower put in `failures`."""
    if isinstance(failure, BaseException):
        if flower_internals.is_closed_connection(failure):
            return "connection closed"
        return f"{type(failure).__name__}: {failure}"
    return f"status {failure[1].status.code.name}: {failure[1].status.message}"


def app_failure_cause(error: BaseException, round_timeout: float | None) -> str | None:
    """What a failure on the App path (Flower's GridClientProxy) means, in one phrase, or
    None for a failure of another kind. The proxy raises ValueError for every reply it
    cannot use: no reply when its wait ended, or the SuperLink's error reply (its text
    names the cause: the message's TTL, which is the round timeout, ran out, or the
    SuperNode missed its heartbeats)."""
    text = str(error)
    if not isinstance(error, ValueError) or not text.startswith(
            ("Message contains an Error", "Expected one Message")):
        return None
    timeout = "the round timeout" if round_timeout is None else (
        f"the {round_timeout:g} s round timeout")
    if "Node Unavailable" in text:
        return ("its SuperNode stopped sending heartbeats (it stopped, crashed or lost "
                "the network)")
    if "Message Unavailable" in text or "got: 0" in text:  # TTL ran out, or no reply
        return f"sent no reply within {timeout}"
    return f"the node replied with an error: {text}"


def lost_reason(left_at: float | None, asked_at: float, round_timeout: float | None) -> str:
    """Why a client sent nothing: it timed out, or its connection closed earlier.

    left_at: time.monotonic() when its stream ended (None: unknown); asked_at: when the
    round's stage began.
    """
    if (left_at is not None and round_timeout is not None
            and left_at - asked_at >= round_timeout):
        return (f"no answer within --round-timeout ({round_timeout:g} s); "
                "the server closed its connection")
    return "connection closed (the client stopped or crashed)"


class FailureLog:
    """Who was asked in the current stage (fit or evaluate), and the warnings for those
    who failed it.

    It remembers the partition each client's replies named: on the App path the client
    manager never asks (with fraction-fit 1), so this is how a lost node's partition is
    known.
    """

    def __init__(self, round_timeout: float | None) -> None:
        self.round_timeout = round_timeout  # the server's, to tell a timeout from a crash
        self._asked: list[ClientProxy] = []
        self._client_manager: ClientManager | None = None
        self._replied_partition: dict[str, int] = {}  # client id -> partition
        self._asked_at = 0.0

    def asked(self, clients: Sequence[ClientProxy], client_manager: ClientManager) -> None:
        """A stage begins: these clients are asked; the clock of --round-timeout starts."""
        self._asked, self._client_manager = list(clients), client_manager
        self._asked_at = time.monotonic()

    def log(self, true_round: int, what: str, results: list, failures: list) -> None:
        """One warning per failed client, naming its partition and timeout vs. crash."""
        for proxy, res in results:
            partition = res.metrics.get("partition")
            if proxy is not None and isinstance(partition, int) and not isinstance(
                    partition, bool):
                self._replied_partition[proxy.cid] = partition
        answered = {id(f[0]) for f in results + failures if isinstance(f, tuple)}
        lost = [c for c in self._asked if id(c) not in answered]
        errors = [f for f in failures if isinstance(f, BaseException)]
        # The App path's errors say why, but not whose: one cause for all lost nodes is
        # only known when their errors agree.
        app_causes = {app_failure_cause(e, self.round_timeout) for e in errors}
        app_cause = app_causes.pop() if len(app_causes) == 1 else None
        for failure in failures:
            if isinstance(failure, tuple) or len(lost) != len(errors):
                log(WARNING, "round %d: a client %s: %s", true_round, what,
                    failure_reason(failure))
        if len(lost) == len(errors):
            for proxy in lost:
                partition = partition_of(self._client_manager, proxy)
                if partition is None:
                    partition = self._replied_partition.get(proxy.cid)
                if app_cause is None:
                    log(WARNING, "round %d: partition %s %s: %s", true_round, partition,
                        what, self._lost_reason(proxy))
                else:
                    log(WARNING, "round %d: partition %s (node %s) %s: %s", true_round,
                        "unknown" if partition is None else partition, proxy.cid, what,
                        app_cause)

    def _lost_reason(self, proxy: ClientProxy) -> str:
        """lost_reason for one client, from the client manager's record of its stream."""
        left_at = getattr(self._client_manager, "left_at", lambda _: None)(proxy)
        return lost_reason(left_at, self._asked_at, self.round_timeout)
