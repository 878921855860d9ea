"""Provider keys on the real control plane, with the chart's own RBAC.

The chart is `helm install`ed with ``providerKeys.namespaces={<allowed>}``; the operator then
runs as a real process **as the chart's operator ServiceAccount** (a token from the
TokenRequest API), so every read and write it does is authorised exactly as in a cluster:
it mirrors the keys RoutingPolicies reference into ``<fullname>-provider-keys``, follows a
rotation, drops keys no longer referenced, and reports a missing Secret, a missing key and a
namespace it may not read as Ready=False naming the model. A gateway process reads the
mirrored Secret materialised as the kubelet would (one file per data key) and the official
openai SDK's call reaches the fake upstream with the key; without the key it is refused.
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from costwarden.api.gatewayconfig import CredentialRef
from costwarden.cluster import LocalControlPlane
from costwarden.policy.provider_keys import mirrored_key
from costwarden.ports import free_port
from costwarden.testing.upstream import FakeUpstream, ServerThread
from tests.support.operator_process import OperatorProcess
from tests.support.polling import wait_for
from tests.support.stack import ConfigMirror, Gateway

CHART = Path(__file__).resolve().parents[2] / "charts" / "costwarden"
GROUP, VERSION = "costwarden.io", "v1alpha1"
# The operator re-reads referenced Secrets at least every resync (30 s) plus a debounce.
ROTATION_DEADLINE = 90.0


@dataclass
class Installed:
    plane: LocalControlPlane
    api_client: client.ApiClient
    core: client.CoreV1Api
    custom: client.CustomObjectsApi
    release: str
    namespace: str
    """The release namespace (where the operator's mirror lives)."""
    allowed: str
    """Listed in providerKeys.namespaces."""
    forbidden: str
    """Not listed: the operator may not read its Secrets."""
    operator: OperatorProcess
    workdir: Path
    ingest_url: str
    ingest_token: Path
    ingest_ca: Path
    """The CA bundle the operator's ingestion certificate is signed by (HTTPS only)."""

    @property
    def fullname(self) -> str:
        return f"{self.release}-costwarden"

    @property
    def mirror_name(self) -> str:
        return f"{self.fullname}-provider-keys"

    def mirror(self) -> dict[str, str]:
        try:
            secret = self.core.read_namespaced_secret(self.mirror_name, self.namespace)
        except ApiException as error:
            if error.status == 404:
                return {}
            raise
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def put_secret(self, namespace: str, name: str, **data: str) -> None:
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(name=name, namespace=namespace), string_data=data
        )
        try:
            self.core.create_namespaced_secret(namespace, body)
        except ApiException as error:
            if error.status != 409:
                raise
            # Replace, so keys absent from ``data`` are gone (stringData merges into data).
            body.data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
            body.string_data = None
            self.core.replace_namespaced_secret(name, namespace, body)

    def apply(self, namespace: str, body: dict[str, Any]) -> None:
        plural = "teambudgets" if body["kind"] == "TeamBudget" else "routingpolicies"
        self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)

    def ready(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The policy's Ready condition once it is written for its current generation."""
        obj = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, "routingpolicies", name
        )
        for condition in (obj.get("status") or {}).get("conditions") or []:
            generation = obj["metadata"]["generation"]
            if condition["type"] == "Ready" and condition.get("observedGeneration") == generation:
                return dict(condition)
        return None

    def can(self, account: str, verb: str, resource: str, namespace: str) -> bool:
        user = f"system:serviceaccount:{self.namespace}:{self.fullname}-{account}"
        result = self.plane.kubectl(
            "auth", "can-i", verb, resource, "--as", user, "--namespace", namespace, check=False
        )
        answer = result.stdout.strip()
        assert answer in ("yes", "no"), result.stderr
        return answer == "yes"


