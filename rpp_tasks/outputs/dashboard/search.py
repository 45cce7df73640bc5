"""Search every observation: by object name, position + radius, band, date range, observatory and
status; paged; exported as CSV or VOTable.

`parse_query` turns request parameters (strings) into a `Query` or raises `ValueError` with a
message for the user (never a 500). `search` runs it over the search index of every results
database (`Store.groups`) and merges the pages. Names are resolved offline first (the observatories'
configured targets, then the objects of the results databases); online (Sesame, then SIMBAD, through
`rpp_tasks.stages.target.resolve_target` and its cache) only when allowed.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

from rpp_tasks.outputs import db_decisions

STATUSES = ("ok", "rejected", "pending", "validated", "withdrawn")
FORMATS = ("html", "json", "csv", "votable")
MAX_PER_PAGE = 500
DEFAULT_NAME_RADIUS_ARCMIN = 15.0
_MAX_TEXT = 160
_PARAMS = (
    "name",
    "ra",
    "dec",
    "radius_arcmin",
    "band",
    "date_from",
    "date_to",
    "observatory",
    "status",
    "page",
    "per_page",
    "format",
)
#: Columns of a result row (CSV/VOTable order).
COLUMNS = (
    "observatory",
    "session_id",
    "frame_stem",
    "night_date",
    "date_obs",
    "mjd_obs",
    "object_name",
    "band",
    "exptime_s",
    "ra_deg",
    "dec_deg",
    "status",
    "decision",
    "decision_reason",
    "decided_by",
    "fwhm_arcsec",
    "zp_mag",
    "limiting_mag",
    "sep_arcmin",
)


@dataclass(frozen=True)
class Query:
    name: str | None = None
    ra: float | None = None
    dec: float | None = None
    radius_arcmin: float | None = None
    band: str | None = None
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    observatory: str | None = None
    status: str | None = None
    page: int = 1
    per_page: int = 50
    format: str = "html"
    resolved: dict | None = field(default=None, compare=False)  # how the name was resolved

    def params(self, **override) -> dict:
        """The query as URL parameters (for paging links), empty values left out."""
        d = {k: v for k, v in asdict(self).items() if k in _PARAMS}
        d.update(override)
        return {k: str(v) for k, v in d.items() if v not in (None, "")}


def _text(params, key) -> str | None:
    v = params.get(key)
    if v is None:
        return None
    v = str(v).strip()
    if not v:
        return None
    if len(v) > _MAX_TEXT or any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise ValueError(f"{key}: at most {_MAX_TEXT} printable characters")
    return v


def _float(params, key, lo, hi) -> float | None:
    v = _text(params, key)
    if v is None:
        return None
    try:
        x = float(v)
    except ValueError:
        raise ValueError(f"{key}: not a number: {v!r:.40}") from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise ValueError(f"{key} must be in [{lo}, {hi}], got {v!r:.40}")
    return x


def _int(params, key, default, lo, hi) -> int:
    v = _text(params, key)
    if v is None:
        return default
    if not v.isdigit() or not lo <= int(v) <= hi:
        raise ValueError(f"{key} must be an integer in [{lo}, {hi}], got {v!r:.40}")
    return int(v)


def _date(params, key) -> dt.date | None:
    v = _text(params, key)
    if v is None:
        return None
    try:
        return dt.date.fromisoformat(v)
    except ValueError:
        raise ValueError(f"{key}: not a date YYYY-MM-DD: {v!r:.40}") from None


def parse_query(params: Mapping[str, str], *, observatories=()) -> Query:
    """Validate search parameters. Unknown parameters, bad numbers, dates or choices raise
    `ValueError` with a message; an unknown observatory too (when ``observatories`` is given)."""
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise ValueError(f"unknown search parameter(s): {', '.join(unknown)[:200]}")
    q = Query(
        name=_text(params, "name"),
        ra=_float(params, "ra", 0.0, 360.0),
        dec=_float(params, "dec", -90.0, 90.0),
        radius_arcmin=_float(params, "radius_arcmin", 0.0, 600.0),
        band=_text(params, "band"),
        date_from=_date(params, "date_from"),
        date_to=_date(params, "date_to"),
        observatory=_text(params, "observatory"),
        status=_text(params, "status"),
        page=_int(params, "page", 1, 1, 100_000),
        per_page=_int(params, "per_page", 50, 1, MAX_PER_PAGE),
        format=_text(params, "format") or "html",
    )
    if (q.ra is None) != (q.dec is None):
        raise ValueError("give both ra and dec (degrees), or neither")
    if q.name and q.ra is not None:
        raise ValueError("give a name or a position, not both")
    if q.status is not None and q.status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}")
    if q.format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    if q.date_from and q.date_to and q.date_from > q.date_to:
        raise ValueError("date_from is after date_to")
    if observatories and q.observatory is not None and q.observatory not in observatories:
        raise ValueError(f"unknown observatory {q.observatory!r}")
    return q


def resolve_name(store, name: str, *, online: bool = False) -> dict | None:
    """Position of a name: configured targets (offline), the results databases' objects, then
    (``online``) Sesame/SIMBAD through the project's resolver and its cache. None if unknown."""
    from rpp_tasks.stages.target import normalize_name, resolve_target

    for o in store.configs.values():
        r = resolve_target(name, config_targets=o.targets.objects, online=False)
        if r.target is not None:
            t = r.target
            return {"name": t.name, "ra": t.ra_deg, "dec": t.dec_deg, "source": t.source}
    key = f"target:{normalize_name(name)}"
    for d, _ in store.groups().values():
        rows = d.find_objects(key=key)
        if rows:
            return {
                "name": rows[0]["name"],
                "ra": rows[0]["ra_deg"],
                "dec": rows[0]["dec_deg"],
                "source": "results database",
            }
    if online:
        r = resolve_target(name, online=True)
        if r.target is not None:
            t = r.target
            return {"name": t.name, "ra": t.ra_deg, "dec": t.dec_deg, "source": t.source}
    return None


