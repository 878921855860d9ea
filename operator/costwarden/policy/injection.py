"""Sidecar injection, decided and applied to a pod as plain data (no I/O, no Kubernetes client).

The admission webhook (``controllers/injection.py``) asks :func:`inject` what a pod should
look like; the same function serves the unit tests. See docs/sidecar-injection.md.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from costwarden.api.gatewayconfig import CredentialRef
from costwarden.api.usage import SIDECAR_REPORT_AUDIENCE
from costwarden.policy.provider_keys import credential_env

INJECT_LABEL = "costwarden.io/inject"
"""On a pod: "true" opts in, "false" opts out. On a namespace: "enabled" opts its pods in."""
NAMESPACE_OPT_IN = "enabled"
INJECTED_LABEL = "costwarden.io/injected"
"""Set on injected pods: a selectable marker (the operator keeps the namespace's config copy
while such pods exist) and visible to `kubectl get pods -l`."""
SIDECAR_NAME = "costwarden-gateway"
SIDECAR_PORT = 15080
CONFIG_COPY_NAME = "costwarden-sidecar-config"
"""The gateway configuration copied into each namespace that runs sidecars (a ConfigMap
volume can only reference a ConfigMap in the pod's own namespace)."""
CONFIG_VOLUME = "costwarden-gateway-config"
CONFIG_DIR = "/etc/costwarden/gateway"
PODINFO_VOLUME = "costwarden-podinfo"
PODINFO_DIR = "/etc/podinfo"
STATE_VOLUME = "costwarden-state"
STATE_DIR = "/var/lib/costwarden"
"""The sidecar's usage ledger: survives a restart of the sidecar container (not of the pod),
so records not yet acknowledged by the operator are re-sent."""
TOKEN_VOLUME = "costwarden-report-token"
TOKEN_DIR = "/var/run/costwarden/report"
TOKEN_SECONDS = 3600  # the kubelet refreshes the projected token before it expires
INGEST_CA_KEY = "ingest-ca.crt"
"""Key of the config copy holding the CA bundle that signs the operator's ingestion
certificate: the sidecar verifies the operator with it (``--report-ca-file``)."""
ALWAYS_EXCLUDED = frozenset({"kube-system", "kube-public", "kube-node-lease"})
OWNED_VOLUME_PREFIX = "costwarden-"
OWNED_ENV_PREFIX = "COSTWARDEN_"
JOB_CONTROLLER_USERS = frozenset(
    {"system:serviceaccount:kube-system:job-controller", "system:kube-controller-manager"}
)
"""Who creates a Job's pods: the Job controller's own service account (kube-controller-manager
with --use-service-account-credentials, as kubeadm runs it), or kube-controller-manager's
user. Only a pod these users create is believed about its owning Job."""
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
_DEFAULTED: Mapping[str, Any] = {
    "terminationMessagePath": "/dev/termination-log",
    "terminationMessagePolicy": "File",
    "timeoutSeconds": 1,
    "successThreshold": 1,
    "defaultMode": 420,
    "apiVersion": "v1",
}
"""Fields the API server fills in (defaulting) on what the injector wrote, with their
default values: a second call (the other webhook entry, a reinvocation) sees them."""

Pod = dict[str, Any]

DEFAULT_RESOURCES: Mapping[str, Mapping[str, str]] = {
    "requests": {"cpu": "50m", "memory": "64Mi"},
    "limits": {"cpu": "1", "memory": "256Mi"},
}


@dataclass(frozen=True)
class InjectionSettings:
    image: str
    port: int = SIDECAR_PORT
    config_map: str = CONFIG_COPY_NAME
    excluded_namespaces: frozenset[str] = ALWAYS_EXCLUDED
    image_pull_policy: str = "IfNotPresent"
    resources: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: DEFAULT_RESOURCES)
    report_to: str | None = None
    """The operator's ingestion URL; set, sidecars deliver their usage there."""
    job_controller_users: frozenset[str] = JOB_CONTROLLER_USERS
    """Creators whose pods' Job owner reference is believed (see :func:`trusted_job`)."""


