"""The gateway's usage delivery: numbering, re-sending, the cursor, restarts, refusals."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

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