def _sep_deg(ra1, dec1, ra2, dec2) -> float:
    r1, d1, r2, d2 = (math.radians(v) for v in (ra1, dec1, ra2, dec2))
    h = math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((r2 - r1) / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h))))


@dataclass
class Result:
    query: Query
    total: int
    rows: list[dict]

    @property
    def n_pages(self) -> int:
        return max(1, math.ceil(self.total / self.query.per_page))


def _select(q: Query, names: list[str], pos, key):
    """The SQL of one results database: the frame index, joined to the current decisions only when
    the status filter is about them (else they are attached to the page's rows afterwards)."""
    from sqlalchemy import and_, func, or_, select

    t = db_decisions.FrameIndexRow.__table__
    d = db_decisions.DecisionRow.__table__
    ds = d.alias("ds")  # session-wide decision
    joined = t.outerjoin(
        d,
        and_(
            d.c.observatory == t.c.observatory,
            d.c.session_id == t.c.session_id,
            d.c.frame_stem == t.c.frame_stem,
        ),
    ).outerjoin(
        ds,
        and_(
            ds.c.observatory == t.c.observatory,
            ds.c.session_id == t.c.session_id,
            ds.c.frame_stem == db_decisions.SESSION_WIDE,
        ),
    )
    decision = func.coalesce(d.c.decision, ds.c.decision)
    by_decision = q.status in ("pending", "validated", "withdrawn")
    cols = [
        t.c.observatory,
        t.c.session_id,
        t.c.frame_stem,
        t.c.night_date,
        t.c.date_obs,
        t.c.mjd_obs,
        t.c.object_name,
        t.c.band,
        t.c.exptime_s,
        t.c.ra_deg,
        t.c.dec_deg,
        t.c.status,
        t.c.fwhm_arcsec,
        t.c.zp_mag,
        t.c.limiting_mag,
    ]
    where = [t.c.observatory.in_(names)]
    if q.band:
        where.append(t.c.band == q.band)
    if q.date_from:
        where.append(t.c.night_date >= q.date_from.isoformat())
    if q.date_to:
        where.append(t.c.night_date <= q.date_to.isoformat())
    if q.status in ("ok", "rejected"):
        where.append(t.c.status == q.status)
    elif q.status == "pending":
        where += [t.c.status == "ok", decision.is_(None)]
    elif q.status in ("validated", "withdrawn"):
        where.append(decision == q.status)
    geo = []
    if pos is not None:
        ra, dec, r = pos
        geo.append(t.c.dec_deg.between(dec - r, dec + r))
        dra = min(r / max(math.cos(math.radians(dec)), 1e-6), 180.0)
        lo, hi = (ra - dra) % 360.0, (ra + dra) % 360.0
        if dra < 180.0:
            geo.append(
                t.c.ra_deg.between(lo, hi) if lo <= hi else or_(t.c.ra_deg >= lo, t.c.ra_deg <= hi)
            )
    if key is not None and geo:
        where.append(or_(t.c.object_key == key, and_(*geo)))
    elif key is not None:
        where.append(t.c.object_key == key)
    else:
        where += geo
    return select(*cols).select_from(joined if by_decision else t).where(*where), t


