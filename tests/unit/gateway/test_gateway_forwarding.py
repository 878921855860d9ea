"""Forwarding: fallbacks, malformed upstreams, streams, disconnects, downgrades, hints."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from costwarden.api.gatewayconfig import SpendState
from costwarden.api.usage import Outcome
from costwarden.gateway.forward import charged_without_usage
from costwarden.testing.gateway import sample_config
from costwarden.testing.upstream import FakeUpstream, ServerThread

from .conftest import CHAT, MESSAGE, StartGateway, records, wait_for

REVIEW = {"X-Costwarden-Task": "code-review"}


def post(
    url: str, body: dict[str, Any], path: str = "/v1/chat/completions", **kw: Any
) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=10, **kw)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("status", ["429", "500", "503"])
def test_fallback_on_5xx_and_429(gateway: Any, fake: FakeUpstream, status: str) -> None:
    """The upstream answers a real HTTP ``status`` (with the provider's error body) first."""
    fake.script("gpt-4o", status)

    response = post(gateway.url, CHAT, headers=REVIEW)

    assert response.status_code == 200
    assert response.headers["x-costwarden-model"] == "gpt-4o-mini"
    assert "fallback" in response.headers["x-costwarden-reason"]
    record = records(gateway).records[-1]
    assert (record.outcome, record.attempts, record.served_model) == (Outcome.OK, 2, "gpt-4o-mini")
    first, second = fake.calls
    assert (first.model, first.usage, second.model) == ("gpt-4o", None, "gpt-4o-mini")
    errors = gateway.gateway.metrics.registry.get_sample_value(
        "costwarden_gateway_upstream_errors_total",
        {"model": "gpt-4o", "provider": "OpenAI", "kind": status},
    )
    assert errors == 1


def test_fallback_when_the_backend_is_unreachable(
    upstream: ServerThread, start_gateway: StartGateway
) -> None:
    config = sample_config(upstream.url)
    config.policies[0].models[0].endpoint = f"http://127.0.0.1:{closed_port()}/v1"
    gateway = start_gateway(config)

    response = post(gateway.url, CHAT, headers=REVIEW)

    assert response.status_code == 200
    assert response.headers["x-costwarden-model"] == "gpt-4o-mini"


def test_last_upstream_error_is_passed_through_and_costs_nothing(
    gateway: Any, fake: FakeUpstream
) -> None:
    fake.script("gpt-4o", "500")
    fake.script("gpt-4o-mini", "429")

    response = post(gateway.url, CHAT, headers=REVIEW)

    assert response.status_code == 429
    assert response.json()["error"]["message"] == "fake upstream fault 429"
    record = records(gateway).records[-1]
    assert (record.outcome, record.cost_usd, record.attempts) == (Outcome.UPSTREAM_ERROR, 0, 2)


def test_non_json_answer_is_a_502_never_free_usage(gateway: Any, fake: FakeUpstream) -> None:
    fake.script("gpt-4o-mini", "malformed")

    response = post(gateway.url, CHAT)

    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_malformed"
    record = records(gateway).records[-1]
    assert record.outcome is Outcome.UPSTREAM_MALFORMED
    assert not record.usage_reported


def test_answer_without_usage_is_a_502_in_anthropic_shape(gateway: Any, fake: FakeUpstream) -> None:
    fake.script("claude-fake-sonnet", "no-usage")

    response = post(gateway.url, MESSAGE, "/v1/messages")

    assert response.status_code == 502
    assert response.json()["type"] == "error"
    assert response.json()["error"]["code"] == "upstream_malformed"
    assert records(gateway).records[-1].outcome is Outcome.UPSTREAM_MALFORMED


def test_stream_without_usage_ends_with_an_error_event(gateway: Any, fake: FakeUpstream) -> None:
    fake.script("gpt-4o-mini", "no-usage")

    response = post(gateway.url, {**CHAT, "stream": True})

    events = [e for e in response.text.split("\n\n") if e]
    assert orjson.loads(events[-1].removeprefix("data: "))["error"]["code"] == "upstream_malformed"
    # A stream's record follows its last byte: poll for it.
    record = wait_for(lambda: records(gateway).records[-1:], what="the record")[0]
    assert record.outcome is Outcome.UPSTREAM_MALFORMED


def test_client_disconnect_mid_stream_is_metered_from_upstream_usage(
    gateway: Any, fake: FakeUpstream
) -> None:
    fake.script("claude-fake-sonnet", "slow")
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST", gateway.url + "/v1/messages", json={**MESSAGE, "stream": True}
        ) as response,
    ):
        next(response.iter_raw())  # the first event, then hang up
    record = wait_for(lambda: records(gateway).records[-1:], what="a record")[0]

    assert record.outcome is Outcome.CLIENT_DISCONNECTED
    assert record.usage_reported
    reported = fake.calls[-1].usage
    assert reported is not None
    assert record.tokens.output == reported["output_tokens"]
    assert record.tokens.cached_input == reported["cache_read_input_tokens"]
    assert record.cost_usd > 0


