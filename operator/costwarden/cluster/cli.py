"""``costwarden cluster build|up``: build the control-plane binaries or run a local cluster.

Plug into the main CLI with :func:`register`; :func:`main` runs it standalone.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from costwarden.cluster.binaries import (
    BinariesError,
    ensure_cli_tools,
    ensure_control_plane_binaries,
)
from costwarden.cluster.controlplane import ControlPlaneError, LocalControlPlane

# How often `up` checks that its components are still alive while idling in the foreground.
_HEALTH_CHECK_INTERVAL = 1.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``cluster`` subcommand (with ``build`` and ``up``) to a parent CLI."""
    cluster = subparsers.add_parser(
        "cluster",
        help="local Kubernetes control plane for tests and demos",
        description="Build and run a local kube-apiserver + etcd + kube-controller-manager.",
    )
    cluster.set_defaults(func=run)
    commands = cluster.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build", help="locate or build the control-plane binaries and print their directory"
    )
    build.add_argument(
        "--tools", action="store_true", help="also extract kubectl and helm and print their dir"
    )

    up = commands.add_parser(
        "up", help="start a local control plane and keep it running until Ctrl-C/SIGTERM"
    )
    up.add_argument(
        "--workdir",
        help="directory for PKI, logs and kubeconfig (kept on exit; default: a temp dir)",
    )
    up.add_argument(
        "--no-controller-manager",
        action="store_true",
        help="run only etcd and kube-apiserver (no Job/namespace/service-account controllers)",
    )


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``cluster`` command; returns the process exit code."""
    try:
        if args.cluster_command == "build":
            return _build(args)
        if args.cluster_command == "up":
            return _up(args)
    except (BinariesError, ControlPlaneError) as exc:
        print(f"costwarden cluster: {exc}", file=sys.stderr)
        return 1
    print(f"costwarden cluster: unknown command {args.cluster_command!r}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``main(["cluster", "up"])``."""
    parser = argparse.ArgumentParser(prog="costwarden")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def _build(args: argparse.Namespace) -> int:
    print(ensure_control_plane_binaries())
    if args.tools:
        print(ensure_cli_tools())
    return 0


def _up(args: argparse.Namespace) -> int:
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with LocalControlPlane(
            args.workdir, with_controller_manager=not args.no_controller_manager
        ) as plane:
            kubeconfig = shlex.quote(str(plane.kubeconfig_path))
            print(f"kube-apiserver: {plane.server_url}")
            print(f"kubeconfig: {plane.kubeconfig_path}")
            print(f"logs: {plane.log_dir}")
            print(f"export KUBECONFIG={kubeconfig}", flush=True)
            print("running; press Ctrl-C to stop", file=sys.stderr, flush=True)
            while not stop_requested.wait(_HEALTH_CHECK_INTERVAL):
                plane.check_alive()
            print("stopping", file=sys.stderr, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
