"""Values out of FITS header cards, tolerant of what real camera software writes.

The primitives the other `rpp_tasks.inputs` modules share: `first_value` (the first present,
non-empty value among synonym keywords, skipping cards astropy cannot parse), `to_float` (a number
from a card, including strings such as ``'300.0 s'``), `clean_str` and `set_shape` (the NAXIS
keywords of a header copy). Nothing here writes a file.
"""

from __future__ import annotations

import math
import re

import numpy as np
from astropy.io import fits

__all__ = ["CHECK_STAGE", "first_value", "to_float", "clean_str", "set_shape"]

# Stage name of every rejection made while a raw frame is read and its header normalised.
CHECK_STAGE = "check"


def first_value(header, *keys):
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


def to_float(value) -> float | None:
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


def clean_str(value) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s or None


def set_shape(header: fits.Header, shape: tuple[int, int]) -> None:
    """Put NAXIS/NAXIS1/NAXIS2 describing ``shape`` at the top of ``header`` (in place)."""
    for key in ("NAXIS", "NAXIS1", "NAXIS2"):
        header.remove(key, ignore_missing=True, remove_all=True)
    header.insert(0, ("NAXIS", 2, "number of array dimensions"))
    header.insert(1, ("NAXIS1", int(shape[1]), "[px] x size of the image read"))
    header.insert(2, ("NAXIS2", int(shape[0]), "[px] y size of the image read"))
