"""Stand-ins for Flower's runtime, shared by the tests that drive strategies without a SuperLink:
array helpers, a Grid whose sites answer in-process (:class:`FakeGrid`), in the replies the real
ClientApp sends (:func:`fl_imaging.flower.protocol.site_reply`: a site record, ``unit-weight``),
and a site trainer whose "training" is a few exact gradient steps (:class:`FakeTrainer`).

:class:`FakeGrid` is Flower 1.41's own in-memory Grid (``flwr.superlink.grid.InMemoryGrid``, the
one its simulation engine gives the ServerApp) over Flower's own ``InMemoryLinkState``, set up
as ``flwr.simulation.run_simulation`` and ``vce_api._register_nodes`` do: the run registered,
one node per site with the random 64-bit id Flower draws (never ``SUPERLINK_NODE_ID``, the
coordinator's), every message checked and stored by Flower's state (a message Flower would
refuse is refused here). What Flower's Ray workers do, the sites do in-process, and
deterministically: each site answers each message it has in a given number of seconds
(:attr:`FakeGrid.seconds`, simulated, not slept), the replies come back in the order the sites
finish, not the order the messages were sent, and ``send_and_receive(..., timeout=T)`` returns
only the replies that came within T seconds, as Flower's does. Flower's private pieces used
here (the linkstate package, ``RunRecord``, the protobuf ``Task``) are imported in this module
only, and the Flower version is checked once.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from uuid import uuid4

import flwr
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import (
    HEARTBEAT_INTERVAL_INF,
    NOOP_ACCOUNT_NAME,
    NOOP_FLWR_AID,
    RUN_ID_NUM_BYTES,
    SUPERLINK_NODE_ID,
    TASK_ID_NUM_BYTES,
    ErrorCode,
)
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fl_imaging.flower.protocol import site_reply

if not flwr.__version__.startswith("1.41."):  # the private pieces above are Flower 1.41's
    raise ImportError(f"tests/flower_fakes.py is written for Flower 1.41, not {flwr.__version__}")

Arrays = dict[str, np.ndarray]

#: What a site's answer to one message is: a reply, or None for no answer at all.
Answer = Message | None


def record(arrays: Arrays) -> ArrayRecord:
    """NumPy arrays by name -> Flower ArrayRecord."""
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def numpy_of(rec: ArrayRecord) -> Arrays:
    """Flower ArrayRecord -> NumPy arrays by name."""
    return {k: v.numpy() for k, v in rec.items()}


def default_train_metrics(site: int) -> dict[str, float]:
    """What site number ``site`` reports after training unless a test says otherwise."""
    return {"num-examples": 10, "train_loss": 1.0}


def default_evaluate_metrics(site: int) -> dict[str, float]:
    """What site number ``site`` reports after evaluating unless a test says otherwise: its
    validation cases and figures that differ from site to site."""
    return {"num-examples": 5, "val_loss": 1.0 / site, "dice": site / (site + 1)}


def spread_seconds(site: int, rnd: int, kind: str) -> float:
    """The default time site number ``site`` takes to answer a ``kind`` message of round
    ``rnd``: a number in [0, 1) s that looks random but is the same in every run, so the sites
    finish in an order that changes from round to round and is rarely the order sent."""
    return random.Random(f"{site}/{rnd}/{kind}").random()


def error_reply(msg: Message, err: BaseException) -> Message:
    """The error reply Flower's simulation engine stores for a ClientApp that raised ``err``
    (``ray_actor.run`` wraps the message in a ``ClientAppException``, ``vce_api.worker`` gives
    its type and message as the reason)."""
    wrapped = ClientAppException(str(err))
    reason = f"{type(wrapped)}:<'{wrapped}'>"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


class FakeGrid(InMemoryGrid):
    """Flower's in-memory Grid with ``num_nodes`` sites, numbered 1..n (``site-<number>``),
    each a Flower node with its own random id (:attr:`nodes`, in site order; :attr:`site_of`
    and :attr:`node_of` map one to the other). A site answers train messages with
    ``respond(site, round, sent)``'s arrays and ``train_metrics(site)``, and evaluate messages
    with ``evaluate_metrics(site)`` (:meth:`answer`; subclasses answer other messages).
    ``seconds(site, round, kind)``: how long a site takes to answer (simulated, not slept: the
    order the replies come back in, and whether they come within the timeout of
    ``send_and_receive``; ``math.inf``: never); default :func:`spread_seconds`. Through
    ``push_messages`` and ``pull_messages`` (a Grid wrapper's own polling), every finite answer
    is there at the first pull, in the order the sites finished. ``sent[round]`` keeps the
    global arrays each round's training received. Needs ``TaskIdentity`` set (the
    ``task_identity`` fixture): the ServerApp's run."""

    def __init__(
        self,
        num_nodes: int,
        respond: Callable[[int, int, Arrays], Arrays],
        train_metrics: Callable[[int], dict[str, float]] = default_train_metrics,
        evaluate_metrics: Callable[[int], dict[str, float]] = default_evaluate_metrics,
        *,
        seconds: Callable[[int, int, str], float] = spread_seconds,
    ) -> None:
        factory = LinkStateFactory(
            FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
        )
        super().__init__(factory, pull_interval=0.01)
        run = _registered_run(self.state)
        self.nodes = [_registered_node(self.state) for _ in range(num_nodes)]
        self.site_of = {node: i for i, node in enumerate(self.nodes, start=1)}
        self.node_of = {i: node for node, i in self.site_of.items()}
        self.set_run(run)
        self.respond = respond
        self.train_metrics = train_metrics
        self.evaluate_metrics = evaluate_metrics
        self.seconds = seconds
        self.sent: dict[int, Arrays] = {}
        #: every reply returned, in the order returned (site number, message type)
        self.arrivals: list[tuple[int, str]] = []
        self._ready: dict[str, tuple[tuple[float, int], Message]] = {}

    def context_of(self, site: int, node_config: dict | None = None) -> Context:
        """A new Flower Context for site number ``site`` in this grid's run, as Flower's
        simulation gives a ClientApp: ``partition-id`` ``site - 1`` and ``num-partitions``
        (``node_config`` added)."""
        config = {"partition-id": site - 1, "num-partitions": len(self.nodes)}
        return Context(
            self.run.run_id, self.node_of[site], {**config, **(node_config or {})}, RecordDict(), {}
        )

    def answer(self, msg: Message, site: int) -> Answer:
        """Site number ``site``'s answer to ``msg`` (the site's own copy of it): a reply, or
        None when the site never answers. Raising is answering with an error, as a ClientApp
        that raises does in Flower."""
        rnd = int(msg.content["config"]["server-round"])
        if msg.metadata.message_type == MessageType.TRAIN:
            sent = numpy_of(msg.content["arrays"])
            self.sent[rnd] = sent
            arrays = record(self.respond(site, rnd, sent))
            return site_reply(msg, f"site-{site}", self.train_metrics(site), arrays)
        return site_reply(msg, f"site-{site}", self.evaluate_metrics(site))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Flower's ``push_messages`` (its checks, its state); then every site takes the
        messages Flower hands it and answers them (:meth:`answer`). Returns the message ids."""
        ids = list(super().push_messages(messages))
        for node in self.nodes:
            for order, msg in enumerate(self.state.get_message_ins(node_id=node, limit=None)):
                reply, seconds = self._answered(msg)
                if reply is not None and seconds != math.inf:
                    self._ready[msg.metadata.message_id] = ((seconds, order), reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Flower's ``pull_messages`` once the sites' answers to ``message_ids`` are in its
        state: the replies there are, in the order the sites finished."""
        ids = list(message_ids)
        for msg_id in sorted((i for i in ids if i in self._ready), key=self._finish):
            reply = self._ready[msg_id][1]
            if self.state.store_message_res(reply) is None:  # Flower would drop it, logged
                raise AssertionError(f"Flower's state refuses this reply (see its log): {reply}")
        got = sorted(
            super().pull_messages(ids), key=lambda m: self._finish(m.metadata.reply_to_message_id)
        )
        for msg_id in ids:
            self._ready.pop(msg_id, None)
        self.arrivals += [
            (self.site_of.get(m.metadata.src_node_id, 0), m.metadata.message_type) for m in got
        ]
        return got

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Flower's ``send_and_receive``: push ``messages``, and return the sites' replies in
        the order they finish, leaving out those that took longer than ``timeout`` seconds.
        A site that never answers, with no timeout, would hang Flower's Grid for ever: that
        fails the test."""
        waiting = set(self.push_messages(messages))
        replies: list[Message] = []
        for msg_id in sorted((i for i in waiting if i in self._ready), key=self._finish):
            if timeout is not None and self._ready[msg_id][0][0] > timeout:
                break  # Flower's Grid stops waiting; the late replies stay in its state
            got = list(self.pull_messages([msg_id]))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
        if waiting and timeout is None:
            raise AssertionError(
                f"{len(waiting)} message(s) never answered and no timeout: Flower's Grid "
                "would wait for ever"
            )
        return replies

    def _finish(self, msg_id: str) -> tuple[float, int]:
        """When the reply to message ``msg_id`` came (simulated seconds, then its place in
        its site's queue); replies Flower made itself (a message expired) last."""
        return self._ready[msg_id][0] if msg_id in self._ready else (math.inf, 0)

    def _answered(self, msg: Message) -> tuple[Answer, float]:
        """The site's reply to the message Flower handed it (its own copy, as a site behind
        Ray or the network has) with a message id, and the seconds it took."""
        site = self.site_of[msg.metadata.dst_node_id]
        own = copy.deepcopy(msg)
        try:
            reply = self.answer(own, site)
        except Exception as err:  # what Flower's worker does with a ClientApp that raised
            reply = error_reply(own, err)
        if reply is not None:
            reply.metadata.__dict__["_message_id"] = str(uuid4())  # as vce_api.worker does
        rnd = 0
        if msg.has_content() and "config" in msg.content.config_records:
            rnd = int(msg.content["config"].get("server-round", 0))
        return reply, self.seconds(site, rnd, msg.metadata.message_type)


def _registered_run(state: object) -> Run:
    """A run registered in Flower's in-memory ``state`` the way ``run_simulation`` registers
    its own: the ServerApp's run id (``TaskIdentity.run_id``; a random one when unset)."""
    run_id = TaskIdentity._run_id or generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)  # type: ignore[attr-defined]
    task = Task(task_id=run.primary_task_id, run_id=run.run_id)
    state.task_store[run.primary_task_id] = task  # type: ignore[attr-defined]
    return run


