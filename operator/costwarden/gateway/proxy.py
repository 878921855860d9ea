"""The request pipeline: identify, attribute, admit, route, forward, account.

Each step is a call into the module that decides it (identity, policy.limits via
gateway.limits, policy.routing) and every refusal leaves through :meth:`Gateway.refuse`,
so a refused call always gets the API's own error shape, costs nothing and is recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from costwarden.api.gatewayconfig import ModelRoute
from costwarden.api.routingpolicy import Locality, Sensitivity
from costwarden.api.teambudget import RequestAction
from costwarden.api.usage import (
    Endpoint,
    LoopKind,
    LoopSignal,
    Outcome,
    RefusalReason,
    UsageSink,
)
from costwarden.gateway.call import Call, log_decision
from costwarden.gateway.config import CompiledConfig, ConfigStore
from costwarden.gateway.credentials import Credentials
from costwarden.gateway.forward import forward, forward_count
from costwarden.gateway.holds import HoldJournal
from costwarden.gateway.identity import (
    Identifier,
    IdentityUnavailableError,
    UnattributedError,
    resolve_team,
)
from costwarden.gateway.leases import LeaseAnswer, Leases
from costwarden.gateway.limits import Admission, JobState, Limits
from costwarden.gateway.metrics import GatewayMetrics
from costwarden.gateway.reservations import Reservations
from costwarden.gateway.telemetry import CallTelemetry
from costwarden.gateway.upstream import UpstreamClient
from costwarden.gateway.wire import (
    BadRequestError,
    WireFormat,
    estimate_prompt_tokens,
    take_hints,
)
from costwarden.policy import reservation as reserve
from costwarden.policy.loops import fingerprint
from costwarden.policy.pricing import call_cost
from costwarden.policy.routing import (
    CompiledPolicy,
    RequestTraits,
    RouteDecision,
    RouteRefusal,
    decide,
)
from costwarden.supervision import Supervisor

log = logging.getLogger("costwarden.gateway")

MAX_SESSIONS = 100_000
# Refusals a client must not retry blindly: both SDKs honour x-should-retry.
_FINAL = {
    RefusalReason.HARD_CAP,
    RefusalReason.JOB_COST_CAP,
    RefusalReason.JOB_TOKEN_CAP,
    RefusalReason.RETRY_LOOP,
    RefusalReason.MISSING_CREDENTIALS,  # until an admin fixes the Secret
}
_ROUTE_STATUS = {"incompatible_route": 400, "confidential_requires_in_cluster": 403}


def key_digest(text: str) -> bytes:
    """A 16-byte digest of a client- or upstream-chosen key (a session id of up to the
    header limit, a response id): what the bounded maps below store instead of the key, so
    an entry's size does not depend on what the caller sends."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class _BoundedLru:
    """``(team, digest) -> model`` with at most ``size`` entries, least recently used
    evicted first. Team ids and model names come from the configuration (bounded there);
    the digest is 16 bytes: about 180 bytes an entry (measured), 17 MiB at the default
    :data:`MAX_SESSIONS` (docs/operations.md, "Memory bounds")."""

    def __init__(self, size: int = MAX_SESSIONS) -> None:
        self._size = size
        self._models: OrderedDict[tuple[str, bytes], str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._models)

    def _get(self, team: str, key: str) -> str:
        return self._models.get((team, key_digest(key)), "")

    def _remember(self, team: str, key: str, model: str) -> None:
        entry = (team, key_digest(key))
        self._models[entry] = model
        self._models.move_to_end(entry)
        while len(self._models) > self._size:
            self._models.popitem(last=False)


class SessionAffinity(_BoundedLru):
    """Which model served a conversation (team, session key) last; bounded LRU."""

    def get(self, team: str, session: str) -> str:
        return self._get(team, session) if session else ""

    def remember(self, team: str, session: str, model: str) -> None:
        self._remember(team, session, model)


class ResponseHolders(_BoundedLru):
    """Which model served a stored Responses API answer (team, response id); bounded LRU.

    A call that continues it (``previous_response_id``) must go to the backend that stores
    it: another backend, even one speaking the same format, does not have it."""

    def get(self, team: str, response_id: str) -> str:
        return self._get(team, response_id)

    def remember(self, team: str, response_id: str, model: str) -> None:
        self._remember(team, response_id, model)


