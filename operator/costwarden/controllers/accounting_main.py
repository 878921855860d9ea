"""The accounting and enforcement side of `costwarden operator`: flags, wiring, start-up.

Kept apart from ``main`` (which owns Kopf's configuration) so each concern has one file:
``main`` adds these flags and puts :func:`build`'s result in Kopf's memo; the start-up
handler below starts the ingestion server, the Job watch and the enforcement checks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client

from costwarden.api.results import ChangeOutcome
from costwarden.controllers import clock
from costwarden.controllers.accountant import Accountant
from costwarden.controllers.budgets import BudgetIndex
from costwarden.controllers.enforcer import Enforcer
from costwarden.controllers.ingest import Ingestion, serve
from costwarden.controllers.ingest_auth import IngestAuth
from costwarden.controllers.ingest_tls import DEFAULT_CA_CONFIGMAP, IngestTLS, publish_ca
from costwarden.controllers.jobwatch import JobWatch
from costwarden.controllers.reconciler import Reconciler
from costwarden.controllers.rest import Rest
from costwarden.controllers.results import Results
from costwarden.policy.leases import LEASE_SECONDS
from costwarden.supervision import Supervisor

log = logging.getLogger(__name__)

DEFAULT_INGEST_PORT = 8081


def accounting_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "usage accounting and enforcement", "gateways report usage here (docs/accounting.md)"
    )
    group.add_argument(
        "--ingest-port",
        type=int,
        default=DEFAULT_INGEST_PORT,
        help=f"port of POST /v1/usage, where gateways report usage (default "
        f"{DEFAULT_INGEST_PORT}; 0: off)",
    )
    group.add_argument(
        "--ingest-listen-address", default="0.0.0.0",  # noqa: S104
        help="address the ingestion server listens on (default 0.0.0.0)",
    )  # fmt: skip
    group.add_argument(
        "--ingest-token-file",
        type=Path,
        help="file of shared bearer tokens (one a line) a gateway may present (a Secret mount)",
    )
    group.add_argument(
        "--ingest-allowed-sa",
        action="append",
        default=None,
        metavar="NAMESPACE:NAME",
        help="service account whose tokens (checked by TokenReview) may report usage "
        "(repeatable; default: $COSTWARDEN_INGEST_ALLOWED_SA, comma-separated)",
    )
    group.add_argument(
        "--lease-seconds",
        type=float,
        default=LEASE_SECONDS,
        help="how long a gateway replica's lease of a team's budget lives without renewal "
        "before it is reclaimed (docs/gateway.md, Leases); replicas renew at a third of it",
    )
    group.add_argument(
        "--ingest-allow-sidecars",
        action="store_true",
        help="accept injected sidecars' pod-bound tokens (audience costwarden.io/ingest), "
        "each for its own pod's usage only (docs/sidecar-injection.md)",
    )
    group.add_argument(
        "--ingest-cert-dir",
        type=Path,
        help="tls.crt, tls.key and ca.crt the ingestion server serves (e.g. cert-manager); "
        "generated there when absent (default: a private temporary directory). Ingestion is "
        "HTTPS only",
    )
    group.add_argument(
        "--ingest-tls-hostname",
        action="append",
        default=[],
        metavar="NAME",
        help="a name reporters use for the ingestion server, put in a generated certificate "
        "(repeatable; the chart passes the ingest Service's names)",
    )
    group.add_argument(
        "--ingest-ca-configmap",
        default=DEFAULT_CA_CONFIGMAP,
        help="ConfigMap in --namespace the CA bundle is published in (key ca.crt) for the "
        f"gateway's --report-ca-file (default {DEFAULT_CA_CONFIGMAP}; empty: not published)",
    )
    group.add_argument(
        "--results-token-file",
        type=Path,
        help="file of bearer tokens (one a line, a Secret mount) that may report change "
        "outcomes for every team (POST /v1/results; docs/attribution.md)",
    )
    group.add_argument(
        "--github-webhook-secret-file",
        type=Path,
        help="file of GitHub webhook secrets (one a line, a Secret mount): enables POST "
        "/v1/results/github, pull_request deliveries signed with one of them",
    )
    group.add_argument(
        "--results-log",
        type=Path,
        help="append every change outcome reported to this JSON Lines file (for the usage "
        "store and costwarden report)",
    )
    group.add_argument(
        "--store-dir",
        default=os.environ.get("COSTWARDEN_STORE_DIR", ""),
        help="write every acknowledged usage record, exactly once, to Parquet files under "
        "this directory (docs/store.md; needs the costwarden[store] extra); default "
        "$COSTWARDEN_STORE_DIR or off",
    )
    group.add_argument(
        "--clock-offset",
        type=float,
        default=float(os.environ.get(clock.ENV_OFFSET) or 0),
        help="TESTING ONLY: shift the operator's clock by this many seconds (periods, "
        "rollover); default $COSTWARDEN_CLOCK_OFFSET_SECONDS or 0",
    )


@dataclass
class AccountingRuntime:
    rest: Rest
    budgets: BudgetIndex
    accountant: Accountant
    enforcer: Enforcer
    ingestion: Ingestion | None
    host: str
    port: int
    tls: IngestTLS | None = None
    publish_ca: Callable[[bytes], Awaitable[str]] | None = None
    after_start: Callable[[], None] | None = None
    on_held_change: Callable[[], None] | None = None
    """Wakes the reconciler (on Kopf's loop) when a team's usage is held or released."""
    """Called on Kopf's loop once the CA is published (a reconciliation pass: the sidecar
    config copies then carry the published CA)."""
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    supervisor: Supervisor = field(default_factory=lambda: Supervisor("operator"))
    thread: _LoopThread | None = None


def build(
    args: argparse.Namespace,
    api_client: client.ApiClient,
    reconciler: Reconciler,
    supervisor: Supervisor | None = None,
) -> AccountingRuntime:
    clock.set_offset(args.clock_offset)
    rest = Rest.from_api_client(api_client)
    budgets = BudgetIndex(reconciler.world)
    accountant = Accountant(rest, budgets)
    enforcer = Enforcer(rest, budgets, accountant, reconciler.leadership)
    allowed = args.ingest_allowed_sa or [
        sa for sa in os.environ.get("COSTWARDEN_INGEST_ALLOWED_SA", "").split(",") if sa
    ]
    ingestion = None
    if args.ingest_port:
        auth = IngestAuth(
            token_file=args.ingest_token_file,
            allowed_service_accounts=allowed,
            rest=rest,
            allow_sidecars=args.ingest_allow_sidecars,
        )
        store = None
        if getattr(args, "store_dir", ""):
            try:
                from costwarden.controllers.store_sink import StoreSink  # pyarrow: optional
            except ModuleNotFoundError as exc:
                raise SystemExit(
                    f"--store-dir needs {exc.name}: install costwarden[store] (docs/store.md)"
                ) from exc
            store = StoreSink(args.store_dir)
        ingestion = Ingestion(
            accountant, auth, reconciler.leadership, lambda: reconciler.last_config, rest,
            held=reconciler.held, store=store,
        )  # fmt: skip
        ingestion.leasing.lease_seconds = args.lease_seconds
        ingestion.results = Results(
            accountant, budgets, reconciler.leadership, rest,
            token_file=getattr(args, "results_token_file", None),
            github_secret_file=getattr(args, "github_webhook_secret_file", None),
            log_file=getattr(args, "results_log", None),
        )  # fmt: skip
        if store is not None:
            # Outcomes land in the store beside the usage they price: `costwarden report
            # changes` joins them (latest per change) with no other file to pass.
            usage_store = store.store

            def keep_outcome(outcome: ChangeOutcome) -> None:
                usage_store.write_outcomes([outcome])

            ingestion.results.on_outcome.append(keep_outcome)
    runtime = AccountingRuntime(
        rest, budgets, accountant, enforcer, ingestion, args.ingest_listen_address,
        args.ingest_port,
    )  # fmt: skip
    if supervisor is not None:
        runtime.supervisor = supervisor
    if ingestion is not None:
        runtime.on_held_change = reconciler.world.changed.set  # on Kopf's loop: see _start
        runtime.tls = IngestTLS.load(
            args.ingest_cert_dir, args.ingest_tls_hostname, args.ingest_listen_address
        )
        copies = reconciler.copies
        core = client.CoreV1Api(api_client)

        async def publish(ca_pem: bytes) -> str:
            bundle = ca_pem.decode()
            if args.ingest_ca_configmap:
                bundle = await publish_ca(core, args.namespace, args.ingest_ca_configmap, ca_pem)
            if copies is not None:
                copies.ingest_ca = bundle  # sidecars verify the operator with it
            return bundle

        runtime.publish_ca = publish
        if copies is not None:
            runtime.after_start = reconciler.world.changed.set
    return runtime


class _LoopThread:
    """The accounting runs on its own event loop in its own thread.

    Why: the reconciler recomputes every budget on each change, synchronously on Kopf's
    loop, which under a burst of status writes keeps that loop busy for long stretches.
    Usage acknowledgements and cap enforcement must not queue behind it (the latency
    budget from a cap crossing to a suspended Job is seconds), so they get a loop of
    their own; the GIL still shares the CPU, but in 5 ms slices, not whole passes.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - a declared dependency
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="accounting", daemon=True)
        self.thread.start()

    async def run(self, work: Coroutine[Any, Any, Any]) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self.loop))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _start(runtime: AccountingRuntime, kopf_loop: asyncio.AbstractEventLoop) -> None:
    """Start the accounting's tasks, each under the operator's supervisor: a failure (the
    API server unreachable, the port taken, a bug) is retried with backoff, and liveness
    fails when one cannot recover (costwarden/supervision.py)."""
    supervisor = runtime.supervisor
    tasks = []
    if runtime.ingestion is not None and runtime.tls is not None:
        wake = runtime.on_held_change
        if wake is not None:  # ingestion runs on this thread's loop, the reconciler on Kopf's

            def wake_reconciler() -> None:
                kopf_loop.call_soon_threadsafe(wake)

            runtime.ingestion.on_held_change = wake_reconciler
        if runtime.publish_ca is not None:
            publish, ca_pem, after = runtime.publish_ca, runtime.tls.ca_pem, runtime.after_start

            async def publish_ca() -> None:
                await publish(ca_pem)  # reporters cannot verify us until it is published
                if after is not None:  # a pass on Kopf's loop: the copies carry the CA
                    kopf_loop.call_soon_threadsafe(after)

            tasks.append(supervisor.start("ingest-ca", publish_ca, forever=False))
        # Reconciliation works without ingestion; gateways keep their records (ledger) and
        # re-send once the operator listens.
        tasks.append(supervisor.start("ingestion", lambda: _serve_ingestion(runtime)))
    tasks.append(
        supervisor.start("job-watch", JobWatch(runtime.rest, runtime.enforcer.on_job_event).run)
    )
    tasks.append(supervisor.start("enforcement", runtime.enforcer.run))
    runtime.tasks = tasks


async def _serve_ingestion(runtime: AccountingRuntime) -> None:
    assert runtime.ingestion is not None
    assert runtime.tls is not None
    runner = await serve(runtime.ingestion, runtime.host, runtime.port, runtime.tls.ssl_context())
    try:
        await asyncio.Event().wait()  # serves until cancelled
    finally:
        await runner.cleanup()


async def _stop(runtime: AccountingRuntime) -> None:
    for task in runtime.tasks:
        task.cancel()
    for task in runtime.tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await runtime.rest.close()


@kopf.on.startup()
async def start_accounting(memo: kopf.Memo, **_: Any) -> None:
    runtime: AccountingRuntime | None = getattr(memo, "accounting", None)
    if runtime is None:
        return
    runtime.thread = _LoopThread()
    await runtime.thread.run(_start(runtime, asyncio.get_running_loop()))
    log.info("accounting started (ingestion port %s)", runtime.port or "off")


@kopf.on.cleanup()
async def stop_accounting(memo: kopf.Memo, **_: Any) -> None:
    runtime: AccountingRuntime | None = getattr(memo, "accounting", None)
    if runtime is None or runtime.thread is None:
        return
    await runtime.thread.run(_stop(runtime))
    runtime.thread.stop()
