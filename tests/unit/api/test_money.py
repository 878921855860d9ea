from decimal import Decimal

import pytest
from pydantic import BaseModel

from costwarden.api.money import Money, format_money, parse_money


class Holder(BaseModel):
    amount: Money


@pytest.mark.parametrize(
    ("wire", "exact"),
    [(500, Decimal(500)), ("12.50", Decimal("12.50")), ("0.000001", Decimal("0.000001"))],
)
def test_integers_and_decimal_strings_are_exact(wire, exact):
    assert Holder(amount=wire).amount == exact


@pytest.mark.parametrize("wire", [12.5, "-1", "1e3", "1.1234567", True, "", "12,50"])
def test_floats_and_inexact_forms_are_refused(wire):
    with pytest.raises(ValueError, match=r"USD amount|decimal string"):
        Holder(amount=wire)


def test_serialized_as_a_string_with_cents():
    assert Holder(amount=5).model_dump(mode="json") == {"amount": "5.00"}
    assert format_money(Decimal("0.1234565")) == "0.123456"  # banker's rounding at micro
    assert format_money(Decimal("7.000100")) == "7.0001"


def test_parse_accepts_decimal():
    assert parse_money(Decimal("3.5")) == Decimal("3.5")
