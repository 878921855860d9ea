"""Sidecar injection as pure data: who is injected, what is added, and idempotency."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest

from costwarden.api.gatewayconfig import CredentialRef
from costwarden.api.usage import SIDECAR_REPORT_AUDIENCE
from costwarden.policy.injection import (
    CONFIG_COPY_NAME,
    INJECT_LABEL,
    INJECTED_LABEL,
    SIDECAR_NAME,
    InjectionSettings,
    base_url_env,
    inject,
    webhook_entries,
)

SETTINGS = InjectionSettings(image="costwarden/costwarden:test")


def pod(labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent", "namespace": "team-a", "labels": dict(labels or {})},
        "spec": {"containers": [{"name": "agent", "image": "agent:1"}], **spec},
    }


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def injected(p: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    result = inject(p, SETTINGS, namespace=p["metadata"]["namespace"], **kwargs).pod
    assert result is not None
    return result


def test_a_labelled_pod_gets_a_native_sidecar_and_the_base_urls() -> None:
    result = injected(pod({INJECT_LABEL: "true"}))
    sidecar = result["spec"]["initContainers"][0]
    assert sidecar["name"] == SIDECAR_NAME
    assert sidecar["restartPolicy"] == "Always", "native sidecar: Jobs complete"
    assert sidecar["image"] == "costwarden/costwarden:test"
    args = sidecar["args"]
    assert args[:3] == ["gateway", "--mode", "sidecar"]
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--port") + 1] == "15080"
    assert args[args.index("--config") + 1] == "/etc/costwarden/gateway/gateway-config.json"
    assert args[args.index("--pod-labels-file") + 1] == "/etc/podinfo/labels"
    assert env_of(sidecar) == {
        "POD_NAME": {"fieldRef": {"fieldPath": "metadata.name"}},
        "POD_NAMESPACE": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    }
    agent_env = env_of(result["spec"]["containers"][0])
    assert agent_env["OPENAI_BASE_URL"] == "http://127.0.0.1:15080/v1"
    assert agent_env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:15080"
    assert agent_env["OPENAI_API_BASE"] == "http://127.0.0.1:15080/v1"
    assert result["metadata"]["labels"][INJECTED_LABEL] == "true"


def test_the_sidecar_is_hardened_and_bounded() -> None:
    sidecar = injected(pod({INJECT_LABEL: "true"}))["spec"]["initContainers"][0]
    ctx = sidecar["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert sidecar["resources"]["limits"]["memory"]
    assert sidecar["resources"]["requests"]["cpu"]
    assert "exec" in sidecar["startupProbe"], "the listener is loopback-only"


def test_volumes_mount_the_namespace_copy_and_the_downward_api_labels() -> None:
    result = injected(pod({INJECT_LABEL: "true"}, volumes=[{"name": "work", "emptyDir": {}}]))
    volumes = {v["name"]: v for v in result["spec"]["volumes"]}
    assert "work" in volumes
    assert volumes["costwarden-gateway-config"]["configMap"] == {"name": CONFIG_COPY_NAME}
    items = volumes["costwarden-podinfo"]["downwardAPI"]["items"]
    assert items == [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]
    mounts = {m["name"]: m for m in result["spec"]["initContainers"][0]["volumeMounts"]}
    assert mounts["costwarden-podinfo"]["mountPath"] == "/etc/podinfo"
    # Only the ledger's volume is writable (the root filesystem is read-only).
    writable = {name for name, m in mounts.items() if not m.get("readOnly")}
    assert writable == {"costwarden-state"}
    assert "emptyDir" in volumes["costwarden-state"]


def test_sidecars_report_usage_with_a_token_bound_to_their_pod() -> None:
    settings = replace(SETTINGS, report_to="http://costwarden-operator.cw.svc:8081")
    result = inject(pod({INJECT_LABEL: "true"}), settings, namespace="team-a").pod
    assert result is not None
    sidecar = result["spec"]["initContainers"][0]
    args = sidecar["args"]
    assert args[args.index("--report-to") + 1] == "http://costwarden-operator.cw.svc:8081"
    assert args[args.index("--ledger") + 1].startswith("/var/lib/costwarden/")
    token_file = args[args.index("--report-token-file") + 1]
    volumes = {v["name"]: v for v in result["spec"]["volumes"]}
    projected = volumes["costwarden-report-token"]["projected"]["sources"][0]
    assert projected["serviceAccountToken"]["audience"] == SIDECAR_REPORT_AUDIENCE
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "costwarden-report-token")
    assert token_file == f"{mount['mountPath']}/{projected['serviceAccountToken']['path']}"


def test_without_an_operator_url_sidecars_keep_a_ledger_only() -> None:
    result = injected(pod({INJECT_LABEL: "true"}))
    assert "--report-to" not in result["spec"]["initContainers"][0]["args"]
    assert "costwarden-report-token" not in {v["name"] for v in result["spec"]["volumes"]}


def test_injection_is_idempotent() -> None:
    once = injected(pod({INJECT_LABEL: "true"}))
    again = inject(once, SETTINGS, namespace="team-a")
    assert again.pod is None
    assert again.reason == "already injected"


def test_a_container_added_after_injection_gets_the_environment() -> None:
    # Reinvocation: another webhook added a container after ours ran.
    once = injected(pod({INJECT_LABEL: "true"}))
    once["spec"]["containers"].append({"name": "late", "image": "x"})
    again = injected(once)
    assert len(again["spec"]["initContainers"]) == 1
    assert env_of(again["spec"]["containers"][1])["OPENAI_BASE_URL"].startswith("http://127.")


@pytest.mark.parametrize(
    ("labels", "namespace_opted_in", "expected"),
    [
        ({}, False, False),
        ({INJECT_LABEL: "true"}, False, True),
        ({}, True, True),
        ({INJECT_LABEL: "false"}, True, False),
        ({INJECT_LABEL: "yes-please"}, False, False),
    ],
)
def test_who_is_injected(labels: dict[str, str], namespace_opted_in: bool, expected: bool) -> None:
    decision = inject(
        pod(labels), SETTINGS, namespace="team-a", namespace_opted_in=namespace_opted_in
    )
    assert (decision.pod is not None) is expected, decision.reason


@pytest.mark.parametrize("namespace", ["kube-system", "costwarden-system"])
def test_excluded_namespaces_are_never_injected(namespace: str) -> None:
    settings = InjectionSettings(
        image="x", excluded_namespaces=frozenset({"kube-system", "costwarden-system"})
    )
    p = pod({INJECT_LABEL: "true"})
    assert inject(p, settings, namespace=namespace, namespace_opted_in=True).pod is None


def test_host_network_pods_are_not_injected() -> None:
    assert (
        inject(pod({INJECT_LABEL: "true"}, hostNetwork=True), SETTINGS, namespace="a").pod is None
    )


def denied(p: dict[str, Any], **kwargs: Any) -> str:
    decision = inject(p, SETTINGS, namespace=p["metadata"]["namespace"], **kwargs)
    assert decision.pod is None, decision
    assert decision.denied
    return decision.denied


def test_a_base_url_the_pod_sets_itself_is_denied_naming_the_field() -> None:
    p = pod({INJECT_LABEL: "true"})
    p["spec"]["containers"][0]["env"] = [
        {"name": "FIRST", "value": "1"},
        {"name": "OPENAI_BASE_URL", "value": "https://api.openai.com/v1"},
        {"name": "ANTHROPIC_BASE_URL", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
    ]
    message = denied(p)
    assert "spec.containers[0].env[1] (OPENAI_BASE_URL)" in message
    assert "spec.containers[0].env[2] (ANTHROPIC_BASE_URL)" in message
    assert "FIRST" not in message


def test_the_base_url_with_costwarden_s_own_value_is_not_a_conflict() -> None:
    p = pod({INJECT_LABEL: "true"})
    url = base_url_env()["OPENAI_BASE_URL"]
    p["spec"]["containers"][0]["env"] = [{"name": "OPENAI_BASE_URL", "value": url}]
    env = injected(p)["spec"]["containers"][0]["env"]
    assert [e["name"] for e in env].count("OPENAI_BASE_URL") == 1


@pytest.mark.parametrize(
    ("where", "mutate"),
    [
        ("spec.volumes[0] (costwarden-gateway-config)", lambda s: s.update(volumes=[
            {"name": "costwarden-gateway-config", "configMap": {"name": "my-free-config"}}])),
        ("spec.volumes[0] (costwarden-anything)", lambda s: s.update(volumes=[
            {"name": "costwarden-anything", "emptyDir": {}}])),
        ("spec.containers[1].name", lambda s: s["containers"].append(
            {"name": SIDECAR_NAME, "image": "mine"})),
        ("spec.initContainers[0].name", lambda s: s.update(initContainers=[
            {"name": SIDECAR_NAME, "image": "costwarden/costwarden:test", "restartPolicy": "Always"}
        ])),
        ("spec.containers[0].env[0] (COSTWARDEN_REPORT_TO)", lambda s: s["containers"][0].update(
            env=[{"name": "COSTWARDEN_REPORT_TO", "value": "https://evil"}])),
        ("spec.containers[0].volumeMounts[0] (costwarden-state)", lambda s: s["containers"][0]
            .update(volumeMounts=[{"name": "costwarden-state", "mountPath": "/ledger"}])),
        ("spec.shareProcessNamespace", lambda s: s.update(shareProcessNamespace=True)),
    ],
)  # fmt: skip
def test_names_the_injector_owns_are_denied(where: str, mutate: Any) -> None:
    p = pod({INJECT_LABEL: "true"})
    mutate(p["spec"])
    assert where in denied(p)


def test_a_pod_that_is_not_opted_in_is_not_judged() -> None:
    p = pod({}, volumes=[{"name": "costwarden-state", "emptyDir": {}}])
    decision = inject(p, SETTINGS, namespace="team-a")
    assert (decision.pod, decision.denied) == (None, "")


def _as_stored(p: dict[str, Any]) -> dict[str, Any]:
    """What the API server keeps of an injected pod: defaults filled in, and the
    ServiceAccount admission plugin's token mount added to the sidecar on reinvocation."""
    stored = copy.deepcopy(p)
    sidecar = stored["spec"]["initContainers"][0]
    sidecar["terminationMessagePath"] = "/dev/termination-log"
    sidecar["terminationMessagePolicy"] = "File"
    sidecar["startupProbe"].update(timeoutSeconds=1, successThreshold=1)
    for entry in sidecar["env"]:
        if "fieldRef" in entry["valueFrom"]:
            entry["valueFrom"]["fieldRef"]["apiVersion"] = "v1"
    sidecar["volumeMounts"].append(
        {"name": "kube-api-access-x", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
         "readOnly": True})  # fmt: skip
    for volume in stored["spec"]["volumes"]:
        for source in ("configMap", "downwardAPI", "projected"):
            if source in volume:
                volume[source]["defaultMode"] = 420
    return stored


