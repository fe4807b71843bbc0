"""Stand-ins for Flower's runtime, shared by the tests that drive strategies without a SuperLink:
array helpers and a Grid whose nodes answer with hand-made arrays, in the replies the real
ClientApp sends (:func:`fl_imaging.flower.protocol.site_reply`: a site record, ``unit-weight``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType
from flwr.serverapp import Grid

from fl_imaging.flower.protocol import site_reply

Arrays = dict[str, np.ndarray]


def record(arrays: Arrays) -> ArrayRecord:
    """NumPy arrays by name -> Flower ArrayRecord."""
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def numpy_of(rec: ArrayRecord) -> Arrays:
    """Flower ArrayRecord -> NumPy arrays by name."""
    return {k: v.numpy() for k, v in rec.items()}


def default_train_metrics(node: int) -> dict[str, float]:
    """What a site reports after training unless a test says otherwise."""
    return {"num-examples": 10, "train_loss": 1.0}


def default_evaluate_metrics(node: int) -> dict[str, float]:
    """What a site reports after evaluating unless a test says otherwise: its validation cases
    and figures that differ from site to site."""
    return {"num-examples": 5, "val_loss": 1.0 / node, "dice": node / (node + 1)}


class FakeGrid(Grid):
    """Nodes ``1..n``, sites ``site-<node>``, that answer train messages with
    ``respond(node, round, sent)``'s arrays and ``train_metrics(node)``, and evaluate messages
    with ``evaluate_metrics(node)``. ``sent[round]`` keeps the global arrays each round's
    training received."""

    def __init__(
        self,
        num_nodes: int,
        respond: Callable[[int, int, Arrays], Arrays],
        train_metrics: Callable[[int], dict[str, float]] = default_train_metrics,
        evaluate_metrics: Callable[[int], dict[str, float]] = default_evaluate_metrics,
    ) -> None:
        self.nodes = list(range(1, num_nodes + 1))
        self.respond = respond
        self.train_metrics = train_metrics
        self.evaluate_metrics = evaluate_metrics
        self.sent: dict[int, Arrays] = {}

    def set_run(self, run: object) -> None:  # type: ignore[override]
        raise NotImplementedError

    @property
    def run(self) -> object:  # type: ignore[override]
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:  # type: ignore[override]
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            rnd = int(msg.content["config"]["server-round"])
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == MessageType.TRAIN:
                sent = numpy_of(msg.content["arrays"])
                self.sent[rnd] = sent
                arrays = record(self.respond(node, rnd, sent))
                replies.append(site_reply(msg, f"site-{node}", self.train_metrics(node), arrays))
            else:
                replies.append(site_reply(msg, f"site-{node}", self.evaluate_metrics(node)))
        return replies


class FakeTrainer:
    """Stands in for a site's SiteTrainer: "training" adds ``shift`` to every float weight, or
    with ``jitter`` ``shift`` times a uniform factor in [0.5, 1.5) drawn per entry from the
    weights themselves (so each round's update differs)."""

    name = "site-1"
    task = SimpleNamespace(device=torch.device("cpu"), amp=False)  # where it "trained"

    def __init__(self, shift: float, *, jitter: bool = False) -> None:
        self.shift = shift
        self.jitter = jitter
        self.weights: dict[str, torch.Tensor] = {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.weights = {k: v.clone() for k, v in state.items()}

    def fit(self, epochs: int, **kwargs: object) -> object:
        if self.jitter:
            rng = np.random.default_rng(int(self.weights["w"].sum().item() * 1000) % 2**31)
            self.weights = {
                k: v + self.shift * torch.from_numpy(rng.uniform(0.5, 1.5, size=v.shape)).float()
                for k, v in self.weights.items()
            }
        else:
            self.weights = {k: v + self.shift for k, v in self.weights.items()}
        return type("Result", (), {"loss": 0.5, "num_samples": 4})()

    def state(self) -> dict[str, torch.Tensor]:
        return self.weights
