"""`costwarden operator`: configure Kopf and run the handlers of this package."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import socket
from pathlib import Path
from typing import Any

import kopf
from kopf._core.engines.peering import Identity  # kopf does not re-export it
from kubernetes.client import CoreV1Api
from prometheus_client import start_http_server

from costwarden import __version__
from costwarden.api.endpoints import ProviderHosts, provider_host_argument
from costwarden.api.gatewayconfig import CONFIG_MAP_NAME
from costwarden.controllers import (
    accounting_main,
    handlers,  # noqa: F401  (registers the Kopf handlers)
    metrics,
)
from costwarden.controllers import injection as webhook
from costwarden.controllers.apikeys import ApiKeyIssuer
from costwarden.controllers.config_copies import ConfigCopies
from costwarden.controllers.kubeapi import KubeApi, load_client
from costwarden.controllers.leadership import Leadership
from costwarden.controllers.provider_keys import ProviderKeysMirror
from costwarden.controllers.reconciler import Reconciler, load_settings
from costwarden.controllers.world import ObservedWorld
from costwarden.policy.injection import ALWAYS_EXCLUDED, JOB_CONTROLLER_USERS, InjectionSettings
from costwarden.supervision import UNHEALTHY_AFTER, Supervisor

log = logging.getLogger("costwarden.operator")

KOPF_API_BACKOFFS = (1, 1, 2, 3, 5, 8, 13, 21) + (10,) * 55
"""Seconds between Kopf's retries of a failed API request: ~10 minutes in all."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "operator",
        help="run the operator (reconciles TeamBudgets and RoutingPolicies)",
        description=(
            "Run the Kopf operator: watch TeamBudgets and RoutingPolicies in all namespaces, "
            "write their status and conditions, and publish the gateway configuration."
        ),
    )
    parser.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", "costwarden-system"),
        help="namespace of the gateway ConfigMap (default: $POD_NAMESPACE or costwarden-system)",
    )
    parser.add_argument(
        "--config-map", default=CONFIG_MAP_NAME, help="name of the gateway ConfigMap to write"
    )
    parser.add_argument(
        "--price-catalog",
        type=Path,
        help="YAML price catalogue overriding the built-in one (the chart mounts one)",
    )
    parser.add_argument(
        "--allowed-provider-host",
        dest="allowed_provider_hosts",
        action="append",
        type=provider_host_argument,
        default=[],
        metavar="HOST",
        help=(
            "a host External models may use: exact (api.openai.com) or *.suffix; repeat or "
            "comma-separate. Unset: any host the endpoint rules accept. The chart sets it "
            "from providerHosts.allowed"
        ),
    )
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube)")
    parser.add_argument(
        "--metrics-port", type=int, default=9090, help="Prometheus /metrics port (0: off)"
    )
    parser.add_argument(
        "--health-port", type=int, default=8080, help="liveness endpoint /healthz port (0: off)"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--peering-name",
        default="costwarden",
        help="ClusterKopfPeering used to elect one active replica (default: costwarden)",
    )
    group.add_argument(
        "--standalone",
        action="store_true",
        help="no peering: for a single replica, tests and the local demo",
    )
    parser.add_argument(
        "--peering-lifetime",
        type=int,
        default=60,
        help="seconds a replica's keep-alive lasts: how soon a standby takes over (default 60)",
    )
    parser.add_argument(
        "--api-keys",
        action="store_true",
        help=(
            "issue each Ready team a gateway API key (a Secret in --namespace) and publish "
            "their sha256 digests in the ConfigMap costwarden-api-keys (docs/gateway.md)"
        ),
    )
    parser.add_argument(
        "--provider-keys-secret",
        help=(
            "mirror the provider keys RoutingPolicies reference into this Secret in "
            "--namespace, which the shared gateway mounts as --credentials-dir; a policy "
            "whose key is missing or unreadable is Ready=False (docs/install-helm.md)"
        ),
    )
    parser.add_argument(
        "--liveness-task-failure-seconds",
        type=float,
        default=UNHEALTHY_AFTER,
        help="the liveness endpoint fails once a background task (reconciler, enforcement, "
        f"Job watch, ingestion) has been failing this long (default {UNHEALTHY_AFTER:.0f}; "
        "docs/operations.md)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    webhook_arguments(parser)
    accounting_main.accounting_arguments(parser)
    parser.set_defaults(func=run)


def webhook_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "sidecar injection", "the mutating admission webhook (docs/sidecar-injection.md)"
    )
    group.add_argument(
        "--webhook-port", type=int, default=0, help="HTTPS port of the admission server (0: off)"
    )
    group.add_argument(
        "--webhook-listen-address", default="0.0.0.0",  # noqa: S104
        help="address the admission server listens on (default 0.0.0.0)",
    )  # fmt: skip
    group.add_argument(
        "--webhook-host",
        help="name the API server calls: <service>.<namespace>.svc in a cluster (a Service "
        "reference is configured), else a host or IP (a URL); default: the listen address",
    )
    group.add_argument(
        "--webhook-service-port", type=int, default=443,
        help="port of the webhook Service when --webhook-host is <svc>.<ns>.svc (default 443)",
    )  # fmt: skip
    group.add_argument(
        "--webhook-configuration",
        default="sidecar-injector.costwarden.io",
        help="name of the MutatingWebhookConfiguration the operator writes",
    )
    group.add_argument(
        "--webhook-failure-policy",
        choices=("Ignore", "Fail"),
        default="Ignore",
        help="Ignore (default): pods are admitted without a sidecar while the operator is "
        "down; Fail: opted-in pods cannot be created then",
    )
    group.add_argument(
        "--webhook-cert-dir",
        type=Path,
        help="tls.crt, tls.key and ca.crt to serve (e.g. from cert-manager); generated there "
        "when absent (default: a private temporary directory)",
    )
    group.add_argument(
        "--sidecar-image",
        default=os.environ.get("COSTWARDEN_SIDECAR_IMAGE", f"costwarden/costwarden:{__version__}"),
        help="image of the injected gateway sidecar (default: $COSTWARDEN_SIDECAR_IMAGE)",
    )
    group.add_argument(
        "--job-controller-user",
        action="append",
        default=None,
        metavar="USER",
        help="user that creates Jobs' pods; only such pods' Job owner reference is told to "
        "the sidecar (repeatable; default system:serviceaccount:kube-system:job-controller "
        "and system:kube-controller-manager)",
    )
    group.add_argument(
        "--sidecar-report-to",
        help="the operator's ingestion URL injected sidecars deliver usage to, e.g. "
        "https://costwarden-operator-ingest.costwarden-system.svc:8081 (pair with "
        "--ingest-allow-sidecars); unset, sidecars keep their usage in a local ledger only",
    )


