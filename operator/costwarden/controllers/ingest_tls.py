"""Usage ingestion over HTTPS: the operator's serving certificate and the CA it publishes.

Reporters (the shared gateway, injected sidecars) send a bearer token with every batch; it
must not cross the network in clear, and a reporter must know it talks to the operator.
The certificate comes from ``--ingest-cert-dir`` exactly as the admission server's does
(``webhook_tls.serving_tls``: ``tls.crt``/``tls.key``/``ca.crt`` used as they are, e.g. from
cert-manager, else a private CA and a serving certificate generated there by
``costwarden.pki``). The CA is published for the reporters:

- into the ConfigMap ``--ingest-ca-configmap`` (key ``ca.crt``) in the operator's namespace,
  which the chart's gateway mounts (``--report-ca-file``); the bundle keeps the CAs of the
  other replicas (each generates its own), see ``webhook_tls.merge_ca_bundle``;
- into every sidecar's config copy (key ``ingest-ca.crt``, ``config_copies``), since a
  sidecar can only mount ConfigMaps of its own namespace.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from costwarden.controllers.kubeapi import MANAGED_BY
from costwarden.controllers.webhook_tls import ServingTLS, merge_ca_bundle, serving_tls

log = logging.getLogger(__name__)

CA_KEY = "ca.crt"
DEFAULT_CA_CONFIGMAP = "costwarden-ingest-ca"


@dataclass(frozen=True)
class IngestTLS:
    tls: ServingTLS

    @classmethod
    def load(cls, cert_dir: Path | None, hostnames: list[str], listen_address: str) -> IngestTLS:
        directory = cert_dir or Path(tempfile.mkdtemp(prefix="costwarden-ingest-"))
        names = list(hostnames)
        if listen_address not in ("0.0.0.0", "::", ""):  # noqa: S104
            names.append(listen_address)
        names += [socket.gethostname(), "localhost", "127.0.0.1"]
        return cls(serving_tls(directory, list(dict.fromkeys(names))))

    @property
    def ca_pem(self) -> bytes:
        return self.tls.ca_pem

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.tls.certfile), str(self.tls.keyfile))
        return context


async def publish_ca(core: client.CoreV1Api, namespace: str, name: str, ca_pem: bytes) -> str:
    """Merge ``ca_pem`` into ConfigMap ``name`` (key ``ca.crt``); return the bundle. Retries
    a conflicting write (another replica publishing at the same time) a few times."""
    for _ in range(5):
        try:
            current = await asyncio.to_thread(core.read_namespaced_config_map, name, namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            current = None
        published = ((current.data or {}) if current is not None else {}).get(CA_KEY, "")
        bundle = merge_ca_bundle(published, ca_pem)
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(
                name=name,
                namespace=namespace,
                labels={**MANAGED_BY, "app.kubernetes.io/part-of": "costwarden"},
                resource_version=current.metadata.resource_version
                if current is not None and current.metadata is not None
                else None,
            ),
            data={CA_KEY: bundle},
        )
        try:
            if current is None:
                await asyncio.to_thread(core.create_namespaced_config_map, namespace, body)
            elif published != bundle:
                await asyncio.to_thread(core.replace_namespaced_config_map, name, namespace, body)
            log.info("published the ingestion CA in ConfigMap %s/%s", namespace, name)
            return bundle
        except ApiException as error:
            if error.status != 409:
                raise
    raise RuntimeError(f"could not publish the ingestion CA into {namespace}/{name}")
