"""Sky subtraction along the tilted slit image and optimal (Horne 1986) extraction.

Sky (`model_sky`)
    Pixels on both sides of the trace (``sky_offset_px`` to ``sky_offset_px + sky_width_px``
    from it) are placed on the wavelength coordinate of the reference row, ``u = x - D(x, y)``,
    with the slit tilt and curvature measured on the lamp (`~rpp_tasks.spectra.trace`). The sky
    spectrum is the sigma-clipped mean in bins of ``bin_px`` of ``u`` (the many rows sample each
    line at many sub-pixel phases, as in Kelson 2003), interpolated at every aperture pixel's
    ``u``. A sky line therefore subtracts cleanly even though it is tilted or bowed on the chip;
    without the lamp's curvature it falls back to a per-column sky. The sky model's own variance
    is kept and added to the extracted spectrum's error.

Extraction (`extract_spectrum`)
    Horne (1986, PASP 98, 609): the spatial profile is measured empirically in the trace-relative
    coordinate ``y - trace(x)`` (oversampled by the trace's sub-pixel drift, in chunks along the
    dispersion so it may change with wavelength), normalised per column; each column's flux is
    ``sum(P D / V) / sum(P^2 / V)`` with a *model* variance ``V = V_read + (f P + sky) / (g
    flat)`` re-evaluated from the current flux (no bias from using the noisy data as its own
    weight), iterated with the rejection of the worst pixel per column above ``clip_sigma``
    (cosmic rays left by the cleaning). The variance of the flux is ``sum(P) / sum(P^2 / V)``
    plus the sky-model term. Where the profile cannot be measured (too faint) the boxcar sum of
    specreduce's ``BoxcarExtract`` is used, with its propagated variance.

specreduce's ``HorneExtract`` was not used: it aligns columns on whole pixels (the profile is
blurred by up to +-0.5 px of trace drift), weights by the given (data-based) variance without
iterating, and has no outlier rejection.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SkyModel", "Extraction1D", "model_sky", "extract_spectrum", "aperture_rows"]

log = logging.getLogger(__name__)
_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


def aperture_rows(trace_y, half_px, ny):
    """Row range ``[y0, y1)`` of a band that holds the trace +- ``half_px`` everywhere."""
    y0 = max(0, int(math.floor(np.nanmin(trace_y) - half_px)))
    y1 = min(ny, int(math.ceil(np.nanmax(trace_y) + half_px)) + 1)
    return y0, y1


@dataclass(frozen=True)
class SkyModel:
    """Sky for the rows ``[y0, y1)`` (same units as the frame).

    Attributes
    ----------
    sky : numpy.ndarray
        Sky at every pixel of the band.
    variance : numpy.ndarray
        Variance of the sky model at every pixel of the band.
    y0, y1 : int
    n_sky_px : int
        Sky pixels used (after clipping).
    method : str
        ``"tilted"`` (curvature used) or ``"per_column"``.
    flags : tuple of str
    """

    sky: np.ndarray = field(repr=False)
    variance: np.ndarray = field(repr=False)
    y0: int
    y1: int
    n_sky_px: int
    method: str
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-safe summary."""
        return {
            "rows": [self.y0, self.y1],
            "n_sky_px": self.n_sky_px,
            "method": self.method,
            "median_sky": float(np.nanmedian(self.sky)),
            "flags": list(self.flags),
        }


