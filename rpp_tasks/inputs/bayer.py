"""Bayer (one-shot colour, DSLR) frames: the pattern, 2x2 super-pixel luminance, header binning.

* `bayer_pattern_from_header` -- the pattern a header names (``BAYERPAT``, ``COLORTYP``, ...).
* `debayer_to_luminance` -- a raw mosaic as a half-resolution, flux-conserving luminance image.
* `superpixel_max` -- the brightest raw pixel of each 2x2 super-pixel (saturation after the sum).
* `bin_header` -- a header copy's WCS, read noise and shape adjusted for software binning; it
  records the factor in ``RPPBIN`` (`rpp_tasks.inputs.header.normalize_header` scales the
  camera-config read noise and pixel scale by it).
"""

from __future__ import annotations

import re

import numpy as np
from astropy.io import fits

from rpp_tasks.inputs.cards import first_value, set_shape

__all__ = [
    "BAYER_PATTERNS",
    "bayer_pattern_from_header",
    "debayer_to_luminance",
    "superpixel_max",
    "lift_saturated_superpixels",
    "bin_header",
]

BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")


def bayer_pattern_from_header(header) -> str | None:
    """Bayer pattern from ``BAYERPAT``, ``COLORTYP`` or a ``FILTER`` naming a pattern, else None."""
    for key in ("BAYERPAT", "COLORTYP", "BAYER", "CFAPAT", "FILTER"):
        _, value = first_value(header, key)
        if isinstance(value, str) and value.strip().upper() in BAYER_PATTERNS:
            return value.strip().upper()
    return None


