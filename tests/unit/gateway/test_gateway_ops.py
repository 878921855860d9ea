"""Operating the gateway: metrics, health, configuration reload, the JSON Lines ledger."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from costwarden.api.usage import UsageRecord
from costwarden.gateway.sinks import JsonlLedgerSink
from costwarden.testing.gateway import GatewayThread, sample_config
from costwarden.testing.upstream import ServerThread

from .conftest import CHAT, StartGateway, wait_for


def metric(text: str, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def test_metrics_count_requests_tokens_cost_and_refusals(gateway: Any) -> None:
    httpx.post(gateway.url + "/v1/chat/completions", json=CHAT)
    httpx.post(
        gateway.url + "/v1/chat/completions", json=CHAT, headers={"X-Costwarden-Sensitivity": "x"}
    )

    # Not on the API port: Prometheus scrapes --metrics-port (server.metrics_server).
    assert httpx.get(gateway.url + "/metrics").status_code == 404
    text = gateway.gateway.metrics.exposition().decode()

    record = gateway.sink.records[0]
    ok = 'costwarden_gateway_requests_total{model="gpt-4o-mini",outcome="OK",provider="OpenAI"'
    assert metric(text, ok) == 1
    assert metric(text, 'costwarden_gateway_tokens_total{kind="output"') == record.tokens.output
    assert metric(text, "costwarden_gateway_cost_usd_total{") == float(record.cost_usd)
    assert metric(text, 'costwarden_gateway_refused_total{reason="invalid_request"') == 1
    assert "costwarden_gateway_added_latency_seconds_bucket" in text
    assert "sk-provider" not in text


def test_health_and_readiness(gateway: Any, tmp_path: Path) -> None:
    with GatewayThread(None, config_path=tmp_path / "missing.json") as not_ready:
        assert httpx.get(not_ready.url + "/healthz").status_code == 200
        assert httpx.get(not_ready.url + "/readyz").status_code == 503
        assert httpx.post(not_ready.url + "/v1/chat/completions", json=CHAT).status_code == 503

    assert httpx.get(gateway.url + "/readyz").status_code == 200


def write_config_map(root: Path, payload: bytes, generation: int) -> None:
    """Swap the mounted file as the kubelet does: a new dir, then an atomic symlink rename."""
    data = root / f"..{generation}"
    data.mkdir()
    (data / "gateway-config.json").write_bytes(payload)
    tmp = root / "..data_tmp"
    tmp.symlink_to(data.name)
    os.replace(tmp, root / "..data")
    link = root / "gateway-config.json"
    if not link.is_symlink():
        link.symlink_to("..data/gateway-config.json")


def test_config_reloads_on_configmap_swap_and_keeps_serving(
    upstream: ServerThread, tmp_path: Path, credentials_dir: Path
) -> None:
    config = sample_config(upstream.url)
    write_config_map(tmp_path, config.model_dump_json(by_alias=True).encode(), 1)
    with GatewayThread(
        None, config_path=tmp_path / "gateway-config.json", credentials_dir=credentials_dir
    ) as gateway:
        first = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT)
        config.revision = "rev-2"
        config.policies[0].default_model = "gpt-4o"
        write_config_map(tmp_path, config.model_dump_json(by_alias=True).encode(), 2)

        asked = iter(range(10_000))

        def served_by_new_revision() -> httpx.Response | None:
            # Distinct questions: identical ones would (rightly) trip loop detection.
            body = {**CHAT, "messages": [{"role": "user", "content": f"q{next(asked)}"}]}
            response = httpx.post(gateway.url + "/v1/chat/completions", json=body)
            assert response.status_code == 200  # never dropped during the swap
            return response if response.headers["x-costwarden-config-revision"] == "rev-2" else None

        second = wait_for(served_by_new_revision, what="the new revision")

    assert first.headers["x-costwarden-model"] == "gpt-4o-mini"
    assert second.headers["x-costwarden-model"] == "gpt-4o"


def test_invalid_config_keeps_the_previous_one(
    upstream: ServerThread, tmp_path: Path, credentials_dir: Path
) -> None:
    path = tmp_path / "config.json"
    path.write_text(sample_config(upstream.url).model_dump_json(by_alias=True))
    with GatewayThread(None, config_path=path, credentials_dir=credentials_dir) as gateway:
        path.write_text('{"teams": "not a list"}')
        wait_for(lambda: gateway.gateway.config.errors, what="the rejected reload")

        response = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT)

    assert response.headers["x-costwarden-config-revision"] == "rev-1"


def test_ledger_appends_one_parsable_line_per_record(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger" / "usage.jsonl"
    sink = JsonlLedgerSink(ledger)
    gateway = start_gateway(sink=sink)
    for _ in range(3):
        httpx.post(gateway.url + "/v1/chat/completions", json=CHAT)
    gateway.stop()  # closing the sink flushes and fsyncs

    lines = ledger.read_text().splitlines()
    parsed = [UsageRecord.model_validate_json(line) for line in lines]
    assert len(parsed) == 3
    assert len({r.id for r in parsed}) == 3
    assert all(r.team == "team-a/budget" and r.cost_usd > 0 for r in parsed)
    assert parsed[0].cost_usd == gateway_cost(lines[0])
    assert "E-" not in lines[0]


def gateway_cost(line: str) -> Decimal:
    # The exact Decimal string as written, parsed without any float in between.
    return Decimal(json.loads(line, parse_float=Decimal)["costUSD"])


def test_ledger_writes_each_record_before_emit_returns(tmp_path: Path) -> None:
    """Ledger-only mode: the line is in the file (write(2), the page cache) when emit
    returns, i.e. before the call's answer leaves the gateway: a kill -9 cannot lose it.
    A call that costs nothing and charges no team (unattributed, refused before any
    upstream call) is not written at all."""

    async def scenario() -> tuple[int, int]:
        path = tmp_path / "l.jsonl"
        sink = JsonlLedgerSink(path)
        sink.emit(
            UsageRecord.model_validate(
                {"time": "2026-01-01T00:00:00Z", "endpoint": "messages", "outcome": "OK",
                 "team": "ns/b"}
            )
        )  # fmt: skip
        written = path.stat().st_size  # no waiting: already there
        for free in (
            {"outcome": "OK"},  # no team: nobody to charge
            {"outcome": "Refused", "team": "ns/b", "reason": "hard_cap_reached"},
        ):
            sink.emit(
                UsageRecord.model_validate(
                    {"time": "2026-01-01T00:00:00Z", "endpoint": "messages", **free}
                )
            )
        after = path.stat().st_size
        await sink.close()
        return written, after

    written, after = asyncio.run(scenario())
    assert written > 0
    assert after == written


def test_ledger_only_sink_is_full_at_its_bound(tmp_path: Path) -> None:
    async def scenario() -> list[bool]:
        sink = JsonlLedgerSink(tmp_path / "l.jsonl", max_bytes=1000)
        states = []
        for _ in range(5):
            sink.emit(
                UsageRecord.model_validate(
                    {"time": "2026-01-01T00:00:00Z", "endpoint": "messages", "outcome": "OK",
                     "team": "ns/b"}
                )
            )  # fmt: skip
            states.append(sink.full)
        await sink.close()
        return states

    states = asyncio.run(scenario())
    assert states[0] is False
    assert states[-1] is True


def test_hot_path_record_equals_the_validated_model(gateway: Any) -> None:
    httpx.post(gateway.url + "/v1/chat/completions", json=CHAT)
    record = gateway.sink.records[0]

    validated = UsageRecord.model_validate_json(record.model_dump_json(by_alias=True))

    assert validated == record
    assert validated.model_dump() == record.model_dump()


def test_decision_log_has_one_line_per_call_and_no_secrets(
    gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="costwarden.gateway.decision")
    body = {**CHAT, "messages": [{"role": "user", "content": "a secret prompt text"}]}

    httpx.post(
        gateway.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": "Bearer sk-client"},
    )

    lines = [r.getMessage() for r in caplog.records if r.name == "costwarden.gateway.decision"]
    assert len(lines) == 1
    decision = json.loads(lines[0])
    assert (decision["model"], decision["rule"], decision["outcome"]) == (
        "gpt-4o-mini",
        "default",
        "OK",
    )
    for secret in ("sk-provider-secret-key", "sk-client", "secret prompt"):
        assert secret not in lines[0]


def test_healthz_fails_once_a_background_task_cannot_recover(tmp_path: Path) -> None:
    with GatewayThread(None, config_path=tmp_path / "missing.json") as running:
        running.gateway.supervisor.unhealthy_after = 0.5

        def broken() -> bool:
            raise RuntimeError("config store bug")

        running.gateway.config.poll = broken  # type: ignore[method-assign]
        wait_for(
            lambda: httpx.get(running.url + "/healthz").status_code == 503,
            what="/healthz failing",
        )
        answer = httpx.get(running.url + "/healthz").text
        assert "config-watch" in answer
        assert "config store bug" in answer
        text = running.gateway.metrics.exposition().decode()
        assert metric(text, 'costwarden_gateway_task_failing{task="config-watch"}') == 1
        assert metric(text, 'costwarden_gateway_task_restarts_total{task="config-watch"}') >= 1
