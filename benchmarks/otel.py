"""What OpenTelemetry adds to the gateway's hot path, measured in process.

    python benchmarks/otel.py [--calls 20000] [--repeat 5]

Times ``Gateway._account`` (settle, record, metrics, decision log: where each call is
recorded, and where the span is emitted) for a completed chat call: telemetry off (the
default), spans, spans and the ``gen_ai.client.*`` histograms, spans sampled at 10%
(``OTEL_TRACES_SAMPLER=traceidratio``); then the span attributes alone and the export
thread's share, the OTLP protobuf encoding of a span. The span processor is the SDK's
BatchSpanProcessor, as in production, in front of an exporter that drops what it is given:
the request path pays for building the span and queueing it; the export runs on the SDK's
own thread (but in the same process, under the same GIL). The decision log is silenced, as
``--log-level WARNING`` would. Best of ``--repeat`` runs, per call.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import Endpoint, Outcome
from costwarden.gateway.call import Call
from costwarden.gateway.config import ConfigStore
from costwarden.gateway.identity import Caller
from costwarden.gateway.openai import OPENAI
from costwarden.gateway.proxy import Gateway
from costwarden.gateway.sinks import FanoutSink
from costwarden.gateway.telemetry import OtelTelemetry, span_attributes
from costwarden.gateway.upstream import make_upstream
from costwarden.testing.gateway import NAMESPACE, sample_config, sidecar_identity


class DropSpans(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class DropMetrics(MetricExporter):
    def __init__(self) -> None:
        super().__init__(preferred_temporality={}, preferred_aggregation={})

    def export(self, metrics_data: Any, timeout_millis: float = 0, **kwargs: Any) -> Any:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 0) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 0, **kwargs: Any) -> None:
        pass


def gateway() -> Gateway:
    store = ConfigStore(None)
    store.set(sample_config("http://127.0.0.1:9"))
    return Gateway(
        config=store,
        identifier=sidecar_identity(),
        upstream=make_upstream("http1", None),
        sink=FanoutSink([]),
    )


def completed_call(gw: Gateway) -> Call:
    compiled = gw.config.current
    assert compiled is not None
    team = next(iter(compiled.teams.values()))
    policy = compiled.policies[team.routing_policy]
    call = Call(Endpoint.CHAT_COMPLETIONS, OPENAI)
    call.revision = compiled.revision
    call.caller = Caller("sidecar", NAMESPACE, "agent-1-x", "agent-1")
    call.team, call.policy_id = team, team.routing_policy
    call.requested_model = "gpt-4o"
    call.served = policy.models["gpt-4o"]
    call.rule, call.reason = "code-review", "task code-review"
    call.admitted, call.attempts, call.status = True, 1, 200
    call.tokens = TokenUsage(input=812, cached_input=256, output=143)
    call.cost = Decimal("0.0036395")
    call.outcome = Outcome.OK
    return call


def per_call(run: Callable[[], None], calls: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("costwarden.gateway.decision").setLevel(logging.WARNING)
    gw = gateway()
    template = completed_call(gw)

    def account() -> None:
        call = completed_call_copy(template)
        gw._account(call)

    results: dict[str, float] = {}
    results["_account, telemetry off"] = per_call(account, args.calls, args.repeat)
    # A queue that never fills: a full one drops spans, which would flatter the figure.
    queue = args.calls + 1
    spans_only = OtelTelemetry(BatchSpanProcessor(DropSpans(), max_queue_size=queue))
    gw.telemetry = spans_only
    results["_account, spans"] = per_call(account, args.calls, args.repeat)
    reader = PeriodicExportingMetricReader(DropMetrics(), export_interval_millis=60_000)
    both = OtelTelemetry(
        BatchSpanProcessor(DropSpans(), max_queue_size=queue), metric_readers=(reader,)
    )
    gw.telemetry = both
    results["_account, spans + histograms"] = per_call(account, args.calls, args.repeat)
    # One call in ten traced (the standard sampler variables; the others pay the attributes
    # and a non-recording span).
    os.environ.update(OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="0.1")
    sampled = OtelTelemetry(BatchSpanProcessor(DropSpans(), max_queue_size=queue))
    del os.environ["OTEL_TRACES_SAMPLER"], os.environ["OTEL_TRACES_SAMPLER_ARG"]
    gw.telemetry = sampled
    results["_account, spans sampled 10%"] = per_call(account, args.calls, args.repeat)
    record = template.to_record("bench")
    results["span_attributes alone"] = per_call(
        lambda: span_attributes(template, record), args.calls, args.repeat
    )
    # The export thread's share: the OTLP exporter's protobuf encoding of a batch, per span.
    memory = InMemorySpanExporter()
    OtelTelemetry(SimpleSpanProcessor(memory)).observe(template, record)
    batch = list(memory.get_finished_spans()) * 512
    results["OTLP encoding, export thread"] = per_call(
        lambda: encode_spans(batch).SerializePartialToString(), 1, args.repeat
    ) / len(batch)
    off = results["_account, telemetry off"]
    for name, seconds in results.items():
        added = f"  (+{(seconds - off) * 1e6:.1f} us)" if name.startswith("_account, s") else ""
        print(f"{name:32} {seconds * 1e6:7.1f} us/span{added}")
    for telemetry in (spans_only, both, sampled):
        telemetry.shutdown()


def completed_call_copy(template: Call) -> Call:
    """A fresh Call (its own id and start) with the template's outcome: settle runs once."""
    call = Call(template.endpoint, template.fmt)
    for name in (
        "revision", "caller", "team", "policy_id", "requested_model", "served", "rule", "reason",
        "admitted", "attempts", "status", "tokens", "cost", "outcome",
    ):  # fmt: skip
        setattr(call, name, getattr(template, name))
    return call


if __name__ == "__main__":
    main()
