"""Sidecar injection on the real API server: it calls the operator's webhook over TLS.

A dedicated `costwarden operator` process serves the webhook on 127.0.0.1 (the test API
server runs on this machine) and writes its own MutatingWebhookConfiguration and gateway
ConfigMap, so it neither needs nor disturbs the session's operator. Pods stay Pending (no
kubelet): what is checked is the pod the API server stored.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from costwarden.api.gatewayconfig import CONFIG_MAP_KEY, CONFIG_MAP_NAME, GatewayConfig
from costwarden.cluster import LocalControlPlane
from costwarden.policy.config_scope import config_for_namespace
from costwarden.policy.injection import (
    CONFIG_COPY_NAME,
    INJECT_LABEL,
    INJECTED_LABEL,
    SIDECAR_NAME,
)
from costwarden.policy.render import serialize
from costwarden.ports import free_port
from tests.support.operator_process import OperatorProcess
from tests.support.polling import wait_for

IMAGE = "costwarden/costwarden:integration"


@pytest.fixture(scope="module")
def injector(
    control_plane: LocalControlPlane,
    api_client: client.ApiClient,
    crds: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """An operator with the webhook on; yields its operator namespace."""
    core = client.CoreV1Api(api_client)
    admission = client.AdmissionregistrationV1Api(api_client)
    suffix = secrets.token_hex(4)
    operator_ns, configuration = f"cw-injector-{suffix}", f"injector-{suffix}.costwarden.io"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=operator_ns)))
    log_path = tmp_path_factory.mktemp("injector") / "operator.log"
    process = OperatorProcess(
        str(control_plane.kubeconfig_path), operator_ns, log_path,
        "--standalone",
        "--webhook-port", str(free_port()),
        "--webhook-listen-address", "127.0.0.1",
        "--webhook-configuration", configuration,
        "--webhook-cert-dir", str(tmp_path_factory.mktemp("webhook-tls")),
        "--sidecar-image", IMAGE,
    ).start()  # fmt: skip

    def ready() -> bool:
        assert process.process is not None
        assert process.process.poll() is None, process.logs()
        try:
            config = admission.read_mutating_webhook_configuration(configuration)
            core.read_namespaced_config_map(CONFIG_MAP_NAME, operator_ns)
        except ApiException:
            return False
        return all(w.client_config.ca_bundle for w in config.webhooks or [])

    try:
        wait_for(ready, timeout=60, what="webhook configured and gateway config published")
        yield operator_ns
    finally:
        process.stop()
        if process.process and process.process.returncode not in (0, -15):
            print(process.logs())
        for delete in (
            lambda: admission.delete_mutating_webhook_configuration(configuration),
            lambda: core.delete_namespace(operator_ns),
        ):
            try:
                delete()
            except ApiException as error:
                if error.status != 404:
                    raise


@pytest.fixture
def core(api_client: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


def _pod(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "agent",
                    "image": "agent:1",
                    "env": [{"name": "TASK", "value": "summarize"}],
                }
            ],
        },
    }


def _create(core: client.CoreV1Api, namespace: str, body: dict[str, Any], **kw: Any) -> Any:
    # The namespace's default ServiceAccount (the controller-manager creates it) must exist.
    wait_for(lambda: core.list_namespaced_service_account(namespace).items, what="default SA")
    return core.api_client.sanitize_for_serialization(
        core.create_namespaced_pod(namespace, body, **kw)
    )


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env") or []}


def _assert_injected(pod: dict[str, Any]) -> None:
    init = pod["spec"]["initContainers"]
    assert [c["name"] for c in init] == [SIDECAR_NAME]
    sidecar = init[0]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == IMAGE
    assert sidecar["args"][:3] == ["gateway", "--mode", "sidecar"]
    assert {"POD_NAME", "POD_NAMESPACE"} <= set(_env(sidecar))
    env = _env(pod["spec"]["containers"][0])
    assert env["OPENAI_BASE_URL"] == "http://127.0.0.1:15080/v1"
    assert env["TASK"] == "summarize"
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:15080"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["costwarden-gateway-config"]["configMap"]["name"] == CONFIG_COPY_NAME
    assert "downwardAPI" in volumes["costwarden-podinfo"]
    assert pod["metadata"]["labels"][INJECTED_LABEL] == "true"


def _assert_untouched(pod: dict[str, Any]) -> None:
    assert not pod["spec"].get("initContainers")
    assert [c["name"] for c in pod["spec"]["containers"]] == ["agent"]
    assert _env(pod["spec"]["containers"][0]) == {"TASK": "summarize"}
    assert INJECTED_LABEL not in (pod["metadata"].get("labels") or {})


def _copy_in(core: client.CoreV1Api, namespace: str) -> client.V1ConfigMap | None:
    try:
        return core.read_namespaced_config_map(CONFIG_COPY_NAME, namespace)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def test_a_labelled_pod_is_injected_and_an_unlabelled_one_is_not(
    injector: str, core: client.CoreV1Api, namespace: str
) -> None:
    labelled = _create(core, namespace, _pod("labelled", {INJECT_LABEL: "true"}))
    _assert_injected(labelled)
    # Read back from the API server, not just the create response.
    stored = core.api_client.sanitize_for_serialization(
        core.read_namespaced_pod("labelled", namespace)
    )
    _assert_injected(stored)
    _assert_untouched(_create(core, namespace, _pod("plain")))
    # The sidecar's ConfigMap volume can only come from its own namespace: the webhook
    # created a copy there of the part of the operator's configuration governing it.
    source = core.read_namespaced_config_map(CONFIG_MAP_NAME, injector)
    copy = wait_for(lambda: _copy_in(core, namespace), timeout=45, what="config copy")
    rendered = GatewayConfig.model_validate_json(source.data[CONFIG_MAP_KEY])
    expected = serialize(config_for_namespace(rendered, namespace))
    assert copy.data[CONFIG_MAP_KEY] == expected


def test_pods_in_an_opted_in_namespace_are_injected_unless_they_opt_out(
    injector: str, core: client.CoreV1Api, namespace: str
) -> None:
    core.patch_namespace(namespace, {"metadata": {"labels": {INJECT_LABEL: "enabled"}}})
    # The API server evaluates namespace selectors from its informer cache: retry the
    # (idempotent) check until the label is seen, on dry runs so nothing accumulates.
    wait_for(
        lambda: _create(core, namespace, _pod("probe"), dry_run="All")["spec"].get(
            "initContainers"
        ),
        timeout=30, what="namespace label seen by the API server",
    )  # fmt: skip
    _assert_injected(_create(core, namespace, _pod("agent")))
    _assert_untouched(_create(core, namespace, _pod("opted-out", {INJECT_LABEL: "false"})))
    both = _create(core, namespace, _pod("both-ways", {INJECT_LABEL: "true"}))
    # Called by both webhook entries: the second sees the first's injection as the API
    # server stored it (defaults filled in), recognises it and neither denies nor repeats.
    _assert_injected(both)


def test_system_namespaces_are_never_injected(injector: str, core: client.CoreV1Api) -> None:
    for namespace in ("kube-system", injector):
        pod = _create(core, namespace, _pod("never", {INJECT_LABEL: "true"}), dry_run="All")
        _assert_untouched(pod)


def _team(namespace: str, policy_ref: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "costwarden.io/v1alpha1",
        "kind": "TeamBudget",
        "metadata": {"name": "team"},
        "spec": {"hardCapUSD": "10", "routingPolicyRef": policy_ref},
    }


def _credential_env(container: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in container.get("env") or [] if e["name"].startswith("COSTWARDEN_CREDENTIAL_")]


def test_sidecars_get_only_keys_held_in_their_own_namespace(
    injector: str, core: client.CoreV1Api, api_client: client.ApiClient, namespace: str
) -> None:
    custom = client.CustomObjectsApi(api_client)
    other = f"cw-other-{secrets.token_hex(3)}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    try:
        policy = {
            "apiVersion": "costwarden.io/v1alpha1",
            "kind": "RoutingPolicy",
            "metadata": {"name": "own"},
            "spec": {
                "models": [
                    {"name": "gpt-4o-mini", "provider": "OpenAI",
                     "endpoint": "https://api.openai.com/v1",
                     "credentials": {"name": "team-key", "key": "api-key"}},
                ],
                "defaultModel": "gpt-4o-mini",
            },
        }  # fmt: skip
        group = ("costwarden.io", "v1alpha1")
        custom.create_namespaced_custom_object(*group, namespace, "routingpolicies", policy)
        custom.create_namespaced_custom_object(
            *group, namespace, "teambudgets", _team(namespace, {"name": "own"})
        )
        # A team elsewhere routed by that policy: its key stays in the policy's namespace.
        custom.create_namespaced_custom_object(
            *group, other, "teambudgets", _team(other, {"name": "own", "namespace": namespace})
        )

        def teams_published() -> bool:
            data = core.read_namespaced_config_map(CONFIG_MAP_NAME, injector).data or {}
            text = data.get(CONFIG_MAP_KEY, "")
            return f'"{namespace}/team"' in text and f'"{other}/team"' in text

        wait_for(teams_published, timeout=60, what="both teams in the gateway configuration")

        pod = _create(core, namespace, _pod("with-key", {INJECT_LABEL: "true"}))
        _assert_injected(pod)
        sidecar = pod["spec"]["initContainers"][0]
        name = f"COSTWARDEN_CREDENTIAL_{namespace.upper().replace('-', '_')}_TEAM_KEY_API_KEY"
        assert _credential_env(sidecar) == [
            {
                "name": name,
                "valueFrom": {
                    "secretKeyRef": {"name": "team-key", "key": "api-key", "optional": True}
                },
            }
        ]
        assert not _credential_env(pod["spec"]["containers"][0]), "the agent never gets a key"

        # Called by both webhook entries (pod label and namespace opt-in): the second call
        # expects the key env the first one wrote, so it recognises its own sidecar.
        core.patch_namespace(namespace, {"metadata": {"labels": {INJECT_LABEL: "enabled"}}})
        wait_for(
            lambda: _create(core, namespace, _pod("probe"), dry_run="All")["spec"].get(
                "initContainers"
            ),
            timeout=30, what="namespace label seen by the API server",
        )  # fmt: skip
        both = _create(core, namespace, _pod("both-ways-key", {INJECT_LABEL: "true"}))
        _assert_injected(both)
        assert _credential_env(both["spec"]["initContainers"][0]) == _credential_env(sidecar)

        elsewhere = _create(core, other, _pod("no-key", {INJECT_LABEL: "true"}))
        _assert_injected(elsewhere)
        assert not _credential_env(elsewhere["spec"]["initContainers"][0])
    finally:
        core.delete_namespace(other)
