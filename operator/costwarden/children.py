"""Child processes that never outlive the process that started them.

Tests, benchmarks and the demo start real processes (control plane, operator, gateway).
If the parent is SIGKILLed, or a fixture fails before its cleanup, nothing else would stop
them, and a forgotten operator keeps writing to the next run's cluster. Linux can deliver
a signal to a child when its parent dies (``PR_SET_PDEATHSIG``); this sets it up.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# Loaded once, before any fork: a preexec function should do as little as possible.
_LIBC: Any = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def exit_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen` that has the child receive ``sig``
    when its parent thread exits; None where the platform cannot (then: best effort)."""
    if _LIBC is None:
        return None
    libc = _LIBC

    def arrange() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return arrange


def terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (a graceful exit: flush usage, leave the peering), then SIGKILL once
    ``timeout`` has passed; returns when the process is gone."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("pid %d ignored SIGTERM for %.0fs, killing it", process.pid, timeout)
        process.kill()
        process.wait()
