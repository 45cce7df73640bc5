"""Aperture and PSF photometry, and per-source quality flags.

Aperture photometry (`aperture_photometry`) sums circular apertures with SEP (exact C
overlap), subtracts a sigma-clipped local annulus background on top of the 2-D background, and
reports the error model of ARCHITECTURE.md ("Error model"):

    var = flux / gain + n_pix * rms^2 + n_pix^2 * rms^2 / n_annulus

PSF photometry (`psf_photometry`) fits the effective PSF (`rpp_tasks.stages.epsf.EPSFModel`) to all
sources at once: one global, sparse, weighted linear least-squares problem in which the stars
whose footprints overlap are solved together (blends are deblended by the fit). The steps are

1. fluxes at the detection centroids (weights ``1 / rms^2``);
2. one Gauss-Newton step for the positions, with unknowns ``(f, f dx, f dy)`` per star (the ePSF
   gradient is analytic), weights ``1 / (rms^2 + model / gain)`` from step 1's *model*;
3. the final fluxes at the refined positions with weights from the step-2 model. Using the model
   rather than the data for the source shot noise keeps fluxes and errors unbiased.

The normal matrix is split into its connected components (groups of mutually overlapping stars),
and each component is solved and inverted densely, batched by component size, so flux errors are
the exact diagonal of the inverse normal matrix, including blend covariance.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from astropy.stats import sigma_clip  # noqa: F401  (documented alternative; clipping is vectorised below)
from astropy.table import Table
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from rpp_tasks import __version__

__all__ = [
    "APERTURE_LABELS",
    "aperture_photometry",
    "psf_photometry",
    "psf_photometry_with_residual_detection",
    "PsfPassResult",
    "quality_flags",
    "measure_frame",
    "FramePhotometry",
    "apply_aperture_corrections",
    "fit_saturated_stars",
]

log = logging.getLogger(__name__)

#: Aperture labels of the catalogue columns.
APERTURE_LABELS = ("1p1fwhm", "1p3fwhm", "fixed")
_MAG_K = 2.5 / math.log(10.0)
_MAX_DENSE = (
    1200  # unknowns in one overlapping group solved densely; larger -> sparse + approx errors
)


def _check_inputs(data_sub, rms, mask, func):
    data = np.asarray(data_sub)
    if data.ndim != 2:
        raise ValueError(f"{func}: data_sub must be 2-D, got shape {data.shape}")
    if np.ndim(rms) == 0:
        rms = np.full(data.shape, float(rms))
    rms = np.asarray(rms)
    if rms.shape != data.shape:
        raise ValueError(
            f"{func}: rms shape {rms.shape} does not match data_sub shape {data.shape}"
        )
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape:
            raise ValueError(
                f"{func}: mask shape {mask.shape} does not match data_sub shape {data.shape}"
            )
    return data, rms, mask


def _xy(sources, func):
    for xc, yc in (("x_centroid", "y_centroid"), ("xcentroid", "ycentroid"), ("x", "y")):
        if xc in sources.colnames and yc in sources.colnames:
            return np.asarray(sources[xc], np.float64), np.asarray(sources[yc], np.float64)
    raise ValueError(
        f"{func}: sources need x_centroid and y_centroid columns, got {sources.colnames}"
    )


def _mags(flux, flux_err, exptime_s):
    flux = np.asarray(flux, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        pos = flux > 0
        mag = np.where(pos, -2.5 * np.log10(np.where(pos, flux, 1.0) / exptime_s), np.nan)
        mag_err = np.where(pos, _MAG_K * flux_err / np.where(pos, flux, 1.0), np.nan)
        snr = np.where(flux_err > 0, flux / flux_err, np.nan)
    return mag, mag_err, snr


def _check_positive(func, **kw):
    for k, v in kw.items():
        if v is None or not np.isfinite(v) or v <= 0:
            raise ValueError(f"{func}: {k} must be a positive number, got {v!r}")


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


def _annulus_background(data, err_map, bad, x, y, r_in, r_out, *, clip_sigma=3.0, n_iter=3):
    """Sigma-clipped mean, its pixel count and the mean variance in annuli (vectorised);
    ``err_map`` is the per-pixel noise (rms)."""
    ny, nx = data.shape
    half = int(math.ceil(r_out)) + 1
    k = np.arange(-half, half + 1)
    ix = np.rint(x).astype(int)
    iy = np.rint(y).astype(int)
    n = x.size
    bkg = np.full(n, np.nan)
    n_ann = np.zeros(n, np.int64)
    var_mean = np.full(n, np.nan)
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
    return bkg, n_ann, var_mean


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
    st = epsf.stamps(xp[idx], yp[idx], half, ix=ix, iy=iy)  # (m, S, S), unit flux
    m = idx.size
    ncol = int(math.ceil(math.sqrt(m)))
    nrow = int(math.ceil(m / ncol))
    mosaic = np.zeros((nrow, ncol, size, size))
    mosaic.reshape(nrow * ncol, size, size)[:m] = st
    mosaic = np.ascontiguousarray(mosaic.transpose(0, 2, 1, 3).reshape(nrow * size, ncol * size))
    tile = np.arange(m)
    xm = (tile % ncol) * size + half + (x[idx] - ix)
    ym = (tile // ncol) * size + half + (y[idx] - iy)
    for lab, r in radii.items():
        out[lab][idx] = fp[idx] * sep.sum_circle(mosaic, xm, ym, r, subpix=0)[0]
    return out


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
            f"{func}: annulus_fwhm must be (inner, outer) with 0 < inner < outer, got {annulus_fwhm}"
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
        bkg, n_ann, var_ann = _annulus_background(work, err_map, bad, x, y, r_in, r_out)
    else:
        bkg, n_ann, var_ann = np.zeros(n), np.full(n, np.iinfo(np.int64).max // 4), np.zeros(n)
    bkg_used = np.where(np.isfinite(bkg), bkg, 0.0)
    flag_all = np.zeros(n, np.int64)
    for lab, r in radii.items():
        # SEP replaces masked pixels by the mean of the unmasked ones in the aperture (sum and
        # variance), so the effective area is the geometric one, less what falls off the image
        s, serr, flg = sep.sum_circle(work, x, y, r, err=err_map, mask=bad, subpix=0)
        svar = serr**2
        area = np.full(n, math.pi * r * r)
        trunc = (flg & sep.APER_TRUNC) != 0
        if np.any(trunc):
            area[trunc] = _area_inside(x[trunc], y[trunc], r, work.shape)
        flux = s - bkg_used * area
        if own is not None:
            flux = flux + own[lab]
        var_star = np.maximum(flux, 0.0) / gain_e_per_adu
        mean_var = np.where(area > 0, svar / np.maximum(area, 1e-12), np.nan)
        var_bkg_mean = (
            np.where(n_ann > 0, area**2 * mean_var / np.maximum(n_ann, 1), np.inf)
            if local_background
            else 0.0
        )
        err = np.sqrt(var_star + svar + var_bkg_mean)
        mag, mag_err, snr = _mags(flux, err, exptime_s)
        out[f"flux_{lab}"] = flux
        out[f"flux_err_{lab}"] = err
        out[f"mag_{lab}"] = mag
        out[f"mag_err_{lab}"] = mag_err
        out[f"snr_{lab}"] = snr
        flag_all |= flg.astype(np.int64)
    out["bkg_local"] = bkg
    out["n_annulus"] = n_ann
    out["flag_aper"] = flag_all
    out.meta["no_sources"] = False
    del var_ann
    return out


# --------------------------------------------------------------------------------------------
# PSF photometry
# --------------------------------------------------------------------------------------------


def _solve_groups(nmat, rhs, comp, ncomp):
    """Solve N x = rhs and return x, diag(N^-1); N is block-diagonal by component ``comp``."""
    nun = rhs.size
    x = np.full(nun, np.nan)
    dinv = np.full(nun, np.nan)
    big = np.zeros(nun, bool)
    sizes = np.bincount(comp, minlength=ncomp)
    order = np.argsort(comp, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    pos = np.empty(nun, np.int64)
    pos[order] = np.arange(nun) - starts[comp[order]]
    coo = nmat.tocoo()
    r, c, v = coo.row, coo.col, coo.data
    size_r = sizes[comp[r]]
    size_u = sizes[comp]
    for m in np.unique(sizes):
        if m == 0:
            continue
        cm = np.flatnonzero(sizes == m)
        units = np.flatnonzero(size_u == m)
        if m > _MAX_DENSE:
            sub = nmat.tocsr()[units][:, units].tocsc()
            from scipy.sparse.linalg import spsolve

            x[units] = spsolve(sub, rhs[units])
            dinv[units] = 1.0 / sub.diagonal()
            big[units] = True
            continue
        slot = np.full(ncomp, -1, np.int64)
        slot[cm] = np.arange(cm.size)
        blocks = np.zeros((cm.size, m, m))
        e = size_r == m
        blocks[slot[comp[r[e]]], pos[r[e]], pos[c[e]]] = v[e]
        vec = np.zeros((cm.size, m))
        vec[slot[comp[units]], pos[units]] = rhs[units]
        # scale to unit diagonal for conditioning
        d = np.sqrt(np.einsum("kii->ki", blocks))
        d = np.where(d > 0, d, 1.0)
        bs = blocks / d[:, :, None] / d[:, None, :]
        try:
            inv = np.linalg.inv(bs)
        except np.linalg.LinAlgError:
            inv = np.linalg.pinv(bs)
        inv = inv / d[:, :, None] / d[:, None, :]
        sol = np.einsum("kij,kj->ki", inv, vec)
        x[units] = sol[slot[comp[units]], pos[units]]
        dinv[units] = inv[slot[comp[units]], pos[units], pos[units]]
    return x, dinv, big


def _empty_psf_columns(out):
    for name in (
        "x_psf",
        "y_psf",
        "flux_psf",
        "flux_err_psf",
        "mag_psf",
        "mag_err_psf",
        "snr_psf",
        "qfit_psf",
        "chi2_psf",
    ):
        out[name] = np.zeros(0)
    out["npix_psf"] = np.zeros(0, np.int64)
    out["flag_psf"] = np.zeros(0, np.int64)
    out["group_size_psf"] = np.zeros(0, np.int64)
    return out


def psf_photometry(
    data_sub,
    rms,
    sources,
    epsf,
    *,
    gain_e_per_adu,
    exptime_s,
    mask=None,
    fit_shape=None,
    refine_positions=True,
    max_shift_px=1.0,
    min_snr_refine=3.0,
    extended_wings=True,
    max_elements=None,
):
    """
    Simultaneous PSF-fitting photometry of all sources with an effective PSF.

    Parameters
    ----------
    data_sub : array_like
        Background-subtracted image (ADU).
    rms : array_like or float
        Background RMS map (ADU, read noise included).
    sources : `~astropy.table.Table`
        Sources with ``x_centroid``, ``y_centroid`` (0-based px); other columns are kept.
    epsf : `rpp_tasks.stages.epsf.EPSFModel`
        Effective PSF (unit total flux).
    gain_e_per_adu : float
        Gain, for the source shot-noise term ``model / gain`` of the variance.
    exptime_s : float
        Exposure time for magnitudes per second.
    mask : array_like of bool, optional
        Pixels excluded from the fit.
    fit_shape : int, optional
        Width (odd, px) of the fitted footprint of each star; default ``2 * round(2 * FWHM) + 1``
        (at least 7), capped by the ePSF footprint.
    refine_positions : bool, optional
        Do the Gauss-Newton position step (otherwise positions stay at the centroids).
    max_shift_px : float, optional
        Position updates are clipped to this length.
    min_snr_refine : float, optional
        Only stars with a step-1 flux S/N above this get a position update.
    extended_wings : bool, optional
        With a model that knows its footprint (`rpp_tasks.stages.field_psf.FieldPSF`), the wings of
        bright stars beyond the fitted footprint (out to where they fall below 2 % of the
        background noise) are subtracted from their neighbours' pixels as a fixed contribution
        (from the step-1 fluxes, then the final ones): without it, a star 3-4 FWHM from a
        brighter one takes some of that star's wing light.
    max_elements : int, optional
        Memory bound: when the stars' footprints hold more pixels than this (default: a thirtieth
        of the frame), the frame is fitted in horizontal bands of equal star counts, each with a
        64 px margin of neighbours fitted along (their results are taken from their own band).

    Returns
    -------
    table : `~astropy.table.Table`
        A copy of ``sources`` plus ``x_psf``, ``y_psf``, ``flux_psf``, ``flux_err_psf``,
        ``mag_psf``, ``mag_err_psf``, ``snr_psf``, ``qfit_psf`` (sum |residual| / flux over the
        footprint, as photutils), ``chi2_psf`` (reduced chi^2), ``npix_psf`` (fitted pixels),
        ``group_size_psf`` (stars fitted together) and ``flag_psf`` (1: no usable pixel,
        2: position not refined, 4: footprint truncated by the edge or mask, 8: very large
        group, errors approximate).

    Raises
    ------
    ValueError
        Shape mismatch, missing position columns, non-positive gain or exptime.
    """
    func = "psf_photometry"
    data, rms, mask = _check_inputs(data_sub, rms, mask, func)
    _check_positive(func, gain_e_per_adu=gain_e_per_adu, exptime_s=exptime_s)
    out = Table(sources, copy=True)
    out.meta.update(
        psf_fwhm_px=float(epsf.fwhm_px),
        psf_oversampling=int(epsf.oversampling),
        psf_n_stars=int(epsf.n_stars),
        exptime_s=float(exptime_s),
        gain_e_per_adu=float(gain_e_per_adu),
        rpp_tasks_version=__version__,
    )
    n = len(out)
    if n == 0:
        out.meta["no_sources"] = True
        return _empty_psf_columns(out)
    x0, y0 = _xy(sources, func)
    ny, nx = data.shape
    if fit_shape is None:
        fit_shape = 2 * int(round(2.0 * epsf.fwhm_px)) + 1
    fit_shape = max(7, int(fit_shape) | 1)
    if epsf.size_px:
        fit_shape = min(fit_shape, int(epsf.size_px) | 1)
    half = fit_shape // 2
    if max_elements is None:
        max_elements = max(50_000, data.size // 30)
    margin = 64
    if n * fit_shape**2 > max_elements and ny > 8 * margin:
        return _psf_photometry_bands(
            data,
            rms,
            sources,
            epsf,
            out,
            y0,
            n_bands=int(math.ceil(n * fit_shape**2 / max_elements)),
            margin=margin,
            kwargs=dict(
                gain_e_per_adu=gain_e_per_adu,
                exptime_s=exptime_s,
                mask=mask,
                fit_shape=fit_shape,
                refine_positions=refine_positions,
                max_shift_px=max_shift_px,
                min_snr_refine=min_snr_refine,
                extended_wings=extended_wings,
                max_elements=np.inf,
            ),
        )

    finite = (
        np.isfinite(x0)
        & np.isfinite(y0)
        & (x0 > -0.5)
        & (y0 > -0.5)
        & (x0 < nx - 0.5)
        & (y0 < ny - 0.5)
    )
    x = np.where(finite, x0, 0.0)
    y = np.where(finite, y0, 0.0)
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    k = np.arange(-half, half + 1)
    px = (ix[:, None] + k)[:, None, :] + 0 * k[None, :, None]
    py = (iy[:, None] + k)[:, :, None] + 0 * k[None, None, :]
    valid = (px >= 0) & (px < nx) & (py >= 0) & (py < ny) & finite[:, None, None]
    flat = np.where(valid, py * nx + px, 0)
    del px, py
    dat_all = np.asarray(data).ravel()  # gathered, then converted: no full-frame copies
    valid &= np.isfinite(dat_all[flat])
    if mask is not None:
        valid &= ~mask.ravel()[flat]
    rms_all = np.asarray(rms).ravel()
    r_flat = rms_all[flat]
    valid &= np.isfinite(r_flat) & (r_flat > 0)

    sel_star, sel_r, sel_c = (v.astype(np.int32) for v in np.nonzero(valid))
    pix = flat[sel_star, sel_r, sel_c]
    del flat, r_flat
    upix, row = np.unique(pix, return_inverse=True)
    row = row.astype(np.int32)
    d = dat_all[upix].astype(np.float64)
    v_bkg = rms_all[upix].astype(np.float64) ** 2
    npix_star = valid.sum(axis=(1, 2))
    flag = np.zeros(n, np.int64)
    flag[npix_star == 0] |= 1
    flag[(npix_star > 0) & (npix_star < fit_shape**2)] |= 4
    nrow = upix.size

    # overlap groups: stars sharing a pixel
    inc = sparse.csr_matrix((np.ones(pix.size, np.float32), (row, sel_star)), shape=(nrow, n))
    del pix
    adj = (inc.T @ inc).tocsr()
    del inc
    ncomp, comp = connected_components(adj, directed=False)
    del adj
    group_size = np.bincount(comp, minlength=ncomp)[comp]

    def design(xs, ys, deriv):
        return epsf.stamps(xs, ys, half, ix=ix, iy=iy, derivatives=deriv)

    # wings of bright stars beyond their fitted footprint (subtracted as a fixed contribution)
    tail_ok = hasattr(epsf, "_footprint_halves") and extended_wings
    rms_typ = float(np.median(np.sqrt(v_bkg))) if tail_ok and nrow else float("nan")

    geo = None

    def tails(xs_, ys_, f_):
        nonlocal geo
        if not tail_ok:
            return 0.0
        if geo is None:
            geo = _tail_geometry(epsf, xs_, ys_, f_, half, rms_typ, upix, nx, ny)
            log.debug("psf_photometry: %d wing-tail pixel entries", geo[0].size)
        return _tail_values(epsf, geo, xs_, ys_, f_, nrow)

    tail = 0.0

    def solve_flux(p_vals, w):
        a = sparse.csr_matrix((p_vals[sel_star, sel_r, sel_c], (row, sel_star)), shape=(nrow, n))
        aw = sparse.diags(w) @ a
        nmat = (a.T @ aw).tocsr()
        rhs = aw.T @ (d - tail)
        diag = nmat.diagonal()
        ok = diag > 0
        nmat = nmat + sparse.diags(np.where(ok, 0.0, 1.0))
        f, dinv, big = _solve_groups(nmat, np.where(ok, rhs, 0.0), comp, ncomp)
        f[~ok] = np.nan
        dinv[~ok] = np.nan
        return f, dinv, big, a

    # step 1: fluxes at the centroids, background-only weights
    if refine_positions:
        p0, gx, gy = design(x, y, True)
    else:
        p0 = design(x, y, False)
    w0 = 1.0 / v_bkg
    f1, dinv1, big, a0 = solve_flux(p0, w0)
    model = a0 @ np.nan_to_num(f1)
    del a0, w0
    xs, ys = x.copy(), y.copy()

    tail = tails(x, y, f1)
    if refine_positions:
        w1 = 1.0 / (v_bkg + np.maximum(model + tail, 0.0) / gain_e_per_adu)
        val = p0
        # CSR of [P, dP/dx, dP/dy] per star, built row-sorted without COO temporaries
        order = np.argsort(row, kind="stable")
        nnz = row.size
        vals = np.empty(3 * nnz)
        cols = np.empty(3 * nnz, np.int32)
        s3, r3, c3 = sel_star[order], sel_r[order], sel_c[order]
        vals[0::3] = val[s3, r3, c3]
        vals[1::3] = gx[s3, r3, c3]
        vals[2::3] = gy[s3, r3, c3]
        cols[0::3] = 3 * s3
        cols[1::3] = 3 * s3 + 1
        cols[2::3] = 3 * s3 + 2
        del s3, r3, c3, gx, gy, order
        indptr = np.zeros(nrow + 1, np.int64)
        np.cumsum(np.bincount(row, minlength=nrow) * 3, out=indptr[1:])
        a3 = sparse.csr_matrix((vals, cols, indptr), shape=(nrow, 3 * n))
        del vals, cols, indptr
        aw3 = sparse.diags(w1) @ a3
        nmat3 = (a3.T @ aw3).tocsr()
        rhs3 = aw3.T @ (d - tail)
        del a3, aw3
        diag3 = nmat3.diagonal()
        ok3 = diag3 > 0
        nmat3 = nmat3 + sparse.diags(np.where(ok3, 0.0, 1.0))
        comp3 = np.repeat(comp, 3)
        sol, _, _ = _solve_groups(nmat3, np.where(ok3, rhs3, 0.0), comp3, ncomp)
        del nmat3
        f_gn = sol[0::3]
        snr1 = f1 / np.sqrt(dinv1)
        can = np.isfinite(f_gn) & (f_gn > 0) & (snr1 > min_snr_refine) & ok3[0::3]
        fsafe = np.where(can, f_gn, 1.0)
        dx = np.where(can, sol[1::3] / fsafe, 0.0)
        dy = np.where(can, sol[2::3] / fsafe, 0.0)
        shift = np.hypot(dx, dy)
        scale = np.where(shift > max_shift_px, max_shift_px / np.maximum(shift, 1e-12), 1.0)
        xs = x + dx * scale
        ys = y + dy * scale
        flag[~can] |= 2
        f_w = np.where(can, f_gn, f1)
    else:
        flag |= 2
        f_w = f1

    # final fluxes at (xs, ys), weights from the model of the refined positions
    del p0
    p2 = design(xs, ys, False)
    a_w = sparse.csr_matrix((p2[sel_star, sel_r, sel_c], (row, sel_star)), shape=(nrow, n))
    if tail_ok:
        tail = tails(xs, ys, f_w)
    model = a_w @ np.nan_to_num(f_w)
    w2 = 1.0 / (v_bkg + np.maximum(model + tail, 0.0) / gain_e_per_adu)
    f2, dinv2, big2, a2 = solve_flux(p2, w2)
    if tail_ok:
        tail = tails(xs, ys, f2)
        f2, dinv2, big2, a2 = solve_flux(p2, w2)
    flag[big | big2] |= 8
    err2 = np.sqrt(dinv2)
    model2 = a2 @ np.nan_to_num(f2)
    resid = d - tail - model2
    abs_res = np.bincount(sel_star, np.abs(resid[row]), minlength=n)
    chi2 = np.bincount(sel_star, (resid[row] ** 2 * w2[row]), minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        qfit = abs_res / f2
        chi2r = chi2 / np.maximum(npix_star - 1, 1)
    nofit = ~finite | (npix_star == 0)
    for arr in (f2, err2, qfit, chi2r):
        arr[nofit] = np.nan
    xs = np.where(finite, xs, np.nan)
    ys = np.where(finite, ys, np.nan)
    mag, mag_err, snr = _mags(f2, err2, exptime_s)
    out["x_psf"] = xs
    out["y_psf"] = ys
    out["flux_psf"] = f2
    out["flux_err_psf"] = err2
    out["mag_psf"] = mag
    out["mag_err_psf"] = mag_err
    out["snr_psf"] = snr
    out["qfit_psf"] = qfit
    out["chi2_psf"] = chi2r
    out["npix_psf"] = npix_star.astype(np.int64)
    out["group_size_psf"] = group_size.astype(np.int64)
    out["flag_psf"] = flag
    out.meta.update(psf_fit_shape_px=fit_shape, no_sources=False, psf_n_groups=int(ncomp))
    log.info(
        "psf_photometry: %d sources, %d overlap groups (largest %d), fit shape %d px",
        n,
        ncomp,
        int(group_size.max()),
        fit_shape,
    )
    return out


def _psf_photometry_bands(data, rms, sources, epsf, out, y0, *, n_bands, margin, kwargs):
    """`psf_photometry` band by band (equal star counts), each with a margin of neighbours."""
    n = len(sources)
    yy = np.where(np.isfinite(y0), y0, -1.0)
    edges = np.quantile(yy, np.linspace(0.0, 1.0, n_bands + 1))
    edges[0], edges[-1] = -np.inf, np.inf
    cols = None
    n_groups = 0
    for a, b in zip(edges[:-1], edges[1:]):
        own = (yy >= a) & (yy < b) if np.isfinite(b) else (yy >= a)
        if not np.any(own):
            continue
        ctx = (yy >= a - margin) & (yy < b + margin)
        idx = np.flatnonzero(ctx)
        t = psf_photometry(data, rms, sources[idx], epsf, **kwargs)
        n_groups += int(t.meta.get("psf_n_groups", 0))
        if cols is None:
            cols = {
                c: np.zeros(n, dtype=t[c].dtype) for c in t.colnames if c not in sources.colnames
            }
        keep = own[idx]
        for c in cols:
            cols[c][idx[keep]] = np.asarray(t[c])[keep]
        meta_fit = t.meta.get("psf_fit_shape_px")
    for c, v in cols.items():
        out[c] = v
    out.meta.update(
        psf_fit_shape_px=meta_fit, no_sources=False, psf_n_groups=n_groups, psf_n_bands=n_bands
    )
    return out


def _render(model, shape, x, y, flux, rms_typ, out=None):
    """float32 model image (added into ``out`` when given); footprints follow the brightness
    when the model supports it."""
    if hasattr(model, "_footprint_halves"):
        return model.render(shape, x, y, flux, rms=rms_typ, out=out)
    img = model.render(shape, x, y, flux)
    if out is None:
        return img.astype(np.float32)
    out += img.astype(np.float32)
    return out


def _strip_map(func, a, b, strip=256):
    """``func(a, b)`` evaluated row strip by row strip into a float32 array (no full-frame
    temporaries); ``b`` may be a scalar."""
    out = np.empty(np.shape(a), np.float32)
    b = np.broadcast_to(np.asarray(b, np.float32), out.shape)
    for r0 in range(0, out.shape[0], strip):
        sl = slice(r0, r0 + strip)
        out[sl] = func(np.asarray(a[sl], np.float32), b[sl])
    return out


def _tail_geometry(model, x, y, flux, half, rms_typ, upix, nx, ny):
    """Where the wings of bright stars beyond their ``half`` footprint fall on fitted pixels.

    Only stars whose wings reach another source are kept. Returns ``(star, pos, px, py)``:
    star index, index into ``upix`` and pixel coordinates of each (star, pixel) pair.
    """
    empty = (np.zeros(0, np.int64),) * 4
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux) & (flux > 0)
    if not np.any(ok) or not np.isfinite(rms_typ) or rms_typ <= 0 or upix.size == 0:
        return empty
    idx = np.flatnonzero(ok)
    halves = model._footprint_halves(x[idx], y[idx], flux[idx], rms_typ, 2 * half)
    big = halves > half
    idx, halves = idx[big], halves[big]
    if idx.size == 0:
        return empty
    pts = np.column_stack([np.where(ok, x, -1e9), np.where(ok, y, -1e9)])
    reach = cKDTree(pts).query_ball_point(pts[idx], (halves + half) * 1.415, return_length=True)
    idx, halves = idx[reach > 1], halves[reach > 1]
    upy, upx = np.divmod(upix, nx)
    stars, poss = [], []
    for i, h in zip(idx, halves):
        cy, cx = int(round(y[i])), int(round(x[i]))
        lo = np.searchsorted(upix, max(0, cy - h) * nx)
        hi = np.searchsorted(upix, (min(ny - 1, cy + h) + 1) * nx)
        if hi <= lo:
            continue
        px, py = upx[lo:hi], upy[lo:hi]
        use = (np.abs(px - cx) <= h) & ((np.abs(px - cx) > half) | (np.abs(py - cy) > half))
        pos = np.flatnonzero(use) + lo
        if pos.size:
            stars.append(np.full(pos.size, i))
            poss.append(pos)
    if not stars:
        return empty
    star = np.concatenate(stars)
    pos = np.concatenate(poss)
    return star, pos, upx[pos], upy[pos]


def _tail_values(model, geo, x, y, flux, nrow):
    """Light of the wings of `_tail_geometry` at the fitted pixels for positions/fluxes."""
    from rpp_tasks.stages.field_psf import _ell_pix

    star, pos, px, py = geo
    out = np.zeros(nrow)
    if star.size == 0:
        return out
    us, inv = np.unique(star, return_inverse=True)
    a, b, c, u = (v[inv] for v in model.params_at(x[us], y[us]))
    f = np.nan_to_num(flux[star])
    val = _ell_pix(px - x[star], py - y[star], a, b, c, u, integrate=False)
    return np.bincount(pos, f * np.nan_to_num(val), minlength=nrow)


@dataclass(frozen=True, eq=False)
class PsfPassResult:
    """Outcome of `psf_photometry_with_residual_detection`.

    Attributes
    ----------
    table : `~astropy.table.Table`
        PSF photometry of the input sources followed by the sources found on the residual
        (``flag`` bit `rpp_tasks.stages.detection.FLAG_RESIDUAL`); columns as `psf_photometry`.
    model : `numpy.ndarray` or None
        Image of the fitted model of every source in ``table`` (float32, ADU); None when not
        kept (``keep_model=False``).
    n_added : int
        Sources found on the residual image and added.
    n_refit : int
        Sources fitted again together with the added ones (added ones included).
    residual : `numpy.ndarray` or None
        With ``overwrite``: the input image with the model of every source subtracted (the
        input array itself, float32).

    The input sources dropped by the refit (see ``prune_snr``) are not in ``table``.
    """

    table: Table
    model: np.ndarray | None
    n_added: int
    n_refit: int
    residual: np.ndarray | None = None

    def to_dict(self) -> dict:
        """JSON-safe summary (without the table and the image)."""
        return {
            "n_sources": len(self.table),
            "n_added": int(self.n_added),
            "n_refit": int(self.n_refit),
        }


def _fit_xy(table):
    x = np.asarray(table["x_psf"], float)
    y = np.asarray(table["y_psf"], float)
    xc, yc = _xy(table, "psf_photometry_with_residual_detection")
    bad = ~(np.isfinite(x) & np.isfinite(y))
    return np.where(bad, xc, x), np.where(bad, yc, y)


def psf_photometry_with_residual_detection(
    data_sub,
    rms,
    sources,
    epsf,
    *,
    gain_e_per_adu,
    exptime_s,
    mask=None,
    min_snr=5.0,
    candidate_snr=4.0,
    model_error_frac=0.05,
    refit_iterations=3,
    prune_snr=2.0,
    merge_radius_px=None,
    exclude_mask=None,
    overwrite=False,
    keep_model=True,
    **psf_kwargs,
):
    """
    PSF photometry, then detection on the fit residual and a joint refit with the new sources.

    1. `psf_photometry` of ``sources``;
    2. the fitted model of all sources is subtracted and
       `rpp_tasks.stages.detection.detect_residual_sources` searches the residual with the noise
       ``rms^2 + model / gain + (model_error_frac * model)^2`` (the last term keeps the
       imperfections of the PSF model in bright cores from making stars) and the same
       matched-filter S/N cut as the detection stage (``min_snr``);
    3. the new sources and every old source whose footprint can overlap theirs are fitted again
       together (one extra pass, a few position steps) on the image with the model of all other
       sources subtracted; refitted sources left without significant flux, or on top of a brighter
       one, are dropped.

    This recovers faint stars 2-8 px from brighter ones that the segmentation of
    `rpp_tasks.stages.detection.detect_sources` merges into the bright star.

    Parameters
    ----------
    data_sub, rms, sources, epsf, gain_e_per_adu, exptime_s, mask
        As in `psf_photometry`.
    min_snr : float, optional
        Minimum local-plane matched-filter S/N of an added source.
    candidate_snr : float, optional
        Threshold of the residual S/N map for candidate peaks.
    model_error_frac : float, optional
        Relative PSF-model error added to the residual variance.
    refit_iterations : int, optional
        Position steps of the joint refit (each clipped to ``max_shift_px``).
    prune_snr, merge_radius_px : float, optional
        After the refit, a refitted source whose PSF flux S/N is below ``prune_snr`` (a new one:
        below ``min_snr - 1``), or that lies
        within ``merge_radius_px`` (default ``max(1, 0.9 FWHM)``) of a brighter refitted source,
        is dropped (the lobes of a merged pair that the first fit placed between the two stars,
        or a second detection of one star) and the rest fitted again.
    exclude_mask : array_like of bool, optional
        No source is searched for there (halos and bleed trails of saturated stars).
    overwrite : bool, optional
        ``data_sub`` (C-contiguous float32) is consumed: it becomes the residual image (data
        minus the model of every source; bad pixels at 0), returned as ``residual``. Saves two
        full-frame arrays.
    keep_model : bool, optional
        Return the model image (``False``: ``model`` is None, one full-frame array less).
    **psf_kwargs
        Passed to `psf_photometry` (``fit_shape``, ``refine_positions``, ...).

    Returns
    -------
    result : `PsfPassResult`

    Raises
    ------
    ValueError
        As `psf_photometry`.
    """
    from scipy.spatial import cKDTree

    from rpp_tasks.stages.detection import detect_residual_sources

    func = "psf_photometry_with_residual_detection"
    data, rms, mask = _check_inputs(data_sub, rms, mask, func)
    overwrite_ok = bool(
        overwrite and data.dtype == np.float32 and data.flags.c_contiguous and data.flags.writeable
    )
    t1 = psf_photometry(
        data,
        rms,
        sources,
        epsf,
        gain_e_per_adu=gain_e_per_adu,
        exptime_s=exptime_s,
        mask=mask,
        **psf_kwargs,
    )
    shape = data.shape
    if len(t1) == 0:
        return PsfPassResult(t1, np.zeros(shape, np.float32), 0, 0, data if overwrite_ok else None)
    x1, y1 = _fit_xy(t1)
    f1 = np.nan_to_num(np.asarray(t1["flux_psf"], float))
    rms_typ = float(np.median(np.asarray(rms)[::8, ::8]))
    model = _render(epsf, shape, x1, y1, f1, rms_typ)
    resid = np.subtract(data, model, out=data if overwrite_ok else None, dtype=np.float32)
    del data
    from rpp_tasks.stages.detection import ModelVariance

    rms_arr = np.broadcast_to(np.asarray(rms, np.float32), shape)
    var = ModelVariance(rms_arr, model, gain_e_per_adu, model_error_frac)
    if merge_radius_px is None:
        merge_radius_px = max(1.0, 0.9 * float(epsf.fwhm_px))
    rmask = mask
    if exclude_mask is not None:
        rmask = exclude_mask if mask is None else (mask | exclude_mask)
    new = detect_residual_sources(
        resid,
        var,
        fwhm_px=epsf.fwhm_px,
        mask=rmask,
        min_snr=min_snr,
        candidate_snr=candidate_snr,
        exclude_xy=(x1, y1),
        exclude_radius_px=max(1.5, 1.0 * float(epsf.fwhm_px)),
        overwrite=True,  # resid: bad pixels -> 0 (they are left out of every fit anyway)
    )
    del rmask, var
    if len(new) == 0:
        t1.meta.update(n_residual_sources=0, n_refit_psf=0)
        return PsfPassResult(
            t1, model if keep_model else None, 0, 0, resid if overwrite_ok else None
        )

    # old sources whose fit footprint can overlap a new one's are refitted with them
    half = int(t1.meta.get("psf_fit_shape_px", 2 * int(round(2.0 * epsf.fwhm_px)) + 1)) // 2
    xn, yn = _xy(new, func)
    hits = cKDTree(np.column_stack([xn, yn])).query_ball_point(
        np.column_stack([np.nan_to_num(x1, nan=-1e9), np.nan_to_num(y1, nan=-1e9)]),
        r=2.0 * half + 2.0,
        return_length=True,
    )
    sub = np.flatnonzero(hits > 0)
    src_cols = [c for c in sources.colnames if c in new.colnames]
    refit = Table()
    for c in src_cols:
        old_vals = np.asarray(t1[c])[sub]
        if c == "x_centroid":
            old_vals = x1[sub]
        elif c == "y_centroid":
            old_vals = y1[sub]
        refit[c] = np.concatenate([old_vals, np.asarray(new[c]).astype(old_vals.dtype)])
    sub_model = _render(epsf, shape, x1[sub], y1[sub], f1[sub], rms_typ)
    model -= sub_model  # in place: the model of the sources not refitted
    rms_refit = _strip_map(
        lambda m, r: np.sqrt(r * r + np.maximum(m, 0.0) * np.float32(1.0 / gain_e_per_adu)),
        model,
        rms,
    )
    resid += sub_model  # in place: the image with the model of all other sources removed
    del sub_model
    data_refit = resid
    del resid
    n_new = len(new)
    is_new = np.concatenate([np.zeros(sub.size, bool), np.ones(n_new, bool)])
    origin = np.concatenate([sub, np.arange(n_new)])  # row in t1 (old) or in ``new``

    def fit(tab):
        return psf_photometry(
            data_refit,
            rms_refit,
            tab,
            epsf,
            gain_e_per_adu=gain_e_per_adu,
            exptime_s=exptime_s,
            mask=mask,
            **psf_kwargs,
        )

    # a merged pair leaves two lobes around the first fit: positions need a few steps to move
    # (each step is clipped to max_shift_px), then sources that lost their flux or sit on top of a
    # brighter one are dropped and the rest fitted once more
    t2 = fit(refit)
    for _ in range(max(0, int(refit_iterations) - 1)):
        refit["x_centroid"], refit["y_centroid"] = _fit_xy(t2)
        t2 = fit(refit)
    f2 = np.asarray(t2["flux_psf"], float)
    e2 = np.asarray(t2["flux_err_psf"], float)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr2 = f2 / e2
    x2, y2 = _fit_xy(t2)
    # a source found on the residual must stay significant in the PSF fit (noise peaks of the
    # matched filter lose their flux); older sources only need to keep some flux
    drop = ~(snr2 >= np.where(is_new, max(prune_snr, min_snr - 1.0), prune_snr))
    rank = np.empty(f2.size, np.int64)
    rank[np.argsort(-np.nan_to_num(f2, nan=-np.inf), kind="stable")] = np.arange(f2.size)
    pts = np.column_stack([np.nan_to_num(x2, nan=-1e9), np.nan_to_num(y2, nan=-1e9)])
    tree2 = cKDTree(pts)
    pairs = tree2.query_pairs(merge_radius_px, output_type="ndarray")
    if pairs.size:
        drop[np.where(rank[pairs[:, 0]] > rank[pairs[:, 1]], pairs[:, 0], pairs[:, 1])] = True
    # a new source within 1.5 FWHM of a star 20 times brighter lives where a few percent of the
    # bright star's model error outshines it: a fit residual, not a star
    fnn = np.nan_to_num(f2, nan=0.0)
    for i in np.flatnonzero(is_new & ~drop):
        near = tree2.query_ball_point(pts[i], 1.5 * float(epsf.fwhm_px))
        if any(j != i and fnn[j] > 20.0 * max(fnn[i], 0.0) for j in near):
            drop[i] = True
    if np.any(drop):
        refit = refit[~drop]
        is_new, origin = is_new[~drop], origin[~drop]
        refit["x_centroid"], refit["y_centroid"] = x2[~drop], y2[~drop]
        t2 = fit(refit)
    keep_old = np.ones(len(t1), bool)
    keep_old[sub[~np.isin(sub, origin[~is_new])]] = False
    psf_cols = [c for c in t2.colnames if c not in src_cols]
    old_rows = np.flatnonzero(~is_new)
    for c in psf_cols:
        if c in t1.colnames:
            t1[c][origin[old_rows]] = t2[c][old_rows]
    # append the new sources (all columns of t1; detection columns from the residual search;
    # their x_centroid / y_centroid are the PSF-fit positions)
    new_rows = np.flatnonzero(is_new)
    new_kept = new[origin[new_rows]]
    xn2, yn2 = _fit_xy(t2[new_rows])
    new_kept["x_centroid"], new_kept["y_centroid"] = xn2, yn2
    n_add = len(new_kept)
    add = {}
    next_id = int(np.max(t1["id"])) + 1 if "id" in t1.colnames and len(t1) else 1
    for c in t1.colnames:
        col = t1[c]
        if c == "id":
            add[c] = np.arange(next_id, next_id + n_add, dtype=col.dtype)
        elif c in psf_cols:
            add[c] = np.asarray(t2[c][new_rows]).astype(col.dtype)
        elif c in new_kept.colnames:
            add[c] = np.asarray(new_kept[c]).astype(col.dtype)
        else:
            fill = np.nan if col.dtype.kind == "f" else (0 if col.dtype.kind in "iub" else "")
            add[c] = np.full(n_add, fill, dtype=col.dtype)
    out = Table(
        {c: np.concatenate([np.asarray(t1[c])[keep_old], add[c]]) for c in t1.colnames},
        meta=t1.meta,
    )
    for c in t1.colnames:
        if t1[c].unit is not None:
            out[c].unit = t1[c].unit
    x2, y2 = _fit_xy(t2)
    f2 = np.nan_to_num(np.asarray(t2["flux_psf"], float))
    rms_refit = None  # noqa: F841  (frees a full-frame array)
    if keep_model:
        part = _render(epsf, shape, x2, y2, f2, rms_typ)
        model += part
        if overwrite_ok:
            data_refit -= part
        del part
    elif overwrite_ok:
        _render(epsf, shape, x2, y2, -f2, rms_typ, out=data_refit)
    if not keep_model:
        model = None
    n_dropped = int((~keep_old).sum())
    out.meta.update(n_residual_sources=n_add, n_refit_psf=int(len(t2)), n_dropped_psf=n_dropped)
    log.info(
        "%s: %d sources added from the residual, %d refitted, %d dropped",
        func,
        n_add,
        len(t2),
        n_dropped,
    )
    return PsfPassResult(out, model, n_add, len(t2), data_refit if overwrite_ok else None)


# --------------------------------------------------------------------------------------------
# flags
# --------------------------------------------------------------------------------------------


def quality_flags(
    table,
    *,
    saturation_adu,
    shape,
    fwhm_px,
    edge_px=None,
    peak_col="peak",
    data=None,
    blend_radius_fwhm=2.0,
):
    """
    Add per-source S/N class and booleans ``saturated``, ``near_edge`` and ``blended``.

    Parameters
    ----------
    table : `~astropy.table.Table`
        Photometry table (``x_centroid``/``y_centroid``, and ``snr_psf`` and/or ``snr_1p3fwhm``).
    saturation_adu : float
        Saturation level of the raw pixels (ADU).
    shape : tuple of int
        Image shape ``(ny, nx)``.
    fwhm_px : float
        PSF FWHM.
    edge_px : float, optional
        Distance to the border below which a source is ``near_edge``; default ``2 * fwhm_px``.
    peak_col : str, optional
        Column with the peak value, used when ``data`` is not given (compared to
        ``saturation_adu``; being background-subtracted it underestimates saturation).
    data : array_like, optional
        The calibrated image *with* its background; the 3x3 maximum around each source is compared
        to ``saturation_adu`` (preferred).
    blend_radius_fwhm : float, optional
        A source with another source closer than this many FWHM is ``blended``; SEP's merged
        flag (bit 1 of ``flag``) also sets it.

    Returns
    -------
    table : `~astropy.table.Table`
        A copy with ``snr`` (``snr_psf`` when finite, else ``snr_1p3fwhm``), ``quality``
        (``"poor"`` S/N <= 5, ``"marginal"`` 5 < S/N <= 10, ``"good"`` S/N > 10), ``saturated``,
        ``near_edge``, ``blended``.
    """
    out = Table(table, copy=True)
    n = len(out)
    ny, nx = (int(shape[0]), int(shape[1]))
    if edge_px is None:
        edge_px = 2.0 * float(fwhm_px)
    if n == 0:
        out["snr"] = np.zeros(0)
        out["quality"] = np.zeros(0, dtype="U8")
        for c in ("saturated", "near_edge", "blended"):
            out[c] = np.zeros(0, bool)
        return out
    x, y = _xy(out, "quality_flags")
    snr = np.full(n, np.nan)
    if "snr_psf" in out.colnames:
        snr = np.asarray(out["snr_psf"], float).copy()
    if "snr_1p3fwhm" in out.colnames:
        alt = np.asarray(out["snr_1p3fwhm"], float)
        snr = np.where(np.isfinite(snr), snr, alt)
    quality = np.where(snr > 10, "good", np.where(snr > 5, "marginal", "poor")).astype("U8")
    if data is not None:
        img = np.asarray(data)
        if img.shape != (ny, nx):
            raise ValueError(
                f"quality_flags: data shape {img.shape} does not match shape {(ny, nx)}"
            )
        ixc = np.clip(np.rint(np.nan_to_num(x)).astype(int), 0, nx - 1)
        iyc = np.clip(np.rint(np.nan_to_num(y)).astype(int), 0, ny - 1)
        mx = np.full(n, -np.inf)
        for ddy in (-1, 0, 1):
            for ddx in (-1, 0, 1):
                mx = np.maximum(
                    mx, img[np.clip(iyc + ddy, 0, ny - 1), np.clip(ixc + ddx, 0, nx - 1)]
                )
        saturated = mx >= saturation_adu
    elif peak_col in out.colnames:
        saturated = np.asarray(out[peak_col], float) >= saturation_adu
    else:
        saturated = np.zeros(n, bool)
    near_edge = (
        (x < edge_px - 0.5)
        | (y < edge_px - 0.5)
        | (x > nx - 0.5 - edge_px)
        | (y > ny - 0.5 - edge_px)
    )
    near_edge |= ~(np.isfinite(x) & np.isfinite(y))
    pts = np.column_stack([np.nan_to_num(x, nan=-1e9), np.nan_to_num(y, nan=-1e9)])
    tree = cKDTree(pts)
    pairs = tree.query_pairs(blend_radius_fwhm * float(fwhm_px), output_type="ndarray")
    blended = np.zeros(n, bool)
    if pairs.size:
        blended[pairs.ravel()] = True
    if "flag" in out.colnames:
        blended |= (np.asarray(out["flag"]) & 1) != 0
    out["snr"] = snr
    out["quality"] = quality
    out["saturated"] = saturated
    out["near_edge"] = near_edge
    out["blended"] = blended
    return out


# --------------------------------------------------------------------------------------------
# aperture corrections and the model-mismatch term
# --------------------------------------------------------------------------------------------


def apply_aperture_corrections(table, psf_model, *, exptime_s):
    """
    Turn the aperture fluxes of ``table`` into total fluxes with the local PSF model (in place).

    For each star the fraction of its light inside each aperture is the exact aperture sum of its
    own unit-flux model (the PSF at its position, centred where the PSF fit put the star, the
    aperture where the aperture photometry put it); ``apcorr_L = 1 / fraction`` multiplies
    ``flux_L`` and ``flux_err_L``, and ``mag_L`` becomes a total magnitude. The factors are
    kept in the columns ``apcorr_<label>`` and ``meta["aperture_corrected"]`` is set.

    Parameters
    ----------
    table : `~astropy.table.Table`
        Output of `aperture_photometry` (``meta["aperture_radii_px"]``) with PSF positions
        ``x_psf``, ``y_psf`` (the centroid is used where they are missing).
    psf_model : `rpp_tasks.stages.field_psf.FieldPSF`
        The PSF model with ``aperture_fractions``.
    exptime_s : float

    Returns
    -------
    summary : dict
        Per label: the median correction (mag) and its 1st-99th percentile range over the frame.
    """
    radii = table.meta.get("aperture_radii_px") or {}
    n = len(table)
    if n == 0 or not radii:
        table.meta["aperture_corrected"] = True
        for lab in radii:
            table[f"apcorr_{lab}"] = np.zeros(0)
        return {}
    xc, yc = _xy(table, "apply_aperture_corrections")
    xs = np.asarray(table["x_psf"], float) if "x_psf" in table.colnames else xc
    ys = np.asarray(table["y_psf"], float) if "y_psf" in table.colnames else yc
    bad = ~(np.isfinite(xs) & np.isfinite(ys)) | (np.hypot(xs - xc, ys - yc) >= 3.0)
    xs = np.where(bad, xc, xs)
    ys = np.where(bad, yc, ys)
    frac = psf_model.aperture_fractions(xs, ys, radii, x_ap=xc, y_ap=yc)
    summary = {}
    for lab in radii:
        fr = np.asarray(frac[lab], float)
        corr = np.where(np.isfinite(fr) & (fr > 0.05), 1.0 / np.where(fr > 0, fr, 1.0), np.nan)
        for c in ("flux", "flux_err"):
            table[f"{c}_{lab}"] = np.asarray(table[f"{c}_{lab}"], float) * corr
        mag, mag_err, snr = _mags(table[f"flux_{lab}"], table[f"flux_err_{lab}"], exptime_s)
        table[f"mag_{lab}"] = mag
        table[f"mag_err_{lab}"] = mag_err
        table[f"snr_{lab}"] = snr
        table[f"apcorr_{lab}"] = corr
        ok = np.isfinite(corr)
        if ok.any():
            m = 2.5 * np.log10(corr[ok])
            summary[lab] = {
                "radius_px": round(float(radii[lab]), 3),
                "median_mag": round(float(np.median(m)), 4),
                "p01_mag": round(float(np.percentile(m, 1)), 4),
                "p99_mag": round(float(np.percentile(m, 99)), 4),
            }
    table.meta["aperture_corrected"] = True
    return summary


# --------------------------------------------------------------------------------------------
# saturated stars
# --------------------------------------------------------------------------------------------

#: ``flag_psf`` bit: flux of a saturated star from a fit of its unsaturated wings
FLAG_PSF_WINGS = 16


def _shifted_beta(psf_model, du):
    """The model with ``u = 1/beta`` shifted by ``du`` everywhere (a `FieldPSF`)."""
    if not du or not hasattr(psf_model, "coeffs"):
        return psf_model
    from dataclasses import replace

    coeffs = np.array(psf_model.coeffs, float)
    coeffs[3, 0] += du
    return replace(psf_model, coeffs=coeffs)


def fit_saturated_stars(
    data_sub, rms, mask, sources, psf_model, *, gain_e_per_adu, exptime_s, saturation_adu
):
    """
    Fluxes of saturated stars from their unsaturated wings, and the image of their models.

    For each source (rows of `rpp_tasks.stages.detection.find_saturated_stars`: ``a_px`` is the
    saturated radius, ``halo_radius_px`` the halo) the local PSF model is fitted to the
    unmasked, unsaturated pixels between ``r_sat + 1`` px and ``r_sat + 4 FWHM``, two pixels away
    from any masked one (flux, position, a shift of the model's ``1/beta`` -- far wings are very
    sensitive to it -- and a sky offset; four Gauss-Newton steps, weights
    ``1 / (rms^2 + model / gain)``). The model of each
    star is then drawn out to where it falls below 2 % of the noise (at most 256 px), so that its
    halo can be subtracted from its neighbours.

    Returns
    -------
    table : `~astropy.table.Table`
        ``sources`` plus the PSF columns of `psf_photometry` (``flag_psf`` has `FLAG_PSF_WINGS`);
        ``halo_radius_px`` grows to where 5 % of the fitted model is still 3 times the noise.
    image : numpy.ndarray
        float32 model image of the saturated stars.
    """
    data = np.asarray(data_sub)
    ny, nx = data.shape
    out = Table(sources, copy=True)
    n = len(out)
    image = np.zeros(data.shape, np.float32)
    cols = {
        k: np.full(n, np.nan)
        for k in ("x_psf", "y_psf", "flux_psf", "flux_err_psf", "qfit_psf", "chi2_psf")
    }
    npix = np.zeros(n, np.int64)
    flag = np.full(n, FLAG_PSF_WINGS, np.int64)
    r_excl = np.zeros(n)
    fwhm = float(psf_model.fwhm_px)
    rms_arr = np.broadcast_to(np.asarray(rms, np.float32), data.shape)
    rms_typ = float(np.median(rms_arr[::16, ::16]))
    for i in range(n):
        x, y = float(out["x_centroid"][i]), float(out["y_centroid"][i])
        r_sat = float(out["a_px"][i]) if "a_px" in out.colnames else 2.0
        r_in, r_out = r_sat + 1.0, r_sat + 4.0 * fwhm
        h = int(math.ceil(r_out)) + 1
        ix, iy = int(round(x)), int(round(y))
        k = np.arange(-h, h + 1)
        px = ix + k[None, :] + 0 * k[:, None]
        py = iy + k[:, None] + 0 * k[None, :]
        inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        pxc, pyc = np.clip(px, 0, nx - 1), np.clip(py, 0, ny - 1)
        d = data[pyc, pxc].astype(np.float64)
        v0 = rms_arr[pyc, pxc].astype(np.float64) ** 2
        use = inside & np.isfinite(d) & (d < 0.5 * saturation_adu)
        if mask is not None:
            # masked pixels and their neighbours (ends and sides of bleed trails)
            from scipy.ndimage import binary_dilation

            use &= ~binary_dilation(np.asarray(mask)[pyc, pxc], iterations=2)
        f, du, bk = np.nan, 0.0, 0.0
        for _ in range(4):
            r2 = (px - x) ** 2 + (py - y) ** 2
            sel = use & (r2 >= r_in**2) & (r2 <= r_out**2)
            if sel.sum() < 20:
                flag[i] |= 1
                break
            # far wings are very sensitive to the model's beta: u = 1/beta is fitted too, and a
            # local sky offset (the sky map is biased by a big halo)
            wing = _shifted_beta(psf_model, du)
            one = (np.array([x]), np.array([y]), h)
            pos = dict(ix=np.array([ix]), iy=np.array([iy]))
            val, gx, gy = wing.stamps(*one, **pos, derivatives=True)
            dval = (_shifted_beta(psf_model, du + 0.004).stamps(*one, **pos) - val) / 0.004
            val, gx, gy, dval = val[0][sel], gx[0][sel], gy[0][sel], dval[0][sel]
            w = 1.0 / (
                v0[sel] + (np.maximum(f * val, 0.0) / gain_e_per_adu if np.isfinite(f) else 0.0)
            )
            a = np.column_stack([val, gx, gy, dval, np.ones_like(val)])
            nmat = a.T @ (a * w[:, None])
            rhs = a.T @ (d[sel] * w)
            try:
                cov = np.linalg.inv(nmat)
            except np.linalg.LinAlgError:
                flag[i] |= 1
                break
            sol = cov @ rhs
            f = float(sol[0])
            if not f > 0:
                flag[i] |= 1
                break
            step = np.clip(sol[1:3] / f, -1.0, 1.0)
            x, y = x + float(step[0]), y + float(step[1])
            du = float(np.clip(du + sol[3] / f, -0.15, 0.15))
            bk = float(sol[4])
        if not (np.isfinite(f) and f > 0) or flag[i] & 1:
            continue
        resid = d[sel] - f * val - bk
        cols["x_psf"][i], cols["y_psf"][i] = x, y
        cols["flux_psf"][i] = f
        cols["flux_err_psf"][i] = math.sqrt(max(cov[0, 0], 0.0))
        cols["qfit_psf"][i] = float(np.sum(np.abs(resid)) / f)
        cols["chi2_psf"][i] = float(np.sum(resid**2 * w) / max(sel.sum() - 3, 1))
        npix[i] = int(sel.sum())
        # draw the star out to where it fades below 2 % of the noise
        hh = int(
            psf_model._footprint_halves(np.array([x]), np.array([y]), np.array([f]), rms_typ, 32)[0]
        )
        hh = int(min(max(hh, h), 256))
        wing = _shifted_beta(psf_model, du)
        wing.render(data.shape, [x], [y], [f], half=hh, out=image)
        # where 5 % of the model (its accuracy near a saturated core) exceeds 3 sigma, nothing
        # found on the residual can be trusted
        r_excl[i] = float(wing.radius_below([x], [y], [f], 60.0 * rms_typ)[0])
        if cols["chi2_psf"][i] > 5.0:  # a poor fit (a neighbour in the wings): its residual too
            r_excl[i] = max(r_excl[i], r_sat + 2.5 * fwhm)
    mag, mag_err, snr = _mags(cols["flux_psf"], cols["flux_err_psf"], exptime_s)
    for key, arr in cols.items():
        out[key] = arr
    out["mag_psf"] = mag
    out["mag_err_psf"] = mag_err
    out["snr_psf"] = snr
    out["npix_psf"] = npix
    out["group_size_psf"] = np.ones(n, np.int64)
    out["flag_psf"] = flag
    if "halo_radius_px" in out.colnames:
        out["halo_radius_px"] = np.maximum(np.asarray(out["halo_radius_px"], float), r_excl)
    return out, image


# --------------------------------------------------------------------------------------------
# the photometry of one frame
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FramePhotometry:
    """Outcome of `measure_frame`.

    Attributes
    ----------
    catalog : `~astropy.table.Table`
        Sources with aperture (total, aperture-corrected) and PSF photometry, per-star PSF
        (``psf_fwhm_px``, ``psf_ellipticity``) and quality flags.
    psf : `rpp_tasks.stages.field_psf.FieldPSF` or None
    fwhm_px : float
        Median FWHM over the frame (the aperture radii are 1.1 and 1.3 times it).
    info : dict
        Small JSON-safe summary for the frame's ``summary.json``.
    """

    catalog: Table
    psf: object
    fwhm_px: float
    info: dict

    def to_dict(self) -> dict:
        return dict(self.info)


def measure_frame(
    data_sub,
    rms,
    sources,
    *,
    gain_e_per_adu,
    exptime_s,
    saturation_adu,
    fixed_radius_px,
    annulus_fwhm=(3.0, 5.0),
    mask=None,
    image=None,
    psf=True,
    psf_max_order=3,
    psf_max_stars=250,
    overwrite=False,
    background=None,
    frame="",
):
    """
    Photometry of one frame: PSF model, PSF and aperture photometry, corrections, honest errors.

    1. `rpp_tasks.stages.field_psf_fit.fit_field_psf`: a PSF varying across the field (elliptical Moffat
       with polynomial shape; the order follows the number and spread of the PSF stars);
    2. with ``psf``: `psf_photometry_with_residual_detection` (every source fitted with its local
       PSF, faint stars found on the residual);
    3. `aperture_photometry` on the neighbour-subtracted image, then
       `apply_aperture_corrections`: aperture magnitudes are total magnitudes everywhere;
    4. `measure_model_mismatch` on isolated stars and `add_mismatch_errors`: reported errors
       include what the model does not explain;
    5. `quality_flags`.

    Parameters
    ----------
    data_sub : array_like or None
        Background-subtracted image (ADU, float32); None: ``image - background`` is made here
        (and freed as soon as it is not needed: the lowest peak memory).
    rms : array_like
        Background RMS map (ADU).
    sources : `~astropy.table.Table`
        Detections (`rpp_tasks.stages.detection.detect_sources`).
    gain_e_per_adu, exptime_s : float
    saturation_adu : float
        Saturation of the *raw* pixels (ADU); the level in ``data_sub`` is estimated from
        ``image - data_sub`` when ``image`` is given.
    fixed_radius_px : float
    annulus_fwhm : (float, float)
    mask : array_like of bool, optional
    image : array_like, optional
        The calibrated image with its background (for the saturation flags).
    psf : bool
        Run the PSF photometry (the PSF model is fitted in any case: it gives the FWHM and the
        aperture corrections).
    psf_max_order, psf_max_stars : int
        See `rpp_tasks.stages.field_psf_fit.fit_field_psf`.
    overwrite : bool
        ``data_sub`` (float32) may be modified in place (saves a full-frame copy).
    background : array_like, optional
        Sky map (with ``image``, when ``data_sub`` is None).
    frame : str
        Frame name for the log.

    Returns
    -------
    result : `FramePhotometry`
        ``psf`` is None and ``fwhm_px`` NaN when no PSF star qualifies (the caller decides).
    """
    from rpp_tasks.stages.background import release_freed_memory
    from rpp_tasks.stages.field_psf_fit import fit_field_psf
    from rpp_tasks.stages.flux_calibration import (
        add_mismatch_errors,
        add_psf_model_errors,
        calibrate_to_large_aperture,
        measure_model_mismatch,
    )

    release_freed_memory()
    if data_sub is None:
        if image is None or background is None:
            raise ValueError("measure_frame: give data_sub, or image and background")
        data = np.subtract(image, background, dtype=np.float32)
        overwrite = True  # our own array
    else:
        data = np.asarray(data_sub)
        if overwrite and not (data.dtype == np.float32 and data.flags.writeable):
            overwrite = False
    shape = data.shape
    bkg_level = 0.0
    if image is not None:
        bkg_level = float(np.median(np.asarray(image)[::16, ::16] - data[::16, ::16]))
    sat_sub = float(saturation_adu) - bkg_level
    info = {}
    model = fit_field_psf(
        data,
        sources,
        rms=rms,
        mask=mask,
        gain_e_per_adu=gain_e_per_adu,
        saturation_adu=sat_sub,
        max_order=psf_max_order,
        max_stars=psf_max_stars,
    )
    if model is None:
        log.warning("measure_frame %s: no PSF star; no photometry", frame)
        return FramePhotometry(Table(sources, copy=True), None, float("nan"), {"psf_model": None})
    fwhm = float(model.fwhm_px)
    info["psf_model"] = model.to_dict()
    sources_fit = sources
    from rpp_tasks.stages.detection import FLAG_SATURATED, saturation_exclusion_mask

    if psf and not overwrite:
        data = np.array(data, dtype=np.float32)  # the caller's image stays as it is
        overwrite = True

    is_sat = (
        (np.asarray(sources["flag"]) & FLAG_SATURATED) != 0
        if "flag" in sources.colnames
        else np.zeros(len(sources), bool)
    )
    zone = None
    if psf and np.any(is_sat):
        trails = saturation_exclusion_mask(
            data.shape, sources[:0], data, mask, saturation_adu=sat_sub
        )
        sat_tab, sat_image = fit_saturated_stars(
            data,
            rms,
            mask,
            sources[is_sat],
            model,
            gain_e_per_adu=gain_e_per_adu,
            exptime_s=exptime_s,
            saturation_adu=sat_sub,
        )
        # their halos are subtracted from the image everything else is measured on
        data = np.subtract(data, sat_image, out=data if overwrite else None, dtype=np.float32)
        overwrite = True  # from here on ``data`` is ours either way
        del sat_image
        zone = saturation_exclusion_mask(data.shape, sat_tab)
        zone |= trails
        del trails
        # the partly filled pixels along the sides and ends of the bleed trails are not a star's
        # light: masked for the fits and apertures of the stars lying across a trail
        mask = _grow_saturated(data, mask, sat_sub)
        info["n_saturated"] = int(is_sat.sum())
    if psf:
        fit = psf_photometry_with_residual_detection(
            data,
            rms,
            sources[~is_sat] if np.any(is_sat) else sources,
            model,
            gain_e_per_adu=gain_e_per_adu,
            exptime_s=exptime_s,
            mask=mask,
            exclude_mask=zone,
            overwrite=True,  # ``data`` becomes the residual image
            keep_model=False,
        )
        sources_fit, resid = fit.table, fit.residual
        del zone, data
        if np.any(is_sat):
            from astropy.table import vstack

            sat_tab = Table(sat_tab, copy=False)
            for c in sources_fit.colnames:
                if c not in sat_tab.colnames:
                    col = sources_fit[c]
                    fill = (
                        np.nan if col.dtype.kind == "f" else (0 if col.dtype.kind in "iub" else "")
                    )
                    sat_tab[c] = np.full(len(sat_tab), fill, dtype=col.dtype)
            meta = dict(sources_fit.meta)
            sources_fit = vstack(
                [sat_tab[sources_fit.colnames], sources_fit], metadata_conflicts="silent"
            )
            sources_fit.meta.update(meta)
        info["n_residual_sources"] = int(fit.n_added)
        _adopt_psf_positions(sources_fit)
        # ``resid``: the image with every fitted star removed: apertures (each star's own model
        # added back), the large-aperture references and the mismatch term all use it
        del fit
    else:
        resid = data
        del data
    cat = aperture_photometry(
        resid,
        rms,
        sources_fit,
        fwhm_px=fwhm,
        fixed_radius_px=fixed_radius_px,
        annulus_fwhm=annulus_fwhm,
        gain_e_per_adu=gain_e_per_adu,
        exptime_s=exptime_s,
        mask=mask,
        epsf=model if psf else None,
        residual=psf,
        overwrite=psf or overwrite,
    )
    info["aperture_corrections"] = apply_aperture_corrections(cat, model, exptime_s=exptime_s)
    if psf:
        info["flux_calibration"] = calibrate_to_large_aperture(
            cat,
            resid,
            rms,
            model,
            gain_e_per_adu=gain_e_per_adu,
            exptime_s=exptime_s,
            mask=mask,
        )
        mism = measure_model_mismatch(
            cat, resid, rms, model, gain_e_per_adu=gain_e_per_adu, mask=mask
        )
        add_mismatch_errors(cat, mism, exptime_s=exptime_s)
        info["model_error_frac"] = _json_num(mism)
        info["psf_model_error"] = add_psf_model_errors(
            cat,
            model,
            radius_px=(info["flux_calibration"] or {}).get("radius_px")
            or mism.get("radius_px")
            or 2.5 * fwhm,
            exptime_s=exptime_s,
        )
    del resid
    release_freed_memory()
    xs = np.asarray(cat["x_psf"], float) if "x_psf" in cat.colnames else _xy(cat, "m")[0]
    ys = np.asarray(cat["y_psf"], float) if "y_psf" in cat.colnames else _xy(cat, "m")[1]
    xc, yc = _xy(cat, "measure_frame")
    xs = np.where(np.isfinite(xs), xs, xc)
    ys = np.where(np.isfinite(ys), ys, yc)
    loc = model.shape_at(xs, ys)
    cat["psf_fwhm_px"] = loc["fwhm_px"]
    cat["psf_ellipticity"] = loc["ellipticity"]
    cat = quality_flags(
        cat,
        saturation_adu=saturation_adu,
        shape=shape,
        fwhm_px=fwhm,
        data=image,
    )
    cat.meta["fwhm_px"] = fwhm
    info["fwhm_px"] = fwhm
    info["fwhm_n_stars"] = int(model.n_stars)
    return FramePhotometry(cat, model, fwhm, info)


def _grow_saturated(data, mask, saturation_adu):
    """``mask`` plus the saturated pixels (see `rpp_tasks.stages.detection`) grown by 1 px along
    the rows and 2 px along the columns (a new array; ``mask`` when nothing is saturated)."""
    from rpp_tasks.stages.detection import _saturated_pixels

    if mask is None:
        return mask
    sat = _saturated_pixels(data, mask, saturation_adu)
    py, px = np.nonzero(sat)
    del sat
    if px.size == 0:
        return mask
    out = np.array(mask, dtype=bool, copy=True)
    ny, nx = out.shape
    for ox, oy in ((-1, 0), (1, 0), (0, -1), (0, 1), (0, -2), (0, 2)):
        out[np.clip(py + oy, 0, ny - 1), np.clip(px + ox, 0, nx - 1)] = True
    return out


def _adopt_psf_positions(table):
    """``x_centroid, y_centroid`` become the PSF-fit positions where the fit refined them (a
    detection centroid is pulled by neighbours); the detection centroids stay in ``x_det,
    y_det``. In place."""
    if "x_psf" not in table.colnames or len(table) == 0:
        return
    xc, yc = _xy(table, "measure_frame")
    xp = np.asarray(table["x_psf"], float)
    yp = np.asarray(table["y_psf"], float)
    ok = np.isfinite(xp) & np.isfinite(yp) & (np.hypot(xp - xc, yp - yc) < 3.0)
    if "flag_psf" in table.colnames:
        ok &= (np.asarray(table["flag_psf"]) & 3) == 0
    table["x_det"] = xc
    table["y_det"] = yc
    table["x_centroid"] = np.where(ok, xp, xc)
    table["y_centroid"] = np.where(ok, yp, yc)


def _json_num(d):
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


_FLUX_CALIBRATION_NAMES = (
    "calibrate_to_large_aperture",
    "measure_model_mismatch",
    "add_mismatch_errors",
)


def __getattr__(name):
    # the repeatability figure lives in `rpp_tasks.stages.repeatability` (imported lazily: it
    # uses this module's position helpers); the old import path keeps working
    if name in ("repeatability", "Repeatability", "REPEATABILITY_SNR_BINS"):
        from rpp_tasks.stages import repeatability as _rep

        return getattr(_rep, name)
    if name in _FLUX_CALIBRATION_NAMES:
        from rpp_tasks.stages import flux_calibration as _fc

        return getattr(_fc, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
