"""Provider keys as pure decisions: what the operator mirrors for the shared gateway, what
it reports when a key cannot be served, and which keys a sidecar gets (its own namespace's)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from costwarden.api.conditions import Reason
from costwarden.api.gatewayconfig import CredentialRef, GatewayConfig, SpendState, TeamConfig
from costwarden.api.teambudget import Period
from costwarden.gateway.credentials import env_name
from costwarden.policy.injection import SIDECAR_NAME, InjectionSettings, inject
from costwarden.policy.provider_keys import (
    Access,
    SecretRead,
    credential_env,
    mirrored_key,
    plan_mirror,
    secrets_to_read,
    sidecar_credentials,
    with_credential_problems,
)
from costwarden.policy.render import PolicyVerdict
from costwarden.testing.gateway import sample_config

OPENAI = CredentialRef(namespace="ai-platform", name="openai-credentials", key="api-key")
ANTHROPIC = CredentialRef(namespace="ai-platform", name="anthropic-credentials", key="api-key")
POLICY = "ai-platform/standard"


def config(*refs: CredentialRef | None, policy_id: str = POLICY) -> GatewayConfig:
    """A policy whose model i has credentials ``refs[i]`` (None: an in-cluster model)."""
    base = sample_config("http://upstream")
    models = []
    for index, ref in enumerate(refs):
        model = base.policies[0].models[0].model_copy(update={"name": f"m{index}"})
        model.credentials = ref
        models.append(model)
    policy = base.policies[0].model_copy(
        update={"id": policy_id, "models": models, "rules": [], "default_model": "m0"}
    )
    return base.model_copy(update={"policies": [policy]})


def found(**data: str) -> SecretRead:
    return SecretRead(Access.FOUND, data)


def test_the_mirror_holds_each_referenced_key_under_its_file_name() -> None:
    cfg = config(OPENAI, None, ANTHROPIC, OPENAI)
    reads = {
        ("ai-platform", "openai-credentials"): found(**{"api-key": "b3BlbmFp", "other": "eA=="}),
        ("ai-platform", "anthropic-credentials"): found(**{"api-key": "YW50aHJvcGlj"}),
    }
    assert secrets_to_read(cfg) == [
        ("ai-platform", "anthropic-credentials"),
        ("ai-platform", "openai-credentials"),
    ]
    plan = plan_mirror(cfg, reads)
    assert plan.data == {
        "ai-platform_anthropic-credentials_api-key": "YW50aHJvcGlj",
        "ai-platform_openai-credentials_api-key": "b3BlbmFp",
    }, "only the referenced key of each Secret, never the rest of it"
    assert plan.problems == {}


def test_the_file_name_is_injective_even_with_underscores_in_the_key() -> None:
    a = CredentialRef(namespace="a", name="b", key="c_d")
    b = CredentialRef(namespace="a", name="b-c", key="d")
    assert mirrored_key(a) == "a_b_c_d"
    assert mirrored_key(a) != mirrored_key(b)
    namespace, name, key = mirrored_key(a).split("_", 2)
    assert (namespace, name, key) == ("a", "b", "c_d")


def test_keys_no_longer_referenced_leave_the_mirror() -> None:
    current = {"ai-platform_openai-credentials_api-key": "b2xk", "gone_x_y": "eHk="}
    plan = plan_mirror(
        config(OPENAI), {("ai-platform", "openai-credentials"): found(**{"api-key": "bmV3"})},
        current,
    )  # fmt: skip
    assert plan.data == {"ai-platform_openai-credentials_api-key": "bmV3"}, "rotated, pruned"


def test_a_transient_read_error_keeps_the_mirrored_key() -> None:
    current = {"ai-platform_openai-credentials_api-key": "b2xk"}
    plan = plan_mirror(
        config(OPENAI), {("ai-platform", "openai-credentials"): SecretRead(Access.ERROR)}, current
    )
    assert plan.data == current
    assert plan.problems == {}


def problem_of(cfg: GatewayConfig, read: SecretRead, **kw: Any) -> tuple[str, str, Reason]:
    plan = plan_mirror(cfg, {("ai-platform", "openai-credentials"): read}, **kw)
    assert plan.data == {}
    [problem] = plan.problems[POLICY]
    return problem.field, problem.message, problem.reason


def test_a_missing_secret_names_the_model_field_and_the_secret() -> None:
    field, message, reason = problem_of(config(None, OPENAI), SecretRead(Access.NOT_FOUND))
    assert field == "spec.models[1].credentials"
    assert "model 'm1'" in message
    assert "Secret ai-platform/openai-credentials does not exist" in message
    assert reason is Reason.CREDENTIALS_NOT_FOUND


def test_a_missing_or_empty_key_is_a_problem() -> None:
    field, message, reason = problem_of(config(OPENAI), found(other="eA=="))
    assert (field, reason) == ("spec.models[0].credentials", Reason.CREDENTIALS_NOT_FOUND)
    assert "has no key 'api-key'" in message
    _, message, _ = problem_of(config(OPENAI), found(**{"api-key": ""}))
    assert "empty value for key 'api-key'" in message


def test_a_forbidden_namespace_says_how_the_admin_allows_it() -> None:
    field, message, reason = problem_of(
        config(OPENAI), SecretRead(Access.FORBIDDEN), allowed_hint="; add it to X"
    )
    assert (field, reason) == ("spec.models[0].credentials", Reason.CREDENTIALS_NOT_READABLE)
    assert "not allowed to read Secrets in namespace ai-platform; add it to X" in message


def test_problems_never_carry_a_value() -> None:
    secret_value = "c2stdmVyeS1zZWNyZXQ="
    cfg = config(OPENAI, ANTHROPIC)
    plan = plan_mirror(
        cfg,
        {
            ("ai-platform", "openai-credentials"): found(other=secret_value),
            ("ai-platform", "anthropic-credentials"): SecretRead(Access.FORBIDDEN),
        },
    )
    assert secret_value not in repr(plan.problems)
    assert len(plan.problems[POLICY]) == 2


def test_credential_problems_make_a_ready_policy_not_ready() -> None:
    plan = plan_mirror(
        config(OPENAI), {("ai-platform", "openai-credentials"): SecretRead(Access.NOT_FOUND)}
    )
    ready = PolicyVerdict(True, Reason.RECONCILED, "included", models=1, teams=2)
    other = PolicyVerdict(True, Reason.RECONCILED, "included", models=1)
    result = with_credential_problems({POLICY: ready, "x/y": other}, plan.problems)
    verdict = result[POLICY]
    assert not verdict.ready
    assert verdict.reason is Reason.CREDENTIALS_NOT_FOUND
    assert verdict.message.startswith("spec.models[0].credentials: model 'm0' needs Secret")
    assert (verdict.models, verdict.teams) == (1, 2)
    assert result["x/y"] is other


def team_config(namespace: str, policy: str | None) -> TeamConfig:
    now = datetime.now(UTC)
    return TeamConfig(
        id=f"{namespace}/budget",
        namespaces=[namespace],
        period=Period(),
        hard_cap_usd=10,
        soft_limit_usd=8,
        routing_policy=policy,
        spend=SpendState(period_start=now, period_end=now + timedelta(days=1)),
    )


def test_a_sidecar_gets_only_its_teams_keys_in_its_own_namespace() -> None:
    own = CredentialRef(namespace="team-a", name="team-key", key="api-key")
    cfg = config(own, OPENAI, None, own, policy_id="team-a/own")
    cfg = cfg.model_copy(
        update={
            "policies": [*cfg.policies, config(OPENAI, ANTHROPIC).policies[0]],
            "teams": [
                team_config("team-a", "team-a/own"),
                team_config("team-b", POLICY),
            ],
        }
    )
    assert sidecar_credentials(cfg, "team-a", {}) == [own]
    assert sidecar_credentials(cfg, "team-b", {}) == [], "ai-platform's keys stay there"
    assert sidecar_credentials(cfg, "nobody", {}) == []


def test_the_injector_puts_the_keys_on_the_sidecar_only() -> None:
    own = CredentialRef(namespace="team-a", name="team-key", key="api-key")
    pod = {
        "metadata": {"name": "agent", "labels": {"costwarden.io/inject": "true"}},
        "spec": {"containers": [{"name": "agent", "image": "agent:1"}]},
    }
    result = inject(pod, InjectionSettings(image="x"), namespace="team-a", credentials=[own]).pod
    assert result is not None
    sidecar = result["spec"]["initContainers"][0]
    assert sidecar["name"] == SIDECAR_NAME
    entry = {
        "name": env_name(own),
        "valueFrom": {"secretKeyRef": {"name": "team-key", "key": "api-key", "optional": True}},
    }
    assert entry in sidecar["env"]
    assert env_name(own) == "COSTWARDEN_CREDENTIAL_TEAM_A_TEAM_KEY_API_KEY"
    agent = result["spec"]["containers"][0]
    assert not [e for e in agent["env"] if "valueFrom" in e], "agents never get a key"
    assert credential_env([own]) == [entry]
