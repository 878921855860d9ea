"""Service-account tokens, vouched for by the API server (TokenReview), with a short cache.

A token is reviewed once per :data:`VERDICT_TTL` (keyed by its sha256, never stored in
clear); a rejection is cached for :data:`REJECTION_TTL` so a client retrying a bad token
does not hammer the API server. A pod-bound token (every projected token since
Kubernetes 1.22) names its pod in ``extra["authentication.kubernetes.io/pod-name"]``; the
pod's labels (cached for :data:`POD_TTL`) give the job and the team. The gateway needs
RBAC ``create tokenreviews`` and ``get pods``.

Tokens are reviewed for the gateway's own audience (:data:`GATEWAY_AUDIENCE` unless told
otherwise): a token the API server would accept (a pod's default token) or one minted for
the operator's ingestion is refused, so a caller never hands the gateway a credential
that is worth anything elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kubernetes import client, config

from costwarden.api.usage import GATEWAY_AUDIENCE
from costwarden.gateway.identity import Caller, job_name, token_digest

log = logging.getLogger("costwarden.gateway.tokenreview")

VERDICT_TTL = 60.0
REJECTION_TTL = 10.0
POD_TTL = 60.0
MAX_CACHED = 10_000  # distinct tokens or pods remembered; expired entries are dropped beyond
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
SA_PREFIX = "system:serviceaccount:"


def api_client(kubeconfig: str | None) -> client.ApiClient:
    """The API client: the kubeconfig file if given, else the in-cluster service account."""
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    configuration = client.Configuration()
    config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


class TokenReviewVerifier:
    def __init__(self, api: client.ApiClient, audiences: list[str] | None = None) -> None:
        self._auth = client.AuthenticationV1Api(api)
        self._core = client.CoreV1Api(api)
        self.audiences = list(audiences or [GATEWAY_AUDIENCE])
        self._verdicts: dict[str, tuple[float, Caller | None]] = {}
        self._pods: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}

    async def verify(self, token: str) -> Caller | None:
        key = token_digest(token)
        now = time.monotonic()
        cached = self._verdicts.get(key)
        if cached is not None and now < cached[0]:
            return cached[1]
        caller = await asyncio.to_thread(self._review, token)
        ttl = VERDICT_TTL if caller is not None else REJECTION_TTL
        _prune(self._verdicts, now)
        self._verdicts[key] = (now + ttl, caller)
        return caller

    def _review(self, token: str) -> Caller | None:
        spec = client.V1TokenReviewSpec(token=token, audiences=self.audiences)
        try:
            review: Any = self._auth.create_token_review(client.V1TokenReview(spec=spec))
        except client.ApiException as exc:
            log.error("TokenReview failed: HTTP %s", exc.status)
            return None
        status = review.status
        if not status or not status.authenticated or not status.user:
            return None
        if not set(status.audiences or []) & set(self.audiences):
            return None  # an authenticator that ignores audiences: not bound to ours
        username: str = status.user.username or ""
        if not username.startswith(SA_PREFIX):
            return None  # a user or node credential: not a workload
        namespace = username[len(SA_PREFIX) :].split(":", 1)[0]
        pods = (status.user.extra or {}).get(POD_NAME_EXTRA) or []
        pod = pods[0] if pods else ""
        labels = self._labels(namespace, pod) if pod else {}
        return Caller("token", namespace, pod, job_name(labels), labels)

    def _labels(self, namespace: str, pod: str) -> dict[str, str]:
        now = time.monotonic()
        cached = self._pods.get((namespace, pod))
        if cached is not None and now < cached[0]:
            return cached[1]
        try:
            found: Any = self._core.read_namespaced_pod(pod, namespace)
            labels = dict(found.metadata.labels or {})
        except client.ApiException as exc:
            log.warning("cannot read pod %s/%s: HTTP %s", namespace, pod, exc.status)
            labels = {}
        _prune(self._pods, now)
        self._pods[(namespace, pod)] = (now + POD_TTL, labels)
        return labels


def _prune(cache: dict[Any, tuple[float, Any]], now: float) -> None:
    """Bound a TTL cache: past MAX_CACHED entries, drop the expired ones (and if none
    expired, everything: a flood of distinct bogus tokens must not grow memory)."""
    if len(cache) < MAX_CACHED:
        return
    for key in [k for k, (expires, _) in cache.items() if expires <= now]:
        del cache[key]
    if len(cache) >= MAX_CACHED:
        cache.clear()
