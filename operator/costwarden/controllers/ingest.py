"""``POST /v1/usage``: where gateways deliver numbered usage (served on ``--ingest-port``).

Only the leader applies batches (others answer 503 and the gateway retries, reaching the
leader through the Service or after a handover). A batch is acknowledged only once every
team it touches has its books patched in the API server; a failure for any team fails
the batch (503), and the re-sent batch is a no-op for the teams already applied, thanks to
the per-source cursors (docs/accounting.md).

Nothing in an entry is taken as sent (docs/security-ingestion.md): the team, the job, the
cost, the tokens' bounds, the time and a loop signal's action are recomputed or checked
(``accounting.trust``, against the pod as the API server has it and the configuration the
reconciler rendered), and the cursors are keyed by the authenticated reporter. A batch
with any refused entry is refused whole (403, nothing applied) and lists the refused
entries, which an honest gateway drops before re-sending the rest.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from costwarden.accounting.batch import BatchAck, UsageBatch
from costwarden.accounting.books import Books
from costwarden.accounting.ledger import Applied, Entry, apply_entries
from costwarden.accounting.trust import Checked, Refusal
from costwarden.api.gatewayconfig import GatewayConfig
from costwarden.api.teambudget import BudgetPhase
from costwarden.controllers import accounting_metrics as metrics
from costwarden.controllers import clock
from costwarden.controllers.accountant import Accountant, BudgetGoneError, Commit
from costwarden.controllers.ingest_auth import IngestAuth
from costwarden.controllers.ingest_trust import PodView, PriceMemory, TransientError, check_batch
from costwarden.controllers.leadership import Leadership
from costwarden.controllers.rest import Rest

log = logging.getLogger(__name__)

MAX_BODY = 32 * 1024 * 1024
MAX_REJECTED_LISTED = 5000


def usage_mutation(source: str, entries: list[Entry], legacy: str = "") -> Any:
    def mutate(books: Books, now: datetime) -> Applied:
        return apply_entries(books, source, entries, now, legacy=legacy)

    return mutate


ConfigSource = Callable[[], GatewayConfig | None]


class Ingestion:
    def __init__(
        self,
        accountant: Accountant,
        auth: IngestAuth,
        leadership: Leadership,
        config: ConfigSource,
        rest: Rest,
    ) -> None:
        self.accountant = accountant
        self.auth = auth
        self.leadership = leadership
        self.config = config
        self.pods = PodView(rest)
        self.prices = PriceMemory()

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
            metrics.REFUSED.labels(reason=Refusal.INVALID_BATCH.value).inc()
            return _error(400, Refusal.INVALID_BATCH.value, str(exc)[:2000])
        config = self.config()
        if config is None:
            metrics.BATCHES.labels(result="not_ready").inc()
            return _error(503, "not_ready", "no gateway configuration rendered yet; re-send")
        reporter = verdict.reporter
        try:
            checked = await check_batch(batch, reporter, config, self.pods, self.prices,
                                        clock.now())  # fmt: skip
        except TransientError as exc:
            metrics.BATCHES.labels(result="failed").inc()
            log.warning(
                "batch from %s not checked (the gateway re-sends it): %s", reporter.identity, exc
            )
            return _error(503, "not_applied", "the batch could not be checked; re-send it")
        refused = [c for c in checked if c.refusal is not None]
        if refused:
            return self._refuse(reporter.identity, batch.source, refused)
        started = time.monotonic()
        try:
            ack = await self.apply(batch, reporter.cursor_key(batch.source), checked)
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

    def _refuse(self, reporter: str, source: str, refused: list[Checked]) -> web.Response:
        """403 for the whole batch: nothing in it is applied. ``rejected`` lists every entry
        refused, so an honest gateway drops those (they can never be accepted) and re-sends
        the rest; its next acknowledgement moves its cursor past them (gateway/reporting.py)."""
        metrics.BATCHES.labels(result="refused").inc()
        for entry in refused:
            assert entry.refusal is not None
            metrics.REFUSED.labels(reason=entry.refusal.value).inc()
        first = refused[0]
        assert first.refusal is not None
        log.warning(
            "refused %d entries from %s (source %s), the first: %s",
            len(refused), reporter, source, first.message,
        )  # fmt: skip
        body = {
            "error": {"code": first.refusal.value, "message": first.message},
            "rejected": [
                {"seq": c.seq, "reason": c.refusal.value if c.refusal else "", "message": c.message}
                for c in refused[:MAX_REJECTED_LISTED]
            ],
        }
        return web.Response(status=403, body=orjson.dumps(body), content_type="application/json")

    async def apply(self, batch: UsageBatch, cursor: str, checked: list[Checked]) -> BatchAck:
        by_team: dict[str, list[Entry]] = defaultdict(list)
        unattributed = 0
        for entry in checked:
            if not entry.team:
                unattributed += 1  # refused by the gateway before attribution: costs nothing
                continue
            by_team[entry.team].append(Entry(entry.seq, entry.record, entry.signal))
        results = await asyncio.gather(
            *(
                self._apply_team(cursor, batch.source, team, entries)
                for team, entries in by_team.items()
            )
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
        self, cursor: str, source: str, team: str, entries: list[Entry]
    ) -> tuple[str, BudgetPhase | None, Applied | None]:
        try:
            commit, applied = await self.accountant.mutate(
                team, usage_mutation(cursor, entries, legacy=source)
            )
        except BudgetGoneError:
            # No such (valid) TeamBudget: nobody can be charged; dropping is all we can do.
            metrics.RECORDS_UNATTRIBUTED.inc(len(entries))
            return team, None, None
        _observe(commit, applied)
        return team, commit.after.phase, applied


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
    # lingering_time=0: a batch refused before its body is read (an unauthenticated
    # caller) is answered and its connection closed, the body never read (not even drained).
    runner = web.AppRunner(ingestion.app(), access_log=None, lingering_time=0)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    log.info("usage ingestion listening on %s:%d (%s)", host, port,
             "https" if ssl_context else "http")  # fmt: skip
    return runner


__all__ = ["Ingestion", "serve", "usage_mutation"]
