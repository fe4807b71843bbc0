"""Secure aggregation's own cost per round, without training: the coordinator
(:class:`fl_imaging.secagg.coordinator.SecureAggregation` around FedAvg) and N sites running the
real handlers of :mod:`fl_imaging.secagg.site` in this process, each with its own
identity and Flower context. For ``scripts/bench_secagg.py``: the seconds each stage takes
(keys, shares, masking with the decryption of the shares, unmasking at the sites and at the
coordinator) for 3, 10 and 50 sites.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fl_imaging.config import SecAggConfig, StrategyConfig
from fl_imaging.flower.protocol import site_reply
from fl_imaging.secagg.site import SECAGG_STAGES, SecAggGuard, mask_reply
from fl_imaging.site.identity import SiteIdentity
from strategies import build_strategy

__all__ = ["stage_seconds"]


class LoopbackSites(Grid):
    """Nodes 1..n answering with the sites' real handlers; ``seconds[stage]`` adds up the time
    the sites spent on each stage (``train``: masking only, the update is made up)."""

    def __init__(self, sites: int) -> None:
        self.nodes = list(range(1, sites + 1))
        keys = {n: ec.generate_private_key(ec.SECP384R1()) for n in self.nodes}
        roster = {f"site-{n}": k.public_key() for n, k in keys.items()}
        self.guards = {n: SecAggGuard(SiteIdentity(f"site-{n}", keys[n], roster)) for n in keys}
        self.contexts = {n: Context(1, n, {}, RecordDict(), {}) for n in self.nodes}
        self.seconds: dict[str, float] = defaultdict(float)
        self.rng = np.random.default_rng(0)

    def set_run(self, run: object) -> None:  # type: ignore[override]
        raise NotImplementedError

    @property
    def run(self) -> object:  # type: ignore[override]
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:  # type: ignore[override]
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            if kind.startswith("query."):
                start = time.perf_counter()
                reply = SECAGG_STAGES[kind[6:]](msg, self.contexts[node], self.guards[node])
                self.seconds[kind[6:]] += time.perf_counter() - start
            else:
                sent = msg.content["arrays"]
                local = {
                    k: Array(v.numpy() + 0.01 * self.rng.standard_normal(v.numpy().shape, "f4"))
                    for k, v in sent.items()
                }
                plain = site_reply(msg, f"site-{node}", {"num-examples": 10}, ArrayRecord(local))
                start = time.perf_counter()
                reply = mask_reply(msg, plain, self.contexts[node], self.guards[node])
                self.seconds["masking"] += time.perf_counter() - start
            replies.append(reply)
        return replies


def stage_seconds(sites: int, size: int, rounds: int = 2) -> dict[str, float]:
    """Mean seconds per round of each stage for ``sites`` sites and a model of ``size``
    floats: summed over the sites (``secagg_keys``, ``secagg_shares``, ``masking``,
    ``secagg_unmask``) and the coordinator's whole round (``coordinator``: its own work, the
    sites' excluded)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    strategy = build_strategy(
        StrategyConfig(name="fedavg", secagg=SecAggConfig(enabled=True)), num_sites=sites
    )
    grid = LoopbackSites(sites)
    arrays = ArrayRecord({"w": Array(np.zeros(size, np.float32))})
    total = 0.0
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        messages = strategy.configure_train(rnd, arrays, ConfigRecord(), grid)
        result, _ = strategy.aggregate_train(rnd, grid.send_and_receive(messages))
        total += time.perf_counter() - start
        if result is None:
            raise RuntimeError(f"round {rnd} with {sites} sites gave no aggregate")
        arrays = result
    per_round = {k: v / rounds for k, v in grid.seconds.items()}
    per_round["coordinator"] = total / rounds - sum(per_round.values())
    return per_round
