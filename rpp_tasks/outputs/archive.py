"""ObsCore archive: one row per product, upserted into an ObsCore-shaped table.

The table contract (see ``archive/README.md``):

* The project ships a GAVO DaCHS resource descriptor (``archive/dachs/q.rd``) declaring the
  table ``rpp.main`` with the ObsCore 1.1 columns (``//obscore#obscore-columns``) and the mixin
  ``//obscore#publishObscoreLike``. DaCHS creates the table and adds it to the ``ivoa.obscore``
  view, TAP and SIAP2. The pipeline only **upserts rows** (``INSERT ... ON CONFLICT
  (obs_publisher_did) DO UPDATE``) as the least-privilege role ``rpp_pipeline`` and never writes
  ``ivoa.*``.
* Without PostgreSQL, the same table lives in SQLite (the embedded default), with ``s_region`` as
  a DALI polygon string (``"ra1 dec1 ra2 dec2 ..."``, degrees ICRS).

Everything a row carries is computed here from the FITS header and its WCS: MJD times, the
footprint (SIP distortion applied, sampled along the edges), wavelengths in metres from
`rpp_tasks.outputs.bandpasses` or a 1-D spectral WCS, sizes in kB and a stable publisher DID.

Pure functions: `to_obscore_row`, `celestial_footprint`, `spectral_range_m`, `make_publisher_did`,
and the polygon converters. Database functions: `create_obscore_table`, `upsert_obscore`,
`covering_query`. Adapter: `run_archive`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from urllib.parse import quote

import numpy as np

from rpp_tasks.exceptions import RppError
from rpp_tasks.outputs.bandpasses import canonical_band, lookup_bandpass

__all__ = [
    "DEFAULT_TABLE",
    "OBSCORE_COLUMNS",
    "Footprint",
    "ObsCoreRow",
    "UpsertResult",
    "ArchiveResult",
    "celestial_footprint",
    "spectral_range_m",
    "make_publisher_did",
    "to_obscore_row",
    "dali_to_spoly",
    "dali_to_stcs",
    "spoly_to_dali",
    "polygon_contains",
    "create_obscore_table",
    "upsert_obscore",
    "covering_query",
    "read_product_header",
    "run_archive",
]

log = logging.getLogger(__name__)

#: Default table: the one declared by ``archive/dachs/q.rd`` (schema ``rpp``). In SQLite the dot
#: becomes an underscore (``rpp_main``).
DEFAULT_TABLE = "rpp.main"

_DATAPRODUCT_TYPES = (
    "image",
    "cube",
    "spectrum",
    "sed",
    "timeseries",
    "visibility",
    "event",
    "measurements",
)
_SPECTRAL_CTYPES = ("WAVE", "AWAV", "WAVELENGTH", "LAMBDA", "WAVELENG")


# ---------------------------------------------------------------------------------------------
# Row type
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObsCoreRow:
    """One ObsCore 1.1 row (DaCHS 2.7 ``//obscore#obscore-columns`` order) plus two extras.

    Units follow ObsCore: ``s_ra``/``s_dec``/``s_fov`` deg (ICRS; ``s_fov`` is a diameter),
    ``s_resolution``/``s_pixel_scale`` arcsec, ``t_min``/``t_max`` MJD (UTC), ``t_exptime`` and
    ``t_resolution`` s, ``em_min``/``em_max`` m (vacuum), ``access_estsize`` kB.
    ``s_region`` is the footprint as a DALI polygon string (``"ra1 dec1 ra2 dec2 ..."``, degrees,
    counter-clockwise on the sky, no repeated closing vertex) or None when there is no reliable
    footprint; the PostgreSQL writer casts it to a pgsphere ``spoly``.

    ``rpp_session`` (the reduction session) and ``rpp_band`` (canonical band name, or the raw
    filter name when unknown) are project columns: queryable in ``rpp.main`` through TAP but not
    part of ``ivoa.obscore``. DaCHS's ``source_table`` column is filled by the ``ivoa.obscore``
    view and is not written by the pipeline.
    """

    dataproduct_type: str
    dataproduct_subtype: str | None
    calib_level: int
    obs_collection: str
    obs_id: str
    obs_title: str | None
    obs_publisher_did: str
    obs_creator_did: str | None
    access_url: str
    access_format: str
    access_estsize: int | None
    target_name: str | None
    target_class: str | None
    s_ra: float | None
    s_dec: float | None
    s_fov: float | None
    s_region: str | None
    s_resolution: float | None
    t_min: float | None
    t_max: float | None
    t_exptime: float | None
    t_resolution: float | None
    em_min: float | None
    em_max: float | None
    em_res_power: float | None
    o_ucd: str | None
    pol_states: str | None
    facility_name: str | None
    instrument_name: str | None
    s_xel1: int | None
    s_xel2: int | None
    t_xel: int | None
    em_xel: int | None
    pol_xel: int | None
    s_pixel_scale: float | None
    em_ucd: str | None
    preview: str | None
    rpp_session: str | None = None
    rpp_band: str | None = None

    def to_dict(self) -> dict:
        """JSON-safe dictionary, keys = column names."""
        return asdict(self)


#: Column names in table order (the fields of `ObsCoreRow`).
OBSCORE_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ObsCoreRow))

# SQL types: PostgreSQL as DaCHS 2.7 declares them (obscore.rd), SQLite affinities.
_PG_TYPES = {
    "calib_level": "smallint NOT NULL",
    "access_estsize": "bigint",
    "s_ra": "double precision",
    "s_dec": "double precision",
    "s_fov": "double precision",
    "s_region": "spoly",
    "s_resolution": "double precision",
    "t_min": "double precision",
    "t_max": "double precision",
    "t_exptime": "real",
    "t_resolution": "real",
    "em_min": "double precision",
    "em_max": "double precision",
    "em_res_power": "double precision",
    "s_xel1": "bigint",
    "s_xel2": "bigint",
    "t_xel": "bigint",
    "em_xel": "bigint",
    "pol_xel": "bigint",
    "s_pixel_scale": "double precision",
}
_INT_COLUMNS = {"calib_level", "access_estsize", "s_xel1", "s_xel2", "t_xel", "em_xel", "pol_xel"}


@dataclass(frozen=True)
class Footprint:
    """Celestial footprint of an image (ICRS degrees).

    Attributes
    ----------
    vertices_deg : tuple of (ra, dec)
        Polygon vertices along the outer pixel edges, counter-clockwise on the sky.
    center_ra_deg, center_dec_deg : float
        World coordinates of the image centre pixel.
    fov_deg : float
        Largest great-circle distance between two vertices (the diagonal: a diameter).
    pixel_scale_arcsec : float
        Mean pixel scale at the reference point.
    sip : bool
        Whether SIP distortion was applied.
    notes : tuple of str
        E.g. ``("CTYPE without -SIP: SIP applied", "FK5 -> ICRS")``.
    """

    vertices_deg: tuple[tuple[float, float], ...]
    center_ra_deg: float
    center_dec_deg: float
    fov_deg: float
    pixel_scale_arcsec: float
    sip: bool
    notes: tuple[str, ...] = ()

    def to_dali(self) -> str:
        """DALI polygon string ``"ra1 dec1 ra2 dec2 ..."`` in degrees."""
        return " ".join(f"{ra:.7f} {dec:.7f}" for ra, dec in self.vertices_deg)

    def to_dict(self) -> dict:
        """JSON-safe dictionary."""
        d = asdict(self)
        d["vertices_deg"] = [list(v) for v in self.vertices_deg]
        d["notes"] = list(self.notes)
        return d


# ---------------------------------------------------------------------------------------------
# Spherical geometry helpers (plain numpy)
# ---------------------------------------------------------------------------------------------


def _unit(ra_deg, dec_deg):
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _gc_dist_deg(v1, v2):
    """Great-circle distance (deg) between unit vectors (broadcasting)."""
    cross = np.linalg.norm(np.cross(v1, v2), axis=-1)
    dot = np.sum(v1 * v2, axis=-1)
    return np.degrees(np.arctan2(cross, dot))


def _orientation(vecs) -> float:
    """Positive when the polygon is counter-clockwise seen from the origin toward the sky."""
    centroid = vecs.mean(axis=0)
    return float(
        sum(
            np.dot(np.cross(vecs[i], vecs[(i + 1) % len(vecs)]), centroid) for i in range(len(vecs))
        )
    )


def _gnomonic(vecs, ra0_deg, dec0_deg):
    """Gnomonic projection about (ra0, dec0): great circles become straight lines.

    Returns (xi, eta, cos_c); points with cos_c <= 0 are on the far hemisphere.
    """
    ra0, dec0 = math.radians(ra0_deg), math.radians(dec0_deg)
    east = np.array([-math.sin(ra0), math.cos(ra0), 0.0])
    north = np.array(
        [-math.sin(dec0) * math.cos(ra0), -math.sin(dec0) * math.sin(ra0), math.cos(dec0)]
    )
    centre = _unit(ra0_deg, dec0_deg)
    cos_c = vecs @ centre
    with np.errstate(divide="ignore", invalid="ignore"):
        return (vecs @ east) / cos_c, (vecs @ north) / cos_c, cos_c


def _parse_dali(polygon: str) -> np.ndarray:
    values = [float(v) for v in str(polygon).replace(",", " ").split()]
    if len(values) < 6 or len(values) % 2:
        msg = f"a DALI polygon needs >= 3 (ra, dec) pairs, got {len(values)} numbers"
        raise ValueError(msg)
    return np.array(values, dtype=float).reshape(-1, 2)


def polygon_contains(
    polygon: str, ra_deg: float, dec_deg: float, *, radius_deg: float = 0.0
) -> bool:
    """
    Whether a spherical polygon contains a point (``radius_deg=0``) or intersects a circle.

    Exact for polygons with great-circle edges smaller than a hemisphere: the polygon is
    gnomonically projected about the point, where its edges are straight segments and a circle of
    radius r about the point is a circle of radius tan(r).

    Parameters
    ----------
    polygon : str
        DALI polygon string (degrees).
    ra_deg, dec_deg : float
        The position (ICRS degrees).
    radius_deg : float, optional
        Circle radius; 0 tests point containment.

    Returns
    -------
    bool
    """
    pts = _parse_dali(polygon)
    xi, eta, cos_c = _gnomonic(_unit(pts[:, 0], pts[:, 1]), ra_deg, dec_deg)
    if np.any(cos_c <= 1e-9):  # a vertex 90 deg or more away: no overlap for our footprints
        return False
    inside = False
    n = len(xi)
    for i in range(n):  # ray casting from the origin along +xi
        x1, y1, x2, y2 = xi[i], eta[i], xi[(i + 1) % n], eta[(i + 1) % n]
        if (y1 > 0) != (y2 > 0):
            x_cross = x1 + (0.0 - y1) * (x2 - x1) / (y2 - y1)
            if x_cross > 0:
                inside = not inside
    if inside or radius_deg <= 0:
        return inside
    r = math.tan(math.radians(radius_deg))
    for i in range(n):  # distance from the origin to each edge segment
        p = np.array([xi[i], eta[i]])
        q = np.array([xi[(i + 1) % n], eta[(i + 1) % n]])
        d = q - p
        t = 0.0 if not d.any() else float(np.clip(-(p @ d) / (d @ d), 0.0, 1.0))
        if np.hypot(*(p + t * d)) <= r:
            return True
    return False


def dali_to_spoly(polygon: str | None) -> str | None:
    """DALI polygon (degrees) -> pgsphere ``spoly`` literal ``{(ra1d,dec1d),...}``."""
    if polygon is None:
        return None
    return "{" + ",".join(f"({ra:.7f}d,{dec:.7f}d)" for ra, dec in _parse_dali(polygon)) + "}"


def dali_to_stcs(polygon: str | None) -> str | None:
    """DALI polygon -> STC-S ``"Polygon ICRS ra1 dec1 ..."`` (the form DaCHS 2.7's TAP returns)."""
    if polygon is None:
        return None
    return "Polygon ICRS " + " ".join(f"{ra:.7f} {dec:.7f}" for ra, dec in _parse_dali(polygon))


_PG_FLOAT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def spoly_to_dali(spoly: str | None) -> str | None:
    """
    pgsphere ``spoly`` text output -> DALI polygon (degrees).

    Understands the default radian output ``{(1.13 , -0.95),...}`` and the degree output with
    ``d`` suffixes (``set_sphere_output('DEG')``: ``{(65.2d , -54.9d),...}``).
    """
    if spoly is None:
        return None
    pairs = re.findall(rf"\(\s*({_PG_FLOAT})(d?)\s*,\s*({_PG_FLOAT})(d?)\s*\)", str(spoly))
    if not pairs:
        msg = f"not a pgsphere spoly: {spoly!r}"
        raise ValueError(msg)
    out = []
    for ra, ra_d, dec, dec_d in pairs:
        ra_deg = float(ra) if ra_d else math.degrees(float(ra))
        dec_deg = float(dec) if dec_d else math.degrees(float(dec))
        out.append(f"{ra_deg % 360.0:.7f} {dec_deg:.7f}")
    return " ".join(out)


# ---------------------------------------------------------------------------------------------
# Header helpers
# ---------------------------------------------------------------------------------------------


def _as_header(obj):
    """Accept a `fits.Header`, a RawFrame-like object (``.header``) or a mapping of keywords."""
    from astropy.io import fits

    if hasattr(obj, "header") and not isinstance(obj, fits.Header):
        obj = obj.header
    if isinstance(obj, fits.Header):
        return obj.copy()
    if hasattr(obj, "keys"):
        h = fits.Header()
        for key, value in obj.items():
            if (
                isinstance(value, (str, int, float, bool, np.number, np.bool_))
                and len(str(key)) <= 70
            ):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    h[str(key).upper()] = value.item() if isinstance(value, np.generic) else value
        return h
    msg = f"expected a FITS header, a frame with .header or a mapping, got {type(obj).__name__}"
    raise TypeError(msg)


def _meta_dict(meta) -> dict:
    if meta is None:
        return {}
    if isinstance(meta, dict):
        return dict(meta)
    if hasattr(meta, "to_dict"):
        return meta.to_dict()
    if hasattr(meta, "__dataclass_fields__"):
        return asdict(meta)
    msg = f"meta must be a dict or a dataclass (FrameMeta), got {type(meta).__name__}"
    raise TypeError(msg)


def _first(header, *keys):
    for key in keys:
        if key in header:
            value = header[key]
            if isinstance(value, str):
                value = value.strip()
                if value and value.upper() not in ("UNKNOWN", "NONE", "N/A", "-"):
                    return value
            elif value is not None and not (isinstance(value, float) and not math.isfinite(value)):
                return value
    return None


def _finite(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _t_min_mjd(header, meta) -> float | None:
    from astropy.time import Time

    for key in ("DATE-BEG", "DATE-OBS"):
        value = _first(header, key)
        if isinstance(value, str):
            text = value
            if "T" not in text:
                clock = _first(header, "TIME-OBS", "UT", "UTSTART", "TIME-BEG")
                if isinstance(clock, str) and ":" in clock:
                    text = f"{text}T{clock}"
            try:
                return float(Time(text, scale="utc").mjd)
            except ValueError:
                log.warning("archive: unparsable %s=%r", key, value)
    for key in ("MJD-BEG", "MJD-OBS"):
        value = _finite(_first(header, key))
        if value is not None:
            return value
    value = _finite(_first(header, "JD-OBS", "JD"))
    if value is not None and value > 2_400_000.5:
        return value - 2_400_000.5
    return _finite(meta.get("mjd_obs"))


def _exptime_s(header, meta) -> float | None:
    value = _finite(_first(header, "XPOSURE", "EXPTIME", "EXPOSURE", "EXP_TIME", "ITIME"))
    if value is None:
        value = _finite(meta.get("exptime_s"))
    return value if value is None or value >= 0 else None


def _t_max_mjd(header, t_min, exptime_s) -> float | None:
    from astropy.time import Time

    value = _first(header, "DATE-END")
    if isinstance(value, str) and "T" in value:
        try:
            return float(Time(value, scale="utc").mjd)
        except ValueError:
            pass
    value = _finite(_first(header, "MJD-END"))
    if value is not None:
        return value
    if t_min is None:
        return None
    return t_min + (exptime_s or 0.0) / 86400.0


def _angle_deg(value, *, hours: bool) -> float | None:
    if value is None:
        return None
    number = _finite(value)
    if number is not None:
        return number
    from astropy.coordinates import Angle

    try:
        return float(Angle(str(value).strip(), unit="hourangle" if hours else "deg").deg)
    except (ValueError, TypeError):
        return None


def _pointing_deg(header, meta):
    ra = _finite(meta.get("ra_deg"))
    dec = _finite(meta.get("dec_deg"))
    if ra is not None and dec is not None:
        return ra, dec
    ra = _angle_deg(
        _first(header, "RA", "OBJCTRA", "RA-MNT", "RA_OBJ", "TELRA"),
        hours=isinstance(_first(header, "RA", "OBJCTRA", "RA-MNT", "RA_OBJ", "TELRA"), str),
    )
    dec = _angle_deg(_first(header, "DEC", "OBJCTDEC", "DEC-MNT", "DEC_OBJ", "TELDEC"), hours=False)
    if ra is None or dec is None or not (-90 <= dec <= 90):
        return None
    return ra % 360.0, dec


def _naxes(header, shape):
    if shape is not None:
        ny, nx = shape
        return int(nx), int(ny)
    nx = _first(header, "ZNAXIS1", "NAXIS1")
    ny = _first(header, "ZNAXIS2", "NAXIS2")
    if nx is None or ny is None:
        return None
    return int(nx), int(ny)


# ---------------------------------------------------------------------------------------------
# Footprint and spectral range
# ---------------------------------------------------------------------------------------------


def celestial_footprint(header, *, shape=None, points_per_side=None) -> Footprint | None:
    """
    Footprint of an image from its celestial WCS, with SIP distortion applied.

    The polygon follows the **outer pixel edges** (0-based pixels -0.5 ... n-0.5). A linear TAN
    WCS maps straight pixel edges onto great circles, so its 4 corners are exact; with distortion
    (SIP, also when ``CTYPE`` lacks the ``-SIP`` suffix, as astrometry.net sometimes writes)
    each side is sampled with ``points_per_side`` segments (default 4 -> 16 vertices).
    FK5/FK4 coordinates (``RADESYS``) are converted to ICRS.

    Parameters
    ----------
    header : `astropy.io.fits.Header` or mapping
        Header with the image WCS (``NAXIS1/2`` or ``ZNAXIS1/2``).
    shape : (ny, nx), optional
        Image shape when the header lacks ``NAXISn``.
    points_per_side : int, optional
        Segments per side; default 1 for a linear WCS, 4 with distortion.

    Returns
    -------
    footprint : `Footprint` or None
        None when there is no usable celestial WCS (absent, rejected by
        `rpp_tasks.inputs.wcs.header_wcs` -- e.g. no CDELT/CD scale, singular matrix, pixel scale
        above 1800"/px --, not 2-D, non-finite corners, or a field larger than 90 deg): never a
        guessed footprint.
    """
    from astropy.wcs import WCS, FITSFixedWarning
    from astropy.wcs.utils import proj_plane_pixel_scales

    h = _as_header(header)
    dims = _naxes(h, shape)
    if dims is None or min(dims) < 1:
        return None
    nx, ny = dims
    # The pipeline's own WCS check first (the one the astrometry stage uses): it rejects what
    # astropy would silently accept, e.g. a pointing-only CTYPE/CRVAL/CRPIX header without
    # CDELT/CD, which astropy reads as 1 deg/px (a 40x30 px frame would get a 47 deg footprint).
    from rpp_tasks.inputs.wcs import header_wcs

    check_h = h.copy()
    if "NAXIS1" not in check_h or "NAXIS2" not in check_h:
        check_h["NAXIS1"], check_h["NAXIS2"] = nx, ny
    check = header_wcs(check_h)
    if not check.is_valid:
        log.info("archive: WCS %s: no footprint", check.status)
        return None
    notes = []
    has_sip = "A_ORDER" in h and "B_ORDER" in h
    if has_sip:
        for axis in (1, 2):
            ctype = str(h.get(f"CTYPE{axis}", ""))
            if ctype and not ctype.endswith("-SIP"):
                h[f"CTYPE{axis}"] = ctype + "-SIP"
                if axis == 1:
                    notes.append("CTYPE without -SIP: SIP applied")
    if "CD1_1" in h:  # astrometry.net writes CD and PC/CDELT: make CD the only matrix
        for key in ("PC1_1", "PC1_2", "PC2_1", "PC2_2", "CDELT1", "CDELT2"):
            h.remove(key, ignore_missing=True, remove_all=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(h, relax=True)
    except Exception as exc:  # noqa: BLE001 - astropy raises many types for broken WCS
        log.warning("archive: invalid WCS (%s): no footprint", exc)
        return None
    if not wcs.has_celestial:
        return None
    cel = wcs.celestial
    if cel.naxis != 2 or not cel.wcs.ctype[0] or cel.wcs.lng != 0:
        return None
    sip = cel.sip is not None
    distorted = sip or cel.has_distortion
    n_seg = points_per_side or (4 if distorted else 1)
    x0, x1, y0, y1 = -0.5, nx - 0.5, -0.5, ny - 0.5
    t = np.arange(n_seg) / n_seg
    xs = np.concatenate(
        [x0 + (x1 - x0) * t, np.full(n_seg, x1), x1 - (x1 - x0) * t, np.full(n_seg, x0)]
    )
    ys = np.concatenate(
        [np.full(n_seg, y0), y0 + (y1 - y0) * t, np.full(n_seg, y1), y1 - (y1 - y0) * t]
    )
    xs = np.append(xs, (nx - 1) / 2.0)
    ys = np.append(ys, (ny - 1) / 2.0)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        ra, dec = cel.pixel_to_world_values(xs, ys)
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        log.warning("archive: WCS gives non-finite corners: no footprint")
        return None
    radesys = str(h.get("RADESYS", h.get("RADECSYS", "ICRS"))).strip().upper()
    if radesys in ("FK5", "FK4", "FK4-NO-E"):
        from astropy.coordinates import FK4, FK5, SkyCoord

        equinox = f"{'J' if radesys == 'FK5' else 'B'}{float(h.get('EQUINOX', 2000.0 if radesys == 'FK5' else 1950.0))}"
        frame = FK5(equinox=equinox) if radesys == "FK5" else FK4(equinox=equinox)
        icrs = SkyCoord(ra, dec, unit="deg", frame=frame).icrs
        ra, dec = icrs.ra.deg, icrs.dec.deg
        notes.append(f"{radesys} {equinox} -> ICRS")
    ra = np.mod(ra, 360.0)
    vecs = _unit(ra[:-1], dec[:-1])
    n = len(vecs)
    fov = float(max(_gc_dist_deg(vecs[i], vecs[j]) for i in range(n) for j in range(i + 1, n)))
    if not 0.0 < fov < 90.0:
        log.warning("archive: implausible field of view %.3g deg: no footprint", fov)
        return None
    order = np.arange(n)
    if _orientation(vecs) < 0:
        order = order[::-1]
    scales = np.abs(np.asarray(proj_plane_pixel_scales(cel)))
    return Footprint(
        vertices_deg=tuple((float(ra[i]), float(dec[i])) for i in order),
        center_ra_deg=float(ra[-1]),
        center_dec_deg=float(dec[-1]),
        fov_deg=fov,
        pixel_scale_arcsec=float(np.mean(scales) * 3600.0),
        sip=sip,
        notes=tuple(notes),
    )


def _air_to_vacuum_m(wave_m):
    """Air -> vacuum wavelength (Piskunov/VALD inversion of the Morton 2000 formula)."""
    wave_aa = np.asarray(wave_m, float) * 1e10
    s2 = (1e4 / wave_aa) ** 2
    n = (
        1
        + 8.336624212083e-5
        + 2.408926869968e-2 / (1.301065924522e2 - s2)
        + 1.599740894897e-4 / (3.892568793293e1 - s2)
    )
    return wave_aa * n * 1e-10


def spectral_range_m(header) -> tuple[float, float, int] | None:
    """
    Wavelength range of a 1-D spectrum from its linear spectral WCS, in metres (vacuum).

    Uses ``CRVAL1``, ``CDELT1`` (or ``CD1_1``), ``CRPIX1`` (default 1) and ``CUNIT1``; the range
    runs over the outer pixel edges. ``CTYPE1='AWAV'`` (air) is converted to vacuum. Without
    ``CUNIT1`` a value between 1000 and 100000 is taken as Angstrom (the BeSS convention) and
    logged; other unit-less values give None rather than a guess.

    Returns
    -------
    (em_min_m, em_max_m, n_pixels) or None
        None when the header has no 1-D spectral axis.
    """
    from astropy import units as u

    h = _as_header(header)
    n_pix = _first(h, "NAXIS1")
    if n_pix is None or int(_first(h, "NAXIS") or 0) < 1:
        return None
    if int(_first(h, "NAXIS") or 0) > 1 and any(
        int(h.get(f"NAXIS{i}", 1)) > 1 for i in range(2, int(h["NAXIS"]) + 1)
    ):
        return None
    ctype = str(h.get("CTYPE1", "")).strip().upper()
    crval = _finite(h.get("CRVAL1"))
    cdelt = _finite(h.get("CDELT1", h.get("CD1_1")))
    if crval is None or cdelt is None or cdelt == 0:
        return None
    if ctype and not ctype.startswith(_SPECTRAL_CTYPES):
        return None
    crpix = _finite(h.get("CRPIX1", 1.0)) or 1.0
    unit_text = str(h.get("CUNIT1", "")).strip()
    if unit_text:
        try:
            scale = u.Unit(unit_text.replace("Angstroms", "Angstrom")).to(u.m)
        except (ValueError, u.UnitConversionError):
            log.warning("archive: CUNIT1=%r is not a wavelength unit: no spectral range", unit_text)
            return None
    elif 1000.0 <= crval <= 100000.0:
        log.info("archive: CUNIT1 missing, CRVAL1=%g taken as Angstrom", crval)
        scale = 1e-10
    else:
        log.warning("archive: CUNIT1 missing and CRVAL1=%g ambiguous: no spectral range", crval)
        return None
    edges = np.array([0.5, int(n_pix) + 0.5])
    wave = (crval + (edges - crpix) * cdelt) * scale
    if ctype.startswith("AWAV"):
        wave = _air_to_vacuum_m(wave)
    lo, hi = float(np.min(wave)), float(np.max(wave))
    if lo <= 0:
        return None
    return lo, hi, int(n_pix)


def _spoly_circle(ra_deg, dec_deg, radius_deg, n=16) -> str:
    """DALI polygon of an n-gon circumscribing a circle (a spectrum's extraction aperture)."""
    r_vertex = math.degrees(math.atan(math.tan(math.radians(radius_deg)) / math.cos(math.pi / n)))
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    centre = SkyCoord(ra_deg * u.deg, dec_deg * u.deg)
    pts = centre.directional_offset_by(
        np.linspace(0, 360, n, endpoint=False) * u.deg, r_vertex * u.deg
    )
    ra, dec = pts.ra.deg, pts.dec.deg
    vecs = _unit(ra, dec)
    order = np.arange(n) if _orientation(vecs) > 0 else np.arange(n)[::-1]
    return " ".join(f"{ra[i]:.7f} {dec[i]:.7f}" for i in order)


# ---------------------------------------------------------------------------------------------
# Row construction
# ---------------------------------------------------------------------------------------------


def make_publisher_did(
    publisher_authority: str, obs_collection: str, obs_id: str, product_label: str
) -> str:
    """
    Stable publisher DID ``ivo://<authority>[/<path>]?<collection>/<obs_id>/<product>``.

    ``publisher_authority`` is a registered (or ``x-unregistred``-style) IVOA authority such as
    ``"rpp.example.org"`` (DaCHS's ``~`` path is then used, as in DaCHS's own DIDs) or a full
    ``"ivo://rpp.example.org/archive"``. The query part is percent-encoded.
    """
    auth = str(publisher_authority).strip().rstrip("?")
    if not auth:
        raise ValueError("publisher_authority must not be empty")
    if not auth.startswith("ivo://"):
        auth = "ivo://" + auth
    if auth.count("/") == 2:  # no resource path after the authority
        auth += "/~"
    local = "/".join(
        quote(str(part).strip(), safe="-._~:+/") for part in (obs_collection, obs_id, product_label)
    )
    return f"{auth}?{local}"


def _default_obs_id(header, instrument, facility, product_path) -> str | None:
    date = _first(header, "DATE-BEG", "DATE-OBS")
    stem = None
    if product_path is not None:
        p = Path(product_path)
        stem = (
            p.parent.name
            if p.stem.split(".")[0] in ("calibrated", "spectrum", "product")
            else p.stem
        )
    if isinstance(date, str) and "T" in date:
        compact = date.replace("-", "").replace(":", "")
        base = instrument or facility or "obs"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{base}_{compact}")
    if stem:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)
    return None


def _o_ucd(header, dataproduct_type) -> str:
    bunit = str(header.get("BUNIT", "")).strip().lower()
    if dataproduct_type == "spectrum":
        return (
            "phot.count"
            if bunit in ("adu", "count", "counts", "dn", "electron")
            else "phot.flux.density;em.wl"
        )
    if bunit and any(tok in bunit for tok in ("jy", "erg", "w m", "w/m", "flux")):
        return "phot.flux.density"
    return "phot.count"


def to_obscore_row(
    header_or_meta,
    *,
    product_path=None,
    access_url,
    obs_collection,
    publisher_authority,
    obs_id=None,
    product_label=None,
    fwhm_arcsec=None,
    calib_level=2,
    dataproduct_type=None,
    access_format=None,
    access_estsize_kb=None,
    band=None,
    facility_name=None,
    instrument_name=None,
    target_name=None,
    obs_title=None,
    ra_deg=None,
    dec_deg=None,
    aperture_arcsec=None,
    em_res_power=None,
    o_ucd=None,
    preview=None,
    session_id=None,
    meta=None,
    shape=None,
) -> ObsCoreRow:
    """
    Build the ObsCore row of one product from its FITS header (and WCS).

    Parameters
    ----------
    header_or_meta : `astropy.io.fits.Header`, RawFrame-like or mapping
        Header of the product (calibrated images keep the raw header plus the WCS). A mapping of
        FITS keywords is accepted too.
    product_path : path-like, optional
        The product file; its size gives ``access_estsize`` (kB, rounded up).
    access_url : str
        Where users download the product (HTTP URL, or a ``file://`` URI for local archives).
    obs_collection : str
        Collection name (ObsCore suggests ``"<facility>/<instrument>"``); not empty.
    publisher_authority : str
        IVOA authority for the DID, e.g. ``"rpp.example.org"``; see `make_publisher_did`.
    obs_id : str, optional
        Observation id shared by all products of one exposure. Default: instrument (or
        facility) + ``DATE-OBS``, which is stable across re-processing of the same raw frame.
    product_label : str, optional
        Last part of the DID; default ``dataproduct_type`` (one image per exposure).
    fwhm_arcsec : float, optional
        Measured seeing FWHM (frame summary ``fwhm_arcsec``) -> ``s_resolution``. Without it
        ``s_resolution`` stays NULL (the pixel scale is in ``s_pixel_scale``).
    calib_level : int, optional
        0-4; 2 for calibrated frames, 3 for stacks/mosaics.
    dataproduct_type : str, optional
        ``"image"``, ``"spectrum"``, ...; default: ``"spectrum"`` for a 1-D spectral WCS, else
        ``"image"``.
    access_format : str, optional
        MIME type; default ``image/fits`` for images and ``application/fits`` otherwise.
    access_estsize_kb : int, optional
        Size in kB when ``product_path`` is not given or not readable.
    band : str, optional
        Band after the observatory's filter aliases (``FrameMeta.band``); default ``FILTER``.
    facility_name, instrument_name, target_name, obs_title : str, optional
        Override ``TELESCOP``/``OBSERVAT``, ``INSTRUME``, ``OBJECT`` and the generated title.
    ra_deg, dec_deg : float, optional
        Position for products without a celestial WCS (spectra); default the header pointing.
    aperture_arcsec : float, optional
        Spectra: extraction aperture diameter; with a position it gives ``s_region`` (a 16-gon)
        and ``s_fov``. Without it a spectrum has no footprint.
    em_res_power : float, optional
        Spectral resolving power; default ``SPE_RPOW``/``RESOLUTN``/``SPECRES`` for spectra.
    o_ucd, preview, session_id : str, optional
        ``o_ucd`` (default from ``BUNIT``), preview URL, and the reduction session id.
    meta : FrameMeta or dict, optional
        Normalised header values (``mjd_obs``, ``exptime_s``, ``band``, ``object``,
        ``telescope``, ``instrument``, ``ra_deg``, ``dec_deg``) used where the header lacks them.
    shape : (ny, nx), optional
        Image shape when the header has no ``NAXISn``.

    Returns
    -------
    row : `ObsCoreRow`
        A frame without a usable WCS gets ``s_region = s_fov = None`` (never a guessed
        footprint); ``s_ra``/``s_dec`` then come from the pointing, if any.

    Raises
    ------
    ValueError
        Invalid ``calib_level``/``dataproduct_type``, empty collection/URL, or no way to build a
        stable ``obs_id``.
    """
    header = _as_header(header_or_meta)
    m = _meta_dict(meta)
    if not str(obs_collection or "").strip():
        raise ValueError("obs_collection must not be empty (ObsCore: NOT NULL)")
    if not str(access_url or "").strip():
        raise ValueError("access_url must not be empty")
    calib_level = int(calib_level)
    if calib_level not in (0, 1, 2, 3, 4):
        msg = f"calib_level must be 0..4, got {calib_level}"
        raise ValueError(msg)

    spectral = spectral_range_m(header)
    if dataproduct_type is None:
        dataproduct_type = "spectrum" if spectral is not None else "image"
    dataproduct_type = str(dataproduct_type).lower()
    if dataproduct_type not in _DATAPRODUCT_TYPES:
        msg = f"dataproduct_type must be one of {_DATAPRODUCT_TYPES}, got {dataproduct_type!r}"
        raise ValueError(msg)
    is_spectrum = dataproduct_type == "spectrum"

    facility = (
        facility_name or _first(header, "TELESCOP", "OBSERVAT", "SITENAME") or m.get("telescope")
    )
    instrument = (
        instrument_name
        or _first(header, "INSTRUME", "BSS_INST", "CAMERA", "DETECTOR")
        or m.get("instrument")
    )
    target = (
        target_name or _first(header, "OBJECT", "OBJNAME", "FIELD", "TARGET") or m.get("object")
    )
    obs_id = obs_id or _default_obs_id(header, instrument, facility, product_path)
    if not obs_id:
        raise ValueError(
            "cannot build a stable obs_id: no DATE-OBS and no product_path; pass obs_id"
        )
    did = make_publisher_did(
        publisher_authority, obs_collection, obs_id, product_label or dataproduct_type
    )

    t_min = _t_min_mjd(header, m)
    exptime = _exptime_s(header, m)
    t_max = _t_max_mjd(header, t_min, exptime)

    # --- spatial
    s_ra = s_dec = s_fov = s_region = s_pixel_scale = None
    s_xel1 = s_xel2 = None
    if is_spectrum:
        s_xel1 = s_xel2 = 1
        pos = (
            (ra_deg, dec_deg)
            if ra_deg is not None and dec_deg is not None
            else _pointing_deg(header, m)
        )
        if pos is not None:
            s_ra, s_dec = float(pos[0]) % 360.0, float(pos[1])
            if aperture_arcsec:
                s_fov = float(aperture_arcsec) / 3600.0
                s_region = _spoly_circle(s_ra, s_dec, s_fov / 2.0)
    else:
        dims = _naxes(header, shape)
        if dims is not None:
            s_xel1, s_xel2 = dims
        fp = celestial_footprint(header, shape=shape)
        if fp is not None:
            s_ra, s_dec, s_fov = fp.center_ra_deg, fp.center_dec_deg, fp.fov_deg
            s_region, s_pixel_scale = fp.to_dali(), fp.pixel_scale_arcsec
        else:
            pos = (
                (ra_deg, dec_deg)
                if ra_deg is not None and dec_deg is not None
                else _pointing_deg(header, m)
            )
            if pos is not None:
                s_ra, s_dec = float(pos[0]) % 360.0, float(pos[1])
            log.warning("archive: %s has no usable celestial WCS: row without footprint", obs_id)
    s_resolution = _finite(fwhm_arcsec)
    if s_resolution is not None and s_resolution <= 0:
        s_resolution = None

    # --- spectral
    band_name = band or m.get("band") or _first(header, "FILTER", "FILTER1", "FILTNAME")
    em_min = em_max = None
    em_xel = 1
    rpp_band = None
    if is_spectrum:
        if spectral is not None:
            em_min, em_max, em_xel = spectral
        if em_res_power is None:
            em_res_power = _finite(_first(header, "SPE_RPOW", "RESOLUTN", "SPECRES", "R_POWER"))
    else:
        bp = lookup_bandpass(band_name)
        if bp is not None:
            em_min, em_max, rpp_band = bp.em_min_m, bp.em_max_m, bp.name
        elif band_name:
            rpp_band = str(band_name)
            log.warning(
                "archive: %s: unknown filter %r: em_min/em_max left empty", obs_id, band_name
            )
    if band_name and rpp_band is None:
        rpp_band = canonical_band(band_name) or str(band_name)

    # --- access
    estsize = access_estsize_kb
    if product_path is not None and Path(product_path).is_file():
        estsize = math.ceil(Path(product_path).stat().st_size / 1024)
    if access_format is None:
        access_format = (
            "image/fits" if dataproduct_type in ("image", "cube") else "application/fits"
        )

    if obs_title is None:
        date = str(_first(header, "DATE-OBS", "DATE-BEG") or "")[:19] or None
        if is_spectrum:
            parts = [target, "1-D spectrum", instrument, date]
        else:
            parts = [target, rpp_band, f"{exptime:g} s" if exptime is not None else None, date]
        obs_title = " ".join(str(p) for p in parts if p) or None

    return ObsCoreRow(
        dataproduct_type=dataproduct_type,
        dataproduct_subtype=None,
        calib_level=calib_level,
        obs_collection=str(obs_collection),
        obs_id=str(obs_id),
        obs_title=obs_title,
        obs_publisher_did=did,
        obs_creator_did=None,
        access_url=str(access_url),
        access_format=access_format,
        access_estsize=None if estsize is None else int(estsize),
        target_name=None if target is None else str(target),
        target_class=None,
        s_ra=s_ra,
        s_dec=s_dec,
        s_fov=s_fov,
        s_region=s_region,
        s_resolution=s_resolution,
        t_min=t_min,
        t_max=t_max,
        t_exptime=exptime,
        t_resolution=exptime,
        em_min=em_min,
        em_max=em_max,
        em_res_power=em_res_power,
        o_ucd=o_ucd or _o_ucd(header, dataproduct_type),
        pol_states=None,
        facility_name=None if facility is None else str(facility),
        instrument_name=None if instrument is None else str(instrument),
        s_xel1=s_xel1,
        s_xel2=s_xel2,
        t_xel=1,
        em_xel=em_xel,
        pol_xel=None,
        s_pixel_scale=s_pixel_scale,
        em_ucd="em.wl",
        preview=preview,
        rpp_session=None if session_id is None else str(session_id),
        rpp_band=rpp_band,
    )


# ---------------------------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpsertResult:
    """Outcome of `upsert_obscore`."""

    table: str
    dialect: str
    n_inserted: int
    n_updated: int
    dids: tuple[str, ...]

    def to_dict(self) -> dict:
        """JSON-safe dictionary."""
        return {**asdict(self), "dids": list(self.dids)}


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


def _engine(url):
    """One-shot engine (no pool) for a URL: `rpp_tasks.outputs.sql.make_engine`."""
    from rpp_tasks.outputs.sql import make_engine

    return make_engine(url, one_shot=True)


def _table_name(table, dialect) -> str:
    if not _IDENT.match(str(table)):
        msg = f"invalid table name {table!r} (expected [schema.]name)"
        raise ValueError(msg)
    return table.replace(".", "_") if dialect == "sqlite" else table


def _ddl(table, dialect) -> list[str]:
    name = _table_name(table, dialect)
    if dialect == "sqlite":
        cols = []
        for c in OBSCORE_COLUMNS:
            sql_type = (
                "INTEGER"
                if c in _INT_COLUMNS
                else ("REAL" if _PG_TYPES.get(c, "").startswith(("double", "real")) else "TEXT")
            )
            extra = (
                " NOT NULL"
                if c in ("calib_level", "obs_collection", "obs_id", "obs_publisher_did")
                else ""
            )
            cols.append(f"{c} {sql_type}{extra}")
        cols.append("PRIMARY KEY (obs_publisher_did)")
        base = name
        return [
            f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(cols)})",
            f"CREATE INDEX IF NOT EXISTS {base}_pos ON {name} (s_dec, s_ra)",
            f"CREATE INDEX IF NOT EXISTS {base}_tmin ON {name} (t_min)",
            f"CREATE INDEX IF NOT EXISTS {base}_session ON {name} (rpp_session)",
        ]
    cols = [f"{c} {_PG_TYPES.get(c, 'text')}" for c in OBSCORE_COLUMNS]
    cols.append("source_table text")
    cols.append("PRIMARY KEY (obs_publisher_did)")
    base = name.replace(".", "_")
    stmts = []
    if "." in name:
        stmts.append(f"CREATE SCHEMA IF NOT EXISTS {name.split('.')[0]}")
    stmts += [
        f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(cols)})",
        f"CREATE INDEX IF NOT EXISTS {base}_s_region ON {name} USING gist (s_region)",
        f"CREATE INDEX IF NOT EXISTS {base}_t_min ON {name} (t_min)",
    ]
    return stmts


