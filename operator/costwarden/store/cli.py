"""``costwarden report``, ``costwarden export focus`` and ``costwarden reconcile``: the
usage store's questions, offline (they read the store's files; docs/store.md)."""

from __future__ import annotations

import argparse
import os
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

STORE_ENV = "COSTWARDEN_STORE_DIR"


def _store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", default=os.environ.get(STORE_ENV, ""),
        help="the usage store: a directory or s3://bucket/prefix (the operator's --store-dir); "
        f"default ${STORE_ENV}",
    )  # fmt: skip
    parser.add_argument(
        "--period", default="",
        help="UTC days to read: 2026-11 (a month), 2026-11-05, or 2026-11-01..2026-11-15",
    )  # fmt: skip


def _output_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=("table", "csv", "json"), default="table")


def register(subparsers: Any) -> None:
    report = subparsers.add_parser(
        "report", help="spend by tag, cost per merged change, waste (from the usage store)",
        description="Answers from the usage store (Parquet, queried with DuckDB).",
    )  # fmt: skip
    kinds = report.add_subparsers(title="reports", metavar="REPORT")
    spend = kinds.add_parser("spend", help="spend, tokens and calls by one or more tags")
    spend.add_argument(
        "--by", action="append", default=[],
        help="a tag: team, namespace, job, project, repository, environment, application, "
        "change, served_model, provider, task, ... or any label key (repeatable)",
    )  # fmt: skip
    changes = kinds.add_parser(
        "changes", help="repositories by cost per merged change; spend on unmerged changes"
    )
    waste = kinds.add_parser(
        "waste", help="spend on failed, disconnected or refused calls, stopped jobs and "
        "changes closed or reverted",
    )  # fmt: skip
    for sub, func in ((spend, _spend), (changes, _changes), (waste, _waste)):
        _store_args(sub)
        _output_arg(sub)
        sub.add_argument(
            "--outcomes", action="append", default=[],
            help="change outcomes (JSON, JSON Lines, CSV or Parquet: repository, change, "
            "outcome, time, source), besides those in the store's outcomes/ (repeatable)",
        )  # fmt: skip
        sub.set_defaults(func=func)
    report.set_defaults(func=lambda _a: (report.print_help(), 2)[1])

    export = subparsers.add_parser("export", help="export the usage store (FOCUS)")
    formats = export.add_subparsers(title="formats", metavar="FORMAT")
    focus = formats.add_parser(
        "focus", help="a FinOps FOCUS 1.2 cost and usage file for a billing period"
    )
    _store_args(focus)
    focus.add_argument("--file", "-f", default="", help="where to write (default focus-PERIOD.EXT)")
    focus.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    focus.add_argument(
        "--billing-account", default="costwarden",
        help="BillingAccountId / BillingAccountName (e.g. the cluster's name)",
    )  # fmt: skip
    focus.set_defaults(func=_focus)
    export.set_defaults(func=lambda _a: (export.print_help(), 2)[1])

    store = subparsers.add_parser("store", help="maintain the usage store")
    actions = store.add_subparsers(title="actions", metavar="ACTION")
    compact = actions.add_parser(
        "compact", help="merge closed days' small part files into one per team and source"
    )
    compact.add_argument(
        "--store", default=os.environ.get(STORE_ENV, ""), help="the usage store's directory"
    )
    compact.add_argument(
        "--before", default="",
        help="compact days before this UTC day (default: two days ago, so gateways have "
        "finished delivering)",
    )  # fmt: skip
    compact.set_defaults(func=_compact)
    store.set_defaults(func=lambda _a: (store.print_help(), 2)[1])

    reconcile = subparsers.add_parser(
        "reconcile", help="compare a provider's usage and cost export with the usage store",
    )  # fmt: skip
    reconcile.add_argument("--provider", choices=("openai", "anthropic"), required=True)
    reconcile.add_argument(
        "--from", dest="files", action="append", default=[],
        help="a saved API response (usage or cost; one page, a list of pages or JSON Lines; "
        "repeatable). Without --from, the provider's admin API is called.",
    )  # fmt: skip
    reconcile.add_argument(
        "--admin-key-env", default="",
        help="the environment variable holding the admin key (default OPENAI_ADMIN_KEY or "
        "ANTHROPIC_ADMIN_KEY); the key is never printed",
    )  # fmt: skip
    reconcile.add_argument("--base-url", default="", help="the provider's API base URL")
    reconcile.add_argument(
        "--gateway-key", action="append", default=[],
        help="a provider API key id (or project/workspace id) the gateway uses: usage under "
        "any other is named as calls around the gateway (repeatable)",
    )  # fmt: skip
    reconcile.add_argument(
        "--event-on", default="", metavar="NAMESPACE/NAME",
        help="on any difference, post a Warning Event (reason ReconciliationMismatch) on this "
        "TeamBudget, as `kubectl describe teambudget` shows it",
    )  # fmt: skip
    reconcile.add_argument(
        "--kubeconfig", default="", help="for --event-on: default in-cluster, else ~/.kube/config"
    )
    reconcile.add_argument("--tolerance-tokens", type=int, default=0)
    reconcile.add_argument("--tolerance-usd", default="0.01")
    _store_args(reconcile)
    _output_arg(reconcile)
    reconcile.set_defaults(func=_reconcile)


def _open(args: argparse.Namespace) -> Any:
    try:
        from costwarden.store import query
    except ModuleNotFoundError as exc:  # pyarrow or duckdb: the optional extra
        raise SystemExit(
            f"costwarden: the usage store needs {exc.name}: pip install 'costwarden[store]'"
        ) from exc

    if not args.store:
        raise SystemExit(f"costwarden: name the store (--store DIR or ${STORE_ENV})")
    if not args.store.startswith("s3://") and not Path(args.store).is_dir():
        raise SystemExit(f"costwarden: no usage store at {args.store}")
    try:
        period = query.Period.parse(args.period)
    except ValueError as exc:
        raise SystemExit(f"costwarden: --period {args.period!r}: {exc}") from exc
    try:
        con = query.connect(args.store, period, getattr(args, "outcomes", []))
    except (ValueError, OSError) as exc:
        raise SystemExit(f"costwarden: {exc}") from exc
    return con, period


