"""Long-slit calibration: offset/dark/flat masters and the 2-D calibrated frame with its variance.

The offset (bias) and dark masters are the imaging ones (`rpp_tasks.stages.calibration`: sigma-
clipped combination, dark as a rate in ADU/s scaled to each exposure). The long-slit **flat** is
different: a flat-lamp (tungsten) exposure carries the lamp's spectrum and the spectrograph's
throughput along the dispersion axis, which must not be divided into the science frames (it would
imprint the lamp's colour on every spectrum). `make_longslit_flat` combines the flats, then
divides every column by a smooth fit of the flat's spectral shape along the dispersion, keeping
only the pixel-to-pixel response and the slit illumination along the slit.

Frames are handled with the dispersion along axis 1 (x); `orient` turns a frame whose dispersion
runs along NAXIS2 into that layout.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from rpp_tasks.stages.calibration import (
    MasterFrame,
    make_master_bias,
    make_master_dark,
    make_master_flat,
)

__all__ = [
    "Calibrated2D",
    "FlatResult",
    "calibrate_longslit",
    "make_longslit_flat",
    "make_master_bias",
    "make_master_dark",
    "orient",
]

log = logging.getLogger(__name__)


def orient(data, dispersion_axis=1):
    """
    Array with the dispersion along axis 1 (x).

    Parameters
    ----------
    data : 2-D array
        As read from FITS (``data[y, x]``).
    dispersion_axis : {1, 2}
        FITS axis along which the wavelength changes: 1 = NAXIS1 (rows are spectra), 2 = NAXIS2.
    """
    data = np.asarray(data)
    if dispersion_axis == 1:
        return data
    if dispersion_axis == 2:
        return data.T
    msg = f"dispersion_axis must be 1 or 2, got {dispersion_axis!r}"
    raise ValueError(msg)


@dataclass(frozen=True)
class FlatResult:
    """Normalised long-slit flat.

    Attributes
    ----------
    master : `~rpp_tasks.stages.calibration.MasterFrame`
        ``image``: pixel response x slit illumination, median 1 over the illuminated rows;
        ``mask``: pixels with a response below ``min_response`` (set to 1).
    spectral_shape : numpy.ndarray
        The smooth lamp x throughput profile divided out (ADU, per column).
    illuminated_rows : (int, int)
        First and last+1 row whose flat level exceeds 20 % of the brightest row.
    """

    master: MasterFrame
    spectral_shape: np.ndarray = field(repr=False)
    illuminated_rows: tuple[int, int]

    def to_dict(self) -> dict:
        """JSON-safe summary."""
        return {**self.master.to_dict(), "illuminated_rows": list(self.illuminated_rows)}


def make_longslit_flat(
    stack,
    *,
    master_bias,
    master_dark_rate,
    exptimes_s,
    smooth_px=31,
    min_response=0.5,
    method="median",
    clip_sigma=3.0,
):
    """
    Flat from flat-lamp exposures, normalised along the dispersion.

    Each flat is bias- and dark-corrected and scaled to its median, the flats are combined
    (`~rpp_tasks.stages.calibration.make_master_flat`), then every column is divided by the lamp's
    spectral shape: the median over the illuminated rows, smoothed along x with a running median
    and a Gaussian of ``smooth_px``. What remains is the pixel-to-pixel response and the slit
    illumination along the slit, normalised to median 1 over the illuminated rows. Rows outside
    the slit image and pixels below ``min_response`` are set to 1 and flagged.

    Parameters
    ----------
    stack : sequence of 2-D arrays
        Raw flats (ADU), dispersion along x.
    master_bias, master_dark_rate : 2-D array or None
    exptimes_s : sequence of float
    smooth_px : int, optional
        Smoothing length of the spectral shape (px); longer than the pixel-to-pixel scale, shorter
        than the lamp's spectral structure.
    min_response : float, optional
    method, clip_sigma : see `~rpp_tasks.stages.calibration.combine_frames`

    Returns
    -------
    result : `FlatResult`
    """
    frames = [np.asarray(f, dtype=np.float32) for f in stack]
    if not frames:
        msg = "no flat frame to combine"
        raise ValueError(msg)
    # offset/dark subtraction, per-flat level scaling and clipped combination: the imaging master
    # flat (its mask: dead pixels)
    m = make_master_flat(
        frames,
        master_bias=master_bias,
        master_dark_rate=master_dark_rate,
        exptimes_s=exptimes_s,
        method=method,
        clip_sigma=clip_sigma,
        min_response=1e-3,  # only dead pixels: a flat lamp is faint at the blue end
    )
    image = np.where(m.mask, np.nan, m.image).astype(np.float32)
    flags = list(m.flags)
    n, n_rej, levels = m.n_frames, m.n_rejected_px, m.levels_adu
    t = np.asarray(exptimes_s, dtype=float).ravel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows outside the slit
        row_level = np.nanmedian(image, axis=1)
    lit = np.nan_to_num(row_level) > 0.2 * np.nanmax(row_level)
    rows = np.flatnonzero(lit)
    if rows.size < 3:
        msg = "flat: fewer than 3 illuminated rows"
        raise ValueError(msg)
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    shape_x = np.nanmedian(image[r0:r1], axis=0)
    shape_x = ndimage.median_filter(shape_x, size=max(3, smooth_px // 3), mode="nearest")
    shape_x = ndimage.gaussian_filter1d(shape_x, smooth_px / 4.0, mode="nearest")
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = image / shape_x[None, :]
    norm /= np.float32(np.nanmedian(norm[r0:r1]))
    bad = np.zeros(norm.shape, bool)
    bad[r0:r1] = ~np.isfinite(norm[r0:r1]) | (norm[r0:r1] < min_response)
    norm[bad] = 1.0
    norm[:r0] = 1.0  # outside the slit image: nothing to correct
    norm[r1:] = 1.0
    master = MasterFrame(
        "flat",
        norm.astype(np.float32),
        bad,
        n,
        n_rej,
        method,
        clip_sigma,
        float(t.mean()),
        tuple(levels),
        tuple(flags),
    )
    return FlatResult(
        master=master, spectral_shape=shape_x.astype(np.float32), illuminated_rows=(r0, r1)
    )


@dataclass(frozen=True)
class Calibrated2D:
    """A calibrated 2-D spectrum (dispersion along x).

    Attributes
    ----------
    data : numpy.ndarray
        ``(raw - offset - dark_rate * t) / flat`` (float32, ADU).
    variance : numpy.ndarray
        Per-pixel variance (ADU^2): read noise plus Poisson noise of the offset-subtracted signal,
        divided by flat^2.
    mask : numpy.ndarray
        bool: saturated (on the raw frame), non-finite, bad flat pixels.
    saturated : numpy.ndarray
        bool: raw value >= saturation.
    flags : tuple of str
        ``"no_offset"``, ``"no_dark"``, ``"no_flat"``, ``"dark_includes_offset"``.
    """

    data: np.ndarray = field(repr=False)
    variance: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    saturated: np.ndarray = field(repr=False)
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-safe summary (without the arrays)."""
        return {
            "n_masked_px": int(np.count_nonzero(self.mask)),
            "n_saturated_px": int(np.count_nonzero(self.saturated)),
            "flags": list(self.flags),
        }


