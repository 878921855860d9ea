"""Hostile tenants against the scope of a TeamBudget (DESIGN T1/T2, docs/security.md).

A tenant is a namespace admin: it writes TeamBudgets, RoutingPolicies and Jobs in its own
namespace, nothing cluster-scoped. Each attack below is what such a tenant would send, on
the real API server with the real operator (and gateway where calls matter); each asserts
the refusal (Ready=False naming the field, a 403 from the gateway, an RBAC denial) and
that the victim's Jobs, status and upstream are unchanged. Where "unchanged" is an
absence, a positive control in the attacker's own namespace (its own Job stopped by the
same budget, a granted team's call served) proves the operator had acted by then.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from costwarden.api.gatewayconfig import CONFIG_MAP_KEY, CONFIG_MAP_NAME, GatewayConfig
from costwarden.gateway.config import compile_config
from costwarden.gateway.identity import Caller, resolve_team
from costwarden.policy.tenancy import BUDGET_ANNOTATION
from tests.support.polling import wait_for
from tests.support.stack import GROUP, MODEL, VERSION, Stack, job_manifest, policy_manifest

NewNamespace = Callable[[str], str]


@pytest.fixture
def new_namespace(api_client: client.ApiClient) -> Iterator[NewNamespace]:
    """Make namespaces (``<role>-<random>``), deleted after the test."""
    core = client.CoreV1Api(api_client)
    made: list[str] = []

    def make(role: str) -> str:
        name = f"cw-{role}-{secrets.token_hex(3)}"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        made.append(name)
        return name

    yield make
    for name in made:
        try:
            core.delete_namespace(name)
        except ApiException as error:
            if error.status != 404:
                raise


def budget(name: str, hard_cap: str = "100", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TeamBudget",
        "metadata": {"name": name},
        "spec": {"hardCapUSD": hard_cap, **spec},
    }


def ready(stack: Stack, namespace: str, name: str) -> dict[str, Any] | None:
    conditions = stack.status(namespace, name).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Ready"), None)


def wait_ready(stack: Stack, namespace: str, name: str, status: str, reason: str) -> dict[str, Any]:
    return wait_for(
        lambda: (
            (c := ready(stack, namespace, name))
            and (c["status"], c["reason"]) == (status, reason)
            and c
        ),
        timeout=30,
        what=f"TeamBudget {namespace}/{name} Ready={status} {reason}",
    )


def published(stack: Stack) -> GatewayConfig:
    """The gateway configuration the operator published (its ConfigMap)."""
    core = client.CoreV1Api(stack.api_client)
    cm = core.read_namespaced_config_map(CONFIG_MAP_NAME, "costwarden-system")
    return GatewayConfig.model_validate(json.loads((cm.data or {})[CONFIG_MAP_KEY]))


def team_of(stack: Stack, team_id: str) -> Any:
    return next((t for t in published(stack).teams if t.id == team_id), None)


def running(stack: Stack, namespace: str, name: str) -> bool:
    """The Job exists (not deleted), is not suspended and carries no costwarden mark."""
    job = stack.job(namespace, name)
    marks = {**(job.metadata.labels or {}), **(job.metadata.annotations or {})}
    return not job.spec.suspend and not [k for k in marks if k.startswith("costwarden.io/")]


def stopped(stack: Stack, namespace: str, name: str) -> bool:
    try:
        return bool(stack.job(namespace, name).spec.suspend)
    except ApiException as error:
        return error.status == 404  # deleted


def consent(stack: Stack, namespace: str, budget_id: str | None) -> None:
    """What a cluster admin does: annotate the Namespace (None: remove the annotation)."""
    core = client.CoreV1Api(stack.api_client)
    core.patch_namespace(namespace, {"metadata": {"annotations": {BUDGET_ANNOTATION: budget_id}}})


def agent_job(name: str, team: str = "agent") -> dict[str, Any]:
    return job_manifest(name, team)


def call(stack: Stack, key: str) -> httpx.Response:
    return httpx.post(
        stack.gateway.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "hello"}]},
        timeout=10,
    )


def refusal(stack: Stack, key: str) -> str:
    return call(stack, key).headers.get("x-costwarden-refusal", "")


# -- T1: governed namespaces -------------------------------------------------------------


def test_a_budget_claiming_kube_system_with_a_zero_cap_and_delete_deletes_nothing_there(
    stack: Stack, new_namespace: NewNamespace
):
    attacker = new_namespace("attacker")
    victim_job = f"system-job-{secrets.token_hex(3)}"
    stack.create("kube-system", agent_job(victim_job))
    try:
        stack.create(attacker, agent_job("own"))
        stack.create(attacker, budget(
            "grab", "0", workloads={"namespaces": [attacker, "kube-system"]},
            onHardCap={"jobs": "Delete"},
        ))  # fmt: skip
        condition = wait_ready(stack, attacker, "grab", "False", "NamespaceNotGranted")
        assert "spec.workloads.namespaces[1]" in condition["message"]
        assert "kube-system" in condition["message"]
        # Positive control: the zero cap is enforced where the budget may act...
        wait_for(lambda: stopped(stack, attacker, "own"), timeout=30, what="own Job deleted")
        # ... and nowhere else.
        assert running(stack, "kube-system", victim_job)
        team = team_of(stack, f"{attacker}/grab")
        assert team is not None
        assert team.namespaces == [attacker]
    finally:
        stack.batch.delete_namespaced_job(
            victim_job, "kube-system", propagation_policy="Background"
        )


def test_a_budget_claiming_another_teams_namespace_stops_none_of_its_jobs(
    stack: Stack, new_namespace: NewNamespace
):
    attacker, victim = new_namespace("attacker"), new_namespace("victim")
    stack.create(victim, budget("victim", "100", workloads={"namespaces": [victim]}))
    wait_ready(stack, victim, "victim", "True", "NoRoutingPolicy")
    stack.create(victim, agent_job("payroll"))
    before = stack.status(victim, "victim")
    # Only the victim namespace claimed: the attacker's own namespace stays governed.
    stack.create(attacker, agent_job("own"))
    stack.create(attacker, budget("grab", "0", workloads={"namespaces": [victim]}))
    condition = wait_ready(stack, attacker, "grab", "False", "NamespaceNotGranted")
    assert "spec.workloads.namespaces[0]" in condition["message"]
    wait_for(lambda: stopped(stack, attacker, "own"), timeout=30, what="own Job suspended")
    assert running(stack, victim, "payroll")
    after = stack.status(victim, "victim")
    for field in ("phase", "spentUSD", "conditions", "recentActions"):
        assert after.get(field) == before.get(field), field
    assert team_of(stack, f"{attacker}/grab").namespaces == [attacker]


def test_a_selector_reaches_no_workload_outside_the_governed_namespaces(
    stack: Stack, new_namespace: NewNamespace
):
    attacker, victim = new_namespace("attacker"), new_namespace("victim")
    selector = {"matchLabels": {"team": "agent"}}
    stack.create(victim, agent_job("batch"))  # labelled team=agent, as the selector asks
    stack.create(attacker, agent_job("own"))
    stack.create(attacker, budget(
        "grab", "0", workloads={"namespaces": [attacker, victim], "selector": selector},
    ))  # fmt: skip
    condition = wait_ready(stack, attacker, "grab", "False", "NamespaceNotGranted")
    assert "spec.workloads.namespaces[1]" in condition["message"]
    wait_for(lambda: stopped(stack, attacker, "own"), timeout=30, what="own Job suspended")
    assert running(stack, victim, "batch")
    # Attribution agrees: the victim's workloads are no one's (refused), never the attacker's.
    config = published(stack)
    assert config.team_for_workload(victim, {"team": "agent"}) is None
    assert config.team_for_workload(attacker, {"team": "agent"}).id == f"{attacker}/grab"


def test_a_budget_cannot_capture_another_namespaces_calls(
    stack: Stack, new_namespace: NewNamespace
):
    attacker, victim = new_namespace("attacker"), new_namespace("victim")
    stack.create(victim, policy_manifest(stack.upstream_url))
    stack.create(victim, budget("victim", routingPolicyRef={"name": "routing"}))
    wait_ready(stack, victim, "victim", "True", "Reconciled")
    # The attacker's budget claims the victim namespace and routes to its own endpoint;
    # its id sorts first ("aaa"), which used to win an overlap.
    stack.create(attacker, {**policy_manifest("http://127.0.0.1:9"),
                            "metadata": {"name": "exfiltrate"}})  # fmt: skip
    stack.create(attacker, budget(
        "aaa", workloads={"namespaces": [victim, attacker]},
        routingPolicyRef={"name": "exfiltrate"},
    ))  # fmt: skip
    wait_ready(stack, attacker, "aaa", "False", "NamespaceNotGranted")
    compiled = compile_config(published(stack), b"")
    victim_pod = Caller("token", victim, "agent-pod", "", {"team": "agent"})
    team = resolve_team(victim_pod, compiled)
    assert team is not None
    assert team.id == f"{victim}/victim"
    assert team.routing_policy == f"{victim}/routing"
    assert f"{victim}" not in compiled.teams[f"{attacker}/aaa"].namespaces
    # The victim's own calls still flow to the victim's upstream.
    key = stack.gateway.add_key(f"{victim}/victim", victim, "agent")
    wait_for(lambda: call(stack, key).status_code == 200, timeout=30, what="victim served")
    assert stack.status(victim, "victim").get("phase") in (None, "Active")


def test_withdrawing_consent_takes_the_namespace_back(stack: Stack, new_namespace: NewNamespace):
    platform, batch = new_namespace("platform"), new_namespace("batch")
    consent(stack, batch, f"{platform}/all")
    stack.create(platform, budget("all", "0", workloads={"namespaces": [platform, batch]}))
    wait_ready(stack, platform, "all", "True", "NoRoutingPolicy")
    stack.create(batch, agent_job("consented"))
    wait_for(lambda: stopped(stack, batch, "consented"), timeout=30, what="consented Job stopped")
    assert team_of(stack, f"{platform}/all").namespaces == sorted([platform, batch])

    # The cluster admin removes the annotation: the namespace is the budget's no more.
    consent(stack, batch, None)
    condition = wait_ready(stack, platform, "all", "False", "NamespaceNotGranted")
    assert "spec.workloads.namespaces[1]" in condition["message"]
    wait_for(lambda: team_of(stack, f"{platform}/all").namespaces == [platform], timeout=30,
             what="batch left out of the published team")  # fmt: skip
    stack.create(batch, agent_job("after"))
    stack.create(platform, agent_job("control"))
    wait_for(lambda: stopped(stack, platform, "control"), timeout=30, what="control stopped")
    assert running(stack, batch, "after")


def test_consent_names_one_budget_a_squatter_gets_nothing(
    stack: Stack, new_namespace: NewNamespace
):
    platform, batch, attacker = (
        new_namespace("platform"), new_namespace("batch"), new_namespace("attacker")
    )  # fmt: skip
    consent(stack, batch, f"{platform}/all")
    stack.create(platform, budget("all", "100", workloads={"namespaces": [batch]}))
    wait_ready(stack, platform, "all", "True", "NoRoutingPolicy")
    stack.create(batch, agent_job("work"))
    stack.create(attacker, agent_job("own"))
    stack.create(attacker, budget("squat", "0", workloads={"namespaces": [batch, attacker]}))
    condition = wait_ready(stack, attacker, "squat", "False", "NamespaceNotGranted")
    assert f"it names {platform}/all" in condition["message"]
    wait_for(lambda: stopped(stack, attacker, "own"), timeout=30, what="own Job suspended")
    assert running(stack, batch, "work")
    assert published(stack).team_for_workload(batch, {"team": "agent"}).id == f"{platform}/all"
    assert ready(stack, platform, "all")["status"] == "True"


def test_a_namespace_admin_cannot_write_the_consent_annotation(
    stack: Stack, new_namespace: NewNamespace
):
    attacker, victim = new_namespace("attacker"), new_namespace("victim")
    rbac = client.RbacAuthorizationV1Api(stack.api_client)
    # The tenant gets what the built-in "admin" role aggregates (this control plane runs
    # no aggregation controller, so the parts are bound one by one).
    for part in ("admin", "edit", "view"):
        rbac.create_namespaced_role_binding(attacker, {
            "metadata": {"name": f"tenant-{part}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": f"system:aggregate-to-{part}"},
            "subjects": [{"kind": "User", "name": "tenant",
                          "apiGroup": "rbac.authorization.k8s.io"}],
        })  # fmt: skip
    plane = stack.plane
    # The tenant is admin of its namespace (it can write Jobs, RoleBindings there)...
    wait_for(lambda: plane.kubectl("auth", "can-i", "create", "jobs.batch",
                                   "-n", attacker, "--as", "tenant", check=False).stdout.strip()
             == "yes", timeout=15, what="tenant is admin of its namespace")  # fmt: skip
    # ... but cannot annotate any Namespace, its own or the victim's.
    for target in (attacker, victim):
        result = plane.kubectl(
            "annotate", "namespace", target, f"{BUDGET_ANNOTATION}={attacker}/grab",
            "--as", "tenant", check=False,
        )  # fmt: skip
        assert result.returncode != 0
        assert "forbidden" in result.stderr.lower()
    core = client.CoreV1Api(stack.api_client)
    assert BUDGET_ANNOTATION not in (core.read_namespace(victim).metadata.annotations or {})


def test_forged_suspension_labels_write_nothing_into_another_teams_budget(
    stack: Stack, new_namespace: NewNamespace
):
    attacker, victim = new_namespace("attacker"), new_namespace("victim")
    stack.create(victim, budget("victim"))
    wait_ready(stack, victim, "victim", "True", "NoRoutingPolicy")
    victim_uid = stack.budget(victim, "victim")["metadata"]["uid"]
    before = stack.status(victim, "victim")
    # A suspended Job in the attacker's namespace, labelled as if the victim's budget had
    # suspended it for its cap: the resume pass would record "Resumed" in the victim's
    # status and Events.
    forged = agent_job("forged")
    forged["metadata"]["labels"].update(
        {"costwarden.io/suspended-for": "cap", "costwarden.io/suspended-by": victim_uid}
    )
    forged["spec"]["suspend"] = True
    stack.create(attacker, forged)
    # Trigger a resume pass: the attacker's own budget goes over its cap (enforcement
    # suspends its running Job, so it has seen the crossing) and back.
    stack.create(attacker, agent_job("running"))
    stack.create(attacker, budget("own", "0"))
    wait_for(lambda: stopped(stack, attacker, "running"), timeout=30, what="own cap enforced")
    stack.custom.patch_namespaced_custom_object(
        GROUP, VERSION, attacker, "teambudgets", "own", {"spec": {"hardCapUSD": "5"}}
    )
    wait_for(lambda: not stack.job(attacker, "forged").spec.suspend, timeout=30,
             what="the resume pass reached the forged Job")  # fmt: skip
    after = stack.status(victim, "victim")
    assert after.get("recentActions") == before.get("recentActions")
    core = client.CoreV1Api(stack.api_client)
    events = core.list_namespaced_event(victim, field_selector="involvedObject.name=victim")
    assert not [e for e in events.items if e.reason != "NoRoutingPolicy"], [
        (e.reason, e.message) for e in events.items
    ]


# -- T2: cross-namespace routingPolicyRef --------------------------------------------------


def _shared_policy(stack: Stack, namespace: str, grants: list[str] | None) -> None:
    policy = policy_manifest(stack.upstream_url)
    policy["metadata"]["name"] = "shared"
    if grants is not None:
        policy["spec"]["grants"] = {"namespaces": grants}
    stack.create(namespace, policy)


@pytest.mark.parametrize("grants", [None, ["team-elsewhere"]], ids=["no-grant", "other-grant"])
def test_an_ungranted_policy_reference_is_refused_and_its_upstream_never_called(
    stack: Stack, new_namespace: NewNamespace, grants: list[str] | None
):
    platform, attacker = new_namespace("platform"), new_namespace("attacker")
    _shared_policy(stack, platform, grants)
    ref = {"name": "shared", "namespace": platform}
    # The policy's own team (no grant needed) is the positive control.
    stack.create(platform, budget("legit", routingPolicyRef={"name": "shared"}))
    stack.create(attacker, budget("borrow", routingPolicyRef=ref))
    condition = wait_ready(stack, attacker, "borrow", "False", "ReferenceNotGranted")
    assert "spec.routingPolicyRef" in condition["message"]
    assert f"does not grant namespace '{attacker}'" in condition["message"]
    wait_ready(stack, platform, "legit", "True", "Reconciled")
    team = team_of(stack, f"{attacker}/borrow")
    assert team is not None
    assert team.routing_policy is None
    # The attacker's calls are refused (403: no usable policy), never forwarded.
    key = stack.gateway.add_key(f"{attacker}/borrow", attacker, "agent")
    wait_for(lambda: refusal(stack, key) == "no_routing_policy", timeout=30,
             what="attacker refused for want of a policy")  # fmt: skip
    assert call(stack, key).status_code == 403
    assert stack.upstream.calls == []
    # Positive control: the policy's own team's call through it is served.
    legit = stack.gateway.add_key(f"{platform}/legit", platform, "agent")
    wait_for(lambda: call(stack, legit).status_code == 200, timeout=30, what="legit served")
    served = len(stack.upstream.calls)
    assert refusal(stack, key) == "no_routing_policy"
    assert len(stack.upstream.calls) == served

    # The policy serves only its own team; its spec is untouched.
    def policy() -> dict[str, Any]:
        return dict(stack.custom.get_namespaced_custom_object(
            GROUP, VERSION, platform, "routingpolicies", "shared"))  # fmt: skip

    wait_for(lambda: (policy().get("status") or {}).get("teams") == 1, timeout=15,
             what="policy serves one team")  # fmt: skip
    assert (policy()["spec"].get("grants") or {}).get("namespaces") == grants


def test_granting_the_namespace_lifts_the_refusal(stack: Stack, new_namespace: NewNamespace):
    platform, team_ns = new_namespace("platform"), new_namespace("team")
    _shared_policy(stack, platform, None)
    stack.create(team_ns, budget("t", routingPolicyRef={"name": "shared", "namespace": platform}))
    wait_ready(stack, team_ns, "t", "False", "ReferenceNotGranted")
    # The policy's owner (the platform team) grants it: the reference becomes valid.
    stack.custom.patch_namespaced_custom_object(
        GROUP, VERSION, platform, "routingpolicies", "shared",
        {"spec": {"grants": {"namespaces": ["*"]}}},
    )  # fmt: skip
    wait_ready(stack, team_ns, "t", "True", "Reconciled")
    assert team_of(stack, f"{team_ns}/t").routing_policy == f"{platform}/shared"
