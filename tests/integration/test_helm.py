"""`helm install` of the chart into the real test control plane, then `helm uninstall`.

No kubelet runs, so the pods stay unscheduled; what is checked is what the API server
accepts and stores: the objects, the CRDs, and RBAC as the authorizer evaluates it.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from costwarden.api.catalog import PriceCatalog, default_catalog
from costwarden.cluster import LocalControlPlane

T = TypeVar("T")

CHART = Path(__file__).resolve().parents[2] / "charts" / "costwarden"
DEADLINE_SECONDS = 60.0


def eventually(probe: Callable[[], T | None], what: str, timeout: float = DEADLINE_SECONDS) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)  # poll interval; the deadline bounds the wait
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


class Release:
    """One installed release of the chart."""

    def __init__(self, plane: LocalControlPlane, namespace: str, *values: str) -> None:
        self.plane = plane
        self.namespace = namespace
        self.name = f"cw-{secrets.token_hex(3)}"
        self.fullname = f"{self.name}-costwarden"
        self.values = values
        self.installed = False

    def install(self) -> None:
        self.plane.helm(
            "install", self.name, str(CHART), "--namespace", self.namespace, *self.values,
        )  # fmt: skip
        self.installed = True

    def uninstall(self) -> None:
        if self.installed:
            self.plane.helm("uninstall", self.name, "--namespace", self.namespace)
            self.installed = False

    def get(self, kind: str, name: str, *, namespaced: bool = True) -> dict[str, Any] | None:
        scope = ["--namespace", self.namespace] if namespaced else []
        result = self.plane.kubectl("get", kind, name, *scope, "-o", "json", check=False)
        if result.returncode != 0:
            assert "NotFound" in result.stderr, result.stderr
            return None
        found: dict[str, Any] = json.loads(result.stdout)
        return found

    def can(self, account: str, verb: str, resource: str, namespace: str | None) -> bool:
        scope = ["--namespace", namespace] if namespace else []
        user = f"system:serviceaccount:{self.namespace}:{self.fullname}-{account}"
        result = self.plane.kubectl("auth", "can-i", verb, resource, "--as", user, *scope,
                                    check=False)  # fmt: skip
        answer = result.stdout.strip()
        assert answer in ("yes", "no"), result.stderr
        return answer == "yes"


@pytest.fixture
def release_factory(
    control_plane: LocalControlPlane, namespace: str
) -> Iterator[Callable[..., Release]]:
    releases: list[Release] = []

    def make(*values: str) -> Release:
        release = Release(control_plane, namespace, *values)
        releases.append(release)
        return release

    yield make
    for release in releases:
        release.uninstall()


def test_install_creates_the_release_and_uninstall_removes_it(
    release_factory: Callable[..., Release],
) -> None:
    release = release_factory()
    release.install()
    full = release.fullname

    for kind, name in [
        ("deployment", f"{full}-operator"),
        ("deployment", f"{full}-gateway"),
        ("serviceaccount", f"{full}-operator"),
        ("serviceaccount", f"{full}-gateway"),
        ("role", f"{full}-operator"),
        ("rolebinding", f"{full}-operator"),
        ("service", f"{full}-gateway"),
        ("service", f"{full}-operator-metrics"),
        ("configmap", f"{full}-prices"),
        ("poddisruptionbudget", f"{full}-gateway"),
    ]:
        assert release.get(kind, name), f"{kind}/{name} was not created"
    cluster_objects = [
        ("clusterrole", f"{release.namespace}-{full}-operator"),
        ("clusterrolebinding", f"{release.namespace}-{full}-operator"),
        ("clusterrole", f"{release.namespace}-{full}-gateway"),
        ("clusterrolebinding", f"{release.namespace}-{full}-gateway"),
        ("clusterkopfpeerings.kopf.dev", full),
    ]
    for kind, name in cluster_objects:
        assert release.get(kind, name, namespaced=False), f"{kind}/{name} was not created"

    operator = release.get("deployment", f"{full}-operator")
    assert operator
    container = operator["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "costwarden/costwarden:0.1.0"
    assert f"--peering-name={full}" in container["args"]

    prices = release.get("configmap", f"{full}-prices")
    assert prices
    catalog = PriceCatalog.model_validate(yaml.safe_load(prices["data"]["prices.yaml"]))
    assert catalog == default_catalog()

    for crd in ("teambudgets.costwarden.io", "routingpolicies.costwarden.io",
                "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"):  # fmt: skip
        found = release.get("crd", crd, namespaced=False)
        assert found, f"CRD {crd} missing"
        conditions = {c["type"]: c["status"] for c in found["status"]["conditions"]}
        assert conditions.get("Established") == "True", crd

    # The command NOTES.txt gives works (the CRDs' category).
    listing = release.plane.kubectl("get", "costwarden", "-A")
    assert listing.returncode == 0

    status = json.loads(
        release.plane.helm("status", release.name, "-n", release.namespace, "-o", "json").stdout
    )
    assert status["info"]["status"] == "deployed"

    release.uninstall()

    def gone() -> bool:
        namespaced = [
            ("deployment", f"{full}-operator"),
            ("configmap", f"{full}-prices"),
            ("serviceaccount", f"{full}-gateway"),
            ("role", f"{full}-operator"),
        ]
        return all(release.get(kind, name) is None for kind, name in namespaced) and all(
            release.get(kind, name, namespaced=False) is None for kind, name in cluster_objects
        )

    eventually(gone, "the release's objects to be deleted")
    # Helm never deletes CRDs from crds/ (that would delete every TeamBudget with them).
    assert release.get("crd", "teambudgets.costwarden.io", namespaced=False)


def test_rbac_as_the_api_server_evaluates_it(
    release_factory: Callable[..., Release], namespace: str
) -> None:
    release = release_factory()
    release.install()
    team_ns = "some-team"  # need not exist: can-i evaluates the rules only

    def can(account: str, verb: str, resource: str, ns: str | None = team_ns) -> bool:
        return release.can(account, verb, resource, ns)

    # The operator: its kinds and their status everywhere, Jobs to enforce on, peering.
    for verb, resource in [
        ("watch", "teambudgets.costwarden.io"),
        ("patch", "teambudgets.costwarden.io/status"),
        ("patch", "routingpolicies.costwarden.io/status"),
        ("patch", "jobs.batch"),
        ("delete", "jobs.batch"),
        ("list", "pods"),
        ("create", "events"),
        ("create", "events.events.k8s.io"),
    ]:
        assert can("operator", verb, resource), f"operator cannot {verb} {resource}"
    assert can("operator", "patch", "clusterkopfpeerings.kopf.dev", None)
    assert can("operator", "watch", "customresourcedefinitions.apiextensions.k8s.io", None)
    # Tenancy: the Namespaces' consent annotations, read-only (docs/security.md).
    for verb in ("get", "list", "watch"):
        assert can("operator", verb, "namespaces", None), f"operator cannot {verb} namespaces"
    for verb in ("patch", "update", "create", "delete"):
        assert not can("operator", verb, "namespaces", None), f"operator can {verb} namespaces"
    assert can("operator", "create", "configmaps", namespace)
    assert can("operator", "update", "configmaps", namespace)
    # ... and nothing more.
    assert not can("operator", "create", "configmaps")
    assert not can("operator", "get", "secrets")
    assert not can("operator", "get", "secrets", namespace), "apiKeys is off"
    assert not can("operator", "delete", "teambudgets.costwarden.io")
    assert not can("operator", "create", "pods")
    assert not can("operator", "create", "mutatingwebhookconfigurations", None), "webhook off"
    assert not can("operator", "create", "clusterroles", None)

    # The gateway: TokenReviews and one pod by name, nothing else.
    assert can("gateway", "create", "tokenreviews.authentication.k8s.io", None)
    assert can("gateway", "get", "pods")
    assert not can("gateway", "watch", "pods")
    assert not can("gateway", "list", "pods")
    for verb, resource in [
        ("get", "secrets"),
        ("get", "configmaps"),
        ("patch", "jobs.batch"),
        ("get", "teambudgets.costwarden.io"),
        ("create", "pods"),
    ]:
        assert not can("gateway", verb, resource), f"gateway can {verb} {resource}"
    assert not can("gateway", "get", "secrets", namespace)


def test_install_with_optional_features(
    release_factory: Callable[..., Release], namespace: str
) -> None:
    release = release_factory(
        "--set", "webhook.enabled=true,apiKeys.enabled=true,operator.replicas=2",
        # Enabled but the cluster has no Prometheus Operator: skipped, not an install error.
        "--set", "metrics.serviceMonitor.enabled=true",
    )  # fmt: skip
    release.install()
    full = release.fullname
    assert release.get("service", f"{full}-webhook")
    assert release.get("poddisruptionbudget", f"{full}-operator")
    assert release.can("operator", "create", "secrets", namespace)
    assert not release.can("operator", "create", "secrets", "some-team")
    # The operator finds the keys it issued by label and revokes a deleted team's key.
    assert release.can("operator", "list", "secrets", namespace)
    assert release.can("operator", "delete", "secrets", namespace)
    assert not release.can("operator", "update", "secrets", namespace), "keys are not edited"
    assert release.can("operator", "create", "mutatingwebhookconfigurations", None)


def test_provider_keys_cluster_wide_grants_get_on_secrets_everywhere_and_nothing_more(
    release_factory: Callable[..., Release], namespace: str
) -> None:
    release = release_factory("--set", "providerKeys.clusterWide=true")
    release.install()
    for ns in ("some-team", "kube-system"):
        assert release.can("operator", "get", "secrets", ns)
        assert not release.can("operator", "list", "secrets", ns), "get by name only"
        assert not release.can("operator", "update", "secrets", ns)
        assert not release.can("gateway", "get", "secrets", ns)
    mirror = f"secrets/{release.fullname}-provider-keys"
    assert release.can("operator", "update", mirror, namespace)
    assert not release.can("gateway", "get", mirror, namespace)


def test_install_without_the_gateway(release_factory: Callable[..., Release]) -> None:
    release = release_factory("--set", "gateway.enabled=false")
    release.install()
    full = release.fullname
    assert release.get("deployment", f"{full}-operator")
    assert release.get("deployment", f"{full}-gateway") is None
    assert (
        release.get("clusterrole", f"{release.namespace}-{full}-gateway", namespaced=False) is None
    )


def test_invalid_values_are_refused_before_anything_is_created(
    control_plane: LocalControlPlane, namespace: str
) -> None:
    result = control_plane.helm(
        "install", "cw-bad", str(CHART), "--namespace", namespace,
        "--set", "gateway.replicas=abc", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "/gateway/replicas" in result.stderr
    status = control_plane.helm("status", "cw-bad", "--namespace", namespace, check=False)
    assert status.returncode != 0
    assert "not found" in status.stderr
    deployments = control_plane.kubectl("get", "deployments", "-n", namespace, "-o", "name")
    assert deployments.stdout.strip() == ""