def search(store, q: Query, *, online: bool = False) -> Result:
    """Run a query over every results database; rows sorted newest first, paged."""
    from sqlalchemy import func, select

    from rpp_tasks.stages.target import normalize_name

    store.sync_index()
    pos = key = None
    if q.name:
        key = normalize_name(q.name)
        res = resolve_name(store, q.name, online=online)
        q = replace(q, resolved=res)
        if res is not None:
            r_deg = (q.radius_arcmin or DEFAULT_NAME_RADIUS_ARCMIN) / 60.0
            pos = (float(res["ra"]) % 360.0, float(res["dec"]), r_deg)
    elif q.ra is not None:
        pos = (q.ra % 360.0, q.dec, (q.radius_arcmin or DEFAULT_NAME_RADIUS_ARCMIN) / 60.0)
    groups = []
    for d, names in store.groups().values():
        if q.observatory:
            names = [n for n in names if n == q.observatory]
        if names:
            groups.append((d, names))
    single = len(groups) == 1 and pos is None  # page in SQL
    start = (q.page - 1) * q.per_page
    total = 0
    rows: list[dict] = []
    for d, names in groups:
        stmt, t = _select(q, names, pos, key)
        with d.engine.connect() as conn:
            if pos is None:
                total += conn.execute(select(func.count()).select_from(stmt.subquery())).scalar()
                page = stmt.order_by(t.c.mjd_obs.desc(), t.c.observatory, t.c.frame_stem)
                page = (
                    page.offset(start).limit(q.per_page)
                    if single
                    else page.limit(start + q.per_page)
                )
                rows += [{**r, "_db": d} for r in conn.execute(page).mappings()]
            else:  # exact distance on the box's rows
                ra, dec, r = pos
                for r_ in conn.execute(stmt).mappings():
                    row, sep = dict(r_), None
                    if row["ra_deg"] is not None and row["dec_deg"] is not None:
                        sep = _sep_deg(ra, dec, row["ra_deg"], row["dec_deg"])
                        row["sep_arcmin"] = round(sep * 60.0, 3)
                    named = key is not None and row["object_name"] is not None
                    named = named and normalize_name(row["object_name"]) == key
                    if named or (sep is not None and sep <= r):
                        rows.append({**row, "_db": d})
    if pos is not None:
        total = len(rows)
    rows.sort(key=lambda r: (-(r["mjd_obs"] or 0.0), r["observatory"], r["frame_stem"]))
    rows = rows if single else rows[start : start + q.per_page]
    _attach_decisions(rows)
    return Result(q, total, rows)


def _attach_decisions(rows: list[dict]) -> None:
    """The current decision of each row (its own, else the session's), one query per database."""
    from sqlalchemy import select, tuple_

    d_t = db_decisions.DecisionRow.__table__
    by_db: dict[int, tuple] = {}
    for r in rows:
        by_db.setdefault(id(r["_db"]), (r["_db"], set()))[1].add(
            (r["observatory"], r["session_id"])
        )
    found: dict[tuple, dict] = {}
    for d, keys in by_db.values():
        stmt = select(d_t).where(tuple_(d_t.c.observatory, d_t.c.session_id).in_(sorted(keys)))
        with d.engine.connect() as conn:
            for x in conn.execute(stmt).mappings():
                found[(x["observatory"], x["session_id"], x["frame_stem"])] = dict(x)
    for r in rows:
        del r["_db"]
        k = (r["observatory"], r["session_id"])
        x = found.get((*k, r["frame_stem"])) or found.get((*k, db_decisions.SESSION_WIDE))
        r["decision"] = x["decision"] if x else None
        r["decision_reason"] = x["reason"] if x else None
        r["decided_by"] = x["decided_by"] if x else None


def to_csv(result: Result) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in result.rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in COLUMNS])
    return buf.getvalue()


def to_votable(result: Result) -> bytes:
    """The page as a VOTable (astropy), one column per `COLUMNS` entry, NULLs masked."""
    import numpy as np
    from astropy.io.votable import from_table
    from astropy.table import MaskedColumn, Table

    floats = {
        "mjd_obs",
        "exptime_s",
        "ra_deg",
        "dec_deg",
        "fwhm_arcsec",
        "zp_mag",
        "limiting_mag",
        "sep_arcmin",
    }
    units = {"ra_deg": "deg", "dec_deg": "deg", "exptime_s": "s", "fwhm_arcsec": "arcsec"}
    units.update({"mjd_obs": "d", "zp_mag": "mag", "limiting_mag": "mag", "sep_arcmin": "arcmin"})
    tab = Table()
    for c in COLUMNS:
        vals = [r.get(c) for r in result.rows]
        mask = [v is None for v in vals]
        if c in floats:
            data = np.array([np.nan if v is None else float(v) for v in vals], dtype=float)
        else:
            data = np.array(["" if v is None else str(v) for v in vals], dtype=object)
            data = data.astype(str) if len(data) else np.array([], dtype="U1")
        tab[c] = MaskedColumn(data, mask=mask, unit=units.get(c))
    vot = from_table(tab)
    buf = io.BytesIO()
    vot.to_xml(buf)
    return buf.getvalue()
