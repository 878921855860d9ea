"""Copies of the gateway configuration in the namespaces that run injected sidecars.

A pod can only mount a ConfigMap from its own namespace, so each namespace with sidecars
needs its own copy of the rendered configuration. Copies are named
``costwarden-sidecar-config`` (one fixed name, so RBAC can limit the operator to it in
every namespace) and kept in step by the reconciler after each pass.

Which namespaces get one:
- namespaces labelled ``costwarden.io/inject=enabled`` (copied before any pod needs it);
- a namespace where the webhook injected a pod that opted in by its own label: the webhook
  creates the copy at admission if it is absent (:meth:`ConfigCopies.ensure`), and the
  reconciler keeps every existing copy up to date from then on.
A copy is deleted when its namespace is no longer opted in and has no injected pods, and
only once it is older than :data:`GC_GRACE`, so a copy the webhook has just created for a
pod that is not stored yet survives.

Each copy holds only the namespace's own part of the configuration (the teams governing it
and their routing policies, ``policy.config_scope``): a tenant reading its copy sees no other
team's spend, caps or endpoints. Next to it, key ``ingest-ca.crt``: the CA bundle the
sidecar verifies the operator's ingestion certificate with.

Owner references cannot point across namespaces; copies carry the managed-by label and an
annotation naming their source instead, and vanish with their namespace.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from costwarden.api.gatewayconfig import CONFIG_MAP_KEY, GatewayConfig
from costwarden.controllers.kubeapi import MANAGED_BY
from costwarden.policy.config_scope import config_for_namespace
from costwarden.policy.injection import (
    CONFIG_COPY_NAME,
    INGEST_CA_KEY,
    INJECT_LABEL,
    INJECTED_LABEL,
    NAMESPACE_OPT_IN,
)
from costwarden.policy.render import serialize

log = logging.getLogger(__name__)

GC_GRACE = timedelta(minutes=10)
SOURCE_ANNOTATION = "costwarden.io/copied-from"
REVISION_ANNOTATION = "costwarden.io/config-revision"
COPY_LABELS = {**MANAGED_BY, "app.kubernetes.io/part-of": "costwarden"}


class ConfigCopies:
    def __init__(
        self,
        core: client.CoreV1Api,
        source_namespace: str,
        source_name: str,
        excluded_namespaces: frozenset[str],
    ) -> None:
        self._core = core
        self.core = core  # the webhook reads the source through it (provider keys)
        self.source = (source_namespace, source_name)
        self.excluded = excluded_namespaces | {source_namespace}
        self.pending: set[str] = set()
        """Namespaces the webhook could not create a copy in (e.g. before the operator first
        published the source): this replica's next pass creates them."""
        self.ingest_ca = ""
        """The CA bundle of the operator's ingestion (set once published)."""

    def scoped(self, data: Mapping[str, str], namespace: str) -> dict[str, str]:
        """The copy's data for ``namespace``: its own part of the configuration, and the
        ingestion CA. A source that does not parse is copied as nothing (never whole)."""
        result: dict[str, str] = {}
        text = data.get(CONFIG_MAP_KEY)
        if text:
            try:
                config = GatewayConfig.model_validate_json(text)
            except ValueError:
                log.error("the gateway configuration does not parse; copies left out")
                return {}
            result[CONFIG_MAP_KEY] = serialize(config_for_namespace(config, namespace))
        if self.ingest_ca:
            result[INGEST_CA_KEY] = self.ingest_ca
        return result

    async def sync(self, data: Mapping[str, str], revision: str) -> None:
        """Bring every copy to ``data``; create missing ones, remove unneeded ones. Never
        raises: a copy that could not be written is retried on the next pass."""
        try:
            await self._sync(dict(data), revision)
        except ApiException as error:
            log.warning("could not sync sidecar config copies: %s %s", error.status, error.reason)

    async def _sync(self, data: dict[str, str], revision: str) -> None:
        opted_in = await self._opted_in_namespaces()
        existing = await self._existing_copies()
        pending, self.pending = self.pending, set()
        for namespace in sorted(opted_in | existing.keys() | pending):
            current = existing.get(namespace)
            scoped = self.scoped(data, namespace)
            if not scoped or (current is not None and (current.data or {}) == scoped):
                continue
            await self._write(namespace, scoped, revision, current)
            log.info("sidecar config copy %s/%s at revision %s", namespace, CONFIG_COPY_NAME,
                     revision)  # fmt: skip
        now = datetime.now(UTC)
        for namespace, copy in existing.items():
            if namespace in opted_in or not _older_than(copy, now - GC_GRACE):
                continue
            if await self._has_injected_pods(namespace):
                continue
            await self._delete(namespace)

    async def ensure(self, namespace: str) -> None:
        """Create the namespace's copy from the source ConfigMap if it does not exist yet
        (the webhook calls this at admission; any replica may). Never raises."""
        if namespace in self.excluded:
            return
        try:
            await asyncio.to_thread(self._core.read_namespaced_config_map, CONFIG_COPY_NAME,
                                    namespace)  # fmt: skip
            return
        except ApiException as error:
            if error.status != 404:
                log.warning("could not read %s/%s: %s", namespace, CONFIG_COPY_NAME, error.reason)
                return
        try:
            source = await asyncio.to_thread(
                self._core.read_namespaced_config_map, self.source[1], self.source[0]
            )
            if not source.data:
                self.pending.add(namespace)
                return
            annotations = (source.metadata.annotations or {}) if source.metadata else {}
            scoped = self.scoped(dict(source.data or {}), namespace)
            if not scoped:
                self.pending.add(namespace)
                return
            await self._write(namespace, scoped, annotations.get(REVISION_ANNOTATION, ""), None)
        except ApiException as error:
            if error.status != 409:  # 409: created meanwhile (another replica, a reconcile)
                self.pending.add(namespace)
                log.warning("could not create %s/%s: %s", namespace, CONFIG_COPY_NAME,
                            error.reason)  # fmt: skip

    async def _opted_in_namespaces(self) -> set[str]:
        result = await asyncio.to_thread(
            self._core.list_namespace, label_selector=f"{INJECT_LABEL}={NAMESPACE_OPT_IN}"
        )
        names = {str(ns.metadata.name) for ns in result.items if ns.metadata}
        return names - self.excluded

    async def _existing_copies(self) -> dict[str, client.V1ConfigMap]:
        # The field selector is what lets RBAC limit list to the one name (resourceNames).
        result = await asyncio.to_thread(
            self._core.list_config_map_for_all_namespaces,
            field_selector=f"metadata.name={CONFIG_COPY_NAME}",
            label_selector=",".join(f"{k}={v}" for k, v in MANAGED_BY.items()),
        )
        copies = {str(cm.metadata.namespace): cm for cm in result.items if cm.metadata}
        return {ns: cm for ns, cm in copies.items() if ns not in self.excluded}

    async def _has_injected_pods(self, namespace: str) -> bool:
        result = await asyncio.to_thread(
            self._core.list_namespaced_pod, namespace, label_selector=f"{INJECTED_LABEL}=true",
            limit=1,
        )  # fmt: skip
        return bool(result.items)

    async def _write(
        self,
        namespace: str,
        data: dict[str, str],
        revision: str,
        current: client.V1ConfigMap | None,
    ) -> None:
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(
                name=CONFIG_COPY_NAME,
                namespace=namespace,
                labels=dict(COPY_LABELS),
                annotations={
                    SOURCE_ANNOTATION: "/".join(self.source),
                    REVISION_ANNOTATION: revision,
                },
                resource_version=_version(current),
            ),
            data=data,
        )
        if current is None:
            await asyncio.to_thread(self._core.create_namespaced_config_map, namespace, body)
        else:
            await asyncio.to_thread(
                self._core.replace_namespaced_config_map, CONFIG_COPY_NAME, namespace, body
            )

    async def _delete(self, namespace: str) -> None:
        try:
            await asyncio.to_thread(
                self._core.delete_namespaced_config_map, CONFIG_COPY_NAME, namespace
            )
            log.info("removed sidecar config copy from %s (no longer opted in)", namespace)
        except ApiException as error:
            if error.status != 404:
                raise


def _version(obj: client.V1ConfigMap | None) -> str | None:
    if obj is None or obj.metadata is None:
        return None
    version: str | None = obj.metadata.resource_version
    return version


def _older_than(obj: Any, moment: datetime) -> bool:
    created = obj.metadata.creation_timestamp if obj.metadata else None
    return created is None or created < moment