class Gateway:
    def __init__(
        self,
        *,
        config: ConfigStore,
        identifier: Identifier,
        upstream: UpstreamClient,
        sink: UsageSink,
        credentials: Credentials | None = None,
        metrics: GatewayMetrics | None = None,
        limits: Limits | None = None,
        replica_id: str = "",
        supervisor: Supervisor | None = None,
        reserving: bool = True,
        leases: Leases | None = None,
    ) -> None:
        self.config = config
        self.identifier = identifier
        self.upstream = upstream
        self.sink = sink
        self.credentials = credentials or Credentials()
        self.metrics = metrics or GatewayMetrics()
        self.limits = limits or Limits()
        self.affinity = SessionAffinity()
        self.holders = ResponseHolders()
        self.replica_id = replica_id
        self.supervisor = supervisor or Supervisor(
            "gateway", restarts=self.metrics.task_restarts, failing=self.metrics.task_failing
        )
        """Runs the background tasks (configuration watch, usage reporting, ledger); its
        problems fail ``/healthz``."""
        self._settled: dict[tuple[str, str], Any] = {}
        self._gauges: dict[str, Any] = {}  # reserved_usd children by team (labels() locks)
        self.reservations = Reservations(on_change=self._reserved_changed)
        self.reserving = reserving
        """Reserve before forwarding (invariant 4b). Off only in the benchmark that
        measures what reserving adds: a gateway without it can overspend its caps."""
        self.leases = leases
        """With the operator behind it: the budget this replica may reserve against, per
        team whose hard cap blocks (gateway/leases.py). None: a standalone gateway, which
        reserves against the configuration's spend snapshot alone."""
        self.holds: HoldJournal | None = None
        """With a ledger: each reservation written down before forwarding, so a call in
        flight at a kill is charged at its reservation after the restart (gateway/holds.py)."""
        self.telemetry: CallTelemetry | None = None
        """With ``--otel``: a GenAI span per call, over OTLP (gateway/telemetry.py)."""

    async def handle(
        self, request: web.BaseRequest, fmt: WireFormat, endpoint: Endpoint
    ) -> web.StreamResponse:
        call = Call(endpoint, fmt)
        if self.telemetry is not None and "traceparent" in request.headers:
            headers = request.headers
            call.trace_context = (headers["traceparent"], headers.get("tracestate", ""))
        try:
            return await self._serve(request, call)
        except asyncio.CancelledError:
            # The handler was cancelled (the client went away and the server cancels, or
            # shutdown): a call already sent may be billed without its usage ever arriving.
            if call.attempts and call.tokens is None:
                call.unmetered, call.error = True, "cancelled"
            raise
        except Exception:
            call.error = "internal_error"
            log.exception("call %s failed inside the gateway", call.id)
            if call.attempts and call.tokens is None:
                call.unmetered = True  # it may have been answered, and billed, upstream
            return self.refuse(call, 500, "internal_error", "costwarden gateway internal error")
        finally:
            self._account(call)

    async def _serve(self, request: web.BaseRequest, call: Call) -> web.StreamResponse:
        compiled = self.config.current
        if compiled is None:
            return self.refuse(call, 503, "not_ready", "the gateway has no configuration yet")
        call.revision = compiled.revision
        # Authenticate and attribute from the headers alone, before the body (up to
        # MAX_BODY) is read or parsed: an unauthenticated caller costs no read, no parse.
        refused = await self._attribute(request, call, compiled)
        if refused is not None:
            return refused
        if getattr(self.sink, "full", False):
            # The ledger is at its bound, or its volume refuses writes: a call now could
            # not be recorded, so it is not made (docs/ledger.md); it frees up as the
            # operator acknowledges usage, or the volume takes writes again.
            error = getattr(self.sink, "write_error", "")
            why = (
                f"the gateway cannot write its usage ledger ({error})"
                if error
                else "the gateway's usage ledger is full (usage not yet delivered to the operator)"
            )
            return self.refuse(call, 503, "ledger_full", f"{why}; retry later")
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return self.refuse(
                call, 400, RefusalReason.BAD_REQUEST, "the body is not a JSON object"
            )
        call.requested_model = str(body.get("model") or "")[:128]
        call.streaming = bool(body.get("stream"))
        return await self._route(request, call, compiled, body, raw)

    async def _attribute(
        self, request: web.BaseRequest, call: Call, compiled: CompiledConfig
    ) -> web.StreamResponse | None:
        try:
            call.caller = await self.identifier.identify(request.headers)
        except UnattributedError as exc:
            return self.refuse(call, 401, RefusalReason.UNATTRIBUTED, str(exc))
        except IdentityUnavailableError as exc:
            reason = RefusalReason.IDENTITY_CHECK_UNAVAILABLE
            return self.refuse(call, exc.status, reason, str(exc))
        call.team = resolve_team(call.caller, compiled)
        if call.team is None:
            caller = call.caller
            where = (
                f"team key for {caller.team_id}"
                if caller.team_id
                else (f"namespace {caller.namespace} (pod {caller.pod or '-'})")
            )
            return self.refuse(call, 403, RefusalReason.NO_TEAM, f"no TeamBudget covers {where}")
        call.policy_id = call.team.routing_policy or ""
        if call.policy_id not in compiled.policies:
            return self.refuse(
                call,
                403,
                RefusalReason.NO_ROUTING_POLICY,
                f"TeamBudget {call.team.id} has no usable RoutingPolicy: there is no model to "
                "route to",
            )
        return None

    async def _route(
        self,
        request: web.BaseRequest,
        call: Call,
        compiled: CompiledConfig,
        body: dict[str, Any],
        raw: bytes,
    ) -> web.StreamResponse:
        assert call.team is not None
        assert call.caller is not None
        try:
            hints = take_hints(request.headers, body)
        except BadRequestError as exc:
            return self.refuse(call, 400, RefusalReason.BAD_REQUEST, str(exc))
        call.task, call.sensitivity = hints.task, hints.sensitivity.value
        fp = fingerprint(body) if call.team.loop_detection.enabled else ""
        admission = self.limits.admit(call.team, compiled.revision, call.caller.unit, fp)
        if admission.refusal is not None:
            self._signal_loop(call, admission)
            return self.refuse(call, 429, admission.refusal.code, admission.refusal.message)
        call.admitted = True
        traits = RequestTraits(
            provider=call.fmt.provider,
            requested_model=call.requested_model,
            task=hints.task,
            prompt_tokens=estimate_prompt_tokens(len(raw)),
            has_tools=bool(body.get("tools") or body.get("functions")),
            sensitivity=hints.sensitivity,
        )
        policy = compiled.policies[call.policy_id]
        decision = decide(
            policy,
            traits,
            soft_limited=admission.phase.value == "SoftLimited",
            pinned_model=self.affinity.get(call.team.id, hints.session),
            prefer_requested=call.endpoint is Endpoint.EMBEDDINGS,
        )
        if isinstance(decision, RouteRefusal):
            call.rule = decision.rule
            status = _ROUTE_STATUS.get(decision.code, 403)
            return self.refuse(call, status, decision.code, decision.message)
        call.rule, call.reason, call.downgraded_from = (
            decision.rule,
            decision.reason,
            decision.downgraded_from,
        )
        previous = body.get("previous_response_id") if call.endpoint is Endpoint.RESPONSES else None
        if previous:
            pinned = self._stay_with_holder(call, policy, decision, str(previous), traits)
            if isinstance(pinned, web.Response):
                return pinned
            decision, call.reason = pinned, pinned.reason
        if self.reserving:
            held = await self._reserve_leased(call, compiled, policy, body, raw, decision)
            if isinstance(held, web.Response):
                return held
            decision = held
        wants_usage = call.fmt.prepare(body, call.endpoint)
        response = await forward(self, request, call, compiled, body, decision, wants_usage)
        if hints.session and policy.affinity and call.outcome is Outcome.OK and call.served:
            self.affinity.remember(call.team.id, hints.session, call.served.name)
        if call.response_id and call.served and call.outcome is Outcome.OK:
            self.holders.remember(call.team.id, call.response_id, call.served.name)
        return response

    async def _reserve_leased(
        self,
        call: Call,
        compiled: CompiledConfig,
        policy: CompiledPolicy,
        body: dict[str, Any],
        raw: bytes,
        decision: RouteDecision,
    ) -> RouteDecision | web.Response:
        """Reserve; when this replica's lease of the team's budget is short, ask the
        operator for more (one round trip, shared by the calls waiting) and try again."""
        for _ in range(LEASE_TRIES):
            held = self._reserve(call, compiled, policy, body, raw, decision)
            if not isinstance(held, LeaseNeeded):
                return held
            assert self.leases is not None
            assert call.team is not None
            answer = await self.leases.ask(call.team.id, held.need, held.floor)
            self.metrics.lease_asks.labels(_lease_result(answer)).inc()
            if not answer.granted:
                return self._refuse_reservation(
                    call, reserve.Shortfall("team_lease", answer.message, answer.final)
                )
        return self._refuse_reservation(
            call,
            reserve.Shortfall(
                "team_lease",
                "concurrent calls took this replica's lease of the team's budget each time "
                "it was renewed; retry",
                False,
            ),
        )

    def _reserve(
        self,
        call: Call,
        compiled: CompiledConfig,
        policy: CompiledPolicy,
        body: dict[str, Any],
        raw: bytes,
        decision: RouteDecision,
    ) -> RouteDecision | web.Response | LeaseNeeded:
        """Hold the call's worst case against every limit it counts against, or refuse it
        (429 ``budget_reservation_failed``, nothing sent, nothing charged), or say how much
        more lease it needs (:class:`LeaseNeeded`: the caller asks the operator).

        A fallback whose ``modelCaps`` entry cannot hold the call is dropped from the
        candidates; the routed model itself not fitting refuses the call. Never awaits:
        the checks and the hold are one atomic step of the event loop."""
        team, caller = call.team, call.caller
        assert team is not None
        assert caller is not None
        default = policy.policy.default_max_output_tokens
        ceiling, defaulted = reserve.output_ceiling(body, call.endpoint, default)
        prompt = reserve.prompt_token_bound(raw)
        revision = compiled.revision
        candidates = decision.candidates
        tier = reserve.requested_tier(body)
        worst = reserve.worst_case(prompt, ceiling, candidates, tier)
        routes = list(candidates)
        if team.model_caps:
            capped = {c.model for c in team.model_caps}
            for route in candidates:
                if route.name not in capped:
                    continue
                cost, tokens = self.limits.model_spend(team, revision, route.name)
                held = self.reservations.model(team.id, route.name)
                standing = reserve.Standing(cost, held.cost, tokens, held.tokens)
                short = reserve.model_shortfall(team, route, worst, standing, defaulted)
                if short is None:
                    continue
                if route is decision.model:
                    return self._refuse_reservation(call, short)
                routes.remove(route)
            if len(routes) < len(candidates):
                worst = reserve.worst_case(prompt, ceiling, routes, tier)
        spent, tokens_used = self.limits.team_spend(team, revision)
        held = self.reservations.team(team.id)
        leased = self.leases is not None and team.on_hard_cap.requests is RequestAction.BLOCK
        short = reserve.team_shortfall(
            team,
            worst,
            reserve.Standing(spent, held.cost),
            tokens_used,
            held.input_tokens,
            held.output_tokens,
            defaulted,
            money=not leased,  # the lease holds the cap, and the operator must see a refusal
        )
        if short is None:
            job = self.limits.job(team.id, caller.unit)
            held = self.reservations.job(team.id, caller.unit)
            standing = reserve.Standing(job.cost, held.cost, job.tokens, held.tokens)
            short = reserve.job_shortfall(team, caller.unit, worst, standing, defaulted)
            if short is not None and short.final:
                self._job_cap_reached(call, job, prompt, ceiling, default, routes, tier)
        if short is not None:
            return self._refuse_reservation(call, short)
        if leased:
            assert self.leases is not None
            if worst.cost > self.leases.available(team.id):
                floor = reserve.floor_case(prompt, ceiling, default, routes, tier)
                return LeaseNeeded(worst.cost, floor.cost)
        field = reserve.DEFAULT_CEILING_FIELD.get(call.endpoint)
        if defaulted and field and call.endpoint is not Endpoint.MESSAGES:
            # The ceiling that was reserved goes upstream, so the answer cannot outgrow it
            # (Anthropic requires max_tokens: a call without it is refused there, unbilled).
            body[field] = default or reserve.DEFAULT_MAX_OUTPUT_TOKENS
        call.reservation = self.reservations.hold(
            team, caller.unit, worst, tuple(routes), defaulted=defaulted
        )
        if self.holds is not None and not self.holds.hold(call, tuple(routes)):
            return self.refuse(call, 503, "ledger_full", "the gateway cannot write its usage "
                               "ledger; retry later")  # fmt: skip
        if len(routes) == len(candidates):
            return decision
        dropped = ", ".join(r.name for r in candidates if r not in routes)
        return RouteDecision(
            routes[0],
            tuple(routes[1:]),
            decision.rule,
            f"{decision.reason}; fallbacks over their modelCaps dropped: {dropped}",
            decision.downgraded_from,
        )

    def _job_cap_reached(
        self,
        call: Call,
        job: JobState,
        prompt: int,
        ceiling: int,
        default: int | None,
        routes: list[ModelRoute],
        tier: str | None,
    ) -> None:
        """A job's call does not fit its per-job cap even with nothing else in flight: if
        it would not fit at the default output ceiling either, the job's cap is reached,
        and the operator (which stops Jobs) is told once, by a JobCapReached signal."""
        team, caller = call.team, call.caller
        assert team is not None
        assert caller is not None
        floor = reserve.floor_case(prompt, ceiling, default, routes, tier)
        standing = reserve.Standing(job.cost, Decimal(0), job.tokens, 0)
        if job.cap_signalled or not caller.job:
            return
        if reserve.job_shortfall(team, caller.unit, floor, standing, False) is None:
            return  # a smaller call would still fit: an oversized call, not a spent cap
        job.cap_signalled = True
        signal = LoopSignal(
            time=datetime.now(UTC),
            team=team.id,
            namespace=caller.namespace,
            job=caller.job,
            pod=caller.pod,
            loop=LoopKind.JOB_CAP_REACHED,
            count=0,
            action=team.on_hard_cap.jobs,
            config_revision=call.revision,
            gateway_replica=self.replica_id,
        )
        self.sink.emit_loop_signal(signal)
        self.metrics.loop_signals.labels(team.id, LoopKind.JOB_CAP_REACHED.value).inc()
        log.warning("per-job cap reached: team %s job %s", team.id, caller.unit)

    def _refuse_reservation(self, call: Call, short: reserve.Shortfall) -> web.Response:
        assert call.team is not None
        self.metrics.reservations_refused.labels(call.team.id, short.limit).inc()
        response = self.refuse(call, 429, reserve.REFUSAL, short.message)
        response.headers["x-costwarden-reservation-limit"] = short.limit
        response.headers["x-should-retry"] = "false" if short.final else "true"
        return response

    def _stay_with_holder(
        self,
        call: Call,
        policy: CompiledPolicy,
        decision: RouteDecision,
        previous: str,
        traits: RequestTraits,
    ) -> RouteDecision | web.Response:
        """A call continuing a stored response goes to the model that stored it, with no
        fallback: another backend does not hold ``previous_response_id``. If this replica
        does not know the holder (it served elsewhere, or before a restart), the routed
        model alone is tried."""
        assert call.team is not None
        holder_name = self.holders.get(call.team.id, previous)
        holder = policy.models.get(holder_name) if holder_name else None
        if holder_name and holder is None:
            return self.refuse(
                call,
                409,
                RefusalReason.PREVIOUS_RESPONSE_ELSEWHERE,
                f"previous_response_id {previous[:64]} is stored by model {holder_name}, which "
                f"RoutingPolicy {call.policy_id} no longer declares; no other backend holds it, "
                "so costwarden does not send this call elsewhere: start a new conversation",
            )
        if holder is None:
            return RouteDecision(
                decision.model,
                (),
                decision.rule,
                decision.reason + "; previous_response_id: routed model only, no fallback",
                decision.downgraded_from,
            )
        if holder.provider is not traits.provider or (
            traits.sensitivity is Sensitivity.CONFIDENTIAL
            and holder.locality is not Locality.IN_CLUSTER
        ):
            return self.refuse(
                call,
                403,
                RefusalReason.PREVIOUS_RESPONSE_ELSEWHERE,
                f"previous_response_id {previous[:64]} is stored by model {holder.name} "
                f"({holder.locality.value}), where this {traits.sensitivity.value} call may not "
                "go; no other backend holds it: start a new conversation",
            )
        reason = decision.reason
        if holder.name != decision.model.name:
            reason += f"; previous_response_id held by {holder.name}"
        return RouteDecision(
            holder,
            (),
            decision.rule,
            reason + "; previous_response_id: no fallback to another backend",
            decision.downgraded_from,
        )

    async def count_tokens(self, request: web.BaseRequest, fmt: WireFormat) -> web.StreamResponse:
        """``POST /v1/messages/count_tokens``: answered by the routed Anthropic model's
        endpoint, query string and ``anthropic-beta`` passed on. Free at the providers, so
        never billed, never admitted against caps, rate limits or loop detection, and no
        usage record; it is attributed in the decision log (endpoint
        ``messages.count_tokens``) like every call."""
        call = Call(Endpoint.COUNT_TOKENS, fmt)
        try:
            return await self._count_tokens(request, call)
        except Exception:
            call.error = "internal_error"
            log.exception("call %s failed inside the gateway", call.id)
            return self.refuse(call, 500, "internal_error", "costwarden gateway internal error")
        finally:
            self.metrics.count_tokens.labels(
                call.team.id if call.team else "", call.outcome.value
            ).inc()
            log_decision(call, call.to_record(self.replica_id))

    async def _count_tokens(self, request: web.BaseRequest, call: Call) -> web.StreamResponse:
        compiled = self.config.current
        if compiled is None:
            return self.refuse(call, 503, "not_ready", "the gateway has no configuration yet")
        call.revision = compiled.revision
        refused = await self._attribute(request, call, compiled)  # before the body is read
        if refused is not None:
            return refused
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return self.refuse(
                call, 400, RefusalReason.BAD_REQUEST, "the body is not a JSON object"
            )
        call.requested_model = str(body.get("model") or "")[:128]
        assert call.team is not None
        try:
            hints = take_hints(request.headers, body)
        except BadRequestError as exc:
            return self.refuse(call, 400, RefusalReason.BAD_REQUEST, str(exc))
        call.task, call.sensitivity = hints.task, hints.sensitivity.value
        traits = RequestTraits(
            provider=call.fmt.provider,
            requested_model=call.requested_model,
            task=hints.task,
            prompt_tokens=estimate_prompt_tokens(len(raw)),
            has_tools=bool(body.get("tools")),
            sensitivity=hints.sensitivity,
        )
        policy = compiled.policies[call.policy_id]
        decision = decide(
            policy, traits, pinned_model=self.affinity.get(call.team.id, hints.session)
        )
        if isinstance(decision, RouteRefusal):
            call.rule = decision.rule
            status = _ROUTE_STATUS.get(decision.code, 403)
            return self.refuse(call, status, decision.code, decision.message)
        call.rule, call.reason = decision.rule, decision.reason + "; token count, not billed"
        return await forward_count(self, request, call, compiled, body, decision)

    def _signal_loop(self, call: Call, admission: Admission) -> None:
        trip = admission.loop
        if trip is None or not trip.new or call.team is None or call.caller is None:
            return
        settings = call.team.loop_detection
        signal = LoopSignal(
            time=datetime.now(UTC),
            team=call.team.id,
            namespace=call.caller.namespace,
            job=call.caller.job,
            pod=call.caller.pod,
            loop=trip.kind,
            count=trip.count,
            window_seconds=settings.window_seconds,
            fingerprint=trip.fingerprint[:16],
            action=settings.action,
            config_revision=call.revision,
            gateway_replica=self.replica_id,
        )
        self.sink.emit_loop_signal(signal)
        self.metrics.loop_signals.labels(call.team.id, trip.kind.value).inc()
        log.warning("retry loop: team %s job %s (%s)", signal.team, call.caller.unit, trip.kind)

    def refuse(self, call: Call, status: int, code: str, message: str) -> web.Response:
        call.outcome, call.status, call.refusal = Outcome.REFUSED, status, str(code)
        headers = {
            "Content-Type": "application/json",
            "x-costwarden-refusal": str(code),
            "x-costwarden-request-id": call.id,
            "x-costwarden-config-revision": call.revision,
        }
        if code in _FINAL or status in (400, 401, 403):
            headers["x-should-retry"] = "false"
        if call.rule:
            headers["x-costwarden-rule"] = call.rule
        body = call.fmt.error_body(status, str(code), message)
        return web.Response(status=status, body=body, headers=headers)

    def _account(self, call: Call) -> None:
        """Settle, record, observe. Settlement (metered cost added, reservation released)
        is one synchronous step and runs whatever else fails here: exactly once per call."""
        try:
            self._charge_unmetered(call)
            if call.admitted and call.team is not None and call.caller is not None:
                self.limits.record(
                    call.team,
                    call.revision,
                    call.caller.unit,
                    call.tokens,
                    call.cost,
                    upstream_error=call.outcome
                    in (Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_MALFORMED),
                    model=call.served.name if call.served and call.tokens is not None else "",
                )
        finally:
            self._settle(call)
        record = call.to_record(self.replica_id)
        self.sink.emit(record)  # a ledger keeps only what can cost: sinks.worth_keeping
        if self.leases is not None and record.cost_usd and record.team:
            # Its seq, just given by the sink: the lease is net of it once it is applied.
            self.leases.note(record.team, getattr(self.sink, "seq", 0), record.cost_usd,
                             record.time)  # fmt: skip
        if self.holds is not None and call.reservation is not None:
            self.holds.settled(call.id)  # after its record: a kill in between charges once
        added = time.perf_counter() - call.started - call.upstream_seconds
        self.metrics.observe(record, added_seconds=added)
        log_decision(call, record)
        if self.telemetry is not None:
            try:
                self.telemetry.observe(call, record)
            except Exception:  # the call is accounted already; telemetry must not fail it
                log.exception("call %s: OpenTelemetry span not recorded", call.id)

    def _charge_unmetered(self, call: Call) -> None:
        """A call sent upstream whose usage never came back, where the provider bills, is
        charged its reservation: the reserved tokens at the served model's prices (at most
        what was reserved; the operator recomputes the same figure), never $0."""
        held = call.reservation
        if held is None or not call.unmetered or call.tokens is not None or call.served is None:
            return
        call.tokens = reserve.charged_tokens(held.worst)
        pricing = call.served.pricing
        call.service_tier = reserve.dearest_tier(call.tokens, pricing, held.worst.tier)
        call.cost = call_cost(call.tokens, pricing, service_tier=call.service_tier)
        call.error = f"{call.error or 'usage_unknown'}; charged_reservation"

    def _settle(self, call: Call) -> None:
        held = call.reservation
        if held is None or not self.reservations.release(held):
            return
        if call.unmetered and call.tokens is not None:
            basis = "reservation"
        elif call.tokens is not None:
            basis = "metered"
        else:
            basis = "nothing"
        key = (held.team, basis)
        counter = self._settled.get(key)
        if counter is None:
            counter = self._settled[key] = self.metrics.settlements.labels(*key)
        counter.inc()

    def _reserved_changed(self, team: str, held: Decimal) -> None:
        gauge = self._gauges.get(team)
        if gauge is None:
            gauge = self._gauges[team] = self.metrics.reserved_usd.labels(team)
        gauge.set(float(held))


LEASE_TRIES = 3
"""Asks of the operator for one call before it is refused (concurrent calls may take what
an answer lent before this call reserves it)."""


@dataclass(frozen=True, slots=True)
class LeaseNeeded:
    """The call fits every limit but this replica's lease of the team's budget."""

    need: Decimal
    floor: Decimal
    """Its worst case at the policy's default output ceiling (policy/leases.py)."""


def _lease_result(answer: LeaseAnswer) -> str:
    if answer.granted:
        return "granted"
    return "cap_reached" if answer.final else "short"
