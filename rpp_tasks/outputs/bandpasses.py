"""Photometric bandpasses as wavelength ranges in metres, for ObsCore ``em_min``/``em_max``.

One table, keyed by a canonical band name, with the aliases found in FITS ``FILTER`` keywords.
The edges are deliberately **generous** (roughly where the transmission falls to ~1 % of its
peak): ObsCore/SIAP2 ``BAND`` queries test interval overlap, and a too narrow range would hide a
frame from a user's search, while a slightly too wide one costs nothing.

Sources of the edges (nanometres, rounded outwards to whole nm):

``dachs``
    GAVO DaCHS 2.7, ``gavo/resources/data/filters.txt`` ("low, characteristic, high, with all
    values in nanometers"; used by DaCHS's own ``//siap#getBandFromFilter``). Using it keeps our
    values consistent with other DaCHS image collections.
``speclite``
    Filter curves shipped with the PyPI package ``speclite`` 1.0.0 (``bessell-*``,
    ``sdss2010-*``, ``gaiadr3-*``, ``panstarrs-*``); edges where the transmission is >= 1 % of the
    peak (project research notes, ``shared/specs/obscore_dachs.md`` section 1.4).
``project``
    Our own definitions for filters no public table has (see below).

Where two sources disagree, the union of their ranges is used. Project definitions:

* ``Clear`` -- no filter on a silicon CCD/CMOS: 300-1100 nm (where silicon detectors have
  non-negligible quantum efficiency). Aliases ``CLR``, ``None``, ``Open``, ``Empty``,
  ``Unfiltered``.
* ``L`` -- luminance / UV-IR-cut filter (Baader L, Astronomik L-1/L-2/L-3, the Seestar "IRCUT"):
  390-710 nm; these pass about 400-700 nm at half maximum.
* ``Red``, ``Green``, ``Blue`` -- amateur RGB imaging filters (type-2c and similar):
  580-710, 480-590, 380-520 nm. Bare ``G`` is **not** an alias (Gaia G or green?): map it in the
  observatory's ``filters.aliases``.
* ``Ha``, ``OIII``, ``SII`` -- narrow-band filters centred on 656.3, 500.7 and 671.6 nm, ranges
  covering 3-12 nm wide filters: 650-663, 494-507, 665-678 nm.

Single-letter names are case-sensitive (``R`` is Cousins R, ``r`` is SDSS r); longer names are
matched case-insensitively, ignoring spaces, ``_``, ``-``, a trailing ``band``/``filter`` word
and the prime (``g'`` matches ``g'`` first, then ``g``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass

__all__ = ["Bandpass", "BANDPASSES", "lookup_bandpass", "canonical_band"]

log = logging.getLogger(__name__)

_NM = 1e-9


@dataclass(frozen=True)
class Bandpass:
    """One photometric band.

    Attributes
    ----------
    name : str
        Canonical name (key of `BANDPASSES`).
    system : str
        Photometric system, e.g. ``"Johnson-Cousins"``, ``"SDSS"``, ``"Gaia"``.
    em_min_m, em_max_m : float
        Generous lower and upper wavelength edges in metres (vacuum).
    em_eff_m : float
        Characteristic (effective) wavelength in metres.
    source : str
        Where the edges come from (``dachs``, ``speclite``, ``project``, or a union).
    aliases : tuple of str
        Other spellings found in FITS ``FILTER`` keywords.
    """

    name: str
    system: str
    em_min_m: float
    em_max_m: float
    em_eff_m: float
    source: str
    aliases: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-safe dictionary."""
        return {**asdict(self), "aliases": list(self.aliases)}


def _bp(name, system, lo_nm, eff_nm, hi_nm, source, *aliases):
    return Bandpass(name, system, lo_nm * _NM, hi_nm * _NM, eff_nm * _NM, source, tuple(aliases))