def _registered_node(state: object) -> int:
    """A new node in ``state``, online for ever, as Flower's simulation registers each virtual
    SuperNode (``vce_api._register_nodes``); returns the id Flower drew for it."""
    node_id = state.create_node(  # type: ignore[attr-defined]
        NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, uuid4().bytes, heartbeat_interval=HEARTBEAT_INTERVAL_INF
    )
    state.acknowledge_node_heartbeat(  # type: ignore[attr-defined]
        node_id=node_id, heartbeat_interval=HEARTBEAT_INTERVAL_INF
    )
    assert node_id != SUPERLINK_NODE_ID
    return node_id


class FakeTrainer:
    """Stands in for a site's SiteTrainer with a model whose training is exact: every epoch is
    one gradient step (learning rate 1) on the loss ``-shift * sum(w)`` (each float weight moves
    by ``shift``; with ``jitter``, by ``shift`` times a factor in [0.5, 1.5) drawn per entry from
    the weights at the start of :meth:`fit`, so each round's update differs) plus the
    ``extra_loss`` :meth:`fit` is given (FedProx's proximal term pulls the weights back towards
    the global ones from the second epoch on). ``epochs`` epochs of plain training move a
    weight by ``epochs * shift``; with FedProx's ``mu`` by ``shift * (1 - (1 - mu)^epochs) /
    mu``. ``fits`` keeps the epochs of every call."""

    name = "site-1"
    task = SimpleNamespace(device=torch.device("cpu"), amp=False)  # where it "trained"

    def __init__(self, shift: float, *, jitter: bool = False) -> None:
        self.shift = shift
        self.jitter = jitter
        self.model = torch.nn.Module()
        self.buffers: dict[str, torch.Tensor] = {}
        self._keys: list[str] = []
        self.fits: list[int] = []

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Hold a copy of ``state``: float tensors as trainable parameters, others as kept."""
        self.model = torch.nn.Module()
        self.buffers = {}
        for key, value in state.items():
            if value.is_floating_point():
                *path, leaf = key.split(".")
                owner = self.model
                for part in path:  # the dotted names of a real model's state dict
                    if not hasattr(owner, part):
                        owner.add_module(part, torch.nn.Module())
                    owner = getattr(owner, part)
                owner.register_parameter(leaf, torch.nn.Parameter(value.detach().clone()))
            else:
                self.buffers[key] = value.clone()
        self._keys = list(state)

    def fit(
        self,
        epochs: int,
        *,
        seed: int = 0,
        extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> object:
        """Train ``epochs`` epochs in place (see the class); returns the last epoch's loss and
        4 samples."""
        self.fits.append(epochs)
        params = dict(self.model.named_parameters())
        if self.jitter:
            start = torch.cat([p.detach().ravel() for p in params.values()])
            rng = np.random.default_rng(int(start.sum().item() * 1000) % 2**31)
            factors = {
                k: torch.from_numpy(rng.uniform(0.5, 1.5, size=tuple(p.shape))).float()
                for k, p in params.items()
            }
        else:
            factors = {k: torch.ones_like(p) for k, p in params.items()}
        loss = torch.zeros(())
        for epoch in range(epochs):
            self.model.zero_grad()
            loss = sum(-(self.shift * factors[k] * p).sum() for k, p in params.items())
            if extra_loss is not None:
                loss = loss + extra_loss(self.model)
            loss.backward()
            with torch.no_grad():
                for p in params.values():
                    p -= p.grad
            if log is not None:
                log(f"epoch {epoch + 1}/{epochs}: loss {float(loss.detach()):.4f} (4 samples)")
        return SimpleNamespace(loss=float(loss.detach()), num_samples=4)

    def state(self) -> dict[str, torch.Tensor]:
        """The weights now, by their names in the state loaded."""
        params = {k: p.detach().clone() for k, p in self.model.named_parameters()}
        return {k: self.buffers[k] if k in self.buffers else params[k] for k in self._keys}
