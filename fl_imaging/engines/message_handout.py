"""Hand the simulated sites their messages without asking every site ten times a second.

Flower 1.41's simulation engine gives the sites their messages from one thread
(``vce_api.add_messages_to_queue``): every 0.1 s it asks its in-memory state, for each virtual
SuperNode in turn, for one message addressed to it, and each ask looks through every stored
message. With 1,000 sites that is 10,000 asks a second in the coordinator's process for the
whole run, on the cores the sites train on, so a round's time grew faster than the number of
sites (measured: 0.144 s per site per round at 1,000 sites against 0.113 at 100). While a
simulation runs (:func:`sites_asked_only_when_addressed`), the same loop first finds, in one
pass over the stored messages, the sites that have a message not yet handed out, and asks only
those, in the order the messages were sent. Everything else (which message, marking it handed
out, its expiry) stays Flower's ``get_message_ins``. Ours: Flower has no option for this; with a
state of another kind than Flower's in-memory one, Flower's own loop runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from queue import Queue
from typing import Any

__all__ = ["addressed_nodes", "hand_out_messages", "sites_asked_only_when_addressed"]

#: Seconds between two passes, as in Flower's loop.
PASS_INTERVAL_S = 0.1


def addressed_nodes(state: Any) -> list[int] | None:
    """The node ids that ``state`` (Flower's ``InMemoryLinkState``) holds a message for that was
    not handed out yet, each once, in the order the messages were stored; None when ``state``
    is not of that kind (then every node must be asked)."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        waiting = [m.metadata.dst_node_id for m in store.values() if not m.metadata.delivered_at]
    return list(dict.fromkeys(waiting))


def hand_out_messages(
    state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, int], f_stop: threading.Event
) -> None:
    """Until ``f_stop`` is set, every :data:`PASS_INTERVAL_S` seconds put into ``queue`` one
    message (from ``state.get_message_ins``) for each node of ``nodes_mapping`` that has one
    waiting; the signature and the effect of Flower's ``add_messages_to_queue``."""
    while not f_stop.is_set():
        waiting = addressed_nodes(state)
        if waiting is None:  # not Flower's in-memory state: every node, as Flower does
            waiting = list(nodes_mapping)
        for node_id in (n for n in waiting if n in nodes_mapping):
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        f_stop.wait(PASS_INTERVAL_S)


@contextmanager
def sites_asked_only_when_addressed() -> Iterator[None]:
    """While inside, Flower's simulation engine hands out messages with
    :func:`hand_out_messages`; Flower's loop is restored on leaving."""
    from fl_imaging.flower.internals import vce_api

    flower_loop = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = hand_out_messages  # type: ignore[assignment]
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = flower_loop