def test_soft_limited_team_is_downgraded(start_gateway: StartGateway) -> None:
    now = datetime.now(UTC)
    spend = SpendState(spent_usd=Decimal(85), period_start=now, period_end=now + timedelta(1))
    gateway = start_gateway(team={"spend": spend})

    response = post(gateway.url, CHAT, headers=REVIEW)

    assert response.headers["x-costwarden-model"] == "gpt-4o-mini"
    assert "soft limit" in response.headers["x-costwarden-reason"]


def test_session_affinity_keeps_a_conversation_on_its_backend(
    gateway: Any, fake: FakeUpstream
) -> None:
    fake.script("gpt-4o", "503")
    session = {**REVIEW, "X-Costwarden-Session": "conv-1"}
    first = post(gateway.url, CHAT, headers=session)
    second = post(
        gateway.url, {**CHAT, "messages": [{"role": "user", "content": "x"}]}, headers=session
    )

    assert first.headers["x-costwarden-model"] == "gpt-4o-mini"
    assert second.headers["x-costwarden-model"] == "gpt-4o-mini"
    assert "affinity" in second.headers["x-costwarden-reason"]


def test_metadata_hints_route_and_are_stripped_upstream(gateway: Any, fake: FakeUpstream) -> None:
    body = {**CHAT, "metadata": {"task": "code-review", "sensitivity": "Public"}}

    response = post(gateway.url, body)

    assert response.headers["x-costwarden-rule"] == "code-review"
    assert "metadata" not in fake.calls[-1].body
    assert fake.calls[-1].body["model"] == "gpt-4o"


def test_confidential_is_served_in_cluster(gateway: Any, fake: FakeUpstream) -> None:
    response = post(gateway.url, CHAT, headers={"X-Costwarden-Sensitivity": "confidential"})

    assert response.status_code == 200
    assert response.headers["x-costwarden-model"] == "local-llama"
    assert fake.calls[-1].body["model"] == "llama-3.1-8b"


def test_anthropic_model_for_openai_format_is_refused(gateway: Any, fake: FakeUpstream) -> None:
    response = post(gateway.url, {**CHAT, "model": "claude-fake-sonnet"})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "incompatible_route"
    assert fake.calls == []


def test_client_credentials_are_never_forwarded(gateway: Any, fake: FakeUpstream) -> None:
    post(gateway.url, CHAT, headers={"Authorization": "Bearer sk-client"})
    post(gateway.url, MESSAGE, "/v1/messages", headers={"x-api-key": "sk-client"})

    assert "sk-client" not in repr([(c.authorization, c.api_key) for c in fake.calls])


def test_client_disconnect_from_a_stream_without_usage_is_charged_an_estimate(
    gateway: Any, fake: FakeUpstream
) -> None:
    fake.script("gpt-4o-mini", "slow-no-usage")
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST", gateway.url + "/v1/chat/completions", json={**CHAT, "stream": True}
        ) as response,
    ):
        next(response.iter_raw())  # the first event, then hang up
    record = wait_for(lambda: records(gateway).records[-1:], what="a record")[0]

    assert record.outcome is Outcome.CLIENT_DISCONNECTED
    assert charged_without_usage(record.reason)
    assert record.usage_reported
    assert record.tokens.input > 0
    assert record.cost_usd > 0


def test_an_answer_over_the_size_bound_is_refused_not_buffered(
    gateway: Any, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from costwarden.gateway import forward

    monkeypatch.setattr(forward, "MAX_ANSWER_BYTES", 64)

    response = post(gateway.url, CHAT)

    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_malformed"
    assert "over 0 MiB" in response.json()["error"]["message"]
    record = records(gateway).records[-1]
    assert record.outcome is Outcome.UPSTREAM_MALFORMED
    assert not record.usage_reported
