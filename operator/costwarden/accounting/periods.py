"""Period rollover (pure): at the boundary, in the budget's time zone, the books restart.

Both writers of a TeamBudget's status call :func:`rollover_fragment`: the reconciler on
every pass (so a budget without traffic still rolls over, and a new budget gets its first
period), and the ingestion before applying usage. Both patches are guarded by the
object's resourceVersion and the function is idempotent (the closed period is appended to
history once, keyed by its start), so whichever lands first wins and the other is a no-op.
The de-duplication cursors are carried over: they guard the sources, not a period.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from costwarden.accounting.books import Books, is_behind, timestamp


def rollover_fragment(status: Mapping[str, Any], start: datetime, end: datetime) -> dict[str, Any]:
    """The status patch that opens period [start, end), or {} if status is already in it."""
    window = status.get("currentPeriod") or {}
    if isinstance(window, Mapping) and window.get("start") == timestamp(start):
        return {}
    if is_behind(status, start):
        return {}  # another writer with a clock ahead of ours already rolled over
    return Books.read(status, start, end).fragment()