@dataclass(frozen=True)
class Injection:
    """What to do with a pod: ``pod`` is the mutated copy, or None to leave it as it is."""

    pod: Pod | None
    reason: str
    denied: str = ""
    """Set: the pod must not be admitted; the message names the fields at fault."""


def base_url_env(port: int = SIDECAR_PORT) -> dict[str, str]:
    """The variables that point the common SDKs at the sidecar.

    - OPENAI_BASE_URL: the official openai SDKs (Python, Node, Go, .NET) and most tools
      built on them; OpenAI-format paths live under /v1.
    - OPENAI_API_BASE: openai-python < 1.0 and LangChain's older integrations.
    - ANTHROPIC_BASE_URL: the official anthropic SDKs and Claude Code (they add /v1 paths).
    - ANTHROPIC_API_BASE: LiteLLM's name for the Anthropic endpoint.
    """
    root = f"http://127.0.0.1:{port}"
    return {
        "OPENAI_BASE_URL": f"{root}/v1",
        "OPENAI_API_BASE": f"{root}/v1",
        "ANTHROPIC_BASE_URL": root,
        "ANTHROPIC_API_BASE": root,
    }


def wants_injection(
    pod: Mapping[str, Any], namespace: str, namespace_opted_in: bool, settings: InjectionSettings
) -> tuple[bool, str]:
    """Whether the pod is opted in, and why (for logs)."""
    if namespace in settings.excluded_namespaces:
        return False, f"namespace {namespace} is never injected"
    if (pod.get("spec") or {}).get("hostNetwork"):
        return False, "hostNetwork pods would share the sidecar port with the node"
    label = ((pod.get("metadata") or {}).get("labels") or {}).get(INJECT_LABEL)
    if label == "false":
        return False, "pod opted out"
    if label == "true":
        return True, "pod opted in"
    if namespace_opted_in:
        return True, "namespace opted in"
    return False, "not opted in"


def inject(
    pod: Mapping[str, Any],
    settings: InjectionSettings,
    *,
    namespace: str,
    namespace_opted_in: bool = False,
    creator: str = "",
    credentials: Sequence[CredentialRef] = (),
) -> Injection:
    """The pod with the sidecar and base-URL environment, or None if nothing changes.

    ``creator`` is the user creating the pod (the admission request's userInfo): the sidecar
    is told the pod's Job only when the Job controller created it (:func:`trusted_job`).

    ``credentials`` (:func:`costwarden.policy.provider_keys.sidecar_credentials`: keys in
    Secrets of the pod's own namespace) become ``secretKeyRef`` env of the sidecar only.
    They are part of the sidecar this function computes, before the ownership check below:
    a second call recognises its own prior injection only if it expects the same env.

    The injector owns its names (:func:`owned_name_violations`): a pod that brings its own
    ``costwarden-gateway`` container, ``costwarden-*`` volume, ``COSTWARDEN_*`` or base-URL
    variable is denied, unless what it brings is exactly what the injector would put there.
    That exception is what makes a second call idempotent (the other webhook entry, a
    reinvocation): the injector recognises its own work by content, not by a marker a pod
    could forge; a pod that copies the injection byte for byte gets the same pod as one
    injected, so forging it gains nothing. Reinvocation (``reinvocationPolicy: IfNeeded``)
    relies on this: containers another webhook added after us still get the environment.
    """
    wanted, reason = wants_injection(pod, namespace, namespace_opted_in, settings)
    if not wanted:
        return Injection(None, reason)
    sidecar = sidecar_container(settings, credentials, job=trusted_job(pod, creator, settings))
    volumes_wanted = sidecar_volumes(settings)
    env = base_url_env(settings.port)
    problems = owned_name_violations(pod, sidecar, volumes_wanted, env)
    if problems:
        return Injection(None, "pre-declares names the injector owns", denied=denial(problems))
    result: Pod = copy.deepcopy(dict(pod))
    spec = result.setdefault("spec", {})
    labels = result.setdefault("metadata", {}).setdefault("labels", {})
    labels[INJECTED_LABEL] = "true"
    init = spec.setdefault("initContainers", [])
    if not any(c.get("name") == SIDECAR_NAME for c in init):
        # First, so that init containers after it can call models through it, too.
        init.insert(0, sidecar)
    volumes = spec.setdefault("volumes", [])
    volumes.extend(v for v in volumes_wanted if v["name"] not in _names(volumes))
    for container in [*init, *spec.get("containers", [])]:
        if container.get("name") != SIDECAR_NAME:
            container["env"] = with_env(container.get("env") or [], env)
    if not init:
        del spec["initContainers"]
    if result == pod:
        return Injection(None, "already injected")
    return Injection(result, reason)


