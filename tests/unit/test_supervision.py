"""The supervisor: restarts with backoff, one log line per incident, metrics, liveness."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from costwarden.supervision import Supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _supervisor(clock: Clock, **kwargs: float) -> tuple[Supervisor, Counter, Gauge]:
    registry = CollectorRegistry()
    restarts = Counter("t_restarts_total", "", ["task"], registry=registry)
    failing = Gauge("t_failing", "", ["task"], registry=registry)
    supervisor = Supervisor(
        "test", restarts=restarts, failing=failing, clock=clock,
        backoff_initial=0.001, backoff_max=0.004, **kwargs,
    )  # fmt: skip
    return supervisor, restarts, failing


async def _until(probe, limit: int = 2000) -> None:
    for _ in range(limit):
        if probe():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not reached")


def test_a_failing_task_is_restarted_and_logged_once_per_incident(caplog):
    clock = Clock()
    supervisor, restarts, failing = _supervisor(clock, stable_after=1000, unhealthy_after=1000)
    runs = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) <= 5:
            raise ConnectionError("API server unreachable")
        await asyncio.Event().wait()

    async def main() -> None:
        task = supervisor.start("watch", flaky)
        await _until(lambda: len(runs) == 6)
        assert failing.labels(task="watch")._value.get() == 1
        assert supervisor.failing() == ["watch"]
        task.cancel()

    with caplog.at_level(logging.INFO, logger="costwarden.supervision"):
        asyncio.run(main())
    assert restarts.labels(task="watch")._value.get() == 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one line per incident, not per retry"
    assert warnings[0].exc_info is not None


def test_the_incident_ends_once_the_restarted_task_runs_quietly(caplog):
    clock = Clock()
    supervisor, _, failing = _supervisor(clock, stable_after=0.05, unhealthy_after=1000)
    runs = []

    async def once_broken() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("boom")
        await asyncio.Event().wait()

    async def main() -> None:
        task = supervisor.start("reconciler", once_broken)
        await _until(lambda: len(runs) == 2)
        clock.now = 1.0  # the restarted task has run a while
        await _until(lambda: not supervisor.failing())
        task.cancel()

    with caplog.at_level(logging.INFO, logger="costwarden.supervision"):
        asyncio.run(main())
    assert failing.labels(task="reconciler")._value.get() == 0
    assert any("recovered after 1 restart" in r.getMessage() for r in caplog.records)


def test_liveness_fails_once_a_task_fails_longer_than_the_bound(caplog):
    clock = Clock()
    supervisor, _, _ = _supervisor(clock, stable_after=1000, unhealthy_after=60)

    async def broken() -> None:
        raise OSError("address already in use")

    async def main() -> None:
        task = supervisor.start("ingestion", broken)
        await _until(lambda: supervisor.failing() == ["ingestion"])
        clock.now = 59.0
        assert supervisor.problems() == []  # within the bound: recovering, still alive
        clock.now = 61.0
        [problem] = supervisor.problems()
        assert problem.startswith("ingestion: failing for 61s")
        assert "address already in use" in problem
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert supervisor.problems() == []  # a stopped task is no longer watched

    with caplog.at_level(logging.INFO, logger="costwarden.supervision"):
        asyncio.run(main())
    assert sum(r.levelno == logging.ERROR for r in caplog.records) == 1


def test_a_task_that_returns_is_restarted_unless_it_runs_once():
    clock = Clock()
    supervisor, restarts, _ = _supervisor(clock)
    runs = {"forever": 0, "once": 0}

    async def forever() -> None:
        runs["forever"] += 1
        if runs["forever"] > 2:
            await asyncio.Event().wait()

    async def once() -> None:
        runs["once"] += 1
        if runs["once"] == 1:
            raise RuntimeError("not yet")

    async def main() -> None:
        task = supervisor.start("loop", forever)
        await supervisor.start("publish", once, forever=False)
        await _until(lambda: runs["forever"] == 3)
        task.cancel()

    asyncio.run(main())
    assert runs["once"] == 2
    assert restarts.labels(task="loop")._value.get() == 2
    assert restarts.labels(task="publish")._value.get() == 1


def test_two_tasks_may_not_share_a_name():
    async def main() -> None:
        supervisor = Supervisor("test")
        task = supervisor.start("a", asyncio.Event().wait)
        with pytest.raises(ValueError, match="already supervised"):
            supervisor.start("a", asyncio.Event().wait)
        task.cancel()

    asyncio.run(main())


def test_the_operator_liveness_probe_fails_past_the_bound():
    import kopf

    from costwarden.controllers.handlers import supervised_tasks

    clock = Clock()
    supervisor, _, _ = _supervisor(clock, stable_after=1000, unhealthy_after=60)
    memo = kopf.Memo(supervisor=supervisor)

    async def broken() -> None:
        raise ConnectionError("API server unreachable")

    async def main() -> None:
        task = supervisor.start("reconciler", broken)
        await _until(lambda: supervisor.failing() == ["reconciler"])
        assert supervised_tasks(memo=memo) == ["reconciler"]  # recovering: still alive
        clock.now = 120.0
        with pytest.raises(kopf.PermanentError, match="reconciler: failing for 120s"):
            supervised_tasks(memo=memo)
        task.cancel()

    asyncio.run(main())


def test_a_start_without_a_running_loop_registers_nothing() -> None:
    """A sink emitting before the loop runs (the hold journal's recovery at start) tries to
    start its task; the later start on the loop must not be refused as a duplicate."""
    supervisor, _, _ = _supervisor(Clock())

    async def work() -> None:
        await asyncio.Event().wait()

    with pytest.raises(RuntimeError):
        supervisor.start("ledger-flush", work)
    assert "ledger-flush" not in supervisor.tasks

    async def on_the_loop() -> None:
        task = supervisor.start("ledger-flush", work)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(on_the_loop())
