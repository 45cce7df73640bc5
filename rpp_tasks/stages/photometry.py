"""The photometry of a frame: PSF and aperture photometry, corrections and per-source quality flags.

`measure_frame` runs the whole photometry of one frame (the field PSF, the PSF pass with residual
detection, apertures, saturated stars, aperture corrections to total magnitudes, quality flags);
`rpp_tasks.stages.measure.measure_catalog` calls it. The pieces live in their own modules and are
re-exported here: `aperture_photometry` (`rpp_tasks.stages.aperture_phot`), `psf_photometry`
(`rpp_tasks.stages.psf_phot`), `psf_photometry_with_residual_detection`
(`rpp_tasks.stages.residual_pass`); flux calibration helpers are `rpp_tasks.stages.flux_calibration`
and the repeatability figure `rpp_tasks.stages.repeatability`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from rpp_tasks.stages.aperture_phot import aperture_photometry
from rpp_tasks.stages.phot_common import APERTURE_LABELS, _mags, _xy
from rpp_tasks.stages.psf_phot import psf_photometry
from rpp_tasks.stages.residual_pass import PsfPassResult, psf_photometry_with_residual_detection
from rpp_tasks.stages.sources import FLAG_SATURATED

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
#: ``flag_psf`` bit: a star found beside a saturated one (in its halo), fitted jointly with it
FLAG_PSF_SAT_COMPANION = 32


def _shifted_beta(psf_model, du):
    """The model with ``u = 1/beta`` shifted by ``du`` everywhere (a `FieldPSF`)."""
    if not du or not hasattr(psf_model, "coeffs"):
        return psf_model
    from dataclasses import replace

    coeffs = np.array(psf_model.coeffs, float)
    coeffs[3, 0] += du
    return replace(psf_model, coeffs=coeffs)


def _saturated_groups(x, y, reach):
    """Groups of saturated stars whose wing-fit discs (radius ``reach``) overlap."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = x.size
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    i, j = np.nonzero(np.triu(d < np.maximum(reach[:, None], reach[None, :]), 1))
    g = coo_matrix((np.ones(i.size), (i, j)), shape=(n, n))
    _, lab = connected_components(g, directed=False)
    return [np.flatnonzero(lab == c) for c in np.unique(lab)]


