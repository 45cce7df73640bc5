"""Astrometry: plate solving with a local astrometry.net and WCS refinement against a reference catalogue.

* `solve_field` runs ``solve-field`` on an x/y list of our detections (no image: fast), with scale
  and position hints and a hard timeout (``--cpulimit`` and a killed process group). Index files:
  the Debian packages ``astrometry-data-tycho2-07 … -10-19`` (Tycho-2, quads of 22 arcmin to 33
  deg: fields of ~30 arcmin and wider). For smaller fields a site downloads the 4100/5200-series
  index files covering its field size (``index-52xx`` from data.astrometry.net, e.g. ``5203``-``5206``
  for 8-30 arcmin fields, only the HEALPix tiles of its sky) into a folder and lists it in
  ``stages.astrometry.index_dirs``.
* `refine_wcs` matches detections to reference stars (offset found by voting, so a header WCS that
  is off by up to ``max_offset_arcsec`` is recovered) and fits a TAN (+SIP of ``sip_degree``) WCS by
  linear least squares in the tangent plane, with iterative 3-sigma clipping. It returns the
  astrometric RMS of the matched stars.
* `run_astrometry` is the per-frame step: skip the solve when the header WCS is valid (unless
  forced), keep the header WCS when a forced solve fails, refine against Gaia when the reference is
  available, and write the WCS (``WCSSRC``, ``ASTRMS``, ``ASTNMAT`` cards) into the header.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "SolveResult",
    "WcsRefinement",
    "AstrometryResult",
    "solve_field",
    "refine_wcs",
    "run_astrometry",
    "write_wcs_to_header",
    "tan_project",
    "tan_deproject",
]

log = logging.getLogger(__name__)

_WCS_PREFIXES = (
    "CTYPE",
    "CRVAL",
    "CRPIX",
    "CDELT",
    "CROTA",
    "CUNIT",
    "CD1_",
    "CD2_",
    "PC1_",
    "PC2_",
    "A_",
    "B_",
    "AP_",
    "BP_",
    "LONPOLE",
    "LATPOLE",
    "RADESYS",
    "EQUINOX",
    "WCSAXES",
    "PV1_",
    "PV2_",
    "IMAGEW",
    "IMAGEH",
)


# =============================================================================== results
@dataclass(frozen=True)
class SolveResult:
    """``status``: ``solved``, ``failed`` (with reason), ``timeout`` or ``unavailable``."""

    wcs: object | None
    status: str
    reason: str | None = None
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "wall_s": round(self.wall_s, 3)}


@dataclass(frozen=True)
class WcsRefinement:
    """Refined WCS (None when the refinement failed; see ``flags``)."""

    wcs: object | None
    rms_px: float
    rms_arcsec: float
    n_matches: int
    n_rejected: int
    shift_px: tuple[float, float] = (float("nan"), float("nan"))
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        def f(v):
            return None if not math.isfinite(v) else round(float(v), 5)

        return {
            "rms_px": f(self.rms_px),
            "rms_arcsec": f(self.rms_arcsec),
            "n_matches": self.n_matches,
            "n_rejected": self.n_rejected,
            "shift_px": [f(self.shift_px[0]), f(self.shift_px[1])],
            "flags": list(self.flags),
        }


@dataclass(frozen=True)
class AstrometryResult:
    wcs_source: (
        str  # "header" | "astrometry.net" | "header+refined" | "astrometry.net+refined" | "none"
    )
    wcs_status: str
    astrometric_rms_arcsec: float | None
    n_matches: int
    solve: dict | None = None
    refine: dict | None = None
    reference: dict | None = None
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "wcs_source": self.wcs_source,
            "wcs_status": self.wcs_status,
            "astrometric_rms_arcsec": self.astrometric_rms_arcsec,
            "n_astrometric_matches": self.n_matches,
            "solve": self.solve,
            "refine": self.refine,
            "reference": self.reference,
            "flags": list(self.flags),
        }


# =============================================================================== tangent plane
def tan_project(ra_deg, dec_deg, ra0_deg, dec0_deg):
    """Gnomonic (TAN) standard coordinates (xi, eta) in degrees about (ra0, dec0); xi positive east."""
    a, d = np.radians(np.asarray(ra_deg, float)), np.radians(np.asarray(dec_deg, float))
    a0, d0 = math.radians(ra0_deg), math.radians(dec0_deg)
    cosc = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / cosc
    eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a - a0)) / cosc
    return np.degrees(xi), np.degrees(eta)


def tan_deproject(xi_deg, eta_deg, ra0_deg, dec0_deg):
    """Inverse of `tan_project`."""
    x, y = np.radians(np.asarray(xi_deg, float)), np.radians(np.asarray(eta_deg, float))
    d0 = math.radians(dec0_deg)
    rho = np.hypot(x, y)
    c = np.arctan(rho)
    with np.errstate(invalid="ignore", divide="ignore"):
        dec = np.where(
            rho > 0,
            np.arcsin(
                np.cos(c) * np.sin(d0) + y * np.sin(c) * np.cos(d0) / np.where(rho > 0, rho, 1)
            ),
            d0,
        )
        ra = math.radians(ra0_deg) + np.arctan2(
            x * np.sin(c), rho * np.cos(d0) * np.cos(c) - y * np.sin(d0) * np.sin(c)
        )
    return np.degrees(ra) % 360.0, np.degrees(dec)


def _poly_terms(u, v, degree):
    return [(p, q) for n in range(degree + 1) for p in range(n, -1, -1) for q in [n - p]]


def _design(u, v, degree):
    terms = _poly_terms(u, v, degree)
    return np.column_stack([u**p * v**q for p, q in terms]), terms


def _build_wcs(crval, crpix0, cd, a=None, b=None, ap=None, bp=None):
    from astropy.wcs import WCS, Sip

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"] if a is None else ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [float(crval[0]) % 360.0, float(crval[1])]
    w.wcs.crpix = [crpix0[0] + 1.0, crpix0[1] + 1.0]
    w.wcs.cd = np.asarray(cd, float)
    w.wcs.radesys = "ICRS"
    if a is not None:
        w.sip = Sip(a, b, ap, bp, w.wcs.crpix)
    w.wcs.set()
    return w


def _fit_tan_sip(x, y, ra, dec, *, crpix0, crval0, degree, weights):
    """Weighted linear least-squares TAN(+SIP) fit with the tangent point re-centred (3 passes)."""
    u, v = x - crpix0[0], y - crpix0[1]
    deg = max(1, int(degree))
    A, terms = _design(u, v, deg)
    sw = np.sqrt(weights)
    crval = np.array(crval0, float)
    for _ in range(3):
        xi, eta = tan_project(ra, dec, crval[0], crval[1])
        cx, *_ = np.linalg.lstsq(A * sw[:, None], xi * sw, rcond=None)
        cy, *_ = np.linalg.lstsq(A * sw[:, None], eta * sw, rcond=None)
        ra_c, dec_c = tan_deproject(cx[0], cy[0], crval[0], crval[1])
        if abs(cx[0]) < 1e-10 and abs(cy[0]) < 1e-10:
            break
        crval = np.array([float(ra_c), float(dec_c)])
    ix = {t: i for i, t in enumerate(terms)}
    cd = np.array([[cx[ix[(1, 0)]], cx[ix[(0, 1)]]], [cy[ix[(1, 0)]], cy[ix[(0, 1)]]]])
    if deg < 2:
        return _build_wcs(crval, crpix0, cd)
    cdi = np.linalg.inv(cd)
    a = np.zeros((deg + 1, deg + 1))
    b = np.zeros((deg + 1, deg + 1))
    for (p, q), i in ix.items():
        if p + q >= 2:
            ab = cdi @ np.array([cx[i], cy[i]])
            a[p, q], b[p, q] = ab
    # inverse polynomials (AP, BP) fitted on a grid covering the data
    gu = np.linspace(u.min() - 10, u.max() + 10, 25)
    gv = np.linspace(v.min() - 10, v.max() + 10, 25)
    uu, vv = (g.ravel() for g in np.meshgrid(gu, gv))
    fu = sum(a[p, q] * uu**p * vv**q for p in range(deg + 1) for q in range(deg + 1) if p + q >= 2)
    fv = sum(b[p, q] * uu**p * vv**q for p in range(deg + 1) for q in range(deg + 1) if p + q >= 2)
    U, V = uu + fu, vv + fv
    Ai, iterms = _design(U, V, deg)
    iu, *_ = np.linalg.lstsq(Ai, uu - U, rcond=None)
    iv, *_ = np.linalg.lstsq(Ai, vv - V, rcond=None)
    ap = np.zeros((deg + 1, deg + 1))
    bp = np.zeros((deg + 1, deg + 1))
    for (p, q), c1, c2 in zip(iterms, iu, iv):
        ap[p, q], bp[p, q] = c1, c2
    return _build_wcs(crval, crpix0, cd, a, b, ap, bp)


# =============================================================================== refinement
def _vote_offset(xs, ys, xr, yr, max_offset_px, bin_px):
    """Most common (dx, dy) = ref - source among pairs closer than max_offset_px (None if no peak)."""
    from scipy.spatial import cKDTree

    tree = cKDTree(np.column_stack([xr, yr]))
    pairs = tree.query_ball_point(np.column_stack([xs, ys]), r=max_offset_px)
    dx = np.concatenate([xr[p] - x for p, x in zip(pairs, xs)]) if len(pairs) else np.zeros(0)
    dy = np.concatenate([yr[p] - y for p, y in zip(pairs, ys)]) if len(pairs) else np.zeros(0)
    if dx.size == 0:
        return None, 0
    nb = max(1, int(math.ceil(2 * max_offset_px / bin_px)))
    h, ex, ey = np.histogram2d(dx, dy, bins=nb, range=[[-max_offset_px, max_offset_px]] * 2)
    # 2x2 box sum so a peak split over bins is found
    hs = h.copy()
    hs[:-1, :] += h[1:, :]
    hs[:, :-1] += hs[:, 1:].copy()
    i, j = np.unravel_index(np.argmax(hs), hs.shape)
    cx, cy = ex[i + 1], ey[j + 1]
    near = (np.abs(dx - cx) <= 1.5 * bin_px) & (np.abs(dy - cy) <= 1.5 * bin_px)
    if near.sum() < 3:
        return None, int(near.sum())
    return (float(np.median(dx[near])), float(np.median(dy[near]))), int(near.sum())


def refine_wcs(
    x,
    y,
    ref_ra,
    ref_dec,
    wcs,
    *,
    shape,
    weights=None,
    match_radius_arcsec: float = 3.0,
    max_offset_arcsec: float = 120.0,
    sip_degree: int = 2,
    min_matches: int = 8,
    max_sources: int = 400,
    max_refs: int = 1000,
    clip_sigma: float = 3.0,
) -> WcsRefinement:
    """
    Refine a WCS by matching detections to reference stars and fitting TAN(+SIP).

    Parameters
    ----------
    x, y : array_like
        0-based pixel positions of detections, brightest first preferred (``weights`` order is kept).
    ref_ra, ref_dec : array_like
        Reference positions (deg), brightest first (at the frame's epoch).
    wcs : astropy.wcs.WCS
        Starting WCS (header or plate solution); its error may reach ``max_offset_arcsec``.
    shape : (ny, nx)
        Image shape (CRPIX of the result is the image centre).
    weights : array_like, optional
        Relative weights of the detections (e.g. S/N**2); uniform when omitted.
    sip_degree : int
        0 or 1 for a plain TAN, >= 2 adds SIP distortion of that order (used only with enough matches:
        at least 6 per free parameter, else a lower order).

    Returns
    -------
    WcsRefinement
        ``wcs`` None and a flag (``too_few_matches``, ``no_offset_peak``) when it failed.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    ra, dec = np.asarray(ref_ra, float), np.asarray(ref_dec, float)
    if x.shape != y.shape or ra.shape != dec.shape:
        raise ValueError("x/y and ref_ra/ref_dec must have matching shapes")
    w_src = np.ones_like(x) if weights is None else np.asarray(weights, float)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(w_src) & (w_src > 0)
    x, y, w_src = x[ok][:max_sources], y[ok][:max_sources], w_src[ok][:max_sources]
    ny, nx = shape
    scale_arcsec = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)
    nan2 = (float("nan"), float("nan"))
    fail = lambda flag, n=0: WcsRefinement(None, float("nan"), float("nan"), n, 0, nan2, (flag,))  # noqa: E731
    okr = np.isfinite(ra) & np.isfinite(dec)
    ra, dec = ra[okr], dec[okr]
    if x.size < min_matches or ra.size < min_matches:
        return fail("too_few_matches")
    xr, yr = (
        wcs.all_world2pix(ra, dec, 0, quiet=True)
        if wcs.sip is not None
        else wcs.wcs_world2pix(ra, dec, 0)
    )
    max_off_px = max_offset_arcsec / scale_arcsec
    inside = (
        (xr > -max_off_px) & (xr < nx + max_off_px) & (yr > -max_off_px) & (yr < ny + max_off_px)
    )
    ra, dec, xr, yr = (
        ra[inside][:max_refs],
        dec[inside][:max_refs],
        xr[inside][:max_refs],
        yr[inside][:max_refs],
    )
    if ra.size < min_matches:
        return fail("too_few_matches")
    match_px = match_radius_arcsec / scale_arcsec
    nb = min(x.size, 150)
    off, npk = _vote_offset(
        x[:nb],
        y[:nb],
        xr[: max(nb * 2, 300)],
        yr[: max(nb * 2, 300)],
        max_off_px,
        bin_px=max(2.0 * match_px, 1.5),
    )
    if off is None:
        return fail("no_offset_peak", npk)
    from scipy.spatial import cKDTree

    crpix0 = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    crval0 = [float(v) for v in wcs.all_pix2world([[crpix0[0], crpix0[1]]], 0)[0]]
    px, py = xr - off[0], yr - off[1]  # reference positions predicted in the image
    cur = None
    radius = max(3.0 * match_px, 4.0)
    n_rej = 0
    for it in range(6):
        tree = cKDTree(np.column_stack([x, y]))
        d, j = tree.query(np.column_stack([px, py]), distance_upper_bound=radius)
        hit = np.isfinite(d)
        # one reference per detection: keep the closest
        order = np.argsort(d[hit])
        ri = np.flatnonzero(hit)[order]
        _, first = np.unique(j[ri], return_index=True)
        ri = ri[first]
        si = j[ri]
        if ri.size < min_matches:
            return fail("too_few_matches", int(ri.size))
        deg = int(sip_degree) if sip_degree >= 2 else 1
        while deg >= 2 and ri.size < 6 * (deg + 1) * (deg + 2) / 2:
            deg -= 1
        keep = np.ones(ri.size, bool)
        for _ in range(3):
            cur = _fit_tan_sip(
                x[si[keep]],
                y[si[keep]],
                ra[ri[keep]],
                dec[ri[keep]],
                crpix0=crpix0,
                crval0=crval0,
                degree=deg,
                weights=w_src[si[keep]],
            )
            fx, fy = (
                cur.all_world2pix(ra[ri], dec[ri], 0, quiet=True)
                if cur.sip is not None
                else cur.wcs_world2pix(ra[ri], dec[ri], 0)
            )
            res = np.hypot(fx - x[si], fy - y[si])
            sig = (
                1.4826 * np.median(res[keep]) / 1.1774 if keep.sum() else np.inf
            )  # Rayleigh median -> sigma
            new = res <= max(clip_sigma * sig * 1.5, 0.05)
            if np.array_equal(new, keep) or new.sum() < min_matches:
                break
            keep = new
        n_rej = int((~keep).sum())
        px, py = (
            cur.all_world2pix(ra, dec, 0, quiet=True)
            if cur.sip is not None
            else cur.wcs_world2pix(ra, dec, 0)
        )
        crval0 = [float(v) for v in cur.wcs.crval]
        new_radius = max(match_px, 1.0) if it >= 1 else max(2.0 * match_px, 2.0)
        if it >= 2 and new_radius == radius:
            break
        radius = new_radius
    rms_px = float(np.sqrt(np.mean(res[keep] ** 2)))
    scale_new = float(np.sqrt(abs(np.linalg.det(cur.pixel_scale_matrix))) * 3600.0)
    return WcsRefinement(cur, rms_px, rms_px * scale_new, int(keep.sum()), n_rej, (off[0], off[1]))


