"""The provider-keys mirror: the referenced Secret keys, copied into the one Secret the shared
gateway mounts (``--provider-keys-secret``, in the operator's ``--namespace``).

Each pass (every reconciliation, at least every resync) reads each Secret the gateway
configuration references with a GET (the chart grants ``get`` on Secrets only in the
namespaces the admin lists in ``providerKeys.namespaces``, or cluster-wide when asked), and
writes the mirror only when its content changed: a rotated key reaches the gateways within
one resync plus the kubelet's volume refresh; a key no longer referenced disappears.
What is decided lives in :mod:`costwarden.policy.provider_keys`; this module only reads and
writes. A key value is never logged, put in an Event or a status: messages name the Secret.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from costwarden.api.gatewayconfig import CONFIG_MAP_KEY, CredentialRef, GatewayConfig
from costwarden.controllers.kubeapi import MANAGED_BY, ConflictError
from costwarden.policy.provider_keys import (
    Access,
    MirrorPlan,
    SecretRead,
    plan_mirror,
    secrets_to_read,
)
from costwarden.policy.provider_keys import sidecar_credentials as team_sidecar_credentials

log = logging.getLogger(__name__)

MIRROR_LABEL = "costwarden.io/provider-keys"
READS_IN_FLIGHT = 8
REREAD_SECONDS = 10.0
"""A Secret read is reused for this long: passes can come several a second when spend
moves, while rotation only needs to propagate within a resync (30 s)."""
ALLOWED_HINT = (
    "; a cluster admin allows it by adding the namespace to the chart's "
    "providerKeys.namespaces (or providerKeys.clusterWide=true)"
)


class ProviderKeysMirror:
    def __init__(self, core: client.CoreV1Api, namespace: str, secret_name: str) -> None:
        self.core = core
        self.namespace = namespace
        self.secret_name = secret_name
        self._reads: dict[tuple[str, str], tuple[float, SecretRead]] = {}

    async def sync(self, config: GatewayConfig) -> MirrorPlan:
        """Read the referenced Secrets, write the mirror if it changed, return the plan (its
        problems go into the policies' Ready conditions). A failed write is logged and
        retried on the next pass; the problems are returned regardless."""
        gate = asyncio.Semaphore(READS_IN_FLIGHT)

        async def read(namespace: str, name: str) -> tuple[tuple[str, str], SecretRead]:
            cached = self._reads.get((namespace, name))
            if cached is not None and time.monotonic() - cached[0] < REREAD_SECONDS:
                return (namespace, name), cached[1]
            async with gate:
                result = await asyncio.to_thread(self._read, namespace, name)
            self._reads[(namespace, name)] = (time.monotonic(), result)
            return (namespace, name), result

        wanted = secrets_to_read(config)
        reads = dict(await asyncio.gather(*(read(ns, name) for ns, name in wanted)))
        self._reads = {k: v for k, v in self._reads.items() if k in reads}
        try:
            current = await asyncio.to_thread(self._current)
        except ApiException as error:
            log.warning(
                "could not read the provider-keys Secret %s/%s: HTTP %s %s",
                self.namespace, self.secret_name, error.status, error.reason,
            )  # fmt: skip
            return plan_mirror(config, reads, allowed_hint=ALLOWED_HINT)
        plan = plan_mirror(
            config,
            reads,
            _data(current) if current is not None else None,
            allowed_hint=ALLOWED_HINT,
        )
        try:
            await asyncio.to_thread(self._write, plan.data, current)
        except ConflictError as conflict:
            log.info("provider-keys Secret changed meanwhile, rewriting next pass: %s", conflict)
        except ApiException as error:
            log.warning(
                "could not write the provider-keys Secret %s/%s: HTTP %s %s",
                self.namespace, self.secret_name, error.status, error.reason,
            )  # fmt: skip
        return plan

    def _read(self, namespace: str, name: str) -> SecretRead:
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as error:
            if error.status == 404:
                return SecretRead(Access.NOT_FOUND)
            if error.status == 403:
                return SecretRead(Access.FORBIDDEN)
            log.warning("could not read Secret %s/%s: HTTP %s %s", namespace, name,
                        error.status, error.reason)  # fmt: skip
            return SecretRead(Access.ERROR)
        return SecretRead(Access.FOUND, _data(secret))

    def _current(self) -> client.V1Secret | None:
        try:
            secret: client.V1Secret = self.core.read_namespaced_secret(
                self.secret_name, self.namespace
            )
        except ApiException as error:
            if error.status != 404:
                raise
            return None
        return secret

    def _write(self, data: Mapping[str, str], current: client.V1Secret | None) -> None:
        if current is not None and _data(current) == dict(data):
            return
        version = current.metadata.resource_version if current and current.metadata else None
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=self.secret_name,
                namespace=self.namespace,
                labels={
                    **MANAGED_BY,
                    "app.kubernetes.io/part-of": "costwarden",
                    MIRROR_LABEL: "true",
                },
                annotations={
                    "costwarden.io/description": "provider keys mirrored by the costwarden "
                    "operator from the Secrets RoutingPolicies reference; edits are overwritten"
                },
                resource_version=version,
            ),
            type="Opaque",
            data=dict(data),
        )
        try:
            if current is None:
                self.core.create_namespaced_secret(self.namespace, body)
            else:
                self.core.replace_namespaced_secret(self.secret_name, self.namespace, body)
        except ApiException as error:
            if error.status == 409:
                raise ConflictError(f"Secret {self.namespace}/{self.secret_name}") from error
            raise
        log.info(
            "provider-keys Secret %s/%s now holds %d key(s)",
            self.namespace, self.secret_name, len(data),
        )  # fmt: skip


def _data(secret: client.V1Secret) -> dict[str, str]:
    """A Secret's data as the API serves it: base64 text, never decoded here."""
    return {str(k): str(v) for k, v in (secret.data or {}).items()}


async def sidecar_credentials(
    core: client.CoreV1Api, source: tuple[str, str], namespace: str, labels: Mapping[str, str]
) -> list[CredentialRef]:
    """The Secret references an injected sidecar gets as env: its team's policy's keys held
    in the pod's own namespace (:func:`costwarden.policy.provider_keys.sidecar_credentials`),
    from the gateway configuration ConfigMap ``source`` (namespace, name). Never raises: a
    pod admitted without them gets the sidecar's missing-key refusal, which names the
    Secret."""
    try:
        config_map = await asyncio.to_thread(core.read_namespaced_config_map, source[1], source[0])
        raw = (config_map.data or {}).get(CONFIG_MAP_KEY)
        if not raw:
            return []
        config = GatewayConfig.model_validate_json(raw)
    except (ApiException, ValidationError) as error:
        log.warning("no provider keys for a sidecar in %s: the gateway configuration could "
                    "not be read (%s)", namespace, type(error).__name__)  # fmt: skip
        return []
    return team_sidecar_credentials(config, namespace, labels)