def service_account_kubeconfig(plane: LocalControlPlane, token: str, path: Path) -> Path:
    """The admin kubeconfig's cluster, with the ServiceAccount's token as the user."""
    config = yaml.safe_load(plane.kubeconfig_path.read_text())
    config["users"] = [{"name": "operator", "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = "operator"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def installed(
    control_plane: LocalControlPlane,
    crds: list[str],
    api_client: client.ApiClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Installed]:
    suffix = secrets.token_hex(3)
    core = client.CoreV1Api(api_client)
    names = [f"pk-release-{suffix}", f"pk-allowed-{suffix}", f"pk-forbidden-{suffix}"]
    for name in names:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    release_ns, allowed, forbidden = names
    release = f"pk-{suffix}"
    control_plane.helm(
        "install", release, str(CHART), "--namespace", release_ns,
        "--set", f"providerKeys.namespaces={{{allowed}}}",
    )  # fmt: skip
    workdir = tmp_path_factory.mktemp("provider-keys")
    fullname = f"{release}-costwarden"
    token = control_plane.kubectl(
        "create", "token", f"{fullname}-operator", "-n", release_ns, "--duration", "2h"
    ).stdout.strip()
    kubeconfig = service_account_kubeconfig(control_plane, token, workdir / "operator.kubeconfig")
    ingest_token = workdir / "ingest-token"
    ingest_token.write_text(secrets.token_hex(16) + "\n")
    # The chart's operator arguments that matter here; --standalone because the test runs one
    # process (the chart's ClusterKopfPeering is also allowed, but not needed).
    ingest_port = free_port()
    operator = OperatorProcess(
        str(kubeconfig), release_ns, workdir / "operator.log", "--standalone",
        "--provider-keys-secret", f"{fullname}-provider-keys",
        "--ingest-port", str(ingest_port), "--ingest-listen-address", "127.0.0.1",
        "--ingest-token-file", str(ingest_token),
        "--ingest-cert-dir", str(workdir / "ingest-tls"),
    ).start()  # fmt: skip
    try:
        yield Installed(
            control_plane, api_client, core, client.CustomObjectsApi(api_client), release,
            release_ns, allowed, forbidden, operator, workdir,
            f"https://127.0.0.1:{ingest_port}", ingest_token, workdir / "ingest-tls" / "ca.crt",
        )  # fmt: skip
    finally:
        operator.stop()
        if operator.process and operator.process.returncode not in (0, -15):
            print(operator.logs(), file=sys.stderr)
        control_plane.helm("uninstall", release, "--namespace", release_ns, check=False)
        for name in names:
            core.delete_namespace(name)


def policy(name: str, *credentials: dict[str, str] | None, endpoint: str = "") -> dict[str, Any]:
    """A RoutingPolicy with one in-cluster model per ``credentials`` entry (m0, m1, ...)."""
    models = []
    for index, ref in enumerate(credentials):
        model: dict[str, Any] = {
            "name": f"m{index}",
            "provider": "OpenAI",
            "endpoint": endpoint or "http://llm.models.svc:8000/v1",
            "upstreamModel": "gpt-4o-mini",
            "locality": "InCluster",
        }
        if ref is not None:
            model["credentials"] = ref
        models.append(model)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RoutingPolicy",
        "metadata": {"name": name},
        "spec": {"models": models, "defaultModel": "m0"},
    }


def test_chart_rbac_lets_the_operator_read_secrets_only_where_listed(
    installed: Installed,
) -> None:
    i = installed
    assert i.can("operator", "get", "secrets", i.allowed)
    assert not i.can("operator", "list", "secrets", i.allowed), "get by name only"
    assert not i.can("operator", "watch", "secrets", i.allowed)
    assert not i.can("operator", "get", "secrets", i.forbidden)
    assert not i.can("operator", "get", "secrets", "kube-system")
    # In its own namespace: only the mirror (create cannot be limited by name).
    assert i.can("operator", "get", f"secrets/{i.mirror_name}", i.namespace)
    assert i.can("operator", "update", f"secrets/{i.mirror_name}", i.namespace)
    assert i.can("operator", "create", "secrets", i.namespace)
    assert not i.can("operator", "get", "secrets/some-other-secret", i.namespace)
    assert not i.can("operator", "update", "secrets/some-other-secret", i.namespace)
    assert not i.can("operator", "delete", f"secrets/{i.mirror_name}", i.namespace)
    # The gateway reads its keys from the mounted volume, never through the API.
    for namespace in (i.namespace, i.allowed, i.forbidden):
        assert not i.can("gateway", "get", "secrets", namespace)
    assert not i.can("gateway", "get", f"secrets/{i.mirror_name}", i.namespace)


