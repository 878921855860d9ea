"""``POST /v1/usage``: where gateways deliver numbered usage (served on ``--ingest-port``,
next to ``POST /v1/leases``, controllers/leases.py).

Only the leader applies batches (others answer 503 and the gateway retries, reaching the
leader through the Service or after a handover). A batch is acknowledged only once every
team it touches has its books patched in the API server. A transient failure for any team
fails the batch (503), and the re-sent batch is a no-op for the teams already applied,
thanks to the per-source cursors (docs/accounting.md). A permanent failure for one team
(the API server refuses its status) *holds* that team's entries: the answer lists them
(``held``), the gateway keeps them and re-sends them, and every other team's entries are
applied and acknowledged (one team never blocks another).

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
from typing import Any, Protocol

import orjson
from aiohttp import web
from pydantic import ValidationError

from costwarden.accounting.batch import BatchAck, HeldEntry, UsageBatch
from costwarden.accounting.books import Books
from costwarden.accounting.held import HeldUsage
from costwarden.accounting.ledger import Applied, Entry, apply_entries
from costwarden.accounting.trust import Checked, Refusal
from costwarden.api.attribution import FIXED_KEYS
from costwarden.api.gatewayconfig import GatewayConfig
from costwarden.api.meta import API_VERSION
from costwarden.api.teambudget import BudgetPhase
from costwarden.controllers import accounting_metrics as metrics
from costwarden.controllers import clock
from costwarden.controllers.accountant import Accountant, BudgetGoneError, Commit
from costwarden.controllers.answers import error_response
from costwarden.controllers.events import event_body, post_event
from costwarden.controllers.ingest_auth import IngestAuth
from costwarden.controllers.ingest_trust import PodView, PriceMemory, TransientError, check_batch
from costwarden.controllers.leadership import Leadership
from costwarden.controllers.leases import Leasing
from costwarden.controllers.rest import ApiError, Rest
from costwarden.controllers.results import Results

log = logging.getLogger(__name__)

MAX_BODY = 32 * 1024 * 1024
MAX_REJECTED_LISTED = 5000
EVENT_SECONDS = 300.0
"""At most one UsageHeld Event per team this often (the metric counts every batch)."""


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
        held: HeldUsage | None = None,
        on_held_change: Callable[[], None] | None = None,
        store: StoreSink | None = None,
    ) -> None:
        self.held = held or HeldUsage()
        """Which teams are held now (the reconciler's UsageApplied condition)."""
        self.on_held_change = on_held_change
        self.accountant = accountant
        self.store = store
        self.auth = auth
        self.leadership = leadership
        self.config = config
        self.rest = rest
        self._held_events: dict[str, float] = {}
        self.pods = PodView(rest)
        self.prices = PriceMemory()
        self.leasing = Leasing(accountant, auth, leadership, config, self.pods)
        self.results: Results | None = None
        """``POST /v1/results`` and the forge webhook, served beside ``/v1/usage``."""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/v1/usage", self.handle)
        app.router.add_post("/v1/leases", self.leasing.handle)
        app.router.add_get("/healthz", _ok)
        if self.results is not None:
            self.results.routes(app)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        verdict = await self.auth.check(request.headers.get("Authorization", ""))
        if not verdict.allowed:
            metrics.BATCHES.labels(result="unauthorized").inc()
            return error_response(verdict.status, "unauthorized", verdict.message)
        if not await self.leadership.is_leader():
            metrics.BATCHES.labels(result="not_leader").inc()
            return error_response(503, "not_leader", "this operator replica is not the leader")
        try:
            batch = UsageBatch.model_validate(orjson.loads(await request.read()))
        except (ValidationError, orjson.JSONDecodeError) as exc:
            metrics.BATCHES.labels(result="invalid").inc()
            metrics.REFUSED.labels(reason=Refusal.INVALID_BATCH.value).inc()
            return error_response(400, Refusal.INVALID_BATCH.value, str(exc)[:2000])
        config = self.config()
        if config is None:
            metrics.BATCHES.labels(result="not_ready").inc()
            return error_response(
                503, "not_ready", "no gateway configuration rendered yet; re-send"
            )
        reporter = verdict.reporter
        try:
            checked = await check_batch(batch, reporter, config, self.pods, self.prices,
                                        clock.now())  # fmt: skip
        except TransientError as exc:
            metrics.BATCHES.labels(result="failed").inc()
            log.warning(
                "batch from %s not checked (the gateway re-sends it): %s", reporter.identity, exc
            )
            return error_response(503, "not_applied", "the batch could not be checked; re-send it")
        refused = [c for c in checked if c.refusal is not None]
        if refused:
            return self._refuse(reporter.identity, batch.source, refused)
        for entry in checked:
            for key in entry.invalid_tags:
                metrics.ATTRIBUTION_INVALID.labels(key=key if key in FIXED_KEYS else "other").inc()
        started = time.monotonic()
        try:
            ack = await self.apply(batch, reporter.cursor_key(batch.source), checked)
        except Exception as exc:
            metrics.BATCHES.labels(result="failed").inc()
            log.warning(
                "batch from %s not applied (the gateway re-sends it): %s", batch.source, exc
            )
            return error_response(503, "not_applied", "the batch could not be applied; re-send it")
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
        """Apply each team's entries (one guarded write per team, in parallel).

        Teams are isolated: a team whose books cannot be written for a reason a re-send
        does not cure (:func:`permanent`, e.g. a 422 from the API server) has its entries
        *held* (listed in the answer, not applied; the gateway keeps them in its ledger and
        re-sends them, with that team's later entries queued behind them) while every other
        team's entries are applied and acknowledged. A transient failure of any team fails
        the batch (503) as before: the re-sent batch is a no-op for the teams already
        applied (their cursors moved in the same write as their totals)."""
        by_team: dict[str, list[Entry]] = defaultdict(list)
        unattributed = 0
        for entry in checked:
            if not entry.team:
                unattributed += 1  # refused by the gateway before attribution: costs nothing
                continue
            by_team[entry.team].append(Entry(entry.seq, entry.record, entry.signal))
        teams = list(by_team)
        results = await asyncio.gather(
            *(self._apply_team(cursor, batch.source, team, by_team[team]) for team in teams),
            return_exceptions=True,
        )
        phases: dict[str, BudgetPhase] = {}
        applied: list[Applied] = []
        held: list[HeldEntry] = []
        transient: BaseException | None = None
        changed = False
        for team, result in zip(teams, results, strict=True):
            if isinstance(result, BaseException):
                if not permanent(result):
                    transient = transient or result
                    continue
                reason = _reason(result)
                held.extend(HeldEntry(seq=e.seq, team=team, reason=reason) for e in by_team[team])
                await self._report_held(team, len(by_team[team]), batch.source, result)
                changed |= self.held.hold(
                    team, batch.source, len(by_team[team]), reason, str(result)[:600]
                )
                continue
            changed |= self.held.applied(team, batch.source)
            _, phase, done = result
            if phase is not None:
                phases[team] = phase
            if done is not None:
                applied.append(done)
        if changed and self.on_held_change is not None:
            self.on_held_change()  # the reconciler writes the UsageApplied condition
        if transient is not None:
            raise transient
        metrics.RECORDS_UNATTRIBUTED.inc(unattributed)
        last = max((item.seq for item in batch.items), default=0)
        first_held = min((h.seq for h in held), default=last + 1)
        return BatchAck(
            source=batch.source,
            acked_seq=min(last, first_held - 1),
            teams=phases,
            records=sum(len(a.records) for a in applied),
            duplicates=sum(a.duplicates for a in applied),
            applied_through=last if held else 0,
            held=sorted(held, key=lambda h: h.seq),
        )

    async def _report_held(self, team: str, count: int, source: str, error: BaseException) -> None:
        """A team's usage is held: a metric, a log line and a Warning Event on its
        TeamBudget (what ``kubectl describe teambudget`` shows)."""
        metrics.RECORDS_HELD.labels(team=team).inc(count)
        metrics.TEAM_FAILURES.labels(team=team, reason=_reason(error)).inc()
        log.error(
            "TeamBudget %s: %d usage entries from %s held (not applied; re-sent by the "
            "gateway, other teams unaffected): %s", team, count, source, error,
        )  # fmt: skip
        budget = self.accountant.budget(team)
        now = time.monotonic()
        if budget is None or now - self._held_events.get(team, -EVENT_SECONDS) < EVENT_SECONDS:
            return  # one Event per team per EVENT_SECONDS: the gateway re-sends often
        self._held_events[team] = now
        await post_event(
            self.rest,
            event_body(
                api_version=API_VERSION, kind="TeamBudget", namespace=budget.namespace,
                name=budget.name, uid=budget.uid, event_type="Warning", reason="UsageHeld",
                message=f"{count} usage entries from gateway {source} could not be written "
                f"to this TeamBudget's status and are held (kept by the gateway, re-sent "
                f"until they apply; nothing is lost): {str(error)[:600]}",
            ),
        )  # fmt: skip

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
        if self.store is not None:
            await self._store(cursor, team, entries)
        return team, commit.after.phase, applied

    async def _store(self, cursor: str, team: str, entries: list[Entry]) -> None:
        """Write the team's records to the usage store after its books and before the
        acknowledgement (store/writer.py: exactly once). A failure fails the batch like a
        transient API error: the gateway re-sends, the books skip, the store catches up."""
        assert self.store is not None
        config = self.config()
        try:
            await self.store.write(cursor, team, entries, config, self.prices)
        except Exception as exc:
            metrics.STORE_FAILURES.inc()
            log.error("usage store write for %s failed (the batch is re-sent): %s", team, exc)
            raise StoreWriteError(str(exc)) from exc


class StoreWriteError(RuntimeError):
    """The usage store could not be written: transient (the batch is re-sent)."""


class StoreSink(Protocol):
    """Where acknowledged records go besides the books (controllers/store_sink.py)."""

    async def write(
        self,
        cursor: str,
        team: str,
        entries: list[Entry],
        config: GatewayConfig | None,
        prices: PriceMemory,
    ) -> None: ...


def permanent(error: BaseException) -> bool:
    """Whether a team's write failed for a reason that re-sending the same entries does not
    cure: the API server refused the status (400, 403, 413, 422: a schema bound, a webhook,
    a quota) or the books could not be rendered (a value no model accepts). Conflicts,
    throttling, 5xx and network errors are transient (the batch is retried)."""
    if isinstance(error, ApiError):
        return 400 <= error.status < 500 and error.status not in (404, 408, 409, 429)
    return isinstance(error, ValueError | ValidationError | ArithmeticError)


def _reason(error: BaseException) -> str:
    if isinstance(error, ApiError):
        return f"http_{error.status}"
    return type(error).__name__


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


__all__ = ["Ingestion", "StoreSink", "StoreWriteError", "serve", "usage_mutation"]
