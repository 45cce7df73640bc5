"""Point-spread function: FWHM measurement and an effective (pixel-integrated) PSF model.

Both functions work on the same sample of PSF stars: isolated, unsaturated, unmasked, high-S/N
detections. Their stamps are fitted jointly with a *pixel-integrated* circular Moffat profile whose
shape (FWHM and ``beta``) is shared by all stars, while each star keeps its own sub-pixel centre,
flux and local background. Fluxes and backgrounds are solved linearly inside the non-linear fit
(variable projection), so the non-linear problem has only two parameters and costs milliseconds.

The profile is parameterised with ``u = 1 / beta``: ``u = 0`` is exactly a Gaussian, so one
model covers Gaussian and Moffat PSFs without a model choice, and the reported FWHM is the FWHM of
the PSF *before* pixel integration (the pixel convolution is part of the model, not of the answer).

`build_epsf` turns that fit into an `EPSFModel`: the pixel-integrated profile sampled on an
oversampled grid (values are pixel values of a unit-flux star whose centre sits at the grid
offset), plus an optional empirical residual map stacked from the same stars. `EPSFModel.evaluate`
interpolates the grid with a cubic-convolution kernel, whose analytic derivative gives the
gradient used for position refinement by `rpp_tasks.stages.photometry.psf_photometry`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares
from scipy.spatial import cKDTree

__all__ = [
    "FwhmResult",
    "EPSFModel",
    "measure_fwhm",
    "build_epsf",
    "pixel_integrated_profile",
    "profile_fwhm_px",
]

log = logging.getLogger(__name__)

_LN2 = math.log(2.0)
_U_GAUSS = 1e-6  # 1/beta below this is treated as the Gaussian limit
_U_MAX = 1.0 / 1.3  # beta >= 1.3 (a Moffat with beta <= 1 has infinite flux)
# 3-point Gauss-Legendre nodes/weights on [-0.5, 0.5] for pixel integration (exact to degree 5)
_GL_X, _GL_W = np.polynomial.legendre.leggauss(3)
_GL_X = 0.5 * _GL_X
_GL_W = 0.5 * _GL_W


@dataclass(frozen=True)
class FwhmResult:
    """Outcome of `measure_fwhm`.

    Attributes
    ----------
    fwhm_px : float
        FWHM of the PSF before pixel integration (NaN when not measurable).
    fwhm_err_px : float
        1-sigma statistical uncertainty of ``fwhm_px`` from the fit covariance.
    n_stars : int
        Number of stars used in the final fit.
    ellipticity : float
        ``1 - b/a`` from the de-weighted second moments of the fitted stars.
    beta : float
        Moffat ``beta`` (``inf`` for a Gaussian profile).
    method : str
        Description of the estimator.
    flags : tuple of str
        ``"no_psf_stars"``, ``"few_psf_stars"``, ``"beta_at_bound"``, ``"fit_failed"``.
    """

    fwhm_px: float
    fwhm_err_px: float
    n_stars: int
    ellipticity: float
    beta: float
    method: str
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-safe summary (``beta`` = ``None`` when infinite, NaN -> ``None``)."""
        out = {}
        for key in ("fwhm_px", "fwhm_err_px", "ellipticity", "beta"):
            val = float(getattr(self, key))
            out[key] = val if math.isfinite(val) else None
        out.update(n_stars=int(self.n_stars), method=self.method, flags=list(self.flags))
        return out


# --------------------------------------------------------------------------------------------
# analytic profile
# --------------------------------------------------------------------------------------------


def _profile_unit(r2, fwhm_px, u):
    """Unit-flux circular Moffat (``u = 1/beta``; ``u -> 0`` is the Gaussian) at squared radius."""
    if u < _U_GAUSS:
        k = 4.0 * _LN2 / fwhm_px**2
        return np.exp(-k * r2) * (k / math.pi)
    c = 4.0 * (2.0**u - 1.0) / fwhm_px**2  # = 1 / alpha^2
    norm = c * (1.0 / u - 1.0) / math.pi  # (beta - 1) / (pi alpha^2)
    return np.exp(-np.log1p(c * r2) / u) * norm