def _binned_clipped_mean(u, v, edges, clip_sigma=3.0, n_iter=2):
    """Clipped mean/variance-of-mean of ``v`` in bins of ``u`` (and the mean ``u`` per bin)."""
    idx = np.digitize(u, edges) - 1
    nb = edges.size - 1
    ok = (idx >= 0) & (idx < nb) & np.isfinite(v)
    keep = ok.copy()
    for it in range(n_iter + 1):
        w = keep.astype(float)
        n = np.bincount(idx[ok], weights=w[ok], minlength=nb)
        s = np.bincount(idx[ok], weights=(v * w)[ok], minlength=nb)
        s2 = np.bincount(idx[ok], weights=(v * v * w)[ok], minlength=nb)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = s / n
            var = np.clip(s2 / n - mean**2, 0, None) * n / np.clip(n - 1, 1, None)
        if it == n_iter:
            break
        sd = np.sqrt(var)[idx.clip(0, nb - 1)]
        new = ok & (np.abs(v - mean[idx.clip(0, nb - 1)]) <= clip_sigma * sd + 1e-12)
        if np.array_equal(new, keep):
            break
        keep = new
    w = keep.astype(float)
    su = np.bincount(idx[ok], weights=(u * w)[ok], minlength=nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        umean = su / n
        var_mean = var / n
    return umean, mean, var_mean, n, int(keep.sum())


def model_sky(
    data,
    *,
    trace_y,
    aperture_half_px,
    sky_offset_px,
    sky_width_px,
    mask=None,
    offset=None,
    bin_px=0.5,
    clip_sigma=3.0,
    rows=None,
):
    """
    Sky model under the spectrum from both sides of the trace.

    Parameters
    ----------
    data : 2-D array
        Calibrated frame, dispersion along x.
    trace_y : 1-D array
        Trace row per column.
    aperture_half_px : float
        Half height of the extraction band (the sky is evaluated there).
    sky_offset_px, sky_width_px : float
        Sky windows: from ``sky_offset_px`` to ``sky_offset_px + sky_width_px`` on each side.
    mask : 2-D bool array, optional
    offset : callable, optional
        ``offset(x, y)`` -> shift ``D`` (px) from `~rpp_tasks.spectra.trace.CurvatureResult`;
        None: per-column sky.
    bin_px : float, optional
        Bin width along the reference-row coordinate.
    clip_sigma : float, optional
    rows : (int, int), optional
        Illuminated rows (sky pixels outside are not used).

    Returns
    -------
    sky : `SkyModel`

    Raises
    ------
    ValueError
        No sky pixel inside the frame.
    """
    img = np.asarray(data, dtype=np.float32)
    ny, nx = img.shape
    trace_y = np.asarray(trace_y, dtype=float)
    r0, r1 = (0, ny) if rows is None else rows
    y0, y1 = aperture_rows(trace_y, aperture_half_px, ny)
    lo = max(r0, int(math.floor(np.nanmin(trace_y) - sky_offset_px - sky_width_px)))
    hi = min(r1, int(math.ceil(np.nanmax(trace_y) + sky_offset_px + sky_width_px)) + 1)
    yy = np.arange(lo, hi, dtype=float)[:, None]
    xx = np.arange(nx, dtype=float)[None, :]
    dist = np.abs(yy - trace_y[None, :])
    in_sky = (dist >= sky_offset_px) & (dist <= sky_offset_px + sky_width_px)
    block = img[lo:hi]
    if mask is not None:
        in_sky &= ~np.asarray(mask, bool)[lo:hi]
    in_sky &= np.isfinite(block)
    if not in_sky.any():
        msg = "no sky pixel on either side of the trace (frame too small for the sky windows)"
        raise ValueError(msg)
    flags = []
    sides = [(yy < trace_y[None, :]) & in_sky, (yy > trace_y[None, :]) & in_sky]
    if min(s.sum() for s in sides) < 0.2 * in_sky.sum():
        flags.append("one_sided_sky")
    method = "tilted" if offset is not None else "per_column"
    if offset is not None:
        u_all = xx - offset(xx, yy)
        u_sky = u_all[in_sky]
        ys = np.arange(y0, y1, dtype=float)[:, None]
        u_ap = xx - offset(xx, ys)
        edges = np.arange(math.floor(u_all.min()) - 1, math.ceil(u_all.max()) + 2, bin_px)
    else:
        u_sky = np.broadcast_to(xx, block.shape)[in_sky]
        u_ap = np.broadcast_to(xx, (y1 - y0, nx))
        edges = np.arange(-0.5, nx + 0.5, 1.0)
    umean, mean, var_mean, n, n_used = _binned_clipped_mean(
        u_sky, block[in_sky].astype(float), edges, clip_sigma=clip_sigma
    )
    good = (n >= 3) & np.isfinite(mean)
    if good.sum() < 2:
        msg = "too few sky pixels to model the sky"
        raise ValueError(msg)
    sky = np.interp(u_ap, umean[good], mean[good]).astype(np.float32)
    svar = np.interp(u_ap, umean[good], var_mean[good]).astype(np.float32)
    return SkyModel(
        sky=sky,
        variance=svar,
        y0=y0,
        y1=y1,
        n_sky_px=n_used,
        method=method,
        flags=tuple(flags),
    )


@dataclass(frozen=True)
class Extraction1D:
    """An extracted 1-D spectrum on the detector's columns.

    Attributes
    ----------
    flux : numpy.ndarray
        Per column (same units as the frame, summed over the profile).
    variance : numpy.ndarray
    sky : numpy.ndarray
        Sky under the aperture per column (sum over the aperture).
    method : str
        ``"optimal"`` or ``"boxcar"``.
    profile_fwhm_px : float
    n_rejected_px : int
        Pixels rejected as outliers by the optimal extraction.
    aperture_half_px : float
    snr_median : float
        Median S/N of the central half of the spectrum.
    flags : tuple of str
    """

    flux: np.ndarray = field(repr=False)
    variance: np.ndarray = field(repr=False)
    sky: np.ndarray = field(repr=False)
    method: str
    profile_fwhm_px: float
    n_rejected_px: int
    aperture_half_px: float
    snr_median: float
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-safe summary."""
        return {
            "method": self.method,
            "profile_fwhm_px": self.profile_fwhm_px,
            "n_rejected_px": self.n_rejected_px,
            "aperture_half_px": self.aperture_half_px,
            "snr_median": self.snr_median,
            "flags": list(self.flags),
        }


def _snr_median(flux, var):
    n = flux.size
    with np.errstate(invalid="ignore", divide="ignore"):
        s = flux[n // 4 : 3 * n // 4] / np.sqrt(var[n // 4 : 3 * n // 4])
    s = s[np.isfinite(s)]
    return float(np.median(s)) if s.size else float("nan")


def _empirical_profile(d, v_rel, inap, fbox, *, n_chunks, step=0.2, half):
    """Profile P(v) per chunk of columns from normalised data, oversampled in v = y - trace."""
    ny, nx = d.shape
    edges = np.arange(-half - 1.0, half + 1.0 + step, step)
    centres = 0.5 * (edges[:-1] + edges[1:])
    ch_edges = np.linspace(0, nx, n_chunks + 1).astype(int)
    profs, xcs = [], []
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = d / fbox[None, :]
    for k in range(n_chunks):
        a, b = ch_edges[k], ch_edges[k + 1]
        sel = inap[:, a:b] & np.isfinite(norm[:, a:b]) & (fbox[None, a:b] > 0)
        if sel.sum() < 20:
            continue
        vv = v_rel[:, a:b][sel]
        nn = norm[:, a:b][sel]
        idx = np.digitize(vv, edges) - 1
        okb = (idx >= 0) & (idx < centres.size)
        # median per bin (robust to cosmic rays and absorption lines)
        order = np.lexsort((nn[okb], idx[okb]))
        ii, vals = idx[okb][order], nn[okb][order]
        starts = np.searchsorted(ii, np.arange(centres.size))
        stops = np.searchsorted(ii, np.arange(centres.size), side="right")
        med = np.array(
            [np.median(vals[s:e]) if e - s >= 3 else np.nan for s, e in zip(starts, stops)]
        )
        good = np.isfinite(med)
        if good.sum() < 5:
            continue
        med = np.interp(centres, centres[good], med[good])
        med = np.convolve(med, np.ones(3) / 3.0, mode="same")
        profs.append(np.clip(med, 0, None))
        xcs.append(0.5 * (a + b - 1))
    return centres, np.array(profs), np.array(xcs)


def extract_spectrum(
    data,
    *,
    trace_y,
    aperture_half_px,
    sky,
    var_read,
    flat,
    gain_e_per_adu,
    mask=None,
    method="optimal",
    clip_sigma=5.0,
    n_iter=4,
    n_chunks=8,
    min_profile_snr=3.0,
    profile_error=0.05,
):
    """
    Extract the spectrum along the trace: Horne optimal extraction, boxcar as a fallback.

    Parameters
    ----------
    data : 2-D array
        Calibrated frame (dispersion along x).
    trace_y : 1-D array
        Trace row per column.
    aperture_half_px : float
        Half height of the extraction aperture (the 2SPOT ``bin_size`` / 2).
    sky : `SkyModel`
        From `model_sky` (its band must contain the aperture).
    var_read : 2-D array or float
        Variance that does not depend on the signal, in calibrated units (read noise and dark
        current over flat^2), full frame.
    flat : 2-D array or float
        The flat the frame was divided by (for the Poisson term ``(f P + sky) / (g flat)``).
    gain_e_per_adu : float
    mask : 2-D bool array, optional
    method : {"optimal", "boxcar"}
    clip_sigma : float, optional
        Outlier rejection threshold of the optimal extraction.
    n_iter : int, optional
    n_chunks : int, optional
        Chunks along the dispersion in which the spatial profile is measured.
    profile_error : float, optional
        Relative uncertainty of the profile model added to the variance in the outlier test.
    min_profile_snr : float, optional
        The optimal extraction needs the boxcar S/N to reach this in enough columns to measure
        the profile; otherwise the boxcar is used (flag ``"boxcar_fallback"``).

    Returns
    -------
    spectrum : `Extraction1D`
    """
    img = np.asarray(data, dtype=np.float32)
    ny, nx = img.shape
    y0, y1 = sky.y0, sky.y1
    d = (img[y0:y1] - sky.sky).astype(float)
    vr = np.broadcast_to(np.asarray(var_read, dtype=np.float32), img.shape)[y0:y1]
    fl = np.broadcast_to(np.asarray(flat, dtype=np.float32), img.shape)[y0:y1]
    msk = np.zeros((y1 - y0, nx), bool) if mask is None else np.asarray(mask, bool)[y0:y1].copy()
    msk |= ~np.isfinite(d)
    d[msk] = 0.0
    g = float(gain_e_per_adu)
    yy = np.arange(y0, y1, dtype=float)[:, None]
    v_rel = yy - np.asarray(trace_y, dtype=float)[None, :]
    inap = np.abs(v_rel) <= aperture_half_px
    good = inap & ~msk
    skyv = sky.variance
    # boxcar (with the model variance) -- always computed, first guess and fallback
    fbox, vbox = _boxcar(
        img[y0:y1] - sky.sky, vr, fl, sky, g, inap, msk, trace_y, y0, aperture_half_px
    )
    flags = []
    if method == "boxcar":
        return _result(fbox, vbox, sky, inap, "boxcar", float("nan"), 0, aperture_half_px, flags)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr_box = fbox / np.sqrt(vbox)
    if np.count_nonzero(snr_box > min_profile_snr) < max(20, 0.1 * nx):
        flags.append("boxcar_fallback")
        log.warning(
            "optimal extraction: profile too faint (S/N > %.0f in %d columns): boxcar used",
            min_profile_snr,
            int(np.count_nonzero(snr_box > min_profile_snr)),
        )
        return _result(fbox, vbox, sky, inap, "boxcar", float("nan"), 0, aperture_half_px, flags)
    fprof = np.where(snr_box > min_profile_snr, fbox, np.nan)
    centres, profs, xcs = _empirical_profile(
        np.where(good, d, np.nan), v_rel, inap, fprof, n_chunks=n_chunks, half=aperture_half_px
    )
    if len(profs) == 0:
        flags.append("boxcar_fallback")
        return _result(fbox, vbox, sky, inap, "boxcar", float("nan"), 0, aperture_half_px, flags)
    # profile at every pixel: interpolate in v within each chunk, then linearly between chunks
    x = np.arange(nx, dtype=float)
    if len(xcs) == 1:
        p = np.interp(v_rel, centres, profs[0])
    else:
        pk = np.stack([np.interp(v_rel, centres, pr) for pr in profs])  # (k, ny, nx)
        j = np.clip(np.searchsorted(xcs, x) - 1, 0, len(xcs) - 2)
        t = np.clip((x - xcs[j]) / (xcs[j + 1] - xcs[j]), 0, 1)
        cols = np.arange(nx)
        p = pk[j, :, cols].T * (1 - t)[None, :] + pk[j + 1, :, cols].T * t[None, :]
    p = np.where(inap, np.clip(p, 0, None), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p /= p.sum(axis=0, keepdims=True)
    p[~np.isfinite(p)] = 0.0
    fwhm = _profile_fwhm(centres, profs.mean(axis=0))
    use = good.copy()
    f = np.where(np.isfinite(fbox), fbox, 0.0)
    n_rej = 0
    for it in range(n_iter + 1):
        model_pois = np.clip(f[None, :] * p + sky.sky, 0, None) / (g * fl)
        v = vr + model_pois
        w = np.where(use, p / v, 0.0)
        den = np.sum(w * p, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            f_new = np.sum(w * d, axis=0) / den
        f_new = np.where(np.isfinite(f_new), f_new, 0.0)
        if it == n_iter:
            f = f_new
            break
        # a pixel is an outlier against the noise *and* the profile's own uncertainty
        # (profile_error of the model), so that bright spectra do not lose their cores
        v_rej = v + (profile_error * f_new[None, :] * p) ** 2
        resid2 = np.where(use, (d - f_new[None, :] * p) ** 2 / v_rej, 0.0)
        worst = np.argmax(resid2, axis=0)
        cols = np.arange(nx)
        bad = resid2[worst, cols] > clip_sigma**2
        f = f_new
        if bad.any():
            use[worst[bad], cols[bad]] = False
            n_rej += int(bad.sum())
        elif it >= 1:
            model_pois = np.clip(f[None, :] * p + sky.sky, 0, None) / (g * fl)
            v = vr + model_pois
            w = np.where(use, p / v, 0.0)
            den = np.sum(w * p, axis=0)
            break
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.sum(np.where(use, p, 0.0), axis=0) / den
        wn = w / den[None, :]  # weights with sum(wn * p) = 1
        var = var + np.sum(wn, axis=0) ** 2 * np.nanmean(np.where(inap, skyv, np.nan), axis=0)
    lost = (np.sum(np.where(use, p, 0.0), axis=0) < 0.5) | ~np.isfinite(f) | ~np.isfinite(var)
    if lost.any():
        f = np.where(lost, fbox, f)
        var = np.where(lost, vbox, var)
        flags.append(f"{int(lost.sum())}_columns_boxcar")
    return _result(f, var, sky, inap, "optimal", fwhm, n_rej, aperture_half_px, flags)


def _profile_fwhm(centres, prof):
    if not np.any(prof > 0):
        return float("nan")
    half = prof.max() / 2.0
    above = centres[prof >= half]
    return float(above.max() - above.min()) if above.size else float("nan")


def _boxcar(d_sky, vr, fl, sky, g, inap, msk, trace_y, y0, half):
    """Boxcar sum with specreduce's BoxcarExtract (variance propagated), or numpy on failure."""
    v = vr + np.clip(np.asarray(d_sky, float) + sky.sky, 0, None) / (g * fl)
    v = v + sky.variance
    try:
        import astropy.units as u
        from astropy.nddata import NDData, VarianceUncertainty
        from specreduce.extract import BoxcarExtract
        from specreduce.tracing import ArrayTrace

        band = np.asarray(d_sky, dtype=float)
        nd = NDData(
            band, uncertainty=VarianceUncertainty(np.asarray(v, float)), mask=msk, unit=u.DN
        )
        tr = ArrayTrace(nd, np.asarray(trace_y, dtype=float) - y0)
        width = 2.0 * float(half)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = BoxcarExtract(nd, tr, width=width)()
        f = np.asarray(spec.flux.value, dtype=float)
        var = np.asarray(spec.uncertainty.represent_as(VarianceUncertainty).array, dtype=float)
        return f, var
    except Exception as exc:  # pragma: no cover - specreduce API change: plain numpy sum
        log.warning("specreduce BoxcarExtract failed (%s): numpy boxcar", exc)
        ok = inap & ~msk
        n_ok = ok.sum(axis=0)
        n_ap = inap.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.where(ok, d_sky, 0).sum(axis=0) * n_ap / n_ok
            var = np.where(ok, v, 0).sum(axis=0) * (n_ap / n_ok) ** 2
        return f, var


def _result(f, var, sky, inap, method, fwhm, n_rej, half, flags):
    sky_sum = np.sum(np.where(inap, sky.sky, 0.0), axis=0)
    res = Extraction1D(
        flux=np.asarray(f, dtype=float),
        variance=np.asarray(var, dtype=float),
        sky=sky_sum,
        method=method,
        profile_fwhm_px=float(fwhm),
        n_rejected_px=int(n_rej),
        aperture_half_px=float(half),
        snr_median=_snr_median(np.asarray(f, float), np.asarray(var, float)),
        flags=tuple(flags),
    )
    log.info(
        "extraction (%s): median S/N %.1f, %d outlier px rejected, profile FWHM %.2f px",
        method,
        res.snr_median,
        n_rej,
        fwhm,
    )
    return res
