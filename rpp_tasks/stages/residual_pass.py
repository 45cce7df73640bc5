"""A second PSF pass on the residual image: stars hidden in the wings of brighter ones.

psf_photometry_with_residual_detection fits the detected stars, subtracts the model, detects on
the residual image the sources the first pass missed (close companions, stars in halos), refuses
any that re-find an already fitted star (no duplicates), and fits all stars again together. The
result is a PsfPassResult (the table, the residual detections and what was refused, with reasons).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from astropy.stats import sigma_clip  # noqa: F401  (documented alternative; clipping is vectorised below)
from astropy.table import Table
from scipy.spatial import cKDTree

from rpp_tasks.stages.phot_common import _check_inputs, _fit_xy, _xy
from rpp_tasks.stages.psf_phot import _render, _strip_map, psf_photometry

__all__ = ["PsfPassResult", "psf_photometry_with_residual_detection"]

log = logging.getLogger(__name__)


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