def test_its_own_injection_as_the_api_server_stores_it_is_recognised() -> None:
    settings = replace(SETTINGS, report_to="https://operator:8081")
    first = inject(pod({INJECT_LABEL: "true"}), settings, namespace="team-a").pod
    assert first is not None
    again = inject(_as_stored(first), settings, namespace="team-a", namespace_opted_in=True)
    assert (again.pod, again.denied) == (None, "")


def test_its_own_injection_with_provider_key_env_is_recognised() -> None:
    """The provider keys' secretKeyRef env is part of the sidecar the injector expects, so
    the second call (the other webhook entry, a reinvocation) finds its own work unchanged."""
    settings = replace(SETTINGS, report_to="https://operator:8081")
    keys = [
        CredentialRef(namespace="team-a", name="openai", key="api-key"),
        CredentialRef(namespace="team-a", name="anthropic", key="key"),
    ]
    first = inject(pod({INJECT_LABEL: "true"}), settings, namespace="team-a", credentials=keys)
    assert first.pod is not None
    sidecar = first.pod["spec"]["initContainers"][0]
    assert env_of(sidecar)["COSTWARDEN_CREDENTIAL_TEAM_A_OPENAI_API_KEY"] == {
        "secretKeyRef": {"name": "openai", "key": "api-key", "optional": True}
    }
    again = inject(
        _as_stored(first.pod), settings, namespace="team-a", namespace_opted_in=True,
        credentials=keys,
    )  # fmt: skip
    assert (again.pod, again.denied) == (None, "")
    # A sidecar whose keys differ from what the injector would write now is not its own.
    other = [CredentialRef(namespace="team-a", name="stolen", key="k")]
    changed = inject(_as_stored(first.pod), settings, namespace="team-a", credentials=other)
    assert "spec.initContainers[0].name" in changed.denied


