"""The counters behind the limits in the request path, per team and per job.

Team spend = the operator's spend snapshot in the configuration + what this replica has
metered since that configuration arrived. A new configuration revision resets the local
part (its snapshot already includes what the operator has aggregated), so a call metered
just before a reload but not yet aggregated is briefly not counted: the cap can be
overshot by what one replica meters in one aggregation round trip.

Per-job totals (cost, tokens, rate, loop state) are what *this* gateway has seen of the
job over its life: exact for a sidecar (one pod), per replica for the shared gateway, where
a job spread over N replicas may spend up to N times its per-job cap (documented
limitation; the operator's aggregation still applies the team cap).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from costwarden.api.gatewayconfig import TeamConfig
from costwarden.api.teambudget import BudgetPhase, TokenUsage
from costwarden.api.usage import RefusalReason
from costwarden.policy import limits as decide
from costwarden.policy.caps import CapVerdict
from costwarden.policy.limits import LimitRefusal
from costwarden.policy.loops import LoopState, LoopTrip, check_request, record_outcome

MAX_JOBS = 50_000  # least recently seen jobs are forgotten beyond this
MAX_REMEMBERED_TOTAL = 400_000
"""Requests remembered for loop detection across all jobs (each job keeps at most
``policy.loops.MAX_REMEMBERED``). Beyond it, the loop windows of the least recently seen
jobs are forgotten first (their cost, token and rate counters are kept): about 200 bytes a
remembered request, so ~80 MB at most; see docs/operations.md, "Memory bounds"."""


@dataclass
class TeamSeen:
    revision: str
    cost: Decimal = Decimal(0)
    tokens: TokenUsage = field(default_factory=TokenUsage)
    verdict: CapVerdict | None = None
    models: dict[str, tuple[Decimal, int]] = field(default_factory=dict)
    """Cost and tokens (input plus output) metered on each model since this revision."""
    operator_exhausted: bool = False
    """The operator's acknowledgement said Exhausted (it sees every replica's usage); holds
    until the next configuration revision, which carries the operator's phase itself."""


@dataclass
class JobState:
    cost: Decimal = Decimal(0)
    tokens: int = 0
    times: deque[float] = field(default_factory=deque)
    loop: LoopState = field(default_factory=LoopState)
    cap_signalled: bool = False
    """A JobCapReached signal was sent for this job (gateway/proxy.py): once is enough."""


@dataclass(frozen=True, slots=True)
class Admission:
    refusal: LimitRefusal | None
    phase: BudgetPhase
    loop: LoopTrip | None = None


