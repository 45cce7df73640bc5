"""When a frame was taken: DATE-OBS and its spellings made into one UTC time, or a precise reason.

Read in order: DATE-OBS (with TIME-OBS/UT when the date has no time), DATE_OBS, DATE, then MJD-OBS
and JD. ISO dates with a time zone or UTC offset are converted to UTC. A 2-digit-year date such as
'15/01/25' is accepted only when another date of the file (DATE, file name, MJD) is within
_DATE_CONFIRM_DAYS of one reading of it; otherwise the frame is rejected with the reason
(docs/inputs.md).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import warnings
from pathlib import Path

from astropy import units as u
from astropy.time import Time
from erfa import ErfaWarning

from rpp_tasks.inputs.cards import first_value, to_float

__all__ = ["parse_obs_time"]


_ISO_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d)(?:[T ](\d{1,2}:\d\d(?::\d\d(?:\.\d*)?)?))?"
    r"\s*(Z|UTC|UT|GMT|[+-]\d\d(?::?\d\d)?)?$",
    re.IGNORECASE,
)
_TWO_DIGIT_RE = re.compile(r"^(\d\d)[/.-](\d\d)[/.-](\d\d)$")
_NAME_DATE_RE = re.compile(
    r"(?<!\d)((?:19|20)\d\d)[-_]?(0[1-9]|1[0-2])[-_]?(0[1-9]|[12]\d|3[01])(?!\d)"
)

_MJD0_ORDINAL = dt.date(1858, 11, 17).toordinal()

# A 2-digit-year DATE-OBS is accepted when another date of the file is this close to it.
_DATE_CONFIRM_DAYS = 2.0


def _iso_to_time(d: str) -> tuple[Time | None, str | None]:
    """Time (UTC) from an ISO date with optional time of day and UTC offset; (None, note) if not."""
    m = _ISO_RE.match(d.strip())
    if not m:
        return None, None
    date, tod, tz = m.group(1), m.group(2), m.group(3)
    if tod is not None:
        hh, rest = tod.split(":", 1)
        tod = f"{int(hh):02d}:{rest}"
        if tod.count(":") == 1:
            tod += ":00"
        if tod.endswith("."):
            tod = tod[:-1]
    iso = f"{date}T{tod}" if tod else date
    t = Time(iso, format="isot" if tod else "iso", scale="utc")
    note = None
    if tz and tz.upper() not in ("Z", "UTC", "UT", "GMT"):
        sign = -1.0 if tz[0] == "-" else 1.0
        digits = tz[1:].replace(":", "")
        hours = int(digits[:2]) + (int(digits[2:4]) / 60.0 if len(digits) >= 4 else 0.0)
        if hours:
            t = t - sign * hours * u.hour
            note = f"UTC offset {tz} converted to UTC"
    return t, note


def _reference_mjds(header, path) -> list[tuple[str, float]]:
    """Other dates of a file (for a 2-digit-year DATE-OBS): DATE, MJD-OBS, JD, dates in the name."""
    refs = []
    for key in ("MJD-OBS", "MJD_OBS", "MJD"):
        v = to_float(first_value(header, key)[1])
        if v is not None and 15000 < v < 100000:
            refs.append((key, v))
    for key in ("JD", "JD-OBS", "JD_OBS", "JULIAN"):
        v = to_float(first_value(header, key)[1])
        if v is not None and v > 2_400_000:
            refs.append((key, v - 2_400_000.5))
    for key in ("DATE", "DATE-END", "DATE-LOC", "DATE_LOC"):
        v = first_value(header, key)[1]
        if isinstance(v, str):
            with contextlib.suppress(ValueError):
                t, _ = _iso_to_time(v)
                if t is not None:
                    refs.append((key, float(t.mjd)))
    if path is not None:
        p = Path(path)
        for part, what in ((p.name, "file name"), (p.parent.name, "folder name")):
            for m in _NAME_DATE_RE.finditer(part):
                with contextlib.suppress(ValueError):
                    d = dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
                    refs.append((f"{what} '{part}'", float(d.toordinal() - _MJD0_ORDINAL)))
    return refs


def _two_digit_year(date: str, m, header, path) -> tuple[str | None, str]:
    """Resolve 'dd/mm/yy' (or 'mm/dd/yy') against the file's other dates: (YYYY-MM-DD, reason)."""
    a, b, yy = int(m.group(1)), int(m.group(2)), int(m.group(3))
    candidates = {}  # YYYY-MM-DD -> MJD at 0h
    for day, month in ((a, b), (b, a)):
        for century in (1900, 2000):
            with contextlib.suppress(ValueError):
                c = dt.date(century + yy, month, day)
                candidates[c.isoformat()] = float(c.toordinal() - _MJD0_ORDINAL)
    refs = _reference_mjds(header, path)
    confirmed = {}
    for c, mjd in candidates.items():
        for name, ref in refs:
            if -_DATE_CONFIRM_DAYS <= ref - mjd <= 1.0 + _DATE_CONFIRM_DAYS:
                confirmed.setdefault(c, name)
    if len(confirmed) == 1:
        c, name = next(iter(confirmed.items()))
        return c, f"DATE-OBS '{date}' has a 2-digit year: read as {c} (agrees with {name})"
    if not refs:
        why = "and no other date in the file (DATE, MJD-OBS, JD, a date in the file name) "
        why += "tells the century"
    elif not confirmed:
        why = "and no reading agrees with the file's other dates ("
        why += ", ".join(n for n, _ in refs[:4]) + ")"
    else:
        agree = ", ".join(sorted(confirmed))
        why = f"and several readings agree with the file's other dates ({agree})"
    opts = " or ".join(sorted(candidates)) or "no valid date"
    return None, f"DATE-OBS '{date}' has a 2-digit year ({opts}?) {why}"


