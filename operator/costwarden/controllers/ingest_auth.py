"""Who may report usage: gateways only, proven by a credential the API server vouches for.

Two ways, either or both:

- a service-account token (the gateway pod's projected token) that a TokenReview accepts
  and whose user is one of the allowed service accounts (``--ingest-allowed-sa
  NAMESPACE:NAME``); verdicts are cached by the token's sha256 for a minute;
- a shared bearer token read from a file (``--ingest-token-file``, a mounted Secret),
  compared in constant time.

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

from costwarden.controllers.rest import ApiError, Rest

log = logging.getLogger(__name__)

VERDICT_TTL = 60.0
SA_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True)
class AuthVerdict:
    status: int
    """200 allowed, 401 unauthenticated, 403 authenticated but not allowed."""
    who: str
    message: str = ""

    @property
    def allowed(self) -> bool:
        return self.status == 200


class IngestAuth:
    def __init__(
        self,
        *,
        token_file: Path | None = None,
        allowed_service_accounts: list[str] | None = None,
        rest: Rest | None = None,
    ) -> None:
        self._token_file = token_file
        self._allowed = {
            SA_PREFIX + sa.strip() for sa in (allowed_service_accounts or []) if sa.strip()
        }
        self._rest = rest
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
            return AuthVerdict(200, "shared-token")
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
        if self._rest is None or not self._allowed:
            return AuthVerdict(401, "", "the credential is not a known gateway token")
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        }
        try:
            review = await self._rest.post("/apis/authentication.k8s.io/v1/tokenreviews", body)
        except ApiError as error:
            log.error("TokenReview failed: HTTP %s", error.status)
            return AuthVerdict(401, "", "the credential could not be reviewed")
        status = review.get("status") or {}
        user = str((status.get("user") or {}).get("username") or "")
        if not status.get("authenticated"):
            return AuthVerdict(401, "", "the API server does not accept this token")
        if user not in self._allowed:
            return AuthVerdict(403, user, f"{user} is not an allowed usage reporter")
        return AuthVerdict(200, user)
