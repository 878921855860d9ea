"""Hostile tenants and RoutingPolicy endpoints (issue #10, item 5; DESIGN T6).

A namespace admin writes RoutingPolicies, so the endpoint is where a tenant points the
gateway: at the cloud metadata service, at an in-cluster Service, through a query or a
fragment that swallows the API path, in clear text with a provider key, or at a host the
cluster admin never approved. Each attack is tried on the real API server and operator
(one stack for the module, started with an admin allow-list of provider hosts), and each
is refused: an admission denial naming ``spec.models[0].endpoint``, or Ready=False naming
it; the victim's policy, the gateway configuration and the upstream are left untouched.

The last attacks are an upstream that echoes the provider key in its error (in JSON, in
text, as a fragment, in a stream's error event): the caller, through the official SDKs,
never sees a piece of the key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from costwarden.api.routingpolicy import RoutingPolicySpec
from costwarden.policy.validation import parse_routing_policy_spec
from costwarden.testing.gateway import GatewayThread, sample_config, write_credentials
from costwarden.testing.upstream import FakeUpstream, ServerThread
from tests.support.polling import wait_for
from tests.support.stack import GROUP, VERSION, Stack, running_stack

ALLOWED = ("api.openai.com", "*.anthropic.com")
POLICIES = "routingpolicies"


@pytest.fixture(scope="module")
def hosts_stack(control_plane, api_client, crds, tmp_path_factory) -> Iterator[Stack]:
    """The operator and gateway as an admin who set ``providerHosts.allowed`` runs them."""
    flags = [f"--allowed-provider-host={host}" for host in ALLOWED]
    workdir = tmp_path_factory.mktemp("endpoints")
    with running_stack(control_plane, api_client, workdir, *flags) as running:
        yield running


@pytest.fixture(scope="module")
def victim(hosts_stack: Stack, api_client) -> Iterator[str]:
    """A team with a working policy ("routing", InCluster) served by the local upstream."""
    name = "cw-victim-endpoints"
    core = client.CoreV1Api(api_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        hosts_stack.team(name, "victim", "50")
        yield name
    finally:
        core.delete_namespace(name)


def _policy(name: str, model: dict[str, Any]) -> dict[str, Any]:
    model = {"name": "gpt-4o-mini", "provider": "OpenAI", **model}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RoutingPolicy",
        "metadata": {"name": name},
        "spec": {"models": [model], "defaultModel": "gpt-4o-mini"},
    }


def _config(stack: Stack) -> dict[str, Any]:
    stack.mirror.sync()
    return dict(json.loads(stack.mirror.path.read_text()))


# The admission attacks: what the tenant writes as its model, and what the refusal says.
ADMISSION_ATTACKS = {
    "cloud-metadata": (
        {"endpoint": "http://169.254.169.254/latest/meta-data/iam/security-credentials"},
        "must not be a link-local, unspecified or cloud metadata address",
    ),
    "metadata-as-in-cluster": (
        {
            "endpoint": "http://metadata.google.internal/computeMetadata/v1",
            "locality": "InCluster",
            "pricing": {"inputPerMTokUSD": "0.1", "outputPerMTokUSD": "0.1"},
        },
        "must not be a link-local, unspecified or cloud metadata address",
    ),
    "decimal-metadata-ip": (
        {"endpoint": "http://2852039166/latest"},
        "host must be a DNS name or an IP address in standard notation",
    ),
    "userinfo": (
        {"endpoint": "https://user:pass@api.openai.com/v1"},
        "must not contain userinfo",
    ),
    "query-swallows-path": (
        {"endpoint": "https://api.example.com/v1?x="},
        "must not contain a query",
    ),
    "fragment-swallows-path": (
        {"endpoint": "https://api.example.com/v1#frag"},
        "must not contain a fragment",
    ),
    "plain-http-with-key": (
        {"endpoint": "http://api.openai.com/v1", "credentials": {"name": "openai"}},
        "an External model with credentials must use an https endpoint",
    ),
    "in-cluster-service-as-external": (
        {"endpoint": "https://kubernetes.default.svc.cluster.local/api/v1"},
        "must be a public DNS name, not an in-cluster or private one",
    ),
    "short-service-name-as-external": (
        {"endpoint": "https://costwarden-operator-ingest:8443"},
        "must be a public DNS name, not an in-cluster or private one",
    ),
    "private-address-as-external": (
        {"endpoint": "https://10.96.0.1/v1"},
        "must not be a private, shared or non-unicast address",
    ),
    "loopback-as-external": (
        {"endpoint": "https://127.0.0.1:9090/metrics"},
        "must not be a loopback address",
    ),
}


@pytest.mark.parametrize("attack", sorted(ADMISSION_ATTACKS))
def test_the_api_server_refuses_an_endpoint_attack_and_nothing_changes(
    hosts_stack: Stack, victim: str, attack: str
) -> None:
    model, message = ADMISSION_ATTACKS[attack]
    api = hosts_stack.custom
    before = api.get_namespaced_custom_object(GROUP, VERSION, victim, POLICIES, "routing")
    calls = len(hosts_stack.upstream.calls)

    # A new policy with the endpoint, and the victim namespace's own policy rewritten to it.
    with pytest.raises(ApiException) as created:
        api.create_namespaced_custom_object(
            GROUP, VERSION, victim, POLICIES, _policy("evil", model)
        )
    patch = {"spec": _policy("routing", model)["spec"]}
    with pytest.raises(ApiException) as patched:
        api.patch_namespaced_custom_object(GROUP, VERSION, victim, POLICIES, "routing", patch)

    for refusal in (created.value, patched.value):
        assert refusal.status == 422, refusal.body
        assert "spec.models[0].endpoint" in refusal.body
        assert message in refusal.body
    listed = api.list_namespaced_custom_object(GROUP, VERSION, victim, POLICIES)["items"]
    names = [o["metadata"]["name"] for o in listed]
    assert names == ["routing"]
    after = api.get_namespaced_custom_object(GROUP, VERSION, victim, POLICIES, "routing")
    assert after["spec"] == before["spec"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    endpoints = [m["endpoint"] for p in _config(hosts_stack)["policies"] for m in p["models"]]
    assert model["endpoint"] not in endpoints
    assert len(hosts_stack.upstream.calls) == calls


def _ready(stack: Stack, namespace: str, plural: str, name: str) -> dict[str, Any] | None:
    obj = stack.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    if (obj.get("status") or {}).get("observedGeneration") != obj["metadata"]["generation"]:
        return None
    conditions = obj["status"].get("conditions") or []
    return next((c for c in conditions if c["type"] == "Ready"), None)


def test_an_external_host_outside_the_admin_allow_list_is_ready_false_and_never_called(
    hosts_stack: Stack, victim: str
) -> None:
    calls = len(hosts_stack.upstream.calls)
    offlist = _policy("offlist", {"endpoint": "https://api.attacker.example/v1"})
    offlist["spec"]["models"][0]["credentials"] = {"name": "llm-keys"}
    hosts_stack.create(victim, offlist)
    budget = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TeamBudget",
        "metadata": {"name": "exfil"},
        "spec": {
            "hardCapUSD": "10",
            "routingPolicyRef": {"name": "offlist"},
            "workloads": {"selector": {"matchLabels": {"team": "exfil"}}},
        },
    }
    hosts_stack.create(victim, budget)

    ready = wait_for(
        lambda: _ready(hosts_stack, victim, POLICIES, "offlist"), timeout=30, what="verdict"
    )
    assert ready["status"] == "False"
    assert ready["reason"] == "ProviderHostNotAllowed"
    assert ready["message"].startswith("spec.models[0].endpoint: host 'api.attacker.example'")
    assert "api.openai.com" in ready["message"]
    budget_ready = wait_for(
        lambda: _ready(hosts_stack, victim, "teambudgets", "exfil"), timeout=30, what="budget"
    )
    assert (budget_ready["status"], budget_ready["reason"]) == ("False", "RoutingPolicyNotReady")

    config = _config(hosts_stack)
    assert config["allowedProviderHosts"] == sorted(ALLOWED)
    assert f"{victim}/offlist" not in [p["id"] for p in config["policies"]]
    assert "api.attacker.example" not in json.dumps(config)
    assert f"{victim}/exfil" not in [t["id"] for t in config["teams"]]
    assert len(hosts_stack.upstream.calls) == calls


def test_an_allowed_provider_host_is_ready(hosts_stack: Stack, victim: str) -> None:
    """The allow-list admits what the admin listed (exact and *.suffix), so it is no outage."""
    policy = _policy("allowed", {"endpoint": "https://api.openai.com/v1"})
    policy["spec"]["models"].append(
        {
            "name": "claude-sonnet-4-5",
            "provider": "Anthropic",
            "endpoint": "https://eu.api.anthropic.com",
        }
    )
    hosts_stack.create(victim, policy)

    ready = wait_for(
        lambda: _ready(hosts_stack, victim, POLICIES, "allowed"), timeout=30, what="verdict"
    )
    assert (ready["status"], ready["reason"]) == ("True", "Reconciled"), ready


# --- an upstream that echoes the key ------------------------------------------------------

PROVIDER_KEY = "sk-proj-Zq81vXa7Lm3Rt9Pw2Kc5Yb0Hn4Jd6Fg"


@pytest.fixture
def keyed_gateway(tmp_path: Path) -> Iterator[tuple[GatewayThread, FakeUpstream]]:
    fake = FakeUpstream()
    with ServerThread(fake.app) as upstream:
        credentials = write_credentials(tmp_path / "credentials", key=PROVIDER_KEY)
        gateway = GatewayThread(sample_config(upstream.url), credentials_dir=credentials)
        with gateway:
            yield gateway, fake


def _pieces() -> set[str]:
    return {PROVIDER_KEY[i : i + 8] for i in range(len(PROVIDER_KEY) - 7)}


def _leaks(text: str) -> list[str]:
    return sorted(piece for piece in _pieces() if piece in text)


@pytest.mark.parametrize("fault", ["echo-key", "echo-key-fragment", "echo-key-text"])
def test_an_upstream_echoing_the_key_never_hands_it_to_the_openai_sdk(
    keyed_gateway: tuple[GatewayThread, FakeUpstream], fault: str
) -> None:
    gateway, fake = keyed_gateway
    fake.script("gpt-4o-mini", fault)
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)

    with pytest.raises(openai.APIStatusError) as raised:
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )

    error = raised.value
    assert fake.calls[-1].authorization == f"Bearer {PROVIDER_KEY}"  # the key did go upstream
    assert error.status_code in (401, 502)
    assert _leaks(error.response.text) == []
    assert _leaks(str(error)) == []


def test_an_upstream_echoing_the_key_in_a_stream_error_never_hands_it_to_the_anthropic_sdk(
    keyed_gateway: tuple[GatewayThread, FakeUpstream],
) -> None:
    gateway, fake = keyed_gateway
    fake.script("claude-fake-sonnet", "stream-echo-key")
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0)

    with (
        pytest.raises(anthropic.APIStatusError) as raised,
        sdk.messages.stream(
            model="claude-fake-sonnet",
            max_tokens=20,
            messages=[{"role": "user", "content": "hi"}],
        ) as stream,
    ):
        for _ in stream:
            pass

    assert fake.calls[-1].api_key == PROVIDER_KEY
    assert _leaks(str(raised.value)) == []
    assert "[redacted]" in str(raised.value)


def test_an_internal_service_error_page_never_reaches_the_caller(
    keyed_gateway: tuple[GatewayThread, FakeUpstream],
) -> None:
    gateway, fake = keyed_gateway
    fake.script("gpt-4o-mini", "html")

    answer = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )

    assert answer.status_code == 502
    assert "<html" not in answer.text
    assert "internal-lb-7" not in answer.text
    assert "withheld" in answer.json()["error"]["message"]


# --- the two verdicts agree ---------------------------------------------------------------

EXT, INC = "External", "InCluster"
KEY = {"name": "llm-keys"}
# (endpoint, locality, credentials, accepted): spellings an attacker would try, and the
# legitimate endpoints the rules must keep accepting.
VERDICTS = [
    ("https://api.openai.com/v1", EXT, KEY, True),
    ("HTTPS://API.OPENAI.COM/v1", EXT, KEY, True),
    ("https://eu.api.anthropic.com:443", EXT, KEY, True),
    ("https://8.8.8.8/v1", EXT, KEY, True),
    ("https://[2606:4700::1111]/v1", EXT, KEY, True),
    ("http://api.example.com/v1", EXT, None, True),
    ("http://vllm.models.svc.cluster.local:8000/v1", INC, KEY, True),
    ("http://127.0.0.1:8000/v1", INC, None, True),
    ("http://10.0.0.5:8000/v1", INC, KEY, True),
    ("http://169.254.169.254/", INC, None, False),
    ("http://169.254.169.254./", INC, None, False),
    ("http://[fe80::1]/", INC, None, False),
    ("http://[::ffff:169.254.169.254]/", EXT, None, False),
    ("http://[::ffff:a9fe:a9fe]/", INC, None, False),
    ("http://0xA9FEA9FE/", INC, None, False),
    ("http://0251.0376.0251.0376/", INC, None, False),
    ("http://169.254.43518/", INC, None, False),
    ("http://0.0.0.0:8080/", INC, None, False),
    ("http://0.1.2.3/", INC, None, False),
    ("http://224.0.0.1/", INC, None, False),
    ("http://metadata/", INC, None, False),
    ("http://METADATA.Google.Internal./computeMetadata/v1", INC, None, False),
    ("http://100.100.100.200/latest", INC, None, False),
    ("http://[fd00:ec2::254]/", INC, None, False),
    ("https://localhost:8443/v1", EXT, None, False),
    ("https://models.localhost/v1", EXT, None, False),
    ("https://[::1]/v1", EXT, None, False),
    ("https://svc-name/v1", EXT, None, False),
    ("https://x.default.svc/v1", EXT, None, False),
    ("https://db.corp.internal/v1", EXT, None, False),
    ("https://printer.local/v1", EXT, None, False),
    ("https://192.168.1.10/v1", EXT, None, False),
    ("https://100.64.0.1/v1", EXT, None, False),
    ("https://[fd12::1]/v1", EXT, None, False),
    ("https://[64:ff9b::a9fe:a9fe]/v1", EXT, None, False),
    ("https://255.255.255.255/v1", EXT, None, False),
    ("https://a@api.openai.com/v1", EXT, None, False),
    ("https://api.openai.com@evil.example/v1", EXT, None, False),
    ("https://api.example.com/v1?", EXT, None, False),
    ("https://api.example.com/v1#", EXT, None, False),
    ("https://api.example.com:99999999/v1", EXT, None, False),
    ("https://api.exa mple.com/v1", EXT, None, False),
    ("https://%31%36%39.254.169.254/", EXT, None, False),
    ("https://api.example.com\\@evil.example/", EXT, None, False),
    ("http://api.openai.com/v1", EXT, KEY, False),
    ("ftp://api.openai.com/v1", EXT, None, False),
]


def _dry_run_refusal(api: client.CustomObjectsApi, namespace: str, body: dict[str, Any]) -> str:
    """The API server's refusal of ``body`` (server-side dry run), or "" if it accepts it."""
    try:
        api.create_namespaced_custom_object(
            GROUP, VERSION, namespace, POLICIES, body, dry_run="All"
        )
    except ApiException as refusal:
        if refusal.status != 422:
            raise
        return str(refusal.body)
    return ""


