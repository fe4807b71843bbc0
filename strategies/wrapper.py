"""A strategy that hands every call to the strategy it wraps, for wrappers to build on.

Ours: Flower 1.41 (``flwr/serverapp/strategy``) has no delegating base class; its DP wrappers
each subclass ``Strategy`` and forward ``configure_evaluate``, ``aggregate_evaluate`` and
``summary`` to their ``strategy`` attribute by hand. Our wrappers subclass
:class:`StrategyWrapper` and override only the calls they change. :func:`wrapper_chain` follows
both attributes, ``inner`` (ours) and ``strategy`` (Flower's DP wrappers).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.arrays import Arrays, to_numpy

__all__ = ["SentArraysWrapper", "StrategyWrapper", "wrapper_chain"]


class StrategyWrapper(Strategy):
    """Wraps ``inner`` (any Flower ``Strategy``) and passes every call on to it unchanged.

    ``configure_train``, ``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate`` and
    ``summary`` return ``inner``'s; ``start`` is Flower's, so it runs the rounds through the
    wrapper's own methods.
    """

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Return ``inner``'s train messages."""
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Return ``inner``'s aggregate of the train replies."""
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Return ``inner``'s evaluate messages."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Return ``inner``'s aggregate of the evaluate replies."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log ``inner``'s summary."""
        self.inner.summary()


class SentArraysWrapper(StrategyWrapper):
    """A wrapper that works on the sites' updates: ``configure_train`` keeps the global arrays
    sent this round in ``sent`` (name -> NumPy array; None before the first round), so that
    ``aggregate_train`` can compare each reply with them."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.sent: Arrays | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global ``arrays`` sent this round; return ``inner``'s train messages."""
        self.sent = to_numpy(arrays)
        return self.inner.configure_train(server_round, arrays, config, grid)


def wrapper_chain(strategy: Strategy) -> list[Any]:
    """``strategy`` and every strategy it wraps, outermost first, found by following the
    ``inner`` (ours) or ``strategy`` (Flower's DP wrappers) attribute of each."""
    chain: list[Any] = []
    node: Any = strategy
    while node is not None and node not in chain:
        chain.append(node)
        node = getattr(node, "inner", None) or getattr(node, "strategy", None)
    return chain