def test_the_operator_mirrors_a_key_follows_rotation_and_drops_unreferenced_keys(
    installed: Installed,
) -> None:
    i = installed
    i.put_secret(i.allowed, "openai-credentials", **{"api-key": "sk-first", "unused": "x"})
    i.apply(i.allowed, policy("mirrored", {"name": "openai-credentials", "key": "api-key"}))
    key = mirrored_key(CredentialRef(namespace=i.allowed, name="openai-credentials", key="api-key"))

    wait_for(lambda: i.mirror().get(key) == "sk-first", timeout=60, what="the key mirrored")
    assert i.mirror() == {key: "sk-first"}, "only the referenced key of the Secret"
    ready = wait_for(lambda: i.ready(i.allowed, "mirrored"), timeout=60, what="Ready")
    assert ready["status"] == "True", ready
    secret = i.core.read_namespaced_secret(i.mirror_name, i.namespace)
    assert secret.metadata.labels["costwarden.io/provider-keys"] == "true"
    assert secret.metadata.labels["app.kubernetes.io/managed-by"] == "costwarden-operator"
    # Another pass (a new policy) with nothing changed for the mirror writes nothing.
    i.apply(i.allowed, policy("unrelated", None))
    wait_for(lambda: i.ready(i.allowed, "unrelated"), timeout=60, what="another pass")
    again = i.core.read_namespaced_secret(i.mirror_name, i.namespace)
    assert again.metadata.resource_version == secret.metadata.resource_version

    i.put_secret(i.allowed, "openai-credentials", **{"api-key": "sk-rotated"})
    wait_for(
        lambda: i.mirror().get(key) == "sk-rotated", timeout=ROTATION_DEADLINE,
        what="the rotated key in the mirror",
    )  # fmt: skip

    i.custom.delete_namespaced_custom_object(GROUP, VERSION, i.allowed, "routingpolicies",
                                             "mirrored")  # fmt: skip
    wait_for(lambda: key not in i.mirror(), timeout=60, what="the unreferenced key removed")
    assert "sk-" not in i.operator.logs(), "a key value reached the operator's log"


def test_missing_secret_missing_key_and_forbidden_namespace_are_ready_false(
    installed: Installed,
) -> None:
    i = installed
    i.put_secret(i.allowed, "half-credentials", other="sk-not-this-one")
    i.apply(
        i.allowed,
        policy(
            "broken",
            None,
            {"name": "no-such-secret", "key": "api-key"},
            {"name": "half-credentials", "key": "api-key"},
        ),
    )
    i.put_secret(i.forbidden, "openai-credentials", **{"api-key": "sk-forbidden-value"})
    i.apply(i.forbidden, policy("elsewhere", {"name": "openai-credentials", "key": "api-key"}))

    broken = wait_for(
        lambda: (c := i.ready(i.allowed, "broken")) and c["status"] == "False" and c,
        timeout=60, what="Ready=False on the policy with missing credentials",
    )  # fmt: skip
    assert broken["reason"] == "CredentialsNotFound"
    message = broken["message"]
    assert "spec.models[1].credentials: model 'm1'" in message
    assert f"Secret {i.allowed}/no-such-secret does not exist" in message
    assert "spec.models[2].credentials: model 'm2'" in message
    assert f"Secret {i.allowed}/half-credentials has no key 'api-key'" in message
    assert "spec.models[0]" not in message, "the model without credentials is fine"

    forbidden = wait_for(
        lambda: (c := i.ready(i.forbidden, "elsewhere")) and c["status"] == "False" and c,
        timeout=60, what="Ready=False on the policy the operator may not read",
    )  # fmt: skip
    assert forbidden["reason"] == "CredentialsNotReadable"
    assert "spec.models[0].credentials: model 'm0'" in forbidden["message"]
    assert f"not allowed to read Secrets in namespace {i.forbidden}" in forbidden["message"]
    assert "providerKeys.namespaces" in forbidden["message"]

    mirrored = i.mirror()
    assert not [k for k in mirrored if k.startswith(f"{i.forbidden}_")]
    everything = json.dumps(
        [
            i.custom.list_cluster_custom_object(GROUP, VERSION, "routingpolicies"),
            i.plane.kubectl("get", "events", "-A", "-o", "json").stdout,
        ]
    )
    for value in ("sk-not-this-one", "sk-forbidden-value"):
        assert value not in everything, "a key value reached a status or an Event"
        assert value not in i.operator.logs()


