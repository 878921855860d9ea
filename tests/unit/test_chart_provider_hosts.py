"""The chart's providerHosts.allowed reaches the operator as --allowed-provider-host."""

from __future__ import annotations

from typing import Any

from costwarden.api.endpoints import ProviderHosts
from costwarden.cli import build_parser
from tests.unit.test_chart import (  # noqa: F401  (fixtures)
    CHART,
    NAMESPACE,
    RELEASE,
    container_args,
    helm,
    helm_env,
    template,
)

FLAG = "--allowed-provider-host"


def _hosts(args: list[str]) -> list[str]:
    return [arg.split("=", 1)[1] for arg in args if arg.startswith(f"{FLAG}=")]


def test_no_allow_list_by_default(helm: Any) -> None:  # noqa: F811
    assert _hosts(container_args(template(helm), "operator")) == []


def test_each_allowed_host_is_one_operator_flag_the_operator_accepts(helm: Any) -> None:  # noqa: F811
    values = '["api.openai.com","*.openai.azure.com"]'
    args = container_args(
        template(helm, "--set-json", f"providerHosts.allowed={values}"), "operator"
    )

    assert _hosts(args) == ["api.openai.com", "*.openai.azure.com"]
    parsed = build_parser().parse_args(args)
    hosts = ProviderHosts.parse(parsed.allowed_provider_hosts)
    assert hosts.allows_host("api.openai.com")
    assert hosts.allows_host("eastus.openai.azure.com")
    assert not hosts.allows_host("openai.azure.com")
    assert not hosts.allows_host("api.attacker.example")


def test_a_url_or_a_port_is_not_a_provider_host(helm: Any) -> None:  # noqa: F811
    for entry in ("https://api.openai.com", "api.openai.com:443", "*"):
        result = helm(
            "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
            "--set-json", f'providerHosts.allowed=["{entry}"]',
        )  # fmt: skip
        assert result.returncode != 0, entry
        assert "providerHosts" in result.stderr, result.stderr
