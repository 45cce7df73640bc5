"""Read any FITS frame an observatory produces, normalise its header and check its WCS.

Pure functions
--------------
* `read_frame` -- one float32 2-D image in ADU from a raw file: primary or first image extension,
  tile-compressed (``.fits.fz``) or gzip (``.fit.gz``) files, multi-amplifier MEF frames
  (overscan-subtracted, trimmed and mosaicked), LSST-style MEF masters (the ``IMAGE`` plane) and
  Bayer/OSC frames (2x2 super-pixel luminance, see `debayer_to_luminance`).
* `read_header` -- the header `read_frame` would return, without reading pixels (for grouping).
* `check_image` -- the pixel checks that reject a frame (all-NaN, constant, not 2-D).
* `normalize_header` -- `FrameMeta`: the dozen header conventions of amateur and professional
  software mapped onto one set of fields.
* `header_wcs` -- `WcsCheck`: the celestial WCS of a header, fixed where a known quirk allows
  (SIP terms without ``-SIP``), never raising for a bad WCS.

Adapter
-------
* `run_check(frame_path, obs, workdir)` -- read, normalise, write ``frames/<stem>/check.json``.

Raw files are opened read-only and never written: no ``mode="update"``, no header fixes on disk.
Header fixes (SIP suffix, software binning of the WCS) are made on copies in memory.

Keywords this module adds to the header it returns (all in the returned copy only):

``RPPDEBAY``
    Bayer pattern of a frame turned into 2x2 super-pixel luminance by `read_frame`.
``RPPBIN``
    Software binning factor applied by `read_frame` (2 after the Bayer luminance step).
    `normalize_header` scales the camera-config read noise and pixel scale by it.
``RPPNAMPS``
    Number of amplifiers mosaicked from a MEF frame.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from rpp_tasks.exceptions import FrameRejected
from rpp_tasks.jsonsafe import json_safe

__all__ = [
    "RawFrame",
    "FrameMeta",
    "WcsCheck",
    "ImageCheck",
    "BAYER_PATTERNS",
    "read_frame",
    "read_header",
    "check_image",
    "normalize_header",
    "normalize_imagetyp",
    "header_wcs",
    "debayer_to_luminance",
    "bayer_pattern_from_header",
    "mosaic_amplifiers",
    "normalize_kwargs_from_config",
    "frame_stem",
    "run_check",
]

log = logging.getLogger(__name__)

BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")

_STAGE = "check"

# Keywords that describe the storage of one HDU, not the observation: never copied when headers are merged.
_STRUCTURAL = {
    "SIMPLE",
    "XTENSION",
    "BITPIX",
    "NAXIS",
    "EXTEND",
    "PCOUNT",
    "GCOUNT",
    "BZERO",
    "BSCALE",
    "BLANK",
    "CHECKSUM",
    "DATASUM",
    "EXTNAME",
    "EXTVER",
    "EXTLEVEL",
    "INHERIT",
    "EXTTYPE",
    "END",
}
_AMP_SECTIONS = ("DATASEC", "BIASSEC", "DETSEC", "TRIMSEC")

# IMAGETYP-like values, lower-cased, trailing " frame" removed.
_IMAGETYP_MAP = {
    "science": ("light", "object", "science", "sci", "expose", "target", "lightframe"),
    "bias": ("bias", "offset", "zero", "biasframe"),
    "dark": ("dark", "darkframe", "darkflat", "dark flat", "flatdark", "flat dark"),
    "flat": (
        "flat",
        "flat field",
        "flatfield",
        "flat-field",
        "skyflat",
        "sky flat",
        "domeflat",
        "dome flat",
        "twilight",
        "twilight flat",
        "twiflat",
        "lampflat",
        "lamp flat",
        "flatframe",
    ),
}
_IMAGETYP_LOOKUP = {v: k for k, vals in _IMAGETYP_MAP.items() for v in vals}
_IMAGETYP_KEYS = ("IMAGETYP", "IMAGETYPE", "FRAME", "FRAMETYP", "OBSTYPE")

# Exposure times below this are placeholders for "zero" (Huntsman bias: EXPTIME = 1e-32).
_ZERO_EXPTIME_S = 1e-6

_GAIN_MAX_PLAUSIBLE_E_PER_ADU = 30.0


# ----------------------------------------------------------------------------------------------
# Data types
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RawFrame:
    """One frame as read from disk (see `read_frame`).

    Attributes
    ----------
    path : Path
        The raw file.
    data : ndarray
        float32 2-D image in ADU, BZERO/BSCALE applied, MEF amplifiers mosaicked and trimmed,
        Bayer frames as 2x2 super-pixel luminance.
    header : astropy.io.fits.Header
        The header that describes ``data`` (primary merged with the image HDU, WCS adjusted).
    hdu_index : int
        Index of the image HDU (the first amplifier for a MEF mosaic).
    notes : tuple of str
        What was done or noticed while reading (astropy warnings included).
    """

    path: Path
    data: np.ndarray
    header: fits.Header
    hdu_index: int
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-safe summary (no pixels, no header)."""
        return {
            "path": str(self.path),
            "shape": list(self.data.shape),
            "hdu_index": self.hdu_index,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class FrameMeta:
    """Normalised header of one frame (see `normalize_header`). Units in the field names."""

    path: str
    imagetyp: str
    date_obs: str | None
    mjd_obs: float | None
    exptime_s: float | None
    filter_raw: str | None
    band: str | None
    gain_e_per_adu: float
    read_noise_e: float
    saturation_adu: float
    ra_deg: float | None
    dec_deg: float | None
    object: str | None
    telescope: str | None
    instrument: str | None
    observer: str | None
    binning: tuple[int, int]
    ccd_temp_c: float | None
    shape: tuple[int, int]
    bayer_pattern: str | None
    wcs_status: str
    pixel_scale_arcsec: float | None
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-safe dict (tuples as lists, NaN as None); inverse of `from_dict`."""
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping) -> FrameMeta:
        """Rebuild from `to_dict` output (None restored to NaN for the float fields that need a value)."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            msg = f"FrameMeta.from_dict: unknown keys {sorted(unknown)}"
            raise ValueError(msg)
        kw = dict(d)
        for key in ("gain_e_per_adu", "read_noise_e", "saturation_adu"):
            kw[key] = float("nan") if kw.get(key) is None else float(kw[key])
        kw["binning"] = tuple(int(v) for v in kw["binning"])
        kw["shape"] = tuple(int(v) for v in kw["shape"])
        kw["warnings"] = tuple(kw.get("warnings") or ())
        return cls(**kw)


@dataclass(frozen=True)
class WcsCheck:
    """Celestial WCS of a header (see `header_wcs`).

    ``status`` is ``"valid"``, ``"valid-sip-fixed"``, ``"absent"`` or ``"invalid: <why>"``;
    ``wcs`` is None unless the status starts with ``"valid"``. ``footprint`` is the 4x2 array of
    (ra, dec) corners in degrees.
    """

    wcs: WCS | None
    status: str
    pixel_scale_arcsec: float | None = None
    center_ra_deg: float | None = None
    center_dec_deg: float | None = None
    footprint: np.ndarray | None = None
    notes: tuple[str, ...] = ()

    @property
    def is_valid(self) -> bool:
        return self.status.startswith("valid")

    def to_dict(self) -> dict:
        """JSON-safe summary (the WCS object itself is left out)."""
        return json_safe(
            {
                "status": self.status,
                "pixel_scale_arcsec": self.pixel_scale_arcsec,
                "center_ra_deg": self.center_ra_deg,
                "center_dec_deg": self.center_dec_deg,
                "footprint": None
                if self.footprint is None
                else np.asarray(self.footprint).tolist(),
                "notes": list(self.notes),
            }
        )


@dataclass(frozen=True)
class ImageCheck:
    """Pixel statistics of an accepted image (see `check_image`)."""

    n_pixels: int
    n_nonfinite: int
    min_adu: float
    max_adu: float
    median_adu: float
    constant: bool
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


# ----------------------------------------------------------------------------------------------
# Opening files
# ----------------------------------------------------------------------------------------------
class _Collector:
    """Collects the astropy warnings raised while a file is read, as notes."""

    def __init__(self):
        self.notes: list[str] = []

    def add(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)


def _warning_note(w: warnings.WarningMessage) -> str:
    text = " ".join(str(w.message).split())
    return f"astropy {w.category.__name__}: {text[:300]}"


@contextlib.contextmanager
def _capture(collector: _Collector, path: Path):
    """Record astropy warnings as notes; turn the ones that mean a broken file into FrameRejected."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = str(w.message)
        if "non-ASCII characters are present" in text:
            msg = (
                "header contains non-ASCII bytes (FITS headers must be 7-bit ASCII; "
                "astropy replaced them with '?')"
            )
            raise FrameRejected(msg, path=path, stage=_STAGE)
        if "may have been truncated" in text:
            raise FrameRejected(
                f"truncated FITS file ({' '.join(text.split())})", path=path, stage=_STAGE
            )
        collector.add(_warning_note(w))


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FrameRejected("file does not exist", path=path, stage=_STAGE)
    if not path.is_file():
        raise FrameRejected("not a regular file", path=path, stage=_STAGE)
    if path.stat().st_size == 0:
        raise FrameRejected("empty file (zero bytes)", path=path, stage=_STAGE)
    head = _read_head(path)
    if head[:2] == b"\x1f\x8b":  # gzip: astropy decompresses transparently
        try:
            with gzip.open(path, "rb") as fh:
                head = fh.read(16)
        except OSError as exc:
            raise FrameRejected(f"corrupt gzip file ({exc})", path=path, stage=_STAGE) from None
    if not head.startswith(b"SIMPLE  ="):
        raise FrameRejected(
            "not a FITS file (no SIMPLE card at the start)", path=path, stage=_STAGE
        )


def _read_head(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(16)


@contextlib.contextmanager
def _open(path: Path, collector: _Collector):
    """fits.open read-only, lazily (headers only until .data is touched), errors as FrameRejected."""
    _check_file(path)
    try:
        with _capture(collector, path):
            hdul = fits.open(path, mode="readonly", memmap=False, lazy_load_hdus=False)
    except FrameRejected:
        raise
    except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise FrameRejected(
            f"unreadable FITS file ({type(exc).__name__}: {exc})", path=path, stage=_STAGE
        ) from None
    try:
        yield hdul
    finally:
        hdul.close()


def _has_image(hdu) -> bool:
    """True if the HDU is an image HDU with a non-empty array (from its header: no pixel read)."""
    if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
        return False
    hdr = hdu.header
    naxis = int(hdr.get("NAXIS", 0) or 0)
    if naxis < 1:
        return False
    return all(int(hdr.get(f"NAXIS{i}", 0) or 0) > 0 for i in range(1, naxis + 1))


def _hdu_name(hdu) -> str:
    return str(hdu.header.get("EXTNAME", hdu.name) or "").strip().upper()


def _layout(hdul, path: Path) -> tuple[str, list[int]]:
    """Decide which HDU(s) hold the image.

    Returns ``("single", [i])`` or ``("amps", [i, j, ...])`` (multi-amplifier MEF to mosaic).
    """
    images = [i for i, hdu in enumerate(hdul) if _has_image(hdu)]
    if not images:
        kinds = sorted({type(h).__name__ for h in hdul})
        msg = f"no image data in any HDU (NAXIS=0 or empty axes everywhere; HDU types: {', '.join(kinds)})"
        raise FrameRejected(msg, path=path, stage=_STAGE)
    if images[0] == 0:
        return "single", [0]
    sci = [i for i in images if _hdu_name(hdul[i]) == "SCI"]
    amps = [
        i for i in (sci or images) if "DATASEC" in hdul[i].header and "BIASSEC" in hdul[i].header
    ]
    if len(amps) > 1:
        return "amps", amps
    for name in ("SCI", "IMAGE", "COMPRESSED_IMAGE"):
        named = [i for i in images if _hdu_name(hdul[i]) == name]
        if named:
            return "single", [named[0]]
    return "single", [images[0]]


def _merge_headers(primary: fits.Header, ext: fits.Header | None) -> fits.Header:
    """Primary header with the extension's non-structural keywords on top (the extension wins)."""
    out = fits.Header()
    for src in (primary, ext):
        if src is None:
            continue
        for card in src.cards:
            key = card.keyword
            if key in _STRUCTURAL or (key.startswith("NAXIS") and key[5:].isdigit()):
                continue
            if key in ("COMMENT", "HISTORY", ""):
                out.add_history(card.value) if key == "HISTORY" else out.add_comment(
                    str(card.value)
                )
                continue
            try:
                if key in out:
                    out[key] = (card.value, card.comment)
                else:
                    out.append(fits.Card.fromstring(card.image))
            except (ValueError, fits.VerifyError):  # a card astropy cannot represent: keep it out
                continue
    return out


def _set_shape(header: fits.Header, shape: tuple[int, int]) -> None:
    """Put NAXIS/NAXIS1/NAXIS2 describing ``shape`` at the top of ``header`` (in place)."""
    for key in ("NAXIS", "NAXIS1", "NAXIS2"):
        header.remove(key, ignore_missing=True, remove_all=True)
    header.insert(0, ("NAXIS", 2, "number of array dimensions"))
    header.insert(1, ("NAXIS1", int(shape[1]), "[px] x size of the image read"))
    header.insert(2, ("NAXIS2", int(shape[0]), "[px] y size of the image read"))


# ----------------------------------------------------------------------------------------------
# MEF amplifiers
# ----------------------------------------------------------------------------------------------
_SECTION_RE = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")


def _parse_section(value, key: str, path: Path) -> tuple[int, int, int, int] | None:
    """``'[x1:x2,y1:y2]'`` (1-based, inclusive, possibly reversed) -> (x1, x2, y1, y2); None if absent."""
    if value is None or str(value).strip().upper() in ("", "UNKNOWN", "N/A", "NONE"):
        return None
    m = _SECTION_RE.match(str(value))
    if not m:
        raise FrameRejected(
            f"cannot parse {key}={value!r} (expected '[x1:x2,y1:y2]')", path=path, stage=_STAGE
        )
    return tuple(int(v) for v in m.groups())


def _slices(sec: tuple[int, int, int, int]) -> tuple[slice, slice]:
    x1, x2, y1, y2 = sec
    return slice(min(y1, y2) - 1, max(y1, y2)), slice(min(x1, x2) - 1, max(x1, x2))


def _amp_geometry(headers: list[fits.Header], path: Path):
    """Placement of each amplifier's DATASEC in the mosaic.

    With DETSEC on every amplifier the placement follows DETSEC (detector pixels, binned by the ratio
    of DETSEC to DATASEC sizes; a reversed DETSEC range flips the amplifier). Without DETSEC the
    documented fallback is to place the trimmed amplifiers left to right in HDU order.

    Returns ``(shape, [(datasec, (ys, xs), flip_y, flip_x), ...], used_detsec)``.
    """
    datasecs = [_parse_section(h.get("DATASEC"), "DATASEC", path) for h in headers]
    if any(d is None for d in datasecs):
        raise FrameRejected(
            "multi-amplifier frame without a usable DATASEC", path=path, stage=_STAGE
        )
    detsecs = [_parse_section(h.get("DETSEC"), "DETSEC", path) for h in headers]
    places = []
    if all(d is not None for d in detsecs):
        x0 = min(min(d[0], d[1]) for d in detsecs)
        y0 = min(min(d[2], d[3]) for d in detsecs)
        for dsec, det in zip(datasecs, detsecs, strict=True):
            nx_d, ny_d = abs(dsec[1] - dsec[0]) + 1, abs(dsec[3] - dsec[2]) + 1
            nx_t, ny_t = abs(det[1] - det[0]) + 1, abs(det[3] - det[2]) + 1
            if nx_t % nx_d or ny_t % ny_d:
                msg = f"DETSEC {det} is not an integer multiple of DATASEC {dsec}"
                raise FrameRejected(msg, path=path, stage=_STAGE)
            bx, by = nx_t // nx_d, ny_t // ny_d
            xs = (min(det[0], det[1]) - x0) // bx
            ys = (min(det[2], det[3]) - y0) // by
            flip_x = (det[0] > det[1]) != (dsec[0] > dsec[1])
            flip_y = (det[2] > det[3]) != (dsec[2] > dsec[3])
            places.append((dsec, (slice(ys, ys + ny_d), slice(xs, xs + nx_d)), flip_y, flip_x))
        used_detsec = True
    else:
        xs = 0
        for dsec in datasecs:
            nx_d, ny_d = abs(dsec[1] - dsec[0]) + 1, abs(dsec[3] - dsec[2]) + 1
            places.append((dsec, (slice(0, ny_d), slice(xs, xs + nx_d)), False, False))
            xs += nx_d
        used_detsec = False
    ny = max(p[1][0].stop for p in places)
    nx = max(p[1][1].stop for p in places)
    covered = np.zeros((ny, nx), dtype=np.int16)
    for p in places:
        covered[p[1]] += 1
    if covered.max() > 1:
        raise FrameRejected("amplifier DETSECs overlap", path=path, stage=_STAGE)
    return (ny, nx), places, used_detsec


def _overscan_level(data: np.ndarray, biassec, datasec, mode: str):
    """Overscan level of one amplifier: scalar median (mode "median") or per-row medians (mode "row")."""
    ys_b, xs_b = _slices(biassec)
    over = data[ys_b, xs_b].astype(np.float64)
    if mode == "median" or over.shape[0] < 2:
        return float(np.median(over))
    ys_d, _ = _slices(datasec)
    if (ys_b.start, ys_b.stop) != (ys_d.start, ys_d.stop):
        return float(np.median(over))
    return np.median(over, axis=1)[:, None]


def mosaic_amplifiers(amps, *, overscan="median", path=None):
    """Overscan-subtract, trim and mosaic the amplifiers of one multi-amplifier read-out.

    Parameters
    ----------
    amps : sequence of (ndarray, `~astropy.io.fits.Header`)
        Each amplifier's raw array and header, with ``DATASEC`` and ``BIASSEC`` (``DETSEC`` optional).
    overscan : {"median", "row"}, optional
        ``"median"`` subtracts the median of the whole BIASSEC region (one number per amplifier);
        ``"row"`` subtracts the median of each BIASSEC row from the matching data row. The per-row
        median of ~20 overscan columns carries ~0.3x the read noise as correlated row noise, so
        ``"median"`` is the default; use ``"row"`` for read-outs with row-dependent bias jumps.
    path : str or Path, optional
        For error messages.

    Returns
    -------
    image : ndarray
        float32 mosaic in ADU.
    notes : tuple of str
        What was done, with the overscan level of each amplifier.
    """
    if overscan not in ("median", "row"):
        msg = f"overscan must be 'median' or 'row', got {overscan!r}"
        raise ValueError(msg)
    path = Path(path) if path is not None else None
    headers = [h for _, h in amps]
    shape, places, used_detsec = _amp_geometry(headers, path)
    image = np.full(shape, np.nan, dtype=np.float32)
    levels = []
    for (data, hdr), (dsec, target, flip_y, flip_x) in zip(amps, places, strict=True):
        data = np.asarray(data, dtype=np.float32)
        biassec = _parse_section(hdr.get("BIASSEC"), "BIASSEC", path)
        block = data[_slices(dsec)].astype(np.float32)
        if biassec is not None:
            level = _overscan_level(data, biassec, dsec, overscan)
            block = block - np.asarray(level, dtype=np.float32)
            levels.append(float(np.median(level)))
        else:
            levels.append(float("nan"))
        if dsec[0] > dsec[1]:
            block = block[:, ::-1]
        if dsec[2] > dsec[3]:
            block = block[::-1, :]
        if flip_x:
            block = block[:, ::-1]
        if flip_y:
            block = block[::-1, :]
        image[target] = block
    n_done = sum(np.isfinite(levels))
    notes = [
        f"overscan subtracted ({overscan}) on {n_done}/{len(amps)} amps, levels "
        + ", ".join(f"{v:.1f}" for v in levels)
        + " ADU",
        f"{len(amps)} amps trimmed to DATASEC and mosaicked "
        + ("by DETSEC" if used_detsec else "left to right in HDU order (no DETSEC)")
        + f" -> {shape[0]}x{shape[1]}",
    ]
    if n_done < len(amps):
        notes.append("some amps have no BIASSEC: not overscan-subtracted")
    return image, tuple(notes)


# ----------------------------------------------------------------------------------------------
# Bayer
# ----------------------------------------------------------------------------------------------
def bayer_pattern_from_header(header) -> str | None:
    """Bayer pattern from ``BAYERPAT``, ``COLORTYP`` or a ``FILTER`` that names a pattern, else None."""
    for key in ("BAYERPAT", "COLORTYP", "BAYER", "CFAPAT", "FILTER"):
        _, value = _get(header, key)
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

    The price is the resolution: pixels are twice as large (the WCS is adjusted by `read_frame`).
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


_SIP_RE = re.compile(r"^(A|B|AP|BP)_(\d+)_(\d+)$")


def _bin_header(header: fits.Header, factor: int, shape: tuple[int, int]) -> list[str]:
    """Adjust WCS keywords of ``header`` (in place) for a software binning by ``factor``.

    ``CRPIX' = (CRPIX - 0.5) / f + 0.5`` (1-based pixel centres), ``CDi_j`` and ``CDELTi`` times f,
    SIP coefficients ``A_p_q`` (and B, AP, BP) times ``f**(p+q-1)`` so that the polynomial keeps
    mapping the same sky. Read noise in the header (RDNOISE...) is multiplied by f (sum of f*f pixels).
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
    _set_shape(header, shape)
    return notes


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def _amp_shape_from_headers(headers, path):
    shape, _, _ = _amp_geometry(headers, path)
    return shape


def _read(path, *, with_data, bayer_pattern, debayer, overscan):
    path = Path(path)
    col = _Collector()
    with _open(path, col) as hdul:
        with _capture(col, path):
            kind, idxs = _layout(hdul, path)
            primary = hdul[0].header
            first = hdul[idxs[0]]
            if idxs[0] == 0:
                header = _merge_headers(primary, None)
            else:
                header = _merge_headers(primary, first.header)
            if isinstance(first, fits.CompImageHDU):
                col.add("tile-compressed")
            if path.suffix.lower() in (".gz",):
                col.add("gzip-compressed")
            if kind == "amps":
                amp_headers = [hdul[i].header for i in idxs]
                for key in _AMP_SECTIONS:
                    header.remove(key, ignore_missing=True, remove_all=True)
                gains = [
                    float(h["GAIN"])
                    for h in amp_headers
                    if isinstance(h.get("GAIN"), (int, float)) and h["GAIN"] > 0
                ]
                if gains:
                    header["GAIN"] = (float(np.mean(gains)), "[e-/ADU] mean of the amplifier gains")
                header["RPPNAMPS"] = (len(idxs), "amplifiers mosaicked by rpp_tasks")
                if with_data:
                    amps = [(hdul[i].data, hdul[i].header) for i in idxs]
                    data, amp_notes = mosaic_amplifiers(amps, overscan=overscan, path=path)
                    for n in amp_notes:
                        col.add(n)
                else:
                    data = None
                    shape = _amp_shape_from_headers(amp_headers, path)
                    col.add(f"{len(idxs)} amps -> {shape[0]}x{shape[1]} mosaic")
                if len(gains) > 1:
                    col.add(
                        "amp gains "
                        + ", ".join(f"{g:.3g}" for g in gains)
                        + " e-/ADU: relative gains are left to the flat field"
                    )
            else:
                if idxs[0] != 0:
                    col.add(f"image in HDU {idxs[0]} ({_hdu_name(first) or type(first).__name__})")
                data = None
                hdr = first.header
                shape = tuple(int(hdr.get(f"NAXIS{i}", 0)) for i in range(int(hdr["NAXIS"]), 0, -1))
                if with_data:
                    try:
                        raw = first.data
                    except (OSError, ValueError, TypeError) as exc:
                        msg = (
                            f"cannot read the pixels of HDU {idxs[0]} ({type(exc).__name__}: {exc})"
                        )
                        raise FrameRejected(msg, path=path, stage=_STAGE) from None
                    if raw is None:
                        raise FrameRejected(
                            f"HDU {idxs[0]} has no pixel data", path=path, stage=_STAGE
                        )
                    data = np.asarray(raw)
                if "BIASSEC" in hdr and len(shape) == 2:
                    col.add("BIASSEC present in a single-HDU frame: overscan left to calibration")
            if data is not None:
                if 1 in data.shape:
                    data = np.squeeze(data)
                if data.ndim > 2:
                    if data.ndim == 3 and data.shape[0] == 3:
                        col.add("3-plane colour cube summed to luminance")
                        data = data.astype(np.float32).sum(axis=0)
                if data.dtype != np.float32:
                    data = data.astype(np.float32)
                shape = data.shape
            elif kind != "amps":
                shape = tuple(s for s in shape if s != 1) or shape
                if len(shape) == 3 and shape[0] == 3:
                    shape = shape[1:]
    if len(shape) != 2:
        what = (
            "1-D data (a spectrum or a table row?)"
            if len(shape) == 1
            else f"{len(shape)}-D data {shape}"
        )
        raise FrameRejected(f"{what}: expected a 2-D image", path=path, stage=_STAGE)
    _set_shape(header, shape)

    pattern = bayer_pattern_from_header(header)
    if pattern is None and bayer_pattern:
        pattern = str(bayer_pattern).strip().upper()
    if pattern is not None and debayer:
        binned = (shape[0] // 2, shape[1] // 2)
        if data is not None:
            data = debayer_to_luminance(data, pattern)
        for n in _bin_header(header, 2, binned):
            col.add(n)
        header["RPPDEBAY"] = (pattern, "Bayer 2x2 super-pixel sum by rpp_tasks")
        header.add_history(
            f"rpp_tasks: Bayer {pattern} 2x2 super-pixel sum -> luminance, WCS binned 2x2"
        )
        col.add(f"bayer {pattern} -> luminance 2x2 binned")
        shape = binned
    elif pattern is not None:
        col.add(f"bayer {pattern} mosaic left as is (debayer=False)")
    return data, header, idxs[0], tuple(col.notes)


def read_header(path, *, bayer_pattern=None, debayer=True):
    """
    The header `read_frame` would return, without reading any pixel.

    Same HDU choice, header merge, MEF mosaic geometry and Bayer WCS binning as `read_frame`, so that
    grouping a session (`rpp_tasks.inputs.frames.group_session`) sees the frames as the reduction will.

    Returns
    -------
    header : `~astropy.io.fits.Header`
    hdu_index : int
    notes : tuple of str

    Raises
    ------
    FrameRejected
        Same file-level problems as `read_frame` (pixel checks excepted).
    """
    _, header, idx, notes = _read(
        path, with_data=False, bayer_pattern=bayer_pattern, debayer=debayer, overscan="median"
    )
    return header, idx, notes


def check_image(data, imagetyp=None, *, allow_constant=None, path=None):
    """
    Reject images no stage can use.

    Rules: the data must be 2-D and have at least one finite pixel; a constant image (every finite
    pixel equal) is legal only for a bias (``imagetyp == "bias"``) or when ``allow_constant`` is
    True: a real read-out always has noise, but test benches and some cameras' "bias" files are
    constant.

    Parameters
    ----------
    data : array_like
        The image.
    imagetyp : str, optional
        Normalised frame type (``bias``, ``dark``, ``flat``, ``science``, ``unknown``).
    allow_constant : bool, optional
        Overrides the rule above when given.
    path : str or Path, optional
        For the message.

    Returns
    -------
    `ImageCheck`

    Raises
    ------
    FrameRejected
        With ``stage="check"`` and the problem in plain words.
    """
    data = np.asarray(data)
    if data.ndim != 2:
        raise FrameRejected(
            f"{data.ndim}-D data of shape {data.shape}: expected a 2-D image",
            path=path,
            stage=_STAGE,
        )
    if data.size == 0:
        raise FrameRejected("empty image (zero pixels)", path=path, stage=_STAGE)
    finite = np.isfinite(data)
    n_finite = int(np.count_nonzero(finite))
    if n_finite == 0:
        raise FrameRejected("image has no finite pixel (all NaN/inf)", path=path, stage=_STAGE)
    vals = data[finite] if n_finite < data.size else data
    vmin, vmax = float(np.min(vals)), float(np.max(vals))
    constant = vmin == vmax
    notes = []
    if constant:
        ok = allow_constant if allow_constant is not None else imagetyp == "bias"
        if not ok:
            msg = (
                f"constant image (every pixel = {vmin:g} ADU) for a {imagetyp or 'frame of unknown type'}: "
                "no real read-out is noiseless"
            )
            raise FrameRejected(msg, path=path, stage=_STAGE)
        notes.append(f"constant image ({vmin:g} ADU) accepted for a {imagetyp or 'frame'}")
    if n_finite < data.size:
        notes.append(f"{data.size - n_finite} non-finite pixels")
    return ImageCheck(
        n_pixels=int(data.size),
        n_nonfinite=int(data.size - n_finite),
        min_adu=vmin,
        max_adu=vmax,
        median_adu=float(np.median(vals)),
        constant=constant,
        notes=tuple(notes),
    )


def read_frame(
    path, *, bayer_pattern=None, debayer=True, imagetyp=None, allow_constant=None, overscan="median"
):
    """
    Read one raw frame into a float32 image in ADU, whatever the file layout.

    * The image HDU is the primary when it holds data, else the first image extension (plain,
      tile-compressed ``CompImageHDU`` / ``.fits.fz``; ``.fit.gz`` is decompressed by astropy), with
      ``SCI`` / ``IMAGE`` extensions preferred (LSST-style masters: the ``IMAGE`` plane, MASK and
      VARIANCE are ignored).
    * Multi-amplifier MEF frames (several image extensions with ``DATASEC`` and ``BIASSEC``, e.g.
      LCO Sinistro): overscan-subtracted, trimmed and mosaicked by `mosaic_amplifiers`; the header
      is the primary merged with the first amplifier's non-structural keywords, ``GAIN`` the mean of
      the amplifier gains, the section keywords removed.
    * BZERO/BSCALE are applied (astropy does it) and the output is float32.
    * Bayer/OSC frames (``BAYERPAT``, ``COLORTYP``, a ``FILTER`` naming a pattern, or
      ``bayer_pattern`` from the camera config) become a half-resolution luminance image
      (`debayer_to_luminance`); the header WCS is adjusted for the 2x2 binning and ``RPPDEBAY`` /
      ``RPPBIN`` record it.
    * astropy warnings are captured into ``notes``; the file is opened read-only and never written.

    Parameters
    ----------
    path : str or Path
        The raw file.
    bayer_pattern : str, optional
        Pattern from the camera config, used when the header names none.
    debayer : bool, optional
        Set False to keep a Bayer mosaic as is.
    imagetyp : str, optional
        Normalised frame type for the constant-image rule (default: from the header, a
        ``Dark`` with zero exposure counting as a bias).
    allow_constant : bool, optional
        See `check_image`.
    overscan : {"median", "row"}, optional
        See `mosaic_amplifiers`.

    Returns
    -------
    `RawFrame`

    Raises
    ------
    FrameRejected
        ``stage="check"``: zero-byte, truncated or non-FITS file, non-ASCII header bytes, no image
        data, 1-D data, all-NaN image, constant image (except a bias).
    """
    path = Path(path)
    data, header, idx, notes = _read(
        path, with_data=True, bayer_pattern=bayer_pattern, debayer=debayer, overscan=overscan
    )
    if imagetyp is None:
        imagetyp = normalize_imagetyp(header)[0]
    check = check_image(data, imagetyp, allow_constant=allow_constant, path=path)
    notes = notes + check.notes
    log.debug(
        "read %s: %dx%d HDU %d, %s", path.name, data.shape[0], data.shape[1], idx, "; ".join(notes)
    )
    return RawFrame(path=path, data=data, header=header, hdu_index=idx, notes=notes)


# ----------------------------------------------------------------------------------------------
# Header normalisation
# ----------------------------------------------------------------------------------------------
def _get(header, *keys):
    """First present, non-empty value among ``keys`` -> (key, value); (None, None) if none."""
    for key in keys:
        try:
            value = header.get(key)
        except (ValueError, fits.VerifyError):
            continue
        if value is None or isinstance(value, fits.card.Undefined):
            continue
        if isinstance(value, str):
            value = value.strip()
            if value == "":
                continue
        return key, value
    return None, None


def _float(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.number)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, str):
        m = re.match(r"^\s*([-+]?\d+(\.\d*)?([eE][-+]?\d+)?)", value)
        if m:
            return float(m.group(1))
    return None


def normalize_imagetyp(header_or_value) -> tuple[str, str | None]:
    """
    Frame type from IMAGETYP / IMAGETYPE / FRAME / FRAMETYP / OBSTYPE.

    Values are matched case-insensitively with a trailing ``" frame"`` removed: ``Light``,
    ``object``, ``science``, ``EXPOSE`` -> science; ``Bias``, ``Offset``, ``zero`` -> bias;
    ``Dark`` -> dark; ``Flat Field``, ``skyflat``, ``twilight`` ... -> flat. When the keywords
    disagree a calibration type wins over science: capture software writes ``Light`` by default,
    and pipelines that make masters set ``OBSTYPE`` (Huntsman masters: ``IMAGETYP='Light Frame'``,
    ``OBSTYPE='flat'``). A dark whose ``EXPTIME`` is zero (or a placeholder below 1e-6 s) is a bias.

    Parameters
    ----------
    header_or_value : `~astropy.io.fits.Header`, Mapping or str

    Returns
    -------
    kind : str
        ``bias``, ``dark``, ``flat``, ``science`` or ``unknown``.
    raw : str or None
        The raw keyword value that decided.
    """

    def one(value) -> str:
        v = " ".join(str(value).strip().lower().replace("_", " ").split())
        if v.endswith(" frame"):
            v = v[:-6]
        return _IMAGETYP_LOOKUP.get(v, _IMAGETYP_LOOKUP.get(v.replace(" ", ""), "unknown"))

    if isinstance(header_or_value, str):
        return one(header_or_value), header_or_value
    found = []
    for key in _IMAGETYP_KEYS:
        _, value = _get(header_or_value, key)
        if value is not None:
            found.append((one(value), str(value)))
    if not found:
        return "unknown", None
    calib = [f for f in found if f[0] in ("bias", "dark", "flat")]
    kind, raw = calib[0] if calib else (next((f for f in found if f[0] == "science"), found[0]))
    if kind == "dark":
        _, exptime = _get(header_or_value, "EXPTIME", "EXPOSURE", "EXP_TIME", "ITIME")
        e = _float(exptime)
        if e is not None and 0 <= e < _ZERO_EXPTIME_S:
            kind = "bias"
    return kind, raw


_SEXA_RE = re.compile(
    r"^\s*([-+]?)\s*(\d+(?:\.\d*)?)[\s:hHdD°]+(\d+(?:\.\d*)?)(?:[\s:mM']+(\d+(?:\.\d*)?))?"
)


def _angle(value, *, hours: bool) -> float | None:
    """Degrees from a number (degrees) or a sexagesimal string (hours for RA)."""
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        v = float(value)
        return v if math.isfinite(v) else None
    if not isinstance(value, str):
        return None
    s = value.strip()
    m = _SEXA_RE.match(s)
    if m and (":" in s or " " in s or any(c in s for c in "hHdD°")):
        sign = -1.0 if m.group(1) == "-" else 1.0
        a, b, c = float(m.group(2)), float(m.group(3)), float(m.group(4) or 0.0)
        v = sign * (a + b / 60.0 + c / 3600.0)
        return v * 15.0 if hours else v
    return _float(s)


def _parse_time(header, warns) -> tuple[str | None, float | None]:
    """(ISO UTC, MJD) of the start of the exposure from DATE-OBS (+UT/TIME-OBS), MJD-OBS or JD."""
    _, date = _get(header, "DATE-OBS", "DATE_OBS", "DATE-BEG")
    if isinstance(date, str):
        d = date.replace(" ", "T") if re.match(r"^\d{4}-\d\d-\d\d \d", date) else date
        m = re.match(r"^(\d\d)/(\d\d)/(\d\d)$", d)  # old FITS 'dd/mm/yy' (years 19yy)
        if m:
            d = f"19{m.group(3)}-{m.group(2)}-{m.group(1)}"
        if re.match(r"^\d{4}-\d\d-\d\d$", d):
            tkey, tval = _get(header, "TIME-OBS", "UT", "UTSTART", "UT-START", "UTC", "TIME")
            if isinstance(tval, str) and re.match(r"^\d{1,2}:\d\d(:\d\d(\.\d*)?)?$", tval):
                d = f"{d}T{tval if tval.count(':') == 2 else tval + ':00'}"
            else:
                mkey, mjd = _get(header, "MJD-OBS", "MJD_OBS")
                mjd = _float(mjd)
                if mjd is not None and mjd != int(mjd):
                    t = Time(mjd, format="mjd", scale="utc")
                    return t.isot, float(t.mjd)
                warns.append(
                    f"DATE-OBS '{date}' has no time of day and no UT/TIME-OBS: 00:00:00 assumed"
                )
        try:
            t = Time(d, format="isot", scale="utc")
            return t.isot, float(t.mjd)
        except ValueError:
            warns.append(f"cannot parse DATE-OBS '{date}'")
    _, mjd = _get(header, "MJD-OBS", "MJD_OBS", "MJD")
    mjd = _float(mjd)
    if mjd is not None:
        t = Time(mjd, format="mjd", scale="utc")
        return t.isot, float(t.mjd)
    _, jd = _get(header, "JD", "JD-OBS", "JD_OBS", "JULIAN")
    jd = _float(jd)
    if jd is not None and jd > 2_000_000:
        t = Time(jd, format="jd", scale="utc")
        return t.isot, float(t.mjd)
    return None, None


def _binning(header) -> tuple[int, int]:
    _, bx = _get(header, "XBINNING", "CCDXBIN", "XBIN", "BINX", "HBIN")
    _, by = _get(header, "YBINNING", "CCDYBIN", "YBIN", "BINY", "VBIN")
    bx, by = _float(bx), _float(by)
    if bx and by:
        return int(bx), int(by)
    _, b = _get(header, "CCDSUM", "BINNING")
    if isinstance(b, str):
        nums = re.findall(r"\d+", b)
        if len(nums) >= 2:
            return int(nums[0]), int(nums[1])
        if len(nums) == 1:
            return int(nums[0]), int(nums[0])
    v = _float(b)
    if v:
        return int(v), int(v)
    if bx:
        return int(bx), int(bx)
    return 1, 1


def _clean_str(value) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s or None


def normalize_header(
    header,
    *,
    path=None,
    filter_aliases=None,
    default_band=None,
    gain_e_per_adu=None,
    read_noise_e=None,
    saturation_adu=None,
    pixel_scale_arcsec=None,
    bayer_pattern=None,
    required=("DATE-OBS", "EXPTIME"),
):
    """
    Map the header of one frame onto `FrameMeta`.

    Keyword conventions understood (first found wins):

    ========================  ===========================================================================
    field                     keywords
    ========================  ===========================================================================
    imagetyp                  IMAGETYP, IMAGETYPE, FRAME, FRAMETYP, OBSTYPE (see `normalize_imagetyp`)
    date_obs, mjd_obs (UTC)   DATE-OBS (ISO, with or without fraction; date-only + TIME-OBS/UT/UTSTART;
                              old dd/mm/yy), then MJD-OBS, then JD/JD-OBS
    exptime_s                 EXPTIME, EXPOSURE, EXP_TIME, ITIME; values below 1e-6 s mean 0
    filter_raw / band         FILTER, FILTNAME, FILTER1, FILTERS; band via ``filter_aliases``
    gain_e_per_adu            EGAIN, then GAIN (rejected when it looks like a camera gain setting:
                              > 30 e-/ADU, e.g. ZWO ``GAIN=80``), else the camera config
    read_noise_e              RDNOISE, READNOIS, RDNOIS, RON, READNOISE, else the camera config
    saturation_adu            SATURATE, SATLEVEL, DATAMAX, else config, else 2**BITDEPTH - 1
    ra_deg, dec_deg           RA/DEC, OBJCTRA/OBJCTDEC, RA_OBS/DEC_OBS, TELRA/TELDEC, CAT-RA/CAT-DEC,
                              RA-MNT/DEC-MNT; numbers are degrees, sexagesimal strings are hours (RA)
                              and degrees (Dec)
    object                    OBJECT, FIELD, OBJNAME
    binning                   XBINNING/YBINNING, CCDXBIN/CCDYBIN, CCDSUM, BINNING ('2x2', '2 2', 2)
    ccd_temp_c                CCD-TEMP, CCD_TEMP, CCDTEMP, CCDATEMP, DET-TEMP; > 150 means Kelvin
    pixel_scale_arcsec        WCS, else config, else PIXSCALE/SECPIX, else 206.265*XPIXSZ/FOCALLEN
    ========================  ===========================================================================

    Frames read by `read_frame` with a software binning (``RPPBIN``, Bayer luminance) get the
    camera-config read noise and pixel scale multiplied by that factor.

    Parameters
    ----------
    header : `~astropy.io.fits.Header`
        Typically ``read_frame(path).header`` or ``read_header(path)[0]``.
    path : str or Path, optional
        Recorded in the result and in error messages.
    filter_aliases : Mapping, optional
        Raw filter name -> band, matched case-insensitively after stripping.
    default_band : str, optional
        Band when the header names no filter (or only a Bayer pattern, or a name not in the aliases
        when aliases are given... see Notes).
    gain_e_per_adu, read_noise_e, saturation_adu, pixel_scale_arcsec : float, optional
        Camera-config values used when the header has none.
    bayer_pattern : str, optional
        Camera-config Bayer pattern used when the header names none.
    required : sequence of str, optional
        Which of ``"DATE-OBS"`` (any usable time) and ``"EXPTIME"`` (any exposure keyword) must be
        present.

    Returns
    -------
    `FrameMeta`

    Raises
    ------
    FrameRejected
        ``"missing EXPTIME"`` / ``"missing DATE-OBS"`` when a required value is absent.

    Notes
    -----
    A raw filter name that is not in ``filter_aliases`` is kept as the band itself with a warning:
    silently mapping an unknown filter onto ``default_band`` would mix filters in the flats.
    """
    warns: list[str] = []
    path_s = None if path is None else str(path)
    sw_bin = int(_float(_get(header, "RPPBIN")[1]) or 1)

    kind, _ = normalize_imagetyp(header)

    date_obs, mjd_obs = _parse_time(header, warns)
    ekey, exptime = _get(header, "EXPTIME", "EXPOSURE", "EXP_TIME", "ITIME")
    exptime_s = _float(exptime)
    if exptime is not None and exptime_s is None:
        warns.append(f"unparsable {ekey}={exptime!r}")
    if exptime_s is not None:
        if exptime_s < 0:
            warns.append(f"negative {ekey}={exptime_s}: ignored")
            exptime_s = None
        elif 0 < exptime_s < _ZERO_EXPTIME_S:
            warns.append(f"{ekey}={exptime_s:g} is a placeholder: exposure time set to 0 s")
            exptime_s = 0.0

    for req in required:
        r = str(req).upper()
        if r in ("DATE-OBS", "DATE_OBS", "MJD-OBS") and date_obs is None:
            raise FrameRejected(
                "missing DATE-OBS (no usable DATE-OBS, MJD-OBS or JD keyword)",
                path=path,
                stage=_STAGE,
            )
        if r in ("EXPTIME", "EXPOSURE") and exptime_s is None:
            raise FrameRejected(
                "missing EXPTIME (no EXPTIME, EXPOSURE or EXP_TIME keyword)",
                path=path,
                stage=_STAGE,
            )
        if (
            r not in ("DATE-OBS", "DATE_OBS", "MJD-OBS", "EXPTIME", "EXPOSURE")
            and _get(header, r)[1] is None
        ):
            raise FrameRejected(f"missing {r}", path=path, stage=_STAGE)

    # filter and band
    _, fval = _get(header, "FILTER", "FILTNAME", "FILTER1", "FILTERS")
    filter_raw = _clean_str(fval)
    header_pattern = bayer_pattern_from_header(header) or _clean_str(_get(header, "RPPDEBAY")[1])
    pattern = header_pattern or (str(bayer_pattern).strip().upper() if bayer_pattern else None)
    aliases = {str(k).strip().lower(): v for k, v in (filter_aliases or {}).items()}
    if filter_raw is None:
        band = default_band
    elif filter_raw.lower() in aliases:
        band = aliases[filter_raw.lower()]
    elif filter_raw.upper() in BAYER_PATTERNS:
        band = default_band
        warns.append(
            f"FILTER='{filter_raw}' names the Bayer pattern, not a filter: band = {default_band!r}"
        )
    elif filter_raw.lower() in ("unknown", "none", "n/a", "-") and default_band is not None:
        band = default_band
    else:
        band = filter_raw
        if aliases:
            warns.append(
                f"filter '{filter_raw}' not in filter_aliases: band left as '{filter_raw}'"
            )

    # detector numbers
    gain = None
    gkey, g = _get(header, "EGAIN")
    if _float(g) is not None and _float(g) > 0:
        gain = _float(g)
    else:
        gkey, g = _get(header, "GAIN")
        gv = _float(g)
        if gv is not None and 0 < gv <= _GAIN_MAX_PLAUSIBLE_E_PER_ADU:
            gain = gv
        elif gv is not None:
            warns.append(
                f"GAIN={g} is not a plausible e-/ADU value (camera gain setting?): ignored"
            )
    if gain is None:
        gain = float(gain_e_per_adu) if gain_e_per_adu is not None else float("nan")
        if gain_e_per_adu is None:
            warns.append("no gain in header or config")

    _, rn = _get(header, "RDNOISE", "READNOIS", "RDNOIS", "RON", "READNOISE")
    rn = _float(rn)
    if rn is None or rn <= 0:
        rn = float(read_noise_e) * sw_bin if read_noise_e is not None else float("nan")
        if read_noise_e is None:
            warns.append("no read noise in header or config")

    _, sat = _get(header, "SATURATE", "SATLEVEL", "DATAMAX")
    sat = _float(sat)
    if sat is None or sat <= 0:
        if saturation_adu is not None:
            sat = float(saturation_adu)
        else:
            _, depth = _get(header, "BITDEPTH")
            depth = _float(depth)
            sat = float(2 ** int(depth) - 1) if depth else float("nan")
            warns.append(
                "no saturation level in header or config"
                + (f": 2**BITDEPTH-1 = {sat:g} ADU used" if depth else "")
            )
    if sw_bin > 1 and sat == sat:
        # a software-binned super-pixel is the sum of sw_bin**2 native pixels: it saturates at
        # sw_bin**2 times the native level (a cell with only some of its pixels saturated is below
        # that and is caught by the photometry's peak test only when its sum reaches it)
        sat = sat * sw_bin * sw_bin
        warns.append(
            f"saturation level scaled by {sw_bin * sw_bin} for {sw_bin}x{sw_bin} software binning"
        )

    # pointing
    ra_deg = dec_deg = None
    for rk, dk in (
        ("RA", "DEC"),
        ("OBJCTRA", "OBJCTDEC"),
        ("RA_OBS", "DEC_OBS"),
        ("TELRA", "TELDEC"),
        ("CAT-RA", "CAT-DEC"),
        ("RA-MNT", "DEC-MNT"),
    ):
        _, rv = _get(header, rk)
        _, dv = _get(header, dk)
        if rv is None or dv is None:
            continue
        ra, dec = _angle(rv, hours=isinstance(rv, str)), _angle(dv, hours=False)
        if ra is None or dec is None or not (0 <= ra < 360 + 1e-9) or not (-90 <= dec <= 90):
            warns.append(f"unusable pointing {rk}={rv!r} {dk}={dv!r}")
            continue
        ra_deg, dec_deg = ra % 360.0, dec
        break

    # temperature
    tkey, tv = _get(header, "CCD-TEMP", "CCD_TEMP", "CCDTEMP", "CCDATEMP", "DET-TEMP", "SENSTEMP")
    ccd_temp_c = _float(tv)
    if ccd_temp_c is not None and ccd_temp_c > 150:
        warns.append(f"{tkey}={ccd_temp_c} read as Kelvin: {ccd_temp_c - 273.15:.2f} C")
        ccd_temp_c = ccd_temp_c - 273.15

    # WCS and scale
    wcheck = header_wcs(header)
    scale = wcheck.pixel_scale_arcsec
    if scale is None and pixel_scale_arcsec is not None:
        scale = float(pixel_scale_arcsec) * sw_bin
    if scale is None:
        _, ps = _get(header, "PIXSCALE", "SECPIX", "SCALE")
        if _float(ps):
            scale = _float(ps) * sw_bin
        else:
            _, px_um = _get(header, "XPIXSZ")
            _, fl_mm = _get(header, "FOCALLEN")
            if _float(px_um) and _float(fl_mm):
                scale = 206.264806 * _float(px_um) / _float(fl_mm) * sw_bin

    ny, nx = (
        int(_float(_get(header, "NAXIS2")[1]) or 0),
        int(_float(_get(header, "NAXIS1")[1]) or 0),
    )

    return FrameMeta(
        path=path_s,
        imagetyp=kind,
        date_obs=date_obs,
        mjd_obs=mjd_obs,
        exptime_s=exptime_s,
        filter_raw=filter_raw,
        band=band,
        gain_e_per_adu=float(gain),
        read_noise_e=float(rn),
        saturation_adu=float(sat),
        ra_deg=ra_deg,
        dec_deg=dec_deg,
        object=_clean_str(_get(header, "OBJECT", "FIELD", "OBJNAME")[1]),
        telescope=_clean_str(_get(header, "TELESCOP")[1]),
        instrument=_clean_str(_get(header, "INSTRUME")[1]),
        observer=_clean_str(_get(header, "OBSERVER")[1]),
        binning=_binning(header),
        ccd_temp_c=ccd_temp_c,
        shape=(ny, nx),
        bayer_pattern=pattern,
        wcs_status=wcheck.status,
        pixel_scale_arcsec=None if scale is None else float(scale),
        warnings=tuple(warns),
    )


# ----------------------------------------------------------------------------------------------
# WCS
# ----------------------------------------------------------------------------------------------
_WCS_KEY_RE = re.compile(r"^(CTYPE|CRVAL|CRPIX|CDELT|CUNIT|CROTA)\d$|^(CD|PC)\d_\d$")


def header_wcs(header):
    """
    Check the celestial WCS of a header; never raises for a bad WCS.

    * No ``CTYPE1``/``CTYPE2``: ``"absent"`` (left-over linear keywords such as ``CDELT1=1`` without
      CTYPE, common in capture software, are ignored with a note).
    * SIP coefficients (``A_ORDER``) with CTYPEs lacking ``-SIP`` (astrometry.net output re-saved by
      other software, e.g. Huntsman ``science_0``): the suffix is added on a copy of the header and
      the status is ``"valid-sip-fixed"``; the returned WCS applies SIP.
    * Not celestial, singular or non-finite CD/PC matrix, NaN reference values, a pixel scale above
      0.5 deg/px, or a projection that fails at the image centre: ``"invalid: <why>"``.

    Parameters
    ----------
    header : `~astropy.io.fits.Header`
        With ``NAXIS1``/``NAXIS2`` describing the image (for the centre and the footprint).

    Returns
    -------
    `WcsCheck`
        Centre at the image centre, 0-based pixel ``((nx-1)/2, (ny-1)/2)``.
    """
    notes: list[str] = []
    try:
        ctypes = [header.get("CTYPE1"), header.get("CTYPE2")]
        bad = [
            k
            for k in header.keys()
            if _WCS_KEY_RE.match(k)
            and not k.startswith(("CTYPE", "CUNIT"))
            and not isinstance(header[k], (int, float, np.number))
        ]
    except (ValueError, fits.VerifyError) as exc:
        return WcsCheck(
            wcs=None, status=f"invalid: unparsable WCS card ({' '.join(str(exc).split())[:150]})"
        )
    if bad:
        k = bad[0]
        return WcsCheck(wcs=None, status=f"invalid: {k}={header[k]!r} is not a number")
    if not any(isinstance(c, str) and c.strip() for c in ctypes):
        if any(_WCS_KEY_RE.match(k) for k in header.keys()):
            notes.append("linear WCS keywords without CTYPE ignored")
        return WcsCheck(wcs=None, status="absent", notes=tuple(notes))
    hdr = header.copy()
    status = "valid"
    c1, c2 = (str(c or "").strip() for c in ctypes)
    if "A_ORDER" in hdr and "B_ORDER" in hdr and not (c1.endswith("-SIP") and c2.endswith("-SIP")):
        hdr["CTYPE1"] = c1[:8].ljust(8, "-") + "-SIP" if len(c1) <= 8 else c1
        hdr["CTYPE2"] = c2[:8].ljust(8, "-") + "-SIP" if len(c2) <= 8 else c2
        status = "valid-sip-fixed"
        notes.append(
            f"SIP coefficients without '-SIP' in CTYPE: read as {hdr['CTYPE1']}/{hdr['CTYPE2']}"
        )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            w = WCS(hdr, naxis=2, relax=True, fix=True)
        for c in caught:
            text = " ".join(str(c.message).split())
            if text and "'datfix' made the change" not in text:
                notes.append(f"{c.category.__name__}: {text[:200]}")
        if not w.has_celestial:
            return WcsCheck(
                wcs=None,
                status=f"invalid: not a celestial WCS (CTYPE {c1!r}/{c2!r})",
                notes=tuple(notes),
            )
        if not np.all(np.isfinite(w.wcs.crval)) or not np.all(np.isfinite(w.wcs.crpix)):
            return WcsCheck(wcs=None, status="invalid: non-finite CRVAL/CRPIX", notes=tuple(notes))
        m = w.pixel_scale_matrix
        if not np.all(np.isfinite(m)):
            return WcsCheck(wcs=None, status="invalid: non-finite CD/PC matrix", notes=tuple(notes))
        det = float(np.linalg.det(m))
        if det == 0 or abs(det) < 1e-20:
            return WcsCheck(
                wcs=None,
                status="invalid: singular CD/PC matrix (determinant 0)",
                notes=tuple(notes),
            )
        scale = math.sqrt(abs(det)) * 3600.0
        if scale > 1800.0:
            return WcsCheck(
                wcs=None,
                status=f"invalid: implausible pixel scale {scale:.4g} arcsec/px",
                notes=tuple(notes),
            )
        nx = int(_float(header.get("NAXIS1")) or 0)
        ny = int(_float(header.get("NAXIS2")) or 0)
        if nx > 0 and ny > 0:
            cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
        else:
            cx, cy = w.wcs.crpix[0] - 1, w.wcs.crpix[1] - 1
            notes.append("no NAXIS1/NAXIS2: centre taken at CRPIX")
        ra, dec = (float(v) for v in w.pixel_to_world_values(cx, cy))
        if not (math.isfinite(ra) and math.isfinite(dec)):
            return WcsCheck(
                wcs=None, status="invalid: projection fails at the image centre", notes=tuple(notes)
            )
        footprint = w.calc_footprint(axes=(nx, ny)) if nx > 0 and ny > 0 else None
        if footprint is not None and not np.all(np.isfinite(footprint)):
            return WcsCheck(
                wcs=None,
                status="invalid: projection fails at the image corners",
                notes=tuple(notes),
            )
    except Exception as exc:  # astropy/wcslib raise many types for broken headers; a bad WCS must not stop the frame
        return WcsCheck(
            wcs=None,
            status=f"invalid: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}",
            notes=tuple(notes),
        )
    return WcsCheck(
        wcs=w,
        status=status,
        pixel_scale_arcsec=scale,
        center_ra_deg=ra % 360.0,
        center_dec_deg=dec,
        footprint=footprint,
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------------------------
# Config glue and adapter
# ----------------------------------------------------------------------------------------------
def _attr(obj, *names, default=None):
    for name in names:
        if obj is None:
            return default
        obj = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
    return default if obj is None else obj


def normalize_kwargs_from_config(obs) -> dict:
    """Keyword arguments of `normalize_header` from an `ObservatoryConfig` (or the same shape as dicts)."""
    return {
        "filter_aliases": dict(_attr(obs, "filters", "aliases", default={})),
        "default_band": _attr(obs, "filters", "default_band"),
        "gain_e_per_adu": _attr(obs, "camera", "gain_e_per_adu"),
        "read_noise_e": _attr(obs, "camera", "read_noise_e"),
        "saturation_adu": _attr(obs, "camera", "saturation_adu"),
        "pixel_scale_arcsec": _attr(obs, "camera", "pixel_scale_arcsec"),
        "bayer_pattern": _attr(obs, "camera", "bayer_pattern"),
    }


_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fz", ".gz", ".bz2")


def frame_stem(path) -> str:
    """File name without FITS/compression suffixes: ``a.fits.fz`` -> ``a``."""
    name = Path(path).name
    changed = True
    while changed:
        changed = False
        for suf in _FITS_SUFFIXES:
            if name.lower().endswith(suf) and len(name) > len(suf):
                name = name[: -len(suf)]
                changed = True
    return name


def run_check(frame_path, obs, workdir) -> dict:
    """
    Adapter: read one frame, normalise its header, write ``<workdir>/frames/<stem>/check.json``.

    Returns the `FrameMeta` as a dict (plus ``notes`` from reading). Raises `FrameRejected` for a
    frame that cannot go further (the caller records it in ``rejected.json``).
    """
    kw = normalize_kwargs_from_config(obs)
    frame = read_frame(frame_path, bayer_pattern=kw["bayer_pattern"])
    meta = normalize_header(frame.header, path=frame_path, **kw)
    out = meta.to_dict()
    out["notes"] = list(frame.notes)
    target = Path(workdir) / "frames" / frame_stem(frame_path)
    target.mkdir(parents=True, exist_ok=True)
    (target / "check.json").write_text(json.dumps(out, indent=2, sort_keys=True))
    log.info(
        "check %s: %s %s %s s, wcs %s",
        Path(frame_path).name,
        meta.imagetyp,
        meta.band,
        meta.exptime_s,
        meta.wcs_status,
    )
    return out
