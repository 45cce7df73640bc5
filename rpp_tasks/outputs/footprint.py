"""Where a product is on the sky and in wavelength: footprints, polygons, spectral ranges.

The celestial footprint of an image is computed from its FITS header and WCS (SIP distortion
applied, sampled along the pixel edges, converted to ICRS); polygons are DALI strings
(``"ra1 dec1 ra2 dec2 ..."``, degrees, counter-clockwise) with converters to pgsphere ``spoly``
and STC-S, and an exact spherical containment test. Used by the ObsCore rows
(`rpp_tasks.outputs.obscore`) and the archive queries (`rpp_tasks.outputs.archive`).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "Footprint",
    "celestial_footprint",
    "spectral_range_m",
    "polygon_contains",
    "dali_to_spoly",
    "dali_to_stcs",
    "spoly_to_dali",
]

log = logging.getLogger(__name__)

_SPECTRAL_CTYPES = ("WAVE", "AWAV", "WAVELENGTH", "LAMBDA", "WAVELENG")


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
# Header access
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

        fk5 = radesys == "FK5"
        equinox = f"{'J' if fk5 else 'B'}{float(h.get('EQUINOX', 2000.0 if fk5 else 1950.0))}"
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