@pytest.mark.parametrize(
    ("endpoint", "locality", "credentials", "accepted"),
    VERDICTS,
    ids=[f"{v[0]}-{v[1]}{'-key' if v[2] else ''}" for v in VERDICTS],
)
def test_the_api_server_and_the_models_agree_on_each_endpoint(
    api_client,
    crds,
    namespace,
    endpoint: str,
    locality: str,
    credentials,
    accepted: bool,
) -> None:
    model: dict[str, Any] = {"endpoint": endpoint, "locality": locality}
    if credentials:
        model["credentials"] = credentials
    if locality == INC:
        model["pricing"] = {"inputPerMTokUSD": "0.1", "outputPerMTokUSD": "0.1"}
    body = _policy("verdict", model)
    api = client.CustomObjectsApi(api_client)
    server_refusal = _dry_run_refusal(api, namespace, body)
    python = parse_routing_policy_spec(body["spec"])

    assert (server_refusal == "") is accepted, server_refusal
    assert isinstance(python, RoutingPolicySpec) is accepted, python
    if not accepted:
        assert isinstance(python, list)
        [problem] = python
        assert problem.field == "spec.models[0].endpoint"
        assert "spec.models[0].endpoint" in server_refusal
        assert json.dumps(problem.message)[1:-1] in server_refusal
