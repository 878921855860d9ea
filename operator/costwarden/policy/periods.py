"""Which accounting period an instant falls in, in the budget's own time zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from costwarden.api.teambudget import BudgetPeriod


def is_valid_time_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def period_bounds(
    schedule: BudgetPeriod, time_zone: str, now: datetime
) -> tuple[datetime, datetime]:
    """Start (inclusive) and end (exclusive) of the period holding ``now``, in UTC.

    Periods start at local midnight: every day, every Monday, or the 1st of the month. On a
    DST change the period is 23 or 25 hours long, as a person in that zone expects.
    """
    zone = ZoneInfo(time_zone)
    local = now.astimezone(zone)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if schedule is BudgetPeriod.DAILY:
        start, end = midnight, _add_days(midnight, 1)
    elif schedule is BudgetPeriod.WEEKLY:
        start = _add_days(midnight, -midnight.weekday())
        end = _add_days(start, 7)
    else:
        start = midnight.replace(day=1)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
    return start.astimezone(UTC), _normalize(end, zone).astimezone(UTC)


def _add_days(moment: datetime, days: int) -> datetime:
    # Wall-clock arithmetic, then re-attach the zone so the UTC offset of that day applies.
    naive = moment.replace(tzinfo=None) + timedelta(days=days)
    return naive.replace(tzinfo=moment.tzinfo)


def _normalize(moment: datetime, zone: ZoneInfo) -> datetime:
    return moment.replace(tzinfo=None).replace(tzinfo=zone)
