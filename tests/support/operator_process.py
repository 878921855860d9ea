"""Run `costwarden operator` as a real process against a test cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


class OperatorProcess:
    def __init__(self, kubeconfig: str, namespace: str, log_path: Path, *extra: str) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log_path
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "costwarden", "operator",
                "--kubeconfig", self.kubeconfig,
                "--namespace", self.namespace,
                "--metrics-port", "0", "--health-port", "0",
                *self.extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")