def _fit_wing_group(
    psf_model, data, rms_arr, bad, comps, *, gain, saturation_adu, n_iter=4
):  # fmt: skip
    """Joint fit of a group of saturated stars and the stars beside them, on the unsaturated,
    unmasked pixels between ``r_sat + 1`` and ``r_sat + 4 FWHM`` of each saturated star.

    ``comps``: list of dicts ``x, y, kind`` ("sat" with ``r_sat``, "comp" or "nbr") and ``f``
    (NaN: unknown). Free: each component's flux and position, one shift of the model's
    ``1/beta`` for the saturated stars (far wings are very sensitive to it) and a sky offset
    (the sky map is biased by a big halo). Weights ``1 / (rms^2 + model / gain)``. Updates
    ``comps`` in place (``f``, ``x``, ``y``, ``f_err``); returns the fit's pixel arrays or None.
    """
    ny, nx = data.shape
    fwhm = float(psf_model.fwhm_px)
    sat = [c for c in comps if c["kind"] == "sat"]
    cx0 = int(round(float(np.mean([c["x"] for c in sat]))))
    cy0 = int(round(float(np.mean([c["y"] for c in sat]))))
    h = 0
    for c in sat:
        c["r_out"] = c["r_sat"] + 4.0 * fwhm
        h = max(h, abs(c["x"] - cx0) + c["r_out"], abs(c["y"] - cy0) + c["r_out"])
    h = int(math.ceil(h)) + 2
    k = np.arange(-h, h + 1)
    px = cx0 + k[None, :] + 0 * k[:, None]
    py = cy0 + k[:, None] + 0 * k[None, :]
    inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    pxc, pyc = np.clip(px, 0, nx - 1), np.clip(py, 0, ny - 1)
    d = data[pyc, pxc].astype(np.float64)
    v0 = rms_arr[pyc, pxc].astype(np.float64) ** 2
    use = inside & np.isfinite(d) & (d < 0.5 * saturation_adu) & ~bad[pyc, pxc]
    du, bk, out = 0.0, 0.0, None
    m = len(comps)
    for _ in range(n_iter):
        region = np.zeros(use.shape, bool)
        core = np.zeros(use.shape, bool)
        for c in sat:
            r2 = (px - c["x"]) ** 2 + (py - c["y"]) ** 2
            region |= r2 <= c["r_out"] ** 2
            core |= r2 < (c["r_sat"] + 1.0) ** 2
        sel = use & region & ~core
        if sel.sum() < 20 + 3 * m:
            return None
        xs = np.array([c["x"] for c in comps])
        ys = np.array([c["y"] for c in comps])
        full = np.full(m, cx0), np.full(m, cy0)
        wing = _shifted_beta(psf_model, du)
        val, gx, gy = wing.stamps(xs, ys, h, ix=full[0], iy=full[1], derivatives=True)
        is_sat = np.array([c["kind"] == "sat" for c in comps])
        f_old = np.array([c["f"] for c in comps])
        cols = []
        for j in range(m):
            cols += [val[j][sel], gx[j][sel], gy[j][sel]]
        fit_du = bool(np.all(np.isfinite(f_old[is_sat])))
        if fit_du:
            v2 = _shifted_beta(psf_model, du + 0.004).stamps(
                xs[is_sat], ys[is_sat], h, ix=full[0][is_sat], iy=full[1][is_sat]
            )
            dval = np.tensordot(f_old[is_sat], (v2 - val[is_sat]) / 0.004, axes=1)
            cols.append(dval[sel])
        cols.append(np.ones(int(sel.sum())))
        a = np.column_stack(cols)
        model = np.tensordot(np.nan_to_num(np.maximum(f_old, 0.0)), val, axes=1)
        w = 1.0 / (v0[sel] + np.maximum(model[sel], 0.0) / gain)
        nmat = a.T @ (a * w[:, None])
        try:
            cov = np.linalg.inv(nmat)
        except np.linalg.LinAlgError:
            return None
        sol = cov @ (a.T @ (d[sel] * w))
        for j, c in enumerate(comps):
            f = float(sol[3 * j])
            c["f"] = f
            c["f_err"] = math.sqrt(max(cov[3 * j, 3 * j], 0.0))
            if f > 0:
                step = np.clip(sol[3 * j + 1 : 3 * j + 3] / f, -1.0, 1.0)
                c["x"], c["y"] = c["x"] + float(step[0]), c["y"] + float(step[1])
        if fit_du:
            du = float(np.clip(du + sol[3 * m], -0.15, 0.15))
        bk = float(sol[-1])
        if not all(c["f"] > 0 for c in sat):
            return None
        model = np.tensordot(np.array([max(c["f"], 0.0) for c in comps]), val, axes=1)
        var = v0 + np.maximum(model, 0.0) / gain
        out = dict(sel=sel, d=d, model=model, bk=bk, w=w, px=px, py=py, du=du, var=var)
    return out


def _chi2(fit, comps):
    """Reduced chi^2 of a `_fit_wing_group` fit."""
    sel = fit["sel"]
    resid = fit["d"][sel] - fit["model"][sel] - fit["bk"]
    return float(np.sum(resid**2 * fit["w"]) / max(sel.sum() - 3 * len(comps) - 2, 1))


