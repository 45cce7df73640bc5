"""Geometry of a long-slit frame: the spectrum's trace and the slit image's tilt and curvature.

* `find_trace` -- where the star's spectrum lies on the slit, column by column: the frame is cut
  into bins along the dispersion, the median cross-dispersion profile of each bin is searched
  for the spectrum near the configured position (or the brightest), its centre is fitted with a
  Gaussian, and a polynomial (degree <= 2) is fitted to the bin centres with outlier rejection.
  A trace that is not significant in enough bins is reported as not found, with the reason.
* `measure_slit_curvature` -- the "smile": the arc lamp's lines are followed along the slit in
  bands of rows; each line's position is fitted as ``x0 + b1 dy + b2 dy^2``, and the tilt
  ``b1`` (linear in x) and the curvature ``b2`` give the shift ``D(x, y)`` between a pixel and
  the column of the same wavelength on the reference row. Sky subtraction uses it.

specreduce's ``FitTrace`` fits every bin's peak but has no rejection of outlier bins (a cosmic
ray or a faint end pulls the polynomial), hence this implementation.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.optimize import OptimizeWarning, curve_fit

__all__ = [
    "TraceResult",
    "CurvatureResult",
    "find_trace",
    "find_peaks_1d",
    "measure_slit_curvature",
    "gauss_centroid",
]

log = logging.getLogger(__name__)
_MAD = 1.482602218505602
_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _gauss(x, a, mu, sig, c):
    return a * np.exp(-0.5 * ((x - mu) / sig) ** 2) + c


def _robust_sigma(v):
    v = np.asarray(v, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    return float(_MAD * np.median(np.abs(v - np.median(v))))


def gauss_centroid(y, x0, half_width, *, sigma0=2.0):
    """
    Gaussian + constant fit to ``y`` around index ``x0``.

    Returns
    -------
    (centre, sigma, amplitude, centre_err) or None when the fit fails or leaves the window.
    """
    n = y.size
    i0, i1 = max(0, int(round(x0 - half_width))), min(n, int(round(x0 + half_width)) + 1)
    xs = np.arange(i0, i1, dtype=float)
    ys = np.asarray(y[i0:i1], dtype=float)
    ok = np.isfinite(ys)
    if ok.sum() < 5:
        return None
    xs, ys = xs[ok], ys[ok]
    c0 = float(np.min(ys))
    a0 = float(np.max(ys) - c0)
    if not a0 > 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        try:
            p, cov = curve_fit(
                _gauss,
                xs,
                ys,
                p0=(a0, float(xs[np.argmax(ys)]), sigma0, c0),
                maxfev=400,
            )
        except (RuntimeError, ValueError):
            return None
    a, mu, sig, _ = p
    sig = abs(sig)
    if not (a > 0 and i0 <= mu <= i1 - 1 and 0.3 < sig < half_width):
        return None
    err = float(np.sqrt(cov[1, 1])) if np.all(np.isfinite(cov)) else float("nan")
    return float(mu), float(sig), float(a), err


@dataclass(frozen=True)
class TraceResult:
    """Trace of a spectrum (0-based pixels, dispersion along x).

    Attributes
    ----------
    found : bool
    y_px : numpy.ndarray
        Trace centre row at every column (NaN when not found).
    coeffs : tuple of float
        Polynomial in ``(x - x_c)``, lowest order first.
    x_c : float
    fwhm_px : float
        Median spatial FWHM over the bins.
    n_bins, n_used : int
        Bins searched and bins whose centre was used in the fit.
    rms_px : float
        RMS of the bin centres about the polynomial.
    tilt_deg : float
        Angle of the trace to the x axis at the centre.
    snr : float
        Peak S/N of the spectrum in the collapsed profile.
    reason : str or None
        Why it was not found.
    """

    found: bool
    y_px: np.ndarray = field(repr=False)
    coeffs: tuple[float, ...] = ()
    x_c: float = 0.0
    fwhm_px: float = float("nan")
    n_bins: int = 0
    n_used: int = 0
    rms_px: float = float("nan")
    tilt_deg: float = float("nan")
    snr: float = float("nan")
    reason: str | None = None
    bin_x: tuple[float, ...] = ()
    bin_y: tuple[float, ...] = ()

    def at(self, x):
        """Trace row at column(s) ``x``."""
        d = np.asarray(x, dtype=float) - self.x_c
        return sum(c * d**k for k, c in enumerate(self.coeffs))

    def to_dict(self) -> dict:
        """JSON-safe summary."""
        return {
            "found": self.found,
            "coeffs": list(self.coeffs),
            "x_c": self.x_c,
            "y_centre_px": float(self.at(self.x_c)) if self.found else None,
            "fwhm_px": self.fwhm_px,
            "n_bins": self.n_bins,
            "n_used": self.n_used,
            "rms_px": self.rms_px,
            "tilt_deg": self.tilt_deg,
            "snr": self.snr,
            "reason": self.reason,
        }


def _not_found(nx, reason, *, snr=float("nan"), n_bins=0):
    log.warning("trace not found: %s", reason)
    return TraceResult(found=False, y_px=np.full(nx, np.nan), n_bins=n_bins, snr=snr, reason=reason)


def find_trace(
    data,
    *,
    mask=None,
    y_guess=None,
    search_half_width_px=40,
    n_bins=24,
    degree=2,
    min_snr=5.0,
    min_bin_fraction=0.4,
    rows=None,
):
    """
    Find and fit the trace of the brightest spectrum (or the one near ``y_guess``).

    Parameters
    ----------
    data : 2-D array
        Calibrated frame, dispersion along x.
    mask : 2-D bool array, optional
        Pixels to ignore.
    y_guess : float, optional
        Expected row of the spectrum at the centre column (2SPOT ``posy``); the search is limited
        to ``+- search_half_width_px`` around it. Default: the most significant peak.
    search_half_width_px : float, optional
    n_bins : int, optional
        Bins along the dispersion.
    degree : int, optional
        Polynomial degree (reduced when few bins are usable).
    min_snr : float, optional
        Significance a bin's peak must reach (peak / robust noise of the bin profile).
    min_bin_fraction : float, optional
        Fraction of the bins where the spectrum must be found.
    rows : (int, int), optional
        Only search these rows (the illuminated part of the slit).

    Returns
    -------
    trace : `TraceResult`
        ``found=False`` with a ``reason`` when the spectrum is not there.
    """
    img = np.array(data, dtype=np.float32)
    if img.ndim != 2:
        msg = f"data must be 2-D, got shape {img.shape}"
        raise ValueError(msg)
    ny, nx = img.shape
    if mask is not None:
        img[np.asarray(mask, bool)] = np.nan
    r0, r1 = (0, ny) if rows is None else (max(0, int(rows[0])), min(ny, int(rows[1])))
    edges = np.linspace(0, nx, n_bins + 1).astype(int)
    xc_bins = 0.5 * (edges[:-1] + edges[1:] - 1)
    profiles = np.empty((n_bins, ny), dtype=float)
    noise = np.empty(n_bins)
    for i in range(n_bins):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p = np.nanmedian(img[:, edges[i] : edges[i + 1]], axis=1)
        p[:r0] = np.nan
        p[r1:] = np.nan
        fill = np.where(np.isfinite(p), p, np.nanmedian(p))
        base = ndimage.median_filter(fill, size=61, mode="nearest")
        r = fill - base
        r[~np.isfinite(p)] = 0.0
        profiles[i] = r
        noise[i] = _robust_sigma(np.diff(r[r0:r1])) / math.sqrt(2.0)
    noise = np.where(noise > 0, noise, np.nan)
    snr_img = profiles / noise[:, None]
    total = np.nansum(snr_img, axis=0) / math.sqrt(max(1, np.isfinite(noise).sum()))
    if y_guess is not None:
        lo = max(r0, int(y_guess - search_half_width_px))
        hi = min(r1, int(y_guess + search_half_width_px) + 1)
    else:
        lo, hi = r0, r1
    if hi - lo < 5:
        return _not_found(nx, f"search window rows {lo}-{hi} is empty", n_bins=n_bins)
    smooth = ndimage.uniform_filter1d(total, 3)
    y0 = lo + int(np.nanargmax(smooth[lo:hi]))
    peak_snr = float(smooth[y0])
    if not peak_snr >= min_snr:
        return _not_found(
            nx,
            f"no spectrum: peak S/N {peak_snr:.1f} of the collapsed profile < {min_snr:g}"
            + (f" near row {y_guess:g}" if y_guess is not None else ""),
            snr=peak_snr,
            n_bins=n_bins,
        )
    # width of the collapsed profile sets the fitting window (broad or double-peaked traces)
    above = smooth >= 0.5 * peak_snr
    lo_h, hi_h = y0, y0
    while lo_h > r0 and above[lo_h - 1]:
        lo_h -= 1
    while hi_h < r1 - 1 and above[hi_h + 1]:
        hi_h += 1
    w = int(max(8, 1.5 * (hi_h - lo_h + 1)))
    # follow the spectrum from the bin nearest the centre outwards
    order = np.argsort(np.abs(np.arange(n_bins) - (n_bins - 1) / 2.0))
    centres = np.full(n_bins, np.nan)
    sigmas = np.full(n_bins, np.nan)
    expected = {int(order[0]): float(y0)}
    for i in order:
        i = int(i)
        guess = expected.get(i)
        if guess is None:
            near = [j for j in range(n_bins) if np.isfinite(centres[j])]
            if not near:
                guess = float(y0)
            else:
                j = min(near, key=lambda j: abs(j - i))
                guess = centres[j]
        prof = profiles[i]
        a, b = max(0, int(guess - w)), min(ny, int(guess + w) + 1)
        if b - a < 5:
            continue
        peak = a + int(np.argmax(prof[a:b]))
        if not prof[peak] >= min_snr * noise[i]:
            continue
        fit = gauss_centroid(prof, peak, w, sigma0=max(1.0, w / 4.0))
        if fit is None:
            # not Gaussian (flat-topped, double): flux-weighted centroid above half maximum
            c0, c1 = max(0, peak - w), min(ny, peak + w + 1)
            seg = prof[c0:c1]
            wts = np.clip(seg - 0.5 * prof[peak], 0, None)
            if not wts.sum() > 0:
                continue
            yc = c0 + float(np.sum(wts * np.arange(seg.size)) / wts.sum())
            fit = (yc, float(np.count_nonzero(wts) / _FWHM))
        if abs(fit[0] - guess) > w:
            continue
        centres[i], sigmas[i] = fit[0], fit[1]
    good = np.isfinite(centres)
    n_good = int(good.sum())
    if n_good < max(3, math.ceil(min_bin_fraction * n_bins)):
        return _not_found(
            nx,
            f"spectrum found in only {n_good} of {n_bins} bins along the dispersion "
            f"(need {max(3, math.ceil(min_bin_fraction * n_bins))})",
            snr=peak_snr,
            n_bins=n_bins,
        )
    x_c = (nx - 1) / 2.0
    use = good.copy()
    deg = min(degree, max(0, n_good - 3))
    coeffs = np.zeros(deg + 1)
    for _ in range(5):
        coeffs = np.polynomial.polynomial.polyfit(xc_bins[use] - x_c, centres[use], deg)
        resid = centres - np.polynomial.polynomial.polyval(xc_bins - x_c, coeffs)
        s = max(_robust_sigma(resid[use]), 0.05)
        new = good & (np.abs(resid) < 4 * s)
        if new.sum() < deg + 2 or np.array_equal(new, use):
            break
        use = new
    resid = centres[use] - np.polynomial.polynomial.polyval(xc_bins[use] - x_c, coeffs)
    y = np.polynomial.polynomial.polyval(np.arange(nx) - x_c, coeffs)
    slope = coeffs[1] if deg >= 1 else 0.0
    res = TraceResult(
        found=True,
        y_px=y,
        coeffs=tuple(float(c) for c in coeffs),
        x_c=x_c,
        fwhm_px=float(np.nanmedian(sigmas[use]) * _FWHM),
        n_bins=n_bins,
        n_used=int(use.sum()),
        rms_px=float(np.sqrt(np.mean(resid**2))) if resid.size else float("nan"),
        tilt_deg=float(math.degrees(math.atan(slope))),
        snr=peak_snr,
        bin_x=tuple(float(v) for v in xc_bins[use]),
        bin_y=tuple(float(v) for v in centres[use]),
    )
    log.info(
        "trace: row %.1f at x=%.0f, tilt %.3f deg, FWHM %.2f px, %d/%d bins, rms %.3f px",
        res.at(x_c),
        x_c,
        res.tilt_deg,
        res.fwhm_px,
        res.n_used,
        n_bins,
        res.rms_px,
    )
    return res


def find_peaks_1d(spec, *, min_snr=5.0, min_separation_px=3.0, baseline_px=51):
    """
    Emission peaks of a 1-D spectrum above a running-median baseline.

    Returns
    -------
    idx : numpy.ndarray
        Integer positions of local maxima above ``min_snr`` robust sigma, brightest first.
    height : numpy.ndarray
        Their heights above the baseline.
    noise : float
        Robust noise of the baseline-subtracted spectrum.
    """
    s = np.asarray(spec, dtype=float)
    fill = np.where(np.isfinite(s), s, np.nanmedian(s))
    base = ndimage.median_filter(fill, size=baseline_px, mode="nearest")
    r = fill - base
    # noise from the pixel-to-pixel differences between line-free pixels (a dense arc has
    # lines over much of the spectrum, whose slopes would inflate a plain estimate)
    quiet = r < np.percentile(r, 40)
    pair = quiet[:-1] & quiet[1:]
    noise = _robust_sigma(np.diff(r)[pair] if pair.sum() > 20 else np.diff(r)) / math.sqrt(2.0)
    if not noise > 0:
        noise = _robust_sigma(r) or 1.0
    is_max = np.zeros(r.size, bool)
    is_max[1:-1] = (r[1:-1] > r[:-2]) & (r[1:-1] >= r[2:])
    cand = np.flatnonzero(is_max & (r > min_snr * noise))
    cand = cand[np.argsort(-r[cand])]
    kept = []
    for c in cand:
        if all(abs(c - k) >= min_separation_px for k in kept):
            kept.append(c)
    kept = np.asarray(kept, dtype=int)
    return kept, r[kept], float(noise)


def _parabola_peak(prof, i):
    """Sub-pixel peak of 1-D ``prof`` near index ``i``: parabola through the log of three
    samples (exact for a Gaussian); NaN when the samples do not make a peak."""
    n = prof.size
    if i < 1 or i > n - 2:
        return float("nan")
    a, b, c = prof[i - 1], prof[i], prof[i + 1]
    if not (a > 0 and b > 0 and c > 0):
        return float("nan")
    la, lb, lc = math.log(a), math.log(b), math.log(c)
    den = la - 2 * lb + lc
    if not den < 0:
        return float("nan")
    off = 0.5 * (la - lc) / den
    return i + off if abs(off) < 1 else float("nan")


@dataclass(frozen=True)
class CurvatureResult:
    """Tilt and curvature of the slit image measured on the arc lamp.

    The column of the reference row that sees the same wavelength as pixel ``(x, y)`` is
    ``x - offset(x, y)`` with ``offset = (tilt + tilt_slope (x - x_c)/nx) dy + curvature dy^2``,
    ``dy = y - y_ref``.
    """

    ok: bool
    y_ref: float
    x_c: float
    nx: int
    tilt: float = 0.0
    tilt_slope: float = 0.0
    curvature: float = 0.0
    n_lines: int = 0
    rms_px: float = float("nan")
    reason: str | None = None
    lines: tuple = ()

    def offset(self, x, y):
        """Shift D(x, y) in px (0 when the measurement failed)."""
        if not self.ok:
            return np.zeros(np.broadcast(np.asarray(x), np.asarray(y)).shape)
        x = np.asarray(x, dtype=float)
        dy = np.asarray(y, dtype=float) - self.y_ref
        return (
            self.tilt + self.tilt_slope * (x - self.x_c) / self.nx
        ) * dy + self.curvature * dy**2

    @property
    def tilt_deg(self) -> float:
        return math.degrees(math.atan(self.tilt))

    def to_dict(self) -> dict:
        """JSON-safe summary."""
        return {
            "ok": self.ok,
            "y_ref": self.y_ref,
            "tilt": self.tilt,
            "tilt_deg": self.tilt_deg,
            "tilt_slope": self.tilt_slope,
            "curvature": self.curvature,
            "n_lines": self.n_lines,
            "rms_px": self.rms_px,
            "reason": self.reason,
        }


def measure_slit_curvature(
    lamp,
    *,
    y_ref,
    rows=None,
    band_px=16,
    min_snr=20.0,
    max_lines=30,
    isolation_px=10.0,
):
    """
    Tilt and curvature of the arc lines along the slit.

    Parameters
    ----------
    lamp : 2-D array
        Calibrated arc frame, dispersion along x.
    y_ref : float
        Reference row (the trace row at the centre column).
    rows : (int, int), optional
        Illuminated rows of the slit; default the whole frame.
    band_px : int, optional
        Height of the bands of rows in which the lines are measured.
    min_snr : float, optional
        Lines used must be at least this significant on the reference band.
    max_lines : int, optional
    isolation_px : float, optional
        No other detected line within this distance.

    Returns
    -------
    result : `CurvatureResult`
        ``ok=False`` (zero shift) with a reason when fewer than 3 lines can be followed.
    """
    img = np.asarray(lamp, dtype=np.float32)
    ny, nx = img.shape
    r0, r1 = (0, ny) if rows is None else (max(0, int(rows[0])), min(ny, int(rows[1])))
    x_c = (nx - 1) / 2.0
    yr = int(round(min(max(y_ref, r0 + 3), r1 - 4)))
    ref = np.median(img[max(r0, yr - 3) : min(r1, yr + 4)], axis=0)
    idx, height, noise = find_peaks_1d(ref, min_snr=min_snr, min_separation_px=3)
    iso = [i for i in idx if np.sum(np.abs(idx - i) < isolation_px) == 1]
    iso = [i for i in iso if 8 <= i < nx - 8][:max_lines]
    if len(iso) < 3:
        return CurvatureResult(
            ok=False,
            y_ref=float(y_ref),
            x_c=x_c,
            nx=nx,
            reason=f"only {len(iso)} isolated lamp lines with S/N >= {min_snr:g}",
        )
    nb = max(3, (r1 - r0) // band_px)
    edges = np.linspace(r0, r1, nb + 1).astype(int)
    band_y = 0.5 * (edges[:-1] + edges[1:] - 1)
    bands = np.stack([img[edges[k] : edges[k + 1]].mean(axis=0) for k in range(nb)])
    base = np.median(bands, axis=1, keepdims=True)
    bands = np.clip(bands - base, 1e-3, None)
    pts_x, pts_y, pts_x0 = [], [], []
    lines = []
    for i in iso:
        # follow the line from the reference band outwards (it moves with the tilt)
        pos = np.full(nb, np.nan)
        kref = int(np.clip(np.searchsorted(edges, yr, side="right") - 1, 0, nb - 1))
        for ks in (range(kref, nb), range(kref - 1, -1, -1)):
            guess = float(i)
            for k in ks:
                g = int(round(guess))
                lo, hi = max(1, g - 4), min(nx - 2, g + 5)
                if hi <= lo:
                    break
                peak = lo + int(np.argmax(bands[k, lo:hi]))
                p = _parabola_peak(bands[k], peak)
                if np.isfinite(p) and abs(p - guess) < 3:
                    pos[k] = p
                    guess = p
        ok = np.isfinite(pos)
        if ok.sum() < 4:
            continue
        dy = band_y[ok] - y_ref
        c = np.polynomial.polynomial.polyfit(dy, pos[ok], 2)
        r = pos[ok] - np.polynomial.polynomial.polyval(dy, c)
        keep = np.abs(r) < max(0.3, 4 * _robust_sigma(r))
        if keep.sum() < 4:
            continue
        c = np.polynomial.polynomial.polyfit(dy[keep], pos[ok][keep], 2)
        pts_x.extend(pos[ok][keep])
        pts_y.extend(band_y[ok][keep])
        pts_x0.extend([c[0]] * int(keep.sum()))
        lines.append((float(c[0]), float(c[1]), float(c[2])))
    if len(lines) < 3:
        return CurvatureResult(
            ok=False,
            y_ref=float(y_ref),
            x_c=x_c,
            nx=nx,
            reason=f"only {len(lines)} lamp lines could be followed along the slit",
        )
    px, py, p0 = map(np.asarray, (pts_x, pts_y, pts_x0))
    dy = py - y_ref
    # joint fit: px - x0 = (t + ts (x0 - x_c)/nx) dy + k dy^2
    a = np.column_stack([dy, dy * (p0 - x_c) / nx, dy**2])
    use = np.ones(px.size, bool)
    sol = np.zeros(3)
    for _ in range(4):
        sol, *_ = np.linalg.lstsq(a[use], (px - p0)[use], rcond=None)
        r = (px - p0) - a @ sol
        s = max(_robust_sigma(r[use]), 0.02)
        new = np.abs(r) < 4 * s
        if np.array_equal(new, use):
            break
        use = new
    rms = float(np.sqrt(np.mean(r[use] ** 2)))
    res = CurvatureResult(
        ok=True,
        y_ref=float(y_ref),
        x_c=x_c,
        nx=nx,
        tilt=float(sol[0]),
        tilt_slope=float(sol[1]),
        curvature=float(sol[2]),
        n_lines=len(lines),
        rms_px=rms,
        lines=tuple(lines),
    )
    log.info(
        "slit image: tilt %.3f deg (%.4f px/px, slope %.4f), curvature %.2e px/px^2, "
        "%d lines, rms %.3f px",
        res.tilt_deg,
        res.tilt,
        res.tilt_slope,
        res.curvature,
        res.n_lines,
        rms,
    )
    return res