def calibrate_longslit(
    raw,
    *,
    exptime_s,
    gain_e_per_adu,
    read_noise_e,
    saturation_adu,
    master_bias=None,
    master_dark_rate=None,
    flat=None,
    flat_mask=None,
):
    """
    Offset, dark and flat correction of one raw 2-D spectrum, with its variance.

    Parameters
    ----------
    raw : 2-D array
        ADU, dispersion along x.
    exptime_s : float
    gain_e_per_adu, read_noise_e, saturation_adu : float
    master_bias : 2-D array, optional
    master_dark_rate : 2-D array, optional
        ADU/s (without an offset master it includes ``offset / t_dark``: exact only for frames of
        the dark's exposure, flagged).
    flat : 2-D array, optional
        Normalised long-slit flat (`make_longslit_flat`).
    flat_mask : 2-D bool array, optional

    Returns
    -------
    result : `Calibrated2D`
    """
    raw = np.asarray(raw, dtype=np.float32)
    flags = []
    sat = raw >= np.float32(saturation_adu)
    signal = raw.copy()
    if master_bias is not None:
        signal -= np.asarray(master_bias, np.float32)
    else:
        flags.append("no_offset")
    poisson = signal.copy()  # offset-subtracted: signal + dark current (electrons / gain)
    if master_dark_rate is not None:
        signal -= np.asarray(master_dark_rate, np.float32) * np.float32(exptime_s)
        if master_bias is None:
            flags.append("dark_includes_offset")
            poisson = signal.copy()  # the offset is unknown: Poisson term from the signal only
    else:
        flags.append("no_dark")
    g = np.float32(gain_e_per_adu)
    rn_adu2 = np.float32((read_noise_e / gain_e_per_adu) ** 2)
    var = rn_adu2 + np.clip(poisson, 0, None) / g
    mask = sat | ~np.isfinite(signal)
    if flat is not None:
        f = np.asarray(flat, np.float32)
        signal /= f
        var /= f * f
        if flat_mask is not None:
            mask |= np.asarray(flat_mask, bool)
    else:
        flags.append("no_flat")
    return Calibrated2D(
        data=signal, variance=var.astype(np.float32), mask=mask, saturated=sat, flags=tuple(flags)
    )
