"""Types every costwarden kind shares: conditions, label selectors, object references."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import Field

from costwarden.api.base import WireModel

GROUP = "costwarden.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "costwarden"

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

DnsLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]
ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(WireModel):
    """A ``metav1.Condition``: one aspect of the object's state, with the reason it holds."""

    type: str = Field(
        max_length=316,
        description="Type of condition in CamelCase, e.g. Ready.",
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="A CamelCase word saying why the condition has this status.",
    )
    message: str = Field(
        default="",
        max_length=32768,
        description="A human-readable sentence with details, naming the field at fault.",
    )
    last_transition_time: datetime = Field(
        description="When the condition last changed from one status to another.",
    )
    observed_generation: int | None = Field(
        default=None,
        ge=0,
        description="The .metadata.generation the condition was computed from.",
    )


class LabelSelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(WireModel):
    """One requirement of a label selector, as in ``metav1.LabelSelectorRequirement``."""

    key: str = Field(max_length=317, description="The label key the requirement applies to.")
    operator: LabelSelectorOperator = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: list[Annotated[str, Field(max_length=63)]] = Field(
        default_factory=list,
        max_length=64,
        description="Values for In and NotIn; must be empty for Exists and DoesNotExist.",
    )


class LabelSelector(WireModel):
    """A ``metav1.LabelSelector``: all of matchLabels and matchExpressions must hold."""

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict,
        description="Labels that must all be present with exactly these values.",
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list,
        max_length=32,
        description="Set-based requirements that must all hold.",
    )

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether an object with these labels is selected (same semantics as the API server)."""
        if any(labels.get(key) != value for key, value in self.match_labels.items()):
            return False
        return all(_requirement_holds(req, labels) for req in self.match_expressions)

    def to_query(self) -> str:
        """The selector in the API server's query syntax (``?labelSelector=...``)."""
        parts = [f"{key}={value}" for key, value in sorted(self.match_labels.items())]
        for req in self.match_expressions:
            values = ",".join(req.values)
            if req.operator is LabelSelectorOperator.IN:
                parts.append(f"{req.key} in ({values})")
            elif req.operator is LabelSelectorOperator.NOT_IN:
                parts.append(f"{req.key} notin ({values})")
            elif req.operator is LabelSelectorOperator.EXISTS:
                parts.append(req.key)
            else:
                parts.append(f"!{req.key}")
        return ",".join(parts)


def _requirement_holds(req: LabelSelectorRequirement, labels: dict[str, str]) -> bool:
    present = req.key in labels
    if req.operator is LabelSelectorOperator.EXISTS:
        return present
    if req.operator is LabelSelectorOperator.DOES_NOT_EXIST:
        return not present
    if req.operator is LabelSelectorOperator.IN:
        return present and labels[req.key] in req.values
    return not present or labels[req.key] not in req.values


class LocalObjectReference(WireModel):
    """A reference to an object by name, in the referrer's namespace unless one is given."""

    name: ObjectName = Field(description="Name of the referenced object.")
    namespace: DnsLabel | None = Field(
        default=None,
        description="Namespace of the referenced object; defaults to the referrer's namespace.",
    )


class SecretKeyReference(WireModel):
    """A key inside a Secret in the referrer's namespace. Only the reference is ever stored."""

    name: ObjectName = Field(description="Name of the Secret.")
    key: str = Field(
        default="api-key",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="Key within the Secret's data that holds the credential.",
    )