def debayer_to_luminance(data, pattern):
    """
    Turn a raw Bayer (OSC / DSLR) mosaic into a half-resolution luminance image.

    Each 2x2 super-pixel is summed: ``L = R + G1 + G2 + B`` in ADU. This is the photometrically
    clean way to use colour-sensor data for point-source photometry:

    * no interpolation: every output pixel is a sum of measured counts, so the noise is Poisson +
      read noise of four pixels (``2 x read_noise``), uncorrelated between output pixels, and the
      gain in e-/ADU is unchanged; interpolating demosaicers (bilinear, VNG, AHD) correlate
      neighbouring pixels and bias PSF-fitting errors;
    * flux is conserved: the sum of a star's counts is the same as in the raw mosaic;
    * the result does not depend on the phase of the pattern (every 2x2 block holds one R, two G
      and one B whatever ``XBAYROFF``/``YBAYROFF``/``ROWORDER`` say), so a wrong pattern cannot
      produce a wrong image; the pattern is only validated and recorded;
    * the spectral response is a wide "clear" band (R + 2G + B), which is what the reduction
      reports as the band of an OSC frame unless the observatory maps the filter otherwise.

    The price is the resolution: pixels are twice as large (the WCS is adjusted by
    `rpp_tasks.inputs.reader.read_frame`).
    An odd last row or column is dropped.

    Parameters
    ----------
    data : array_like
        2-D raw mosaic.
    pattern : str
        One of ``"RGGB"``, ``"BGGR"``, ``"GRBG"``, ``"GBRG"`` (case-insensitive).

    Returns
    -------
    luminance : ndarray
        float32 array of shape ``(ny // 2, nx // 2)``.
    """
    if not isinstance(pattern, str) or pattern.strip().upper() not in BAYER_PATTERNS:
        msg = f"pattern must be one of {BAYER_PATTERNS}, got {pattern!r}"
        raise ValueError(msg)
    data = np.asarray(data)
    if data.ndim != 2:
        msg = f"data must be 2-D, got {data.ndim}-D with shape {data.shape}"
        raise ValueError(msg)
    ny, nx = (data.shape[0] // 2) * 2, (data.shape[1] // 2) * 2
    if ny == 0 or nx == 0:
        msg = f"data of shape {data.shape} is too small for 2x2 super-pixels"
        raise ValueError(msg)
    d = data[:ny, :nx].astype(np.float32)
    return (d[0::2, 0::2] + d[0::2, 1::2] + d[1::2, 0::2] + d[1::2, 1::2]).astype(np.float32)


def superpixel_max(data):
    """
    The brightest raw pixel of each 2x2 super-pixel of `debayer_to_luminance`.

    A super-pixel is saturated as soon as one of its four raw pixels is, even when the sum of the
    four stays below four times the saturation level (the red and blue pixels of a star that
    saturates the green ones): compare this maximum, not the sum, to the native level.

    Parameters
    ----------
    data : array_like
        2-D raw mosaic.

    Returns
    -------
    ndarray
        Shape ``(ny // 2, nx // 2)``, the dtype of ``data`` (an odd last row or column dropped).
    """
    data = np.asarray(data)
    if data.ndim != 2:
        msg = f"data must be 2-D, got {data.ndim}-D with shape {data.shape}"
        raise ValueError(msg)
    ny, nx = (data.shape[0] // 2) * 2, (data.shape[1] // 2) * 2
    d = data[:ny, :nx]
    return np.maximum(
        np.maximum(d[0::2, 0::2], d[0::2, 1::2]), np.maximum(d[1::2, 0::2], d[1::2, 1::2])
    )


def lift_saturated_superpixels(luminance, raw, saturation_adu):
    """
    Mark saturation in a 2x2 luminance image by its value (in place).

    Super-pixels whose brightest raw pixel reached ``saturation_adu`` (the native level) are
    raised to at least ``4 * saturation_adu``, the level of the binned image
    (`~rpp_tasks.inputs.header.normalize_header` scales the saturation level by 4 after the
    Bayer sum). Every later test of a pixel against the saturation level -- the calibration mask,
    the ``saturated`` flag of the catalogue, the choice of PSF stars -- then sees the cell as
    saturated. Its true value is unknown anyway (at least what was measured).

    Parameters
    ----------
    luminance : ndarray
        Output of `debayer_to_luminance` (float32), modified in place.
    raw : array_like
        The raw mosaic it was made from.
    saturation_adu : float
        Native saturation level.

    Returns
    -------
    n_lifted : int
        Super-pixels with a saturated raw pixel.
    """
    level = float(saturation_adu)
    sat = superpixel_max(raw) >= level
    n = int(np.count_nonzero(sat))
    if n:
        np.maximum(luminance, np.float32(4.0 * level), out=luminance, where=sat)
    return n


_SIP_RE = re.compile(r"^(A|B|AP|BP)_(\d+)_(\d+)$")


def bin_header(header: fits.Header, factor: int, shape: tuple[int, int]) -> list[str]:
    """Adjust WCS keywords of ``header`` (in place) for a software binning by ``factor``.

    ``CRPIX' = (CRPIX - 0.5) / f + 0.5`` (1-based pixel centres), ``CDi_j`` and ``CDELTi`` times f,
    SIP coefficients ``A_p_q`` (and B, AP, BP) times ``f**(p+q-1)`` so that the polynomial keeps
    mapping the same sky. Read noise in the header (RDNOISE...) is multiplied by f (sum of f*f
    pixels).
    """
    notes = []
    for i in (1, 2):
        if f"CRPIX{i}" in header:
            header[f"CRPIX{i}"] = (float(header[f"CRPIX{i}"]) - 0.5) / factor + 0.5
        if f"CDELT{i}" in header:
            header[f"CDELT{i}"] = float(header[f"CDELT{i}"]) * factor
        for j in (1, 2):
            if f"CD{i}_{j}" in header:
                header[f"CD{i}_{j}"] = float(header[f"CD{i}_{j}"]) * factor
    for key in list(header.keys()):
        m = _SIP_RE.match(key)
        if m:
            p, q = int(m.group(2)), int(m.group(3))
            header[key] = float(header[key]) * factor ** (p + q - 1)
    if any(k in header for k in ("CRPIX1", "CD1_1", "CDELT1")):
        notes.append(f"WCS adjusted for {factor}x{factor} software binning")
    for key in ("RDNOISE", "READNOIS", "RDNOIS", "RON", "READNOISE"):
        if key in header and isinstance(header[key], (int, float)):
            header[key] = float(header[key]) * factor
    header["RPPBIN"] = (
        int(header.get("RPPBIN", 1)) * factor,
        "software binning applied by rpp_tasks",
    )
    set_shape(header, shape)
    return notes
