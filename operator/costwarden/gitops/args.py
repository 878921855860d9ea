"""Arguments the GitOps subcommands share."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from costwarden.gitops.objects import DEFAULT_NAMESPACE

EXIT_OK, EXIT_INVALID, EXIT_UNREADABLE = 0, 1, 2


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace",
        "-n",
        default=DEFAULT_NAMESPACE,
        help="namespace of objects whose metadata names none, as kubectl -n (default: default)",
    )
    parser.add_argument(
        "--price-catalog",
        type=Path,
        metavar="FILE",
        help="price catalogue YAML, as the operator's --price-catalog (default: built-in)",
    )


def parse_instant(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from error
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
