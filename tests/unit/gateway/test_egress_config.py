"""Which proxy an upstream goes through: the environment as curl and httpx read it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from costwarden.gateway.egress import Egress, Proxy, parse_proxy
from costwarden.pki import PrivateCA

PROXY = Proxy("proxy.corp", 3128)


@pytest.mark.parametrize(
    ("no_proxy", "url", "proxied"),
    [
        ("", "https://api.openai.com/v1", True),
        ("*", "https://api.openai.com/v1", False),
        ("openai.com", "https://api.openai.com/v1", False),  # a domain covers its subdomains
        ("openai.com", "https://openai.com/v1", False),
        (".openai.com", "https://api.openai.com/v1", False),
        ("*.openai.com", "https://api.openai.com/v1", False),
        ("OpenAI.COM", "https://api.openai.com/v1", False),  # case-insensitive
        ("penai.com", "https://api.openai.com/v1", True),  # a suffix only at a dot
        ("anthropic.com, openai.com", "https://api.openai.com/v1", False),
        ("anthropic.com openai.com", "https://api.openai.com/v1", False),
        ("api.openai.com:443", "https://api.openai.com/v1", False),
        ("api.openai.com:8443", "https://api.openai.com/v1", True),  # another port
        ("10.0.0.0/8", "https://10.1.2.3:8000/v1", False),  # CIDR
        ("10.0.0.0/8", "https://11.1.2.3:8000/v1", True),
        ("10.1.2.3", "https://10.1.2.3/v1", False),  # one address
        ("10.1.2.4", "https://10.1.2.3/v1", True),
        ("fd00::/8", "https://[fd12::1]:8000/v1", False),  # IPv6 CIDR
        ("::1", "https://[::1]:8000/v1", False),
        ("[::1]:8000", "https://[::1]:8000/v1", False),
        ("10.0.0.0/8", "https://vllm.ai-platform.svc:8000/v1", True),  # names not resolved
        ("svc", "http://vllm.ai-platform.svc:8000/v1", False),
        ("svc.cluster.local", "http://vllm.ai-platform.svc:8000/v1", True),
    ],
)
def test_no_proxy(no_proxy: str, url: str, proxied: bool) -> None:
    egress = Egress(http_proxy=PROXY, https_proxy=PROXY, no_proxy=no_proxy)

    assert (egress.proxy_for_url(url) == PROXY) is proxied


def test_lower_case_wins_and_each_scheme_has_its_proxy() -> None:
    egress = Egress.from_env(
        {
            "https_proxy": "http://lower:1",
            "HTTPS_PROXY": "http://upper:2",
            "HTTP_PROXY": "plain:3128",  # no scheme: http://
        }
    )

    assert egress.proxy_for_url("https://api.openai.com/v1") == Proxy("lower", 1)
    assert egress.proxy_for_url("http://vllm:8000/v1") == Proxy("plain", 3128)


def test_all_proxy_is_the_fallback_and_no_proxy_applies_to_it() -> None:
    egress = Egress.from_env({"ALL_PROXY": "http://all:8080", "NO_PROXY": ".svc"})

    assert egress.proxy_for_url("https://api.openai.com/v1") == Proxy("all", 8080)
    assert egress.proxy_for_url("http://vllm.ns.svc:8000/v1") is None


def test_no_environment_means_direct() -> None:
    assert Egress.from_env({}).proxy_for_url("https://api.openai.com/v1") is None


def test_userinfo_becomes_basic_proxy_authorization_and_never_shows() -> None:
    proxy = parse_proxy("http://al%40ice:s%3Acret@proxy.corp:3128")

    assert (proxy.username, proxy.password) == ("al@ice", "s:cret")
    assert proxy.authorization == "Basic YWxAaWNlOnM6Y3JldA=="  # base64("al@ice:s:cret")
    assert proxy.url == "http://proxy.corp:3128"
    assert "cret" not in Egress(https_proxy=proxy).describe()


@pytest.mark.parametrize("value", ["https://proxy.corp:3128", "socks5://proxy.corp:1080"])
def test_unsupported_proxy_schemes_are_refused_at_startup(value: str) -> None:
    with pytest.raises(ValueError, match="only http:// forward proxies"):
        Egress.from_env({"HTTPS_PROXY": value})


def test_ca_file_adds_to_the_system_trust(tmp_path: Path) -> None:
    ca = PrivateCA("egress-test-ca", timedelta(hours=1))
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(ca.cert_pem)
    plain = Egress().ssl_context.cert_store_stats()["x509_ca"]

    context = Egress.from_env({"COSTWARDEN_UPSTREAM_CA_FILE": str(bundle)}).ssl_context

    assert context.cert_store_stats()["x509_ca"] == plain + 1
    assert context.check_hostname


def test_missing_ca_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        Egress(ca_file=tmp_path / "nope.pem")
