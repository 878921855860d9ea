"""Exact money: US dollars as :class:`decimal.Decimal`, never binary floats.

On the wire an amount is an integer or a decimal string (``500`` or ``"12.50"``), exactly
like a Kubernetes resource quantity (``cpu: 2`` or ``cpu: "1.5"``); a YAML float such as
``12.5`` is refused, because a float cannot carry cents exactly. At most six decimals
(one micro-dollar) are accepted, which is the resolution costwarden accounts in.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema
from pydantic_core import PydanticCustomError

MONEY_PATTERN = r"^[0-9]{1,12}([.][0-9]{1,6})?$"  # [.] not \. : CEL string literals reject \.
MICRO = Decimal("0.000001")
_MONEY_RE = re.compile(MONEY_PATTERN)

# The CEL rule the API server runs on every amount. ``string(self)`` accepts both wire
# forms (int or string) because the schema is int-or-string.
MONEY_CEL_RULE = {
    "rule": f"string(self).matches('{MONEY_PATTERN}')",
    "message": 'must be a non-negative USD amount with at most 6 decimals, e.g. 500 or "12.50"',
}


def parse_money(value: Any) -> Decimal:
    """Accept an int, a decimal string or a Decimal; refuse floats and anything inexact."""
    return _parse(value, _MONEY_RE, MONEY_CEL_RULE["message"])


def _parse(value: Any, pattern: re.Pattern[str], message: str) -> Decimal:
    if isinstance(value, bool):
        raise PydanticCustomError("money", "must be a USD amount, not a boolean")
    if isinstance(value, Decimal):
        text = format(value, "f")
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise PydanticCustomError(
            "money",
            'must be an integer or a decimal string (e.g. "12.50"), not {kind}',
            {"kind": type(value).__name__},
        )
    if not pattern.match(text):
        raise PydanticCustomError("money", message)
    return Decimal(text)


def format_money(value: Decimal) -> str:
    """Canonical text: no exponent, at least two decimals (``"12.5"`` → ``"12.50"``)."""
    quantized = value.quantize(MICRO)
    text = format(quantized, "f").rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


Money = Annotated[
    Decimal,
    BeforeValidator(parse_money),
    PlainSerializer(format_money, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            # Bounds the CEL cost estimate; 12 digits, a point and 6 decimals fit.
            "maxLength": 19,
            "x-kubernetes-validations": [MONEY_CEL_RULE],
        }
    ),
]
"""A USD amount: exact, non-negative, at most six decimals."""


PlainMoney = Annotated[
    Decimal,
    BeforeValidator(parse_money),
    PlainSerializer(format_money, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": MONEY_PATTERN, "maxLength": 19}),
]
"""A USD amount like :data:`Money`, checked by the API server with an OpenAPI ``pattern``
instead of a CEL rule, so a string only: for amounts inside maps, where a CEL rule per
value would exceed the CRD's CEL cost budget."""


STATUS_MONEY_PATTERN = r"^[0-9]{1,30}([.][0-9]{1,6})?$"
"""What the operator *reports* (spend in status): 30 integer digits, beyond anything a team
can spend (a spec amount stays within 12). A spend that a hostile or broken upstream
inflates past every cap must still be writable, or the team's books could not be written
at all (docs/operations.md)."""
_STATUS_MONEY_RE = re.compile(STATUS_MONEY_PATTERN)


def parse_status_money(value: Any) -> Decimal:
    return _parse(value, _STATUS_MONEY_RE, "must be a non-negative USD amount, 6 decimals at most")


StatusMoney = Annotated[
    Decimal,
    BeforeValidator(parse_status_money),
    PlainSerializer(format_money, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": STATUS_MONEY_PATTERN, "maxLength": 37}),
]
"""A USD amount in status (written by the operator only): like :data:`PlainMoney` with 30
integer digits, so no spend a team can reach is refused by the API server."""
