"""What the console knows of a running federation, updated from its progress events.

:class:`RunView` holds, from the :class:`~fl_imaging.console.events.Progress` events of
:mod:`.events`: the rounds (done, in progress, how far the current one is), each site's state
(waiting for its message, training with its epoch, evaluating, done, failed) and the last
round's progress line. It draws nothing (:mod:`.live_view` does) and depends on no clock, so it
can be tested event by event.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from fl_imaging.console.events import (
    EPOCH,
    REPLY,
    ROUND_ENDED,
    RUN_FINISHED,
    RUN_STARTED,
    SENT,
    Progress,
)

__all__ = [
    "DONE",
    "EVALUATING",
    "FAILED",
    "NOT_ASKED",
    "TRAINING",
    "WAITING",
    "RunView",
    "SiteState",
]

#: A site's states, as the console names them.
NOT_ASKED = "not asked"
WAITING = "waiting"
TRAINING = "training"
EVALUATING = "evaluating"
DONE = "done"
FAILED = "failed"

#: The message types a site's state follows (others, such as secure aggregation's queries,
#: leave it as it is).
_TRAIN, _EVALUATE = "train", "evaluate"


@dataclass
class SiteState:
    """One site's state: ``state`` (one of the constants above), its epoch (``epoch`` of
    ``epochs``, while training) and why it failed (``detail``)."""

    state: str = NOT_ASKED
    epoch: int = 0
    epochs: int = 0
    detail: str = ""

    def describe(self) -> str:
        """The state in words, e.g. ``training, epoch 2/3`` or ``failed: MemoryError``."""
        if self.state == TRAINING and self.epochs:
            return f"{TRAINING}, epoch {self.epoch}/{self.epochs}"
        if self.state == FAILED and self.detail:
            return f"{FAILED}: {self.detail}"
        return self.state

    def share_done(self) -> float:
        """How much of its part of the round this site has done, 0 to 1."""
        if self.state in (DONE, FAILED, EVALUATING):
            return 1.0
        if self.state == TRAINING and self.epochs:
            return min(1.0, self.epoch / self.epochs)
        return 0.0


@dataclass
class RunView:
    """The state of a run as its events tell it; :meth:`apply` takes each event.

    Attributes:
        rounds: the run's rounds (0 until the run starts).
        first_round: the last round done before this run (a resumed run's checkpoint).
        rounds_done: the last round that ended.
        current_round: the round in progress (``rounds_done`` between two rounds).
        sites: each site's state, by name, in the order first heard of.
        last_line: the progress line of the last round that ended.
        started: whether the run started its rounds; ``finished``: whether they are over;
            ``stopped``: why they ended early ('' when they did not).
        phase: what the coordinator asks for now (``training``, ``evaluating``, ``scoring
            test cases``), '' before.
    """

    rounds: int = 0
    first_round: int = 0
    rounds_done: int = 0
    current_round: int = 0
    sites: dict[str, SiteState] = field(default_factory=dict)
    last_line: str = ""
    started: bool = False
    finished: bool = False
    stopped: str = ""
    phase: str = ""
    _names: dict[int, str] = field(default_factory=dict)
    _asked: set[int] = field(default_factory=set)  # nodes asked in this round
    _provisional: dict[int, str] = field(default_factory=dict)  # node -> a site, for now
    _next_unheard: int = 0  # where _unheard_site looks next in this round

    def apply(self, event: Progress) -> None:
        """Update the view with ``event``."""
        if event.site and event.node:
            self._name(event.node, event.site)
        if event.kind == RUN_STARTED:
            self.started = True
            self.rounds, self.first_round = event.rounds, event.round
            self.rounds_done = self.current_round = event.round
            for name in event.sites:
                self.sites.setdefault(name, SiteState())
        elif event.kind == SENT:
            self._sent(event)
        elif event.kind == EPOCH:
            site = self._site(event.site, event.node)
            site.state, site.epoch, site.epochs = TRAINING, event.epoch, event.epochs
        elif event.kind == REPLY:
            self._reply(event)
        elif event.kind == ROUND_ENDED:
            self.rounds_done = max(self.rounds_done, event.round)
            self.rounds = event.rounds or self.rounds
            self.last_line = event.detail
        elif event.kind == RUN_FINISHED:
            self.finished, self.stopped = True, event.detail

    def _sent(self, event: Progress) -> None:
        if event.phase not in (_TRAIN, _EVALUATE):
            return
        if event.phase == _TRAIN and self.current_round <= self.rounds_done:
            # the first training message after a round ended: the next round, every site
            # starts again (Flower's messages carry no round number)
            self.current_round = self.rounds_done + 1
            self._asked.clear()
            self._provisional.clear()
            self._next_unheard = 0
            for site in self.sites.values():
                site.state, site.epoch, site.epochs, site.detail = NOT_ASKED, 0, 0, ""
        if event.phase == _TRAIN:
            self.phase = "training"
        elif self.rounds and self.rounds_done >= self.rounds:
            self.phase = "scoring test cases"  # evaluation after the last round
        else:
            self.phase = "evaluating"
        self._asked.add(event.node)
        name = self._names.get(event.node) or self._provisional.get(event.node)
        if name is None:  # a node not heard from: one of the sites not heard from, for now
            name = self._unheard_site()
            if name is not None:
                self._provisional[event.node] = name
        if name is not None:
            self.sites[name].state = WAITING if event.phase == _TRAIN else EVALUATING

    def _unheard_site(self) -> str | None:
        """A site not asked yet in this round whose node is not known (None when there is
        none); the sites are looked through once per round, in order."""
        names = list(self.sites)
        taken = set(self._names.values()) | set(self._provisional.values())
        while self._next_unheard < len(names):
            name = names[self._next_unheard]
            self._next_unheard += 1
            if self.sites[name].state == NOT_ASKED and name not in taken:
                return name
        return None

    def _reply(self, event: Progress) -> None:
        site = self._site(event.site, event.node)
        if not event.ok:
            site.state, site.detail = FAILED, event.detail
        elif event.phase in (_TRAIN, _EVALUATE):
            site.state = DONE

    def _name(self, node: int, site: str) -> None:
        """Learn that node ``node`` is site ``site``; a site shown for it until then, for
        now, changes places with ``site`` (or is not asked, when ``site`` was not shown)."""
        self._names[node] = site
        self.sites.setdefault(site, SiteState())
        shown = self._provisional.pop(node, None)
        if shown is None or shown == site:
            return
        other = next((n for n, name in self._provisional.items() if name == site), None)
        if other is not None:  # ``site`` stood for another node: ``shown`` does now
            self._provisional[other] = shown
        else:
            self.sites[shown].state = NOT_ASKED

    def _site(self, name: str, node: int) -> SiteState:
        """The state of the site ``name`` (or, unnamed, of node ``node``)."""
        name = name or self._names.get(node) or f"node-{node}"
        return self.sites.setdefault(name, SiteState())

    def completed(self) -> float:
        """Rounds done in all, the current round counted by the share its sites have done
        (for the bar: from ``first_round`` to ``rounds``)."""
        if self.finished or self.current_round <= self.rounds_done:
            return float(max(self.rounds_done, self.first_round))
        shares = [s.share_done() for s in self.sites.values() if s.state != NOT_ASKED]
        shares += [0.0] * self._unshown()
        share = sum(shares) / len(shares) if shares else 0.0
        return self.rounds_done + min(share, 0.99)

    def counts(self) -> Counter[str]:
        """How many sites are in each state (nodes asked that no site stands for yet count as
        ``waiting``)."""
        counts = Counter(s.state for s in self.sites.values())
        counts[WAITING] += self._unshown()
        return counts

    def _unshown(self) -> int:
        """Nodes asked this round that no site of the view stands for."""
        return sum(1 for n in self._asked if n not in self._names and n not in self._provisional)
