"""The request pipeline: identify, attribute, admit, route, forward, account.

Each step is a call into the module that decides it (identity, policy.limits via
gateway.limits, policy.routing) and every refusal leaves through :meth:`Gateway.refuse`,
so a refused call always gets the API's own error shape, costs nothing and is recorded.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from costwarden.api.routingpolicy import Locality, Sensitivity
from costwarden.api.usage import (
    Endpoint,
    LoopSignal,
    Outcome,
    RefusalReason,
    UsageSink,
)
from costwarden.gateway.call import Call, log_decision
from costwarden.gateway.config import CompiledConfig, ConfigStore
from costwarden.gateway.credentials import Credentials
from costwarden.gateway.forward import forward, forward_count
from costwarden.gateway.identity import (
    Identifier,
    IdentityUnavailableError,
    UnattributedError,
    resolve_team,
)
from costwarden.gateway.limits import Admission, Limits
from costwarden.gateway.metrics import GatewayMetrics
from costwarden.gateway.upstream import UpstreamClient
from costwarden.gateway.wire import (
    BadRequestError,
    WireFormat,
    estimate_prompt_tokens,
    take_hints,
)
from costwarden.policy.loops import fingerprint
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

    async def handle(
        self, request: web.BaseRequest, fmt: WireFormat, endpoint: Endpoint
    ) -> web.StreamResponse:
        call = Call(endpoint, fmt)
        try:
            return await self._serve(request, call)
        except Exception:
            call.error = "internal_error"
            log.exception("call %s failed inside the gateway", call.id)
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
            # The ledger is at its bound: a call now could not be recorded, so it is not
            # made (docs/ledger.md); it frees up as the operator acknowledges usage.
            return self.refuse(
                call, 503, "ledger_full",
                "the gateway's usage ledger is full (usage not yet delivered to the "
                "operator); retry later",
            )  # fmt: skip
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
        return await self._route(request, call, compiled, body, len(raw))

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
        size: int,
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
            prompt_tokens=estimate_prompt_tokens(size),
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
        wants_usage = call.fmt.prepare(body, call.endpoint)
        response = await forward(self, request, call, compiled, body, decision, wants_usage)
        if hints.session and policy.affinity and call.outcome is Outcome.OK and call.served:
            self.affinity.remember(call.team.id, hints.session, call.served.name)
        if call.response_id and call.served and call.outcome is Outcome.OK:
            self.holders.remember(call.team.id, call.response_id, call.served.name)
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
        record = call.to_record(self.replica_id)
        if call.admitted and call.team is not None and call.caller is not None:
            self.limits.record(
                call.team,
                call.revision,
                call.caller.unit,
                call.tokens,
                call.cost,
                upstream_error=call.outcome in (Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_MALFORMED),
            )
        self.sink.emit(record)  # a ledger keeps only what can cost: sinks.worth_keeping
        added = time.perf_counter() - call.started - call.upstream_seconds
        self.metrics.observe(record, added_seconds=added)
        log_decision(call, record)
