"""`costwarden demo`: register the subcommand."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the local demo: control plane, operator, gateway, a budget, a stopped agent",
        description=(
            "Start a local Kubernetes control plane (or use --kubeconfig), the operator, a "
            "local model upstream and the gateway; apply examples/ and a demo budget; run a "
            "simulated agent Job until the soft limit downgrades its model and the hard cap "
            "stops it. Everything is cleaned up at the end or on Ctrl-C."
        ),
    )
    parser.add_argument(
        "--kubeconfig",
        help="run on this cluster instead of a local control plane (e.g. kind, minikube)",
    )
    parser.add_argument("--workdir", type=Path, help="keep logs and the ledger here")
    parser.add_argument("--plain", action="store_true", help="no live redraw: one line per update")
    parser.add_argument("--keep", action="store_true", help="keep everything running until Ctrl-C")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from costwarden.demo.scenario import run  # heavy imports only when the demo runs

    return run(args)
