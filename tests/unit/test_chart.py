"""The Helm chart, rendered offline with `helm template` (no cluster needed).

Checks what a platform engineer relies on: lint-clean, least-privilege RBAC, hardened pods,
a schema that rejects bad values, the same price table and CRDs as the Python package, and
command lines the `costwarden` CLI accepts.
"""

from __future__ import annotations

import base64
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from costwarden.api.catalog import PriceCatalog, default_catalog
from costwarden.api.crd import all_crds
from costwarden.api.gatewayconfig import CONFIG_MAP_KEY, CredentialRef
from costwarden.cluster import ensure_cli_tools
from costwarden.gateway.credentials import Credentials
from costwarden.policy.provider_keys import Access, SecretRead, plan_mirror
from costwarden.testing.gateway import sample_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "costwarden"
PACKAGE_PRICES = ROOT / "operator" / "costwarden" / "api" / "prices.yaml"
RELEASE = "cw"
NAMESPACE = "costwarden-system"

STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)

EVERYTHING_ON = (
    "--set",
    "metrics.serviceMonitor.enabled=true,metrics.serviceMonitor.force=true",
    "--set",
    "webhook.enabled=true,apiKeys.enabled=true",
    "--set",
    "operator.replicas=2,operator.logLevel=debug",
    "--set",
    "results.githubWebhookSecret.name=gh-hook,results.tokenSecret.name=ci-results",
)
SCENARIOS = {
    "defaults": (),
    "everything-on": EVERYTHING_ON,
    "gateway-disabled": ("--set", "gateway.enabled=false"),
    "everything-on-gateway-disabled": (*EVERYTHING_ON, "--set", "gateway.enabled=false"),
}


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("helm-home")
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


@pytest.fixture(scope="module")
def helm(helm_env: dict[str, str]) -> Any:
    binary = str(ensure_cli_tools() / "helm")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [binary, *args], env=helm_env, capture_output=True, text=True, timeout=120, check=False
        )

    return run


def template(helm: Any, *args: str) -> list[dict[str, Any]]:
    result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, f"helm template {shlex.join(args)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def deployment(objects: list[dict[str, Any]], component: str) -> dict[str, Any]:
    return named(objects, "Deployment", f"{RELEASE}-costwarden-{component}")


def container_args(objects: list[dict[str, Any]], component: str) -> list[str]:
    args: list[str] = deployment(objects, component)["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    return args


def flag(args: list[str], name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"{name}=")]
    assert len(values) == 1, f"{name} appears {len(values)} times in {args}"
    return values[0]


def rules_of(role: dict[str, Any]) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = role.get("rules") or []
    return rules


# ---------------------------------------------------------------------------------------
# lint, chart metadata
# ---------------------------------------------------------------------------------------