def _try_split(psf_model, data, rms_arr, dil, bad, comps, fit, *, gain, saturation_adu):
    """Fit one saturated region as two saturated stars, placed along the columns (the bleed
    direction) ``0.5 / 0.75 / 1`` saturated radius either side of its centre; the best is kept
    when its chi^2 is below half the single star's (or that fit failed), both fitted centres lie
    on saturated pixels more than ``r_sat`` apart. Returns ``(comps, fit)`` or None."""
    c0 = next(c for c in comps if c["kind"] == "sat")
    others = [dict(c, f=np.nan) for c in comps if c["kind"] != "sat"]
    base = _chi2(fit, comps) if fit is not None else np.inf
    best = None
    ny, nx = data.shape
    for frac in (0.5, 0.75, 1.0):
        dy = frac * c0["r_sat"]
        trial = [
            dict(c0, y=c0["y"] - dy, f=np.nan, split=True),
            dict(c0, y=c0["y"] + dy, f=np.nan, i=None),
        ] + [dict(o) for o in others]
        got = _fit_wing_group(
            psf_model, data, rms_arr, dil, trial, gain=gain, saturation_adu=saturation_adu,
            n_iter=8,
        )  # fmt: skip
        if got is None:
            continue
        a, b = trial[0], trial[1]
        on_sat = True
        for c in (a, b):
            ix, iy = int(round(c["x"])), int(round(c["y"]))
            on_sat &= (
                0 <= ix < nx
                and 0 <= iy < ny
                and bool(bad[iy, ix])
                and data[iy, ix] >= 0.5 * saturation_adu
            )
        if not on_sat or math.hypot(a["x"] - b["x"], a["y"] - b["y"]) <= c0["r_sat"]:
            continue
        chi2 = _chi2(got, trial)
        if chi2 < 0.5 * base and (best is None or chi2 < best[0]):
            best = (chi2, trial, got)
    return None if best is None else (best[1], best[2])


def _find_companion(fit, comps, fwhm, *, others=None, min_snr=15.0, min_model_frac=0.25):
    """The brightest star-like bump left on the residual of a wing fit, or None.

    A 3x3 box of the residual (fit pixels only) must stand ``min_snr`` sigma above the noise and
    exceed ``min_model_frac`` of the fitted model there (the wings' own model error, a few
    percent, is not a star); it must lie outside every saturated core, 1.5 FWHM from every
    other component and 2 FWHM from every detection of ``others`` (``(x, y)`` arrays: a star
    detected just outside the fit disc leaves the part of its light inside the disc, which is
    not a second star)."""
    from scipy.ndimage import uniform_filter

    sel, d, model, bk = fit["sel"], fit["d"], fit["model"], fit["bk"]
    var = fit["var"]
    s = sel.astype(np.float64)
    res = np.where(sel, d - model - bk, 0.0)
    box_r = uniform_filter(res, 3, mode="constant") * 9.0
    box_v = uniform_filter(np.where(sel, var, 0.0), 3, mode="constant") * 9.0
    box_m = uniform_filter(np.where(sel, model, 0.0), 3, mode="constant") * 9.0
    box_n = uniform_filter(s, 3, mode="constant") * 9.0
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.where(box_n >= 6.5, box_r / np.sqrt(np.maximum(box_v, 1e-30)), 0.0)
    snr[box_r < min_model_frac * box_m] = 0.0
    px, py = fit["px"], fit["py"]
    for c in comps:
        r_min = c["r_sat"] + 1.5 if c["kind"] == "sat" else 1.5 * fwhm
        snr[(px - c["x"]) ** 2 + (py - c["y"]) ** 2 < r_min**2] = 0.0
    if others is not None:
        ox, oy = others
        box = (ox > px.min() - 2 * fwhm) & (ox < px.max() + 2 * fwhm)
        box &= (oy > py.min() - 2 * fwhm) & (oy < py.max() + 2 * fwhm)
        for x0, y0 in zip(ox[box], oy[box]):
            snr[(px - x0) ** 2 + (py - y0) ** 2 < (2.0 * fwhm) ** 2] = 0.0
    j = int(np.argmax(snr))
    if not snr.flat[j] > min_snr:
        return None
    iy, ix = np.unravel_index(j, snr.shape)
    return {"x": float(px[iy, ix]), "y": float(py[iy, ix]), "kind": "comp", "f": np.nan}