def trusted_job(pod: Mapping[str, Any], creator: str, settings: InjectionSettings) -> str:
    """The Job the pod belongs to, from what a tenant cannot forge; "" if none.

    Labels (``batch.kubernetes.io/job-name``, ``controller-uid``) and even owner references
    are whatever the pod's creator wrote. What the creator cannot choose is who it is: a pod
    the Job controller created carries the controller owner reference the Job controller
    set, naming the Job it runs for. Any other pod (a bare pod with forged Job labels) is
    counted as itself, by pod name.
    """
    if creator not in settings.job_controller_users:
        return ""
    for owner in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if (
            owner.get("controller")
            and owner.get("kind") == "Job"
            and str(owner.get("apiVersion", "")).startswith("batch/")
        ):
            return str(owner.get("name") or "")
    return ""


def owned_name_violations(
    pod: Mapping[str, Any],
    sidecar: Mapping[str, Any],
    volumes: list[dict[str, Any]],
    env: Mapping[str, str],
) -> list[str]:
    """What the pod itself declares under names the injector owns, as ``field: why``.

    Allowed only in exactly the injector's own form (its prior injection, see
    :func:`inject`): the sidecar as the first init container, the ``costwarden-*``
    volumes it adds, the base URLs with its values. Never allowed: a regular container
    named ``costwarden-gateway``, ``COSTWARDEN_*`` variables in the pod's containers, a
    pod container mounting a ``costwarden-*`` volume (the sidecar's ledger, token or
    configuration), and ``shareProcessNamespace`` (through /proc the agent would reach the
    sidecar's files and environment).
    """
    spec = pod.get("spec") or {}
    problems: list[str] = []
    if spec.get("shareProcessNamespace"):
        problems.append(
            "spec.shareProcessNamespace: a shared process namespace would give the agent "
            "the sidecar's files and token through /proc"
        )
    wanted_volumes = {v["name"]: v for v in volumes}
    for i, volume in enumerate(spec.get("volumes") or []):
        name = str(volume.get("name", ""))
        if name.startswith(OWNED_VOLUME_PREFIX) and not (
            name in wanted_volumes and _same(wanted_volumes[name], volume)
        ):
            problems.append(f"spec.volumes[{i}] ({name}): volume names {OWNED_VOLUME_PREFIX}* "
                            "belong to the costwarden injector")  # fmt: skip
    for kind in ("initContainers", "containers"):
        for i, container in enumerate(spec.get(kind) or []):
            where = f"spec.{kind}[{i}]"
            if container.get("name") == SIDECAR_NAME:
                if kind != "initContainers" or i != 0 or not _same(sidecar, _no_sa(container)):
                    problems.append(f"{where}.name: {SIDECAR_NAME} is the name of the "
                                    "sidecar costwarden injects")  # fmt: skip
                continue
            problems += _container_violations(where, container, env)
    return problems


def _container_violations(
    where: str, container: Mapping[str, Any], env: Mapping[str, str]
) -> list[str]:
    problems = []
    for j, entry in enumerate(container.get("env") or []):
        name = str(entry.get("name", ""))
        if name in env and entry != {"name": name, "value": env[name]}:
            problems.append(f"{where}.env[{j}] ({name}): the injector sets {name} to the "
                            "sidecar; remove it from the pod")  # fmt: skip
        elif name.startswith(OWNED_ENV_PREFIX):
            problems.append(f"{where}.env[{j}] ({name}): {OWNED_ENV_PREFIX}* variables "
                            "belong to the costwarden injector")  # fmt: skip
    for j, mount in enumerate(container.get("volumeMounts") or []):
        name = str(mount.get("name", ""))
        if name.startswith(OWNED_VOLUME_PREFIX):
            problems.append(f"{where}.volumeMounts[{j}] ({name}): only the costwarden sidecar "
                            "mounts its volumes")  # fmt: skip
    return problems


