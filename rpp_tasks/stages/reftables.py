"""Service replies to one normalised reference table, and Gaia photometry transformed to other
bands.

parse_service_table reads VOTable, ECSV, TAP JSON and CSV replies; normalize_reference gives every
catalogue the same columns (ra, dec, ref_id, gaia_source_id, mag_<band>, mag_err_<band>);
gaia_transform derives Johnson-Cousins B V R I and Sloan g r i from Gaia G, BP, RP with the
Riello et al. (2021) polynomials. The services and their fallbacks are rpp_tasks.stages.catalogs.
"""

from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np

from rpp_tasks.stages.services import ServiceError

__all__ = [
    "NATIVE_BANDS",
    "GAIA_DERIVED",
    "parse_service_table",
    "normalize_reference",
    "gaia_transform",
]

#: Bands each catalogue measures natively.
NATIVE_BANDS = {
    "gaia": ("G", "BP", "RP"),
    "ps1": ("g", "r", "i", "z", "y"),
    "skymapper": ("g", "r", "i", "z"),
}
GAIA_DERIVED = ("B", "V", "R", "I", "g", "r", "i")


# =============================================================================== parsing
def parse_service_table(content: bytes):
    """Parse a service reply into an astropy Table: VOTable (incl. ``vot:`` prefixed), ECSV, TAP
    JSON (``metadata`` + ``data``), MAST JSON (``info`` + ``data``) or CSV, sniffed from the
    content.

    Raises `ServiceError` (``malformed``) for anything else, an error VOTable, or an HTML page.
    """
    from astropy.table import Table

    head = content.lstrip()[:400]
    try:
        if head.startswith(b"<"):
            if b"<html" in head.lower() or b"<!doctype html" in head.lower():
                raise ServiceError(
                    "malformed", "HTML page instead of a table (service error page?)"
                )
            from astropy.io.votable import parse
            from astropy.io.votable.exceptions import VOWarning

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", VOWarning)
                warnings.simplefilter("ignore", UserWarning)
                vot = parse(io.BytesIO(content), verify="ignore")
            for res in vot.resources:
                for info in list(res.infos):
                    if info.name == "QUERY_STATUS" and str(info.value).upper() == "ERROR":
                        raise ServiceError(
                            "malformed", f"service error: {(info.content or '')[:160]}"
                        )
            for info in vot.infos:
                if info.name == "QUERY_STATUS" and str(info.value).upper() == "ERROR":
                    raise ServiceError("malformed", f"service error: {(info.content or '')[:160]}")
            tables = list(vot.iter_tables())
            if not tables:
                return Table()
            best = max(tables, key=lambda t: len(t.array))
            tab = best.to_table(use_names_over_ids=True)
            for (
                name
            ) in tab.colnames:  # masked -> plain with NaN / '' (simpler and faster downstream)
                col = tab[name]
                if hasattr(col, "mask") and not np.any(col.mask):
                    tab[name] = np.asarray(col.data if hasattr(col, "data") else col)
                elif hasattr(col, "mask"):
                    if col.dtype.kind == "f":
                        tab[name] = np.asarray(col.filled(np.nan))
                    elif col.dtype.kind in "iu":
                        tab[name] = np.asarray(col.filled(0))
                    else:
                        tab[name] = np.asarray(col.filled(""))
            return Table(tab, masked=False)
        if head.startswith(b"# %ECSV"):
            return Table.read(content.decode(), format="ascii.ecsv")
        if head.startswith(b"{"):
            doc = json.loads(content)
            if "data" in doc and ("metadata" in doc or "info" in doc):
                names = [c["name"] for c in doc.get("metadata") or doc.get("info")]
                rows = doc["data"]
                cols = list(zip(*rows)) if rows else [[] for _ in names]
                out = Table()
                for n, c in zip(names, cols):
                    out[n] = _column(c)
                return out
            raise ServiceError("malformed", "JSON without metadata/info + data")
        if head and b"," in head.split(b"\n", 1)[0]:
            return Table.read(content.decode(), format="ascii.csv")
    except ServiceError:
        raise
    except Exception as exc:  # every parser error means the same thing here
        raise ServiceError(
            "malformed", f"unparsable reply ({type(exc).__name__}: {str(exc)[:120]})"
        ) from None
    raise ServiceError("malformed", f"unrecognised reply starting with {content[:40]!r}")


