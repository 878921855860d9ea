"""OpenTelemetry from the gateway: one GenAI client span per call, exported over OTLP/HTTP.

Off by default. ``gateway --otel`` (or ``--otel-endpoint URL``) turns it on; only then is the
OpenTelemetry SDK imported (the ``otel`` extra), so a gateway without it neither needs the
packages nor pays their import time.

The span is built after the fact, from the :class:`~costwarden.gateway.call.Call` and its
usage record, in :meth:`Gateway._account <costwarden.gateway.proxy.Gateway._account>`: the
request path only builds a dict and hands a finished span to the SDK's batch processor,
which queues it (dropping, never waiting, when its queue is full) for its own export
thread. Attribute names follow the OpenTelemetry GenAI semantic conventions
(``gen_ai.*``, v1.37+: ``gen_ai.provider.name``); costwarden's own are under
``costwarden.*``. No prompt, completion, header or credential is ever an attribute: only
what the decision log already carries (docs/gateway.md, "OpenTelemetry").
"""

from __future__ import annotations

import functools
import time
import urllib.parse
from typing import TYPE_CHECKING, Any, Protocol

from costwarden.api.routingpolicy import Provider
from costwarden.api.usage import Endpoint, Outcome, UsageRecord, format_exact_usd

if TYPE_CHECKING:
    from costwarden.gateway.call import Call

SCOPE = "costwarden.gateway"
SERVICE_NAME = "costwarden-gateway"
TRACES_PATH = "/v1/traces"
METRICS_PATH = "/v1/metrics"
MAX_TRACE_HEADER = 512
"""W3C Trace Context bounds tracestate at 32 entries; a caller's longer header is cut."""

# gen_ai.operation.name: the conventions' well-known values. The Responses API and
# Anthropic's Messages API are chat calls as the conventions define them.
OPERATION = {
    Endpoint.CHAT_COMPLETIONS: "chat",
    Endpoint.MESSAGES: "chat",
    Endpoint.RESPONSES: "chat",
    Endpoint.EMBEDDINGS: "embeddings",
}
# gen_ai.provider.name: the well-known values of the wire format the upstream speaks (a
# vLLM served over the OpenAI API is "openai" here, as the conventions allow: the
# instrumentation's best knowledge; costwarden.served_model names the backend).
PROVIDER = {Provider.OPENAI: "openai", Provider.ANTHROPIC: "anthropic"}
_FAILED = (Outcome.REFUSED, Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_MALFORMED)

# The span's attributes the histograms carry: bounded by the configuration (models, teams)
# and by the codes the gateway emits; a namespace, job or request id is on spans only.
_METRIC_ATTRIBUTES = (
    "gen_ai.operation.name",
    "gen_ai.provider.name",
    "gen_ai.request.model",
    "gen_ai.response.model",
    "costwarden.team",
    "error.type",
)
# Bucket boundaries the conventions advise for their two client histograms.
TOKEN_BUCKETS = tuple(4.0**i for i in range(14))  # 1 .. 67,108,864
DURATION_BUCKETS = tuple(0.01 * 2**i for i in range(14))  # 0.01 s .. 81.92 s


class CallTelemetry(Protocol):
    """What the gateway tells about each call it accounts (``Gateway.telemetry``)."""

    def observe(self, call: Call, record: UsageRecord) -> None: ...

    def shutdown(self) -> None: ...


@functools.lru_cache(maxsize=256)
def _host(endpoint: str) -> tuple[str, int | None]:
    """The upstream's host and port (never the URL's userinfo, path or query)."""
    parts = urllib.parse.urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.hostname or "", port


def _provider(provider: Provider | None) -> str:
    return PROVIDER[provider] if provider is not None else ""


def error_type(call: Call) -> str:
    """``error.type`` of a call that failed, empty otherwise: the refusal code, or the
    gateway's error class (``upstream_429``, ``upstream_unavailable``...): low-cardinality
    codes, never a message."""
    if call.outcome not in _FAILED:
        return ""
    if call.outcome is Outcome.REFUSED:
        return call.refusal or "refused"
    return call.error.split(";", 1)[0] or call.outcome.value


def span_name(call: Call) -> str:
    """``{gen_ai.operation.name} {gen_ai.request.model}``, as the conventions name it."""
    operation = OPERATION.get(call.endpoint, str(call.endpoint))
    return f"{operation} {call.requested_model}" if call.requested_model else operation


def span_attributes(call: Call, record: UsageRecord) -> dict[str, Any]:
    """The span's attributes: the conventions' names where they have one, then costwarden's.

    ``gen_ai.request.model`` is the model the client asked for; ``gen_ai.response.model`` is
    the upstream model the gateway routed the call to (it may differ: routing rules,
    downgrades, fallbacks). Input tokens count every input token, cache reads and writes
    included, as the conventions define ``gen_ai.usage.input_tokens``.
    """
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": OPERATION.get(call.endpoint, str(call.endpoint)),
        "gen_ai.provider.name": _provider(record.provider),
        "costwarden.request_id": record.id,
        "costwarden.endpoint": str(record.endpoint),
        "costwarden.outcome": str(record.outcome),
        "costwarden.cost_usd": format_exact_usd(record.cost_usd),
        "costwarden.attempts": record.attempts,
        "http.response.status_code": record.http_status,
    }
    if record.requested_model:
        attributes["gen_ai.request.model"] = record.requested_model
    served = call.served
    if served is not None:
        attributes["gen_ai.response.model"] = served.upstream_model
        attributes["costwarden.served_model"] = served.name
        host, port = _host(served.endpoint)
        if host:
            attributes["server.address"] = host
            if port is not None:
                attributes["server.port"] = port
    if call.response_id:
        attributes["gen_ai.response.id"] = call.response_id
    if record.usage_reported:
        tokens = record.tokens
        attributes["gen_ai.usage.input_tokens"] = tokens.prompt()
        attributes["gen_ai.usage.output_tokens"] = tokens.output
        attributes["gen_ai.usage.cache_read.input_tokens"] = tokens.cached_input
        attributes["gen_ai.usage.cache_creation.input_tokens"] = (
            tokens.cache_creation + tokens.cache_creation_1h
        )
    failed = error_type(call)
    if failed:
        attributes["error.type"] = failed
    for key, value in (
        ("costwarden.team", record.team),
        ("costwarden.namespace", record.namespace),
        ("costwarden.job", record.job),
        ("costwarden.rule", record.rule),
        ("costwarden.policy", record.policy),
        ("costwarden.service_tier", record.service_tier),
        ("costwarden.refusal", call.refusal),
        ("costwarden.downgraded_from", call.downgraded_from),
    ):
        if value:
            attributes[key] = value
    if call.unmetered:
        attributes["costwarden.charged_reservation"] = True
    return attributes


