"""Rendering stars for synthetic truth: pixel-integrated circular and elliptical PSFs, and PSFs that
vary across the field.

render_psf_stamps integrates a Gaussian or Moffat profile over each pixel (sub-pixel quadrature,
independent of the pipeline's own PSF code); render_elliptical_moffat_stamps does the same for an
elliptical Moffat; PsfVariation describes FWHM, beta, ellipticity and angle as smooth functions of
position, as real optics do; _bleed_columns spreads the charge of saturated stars along columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

__all__ = [
    "PsfVariation",
    "moffat_alpha_px",
    "psf_encircled_energy",
    "render_elliptical_moffat_stamps",
    "render_psf_stamps",
]

_CHUNK_ELEMENTS = 4_000_000
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_GL2 = np.polynomial.legendre.leggauss(2)
_GL4 = np.polynomial.legendre.leggauss(4)
_MAX_HALF_WIDTH_PX = 64
_MAX_MISSING_ADU = 10.0


# --------------------------------------------------------------------------------------------
# PSF helpers
# --------------------------------------------------------------------------------------------


def moffat_alpha_px(fwhm_px: float, beta: float) -> float:
    """Moffat core width ``alpha`` such that the profile has the given FWHM."""
    return fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def psf_encircled_energy(radius_px, *, psf="gaussian", fwhm_px=3.5, beta=3.0):
    """
    Fraction of the total flux inside a circle of the given radius (continuous PSF).

    Gaussian: ``1 - exp(-r**2 / (2 sigma**2))``; Moffat (``I ∝ (1 + r**2/alpha**2)**-beta``):
    ``1 - (1 + r**2/alpha**2)**(1 - beta)``. Pixel integration is not included (it broadens the
    profile by a 1-px box, a < 1 % effect at r >= 1 FWHM for FWHM >= 3 px).
    """
    r = np.asarray(radius_px, dtype=float)
    _check_psf(psf, fwhm_px, beta)
    if psf == "gaussian":
        sigma = fwhm_px / _FWHM_PER_SIGMA
        return 1.0 - np.exp(-0.5 * (r / sigma) ** 2)
    alpha = moffat_alpha_px(fwhm_px, beta)
    return 1.0 - (1.0 + (r / alpha) ** 2) ** (1.0 - beta)


def _check_psf(psf, fwhm_px, beta):
    if psf not in ("gaussian", "moffat"):
        msg = f"psf must be 'gaussian' or 'moffat', got {psf!r}"
        raise ValueError(msg)
    if not (np.isfinite(fwhm_px) and fwhm_px > 0):
        msg = f"fwhm_px must be > 0, got {fwhm_px!r}"
        raise ValueError(msg)
    if psf == "moffat" and not beta > 1.0:
        msg = f"Moffat beta must be > 1, got {beta!r}"
        raise ValueError(msg)


def _outside_fraction(h_px, psf, fwhm_px, beta):
    """Flux fraction outside the circle inscribed in a stamp of half-width h (upper bound)."""
    return 1.0 - psf_encircled_energy(h_px + 0.5, psf=psf, fwhm_px=fwhm_px, beta=beta)


def _half_width_for_fraction(frac, psf, fwhm_px, beta):
    """Smallest stamp half-width (px) whose inscribed circle leaves at most ``frac`` outside."""
    if psf == "gaussian":
        sigma = fwhm_px / _FWHM_PER_SIGMA
        r = sigma * math.sqrt(-2.0 * math.log(frac))
    else:
        alpha = moffat_alpha_px(fwhm_px, beta)
        r = alpha * math.sqrt(frac ** (1.0 / (1.0 - beta)) - 1.0)
    return max(2, math.ceil(r - 0.5))


def render_psf_stamps(dx_px, dy_px, half_width_px, *, psf="gaussian", fwhm_px=3.5, beta=3.0):
    """
    Pixel-integrated, unit-flux PSF stamps for sub-pixel offsets.

    Parameters
    ----------
    dx_px, dy_px : array_like
        Offsets of the star centres from the central pixel centre, shape (n,), in [-0.5, 0.5].
    half_width_px : int
        Stamp half-width h; stamps are (2h+1, 2h+1), element ``[j, i]`` is the pixel at
        ``(x, y) = (i - h, j - h)`` relative to the central pixel.
    psf, fwhm_px, beta
        PSF model: ``"gaussian"`` (exact erf integration) or ``"moffat"`` (Gauss-Legendre,
        4x4 nodes per pixel within one FWHM of the centre pixel, 2x2 elsewhere).

    Returns
    -------
    stamps : numpy.ndarray
        (n, 2h+1, 2h+1) float64, each summing to the fraction of the flux inside the stamp.
    """
    _check_psf(psf, fwhm_px, beta)
    dx = np.atleast_1d(np.asarray(dx_px, dtype=float))
    dy = np.atleast_1d(np.asarray(dy_px, dtype=float))
    h = int(half_width_px)
    k = np.arange(-h, h + 1, dtype=float)
    if psf == "gaussian":
        scale = 1.0 / (math.sqrt(2.0) * fwhm_px / _FWHM_PER_SIGMA)
        edges = np.arange(-h - 0.5, h + 1.0, 1.0)
        fx = np.diff(0.5 * erf((edges[None, :] - dx[:, None]) * scale), axis=1)
        fy = np.diff(0.5 * erf((edges[None, :] - dy[:, None]) * scale), axis=1)
        return fy[:, :, None] * fx[:, None, :]

    alpha2 = moffat_alpha_px(fwhm_px, beta) ** 2
    norm = (beta - 1.0) / (math.pi * alpha2)

    def integrate(kk, nodes, weights):
        m = nodes.size
        xs = ((kk[:, None] + 0.5 * nodes[None, :]).ravel()[None, :] - dx[:, None]) ** 2
        ys = ((kk[:, None] + 0.5 * nodes[None, :]).ravel()[None, :] - dy[:, None]) ** 2
        u = 1.0 + (ys[:, :, None] + xs[:, None, :]) / alpha2
        if float(beta).is_integer() and beta <= 6:  # repeated products: ~5x faster than pow
            val = u.copy()
            for _ in range(int(beta) - 1):
                val *= u
            np.divide(norm, val, out=val)
        else:
            val = norm * u ** (-beta)
        w = np.outer(0.5 * weights, 0.5 * weights)
        n, size = dx.size, kk.size
        val = val.reshape(n, size, m, size, m) * w[None, None, :, None, :]
        return val.sum(axis=(2, 4))

    stamps = integrate(k, *_GL2)
    hc = min(h, max(1, math.ceil(fwhm_px)))
    stamps[:, h - hc : h + hc + 1, h - hc : h + hc + 1] = integrate(
        np.arange(-hc, hc + 1, dtype=float), *_GL4
    )
    return stamps


def _place(stamps, flux, ix, iy, kk, shape, all_idx, all_vals):
    """Scale unit stamps by ``flux``, keep the pixels inside the image (appended to ``all_idx`` /
    ``all_vals``, flat indices and values) and return each star's flux that landed inside."""
    ny, nx = shape
    px = ix[:, None, None] + kk[None, None, :]
    py = iy[:, None, None] + kk[None, :, None]
    inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    vals = stamps * flux[:, None, None]
    all_idx.append((py * nx + px)[inside])
    all_vals.append(vals[inside])
    return np.where(inside, vals, 0.0).sum(axis=(1, 2))


