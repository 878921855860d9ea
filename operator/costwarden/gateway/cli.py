"""``costwarden gateway``: run the data plane, shared or as a sidecar; and the dev upstream.

Plug into the main CLI with :func:`register` and :func:`register_upstream`; run it
standalone with ``python -m costwarden.gateway``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
import urllib.parse
from pathlib import Path

from costwarden.api.usage import UsageSink
from costwarden.gateway.config import ConfigStore
from costwarden.gateway.credentials import SHARED_HINT, SIDECAR_HINT, Credentials
from costwarden.gateway.egress import CA_FILE_ENV, Egress
from costwarden.gateway.holds import HoldJournal, journal_path
from costwarden.gateway.identity import Identifier, SharedIdentifier, SidecarIdentifier
from costwarden.gateway.leases import Leases
from costwarden.gateway.metrics import rejected_reason
from costwarden.gateway.proxy import Gateway
from costwarden.gateway.reporting import OperatorReportingSink
from costwarden.gateway.server import serve
from costwarden.gateway.sinks import FanoutSink, FsyncPolicy, JsonlLedgerSink
from costwarden.gateway.upstream import CLIENTS, make_upstream
from costwarden.supervision import UNHEALTHY_AFTER

Subparsers = argparse._SubParsersAction


def register(subparsers: Subparsers) -> None:
    """Add the ``gateway`` subcommand."""
    parser = subparsers.add_parser(
        "gateway",
        help="run the LLM gateway (shared Deployment or per-pod sidecar)",
        description="Meter, route and limit OpenAI- and Anthropic-format LLM calls.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--config",
        type=Path,
        required=True,
        help="the rendered GatewayConfig JSON (ConfigMap key gateway-config.json)",
    )
    parser.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")  # noqa: S104
    parser.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="port of GET /metrics (Prometheus), apart from the API port (default 0: off)",
    )
    parser.add_argument(
        "--metrics-host", help="listen address of the metrics port (default: --host)"
    )
    parser.add_argument(
        "--mode",
        choices=("shared", "sidecar"),
        default="shared",
        help="shared: callers prove identity by token; sidecar: the pod is the caller",
    )
    parser.add_argument(
        "--pod-labels-file",
        type=Path,
        default=Path(env("COSTWARDEN_POD_LABELS_FILE", "/etc/podinfo/labels")),
        help='sidecar: downward-API labels file (key="value" lines)',
    )
    parser.add_argument(
        "--job-name",
        default=None,
        help="sidecar: the pod's Job as the injector learnt it from the Job controller "
        "(empty: not a Job's pod); the labels are then not trusted for the job. Unset: the "
        "job is read from the labels file (hand-run sidecars only)",
    )
    parser.add_argument(
        "--api-keys-file",
        type=Path,
        help="shared: YAML/JSON mapping sha256(key) hex to a team id or {team, namespace, job}",
    )
    parser.add_argument("--kubeconfig", help="shared: kubeconfig for TokenReview and pod lookups")
    parser.add_argument(
        "--in-cluster",
        action="store_true",
        help="shared: use the pod's service account for TokenReview",
    )
    parser.add_argument(
        "--token-audience",
        action="append",
        default=None,
        help="shared: audiences to review callers' tokens for (repeatable; default "
        "costwarden.io/gateway: a pod's default token is refused)",
    )
    parser.add_argument(
        "--credentials-dir",
        type=Path,
        help="provider keys as files <dir>/<namespace>_<secret>_<key> (the operator's "
        "provider-keys Secret, mounted); else env COSTWARDEN_CREDENTIAL_<NS>_<NAME>_<KEY>",
    )
    parser.add_argument("--ledger", type=Path, help="append usage records to this JSON Lines file")
    # Benchmarks only (benchmarks/reservation.py): a gateway that does not reserve before
    # forwarding can overspend its caps, so the flag is not offered in --help.
    parser.add_argument("--no-reservation", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--report-to",
        default=env("COSTWARDEN_REPORT_TO"),
        help="operator ingestion URL (e.g. https://costwarden-operator-ingest.costwarden-system"
        ".svc:8081): usage is delivered there, re-sent from --ledger until acknowledged "
        "(docs/accounting.md). https, except to a loopback address",
    )
    parser.add_argument(
        "--report-ca-file",
        type=Path,
        default=env("COSTWARDEN_REPORT_CA_FILE"),
        help="CA bundle (PEM) the operator's ingestion certificate must chain to (the "
        "operator publishes it; re-read when it changes); default: the system's CAs",
    )
    parser.add_argument(
        "--report-token-file",
        type=Path,
        default=env("COSTWARDEN_REPORT_TOKEN_FILE"),
        help="bearer token presented to the operator: the pod's projected service-account "
        "token, or a shared token (re-read on every send)",
    )
    parser.add_argument(
        "--ledger-fsync",
        choices=[p.value for p in FsyncPolicy],
        default=FsyncPolicy.BATCH.value,
        help="ledger durability (docs/ledger.md)",
    )
    parser.add_argument(
        "--ledger-max-bytes",
        type=int,
        default=48 * 1024 * 1024,
        help="bound of --ledger: at it, new calls are refused with 503 ledger_full rather "
        "than lose usage (with --report-to, acknowledged entries are rotated out first); "
        "keep it under the volume's size (docs/ledger.md)",
    )
    parser.add_argument(
        "--replica-id",
        default=env("POD_NAME") or socket.gethostname(),
        help="this replica's name in usage records (default: POD_NAME or host)",
    )
    parser.add_argument(
        "--upstream-client",
        choices=CLIENTS,
        default="http1",
        help="HTTP client for upstream calls (default http1: see benchmarks/README.md); "
        "all of them honour HTTPS_PROXY / HTTP_PROXY / ALL_PROXY / NO_PROXY",
    )
    parser.add_argument(
        "--upstream-ca-file",
        type=Path,
        default=env(CA_FILE_ENV),
        help="PEM bundle of CAs trusted for upstreams in addition to the system ones "
        f"(SSL_CERT_FILE replaces those), e.g. a TLS-inspecting proxy's; env {CA_FILE_ENV}",
    )
    parser.add_argument(
        "--liveness-task-failure-seconds",
        type=float,
        default=UNHEALTHY_AFTER,
        help="/healthz fails once a background task (config watch, usage reporting, ledger) "
        f"has been failing this long (default {UNHEALTHY_AFTER:.0f}; docs/operations.md)",
    )
    parser.add_argument(
        "--otel",
        action="store_true",
        help="export a GenAI span per call over OTLP/HTTP to where the standard "
        "OTEL_EXPORTER_OTLP_ENDPOINT says (default http://localhost:4318); needs the otel "
        'extra (docs/gateway.md, "OpenTelemetry"); off by default',
    )
    parser.add_argument(
        "--otel-endpoint",
        metavar="URL",
        help="like --otel, to this OTLP/HTTP base URL (/v1/traces and /v1/metrics are appended)",
    )
    parser.add_argument(
        "--otel-metrics",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="with --otel: also export the gen_ai.client.token.usage and "
        "gen_ai.client.operation.duration histograms (default off: ~40 us more per call)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        help="INFO logs one JSON decision line per call; WARNING silences them",
    )


def register_upstream(subparsers: Subparsers) -> None:
    """Add the hidden dev subcommand ``upstream``: the local fake OpenAI/Anthropic upstream."""
    parser = subparsers.add_parser(
        "upstream", help="a local OpenAI- and Anthropic-compatible model server (tests, demo)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.set_defaults(func=_run_upstream)


def _run_upstream(args: argparse.Namespace) -> int:
    from costwarden.testing.upstream import serve

    serve(args.host, args.port)
    return 0


def _identifier(args: argparse.Namespace) -> Identifier:
    if args.mode == "sidecar":
        return SidecarIdentifier.from_env(args.pod_labels_file, args.job_name)
    verifier = None
    if args.kubeconfig or args.in_cluster:
        from costwarden.gateway.tokenreview import TokenReviewVerifier, api_client

        verifier = TokenReviewVerifier(api_client(args.kubeconfig), args.token_audience)
    return SharedIdentifier(args.api_keys_file, verifier)


def _sink(args: argparse.Namespace) -> UsageSink:
    if args.report_to:
        return OperatorReportingSink(
            args.report_to,
            replica_id=args.replica_id,
            ledger=args.ledger,
            fsync=FsyncPolicy(args.ledger_fsync),
            token_file=args.report_token_file,
            ca_file=args.report_ca_file,
            max_bytes=args.ledger_max_bytes,
        )
    if args.ledger is None:
        return FanoutSink([])  # records still reach metrics and the decision log
    return JsonlLedgerSink(args.ledger, FsyncPolicy(args.ledger_fsync), args.ledger_max_bytes)


def build_gateway(args: argparse.Namespace) -> Gateway:
    store = ConfigStore(args.config)
    store.poll()
    egress = Egress.from_env(ca_file=args.upstream_ca_file)
    logging.getLogger(__name__).info("%s", egress.describe())
    gateway = Gateway(
        config=store,
        identifier=_identifier(args),
        upstream=make_upstream(args.upstream_client, egress),
        sink=_sink(args),
        credentials=Credentials(
            args.credentials_dir, hint=SIDECAR_HINT if args.mode == "sidecar" else SHARED_HINT
        ),
        replica_id=args.replica_id,
        reserving=not args.no_reservation,
    )
    if args.ledger is not None:
        # Before serving (and before the sink's tasks are supervised: no loop runs yet),
        # calls a killed predecessor left in flight are charged at their reservation, once
        # (docs/ledger.md, "Calls in flight at a kill").
        journal = HoldJournal(
            journal_path(args.ledger),
            replica_id=args.replica_id,
            fsync=FsyncPolicy(args.ledger_fsync),
        )
        journal.recover(gateway.sink, args.ledger, gateway.metrics)
        journal.supervisor = gateway.supervisor
        gateway.holds = journal
    if args.otel or args.otel_endpoint:
        from costwarden.gateway.telemetry import OtelTelemetry

        gateway.telemetry = OtelTelemetry.otlp(args.otel_endpoint, metrics=args.otel_metrics)
    gateway.supervisor.unhealthy_after = args.liveness_task_failure_seconds
    if hasattr(gateway.sink, "supervisor"):
        gateway.sink.supervisor = gateway.supervisor
    if hasattr(gateway.sink, "on_phases"):
        # Learn Exhausted from the operator's acknowledgement, before the config reload.
        gateway.sink.on_phases = gateway.limits.note_operator_phases
    if hasattr(gateway.sink, "on_rejected"):
        rejected = gateway.metrics.usage_rejected
        gateway.sink.on_rejected = lambda reason: rejected.labels(
            reason=rejected_reason(reason)
        ).inc()
    sink = gateway.sink
    if isinstance(sink, OperatorReportingSink) and gateway.reserving:
        reservations = gateway.reservations
        leased = gateway.metrics.leased_usd
        gateway.leases = Leases(
            sink.post,
            lambda: sink.source,
            lambda team: reservations.team(team).cost,
            on_lease=lambda team, amount: leased.labels(team).set(float(amount)),
        )
        gateway.leases.restore(sink.unacked_usage())
    if isinstance(sink, OperatorReportingSink):
        gateway.metrics.usage_pending.set_function(lambda: sink.pending)
        gateway.metrics.usage_held_teams.set_function(lambda: len(sink.held_teams))
        gateway.metrics.ledger_bytes.set_function(lambda: sink.ledger_bytes)
        gateway.metrics.ledger_unwritten.set_function(lambda: sink.unwritten)
    elif isinstance(sink, JsonlLedgerSink):
        gateway.metrics.ledger_bytes.set_function(lambda: sink.ledger_bytes)
        gateway.metrics.ledger_unwritten.set_function(lambda: sink.unwritten)
    return gateway


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    decisions = logging.getLogger("costwarden.gateway.decision")
    decisions.addHandler(handler)
    decisions.propagate = False
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - a declared dependency; stdlib asyncio still works
        pass
    try:
        check_report_to(args.report_to)
        gateway = build_gateway(args)
    except ValueError as exc:
        print(f"costwarden gateway: {exc}", file=sys.stderr)
        return 2
    # Everything allocated so far (modules, models, the compiled configuration) lives as
    # long as the process: frozen out of the collector, a full collection no longer walks
    # it (measured here: a 46 ms pause at 500 rps without this, the p99 of that second).
    gc.collect()
    gc.freeze()
    asyncio.run(_serve_until_signalled(gateway, args))
    return 0


def check_report_to(url: str | None) -> None:
    """The reporting token must not cross a network in clear: https, or loopback http."""
    if not url:
        return
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "https":
        return
    host = parsed.hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if parsed.scheme != "http" or not loopback:
        raise ValueError(
            f"--report-to {url!r}: the operator's ingestion is served over https "
            "(http only to a loopback address)"
        )


async def _serve_until_signalled(gateway: Gateway, args: argparse.Namespace) -> None:
    """Serve until SIGTERM/SIGINT; then in-flight calls finish and the sinks flush."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(
        gateway, args.host, args.port, stop,
        metrics_host=args.metrics_host, metrics_port=args.metrics_port,
    )  # fmt: skip
    if gateway.holds is not None:
        await gateway.holds.close()  # every call settled: the journal holds nothing open
    if gateway.telemetry is not None:
        # The last spans flushed (a blocking export, bounded by the exporter's timeout).
        await asyncio.to_thread(gateway.telemetry.shutdown)


def main(argv: list[str] | None = None) -> int:
    """``python -m costwarden.gateway [gateway|upstream] ...`` (``gateway`` if omitted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("gateway", "upstream"):
        argv.insert(0, "gateway")
    parser = argparse.ArgumentParser(prog="python -m costwarden.gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    register_upstream(sub)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result
