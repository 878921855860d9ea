"""What the data plane reports: one usage record per call, and loop signals.

A gateway or sidecar writes one :class:`UsageRecord` for every call it answers, refused
calls included (they cost nothing and say why), and a :class:`LoopSignal` when a job trips
the retry-loop heuristic. Both travel through a :class:`UsageSink`: a JSON Lines ledger
(docs/ledger.md), an in-memory list in tests, and the operator's accounting (issue 4).

Records carry a time-ordered unique id so that delivery can be at-least-once and
aggregation idempotent: the same record seen twice is counted once.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Protocol, runtime_checkable

from pydantic import BeforeValidator, Field, PlainSerializer

from costwarden.api.base import WireModel
from costwarden.api.routingpolicy import Provider
from costwarden.api.teambudget import JobAction, TokenUsage

RECORD_API_VERSION = "costwarden.io/v1alpha1"
SIDECAR_REPORT_AUDIENCE = "costwarden.io/ingest"
"""Audience of the pod-bound token an injected sidecar presents to the operator: a token
minted for this audience is useless against the API server, and the operator accepts it
only for usage of the pod it is bound to."""
INGEST_AUDIENCE = SIDECAR_REPORT_AUDIENCE
"""Every token the operator's ingestion reviews is reviewed for this audience (sidecars'
and the shared gateway's alike): a reporter never sends a token the API server accepts."""
GATEWAY_AUDIENCE = "costwarden.io/gateway"
"""Audience of the service-account tokens callers present to the shared gateway: a token
for it is useless against the API server and the operator, and the gateway refuses any
other (a pod's default token, an ingest token)."""


def parse_exact_usd(value: Any) -> Decimal:
    """A non-negative exact amount: Decimal, int or decimal string; never a float."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        raise ValueError("must be a decimal string, an integer or a Decimal, never a float")
    amount = Decimal(value)
    if not amount.is_finite() or amount < 0:
        raise ValueError("must be a finite, non-negative amount")
    return amount


def format_exact_usd(value: Decimal) -> str:
    """Every digit, no exponent: one call's cost is often below a micro-dollar."""
    return format(value.normalize(), "f") if value else "0"


ExactUSD = Annotated[
    Decimal,
    BeforeValidator(parse_exact_usd),
    PlainSerializer(format_exact_usd, return_type=str, when_used="json"),
]
"""USD with no rounding (unlike ``Money``, which budgets use at micro-dollar resolution):
the sum of exact per-call costs is exactly the period's spend."""


def new_record_id() -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds then random bits, so ids sort by time.

    Python 3.11 has no ``uuid.uuid7``; this is the layout of the RFC, built by hand.
    """
    millis = time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF
    rand = int.from_bytes(os.urandom(10), "big")
    value = millis << 80 | rand
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Outcome(StrEnum):
    """How a call ended, from the gateway's point of view."""

    OK = "OK"
    """The upstream answered and reported usage; the client got the answer."""
    CLIENT_DISCONNECTED = "ClientDisconnected"
    """The client went away mid-stream; usage is what the upstream reported at the end."""
    UPSTREAM_ERROR = "UpstreamError"
    """Every candidate backend failed (connect error, 429, 5xx) or answered a 4xx."""
    UPSTREAM_MALFORMED = "UpstreamMalformed"
    """The upstream answered 2xx without parsable usage: passed on as a 502, never as free."""
    REFUSED = "Refused"
    """The gateway refused the call before any upstream saw it (see ``reason``)."""


class Endpoint(StrEnum):
    CHAT_COMPLETIONS = "chat.completions"
    EMBEDDINGS = "embeddings"
    MESSAGES = "messages"
    RESPONSES = "responses"
    COUNT_TOKENS = "messages.count_tokens"
    """Anthropic token counting: answered and logged, never billed or recorded as usage."""


class RefusalReason(StrEnum):
    """Machine-readable reasons a call is refused; they are also the API error ``code``."""

    UNATTRIBUTED = "unattributed_caller"
    NO_TEAM = "no_team_budget"
    NO_ROUTING_POLICY = "no_routing_policy"
    HARD_CAP = "hard_cap_reached"
    JOB_COST_CAP = "job_cost_cap_reached"
    JOB_TOKEN_CAP = "job_token_cap_reached"
    RATE_LIMITED = "job_rate_limited"
    RETRY_LOOP = "retry_loop_detected"
    CONFIDENTIAL = "confidential_requires_in_cluster"
    INCOMPATIBLE_ROUTE = "incompatible_route"
    BAD_REQUEST = "invalid_request"
    MISSING_CREDENTIALS = "missing_credentials"
    """The model needs a provider key this gateway does not have (never sent without it)."""
    PROVIDER_HOST_NOT_ALLOWED = "provider_host_not_allowed"
    PREVIOUS_RESPONSE_ELSEWHERE = "previous_response_elsewhere"
    """A Responses API call continues a stored response no allowed backend holds."""
    IDENTITY_CHECK_UNAVAILABLE = "identity_check_unavailable"
    """A token that needs a TokenReview could not be checked now: the identity-check rate
    limit is reached (429) or the API server did not answer in time (503). Retryable."""