def _column(values):
    vals = [np.nan if v is None else v for v in values]
    try:
        arr = np.asarray(vals)
        if arr.dtype.kind in "OU":
            try:
                return np.asarray(vals, dtype=float)
            except (TypeError, ValueError):
                return np.asarray(
                    [
                        "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                        for v in values
                    ]
                )
        return arr
    except Exception:
        return np.asarray([str(v) for v in values])


def _col(tab, *names, default=np.nan):
    lower = {c.lower(): c for c in tab.colnames}
    for n in names:
        c = lower.get(n.lower())
        if c is not None:
            try:
                return np.asarray(tab[c], dtype=float)
            except (TypeError, ValueError):
                return np.asarray(tab[c])
    return np.full(len(tab), default)


def _strcol(tab, *names):
    lower = {c.lower(): c for c in tab.colnames}
    for n in names:
        c = lower.get(n.lower())
        if c is not None:
            return np.asarray([str(v).strip() for v in np.asarray(tab[c])])
    return np.full(len(tab), "", dtype="<U1")


def normalize_reference(tab, catalog: str):
    """Map a service table to the normalised reference columns (see module docstring).

    Raises `ServiceError` (``malformed``) when the coordinates are missing.
    """
    from astropy.table import Table

    out = Table()
    if catalog == "gaia":
        ra, dec = _col(tab, "ra", "RA_ICRS", "RAJ2000"), _col(tab, "dec", "DE_ICRS", "DEJ2000")
        sid = _col(tab, "source_id", "Source", default=0)
        out["ra"], out["dec"] = ra, dec
        sid_int = (
            np.where(np.isfinite(sid), sid, 0).astype(np.int64)
            if sid.dtype.kind == "f"
            else sid.astype(np.int64)
        )
        # float64 cannot hold 19-digit ids: re-read as integers when the column is integer
        lower = {c.lower(): c for c in tab.colnames}
        for n in ("source_id", "source"):
            if n in lower and np.asarray(tab[lower[n]]).dtype.kind in "iu":
                sid_int = np.asarray(tab[lower[n]], dtype=np.int64)
        out["ref_id"] = np.asarray([f"Gaia DR3 {s}" for s in sid_int])
        out["gaia_source_id"] = sid_int
        for band, names, snr_names in (
            ("G", ("phot_g_mean_mag", "Gmag"), ("phot_g_mean_flux_over_error",)),
            ("BP", ("phot_bp_mean_mag", "BPmag"), ("phot_bp_mean_flux_over_error",)),
            ("RP", ("phot_rp_mean_mag", "RPmag"), ("phot_rp_mean_flux_over_error",)),
        ):
            out[f"mag_{band}"] = _col(tab, *names)
            err = _col(tab, f"e_{names[1]}")
            if not np.isfinite(err).any():
                snr = _col(tab, *snr_names)
                err = 1.0857 / snr
            floor = 0.0028 if band == "G" else 0.004  # DR3 calibration floor
            out[f"mag_err_{band}"] = np.hypot(np.where(np.isfinite(err), err, 0.02), floor)
        out["pmra"] = _col(tab, "pmra", "pmRA")
        out["pmdec"] = _col(tab, "pmdec", "pmDE")
    elif catalog == "ps1":
        out["ra"], out["dec"] = (
            _col(tab, "raMean", "ra", "RAJ2000"),
            _col(tab, "decMean", "dec", "DEJ2000"),
        )
        out["ref_id"] = _strcol(tab, "objID", "objName")
        out["gaia_source_id"] = np.zeros(len(tab), np.int64)
        for b in NATIVE_BANDS["ps1"]:
            m = _col(tab, f"{b}MeanPSFMag", f"{b}mag")
            e = _col(tab, f"{b}MeanPSFMagErr", f"e_{b}mag")
            bad = ~(m > -50)  # MAST uses -999 for missing
            out[f"mag_{b}"] = np.where(bad, np.nan, m)
            out[f"mag_err_{b}"] = np.where(bad | ~(e > -50), np.nan, e)
    elif catalog == "skymapper":
        out["ra"], out["dec"] = _col(tab, "raj2000", "ra"), _col(tab, "dej2000", "dec")
        out["ref_id"] = _strcol(tab, "object_id")
        out["gaia_source_id"] = np.zeros(len(tab), np.int64)
        for b in NATIVE_BANDS["skymapper"]:
            out[f"mag_{b}"] = _col(tab, f"{b}_psf")
            out[f"mag_err_{b}"] = _col(tab, f"e_{b}_psf")
    else:
        raise ValueError(f"unknown catalogue {catalog!r}")
    if len(out) and not (np.isfinite(out["ra"]).any() and np.isfinite(out["dec"]).any()):
        raise ServiceError("malformed", f"{catalog} reply has no usable ra/dec columns")
    good = np.isfinite(out["ra"]) & np.isfinite(out["dec"])
    out = out[good]
    out.meta["catalog"] = catalog
    return out


