"""The `costwarden` command: the operator, the gateway, and tools for clusters and GitOps."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from costwarden import __version__

# Each subcommand lives next to the code it runs and registers itself; a missing optional
# module (a subcommand not built yet) must not break the others.
_SUBCOMMANDS = (
    "costwarden.controllers.main",
    "costwarden.gateway.cli",
    "costwarden.cluster.cli",
    "costwarden.gitops.cli",
    "costwarden.demo.cli",
    "costwarden.results_cli",
    "costwarden.store.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="costwarden",
        description=(
            "costwarden makes AI spend a governed Kubernetes resource: TeamBudgets and "
            "RoutingPolicies, a metering gateway, and an operator that enforces them."
        ),
    )
    parser.add_argument("--version", action="version", version=f"costwarden {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module_name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        module.register(subparsers)
        for extra in ("register_upstream",):
            if hasattr(module, extra):
                getattr(module, extra)(subparsers)
    crds = subparsers.add_parser("crds", help="print the CustomResourceDefinitions (YAML)")
    crds.set_defaults(func=_print_crds)
    return parser


def _print_crds(_: argparse.Namespace) -> int:
    from costwarden.api.crd import main as crd_main

    return crd_main([])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
