"""ObsCore rows: one IVOA ObsCore 1.1 row per product (`to_obscore_row`).

A row is built from the product's FITS header (its WCS gives the footprint, through
`rpp_tasks.outputs.footprint`) and, for the pipeline's own frames, from the normalised header facts
of the frame summary (``meta``: time, exposure, pointing, band, target, telescope, instrument),
which win over the header: the archive never re-parses what `rpp_tasks.inputs.header` normalised.
Wavelengths come from `rpp_tasks.outputs.bandpasses` or a 1-D spectral WCS; the publisher DID is
stable across re-processing.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from urllib.parse import quote

from rpp_tasks.outputs.bandpasses import canonical_band, lookup_bandpass
from rpp_tasks.outputs.footprint import (
    _as_header,
    _finite,
    _first,
    _naxes,
    _spoly_circle,
    celestial_footprint,
    spectral_range_m,
)

__all__ = [
    "OBSCORE_COLUMNS",
    "OBSCORE_MANDATORY",
    "ObsCoreRow",
    "make_publisher_did",
    "to_obscore_row",
    "read_product_header",
]

log = logging.getLogger(__name__)

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

#: The columns ObsCore 1.1 makes mandatory (its Table 1 / Appendix C; shared/specs/obscore_dachs.md
#: 1.1): a service's ObsCore table must have each one.
OBSCORE_MANDATORY: tuple[str, ...] = (
    "dataproduct_type",
    "calib_level",
    "obs_collection",
    "obs_id",
    "obs_publisher_did",
    "access_url",
    "access_format",
    "access_estsize",
    "target_name",
    "s_ra",
    "s_dec",
    "s_fov",
    "s_region",
    "s_resolution",
    "s_xel1",
    "s_xel2",
    "t_min",
    "t_max",
    "t_exptime",
    "t_resolution",
    "t_xel",
    "em_min",
    "em_max",
    "em_res_power",
    "em_xel",
    "o_ucd",
    "pol_states",
    "pol_xel",
    "facility_name",
    "instrument_name",
)


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


def _t_min_mjd(header, meta) -> float | None:
    """Start of the exposure (MJD): the normalised ``mjd_obs``, else parsed from the header."""
    from astropy.time import Time

    if _finite(meta.get("mjd_obs")) is not None:
        return _finite(meta["mjd_obs"])
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
    return None


def _exptime_s(header, meta) -> float | None:
    """Exposure (s): the normalised ``exptime_s``, else from the header."""
    value = _finite(meta.get("exptime_s"))
    if value is None:
        value = _finite(_first(header, "XPOSURE", "EXPTIME", "EXPOSURE", "EXP_TIME", "ITIME"))
    return value if value is None or value >= 0 else None


def _t_max_mjd(header, meta, t_min, exptime_s) -> float | None:
    """End of the exposure: start + exposure for normalised facts, else DATE-END/MJD-END."""
    from astropy.time import Time

    if _finite(meta.get("mjd_end")) is not None:  # several exposures (a combined spectrum)
        return _finite(meta["mjd_end"])
    if _finite(meta.get("mjd_obs")) is not None and t_min is not None:
        return t_min + (exptime_s or 0.0) / 86400.0
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
    meta : FrameMeta, frame summary or dict, optional
        Normalised header facts (`rpp_tasks.inputs.header.normalize_header`): ``mjd_obs``,
        ``date_obs``, ``exptime_s``, ``band``, ``object``, ``ra_deg``, ``dec_deg`` win over the
        header (never re-parsed); ``telescope`` and ``instrument`` are used where the header lacks
        them. The header's own ``DATE-OBS`` string still names the default ``obs_id`` (a stable
        identifier of the raw exposure: DIDs of archived rows must not change).
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
        target_name or m.get("object") or _first(header, "OBJECT", "OBJNAME", "FIELD", "TARGET")
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
    t_max = _t_max_mjd(header, m, t_min, exptime)

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
        date = str(m.get("date_obs") or _first(header, "DATE-OBS", "DATE-BEG") or "")[:19] or None
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
