"""The effective PSF of a frame: one pixel-integrated profile on an oversampled grid, plus an
empirical residual map.

build_epsf turns the joint stamp fit of rpp_tasks.stages.psf into an EPSFModel: the profile
sampled on an oversampled grid (pixel values of a unit-flux star whose centre sits at the grid
offset) and, optionally, an empirical residual map stacked from the same stars. EPSFModel.evaluate
interpolates the grid with a cubic-convolution kernel, whose analytic derivative gives the gradient
used for position refinement by rpp_tasks.stages.photometry.psf_photometry.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from rpp_tasks.stages.psf import (
    _U_GAUSS,
    _U_MAX,
    _check_image,
    _drawable,
    _fit_stack,
    _linear_flux_bkg,
    _pix_profile,
    _prepare,
    _refine_centres,
    _StackFit,
    _stamp_pixels,
)

__all__ = ["EPSFModel", "build_epsf"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# effective PSF
# --------------------------------------------------------------------------------------------


def _keys_weights(frac):
    """Cubic-convolution (Keys, a=-0.5) weights and their derivatives for taps -1, 0, 1, 2."""
    f = frac
    f2 = f * f
    f3 = f2 * f
    w = np.stack(
        [
            -0.5 * f3 + f2 - 0.5 * f,
            1.5 * f3 - 2.5 * f2 + 1.0,
            -1.5 * f3 + 2.0 * f2 + 0.5 * f,
            0.5 * f3 - 0.5 * f2,
        ],
        axis=-1,
    )
    dw = np.stack(
        [-1.5 * f2 + 2.0 * f - 0.5, 4.5 * f2 - 5.0 * f, -4.5 * f2 + 4.0 * f + 0.5, 1.5 * f2 - f],
        axis=-1,
    )
    return w, dw


_PAD = 2


@dataclass(frozen=True, eq=False)
class EPSFModel:
    """Effective PSF on an oversampled grid.

    Attributes
    ----------
    data : `numpy.ndarray`
        ``(G, G)`` grid, ``G = oversampling * size_px + 1``; node ``(j, i)`` is the value of the
        pixel whose centre is at offset ``((i - c) / oversampling, (j - c) / oversampling)`` px
        from a unit-flux star, ``c = (G - 1) / 2``. The grid is normalised to unit *total* flux
        (the flux of the star, wings beyond the grid included), so fitted fluxes are total fluxes.
    oversampling : int
    fwhm_px : float
        FWHM of the underlying PSF before pixel integration.
    n_stars : int
        Stars the model was built from.
    beta : float
        Moffat ``beta`` of the analytic part (``inf`` for Gaussian).
    size_px : int
        Width of the grid footprint in pixels.
    flags : tuple of str
    """

    data: np.ndarray
    oversampling: int
    fwhm_px: float
    n_stars: int
    beta: float = math.inf
    size_px: int = 0
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-safe summary (without the grid)."""
        return {
            "oversampling": int(self.oversampling),
            "fwhm_px": float(self.fwhm_px),
            "n_stars": int(self.n_stars),
            "beta": float(self.beta) if math.isfinite(self.beta) else None,
            "size_px": int(self.size_px),
            "grid_shape": list(self.data.shape),
            "flags": list(self.flags),
        }

    @property
    def _padded(self):
        cached = self.__dict__.get("_padded_grid")
        if cached is None:
            cached = np.pad(np.asarray(self.data, np.float64), _PAD + 2)
            object.__setattr__(self, "_padded_grid", cached)
        return cached

    def evaluate(self, dx, dy, *, derivatives=False):
        """
        Pixel values of a unit-flux star for pixel-centre offsets ``(dx, dy)`` from its centre.

        Parameters
        ----------
        dx, dy : array_like
            Offsets in px (``pixel - star``); broadcast together. Outside the grid -> 0.
        derivatives : bool, optional
            Also return ``dE/d(dx)`` and ``dE/d(dy)``.

        Returns
        -------
        values : `numpy.ndarray`
            ``(values)`` or ``(values, d_dx, d_dy)``.
        """
        dx, dy = np.broadcast_arrays(np.asarray(dx, float), np.asarray(dy, float))
        os_ = self.oversampling
        g = self._padded
        c = (self.data.shape[0] - 1) / 2.0 + _PAD + 2
        tx = dx * os_ + c
        ty = dy * os_ + c
        lim = g.shape[0] - 3
        inside = (tx >= 1) & (tx < lim) & (ty >= 1) & (ty < lim)
        tx = np.where(inside, tx, c)
        ty = np.where(inside, ty, c)
        i0 = np.floor(tx).astype(int)
        j0 = np.floor(ty).astype(int)
        wx, dwx = _keys_weights(tx - i0)
        wy, dwy = _keys_weights(ty - j0)
        taps = np.arange(-1, 3)
        vals = g[(j0[..., None, None] + taps[:, None]), (i0[..., None, None] + taps[None, :])]
        out = np.einsum("...ab,...a,...b->...", vals, wy, wx) * inside
        if not derivatives:
            return out
        ddx = np.einsum("...ab,...a,...b->...", vals, wy, dwx) * inside * os_
        ddy = np.einsum("...ab,...a,...b->...", vals, dwy, wx) * inside * os_
        return out, ddx, ddy

    def stamps(self, x, y, half, *, ix=None, iy=None, derivatives=False, integrate=True):
        """
        Model stamps for stars at ``(x, y)`` on the ``(2*half+1)^2`` pixels around ``(ix, iy)``.

        Fast path of `evaluate` (each star has a single sub-pixel phase, so the interpolation
        weights are per star). ``ix, iy`` (integer footprint centres) default to ``rint(x, y)``.
        Returns ``(N, S, S)`` arrays: values, and ``dE/dx_star``, ``dE/dy_star`` (derivatives
        with respect to the star position) when requested.
        """
        x = np.asarray(x, float)
        y = np.asarray(y, float)
        os_ = self.oversampling
        g = self._padded
        c = (self.data.shape[0] - 1) / 2.0 + _PAD + 2
        k = np.arange(-half, half + 1)
        fx = x - (np.rint(x) if ix is None else np.asarray(ix))
        fy = y - (np.rint(y) if iy is None else np.asarray(iy))
        bx = c - fx * os_
        by = c - fy * os_
        bx0 = np.floor(bx)
        by0 = np.floor(by)
        wx, dwx = _keys_weights(bx - bx0)
        wy, dwy = _keys_weights(by - by0)
        taps = np.arange(-1, 3)
        lim = g.shape[0] - 1
        colx = np.clip(
            bx0.astype(int)[:, None, None] + k[None, :, None] * os_ + taps[None, None, :], 0, lim
        )
        rowy = np.clip(
            by0.astype(int)[:, None, None] + k[None, :, None] * os_ + taps[None, None, :], 0, lim
        )
        n = x.size
        s = k.size
        val = np.empty((n, s, s))
        if derivatives:
            gx = np.empty((n, s, s))
            gy = np.empty((n, s, s))
        chunk = 256
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            blk = g[rowy[a:b, :, :, None, None], colx[a:b, None, None, :, :]]  # (n,S,4,S,4)
            val[a:b] = np.einsum("nkalb,na,nb->nkl", blk, wy[a:b], wx[a:b], optimize=True)
            if derivatives:
                gx[a:b] = -os_ * np.einsum(
                    "nkalb,na,nb->nkl", blk, wy[a:b], dwx[a:b], optimize=True
                )
                gy[a:b] = -os_ * np.einsum(
                    "nkalb,na,nb->nkl", blk, dwy[a:b], wx[a:b], optimize=True
                )
        if derivatives:
            return val, gx, gy
        return val

    def render(self, shape, x, y, flux, *, half=None):
        """
        Image of stars at ``(x, y)`` with total fluxes ``flux`` (model of a PSF fit).

        Parameters
        ----------
        shape : tuple of int
            ``(ny, nx)`` of the image.
        x, y, flux : array_like
            Positions (0-based px) and fluxes (ADU); non-finite entries are skipped.
        half : int, optional
            Half-width of each star's footprint; default the whole grid (``size_px // 2``).

        Returns
        -------
        model : `numpy.ndarray`
            float64 image of ``shape``.
        """
        ny, nx = int(shape[0]), int(shape[1])
        x, y, flux = _drawable(shape, x, y, flux)
        if x.size == 0:
            return np.zeros((ny, nx))
        if half is None:
            half = max(1, (int(self.size_px) or (self.data.shape[0] - 1) // self.oversampling) // 2)
        ix = np.rint(x).astype(np.int64)
        iy = np.rint(y).astype(np.int64)
        k = np.arange(-half, half + 1)
        val = self.stamps(x, y, half, ix=ix, iy=iy) * flux[:, None, None]
        flat, inside = _stamp_pixels(shape, ix, iy, k)
        out = np.bincount(flat[inside], val[inside], minlength=ny * nx)
        return out.reshape(ny, nx)


def _analytic_grid(fwhm_px, u, oversampling, size_px):
    g = oversampling * size_px + 1
    off = (np.arange(g) - (g - 1) / 2.0) / oversampling
    return _pix_profile(off[None, :], off[:, None], fwhm_px, u)


def build_epsf(
    data_sub,
    sources,
    *,
    fwhm_px,
    oversampling=4,
    max_stars=150,
    size_px=None,
    rms=None,
    mask=None,
    saturation_adu=None,
    min_peak_snr=10.0,
    residual_correction=True,
    model="moffat",
    beta=None,
):
    """
    Build an effective PSF from isolated, unsaturated bright stars.

    The stars are fitted jointly with a pixel-integrated Moffat (or Gaussian) of shared shape;
    that analytic effective PSF is sampled on a grid oversampled ``oversampling`` times. With
    ``residual_correction`` the flux-normalised fit residuals of the stars are stacked on the
    same grid (by sub-pixel phase), smoothed, shrunk towards zero where not significant and added,
    so departures from the analytic shape (ellipticity, coma) are captured.

    Parameters
    ----------
    data_sub : array_like
        Background-subtracted image (ADU).
    sources : `~astropy.table.Table`
        Detections (see `measure_fwhm`).
    fwhm_px : float
        Current FWHM estimate (px); starting point of the shape fit and default size scale.
    oversampling : int, optional
        Grid oversampling factor.
    max_stars : int, optional
        Use at most this many stars (brightest eligible first).
    size_px : int, optional
        Footprint width in px (odd); default ``2 * ceil(3 * fwhm_px) + 1``.
    rms, mask, saturation_adu, min_peak_snr
        As in `measure_fwhm`.
    residual_correction : bool, optional
        Add the stacked empirical residual to the analytic model.
    model : {"moffat", "gaussian"}, optional
        Analytic part (see `measure_fwhm`).
    beta : float, optional
        When given, the analytic shape is taken as ``(fwhm_px, beta)`` -- e.g. the result of
        `measure_fwhm` on the same image (``inf`` for a Gaussian) -- instead of being fitted again;
        only the star centres, fluxes and the residual map are fitted.

    Returns
    -------
    epsf : `EPSFModel`
        When no star qualifies, an analytic Gaussian of ``fwhm_px`` with flag ``"no_psf_stars"``.

    Raises
    ------
    ValueError
        On shape mismatch or a non-positive ``fwhm_px``.
    """
    _check_image(data_sub, rms, mask)
    if not (fwhm_px is not None and np.isfinite(fwhm_px) and fwhm_px > 0):
        raise ValueError(f"fwhm_px must be a positive number, got {fwhm_px!r}")
    oversampling = int(oversampling)
    if oversampling < 1:
        raise ValueError(f"oversampling must be >= 1, got {oversampling}")
    if size_px is None:
        size_px = 2 * int(math.ceil(3.0 * fwhm_px)) + 1
    size_px = int(size_px) | 1
    half_big = max(4, min(size_px // 2, 30))
    # the shape is fitted on compact stamps of the brightest stars (fast); the residual map
    # is stacked from larger stamps of all selected stars with the shape fixed
    data, idx, half, stamps, w, dx0, dy0, guess = _prepare(
        data_sub,
        sources,
        rms=rms,
        mask=mask,
        saturation_adu=saturation_adu,
        fwhm_guess_px=fwhm_px,
        max_stars=max_stars,
        min_peak_snr=min_peak_snr,
        stamp_half_px=half_big,
    )
    if idx.size == 0:
        log.warning("build_epsf: no eligible PSF star; using a Gaussian of FWHM %.2f px", fwhm_px)
        grid = _analytic_grid(float(fwhm_px), 0.0, oversampling, size_px)
        return EPSFModel(
            grid, oversampling, float(fwhm_px), 0, math.inf, size_px, ("no_psf_stars",)
        )
    if beta is not None and np.isfinite(fwhm_px) and (not np.isfinite(beta) or beta > 1.0):
        u = (
            0.0
            if (not np.isfinite(beta) or model == "gaussian")
            else min(1.0 / float(beta), _U_MAX)
        )
        fit = _StackFit(float(fwhm_px), u, np.nan, None, None, None, None, None, None, [])
    else:
        hs = min(half_big, max(4, int(math.ceil(2.0 * guess))))
        cut = slice(half_big - hs, half_big + hs + 1)
        nfit = min(idx.size, 60)
        sub = (slice(0, nfit), cut, cut)
        fit = _fit_stack(
            stamps[sub], w[sub], dx0[sub], dy0[sub], guess, fit_beta=(model == "moffat")
        )
    flags = list(fit.flags)
    params = (fit.fwhm_px, fit.u)
    grid = _analytic_grid(fit.fwhm_px, fit.u, oversampling, size_px)
    sx = np.zeros(idx.size)
    sy = np.zeros(idx.size)
    _refine_centres(stamps, w, dx0, dy0, params, sx, sy, n_iter=2)
    dxs = dx0 - sx[:, None, None]
    dys = dy0 - sy[:, None, None]
    m = _pix_profile(dxs, dys, *params)
    flux, bkg = _linear_flux_bkg(m, stamps, w)
    chi2 = np.sum((stamps - flux[:, None, None] * m - bkg[:, None, None]) ** 2 * w, axis=(1, 2))
    med = np.median(chi2)
    keep = (flux > 0) & (chi2 < med + 5.0 * max(1.4826 * np.median(np.abs(chi2 - med)), 0.05 * med))
    n_used = int(keep.sum())
    if residual_correction and n_used >= 2 * oversampling**2:
        grid = grid + _residual_grid(
            stamps[keep],
            w[keep],
            dxs[keep],
            dys[keep],
            flux[keep],
            bkg[keep],
            fit.fwhm_px,
            fit.u,
            oversampling,
            grid.shape[0],
        )
    elif residual_correction:
        flags.append("residual_skipped_few_stars")
    beta = math.inf if fit.u < _U_GAUSS else 1.0 / fit.u
    log.info(
        "build_epsf: %d stars, FWHM %.3f px, beta %.2f, grid %s",
        n_used,
        fit.fwhm_px,
        beta,
        grid.shape,
    )
    return EPSFModel(grid, oversampling, fit.fwhm_px, n_used, beta, size_px, tuple(flags))


def _residual_grid(stamps, w, dx, dy, flux, bkg, fwhm_px, u, os_, g):
    """Stacked, smoothed and shrunk flux-normalised residual on the oversampled grid."""
    from scipy.ndimage import convolve

    model = _pix_profile(dx, dy, fwhm_px, u)
    res = (stamps - bkg[:, None, None]) / flux[:, None, None] - model
    wt = w * flux[:, None, None] ** 2  # inverse variance of the normalised residual
    c = (g - 1) / 2.0
    gi = np.rint(dx * os_ + c).astype(int)
    gj = np.rint(dy * os_ + c).astype(int)
    ok = (gi >= 0) & (gi < g) & (gj >= 0) & (gj < g)
    flat = gj[ok] * g + gi[ok]
    sum_w = np.bincount(flat, wt[ok], minlength=g * g).reshape(g, g)
    sum_wr = np.bincount(flat, (wt * res)[ok], minlength=g * g).reshape(g, g)
    ker1 = np.array([1.0, 2.0, 3.0, 2.0, 1.0])
    ker = np.outer(ker1, ker1)
    sw = convolve(sum_w, ker, mode="constant")
    swr = convolve(sum_wr, ker, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(sw > 0, swr / sw, 0.0)
        # variance of the smoothed mean ~ sum(k^2 w) / (sum k w)^2 ~ (sum k^2/sum k^2...) approx
        # 1/sw*eff
        var = np.where(sw > 0, convolve(sum_w, ker**2, mode="constant") / sw**2, np.inf)
    shrink = np.clip(1.0 - 4.0 * var / np.maximum(r**2, 1e-300), 0.0, 1.0)
    return r * shrink
