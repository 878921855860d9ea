"""The gateway's usage delivery: numbering, re-sending, the cursor, restarts, refusals."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from costwarden.accounting.batch import UsageBatch
from costwarden.api.usage import Endpoint, Outcome, UsageRecord
from costwarden.gateway.reporting import OperatorReportingSink

TOKEN = "shared-secret"


def record(n: int) -> UsageRecord:
    return UsageRecord(
        time=datetime.now(UTC), team="ns/b", endpoint=Endpoint.CHAT_COMPLETIONS,
        outcome=Outcome.OK, usage_reported=True, cost_usd=Decimal(n),
    )  # fmt: skip


class FakeOperator:
    """Acknowledges batches (or refuses them while ``down``), remembering what it saw."""

    def __init__(self) -> None:
        self.batches: list[UsageBatch] = []
        self.down = False
        self.auth: list[str] = []
        self.reject: set[int] = set()
        self.forbidden = False

    async def handle(self, request: web.Request) -> web.Response:
        self.auth.append(request.headers.get("Authorization", ""))
        if self.down:
            return web.json_response({"error": {"code": "not_leader"}}, status=503)
        if self.forbidden:
            return web.json_response({"error": {"code": "unauthorized"}}, status=403)
        batch = UsageBatch.model_validate(json.loads(await request.read()))
        refused = [{"seq": i.seq, "reason": "cost_mismatch"} for i in batch.items
                   if i.seq in self.reject]  # fmt: skip
        if refused:  # as the operator does: nothing applied, the refused entries listed
            return web.json_response(
                {"error": {"code": "cost_mismatch"}, "rejected": refused}, status=403
            )
        self.batches.append(batch)
        top = max((i.seq for i in batch.items), default=0)
        return web.json_response({"source": batch.source, "ackedSeq": top,
                                  "teams": {"ns/b": "Exhausted"}})  # fmt: skip

    def seqs(self) -> list[int]:
        return [item.seq for batch in self.batches for item in batch.items]


async def with_operator(test: Any) -> Any:
    fake = FakeOperator()
    app = web.Application()
    app.router.add_post("/v1/usage", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        return await test(fake, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def sink(url: str, ledger: Path | None, **kw: Any) -> OperatorReportingSink:
    return OperatorReportingSink(
        url, replica_id="gw", ledger=ledger, token=TOKEN, send_seconds=0.01, **kw
    )


async def drained(reporter: OperatorReportingSink) -> None:
    for _ in range(500):
        if not reporter.pending:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("records never acknowledged")


def test_records_are_numbered_sent_in_order_and_acknowledged(tmp_path: Path):
    phases: list[dict] = []

    async def test(fake: FakeOperator, url: str) -> None:
        reporter = sink(url, tmp_path / "new-dir" / "ledger.jsonl", on_phases=phases.append)
        for n in range(5):
            reporter.emit(record(n))
        await drained(reporter)
        assert fake.seqs() == [1, 2, 3, 4, 5]
        assert fake.auth[0] == f"Bearer {TOKEN}"
        assert fake.batches[0].items[3].record.cost_usd == 3
        await reporter.close()

    asyncio.run(with_operator(test))
    lines = (tmp_path / "new-dir" / "ledger.jsonl").read_text().splitlines()
    assert len(lines) == 5  # the ledger line number is the seq
    cursor = json.loads((tmp_path / "new-dir" / "ledger.jsonl.cursor").read_text())
    assert cursor["ackedSeq"] == 5
    assert phases[0] == {"ns/b": "Exhausted"}


def test_refused_batches_are_resent_until_acknowledged(tmp_path: Path):
    async def test(fake: FakeOperator, url: str) -> None:
        fake.down = True
        reporter = sink(url, None)
        reporter.emit(record(1))
        while len(fake.auth) < 2:
            await asyncio.sleep(0.01)
        assert reporter.pending == 1
        fake.down = False
        await drained(reporter)
        assert fake.seqs() == [1]
        await reporter.close()

    asyncio.run(with_operator(test))


def test_entries_the_operator_refuses_for_good_are_dropped_and_the_rest_delivered(
    tmp_path: Path,
):
    reasons: list[str] = []

    async def test(fake: FakeOperator, url: str) -> None:
        fake.reject = {2, 4}
        reporter = sink(url, tmp_path / "ledger.jsonl", on_rejected=reasons.append)
        for n in range(5):
            reporter.emit(record(n))
        await drained(reporter)  # never wedged on the refused batch
        assert fake.seqs() == [1, 3, 5]
        assert reporter.rejected == 2
        await reporter.close()

    asyncio.run(with_operator(test))
    assert reasons == ["cost_mismatch", "cost_mismatch"]
    cursor = json.loads((tmp_path / "ledger.jsonl.cursor").read_text())
    assert cursor["ackedSeq"] == 5  # the cursor moved past the refused entries


def test_a_403_without_a_list_of_refused_entries_is_retried(tmp_path: Path):
    async def test(fake: FakeOperator, url: str) -> None:
        reporter = sink(url, None)
        fake.forbidden = True
        reporter.emit(record(1))
        while len(fake.auth) < 2:
            await asyncio.sleep(0.01)
        assert reporter.pending == 1
        assert reporter.rejected == 0
        fake.forbidden = False
        await drained(reporter)
        await reporter.close()

    asyncio.run(with_operator(test))


def test_a_restarted_gateway_resends_only_what_was_not_acknowledged(tmp_path: Path):
    ledger = tmp_path / "ledger.jsonl"

    async def first_run(fake: FakeOperator, url: str) -> str:
        reporter = sink(url, ledger)
        for n in range(3):
            reporter.emit(record(n))
        await drained(reporter)
        fake.down = True
        for n in range(3, 5):
            reporter.emit(record(n))  # never acknowledged: the process "dies" here
        source = reporter.source
        reporter._task.cancel()  # type: ignore[union-attr]
        return source

    source = asyncio.run(with_operator(first_run))

    async def second_run(fake: FakeOperator, url: str) -> None:
        reporter = sink(url, ledger)
        assert reporter.source == source  # the same stream continues
        reporter.start()
        await drained(reporter)
        reporter.emit(record(5))
        await drained(reporter)
        assert fake.seqs() == [4, 5, 6]
        await reporter.close()

    asyncio.run(with_operator(second_run))


def test_a_ledger_that_lost_acknowledged_lines_starts_a_new_source(tmp_path: Path):
    ledger = tmp_path / "ledger.jsonl"

    async def run(fake: FakeOperator, url: str) -> str:
        reporter = sink(url, ledger)
        for n in range(3):
            reporter.emit(record(n))
        await drained(reporter)
        await reporter.close()
        return reporter.source

    first = asyncio.run(with_operator(run))
    ledger.write_text(ledger.read_text().splitlines(keepends=True)[0])  # lost 2 lines

    async def after(fake: FakeOperator, url: str) -> None:
        reporter = sink(url, ledger)
        assert reporter.source != first
        reporter.emit(record(9))
        await drained(reporter)
        assert fake.seqs() == [2]  # nothing old re-sent, numbering continues past the file
        await reporter.close()

    asyncio.run(with_operator(after))


def test_a_torn_last_line_keeps_its_number(tmp_path: Path):
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_bytes(record(1).model_dump_json(by_alias=True).encode() + b'\n{"kind":"Usa')

    async def run(fake: FakeOperator, url: str) -> None:
        reporter = sink(url, ledger)
        reporter.start()
        reporter.emit(record(2))
        await drained(reporter)
        assert fake.seqs() == [1, 3]
        await reporter.close()

    asyncio.run(with_operator(run))


def test_an_exhausted_phase_in_the_acknowledgement_refuses_calls_until_the_next_config():
    from costwarden.api.teambudget import BudgetPhase
    from costwarden.gateway.limits import Limits
    from costwarden.testing.gateway import TEAM_ID, sample_config

    team = sample_config("http://upstream").team(TEAM_ID)
    assert team is not None
    limits = Limits()
    assert limits.admit(team, "rev-1", "job", "fp-1").refusal is None
    limits.note_operator_phases({TEAM_ID: BudgetPhase.EXHAUSTED})
    refused = limits.admit(team, "rev-1", "job", "fp-2")
    assert refused.refusal is not None
    assert refused.refusal.code == "hard_cap_reached"
    assert limits.admit(team, "rev-2", "job", "fp-3").refusal is None  # a new config decides


class TeamOperator:
    """Applies batches as the operator does: per team and per source cursor, a team whose
    books cannot be written (``poisoned``) held (listed in ``held``), the others applied."""

    def __init__(self) -> None:
        self.cursors: dict[str, int] = {}
        self.applied: dict[str, list[int]] = {}
        self.poisoned: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        batch = UsageBatch.model_validate(json.loads(await request.read()))
        by_team: dict[str, list[int]] = {}
        for item in batch.items:
            assert item.record is not None
            by_team.setdefault(item.record.team, []).append(item.seq)
        held: list[dict[str, Any]] = []
        for team, seqs in by_team.items():
            if team in self.poisoned:
                held += [{"seq": s, "team": team, "reason": "http_422"} for s in seqs]
                continue
            for seq in sorted(seqs):
                if seq > self.cursors.get(team, 0):
                    self.applied.setdefault(team, []).append(seq)
                    self.cursors[team] = seq
        top = max((i.seq for i in batch.items), default=0)
        first_held = min((h["seq"] for h in held), default=top + 1)
        body: dict[str, Any] = {"source": batch.source, "ackedSeq": min(top, first_held - 1)}
        if held:
            body |= {"appliedThrough": top, "held": held}
        return web.json_response(body)


def team_record(team: str) -> UsageRecord:
    return UsageRecord(
        time=datetime.now(UTC), team=team, endpoint=Endpoint.CHAT_COMPLETIONS,
        outcome=Outcome.OK, usage_reported=True, cost_usd=Decimal(1),
    )  # fmt: skip


async def serve_operator(handler: Any) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/usage", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_a_held_team_never_holds_back_another_teams_usage_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Team ns/poison's books cannot be written: its entries are held (kept in the ledger,
    re-sent), ns/ok's entries, before and after them, are all applied meanwhile; once the
    cause is fixed every held entry applies exactly once, in order, across a restart."""
    import costwarden.gateway.reporting as reporting

    # Small batches: held entries would stall everything behind them within a few batches.
    monkeypatch.setattr(reporting, "MAX_BATCH", 20)
    monkeypatch.setattr(reporting, "PARKED_PER_BATCH", 5)
    monkeypatch.setattr(reporting, "PARKED_RETRY_MIN", 0.05)
    operator = TeamOperator()
    operator.poisoned.add("ns/poison")
    ledger = tmp_path / "usage.jsonl"
    teams = {"ns/ok": [], "ns/poison": []}  # type: dict[str, list[int]]

    async def run() -> None:
        runner, url = await serve_operator(operator.handle)
        try:
            reporter = sink(url, ledger)
            for n in range(1, 301):
                team = "ns/poison" if n % 3 == 0 else "ns/ok"
                reporter.emit(team_record(team))
                teams[team].append(reporter.seq)
                if n % 50 == 0:
                    await asyncio.sleep(0.02)
            await until(lambda: operator.applied.get("ns/ok") == teams["ns/ok"], "ns/ok")
            assert "ns/poison" not in operator.applied
            assert reporter.held_teams.keys() == {"ns/poison"}
            # The operator counts a batch before its answer reaches the sender: wait for the
            # acknowledgement of the last ns/ok entries (a race, not a loss: re-sent, they
            # would be de-duplicated).
            await until(lambda: reporter.pending == len(teams["ns/poison"]), "ns/ok acked")
            # A restart (no close: as after kill -9) while held: read back from the ledger.
            assert reporter._task is not None
            reporter._task.cancel()
            if reporter._session is not None:
                await reporter._session.close()
            restarted = sink(url, ledger)
            assert restarted.held_teams.keys() == {"ns/poison"}
            assert restarted.pending == len(teams["ns/poison"])
            restarted.start()
            restarted.emit(team_record("ns/ok"))
            teams["ns/ok"].append(restarted.seq)
            restarted.emit(team_record("ns/poison"))
            teams["ns/poison"].append(restarted.seq)
            await until(lambda: operator.applied.get("ns/ok") == teams["ns/ok"], "ns/ok again")
            operator.poisoned.clear()  # the cause fixed (e.g. the CRD upgraded)
            await until(lambda: restarted.pending == 0, "held entries delivered")
            assert operator.applied["ns/poison"] == teams["ns/poison"]  # once each, in order
            assert restarted.held_teams == {}
            await restarted.close()
        finally:
            await runner.cleanup()

    asyncio.run(run())


