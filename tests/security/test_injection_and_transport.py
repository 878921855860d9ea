"""Hostile tenants against sidecar injection and the gateway's transport (issue #10, items 3
and 4), on the real API server: the webhook is called by kube-apiserver over TLS, tokens are
minted and reviewed by it, RBAC is evaluated by its authorizer.

A tenant is a namespace's service account that may create pods, Jobs and ConfigMaps in its
namespace (what its developers usually hold), impersonated by the test. Every attack
checks the refusal and that the victim (a team in another namespace, or a Job in the same
namespace) is unchanged.
"""

from __future__ import annotations

import json
import secrets
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from costwarden.api.gatewayconfig import CONFIG_MAP_KEY, CONFIG_MAP_NAME
from costwarden.api.usage import GATEWAY_AUDIENCE, INGEST_AUDIENCE
from costwarden.cluster import LocalControlPlane
from costwarden.controllers.ingest_tls import CA_KEY, DEFAULT_CA_CONFIGMAP
from costwarden.gateway.identity import SharedIdentifier
from costwarden.policy.injection import (
    CONFIG_COPY_NAME,
    INGEST_CA_KEY,
    INJECT_LABEL,
    SIDECAR_NAME,
)
from costwarden.policy.render import serialize
from costwarden.ports import free_port
from costwarden.testing.gateway import GatewayThread, sample_config, write_credentials
from costwarden.testing.upstream import FakeUpstream, ServerThread
from tests.support.operator_process import OperatorProcess
from tests.support.polling import wait_for

IMAGE = "costwarden/costwarden:security"
GROUP, VERSION = "costwarden.io", "v1alpha1"
MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass
class Injector:
    namespace: str
    ingest_port: int
    ca: Path

    @property
    def ingest_url(self) -> str:
        return f"https://127.0.0.1:{self.ingest_port}/v1/usage"

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture(scope="module")
def injector(
    control_plane: LocalControlPlane,
    api_client: client.ApiClient,
    crds: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Injector]:
    """An operator with the webhook, HTTPS ingestion taking sidecar tokens, and the test
    plane's controller-manager user (it runs the Job controller) as the Job controller."""
    core = client.CoreV1Api(api_client)
    admission = client.AdmissionregistrationV1Api(api_client)
    suffix = secrets.token_hex(4)
    home, configuration = f"cw-sec-{suffix}", f"sec-{suffix}.costwarden.io"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=home)))
    work = tmp_path_factory.mktemp("injector")
    port = free_port()
    process = OperatorProcess(
        str(control_plane.kubeconfig_path), home, work / "operator.log",
        "--standalone",
        "--webhook-port", str(free_port()), "--webhook-listen-address", "127.0.0.1",
        "--webhook-configuration", configuration,
        "--webhook-cert-dir", str(work / "webhook-tls"),
        "--sidecar-image", IMAGE,
        "--sidecar-report-to", f"https://127.0.0.1:{port}",
        "--ingest-port", str(port), "--ingest-listen-address", "127.0.0.1",
        "--ingest-cert-dir", str(work / "ingest-tls"), "--ingest-allow-sidecars",
    ).start()  # fmt: skip

    def ready() -> bool:
        assert process.process is not None
        assert process.process.poll() is None, process.logs()
        try:
            webhooks = admission.read_mutating_webhook_configuration(configuration)
            core.read_namespaced_config_map(CONFIG_MAP_NAME, home)
            core.read_namespaced_config_map(DEFAULT_CA_CONFIGMAP, home)
        except ApiException:
            return False
        return all(w.client_config.ca_bundle for w in webhooks.webhooks or [])

    try:
        wait_for(ready, timeout=90, what="webhook configured, config and CA published")
        yield Injector(home, port, work / "ingest-tls" / "ca.crt")
    finally:
        process.stop()
        for delete in (
            lambda: admission.delete_mutating_webhook_configuration(configuration),
            lambda: core.delete_namespace(home),
        ):
            try:
                delete()
            except ApiException as error:
                if error.status != 404:
                    raise


