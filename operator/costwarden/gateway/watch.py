"""A small file that is re-read when it changes (labels file, API keys file).

Checked at most once per :data:`CHECK_SECONDS` on use (a ``stat`` call), so the request
path pays nothing in between; a file that fails to parse keeps the previous value.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger("costwarden.gateway.watch")

CHECK_SECONDS = 1.0
_T = TypeVar("_T")


class PolledFile(Generic[_T]):
    def __init__(self, path: Path | None, parse: Callable[[str], _T], *, default: _T) -> None:
        self._path = path
        self._parse = parse
        self.value: _T = default
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self.refresh(force=True)

    def refresh(self, *, force: bool = False) -> bool:
        """Re-read if due and changed; True if the value changed."""
        if self._path is None:
            return False
        now = time.monotonic()
        if not force and now - self._checked < CHECK_SECONDS:
            return False
        self._checked = now
        try:
            st = os.stat(self._path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return False
            value = self._parse(self._path.read_text())
        except (OSError, ValueError) as exc:
            log.error("cannot read %s, keeping the previous value: %s", self._path, exc)
            return False
        self._stamp, self.value = stamp, value
        return True
