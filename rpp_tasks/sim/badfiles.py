"""A corpus of bad and odd input files with the outcome each must get (issue 12, item 8).

`write_bad_corpus` writes, next to a good synthetic night (`rpp_tasks.sim.synthetic.
write_synthetic_session`), files that real observatories produce or that go wrong on the way: empty,
truncated, not FITS, corrupt gzip or tile compression, no image, all-NaN, constant, 1x1, cubes,
huge NAXIS with little data, BITPIX 8/32/-64, BZERO/BSCALE oddities, MEF with an empty primary,
missing or bad EXPTIME/DATE-OBS, 2-digit years, time zones, non-ASCII bytes, trailing bytes, the
headers of real capture software (NINA, MaxIm DL, SGP, ASIAIR, KStars/Ekos, Seestar, LCO,
Liverpool, SAAO), frames without IMAGETYP, every FITS file-name spelling, colliding stems, broken
calibration frames, and files that are not frames at all.

Each file comes with a `BadFile`: the outcome the session must give it and a piece of the reason.
The test ``tests/rpp_tasks/test_bad_corpus.py`` runs the whole folder as one session through
`rpp_tasks.session.pipeline.reduce_session` and checks every file; no raw byte may change.

Outcomes (`EXPECTATIONS`):

``reduced``
    A science frame, reduced (``status == "ok"``); ``band`` when the band is the point.
``frame_rejected``
    A science frame (headers fine) rejected by a per-frame stage, with the reason (pixels).
``rejected``
    Rejected when the session is grouped (`SessionPlan.rejected`, ``rejected.json``).
``ignored``
    Not a frame (`SessionPlan.files` outcome ``ignored``), with the reason.
``calibration_used``
    A bias/dark/flat that went into its master (``masters.json`` ``inputs``).
``calibration_rejected``
    A bias/dark/flat left out of its master (``masters.json`` ``rejected``), with the reason.
"""

from __future__ import annotations

import bz2
import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

__all__ = ["EXPECTATIONS", "BadFile", "write_bad_corpus"]

EXPECTATIONS = (
    "reduced",
    "frame_rejected",
    "rejected",
    "ignored",
    "calibration_used",
    "calibration_rejected",
)

_WCS_KEYS = (
    "WCSAXES",
    "CRPIX1",
    "CRPIX2",
    "PC1_1",
    "PC1_2",
    "PC2_1",
    "PC2_2",
    "CDELT1",
    "CDELT2",
    "CUNIT1",
    "CUNIT2",
    "CTYPE1",
    "CTYPE2",
    "CRVAL1",
    "CRVAL2",
    "LONPOLE",
    "LATPOLE",
    "MJDREF",
    "RADESYS",
)


@dataclass(frozen=True)
class BadFile:
    """One crafted file and the outcome the session must give it.

    Attributes
    ----------
    name : str
        Path relative to the session folder.
    expect : str
        One of `EXPECTATIONS`.
    reason : str or None
        A piece of the reason the outcome must carry (None: any, e.g. a reduced frame).
    what : str
        What the file is, in a few words (and which software writes it).
    band : str or None
        For ``reduced``: the band the frame must end with.
    kind : str or None
        For calibration frames: the type the session must give it (``bias``, ``dark``, ``flat``).
    """

    name: str
    expect: str
    reason: str | None
    what: str
    band: str | None = None
    kind: str | None = None


