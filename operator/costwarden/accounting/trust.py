"""What ingestion believes of a usage entry (pure): everything it can recompute, it does.

A reporter (a gateway or an injected sidecar) sends records and loop signals. Its
credential proves *who* it is; nothing else in an entry is taken as sent
(ARCHITECTURE.md invariant 4a, docs/security-ingestion.md):

- the **team** is recomputed from the operator's own view of the pod (its namespace and
  labels, read from the API server) with the gateway configuration's attribution
  (``GatewayConfig.team_for_workload``); an entry naming another team is refused;
- the **job** is the pod's owning Job (``ownerReferences``), never a label or the entry;
- the **attribution tags** (``labels``: repository, change, ...) are the pod's
  ``costwarden.io/<key>`` annotations and labels, bounded by the team's
  ``spec.attribution`` (policy.attribution); what the entry carries is replaced;
- the **cost** is recomputed from the team's RoutingPolicy prices for the served model and
  the reported tokens; a served model outside the team's policy is refused;
- **tokens** are bounded per record, **time** to a window around now (and never before
  the pod existed);
- a loop signal acts on the pod's own Job only, with the action of the budget's spec.

Refusals carry a machine-readable reason (:class:`Refusal`), counted in
``costwarden_ingest_refused_total{reason}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from costwarden.api.attribution import TAG_PREFIX
from costwarden.api.gatewayconfig import GatewayConfig, ResolvedPricing, TeamConfig
from costwarden.api.teambudget import JobAction
from costwarden.api.usage import LoopKind, LoopSignal, UsageRecord
from costwarden.policy.attribution import Tags, tags_for
from costwarden.policy.pricing import call_cost

MAX_RECORD_TOKENS = 50_000_000
MAX_RECORD_TOOL_CALLS = 1_000
"""Provider-run tool calls one response can make (a Responses API call with more is not
a call but a claim)."""
"""Tokens one call may report (input + output + cached + cache writes). The largest
context windows today are a few million tokens; 50M is generous and still finite, so one
record cannot claim an absurd amount (docs/security-ingestion.md)."""

FUTURE_SKEW = timedelta(minutes=5)
"""A record may be stamped at most this far ahead of the operator's clock (clock skew)."""
SIDECAR_MAX_AGE = timedelta(hours=1)
"""A sidecar's record may be at most this old: sidecars run in the tenant's pod, so their
records cannot move spend into an earlier period by more than this."""
GATEWAY_MAX_AGE = timedelta(days=35)
"""A trusted gateway's record may be this old: its ledger re-sends after an operator
outage, and its cursor is kept as long (accounting.ledger.CURSOR_IDLE)."""
CREATION_SKEW = timedelta(minutes=1)
"""A call cannot predate its pod; this much clock skew is tolerated."""
KEY_CALLER = "key"


class Refusal(StrEnum):
    """Why an entry is refused (the ``reason`` label of costwarden_ingest_refused_total)."""

    FOREIGN_POD = "foreign_pod"
    """A sidecar reported an entry of a pod other than its own."""
    POD_UNKNOWN = "pod_unknown"
    """The pod named is unknown to the API server (or its uid differs from the token's)."""
    TEAM_MISMATCH = "team_mismatch"
    """The entry's team is not the team the pod belongs to."""
    JOB_MISMATCH = "job_mismatch"
    """The entry's job is not the pod's owning Job."""
    COST_MISMATCH = "cost_mismatch"
    """The entry's cost is not the served model's price times its tokens."""
    MODEL_NOT_IN_POLICY = "model_not_in_policy"
    """The served model is not in the team's RoutingPolicy."""
    TOKENS_OUT_OF_BOUNDS = "tokens_out_of_bounds"
    """More tokens (MAX_RECORD_TOKENS) or provider-run tool calls (MAX_RECORD_TOOL_CALLS)
    than one call can use."""
    TIME_OUT_OF_WINDOW = "time_out_of_window"
    """Stamped in the future, too long ago, or before the pod existed."""
    ACTION_MISMATCH = "action_mismatch"
    """A loop signal asks for another action than the budget's loopDetection.action."""
    INVALID_BATCH = "invalid_batch"
    """The batch does not parse (schema: negative tokens, bad types, too many items)."""


