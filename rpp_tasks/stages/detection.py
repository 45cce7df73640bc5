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

#: Columns of a source table, in order, with their dtypes.
SOURCE_COLUMNS = (
    ("id", np.int64),
    ("x_centroid", np.float64),
    ("y_centroid", np.float64),
    ("flux", np.float64),
    ("peak", np.float64),
    ("npix", np.int64),
    ("a_px", np.float64),
    ("b_px", np.float64),
    ("theta_rad", np.float64),
    ("flag", np.int64),
    ("snr_det", np.float64),
)

_DEFAULT_FWHM_PX = 3.0
FLAG_PEAK_FINDER = 0x1000  #: ``flag`` bit of sources added by the matched-filter peak search
FLAG_RESIDUAL = 0x2000  #: ``flag`` bit of sources found on the PSF-fit residual image
FLAG_SATURATED = 0x4000  #: ``flag`` bit of a saturated star (one source per saturated region)


def empty_source_table(*, method="sep", threshold_sigma=np.nan):
    """An empty source table with the standard columns and ``meta["no_sources"] = True``."""
    tab = Table([np.zeros(0, dt) for _, dt in SOURCE_COLUMNS], names=[n for n, _ in SOURCE_COLUMNS])
    tab.meta.update(
        method=method, threshold_sigma=float(threshold_sigma), n_sources=0, no_sources=True
    )
    return tab


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
                f"detect_sources: mask shape {mask.shape} does not match data_sub shape {data.shape}"
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
        sat_px |= _trail_ends(data, sat_px, float(saturation_adu))
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


def _saturated_pixels(data, mask, saturation_adu):
    """Masked pixels at or above half the saturation level (saturated cores, bleed trails)."""
    return np.asarray(mask, bool) & (np.asarray(data) >= np.float32(0.5 * saturation_adu))


