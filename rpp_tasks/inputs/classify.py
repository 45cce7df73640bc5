"""What kind of frame a file is: science, bias, dark or flat, or unknown, and why.

classify_frame_reason applies the documented rule (docs/inputs.md) in order: the observatory's
file-name patterns, the header's frame type (IMAGETYP and its synonyms), then header heuristics
(OBJECT/FIELD naming a flat or a bias, a closed shutter, EXPTIME), else unknown with the reason.
group_session (rpp_tasks.inputs.frames) builds the session plan from it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from rpp_tasks.inputs.cards import first_value
from rpp_tasks.inputs.header import (
    FrameMeta,
    frame_stem,
    normalize_imagetyp,
)

__all__ = ["FRAME_KINDS", "classify_frame", "classify_frame_reason"]

FRAME_KINDS = ("bias", "dark", "flat", "science", "unknown")


# OBJECT/FIELD values that name a calibration frame. Only flats and biases: "Dark" starts many real
# object names (Dark Doodad Nebula) and darks are reliably typed by capture software.
_OBJECT_RULES = (
    ("flat", re.compile(r"^\s*(sky|dome|twilight|twi|lamp|auto)?[\s_-]*flat", re.IGNORECASE)),
    ("bias", re.compile(r"^\s*(bias|zero|offset)([\s_\-\d]|$)", re.IGNORECASE)),
)


def _match_patterns(name: str, patterns: Mapping[str, Iterable[str]] | None) -> str | None:
    """The first kind (in bias, dark, flat order) whose case-insensitive glob matches ``name``."""
    if not patterns:
        return None
    unknown = set(patterns) - set(FRAME_KINDS)
    if unknown:
        msg = f"patterns: unknown frame kinds {sorted(unknown)} (expected some of {FRAME_KINDS})"
        raise ValueError(msg)
    low = name.lower()
    for kind in ("bias", "dark", "flat", "science"):
        for pat in patterns.get(kind, ()) or ():
            if fnmatch.fnmatchcase(low, str(pat).lower()):
                return kind
    return None


# Words of a file or folder name that name a frame type (capture software conventions: NINA's
# LIGHT/DARK/FLAT/BIAS folders, ASIAIR/KStars/SGP "Light_", "Dark_", "Flat_", "Bias_" prefixes).
_NAME_TOKENS = {
    "science": ("light", "lights", "science", "object", "sci"),
    "bias": ("bias", "biases", "offset", "offsets", "zero", "zeros"),
    "dark": ("dark", "darks", "darkflat", "darkflats", "flatdark", "flatdarks"),
    "flat": ("flat", "flats", "skyflat", "skyflats", "domeflat", "domeflats", "twiflat"),
}
_TOKEN_KIND = {t: k for k, ts in _NAME_TOKENS.items() for t in ts}

# IMAGETYP/OBSTYPE values of frames that are not imaging frames at all (spectroscopic lamps).
_NOT_IMAGING = re.compile(r"^\s*(arc|lamp|comp|comparison|wave|wavecal|neon|argon|thar)\b", re.I)

# Shutter-state keywords (INDI, SBIG, ESO-style) and the values that mean closed.
_SHUTTER_KEYS = ("SHUTTER", "SHUTSTAT", "SHUTSTATE", "SHUTTERS", "SHUT_ST", "ESO INS SHUT ST")
_SHUTTER_CLOSED = {"closed", "close", "c", "shut", "0", "false", "f"}


def _meta_kind(meta_or_imagetyp):
    if isinstance(meta_or_imagetyp, FrameMeta):
        return meta_or_imagetyp.imagetyp
    if meta_or_imagetyp is None:
        return "unknown"
    if isinstance(meta_or_imagetyp, str):
        if meta_or_imagetyp in FRAME_KINDS:
            return meta_or_imagetyp
        return normalize_imagetyp(meta_or_imagetyp)[0]
    msg = (
        "meta_or_imagetyp must be a FrameMeta, a str or None, "
        f"got {type(meta_or_imagetyp).__name__}"
    )
    raise TypeError(msg)


def _name_tokens(path, root=None) -> list[tuple[str, str]]:
    """(kind, word) for the frame-type words of the file name, then of its folders under root."""
    p = Path(path)
    parts = [frame_stem(p)]
    if root is not None:
        with contextlib.suppress(ValueError):
            parts += list(reversed(p.parent.relative_to(root).parts))
    out = []
    for part in parts:
        words = [w for w in re.split(r"[^a-z]+", part.lower()) if w]
        kinds = {_TOKEN_KIND[w]: w for w in words if w in _TOKEN_KIND}
        if len(kinds) == 1:
            out.append(next(iter(kinds.items())))
        if kinds:
            break  # the file name decides before its folders; two kinds in one name: no decision
    return out


def _shutter_closed(header) -> str | None:
    if header is None:
        return None
    for key in _SHUTTER_KEYS:
        k, v = first_value(header, key)
        if k is not None and str(v).strip().lower() in _SHUTTER_CLOSED:
            return f"{k}={v!r}"
    return None


def _type_keyword(header, raw) -> str:
    """Which of IMAGETYP, IMAGETYPE, FRAME, FRAMETYP, OBSTYPE holds the decisive value."""
    if raw is not None:
        for key in ("IMAGETYP", "IMAGETYPE", "FRAME", "FRAMETYP", "OBSTYPE"):
            _, value = first_value(header, key)
            if value is not None and str(value) == str(raw):
                return key
    return "IMAGETYP"


def classify_frame_reason(meta_or_imagetyp, path, *, patterns=None, header=None, root=None):
    """
    Frame type of one file and the reason, by the session rule (``docs/inputs.md``).

    1. The header type (IMAGETYP, IMAGETYPE, FRAME, FRAMETYP, OBSTYPE; a zero-second dark is a
       bias) when it is a calibration type: ``bias``, ``dark``, ``flat`` are trusted.
    2. A configured file-name pattern (``session.frame_types``: case-insensitive globs on the file
       name) overrides a science or missing header type: how an operator fixes software that
       writes every frame as ``Light``.
    3. An OBJECT/FIELD naming a calibration: ``flat``, ``skyflat``, ``twilight flat``, ``domeflat``
       ... -> flat; ``bias``, ``zero``, ``offset`` -> bias (the Huntsman flats say
       ``IMAGETYP='Light Frame'``, ``FIELD='FlatDither00'``). Darks are never inferred from
       object names ("Dark Doodad Nebula").
    4. A header science type (``Light``, ``Object``, ``EXPOSE``, ``Snapshot``, ...) -> science.
    5. No usable header type (IMAGETYP missing, or a value such as ``'Focus'`` or ``'Test'``):

       a. a frame-type word of the file name, else of its folders below the session root
          (``Light_M31_300s.fit``, ``DARK/...``, ``Flat_L_0001.fits``; ``darkflat`` counts as
          a dark);
       b. the exposure: ``EXPTIME=0`` -> bias;
       c. a shutter keyword saying closed (SHUTTER, SHUTSTAT, ...) -> dark;
       d. a positive exposure and a sign that the frame looks at the sky (OBJECT/FIELD, a
          pointing RA/DEC, or a valid WCS) -> science;
       e. else ``unknown``: the session rejects the file with the returned reason.

    A spectroscopic lamp (IMAGETYP ``ARC``, ``LAMP``, ``COMP``) is ``unknown``: it is not an
    imaging frame.

    Parameters
    ----------
    meta_or_imagetyp : `~rpp_tasks.inputs.header.FrameMeta` or str or None
        The normalised header, or a raw/normalised IMAGETYP value (then rules 3 and 5b-d are
        skipped).
    path : str or Path
        The file.
    patterns : Mapping[str, list of str], optional
        Kind -> case-insensitive globs on the file name.
    header : `~astropy.io.fits.Header`, optional
        The raw header (raw IMAGETYP value, shutter keywords).
    root : str or Path, optional
        Session folder: folder names below it count in rule 5a.

    Returns
    -------
    kind : str
    reason : str
    """
    kind = _meta_kind(meta_or_imagetyp)
    meta = meta_or_imagetyp if isinstance(meta_or_imagetyp, FrameMeta) else None
    raw_type, type_key = None, "IMAGETYP"
    if header is not None:
        _, raw_type = normalize_imagetyp(header)
        type_key = _type_keyword(header, raw_type)
    elif isinstance(meta_or_imagetyp, str):
        raw_type = meta_or_imagetyp
    said = f"{type_key}={raw_type!r}" if raw_type is not None else "no IMAGETYP"
    if kind in ("bias", "dark", "flat"):
        return kind, f"header {said}"
    by_name = _match_patterns(Path(path).name, patterns)
    if by_name is not None:
        pat = _matching_pattern(Path(path).name, patterns, by_name)
        return by_name, f"file name matches {pat!r} (session.frame_types); header {said}"
    obj = meta.object if meta is not None else None
    if obj:
        for k, rx in _OBJECT_RULES:
            if rx.match(obj):
                return k, f"OBJECT/FIELD {obj!r} names a {k}; header {said}"
    if kind == "science":
        return "science", f"header {said}"
    if raw_type is not None and _NOT_IMAGING.match(str(raw_type)):
        return "unknown", f"{said} is a spectroscopic lamp frame, not an imaging frame"
    what = f"{said} is not a frame type" if raw_type is not None else said
    tokens = _name_tokens(path, root)
    if tokens:
        k, word = tokens[0]
        return k, f"{what}; the name says {word!r}"
    if meta is None:
        return "unknown", f"{what} and the file name names no frame type"
    exptime = meta.exptime_s
    if exptime == 0.0:
        return "bias", f"{what}; EXPTIME=0 s: a zero-second exposure is a bias"
    closed = _shutter_closed(header)
    if closed and exptime is not None:
        return "dark", f"{what}; shutter closed ({closed}) with a {exptime:g} s exposure: a dark"
    sky = []
    if obj:
        sky.append(f"OBJECT/FIELD {obj!r}")
    if meta.ra_deg is not None:
        sky.append("a pointing RA/DEC")
    if str(meta.wcs_status).startswith("valid"):
        sky.append("a valid WCS")
    if exptime is not None and exptime > 0 and sky:
        return "science", f"{what}; a {exptime:g} s exposure with {' and '.join(sky)}: a sky frame"
    lacks = " and ".join(
        ([] if sky else ["no OBJECT, pointing or WCS"])
        + (["no usable exposure time"] if exptime is None else [])
    )
    return "unknown", (
        f"frame type unknown: {what}, the file name names no frame type and the header has "
        f"{lacks} (set IMAGETYP, or add a file-name pattern to session.frame_types)"
    )


def classify_frame(meta_or_imagetyp, path, *, patterns=None, header=None, root=None):
    """
    Frame type of one file: ``bias``, ``dark``, ``flat``, ``science`` or ``unknown``.

    `classify_frame_reason` without the reason (same rule, same parameters).
    """
    return classify_frame_reason(
        meta_or_imagetyp, path, patterns=patterns, header=header, root=root
    )[0]


def _matching_pattern(name: str, patterns, kind: str) -> str:
    low = name.lower()
    for pat in patterns.get(kind, ()) or ():
        if fnmatch.fnmatchcase(low, str(pat).lower()):
            return str(pat)
    return "?"
