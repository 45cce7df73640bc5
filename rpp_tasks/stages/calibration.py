"""Instrument-signature removal: master bias / dark / flat, their library, and frame calibration.

Pure functions work on arrays (``combine_frames``, ``make_master_*``, ``calibrate_image``); FITS
I/O lives in the small helpers (`write_master`, `load_master`), in `MasterLibrary` and in the
`run_masters` adapter.

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
* Missing masters are allowed: the frame is still reduced and the result says what was skipped
  (``"no_bias"``, ``"no_dark"``, ``"flat_missing"``).

Master library
--------------
`MasterLibrary` is a folder of master FITS files with an ``index.json`` (camera, kind, binning,
band, exposure, MJD, number of frames, path). `run_masters` adds every master it builds to the
library, and when a session has no calibration frames of a kind it takes the library master of the
same camera and binning (and band, for flats) nearest in time, optionally within ``max_age_days``.
The choice is recorded in the returned summary (``source="library"``, ``delta_days``), which the
pipeline writes to ``masters.json``; a frame calibrated without any master carries the flags.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from astropy.io import fits

__all__ = [
    "MASTER_KINDS",
    "CalibrationResult",
    "LibraryEntry",
    "LibraryMatch",
    "MasterFrame",
    "MasterLibrary",
    "calibrate_image",
    "combine_frames",
    "load_master",
    "make_master_bias",
    "make_master_dark",
    "make_master_flat",
    "run_masters",
    "write_master",
]

log = logging.getLogger(__name__)

MASTER_KINDS = ("bias", "dark", "flat")
_IMAGETYP = {"bias": "MASTER BIAS", "dark": "MASTER DARK", "flat": "MASTER FLAT"}
_BUNIT = {"bias": "adu", "dark": "adu / s", "flat": ""}
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
    """

    image: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    steps: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    n_saturated: int = 0
    n_masked: int = 0

    def to_dict(self) -> dict:
        return {
            "steps": list(self.steps),
            "flags": list(self.flags),
            "n_saturated": self.n_saturated,
            "n_masked": self.n_masked,
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
):
    """
    Calibrate one raw frame: ``(raw - bias - dark_rate * exptime_s) / flat``.

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
    if bias is not None:
        image -= np.asarray(bias, dtype=np.float32)
        steps.append("bias subtracted")
    else:
        flags.append("no_bias")
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
        np.maximum(image, np.float32(saturation_adu), out=image, where=sat)
        steps.append(f"saturated pixels kept >= {saturation_adu:g} ADU")
    if bad_pixel_mask is not None:
        mask |= np.asarray(bad_pixel_mask, dtype=bool)
    return CalibrationResult(
        image, mask, tuple(steps), tuple(flags), n_sat, int(np.count_nonzero(mask))
    )


# ---------------------------------------------------------------------------------- FITS helpers
def write_master(
    master, path, *, camera=None, binning=None, band=None, mjd=None, sources=(), overwrite=True
):
    """
    Write a `MasterFrame` as FITS: float32 primary image (+ ``MASK`` uint8 extension if any).

    The header carries ``IMAGETYP='MASTER BIAS'`` (DARK, FLAT), ``BUNIT``, ``NCOMBINE``,
    ``INSTRUME`` (camera), ``XBINNING``/``YBINNING``, ``FILTER``, ``MJD-OBS``, ``EXPTIME`` and
    HISTORY
    lines with the method, clipping and input file names.

    Returns
    -------
    path : Path
    """
    path = Path(path)
    hdr = fits.Header()
    hdr["IMAGETYP"] = (_IMAGETYP[master.kind], "rpp_tasks master calibration")
    hdr["RPPKIND"] = (master.kind, "master kind")
    hdr["BUNIT"] = _BUNIT[master.kind]
    hdr["NCOMBINE"] = (master.n_frames, "frames combined")
    if camera is not None:
        hdr["INSTRUME"] = str(camera)
    if binning is not None:
        bx, by = _norm_binning(binning)
        hdr["XBINNING"], hdr["YBINNING"] = bx, by
    if band is not None:
        hdr["FILTER"] = str(band)
    if mjd is not None:
        hdr["MJD-OBS"] = (float(mjd), "mean MJD of the input frames")
    if master.exptime_s is not None:
        hdr["EXPTIME"] = (float(master.exptime_s), "mean exposure of the inputs [s]")
    from rpp_tasks import __version__

    hdr.add_history(
        f"rpp_tasks {__version__}: {master.kind} master from {master.n_frames} frames, "
        f"{master.method} combine, clip {master.clip_sigma} sigma (median/MAD), "
        f"{master.n_rejected_px} values rejected"
    )
    if master.kind == "dark":
        hdr.add_history("dark current rate in ADU/s (bias subtracted, divided by EXPTIME)")
    if master.kind == "flat":
        hdr.add_history("each flat bias/dark corrected and normalised by its median; median 1")
    for flag in master.flags:
        hdr.add_history(f"flag: {flag}")
    for s in sources:
        hdr.add_history(f"input: {Path(s).name}")
    hdus = [fits.PrimaryHDU(np.asarray(master.image, dtype=np.float32), header=hdr)]
    if master.mask is not None:
        hdus.append(fits.ImageHDU(master.mask.astype(np.uint8), name="MASK"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fits.HDUList(hdus).writeto(tmp, overwrite=True)
    if path.exists() and not overwrite:
        tmp.unlink()
        msg = f"{path} exists"
        raise FileExistsError(msg)
    os.replace(tmp, path)
    return path


def load_master(path):
    """
    Read a master image: the primary HDU if it holds a 2-D image, else the ``IMAGE``/``SCI``
    extension, else the first 2-D image extension (LSST-style MEF masters: the image plane).

    Returns
    -------
    image : numpy.ndarray
        float32.
    header : astropy.io.fits.Header
        The primary header updated with the image extension's keywords.
    mask : numpy.ndarray or None
        bool from a ``MASK`` extension written by `write_master` (uint8), else None.
    """
    with fits.open(path, mode="readonly", memmap=False) as hdul:
        candidates = [h for h in hdul if h.is_image and h.data is not None and h.data.ndim == 2]
        if not candidates:
            msg = f"{path}: no 2-D image HDU"
            raise ValueError(msg)
        named = [h for h in candidates if h.name in ("PRIMARY", "IMAGE", "SCI")]
        hdu = (named or candidates)[0]
        image = np.asarray(hdu.data, dtype=np.float32)
        header = hdul[0].header.copy()
        if hdu is not hdul[0]:
            for card in hdu.header.cards:
                if card.keyword not in ("", "COMMENT", "HISTORY") and not _structural(card.keyword):
                    header[card.keyword] = (card.value, card.comment)
        mask = None
        if "MASK" in hdul and hdul["MASK"].data is not None and hdul["MASK"].data.dtype == np.uint8:
            mask = np.asarray(hdul["MASK"].data, dtype=bool)
    return image, header, mask


def _structural(key):
    return (
        key in ("SIMPLE", "XTENSION", "BITPIX", "EXTEND", "PCOUNT", "GCOUNT", "BSCALE", "BZERO")
        or key.startswith("NAXIS")
        or key.startswith("Z")
        or key.startswith("TTYPE")
        or key.startswith("TFORM")
    )


def _norm_binning(binning):
    if isinstance(binning, (int, np.integer)):
        return int(binning), int(binning)
    if isinstance(binning, str):
        parts = re.split(r"[x, ]+", binning.strip())
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    b = tuple(int(v) for v in binning)
    if len(b) != 2 or min(b) < 1:
        msg = f"binning must be (bx, by) with positive integers, got {binning!r}"
        raise ValueError(msg)
    return b


# ---------------------------------------------------------------------------------- library
@dataclass(frozen=True)
class LibraryEntry:
    """One master in the library index (``path`` relative to the library root)."""

    kind: str
    camera: str
    binning: tuple[int, int]
    band: str | None
    mjd: float
    path: str
    exptime_s: float | None = None
    n_frames: int | None = None
    added_utc: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["binning"] = list(self.binning)
        return d

    @classmethod
    def from_dict(cls, d) -> LibraryEntry:
        return cls(
            kind=d["kind"],
            camera=d["camera"],
            binning=tuple(d["binning"]),
            band=d.get("band"),
            mjd=float(d["mjd"]),
            path=d["path"],
            exptime_s=d.get("exptime_s"),
            n_frames=d.get("n_frames"),
            added_utc=d.get("added_utc", ""),
        )


@dataclass(frozen=True)
class LibraryMatch:
    """The master chosen by `MasterLibrary.find_nearest` (``path`` absolute)."""

    path: Path
    mjd: float
    delta_days: float
    kind: str
    camera: str
    binning: tuple[int, int]
    band: str | None = None
    exptime_s: float | None = None
    n_frames: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["binning"] = list(self.binning)
        return d


class MasterLibrary:
    """
    A folder of master calibrations with a JSON index, for sessions without calibration frames.

    Layout: ``<root>/index.json`` and
    ``<root>/<kind>/<kind>_<camera>_<bx>x<by>[_<band>]_<mjd>.fits``.
    Masters added from a path are copied in, so the library does not depend on session folders.
    The index is rewritten atomically under an exclusive file lock (concurrent tasks may add).

    Parameters
    ----------
    root : str or Path
        Library folder (created if missing).
    """

    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index_path = self.root / "index.json"

    def __repr__(self):
        return f"MasterLibrary({str(self.root)!r})"

    def entries(self) -> list[LibraryEntry]:
        """All index entries."""
        if not self.index_path.exists():
            return []
        with open(self.index_path, encoding="utf-8") as fh:
            return [LibraryEntry.from_dict(d) for d in json.load(fh).get("masters", [])]

    def add(self, source, *, kind, camera, binning, mjd, band=None, exptime_s=None, n_frames=None):
        """
        Add a master (a FITS path, a `MasterFrame` or a 2-D array) to the library.

        An entry with the same kind, camera, binning, band and MJD (to 1e-5 d) is replaced, so a
        re-run does not duplicate masters.

        Returns
        -------
        entry : `LibraryEntry`
        """
        if kind not in MASTER_KINDS:
            msg = f"kind must be one of {MASTER_KINDS}, got {kind!r}"
            raise ValueError(msg)
        if not np.isfinite(mjd):
            msg = f"mjd must be finite, got {mjd!r}"
            raise ValueError(msg)
        bx, by = _norm_binning(binning)
        band = None if kind != "flat" else band
        name = (
            "_".join(
                p
                for p in (
                    kind,
                    _safe(camera),
                    f"{bx}x{by}",
                    _safe(band) if band else "",
                    f"{mjd:.5f}",
                )
                if p
            )
            + ".fits"
        )
        dest = self.root / kind / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, (str, os.PathLike)):
            src = Path(source)
            if src.resolve() != dest.resolve():
                tmp = dest.with_name(f".{dest.name}.tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dest)
        else:
            master = (
                source
                if isinstance(source, MasterFrame)
                else MasterFrame(
                    kind,
                    np.asarray(source, dtype=np.float32),
                    n_frames=n_frames or 0,
                    exptime_s=exptime_s,
                )
            )
            n_frames = n_frames if n_frames is not None else master.n_frames
            exptime_s = exptime_s if exptime_s is not None else master.exptime_s
            write_master(master, dest, camera=camera, binning=(bx, by), band=band, mjd=mjd)
        entry = LibraryEntry(
            kind=kind,
            camera=str(camera),
            binning=(bx, by),
            band=band,
            mjd=float(mjd),
            path=str(dest.relative_to(self.root)),
            exptime_s=None if exptime_s is None else float(exptime_s),
            n_frames=None if n_frames is None else int(n_frames),
            added_utc=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        with self._locked():
            kept = [
                e
                for e in self.entries()
                if not (
                    e.kind == kind
                    and e.camera == entry.camera
                    and e.binning == entry.binning
                    and e.band == band
                    and abs(e.mjd - entry.mjd) < 1e-5
                )
            ]
            kept.append(entry)
            kept.sort(key=lambda e: (e.kind, e.camera, e.binning, e.band or "", e.mjd))
            self._write_index(kept)
        log.info(
            "master library %s: added %s (%s, %dx%d, band %s, MJD %.5f)",
            self.root,
            entry.path,
            camera,
            bx,
            by,
            band,
            mjd,
        )
        return entry

    def find_nearest(self, kind, *, camera, binning, mjd, band=None, max_delta_days=None):
        """
        The master of ``kind`` for this camera and binning (and band, for flats) nearest in time.

        Parameters
        ----------
        kind : {"bias", "dark", "flat"}
        camera : str
        binning : (int, int) or int
        mjd : float
            Time of the session/frame.
        band : str, optional
            Required match for flats (``None`` matches only flats without band); ignored otherwise.
        max_delta_days : float, optional
            Ignore masters further than this in time.

        Returns
        -------
        match : `LibraryMatch` or None
            None when nothing matches (the caller records "no master").
        """
        if kind not in MASTER_KINDS:
            msg = f"kind must be one of {MASTER_KINDS}, got {kind!r}"
            raise ValueError(msg)
        bx, by = _norm_binning(binning)
        best, best_key = None, None
        for e in self.entries():
            if e.kind != kind or e.camera != str(camera) or e.binning != (bx, by):
                continue
            if kind == "flat" and e.band != band:
                continue
            delta = abs(e.mjd - float(mjd))
            if max_delta_days is not None and delta > max_delta_days:
                continue
            if not (self.root / e.path).exists():
                log.warning("master library %s: %s listed but missing", self.root, e.path)
                continue
            key = (delta, -(e.n_frames or 0), e.mjd)
            if best_key is None or key < best_key:
                best, best_key = e, key
        if best is None:
            return None
        return LibraryMatch(
            path=self.root / best.path,
            mjd=best.mjd,
            delta_days=abs(best.mjd - float(mjd)),
            kind=best.kind,
            camera=best.camera,
            binning=best.binning,
            band=best.band,
            exptime_s=best.exptime_s,
            n_frames=best.n_frames,
        )

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        with open(self.root / ".index.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _write_index(self, entries):
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".index.", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"masters": [e.to_dict() for e in entries]}, fh, indent=1)
        os.replace(tmp, self.index_path)


def _safe(s):
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(s)).strip("-") or "x"


# ---------------------------------------------------------------------------------- adapter
def run_masters(
    frames,
    *,
    out_dir,
    camera,
    binning=None,
    library=None,
    library_root=None,
    combine="median",
    clip_sigma=3.0,
    max_age_days=None,
    session_mjd=None,
    bands=None,
    read_kwargs=None,
):
    """
    Adapter: build the session's masters, fall back on the library for missing kinds.

    Parameters
    ----------
    frames : dict
        Either ``{"bias": [paths], "dark": [paths], "flat_<band>": [paths], "flat": [paths]}``
        (a plain ``"flat"`` takes its band from the FILTER keyword), or a session manifest
        (``SessionPlan.to_dict()``: its ``groups`` give kind, band, binning and paths; its
        ``frames`` give the MJDs and ``bands`` the science bands).
    out_dir : str or Path
        Where ``bias.fits``, ``dark.fits`` and ``flat_<band>.fits`` are written.
    camera : str
    binning : (int, int), optional
        Default: from the manifest groups, else (1, 1).
    library : MasterLibrary, optional
        (or ``library_root``, a folder): session masters are added to it; missing kinds are taken
        from it (nearest in time, within ``max_age_days`` if given).
    combine, clip_sigma : see `combine_frames`
    session_mjd : float, optional
        Time used for library look-ups; default the median MJD of the session's frames.
    bands : sequence of str, optional
        Science bands that need a flat; default the manifest's ``bands``.
    read_kwargs : dict, optional
        Passed to `rpp_tasks.inputs.reader.read_frame` (e.g. ``bayer_pattern`` from the camera
        config, so that calibration frames are debayered exactly like the science frames).

    Returns
    -------
    summary : dict
        ``{"bias": entry|None, "dark": entry|None, "flat": {band: entry}, "flags": [...],
        "rejected": [...]}``, each entry ``{"path", "source": "session"|"library", "n_frames",
        "mjd", ...}`` (``inputs``, the raw files used, and ``n_rejected_inputs`` for session
        masters; ``delta_days`` for library masters, and ``reason`` when the library replaces
        session frames that were all unusable). ``rejected`` lists the calibration frames left
        out, ``{"path", "kind", "band"?, "reason"}``. JSON-safe; the pipeline writes it to
        ``masters.json``.

    A bad calibration frame never stops the session: an unreadable, all-NaN, constant or
    wrongly shaped frame (not the science frames' shape) is left out with its reason and the
    master is built from the others; when none is usable, or the master cannot be built, the
    library master is used (recorded with the reason), else the kind is flagged missing.
    """
    out_dir = Path(out_dir)
    if library is None and library_root is not None:
        library = MasterLibrary(library_root)
    by_kind, bands, binning, mjd_by_path = _plan_frames(frames, binning, bands)
    binning = _norm_binning(binning or (1, 1))
    summary = {
        "bias": None,
        "dark": None,
        "flat": {},
        "flags": [],
        "camera": str(camera),
        "binning": list(binning),
    }
    all_mjd = [m for m in mjd_by_path.values() if m is not None]
    read_mjds = []  # MJDs of the calibration frames read here (library time without a manifest)

    def from_library(kind, band=None):
        if library is None:
            return None
        seen = all_mjd or [m for m in read_mjds if m is not None]
        when = (
            session_mjd if session_mjd is not None else (float(np.median(seen)) if seen else None)
        )
        if when is None:
            summary["flags"].append(f"no_session_time_for_library_{kind}")
            return None
        match = library.find_nearest(
            kind, camera=camera, binning=binning, band=band, mjd=when, max_delta_days=max_age_days
        )
        if match is None:
            return None
        log.info(
            "masters: %s%s from library %s (%.1f d away)",
            kind,
            f" {band}" if band else "",
            match.path,
            match.delta_days,
        )
        return {**match.to_dict(), "source": "library"}

    rejected = summary["rejected"] = []  # calibration frames left out, with the reason
    shape = _science_shape(frames)

    def build(kind, paths, make, out_name, band=None, library_ok=True):
        """Read the usable frames of one master and combine them; None when none is usable."""
        try:
            n0 = len(rejected)
            data, headers, mjds, used = _read_stack(
                paths, kind, read_kwargs, shape=shape, rejected=rejected
            )
            if band is not None:
                for r in rejected[n0:]:
                    r["band"] = band
            read_mjds.extend(mjds)
            if not data:
                return None, None
            master = make(data, headers, used)
        except Exception as exc:  # never lose the night for one master: library or none
            log.exception("masters: %s%s not built", kind, f" {band}" if band else "")
            summary["flags"].append(f"{kind}{'_' + _safe(band) if band else ''}_not_built")
            summary.setdefault("errors", []).append(
                {"kind": kind, "band": band, "reason": f"{type(exc).__name__}: {exc}"}
            )
            return None, None
        lib = library if library_ok(master) else None
        entry = _save(master, out_dir / out_name, used, mjds, camera, binning, band, lib)
        n_bad = len(paths) - len(used)
        if n_bad:
            entry["n_rejected_inputs"] = n_bad
        return entry, master

    def fallback(kind, paths, band=None):
        entry = from_library(kind, band)
        if entry is not None and paths:
            n = sum(1 for r in rejected if r["kind"] == kind and r.get("band") == band)
            entry["reason"] = (
                f"none of the {len(paths)} session {kind} frames"
                f"{' of band ' + str(band) if band else ''} is usable ({n} rejected): "
                "library master used"
            )
        return entry

    # bias
    bias_img = None
    entry = None
    if by_kind.get("bias"):
        entry, master = build(
            "bias",
            by_kind["bias"],
            lambda data, headers, used: make_master_bias(
                data, method=combine, clip_sigma=clip_sigma
            ),
            "bias.fits",
            library_ok=lambda m: True,
        )
        bias_img = master.image if master is not None else None
    if entry is None:
        entry = fallback("bias", by_kind.get("bias"))
        if entry:
            bias_img = load_master(entry["path"])[0]
    summary["bias"] = entry
    if entry is None:
        summary["flags"].append("no_bias")

    # dark
    dark_img = None
    entry = None
    if by_kind.get("dark"):

        def make_dark(data, headers, used):
            bias = bias_img if bias_img is not None and bias_img.shape == data[0].shape else None
            t = [_exptime(h, p) for h, p in zip(headers, used)]
            return make_master_dark(
                data, exptimes_s=t, master_bias=bias, method=combine, clip_sigma=clip_sigma
            )

        entry, master = build(
            "dark",
            by_kind["dark"],
            make_dark,
            "dark.fits",
            library_ok=lambda m: "dark_includes_bias" not in m.flags,
        )
        dark_img = master.image if master is not None else None
    if entry is None:
        entry = fallback("dark", by_kind.get("dark"))
        if entry:
            dark_img = load_master(entry["path"])[0]
    summary["dark"] = entry
    if entry is None:
        summary["flags"].append("no_dark")

    # flats
    for band, paths_b in sorted(by_kind.get("flat", {}).items(), key=lambda kv: str(kv[0])):

        def make_flat(data, headers, used):
            same = data[0].shape
            t = [_exptime(h, p, default=0.0) for h, p in zip(headers, used)]
            return make_master_flat(
                data,
                master_bias=bias_img if bias_img is not None and bias_img.shape == same else None,
                master_dark_rate=dark_img
                if dark_img is not None and dark_img.shape == same
                else None,
                exptimes_s=t,
                method=combine,
                clip_sigma=clip_sigma,
            )

        name = f"flat_{_safe(band)}.fits" if band else "flat.fits"
        entry, _ = build("flat", paths_b, make_flat, name, band=band, library_ok=lambda m: True)
        if entry is None:
            entry = fallback("flat", paths_b, band)
        if entry is not None:
            summary["flat"][band or ""] = entry
    for band in bands or ():
        if band not in summary["flat"]:
            entry = from_library("flat", band)
            if entry:
                summary["flat"][band] = entry
            else:
                summary["flags"].append(f"flat_missing_{band}")
    if rejected:
        log.warning(
            "masters: %d calibration frames left out: %s",
            len(rejected),
            "; ".join(f"{Path(r['path']).name}: {r['reason']}" for r in rejected),
        )
    return summary


def _plan_frames(frames, binning, bands):
    """Normalise the adapter input.

    Returns ({"bias": [...], "dark": [...], "flat": {band: [...]}}, bands, binning, mjd_by_path).
    """
    by_kind = {"bias": [], "dark": [], "flat": {}}
    mjd_by_path = {}
    if "groups" in frames:  # a SessionPlan manifest
        for g in frames.get("groups", []):
            kind = g.get("kind")
            if kind in ("bias", "dark"):
                by_kind[kind] += list(g["paths"])
            elif kind == "flat":
                by_kind["flat"].setdefault(g.get("band"), []).extend(g["paths"])
            if binning is None and g.get("binning") and kind in ("bias", "dark", "flat", "science"):
                binning = tuple(g["binning"])
        for m in frames.get("frames", []):
            mjd_by_path[str(m.get("path"))] = m.get("mjd_obs")
        if bands is None:
            bands = list(frames.get("bands", []))
    else:
        for key, paths in frames.items():
            paths = [str(p) for p in paths]
            if key in ("bias", "dark"):
                by_kind[key] += paths
            elif key == "flat":
                for p in paths:
                    band = fits.getval(p, "FILTER", ext=0) if _has_key(p, "FILTER") else None
                    by_kind["flat"].setdefault(
                        None if band is None else str(band).strip(), []
                    ).append(p)
            elif key.startswith("flat_"):
                by_kind["flat"].setdefault(key[5:], []).extend(paths)
            else:
                msg = f"unknown frame kind {key!r}: expected bias, dark, flat or flat_<band>"
                raise ValueError(msg)
    return by_kind, bands, binning, mjd_by_path


def _has_key(path, key):
    try:
        with fits.open(path, mode="readonly", memmap=False) as hdul:
            return key in hdul[0].header
    except Exception:  # an unreadable flat is rejected with its reason when the stack is read
        return False


def _science_shape(frames):
    """Majority (ny, nx) of the science frames of a manifest, or None."""
    if not isinstance(frames, dict) or "frames" not in frames:
        return None
    shapes = [
        tuple(int(v) for v in m["shape"])
        for m in frames.get("frames", [])
        if m.get("imagetyp") == "science" and m.get("shape") and min(m["shape"]) > 0
    ]
    if not shapes:
        return None
    return max(sorted(set(shapes)), key=shapes.count)


def _read_stack(paths, kind, read_kwargs=None, *, shape=None, rejected=None):
    """Read the usable calibration frames of one master with `~rpp_tasks.inputs.reader.read_frame`.

    A frame that cannot be read or checked (all-NaN, constant, truncated, ...), a dark without a
    positive exposure, or a frame whose shape is not ``shape`` (the science frames'; default the
    majority shape of the stack) is left out and appended to ``rejected`` as
    ``{"path", "kind", "reason"}``: one bad calibration frame never stops the master.
    """
    from rpp_tasks.exceptions import FrameRejected
    from rpp_tasks.inputs.reader import read_frame

    rejected = rejected if rejected is not None else []

    def reject(p, reason):
        rejected.append({"path": str(p), "kind": kind, "reason": reason})
        log.warning("masters: %s frame %s left out: %s", kind, Path(p).name, reason)

    data, headers, used = [], [], []
    for p in paths:
        try:
            raw = read_frame(p, imagetyp=kind, **(read_kwargs or {}))
        except FrameRejected as exc:
            reject(p, exc.reason)
            continue
        except Exception as exc:
            reject(p, f"unreadable ({type(exc).__name__}: {exc})")
            continue
        if kind == "dark":
            try:
                t = _exptime(raw.header, p)
            except ValueError:
                t = None
            if t is None or not np.isfinite(t) or t <= 0:
                reject(p, f"a dark needs a positive exposure time (EXPTIME={t})")
                continue
        data.append(raw.data)
        headers.append(raw.header)
        used.append(str(p))
    shapes = [d.shape for d in data]
    common = (
        shape
        if shape is not None
        else (max(sorted(set(shapes)), key=shapes.count) if shapes else None)
    )
    keep = []
    for i, sh in enumerate(shapes):
        if sh == tuple(common):
            keep.append(i)
        else:
            whose = "the science frames'" if shape is not None else "the other frames'"
            reject(used[i], f"shape {sh[1]}x{sh[0]} differs from {whose} {common[1]}x{common[0]}")
    mjds = [_mjd(headers[i]) for i in keep]
    return [data[i] for i in keep], [headers[i] for i in keep], mjds, [used[i] for i in keep]


def _exptime(header, path, default=None):
    for key in ("EXPTIME", "EXPOSURE", "EXP_TIME"):
        if key in header:
            try:
                return float(header[key])
            except (TypeError, ValueError):
                pass
    if default is not None:
        return default
    msg = f"{path}: no EXPTIME/EXPOSURE keyword"
    raise ValueError(msg)


def _mjd(header):
    if "MJD-OBS" in header:
        with contextlib.suppress(TypeError, ValueError):
            return float(header["MJD-OBS"])
    if "DATE-OBS" in header:
        from astropy.time import Time

        with contextlib.suppress(Exception):
            return float(Time(str(header["DATE-OBS"]).strip(), scale="utc").mjd)
    return None


def _save(master, path, paths, mjds, camera, binning, band, library):
    finite = [m for m in mjds if m is not None]
    mjd = float(np.mean(finite)) if finite else None
    write_master(master, path, camera=camera, binning=binning, band=band, mjd=mjd, sources=paths)
    log.info("masters: wrote %s (%d frames, flags %s)", path, master.n_frames, list(master.flags))
    entry = {
        "path": str(path),
        "source": "session",
        "kind": master.kind,
        "band": band,
        "mjd": mjd,
        "inputs": [str(p) for p in paths],
        **{k: v for k, v in master.to_dict().items() if k != "kind"},
    }
    if library is not None and mjd is not None:
        lib = library.add(
            path,
            kind=master.kind,
            camera=camera,
            binning=binning,
            band=band,
            mjd=mjd,
            exptime_s=master.exptime_s,
            n_frames=master.n_frames,
        )
        entry["library_path"] = str(library.root / lib.path)
    return entry