def fit_saturated_stars(
    data_sub,
    rms,
    mask,
    sources,
    psf_model,
    *,
    gain_e_per_adu,
    exptime_s,
    saturation_adu,
    neighbours=None,
    max_companions=2,
):
    """
    Fluxes of saturated stars from their unsaturated wings, the stars beside them, and the image
    of their models.

    For each source (rows of `rpp_tasks.stages.saturation.find_saturated_stars`: ``a_px`` is the
    saturated radius, ``halo_radius_px`` the halo) the local PSF model is fitted to the
    unmasked, unsaturated pixels between ``r_sat + 1`` px and ``r_sat + 4 FWHM``, two pixels away
    from any masked one (`_fit_wing_group`: flux, position, a shift of the model's ``1/beta``
    -- far wings are very sensitive to it -- and a sky offset; four Gauss-Newton steps, weights
    ``1 / (rms^2 + model / gain)``). Saturated stars whose fit discs overlap are fitted
    together, with the ``neighbours`` (other detections, rows with ``x_centroid``,
    ``y_centroid``) that lie in their discs: a star beside a saturated one would otherwise pull
    its position and flux. A star the detection could not separate from the halo (a close
    companion) is looked for on the residual (`_find_companion`, at most ``max_companions`` per
    group) and kept when its fitted flux has S/N > 10: it becomes a row of its own
    (``flag_psf`` `FLAG_PSF_SAT_COMPANION`, ``flag`` 0). The model of each saturated star and
    companion is then drawn out to where it falls below 2 % of the noise (at most 256 px), so
    that its halo can be subtracted from its neighbours.

    Returns
    -------
    table : `~astropy.table.Table`
        ``sources`` plus the PSF columns of `psf_photometry` (``flag_psf`` has `FLAG_PSF_WINGS`),
        then one row per companion found; ``halo_radius_px`` grows to where 5 % of the fitted
        model is still 3 times the noise.
    image : numpy.ndarray
        float32 model image of the saturated stars and their companions.
    """
    from scipy.ndimage import binary_dilation

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
    bad = np.zeros(data.shape, bool) if mask is None else np.asarray(mask, bool)
    sx = np.asarray(out["x_centroid"], float) if n else np.zeros(0)
    sy = np.asarray(out["y_centroid"], float) if n else np.zeros(0)
    r_sat = (
        np.maximum(np.asarray(out["a_px"], float), 1.0)
        if "a_px" in out.colnames
        else np.full(n, 2.0)
    )
    nbx = nby = np.zeros(0)
    if neighbours is not None and len(neighbours):
        nbx = np.asarray(neighbours["x_centroid"], float)
        nby = np.asarray(neighbours["y_centroid"], float)
    companions = []
    for grp in _saturated_groups(sx, sy, r_sat + 4.0 * fwhm) if n else []:
        comps = [
            {"x": sx[i], "y": sy[i], "kind": "sat", "r_sat": float(r_sat[i]), "f": np.nan, "i": i}
            for i in grp
        ]
        # other detections inside the fit discs (not inside a saturated core) are fitted too
        dmin = np.full(nbx.size, np.inf)
        near = np.zeros(nbx.size, bool)
        for c in comps:
            dd = np.hypot(nbx - c["x"], nby - c["y"])
            near |= dd < c["r_sat"] + 4.0 * fwhm + fwhm
            dmin = np.minimum(dmin, dd - c["r_sat"] - 1.5)
        for j in np.flatnonzero(near & (dmin > 0)):
            comps.append({"x": float(nbx[j]), "y": float(nby[j]), "kind": "nbr", "f": np.nan})
        # masked pixels and their neighbours (ends and sides of bleed trails)
        h_all = int(math.ceil(max(r_sat[grp]) + 4.0 * fwhm)) + 4
        x0 = max(0, int(np.min(sx[grp])) - h_all - 10)
        x1 = min(nx, int(np.max(sx[grp])) + h_all + 12)
        y0 = max(0, int(np.min(sy[grp])) - h_all - 10)
        y1 = min(ny, int(np.max(sy[grp])) + h_all + 12)
        sub_bad = binary_dilation(bad[y0:y1, x0:x1], iterations=2)
        dil = _LocalMask(sub_bad, x0, y0, data.shape)
        fit = _fit_wing_group(
            psf_model, data, rms_arr, dil, comps, gain=gain_e_per_adu,
            saturation_adu=saturation_adu,
        )  # fmt: skip
        if len(grp) == 1 and r_sat[grp[0]] >= 4.0 and (fit is None or _chi2(fit, comps) > 5.0):
            # a poor fit of a big saturated region: two saturated stars whose discs merged
            # (bleed trails as wide as the cores join them)?
            split = _try_split(
                psf_model, data, rms_arr, dil, bad, comps, fit, gain=gain_e_per_adu,
                saturation_adu=saturation_adu,
            )  # fmt: skip
            if split is not None:
                comps, fit = split
        if fit is None:
            for c in comps:
                if c["kind"] == "sat" and c.get("i") is not None:
                    flag[c["i"]] |= 1
            continue
        for _ in range(max_companions):
            new = _find_companion(fit, comps, fwhm, others=(nbx, nby))
            if new is None:
                break
            trial = [dict(c) for c in comps] + [new]
            fit2 = _fit_wing_group(
                psf_model, data, rms_arr, dil, trial, gain=gain_e_per_adu,
                saturation_adu=saturation_adu,
            )  # fmt: skip
            got = trial[-1]
            moved = math.hypot(got["x"] - new["x"], got["y"] - new["y"])
            if fit2 is None or not (got["f"] > 10.0 * got.get("f_err", np.inf)) or moved > 2.0:
                break
            comps, fit = trial, fit2
        sel, d, model, bk = fit["sel"], fit["d"], fit["model"], fit["bk"]
        resid = d[sel] - model[sel] - bk
        chi2 = _chi2(fit, comps)
        wing = _shifted_beta(psf_model, fit["du"])
        for c in comps:
            if c["kind"] == "nbr":
                continue
            x, y, f = c["x"], c["y"], c["f"]
            if c["kind"] == "sat" and c["i"] is not None:
                i = c["i"]
                cols["x_psf"][i], cols["y_psf"][i] = x, y
                if c.get("split"):  # the centre of the merged region was neither star's
                    out["x_centroid"][i], out["y_centroid"][i] = x, y
                cols["flux_psf"][i] = f
                cols["flux_err_psf"][i] = c["f_err"]
                cols["qfit_psf"][i] = float(np.sum(np.abs(resid)) / f)
                cols["chi2_psf"][i] = chi2
                npix[i] = int(sel.sum())
            # draw the star out to where it fades below 2 % of the noise
            h = int(math.ceil(c.get("r_sat", 0.0) + 4.0 * fwhm)) + 1
            hh = int(
                psf_model._footprint_halves(
                    np.array([x]), np.array([y]), np.array([f]), rms_typ, 32
                )[0]
            )
            hh = int(min(max(hh, h), 256))
            wing.render(data.shape, [x], [y], [f], half=hh, out=image)
            if c["kind"] == "sat":
                # where 5 % of the model (its accuracy near a saturated core) exceeds 3 sigma,
                # nothing found on the residual can be trusted
                r_x = float(wing.radius_below([x], [y], [f], 60.0 * rms_typ)[0])
                if chi2 > 5.0:  # a poor fit (a neighbour in the wings): its residual too
                    r_x = max(r_x, c["r_sat"] + 2.5 * fwhm)
                if c["i"] is not None:
                    r_excl[c["i"]] = r_x
                else:  # the second star of a split saturated region: a row of its own
                    companions.append(dict(c, chi2=chi2, npix=int(sel.sum()), r_excl=r_x))
            else:
                # a companion's model shares the saturated star's wing shape: its residual is
                # not searched for stars within 2 FWHM (or where 5 % of it exceeds 3 sigma)
                r_c = float(wing.radius_below([x], [y], [f], 60.0 * rms_typ)[0])
                companions.append(
                    dict(c, chi2=chi2, npix=int(sel.sum()), r_excl=max(r_c, 2.0 * fwhm))
                )
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
    if companions and n:
        out = _add_companion_rows(out, companions, fwhm, exptime_s)
    return out, image


