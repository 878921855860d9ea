"""OpenTelemetry from the gateway: one GenAI span per call, the conventions' names, no content."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from costwarden.api.usage import format_exact_usd
from costwarden.gateway import cli
from costwarden.gateway.telemetry import OtelTelemetry, traces_url
from costwarden.testing.gateway import PROVIDER_KEY, GatewayThread, sample_config
from costwarden.testing.upstream import FakeUpstream

from .conftest import CHAT, MESSAGE, records, wait_for

SECRET_PROMPT = "the launch code is swordfish-7731"


class Recorded:
    def __init__(self, gateway: GatewayThread) -> None:
        self.spans = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()
        # SimpleSpanProcessor: the span is exported as it ends, so the test needs no flush.
        gateway.gateway.telemetry = OtelTelemetry(
            SimpleSpanProcessor(self.spans), metric_readers=(self.reader,)
        )

    def one_span(self) -> ReadableSpan:
        spans = wait_for(self.spans.get_finished_spans, what="a finished span")
        assert len(spans) == 1, [s.name for s in spans]
        return spans[0]

    def histogram_points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]


@pytest.fixture
def recorded(gateway: GatewayThread) -> Recorded:
    return Recorded(gateway)


def chat(gateway: GatewayThread, body: dict[str, Any], path: str = "/v1/chat/completions",
         **kw: Any) -> httpx.Response:  # fmt: skip
    return httpx.post(gateway.url + path, json=body, timeout=10, **kw)


def test_a_chat_call_is_one_client_span_with_the_genai_attributes(
    gateway: GatewayThread, recorded: Recorded
) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": SECRET_PROMPT}]}

    response = chat(gateway, body, headers={"X-Costwarden-Task": "code-review"})

    assert response.status_code == 200
    record = records(gateway).records[-1]
    span = recorded.one_span()
    assert span.name == "chat gpt-4o"
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.UNSET
    attributes = dict(span.attributes or {})
    served = response.headers["x-costwarden-model"]
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == "gpt-4o"
    assert attributes["costwarden.served_model"] == served
    assert attributes["gen_ai.response.model"] == record.upstream_model
    assert attributes["gen_ai.usage.input_tokens"] == record.tokens.prompt() > 0
    assert attributes["gen_ai.usage.output_tokens"] == record.tokens.output > 0
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == record.tokens.cached_input
    assert attributes["costwarden.cost_usd"] == format_exact_usd(record.cost_usd)
    assert isinstance(attributes["costwarden.cost_usd"], str)  # exact, never a float
    assert attributes["costwarden.request_id"] == response.headers["x-costwarden-request-id"]
    assert attributes["costwarden.team"] == record.team
    assert attributes["costwarden.namespace"] == record.namespace
    assert attributes["costwarden.job"] == "agent-1"
    assert attributes["costwarden.rule"] == record.rule
    assert attributes["costwarden.outcome"] == "OK"
    assert attributes["server.address"] == "127.0.0.1"
    assert "error.type" not in attributes
    assert span.end_time is not None
    assert span.start_time is not None
    assert 0 < span.end_time - span.start_time < 10 * 10**9


def test_no_prompt_completion_or_credential_in_any_attribute(
    gateway: GatewayThread, recorded: Recorded
) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": SECRET_PROMPT}]}

    response = chat(gateway, body, headers={"Authorization": "Bearer sk-client-token-123"})

    assert response.status_code == 200
    answer = response.json()["choices"][0]["message"]["content"]
    span = recorded.one_span()
    dumped = json.dumps({**dict(span.attributes or {}), "name": span.name})
    dumped += json.dumps(dict(span.resource.attributes))
    for secret in ("swordfish", answer, PROVIDER_KEY, "sk-client-token-123"):
        assert secret not in dumped


def test_anthropic_cache_tokens_count_in_input_and_apart(
    gateway: GatewayThread, recorded: Recorded, fake: FakeUpstream
) -> None:
    response = chat(gateway, MESSAGE, path="/v1/messages")

    assert response.status_code == 200
    record = records(gateway).records[-1]
    attributes = dict(recorded.one_span().attributes or {})
    assert attributes["gen_ai.provider.name"] == "anthropic"
    assert attributes["gen_ai.operation.name"] == "chat"
    tokens = record.tokens
    assert attributes["gen_ai.usage.input_tokens"] == (
        tokens.input + tokens.cached_input + tokens.cache_creation + tokens.cache_creation_1h
    )
    assert attributes["gen_ai.usage.cache_creation.input_tokens"] == (
        tokens.cache_creation + tokens.cache_creation_1h
    )


def test_a_refused_call_carries_error_type_and_an_error_status(
    gateway: GatewayThread, recorded: Recorded
) -> None:
    response = httpx.post(gateway.url + "/v1/chat/completions", content=b"not json", timeout=10)

    assert response.status_code == 400
    span = recorded.one_span()
    assert span.name == "chat"  # no model asked for
    attributes = dict(span.attributes or {})
    assert attributes["error.type"] == response.headers["x-costwarden-refusal"]
    assert attributes["costwarden.outcome"] == "Refused"
    assert attributes["costwarden.cost_usd"] == "0"
    assert "gen_ai.usage.input_tokens" not in attributes  # nothing was used
    assert span.status.status_code is StatusCode.ERROR


def test_an_upstream_error_is_named_by_its_class(
    gateway: GatewayThread, recorded: Recorded, fake: FakeUpstream
) -> None:
    for model in ("gpt-4o", "gpt-4o-mini"):
        fake.script(model, "500", "500", "500")

    response = chat(gateway, CHAT, headers={"X-Costwarden-Task": "code-review"})

    assert response.status_code >= 500
    attributes = dict(recorded.one_span().attributes or {})
    assert attributes["error.type"] == "upstream_500"
    assert attributes["costwarden.outcome"] == "UpstreamError"


def test_token_usage_histogram_by_token_type(gateway: GatewayThread, recorded: Recorded) -> None:
    assert chat(gateway, CHAT).status_code == 200
    record = records(gateway).records[-1]

    points = recorded.histogram_points("gen_ai.client.token.usage")
    by_type = {p.attributes["gen_ai.token.type"]: p for p in points}
    assert by_type["input"].sum == record.tokens.prompt()
    assert by_type["output"].sum == record.tokens.output
    assert by_type["input"].attributes["gen_ai.request.model"] == "gpt-4o"
    assert by_type["input"].attributes["costwarden.team"] == record.team
    assert "costwarden.job" not in by_type["input"].attributes  # unbounded: spans only
    (duration,) = recorded.histogram_points("gen_ai.client.operation.duration")
    assert duration.count == 1


def test_a_telemetry_failure_does_not_fail_the_call(
    gateway: GatewayThread, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def observe(self, call: Any, record: Any) -> None:
            raise RuntimeError("exporter exploded")

        def shutdown(self) -> None:
            pass

    gateway.gateway.telemetry = Broken()

    response = chat(gateway, CHAT)

    assert response.status_code == 200
    assert records(gateway).records[-1].outcome == "OK"
    assert "OpenTelemetry span not recorded" in caplog.text


def test_off_by_default(gateway: GatewayThread) -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--config", "c.json"])
    assert (args.otel, args.otel_endpoint) == (False, None)
    assert gateway.gateway.telemetry is None


def test_a_gateway_without_otel_never_imports_the_sdk(tmp_path: Path, upstream: Any) -> None:
    """Off by default means no provider, no exporter thread, not even the import."""
    config = tmp_path / "gateway-config.json"
    config.write_text(sample_config(upstream.url).model_dump_json(by_alias=True))
    probe = (
        "import sys, argparse\n"
        "from costwarden.gateway import cli\n"
        "p = argparse.ArgumentParser(); cli.add_arguments(p)\n"
        f"gw = cli.build_gateway(p.parse_args(['--config', {str(config)!r}]))\n"
        "assert gw.telemetry is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_otel_endpoint_builds_the_otlp_exporters(tmp_path: Path, upstream: Any) -> None:
    config = tmp_path / "gateway-config.json"
    config.write_text(sample_config(upstream.url).model_dump_json(by_alias=True))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--config", str(config), "--otel-endpoint", "http://collector:4318/"])
    gateway = cli.build_gateway(args)
    try:
        telemetry = gateway.telemetry
        assert isinstance(telemetry, OtelTelemetry)
        assert telemetry.meter_provider is None
        processor = telemetry.tracer_provider._active_span_processor._span_processors[0]
        assert (
            processor._batch_processor._exporter._endpoint
            == traces_url("http://collector:4318/")
            == "http://collector:4318/v1/traces"
        )
    finally:
        assert gateway.telemetry is not None
        gateway.telemetry.shutdown()


def test_the_callers_trace_context_makes_the_span_its_child(
    gateway: GatewayThread, recorded: Recorded
) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

    response = chat(gateway, CHAT, headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})

    assert response.status_code == 200
    span = recorded.one_span()
    assert span.parent is not None
    assert (span.context.trace_id, span.parent.span_id) == (int(trace_id, 16), int(parent_id, 16))


def test_a_malformed_trace_context_gives_a_root_span(
    gateway: GatewayThread, recorded: Recorded
) -> None:
    response = chat(gateway, CHAT, headers={"traceparent": "00-not-a-trace" + "x" * 5000})

    assert response.status_code == 200
    assert recorded.one_span().parent is None


@pytest.mark.parametrize(
    "endpoint", ["otel-collector:4318", "grpc://c:4317", "http://", "http://c/?x=1"]
)
def test_a_bad_endpoint_is_refused_at_start(endpoint: str) -> None:
    with pytest.raises(ValueError, match="--otel-endpoint"):
        OtelTelemetry.otlp(endpoint)
