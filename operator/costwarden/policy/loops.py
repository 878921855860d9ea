"""The retry-loop heuristic (pure, clock injected): is this job repeating itself?

A job trips when it sends ``identicalRequests`` requests with the same fingerprint within
``windowSeconds``, or gets ``consecutiveErrors`` upstream errors in a row. The request that
reaches the threshold is refused, and so is every request of the job for one window after
the trip (the operator suspends the job meanwhile; a resumed job starts afresh once the
window has passed).

The fingerprint is a hash of the request with the parts that do not change what is asked
removed (stream flags, metadata, user ids, sampling knobs that agents jitter) and
whitespace runs in text collapsed, so an agent resending the same conversation is
recognised while two different questions never are.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from costwarden.api.teambudget import LoopDetection
from costwarden.api.usage import LoopKind

# Keys that vary between retries of the same request without changing what is asked.
VOLATILE_KEYS = frozenset(
    {"stream", "stream_options", "metadata", "user", "seed", "temperature", "top_p", "n"}
)
_SPACES = re.compile(r"\s+")


def _normalize(value: Any) -> Any:
    if isinstance(value, str):
        return _SPACES.sub(" ", value).strip()
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    return value


def fingerprint(body: dict[str, Any]) -> str:
    """A short stable hash of what the request asks (see module docstring)."""
    kept = {k: _normalize(v) for k, v in body.items() if k not in VOLATILE_KEYS}
    return hashlib.sha256(orjson.dumps(kept, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class LoopTrip:
    kind: LoopKind
    count: int
    fingerprint: str
    new: bool
    """True only for the request that tripped it (emit one signal, not one per refusal)."""


# Requests remembered per job; beyond this the oldest are forgotten early (a job sending more
# than this many requests per window is throttled by maxRequestsPerMinute, not by this).
MAX_REMEMBERED = 10_000


@dataclass
class LoopState:
    """One job's recent requests, oldest first, and their counts per fingerprint."""

    order: deque[tuple[float, str]] = field(default_factory=deque)
    counts: dict[str, int] = field(default_factory=dict)
    errors_in_a_row: int = 0
    tripped_until: float = 0.0
    tripped: LoopTrip | None = None

    def forget_before(self, horizon: float) -> None:
        while self.order and (self.order[0][0] < horizon or len(self.order) > MAX_REMEMBERED):
            _, old = self.order.popleft()
            left = self.counts[old] - 1
            if left:
                self.counts[old] = left
            else:
                del self.counts[old]

    def forget_window(self) -> int:
        """Forget every remembered request (not the trip or the error count); how many."""
        dropped = len(self.order)
        self.order.clear()
        self.counts.clear()
        return dropped

    def reset(self) -> None:
        self.order.clear()
        self.counts.clear()
        self.errors_in_a_row = 0
        self.tripped = None


def check_request(
    state: LoopState, settings: LoopDetection, fp: str, now: float
) -> LoopTrip | None:
    """Record a request; return the trip if the job is (now) looping."""
    if not settings.enabled:
        return None
    if state.tripped is not None:
        if now < state.tripped_until:
            return LoopTrip(
                state.tripped.kind, state.tripped.count, state.tripped.fingerprint, False
            )
        state.reset()
    if state.errors_in_a_row >= settings.consecutive_errors:
        return _trip(state, settings, LoopKind.CONSECUTIVE_ERRORS, state.errors_in_a_row, fp, now)
    state.order.append((now, fp))
    count = state.counts.get(fp, 0) + 1
    state.counts[fp] = count
    state.forget_before(now - settings.window_seconds)
    count = state.counts.get(fp, 0)
    if count >= settings.identical_requests:
        return _trip(state, settings, LoopKind.IDENTICAL_REQUESTS, count, fp, now)
    return None


def record_outcome(state: LoopState, *, upstream_error: bool) -> None:
    """Count upstream errors in a row; any success resets the count."""
    state.errors_in_a_row = state.errors_in_a_row + 1 if upstream_error else 0


def _trip(
    state: LoopState, settings: LoopDetection, kind: LoopKind, count: int, fp: str, now: float
) -> LoopTrip:
    state.tripped = LoopTrip(kind, count, fp, False)
    state.tripped_until = now + settings.window_seconds
    return LoopTrip(kind, count, fp, True)
