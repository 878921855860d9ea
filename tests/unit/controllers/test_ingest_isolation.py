"""Ingestion isolates teams: one team whose books cannot be written holds only its own
entries; a transient failure still fails the batch (re-sent whole, a no-op where applied)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from costwarden.accounting.batch import BatchItem, UsageBatch
from costwarden.accounting.books import Books
from costwarden.accounting.held import HeldSummary
from costwarden.accounting.trust import Checked
from costwarden.api.usage import Endpoint, Outcome, UsageRecord
from costwarden.controllers import accounting_metrics as metrics
from costwarden.controllers.ingest import Ingestion, permanent
from costwarden.controllers.rest import ApiError


class Accountant:
    """Applies mutations to in-memory books per team; ``failures`` makes a team's write
    raise (as the real accountant does when the API server refuses the patch)."""

    def __init__(self) -> None:
        now = datetime.now(UTC)
        self.books: dict[str, Books] = {}
        self.failures: dict[str, Exception] = {}
        self.now = now

    async def mutate(self, team: str, mutation: Any) -> tuple[Any, Any]:
        await asyncio.sleep(0)
        if team in self.failures:
            raise self.failures[team]
        books = self.books.setdefault(
            team, Books.read({}, self.now.replace(day=1), self.now.replace(year=self.now.year + 1))
        )
        applied = mutation(books, self.now)

        class Commit:
            class after:  # noqa: N801
                phase = None

        return Commit(), applied

    def budget(self, team: str) -> None:
        return None  # no Event posted in this test (no API server)


def record(team: str) -> UsageRecord:
    return UsageRecord(
        time=datetime.now(UTC), team=team, endpoint=Endpoint.CHAT_COMPLETIONS,
        outcome=Outcome.OK, usage_reported=True, cost_usd=Decimal("0.5"),
    )  # fmt: skip


def ingestion(accountant: Accountant) -> Ingestion:
    return Ingestion(accountant, None, None, lambda: None, None)  # type: ignore[arg-type]


def batch_of(teams: list[str]) -> tuple[UsageBatch, list[Checked]]:
    items = [BatchItem(seq=n, record=record(t)) for n, t in enumerate(teams, start=1)]
    checked = [Checked(seq=i.seq, team=i.record.team, record=i.record) for i in items]  # type: ignore[union-attr]
    return UsageBatch(source="gw/1", items=items), checked


def test_one_teams_permanent_error_holds_only_its_entries() -> None:
    accountant = Accountant()
    accountant.failures["ns/poison"] = ApiError(422, "PATCH", "/status", b"spentUSD: too long")
    batch, checked = batch_of(["ns/ok", "ns/poison", "ns/ok", "ns/poison", "ns/other"])
    held_before = metrics.RECORDS_HELD.labels(team="ns/poison")._value.get()

    ack = asyncio.run(ingestion(accountant).apply(batch, "r#gw/1", checked))

    assert [(h.seq, h.team, h.reason) for h in ack.held] == [
        (2, "ns/poison", "http_422"), (4, "ns/poison", "http_422"),
    ]  # fmt: skip
    assert ack.acked_seq == 1  # an older gateway re-sends from the first held entry
    assert ack.applied_through == 5
    assert ack.records == 3
    assert accountant.books["ns/ok"].spent == Decimal(1)
    assert accountant.books["ns/other"].spent == Decimal("0.5")
    assert "ns/poison" not in accountant.books
    assert metrics.RECORDS_HELD.labels(team="ns/poison")._value.get() == held_before + 2

    # Fixed: the re-sent held entries apply; the others are duplicates (per-team cursors).
    del accountant.failures["ns/poison"]
    again = asyncio.run(ingestion(accountant).apply(batch, "r#gw/1", checked))
    assert again.held == []
    assert again.acked_seq == 5
    assert again.records == 2
    assert again.duplicates == 3
    assert accountant.books["ns/poison"].spent == Decimal(1)
    assert accountant.books["ns/ok"].spent == Decimal(1)


def test_a_transient_error_fails_the_whole_batch() -> None:
    accountant = Accountant()
    accountant.failures["ns/slow"] = ApiError(503, "PATCH", "/status", b"unavailable")
    batch, checked = batch_of(["ns/ok", "ns/slow"])

    with pytest.raises(ApiError):
        asyncio.run(ingestion(accountant).apply(batch, "r#gw/1", checked))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ApiError(422, "PATCH", "/", b""), True),
        (ApiError(400, "PATCH", "/", b""), True),
        (ApiError(403, "PATCH", "/", b""), True),
        (ApiError(409, "PATCH", "/", b""), False),
        (ApiError(429, "PATCH", "/", b""), False),
        (ApiError(500, "PATCH", "/", b""), False),
        (ValueError("no model accepts it"), True),
        (OSError("reset"), False),
        (TimeoutError(), False),
        (RuntimeError("10 conflicting writes"), False),
    ],
)
def test_permanent_or_transient(error: Exception, expected: bool) -> None:
    assert permanent(error) is expected


def test_status_holds_any_spend_a_team_can_reach() -> None:
    """No 12-digit ceiling: a spend of 10^20 USD (an upstream billing absurd usage past every
    cap), a 300-character model name and the percentage of a micro-dollar cap are written as
    status the CRD schema accepts, and read back exactly."""
    import re

    import yaml

    from costwarden.accounting.ledger import Entry as LedgerEntry
    from costwarden.accounting.ledger import apply_entries
    from costwarden.api.teambudget import MAX_PERCENT, TeamBudgetStatus
    from costwarden.policy.status import _percent

    now = datetime.now(UTC).replace(microsecond=0)
    start, end = now.replace(day=1), now.replace(year=now.year + 1)
    books = Books.read({}, start, end)
    huge = Decimal("123456789012345678901.5")  # exact: within Decimal's 28 digits
    rec = record("ns/b").model_copy(update={"cost_usd": huge, "served_model": "m" * 300})
    apply_entries(books, "r#gw", [LedgerEntry(1, rec)], now)
    fragment = {k: v for k, v in books.fragment().items() if v is not None}

    status = TeamBudgetStatus.model_validate(fragment)
    assert status.spent_exact_usd == huge
    assert Books.read(fragment, start, end).spent == huge
    crd = yaml.safe_load(open("crds/costwarden.io_teambudgets.yaml"))  # noqa: SIM115
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    props = schema["properties"]
    for field in ("spentUSD", "spentExactUSD"):
        assert re.match(props[field]["pattern"], fragment[field]), field
        assert len(fragment[field]) <= props[field]["maxLength"]
    assert len(fragment["byModel"][0]["model"]) == 128
    assert _percent(huge, Decimal("0.000001")) == MAX_PERCENT
    assert props["usedPercent"]["maximum"] == MAX_PERCENT


def test_ingestion_refuses_an_unauthenticated_batch_before_reading_its_body(
    tmp_path: Any,
) -> None:
    """Headers announce a 64 MiB batch and 1 KiB of it is sent: the 401 arrives at once and
    the connection is closed; the body is never waited for, read or parsed."""
    from costwarden.controllers.ingest import serve
    from costwarden.controllers.ingest_auth import IngestAuth
    from costwarden.ports import free_port

    token = tmp_path / "token"
    token.write_text("the-shared-token\n")
    auth = IngestAuth(token_file=token)
    port = free_port()

    async def scenario() -> bytes:
        runner = await serve(ingestion_with(auth), "127.0.0.1", port)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /v1/usage HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nAuthorization: Bearer wrong\r\n\r\n"
                % (64 << 20)
                + b"{"
                + b" " * 1023
            )
            await writer.drain()
            async with asyncio.timeout(5):  # TimeoutError (a failure) if it waits for more
                answer = await reader.read()  # until the server closes the connection
            writer.close()
            return answer
        finally:
            await runner.cleanup()

    answer = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def ingestion_with(auth: Any) -> Ingestion:
    return Ingestion(Accountant(), auth, None, lambda: None, None)  # type: ignore[arg-type]


def test_the_held_view_follows_holds_and_their_release() -> None:
    """What the UsageApplied condition is made from: a team is held from the batch whose
    entries of it could not be written until a batch from the same gateway applies them."""
    accountant = Accountant()
    accountant.failures["ns/poison"] = ApiError(422, "PATCH", "/status", b"spentUSD: too long")
    wakes: list[int] = []
    ingest = ingestion(accountant)
    ingest.on_held_change = lambda: wakes.append(1)
    batch, checked = batch_of(["ns/ok", "ns/poison", "ns/poison"])

    asyncio.run(ingest.apply(batch, "r#gw/1", checked))
    held = ingest.held.summary("ns/poison")
    assert held is not None
    assert (held.entries, held.sources, held.reason) == (2, 1, "http_422")
    assert ingest.held.summary("ns/ok") == HeldSummary()
    assert ingest.held.summary("ns/never-seen") is None
    assert wakes == [1]

    asyncio.run(ingest.apply(batch, "r#gw/1", checked))  # still held: no news
    assert wakes == [1]

    del accountant.failures["ns/poison"]  # the cause removed: the re-sent entries apply
    asyncio.run(ingest.apply(batch, "r#gw/1", checked))
    assert ingest.held.summary("ns/poison") == HeldSummary()
    assert wakes == [1, 1]