def test_helm_lint_strict_passes(helm: Any) -> None:
    result = helm("lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("scenario", ["everything-on", "gateway-disabled"])
def test_helm_lint_strict_passes_with_features(helm: Any, scenario: str) -> None:
    result = helm("lint", "--strict", str(CHART), *SCENARIOS[scenario])
    assert result.returncode == 0, result.stdout + result.stderr


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "costwarden"
    assert chart["version"] == "0.1.0"
    assert chart["appVersion"] == "0.1.0"
    assert chart["kubeVersion"] == ">=1.29.0-0"


def test_kube_version_below_1_29_is_refused(helm: Any) -> None:
    result = helm("template", RELEASE, str(CHART), "--kube-version", "1.28.0")
    assert result.returncode != 0
    assert "kubeVersion" in result.stderr


def test_image_tag_defaults_to_app_version(helm: Any) -> None:
    objects = template(helm)
    image = deployment(objects, "operator")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "costwarden/costwarden:0.1.0"
    objects = template(helm, "--set", "image.digest=sha256:" + "a" * 64)
    image = deployment(objects, "gateway")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "costwarden/costwarden@sha256:" + "a" * 64


# ---------------------------------------------------------------------------------------
# price catalogue
# ---------------------------------------------------------------------------------------


def test_values_price_catalogue_equals_package_catalogue() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    package = yaml.safe_load(PACKAGE_PRICES.read_text())
    assert values["priceCatalog"]["models"] == package["models"]
    # Equal as validated models too (same amounts, same defaults).
    assert PriceCatalog.model_validate(values["priceCatalog"]) == default_catalog()


def test_rendered_prices_config_map_is_the_catalogue(helm: Any) -> None:
    objects = template(helm)
    config_map = named(objects, "ConfigMap", f"{RELEASE}-costwarden-prices")
    rendered = yaml.safe_load(config_map["data"]["prices.yaml"])
    assert rendered["models"] == yaml.safe_load(PACKAGE_PRICES.read_text())["models"]
    assert PriceCatalog.model_validate(rendered) == default_catalog()


def test_operator_mounts_prices_where_its_flag_points(helm: Any) -> None:
    objects = template(helm)
    pod = deployment(objects, "operator")["spec"]["template"]["spec"]
    path = Path(flag(container_args(objects, "operator"), "--price-catalog"))
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["prices"] == str(path.parent)
    assert volumes["prices"]["configMap"]["name"] == f"{RELEASE}-costwarden-prices"
    assert path.name == "prices.yaml"


def test_price_change_rolls_the_operator(helm: Any) -> None:
    def checksum(*args: str) -> str:
        operator = deployment(template(helm, *args), "operator")
        annotation: str = operator["spec"]["template"]["metadata"]["annotations"]["checksum/prices"]
        return annotation

    before = checksum()
    assert len(before) == 64
    assert checksum() == before
    assert checksum("--set-string", "priceCatalog.models.gpt-4o.inputPerMTokUSD=3.00") != before


# ---------------------------------------------------------------------------------------
# every scenario: hardened pods, labels, least-privilege RBAC
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_pods_are_hardened(helm: Any, scenario: str) -> None:
    objects = template(helm, *SCENARIOS[scenario])
    deployments = of_kind(objects, "Deployment")
    assert deployments
    for dep in deployments:
        name = dep["metadata"]["name"]
        pod = dep["spec"]["template"]["spec"]
        pod_sc = pod["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, name
        assert pod_sc["runAsUser"] == 65532, name
        assert pod_sc["fsGroup"] == 65532, name
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is True, f"{name} talks to the API server"
        tmp_volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name}/{container['name']}"
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged", False) is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc["capabilities"].get("add"), where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), where
            assert {"cpu", "memory"} <= set(resources["limits"]), where
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", where
            assert container["readinessProbe"]["httpGet"], where
            tmp_mounts = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp_mounts) == 1, where
            assert tmp_mounts[0]["name"] in tmp_volumes, where
            # Every named probe port is a declared container port.
            ports = {p["name"] for p in container["ports"]}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in container:
                    assert container[probe]["httpGet"]["port"] in ports, where


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_object_has_standard_labels(helm: Any, scenario: str) -> None:
    for obj in template(helm, *SCENARIOS[scenario]):
        labels = obj["metadata"].get("labels", {})
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        for key in STANDARD_LABELS:
            assert key in labels, f"{where} lacks {key}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        if obj["kind"] in ("Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget"):
            assert labels["app.kubernetes.io/component"] in ("operator", "gateway"), where
        if obj["kind"] == "Deployment":
            pod_labels = obj["spec"]["template"]["metadata"]["labels"]
            selector = obj["spec"]["selector"]["matchLabels"]
            assert selector.items() <= pod_labels.items(), where
            assert "app.kubernetes.io/version" not in selector, "selectors are immutable"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_namespaced_objects_live_in_the_release_namespace(helm: Any, scenario: str) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    for obj in template(helm, *SCENARIOS[scenario]):
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rbac_has_no_wildcards_and_secrets_only_in_a_role(helm: Any, scenario: str) -> None:
    objects = template(helm, *SCENARIOS[scenario])
    for role in of_kind(objects, "ClusterRole") + of_kind(objects, "Role"):
        for rule in rules_of(role):
            for field in ("verbs", "resources", "apiGroups"):
                assert "*" not in rule.get(field, []), f"{role['metadata']['name']}: {rule}"
            assert "nonResourceURLs" not in rule
            if role["kind"] == "ClusterRole":
                assert "secrets" not in rule["resources"], "no cluster-wide Secret access"
                if "configmaps" in rule["resources"]:  # sidecar config copies: one name or create
                    assert rule.get("resourceNames") == ["costwarden-sidecar-config"] or rule[
                        "verbs"
                    ] == ["create"], "ConfigMaps only in a Role, but for the sidecar's copies"
    for binding in of_kind(objects, "ClusterRoleBinding") + of_kind(objects, "RoleBinding"):
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount"
            assert subject["namespace"] == NAMESPACE
        assert binding["roleRef"]["name"] != "cluster-admin"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_role_bindings_point_at_the_roles_and_accounts_rendered(helm: Any, scenario: str) -> None:
    objects = template(helm, *SCENARIOS[scenario])
    accounts = {sa["metadata"]["name"] for sa in of_kind(objects, "ServiceAccount")}
    for kind in ("ClusterRole", "Role"):
        roles = {role["metadata"]["name"] for role in of_kind(objects, kind)}
        for binding in of_kind(objects, f"{kind}Binding"):
            assert binding["roleRef"]["kind"] == kind
            assert binding["roleRef"]["name"] in roles
            assert {s["name"] for s in binding["subjects"]} <= accounts
    for dep in of_kind(objects, "Deployment"):
        assert dep["spec"]["template"]["spec"]["serviceAccountName"] in accounts
    for sa in of_kind(objects, "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False, "tokens are mounted per pod"


def gateway_cluster_role(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return named(objects, "ClusterRole", f"{NAMESPACE}-{RELEASE}-costwarden-gateway")


def operator_cluster_role(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return named(objects, "ClusterRole", f"{NAMESPACE}-{RELEASE}-costwarden-operator")


def operator_role(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return named(objects, "Role", f"{RELEASE}-costwarden-operator")


def grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules_of(role)
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@pytest.mark.parametrize("scenario", ["defaults", "everything-on"])
def test_gateway_cluster_role_is_tokenreviews_and_pods_only(helm: Any, scenario: str) -> None:
    role = gateway_cluster_role(template(helm, *SCENARIOS[scenario]))
    # tokenreview.py reads one pod by name (read_namespaced_pod): get, never list or watch.
    assert grants(role) == {
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("", "pods", "get"),
    }
    assert not [r for r in of_kind(template(helm), "Role") if "gateway" in r["metadata"]["name"]]


def test_operator_cluster_role_grants_what_the_operator_needs(helm: Any) -> None:
    granted = grants(operator_cluster_role(template(helm)))
    needed = {
        *(("costwarden.io", kind, verb) for kind in ("teambudgets", "routingpolicies")
          for verb in ("get", "list", "watch", "patch")),
        *(("costwarden.io", f"{kind}/status", verb) for kind in ("teambudgets", "routingpolicies")
          for verb in ("get", "patch", "update")),
        *(("kopf.dev", "clusterkopfpeerings", verb) for verb in ("get", "list", "watch", "patch")),
        ("", "events", "create"),
        ("events.k8s.io", "events", "create"),
        *(("batch", "jobs", verb) for verb in ("get", "list", "watch", "patch", "delete")),
        *(("", "pods", verb) for verb in ("get", "list", "watch")),
        *(("", "namespaces", verb) for verb in ("get", "list", "watch")),  # consent (tenancy)
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }  # fmt: skip
    assert needed <= granted, needed - granted
    # Consent lives on Namespaces because only cluster admins write them: never the operator.
    assert not {g for g in granted if g[1] == "namespaces"} - {
        ("", "namespaces", verb) for verb in ("get", "list", "watch")
    }
    # Nothing that could escalate: no create/delete of the operator's own kinds, no RBAC.
    assert not {g for g in granted if g[0] == "rbac.authorization.k8s.io"}
    assert ("costwarden.io", "teambudgets", "delete") not in granted
    assert not {g for g in granted if g[0] == "admissionregistration.k8s.io"}, "webhook is off"


def unnamed(role: dict[str, Any]) -> dict[str, Any]:
    """The role without its rules limited to resourceNames."""
    return {**role, "rules": [r for r in rules_of(role) if not r.get("resourceNames")]}


def test_operator_role_holds_config_maps_and_only_its_provider_keys_secret(helm: Any) -> None:
    role = operator_role(template(helm))
    granted = grants(role)
    for verb in ("get", "list", "watch", "create", "update", "patch"):
        assert ("", "configmaps", verb) in granted
    assert ("", "configmaps", "delete") not in granted
    # Secrets: create (cannot be limited by name), the rest only on the mirror it owns.
    assert {g for g in grants(unnamed(role)) if g[1] == "secrets"} == {("", "secrets", "create")}
    named_secrets = [r for r in rules_of(role) if r.get("resourceNames")]
    assert named_secrets == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": [f"{RELEASE}-costwarden-provider-keys"],
            "verbs": ["get", "update", "patch"],
        }
    ]
    assert not of_kind(template(helm), "RoleBinding")[1:], "no Secret access elsewhere"


def test_api_keys_grant_secrets_in_the_release_namespace_only(helm: Any) -> None:
    objects = template(helm, "--set", "apiKeys.enabled=true")
    secrets = {g for g in grants(unnamed(operator_role(objects))) if g[1] == "secrets"}
    assert secrets == {("", "secrets", v) for v in ("get", "list", "create", "delete")}
    assert not {g for g in grants(operator_cluster_role(objects)) if g[1] == "secrets"}


def test_results_secrets_are_mounted_files_the_operator_reads(helm: Any) -> None:
    assert not any("results" in a for a in container_args(template(helm), "operator"))
    objects = template(
        helm, "--set", "results.githubWebhookSecret.name=gh-hook,results.tokenSecret.name=ci"
    )
    args = container_args(objects, "operator")
    webhook = flag(args, "--github-webhook-secret-file")
    token = flag(args, "--results-token-file")
    assert webhook == "/etc/costwarden/results-webhook/webhook-secret"
    assert token == "/etc/costwarden/results-token/token"
    pod = deployment(objects, "operator")["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"results-webhook": "gh-hook", "results-token": "ci"}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert webhook.startswith(mounts["results-webhook"] + "/")
    assert token.startswith(mounts["results-token"] + "/")


def provider_key_roles(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    name = f"{RELEASE}-costwarden-operator-provider-keys"
    return {
        r["metadata"]["namespace"]: r for r in of_kind(objects, "Role")
        if r["metadata"]["name"] == name
    }  # fmt: skip


def test_provider_key_namespaces_get_a_role_with_get_on_secrets_only(helm: Any) -> None:
    objects = template(helm, "--set", "providerKeys.namespaces={ai-platform,team-a}")
    roles = provider_key_roles(objects)
    assert sorted(roles) == ["ai-platform", "team-a"]
    for role in roles.values():
        assert grants(role) == {("", "secrets", "get")}, "get by name: no list, no watch"
    bindings = {
        b["metadata"]["namespace"]: b for b in of_kind(objects, "RoleBinding")
        if b["metadata"]["name"] == f"{RELEASE}-costwarden-operator-provider-keys"
    }  # fmt: skip
    assert sorted(bindings) == ["ai-platform", "team-a"]
    for binding in bindings.values():
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": f"{RELEASE}-costwarden-operator",
             "namespace": NAMESPACE}
        ]  # fmt: skip
    assert not [c for c in of_kind(objects, "ClusterRole") if "secrets" in str(rules_of(c))], (
        "no cluster-wide Secret access unless asked"
    )


def test_provider_keys_cluster_wide_is_one_cluster_role(helm: Any) -> None:
    objects = template(
        helm, "--set", "providerKeys.clusterWide=true,providerKeys.namespaces={ai-platform}"
    )
    assert provider_key_roles(objects) == {}
    role = named(objects, "ClusterRole", f"{NAMESPACE}-{RELEASE}-costwarden-operator-provider-keys")
    assert grants(role) == {("", "secrets", "get")}
    binding = named(
        objects, "ClusterRoleBinding", f"{NAMESPACE}-{RELEASE}-costwarden-operator-provider-keys"
    )
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_without_the_gateway_nothing_is_mirrored(helm: Any) -> None:
    objects = template(helm, "--set", "gateway.enabled=false,providerKeys.namespaces={ai-platform}")
    assert provider_key_roles(objects) == {}
    assert not [a for a in container_args(objects, "operator") if "provider-keys" in a]
    assert not {g for g in grants(operator_role(objects)) if g[1] == "secrets"}


def test_the_removed_credentials_secret_value_is_refused(helm: Any) -> None:
    result = helm(
        "template", RELEASE, str(CHART), "--set", "gateway.credentials.secretName=keys"
    )  # fmt: skip
    assert result.returncode != 0
    assert "credentials" in result.stderr


def test_webhook_rbac_is_limited_to_its_configuration(helm: Any) -> None:
    objects = template(helm, "--set", "webhook.enabled=true")
    webhook_rules = [
        rule
        for rule in rules_of(operator_cluster_role(objects))
        if "admissionregistration.k8s.io" in rule["apiGroups"]
    ]
    assert all(rule["resources"] == ["mutatingwebhookconfigurations"] for rule in webhook_rules)
    named_rules = [rule for rule in webhook_rules if rule.get("resourceNames")]
    unnamed_verbs = {
        v for rule in webhook_rules if not rule.get("resourceNames") for v in rule["verbs"]
    }
    assert unnamed_verbs == {"create"}, "only create cannot be limited by name"
    assert {v for rule in named_rules for v in rule["verbs"]} >= {"get", "patch"}
    assert named_rules[0]["resourceNames"] == ["sidecar-injector.costwarden.io"]


# ---------------------------------------------------------------------------------------
# wiring between objects
# ---------------------------------------------------------------------------------------


def test_peering_object_matches_the_operator_flag(helm: Any) -> None:
    objects = template(helm)
    peering = named(objects, "ClusterKopfPeering", f"{RELEASE}-costwarden")
    assert peering["apiVersion"] == "kopf.dev/v1"
    assert flag(container_args(objects, "operator"), "--peering-name") == f"{RELEASE}-costwarden"


def test_peering_disabled_runs_standalone(helm: Any) -> None:
    objects = template(helm, "--set", "operator.peering.enabled=false")
    assert not of_kind(objects, "ClusterKopfPeering")
    args = container_args(objects, "operator")
    assert "--standalone" in args
    assert not [a for a in args if a.startswith("--peering-name")]


def test_several_replicas_without_peering_are_refused(helm: Any) -> None:
    result = helm(
        "template", RELEASE, str(CHART),
        "--set", "operator.replicas=2,operator.peering.enabled=false",
    )  # fmt: skip
    assert result.returncode != 0
    assert "operator.peering.enabled" in result.stderr


def test_release_named_costwarden_uses_the_documented_names(helm: Any) -> None:
    result = helm("template", "costwarden", str(CHART), "--namespace", NAMESPACE)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    args = named(objects, "Deployment", "costwarden-operator")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert flag(args, "--config-map") == "costwarden-gateway-config"
    assert flag(args, "--peering-name") == "costwarden"
    named(objects, "Service", "costwarden-gateway")


def test_gateway_reads_the_config_map_the_operator_writes(helm: Any) -> None:
    objects = template(helm)
    config_map = flag(container_args(objects, "operator"), "--config-map")
    gateway_args = container_args(objects, "gateway")
    config_path = Path(flag(gateway_args, "--config"))
    assert config_path.name == CONFIG_MAP_KEY
    pod = deployment(objects, "gateway")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["gateway-config"]["mountPath"] == str(config_path.parent)
    assert volumes["gateway-config"]["configMap"] == {"name": config_map, "optional": True}
    assert mounts["credentials"]["mountPath"] == flag(gateway_args, "--credentials-dir")
    assert volumes["credentials"]["secret"]["optional"] is True


def test_the_gateway_reads_the_provider_keys_the_operator_writes(helm: Any, tmp_path: Path) -> None:
    """The Secret the operator mirrors into is the one the gateway mounts at its
    --credentials-dir, each data key a file (no ``items``), and the file name the gateway
    reads is the data key the operator writes: one function names both."""
    objects = template(helm)
    secret = flag(container_args(objects, "operator"), "--provider-keys-secret")
    assert secret == f"{RELEASE}-costwarden-provider-keys"
    gateway_args = container_args(objects, "gateway")
    pod = deployment(objects, "gateway")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    mount = mounts[flag(gateway_args, "--credentials-dir")]
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
    assert volume["secret"]["secretName"] == secret
    assert "items" not in volume["secret"], "each data key must be its own file"
    assert mount.get("subPath") is None, "a subPath mount would never see rotation"

    ref = CredentialRef(namespace="ai-platform", name="openai-credentials", key="api-key")
    config = sample_config("http://upstream")
    config.policies[0].models[0].credentials = ref
    read = SecretRead(Access.FOUND, {"api-key": base64.b64encode(b"sk-mirrored").decode()})
    plan = plan_mirror(config, {("ai-platform", "openai-credentials"): read})
    # Materialise the mirrored Secret as the kubelet does: one file per data key.
    for key, value in plan.data.items():
        (tmp_path / key).write_bytes(base64.b64decode(value))
    assert Credentials(tmp_path).api_key(ref) == "sk-mirrored"
    assert flag(gateway_args, "--mode") == "shared"


def test_the_gateway_reports_over_https_to_the_operator_it_verifies(helm: Any) -> None:
    objects = template(helm, *EVERYTHING_ON)
    operator = container_args(objects, "operator")
    gateway = container_args(objects, "gateway")
    url = flag(gateway, "--report-to")
    assert url.startswith(f"https://{RELEASE}-costwarden-operator-ingest.{NAMESPACE}.svc:")
    assert flag(operator, "--sidecar-report-to") == url
    # The certificate names the Service the URL uses; the CA is published where the
    # gateway mounts it.
    hostnames = [a.split("=", 1)[1] for a in operator if a.startswith("--ingest-tls-hostname=")]
    assert url.split("//")[1].split(":")[0] in hostnames
    pod = deployment(objects, "gateway")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    ca_file = Path(flag(gateway, "--report-ca-file"))
    assert mounts["ingest-ca"] == str(ca_file.parent)
    ca_map = flag(operator, "--ingest-ca-configmap")
    assert volumes["ingest-ca"]["configMap"] == {"name": ca_map, "optional": True}
    # The token it presents is minted for the operator's audience only.
    token = Path(flag(gateway, "--report-token-file"))
    assert mounts["report-token"] == str(token.parent)
    source = volumes["report-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert (source["audience"], source["path"]) == ("costwarden.io/ingest", token.name)


def test_gateway_callers_and_metrics(helm: Any) -> None:
    objects = template(helm, *EVERYTHING_ON)
    gateway = container_args(objects, "gateway")
    assert flag(gateway, "--token-audience") == "costwarden.io/gateway"
    metrics_port = int(flag(gateway, "--metrics-port"))
    assert metrics_port != int(flag(gateway, "--port"))
    service = named(objects, "Service", f"{RELEASE}-costwarden-gateway")
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"], "no metrics on the API"
    scrape = named(objects, "Service", f"{RELEASE}-costwarden-gateway-metrics")
    assert scrape["spec"]["ports"][0]["port"] == metrics_port
    monitor = named(objects, "ServiceMonitor", f"{RELEASE}-costwarden-gateway")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


def test_services_target_declared_ports(helm: Any) -> None:
    objects = template(helm, *EVERYTHING_ON)
    for service in of_kind(objects, "Service"):
        selector = service["spec"]["selector"]
        backends = [
            dep
            for dep in of_kind(objects, "Deployment")
            if selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(backends) == 1, service["metadata"]["name"]
        ports = {
            p["name"] for p in backends[0]["spec"]["template"]["spec"]["containers"][0]["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, service["metadata"]["name"]
    gateway = named(objects, "Service", f"{RELEASE}-costwarden-gateway")
    assert gateway["spec"]["ports"][0]["port"] == 8000


def test_operator_env_comes_from_the_downward_api(helm: Any) -> None:
    container = deployment(template(helm), "operator")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env["POD_NAMESPACE"] == "metadata.namespace"
    assert env["POD_NAME"] == "metadata.name"
    assert "--namespace=$(POD_NAMESPACE)" in container["args"]


def test_gateway_disabled_renders_no_gateway_objects(helm: Any) -> None:
    objects = template(helm, "--set", "gateway.enabled=false")
    assert not [o for o in objects if o["metadata"]["name"].endswith("-gateway")]
    assert of_kind(objects, "Deployment") == [deployment(objects, "operator")]


def test_disruption_budgets_only_for_several_replicas(helm: Any) -> None:
    defaults = of_kind(template(helm), "PodDisruptionBudget")
    assert [p["metadata"]["name"] for p in defaults] == [f"{RELEASE}-costwarden-gateway"]
    single = template(helm, "--set", "gateway.replicas=1")
    assert not of_kind(single, "PodDisruptionBudget")
    both = template(helm, "--set", "operator.replicas=2")
    assert len(of_kind(both, "PodDisruptionBudget")) == 2


def test_service_monitor_needs_the_api_or_force(helm: Any) -> None:
    assert not of_kind(template(helm), "ServiceMonitor")
    enabled = ("--set", "metrics.serviceMonitor.enabled=true")
    assert not of_kind(template(helm, *enabled), "ServiceMonitor"), "no API, not forced"
    with_api = template(helm, *enabled, "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
    forced = template(helm, *enabled, "--set", "metrics.serviceMonitor.force=true")
    for objects in (with_api, forced):
        monitors = of_kind(objects, "ServiceMonitor")
        assert {m["metadata"]["name"] for m in monitors} == {
            f"{RELEASE}-costwarden-operator",
            f"{RELEASE}-costwarden-gateway",
        }
        for monitor in monitors:
            assert monitor["spec"]["endpoints"][0]["interval"] == "30s"
    labelled = template(
        helm, *enabled, "--set", "metrics.serviceMonitor.force=true",
        "--set", "metrics.serviceMonitor.labels.release=prometheus",
    )  # fmt: skip
    assert all(
        m["metadata"]["labels"]["release"] == "prometheus"
        for m in of_kind(labelled, "ServiceMonitor")
    )


def test_webhook_exposes_the_admission_server(helm: Any) -> None:
    objects = template(helm, "--set", "webhook.enabled=true")
    service = named(objects, "Service", f"{RELEASE}-costwarden-webhook")
    assert service["spec"]["ports"][0]["port"] == 443
    args = container_args(objects, "operator")
    assert flag(args, "--webhook-failure-policy") == "Ignore"
    assert flag(args, "--webhook-host") == f"{RELEASE}-costwarden-webhook.{NAMESPACE}.svc"
    assert not of_kind(template(helm), "MutatingWebhookConfiguration"), "Kopf manages it"


def test_notes_tell_how_to_use_it(helm: Any) -> None:
    result = helm(
        "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl get costwarden -A" in notes
    svc = f"{RELEASE}-costwarden-gateway.{NAMESPACE}"
    assert f"OPENAI_BASE_URL=http://{svc}:8000/v1" in notes
    assert f"ANTHROPIC_BASE_URL=http://{svc}:8000\n" in notes
    assert f"deployment/{RELEASE}-costwarden-operator" in notes


# ---------------------------------------------------------------------------------------
# values.schema.json
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "gateway.replicas=abc"), "/gateway/replicas"),
        (("--set", "operator.replicas=-1"), "/operator/replicas"),
        (("--set", "gateway.enabled=maybe"), "/gateway/enabled"),
        (("--set", "operator.logLevel=loud"), "/operator/logLevel"),
        (("--set", "gateway.service.type=External"), "/gateway/service/type"),
        (("--set", "gateway.service.port=70000"), "/gateway/service/port"),
        (("--set", "webhook.failurePolicy=Sometimes"), "/webhook/failurePolicy"),
        (("--set", "image.pullPolicy=Sometimes"), "/image/pullPolicy"),
        (("--set", "metrics.serviceMonitor.interval=often"), "/metrics/serviceMonitor/interval"),
        (("--set", "operator.resources.limits.memory=lots"), "/operator/resources/limits/memory"),
        (("--set", "operatr.replicas=1"), "operatr"),
        (("--set", "gateway.replica=1"), "replica"),
        (("--set-json", 'priceCatalog.models.m={"inputPerMTokUSD":1.5,"outputPerMTokUSD":"1"}'),
         "/priceCatalog/models/m/inputPerMTokUSD"),
        (("--set-string", "priceCatalog.models.m.inputPerMTokUSD=-1"),
         "/priceCatalog/models/m"),
        (("--set-json", 'priceCatalog.models.m={"inputPerMTokUSD":"1"}'), "outputPerMTokUSD"),
    ],
)  # fmt: skip
def test_schema_rejects_bad_values(helm: Any, args: tuple[str, ...], message: str) -> None:
    result = helm("template", RELEASE, str(CHART), *args)
    assert result.returncode != 0, f"{args} was accepted"
    assert "schema" in result.stderr
    assert message in result.stderr, result.stderr


def test_schema_accepts_a_custom_model_price(helm: Any) -> None:
    objects = template(
        helm, "--set-json",
        'priceCatalog.models.llama-3-70b={"inputPerMTokUSD":"0.59","outputPerMTokUSD":0}',
    )  # fmt: skip
    config_map = named(objects, "ConfigMap", f"{RELEASE}-costwarden-prices")
    catalog = PriceCatalog.model_validate(yaml.safe_load(config_map["data"]["prices.yaml"]))
    assert str(catalog.models["llama-3-70b"].input_per_m_tok_usd) == "0.59"
    assert "gpt-4o" in catalog.models


def test_schema_covers_every_default_value() -> None:
    """Every leaf of values.yaml is described by values.schema.json (no untyped values)."""
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
        return node

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        node = resolve(node)
        assert node, f"{path} has no schema"
        assert "type" in node or "anyOf" in node, f"{path} has no type"
        if isinstance(value, dict) and node.get("type") == "object":
            for key, child in value.items():
                if key in node.get("properties", {}):
                    walk(child, node["properties"][key], f"{path}.{key}")
                else:
                    extra = node.get("additionalProperties")
                    assert isinstance(extra, dict), f"{path}.{key} is not in the schema"
                    walk(child, extra, f"{path}.{key}")

    walk(values, schema, "values")
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"


# ---------------------------------------------------------------------------------------
# CRDs
# ---------------------------------------------------------------------------------------


def test_chart_crds_equal_the_generated_crds() -> None:
    crd_dir = CHART / "crds"
    for name, manifest in all_crds().items():
        path = crd_dir / name
        assert path.exists(), f"{path} missing: run python -m costwarden.api.crd --write"
        assert yaml.safe_load(path.read_text()) == manifest, f"{name} drifted; regenerate it"


def test_chart_crds_are_costwarden_and_kopf_peering_only() -> None:
    from costwarden.controllers import leadership

    files = {path.name for path in (CHART / "crds").glob("*.yaml")}
    assert files == {*all_crds(), "kopf.dev_peerings.yaml"}
    peerings = list(yaml.safe_load_all((CHART / "crds" / "kopf.dev_peerings.yaml").read_text()))
    by_name = {crd["metadata"]["name"]: crd["spec"] for crd in peerings}
    assert set(by_name) == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    cluster = by_name["clusterkopfpeerings.kopf.dev"]
    assert cluster["scope"] == "Cluster"
    assert cluster["names"]["kind"] == "ClusterKopfPeering"
    # The group, version and plural the operator's leadership check reads.
    assert cluster["group"] == leadership.PEERING_GROUP
    assert cluster["names"]["plural"] == leadership.PEERING_PLURAL
    assert [v["name"] for v in cluster["versions"]] == [leadership.PEERING_VERSION]
    assert by_name["kopfpeerings.kopf.dev"]["scope"] == "Namespaced"
    for spec in by_name.values():
        status = spec["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status["x-kubernetes-preserve-unknown-fields"] is True
        assert "subresources" not in spec["versions"][0], "Kopf patches status on the object"


# ---------------------------------------------------------------------------------------
# contract with the `costwarden` CLI
# ---------------------------------------------------------------------------------------


def parse_cli(args: list[str]) -> Any:
    from costwarden.cli import build_parser

    return build_parser().parse_args([arg.replace("$(POD_NAMESPACE)", NAMESPACE) for arg in args])


@pytest.mark.parametrize("scenario", ["defaults", "gateway-disabled"])
def test_operator_command_line_is_accepted_by_the_cli(helm: Any, scenario: str) -> None:
    objects = template(helm, *SCENARIOS[scenario], "--set", "operator.logLevel=debug")
    parsed = parse_cli(container_args(objects, "operator"))
    assert parsed.namespace == NAMESPACE
    assert parsed.metrics_port == 9090
    assert parsed.health_port == 8080
    assert parsed.peering_name == f"{RELEASE}-costwarden"
    assert parsed.config_map == f"{RELEASE}-costwarden-gateway-config"
    assert str(parsed.price_catalog) == "/etc/costwarden/prices/prices.yaml"
    assert parsed.verbose is True


def test_standalone_command_line_is_accepted_by_the_cli(helm: Any) -> None:
    objects = template(helm, "--set", "operator.peering.enabled=false")
    assert parse_cli(container_args(objects, "operator")).standalone is True


def test_webhook_flags_are_accepted_by_the_cli(helm: Any) -> None:
    objects = template(helm, "--set", "webhook.enabled=true")
    parsed = parse_cli(container_args(objects, "operator"))
    assert parsed.webhook_port == 9443
    assert parsed.webhook_configuration == "sidecar-injector.costwarden.io"
    assert parsed.webhook_failure_policy == "Ignore"
    assert parsed.sidecar_image.startswith("costwarden/costwarden:")
    # Sidecars report usage to the operator's ingestion Service, each for its own pod.
    assert parsed.ingest_allow_sidecars
    assert parsed.sidecar_report_to.endswith(f".svc:{parsed.ingest_port}")


def test_optional_feature_flags_are_accepted_by_the_cli(helm: Any) -> None:
    objects = template(helm, "--set", "webhook.enabled=true,apiKeys.enabled=true")
    try:
        parse_cli(container_args(objects, "operator"))
    except SystemExit as refused:
        raise AssertionError(f"the CLI refused the chart's flags (exit {refused.code})") from None


def test_gateway_command_line_is_accepted_by_the_cli(helm: Any) -> None:
    parsed = parse_cli(container_args(template(helm), "gateway"))
    assert parsed.port == 8000
    assert parsed.in_cluster, "shared mode reviews callers' tokens with the pod's account"
    options = "apiKeys.enabled=true,gateway.logLevel=debug"
    parsed = parse_cli(container_args(template(helm, "--set", options), "gateway"))
    assert str(parsed.api_keys_file) == "/etc/costwarden/api-keys/api-keys.yaml"


def test_liveness_bound_and_ledger_bound_reach_the_command_lines(helm: Any) -> None:
    """The defaults are the CLIs' own; a value set reaches the flag, in full digits."""
    objects = template(helm)
    assert flag(container_args(objects, "gateway"), "--ledger-max-bytes") == str(48 * 2**20)
    for component in ("operator", "gateway"):
        assert flag(container_args(objects, component), "--liveness-task-failure-seconds") in (
            "180", "180.0"
        )  # fmt: skip
    objects = template(
        helm, "--set", "gateway.ledger.maxBytes=33554432,gateway.livenessTaskFailureSeconds=90",
        "--set", "operator.livenessTaskFailureSeconds=600",
    )  # fmt: skip
    gateway_args = container_args(objects, "gateway")
    assert flag(gateway_args, "--ledger-max-bytes") == "33554432"
    assert flag(gateway_args, "--liveness-task-failure-seconds") == "90"
    assert flag(container_args(objects, "operator"), "--liveness-task-failure-seconds") == "600"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "gateway.ledger.maxBytes=1000"), "/gateway/ledger/maxBytes"),
        (("--set", "gateway.ledger.maxBytes=100000000"), "/gateway/ledger/maxBytes"),
        (("--set", "operator.livenessTaskFailureSeconds=0"), "livenessTaskFailureSeconds"),
        (("--set", "gateway.livenessTaskFailureSeconds=soon"), "livenessTaskFailureSeconds"),
    ],
)  # fmt: skip
def test_schema_bounds_the_liveness_and_ledger_values(
    helm: Any, args: tuple[str, ...], message: str
) -> None:
    result = helm("template", RELEASE, str(CHART), *args)
    assert result.returncode != 0, f"{args} was accepted"
    assert message in result.stderr, result.stderr


def test_gateway_otel_is_off_by_default_and_an_endpoint_reaches_the_flag(helm: Any) -> None:
    args = container_args(template(helm), "gateway")
    assert not any(a.startswith("--otel") for a in args)
    endpoint = "http://otel-collector.observability:4318"
    args = container_args(template(helm, "--set", f"gateway.otel.endpoint={endpoint}"), "gateway")
    assert flag(args, "--otel-endpoint") == endpoint
    parsed = parse_cli(args)
    assert (parsed.otel_endpoint, parsed.otel_metrics) == (endpoint, False)
    objects = template(
        helm, "--set", f"gateway.otel.endpoint={endpoint}", "--set", "gateway.otel.metrics=true"
    )
    assert parse_cli(container_args(objects, "gateway")).otel_metrics is True
    result = helm("template", RELEASE, str(CHART), "--set", "gateway.otel.endpoint=collector:4318")
    assert result.returncode != 0
    assert "/gateway/otel/endpoint" in result.stderr, result.stderr


def test_usage_store_is_off_by_default_and_mounts_a_claim_when_named(helm: Any) -> None:
    args = container_args(template(helm), "operator")
    assert not any(a.startswith("--store-dir") for a in args)
    objects = template(
        helm, "--set", "operator.store.enabled=true", "--set", "operator.store.existingClaim=usage"
    )
    assert flag(container_args(objects, "operator"), "--store-dir") == "/var/lib/costwarden/store"
    spec = deployment(objects, "operator")["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "costwarden-store")
    assert volume["persistentVolumeClaim"] == {"claimName": "usage"}
    mounts = spec["containers"][0]["volumeMounts"]
    assert {"name": "costwarden-store", "mountPath": "/var/lib/costwarden/store"} in mounts
    scratch = template(helm, "--set", "operator.store.enabled=true")
    spec = deployment(scratch, "operator")["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "costwarden-store")
    assert volume["emptyDir"] == {"sizeLimit": "1Gi"}


def test_usage_store_in_a_bucket_needs_no_volume(helm: Any) -> None:
    objects = template(
        helm, "--set", "operator.store.enabled=true",
        "--set", "operator.store.bucket=s3://usage/costwarden",
    )  # fmt: skip
    assert flag(container_args(objects, "operator"), "--store-dir") == "s3://usage/costwarden"
    spec = deployment(objects, "operator")["spec"]["template"]["spec"]
    assert all(v["name"] != "costwarden-store" for v in spec["volumes"])