_TABLE = (
    # Johnson-Cousins (UBV Johnson, R I Cousins as realised by Bessell 1990).
    _bp(
        "U",
        "Johnson-Cousins",
        300,
        360,
        415,
        "dachs Johnson U 300-390 + speclite bessell-U 305-415",
        "Johnson U",
        "Bessell U",
        "Bessel U",
        "U_Johnson",
    ),
    _bp(
        "B",
        "Johnson-Cousins",
        360,
        440,
        560,
        "dachs Johnson B 370-550, Bessel B 360-560; speclite 370-540",
        "Johnson B",
        "Bessell B",
        "Bessel B",
        "B_Johnson",
    ),
    _bp(
        "V",
        "Johnson-Cousins",
        480,
        550,
        730,
        "dachs Johnson V 480-730; speclite bessell-V 480-680",
        "Johnson V",
        "Bessell V",
        "Bessel V",
        "V_Johnson",
    ),
    _bp(
        "R",
        "Johnson-Cousins",
        560,
        650,
        870,
        "dachs Cousins R 560-870; speclite bessell-R 560-850",
        "Rc",
        "Cousins R",
        "Bessell R",
        "Bessel R",
        "R_Cousins",
    ),
    _bp(
        "I",
        "Johnson-Cousins",
        700,
        800,
        920,
        "dachs Cousins I 705-885; speclite bessell-I 710-910",
        "Ic",
        "Cousins I",
        "Bessell I",
        "Bessel I",
        "I_Cousins",
    ),
    _bp("Johnson R", "Johnson", 540, 693, 940, "dachs Johnson R", "Rj", "R_Johnson"),
    _bp("Johnson I", "Johnson", 700, 878, 1160, "dachs Johnson I", "Ij", "I_Johnson"),
    # Sloan, primed (USNO u'g'r'i'z' filters used on most small telescopes).
    _bp(
        "u'", "SDSS primed", 300, 356, 410, "dachs SDSS u'", "Sloan u'", "SDSS u'", "up", "u_prime"
    ),
    _bp(
        "g'", "SDSS primed", 365, 471, 580, "dachs SDSS g'", "Sloan g'", "SDSS g'", "gp", "g_prime"
    ),
    _bp(
        "r'", "SDSS primed", 540, 618, 720, "dachs SDSS r'", "Sloan r'", "SDSS r'", "rp", "r_prime"
    ),
    _bp(
        "i'", "SDSS primed", 645, 749, 860, "dachs SDSS i'", "Sloan i'", "SDSS i'", "ip", "i_prime"
    ),
    _bp(
        "z'", "SDSS primed", 778, 896, 1118, "dachs SDSS z'", "Sloan z'", "SDSS z'", "zp", "z_prime"
    ),
    # SDSS 2.5 m system, unprimed.
    _bp(
        "u", "SDSS", 305, 359, 402, "dachs SDSS u; speclite sdss2010-u 308-402", "SDSS u", "Sloan u"
    ),
    _bp(
        "g", "SDSS", 378, 464, 555, "dachs SDSS g; speclite sdss2010-g 380-554", "SDSS g", "Sloan g"
    ),
    _bp(
        "r", "SDSS", 542, 612, 699, "dachs SDSS r; speclite sdss2010-r 544-698", "SDSS r", "Sloan r"
    ),
    _bp(
        "i", "SDSS", 669, 744, 839, "dachs SDSS i; speclite sdss2010-i 672-836", "SDSS i", "Sloan i"
    ),
    _bp(
        "z",
        "SDSS",
        794,
        890,
        1083,
        "dachs SDSS z 796-1083 + speclite sdss2010-z 794-1070",
        "SDSS z",
        "Sloan z",
    ),
    # Gaia DR3 passbands.
    _bp(
        "Gaia G",
        "Gaia",
        325,
        600,
        1030,
        "dachs Gaia G 325-1000 + speclite gaiadr3-G 330-1030",
        "G_Gaia",
        "GaiaG",
        "Gaia_G",
        "phot_g",
    ),
    _bp(
        "Gaia BP",
        "Gaia",
        325,
        500,
        673,
        "dachs Gaia BP 325-670 + speclite gaiadr3-BP 330-673",
        "BP",
        "G_BP",
        "GBP",
        "Gaia_BP",
        "phot_bp",
    ),
    _bp(
        "Gaia RP",
        "Gaia",
        620,
        750,
        1042,
        "dachs Gaia RP 625-1000 + speclite gaiadr3-RP 620-1042",
        "RP",
        "G_RP",
        "GRP",
        "Gaia_RP",
        "phot_rp",
    ),
    # Pan-STARRS1.
    _bp(
        "PS1 g",
        "Pan-STARRS",
        395,
        481,
        559,
        "speclite panstarrs-g",
        "Pan-STARRS g",
        "PS g",
        "g_PS1",
    ),
    _bp(
        "PS1 r",
        "Pan-STARRS",
        539,
        617,
        703,
        "speclite panstarrs-r",
        "Pan-STARRS r",
        "PS r",
        "r_PS1",
    ),
    _bp(
        "PS1 i",
        "Pan-STARRS",
        678,
        752,
        830,
        "speclite panstarrs-i",
        "Pan-STARRS i",
        "PS i",
        "i_PS1",
    ),
    _bp(
        "PS1 z",
        "Pan-STARRS",
        803,
        866,
        934,
        "speclite panstarrs-z",
        "Pan-STARRS z",
        "PS z",
        "z_PS1",
    ),
    _bp(
        "PS1 y",
        "Pan-STARRS",
        911,
        962,
        1083,
        "speclite panstarrs-y 911-1083; dachs PS1 y 950-1030",
        "Pan-STARRS y",
        "PS y",
        "y_PS1",
        "y",
    ),
    # Project definitions (no public table has them).
    _bp(
        "Clear",
        "unfiltered",
        300,
        600,
        1100,
        "project: silicon detector QE range",
        "CLR",
        "None",
        "No filter",
        "Open",
        "Empty",
        "Unfiltered",
        "OSC",
    ),
    _bp(
        "L",
        "luminance",
        390,
        550,
        710,
        "project: UV/IR-cut luminance, ~400-700 nm at 50 %",
        "Lum",
        "Luminance",
        "IRCUT",
        "IR-cut",
        "UV/IR cut",
        "UVIR",
        "UV-IR",
        "L-1",
        "L-2",
        "L-3",
    ),
    _bp("Red", "amateur RGB", 580, 640, 710, "project: RGB imaging filters", "Rd"),
    _bp("Green", "amateur RGB", 480, 535, 590, "project: RGB imaging filters", "Gr", "Grn"),
    _bp("Blue", "amateur RGB", 380, 450, 520, "project: RGB imaging filters", "Bl", "Blu"),
    _bp(
        "Ha",
        "narrow-band",
        650,
        656.3,
        663,
        "project: H-alpha 656.3 nm, 3-12 nm filters",
        "H-alpha",
        "Halpha",
        "H_alpha",
        "H-a",
        "HA",
    ),
    _bp(
        "OIII",
        "narrow-band",
        494,
        500.7,
        507,
        "project: [O III] 500.7 nm, 3-12 nm filters",
        "O3",
        "O-III",
        "[OIII]",
    ),
    _bp(
        "SII",
        "narrow-band",
        665,
        671.6,
        678,
        "project: [S II] 671.6 nm, 3-12 nm filters",
        "S2",
        "S-II",
        "[SII]",
    ),
)