def create_obscore_table(url, *, table=DEFAULT_TABLE) -> str:
    """
    Create the ObsCore-shaped table if it does not exist (SQLite, or PostgreSQL without DaCHS).

    With DaCHS, do **not** call this: DaCHS creates ``rpp.main`` from ``archive/dachs/q.rd`` and
    the pipeline role has no DDL rights. For a plain PostgreSQL the ``pg_sphere`` extension must be
    installed in the database (``CREATE EXTENSION pg_sphere``).

    Returns
    -------
    name : str
        The table name as created (``rpp_main`` in SQLite).
    """
    from sqlalchemy import text

    engine = _engine(url)
    dialect = engine.dialect.name
    try:
        with engine.begin() as conn:
            for stmt in _ddl(table, dialect):
                conn.execute(text(stmt))
    finally:
        engine.dispose()
    return _table_name(table, dialect)


def _row_params(row: ObsCoreRow) -> dict:
    params = row.to_dict()
    for key, value in params.items():
        if isinstance(value, np.generic):
            params[key] = value.item()
        if isinstance(params[key], float) and not math.isfinite(params[key]):
            params[key] = None
    return params


def upsert_obscore(rows, url, *, table=DEFAULT_TABLE) -> UpsertResult:
    """
    Insert or update ObsCore rows, keyed by ``obs_publisher_did`` (idempotent).

    Runs ``INSERT ... ON CONFLICT (obs_publisher_did) DO UPDATE SET <every column>`` in one
    transaction: re-processing a frame updates its row and never duplicates it.

    Parameters
    ----------
    rows : `ObsCoreRow` or iterable of `ObsCoreRow`
    url : str
        SQLAlchemy URL: ``postgresql://rpp_pipeline@127.0.0.1:5432/gavo`` (also ``postgres://``
        Airflow URIs), or ``sqlite:///path/archive.db`` (a bare file path works too).
    table : str, optional
        ``[schema.]name``; default ``rpp.main`` (``rpp_main`` in SQLite). In PostgreSQL
        ``s_region`` is written as ``CAST(:s_region AS spoly)`` (pgsphere); in SQLite as the DALI
        polygon string. The table must exist (DaCHS or `create_obscore_table`).

    Returns
    -------
    result : `UpsertResult`
    """
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError, ProgrammingError

    if isinstance(rows, ObsCoreRow):
        rows = [rows]
    rows = list(rows)
    engine = _engine(url)
    dialect = engine.dialect.name
    name = _table_name(table, dialect)
    cols = list(OBSCORE_COLUMNS)
    values = []
    for c in cols:
        if c == "s_region" and dialect == "postgresql":
            values.append("CAST(:s_region_spoly AS spoly)")
        else:
            values.append(f":{c}")
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c != "obs_publisher_did")
    sql = (
        f"INSERT INTO {name} ({', '.join(cols)}) VALUES ({', '.join(values)}) "
        f"ON CONFLICT (obs_publisher_did) DO UPDATE SET {updates}"
    )
    if dialect == "postgresql":
        sql += " RETURNING (xmax = 0) AS inserted"
    n_ins = n_upd = 0
    try:
        with engine.begin() as conn:
            for row in rows:
                params = _row_params(row)
                if dialect == "postgresql":
                    params["s_region_spoly"] = dali_to_spoly(params.pop("s_region"))
                    inserted = bool(conn.execute(text(sql), params).scalar_one())
                else:
                    exists = (
                        conn.execute(
                            text(f"SELECT 1 FROM {name} WHERE obs_publisher_did = :d"),
                            {"d": row.obs_publisher_did},
                        ).first()
                        is not None
                    )
                    conn.execute(text(sql), params)
                    inserted = not exists
                n_ins += inserted
                n_upd += not inserted
    except (ProgrammingError, OperationalError) as exc:
        msg = f"archive: upsert into {name} ({dialect}) failed: {exc.orig if hasattr(exc, 'orig') else exc}"
        raise RppError(msg) from exc
    finally:
        engine.dispose()
    log.info("archive: %s: %d inserted, %d updated", name, n_ins, n_upd)
    return UpsertResult(
        table=name,
        dialect=dialect,
        n_inserted=n_ins,
        n_updated=n_upd,
        dids=tuple(r.obs_publisher_did for r in rows),
    )