def _tenant(kubeconfig: str, api_client: client.ApiClient, namespace: str) -> client.CoreV1Api:
    """The CoreV1Api of a tenant: service account ``tenant``, a developer of ``namespace``."""
    core = client.CoreV1Api(api_client)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="tenant"))
    )
    rbac = client.RbacAuthorizationV1Api(api_client)
    # What a namespace's developers usually hold (the test plane runs no ClusterRole
    # aggregation, so the built-in "edit" is empty here): pods, ConfigMaps and Jobs.
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "tenant"},
        "rules": [
            {"apiGroups": [""], "resources": ["pods", "configmaps"],
             "verbs": ["get", "list", "create", "update", "delete"]},
            {"apiGroups": ["batch"], "resources": ["jobs"],
             "verbs": ["get", "list", "create", "update", "delete"]},
        ],
    })  # fmt: skip
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "tenant"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
        "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": namespace}],
    })  # fmt: skip
    user = f"system:serviceaccount:{namespace}:tenant"
    authorization = client.AuthorizationV1Api(api_client)

    def allowed() -> bool:
        review = authorization.create_subject_access_review({
            "spec": {"user": user, "resourceAttributes": {
                "namespace": namespace, "verb": "create", "resource": "configmaps"}},
        })  # fmt: skip
        return bool(review.status.allowed)

    wait_for(allowed, timeout=30, what="the tenant's RoleBinding in force")
    api = config.new_client_from_config(config_file=kubeconfig)
    api.set_default_header("Impersonate-User", user)
    tenant = client.CoreV1Api(api)
    # The default ServiceAccount (the controller-manager creates it) must exist for pods.
    wait_for(lambda: core.list_namespaced_service_account(namespace).items, what="default SA")
    return tenant


def _pod(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {INJECT_LABEL: "true"}},
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [{"name": "agent", "image": "agent:1"}],
            **spec,
        },
    }


def _denied(tenant: client.CoreV1Api, namespace: str, pod: dict[str, Any]) -> str:
    """Create ``pod`` as the tenant; it must be refused by the webhook. Returns the message."""
    with pytest.raises(ApiException) as refused:
        tenant.create_namespaced_pod(namespace, pod)
    assert refused.value.status == 403, refused.value.body
    message = str(json.loads(refused.value.body)["message"])
    assert "denied the request" in message
    assert "names the injector owns" in message
    # Nothing was stored.
    with pytest.raises(ApiException) as missing:
        tenant.read_namespaced_pod(pod["metadata"]["name"], namespace)
    assert missing.value.status == 404
    return message


def _budget(name: str, namespace: str, endpoint: str) -> tuple[dict[str, Any], dict[str, Any]]:
    policy = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "RoutingPolicy",
        "metadata": {"name": "routing", "namespace": namespace},
        "spec": {"models": [{"name": "gpt-4o-mini", "provider": "OpenAI", "endpoint": endpoint}],
                 "defaultModel": "gpt-4o-mini"},
    }  # fmt: skip
    budget = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "TeamBudget",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"hardCapUSD": "10", "routingPolicyRef": {"name": "routing"}},
    }  # fmt: skip
    return policy, budget


@dataclass
class Victim:
    """Another team, with an injected namespace: its budget and its config copy."""

    namespace: str
    api_client: client.ApiClient

    def snapshot(self) -> tuple[Any, ...]:
        custom = client.CustomObjectsApi(self.api_client)
        budget = custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "teambudgets", "victim"
        )
        status = budget.get("status") or {}
        copy = client.CoreV1Api(self.api_client).read_namespaced_config_map(
            CONFIG_COPY_NAME, self.namespace
        )
        team = json.loads(copy.data[CONFIG_MAP_KEY])["teams"]
        return status.get("spentUSD"), status.get("phase"), [t["id"] for t in team]


@pytest.fixture(scope="module")
def victim(injector: Injector, api_client: client.ApiClient) -> Iterator[Victim]:
    core = client.CoreV1Api(api_client)
    name = f"cw-victim-{secrets.token_hex(3)}"
    core.create_namespace(
        client.V1Namespace(
            metadata=client.V1ObjectMeta(name=name, labels={INJECT_LABEL: "enabled"})
        )
    )
    custom = client.CustomObjectsApi(api_client)
    policy, budget = _budget("victim", name, "https://victim-models.example/v1")
    custom.create_namespaced_custom_object(GROUP, VERSION, name, "routingpolicies", policy)
    custom.create_namespaced_custom_object(GROUP, VERSION, name, "teambudgets", budget)
    result = Victim(name, api_client)

    def copied() -> bool:
        try:
            return result.snapshot()[2] == [f"{name}/victim"]
        except (ApiException, KeyError):
            return False

    wait_for(copied, timeout=60, what="the victim's config copy")
    yield result
    core.delete_namespace(name)