class Limits:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._teams: dict[str, TeamSeen] = {}
        self._floors: dict[str, tuple[tuple[object, ...], BudgetPhase]] = {}
        """The furthest phase seen per team, under the period and limits it was seen at."""
        self._jobs: OrderedDict[tuple[str, str], JobState] = OrderedDict()
        self.remembered = 0
        """Requests held in all jobs' loop windows (bounded by MAX_REMEMBERED_TOTAL)."""

    def _team(self, team: TeamConfig, revision: str) -> TeamSeen:
        seen = self._teams.get(team.id)
        if seen is None or seen.revision != revision:
            seen = self._teams[team.id] = TeamSeen(revision)
        return seen

    def note_operator_phases(self, phases: Mapping[str, BudgetPhase]) -> None:
        """Phases from the operator's usage acknowledgement (gateway/reporting.py)."""
        for team_id, phase in phases.items():
            seen = self._teams.get(team_id)
            if seen is not None and phase is BudgetPhase.EXHAUSTED:
                seen.operator_exhausted = True
                seen.verdict = None

    def _at_least_as_far(self, team: TeamConfig, verdict: CapVerdict) -> CapVerdict:
        """A phase never goes back within a period under the same limits. A new revision
        carries a spend snapshot that may predate what this gateway metered (the local part
        restarts from it), which briefly read as Active again after SoftLimited, routing a
        frontier call the soft limit should have downgraded."""
        key = (team.spend.period_start, team.hard_cap_usd, team.soft_limit_usd, team.token_caps)
        floor = self._floors.get(team.id)
        if floor is not None and floor[0] == key:
            if decide.phase_order(floor[1]) > decide.phase_order(verdict.phase):
                return CapVerdict(floor[1], verdict.reason, f"{verdict.message} (earlier in "
                                  f"this period: {floor[1].value})")  # fmt: skip
            if floor[1] is verdict.phase:
                return verdict
        self._floors[team.id] = (key, verdict.phase)
        return verdict

    def team_spend(self, team: TeamConfig, revision: str) -> tuple[Decimal, TokenUsage | None]:
        """The team's settled spend as this gateway knows it: the operator's snapshot plus
        what this replica metered since (what reservations are checked against); tokens
        only if the team has token caps."""
        seen = self._team(team, revision)
        spend = team.spend
        if team.token_caps is None:
            return spend.spent_usd + seen.cost, None
        a, b = spend.tokens, seen.tokens
        tokens = TokenUsage.model_construct(  # sums of checked counts: no re-validation
            input=a.input + b.input,
            output=a.output + b.output,
            cached_input=a.cached_input + b.cached_input,
            cache_creation=a.cache_creation + b.cache_creation,
            cache_creation_1h=a.cache_creation_1h + b.cache_creation_1h,
        )
        return spend.spent_usd + seen.cost, tokens

    def model_spend(self, team: TeamConfig, revision: str, model: str) -> tuple[Decimal, int]:
        """Settled cost and tokens of ``model`` this period: the operator's snapshot
        (``spend.models``) plus what this replica metered on it since."""
        cost, tokens = self._team(team, revision).models.get(model, (Decimal(0), 0))
        snapshot = next((m for m in team.spend.models if m.model == model), None)
        if snapshot is not None:
            cost, tokens = cost + snapshot.spent_usd, tokens + snapshot.tokens
        return cost, tokens

    def job(self, team_id: str, unit: str) -> JobState:
        key = (team_id, unit)
        state = self._jobs.get(key)
        if state is None:
            state = self._jobs[key] = JobState()
            if len(self._jobs) > MAX_JOBS:
                _, old = self._jobs.popitem(last=False)
                self.remembered -= len(old.loop.order)
        else:
            self._jobs.move_to_end(key)
        return state

    def _shed_loop_windows(self, current: JobState) -> None:
        """Forget the loop windows of the least recently seen jobs until the total is back
        to 90% of MAX_REMEMBERED_TOTAL (the current job's last)."""
        target = MAX_REMEMBERED_TOTAL * 9 // 10
        for state in self._jobs.values():
            if self.remembered <= target:
                return
            if state is not current:
                self.remembered -= state.loop.forget_window()
        if self.remembered > target:
            self.remembered -= current.loop.forget_window()

    def admit(self, team: TeamConfig, revision: str, unit: str, fingerprint: str) -> Admission:
        """Hard cap, per-job caps, retry loop, then rate (a refused call is not counted)."""
        seen = self._team(team, revision)
        if seen.verdict is None:
            verdict = decide.team_verdict(team, seen.cost, seen.tokens)
            seen.verdict = self._at_least_as_far(team, verdict)
            if seen.operator_exhausted and not seen.verdict.over_hard_cap:
                seen.verdict = decide.operator_exhausted_verdict()
        phase = seen.verdict.phase
        refusal = decide.hard_cap_refusal(team, seen.verdict)
        job = self.job(team.id, unit)
        if refusal is None:
            refusal = decide.job_cap_refusal(team, unit, team.per_job, job.cost, job.tokens)
        if refusal is not None:
            return Admission(refusal, phase)
        now = self._clock()
        before = len(job.loop.order)
        trip = check_request(job.loop, team.loop_detection, fingerprint, now)
        self.remembered += len(job.loop.order) - before
        if self.remembered > MAX_REMEMBERED_TOTAL:
            self._shed_loop_windows(job)
        if trip is not None:
            return Admission(_loop_refusal(team, unit, trip), phase, trip)
        rpm = team.per_job.max_requests_per_minute if team.per_job else None
        return Admission(decide.rate_refusal(team, unit, job.times, rpm, now), phase)

    def record(
        self,
        team: TeamConfig,
        revision: str,
        unit: str,
        tokens: TokenUsage | None,
        cost: Decimal,
        *,
        upstream_error: bool,
        model: str = "",
    ) -> None:
        job = self.job(team.id, unit)
        record_outcome(job.loop, upstream_error=upstream_error)
        if tokens is None:
            return
        job.cost += cost
        job.tokens += tokens.prompt() + tokens.output
        seen = self._team(team, revision)
        seen.cost += cost
        seen.tokens = TokenUsage.model_construct(  # sums of checked counts: no re-validation
            input=seen.tokens.input + tokens.input,
            output=seen.tokens.output + tokens.output,
            cached_input=seen.tokens.cached_input + tokens.cached_input,
            cache_creation=seen.tokens.cache_creation + tokens.cache_creation,
            cache_creation_1h=seen.tokens.cache_creation_1h + tokens.cache_creation_1h,
        )
        if model:
            cost_m, tokens_m = seen.models.get(model, (Decimal(0), 0))
            seen.models[model] = (cost_m + cost, tokens_m + tokens.input + tokens.output)
        seen.verdict = None


def _loop_refusal(team: TeamConfig, unit: str, trip: LoopTrip) -> LimitRefusal:
    settings = team.loop_detection
    if trip.kind.value == "ConsecutiveErrors":
        what = f"{trip.count} upstream errors in a row (loopDetection.consecutiveErrors)"
    else:
        what = (
            f"{trip.count} identical requests within {settings.window_seconds} s "
            "(loopDetection.identicalRequests)"
        )
    return LimitRefusal(
        RefusalReason.RETRY_LOOP,
        f"job {unit} of TeamBudget {team.id} looks stuck in a retry loop: {what}; its calls "
        f"are refused for {settings.window_seconds} s and the operator applies "
        f"loopDetection.action={settings.action.value}",
    )