#: Canonical band name -> `Bandpass`.
BANDPASSES: dict[str, Bandpass] = {bp.name: bp for bp in _TABLE}


def _fold(name: str) -> str:
    """Case-fold and drop separators and a trailing 'band'/'filter' word."""
    s = name.strip().lower()
    s = re.sub(r"[\s_\-]*(band|filter|flt)$", "", s)
    return re.sub(r"[\s_\-]+", "", s)


def _build_index():
    exact: dict[str, str] = {}
    folded: dict[str, str] = {}
    for bp in _TABLE:
        for spelling in (bp.name, *bp.aliases):
            exact[spelling] = bp.name
            if len(_fold(spelling)) > 1:
                folded.setdefault(_fold(spelling), bp.name)
    return exact, folded


_EXACT, _FOLDED = _build_index()


def canonical_band(filter_name: str | None) -> str | None:
    """
    Canonical band name for a FITS ``FILTER`` value, or None when unknown.

    Parameters
    ----------
    filter_name : str or None
        Raw filter name (``"g_band"``, ``"Johnson V"``, ``"IRCUT"``, ``"r'"``...).

    Returns
    -------
    name : str or None
        A key of `BANDPASSES`, or None (never a guess) for unknown or ambiguous names.
    """
    if filter_name is None:
        return None
    raw = str(filter_name).strip()
    if not raw:
        return None
    if raw in _EXACT:
        return _EXACT[raw]
    # "g_band", "V band", "R-filter": strip the decoration, then single letters stay case-sensitive
    stripped = re.sub(r"[\s_\-]*(band|filter|flt)$", "", raw, flags=re.IGNORECASE).strip()
    if stripped in _EXACT:
        return _EXACT[stripped]
    folded = _fold(raw)
    if len(folded) > 1 and folded in _FOLDED:
        return _FOLDED[folded]
    return None


def lookup_bandpass(filter_name: str | None) -> Bandpass | None:
    """
    `Bandpass` for a FITS ``FILTER`` value or a band name, or None when unknown.

    Parameters
    ----------
    filter_name : str or None
        Raw filter name or canonical band name.

    Returns
    -------
    bandpass : `Bandpass` or None
        None for unknown names; the caller then leaves ``em_min``/``em_max`` empty rather than
        guessing.

    Examples
    --------
    >>> bp = lookup_bandpass("Johnson V")
    >>> round(bp.em_min_m * 1e9), round(bp.em_max_m * 1e9)
    (480, 730)
    """
    name = canonical_band(filter_name)
    if name is None:
        if filter_name not in (None, ""):
            log.debug("bandpasses: unknown filter name %r", filter_name)
        return None
    return BANDPASSES[name]