def find_saturated_stars(
    data_sub,
    mask,
    *,
    saturation_adu,
    rms,
    fwhm_px,
    halo_snr=20.0,
    halo_beta=2.5,
    min_pixels=1,
    trail_band=True,
):
    """
    Saturated stars: one source per connected saturated region, and the zone they spoil.

    The saturated pixels are the masked pixels at or above half of ``saturation_adu`` (the mask
    of the calibration stage marks the raw saturated pixels; their values stay high). Each
    region (core plus bleed trails along the columns, gaps of up to 4 px bridged) is one star,
    centred on the rows where the region is widest (the saturated core is a disc, the trails are
    narrower), at the mean column of those rows. The star is saturated out to ``r_sat``, half
    the widest saturated row; beyond, a Moffat wing falls as
    ``r**(-2 beta)``, so its halo stays above ``halo_snr`` times the noise out to
    ``r_halo = r_sat (saturation / (halo_snr rms))**(1 / (2 halo_beta))`` (``halo_beta`` = 2.5 is
    a conservative, shallow wing).

    Parameters
    ----------
    data_sub : array_like
        Background-subtracted image (ADU).
    mask : array_like of bool
        Bad pixels, including the saturated ones.
    saturation_adu : float
        Saturation level in the units of ``data_sub``.
    rms : array_like or float
        Background noise (ADU).
    fwhm_px : float

    Returns
    -------
    sources : `~astropy.table.Table`
        Columns of `SOURCE_COLUMNS` (without ``id``) plus ``halo_radius_px``; ``flag`` =
        `FLAG_SATURATED`, ``snr_det`` = inf, ``peak`` = ``saturation_adu``.
    zone : numpy.ndarray of bool
        The halo discs (within them the star's own light exceeds ``halo_snr`` times the noise) and
        the saturated pixels grown by ``0.75 FWHM + 1`` px (the sides and ends of the bleed
        trails; with ``trail_band=False`` only the ends): no detection there is trusted as a
        star of its own.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    data = np.asarray(data_sub)
    ny, nx = data.shape
    sat = _saturated_pixels(data, mask, saturation_adu)
    py, px = np.nonzero(sat)
    zone = np.zeros(data.shape, bool)
    cols = {name: [] for name, _ in SOURCE_COLUMNS[1:]}
    cols["halo_radius_px"] = []
    if px.size:
        # bleed trails run along the columns and may have gaps: bridge up to 4 px vertically
        pairs = cKDTree(np.column_stack([px, py / 3.0])).query_pairs(1.5, output_type="ndarray")
        g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(px.size, px.size))
        ncomp, lab = connected_components(g, directed=False)
        rms_typ = float(np.median(np.asarray(rms)[::16, ::16])) if np.ndim(rms) else float(rms)
        if trail_band:
            # the bleed trails, widened by about one FWHM: the masked band cut through the halo
            # leaves ridges on both sides that look like stars to a matched filter
            _trail_band(zone, px, py, fwhm_px)
        else:
            # the ends of the trails (the last, partly filled pixels) and the trails themselves
            # (interpolated for SEP; a detection centred on them is a piece of the trail)
            ends = _trail_ends(data, sat, saturation_adu)
            _trail_band(zone, *np.nonzero(ends)[::-1], fwhm_px)
            zone |= sat
        for c in range(ncomp):
            sel = lab == c
            if sel.sum() < min_pixels:
                continue
            cx_, cy_ = px[sel], py[sel]
            # the saturated core is a disc, the bleed trails are narrower: the star sits in the
            # rows where the region is widest (a trail cut by the frame edge does not bias it)
            urow, rcnt = np.unique(cy_, return_counts=True)
            core_rows = urow[rcnt >= max(1, 0.5 * rcnt.max())]
            y = float(np.mean(core_rows))
            in_core = np.isin(cy_, core_rows)
            x = float(np.mean(cx_[in_core]))
            width = float(rcnt.max())
            r_sat = max(0.5 * width, 1.0)
            r_halo = r_sat * (saturation_adu / max(halo_snr * rms_typ, 1e-30)) ** (
                1.0 / (2.0 * halo_beta)
            )
            r_halo = float(min(max(r_halo, r_sat + 1.5 * fwhm_px), 0.25 * max(nx, ny)))
            # halo disc
            r_i = int(math.ceil(r_halo))
            x0, x1 = max(0, int(x) - r_i), min(nx, int(x) + r_i + 2)
            y0, y1 = max(0, int(y) - r_i), min(ny, int(y) + r_i + 2)
            gx, gy = np.meshgrid(np.arange(x0, x1), np.arange(y0, y1))
            zone[y0:y1, x0:x1] |= (gx - x) ** 2 + (gy - y) ** 2 <= r_halo**2
            flux = float(np.sum(data[cy_, cx_]))
            for name, val in (
                ("x_centroid", x),
                ("y_centroid", y),
                ("flux", flux),
                ("peak", float(saturation_adu)),
                ("npix", int(sel.sum())),
                ("a_px", r_sat),
                ("b_px", r_sat),
                ("theta_rad", 0.0),
                ("flag", FLAG_SATURATED),
                ("snr_det", np.inf),
                ("halo_radius_px", r_halo),
            ):
                cols[name].append(val)
    tab = Table()
    for name, dt in SOURCE_COLUMNS[1:]:
        tab[name] = np.asarray(cols[name], dtype=dt)
    tab["halo_radius_px"] = np.asarray(cols["halo_radius_px"], dtype=float)
    if len(tab):
        log.info("find_saturated_stars: %d saturated stars", len(tab))
    return tab, zone


def _stars_on_trails(work, err, bad, x, y, cand, sat_tab, fwhm_px, *, min_snr=5.0, max_width=8):
    """Which candidate detections ``cand`` are stars lying across a bleed trail.

    A detection centred on a masked trail pixel, outside every saturated star's halo disc, is a
    star when the unmasked columns on *both* sides of the trail show a bump along the column
    centred on its row (``min_snr`` sigma over the rows 2 FWHM away): a piece of trail or the
    smooth halo beside it has no such bump. Returns a bool array of the length of ``x``.
    """
    ny, nx = work.shape
    out = np.zeros(np.size(x), bool)
    h = max(3, int(math.ceil(2.0 * fwhm_px)))
    sx = np.asarray(sat_tab["x_centroid"], float)
    sy = np.asarray(sat_tab["y_centroid"], float)
    sr = np.asarray(sat_tab["halo_radius_px"], float) + fwhm_px
    for i in np.flatnonzero(cand):
        xi, yi = float(x[i]), float(y[i])
        if not (np.isfinite(xi) and np.isfinite(yi)):
            continue
        if np.any(np.hypot(sx - xi, sy - yi) < sr):
            continue
        ix, iy = int(round(xi)), int(round(yi))
        if iy - h < 0 or iy + h >= ny or not bad[iy, ix]:
            continue
        left = ix
        while left > 0 and bad[iy, left - 1]:
            left -= 1
        right = ix
        while right < nx - 1 and bad[iy, right + 1]:
            right += 1
        if right - left + 1 > max_width or left - 3 < 0 or right + 4 > nx:
            continue
        rows = slice(iy - h, iy + h + 1)
        ok = True
        for cs in (slice(left - 3, left), slice(right + 1, right + 4)):
            if np.any(bad[rows, cs]):
                ok = False
                break
            prof = np.sum(work[rows, cs], axis=1, dtype=float)
            var = np.sum(np.asarray(err[rows, cs], float) ** 2, axis=1)
            core = prof[h - 1 : h + 2].mean()
            outer = np.r_[prof[:2], prof[-2:]].mean()
            sig = math.sqrt(var[h - 1 : h + 2].mean() / 3.0 + np.r_[var[:2], var[-2:]].mean() / 4.0)
            if not core - outer > min_snr * sig:
                ok = False
                break
        out[i] = ok
    return out


def _trail_ends(data, sat, saturation_adu, reach=2):
    """Unsaturated pixels within ``reach`` px above or below a saturated one in the same column
    and brighter than 5 % of saturation: the partly filled ends of bleed trails."""
    ny = sat.shape[0]
    ends = np.zeros(sat.shape, bool)
    py, px = np.nonzero(sat)
    for o in range(1, reach + 1):
        for yy in (py + o, py - o):
            ok = (yy >= 0) & (yy < ny)
            yy, xx = yy[ok], px[ok]
            hit = ~sat[yy, xx] & (np.asarray(data)[yy, xx] > 0.05 * saturation_adu)
            ends[yy[hit], xx[hit]] = True
    return ends


def _inpaint_rows(work, bad_y, bad_x, max_gap=8):
    """Replace pixels ``(bad_y, bad_x)`` of ``work`` (in place) by a linear interpolation along
    their row between the nearest good pixels, for gaps up to ``max_gap`` px (else 0): a masked
    bleed trail then leaves no ridges on its sides, and a star on the trail keeps a core."""
    if bad_x.size == 0:
        return
    ny, nx = work.shape
    is_bad = np.zeros(work.shape, bool)
    is_bad[bad_y, bad_x] = True
    for y in np.unique(bad_y):
        row_bad = is_bad[y]
        xs = np.flatnonzero(row_bad)
        # runs of consecutive bad pixels
        starts = xs[np.r_[True, np.diff(xs) > 1]]
        stops = xs[np.r_[np.diff(xs) > 1, True]]
        for a, b in zip(starts, stops):
            left, right = a - 1, b + 1
            if b - a + 1 > max_gap or left < 0 or right >= nx:
                work[y, a : b + 1] = 0.0
                continue
            vl, vr = work[y, left], work[y, right]
            t = (np.arange(a, b + 1) - left) / (right - left)
            work[y, a : b + 1] = vl + t * (vr - vl)


def _trail_band(zone, px, py, fwhm_px):
    """Mark the saturated pixels grown by ``0.75 FWHM + 1`` px (in place): the sides of the bleed
    trails and their ends, where the last, partly filled pixel is bright but not saturated."""
    ny, nx = zone.shape
    grow = max(2, int(math.ceil(0.75 * fwhm_px)) + 1)
    for oy in range(-grow, grow + 1):
        yy = np.clip(py + oy, 0, ny - 1)
        for ox in range(-grow, grow + 1):
            if ox * ox + oy * oy <= grow * grow:
                zone[yy, np.clip(px + ox, 0, nx - 1)] = True


def saturation_exclusion_mask(shape, sources, data_sub=None, mask=None, *, saturation_adu=None):
    """The zone spoiled by the saturated stars of a source table (see `find_saturated_stars`):
    halo discs of the rows flagged `FLAG_SATURATED` (radius ``halo_radius_px``) and, with
    ``data_sub``, ``mask`` and ``saturation_adu``, the widened bleed trails."""
    ny, nx = int(shape[0]), int(shape[1])
    zone = np.zeros((ny, nx), bool)
    if data_sub is not None and mask is not None and saturation_adu is not None:
        py, px = np.nonzero(_saturated_pixels(data_sub, mask, saturation_adu))
        if px.size:
            _trail_band(zone, px, py, float(sources.meta.get("fwhm_px", 3.0) or 3.0))
    if sources is None or len(sources) == 0 or "flag" not in sources.colnames:
        return zone
    satrow = (np.asarray(sources["flag"]) & FLAG_SATURATED) != 0
    if not np.any(satrow):
        return zone
    xs = np.asarray(sources["x_centroid"], float)[satrow]
    ys = np.asarray(sources["y_centroid"], float)[satrow]
    rh = (
        np.asarray(sources["halo_radius_px"], float)[satrow]
        if "halo_radius_px" in sources.colnames
        else np.full(xs.size, 10.0)
    )
    for x, y, r in zip(xs, ys, rh):
        r_i = int(math.ceil(r))
        x0, x1 = max(0, int(x) - r_i), min(nx, int(x) + r_i + 2)
        y0, y1 = max(0, int(y) - r_i), min(ny, int(y) + r_i + 2)
        gx, gy = np.meshgrid(np.arange(x0, x1), np.arange(y0, y1))
        zone[y0:y1, x0:x1] |= (gx - x) ** 2 + (gy - y) ** 2 <= r * r
    return zone


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
    # SEP's compact default kernel: with broad matched kernels SEP fails to deblend faint stars
    # on the wings of bright ones (checked with sep 1.4.1); the matched filter is used below instead.
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

    The local maxima of the matched-filter response ``sum(K r)`` (``K`` a Gaussian of
    ``fwhm_px``, computed in float32 with separable filters) whose S/N
    ``sum(K r) / sqrt(sum(K^2 var))`` is at least ``candidate_snr`` are the candidates (the noise
    is evaluated only at the maxima); each candidate then gets the local-plane matched-filter S/N of
    `detect_sources` (``snr_det``) and is kept when ``snr_det >= min_snr``. Used by
    `rpp_tasks.stages.photometry.psf_photometry_with_residual_detection` to find faint stars on the wings
    of bright ones, which the segmentation of `detect_sources` merges into the bright star.

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
            f"detect_residual_sources: resid {res.shape} and var {var.shape} must be the same 2-D shape"
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