def test_a_copy_of_the_sidecar_with_one_argument_changed_is_denied() -> None:
    first = injected(pod({INJECT_LABEL: "true"}))
    forged = _as_stored(first)
    args = forged["spec"]["initContainers"][0]["args"]
    args[args.index("--config") + 1] = "/tmp/free.json"
    assert "spec.initContainers[0].name" in denied(forged)
    forged = _as_stored(first)
    forged["spec"]["initContainers"][0]["command"] = ["sh", "-c", "sleep infinity"]
    assert "spec.initContainers[0].name" in denied(forged)


def _job_pod(labels: dict[str, str]) -> dict[str, Any]:
    p = pod({INJECT_LABEL: "true", **labels})
    p["metadata"]["ownerReferences"] = [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "nightly", "uid": "u1",
         "controller": True, "blockOwnerDeletion": True}
    ]  # fmt: skip
    return p


def _job_arg(p: dict[str, Any]) -> str:
    args = p["spec"]["initContainers"][0]["args"]
    return next(a for a in args if a.startswith("--job-name="))


def test_the_sidecar_learns_its_job_from_the_job_controller_only() -> None:
    forged_labels = {"batch.kubernetes.io/job-name": "victim", "job-name": "victim"}
    by_controller = injected(
        _job_pod(forged_labels), creator="system:serviceaccount:kube-system:job-controller"
    )
    assert _job_arg(by_controller) == "--job-name=nightly"
    # The same pod (owner reference and labels forged alike) created by a tenant: no Job.
    by_tenant = injected(_job_pod(forged_labels), creator="system:serviceaccount:team-a:ci")
    assert _job_arg(by_tenant) == "--job-name="