def test_acknowledged_entries_are_rotated_out_and_numbering_survives(tmp_path: Path):
    """The ledger stays small while the operator acknowledges (rotated at rotate_bytes);
    a restart after rotations continues the same numbering and re-sends only what was not
    acknowledged; at max_bytes with nothing acknowledged the sink reports full."""
    ledger = tmp_path / "usage.jsonl"

    async def first(fake: FakeOperator, url: str) -> tuple[str, int]:
        reporter = sink(url, ledger, rotate_bytes=4000, max_bytes=8000)
        for n in range(1, 101):
            reporter.emit(record(n))
            if n % 10 == 0:
                await drained(reporter)
        await drained(reporter)
        assert reporter.rotations > 0
        assert ledger.stat().st_size < 8000  # 100 records of ~300 bytes: rotated
        assert fake.seqs() == list(range(1, 101))
        fake.down = True  # nothing acknowledged from here on
        while not reporter.full:
            reporter.emit(record(1))
        assert reporter.seq > 100
        source, last = reporter.source, reporter.seq
        assert reporter._task is not None
        reporter._task.cancel()  # killed: no close
        if reporter._session is not None:
            await reporter._session.close()
        return source, last

    source, last = asyncio.run(with_operator(first))

    async def second(fake: FakeOperator, url: str) -> None:
        reporter = sink(url, ledger, rotate_bytes=4000, max_bytes=8000)
        assert reporter.source == source
        assert reporter.seq == last  # numbering continues across rotations
        reporter.start()
        await drained(reporter)
        assert fake.seqs() == list(range(101, last + 1))  # only the unacknowledged
        assert not reporter.full
        await reporter.close()

    asyncio.run(with_operator(second))