def parse_obs_time(header, warns, path=None) -> tuple[str | None, float | None, str | None]:
    """``(isot, mjd, problem)`` of a header: the UTC start time, or None and the precise reason.

    Notes that are not fatal (a zone converted, a date read from MJD-OBS) are appended to ``warns``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ErfaWarning)  # "dubious year": UTC before 1960
        return _parse_time_unfiltered(header, warns, path)


def _parse_time_unfiltered(header, warns, path) -> tuple[str | None, float | None, str | None]:
    """(ISO UTC, MJD, problem) of the start of the exposure.

    From DATE-OBS (ISO with optional UTC offset or ``Z``; date-only + TIME-OBS/UT; 2-digit years
    checked against the file's other dates), else MJD-OBS, else JD. ``problem`` (None when a time
    was found) says why no time could be read, for the rejection message.
    """
    problem = None
    dkey, date = first_value(header, "DATE-OBS", "DATE_OBS", "DATE-BEG")
    if date is not None and not isinstance(date, str):
        problem = f"{dkey}={date!r} is not a date string"
    elif isinstance(date, str):
        d = date.strip()
        m2 = _TWO_DIGIT_RE.match(d)
        if m2:
            resolved, note = _two_digit_year(d, m2, header, path)
            if resolved is None:
                return None, None, note
            warns.append(note)
            d = resolved
        if re.match(r"^\d{4}-\d\d-\d\d$", d):
            tkey, tval = first_value(header, "TIME-OBS", "UT", "UTSTART", "UT-START", "UTC", "TIME")
            if isinstance(tval, str) and re.match(r"^\s*\d{1,2}:\d\d(:\d\d(\.\d*)?)?\s*$", tval):
                d = f"{d}T{tval.strip()}"
            else:
                mjd = to_float(first_value(header, "MJD-OBS", "MJD_OBS")[1])
                if mjd is not None and mjd != int(mjd):
                    t = Time(mjd, format="mjd", scale="utc")
                    if abs(t.mjd - Time(d, format="iso", scale="utc").mjd - 0.5) <= 1.0:
                        return t.isot, float(t.mjd), None
                warns.append(
                    f"DATE-OBS '{date}' has no time of day and no UT/TIME-OBS: 00:00:00 assumed"
                )
        try:
            t, note = _iso_to_time(d)
        except ValueError:
            t, note = None, None
        if t is not None:
            if note:
                warns.append(f"DATE-OBS '{date}': {note}")
            return t.isot, float(t.mjd), None
        problem = f"unparsable {dkey}='{date}'"
        warns.append(f"cannot parse {dkey} '{date}'")
    mjd = to_float(first_value(header, "MJD-OBS", "MJD_OBS", "MJD")[1])
    if mjd is not None and 15000 < mjd < 100000:
        t = Time(mjd, format="mjd", scale="utc")
        return t.isot, float(t.mjd), None
    jd = to_float(first_value(header, "JD", "JD-OBS", "JD_OBS", "JULIAN")[1])
    if jd is not None and jd > 2_000_000:
        t = Time(jd, format="jd", scale="utc")
        return t.isot, float(t.mjd), None
    return None, None, problem