def covering_query(
    url, ra_deg, dec_deg, *, table=DEFAULT_TABLE, radius_deg=0.0, dataproduct_type=None
) -> list[dict]:
    """
    Rows whose footprint contains a position (or intersects a circle): "which sessions cover it".

    PostgreSQL: ``s_region @> spoint(...)`` / ``s_region && scircle(...)`` (GiST-indexed).
    SQLite: a declination-band pre-filter, then the exact spherical test of `polygon_contains`.
    Rows without a footprint are never returned.

    Parameters
    ----------
    url : str
        Database URL (see `upsert_obscore`).
    ra_deg, dec_deg : float
        ICRS position in degrees.
    table : str, optional
    radius_deg : float, optional
        Search radius; 0 means "footprint contains the point".
    dataproduct_type : str, optional
        Only rows of this type (e.g. ``"image"``).

    Returns
    -------
    rows : list of dict
        Column name -> value, ``s_region`` as a DALI polygon string, sorted by ``t_min``.
        Group by ``rpp_session`` for sessions.
    """
    from sqlalchemy import text

    ra_deg, dec_deg, radius_deg = float(ra_deg), float(dec_deg), float(radius_deg)
    if not -90.0 <= dec_deg <= 90.0:
        msg = f"dec_deg must be in [-90, 90], got {dec_deg}"
        raise ValueError(msg)
    engine = _engine(url)
    dialect = engine.dialect.name
    name = _table_name(table, dialect)
    cols = ", ".join(OBSCORE_COLUMNS)
    params = {"ra": ra_deg % 360.0, "dec": dec_deg, "r": radius_deg, "t": dataproduct_type}
    type_clause = " AND dataproduct_type = :t" if dataproduct_type else ""
    try:
        with engine.connect() as conn:
            if dialect == "postgresql":
                geom = (
                    "scircle(spoint(radians(:ra), radians(:dec)), radians(:r)) && s_region"
                    if radius_deg > 0
                    else "s_region @> spoint(radians(:ra), radians(:dec))"
                )
                result = conn.execute(
                    text(
                        f"SELECT {cols} FROM {name} WHERE {geom}{type_clause} "
                        "ORDER BY t_min, obs_publisher_did"
                    ),
                    params,
                )
                rows = [dict(r._mapping) for r in result]
                for r in rows:
                    r["s_region"] = spoly_to_dali(r["s_region"])
            else:
                # any footprint covering the point has its centre within fov/2 (+ r) of it
                result = conn.execute(
                    text(
                        f"SELECT {cols} FROM {name} WHERE s_region IS NOT NULL{type_clause} "
                        "AND s_dec BETWEEN :dec - s_fov - :r AND :dec + s_fov + :r "
                        "ORDER BY t_min, obs_publisher_did"
                    ),
                    params,
                )
                rows = [
                    dict(r._mapping)
                    for r in result
                    if polygon_contains(r.s_region, ra_deg, dec_deg, radius_deg=radius_deg)
                ]
    finally:
        engine.dispose()
    return rows