def test_a_held_team_does_not_pin_the_ledger_and_survives_rotation_and_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """While one team is held, the other team's acknowledged entries are still rotated out
    (the held ones move to the held file): the ledger stays far below its bound, and after
    a kill and restart every held entry is re-sent and applies exactly once."""
    import costwarden.gateway.reporting as reporting

    monkeypatch.setattr(reporting, "PARKED_RETRY_MIN", 0.05)
    operator = TeamOperator()
    operator.poisoned.add("ns/poison")
    ledger = tmp_path / "usage.jsonl"
    teams: dict[str, list[int]] = {"ns/ok": [], "ns/poison": []}

    async def run() -> None:
        runner, url = await serve_operator(operator.handle)
        try:
            reporter = sink(url, ledger, rotate_bytes=4000, max_bytes=20_000)
            reporter.emit(team_record("ns/poison"))
            teams["ns/poison"].append(reporter.seq)
            await until(lambda: bool(reporter.held_teams), "ns/poison held")
            for n in range(300):  # ~100 KB of the other team's usage: 5x the bound
                team = "ns/poison" if n % 100 == 0 else "ns/ok"
                assert not reporter.full, f"ledger full after {n} entries"
                reporter.emit(team_record(team))
                teams[team].append(reporter.seq)
                if n % 10 == 0:
                    await until(lambda: operator.applied.get("ns/ok", [])[-1:] ==
                                teams["ns/ok"][-1:], "ns/ok applied")  # fmt: skip
            await until(lambda: operator.applied.get("ns/ok") == teams["ns/ok"], "ns/ok")
            assert reporter.rotations > 0
            assert ledger.stat().st_size < 20_000
            assert "ns/poison" not in operator.applied
            assert reporter._task is not None
            reporter._task.cancel()  # killed
            if reporter._session is not None:
                await reporter._session.close()
            restarted = sink(url, ledger, rotate_bytes=4000, max_bytes=20_000)
            assert restarted.held_teams.keys() == {"ns/poison"}
            assert [e[0] for e in restarted._parked] == teams["ns/poison"]
            operator.poisoned.clear()
            restarted.start()
            await until(lambda: restarted.pending == 0, "held entries delivered")
            assert operator.applied["ns/poison"] == teams["ns/poison"]
            assert operator.applied["ns/ok"] == teams["ns/ok"]  # nothing twice
            assert not (tmp_path / "usage.jsonl.held").exists()
            await restarted.close()
        finally:
            await runner.cleanup()

    asyncio.run(run())


