"""Instrument-signature removal: master bias / dark / flat, their library, and frame calibration.

Pure functions on arrays: ``combine_frames``, ``make_master_*``, ``calibrate_image``. Master files
and their library are `rpp_tasks.stages.master_library`; the masters stage that reads a session's
calibration frames is `rpp_tasks.stages.masters`.

Calibration model (all images in ADU, float32)::

    calibrated = (raw - bias - dark_rate * exptime_s) / flat

* The master **dark** is a dark-current *rate* in ADU/s (bias subtracted, divided by each dark's
  exposure before combining), so it scales to any science exposure. Without a master bias the rate
  still contains ``bias / t_dark``: it is then exact only for science frames of the dark's exposure
  (flag ``"dark_includes_bias"``), which is the common CMOS "matching darks, no bias" practice.
* The master **flat** is normalised to median 1: every flat is bias- and dark-corrected and divided
  by its own median before the combination, the result is divided by its median again. Pixels with
  a response below ``min_response`` (or not finite) are set to 1 and flagged in a bad-pixel mask.
* **Saturation** is detected on the raw frame, before any arithmetic (``raw >= saturation_adu``),
  and kept in the output mask. A saturated pixel also keeps a calibrated value of at least
  ``saturation_adu``: its true value is unknown (at least what was measured), and every later
  level test (the catalogue's ``saturated`` flag, the choice of PSF stars, L.A.Cosmic's
  ``satlevel``) must still see it saturated after the bias was subtracted or the flat divided.
* Without a master bias or dark, the camera's known black level (``camera.bias_level_adu`` or
  the header's ``BLKLEVEL``, scaled by the software binning) is subtracted instead, and the
  saturation level of the calibrated image is lowered by the same amount.
* Missing masters are allowed: the frame is still reduced and the result says what was skipped
  (``"no_bias"``, ``"no_dark"``, ``"flat_missing"``).

Master library
--------------
`rpp_tasks.stages.master_library.MasterLibrary` is a folder of master FITS files with an
``index.json`` (camera, kind, binning, band, exposure, MJD, number of frames, path).
`rpp_tasks.stages.masters.run_masters` adds every master it builds to the library, and when a
session has no calibration frames of a kind it takes the library master of the same camera and
binning (and band, for flats) nearest in time, optionally within ``max_age_days``. The choice is
recorded in the returned summary (``source="library"``, ``delta_days``), which the pipeline writes
to ``masters.json``; a frame calibrated without any master carries the flags.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "MASTER_KINDS",
    "CalibrationResult",
    "MasterFrame",
    "calibrate_image",
    "combine_frames",
    "make_master_bias",
    "make_master_dark",
    "make_master_flat",
]

log = logging.getLogger(__name__)

MASTER_KINDS = ("bias", "dark", "flat")
_MAD_TO_SIGMA = 1.482602218505602
_CHUNK_ELEMENTS = 4_000_000  # float32 elements per chunk of the cube (16 MB)


# ---------------------------------------------------------------------------------- combination
def combine_frames(stack, *, method="median", clip_sigma=3.0, scale=None):
    """
    Combine frames pixel by pixel with median/MAD sigma clipping.

    At each pixel the values of the N frames are compared with their median; values further than
    ``clip_sigma`` robust standard deviations (``1.4826 * MAD``) are rejected, then the remaining
    values are averaged (``"mean"``) or their median is taken (``"median"``). The per-pixel
    MAD of a few frames is noisy (it can be 0 with integer data), so it is floored at the median
    of the per-pixel values over the current block of rows. One clipping pass; no clipping with
    fewer than 3 frames. Rows are processed in blocks so that memory stays at the input plus
    ~16 MB (a 20 x 2048 x 2048 stack is fine).

    Parameters
    ----------
    stack : sequence of 2-D arrays or 3-D array
        The frames, all with the same shape. NaN pixels are ignored.
    method : {"median", "mean"}, optional
    clip_sigma : float or None, optional
        Rejection threshold; ``None`` or ``inf`` disables the clipping.
    scale : sequence of float, optional
        Multiplicative factor per frame applied before combining (e.g. ``1 / median`` for flats).

    Returns
    -------
    image : numpy.ndarray
        float32 combined image (NaN where no value survived).
    n_used : int
        Number of frames combined.
    n_rejected_px : int
        Number of (frame, pixel) values rejected by the clipping.

    Raises
    ------
    ValueError
        Empty stack, frames of different shapes or not 2-D, unknown ``method``, bad ``scale``.
    """
    frames = (
        [np.asarray(f) for f in stack]
        if not (isinstance(stack, np.ndarray) and stack.ndim == 3)
        else list(stack)
    )
    if not frames:
        msg = "stack is empty: nothing to combine"
        raise ValueError(msg)
    shape = frames[0].shape
    if len(shape) != 2 or any(f.shape != shape for f in frames):
        msg = f"all frames must be 2-D with the same shape, got {sorted({f.shape for f in frames})}"
        raise ValueError(msg)
    if method not in ("median", "mean"):
        msg = f"method must be 'median' or 'mean', got {method!r}"
        raise ValueError(msg)
    n = len(frames)
    if scale is None:
        scale = np.ones(n, dtype=np.float32)
    else:
        scale = np.asarray(scale, dtype=np.float32).ravel()
        if scale.size != n or not np.all(np.isfinite(scale)):
            msg = f"scale must be {n} finite factors, got {scale!r}"
            raise ValueError(msg)
    clip = clip_sigma is not None and np.isfinite(clip_sigma) and n >= 3
    if clip and clip_sigma <= 0:
        msg = f"clip_sigma must be > 0, got {clip_sigma}"
        raise ValueError(msg)

    ny, nx = shape
    out = np.empty(shape, dtype=np.float32)
    rows = max(1, _CHUNK_ELEMENTS // (n * nx))
    n_rej = 0
    cube = np.empty((n, min(rows, ny), nx), dtype=np.float32)
    for r0 in range(0, ny, rows):
        r1 = min(ny, r0 + rows)
        c = cube[:, : r1 - r0]
        for i, f in enumerate(frames):
            np.multiply(f[r0:r1], scale[i], out=c[i], casting="unsafe")
        if n == 1:
            out[r0:r1] = c[0]
            continue
        srt = np.sort(c, axis=0)  # NaN sort last
        k = n - np.count_nonzero(np.isnan(c), axis=0)
        med = _median_of_sorted(srt, k)
        if clip:
            dev = np.abs(c - med)
            mad = _median_of_sorted(np.sort(dev, axis=0), k)
            sig = _MAD_TO_SIGMA * mad
            floor = np.nanmedian(sig) if np.isfinite(sig).any() else 0.0
            np.maximum(sig, floor, out=sig)
            rej = dev > clip_sigma * sig  # NaN compares False
            n_rej += int(np.count_nonzero(rej))
            if rej.any():
                c[rej] = np.nan
                k = k - np.count_nonzero(rej, axis=0)
                if method == "median":
                    srt = np.sort(c, axis=0)
                    med = _median_of_sorted(srt, k)
        if method == "median":
            out[r0:r1] = med
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                out[r0:r1] = np.nansum(c, axis=0) / k
            out[r0:r1][k == 0] = np.nan
    return out, n, n_rej


def _median_of_sorted(srt, k):
    """Median along axis 0 of an array sorted with NaNs last, ``k`` finite values per pixel."""
    lo = np.clip((k - 1) // 2, 0, None)
    hi = np.clip(k // 2, 0, srt.shape[0] - 1)
    a = np.take_along_axis(srt, lo[None], axis=0)[0]
    b = np.take_along_axis(srt, hi[None], axis=0)[0]
    med = 0.5 * (a + b)
    med[k == 0] = np.nan
    return med


# ---------------------------------------------------------------------------------- masters
@dataclass(frozen=True)
class MasterFrame:
    """A master calibration image and its provenance.

    Attributes
    ----------
    kind : str
        ``"bias"``, ``"dark"`` (ADU/s) or ``"flat"`` (normalised to median 1).
    image : numpy.ndarray
        float32 master.
    mask : numpy.ndarray or None
        bool bad-pixel mask (flats: non-positive / low response pixels).
    n_frames, n_rejected_px : int
        Frames combined and (frame, pixel) values clipped.
    method : str
    clip_sigma : float or None
    exptime_s : float or None
        Mean exposure of the input frames (darks, flats).
    levels_adu : tuple of float
        Flats: median level of each input flat after bias/dark subtraction.
    flags : tuple of str
    """

    kind: str
    image: np.ndarray = field(repr=False)
    mask: np.ndarray | None = field(repr=False, default=None)
    n_frames: int = 0
    n_rejected_px: int = 0
    method: str = "median"
    clip_sigma: float | None = 3.0
    exptime_s: float | None = None
    levels_adu: tuple[float, ...] = ()
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-safe summary (without the arrays)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("image", "mask")}
        d["levels_adu"] = list(self.levels_adu)
        d["flags"] = list(self.flags)
        d["median"] = float(np.nanmedian(self.image))
        d["n_bad_px"] = int(np.count_nonzero(self.mask)) if self.mask is not None else 0
        return d


def make_master_bias(stack, *, method="median", clip_sigma=3.0):
    """
    Master bias: sigma-clipped combination of bias frames (ADU).

    Parameters
    ----------
    stack : sequence of 2-D arrays
    method, clip_sigma : see `combine_frames`

    Returns
    -------
    master : `MasterFrame`
    """
    image, n, n_rej = combine_frames(stack, method=method, clip_sigma=clip_sigma)
    flags = ("single_frame",) if n == 1 else ()
    return MasterFrame("bias", image, None, n, n_rej, method, clip_sigma, 0.0, (), flags)


def make_master_dark(stack, *, exptimes_s, master_bias, method="median", clip_sigma=3.0):
    """
    Master dark-current rate in ADU/s.

    Each dark is bias-subtracted and divided by its exposure time, then the rates are combined,
    so darks of different exposures can be mixed and the master scales with exposure.

    Parameters
    ----------
    stack : sequence of 2-D arrays
        Raw darks (ADU).
    exptimes_s : sequence of float
        Exposure of each dark, > 0.
    master_bias : 2-D array or None
        Without it the rate includes ``bias / t_dark`` (flag ``"dark_includes_bias"``).
    method, clip_sigma : see `combine_frames`

    Returns
    -------
    master : `MasterFrame`

    Raises
    ------
    ValueError
        Exposure count or values invalid, shapes that differ from the bias.
    """
    frames = list(stack)
    t = np.asarray(exptimes_s, dtype=float).ravel()
    if t.size != len(frames) or not np.all(np.isfinite(t)) or np.any(t <= 0):
        msg = f"exptimes_s must be {len(frames)} positive exposures, got {list(t)}"
        raise ValueError(msg)
    flags = []
    if master_bias is None:
        flags.append("dark_includes_bias")
        log.warning("master dark without master bias: rate includes bias / t_dark")
        bias = np.float32(0.0)
    else:
        bias = np.asarray(master_bias, dtype=np.float32)
        _check_same_shape(frames, bias, "master_bias")
    rates = [(np.asarray(f, dtype=np.float32) - bias) / np.float32(ti) for f, ti in zip(frames, t)]
    image, n, n_rej = combine_frames(rates, method=method, clip_sigma=clip_sigma)
    if n == 1:
        flags.append("single_frame")
    return MasterFrame(
        "dark", image, None, n, n_rej, method, clip_sigma, float(t.mean()), (), tuple(flags)
    )


def make_master_flat(
    stack,
    *,
    master_bias,
    master_dark_rate,
    exptimes_s,
    method="median",
    clip_sigma=3.0,
    min_response=0.1,
):
    """
    Master flat normalised to median 1, with a bad-pixel mask.

    Each flat is corrected ``f - bias - dark_rate * t`` and divided by its median before the
    combination (so twilight flats of different levels combine), the result is divided by its
    median again. Pixels with a response below ``min_response`` or not finite are set to 1 and
    flagged in ``mask`` (dividing by 1 leaves them unchanged; the mask follows them downstream).

    Parameters
    ----------
    stack : sequence of 2-D arrays
        Raw flats (ADU).
    master_bias : 2-D array or None
    master_dark_rate : 2-D array or None
        ADU/s.
    exptimes_s : sequence of float
        Exposure of each flat (used with the dark).
    method, clip_sigma : see `combine_frames`
    min_response : float, optional
        Lowest acceptable normalised response.

    Returns
    -------
    master : `MasterFrame`
        Flags ``"no_bias"``, ``"no_dark"``, ``"dropped_<i>_non_positive_level"``.

    Raises
    ------
    ValueError
        If no flat has a positive median level after correction, or on shape/exposure problems.
    """
    frames = list(stack)
    t = np.asarray(exptimes_s, dtype=float).ravel()
    if t.size != len(frames) or not np.all(np.isfinite(t)) or np.any(t < 0):
        msg = f"exptimes_s must be {len(frames)} non-negative exposures, got {list(t)}"
        raise ValueError(msg)
    flags = []
    offset = [np.float32(0.0)] * len(frames)
    if master_bias is None:
        flags.append("no_bias")
        bias = np.float32(0.0)
    else:
        bias = np.asarray(master_bias, dtype=np.float32)
        _check_same_shape(frames, bias, "master_bias")
    if master_dark_rate is None:
        flags.append("no_dark")
    else:
        dark = np.asarray(master_dark_rate, dtype=np.float32)
        _check_same_shape(frames, dark, "master_dark_rate")
        offset = [dark * np.float32(ti) for ti in t]
    corrected, levels, scale = [], [], []
    for i, f in enumerate(frames):
        c = np.asarray(f, dtype=np.float32) - bias - offset[i]
        level = float(np.nanmedian(c))
        if not level > 0:
            flags.append(f"dropped_{i}_non_positive_level")
            log.warning("flat %d dropped: median level %.3g ADU after bias/dark", i, level)
            continue
        corrected.append(c)
        levels.append(level)
        scale.append(1.0 / level)
    if not corrected:
        msg = "no flat has a positive median level after bias/dark subtraction"
        raise ValueError(msg)
    image, n, n_rej = combine_frames(corrected, method=method, clip_sigma=clip_sigma, scale=scale)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(image) | (image < min_response * np.nanmedian(image))
    if bad.all():
        msg = "master flat has no pixel with a usable response"
        raise ValueError(msg)
    image /= np.float32(np.median(image[~bad]))  # median 1 over the good pixels
    bad |= image < min_response
    image[bad] = 1.0
    if n == 1:
        flags.append("single_frame")
    return MasterFrame(
        "flat",
        image,
        bad,
        n,
        n_rej,
        method,
        clip_sigma,
        float(t.mean()),
        tuple(levels),
        tuple(flags),
    )


def _check_same_shape(frames, master, name):
    if any(np.shape(f) != master.shape for f in frames):
        shapes = sorted({np.shape(f) for f in frames})
        msg = f"{name} shape {master.shape} differs from the frames {shapes}"
        raise ValueError(msg)


# ---------------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class CalibrationResult:
    """A calibrated frame.

    Attributes
    ----------
    image : numpy.ndarray
        float32, ADU (flat-fielded).
    mask : numpy.ndarray
        bool, True on saturated (raw), non-finite and flat-bad pixels.
    steps : tuple of str
        What was applied, in order (suited to FITS HISTORY).
    flags : tuple of str
        ``"no_bias"``, ``"no_dark"``, ``"flat_missing"``, ``"dark_scaled_from_<t>_s"``,
        ``"no_saturation_level"``.
    n_saturated, n_masked : int
    black_level_adu : float
        Pedestal subtracted in place of a master bias (0 when none): the saturation level of the
        image is that much lower than the raw one.
    """

    image: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    steps: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    n_saturated: int = 0
    n_masked: int = 0
    black_level_adu: float = 0.0

    def to_dict(self) -> dict:
        return {
            "steps": list(self.steps),
            "flags": list(self.flags),
            "n_saturated": self.n_saturated,
            "n_masked": self.n_masked,
            "black_level_adu": self.black_level_adu,
        }


def calibrate_image(
    data,
    *,
    exptime_s,
    bias=None,
    dark_rate=None,
    flat=None,
    saturation_adu=None,
    dark_exptime_s=None,
    bad_pixel_mask=None,
    black_level_adu=None,
    black_level_source="camera.bias_level_adu",
):
    """
    Calibrate one raw frame: ``(raw - bias - dark_rate * exptime_s) / flat``.

    Without a master bias and dark, a known ``black_level_adu`` (the camera's pedestal) stands for
    the bias; a dark made without bias already carries the pedestal, so it is then not subtracted.

    Parameters
    ----------
    data : 2-D array
        Raw frame in ADU.
    exptime_s : float or None
        Exposure of the frame; required (>= 0) when ``dark_rate`` is given.
    bias, dark_rate, flat : 2-D array, optional
        Masters (ADU, ADU/s, normalised). Missing ones are skipped and flagged.
    saturation_adu : float, optional
        Raw level from which a pixel is saturated (tested before any arithmetic).
    dark_exptime_s : float, optional
        Exposure of the darks behind ``dark_rate``; a flag records the scaling when it differs
        from ``exptime_s`` by more than 1 %.
    bad_pixel_mask : 2-D bool array, optional
        Known bad pixels (e.g. the master flat's mask), merged into the output mask.
    black_level_adu : float, optional
        Constant pedestal of ``data`` in ADU (already scaled for any software binning), subtracted
        when neither ``bias`` nor ``dark_rate`` is given; saturated pixels are then kept at or
        above ``saturation_adu - black_level_adu``, the saturation level of the calibrated image.
    black_level_source : str, optional
        Where the level comes from, for the step record.

    Returns
    -------
    result : `CalibrationResult`

    Raises
    ------
    ValueError
        Non-2-D data, master shapes that differ (e.g. another binning), missing/negative exposure
        with a dark.
    """
    raw = np.asarray(data)
    if raw.ndim != 2:
        msg = f"data must be a 2-D image, got shape {raw.shape}"
        raise ValueError(msg)
    for name, m in (
        ("bias", bias),
        ("dark_rate", dark_rate),
        ("flat", flat),
        ("bad_pixel_mask", bad_pixel_mask),
    ):
        if m is not None and np.shape(m) != raw.shape:
            msg = f"{name} shape {np.shape(m)} differs from data shape {raw.shape} (binning/crop?)"
            raise ValueError(msg)
    steps, flags = [], []
    mask = ~np.isfinite(raw)
    n_sat = 0
    if saturation_adu is not None and np.isfinite(saturation_adu):
        sat = raw >= saturation_adu
        n_sat = int(np.count_nonzero(sat))
        mask |= sat
        steps.append(f"saturation mask: raw >= {saturation_adu:g} ADU ({n_sat} px)")
    else:
        flags.append("no_saturation_level")
    image = np.array(raw, dtype=np.float32)
    black = black_level_adu if bias is None and dark_rate is None else None
    black = float(black) if black is not None and np.isfinite(black) and black > 0 else 0.0
    if bias is not None:
        image -= np.asarray(bias, dtype=np.float32)
        steps.append("bias subtracted")
    else:
        flags.append("no_bias")
        if black:
            image -= np.float32(black)
            steps.append(f"black level {black:g} ADU subtracted ({black_level_source})")
    if dark_rate is not None:
        if exptime_s is None or not np.isfinite(exptime_s) or exptime_s < 0:
            msg = f"exptime_s must be a non-negative exposure to scale the dark, got {exptime_s!r}"
            raise ValueError(msg)
        image -= np.asarray(dark_rate, dtype=np.float32) * np.float32(exptime_s)
        steps.append(f"dark subtracted (rate x {exptime_s:g} s)")
        if dark_exptime_s is not None and not math.isclose(dark_exptime_s, exptime_s, rel_tol=0.01):
            flags.append(f"dark_scaled_from_{dark_exptime_s:g}_s")
    else:
        flags.append("no_dark")
    if flat is not None:
        f = np.asarray(flat, dtype=np.float32)
        bad_flat = ~np.isfinite(f) | (f <= 0)
        mask |= bad_flat
        image /= np.where(bad_flat, np.float32(1.0), f)
        steps.append("flat divided")
    else:
        flags.append("flat_missing")
    if n_sat:
        # bias/dark subtraction and the flat moved the saturated pixels below the level: keep them
        # at or above it, so that every later level test still sees them saturated
        level = saturation_adu - black
        np.maximum(image, np.float32(level), out=image, where=sat)
        steps.append(f"saturated pixels kept >= {level:g} ADU")
    if bad_pixel_mask is not None:
        mask |= np.asarray(bad_pixel_mask, dtype=bool)
    return CalibrationResult(
        image, mask, tuple(steps), tuple(flags), n_sat, int(np.count_nonzero(mask)), black
    )
