"""Which Jobs are stopped and resumed, and the marks left on them."""

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from costwarden.accounting.books import JobEntry, Spend
from costwarden.api.conditions import Reason
from costwarden.api.teambudget import PerJobLimits, TeamBudgetSpec
from costwarden.enforcement.decisions import (
    BudgetStanding,
    jobs_to_resume,
    jobs_to_stop,
    over_job_cap,
    resume_patch,
    stop_reason,
    suspend_patch,
)
from costwarden.enforcement.workload import ResumeReason, StopReason


def job(name, namespace="team", labels=None, suspend=False, finished=None, annotations=None):
    conditions = [{"type": finished, "status": "True"}] if finished else []
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {},
                     "annotations": annotations or {}},
        "spec": {"suspend": suspend},
        "status": {"conditions": conditions},
    }  # fmt: skip


def spec(**extra) -> TeamBudgetSpec:
    return TeamBudgetSpec.model_validate({"hardCapUSD": 10, **extra})


def names(jobs):
    return sorted(j["metadata"]["name"] for j in jobs)


def test_only_running_jobs_of_the_team_are_stopped():
    jobs = [
        job("running"),
        job("suspended", suspend=True),
        job("done", finished="Complete"),
        job("failed", finished="Failed"),
        job("elsewhere", namespace="other"),
    ]
    assert names(jobs_to_stop(jobs, spec(), ["team"])) == ["running"]


def test_selector_and_namespaces_decide_membership():
    team = spec(workloads={"namespaces": ["a", "b"], "selector": {"matchLabels": {"t": "x"}}})
    jobs = [
        job("in-a", "a", {"t": "x"}),
        job("in-b", "b", {"t": "x"}),
        job("wrong", "a", {"t": "y"}),
    ]
    assert names(jobs_to_stop(jobs, team, ["a", "b"])) == ["in-a", "in-b"]


def test_a_claimed_but_ungoverned_namespace_is_never_touched():
    # The budget claims kube-system; without the Namespace's consent it governs "team" only.
    team = spec(workloads={"namespaces": ["team", "kube-system"]})
    jobs = [job("own"), job("victim", namespace="kube-system")]
    assert names(jobs_to_stop(jobs, team, ["team"])) == ["own"]


def test_exemptions_come_from_the_budget_only():
    team = spec(exemptions={"jobNames": ["vip"], "jobSelector": {"matchLabels": {"tier": "gold"}}})
    jobs = [
        job("vip"),
        job("gold", labels={"tier": "gold"}),
        job("self-exempt", labels={"costwarden.io/exempt": "true"},
            annotations={"costwarden.io/exempt": "true"}),
    ]  # fmt: skip
    assert names(jobs_to_stop(jobs, team, ["team"])) == ["self-exempt"]


def test_an_empty_exemption_selector_exempts_nothing():
    team = spec(exemptions={"jobSelector": {}})
    assert names(jobs_to_stop([job("a")], team, ["team"])) == ["a"]


@pytest.mark.parametrize(
    ("cap_reason", "expected"),
    [
        (Reason.HARD_CAP_EXCEEDED, StopReason.HARD_CAP_REACHED),
        (Reason.TOKEN_CAP_EXCEEDED, StopReason.TOKEN_CAP_REACHED),
    ],
)
def test_stop_reason_follows_the_cap(cap_reason, expected):
    assert stop_reason(cap_reason) is expected


def suspended(name, uid="uid-1", reason=StopReason.HARD_CAP_REACHED, at="2026-11-25T12:00:00Z"):
    patch = suspend_patch(budget_uid=uid, budget_id="team/b", reason=reason, at=at, message="m")
    body = job(name, suspend=True)
    body["metadata"]["labels"].update(patch["metadata"]["labels"])
    body["metadata"]["annotations"].update(patch["metadata"]["annotations"])
    return body


def test_resume_only_what_was_suspended_for_the_cap():
    jobs = [suspended("cap"), suspended("loop", reason=StopReason.RETRY_LOOP_DETECTED)]
    standing = {"uid-1": BudgetStanding("uid-1", exhausted=False, period_start=None)}
    decided = jobs_to_resume(jobs, standing)
    assert [(j["metadata"]["name"], r) for j, r in decided] == [("cap", ResumeReason.CAP_RAISED)]


def test_nothing_resumes_while_the_budget_is_still_exhausted():
    standing = {"uid-1": BudgetStanding("uid-1", exhausted=True, period_start=None)}
    assert jobs_to_resume([suspended("cap")], standing) == []


def test_a_new_period_is_the_resume_reason_when_it_started_after_the_stop():
    december = datetime(2026, 12, 1, tzinfo=UTC)
    standing = {"uid-1": BudgetStanding("uid-1", exhausted=False, period_start=december)}
    [(_, reason)] = jobs_to_resume([suspended("cap")], standing)
    assert reason is ResumeReason.PERIOD_ROLLED_OVER


def test_jobs_of_a_deleted_budget_are_resumed():
    [(_, reason)] = jobs_to_resume([suspended("cap")], {})
    assert reason is ResumeReason.BUDGET_DELETED


def test_a_job_resumed_by_hand_is_left_alone():
    body = suspended("cap")
    body["spec"]["suspend"] = False
    assert jobs_to_resume([body], {}) == []


def test_suspend_and_resume_patches_carry_the_why():
    patch = suspend_patch(
        budget_uid="u", budget_id="t/b", reason=StopReason.RETRY_LOOP_DETECTED, at="T", message="m"
    )
    assert patch["spec"] == {"suspend": True}
    assert patch["metadata"]["labels"] == {
        "costwarden.io/suspended-by": "u",
        "costwarden.io/suspended-for": "job",
    }
    assert patch["metadata"]["annotations"]["costwarden.io/stopped-reason"] == "RetryLoopDetected"
    resumed = resume_patch(ResumeReason.CAP_RAISED, "T2")
    assert resumed["metadata"]["labels"]["costwarden.io/suspended-by"] is None
    assert resumed["metadata"]["annotations"]["costwarden.io/resumed-reason"] == "CapRaised"


def test_per_job_caps():
    limits = PerJobLimits(max_cost_usd=Decimal("1.5"), max_tokens=1000)
    assert over_job_cap(JobEntry(Spend(Decimal("1.49"), 10, 1)), limits) is None
    assert "maxCostUSD" in over_job_cap(JobEntry(Spend(Decimal("1.5"), 10, 1)), limits)
    assert "maxTokens" in over_job_cap(JobEntry(Spend(Decimal(0), 1000, 1)), limits)
    assert over_job_cap(JobEntry(Spend(Decimal(9), 10, 1)), None) is None