def _render_stars(shape, x, y, flux_adu, *, psf, fwhm_px, beta, sky_var_adu2, gain_e_per_adu):
    """Add the stars to a float64 image; return (image, rendered flux, peak, CRB flux error)."""
    ny, nx = shape
    n = x.size
    rendered = np.zeros(n)
    peak = np.zeros(n)
    crb_err = np.full(n, np.nan)
    if n == 0:
        return np.zeros(shape), rendered, peak, crb_err

    # stamp tiers: at least 99.5 % inside; brighter stars get larger stamps
    tiers = sorted(
        {
            min(_MAX_HALF_WIDTH_PX, _half_width_for_fraction(f, psf, fwhm_px, beta))
            for f in (5e-3, 1e-3, 1e-4, 1e-5, 1e-6)
        }
    )
    outside = np.array([_outside_fraction(t, psf, fwhm_px, beta) for t in tiers])
    tier_of = np.full(n, len(tiers) - 1)
    for i in range(len(tiers) - 1, -1, -1):
        tier_of[flux_adu * outside[i] <= _MAX_MISSING_ADU] = i

    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    all_idx, all_vals = [], []
    for t, h in enumerate(tiers):
        members = np.flatnonzero(tier_of == t)
        if members.size == 0:
            continue
        size = 2 * h + 1
        kk = np.arange(-h, h + 1)
        chunk = max(1, _CHUNK_ELEMENTS // (size * size * (4 if psf == "moffat" else 1)))
        for start in range(0, members.size, chunk):
            sel = members[start : start + chunk]
            stamps = render_psf_stamps(
                x[sel] - ix[sel], y[sel] - iy[sel], h, psf=psf, fwhm_px=fwhm_px, beta=beta
            )
            f = flux_adu[sel]
            # Cramer-Rao bound on the flux (position known): 1/var = sum P^2 / var_pix
            var_pix = (f[:, None, None] * stamps + sky_var_adu2[0]) / gain_e_per_adu + sky_var_adu2[
                1
            ]
            crb_err[sel] = 1.0 / np.sqrt(np.sum(stamps**2 / var_pix, axis=(1, 2)))
            peak[sel] = f * stamps.reshape(sel.size, -1).max(axis=1)
            rendered[sel] = _place(stamps, f, ix[sel], iy[sel], kk, (ny, nx), all_idx, all_vals)
    image = np.bincount(
        np.concatenate(all_idx), weights=np.concatenate(all_vals), minlength=ny * nx
    )
    return image.reshape(shape), rendered, peak, crb_err


# --------------------------------------------------------------------------------------------
# PSF varying across the field (real optics)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PsfVariation:
    """A PSF that changes smoothly across the field, as the optics of a small telescope make it.

    Everywhere an elliptical Moffat profile. At a normalised distance ``r`` from the optical axis
    (``r = 1`` at half the frame diagonal; the axis sits ``axis_offset_frac`` of the frame size
    away from the frame centre) and polar angle ``phi`` around it:

    * FWHM (geometric mean of the major- and minor-axis FWHM)
      ``fwhm_px * (1 + fwhm_corner_frac * ((1 - q) r**2 + q r**4) + fwhm_tilt_frac * t)`` with
      ``q = fwhm_quartic_share``, ``t`` in [-0.5, 0.5] the position across the frame along
      ``tilt_angle_deg`` (field curvature plus a tilted sensor);
    * ``beta = beta_centre + (beta_corner - beta_centre) * r**beta_power`` (wings change too);
    * ellipticity ``1 - b/a = ellipticity_corner * r**ellipticity_power`` (coma, astigmatism);
    * major axis at ``phi + angle_offset_deg + angle_twist_deg * r`` from the x axis, so the
      orientation turns around the field.

    None of these is a low-order polynomial of ``(x, y)``: a model built from polynomials is
    tested against something it cannot represent exactly, as on real optics.
    """

    fwhm_px: float = 3.5
    fwhm_corner_frac: float = 0.13
    fwhm_quartic_share: float = 0.25
    fwhm_tilt_frac: float = 0.04
    tilt_angle_deg: float = 30.0
    beta_centre: float = 3.3
    beta_corner: float = 2.75
    beta_power: float = 1.5
    ellipticity_corner: float = 0.10
    ellipticity_power: float = 1.5
    angle_offset_deg: float = 0.0
    angle_twist_deg: float = 40.0
    axis_offset_frac: tuple[float, float] = (0.06, -0.04)

    def params_at(self, x, y, shape):
        """Local PSF at pixel positions ``(x, y)`` of a frame of ``shape = (ny, nx)``.

        Returns
        -------
        fwhm_px, beta, ellipticity, theta_rad : numpy.ndarray
            FWHM (geometric mean of the axes, continuous PSF), Moffat beta, ``1 - b/a`` and the
            major-axis angle counter-clockwise from +x (radians).
        """
        ny, nx = (int(shape[0]), int(shape[1]))
        x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        cx = (nx - 1) / 2.0 + self.axis_offset_frac[0] * nx
        cy = (ny - 1) / 2.0 + self.axis_offset_frac[1] * ny
        rnorm = 0.5 * math.hypot(nx, ny)
        r = np.hypot(x - cx, y - cy) / rnorm
        phi = np.arctan2(y - cy, x - cx)
        ta = math.radians(self.tilt_angle_deg)
        t = (
            (x / max(nx - 1, 1) - 0.5) * math.cos(ta) + (y / max(ny - 1, 1) - 0.5) * math.sin(ta)
        ) / (abs(math.cos(ta)) + abs(math.sin(ta)))
        qs = self.fwhm_quartic_share
        curv = (1.0 - qs) * r**2 + qs * r**4
        fwhm = self.fwhm_px * (1.0 + self.fwhm_corner_frac * curv + self.fwhm_tilt_frac * t)
        beta = self.beta_centre + (self.beta_corner - self.beta_centre) * r**self.beta_power
        ell = np.clip(self.ellipticity_corner * r**self.ellipticity_power, 0.0, 0.9)
        theta = phi + math.radians(self.angle_offset_deg) + math.radians(self.angle_twist_deg) * r
        return fwhm, beta, ell, np.mod(theta, math.pi)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["axis_offset_frac"] = list(self.axis_offset_frac)
        return d


def _moffat_shape(fwhm_px, beta, ellipticity, theta_rad):
    """Quadratic-form coefficients ``(A, B, C)`` (1/px**2) and the unit-flux normalisation.

    ``I(dx, dy) = norm * (1 + A dx**2 + 2 B dx dy + C dy**2) ** -beta``.
    """
    fwhm = np.asarray(fwhm_px, float)
    beta = np.asarray(beta, float)
    e = np.asarray(ellipticity, float)
    th = np.asarray(theta_rad, float)
    k = 2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0)
    aa = fwhm / np.sqrt(1.0 - e) / k  # alpha along the major axis
    ab = fwhm * np.sqrt(1.0 - e) / k
    c, s = np.cos(th), np.sin(th)
    ia, ib = 1.0 / aa**2, 1.0 / ab**2
    a_ = c * c * ia + s * s * ib
    c_ = s * s * ia + c * c * ib
    b_ = c * s * (ia - ib)
    norm = (beta - 1.0) / (math.pi * aa * ab)
    return a_, b_, c_, norm, aa


