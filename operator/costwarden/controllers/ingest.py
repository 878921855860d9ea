"""``POST /v1/usage``: where gateways deliver numbered usage (served on ``--ingest-port``).

Only the leader applies batches (others answer 503 and the gateway retries, reaching the
leader through the Service or after a handover). A batch is acknowledged only once every
team it touches has its books patched in the API server; a failure for any team fails
the batch (503), and the re-sent batch is a no-op for the teams already applied, thanks to
the per-source cursors (docs/accounting.md).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import defaultdict
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from costwarden.accounting.batch import BatchAck, UsageBatch
from costwarden.accounting.books import Books
from costwarden.accounting.ledger import Applied, Entry, apply_entries
from costwarden.api.teambudget import BudgetPhase
from costwarden.controllers import accounting_metrics as metrics
from costwarden.controllers.accountant import Accountant, BudgetGoneError, Commit
from costwarden.controllers.ingest_auth import AuthVerdict, IngestAuth
from costwarden.controllers.leadership import Leadership

log = logging.getLogger(__name__)

MAX_BODY = 32 * 1024 * 1024


def usage_mutation(source: str, entries: list[Entry]) -> Any:
    def mutate(books: Books, now: datetime) -> Applied:
        return apply_entries(books, source, entries, now)

    return mutate


class Ingestion:
    def __init__(self, accountant: Accountant, auth: IngestAuth, leadership: Leadership) -> None:
        self.accountant = accountant
        self.auth = auth
        self.leadership = leadership

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/v1/usage", self.handle)
        app.router.add_get("/healthz", _ok)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        verdict = await self.auth.check(request.headers.get("Authorization", ""))
        if not verdict.allowed:
            metrics.BATCHES.labels(result="unauthorized").inc()
            return _error(verdict.status, "unauthorized", verdict.message)
        if not await self.leadership.is_leader():
            metrics.BATCHES.labels(result="not_leader").inc()
            return _error(503, "not_leader", "this operator replica is not the leader")
        try:
            batch = UsageBatch.model_validate(orjson.loads(await request.read()))
        except (ValidationError, orjson.JSONDecodeError) as exc:
            metrics.BATCHES.labels(result="invalid").inc()
            return _error(400, "invalid_batch", str(exc)[:2000])
        foreign = _first_foreign_entry(batch, verdict)
        if foreign:
            metrics.BATCHES.labels(result="unauthorized").inc()
            return _error(403, "forbidden", foreign)
        started = time.monotonic()
        try:
            ack = await self.apply(batch)
        except Exception as exc:
            metrics.BATCHES.labels(result="failed").inc()
            log.warning(
                "batch from %s not applied (the gateway re-sends it): %s", batch.source, exc
            )
            return _error(503, "not_applied", "the batch could not be applied; re-send it")
        metrics.BATCHES.labels(result="applied").inc()
        log.debug("batch of %d from %s applied in %.3fs", len(batch.items), batch.source,
                  time.monotonic() - started)  # fmt: skip
        return web.Response(body=orjson.dumps(ack.to_wire()), content_type="application/json")

    async def apply(self, batch: UsageBatch) -> BatchAck:
        by_team: dict[str, list[Entry]] = defaultdict(list)
        unattributed = 0
        for item in batch.items:
            team = (item.record.team if item.record else "") or (
                item.loop_signal.team if item.loop_signal else ""
            )
            if not team:
                unattributed += 1  # refused before attribution: nothing to count
                continue
            by_team[team].append(Entry(item.seq, item.record, item.loop_signal))
        results = await asyncio.gather(
            *(self._apply_team(batch.source, team, entries) for team, entries in by_team.items())
        )
        phases = {team: phase for team, phase, _ in results if phase is not None}
        applied = [a for _, _, a in results if a is not None]
        metrics.RECORDS_UNATTRIBUTED.inc(unattributed)
        return BatchAck(
            source=batch.source,
            acked_seq=max((item.seq for item in batch.items), default=0),
            teams=phases,
            records=sum(len(a.records) for a in applied),
            duplicates=sum(a.duplicates for a in applied),
        )

    async def _apply_team(
        self, source: str, team: str, entries: list[Entry]
    ) -> tuple[str, BudgetPhase | None, Applied | None]:
        try:
            commit, applied = await self.accountant.mutate(team, usage_mutation(source, entries))
        except BudgetGoneError:
            # No such (valid) TeamBudget: nobody can be charged; dropping is all we can do.
            metrics.RECORDS_UNATTRIBUTED.inc(len(entries))
            return team, None, None
        _observe(commit, applied)
        return team, commit.after.phase, applied


def _first_foreign_entry(batch: UsageBatch, verdict: AuthVerdict) -> str:
    """A sidecar reports its own pod's usage only: a sentence naming the first entry that is
    not, or "" when every entry is (or the sender is a gateway, whose scope is all)."""
    for item in batch.items:
        entry = item.record or item.loop_signal
        if entry is not None and not verdict.covers(entry.namespace, entry.pod):
            return (
                f"{verdict.who} may report usage of pod {verdict.namespace}/{verdict.pod} "
                f"only, not of {entry.namespace}/{entry.pod} (seq {item.seq})"
            )
    return ""


def _observe(commit: Commit, applied: Applied) -> None:
    now = time.time()
    for record in applied.records:
        metrics.INGESTION_LAG.observe(max(0.0, now - record.time.timestamp()))
    metrics.RECORDS_APPLIED.inc(len(applied.records))
    metrics.RECORDS_DEDUPLICATED.inc(applied.duplicates)
    metrics.RECORDS_LATE.inc(applied.late)
    del commit  # per-team gauges are set by the enforcer's on_commit hook


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _error(status: int, code: str, message: str) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=status, body=body, content_type="application/json")


async def serve(
    ingestion: Ingestion, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> web.AppRunner:
    """Serve ``POST /v1/usage``; over HTTPS with ``ssl_context`` (the operator always passes
    one: reporters send a bearer token, which must not cross the network in clear)."""
    runner = web.AppRunner(ingestion.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    log.info("usage ingestion listening on %s:%d (%s)", host, port,
             "https" if ssl_context else "http")  # fmt: skip
    return runner


__all__ = ["Ingestion", "serve", "usage_mutation"]
