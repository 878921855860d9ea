"""The ingestion CA bundle the operator publishes: every replica's CA, bounded, none expired."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from costwarden.controllers.ingest_tls import IngestTLS
from costwarden.controllers.webhook_tls import MAX_BUNDLED_CAS, merge_ca_bundle
from costwarden.pki import PrivateCA


def _ca(days: int = 365) -> bytes:
    return PrivateCA("test-ca", timedelta(days=days)).cert_pem


def _count(bundle: str) -> int:
    return len(x509.load_pem_x509_certificates(bundle.encode()))


def test_each_replica_adds_its_ca_and_the_bundle_stays_bounded() -> None:
    bundle = ""
    cas = [_ca() for _ in range(MAX_BUNDLED_CAS + 2)]
    for ca in cas:
        bundle = merge_ca_bundle(bundle, ca)
    assert _count(bundle) == MAX_BUNDLED_CAS
    assert bundle.endswith(cas[-1].decode()), "the newest (ours) is always kept"
    assert merge_ca_bundle(bundle, cas[-1]) == bundle, "publishing again changes nothing"


def test_expired_and_unparsable_entries_are_dropped() -> None:
    old = _ca(days=1)
    later = datetime.now(UTC) + timedelta(days=2)
    ours = _ca()
    assert _count(merge_ca_bundle(old.decode(), ours, now=later)) == 1
    assert _count(merge_ca_bundle("not a certificate", ours)) == 1


def test_the_generated_certificate_verifies_against_the_published_ca(tmp_path: Path) -> None:
    tls = IngestTLS.load(tmp_path, ["ingest.costwarden-system.svc"], "0.0.0.0")
    assert (tmp_path / "ca.crt").read_bytes() == tls.ca_pem
    client = ssl.create_default_context(cadata=merge_ca_bundle("", tls.ca_pem))
    cert = x509.load_pem_x509_certificate(tls.tls.certfile.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "ingest.costwarden-system.svc" in names.get_values_for_type(x509.DNSName)
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert tls.ssl_context().minimum_version == ssl.TLSVersion.TLSv1_2