def render_elliptical_moffat_stamps(
    dx_px, dy_px, half_width_px, *, fwhm_px, beta, ellipticity=0.0, theta_rad=0.0
):
    """
    Pixel-integrated, unit-flux elliptical Moffat stamps with per-star shapes.

    Parameters
    ----------
    dx_px, dy_px : array_like
        Offsets of the star centres from the central pixel centre, shape (n,).
    half_width_px : int
        Stamp half-width h; stamps are (n, 2h+1, 2h+1) as in `render_psf_stamps`.
    fwhm_px, beta, ellipticity, theta_rad : float or array_like
        Per star (broadcast to (n,)): FWHM (geometric mean of the axes), Moffat beta,
        ``1 - b/a`` and major-axis angle from +x (radians).

    Returns
    -------
    stamps : numpy.ndarray
        (n, 2h+1, 2h+1) float64; Gauss-Legendre quadrature over each pixel, 4x4 nodes within one
        major-axis FWHM of the centre, 2x2 elsewhere.
    """
    dx = np.atleast_1d(np.asarray(dx_px, dtype=float))
    dy = np.atleast_1d(np.asarray(dy_px, dtype=float))
    n = dx.size
    fw, bt, el, th = (
        np.broadcast_to(np.asarray(v, float), (n,)) for v in (fwhm_px, beta, ellipticity, theta_rad)
    )
    if np.any(~(fw > 0)) or np.any(~(bt > 1.0)) or np.any((el < 0) | (el >= 1)):
        msg = "need fwhm_px > 0, beta > 1 and 0 <= ellipticity < 1 for every star"
        raise ValueError(msg)
    a_, b_, c_, norm, _ = _moffat_shape(fw, bt, el, th)
    h = int(half_width_px)

    def integrate(kk, nodes, weights):
        m = nodes.size
        off = (kk[:, None] + 0.5 * nodes[None, :]).ravel()
        xs = off[None, :] - dx[:, None]
        ys = off[None, :] - dy[:, None]
        q = (
            a_[:, None, None] * (xs * xs)[:, None, :]
            + (2.0 * b_)[:, None, None] * ys[:, :, None] * xs[:, None, :]
            + c_[:, None, None] * (ys * ys)[:, :, None]
        )
        np.log1p(q, out=q)
        q *= -bt[:, None, None]
        np.exp(q, out=q)
        q *= norm[:, None, None]
        w = np.outer(0.5 * weights, 0.5 * weights)
        size = kk.size
        return (q.reshape(n, size, m, size, m) * w[None, None, :, None, :]).sum(axis=(2, 4))

    stamps = integrate(np.arange(-h, h + 1, dtype=float), *_GL2)
    fmax = float(np.max(fw / np.sqrt(1.0 - el)))
    hc = min(h, max(1, math.ceil(fmax)))
    stamps[:, h - hc : h + hc + 1, h - hc : h + hc + 1] = integrate(
        np.arange(-hc, hc + 1, dtype=float), *_GL4
    )
    return stamps


