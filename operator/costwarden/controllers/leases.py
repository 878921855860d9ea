"""``POST /v1/leases``: gateway replicas ask for a share of a team's budget (policy/leases.py).

Served next to ``POST /v1/usage`` on the ingest port, with the same credentials: a
replica is the holder ``<reporter>#<source>``, the key its usage cursor has, so applying
its usage draws from its own lease (accounting/ledger.py). A sidecar may lease only for
the team its own pod belongs to, as the API server has the pod; a shared gateway's
service account for any team of the configuration.

Only the leader grants, and only once the grant is in the API server (the same guarded
status write as usage): a new leader reads every outstanding lease there. A lease is
reclaimed when its holder has been silent for ``LEASE_SECONDS`` *while this operator was
able to hear it* (the leader, writing status). After a restart, a handover or an API-server
outage, every replica gets that long again to renew: an outage of the control plane never
reclaims a live replica's lease, so it never lets a dollar be lent twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from aiohttp import web

from costwarden.accounting.leasing import LeaseResult, lease_mutation
from costwarden.accounting.trust import Reporter
from costwarden.api.gatewayconfig import GatewayConfig
from costwarden.api.teambudget import RequestAction
from costwarden.api.usage import format_exact_usd
from costwarden.controllers import accounting_metrics as metrics
from costwarden.controllers.accountant import Accountant, BudgetGoneError
from costwarden.controllers.answers import error_response
from costwarden.controllers.ingest_auth import IngestAuth
from costwarden.controllers.ingest_trust import PodView, TransientError
from costwarden.controllers.leadership import Leadership
from costwarden.policy.leases import LEASE_SECONDS, STARVING_SECONDS, LeaseAsk

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
MAX_TEAMS = 32
MAX_AMOUNT = Decimal(10) ** 12

ConfigSource = Callable[[], GatewayConfig | None]


class BadLeaseRequestError(ValueError):
    pass


class Leasing:
    def __init__(
        self,
        accountant: Accountant,
        auth: IngestAuth,
        leadership: Leadership,
        config: ConfigSource,
        pods: PodView,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.accountant = accountant
        self.auth = auth
        self.leadership = leadership
        self.config = config
        self.pods = pods
        self._clock = clock
        self._heard: dict[tuple[str, str], float] = {}
        self._healthy_since = clock()
        self._short: dict[str, float] = {}
        self.lease_seconds = LEASE_SECONDS

    async def handle(self, request: web.Request) -> web.Response:
        verdict = await self.auth.check(request.headers.get("Authorization", ""))
        if not verdict.allowed:
            return error_response(verdict.status, "unauthorized", verdict.message)
        if not await self.leadership.is_leader():
            self._unhealthy()
            metrics.LEASE_REQUESTS.labels(result="unavailable").inc()
            return error_response(503, "not_leader", "this operator replica is not the leader")
        try:
            source, asks = parse_request(await request.read())
        except (BadLeaseRequestError, orjson.JSONDecodeError) as exc:
            return error_response(400, "invalid_lease_request", str(exc)[:1000])
        config = self.config()
        if config is None:
            return error_response(
                503, "not_ready", "no gateway configuration rendered yet; ask again"
            )
        reporter = verdict.reporter
        try:
            allowed = await self._teams_of(reporter, config)
        except TransientError as exc:
            return error_response(503, "not_ready", f"the reporter's pod could not be read: {exc}")
        answers = []
        for team_id, ask in asks:
            team = config.team(team_id)
            if team is None or (allowed is not None and team_id not in allowed):
                metrics.LEASE_REQUESTS.labels(result="refused").inc()
                return error_response(
                    403, "not_your_team", f"{reporter.identity} may not lease for {team_id}"
                )
            if team.on_hard_cap.requests is RequestAction.ALLOW:
                answers.append(_unlimited(team_id, ask))
                continue
            try:
                answers.append(await self._grant(team_id, reporter.cursor_key(source), ask))
            except BudgetGoneError:
                return error_response(404, "no_team_budget", f"TeamBudget {team_id} is gone")
            except Exception as exc:
                self._unhealthy()
                metrics.LEASE_REQUESTS.labels(result="unavailable").inc()
                log.warning("lease for %s not granted (written state unknown): %s", team_id, exc)
                return error_response(
                    503, "not_applied", "the lease could not be written; ask again"
                )
        return web.Response(body=orjson.dumps({"teams": answers}), content_type="application/json")

    async def _teams_of(self, reporter: Reporter, config: GatewayConfig) -> set[str] | None:
        """The teams a reporter may lease for: a sidecar, its own pod's team; else any."""
        if not reporter.is_sidecar:
            return None
        pod = await self.pods.get(reporter.namespace, reporter.pod, reporter.pod_uid)
        if pod is None:
            return set()
        team = config.team_for_workload(pod.namespace, dict(pod.labels))
        return {team.id} if team is not None else set()

    async def _grant(self, team_id: str, holder: str, ask: LeaseAsk) -> dict[str, Any]:
        budget = self.accountant.budget(team_id)
        if budget is None:
            raise BudgetGoneError(team_id)
        now = self._clock()
        self._heard[(team_id, holder)] = now
        starving = min(STARVING_SECONDS, 2 * self.lease_seconds / 3)
        contended = now - self._short.get(team_id, -starving) < starving
        mutation = lease_mutation(
            holder,
            ask,
            budget.spec.hard_cap_usd,
            silent=lambda h: self._silent(team_id, h, now),
            contended=contended,
        )
        commit, result = await self.accountant.mutate(team_id, mutation)
        assert isinstance(result, LeaseResult)
        for gone in result.reclaimed:
            self._heard.pop((team_id, gone), None)
            metrics.LEASES_RECLAIMED.labels(team=team_id).inc()
            log.info("TeamBudget %s: lease of %s reclaimed (silent %ss)", team_id, gone,
                     self.lease_seconds)  # fmt: skip
        metrics.LEASED_USD.labels(team=team_id).set(
            float(sum((lease.amount for lease in commit.books.leases.values()), Decimal(0)))
        )
        decided = result.grant
        if decided.short:
            self._short[team_id] = now
        result_label = "granted"
        if decided.trip is not None:
            result_label = "cap_reached"
        elif decided.short:
            result_label = "short"
        metrics.LEASE_REQUESTS.labels(result=result_label).inc()
        return {
            "team": team_id,
            "leasedUSD": format_exact_usd(decided.amount),
            "appliedSeq": result.applied_seq,
            "periodStart": result.period_start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "expiresInSeconds": self.lease_seconds,
            "final": decided.trip is not None,
            "message": decided.message,
            "phase": commit.after.phase.value,
            "contended": contended or decided.short,
        }

    def _silent(self, team_id: str, holder: str, now: float) -> bool:
        """Silent for a lease's life while this operator could hear it (see module doc)."""
        heard = self._heard.get((team_id, holder), self._healthy_since)
        return now - max(heard, self._healthy_since) > self.lease_seconds

    def _unhealthy(self) -> None:
        """Replicas could not renew meanwhile: give each a full lease life again."""
        self._healthy_since = self._clock()


def parse_request(raw: bytes) -> tuple[str, list[tuple[str, LeaseAsk]]]:
    if len(raw) > MAX_BODY:
        raise BadLeaseRequestError(f"a lease request is at most {MAX_BODY} bytes")
    body = orjson.loads(raw)
    if not isinstance(body, dict):
        raise BadLeaseRequestError("a lease request is a JSON object")
    source = body.get("source")
    if not isinstance(source, str) or not 0 < len(source) <= 256:
        raise BadLeaseRequestError("source must be the reporter's usage source id (1-256 chars)")
    teams = body.get("teams")
    if not isinstance(teams, list) or not 0 < len(teams) <= MAX_TEAMS:
        raise BadLeaseRequestError(f"teams must list 1 to {MAX_TEAMS} requests")
    asks = []
    for entry in teams:
        if not isinstance(entry, dict) or not isinstance(entry.get("team"), str):
            raise BadLeaseRequestError("each request names its team")
        values = {k: _amount(entry, k) for k in ("want", "need", "floor", "inUse", "unapplied")}
        ask = LeaseAsk(
            want=values["want"],
            need=values["need"],
            floor=min(values["floor"], values["need"]) if values["need"] else values["floor"],
            in_use=values["inUse"],
            unapplied=min(values["unapplied"], values["inUse"]),
        )
        asks.append((entry["team"], ask))
    return source, asks


def _amount(entry: dict[str, Any], key: str) -> Decimal:
    value = entry.get(key, "0")
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise BadLeaseRequestError(f"{key} must be a decimal string")
    try:
        amount = Decimal(value)
    except InvalidOperation as exc:
        raise BadLeaseRequestError(f"{key} must be a decimal string") from exc
    if not amount.is_finite() or amount < 0 or amount > MAX_AMOUNT:
        raise BadLeaseRequestError(f"{key} must be between 0 and {MAX_AMOUNT}")
    return amount


def _unlimited(team_id: str, ask: LeaseAsk) -> dict[str, Any]:
    """A team whose hard cap does not block: nothing to lend, every call fits."""
    return {
        "team": team_id,
        "leasedUSD": format_exact_usd(max(ask.want, ask.in_use + ask.need)),
        "appliedSeq": 0,
        "expiresInSeconds": LEASE_SECONDS,  # nothing to reclaim: any life will do
        "final": False,
        "message": "",
    }