class _Writer:
    def __init__(self, folder: Path, science, bias, dark, flat):
        self.folder = folder
        with fits.open(science) as hdul:
            self.sci_data = np.array(hdul[0].data)
            self.sci_header = hdul[0].header.copy()
        self.sci_bytes = Path(science).read_bytes()
        self.templates = {}
        for kind, path in (("bias", bias), ("dark", dark), ("flat", flat)):
            with fits.open(path) as hdul:
                self.templates[kind] = (np.array(hdul[0].data), hdul[0].header.copy())
        self.cases: list[BadFile] = []

    def path(self, name: str) -> Path:
        p = self.folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def add(self, name, expect, reason, what, band=None, kind=None):
        if expect not in EXPECTATIONS:
            raise ValueError(f"unknown expectation {expect!r}")
        self.cases.append(BadFile(name, expect, reason, what, band, kind))

    def header(self, base=None, **cards) -> fits.Header:
        h = (base if base is not None else self.sci_header).copy()
        for key in ("BZERO", "BSCALE", "BLANK"):
            h.remove(key, ignore_missing=True)
        for key, value in cards.items():
            if key in ("DATE_OBS", "TIME_OBS", "MJD_OBS", "DATE_LOC"):
                key = key.replace("_", "-")
            if value is None:
                h.remove(key, ignore_missing=True, remove_all=True)
            else:
                h[key] = value
        return h

    def bytes_of(self, hdus) -> bytes:
        bio = io.BytesIO()
        fits.HDUList(hdus).writeto(bio, output_verify="silentfix")
        return bio.getvalue()

    def science(self, name, expect, reason, what, *, data=None, band=None, drop=(), **cards):
        h = self.header(**cards)
        for key in drop:
            h.remove(key, ignore_missing=True, remove_all=True)
        d = self.sci_data if data is None else data
        self.write_bytes(name, self.bytes_of([fits.PrimaryHDU(d, header=h)]))
        self.add(name, expect, reason, what, band)

    def calibration(self, kind, name, expect, reason, what, *, data=None, as_kind=None, **cards):
        d0, h0 = self.templates[kind]
        h = self.header(h0, **cards)
        d = d0 if data is None else data
        self.write_bytes(name, self.bytes_of([fits.PrimaryHDU(d, header=h)]))
        self.add(name, expect, reason, what, kind=as_kind or kind)

    def write_bytes(self, name, raw: bytes):
        p = self.path(name)
        low = name.lower()
        if low.endswith(".gz"):
            raw = gzip.compress(raw, mtime=0)
        elif low.endswith(".bz2"):
            raw = bz2.compress(raw)
        p.write_bytes(raw)


