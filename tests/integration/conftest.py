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
    control_plane.kubectl("apply", "-f", str(REPO / "crds"))
    names = ["teambudgets.costwarden.io", "routingpolicies.costwarden.io"]
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        *[f"crd/{name}" for name in names],
    )  # fmt: skip
    return names
