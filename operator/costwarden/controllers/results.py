"""``POST /v1/results`` and ``POST /v1/results/github``: how changes ended, from CI or a forge.

Served by the ingestion server (HTTPS, ``--ingest-port``). Who may report, and whose books
a report changes (docs/attribution.md, docs/security-ingestion.md):

- **a service-account token for the audience** ``costwarden.io/results`` (a CI runner's
  projected token, or ``kubectl create token ci --audience costwarden.io/results``),
  reviewed by the API server: it may report outcomes of any repository, and they change
  the books of exactly the TeamBudgets that list that service account in
  ``spec.attribution.resultReporters`` (a team decides who speaks for its changes); a
  token no TeamBudget lists is refused (403);
- **the results token** (``--results-token-file``, a Secret the cluster admin mounts, one
  token a line): the admin's CI; its reports apply to every team;
- **a GitHub webhook** (``/v1/results/github``), signed with the secret in
  ``--github-webhook-secret-file`` (HMAC-SHA256, ``X-Hub-Signature-256``): the forge is
  the authority on its pull requests; its reports apply to every team.

A report only changes books where spend of the team carries that change's tag in the
current period (accounting.changes), so an outcome can never create spend, and a team's
tags only ever join to the team's own spend. Only the leader applies reports (others
answer 503; the sender retries, as forges do for a failed delivery).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from costwarden.accounting.books import Books
from costwarden.accounting.changes import apply_outcome
from costwarden.accounting.forge import (
    GITHUB_EVENT_HEADER,
    GITHUB_SIGNATURE_HEADER,
    PayloadError,
    github_outcomes,
    verify_github_signature,
)
from costwarden.api.results import RESULTS_AUDIENCE, ChangeOutcome, ResultReport
from costwarden.controllers import accounting_metrics as metrics
from costwarden.controllers import clock
from costwarden.controllers.accountant import Accountant, BudgetGoneError
from costwarden.controllers.answers import error_response
from costwarden.controllers.budgets import Budget, BudgetIndex
from costwarden.controllers.leadership import Leadership
from costwarden.controllers.rest import ApiError, Rest

log = logging.getLogger(__name__)

MAX_RESULT_BODY = 64 * 1024
MAX_WEBHOOK_BODY = 25 * 1024 * 1024
"""GitHub caps webhook payloads at 25 MB."""
VERDICT_TTL = 60.0
SA_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True)
class Reporter:
    status: int
    source: str = ""
    message: str = ""
    service_account: tuple[str, str] | None = None
    """(namespace, name) of a service-account reporter; None for the admin's credentials."""