@dataclass(frozen=True)
class Reporter:
    """Who sent the batch, as its credential proves it.

    ``identity`` keys the de-duplication cursors (``<identity>#<source>``): a reporter can
    only advance its own. ``pod`` is set for sidecars, whose entries must all be that pod's.
    """

    identity: str
    """``pod:<ns>/<name>/<uid>`` (sidecar), ``sa:<ns>/<name>`` (gateway service account)
    or ``token:shared`` (shared bearer token)."""
    namespace: str = ""
    pod: str = ""
    pod_uid: str = ""

    @property
    def is_sidecar(self) -> bool:
        return bool(self.pod)

    def cursor_key(self, source: str) -> str:
        """The cursor a source of this reporter advances. Injective: an identity never
        holds ``#`` (names, uids and the fixed prefixes do not), so the first ``#`` splits."""
        return f"{self.identity}#{source}"


@dataclass(frozen=True)
class PodFacts:
    """The pod as the API server has it (never as a record describes it)."""

    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str]
    job: str
    """The owning Job (ownerReferences kind Job, controller), "" if none."""
    created: datetime | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    """Only the ``costwarden.io/`` ones (attribution tags): a pod's other annotations can
    be large and are never needed here."""


def owner_job(pod: Mapping[str, object]) -> str:
    """The Job that controls a pod, from ``metadata.ownerReferences`` (labels are not used:
    a pod's creator writes those freely)."""
    meta = pod.get("metadata")
    references = meta.get("ownerReferences") if isinstance(meta, Mapping) else None
    for reference in references if isinstance(references, list) else []:
        if (
            isinstance(reference, Mapping)
            and reference.get("kind") == "Job"
            and str(reference.get("apiVersion", "")).startswith("batch/")
            and reference.get("controller") is True
        ):
            return str(reference.get("name") or "")
    return ""


def pod_facts(pod: Mapping[str, object]) -> PodFacts:
    meta = pod.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    labels = meta.get("labels")
    annotations = meta.get("annotations")
    created: datetime | None = None
    stamp = meta.get("creationTimestamp")
    if isinstance(stamp, str):
        try:
            created = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        except ValueError:
            created = None
    return PodFacts(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {},
        job=owner_job(pod),
        created=created,
        annotations={
            str(k): str(v) for k, v in annotations.items() if str(k).startswith(TAG_PREFIX)
        }
        if isinstance(annotations, Mapping)
        else {},
    )


PricesOf = Callable[[TeamConfig, str], Sequence[ResolvedPricing]]
"""The pricings a team's policy gave a served model recently (the current one first);
empty when the model is not in the team's policy (see controllers.ingest_trust)."""


def current_prices(config: GatewayConfig) -> PricesOf:
    """Only the configuration in force: the pure default (no memory of recent changes)."""

    def prices(team: TeamConfig, model: str) -> Sequence[ResolvedPricing]:
        policy = config.policy(team.routing_policy)
        route = policy.model(model) if policy is not None else None
        return [route.pricing] if route is not None else []

    return prices


Attribution = Callable[[str, Mapping[str, str]], TeamConfig | None]


@dataclass(frozen=True)
class Checked:
    """An entry ingestion will apply, as the operator recomputed it, or why it will not."""

    seq: int
    team: str = ""
    record: UsageRecord | None = None
    signal: LoopSignal | None = None
    refusal: Refusal | None = None
    message: str = ""
    invalid_tags: tuple[str, ...] = ()
    """Attribution keys whose value the team's TeamBudget does not allow (recorded as
    ``_invalid``; the record still counts)."""


@dataclass
class Check:
    """The inputs of one entry's check (one per entry; pods are looked up beforehand)."""

    reporter: Reporter
    config: GatewayConfig
    now: datetime
    prices: PricesOf
    pod: PodFacts | None = None
    """The pod the entry is about, as the API server has it; None when the entry names no
    pod (a trusted gateway's per-team-key or namespace-only caller)."""
    attribute: Attribution | None = None
    """The attribution to use (a memo of ``config.team_for_workload`` over one batch);
    None: ``config.team_for_workload`` itself."""

    def team_for(self, namespace: str, labels: Mapping[str, str]) -> TeamConfig | None:
        if self.attribute is not None:
            return self.attribute(namespace, labels)
        return self.config.team_for_workload(namespace, dict(labels))


def refuse(seq: int, refusal: Refusal, message: str) -> Checked:
    return Checked(seq=seq, refusal=refusal, message=message)


