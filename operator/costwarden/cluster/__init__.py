"""A local Kubernetes control plane for tests and demos.

Builds (or finds) kube-apiserver, kube-controller-manager and etcd, extracts kubectl and
helm, and runs them as a throw-away cluster on 127.0.0.1 (:class:`LocalControlPlane`).
"""

from costwarden.cluster.binaries import (
    BinariesError,
    ensure_cli_tools,
    ensure_control_plane_binaries,
)
from costwarden.cluster.controlplane import ControlPlaneError, LocalControlPlane

__all__ = [
    "BinariesError",
    "ControlPlaneError",
    "LocalControlPlane",
    "ensure_cli_tools",
    "ensure_control_plane_binaries",
]
