"""From per-exposure spectra on the detector's columns to one spectrum per target and night.

* `linear_grid` / `resample_to_grid`: a column's flux is turned into a flux density per A
  (divided by ``|d lambda / dx|``) and resampled onto a linear wavelength grid (the BeSS format:
  CRVAL1 + CDELT1) with specutils' ``FluxConservingResampler``, which propagates the variance.
* `combine_exposures`: exposures scaled to a common level (transparency and airmass change
  between exposures), inverse-variance weighted mean with per-pixel outlier rejection.
* `heliocentric_correction`: astropy's ``SkyCoord.radial_velocity_correction`` for the middle of
  the observation at the site (no network: IERS auto-download is off for the call).
* `instrumental_response` / `apply_response`: the observed spectrum of a reference star divided
  by its known spectrum, smoothed with the lines and telluric bands masked (BeSS practice);
  without one the spectrum is flagged as not flux-calibrated.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from rpp_tasks.spectra.linelists import BALMER_A, HELIUM_A, TELLURIC_BANDS_A

__all__ = [
    "Grid",
    "CombinedSpectrum",
    "linear_grid",
    "resample_to_grid",
    "combine_exposures",
    "heliocentric_correction",
    "instrumental_response",
    "apply_response",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    """Linear wavelength grid ``crval1 + cdelt1 * i`` (A), ``i = 0 .. n - 1``."""

    crval1: float
    cdelt1: float
    n: int

    @property
    def wavelength_a(self) -> np.ndarray:
        return self.crval1 + self.cdelt1 * np.arange(self.n)

    def to_dict(self) -> dict:
        return {"crval1": self.crval1, "cdelt1": self.cdelt1, "n": self.n}


def linear_grid(wavelength_ranges, *, step_a):
    """
    Grid covering the intersection of several exposures' ranges with a given step.

    Parameters
    ----------
    wavelength_ranges : sequence of (float, float)
    step_a : float
        CDELT1 (A), > 0.

    Returns
    -------
    grid : `Grid`
    """
    lo = max(min(r) for r in wavelength_ranges)
    hi = min(max(r) for r in wavelength_ranges)
    if not (step_a > 0 and hi - lo > 10 * step_a):
        msg = f"no common wavelength range ({lo:.1f}-{hi:.1f} A) for step {step_a!r}"
        raise ValueError(msg)
    start = math.ceil(lo / step_a) * step_a  # round start: grids of a night line up
    n = int(math.floor((hi - start) / step_a)) + 1
    return Grid(float(start), float(step_a), n)


def resample_to_grid(wavelength_a, flux, variance, grid):
    """
    Flux per column -> flux density per A on ``grid``, variance propagated.

    Parameters
    ----------
    wavelength_a : 1-D array
        Wavelength of each column (monotonic, either direction).
    flux, variance : 1-D arrays
        Per column.
    grid : `Grid`

    Returns
    -------
    flux, variance : numpy.ndarray
        Per A on the grid (NaN outside the input or where it is masked).
    """
    import astropy.units as u
    from astropy.nddata import VarianceUncertainty
    from specutils import Spectrum
    from specutils.manipulation import FluxConservingResampler

    lam = np.asarray(wavelength_a, float)
    f = np.asarray(flux, float)
    v = np.asarray(variance, float)
    if lam[0] > lam[-1]:
        lam, f, v = lam[::-1], f[::-1], v[::-1]
    if np.any(np.diff(lam) <= 0):
        msg = "wavelength solution is not monotonic over the detector"
        raise ValueError(msg)
    disp = np.abs(np.gradient(lam))
    dens = f / disp
    vd = v / disp**2
    bad = ~np.isfinite(dens) | ~np.isfinite(vd) | (vd <= 0)
    dens = np.where(bad, 0.0, dens)
    vd = np.where(bad, np.nanmedian(vd[~bad]) * 1e6 if (~bad).any() else 1.0, vd)
    spec = Spectrum(
        flux=dens * u.adu,
        spectral_axis=lam * u.AA,
        uncertainty=VarianceUncertainty(vd * u.adu**2),
        mask=bad,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = FluxConservingResampler(extrapolation_treatment="nan_fill")(
            spec, grid.wavelength_a * u.AA
        )
    of = np.asarray(out.flux.value, float)
    ov = np.asarray(out.uncertainty.represent_as(VarianceUncertainty).array, float)
    if out.mask is not None:
        m = np.asarray(out.mask, bool)
        of[m] = np.nan
        ov[m] = np.nan
    # grid pixels touched by a bad input column are unreliable
    if bad.any():
        badw = np.interp(grid.wavelength_a, lam, bad.astype(float)) > 0
        of[badw] = np.nan
        ov[badw] = np.nan
    return of, ov


@dataclass(frozen=True)
class CombinedSpectrum:
    """Weighted combination of a target's exposures on one grid.

    Attributes
    ----------
    flux, variance : numpy.ndarray
    n_used : numpy.ndarray
        Exposures combined at each pixel.
    scales : tuple of float
        Factor applied to each exposure (relative to the highest-S/N one).
    n_rejected_px : int
    snr_median : float
    """

    flux: np.ndarray = field(repr=False)
    variance: np.ndarray = field(repr=False)
    n_used: np.ndarray = field(repr=False)
    scales: tuple[float, ...]
    n_rejected_px: int
    snr_median: float

    def to_dict(self) -> dict:
        return {
            "n_exposures": len(self.scales),
            "scales": list(self.scales),
            "n_rejected_px": self.n_rejected_px,
            "snr_median": self.snr_median,
        }


def combine_exposures(fluxes, variances, *, clip_sigma=4.0, scale=True):
    """
    Inverse-variance weighted mean of exposures with outlier rejection.

    Each exposure is first scaled to the level of the highest-S/N one (median ratio over the
    pixels valid in both); with three exposures or more, a pixel further than ``clip_sigma``
    of its own error from the median of the exposures at that pixel is rejected.

    Parameters
    ----------
    fluxes, variances : sequence of 1-D arrays on the same grid
    clip_sigma : float, optional
    scale : bool, optional

    Returns
    -------
    combined : `CombinedSpectrum`
    """
    f = np.array(fluxes, dtype=float, ndmin=2)
    v = np.array(variances, dtype=float, ndmin=2)
    k = f.shape[0]
    ok = np.isfinite(f) & np.isfinite(v) & (v > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.array([np.nanmedian(f[i][ok[i]] / np.sqrt(v[i][ok[i]])) for i in range(k)])
    ref = int(np.nanargmax(snr)) if np.isfinite(snr).any() else 0
    scales = np.ones(k)
    if scale and k > 1:
        for i in range(k):
            both = ok[i] & ok[ref] & (f[ref] > 0) & (f[i] > 0)
            if both.sum() > 10:
                scales[i] = float(np.median(f[ref][both] / f[i][both]))
    fs = f * scales[:, None]
    vs = v * scales[:, None] ** 2
    use = ok.copy()
    n_rej = 0
    if k >= 3:
        # against the per-pixel median of the exposures (robust to the outlier itself)
        with np.errstate(invalid="ignore"):
            med = np.nanmedian(np.where(ok, fs, np.nan), axis=0)
            z = (fs - med[None, :]) / np.sqrt(np.where(ok, vs, np.inf))
        out = use & (np.abs(z) > clip_sigma)
        n_rej = int(out.sum())
        use &= ~out
    w = np.where(use, 1.0 / np.where(ok, vs, 1.0), 0.0)
    sw = w.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = (w * np.where(use, fs, 0.0)).sum(axis=0) / sw
        var = 1.0 / sw
    flux[sw == 0] = np.nan
    var[sw == 0] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        s = flux / np.sqrt(var)
    return CombinedSpectrum(
        flux=flux,
        variance=var,
        n_used=use.sum(axis=0),
        scales=tuple(float(x) for x in scales),
        n_rejected_px=n_rej,
        snr_median=float(np.nanmedian(s)) if np.isfinite(s).any() else float("nan"),
    )


def heliocentric_correction(*, ra_deg, dec_deg, time_iso, longitude_deg, latitude_deg, elevation_m):
    """
    Heliocentric radial-velocity correction (km/s) for a target seen from a site.

    Adding it to a measured (topocentric) radial velocity gives the heliocentric one; a
    wavelength scale is corrected by ``lambda (1 + v / c)``.

    Returns
    -------
    v_kms : float
    """
    import astropy.units as u
    from astropy.coordinates import EarthLocation, SkyCoord
    from astropy.time import Time
    from astropy.utils import iers

    with iers.conf.set_temp("auto_download", False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loc = EarthLocation.from_geodetic(
            longitude_deg * u.deg, latitude_deg * u.deg, elevation_m * u.m
        )
        c = SkyCoord(ra_deg * u.deg, dec_deg * u.deg, frame="icrs")
        v = c.radial_velocity_correction(
            kind="heliocentric", obstime=Time(time_iso, scale="utc"), location=loc
        )
    return float(v.to(u.km / u.s).value)


def _line_mask(wavelength_a, width_a):
    m = np.zeros(np.shape(wavelength_a), bool)
    for w in list(BALMER_A.values()) + list(HELIUM_A.values()):
        m |= np.abs(wavelength_a - w) < width_a
    for lo, hi in TELLURIC_BANDS_A.values():
        m |= (wavelength_a > lo) & (wavelength_a < hi)
    return m


def instrumental_response(wavelength_a, observed, ref_wavelength_a, ref_flux, *, smooth_a=150.0):
    """
    Instrumental response = observed / known spectrum of a reference star, smoothed.

    Balmer and He lines (+- 40 A) and telluric bands are masked and interpolated over before a
    Gaussian smoothing of ``smooth_a``; the response is normalised to median 1.

    Returns
    -------
    response : numpy.ndarray
        On ``wavelength_a`` (NaN outside the reference's range).
    """
    from scipy.ndimage import gaussian_filter1d

    lam = np.asarray(wavelength_a, float)
    ref = np.interp(lam, ref_wavelength_a, ref_flux, left=np.nan, right=np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.asarray(observed, float) / ref
    good = np.isfinite(r) & (r > 0) & ~_line_mask(lam, 40.0)
    if good.sum() < 10:
        msg = "reference spectrum does not overlap the observation"
        raise ValueError(msg)
    rr = np.interp(lam, lam[good], r[good])
    step = float(np.median(np.abs(np.diff(lam))))
    rr = gaussian_filter1d(rr, smooth_a / step / 2.3548, mode="nearest")
    rr /= np.median(rr[good])
    rr[~np.isfinite(ref)] = np.nan
    return rr


def apply_response(flux, variance, response):
    """Divide a spectrum (and its variance) by the instrumental response."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return flux / response, variance / response**2
