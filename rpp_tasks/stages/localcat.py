"""Local reference catalogues: a file or folder on disk answering cones like the online Gaia DR3.

Remote observatories often have poor or no internet at night; their users keep a local copy of a
reference catalogue around their targets. `query_local` answers a cone from such files with the
normalised columns of `rpp_tasks.stages.catalogs` (``ra``, ``dec``, ``ref_id``,
``gaia_source_id``, ``mag_G``/``mag_BP``/``mag_RP`` and errors, ``pmra``, ``pmdec``), so the zero
point, the astrometric refinement, the enrichment and the transients stages use it exactly as they
use the online Gaia reply (bands Gaia lacks are derived by the same `gaia_transform`).

Formats (sniffed from the content, not only the extension)
-----------------------------------------------------------
* **Gaia DR3 extracts** as FITS, ECSV or CSV (optionally ``.gz``) with the Gaia archive column names
  (``source_id``, ``ra``, ``dec``, ``phot_g_mean_mag``, ``phot_bp_mean_mag``,
  ``phot_rp_mean_mag``, ``phot_*_mean_flux_over_error``, ``pmra``, ``pmdec``) or the VizieR
  ``I/355/gaiadr3`` names (``Source``, ``RA_ICRS``, ``DE_ICRS``, ``Gmag``, ``e_Gmag``, ...).
* **Normalised cones** written by ``rpp catalog fetch`` (`write_local_cone`): ECSV named
  ``<ra>_<dec>_<radius>.ecsv`` whose name and metadata state the cone they cover.
* **ATLAS-RefCat2** (Tonry et al. 2018): the distributed one-square-degree tiles ``ddd+dd.rc2``
  (44 comma-separated integer columns, RA/Dec in 1e-8 deg, magnitudes in mmag) or extracts with the
  RefCat2 column names (``RA``, ``Dec``, ``Gaia``, ``BP``, ``RP``, ``g``, ``r``, ``i``, ``z``,
  ``dupvar``... or VizieR ``J/ApJ/867/105`` names). RefCat2 gives Gaia DR2 G/BP/RP and native
  Pan-STARRS-system ``g r i z`` (used as they are for those bands); positions are moved from its
  epoch 2015.5 to 2016.0 (the Gaia DR3 epoch the rest of the chain assumes). RefCat2 has no Gaia
  source id: its rows get ``gaia_source_id = -1`` ("a reference star without a Gaia id"; 0 keeps
  meaning "no reference counterpart", which is what the transients stage tests).

Coverage
--------
A local answer is only complete when the files cover the whole cone (otherwise every star in the
uncovered part would look like a transient). Each file states the sky region it covers: a cone
(the name/metadata of fetched cones), a tile (RefCat2 names) or, for any other extract, the cap
around its stars (centre and largest separation) with a density check (no point of the cone
farther than 3 mean star spacings from a star of that file; a Poisson field leaves such a hole with
probability exp(-9 pi)). 25 points of the requested cone are
tested; the answer is ``ok`` when all are covered, ``partial`` (with the covered fraction) else.
Unreadable files, missing paths and empty answers are reported with the reason, never raised.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "LocalAnswer",
    "LocalCatalogError",
    "local_files",
    "read_local_table",
    "normalize_refcat2",
    "query_local",
    "write_local_cone",
    "REFCAT2_COLUMNS",
]

log = logging.getLogger(__name__)

#: Columns of the distributed RefCat2 text tiles (Tonry et al. 2018, README), in order.
REFCAT2_COLUMNS = (
    "RA Dec plx dplx pmra dpmra pmdec dpmdec Gaia dGaia BP dBP RP dRP Teff AGaia dupvar Ag rp1 r1 "
    "r10 g dg gchi gcontrib r dr rchi rcontrib i di ichi icontrib z dz zchi zcontrib nstat J dJ H "
    "dH K dK"
).split()
_SUFFIXES = (
    ".fits",
    ".fit",
    ".fits.gz",
    ".fit.gz",
    ".ecsv",
    ".ecsv.gz",
    ".csv",
    ".csv.gz",
    ".rc2",
)
_CONE_NAME = re.compile(r"^(?P<ra>-?\d+\.\d+)_(?P<dec>[-+]\d+\.\d+)_(?P<r>\d+\.\d+)(?:_[\w.-]+)?\.")
_TILE_NAME = re.compile(r"^(?P<ra>\d{3})(?P<dec>[-+]\d{2})\.rc2$")
_REFCAT2_EPOCH = 2015.5
_GAIA_EPOCH = 2016.0


class LocalCatalogError(Exception):
    """A local catalogue file that cannot be read or has no usable columns."""


@dataclass(frozen=True)
class LocalAnswer:
    """Outcome of a local cone query.

    ``status``: ``ok`` (the cone is covered), ``partial`` (``coverage`` < 1), ``empty`` (covered
    but no star), ``failed`` (nothing usable; ``reason`` says why), ``skipped`` (no file covers the
    cone). ``table`` is the normalised reference (None unless ok/partial).
    """

    table: object
    status: str
    reason: str | None
    files: tuple[str, ...] = ()
    coverage: float = 0.0
    native_bands: tuple[str, ...] = ()
    catalog: str = "gaia"  # "gaia" (DR3 extracts), "refcat2", or "gaia+refcat2"


# =============================================================================== regions
@dataclass(frozen=True)
class _Region:
    kind: str  # "cap" | "box"
    ra: float
    dec: float
    r: float = 0.0  # cap radius (deg)
    ra1: float = 0.0  # box: [ra, ra1) x [dec, dec1)
    dec1: float = 0.0
    spacing_deg: float | None = None  # data-derived caps: mean star spacing (density check)

    def bounding_cap(self) -> tuple[float, float, float]:
        if self.kind == "cap":
            return self.ra, self.dec, self.r
        from rpp_tasks.stages.catalogs import angular_sep_deg

        cra, cdec = self.ra + 0.5 * (self.ra1 - self.ra), 0.5 * (self.dec + self.dec1)
        corners = [(self.ra, self.dec), (self.ra1, self.dec), (self.ra, self.dec1)]
        corners.append((self.ra1, self.dec1))
        r = max(float(angular_sep_deg(cra, cdec, a, d)) for a, d in corners)
        return cra, cdec, r

    def contains(self, ra, dec) -> np.ndarray:
        ra, dec = np.asarray(ra, float), np.asarray(dec, float)
        if self.kind == "cap":
            from rpp_tasks.stages.catalogs import angular_sep_deg

            return angular_sep_deg(self.ra, self.dec, ra, dec) <= self.r + 1e-6
        dra = (ra - self.ra) % 360.0
        return (dra < self.ra1 - self.ra) & (dec >= self.dec) & (dec < self.dec1)


def _region_from_name(path: Path) -> _Region | None:
    m = _TILE_NAME.match(path.name)
    if m:
        ra0, dec0 = float(m.group("ra")), float(m.group("dec"))
        return _Region("box", ra0, dec0, ra1=ra0 + 1.0, dec1=dec0 + 1.0)
    m = _CONE_NAME.match(path.name)
    if m and path.name.endswith((".ecsv", ".ecsv.gz", ".fits", ".csv")):
        return _Region(
            "cap", float(m.group("ra")) % 360.0, float(m.group("dec")), float(m.group("r"))
        )
    return None


def _region_from_meta(meta) -> _Region | None:
    low = {str(k).lower(): v for k, v in (meta or {}).items()}  # FITS keys come back upper case
    try:
        ra, dec, r = (float(low[k]) for k in ("cone_ra_deg", "cone_dec_deg", "cone_radius_deg"))
    except (KeyError, TypeError, ValueError):
        return None
    return _Region("cap", ra % 360.0, dec, r) if r > 0 else None


def _region_from_data(tab) -> _Region | None:
    from rpp_tasks.stages.crossmatch import angular_sep_deg, unit_vectors

    if len(tab) < 3:
        return None
    v = unit_vectors(tab["ra"], tab["dec"]).mean(axis=0)
    norm = float(np.linalg.norm(v))
    if norm < 1e-6:
        return None
    v /= norm
    cra = math.degrees(math.atan2(v[1], v[0])) % 360.0
    cdec = math.degrees(math.asin(max(-1.0, min(1.0, v[2]))))
    r = float(np.max(angular_sep_deg(cra, cdec, tab["ra"], tab["dec"])))
    from scipy.spatial import cKDTree

    xyz = unit_vectors(tab["ra"], tab["dec"])
    d, _ = cKDTree(xyz).query(xyz, k=2)
    nn_deg = float(np.degrees(np.median(d[:, 1])))
    # mean spacing 1/sqrt(density): the median nearest-neighbour distance of a Poisson field is
    # sqrt(ln 2 / pi) = 0.47 of it
    return _Region("cap", cra, cdec, r, spacing_deg=max(nn_deg / 0.47, 1e-6))


# =============================================================================== reading
_CACHE: dict[tuple, tuple] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_MAX = 64


def _cache_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def _lower_names(tab) -> dict[str, str]:
    return {c.lower(): c for c in tab.colnames}


def _is_refcat2(tab) -> bool:
    low = _lower_names(tab)
    if {"rp1", "r1", "r10"} <= set(low) or "dupvar" in low:
        return True
    return {"gmag", "bpmag", "rpmag", "rmag", "imag"} <= set(low) and "source" not in low


def normalize_refcat2(tab, *, scaled: bool = False):
    """Normalised reference columns from a RefCat2 table.

    Parameters
    ----------
    tab : astropy.table.Table
        RefCat2 rows: the tile columns `REFCAT2_COLUMNS` (``scaled=True``: integers in 1e-8 deg,
        10 uas(/yr) and mmag, as distributed) or an extract in degrees and magnitudes (RefCat2 or
        VizieR ``J/ApJ/867/105`` column names).

    Returns
    -------
    astropy.table.Table
        ``ra``, ``dec`` (epoch 2016.0), ``ref_id``, ``gaia_source_id`` (-1), ``mag_G``,
        ``mag_BP``, ``mag_RP``, ``mag_g``, ``mag_r``, ``mag_i``, ``mag_z`` and their errors,
        ``pmra``, ``pmdec`` (mas/yr), ``ref_variable`` (Gaia DR2 variability flag). Missing
        magnitudes (0 or non-finite) are NaN.
    """
    from astropy.table import Table

    low = _lower_names(tab)

    def col(*names, scale=1.0):
        for n in names:
            c = low.get(n.lower())
            if c is not None:
                try:
                    return np.asarray(tab[c], float) * scale
                except (TypeError, ValueError):
                    continue
        return np.full(len(tab), np.nan)

    pos = 1e-8 if scaled else 1.0
    mas = 1e-2 if scaled else 1.0  # 10 uas -> mas
    mag = 1e-3 if scaled else 1.0
    ra = col("RA", "RA_ICRS", "RAJ2000", "ra", scale=pos)
    dec = col("Dec", "DE_ICRS", "DEJ2000", "dec", scale=pos)
    pmra = col("pmra", "pmRA", scale=mas)
    pmdec = col("pmdec", "pmDE", scale=mas)
    out = Table()
    dt = _GAIA_EPOCH - _REFCAT2_EPOCH
    dec2 = dec + np.nan_to_num(pmdec) * dt / 3.6e6
    ra2 = ra + np.nan_to_num(pmra) * dt / 3.6e6 / np.cos(np.radians(np.clip(dec, -89.99, 89.99)))
    out["ra"], out["dec"] = ra2 % 360.0, dec2
    out["ref_id"] = np.asarray([f"RefCat2 {a:.6f}{d:+.6f}" for a, d in zip(ra, dec)], dtype=str)
    out["gaia_source_id"] = np.full(len(tab), -1, np.int64)
    for band, names, enames in (
        ("G", ("Gaia", "Gmag"), ("dGaia", "e_Gmag")),
        ("BP", ("BP", "BPmag"), ("dBP", "e_BPmag")),
        ("RP", ("RP", "RPmag"), ("dRP", "e_RPmag")),
        ("g", ("g", "gmag"), ("dg", "e_gmag")),
        ("r", ("r", "rmag"), ("dr", "e_rmag")),
        ("i", ("i", "imag"), ("di", "e_imag")),
        ("z", ("z", "zmag"), ("dz", "e_zmag")),
    ):
        m = col(*names, scale=mag)
        e = col(*enames, scale=mag)
        bad = ~(m > 0) | (m > 40)
        out[f"mag_{band}"] = np.where(bad, np.nan, m)
        floor = 0.0028 if band == "G" else 0.004 if band in ("BP", "RP") else 0.005
        e = np.where(np.isfinite(e) & (e > 0), e, 0.02)
        out[f"mag_err_{band}"] = np.where(bad, np.nan, np.hypot(e, floor))
    out["pmra"], out["pmdec"] = pmra, pmdec
    dv = col("dupvar")
    out["ref_variable"] = np.where(np.isfinite(dv), (np.nan_to_num(dv).astype(int) % 4) == 1, False)
    good = np.isfinite(out["ra"]) & np.isfinite(out["dec"])
    out = out[good]
    out.meta["catalog"] = "gaia"
    out.meta["local_format"] = "refcat2"
    return out


def _read_rc2(path: Path):
    """A distributed RefCat2 text tile (no header, 44 integer columns, one hex column per band)."""
    from astropy.io import ascii

    text = _read_text(path)
    if not text.strip():
        from astropy.table import Table

        return Table({n: np.zeros(0) for n in REFCAT2_COLUMNS[:14]})
    first = text.split("\n", 1)[0]
    if len(first.split(",")) != len(REFCAT2_COLUMNS):
        raise LocalCatalogError(
            f"{path.name}: {len(first.split(','))} columns, "
            f"a RefCat2 tile has {len(REFCAT2_COLUMNS)}"
        )
    tab = ascii.read(
        text,
        format="no_header",
        delimiter=",",
        names=REFCAT2_COLUMNS,
        fast_reader=True,
        guess=False,
    )
    return tab


def _read_text(path: Path) -> str:
    if path.name.endswith(".gz"):
        import gzip

        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
            return fh.read()
    return path.read_text(encoding="utf-8", errors="replace")


def _read_any(path: Path, name: str):
    """(raw table, RefCat2-scaled?) of one file, by its extension."""
    from astropy.table import Table

    if name.endswith(".rc2"):
        return _read_rc2(path), True
    if name.endswith((".fits", ".fit", ".fits.gz", ".fit.gz")):
        return Table.read(path, format="fits", hdu=1 if _has_table_hdu(path) else None), False
    if name.endswith((".ecsv", ".ecsv.gz")):
        return Table.read(path, format="ascii.ecsv"), False
    return Table.read(_read_text(path), format="ascii.csv"), False


def read_local_table(path: str | os.PathLike):
    """Read one local catalogue file into the normalised reference columns.

    Returns ``(table, region)`` where ``region`` is the sky region the file states it covers (None
    for an extract that states nothing: the caller derives it from the stars).

    Raises
    ------
    LocalCatalogError
        The file cannot be parsed or has no usable RA/Dec/magnitude columns.
    """

    from rpp_tasks.stages.catalogs import ServiceError, normalize_reference

    path = Path(path)
    key = _cache_key(path)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    name = path.name.lower()
    try:
        with warnings.catch_warnings():  # a broken file is reported as such, not as warnings
            warnings.simplefilter("ignore")
            raw, scaled = _read_any(path, name)
    except LocalCatalogError:
        raise
    except Exception as exc:  # every parser error means the same: this file is unusable
        raise LocalCatalogError(
            f"{path.name}: unreadable ({type(exc).__name__}: {exc})"[:300]
        ) from None
    region = _region_from_meta(raw.meta) or _region_from_name(path)
    low = _lower_names(raw)
    try:
        if scaled or _is_refcat2(raw):
            tab = normalize_refcat2(raw, scaled=scaled)
        elif "mag_g" in low and "ref_id" in low and "ra" in low:
            tab = _as_normalized(raw)
        else:
            tab = normalize_reference(raw, "gaia")
            if len(tab) and not np.isfinite(np.asarray(tab["mag_G"], float)).any():
                raise LocalCatalogError(f"{path.name}: no Gaia G magnitudes (phot_g_mean_mag/Gmag)")
    except ServiceError as exc:
        raise LocalCatalogError(f"{path.name}: {exc}") from None
    if len(raw) and len(tab) == 0:
        raise LocalCatalogError(f"{path.name}: no row with a usable RA/Dec")
    fmt = tab.meta.get("local_format", "gaia")
    tab.meta = {"catalog": "gaia", "local_file": str(path), "local_format": fmt}
    with _CACHE_LOCK:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = (tab, region)
    return tab, region


def _has_table_hdu(path: Path) -> bool:
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        return len(hdul) > 1


def _as_normalized(raw):
    """A table already in the normalised columns (``rpp catalog fetch`` output)."""
    tab = raw.copy(copy_data=False)
    n = len(tab)
    if "gaia_source_id" not in tab.colnames:
        tab["gaia_source_id"] = np.zeros(n, np.int64)
    for c in ("pmra", "pmdec"):
        if c not in tab.colnames:
            tab[c] = np.full(n, np.nan)
    tab["ra"] = np.asarray(tab["ra"], float)
    tab["dec"] = np.asarray(tab["dec"], float)
    tab["ref_id"] = np.asarray(tab["ref_id"]).astype(str)
    return tab[np.isfinite(tab["ra"]) & np.isfinite(tab["dec"])]


def local_files(paths) -> tuple[list[Path], list[str]]:
    """Catalogue files under ``paths`` (files or folders, searched recursively, sorted) and the
    problems found (a path that does not exist)."""
    files: list[Path] = []
    problems: list[str] = []
    for p in paths or ():
        p = Path(os.path.expandvars(os.path.expanduser(str(p))))
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for n in sorted(names):
                    if not n.startswith(".") and n.lower().endswith(_SUFFIXES):
                        files.append(Path(root) / n)
        else:
            problems.append(f"{p}: no such file or folder")
    return files, problems


# =============================================================================== query
def _cone_points(ra, dec, radius):
    """25 points of a cone: centre, 8 at half radius, 16 at 0.97 radius."""
    pts = [(ra, dec)]
    cosd = max(math.cos(math.radians(dec)), 1e-6)
    for frac, n in ((0.5, 8), (0.97, 16)):
        for k in range(n):
            th = 2 * math.pi * k / n
            d = dec + frac * radius * math.sin(th)
            a = ra + frac * radius * math.cos(th) / cosd
            pts.append((a % 360.0, max(-90.0, min(90.0, d))))
    return np.asarray(pts)


def _covered(points, region: _Region, tab) -> np.ndarray:
    inside = region.contains(points[:, 0], points[:, 1])
    if region.spacing_deg is None or not inside.any() or len(tab) == 0:
        return inside
    from scipy.spatial import cKDTree

    from rpp_tasks.stages.crossmatch import unit_vectors

    tree = cKDTree(unit_vectors(tab["ra"], tab["dec"]))
    d, _ = tree.query(unit_vectors(points[:, 0], points[:, 1]))
    near = np.degrees(2 * np.arcsin(np.clip(d / 2, 0, 1))) <= 3 * region.spacing_deg
    return inside & near


def query_local(
    paths,
    ra_deg: float,
    dec_deg: float,
    radius_deg: float,
    *,
    mag_limit: float | None = None,
    max_rows: int | None = None,
) -> LocalAnswer:
    """
    Reference stars in a cone from local catalogue files.

    Parameters
    ----------
    paths : sequence of path-like
        Files and folders (searched recursively for ``.fits``, ``.ecsv``, ``.csv`` (``.gz``) and
        ``.rc2``).
    ra_deg, dec_deg, radius_deg : float
        The cone (ICRS degrees).
    mag_limit : float, optional
        Keep stars with ``mag_G`` brighter than this (as the online query does; stars without G are
        kept).
    max_rows : int, optional
        Keep the brightest ``max_rows`` in G (as the online query does).

    Returns
    -------
    LocalAnswer
        Never raises for a missing, corrupt or non-covering file: the reason is in the answer.
    """
    from astropy.table import vstack

    from rpp_tasks.stages.catalogs import angular_sep_deg

    files, problems = local_files(paths)
    if not files:
        why = (
            "; ".join(problems)
            if problems
            else "no catalogue file in " + ", ".join(map(str, paths))
        )
        return LocalAnswer(None, "failed", why)
    pts = _cone_points(ra_deg, dec_deg, radius_deg)
    covered = np.zeros(len(pts), bool)
    parts, used = [], []
    for f in files:
        region = _region_from_name(f)
        if region is not None:  # named cones and tiles: skip without reading when disjoint
            cra, cdec, cr = region.bounding_cap()
            if float(angular_sep_deg(ra_deg, dec_deg, cra, cdec)) > radius_deg + cr:
                continue
        try:
            tab, region = read_local_table(f)
        except (LocalCatalogError, OSError) as exc:
            problems.append(str(exc) if isinstance(exc, LocalCatalogError) else f"{f.name}: {exc}")
            log.warning("local catalogue: %s", problems[-1])
            continue
        if region is None:
            region = _region_from_data(tab)
            if region is None:
                problems.append(f"{f.name}: too few stars to tell which sky it covers")
                continue
        cra, cdec, cr = region.bounding_cap()
        if float(angular_sep_deg(ra_deg, dec_deg, cra, cdec)) > radius_deg + cr:
            continue
        covered |= _covered(pts, region, tab)
        if len(tab):
            sel = angular_sep_deg(ra_deg, dec_deg, tab["ra"], tab["dec"]) <= radius_deg
            if sel.any():
                parts.append(tab[sel])
        used.append(f.name)
    coverage = float(covered.mean())
    if not used:
        why = "no local file covers the cone"
        if problems:
            why += " (" + "; ".join(problems)[:400] + ")"
        return LocalAnswer(None, "failed" if problems else "skipped", why)
    if not parts:
        why = "no star in the cone (" + ", ".join(used) + ")"
        if coverage < 1.0:
            return LocalAnswer(
                None, "partial", f"covers {coverage:.0%} of the cone, " + why, tuple(used), coverage
            )
        return LocalAnswer(None, "empty", why, tuple(used), coverage)
    formats = sorted({p.meta.get("local_format", "gaia") for p in parts})
    label = "+".join(formats)
    tab = parts[0] if len(parts) == 1 else _dedupe(vstack(parts, metadata_conflicts="silent"))
    if mag_limit is not None and "mag_G" in tab.colnames:
        g = np.asarray(tab["mag_G"], float)
        tab = tab[~(g >= mag_limit)]
    if "mag_G" in tab.colnames:
        tab = tab[
            np.argsort(np.nan_to_num(np.asarray(tab["mag_G"], float), nan=99.0), kind="stable")
        ]
    if max_rows is not None and len(tab) > max_rows:
        tab = tab[:max_rows]
    tab.meta = {"catalog": "gaia", "local_files": ", ".join(used)}
    native = tuple(
        c[4:]
        for c in tab.colnames
        if c.startswith("mag_") and not c.startswith("mag_err_") and np.isfinite(tab[c]).any()
    )
    where = ", ".join(used)
    if problems:
        where += " (ignored: " + "; ".join(problems)[:300] + ")"
    if coverage < 1.0:
        return LocalAnswer(
            tab,
            "partial",
            f"covers {coverage:.0%} of the cone: {where}",
            tuple(used),
            coverage,
            native,
            label,
        )
    return LocalAnswer(tab, "ok", where, tuple(used), coverage, native, label)


def _dedupe(tab):
    """Drop repeated stars of overlapping files (same Gaia id, else within 0.3 arcsec)."""
    from scipy.spatial import cKDTree

    from rpp_tasks.stages.crossmatch import unit_vectors

    sid = np.asarray(tab["gaia_source_id"], np.int64)
    keep = np.ones(len(tab), bool)
    pos = sid > 0
    if pos.any():
        _, first = np.unique(sid[pos], return_index=True)
        k = np.zeros(int(pos.sum()), bool)
        k[first] = True
        keep[np.flatnonzero(pos)] = k
    rest = np.flatnonzero(keep & ~pos)
    if rest.size > 1:
        tree = cKDTree(unit_vectors(tab["ra"][rest], tab["dec"][rest]))
        chord = 2 * math.sin(math.radians(0.3 / 3600) / 2)
        for i, j in sorted(tree.query_pairs(chord)):
            if keep[rest[i]]:
                keep[rest[j]] = False
    return tab[keep]


# =============================================================================== writing
def write_local_cone(
    folder: str | os.PathLike,
    ra_deg: float,
    dec_deg: float,
    radius_deg: float,
    table,
    *,
    provenance: dict | None = None,
) -> Path:
    """Store a normalised reference cone as ``<folder>/<ra>_<dec>_<radius>.ecsv`` (atomic write).

    The cone is recorded in the name and in the metadata (``cone_ra_deg``, ``cone_dec_deg``,
    ``cone_radius_deg``) so `query_local` knows what sky it covers; ``provenance`` (service, date,
    magnitude limit...) goes into the metadata.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ra_deg % 360:.6f}_{dec_deg:+.6f}_{radius_deg:.6f}.ecsv"
    out = table.copy(copy_data=False)
    out.meta = {
        "cone_ra_deg": float(ra_deg % 360),
        "cone_dec_deg": float(dec_deg),
        "cone_radius_deg": float(radius_deg),
        "catalog": "gaia",
        **{k: v for k, v in (provenance or {}).items() if isinstance(v, (str, int, float, bool))},
    }
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    out.write(tmp, format="ascii.ecsv", overwrite=True)
    os.replace(tmp, path)
    return path