class Results:
    def __init__(
        self,
        accountant: Accountant,
        budgets: BudgetIndex,
        leadership: Leadership,
        rest: Rest | None,
        *,
        token_file: Path | None = None,
        github_secret_file: Path | None = None,
        log_file: Path | None = None,
    ) -> None:
        self.accountant = accountant
        self.budgets = budgets
        self.leadership = leadership
        self.rest = rest
        self.token_file = token_file
        self.github_secret_file = github_secret_file
        self.log_file = log_file
        self._cache: dict[str, tuple[float, Reporter]] = {}
        self.on_outcome: list[Callable[[ChangeOutcome], None]] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/results", self.handle)
        app.router.add_post("/v1/results/github", self.handle_github)

    # -- POST /v1/results ---------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        reporter = await self.authenticate(request.headers.get("Authorization", ""))
        if reporter.status != 200:
            metrics.RESULTS.labels(result="unauthorized").inc()
            return error_response(reporter.status, "unauthorized", reporter.message)
        if not await self.leadership.is_leader():
            return error_response(503, "not_leader", "this operator replica is not the leader")
        body = await request.content.read(MAX_RESULT_BODY + 1)
        if len(body) > MAX_RESULT_BODY:
            return error_response(413, "too_large", f"a report is at most {MAX_RESULT_BODY} bytes")
        try:
            report = ResultReport.model_validate(orjson.loads(body))
        except (ValidationError, orjson.JSONDecodeError) as exc:
            metrics.RESULTS.labels(result="invalid").inc()
            return error_response(400, "invalid_report", str(exc)[:2000])
        teams = self.teams_for(reporter)
        if reporter.service_account is not None and not teams:
            metrics.RESULTS.labels(result="unauthorized").inc()
            namespace, name = reporter.service_account
            return error_response(
                403,
                "not_a_result_reporter",
                f"no TeamBudget lists service account {namespace}/{name} in "
                "spec.attribution.resultReporters",
            )
        outcome = report.stamped(reporter.source, clock.now())
        try:
            changed = await self.record(outcome, teams)
        except Exception as exc:
            metrics.RESULTS.labels(result="failed").inc()
            log.warning("outcome %s not applied (the sender retries): %s", outcome, exc)
            return error_response(
                503, "not_applied", "the outcome could not be applied; re-send it"
            )
        metrics.RESULTS.labels(result="applied").inc()
        return _json({"outcome": outcome.to_wire(), "teams": changed})

    # -- POST /v1/results/github --------------------------------------------------------

    async def handle_github(self, request: web.Request) -> web.Response:
        secrets = self._lines(self.github_secret_file)
        if not secrets:
            return error_response(404, "not_configured", "no GitHub webhook secret is configured")
        body = await request.content.read(MAX_WEBHOOK_BODY + 1)
        if len(body) > MAX_WEBHOOK_BODY:
            return error_response(413, "too_large", "the delivery is larger than GitHub sends")
        signature = request.headers.get(GITHUB_SIGNATURE_HEADER, "")
        if not verify_github_signature(secrets, body, signature):
            metrics.RESULTS.labels(result="unauthorized").inc()
            return error_response(401, "bad_signature", f"{GITHUB_SIGNATURE_HEADER} does not match")
        if not await self.leadership.is_leader():
            return error_response(503, "not_leader", "this operator replica is not the leader")
        event = request.headers.get(GITHUB_EVENT_HEADER, "")
        try:
            payload = orjson.loads(body)
            reports = github_outcomes(event, payload if isinstance(payload, dict) else {})
        except (orjson.JSONDecodeError, PayloadError) as exc:
            metrics.RESULTS.labels(result="invalid").inc()
            return error_response(400, "invalid_payload", str(exc)[:2000])
        if not reports:
            return _json({"ignored": f"event {event[:40]!r} reports no outcome"}, status=202)
        now = clock.now()
        done: list[dict[str, Any]] = []
        try:
            for report in reports:
                outcome = report.stamped("github-webhook", now)
                teams = await self.record(outcome, self.teams_for(Reporter(200, "github")))
                done.append({"outcome": outcome.to_wire(), "teams": teams})
        except Exception as exc:
            metrics.RESULTS.labels(result="failed").inc()
            log.warning("GitHub delivery not applied (GitHub redelivers on error): %s", exc)
            return error_response(503, "not_applied", "the delivery could not be applied")
        metrics.RESULTS.labels(result="applied").inc(len(reports))
        return _json({"applied": done})

    # -- applying -----------------------------------------------------------------------

    def teams_for(self, reporter: Reporter) -> list[Budget]:
        budgets = self.budgets.all()
        if reporter.service_account is None:
            return budgets
        namespace, name = reporter.service_account
        return [
            b
            for b in budgets
            if any(
                (ref.namespace or b.namespace, ref.name) == (namespace, name)
                for ref in b.spec.attribution.result_reporters
            )
        ]

    async def record(self, outcome: ChangeOutcome, teams: list[Budget]) -> list[str]:
        """Apply the outcome to each team's books (one guarded write per team whose books
        it changes); the ids of the teams it changed."""
        self._log(outcome)
        for hook in self.on_outcome:
            hook(outcome)

        def mutate(books: Books, _now: Any) -> bool:
            return apply_outcome(books.changes, outcome)

        async def one(budget: Budget) -> str:
            if not _carries(self.accountant.status_of(budget), outcome):
                return ""  # no write queued: most teams never spent on a given change
            try:
                _commit, changed = await self.accountant.mutate(budget.id, mutate)
            except BudgetGoneError:
                return ""
            return budget.id if changed else ""

        changed = await asyncio.gather(*(one(b) for b in teams))
        return sorted(team for team in changed if team)

    def _log(self, outcome: ChangeOutcome) -> None:
        """Append the outcome to ``--results-log`` (JSON Lines of ChangeOutcome): what the
        usage store and ``costwarden report`` join to spend over any period."""
        if self.log_file is None:
            return
        with self.log_file.open("ab") as handle:
            handle.write(orjson.dumps(outcome.to_wire()) + b"\n")

    # -- who is reporting ---------------------------------------------------------------

    async def authenticate(self, authorization: str) -> Reporter:
        if authorization[:7].lower() != "bearer " or not authorization[7:].strip():
            return Reporter(401, message="send a results credential as Authorization: Bearer")
        token = authorization[7:].strip().encode()
        if any(hmac.compare_digest(token, t) for t in self._lines(self.token_file)):
            return Reporter(200, "token:results")
        key = hashlib.sha256(token).hexdigest()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        reporter = await self._review(token.decode(errors="replace"))
        if reporter.status == 503:
            return reporter  # the API server did not answer: not a verdict to remember
        self._cache[key] = (time.monotonic() + VERDICT_TTL, reporter)
        if len(self._cache) > 10_000:
            self._cache.clear()
        return reporter

    async def _review(self, token: str) -> Reporter:
        if self.rest is None or token.count(".") != 2:
            return Reporter(401, message="the credential is not a known results token")
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [RESULTS_AUDIENCE]},
        }
        try:
            review = await self.rest.post("/apis/authentication.k8s.io/v1/tokenreviews", body)
        except ApiError as error:
            log.error("TokenReview failed: HTTP %s", error.status)
            return Reporter(503, message="the credential could not be reviewed now; retry")
        status = review.get("status") or {}
        user = str((status.get("user") or {}).get("username") or "")
        if not status.get("authenticated") or not user.startswith(SA_PREFIX):
            return Reporter(
                401,
                message=f"the API server does not accept this token for the audience "
                f"{RESULTS_AUDIENCE} (mint one: kubectl create token <sa> --audience "
                f"{RESULTS_AUDIENCE})",
            )
        namespace, _, name = user[len(SA_PREFIX) :].partition(":")
        return Reporter(200, f"sa:{namespace}/{name}", service_account=(namespace, name))

    @staticmethod
    def _lines(path: Path | None) -> list[bytes]:
        if path is None:
            return []
        # Re-read each time (a few bytes): a rotated Secret applies without a restart.
        try:
            text = path.read_text()
        except OSError:
            return []
        return [line.strip().encode() for line in text.splitlines() if line.strip()]


def _carries(status: Mapping[str, Any], outcome: ChangeOutcome) -> bool:
    """Whether a team's status lists spend on the outcome's change (the newest status the
    accountant knows, its own last write included, so spend just applied is seen)."""
    changes = status.get("changes")
    listed = changes.get("changes") if isinstance(changes, Mapping) else None
    return any(
        isinstance(c, Mapping)
        and c.get("change") == outcome.change
        and c.get("repository") == outcome.repository
        for c in listed or []
    )


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


__all__ = ["Reporter", "Results"]
