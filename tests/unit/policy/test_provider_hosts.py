"""The admin's provider hosts: matching, and the operator's verdict on a policy."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from costwarden.api.catalog import default_catalog
from costwarden.api.conditions import Reason
from costwarden.api.endpoints import ProviderHosts
from costwarden.policy.render import ObservedObject, reconcile

NOW = datetime(2026, 1, 15, tzinfo=UTC)
HOSTS = ProviderHosts.parse(["api.openai.com", "*.openai.azure.com,  API.Anthropic.com."])


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("api.openai.com", True),
        ("API.OPENAI.COM.", True),
        ("api.anthropic.com", True),
        ("eastus.openai.azure.com", True),
        ("a.b.openai.azure.com", True),
        ("openai.azure.com", False),  # *.suffix is for names below the suffix
        ("evilopenai.azure.com", False),
        ("api.openai.com.attacker.example", False),
        ("openai.com", False),
        ("", False),
    ],
)
def test_exact_and_suffix_entries(host: str, allowed: bool) -> None:
    assert HOSTS.allows_host(host) is allowed


def test_an_empty_list_allows_any_host() -> None:
    assert ProviderHosts.parse([]).allows_host("api.attacker.example")
    assert not ProviderHosts.parse([]).restricted


@pytest.mark.parametrize(
    "entry", ["https://api.openai.com", "api.openai.com:443", "*", "*.", "a..b"]
)
def test_entries_that_are_not_hosts_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="neither a host name nor"):
        ProviderHosts.parse([entry])


def _policy(endpoint: str, locality: str = "External") -> ObservedObject:
    model = {
        "name": "gpt-4o-mini",
        "provider": "OpenAI",
        "endpoint": endpoint,
        "locality": locality,
    }
    return ObservedObject("team-a", "p", 3, {"models": [model], "defaultModel": "gpt-4o-mini"})


def test_a_policy_off_the_list_is_not_ready_naming_the_endpoint_and_left_out() -> None:
    result = reconcile(
        [], [_policy("https://api.attacker.example/v1")], default_catalog(), NOW, HOSTS
    )

    verdict = result.policies["team-a/p"]
    assert (verdict.ready, verdict.reason) == (False, Reason.PROVIDER_HOST_NOT_ALLOWED)
    assert verdict.message.startswith("spec.models[0].endpoint: host 'api.attacker.example'")
    assert result.config.policies == []
    assert result.config.allowed_provider_hosts == list(HOSTS.allowed)


def test_a_policy_on_the_list_and_an_in_cluster_model_are_ready() -> None:
    policies = [_policy("https://api.openai.com/v1")]
    in_cluster = _policy("http://vllm.models.svc:8000/v1", "InCluster")
    in_cluster = ObservedObject("team-b", "p", 1, in_cluster.spec)

    result = reconcile([], [*policies, in_cluster], default_catalog(), NOW, HOSTS)

    assert result.policies["team-a/p"].ready
    assert result.policies["team-b/p"].ready


def test_without_a_list_the_rendered_config_is_unchanged() -> None:
    result = reconcile([], [_policy("https://api.openai.com/v1")], default_catalog(), NOW)
    assert result.config.allowed_provider_hosts is None
    assert "allowedProviderHosts" not in result.config.to_wire()
