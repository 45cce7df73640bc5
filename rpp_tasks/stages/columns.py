"""Names of the catalogue columns that the outputs read: one name each, defined here.

The stages write these columns (``docs/ARCHITECTURE.md``, "Source tables"); the report, the plots
and the notifications read them by these names and nothing else (no spelling is guessed).
"""

from __future__ import annotations

__all__ = [
    "X",
    "Y",
    "ID",
    "RA",
    "DEC",
    "SNR",
    "SIMBAD_ID",
    "QUALITY",
    "REF_MAG",
    "ZP_STAR",
    "CUTOUT",
    "PHOT_TYPES",
    "mag",
    "mag_err",
]

X, Y = "x_centroid", "y_centroid"  # 0-based pixel position of a source or candidate
ID = "id"
RA, DEC = "ra", "dec"  # ICRS degrees (NaN without a valid WCS)
SNR = "snr"  # the S/N of the quality class (PSF when fitted, else the 1.3 FWHM aperture)
SIMBAD_ID = "simbad_main_id"  # SIMBAD counterpart ("" when none)
QUALITY = "quality"  # "good" | "marginal" | "poor" (S/N class)
REF_MAG = "ref_mag"  # matched reference-catalogue magnitude (zero-point stage)
ZP_STAR = "zp_star"  # used in the zero-point fit
CUTOUT = "cutout"  # PNG cutout file of a transient candidate

#: Photometry types, in the order the headline zero point prefers them.
PHOT_TYPES = ("psf", "1p3fwhm", "1p1fwhm", "fixed")


def mag(phot_type: str, *, calibrated: bool = False) -> str:
    """Magnitude column of a photometry type: ``mag_<t>`` (instrumental, per second) or
    ``mag_cal_<t>`` (calibrated by the zero-point stage)."""
    return f"mag_cal_{phot_type}" if calibrated else f"mag_{phot_type}"


def mag_err(phot_type: str, *, calibrated: bool = False) -> str:
    """Error column of `mag`: ``mag_err_<t>`` or ``mag_cal_err_<t>``."""
    return f"mag_cal_err_{phot_type}" if calibrated else f"mag_err_{phot_type}"