def pixel_integrated_profile(dx, dy, *, fwhm_px, beta=math.inf):
    """
    Pixel values of a unit-flux circular Moffat/Gaussian star, integrated over the pixels.

    Parameters
    ----------
    dx, dy : array_like
        Offsets (px) of pixel centres from the star centre; broadcast together.
    fwhm_px : float
        FWHM of the profile before pixel integration.
    beta : float, optional
        Moffat ``beta``; ``inf`` (default) gives a Gaussian.

    Returns
    -------
    values : `numpy.ndarray`
        Fraction of the star's flux falling in each pixel.
    """
    u = 0.0 if not math.isfinite(beta) else 1.0 / float(beta)
    return _pix_profile(np.asarray(dx, float), np.asarray(dy, float), float(fwhm_px), u)


def _pix_profile(dx, dy, fwhm_px, u):
    if u < _U_GAUSS:
        # exact: separable error functions
        from scipy.special import erf

        s = fwhm_px / (2.0 * math.sqrt(2.0 * _LN2)) * math.sqrt(2.0)
        fx = 0.5 * (erf((dx + 0.5) / s) - erf((dx - 0.5) / s))
        fy = 0.5 * (erf((dy + 0.5) / s) - erf((dy - 0.5) / s))
        return fx * fy
    out = np.zeros(np.broadcast_shapes(np.shape(dx), np.shape(dy)))
    for xi, wi in zip(_GL_X, _GL_W):
        ddx2 = (dx + xi) ** 2
        for yj, wj in zip(_GL_X, _GL_W):
            out += (wi * wj) * _profile_unit(ddx2 + (dy + yj) ** 2, fwhm_px, u)
    return out


def profile_fwhm_px(fwhm_px, beta=math.inf):
    """FWHM of the profile (identity; kept for symmetry with the ``beta`` convention)."""
    return float(fwhm_px)


# --------------------------------------------------------------------------------------------
# PSF star selection and stamps
# --------------------------------------------------------------------------------------------


def _check_image(data_sub, rms, mask):
    data_sub = np.asarray(data_sub)
    if data_sub.ndim != 2:
        raise ValueError(f"data_sub must be 2-D, got shape {data_sub.shape}")
    if rms is not None and np.ndim(rms) != 0 and np.shape(rms) != data_sub.shape:
        raise ValueError(
            f"rms shape {np.shape(rms)} does not match data_sub shape {data_sub.shape}"
        )
    if mask is not None and np.shape(mask) != data_sub.shape:
        raise ValueError(
            f"mask shape {np.shape(mask)} does not match data_sub shape {data_sub.shape}"
        )


def _positions(sources):
    for xc, yc in (
        ("x_psf", "y_psf"),
        ("x_centroid", "y_centroid"),
        ("x", "y"),
        ("xcentroid", "ycentroid"),
    ):
        if xc in sources.colnames and yc in sources.colnames:
            return (np.asarray(sources[xc], float), np.asarray(sources[yc], float))
    raise ValueError(f"sources need x_centroid/y_centroid columns, got {sources.colnames}")


def _gather_stamps(image, ix, iy, half):
    """(N, S, S) stamps centred on integer pixels (all inside the image)."""
    k = np.arange(-half, half + 1)
    return image[(iy[:, None] + k)[:, :, None], (ix[:, None] + k)[:, None, :]]


