"""What the photometry modules share: aperture labels, input checks, pixel positions and
magnitudes."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["APERTURE_LABELS"]


#: Aperture labels of the catalogue columns.
APERTURE_LABELS = ("1p1fwhm", "1p3fwhm", "fixed")
_MAG_K = 2.5 / math.log(10.0)
_MAX_DENSE = (
    1200  # unknowns in one overlapping group solved densely; larger -> sparse + approx errors
)


def _check_inputs(data_sub, rms, mask, func):
    data = np.asarray(data_sub)
    if data.ndim != 2:
        raise ValueError(f"{func}: data_sub must be 2-D, got shape {data.shape}")
    if np.ndim(rms) == 0:
        rms = np.full(data.shape, float(rms))
    rms = np.asarray(rms)
    if rms.shape != data.shape:
        raise ValueError(
            f"{func}: rms shape {rms.shape} does not match data_sub shape {data.shape}"
        )
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape:
            raise ValueError(
                f"{func}: mask shape {mask.shape} does not match data_sub shape {data.shape}"
            )
    return data, rms, mask


def _xy(sources, func):
    for xc, yc in (("x_centroid", "y_centroid"), ("xcentroid", "ycentroid"), ("x", "y")):
        if xc in sources.colnames and yc in sources.colnames:
            return np.asarray(sources[xc], np.float64), np.asarray(sources[yc], np.float64)
    raise ValueError(
        f"{func}: sources need x_centroid and y_centroid columns, got {sources.colnames}"
    )


def _mags(flux, flux_err, exptime_s):
    flux = np.asarray(flux, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        pos = flux > 0
        mag = np.where(pos, -2.5 * np.log10(np.where(pos, flux, 1.0) / exptime_s), np.nan)
        mag_err = np.where(pos, _MAG_K * flux_err / np.where(pos, flux, 1.0), np.nan)
        snr = np.where(flux_err > 0, flux / flux_err, np.nan)
    return mag, mag_err, snr


def _check_positive(func, **kw):
    for k, v in kw.items():
        if v is None or not np.isfinite(v) or v <= 0:
            raise ValueError(f"{func}: {k} must be a positive number, got {v!r}")


def _fit_xy(table):
    """Fitted PSF positions, the detection centroids where the fit gave none."""
    x = np.asarray(table["x_psf"], float)
    y = np.asarray(table["y_psf"], float)
    xc, yc = _xy(table, "psf_photometry_with_residual_detection")
    bad = ~(np.isfinite(x) & np.isfinite(y))
    return np.where(bad, xc, x), np.where(bad, yc, y)


#: ``sum(w) - sum(w^2)`` over the pixels a circle of radius ``r`` covers in part, per px of
#: radius (exact overlaps, averaged over the centre's pixel phase: 1.00-1.06 r for r = 0.8-12 px,
#: phase scatter 0.07-0.5 px^2)
_EDGE_W2_PER_PX = 1.04


def _sky_variance_fraction(area, r):
    """``sum(w^2) / sum(w)`` of the pixel overlaps ``w`` of a circle of radius ``r`` px covering
    ``area`` px^2 (0.72 at r = 1.2 px, 0.93 at 4.7 px, 0.96 at 8 px): the pixel noise of an
    exact-overlap aperture sum is ``sum(w^2 var)``, not ``sum(w var)``."""
    area = np.asarray(area, float)
    return np.clip(1.0 - _EDGE_W2_PER_PX * float(r) / np.maximum(area, 1e-12), 0.25, 1.0)