# --- the pod configures its own meter (item 3) ----------------------------------------------


def test_a_pod_bringing_a_zero_price_gateway_config_volume_is_denied(
    injector: Injector, victim: Victim, api_client: client.ApiClient, kubeconfig: str,
    namespace: str,
) -> None:  # fmt: skip
    before = victim.snapshot()
    tenant = _tenant(kubeconfig, api_client, namespace)
    free = sample_config("http://127.0.0.1:1")  # any config: the point is it is the tenant's
    tenant.create_namespaced_config_map(
        namespace, {"metadata": {"name": "free"}, "data": {CONFIG_MAP_KEY: serialize(free)}}
    )
    volume = {"name": "costwarden-gateway-config", "configMap": {"name": "free"}}
    message = _denied(tenant, namespace, _pod("cheap", volumes=[volume]))
    assert "spec.volumes[0] (costwarden-gateway-config)" in message
    assert victim.snapshot() == before


def test_a_pod_bringing_its_own_costwarden_gateway_container_is_denied(
    injector: Injector, victim: Victim, api_client: client.ApiClient, kubeconfig: str,
    namespace: str,
) -> None:  # fmt: skip
    before = victim.snapshot()
    tenant = _tenant(kubeconfig, api_client, namespace)
    # As a regular container (the old webhook then skipped injection altogether) ...
    own = _pod("own-sidecar")
    own["spec"]["containers"].append({"name": SIDECAR_NAME, "image": "busybox"})
    assert "spec.containers[1].name" in _denied(tenant, namespace, own)
    # ... and as a look-alike native sidecar whose gateway reads the tenant's config.
    lookalike = _pod("lookalike", initContainers=[{
        "name": SIDECAR_NAME, "image": IMAGE, "restartPolicy": "Always",
        "args": ["gateway", "--mode", "sidecar", "--config", "/tmp/free.json"],
    }])  # fmt: skip
    assert "spec.initContainers[0].name" in _denied(tenant, namespace, lookalike)
    assert victim.snapshot() == before


def test_a_pod_setting_injector_env_or_mounting_the_sidecar_s_volumes_is_denied(
    injector: Injector, victim: Victim, api_client: client.ApiClient, kubeconfig: str,
    namespace: str,
) -> None:  # fmt: skip
    before = victim.snapshot()
    tenant = _tenant(kubeconfig, api_client, namespace)
    base_url = _pod("own-base-url")
    base_url["spec"]["containers"][0]["env"] = [
        {"name": "OPENAI_BASE_URL", "value": "https://api.openai.com/v1"}
    ]
    assert "spec.containers[0].env[0] (OPENAI_BASE_URL)" in _denied(tenant, namespace, base_url)
    ledger = _pod("ledger-reader")
    ledger["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "costwarden-state", "mountPath": "/ledger"}
    ]
    message = _denied(tenant, namespace, ledger)
    assert "spec.containers[0].volumeMounts[0] (costwarden-state)" in message
    assert victim.snapshot() == before


def _job_arg(pod: Any) -> str:
    sidecar = next(c for c in pod.spec.init_containers if c.name == SIDECAR_NAME)
    return next(a for a in sidecar.args if a.startswith("--job-name="))


def test_forged_job_labels_and_owner_do_not_change_the_job_the_sidecar_counts(
    injector: Injector, api_client: client.ApiClient, kubeconfig: str, namespace: str
) -> None:
    tenant = _tenant(kubeconfig, api_client, namespace)
    batch = client.BatchV1Api(api_client)
    job = batch.create_namespaced_job(namespace, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "victim-job"},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"labels": {INJECT_LABEL: "true"}},
            "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                     "containers": [{"name": "agent", "image": "agent:1"}]}}},
    })  # fmt: skip
    core = client.CoreV1Api(api_client)
    real = wait_for(
        lambda: core.list_namespaced_pod(namespace, label_selector="job-name=victim-job").items,
        timeout=60, what="the Job controller's pod",
    )[0]  # fmt: skip
    assert _job_arg(real) == "--job-name=victim-job", "the Job controller's pod knows its Job"

    forged = _pod("impostor")
    forged["metadata"]["labels"].update(
        {"batch.kubernetes.io/job-name": "victim-job", "job-name": "victim-job"}
    )
    forged["metadata"]["ownerReferences"] = [{
        "apiVersion": "batch/v1", "kind": "Job", "name": "victim-job",
        "uid": job.metadata.uid, "controller": True,
    }]  # fmt: skip
    stored = tenant.create_namespaced_pod(namespace, forged)
    assert _job_arg(stored) == "--job-name=", "a tenant's pod is counted as itself"
    after = batch.read_namespaced_job("victim-job", namespace)
    assert not after.spec.suspend
    assert after.metadata.generation == job.metadata.generation


