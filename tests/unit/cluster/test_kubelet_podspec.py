"""The process kubelet's pure parts: environment, command line, volume files, /etc/hosts,
and the atomic volume writer."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from costwarden.cluster.kubelet.atomic import DATA, write_atomically
from costwarden.cluster.kubelet.podspec import (
    ImageMap,
    LocalImage,
    MissingReferenceError,
    NodeInfo,
    UnsupportedError,
    command_line,
    container_env,
    container_port,
    expand,
    hosts_file,
    volume_files,
)

NODE = NodeInfo(name="node-1", host_ip="10.1.2.1", cpu=4, memory_bytes=8 << 30)


class FakeSources:
    def __init__(
        self,
        secrets: dict[str, dict[str, bytes]] | None = None,
        config_maps: dict[str, dict[str, bytes]] | None = None,
    ) -> None:
        self.secrets = secrets or {}
        self.config_maps = config_maps or {}
        self.tokens: list[tuple[str | None, int]] = []

    def secret(self, namespace: str, name: str) -> Mapping[str, bytes] | None:
        return self.secrets.get(f"{namespace}/{name}")

    def config_map(self, namespace: str, name: str) -> Mapping[str, bytes] | None:
        return self.config_maps.get(f"{namespace}/{name}")

    def token(self, pod: dict[str, Any], audience: str | None, expiration_seconds: int) -> str:
        self.tokens.append((audience, expiration_seconds))
        return f"token-for-{audience}"


def pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "agent-x",
            "namespace": "team-a",
            "uid": "u-1",
            "labels": {"app": "agent", "tier": "b"},
            "annotations": {"note": "hi"},
        },
        "spec": {
            "serviceAccountName": "runner",
            "nodeName": "node-1",
            "containers": [{"name": "main", "image": "python:3.12"}],
            **spec,
        },
        "status": {"podIP": "10.1.2.7"},
    }


def test_expand_replaces_defined_references_keeps_unknown_and_unescapes():
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)-$(C)", env) == "1-two-$(C)"
    assert expand("$$(A) costs $$5", env) == "$(A) costs $5"


def test_env_precedence_and_references():
    sources = FakeSources(
        secrets={"team-a/keys": {"k": b"s3cret"}},
        config_maps={"team-a/cfg": {"mode": b"fast", "X": b"from-cm"}},
    )
    container = {
        "name": "main",
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CM_"}],
        "env": [
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "k"}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
            {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": "TIER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['tier']"}}},
            {"name": "URL", "value": "http://$(IP):8000/$(ME)"},
            {
                "name": "MISSING",
                "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}},
            },
        ],
    }
    services = [
        {
            "metadata": {"name": "my-svc", "namespace": "team-a"},
            "spec": {"clusterIP": "10.96.0.9", "ports": [{"name": "http", "port": 80}]},
        },
        {
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443}]},
        },
        {
            "metadata": {"name": "elsewhere", "namespace": "team-b"},
            "spec": {"clusterIP": "10.96.0.3", "ports": [{"port": 1}]},
        },
    ]
    env = container_env(pod(), container, sources, NODE, services=services, base={"PATH": "/x"})
    assert env["KEY"] == "s3cret"
    assert env["MODE"] == "fast"
    assert env["CM_X"] == "from-cm"
    assert env["URL"] == "http://10.1.2.7:8000/agent-x"
    assert env["SA"] == "runner"
    assert env["TIER"] == "b"
    assert env["PATH"] == "/x"
    assert "MISSING" not in env
    assert env["MY_SVC_SERVICE_HOST"] == "10.96.0.9"
    assert env["MY_SVC_SERVICE_PORT_HTTP"] == "80"
    assert env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"
    assert env["KUBERNETES_SERVICE_PORT"] == "443"
    assert "ELSEWHERE_SERVICE_HOST" not in env


def test_a_required_missing_key_is_an_error_naming_it():
    container = {
        "name": "main",
        "env": [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "k"}}}],
    }
    with pytest.raises(MissingReferenceError, match="team-a/keys key 'k'"):
        container_env(pod(), container, FakeSources(), NODE)


def test_command_replaces_entrypoint_args_replace_cmd():
    image = LocalImage(entrypoint=("/venv/bin/costwarden",), cmd=("operator",))
    env = {"NS": "costwarden-system"}
    assert command_line({"name": "c"}, image, env) == ["/venv/bin/costwarden", "operator"]
    assert command_line({"name": "c", "args": ["gateway", "--ns=$(NS)"]}, image, env) == [
        "/venv/bin/costwarden",
        "gateway",
        "--ns=costwarden-system",
    ]
    assert command_line({"name": "c", "command": ["sh"]}, image, env) == ["sh"]


def test_image_map_first_match_wins_and_unknown_is_refused():
    project, python = LocalImage(cmd=("a",)), LocalImage(cmd=("b",))
    images = ImageMap((("costwarden/costwarden:*", project), ("python:*", python)))
    assert images.resolve("costwarden/costwarden:0.1.0") is project
    assert images.resolve("python:3.12-slim") is python
    with pytest.raises(UnsupportedError):
        images.resolve("busybox")


def test_secret_volume_with_items_modes_and_optional():
    sources = FakeSources(secrets={"team-a/s": {"a": b"1", "b": b"2"}})
    volume = {
        "name": "v",
        "secret": {
            "secretName": "s",
            "defaultMode": 0o440,
            "items": [{"key": "a", "path": "dir/a.txt"}, {"key": "b", "path": "b", "mode": 0o400}],
        },
    }
    assert volume_files(pod(), volume, sources, NODE) == {
        "dir/a.txt": (b"1", 0o440),
        "b": (b"2", 0o400),
    }
    absent = {"name": "v", "secret": {"secretName": "gone", "optional": True}}
    assert volume_files(pod(), absent, sources, NODE) == {}
    with pytest.raises(MissingReferenceError):
        volume_files(pod(), {"name": "v", "secret": {"secretName": "gone"}}, sources, NODE)


def test_config_map_volume_without_items_has_every_key():
    sources = FakeSources(config_maps={"team-a/c": {"x.json": b"{}", "y": b"z"}})
    volume = {"name": "v", "configMap": {"name": "c"}}
    assert volume_files(pod(), volume, sources, NODE) == {
        "x.json": (b"{}", 0o644),
        "y": (b"z", 0o644),
    }


def test_projected_volume_combines_token_config_map_and_downward_api():
    sources = FakeSources(config_maps={"team-a/kube-root-ca.crt": {"ca.crt": b"PEM"}})
    volume = {
        "name": "v",
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": "costwarden.io/gateway",
                        "expirationSeconds": 600,
                        "path": "token",
                    }
                },
                {
                    "configMap": {
                        "name": "kube-root-ca.crt",
                        "items": [{"key": "ca.crt", "path": "ca.crt"}],
                    }
                },
                {
                    "downwardAPI": {
                        "items": [
                            {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}},
                            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                            {
                                "path": "cpu",
                                "resourceFieldRef": {
                                    "containerName": "main",
                                    "resource": "limits.cpu",
                                },
                            },
                        ]
                    }
                },
            ]
        },
    }
    files = volume_files(pod(), volume, sources, NODE)
    assert files is not None
    assert files["token"] == (b"token-for-costwarden.io/gateway", 0o600)
    assert sources.tokens == [("costwarden.io/gateway", 600)]
    assert files["ca.crt"][0] == b"PEM"
    assert files["namespace"][0] == b"team-a"
    assert files["labels"][0] == b'app="agent"\ntier="b"'
    assert files["cpu"][0] == b"4"  # no limit set: the node's capacity, as the kubelet does


def test_empty_dir_is_a_plain_directory_and_unknown_kinds_are_refused():
    assert volume_files(pod(), {"name": "t", "emptyDir": {}}, FakeSources(), NODE) is None
    with pytest.raises(UnsupportedError, match="hostPath"):
        volume_files(pod(), {"name": "h", "hostPath": {"path": "/"}}, FakeSources(), NODE)


def test_hosts_file_names_services_as_cluster_dns_would():
    services = [
        {"metadata": {"name": "gw", "namespace": "team-a"}, "spec": {"clusterIP": "10.96.0.5"}},
        {"metadata": {"name": "api", "namespace": "other"}, "spec": {"clusterIP": "10.96.0.6"}},
        {"metadata": {"name": "headless", "namespace": "team-a"}, "spec": {"clusterIP": "None"}},
    ]
    text = hosts_file(pod(), "10.1.2.7", services)
    lines = text.splitlines()
    assert "10.1.2.7\tagent-x" in lines
    assert "10.96.0.5\tgw gw.team-a gw.team-a.svc gw.team-a.svc.cluster.local" in lines
    # Short names only for the pod's own namespace, as the DNS search path gives them.
    assert "10.96.0.6\tapi.other api.other.svc api.other.svc.cluster.local" in lines
    assert "headless" not in text


def test_hosts_file_adds_the_upstream_dns_stand_in():
    text = hosts_file(pod(), "10.1.2.7", [], {"api.openai.com": "10.1.2.1"})
    assert text.splitlines()[-1] == "10.1.2.1\tapi.openai.com"


def test_named_container_ports_resolve():
    spec = pod()
    spec["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": 8000}]
    assert container_port(spec, "http") == 8000
    assert container_port(spec, 9090) == 9090
    assert container_port(spec, "metrics") is None


def test_atomic_writer_swaps_data_and_drops_removed_keys(tmp_path: Path):
    volume = tmp_path / "vol"
    assert write_atomically(volume, {"a": (b"1", 0o644), "sub/b": (b"2", 0o600)})
    first = os.readlink(volume / DATA)
    assert (volume / "a").read_bytes() == b"1"
    assert (volume / "sub" / "b").read_bytes() == b"2"
    assert not write_atomically(volume, {"a": (b"1", 0o644), "sub/b": (b"2", 0o600)})

    assert write_atomically(volume, {"a": (b"changed", 0o644)})
    assert os.readlink(volume / DATA) != first
    assert not (volume / first).exists()  # the old generation is removed
    assert (volume / "a").read_bytes() == b"changed"
    assert not (volume / "sub").exists()
    assert (volume / "a").is_symlink()  # readers follow a -> ..data/a


def test_atomic_writer_refuses_paths_escaping_the_volume(tmp_path: Path):
    with pytest.raises(ValueError, match="relative"):
        write_atomically(tmp_path / "v", {"../x": (b"", 0o644)})