# =============================================================================== solve-field
def solve_field(
    x,
    y,
    flux,
    *,
    width: int,
    height: int,
    scale_arcsec: float | None = None,
    scale_tolerance: float = 0.2,
    ra_deg: float | None = None,
    dec_deg: float | None = None,
    radius_deg: float = 3.0,
    timeout_s: float = 30.0,
    index_dirs=(),
    max_stars: int = 200,
    solve_field_cmd: str = "solve-field",
) -> SolveResult:
    """
    Blind or hinted plate solution of an x/y list with a local astrometry.net.

    Parameters
    ----------
    x, y, flux : array_like
        0-based detection positions and fluxes (the brightest ``max_stars`` are used).
    width, height : int
        Image size in pixels.
    scale_arcsec : float, optional
        Pixel-scale hint; searched within ``±scale_tolerance`` (fraction). None: blind in scale.
    ra_deg, dec_deg, radius_deg : float, optional
        Position hint and search radius.
    timeout_s : float
        Hard limit: ``--cpulimit`` and the process group is killed after ``timeout_s + 5`` s.
    index_dirs : sequence of str
        Extra index folders (added to the system ``astrometry.cfg`` paths).

    Returns
    -------
    SolveResult
        ``unavailable`` when ``solve-field`` is not installed; never raises for a failed solve.
    """
    t0 = time.perf_counter()
    exe = shutil.which(solve_field_cmd)
    if exe is None:
        return SolveResult(
            None, "unavailable", "solve-field not installed (apt-get install astrometry.net)"
        )
    x, y, flux = (np.asarray(v, float) for v in (x, y, flux))
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux)
    order = np.argsort(-flux[ok])[:max_stars]
    xs, ys, fs = x[ok][order], y[ok][order], flux[ok][order]
    if xs.size < 5:
        return SolveResult(None, "failed", f"only {xs.size} stars to solve with")
    from astropy.io import fits
    from astropy.wcs import WCS

    with tempfile.TemporaryDirectory(prefix="rpp_solve_") as tmp:
        tmp = Path(tmp)
        xyl = tmp / "xy.fits"
        cols = [
            fits.Column(name="X", format="D", array=xs + 1.0),
            fits.Column(name="Y", format="D", array=ys + 1.0),
            fits.Column(name="FLUX", format="D", array=fs),
        ]
        fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(xyl)
        cmd = [
            exe,
            str(xyl),
            "--width",
            str(int(width)),
            "--height",
            str(int(height)),
            "--x-column",
            "X",
            "--y-column",
            "Y",
            "--sort-column",
            "FLUX",
            "--no-plots",
            "--overwrite",
            "--no-verify",
            "--crpix-center",
            "--tweak-order",
            "2",
            "--cpulimit",
            str(int(math.ceil(timeout_s))),
            "--dir",
            str(tmp),
            "--wcs",
            str(tmp / "out.wcs"),
            "--new-fits",
            "none",
            "--index-xyls",
            "none",
            "--rdls",
            "none",
            "--corr",
            "none",
            "--match",
            "none",
            "--solved",
            str(tmp / "solved"),
            "--temp-dir",
            str(tmp),
            "--axy",
            str(tmp / "xy.axy"),
        ]
        if scale_arcsec and scale_arcsec > 0:
            cmd += [
                "--scale-units",
                "arcsecperpix",
                "--scale-low",
                f"{scale_arcsec * (1 - scale_tolerance):.4f}",
                "--scale-high",
                f"{scale_arcsec * (1 + scale_tolerance):.4f}",
            ]
        if (
            ra_deg is not None
            and dec_deg is not None
            and np.isfinite(ra_deg)
            and np.isfinite(dec_deg)
        ):
            cmd += [
                "--ra",
                f"{ra_deg:.6f}",
                "--dec",
                f"{dec_deg:.6f}",
                "--radius",
                f"{radius_deg:.3f}",
            ]
        dirs = [str(d) for d in index_dirs if d]
        if dirs:
            cfg = tmp / "astrometry.cfg"
            base = Path("/etc/astrometry.cfg")
            text = (
                base.read_text()
                if base.is_file()
                else "autoindex\nadd_path /usr/share/astrometry\n"
            )
            cfg.write_text(text + "\n" + "".join(f"add_path {d}\n" for d in dirs) + "autoindex\n")
            cmd += ["--config", str(cfg)]
        log.debug("solve-field: %s", " ".join(cmd))
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            out, _ = proc.communicate(timeout=timeout_s + 5.0)
        except subprocess.TimeoutExpired:
            with _suppress():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return SolveResult(
                None,
                "timeout",
                f"solve-field did not finish within {timeout_s:g} s",
                time.perf_counter() - t0,
            )
        wcs_path = tmp / "out.wcs"
        if proc.returncode != 0 or not (tmp / "solved").exists() or not wcs_path.exists():
            tail = " ".join(out.decode(errors="replace").split()[-25:])
            why = (
                "no solution within the CPU limit"
                if "cpulimit" in tail.lower() or "time limit" in tail.lower()
                else f"no solution (exit {proc.returncode}): …{tail[-200:]}"
            )
            return SolveResult(None, "failed", why, time.perf_counter() - t0)
        with fits.open(wcs_path) as hdul:
            hdr = hdul[0].header.copy()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = WCS(hdr, relax=True)
    return SolveResult(w, "solved", None, time.perf_counter() - t0)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


