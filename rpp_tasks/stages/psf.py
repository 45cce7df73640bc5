"""Point-spread function: PSF stars, their joint stamp fit and the frame's FWHM.

The PSF stars are isolated, unsaturated, unmasked, high-S/N detections. Their stamps are fitted
jointly with a *pixel-integrated* circular Moffat profile whose shape (FWHM and ``beta``) is shared
by all stars, while each star keeps its own sub-pixel centre, flux and local background. Fluxes and
backgrounds are solved linearly inside the non-linear fit (variable projection), so the non-linear
problem has only two parameters and costs milliseconds.

The profile is parameterised with ``u = 1 / beta``: ``u = 0`` is exactly a Gaussian, so one
model covers Gaussian and Moffat PSFs without a model choice, and the reported FWHM is the FWHM of
the PSF *before* pixel integration (the pixel convolution is part of the model, not of the answer).

Rooms: this module holds the profile, the star selection, the stamp fit and `measure_fwhm`. The
effective PSF of a frame built from the same fit is `rpp_tasks.stages.epsf`; the PSF varying
across the field is `rpp_tasks.stages.field_psf` (the model) and `rpp_tasks.stages.field_psf_fit`
(its fit). Both share this module's stamp helpers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "FwhmResult",
    "measure_fwhm",
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


def _drawable(shape, x, y, flux):
    """The stars of a model image that can be drawn: finite position and flux, centre on the
    frame (within half a pixel of its edge). Returns ``(x, y, flux)`` of those, as float arrays."""
    ny, nx = int(shape[0]), int(shape[1])
    x, y, flux = (np.asarray(v, float) for v in (x, y, flux))
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux)
    ok &= (x > -0.5) & (y > -0.5) & (x < nx - 0.5) & (y < ny - 0.5)
    return x[ok], y[ok], flux[ok]


def _stamp_pixels(shape, ix, iy, k):
    """Flat indices into an image of ``shape`` of the stamps centred on ``(ix, iy)`` with
    offsets ``k`` (shape ``(n, k.size, k.size)``), and which of them lie on the image."""
    ny, nx = int(shape[0]), int(shape[1])
    px = ix[:, None, None] + k[None, None, :]
    py = iy[:, None, None] + k[None, :, None]
    inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    return py * nx + px, inside


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
    """Indices (into ``sources``) of isolated, unsaturated, unmasked, bright stars, brightest
    first."""
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

    from scipy.optimize import least_squares  # (only this fit needs it: ~0.1 s of import)

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