# ---------------------------------------------------------------------------------------------
# Adapter
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveResult:
    """Summary of `run_archive` (JSON-safe via `to_dict`)."""

    table: str
    dialect: str
    n_rows: int
    n_inserted: int
    n_updated: int
    dids: tuple[str, ...]
    no_footprint: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict:
        """JSON-safe dictionary for XCom and the session summary."""
        return {
            **asdict(self),
            "dids": list(self.dids),
            "no_footprint": list(self.no_footprint),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


def read_product_header(path):
    """Header of the first HDU with data (tile-compressed images included)."""
    from astropy.io import fits

    with fits.open(path, mode="readonly", memmap=False) as hdul:
        for hdu in hdul:
            if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
                continue
            dims = [
                hdu.header.get(f"NAXIS{i}", 0) for i in range(1, hdu.header.get("NAXIS", 0) + 1)
            ]
            if dims and all(d > 0 for d in dims):
                header = hdu.header.copy()
                if hdu is not hdul[0] and hdul[0].header.get("NAXIS", 0) == 0:
                    merged = hdul[0].header.copy()
                    merged.strip()
                    merged.update(header)
                    header = merged
                return header
        return hdul[0].header.copy()


def _summary_for(product: Path) -> dict:
    for candidate in (product.parent / "summary.json", product.with_suffix(".json")):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (OSError, ValueError):
                log.warning("archive: unreadable %s", candidate)
    return {}


def _fwhm_from(summary: dict):
    for key in ("fwhm_arcsec",):
        if _finite(summary.get(key)) is not None:
            return float(summary[key])
    for nested in ("psf", "fwhm", "seeing"):
        value = summary.get(nested)
        if isinstance(value, dict) and _finite(value.get("fwhm_arcsec")) is not None:
            return float(value["fwhm_arcsec"])
    return None


def run_archive(
    products,
    *,
    url,
    obs_collection,
    publisher_authority,
    access_url_base=None,
    products_root=None,
    table=DEFAULT_TABLE,
    session_id=None,
    facility_name=None,
    instrument_name=None,
    calib_level=2,
    create_table=None,
) -> dict:
    """
    Adapter: build one ObsCore row per product and upsert them.

    Parameters
    ----------
    products : iterable
        Paths of calibrated FITS files (``frames/<stem>/calibrated.fits``; the sibling
        ``summary.json`` gives ``fwhm_arcsec``), or frame summaries: dicts (or ``.json`` paths)
        with ``product_path`` (or ``calibrated_path``/``path``) and optionally ``fwhm_arcsec``,
        ``obs_id``, ``band``, ``ra_deg``, ``dec_deg``, ``aperture_arcsec``, ``calib_level``,
        ``dataproduct_type``.
    url : str
        Archive database URL (see `upsert_obscore`); the DAG resolves it from an Airflow
        connection.
    obs_collection, publisher_authority : str
        See `to_obscore_row`.
    access_url_base : str, optional
        Public base URL of ``products_root``; ``access_url = base + relative path``. Default: the
        product's ``file://`` URI.
    products_root : path-like, optional
        Root the relative paths are taken from (default: the product's folder).
    table : str, optional
    session_id : str, optional
        Stored in ``rpp_session``.
    facility_name, instrument_name : str, optional
        Names from the observatory configuration (override the header).
    calib_level : int, optional
    create_table : bool, optional
        Create the table if missing; default True for SQLite, False for PostgreSQL (DaCHS owns
        the table there).

    Returns
    -------
    summary : dict
        `ArchiveResult.to_dict()`: counts, DIDs, products without footprint, skipped products
        with reasons.
    """
    rows, no_fp, skipped = [], [], []
    for item in products:
        spec = dict(item) if isinstance(item, dict) else {}
        if not spec:
            p = Path(item)
            if p.suffix == ".json":
                spec = json.loads(p.read_text())
                spec.setdefault("summary_dir", str(p.parent))
            else:
                spec = {"product_path": str(p)}
        product = spec.get("product_path") or spec.get("calibrated_path") or spec.get("path")
        if product is None and spec.get("summary_dir"):
            product = str(Path(spec["summary_dir"]) / "calibrated.fits")
        if product is None:
            skipped.append((str(item)[:200], "no product path in summary"))
            continue
        product = Path(product)
        try:
            header = read_product_header(product)
        except (OSError, ValueError) as exc:
            log.warning("archive: cannot read %s: %s", product, exc)
            skipped.append((str(product), f"unreadable FITS: {exc}"))
            continue
        summary = {**_summary_for(product), **spec}
        if access_url_base:
            root = Path(products_root) if products_root else product.parent
            try:
                rel = product.resolve().relative_to(root.resolve()).as_posix()
            except ValueError:
                rel = product.name
            access_url = access_url_base.rstrip("/") + "/" + quote(rel)
        else:
            access_url = product.resolve().as_uri()
        try:
            row = to_obscore_row(
                header,
                product_path=product,
                access_url=access_url,
                obs_collection=obs_collection,
                publisher_authority=publisher_authority,
                obs_id=summary.get("obs_id"),
                fwhm_arcsec=_fwhm_from(summary),
                calib_level=summary.get("calib_level", calib_level),
                dataproduct_type=summary.get("dataproduct_type"),
                band=summary.get("band"),
                facility_name=facility_name,
                instrument_name=instrument_name,
                ra_deg=summary.get("ra_deg"),
                dec_deg=summary.get("dec_deg"),
                aperture_arcsec=summary.get("aperture_arcsec"),
                session_id=session_id,
            )
        except ValueError as exc:
            log.warning("archive: %s: %s", product, exc)
            skipped.append((str(product), str(exc)))
            continue
        if row.s_region is None:
            no_fp.append(str(product))
        rows.append(row)

    engine_dialect = _engine(url).dialect.name
    if create_table is None:
        create_table = engine_dialect == "sqlite"
    if create_table:
        create_obscore_table(url, table=table)
    if rows:
        up = upsert_obscore(rows, url, table=table)
        name, n_ins, n_upd = up.table, up.n_inserted, up.n_updated
    else:
        name, n_ins, n_upd = _table_name(table, engine_dialect), 0, 0
    result = ArchiveResult(
        table=name,
        dialect=engine_dialect,
        n_rows=len(rows),
        n_inserted=n_ins,
        n_updated=n_upd,
        dids=tuple(r.obs_publisher_did for r in rows),
        no_footprint=tuple(no_fp),
        skipped=tuple(skipped),
    )
    log.info(
        "archive: session %s: %d rows (%d new, %d updated), %d without footprint, %d skipped",
        session_id,
        len(rows),
        n_ins,
        n_upd,
        len(no_fp),
        len(skipped),
    )
    return result.to_dict()
