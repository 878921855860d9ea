"""`costwarden validate`, `render` and `diff`: offline reviews of budget and routing changes.

Exit codes (all three): 0 success (valid), 1 invalid manifests, 2 input that could not be
read (missing file, broken YAML, unknown git revision, unreadable usage export).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from costwarden.api.catalog import load_catalog
from costwarden.api.endpoints import ProviderHosts, provider_host_argument
from costwarden.gitops.args import (
    EXIT_INVALID,
    EXIT_OK,
    EXIT_UNREADABLE,
    add_common,
    parse_instant,
)
from costwarden.gitops.diffcli import register_diff
from costwarden.gitops.loader import ReadError, load_paths
from costwarden.gitops.output import OutputFormat, render_report
from costwarden.gitops.render import left_out, pretty, reconcile_documents
from costwarden.gitops.validate import RefPolicy, validate


def register(subparsers: Any) -> None:
    _register_validate(subparsers)
    _register_render(subparsers)
    register_diff(subparsers)


def _register_validate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check manifests offline against the API server's and the operator's rules",
        description=(
            "Check TeamBudgets and RoutingPolicies in YAML files, folders or stdin (-) with "
            "the rules the API server and the operator apply, plus references between them. "
            "Exit 0 valid, 1 invalid, 2 unreadable."
        ),
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="file, folder, or - for stdin")
    add_common(parser)
    parser.add_argument(
        "--output",
        "-o",
        type=OutputFormat,
        choices=list(OutputFormat),
        default=OutputFormat.TEXT,
        help="text (default), json, or github (workflow annotations)",
    )
    parser.add_argument(
        "--assume-exists",
        action="append",
        default=[],
        metavar="NAMESPACE/NAME",
        help="a RoutingPolicy that exists outside these manifests (repeatable)",
    )
    parser.add_argument(
        "--allow-external-refs",
        action="store_true",
        help="do not report references to RoutingPolicies outside these manifests",
    )
    parser.add_argument(
        "--allowed-provider-host",
        dest="allowed_provider_hosts",
        action="append",
        type=provider_host_argument,
        default=[],
        metavar="HOST",
        help=(
            "a provider host External models may use, as the operator's flag of that name "
            "(exact or *.suffix; repeatable; default: any)"
        ),
    )
    parser.set_defaults(func=run_validate)


def _register_render(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "render",
        help="print the gateway configuration the operator would publish for manifests",
        description=(
            "Print the GatewayConfig JSON the operator would write for these manifests, with "
            "sorted keys. Objects it would leave out are listed on stderr (exit 1)."
        ),
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="file, folder, or - for stdin")
    add_common(parser)
    parser.add_argument(
        "--now",
        type=parse_instant,
        metavar="TIME",
        help="ISO 8601 instant that decides the budget periods (default: the current time)",
    )
    parser.set_defaults(func=run_render)


def run_validate(args: argparse.Namespace) -> int:
    try:
        documents = load_paths(args.paths)
        catalog = load_catalog(args.price_catalog)
        hosts = ProviderHosts.parse(args.allowed_provider_hosts)
    except (ReadError, OSError, ValueError) as error:
        print(f"costwarden validate: {error}", file=sys.stderr)
        return EXIT_UNREADABLE
    refs = RefPolicy(frozenset(args.assume_exists), args.allow_external_refs)
    report = validate(
        documents,
        catalog=catalog,
        default_namespace=args.namespace,
        refs=refs,
        provider_hosts=hosts,
    )
    sys.stdout.write(render_report(report, args.output))
    return EXIT_OK if report.valid else EXIT_INVALID


def run_render(args: argparse.Namespace) -> int:
    try:
        documents = load_paths(args.paths)
        catalog = load_catalog(args.price_catalog)
    except (ReadError, OSError, ValueError) as error:
        print(f"costwarden render: {error}", file=sys.stderr)
        return EXIT_UNREADABLE
    result = reconcile_documents(
        documents,
        catalog=catalog,
        now=args.now or datetime.now(UTC),
        default_namespace=args.namespace,
    )
    sys.stdout.write(pretty(result))
    skipped = left_out(result)
    for line in skipped:
        print(f"left out: {line}", file=sys.stderr)
    return EXIT_INVALID if skipped else EXIT_OK
