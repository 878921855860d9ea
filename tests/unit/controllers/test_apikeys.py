import hashlib

import yaml

from costwarden.controllers.apikeys import (
    digests_document,
    key_digest,
    new_key,
    plan_keys,
    secret_name,
)
from costwarden.gateway.identity import parse_api_keys


def test_plan_issues_missing_keys_and_revokes_those_of_gone_teams():
    plan = plan_keys(["a/x", "b/y"], {"b/y": "s-y", "c/z": "s-z"})
    assert plan.issue == ("a/x",)
    assert plan.revoke == ("s-z",)


def test_keys_are_random_and_only_digests_are_published():
    one, two = new_key(), new_key()
    assert one != two
    assert len(one) > 40
    document = digests_document({"team-a/budget": one})
    assert one not in document
    assert yaml.safe_load(document) == {
        hashlib.sha256(one.encode()).hexdigest(): {"team": "team-a/budget", "namespace": "team-a"}
    }


def test_the_gateway_reads_the_published_digests():
    key = new_key()
    callers = parse_api_keys(digests_document({"team-a/budget": key}))
    caller = callers[key_digest(key)]
    assert caller.team_id == "team-a/budget"
    assert caller.namespace == "team-a"


def test_secret_names_are_dns_safe_and_stable():
    name = secret_name("team-a/" + "x" * 250)
    assert name == secret_name("team-a/" + "x" * 250)
    assert len(name) <= 63
    assert name.replace("-", "").isalnum()
