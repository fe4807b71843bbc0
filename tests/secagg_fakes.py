"""Sites that run the real secure aggregation handlers in-process, shared by the secure
aggregation tests and the adversarial suite: each node has its own Flower context and its own
identity (a key pair and the consortium's roster), as a deployed site has."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flower_fakes import Answer, Arrays, FakeGrid, numpy_of, record
from flwr.app import Error, Message

from fl_imaging.flower.protocol import SiteRefusal, site_reply
from fl_imaging.secagg.arithmetic import MASKED, SECAGG
from fl_imaging.secagg.site import SECAGG_STAGES, SecAggGuard, mask_reply
from fl_imaging.site.identity import SiteIdentity


def identities(sites: Iterable[int]) -> dict[int, SiteIdentity]:
    """A new key pair per site number (site ``site-<number>``), each holding the full roster."""
    keys = {n: ec.generate_private_key(ec.SECP384R1()) for n in sites}
    roster = {f"site-{n}": k.public_key() for n, k in keys.items()}
    return {n: SiteIdentity(f"site-{n}", k, roster) for n, k in keys.items()}


class SecureSites(FakeGrid):
    """Sites 1..n that run the sites' real secure aggregation handlers on their own contexts,
    each with its guard (``min_sites``). Training adds ``respond(site, round, sent)`` to what
    was sent, with ``weights[site]`` cases; sites in ``fail[stage]`` answer that stage
    (``train``, ``secagg_unmask`` ...) with an error. ``held[round][site]`` keeps what the
    coordinator received of each site's model, ``updates[round][site]`` the true update (by
    site number)."""

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
        self.contexts = {site: self.context_of(site) for site in self.node_of}
        self.guards = {
            site: SecAggGuard(identity, min_sites)
            for site, identity in identities(self.node_of).items()
        }
        self.held: dict[int, dict[int, np.ndarray]] = {}
        self.updates: dict[int, dict[int, Arrays]] = {}

    def site_answer(self, msg: Message) -> Message:
        """The own answer of the site ``msg`` is addressed to (raises its
        :class:`SiteRefusal`), for a test that hands a site a message itself."""
        site, kind = self.site_of[msg.metadata.dst_node_id], msg.metadata.message_type
        if kind.startswith("query."):
            return SECAGG_STAGES[kind.split(".")[-1]](msg, self.contexts[site], self.guards[site])
        return self._train(msg, site)

    def answer(self, msg: Message, site: int) -> Answer:
        kind = msg.metadata.message_type
        stage = kind.split(".")[-1] if kind.startswith("query.") else "train"
        if site in self.fail.get(stage, set()):
            return Message(Error(0, f"[site site-{site}] gone"), reply_to=msg)
        try:
            return self.site_answer(msg)
        except SiteRefusal as err:
            return Message(Error(0, f"[site site-{site}] refused: {err}"), reply_to=msg)

    def _train(self, msg: Message, site: int) -> Message:
        rnd = int(msg.content["config"]["server-round"])
        sent = numpy_of(msg.content["arrays"])
        local = {k: v + self.respond(site, rnd, sent)[k] for k, v in sent.items()}
        self.updates.setdefault(rnd, {})[site] = {k: local[k] - sent[k] for k in sent}
        metrics = {"num-examples": self.weights[site], "train_loss": float(site), "unit-weight": 1}
        reply = site_reply(msg, f"site-{site}", metrics, record(local))
        if SECAGG in msg.content.config_records:
            reply = mask_reply(msg, reply, self.contexts[site], self.guards[site])
            self.held.setdefault(rnd, {})[site] = reply.content[MASKED][MASKED].numpy()
        return reply


def step(site: int, rnd: int, sent: Arrays) -> Arrays:
    """A site's update: random, different per site and round, of norm about 1."""
    rng = np.random.default_rng([site, rnd])
    return {k: (0.02 * rng.normal(size=v.shape)).astype(v.dtype) for k, v in sent.items()}
