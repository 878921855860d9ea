"""OpenTelemetry end to end: a real ``costwarden gateway`` process started with
``--otel-endpoint`` exports, over OTLP/HTTP (protobuf), the GenAI span of a call the
official openai SDK made through it, and the ``gen_ai.client.token.usage`` histogram. The
collector is a small aiohttp receiver here that decodes what arrives with
``opentelemetry-proto``, as a real collector would.

No control plane is needed: these are processes and sockets on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from costwarden.children import exit_with_parent, terminate
from costwarden.ports import free_port
from costwarden.testing.gateway import PROVIDER_KEY, TEAM_ID, sample_config, write_credentials
from costwarden.testing.threads import ServerThread
from costwarden.testing.upstream import FakeUpstream
from tests.support.polling import wait_for

TEAM_KEY = "cw-otel-team-key"
PROMPT = "summarize the quarterly plan for project bluefalcon"
TRACE_ID, PARENT_ID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
SPAN_KIND_CLIENT = 3  # opentelemetry.proto.trace.v1.Span.SpanKind.SPAN_KIND_CLIENT


def value(any_value: AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


@dataclass
class Collector:
    """What an OTLP/HTTP collector received: decoded spans and metrics, and the raw bodies."""

    spans: list[tuple[dict[str, Any], Any]] = field(default_factory=list)
    """(resource attributes, span) pairs."""
    metrics: list[Any] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    content_types: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        return app

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        message = ExportTraceServiceRequest.FromString(body)
        with self.lock:
            self.bodies.append(body)
            self.content_types.add(request.content_type)
            for resource_spans in message.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope in resource_spans.scope_spans:
                    self.spans.extend((resource, span) for span in scope.spans)
        return web.Response(content_type="application/x-protobuf")

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await request.read()
        message = ExportMetricsServiceRequest.FromString(body)
        with self.lock:
            self.bodies.append(body)
            for resource_metrics in message.resource_metrics:
                for scope in resource_metrics.scope_metrics:
                    self.metrics.extend(scope.metrics)
        return web.Response(content_type="application/x-protobuf")


@pytest.fixture
def collector() -> Iterator[tuple[Collector, ServerThread]]:
    received = Collector()
    with ServerThread(received.app) as server:
        yield received, server


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def upstream(fake: FakeUpstream) -> Iterator[ServerThread]:
    with ServerThread(fake.app) as server:
        yield server


@dataclass
class GatewayProcess:
    port: int
    ledger: Path
    log: Path
    process: subprocess.Popen[bytes]

    def records(self) -> list[dict[str, Any]]:
        if not self.ledger.exists():
            return []
        return [json.loads(line) for line in self.ledger.read_text().splitlines() if line]


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Any]:
    started: list[GatewayProcess] = []

    def start(upstream_url: str, *flags: str, env: dict[str, str] | None = None) -> GatewayProcess:
        config = tmp_path / "gateway-config.json"
        config.write_text(sample_config(upstream_url).model_dump_json(by_alias=True))
        keys = tmp_path / "keys.yaml"
        keys.write_text(f"{hashlib.sha256(TEAM_KEY.encode()).hexdigest()}: {TEAM_ID}\n")
        credentials = write_credentials(tmp_path / "credentials")
        port, ledger, log = free_port(), tmp_path / "ledger.jsonl", tmp_path / "gateway.log"
        # The exporter honours proxy variables too: a developer's proxy must not eat the spans.
        base = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    sys.executable, "-m", "costwarden", "gateway", "--config", str(config),
                    "--host", "127.0.0.1", "--port", str(port), "--mode", "shared",
                    "--api-keys-file", str(keys), "--credentials-dir", str(credentials),
                    "--ledger", str(ledger), "--ledger-fsync", "none", *flags,
                ],
                stdout=out, stderr=subprocess.STDOUT, env={**base, **(env or {})},
                preexec_fn=exit_with_parent(),
            )  # fmt: skip
        gateway = GatewayProcess(port, ledger, log, process)
        started.append(gateway)
        wait_for(lambda: _ready(gateway), timeout=30, what="gateway ready")
        return gateway

    yield start
    for gateway in started:
        terminate(gateway.process, 10)


def _ready(gateway: GatewayProcess) -> bool:
    if gateway.process.poll() is not None:
        raise AssertionError(f"gateway exited: {gateway.log.read_text()}")
    try:
        answer = httpx.get(f"http://127.0.0.1:{gateway.port}/readyz", timeout=1, trust_env=False)
    except httpx.HTTPError:
        return False
    return answer.status_code == 200


def _client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key=TEAM_KEY, max_retries=0,
        timeout=20, http_client=httpx.Client(trust_env=False),
    )  # fmt: skip


def test_the_gateway_exports_the_genai_span_of_an_sdk_call_over_otlp(
    collector: tuple[Collector, ServerThread], upstream: ServerThread, start_gateway: Any
) -> None:
    received, server = collector
    gateway = start_gateway(
        upstream.url,
        "--otel-endpoint", server.url, "--otel-metrics",
        # Export within 100 ms, not the SDK's default 5 s: the standard variables apply.
        env={"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "200",
             "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test"},
    )  # fmt: skip

    answer = _client(gateway).chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": PROMPT}],
        extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
    )

    record = wait_for(lambda: gateway.records() and gateway.records()[-1], what="ledger")
    resource, span = wait_for(lambda: received.spans and received.spans[-1], what="a span")
    assert len(received.spans) == 1
    assert received.content_types == {"application/x-protobuf"}
    assert resource["service.name"] == "costwarden-gateway"
    assert resource["deployment.environment.name"] == "test"
    assert span.name == "chat gpt-4o"
    assert span.kind == SPAN_KIND_CLIENT
    assert (span.trace_id.hex(), span.parent_span_id.hex()) == (TRACE_ID, PARENT_ID)
    seen = attributes(span.attributes)
    usage = answer.usage
    assert usage is not None
    assert seen["gen_ai.operation.name"] == "chat"
    assert seen["gen_ai.provider.name"] == "openai"
    assert seen["gen_ai.request.model"] == "gpt-4o"
    assert seen["gen_ai.response.model"] == record["upstreamModel"]
    assert seen["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert seen["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert seen["costwarden.cost_usd"] == record["costUSD"]
    assert Decimal(seen["costwarden.cost_usd"]) > 0
    assert seen["costwarden.team"] == TEAM_ID
    assert seen["costwarden.request_id"] == record["id"]
    assert seen["costwarden.outcome"] == "OK"
    assert "error.type" not in seen
    assert span.end_time_unix_nano > span.start_time_unix_nano

    def token_points() -> list[Any]:
        with received.lock:
            return [
                point
                for metric in received.metrics
                if metric.name == "gen_ai.client.token.usage"
                for point in metric.histogram.data_points
            ]

    points = wait_for(token_points, what="the token usage histogram")
    by_type = {attributes(p.attributes)["gen_ai.token.type"]: p for p in points}
    assert by_type["input"].sum == usage.prompt_tokens
    assert by_type["output"].sum == usage.completion_tokens
    with received.lock:
        raw = b"".join(received.bodies)
    for secret in (PROMPT, "bluefalcon", answer.choices[0].message.content or "?", PROVIDER_KEY,
                   TEAM_KEY):  # fmt: skip
        assert secret.encode() not in raw


def test_without_the_flag_nothing_is_exported(
    collector: tuple[Collector, ServerThread], upstream: ServerThread, start_gateway: Any
) -> None:
    """The standard variable alone does not turn it on: off unless --otel is given."""
    received, server = collector
    gateway = start_gateway(
        upstream.url,
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": server.url, "OTEL_BSP_SCHEDULE_DELAY": "50"},
    )

    _client(gateway).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": PROMPT}]
    )
    wait_for(gateway.records, what="ledger")
    terminate(gateway.process, 10)  # a gateway exporting would flush its spans at shutdown

    assert gateway.process.returncode is not None
    assert received.spans == []
    assert received.bodies == []


def test_otel_flag_uses_the_standard_endpoint_variable_and_flushes_at_shutdown(
    collector: tuple[Collector, ServerThread], upstream: ServerThread, start_gateway: Any
) -> None:
    received, server = collector
    gateway = start_gateway(
        upstream.url, "--otel",
        # The default 5 s delay: only the flush at SIGTERM can deliver the span in time.
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": server.url},
    )  # fmt: skip

    _client(gateway).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": PROMPT}]
    )
    wait_for(gateway.records, what="ledger")
    terminate(gateway.process, 10)

    assert [span.name for _, span in received.spans] == ["chat gpt-4o"]
    assert received.metrics == []
