"""A process kubelet for tests and the demo: runs the Pods of the local control plane as
local processes, each pod in its own network and mount namespaces (docs/process-kubelet.md)."""

from costwarden.cluster.kubelet.kubelet import NODE_NAME, ProcessKubelet, default_image_map
from costwarden.cluster.kubelet.podspec import ImageMap, LocalImage

__all__ = ["NODE_NAME", "ImageMap", "LocalImage", "ProcessKubelet", "default_image_map"]
