"""Run `costwarden operator` as a real process against a test cluster."""

from __future__ import annotations

import sys
from pathlib import Path

from costwarden.testing.processes import ManagedProcess


class OperatorProcess(ManagedProcess):
    def __init__(self, kubeconfig: str, namespace: str, log_path: Path, *extra: str) -> None:
        super().__init__(
            "operator",
            [
                sys.executable, "-m", "costwarden", "operator",
                "--kubeconfig", kubeconfig,
                "--namespace", namespace,
                "--metrics-port", "0", "--health-port", "0",
                *extra,
            ],
            log_path,
        )  # fmt: skip
        self.kubeconfig = kubeconfig
        self.namespace = namespace
