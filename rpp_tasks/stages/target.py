"""The observer's target: who it is, where it is, and its magnitude (or upper limit) in a frame.

Pure functions (no file I/O, no config object):

* `parse_coordinates` -- ``"150.1 +2.2"``, ``"10:00:24.5 +02:12:00"``, ``"10h00m24.5s +2d12m"``;
* `resolve_target` -- a name or coordinates -> `Target`: the observatory's configured targets
  (names and aliases, offline), the on-disk name cache, then Sesame (CDS) and SIMBAD TAP through
  the catalogue HTTP client (timeouts, bounded retries, circuit breaker); every failure reason is
  kept in the `TargetResolution`;
* `targets_for_session` -- the targets of a night: the run's parameters, each frame's ``OBJECT``,
  the configured targets inside the field;
* `measure_target`, `limiting_mag_at`, `bjd_tdb`, `mid_exposure_mjd`, `TargetMeasurement` -- the
  target in one frame and its times, in `rpp_tasks.stages.target_measure` (imported from here).

The session's targets (`run_targets`, the ``targets`` stage, and the record step) are in
`rpp_tasks.stages.target_session`; ``rpp_tasks.stages.target.run_targets`` still calls it.
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
from dataclasses import dataclass
from pathlib import Path

from rpp_tasks.config import parse_dec_deg, parse_ra_deg
from rpp_tasks.stages.target_measure import (  # the public import path of both modules
    PHOT_TYPES,
    TargetMeasurement,
    bjd_tdb,
    limiting_mag_at,
    measure_target,
    mid_exposure_mjd,
)

__all__ = [
    "PHOT_TYPES",
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


# =============================================================================== session adapter
def run_targets(workdir, obs, **kwargs) -> dict:
    """The session's targets (`rpp_tasks.stages.target_session.run_targets`; kept here so the
    public import path of phase 1 works)."""
    from rpp_tasks.stages.target_session import run_targets as _run

    return _run(workdir, obs, **kwargs)
