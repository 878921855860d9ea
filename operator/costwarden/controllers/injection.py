"""The sidecar-injection admission webhook: Kopf serves it, the operator configures it.

Kopf runs the HTTPS server and calls the handlers below; what a pod becomes is decided by
``policy.injection``. The MutatingWebhookConfiguration is written here rather than by
Kopf's ``settings.admission.managed``, because Kopf's generated configuration has no
namespaceSelector, no reinvocation policy and a failure policy fixed per handler: the
selectors are what keep the API server from calling us for pods that are not opted in
(and kube-system / our own namespace out entirely), see docs/sidecar-injection.md.

Handlers are registered only when the webhook is enabled: Kopf refuses to start with
admission handlers and no server.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from costwarden.controllers.config_copies import ConfigCopies
from costwarden.controllers.kubeapi import MANAGED_BY
from costwarden.controllers.provider_keys import sidecar_credentials
from costwarden.controllers.webhook_tls import service_hostnames, serving_tls
from costwarden.policy.injection import InjectionSettings, inject, webhook_entries

log = logging.getLogger(__name__)

HANDLER_IDS = {"pod": "inject-labelled-pod", "namespace": "inject-opted-in-namespace"}
"""Kopf routes a request to the handler named in its URL path: which webhook entry called
tells the handler how the pod opted in, without reading the Namespace."""


@dataclass(frozen=True)
class WebhookOptions:
    listen_address: str
    port: int
    host: str
    service_port: int
    configuration: str
    failure_policy: str
    cert_dir: Path | None
    injection: InjectionSettings


def configure(
    settings: kopf.OperatorSettings,
    options: WebhookOptions,
    api_client: client.ApiClient,
    copies: ConfigCopies,
) -> None:
    """Register the mutating handlers and the admission server in Kopf's settings."""
    wanted = options.injection

    async def mutate(
        body: kopf.Body,
        patch: kopf.Patch,
        dryrun: bool,
        namespace_opted_in: bool,
        userinfo: Mapping[str, Any] | None,
    ) -> None:
        namespace = body.metadata.namespace or ""
        creator = str((userinfo or {}).get("username") or "")
        keys = await sidecar_credentials(
            copies.core, copies.source, namespace, dict(body.metadata.labels or {})
        )
        decision = inject(
            dict(body), wanted, namespace=namespace, namespace_opted_in=namespace_opted_in,
            creator=creator, credentials=keys,
        )  # fmt: skip
        name = body.metadata.name or f"{body.metadata.get('generateName', '')}*"
        if decision.denied:
            log.warning("denied pod %s/%s created by %s: %s", namespace, name, creator,
                        decision.denied)  # fmt: skip
            raise kopf.AdmissionError(decision.denied, code=403)
        if decision.pod is None:
            log.debug("pod %s/%s unchanged: %s", namespace, name, decision.reason)
            return
        if not dryrun:
            await copies.ensure(namespace)
        mutated = decision.pod
        patch.fns.append(lambda raw: _replace(raw, mutated))
        log.info("injecting the gateway sidecar into pod %s/%s (%s)", namespace, name,
                 decision.reason)  # fmt: skip

    @kopf.on.mutate("", "v1", "pods", id=HANDLER_IDS["pod"], operations=["CREATE"])
    async def inject_labelled_pod(
        body: kopf.Body, patch: kopf.Patch, dryrun: bool, userinfo: Any = None, **_: Any
    ) -> None:
        await mutate(body, patch, dryrun, namespace_opted_in=False, userinfo=userinfo)

    @kopf.on.mutate("", "v1", "pods", id=HANDLER_IDS["namespace"], operations=["CREATE"])
    async def inject_opted_in_namespace(
        body: kopf.Body, patch: kopf.Patch, dryrun: bool, userinfo: Any = None, **_: Any
    ) -> None:
        # The API server called this entry only because the namespace selector matched.
        await mutate(body, patch, dryrun, namespace_opted_in=True, userinfo=userinfo)

    settings.admission.server = InjectorServer(options, api_client)
    settings.admission.managed = None  # written by InjectorServer, see the module docstring


def _replace(raw: Any, mutated: dict[str, Any]) -> None:
    raw.clear()
    raw.update(mutated)


class InjectorServer:
    """Kopf's WebhookServer plus the configuration: each time the server yields a client
    config (at start, and when certificate files change), the configuration is written."""

    def __init__(self, options: WebhookOptions, api_client: client.ApiClient) -> None:
        self.options = options
        self._admission = client.AdmissionregistrationV1Api(api_client)
        cert_dir = options.cert_dir or Path(tempfile.mkdtemp(prefix="costwarden-webhook-"))
        hosts = [*service_hostnames(options.host), options.listen_address]
        tls = serving_tls(cert_dir, [h for h in hosts if h not in ("0.0.0.0", "::")])  # noqa: S104
        self.server = kopf.WebhookServer(
            addr=options.listen_address,
            port=options.port,
            host=options.host,
            certfile=tls.certfile,
            pkeyfile=tls.keyfile,
            cadata=tls.ca_pem,
        )

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async with self.server as server:
            async for client_config in server(fn):
                await self.write_configuration(dict(client_config))
                yield client_config

    def client_config(self, kopf_config: dict[str, Any]) -> dict[str, Any]:
        """A Service reference for an in-cluster host (``<svc>.<ns>.svc``), else Kopf's
        URL. The API server reaches a Service through its endpoints without cluster DNS,
        and on the Service's port (443), not the container's."""
        parts = self.options.host.split(".")
        result: dict[str, Any] = {"caBundle": kopf_config["caBundle"]}
        if len(parts) == 3 and parts[2] == "svc":
            result["service"] = {
                "name": parts[0],
                "namespace": parts[1],
                "port": self.options.service_port,
            }
        else:
            url = str(kopf_config["url"])
            result["url"] = url.rstrip("/")
        return result

    def body(self, kopf_config: dict[str, Any]) -> dict[str, Any]:
        options = self.options
        return {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {
                "name": options.configuration,
                "labels": {**MANAGED_BY, "app.kubernetes.io/part-of": "costwarden"},
            },
            "webhooks": webhook_entries(
                configuration=options.configuration,
                client_config=self.client_config(kopf_config),
                handler_paths={k: f"/{v}" for k, v in HANDLER_IDS.items()},
                excluded_namespaces=options.injection.excluded_namespaces,
                failure_policy=options.failure_policy,
            ),
        }

    async def write_configuration(self, kopf_config: dict[str, Any]) -> None:
        """Create the configuration, or replace its webhooks (a JSON patch, so webhooks a
        previous version had and this one has not are removed). Left in place at shutdown:
        with ``Fail`` that is the point, with ``Ignore`` the API server skips it."""
        body = self.body(kopf_config)
        name = self.options.configuration
        try:
            await asyncio.to_thread(self._admission.read_mutating_webhook_configuration, name)
        except ApiException as error:
            if error.status != 404:
                raise
            create: Any = self._admission.create_mutating_webhook_configuration
            await asyncio.to_thread(create, body)  # the client sends a dict body as it is
            log.info("created MutatingWebhookConfiguration %s", name)
            return
        ops = [{"op": "add", "path": "/webhooks", "value": body["webhooks"]}]
        await asyncio.to_thread(self._admission.patch_mutating_webhook_configuration, name, ops)
        log.info("updated MutatingWebhookConfiguration %s", name)
