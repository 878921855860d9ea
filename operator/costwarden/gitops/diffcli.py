"""`costwarden diff`: what a change to budgets and routing does, for a pull request review."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from costwarden.api.catalog import load_catalog
from costwarden.gitops.args import EXIT_OK, EXIT_UNREADABLE, add_common, parse_instant
from costwarden.gitops.diff import DiffResult, compare
from costwarden.gitops.gitrev import load_revision
from costwarden.gitops.loader import Document, ReadError, load_paths
from costwarden.gitops.replay import ASSUMPTIONS, ReplayEstimate, replay
from costwarden.gitops.usage import read_usage
from costwarden.gitops.words import signed_usd, usd

MAX_DETAILS = 25
"""Text output lists at most this many details per change (JSON lists them all)."""


def register_diff(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "diff",
        help="say what a change to TeamBudgets and RoutingPolicies does",
        description=(
            "Compare two revisions (--base REV [--head REV] [PATH...]) or two paths "
            "(OLD_PATH NEW_PATH): caps, soft limits, periods, enforcement, rules, default "
            "models, prices, and which request classes now go to a different model. With "
            "--usage, estimate the monthly cost effect by replaying recorded calls."
        ),
    )
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="with --base: paths to compare (default: examples/ if present, else .); "
        "without: OLD_PATH NEW_PATH",
    )
    parser.add_argument("--base", metavar="REV", help="git revision before the change")
    parser.add_argument(
        "--head", metavar="REV", help="git revision after the change (default: working tree)"
    )
    add_common(parser)
    parser.add_argument(
        "--usage",
        type=Path,
        metavar="FILE",
        help="usage export to replay: the gateway's JSON Lines ledger, or a .csv",
    )
    parser.add_argument(
        "--usage-days",
        type=int,
        metavar="DAYS",
        help="days the usage export covers (default: from its first to its last call)",
    )
    parser.add_argument("--now", type=parse_instant, metavar="TIME", help="ISO 8601 instant")
    parser.add_argument("--output", "-o", choices=["text", "json"], default="text")
    parser.set_defaults(func=run_diff, parser=parser)


def _sides(args: argparse.Namespace) -> tuple[list[Document], list[Document]]:
    if args.base:
        paths = args.paths or (["examples"] if Path("examples").is_dir() else ["."])
        old = load_revision(args.base, paths)
        new = load_revision(args.head, paths) if args.head else load_paths(paths)
        return old, new
    if len(args.paths) != 2:
        args.parser.error("give --base REV, or exactly two paths OLD_PATH NEW_PATH")
    return load_paths([args.paths[0]]), load_paths([args.paths[1]])


def run_diff(args: argparse.Namespace) -> int:
    try:
        old, new = _sides(args)
        catalog = load_catalog(args.price_catalog)
        export = read_usage(args.usage) if args.usage else None
    except (ReadError, OSError, ValueError) as error:
        print(f"costwarden diff: {error}", file=sys.stderr)
        return EXIT_UNREADABLE
    now = args.now or datetime.now(UTC)
    result = compare(old, new, catalog=catalog, now=now, default_namespace=args.namespace)
    estimate = None
    if export is not None:
        estimate = replay(
            export, result.old.result.config, result.new.result.config, days=args.usage_days
        )
    if args.output == "json":
        sys.stdout.write(json.dumps(as_json(result, estimate), indent=2) + "\n")
    else:
        sys.stdout.write(as_text(result, estimate))
    return EXIT_OK


def as_text(result: DiffResult, estimate: ReplayEstimate | None) -> str:
    lines: list[str] = []
    current = ""
    for change in result.changes:
        if change.object != current:
            current = change.object
            lines.append(current)
        lines.append(f"  - {change.text}")
        lines += [f"      {d}" for d in change.details[:MAX_DETAILS]]
        if len(change.details) > MAX_DETAILS:
            lines.append(f"      ... and {len(change.details) - MAX_DETAILS} more (--output json)")
    if not result.changes:
        lines.append("no change to TeamBudgets or RoutingPolicies")
    if estimate is not None:
        lines += ["", *replay_text(estimate)]
    return "\n".join(lines) + "\n"


def replay_text(estimate: ReplayEstimate) -> list[str]:
    lines = [
        f"Estimated monthly cost effect of the change (replaying {estimate.calls} calls "
        f"over {estimate.days} days):",
        f"  before: {usd(estimate.old_monthly)} per month",
        f"  after:  {usd(estimate.new_monthly)} per month",
        f"  change: {signed_usd(estimate.monthly_change)} per month",
        f"  {estimate.moved} calls change model, {estimate.refused} would be refused; "
        f"{estimate.inferred} calls had their routing hints inferred",
    ]
    for (before, after), count in sorted(estimate.moves.items()):
        lines.append(f"    {count} x {before} → {after}")
    for reason, count in sorted(estimate.skipped.items()):
        lines.append(f"  skipped {count}: {reason}")
    lines.append("  assumptions:")
    lines += [f"    - {a}" for a in ASSUMPTIONS]
    return lines


def as_json(result: DiffResult, estimate: ReplayEstimate | None) -> dict[str, Any]:
    document: dict[str, Any] = {"changes": [c.to_json() for c in result.changes]}
    if estimate is not None:
        document["replay"] = {
            "calls": estimate.calls,
            "days": str(estimate.days),
            "movedCalls": estimate.moved,
            "refusedCalls": estimate.refused,
            "inferredCalls": estimate.inferred,
            "oldCostUSD": str(estimate.old_cost),
            "newCostUSD": str(estimate.new_cost),
            "recordedCostUSD": str(estimate.recorded_cost),
            "oldMonthlyUSD": str(estimate.old_monthly),
            "newMonthlyUSD": str(estimate.new_monthly),
            "monthlyChangeUSD": str(estimate.monthly_change),
            "moves": [
                {"from": before, "to": after, "calls": count}
                for (before, after), count in sorted(estimate.moves.items())
            ],
            "skipped": dict(estimate.skipped),
            "assumptions": list(ASSUMPTIONS),
        }
    return document