def test_a_sidecar_namespace_s_config_copy_holds_no_other_team(
    injector: Injector, victim: Victim, api_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    core.patch_namespace(namespace, {"metadata": {"labels": {INJECT_LABEL: "enabled"}}})
    custom = client.CustomObjectsApi(api_client)
    policy, budget = _budget("attacker", namespace, "https://attacker-models.example/v1")
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "routingpolicies", policy)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "teambudgets", budget)

    def copy() -> Any:
        try:
            found = core.read_namespaced_config_map(CONFIG_COPY_NAME, namespace)
        except ApiException:
            return None
        teams = json.loads(found.data[CONFIG_MAP_KEY])["teams"]
        return found if [t["id"] for t in teams] == [f"{namespace}/attacker"] else None

    found = wait_for(copy, timeout=60, what="the attacker namespace's own copy")
    text = found.data[CONFIG_MAP_KEY]
    assert victim.namespace not in text, "no trace of the other team"
    assert "victim-models.example" not in text, "nor of its endpoints"
    policies = [p["id"] for p in json.loads(text)["policies"]]
    assert policies == [f"{namespace}/routing"]
    # The sidecar verifies the operator with the published CA, delivered with the copy.
    published = core.read_namespaced_config_map(DEFAULT_CA_CONFIGMAP, injector.namespace)
    assert found.data[INGEST_CA_KEY] == published.data[CA_KEY]
    source = json.loads(core.read_namespaced_config_map(CONFIG_MAP_NAME, injector.namespace)
                        .data[CONFIG_MAP_KEY])  # fmt: skip
    assert {t["id"] for t in source["teams"]} >= {f"{namespace}/attacker",
                                                  f"{victim.namespace}/victim"}  # fmt: skip


# --- tokens and transport (item 4) ----------------------------------------------------------


def _pod_token(plane: LocalControlPlane, namespace: str, pod: str, *audience: str) -> str:
    return plane.kubectl(
        "create", "token", "agent", "-n", namespace, *audience,
        "--bound-object-kind", "Pod", "--bound-object-name", pod,
    ).stdout.strip()  # fmt: skip


@pytest.fixture
def agent_pod(
    control_plane: LocalControlPlane, api_client: client.ApiClient, namespace: str
) -> str:
    core = client.CoreV1Api(api_client)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="agent"))
    )
    core.create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent-pod"},
        "spec": {"serviceAccountName": "agent", "automountServiceAccountToken": False,
                 "containers": [{"name": "c", "image": "busybox"}]},
    })  # fmt: skip
    return "agent-pod"


def test_the_shared_gateway_refuses_tokens_not_minted_for_its_audience(
    control_plane: LocalControlPlane, kubeconfig: str, namespace: str, agent_pod: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    from costwarden.gateway.tokenreview import TokenReviewVerifier, api_client

    default = _pod_token(control_plane, namespace, agent_pod)  # the API server's audience
    ingest = _pod_token(control_plane, namespace, agent_pod, "--audience", INGEST_AUDIENCE)
    bound = _pod_token(control_plane, namespace, agent_pod, "--audience", GATEWAY_AUDIENCE)
    fake = FakeUpstream()
    with ServerThread(fake.app) as upstream:
        config = sample_config(upstream.url, namespaces=[namespace])
        identifier = SharedIdentifier(None, TokenReviewVerifier(api_client(kubeconfig)))
        # The models' provider key is mounted: a keyless model would be refused (503) anyway.
        keys = write_credentials(tmp_path / "credentials")
        with GatewayThread(config, identifier=identifier, credentials_dir=keys) as gateway:
            for token in (default, ingest):
                sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=token, max_retries=0)
                with pytest.raises(openai.AuthenticationError) as refused:
                    sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
                assert refused.value.code == "unattributed_caller"
                assert GATEWAY_AUDIENCE in refused.value.message
                assert "serviceAccountToken" in refused.value.message, "says how to project"
            assert fake.calls == [], "nothing refused reached a provider"
            assert [r.outcome for r in gateway.sink.records if r.team] == []  # type: ignore[attr-defined]
            # The token projected for the gateway's audience is accepted (the test can fail).
            sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=bound, max_retries=0)
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            assert len(fake.calls) == 1


