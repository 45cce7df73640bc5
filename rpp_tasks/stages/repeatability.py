"""Repeatability across the frames of a session: a photometric figure that needs no truth.

Per star, the scatter of its magnitude over the frames of one field against its reported errors
(`repeatability`); the frames are aligned by the offsets of their brightest stars and their
zero-point differences removed. Moved out of `rpp_tasks.stages.photometry` (which still gives
the same names).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from rpp_tasks.stages.phot_common import _MAG_K, _fit_xy, _xy

__all__ = ["repeatability", "Repeatability", "REPEATABILITY_SNR_BINS"]

log = logging.getLogger(__name__)

#: S/N bins of `repeatability` (median S/N of a star over the frames)
REPEATABILITY_SNR_BINS = (10.0, 20.0, 50.0, 200.0, 500.0, math.inf)


@dataclass(frozen=True)
class Repeatability:
    """Scatter of each star's magnitude across the frames of a session against its errors.

    Attributes
    ----------
    kind : str
        ``"psf"`` or an aperture label (``"1p3fwhm"``...).
    n_frames, n_stars : int
        Frames compared and stars seen in at least two of them.
    ratio : float
        Robust standard deviation of the normalised deviations of all stars with S/N > 10
        (1.0: the reported errors describe the real frame-to-frame scatter; > 1: too small).
    bins : tuple of dict
        Per S/N bin: ``snr_lo``, ``snr_hi``, ``n_stars``, ``ratio``, ``scatter_mag`` (robust std
        of the deviations in magnitudes), ``reported_mag`` (rms of the reported errors).
    frame_offsets_mag : tuple of float
        Magnitude offset of each frame against the first (transparency, airmass), subtracted.
    flags : tuple of str
    """

    kind: str
    n_frames: int
    n_stars: int
    ratio: float
    bins: tuple = ()
    frame_offsets_mag: tuple = ()
    flags: tuple = ()

    def to_dict(self) -> dict:
        def clean(v):
            if isinstance(v, float):
                return v if math.isfinite(v) else None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        return clean(
            {
                "kind": self.kind,
                "n_frames": self.n_frames,
                "n_stars": self.n_stars,
                "ratio": self.ratio,
                "bins": list(self.bins),
                "frame_offsets_mag": list(self.frame_offsets_mag),
                "flags": list(self.flags),
                "definition": "per star seen in >= 2 frames, after removing each frame's "
                "magnitude offset: (m_k - weighted mean) / sqrt(err_k^2 - err_mean^2); "
                "ratio = robust std of these deviations (1 = honest errors)",
            }
        )


def _robust_std(v):
    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    if v.size < 3:
        return float("nan")
    med = np.median(v)
    s = 1.4826 * np.median(np.abs(v - med))
    if s == 0:
        return float(np.std(v))
    for _ in range(10):
        keep = np.abs(v - med) <= 4.0 * s
        if keep.sum() < 3:
            break
        med = np.median(v[keep])
        s_new = np.std(v[keep], ddof=1) / 0.998929
        if math.isclose(s_new, s, rel_tol=1e-9):
            break
        s = s_new
    return float(s)


def _pixel_scale_arcsec(xy, sky_arcsec):
    """Pixel scale ("/px) a catalogue's own positions imply: the affine map from its pixel to its
    projected sky positions (1" when fewer than 3 stars or a degenerate map)."""
    ok = np.isfinite(xy).all(axis=1) & np.isfinite(sky_arcsec).all(axis=1)
    if ok.sum() < 3:
        return 1.0
    a = np.column_stack([xy[ok], np.ones(ok.sum())])
    coef, *_ = np.linalg.lstsq(a, sky_arcsec[ok], rcond=None)
    scale = math.sqrt(abs(float(np.linalg.det(coef[:2, :2]))))
    return scale if math.isfinite(scale) and scale > 0 else 1.0


def _align_offset(ref_xy, xy, *, max_shift_px, n_bright=150):
    """Shift ``d`` with ``xy + d ~ ref_xy`` from the brightest stars (histogram of pair offsets,
    refined by the median of the matched pairs)."""
    a = ref_xy[:n_bright]
    b = xy[:n_bright]
    if a.shape[0] < 3 or b.shape[0] < 3:
        return np.zeros(2)
    pairs = cKDTree(b).query_ball_point(a, max_shift_px)
    dx = np.concatenate([a[i, 0] - b[js, 0] for i, js in enumerate(pairs) if js] or [[]])
    dy = np.concatenate([a[i, 1] - b[js, 1] for i, js in enumerate(pairs) if js] or [[]])
    if dx.size < 3:
        return np.zeros(2)
    nbin = max(8, int(2 * max_shift_px))
    h, ex, ey = np.histogram2d(
        dx, dy, bins=nbin, range=[[-max_shift_px, max_shift_px], [-max_shift_px, max_shift_px]]
    )
    i, j = np.unravel_index(np.argmax(h), h.shape)
    d0 = np.array([0.5 * (ex[i] + ex[i + 1]), 0.5 * (ey[j] + ey[j + 1])])
    near = np.hypot(dx - d0[0], dy - d0[1]) < 2.0 * (ex[1] - ex[0])
    return np.array([np.median(dx[near]), np.median(dy[near])]) if near.any() else d0


def repeatability(
    catalogs,
    *,
    kind="psf",
    match_radius_px=1.5,
    max_shift_px=50.0,
    snr_bins=REPEATABILITY_SNR_BINS,
    min_snr=10.0,
):
    """
    How well each star's reported magnitude error describes its scatter across frames.

    For a session with several frames of one field, no truth is needed: the same star measured
    ``n`` times should scatter around its mean as its reported errors say. The frames are
    matched on sky coordinates when every catalogue has them (``ra``, ``dec``), else on pixel
    positions after an offset found from the brightest stars (dithers up to ``max_shift_px``).
    Each frame's magnitude offset against the first (clouds, airmass; median over stars with
    S/N > 50) is removed; then for each star seen in at least two frames the deviations from
    its weighted mean, ``(m_k - m) / sqrt(err_k^2 - err_m^2)``, are standard normal if the
    errors are right. Pooled per S/N bin (the star's median S/N), their robust standard
    deviation is the figure: 1 means honest errors, 2 errors twice too small.

    Parameters
    ----------
    catalogs : sequence of `~astropy.table.Table`
        Frame catalogues (``mag_<kind>``, ``mag_err_<kind>``, positions; ``quality``,
        ``saturated``, ``blended`` are honoured when present).
    kind : str
        ``"psf"`` or an aperture label.
    match_radius_px : float
        Matching radius (px; on the sky: this many times the pixel scale the first catalogue's
        pixel and sky positions imply, 1" per px when they cannot tell -- a fixed 1.5" was 0.31 px
        for the 4.78"/px of a binned Seestar frame and lost a third of the stars).

    Returns
    -------
    result : `Repeatability`
        NaN figures and a flag when fewer than two frames or no common star.
    """
    cats = [c for c in catalogs if c is not None and len(c)]
    mcol, ecol = f"mag_{kind}", f"mag_err_{kind}"
    flags = []
    empty = Repeatability(kind, len(cats), 0, float("nan"), (), (), ("too_few_frames",))
    if len(cats) < 2:
        return empty
    if any(mcol not in c.colnames or ecol not in c.colnames for c in cats):
        return Repeatability(kind, len(cats), 0, float("nan"), (), (), ("no_magnitudes",))

    def prepare(c):
        m = np.asarray(c[mcol], float)
        e = np.asarray(c[ecol], float)
        ok = np.isfinite(m) & np.isfinite(e) & (e > 0)
        for name in ("saturated", "blended", "near_edge"):
            if name in c.colnames:
                ok &= ~np.asarray(c[name], bool)
        xs, ys = _fit_xy(c) if "x_psf" in c.colnames else _xy(c, "repeatability")
        ra = np.asarray(c["ra"], float) if "ra" in c.colnames else np.full(len(c), np.nan)
        dec = np.asarray(c["dec"], float) if "dec" in c.colnames else np.full(len(c), np.nan)
        order = np.argsort(np.where(ok, m, np.inf))  # brightest first
        order = order[ok[order]]
        return {
            "m": m[order],
            "e": e[order],
            "xy": np.column_stack([xs, ys])[order],
            "rd": np.column_stack([ra, dec])[order],
        }

    frames = [prepare(c) for c in cats]
    use_sky = all(np.isfinite(f["rd"]).all() and len(f["rd"]) for f in frames)
    ref = frames[0]
    n0 = len(ref["m"])
    if use_sky:
        dec0 = np.deg2rad(np.nanmedian(ref["rd"][:, 1]))

        def proj(rd):
            return np.column_stack([rd[:, 0] * math.cos(dec0), rd[:, 1]]) * 3600.0

        ref_pts = proj(ref["rd"])
        radius = float(match_radius_px) * _pixel_scale_arcsec(ref["xy"], ref_pts)
        flags.append("matched_on_sky")
    else:
        ref_pts = ref["xy"]
        radius = float(match_radius_px)
        flags.append("matched_on_pixels")
    tree = cKDTree(ref_pts)
    mags = np.full((len(frames), n0), np.nan)
    errs = np.full((len(frames), n0), np.nan)
    mags[0], errs[0] = ref["m"], ref["e"]
    for k, f in enumerate(frames[1:], start=1):
        if use_sky:
            pts = proj(f["rd"])
        else:
            pts = f["xy"] + _align_offset(ref_pts, f["xy"], max_shift_px=max_shift_px)
        d, j = tree.query(pts, distance_upper_bound=radius)
        hit = np.isfinite(d)
        # one-to-one: the closest claim wins
        order = np.argsort(d[hit])
        src = np.flatnonzero(hit)[order]
        seen = np.zeros(n0, bool)
        for i in src:
            if not seen[j[i]]:
                seen[j[i]] = True
                mags[k, j[i]] = f["m"][i]
                errs[k, j[i]] = f["e"][i]
    # frame offsets from the well-measured common stars
    offsets = [0.0]
    for k in range(1, len(frames)):
        both = np.isfinite(mags[k]) & np.isfinite(mags[0]) & (errs[0] < 0.0217) & (errs[k] < 0.0217)
        if both.sum() < 3:
            both = np.isfinite(mags[k]) & np.isfinite(mags[0])
        off = float(np.median(mags[k, both] - mags[0, both])) if both.any() else 0.0
        offsets.append(off)
        mags[k] -= off
    n_obs = np.sum(np.isfinite(mags), axis=0)
    multi = n_obs >= 2
    if not multi.any():
        return Repeatability(
            kind, len(frames), 0, float("nan"), (), tuple(offsets), ("no_common_stars",)
        )
    w = np.where(np.isfinite(errs), 1.0 / np.where(np.isfinite(errs), errs, 1.0) ** 2, 0.0)
    mm = np.nansum(np.nan_to_num(mags) * w, axis=0) / np.maximum(w.sum(axis=0), 1e-300)
    var_mean = 1.0 / np.maximum(w.sum(axis=0), 1e-300)
    with np.errstate(invalid="ignore"):
        z = (mags - mm) / np.sqrt(np.maximum(errs**2 - var_mean, 1e-12))
    snr = _MAG_K / np.nanmedian(np.where(np.isfinite(errs), errs, np.nan), axis=0)
    sel_all = multi & (snr > min_snr)
    bins = []
    edges = np.asarray(snr_bins, float)
    for lo, hi in zip(edges[:-1], edges[1:]):
        b = multi & (snr > lo) & (snr <= hi)
        zz = z[:, b][np.isfinite(z[:, b])]
        dev = (mags - mm)[:, b]
        dev = dev[np.isfinite(dev)]
        bins.append(
            {
                "snr_lo": float(lo),
                "snr_hi": float(hi),
                "n_stars": int(b.sum()),
                "ratio": _robust_std(zz),
                "scatter_mag": _robust_std(dev)
                * math.sqrt(np.nanmean(n_obs[b] / np.maximum(n_obs[b] - 1, 1)))
                if b.any()
                else float("nan"),
                "reported_mag": float(np.sqrt(np.nanmean(errs[:, b] ** 2)))
                if b.any()
                else float("nan"),
            }
        )
    zz = z[:, sel_all]
    ratio = _robust_std(zz[np.isfinite(zz)])
    log.info(
        "repeatability (%s): %d frames, %d stars in >= 2 frames, ratio %.2f",
        kind,
        len(frames),
        int(multi.sum()),
        ratio,
    )
    return Repeatability(
        kind, len(frames), int(multi.sum()), ratio, tuple(bins), tuple(offsets), tuple(flags)
    )
