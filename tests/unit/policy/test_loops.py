"""policy.loops: fingerprint normalization and the per-job detector, with a fake clock."""

from __future__ import annotations

from costwarden.api.teambudget import LoopDetection
from costwarden.api.usage import LoopKind
from costwarden.policy.loops import LoopState, check_request, fingerprint, record_outcome

ASK = {"model": "gpt-4o", "messages": [{"role": "user", "content": "fix the failing test"}]}
SETTINGS = LoopDetection(identical_requests=3, window_seconds=60, consecutive_errors=2)


def test_fingerprint_ignores_volatile_fields_and_whitespace() -> None:
    jittered = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "  fix the\n failing   test "}],
        "temperature": 0.7,
        "stream": True,
        "metadata": {"task": "x"},
        "user": "u1",
    }

    assert fingerprint(jittered) == fingerprint(ASK)


def test_fingerprint_differs_when_the_question_does() -> None:
    other = {"model": "gpt-4o", "messages": [{"role": "user", "content": "fix another test"}]}

    assert fingerprint(other) != fingerprint(ASK)
    assert fingerprint({**ASK, "model": "gpt-4o-mini"}) != fingerprint(ASK)


def test_nth_identical_request_in_the_window_trips() -> None:
    state, fp = LoopState(), fingerprint(ASK)

    assert check_request(state, SETTINGS, fp, 0.0) is None
    assert check_request(state, SETTINGS, fp, 10.0) is None
    trip = check_request(state, SETTINGS, fp, 20.0)

    assert trip is not None
    assert (trip.kind, trip.count, trip.new) == (LoopKind.IDENTICAL_REQUESTS, 3, True)


def test_a_tripped_job_is_refused_for_one_window_then_starts_afresh() -> None:
    state, fp = LoopState(), fingerprint(ASK)
    for t in (0.0, 1.0, 2.0):
        check_request(state, SETTINGS, fp, t)

    during = check_request(state, SETTINGS, "other", 30.0)
    after = check_request(state, SETTINGS, fp, 63.0)

    assert during is not None
    assert not during.new
    assert after is None


def test_identical_requests_spread_beyond_the_window_do_not_trip() -> None:
    state, fp = LoopState(), fingerprint(ASK)

    results = [check_request(state, SETTINGS, fp, t) for t in (0.0, 40.0, 80.0, 120.0)]

    assert results == [None, None, None, None]


def test_consecutive_errors_trip_and_success_resets() -> None:
    state = LoopState()
    record_outcome(state, upstream_error=True)
    record_outcome(state, upstream_error=False)
    record_outcome(state, upstream_error=True)
    assert check_request(state, SETTINGS, "a", 0.0) is None

    record_outcome(state, upstream_error=True)
    trip = check_request(state, SETTINGS, "b", 1.0)

    assert trip is not None
    assert trip.kind is LoopKind.CONSECUTIVE_ERRORS


def test_disabled_detection_never_trips() -> None:
    state, settings = LoopState(), LoopDetection(enabled=False, identical_requests=2)

    assert all(check_request(state, settings, "same", float(t)) is None for t in range(10))


def test_memory_stays_bounded_by_the_window() -> None:
    state = LoopState()
    for t in range(1000):
        check_request(state, SETTINGS, f"unique-{t}", float(t))

    assert len(state.order) <= 61
    assert len(state.counts) <= 61