def _print(result: Any, output: str) -> int:
    from costwarden.store import query

    render = {"table": query.as_text, "csv": query.as_csv, "json": query.as_json}[output]
    sys.stdout.write(render(result))
    return 0


def _spend(args: argparse.Namespace) -> int:
    from costwarden.store import query

    con, _ = _open(args)
    try:
        return _print(query.spend_by(con, args.by or ["team"]), args.output)
    except ValueError as exc:
        raise SystemExit(f"costwarden: {exc}") from exc


def _changes(args: argparse.Namespace) -> int:
    from costwarden.store import query

    con, _ = _open(args)
    return _print(query.changes(con), args.output)


def _waste(args: argparse.Namespace) -> int:
    from costwarden.store import query

    con, _ = _open(args)
    return _print(query.waste(con), args.output)


def _focus(args: argparse.Namespace) -> int:
    from costwarden.store import focus

    if not args.period:
        raise SystemExit("costwarden: name the billing period (--period 2026-11)")
    con, period = _open(args)
    rows = focus.focus_rows(con, period, account=args.billing_account)
    ext = "parquet" if args.format == "parquet" else "csv"
    out = Path(args.file or f"focus-{args.period}.{ext}")
    focus.write(rows, period, out, args.format)
    print(
        f"wrote {len(rows)} FOCUS {focus.FOCUS_VERSION} rows to {out} "
        f"(metadata: {out}.metadata.json)"
    )
    return 0


def _compact(args: argparse.Namespace) -> int:
    from datetime import UTC, date, datetime, timedelta

    from costwarden.store.writer import compact

    if not args.store or not Path(args.store).is_dir():
        raise SystemExit("costwarden: name an existing store (--store DIR)")
    try:
        before = (
            date.fromisoformat(args.before)
            if args.before
            else datetime.now(UTC).date() - timedelta(days=2)
        )
    except ValueError as exc:
        raise SystemExit(f"costwarden: --before {args.before!r}: {exc}") from exc
    written, removed = compact(args.store, before)
    print(f"compacted days before {before}: {removed} files merged into {written}")
    return 0


def _post_event(args: argparse.Namespace, differences: list[Any], pages: int) -> None:
    """A Warning Event on the TeamBudget named by --event-on, summing up the differences."""
    from kubernetes import client, config

    from costwarden.api.meta import API_VERSION
    from costwarden.controllers.events import event_body

    namespace, _, name = args.event_on.partition("/")
    if not namespace or not name:
        raise SystemExit("costwarden: --event-on takes NAMESPACE/NAME")
    try:
        if args.kubeconfig:
            config.load_kube_config(config_file=args.kubeconfig)
        else:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
        api = client.ApiClient()
        budget: Any = client.CustomObjectsApi(api).get_namespaced_custom_object(
            "costwarden.io", "v1alpha1", namespace, "teambudgets", name
        )
        money = [d for d in differences if d.metric in ("cost_usd", "unmetered_usd")]
        gap = sum((d.delta for d in money), Decimal(0))
        first = differences[0]
        message = (
            f"{len(differences)} differences between {args.provider}'s export ({pages} pages) "
            f"and costwarden's records for {args.period or 'all days'}; money: provider minus "
            f"costwarden = {gap} USD. First: {first.day} {first.model or first.key} "
            f"{first.metric} {first.provider} vs {first.costwarden}: {first.cause}"
        )
        body = event_body(
            api_version=API_VERSION, kind="TeamBudget", namespace=namespace, name=name,
            uid=budget["metadata"]["uid"], event_type="Warning",
            reason="ReconciliationMismatch", message=message,
        )  # fmt: skip
        client.CoreV1Api(api).create_namespaced_event(namespace, body)  # type: ignore[arg-type]
    except (client.ApiException, config.ConfigException, OSError) as exc:
        raise SystemExit(f"costwarden: --event-on {args.event_on}: {exc}") from exc


def _reconcile(args: argparse.Namespace) -> int:
    from costwarden.store import query, reconcile

    con, period = _open(args)
    export = reconcile.Export()
    reader = reconcile.READERS[args.provider]
    try:
        if args.files:
            for name in args.files:
                reader(reconcile.load_pages(Path(name)), export)
        else:
            env = args.admin_key_env or f"{args.provider.upper()}_ADMIN_KEY"
            key = os.environ.get(env, "")
            if not key:
                raise SystemExit(f"costwarden: no --from file and no admin key in ${env}")
            start, end = period.bounds()
            pages = reconcile.fetch(args.provider, key, start, end, base_url=args.base_url or None)
            reader(pages, export)
        tolerance = Decimal(args.tolerance_usd)
    except (ValueError, OSError, RuntimeError, ArithmeticError) as exc:
        raise SystemExit(f"costwarden: {exc}") from exc
    differences = reconcile.compare(
        export, reconcile.metered(con, args.provider), gateway_keys=args.gateway_key,
        tolerance_tokens=args.tolerance_tokens, tolerance_usd=tolerance,
    )  # fmt: skip
    if differences and args.event_on:
        _post_event(args, differences, export.pages)
    result = reconcile.as_result(differences)
    if args.output == "table" and not differences:
        print(f"no differences ({export.pages} pages from {args.provider})")
        return 0
    _print(result, args.output)
    del query
    return 1 if differences else 0