def _select_psf_stars(
    data, sources, *, half, fwhm_px, rms, mask, saturation_adu, max_stars, min_peak_snr
):
    """Indices (into ``sources``) of isolated, unsaturated, unmasked, bright stars, brightest first."""
    ny, nx = data.shape
    x, y = _positions(sources)
    n = len(x)
    if n == 0:
        return np.zeros(0, int)
    ok = np.isfinite(x) & np.isfinite(y)
    ix = np.rint(np.where(ok, x, -(10**6))).astype(int)
    iy = np.rint(np.where(ok, y, -(10**6))).astype(int)
    ok &= (ix - half >= 0) & (iy - half >= 0) & (ix + half < nx) & (iy + half < ny)
    if "flag" in sources.colnames:
        ok &= (np.asarray(sources["flag"]) & 0b11) == 0  # SEP: merged / truncated
    # isolation: no other detection within the stamp radius + 2 FWHM
    r_iso = half + 2.0 * fwhm_px
    tree = cKDTree(
        np.column_stack([np.where(np.isfinite(x), x, -1e9), np.where(np.isfinite(y), y, -1e9)])
    )
    counts = np.array([len(c) for c in tree.query_ball_point(np.column_stack([x, y])[ok], r_iso)])
    idx = np.flatnonzero(ok)[counts == 1]
    if idx.size < 5 and "flux" in sources.colnames:
        # crowded wide fields: hardly any star is alone within r_iso; accept stars whose neighbours
        # inside the stamp are all fainter than 3% of them (a <= 3% contamination of the stamp)
        flux = np.asarray(sources["flux"], float)
        cand = np.flatnonzero(ok)
        near = tree.query_ball_point(np.column_stack([x, y])[ok], float(half))
        faint_only = np.array(
            [np.all(flux[[j for j in c if j != i]] < 0.03 * flux[i]) for i, c in zip(cand, near)],
            bool,
        )
        idx = cand[faint_only]
    if idx.size == 0:
        return idx
    stamps = _gather_stamps(data, ix[idx], iy[idx], half)
    peak = stamps[:, half - 1 : half + 2, half - 1 : half + 2].max(axis=(1, 2))
    good = np.all(np.isfinite(stamps), axis=(1, 2))
    if saturation_adu is not None:
        good &= stamps.max(axis=(1, 2)) < 0.8 * float(saturation_adu)
    if mask is not None:
        good &= ~np.any(_gather_stamps(np.asarray(mask, bool), ix[idx], iy[idx], half), axis=(1, 2))
    if rms is not None:
        r = np.broadcast_to(np.asarray(rms, float), data.shape)[iy[idx], ix[idx]]
        good &= peak > min_peak_snr * r
    idx, peak = idx[good], peak[good]
    order = np.argsort(-peak, kind="stable")
    return idx[order][:max_stars]


# --------------------------------------------------------------------------------------------
# joint fit of the stacked stars
# --------------------------------------------------------------------------------------------


@dataclass
class _StackFit:
    fwhm_px: float
    u: float
    fwhm_err_px: float
    xc: np.ndarray
    yc: np.ndarray
    flux: np.ndarray
    bkg: np.ndarray
    chi2: np.ndarray
    keep: np.ndarray
    flags: list = field(default_factory=list)


def _linear_flux_bkg(models, stamps, w):
    """Per-star weighted LSQ of stamps = f * model + b; returns f, b (vectorised 2x2 solve)."""
    s_pp = np.sum(w * models * models, axis=(1, 2))
    s_p = np.sum(w * models, axis=(1, 2))
    s_1 = np.sum(w, axis=(1, 2))
    s_pd = np.sum(w * models * stamps, axis=(1, 2))
    s_d = np.sum(w * stamps, axis=(1, 2))
    det = s_pp * s_1 - s_p**2
    det = np.where(det > 0, det, np.inf)
    f = (s_pd * s_1 - s_p * s_d) / det
    b = (s_pp * s_d - s_p * s_pd) / det
    return f, b


def _refine_centres(stamps, w, dx0, dy0, params, sx, sy, *, n_iter=2):
    """Per-star Gauss-Newton update (in place) of centre shifts ``sx, sy`` with a fixed shape."""
    for _ in range(n_iter):
        m = _pix_profile(dx0 - sx[:, None, None], dy0 - sy[:, None, None], *params)
        eps = 1e-3
        mx = (
            _pix_profile(dx0 - (sx + eps)[:, None, None], dy0 - sy[:, None, None], *params) - m
        ) / eps
        my = (
            _pix_profile(dx0 - sx[:, None, None], dy0 - (sy + eps)[:, None, None], *params) - m
        ) / eps
        basis = np.stack([m, mx, my, np.ones_like(m)], axis=1)  # (N,4,S,S)
        ata = np.einsum("nisr,njsr,nsr->nij", basis, basis, w)
        atb = np.einsum("nisr,nsr,nsr->ni", basis, stamps, w)
        try:
            sol = np.linalg.solve(ata, atb[..., None])[..., 0]
        except np.linalg.LinAlgError:
            return
        f = sol[:, 0]
        good = f > 0
        fs = np.where(good, f, 1.0)
        sx += np.clip(np.where(good, sol[:, 1] / fs, 0.0), -0.5, 0.5)
        sy += np.clip(np.where(good, sol[:, 2] / fs, 0.0), -0.5, 0.5)