def _spent(api_client: client.ApiClient, namespace: str, name: str) -> Any:
    budget = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "teambudgets", name
    )
    return (budget.get("status") or {}).get("spentUSD")


def test_ingestion_refuses_a_gateway_audience_token_and_plain_http(
    injector: Injector, victim: Victim, control_plane: LocalControlPlane,
    api_client: client.ApiClient, namespace: str, agent_pod: str,
) -> None:  # fmt: skip
    before = victim.snapshot()
    token = _pod_token(control_plane, namespace, agent_pod, "--audience", GATEWAY_AUDIENCE)
    batch = {"source": f"{namespace}/{agent_pod}", "items": []}
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(verify=injector.tls(), timeout=10) as https:
        refused = https.post(injector.ingest_url, json=batch, headers=headers)
        assert refused.status_code == 401, refused.text
        # The same pod's token for the ingest audience is accepted (the test can fail).
        right = _pod_token(control_plane, namespace, agent_pod, "--audience", INGEST_AUDIENCE)
        ok = https.post(
            injector.ingest_url, json=batch, headers={"Authorization": f"Bearer {right}"}
        )
        assert ok.status_code == 200, ok.text
    # Plain HTTP is not served: the token would cross the network in clear.
    plain = f"http://127.0.0.1:{injector.ingest_port}/v1/usage"
    with pytest.raises(httpx.HTTPError):
        httpx.post(plain, json=batch, headers=headers, timeout=10)
    assert victim.snapshot() == before


def test_the_gateway_will_not_report_over_plain_http_across_the_network(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(serialize(sample_config("http://127.0.0.1:1")))
    result = subprocess.run(
        [sys.executable, "-m", "costwarden", "gateway", "--config", str(config),
         "--report-to", "http://costwarden-operator-ingest.costwarden-system.svc:8081"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "https" in result.stderr


def test_gateway_metrics_are_not_on_the_api_port(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(serialize(sample_config("http://127.0.0.1:1")))
    api, scrape = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "costwarden", "gateway", "--config", str(config),
         "--host", "127.0.0.1", "--port", str(api), "--metrics-port", str(scrape),
         "--mode", "sidecar", "--log-level", "WARNING"],
        env={"POD_NAMESPACE": "team-a", "POD_NAME": "p", "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def up() -> bool:
            assert process.poll() is None
            try:
                return httpx.get(f"http://127.0.0.1:{api}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=60, what="gateway ready")
        assert httpx.get(f"http://127.0.0.1:{api}/metrics", timeout=5).status_code == 404
        metrics = wait_for(
            lambda: (r := httpx.get(f"http://127.0.0.1:{scrape}/metrics", timeout=5))
            .status_code == 200 and r,
            timeout=10, what="metrics port",
        )  # fmt: skip
        assert "costwarden_gateway_config_info" in metrics.text
    finally:
        process.terminate()
        process.wait(30)


def test_the_gateway_cannot_list_or_watch_pods_cluster_wide(
    control_plane: LocalControlPlane, namespace: str
) -> None:
    from tests.integration.test_helm import Release

    release = Release(control_plane, namespace)
    release.install()
    try:
        assert release.can("gateway", "get", "pods", "some-team"), "TokenReview's pod lookup"
        for verb in ("list", "watch"):
            assert not release.can("gateway", verb, "pods", "some-team")
            result = control_plane.kubectl(
                "auth", "can-i", verb, "pods", "--all-namespaces",
                "--as", f"system:serviceaccount:{namespace}:{release.fullname}-gateway",
                check=False,
            )  # fmt: skip
            assert result.stdout.strip() == "no"
        assert not release.can("gateway", "get", "secrets", "some-team")
    finally:
        release.uninstall()
