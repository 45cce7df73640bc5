"""Spectral products: BeSS 1-D FITS, ECSV, lamp solution table, 1-D readers and plots.

BeSS 1-D FITS (the Be Star Spectra database's format, also what ISIS and SpecINTI write): one
primary HDU, ``NAXIS = 1``, float32 flux on a linear wavelength grid ``CRVAL1 + (i + 1 -
CRPIX1) * CDELT1`` in Angstrom (``CUNIT1 = 'Angstrom'``, ``CTYPE1 = 'Wavelength'``, air
wavelengths), plus ``OBJNAME, DATE-OBS, EXPTIME, EXPTIME2, JD-OBS, JD-MID, BSS_INST, BSS_SITE,
BSS_VHEL, SPE_RPOW, GEO_LONG, GEO_LAT, GEO_ELEV, OBSERVER``. The error spectrum is not part of
the format: it is in the ECSV product (``wavelength, flux, error``).

`read_spectrum_1d` reads 1-D spectra written by others with specutils (``wcs1d-fits``) and says
why it cannot when a file has no wavelength scale.

Plot functions return PNG bytes, like `rpp_tasks.outputs.report`.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from rpp_tasks.spectra.linelists import BALMER_A, HELIUM_A, TELLURIC_BANDS_A

__all__ = [
    "BESS_REQUIRED",
    "Spectrum1DFile",
    "write_bess_fits",
    "write_spectrum_ecsv",
    "write_lamp_solution",
    "read_spectrum_1d",
    "plot_spectrum",
    "plot_wavelength_residuals",
    "format_exptime2",
]

log = logging.getLogger(__name__)

#: Keywords every BeSS 1-D spectrum written here carries.
BESS_REQUIRED = (
    "CRVAL1",
    "CDELT1",
    "CRPIX1",
    "CUNIT1",
    "CTYPE1",
    "OBJNAME",
    "DATE-OBS",
    "EXPTIME",
    "EXPTIME2",
    "JD-OBS",
    "BSS_INST",
    "BSS_SITE",
    "BSS_VHEL",
    "SPE_RPOW",
    "GEO_LONG",
    "GEO_LAT",
    "GEO_ELEV",
    "OBSERVER",
)


def format_exptime2(exptimes_s) -> str:
    """``"6 x 1200.0 s"`` (or ``"1200.0 s + 600.0 s"`` when the exposures differ)."""
    t = [float(v) for v in exptimes_s]
    if not t:
        return ""
    if max(t) - min(t) < 0.05:
        return f"{len(t)} x {t[0]:.1f} s"
    return " + ".join(f"{v:.1f} s" for v in t)


def write_bess_fits(path, *, flux, crval1, cdelt1, keywords, history=()):
    """
    Write a BeSS-format 1-D spectrum.

    Parameters
    ----------
    path : str or Path
    flux : 1-D array
        On the linear grid (NaN are written as 0, BeSS readers do not accept NaN).
    crval1, cdelt1 : float
        Wavelength of the first pixel and step (A).
    keywords : mapping
        Header keywords (value or ``(value, comment)``); must include the BeSS set.
    history : iterable of str

    Returns
    -------
    path : Path
    """
    flux = np.asarray(flux, dtype=np.float32)
    if flux.ndim != 1:
        msg = f"flux must be 1-D, got shape {flux.shape}"
        raise ValueError(msg)
    h = fits.Header()
    h["CRPIX1"] = (1.0, "reference pixel")
    h["CRVAL1"] = (float(crval1), "[Angstrom] wavelength of the reference pixel")
    h["CDELT1"] = (float(cdelt1), "[Angstrom] wavelength step")
    h["CUNIT1"] = ("Angstrom", "wavelength unit")
    h["CTYPE1"] = ("Wavelength", "air wavelength")
    for k, v in keywords.items():
        if isinstance(v, tuple):
            h[k] = (v[0], v[1])
        else:
            h[k] = v
    missing = [k for k in BESS_REQUIRED if k not in h]
    if missing:
        msg = f"BeSS keywords missing: {', '.join(missing)}"
        raise ValueError(msg)
    for line in history:
        h["HISTORY"] = str(line)[:70]
    data = np.where(np.isfinite(flux), flux, 0.0).astype(np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(data=data, header=h).writeto(path, overwrite=True)
    return path


def write_spectrum_ecsv(path, *, wavelength_a, flux, error, meta=None):
    """ECSV table ``wavelength`` (A, air), ``flux``, ``error`` (+ ``meta``)."""
    from astropy.table import Table

    t = Table(
        {
            "wavelength": np.asarray(wavelength_a, float),
            "flux": np.asarray(flux, float),
            "error": np.asarray(error, float),
        }
    )
    t["wavelength"].unit = "Angstrom"
    t["wavelength"].description = "air wavelength"
    t.meta.update(dict(meta or {}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t.write(path, format="ascii.ecsv", overwrite=True)
    return path


def write_lamp_solution(path, solution):
    """ECSV table of the lamp lines (position, laboratory wavelength, fit, residuals, used)."""
    from astropy.table import Table

    cols = ("x_px", "x_err_px", "wavelength_a", "fit_a", "residual_a", "residual_px", "fwhm_px")
    rows = list(solution.lines)
    t = Table({c: [r[c] for r in rows] for c in cols})
    t["R"] = [r["R"] for r in rows]
    t["label"] = [r["label"] for r in rows]
    t["used"] = [r["used"] for r in rows]
    meta = solution.to_dict()
    meta.pop("lines")
    t.meta.update(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t.write(path, format="ascii.ecsv", overwrite=True)
    return path


@dataclass(frozen=True)
class Spectrum1DFile:
    """A 1-D spectrum read from a file.

    ``calibrated`` is False when the file has no wavelength scale (``wavelength_a`` is then the
    pixel index and ``reason`` says why).
    """

    path: str
    flux: np.ndarray = field(repr=False)
    wavelength_a: np.ndarray = field(repr=False)
    calibrated: bool
    header: dict = field(repr=False, default_factory=dict)
    reason: str | None = None

    def to_dict(self) -> dict:
        lam = self.wavelength_a
        return {
            "path": self.path,
            "n": int(self.flux.size),
            "calibrated": self.calibrated,
            "range_a": [float(np.nanmin(lam)), float(np.nanmax(lam))] if self.calibrated else None,
            "object": self.header.get("OBJNAME") or self.header.get("OBJECT"),
            "reason": self.reason,
        }


def read_spectrum_1d(path):
    """
    Read a 1-D spectrum (BeSS/ISIS/SpecINTI FITS, or a 1 x N image).

    Calibrated files are read with specutils' ``wcs1d-fits`` loader; a file without a linear
    wavelength scale (no CRVAL1/CDELT1 or CD1_1) is returned with ``calibrated=False`` and the
    reason, on a pixel axis.

    Raises
    ------
    ValueError
        Not a 1-D spectrum (a 2-D image, a table, no data).
    """
    path = Path(path)
    with fits.open(path, memmap=False) as hdul:
        hdu = next((h for h in hdul if getattr(h, "data", None) is not None), None)
        if hdu is None or hdu.data is None:
            msg = f"{path.name}: no data array"
            raise ValueError(msg)
        data = np.asarray(hdu.data, dtype=float)
        header = hdu.header
    if data.ndim == 2 and 1 in data.shape:
        data = data.ravel()
    if data.ndim != 1:
        msg = f"{path.name}: not a 1-D spectrum (data shape {data.shape})"
        raise ValueError(msg)
    hdr = {k: header[k] for k in header if k not in ("COMMENT", "HISTORY", "")}
    has_scale = "CRVAL1" in header and ("CDELT1" in header or "CD1_1" in header)
    if not has_scale:
        return Spectrum1DFile(
            path=str(path),
            flux=data,
            wavelength_a=np.arange(data.size, dtype=float),
            calibrated=False,
            header=hdr,
            reason="no wavelength scale (CRVAL1/CDELT1 absent): uncalibrated 1-D spectrum, "
            "pixel axis only",
        )
    import warnings

    import astropy.units as u
    from specutils import Spectrum

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            spec = Spectrum.read(path, format="wcs1d-fits")
            lam = spec.spectral_axis.to(u.AA, equivalencies=u.spectral()).value
            flux = np.asarray(spec.flux.value, float).ravel()
        except Exception as exc:  # a header specutils cannot parse: linear scale by hand
            log.info("%s: specutils could not read it (%s); linear CRVAL1/CDELT1", path, exc)
            step = float(header.get("CDELT1", header.get("CD1_1")))
            lam = (
                float(header["CRVAL1"])
                + (np.arange(data.size) + 1 - float(header.get("CRPIX1", 1))) * step
            )
            unit = str(header.get("CUNIT1", "Angstrom")).strip().lower()
            if unit in ("nm", "nanometer"):
                lam = lam * 10.0
            flux = data
    return Spectrum1DFile(
        path=str(path), flux=flux, wavelength_a=np.asarray(lam, float), calibrated=True, header=hdr
    )


# ------------------------------------------------------------------------------------ plots
def _figure(w, h):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="white")
    return buf.getvalue()


def plot_spectrum(wavelength_a, flux, error=None, *, title="", calibrated=True, mark=True):
    """
    PNG of a 1-D spectrum with the main H (Balmer), He lines and telluric bands marked.

    Parameters
    ----------
    wavelength_a, flux : 1-D arrays
    error : 1-D array, optional
        Drawn as a band.
    title : str
    calibrated : bool
        False: the x axis is in pixels and no line is marked.
    mark : bool

    Returns
    -------
    png : bytes
    """
    lam = np.asarray(wavelength_a, float)
    f = np.asarray(flux, float)
    fig = _figure(10, 4.2)
    ax = fig.add_subplot()
    ax.plot(lam, f, color="k", lw=0.8)
    if error is not None:
        e = np.asarray(error, float)
        ax.fill_between(lam, f - e, f + e, color="0.6", alpha=0.5, lw=0, label="1 sigma")
    ok = np.isfinite(f)
    if ok.any():
        lo, hi = np.nanpercentile(f[ok], [0.5, 99.5])
        pad = 0.08 * (hi - lo if hi > lo else 1.0)
        ax.set_ylim(lo - pad, hi + 3 * pad)
    if calibrated and mark and ok.any():
        xmin, xmax = np.nanmin(lam), np.nanmax(lam)
        top = ax.get_ylim()[1]
        for name, w in BALMER_A.items():
            if xmin < w < xmax:
                ax.axvline(w, color="tab:red", lw=0.7, ls="--", alpha=0.8)
                ax.text(w, top, name, color="tab:red", fontsize=8, ha="center", va="top")
        for name, w in HELIUM_A.items():
            if xmin < w < xmax:
                ax.axvline(w, color="tab:blue", lw=0.6, ls=":", alpha=0.8)
                ax.text(
                    w,
                    top,
                    name.split()[0],
                    color="tab:blue",
                    fontsize=7,
                    ha="center",
                    va="bottom",
                    rotation=90,
                )
        for name, (a, b) in TELLURIC_BANDS_A.items():
            if b > xmin and a < xmax:
                ax.axvspan(a, b, color="tab:green", alpha=0.12, lw=0)
                ax.text(
                    0.5 * (a + b),
                    ax.get_ylim()[0],
                    name,
                    color="tab:green",
                    fontsize=7,
                    ha="center",
                    va="bottom",
                )
    ax.set_xlabel("air wavelength (Angstrom)" if calibrated else "pixel (no wavelength scale)")
    ax.set_ylabel("flux (relative)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_wavelength_residuals(solution, *, title=""):
    """
    PNG of the wavelength solution's residuals (A, right axis px) against wavelength, lines
    rejected by the clipping in grey.
    """
    fig = _figure(8, 3.2)
    ax = fig.add_subplot()
    rows = list(solution.lines)
    if rows:
        w = np.array([r["wavelength_a"] for r in rows])
        res = np.array([r["residual_a"] for r in rows])
        used = np.array([r["used"] for r in rows])
        ax.scatter(w[used], res[used], s=18, color="tab:blue", label="used")
        if (~used).any():
            ax.scatter(w[~used], res[~used], s=18, color="0.6", marker="x", label="rejected")
        ax.axhline(0, color="k", lw=0.6)
        lim = max(4 * solution.rms_a, np.nanmax(np.abs(res[used])) * 1.2 if used.any() else 1)
        if math.isfinite(lim) and lim > 0:
            ax.set_ylim(-lim, lim)
        ax.legend(fontsize=8, loc="upper right")
        disp = abs(float(solution.dispersion(solution.x_c)))
        sec = ax.secondary_yaxis("right", functions=(lambda a: a / disp, lambda p: p * disp))
        sec.set_ylabel("residual (px)")
    ax.set_xlabel("laboratory wavelength (Angstrom, air)")
    ax.set_ylabel("residual (Angstrom)")
    ax.set_title(
        title
        or (
            f"wavelength solution: {solution.n_lines} lines, degree {solution.degree}, "
            f"RMS {solution.rms_a:.3f} A = {solution.rms_px:.3f} px, R = "
            f"{solution.resolving_power:.0f}"
        ),
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    return _png(fig)
