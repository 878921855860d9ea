"""Egress as an enterprise cluster has it: the gateway (a real ``costwarden gateway``
process with its default upstream client) reaches a TLS upstream signed by a private CA
through a real forward proxy (``proxy.py``, with proxy authentication), honours
``NO_PROXY``, refuses a certificate for another host, and keeps working after the upstream
restarts under its pooled keep-alive connections. The caller is the official openai SDK.

No control plane is needed: these are processes and sockets on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from costwarden.children import exit_with_parent, terminate
from costwarden.pki import PrivateCA
from costwarden.ports import free_port
from costwarden.testing.gateway import PROVIDER_KEY, TEAM_ID, sample_config, write_credentials
from costwarden.testing.upstream import FakeUpstream, ServerThread
from tests.support.polling import wait_for

PROXY_USER, PROXY_PASSWORD = "egress", "p@ss:word"  # needs percent-encoding in a URL
PROXY_USERINFO = "egress:p%40ss%3Aword"
TEAM_KEY = "cw-egress-team-key"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}]}


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path
    wrong_cert: Path
    wrong_key: Path

    def server_context(self, *, wrong_host: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if wrong_host:
            context.load_cert_chain(self.wrong_cert, self.wrong_key)
        else:
            context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = PrivateCA("costwarden-egress-test-ca", timedelta(hours=2))
    paths = {"ca": directory / "ca.pem"}
    paths["ca"].write_bytes(ca.cert_pem)
    for name, hosts in (("", ["localhost", "127.0.0.1"]), ("wrong_", ["wrong.example"])):
        issued = ca.issue_server(hosts)
        paths[f"{name}cert"] = directory / f"{name}server.pem"
        paths[f"{name}key"] = directory / f"{name}server-key.pem"
        paths[f"{name}cert"].write_bytes(issued.cert_pem)
        paths[f"{name}key"].write_bytes(issued.key_pem)
    return Pki(**paths)


@dataclass
class ForwardProxy:
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{PROXY_USERINFO}@127.0.0.1:{self.port}"

    def seen(self, what: str) -> int:
        """Access-log lines naming ``what`` (e.g. ``CONNECT localhost:8443``); proxy.py
        writes one when a connection closes."""
        return sum(
            1 for line in self.log.read_text().splitlines() if "access_log" in line and what in line
        )


@pytest.fixture(scope="module")
def forward_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForwardProxy]:
    """proxy.py, the PyPI forward proxy, requiring Basic proxy authentication."""
    directory = tmp_path_factory.mktemp("proxy")
    port_file, log = directory / "port", directory / "proxy.log"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", "0",
            "--port-file", str(port_file), "--num-workers", "1", "--num-acceptors", "1",
            "--basic-auth", f"{PROXY_USER}:{PROXY_PASSWORD}", "--log-level", "INFO",
            "--log-file", str(log),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=exit_with_parent(),
    )  # fmt: skip
    try:
        port = wait_for(
            lambda: port_file.exists() and port_file.read_text().strip(),
            timeout=30,
            what="proxy.py's port file",
        )
        yield ForwardProxy(int(port), log)
    finally:
        terminate(process, 10)


@dataclass
class GatewayProcess:
    port: int
    ledger: Path
    log: Path
    process: subprocess.Popen[bytes]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key=TEAM_KEY, max_retries=0,
            timeout=20, http_client=httpx.Client(trust_env=False),  # the SDK goes direct
        )  # fmt: skip

    def stop(self) -> None:
        """Stop it: its connections close, so proxy.py writes their access-log lines."""
        terminate(self.process, 10)

    def records(self) -> list[dict[str, object]]:
        if not self.ledger.exists():
            return []
        return [json.loads(line) for line in self.ledger.read_text().splitlines() if line]


class Gateways:
    """Starts ``costwarden gateway`` processes with a given environment and flags."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[GatewayProcess] = []

    def start(self, upstream_url: str, env: dict[str, str], *flags: str) -> GatewayProcess:
        index = len(self.started)
        config = self.workdir / f"config-{index}.json"
        config.write_text(sample_config(upstream_url).model_dump_json(by_alias=True))
        keys = self.workdir / "keys.yaml"
        keys.write_text(f"{hashlib.sha256(TEAM_KEY.encode()).hexdigest()}: {TEAM_ID}\n")
        credentials = write_credentials(self.workdir / "credentials")
        port = free_port()
        ledger, log = self.workdir / f"ledger-{index}.jsonl", self.workdir / f"gw-{index}.log"
        base = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        base.pop("SSL_CERT_FILE", None)
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    sys.executable, "-m", "costwarden", "gateway", "--config", str(config),
                    "--host", "127.0.0.1", "--port", str(port), "--mode", "shared",
                    "--api-keys-file", str(keys), "--credentials-dir", str(credentials),
                    "--ledger", str(ledger), "--ledger-fsync", "none", *flags,
                ],
                stdout=out, stderr=subprocess.STDOUT, env={**base, **env},
                preexec_fn=exit_with_parent(),
            )  # fmt: skip
        gateway = GatewayProcess(port, ledger, log, process)
        self.started.append(gateway)
        wait_for(lambda: self._ready(gateway), timeout=30, what="gateway ready")
        return gateway

    @staticmethod
    def _ready(gateway: GatewayProcess) -> bool:
        if gateway.process.poll() is not None:
            raise AssertionError(f"gateway exited: {gateway.log.read_text()}")
        try:
            answer = httpx.get(
                f"http://127.0.0.1:{gateway.port}/readyz", timeout=1, trust_env=False
            )
        except httpx.HTTPError:
            return False
        return answer.status_code == 200


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Gateways]:
    started = Gateways(tmp_path)
    yield started
    for gateway in started.started:
        terminate(gateway.process, 10)


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def tls_upstream(fake: FakeUpstream, pki: Pki) -> Iterator[ServerThread]:
    """The fake provider on https://localhost:PORT with a certificate from the private CA."""
    with ServerThread(fake.app, ssl_context=pki.server_context(), url_host="localhost") as server:
        yield server