def _with_cards(raw: bytes, cards: dict[str, str]) -> bytes:
    """Insert raw cards (``KEY = value`` text, not parsed by astropy) before the primary END.

    The first header must have room for them in its last 2880-byte block (it has when the card
    count is not a multiple of 36): the file keeps its size and its data.
    """
    end = None
    for i in range(0, len(raw), 80):
        if raw[i : i + 80].rstrip() == b"END":
            end = i
            break
    if end is None:
        raise ValueError("no END card")
    new = b"".join(f"{k:<8}= {v:>20}".ljust(80).encode("ascii") for k, v in cards.items())
    block_end = (end // 2880 + 1) * 2880
    if end + 80 + len(new) > block_end:
        raise ValueError("no room for the cards in the last header block")
    out = raw[:end] + new + raw[end : block_end - len(new)] + raw[block_end:]
    assert len(out) == len(raw)
    return out


def _no_wcs(h: fits.Header) -> dict:
    return dict.fromkeys(k for k in _WCS_KEYS if k in h)


def write_bad_corpus(folder, *, science, bias, dark, flat) -> list[BadFile]:
    """
    Write the corpus of bad and odd files into a session folder.

    Parameters
    ----------
    folder : path-like
        The session folder (usually holding a good synthetic night already).
    science, bias, dark, flat : path-like
        Good frames of that night used as templates (pixels and headers).

    Returns
    -------
    list of `BadFile`
        One per file written (symlinks included), in writing order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w = _Writer(folder, science, bias, dark, flat)
    sci = w.sci_data
    good = w.sci_bytes
    _cases_broken_files(w, good)
    _cases_pixels(w, sci)
    _cases_keywords(w, good)
    _cases_software(w, sci)
    _cases_names(w, good)
    _cases_calibration(w)
    return w.cases


# ----------------------------------------------------------------------------------------------
def _cases_broken_files(w: _Writer, good: bytes) -> None:
    w.write_bytes("zero_byte.fits", b"")
    w.add("zero_byte.fits", "rejected", "empty file (zero bytes)", "a copy that never started")
    w.write_bytes("truncated_half.fits", good[: len(good) // 2])
    w.add("truncated_half.fits", "rejected", "truncated FITS file", "a copy cut in the middle")
    w.write_bytes("truncated_in_header.fits", good[:1000])
    w.add("truncated_in_header.fits", "rejected", "FITS file", "cut inside the header")
    w.write_bytes("not_fits_text.fits", b"observing log: clouds after 2am\n" * 20)
    w.add("not_fits_text.fits", "rejected", "not a FITS file", "text named .fits")
    w.write_bytes("png_named.fits", b"\x89PNG\r\n\x1a\n" + bytes(2000))
    w.add("png_named.fits", "rejected", "not a FITS file", "a PNG preview named .fits")
    w.write_bytes("html_error.fit", b"<html><body>403 Forbidden</body></html>\n")
    w.add("html_error.fit", "rejected", "not a FITS file", "a sync tool's error page")
    p = w.path("corrupt_magic.fits.gz")
    p.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 8)
    w.add("corrupt_magic.fits.gz", "rejected", "corrupt gzip file", "gzip magic + garbage")
    p = w.path("gzip_of_text.fits.gz")
    p.write_bytes(gzip.compress(b"not a FITS file at all\n" * 40, mtime=0))
    w.add("gzip_of_text.fits.gz", "rejected", "not a FITS file", "gzip of a text file")
    z = gzip.compress(good, mtime=0)
    w.path("gzip_truncated.fit.gz").write_bytes(z[: len(z) // 2])
    w.add("gzip_truncated.fit.gz", "rejected", "FITS file", "gzip stream cut in the middle")
    flipped = bytearray(z)
    for i in range(4000, len(flipped) - 50, 13):
        flipped[i] ^= 0x55
    w.path("gzip_bitflips.fit.gz").write_bytes(bytes(flipped))
    w.add("gzip_bitflips.fit.gz", "rejected", "zlib.error", "gzip with flipped bits")
    # tile-compressed, with a corrupt heap: headers fine, pixels unreadable
    h = w.header()
    comp = w.bytes_of([fits.PrimaryHDU(), fits.CompImageHDU(w.sci_data, header=h)])
    bad = bytearray(comp)
    for i in range(len(bad) // 3, len(bad) - 3000, 7):
        bad[i] = (bad[i] * 31 + 7) % 256
    w.path("corrupt_heap.fits.fz").write_bytes(bytes(bad))
    w.add("corrupt_heap.fits.fz", "frame_rejected", "cannot read the pixels", "fpack, bad heap")
    # a header that declares 100000 x 100000 pixels, followed by a few blocks
    h = fits.Header()
    h["SIMPLE"], h["BITPIX"], h["NAXIS"] = True, 16, 2
    h["NAXIS1"], h["NAXIS2"] = 100000, 100000
    h["IMAGETYP"], h["EXPTIME"], h["DATE-OBS"] = "Light", 60.0, "2025-01-15T21:00:00"
    w.write_bytes("huge_naxis.fits", h.tostring().encode() + bytes(2880 * 4))
    w.add("huge_naxis.fits", "rejected", "truncated FITS file", "NAXIS 100000^2, 11 kB of data")
    w.write_bytes("trailing_bytes.fits", good + b"\x00\xff resumed copy \xfe" * 64)
    w.add("trailing_bytes.fits", "reduced", None, "valid FITS + 1 kB of bytes after the end")
    # non-ASCII bytes in a value and in a comment (same length: the header stays 2880 blocks)
    obs = b"OBSERVER= 'rpp_tasks.sim.synthetic'"
    assert good.count(obs) == 1
    w.write_bytes(
        "non_ascii_value.fits",
        good.replace(obs, "OBSERVER= 'rpp_täsks.sim.synthetic'".encode("latin-1")),
    )
    w.add("non_ascii_value.fits", "rejected", "non-ASCII bytes in OBSERVER (value)", "latin-1 name")
    temp = b"/ [C] sensor temperature"
    assert good.count(temp) == 1
    w.write_bytes(
        "non_ascii_comment.fits", good.replace(temp, "/ [°] sensor temperature".encode("latin-1"))
    )
    w.add("non_ascii_comment.fits", "reduced", None, "degree sign in a comment")
    for name in ("exp_nan.fits",):
        raw = good.replace(b"EXPTIME =                 60.0", b"EXPTIME =                  NaN")
        raw = raw.replace(b"EXPOSURE=                 60.0", b"EXPOSURE=                  NaN")
        w.write_bytes(name, raw)
        w.add(name, "rejected", "EXPTIME='NaN' is not a finite number", "NaN written as a value")


def _cases_pixels(w: _Writer, sci: np.ndarray) -> None:
    ny, nx = sci.shape
    rng = np.random.default_rng(12)
    w.science(
        "all_nan.fits",
        "frame_rejected",
        "no finite pixel",
        "all-NaN float image",
        data=np.full((ny, nx), np.nan, np.float32),
    )
    w.science(
        "constant.fits",
        "frame_rejected",
        "constant image",
        "every pixel 1000 ADU",
        data=np.full((ny, nx), 1000, np.uint16),
    )
    w.science(
        "all_zero.fits",
        "frame_rejected",
        "constant image",
        "a read-out of zeros",
        data=np.zeros((ny, nx), np.uint16),
    )
    w.science(
        "single_pixel.fits",
        "rejected",
        "a single pixel (1x1 image)",
        "1x1 image",
        data=np.array([[1000]], np.uint16),
    )
    w.science(
        "one_row.fits",
        "rejected",
        "1-D data",
        "1 x N: a spectrum, not an image",
        data=sci[:1, :].copy(),
    )
    w.science(
        "cube_5_planes.fits",
        "rejected",
        "3-D data (5,",
        "a 5-frame video cube",
        data=np.stack([sci] * 5),
    )
    w.science("cube_1_plane.fits", "reduced", None, "NAXIS3=1 cube", data=sci[np.newaxis])
    third = (sci.astype(np.float32) / 3).astype(np.float32)
    w.science("rgb_cube.fits", "reduced", None, "3-plane colour cube", data=np.stack([third] * 3))
    w.science("bitpix_m64.fits", "reduced", None, "float64 image", data=sci.astype(np.float64))
    w.science("bitpix_m32.fits", "reduced", None, "float32 image", data=sci.astype(np.float32))
    w.science("bitpix_32.fits", "reduced", None, "int32 image", data=sci.astype(np.int32))
    w.science(
        "bitpix_8_subframe.fits",
        "frame_rejected",
        "does not match the frame",
        "8-bit 128x128 sub-frame (RAW8 mode, ROI): no master of its shape",
        data=np.clip(sci[:128, :128].astype(np.float32) / 64.0, 0, 255).astype(np.uint8),
    )
    # BZERO/BSCALE oddities, written card by card (astropy would rescale the data itself)
    half = w.bytes_of([fits.PrimaryHDU((sci // 2).astype(np.int16), header=w.header())])
    w.write_bytes("bscale_2.fits", _with_cards(half, {"BSCALE": "2.0", "BZERO": "0.0"}))
    w.add("bscale_2.fits", "reduced", None, "BSCALE=2 integer image")
    w.write_bytes("bscale_0.fits", _with_cards(half, {"BSCALE": "0.0", "BZERO": "1000.0"}))
    w.add("bscale_0.fits", "frame_rejected", "constant image", "BSCALE=0: every pixel = BZERO")
    w.write_bytes("bzero_string.fits", _with_cards(half, {"BSCALE": "1.0", "BZERO": "'zero'"}))
    w.add("bzero_string.fits", "frame_rejected", "cannot read the pixels", "BZERO='zero'")
    flt = w.bytes_of([fits.PrimaryHDU(sci.astype(np.float32), header=w.header())])
    w.write_bytes("blank_on_float.fits", _with_cards(flt, {"BLANK": "-32768"}))
    w.add("blank_on_float.fits", "reduced", None, "BLANK on a float image (not allowed)")
    noise = rng.normal(1000, 10, (ny, nx)).astype(np.float32)
    # multi-extension layouts
    w.write_bytes(
        "mef_empty_primary.fits",
        w.bytes_of([fits.PrimaryHDU(header=w.header()), fits.ImageHDU(sci, name="SCI")]),
    )
    w.add(
        "mef_empty_primary.fits", "reduced", None, "MEF: keywords in an empty primary, image in SCI"
    )
    w.write_bytes(
        "mef_two_images.fits",
        w.bytes_of([fits.PrimaryHDU(header=w.header()), fits.ImageHDU(sci), fits.ImageHDU(noise)]),
    )
    w.add("mef_two_images.fits", "reduced", None, "MEF with two unnamed image extensions")
    w.write_bytes("no_image.fits", w.bytes_of([fits.PrimaryHDU(header=w.header())]))
    w.add("no_image.fits", "rejected", "no image data", "header only (NAXIS=0)")
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="E", array=np.arange(5.0))])
    w.write_bytes("table_only.fits", w.bytes_of([fits.PrimaryHDU(header=w.header()), table]))
    w.add("table_only.fits", "rejected", "no image data", "a FITS table (a catalogue)")


def _cases_keywords(w: _Writer, good: bytes) -> None:
    w.science(
        "no_exptime.fits",
        "rejected",
        "missing EXPTIME",
        "no exposure keyword",
        EXPTIME=None,
        EXPOSURE=None,
    )
    w.science("no_date_obs.fits", "rejected", "missing DATE-OBS", "no time keyword", DATE_OBS=None)
    w.science(
        "negative_exptime.fits",
        "rejected",
        "negative EXPTIME=-60 s",
        "EXPTIME=-60",
        EXPTIME=-60.0,
        EXPOSURE=None,
    )
    w.science(
        "text_exptime.fits",
        "rejected",
        "EXPTIME='sixty' is not a number",
        "EXPTIME='sixty'",
        EXPTIME="sixty",
        EXPOSURE=None,
    )
    w.science(
        "light_exptime_0.fits",
        "rejected",
        "EXPTIME=0 s for a science frame",
        "a Light frame of 0 s",
        EXPTIME=0.0,
        EXPOSURE=None,
    )
    w.science(
        "exptime_a_month.fits",
        "rejected",
        "longer than a day",
        "EXPTIME=3.6e6",
        EXPTIME=3.6e6,
        EXPOSURE=None,
    )
    w.science(
        "exptime_units.fits", "reduced", None, "EXPTIME='60.0 s'", EXPTIME="60.0 s", EXPOSURE=None
    )
    w.science(
        "exptime_ms.fits", "reduced", None, "EXPTIME='60000 ms'", EXPTIME="60000 ms", EXPOSURE=None
    )
    w.science(
        "exposure_only.fits", "reduced", None, "EXPOSURE without EXPTIME (old CCDOps)", EXPTIME=None
    )
    w.science(
        "date_tz_plus0200.fits",
        "reduced",
        None,
        "DATE-OBS with +02:00",
        DATE_OBS="2025-01-15T22:30:00+02:00",
    )
    w.science(
        "date_z.fits", "reduced", None, "DATE-OBS ending in Z", DATE_OBS="2025-01-15T20:30:00.000Z"
    )
    w.science(
        "date_space.fits", "reduced", None, "DATE-OBS with a space", DATE_OBS="2025-01-15 20:30:00"
    )
    w.science(
        "date_sgp_7_digits.fits",
        "reduced",
        None,
        "7-digit fraction (.NET writers)",
        DATE_OBS="2025-01-15T20:30:00.1234567",
    )
    w.science(
        "date_only_plus_ut.fits",
        "reduced",
        None,
        "DATE-OBS date + UT (SAAO style)",
        DATE_OBS="2025-01-15",
        UT="20:30:00",
        RA="09:59:59.9",
        DEC="+02:12:00",
    )
    w.science(
        "mjd_only.fits",
        "reduced",
        None,
        "MJD-OBS without DATE-OBS",
        DATE_OBS=None,
        MJD_OBS=60690.854167,
    )
    w.science(
        "jd_only.fits", "reduced", None, "JD without DATE-OBS", DATE_OBS=None, JD=2460691.354167
    )
    w.science(
        "date_unparsable.fits",
        "rejected",
        "unparsable DATE-OBS='tonight'",
        "DATE-OBS='tonight'",
        DATE_OBS="tonight",
    )
    w.science(
        "date_2digit_clock_unset.fits",
        "rejected",
        "no reading agrees with the file's other dates (folder name",
        "DATE-OBS='03/02/01' (a camera clock never set)",
        DATE_OBS="03/02/01",
        TIME_OBS="20:30:00",
    )
    w.science(
        "date_2digit.fits",
        "reduced",
        None,
        "DATE-OBS='15/01/25': the session folder's date tells the century",
        DATE_OBS="15/01/25",
        TIME_OBS="20:30:00",
    )
    w.science(
        "date_2digit_with_date.fits",
        "reduced",
        None,
        "'15/01/25' + DATE of 2025",
        DATE_OBS="15/01/25",
        TIME_OBS="20:30:00",
        DATE="2025-01-15T20:31:05",
    )
    w.science(
        "M42_20250115_2digit.fits",
        "reduced",
        None,
        "'15/01/25' + a date in the name",
        DATE_OBS="15/01/25",
        TIME_OBS="20:30:00",
    )
    w.science(
        "long_strings.fits",
        "reduced",
        None,
        "CONTINUE and HIERARCH cards",
        OBJECT="demo field observed with a very long object name " * 3,
        **{"HIERARCH ESO DET CHIP NAME": "SYNTH", "HIERARCH RPP TEST VALUE": 1.5},
    )
    w.science(
        "checksum_wrong.fits",
        "reduced",
        None,
        "CHECKSUM/DATASUM that do not match",
        CHECKSUM="0000000000000000",
        DATASUM="12345",
    )


def _cases_software(w: _Writer, sci: np.ndarray) -> None:
    h = w.sci_header
    w.science(
        "LIGHT/2025-01-15_21-30-00_V_-10.00_60.00s_0001.fits",
        "reduced",
        None,
        "N.I.N.A. 3 header and folder layout",
        IMAGETYP="LIGHT",
        SWCREATE="N.I.N.A. 3.1.2.9001",
        OBJCTRA="09 59 59.9",
        OBJCTDEC="+02 12 00",
        XPIXSZ=3.76,
        FOCALLEN=776.0,
        GAIN=100,
        OFFSET=50,
        ROWORDER="TOP-DOWN",
        EQUINOX=2000.0,
        DATE_LOC="2025-01-15T21:30:00.123",
        DATE_OBS="2025-01-15T20:30:00.123",
        band="V",
    )
    w.science(
        "maxim_0001.fit",
        "reduced",
        None,
        "MaxIm DL 6 header",
        IMAGETYP="Light Frame",
        SWCREATE="MaxIm DL Version 6.40 190926 24ISX",
        CBLACK=900,
        CWHITE=3000,
        PEDESTAL=0,
        JD=2460691.354167,
        OBJCTRA="09 59 59",
        OBJCTDEC="+02 12 00",
        DATE_OBS="2025-01-15T20:30:00",
    )
    w.science(
        "demo_Light_V_60sec_1x1_frame1.fit",
        "reduced",
        None,
        "SGP header and name",
        IMAGETYP="LIGHT",
        CREATOR="Sequence Generator Pro v4.2.0.1000",
        DATE_OBS="2025-01-15T20:30:00.0000000",
    )
    w.science(
        "Light_demo_60.0s_Bin1_V_gain120_20250115-213000_-10.0C_0001.fit",
        "reduced",
        None,
        "ASIAIR header and name (GAIN is the camera setting, not e-/ADU)",
        IMAGETYP="Light",
        GAIN=120,
        EGAIN=None,
        OFFSET=30,
        DATE_OBS="2025-01-15T20:30:00.000000",
    )
    w.science(
        "Light_demo_V_60_secs_001.fits",
        "reduced",
        None,
        "KStars/Ekos (INDI FRAME keyword)",
        IMAGETYP=None,
        FRAME="Light",
        SCALE=1.0,
        SITELAT=43.9,
        SITELONG=7.0,
        AIRMASS=1.2,
    )
    w.science(
        "Light_demo_10.0s_IRCUT_20250115-213000.fit",
        "reduced",
        None,
        "Seestar S50 style",
        IMAGETYP="Light",
        FILTER="IRCUT",
        DATE_OBS="2025-01-15T20:30:00.123456",
        INSTRUME="Seestar S50",
        band="L",
    )
    w.science(
        "lco_expose.fits",
        "reduced",
        None,
        "LCO: OBSTYPE='EXPOSE', no IMAGETYP, FILTER='rp'",
        IMAGETYP=None,
        OBSTYPE="EXPOSE",
        FILTER="rp",
        FILTER1="air",
        FILTER2="rp",
        FILTER3="air",
        MJD_OBS=60690.854167,
        band="r'",
    )
    w.science(
        "lt_io_o.fits",
        "reduced",
        None,
        "Liverpool IO:O: FILTER1='clear', FILTER2='SDSS-G'",
        IMAGETYP=None,
        OBSTYPE="EXPOSE",
        FILTER=None,
        FILTER1="clear",
        FILTER2="SDSS-G",
        TELESCOP="Liverpool Telescope",
        INSTRUME="IO:O",
        band="g",
    )
    w.science(
        "af_focus_001.fits",
        "reduced",
        "IMAGETYP='Focus' is not a frame type",
        "IMAGETYP='Focus' (autofocus frame)",
        IMAGETYP="Focus",
    )
    w.science(
        "m42_no_imagetyp.fits",
        "reduced",
        "a sky frame",
        "no IMAGETYP, OBJECT and pointing",
        IMAGETYP=None,
    )
    w.science(
        "img_0042.fits",
        "rejected",
        "frame type unknown",
        "no IMAGETYP, OBJECT, pointing, WCS",
        IMAGETYP=None,
        OBJECT=None,
        RA=None,
        DEC=None,
        **_no_wcs(h),
    )
    w.science(
        "neon_lamp.fits",
        "rejected",
        "spectroscopic lamp",
        "IMAGETYP='ARC'",
        IMAGETYP="ARC",
    )
    w.science(
        "two_filters.fits",
        "reduced",
        "several filters in the beam",
        "FILTER1='V', FILTER2='ND2'",
        FILTER=None,
        FILTER1="V",
        FILTER2="ND2",
        band="V",
    )


def _cases_names(w: _Writer, good: bytes) -> None:
    with fits.open(io.BytesIO(good)) as hdul:
        data, header = np.array(hdul[0].data), hdul[0].header.copy()
    comp = w.bytes_of([fits.PrimaryHDU(), fits.CompImageHDU(data, header=header)])
    for name in ("siril_00001.fit.fz", "upper_case.FITS.FZ", "fpack_only.fz"):
        w.write_bytes(name, comp)
        w.add(name, "reduced", None, "tile-compressed (fpack) spelling")
    for name in ("plain.fts", "gzipped.fit.gz", "gzipped_upper.FITS.GZ", "bzipped.fits.bz2"):
        w.write_bytes(name, good)
        w.add(name, "reduced", None, "FITS, gzip or bzip2 spelling")
    # colliding stems: same name in a sub-folder, and .fits next to .fit
    w.write_bytes("x.fits", good)
    w.add("x.fits", "reduced", None, "stem x, next to x.fit")
    w.write_bytes("x.fit", good)
    w.add("x.fit", "reduced", None, "stem x, next to x.fits")
    w.write_bytes("night2/x.fits", good)
    w.add("night2/x.fits", "reduced", None, "stem x in a sub-folder")
    w.write_bytes("m42 $1 (copy).fits", good)
    w.add("m42 $1 (copy).fits", "reduced", None, "spaces, $ and parentheses in the name")
    # not frames
    w.write_bytes("observing_log.txt", b"seeing 2.1 arcsec\n")
    w.add("observing_log.txt", "ignored", "ignore pattern '*.txt'", "observer's notes")
    w.write_bytes("preview.jpg", b"\xff\xd8\xff\xe0" + bytes(100))
    w.add("preview.jpg", "ignored", "ignore pattern '*.jpg'", "a preview")
    w.write_bytes("session.yaml", b"observer: me\n")
    w.add("session.yaml", "ignored", "ignore pattern", "session notes")
    w.write_bytes(".hidden_frame.fits", good)
    w.add(".hidden_frame.fits", "ignored", "ignore pattern '.*'", "a dot file (editor, macOS)")
    w.write_bytes("demo_V_009.fits.part", good[:5000])
    w.add("demo_V_009.fits.part", "ignored", "ignore pattern '*.part'", "a download in progress")
    w.write_bytes("solved.new", good)
    w.add("solved.new", "ignored", "FITS content", "astrometry.net output (.new)")
    w.write_bytes("M42.xisf", b"XISF0100" + bytes(200))
    w.add("M42.xisf", "ignored", "FITS extension", "PixInsight XISF")
    w.write_bytes("IMG_0001.CR2", b"II*\x00\x10\x00\x00\x00CR" + bytes(200))
    w.add("IMG_0001.CR2", "ignored", "FITS extension", "a DSLR raw")
    w.write_bytes(".stversions/demo_V_001~20250116-080000.fits", good)
    w.add(
        ".stversions/demo_V_001~20250116-080000.fits",
        "ignored",
        "hidden folder",
        "Syncthing's old version of a frame",
    )
    link = w.path("broken_link.fits")
    if not link.is_symlink():
        os.symlink(w.folder / "does_not_exist.fits", link)
    w.add("broken_link.fits", "rejected", "file does not exist", "a dangling symlink")


def _cases_calibration(w: _Writer) -> None:
    bias_d, _ = w.templates["bias"]
    dark_d, _ = w.templates["dark"]
    flat_d, _ = w.templates["flat"]
    ny, nx = flat_d.shape
    w.calibration(
        "flat",
        "flat_V_nan.fits",
        "calibration_rejected",
        "no finite pixel",
        "all-NaN flat",
        data=np.full((ny, nx), np.nan, np.float32),
    )
    w.calibration(
        "flat",
        "flat_V_zero.fits",
        "calibration_rejected",
        "constant image",
        "all-zero flat",
        data=np.zeros((ny, nx), np.uint16),
    )
    w.calibration(
        "dark",
        "dark_1x1.fits",
        "rejected",
        "a single pixel (1x1 image)",
        "1x1 dark",
        data=np.array([[1000]], np.uint16),
    )
    small = np.random.default_rng(3).normal(1000, 5, (16, 16)).astype(np.uint16)
    w.calibration(
        "dark",
        "dark_16x16.fits",
        "calibration_rejected",
        "differs from the science frames'",
        "16x16 dark (a sub-frame)",
        data=small,
    )
    w.calibration(
        "bias",
        "bias_nan.fits",
        "calibration_rejected",
        "no finite pixel",
        "all-NaN bias",
        data=np.full(bias_d.shape, np.nan, np.float32),
    )
    w.calibration(
        "dark",
        "darkflat_001.fits",
        "calibration_used",
        "Dark Flat",
        "a flat-dark (NINA 'DARKFLAT')",
        IMAGETYP="Dark Flat",
        EXPTIME=2.0,
        EXPOSURE=2.0,
    )
    w.calibration(
        "bias",
        "bias_indi_frame.fits",
        "calibration_used",
        "Bias",
        "INDI FRAME='Bias'",
        IMAGETYP=None,
        FRAME="Bias",
    )
    w.calibration(
        "dark",
        "placeholder_exptime_dark.fits",
        "calibration_used",
        "Dark",
        "a 'Dark' of EXPTIME=1e-32 (Huntsman): a bias",
        as_kind="bias",
        EXPTIME=1e-32,
        EXPOSURE=None,
    )
    w.calibration(
        "flat",
        "skyflat_light_typed.fits",
        "calibration_used",
        "names a flat",
        "IMAGETYP='Light Frame' but OBJECT='SkyFlat V'",
        IMAGETYP="Light Frame",
        OBJECT="SkyFlat V",
    )
