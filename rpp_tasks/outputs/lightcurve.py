"""Light curves across sessions: recording target photometry in the results database, reading a
light curve back in one query, and writing it as ECSV (astropy ``TimeSeries``) and a PNG plot.

The photometry lives in the results database (`rpp_tasks.outputs.db`: ``rpp_object`` and
``rpp_photometry``, SQLite or PostgreSQL), one row per object and frame, so a target's light curve
over every night of every observatory is `light_curve` (one indexed query).

ECSV columns (a `~astropy.timeseries.TimeSeries`: ``TimeSeries.read(path, format="ascii.ecsv")``)::

    time          BJD_TDB of mid-exposure (astropy Time, scale tdb, format jd)
    bjd_tdb       the same as a float (d)          mjd       mid-exposure MJD (UTC)
    mag, mag_err  calibrated (absolute) magnitude   mag_diff, mag_diff_err   differential
    upper_limit   True when not detected; ``limit_mag`` (and ``limit_diff_mag``) then hold the
                  5-sigma limit at the target's position and ``mag`` is NaN
    band, phot_type, snr, airmass, match_sep_arcsec, n_comp, zp_rel_mag,
    frame, session_id, observatory, night_date, exptime_s, flags
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "LightCurve",
    "record_session_photometry",
    "light_curve",
    "target_light_curve",
    "write_light_curve",
    "plot_light_curve",
    "period_amplitude",
]

log = logging.getLogger(__name__)

_TS_COLUMNS = (
    ("bjd_tdb", float),
    ("mjd", float),
    ("mag", float),
    ("mag_err", float),
    ("mag_diff", float),
    ("mag_diff_err", float),
    ("upper_limit", bool),
    ("limit_mag", float),
    ("limit_diff_mag", float),
    ("band", str),
    ("phot_type", str),
    ("snr", float),
    ("airmass", float),
    ("match_sep_arcsec", float),
    ("n_comp", int),
    ("zp_rel_mag", float),
    ("frame", str),
    ("session_id", str),
    ("observatory", str),
    ("night_date", str),
    ("exptime_s", float),
    ("flags", str),
)


_DESCRIPTIONS = {
    "bjd_tdb": "BJD_TDB of mid-exposure (d)",
    "mjd": "MJD (UTC) of mid-exposure (d)",
    "mag": "calibrated magnitude against the reference catalogue (mag)",
    "mag_err": "its error, zero point included (mag)",
    "mag_diff": "differential magnitude against the night's comparison ensemble (mag)",
    "mag_diff_err": "its error: target, error floor and ensemble (mag)",
    "upper_limit": "not detected: limit_mag is the 5-sigma limit at the position",
    "limit_mag": "5-sigma limiting magnitude at the position, calibrated (mag)",
    "limit_diff_mag": "the same on the differential scale (mag)",
    "snr": "signal-to-noise ratio",
    "airmass": "airmass at mid-exposure",
    "match_sep_arcsec": "distance from the target position to the catalogue source (arcsec)",
    "n_comp": "comparison stars used in the frame",
    "zp_rel_mag": "the frame's relative zero point from the ensemble (mag)",
    "exptime_s": "exposure time (s)",
}


@dataclass(frozen=True)
class LightCurve:
    """A light curve: ``table`` is a `~astropy.timeseries.TimeSeries` (columns above), ``objects``
    the database objects it gathers (a target recorded under several names at one position is one
    light curve), ``query`` what was asked."""

    table: object
    objects: tuple[dict, ...]
    query: str

    @property
    def name(self) -> str:
        return self.objects[0]["name"] if self.objects else self.query

    def to_dict(self) -> dict:
        t = self.table
        det = ~np.asarray(t["upper_limit"], bool) if len(t) else np.zeros(0, bool)
        return {
            "query": self.query,
            "name": self.name,
            "objects": [o["key"] for o in self.objects],
            "n_points": len(t),
            "n_detected": int(det.sum()),
            "n_upper_limits": int((~det).sum()),
            "bands": sorted({str(b) for b in t["band"]}) if len(t) else [],
            "n_nights": len(set(np.asarray(t["night_date"]).astype(str))) if len(t) else 0,
        }


# =============================================================================== writing
def record_session_photometry(
    rdb,
    observatory: str,
    session_id: str,
    *,
    objects: list[dict],
    rows: list[dict],
    night_date: str | None = None,
    frames: dict | None = None,
) -> int:
    """
    Record one session's object photometry in the results database (idempotent).

    Parameters
    ----------
    rdb : `rpp_tasks.outputs.db.ResultsDB`
    observatory, session_id : str
    objects : list of dict
        ``key``, ``name``, ``kind``, ``ra_deg``, ``dec_deg`` (`ResultsDB.upsert_objects`).
    rows : list of dict
        ``object_key``, ``frame`` and `rpp_tasks.outputs.db.PHOTOMETRY_FIELDS`.
    night_date : str, optional
        Used when the session itself is not recorded yet.
    frames : dict, optional
        ``{stem: {band, mjd_obs, exptime_s}}``: frames missing from the database are recorded with
        these values (the session summary normally recorded them already).

    Returns
    -------
    n : int
        Photometry rows written.
    """
    import datetime as dt

    rdb.create_schema()
    if rdb.get_session(observatory, session_id) is None:
        rdb.upsert_session(
            observatory,
            session_id,
            night_date or dt.datetime.now(dt.UTC).date().isoformat(),
            status="done",
        )
    pks = rdb.upsert_objects(objects)
    out = []
    for r in rows:
        r = dict(r)
        r["object_pk"] = pks[r.pop("object_key")]
        out.append(r)
    return rdb.record_photometry(observatory, session_id, out, frames=frames or {})


# =============================================================================== reading
def light_curve(
    rdb,
    query: str | tuple[float, float],
    *,
    observatory: str | None = None,
    band: str | None = None,
    radius_arcsec: float = 2.0,
    config_targets=(),
    setup=None,
    online: bool = False,
) -> LightCurve:
    """
    A light curve from the results database.

    Parameters
    ----------
    rdb : `rpp_tasks.outputs.db.ResultsDB`
    query : str or (ra_deg, dec_deg)
        A target name (recorded name or alias, configured name; otherwise resolved like a target,
        `rpp_tasks.stages.target.resolve_target`) or coordinates. Every object within
        ``radius_arcsec`` of the position is gathered (targets first; a catalogue source when no
        target was recorded there).
    observatory, band : str, optional
        Only this observatory / band.

    Returns
    -------
    LightCurve
        Empty table (with the columns) when nothing was recorded there.

    Raises
    ------
    LookupError
        The name is unknown (not recorded, not configured, not resolvable).
    """
    from rpp_tasks.stages.target import normalize_name, resolve_target

    if isinstance(query, tuple):
        ra, dec = float(query[0]), float(query[1])
        label = f"{ra:.6f} {dec:+.6f}"
    else:
        label = str(query)
        key = normalize_name(label)
        by_key = rdb.find_objects(key="target:" + key) or [
            o
            for o in rdb.find_objects(kind="target")
            if key in {normalize_name(a) for a in ((o.get("info") or {}).get("aliases") or ())}
        ]
        if by_key:
            ra, dec = by_key[0]["ra_deg"], by_key[0]["dec_deg"]
        else:
            res = resolve_target(label, config_targets=config_targets, setup=setup, online=online)
            if not res.ok:
                raise LookupError(f"target {label!r}: {res.reason}")
            ra, dec = res.target.ra_deg, res.target.dec_deg
    objs = rdb.find_objects(ra_deg=ra, dec_deg=dec, radius_arcsec=radius_arcsec, kind="target")
    if not objs:
        objs = rdb.find_objects(ra_deg=ra, dec_deg=dec, radius_arcsec=radius_arcsec, kind="source")
        objs = objs[:1]
    data = (
        rdb.photometry_rows(
            [o["id"] for o in objs],
            observatory=observatory,
            band=band,
            fields=_DB_FIELDS,
            columns=True,
            statuses=("detected", "upper_limit"),
        )
        if objs
        else {}
    )
    return LightCurve(_to_timeseries(data, objs, label), tuple(objs), label)


def target_light_curve(
    db_url: str,
    query: str | tuple[float, float],
    *,
    observatory: str | None = None,
    band: str | None = None,
    last_nights: int | None = None,
    until_night: str | None = None,
    radius_arcsec: float = 2.0,
    config_targets=(),
):
    """
    A target's light curve from the results database at ``db_url``, as an astropy table.

    The entry point for the report and the dashboard: `light_curve` on a fresh connection,
    optionally restricted to the ``last_nights`` nights with photometry up to ``until_night``
    (``YYYY-MM-DD``, included). Offline: names resolve from the database and ``config_targets``.

    Parameters
    ----------
    db_url : str
        SQLAlchemy URL (SQLite or PostgreSQL).
    query : str or (ra_deg, dec_deg)
        Target name (or alias) or coordinates.

    Returns
    -------
    `~astropy.timeseries.TimeSeries`
        The columns of `light_curve` (empty, with the columns, when nothing was recorded), time
        ordered; ``meta["nights"]`` the nights it covers.

    Raises
    ------
    LookupError
        The name is unknown.
    """
    from rpp_tasks.outputs.db import ResultsDB

    with ResultsDB(db_url) as rdb:
        lc = light_curve(
            rdb,
            query,
            observatory=observatory,
            band=band,
            radius_arcsec=radius_arcsec,
            config_targets=config_targets,
        )
    t = lc.table
    nights_col = np.asarray(t["night_date"]).astype(str) if len(t) else np.zeros(0, str)
    keep = np.ones(len(t), bool)
    if until_night:
        keep &= nights_col <= str(until_night)
    nights = sorted(set(nights_col[keep]))
    if last_nights is not None and len(nights) > last_nights:
        nights = nights[-int(last_nights) :]
        keep &= np.isin(nights_col, nights)
    if not keep.all():
        t = t[keep]
    t.meta["nights"] = nights
    return t


_DB_FIELDS = (
    "status",
    "band",
    "phot_type",
    "mjd_mid",
    "bjd_tdb",
    "airmass",
    "mag",
    "mag_err",
    "mag_diff",
    "mag_diff_err",
    "snr",
    "limit_mag",
    "limit_diff_mag",
    "match_sep_arcsec",
    "zp_rel_mag",
    "n_comp",
    "flags",
)


def _to_timeseries(data: dict, objs, label):
    from astropy.table import Column
    from astropy.time import Time
    from astropy.timeseries import TimeSeries

    n = len(data.get("status", ()))
    cols = {}
    for name, typ in _TS_COLUMNS:
        raw = data.get({"mjd": "mjd_mid"}.get(name, name), ())
        if name == "upper_limit":
            vals = np.asarray(data.get("status", ()), dtype=object) == "upper_limit"
        elif typ is float:
            vals = np.array(raw, dtype=float) if n else np.zeros(0)  # None -> NaN
        elif typ is int:
            vals = np.array([v or 0 for v in raw], dtype=int) if n else np.zeros(0, int)
        else:
            vals = np.array(["" if v is None else str(v) for v in raw], dtype=str)
        cols[name] = Column(vals.astype(bool) if name == "upper_limit" else vals, name=name)
    bjd = cols["bjd_tdb"].data
    if n and not np.isfinite(bjd).all():  # no position -> fall back to the UTC time, flagged
        bjd = np.where(np.isfinite(bjd), bjd, cols["mjd"].data + 2400000.5)
    time = Time(bjd if n else np.zeros(0), format="jd", scale="tdb")
    ts = TimeSeries(time=time, data=[cols[c] for c, _ in _TS_COLUMNS])
    # plain columns (no units: a TimeSeries would turn them into Quantities), described instead
    for c, text in _DESCRIPTIONS.items():
        ts[c].info.description = text
    ts.meta.update(
        {
            "object": objs[0]["name"] if objs else label,
            "query": label,
            "objects": [o["key"] for o in objs],
            "ra_deg": objs[0]["ra_deg"] if objs else None,
            "dec_deg": objs[0]["dec_deg"] if objs else None,
            "time_scale": "BJD_TDB of mid-exposure",
            "magnitudes": "mag: calibrated against the reference catalogue (absolute); mag_diff: "
            "differential against the night's comparison ensemble, on the catalogue scale",
        }
    )
    return ts


def write_light_curve(lc: LightCurve, path: str | os.PathLike) -> Path:
    """Write the light curve as ECSV (``TimeSeries.read(path, format='ascii.ecsv')`` reads it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    lc.table.write(tmp, format="ascii.ecsv", overwrite=True)
    os.replace(tmp, path)
    return path


def plot_light_curve(
    lc: LightCurve,
    path: str | os.PathLike,
    *,
    which: str = "auto",
    title: str | None = None,
) -> Path:
    """
    PNG plot of a light curve: magnitude (up is bright) against time, one colour per band, error
    bars, upper limits as downward triangles, one panel per observatory-independent band.

    ``which``: ``"mag"`` (absolute), ``"mag_diff"`` (differential), or ``"auto"`` (differential
    where measured, else absolute).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t = lc.table
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8.0, 4.2), dpi=110, layout="constrained")
    if len(t) == 0:
        ax.text(
            0.5, 0.5, "no photometry recorded", ha="center", va="center", transform=ax.transAxes
        )
    else:
        x = np.asarray(t["bjd_tdb"], float) - 2400000.0
        bands = sorted(set(np.asarray(t["band"]).astype(str)))
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        lim = np.asarray(t["upper_limit"], bool)
        use_diff = which == "mag_diff" or (
            which == "auto" and np.isfinite(np.asarray(t["mag_diff"], float)[~lim]).any()
        )
        mcol, ecol = ("mag_diff", "mag_diff_err") if use_diff else ("mag", "mag_err")
        lcol = "limit_diff_mag" if use_diff else "limit_mag"
        for k, b in enumerate(bands):
            c = colours[k % len(colours)]
            sel = np.asarray(t["band"]).astype(str) == b
            det = sel & ~lim & np.isfinite(np.asarray(t[mcol], float))
            ax.errorbar(
                x[det],
                np.asarray(t[mcol], float)[det],
                yerr=np.nan_to_num(np.asarray(t[ecol], float)[det]),
                fmt="o",
                ms=3.5,
                lw=0.8,
                color=c,
                label=f"{b} ({det.sum()})",
            )
            ul = sel & lim & np.isfinite(np.asarray(t[lcol], float))
            if ul.any():
                ax.plot(
                    x[ul],
                    np.asarray(t[lcol], float)[ul],
                    "v",
                    ms=6,
                    mfc="none",
                    color=c,
                    label=f"{b} upper limits ({ul.sum()})",
                )
        ax.invert_yaxis()
        ax.set_xlabel("BJD_TDB - 2400000 (d)")
        ax.ticklabel_format(axis="x", useOffset=False)  # plain days, no "+6.07e4" offset
        kind = "differential" if use_diff else "calibrated"
        ax.set_ylabel(f"{kind} magnitude")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    n_nights = len(set(np.asarray(t["night_date"]).astype(str))) if len(t) else 0
    ax.set_title(title or f"{lc.name}: {len(t)} points, {n_nights} nights", fontsize=10)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def period_amplitude(
    lc: LightCurve, *, column: str = "mag_diff", min_period_d=0.05, max_period_d=50
):
    """Lomb-Scargle period (d) and semi-amplitude (mag) of the detected points of a light curve.

    A convenience for a quick look (and the tests): astropy ``LombScargle`` with errors (20 samples
    per peak, then a grid of 1e-4 of the peak width around the best one); the amplitude is that of
    the best-fitting sinusoid at the peak. Returns ``(nan, nan)`` with fewer than 5 points.
    """
    from astropy.timeseries import LombScargle

    t = lc.table
    lim = np.asarray(t["upper_limit"], bool)
    y = np.asarray(t[column], float)
    e = np.asarray(t[f"{column}_err"], float)
    x = np.asarray(t["bjd_tdb"], float)
    ok = ~lim & np.isfinite(y) & np.isfinite(e) & np.isfinite(x) & (e > 0)
    if ok.sum() < 5:
        return float("nan"), float("nan")
    ls = LombScargle(x[ok], y[ok], e[ok])
    span = float(np.ptp(x[ok]))
    f, p = ls.autopower(
        minimum_frequency=1.0 / max_period_d,
        maximum_frequency=1.0 / min_period_d,
        samples_per_peak=20,
    )
    best = float(f[int(np.argmax(p))])
    # refine around the peak (its width is ~1/span)
    fine = np.linspace(best - 0.1 / span, best + 0.1 / span, 2001)
    best = float(fine[int(np.argmax(ls.power(fine)))])
    theta = ls.model_parameters(best)
    amp = math.hypot(theta[1], theta[2])
    return 1.0 / best, amp
