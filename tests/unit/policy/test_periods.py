from datetime import UTC, datetime

import pytest

from costwarden.api.teambudget import BudgetPeriod
from costwarden.policy.periods import is_valid_time_zone, period_bounds


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("schedule", "zone", "now", "start", "end"),
    [
        (BudgetPeriod.DAILY, "UTC", utc(2026, 11, 25, 13), utc(2026, 11, 25), utc(2026, 11, 26)),
        # Berlin is UTC+1 in November: local midnight is 23:00 UTC the day before.
        (BudgetPeriod.DAILY, "Europe/Berlin", utc(2026, 11, 25, 23, 30),
         utc(2026, 11, 25, 23), utc(2026, 11, 26, 23)),
        # Weeks start on Monday (2026-11-23 is a Monday).
        (BudgetPeriod.WEEKLY, "UTC", utc(2026, 11, 25), utc(2026, 11, 23), utc(2026, 11, 30)),
        (BudgetPeriod.MONTHLY, "UTC", utc(2026, 12, 31, 23, 59), utc(2026, 12, 1), utc(2027, 1, 1)),
        (BudgetPeriod.MONTHLY, "America/New_York", utc(2026, 11, 1, 3),
         utc(2026, 10, 1, 4), utc(2026, 11, 1, 4)),
    ],
)  # fmt: skip
def test_period_bounds(schedule, zone, now, start, end):
    assert period_bounds(schedule, zone, now) == (start, end)


def test_a_dst_day_is_23_hours_long():
    # Europe/Berlin springs forward on 2026-03-29: the local day has 23 hours.
    start, end = period_bounds(BudgetPeriod.DAILY, "Europe/Berlin", utc(2026, 3, 29, 12))
    assert (end - start).total_seconds() == 23 * 3600


def test_the_boundary_belongs_to_the_new_period():
    start, _ = period_bounds(BudgetPeriod.DAILY, "UTC", utc(2026, 11, 26))
    assert start == utc(2026, 11, 26)


def test_time_zone_validation():
    assert is_valid_time_zone("Europe/Berlin")
    assert not is_valid_time_zone("Mars/Olympus")
    assert not is_valid_time_zone("../etc/passwd")
