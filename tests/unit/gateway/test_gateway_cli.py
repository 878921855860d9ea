"""The ``gateway`` and ``upstream`` subcommands as the main CLI registers them."""

from __future__ import annotations

import argparse
from pathlib import Path

from costwarden.gateway import cli


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="costwarden")
    sub = root.add_subparsers(dest="command", required=True)
    cli.register(sub)
    cli.register_upstream(sub)
    return root


def test_gateway_flags_and_defaults() -> None:
    args = parser().parse_args(["gateway", "--config", "/etc/cw/gateway-config.json"])

    assert args.func is cli.run
    assert args.config == Path("/etc/cw/gateway-config.json")
    assert (args.port, args.mode, args.upstream_client) == (8000, "shared", "http1")
    assert args.ledger is None
    assert args.api_keys_file is None


def test_sidecar_flags() -> None:
    args = parser().parse_args(
        ["gateway", "--config", "c.json", "--mode", "sidecar", "--pod-labels-file", "/pod/labels",
         "--port", "9001", "--replica-id", "r1", "--ledger", "/var/lib/cw/usage.jsonl"]
    )  # fmt: skip

    assert (args.mode, args.pod_labels_file, args.port) == ("sidecar", Path("/pod/labels"), 9001)
    assert (args.replica_id, args.ledger) == ("r1", Path("/var/lib/cw/usage.jsonl"))


def test_upstream_dev_subcommand() -> None:
    args = parser().parse_args(["upstream", "--port", "9100"])

    assert args.port == 9100
    assert callable(args.func)
