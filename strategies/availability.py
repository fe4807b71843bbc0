"""Sites that come and go: wait for enough of them, note who dropped, go on without them.

Flower 1.41 (checked in its source, ``flwr/serverapp/strategy``): a strategy samples its sites
with ``sample_nodes``, which waits *without end* until ``min_available_nodes`` SuperNodes are
connected; ``grid.send_and_receive(timeout=...)`` then waits until every sampled site replied or
the round's timeout passed, and returns the replies it has. A SuperNode that dies mid-round
sends nothing: its heartbeats stop, and after twice its heartbeat interval (2 x 30 s) the
SuperLink marks it offline and answers for it with an error reply ("Node Unavailable"). A site
that misses ``engine.round_timeout`` has no reply at all, so the strategy never hears of it.

This wrapper (ours) sits between the recorder and the strategy and adds what the run needs:

- before each round it waits up to ``engine.wait_timeout`` seconds for ``min_sites``
  connected sites, then raises :class:`NotEnoughSites` (the ServerApp stops there, with the
  checkpoint of the last finished round);
- it learns each SuperNode's site name from its replies, renames the recorder's
  ``node-<id>`` failures to that name (an error reply has no site record), and records a site
  that did not reply at all;
- with ``engine.min_sites`` set, a training round with fewer usable replies gives no aggregate
  (the global model is kept) instead of averaging a handful of sites; without it, whatever
  arrived is aggregated, as Flower does.

A site that comes back is connected again, so the next round samples it as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_imaging.flower.protocol import ReplySites
from fl_imaging.review.results import Failure
from strategies.wrapper import StrategyWrapper

__all__ = ["NotEnoughSites", "SiteAvailability"]

log = logging.getLogger("fl_imaging.server")


class NotEnoughSites(RuntimeError):
    """Fewer sites than the minimum were connected for ``engine.wait_timeout`` seconds."""


class SiteAvailability(StrategyWrapper):
    """Wraps ``inner``: waits for ``min_sites`` connected sites before each round (at most
    ``wait_timeout`` seconds), names sites that failed or never replied in ``failures()``, and
    skips aggregation when fewer than ``min_replies`` training replies are usable.

    ``site_names`` is extended with every site name first seen in a reply (the ServerApp's table
    and progress lines show them); ``failures`` returns the list to append to (the recorder's);
    ``sites`` names the site behind a reply (shared with the other layers of the chain).
    """

    #: Run bookkeeping, not aggregation state: nothing of it goes into a checkpoint.
    checkpointed = False

    def __init__(
        self,
        inner: Strategy,
        *,
        min_sites: int,
        min_replies: int = 1,
        wait_timeout: float,
        round_timeout: float,
        site_names: list[str],
        failures: Callable[[], list[Failure]],
        poll_seconds: float = 1.0,
        sites: ReplySites | None = None,
    ) -> None:
        super().__init__(inner)
        self.min_sites = min_sites
        self.min_replies = min_replies
        self.wait_timeout = wait_timeout
        self.round_timeout = round_timeout
        self.site_names = site_names
        self.failures = failures
        self.poll_seconds = poll_seconds
        self.sites = sites or ReplySites()
        self._sent: dict[str, set[int]] = {"train": set(), "evaluate": set()}

    def wait_for_sites(self, grid: Grid, server_round: int) -> int:
        """Wait until ``min_sites`` sites are connected; returns how many are. Raises
        :class:`NotEnoughSites` after ``wait_timeout`` seconds."""
        deadline = time.monotonic() + self.wait_timeout
        shown = -1
        while True:
            connected = len(list(grid.get_node_ids()))
            if connected >= self.min_sites:
                return connected
            if connected != shown:
                log.warning(
                    "round %d: %d site(s) connected, waiting up to %.0f s for %d "
                    "(engine.min_sites)",
                    server_round,
                    connected,
                    self.wait_timeout,
                    self.min_sites,
                )
                shown = connected
            if time.monotonic() >= deadline:
                raise NotEnoughSites(
                    f"stopped before round {server_round}: only {connected} site(s) connected "
                    f"after waiting engine.wait_timeout={self.wait_timeout:g} s, and a round "
                    f"needs engine.min_sites={self.min_sites}. Start the missing SuperNodes "
                    "(fl-imaging-deploy supernode ...), then go on from the last finished round "
                    "with resume=RUN_DIR"
                )
            time.sleep(self.poll_seconds)

    def _sent_to(self, phase: str, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self._sent[phase] = {m.metadata.dst_node_id for m in messages}
        return messages

    def _note_replies(self, server_round: int, replies: list[Message], phase: str) -> int:
        """Learn site names, name failed sites, record silent ones; returns usable replies."""
        usable = 0
        new: set[str] = set()
        for msg in replies:
            name = self.sites(msg)
            if not msg.has_error():
                usable += 1
                if name not in self.site_names:
                    new.add(name)
        self.site_names.extend(sorted(new))
        failures = self.failures()
        replied = {m.metadata.src_node_id for m in replies}
        silent, self._sent[phase] = self._sent[phase] - replied, set()
        for node_id in sorted(silent):
            reason = (
                f"no {phase} reply within engine.round_timeout={self.round_timeout:g} s "
                "(site disconnected or too slow)"
            )
            failures.append((server_round, self.sites.of_node(node_id), reason))
            log.warning("round %d: site %s: %s", server_round, self.sites.of_node(node_id), reason)
        return usable

    def _name_failures(self) -> None:
        """Give failures recorded as ``node-<id>`` (error replies carry no site record) the
        site name that node's earlier replies gave."""
        failures = self.failures()
        for i, (rnd, site, reason) in enumerate(failures):
            node = site.removeprefix("node-")
            if node.isdigit() and int(node) in self.sites.names:
                name = self.sites.of_node(int(node))
                failures[i] = (rnd, name, reason.replace(f"site {site} ", f"site {name} "))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.wait_for_sites(grid, server_round)
        return self._sent_to(
            "train", self.inner.configure_train(server_round, arrays, config, grid)
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        usable = self._note_replies(server_round, replies, "train")
        if usable < self.min_replies:
            self._name_failures()
            log.warning(
                "round %d: %d usable update(s), fewer than engine.min_sites=%d: no aggregate, "
                "the global model is kept",
                server_round,
                usable,
                self.min_replies,
            )
            return None, None
        result = self.inner.aggregate_train(server_round, replies)
        self._name_failures()  # the update checks record error replies too
        return result

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.wait_for_sites(grid, server_round)
        return self._sent_to(
            "evaluate", self.inner.configure_evaluate(server_round, arrays, config, grid)
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self._note_replies(server_round, replies, "evaluate")
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        self._name_failures()
        return metrics