def check_endpoint(endpoint: str) -> None:
    """An OTLP/HTTP base URL: http(s)://host[:port][/prefix], or a clear error at start."""
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ValueError(
            f"--otel-endpoint {endpoint!r}: expected the collector's OTLP/HTTP base URL, "
            "e.g. http://otel-collector:4318"
        )


def traces_url(endpoint: str) -> str:
    """``--otel-endpoint`` is the collector's base URL, as ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
    return endpoint.rstrip("/") + TRACES_PATH


def metrics_url(endpoint: str) -> str:
    return endpoint.rstrip("/") + METRICS_PATH


class OtelTelemetry:
    """Spans (and the ``gen_ai.client.*`` histograms) through the OpenTelemetry SDK.

    Its own TracerProvider and MeterProvider, not the process-global ones: nothing else in
    the process (an imported library's instrumentation) starts exporting because of it.
    """

    def __init__(
        self,
        span_processor: Any,
        *,
        metric_readers: tuple[Any, ...] = (),
        resource: dict[str, str] | None = None,
    ) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        # Resource.create merges OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES over this.
        res = Resource.create({"service.name": SERVICE_NAME, **(resource or {})})
        self.tracer_provider = TracerProvider(resource=res)
        self.tracer_provider.add_span_processor(span_processor)
        self.tracer = self.tracer_provider.get_tracer(SCOPE)
        self.meter_provider: Any = None
        self.token_usage: Any = None
        self.duration: Any = None
        if metric_readers:
            self.meter_provider = MeterProvider(resource=res, metric_readers=list(metric_readers))
            meter = self.meter_provider.get_meter(SCOPE)
            self.token_usage = meter.create_histogram(
                "gen_ai.client.token.usage",
                unit="{token}",
                description="Tokens used per call, by gen_ai.token.type (input, output).",
                explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS),
            )
            self.duration = meter.create_histogram(
                "gen_ai.client.operation.duration",
                unit="s",
                description="Duration of a call through the gateway.",
                explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
            )
        self._client = SpanKind.CLIENT
        self._propagator = TraceContextTextMapPropagator()
        self._error = Status(StatusCode.ERROR)

    @classmethod
    def otlp(cls, endpoint: str | None, *, metrics: bool = False) -> OtelTelemetry:
        """Export over OTLP/HTTP (protobuf) to ``endpoint`` (a base URL), or where the
        standard ``OTEL_EXPORTER_OTLP_*`` variables say when it is None."""
        if endpoint is not None:
            check_endpoint(endpoint)
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            raise ValueError(
                "--otel needs the OpenTelemetry SDK: pip install 'costwarden[otel]'"
            ) from exc
        spans = OTLPSpanExporter(endpoint=traces_url(endpoint) if endpoint else None)
        readers: tuple[Any, ...] = ()
        if metrics:
            exporter = OTLPMetricExporter(endpoint=metrics_url(endpoint) if endpoint else None)
            readers = (PeriodicExportingMetricReader(exporter),)
        return cls(BatchSpanProcessor(spans), metric_readers=readers)

    def observe(self, call: Call, record: UsageRecord) -> None:
        if call.endpoint is Endpoint.COUNT_TOKENS:
            return  # free and unbilled: not a model call
        attributes = span_attributes(call, record)
        now = time.time_ns()
        seconds = time.perf_counter() - call.started
        parent = None
        if call.trace_context is not None:
            # A malformed or oversized header extracts to nothing: the span is then a root.
            traceparent, tracestate = call.trace_context
            carrier = {"traceparent": traceparent[:MAX_TRACE_HEADER]}
            if tracestate:
                carrier["tracestate"] = tracestate[:MAX_TRACE_HEADER]
            parent = self._propagator.extract(carrier)
        span = self.tracer.start_span(
            span_name(call),
            context=parent,
            kind=self._client,
            attributes=attributes,
            start_time=now - int(seconds * 1e9),
        )
        if "error.type" in attributes:
            span.set_status(self._error)
        span.end(end_time=now)
        if self.duration is None:
            return
        common: dict[str, Any] = {
            key: attributes[key] for key in _METRIC_ATTRIBUTES if key in attributes
        }
        self.duration.record(seconds, common)
        if record.usage_reported:
            inputs: dict[str, Any] = {**common, "gen_ai.token.type": "input"}
            outputs: dict[str, Any] = {**common, "gen_ai.token.type": "output"}
            self.token_usage.record(attributes["gen_ai.usage.input_tokens"], inputs)
            self.token_usage.record(record.tokens.output, outputs)

    def shutdown(self) -> None:
        """Flush what is queued (bounded by the exporters' timeouts) and stop their threads."""
        self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