def test_a_phase_does_not_go_back_when_a_new_config_carries_an_older_snapshot():
    """SoftLimited seen from this gateway's own metering stays SoftLimited under a later
    revision whose spend snapshot predates it (soft-limit downgrades keep applying), until
    the period or the limits change."""
    from datetime import timedelta
    from decimal import Decimal

    from costwarden.api.teambudget import BudgetPhase
    from costwarden.gateway.limits import Limits
    from costwarden.testing.gateway import TEAM_ID, sample_config

    team = sample_config("http://upstream").team(TEAM_ID)
    assert team is not None
    limits = Limits()
    limits.record(team, "rev-1", "job", None, Decimal(0), upstream_error=False)
    from costwarden.api.teambudget import TokenUsage

    limits.record(team, "rev-1", "job", TokenUsage(input=1), Decimal(85), upstream_error=False)
    assert limits.admit(team, "rev-1", "job", "fp-1").phase is BudgetPhase.SOFT_LIMITED
    # rev-2's snapshot was rendered before the 85 USD were applied: spend 0 in it.
    assert limits.admit(team, "rev-2", "job", "fp-2").phase is BudgetPhase.SOFT_LIMITED
    raised = team.model_copy(update={"soft_limit_usd": Decimal(90)})
    assert limits.admit(raised, "rev-3", "job", "fp-3").phase is BudgetPhase.ACTIVE
    spend = team.spend.model_copy(update={"period_start": team.spend.period_start + timedelta(1)})
    rolled = team.model_copy(update={"spend": spend})
    assert limits.admit(rolled, "rev-4", "job", "fp-4").phase is BudgetPhase.ACTIVE
