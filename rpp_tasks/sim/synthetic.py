"""Synthetic star fields and observing sessions with known truth.

Used by the tests, the reduction benchmark (``bench/bench_reduction.py``) and the product's demo.
Everything is seeded and deterministic.

What is simulated, in order (all in electrons, then converted to ADU):

1. Stars drawn uniformly on the detector (optionally with a minimum separation) with magnitudes
   from a power-law luminosity function ``dN/dm ∝ 10**(mag_slope * m)`` (most stars are faint).
   ``flux_adu = exptime_s * 10**(-0.4 * (mag - zero_point_mag))`` is the **total** flux of the star
   in ADU, so ``mag = zero_point_mag - 2.5 log10(flux_adu / exptime_s)`` (the per-second
   instrumental convention of ``docs/ARCHITECTURE.md`` plus a zero point).
2. Each star is rendered with a **pixel-integrated** PSF: the Gaussian exactly (differences of
   ``erf``, separable), the Moffat by Gauss-Legendre quadrature over each pixel (4x4 nodes within
   one FWHM of the centre, 2x2 outside; errors < 1e-4 of the peak for FWHM >= 2 px, see the
   tests). Stamps hold at least 99.5 % of the flux; brighter stars get
   larger stamps so that the flux left outside a stamp stays below ``_MAX_MISSING_ADU`` (10 ADU)
   where possible (half-width capped at 64 px). The flux that really landed in the image is in
   the truth column ``flux_rendered_adu``.
3. Sky (uniform), optionally a camera (bias pattern, dark current with hot pixels, flat-field
   response; see `make_camera`), Poisson noise in electrons on everything, Gaussian read noise.
4. Cosmic rays, added after the noise and not convolved by the PSF: compact hits of 1-3 px and
   short straight tracks (3-15 px), 1 000-20 000 e per pixel. Their pixels are in ``cr_mask``.
5. Clipping at ``saturation_adu``.

Fields built like real optics (`make_optics_field`, `optics_field_kwargs`): a PSF varying across the
field (`PsfVariation`: elliptical Moffat whose FWHM, beta, ellipticity and orientation are smooth but
not polynomial functions of the position), a sky gradient, gain 0.8, close pairs, bright saturated
stars whose charge above the full well bleeds along the columns and whose wings (halos) are drawn
out to 160 px, plus the cosmic rays and hot pixels above. The one-PSF fields are unchanged (the
new options draw from their own random stream).

The truth table describes what an ideal measurement would give (see `make_star_field`), including
each star's local PSF and sky.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.special import erf

__all__ = [
    "SyntheticField",
    "SyntheticCamera",
    "PsfVariation",
    "make_star_field",
    "make_optics_field",
    "optics_field_kwargs",
    "make_camera",
    "make_calibration_frames",
    "write_synthetic_session",
    "render_psf_stamps",
    "render_elliptical_moffat_stamps",
    "psf_encircled_energy",
    "moffat_alpha_px",
    "SNR_RADIUS_FWHM",
]

log = logging.getLogger(__name__)

#: Radius (in FWHM) of the circular aperture used for the truth column ``snr_expected``.
SNR_RADIUS_FWHM = 1.0
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_MAX_MISSING_ADU = 10.0
_MAX_HALF_WIDTH_PX = 64
_CHUNK_ELEMENTS = 4_000_000
_GL4 = np.polynomial.legendre.leggauss(4)
_GL2 = np.polynomial.legendre.leggauss(2)
_TRUTH_COLUMNS = (
    "id",
    "x",
    "y",
    "flux_adu",
    "mag",
    "ra",
    "dec",
    "peak_adu",
    "snr_expected",
    "flux_err_crb_adu",
    "flux_rendered_adu",
    "frac_in_image",
    "saturated",
    "fwhm_px",
    "beta",
    "ellipticity",
    "theta_deg",
    "sky_adu",
    "pair",
)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticField:
    """A synthetic frame and its truth.

    Attributes
    ----------
    data : numpy.ndarray
        float32 image in ADU (noise, cosmic rays, hot pixels, saturation clipping).
    header : astropy.io.fits.Header
        Observatory-like header with a TAN WCS (0-based truth ``x, y`` map to ``ra, dec`` through
        ``WCS(header).pixel_to_world_values``).
    truth : astropy.table.Table
        One row per star (see `make_star_field`); ``meta`` holds the simulation parameters.
    model : numpy.ndarray
        float32 noiseless expectation in ADU (bias + dark + flat * (sky + stars)), before cosmic
        rays and saturation. Hot pixels are included when they come from a camera dark map.
    cr_mask, hot_mask : numpy.ndarray
        bool masks of the pixels hit by cosmic rays and of the hot pixels.
    params : dict
        The parameters the field was made with (JSON-safe).
    bleed_mask : numpy.ndarray
        bool mask of the pixels filled by bleed trails of saturated stars (all False without
        ``bleed_trails``).
    """

    data: np.ndarray
    header: fits.Header
    truth: Table
    model: np.ndarray
    cr_mask: np.ndarray
    hot_mask: np.ndarray
    params: dict = field(default_factory=dict)
    bleed_mask: np.ndarray | None = None

    def to_dict(self) -> dict:
        """Small JSON-safe summary (no arrays)."""
        return {
            "shape": list(self.data.shape),
            "n_stars": len(self.truth),
            "n_saturated": int(np.count_nonzero(self.truth["saturated"])),
            "n_cr_pixels": int(np.count_nonzero(self.cr_mask)),
            "n_hot_pixels": int(np.count_nonzero(self.hot_mask)),
            "params": dict(self.params),
        }


@dataclass(frozen=True)
class SyntheticCamera:
    """A fixed synthetic detector shared by every frame of a session (see `make_camera`).

    Attributes
    ----------
    bias_adu : numpy.ndarray
        Bias level per pixel (level + column pattern + gentle gradient), float32 ADU.
    dark_e_per_s : numpy.ndarray
        Dark current per pixel in e/s (uniform level, hot pixels much higher), float32.
    flat_response : numpy.ndarray
        Relative response (vignetting, dust donuts, pixel-to-pixel), median exactly 1, float32.
    hot_mask : numpy.ndarray
        bool, the hot pixels of ``dark_e_per_s``.
    """

    shape: tuple[int, int]
    gain_e_per_adu: float
    read_noise_e: float
    saturation_adu: float
    bias_adu: np.ndarray
    dark_e_per_s: np.ndarray
    flat_response: np.ndarray
    hot_mask: np.ndarray
    instrument: str = "SYNTH-CAM"
    telescope: str = "SYNTH-0.4m"


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
            px = ix[sel, None, None] + kk[None, None, :]
            py = iy[sel, None, None] + kk[None, :, None]
            inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
            vals = stamps * f[:, None, None]
            rendered[sel] = np.where(inside, vals, 0.0).sum(axis=(1, 2))
            all_idx.append((py * nx + px)[inside])
            all_vals.append(vals[inside])
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
            px = ix[sel, None, None] + kk[None, None, :]
            py = iy[sel, None, None] + kk[None, :, None]
            inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
            vals = stamps * f[:, None, None]
            rendered[sel] = np.where(inside, vals, 0.0).sum(axis=(1, 2))
            all_idx.append((py * nx + px)[inside])
            all_vals.append(vals[inside])
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


# --------------------------------------------------------------------------------------------
# Star lists, WCS, defects
# --------------------------------------------------------------------------------------------


def _draw_magnitudes(rng, n, mag_range, mag_slope):
    lo, hi = sorted(float(m) for m in mag_range)
    a = float(mag_slope)
    u = rng.random(n)
    if a == 0:
        return lo + u * (hi - lo)
    # inverse CDF of dN/dm ∝ 10**(a m) on [lo, hi], computed relative to hi for stability
    return hi + np.log10(10.0 ** (a * (lo - hi)) + u * (1.0 - 10.0 ** (a * (lo - hi)))) / a


def _draw_positions(rng, n, shape, border_px, min_separation_px):
    ny, nx = shape
    lo_x, hi_x = border_px - 0.5, nx - 0.5 - border_px
    lo_y, hi_y = border_px - 0.5, ny - 0.5 - border_px
    if hi_x <= lo_x or hi_y <= lo_y:
        msg = f"border_px={border_px} leaves no room on a {shape} image"
        raise ValueError(msg)
    if not min_separation_px:
        return rng.uniform(lo_x, hi_x, n), rng.uniform(lo_y, hi_y, n)
    from scipy.spatial import cKDTree

    n_cand = 4 * n + 100
    cx, cy = rng.uniform(lo_x, hi_x, n_cand), rng.uniform(lo_y, hi_y, n_cand)
    pairs = cKDTree(np.column_stack([cx, cy])).query_pairs(
        float(min_separation_px), output_type="ndarray"
    )
    neighbours = [[] for _ in range(n_cand)]
    for i, j in pairs:
        neighbours[max(i, j)].append(min(i, j))
    accepted = np.zeros(n_cand, dtype=bool)
    count = 0
    for i in range(n_cand):
        if not any(accepted[j] for j in neighbours[i]):
            accepted[i] = True
            count += 1
            if count == n:
                break
    if count < n:
        log.warning(
            "synthetic: only %d of %d stars fit with min_separation_px=%.1f",
            count,
            n,
            min_separation_px,
        )
    idx = np.flatnonzero(accepted)
    return cx[idx], cy[idx]


def _add_pairs_and_bright(
    rng,
    x,
    y,
    mag,
    *,
    shape,
    border_px,
    fwhm_px,
    mag_range,
    n_close_pairs,
    pair_separation_fwhm,
    pair_dmag_max,
    n_bright,
    bright_mag_range,
):
    """Append close companions and bright stars; returns x, y, mag and the pair number per star."""
    ny, nx = shape
    pair = np.zeros(x.size, np.int64)
    if n_close_pairs > 0 and x.size:
        lo, hi = sorted(float(m) for m in mag_range)
        cand = np.flatnonzero(mag <= lo + 0.6 * (hi - lo))
        if cand.size == 0:
            cand = np.arange(x.size)
        prim = rng.choice(cand, size=min(n_close_pairs, cand.size), replace=False)
        sep = rng.uniform(*pair_separation_fwhm, prim.size) * float(fwhm_px)
        ang = rng.uniform(0.0, 2.0 * math.pi, prim.size)
        cx = x[prim] + sep * np.cos(ang)
        cy = y[prim] + sep * np.sin(ang)
        cmag = np.minimum(mag[prim] + rng.uniform(0.0, pair_dmag_max, prim.size), hi)
        inside = (
            (cx >= border_px - 0.5)
            & (cx < nx - 0.5 - border_px)
            & (cy >= border_px - 0.5)
            & (cy < ny - 0.5 - border_px)
        )
        prim, cx, cy, cmag = prim[inside], cx[inside], cy[inside], cmag[inside]
        pair[prim] = np.arange(1, prim.size + 1)
        x = np.concatenate([x, cx])
        y = np.concatenate([y, cy])
        mag = np.concatenate([mag, cmag])
        pair = np.concatenate([pair, np.arange(1, prim.size + 1)])
    if n_bright > 0:
        margin = max(float(border_px), 0.05 * min(nx, ny))
        bx = rng.uniform(margin, nx - 1 - margin, n_bright)
        by = rng.uniform(margin, ny - 1 - margin, n_bright)
        bmag = rng.uniform(*sorted(bright_mag_range), n_bright)
        x = np.concatenate([x, bx])
        y = np.concatenate([y, by])
        mag = np.concatenate([mag, bmag])
        pair = np.concatenate([pair, np.zeros(n_bright, np.int64)])
    return x, y, mag, pair


def _make_wcs(shape, center_deg, pixel_scale_arcsec, rotation_deg):
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(center_deg[0]), float(center_deg[1])]
    w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    s = pixel_scale_arcsec / 3600.0
    th = math.radians(rotation_deg)
    # north up, east left at rotation 0 (RA increases to the left)
    w.wcs.cd = [[-s * math.cos(th), s * math.sin(th)], [s * math.sin(th), s * math.cos(th)]]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = "ICRS"
    w.wcs.equinox = 2000.0
    return w


def _add_cosmic_rays(rng, shape, n, gain_e_per_adu):
    """Cosmic-ray image in ADU (float32) and its mask: compact hits and short straight tracks."""
    ny, nx = shape
    img = np.zeros(shape, dtype=np.float32)
    if n <= 0:
        return img, np.zeros(shape, dtype=bool)
    ys, xs, amps = [], [], []
    for _ in range(n):
        x0, y0 = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        e_per_px = math.exp(rng.uniform(math.log(1000.0), math.log(20000.0)))
        if rng.random() < 0.6:  # compact hit: 1-3 px, 8-connected
            npx = int(rng.integers(1, 4))
            px, py = [int(round(x0))], [int(round(y0))]
            while len(px) < npx:
                px.append(px[-1] + int(rng.integers(-1, 2)))
                py.append(py[-1] + int(rng.integers(-1, 2)))
            frac = rng.uniform(0.3, 1.0, npx)
            frac[0] = 1.0
        else:  # track: 3-15 px long, straight, sampled at 0.25 px steps
            length = rng.uniform(3.0, 15.0)
            ang = rng.uniform(0, math.pi)
            t = np.arange(0.0, length, 0.25)
            px = np.rint(x0 + t * math.cos(ang)).astype(int)
            py = np.rint(y0 + t * math.sin(ang)).astype(int)
            keep = np.unique(py * (nx + 64) + px, return_index=True)[1]
            px, py = px[np.sort(keep)], py[np.sort(keep)]
            frac = rng.uniform(0.6, 1.0, px.size)
        xs.extend(px)
        ys.extend(py)
        amps.extend(e_per_px * np.asarray(frac) / gain_e_per_adu)
    xs, ys, amps = np.asarray(xs), np.asarray(ys), np.asarray(amps)
    ok = (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
    np.add.at(img, (ys[ok], xs[ok]), amps[ok].astype(np.float32))
    return img, img > 0


def _scaled_default(value, per_mpx, shape, factor=1.0):
    if value is not None:
        return int(value)
    return int(round(per_mpx * shape[0] * shape[1] / 1e6 * factor))


# --------------------------------------------------------------------------------------------
# Public: star field
# --------------------------------------------------------------------------------------------


def make_star_field(
    shape=(2048, 2048),
    *,
    n_stars=2000,
    psf="gaussian",
    fwhm_px=3.5,
    beta=3.0,
    sky_adu=800.0,
    gain_e_per_adu=1.5,
    read_noise_e=8.0,
    bias_adu=0.0,
    saturation_adu=60000.0,
    mag_range=(13.0, 22.0),
    mag_slope=0.3,
    zero_point_mag=25.0,
    exptime_s=60.0,
    n_cosmic_rays=None,
    n_hot_pixels=None,
    wcs_center_deg=(150.0, 2.2),
    pixel_scale_arcsec=1.0,
    rotation_deg=0.0,
    min_separation_px=None,
    border_px=0,
    stars=None,
    camera=None,
    filter_name="V",
    object_name="SYNTH-FIELD",
    date_obs="2025-01-15T21:00:00.000",
    psf_variation=None,
    sky_gradient_frac=0.0,
    sky_gradient_angle_deg=30.0,
    n_close_pairs=0,
    pair_separation_fwhm=(1.2, 4.0),
    pair_dmag_max=2.5,
    n_bright=0,
    bright_mag_range=(9.0, 12.5),
    bleed_trails=False,
    max_half_width_px=None,
    seed=0,
) -> SyntheticField:
    """
    Make a synthetic star field with a truth table.

    Parameters
    ----------
    shape : tuple of int
        (ny, nx).
    n_stars : int
        Number of stars (ignored when ``stars`` is given).
    psf : {"gaussian", "moffat"}
        PSF model; ``fwhm_px`` is the FWHM of the continuous PSF, before pixel integration.
    beta : float
        Moffat power index (> 1).
    sky_adu : float
        Sky level per pixel in ADU (before the flat-field response when a camera is given).
    gain_e_per_adu, read_noise_e, saturation_adu, bias_adu : float
        Detector; ignored (taken from ``camera``) when ``camera`` is given, except ``bias_adu``
        which is then the camera's bias map.
    mag_range : (float, float)
        Magnitudes are drawn in this range from ``dN/dm ∝ 10**(mag_slope * m)``.
    zero_point_mag : float
        ``mag = zero_point_mag - 2.5 log10(flux_adu / exptime_s)``.
    n_cosmic_rays : int, optional
        Default: 0.2 per megapixel per second of exposure (50 on a 2048x2048, 60 s frame).
    n_hot_pixels : int, optional
        Hot pixels added to a frame without ``camera``: default 10 per megapixel, each with a
        constant 100-10 000 ADU (log-uniform) before Poisson noise.
    wcs_center_deg : (float, float)
        (RA, Dec) of the image centre; TAN projection, north up and east left at ``rotation_deg=0``.
    pixel_scale_arcsec, rotation_deg : float
        WCS scale and rotation of the pixel axes (counter-clockwise, degrees).
    min_separation_px : float, optional
        Minimum distance between stars (greedy rejection sampling); None for none.
    border_px : float
        Star centres are kept at least this far from the image edges (0: anywhere).
    stars : astropy.table.Table, optional
        Stars to render instead of random ones, with ``ra, dec, mag`` (deg, mag); rows falling
        outside the image are dropped. Used to render the same sky on dithered frames.
    camera : `SyntheticCamera`, optional
        Apply a detector: bias map, dark current (hot pixels) scaled by ``exptime_s``, and the
        flat-field response multiplying sky and stars. ``flux_adu`` then stays the flux a
        perfectly flat-fielded frame shows (the response has median 1).
    filter_name, object_name, date_obs : str
        Header values.
    psf_variation : `PsfVariation`, optional
        A PSF that changes across the field (elliptical Moffat; ``psf``, ``fwhm_px`` and
        ``beta`` are then ignored). Default: one PSF everywhere.
    sky_gradient_frac, sky_gradient_angle_deg : float
        The sky changes linearly by this fraction of ``sky_adu`` from one side of the frame to the
        other, along this direction (counter-clockwise from +x).
    n_close_pairs : int
        Companions added next to random stars of the brighter 60 % of the magnitude range, at
        ``pair_separation_fwhm`` FWHM (uniform) and up to ``pair_dmag_max`` mag fainter (truth
        column ``pair``: the pair number, 0 for single stars).
    n_bright, bright_mag_range : int, (float, float)
        Extra bright (saturated) stars with magnitudes uniform in this range.
    bleed_trails : bool
        Charge above the full well (``1.1 * saturation_adu * gain`` electrons: saturated pixels read
        the ADC maximum) spills along the columns (half up, half down) before the read-out; the
        filled pixels are in ``bleed_mask``.
    max_half_width_px : int, optional
        Largest stamp half-width (default 64 px, or 160 px with ``psf_variation``, so the wings of
        very bright stars -- their halos -- are rendered far out).
    seed : int
        Seed of `numpy.random.default_rng`; the same arguments give the same field. The options
        above draw from a separate stream, so fields made without them are unchanged.

    Returns
    -------
    field : `SyntheticField`
        ``truth`` columns: ``id`` (1-based), ``x``, ``y`` (0-based px), ``flux_adu`` (total flux
        of the star, infinite aperture), ``mag``, ``ra``, ``dec`` (deg, from the header WCS),
        ``peak_adu`` (brightest pixel of the noiseless pixel-integrated star, above sky),
        ``snr_expected`` (photon-noise S/N in a circular aperture of radius
        ``SNR_RADIUS_FWHM * fwhm_px`` = 1 FWHM with exactly known sky: ``F_ap / sqrt(F_ap/g +
        pi r**2 (sky/g + (rn/g)**2))`` with ``F_ap = flux_adu * EE(r)`` from
        `psf_encircled_energy`), ``flux_err_crb_adu`` (Cramer-Rao bound of a PSF-fit flux with
        the true pixel-integrated PSF and known position and sky: ``1/sqrt(sum P**2/var)``,
        ``var = (flux P + sky)/g + (rn/g)**2`` in ADU**2), ``flux_rendered_adu`` (noiseless flux
        that landed in the image: stamp truncation and image edges), ``frac_in_image``
        (``flux_rendered_adu / flux_adu``) and ``saturated`` (noiseless peak + sky + bias reaches
        ``saturation_adu``), then the local truth of each star: ``fwhm_px``, ``beta``
        (``inf`` for a Gaussian), ``ellipticity``, ``theta_deg`` (the PSF at the star),
        ``sky_adu`` (the sky at the star) and ``pair``. With a varying PSF or sky,
        ``snr_expected`` and ``flux_err_crb_adu`` use the local PSF and sky. ``truth.meta`` holds
        the simulation parameters (``psf``, ``fwhm_px``, ``beta``, ``sky_adu``,
        ``gain_e_per_adu``, ``read_noise_e``, ``exptime_s``, ``psf_variation``, ...).
    """
    _check_psf(psf, fwhm_px, beta)
    ny, nx = (int(shape[0]), int(shape[1]))
    if ny < 8 or nx < 8:
        msg = f"shape must be at least 8x8, got {shape}"
        raise ValueError(msg)
    if exptime_s <= 0 or sky_adu < 0:
        msg = f"need exptime_s > 0 and sky_adu >= 0, got {exptime_s!r}, {sky_adu!r}"
        raise ValueError(msg)
    if camera is not None:
        if tuple(camera.shape) != (ny, nx):
            msg = f"camera shape {camera.shape} differs from the field shape {(ny, nx)}"
            raise ValueError(msg)
        gain_e_per_adu, read_noise_e = camera.gain_e_per_adu, camera.read_noise_e
        saturation_adu = camera.saturation_adu
    if gain_e_per_adu <= 0 or read_noise_e < 0:
        msg = f"need gain_e_per_adu > 0 and read_noise_e >= 0, got {gain_e_per_adu!r}, {read_noise_e!r}"
        raise ValueError(msg)

    rng = np.random.default_rng(seed)
    # the options added for fields like real optics draw from their own stream
    extra = np.random.default_rng(np.random.SeedSequence([int(seed or 0), 0x5EED]))
    wcs = _make_wcs((ny, nx), wcs_center_deg, pixel_scale_arcsec, rotation_deg)
    pair = None

    if stars is None:
        x, y = _draw_positions(rng, int(n_stars), (ny, nx), border_px, min_separation_px)
        mag = _draw_magnitudes(rng, x.size, mag_range, mag_slope)
        x, y, mag, pair = _add_pairs_and_bright(
            extra,
            x,
            y,
            mag,
            shape=(ny, nx),
            border_px=border_px,
            fwhm_px=psf_variation.fwhm_px if psf_variation is not None else fwhm_px,
            mag_range=mag_range,
            n_close_pairs=int(n_close_pairs),
            pair_separation_fwhm=pair_separation_fwhm,
            pair_dmag_max=pair_dmag_max,
            n_bright=int(n_bright),
            bright_mag_range=bright_mag_range,
        )
        ra, dec = wcs.pixel_to_world_values(x, y)
    else:
        ra_in = np.asarray(stars["ra"], dtype=float)
        dec_in = np.asarray(stars["dec"], dtype=float)
        x, y = wcs.world_to_pixel_values(ra_in, dec_in)
        keep = (
            (x >= -0.5 + border_px)
            & (x < nx - 0.5 - border_px)
            & (y >= -0.5 + border_px)
            & (y < ny - 0.5 - border_px)
        )
        x, y = x[keep], y[keep]
        mag = np.asarray(stars["mag"], dtype=float)[keep]
        ra, dec = ra_in[keep], dec_in[keep]
    flux = exptime_s * 10.0 ** (-0.4 * (mag - zero_point_mag))
    if pair is None:
        pair = np.zeros(x.size, np.int64)

    sky_var = (sky_adu, (read_noise_e / gain_e_per_adu) ** 2)
    sky_img = sky_adu
    sky_star = np.full(x.size, float(sky_adu))
    if sky_gradient_frac:
        ga = math.radians(sky_gradient_angle_deg)
        norm_g = abs(math.cos(ga)) + abs(math.sin(ga))

        def ramp(xx, yy):
            return sky_adu * (
                1.0
                + sky_gradient_frac
                * (
                    (xx / max(nx - 1, 1) - 0.5) * math.cos(ga)
                    + (yy / max(ny - 1, 1) - 0.5) * math.sin(ga)
                )
                / norm_g
            )

        sky_img = ramp(np.arange(nx)[None, :], np.arange(ny)[:, None])
        sky_star = ramp(x, y)
    if psf_variation is not None:
        if not isinstance(psf_variation, PsfVariation):
            msg = f"psf_variation must be a PsfVariation, got {type(psf_variation).__name__}"
            raise TypeError(msg)
        psf, fwhm_px, beta = "moffat", psf_variation.fwhm_px, psf_variation.beta_centre
        s_fwhm, s_beta, s_ell, s_theta = psf_variation.params_at(x, y, (ny, nx))
    else:
        s_fwhm = np.full(x.size, float(fwhm_px))
        s_beta = np.full(x.size, float(beta) if psf == "moffat" else np.inf)
        s_ell = np.zeros(x.size)
        s_theta = np.zeros(x.size)
    if max_half_width_px is None:
        max_half_width_px = 160 if psf_variation is not None else _MAX_HALF_WIDTH_PX
    if psf_variation is not None or sky_gradient_frac or max_half_width_px != _MAX_HALF_WIDTH_PX:
        if psf == "gaussian":
            msg = "sky_gradient_frac / max_half_width_px need psf='moffat' or a psf_variation"
            raise ValueError(msg)
        stars_img, rendered, peak, crb_err = _render_stars_varying(
            (ny, nx),
            x,
            y,
            flux,
            fwhm=s_fwhm,
            beta=s_beta,
            ell=s_ell,
            theta=s_theta,
            sky_adu=sky_star,
            rn_var_adu2=sky_var[1],
            gain=gain_e_per_adu,
            max_half=int(max_half_width_px),
        )
    else:
        stars_img, rendered, peak, crb_err = _render_stars(
            (ny, nx),
            x,
            y,
            flux,
            psf=psf,
            fwhm_px=fwhm_px,
            beta=beta,
            sky_var_adu2=sky_var,
            gain_e_per_adu=gain_e_per_adu,
        )

    # expected electrons, then noise
    if camera is None:
        response = 1.0
        dark_e = 0.0
        hot_mask = np.zeros((ny, nx), dtype=bool)
        n_hot = _scaled_default(n_hot_pixels, 10.0, (ny, nx))
        hot_adu = np.zeros((ny, nx), dtype=float)
        if n_hot > 0:
            idx = rng.choice(ny * nx, size=min(n_hot, ny * nx), replace=False)
            hot_adu.flat[idx] = np.exp(rng.uniform(math.log(100.0), math.log(1e4), idx.size))
            hot_mask.flat[idx] = True
        bias = float(bias_adu)
    else:
        response = camera.flat_response.astype(float)
        dark_e = camera.dark_e_per_s.astype(float) * exptime_s
        hot_mask = camera.hot_mask.copy()
        hot_adu = 0.0
        bias = camera.bias_adu.astype(float)

    expected_e = (response * (stars_img + sky_img) + hot_adu) * gain_e_per_adu + dark_e
    del stars_img
    model = (expected_e / gain_e_per_adu + bias).astype(np.float32)
    electrons = rng.poisson(expected_e).astype(np.float32)
    del expected_e
    bleed_mask = np.zeros((ny, nx), dtype=bool)
    if bleed_trails:
        # the full well holds a little more than the ADC range: saturated pixels read the maximum
        full_well_e = 1.1 * (saturation_adu - float(np.median(bias))) * gain_e_per_adu
        hot = np.flatnonzero(peak + sky_star >= 1.1 * (saturation_adu - float(np.median(bias))))
        if hot.size:
            bleed_mask = _bleed_columns(
                electrons,
                full_well_e,
                np.rint(x[hot]).astype(int),
                np.rint(y[hot]).astype(int),
                np.full(hot.size, int(max_half_width_px)),
            )
    electrons += rng.standard_normal((ny, nx), dtype=np.float32) * np.float32(read_noise_e)
    n_cr = _scaled_default(n_cosmic_rays, 0.2, (ny, nx), factor=exptime_s)
    cr_adu, cr_mask = _add_cosmic_rays(rng, (ny, nx), n_cr, gain_e_per_adu)
    data = electrons / np.float32(gain_e_per_adu)
    data += np.asarray(bias, dtype=np.float32)
    data += cr_adu
    np.minimum(data, np.float32(saturation_adu), out=data)

    bias_at_star = (
        bias
        if np.isscalar(bias)
        else bias[
            np.clip(np.rint(y).astype(int), 0, ny - 1), np.clip(np.rint(x).astype(int), 0, nx - 1)
        ]
    )
    saturated = peak + sky_star + bias_at_star >= saturation_adu

    r_snr = SNR_RADIUS_FWHM * s_fwhm
    if psf == "gaussian":
        ee = psf_encircled_energy(r_snr, psf=psf, fwhm_px=fwhm_px, beta=beta)
    else:
        ee = 1.0 - (1.0 + (r_snr / _moffat_shape(s_fwhm, s_beta, 0.0, 0.0)[4]) ** 2) ** (
            1.0 - s_beta
        )
    f_ap = flux * ee
    snr = f_ap / np.sqrt(
        f_ap / gain_e_per_adu + math.pi * r_snr**2 * (sky_star / gain_e_per_adu + sky_var[1])
    )

    params = {
        "shape": [ny, nx],
        "n_stars": int(x.size),
        "psf": psf,
        "fwhm_px": float(fwhm_px),
        "beta": float(beta),
        "sky_adu": float(sky_adu),
        "gain_e_per_adu": float(gain_e_per_adu),
        "read_noise_e": float(read_noise_e),
        "bias_adu": float(np.median(bias)),
        "saturation_adu": float(saturation_adu),
        "mag_range": [float(m) for m in mag_range],
        "mag_slope": float(mag_slope),
        "zero_point_mag": float(zero_point_mag),
        "exptime_s": float(exptime_s),
        "n_cosmic_rays": int(n_cr),
        "n_hot_pixels": int(np.count_nonzero(hot_mask)),
        "wcs_center_deg": [float(wcs_center_deg[0]), float(wcs_center_deg[1])],
        "pixel_scale_arcsec": float(pixel_scale_arcsec),
        "rotation_deg": float(rotation_deg),
        "min_separation_px": None if min_separation_px is None else float(min_separation_px),
        "border_px": float(border_px),
        "snr_radius_px": float(SNR_RADIUS_FWHM * fwhm_px),
        "camera": camera is not None,
        "seed": int(seed) if seed is not None else None,
    }
    if psf_variation is not None or sky_gradient_frac or n_close_pairs or n_bright or bleed_trails:
        params.update(
            psf_varying=psf_variation is not None,
            psf_variation=psf_variation.to_dict() if psf_variation is not None else None,
            sky_gradient_frac=float(sky_gradient_frac),
            sky_gradient_angle_deg=float(sky_gradient_angle_deg),
            n_close_pairs=int(n_close_pairs),
            n_bright=int(n_bright),
            bleed_trails=bool(bleed_trails),
            n_bleed_pixels=int(np.count_nonzero(bleed_mask)),
        )
    truth = Table(
        [
            np.arange(1, x.size + 1),
            x,
            y,
            flux,
            mag,
            np.asarray(ra, float),
            np.asarray(dec, float),
            peak,
            snr,
            crb_err,
            rendered,
            rendered / flux if x.size else rendered,
            saturated,
            s_fwhm,
            s_beta,
            s_ell,
            np.degrees(s_theta),
            sky_star,
            pair,
        ],
        names=_TRUTH_COLUMNS,
        meta={k: v for k, v in params.items()},
    )
    for name, unit in (
        ("x", "pix"),
        ("y", "pix"),
        ("flux_adu", "adu"),
        ("mag", "mag"),
        ("ra", "deg"),
        ("dec", "deg"),
        ("peak_adu", "adu"),
        ("flux_err_crb_adu", "adu"),
        ("flux_rendered_adu", "adu"),
        ("fwhm_px", "pix"),
        ("theta_deg", "deg"),
        ("sky_adu", "adu"),
    ):
        truth[name].unit = unit

    header = _light_header(
        wcs,
        ny,
        nx,
        exptime_s=exptime_s,
        filter_name=filter_name,
        object_name=object_name,
        date_obs=date_obs,
        gain=gain_e_per_adu,
        rn=read_noise_e,
        sat=saturation_adu,
        center=wcs_center_deg,
        camera=camera,
    )
    header["SYNTHET"] = (True, "rpp_tasks.sim.synthetic frame")
    header["SYN_PSF"] = (psf, "synthetic PSF model")
    header["SYN_FWHM"] = (float(fwhm_px), "[px] synthetic PSF FWHM (continuous)")
    header["SYN_BETA"] = (float(beta), "synthetic Moffat beta")
    header["SYN_SKY"] = (float(sky_adu), "[adu] synthetic sky level")
    header["SYN_SEED"] = (int(seed) if seed is not None else -1, "synthetic seed")
    if psf_variation is not None:
        header["SYN_PVAR"] = (True, "synthetic PSF varies across the field")
    log.debug(
        "synthetic field %dx%d: %d stars, %d CRs, %d hot px",
        ny,
        nx,
        x.size,
        n_cr,
        params["n_hot_pixels"],
    )
    return SyntheticField(
        data=data,
        header=header,
        truth=truth,
        model=model,
        cr_mask=cr_mask,
        hot_mask=hot_mask,
        params=params,
        bleed_mask=bleed_mask,
    )


def optics_field_kwargs(shape=(2048, 2048), **overrides) -> dict:
    """
    Keyword arguments of `make_star_field` for a field built like real small-telescope data.

    Per 2048x2048: 2000 stars (magnitudes 13-22, ``dN/dm ∝ 10**(0.3 m)``), 45 close pairs
    (1.2-4 FWHM, up to 2.5 mag fainter), 8 bright saturated stars (mag 9-12.5) with bleed trails
    and halos (wings rendered out to 160 px); a PSF varying across the field (`PsfVariation`:
    FWHM 3.5 px at the axis, about +15 % in the corners, beta 3.3 -> 2.7, ellipticity up to
    about 0.1 with an orientation that turns around the field); sky 800 ADU with a 4 % gradient;
    gain 0.8 e-/ADU, read noise 6 e-, saturation 60 000 ADU; cosmic rays (0.2 per megapixel per
    second) and hot pixels (10 per megapixel). ``overrides`` replace any of these.
    """
    scale = shape[0] * shape[1] / 2048**2
    kw = dict(
        n_stars=int(round(2000 * scale)),
        psf_variation=PsfVariation(),
        sky_adu=800.0,
        sky_gradient_frac=0.04,
        gain_e_per_adu=0.8,
        read_noise_e=6.0,
        saturation_adu=60000.0,
        mag_range=(13.0, 22.0),
        mag_slope=0.3,
        n_close_pairs=int(round(45 * scale)),
        n_bright=max(1, int(round(8 * scale))),
        bright_mag_range=(9.0, 12.5),
        bleed_trails=True,
    )
    kw.update(overrides)
    return kw


def make_optics_field(shape=(2048, 2048), *, seed=0, **overrides) -> SyntheticField:
    """A `make_star_field` field built like real optics (see `optics_field_kwargs`)."""
    return make_star_field(shape, seed=seed, **optics_field_kwargs(shape, **overrides))


def _base_header(ny, nx, *, imagetyp, exptime_s, date_obs, gain, rn, sat, camera, filter_name=None):
    h = fits.Header()
    h["IMAGETYP"] = (imagetyp, "type of image")
    h["DATE-OBS"] = (date_obs, "[UTC] start of exposure")
    h["EXPTIME"] = (float(exptime_s), "[s] exposure time")
    h["EXPOSURE"] = (float(exptime_s), "[s] exposure time")
    if filter_name is not None:
        h["FILTER"] = (filter_name, "filter")
    h["TELESCOP"] = (camera.telescope if camera else "SYNTH-0.4m", "telescope")
    h["INSTRUME"] = (camera.instrument if camera else "SYNTH-CAM", "camera")
    h["OBSERVER"] = ("rpp_tasks.sim.synthetic", "observer")
    h["GAIN"] = (float(gain), "[e-/ADU] gain")
    h["EGAIN"] = (float(gain), "[e-/ADU] gain")
    h["RDNOISE"] = (float(rn), "[e-] read noise")
    h["SATURATE"] = (float(sat), "[adu] saturation level")
    h["XBINNING"] = 1
    h["YBINNING"] = 1
    h["CCD-TEMP"] = (-10.0, "[C] sensor temperature")
    h["BUNIT"] = "adu"
    return h


def _light_header(
    wcs, ny, nx, *, exptime_s, filter_name, object_name, date_obs, gain, rn, sat, center, camera
):
    h = _base_header(
        ny,
        nx,
        imagetyp="Light Frame",
        exptime_s=exptime_s,
        date_obs=date_obs,
        gain=gain,
        rn=rn,
        sat=sat,
        camera=camera,
        filter_name=filter_name,
    )
    h["OBJECT"] = (object_name, "target")
    h["RA"] = (float(center[0]), "[deg] pointing right ascension")
    h["DEC"] = (float(center[1]), "[deg] pointing declination")
    h.extend(wcs.to_header(), update=True)
    return h


# --------------------------------------------------------------------------------------------
# Public: camera, calibration frames, session
# --------------------------------------------------------------------------------------------


def make_camera(
    shape=(512, 512),
    *,
    gain_e_per_adu=1.5,
    read_noise_e=8.0,
    saturation_adu=60000.0,
    bias_level_adu=1000.0,
    bias_column_rms_adu=2.0,
    bias_gradient_adu=5.0,
    dark_current_e_per_s=0.02,
    n_hot_pixels=None,
    hot_current_e_per_s=(2.0, 200.0),
    vignetting_frac=0.15,
    prnu_frac=0.01,
    n_dust=2,
    seed=0,
) -> SyntheticCamera:
    """
    A fixed detector: bias pattern, dark current with hot pixels, flat-field response.

    Parameters
    ----------
    bias_level_adu, bias_column_rms_adu, bias_gradient_adu : float
        Bias = level + a per-column offset (Gaussian, this rms) + a linear ramp along y of this
        total amplitude.
    dark_current_e_per_s : float
        Uniform dark current; ``n_hot_pixels`` (default 200 per megapixel) get a current drawn
        log-uniformly in ``hot_current_e_per_s``.
    vignetting_frac : float
        Response drop from the optical axis (image centre) to the corners, quadratic in radius.
    prnu_frac : float
        Pixel-to-pixel response rms.
    n_dust : int
        Dust donuts: rings 12-25 px in radius, 3 % deep.
    seed : int
        Seed; the camera of a session is the same for all its frames.
    """
    ny, nx = (int(shape[0]), int(shape[1]))
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    bias = (
        bias_level_adu
        + rng.normal(0.0, bias_column_rms_adu, nx)[None, :]
        + bias_gradient_adu * (yy / max(ny - 1, 1) - 0.5)
    )
    dark = np.full((ny, nx), float(dark_current_e_per_s))
    n_hot = _scaled_default(n_hot_pixels, 200.0, (ny, nx))
    hot_mask = np.zeros((ny, nx), dtype=bool)
    if n_hot > 0:
        idx = rng.choice(ny * nx, size=min(n_hot, ny * nx), replace=False)
        lo, hi = hot_current_e_per_s
        dark.flat[idx] = np.exp(rng.uniform(math.log(lo), math.log(hi), idx.size))
        hot_mask.flat[idx] = True
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (cx**2 + cy**2)
    response = (1.0 - vignetting_frac * r2) * (1.0 + rng.normal(0.0, prnu_frac, (ny, nx)))
    for _ in range(int(n_dust)):
        dx0, dy0 = rng.uniform(0.1 * nx, 0.9 * nx), rng.uniform(0.1 * ny, 0.9 * ny)
        rad = rng.uniform(12.0, 25.0)
        d = np.hypot(xx - dx0, yy - dy0)
        response *= 1.0 - 0.03 * np.exp(-0.5 * ((d - 0.7 * rad) / (0.25 * rad)) ** 2)
    response /= np.median(response)
    return SyntheticCamera(
        shape=(ny, nx),
        gain_e_per_adu=float(gain_e_per_adu),
        read_noise_e=float(read_noise_e),
        saturation_adu=float(saturation_adu),
        bias_adu=bias.astype(np.float32),
        dark_e_per_s=dark.astype(np.float32),
        flat_response=response.astype(np.float32),
        hot_mask=hot_mask,
    )


def make_calibration_frames(
    camera,
    kind,
    *,
    n=5,
    exptime_s=None,
    flat_level_adu=(30000.0, 15000.0),
    filter_name="V",
    date_obs="2025-01-15T17:00:00.000",
    cadence_s=None,
    cosmic_rate_per_mpx_s=0.2,
    seed=0,
) -> list[tuple[np.ndarray, fits.Header]]:
    """
    Raw calibration frames of a `SyntheticCamera`.

    Parameters
    ----------
    kind : {"bias", "dark", "flat"}
        Bias: bias map + read noise (``EXPTIME=0``). Dark: + Poisson dark current (hot pixels)
        over ``exptime_s`` (default 60 s) + cosmic rays. Flat: twilight flats, the response times a
        level falling geometrically from ``flat_level_adu[0]`` to ``[1]`` over the ``n`` frames,
        Poisson noise, dark current, cosmic rays (default ``exptime_s`` 3 s).
    n : int
        Number of frames.
    date_obs, cadence_s : str, float
        Start of the first frame; frames follow every ``exptime_s + cadence_s`` (default 10 s).

    Returns
    -------
    frames : list of (data, header)
        float32 ADU clipped to ``[0, saturation_adu]``, headers with IMAGETYP ``'Bias Frame'``,
        ``'Dark Frame'`` or ``'Flat Field'``.
    """
    from astropy.time import Time, TimeDelta

    if kind not in ("bias", "dark", "flat"):
        msg = f"kind must be 'bias', 'dark' or 'flat', got {kind!r}"
        raise ValueError(msg)
    if n < 0:
        msg = f"n must be >= 0, got {n}"
        raise ValueError(msg)
    if exptime_s is None:
        exptime_s = {"bias": 0.0, "dark": 60.0, "flat": 3.0}[kind]
    rng = np.random.default_rng(seed)
    ny, nx = camera.shape
    g = camera.gain_e_per_adu
    t0 = Time(date_obs, scale="utc")
    step = float(exptime_s) + (10.0 if cadence_s is None else float(cadence_s))
    imagetyp = {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field"}[kind]
    frames = []
    for i in range(n):
        expected_e = (
            np.zeros((ny, nx)) if kind == "bias" else camera.dark_e_per_s.astype(float) * exptime_s
        )
        if kind == "flat":
            lo, hi = flat_level_adu
            level = lo * (hi / lo) ** (i / max(n - 1, 1))
            expected_e = expected_e + camera.flat_response * level * g
        e = (
            rng.poisson(expected_e).astype(np.float32)
            if kind != "bias"
            else np.zeros((ny, nx), np.float32)
        )
        e += rng.standard_normal((ny, nx), dtype=np.float32) * np.float32(camera.read_noise_e)
        data = e / np.float32(g) + camera.bias_adu
        if kind != "bias":
            n_cr = int(round(cosmic_rate_per_mpx_s * ny * nx / 1e6 * max(exptime_s, 0.0)))
            data += _add_cosmic_rays(rng, (ny, nx), n_cr, g)[0]
        np.clip(data, 0.0, camera.saturation_adu, out=data)
        date = (t0 + TimeDelta(i * step, format="sec")).isot
        hdr = _base_header(
            ny,
            nx,
            imagetyp=imagetyp,
            exptime_s=exptime_s,
            date_obs=date,
            gain=g,
            rn=camera.read_noise_e,
            sat=camera.saturation_adu,
            camera=camera,
            filter_name=filter_name if kind == "flat" else None,
        )
        hdr["SYNTHET"] = (True, "rpp_tasks.sim.synthetic frame")
        frames.append((data.astype(np.float32), hdr))
    return frames


def _write_raw(path, data, header):
    """Write as an observatory would: 16-bit unsigned integers (BITPIX=16, BZERO=32768)."""
    raw = np.clip(np.rint(data), 0, 65535).astype(np.uint16)
    fits.PrimaryHDU(data=raw, header=header).writeto(path, overwrite=True)


def write_synthetic_session(
    folder,
    *,
    truth_folder=None,
    n_science=3,
    n_bias=5,
    n_dark=3,
    n_flat=5,
    shape=(512, 512),
    filter="V",
    exptime_s=60.0,
    object_name="demo",
    n_stars=None,
    psf="gaussian",
    fwhm_px=3.5,
    beta=3.0,
    sky_adu=800.0,
    wcs_center_deg=(150.0, 2.2),
    dither_px=8.0,
    night="2025-01-15",
    camera=None,
    seed=0,
    **field_kwargs,
) -> dict:
    """
    Write a realistic raw session (calibration + science frames) and its truth.

    Frames are written as 16-bit unsigned FITS with observatory-like headers, in the order an
    observatory syncs them: ``bias_001.fits``... (``'Bias Frame'``), ``dark_001.fits``... (dark
    frames of the science exposure time), ``flat_<filter>_001.fits``... (twilight flats,
    ``'Flat Field'``), then ``<object>_<filter>_001.fits``... (``'Light Frame'``). Science frames
    share one star list on the sky (fixed ``ra, dec, mag``), are dithered by up to ``dither_px``,
    have slightly varying seeing (+-5 % FWHM) and sky (+-10 %), and carry the camera's bias
    pattern, dark current, hot pixels and flat-field response.

    Parameters
    ----------
    folder : path-like
        Data folder (created). Only FITS frames are written here.
    truth_folder : path-like, optional
        Where the truth goes (default: a ``truth`` folder next to ``folder``). Must not be inside
        ``folder``, so a watcher never mistakes truth for frames. It gets
        ``<frame stem>_truth.ecsv`` per science frame (truth of `make_star_field`, ``x, y`` in
        that frame), ``camera.fits`` (extensions BIAS, DARK in e/s, FLAT response, HOT mask) and
        ``session.json``.
    n_stars : int, optional
        Stars on the sky over the frame area (default 0.5 per 1000 px**2, 131 on 512x512).
    camera : `SyntheticCamera`, optional
        Default ``make_camera(shape, seed=seed)``.
    field_kwargs
        Passed to `make_star_field` (e.g. ``mag_range``, ``zero_point_mag``, ``n_cosmic_rays``).

    Returns
    -------
    paths : dict
        ``{"bias": [...], "dark": [...], "flat": [...], "science": [...], "truth": [...],
        "camera": Path, "session": Path, "folder": Path, "truth_folder": Path}``.
    """
    import json

    from astropy.time import Time, TimeDelta

    folder = Path(folder)
    truth_folder = Path(truth_folder) if truth_folder is not None else folder.parent / "truth"
    if (
        truth_folder.resolve() == folder.resolve()
        or folder.resolve() in truth_folder.resolve().parents
    ):
        msg = f"truth_folder {truth_folder} must not be inside the data folder {folder}"
        raise ValueError(msg)
    folder.mkdir(parents=True, exist_ok=True)
    truth_folder.mkdir(parents=True, exist_ok=True)
    ny, nx = (int(shape[0]), int(shape[1]))
    cam = camera if camera is not None else make_camera((ny, nx), seed=seed)
    seeds = np.random.SeedSequence(seed).spawn(5)
    rng = np.random.default_rng(seeds[0])
    out = {"bias": [], "dark": [], "flat": [], "science": [], "truth": []}

    t_evening = Time(f"{night}T17:30:00", scale="utc")
    for kind, n, t_start, exp, sub in (
        ("bias", n_bias, t_evening, 0.0, seeds[1]),
        ("dark", n_dark, t_evening + TimeDelta(600, format="sec"), exptime_s, seeds[2]),
        ("flat", n_flat, t_evening + TimeDelta(1800, format="sec"), None, seeds[3]),
    ):
        frames = make_calibration_frames(
            cam, kind, n=n, exptime_s=exp, filter_name=filter, date_obs=t_start.isot, seed=sub
        )
        for i, (data, hdr) in enumerate(frames, start=1):
            name = f"flat_{filter}_{i:03d}.fits" if kind == "flat" else f"{kind}_{i:03d}.fits"
            _write_raw(folder / name, data, hdr)
            out[kind].append(folder / name)

    # one star list on the sky, larger than the frame so dithers keep the density
    scale_deg = field_kwargs.get("pixel_scale_arcsec", 1.0) / 3600.0
    n_sky = int(n_stars) if n_stars is not None else int(round(0.5e-3 * ny * nx))
    pad = 2.0 * dither_px
    area_ratio = (nx + 2 * pad) * (ny + 2 * pad) / (nx * ny)
    wide = _make_wcs(
        (ny + int(2 * pad), nx + int(2 * pad)),
        wcs_center_deg,
        field_kwargs.get("pixel_scale_arcsec", 1.0),
        field_kwargs.get("rotation_deg", 0.0),
    )
    n_draw = int(round(n_sky * area_ratio))
    sx = rng.uniform(-0.5, nx + 2 * pad - 0.5, n_draw)
    sy = rng.uniform(-0.5, ny + 2 * pad - 0.5, n_draw)
    sky_ra, sky_dec = wide.pixel_to_world_values(sx, sy)
    sky_mag = _draw_magnitudes(
        rng, n_draw, field_kwargs.pop("mag_range", (13.0, 21.0)), field_kwargs.pop("mag_slope", 0.3)
    )
    star_list = Table({"ra": sky_ra, "dec": sky_dec, "mag": sky_mag})

    t_sci = t_evening + TimeDelta(3 * 3600, format="sec")
    cos_dec = math.cos(math.radians(wcs_center_deg[1]))
    sci_seeds = seeds[4].spawn(max(n_science, 1))
    frames_info = []
    for i in range(1, n_science + 1):
        ddx, ddy = rng.uniform(-dither_px, dither_px, 2)
        center = (
            wcs_center_deg[0] - ddx * scale_deg / cos_dec,
            wcs_center_deg[1] + ddy * scale_deg,
        )
        fwhm_i = fwhm_px * rng.uniform(0.95, 1.05)
        sky_i = sky_adu * rng.uniform(0.9, 1.1)
        date = (t_sci + TimeDelta((i - 1) * (exptime_s + 15.0), format="sec")).isot
        fld = make_star_field(
            (ny, nx),
            stars=star_list,
            psf=psf,
            fwhm_px=fwhm_i,
            beta=beta,
            sky_adu=sky_i,
            exptime_s=exptime_s,
            wcs_center_deg=center,
            camera=cam,
            filter_name=filter,
            object_name=object_name,
            date_obs=date,
            seed=int(sci_seeds[i - 1].generate_state(1)[0]),
            **field_kwargs,
        )
        stem = f"{object_name}_{filter}_{i:03d}"
        _write_raw(folder / f"{stem}.fits", fld.data, fld.header)
        tpath = truth_folder / f"{stem}_truth.ecsv"
        fld.truth.write(tpath, overwrite=True)
        out["science"].append(folder / f"{stem}.fits")
        out["truth"].append(tpath)
        frames_info.append(
            {
                "frame": f"{stem}.fits",
                "truth": tpath.name,
                "fwhm_px": fld.params["fwhm_px"],
                "sky_adu": fld.params["sky_adu"],
                "center_deg": list(center),
                "n_stars": len(fld.truth),
            }
        )

    cam_path = truth_folder / "camera.fits"
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(cam.bias_adu, name="BIAS"),
            fits.ImageHDU(cam.dark_e_per_s, name="DARK"),
            fits.ImageHDU(cam.flat_response, name="FLAT"),
            fits.ImageHDU(cam.hot_mask.astype(np.uint8), name="HOT"),
        ]
    ).writeto(cam_path, overwrite=True)
    session = {
        "folder": str(folder),
        "filter": filter,
        "exptime_s": float(exptime_s),
        "shape": [ny, nx],
        "gain_e_per_adu": cam.gain_e_per_adu,
        "read_noise_e": cam.read_noise_e,
        "saturation_adu": cam.saturation_adu,
        "psf": psf,
        "beta": float(beta),
        "seed": int(seed),
        "frames": frames_info,
    }
    session_path = truth_folder / "session.json"
    session_path.write_text(json.dumps(session, indent=2))
    out.update(camera=cam_path, session=session_path, folder=folder, truth_folder=truth_folder)
    log.info(
        "synthetic session written to %s: %d bias, %d dark, %d flat, %d science",
        folder,
        len(out["bias"]),
        len(out["dark"]),
        len(out["flat"]),
        len(out["science"]),
    )
    return out