def _ask(gateway: GatewayProcess) -> str:
    answer = gateway.client().chat.completions.create(**CHAT)  # type: ignore[call-overload]
    return str(answer.choices[0].message.content)


# The default client first; the others share its egress settings (gateway/egress.py).
@pytest.mark.parametrize(
    "client",
    [[], ["--upstream-client", "aiohttp"], ["--upstream-client", "httpx"]],
    ids=["default", "aiohttp", "httpx"],
)
def test_https_upstream_through_an_authenticating_proxy_with_a_private_ca(
    gateways: Gateways, tls_upstream: ServerThread, fake: FakeUpstream, forward_proxy: ForwardProxy,
    pki: Pki, client: list[str],
) -> None:  # fmt: skip
    gateway = gateways.start(
        tls_upstream.url, {"HTTPS_PROXY": forward_proxy.url}, "--upstream-ca-file", str(pki.ca),
        *client,
    )  # fmt: skip

    assert _ask(gateway)
    assert _ask(gateway)

    assert [call.authorization for call in fake.calls] == [f"Bearer {PROVIDER_KEY}"] * 2
    records = wait_for(lambda: len(gateway.records()) == 2 and gateway.records(), what="ledger")
    assert all(r["outcome"] == "OK" and Decimal(str(r["costUSD"])) > 0 for r in records)
    # Both calls went through one CONNECT tunnel, which the gateway kept alive.
    gateway.stop()
    connect = f"CONNECT localhost:{tls_upstream.port}"
    wait_for(lambda: forward_proxy.seen(connect), what=f"{connect} in the proxy's log")
    assert forward_proxy.seen(connect) == 1


def test_plain_http_upstream_through_the_proxy_in_absolute_form(
    gateways: Gateways, fake: FakeUpstream, forward_proxy: ForwardProxy
) -> None:
    with ServerThread(fake.app, url_host="localhost") as upstream:
        gateway = gateways.start(upstream.url, {"http_proxy": forward_proxy.url})

        assert _ask(gateway)
        gateway.stop()

    line = f"POST localhost:{upstream.port}/v1/chat/completions"
    assert wait_for(lambda: forward_proxy.seen(line), what=f"{line} in the proxy's log") == 1
    assert fake.calls[0].authorization == f"Bearer {PROVIDER_KEY}"


