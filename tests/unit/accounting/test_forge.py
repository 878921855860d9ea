"""GitHub pull_request deliveries (replayed from a fixture in GitHub's documented shape):
signatures checked, closed pull requests turned into outcomes, everything else ignored."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from costwarden.accounting.forge import (
    PayloadError,
    github_outcomes,
    github_signature,
    verify_github_signature,
)
from costwarden.api.results import ChangeResult

FIXTURES = Path(__file__).parents[2] / "fixtures" / "github"
DELIVERIES = json.loads((FIXTURES / "pull_request_deliveries.json").read_text())
REVERT = json.loads((FIXTURES / "pull_request_revert.json").read_text())


def outcomes(deliveries):
    found = []
    for delivery in deliveries:
        event = delivery["headers"]["X-GitHub-Event"]
        found += [
            (r.repository, r.change, r.outcome, r.time)
            for r in github_outcomes(event, delivery["payload"])
        ]
    return found


def test_closed_pull_requests_are_merged_or_closed_outcomes_and_the_rest_is_ignored():
    assert outcomes(DELIVERIES) == [
        ("acme/api", "101", ChangeResult.MERGED, datetime(2026, 11, 29, 11, 30, tzinfo=UTC)),
        ("acme/api", "102", ChangeResult.CLOSED, datetime(2026, 11, 29, 12, 0, tzinfo=UTC)),
        ("acme/web", "7", ChangeResult.MERGED, datetime(2026, 11, 29, 12, 15, tzinfo=UTC)),
    ]


def test_a_merged_revert_pull_request_reverts_the_change_it_names():
    when = datetime(2026, 11, 29, 13, 20, tzinfo=UTC)
    assert outcomes(REVERT) == [
        ("acme/api", "104", ChangeResult.MERGED, when),
        ("acme/api", "101", ChangeResult.REVERTED, when),
    ]
    # A revert naming another repository reverts nothing here.
    payload = json.loads(json.dumps(REVERT[0]["payload"]))
    payload["pull_request"]["body"] = "Reverts victim/repo#9"
    assert [r.change for r in github_outcomes("pull_request", payload)] == ["104"]


def test_the_signature_is_hmac_sha256_of_the_raw_body_under_one_of_the_secrets():
    body = json.dumps(DELIVERIES[2]["payload"]).encode()
    header = github_signature(b"s3cret", body)
    assert header.startswith("sha256=")
    assert len(header) == 7 + 64
    assert verify_github_signature([b"old", b"s3cret"], body, header)
    assert not verify_github_signature([b"other"], body, header)
    assert not verify_github_signature([b"s3cret"], body + b" ", header)
    assert not verify_github_signature([b"s3cret"], body, header.replace("sha256=", "sha1="))
    assert not verify_github_signature([], body, header)


def test_a_signed_but_malformed_pull_request_event_is_an_error():
    with pytest.raises(PayloadError):
        github_outcomes("pull_request", {"action": "closed", "pull_request": {"number": 1}})
    with pytest.raises(PayloadError):
        github_outcomes("pull_request", {"action": "closed", "repository": {"full_name": "a/b"},
                                         "pull_request": {"number": True}})  # fmt: skip
