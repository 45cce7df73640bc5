"""Source detection on a background-subtracted image.

`detect_sources` runs SEP (SExtractor's extraction: matched filter, multi-threshold deblending)
by default, or photutils' DAOStarFinder. Every candidate then gets a *matched-filter S/N*
measured at its windowed centroid,

    snr_det = sum(K * d) / sqrt(sum(K^2 * rms^2)),

with ``K`` a Gaussian of the expected FWHM and masked pixels left out. That is the S/N of the
optimal (PSF-weighted) flux estimate, so a cut on it (``min_snr``, default 5) removes the noise
peaks that a per-pixel threshold lets through in large frames, while keeping every star whose
true S/N is comfortably above the cut.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from astropy.table import Table

from rpp_tasks.stages.saturation import (
    _inpaint_rows,
    _saturated_pixels,
    _stars_on_trails,
    _trail_ends,
    find_saturated_stars,
    saturation_exclusion_mask,
)
from rpp_tasks.stages.sources import (
    FLAG_PEAK_FINDER,
    FLAG_RESIDUAL,
    FLAG_SATURATED,
    SOURCE_COLUMNS,
    empty_source_table,
)

__all__ = [
    "detect_sources",
    "detect_residual_sources",
    "SOURCE_COLUMNS",
    "empty_source_table",
    "FLAG_PEAK_FINDER",
    "FLAG_RESIDUAL",
    "FLAG_SATURATED",
    "find_saturated_stars",
    "saturation_exclusion_mask",
    "ModelVariance",
]

log = logging.getLogger(__name__)

_DEFAULT_FWHM_PX = 3.0


def _gauss_kernel(fwhm_px):
    sig = fwhm_px / 2.3548
    half = max(1, int(math.ceil(2.0 * sig)))
    k = np.arange(-half, half + 1)
    ker = np.exp(-0.5 * (k[:, None] ** 2 + k[None, :] ** 2) / sig**2)
    return (ker / ker.sum()).astype(np.float32)


def _matched_snr(data, var, mask, x, y, fwhm_px, *, var_is_err=False):
    """Matched-filter S/N of point sources at (x, y) with a local plane as nuisance.

    Weighted least squares of ``d = a K + b0 + bx dx + by dy`` on a stamp (``K`` a unit-peak
    Gaussian of ``fwhm_px``); returns ``a / sigma_a``. The plane absorbs the smooth wings of
    bright neighbours, so wing fragments get a low S/N while isolated stars keep nearly the
    optimal one.
    """
    ny, nx = data.shape
    sig = fwhm_px / 2.3548
    half = max(3, int(math.ceil(1.2 * fwhm_px)))
    k = np.arange(-half, half + 1)
    ix = np.rint(x).astype(int)
    iy = np.rint(y).astype(int)
    px = ix[:, None] + k[None, :]
    py = iy[:, None] + k[None, :]
    inx = (px >= 0) & (px < nx)
    iny = (py >= 0) & (py < ny)
    pxc = np.clip(px, 0, nx - 1)
    pyc = np.clip(py, 0, ny - 1)
    ddx = px - x[:, None]
    ddy = py - y[:, None]
    ker = np.exp(-0.5 * ddy**2 / sig**2)[:, :, None] * np.exp(-0.5 * ddx**2 / sig**2)[:, None, :]
    d = data[pyc[:, :, None], pxc[:, None, :]].astype(np.float64)
    v = var[pyc[:, :, None], pxc[:, None, :]].astype(np.float64)
    if var_is_err:  # the noise map is an rms: square only the gathered stamps
        v = v * v
    w = (iny[:, :, None] & inx[:, None, :]) / np.where(v > 0, v, np.inf)
    if mask is not None:
        w = w * ~mask[pyc[:, :, None], pxc[:, None, :]]
    ones = np.ones_like(ker)
    gx = np.broadcast_to(k[None, None, :] / half, ker.shape)
    gy = np.broadcast_to(k[None, :, None] / half, ker.shape)
    basis = np.stack([ker, ones, gx, gy], axis=1)  # (N, 4, S, S)
    ata = np.einsum("nisr,njsr,nsr->nij", basis, basis, w)
    atb = np.einsum("nisr,nsr,nsr->ni", basis, d, w)
    ata += np.eye(4) * 1e-12 * np.trace(ata, axis1=1, axis2=2)[:, None, None]
    try:
        cov = np.linalg.inv(ata)
    except np.linalg.LinAlgError:
        cov = np.linalg.pinv(ata)
    amp = np.einsum("nj,nj->n", cov[:, 0, :], atb)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cov[:, 0, 0] > 0, amp / np.sqrt(cov[:, 0, 0]), np.nan)


def detect_sources(
    data_sub,
    rms,
    *,
    method="sep",
    threshold_sigma=3.0,
    fwhm_px=None,
    mask=None,
    min_area_px=5,
    deblend_cont=0.005,
    deblend_nthresh=32,
    max_sources=None,
    edge_px=2.0,
    min_snr=5.0,
    peak_search=True,
    saturation_adu=None,
    overwrite=False,
    frame="",
):
    """
    Detect point-like sources in a background-subtracted image.

    Parameters
    ----------
    data_sub : array_like
        2-D background-subtracted image (ADU).
    rms : array_like or float
        Background RMS map (ADU, read noise included), same shape as ``data_sub``, or a scalar.
    method : {"sep", "dao"}, optional
        ``"sep"``: SExtractor-style extraction (``sep.extract`` with ``err=rms`` and a matched
        Gaussian filter of ``fwhm_px``), windowed centroids. ``"dao"``: photutils
        ``DAOStarFinder`` with threshold ``threshold_sigma * median(rms)``.
    threshold_sigma : float, optional
        Detection threshold in units of the (filtered) noise.
    fwhm_px : float, optional
        Expected PSF FWHM; sets the filter kernel, the centroid window and the S/N kernel
        (default 3 px when unknown, recorded in ``meta["fwhm_px_assumed"]``).
    mask : array_like of bool, optional
        Pixels to ignore (cosmic rays, bad pixels); set to zero before filtering.
    min_area_px : int, optional
        Minimum number of connected pixels above threshold (``sep`` only).
    deblend_cont, deblend_nthresh : float, int, optional
        SEP deblending contrast and number of levels.
    max_sources : int, optional
        Keep at most this many (brightest) sources.
    edge_px : float, optional
        Drop detections whose centroid is closer than this to the image border.
    min_snr : float, optional
        Minimum matched-filter S/N (``snr_det``) of a kept detection; ``0`` disables the cut.
    peak_search : bool, optional
        (``sep`` only) Also search a difference-of-Gaussians image for local maxima (S/N >= 3)
        farther than ``0.6 * fwhm_px`` from every SEP detection: faint stars on
        the wings of bright ones that SEP's segmentation does not deblend. They get the flag bit
        `FLAG_PEAK_FINDER`, a Gaussian-fit ``flux`` and ``npix = 0``.
    saturation_adu : float, optional
        Saturation level in the units of ``data_sub`` (raw saturation minus sky). With it, every
        saturated region of ``mask`` (core and bleed trails) becomes one source (`FLAG_SATURATED`,
        see `find_saturated_stars`) and the detections on its bleed trails and halo are dropped
        (``meta["n_dropped_saturated"]``).
    overwrite : bool, optional
        ``data_sub`` (C-contiguous float32) may be used as the work image and modified in place
        (masked pixels set to 0): saves a full-frame copy.
    frame : str, optional
        Frame name used in log messages.

    Returns
    -------
    sources : `~astropy.table.Table`
        Columns ``id`` (1-based), ``x_centroid``, ``y_centroid`` (0-based px), ``flux`` (ADU,
        isophotal for ``sep``), ``peak`` (ADU above background), ``npix``, ``a_px``, ``b_px``,
        ``theta_rad``, ``flag`` (SEP flags, or 0), ``snr_det``; sorted by ``flux`` descending.
        ``meta``: ``method``, ``threshold_sigma``, ``fwhm_px``, ``min_snr``, ``n_sources``,
        ``n_rejected_snr``, ``no_sources``. No detection gives an empty table with the same columns
        and ``meta["no_sources"] = True``.

    Raises
    ------
    ValueError
        Shape mismatch between ``data_sub``, ``rms`` and ``mask``, non-2-D input, unknown method.
    """
    from rpp_tasks.stages.background import release_freed_memory

    release_freed_memory()
    data = np.asarray(data_sub)
    if data.ndim != 2:
        raise ValueError(f"detect_sources: data_sub must be 2-D, got shape {data.shape}")
    if method not in ("sep", "dao"):
        raise ValueError(f"detect_sources: method must be 'sep' or 'dao', got {method!r}")
    if np.ndim(rms) == 0:
        rms = np.full(data.shape, float(rms), dtype=np.float32)
    rms = np.asarray(rms)
    if rms.shape != data.shape:
        raise ValueError(
            f"detect_sources: rms shape {rms.shape} does not match data_sub shape {data.shape}"
        )
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape:
            raise ValueError(
                f"detect_sources: mask shape {mask.shape} does not match "
                f"data_sub shape {data.shape}"
            )
    if data.size == 0:
        return empty_source_table(method=method, threshold_sigma=threshold_sigma)

    assumed = fwhm_px is None or not np.isfinite(fwhm_px) or fwhm_px <= 0
    fwhm = _DEFAULT_FWHM_PX if assumed else float(fwhm_px)

    # saturated stars first: they need the values of the masked pixels
    sat_tab, zone = None, None
    if saturation_adu is not None and mask is not None and np.isfinite(saturation_adu):
        sat_tab, zone = find_saturated_stars(
            data,
            mask,
            saturation_adu=float(saturation_adu),
            rms=rms,
            fwhm_px=fwhm,
            trail_band=False,
        )
        sat_px = _saturated_pixels(data, mask, float(saturation_adu))
        sat_px |= _trail_ends(data, sat_px, float(saturation_adu), rms=rms)
        trail_y, trail_x = np.nonzero(sat_px)
        del sat_px

    # C-contiguous float32 (SEP requirement); masked / non-finite pixels -> 0
    if overwrite and data.dtype == np.float32 and data.flags.c_contiguous and data.flags.writeable:
        work = data
    else:
        work = np.array(data, dtype=np.float32, order="C")
    bad = np.isfinite(work)
    np.logical_not(bad, out=bad)
    if mask is not None:
        bad |= mask
    err = np.ascontiguousarray(rms, dtype=np.float32)
    bad_err = np.isfinite(err)
    bad_err &= err > 0
    np.logical_not(bad_err, out=bad_err)
    if bad_err.any():
        bad |= bad_err
        err = err.copy()
        good_err = err[~bad]
        err[bad] = float(np.median(good_err)) if good_err.size else 1.0
    del bad_err
    work[bad] = 0.0
    if bad.all():
        return empty_source_table(method=method, threshold_sigma=threshold_sigma)
    sep_bad = bad
    if sat_tab is not None:
        # saturated cores and bleed trails are interpolated across along the rows and shown to
        # SEP as data (a star on a trail stays one object, the trail's sides make no ridges);
        # they stay masked for the S/N and the centroids
        sep_bad = bad.copy()
        sep_bad[trail_y, trail_x] = False
        bad[trail_y, trail_x] = True
        _inpaint_rows(work, trail_y, trail_x)

    if method == "sep":
        cols = _run_sep(
            work,
            err,
            sep_bad,
            threshold_sigma=threshold_sigma,
            fwhm=fwhm,
            min_area_px=min_area_px,
            deblend_cont=deblend_cont,
            deblend_nthresh=deblend_nthresh,
        )
    else:
        cols = _run_dao(work, err, bad, threshold_sigma=threshold_sigma, fwhm=fwhm)
    if method == "sep" and peak_search:
        cols = _add_missed_peaks(cols, work, err, bad, fwhm=fwhm, min_snr=3.0)
    if cols is None or cols["x_centroid"].size == 0:
        log.info(
            "detect_sources %s: no sources (method=%s, threshold %.1f sigma)",
            frame,
            method,
            threshold_sigma,
        )
        return empty_source_table(method=method, threshold_sigma=threshold_sigma)

    ny, nx = data.shape
    n_drop_sat = 0
    if sat_tab is not None and len(sat_tab):
        ix = np.clip(np.rint(cols["x_centroid"]).astype(int), 0, nx - 1)
        iy = np.clip(np.rint(cols["y_centroid"]).astype(int), 0, ny - 1)
        inz = zone[iy, ix]
        if inz.any():
            # a star lying on a bleed trail far from the saturated core keeps its detection
            inz &= ~_stars_on_trails(
                work, err, bad, cols["x_centroid"], cols["y_centroid"], inz, sat_tab, fwhm
            )
        n_drop_sat = int(inz.sum())
        cols = {k: v[~inz] for k, v in cols.items()}
    del zone
    x, y = cols["x_centroid"], cols["y_centroid"]
    keep = np.isfinite(x) & np.isfinite(y)
    keep &= (
        (x >= edge_px - 0.5)
        & (y >= edge_px - 0.5)
        & (x <= nx - 0.5 - edge_px)
        & (y <= ny - 0.5 - edge_px)
    )
    snr = np.full(x.size, np.nan)
    snr[keep] = _matched_snr(work, err, bad, x[keep], y[keep], fwhm, var_is_err=True)
    cols["snr_det"] = snr
    n_before = int(keep.sum())
    if min_snr and min_snr > 0:
        keep &= snr >= min_snr
    n_rej = n_before - int(keep.sum())
    cols = {k: v[keep] for k, v in cols.items()}
    order = np.argsort(-cols["flux"], kind="stable")
    if max_sources is not None:
        order = order[: int(max_sources)]
    tab = Table()
    for name, dt in SOURCE_COLUMNS[1:]:
        tab[name] = np.asarray(cols[name])[order].astype(dt)
    tab["halo_radius_px"] = np.zeros(len(tab))
    if sat_tab is not None and len(sat_tab):
        from astropy.table import vstack

        tab = vstack([sat_tab[tab.colnames], tab])  # saturated stars first (brightest)
    tab.add_column(np.arange(1, len(tab) + 1, dtype=np.int64), name="id", index=0)
    tab.meta.update(
        method=method,
        threshold_sigma=float(threshold_sigma),
        fwhm_px=fwhm,
        fwhm_px_assumed=bool(assumed),
        min_snr=float(min_snr or 0.0),
        n_sources=len(tab),
        n_rejected_snr=n_rej,
        n_saturated_sources=0 if sat_tab is None else len(sat_tab),
        n_dropped_saturated=n_drop_sat,
        no_sources=len(tab) == 0,
    )
    log.info(
        "detect_sources %s: %d sources (%s, %.1f sigma, %d rejected by S/N < %.1f)",
        frame,
        len(tab),
        method,
        threshold_sigma,
        n_rej,
        min_snr or 0.0,
    )
    return tab


class ModelVariance:
    """The variance of a fit residual, ``rms^2 + max(model, 0) / gain + (frac model)^2``,
    evaluated only where it is indexed (no full-frame array).

    Parameters
    ----------
    rms, model : numpy.ndarray
        Background noise and the fitted model image (ADU), same shape.
    gain_e_per_adu, model_error_frac : float
    """

    def __init__(self, rms, model, gain_e_per_adu, model_error_frac):
        self.rms = rms
        self.model = model
        self.inv_gain = 1.0 / float(gain_e_per_adu)
        self.frac = float(model_error_frac)
        self.shape = np.shape(model)

    def __getitem__(self, idx):
        r = np.asarray(self.rms[idx], np.float64)
        m = np.asarray(self.model[idx], np.float64)
        return r * r + np.maximum(m, 0.0) * self.inv_gain + (self.frac * m) ** 2

    def min_valid(self):
        """A lower bound of the variance over the frame."""
        rmin = float(np.nanmin(self.rms[::4, ::4]))
        return rmin * rmin if rmin > 0 else 1e-30


def _separable_filter(image, k1, strip=256):
    """``correlate1d`` along both axes (zero outside the image), one row strip at a time."""
    from scipy import ndimage

    ny = image.shape[0]
    h = k1.size // 2
    out = np.empty(image.shape, dtype=np.float32)
    for r0 in range(0, ny, strip):
        r1 = min(ny, r0 + strip)
        a, b = max(0, r0 - h), min(ny, r1 + h)
        tmp = ndimage.correlate1d(image[a:b], k1, axis=1, mode="constant")
        tmp = ndimage.correlate1d(tmp, k1, axis=0, mode="constant")
        out[r0:r1] = tmp[r0 - a : r0 - a + (r1 - r0)]
    return out


def _run_sep(work, err, bad, *, threshold_sigma, fwhm, min_area_px, deblend_cont, deblend_nthresh):
    import sep

    sep.set_extract_pixstack(int(max(300_000, work.size // 4)))
    sep.set_sub_object_limit(4096)
    # SEP's compact default kernel: with broad matched kernels SEP fails to deblend faint stars on
    # the wings of bright ones (checked with sep 1.4.1); the matched filter is used below instead.
    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32)
    objs = sep.extract(
        work,
        float(threshold_sigma),
        err=err,
        mask=bad,
        minarea=int(min_area_px),
        filter_kernel=kernel,
        filter_type="matched",
        deblend_nthresh=int(deblend_nthresh),
        deblend_cont=float(deblend_cont),
        clean=False,
    )
    if len(objs) == 0:
        return None
    x = objs["x"].astype(np.float64)
    y = objs["y"].astype(np.float64)
    sig = np.full(x.size, fwhm / 2.3548)
    xw, yw, wflag = sep.winpos(work, x, y, sig, mask=bad)
    # windowed centroid unless it failed or ran away (crowded neighbours)
    use = (
        (wflag == 0)
        & np.isfinite(xw)
        & np.isfinite(yw)
        & (np.hypot(xw - x, yw - y) < 0.5 * fwhm + 0.5)
    )
    x = np.where(use, xw, x)
    y = np.where(use, yw, y)
    return {
        "x_centroid": x,
        "y_centroid": y,
        "flux": objs["flux"].astype(np.float64),
        "peak": objs["peak"].astype(np.float64),
        "npix": objs["npix"].astype(np.int64),
        "a_px": objs["a"].astype(np.float64),
        "b_px": objs["b"].astype(np.float64),
        "theta_rad": objs["theta"].astype(np.float64),
        "flag": objs["flag"].astype(np.int64),
    }


def _add_missed_peaks(cols, work, err, bad, *, fwhm, min_snr):
    """Local maxima of the matched-filter S/N image not yet detected (see ``peak_search``)."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    sig = fwhm / 2.3548
    # difference-of-Gaussians: cancels constants and linear gradients (the wings of bright
    # neighbours), so faint stars on a slope still make a local maximum
    img = np.where(bad, 0.0, work.astype(np.float64))
    g1 = ndimage.gaussian_filter(img, sig, truncate=3.0)
    dog = g1 - ndimage.gaussian_filter(img, 2.0 * sig, truncate=3.0)
    delta = np.zeros((int(12 * sig) | 1,) * 2)
    delta[delta.shape[0] // 2, delta.shape[1] // 2] = 1.0
    dk = ndimage.gaussian_filter(delta, sig, truncate=3.0) - ndimage.gaussian_filter(
        delta, 2.0 * sig, truncate=3.0
    )
    errf = err.astype(np.float64)
    snr_map = dog / (errf * math.sqrt(float(np.sum(dk**2))))
    snr_map[bad] = 0.0
    peaks = (snr_map == ndimage.maximum_filter(snr_map, size=3, mode="constant")) & (
        snr_map >= min_snr
    )
    # plain matched filter too: the DoG's negative ring hides stars a few FWHM from very bright ones
    mf = g1 / (
        errf * math.sqrt(float(np.sum(ndimage.gaussian_filter(delta, sig, truncate=3.0) ** 2)))
    )
    mf[bad] = 0.0
    peaks |= (mf == ndimage.maximum_filter(mf, size=3, mode="constant")) & (mf >= min_snr)
    py, px = np.nonzero(peaks)
    if px.size == 0:
        return cols
    if cols is not None and cols["x_centroid"].size:
        tree = cKDTree(np.column_stack([cols["x_centroid"], cols["y_centroid"]]))
        dist, _ = tree.query(np.column_stack([px, py]))
        new = dist > max(1.5, 0.6 * fwhm)
        px, py = px[new], py[new]
    ny, nx = work.shape
    ok = (px > 0) & (py > 0) & (px < nx - 1) & (py < ny - 1)
    px, py = px[ok], py[ok]
    if px.size == 0:
        return cols
    # sub-pixel peak by 3-point parabolas on the S/N map
    c = snr_map[py, px]
    l, r = snr_map[py, px - 1], snr_map[py, px + 1]
    d, u = snr_map[py - 1, px], snr_map[py + 1, px]
    with np.errstate(invalid="ignore", divide="ignore"):
        ox = np.clip(np.nan_to_num(0.5 * (l - r) / (l - 2 * c + r)), -0.5, 0.5)
        oy = np.clip(np.nan_to_num(0.5 * (d - u) / (d - 2 * c + u)), -0.5, 0.5)
    x = px + ox
    y = py + oy
    # flux of a Gaussian star giving this DoG response (rough; PSF photometry measures it)
    amp = dog[py, px] / float(dk.max())
    n = x.size
    extra = {
        "x_centroid": x,
        "y_centroid": y,
        "flux": amp.astype(np.float64),
        "peak": work[py, px].astype(np.float64),
        "npix": np.zeros(n, np.int64),
        "a_px": np.full(n, sig),
        "b_px": np.full(n, sig),
        "theta_rad": np.zeros(n),
        "flag": np.full(n, FLAG_PEAK_FINDER, np.int64),
    }
    if cols is None:
        return extra
    return {k: np.concatenate([cols[k], extra[k]]) for k in cols}


def _run_dao(work, err, bad, *, threshold_sigma, fwhm):
    from photutils.detection import DAOStarFinder

    thr = float(threshold_sigma) * float(np.median(err[~bad]))
    finder = DAOStarFinder(threshold=thr, fwhm=fwhm, exclude_border=False)
    tab = finder(work, mask=bad)
    if tab is None or len(tab) == 0:
        return None
    colx = "x_centroid" if "x_centroid" in tab.colnames else "xcentroid"
    coly = "y_centroid" if "y_centroid" in tab.colnames else "ycentroid"
    n = len(tab)
    sig = fwhm / 2.3548
    return {
        "x_centroid": np.asarray(tab[colx], float),
        "y_centroid": np.asarray(tab[coly], float),
        "flux": np.asarray(tab["flux"], float),
        "peak": np.asarray(tab["peak"], float),
        "npix": np.asarray(tab["npix"], np.int64)
        if "npix" in tab.colnames
        else np.full(n, 0, np.int64),
        "a_px": np.full(n, sig),
        "b_px": np.full(n, sig),
        "theta_rad": np.zeros(n),
        "flag": np.zeros(n, np.int64),
    }


def detect_residual_sources(
    resid,
    var,
    *,
    fwhm_px,
    mask=None,
    min_snr=5.0,
    candidate_snr=4.0,
    exclude_xy=None,
    exclude_radius_px=None,
    edge_px=2.0,
    overwrite=False,
):
    """
    Point sources on a residual image (data minus the fitted model of the known sources).

    The local maxima of the matched-filter response ``sum(K r)`` (``K`` a Gaussian of ``fwhm_px``,
    computed in float32 with separable filters) whose S/N ``sum(K r) / sqrt(sum(K^2 var))`` is at
    least ``candidate_snr`` are the candidates (the noise is evaluated only at the maxima); each
    candidate then gets the local-plane matched-filter S/N of `detect_sources` (``snr_det``) and is
    kept when ``snr_det >= min_snr``. Used by
    `rpp_tasks.stages.photometry.psf_photometry_with_residual_detection` to find faint stars on the
    wings of bright ones, which the segmentation of `detect_sources` merges into the bright star.

    Parameters
    ----------
    resid : array_like
        2-D residual image (ADU), background and fitted sources subtracted.
    var : array_like or `ModelVariance`
        Per-pixel variance of ``resid`` (ADU^2): background variance plus the shot noise (and any
        model-error term) of the subtracted sources.
    fwhm_px : float
        PSF FWHM (px).
    mask : array_like of bool, optional
        Pixels to ignore.
    min_snr : float, optional
        Minimum local-plane matched-filter S/N of a kept source.
    candidate_snr : float, optional
        Threshold of the S/N map for candidate peaks.
    exclude_xy : tuple of array_like, optional
        ``(x, y)`` of the known sources; candidates closer than ``exclude_radius_px`` to one are
        dropped (fit residuals of the known source rather than a new star).
    exclude_radius_px : float, optional
        Default ``max(1.5, 0.6 * fwhm_px)``.
    edge_px : float, optional
        Candidates closer than this to the border are dropped.
    overwrite : bool, optional
        ``resid`` (C-contiguous float32) may be modified in place (bad pixels set to 0).

    Returns
    -------
    sources : `~astropy.table.Table`
        Columns of `SOURCE_COLUMNS` (``flux`` from the matched filter, ``npix = 0``, ``flag`` =
        `FLAG_RESIDUAL`, ``id`` 1-based), sorted by ``flux`` descending; empty (same columns) when
        nothing is found.

    Raises
    ------
    ValueError
        Shape mismatch or non-positive ``fwhm_px``.
    """
    from scipy.spatial import cKDTree

    res = np.asarray(resid)
    lazy = isinstance(var, ModelVariance)
    if not lazy:
        var = np.asarray(var)
    if res.ndim != 2 or var.shape != res.shape:
        raise ValueError(
            f"detect_residual_sources: resid {res.shape} and var {var.shape} "
            "must be the same 2-D shape"
        )
    if not (fwhm_px is not None and np.isfinite(fwhm_px) and fwhm_px > 0):
        raise ValueError(f"detect_residual_sources: fwhm_px must be positive, got {fwhm_px!r}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != res.shape:
            raise ValueError(
                f"detect_residual_sources: mask shape {mask.shape} does not match {res.shape}"
            )
    # float32 work image with bad pixels at 0 (in place with ``overwrite``)
    if overwrite and res.dtype == np.float32 and res.flags.c_contiguous and res.flags.writeable:
        work = res
    else:
        work = np.array(res, dtype=np.float32, order="C")
    bad = np.isfinite(work)
    np.logical_not(bad, out=bad)
    if not lazy:
        vbad = np.isfinite(var)
        vbad &= var > 0
        np.logical_not(vbad, out=vbad)
        bad |= vbad
        del vbad
    if mask is not None:
        bad |= mask
    work[bad] = 0.0
    sig = float(fwhm_px) / 2.3548
    half = int(math.ceil(3.0 * sig))
    k1 = np.exp(-0.5 * (np.arange(-half, half + 1) / sig) ** 2)
    k1 /= k1.sum()
    k2d = np.outer(k1, k1)
    s2 = float(np.sum(k2d**2))
    # matched-filter numerator sum(K r) over the frame (float32, separable, in row strips so
    # only one strip-sized temporary exists); the noise sqrt(sum(K^2 var)) is computed only at
    # the local maxima above a lower bound of it
    num = _separable_filter(work, k1.astype(np.float32))
    empty = empty_source_table(method="residual", threshold_sigma=candidate_snr)
    min_var = var.min_valid() if lazy else float(np.min(var, where=~bad, initial=np.inf))
    if not np.isfinite(min_var):
        return empty
    num_min = np.float32(candidate_snr * math.sqrt(s2 * min_var))
    ny, nx = res.shape
    e = max(1, int(math.ceil(edge_px)))
    cand = num[e : ny - e, e : nx - e] >= num_min
    py, px = np.nonzero(cand)
    py += e
    px += e
    keep = ~bad[py, px]
    py, px = py[keep], px[keep]
    c = num[py, px]
    peak = np.ones(px.size, bool)
    for ddy in (-1, 0, 1):
        for ddx in (-1, 0, 1):
            if ddy or ddx:
                peak &= c >= num[py + ddy, px + ddx]
    px, py, c = px[peak], py[peak], c[peak]
    if px.size == 0:
        return empty
    # exact noise of the matched filter at the peaks
    kk = np.arange(-half, half + 1)
    wy = np.clip(py[:, None] + kk, 0, ny - 1)
    wx = np.clip(px[:, None] + kk, 0, nx - 1)
    vwin = var[wy[:, :, None], wx[:, None, :]].astype(np.float64)
    vwin = np.where(bad[wy[:, :, None], wx[:, None, :]] | ~np.isfinite(vwin), 0.0, vwin)
    den = np.sqrt(np.einsum("nij,ij->n", vwin, k2d**2))
    with np.errstate(invalid="ignore", divide="ignore"):
        snr_c = c / den
    ok = snr_c >= candidate_snr
    px, py, c = px[ok], py[ok], c[ok].astype(np.float64)
    if px.size == 0:
        return empty
    l, r = num[py, px - 1], num[py, px + 1]
    d, u = num[py - 1, px], num[py + 1, px]
    with np.errstate(invalid="ignore", divide="ignore"):
        ox = np.clip(np.nan_to_num(0.5 * (l - r) / (l - 2 * c + r)), -0.5, 0.5)
        oy = np.clip(np.nan_to_num(0.5 * (d - u) / (d - 2 * c + u)), -0.5, 0.5)
    x = px + ox.astype(np.float64)
    y = py + oy.astype(np.float64)
    if exclude_xy is not None and np.size(exclude_xy[0]):
        ex = np.column_stack([np.asarray(exclude_xy[0], float), np.asarray(exclude_xy[1], float)])
        ex = ex[np.all(np.isfinite(ex), axis=1)]
        if ex.size:
            r_ex = (
                max(1.5, 0.6 * float(fwhm_px))
                if exclude_radius_px is None
                else float(exclude_radius_px)
            )
            dist, _ = cKDTree(ex).query(np.column_stack([x, y]))
            keep = dist > r_ex
            x, y, px, py = x[keep], y[keep], px[keep], py[keep]
    if x.size == 0:
        return empty
    snr = _matched_snr(work, var, bad, x, y, float(fwhm_px))
    keep = np.isfinite(snr) & (snr >= min_snr)
    x, y, px, py, snr = x[keep], y[keep], px[keep], py[keep], snr[keep]
    n = x.size
    if n == 0:
        return empty
    flux = num[py, px].astype(np.float64) / s2  # flux of a Gaussian star giving this response
    order = np.argsort(-flux, kind="stable")
    cols = {
        "x_centroid": x,
        "y_centroid": y,
        "flux": flux,
        "peak": work[py, px].astype(np.float64),
        "npix": np.zeros(n, np.int64),
        "a_px": np.full(n, sig),
        "b_px": np.full(n, sig),
        "theta_rad": np.zeros(n),
        "flag": np.full(n, FLAG_RESIDUAL, np.int64),
        "snr_det": snr,
    }
    tab = Table()
    tab["id"] = np.arange(1, n + 1, dtype=np.int64)
    for name, dt in SOURCE_COLUMNS[1:]:
        tab[name] = np.asarray(cols[name])[order].astype(dt)
    tab.meta.update(
        method="residual",
        threshold_sigma=float(candidate_snr),
        fwhm_px=float(fwhm_px),
        min_snr=float(min_snr),
        n_sources=n,
        no_sources=False,
    )
    return tab
