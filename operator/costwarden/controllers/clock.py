"""The operator's clock, shiftable for tests: ``--clock-offset SECONDS`` (or the environment
variable ``COSTWARDEN_CLOCK_OFFSET_SECONDS``) moves "now" for everything that decides by
time (periods, rollover, status timestamps), so a period boundary can be reached in a
test without waiting for midnight. Production runs with offset 0.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

ENV_OFFSET = "COSTWARDEN_CLOCK_OFFSET_SECONDS"

_offset = timedelta(seconds=float(os.environ.get(ENV_OFFSET) or 0))


def set_offset(seconds: float) -> None:
    global _offset
    _offset = timedelta(seconds=seconds)


def now() -> datetime:
    return datetime.now(UTC) + _offset
