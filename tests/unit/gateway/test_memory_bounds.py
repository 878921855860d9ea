"""Memory bounds under adversarial keys: each structure keyed by what a caller or an upstream
chooses stays within its documented count and (approximately, via tracemalloc) bytes."""

from __future__ import annotations

import asyncio
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from costwarden.api.teambudget import LoopDetection, TokenUsage
from costwarden.gateway import limits as limits_module
from costwarden.gateway import proxy, tokenreview
from costwarden.gateway.identity import IdentityUnavailableError
from costwarden.gateway.limits import Limits
from costwarden.gateway.tokenreview import LruTtl, TokenBucket, TokenReviewVerifier
from costwarden.policy import loops


def allocated_by(fill: Callable[[], Any]) -> tuple[Any, int]:
    """What ``fill`` returns and the bytes it left allocated."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = fill()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return kept, after - before


@pytest.mark.parametrize("holder", [proxy.SessionAffinity, proxy.ResponseHolders])
def test_affinity_maps_hold_a_bounded_count_of_fixed_size_entries(holder: type) -> None:
    size = 2_000
    junk = "x" * 8192  # a session header at the gateway's header limit

    def fill() -> Any:
        cache = holder(size)
        for i in range(size * 3):
            cache.remember("team/a", f"{i}{junk}", "model-a")
        return cache

    cache, used = allocated_by(fill)

    assert len(cache) == size
    # 8 KB keys are not kept: a digest is (about 300 bytes an entry, not 8 KB).
    assert used < size * 400, f"{used} bytes for {size} entries"
    assert cache.get("team/a", f"{size * 3 - 1}{junk}") == "model-a"  # newest kept
    assert cache.get("team/a", f"0{junk}") == ""  # oldest evicted


def test_the_default_affinity_bound_fits_the_gateway_memory_limit() -> None:
    """MAX_SESSIONS entries at the measured size stay far below the 512 MiB pod limit."""
    sample = 5_000

    def fill() -> Any:
        cache = proxy.SessionAffinity(sample)
        for i in range(sample):
            cache.remember("team/a", f"{i}" + "y" * 8192, "model-a")
        return cache

    _, used = allocated_by(fill)
    projected = used / sample * proxy.MAX_SESSIONS * 2  # sessions and response holders
    assert projected < 80 * 2**20, f"{projected / 2**20:.0f} MiB projected"


def loop_settings() -> LoopDetection:
    return LoopDetection(enabled=True, identical_requests=10_000, window_seconds=86_400)


def test_loop_windows_stay_within_the_global_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    bound = 20_000
    monkeypatch.setattr(limits_module, "MAX_REMEMBERED_TOTAL", bound)
    from costwarden.testing.gateway import sample_config

    team = next(iter(sample_config("http://127.0.0.1:9").teams))
    team = team.model_copy(update={"loop_detection": loop_settings(), "per_job": None})
    clock = [0.0]
    limits = Limits(clock=lambda: clock[0])

    def fill() -> Limits:
        for job in range(500):  # 500 jobs, each sending distinct requests
            for n in range(200):
                clock[0] += 0.001
                limits.admit(team, "r1", f"job-{job}", f"{job:08d}{n:024d}")
        return limits

    _, used = allocated_by(fill)

    held = sum(len(limits.job(team.id, f"job-{j}").loop.order) for j in range(500))
    assert held == limits.remembered
    assert limits.remembered <= bound
    # About 200 bytes a remembered request, plus the jobs themselves.
    assert used < bound * 300 + 500 * 3_000, f"{used} bytes"


def test_a_job_window_is_capped_per_job() -> None:
    state = loops.LoopState()
    settings = loop_settings()
    for n in range(loops.MAX_REMEMBERED + 500):
        loops.check_request(state, settings, f"{n:032d}", float(n) / 1000)
    assert len(state.order) == loops.MAX_REMEMBERED
    assert sum(state.counts.values()) == loops.MAX_REMEMBERED


def test_the_shed_keeps_money_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits_module, "MAX_REMEMBERED_TOTAL", 100)
    from decimal import Decimal

    from costwarden.testing.gateway import sample_config

    team = next(iter(sample_config("http://127.0.0.1:9").teams))
    team = team.model_copy(update={"loop_detection": loop_settings(), "per_job": None})
    limits = Limits(clock=lambda: 1.0)
    limits.admit(team, "r1", "old-job", "a" * 32)
    used = TokenUsage(input=3, output=2)
    limits.record(team, "r1", "old-job", used, Decimal("1.5"), upstream_error=False)
    for n in range(200):
        limits.admit(team, "r1", "busy-job", f"{n:032d}")
    assert limits.remembered <= 100
    old = limits.job(team.id, "old-job")
    assert len(old.loop.order) == 0  # its window was shed first
    assert (old.cost, old.tokens) == (Decimal("1.5"), 5)


def test_lru_ttl_cache_keeps_its_bound_and_expires() -> None:
    cache = LruTtl(100)
    for i in range(1_000):
        cache.put(i.to_bytes(32, "big"), None, expires=10.0)
    assert len(cache) == 100
    assert cache.get((999).to_bytes(32, "big"), now=1.0) == (True, None)
    assert cache.get((0).to_bytes(32, "big"), now=1.0) == (False, None)
    assert cache.get((999).to_bytes(32, "big"), now=11.0) == (False, None)


def test_token_bucket_limits_the_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=10, burst=5, clock=lambda: now[0])
    assert sum(bucket.take() for _ in range(50)) == 5
    now[0] += 1.0
    assert sum(bucket.take() for _ in range(50)) == 5  # refilled to the burst, not beyond
    now[0] += 0.1
    assert sum(bucket.take() for _ in range(50)) == 1


class FakeAuthApi:
    """Stands in for the kubernetes client's AuthenticationV1Api: every token is junk, and
    a review takes ``delay`` seconds (the API server's latency)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.reviews = 0
        self.timeouts: list[Any] = []
        self._lock = threading.Lock()

    def create_token_review(self, body: Any, _request_timeout: Any = None) -> Any:
        with self._lock:
            self.reviews += 1
        self.timeouts.append(_request_timeout)
        if self.delay:
            time.sleep(self.delay)

        class Review:
            status = None

        return Review()


def verifier(auth: FakeAuthApi, bucket: TokenBucket | None = None) -> TokenReviewVerifier:
    from kubernetes import client

    v = TokenReviewVerifier(client.ApiClient(), bucket=bucket)
    v._auth = auth  # type: ignore[assignment]
    return v


def test_junk_tokens_are_rate_limited_and_the_cache_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tokenreview, "MAX_CACHED", 50)
    auth = FakeAuthApi()
    v = verifier(auth, TokenBucket(rate=0.0001, burst=100))

    async def flood() -> tuple[int, list[int]]:
        rejected, statuses = 0, []
        for i in range(1_000):
            try:
                caller = await v.verify(f"junk.{i}.{'z' * 4000}")
            except IdentityUnavailableError as exc:
                statuses.append(exc.status)
                continue
            assert caller is None
            rejected += 1
        return rejected, statuses

    rejected, statuses = asyncio.run(flood())

    assert rejected == 100
    assert statuses == [429] * 900
    assert auth.reviews == 100  # no TokenReview past the rate limit
    assert len(v._rejected) == 50
    assert len(v._accepted) == 0
    assert auth.timeouts[0] == tokenreview.REVIEW_TIMEOUT_SECONDS


def test_a_slow_api_server_is_a_retryable_refusal_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tokenreview, "REVIEW_TIMEOUT_SECONDS", 0.05)
    auth = FakeAuthApi(delay=1.0)
    v = verifier(auth)

    async def once() -> float:
        started = time.monotonic()
        with pytest.raises(IdentityUnavailableError) as info:
            await v.verify("a.b.c")
        assert info.value.status == 503
        return time.monotonic() - started

    took = asyncio.run(once())
    assert took < 0.9, f"waited {took:.2f} s for a review that takes 1 s"
    assert len(v._rejected) == 0  # a timeout is not a verdict: not cached