def test_a_wrong_proxy_password_is_refused_and_not_billed(
    gateways: Gateways, tls_upstream: ServerThread, fake: FakeUpstream, forward_proxy: ForwardProxy,
    pki: Pki,
) -> None:  # fmt: skip
    wrong = forward_proxy.url.replace(PROXY_USERINFO, "egress:guess")
    gateway = gateways.start(
        tls_upstream.url, {"HTTPS_PROXY": wrong}, "--upstream-ca-file", str(pki.ca)
    )

    with pytest.raises(openai.APIStatusError) as refused:
        _ask(gateway)

    assert refused.value.status_code == 502
    assert "refused CONNECT" in refused.value.message
    assert "407" in refused.value.message
    assert "guess" not in refused.value.message
    assert fake.calls == []


@pytest.mark.parametrize(
    ("host", "no_proxy"),
    [("localhost", "example.com, localhost"), ("127.0.0.1", "10.0.0.0/8,127.0.0.0/8")],
)
def test_no_proxy_goes_direct(
    gateways: Gateways, fake: FakeUpstream, forward_proxy: ForwardProxy, pki: Pki, host: str,
    no_proxy: str,
) -> None:  # fmt: skip
    with ServerThread(fake.app, ssl_context=pki.server_context(), url_host=host) as upstream:
        env = {"HTTPS_PROXY": forward_proxy.url, "NO_PROXY": no_proxy}
        gateway = gateways.start(upstream.url, env, "--upstream-ca-file", str(pki.ca))

        assert _ask(gateway)
        gateway.stop()

    assert len(fake.calls) == 1
    assert forward_proxy.seen(f"CONNECT {host}:{upstream.port}") == 0


def test_a_certificate_for_another_host_is_refused_and_not_billed(
    gateways: Gateways, fake: FakeUpstream, pki: Pki
) -> None:
    context = pki.server_context(wrong_host=True)
    with ServerThread(fake.app, ssl_context=context, url_host="localhost") as upstream:
        gateway = gateways.start(upstream.url, {}, "--upstream-ca-file", str(pki.ca))

        with pytest.raises(openai.APIStatusError) as refused:
            _ask(gateway)

    assert refused.value.status_code == 502
    assert "TLS certificate of localhost" in refused.value.message
    assert "Hostname mismatch" in refused.value.message
    assert fake.calls == [], "no request was sent over the unverified connection"
    records = wait_for(gateway.records, what="the refused call in the ledger")
    assert [r["outcome"] for r in records] == ["UpstreamError"]
    assert Decimal(str(records[0]["costUSD"])) == 0


def test_the_private_ca_is_required_and_ssl_cert_file_is_honoured(
    gateways: Gateways, tls_upstream: ServerThread, fake: FakeUpstream, pki: Pki
) -> None:
    without_ca = gateways.start(tls_upstream.url, {})
    with pytest.raises(openai.APIStatusError) as refused:
        _ask(without_ca)
    assert "TLS certificate of localhost" in refused.value.message
    assert fake.calls == []

    with_env = gateways.start(tls_upstream.url, {"SSL_CERT_FILE": str(pki.ca)})
    assert _ask(with_env)
    assert len(fake.calls) == 1


@pytest.mark.parametrize("via_proxy", [False, True], ids=["direct", "proxy"])
def test_keep_alive_survives_an_upstream_restart(
    gateways: Gateways, fake: FakeUpstream, forward_proxy: ForwardProxy, pki: Pki, via_proxy: bool
) -> None:
    port = free_port()
    env = {"HTTPS_PROXY": forward_proxy.url} if via_proxy else {}
    url = f"https://localhost:{port}"
    with ServerThread(fake.app, ssl_context=pki.server_context(), port=port, url_host="localhost"):
        gateway = gateways.start(url, env, "--upstream-ca-file", str(pki.ca))
        assert _ask(gateway)
        assert _ask(gateway)  # on the pooled connection
    # The upstream is gone (its connections closed) and comes back on the same port.
    with ServerThread(fake.app, ssl_context=pki.server_context(), port=port, url_host="localhost"):
        assert _ask(gateway)

    assert len(fake.calls) == 3
    records = wait_for(lambda: len(gateway.records()) == 3 and gateway.records(), what="ledger")
    assert [r["outcome"] for r in records] == ["OK"] * 3
