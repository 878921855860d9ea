"""The webhook's TLS material and how the API server is told to reach it."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from costwarden.controllers.injection import InjectorServer, WebhookOptions
from costwarden.controllers.webhook_tls import generate, service_hostnames, serving_tls
from costwarden.policy.injection import InjectionSettings


def test_generated_certificate_is_signed_by_the_ca_for_every_name() -> None:
    ca_pem, cert_pem, _ = generate(["cw-webhook.cw.svc", "cw-webhook", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate(ca_pem)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["cw-webhook.cw.svc", "cw-webhook"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_serving_tls_reuses_mounted_files(tmp_path: Path) -> None:
    first = serving_tls(tmp_path, ["localhost"])
    assert (tmp_path / "tls.key").stat().st_mode & 0o077 == 0, "private key not readable by others"
    again = serving_tls(tmp_path, ["other"])
    assert again.ca_pem == first.ca_pem


def test_service_hostnames() -> None:
    assert service_hostnames("w.ns.svc") == ["w.ns.svc", "w", "w.ns", "w.ns.svc.cluster.local"]
    assert service_hostnames("127.0.0.1") == ["127.0.0.1"]


def _server(host: str, tmp_path: Path) -> InjectorServer:
    options = WebhookOptions(
        listen_address="0.0.0.0",
        port=9443,
        host=host,
        service_port=443,
        configuration="sidecar-injector.costwarden.io",
        failure_policy="Fail",
        cert_dir=tmp_path,
        injection=InjectionSettings(image="img", excluded_namespaces=frozenset({"cw"})),
    )
    return InjectorServer(options, api_client=None)  # type: ignore[arg-type]


def test_an_in_cluster_host_becomes_a_service_reference(tmp_path: Path) -> None:
    server = _server("cw-webhook.cw.svc", tmp_path)
    body = server.body({"url": "https://cw-webhook.cw.svc:9443", "caBundle": "Q0E="})
    config = body["webhooks"][0]["clientConfig"]
    assert config["service"] == {
        "name": "cw-webhook", "namespace": "cw", "port": 443, "path": "/inject-labelled-pod",
    }  # fmt: skip
    assert "url" not in config
    assert {w["failurePolicy"] for w in body["webhooks"]} == {"Fail"}


def test_another_host_keeps_kopfs_url(tmp_path: Path) -> None:
    server = _server("127.0.0.1", tmp_path)
    body = server.body({"url": "https://127.0.0.1:9443", "caBundle": "Q0E="})
    paths = {w["clientConfig"]["url"] for w in body["webhooks"]}
    assert paths == {
        "https://127.0.0.1:9443/inject-labelled-pod",
        "https://127.0.0.1:9443/inject-opted-in-namespace",
    }
