"""Synthetic long-slit spectroscopic nights with known truth (2SPOT-like, Alpy600-like).

A night is a set of raw frames by role -- target exposures, one arc lamp (Ne + Ar), flats
(tungsten lamp), darks and offsets (biases) -- rendered from a known instrument model:

* **Dispersion**: the wavelength at the reference row ``y_ref`` is a cubic polynomial of the
  column, ``lambda(u) = sum_k c_k (u - x_c)^k`` (air A).
* **Slit image tilt and curvature** (the lamp lines' "smile"): a pixel ``(x, y)`` sees the
  wavelength of column ``u = x + s(x, y)`` of the reference row with
  ``s = t1(x) (y - y_ref) + t2 (y - y_ref)^2`` and ``t1(x) = tilt + tilt_slope (x - x_c) / nx``.
* **Spectrum trace**: ``y_t(x) = y0 + a1 (x - x_c) + a2 (x - x_c)^2`` with a Gaussian spatial
  profile whose width varies across the detector.
* **Line spread function**: Gaussian of ``line_fwhm_px``; lines are integrated over the pixel.
* **Lamp**: every Ne/Ar line of the shipped lists in range, with flux proportional to
  ``(I / I_max)^0.8`` of the NIST relative intensity times a random factor 0.7-1.4 (real lamps
  differ from NIST's intensities), so the weak neighbours of strong lines make real blends.
* **Star**: a smooth continuum with Balmer lines, narrow "metal" lines at known wavelengths and
  telluric O2 bands; **sky**: continuum plus emission lines ([O I], Na D, Hg light pollution).
* **Detector**: bias level with a column pattern, dark current with hot pixels, pixel response
  (PRNU), slit illumination, gain, read noise, Poisson noise, 16-bit saturation, cosmic rays.

`make_longslit_night` returns the frames in memory with a `LongslitTruth`;
`write_longslit_session` writes them as a 2SPOT session (generic names, ``last_obs.yaml`` and
``setup_config.yaml``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy.special import erf

from rpp_tasks.sim.synthetic import _add_cosmic_rays
from rpp_tasks.spectra.linelists import BALMER_A, lamp_lines

__all__ = [
    "LongslitTruth",
    "LongslitNight",
    "SKY_LINES_A",
    "METAL_LINES_A",
    "make_longslit_night",
    "render_spectrum_row",
    "write_longslit_session",
]

#: Sky emission lines (air A, relative flux): night-sky [O I], Na D, Hg street lights.
SKY_LINES_A = (
    (5577.34, 1.0),
    (6300.30, 0.4),
    (6363.78, 0.15),
    (5889.95, 0.25),
    (5895.92, 0.2),
    (4358.33, 0.2),
    (5460.74, 0.3),
)
#: Narrow stellar absorption lines injected for the centre-recovery test (air A, depth).
METAL_LINES_A = (
    (4226.73, 0.35),
    (4383.55, 0.3),
    (4920.50, 0.3),
    (5167.32, 0.3),
    (5183.60, 0.35),
    (5269.54, 0.3),
    (5328.04, 0.25),
    (5889.95, 0.35),
    (5895.92, 0.3),
    (6122.22, 0.25),
    (6162.17, 0.25),
    (6439.07, 0.2),
    (6717.68, 0.2),
    (7148.15, 0.2),
)
_TELLURIC = ((6867.0, 6885.0, 0.35), (7594.0, 7625.0, 0.6))


@dataclass(frozen=True)
class LongslitTruth:
    """What was injected (pixel coordinates 0-based, dispersion along x)."""

    shape: tuple[int, int]
    x_c: float
    y_ref: float
    dispersion_coeffs: tuple[float, ...]  # lambda(u) = sum c_k (u - x_c)^k at y_ref
    tilt: float
    tilt_slope: float
    curvature: float
    trace_coeffs: tuple[float, float, float]  # y0, a1, a2 around x_c
    sigma_y_px: tuple[float, float]  # spatial sigma at x = 0 and x = nx - 1
    line_fwhm_px: float
    gain_e_per_adu: float
    read_noise_e: float
    bias_adu: float
    dark_e_per_s: float
    sky_e_per_px: float  # continuum per pixel per exposure (target exposure)
    star_peak_e: float  # star continuum peak, e- per column (whole profile) per exposure
    exptime_s: float
    lamp_lines: tuple[tuple[float, float], ...]  # (air A, e- per line, whole slit row)
    metal_lines: tuple[tuple[float, float], ...]
    sky_lines: tuple[tuple[float, float], ...]
    slit_rows: tuple[int, int]
    targets: tuple[str, ...]
    extra: dict = field(default_factory=dict)

    def wavelength(self, u):
        """Air wavelength (A) of reference-row column ``u``."""
        d = np.asarray(u, dtype=float) - self.x_c
        return sum(c * d**k for k, c in enumerate(self.dispersion_coeffs))

    def dispersion(self, u):
        """d lambda / d u (A/px) at reference-row column ``u``."""
        d = np.asarray(u, dtype=float) - self.x_c
        return sum(k * c * d ** (k - 1) for k, c in enumerate(self.dispersion_coeffs) if k)

    def column_of(self, wavelength_a):
        """Reference-row column of a wavelength (inverse of `wavelength`)."""
        u = np.arange(-50.0, self.shape[1] + 50.0, 0.25)
        lam = self.wavelength(u)
        order = np.argsort(lam)
        return np.interp(wavelength_a, lam[order], u[order], left=np.nan, right=np.nan)

    def shift(self, x, y):
        """``s(x, y)``: a pixel (x, y) sees the wavelength of reference column ``x + s``."""
        x = np.asarray(x, dtype=float)
        dy = np.asarray(y, dtype=float) - self.y_ref
        t1 = self.tilt + self.tilt_slope * (x - self.x_c) / self.shape[1]
        return t1 * dy + self.curvature * dy**2

    def trace_y(self, x):
        """Trace centre row at column ``x``."""
        d = np.asarray(x, dtype=float) - self.x_c
        y0, a1, a2 = self.trace_coeffs
        return y0 + a1 * d + a2 * d**2

    def sigma_y(self, x):
        """Spatial profile sigma (px) at column ``x``."""
        s0, s1 = self.sigma_y_px
        return s0 + (s1 - s0) * np.asarray(x, dtype=float) / (self.shape[1] - 1)

    def lamp_column_at_trace(self, wavelength_a):
        """Column where a lamp line of ``wavelength_a`` crosses the trace (iterated)."""
        u = self.column_of(wavelength_a)
        x = np.array(u, dtype=float)
        for _ in range(6):
            x = u - self.shift(x, self.trace_y(x))
        return x

    def to_dict(self) -> dict:
        """JSON-safe summary."""
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class LongslitNight:
    """Frames by role: ``{"target": {name: [(data, header), ...]}, "lamp": [...], ...}``."""

    targets: dict
    lamp: list
    flat: list
    dark: list
    offset: list
    truth: LongslitTruth
    star_true_adu: dict = field(default_factory=dict)  # name -> per-exposure noiseless 2-D star


def _box_gauss(centres, fluxes, sigma, u_grid):
    """Pixel-integrated Gaussians (unit-width pixels) summed on ``u_grid``."""
    out = np.zeros_like(u_grid)
    s = sigma * math.sqrt(2.0)
    half = 8.0 * sigma + 1.0
    for c, f in zip(centres, fluxes):
        if not np.isfinite(c):
            continue
        i0, i1 = np.searchsorted(u_grid, [c - half, c + half])
        uu = u_grid[i0:i1]
        out[i0:i1] += f * 0.5 * (erf((uu + 0.5 - c) / s) - erf((uu - 0.5 - c) / s))
    return out


def render_spectrum_row(truth, kind, u_grid, *, star_peak_e=None):
    """
    Pixel-integrated spectrum at the reference row on a fine grid of columns ``u_grid``.

    ``kind``: ``"star"`` (e- per column for the whole profile), ``"sky"`` (e- per pixel),
    ``"lamp"`` (e- per pixel), ``"flat"`` (e- per pixel, tungsten continuum).
    """
    lam = truth.wavelength(u_grid)
    disp = np.abs(truth.dispersion(u_grid))
    sig_px = truth.line_fwhm_px / 2.3548
    if kind == "lamp":
        cols = truth.column_of(np.array([w for w, _ in truth.lamp_lines]))
        return 2.0 + _box_gauss(cols, [f for _, f in truth.lamp_lines], sig_px, u_grid)
    if kind == "flat":
        return 25000.0 * (0.35 + 0.65 * np.exp(-0.5 * ((lam - 6200.0) / 1700.0) ** 2))
    if kind == "sky":
        cont = truth.sky_e_per_px * (0.7 + 0.3 * (lam - 4000.0) / 3500.0)
        cols = truth.column_of(np.array([w for w, _ in truth.sky_lines]))
        return cont + _box_gauss(cols, [f for _, f in truth.sky_lines], sig_px, u_grid)
    if kind != "star":
        raise ValueError(f"unknown kind {kind!r}")
    peak = truth.star_peak_e if star_peak_e is None else star_peak_e
    cont = peak * (0.25 + 0.75 * np.exp(-0.5 * ((lam - 5200.0) / 1300.0) ** 2))
    absorb = np.zeros_like(u_grid)
    # broad Balmer lines (intrinsic sigma 9 A) and narrow lines (1 A), convolved with the LSF
    for w in BALMER_A.values():
        c = truth.column_of(w)
        sig = math.hypot(9.0 / float(np.interp(c, u_grid, disp)) if np.isfinite(c) else 1, sig_px)
        absorb += _box_gauss([c], [0.55 * sig * math.sqrt(2 * math.pi)], sig, u_grid)
    for w, depth in truth.metal_lines:
        c = truth.column_of(w)
        sig = math.hypot(1.0 / float(np.interp(c, u_grid, disp)) if np.isfinite(c) else 1, sig_px)
        absorb += _box_gauss([c], [depth * sig * math.sqrt(2 * math.pi)], sig, u_grid)
    trans = np.ones_like(u_grid)
    for lo, hi, depth in _TELLURIC:
        inside = (lam >= lo) & (lam <= hi)
        trans[inside] *= 1.0 - depth * np.exp(-(lam[inside] - lo) / (hi - lo) * 1.5)
    return cont * np.clip(1.0 - absorb, 0.02, None) * trans


def _spatial_weights(truth, x, y_rows):
    """Pixel-integrated Gaussian spatial profile, shape (len(y_rows), len(x))."""
    yt = truth.trace_y(x)[None, :]
    s = truth.sigma_y(x)[None, :] * math.sqrt(2.0)
    yy = y_rows[:, None].astype(float)
    return 0.5 * (erf((yy + 0.5 - yt) / s) - erf((yy - 0.5 - yt) / s))


def _header(truth, *, imagetyp, exptime_s, date_obs, obj=None, ra=None, dec=None):
    h = fits.Header()
    h["IMAGETYP"] = (imagetyp, "type of image")
    h["DATE-OBS"] = (date_obs, "[UTC] start of exposure")
    h["EXPTIME"] = (float(exptime_s), "[s] exposure time")
    h["TELESCOP"] = ("RC12", "telescope")
    h["INSTRUME"] = ("SYNTH-ALPY600", "spectrograph + camera")
    h["OBSERVER"] = ("rpp_tasks.sim.longslit", "observer")
    h["EGAIN"] = (float(truth.gain_e_per_adu), "[e-/ADU] gain")
    h["XBINNING"] = 1
    h["YBINNING"] = 1
    h["CCD-TEMP"] = (-10.0, "[C] sensor temperature")
    h["SITELAT"] = ("-30 10 12", "site latitude")
    h["SITELONG"] = ("-70 48 00", "site longitude (east positive)")
    h["SWCREATE"] = ("rpp_tasks.sim.longslit", "software")
    if obj is not None:
        h["OBJECT"] = (obj, "target")
    if ra is not None:
        h["OBJCTRA"] = (ra, "target right ascension")
        h["OBJCTDEC"] = (dec, "target declination")
    h["SYNTHET"] = (True, "rpp_tasks.sim.longslit frame")
    return h


def _detector(truth, rng, e_image, *, exptime_s, hot, bias_pattern, n_cosmics):
    """Electrons -> ADU with dark, Poisson, read noise, bias, cosmic rays and saturation."""
    g = truth.gain_e_per_adu
    dark = truth.dark_e_per_s * exptime_s * (1.0 + hot)
    mean_e = np.clip(e_image + dark, 0, None)
    e = rng.poisson(mean_e).astype(np.float32)
    e += rng.normal(0.0, truth.read_noise_e, e.shape).astype(np.float32)
    adu = e / np.float32(g) + np.float32(truth.bias_adu) + bias_pattern
    if n_cosmics:
        cr, _ = _add_cosmic_rays(rng, e.shape, n_cosmics, g)
        adu += cr
    return np.clip(adu, 0, 65535).astype(np.float32)


def make_longslit_night(
    *,
    shape=(400, 1200),
    targets=("HD 000001",),
    n_target=3,
    n_flat=5,
    n_dark=3,
    n_offset=3,
    exptime_s=600.0,
    star_peak_e=2.0e5,
    sky_e_per_px=60.0,
    dispersion_a_per_px=None,
    central_wavelength_a=5600.0,
    line_fwhm_px=4.0,
    tilt=0.02,
    curvature=None,
    trace_tilt=0.004,
    sigma_y_px=(2.0, 2.4),
    gain_e_per_adu=1.4,
    read_noise_e=9.0,
    cosmics_per_mpx_per_100s=15.0,
    lamp_elements=("Ne", "Ar"),
    lamp_peak_e=40000.0,
    date="2025-03-14",
    seed=0,
):
    """
    A night of synthetic long-slit frames with known truth.

    Parameters
    ----------
    shape : (int, int)
        (ny, nx); dispersion along x (NAXIS1).
    targets : sequence of str
        Target names; each gets ``n_target`` exposures.
    n_target, n_flat, n_dark, n_offset : int
        Frames of each role (one lamp frame).
    exptime_s : float
        Target exposure; darks match it, lamp 30 s, flats 5 s.
    star_peak_e : float
        Star continuum peak in e- per column (whole spatial profile) per exposure.
    sky_e_per_px : float
        Sky continuum in e- per pixel per target exposure.
    dispersion_a_per_px : float, optional
        Linear dispersion; default covers 3800-7400 A over the width.
    central_wavelength_a : float
        Wavelength of the central column on the reference row.
    line_fwhm_px : float
        FWHM of the line spread function.
    tilt, curvature : float
        Slit-image tilt (px of x per px of y) and curvature (px per px^2); curvature default
        gives a 1.5 px bow at the slit edges.
    trace_tilt : float
        Slope of the spectrum trace (px of y per px of x).
    sigma_y_px : (float, float)
        Spatial sigma at the first and last column.
    gain_e_per_adu, read_noise_e : float
    cosmics_per_mpx_per_100s : float
        Cosmic-ray hits per megapixel per 100 s of exposure.
    lamp_elements : sequence of str
    lamp_peak_e : float
        Brightest lamp line, e- per pixel at its peak row.
    date : str
        Night (UTC date of the first exposure, 23:00).
    seed : int

    Returns
    -------
    night : `LongslitNight`
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    x_c = (nx - 1) / 2.0
    d1 = dispersion_a_per_px if dispersion_a_per_px is not None else 3600.0 / nx
    d2 = 0.04 * d1 / nx  # ~1 % nonlinearity over the width
    d3 = -0.01 * d1 / nx**2
    coeffs = (float(central_wavelength_a), float(d1), float(d2), float(d3))
    y0 = 0.45 * ny
    slit = (int(0.04 * ny), int(0.96 * ny))
    half = (slit[1] - slit[0]) / 2.0
    curv = 1.5 / half**2 if curvature is None else curvature
    # lamp lines in range with lamp-like relative fluxes
    lam_lo = coeffs[0] - d1 * nx * 0.55
    lam_hi = coeffs[0] + d1 * nx * 0.55
    lines = lamp_lines(lamp_elements, wavelength_range_a=(lam_lo, lam_hi))
    imax = max(i for _, i, _ in lines) if lines else 1
    peak_to_total = (line_fwhm_px / 2.3548) * math.sqrt(2 * math.pi)
    lamp = tuple(
        (w, float(lamp_peak_e * peak_to_total * (i / imax) ** 0.8 * rng.uniform(0.7, 1.4)))
        for w, i, _ in lines
    )
    sky_flux = 40.0 * sky_e_per_px * peak_to_total
    truth = LongslitTruth(
        shape=(ny, nx),
        x_c=x_c,
        y_ref=y0,
        dispersion_coeffs=coeffs,
        tilt=float(tilt),
        tilt_slope=0.3 * float(tilt),
        curvature=float(curv),
        trace_coeffs=(y0, float(trace_tilt), 8.0 / nx**2),
        sigma_y_px=tuple(float(s) for s in sigma_y_px),
        line_fwhm_px=float(line_fwhm_px),
        gain_e_per_adu=float(gain_e_per_adu),
        read_noise_e=float(read_noise_e),
        bias_adu=1000.0,
        dark_e_per_s=0.02,
        sky_e_per_px=float(sky_e_per_px),
        star_peak_e=float(star_peak_e),
        exptime_s=float(exptime_s),
        lamp_lines=lamp,
        metal_lines=tuple(
            (w, d) for w, d in METAL_LINES_A if lam_lo + 30 * d1 < w < lam_hi - 30 * d1
        ),
        sky_lines=tuple((w, f * sky_flux) for w, f in SKY_LINES_A),
        slit_rows=slit,
        targets=tuple(targets),
    )

    # fixed detector signatures
    prnu = (1.0 + rng.normal(0, 0.01, shape)).astype(np.float32)
    hot = np.zeros(shape, dtype=np.float32)
    n_hot = max(1, ny * nx // 20000)
    hot.flat[rng.choice(ny * nx, n_hot, replace=False)] = rng.uniform(20, 200, n_hot)
    bias_pattern = np.broadcast_to(rng.normal(0, 2.0, nx).astype(np.float32)[None, :], shape).copy()
    yy = np.arange(ny, dtype=float)
    illum = np.where(
        (yy >= slit[0]) & (yy < slit[1]), 1.0 - 0.08 * ((yy - ny / 2) / (ny / 2)) ** 2, 0.002
    ).astype(np.float32)

    # wavelength-space column seen by every pixel, and fine grid for the spectra
    x = np.arange(nx, dtype=float)
    u_img = x[None, :] + truth.shift(x[None, :], yy[:, None])
    u_grid = np.arange(-60.0, nx + 60.0, 0.05)

    def _spread(kind, **kw):
        row = render_spectrum_row(truth, kind, u_grid, **kw)
        return np.interp(u_img, u_grid, row).astype(np.float32)

    sky2d = _spread("sky") * illum[:, None]
    lamp2d = _spread("lamp") * illum[:, None]
    flat2d = _spread("flat") * illum[:, None]

    # star: only rows near the trace carry flux
    y_lo = int(max(0, np.floor(truth.trace_y(x).min() - 12 * max(sigma_y_px))))
    y_hi = int(min(ny, np.ceil(truth.trace_y(x).max() + 12 * max(sigma_y_px)) + 1))
    rows = np.arange(y_lo, y_hi)
    w_sp = _spatial_weights(truth, x, rows)
    star_u = u_img[y_lo:y_hi]

    def t_iso(minutes):  # from 23:00 UTC on ``date``, past midnight into the next day
        import datetime as _dt

        t0 = _dt.datetime.fromisoformat(f"{date}T23:00:00")
        return (t0 + _dt.timedelta(minutes=int(minutes))).isoformat(timespec="seconds")

    n_cr = lambda t: int(round(cosmics_per_mpx_per_100s * ny * nx / 1e6 * t / 100.0))  # noqa: E731
    out_targets, star_true = {}, {}
    minute = 0
    for k, name in enumerate(targets):
        star_row = render_spectrum_row(truth, "star", u_grid, star_peak_e=star_peak_e / (k + 1))
        star = np.zeros(shape, dtype=np.float32)
        star[y_lo:y_hi] = (w_sp * np.interp(star_u, u_grid, star_row)).astype(np.float32)
        star_true[name] = star[y_lo:y_hi] * prnu[y_lo:y_hi] / np.float32(gain_e_per_adu)
        frames = []
        for _ in range(n_target):
            e_img = (star + sky2d) * prnu
            data = _detector(
                truth,
                rng,
                e_img,
                exptime_s=exptime_s,
                hot=hot,
                bias_pattern=bias_pattern,
                n_cosmics=n_cr(exptime_s),
            )
            ra = f"{(5 + 3 * k) % 24:02d} {14 + k:02d} 32.3"
            hdr = _header(
                truth,
                imagetyp="Light Frame",
                exptime_s=exptime_s,
                date_obs=t_iso(minute),
                obj=name,
                ra=ra,
                dec=f"-{8 + k:02d} 12 05",
            )
            frames.append((data, hdr))
            minute += int(math.ceil(exptime_s / 60.0)) + 1
        out_targets[name] = frames
    lamp_frames = [
        (
            _detector(
                truth,
                rng,
                lamp2d * prnu,
                exptime_s=30.0,
                hot=hot,
                bias_pattern=bias_pattern,
                n_cosmics=n_cr(30.0),
            ),
            _header(truth, imagetyp="Light Frame", exptime_s=30.0, date_obs=t_iso(minute)),
        )
    ]
    flats = [
        (
            _detector(
                truth,
                rng,
                flat2d * prnu,
                exptime_s=5.0,
                hot=hot,
                bias_pattern=bias_pattern,
                n_cosmics=n_cr(5.0),
            ),
            _header(truth, imagetyp="Flat Field", exptime_s=5.0, date_obs=t_iso(minute + 2)),
        )
        for _ in range(n_flat)
    ]
    zero = np.zeros(shape, dtype=np.float32)
    darks = [
        (
            _detector(
                truth,
                rng,
                zero,
                exptime_s=exptime_s,
                hot=hot,
                bias_pattern=bias_pattern,
                n_cosmics=n_cr(exptime_s),
            ),
            _header(truth, imagetyp="Dark Frame", exptime_s=exptime_s, date_obs=t_iso(minute + 5)),
        )
        for _ in range(n_dark)
    ]
    offsets = [
        (
            _detector(
                truth, rng, zero, exptime_s=0.0, hot=hot, bias_pattern=bias_pattern, n_cosmics=0
            ),
            _header(truth, imagetyp="Bias Frame", exptime_s=0.0, date_obs=t_iso(minute + 6)),
        )
        for _ in range(n_offset)
    ]
    truth.extra.update(
        {"prnu_sigma": 0.01, "illum_at_trace": float(illum[int(round(y0))]), "hot_pixels": n_hot}
    )
    return LongslitNight(
        targets=out_targets,
        lamp=lamp_frames,
        flat=flats,
        dark=darks,
        offset=offsets,
        truth=truth,
        star_true_adu=star_true,
    )


def _write(path, data, header):
    raw = np.clip(np.rint(data), 0, 65535).astype(np.uint16)
    fits.PrimaryHDU(data=raw, header=header).writeto(path, overwrite=True)


def write_longslit_session(folder, night, *, extension=".fits", bin_size=16, posy=None):
    """
    Write a night as a 2SPOT session: generic names plus ``last_obs.yaml``/``setup_config.yaml``.

    Names: ``<Target>-<i>``, ``<Target>_Neon-1``, ``Flat-<i>``, ``Dark-<i>``, ``Offset-<i>``
    (spaces in target names become ``_``). Every target shares the flats/darks/offsets; each
    target gets a copy of the lamp frame under its own prefix, as 2SPOT's automation does.

    Returns
    -------
    paths : dict
        Role -> list of written paths (``"target"`` maps name -> list).
    """
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"target": {}, "lamp": {}, "flat": [], "dark": [], "offset": []}
    obs = {}
    for name, frames in night.targets.items():
        stem = name.replace(" ", "_")
        paths["target"][name] = []
        for i, (d, h) in enumerate(frames, 1):
            p = folder / f"{stem}-{i}{extension}"
            _write(p, d, h)
            paths["target"][name].append(p)
        paths["lamp"][name] = []
        for i, (d, h) in enumerate(night.lamp, 1):
            p = folder / f"{stem}_Neon-{i}{extension}"
            _write(p, d, h)
            paths["lamp"][name].append(p)
        obs[name] = [
            name,
            f"{stem}-",
            len(frames),
            f"{stem}_Neon-",
            len(night.lamp),
            "Flat-",
            len(night.flat),
            "Dark-",
            len(night.dark),
            "Offset-",
            len(night.offset),
            "none",
        ]
    for role, frames, prefix in (
        ("flat", night.flat, "Flat-"),
        ("dark", night.dark, "Dark-"),
        ("offset", night.offset, "Offset-"),
    ):
        for i, (d, h) in enumerate(frames, 1):
            p = folder / f"{prefix}{i}{extension}"
            _write(p, d, h)
            paths[role].append(p)
    (folder / "last_obs.yaml").write_text(yaml.safe_dump(obs, sort_keys=False), encoding="utf-8")
    setup = {
        "working_path": str(folder),
        "batch_name": "last_obs",
        "file_extension": 0 if extension == ".fits" else 1,
        "calib_mode": 4,
        "bin_size": int(bin_size),
    }
    if posy is not None:
        setup["posy"] = int(posy)
    (folder / "setup_config.yaml").write_text(
        yaml.safe_dump(setup, sort_keys=False), encoding="utf-8"
    )
    return paths
