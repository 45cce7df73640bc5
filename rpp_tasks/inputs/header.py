"""Normalise the header of a raw frame: the conventions of amateur and professional software
mapped onto one set of fields (`FrameMeta`).

* `normalize_header` -- `FrameMeta` (frame type, UTC time, exposure, band, detector numbers,
  pointing, binning, temperature, WCS status and pixel scale) with a warning for every guess.
* `normalize_imagetyp` -- bias/dark/flat/science from IMAGETYP-like keywords.
* `normalize_kwargs_from_config` -- the camera-config fallbacks of `normalize_header`.
* `frame_stem` -- a raw file's name without FITS/compression suffixes (the frame's folder name).

This module owns FITS-header parsing (times, angles, binning): other rooms read `FrameMeta`
instead of parsing the header again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from astropy.io import fits

from rpp_tasks.exceptions import FrameRejected
from rpp_tasks.inputs.bayer import BAYER_PATTERNS, bayer_pattern_from_header
from rpp_tasks.inputs.cards import CHECK_STAGE, clean_str, first_value, to_float
from rpp_tasks.inputs.obstime import parse_obs_time
from rpp_tasks.inputs.wcs import header_wcs
from rpp_tasks.jsonsafe import json_safe

__all__ = [
    "FrameMeta",
    "normalize_header",
    "normalize_imagetyp",
    "normalize_kwargs_from_config",
    "saturation_level",
    "frame_stem",
]

# IMAGETYP-like values, lower-cased, trailing " frame" removed.
_IMAGETYP_MAP = {
    "science": (
        "light",
        "object",
        "science",
        "sci",
        "expose",
        "target",
        "lightframe",
        "standard",  # LCO/Liverpool standard-star fields
        "std",
        "snapshot",  # NINA
        "tricolor image",  # MaxIm DL colour frames
    ),
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
    #: where ``gain_e_per_adu`` came from: "header EGAIN", "header GAIN" or "config"
    gain_origin: str = "config"
    #: black level (bias pedestal) of the frame as read, in ADU (scaled by the software binning),
    #: None when unknown; ``bias_level_origin``: "header BLKLEVEL" or "camera.bias_level_adu"
    bias_level_adu: float | None = None
    bias_level_origin: str | None = None

    def to_dict(self) -> dict:
        """JSON-safe dict (tuples as lists, NaN as None); inverse of `from_dict`."""
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping) -> FrameMeta:
        """Rebuild from `to_dict` output.

        None is restored to NaN for the float fields that need a value.
        """
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
        _, value = first_value(header_or_value, key)
        if value is not None:
            found.append((one(value), str(value)))
    if not found:
        return "unknown", None
    calib = [f for f in found if f[0] in ("bias", "dark", "flat")]
    kind, raw = calib[0] if calib else (next((f for f in found if f[0] == "science"), found[0]))
    if kind == "dark":
        _, exptime = first_value(header_or_value, "EXPTIME", "EXPOSURE", "EXP_TIME", "ITIME")
        e = to_float(exptime)
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
    return to_float(s)


_EXPTIME_KEYS = ("EXPTIME", "EXPOSURE", "EXP_TIME", "ITIME", "EXPOSURE_TIME")

# An exposure longer than a day is not an exposure in seconds (milliseconds written as seconds?).
_MAX_EXPTIME_S = 86400.0


def _exposure(header) -> tuple[float | None, str | None, str | None]:
    """(seconds, problem, key) from the first usable exposure keyword.

    ``problem`` says why there is no usable value (absent, not a number, negative, not finite,
    longer than a day); the first keyword present decides the wording. ``'300 ms'`` strings are
    converted; values below 1e-6 s are placeholders for 0.
    """
    problems = []
    for key in _EXPTIME_KEYS:
        k, raw = first_value(header, key)
        if k is None:
            bad = _unparsable_card(header, key)
            if bad is not None:
                problems.append((key, f"{key}={bad} is not a valid FITS value"))
            continue
        if isinstance(raw, bool) or not isinstance(raw, (int, float, np.number, str)):
            problems.append((k, f"{k}={raw!r} is not a number"))
            continue
        if isinstance(raw, (int, float, np.number)):
            value = float(raw)
        else:
            m = re.match(r"^\s*([-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)\s*(ms|s|sec)?\s*$", raw)
            if not m:
                low = raw.strip().lower()
                if low in ("nan", "inf", "+inf", "-inf", "infinity"):
                    problems.append((k, f"{k}='{raw}' is not a finite number"))
                else:
                    problems.append((k, f"{k}='{raw}' is not a number"))
                continue
            value = float(m.group(1)) / (1000.0 if m.group(5) == "ms" else 1.0)
        if not math.isfinite(value):
            problems.append((k, f"{k}={value} is not a finite number"))
        elif value < 0:
            problems.append((k, f"negative {k}={value:g} s"))
        elif value > _MAX_EXPTIME_S:
            problems.append(
                (k, f"{k}={value:g} s is longer than a day (milliseconds written as seconds?)")
            )
        else:
            return (0.0 if value < _ZERO_EXPTIME_S else value), None, k
    if problems:
        return None, problems[0][1], problems[0][0]
    return None, None, None


def _unparsable_card(header, key) -> str | None:
    """The raw value text of a card astropy cannot parse (``EXPTIME = NaN``), else None."""
    try:
        header.get(key)
        return None
    except (ValueError, fits.VerifyError):
        pass
    try:
        image = str(getattr(header.cards[key], "_image", "") or "")
    except (KeyError, IndexError, ValueError, fits.VerifyError):
        return None
    text = image[10:].split("/")[0].strip()
    return text or "(empty)"


# Filter keywords of real software, in the order they are read: FILTER (MaxIm DL, NINA, SGP,
# ASIAIR, KStars/Ekos, ACP, LCO), FILTNAME, FILTER1..4 (wheels: Liverpool IO:O, LCO, INT/WFC),
# FILTERS, INSFLNAM (ESO/SAAO-style instrument filter name), FLTNAME, FILTERID, FILT.
_FILTER_KEYS = (
    "FILTER",
    "FILTNAME",
    "FILTER1",
    "FILTER2",
    "FILTER3",
    "FILTER4",
    "FILTERS",
    "INSFLNAM",
    "FLTNAME",
    "FILTERID",
    "FILT",
)
# Wheel positions that hold no filter: skipped when another keyword names a filter.
_OPEN_POSITIONS = {"clear", "clr", "open", "none", "empty", "air", "nofilter", "no filter", "blank"}
_UNKNOWN_FILTER = {"unknown", "n/a", "na", "-", "?", "undefined"}


def _filter_band(header, filter_aliases, default_band, warns) -> tuple[str | None, str | None]:
    """(raw filter name, band) from the filter keywords (see `normalize_header`)."""
    from rpp_tasks.outputs.bandpasses import canonical_band

    aliases = {str(k).strip().lower(): v for k, v in (filter_aliases or {}).items()}
    found = []
    for key in _FILTER_KEYS:
        _, value = first_value(header, key)
        v = clean_str(value)
        if v is not None and not isinstance(value, bool):
            found.append((key, v))
    if not found:
        return None, default_band

    def kind(v):
        low = " ".join(v.lower().split())
        if v.upper() in BAYER_PATTERNS:
            return "bayer"
        if low in _OPEN_POSITIONS or low.replace(" ", "") in _OPEN_POSITIONS:
            return "open"
        if low in _UNKNOWN_FILTER:
            return "unknown"
        return "filter"

    real = [(k, v) for k, v in found if kind(v) == "filter"]
    distinct = list(dict.fromkeys(v.lower() for _, v in real))
    if real:
        key, filter_raw = real[0]
        if len(distinct) > 1:
            others = ", ".join(f"{k}='{v}'" for k, v in real[1:] if v.lower() != filter_raw.lower())
            warns.append(
                f"several filters in the beam ({key}='{filter_raw}', {others}): band from {key}"
            )
        skipped = [f"{k}='{v}'" for k, v in found if kind(v) == "open"]
        if skipped and (key, filter_raw) != found[0]:
            warns.append(
                f"filter from {key}='{filter_raw}' (open wheel positions {', '.join(skipped)})"
            )
    else:
        key, filter_raw = found[0]
    low = filter_raw.lower()
    exact = {str(k).strip(): v for k, v in (filter_aliases or {}).items()}
    if filter_raw in exact:
        return filter_raw, exact[filter_raw]
    if low in aliases and not _case_changes_band(filter_raw, filter_aliases):
        return filter_raw, aliases[low]
    k = kind(filter_raw)
    if k == "filter" and filter_raw.isdigit() and default_band is not None:
        warns.append(
            f"filter '{filter_raw}' is a numeric wheel code, not a filter name: "
            f"band = {default_band!r} (name it in filters.aliases: {{'{filter_raw}': <band>}})"
        )
        return filter_raw, default_band
    if k == "bayer":
        warns.append(
            f"FILTER='{filter_raw}' names the Bayer pattern, not a filter: band = {default_band!r}"
        )
        return filter_raw, default_band
    if k == "unknown":
        return filter_raw, default_band if default_band is not None else filter_raw
    if k == "open":
        return filter_raw, "Clear"
    band = canonical_band(filter_raw)
    if band is not None:
        if band != filter_raw:
            warns.append(f"filter '{filter_raw}' read as the standard band '{band}'")
        elif aliases:
            warns.append(
                f"filter '{filter_raw}' not in filter_aliases: band left as '{filter_raw}'"
            )
        return filter_raw, band
    if aliases:
        warns.append(f"filter '{filter_raw}' not in filter_aliases: band left as '{filter_raw}'")
    return filter_raw, filter_raw


def _case_changes_band(filter_raw, filter_aliases) -> bool:
    """True when the only alias that matches ``filter_raw`` differs from it in case and the two
    spellings are different standard bands (Sloan ``r`` vs Johnson ``R``): a case-insensitive
    match would then put the frame in the wrong band."""
    from rpp_tasks.outputs.bandpasses import canonical_band

    mine = canonical_band(filter_raw)
    if mine is None:
        return False
    low = filter_raw.lower()
    keys = [str(k).strip() for k in (filter_aliases or {}) if str(k).strip().lower() == low]
    return all(canonical_band(k) not in (None, mine) for k in keys)


def saturation_level(header, default=None) -> tuple[float | None, str | None]:
    """
    Native saturation level of a raw frame in ADU, and where it comes from.

    SATURATE, SATLEVEL or DATAMAX of the header (a positive number), else ``default`` (the camera
    config), else ``2**BITDEPTH - 1``, else None. The level is per native pixel: for a
    software-binned frame (``RPPBIN``) `normalize_header` multiplies it by the binning squared; for
    a frame whose overscan `read_frame` subtracted (``RPPOVSCN``) it lowers it by that level.

    Returns
    -------
    level : float or None
    source : str or None
        The keyword, ``"config"`` or ``"BITDEPTH"``.
    """
    key, sat = first_value(header, "SATURATE", "SATLEVEL", "DATAMAX")
    sat = to_float(sat)
    if sat is not None and sat > 0:
        return sat, key
    if default is not None and math.isfinite(float(default)) and float(default) > 0:
        return float(default), "config"
    depth = to_float(first_value(header, "BITDEPTH")[1])
    if depth and 1 <= depth <= 32:
        return float(2 ** int(depth) - 1), "BITDEPTH"
    return None, None


def _binning(header) -> tuple[int, int]:
    _, bx = first_value(header, "XBINNING", "CCDXBIN", "XBIN", "BINX", "HBIN")
    _, by = first_value(header, "YBINNING", "CCDYBIN", "YBIN", "BINY", "VBIN")
    bx, by = to_float(bx), to_float(by)
    if bx and by:
        return int(bx), int(by)
    _, b = first_value(header, "CCDSUM", "BINNING")
    if isinstance(b, str):
        nums = re.findall(r"\d+", b)
        if len(nums) >= 2:
            return int(nums[0]), int(nums[1])
        if len(nums) == 1:
            return int(nums[0]), int(nums[0])
    v = to_float(b)
    if v:
        return int(v), int(v)
    if bx:
        return int(bx), int(bx)
    return 1, 1


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
    bias_level_adu=None,
):
    """
    Map the header of one frame onto `FrameMeta`.

    Keyword conventions understood (first found wins):

    =======================  ==================================================================
    field                    keywords
    =======================  ==================================================================
    imagetyp                 IMAGETYP, IMAGETYPE, FRAME, FRAMETYP, OBSTYPE (`normalize_imagetyp`)
    date_obs, mjd_obs (UTC)  DATE-OBS (ISO, with or without fraction, ``Z`` or a UTC offset such
                             as ``+02:00`` converted to UTC; date-only + TIME-OBS/UT/UTSTART;
                             2-digit years ``dd/mm/yy`` only when another date of the file --
                             DATE, MJD-OBS, JD, a date in the file or folder name -- agrees
                             within 2 days with exactly one reading), then MJD-OBS, then JD
    exptime_s                EXPTIME, EXPOSURE, EXP_TIME, ITIME (first usable one; ``'300 ms'``
                             strings converted); values below 1e-6 s mean 0
    filter_raw / band        FILTER, FILTNAME, FILTER1..4, FILTERS, INSFLNAM, FLTNAME, FILTERID:
                             the first that names a filter (``clear``, ``open``, ``none``,
                             ``empty``, ``air`` wheel positions and Bayer patterns skipped);
                             band via ``filter_aliases``, else the standard name
                             (`rpp_tasks.outputs.bandpasses.canonical_band`: ``SDSS-G`` -> g)
    gain_e_per_adu           EGAIN, then GAIN (rejected when it looks like a camera gain setting:
                             > 30 e-/ADU, e.g. ZWO ``GAIN=80``), else the camera config
    read_noise_e             RDNOISE, READNOIS, RDNOIS, RON, READNOISE, else the camera config
    saturation_adu           SATURATE, SATLEVEL, DATAMAX, else config, else 2**BITDEPTH - 1
    bias_level_adu           BLKLEVEL, BLACKLVL (black level per native pixel), else config
    ra_deg, dec_deg          RA/DEC, OBJCTRA/OBJCTDEC, RA_OBS/DEC_OBS, TELRA/TELDEC,
                             CAT-RA/CAT-DEC, RA-MNT/DEC-MNT; numbers are degrees, sexagesimal
                             strings are hours (RA) and degrees (Dec)
    object                   OBJECT, FIELD, OBJNAME
    binning                  XBINNING/YBINNING, CCDXBIN/CCDYBIN, CCDSUM, BINNING ('2x2', '2 2', 2)
    ccd_temp_c               CCD-TEMP, CCD_TEMP, CCDTEMP, CCDATEMP, DET-TEMP; > 150 means Kelvin
    pixel_scale_arcsec       WCS, else config, else PIXSCALE/SECPIX, else 206.265*XPIXSZ/FOCALLEN
    =======================  ==================================================================

    Frames read by `rpp_tasks.inputs.reader.read_frame` with a software binning (``RPPBIN``, Bayer
    luminance) get the camera-config read noise and pixel scale multiplied by that factor, and the
    saturation and black levels by its square (a super-pixel is the sum of the native pixels).

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
    bias_level_adu : float, optional
        Camera-config black level per native pixel, used when the header has none.
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
        When a required value is absent or unusable, with the precise reason: ``"missing
        EXPTIME (...)"``, ``"negative EXPTIME=-5 s"``, ``"EXPTIME='abc' is not a number"``,
        ``"missing DATE-OBS (...)"``, ``"unparsable DATE-OBS='...'"``, ``"DATE-OBS '15/01/25'
        has a 2-digit year (...)"``.

    Notes
    -----
    A raw filter name that is not in ``filter_aliases`` is kept as the band itself with a warning:
    silently mapping an unknown filter onto ``default_band`` would mix filters in the flats.
    """
    warns: list[str] = []
    path_s = None if path is None else str(path)
    sw_bin = int(to_float(first_value(header, "RPPBIN")[1]) or 1)

    kind, _ = normalize_imagetyp(header)

    date_obs, mjd_obs, time_problem = parse_obs_time(header, warns, path)
    exptime_s, exp_problem, ekey = _exposure(header)
    if exp_problem is not None:
        warns.append(f"{exp_problem}: exposure time unknown")
    elif ekey is not None and exptime_s == 0.0:
        raw = to_float(first_value(header, ekey)[1])
        if raw is not None and raw > 0:
            warns.append(f"{ekey}={raw:g} is a placeholder: exposure time set to 0 s")

    for req in required:
        r = str(req).upper()
        if r in ("DATE-OBS", "DATE_OBS", "MJD-OBS") and date_obs is None:
            reason = time_problem or "missing DATE-OBS (no DATE-OBS, MJD-OBS or JD keyword)"
            raise FrameRejected(reason, path=path, stage=CHECK_STAGE)
        if r in ("EXPTIME", "EXPOSURE") and exptime_s is None:
            reason = exp_problem or "missing EXPTIME (no EXPTIME, EXPOSURE or EXP_TIME keyword)"
            raise FrameRejected(reason, path=path, stage=CHECK_STAGE)
        if (
            r not in ("DATE-OBS", "DATE_OBS", "MJD-OBS", "EXPTIME", "EXPOSURE")
            and first_value(header, r)[1] is None
        ):
            raise FrameRejected(f"missing {r}", path=path, stage=CHECK_STAGE)

    # filter and band
    filter_raw, band = _filter_band(header, filter_aliases, default_band, warns)
    header_pattern = bayer_pattern_from_header(header) or clean_str(
        first_value(header, "RPPDEBAY")[1]
    )
    pattern = header_pattern or (str(bayer_pattern).strip().upper() if bayer_pattern else None)

    # detector numbers
    gain, gain_origin = None, "config"
    gkey, g = first_value(header, "EGAIN")
    if to_float(g) is not None and to_float(g) > 0:
        gain, gain_origin = to_float(g), f"header {gkey}"
    else:
        gkey, g = first_value(header, "GAIN")
        gv = to_float(g)
        if gv is not None and 0 < gv <= _GAIN_MAX_PLAUSIBLE_E_PER_ADU:
            gain, gain_origin = gv, f"header {gkey}"
        elif gv is not None:
            warns.append(
                f"GAIN={g} is not a plausible e-/ADU value (camera gain setting?): ignored"
            )
    if gain is None:
        gain = float(gain_e_per_adu) if gain_e_per_adu is not None else float("nan")
        if gain_e_per_adu is None:
            warns.append("no gain in header or config")

    _, rn = first_value(header, "RDNOISE", "READNOIS", "RDNOIS", "RON", "READNOISE")
    rn = to_float(rn)
    if rn is None or rn <= 0:
        rn = float(read_noise_e) * sw_bin if read_noise_e is not None else float("nan")
        if read_noise_e is None:
            warns.append("no read noise in header or config")

    sat, sat_source = saturation_level(header, saturation_adu)
    if sat is None:
        sat = float("nan")
        warns.append("no saturation level in header or config")
    elif sat_source == "BITDEPTH":
        warns.append(f"no saturation level in header or config: 2**BITDEPTH-1 = {sat:g} ADU used")
    ovscn = to_float(first_value(header, "RPPOVSCN")[1])
    if ovscn and sat == sat:
        # read_frame subtracted a single-HDU frame's overscan (BIASSEC): the raw level saturates
        # that much lower in the image
        sat = sat - ovscn
    if sw_bin > 1 and sat == sat:
        # a software-binned super-pixel is the sum of sw_bin**2 native pixels: it saturates at
        # sw_bin**2 times the native level; a cell with only some of its native pixels saturated
        # is lifted to that level by read_frame (rpp_tasks.inputs.bayer.superpixel_max)
        sat = sat * sw_bin * sw_bin
        warns.append(
            f"saturation level scaled by {sw_bin * sw_bin} for {sw_bin}x{sw_bin} software binning"
        )

    black, black_origin = _black_level(header, bias_level_adu)
    if black is not None and ovscn:
        # the overscan (BIASSEC) already took the pedestal away: no black level on top of it
        warns.append(f"black level ({black_origin}) not used: the overscan was subtracted")
        black, black_origin = None, None
    if black is not None:
        black *= sw_bin * sw_bin

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
        _, rv = first_value(header, rk)
        _, dv = first_value(header, dk)
        if rv is None or dv is None:
            continue
        ra, dec = _angle(rv, hours=isinstance(rv, str)), _angle(dv, hours=False)
        if ra is None or dec is None or not (0 <= ra < 360 + 1e-9) or not (-90 <= dec <= 90):
            warns.append(f"unusable pointing {rk}={rv!r} {dk}={dv!r}")
            continue
        ra_deg, dec_deg = ra % 360.0, dec
        break

    # temperature
    tkey, tv = first_value(
        header, "CCD-TEMP", "CCD_TEMP", "CCDTEMP", "CCDATEMP", "DET-TEMP", "SENSTEMP"
    )
    ccd_temp_c = to_float(tv)
    if ccd_temp_c is not None and ccd_temp_c > 150:
        warns.append(f"{tkey}={ccd_temp_c} read as Kelvin: {ccd_temp_c - 273.15:.2f} C")
        ccd_temp_c = ccd_temp_c - 273.15

    # WCS and scale
    wcheck = header_wcs(header)
    scale = wcheck.pixel_scale_arcsec
    if scale is None and pixel_scale_arcsec is not None:
        scale = float(pixel_scale_arcsec) * sw_bin
    if scale is None:
        _, ps = first_value(header, "PIXSCALE", "SECPIX", "SCALE")
        if to_float(ps):
            scale = to_float(ps) * sw_bin
        else:
            _, px_um = first_value(header, "XPIXSZ")
            _, fl_mm = first_value(header, "FOCALLEN")
            if to_float(px_um) and to_float(fl_mm):
                scale = 206.264806 * to_float(px_um) / to_float(fl_mm) * sw_bin

    ny, nx = (
        int(to_float(first_value(header, "NAXIS2")[1]) or 0),
        int(to_float(first_value(header, "NAXIS1")[1]) or 0),
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
        gain_origin=gain_origin,
        read_noise_e=float(rn),
        saturation_adu=float(sat),
        ra_deg=ra_deg,
        dec_deg=dec_deg,
        object=clean_str(first_value(header, "OBJECT", "FIELD", "OBJNAME")[1]),
        telescope=clean_str(first_value(header, "TELESCOP")[1]),
        instrument=clean_str(first_value(header, "INSTRUME")[1]),
        observer=clean_str(first_value(header, "OBSERVER")[1]),
        binning=_binning(header),
        ccd_temp_c=ccd_temp_c,
        shape=(ny, nx),
        bayer_pattern=pattern,
        wcs_status=wcheck.status,
        pixel_scale_arcsec=None if scale is None else float(scale),
        warnings=tuple(warns),
        bias_level_adu=black,
        bias_level_origin=black_origin,
    )


def _black_level(header, default=None) -> tuple[float | None, str | None]:
    """Black level per native pixel (ADU) from BLKLEVEL / BLACKLVL, else ``default`` (config)."""
    key, v = first_value(header, "BLKLEVEL", "BLACKLVL")
    v = to_float(v)
    if v is not None and v >= 0:
        return v, f"header {key}"
    if default is not None and math.isfinite(float(default)) and float(default) > 0:
        return float(default), "camera.bias_level_adu"
    return None, None


def _attr(obj, *names, default=None):
    for name in names:
        if obj is None:
            return default
        obj = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
    return default if obj is None else obj


def normalize_kwargs_from_config(obs) -> dict:
    """Keyword arguments of `normalize_header` from an `ObservatoryConfig`.

    Or from the same shape as dicts.
    """
    return {
        "filter_aliases": dict(_attr(obs, "filters", "aliases", default={})),
        "default_band": _attr(obs, "filters", "default_band"),
        "gain_e_per_adu": _attr(obs, "camera", "gain_e_per_adu"),
        "read_noise_e": _attr(obs, "camera", "read_noise_e"),
        "saturation_adu": _attr(obs, "camera", "saturation_adu"),
        "pixel_scale_arcsec": _attr(obs, "camera", "pixel_scale_arcsec"),
        "bayer_pattern": _attr(obs, "camera", "bayer_pattern"),
        "bias_level_adu": _attr(obs, "camera", "bias_level_adu"),
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
