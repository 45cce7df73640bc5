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
``RPPOVSCN``
    Overscan level (ADU, the largest row level in ``"row"`` mode) subtracted from a single-HDU
    frame with ``BIASSEC``; `rpp_tasks.inputs.header.normalize_header` lowers the saturation
    level by it.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from rpp_tasks.exceptions import FrameRejected
from rpp_tasks.inputs.amplifiers import (
    mosaic_amplifiers,
    mosaic_shape,
    overscan_trim_single,
    single_amp_sections,
)
from rpp_tasks.inputs.bayer import (
    bayer_pattern_from_header,
    bin_header,
    debayer_to_luminance,
    lift_saturated_superpixels,
)
from rpp_tasks.inputs.cards import CHECK_STAGE, set_shape
from rpp_tasks.inputs.header import normalize_imagetyp, saturation_level
from rpp_tasks.jsonsafe import json_safe

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
    """Record astropy warnings as notes; raise FrameRejected for those that mean a broken file.

    astropy warns "non-ASCII characters are present" both for a header that holds such bytes and
    for bytes after the last HDU that it tried to read as one more header: `_scan_structure` tells
    the two apart (trailing bytes are noted and ignored; non-ASCII bytes in a keyword or a value
    of a real header reject the file; in a comment they are noted).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    non_ascii = False
    for w in caught:
        text = str(w.message)
        if "non-ASCII characters are present" in text:
            non_ascii = True
            continue
        if "may have been truncated" in text:
            raise FrameRejected(
                f"truncated FITS file ({' '.join(text.split())})", path=path, stage=CHECK_STAGE
            )
        if "extra bytes after the last HDU" in text or "Error validating header for HDU" in text:
            continue  # described by _scan_structure below
        collector.add(_warning_note(w))
    if non_ascii or any("extra bytes after the last HDU" in str(w.message) for w in caught):
        _explain_structure(path, collector)


def _explain_structure(path: Path, collector: _Collector) -> None:
    scan = _scan_structure(path)
    bad = [c for c in scan.non_ascii if c[1] != "comment"]
    if bad:
        where = ", ".join(f"{key or '(blank)'} ({part})" for key, part in bad[:5])
        msg = (
            f"header contains non-ASCII bytes in {where} "
            "(FITS headers must be 7-bit ASCII; astropy replaced them with '?')"
        )
        raise FrameRejected(msg, path=path, stage=CHECK_STAGE)
    if scan.non_ascii:
        keys = ", ".join(sorted({k or "(blank)" for k, _ in scan.non_ascii}))
        collector.add(f"non-ASCII bytes in the comments of {keys}: replaced by '?' (ignored)")
    if scan.trailing_bytes:
        collector.add(
            f"{scan.trailing_bytes} bytes after the last HDU are not FITS: ignored "
            "(the file was written or copied with extra bytes at its end)"
        )


@dataclass(frozen=True)
class _Structure:
    n_hdus: int
    trailing_bytes: int
    non_ascii: tuple[tuple[str, str], ...]  # (keyword, "keyword"|"value"|"comment")


def _card_parts(card: bytes) -> tuple[str, list[tuple[str, bytes]]]:
    """Keyword and (part, bytes) of one 80-byte card: keyword, value, comment."""
    key = card[:8].decode("ascii", "replace").strip()
    if card[8:10] != b"= " or key in ("COMMENT", "HISTORY", ""):
        return key, [("keyword", card[:8]), ("comment", card[8:])]
    rest = card[10:]
    # a quoted string may hold '/', and '' is an escaped quote
    i, in_str = 0, False
    while i < len(rest):
        c = rest[i : i + 1]
        if c == b"'":
            if in_str and rest[i + 1 : i + 2] == b"'":
                i += 2
                continue
            in_str = not in_str
        elif c == b"/" and not in_str:
            break
        i += 1
    return key, [("keyword", card[:8]), ("value", rest[:i]), ("comment", rest[i:])]


def _scan_structure(path: Path) -> _Structure:
    """Walk the HDUs of a FITS file block by block (headers read, data skipped).

    Returns the number of HDUs, the bytes after the last one that are not an HDU, and the cards
    whose bytes are not printable ASCII (keyword and which part of the card).
    """
    opener = _COMPRESSED.get(_compression(_read_head(path)), (None, open))[1]
    n_hdus, non_ascii, trailing = 0, [], 0
    with opener(path, "rb") as fh:
        while True:
            block = fh.read(2880)
            if not block:
                break
            start = b"SIMPLE  =" if n_hdus == 0 else b"XTENSION="
            if not block.startswith(start) or len(block) < 2880:
                trailing = len(block) + len(fh.read())
                break
            cards: dict[str, bytes] = {}
            done = False
            while not done:
                for i in range(0, 2880, 80):
                    card = block[i : i + 80]
                    if any(b < 32 or b > 126 for b in card):
                        key, parts = _card_parts(card)
                        for part, raw in parts:
                            if any(b < 32 or b > 126 for b in raw):
                                non_ascii.append((key, part))
                                break
                    key = card[:8].decode("ascii", "replace").strip()
                    if key == "END":
                        done = True
                        break
                    cards.setdefault(key, card[10:].split(b"/")[0].strip())
                if not done:
                    block = fh.read(2880)
                    if len(block) < 2880:
                        return _Structure(n_hdus, 0, tuple(non_ascii))
            n_hdus += 1

            def num(key, default=0, cards=cards):
                try:
                    return int(float(cards.get(key, b"").decode("ascii", "replace")))
                except ValueError:
                    return default

            naxis = num("NAXIS")
            n = 0
            if naxis > 0:
                n = 1
                for i in range(1, naxis + 1):
                    n *= num(f"NAXIS{i}")
                if n_hdus == 1 and num("NAXIS1") == 0 and naxis > 1:  # random groups
                    n = int(np.prod([num(f"NAXIS{i}") for i in range(2, naxis + 1)]))
            size = abs(num("BITPIX", 8)) // 8 * num("GCOUNT", 1) * (num("PCOUNT") + n)
            size = -(-size // 2880) * 2880
            if size:
                skipped = len(fh.read(size)) if opener is not open else None
                if skipped is None:
                    here = fh.tell()
                    fh.seek(0, 2)
                    end = fh.tell()
                    if here + size > end:
                        break
                    fh.seek(here + size)
                elif skipped < size:
                    break
    return _Structure(n_hdus, trailing, tuple(non_ascii))


def _check_file(path: Path) -> None:
    try:
        if not path.exists():
            raise FrameRejected("file does not exist", path=path, stage=CHECK_STAGE)
        if not path.is_file():
            raise FrameRejected("not a regular file", path=path, stage=CHECK_STAGE)
        if path.stat().st_size == 0:
            raise FrameRejected("empty file (zero bytes)", path=path, stage=CHECK_STAGE)
        head = _read_head(path)
    except OSError as exc:
        raise FrameRejected(
            f"cannot read the file ({_describe(exc)})", path=path, stage=CHECK_STAGE
        ) from None
    kind = _compression(head)
    if kind is not None:  # gzip, bzip2: astropy decompresses transparently
        name, opener = _COMPRESSED[kind]
        try:
            with opener(path, "rb") as fh:
                head = fh.read(16)
        except Exception as exc:  # OSError, EOFError, zlib.error: all mean a broken stream
            raise FrameRejected(
                f"corrupt {name} file ({_describe(exc)})", path=path, stage=CHECK_STAGE
            ) from None
    if not head.startswith(b"SIMPLE  ="):
        what = f"{_COMPRESSED[kind][0]}-compressed data" if kind else "file"
        raise FrameRejected(
            f"not a FITS file (no SIMPLE card at the start of the {what})",
            path=path,
            stage=CHECK_STAGE,
        )


_COMPRESSED = {"gzip": ("gzip", gzip.open), "bzip2": ("bzip2", bz2.open)}


def _compression(head: bytes) -> str | None:
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:3] == b"BZh":
        return "bzip2"
    return None


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
    except Exception as exc:  # any error while parsing one file rejects that file, nothing more
        raise FrameRejected(
            f"unreadable FITS file ({_describe(exc)})", path=path, stage=CHECK_STAGE
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
def _describe(exc: BaseException) -> str:
    """``zlib.error: Error -3 ...``: the exception's type and message on one line."""
    kind = type(exc).__name__
    if type(exc).__module__ not in ("builtins", None):
        kind = f"{type(exc).__module__.split('.')[0]}.{kind}"
    text = " ".join(str(exc).split())
    return f"{kind}: {text[:300]}" if text else kind


