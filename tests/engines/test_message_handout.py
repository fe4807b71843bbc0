"""How the simulation hands out the sites' messages (fl_imaging.engines.message_handout): only
the sites with a message waiting are asked, in the order the messages were sent; a state of
another kind is handled as Flower does; Flower's in-memory state is what it reads."""

from __future__ import annotations

import inspect
import threading
from queue import Queue
from types import SimpleNamespace
from typing import Any

from fl_imaging.engines import message_handout
from fl_imaging.engines.message_handout import (
    addressed_nodes,
    hand_out_messages,
    sites_asked_only_when_addressed,
)


class OnePass(threading.Event):
    """A stop event that is set by the first wait: the loop makes exactly one pass."""

    def wait(self, timeout: float | None = None) -> bool:
        self.set()
        return True


class FakeState:
    """What the hand-out uses of Flower's InMemoryLinkState: its store, its lock, and
    get_message_ins (one undelivered message for the node, then marked delivered)."""

    def __init__(self, destinations: list[int]) -> None:
        self.lock = threading.Lock()
        self.message_ins_store = {
            f"m{i}": SimpleNamespace(metadata=SimpleNamespace(dst_node_id=d, delivered_at=""))
            for i, d in enumerate(destinations)
        }
        self.asked: list[int] = []

    def get_message_ins(self, node_id: int, limit: int | None) -> list[Any]:
        self.asked.append(node_id)
        for message in self.message_ins_store.values():
            if message.metadata.dst_node_id == node_id and not message.metadata.delivered_at:
                message.metadata.delivered_at = "now"
                return [message]
        return []


def test_only_the_sites_with_a_waiting_message_are_asked_in_the_order_sent() -> None:
    nodes = {node: i for i, node in enumerate(range(1000, 2000))}  # 1,000 sites
    state = FakeState([1700, 1003, 1700, 1500])
    state.message_ins_store["m3"].metadata.delivered_at = "earlier"  # handed out already
    queue: Queue[Any] = Queue()

    hand_out_messages(state, queue, nodes, OnePass())

    assert state.asked == [1700, 1003]  # not 1,000 asks; each site once per pass
    assert [queue.get_nowait().metadata.dst_node_id for _ in range(queue.qsize())] == [1700, 1003]
    assert addressed_nodes(state) == [1700]  # its second message: the next pass


def test_messages_for_nodes_outside_the_simulation_are_left_alone() -> None:
    state = FakeState([5, 1])
    hand_out_messages(state, Queue(), {1: 0}, OnePass())
    assert state.asked == [1]


def test_a_state_of_another_kind_has_every_node_asked_as_flower_does() -> None:
    class OtherState:
        asked: list[int] = []

        def get_message_ins(self, node_id: int, limit: int | None) -> list[Any]:
            self.asked.append(node_id)
            return []

    state = OtherState()
    assert addressed_nodes(state) is None
    hand_out_messages(state, Queue(), {3: 0, 1: 1, 2: 2}, OnePass())
    assert state.asked == [3, 1, 2]


def test_flowers_in_memory_state_and_loop_are_what_the_hand_out_replaces() -> None:
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    # the simulation's state, made as Flower's run_simulation makes it
    state = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    ).state()
    assert isinstance(state, InMemoryLinkState)
    assert addressed_nodes(state) == []  # read, not the every-node fallback
    flower_loop = vce_api.add_messages_to_queue
    assert list(inspect.signature(flower_loop).parameters) == list(
        inspect.signature(hand_out_messages).parameters
    )
    with sites_asked_only_when_addressed():
        assert vce_api.add_messages_to_queue is message_handout.hand_out_messages
    assert vce_api.add_messages_to_queue is flower_loop