def test_existing_init_containers_run_after_the_sidecar_and_get_the_environment() -> None:
    p = pod({INJECT_LABEL: "true"}, initContainers=[{"name": "fetch", "image": "git"}])
    init = injected(p)["spec"]["initContainers"]
    assert [c["name"] for c in init] == [SIDECAR_NAME, "fetch"]
    assert "OPENAI_BASE_URL" in env_of(init[1])


def test_the_input_is_not_modified() -> None:
    p = pod({INJECT_LABEL: "true"})
    before = copy.deepcopy(p)
    injected(p)
    assert p == before


def test_webhook_entries_only_match_opted_in_pods_outside_excluded_namespaces() -> None:
    entries = webhook_entries(
        configuration="sidecar-injector.costwarden.io",
        client_config={
            "caBundle": "Q0E=",
            "service": {"name": "w", "namespace": "cw", "port": 443},
        },
        handler_paths={"pod": "/inject-labelled-pod", "namespace": "/inject-opted-in-namespace"},
        excluded_namespaces=frozenset({"kube-system", "cw"}),
        failure_policy="Ignore",
    )
    by_name = {e["name"].split(".")[0]: e for e in entries}
    never = {
        "key": "kubernetes.io/metadata.name",
        "operator": "NotIn",
        "values": ["cw", "kube-system"],
    }
    pod_entry, ns_entry = by_name["pod"], by_name["namespace"]
    assert pod_entry["objectSelector"] == {"matchLabels": {INJECT_LABEL: "true"}}
    assert pod_entry["namespaceSelector"] == {"matchExpressions": [never]}
    assert ns_entry["namespaceSelector"]["matchLabels"] == {INJECT_LABEL: "enabled"}
    assert ns_entry["namespaceSelector"]["matchExpressions"] == [never]
    assert ns_entry["objectSelector"]["matchExpressions"][0]["operator"] == "NotIn"
    assert pod_entry["clientConfig"]["service"]["path"] == "/inject-labelled-pod"
    assert ns_entry["clientConfig"]["service"]["path"] == "/inject-opted-in-namespace"
    for entry in entries:
        assert entry["failurePolicy"] == "Ignore"
        assert entry["reinvocationPolicy"] == "IfNeeded"
        assert entry["sideEffects"] == "NoneOnDryRun"
        assert entry["rules"][0]["operations"] == ["CREATE"]
