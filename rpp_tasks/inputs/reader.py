"""Read any raw FITS frame an observatory produces as one float32 2-D image in ADU.

* `read_frame` -- `RawFrame`: primary or first image extension, tile-compressed (``.fits.fz``) or
  gzip (``.fit.gz``) files, multi-amplifier MEF frames (`rpp_tasks.inputs.amplifiers`),
  LSST-style MEF masters (the ``IMAGE`` plane) and Bayer/OSC frames (2x2 super-pixel luminance,
  `rpp_tasks.inputs.bayer`).
* `read_header` -- the header `read_frame` would return, without reading pixels (for grouping).
* `check_image` -- the pixel checks that reject a frame (all-NaN, constant, not 2-D).

Raw files are opened read-only and never written: no ``mode="update"``, no header fixes on disk.
Header fixes (SIP suffix, software binning of the WCS) are made on copies in memory.

Keywords added to the header `read_frame` returns (all in the returned copy only):

``RPPDEBAY``
    Bayer pattern of a frame turned into 2x2 super-pixel luminance.
``RPPBIN``
    Software binning factor applied (2 after the Bayer luminance step).
    `rpp_tasks.inputs.header.normalize_header` scales the camera-config read noise and pixel
    scale by it.
``RPPNAMPS``
    Number of amplifiers mosaicked from a MEF frame.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from rpp_tasks.exceptions import FrameRejected
from rpp_tasks.inputs.amplifiers import mosaic_amplifiers, mosaic_shape
from rpp_tasks.inputs.bayer import bayer_pattern_from_header, bin_header, debayer_to_luminance
from rpp_tasks.inputs.cards import CHECK_STAGE, json_safe, set_shape
from rpp_tasks.inputs.header import normalize_imagetyp

__all__ = ["RawFrame", "ImageCheck", "read_frame", "read_header", "check_image"]

log = logging.getLogger(__name__)

# Keywords that describe the storage of one HDU, not the observation: never copied when headers
# are merged.
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
    """Record astropy warnings as notes; raise FrameRejected for those that mean a broken file."""
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
            raise FrameRejected(msg, path=path, stage=CHECK_STAGE)
        if "may have been truncated" in text:
            raise FrameRejected(
                f"truncated FITS file ({' '.join(text.split())})", path=path, stage=CHECK_STAGE
            )
        collector.add(_warning_note(w))


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FrameRejected("file does not exist", path=path, stage=CHECK_STAGE)
    if not path.is_file():
        raise FrameRejected("not a regular file", path=path, stage=CHECK_STAGE)
    if path.stat().st_size == 0:
        raise FrameRejected("empty file (zero bytes)", path=path, stage=CHECK_STAGE)
    head = _read_head(path)
    if head[:2] == b"\x1f\x8b":  # gzip: astropy decompresses transparently
        try:
            with gzip.open(path, "rb") as fh:
                head = fh.read(16)
        except OSError as exc:
            raise FrameRejected(
                f"corrupt gzip file ({exc})", path=path, stage=CHECK_STAGE
            ) from None
    if not head.startswith(b"SIMPLE  ="):
        raise FrameRejected(
            "not a FITS file (no SIMPLE card at the start)", path=path, stage=CHECK_STAGE
        )


def _read_head(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(16)


@contextlib.contextmanager
def _open(path: Path, collector: _Collector):
    """fits.open read-only, lazily (headers only until .data is touched).

    Errors are raised as FrameRejected.
    """
    _check_file(path)
    try:
        with _capture(collector, path):
            hdul = fits.open(path, mode="readonly", memmap=False, lazy_load_hdus=False)
    except FrameRejected:
        raise
    except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise FrameRejected(
            f"unreadable FITS file ({type(exc).__name__}: {exc})", path=path, stage=CHECK_STAGE
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
        msg = (
            "no image data in any HDU (NAXIS=0 or empty axes everywhere; "
            f"HDU types: {', '.join(kinds)})"
        )
        raise FrameRejected(msg, path=path, stage=CHECK_STAGE)
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


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
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
                    shape = mosaic_shape(amp_headers, path)
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
                        raise FrameRejected(msg, path=path, stage=CHECK_STAGE) from None
                    if raw is None:
                        raise FrameRejected(
                            f"HDU {idxs[0]} has no pixel data", path=path, stage=CHECK_STAGE
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
        raise FrameRejected(f"{what}: expected a 2-D image", path=path, stage=CHECK_STAGE)
    set_shape(header, shape)

    pattern = bayer_pattern_from_header(header)
    if pattern is None and bayer_pattern:
        pattern = str(bayer_pattern).strip().upper()
    if pattern is not None and debayer:
        binned = (shape[0] // 2, shape[1] // 2)
        if data is not None:
            data = debayer_to_luminance(data, pattern)
        for n in bin_header(header, 2, binned):
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

    Same HDU choice, header merge, MEF mosaic geometry and Bayer WCS binning as `read_frame`, so
    that grouping a session (`rpp_tasks.inputs.frames.group_session`) sees the frames as the
    reduction will.

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
            stage=CHECK_STAGE,
        )
    if data.size == 0:
        raise FrameRejected("empty image (zero pixels)", path=path, stage=CHECK_STAGE)
    finite = np.isfinite(data)
    n_finite = int(np.count_nonzero(finite))
    if n_finite == 0:
        raise FrameRejected("image has no finite pixel (all NaN/inf)", path=path, stage=CHECK_STAGE)
    vals = data[finite] if n_finite < data.size else data
    vmin, vmax = float(np.min(vals)), float(np.max(vals))
    constant = vmin == vmax
    notes = []
    if constant:
        ok = allow_constant if allow_constant is not None else imagetyp == "bias"
        if not ok:
            msg = (
                f"constant image (every pixel = {vmin:g} ADU) "
                f"for a {imagetyp or 'frame of unknown type'}: "
                "no real read-out is noiseless"
            )
            raise FrameRejected(msg, path=path, stage=CHECK_STAGE)
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
