"""WCS fitting in the tangent plane: gnomonic projection, TAN(+SIP) least squares, refinement.

* `tan_project` / `tan_deproject`: standard coordinates about a tangent point.
* `fit_tan_sip`: weighted linear least-squares TAN (+SIP of a given order) from matched pixel/sky
  pairs, with the tangent point re-centred on the image centre.
* `refine_wcs` matches detections to reference stars (offset found by voting, so a starting WCS that
  is off by up to ``max_offset_arcsec`` is recovered) and fits a TAN (+SIP of ``sip_degree``) WCS
  with iterative 3-sigma clipping. It returns the astrometric RMS of the matched stars.

Used by `rpp_tasks.stages.astrometry` (frame step) and `rpp_tasks.stages.platesolve` (solvers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["WcsRefinement", "tan_project", "tan_deproject", "fit_tan_sip", "refine_wcs"]


# =============================================================================== result
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


# =============================================================================== tangent plane
def tan_project(ra_deg, dec_deg, ra0_deg, dec0_deg):
    """Gnomonic (TAN) standard coordinates (xi, eta) in degrees about (ra0, dec0); xi positive
    east."""
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


def fit_tan_sip(x, y, ra, dec, *, crpix0, crval0, degree, weights):
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
    """Most common (dx, dy) = ref - source among pairs closer than max_offset_px (None if no
    peak)."""
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
        0-based pixel positions of detections, brightest first preferred (``weights`` order is
        kept).
    ref_ra, ref_dec : array_like
        Reference positions (deg), brightest first (at the frame's epoch).
    wcs : astropy.wcs.WCS
        Starting WCS (header or plate solution); its error may reach ``max_offset_arcsec``.
    max_offset_arcsec : float
        Largest offset of the starting WCS searched by voting; 0 for a plate solution (no vote,
        matching starts at ``match_radius_arcsec``).
    shape : (ny, nx)
        Image shape (CRPIX of the result is the image centre).
    weights : array_like, optional
        Relative weights of the detections (e.g. S/N**2); uniform when omitted.
    sip_degree : int
        0 or 1 for a plain TAN, >= 2 adds SIP distortion of that order (used only with enough
        matches: at least 6 per free parameter, else a lower order).

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
    if max_offset_arcsec > 0:
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
    else:  # a plate solution: already right to a pixel, no offset to look for
        off = (0.0, 0.0)
    from scipy.spatial import cKDTree

    crpix0 = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    crval0 = [float(v) for v in wcs.all_pix2world([[crpix0[0], crpix0[1]]], 0)[0]]
    px, py = xr - off[0], yr - off[1]  # reference positions predicted in the image
    cur = None
    radius = max(3.0 * match_px, 4.0) if max_offset_arcsec > 0 else max(match_px, 1.0)
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
            cur = fit_tan_sip(
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
