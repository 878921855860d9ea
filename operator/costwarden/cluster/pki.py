"""The local control plane's credentials: a throw-away CA, the API server's serving
certificate, an admin client certificate and the service-account signing key pair."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from costwarden.pki import PrivateCA

PKI_VALIDITY = datetime.timedelta(days=30)  # a throw-away cluster needs no rotation


@dataclass(frozen=True)
class ClusterPki:
    """Paths of the PEM files the components and clients use."""

    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_public_key: Path
    sa_private_key: Path


def write_cluster_pki(
    directory: Path, *, admin_user: str, service_cluster_ip_range: str
) -> ClusterPki:
    """A throw-away CA, the API server's serving certificate, an admin client certificate
    (group system:masters, bound to cluster-admin by the bootstrap RBAC policy) and the
    service-account signing key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    authority = PrivateCA("costwarden-local-ca", PKI_VALIDITY)
    service_ip = next(ipaddress.IPv4Network(service_cluster_ip_range).hosts())
    serving = authority.issue_server(
        ["kube-apiserver", "127.0.0.1", str(service_ip), "localhost", "kubernetes",
         "kubernetes.default", "kubernetes.default.svc"]
    )  # fmt: skip
    admin = authority.issue_client(admin_user, ["system:masters"])
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pki = ClusterPki(
        ca_cert=directory / "ca.crt",
        serving_cert=directory / "apiserver.crt",
        serving_key=directory / "apiserver.key",
        admin_cert=directory / "admin.crt",
        admin_key=directory / "admin.key",
        sa_public_key=directory / "sa.pub",
        sa_private_key=directory / "sa.key",
    )
    pki.ca_cert.write_bytes(authority.cert_pem)
    pki.serving_cert.write_bytes(serving.cert_pem)
    pki.serving_key.write_bytes(serving.key_pem)
    pki.admin_cert.write_bytes(admin.cert_pem)
    pki.admin_key.write_bytes(admin.key_pem)
    pki.sa_private_key.write_bytes(
        sa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    pki.sa_public_key.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki
