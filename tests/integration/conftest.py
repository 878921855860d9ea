"""Integration fixtures: one real control plane (etcd + kube-apiserver +
kube-controller-manager) per test session, built from source on first use."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from costwarden.cluster import LocalControlPlane, ensure_control_plane_binaries
from tests.support.operator_process import OperatorProcess
from tests.support.polling import wait_for

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Hooks in a sub-directory conftest still see every collected item; mark only ours.
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


def pytest_collection_finish(session: pytest.Session) -> None:
    # Build here, outside any test: a cold build takes 4-8 minutes, which would otherwise be
    # charged to the first test's pytest-timeout budget (600s) and could trip it on a busy CI.
    if session.config.option.collectonly:
        return
    if any(_HERE in item.path.parents for item in session.items):
        ensure_control_plane_binaries()


@pytest.fixture(scope="session")
def control_plane() -> Iterator[LocalControlPlane]:
    # Never skipped for missing binaries: CI must build them (about 4 minutes cold).
    binaries = ensure_control_plane_binaries()
    with LocalControlPlane(binaries_dir=binaries, with_controller_manager=True) as plane:
        yield plane


@pytest.fixture(scope="session")
def kubeconfig(control_plane: LocalControlPlane) -> str:
    return str(control_plane.kubeconfig_path)


@pytest.fixture(scope="session")
def api_client(kubeconfig: str) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=kubeconfig)
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def namespace(api_client: client.ApiClient) -> Iterator[str]:
    name = f"cw-test-{secrets.token_hex(4)}"
    core = client.CoreV1Api(api_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:
                raise


REPO = _HERE.parents[1]


@pytest.fixture(scope="session")
def crds(control_plane: LocalControlPlane) -> list[str]:
    """costwarden's CRDs applied from crds/ and Established (names returned)."""
    control_plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    names = ["teambudgets.costwarden.io", "routingpolicies.costwarden.io"]
    for name in names:
        wait_for(
            lambda name=name: control_plane.kubectl(
                "get", f"crd/{name}", "-o",
                "jsonpath={.status.conditions[?(@.type=='Established')].status}", check=False,
            ).stdout == "True",
            timeout=60, what=f"CRD {name} Established",
        )  # fmt: skip
    # kubectl (apply's strict field validation, explain) reads the published OpenAPI, which
    # the API server refreshes asynchronously after a CRD is established.
    wait_for(
        lambda: "hardCapUSD" in control_plane.kubectl(
            "explain", "teambudget.spec", check=False
        ).stdout,
        timeout=60, what="TeamBudget in the published OpenAPI",
    )  # fmt: skip
    return names


OPERATOR_NAMESPACE = "costwarden-system"


@pytest.fixture(scope="session")
def operator(
    control_plane: LocalControlPlane, crds: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """One `costwarden operator` process (standalone) for the session, writing its gateway
    ConfigMap into costwarden-system; tests use their own namespaces."""
    control_plane.kubectl("create", "namespace", OPERATOR_NAMESPACE, check=False)
    log_path = tmp_path_factory.mktemp("operator") / "operator.log"
    process = OperatorProcess(
        str(control_plane.kubeconfig_path), OPERATOR_NAMESPACE, log_path, "--standalone"
    ).start()
    try:
        yield process
    finally:
        process.stop()
        if process.process and process.process.returncode not in (0, -15):
            print(process.logs())
