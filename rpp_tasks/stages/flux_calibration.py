"""Flux calibration and honest errors of a frame's photometry (after the PSF and aperture fits).

* `calibrate_to_large_aperture`: PSF and corrected aperture fluxes tied to large-aperture fluxes
  through the PSF model's own parameters (a fit with the model's covariance as prior), or by a
  polynomial of the position;
* `measure_model_mismatch` / `add_mismatch_errors`: the relative mismatch left on isolated stars,
  added to the errors;
* `add_psf_model_errors`: the PSF model's own statistical uncertainty (from the covariance of its
  coefficients) and the star's misfit, added to the errors.

Called by `rpp_tasks.stages.photometry.measure_frame` (which still gives the same names).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

from rpp_tasks.stages.phot_common import _MAG_K, _fit_xy, _mags, _sky_variance_fraction

__all__ = [
    "calibrate_to_large_aperture",
    "measure_model_mismatch",
    "add_mismatch_errors",
    "add_psf_model_errors",
]


def _ml_mismatch(d, var, flux, *, max_frac=0.2, exclude=None):
    """Relative error ``eta`` of ``d ~ N(mu, var + (eta F)^2)``, robust to outliers and honest
    with few references (restricted likelihood, robust start).

    * The offset ``mu`` (the references' common ratio) is the weighted mean and the likelihood
      the restricted one (REML: ``+ log sum(w)``), so the one number fitted to the same stars
      does not make ``eta`` too small.
    * Outliers (4 sigma) are judged from a start that one bad star cannot move: ``eta`` such
      that the median of ``z^2`` is that of a chi^2 with one degree of freedom (0.455), then the
      likelihood fit and the clipping are iterated; with at most 50 references each is then also
      judged against the fit without it (leave-one-out). Starting from all stars (the earlier code),
      a single broken reference among eight was absorbed by an ``eta`` large enough to keep it
      within 4 sigma (the 1.1 FWHM aperture of a real Seestar frame: 17.6 % instead of ~3 %).
    * ``eta`` is the maximum of that restricted likelihood. REML makes the estimate of the
      variance ``eta^2`` unbiased with few references (on eight references the plain maximum
      likelihood with the offset fitted to the same stars is ~30 % low in ``eta^2``; the
      posterior mean under a uniform prior on ``eta`` was tried and is ~2x high: test
      ``test_mismatch_term_is_honest_with_few_references_and_one_outlier``).

    ``exclude``: references rejected beforehand (e.g. outliers of another flux type measured
    against the same large-aperture flux). Returns ``(eta, n_used, kept)`` with ``kept`` the
    mask (over the input) of the references used; ``eta`` NaN when fewer than 5.
    """
    d, var, flux = (np.asarray(v, float) for v in (d, var, flux))
    ok = np.isfinite(d) & np.isfinite(var) & (var > 0) & np.isfinite(flux) & (flux > 0)
    if exclude is not None:
        ok &= ~np.asarray(exclude, bool)
    kept = np.zeros(d.size, bool)
    if ok.sum() < 5:
        return float("nan"), int(ok.sum()), kept
    idx = np.flatnonzero(ok)
    d, var, flux = d[ok], var[ok], flux[ok]
    grid = np.concatenate([[0.0], np.geomspace(1e-4, max_frac, 160)])
    tot_all = var[:, None] + (grid[None, :] * flux[:, None]) ** 2  # (n, G)

    def nll(keep):
        w = 1.0 / tot_all[keep]
        mu = np.sum(w * d[keep, None], axis=0) / np.sum(w, axis=0)
        r2 = (d[keep, None] - mu) ** 2
        return np.sum(r2 * w - np.log(w), axis=0) + np.log(np.sum(w, axis=0)), mu

    def zscores(j):
        w = 1.0 / tot_all[:, j]
        mu = np.sum((w * d)[keep]) / np.sum(w[keep])
        return (d - mu) * np.sqrt(w)

    # robust start: the median of z^2 about the median is 0.455 (chi^2, 1 dof)
    dm = d - np.median(d)
    med_z2 = np.median(dm[:, None] ** 2 / tot_all, axis=0)  # decreasing in eta
    j = int(np.argmax(med_z2 <= 0.455)) if np.any(med_z2 <= 0.455) else grid.size - 1
    keep = np.ones(d.size, bool)
    keep = np.abs(zscores(j)) < 4.0
    for _ in range(5):
        if keep.sum() < 5:
            return float("nan"), int(keep.sum()), kept
        f, _ = nll(keep)
        j = int(np.argmin(f))
        new = np.abs(zscores(j)) < 4.0
        if np.array_equal(new, keep):
            break
        keep = new
    if 5 <= keep.sum() <= 50:
        # few references: each is also judged against the fit without it (its own pull on
        # ``eta`` can keep a broken one within 4 sigma)
        loo = keep.copy()
        for i in np.flatnonzero(keep):
            others = keep.copy()
            others[i] = False
            f, mu = nll(others)
            j = int(np.argmin(f))
            loo[i] = abs(d[i] - mu[j]) < 4.0 * math.sqrt(tot_all[i, j])
        keep = loo
    if keep.sum() < 5:
        return float("nan"), int(keep.sum()), kept
    f, _ = nll(keep)
    eta = float(grid[int(np.argmin(f))])
    kept[idx[keep]] = True
    return eta, int(keep.sum()), kept


def _reference_stars(table, radius_px, fwhm, min_snr):
    """Rows usable as flux references: isolated, unmasked, well fitted, PSF S/N > min_snr."""
    n = len(table)
    x, y = _fit_xy(table)
    fpsf = np.asarray(table["flux_psf"], float)
    epsf = np.asarray(table["flux_err_psf"], float)
    sel = np.isfinite(fpsf) & (fpsf > 0) & np.isfinite(epsf) & (fpsf > min_snr * epsf)
    if "bkg_local" in table.colnames:
        sel &= np.isfinite(np.asarray(table["bkg_local"], float))
    if "flag_aper" in table.colnames:
        sel &= np.asarray(table["flag_aper"]) == 0
    if "flag_psf" in table.colnames:
        sel &= (np.asarray(table["flag_psf"]) & 0b1101) == 0
    pts = np.column_stack([np.nan_to_num(x, nan=-1e9), np.nan_to_num(y, nan=-1e9)])
    tree = cKDTree(pts)
    f_any = np.nan_to_num(fpsf, nan=0.0)
    cand = np.flatnonzero(sel)
    for i, nb in zip(cand, tree.query_ball_point(pts[cand], radius_px + 2.0 * fwhm)):
        others = [j for j in nb if j != i]
        if others and np.max(f_any[others]) > 0.01 * f_any[i]:
            sel[i] = False
    return np.flatnonzero(sel), x, y, n


def _large_aperture_fluxes(
    table,
    idx,
    x,
    y,
    resid,
    rms,
    psf_model,
    *,
    radius_px,
    gain,
    mask,
    flux_model=None,
    sky_sigma_adu=None,
):
    """Total flux of stars ``idx`` from the data in a large aperture, and the variance of its
    difference to the PSF flux.

    ``resid`` is the image with every fitted star subtracted: the light of a star within the
    aperture is its PSF flux times the model's aperture fraction plus the residual sum there
    (minus the local sky), so ``F_big = F_psf + (sum(resid) - sky * area) / frac``: the model
    only enters through the small fraction of light beyond the aperture.

    The local sky is the annulus mean ``bkg_local``, or with ``sky_sigma_adu`` (the sky map's
    uncertainty at a star) the sky map itself (``resid`` is already on it): on the residual image
    the annulus holds the star's own residual wings -- the model error these references measure
    -- and would take part of it away. The variance then has the map's error
    ``(area * sky_sigma_adu)^2`` and the model's uncertainty of the light beyond the aperture
    (`FieldPSF.flux_fraction_sigma`) instead of the annulus term, so the few bright references
    do not outweigh the many others by more than they know.
    """
    import sep

    img = np.ascontiguousarray(np.asarray(resid, np.float32))
    var = np.ascontiguousarray(np.asarray(rms, np.float32) ** 2)
    bad = None if mask is None else np.ascontiguousarray(np.asarray(mask, np.uint8))
    s_res, e_res, flg = sep.sum_circle(
        img, x[idx], y[idx], radius_px, var=var, mask=bad, maskthresh=0.0, subpix=0
    )
    area = math.pi * radius_px**2
    bkg = np.asarray(table["bkg_local"], float)[idx] if "bkg_local" in table.colnames else 0.0
    n_ann = (
        np.asarray(table["n_annulus"], float)[idx]
        if "n_annulus" in table.colnames
        else np.full(idx.size, np.inf)
    )
    if sky_sigma_adu is not None:
        bkg = 0.0
        n_ann = np.full(idx.size, np.inf)
    s_res = s_res - bkg * area
    frac = psf_model.aperture_fractions(x[idx], y[idx], {"big": radius_px})["big"]
    fpsf = np.asarray(table["flux_psf"] if flux_model is None else flux_model, float)[idx]
    epsf = np.asarray(table["flux_err_psf"], float)[idx]
    f_big = fpsf + s_res / frac
    # var(F_big) ~ star Poisson inside + sky in the aperture + annulus mean; the PSF fit is the
    # efficient estimator from (mostly) the same pixels: var(F_psf - F_big) = var(F_big) -
    # var(F_psf)
    mean_var = e_res**2 / area
    # the sum's pixel noise: edge pixels enter with their overlap squared (as in the catalogue's
    # apertures, `phot_common._sky_variance_fraction`)
    sky_var = e_res**2 * _sky_variance_fraction(area, radius_px)
    v_big = (np.maximum(fpsf * frac, 0.0) / gain + sky_var + area**2 * mean_var / n_ann) / frac**2
    if sky_sigma_adu is not None:
        sig_frac = psf_model.flux_fraction_sigma(x[idx], y[idx], radius_px)
        v_big = v_big + (area * float(sky_sigma_adu) / frac) ** 2 + (np.abs(f_big) * sig_frac) ** 2
    v_d = np.maximum(v_big - epsf**2, 0.03 * v_big)
    ok = (flg == 0) & np.isfinite(f_big) & (f_big > 0) & np.isfinite(v_d)
    return f_big, v_d, v_big, mean_var, n_ann, ok


def _smooth_fit(x, y, d, var, shape, *, max_order):
    """Weighted polynomial fit of ``d(x, y)`` with the order chosen by AIC, 4-sigma clipped.

    Returns ``(coefficients, order, norm, covariance)`` (evaluate with `_smooth_eval`); the
    covariance is scaled by the reduced chi^2 when that exceeds 1.
    """
    ny, nx = shape
    norm = ((nx - 1) / 2.0, (ny - 1) / 2.0, max(nx / 2.0, 1.0), max(ny / 2.0, 1.0))
    from rpp_tasks.stages.field_psf import _poly_basis

    w = 1.0 / var
    keep = np.ones(d.size, bool)
    best = (np.zeros(1), 0, np.zeros((1, 1)))
    for _ in range(3):
        best_aic = np.inf
        for order in range(int(max_order) + 1):
            terms = (order + 1) * (order + 2) // 2
            if keep.sum() < 4 * terms:
                break
            bas = _poly_basis(x[keep], y[keep], order, norm)
            sw = np.sqrt(w[keep])
            a = bas * sw[:, None]
            coef, *_ = np.linalg.lstsq(a, d[keep] * sw, rcond=None)
            chi2 = float(np.sum(w[keep] * (d[keep] - bas @ coef) ** 2))
            aic = chi2 + 2.0 * terms
            if aic < best_aic:
                chi2_red = chi2 / max(int(keep.sum()) - terms, 1)
                cov = np.linalg.pinv(a.T @ a) * max(chi2_red, 1.0)
                best_aic, best = aic, (coef, order, cov)
        z = (d - _poly_basis(x, y, best[1], norm) @ best[0]) * np.sqrt(w)
        new = np.abs(z) < 4.0
        if np.array_equal(new, keep) or new.sum() < 4:
            break
        keep = new
    return best[0], best[1], norm, best[2]


def _smooth_eval(coef, order, norm, x, y):
    from rpp_tasks.stages.field_psf import _poly_basis

    return _poly_basis(x, y, order, norm) @ coef


def _model_tied_fit(h, d, var, cov):
    """Fit ``d = c0 + h . dp + noise`` with ``c0`` free and ``dp ~ N(0, cov)`` (the PSF model's
    own statistical error as the prior: a ridge towards no model error), 4-sigma clipped.

    ``h``: ``(n, P)`` response of each reference's ratio to the model coefficients; ``var``: the
    ratios' noise variances. Returns ``(c0, dp, post, var_c0, a1)`` (None if singular): ``post``
    the posterior covariance of ``dp`` given ``c0``, ``a1 = cov h^T K 1`` (how ``dp`` moves
    with ``c0``), so a correction ``c0 + h_j . dp`` is known to
    ``h_j^T post h_j + (1 - h_j . a1)^2 var_c0`` (universal kriging).
    """
    keep = np.ones(d.size, bool)
    res = None
    for _ in range(3):
        hk, dk, wk = h[keep], d[keep], 1.0 / var[keep]
        # K = (H C H^T + D)^-1 by the Woodbury identity in its form for a singular C (the fixed
        # terms' rows are zero): K v = D^-1 v - D^-1 H C (I + H^T D^-1 H C)^-1 H^T D^-1 v, so the
        # cost is O(n P^2), not O(n^3) (a 61-Mpx frame has ~4000 references)
        hw = hk * wk[:, None]
        try:
            mh = np.linalg.solve(np.eye(cov.shape[0]) + (hk.T @ hw) @ cov, hw.T)  # (P, n)
        except np.linalg.LinAlgError:
            return res

        def kin(v, hw=hw, mh=mh, wk=wk):
            return (wk * v.T).T - hw @ (cov @ (mh @ v))

        one = np.ones(dk.size)
        k_one = kin(one)
        var_c0 = 1.0 / float(one @ k_one)
        c0 = float(k_one @ dk) * var_c0
        dp = cov @ (hk.T @ kin(dk - c0))
        post = cov - cov @ (hk.T @ kin(hk)) @ cov
        res = (c0, dp, 0.5 * (post + post.T), var_c0, cov @ (hk.T @ k_one))
        z = (d - c0 - h @ dp) / np.sqrt(var)
        new = np.abs(z) < 4.0
        if np.array_equal(new, keep) or new.sum() < 10:
            break
        keep = new
    return res


def _references(
    table, resid, rms, psf_model, *, radius_fwhm, min_snr, min_stars, gain, mask,
    sky_sigma_adu=None, flux_model=None,
):  # fmt: skip
    """The isolated reference stars and their large-aperture fluxes, measured the same way for
    the calibration and for the mismatch: ``(fwhm, radius, idx, x, y, fluxes)`` with ``fluxes``
    what `_large_aperture_fluxes` returns, or None when fewer than ``min_stars`` references."""
    fwhm = float(table.meta.get("fwhm_px", psf_model.fwhm_px))
    r_in = float((table.meta.get("annulus_px") or [3.0 * fwhm])[0])
    radius = min(radius_fwhm * fwhm, 0.95 * r_in)
    idx, x, y, _ = _reference_stars(table, radius, fwhm, min_snr)
    if idx.size < min_stars:
        return fwhm, radius, idx, x, y, None
    fluxes = _large_aperture_fluxes(
        table, idx, x, y, resid, rms, psf_model, radius_px=radius, gain=gain, mask=mask,
        flux_model=flux_model, sky_sigma_adu=sky_sigma_adu,
    )  # fmt: skip
    return fwhm, radius, idx, x, y, fluxes


def calibrate_to_large_aperture(
    table,
    resid,
    rms,
    psf_model,
    *,
    gain_e_per_adu,
    exptime_s,
    mask=None,
    radius_fwhm=2.5,
    min_snr=30.0,
    max_order=3,
    sky_sigma_adu=None,
    method="model",
):
    """
    Tie the PSF and the corrected aperture fluxes to large-aperture fluxes across the field.

    Whatever the PSF model gets wrong -- its shape where the polynomials cannot follow the optics,
    its wings -- biases the PSF fluxes and the aperture corrections by a factor that changes
    smoothly over the field. On isolated bright stars the flux in a large aperture
    (``radius_fwhm`` FWHM, see `_large_aperture_fluxes`: the model only enters through the light
    beyond it) is compared with the PSF flux and with each corrected aperture flux, and every
    star's flux is divided by a correction (DAOPHOT's aperture correction of PSF magnitudes, made
    to follow the field). Modifies ``table`` in place.

    ``method="model"`` (when the model has a covariance, `FieldPSF.cov`): the correction is tied
    to the model's own parameters. To first order a coefficient error ``dp`` moves a PSF flux by
    ``-g_fit . dp`` and a flux corrected to a total within radius ``r`` by ``-g_r . dp``
    (`FieldPSF.flux_responses`), so a reference's ratio is ``c0 + (g_big - g_fit) . dp``. ``dp``
    is fitted with the model's covariance as its prior (a ridge towards no error, no free
    amplitude) and ``c0`` free (one free number), 4-sigma clipped; each star is corrected by its
    own ``c0 - g . dp``, which includes the model's share of light beyond the large aperture
    (the reference's own extrapolation), and the posterior uncertainty of that correction goes
    into its error. ``method="poly"`` (or no covariance): the ratios are fitted by a polynomial
    of the position (order <= ``max_order`` chosen by AIC, weighted by their noise, 4-sigma
    clipped). ``sky_sigma_adu``: the sky map's uncertainty at a star; given, the references
    stand on the sky map rather than on their annulus (see `_large_aperture_fluxes`).

    Returns
    -------
    info : dict
        Per flux type: method, polynomial order (-1 for the model-tied fit), median and range of
        the correction (mag) and the stars used; ``{}`` when fewer than 10 reference stars.
    """
    n = len(table)
    if n == 0 or "flux_psf" not in table.colnames:
        return {}
    fwhm, radius, idx, x, y, fluxes = _references(
        table, resid, rms, psf_model, radius_fwhm=radius_fwhm, min_snr=min_snr, min_stars=10,
        gain=gain_e_per_adu, mask=mask, sky_sigma_adu=sky_sigma_adu,
    )  # fmt: skip
    if fluxes is None:
        return {"n_stars": int(idx.size), "applied": False}
    f_big, v_d, v_big, mean_var, n_ann, ok = fluxes
    table.meta["_flux_psf_subtracted"] = np.asarray(table["flux_psf"], float).copy()
    if ok.sum() < 10:
        return {"n_stars": int(ok.sum()), "applied": False}
    shape = psf_model.shape
    info = {"n_stars": int(ok.sum()), "radius_px": round(radius, 3), "applied": True}
    xr, yr = x[idx][ok], y[idx][ok]
    xs_all, ys_all = _fit_xy(table)
    radii = table.meta.get("aperture_radii_px") or {}
    labels = ["psf"] + [k for k in radii if radii[k] < radius and f"apcorr_{k}" in table.colnames]
    resp = None
    if method == "model" and getattr(psf_model, "cov", None) is not None:
        fit_half = int(round(2.0 * fwhm))
        if getattr(psf_model, "size_px", None):
            fit_half = min(fit_half, int(psf_model.size_px) // 2)
        rms_a = np.asarray(rms)
        iy = np.clip(np.nan_to_num(np.rint(ys_all), nan=0).astype(int), 0, rms_a.shape[0] - 1)
        ix = np.clip(np.nan_to_num(np.rint(xs_all), nan=0).astype(int), 0, rms_a.shape[1] - 1)
        resp = psf_model.flux_responses(
            xs_all,
            ys_all,
            {"big": radius, **{k: float(radii[k]) for k in labels if k != "psf"}},
            fit_half=max(fit_half, 3),
            flux=np.asarray(table["flux_psf"], float),
            sky_var=np.asarray(rms_a[iy, ix], float) ** 2,
            gain=gain_e_per_adu,
        )
        cov_model = np.asarray(psf_model.cov, float)
    ref_corr, cal_sigma = {}, {}
    table.meta["_reference_corrections"] = ref_corr
    table.meta["_calibration_sigma"] = cal_sigma
    for lab in labels:
        f = np.asarray(table[f"flux_{lab}"], float)
        fi = f[idx][ok]
        if lab == "psf":
            var = v_d[ok]
        else:
            k = np.asarray(table[f"apcorr_{lab}"], float)[idx][ok]
            el = np.asarray(table[f"flux_err_{lab}"], float)[idx][ok] / k
            r = float(radii[lab])
            area_s = math.pi * r * r
            s_small = fi / k
            cov = np.maximum(s_small, 0.0) / gain_e_per_adu + area_s * mean_var[ok]
            cov = cov + area_s * math.pi * radius**2 * mean_var[ok] / n_ann[ok]
            frac = psf_model.aperture_fractions(xr, yr, {"b": radius})["b"]
            var = k**2 * el**2 + v_big[ok] - 2.0 * k / frac * cov
            var = np.maximum(var, 0.05 * (k**2 * el**2 + v_big[ok]))
        good = np.isfinite(fi) & (fi > 0) & np.isfinite(var) & (var > 0)
        if good.sum() < 10:
            continue
        fb = f_big[ok][good]
        d = fi[good] / fb - 1.0
        fitted = None
        if resp is not None:
            h_all = resp["big"] - resp["fit" if lab == "psf" else lab]
            h_ref = h_all[idx][ok][good]
            fitted = _model_tied_fit(h_ref, d, var[good] / fb**2, cov_model)
        if fitted is not None:
            c0, dp, post, var_c0, a1 = fitted
            # the flux's own error, -g . dp (the reference's share, g_big . dp, included)
            h_use = -resp["fit" if lab == "psf" else lab]
            corr = np.clip(1.0 + c0 + h_use @ dp, 0.8, 1.25)
            v_cal = np.einsum("ni,ij,nj->n", h_use, post, h_use)
            v_cal = v_cal + (1.0 - h_use @ a1) ** 2 * var_c0
            sig_cal = np.sqrt(np.maximum(v_cal, 0.0))
            # for the mismatch: the references' own share (light beyond the large aperture), and
            # the correction's uncertainty (the mismatch measured on the references includes it)
            ref_corr[lab] = 1.0 - resp["big"] @ dp
            cal_sigma[lab] = sig_cal
            order = -1
        else:
            coef, order, norm, cov = _smooth_fit(
                xr[good], yr[good], d, var[good] / fb**2, shape, max_order=max_order
            )
            from rpp_tasks.stages.field_psf import _poly_basis

            bas_all = _poly_basis(xs_all, ys_all, order, norm)
            corr = np.clip(1.0 + bas_all @ coef, 0.8, 1.25)
            # the correction is known to sigma_cal (relative): part of each star's error
            sig_cal = np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", bas_all, cov, bas_all), 0.0))
        table[f"flux_{lab}"] = f / corr
        err = np.asarray(table[f"flux_err_{lab}"], float) / corr
        table[f"flux_err_{lab}"] = np.sqrt(
            err**2 + (sig_cal * np.abs(np.nan_to_num(f / corr))) ** 2
        )
        mag, mag_err, snr = _mags(table[f"flux_{lab}"], table[f"flux_err_{lab}"], exptime_s)
        table[f"mag_{lab}"] = mag
        table[f"mag_err_{lab}"] = mag_err
        table[f"snr_{lab}"] = snr
        if f"apcorr_{lab}" in table.colnames:
            table[f"apcorr_{lab}"] = np.asarray(table[f"apcorr_{lab}"], float) / corr
        m = 2.5 * np.log10(corr[np.isfinite(corr)])
        info[lab] = {
            "method": "poly" if fitted is None else "model",
            "order": int(order),
            "sigma_median_mag": round(float(_MAG_K * np.median(sig_cal)), 5),
            "median_mag": round(float(np.median(m)), 5),
            "p01_mag": round(float(np.percentile(m, 1)), 5),
            "p99_mag": round(float(np.percentile(m, 99)), 5),
        }
    table.meta["flux_calibration"] = info
    return info


def measure_model_mismatch(
    table,
    resid,
    rms,
    psf_model,
    *,
    gain_e_per_adu,
    mask=None,
    radius_fwhm=2.5,
    min_snr=30.0,
    sky_sigma_adu=None,
):
    """
    Measure what the PSF fluxes and corrected aperture fluxes still get wrong, on isolated stars.

    The same large-aperture reference as `calibrate_to_large_aperture`. For the PSF flux and each
    corrected aperture flux, the differences to it are compared with their expected noise (the
    PSF fit is the efficient estimator, so ``var(F_psf - F_big) = var(F_big) - var(F_psf)``;
    nested apertures share their inner pixels) and the relative error ``eta`` that makes them
    consistent is estimated from their likelihood (`_ml_mismatch`: restricted likelihood, outliers
    judged from a robust start, so that the 5-10 references of a small frame give an unbiased
    ``eta^2`` and not one outlier's figure). A reference rejected as an outlier
    in the PSF comparison is left out of the aperture comparisons (its large-aperture flux is the
    suspect). The reported errors then need ``(eta F)^2`` added (`add_mismatch_errors`).
    ``sky_sigma_adu`` as for `calibrate_to_large_aperture`: the
    references must stand on the same sky as the calibration that was applied, or the
    difference between the two skies is taken for a model error.

    Returns
    -------
    result : dict
        ``{"psf": eta, "<label>": eta, ..., "n_stars": n}``.
    """
    out = {"n_stars": 0}
    # a model-tied calibration also corrected the references' extrapolation beyond the aperture
    ref_corr = table.meta.pop("_reference_corrections", None) or {}
    n = len(table)
    if n == 0 or "flux_psf" not in table.colnames:
        return out
    _, radius, idx, x, y, fluxes = _references(
        table, resid, rms, psf_model, radius_fwhm=radius_fwhm, min_snr=min_snr, min_stars=5,
        gain=gain_e_per_adu, mask=mask, sky_sigma_adu=sky_sigma_adu,
        flux_model=table.meta.pop("_flux_psf_subtracted", None),
    )  # fmt: skip
    if fluxes is None:
        out["n_stars"] = int(idx.size)
        return out
    f_big, v_d, v_big, mean_var, n_ann, ok = fluxes
    fp = np.asarray(table["flux_psf"], float)[idx]
    f_ref = f_big / ref_corr["psf"][idx] if "psf" in ref_corr else f_big
    eta, n_used, kept = _ml_mismatch(fp - f_ref, v_d, f_ref, exclude=~ok)
    # a reference the PSF comparison rejected has a broken large-aperture flux (or is not a
    # single star): it is left out of the aperture comparisons too (same reference flux)
    rejected = ok & ~kept if np.isfinite(eta) else np.zeros(ok.size, bool)
    out.update(n_stars=int(n_used), radius_px=round(float(radius), 3), psf=eta)
    radii = table.meta.get("aperture_radii_px") or {}
    xr, yr = x[idx], y[idx]
    frac = psf_model.aperture_fractions(xr, yr, {"b": radius})["b"]
    for lab, r in radii.items():
        if r >= radius or f"apcorr_{lab}" not in table.colnames:
            continue
        k = np.asarray(table[f"apcorr_{lab}"], float)[idx]
        fl = np.asarray(table[f"flux_{lab}"], float)[idx]
        el = np.asarray(table[f"flux_err_{lab}"], float)[idx] / k
        area_s = math.pi * r * r
        cov = np.maximum(fl / k, 0.0) / gain_e_per_adu + area_s * mean_var
        cov = cov + area_s * math.pi * radius**2 * mean_var / n_ann
        v_dl = k**2 * el**2 + v_big - 2.0 * k / frac * cov
        v_dl = np.maximum(v_dl, 0.05 * (k**2 * el**2 + v_big))
        good = ok & np.isfinite(fl) & np.isfinite(k)
        f_ref = f_big / ref_corr[lab][idx] if lab in ref_corr else f_big
        eta_l, _, _ = _ml_mismatch(fl - f_ref, v_dl, f_ref, exclude=~good | rejected)
        out[lab] = eta_l
    return out


def add_mismatch_errors(table, mismatch, *, exptime_s):
    """Add ``(eta F)^2`` of `measure_model_mismatch` to the flux variances (in place).

    For fluxes whose calibration was tied to the PSF model (their error already holds the
    correction's posterior ``sigma_cal``, which the mismatch measured on the references
    includes), only ``max(eta^2 - sigma_cal^2, 0) F^2`` is added: the larger of the two
    estimates of one term."""
    cal_sigma = table.meta.pop("_calibration_sigma", None) or {}
    labels = [k for k in mismatch if k == "psf" or f"flux_{k}" in table.colnames]
    for lab in labels:
        eta = mismatch.get(lab)
        if eta is None or not np.isfinite(eta) or eta <= 0 or f"flux_{lab}" not in table.colnames:
            continue
        f = np.asarray(table[f"flux_{lab}"], float)
        e = np.asarray(table[f"flux_err_{lab}"], float)
        add = np.maximum(eta**2 - np.asarray(cal_sigma.get(lab, 0.0)) ** 2, 0.0)
        e = np.sqrt(e**2 + add * np.nan_to_num(f) ** 2)
        table[f"flux_err_{lab}"] = e
        mag, mag_err, snr = _mags(f, e, exptime_s)
        table[f"mag_err_{lab}"] = mag_err
        table[f"snr_{lab}"] = snr
    table.meta["model_error_frac"] = {
        k: (float(v) if v is not None and np.isfinite(v) else None)
        for k, v in mismatch.items()
        if k == "psf" or f"flux_{k}" in table.colnames
    }


def add_psf_model_errors(table, psf_model, *, radius_px, exptime_s, min_snr=50.0):
    """
    Add what the PSF model's own uncertainty and the fit's misfit do to each flux (in place).

    The total flux of a star is what is measured within some radius plus the model's share of
    light beyond it: PSF fluxes and corrected aperture fluxes are both tied to the flux in a large
    aperture of ``radius_px`` (`calibrate_to_large_aperture`), so the model enters through the
    fraction of light it puts inside that circle. The statistical error of that fraction follows
    from the covariance of the model's polynomial coefficients
    (`rpp_tasks.stages.field_psf.FieldPSF.flux_fraction_sigma`): it is largest where the PSF stars
    constrain the polynomials least (edges, corners) and matters for bright stars, whose photon
    noise is smaller. ``(sigma_frac * F)^2`` is added to the variance of the PSF flux and of every
    corrected aperture flux, except for fluxes whose calibration was tied to the model
    (``method`` "model" in ``table.meta["flux_calibration"]``: their error already holds the
    posterior of this term). The PSF flux error is also scaled by ``sqrt(chi2_psf)`` where the
    star's own fit is significantly worse than its noise (reduced chi^2 above 1 by more than twice
    its own scatter, ``sqrt(2 / npix)``): a misfit the error must include. Stars below
    ``min_snr`` are left as they are (there the term is negligible).

    Returns
    -------
    info : dict
        Radius, median and 90th percentile of the relative term over the stars it was computed
        for, their number (JSON-safe).
    """
    n = len(table)
    if n == 0 or "flux_psf" not in table.colnames:
        return {"n_stars": 0}
    fpsf = np.asarray(table["flux_psf"], float)
    epsf = np.asarray(table["flux_err_psf"], float)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = fpsf / epsf
    sel = np.isfinite(snr) & (snr > min_snr)
    sig = np.zeros(n)
    if np.any(sel) and getattr(psf_model, "cov", None) is not None:
        x, y = _fit_xy(table)
        sig[sel] = psf_model.flux_fraction_sigma(x[sel], y[sel], float(radius_px))
    labels = ["psf"] + [k[len("apcorr_") :] for k in table.colnames if k.startswith("apcorr_")]
    cal = table.meta.get("flux_calibration") or {}
    for lab in labels:
        if f"flux_{lab}" not in table.colnames:
            continue
        # a model-tied calibration already put the posterior of this term in the error
        sig_lab = 0.0 if (cal.get(lab) or {}).get("method") == "model" else sig
        f = np.asarray(table[f"flux_{lab}"], float)
        e = np.asarray(table[f"flux_err_{lab}"], float)
        if lab == "psf" and "chi2_psf" in table.colnames:
            chi2 = np.nan_to_num(np.asarray(table["chi2_psf"], float), nan=1.0)
            npix = (
                np.asarray(table["npix_psf"], float)
                if "npix_psf" in table.colnames
                else np.full(n, 50.0)
            )
            # only a misfit beyond the chi^2's own noise (2 sigma) scales the error
            worse = chi2 > 1.0 + 2.0 * np.sqrt(2.0 / np.maximum(npix - 1.0, 1.0))
            e = e * np.where(worse, np.sqrt(np.maximum(chi2, 1.0)), 1.0)
        e = np.sqrt(e**2 + (sig_lab * np.abs(np.nan_to_num(f))) ** 2)
        table[f"flux_err_{lab}"] = e
        mag, mag_err, snr_l = _mags(f, e, exptime_s)
        table[f"mag_err_{lab}"] = mag_err
        table[f"snr_{lab}"] = snr_l
    used = sig[sel]
    info = {"radius_px": round(float(radius_px), 3), "n_stars": int(sel.sum())}
    if used.size:
        info["median_frac"] = round(float(np.median(used)), 6)
        info["p90_frac"] = round(float(np.percentile(used, 90)), 6)
    table.meta["psf_model_error"] = info
    return info
