"""Who may report usage: gateways only, proven by a credential the API server vouches for.

Two ways, either or both:

- a service-account token (the gateway pod's projected token) that a TokenReview for the
  audience ``costwarden.io/ingest`` accepts (the pod's default token, or a token for the
  gateway's own audience, is refused) and whose user is one of the allowed service
  accounts (``--ingest-allowed-sa NAMESPACE:NAME``); verdicts are cached by the token's
  sha256 for a minute;
- a shared bearer token read from a file (``--ingest-token-file``, a mounted Secret),
  compared in constant time;
- with ``--ingest-allow-sidecars``: an injected sidecar's token, bound to its pod and
  minted for the audience ``costwarden.io/ingest``. The verdict is scoped to that pod (name
  and uid from the token's extra claims): the batch is refused unless every entry is that
  pod's own usage (``accounting.trust``).

Anything else is refused: 401 without a credential or with one nobody vouches for, 403
for a valid service account that is not a gateway. Usage is money: a forged batch would
spend another team's budget or hide spend.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from costwarden.accounting.trust import Reporter
from costwarden.api.usage import INGEST_AUDIENCE, SIDECAR_REPORT_AUDIENCE
from costwarden.controllers.rest import ApiError, Rest

log = logging.getLogger(__name__)

VERDICT_TTL = 60.0
SA_PREFIX = "system:serviceaccount:"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
SHARED_TOKEN = "shared-token"


@dataclass(frozen=True)
class AuthVerdict:
    status: int
    """200 allowed, 401 unauthenticated, 403 authenticated but not allowed."""
    who: str
    message: str = ""
    namespace: str = ""
    pod: str = ""
    """Set for a sidecar: the only pod whose usage this sender may report."""
    pod_uid: str = ""
    """A sidecar's pod uid, from the token (a recreated pod of the same name is another)."""

    @property
    def allowed(self) -> bool:
        return self.status == 200

    @property
    def reporter(self) -> Reporter:
        """The authenticated identity that keys this sender's cursors (docs/accounting.md)."""
        if self.pod:
            return Reporter(
                f"pod:{self.namespace}/{self.pod}/{self.pod_uid}",
                namespace=self.namespace,
                pod=self.pod,
                pod_uid=self.pod_uid,
            )
        if self.who.startswith(SA_PREFIX):
            namespace, _, name = self.who[len(SA_PREFIX) :].partition(":")
            return Reporter(f"sa:{namespace}/{name}")
        return Reporter("token:shared")


class IngestAuth:
    def __init__(
        self,
        *,
        token_file: Path | None = None,
        allowed_service_accounts: list[str] | None = None,
        rest: Rest | None = None,
        allow_sidecars: bool = False,
    ) -> None:
        self._token_file = token_file
        self._allowed = {
            SA_PREFIX + sa.strip() for sa in (allowed_service_accounts or []) if sa.strip()
        }
        self._rest = rest
        self._allow_sidecars = allow_sidecars
        self._cache: dict[str, tuple[float, AuthVerdict]] = {}

    def _shared_tokens(self) -> list[bytes]:
        if self._token_file is None:
            return []
        # Re-read each time (a few bytes): a rotated Secret applies without a restart.
        text = self._token_file.read_text()
        return [line.strip().encode() for line in text.splitlines() if line.strip()]

    async def check(self, authorization: str) -> AuthVerdict:
        if authorization[:7].lower() != "bearer " or not authorization[7:].strip():
            return AuthVerdict(401, "", "send a gateway credential as Authorization: Bearer")
        token = authorization[7:].strip()
        candidate = token.encode()
        if any(hmac.compare_digest(candidate, shared) for shared in self._shared_tokens()):
            return AuthVerdict(200, SHARED_TOKEN)
        key = hashlib.sha256(candidate).hexdigest()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        verdict = await self._review(token)
        self._cache[key] = (time.monotonic() + VERDICT_TTL, verdict)
        if len(self._cache) > 10_000:
            self._cache.clear()
        return verdict

    async def _review(self, token: str) -> AuthVerdict:
        verdict = await self._review_gateway(token)
        if verdict.allowed or not self._allow_sidecars:
            return verdict
        sidecar = await self._review_sidecar(token)
        return sidecar if sidecar.status != 401 else verdict

    async def _review_gateway(self, token: str) -> AuthVerdict:
        if self._rest is None or not self._allowed:
            return AuthVerdict(401, "", "the credential is not a known gateway token")
        status = await self._token_review(token, audiences=[INGEST_AUDIENCE])
        if status is None:
            return AuthVerdict(401, "", "the credential could not be reviewed")
        user = str((status.get("user") or {}).get("username") or "")
        if not status.get("authenticated"):
            return AuthVerdict(401, "", "the API server does not accept this token")
        if user not in self._allowed:
            return AuthVerdict(403, user, f"{user} is not an allowed usage reporter")
        return AuthVerdict(200, user)

    async def _review_sidecar(self, token: str) -> AuthVerdict:
        status = await self._token_review(token, audiences=[SIDECAR_REPORT_AUDIENCE])
        if status is None or not status.get("authenticated"):
            return AuthVerdict(401, "", "the API server does not accept this token")
        user = status.get("user") or {}
        username = str(user.get("username") or "")
        extra = user.get("extra") or {}
        pods = extra.get(POD_NAME_EXTRA) or []
        uids = extra.get(POD_UID_EXTRA) or []
        namespace = username[len(SA_PREFIX) :].partition(":")[0]
        if not username.startswith(SA_PREFIX) or not pods or not uids:
            return AuthVerdict(403, username, "a sidecar token must be bound to its pod")
        return AuthVerdict(
            200, username, namespace=namespace, pod=str(pods[0]), pod_uid=str(uids[0])
        )

    async def _token_review(self, token: str, audiences: list[str] | None) -> dict[str, Any] | None:
        if self._rest is None:
            return None
        spec: dict[str, Any] = {"token": token}
        if audiences:
            spec["audiences"] = audiences
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        try:
            review = await self._rest.post("/apis/authentication.k8s.io/v1/tokenreviews", body)
        except ApiError as error:
            log.error("TokenReview failed: HTTP %s", error.status)
            return None
        status: dict[str, Any] = review.get("status") or {}
        return status
