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
field (`PsfVariation`: elliptical Moffat whose FWHM, beta, ellipticity and orientation are smooth
but not polynomial functions of the position), a sky gradient, gain 0.8, close pairs, bright
saturated stars whose charge above the full well bleeds along the columns and whose wings (halos)
are drawn out to 160 px, plus the cosmic rays and hot pixels above. The one-PSF fields are unchanged
(the new options draw from their own random stream).

The truth table describes what an ideal measurement would give (see `make_star_field`), including
each star's local PSF and sky.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from rpp_tasks.sim.psf_render import (
    _MAX_HALF_WIDTH_PX,
    PsfVariation,
    _bleed_columns,
    _check_psf,
    _moffat_shape,
    _render_stars,
    _render_stars_varying,
    moffat_alpha_px,
    psf_encircled_energy,
    render_elliptical_moffat_stamps,
    render_psf_stamps,
)

__all__ = [
    "SyntheticField",
    "SyntheticCamera",
    "PsfVariation",
    "make_star_field",
    "make_optics_field",
    "optics_field_kwargs",
    "render_psf_stamps",
    "render_elliptical_moffat_stamps",
    "psf_encircled_energy",
    "moffat_alpha_px",
    "SNR_RADIUS_FWHM",
]

log = logging.getLogger(__name__)

#: Radius (in FWHM) of the circular aperture used for the truth column ``snr_expected``.
SNR_RADIUS_FWHM = 1.0
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
        msg = (
            "need gain_e_per_adu > 0 and read_noise_e >= 0, "
            f"got {gain_e_per_adu!r}, {read_noise_e!r}"
        )
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


#: Names that moved to `rpp_tasks.sim.sessions` (cameras, calibration frames, sessions on disk);
#: imported lazily because that module builds on this one.
_SESSION_NAMES = ("make_camera", "make_calibration_frames", "write_synthetic_session")


def __getattr__(name):
    if name in _SESSION_NAMES:
        from rpp_tasks.sim import sessions

        return getattr(sessions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
