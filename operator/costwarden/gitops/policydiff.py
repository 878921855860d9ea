"""What a RoutingPolicy change does: models, prices, default, rules, and where calls now go.

Policies are compared as the operator publishes them (``PolicyConfig``: catalogue prices
resolved), so a model that starts being priced from the catalogue shows its real price.
"""

from __future__ import annotations

from costwarden.api.gatewayconfig import ModelRoute, PolicyConfig, ResolvedPricing
from costwarden.api.routingpolicy import RoutingRule
from costwarden.gitops.classes import changed_classes, domains
from costwarden.gitops.words import Change, percent_change, show, usd

PRICE_FIELDS = (
    ("input", "input"),
    ("output", "output"),
    ("cached input", "cached_input"),
    ("cache write", "cache_write"),
    ("1-hour cache write", "cache_write_1h"),
)
"""(label, TokenRates field) of every token price, compared at every service tier."""


def describe_policy(policy: PolicyConfig) -> str:
    return (
        f"{len(policy.models)} models ({', '.join(m.name for m in policy.models)}), default "
        f"{policy.default_model}, {len(policy.rules)} rules"
    )


def policy_changes(ref: str, old: PolicyConfig, new: PolicyConfig) -> list[Change]:
    changes = _model_changes(ref, old, new)
    if old.default_model != new.default_model:
        changes.append(
            Change(
                ref,
                "defaultModel",
                f"default model {old.default_model} → {new.default_model}",
                old.default_model,
                new.default_model,
            )
        )
    changes += _rule_changes(ref, old.rules, new.rules)
    old_down = {d.from_model: d.to_model for d in old.soft_limit_downgrades}
    new_down = {d.from_model: d.to_model for d in new.soft_limit_downgrades}
    for source in sorted(set(old_down) | set(new_down)):
        if old_down.get(source) != new_down.get(source):
            changes.append(
                Change(
                    ref,
                    "downgrade",
                    f"past the soft limit, {source} goes to "
                    f"{new_down.get(source) or 'itself (no downgrade)'} instead of "
                    f"{old_down.get(source) or 'itself (no downgrade)'}",
                    old_down.get(source),
                    new_down.get(source),
                )
            )
    if old.prompt_cache_affinity != new.prompt_cache_affinity:
        state = "on" if new.prompt_cache_affinity else "off"
        changes.append(Change(ref, "field", f"prompt-cache session affinity turned {state}"))
    routing = routing_change(ref, old, new)
    if routing:
        changes.append(routing)
    return changes


def routing_change(ref: str, old: PolicyConfig | None, new: PolicyConfig | None) -> Change | None:
    """The request classes whose model (or refusal) differs, or None if none does."""
    moved = changed_classes(old, new)
    if not moved:
        return None
    total = domains(p for p in (old, new) if p is not None).size()
    details = [f"{c.request_class.describe()}: {c.old} → {c.new}" for c in moved]
    return Change(
        ref,
        "routing",
        f"calls routed to a different model: {len(moved)} group(s) of request classes "
        f"(out of {total} classes the rules tell apart)",
        details=details,
    )


def _model_changes(ref: str, old: PolicyConfig, new: PolicyConfig) -> list[Change]:
    before = {m.name: m for m in old.models}
    after = {m.name: m for m in new.models}
    changes = []
    for name in sorted(set(after) - set(before)):
        changes.append(Change(ref, "model", f"model {name} added: {_describe(after[name])}"))
    for name in sorted(set(before) - set(after)):
        changes.append(Change(ref, "model", f"model {name} removed"))
    for name in sorted(set(before) & set(after)):
        changes += _price_changes(ref, name, before[name].pricing, after[name].pricing)
        for attr in ("provider", "endpoint", "upstream_model", "locality", "credentials"):
            was, now = getattr(before[name], attr), getattr(after[name], attr)
            if was != now:
                changes.append(
                    Change(
                        ref,
                        "model",
                        f"model {name}: {attr.replace('_', ' ')} {_text(was)} → {_text(now)}",
                        _text(was),
                        _text(now),
                    )
                )
    return changes


def _text(value: object) -> str:
    if hasattr(value, "to_wire"):
        return show(value.to_wire())
    return show(getattr(value, "value", value))


def _describe(model: ModelRoute) -> str:
    p = model.pricing
    return (
        f"{model.provider.value}, {model.locality.value}, {usd(p.input_per_m_tok_usd)} input / "
        f"{usd(p.output_per_m_tok_usd)} output per 1M tokens"
    )


def _price_changes(
    ref: str, model: str, old: ResolvedPricing, new: ResolvedPricing
) -> list[Change]:
    changes = []
    tiers = sorted(set(old.service_tiers) | set(new.service_tiers))
    for tier in ["", *tiers]:
        was_rates, now_rates = old.rates(tier), new.rates(tier)
        for label, attr in PRICE_FIELDS:
            was, now = getattr(was_rates, attr), getattr(now_rates, attr)
            if was == now:
                continue
            kind = f"{label}, {tier} tier" if tier else label
            changes.append(
                Change(
                    ref,
                    "price",
                    f"price of {model} ({kind}) {usd(was)} → {usd(now)} per "
                    f"1M tokens ({percent_change(was, now)})",
                    was,
                    now,
                )
            )
    return changes


def _rule_changes(ref: str, old: list[RoutingRule], new: list[RoutingRule]) -> list[Change]:
    before = {r.name: (i, r) for i, r in enumerate(old)}
    after = {r.name: (i, r) for i, r in enumerate(new)}
    changes = []
    for name, (index, rule) in after.items():
        if name not in before:
            changes.append(
                Change(
                    ref,
                    "rules",
                    f"rule {name} added at position {index + 1}: {_rule_text(rule)}",
                    None,
                    rule.to_wire(),
                )
            )
    for name, (index, rule) in before.items():
        if name not in after:
            changes.append(
                Change(
                    ref,
                    "rules",
                    f"rule {name} removed (was position {index + 1}: {_rule_text(rule)})",
                    rule.to_wire(),
                    None,
                )
            )
    common_old = [r.name for r in old if r.name in after]
    common_new = [r.name for r in new if r.name in before]
    if common_old != common_new:
        changes.append(
            Change(
                ref,
                "rules",
                f"rules reordered: {', '.join(common_old)} → "
                f"{', '.join(common_new)} (the first rule that matches decides)",
                common_old,
                common_new,
            )
        )
    for name in common_new:
        was, now = before[name][1], after[name][1]
        if was != now:
            changes.append(
                Change(
                    ref,
                    "rules",
                    f"rule {name} changed: was {_rule_text(was)}; now {_rule_text(now)}",
                    was.to_wire(),
                    now.to_wire(),
                )
            )
    return changes


def _rule_text(rule: RoutingRule) -> str:
    match = rule.match.to_wire()
    matched = (
        ", ".join(f"{k}={show(v)}" for k, v in sorted(match.items()) if v != []) or "every call"
    )
    fallbacks = f" then {', '.join(rule.fallbacks)}" if rule.fallbacks else ""
    return f"{matched} to {rule.model}{fallbacks}"
