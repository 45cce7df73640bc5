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
    "FieldPSF",
    "fit_field_psf",
    "choose_psf_order",
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


# --------------------------------------------------------------------------------------------
# PSF varying across the field
# --------------------------------------------------------------------------------------------
#
# Profile (unit total flux), with ``q = a dx^2 + 2 b dx dy + c dy^2`` (a, b, c in 1/px^2) and
# ``u = 1/beta``:
#
#     f = N (1 + k q)^(-1/u),   k = 4 (2^u - 1),   N = k (1/u - 1) sqrt(ac - b^2) / pi
#
# The half maximum is at q = 1/4 whatever u, so a circular star of FWHM F has a = c = 1/F^2, and
# u -> 0 is the Gaussian exp(-4 ln2 q). The ellipse (a, b, c) comes from the FWHM s (geometric
# mean of the axes) and the ellipticity components e1 = e cos 2t, e2 = e sin 2t (e = 1 - b/a, t the
# major-axis angle); s, e1, e2 and u are polynomials of the normalised position. The profile is
# integrated over each pixel by Gauss-Legendre quadrature (3x3 nodes in the core, 2x2 outside).

_U_MIN_FIELD = 1e-4  # u below this is the Gaussian limit numerically (beta = 10 000)
_GL2_NODES = tuple(
    zip(0.5 * np.polynomial.legendre.leggauss(2)[0], 0.5 * np.polynomial.legendre.leggauss(2)[1])
)
_PARAM_NAMES = ("fwhm_px", "e1", "e2", "u")
_FWHM_MIN_PX = 0.5


def _abc_from_shape(s, e1, e2):
    """Quadratic form ``(a, b, c)`` (1/px^2) of an ellipse of FWHM ``s`` (geometric mean of the
    axes) and ellipticity components ``e1, e2`` (``e = 1 - b/a``)."""
    s = np.asarray(s, float)
    e1 = np.asarray(e1, float)
    e2 = np.asarray(e2, float)
    e = np.minimum(np.hypot(e1, e2), 0.9)
    # a PSF narrower than half a pixel is not measurable (pixel integration dominates)
    inv2 = 0.5 / np.maximum(s, _FWHM_MIN_PX) ** 2
    tr = (1.0 - e) + 1.0 / (1.0 - e)
    k = (2.0 - e) / (1.0 - e)
    return inv2 * (tr - e1 * k), -inv2 * e2 * k, inv2 * (tr + e1 * k)


def _abc_jacobian(s, e1, e2, eps=1e-6):
    """d(a, b, c) / d(s, e1, e2) per star: ``(N, 3, 3)``, rows a, b, c (finite differences)."""
    base = np.stack(_abc_from_shape(s, e1, e2), -1)
    cols = []
    for k, h in enumerate((eps * np.maximum(np.abs(s), 1.0), eps, eps)):
        args = [np.asarray(s, float), np.asarray(e1, float), np.asarray(e2, float)]
        args[k] = args[k] + h
        cols.append((np.stack(_abc_from_shape(*args), -1) - base) / np.asarray(h)[..., None])
    return np.stack(cols, -1)


def _poly_terms(order):
    """Exponents ``(i, j)`` of ``X**i Y**j`` for total degree <= order, by degree."""
    return [(d - j, j) for d in range(int(order) + 1) for j in range(d + 1)]


def _poly_basis(x, y, order, norm):
    """``(N, T)`` design of the polynomial terms at positions (x, y)."""
    cx, cy, hx, hy = norm
    xn = (np.asarray(x, float) - cx) / hx
    yn = (np.asarray(y, float) - cy) / hy
    return np.stack([xn**i * yn**j for i, j in _poly_terms(order)], axis=-1)


def _ell_pix(dx, dy, a, b, c, u, *, derivs=False, integrate=True):
    """Pixel-integrated unit-flux elliptical profile at pixel offsets ``(dx, dy)`` (pixel - star).

    ``a, b, c, u`` broadcast against ``dx``. Returns the values, and with ``derivs`` a dict of
    derivatives with respect to ``dx``, ``dy`` (pixel offsets) and ``a, b, c, u``. Without
    ``integrate`` the profile is sampled at the pixel centres (for far wings, where the
    pixel integration changes values by less than 1e-3 of themselves).
    """
    u_in = u
    u = np.clip(u, _U_MIN_FIELD, _U_MAX)
    det = a * c - b * b
    det = np.where(det > 0, det, np.nan)
    kap = 4.0 * (np.exp2(u) - 1.0)
    inv_u = 1.0 / u
    norm = kap * (inv_u - 1.0) * np.sqrt(det) / math.pi
    shape = np.broadcast_shapes(
        np.shape(dx), np.shape(dy), np.shape(a), np.shape(b), np.shape(c), np.shape(u)
    )
    val = np.zeros(shape)
    if derivs:
        acc = {k: np.zeros(shape) for k in ("x", "y", "a", "b", "c", "u")}
        dkap = 4.0 * _LN2 * np.exp2(u)
        dlnn_du = dkap / kap - 1.0 / (u * (1.0 - u))
    if integrate is True or integrate == 3:
        nodes = tuple(zip(_GL_X, _GL_W))
    elif integrate == 2:
        nodes = _GL2_NODES
    else:
        nodes = ((0.0, 1.0),)
    # t = 1 + kap q with q = a ex^2 + 2 b ex ey + c ey^2, assembled from the parts that depend
    # on one node coordinate only (small arrays), then in place on full-size buffers
    ka, kb2, kc = kap * a, 2.0 * kap * b, kap * c
    t = np.empty(shape)
    f = np.empty(shape)
    if derivs:
        lt, rt, g, tmp = (np.empty(shape) for _ in range(4))
    for xi, wi in nodes:
        ex = dx + xi
        tx = ka * ex * ex
        bx = kb2 * ex
        for yj, wj in nodes:
            ey = dy + yj
            np.multiply(bx, ey, out=t)
            t += tx
            t += 1.0 + kc * ey * ey
            wgt = wi * wj
            if not derivs:
                np.log(t, out=f)
                f *= -inv_u
                np.exp(f, out=f)
                f *= wgt
                val += f
                continue
            np.log(t, out=lt)
            np.multiply(lt, -inv_u, out=f)
            np.exp(f, out=f)
            f *= wgt  # the weighted profile at this node
            val += f
            np.divide(1.0, t, out=rt)
            # d f / d q = f (-kap / u) / t, weighted
            np.multiply(f, rt, out=g)
            g *= -inv_u * kap
            np.multiply(g, 2.0 * (a * ex) + 2.0 * (b * ey), out=tmp)
            acc["x"] += tmp
            np.multiply(g, 2.0 * (b * ex) + 2.0 * (c * ey), out=tmp)
            acc["y"] += tmp
            np.multiply(g, ex * ex, out=tmp)
            acc["a"] += tmp
            np.multiply(g, 2.0 * ex, out=tmp)
            tmp *= ey
            acc["b"] += tmp
            np.multiply(g, ey * ey, out=tmp)
            acc["c"] += tmp
            # d f / d u = f (ln t / u^2 - (dkap / kap) (1 - 1/t) / u)
            np.subtract(1.0, rt, out=tmp)
            tmp *= -inv_u * dkap / kap
            lt *= inv_u * inv_u
            tmp += lt
            tmp *= f
            acc["u"] += tmp
    val = val * norm
    if not derivs:
        return val
    out = {"x": acc["x"] * norm, "y": acc["y"] * norm}
    # d ln N / d(a, b, c) = (c, -2b, a) / (2 det)
    out["a"] = acc["a"] * norm + val * (c / (2.0 * det))
    out["b"] = acc["b"] * norm + val * (-b / det)
    out["c"] = acc["c"] * norm + val * (a / (2.0 * det))
    out["u"] = (acc["u"] * norm + val * dlnn_du) * ((u_in >= _U_MIN_FIELD) & (u_in <= _U_MAX))
    return val, out