# Riello et al. (2021, A&A 649, A3) Table C.2: G - X = poly(BP - RP), valid ranges approx.
_GAIA_POLY = {
    "V": ((-0.02704, 0.01424, -0.2156, 0.01426), (-0.5, 5.0), 0.0302),
    "R": ((-0.02275, 0.3961, -0.1243, -0.01396, 0.003775), (-0.5, 4.0), 0.0317),
    "I": ((0.01753, 0.76, -0.0991), (-0.5, 4.5), 0.0337),
    "g": ((0.2199, -0.6365, -0.1548, 0.0064), (0.3, 3.0), 0.0745),
    "r": ((-0.09837, 0.08592, 0.1907, -0.1701, 0.02263), (0.0, 3.0), 0.0379),
    "i": ((-0.293, 0.6404, -0.09609, -0.002104), (0.5, 2.0), 0.0409),
}


def gaia_transform(ref):
    """Add ``mag_<X>``/``mag_err_<X>`` for X in ``B V R I g r i`` derived from Gaia G, BP, RP.

    Outside a relation's colour range the value is NaN. ``B`` comes from V and the Gaia DR2
    ``G - V = f(B - V)`` relation (Evans et al. 2018) inverted on a grid (approximate, ~0.1 mag).
    The relation's scatter is added in quadrature to the error.
    """
    ref = ref.copy(copy_data=False)
    g = np.asarray(ref["mag_G"], float)
    x = np.asarray(ref["mag_BP"], float) - np.asarray(ref["mag_RP"], float)
    eg = np.asarray(ref["mag_err_G"], float)
    for band, (coef, (lo, hi), sig) in _GAIA_POLY.items():
        gx = np.polynomial.polynomial.polyval(x, coef)
        m = np.where((x >= lo) & (x <= hi), g - gx, np.nan)
        if f"mag_{band}" in ref.colnames and np.isfinite(ref[f"mag_{band}"]).any():
            continue  # never overwrite a native band
        ref[f"mag_{band}"] = m
        ref[f"mag_err_{band}"] = np.hypot(eg, sig)
    if "mag_V" in ref.colnames:
        bv_grid = np.linspace(-0.1, 2.0, 400)
        gv_grid = -0.02907 - 0.02385 * bv_grid - 0.2297 * bv_grid**2 - 0.001768 * bv_grid**3
        gv = g - np.asarray(ref["mag_V"], float)
        bv = np.interp(
            -gv, -gv_grid, bv_grid, left=np.nan, right=np.nan
        )  # gv_grid decreases with B-V
        ref["mag_B"] = np.asarray(ref["mag_V"], float) + bv
        ref["mag_err_B"] = np.hypot(eg, 0.1)
    ref.meta["transformed_from"] = "gaia"
    return ref
