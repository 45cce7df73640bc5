"""The observer's target: who it is, where it is, and its magnitude (or upper limit) in a frame.

Pure functions (no file I/O, no config object):

* `parse_coordinates` -- ``"150.1 +2.2"``, ``"10:00:24.5 +02:12:00"``, ``"10h00m24.5s +2d12m"``;
* `resolve_target` -- a name or coordinates -> `Target`: the observatory's configured targets
  (names and aliases, offline), the on-disk name cache, then Sesame (CDS) and SIMBAD TAP through
  the catalogue HTTP client (timeouts, bounded retries, circuit breaker); every failure reason is
  kept in the `TargetResolution`;
* `targets_for_session` -- the targets of a night: the run's parameters, each frame's ``OBJECT``,
  the configured targets inside the field;
* `measure_target` -- the target's row of a reduced frame's catalogue, found by position (match
  distance recorded): band, calibrated magnitude +- error for every photometry type, S/N, flags,
  or an upper limit when it is not detected;
* `limiting_mag_at` -- the 5-sigma limiting magnitude at a position from the local background noise
  (the frame's limit at the target, as ``limiting_mag_inst`` is for the whole frame);
* `bjd_tdb` -- barycentric Julian date (TDB) of a UTC time towards a sky position (ERFA only: no
  IERS download, no network; agrees with astropy's ``light_travel_time`` to a few microseconds).

The session adapter `run_targets` (bottom of this module) reads the reduced frames of a session,
adds the differential photometry of `rpp_tasks.stages.differential`, writes ``targets.json`` and
``targets.ecsv`` into the session folder and records the photometry in the results database.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rpp_tasks.config import parse_dec_deg, parse_ra_deg

__all__ = [
    "Target",
    "TargetResolution",
    "TargetMeasurement",
    "normalize_name",
    "parse_coordinates",
    "resolve_target",
    "targets_for_session",
    "measure_target",
    "limiting_mag_at",
    "bjd_tdb",
    "mid_exposure_mjd",
    "run_targets",
]

log = logging.getLogger(__name__)

PHOT_TYPES = ("psf", "1p3fwhm", "1p1fwhm", "fixed")
_AU_LIGHT_S = 499.004783836  # light time for 1 au (s)
_C_M_S = 299792458.0


# =============================================================================== targets
def normalize_name(name: str) -> str:
    """Case- and space-insensitive key of a target name (``"V* RR  Lyr"`` -> ``"v* rr lyr"``)."""
    return " ".join(str(name).lower().split())


@dataclass(frozen=True)
class Target:
    """A target: name, ICRS position at ``epoch_jyear`` (+ proper motion) and where both came from.

    ``source``: ``config``, ``coordinates``, ``cache``, ``sesame`` or ``simbad``;
    ``named_by``: ``param`` (the run's parameters), ``header`` (a frame's OBJECT) or ``config``.
    """

    name: str
    ra_deg: float
    dec_deg: float
    source: str = "config"
    named_by: str = "config"
    aliases: tuple[str, ...] = ()
    pmra_mas_yr: float = 0.0
    pmdec_mas_yr: float = 0.0
    epoch_jyear: float = 2000.0
    otype: str | None = None

    @property
    def key(self) -> str:
        """Results-database key: ``target:<normalised name>``."""
        return "target:" + normalize_name(self.name)

    def position_at(self, mjd: float | None) -> tuple[float, float]:
        """(RA, Dec) moved by the proper motion to ``mjd`` (the catalogue position without it)."""
        if (
            mjd is None
            or not math.isfinite(mjd)
            or (not self.pmra_mas_yr and not self.pmdec_mas_yr)
        ):
            return self.ra_deg, self.dec_deg
        dt = 2000.0 + (mjd - 51544.5) / 365.25 - self.epoch_jyear
        dec = self.dec_deg + self.pmdec_mas_yr * dt / 3.6e6
        cosd = max(math.cos(math.radians(self.dec_deg)), 1e-9)
        ra = self.ra_deg + self.pmra_mas_yr * dt / 3.6e6 / cosd
        return ra % 360.0, dec

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["aliases"] = list(self.aliases)
        return d


@dataclass(frozen=True)
class TargetResolution:
    """Outcome of resolving one name: ``target`` is None when it failed (``reason`` says why)."""

    query: str
    named_by: str
    target: Target | None
    reason: str | None = None
    attempts: tuple[dict, ...] = ()

    @property
    def ok(self) -> bool:
        return self.target is not None

    def to_dict(self) -> dict:
        return {
            "query": self.query,
            "named_by": self.named_by,
            "status": "ok" if self.ok else "failed",
            "target": self.target.to_dict() if self.target else None,
            "reason": self.reason,
            "attempts": list(self.attempts),
        }


_COORD_SPLIT = re.compile(r"^\s*(?P<ra>.+?)\s*[,\s]\s*(?P<dec>[-+]?\d[\d.:dms'\"\s]*)\s*$")


def parse_coordinates(text: str) -> tuple[float, float] | None:
    """(RA, Dec) in degrees from ``"150.1 +2.2"``, ``"150.1, 2.2"``, ``"10:00:24.5 +02:12:00"``,
    ``"10 00 24.5 +02 12 00"`` or ``"10h00m24.5s +2d12m0s"``; None when ``text`` is not a pair of
    coordinates (it is then a name)."""
    t = str(text).strip()
    if not t or not re.match(r"^[\d\s.:hdms'\"+,-]+$", t):
        return None
    parts = t.replace(",", " ").split()
    if len(parts) == 6:  # h m s d m s
        ra_s, dec_s = " ".join(parts[:3]), " ".join(parts[3:])
    elif len(parts) == 2:
        ra_s, dec_s = parts
    elif len(parts) == 4:  # h m d m
        ra_s, dec_s = " ".join(parts[:2]), " ".join(parts[2:])
    else:
        return None
    try:
        if re.fullmatch(r"[-+]?\d+(\.\d*)?", ra_s):
            ra = parse_ra_deg(float(ra_s))
        else:
            ra = parse_ra_deg(ra_s)
        dec = parse_dec_deg(dec_s)
    except ValueError:
        return None
    return ra, dec


def _config_targets(objects) -> list[tuple[dict, tuple[str, ...]]]:
    out = []
    for t in objects or ():
        d = t if isinstance(t, dict) else dataclasses.asdict(t)
        names = (d["name"], *(d.get("aliases") or ()))
        out.append((d, tuple(normalize_name(n) for n in names)))
    return out


def _target_from_config(d: dict, named_by: str) -> Target | None:
    if d.get("ra") is None or d.get("dec") is None:
        return None
    return Target(
        name=d["name"],
        ra_deg=parse_ra_deg(d["ra"]),
        dec_deg=parse_dec_deg(d["dec"]),
        source="config",
        named_by=named_by,
        aliases=tuple(d.get("aliases") or ()),
        pmra_mas_yr=float(d.get("pmra_mas_yr") or 0.0),
        pmdec_mas_yr=float(d.get("pmdec_mas_yr") or 0.0),
        epoch_jyear=float(d.get("epoch_jyear") or 2000.0),
    )


def _cache_path(cache_dir, name: str) -> Path | None:
    if not cache_dir:
        return None
    key = normalize_name(name)
    slug = re.sub(r"[^\w.+-]+", "_", key)[:60]
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return Path(cache_dir) / "names" / f"{slug}_{digest}.json"


def _parse_sesame(text: str) -> dict | None:
    """The first ``%J`` position of a Sesame plain-text reply (with ``%I.0`` name, ``%C.0`` type and
    ``%P`` proper motion when present); None when nothing was found."""
    out: dict = {}
    for line in text.splitlines():
        if line.startswith("%J ") and "ra_deg" not in out:
            m = re.match(r"%J\s+([0-9.]+)\s+([-+][0-9.]+)", line)
            if m:
                out["ra_deg"], out["dec_deg"] = float(m.group(1)), float(m.group(2))
        elif line.startswith("%I.0 ") and "name" not in out:
            out["name"] = " ".join(line[5:].split())
        elif line.startswith("%C.0 ") and "otype" not in out:
            out["otype"] = line[5:].strip()
        elif line.startswith("%P ") and "pmra_mas_yr" not in out:
            vals = line[3:].split()
            try:
                out["pmra_mas_yr"], out["pmdec_mas_yr"] = float(vals[0]), float(vals[1])
            except (IndexError, ValueError):
                pass
    if "ra_deg" not in out:
        return None
    return out


def _ask_sesame(name: str, setup) -> dict | None:
    from urllib.parse import quote

    from rpp_tasks.stages.catalogs import ServiceClient

    client = setup.client or ServiceClient()
    base = setup.urls.get("sesame")
    if not base:
        return None
    content, _ = client.request(f"{base.rstrip('/')}/-oI/SNV?{quote(name)}")
    return _parse_sesame(content.decode("utf-8", errors="replace"))


def _ask_simbad(name: str, setup) -> dict | None:
    from rpp_tasks.stages.catalogs import ServiceClient, parse_service_table

    client = setup.client or ServiceClient()
    base = setup.urls.get("simbad")
    if not base:
        return None
    ident = name.replace("'", "''")
    q = (
        "SELECT TOP 1 basic.main_id, basic.ra, basic.dec, basic.otype, basic.pmra, basic.pmdec "
        f"FROM ident JOIN basic ON ident.oidref = basic.oid WHERE ident.id = '{ident}'"
    )
    content, _ = client.request(
        base.rstrip("/") + "/sync",
        data={"REQUEST": "doQuery", "LANG": "ADQL", "FORMAT": "votable", "QUERY": q},
    )
    tab = parse_service_table(content)
    if len(tab) == 0:
        return None
    row = tab[0]
    low = {c.lower(): c for c in tab.colnames}

    def num(k):
        try:
            v = float(row[low[k]])
            return v if math.isfinite(v) else 0.0
        except (KeyError, TypeError, ValueError):
            return 0.0

    ra, dec = float(row[low["ra"]]), float(row[low["dec"]])
    if not (math.isfinite(ra) and math.isfinite(dec)):
        return None
    return {
        "ra_deg": ra,
        "dec_deg": dec,
        "name": " ".join(str(row[low["main_id"]]).split()) if "main_id" in low else name,
        "otype": str(row[low["otype"]]).strip() if "otype" in low else None,
        "pmra_mas_yr": num("pmra"),
        "pmdec_mas_yr": num("pmdec"),
    }


def resolve_target(
    query: str,
    *,
    named_by: str = "param",
    config_targets=(),
    setup=None,
    online: bool = True,
) -> TargetResolution:
    """
    Resolve a target name (or a pair of coordinates) to a `Target`.

    Parameters
    ----------
    query : str
        A name (``"SN 2025abc"``, ``"RR Lyr"``) or coordinates (see `parse_coordinates`).
    named_by : {"param", "header", "config"}
        Who named it (recorded in the target).
    config_targets : sequence of `rpp_tasks.config.TargetEntry` or dict
        The observatory's targets: a name or alias found here gives its configured coordinates
        (offline); a configured target without coordinates is resolved online under its name.
    setup : `rpp_tasks.stages.catalogs.ServicesSetup`, optional
        Sesame/SIMBAD addresses, the HTTP client and the cache folder (``<cache_dir>/names``).
    online : bool
        Ask Sesame, then SIMBAD, when the name is neither configured nor cached.

    Returns
    -------
    TargetResolution
        Never raises for an unknown name or a service that is down: ``target`` is None and
        ``reason`` lists what was tried.
    """
    query = str(query).strip()
    if not query:
        return TargetResolution(query, named_by, None, "empty target name")
    coords = parse_coordinates(query)
    if coords is not None:
        name = f"J{coords[0]:09.5f}{coords[1]:+09.5f}"
        return TargetResolution(query, named_by, Target(name, *coords, "coordinates", named_by))
    key = normalize_name(query)
    lookup_name = query
    for d, keys in _config_targets(config_targets):
        if key in keys:
            t = _target_from_config(d, named_by)
            if t is not None:
                return TargetResolution(query, named_by, t)
            lookup_name = d["name"]  # configured without coordinates: resolve its name
            aliases = tuple(d.get("aliases") or ())
            break
    else:
        aliases = ()
    attempts: list[dict] = []
    cache_file = _cache_path(getattr(setup, "cache_dir", None), lookup_name)
    if cache_file is not None and cache_file.is_file():
        try:
            c = json.loads(cache_file.read_text())
            t = Target(
                name=lookup_name if aliases or lookup_name != query else query,
                ra_deg=float(c["ra_deg"]),
                dec_deg=float(c["dec_deg"]),
                source="cache",
                named_by=named_by,
                aliases=aliases,
                pmra_mas_yr=float(c.get("pmra_mas_yr") or 0.0),
                pmdec_mas_yr=float(c.get("pmdec_mas_yr") or 0.0),
                otype=c.get("otype"),
            )
            return TargetResolution(query, named_by, t, attempts=({"service": "cache"},))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            attempts.append({"service": "cache", "status": "failed", "reason": str(exc)[:120]})
    if not online or setup is None:
        why = "not in the observatory's targets (targets.objects)"
        why += " and name resolution is off (offline)" if not online else ""
        return TargetResolution(query, named_by, None, f"{query!r} {why}", tuple(attempts))
    from rpp_tasks.stages.catalogs import ServiceError

    for service, ask in (("sesame", _ask_sesame), ("simbad", _ask_simbad)):
        t0 = time.perf_counter()
        try:
            got = ask(lookup_name, setup)
        except ServiceError as exc:
            attempts.append(
                {"service": service, "status": "failed", "reason": f"{exc.kind}: {exc}"[:200]}
            )
            log.log(
                logging.INFO if exc.circuit_open else logging.WARNING,
                "target %r: %s failed (%s)",
                lookup_name,
                service,
                exc,
            )
            continue
        wall = round(time.perf_counter() - t0, 4)
        if got is None:
            attempts.append({"service": service, "status": "empty", "reason": "name not found"})
            continue
        attempts.append({"service": service, "status": "ok", "wall_s": wall})
        t = Target(
            name=lookup_name,
            ra_deg=got["ra_deg"] % 360.0,
            dec_deg=got["dec_deg"],
            source=service,
            named_by=named_by,
            aliases=tuple(dict.fromkeys(a for a in (*aliases, got.get("name")) if a)),
            pmra_mas_yr=got.get("pmra_mas_yr") or 0.0,
            pmdec_mas_yr=got.get("pmdec_mas_yr") or 0.0,
            otype=got.get("otype"),
        )
        if cache_file is not None:
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_name(cache_file.name + f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({**got, "query": lookup_name, "service": service}))
                os.replace(tmp, cache_file)
            except OSError as exc:
                log.warning("target name cache not written (%s)", exc)
        return TargetResolution(query, named_by, t, attempts=tuple(attempts))
    why = "; ".join(f"{a['service']}: {a.get('reason')}" for a in attempts)
    return TargetResolution(
        query, named_by, None, f"{query!r} not resolved ({why})", tuple(attempts)
    )


def targets_for_session(
    *,
    params=(),
    objects=(),
    config_targets=(),
    field_cones=(),
    setup=None,
    online: bool = True,
    match_radius_arcsec: float = 2.0,
) -> tuple[list[Target], list[TargetResolution]]:
    """
    The targets of a night and the resolution of every name.

    Parameters
    ----------
    params : sequence of str
        Targets named by the run's parameters (names or coordinates).
    objects : sequence of str
        The frames' ``OBJECT`` values (each distinct value resolved once).
    config_targets : sequence
        The observatory's targets (`rpp_tasks.config.TargetEntry`).
    field_cones : sequence of (ra_deg, dec_deg, radius_deg)
        The frames' fields: configured targets with coordinates inside one are targets of the night.
    setup, online
        As `resolve_target`.

    Returns
    -------
    (targets, resolutions)
        Distinct targets (two names within ``match_radius_arcsec`` are one target, the first
        naming wins: run parameter, then OBJECT, then configuration) and every resolution tried
        (failed ones carry the reason; an OBJECT that is no known target is one of them).
    """
    from rpp_tasks.stages.catalogs import angular_sep_deg

    resolutions: list[TargetResolution] = []
    seen: set[str] = set()
    for q, who in [(p, "param") for p in params] + [(o, "header") for o in objects]:
        if q is None or not str(q).strip() or normalize_name(q) in seen:
            continue
        seen.add(normalize_name(q))
        resolutions.append(
            resolve_target(
                q, named_by=who, config_targets=config_targets, setup=setup, online=online
            )
        )
    for d, _ in _config_targets(config_targets):
        t = _target_from_config(d, "config")
        if t is None:
            continue
        inside = any(
            float(angular_sep_deg(t.ra_deg, t.dec_deg, ra, dec)) <= r for ra, dec, r in field_cones
        )
        if inside:
            resolutions.append(TargetResolution(d["name"], "config", t))
    targets: list[Target] = []
    for r in resolutions:
        if not r.ok:
            continue
        t = r.target
        dup = any(
            float(angular_sep_deg(t.ra_deg, t.dec_deg, u.ra_deg, u.dec_deg)) * 3600
            <= match_radius_arcsec
            for u in targets
        )
        if not dup:
            targets.append(t)
    return targets, resolutions


# =============================================================================== measurement
@dataclass(frozen=True)
class TargetMeasurement:
    """A target in one frame.

    ``status``: ``detected``, ``upper_limit`` (in the field, no source with S/N >=
    ``detect_min_snr`` within the match radius), ``outside_field`` or ``no_wcs``.
    ``by_type[t]`` holds for each photometry type ``mag`` / ``mag_err`` (calibrated, absolute),
    ``mag_inst`` / ``mag_inst_err`` (per second), ``snr``; `run_targets` adds the differential
    ``mag_diff`` / ``mag_diff_err``. ``limit_mag`` is the 5-sigma limit at the target position
    (calibrated when the frame has a zero point, else instrumental: ``limit_kind``).
    """

    target: str
    frame: str
    status: str
    band: str | None = None
    x_px: float = float("nan")
    y_px: float = float("nan")
    match_sep_arcsec: float = float("nan")
    source_id: int | None = None
    snr: float = float("nan")
    flags: tuple[str, ...] = ()
    by_type: dict = field(default_factory=dict)
    limit_mag: float = float("nan")
    limit_kind: str | None = None
    reason: str | None = None

    @property
    def detected(self) -> bool:
        return self.status == "detected"

    def to_dict(self) -> dict:
        def f(v):
            return None if v is None or not math.isfinite(v) else round(float(v), 6)

        return {
            "target": self.target,
            "frame": self.frame,
            "status": self.status,
            "band": self.band,
            "x_px": f(self.x_px),
            "y_px": f(self.y_px),
            "match_sep_arcsec": f(self.match_sep_arcsec),
            "source_id": self.source_id,
            "snr": f(self.snr),
            "flags": list(self.flags),
            "by_type": {t: {k: f(v) for k, v in d.items()} for t, d in self.by_type.items()},
            "limit_mag": f(self.limit_mag),
            "limit_kind": self.limit_kind,
            "reason": self.reason,
        }


def _num(row, cat, name):
    if name not in cat.colnames:
        return float("nan")
    v = row[name]
    if np.ma.is_masked(v):
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def measure_target(
    cat,
    target_ra_deg: float,
    target_dec_deg: float,
    *,
    target: str,
    frame: str,
    band: str | None,
    x_px: float,
    y_px: float,
    shape: tuple[int, int],
    match_radius_arcsec: float = 2.0,
    detect_min_snr: float = 3.0,
    edge_margin_px: float = 5.0,
    limit_mag: float = float("nan"),
    limit_kind: str | None = None,
    types=PHOT_TYPES,
) -> TargetMeasurement:
    """
    The target's photometry in one reduced frame, found by position.

    Parameters
    ----------
    cat : astropy.table.Table
        The frame's catalogue (``ra``, ``dec``, ``mag_<t>``, ``mag_err_<t>``, ``snr_<t>``,
        ``mag_cal_<t>``, ``mag_cal_err_<t>``, flags).
    target_ra_deg, target_dec_deg : float
        Target position at the frame's epoch.
    x_px, y_px : float
        Target position in the frame (0-based, from its WCS); NaN without a WCS.
    shape : (ny, nx)
    match_radius_arcsec : float
        The nearest catalogue source within this distance is the target.
    detect_min_snr : float
        A matched source fainter than this S/N is no detection: an upper limit is reported.
    limit_mag, limit_kind : float, str
        The limiting magnitude at the target position (`limiting_mag_at`) and its kind
        (``calibrated`` or ``instrumental``), reported when the target is not detected.

    Returns
    -------
    TargetMeasurement
    """
    from rpp_tasks.stages.catalogs import match_catalogs

    ny, nx = int(shape[0]), int(shape[1])
    base = {"target": target, "frame": frame, "band": band, "x_px": x_px, "y_px": y_px}
    if not (math.isfinite(x_px) and math.isfinite(y_px)):
        return TargetMeasurement(**base, status="no_wcs", reason="the frame has no valid WCS")
    m = edge_margin_px
    if not (-0.5 + m <= x_px <= nx - 0.5 - m and -0.5 + m <= y_px <= ny - 0.5 - m):
        dx = max(-0.5 + m - x_px, x_px - (nx - 0.5 - m), 0.0)
        dy = max(-0.5 + m - y_px, y_px - (ny - 0.5 - m), 0.0)
        return TargetMeasurement(
            **base,
            status="outside_field",
            reason=f"outside the field: x={x_px:.0f}, y={y_px:.0f} px in a {nx}x{ny} frame "
            f"({math.hypot(dx, dy):.0f} px beyond the usable area)",
        )
    row = None
    sep = float("nan")
    if len(cat) and "ra" in cat.colnames:
        idx, seps = match_catalogs(
            [target_ra_deg],
            [target_dec_deg],
            cat["ra"],
            cat["dec"],
            radius_arcsec=match_radius_arcsec,
        )
        if idx[0] >= 0:
            row, sep = cat[int(idx[0])], float(seps[0])
    by_type: dict = {}
    flags: list[str] = []
    snr = float("nan")
    sid = None
    if row is not None:
        for t in types:
            if f"mag_{t}" not in cat.colnames:
                continue
            by_type[t] = {
                "mag": _num(row, cat, f"mag_cal_{t}"),
                "mag_err": _num(row, cat, f"mag_cal_err_{t}"),
                "mag_inst": _num(row, cat, f"mag_{t}"),
                "mag_inst_err": _num(row, cat, f"mag_err_{t}"),
                "snr": _num(row, cat, f"snr_{t}"),
            }
        snr = _num(row, cat, "snr")
        if not math.isfinite(snr):
            snr = next((d["snr"] for d in by_type.values() if math.isfinite(d["snr"])), snr)
        for name in ("saturated", "near_edge", "blended"):
            if name in cat.colnames and bool(row[name]):
                flags.append(name)
        sid = int(row["id"]) if "id" in cat.colnames else None
        if "gaia_source_id" in cat.colnames and int(row["gaia_source_id"]) > 0:
            flags.append("in_gaia")
        if "vsx_name" in cat.colnames and str(row["vsx_name"]).strip():
            flags.append("vsx:" + str(row["vsx_name"]).strip())
    detected = row is not None and math.isfinite(snr) and snr >= detect_min_snr
    if not detected:
        why = (
            f"no source within {match_radius_arcsec:g} arcsec"
            if row is None
            else f"S/N {snr:.1f} < {detect_min_snr:g} (source at {sep:.2f} arcsec)"
        )
        return TargetMeasurement(
            **base,
            status="upper_limit",
            match_sep_arcsec=sep,
            source_id=sid,
            snr=snr,
            flags=tuple(flags),
            by_type=by_type,
            limit_mag=limit_mag,
            limit_kind=limit_kind,
            reason=why,
        )
    return TargetMeasurement(
        **base,
        status="detected",
        match_sep_arcsec=sep,
        source_id=sid,
        snr=snr,
        flags=tuple(flags),
        by_type=by_type,
        limit_mag=limit_mag,
        limit_kind=limit_kind,
    )


def limiting_mag_at(
    data,
    x_px: float,
    y_px: float,
    *,
    fwhm_px: float,
    exptime_s: float,
    mask=None,
    zero_point_mag: float = float("nan"),
    extinction_mag: float = 0.0,
    nsigma: float = 5.0,
    box_px: int = 65,
) -> tuple[float, float]:
    """
    Limiting magnitude for a point source at a position, from the local background noise.

    The noise is the 3-sigma-clipped standard deviation of the calibrated pixels of a ``box_px``
    square around the position (sources and masked pixels are clipped away; the background level
    does not matter, only its scatter); the limit is the flux of ``nsigma`` times that noise in a
    circular aperture of radius 1.3 FWHM, as for the frame's ``limiting_mag_inst``:
    ``m = -2.5 log10(nsigma * rms * sqrt(pi) * r / exptime) - k X + ZP``.

    Returns
    -------
    (limit_mag, rms_adu)
        Instrumental (per second) when ``zero_point_mag`` is NaN. NaN when the box has too few
        usable pixels.
    """
    from astropy.stats import sigma_clipped_stats

    ny, nx = data.shape
    h = box_px // 2
    ix, iy = int(round(x_px)), int(round(y_px))
    x0, x1, y0, y1 = max(ix - h, 0), min(ix + h + 1, nx), max(iy - h, 0), min(iy + h + 1, ny)
    if x1 - x0 < 8 or y1 - y0 < 8 or not exptime_s:
        return float("nan"), float("nan")
    cut = np.asarray(data[y0:y1, x0:x1], float)
    good = np.isfinite(cut)
    if mask is not None:
        good &= ~np.asarray(mask[y0:y1, x0:x1], bool)
    if good.sum() < 50:
        return float("nan"), float("nan")
    _, _, rms = sigma_clipped_stats(cut[good], sigma=3.0, maxiters=10)
    r = 1.3 * fwhm_px
    flux = nsigma * rms * math.sqrt(math.pi) * r
    if not flux > 0:
        return float("nan"), float(rms)
    m = -2.5 * math.log10(flux / exptime_s)
    if math.isfinite(zero_point_mag):
        m = m - extinction_mag + zero_point_mag
    return float(m), float(rms)


# =============================================================================== time
def mid_exposure_mjd(mjd_obs: float | None, exptime_s: float | None) -> float:
    """MJD (UTC) of mid-exposure; NaN when the start is unknown."""
    if mjd_obs is None or not math.isfinite(float(mjd_obs)):
        return float("nan")
    return float(mjd_obs) + 0.5 * float(exptime_s or 0.0) / 86400.0


def bjd_tdb(
    mjd_utc,
    ra_deg: float,
    dec_deg: float,
    *,
    latitude_deg: float | None = None,
    longitude_deg: float | None = None,
    elevation_m: float = 0.0,
):
    """
    Barycentric Julian Date (TDB) of UTC times for light from a sky position.

    UTC -> TAI -> TT (ERFA, leap seconds included) -> TDB (``erfa.dtdb``); plus the Roemer delay
    ``r . n / c`` of the Earth's barycentric position (``erfa.epv00``) and, when the site is
    given, of the observatory's geocentric position (Earth rotation from the apparent sidereal
    time, UT1 ~ UTC; precession-nutation ``erfa.pnm06a``). Shapiro and Einstein terms of the
    target and polar motion are neglected (< 0.1 ms). No IERS table and no network is needed.

    Parameters
    ----------
    mjd_utc : float or array_like
        UTC times (MJD), e.g. mid-exposure.
    ra_deg, dec_deg : float
        ICRS position of the target.
    latitude_deg, longitude_deg, elevation_m : float, optional
        Site (geodetic, east-positive); geocentric (error <= 21 ms) when omitted.

    Returns
    -------
    numpy.ndarray or float
        BJD_TDB (full Julian date), the shape of ``mjd_utc``.
    """
    import erfa

    scalar = np.ndim(mjd_utc) == 0
    mjd = np.atleast_1d(np.asarray(mjd_utc, float))
    out = np.full(mjd.shape, np.nan)
    ok = np.isfinite(mjd)
    if not ok.any():
        return float(out[0]) if scalar else out
    m = mjd[ok]
    tai1, tai2 = erfa.utctai(np.full_like(m, 2400000.5), m)
    tt1, tt2 = erfa.taitt(tai1, tai2)
    lon = math.radians(longitude_deg or 0.0)
    u = v = 0.0
    site = latitude_deg is not None and longitude_deg is not None
    if site:
        xyz = erfa.gd2gc(1, lon, math.radians(latitude_deg), float(elevation_m))
        u, v = math.hypot(xyz[0], xyz[1]) / 1000.0, xyz[2] / 1000.0
    dtdb = erfa.dtdb(tt1, tt2, np.mod(m, 1.0), lon, u, v)
    tdb2 = tt2 + dtdb / 86400.0
    _, pvb = erfa.epv00(tt1, tdb2)
    ra, dec = math.radians(ra_deg), math.radians(dec_deg)
    n = np.array([math.cos(dec) * math.cos(ra), math.cos(dec) * math.sin(ra), math.sin(dec)])
    delay_s = (pvb["p"] @ n) * _AU_LIGHT_S
    if site:
        gast = erfa.gst06a(np.full_like(m, 2400000.5), m, tt1, tt2)
        c, s = np.cos(gast), np.sin(gast)
        tod = np.stack([c * xyz[0] - s * xyz[1], s * xyz[0] + c * xyz[1], np.full_like(c, xyz[2])])
        gcrs = np.einsum("nji,jn->ni", erfa.pnm06a(tt1, tt2), tod)
        delay_s = delay_s + (gcrs @ n) / _C_M_S
    out[ok] = tt1 + tdb2 + delay_s / 86400.0
    return float(out[0]) if scalar else out


# =============================================================================== session adapter
def run_targets(workdir, obs, **kwargs) -> dict:
    """The session's targets (`rpp_tasks.stages.target_session.run_targets`; kept here so the
    public import path of phase 1 works)."""
    from rpp_tasks.stages.target_session import run_targets as _run

    return _run(workdir, obs, **kwargs)