def _fit_stack(stamps, w, dx0, dy0, fwhm0, *, fit_beta=True, n_outer=3):
    """Fit shared (fwhm, u) + per-star (xc, yc, flux, bkg) to (N,S,S) stamps.

    ``dx0, dy0`` are (N,S,S) offsets of pixel centres from the initial star centres.
    """
    nst = stamps.shape[0]
    sx = np.zeros(nst)  # centre shifts relative to the initial centres
    sy = np.zeros(nst)
    keep = np.ones(nst, bool)
    sw = np.sqrt(w)
    params = np.array([fwhm0, 0.3 if fit_beta else 0.0])
    flags = []
    res = None

    def model(p, sel):
        return _pix_profile(
            dx0[sel] - sx[sel, None, None], dy0[sel] - sy[sel, None, None], p[0], p[1]
        )

    for outer in range(n_outer):
        sel = keep

        def resid(p, sel=sel):
            m = model(p, sel)
            f, b = _linear_flux_bkg(m, stamps[sel], w[sel])
            return ((stamps[sel] - f[:, None, None] * m - b[:, None, None]) * sw[sel]).ravel()

        lo = [0.3, 0.0]
        hi = [50.0, _U_MAX if fit_beta else 1e-9]
        params = np.clip(params, lo, hi)
        res = least_squares(
            resid,
            params,
            bounds=(lo, hi),
            x_scale=[1.0, 0.1],
            xtol=1e-8,
            ftol=1e-10,
            diff_step=1e-4,
        )
        params = res.x
        _refine_centres(stamps, w, dx0, dy0, params, sx, sy, n_iter=2 if outer == 0 else 1)
        # reject outliers (blends, cosmic rays, galaxies) by reduced chi2
        m = model(params, np.ones(nst, bool))
        f, b = _linear_flux_bkg(m, stamps, w)
        chi2 = np.sum((stamps - f[:, None, None] * m - b[:, None, None]) ** 2 * w, axis=(1, 2))
        chi2 /= max(stamps[0].size - 4, 1)
        med = np.median(chi2[keep])
        mad = 1.4826 * np.median(np.abs(chi2[keep] - med))
        new_keep = (chi2 < med + 5.0 * max(mad, 0.05 * med)) & (f > 0)
        if new_keep.sum() < max(3, nst // 3):
            new_keep = keep
        if outer > 0 and np.array_equal(new_keep, keep):
            keep = new_keep
            break
        keep = new_keep

    # covariance of the shape parameters from the final Jacobian
    fwhm_err = np.nan
    if res is not None and res.jac is not None:
        jac = res.jac
        dof = max(res.fun.size - 4 * int(keep.sum()) - 2, 1)
        s2 = float(np.sum(res.fun**2) / dof)
        try:
            cov = np.linalg.pinv(jac.T @ jac) * s2
            fwhm_err = float(np.sqrt(max(cov[0, 0], 0.0)))
        except np.linalg.LinAlgError:
            pass
        if fit_beta and (params[1] >= _U_MAX * 0.999):
            flags.append("beta_at_bound")
    m = model(params, np.ones(nst, bool))
    f, b = _linear_flux_bkg(m, stamps, w)
    chi2 = np.sum((stamps - f[:, None, None] * m - b[:, None, None]) ** 2 * w, axis=(1, 2))
    return _StackFit(
        float(params[0]),
        float(params[1]),
        fwhm_err,
        sx,
        sy,
        f,
        b,
        chi2 / max(stamps[0].size - 4, 1),
        keep,
        flags,
    )


def _initial_fwhm(stamps, half):
    """Median half-maximum-area FWHM estimate of the stamps (px)."""
    core = stamps[:, half - 1 : half + 2, half - 1 : half + 2].max(axis=(1, 2))
    edge = np.median(
        np.concatenate(
            [stamps[:, 0, :], stamps[:, -1, :], stamps[:, :, 0], stamps[:, :, -1]], axis=1
        ),
        axis=1,
    )
    hm = edge + 0.5 * (core - edge)
    area = np.sum(stamps > hm[:, None, None], axis=(1, 2))
    return float(np.median(2.0 * np.sqrt(area / math.pi)))


def _prepare(
    data_sub,
    sources,
    *,
    rms,
    mask,
    saturation_adu,
    fwhm_guess_px,
    max_stars,
    min_peak_snr,
    stamp_half_px,
):
    data = np.asarray(data_sub, dtype=float)
    if fwhm_guess_px is None:
        if len(sources) and "a_px" in sources.colnames and "b_px" in sources.colnames:
            bright = np.argsort(-np.asarray(sources["flux"], float))[: max(10, len(sources) // 5)]
            ab = (
                np.asarray(sources["a_px"], float)[bright]
                * np.asarray(sources["b_px"], float)[bright]
            )
            ab = ab[np.isfinite(ab) & (ab > 0)]
            fwhm_guess_px = 2.3548 * math.sqrt(float(np.median(ab))) if ab.size else 3.0
        else:
            fwhm_guess_px = 3.0
    fwhm_guess_px = float(min(max(fwhm_guess_px, 1.0), 30.0))
    half = (
        int(stamp_half_px)
        if stamp_half_px
        else int(min(max(math.ceil(2.0 * fwhm_guess_px), 4), 30))
    )
    idx = _select_psf_stars(
        data,
        sources,
        half=half,
        fwhm_px=fwhm_guess_px,
        rms=rms,
        mask=mask,
        saturation_adu=saturation_adu,
        max_stars=max_stars,
        min_peak_snr=min_peak_snr,
    )
    if idx.size == 0:
        return data, idx, half, None, None, None, None, fwhm_guess_px
    x, y = _positions(sources)
    x, y = x[idx], y[idx]
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    stamps = _gather_stamps(data, ix, iy, half)
    k = np.arange(-half, half + 1, dtype=float)
    dx0 = (ix - x)[:, None, None] + k[None, None, :] + 0 * k[None, :, None]
    dy0 = (iy - y)[:, None, None] + k[None, :, None] + 0 * k[None, None, :]
    if rms is not None:
        var = _gather_stamps(np.broadcast_to(np.asarray(rms, float), data.shape), ix, iy, half) ** 2
    else:
        sky = 1.4826 * np.median(np.abs(stamps[:, [0, -1], :]))
        var = np.full(stamps.shape, max(sky, 1e-12) ** 2)
    # shot noise of the star itself (approximate, from the data: only used as weights)
    w = 1.0 / np.maximum(var, 1e-30)
    guess = _initial_fwhm(stamps, half)
    if np.isfinite(guess) and guess > 0.8:
        fwhm_guess_px = guess
    return data, idx, half, stamps, w, dx0, dy0, fwhm_guess_px


def _moments_ellipticity(stamps, dx, dy, flux, fwhm_px):
    """Ellipticity 1-b/a from Gaussian-weighted second moments, de-weighted and pixel-corrected."""
    sig_w2 = (fwhm_px / 2.3548) ** 2
    win = np.exp(-0.5 * (dx**2 + dy**2) / sig_w2)
    wd = win * stamps / flux[:, None, None]
    s = np.sum(wd, axis=(1, 2))
    mxx = np.sum(wd * dx * dx, axis=(1, 2)) / s
    myy = np.sum(wd * dy * dy, axis=(1, 2)) / s
    mxy = np.sum(wd * dx * dy, axis=(1, 2)) / s
    m = np.array([[np.median(mxx), np.median(mxy)], [np.median(mxy), np.median(myy)]])
    try:
        c = np.linalg.inv(np.linalg.inv(m) - np.eye(2) / sig_w2) - np.eye(2) / 12.0
        lam = np.linalg.eigvalsh(c)
    except np.linalg.LinAlgError:
        return np.nan
    if lam[0] <= 0:
        return np.nan
    return float(1.0 - math.sqrt(lam[0] / lam[1]))


def measure_fwhm(
    data_sub,
    sources,
    *,
    rms=None,
    mask=None,
    saturation_adu=None,
    fwhm_guess_px=None,
    max_stars=60,
    min_peak_snr=20.0,
    stamp_half_px=None,
    model="moffat",
):
    """
    Measure the PSF FWHM from isolated bright stars, corrected for pixel integration.

    Parameters
    ----------
    data_sub : array_like
        Background-subtracted image (ADU).
    sources : `~astropy.table.Table`
        Detections with ``x_centroid``, ``y_centroid`` (0-based px) and ideally ``flux``,
        ``flag``, ``a_px``, ``b_px`` (as from `rpp_tasks.stages.detection.detect_sources`).
    rms : array_like or float, optional
        Background RMS map (ADU); used for the S/N cut and as fit weights.
    mask : array_like of bool, optional
        Bad pixels (cosmic rays, saturated, bad columns); stars touching one are skipped.
    saturation_adu : float, optional
        Stars whose stamp maximum exceeds 80% of this value are skipped.
    fwhm_guess_px : float, optional
        Initial FWHM; by default from the detection shapes and the half-maximum area.
    max_stars : int, optional
        Use at most this many (brightest eligible) stars.
    min_peak_snr : float, optional
        Minimum peak / rms for a PSF star.
    stamp_half_px : int, optional
        Half-size of the fitted stamps; default ``ceil(2 * FWHM)`` (clipped to 4..30).
    model : {"moffat", "gaussian"}, optional
        ``"moffat"`` fits ``beta`` too (Gaussian is its limit, so it suits both);
        ``"gaussian"`` fixes the Gaussian shape.

    Returns
    -------
    result : `FwhmResult`
        NaN values with flag ``"no_psf_stars"`` when no star qualifies.

    Raises
    ------
    ValueError
        On shape mismatch or an unknown ``model``.
    """
    if model not in ("moffat", "gaussian"):
        raise ValueError(f"model must be 'moffat' or 'gaussian', got {model!r}")
    _check_image(data_sub, rms, mask)
    method = f"pixel-integrated {model} joint fit"
    data, idx, half, stamps, w, dx0, dy0, guess = _prepare(
        data_sub,
        sources,
        rms=rms,
        mask=mask,
        saturation_adu=saturation_adu,
        fwhm_guess_px=fwhm_guess_px,
        max_stars=max_stars,
        min_peak_snr=min_peak_snr,
        stamp_half_px=stamp_half_px,
    )
    if idx.size == 0:
        log.warning("measure_fwhm: no eligible PSF star among %d sources", len(sources))
        return FwhmResult(np.nan, np.nan, 0, np.nan, np.nan, method, ("no_psf_stars",))
    fit = _fit_stack(stamps, w, dx0, dy0, guess, fit_beta=(model == "moffat"))
    flags = list(fit.flags)
    n_used = int(fit.keep.sum())
    if n_used < 5:
        flags.append("few_psf_stars")
    ell = _moments_ellipticity(
        stamps[fit.keep],
        (dx0 - fit.xc[:, None, None])[fit.keep],
        (dy0 - fit.yc[:, None, None])[fit.keep],
        fit.flux[fit.keep],
        fit.fwhm_px,
    )
    beta = math.inf if fit.u < _U_GAUSS else 1.0 / fit.u
    log.info(
        "measure_fwhm: FWHM %.3f +- %.3f px, beta %.2f, e %.3f from %d stars",
        fit.fwhm_px,
        fit.fwhm_err_px,
        beta,
        ell,
        n_used,
    )
    return FwhmResult(fit.fwhm_px, fit.fwhm_err_px, n_used, ell, beta, method, tuple(flags))


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

    def stamps(self, x, y, half, *, ix=None, iy=None, derivatives=False):
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
        x = np.asarray(x, float)
        y = np.asarray(y, float)
        flux = np.asarray(flux, float)
        ok = (
            np.isfinite(x)
            & np.isfinite(y)
            & np.isfinite(flux)
            & (x > -0.5)
            & (y > -0.5)
            & (x < nx - 0.5)
            & (y < ny - 0.5)
        )
        out = np.zeros(ny * nx)
        if not np.any(ok):
            return out.reshape(ny, nx)
        x, y, flux = x[ok], y[ok], flux[ok]
        if half is None:
            half = max(1, (int(self.size_px) or (self.data.shape[0] - 1) // self.oversampling) // 2)
        ix = np.rint(x).astype(np.int64)
        iy = np.rint(y).astype(np.int64)
        k = np.arange(-half, half + 1)
        val = self.stamps(x, y, half, ix=ix, iy=iy) * flux[:, None, None]
        px = ix[:, None, None] + k[None, None, :]
        py = iy[:, None, None] + k[None, :, None]
        inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        flat = (py * nx + px)[inside]
        out = np.bincount(flat, val[inside], minlength=ny * nx)
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
        # variance of the smoothed mean ~ sum(k^2 w) / (sum k w)^2 ~ (sum k^2/sum k^2...) approx 1/sw*eff
        var = np.where(sw > 0, convolve(sum_w, ker**2, mode="constant") / sw**2, np.inf)
    shrink = np.clip(1.0 - 4.0 * var / np.maximum(r**2, 1e-300), 0.0, 1.0)
    return r * shrink