def _render_stars_varying(
    shape, x, y, flux_adu, *, fwhm, beta, ell, theta, sky_adu, rn_var_adu2, gain, max_half
):
    """`_render_stars` with a per-star elliptical Moffat and a per-star sky (CRB)."""
    ny, nx = shape
    n = x.size
    rendered = np.zeros(n)
    peak = np.zeros(n)
    crb_err = np.full(n, np.nan)
    if n == 0:
        return np.zeros(shape), rendered, peak, crb_err
    _, _, _, _, alpha_major = _moffat_shape(fwhm, beta, ell, theta)
    frac = np.clip(np.minimum(5e-3, _MAX_MISSING_ADU / np.maximum(flux_adu, 1e-30)), 1e-9, None)
    r_need = alpha_major * np.sqrt(frac ** (1.0 / (1.0 - beta)) - 1.0)
    half = np.clip(np.ceil(r_need - 0.5), 2, max_half).astype(int)
    half = np.minimum(4 * np.ceil(half / 4.0).astype(int), max_half)  # a few stamp sizes
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    all_idx, all_vals = [], []
    for h in np.unique(half):
        members = np.flatnonzero(half == h)
        size = 2 * h + 1
        kk = np.arange(-h, h + 1)
        chunk = max(1, _CHUNK_ELEMENTS // (size * size * 4))
        for start in range(0, members.size, chunk):
            sel = members[start : start + chunk]
            stamps = render_elliptical_moffat_stamps(
                x[sel] - ix[sel],
                y[sel] - iy[sel],
                h,
                fwhm_px=fwhm[sel],
                beta=beta[sel],
                ellipticity=ell[sel],
                theta_rad=theta[sel],
            )
            f = flux_adu[sel]
            var_pix = (f[:, None, None] * stamps + sky_adu[sel, None, None]) / gain + rn_var_adu2
            crb_err[sel] = 1.0 / np.sqrt(np.sum(stamps**2 / var_pix, axis=(1, 2)))
            peak[sel] = f * stamps.reshape(sel.size, -1).max(axis=1)
            rendered[sel] = _place(stamps, f, ix[sel], iy[sel], kk, (ny, nx), all_idx, all_vals)
    image = np.bincount(
        np.concatenate(all_idx), weights=np.concatenate(all_vals), minlength=ny * nx
    )
    return image.reshape(shape), rendered, peak, crb_err


def _bleed_columns(electrons, full_well_e, ix, iy, half):
    """Spill the charge above ``full_well_e`` along the columns, half up and half down (in place).

    Only the columns within ``half`` px of the saturated stars ``(ix, iy)`` are looked at.
    Returns the mask of the pixels filled by the bleed (outside the saturated cores).
    """
    ny, nx = electrons.shape
    bleed = np.zeros(electrons.shape, dtype=bool)
    fw = np.float32(full_well_e)
    for cx, cy, h in zip(ix, iy, half):
        y0, y1 = max(0, cy - h), min(ny, cy + h + 1)
        for c in range(max(0, cx - h), min(nx, cx + h + 1)):
            col = electrons[:, c]
            over = np.flatnonzero(col[y0:y1] > fw) + y0
            if over.size == 0:
                continue
            excess = float(np.sum(col[over] - fw))
            col[over] = fw
            for start, step, amount in (
                (int(over.max()) + 1, 1, 0.5 * excess),
                (int(over.min()) - 1, -1, 0.5 * excess),
            ):
                j = start
                while amount > 0 and 0 <= j < ny:
                    room = float(fw - col[j])
                    if room > 0:
                        add = min(room, amount)
                        col[j] += np.float32(add)
                        amount -= add
                        bleed[j, c] = True
                    j += step
    return bleed
