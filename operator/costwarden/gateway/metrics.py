"""Prometheus metrics of the gateway (``/metrics``), with bounded labels only.

Label values come from the configuration (team ids, model and rule names) or from fixed
enums (outcome, provider, refusal reason, token kind); nothing a client sends becomes a
label. Money is exported as a float here only: the exposition format has no decimals,
while accounting (records, ledger) stays exact.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from costwarden.accounting.trust import Refusal
from costwarden.api.usage import UsageRecord

# Gateway overhead lives well under a millisecond; upstream calls take seconds.
_ADDED_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
_LATENCY_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_KINDS = ("input", "output", "cached_input", "cache_creation", "cache_creation_1h")
MAX_UNKNOWN_PATHS = 64
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
# Path segments of the OpenAI and Anthropic APIs kept as they are in the unknown-route
# label; any other segment is an id (or noise) and becomes {id}.
_PATH_WORDS = frozenset(
    {
        "v1", "v1beta", "chat", "completions", "responses", "input_items", "input_tokens",
        "cancel", "compact", "messages", "batches", "results", "count_tokens", "embeddings",
        "models", "files", "content", "uploads", "parts", "images", "generations", "edits",
        "variations", "audio", "speech", "transcriptions", "translations", "moderations",
        "assistants", "threads", "runs", "steps", "vector_stores", "file_batches",
        "fine_tuning", "jobs", "checkpoints", "conversations", "items", "realtime",
        "sessions", "containers", "skills", "organizations", "complete", "openai",
        "deployments", "api", "health", "metrics", "version", "tokenize", "detokenize",
    }
)  # fmt: skip
MAX_PATH_SEGMENTS = 6


def route_label(path: str) -> str:
    """A bounded label for a request path: API words kept, other segments ``{id}``, more
    than :data:`MAX_PATH_SEGMENTS` segments or no API word at all ``other``."""
    segments = [s for s in path.split("?", 1)[0].split("/") if s]
    if not segments or len(segments) > MAX_PATH_SEGMENTS:
        return "other"
    kept = [s if s in _PATH_WORDS else "{id}" for s in segments]
    if all(k == "{id}" for k in kept):
        return "other"
    return "/" + "/".join(kept)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # Label sets are bounded by the configuration, so this cache is too.
        self._children: dict[tuple[str, str, str, str, str], tuple[Any, ...]] = {}
        r = self.registry
        self.requests = Counter(
            "costwarden_gateway_requests_total",
            "Calls answered, by team, served model, rule, outcome and provider.",
            ["team", "model", "rule", "outcome", "provider"],
            registry=r,
        )
        self.task_restarts = Counter(
            "costwarden_gateway_task_restarts_total",
            "Restarts of a supervised background task after it failed (docs/operations.md).",
            ["task"],
            registry=r,
        )
        self.task_failing = Gauge(
            "costwarden_gateway_task_failing",
            "1 while a supervised background task is failing (restarting with backoff), else 0.",
            ["task"],
            registry=r,
        )
        self.tokens = Counter(
            "costwarden_gateway_tokens_total",
            "Tokens metered from the providers' usage fields, by kind (input, output, "
            "cached_input, cache_creation, cache_creation_1h).",
            ["team", "model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "costwarden_gateway_cost_usd_total",
            "Metered cost in USD (float here; exact in usage records).",
            ["team", "model"],
            registry=r,
        )
        self.refused = Counter(
            "costwarden_gateway_refused_total",
            "Calls refused before reaching an upstream, by reason.",
            ["team", "reason"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "costwarden_gateway_upstream_errors_total",
            "Upstream failures (unreachable, 429, 5xx, malformed, host_not_allowed), per attempt.",
            ["model", "provider", "kind"],
            registry=r,
        )
        self.estimated_usage = Counter(
            "costwarden_gateway_estimated_usage_total",
            "Streams delivered without usable usage from the upstream (ended or dropped "
            "early, malformed or absurd counts) and charged anyway: their reservation, or an "
            "estimate where nothing was reserved; by model.",
            ["model", "provider"],
            registry=r,
        )
        self.missing_credentials = Counter(
            "costwarden_gateway_missing_credentials_total",
            "Attempts not sent because the model's provider key (a Secret reference in the "
            "RoutingPolicy) resolved to nothing in this gateway, by model.",
            ["model"],
            registry=r,
        )
        self.latency = Histogram(
            "costwarden_gateway_request_duration_seconds",
            "Time from request arrival to the last byte sent.",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.added = Histogram(
            "costwarden_gateway_added_latency_seconds",
            "Gateway overhead: request duration minus time spent waiting on upstreams.",
            ["provider"],
            buckets=_ADDED_BUCKETS,
            registry=r,
        )
        self.config_reloads = Counter(
            "costwarden_gateway_config_reloads_total",
            "Configuration documents loaded (result=ok) or rejected (result=error).",
            ["result"],
            registry=r,
        )
        self.loop_signals = Counter(
            "costwarden_gateway_loop_signals_total",
            "Jobs that tripped the retry-loop heuristic.",
            ["team", "loop"],
            registry=r,
        )
        self.usage_rejected = Counter(
            "costwarden_gateway_usage_rejected_total",
            "Usage entries the operator refused for good (they disagree with what it "
            "recomputes; docs/security-ingestion.md): dropped from the queue, never counted.",
            ["reason"],
            registry=r,
        )
        self.usage_pending = Gauge(
            "costwarden_gateway_usage_pending",
            "Usage entries not yet acknowledged by the operator (including held ones).",
            registry=r,
        )
        self.usage_held_teams = Gauge(
            "costwarden_gateway_usage_held_teams",
            "Teams whose usage the operator holds (its books could not be written): their "
            "entries are kept and re-sent (docs/operations.md).",
            registry=r,
        )
        self.ledger_bytes = Gauge(
            "costwarden_gateway_ledger_bytes",
            "Size of the usage ledger; at --ledger-max-bytes calls are refused with 503 "
            "ledger_full (docs/ledger.md).",
            registry=r,
        )
        self.ledger_unwritten = Gauge(
            "costwarden_gateway_ledger_unwritten",
            "Usage entries of answered calls that the ledger's volume refused (full, "
            "failing), kept in memory until it takes them; above 0, new calls are refused "
            "with 503 ledger_full (docs/operations.md).",
            registry=r,
        )
        self.count_tokens = Counter(
            "costwarden_gateway_count_tokens_total",
            "Token-count calls (POST /v1/messages/count_tokens) answered: never billed, "
            "never counted in requests, caps, rate limits or loop detection.",
            ["team", "outcome"],
            registry=r,
        )
        self.unknown_routes = Counter(
            "costwarden_gateway_unknown_route_total",
            "Requests to routes the gateway does not serve (answered 404), by method and "
            "normalised path: known API path words kept, ids replaced by {id}, anything "
            "else 'other'; after 64 distinct paths, new ones count as 'other'.",
            ["method", "path"],
            registry=r,
        )
        self._unknown_paths: set[tuple[str, str]] = set()
        self.reserved_usd = Gauge(
            "costwarden_gateway_reserved_usd",
            "Worst-case cost in USD held by this gateway's calls in flight, per team "
            "(reserved before forwarding, released at settlement; float here, exact inside).",
            ["team"],
            registry=r,
        )
        self.reservations_refused = Counter(
            "costwarden_gateway_reservations_refused_total",
            "Calls refused (429 budget_reservation_failed) because their worst case did not "
            "fit what is left, by the limit that did not hold: team_cap, team_lease (this "
            "replica's lease of the team's budget, from the operator), team_tokens, "
            "job_cost, job_tokens, model_cost, model_tokens.",
            ["team", "limit"],
            registry=r,
        )
        self.settlements = Counter(
            "costwarden_gateway_settlements_total",
            "Reservations settled, by basis: metered (the provider's usage), reservation "
            "(no usage came back after the call was sent, e.g. a stream cut before its usage "
            "or a cancelled call: charged the reserved tokens) or nothing (never sent, or "
            "the provider's own failure, which it does not bill).",
            ["team", "basis"],
            registry=r,
        )
        self.lease_asks = Counter(
            "costwarden_gateway_lease_asks_total",
            "Calls that waited for the operator to lend this replica more of their team's "
            "budget, by result: granted, short (retryable) or cap_reached.",
            ["result"],
            registry=r,
        )
        self.leased_usd = Gauge(
            "costwarden_gateway_leased_usd",
            "This replica's lease of each team's budget (USD; float here, exact inside).",
            ["team"],
            registry=r,
        )
        self.interrupted_calls = Counter(
            "costwarden_gateway_interrupted_calls_total",
            "Calls in flight when a previous run of this gateway stopped without settling "
            "them (kill -9, OOM, node crash), charged at their reservation from the hold "
            "journal when it started again (docs/ledger.md).",
            ["team"],
            registry=r,
        )
        self.config_info = Gauge(
            "costwarden_gateway_config_info",
            "1 for the configuration revision in force.",
            ["revision"],
            registry=r,
        )

    def observe(self, record: UsageRecord, *, added_seconds: float) -> None:
        provider = record.provider.value if record.provider else ""
        outcome = record.outcome.value
        key = (record.team, record.served_model, record.rule, outcome, provider)
        children = self._children.get(key)
        if children is None:  # .labels() takes a lock and hashes; do it once per label set
            children = self._children[key] = self._make_children(key)
        requests, tokens, cost, latency, added = children
        requests.inc()
        if outcome == "Refused":
            self.refused.labels(record.team, record.reason).inc()
        if record.usage_reported:
            usage = record.tokens
            counts = (
                usage.input,
                usage.output,
                usage.cached_input,
                usage.cache_creation,
                usage.cache_creation_1h,
            )
            for counter, value in zip(tokens, counts, strict=True):
                if value:
                    counter.inc(value)
            if record.cost_usd:
                cost.inc(float(record.cost_usd))
        latency.observe(record.latency_ms / 1000)
        added.observe(max(added_seconds, 0.0))

    def _make_children(self, key: tuple[str, str, str, str, str]) -> tuple[Any, ...]:
        team, model, rule, outcome, provider = key
        return (
            self.requests.labels(team, model, rule, outcome, provider),
            tuple(self.tokens.labels(team, model, kind) for kind in TOKEN_KINDS),
            self.cost.labels(team, model),
            self.latency.labels(provider),
            self.added.labels(provider),
        )

    def unknown_route(self, method: str, path: str) -> None:
        label = (method if method in _METHODS else "OTHER", route_label(path))
        if label not in self._unknown_paths:
            if len(self._unknown_paths) >= MAX_UNKNOWN_PATHS:
                label = (label[0], "other")
            self._unknown_paths.add(label)
        self.unknown_routes.labels(*label).inc()

    def set_revision(self, revision: str) -> None:
        self.config_info.clear()
        self.config_info.labels(revision).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def rejected_reason(reason: str) -> str:
    """A refusal reason from the operator, as a bounded label value."""
    return reason if reason in {r.value for r in Refusal} else "other"