def check_record(seq: int, record: UsageRecord, check: Check) -> Checked:
    team_or_refusal = _team(
        seq, record.team, record.namespace, record.pod, record.caller, record.job, check
    )
    if isinstance(team_or_refusal, Checked):
        return team_or_refusal
    team, job = team_or_refusal
    window = _time_refusal(seq, record.time, check)
    if window is not None:
        return window
    total = record.tokens.total()
    if total > MAX_RECORD_TOKENS:
        return refuse(
            seq,
            Refusal.TOKENS_OUT_OF_BOUNDS,
            f"seq {seq}: {total} tokens in one call (at most {MAX_RECORD_TOKENS})",
        )
    tool_calls = sum(record.tool_calls.values())
    if tool_calls > MAX_RECORD_TOOL_CALLS:
        return refuse(
            seq,
            Refusal.TOKENS_OUT_OF_BOUNDS,
            f"seq {seq}: {tool_calls} provider-run tool calls in one call "
            f"(at most {MAX_RECORD_TOOL_CALLS})",
        )
    if team is None:
        # Unattributed (refused by the gateway before any upstream call): counted nowhere,
        # which is only acceptable when it costs nothing.
        if record.usage_reported or record.cost_usd:
            return refuse(
                seq, Refusal.TEAM_MISMATCH, f"seq {seq}: a record without a team cannot carry usage"
            )
        return Checked(seq=seq, record=record.model_copy(update={"labels": {}}))
    if not record.usage_reported:
        if record.cost_usd:
            return refuse(
                seq,
                Refusal.COST_MISMATCH,
                f"seq {seq}: a call without reported usage costs 0, not {record.cost_usd}",
            )
        tags = _tags(team, check)
        trusted = record.model_copy(update={"job": job, "team": team.id, "labels": tags.values})
        return Checked(seq=seq, team=team.id, record=trusted, invalid_tags=tags.invalid)
    pricings = check.prices(team, record.served_model)
    if not pricings:
        return refuse(
            seq,
            Refusal.MODEL_NOT_IN_POLICY,
            f"seq {seq}: model {record.served_model!r} is not in the routing policy "
            f"of TeamBudget {team.id} ({team.routing_policy or 'none'})",
        )
    costs = [
        call_cost(record.tokens, pricing, record.tool_calls, record.service_tier)
        for pricing in pricings
    ]
    cost = next((c for c in costs if c == record.cost_usd), None)
    if cost is None:
        return refuse(
            seq,
            Refusal.COST_MISMATCH,
            f"seq {seq}: {record.cost_usd} USD claimed, but these tokens of "
            f"{record.served_model} cost {_plain(costs[0])} USD at the policy's prices",
        )
    tags = _tags(team, check)
    trusted = record.model_copy(
        update={"job": job, "team": team.id, "cost_usd": cost, "labels": tags.values}
    )
    return Checked(seq=seq, team=team.id, record=trusted, invalid_tags=tags.invalid)


def check_signal(seq: int, signal: LoopSignal, check: Check) -> Checked:
    caller = "" if signal.pod else KEY_CALLER  # a trusted gateway's per-team-key caller
    team_or_refusal = _team(
        seq, signal.team, signal.namespace, signal.pod, caller, signal.job, check
    )
    if isinstance(team_or_refusal, Checked):
        return team_or_refusal
    team, job = team_or_refusal
    if team is None:
        return refuse(
            seq,
            Refusal.TEAM_MISMATCH,
            f"seq {seq}: pod {signal.namespace}/{signal.pod} belongs to no "
            "TeamBudget; a loop signal needs one",
        )
    window = _time_refusal(seq, signal.time, check)
    if window is not None:
        return window
    action = team.loop_detection.action
    setting = "loopDetection.action"
    if signal.loop is LoopKind.JOB_CAP_REACHED:
        # A per-job cap refusal: the budget's onHardCap.jobs applies, and only if it has one.
        action, setting = team.on_hard_cap.jobs, "onHardCap.jobs"
        if team.per_job is None:
            return refuse(
                seq,
                Refusal.ACTION_MISMATCH,
                f"seq {seq}: a per-job cap signal, but TeamBudget {team.id} sets no perJob caps",
            )
    if signal.action is not action:
        return refuse(
            seq,
            Refusal.ACTION_MISMATCH,
            f"seq {seq}: the loop signal asks for {signal.action.value}, but "
            f"TeamBudget {team.id} sets {setting} {action.value}",
        )
    if not job:
        # A pod outside any Job: nothing to stop, but the signal is genuine and counted.
        action = JobAction.NONE
    trusted = signal.model_copy(update={"job": job, "team": team.id, "action": action})
    return Checked(seq=seq, team=team.id, signal=trusted)


