"""A site's privacy ledger: every DP-SGD step taken on its data, over every run, in a file the
site keeps in its own state folder.

A patient's privacy budget is spent by every run that trains on the patient's case, so the
ledger outlives a run, a resumed run and a restarted SuperNode; it is never taken from the
coordinator (a coordinator that carried the ledger could claim fewer steps or a larger noise).
One entry per run (keyed by the run's key, which a resumed run shares with the runs it
continues): the noise multiplier, the sample rate and the noised steps taken. The epsilon over
all entries is the composition of every entry's sampled Gaussian mechanism, by Opacus'
accountant (RDP or PRV, which take such a history as it is).

Format (ours: JSON, written atomically, read again at every use, the read-modify-write under an
exclusive ``flock`` so that two processes serving the same site never lose a step):
``{"format": 1, "site": NAME, "entries": [{"run": KEY, "noise": s, "sample_rate": q,
"steps": n}, ...]}``. A file that does not read back stops the site's training with its name:
a budget is never silently reset.
"""

from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fl_imaging.common.atomic import write_atomically

__all__ = ["LEDGER_FILE", "LedgerEntry", "LedgerError", "SiteLedger"]

LEDGER_FILE = "privacy-ledger.json"
_FORMAT = 1


class LedgerError(RuntimeError):
    """The ledger file cannot be read or written; names the file and what to do."""


@dataclass(frozen=True)
class LedgerEntry:
    """The DP-SGD training of one run on the site's data: ``run`` (its key), the noise
    multiplier, the Poisson sample rate and the number of noised steps."""

    run: str
    noise: float
    sample_rate: float
    steps: int


class SiteLedger:
    """The ledger file ``path`` of site ``site`` (see the module)."""

    def __init__(self, path: Path, site: str) -> None:
        self.path = Path(path)
        self.site = site

    def entries(self) -> list[LedgerEntry]:
        """Every entry, read from the file now (none when the file does not exist yet). Raises
        :class:`LedgerError` naming the file when it does not read back."""
        if not self.path.exists():
            return []
        try:
            content = json.loads(self.path.read_text())
            if content.get("format") != _FORMAT:
                raise ValueError(f"format {content.get('format')!r}, expected {_FORMAT}")
            entries = [
                LedgerEntry(
                    str(e["run"]), float(e["noise"]), float(e["sample_rate"]), int(e["steps"])
                )
                for e in content["entries"]
            ]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise LedgerError(
                f"[site {self.site}] its privacy ledger {self.path} does not read back ({err}): "
                "the site cannot tell how much of its patients' privacy budget is spent, so it "
                "does not train; restore the file from a backup"
            ) from None
        for entry in entries:
            if not (entry.noise > 0 and 0 < entry.sample_rate <= 1 and entry.steps >= 0):
                raise LedgerError(
                    f"[site {self.site}] its privacy ledger {self.path} holds an impossible "
                    f"entry {entry}; restore the file from a backup"
                )
        return entries

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        with lock.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def record(self, entry: LedgerEntry) -> None:
        """Set ``entry.run``'s entry to ``entry`` (its steps never fewer than recorded), in one
        atomic write. Raises :class:`LedgerError` when the file cannot be read or written, or
        when the run's noise or sample rate would change."""
        with self._locked():
            entries = self.entries()
            kept = [e for e in entries if e.run != entry.run]
            for old in entries:
                if old.run == entry.run:
                    same = math.isclose(old.noise, entry.noise, rel_tol=1e-12) and math.isclose(
                        old.sample_rate, entry.sample_rate, rel_tol=1e-12
                    )
                    if not same or entry.steps < old.steps:
                        raise LedgerError(
                            f"[site {self.site}] run {entry.run} trained with noise {old.noise:g}"
                            f" at sample rate {old.sample_rate:g} for {old.steps} steps; it "
                            f"cannot become noise {entry.noise:g}, rate {entry.sample_rate:g}, "
                            f"{entry.steps} steps"
                        )
            content = {
                "format": _FORMAT,
                "site": self.site,
                "entries": [asdict(e) for e in [*kept, entry]],
            }
            data = (json.dumps(content, indent=1) + "\n").encode()
            try:
                write_atomically(self.path, lambda handle: handle.write(data))
            except OSError as err:
                raise LedgerError(
                    f"[site {self.site}] cannot write its privacy ledger {self.path}: {err}; "
                    "the site does not train without recording the steps"
                ) from None


def history(entries: Sequence[LedgerEntry]) -> list[tuple[float, float, int]]:
    """The entries as an Opacus accountant's history: ``(noise, sample rate, steps)`` each,
    entries without a step left out."""
    return [(e.noise, e.sample_rate, e.steps) for e in entries if e.steps > 0]
