"""One call as it goes through the gateway, and what it leaves behind: record, log, metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel

from costwarden.api.attribution import FIXED_KEYS, MAX_VALUE_LENGTH, TAG_PREFIX
from costwarden.api.gatewayconfig import ModelRoute, TeamConfig
from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import (
    RECORD_API_VERSION,
    Endpoint,
    Outcome,
    UsageRecord,
    format_exact_usd,
    new_record_id,
)
from costwarden.gateway.identity import Caller
from costwarden.gateway.reservations import Reservation
from costwarden.gateway.wire import WireFormat

decision_log = logging.getLogger("costwarden.gateway.decision")
MAX_TASK = 128
MAX_SENSITIVITY = 32
MAX_ROUTE_REASON = 512
_NO_TOKENS = TokenUsage()


@dataclass(slots=True)
class Call:
    """Everything known about one call, filled in as it progresses."""

    endpoint: Endpoint
    fmt: WireFormat
    started: float = field(default_factory=time.perf_counter)
    arrived: datetime = field(default_factory=lambda: datetime.now(UTC))
    id: str = field(default_factory=new_record_id)
    revision: str = ""
    caller: Caller | None = None
    team: TeamConfig | None = None
    policy_id: str = ""
    requested_model: str = ""
    served: ModelRoute | None = None
    rule: str = ""
    reason: str = ""
    task: str = ""
    """The task the caller declared (X-Costwarden-Task or metadata.task)."""
    sensitivity: str = ""
    """The sensitivity the caller declared (Public, Internal, Confidential)."""
    downgraded_from: str = ""
    admitted: bool = False
    streaming: bool = False
    attempts: int = 0
    prompt_bytes: int = 0
    """Size of the body last sent upstream (what an estimate of unreported input uses)."""
    upstream_seconds: float = 0.0
    tokens: TokenUsage | None = None
    tool_calls: dict[str, int] = field(default_factory=dict)
    service_tier: str = ""
    """The service tier the answer reported (what its tokens are priced at)."""
    response_id: str = ""
    """The Responses API id of the answer (what a later ``previous_response_id`` names)."""
    cost: Decimal = Decimal(0)
    outcome: Outcome = Outcome.UPSTREAM_ERROR
    refusal: str = ""
    status: int = 500
    error: str = ""
    reservation: Reservation | None = None
    """The worst case held for this call before it was forwarded (gateway/reservations.py)."""
    trace_context: tuple[str, str] | None = None
    """The caller's W3C ``traceparent`` and ``tracestate`` headers, kept only when the gateway
    exports spans (gateway/telemetry.py): its span for this call is then their child."""
    unmetered: bool = False
    """The call was sent upstream and no usage came back where the provider bills (a stream
    cut before its usage, a cancelled call): it is charged its reservation."""

    def to_record(self, replica: str) -> UsageRecord:
        caller = self.caller or Caller("")
        served = self.served
        return _trusted(
            UsageRecord,
            api_version=RECORD_API_VERSION,
            kind="UsageRecord",
            id=self.id,
            time=self.arrived,
            team=self.team.id if self.team else "",
            namespace=caller.namespace,
            job=caller.job,
            pod=caller.pod,
            caller=caller.via,
            endpoint=self.endpoint,
            requested_model=self.requested_model,
            served_model=served.name if served else "",
            upstream_model=served.upstream_model if served else "",
            rule=self.rule,
            policy=self.policy_id,
            provider=served.provider if served else self.fmt.provider,
            tokens=self.tokens or _NO_TOKENS,
            usage_reported=self.tokens is not None,
            tool_calls=self.tool_calls,
            service_tier=self.service_tier,
            cost_usd=self.cost,
            outcome=self.outcome,
            reason=self.refusal or self.error,
            http_status=self.status,
            latency_ms=round((time.perf_counter() - self.started) * 1000, 3),
            attempts=self.attempts,
            streaming=self.streaming,
            config_revision=self.revision,
            gateway_replica=replica,
            labels=_tags(caller),
            # Bounded as the operator's schema bounds them: a long header must not make the
            # whole batch unparsable at ingestion.
            task=self.task[:MAX_TASK],
            sensitivity=self.sensitivity[:MAX_SENSITIVITY],
            route_reason=self.reason[:MAX_ROUTE_REASON],
        )


def _tags(caller: Caller) -> dict[str, str]:
    """The fixed attribution tags among the caller's pod labels, for the gateway's own ledger.

    A convenience only: the operator recomputes the tags at ingestion from the pod as the
    API server has it (annotations included, with the team's declared keys and limits) and
    replaces these. Fixed keys only and values cut to 63 characters, so a pod's labels can
    never make a record fail the operator's schema (which would refuse the whole batch)."""
    labels = caller.labels
    if not labels:
        return {}
    found = {}
    for key in FIXED_KEYS:
        value = labels.get(TAG_PREFIX + key)
        if value:
            found[key] = value[:MAX_VALUE_LENGTH]
    return found


_M = TypeVar("_M", bound=BaseModel)


def _trusted(model: type[_M], **values: Any) -> _M:
    """A model instance from values the gateway itself typed, every field given.

    ``model_construct`` costs ~30 us for a 30-field record (it walks defaults); this is the
    same object without the walk, the one hot-path shortcut here. A unit test checks the
    result equals the validated model.
    """
    instance = model.__new__(model)
    object.__setattr__(instance, "__dict__", values)
    object.__setattr__(instance, "__pydantic_fields_set__", set(values))
    object.__setattr__(instance, "__pydantic_extra__", None)
    object.__setattr__(instance, "__pydantic_private__", None)
    return instance


def log_decision(call: Call, record: UsageRecord) -> None:
    """One JSON line per call: what was decided and why. No prompt text, no credentials."""
    if not decision_log.isEnabledFor(logging.INFO):
        return
    tokens = record.tokens
    line = {
        "msg": "decision",
        "id": record.id,
        "team": record.team,
        "namespace": record.namespace,
        "job": record.job,
        "pod": record.pod,
        "endpoint": record.endpoint.value,
        "requestedModel": record.requested_model,
        "model": record.served_model,
        "rule": record.rule,
        "reason": call.reason,
        "task": record.task,
        "sensitivity": record.sensitivity,
        "downgradedFrom": call.downgraded_from,
        "outcome": record.outcome.value,
        "refusal": call.refusal,
        "error": call.error,
        "status": record.http_status,
        "tokens": [tokens.input, tokens.cached_input, tokens.cache_creation, tokens.output],
        "cacheCreation1h": tokens.cache_creation_1h,
        "toolCalls": record.tool_calls,
        "serviceTier": record.service_tier,
        "costUSD": format_exact_usd(record.cost_usd),
        "latencyMs": record.latency_ms,
        "attempts": record.attempts,
        "revision": record.config_revision,
    }
    decision_log.info(orjson.dumps(line).decode())