# =============================================================================== header
def write_wcs_to_header(
    header, wcs, *, source: str, rms_arcsec: float | None = None, n_matches: int | None = None
):
    """Replace the celestial WCS keywords of ``header`` (in place) by ``wcs``; add provenance cards."""
    for k in list(header.keys()):
        if k.startswith(_WCS_PREFIXES) and k not in ("A_ORDER_",):
            header.remove(k, ignore_missing=True, remove_all=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wh = wcs.to_header(relax=True)
    for k in ("DATE-OBS", "MJD-OBS", "DATEREF", "MJDREF", "MJDREFI", "MJDREFF"):
        wh.remove(k, ignore_missing=True)
    header.update(wh)
    header["WCSSRC"] = (source[:68], "origin of the WCS (rpp astrometry)")
    if rms_arcsec is not None and math.isfinite(rms_arcsec):
        header["ASTRMS"] = (round(float(rms_arcsec), 4), "[arcsec] astrometric RMS vs reference")
    if n_matches is not None:
        header["ASTNMAT"] = (int(n_matches), "reference stars in the astrometric fit")
    return header


# =============================================================================== frame step
def _hint_scale(meta: dict, header) -> float | None:
    s = meta.get("pixel_scale_arcsec")
    if s:
        return float(s)
    try:
        return (
            206.265
            * float(header["XPIXSZ"])
            / float(header["FOCALLEN"])
            * float(header.get("XBINNING", 1))
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def propagate_proper_motion(ref, mjd: float | None, *, ref_epoch_jyear: float = 2016.0):
    """Return (ra, dec) of the reference moved to the frame epoch with ``pmra``/``pmdec`` (mas/yr)."""
    ra, dec = np.asarray(ref["ra"], float), np.asarray(ref["dec"], float)
    if mjd is None or not np.isfinite(mjd) or "pmra" not in ref.colnames:
        return ra, dec
    dt = (2000.0 + (mjd - 51544.5) / 365.25) - ref_epoch_jyear
    pmra = np.nan_to_num(np.asarray(ref["pmra"], float))
    pmdec = np.nan_to_num(np.asarray(ref["pmdec"], float))
    dec2 = dec + pmdec * dt / 3.6e6
    ra2 = ra + pmra * dt / 3.6e6 / np.cos(np.radians(dec))
    return ra2 % 360.0, dec2


def run_astrometry(
    header, sources, shape, *, meta: dict, cfg, setup=None, frame: str = ""
) -> tuple:
    """
    Per-frame astrometry: solve when needed, refine against Gaia, write the WCS into the header.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Updated in place when the WCS changes.
    sources : astropy.table.Table
        Detections (``x_centroid``, ``y_centroid``, ``flux``).
    shape : (ny, nx)
    meta : dict
        FrameMeta dict (pointing ``ra_deg``/``dec_deg``, ``pixel_scale_arcsec``, ``mjd_obs``).
    cfg : AstrometryConfig
    setup : rpp_tasks.stages.catalogs.ServicesSetup, optional
        Services for the reference catalogue (refinement skipped when None).

    Returns
    -------
    (header, AstrometryResult)
    """
    from rpp_tasks.inputs.wcs import header_wcs
    from rpp_tasks.stages import catalogs

    ny, nx = shape
    check = header_wcs(header)
    flags: list[str] = []
    wcs = check.wcs if check.is_valid else None
    source = "header" if wcs is not None else "none"
    solve_info = None
    x = np.asarray(sources["x_centroid"], float)
    y = np.asarray(sources["y_centroid"], float)
    flux = np.asarray(sources["flux"], float) if "flux" in sources.colnames else np.ones_like(x)
    need = cfg.solve == "always" or (cfg.solve == "auto" and wcs is None)
    if need:
        ra_h = meta.get("ra_deg") if meta.get("ra_deg") is not None else check.center_ra_deg
        dec_h = meta.get("dec_deg") if meta.get("dec_deg") is not None else check.center_dec_deg
        sol = solve_field(
            x,
            y,
            flux,
            width=nx,
            height=ny,
            scale_arcsec=_hint_scale(meta, header),
            scale_tolerance=cfg.scale_tolerance,
            ra_deg=ra_h,
            dec_deg=dec_h,
            radius_deg=cfg.search_radius_deg,
            timeout_s=cfg.solve_timeout_s,
            index_dirs=cfg.index_dirs,
            max_stars=cfg.max_stars,
        )
        solve_info = sol.to_dict()
        if sol.wcs is not None:
            wcs, source = sol.wcs, "astrometry.net"
        elif wcs is not None:
            flags.append("forced_solve_failed_kept_header_wcs")
            log.warning(
                "[%s] forced plate solve %s (%s); continuing with the header WCS",
                frame,
                sol.status,
                sol.reason,
            )
        else:
            flags.append("no_wcs")
            log.warning(
                "[%s] plate solve %s: %s; no WCS (catalogue without RA/Dec)",
                frame,
                sol.status,
                sol.reason,
            )
    refine_info = ref_info = None
    rms_arcsec = None
    n_match = 0
    if wcs is not None and cfg.refine and setup is not None:
        scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)
        cra, cdec = (float(v) for v in wcs.all_pix2world([[(nx - 1) / 2, (ny - 1) / 2]], 0)[0])
        radius = 0.5 * math.hypot(nx, ny) * scale / 3600.0 * 1.05 + cfg.max_offset_arcsec / 3600.0
        ref = catalogs.fetch_reference(cra, cdec, radius, catalog="gaia", band="G", setup=setup)
        ref_info = ref.to_dict()
        if ref.ok:
            order = np.argsort(np.asarray(ref.table["mag_G"], float))
            rt = ref.table[order]
            rra, rdec = propagate_proper_motion(rt, meta.get("mjd_obs"))
            sorder = np.argsort(-flux)
            w = np.clip(flux[sorder] / max(np.nanmedian(flux), 1e-9), 0.2, 25.0)
            ref_res = refine_wcs(
                x[sorder],
                y[sorder],
                rra,
                rdec,
                wcs,
                shape=shape,
                weights=w,
                match_radius_arcsec=cfg.match_radius_arcsec,
                max_offset_arcsec=cfg.max_offset_arcsec,
                sip_degree=cfg.sip_degree,
                min_matches=cfg.min_matches,
            )
            refine_info = ref_res.to_dict()
            if ref_res.wcs is not None:
                wcs, source = ref_res.wcs, source + "+refined"
                rms_arcsec, n_match = round(ref_res.rms_arcsec, 4), ref_res.n_matches
            else:
                flags.append("refinement_failed")
        else:
            flags.append("no_reference")
    elif wcs is not None and cfg.refine:
        flags.append("refinement_skipped_no_services")
    if wcs is not None and source != "header":
        write_wcs_to_header(header, wcs, source=source, rms_arcsec=rms_arcsec, n_matches=n_match)
    elif wcs is not None:
        header["WCSSRC"] = ("header", "origin of the WCS (rpp astrometry)")
    new_check = header_wcs(header)
    result = AstrometryResult(
        source,
        new_check.status,
        rms_arcsec,
        n_match,
        solve_info,
        refine_info,
        ref_info,
        tuple(flags),
    )
    return header, result
