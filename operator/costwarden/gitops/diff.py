"""What a change to the manifests does, object by object, in words a reviewer reads.

Both sides go through the operator's own reconciliation (``policy.render.reconcile``), so
the comparison is between the configurations the gateways would enforce before and after
(prices resolved from the catalogue, invalid objects left out), not between YAML texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from costwarden.api import routingpolicy, teambudget
from costwarden.api.catalog import PriceCatalog
from costwarden.api.teambudget import TeamBudgetSpec
from costwarden.gitops.budgetdiff import budget_changes, describe_budget
from costwarden.gitops.loader import Document
from costwarden.gitops.objects import DEFAULT_NAMESPACE, envelope_problems, read_objects
from costwarden.gitops.policydiff import describe_policy, policy_changes, routing_change
from costwarden.gitops.render import reconcile_documents
from costwarden.gitops.words import Change
from costwarden.policy.render import Reconciliation, Verdict
from costwarden.policy.validation import parse_team_budget_spec


@dataclass(frozen=True)
class Side:
    """One revision of the manifests as the operator would see it."""

    result: Reconciliation
    budgets: dict[str, TeamBudgetSpec | None]
    """Every TeamBudget id of this side, with its spec when the spec parses."""
    policy_ids: set[str]

    @staticmethod
    def of(documents: Sequence[Document], catalog: PriceCatalog, now: datetime, ns: str) -> Side:
        objects = [o for o in read_objects(documents, ns) if not envelope_problems(o)]
        budgets: dict[str, TeamBudgetSpec | None] = {}
        for obj in objects:
            if obj.kind == teambudget.KIND:
                parsed = parse_team_budget_spec(obj.spec)
                budgets[obj.id] = None if isinstance(parsed, list) else parsed
        return Side(
            result=reconcile_documents(documents, catalog=catalog, now=now, default_namespace=ns),
            budgets=budgets,
            policy_ids={o.id for o in objects if o.kind == routingpolicy.KIND},
        )


@dataclass(frozen=True)
class DiffResult:
    changes: list[Change]
    old: Side
    new: Side


def compare(
    old_documents: Sequence[Document],
    new_documents: Sequence[Document],
    *,
    catalog: PriceCatalog,
    now: datetime,
    default_namespace: str = DEFAULT_NAMESPACE,
) -> DiffResult:
    old = Side.of(old_documents, catalog, now, default_namespace)
    new = Side.of(new_documents, catalog, now, default_namespace)
    changes = _budgets(old, new) + _policies(old, new)
    return DiffResult(changes, old, new)


def _budgets(old: Side, new: Side) -> list[Change]:
    changes = []
    for budget_id in sorted(set(old.budgets) | set(new.budgets)):
        ref = f"{teambudget.KIND} {budget_id}"
        namespace = budget_id.split("/", 1)[0]
        before, after = old.budgets.get(budget_id), new.budgets.get(budget_id)
        if budget_id not in old.budgets:
            text = describe_budget(after, namespace) if after else "invalid"
            changes.append(Change(ref, "added", f"new TeamBudget: {text}"))
        elif budget_id not in new.budgets:
            changes.append(
                Change(
                    ref,
                    "removed",
                    "TeamBudget removed: its workloads' calls "
                    "are no longer attributed to a team (the gateway refuses them)",
                )
            )
        elif before is not None and after is not None:
            changes += budget_changes(ref, before, after, namespace, namespace)
            changes += _team_routing(ref, budget_id, old, new)
        readiness = _readiness(
            ref, old.result.budgets.get(budget_id), new.result.budgets.get(budget_id)
        )
        if readiness:
            changes.append(readiness)
    return changes


def _team_routing(ref: str, budget_id: str, old: Side, new: Side) -> list[Change]:
    """When a team moves to another policy, where its calls go now."""
    old_team, new_team = old.result.config.team(budget_id), new.result.config.team(budget_id)
    if old_team is None or new_team is None or old_team.routing_policy == new_team.routing_policy:
        return []
    routing = routing_change(
        ref,
        old.result.config.policy(old_team.routing_policy),
        new.result.config.policy(new_team.routing_policy),
    )
    return [routing] if routing else []


def _policies(old: Side, new: Side) -> list[Change]:
    changes = []
    for policy_id in sorted(old.policy_ids | new.policy_ids):
        ref = f"{routingpolicy.KIND} {policy_id}"
        before = old.result.config.policy(policy_id)
        after = new.result.config.policy(policy_id)
        if policy_id not in old.policy_ids:
            text = describe_policy(after) if after else "invalid"
            changes.append(Change(ref, "added", f"new RoutingPolicy: {text}"))
        elif policy_id not in new.policy_ids:
            changes.append(
                Change(
                    ref,
                    "removed",
                    "RoutingPolicy removed: TeamBudgets that "
                    "name it become not Ready and their calls are refused",
                )
            )
        elif before is not None and after is not None:
            changes += policy_changes(ref, before, after)
        readiness = _readiness(
            ref, old.result.policies.get(policy_id), new.result.policies.get(policy_id)
        )
        if readiness:
            changes.append(readiness)
    return changes


def _readiness(ref: str, old: Verdict | None, new: Verdict | None) -> Change | None:
    """An object that turns invalid (or valid again): the operator's verdict, verbatim."""
    if (
        new is not None
        and not new.ready
        and (old is None or old.ready or old.message != new.message)
    ):
        return Change(ref, "invalid", f"not applied by the operator: {new.reason}: {new.message}")
    if old is not None and not old.ready and new is not None and new.ready:
        return Change(ref, "invalid", f"fixed: applied again (was {old.reason}: {old.message})")
    return None