def webhook_options(args: argparse.Namespace) -> webhook.WebhookOptions:
    excluded = ALWAYS_EXCLUDED | {args.namespace}
    return webhook.WebhookOptions(
        listen_address=args.webhook_listen_address,
        port=args.webhook_port,
        host=args.webhook_host or args.webhook_listen_address,
        service_port=args.webhook_service_port,
        configuration=args.webhook_configuration,
        failure_policy=args.webhook_failure_policy,
        cert_dir=args.webhook_cert_dir,
        injection=InjectionSettings(
            image=args.sidecar_image,
            excluded_namespaces=excluded,
            report_to=args.sidecar_report_to,
            job_controller_users=frozenset(args.job_controller_user or JOB_CONTROLLER_USERS),
        ),
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.kubeconfig:
        # Kopf's own login reads KUBECONFIG, like kubectl; keep both clients on one cluster.
        os.environ["KUBECONFIG"] = args.kubeconfig
    if args.metrics_port:
        start_http_server(args.metrics_port)
    api_client = load_client(args.kubeconfig)
    identity = f"{socket.gethostname()}@{os.getpid()}"
    peering = None if args.standalone else args.peering_name
    # Distinct random priorities: Kopf pauses every replica on a tie (see leadership.py).
    priority = random.SystemRandom().randint(1, 2**31 - 1)
    settings = kopf.OperatorSettings()
    settings.peering.lifetime = args.peering_lifetime
    # Kopf's own requests (watches, the peering keep-alive) retry about a minute by default;
    # then the keep-alive fails and Kopf stops the whole operator (measured: a 60 s API-server
    # outage ended the process). Retry for about ten minutes instead (docs/operations.md).
    settings.networking.error_backoffs = KOPF_API_BACKOFFS
    copies = None
    if args.webhook_port:
        options = webhook_options(args)
        copies = ConfigCopies(
            CoreV1Api(api_client), args.namespace, args.config_map,
            options.injection.excluded_namespaces,
        )  # fmt: skip
        webhook.configure(settings, options, api_client, copies)
    supervisor = Supervisor(
        "operator",
        restarts=metrics.TASK_RESTARTS,
        failing=metrics.TASK_FAILING,
        unhealthy_after=args.liveness_task_failure_seconds,
    )
    reconciler = Reconciler(
        KubeApi(api_client),
        ObservedWorld(),
        load_settings(
            args.namespace,
            args.config_map,
            args.price_catalog,
            ProviderHosts.parse(args.allowed_provider_hosts),
        ),
        Leadership(api_client, peering_name=peering, identity=identity, priority=priority),
        copies=copies,
        api_keys=ApiKeyIssuer(CoreV1Api(api_client), args.namespace) if args.api_keys else None,
        provider_keys=(
            ProviderKeysMirror(CoreV1Api(api_client), args.namespace, args.provider_keys_secret)
            if args.provider_keys_secret
            else None
        ),
    )
    log.info(
        "starting: config map %s/%s, %s", args.namespace, args.config_map,
        "standalone" if peering is None else f"peering {peering!r} priority {priority}",
    )  # fmt: skip
    asyncio.run(
        kopf.operator(
            clusterwide=True,
            standalone=peering is None,
            peering_name=peering,
            priority=priority,
            identity=Identity(identity),
            liveness_endpoint=(
                f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
            ),
            memo=kopf.Memo(
                reconciler=reconciler,
                supervisor=supervisor,
                accounting=accounting_main.build(args, api_client, reconciler, supervisor),
            ),
            settings=settings,
        )
    )
    return 0
