"""A call's worst case, and whether it fits what is left (pure: the gateway keeps the books).

Before a call is forwarded the gateway reserves its worst-case cost (ARCHITECTURE.md
invariant 4b), as a card payment is authorised before it is captured:

- **prompt tokens** are bounded by the request body's size in bytes. Every tokenizer the
  providers use (byte-level BPE: tiktoken's, Anthropic's) emits at most one token per byte
  of text, the JSON around the text (keys, quotes, escapes) is bytes that are never
  tokens, and the per-message framing tokens (about 4 a message) are fewer than the bytes
  of ``{"role":"user","content":""}``. Images are not text: each image part in the body
  adds :data:`IMAGE_TOKENS` (more than a high-detail image costs at OpenAI or Anthropic).
  Not bounded: files referenced by id (``input_file``/``file_id``), whose size the body
  does not show, and provider-run tools billed per call; both are metered exactly after
  the call.
- **output tokens** are the call's own ceiling (``max_tokens``, ``max_completion_tokens``,
  ``max_output_tokens``) or, when it sets none, the policy's ``defaultMaxOutputTokens``
  (:data:`DEFAULT_MAX_OUTPUT_TOKENS` unset), which the gateway then sends upstream so the
  answer cannot outgrow what was reserved. Embeddings have no output.
- **prices**: the most expensive of the call's candidate models (a fallback may serve it).
  Input is priced at the dearest of the input, cached-input and (5-minute and 1-hour)
  cache-write rates. A model with ``serviceTiers`` prices is priced at the dearest tier the
  call may be served at: the standard prices or the tier the request names in
  ``service_tier`` (a priority request may be served at the standard tier), and any tier
  when it names none or ``auto`` (the project's default tier may be priority).

The worst case must fit, with the reservations already in flight, under every limit the
call counts against: the team's hard cap, its token caps, the job's per-job caps and the
served model's ``modelCaps`` entry. The first limit it does not fit is the refusal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from costwarden.api.gatewayconfig import ModelRoute, ResolvedPricing, TeamConfig
from costwarden.api.teambudget import TokenUsage
from costwarden.api.usage import Endpoint, format_exact_usd
from costwarden.policy.pricing import PER_MILLION, call_cost

DEFAULT_MAX_OUTPUT_TOKENS = 8192
"""The output ceiling of a call that sets none when its policy sets no
``defaultMaxOutputTokens``."""
IMAGE_TOKENS = 6_000
"""Input tokens reserved per image part (OpenAI high detail: at most ~1,500 for 4o-class
models, a few thousand for the patch-based ones; Anthropic: at most ~1,600)."""
_IMAGE_PART = re.compile(rb'"type"\s*:\s*"(?:image_url|input_image|image)"')
# The fields a call may set its own output ceiling with, by endpoint.
CEILING_FIELDS: Mapping[Endpoint, tuple[str, ...]] = {
    Endpoint.CHAT_COMPLETIONS: ("max_completion_tokens", "max_tokens"),
    Endpoint.MESSAGES: ("max_tokens",),
    Endpoint.RESPONSES: ("max_output_tokens",),
}
# Where the gateway puts the default ceiling when the call set none.
DEFAULT_CEILING_FIELD: Mapping[Endpoint, str] = {
    Endpoint.CHAT_COMPLETIONS: "max_completion_tokens",
    Endpoint.MESSAGES: "max_tokens",
    Endpoint.RESPONSES: "max_output_tokens",
}
REFUSAL = "budget_reservation_failed"


def _usd(value: Decimal) -> str:
    return format_exact_usd(value) if value else "0"


def prompt_token_bound(raw: bytes) -> int:
    """An upper bound of the prompt tokens of a request body (see the module docstring)."""
    return len(raw) + IMAGE_TOKENS * len(_IMAGE_PART.findall(raw))


def output_ceiling(
    body: Mapping[str, Any], endpoint: Endpoint, default: int | None
) -> tuple[int, bool]:
    """The call's output-token ceiling, and whether it is the default (the call set none).

    If the call sets several (``max_tokens`` and ``max_completion_tokens``), the largest is
    the bound, whichever the provider reads. A ceiling that is not a positive integer is
    ignored here: the provider refuses the call for it. Chat's ``n`` multiplies it."""
    if endpoint is Endpoint.EMBEDDINGS:
        return 0, False
    given = [
        v
        for key in CEILING_FIELDS.get(endpoint, ())
        if isinstance(v := body.get(key), int) and not isinstance(v, bool) and v > 0
    ]
    # OpenAI chat's ``n`` asks for n choices, each up to the ceiling, all billed.
    n = body.get("n") if endpoint is Endpoint.CHAT_COMPLETIONS else None
    choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
    if given:
        return max(given) * choices, False
    return (default or DEFAULT_MAX_OUTPUT_TOKENS) * choices, True


