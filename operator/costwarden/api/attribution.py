"""TeamBudget ``spec.attribution``: which tags a team's usage records carry, and their limits.

A pod says what its calls are for with labels or annotations ``costwarden.io/<key>``
(``costwarden.io/repository: acme/api``, ``costwarden.io/change: "123"``). The operator reads
them from the pod as the API server has it, at ingestion, and keeps only the keys its
TeamBudget declares, each value bounded (length, allowed values, a glob): so the number of
distinct tags a team can create stays bounded, and no gateway or sidecar can set them.
docs/attribution.md tells the whole design.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from costwarden.api.base import WireModel
from costwarden.api.meta import DnsLabel
from costwarden.api.rules import CelRule

FIXED_KEYS = ("project", "repository", "environment", "application", "change")
"""The vocabulary every report and the usage store know (one column each)."""
MAX_EXTRA_KEYS = 8
MAX_KEYS = len(FIXED_KEYS) + MAX_EXTRA_KEYS
MAX_VALUE_LENGTH = 63
"""A tag value is at most a label value's length (63 characters)."""
MAX_ALLOWED_VALUES = 256
MAX_RESULT_REPORTERS = 16
KEY_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$"
TAG_PREFIX = "costwarden.io/"

AttributionKeyName = Annotated[str, Field(min_length=1, max_length=32, pattern=KEY_PATTERN)]
TagValue = Annotated[str, Field(min_length=1, max_length=MAX_VALUE_LENGTH)]


class AttributionKey(WireModel):
    """One tag the team's usage records carry, read from ``costwarden.io/<name>``."""

    name: AttributionKeyName = Field(
        description="The tag: a label or annotation costwarden.io/<name> on the pod. "
        f"{', '.join(FIXED_KEYS)} are known to every report; at most {MAX_EXTRA_KEYS} others."
    )
    max_length: int = Field(
        default=MAX_VALUE_LENGTH,
        ge=1,
        le=MAX_VALUE_LENGTH,
        description="Longer values are recorded as _invalid.",
    )
    values: list[TagValue] = Field(
        default_factory=list,
        max_length=MAX_ALLOWED_VALUES,
        description="If set, the only values recorded; any other is recorded as _invalid.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    pattern: Annotated[str, Field(max_length=128)] | None = Field(
        default=None,
        description="If set, a glob every recorded value matches ('*' any run of "
        "characters, '?' one character, e.g. 'acme/*'); others are recorded as _invalid. "
        "A glob, not a regular expression: matching stays linear in the value's length.",
    )


def default_keys() -> list[AttributionKey]:
    return [AttributionKey(name=key) for key in FIXED_KEYS]


class ServiceAccountRef(WireModel):
    """A Kubernetes service account."""

    name: DnsLabel = Field(description="Name of the service account.")
    namespace: DnsLabel | None = Field(
        default=None, description="Its namespace; defaults to the TeamBudget's namespace."
    )


class Attribution(WireModel):
    """Which tags the team's usage records carry, and who may report its changes' outcomes."""

    keys: list[AttributionKey] = Field(
        default_factory=default_keys,
        max_length=MAX_KEYS,
        description=f"The tags recorded (default: the five fixed keys {', '.join(FIXED_KEYS)}, "
        f"each up to {MAX_VALUE_LENGTH} characters). Keys not listed are not recorded.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
            "default": [{"name": key} for key in FIXED_KEYS],
        },
    )
    result_reporters: list[ServiceAccountRef] = Field(
        default_factory=list,
        max_length=MAX_RESULT_REPORTERS,
        description="Service accounts (e.g. a CI runner's) whose tokens for the audience "
        "costwarden.io/results may report outcomes of this team's changes (POST /v1/results, "
        "costwarden result). Their reports change this team's books only.",
    )

    cel_rules = (
        CelRule(
            cel=(
                "!has(self.keys) || self.keys.filter(k, !(k.name in "
                f"{list(FIXED_KEYS)!r})).size() <= {MAX_EXTRA_KEYS}"
            ).replace("'", '"'),
            message=f"at most {MAX_EXTRA_KEYS} keys besides {', '.join(FIXED_KEYS)}",
            field_path=".keys",
            reason="FieldValueInvalid",
            holds=lambda a: sum(k.name not in FIXED_KEYS for k in a.keys) <= MAX_EXTRA_KEYS,
        ),
    )

    def key(self, name: str) -> AttributionKey | None:
        return next((k for k in self.keys if k.name == name), None)


__all__ = [
    "FIXED_KEYS",
    "MAX_EXTRA_KEYS",
    "TAG_PREFIX",
    "Attribution",
    "AttributionKey",
    "ServiceAccountRef",
    "default_keys",
]
