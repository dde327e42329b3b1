"""FHIR dates of any precision (year, year-month, date, dateTime with or without zone) as UTC."""

from __future__ import annotations

import datetime as dt
import re

_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")


def parse_fhir_datetime(value: object) -> dt.datetime | None:
    """The earliest instant a FHIR date/dateTime/instant denotes, in UTC; None when unparseable.

    A value without a zone is taken as UTC, so records order the same on every machine.
    """
    if not isinstance(value, str) or not value:
        return None
    match = _PARTIAL.match(value)
    try:
        if match:
            year, month, day = match.groups()
            return dt.datetime(int(year), int(month or 1), int(day or 1), tzinfo=dt.timezone.utc)
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.astimezone(dt.timezone.utc)
