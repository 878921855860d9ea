"""Supervised background work, for the operator and the gateway alike.

Every long-running task of either process (the reconciler, the enforcement checks, the
Job watch, the ingestion server, the gateway's configuration watch, its usage reporting
and ledger flushing) runs under a :class:`Supervisor`, which:

- restarts it on any exception (or if it returns, when it should run forever), with an
  exponential backoff from :data:`BACKOFF_INITIAL` to :data:`BACKOFF_MAX` seconds;
- logs once per *incident*: the first failure with its traceback (WARNING), later
  failures of the same incident at DEBUG, the recovery at INFO (with the number of
  restarts and the duration), and once, at ERROR, when the incident outlasts the
  liveness bound;
- counts restarts per task (a Counter) and marks tasks currently failing (a Gauge, 1 while
  an incident lasts), under metric names the caller chooses (one set per component);
- fails liveness (:meth:`Supervisor.problems` is not empty) once a task has been failing
  for longer than ``unhealthy_after`` seconds (:data:`UNHEALTHY_AFTER` by default): the
  kubelet then restarts the container, which is the last resort for a task that cannot
  recover by itself.

An incident ends when the restarted task has run :data:`STABLE_AFTER` seconds without
failing (or, for a task that runs once, when it completes). The bound must stay above
the outages a restart cannot cure: during an API-server outage every task that talks to
it fails, and restarting the pod would only add a cold start to the outage.

The tasks may run on several event loops (the operator's accounting has a loop of its
own): each task is started on the running loop of the caller; the bookkeeping is guarded
by a lock, and :meth:`problems` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("costwarden.supervision")

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
"""Short enough that work resumes within seconds of the API server coming back."""
STABLE_AFTER = 10.0
"""A restarted task that runs this long without failing has recovered."""
UNHEALTHY_AFTER = 180.0
"""Liveness fails once a task has been failing this long (the documented bound)."""

Work = Callable[[], Awaitable[Any]]
Clock = Callable[[], float]


class TaskExitedError(RuntimeError):
    """A task meant to run forever returned."""


@dataclass
class TaskState:
    name: str
    failing_since: float | None = None
    """Monotonic time of the incident's first failure; None when healthy."""
    restarts: int = 0
    """Restarts in the current incident."""
    failures: int = 0
    """Failures since supervision started (a restarted task is quiet if this stays)."""
    total_restarts: int = 0
    last_error: str = ""
    escalated: bool = False
    """Whether the incident's outlasting the liveness bound was logged."""


