"""Metrics of usage ingestion, enforcement and results. Labels are bounded: per team (one
per TeamBudget), per outcome, kind and reason (small enums); never per Job or record."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BATCHES = Counter(
    "costwarden_ingest_batches_total",
    "Usage batches received, by result (applied, refused, failed, invalid, unauthorized, "
    "not_leader, not_ready).",
    ["result"],
)
RECORDS_APPLIED = Counter(
    "costwarden_ingest_records_applied_total", "Usage records counted (each exactly once)."
)
RECORDS_DEDUPLICATED = Counter(
    "costwarden_ingest_records_deduplicated_total",
    "Records and loop signals received again and ignored (at-least-once delivery).",
)
RECORDS_LATE = Counter(
    "costwarden_ingest_records_late_total",
    "Records of a period no longer kept in history (ignored).",
)
RECORDS_UNATTRIBUTED = Counter(
    "costwarden_ingest_records_unattributed_total",
    "Records without a (valid, existing) TeamBudget: nobody to charge.",
)
RECORDS_HELD = Counter(
    "costwarden_ingest_records_held_total",
    "Usage entries held (not applied, kept and re-sent by the gateway) because their team's "
    "books could not be written for a reason a re-send does not cure, by team. Other teams "
    "are unaffected; the team's spend lags until the cause is fixed (docs/operations.md).",
    ["team"],
)
TEAM_FAILURES = Counter(
    "costwarden_ingest_team_failures_total",
    "Permanent failures writing one team's books from a usage batch, by team and reason "
    "(http_<status> or the error's type).",
    ["team", "reason"],
)
REFUSED = Counter(
    "costwarden_ingest_refused_total",
    "Usage entries refused because they disagree with what the operator recomputes "
    "(team, job, cost, model, tokens, time, loop action; docs/security-ingestion.md), by "
    "reason. Never charged to anyone.",
    ["reason"],
)
ATTRIBUTION_INVALID = Counter(
    "costwarden_attribution_invalid_values_total",
    "Usage records whose pod carries an attribution tag value its TeamBudget does not allow "
    "(too long, not in values, not matching the pattern): recorded as _invalid and still "
    "charged. By key (the five fixed keys, or other).",
    ["key"],
)
INGESTION_LAG = Histogram(
    "costwarden_ingest_lag_seconds",
    "From a call's arrival at the gateway to its record applied in TeamBudget status.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600),
)
ENFORCEMENT_ACTIONS = Counter(
    "costwarden_enforcement_actions_total",
    "Actions on workloads, by kind (Suspended, Deleted, Resumed) and reason.",
    ["kind", "reason"],
)
ENFORCEMENT_ERRORS = Counter(
    "costwarden_enforcement_errors_total", "Enforcement actions that failed (retried)."
)
CAP_TO_ACTION = Histogram(
    "costwarden_enforcement_latency_seconds",
    "From the status write that crossed a cap (or a loop signal) to the Job acted on.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
RESULT_JOBS = Gauge(
    "costwarden_budget_result_jobs",
    "Finished agent Jobs in the current period, by outcome.",
    ["team", "outcome"],
)
RESULT_SPENT = Gauge(
    "costwarden_budget_result_spent_usd",
    "Spend of finished agent Jobs in the current period, by outcome.",
    ["team", "outcome"],
)
COST_PER_SUCCEEDED_JOB = Gauge(
    "costwarden_budget_cost_per_succeeded_job_usd",
    "Spend of succeeded Jobs divided by their number, in the current period.",
    ["team"],
)
WASTED = Gauge(
    "costwarden_budget_wasted_usd",
    "Spend of failed Jobs and Jobs stopped by costwarden in the current period.",
    ["team"],
)
LEASE_REQUESTS = Counter(
    "costwarden_lease_requests_total",
    "Lease requests from gateway replicas, by result: granted, short (the waiting call "
    "does not fit; retryable), cap_reached (the call's floor does not fit what is left), "
    "refused (not this reporter's team), unavailable (not the leader, or the write failed).",
    ["result"],
)
LEASES_RECLAIMED = Counter(
    "costwarden_leases_reclaimed_total",
    "Leases taken back from gateway replicas silent for longer than a lease lives, by team.",
    ["team"],
)
LEASED_USD = Gauge(
    "costwarden_leased_usd",
    "Budget lent to gateway replicas and not yet drawn by their usage, per team (USD; "
    "float here, exact in status.leases).",
    ["team"],
)
RESULTS = Counter(
    "costwarden_change_outcomes_total",
    "Change outcomes reported (POST /v1/results, the GitHub webhook), by result (applied, "
    "invalid, unauthorized, failed).",
    ["result"],
)
CHANGES = Gauge(
    "costwarden_budget_changes",
    "Changes (pull requests, tickets) with spend in the current period, by repository and "
    "outcome (merged, closed, reverted). At most 32 repositories per team (the rest: _other).",
    ["team", "repository", "outcome"],
)
CHANGE_SPENT = Gauge(
    "costwarden_budget_change_spent_usd",
    "Spend tagged with a change in the current period, by repository and outcome (merged, "
    "closed = never merged, reverted, open = no outcome yet).",
    ["team", "repository", "outcome"],
)
COST_PER_MERGED_CHANGE = Gauge(
    "costwarden_budget_cost_per_merged_change_usd",
    "Spend of merged changes divided by their number in the current period, by repository.",
    ["team", "repository"],
)
NEVER_MERGED = Gauge(
    "costwarden_budget_never_merged_usd",
    "Spend on changes closed without merging in the current period.",
    ["team"],
)
STORE_ROWS = Counter(
    "costwarden_store_rows_written_total",
    "Usage records written to the usage store (--store-dir), each once (docs/store.md).",
)
STORE_FAILURES = Counter(
    "costwarden_store_write_failures_total",
    "Usage store writes that failed; the batch is not acknowledged and the gateway re-sends "
    "it (the books are not counted twice, the store catches up).",
)
