"""Which teams' usage the operator is holding right now, and how much: the in-memory view
ingestion keeps (``controllers/ingest.py``) and the reconciler turns into the TeamBudget's
``UsageApplied`` condition (``policy/status.py``).

A team is held by a gateway (a usage *source*) from the batch whose entries of that team
could not be written until a batch from the same source applies entries of that team
again (the gateway re-sends its held entries first, in order). What one process has not
seen it does not know: after a leader change the new leader knows a team only once a
batch touches it, and the condition is left as written until then.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class HeldSummary:
    """A team's held usage as this process knows it; ``entries`` 0: none held (any more)."""

    entries: int = 0
    sources: int = 0
    reason: str = ""
    message: str = ""


@dataclass
class _Hold:
    entries: int
    reason: str
    message: str


class HeldUsage:
    """Written by ingestion (its own thread) and read by the reconciler (Kopf's loop)."""

    def __init__(self) -> None:
        self._holds: dict[str, dict[str, _Hold]] = {}  # team -> source -> hold
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def hold(self, team: str, source: str, entries: int, reason: str, message: str) -> bool:
        """A batch from ``source`` had ``entries`` of ``team`` held; True if that is news
        (the team was not held by that source before)."""
        with self._lock:
            return self._hold(team, source, _Hold(entries, reason, message))

    def _hold(self, team: str, source: str, hold: _Hold) -> bool:
        self._known.add(team)
        by_source = self._holds.setdefault(team, {})
        new = source not in by_source
        by_source[source] = hold
        return new

    def applied(self, team: str, source: str) -> bool:
        """A batch from ``source`` applied entries of ``team``; True if that ended a hold
        (or is the first this process learns of the team: its condition may be stale)."""
        with self._lock:
            return self._applied(team, source)

    def _applied(self, team: str, source: str) -> bool:
        first = team not in self._known
        self._known.add(team)
        by_source = self._holds.get(team)
        if by_source is None or source not in by_source:
            return first
        del by_source[source]
        if not by_source:
            del self._holds[team]
        return True

    def summary(self, team: str) -> HeldSummary | None:
        """None: this process knows nothing of the team (leave its condition as it is)."""
        with self._lock:
            if team not in self._known:
                return None
            holds = list(self._holds.get(team, {}).values())
        if not holds:
            return HeldSummary()
        latest = holds[-1]
        return HeldSummary(
            entries=sum(h.entries for h in holds),
            sources=len(holds),
            reason=latest.reason,
            message=latest.message,
        )
