"""A hostile or foreign upstream's error never hands the provider key (or its own page) to
the caller; an External model outside the admin's provider hosts is never contacted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from costwarden.api.usage import Outcome
from costwarden.testing.gateway import sample_config, write_credentials
from costwarden.testing.upstream import FakeUpstream, ServerThread

from .conftest import CHAT, MESSAGE, StartGateway, records, wait_for

ROUTES = {
    "openai": ("gpt-4o-mini", "/v1/chat/completions", CHAT),
    "anthropic": ("claude-fake-sonnet", "/v1/messages", MESSAGE),
}


# A key as random as a provider's (the shared test key is made of English words, which an
# 8-character piece of would also match in any sentence).
PROVIDER_KEY = "sk-proj-Zq81vXa7Lm3Rt9Pw2Kc5Yb0Hn4Jd6Fg"


@pytest.fixture
def credentials_dir(tmp_path: Path) -> Path:
    return write_credentials(tmp_path / "credentials", key=PROVIDER_KEY)


def _assert_no_key(text: str) -> None:
    for size in (8, 12, len(PROVIDER_KEY)):
        for start in range(len(PROVIDER_KEY) - size + 1):
            assert PROVIDER_KEY[start : start + size] not in text, text


@pytest.mark.parametrize("provider", sorted(ROUTES))
@pytest.mark.parametrize("fault", ["echo-key", "echo-key-fragment"])
def test_a_key_echoed_in_a_json_error_never_reaches_the_caller(
    gateway: Any, fake: FakeUpstream, provider: str, fault: str
) -> None:
    model, path, body = ROUTES[provider]
    fake.script(model, fault)

    response = httpx.post(gateway.url + path, json={**body, "model": model}, timeout=10)

    assert response.status_code == 401
    _assert_no_key(response.text)
    assert "[redacted]" in response.text
    error = response.json()["error"]
    assert error["type"] in ("invalid_request_error", "api_error")
    assert records(gateway).records[-1].outcome is Outcome.UPSTREAM_ERROR


@pytest.mark.parametrize("fault", ["echo-key-text", "html"])
def test_a_non_json_error_body_is_withheld(gateway: Any, fake: FakeUpstream, fault: str) -> None:
    fake.script("gpt-4o-mini", fault)

    body = CHAT | {"model": "gpt-4o-mini"}
    response = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10)

    assert response.status_code == 502
    _assert_no_key(response.text)
    assert "<html" not in response.text
    assert "internal-lb" not in response.text
    assert "withheld" in response.json()["error"]["message"]


@pytest.mark.parametrize("provider", sorted(ROUTES))
def test_a_key_echoed_in_a_stream_error_event_never_reaches_the_caller(
    gateway: Any, fake: FakeUpstream, provider: str
) -> None:
    model, path, body = ROUTES[provider]
    fake.script(model, "stream-echo-key")

    response = httpx.post(
        gateway.url + path, json={**body, "model": model, "stream": True}, timeout=10
    )

    _assert_no_key(response.text)
    errors = [
        orjson.loads(line.removeprefix("data: "))
        for line in response.text.splitlines()
        if line.startswith("data: ") and '"error"' in line
    ]
    assert any("[redacted]" in e["error"]["message"] for e in errors), response.text


def test_an_external_model_outside_the_provider_hosts_is_never_contacted(
    upstream: ServerThread, fake: FakeUpstream, start_gateway: StartGateway
) -> None:
    config = sample_config(upstream.url)
    config.allowed_provider_hosts = ["api.openai.com", "*.anthropic.com"]
    gateway = start_gateway(config)

    response = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=10)

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "provider_host_not_allowed"
    assert fake.calls == []
    record = wait_for(lambda: records(gateway).records[-1:], what="the record")[0]
    assert (record.outcome, record.reason) == (Outcome.REFUSED, "provider_host_not_allowed")
    assert record.cost_usd == 0


def test_an_in_cluster_model_is_not_subject_to_the_provider_hosts(
    upstream: ServerThread, fake: FakeUpstream, start_gateway: StartGateway
) -> None:
    config = sample_config(upstream.url)
    config.allowed_provider_hosts = ["api.openai.com"]
    gateway = start_gateway(config)

    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        json=CHAT,
        headers={"X-Costwarden-Sensitivity": "Confidential"},  # routed to local-llama
        timeout=10,
    )

    assert response.status_code == 200, response.text
    assert response.headers["x-costwarden-model"] == "local-llama"
    assert len(fake.calls) == 1
