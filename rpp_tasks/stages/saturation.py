"""Saturated stars: where they are, their halos and bleed trails, and the stars lying across a
trail.

find_saturated_stars groups saturated pixels into stars (centre, peak, extent of the bleed
trail); saturation_exclusion_mask covers their halos and trails so that detection does not
scatter spurious sources around them; a detection on a trail is kept only when it is a star-like
bump on both sides of the trail (_stars_on_trails).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from astropy.table import Table

from rpp_tasks.stages.sources import FLAG_SATURATED, SOURCE_COLUMNS

__all__ = ["find_saturated_stars", "saturation_exclusion_mask"]

log = logging.getLogger(__name__)


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
            ends = _trail_ends(data, sat, saturation_adu, rms=rms_typ)
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


def _trail_ends(data, sat, saturation_adu, reach=2, *, rms=None, min_snr=10.0):
    """Unsaturated pixels within ``reach`` px above or below a saturated one in the same column
    and brighter than 5 % of saturation, or than ``min_snr`` times the typical noise ``rms``
    when that is lower: the partly filled ends of bleed trails (the charge left at a trail's
    end is anything between zero and the full well; a 2600 ADU remainder below a 60000 ADU
    trail was detected as a star of its own)."""
    level = 0.05 * saturation_adu
    if rms is not None:
        rms_typ = float(np.median(np.asarray(rms)[::16, ::16])) if np.ndim(rms) else float(rms)
        if np.isfinite(rms_typ) and rms_typ > 0:
            level = min(level, min_snr * rms_typ)
    ny = sat.shape[0]
    ends = np.zeros(sat.shape, bool)
    py, px = np.nonzero(sat)
    for o in range(1, reach + 1):
        for yy in (py + o, py - o):
            ok = (yy >= 0) & (yy < ny)
            yy, xx = yy[ok], px[ok]
            hit = ~sat[yy, xx] & (np.asarray(data)[yy, xx] > level)
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
    # every bad pixel once, row by row (the order of np.nonzero), with the run of consecutive
    # bad pixels it belongs to: all runs at once (the ends of a run are good pixels, never
    # written, so the runs do not depend on each other)
    ys, xs = np.nonzero(is_bad)
    new_run = np.r_[True, (np.diff(xs) != 1) | (np.diff(ys) != 0)]
    run = np.cumsum(new_run) - 1
    starts = xs[new_run]
    stops = np.r_[xs[np.flatnonzero(new_run)[1:] - 1], xs[-1]]
    left, right = (starts - 1)[run], (stops + 1)[run]
    fill = ((stops - starts + 1) > max_gap)[run] | (left < 0) | (right >= nx)
    work[ys[fill], xs[fill]] = 0.0
    ok = ~fill
    ys, xs, left, right = ys[ok], xs[ok], left[ok], right[ok]
    vl, vr = work[ys, left], work[ys, right]
    t = (xs - left) / (right - left)
    work[ys, xs] = vl + t * (vr - vl)


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


def saturation_exclusion_mask(
    shape, sources, data_sub=None, mask=None, *, saturation_adu=None, rows=None
):
    """The zone spoiled by the saturated stars of a source table (see `find_saturated_stars`):
    halo discs of the rows flagged `FLAG_SATURATED` (radius ``halo_radius_px``) and, with
    ``data_sub``, ``mask`` and ``saturation_adu``, the widened bleed trails. ``rows`` (bool per
    row) chooses the rows whose discs are drawn instead of the flag."""
    ny, nx = int(shape[0]), int(shape[1])
    zone = np.zeros((ny, nx), bool)
    if data_sub is not None and mask is not None and saturation_adu is not None:
        py, px = np.nonzero(_saturated_pixels(data_sub, mask, saturation_adu))
        if px.size:
            _trail_band(zone, px, py, float(sources.meta.get("fwhm_px", 3.0) or 3.0))
    if sources is None or len(sources) == 0:
        return zone
    if rows is not None:
        satrow = np.asarray(rows, bool)
    elif "flag" in sources.colnames:
        satrow = (np.asarray(sources["flag"]) & FLAG_SATURATED) != 0
    else:
        return zone
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
