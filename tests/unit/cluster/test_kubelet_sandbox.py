"""The process kubelet's sandbox keeps the local "image" visible under the pod's volumes."""

from __future__ import annotations

from pathlib import Path

import costwarden
from costwarden.cluster.kubelet.nsexec import Mount, image_paths, shadowed


def test_an_image_path_under_a_volume_is_shadowed_so_it_is_re_exposed() -> None:
    """A checkout under /tmp is hidden by the chart's emptyDir at /tmp unless re-exposed
    (it was: in a clone under /tmp the operator pod could not import costwarden)."""
    tmp = (Mount("/run/kubelet/pod/tmp", "/tmp"),)
    assert shadowed("/tmp/clone/operator", tmp)
    assert not shadowed("/tmp", tmp)  # the volume's own mount point
    assert not shadowed("/tmpfoo/operator", tmp)
    assert not shadowed("/work/clone/operator", tmp)


def test_the_image_includes_the_source_costwarden_is_imported_from() -> None:
    source = str(Path(costwarden.__file__).resolve().parent.parent)
    assert source in image_paths()