class MountedSecret:
    """The mirror as the kubelet materialises a Secret volume: one file per data key."""

    def __init__(self, installed: Installed, directory: Path) -> None:
        self.installed = installed
        self.directory = directory
        directory.mkdir(exist_ok=True)

    def sync(self) -> dict[str, str]:
        data = self.installed.mirror()
        for stale in self.directory.iterdir():
            if stale.name not in data:
                stale.unlink()
        for key, value in data.items():
            (self.directory / key).write_text(value)
        return data


def test_the_sdk_gets_the_mirrored_key_to_the_upstream_and_is_refused_without_it(
    installed: Installed, tmp_path: Path
) -> None:
    i = installed
    fake = FakeUpstream()
    with ServerThread(fake.app) as upstream:
        secret_name = "sdk-credentials"
        i.apply(
            i.allowed,
            policy("sdk", {"name": secret_name, "key": "api-key"}, endpoint=f"{upstream.url}/v1"),
        )
        i.apply(
            i.allowed,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "TeamBudget",
                "metadata": {"name": "sdk-team"},
                "spec": {"hardCapUSD": "10", "routingPolicyRef": {"name": "sdk"}},
            },
        )
        team = f"{i.allowed}/sdk-team"
        config = tmp_path / "gateway-config.json"
        mirror = ConfigMirror(i.api_client, i.namespace, config).start()
        mounted = MountedSecret(i, tmp_path / "credentials")
        (tmp_path / "keys.yaml").write_text("{}\n")
        gateway = Gateway(
            tmp_path, config, i.ingest_url, i.ingest_token, i.ingest_ca,
            extra_args=("--credentials-dir", str(mounted.directory)),
        ).start()  # fmt: skip
        try:
            wait_for(lambda: mirror.has_team(team), timeout=60, what="the team in the config")
            agent = gateway.agent(team, i.allowed, "agent-job")

            # No Secret yet: refused, named, never sent.
            with pytest.raises(openai.APIStatusError) as refused:
                agent.chat.completions.create(
                    model="m0", messages=[{"role": "user", "content": "hi"}]
                )
            assert refused.value.status_code == 503
            assert refused.value.code == "missing_credentials"
            assert f"Secret {i.allowed}/{secret_name} key 'api-key'" in refused.value.message
            assert fake.calls == []

            i.put_secret(i.allowed, secret_name, **{"api-key": "sk-the-provider-key"})
            ref = CredentialRef(namespace=i.allowed, name=secret_name, key="api-key")
            wait_for(
                lambda: mounted.sync().get(mirrored_key(ref)),
                timeout=ROTATION_DEADLINE,
                what="the key in the mounted mirror",
            )
            # The gateway re-reads a key it found missing at most every 30 s.
            answer = wait_for(
                lambda: _call_or_none(agent), timeout=60, what="the call served with the key"
            )
            assert answer.usage is not None
            assert fake.calls[-1].authorization == "Bearer sk-the-provider-key"
            assert "sk-the-provider-key" not in gateway.logs()
        finally:
            gateway.stop()
            mirror.stop()


_asked = itertools.count()


def _call_or_none(agent: openai.OpenAI) -> Any:
    # Distinct questions: identical ones would (rightly) trip loop detection.
    question = f"hello {next(_asked)}"
    try:
        return agent.chat.completions.create(
            model="m0", messages=[{"role": "user", "content": question}]
        )
    except openai.APIStatusError as error:
        if error.status_code == 503:
            return None
        raise
