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

Bounds (docs/operations.md, "Memory bounds"): accepted verdicts, rejections and pod
labels are three LRU maps of at most :data:`MAX_CACHED` entries each, keyed by a
fixed-size digest, so a flood of junk tokens only ever evicts other rejections. Reviews
of tokens not in the cache are rate limited globally (:data:`REVIEWS_PER_SECOND`, burst
:data:`REVIEW_BURST`; beyond it the call is refused 429 ``identity_check_unavailable``),
at most :data:`MAX_IN_FLIGHT` run at once, and each API request has a timeout
(:data:`REVIEW_TIMEOUT_SECONDS`; a review that does not finish is refused 503 and not
cached). The limit is global, not per source address: a caller's address is not known
to the identifier and behind a Service or node proxy would not be the caller's anyway.
Callers whose token is already cached are not affected by a flood.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from kubernetes import client, config

from costwarden.api.usage import GATEWAY_AUDIENCE
from costwarden.gateway.identity import (
    Caller,
    IdentityUnavailableError,
    job_name,
    token_digest,
)

log = logging.getLogger("costwarden.gateway.tokenreview")

VERDICT_TTL = 60.0
REJECTION_TTL = 10.0
POD_TTL = 60.0
MAX_CACHED = 10_000  # entries in each LRU map: accepted tokens, rejected tokens, pods
REVIEWS_PER_SECOND = 20.0
REVIEW_BURST = 40
MAX_IN_FLIGHT = 8
REVIEW_TIMEOUT_SECONDS = 5.0
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
SA_PREFIX = "system:serviceaccount:"


def api_client(kubeconfig: str | None) -> client.ApiClient:
    """The API client: the kubeconfig file if given, else the in-cluster service account."""
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    configuration = client.Configuration()
    config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


class TokenBucket:
    """At most ``rate`` takes a second on average, ``burst`` at once (clock injected)."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate, self._burst, self._clock = rate, float(burst), clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class LruTtl:
    """A map of at most ``size`` entries that expire; least recently used evicted first."""

    def __init__(self, size: int | None = None) -> None:
        self._size = MAX_CACHED if size is None else size
        self._items: OrderedDict[Any, tuple[float, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any, now: float) -> tuple[bool, Any]:
        entry = self._items.get(key)
        if entry is None:
            return False, None
        if now >= entry[0]:
            del self._items[key]
            return False, None
        self._items.move_to_end(key)
        return True, entry[1]

    def put(self, key: Any, value: Any, expires: float) -> None:
        self._items[key] = (expires, value)
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


class ReviewTimeoutError(Exception):
    """The API server did not answer a TokenReview or pod read in time (or failed)."""


class TokenReviewVerifier:
    def __init__(
        self,
        api: client.ApiClient,
        audiences: list[str] | None = None,
        *,
        bucket: TokenBucket | None = None,
    ) -> None:
        self._auth = client.AuthenticationV1Api(api)
        self._core = client.CoreV1Api(api)
        self.audiences = list(audiences or [GATEWAY_AUDIENCE])
        self._accepted = LruTtl()
        self._rejected = LruTtl()
        self._pods = LruTtl()
        self._bucket = bucket or TokenBucket(REVIEWS_PER_SECOND, REVIEW_BURST)
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def verify(self, token: str) -> Caller | None:
        key = bytes.fromhex(token_digest(token))
        now = time.monotonic()
        for cache in (self._accepted, self._rejected):
            found, caller = cache.get(key, now)
            if found:
                return caller
        if not self._bucket.take():
            raise IdentityUnavailableError(
                429,
                f"too many new credentials to check (at most {REVIEWS_PER_SECOND:g} "
                "TokenReviews a second for this gateway); retry shortly",
            )
        try:
            async with self._in_flight:
                caller = await asyncio.wait_for(
                    asyncio.to_thread(self._review, token), 2 * REVIEW_TIMEOUT_SECONDS
                )
        except (TimeoutError, ReviewTimeoutError):
            raise IdentityUnavailableError(
                503, "the API server did not confirm the service-account token in time; retry"
            ) from None
        now = time.monotonic()
        if caller is not None:
            self._accepted.put(key, caller, now + VERDICT_TTL)
        else:
            self._rejected.put(key, None, now + REJECTION_TTL)
        return caller

    def _review(self, token: str) -> Caller | None:
        spec = client.V1TokenReviewSpec(token=token, audiences=self.audiences)
        try:
            review: Any = self._auth.create_token_review(
                client.V1TokenReview(spec=spec), _request_timeout=REVIEW_TIMEOUT_SECONDS
            )
        except client.ApiException as exc:
            log.error("TokenReview failed: HTTP %s", exc.status)
            if exc.status in (None, 0) or exc.status >= 500 or exc.status == 429:
                raise ReviewTimeoutError from None  # the API server's trouble: not cached
            return None
        except Exception as exc:  # urllib3 timeouts and connection errors
            log.error("TokenReview failed: %s", type(exc).__name__)
            raise ReviewTimeoutError from None
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
        found, labels = self._pods.get((namespace, pod), now)
        if found:
            return labels
        try:
            read: Any = self._core.read_namespaced_pod(
                pod, namespace, _request_timeout=REVIEW_TIMEOUT_SECONDS
            )
            labels = dict(read.metadata.labels or {})
        except client.ApiException as exc:
            log.warning("cannot read pod %s/%s: HTTP %s", namespace, pod, exc.status)
            labels = {}
        except Exception as exc:  # urllib3 timeouts and connection errors
            log.warning("cannot read pod %s/%s: %s", namespace, pod, type(exc).__name__)
            raise ReviewTimeoutError from None
        self._pods.put((namespace, pod), labels, now + POD_TTL)
        return labels
