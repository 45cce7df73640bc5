"""Wavelength solution from an arc lamp: line identification, polynomial fit, resolving power.

1. **Lamp lines** (`measure_lamp_lines`): peaks of the lamp spectrum (extracted along the
   star's trace, so the slit tilt and curvature are the star's) above ``min_snr`` robust sigma;
   each is fitted with a Gaussian for its centre, width and amplitude.
2. **Catalogue**: the shipped laboratory lines of the lamp's elements
   (`rpp_tasks.spectra.linelists`, air wavelengths) in the range the configuration allows;
   lines closer than 1.5 resolution elements to a comparable line are unresolved blends at this
   resolution and are dropped (a blend's centroid depends on the lamp).
3. **Identification** (`identify_lines`): hypotheses from pairs of nearby bright peaks and pairs
   of catalogue lines whose spacing agrees with the configured dispersion (within
   ``dispersion_tolerance``) and, when given, with the central wavelength; each hypothesis is
   grown outwards: match peaks within a tolerance, refit (linear, then quadratic, then the full
   degree), widen the window in small steps until it covers the detector. The hypothesis with
   the highest soft count of matched lines (each counts ``1 - (residual / tolerance)^2``) wins.
   Without a central wavelength every placement is tried (an automatic matcher in the spirit of
   rascal's Hough transform, restricted by the known dispersion); if nothing matches with the
   configured sign of the dispersion the opposite sign is tried and flagged.
4. **Fit** (`solve_wavelength`): polynomial of ``degree`` in ``x - x_c`` with 2.5-sigma clipping
   (robust sigma); lines whose FWHM is off the median by more than 30 % (blends) are not fitted;
   RMS in A and in px; the range actually constrained by lines is recorded so that
   extrapolation can be flagged.
5. **Resolving power**: ``R = lambda / (FWHM_px * |d lambda / dx|)`` per identified line (the
   observed FWHM, pixel sampling included), median and robust scatter.

specreduce's ``WavelengthCalibration1D`` was not used: its line lists come from a download at
run time (no network here) and its matcher does not take the configured dispersion as a prior.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from rpp_tasks.spectra.linelists import lamp_lines
from rpp_tasks.spectra.trace import find_peaks_1d, gauss_centroid

__all__ = [
    "LampLines",
    "WavelengthSolution",
    "measure_lamp_lines",
    "catalogue_lines",
    "identify_lines",
    "solve_wavelength",
    "ZeroPointShift",
    "measure_zero_point_shift",
]

log = logging.getLogger(__name__)
_MAD = 1.482602218505602
_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True)
class LampLines:
    """Emission lines measured on a 1-D lamp spectrum (brightest first)."""

    x_px: np.ndarray
    x_err_px: np.ndarray
    fwhm_px: np.ndarray
    amplitude: np.ndarray
    snr: np.ndarray
    noise: float

    def __len__(self) -> int:
        return int(self.x_px.size)


def measure_lamp_lines(spec, *, min_snr=5.0, max_lines=80, fwhm_guess_px=3.0):
    """
    Detect and fit the emission lines of a lamp spectrum.

    Parameters
    ----------
    spec : 1-D array
        Lamp spectrum per column.
    min_snr : float, optional
    max_lines : int, optional
        Keep the brightest lines.
    fwhm_guess_px : float, optional

    Returns
    -------
    lines : `LampLines`
    """
    spec = np.asarray(spec, dtype=float)
    idx, height, noise = find_peaks_1d(spec, min_snr=min_snr, min_separation_px=2)
    xs, errs, fw, amps, snr = [], [], [], [], []
    for i, h in zip(idx[: 2 * max_lines], height[: 2 * max_lines]):
        others = np.abs(idx[idx != i] - i)
        gap = float(others.min()) if others.size else np.inf
        half = max(2.5, min(max(4.0, 1.6 * fwhm_guess_px), 0.6 * gap))
        fit = gauss_centroid(spec, i, half, sigma0=fwhm_guess_px / _FWHM)
        if fit is None or abs(fit[0] - i) > 1.5:
            continue
        mu, sig, amp, err = fit
        xs.append(mu)
        errs.append(err)
        fw.append(sig * _FWHM)
        amps.append(amp)
        snr.append(h / noise)
        if len(xs) >= max_lines:
            break
    return LampLines(
        x_px=np.asarray(xs),
        x_err_px=np.asarray(errs),
        fwhm_px=np.asarray(fw),
        amplitude=np.asarray(amps),
        snr=np.asarray(snr),
        noise=float(noise),
    )


def catalogue_lines(elements, *, wavelength_range_a=None, resolution_a=None, max_shift=0.03):
    """
    Laboratory lines usable at a given resolution.

    A line is dropped as an unresolved blend when its neighbours (weighted by their NIST
    intensity and a Gaussian line profile of FWHM ``resolution_a``) would pull its centroid by
    more than ``max_shift`` resolution elements, or when a neighbour of at least 30 % of its
    intensity is closer than half a sigma (one unresolved peak whose centroid depends on the
    lamp's actual intensity ratio).

    Returns
    -------
    wavelength_a, intensity : numpy.ndarray
        Sorted by wavelength.
    labels : list of str
    """
    lines = lamp_lines(elements, wavelength_range_a=wavelength_range_a)
    if not lines:
        return np.array([]), np.array([]), []
    lam = np.array([t[0] for t in lines])
    inten = np.array([float(t[1]) for t in lines])
    labels = [t[2] for t in lines]
    if resolution_a:
        sig = resolution_a / _FWHM
        keep = np.ones(lam.size, bool)
        for i in range(lam.size):
            d = lam - lam[i]
            near = (np.abs(d) < 2.0 * resolution_a) & (d != 0)
            if not near.any():
                continue
            g = inten[near] / inten[i] * np.exp(-0.5 * (d[near] / sig) ** 2)
            shift = float(np.sum(g * d[near]) / (1.0 + np.sum(g)))
            close = (np.abs(d[near]) < 0.5 * sig) & (inten[near] > 0.3 * inten[i])
            if abs(shift) > max_shift * resolution_a or np.any(close):
                keep[i] = False
        lam, inten = lam[keep], inten[keep]
        labels = [lb for lb, k in zip(labels, keep) if k]
    return lam, inten, labels


def _match(x, lam_model, cat, tol_a):
    """Nearest catalogue line to each model wavelength; index or -1 beyond ``tol_a``."""
    j = np.clip(np.searchsorted(cat, lam_model), 1, cat.size - 1)
    left, right = cat[j - 1], cat[j]
    jj = np.where(np.abs(lam_model - left) <= np.abs(right - lam_model), j - 1, j)
    d = np.abs(cat[jj] - lam_model)
    out = np.where(d <= tol_a, jj, -1)
    # one peak per catalogue line: keep the closest
    for k in np.unique(out[out >= 0]):
        dup = np.flatnonzero(out == k)
        if dup.size > 1:
            best = dup[np.argmin(d[dup])]
            out[dup[dup != best]] = -1
    return out


def _grow(x, cat, a, b, x_pair, nx, x_c, *, tol_px, degree):
    """Grow a linear hypothesis around ``x_pair`` to the whole detector; matches and coeffs."""
    coeffs = np.array([a, b])
    half = max(nx / 8.0, 2.0 * abs(x_pair[1] - x_pair[0]))
    centre = 0.5 * (x_pair[0] + x_pair[1])
    m = np.full(x.size, -1)
    for _ in range(20):
        win = np.abs(x - centre) <= half
        lam = np.polynomial.polynomial.polyval(x - x_c, coeffs)
        m = np.where(win, _match(x, lam, cat, tol_px * abs(coeffs[1])), -1)
        ok = m >= 0
        n_ok = int(ok.sum())
        if n_ok < 2:
            return m, coeffs
        span = np.ptp(x[ok]) if n_ok > 1 else 0.0
        deg = 1
        if n_ok >= 6 and span > nx / 3:
            deg = 2
        if n_ok >= degree + 5 and span > 0.8 * nx:
            deg = degree
        c = np.polynomial.polynomial.polyfit(x[ok] - x_c, cat[m[ok]], deg)
        coeffs = c
        if half >= nx:
            break
        half *= 1.3  # small steps: the fit is never extrapolated far
    lam = np.polynomial.polynomial.polyval(x - x_c, coeffs)
    m = _match(x, lam, cat, tol_px * abs(coeffs[1]))
    return m, coeffs


def identify_lines(
    x,
    strength,
    cat,
    cat_strength,
    *,
    nx,
    dispersion_a_per_px,
    central_wavelength_a=None,
    dispersion_tolerance=0.15,
    central_tolerance_a=None,
    tol_px=2.0,
    degree=3,
    n_bright=14,
    n_cat=30,
):
    """
    Match measured line positions to laboratory wavelengths.

    Parameters
    ----------
    x, strength : 1-D arrays
        Line centres (px) and amplitudes.
    cat, cat_strength : 1-D arrays
        Laboratory wavelengths (sorted) and intensities.
    nx : int
        Detector columns.
    dispersion_a_per_px : float
        Approximate dispersion, signed (negative: wavelength decreases with x).
    central_wavelength_a : float, optional
        Approximate wavelength of the central column.
    dispersion_tolerance : float, optional
        Relative tolerance on the dispersion.
    central_tolerance_a : float, optional
        Tolerance on the central wavelength; default 15 % of the detector's span.
    tol_px : float, optional
        Match tolerance in px.
    degree : int, optional
    n_bright, n_cat : int, optional
        Peaks and catalogue lines used to form hypotheses.

    Returns
    -------
    matches : numpy.ndarray
        Catalogue index per peak (-1: unmatched).
    coeffs : numpy.ndarray
        Polynomial in ``x - x_c`` of the best hypothesis.
    """
    x = np.asarray(x, float)
    cat = np.asarray(cat, float)
    x_c = (nx - 1) / 2.0
    empty = (np.full(x.size, -1), np.array([np.nan, np.nan]))
    if x.size < 2 or cat.size < 2:
        return empty
    span = abs(dispersion_a_per_px) * nx
    ctol = 0.15 * span if central_tolerance_a is None else central_tolerance_a
    bright = np.argsort(-np.asarray(strength))[:n_bright]
    cat_b = np.sort(np.argsort(-np.asarray(cat_strength))[:n_cat])
    best = (0, np.inf, *empty)
    tried = 0
    hyps = []
    for i, j in itertools.combinations(bright, 2):
        dx = x[j] - x[i]
        if abs(dx) < 5 or abs(dx) > nx / 2.5:
            continue
        for k, l in itertools.combinations(cat_b, 2):
            b = (cat[l] - cat[k]) / dx
            if abs(b / dispersion_a_per_px - 1) > dispersion_tolerance:
                continue
            a = cat[k] - b * (x[i] - x_c)
            if central_wavelength_a is not None and abs(a - central_wavelength_a) > ctol:
                continue
            lam = a + b * (x - x_c)
            n = int(np.count_nonzero(_match(x, lam, cat, tol_px * abs(b)) >= 0))
            hyps.append((n, a, b, (x[i], x[j])))
    hyps.sort(key=lambda h: -h[0])
    for _n0, a, b, pair in hyps[:40]:
        tried += 1
        m, coeffs = _grow(x, cat, a, b, pair, nx, x_c, tol_px=tol_px, degree=degree)
        ok = m >= 0
        n_ok = int(ok.sum())
        if n_ok < 3 or abs(coeffs[1] / dispersion_a_per_px - 1) > dispersion_tolerance:
            continue
        lam = np.polynomial.polynomial.polyval(x[ok] - x_c, coeffs)
        r_px = (lam - cat[m[ok]]) / abs(coeffs[1])
        # soft count: a line matched at the tolerance counts 0, a perfect match 1 (a shifted,
        # wrong identification matches as many lines, but loosely)
        score = float(np.sum(np.clip(1.0 - (r_px / tol_px) ** 2, 0, None)))
        if score > best[0]:
            best = (score, 0.0, m, coeffs)
    log.debug("identify: %d hypotheses, %d grown, best score %.1f", len(hyps), tried, best[0])
    return best[2], best[3]


@dataclass(frozen=True)
class WavelengthSolution:
    """Dispersion solution ``lambda(x) = sum c_k (x - x_c)^k`` (air A) on the trace.

    Attributes
    ----------
    ok : bool
    coeffs : tuple of float
    x_c : float
    nx : int
    degree : int
    rms_a, rms_px : float
        RMS of the residuals of the lines used.
    n_lines : int
        Lines used in the final fit.
    n_detected : int
        Lamp lines detected.
    resolving_power : float
        Median ``lambda / FWHM`` of the identified lines.
    resolving_power_scatter : float
    fwhm_a : float
        Median FWHM of the lines (A).
    lines : tuple of dict
        ``x_px, x_err_px, wavelength_a, fit_a, residual_a, residual_px, fwhm_px, R, label,
        used``.
    calibrated_range_a : (float, float)
        Wavelengths of the first and last line used.
    elements : tuple of str
    reason : str or None
    flags : tuple of str
    """

    ok: bool
    coeffs: tuple[float, ...] = ()
    x_c: float = 0.0
    nx: int = 0
    degree: int = 0
    rms_a: float = float("nan")
    rms_px: float = float("nan")
    n_lines: int = 0
    n_detected: int = 0
    resolving_power: float = float("nan")
    resolving_power_scatter: float = float("nan")
    fwhm_a: float = float("nan")
    lines: tuple = field(default=(), repr=False)
    calibrated_range_a: tuple[float, float] = (float("nan"), float("nan"))
    elements: tuple[str, ...] = ()
    reason: str | None = None
    flags: tuple[str, ...] = ()

    def wavelength(self, x):
        """Air wavelength (A) at column(s) ``x``."""
        d = np.asarray(x, dtype=float) - self.x_c
        return np.polynomial.polynomial.polyval(d, np.asarray(self.coeffs))

    def dispersion(self, x):
        """d lambda / d x (A/px) at column(s) ``x``."""
        d = np.asarray(x, dtype=float) - self.x_c
        der = np.polynomial.polynomial.polyder(np.asarray(self.coeffs))
        return np.polynomial.polynomial.polyval(d, der)

    @property
    def range_a(self) -> tuple[float, float]:
        """Wavelengths of the first and last column (sorted)."""
        if not self.ok:
            return (float("nan"), float("nan"))
        w = self.wavelength(np.array([0.0, self.nx - 1.0]))
        return (float(w.min()), float(w.max()))

    def to_dict(self) -> dict:
        """JSON-safe summary (the lines as a list of dicts)."""
        return {
            "ok": self.ok,
            "coeffs": list(self.coeffs),
            "x_c": self.x_c,
            "nx": self.nx,
            "degree": self.degree,
            "rms_a": self.rms_a,
            "rms_px": self.rms_px,
            "n_lines": self.n_lines,
            "n_detected": self.n_detected,
            "resolving_power": self.resolving_power,
            "resolving_power_scatter": self.resolving_power_scatter,
            "fwhm_a": self.fwhm_a,
            "dispersion_a_per_px": float(self.dispersion(self.x_c)) if self.ok else None,
            "range_a": list(self.range_a),
            "calibrated_range_a": list(self.calibrated_range_a),
            "elements": list(self.elements),
            "reason": self.reason,
            "flags": list(self.flags),
            "lines": [dict(r) for r in self.lines],
        }


def _fail(reason, *, nx, n_detected=0, elements=(), flags=()):
    log.warning("wavelength solution failed: %s", reason)
    return WavelengthSolution(
        ok=False,
        nx=nx,
        x_c=(nx - 1) / 2.0,
        n_detected=n_detected,
        elements=tuple(elements),
        reason=reason,
        flags=tuple(flags),
    )


def solve_wavelength(
    lamp_spec,
    *,
    elements,
    dispersion_a_per_px,
    central_wavelength_a=None,
    wavelength_range_a=None,
    degree=3,
    min_lines=5,
    min_snr=5.0,
    dispersion_tolerance=0.15,
    tol_px=2.0,
    clip_sigma=2.5,
    allow_flip=True,
    max_rms_px=0.35,
):
    """
    Identify the lamp's lines and fit the dispersion polynomial.

    Parameters
    ----------
    lamp_spec : 1-D array
        Lamp spectrum extracted along the target's trace.
    elements : sequence of str
        Lamp elements (``["Ne"]``, ``["Ar", "Ne"]``).
    dispersion_a_per_px : float
        Approximate dispersion (A/px), negative when the wavelength decreases with x.
    central_wavelength_a : float, optional
        Approximate wavelength at the central column.
    wavelength_range_a : (float, float), optional
        Approximate range covered (used for the central wavelength when that is not given).
    degree : int, optional
        Polynomial degree of the final fit (lowered when lines are few).
    min_lines : int, optional
        Fewer identified lines: the solution fails (``ok=False`` with the reason).
    min_snr : float, optional
    dispersion_tolerance : float, optional
    tol_px : float, optional
        Identification tolerance (px).
    clip_sigma : float, optional
    allow_flip : bool, optional
        Try the opposite sign of the dispersion when the configured one gives no consistent
        solution (flag ``"dispersion_sign_flipped"``).
    max_rms_px : float, optional
        A solution whose RMS exceeds this is not a consistent identification (a wrong placement
        can match a handful of lines of a dense list loosely): it fails.

    Returns
    -------
    solution : `WavelengthSolution`
    """
    kw = dict(
        elements=elements,
        dispersion_a_per_px=dispersion_a_per_px,
        central_wavelength_a=central_wavelength_a,
        wavelength_range_a=wavelength_range_a,
        degree=degree,
        min_lines=min_lines,
        min_snr=min_snr,
        dispersion_tolerance=dispersion_tolerance,
        tol_px=tol_px,
        clip_sigma=clip_sigma,
    )
    first = _solve_one(lamp_spec, sign=1.0, **kw)
    if first.ok and first.rms_px <= max_rms_px:
        return first
    if allow_flip and first.n_detected >= min_lines:
        second = _solve_one(lamp_spec, sign=-1.0, **kw)
        if second.ok and second.rms_px <= max_rms_px:
            log.warning("wavelength solution: the dispersion runs the other way than configured")
            return dataclasses.replace(second, flags=(*second.flags, "dispersion_sign_flipped"))
    if first.ok:
        return _fail(
            f"no consistent line identification: the best has RMS {first.rms_px:.2f} px "
            f"> {max_rms_px:g} px with {first.n_lines} lines; check the lamp element, the "
            "dispersion and the central wavelength",
            nx=first.nx,
            n_detected=first.n_detected,
            elements=first.elements,
        )
    return first


def _solve_one(
    lamp_spec,
    *,
    elements,
    dispersion_a_per_px,
    central_wavelength_a=None,
    wavelength_range_a=None,
    degree=3,
    min_lines=5,
    min_snr=5.0,
    dispersion_tolerance=0.15,
    tol_px=2.0,
    clip_sigma=2.5,
    sign=1.0,
):
    """One identification + fit with the dispersion multiplied by ``sign``."""
    spec = np.asarray(lamp_spec, dtype=float)
    nx = spec.size
    x_c = (nx - 1) / 2.0
    elements = tuple(elements)
    if central_wavelength_a is None and wavelength_range_a is not None:
        central_wavelength_a = 0.5 * (wavelength_range_a[0] + wavelength_range_a[1])
    ll = measure_lamp_lines(spec, min_snr=min_snr)
    if len(ll) < min_lines:
        return _fail(
            f"lamp: {len(ll)} emission line(s) above S/N {min_snr:g} (need {min_lines})",
            nx=nx,
            n_detected=len(ll),
            elements=elements,
        )
    fwhm_px = float(np.median(ll.fwhm_px))
    res_a = fwhm_px * abs(dispersion_a_per_px)
    span = abs(dispersion_a_per_px) * nx * (1 + dispersion_tolerance)
    if central_wavelength_a is not None:
        rng = (central_wavelength_a - 0.65 * span, central_wavelength_a + 0.65 * span)
    else:
        rng = None
    cat, cat_i, labels = catalogue_lines(elements, wavelength_range_a=rng, resolution_a=res_a)
    if cat.size < min_lines:
        return _fail(
            f"only {cat.size} resolved {'+'.join(elements)} lines in the expected range",
            nx=nx,
            n_detected=len(ll),
            elements=elements,
        )
    flags = []
    m = coeffs = None
    for sgn in (sign,):
        m, coeffs = identify_lines(
            ll.x_px,
            ll.amplitude,
            cat,
            cat_i,
            nx=nx,
            dispersion_a_per_px=sgn * dispersion_a_per_px,
            central_wavelength_a=central_wavelength_a,
            dispersion_tolerance=dispersion_tolerance,
            tol_px=tol_px,
            degree=degree,
        )
        if np.count_nonzero(m >= 0) >= min_lines:
            break
    ok = m >= 0
    if ok.sum() < min_lines:
        return _fail(
            f"lamp: {len(ll)} lines detected but only {int(ok.sum())} identified with "
            f"{'+'.join(elements)} laboratory lines (need {min_lines}); check the lamp element, "
            "the dispersion and the central wavelength",
            nx=nx,
            n_detected=len(ll),
            elements=elements,
        )
    x = ll.x_px
    lab = np.where(ok, cat[np.clip(m, 0, None)], np.nan)
    # a line much broader or narrower than the others is a blend (or not a line): listed, not fitted
    fw_med = float(np.median(ll.fwhm_px))
    shape_ok = (ll.fwhm_px > 0.7 * fw_med) & (ll.fwhm_px < 1.3 * fw_med)
    use = ok & shape_ok
    deg = min(degree, int(use.sum()) - 3)
    deg = max(deg, 1)
    for _ in range(8):
        c = np.polynomial.polynomial.polyfit(x[use] - x_c, lab[use], deg)
        # re-match every detected line with the current solution (finds lines missed earlier)
        lam = np.polynomial.polynomial.polyval(x - x_c, c)
        disp = np.abs(
            np.polynomial.polynomial.polyval(x - x_c, np.polynomial.polynomial.polyder(c))
        )
        mm = _match(x, lam, cat, 1.0 * np.median(disp) * min(tol_px, 1.5))
        lab_new = np.where(mm >= 0, cat[np.clip(mm, 0, None)], np.nan)
        resid = lab_new - lam
        s = max(_MAD * np.nanmedian(np.abs(resid[mm >= 0])), 0.02 * np.median(disp))
        new = (mm >= 0) & (np.abs(resid) <= clip_sigma * s) & shape_ok
        lab = lab_new
        if np.array_equal(new, use):
            break
        if new.sum() < deg + 2:
            break
        use = new
        m = mm
    if use.sum() < min_lines:
        return _fail(
            f"only {int(use.sum())} lines survive the clipping (need {min_lines})",
            nx=nx,
            n_detected=len(ll),
            elements=elements,
        )
    c = np.polynomial.polynomial.polyfit(x[use] - x_c, lab[use], deg)
    fit = np.polynomial.polynomial.polyval(x - x_c, c)
    disp = np.polynomial.polynomial.polyval(x - x_c, np.polynomial.polynomial.polyder(c))
    resid_a = lab - fit
    resid_px = resid_a / disp
    rms_a = float(np.sqrt(np.mean(resid_a[use] ** 2)))
    rms_px = float(np.sqrt(np.mean(resid_px[use] ** 2)))
    fwhm_a = np.abs(ll.fwhm_px * disp)
    r_each = lab / fwhm_a
    r_med = float(np.median(r_each[use]))
    r_sc = float(_MAD * np.median(np.abs(r_each[use] - r_med)))
    lines = []
    order = np.argsort(x)
    for i in order:
        if not np.isfinite(lab[i]):
            continue
        lines.append(
            {
                "x_px": float(x[i]),
                "x_err_px": float(ll.x_err_px[i]),
                "wavelength_a": float(lab[i]),
                "fit_a": float(fit[i]),
                "residual_a": float(resid_a[i]),
                "residual_px": float(resid_px[i]),
                "fwhm_px": float(ll.fwhm_px[i]),
                "R": float(r_each[i]),
                "label": labels[int(np.flatnonzero(cat == lab[i])[0])] if lab[i] in cat else "",
                "used": bool(use[i]),
            }
        )
    used_lab = lab[use]
    cal = (float(used_lab.min()), float(used_lab.max()))
    w_ends = np.polynomial.polynomial.polyval(np.array([0.0, nx - 1.0]) - x_c, c)
    lo, hi = float(w_ends.min()), float(w_ends.max())
    unconstrained = (cal[0] - lo) + (hi - cal[1])
    if unconstrained > 0.2 * (hi - lo):
        flags.append("extrapolated")
    sol = WavelengthSolution(
        ok=True,
        coeffs=tuple(float(v) for v in c),
        x_c=x_c,
        nx=nx,
        degree=deg,
        rms_a=rms_a,
        rms_px=rms_px,
        n_lines=int(use.sum()),
        n_detected=len(ll),
        resolving_power=r_med,
        resolving_power_scatter=r_sc,
        fwhm_a=float(np.median(fwhm_a[use])),
        lines=tuple(lines),
        calibrated_range_a=cal,
        elements=elements,
        flags=tuple(flags),
    )
    log.info(
        "wavelength solution: %d/%d lines, degree %d, RMS %.3f A = %.3f px, %.1f-%.1f A "
        "(lines %.1f-%.1f A), R = %.0f",
        sol.n_lines,
        sol.n_detected,
        deg,
        rms_a,
        rms_px,
        lo,
        hi,
        cal[0],
        cal[1],
        r_med,
    )
    return sol


#: Sharp blue edges (band heads) of the telluric O2 bands, air A (B band, A band).
TELLURIC_HEADS_A = (("O2 B", 6867.19), ("O2 A", 7593.70))
#: Night-sky and light-pollution emission lines usable for a zero-point check, air A.
SKY_LINES_A = (("[OI]", 5577.34), ("[OI]", 6300.30), ("Hg", 5460.74), ("Hg", 4358.33))


@dataclass(frozen=True)
class ZeroPointShift:
    """Wavelength zero-point shift between the lamp and the target frame (flexure, slit
    centring), measured on telluric band heads and sky emission lines of the target frame.

    ``shift_a`` is how much too red the target's features fall on the lamp solution's scale:
    the corrected wavelengths are ``lambda_lamp - shift_a`` (0 when nothing was measured).
    """

    shift_a: float
    shift_err_a: float
    n_features: int
    features: tuple = ()
    applied: bool = False
    reason: str | None = None

    def to_dict(self) -> dict:
        """JSON-safe summary."""
        return {
            "shift_a": self.shift_a,
            "shift_err_a": self.shift_err_a,
            "n_features": self.n_features,
            "features": [dict(f) for f in self.features],
            "applied": self.applied,
            "reason": self.reason,
        }


def measure_zero_point_shift(
    wavelength_a, flux, *, sky=None, resolution_a, max_shift_a=None, min_shift_sigma=3.0
):
    """
    Zero-point shift of a target's wavelength scale from telluric O2 band heads (in the star's
    spectrum) and sky emission lines (in the sky under it).

    The band head is located as the steepest rise of the flux towards shorter wavelengths
    (the minimum of dF/dlambda) within ``max_shift_a`` of its laboratory wavelength; a sky line
    by a Gaussian fit. The shift is the median of the features' offsets; it is applied only when
    it exceeds ``min_shift_sigma`` times its error (else reported, ``applied=False``).

    Parameters
    ----------
    wavelength_a : 1-D array
        Wavelength of each column from the lamp solution (either direction).
    flux : 1-D array
        Extracted target spectrum.
    sky : 1-D array, optional
        Sky spectrum under the aperture.
    resolution_a : float
        FWHM of the lines (A).
    max_shift_a : float, optional
        Search half-window; default 3 resolution elements.

    Returns
    -------
    shift : `ZeroPointShift`
    """
    lam = np.asarray(wavelength_a, float)
    order = np.argsort(lam)
    lam = lam[order]
    f = np.asarray(flux, float)[order]
    win = 3.0 * resolution_a if max_shift_a is None else max_shift_a
    step = float(np.median(np.diff(lam)))
    feats = []
    for name, w0 in TELLURIC_HEADS_A:
        if not (lam[0] + 2 * win < w0 < lam[-1] - 2 * win):
            continue
        sel = (lam > w0 - win) & (lam < w0 + win)
        if sel.sum() < 5:
            continue
        ff = ndimage_smooth(f, max(1.0, 0.25 * resolution_a / step))
        d = np.gradient(ff, lam)
        idx = np.flatnonzero(sel)
        i = idx[np.argmin(d[idx])]
        # the head must be a real edge: the drop across it is significant
        left = np.median(f[(lam > w0 - 2 * win) & (lam < w0 - win)])
        right = np.median(f[(lam > w0 + 0.2 * win) & (lam < w0 + win)])
        if not (left > 0 and right < 0.97 * left) or i in (0, lam.size - 1):
            continue
        a, b, c = d[i - 1], d[i], d[i + 1]
        den = a - 2 * b + c
        off = 0.5 * (a - c) / den if den > 0 else 0.0
        pos = float(np.interp(i + off, np.arange(lam.size), lam))
        feats.append({"feature": name, "lab_a": w0, "measured_a": pos, "offset_a": pos - w0})
    if sky is not None:
        s = np.asarray(sky, float)[order]
        base = np.median(s)
        noise = _MAD * np.median(np.abs(np.diff(s))) / math.sqrt(2.0)
        for name, w0 in SKY_LINES_A:
            if not (lam[0] + win < w0 < lam[-1] - win):
                continue
            idx = np.flatnonzero((lam > w0 - win) & (lam < w0 + win))
            i = idx[np.argmax(s[idx])]
            if not s[i] - base > 8 * max(noise, 1e-9):
                continue
            fit = gauss_centroid(s, i, max(3.0, resolution_a / step))
            if fit is None:
                continue
            pos = float(np.interp(fit[0], np.arange(lam.size), lam))
            feats.append({"feature": name, "lab_a": w0, "measured_a": pos, "offset_a": pos - w0})
    if not feats:
        return ZeroPointShift(0.0, float("nan"), 0, reason="no telluric band head or sky line")
    offs = np.array([ft["offset_a"] for ft in feats])
    shift = float(np.median(offs))
    err = float(
        max(0.1 * resolution_a, _MAD * np.median(np.abs(offs - shift)))
        / math.sqrt(max(1, offs.size - 1) if offs.size > 1 else 1)
    )
    applied = abs(shift) > min_shift_sigma * err
    log.info(
        "wavelength zero point: %+.2f +- %.2f A from %s%s",
        shift,
        err,
        ", ".join(f"{ft['feature']} {ft['offset_a']:+.1f}" for ft in feats),
        "" if applied else " (not significant: not applied)",
    )
    return ZeroPointShift(
        shift_a=shift if applied else 0.0,
        shift_err_a=err,
        n_features=len(feats),
        features=tuple(feats),
        applied=applied,
        reason=None if applied else f"measured {shift:+.2f} A not significant",
    )


def ndimage_smooth(v, sigma):
    """Gaussian smoothing of a 1-D array (sigma in samples)."""
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(np.asarray(v, float), sigma, mode="nearest")
