"""The admission server's TLS: a certificate from a mounted Secret, or a generated one.

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

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = timedelta(days=365)
_CA_USAGE = x509.KeyUsage(
    digital_signature=True, key_cert_sign=True, crl_sign=True,
    content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, encipher_only=False, decipher_only=False,
)  # fmt: skip


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
    now = datetime.now(UTC) - timedelta(minutes=5)  # tolerate small clock skew
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "costwarden-webhook-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_sans(hostnames)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca_cert.public_bytes(pem), cert.public_bytes(pem), key_pem


def _sans(hostnames: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hostnames):  # unique, in order
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def service_hostnames(host: str) -> list[str]:
    """Every name a client may use for ``host``; for ``<svc>.<ns>.svc`` the short forms and
    the cluster-local one, as the API server dials ``<svc>.<ns>.svc``."""
    parts = host.split(".")
    if len(parts) == 3 and parts[2] == "svc":
        svc, ns = parts[0], parts[1]
        return [host, svc, f"{svc}.{ns}", f"{host}.cluster.local"]
    return [host]