def denial(problems: list[str]) -> str:
    return (
        "costwarden sidecar injection: the pod declares names the injector owns: "
        + "; ".join(problems)
        + ' (docs/sidecar-injection.md, "Names the injector owns")'
    )


def _no_sa(container: Mapping[str, Any]) -> dict[str, Any]:
    """The container without the service-account token mount the API server's
    ServiceAccount admission plugin adds to every container (again on reinvocation)."""
    result = dict(container)
    if "volumeMounts" in result:
        result["volumeMounts"] = [
            m for m in result["volumeMounts"] if m.get("mountPath") != SERVICE_ACCOUNT_MOUNT
        ]
    return result


_ABSENT = object()


def _same(ours: Any, theirs: Any) -> bool:
    """Whether ``theirs`` is ``ours`` as the API server stores it: equal, except for fields
    the API server defaults (:data:`_DEFAULTED`), present with their default values."""
    if isinstance(ours, Mapping):
        if not isinstance(theirs, Mapping):
            return False
        for key, value in theirs.items():
            if key not in ours and _DEFAULTED.get(key, _ABSENT) != value:
                return False
        return all(key in theirs and _same(value, theirs[key]) for key, value in ours.items())
    if isinstance(ours, list):
        return (
            isinstance(theirs, list)
            and len(ours) == len(theirs)
            and all(_same(a, b) for a, b in zip(ours, theirs, strict=True))
        )
    return bool(ours == theirs)


def with_env(current: list[dict[str, Any]], wanted: Mapping[str, str]) -> list[dict[str, Any]]:
    """``current`` with each wanted variable set (a pod that sets one itself to anything
    else is denied before this, see :func:`owned_name_violations`).

    costwarden wins: a base URL the pod chooses would bypass metering and the caps. (What
    really stops a pod reaching a provider directly is a NetworkPolicy; see the docs.) The
    position of a replaced variable is kept, so `$(VAR)` references elsewhere still resolve.
    """
    out: list[dict[str, Any]] = []
    for entry in current:
        name = str(entry.get("name"))
        if name in wanted:
            out.append({"name": name, "value": wanted[name]})
        else:
            out.append(entry)
    present = _names(current)
    out.extend({"name": k, "value": v} for k, v in wanted.items() if k not in present)
    return out


def sidecar_container(
    settings: InjectionSettings, credentials: Sequence[CredentialRef] = (), *, job: str = ""
) -> dict[str, Any]:
    """The gateway as a native sidecar: an init container with ``restartPolicy: Always``
    (Kubernetes >= 1.29). Why native: a regular second container would keep a Job's pod
    running after the agent exits, so the Job would never complete; a native sidecar is
    started before the agent containers and stopped after they finish."""
    args = [
        "gateway", "--mode", "sidecar",
        "--config", f"{CONFIG_DIR}/gateway-config.json",
        # Loopback only: in sidecar mode every caller is this pod, so a listener other pods
        # could reach would let them spend this pod's team budget.
        "--host", "127.0.0.1",
        "--port", str(settings.port),
        "--pod-labels-file", f"{PODINFO_DIR}/labels",
        # The Job from the Job controller's owner reference (trusted_job), never the labels.
        f"--job-name={job}",
        "--ledger", f"{STATE_DIR}/usage.jsonl",
    ]  # fmt: skip
    mounts = [
        {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": PODINFO_VOLUME, "mountPath": PODINFO_DIR, "readOnly": True},
        {"name": STATE_VOLUME, "mountPath": STATE_DIR},
    ]
    if settings.report_to:
        # The sidecar proves which pod it serves with a token bound to that pod, for the
        # operator's audience only: it can report this pod's usage and nobody else's.
        args += ["--report-to", settings.report_to, "--report-token-file", f"{TOKEN_DIR}/token",
                 "--report-ca-file", f"{CONFIG_DIR}/{INGEST_CA_KEY}"]  # fmt: skip
        mounts.append({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True})
    probe = [
        "python",
        "-c",
        f"import socket; socket.create_connection(('127.0.0.1', {settings.port}), 1)",
    ]
    return {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "restartPolicy": "Always",
        "args": args,
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
            # Provider keys from the pod's own namespace, to this container only.
            *credential_env(credentials),
        ],
        # The agent containers start once this passes, so their first call finds the
        # gateway listening. An exec probe because the listener is loopback-only, where
        # the kubelet's httpGet/tcpSocket probes (which dial the pod IP) cannot reach it.
        "startupProbe": {"exec": {"command": probe}, "periodSeconds": 1, "failureThreshold": 60},
        "resources": copy.deepcopy(dict(settings.resources)),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }


def sidecar_volumes(settings: InjectionSettings) -> list[dict[str, Any]]:
    volumes = [
        # Not optional: a sidecar without configuration could only refuse calls; the pod
        # waits for the operator's copy instead (the kubelet retries the mount).
        {"name": CONFIG_VOLUME, "configMap": {"name": settings.config_map}},
        {
            "name": PODINFO_VOLUME,
            "downwardAPI": {
                "items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]
            },
        },
        {"name": STATE_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    if settings.report_to:
        token = {
            "audience": SIDECAR_REPORT_AUDIENCE,
            "expirationSeconds": TOKEN_SECONDS,
            "path": "token",
        }
        volumes.append(
            {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": token}]}}
        )
    return volumes


def _names(items: list[dict[str, Any]]) -> set[str]:
    return {str(item.get("name")) for item in items}


def webhook_entries(
    *,
    configuration: str,
    client_config: Mapping[str, Any],
    handler_paths: Mapping[str, str],
    excluded_namespaces: frozenset[str],
    failure_policy: str,
) -> list[dict[str, Any]]:
    """The two webhooks of the MutatingWebhookConfiguration, one per way of opting in.

    The API server only calls them for opted-in pods (selectors are evaluated before any
    call), so the rest of the cluster pays nothing and is unaffected by an outage. Two
    entries because a selector cannot say "pod label OR namespace label"; a pod matching
    both is called twice and the second call finds it injected already.
    """
    never = {
        "key": "kubernetes.io/metadata.name",
        "operator": "NotIn",
        "values": sorted(excluded_namespaces),
    }
    selectors = {
        "pod": (
            {"matchExpressions": [never]},
            {"matchLabels": {INJECT_LABEL: "true"}},
        ),
        "namespace": (
            {"matchExpressions": [never], "matchLabels": {INJECT_LABEL: NAMESPACE_OPT_IN}},
            {"matchExpressions": [{"key": INJECT_LABEL, "operator": "NotIn", "values": ["false"]}]},
        ),
    }
    entries = []
    for opt_in, (namespace_selector, object_selector) in selectors.items():
        path = handler_paths[opt_in]
        entries.append(
            {
                "name": f"{opt_in}.{configuration}",
                "admissionReviewVersions": ["v1"],
                "clientConfig": _with_path(client_config, path),
                "failurePolicy": failure_policy,
                "matchPolicy": "Equivalent",
                "namespaceSelector": namespace_selector,
                "objectSelector": object_selector,
                "reinvocationPolicy": "IfNeeded",
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                        "scope": "Namespaced",
                    }
                ],
                # Creating the namespace's config copy is skipped on dry runs.
                "sideEffects": "NoneOnDryRun",
                "timeoutSeconds": 10,
            }
        )
    return entries


def _with_path(client_config: Mapping[str, Any], path: str) -> dict[str, Any]:
    result = copy.deepcopy(dict(client_config))
    if "service" in result:
        result["service"]["path"] = path
    else:
        result["url"] = result["url"].rstrip("/") + path
    return result
