"""The operator's serving TLS (the admission server and usage ingestion): a certificate
from a mounted Secret, or a generated one.

The API server only calls webhooks over HTTPS and verifies the serving certificate against
the configuration's ``caBundle``. Kopf can generate a self-signed certificate, but only
with optional packages (certbuilder, oscrypto) the image does not ship; ``cryptography`` is
already a dependency, so the operator generates a private CA and a serving certificate
itself into ``--webhook-cert-dir`` (an emptyDir in the chart, so a new pod gets a new CA;
the operator writes the configuration's ``caBundle`` at every start).
A certificate from cert-manager (``tls.crt``, ``tls.key``, ``ca.crt`` in ``--webhook-cert-dir``)
is used as is when present.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from costwarden.pki import PrivateCA

VALIDITY = timedelta(days=365)


@dataclass(frozen=True)
class ServingTLS:
    certfile: Path
    keyfile: Path
    ca_pem: bytes


def serving_tls(directory: Path, hostnames: list[str]) -> ServingTLS:
    """Use ``tls.crt``/``tls.key``/``ca.crt`` in ``directory`` if all exist, else generate
    them there (the directory must be private to the operator: it holds a private key)."""
    cert, key, ca = (directory / n for n in ("tls.crt", "tls.key", "ca.crt"))
    if not (cert.exists() and key.exists() and ca.exists()):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca_pem, cert_pem, key_pem = generate(hostnames)
        key.touch(mode=0o600)
        key.write_bytes(key_pem)
        cert.write_bytes(cert_pem)
        ca.write_bytes(ca_pem)
    return ServingTLS(cert, key, ca.read_bytes())


def generate(hostnames: list[str]) -> tuple[bytes, bytes, bytes]:
    """A CA and a serving certificate for ``hostnames`` (DNS names or IPs): PEM CA cert,
    PEM serving cert, PEM serving key."""
    authority = PrivateCA("costwarden-webhook-ca", VALIDITY)
    serving = authority.issue_server(hostnames)
    return authority.cert_pem, serving.cert_pem, serving.key_pem


def service_hostnames(host: str) -> list[str]:
    """Every name a client may use for ``host``; for ``<svc>.<ns>.svc`` the short forms and
    the cluster-local one, as the API server dials ``<svc>.<ns>.svc``."""
    parts = host.split(".")
    if len(parts) == 3 and parts[2] == "svc":
        svc, ns = parts[0], parts[1]
        return [host, svc, f"{svc}.{ns}", f"{host}.cluster.local"]
    return [host]


MAX_BUNDLED_CAS = 4
"""CAs kept in a published bundle: one per operator replica (each generates its own at
start), plus a few predecessors, so a client that has not seen the newest bundle yet and a
replica that has not restarted yet still agree."""


def merge_ca_bundle(published: str, ours: bytes, *, now: datetime | None = None) -> str:
    """``published`` (a PEM bundle) with ``ours`` added: expired CAs dropped, the newest
    :data:`MAX_BUNDLED_CAS` kept (ours always), oldest first. Unparsable text is dropped."""
    moment = now or datetime.now(UTC)
    ours_cert = x509.load_pem_x509_certificate(ours)
    try:
        certs = x509.load_pem_x509_certificates(published.encode()) if published.strip() else []
    except ValueError:
        certs = []
    kept = [c for c in certs if c != ours_cert and c.not_valid_after_utc > moment]
    kept.sort(key=lambda c: c.not_valid_before_utc)
    kept = [*kept[-(MAX_BUNDLED_CAS - 1) :], ours_cert]
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in kept)