def requested_tier(body: Mapping[str, Any]) -> str | None:
    """The service tier a request asks for, or None when it may be served at any tier
    (no ``service_tier``, or ``auto``: the project's default tier, which may be priority)."""
    tier = body.get("service_tier")
    if not isinstance(tier, str) or tier == "auto":
        return None
    return tier


def billable_tiers(pricing: ResolvedPricing, tier: str | None) -> list[str]:
    """The tiers (by name; "" the standard prices) a call asking for ``tier`` may be
    served and billed at on a model priced at ``pricing``."""
    if tier is None:
        return ["", *pricing.service_tiers]
    return ["", tier] if tier in pricing.service_tiers else [""]


def dearest_tier(tokens: TokenUsage, pricing: ResolvedPricing, tier: str | None) -> str:
    """The tier among those a call may be served at where ``tokens`` cost the most: what a
    call whose answer never came is charged at (its reservation bounds that cost)."""
    return max(
        billable_tiers(pricing, tier),
        key=lambda t: call_cost(tokens, pricing, service_tier=t),
    )


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1 us per call
class WorstCase:
    """What a call can cost at most: tokens, and USD at the dearest candidate's prices."""

    input_tokens: int
    output_tokens: int
    cost: Decimal
    tier: str | None = None
    """The service tier the request asked for (:func:`requested_tier`)."""

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def worst_cost(
    input_tokens: int, output_tokens: int, pricing: ResolvedPricing, tier: str | None = ""
) -> Decimal:
    """The most ``input_tokens`` + ``output_tokens`` can cost at ``pricing`` (exact), at
    the dearest tier a call asking for ``tier`` may be served at."""
    if not pricing.service_tiers:  # the common case, on every call: attributes read directly
        p = pricing
        one_hour = p.cache_write_1h_per_m_tok_usd
        if one_hour is None:  # a configuration rendered before 1-hour writes were priced
            one_hour = p.cache_write_per_m_tok_usd
        dearest = max(
            p.input_per_m_tok_usd, p.cached_input_per_m_tok_usd, p.cache_write_per_m_tok_usd,
            one_hour,
        )  # fmt: skip
        return (input_tokens * dearest + output_tokens * p.output_per_m_tok_usd) / PER_MILLION
    return max(
        (input_tokens * r.dearest_input() + output_tokens * r.output) / PER_MILLION
        for r in (pricing.rates(t) for t in billable_tiers(pricing, tier))
    )


def worst_case(
    input_tokens: int,
    output_tokens: int,
    routes: Iterable[ModelRoute],
    tier: str | None = None,
) -> WorstCase:
    cost = max(
        (worst_cost(input_tokens, output_tokens, r.pricing, tier) for r in routes), default=None
    )
    return WorstCase(input_tokens, output_tokens, cost if cost is not None else Decimal(0), tier)


def floor_case(
    prompt: int, ceiling: int, default: int | None, routes: Iterable[ModelRoute], tier: str | None
) -> WorstCase:
    """The call's worst case at no more than the policy's default output ceiling: the
    smallest call that could do the same work. When even that does not fit, a cap is
    reached (policy/leases.py), not merely asked too much of."""
    return worst_case(prompt, min(ceiling, default or DEFAULT_MAX_OUTPUT_TOKENS), routes, tier)


def charged_tokens(worst: WorstCase) -> TokenUsage:
    """The tokens a call is charged when its usage never came: its reservation."""
    return TokenUsage.model_construct(
        input=worst.input_tokens,
        output=worst.output_tokens,
        cached_input=0,
        cache_creation=0,
        cache_creation_1h=0,
    )


@dataclass(slots=True)
class Standing:
    """What a limit has already used (settled) and has reserved for calls in flight."""

    spent: Decimal = Decimal(0)
    reserved: Decimal = Decimal(0)
    tokens: int = 0
    reserved_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Shortfall:
    """Why a call cannot be reserved: which limit, and a sentence for the caller."""

    limit: str
    """Bounded label: team_cap, team_tokens, job_cost, job_tokens, model_cost, model_tokens."""
    message: str
    final: bool
    """Even with nothing else in flight the call would not fit: retrying cannot help."""