class UsageRecord(WireModel):
    """One call as metered by the data plane (one line of the JSON Lines ledger)."""

    api_version: str = Field(default=RECORD_API_VERSION, alias="apiVersion")
    kind: str = "UsageRecord"
    id: str = Field(default_factory=new_record_id, description="UUIDv7; dedup key.")
    time: datetime = Field(description="When the call arrived at the gateway (UTC).")
    team: str = Field(default="", description="TeamBudget id (namespace/name); empty if unknown.")
    namespace: str = ""
    job: str = Field(default="", description="Job name, from the pod's job-name label.")
    pod: str = ""
    caller: str = Field(default="", description="How the caller was identified: sidecar|token|key.")
    endpoint: Endpoint
    requested_model: str = ""
    served_model: str = Field(default="", description="Model name (RoutingPolicy) that served.")
    upstream_model: str = ""
    rule: str = Field(default="", description="Routing rule that decided; 'default' if none.")
    policy: str = ""
    provider: Provider | None = None
    tokens: TokenUsage = Field(default_factory=TokenUsage)
    usage_reported: bool = Field(
        default=False,
        description="True if tokens come from the upstream's usage fields; False means unknown.",
    )
    tool_calls: dict[Annotated[str, Field(max_length=64)], Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict,
        max_length=8,
        description="Provider-run tool calls billed per call (Responses API output items: "
        "web_search_call, file_search_call, code_interpreter_call), by item type.",
    )
    service_tier: Annotated[str, Field(max_length=32)] = Field(
        default="",
        description="The service tier the answer reports it was served at (OpenAI: default, "
        "flex, priority; Anthropic: standard, priority); empty when it reports none. The "
        "call is priced at this tier's prices when the model has them (serviceTiers).",
    )
    cost_usd: ExactUSD = Field(
        default=Decimal(0), alias="costUSD", description="Exact; a decimal string on the wire."
    )
    outcome: Outcome
    reason: str = Field(default="", description="Refusal reason or error class.")
    http_status: int = 0
    latency_ms: float = 0.0
    attempts: int = Field(default=0, description="Upstream calls made (fallbacks included).")
    streaming: bool = False
    config_revision: str = ""
    gateway_replica: str = ""
    labels: dict[Annotated[str, Field(max_length=63)], Annotated[str, Field(max_length=63)]] = (
        Field(
            default_factory=dict,
            max_length=16,
            description="Attribution tags (project, repository, environment, application, "
            "change and the keys the TeamBudget declares), recomputed by the operator at "
            "ingestion from the pod's costwarden.io/<key> labels and annotations "
            "(docs/attribution.md); what a gateway sends here is replaced.",
        )
    )
    task: str = Field(
        default="", max_length=128, description="The task the call declared (routing hint)."
    )
    sensitivity: str = Field(
        default="",
        max_length=32,
        description="The sensitivity the call declared: Public, Internal or Confidential.",
    )
    route_reason: str = Field(
        default="",
        alias="routeReason",
        max_length=512,
        description="Why the routing chose the served model (rule, default, downgrade, fallback).",
    )


class LoopKind(StrEnum):
    IDENTICAL_REQUESTS = "IdenticalRequests"
    CONSECUTIVE_ERRORS = "ConsecutiveErrors"
    JOB_CAP_REACHED = "JobCapReached"
    """Not a loop: a call of the job was refused because even at the policy's default
    output ceiling its worst case does not fit the job's per-job cap. With reservation the
    job's spend stops short of the cap, so this signal is how the operator learns it is
    reached; the action is the budget's ``onHardCap.jobs``."""


class LoopSignal(WireModel):
    """A job tripped the retry-loop heuristic; the operator applies ``action`` to it."""

    api_version: str = Field(default=RECORD_API_VERSION, alias="apiVersion")
    kind: str = "LoopSignal"
    id: str = Field(default_factory=new_record_id)
    time: datetime
    team: str
    namespace: str
    job: str = ""
    pod: str = ""
    loop: LoopKind
    count: int = Field(description="Identical requests in the window, or errors in a row.")
    window_seconds: int = 0
    fingerprint: str = Field(default="", description="sha256 prefix of the normalized request.")
    action: JobAction
    config_revision: str = ""
    gateway_replica: str = ""


@runtime_checkable
class UsageSink(Protocol):
    """Where records go. ``emit`` is called on the request path: it must not block.

    Implementations buffer and ship in the background; ``close`` flushes what is left.
    """

    def emit(self, record: UsageRecord) -> None: ...

    def emit_loop_signal(self, signal: LoopSignal) -> None: ...

    async def close(self) -> None: ...
