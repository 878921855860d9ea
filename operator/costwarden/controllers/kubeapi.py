"""The operator's few writes and reads outside Kopf's watches, through the official client.

The ``kubernetes`` client is synchronous; each call runs in a worker thread so the Kopf
event loop never blocks on the network.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from costwarden.api.meta import GROUP, VERSION

log = logging.getLogger(__name__)

MANAGED_BY = {"app.kubernetes.io/managed-by": "costwarden-operator"}


class ConflictError(Exception):
    """The object changed since it was observed; the reconciler retries on the next event."""


def load_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (as kubectl does)."""
    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    return config.new_client_from_config(config_file=kubeconfig)


class KubeApi:
    def __init__(self, api_client: client.ApiClient) -> None:
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)

    async def list_objects(self, plural: str) -> list[dict[str, Any]]:
        result = await asyncio.to_thread(
            self._custom.list_cluster_custom_object, GROUP, VERSION, plural
        )
        return list(cast(dict[str, Any], result).get("items", []))

    async def list_namespaces(self) -> list[dict[str, Any]]:
        """Every Namespace as JSON (their annotations carry budgets' consents)."""
        listing = await asyncio.to_thread(self._core.list_namespace)
        result = self._core.api_client.sanitize_for_serialization(listing)
        return list(cast(dict[str, Any], result).get("items", []))

    async def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        fragment: Mapping[str, Any],
        resource_version: str,
    ) -> None:
        """Merge-patch status, refused by the API server if the object moved on meanwhile."""
        body: dict[str, Any] = {"status": dict(fragment)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            await asyncio.to_thread(
                self._custom.patch_namespaced_custom_object_status,
                GROUP, VERSION, namespace, plural, name, body,
            )  # fmt: skip
        except ApiException as error:
            if error.status == 409:
                raise ConflictError(f"{plural} {namespace}/{name} changed meanwhile") from error
            if error.status == 404:
                return  # deleted meanwhile: nothing left to report on
            raise

    async def write_config_map(
        self, namespace: str, name: str, data: Mapping[str, str], annotations: Mapping[str, str]
    ) -> bool:
        """Create or update the ConfigMap; True if anything was written."""
        try:
            current = await asyncio.to_thread(
                self._core.read_namespaced_config_map, name, namespace
            )
        except ApiException as error:
            if error.status != 404:
                raise
            current = None
        if current is not None and (current.data or {}) == dict(data):
            return False
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(
                name=name,
                namespace=namespace,
                labels={**MANAGED_BY, "app.kubernetes.io/part-of": "costwarden"},
                annotations=dict(annotations),
                resource_version=current.metadata.resource_version
                if current and current.metadata
                else None,
            ),
            data=dict(data),
        )
        try:
            if current is None:
                await asyncio.to_thread(self._core.create_namespaced_config_map, namespace, body)
            else:
                await asyncio.to_thread(
                    self._core.replace_namespaced_config_map, name, namespace, body
                )
        except ApiException as error:
            if error.status == 409:
                raise ConflictError(f"ConfigMap {namespace}/{name} changed meanwhile") from error
            raise
        return True

    async def post_event(self, body: dict[str, Any]) -> None:
        """Post an :func:`events.event_body`. Never raises: losing an Event must not stop
        reconciliation."""
        meta, target = body["metadata"], body["involvedObject"]
        try:
            await asyncio.to_thread(
                self._core.create_namespaced_event,
                meta["namespace"],
                body,  # type: ignore[arg-type]  # the client takes the JSON as it is
            )
        except ApiException as error:
            log.warning(
                "could not post Event %s on %s %s/%s: %s",
                body["reason"], target["kind"], meta["namespace"], target["name"], error.reason,
            )  # fmt: skip


def _resource_version(obj: client.V1ConfigMap | None) -> str | None:
    if obj is None or obj.metadata is None:
        return None
    version: str | None = obj.metadata.resource_version
    return version