def _shape_from_abc(a, b, c, u):
    """FWHM (geometric mean of the axes), major/minor FWHM, ellipticity, angle (deg), beta."""
    a, b, c = (np.asarray(v, float) for v in (a, b, c))
    tr = 0.5 * (a + c)
    dd = np.sqrt(np.maximum(0.25 * (a - c) ** 2 + b * b, 0.0))
    lmin = np.maximum(tr - dd, 1e-12)  # along the major axis
    lmax = np.maximum(tr + dd, 1e-12)
    f_major = 1.0 / np.sqrt(lmin)
    f_minor = 1.0 / np.sqrt(lmax)
    theta = 0.5 * np.degrees(np.arctan2(-2.0 * b, c - a))
    u = np.clip(np.asarray(u, float), 0.0, _U_MAX)
    beta = np.where(u < 1.01 * _U_MIN_FIELD, np.inf, 1.0 / np.maximum(u, 1e-300))
    return (
        np.sqrt(f_major * f_minor),
        f_major,
        f_minor,
        1.0 - f_minor / f_major,
        np.mod(theta, 180.0),
        beta,
    )


@dataclass(frozen=True, eq=False)
class FieldPSF:
    """A PSF that varies smoothly across the field: an elliptical Moffat (Gaussian in the limit)
    whose four shape parameters are polynomials of the position.

    Attributes
    ----------
    coeffs : numpy.ndarray
        ``(4, T)`` polynomial coefficients of ``a, b, c`` (1/px^2) and ``u = 1/beta`` over the
        terms ``X**i Y**j`` (total degree <= ``order``, in the order of `_poly_terms`), with
        ``X = (x - cx) / hx``, ``Y = (y - cy) / hy`` (``norm = (cx, cy, hx, hy)``).
    order : int
        Polynomial order (0: the same PSF everywhere).
    norm : tuple of float
    shape : tuple of int
        ``(ny, nx)`` of the frame the model was fitted on.
    n_stars : int
        PSF stars of the final fit.
    size_px : int
        Footprint width (px) used for rendering the model of a star.
    flags : tuple of str
    stats : dict
        Fit statistics (reduced chi^2, stars per order tried, reason for the order).
    """

    coeffs: np.ndarray
    order: int
    norm: tuple
    shape: tuple
    n_stars: int
    size_px: int
    flags: tuple = ()
    stats: dict = field(default_factory=dict)
    oversampling: int = 1  # duck-typing with EPSFModel (analytic model: no grid)
    #: ``(4 T, 4 T)`` covariance of ``coeffs.ravel()`` from the fit (zeros for fixed terms);
    #: None when unknown (e.g. a model rebuilt by `from_dict`)
    cov: np.ndarray | None = None

    # ---------------------------------------------------------------- local parameters
    def shape_params_at(self, x, y):
        """``(fwhm_px, e1, e2, u)`` at positions (the polynomials themselves)."""
        bas = _poly_basis(x, y, self.order, self.norm)
        p = bas @ np.asarray(self.coeffs, float).T  # (..., 4)
        return p[..., 0], p[..., 1], p[..., 2], p[..., 3]

    def params_at(self, x, y):
        """``(a, b, c, u)`` of the profile at positions (arrays of the shape of x, y)."""
        s, e1, e2, u = self.shape_params_at(x, y)
        a, b, c = _abc_from_shape(s, e1, e2)
        return a, b, c, np.clip(u, _U_MIN_FIELD, _U_MAX)

    def shape_at(self, x, y):
        """Local PSF: dict of ``fwhm_px`` (geometric mean of the axes), ``fwhm_major_px``,
        ``fwhm_minor_px``, ``ellipticity`` (1 - b/a), ``theta_deg`` (major axis from +x) and
        ``beta``, as arrays."""
        fw, fa, fb, e, th, beta = _shape_from_abc(*self.params_at(x, y))
        return {
            "fwhm_px": fw,
            "fwhm_major_px": fa,
            "fwhm_minor_px": fb,
            "ellipticity": e,
            "theta_deg": th,
            "beta": beta,
        }

    @property
    def fwhm_px(self) -> float:
        """Median FWHM over the frame (a 9x9 grid of positions)."""
        cached = self.__dict__.get("_fwhm_med")
        if cached is None:
            ny, nx = self.shape
            gx, gy = np.meshgrid(np.linspace(0, nx - 1, 9), np.linspace(0, ny - 1, 9))
            cached = float(np.median(self.shape_at(gx.ravel(), gy.ravel())["fwhm_px"]))
            object.__setattr__(self, "_fwhm_med", cached)
        return cached

    @property
    def beta(self) -> float:
        ny, nx = self.shape
        b = self.shape_at(np.array([(nx - 1) / 2.0]), np.array([(ny - 1) / 2.0]))["beta"]
        return float(b[0])

    def positions_summary(self) -> dict:
        """The local PSF at the centre, the middle of the edges and the corners (JSON-safe)."""
        ny, nx = self.shape
        pts = {
            "centre": ((nx - 1) / 2.0, (ny - 1) / 2.0),
            "corner_ll": (0.0, 0.0),
            "corner_lr": (nx - 1.0, 0.0),
            "corner_ul": (0.0, ny - 1.0),
            "corner_ur": (nx - 1.0, ny - 1.0),
        }
        xs = np.array([p[0] for p in pts.values()])
        ys = np.array([p[1] for p in pts.values()])
        sh = self.shape_at(xs, ys)
        out = {}
        for i, name in enumerate(pts):
            out[name] = {
                "x": float(xs[i]),
                "y": float(ys[i]),
                "fwhm_px": round(float(sh["fwhm_px"][i]), 4),
                "ellipticity": round(float(sh["ellipticity"][i]), 4),
                "theta_deg": round(float(sh["theta_deg"][i]), 2),
                "beta": round(float(sh["beta"][i]), 3) if np.isfinite(sh["beta"][i]) else None,
            }
        return out

    def to_dict(self) -> dict:
        """JSON-safe description: enough to rebuild the model with `from_dict`."""
        return {
            "kind": "field_moffat",
            "model": "elliptical Moffat (Gaussian when beta is inf), pixel-integrated; "
            "fwhm_px, e1, e2 and u = 1/beta are polynomials of X = (x - cx) / hx, Y = (y - cy) / hy",
            "order": int(self.order),
            "n_terms": len(_poly_terms(self.order)),
            "terms": [f"x^{i} y^{j}" for i, j in _poly_terms(self.order)],
            "params": list(_PARAM_NAMES),
            "coeffs": [[float(v) for v in row] for row in np.asarray(self.coeffs)],
            "norm": [float(v) for v in self.norm],
            "shape": [int(v) for v in self.shape],
            "n_stars": int(self.n_stars),
            "size_px": int(self.size_px),
            "fwhm_px": round(self.fwhm_px, 4),
            "at": self.positions_summary(),
            "flags": list(self.flags),
            "stats": _json_clean(self.stats),
        }

    @classmethod
    def from_dict(cls, d) -> FieldPSF:
        """Rebuild a model from `to_dict` output (e.g. a frame's ``summary.json``)."""
        return cls(
            coeffs=np.asarray(d["coeffs"], float),
            order=int(d["order"]),
            norm=tuple(float(v) for v in d["norm"]),
            shape=tuple(int(v) for v in d["shape"]),
            n_stars=int(d.get("n_stars", 0)),
            size_px=int(d.get("size_px", 0)) or 15,
            flags=tuple(d.get("flags", ())),
            stats=dict(d.get("stats", {})),
        )

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, dx, dy, x, y):
        """Pixel values of a unit-flux star at ``(x, y)`` for pixel offsets ``(dx, dy)``."""
        a, b, c, u = self.params_at(np.asarray(x, float), np.asarray(y, float))
        return _ell_pix(np.asarray(dx, float), np.asarray(dy, float), a, b, c, u)

    def stamps(self, x, y, half, *, ix=None, iy=None, derivatives=False, integrate=True):
        """
        Model stamps of unit-flux stars at ``(x, y)`` on the ``(2*half+1)^2`` pixels around
        ``(ix, iy)`` (default ``rint(x, y)``), each with its own local PSF.

        Returns ``(N, S, S)`` values and, with ``derivatives``, ``dE/dx_star`` and ``dE/dy_star``
        (same interface as `EPSFModel.stamps`).
        """
        x = np.atleast_1d(np.asarray(x, float))
        y = np.atleast_1d(np.asarray(y, float))
        ix = np.rint(x) if ix is None else np.asarray(ix)
        iy = np.rint(y) if iy is None else np.asarray(iy)
        k = np.arange(-half, half + 1, dtype=float)
        a, b, c, u = (v[:, None, None] for v in self.params_at(x, y))
        n = x.size
        s = k.size
        val = np.empty((n, s, s))
        if derivatives:
            gx = np.empty((n, s, s))
            gy = np.empty((n, s, s))
        # 3x3 Gauss-Legendre nodes per pixel in the core (|offset| <= ~0.8 FWHM), 2x2 in the
        # wings, where the profile is smooth on the pixel scale (errors < 1e-4 of the peak)
        fwhm_max = float(np.max(1.0 / np.sqrt(np.maximum(self._lmin(a, b, c), 1e-12))))
        hc = min(half, max(1, int(math.ceil(0.8 * fwhm_max))))
        split = integrate is True and hc < half
        kc = np.arange(-hc, hc + 1, dtype=float)
        core = slice(half - hc, half + hc + 1)
        chunk = max(1, 60_000 // (s * s))  # bounds the temporaries of the quadrature
        for i0 in range(0, n, chunk):
            sl = slice(i0, min(n, i0 + chunk))
            ox = (ix[sl] - x[sl])[:, None, None]
            oy = (iy[sl] - y[sl])[:, None, None]
            dx = ox + k[None, None, :]
            dy = oy + k[None, :, None]
            pars = (a[sl], b[sl], c[sl], u[sl])
            quad = 2 if split else integrate
            if derivatives:
                v, d = _ell_pix(dx, dy, *pars, derivs=True, integrate=quad)
                val[sl] = v
                gx[sl] = -d["x"]
                gy[sl] = -d["y"]
                if split:
                    vc, dc = _ell_pix(ox + kc, oy + kc[:, None], *pars, derivs=True)
                    val[sl, core, core] = vc
                    gx[sl, core, core] = -dc["x"]
                    gy[sl, core, core] = -dc["y"]
            else:
                val[sl] = _ell_pix(dx, dy, *pars, integrate=quad)
                if split:
                    val[sl, core, core] = _ell_pix(ox + kc, oy + kc[:, None], *pars)
        if derivatives:
            return val, gx, gy
        return val

    @staticmethod
    def _lmin(a, b, c):
        return 0.5 * (a + c) - np.sqrt(0.25 * (a - c) ** 2 + b * b)

    def render(self, shape, x, y, flux, *, half=None, rms=None, dtype=np.float32, out=None):
        """
        Image of stars at ``(x, y)`` with total fluxes ``flux`` (the model of a PSF fit).

        Each star is drawn over ``half`` px (default ``size_px // 2``); with ``rms`` (a typical
        background noise, ADU) faint stars are drawn only as far as their model exceeds
        ``0.02 * rms`` (bright ones up to 4x ``size_px``), which keeps the render cheap.
        With ``out`` (a C-contiguous array of ``shape``) the stars are added into it.
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
        if out is None:
            out = np.zeros((ny, nx), dtype=dtype)
        result = out
        out = out.reshape(-1)  # a view: added to in place
        dtype = out.dtype
        if not np.any(ok):
            return result
        x, y, flux = x[ok], y[ok], flux[ok]
        h0 = max(1, int(self.size_px) // 2) if half is None else int(half)
        if rms is not None and half is None and np.isfinite(rms) and rms > 0:
            halves = self._footprint_halves(x, y, np.abs(flux), float(rms), h0)
        else:
            halves = np.full(x.size, h0)
        for h in np.unique(halves):
            sel = np.flatnonzero(halves == h)
            ix = np.rint(x[sel]).astype(np.int64)
            iy = np.rint(y[sel]).astype(np.int64)
            k = np.arange(-h, h + 1)
            chunk = max(1, 200_000 // k.size**2)
            for i0 in range(0, sel.size, chunk):
                ss = slice(i0, i0 + chunk)
                s_idx = sel[ss]
                val = self.stamps(x[s_idx], y[s_idx], h, ix=ix[ss], iy=iy[ss])
                val *= flux[s_idx, None, None]
                px = ix[ss, None, None] + k[None, None, :]
                py = iy[ss, None, None] + k[None, :, None]
                inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
                np.add.at(out, (py * nx + px)[inside], val[inside].astype(dtype, copy=False))
        return result

    def radius_below(self, x, y, flux, level):
        """Radius (px, along the major axis) beyond which stars of ``flux`` at ``(x, y)`` fall
        below ``level`` (ADU per pixel; continuous profile)."""
        a, b, c, u = self.params_at(np.asarray(x, float), np.asarray(y, float))
        lmin = 0.5 * (a + c) - np.sqrt(0.25 * (a - c) ** 2 + b * b)
        fwhm_major = 1.0 / np.sqrt(np.maximum(lmin, 1e-12))
        kap = 4.0 * (np.exp2(u) - 1.0)
        peak = (
            np.asarray(flux, float)
            * kap
            * (1.0 / u - 1.0)
            * np.sqrt(np.maximum(a * c - b * b, 1e-30))
            / math.pi
        )
        ratio = np.clip(float(level) / np.maximum(peak, 1e-30), 1e-30, 1.0)
        return fwhm_major * np.sqrt(np.maximum((ratio ** (-u) - 1.0) / kap, 0.0))

    def _footprint_halves(self, x, y, flux, rms, h0):
        """Per-star half-width where the model falls below ``0.02 rms`` (a few sizes)."""
        a, b, c, u = self.params_at(x, y)
        lmin = 0.5 * (a + c) - np.sqrt(0.25 * (a - c) ** 2 + b * b)
        r_major_unit = 1.0 / np.sqrt(np.maximum(lmin, 1e-12))  # FWHM along the major axis
        # peak-normalised Moffat along the major axis: (1 + k q)^(-1/u), q = (r / FWHM)^2
        kap = 4.0 * (np.exp2(u) - 1.0)
        peak = flux * kap * (1.0 / u - 1.0) * np.sqrt(np.maximum(a * c - b * b, 1e-30)) / math.pi
        ratio = np.clip(0.02 * rms / np.maximum(peak, 1e-30), 1e-30, 1.0)
        q_need = (ratio ** (-u) - 1.0) / kap
        r_need = r_major_unit * np.sqrt(np.maximum(q_need, 0.0))
        levels = np.array([h0 // 2, h0, 2 * h0, 4 * h0])
        levels = np.maximum(levels, 3)
        idx = np.searchsorted(levels, r_need)
        return levels[np.minimum(idx, levels.size - 1)]

    def flux_fraction_sigma(self, x, y, radius_px, *, chunk=256):
        """Relative uncertainty that the model's statistical error gives the fraction of a star's
        total flux inside a circle of ``radius_px`` (the extrapolation from a measured aperture,
        or from a fitted footprint, to the total flux): ``sqrt(g^T C g)`` with ``C`` the
        covariance of the polynomial coefficients (`cov`) and ``g`` the derivative of the log
        fraction with respect to them, per star. Zeros when the covariance is unknown."""
        x = np.atleast_1d(np.asarray(x, float))
        y = np.atleast_1d(np.asarray(y, float))
        out = np.zeros(x.size)
        ok = np.isfinite(x) & np.isfinite(y)
        if self.cov is None or not np.any(ok):
            return out
        cov = np.asarray(self.cov, float)
        r = float(radius_px)
        half = int(math.ceil(r)) + 1
        k = np.arange(-half, half + 1, dtype=float)
        idx = np.flatnonzero(ok)
        for i0 in range(0, idx.size, chunk):
            sl = idx[i0 : i0 + chunk]
            ix, iy = np.rint(x[sl]), np.rint(y[sl])
            dx0 = (ix - x[sl])[:, None, None] + k[None, None, :] + 0.0 * k[None, :, None]
            dy0 = (iy - y[sl])[:, None, None] + k[None, :, None] + 0.0 * k[None, None, :]
            bas = _poly_basis(x[sl], y[sl], self.order, self.norm)
            p = bas @ np.asarray(self.coeffs, float).T
            a, b, c = (v[:, None, None] for v in _abc_from_shape(p[:, 0], p[:, 1], p[:, 2]))
            u = np.clip(p[:, 3], _U_MIN_FIELD, _U_MAX)[:, None, None]
            # sampled at the pixel centres: a fraction within a circle of several pixels does not
            # need the pixel integration (its derivatives change by < 1e-3 of themselves)
            val, d = _ell_pix(dx0, dy0, a, b, c, u, derivs=True, integrate=False)
            jac = _abc_jacobian(p[:, 0], p[:, 1], p[:, 2])
            for j, name in enumerate(("fwhm_px", "e1", "e2")):
                d[name] = (
                    d["a"] * jac[:, 0, j, None, None]
                    + d["b"] * jac[:, 1, j, None, None]
                    + d["c"] * jac[:, 2, j, None, None]
                )
            # pixel weights: the part of each pixel inside the circle (linear in the distance)
            m = np.clip(r + 0.5 - np.hypot(dx0, dy0), 0.0, 1.0)
            frac = np.maximum(np.sum(m * val, axis=(1, 2)), 1e-12)
            g = np.stack(
                [np.sum(m * d[key], axis=(1, 2)) / frac for key in ("fwhm_px", "e1", "e2", "u")],
                1,
            )
            grad = (g[:, :, None] * bas[:, None, :]).reshape(sl.size, -1)
            out[sl] = np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", grad, cov, grad), 0.0))
        return out

    def aperture_fractions(self, x, y, radii, *, x_ap=None, y_ap=None, half=None):
        """Fraction of each star's total flux inside circular apertures.

        Parameters
        ----------
        x, y : array_like
            Star centres (0-based px).
        radii : dict
            ``{label: radius_px}``.
        x_ap, y_ap : array_like, optional
            Aperture centres (default the star centres): a misplaced aperture loses light, and
            the fraction says how much.

        Returns
        -------
        dict of numpy.ndarray
            ``{label: fraction}``: exact pixel/circle overlaps (SEP) of the pixel-integrated local
            model; 1 / fraction is the aperture correction to a total flux.
        """
        import sep

        x = np.atleast_1d(np.asarray(x, float))
        y = np.atleast_1d(np.asarray(y, float))
        xa = x if x_ap is None else np.atleast_1d(np.asarray(x_ap, float))
        ya = y if y_ap is None else np.atleast_1d(np.asarray(y_ap, float))
        out = {lab: np.full(x.size, np.nan) for lab in radii}
        ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(xa) & np.isfinite(ya)
        ok &= np.hypot(xa - x, ya - y) < 3.0
        if not np.any(ok):
            return out
        if half is None:
            half = int(math.ceil(max(radii.values()))) + 3
        size = 2 * half + 1
        idx = np.flatnonzero(ok)
        ix = np.rint(xa[idx])
        iy = np.rint(ya[idx])
        st = self.stamps(x[idx], y[idx], half, ix=ix, iy=iy)
        m = idx.size
        ncol = int(math.ceil(math.sqrt(m)))
        nrow = int(math.ceil(m / ncol))
        mosaic = np.zeros((nrow, ncol, size, size))
        mosaic.reshape(nrow * ncol, size, size)[:m] = st
        mosaic = np.ascontiguousarray(
            mosaic.transpose(0, 2, 1, 3).reshape(nrow * size, ncol * size)
        )
        tile = np.arange(m)
        xm = (tile % ncol) * size + half + (xa[idx] - ix)
        ym = (tile // ncol) * size + half + (ya[idx] - iy)
        for lab, r in radii.items():
            out[lab][idx] = sep.sum_circle(mosaic, xm, ym, float(r), subpix=0)[0]
        return out


def _json_clean(obj):
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def choose_psf_order(x, y, shape, *, max_order=3, stars_per_term=6, min_per_cell=2):
    """
    Highest polynomial order the PSF stars can support, and why.

    Order ``o`` (``T = (o+1)(o+2)/2`` terms per shape parameter) needs at least
    ``stars_per_term * T`` stars, and stars spread over the field: the frame cut into
    ``(o+1) x (o+1)`` cells must have at least ``min_per_cell`` stars in every cell but at most
    one (a polynomial is not extrapolated into an empty part of the frame).

    Returns
    -------
    order : int
    reason : str
    """
    ny, nx = (int(shape[0]), int(shape[1]))
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    n = x.size
    for order in range(int(max_order), 0, -1):
        t = (order + 1) * (order + 2) // 2
        if n < stars_per_term * t:
            continue
        g = order + 1
        cx = np.clip((x / nx * g).astype(int), 0, g - 1)
        cy = np.clip((y / ny * g).astype(int), 0, g - 1)
        counts = np.bincount(cy * g + cx, minlength=g * g)
        if np.sum(counts < min_per_cell) <= 1:
            return order, f"{n} stars, {int(np.sum(counts >= min_per_cell))}/{g * g} cells covered"
    return 0, f"{n} stars: too few or too concentrated for a varying PSF"


def _balanced_subset(x, y, peak, shape, max_stars, cells=6):
    """Indices of at most ``max_stars`` stars, round-robin over a cells x cells grid, brightest
    first in each cell (so the corners get their share)."""
    ny, nx = shape
    cx = np.clip((x / nx * cells).astype(int), 0, cells - 1)
    cy = np.clip((y / ny * cells).astype(int), 0, cells - 1)
    cell = cy * cells + cx
    order = np.lexsort((-peak, cell))
    rank = np.empty(x.size, int)
    sorted_cells = cell[order]
    starts = np.searchsorted(sorted_cells, sorted_cells, side="left")
    rank[order] = np.arange(x.size) - starts
    pick = np.lexsort((-peak, rank))
    return pick[:max_stars]


def _field_model(dx0, dy0, sx, sy, bas, theta, derivs=False):
    """Stamps of the PSF stars: 2x2 nodes per pixel, 3x3 in the central 5x5 pixels.

    With ``derivs``, the derivatives with respect to the shape parameters are returned as keys
    ``fwhm_px``, ``e1``, ``e2`` and ``u`` (chain rule through `_abc_from_shape`).
    """
    p = bas @ theta.T
    a, b, c = (v[:, None, None] for v in _abc_from_shape(p[:, 0], p[:, 1], p[:, 2]))
    u = p[:, 3][:, None, None]
    dx = dx0 - sx[:, None, None]
    dy = dy0 - sy[:, None, None]
    s = dx0.shape[1]
    h = s // 2
    hc = min(h, 2)
    core = (slice(None), slice(h - hc, h + hc + 1), slice(h - hc, h + hc + 1))
    out = _ell_pix(dx, dy, a, b, c, u, derivs=derivs, integrate=2 if hc < h else 3)
    if hc < h:
        oc = _ell_pix(dx[core], dy[core], a, b, c, u, derivs=derivs)
        if derivs:
            out[0][core] = oc[0]
            for key in out[1]:
                out[1][key][core] = oc[1][key]
        else:
            out[core] = oc
    if derivs:
        jac = _abc_jacobian(p[:, 0], p[:, 1], p[:, 2])  # (N, 3 [a b c], 3 [s e1 e2])
        d = out[1]
        for j, name in enumerate(("fwhm_px", "e1", "e2")):
            d[name] = (
                d["a"] * jac[:, 0, j, None, None]
                + d["b"] * jac[:, 1, j, None, None]
                + d["c"] * jac[:, 2, j, None, None]
            )
    return out


def _gn_field(
    stamps, var_bkg, good, dx0, dy0, bas, theta, state, *, gain, free, n_iter=25, bkg_prior=0.0
):
    """Levenberg-Marquardt fit of the polynomial shape ``theta`` (4, T) and, per star, flux,
    background and centre shift (``state``: dict of f, b, sx, sy; updated in place).

    The per-star unknowns are eliminated by a Schur complement star by star, so the cost is
    linear in the number of stars. Weights ``1 / (rms^2 + model / gain)`` are updated from the
    model at every iteration. Returns ``(theta, chi2 per star, dof per star)``.
    """
    n, s, _ = stamps.shape
    t = bas.shape[1]
    f, bk, sx, sy = state["f"], state["b"], state["sx"], state["sy"]
    free = np.broadcast_to(np.asarray(free, bool).reshape(4, -1), (4, t))
    free_rows = np.flatnonzero(free.any(axis=1))
    free_flat = np.flatnonzero(free[free_rows].ravel())
    nfree = free_flat.size
    lam = 1e-3
    n_done = 0
    for _ in range(n_iter):
        n_done += 1
        val, d = _field_model(dx0, dy0, sx, sy, bas, theta, derivs=True)
        star = f[:, None, None] * val
        w = good / (var_bkg + (np.maximum(star, 0.0) / gain if gain else 0.0))
        r = stamps - star - bk[:, None, None]
        chi2 = float(np.sum(r * r * w))
        jl = np.stack(
            [val, np.ones_like(val), -f[:, None, None] * d["x"], -f[:, None, None] * d["y"]], 1
        )
        jp = np.stack([f[:, None, None] * d[k] for k in ("fwhm_px", "e1", "e2", "u")], 1)
        jp = jp[:, free_rows]
        rw = r * w
        uu = np.einsum("nisr,njsr,nsr->nij", jl, jl, w)
        if bkg_prior:
            # Gaussian prior b ~ N(0, sigma_b^2): the sky is already subtracted
            uu[:, 1, 1] += bkg_prior
            gl_prior = -bkg_prior * bk
        wp = np.einsum("nisr,njsr,nsr->nij", jl, jp, w)
        dd = np.einsum("nisr,njsr,nsr->nij", jp, jp, w)
        gl = np.einsum("nisr,nsr->ni", jl, rw)
        if bkg_prior:
            gl[:, 1] += gl_prior
            chi2 += float(bkg_prior * np.sum(bk * bk))
        gp = np.einsum("nisr,nsr->ni", jp, rw)
        for _ in range(8):
            ud = uu + lam * np.einsum("nii->ni", uu)[:, :, None] * np.eye(4)
            ud += 1e-12 * np.eye(4)
            try:
                uinv = np.linalg.inv(ud)
            except np.linalg.LinAlgError:
                uinv = np.linalg.pinv(ud)
            wt_ui = np.einsum("nji,njk->nik", wp, uinv)  # Wp^T U^-1
            dred = dd - np.einsum("nik,nkj->nij", wt_ui, wp)
            gred = gp - np.einsum("nik,nk->ni", wt_ui, gl)
            kf = free_rows.size
            smat = np.einsum("nkl,nt,nv->ktlv", dred, bas, bas).reshape(kf * t, kf * t)
            rhs = np.einsum("nk,nt->kt", gred, bas).reshape(kf * t)
            smat = smat[np.ix_(free_flat, free_flat)]
            rhs = rhs[free_flat]
            smat = (
                smat + lam * np.diag(np.diag(smat)) + 1e-12 * np.trace(smat) / nfree * np.eye(nfree)
            )
            try:
                sol = np.linalg.solve(smat, rhs)
            except np.linalg.LinAlgError:
                sol = np.linalg.lstsq(smat, rhs, rcond=None)[0]
            dth = np.zeros(kf * t)
            dth[free_flat] = sol
            dth = dth.reshape(kf, t)
            dpn = dth @ bas.T  # (kf, n)
            dl = np.einsum("nij,nj->ni", uinv, gl - np.einsum("nij,jn->ni", wp, dpn))
            th_new = theta.copy()
            th_new[free_rows] += dth
            f_new = f + dl[:, 0]
            b_new = bk + dl[:, 1]
            sx_new = sx + np.clip(dl[:, 2], -0.5, 0.5)
            sy_new = sy + np.clip(dl[:, 3], -0.5, 0.5)
            v2 = _field_model(dx0, dy0, sx_new, sy_new, bas, th_new)
            r2 = stamps - f_new[:, None, None] * v2 - b_new[:, None, None]
            chi2_new = float(np.sum(r2 * r2 * w)) + float(bkg_prior * np.sum(b_new * b_new))
            if np.isfinite(chi2_new) and chi2_new <= chi2:
                theta, f[:], bk[:], sx[:], sy[:] = th_new, f_new, b_new, sx_new, sy_new
                lam = max(lam / 5.0, 1e-7)
                break
            lam *= 10.0
        else:
            break
        # converged: the accepted step (same weights) improved chi^2 by a negligible amount
        if chi2 - chi2_new <= 0.02 + 1e-7 * chi2_new and lam <= 1e-3:
            break
    val = _field_model(dx0, dy0, sx, sy, bas, theta)
    star = f[:, None, None] * val
    w = good / (var_bkg + (np.maximum(star, 0.0) / gain if gain else 0.0))
    r = stamps - star - bk[:, None, None]
    chi2_star = np.sum(r * r * w, axis=(1, 2))
    dof = np.maximum(np.sum(good, axis=(1, 2)) - 4, 1)
    state["iterations"] = n_done
    return theta, chi2_star, dof


def _field_cov(stamps, var_bkg, good, dx0, dy0, bas, theta, state, *, gain, free, bkg_prior=0.0):
    """Covariance ``(4 T, 4 T)`` of ``theta.ravel()`` at a solution of `_gn_field`: the inverse of
    the undamped Schur complement (per-star flux, background and centre marginalised), scaled by
    the reduced chi^2 when above 1; zeros for the fixed terms."""
    t = bas.shape[1]
    f, bk, sx, sy = state["f"], state["b"], state["sx"], state["sy"]
    free = np.broadcast_to(np.asarray(free, bool).reshape(4, -1), (4, t))
    free_rows = np.flatnonzero(free.any(axis=1))
    free_flat = np.flatnonzero(free[free_rows].ravel())
    val, d = _field_model(dx0, dy0, sx, sy, bas, theta, derivs=True)
    star = f[:, None, None] * val
    w = good / (var_bkg + (np.maximum(star, 0.0) / gain if gain else 0.0))
    r = stamps - star - bk[:, None, None]
    chi2 = float(np.sum(r * r * w))
    dof = float(np.sum(np.maximum(np.sum(good, axis=(1, 2)) - 4, 1)))
    jl = np.stack(
        [val, np.ones_like(val), -f[:, None, None] * d["x"], -f[:, None, None] * d["y"]], 1
    )
    jp = np.stack([f[:, None, None] * d[k] for k in ("fwhm_px", "e1", "e2", "u")], 1)[:, free_rows]
    uu = np.einsum("nisr,njsr,nsr->nij", jl, jl, w) + 1e-12 * np.eye(4)
    if bkg_prior:
        uu[:, 1, 1] += bkg_prior
    wp = np.einsum("nisr,njsr,nsr->nij", jl, jp, w)
    dd = np.einsum("nisr,njsr,nsr->nij", jp, jp, w)
    try:
        uinv = np.linalg.inv(uu)
    except np.linalg.LinAlgError:
        uinv = np.linalg.pinv(uu)
    dred = dd - np.einsum("nji,njk,nkl->nil", wp, uinv, wp)
    kf = free_rows.size
    smat = np.einsum("nkl,nt,nv->ktlv", dred, bas, bas).reshape(kf * t, kf * t)
    smat = smat[np.ix_(free_flat, free_flat)]
    cov = np.zeros((4 * t, 4 * t))
    full_idx = (free_rows[:, None] * t + np.arange(t)[None, :]).ravel()[free_flat]
    cov[np.ix_(full_idx, full_idx)] = np.linalg.pinv(smat) * max(chi2 / max(dof, 1.0), 1.0)
    return cov


def fit_field_psf(
    data_sub,
    sources,
    *,
    rms,
    mask=None,
    gain_e_per_adu=None,
    saturation_adu=None,
    fwhm_guess_px=None,
    max_order=3,
    max_stars=250,
    min_peak_snr=10.0,
    stamp_half_px=None,
    stars_per_term=6,
    model="moffat",
    size_px=None,
    bkg_sigma_adu=None,
    criterion="aic",
    beta_order=2,
):
    """
    Fit a PSF that varies smoothly across the field from the isolated, unsaturated stars.

    The model is an elliptical Moffat (`FieldPSF`; a Gaussian in the limit ``beta -> inf``)
    integrated over the pixels, whose shape parameters ``a, b, c`` (the quadratic form of the
    ellipse) and ``u = 1/beta`` are polynomials of the position. All PSF stars are fitted together:
    the polynomial coefficients are shared, each star has its own flux, local background and
    centre. The per-star unknowns are eliminated star by star (Schur complement), so a
    Levenberg-Marquardt iteration costs one evaluation of the stamps and its derivatives.

    The order is chosen in two steps: `choose_psf_order` caps it from the number and spread of
    the stars; then orders 0, 1, ... up to the cap are fitted in turn (each starting from the
    previous one) and a higher order is kept only when it lowers chi^2 by more than the BIC
    penalty (``ln(n_pixels)`` per added coefficient). A field with one PSF thus gets order 0,
    and a frame with few stars a constant model (recorded in ``stats["order_reason"]``).

    Parameters
    ----------
    data_sub : array_like
        Background-subtracted image (ADU).
    sources : `~astropy.table.Table`
        Detections (``x_centroid``, ``y_centroid``, ``flux``, ``flag``...).
    rms : array_like or float
        Background RMS (ADU).
    mask : array_like of bool, optional
        Bad pixels; stars touching one are not used.
    gain_e_per_adu : float, optional
        For the stars' own shot noise in the weights (``rms^2 + model / gain``).
    saturation_adu : float, optional
        Level of ``data_sub`` above which a star is not used (80 % of it).
    fwhm_guess_px : float, optional
        Starting FWHM.
    max_order : int, optional
        Highest polynomial order tried (0 forces one PSF for the whole frame).
    max_stars : int, optional
        Stars used (spread over the frame, brightest first in each part of it).
    min_peak_snr : float, optional
        Minimum peak / rms of a PSF star.
    stamp_half_px : int, optional
        Half-width of the fitted stamps (default ``ceil(2 FWHM)``, at least 5).
    stars_per_term : int, optional
        See `choose_psf_order`.
    model : {"moffat", "gaussian"}
        ``"gaussian"`` fixes ``u = 0``.
    size_px : int, optional
        Footprint width for rendering (default ``2 ceil(3 FWHM) + 1``).

    Returns
    -------
    psf : `FieldPSF`
        ``None`` when no star qualifies.
    """
    if model not in ("moffat", "gaussian"):
        raise ValueError(f"model must be 'moffat' or 'gaussian', got {model!r}")
    _check_image(data_sub, rms, mask)
    data = np.asarray(data_sub)
    ny, nx = data.shape
    guess0 = fwhm_guess_px
    if guess0 is None and len(sources) and {"a_px", "b_px", "flux"} <= set(sources.colnames):
        # detection second moments of the brighter sources (as `measure_fwhm`)
        bright = np.argsort(-np.asarray(sources["flux"], float))[: max(10, len(sources) // 5)]
        ab = np.asarray(sources["a_px"], float)[bright] * np.asarray(sources["b_px"], float)[bright]
        ab = ab[np.isfinite(ab) & (ab > 0)]
        if ab.size:
            guess0 = float(np.clip(2.3548 * math.sqrt(float(np.median(ab))), 1.0, 30.0))
    half = (
        int(stamp_half_px)
        if stamp_half_px
        else int(min(max(math.ceil(2.0 * (guess0 or 3.5)), 4), 30))
    )
    idx = _select_psf_stars(
        data,
        sources,
        half=half,
        fwhm_px=float(guess0 or 3.5),
        rms=rms,
        mask=mask,
        saturation_adu=saturation_adu,
        max_stars=100_000,
        min_peak_snr=min_peak_snr,
    )
    if idx.size == 0:
        return None
    x, y = _positions(sources)
    x, y = x[idx], y[idx]
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    peak = data[iy, ix].astype(float)
    pick = _balanced_subset(x, y, peak, (ny, nx), int(max_stars))
    idx, x, y, ix, iy = idx[pick], x[pick], y[pick], ix[pick], iy[pick]
    stamps = _gather_stamps(data, ix, iy, half).astype(float)
    k = np.arange(-half, half + 1, dtype=float)
    dx0 = (ix - x)[:, None, None] + k[None, None, :] + 0.0 * k[None, :, None]
    dy0 = (iy - y)[:, None, None] + k[None, :, None] + 0.0 * k[None, None, :]
    rms_arr = np.broadcast_to(np.asarray(rms, np.float32), data.shape)
    var_bkg = _gather_stamps(rms_arr, ix, iy, half).astype(float) ** 2
    good = np.isfinite(stamps) & (var_bkg > 0)
    stamps = np.where(good, stamps, 0.0)
    var_bkg = np.where(good, var_bkg, 1.0)
    good = good.astype(float)

    guess = _initial_fwhm(stamps, half)
    if not (np.isfinite(guess) and guess > 0.8):
        guess = float(guess0 or 3.0)
    flags = []
    norm = ((nx - 1) / 2.0, (ny - 1) / 2.0, max(nx / 2.0, 1.0), max(ny / 2.0, 1.0))
    cap, reason = choose_psf_order(
        x, y, (ny, nx), max_order=max_order, stars_per_term=stars_per_term
    )
    free = np.array([True, True, True, model == "moffat"])
    u0 = 0.3 if model == "moffat" else _U_MIN_FIELD
    state = {key: np.zeros(idx.size) for key in ("f", "b", "sx", "sy")}
    theta = np.zeros((4, 1))
    theta[:, 0] = [guess, 0.0, 0.0, u0]
    val = _field_model(dx0, dy0, state["sx"], state["sy"], np.ones((idx.size, 1)), theta)
    state["f"][:], state["b"][:] = _linear_flux_bkg(val, stamps, good / var_bkg)
    keep = state["f"] > 0
    n_pix_total = float(np.sum(good))
    bkg_prior = 0.0 if bkg_sigma_adu is None else 1.0 / max(float(bkg_sigma_adu), 1e-6) ** 2
    penalty = {"aic": 2.0, "max": -1e9}.get(criterion, math.log(max(n_pix_total, 2.0)))
    orders = [0] + ([1] if cap == 1 else []) + list(range(2, cap + 1))
    tried = []
    best = None
    for order in orders:
        t_new = len(_poly_terms(order))
        th = np.zeros((4, t_new))
        th[:, : theta.shape[1]] = theta
        bas = _poly_basis(x, y, order, norm)
        # the wings (beta) change slowly and are the least constrained: lower order for u
        deg = np.array([i + j for i, j in _poly_terms(order)])
        free_kt = np.repeat(free[:, None], t_new, axis=1)
        free_kt[3] &= deg <= min(order, int(beta_order))
        for rej_pass in range(2 if order == 0 else 1):
            sel = np.flatnonzero(keep)
            st = {key: state[key][sel].copy() for key in ("f", "b", "sx", "sy")}
            th, chi2_s, dof_s = _gn_field(
                stamps[sel],
                var_bkg[sel],
                good[sel],
                dx0[sel],
                dy0[sel],
                bas[sel],
                th,
                st,
                gain=gain_e_per_adu,
                free=free_kt,
                n_iter=30 if order == 0 else 12,
                bkg_prior=bkg_prior,
            )
            state["iterations"] = state.get("iterations", 0) + st["iterations"]
            for key in ("f", "b", "sx", "sy"):
                state[key][sel] = st[key]
            if order == 0 and model == "moffat":
                u_fit = float(th[3, 0])
                if u_fit <= 1.5 * _U_MIN_FIELD or u_fit >= 0.999 * _U_MAX:
                    # Gaussian limit or beta at its bound: beta stays constant over the field
                    th[3, 0] = float(np.clip(u_fit, _U_MIN_FIELD, _U_MAX))
                    free[3] = False
                    flags.append("gaussian_limit" if u_fit < 0.5 else "beta_at_bound")
            red = chi2_s / dof_s
            med = float(np.median(red))
            mad = 1.4826 * float(np.median(np.abs(red - med)))
            bad = (red > med + 5.0 * max(mad, 0.05 * med)) | (st["f"] <= 0)
            if rej_pass == 1 or order > 0 or not np.any(bad):
                break
            if sel.size - bad.sum() < max(5, sel.size // 2):
                break
            keep[sel[bad]] = False
        chi2_tot = float(np.sum(chi2_s))
        n_par = int(free_kt.sum())
        bic = chi2_tot + n_par * penalty
        chi2_red = float(chi2_tot / max(np.sum(dof_s), 1))
        tried.append(
            {
                "order": order,
                "n_stars": int(sel.size),
                "chi2_red": round(chi2_red, 4),
                "bic": round(bic, 1),
            }
        )
        if best is None or bic < best[0]:
            best = (bic, order, th.copy(), sel.copy(), chi2_red, free_kt.copy(), bas)
        theta = th
    fw0 = float(theta[0, 0])
    bic, order, theta, sel, chi2_red, free_best, bas_best = best
    # the coefficients' covariance (per-star unknowns from the last fit: close to the best's)
    cov = _field_cov(
        stamps[sel],
        var_bkg[sel],
        good[sel],
        dx0[sel],
        dy0[sel],
        bas_best[sel],
        theta,
        {key: state[key][sel] for key in ("f", "b", "sx", "sy")},
        gain=gain_e_per_adu,
        free=free_best,
        bkg_prior=bkg_prior,
    )
    if size_px is None:
        size_px = 2 * int(math.ceil(3.0 * fw0)) + 1
    stats = {
        "order_max_allowed": int(cap),
        "order_reason": reason if cap else reason,
        "orders_tried": tried,
        "chi2_red": round(chi2_red, 4),
        "n_candidates": int(idx.size),
        "stamp_half_px": int(half),
        "iterations": int(state.get("iterations", 0)),
        "psf_star_xy": [[round(float(a), 1), round(float(b), 1)] for a, b in zip(x[sel], y[sel])],
    }
    psf = FieldPSF(
        coeffs=theta,
        order=int(order),
        norm=norm,
        shape=(ny, nx),
        n_stars=int(sel.size),
        size_px=int(size_px) | 1,
        flags=tuple(flags),
        stats=stats,
        cov=cov,
    )
    log.info(
        "fit_field_psf: %d stars, order %d (max %d: %s), FWHM %.3f px, chi2_red %.2f",
        sel.size,
        order,
        cap,
        reason,
        psf.fwhm_px,
        chi2_red,
    )
    return psf