class Supervisor:
    def __init__(
        self,
        component: str,
        *,
        restarts: Any = None,
        failing: Any = None,
        unhealthy_after: float = UNHEALTHY_AFTER,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        stable_after: float = STABLE_AFTER,
        clock: Clock = time.monotonic,
    ) -> None:
        """``restarts``: a Counter with label ``task``; ``failing``: a Gauge with label
        ``task`` (both optional: unit tests need none)."""
        self.component = component
        self._restarts = restarts
        self._failing = failing
        self.unhealthy_after = unhealthy_after
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self._clock = clock
        self._lock = threading.Lock()
        self.tasks: dict[str, TaskState] = {}

    def start(self, name: str, work: Work, *, forever: bool = True) -> asyncio.Task[None]:
        """Run ``work()`` under supervision on the running loop; returns the supervising
        task (cancel it to stop the work). ``forever``: a return is a failure too;
        otherwise supervision ends when ``work()`` completes."""
        # No running loop (RuntimeError) must leave nothing registered: a later start()
        # of the same task, on the loop, would be refused as a duplicate.
        loop = asyncio.get_running_loop()
        with self._lock:
            if name in self.tasks:
                raise ValueError(f"a task named {name!r} is already supervised")
            self.tasks[name] = TaskState(name)
        if self._failing is not None:
            self._failing.labels(task=name).set(0)
        if self._restarts is not None:
            self._restarts.labels(task=name)  # the series exists at 0 from the start
        return loop.create_task(self._supervise(name, work, forever), name=f"supervised:{name}")

    async def _supervise(self, name: str, work: Work, forever: bool) -> None:
        backoff = self.backoff_initial
        try:
            while True:
                started = self._clock()
                try:
                    await work()
                    if not forever:
                        self._recovered(name)
                        return
                    raise TaskExitedError(f"{name} returned")
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    ran = self._clock() - started
                    if ran >= self.stable_after:
                        # It had recovered (ran a while) before this new failure.
                        self._recovered(name)
                        backoff = self.backoff_initial
                    self._failed(name, error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                self._restarted(name)
                if forever:
                    self._spawn_recovery_check(name)
        finally:
            with self._lock:
                self.tasks.pop(name, None)
            if self._failing is not None:
                self._failing.labels(task=name).set(0)

    def _spawn_recovery_check(self, name: str) -> None:
        """The incident ends once the restarted task has run ``stable_after`` seconds."""
        state = self.tasks.get(name)
        if state is None or state.failing_since is None:
            return
        loop = asyncio.get_running_loop()
        loop.call_later(self.stable_after, self._recovered_if_quiet, name, state.failures)

    def _recovered_if_quiet(self, name: str, failures: int) -> None:
        state = self.tasks.get(name)
        if state is not None and state.failures == failures:
            self._recovered(name)  # no failure since that restart, for stable_after seconds

    # -- bookkeeping ---------------------------------------------------------------------

    def _failed(self, name: str, error: BaseException) -> None:
        now = self._clock()
        with self._lock:
            state = self.tasks[name]
            state.failures += 1
            first = state.failing_since is None
            if first:
                state.failing_since = now
            state.last_error = f"{type(error).__name__}: {error}"[:500]
        if first:
            if self._failing is not None:
                self._failing.labels(task=name).set(1)
            log.warning(
                "%s task %r failed; restarting it with backoff (one line per incident)",
                self.component, name, exc_info=error,
            )  # fmt: skip
        else:
            log.debug("%s task %r failed again: %s", self.component, name, state.last_error)
        self._escalate_if_due(state, now)

    def _restarted(self, name: str) -> None:
        with self._lock:
            state = self.tasks[name]
            state.restarts += 1
            state.total_restarts += 1
        if self._restarts is not None:
            self._restarts.labels(task=name).inc()

    def _recovered(self, name: str) -> None:
        with self._lock:
            state = self.tasks.get(name)
            if state is None or state.failing_since is None:
                return
            lasted = self._clock() - state.failing_since
            restarts = state.restarts
            state.failing_since = None
            state.restarts = 0
            state.escalated = False
        if self._failing is not None:
            self._failing.labels(task=name).set(0)
        log.info(
            "%s task %r recovered after %d restart(s) in %.1fs",
            self.component, name, restarts, lasted,
        )  # fmt: skip

    def _escalate_if_due(self, state: TaskState, now: float) -> None:
        if state.failing_since is None or state.escalated:
            return
        if now - state.failing_since >= self.unhealthy_after:
            state.escalated = True
            log.error(
                "%s task %r has been failing for %.0fs (last: %s); liveness fails",
                self.component, state.name, now - state.failing_since, state.last_error,
            )  # fmt: skip

    # -- liveness ------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """One line per task failing for longer than ``unhealthy_after``; empty: alive."""
        now = self._clock()
        found = []
        with self._lock:
            states = list(self.tasks.values())
        for state in states:
            if state.failing_since is None:
                continue
            failing_for = now - state.failing_since
            if failing_for >= self.unhealthy_after:
                self._escalate_if_due(state, now)
                found.append(
                    f"{state.name}: failing for {failing_for:.0f}s "
                    f"({state.restarts} restarts; last: {state.last_error})"
                )
        return sorted(found)

    def failing(self) -> list[str]:
        """Tasks in an incident right now, whether or not past the liveness bound."""
        with self._lock:
            return sorted(s.name for s in self.tasks.values() if s.failing_since is not None)


__all__ = [
    "BACKOFF_INITIAL",
    "BACKOFF_MAX",
    "STABLE_AFTER",
    "UNHEALTHY_AFTER",
    "Supervisor",
    "TaskExitedError",
    "TaskState",
]
