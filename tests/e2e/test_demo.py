"""`costwarden demo`, run as a user runs it (non-interactively), to its end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from costwarden.demo import manifests


def test_the_demo_stops_the_agent_and_shows_the_result(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "costwarden", "demo", "--plain", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    assert "[7/7]" in out
    assert f"soft limit passed: the gateway now downgrades {manifests.FRONTIER}" in out
    assert "the gateway refuses calls with HTTP 429" in out
    assert f"job {manifests.JOB} suspended" in out
    # The final `kubectl get costwarden -A` shows the demo budget exhausted.
    budget_rows = [
        line for line in out.splitlines() if f"teambudget.costwarden.io/{manifests.BUDGET}" in line
    ]
    assert budget_rows
    assert budget_rows[-1].split()[-2] == "Exhausted", budget_rows
    job_rows = [line.split() for line in out.splitlines() if line.strip().startswith(manifests.JOB)]
    assert ["demo-agent", "true", "HardCapReached"] in [row[:3] for row in job_rows]
    # Everything it started is gone: no process of the demo outlives it.
    assert "done in" in out
