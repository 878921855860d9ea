"""Provider keys in the gateway: the file layout the operator's mirror gives, the sidecar's
env, and the loud refusal when a model's key is missing (never forwarded without it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from costwarden.api.gatewayconfig import CredentialRef
from costwarden.api.usage import Outcome
from costwarden.gateway.credentials import SIDECAR_HINT, Credentials, env_name
from costwarden.policy.provider_keys import mirrored_key
from costwarden.testing.gateway import NAMESPACE, PROVIDER_KEY, sample_config, write_credentials
from costwarden.testing.upstream import FakeUpstream, ServerThread

from .conftest import CHAT, MESSAGE, StartGateway, records

REF = CredentialRef(namespace="ai-platform", name="openai-credentials", key="api_key.v2")


def test_a_key_is_read_from_the_file_the_mirror_names(tmp_path: Path) -> None:
    (tmp_path / "ai-platform_openai-credentials_api_key.v2").write_text("sk-from-file\n")
    assert mirrored_key(REF) == "ai-platform_openai-credentials_api_key.v2"
    assert Credentials(tmp_path).api_key(REF) == "sk-from-file"


def test_the_old_nested_layout_is_not_read(tmp_path: Path) -> None:
    nested = tmp_path / "ai-platform" / "openai-credentials" / "api_key.v2"
    nested.parent.mkdir(parents=True)
    nested.write_text("sk-nested")
    assert Credentials(tmp_path).api_key(REF) == ""


def test_env_is_the_fallback_a_sidecar_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_name(REF) == "COSTWARDEN_CREDENTIAL_AI_PLATFORM_OPENAI_CREDENTIALS_API_KEY_V2"
    monkeypatch.setenv(env_name(REF), "sk-from-env")
    assert Credentials(None).api_key(REF) == "sk-from-env"


def test_missing_message_names_the_reference_only() -> None:
    message = Credentials(None, hint=SIDECAR_HINT).missing_message("gpt-4o", REF)
    assert "Secret ai-platform/openai-credentials key 'api_key.v2'" in message
    assert "shared gateway" in message
    assert "team-owned Secret" in message


def test_keys_reach_the_upstream_from_the_mirrored_file(gateway: Any, fake: FakeUpstream) -> None:
    response = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=10)
    assert response.status_code == 200
    assert fake.calls[-1].authorization == f"Bearer {PROVIDER_KEY}"


@pytest.mark.parametrize(
    ("path", "body", "shape"),
    [("/v1/chat/completions", CHAT, "openai"), ("/v1/messages", MESSAGE, "anthropic")],
)
def test_a_model_without_its_key_is_refused_not_forwarded(
    start_gateway: StartGateway, fake: FakeUpstream, tmp_path: Path, path: str,
    body: dict[str, Any], shape: str,
) -> None:  # fmt: skip
    empty = tmp_path / "no-keys"
    empty.mkdir()
    gateway = start_gateway(credentials_dir=empty)

    response = httpx.post(gateway.url + path, json=body, timeout=10)

    assert response.status_code == 503
    assert response.headers["x-costwarden-refusal"] == "missing_credentials"
    assert response.headers["x-should-retry"] == "false"
    error = response.json()["error"]
    message = error["message"]
    assert f"Secret {NAMESPACE}/llm-keys key 'api-key'" in message
    if shape == "openai":
        assert error["code"] == "missing_credentials"
    else:
        assert response.json()["type"] == "error"
    assert fake.calls == [], "a call without its key must never reach the upstream"
    record = records(gateway).records[-1]
    assert record.outcome is Outcome.REFUSED
    assert record.reason == "missing_credentials"
    assert record.cost_usd == 0
    routed = re.search(r"model '([^']+)' needs", message)
    assert routed, message
    metrics = gateway.gateway.metrics.exposition().decode()  # --metrics-port in production
    assert f'costwarden_gateway_missing_credentials_total{{model="{routed[1]}"}} 1.0' in metrics, (
        metrics
    )


def test_a_fallback_with_its_key_serves_the_call(
    start_gateway: StartGateway, upstream: ServerThread, fake: FakeUpstream, tmp_path: Path
) -> None:
    # claude-sonnet's key is in another Secret, absent; claude-haiku (the fallback) has its.
    config = sample_config(upstream.url)
    sonnet = config.policies[0].model("claude-sonnet")
    assert sonnet is not None
    sonnet.credentials = CredentialRef(namespace=NAMESPACE, name="other-keys", key="api-key")
    gateway = start_gateway(config, credentials_dir=write_credentials(tmp_path / "keys"))

    response = httpx.post(gateway.url + "/v1/messages", json=MESSAGE, timeout=10)

    assert response.status_code == 200
    assert response.headers["x-costwarden-model"] == "claude-haiku"
    assert [c.api_key for c in fake.calls] == [PROVIDER_KEY]
    metrics = gateway.gateway.metrics.exposition().decode()  # --metrics-port in production
    assert 'costwarden_gateway_missing_credentials_total{model="claude-sonnet"} 1.0' in metrics
