"""Fitting the PSF that varies across the field: the order chosen from the stars, then one
Gauss-Newton fit.

choose_psf_order picks the polynomial order from the number and spread of the PSF stars (a
constant model when there are few, recorded). fit_field_psf fits every PSF star's stamp at once:
the shape parameters (FWHM, e1, e2, 1/beta) are polynomials of position, each star keeps its own
centre, flux and sky, solved by variable projection; the coefficients' covariance is kept for the
model-error term of the photometry. The model itself is rpp_tasks.stages.field_psf.FieldPSF.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from rpp_tasks.stages.field_psf import (
    _FWHM_MIN_PX,
    _U_MIN_FIELD,
    FieldPSF,
    _abc_from_shape,
    _abc_jacobian,
    _ell_pix,
    _poly_basis,
    _poly_terms,
)
from rpp_tasks.stages.psf import (
    _U_MAX,
    _check_image,
    _gather_stamps,
    _initial_fwhm,
    _linear_flux_bkg,
    _positions,
    _select_psf_stars,
)

__all__ = ["choose_psf_order", "fit_field_psf"]

log = logging.getLogger(__name__)


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


def _core(v, core):
    """``v[core]`` of an array that may be one pixel wide along an axis (broadcast there)."""
    return v[tuple(sl if n > 1 else slice(None) for sl, n in zip(core, v.shape))]


def _field_model(dx0, dy0, sx, sy, bas, theta, derivs=False):
    """Stamps of the PSF stars: 2x2 nodes per pixel, 3x3 in the central 5x5 pixels.

    ``dx0``, ``dy0``: pixel offsets ``(N, S, S)``, or ``(N, 1, S)`` and ``(N, S, 1)`` (the same
    values, the quadrature's one-coordinate parts then cost a row instead of a stamp).

    With ``derivs``, the derivatives with respect to the shape parameters are returned as keys
    ``fwhm_px``, ``e1``, ``e2`` and ``u`` (chain rule through `_abc_from_shape`).
    """
    p = bas @ theta.T
    a, b, c = (v[:, None, None] for v in _abc_from_shape(p[:, 0], p[:, 1], p[:, 2]))
    u = p[:, 3][:, None, None]
    dx = dx0 - sx[:, None, None]
    dy = dy0 - sy[:, None, None]
    s = np.broadcast_shapes(dx.shape, dy.shape)[1]
    h = s // 2
    hc = min(h, 2)
    core = (slice(None), slice(h - hc, h + hc + 1), slice(h - hc, h + hc + 1))
    out = _ell_pix(dx, dy, a, b, c, u, derivs=derivs, integrate=2 if hc < h else 3)
    if hc < h:
        oc = _ell_pix(_core(dx, core), _core(dy, core), a, b, c, u, derivs=derivs)
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
    # the model (``val``) and its derivatives (``d``) at the current state: the first trial step
    # of an iteration is evaluated with its derivatives (usually accepted: they serve the next
    # iteration, and its values the end), a retried one (after a rejection) without
    val = d = None
    for _ in range(n_iter):
        n_done += 1
        if d is None:
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
        for trial in range(8):
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
            dth = np.zeros(kf * t)
            if nfree:  # (none: the shape is fixed, only the stars' own unknowns are fitted)
                smat = np.einsum("nkl,nt,nv->ktlv", dred, bas, bas).reshape(kf * t, kf * t)
                rhs = np.einsum("nk,nt->kt", gred, bas).reshape(kf * t)
                smat = smat[np.ix_(free_flat, free_flat)]
                rhs = rhs[free_flat]
                smat = (
                    smat
                    + lam * np.diag(np.diag(smat))
                    + 1e-12 * np.trace(smat) / nfree * np.eye(nfree)
                )
                try:
                    dth[free_flat] = np.linalg.solve(smat, rhs)
                except np.linalg.LinAlgError:
                    dth[free_flat] = np.linalg.lstsq(smat, rhs, rcond=None)[0]
            dth = dth.reshape(kf, t)
            dpn = dth @ bas.T  # (kf, n)
            dl = np.einsum("nij,nj->ni", uinv, gl - np.einsum("nij,jn->ni", wp, dpn))
            th_new = theta.copy()
            th_new[free_rows] += dth
            f_new = f + dl[:, 0]
            b_new = bk + dl[:, 1]
            sx_new = sx + np.clip(dl[:, 2], -0.5, 0.5)
            sy_new = sy + np.clip(dl[:, 3], -0.5, 0.5)
            v2 = _field_model(dx0, dy0, sx_new, sy_new, bas, th_new, derivs=trial == 0)
            v2, d2 = v2 if trial == 0 else (v2, None)
            r2 = stamps - f_new[:, None, None] * v2 - b_new[:, None, None]
            chi2_new = float(np.sum(r2 * r2 * w)) + float(bkg_prior * np.sum(b_new * b_new))
            if np.isfinite(chi2_new) and chi2_new <= chi2:
                theta, f[:], bk[:], sx[:], sy[:] = th_new, f_new, b_new, sx_new, sy_new
                val, d = v2, d2
                lam = max(lam / 5.0, 1e-7)
                break
            lam *= 10.0
        else:
            break
        # converged: the accepted step (same weights) improved chi^2 by a negligible amount
        if chi2 - chi2_new <= 0.02 + 1e-7 * chi2_new and lam <= 1e-3:
            break
    if val is None:
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


def _reduced_chi2_with_floor(stamps, var_bkg, good, dx0, dy0, bas, theta, state, *, gain, floor):
    """Per-star reduced chi^2 with a relative model error ``floor`` (fraction of the model in
    each pixel) added to the noise: what a smooth model cannot follow on a bright star does not
    make it an outlier, a neighbour or a cosmic ray does."""
    f, bk, sx, sy = state["f"], state["b"], state["sx"], state["sy"]
    star = f[:, None, None] * _field_model(dx0, dy0, sx, sy, bas, theta)
    pos = np.maximum(star, 0.0)
    var = var_bkg + (pos / gain if gain else 0.0) + (floor * pos) ** 2
    r = stamps - star - bk[:, None, None]
    dof = np.maximum(np.sum(good, axis=(1, 2)) - 4, 1)
    return np.sum(r * r * good / var, axis=(1, 2)) / dof


def _u_reaches_bound(theta, order, norm, n_grid=9):
    """Whether the ``u = 1/beta`` polynomial of ``theta`` reaches its clip (``_U_MIN_FIELD``,
    ``_U_MAX``) on an ``n_grid`` x ``n_grid`` grid over the frame (corners included)."""
    cx, cy, hx, hy = norm
    g = np.linspace(-1.0, 1.0, n_grid)
    gx, gy = np.meshgrid(cx + hx * g, cy + hy * g)
    u = _poly_basis(gx.ravel(), gy.ravel(), order, norm) @ theta[3]
    return bool(np.any(u >= _U_MAX) or np.any(u <= _U_MIN_FIELD))


def _cv_order_scores(stars, fits, *, gain, bkg_prior, k_folds=5, n_iter=12):
    """Held-out chi^2 of every star under each candidate order, by K-fold cross-validation over
    the stars.

    ``stars``: the kept stars' ``(stamps, var_bkg, good, dx0, dy0)``; ``fits``: per order, its
    ``(theta, free, basis, unknowns)`` fitted on all of them (the starting point). Star ``i`` is
    in fold ``i % k_folds`` (the stars come brightest first round-robin over the frame, so every
    fold gets bright and faint stars from everywhere): deterministic. For each fold the shape is
    fitted on the other folds, then only the held-out stars' flux, sky and centre are fitted with
    that shape fixed. Returns ``(n_orders, n_stars)``.
    """
    n = stars[0].shape[0]
    fold = np.arange(n) % int(k_folds)
    out = np.full((len(fits), n), np.nan)

    def fit(idx, theta, free, bas, unknowns):
        """`_gn_field` of the stars ``idx`` from their own starting unknowns."""
        st = {key: unknowns[key][idx].copy() for key in ("f", "b", "sx", "sy")}
        return _gn_field(
            *(a[idx] for a in stars), bas[idx], theta, st, gain=gain, free=free, n_iter=n_iter,
            bkg_prior=bkg_prior,
        )  # fmt: skip

    for o, (theta, free, bas, unknowns) in enumerate(fits):
        for k in range(int(k_folds)):
            train, held = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
            if held.size == 0:
                continue
            th, _, _ = fit(train, theta.copy(), free, bas, unknowns)  # the shape without them
            _, chi2_s, _ = fit(held, th, np.zeros(4, bool), bas, unknowns)  # shape fixed
            out[o, held] = chi2_s
    return out


def _one_se_choice(scores):
    """Index of the lowest order whose summed held-out chi^2 is within one standard error of the
    best one's, the standard error of the difference from the per-star (paired) differences.
    ``scores``: `_cv_order_scores`. Returns ``(index, summed chi^2 per order, s.e. per order)``."""
    total = np.sum(scores, axis=1)
    best = int(np.argmin(total))
    n = scores.shape[1]
    se = np.array(
        [math.sqrt(n) * float(np.std(s - scores[best], ddof=1)) if n > 1 else 0.0 for s in scores]
    )
    return int(np.flatnonzero(total - total[best] <= se)[0]), total, se


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
    outlier_model_floor=0.02,
    cv_max_stars=100,
    cv_folds=5,
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
    previous one) and a higher order is kept only when it lowers chi^2 by more than the
    ``criterion``'s penalty per added coefficient (AIC: 2; BIC: ``ln(n_pixels)``). A field with
    one PSF thus gets order 0, and a frame with few stars a constant model (recorded in
    ``stats["order_reason"]``). When the chosen model's ``u = 1/beta`` varies and reaches its clip
    (beta 1.3, or the Gaussian limit) somewhere on the frame, the wings' variation is not measured
    there (the clipped ``u`` has no derivative) but extrapolated: the order is refitted with a
    constant ``u`` (flag ``beta_constant``). The cores of undersampled or faint stars do not pin
    the wings, and such a runaway changes every total flux and aperture correction on that side
    of the frame (bench/README.md, real12).

    With few stars (fewer than ``cv_max_stars`` kept), the pixel criterion overstates the evidence:
    a misfit correlated within each star makes its hundred pixels count as far more than one
    star's worth (on undersampled real frames, ~30 stars, AIC kept an order 1 that did not
    reproduce from frame to frame). There the order is chosen by ``cv_folds``-fold
    cross-validation over the stars (`_cv_order_scores`): each order's shape is fitted without a
    fold, the held-out stars' flux, sky and centre are fitted with that shape fixed, and the
    held-out chi^2 summed over all stars; the lowest order within one standard error of the best
    is kept (`_one_se_choice`). ``stats["order_choice"]`` says which ("aic", "bic", "max" or
    "cv"), ``stats["orders_tried"]`` holds each order's ``cv_chi2`` and ``cv_se``.

    Outlier stars (blends, cosmic rays: reduced chi^2 above the median by 5 robust sigma) are
    rejected on the first model that can vary across the field (order 0 when the cap is 0), with
    a relative model error ``outlier_model_floor`` added to their noise: on the constant model the
    brightest stars far from the centre stand out by the PSF's own variation and would be lost
    with the information they carry. The orders are compared on the kept stars (the constant
    model is fitted again without the outliers).

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
    bkg_sigma_adu : float, optional
        Width of the Gaussian prior on each PSF star's local sky offset (the sky map's error).
    criterion : {"aic", "bic", "max"}
        Order selection (``"max"``: the cap).
    beta_order : int, optional
        Highest order of the ``1/beta`` polynomial.
    outlier_model_floor : float, optional
        Relative model error (fraction of the model in each pixel) added to the noise when the
        outliers are judged (0: noise only).
    cv_max_stars : int, optional
        With fewer kept stars than this (and ``criterion`` "aic" or "bic"), the order is chosen
        by cross-validation over the stars instead (see above); 0 never.
    cv_folds : int, optional
        Folds of that cross-validation.

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
    n_candidates = int(idx.size)
    pick = _balanced_subset(x, y, peak, (ny, nx), int(max_stars))
    idx, x, y, ix, iy = idx[pick], x[pick], y[pick], ix[pick], iy[pick]
    stamps = _gather_stamps(data, ix, iy, half).astype(float)
    k = np.arange(-half, half + 1, dtype=float)
    dx0 = (ix - x)[:, None, None] + k[None, None, :]  # (N, 1, S)
    dy0 = (iy - y)[:, None, None] + k[None, :, None]  # (N, S, 1)
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
    # outliers (blends, cosmic rays) are rejected on the first model that can vary across the
    # field: on the constant model the brightest stars far from the centre stand out by the PSF's
    # own variation (chi^2_red 3-10 at peak > 2 000 ADU on the bench frames) and were dropped
    reject_order = orders[1] if len(orders) > 1 else 0
    tried = []

    def _stars(sel):  # the chosen stars' stamps, noise, mask and pixel offsets
        return stamps[sel], var_bkg[sel], good[sel], dx0[sel], dy0[sel]

    def _unknowns(sel):  # a copy of the chosen stars' own flux, sky and centre shift
        return {key: state[key][sel].copy() for key in ("f", "b", "sx", "sy")}

    def _fit(sel, bas_all, th, st, free_kt, n_iter):
        """`_gn_field` of the chosen stars (``st`` updated in place); its iterations counted."""
        th, chi2_s, dof_s = _gn_field(
            *_stars(sel), bas_all[sel], th, st, gain=gain_e_per_adu, free=free_kt,
            n_iter=n_iter, bkg_prior=bkg_prior,
        )  # fmt: skip
        state["iterations"] = state.get("iterations", 0) + st["iterations"]
        return th, chi2_s, dof_s

    fits = []
    for order in orders:
        t_new = len(_poly_terms(order))
        th = np.zeros((4, t_new))
        th[:, : theta.shape[1]] = theta
        bas = _poly_basis(x, y, order, norm)
        # the wings (beta) change slowly and are the least constrained: lower order for u
        deg = np.array([i + j for i, j in _poly_terms(order)])
        free_kt = np.repeat(free[:, None], t_new, axis=1)
        free_kt[3] &= deg <= min(order, int(beta_order))
        for rej_pass in range(2 if order == reject_order else 1):
            sel = np.flatnonzero(keep)
            st = _unknowns(sel)
            th, chi2_s, dof_s = _fit(sel, bas, th, st, free_kt, 30 if order == 0 else 12)
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
            if order == reject_order and outlier_model_floor > 0:
                red = _reduced_chi2_with_floor(
                    *_stars(sel),
                    bas[sel],
                    th,
                    st,
                    gain=gain_e_per_adu,
                    floor=outlier_model_floor,
                )
            med = float(np.median(red))
            mad = 1.4826 * float(np.median(np.abs(red - med)))
            bad = (red > med + 5.0 * max(mad, 0.05 * med)) | (st["f"] <= 0)
            if rej_pass == 1 or order != reject_order or not np.any(bad):
                break
            if sel.size - bad.sum() < max(5, sel.size // 2):
                break
            keep[sel[bad]] = False
        chi2_star = np.full(idx.size, np.nan)
        chi2_star[sel] = chi2_s
        chi2_red = float(np.sum(chi2_s) / max(np.sum(dof_s), 1))
        st_o = _unknowns(sel)
        fits.append([order, th.copy(), sel.copy(), chi2_red, free_kt.copy(), bas, chi2_star, st_o])
        theta = th
    fw0 = float(theta[0, 0])
    # the orders are compared on the same stars, those kept after the rejection: an order fitted
    # before it (the constant model) is fitted again without the outliers
    sel_final = np.flatnonzero(keep)
    best = None
    cands = []
    for entry in fits:
        order, th, sel_o, red_o, free_o, bas_o, chi2_star, st_o = entry
        if sel_o.size != sel_final.size:
            st_o = _unknowns(sel_final)
            th, chi2_s, dof_s = _fit(sel_final, bas_o, th, st_o, free_o, 12)
            sel_o = sel_final
            red_o = float(np.sum(chi2_s) / max(np.sum(dof_s), 1))
            chi2_star = np.full(idx.size, np.nan)
            chi2_star[sel_o] = chi2_s
        bic = float(np.sum(chi2_star[sel_final])) + int(free_o.sum()) * penalty
        tried.append(
            {
                "order": order,
                "n_stars": int(sel_o.size),
                "chi2_red": round(red_o, 4),
                "bic": round(bic, 1),
            }
        )
        cands.append((bic, order, th, sel_o, red_o, free_o, bas_o, st_o))
        if best is None or bic < best[0]:
            best = cands[-1]
    choice = criterion
    if criterion in ("aic", "bic") and len(cands) > 1 and sel_final.size < cv_max_stars:
        scores = _cv_order_scores(
            _stars(sel_final),
            [(c[2], c[5], c[6][sel_final], c[7]) for c in cands],
            gain=gain_e_per_adu,
            bkg_prior=bkg_prior,
            k_folds=min(int(cv_folds), sel_final.size),
        )
        pick_o, total, se = _one_se_choice(scores)
        for entry, tot, err in zip(tried, total, se):
            entry["cv_chi2"], entry["cv_se"] = round(float(tot), 1), round(float(err), 1)
        best, choice = cands[pick_o], "cv"
    bic, order, theta, sel, chi2_red, free_best, bas_best, st_best = best
    if model == "moffat" and np.any(free_best[3, 1:]) and _u_reaches_bound(theta, order, norm):
        # the wings (u = 1/beta) vary across the field and reach the clip of u somewhere on the
        # frame: there the model no longer depends on the u coefficients (`_ell_pix` clips u,
        # its derivative is 0), so the gradient of u is set by extrapolation, not by stars -- on
        # the real Seestar M 94 pair (30 undersampled stars, order 1) beta 1.3 on one side of
        # one frame, 30 % of the light beyond 4 px, and not in the next, 11 s later. That
        # variation is not measured: u is made constant (the chosen order refitted; flag
        # ``beta_constant``; both criteria are kept in ``orders_tried``)
        th_c = theta.copy()
        th_c[3, 1:] = 0.0
        free_c = free_best.copy()
        free_c[3, 1:] = False
        st_c = {key: v.copy() for key, v in st_best.items()}
        th_c, chi2_c, dof_c = _fit(sel, bas_best, th_c, st_c, free_c, 12)
        tried.append(
            {
                "order": order,
                "beta": "constant",
                "n_stars": int(sel.size),
                "chi2_red": round(float(np.sum(chi2_c) / max(np.sum(dof_c), 1)), 4),
                "bic": round(float(np.sum(chi2_c)) + int(free_c.sum()) * penalty, 1),
            }
        )
        theta, free_best, st_best = th_c, free_c, st_c
        chi2_red = float(np.sum(chi2_c) / max(np.sum(dof_c), 1))
        flags.append("beta_constant")
    # the coefficients' covariance at the best fit
    cov = _field_cov(
        *_stars(sel),
        bas_best[sel],
        theta,
        st_best,
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
        "order_choice": choice,
        "chi2_red": round(chi2_red, 4),
        "n_candidates": n_candidates,
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
    if psf.fwhm_px <= 1.02 * _FWHM_MIN_PX:
        # the model's floor, not a measurement (the real PANOPTES frames, 10"/px DSLR, and the
        # block-averaged Feder thumbnail came out at exactly 0.500 px)
        psf = dataclasses.replace(psf, flags=(*psf.flags, "fwhm_at_floor"))
        log.warning(
            "fit_field_psf: the PSF FWHM sits at the model's lower limit %.2f px: the stars are "
            "narrower than a pixel (undersampled or block-averaged data); this FWHM is an upper "
            "bound, not a measurement, and the aperture radii that follow it are minimal",
            _FWHM_MIN_PX,
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