def _hint(worst: WorstCase, defaulted: bool) -> str:
    if defaulted:
        return (
            f"; the call set no output ceiling, so the policy default of "
            f"{worst.output_tokens} output tokens was reserved: set max_tokens lower"
        )
    return f"; setting max_tokens lower (it reserved {worst.output_tokens}) makes it smaller"


def _money_check(
    limit: str, what: str, cap: Decimal, standing: Standing, need: Decimal, hint: str
) -> Shortfall | None:
    left = cap - standing.spent - standing.reserved
    if need <= left:
        return None
    return Shortfall(
        limit,
        f"the call's worst case costs {_usd(need)} USD but {what} has "
        f"{_usd(max(left, Decimal(0)))} USD left ({_usd(cap)} USD cap, "
        f"{_usd(standing.spent)} USD spent, {_usd(standing.reserved)} USD "
        f"reserved by calls in flight){hint}",
        need > cap - standing.spent,
    )


def _token_check(
    limit: str, what: str, cap: int, standing: Standing, need: int, hint: str
) -> Shortfall | None:
    left = cap - standing.tokens - standing.reserved_tokens
    if need <= left:
        return None
    return Shortfall(
        limit,
        f"the call may use {need} tokens but {what} has {max(left, 0)} left ({cap} cap, "
        f"{standing.tokens} used, {standing.reserved_tokens} reserved by calls in flight){hint}",
        need > cap - standing.tokens,
    )


def team_shortfall(
    team: TeamConfig,
    worst: WorstCase,
    standing: Standing,
    tokens: TokenUsage | None,
    reserved_in: int,
    reserved_out: int,
    defaulted: bool,
    *,
    money: bool = True,
) -> Shortfall | None:
    """The team's hard cap (when it blocks) and its token caps. ``tokens`` is the team's
    settled usage; ``reserved_in``/``reserved_out`` what calls in flight reserved.
    ``money=False``: the hard cap is held by this replica's lease instead (gateway/leases.py)."""
    hint = _hint(worst, defaulted)
    if team.on_hard_cap.requests.value == "Block":
        short = (
            _money_check(
                "team_cap", f"TeamBudget {team.id}", team.hard_cap_usd, standing, worst.cost, hint
            )
            if money
            else None
        )
        if short is not None:
            return short
        caps = team.token_caps
        if caps is not None and tokens is not None:
            used_in = tokens.prompt()
            checks = (
                ("input", caps.input, used_in, reserved_in, worst.input_tokens),
                ("output", caps.output, tokens.output, reserved_out, worst.output_tokens),
                (
                    "total",
                    caps.total,
                    used_in + tokens.output,
                    reserved_in + reserved_out,
                    worst.tokens,
                ),
            )
            for kind, cap, used, held, need in checks:
                if cap is None:
                    continue
                short = _token_check(
                    "team_tokens",
                    f"the {kind}-token cap of TeamBudget {team.id}",
                    cap,
                    Standing(tokens=used, reserved_tokens=held),
                    need,
                    hint,
                )
                if short is not None:
                    return short
    return None


def job_shortfall(
    team: TeamConfig, unit: str, worst: WorstCase, standing: Standing, defaulted: bool
) -> Shortfall | None:
    per_job = team.per_job
    if per_job is None:
        return None
    hint = _hint(worst, defaulted)
    if per_job.max_cost_usd is not None:
        what = f"job {unit} (perJob.maxCostUSD of TeamBudget {team.id})"
        short = _money_check("job_cost", what, per_job.max_cost_usd, standing, worst.cost, hint)
        if short is not None:
            return short
    if per_job.max_tokens is not None:
        what = f"job {unit} (perJob.maxTokens of TeamBudget {team.id})"
        return _token_check("job_tokens", what, per_job.max_tokens, standing, worst.tokens, hint)
    return None


def model_shortfall(
    team: TeamConfig, route: ModelRoute, worst: WorstCase, standing: Standing, defaulted: bool
) -> Shortfall | None:
    """``modelCaps`` of ``route`` (priced at the route's own prices: only it spends there)."""
    cap = next((c for c in team.model_caps if c.model == route.name), None)
    if cap is None:
        return None
    hint = _hint(worst, defaulted)
    what = f"model {route.name} (modelCaps of TeamBudget {team.id})"
    if cap.max_cost_usd is not None:
        need = worst_cost(worst.input_tokens, worst.output_tokens, route.pricing, worst.tier)
        short = _money_check("model_cost", what, cap.max_cost_usd, standing, need, hint)
        if short is not None:
            return short
    if cap.max_tokens is not None:
        return _token_check("model_tokens", what, cap.max_tokens, standing, worst.tokens, hint)
    return None