class _LocalMask:
    """A dilated mask known on a window ``[y0:y1, x0:x1]`` of the frame (False elsewhere),
    indexable like the full-frame array with integer index arrays."""

    def __init__(self, sub, x0, y0, shape):
        self.sub, self.x0, self.y0, self.shape = sub, x0, y0, shape

    def __getitem__(self, idx):
        py, px = idx
        ly, lx = py - self.y0, px - self.x0
        hy, hx = self.sub.shape
        ok = (ly >= 0) & (ly < hy) & (lx >= 0) & (lx < hx)
        out = np.zeros(np.shape(py), bool)
        out[ok] = self.sub[ly[ok], lx[ok]]
        return out


def _add_companion_rows(out, companions, fwhm, exptime_s):
    """``out`` with one row per companion, or per second star of a split saturated region
    (copied from the first row, then overwritten)."""
    from astropy.table import vstack

    m = len(companions)
    extra = Table(out[np.zeros(m, int)], copy=True)
    f = np.array([c["f"] for c in companions])
    fe = np.array([c["f_err"] for c in companions])
    vals = {
        "x_centroid": [c["x"] for c in companions],
        "y_centroid": [c["y"] for c in companions],
        "x_psf": [c["x"] for c in companions],
        "y_psf": [c["y"] for c in companions],
        "flux": f,
        "flux_psf": f,
        "flux_err_psf": fe,
        "chi2_psf": [c["chi2"] for c in companions],
        "npix_psf": [c["npix"] for c in companions],
        "qfit_psf": np.full(m, np.nan),
        "flag": [FLAG_SATURATED if c["kind"] == "sat" else 0 for c in companions],
        "flag_psf": [
            FLAG_PSF_WINGS if c["kind"] == "sat" else FLAG_PSF_SAT_COMPANION for c in companions
        ],
        "a_px": [c.get("r_sat", fwhm / 2.3548) for c in companions],
        "b_px": [c.get("r_sat", fwhm / 2.3548) for c in companions],
        "snr_det": f / fe,
        "halo_radius_px": [c["r_excl"] for c in companions],
        "npix": np.zeros(m),
    }
    for k, v in vals.items():
        if k in extra.colnames:
            extra[k] = np.asarray(v, dtype=extra[k].dtype)
    if "peak" in extra.colnames:
        extra["peak"] = np.asarray(f / (1.1331 * fwhm**2), dtype=extra["peak"].dtype)
    mag, mag_err, snr = _mags(extra["flux_psf"], extra["flux_err_psf"], exptime_s)
    extra["mag_psf"], extra["mag_err_psf"], extra["snr_psf"] = mag, mag_err, snr
    return vstack([out, extra], metadata_conflicts="silent")


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
    sky_sigma_adu=None,
    frame="",
):
    """
    Photometry of one frame: PSF model, PSF and aperture photometry, corrections, honest errors.

    1. `rpp_tasks.stages.field_psf_fit.fit_field_psf`: a PSF varying across the field
       (elliptical Moffat with polynomial shape; the order follows the number and spread of the
       PSF stars);
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
    sky_sigma_adu : float, optional
        Uncertainty of the sky map at a star (ADU,
        `rpp_tasks.stages.background.BackgroundResult.map_sigma_adu`). Given, every measurement
        stands on the same sky, the map: the PSF stars' local sky offsets in the field-PSF fit get
        a Gaussian prior of this width (free, they trade off against the wings: beta), and the
        large-aperture flux references of `calibrate_to_large_aperture` are measured against
        the map (the local annulus on the residual image holds the star's own residual wings --
        the model error being calibrated) with the map's error in their weights. None: free
        offsets and annulus references.
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
    sky_sigma = (
        float(sky_sigma_adu)
        if sky_sigma_adu is not None and math.isfinite(sky_sigma_adu) and sky_sigma_adu > 0
        else None
    )
    model = fit_field_psf(
        data,
        sources,
        rms=rms,
        mask=mask,
        gain_e_per_adu=gain_e_per_adu,
        saturation_adu=sat_sub,
        max_order=psf_max_order,
        max_stars=psf_max_stars,
        bkg_sigma_adu=sky_sigma,
    )
    if model is None:
        log.warning("measure_frame %s: no PSF star; no photometry", frame)
        return FramePhotometry(Table(sources, copy=True), None, float("nan"), {"psf_model": None})
    fwhm = float(model.fwhm_px)
    info["psf_model"] = model.to_dict()
    sources_fit = sources
    from rpp_tasks.stages.saturation import saturation_exclusion_mask
    from rpp_tasks.stages.sources import FLAG_SATURATED

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
            neighbours=sources[~is_sat],
        )
        # their halos are subtracted from the image everything else is measured on
        data = np.subtract(data, sat_image, out=data if overwrite else None, dtype=np.float32)
        overwrite = True  # from here on ``data`` is ours either way
        del sat_image
        # the halos of the saturated stars and the residual around the stars found beside them
        # (both ``halo_radius_px``)
        zone = saturation_exclusion_mask(
            data.shape,
            sat_tab,
            rows=((np.asarray(sat_tab["flag"]) & FLAG_SATURATED) != 0)
            | ((np.asarray(sat_tab["flag_psf"]) & FLAG_PSF_SAT_COMPANION) != 0),
        )
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
        _adopt_psf_positions(sources_fit, shape, fwhm)
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
            sky_sigma_adu=sky_sigma,
        )
        mism = measure_model_mismatch(
            cat,
            resid,
            rms,
            model,
            gain_e_per_adu=gain_e_per_adu,
            mask=mask,
            sky_sigma_adu=sky_sigma,
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
    from rpp_tasks.stages.saturation import _saturated_pixels

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


def _adopt_psf_positions(table, shape=None, fwhm_px=None, *, max_shift_px=3.0):
    """``x_centroid, y_centroid`` become the PSF-fit positions where the fit refined them (a
    detection centroid is pulled by neighbours); the detection centroids stay in ``x_det,
    y_det``. In place.

    A fit that moved the star by ``max_shift_px`` or more keeps the detection centroid, except
    for a star whose fitted centre lies within ``fwhm_px`` of the frame's edge (``shape``
    given): the detection saw only the part of it inside the frame, so its centroid is pulled
    inwards by up to about one FWHM, and the fit may move it by up to ``1.5 fwhm_px``.
    """
    if "x_psf" not in table.colnames or len(table) == 0:
        return
    xc, yc = _xy(table, "measure_frame")
    xp = np.asarray(table["x_psf"], float)
    yp = np.asarray(table["y_psf"], float)
    limit = np.full(xp.size, float(max_shift_px))
    if shape is not None and fwhm_px is not None and np.isfinite(fwhm_px) and fwhm_px > 0:
        ny, nx = shape
        with np.errstate(invalid="ignore"):
            edge = np.minimum.reduce([xp + 0.5, yp + 0.5, nx - 0.5 - xp, ny - 0.5 - yp])
            limit[edge < fwhm_px] = max(float(max_shift_px), 1.5 * float(fwhm_px))
    ok = np.isfinite(xp) & np.isfinite(yp) & (np.hypot(xp - xc, yp - yc) < limit)
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
