"""The observer's target in one frame: its measurement (or upper limit) and its times.

* `measure_target` -- the target's row of a reduced frame's catalogue, found by position (match
  distance recorded): calibrated magnitude +- error for every photometry type, S/N, flags, or an
  upper limit when it is not detected;
* `limiting_mag_at` -- the 5-sigma limiting magnitude at a position from the local background noise;
* `mid_exposure_mjd`, `bjd_tdb` -- mid-exposure time and barycentric Julian date (TDB) towards a
  sky position (ERFA only: no IERS download, no network).

Pure functions (no file I/O). Re-exported by `rpp_tasks.stages.target`, the public import path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "PHOT_TYPES",
    "TargetMeasurement",
    "measure_target",
    "limiting_mag_at",
    "mid_exposure_mjd",
    "bjd_tdb",
]

PHOT_TYPES = ("psf", "1p3fwhm", "1p1fwhm", "fixed")
_AU_LIGHT_S = 499.004783836  # light time for 1 au (s)
_C_M_S = 299792458.0


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