def _team(
    seq: int, named: str, namespace: str, pod: str, caller: str, job: str, check: Check
) -> tuple[TeamConfig | None, str] | Checked:
    """The entry's team and job as the operator sees them, or the refusal."""
    reporter = check.reporter
    if reporter.is_sidecar and (namespace, pod) != (reporter.namespace, reporter.pod):
        return refuse(
            seq,
            Refusal.FOREIGN_POD,
            f"seq {seq}: this sidecar may report usage of pod "
            f"{reporter.namespace}/{reporter.pod} only, not of {namespace}/{pod}",
        )
    facts = check.pod
    if facts is None:
        if reporter.is_sidecar or pod:
            return refuse(
                seq,
                Refusal.POD_UNKNOWN,
                f"seq {seq}: pod {namespace}/{pod} is unknown to the API server",
            )
        if caller == KEY_CALLER:
            # A per-team key, checked by the (trusted) gateway against the digests the
            # operator issued: the key names its team; there is no pod to look at.
            team = check.config.team(named) if named else None
            if named and team is None:
                return refuse(
                    seq,
                    Refusal.TEAM_MISMATCH,
                    f"seq {seq}: no TeamBudget {named} in the configuration",
                )
            if team is not None and namespace not in team.namespaces:
                return refuse(
                    seq,
                    Refusal.TEAM_MISMATCH,
                    f"seq {seq}: namespace {namespace} is not governed by {named}",
                )
            return team, job
        team = check.team_for(namespace, {})
        job = ""
    else:
        if reporter.is_sidecar and reporter.pod_uid and facts.uid != reporter.pod_uid:
            return refuse(
                seq,
                Refusal.POD_UNKNOWN,
                f"seq {seq}: pod {namespace}/{pod} is not the pod the token was "
                "issued for (uid differs)",
            )
        team = check.team_for(facts.namespace, facts.labels)
        if job != facts.job:
            return refuse(
                seq,
                Refusal.JOB_MISMATCH,
                f"seq {seq}: pod {namespace}/{pod} is "
                + (f"owned by Job {facts.job}" if facts.job else "owned by no Job")
                + f", not by {job!r}",
            )
        job = facts.job
    recomputed = team.id if team is not None else ""
    if named != recomputed:
        return refuse(
            seq,
            Refusal.TEAM_MISMATCH,
            f"seq {seq}: pod {namespace}/{pod or '-'} belongs to "
            f"{recomputed or 'no TeamBudget'}, not to {named or 'no TeamBudget'}",
        )
    return team, job


def _tags(team: TeamConfig, check: Check) -> Tags:
    """The record's tags, from the pod as the API server has it and the team's declared
    keys; none without a pod (a per-team key's caller has no pod to read them from)."""
    facts = check.pod
    if facts is None:
        return Tags({})
    return tags_for(facts.labels, facts.annotations, team.tags())


def _time_refusal(seq: int, moment: datetime, check: Check) -> Checked | None:
    now = check.now
    oldest = now - (SIDECAR_MAX_AGE if check.reporter.is_sidecar else GATEWAY_MAX_AGE)
    if check.pod is not None and check.pod.created is not None:
        oldest = max(oldest, check.pod.created - CREATION_SKEW)
    if moment > now + FUTURE_SKEW or moment < oldest:
        return refuse(
            seq,
            Refusal.TIME_OUT_OF_WINDOW,
            f"seq {seq}: time {moment.isoformat()} is outside "
            f"[{oldest.isoformat()}, {(now + FUTURE_SKEW).isoformat()}]",
        )
    return None


def _plain(amount: Decimal) -> str:
    return format(amount.normalize(), "f") if amount else "0"


__all__ = [
    "MAX_RECORD_TOKENS",
    "MAX_RECORD_TOOL_CALLS",
    "Check",
    "Checked",
    "PodFacts",
    "Refusal",
    "Reporter",
    "check_record",
    "check_signal",
    "current_prices",
    "owner_job",
    "pod_facts",
]
