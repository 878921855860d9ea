"""`costwarden operator --api-keys`: a key per Ready team, only digests for the gateway."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from costwarden.cluster import LocalControlPlane
from costwarden.controllers.apikeys import (
    KEYS_CONFIG_MAP,
    KEYS_FILE_KEY,
    TEAM_ANNOTATION,
    key_digest,
)
from costwarden.gateway.identity import parse_api_keys
from tests.support.operator_process import OperatorProcess
from tests.support.polling import wait_for


@pytest.fixture
def keys_operator(
    control_plane: LocalControlPlane, crds, api_client: client.ApiClient, tmp_path: Path
) -> Iterator[str]:
    """An operator issuing keys into its own namespace (the session operator does not)."""
    home = f"cw-keys-{tmp_path.name[-8:].lower().replace('_', '-')}".strip("-")
    core = client.CoreV1Api(api_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=home)))
    process = OperatorProcess(
        str(control_plane.kubeconfig_path), home, tmp_path / "operator.log",
        "--standalone", "--api-keys", "--ingest-port", "0",
    ).start()  # fmt: skip
    yield home
    process.stop()
    core.delete_namespace(home)


def _issued(core: client.CoreV1Api, home: str, team: str) -> str | None:
    for secret in core.list_namespaced_secret(home, label_selector="costwarden.io/api-key").items:
        if (secret.metadata.annotations or {}).get(TEAM_ANNOTATION) == team:
            return base64.b64decode(secret.data["api-key"]).decode()
    return None


def _digests(core: client.CoreV1Api, home: str) -> str:
    try:
        return core.read_namespaced_config_map(KEYS_CONFIG_MAP, home).data[KEYS_FILE_KEY]
    except client.ApiException:
        return ""


def test_ready_teams_get_a_key_and_gateways_only_its_digest(
    keys_operator: str, api_client: client.ApiClient, namespace: str
):
    core = client.CoreV1Api(api_client)
    client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        "costwarden.io", "v1alpha1", namespace, "teambudgets",
        {"apiVersion": "costwarden.io/v1alpha1", "kind": "TeamBudget",
         "metadata": {"name": "keyed"}, "spec": {"hardCapUSD": 3}},
    )  # fmt: skip
    team = f"{namespace}/keyed"
    key = wait_for(lambda: _issued(core, keys_operator, team), timeout=60, what="a key Secret")
    document = wait_for(lambda: key_digest(key) in (d := _digests(core, keys_operator)) and d)
    assert key not in document
    assert parse_api_keys(document)[key_digest(key)].team_id == team

    client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
        "costwarden.io", "v1alpha1", namespace, "teambudgets", "keyed"
    )
    wait_for(lambda: _issued(core, keys_operator, team) is None, timeout=60, what="revocation")
    wait_for(lambda: key_digest(key) not in _digests(core, keys_operator), timeout=60)