def _read(path, **kw):
    """`_read_unchecked`, with any error turned into a `FrameRejected` naming the file.

    One bad file must never stop a session: whatever astropy, zlib or numpy raise while one file
    is opened, parsed or decoded (``zlib.error`` from a corrupt gzip stream, ``MemoryError`` from
    a header that declares a huge image, ...) becomes the rejection of that file.
    """
    path = Path(path)
    try:
        return _read_unchecked(path, **kw)
    except FrameRejected:
        raise
    except MemoryError:
        raise FrameRejected(
            "not enough memory to read the image (declared size too large?)",
            path=path,
            stage=CHECK_STAGE,
        ) from None
    except Exception as exc:
        log.debug("reading %s failed", path, exc_info=True)
        raise FrameRejected(
            f"unreadable FITS file ({_describe(exc)})", path=path, stage=CHECK_STAGE
        ) from None


def _read_unchecked(path, *, with_data, bayer_pattern, debayer, overscan, saturation_adu=None):
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
                    except Exception as exc:
                        msg = f"cannot read the pixels of HDU {idxs[0]} ({_describe(exc)})"
                        raise FrameRejected(msg, path=path, stage=CHECK_STAGE) from None
                    if raw is None:
                        raise FrameRejected(
                            f"HDU {idxs[0]} has no pixel data", path=path, stage=CHECK_STAGE
                        )
                    data = np.asarray(raw)
            if data is not None:
                squeezed = _squeeze_shape(data.shape)
                if squeezed != data.shape:
                    data = data.reshape(squeezed)
                if data.ndim == 3 and data.shape[0] == 3:
                    col.add("3-plane colour cube summed to luminance")
                    data = data.astype(np.float32).sum(axis=0)
                shape = data.shape
                if len(shape) == 2 and data.dtype != np.float32:
                    data = data.astype(np.float32)
            elif kind != "amps":
                shape = _squeeze_shape(shape)
                if len(shape) == 3 and shape[0] == 3:
                    shape = shape[1:]
            if kind != "amps" and len(shape) == 2 and "BIASSEC" in header:
                data, shape = _single_overscan(data, header, shape, overscan, col, path)
    _check_shape(shape, path)
    set_shape(header, shape)

    pattern = bayer_pattern_from_header(header)
    if pattern is None and bayer_pattern:
        pattern = str(bayer_pattern).strip().upper()
    if pattern is not None and debayer:
        binned = (shape[0] // 2, shape[1] // 2)
        if data is not None:
            raw_mosaic = data
            data = debayer_to_luminance(raw_mosaic, pattern)
            level, source = saturation_level(header, saturation_adu)
            if level is not None:
                n = lift_saturated_superpixels(data, raw_mosaic, level)
                if n:
                    col.add(
                        f"{n} super-pixels with a saturated raw pixel (>= {level:g} ADU, {source}) "
                        f"set to the 2x2 saturation level {4 * level:g} ADU"
                    )
            del raw_mosaic
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


_WARNED_SECTIONS: set[str] = set()


def _single_overscan(data, header, shape, overscan, col, path):
    """One-amplifier overscan and trim of a single-HDU frame with ``BIASSEC`` (in place on
    ``header``).

    With a usable ``BIASSEC`` and ``TRIMSEC`` (or ``DATASEC``) (`single_amp_sections`): the
    overscan level is subtracted (`overscan_trim_single`), the image trimmed to the data section,
    CRPIX1/2 and LTV1/2 shifted by the trim, the section keywords removed, ``RPPOVSCN`` set to the
    largest level subtracted and the step written to HISTORY. Otherwise nothing changes; an
    unusable ``BIASSEC`` is noted on the frame and logged as a warning once per value.

    Returns ``(data, shape)``; ``data`` stays None when called without pixels.
    """
    sections, problem = single_amp_sections(header, shape)
    if sections is None:
        if problem:
            col.add(f"overscan not subtracted: {problem}")
            if problem not in _WARNED_SECTIONS:
                _WARNED_SECTIONS.add(problem)
                log.warning("%s: overscan not subtracted: %s", path.name, problem)
        return data, shape
    biassec, datasec, dkey = sections
    x1, x2, y1, y2 = datasec
    x0, y0 = x1 - 1, y1 - 1
    trimmed = (y2 - y1 + 1, x2 - x1 + 1)
    text = f"BIASSEC={''.join(header['BIASSEC'].split())} {dkey}={''.join(header[dkey].split())}"
    if data is not None:
        data, level, max_level = overscan_trim_single(data, biassec, datasec, overscan=overscan)
        header["RPPOVSCN"] = (round(max_level, 3), "[ADU] overscan level subtracted (max)")
        done = f"overscan {level:.1f} ADU subtracted ({overscan}), trimmed"
    else:
        done = "overscan to subtract, trimmed"
    msg = f"{done} to {trimmed[0]}x{trimmed[1]} ({text})"
    col.add(msg)
    header.add_history(f"rpp_tasks: {msg}")
    for key in _AMP_SECTIONS:
        header.remove(key, ignore_missing=True, remove_all=True)
    for axis, off in ((1, x0), (2, y0)):
        for key in (f"CRPIX{axis}", f"LTV{axis}"):
            value = header.get(key)
            if off and isinstance(value, (int, float)) and not isinstance(value, bool):
                header[key] = value - off
    return data, trimmed


def _squeeze_shape(shape) -> tuple[int, ...]:
    """Drop length-1 axes of a cube (NAXIS3=1) until it is 2-D; a 2-D shape is kept as is."""
    s = tuple(int(v) for v in shape)
    while len(s) > 2 and 1 in s:
        i = s.index(1)
        s = s[:i] + s[i + 1 :]
    return s


def _check_shape(shape, path) -> None:
    """Reject what is not a 2-D image of at least 2x2 pixels, saying what it is."""
    if len(shape) == 2 and min(shape) >= 2:
        return
    if len(shape) == 2 and max(shape) == 1:
        what = "a single pixel (1x1 image)"
    elif len(shape) == 2 or len(shape) == 1:
        what = f"1-D data of {max(shape)} pixels (a spectrum or a table row?)"
    else:
        what = f"{len(shape)}-D data {shape}"
    raise FrameRejected(f"{what}: expected a 2-D image", path=path, stage=CHECK_STAGE)


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
    path,
    *,
    bayer_pattern=None,
    debayer=True,
    imagetyp=None,
    allow_constant=None,
    overscan="median",
    saturation_adu=None,
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
    * Single-HDU frames with a valid ``BIASSEC`` and ``TRIMSEC`` (or ``DATASEC``), science and
      calibration frames alike: the same one-amplifier overscan subtraction, trimmed to that
      section, CRPIX/LTV shifted by the trim, ``RPPOVSCN`` and a HISTORY line added. Invalid
      sections leave the frame as it is (noted, warned once per value).
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
    saturation_adu : float, optional
        Native saturation level from the camera config, used when the header has none
        (`~rpp_tasks.inputs.header.saturation_level`). For a Bayer frame, super-pixels with a
        saturated raw pixel are raised to 4 times that level
        (`~rpp_tasks.inputs.bayer.lift_saturated_superpixels`), so that the saturation survives
        the 2x2 sum.

    Returns
    -------
    `RawFrame`

    Raises
    ------
    FrameRejected
        ``stage="check"``: zero-byte, truncated or non-FITS file, corrupt gzip or tile
        compression, non-ASCII bytes in a header keyword or value, no image data, 1-D data,
        all-NaN image, constant image (except a bias). Nothing else: any other error raised
        while the file is read becomes a `FrameRejected` naming the file and the error.
        Bytes after the last HDU and non-ASCII bytes in a comment are noted, not rejected.
    """
    path = Path(path)
    data, header, idx, notes = _read(
        path,
        with_data=True,
        bayer_pattern=bayer_pattern,
        debayer=debayer,
        overscan=overscan,
        saturation_adu=saturation_adu,
    )
    if imagetyp is None:
        imagetyp = normalize_imagetyp(header)[0]
    check = check_image(data, imagetyp, allow_constant=allow_constant, path=path)
    notes = notes + check.notes
    log.debug(
        "read %s: %dx%d HDU %d, %s", path.name, data.shape[0], data.shape[1], idx, "; ".join(notes)
    )
    return RawFrame(path=path, data=data, header=header, hdu_index=idx, notes=notes)
