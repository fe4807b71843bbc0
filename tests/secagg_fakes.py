"""Sites that run the real secure aggregation handlers in-process, shared by the secure
aggregation tests and the adversarial suite: each node has its own Flower context and its own
identity (a key pair and the consortium's roster), as a deployed site has."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flower_fakes import Arrays, FakeGrid, numpy_of, record
from flwr.app import Context, Error, Message, RecordDict

from fl_imaging.flower.protocol import SiteRefusal, site_reply
from fl_imaging.secagg.arithmetic import MASKED, SECAGG
from fl_imaging.secagg.site import SECAGG_STAGES, SecAggGuard, mask_reply
from fl_imaging.site.identity import SiteIdentity


def identities(nodes: Iterable[int]) -> dict[int, SiteIdentity]:
    """A new key pair per node (site ``site-<node>``), each site holding the full roster."""
    keys = {n: ec.generate_private_key(ec.SECP384R1()) for n in nodes}
    roster = {f"site-{n}": k.public_key() for n, k in keys.items()}
    return {n: SiteIdentity(f"site-{n}", k, roster) for n, k in keys.items()}


class SecureSites(FakeGrid):
    """Nodes 1..n that run the sites' real secure aggregation handlers on their own contexts,
    each with its guard (``min_sites``). Training adds ``respond(node, round, sent)`` to what
    was sent, with ``weights[node]`` cases; nodes in ``fail[stage]`` answer that stage
    (``train``, ``secagg_unmask`` ...) with an error. ``held[round][node]`` keeps what the
    coordinator received of each site's model, ``updates[round][node]`` the true update."""

    def __init__(
        self,
        nodes: int,
        respond: Callable[[int, int, Arrays], Arrays],
        weights: dict[int, int],
        fail: dict[str, set[int]] | None = None,
        min_sites: int = 2,
    ) -> None:
        super().__init__(nodes, respond)
        self.weights = weights
        self.fail = fail or {}
        self.contexts = {n: Context(1, n, {}, RecordDict(), {}) for n in self.nodes}
        self.guards = {
            n: SecAggGuard(identity, min_sites) for n, identity in identities(self.nodes).items()
        }
        self.held: dict[int, dict[int, np.ndarray]] = {}
        self.updates: dict[int, dict[int, Arrays]] = {}

    def answer(self, msg: Message) -> Message:
        """The site's own answer to one message (raises its :class:`SiteRefusal`)."""
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        if kind.startswith("query."):
            return SECAGG_STAGES[kind.split(".")[-1]](msg, self.contexts[node], self.guards[node])
        return self._train(msg, node)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            stage = kind.split(".")[-1] if kind.startswith("query.") else "train"
            if node in self.fail.get(stage, set()):
                replies.append(Message(Error(0, f"[site site-{node}] gone"), reply_to=msg))
                continue
            try:
                replies.append(self.answer(msg))
            except SiteRefusal as err:
                reason = f"[site site-{node}] refused: {err}"
                replies.append(Message(Error(0, reason), reply_to=msg))
        return replies

    def _train(self, msg: Message, node: int) -> Message:
        rnd = int(msg.content["config"]["server-round"])
        sent = numpy_of(msg.content["arrays"])
        local = {k: v + self.respond(node, rnd, sent)[k] for k, v in sent.items()}
        self.updates.setdefault(rnd, {})[node] = {k: local[k] - sent[k] for k in sent}
        metrics = {"num-examples": self.weights[node], "train_loss": float(node), "unit-weight": 1}
        reply = site_reply(msg, f"site-{node}", metrics, record(local))
        if SECAGG in msg.content.config_records:
            reply = mask_reply(msg, reply, self.contexts[node], self.guards[node])
            self.held.setdefault(rnd, {})[node] = reply.content[MASKED][MASKED].numpy()
        return reply
