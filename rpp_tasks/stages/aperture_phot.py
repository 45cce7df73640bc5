"""Aperture photometry: circular apertures summed with SEP, a clipped local annulus sky, and honest
errors.

aperture_photometry sums circular apertures with SEP (exact overlap), subtracts a sigma-clipped
local annulus background on top of the 2-D background, and reports the error model of
ARCHITECTURE.md (Error model):

    var = flux / gain + q n_pix * rms^2 + n_pix^2 * rms^2 / n_annulus

with q = sum(w^2) / sum(w) of the pixel overlaps w (edge pixels' noise enters as w^2).

With a PSF model, the light of neighbouring stars inside the annulus and the aperture is
accounted for from the model (own-model sums).
"""

from __future__ import annotations

import math

import numpy as np
from astropy.table import Table

from rpp_tasks import __version__
from rpp_tasks.stages.field_psf import FieldPSF, _aperture_reach
from rpp_tasks.stages.phot_common import (
    APERTURE_LABELS,
    _check_inputs,
    _check_positive,
    _mags,
    _sky_variance_fraction,
    _xy,
)

__all__ = ["aperture_photometry"]


# --------------------------------------------------------------------------------------------
# aperture photometry
# --------------------------------------------------------------------------------------------


def _row_median(sorted_vals, lo, hi):
    """Median of ``sorted_vals[i, lo[i]:hi[i]]`` per row (NaN for an empty run)."""
    n = hi - lo
    rows = np.arange(sorted_vals.shape[0])
    ncol = sorted_vals.shape[1]
    a = np.clip(lo + (n - 1) // 2, 0, ncol - 1)
    b = np.clip(lo + n // 2, 0, ncol - 1)
    with np.errstate(invalid="ignore", over="ignore"):
        med = 0.5 * (sorted_vals[rows, a] + sorted_vals[rows, b])
    return np.where(n > 0, med, np.nan)


def _annulus_background(
    data, err_map, bad, x, y, r_in, r_out, *, radii=(), clip_sigma=3.0, n_iter=3
):
    """Sigma-clipped mean, its pixel count and the mean variance in annuli (vectorised);
    ``err_map`` is the per-pixel noise (rms). Also, per radius ``r`` of ``radii`` (column ``j``
    of the fourth array), the summed variance of the annulus pixels used for the mean whose
    centres lie within ``r`` of the star: an aperture reaching into the annulus shares these
    pixels with the background, ``cov(aperture sum, mean) = that sum / n_annulus``."""
    ny, nx = data.shape
    half = int(math.ceil(r_out)) + 1
    k = np.arange(-half, half + 1)
    ix = np.rint(x).astype(int)
    iy = np.rint(y).astype(int)
    n = x.size
    bkg = np.full(n, np.nan)
    n_ann = np.zeros(n, np.int64)
    var_mean = np.full(n, np.nan)
    radii = [float(r) for r in radii]
    var_shared = np.zeros((n, len(radii)))
    # only the offsets that can fall in the annulus for any sub-pixel centre
    oy, ox = np.meshgrid(k, k, indexing="ij")
    rad = np.hypot(ox, oy).ravel()
    ring = (rad >= r_in - 0.7072) & (rad <= r_out + 0.7072)
    ox, oy = ox.ravel()[ring], oy.ravel()[ring]
    chunk = 512
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        px = ix[a:b, None] + ox[None, :]
        py = iy[a:b, None] + oy[None, :]
        r2 = (px - x[a:b, None]) ** 2 + (py - y[a:b, None]) ** 2
        use = (r2 >= r_in**2) & (r2 <= r_out**2) & (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        pxc = np.clip(px, 0, nx - 1)
        pyc = np.clip(py, 0, ny - 1)
        vals = data[pyc, pxc].astype(np.float64)
        vv = err_map[pyc, pxc].astype(np.float64) ** 2
        if bad is not None:
            use &= ~bad[pyc, pxc]
        use &= np.isfinite(vals)
        inside = use
        # one sort per star; a clip around the median keeps a contiguous run of the sorted values
        big = np.finfo(np.float64).max
        sv = np.sort(np.where(use, vals, big), axis=1)
        ntot = use.sum(axis=1)
        sig_pix = np.sqrt(
            _row_median(np.sort(np.where(use, vv, big), axis=1), np.zeros_like(ntot), ntot)
        )
        lo = np.zeros_like(ntot)
        hi = ntot.copy()
        for _ in range(n_iter):
            med = _row_median(sv, lo, hi)
            new_lo = np.sum(sv < (med - clip_sigma * sig_pix)[:, None], axis=1)
            new_hi = np.minimum(np.sum(sv <= (med + clip_sigma * sig_pix)[:, None], axis=1), ntot)
            if np.array_equal(new_lo, lo) and np.array_equal(new_hi, hi):
                break
            lo, hi = new_lo, np.maximum(new_hi, new_lo)
        rows = np.arange(b - a)
        use = (
            inside
            & (hi > lo)[:, None]
            & (vals >= sv[rows, np.minimum(lo, sv.shape[1] - 1)][:, None])
            & (vals <= sv[rows, np.maximum(hi - 1, 0)][:, None])
        )
        cnt = use.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            bkg[a:b] = np.where(cnt > 0, np.sum(np.where(use, vals, 0.0), axis=1) / cnt, np.nan)
            var_mean[a:b] = np.where(cnt > 0, np.sum(np.where(use, vv, 0.0), axis=1) / cnt, np.nan)
        n_ann[a:b] = cnt
        for j, r in enumerate(radii):
            if r > r_in:
                var_shared[a:b, j] = np.sum(np.where(use & (r2 <= r * r), vv, 0.0), axis=1)
    return bkg, n_ann, var_mean, var_shared


def _area_inside(x, y, r, shape):
    """Area (px^2) of circles of radius ``r`` at ``(x, y)`` inside an image of ``shape``
    (exact pixel overlaps of a local image of ones with the outside zeroed)."""
    import sep

    ny, nx = shape
    h = int(math.ceil(r)) + 2
    size = 2 * h + 1
    out = np.empty(np.size(x))
    for i, (xi, yi) in enumerate(zip(np.atleast_1d(x), np.atleast_1d(y))):
        ix, iy = int(round(xi)), int(round(yi))
        k = np.arange(-h, h + 1)
        inside = ((iy + k) >= 0)[:, None] & ((iy + k) < ny)[:, None]
        inside = inside & ((ix + k) >= 0)[None, :] & ((ix + k) < nx)[None, :]
        local = np.ascontiguousarray(inside, dtype=np.float64).reshape(size, size)
        out[i] = sep.sum_circle(local, [h + xi - ix], [h + yi - iy], r, subpix=0)[0][0]
    return out


def _own_model_sums(sources, x, y, epsf, radii):
    """Aperture sums (per label) of each source's own fitted PSF model, apertures at ``(x, y)``.

    The unit-flux model stamps are laid side by side in a mosaic and summed with the same exact
    SEP apertures as the image.
    """
    import sep

    n = x.size
    xp = np.asarray(sources["x_psf"], float)
    yp = np.asarray(sources["y_psf"], float)
    fp = np.asarray(sources["flux_psf"], float)
    ok = np.isfinite(xp) & np.isfinite(yp) & np.isfinite(fp) & np.isfinite(x) & np.isfinite(y)
    ok &= np.hypot(xp - x, yp - y) < 3.0
    out = {lab: np.zeros(n) for lab in radii}
    if not np.any(ok):
        return out
    half = int(math.ceil(max(radii.values()))) + 2
    size = 2 * half + 1
    idx = np.flatnonzero(ok)
    ix = np.rint(x[idx]).astype(np.int64)
    iy = np.rint(y[idx]).astype(np.int64)
    # evaluated only where the apertures can reach (see FieldPSF.aperture_fractions)
    he, kw = half, {}
    if isinstance(epsf, FieldPSF):
        he, kw["where"] = _aperture_reach(max(radii.values()), half)
    st = epsf.stamps(xp[idx], yp[idx], he, ix=ix, iy=iy, **kw)  # (m, S, S), unit flux
    m = idx.size
    ncol = int(math.ceil(math.sqrt(m)))
    nrow = int(math.ceil(m / ncol))
    mosaic = np.zeros((nrow, ncol, size, size))
    inner = slice(half - he, half + he + 1)
    mosaic.reshape(nrow * ncol, size, size)[:m, inner, inner] = st
    mosaic = np.ascontiguousarray(mosaic.transpose(0, 2, 1, 3).reshape(nrow * size, ncol * size))
    tile = np.arange(m)
    xm = (tile % ncol) * size + half + (x[idx] - ix)
    ym = (tile // ncol) * size + half + (y[idx] - iy)
    for lab, r in radii.items():
        out[lab][idx] = fp[idx] * sep.sum_circle(mosaic, xm, ym, r, subpix=0)[0]
    return out


#: ``flag_aper`` bit (above SEP's aperture flags): no usable pixel in the sky annulus, the 2-D
#: background map alone was the sky
FLAG_APER_NO_ANNULUS = 256


def aperture_photometry(
    data_sub,
    rms,
    sources,
    *,
    fwhm_px,
    fixed_radius_px,
    annulus_fwhm=(3.0, 5.0),
    gain_e_per_adu,
    exptime_s,
    mask=None,
    local_background=True,
    psf_model=None,
    epsf=None,
    residual=False,
    overwrite=False,
):
    """
    Circular-aperture photometry with a local annulus background.

    With ``psf_model`` and ``epsf`` (the model image and the ePSF of a PSF fit of the same
    sources), each star is measured on the image with its *neighbours* subtracted: the apertures
    and the annulus are summed on ``data_sub - psf_model`` and the star's own model inside each
    aperture (``flux_psf`` times the aperture sum of the ePSF at ``x_psf, y_psf``) is added back.
    The wings of neighbours (and the star's own wings in the annulus) then no longer bias the
    flux or add scatter; the error model is unchanged.

    Error of ``flux_L``: source shot noise, the aperture's sky noise (``sum(w^2 var)`` over the
    pixel overlaps ``w``: a partly covered edge pixel's noise enters with its weight squared,
    `_sky_variance_fraction`) and the annulus mean's,
    ``area^2 var / n_annulus``, less ``2 area cov`` where the aperture reaches into the annulus
    (radius beyond ``annulus_fwhm[0]`` FWHM, e.g. a fixed radius on sharp stars): the annulus
    pixels inside the aperture enter both the sum and the mean, ``cov = (sum of their
    variances) / n_annulus``, and their noise cancels in ``sum - area * mean``.

    Parameters
    ----------
    data_sub : array_like
        Background-subtracted image (ADU).
    rms : array_like or float
        Background RMS map (ADU, read noise included).
    sources : `~astropy.table.Table`
        Sources with ``x_centroid``, ``y_centroid`` (0-based px); other columns are kept.
    fwhm_px : float
        PSF FWHM; apertures of radius 1.1 and 1.3 FWHM and the annulus scale with it.
    fixed_radius_px : float
        Radius of the ``fixed`` aperture (px).
    annulus_fwhm : tuple of float, optional
        Inner and outer annulus radius in FWHM units.
    gain_e_per_adu : float
        Gain (e-/ADU): source shot noise ``flux / gain``.
    exptime_s : float
        Exposure time for magnitudes per second.
    mask : array_like of bool, optional
        Bad pixels: excluded from apertures (flagged in ``flag_aper``) and from the annulus.
    local_background : bool, optional
        Subtract the sigma-clipped annulus mean ``bkg_local`` (default True).
    psf_model : array_like, optional
        Fitted model image of all sources (e.g. `PsfPassResult.model`); needs ``epsf`` and the
        columns ``x_psf``, ``y_psf``, ``flux_psf`` in ``sources``.
    epsf : `rpp_tasks.stages.epsf.EPSFModel` or `rpp_tasks.stages.field_psf.FieldPSF`, optional
        The PSF model of that fit.
    residual : bool, optional
        ``data_sub`` already has the fitted model of every source subtracted (as
        ``data_sub - psf_model``); the stars' own models are added back as with ``psf_model``.
    overwrite : bool, optional
        ``data_sub`` may be modified in place (bad pixels set to 0): no full-frame copy.

    Returns
    -------
    table : `~astropy.table.Table`
        A copy of ``sources`` plus ``bkg_local`` (ADU/px), ``n_annulus``, ``flag_aper`` and for each
        label ``L`` in `APERTURE_LABELS`: ``flux_L``, ``flux_err_L``, ``mag_L``, ``mag_err_L``,
        ``snr_L``. ``meta`` gains the radii (px), FWHM, exptime, gain and the rpp_tasks version.

    Raises
    ------
    ValueError
        Shape mismatch, missing position columns, non-positive FWHM/radius/gain/exptime.
    """
    import sep

    func = "aperture_photometry"
    data, rms, mask = _check_inputs(data_sub, rms, mask, func)
    _check_positive(
        func,
        fwhm_px=fwhm_px,
        fixed_radius_px=fixed_radius_px,
        gain_e_per_adu=gain_e_per_adu,
        exptime_s=exptime_s,
    )
    r_in, r_out = (float(annulus_fwhm[0]) * fwhm_px, float(annulus_fwhm[1]) * fwhm_px)
    if not 0 < r_in < r_out:
        raise ValueError(
            f"{func}: annulus_fwhm must be (inner, outer) with 0 < inner < outer, "
            f"got {annulus_fwhm}"
        )
    radii = {"1p1fwhm": 1.1 * fwhm_px, "1p3fwhm": 1.3 * fwhm_px, "fixed": float(fixed_radius_px)}
    out = Table(sources, copy=True)
    out.meta.update(
        aperture_radii_px={k: float(v) for k, v in radii.items()},
        annulus_px=[r_in, r_out],
        fwhm_px=float(fwhm_px),
        exptime_s=float(exptime_s),
        gain_e_per_adu=float(gain_e_per_adu),
        rpp_tasks_version=__version__,
    )
    n = len(out)
    if n == 0:
        for name, dt in (("bkg_local", float), ("n_annulus", np.int64), ("flag_aper", np.int64)):
            out[name] = np.zeros(0, dt)
        for lab in APERTURE_LABELS:
            for c in ("flux", "flux_err", "mag", "mag_err", "snr"):
                out[f"{c}_{lab}"] = np.zeros(0)
        out.meta["no_sources"] = True
        return out
    x, y = _xy(sources, func)

    dt = np.float32 if data.dtype == np.float32 else np.float64
    own = None
    if psf_model is not None or residual:
        if epsf is None or not all(c in sources.colnames for c in ("x_psf", "y_psf", "flux_psf")):
            raise ValueError(
                f"{func}: psf_model / residual need epsf and the x_psf, y_psf, flux_psf columns"
            )
        if psf_model is not None:
            psf_model = np.asarray(psf_model)
            if psf_model.shape != data.shape:
                raise ValueError(
                    f"{func}: psf_model shape {psf_model.shape} does not match {data.shape}"
                )
            data = np.subtract(data, psf_model, dtype=dt)
            overwrite = True  # a temporary of ours
        own = _own_model_sums(sources, x, y, epsf, radii)
    # work image: C-contiguous, bad pixels at 0 (in place when allowed)
    if overwrite and data.dtype == dt and data.flags.c_contiguous and data.flags.writeable:
        work = data
    else:
        work = np.array(data, dtype=dt, order="C")
    bad = np.isfinite(work)
    np.logical_not(bad, out=bad)
    if mask is not None:
        bad |= mask
    work[bad] = 0.0
    err_map = np.ascontiguousarray(rms, dtype=dt)
    if local_background:
        bkg, n_ann, var_ann, var_shared = _annulus_background(
            work, err_map, bad, x, y, r_in, r_out, radii=list(radii.values())
        )
    else:
        bkg, n_ann, var_ann = np.zeros(n), np.full(n, np.iinfo(np.int64).max // 4), np.zeros(n)
        var_shared = np.zeros((n, len(radii)))
    bkg_used = np.where(np.isfinite(bkg), bkg, 0.0)
    flag_all = np.zeros(n, np.int64)
    for j, (lab, r) in enumerate(radii.items()):
        # SEP replaces masked pixels by the mean of the unmasked ones in the aperture (sum and
        # variance), so the effective area is the geometric one, less what falls off the image
        s, serr, flg = sep.sum_circle(work, x, y, r, err=err_map, mask=bad, subpix=0)
        area = np.full(n, math.pi * r * r)
        trunc = (flg & sep.APER_TRUNC) != 0
        if np.any(trunc):
            area[trunc] = _area_inside(x[trunc], y[trunc], r, work.shape)
        # SEP's error counts a partly covered pixel's variance in proportion to its overlap w;
        # the sum weights the pixel's value by w, so its noise enters as w^2: the edge's
        # sum(w - w^2) is about `_EDGE_W2_PER_PX` * r
        svar = serr**2 * _sky_variance_fraction(area, r)
        flux = s - bkg_used * area
        if own is not None:
            flux = flux + own[lab]
        var_star = np.maximum(flux, 0.0) / gain_e_per_adu
        mean_var = np.where(area > 0, serr**2 / np.maximum(area, 1e-12), np.nan)
        # the mean's own noise, less twice its covariance with the aperture sum where the
        # aperture reaches into the annulus (a fixed radius beyond 3 FWHM on a sharp star): the
        # shared pixels' noise cancels in ``sum - area * mean``
        # no usable annulus pixel (all masked or off the frame): the 2-D background map alone is
        # the sky (``bkg_local`` NaN, flag `FLAG_APER_NO_ANNULUS`), its error not counted here
        var_bkg_mean = (
            np.where(
                n_ann > 0,
                (area**2 * mean_var - 2.0 * area * var_shared[:, j]) / np.maximum(n_ann, 1),
                0.0,
            )
            if local_background
            else 0.0
        )
        err = np.sqrt(var_star + np.maximum(svar + var_bkg_mean, 0.0))
        mag, mag_err, snr = _mags(flux, err, exptime_s)
        out[f"flux_{lab}"] = flux
        out[f"flux_err_{lab}"] = err
        out[f"mag_{lab}"] = mag
        out[f"mag_err_{lab}"] = mag_err
        out[f"snr_{lab}"] = snr
        flag_all |= flg.astype(np.int64)
    if local_background:
        flag_all[n_ann == 0] |= FLAG_APER_NO_ANNULUS
    out["bkg_local"] = bkg
    out["n_annulus"] = n_ann
    out["flag_aper"] = flag_all
    out.meta["no_sources"] = False
    del var_ann
    return out
