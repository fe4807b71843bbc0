"""How the coordinator's Grid sends a round (fl_imaging.flower.coordinator.polling.QuickPollGrid):
messages
in waves when asked to, arrays packed on the way out and unpacked on the way back."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

import numpy as np
import pytest
from flower_fakes import FakeGrid
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict

from fl_imaging.engines.simulation import in_flight_limit
from fl_imaging.flower.coordinator.polling import QuickPollGrid, StopRequested
from fl_imaging.flower.packed_arrays import LAYOUT_SUFFIX, is_packed, pack_content

pytestmark = pytest.mark.usefixtures("task_identity")


def _model() -> ArrayRecord:
    return ArrayRecord([np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, np.float32)])


class SitesGrid(FakeGrid):
    """Each pushed message is answered at the next pull (its site trains meanwhile); the sites
    reply the model they received, packed when it came packed, as the sites' mod does."""

    def __init__(self, num_nodes: int) -> None:
        super().__init__(num_nodes, lambda n, r, s: s)
        self.in_flight: dict[str, Message] = {}
        self.most_in_flight = 0
        self.arrived_packed: list[bool] = []
        self.pushed: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = f"m{msg.metadata.dst_node_id}"
            msg.metadata.__dict__["_message_id"] = msg_id
            self.arrived_packed.append(is_packed(msg.content))
            self.pushed.append(msg)
            self.in_flight[msg_id] = msg
            ids.append(msg_id)
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for msg_id in list(message_ids):
            msg = self.in_flight.pop(msg_id, None)
            if msg is not None:
                arrays = {k: v for k, v in msg.content.items() if k.startswith("arrays")}
                content = RecordDict(arrays)  # packed, with its layout, when it came so
                replies.append(Message(content, reply_to=msg))
        return replies


def _round(nodes: int) -> list[Message]:
    return [
        Message(
            RecordDict({"arrays": _model(), "config": ConfigRecord({"server-round": 1})}),
            dst_node_id=n,
            message_type=MessageType.TRAIN,
        )
        for n in range(1, nodes + 1)
    ]


@pytest.mark.parametrize("limit", [None, 1, 8])
def test_every_site_answers_and_no_more_than_the_limit_wait_at_a_time(limit: int | None) -> None:
    sites = SitesGrid(30)
    grid = QuickPollGrid(sites, interval=0.01, max_in_flight=limit)
    replies = list(grid.send_and_receive(_round(30), timeout=30))
    assert sorted(r.metadata.src_node_id for r in replies) == list(range(1, 31))
    assert sites.most_in_flight == (30 if limit is None else limit)


def test_arrays_leave_packed_and_come_back_as_they_were() -> None:
    sites = SitesGrid(3)
    messages = _round(3)
    replies = list(QuickPollGrid(sites, interval=0.01).send_and_receive(messages, timeout=30))
    assert sites.arrived_packed == [True, True, True]
    assert not is_packed(messages[0].content)  # the strategy's own messages are untouched
    for reply in replies:
        assert "arrays" + LAYOUT_SUFFIX not in reply.content
        np.testing.assert_array_equal(
            reply.content["arrays"].to_numpy_ndarrays()[0], np.arange(6).reshape(2, 3)
        )
    assert is_packed(pack_content(messages[0].content))


def test_a_model_shared_by_a_rounds_messages_is_packed_once_across_the_waves() -> None:
    content = RecordDict({"arrays": _model(), "config": ConfigRecord({"server-round": 1})})
    messages = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2, 3)]
    sites = SitesGrid(3)
    QuickPollGrid(sites, interval=0.01, max_in_flight=1).send_and_receive(messages, timeout=30)
    assert len(sites.pushed) == 3 and all(sites.arrived_packed)
    assert len({id(m.content["arrays"]) for m in sites.pushed}) == 1


def test_waves_stop_when_the_run_is_asked_to_stop() -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(StopRequested):
        QuickPollGrid(SitesGrid(3), stop=stop, max_in_flight=1).send_and_receive(_round(3))


def test_a_limit_below_one_is_refused_and_the_simulation_keeps_every_worker_busy() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        QuickPollGrid(SitesGrid(1), max_in_flight=0)
    assert in_flight_limit(1) == 8 and in_flight_limit(16) == 64


def test_each_message_out_and_reply_in_is_a_progress_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fl_imaging.console.events import PROGRESS_LOGGER, REPLY, SENT, progress_of

    class OneFails(SitesGrid):
        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            replies = list(super().pull_messages(message_ids))
            for i, reply in enumerate(replies):
                if reply.metadata.src_node_id == 2:
                    reason = "[site site-2] MemoryError: out of memory"
                    replies[i] = Message(Error(0, reason), reply_to=self.pushed[1])
            return replies

    events = logging.getLogger(PROGRESS_LOGGER)
    events.addHandler(caplog.handler)
    try:
        QuickPollGrid(OneFails(3), interval=0.01).send_and_receive(_round(3), timeout=30)
    finally:
        events.removeHandler(caplog.handler)
    seen = [progress_of(r) for r in caplog.records]
    assert [(e.kind, e.node, e.phase) for e in seen if e and e.kind == SENT] == [
        (SENT, 1, "train"),
        (SENT, 2, "train"),
        (SENT, 3, "train"),
    ]
    replies = {e.node: e for e in seen if e and e.kind == REPLY}
    assert set(replies) == {1, 2, 3} and replies[1].ok and replies[1].site == "node-1"
    assert not replies[2].ok and replies[2].site == "site-2"
    assert replies[2].detail == "[site site-2] MemoryError: out of memory"
