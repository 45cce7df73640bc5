"""Photometric zero point for every photometry type (apertures and PSF) against a reference
catalogue.

Model, for each photometry type ``t`` (``1p1fwhm``, ``1p3fwhm``, ``fixed``, ``psf``)::

    m_ref = m_inst_t - k * X + ZP_t + c_t * colour        (colour term optional)

``m_inst_t`` is the per-second instrumental magnitude of the catalogue, ``k`` the extinction
coefficient of the band (mag/airmass, from the config), ``X`` the airmass computed from the site,
the mid-exposure time and the field centre (precessed to the date, see `airmass`), so ``ZP_t`` is
the zero point above the atmosphere.

The fit: pairs within ``match_radius_arcsec`` that are unsaturated, not near the edge, not blended,
with S/N above ``min_snr`` and a reference magnitude in range -> iterative sigma clipping (median /
MAD) -> residual cut ``|delta - median| <= max_residual_mag`` -> final weighted least squares
(weights ``1 / (err_inst^2 + err_ref^2 + 0.01^2)``, error scaled by the reduced chi^2 when > 1).
Calibrated magnitudes ``mag_cal_<t> = mag_<t> - k X + ZP_t (+ c_t colour)`` carry the zero-point
uncertainty: ``mag_cal_err_<t> = hypot(mag_err_<t>, zp_err_t)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ZeroPointResult",
    "ZeroPointSet",
    "PHOT_TYPES",
    "measure_zero_point",
    "airmass",
    "calibrate_catalog",
]

log = logging.getLogger(__name__)

PHOT_TYPES = ("1p1fwhm", "1p3fwhm", "fixed", "psf")
_FLOOR_MAG = 0.01


@dataclass(frozen=True)
class ZeroPointResult:
    """Zero point of one photometry type. NaN values and a flag when it cannot be measured."""

    zp_mag: float
    zp_err_mag: float
    n_used: int
    n_rejected: int
    rms_mag: float = float("nan")
    colour_term: float | None = None
    colour_term_err: float | None = None
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        def f(v):
            return None if v is None or not math.isfinite(v) else round(float(v), 6)

        return {
            "zp_mag": f(self.zp_mag),
            "zp_err_mag": f(self.zp_err_mag),
            "n_used": self.n_used,
            "n_rejected": self.n_rejected,
            "rms_mag": f(self.rms_mag),
            "colour_term": f(self.colour_term),
            "colour_term_err": f(self.colour_term_err),
            "flags": list(self.flags),
        }


@dataclass(frozen=True)
class ZeroPointSet:
    """Zero points of every photometry type of one frame, plus the context of the fit."""

    per_type: dict
    band: str | None
    ref_catalog: str | None
    ref_band: str | None
    airmass: float
    extinction_k_mag: float
    n_matched: int
    flags: tuple[str, ...] = ()

    @property
    def primary(self) -> ZeroPointResult | None:
        """PSF zero point when measured, else the 1.3 FWHM aperture."""
        for t in ("psf", "1p3fwhm", "1p1fwhm", "fixed"):
            r = self.per_type.get(t)
            if r is not None and math.isfinite(r.zp_mag):
                return r
        return None

    def to_dict(self) -> dict:
        p = self.primary
        return {
            "band": self.band,
            "ref_catalog": self.ref_catalog,
            "ref_band": self.ref_band,
            "airmass": None if not math.isfinite(self.airmass) else round(self.airmass, 5),
            "extinction_k_mag": self.extinction_k_mag,
            "n_matched": self.n_matched,
            "zp_mag": p.to_dict()["zp_mag"] if p else None,
            "zp_err_mag": p.to_dict()["zp_err_mag"] if p else None,
            "n_zp_stars": p.n_used if p else 0,
            "types": {t: r.to_dict() for t, r in self.per_type.items()},
            "flags": list(self.flags),
        }


def _empty(flag, n=0):
    return ZeroPointResult(float("nan"), float("nan"), n, 0, flags=(flag,))


def measure_zero_point(
    instr_mag,
    ref_mag,
    *,
    instr_err=None,
    ref_err=None,
    colour=None,
    extinction_mag: float = 0.0,
    clip_sigma: float = 3.0,
    max_residual_mag: float = 0.25,
    min_stars: int = 5,
    colour_term: bool = False,
) -> ZeroPointResult:
    """
    Zero point ``ref_mag - (instr_mag - extinction_mag)`` with clipping, a residual cut and a final
    fit.

    Parameters
    ----------
    instr_mag, ref_mag : array_like
        Matched instrumental (per second) and reference magnitudes, same shape.
    instr_err, ref_err : array_like, optional
        Their uncertainties (weights of the final fit); unit weights when omitted.
    colour : array_like, optional
        Reference colour of each star (needed when ``colour_term``).
    extinction_mag : float
        ``k * airmass`` subtracted from the instrumental magnitudes.
    clip_sigma : float
        Sigma-clipping threshold (scale from the MAD).
    max_residual_mag : float
        Residual cut applied after clipping, before the final fit.
    min_stars : int
        Fewer usable stars -> NaN result with flag ``"too_few_stars"``.
    colour_term : bool
        Fit ``delta = zp + c * colour``; ``zp`` is then the zero point at colour 0.

    Returns
    -------
    ZeroPointResult
    """
    instr = np.asarray(instr_mag, float)
    ref = np.asarray(ref_mag, float)
    if instr.shape != ref.shape:
        raise ValueError(
            f"instr_mag and ref_mag must have the same shape, got {instr.shape} and {ref.shape}"
        )
    if clip_sigma <= 0 or max_residual_mag <= 0 or min_stars < 1:
        raise ValueError("clip_sigma and max_residual_mag must be > 0 and min_stars >= 1")
    e_i = np.zeros_like(instr) if instr_err is None else np.asarray(instr_err, float)
    e_r = np.zeros_like(ref) if ref_err is None else np.asarray(ref_err, float)
    col = None if colour is None else np.asarray(colour, float)
    if colour_term and col is None:
        raise ValueError("colour_term=True needs colour")
    delta = ref - (instr - extinction_mag)
    ok = np.isfinite(delta)
    if colour_term:
        ok &= np.isfinite(col)
    n_ok = int(ok.sum())
    if n_ok < min_stars:
        return _empty("too_few_stars", n_ok)
    sel = ok.copy()
    for _ in range(10):
        med = np.median(delta[sel])
        mad = 1.4826 * np.median(np.abs(delta[sel] - med))
        scale = max(mad, 1e-4)
        new = ok & (np.abs(delta - med) <= clip_sigma * scale)
        if new.sum() < min_stars or np.array_equal(new, sel):
            sel = new if new.sum() >= min_stars else sel
            break
        sel = new
    med = np.median(delta[sel])
    sel &= np.abs(delta - med) <= max_residual_mag
    n_used = int(sel.sum())
    if n_used < min_stars:
        return _empty("too_few_stars", n_used)
    var = (
        np.where(np.isfinite(e_i), e_i, 0.05) ** 2
        + np.where(np.isfinite(e_r), e_r, 0.05) ** 2
        + _FLOOR_MAG**2
    )
    w = 1.0 / var[sel]
    d = delta[sel]
    if colour_term:
        a = np.column_stack([np.ones(n_used), col[sel]])
        aw = a * w[:, None]
        cov = np.linalg.inv(a.T @ aw)
        beta = cov @ (aw.T @ d)
        resid = d - a @ beta
        chi2 = float(np.sum(w * resid**2) / max(n_used - 2, 1))
        cov = cov * max(chi2, 1.0)
        zp, zp_err = float(beta[0]), float(math.sqrt(cov[0, 0]))
        c, c_err = float(beta[1]), float(math.sqrt(cov[1, 1]))
    else:
        zp = float(np.sum(w * d) / np.sum(w))
        resid = d - zp
        chi2 = float(np.sum(w * resid**2) / max(n_used - 1, 1))
        zp_err = float(math.sqrt(max(chi2, 1.0) / np.sum(w)))
        c = c_err = None
    rms = float(np.std(resid, ddof=1)) if n_used > 1 else float("nan")
    return ZeroPointResult(zp, zp_err, n_used, n_ok - n_used, rms, c, c_err)


def airmass(
    ra_deg: float, dec_deg: float, mjd: float, *, latitude_deg: float, longitude_deg: float
) -> float:
    """
    Airmass of an ICRS position at a time (MJD, UTC) and site (Kasten & Young 1989), NaN below the
    horizon.

    The position is moved to the true equator and equinox of the date (IAU 2006/2000A
    bias-precession-nutation, ``erfa.pnm06a``) and the hour angle taken from the Greenwich apparent
    sidereal time (``erfa.gst06a``, UT1 ~ UTC, TT = UTC + 69.184 s): without precession a J2000
    position is ~0.35 deg off in 2025, which moves a field at 25 deg altitude by 0.03 in airmass.
    No IERS tables or network are needed (agrees with astropy's AltAz to ~1e-3 in airmass).
    Longitude is east-positive.
    """
    if not all(np.isfinite(v) for v in (ra_deg, dec_deg, mjd)):
        return float("nan")
    import erfa

    tt = mjd + 69.184 / 86400.0
    v = erfa.pnm06a(2400000.5, tt) @ erfa.s2c(math.radians(ra_deg), math.radians(dec_deg))
    ra_t, dec_t = erfa.c2s(v)
    gast = erfa.gst06a(2400000.5, mjd, 2400000.5, tt)
    ha = (gast + math.radians(longitude_deg) - float(ra_t)) % (2 * math.pi)
    lat, dec = math.radians(latitude_deg), float(dec_t)
    sin_alt = math.sin(lat) * math.sin(dec) + math.cos(lat) * math.cos(dec) * math.cos(ha)
    alt = math.degrees(math.asin(max(-1.0, min(1.0, sin_alt))))
    if alt <= 0:
        return float("nan")
    return 1.0 / (math.sin(math.radians(alt)) + 0.50572 * (alt + 6.07995) ** -1.6364)


def calibrate_catalog(
    cat,
    ref,
    *,
    band: str | None,
    ref_band: str,
    ref_catalog: str | None = None,
    airmass_value: float = float("nan"),
    extinction_k_mag: float = 0.0,
    match_radius_arcsec: float = 2.0,
    clip_sigma: float = 3.0,
    max_residual_mag: float = 0.25,
    min_stars: int = 5,
    min_snr: float = 20.0,
    ref_mag_range=(8.0, 19.0),
    colour_term: bool = False,
    types=PHOT_TYPES,
):
    """
    Match a photometry catalogue to reference stars, fit a zero point per photometry type and add
    calibrated magnitudes.

    Parameters
    ----------
    cat : astropy.table.Table
        Photometry catalogue (``ra``, ``dec``, ``mag_<t>``, ``mag_err_<t>``, ``snr_<t>``, flags).
    ref : astropy.table.Table
        Normalised reference table (`rpp_tasks.stages.catalogs`) with ``mag_<ref_band>``.
    airmass_value, extinction_k_mag : float
        ``k * X`` is applied when the airmass is finite (else 0, flag ``"no_airmass"``).

    Returns
    -------
    (Table, ZeroPointSet)
        A copy of ``cat`` with ``ref_mag``, ``ref_sep_arcsec``, ``zp_star`` and for each type
        ``mag_cal_<t>``/``mag_cal_err_<t>`` (NaN when that zero point failed), and the fits.
    """
    from rpp_tasks.stages.catalogs import match_catalogs

    out = cat.copy(copy_data=True)
    n = len(out)
    flags: list[str] = []
    kx = extinction_k_mag * airmass_value if math.isfinite(airmass_value) else 0.0
    if not math.isfinite(airmass_value):
        flags.append("no_airmass")
    col_ref = f"mag_{ref_band}"
    if ref is None or len(ref) == 0 or col_ref not in ref.colnames or "ra" not in out.colnames:
        flags.append("no_reference")
        for t in types:
            out[f"mag_cal_{t}"] = np.full(n, np.nan)
            out[f"mag_cal_err_{t}"] = np.full(n, np.nan)
        out["ref_mag"] = np.full(n, np.nan)
        zps = {t: _empty("no_reference") for t in types}
        return out, ZeroPointSet(
            zps, band, ref_catalog, ref_band, airmass_value, extinction_k_mag, 0, tuple(flags)
        )
    idx, sep = match_catalogs(
        out["ra"], out["dec"], ref["ra"], ref["dec"], radius_arcsec=match_radius_arcsec
    )
    has = idx >= 0
    ref_mag = np.full(n, np.nan)
    ref_err = np.full(n, np.nan)
    colour = np.full(n, np.nan)
    ref_mag[has] = np.asarray(ref[col_ref], float)[idx[has]]
    if f"mag_err_{ref_band}" in ref.colnames:
        ref_err[has] = np.asarray(ref[f"mag_err_{ref_band}"], float)[idx[has]]
    if "mag_BP" in ref.colnames and "mag_RP" in ref.colnames:
        colour[has] = (np.asarray(ref["mag_BP"], float) - np.asarray(ref["mag_RP"], float))[
            idx[has]
        ]
    elif "mag_g" in ref.colnames and "mag_r" in ref.colnames:
        colour[has] = (np.asarray(ref["mag_g"], float) - np.asarray(ref["mag_r"], float))[idx[has]]
    out["ref_mag"] = ref_mag
    out["ref_sep_arcsec"] = sep
    base = (
        has & np.isfinite(ref_mag) & (ref_mag >= ref_mag_range[0]) & (ref_mag <= ref_mag_range[1])
    )
    for name in ("saturated", "near_edge", "blended"):
        if name in out.colnames:
            base &= ~np.asarray(out[name], bool)
    # a reference star with two detections inside the radius is ambiguous: drop both
    if has.any():
        u, cnt = np.unique(idx[has], return_counts=True)
        dup = np.isin(idx, u[cnt > 1])
        base &= ~dup
    zps = {}
    used_any = np.zeros(n, bool)
    for t in types:
        mcol, ecol, scol = f"mag_{t}", f"mag_err_{t}", f"snr_{t}"
        if mcol not in out.colnames:
            zps[t] = _empty("no_photometry")
            out[f"mag_cal_{t}"] = np.full(n, np.nan)
            out[f"mag_cal_err_{t}"] = np.full(n, np.nan)
            continue
        m = np.asarray(out[mcol], float)
        e = np.asarray(out[ecol], float) if ecol in out.colnames else np.full(n, np.nan)
        s = np.asarray(out[scol], float) if scol in out.colnames else np.full(n, np.inf)
        use = base & np.isfinite(m) & (s >= min_snr)
        res = measure_zero_point(
            m[use],
            ref_mag[use],
            instr_err=e[use],
            ref_err=ref_err[use],
            colour=colour[use],
            extinction_mag=kx,
            clip_sigma=clip_sigma,
            max_residual_mag=max_residual_mag,
            min_stars=min_stars,
            colour_term=colour_term and np.isfinite(colour[use]).sum() >= min_stars,
        )
        zps[t] = res
        cal = m - kx + res.zp_mag
        if res.colour_term is not None:
            cal = cal + res.colour_term * np.where(np.isfinite(colour), colour, 0.0)
        out[f"mag_cal_{t}"] = cal
        out[f"mag_cal_err_{t}"] = np.hypot(e, res.zp_err_mag)
        if math.isfinite(res.zp_mag):
            d = ref_mag - (m - kx) - res.zp_mag
            used_any |= use & (np.abs(d) <= max_residual_mag)
        log.debug(
            "zero point %s: %.4f +- %.4f (%d stars)", t, res.zp_mag, res.zp_err_mag, res.n_used
        )
    out["zp_star"] = used_any
    out.meta["zero_point"] = {t: r.to_dict() for t, r in zps.items()}
    return out, ZeroPointSet(
        zps,
        band,
        ref_catalog,
        ref_band,
        airmass_value,
        extinction_k_mag,
        int(has.sum()),
        tuple(flags),
    )
