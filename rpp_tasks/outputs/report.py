"""Session report: the page observers read in the morning, and a ZIP of the session's products.

The report is one self-contained HTML file (``<workdir>/report/report.html``): every plot is
embedded as a base64 ``data:`` URI, the CSS is inline, nothing is fetched from the network, so it
opens offline, from an e-mail attachment or from a ZIP. The PNG files of the plots are also
written next to it (``report/*.png``) for the e-mail inline image and the Telegram photo.

Sections (each rendered only from data that exists; a section whose data is missing says
"not available yet" and never shows invented values):

* the night at a glance (frames reduced, median FWHM, background, limiting magnitude, sources);
* header facts observers look for: object, exposure, dates, telescope, instrument, observer, site,
  weather keywords when the headers carry them;
* night trends (FWHM, background, sources and limiting magnitude against time);
* a frame preview (zscale) with the detections and the transient candidates marked;
* magnitude against error (all frames);
* zero-point fit residuals (``frames/<stem>/zeropoint.json``, when the zero-point stage ran);
* FWHM and background across the field (3x3 cells for FWHM, the sky mesh for the background);
* transient candidates (``frames/<stem>/candidates.ecsv``, when the transient stage ran);
* a per-frame table (FWHM, zero point, limiting magnitude, sources, status and reason).

Pure functions: `zscale_limits`, `plot_frame_preview`, `plot_mag_error`, `plot_zeropoint_residuals`,
`measure_field_maps`, `plot_field_maps`, `plot_night_trends`, `header_facts`, `render_report_html`.
Builders with file I/O: `build_report`, `zip_products`. Adapter: `run_report(session, obs)`.

matplotlib is imported lazily and used through ``matplotlib.figure.Figure`` with the Agg canvas
(no pyplot, no global backend switch), so importing this module stays cheap.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import html
import io
import logging
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rpp_tasks import __version__
from rpp_tasks.session.workdir import Session, read_json

__all__ = [
    "WEATHER_KEYWORDS",
    "FieldMaps",
    "ReportResult",
    "zscale_limits",
    "plot_frame_preview",
    "plot_mag_error",
    "plot_zeropoint_residuals",
    "measure_field_maps",
    "plot_field_maps",
    "plot_night_trends",
    "header_facts",
    "zeropoint_stars",
    "render_report_html",
    "build_report",
    "zip_products",
    "run_report",
    "NOT_AVAILABLE",
]

log = logging.getLogger(__name__)

NOT_AVAILABLE = "not available yet"

#: Header keywords reported as observing conditions when present: keyword -> label.
WEATHER_KEYWORDS: dict[str, str] = {
    "AMBTEMP": "ambient temperature",
    "AMB-TEMP": "ambient temperature",
    "TEMPEXT": "ambient temperature",
    "EXTTEMP": "ambient temperature",
    "OUTTEMP": "ambient temperature",
    "TEMPAIR": "ambient temperature",
    "HUMIDITY": "humidity",
    "RELHUM": "humidity",
    "HUMID": "humidity",
    "PRESSURE": "pressure",
    "PRESS": "pressure",
    "DEWPOINT": "dew point",
    "DEWPT": "dew point",
    "WINDSPD": "wind speed",
    "WINDSPEED": "wind speed",
    "WINDGUST": "wind gust",
    "WINDDIR": "wind direction",
    "CLOUDCVR": "cloud cover",
    "CLOUDS": "cloud cover",
    "SKYTEMP": "sky temperature",
    "SKYBRGHT": "sky brightness",
    "SKYQUAL": "sky quality (SQM)",
    "SQM": "sky quality (SQM)",
    "MPSAS": "sky quality (SQM)",
    "SEEING": "seeing (weather station)",
    "STARFWHM": "star FWHM (capture)",
    "RAINRATE": "rain rate",
    "AIRMASS": "airmass",
    "MOONANGL": "moon distance",
    "MOONPHAS": "moon phase",
    "FOCTEMP": "focuser temperature",
    "CCD-TEMP": "sensor temperature",
    "CCDTEMP": "sensor temperature",
}
#: Header keywords for the "who / what / where" facts: label -> candidate keywords.
FACT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "object": ("OBJECT", "OBJNAME", "TARGET"),
    "telescope": ("TELESCOP",),
    "instrument": ("INSTRUME", "CAMERA"),
    "observer": ("OBSERVER", "AUTHOR"),
    "site": ("SITENAME", "OBSERVAT", "SITE"),
    "filter": ("FILTER", "FILTER1", "FILTNAME"),
    "site latitude": ("SITELAT", "LAT-OBS", "OBSLAT"),
    "site longitude": ("SITELONG", "LONG-OBS", "OBSLONG"),
    "site elevation": ("SITEELEV", "ALT-OBS", "OBSALT"),
}
_PLOT_DPI = 100
_QUALITY_COLOURS = {"good": "#2ca02c", "marginal": "#ffbf00", "poor": "#d62728"}
_CANDIDATE_COLOUR = "#ff00ff"
_SNR_LINES = ((10.0, "S/N 10"), (5.0, "S/N 5"))


# =============================================================================== small helpers
def _finite(value) -> float | None:
    """A finite float or None (summaries store NaN as null)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(value, fmt: str = "{:.2f}", missing: str = "—") -> str:
    v = _finite(value)
    return missing if v is None else fmt.format(v)


def _esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _literal_text(plot):
    """Run a plot function with matplotlib's mathtext off: the plots draw file names, OBJECT and
    other header values, which are never TeX (``M42_$1_$2.fits`` made matplotlib parse ``1_`` as
    math and lose the preview, magnitude-error and zero-point plots)."""

    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)

    return wrapper


def _figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=_PLOT_DPI, layout="constrained")


def _png(fig, *, palette_colors: int | None = None) -> bytes:
    """PNG bytes of a figure; ``palette_colors`` quantises to an indexed palette (noisy images
    compress 3-5x smaller, invisible at screen resolution)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_PLOT_DPI, facecolor="white")
    if palette_colors:
        try:
            from PIL import Image

            img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
            # fixed palette: grey ramp for the image and text + the exact marker colours, so rare
            # marker pixels keep their colour (an adaptive palette would merge them into grey)
            marks = [
                tuple(int(c[i : i + 2], 16) for i in (1, 3, 5))
                for c in (*_QUALITY_COLOURS.values(), _CANDIDATE_COLOUR)
            ]
            n_grey = max(2, min(palette_colors, 256) - len(marks))
            greys = [round(255 * k / (n_grey - 1)) for k in range(n_grey)]
            flat = [v for g in greys for v in (g, g, g)] + [v for m in marks for v in m]
            pal = Image.new("P", (1, 1))
            pal.putpalette(flat + [0] * (768 - len(flat)))
            out = io.BytesIO()
            img.quantize(palette=pal, dither=Image.Dither.NONE).save(
                out, format="PNG", optimize=True
            )
            return out.getvalue()
        except Exception:  # pragma: no cover - Pillow missing or old: keep the RGBA PNG
            pass
    return buf.getvalue()


def _col(table, *names):
    """First column of ``table`` among ``names`` as a float array, or None."""
    if table is None:
        return None
    for n in names:
        if n in table.colnames:
            return np.asarray(table[n], dtype=float)
    return None


def _has_calibrated(table) -> bool:
    """True when the catalogue has finite calibrated magnitudes (``mag_cal_*`` of the zero-point stage)."""
    for t in ("psf", "1p3fwhm"):
        v = _col(table, f"mag_cal_{t}")
        if v is not None and np.isfinite(v).any():
            return True
    return False


def _best_mag(
    table, *, calibrated: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """PSF magnitude where finite, else the 1.3 FWHM aperture magnitude (with matching error);
    ``calibrated`` uses the ``mag_cal_*`` columns of the zero-point stage."""
    pre, epre = ("mag_cal_", "mag_cal_err_") if calibrated else ("mag_", "mag_err_")
    mag, err = _col(table, f"{pre}psf"), _col(table, f"{epre}psf")
    amag = _col(table, f"{pre}1p3fwhm", *(() if calibrated else ("mag",)))
    aerr = _col(table, f"{epre}1p3fwhm", *(() if calibrated else ("mag_err",)))
    if mag is None or err is None:
        return (amag, aerr) if amag is not None and aerr is not None else (None, None)
    if amag is not None and aerr is not None:
        use_ap = ~np.isfinite(mag) | ~np.isfinite(err)
        mag = np.where(use_ap, amag, mag)
        err = np.where(use_ap, aerr, err)
    return mag, err


# =============================================================================== image helpers
def zscale_limits(
    data, *, mask=None, n_samples: int = 1000, contrast: float = 0.25
) -> tuple[float, float]:
    """
    IRAF zscale display limits of an image.

    Parameters
    ----------
    data : array_like
        2-D image.
    mask : array_like of bool, optional
        Pixels to ignore.
    n_samples : int, optional
        Number of pixels sampled.
    contrast : float, optional
        zscale contrast.

    Returns
    -------
    vmin, vmax : float
        Display limits; the finite minimum and maximum when zscale cannot run.

    Raises
    ------
    ValueError
        If ``data`` is not 2-D or has no finite pixel.
    """
    from astropy.visualization import ZScaleInterval

    data = np.asarray(data, dtype=float)
    if data.ndim != 2:
        raise ValueError(f"zscale_limits needs a 2-D image, got shape {data.shape}")
    good = np.isfinite(data)
    if mask is not None:
        good &= ~np.asarray(mask, dtype=bool)
    values = data[good]
    if values.size == 0:
        raise ValueError("zscale_limits: the image has no finite, unmasked pixel")
    try:
        vmin, vmax = ZScaleInterval(n_samples=n_samples, contrast=contrast).get_limits(values)
    except Exception:  # pragma: no cover - astropy edge cases on constant images
        vmin, vmax = float(values.min()), float(values.max())
    if not vmax > vmin:
        vmin, vmax = float(values.min()), float(values.max()) + 1e-6
    return float(vmin), float(vmax)


def _downsample(data, max_side_px: int):
    """Block-average ``data`` by an integer factor so that its longer side is <= max_side_px."""
    factor = max(1, int(math.ceil(max(data.shape) / max_side_px)))
    if factor == 1:
        return data, 1
    ny, nx = (data.shape[0] // factor) * factor, (data.shape[1] // factor) * factor
    view = data[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor)
    with np.errstate(invalid="ignore"), _quiet_nan_warnings():
        return np.nanmean(view, axis=(1, 3)), factor


class _quiet_nan_warnings:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# =============================================================================== plots
@_literal_text
def plot_frame_preview(
    data,
    *,
    sources=None,
    candidates=None,
    mask=None,
    title: str = "",
    marker_radius_px: float = 8.0,
    max_side_px: int = 1400,
    width_in: float = 9.0,
) -> bytes:
    """
    Preview of a calibrated frame (zscale, grey) with detections and transient candidates marked.

    Parameters
    ----------
    data : array_like
        2-D calibrated image (ADU).
    sources : `~astropy.table.Table`, optional
        Catalogue with ``x_centroid``, ``y_centroid`` (0-based px) and optionally ``quality``
        (``good``/``marginal``/``poor``); circles coloured by quality.
    candidates : `~astropy.table.Table`, optional
        Transient candidates with ``x_centroid``/``y_centroid`` (or ``x``/``y``); magenta squares,
        labelled with ``id``/``name`` when present.
    mask : array_like of bool, optional
        Bad pixels, ignored for the display limits.
    title : str, optional
    marker_radius_px : float, optional
        Circle radius in image pixels (e.g. 2.5 x FWHM).
    max_side_px : int, optional
        Larger images are block-averaged for display (markers stay in image pixels).
    width_in : float, optional
        Figure width in inches (100 dpi).

    Returns
    -------
    png : bytes
    """
    data = np.asarray(data, dtype=float)
    if data.ndim != 2:
        raise ValueError(f"plot_frame_preview needs a 2-D image, got shape {data.shape}")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle, Rectangle

    vmin, vmax = zscale_limits(data, mask=mask)
    shown, factor = _downsample(data, max_side_px)
    ny, nx = data.shape
    aspect = ny / nx
    fig = _figure(width_in, max(3.0, width_in * aspect * 0.92 + 0.6))
    ax = fig.add_subplot()
    ax.imshow(
        shown,
        origin="lower",
        cmap="gray",
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
        extent=(-0.5, nx - 0.5, -0.5, ny - 0.5),
    )
    handles = []
    if (
        sources is not None
        and len(sources)
        and {"x_centroid", "y_centroid"} <= set(sources.colnames)
    ):
        quality = (
            np.asarray(sources["quality"]).astype(str)
            if "quality" in sources.colnames
            else np.full(len(sources), "good")
        )
        xs, ys = np.asarray(sources["x_centroid"], float), np.asarray(sources["y_centroid"], float)
        for q, colour in _QUALITY_COLOURS.items():
            sel = quality == q
            for x, y in zip(xs[sel], ys[sel]):
                ax.add_patch(
                    Circle((x, y), marker_radius_px, fill=False, lw=0.9, ec=colour, alpha=0.9)
                )
            if sel.any():
                handles.append(
                    Line2D(
                        [],
                        [],
                        ls="",
                        marker="o",
                        mfc="none",
                        mec=colour,
                        label=f"{q} S/N ({int(sel.sum())})",
                    )
                )
    if candidates is not None and len(candidates):
        cx, cy = (
            _col(candidates, "x_centroid", "x", "xcentroid"),
            _col(candidates, "y_centroid", "y", "ycentroid"),
        )
        if cx is not None and cy is not None:
            labels = None
            for name in ("id", "name", "candidate_id"):
                if name in candidates.colnames:
                    labels = [str(v) for v in candidates[name]]
                    break
            side = 2.6 * marker_radius_px
            for i, (x, y) in enumerate(zip(cx, cy)):
                if not (np.isfinite(x) and np.isfinite(y)):
                    continue
                ax.add_patch(
                    Rectangle(
                        (x - side / 2, y - side / 2),
                        side,
                        side,
                        fill=False,
                        lw=1.6,
                        ec=_CANDIDATE_COLOUR,
                    )
                )
                if labels is not None:
                    ax.annotate(
                        labels[i],
                        (x + side / 2, y + side / 2),
                        color=_CANDIDATE_COLOUR,
                        fontsize=10,
                        fontweight="bold",
                        bbox={"fc": "black", "ec": "none", "alpha": 0.7, "pad": 1.5},
                    )
            handles.append(
                Line2D(
                    [],
                    [],
                    ls="",
                    marker="s",
                    mfc="none",
                    mec=_CANDIDATE_COLOUR,
                    mew=1.6,
                    label=f"transient candidate ({len(candidates)})",
                )
            )
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(-0.5, ny - 0.5)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    if title:
        ax.set_title(title, fontsize=11)
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.8)
    if factor > 1:
        ax.text(
            0.01,
            0.01,
            f"display binned {factor}x{factor}",
            transform=ax.transAxes,
            color="w",
            fontsize=7,
        )
    return _png(fig, palette_colors=96)


@_literal_text
def plot_mag_error(
    catalogs: Mapping[str, Any], *, width_in: float = 8.0, height_in: float = 4.6
) -> bytes:
    """
    Magnitude against magnitude error, one colour per frame.

    Parameters
    ----------
    catalogs : mapping of str to `~astropy.table.Table`
        Frame name -> photometry catalogue (PSF magnitudes where finite, else the 1.3 FWHM
        aperture). When every catalogue has calibrated magnitudes (``mag_cal_*``, written by the
        zero-point stage) they are shown; otherwise instrumental magnitudes (per second).

    Returns
    -------
    png : bytes
    """
    calibrated = bool(catalogs) and all(_has_calibrated(t) for t in catalogs.values())
    fig = _figure(width_in, height_in)
    ax = fig.add_subplot()
    n_plotted = 0
    cmap = _cmap("viridis")
    for i, (name, table) in enumerate(catalogs.items()):
        mag, err = _best_mag(table, calibrated=calibrated)
        if mag is None:
            continue
        ok = np.isfinite(mag) & np.isfinite(err) & (err > 0)
        if not ok.any():
            continue
        shift = 0.0
        colour = cmap(i / max(1, len(catalogs) - 1)) if len(catalogs) > 1 else "#1f77b4"
        ax.scatter(
            mag[ok] + shift,
            err[ok],
            s=7,
            alpha=0.6,
            color=colour,
            lw=0,
            label=name if len(catalogs) <= 12 else None,
        )
        n_plotted += int(ok.sum())
    for snr, label in _SNR_LINES:
        e = 2.5 / math.log(10) / snr
        ax.axhline(e, color="0.4", lw=0.8, ls="--")
        ax.text(
            1.0,
            e,
            f" {label}",
            transform=ax.get_yaxis_transform(),
            va="center",
            fontsize=8,
            color="0.3",
        )
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel(
        "calibrated magnitude"
        if calibrated
        else "instrumental magnitude (per second, before zero point)"
    )
    ax.set_ylabel("magnitude error")
    ax.set_title(f"Photometric errors ({n_plotted} measurements)", fontsize=11)
    if n_plotted and 1 < len(catalogs) <= 12:
        ax.legend(fontsize=8, markerscale=2, ncols=2 if len(catalogs) > 6 else 1)
    if not n_plotted:
        ax.text(0.5, 0.5, "no finite magnitudes", transform=ax.transAxes, ha="center")
    ax.grid(alpha=0.3, which="both")
    return _png(fig)


def _plain_log_ticks(axis) -> None:
    """Log-axis tick labels as plain decimals (``0.02``, ``0.1``) on the ticks matplotlib labels."""
    from matplotlib.ticker import LogFormatterSciNotation

    class _Plain(LogFormatterSciNotation):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(_Plain())
    axis.set_minor_formatter(_Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _cmap(name):
    from matplotlib import colormaps

    return colormaps[name]


_ZP_STAR_KEYS = ("stars", "matched", "matches", "residuals", "calibration_stars", "matched_stars")
_REF_COLS = ("mag_ref", "ref_mag", "mag_cat", "catalog_mag", "refmag", "mag_catalog")
_RES_COLS = ("residual_mag", "resid_mag", "residual", "dmag", "delta_mag", "residuals_mag")
_INST_COLS = ("mag_inst", "instr_mag", "inst_mag", "mag_instr")


def zeropoint_stars(zp_record: Mapping[str, Any] | None):
    """
    Matched zero-point stars of one frame as a table (``mag_ref``, ``residual_mag``, ``used``).

    Reads the star list of a ``zeropoint.json`` record under one of the keys ``stars``,
    ``matched``, ``matches``, ``residuals`` (a list of row mappings or a mapping of columns).
    Residuals are taken from a residual column, else computed as ``ref - inst - zp_mag``.

    Returns
    -------
    table : `~astropy.table.Table` or None
        None when the record has no usable star list (the caller says "not available yet").
    """
    from astropy.table import Table

    if not zp_record:
        return None
    raw = next((zp_record[k] for k in _ZP_STAR_KEYS if zp_record.get(k)), None)
    if raw is None:
        return None
    try:
        table = Table(rows=list(raw)) if isinstance(raw, list) else Table(dict(raw))
    except Exception:
        log.warning("zero point record: unreadable star list (%s)", type(raw).__name__)
        return None
    ref = _col(table, *_REF_COLS)
    res = _col(table, *_RES_COLS)
    if res is None:
        inst = _col(table, *_INST_COLS)
        zp = _finite(zp_record.get("zp_mag"))
        if ref is not None and inst is not None and zp is not None:
            res = ref - inst - zp
    if ref is None or res is None:
        return None
    used = np.ones(len(table), bool)
    for name, invert in (("used", False), ("in_fit", False), ("clipped", True), ("rejected", True)):
        if name in table.colnames:
            flag = np.ma.filled(np.ma.asarray(table[name]), fill_value=not invert).astype(bool)
            used = ~flag if invert else flag
            break
    return Table({"mag_ref": ref, "residual_mag": res, "used": used})


def _primary_type(zp_record: Mapping[str, Any] | None) -> str | None:
    """Photometry type of the frame's headline zero point (PSF, else 1.3 FWHM, ...), as in zeropoint.py."""
    types = (zp_record or {}).get("types") or {}
    for t in ("psf", "1p3fwhm", "1p1fwhm", "fixed"):
        if _finite((types.get(t) or {}).get("zp_mag")) is not None:
            return t
    return None


def zeropoint_stars_from_catalog(catalog, zp_record: Mapping[str, Any] | None = None):
    """
    Zero-point stars of one frame from its calibrated catalogue (columns of the zero-point stage).

    Uses ``ref_mag`` (matched reference magnitude), ``mag_cal_<t>`` of the headline photometry type
    ``t`` (PSF when its zero point was measured, else the 1.3 FWHM aperture, ...) and ``zp_star``
    (used in the fit). The residual is ``ref_mag - mag_cal_<t>``.

    Returns
    -------
    table : `~astropy.table.Table` or None
        ``mag_ref``, ``residual_mag``, ``used``; None when the catalogue has no matched star.
    """
    from astropy.table import Table

    if catalog is None or "ref_mag" not in catalog.colnames:
        return None
    t = _primary_type(zp_record)
    order = ([t] if t else []) + [x for x in ("psf", "1p3fwhm", "1p1fwhm", "fixed") if x != t]
    ref = np.asarray(catalog["ref_mag"], float)
    for typ in order:
        cal = _col(catalog, f"mag_cal_{typ}")
        if cal is None:
            continue
        ok = np.isfinite(ref) & np.isfinite(cal)
        if ok.sum() == 0:
            continue
        used = (
            np.ma.filled(np.ma.asarray(catalog["zp_star"]), False).astype(bool)
            if "zp_star" in catalog.colnames
            else np.ones(len(catalog), bool)
        )
        return Table(
            {"mag_ref": ref[ok], "residual_mag": (ref - cal)[ok], "used": used[ok]},
            meta={"phot_type": typ},
        )
    return None


def calibrated_limiting_mag(
    frame: Mapping[str, Any], zp_record: Mapping[str, Any] | None = None
) -> float | None:
    """
    Calibrated 5-sigma limiting magnitude of a frame, or None when it has no zero point.

    ``limiting_mag_inst - k X + ZP`` with the zero point of the 1.3 FWHM aperture (the aperture of
    the instrumental limit) when measured, else the headline one, and the extinction ``k`` and
    airmass ``X`` of ``zeropoint.json`` (as for the catalogue's ``mag_cal_*``).
    """
    lim = _finite(frame.get("limiting_mag_inst"))
    rec = zp_record or {}
    zp = _finite(((rec.get("types") or {}).get("1p3fwhm") or {}).get("zp_mag"))
    if zp is None:
        zp = (
            _finite(frame.get("zp_mag"))
            if _finite(frame.get("zp_mag")) is not None
            else _finite(rec.get("zp_mag"))
        )
    if lim is None or zp is None:
        return None
    k = _finite(rec.get("extinction_k_mag")) or 0.0
    x = (
        _finite(rec.get("airmass"))
        if rec.get("airmass") is not None
        else _finite(frame.get("airmass"))
    )
    if k and x is None:
        return None
    return lim - k * (x or 0.0) + zp


def _unavailable_reason(zp_record: Mapping[str, Any] | None) -> str:
    """Short reason why a frame has no zero point (flags and failing reference services)."""
    rec = zp_record or {}
    parts = [str(f) for f in rec.get("flags") or []]
    for svc in (rec.get("reference") or {}).get("services") or []:
        if svc.get("status") == "failed" and svc.get("reason"):
            parts.append(f"{svc.get('service')}: {svc['reason']}")
    return "; ".join(dict.fromkeys(parts))


@_literal_text
def plot_zeropoint_residuals(
    stars: Mapping[str, Any],
    *,
    zero_points: Mapping[str, Mapping] | None = None,
    width_in: float = 8.0,
    height_in: float = 4.2,
) -> bytes:
    """
    Zero-point fit residuals (reference minus calibrated magnitude) against reference magnitude.

    Parameters
    ----------
    stars : mapping of str to `~astropy.table.Table`
        Frame name -> table from `zeropoint_stars` (``mag_ref``, ``residual_mag``, ``used``).
    zero_points : mapping of str to mapping, optional
        Frame name -> ``{"zp_mag", "zp_err_mag"}`` for the legend.

    Returns
    -------
    png : bytes
    """
    if not stars:
        raise ValueError("plot_zeropoint_residuals: no frame with zero-point stars")
    fig = _figure(width_in, height_in)
    ax = fig.add_subplot()
    cmap = _cmap("plasma")
    all_res = []
    for i, (name, t) in enumerate(stars.items()):
        colour = cmap(0.1 + 0.75 * i / max(1, len(stars) - 1)) if len(stars) > 1 else "#1f77b4"
        ref, res, used = (
            np.asarray(t["mag_ref"], float),
            np.asarray(t["residual_mag"], float),
            np.asarray(t["used"], bool),
        )
        zp = (zero_points or {}).get(name) or {}
        label = name
        if _finite(zp.get("zp_mag")) is not None:
            label += f"  ZP {zp['zp_mag']:.3f}" + (
                f" ± {zp['zp_err_mag']:.3f}" if _finite(zp.get("zp_err_mag")) is not None else ""
            )
        ax.scatter(
            ref[used],
            res[used],
            s=12,
            color=colour,
            alpha=0.75,
            lw=0,
            label=label if len(stars) <= 10 else None,
        )
        if (~used).any():
            ax.scatter(ref[~used], res[~used], s=18, marker="x", color=colour, alpha=0.6, lw=1)
        all_res.append(res[used & np.isfinite(res)])
    ax.axhline(0, color="k", lw=0.8)
    flat = np.concatenate(all_res) if all_res else np.array([])
    if flat.size > 2:
        rms = float(np.sqrt(np.mean(flat**2)))
        ax.axhspan(-rms, rms, color="0.85", zorder=0, label=f"RMS {rms:.3f} mag")
        lim = max(0.1, 4 * rms, float(np.nanpercentile(np.abs(flat), 98)) * 1.15)
        ax.set_ylim(-lim, lim)
    ax.set_xlabel("reference magnitude")
    ax.set_ylabel("residual (mag)")
    ax.set_title("Zero-point fit residuals (x = clipped)", fontsize=11)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


@dataclass(frozen=True)
class FieldMaps:
    """FWHM and background across the field of one frame.

    Attributes
    ----------
    fwhm_px : numpy.ndarray
        ``(n_cells, n_cells)`` FWHM per cell (NaN when the cell has too few stars); row 0 = bottom.
    n_stars : numpy.ndarray
        Stars used per cell.
    background_adu : numpy.ndarray
        Sky background map (downsampled to at most ~256 px a side).
    shape : tuple of int
        ``(ny, nx)`` of the frame.
    flags : tuple of str
        ``"no_psf_stars"`` when no cell could be measured.
    """

    fwhm_px: np.ndarray = field(repr=False)
    n_stars: np.ndarray = field(repr=False)
    background_adu: np.ndarray = field(repr=False)
    shape: tuple[int, int]
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "fwhm_px": [[_finite(v) for v in row] for row in self.fwhm_px],
            "n_stars": self.n_stars.astype(int).tolist(),
            "shape": list(self.shape),
            "background_median_adu": _finite(np.nanmedian(self.background_adu)),
            "flags": list(self.flags),
        }


def measure_field_maps(
    data,
    sources,
    *,
    background=None,
    mask=None,
    n_cells: int = 3,
    saturation_adu: float | None = None,
    fwhm_guess_px: float | None = None,
    box_size_px: int = 64,
) -> FieldMaps:
    """
    Measure the FWHM in ``n_cells x n_cells`` cells and the sky background across a frame.

    Parameters
    ----------
    data : array_like
        Calibrated image (ADU, background not subtracted).
    sources : `~astropy.table.Table`
        Catalogue with ``x_centroid``, ``y_centroid`` (and the detection columns used by
        `rpp_tasks.stages.psf.measure_fwhm`).
    background : array_like, optional
        Sky background map of the same shape; estimated with
        `rpp_tasks.stages.background.estimate_background` when not given.
    mask : array_like of bool, optional
    n_cells : int, optional
    saturation_adu, fwhm_guess_px : float, optional
        Passed to `rpp_tasks.stages.psf.measure_fwhm`.
    box_size_px : int, optional
        Background mesh size when the background is estimated here.

    Returns
    -------
    maps : `FieldMaps`
    """
    from rpp_tasks.stages.psf import measure_fwhm

    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"measure_field_maps needs a 2-D image, got shape {data.shape}")
    if n_cells < 1:
        raise ValueError(f"n_cells must be >= 1, got {n_cells}")
    rms = None
    if background is None:
        from rpp_tasks.stages.background import estimate_background

        bkg = estimate_background(data, mask=mask, box_size_px=box_size_px)
        background, rms = bkg.background, bkg.rms
    background = np.asarray(background, dtype=np.float32)
    if background.shape != data.shape:
        raise ValueError(f"background shape {background.shape} != image shape {data.shape}")
    sub = data - background
    ny, nx = data.shape
    fwhm = np.full((n_cells, n_cells), np.nan)
    n_stars = np.zeros((n_cells, n_cells), int)
    if sources is not None and len(sources):
        x, y = np.asarray(sources["x_centroid"], float), np.asarray(sources["y_centroid"], float)
        ix = np.clip((x / nx * n_cells).astype(int), 0, n_cells - 1)
        iy = np.clip((y / ny * n_cells).astype(int), 0, n_cells - 1)
        for j in range(n_cells):
            for i in range(n_cells):
                sel = (ix == i) & (iy == j)
                if sel.sum() < 3:
                    continue
                try:
                    res = measure_fwhm(
                        sub,
                        sources[sel],
                        rms=rms,
                        mask=mask,
                        saturation_adu=saturation_adu,
                        fwhm_guess_px=fwhm_guess_px,
                        max_stars=25,
                    )
                except Exception as exc:  # one cell must not lose the whole map
                    log.warning("field map: FWHM of cell (%d, %d) failed: %s", i, j, exc)
                    continue
                if math.isfinite(res.fwhm_px):
                    fwhm[j, i] = res.fwhm_px
                    n_stars[j, i] = res.n_stars
    shown, _ = _downsample(background, 256)
    flags = () if np.isfinite(fwhm).any() else ("no_psf_stars",)
    return FieldMaps(
        fwhm_px=fwhm, n_stars=n_stars, background_adu=shown, shape=(ny, nx), flags=flags
    )


@_literal_text
def plot_field_maps(
    maps: FieldMaps,
    *,
    pixel_scale_arcsec: float | None = None,
    width_in: float = 9.0,
    height_in: float = 4.8,
) -> bytes:
    """
    Two panels: FWHM per cell (value and star count written in each cell) and the sky background.

    Returns
    -------
    png : bytes
    """
    ny, nx = maps.shape
    fig = _figure(width_in, height_in)
    ax1, ax2 = fig.subplots(1, 2)
    extent = (-0.5, nx - 0.5, -0.5, ny - 0.5)
    f = maps.fwhm_px
    if np.isfinite(f).any():
        med = float(np.nanmedian(f))
        spread = max(0.05 * med, float(np.nanmax(np.abs(f - med))))
        im = ax1.imshow(
            f, origin="lower", extent=extent, cmap="RdYlGn_r", vmin=med - spread, vmax=med + spread
        )
        fig.colorbar(im, ax=ax1, location="bottom", shrink=0.8, aspect=30, label="FWHM (px)")
        n = f.shape[0]
        for j in range(n):
            for i in range(f.shape[1]):
                xc, yc = (i + 0.5) * nx / f.shape[1] - 0.5, (j + 0.5) * ny / n - 0.5
                if math.isfinite(f[j, i]):
                    txt = f"{f[j, i]:.2f} px"
                    if pixel_scale_arcsec:
                        txt += f"\n{f[j, i] * pixel_scale_arcsec:.2f}\u2033"
                    txt += f"\n({maps.n_stars[j, i]} stars)"
                else:
                    txt = "too few\nstars"
                ax1.text(xc, yc, txt, ha="center", va="center", fontsize=8)
        ax1.set_title(f"FWHM across the field (median {med:.2f} px)", fontsize=10)
    else:
        ax1.text(
            0.5,
            0.5,
            "FWHM not measurable\n(too few isolated stars)",
            ha="center",
            va="center",
            transform=ax1.transAxes,
        )
        ax1.set_title("FWHM across the field", fontsize=10)
        ax1.set_xlim(extent[:2])
        ax1.set_ylim(extent[2:])
    b = maps.background_adu
    if np.isfinite(b).any():
        lo, hi = np.nanpercentile(b, [1, 99])
        im2 = ax2.imshow(
            b, origin="lower", extent=extent, cmap="magma", vmin=lo, vmax=max(hi, lo + 1e-3)
        )
        fig.colorbar(im2, ax=ax2, location="bottom", shrink=0.8, aspect=30, label="sky (ADU)")
        ax2.set_title(f"Sky background ({lo:.0f}\u2013{hi:.0f} ADU, 1\u201399%)", fontsize=10)
    else:
        ax2.text(
            0.5, 0.5, "background not available", ha="center", va="center", transform=ax2.transAxes
        )
    for ax in (ax1, ax2):
        ax.set_xlabel("x (px)")
        ax.set_ylabel("y (px)")
        ax.set_aspect("equal")
    return _png(fig)


def _parse_time(value) -> _dt.datetime | None:
    if not value:
        return None
    try:
        t = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.UTC)


@_literal_text
def plot_night_trends(
    frames: Sequence[Mapping[str, Any]], *, width_in: float = 9.0, height_in: float = 5.2
) -> bytes:
    """
    FWHM, background, number of sources and limiting magnitude of the reduced frames against time.

    Parameters
    ----------
    frames : sequence of mapping
        Frame summaries (``date_obs``, ``fwhm_px``/``fwhm_arcsec``, ``background_adu``, ``n_sources``,
        ``limiting_mag_inst``, optional ``limiting_mag_cal``). Frames without ``date_obs`` are placed
        by order.

    Returns
    -------
    png : bytes
    """
    ok = [f for f in frames if f.get("status") == "ok"]
    if not ok:
        raise ValueError("plot_night_trends: no reduced frame")
    times = [_parse_time(f.get("date_obs")) for f in ok]
    use_time = all(t is not None for t in times)
    xs = times if use_time else list(range(1, len(ok) + 1))
    arcsec = all(_finite(f.get("fwhm_arcsec")) is not None for f in ok)
    calibrated = all(_finite(f.get("limiting_mag_cal")) is not None for f in ok)

    def series(fn):
        return np.array(
            [_finite(fn(f)) if _finite(fn(f)) is not None else np.nan for f in ok], float
        )

    panels = [
        (
            "FWHM (\u2033)" if arcsec else "FWHM (px)",
            series(lambda f: f.get("fwhm_arcsec") if arcsec else f.get("fwhm_px")),
            "#1f77b4",
            False,
        ),
        ("sky (ADU)", series(lambda f: f.get("background_adu")), "#9467bd", False),
        ("sources", series(lambda f: f.get("n_sources")), "#2ca02c", False),
        (
            "limiting mag" if calibrated else "lim. mag (inst.)",
            series(
                lambda f: f.get("limiting_mag_cal") if calibrated else f.get("limiting_mag_inst")
            ),
            "#d62728",
            False,
        ),
    ]
    fig = _figure(width_in, height_in)
    axes = fig.subplots(2, 2, sharex=True)
    for ax, (label, values, colour, _) in zip(axes.ravel(), panels):
        ax.plot(xs, values, "o-", color=colour, ms=4, lw=1)
        ax.set_ylabel(label)
        if label == "sources":
            from matplotlib.ticker import MaxNLocator

            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if use_time:
        from matplotlib.dates import AutoDateLocator, DateFormatter

        span_s = (max(times) - min(times)).total_seconds()
        for ax in axes[1]:
            ax.xaxis.set_major_locator(AutoDateLocator(minticks=3, maxticks=6))
            ax.xaxis.set_major_formatter(DateFormatter("%H:%M:%S" if span_s < 1200 else "%H:%M"))
            ax.set_xlabel(f"UTC, {min(times):%Y-%m-%d}")
    else:
        for ax in axes[1]:
            ax.set_xlabel("frame number")
    fig.suptitle(f"Night trends ({len(ok)} reduced frames)", fontsize=11)
    return _png(fig)


# =============================================================================== header facts
def header_facts(headers: Mapping[str, Any]) -> dict:
    """
    The facts observers look for, gathered from the frames' FITS headers.

    Parameters
    ----------
    headers : mapping of str to header-like mapping
        Frame name -> FITS header (or any mapping of keyword -> value).

    Returns
    -------
    facts : dict
        ``{"facts": {label: [distinct values]}, "weather": {keyword: {"label", "min", "median",
        "max", "n_frames", "comment"}}}``. Keywords absent from every header are left out.
    """
    facts: dict[str, list] = {}
    weather: dict[str, dict] = {}
    values: dict[str, list[float]] = {}
    comments: dict[str, str] = {}
    for hdr in headers.values():
        if hdr is None:
            continue
        for label, keys in FACT_KEYWORDS.items():
            for k in keys:
                v = hdr.get(k) if hasattr(hdr, "get") else None
                if v not in (None, ""):
                    v = str(v).strip()
                    if v and v not in facts.setdefault(label, []):
                        facts[label].append(v)
                    break
        for k in WEATHER_KEYWORDS:
            v = hdr.get(k) if hasattr(hdr, "get") else None
            fv = _finite(v) if not isinstance(v, bool) else None
            if fv is None:
                continue
            values.setdefault(k, []).append(fv)
            if k not in comments and hasattr(hdr, "comments"):
                try:
                    comments[k] = str(hdr.comments[k])
                except (KeyError, IndexError):
                    pass
    for k, vals in values.items():
        a = np.asarray(vals)
        weather[k] = {
            "label": WEATHER_KEYWORDS[k],
            "min": float(a.min()),
            "median": float(np.median(a)),
            "max": float(a.max()),
            "n_frames": int(a.size),
            "comment": comments.get(k, ""),
        }
    return {"facts": {k: v for k, v in facts.items() if v}, "weather": weather}


# =============================================================================== HTML
_CSS = """
:root { --ok:#1a7f37; --bad:#c62828; --warn:#b26a00; --ink:#1d2430; --muted:#5b6575; --line:#e3e7ee;
        --card:#f6f8fb; --accent:#283593; }
* { box-sizing: border-box; }
body { margin:0; font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Helvetica, Arial, sans-serif;
       color:var(--ink); background:#fff; line-height:1.45; font-size:15px; }
header { background: linear-gradient(120deg, #0b1033 0%, #1b2a6b 55%, #3949ab 100%); color:#fff;
         padding:28px 36px 22px; }
header h1 { margin:0 0 4px; font-size:26px; font-weight:600; letter-spacing:.2px; }
header .sub { opacity:.85; font-size:14px; }
main { max-width:1180px; margin:0 auto; padding:8px 28px 40px; }
h2 { font-size:19px; margin:30px 0 10px; padding-bottom:6px; border-bottom:2px solid var(--line);
     color:var(--accent); }
.cards { display:grid; grid-template-columns:repeat(auto-fit, minmax(165px, 1fr)); gap:12px; margin:20px 0 6px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 14px; }
.card .v { font-size:24px; font-weight:650; }
.card .l { color:var(--muted); font-size:12.5px; text-transform:uppercase; letter-spacing:.4px; }
.card .s { color:var(--muted); font-size:12.5px; }
.pill { display:inline-block; padding:1px 9px; border-radius:10px; font-size:12.5px; font-weight:600; }
.pill.ok { background:#e6f4ea; color:var(--ok); } .pill.bad { background:#fdecea; color:var(--bad); }
.pill.na { background:#eef0f4; color:var(--muted); }
table { border-collapse:collapse; width:100%; font-size:13.5px; }
th, td { padding:6px 9px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { background:var(--card); font-weight:600; color:#2b3445; position:sticky; top:0; }
td.n, th.n { text-align:right; font-variant-numeric: tabular-nums; }
td.n { white-space:nowrap; }
tr.rejected td { background:#fff5f5; }
.facts { display:grid; grid-template-columns: 1fr 1fr; gap:18px; }
.facts table td:first-child { color:var(--muted); width:38%; }
figure { margin:14px 0; text-align:center; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:6px; }
figcaption { color:var(--muted); font-size:13px; margin-top:4px; }
.na { color:var(--muted); font-style:italic; background:var(--card); border:1px dashed #c9d0db;
      border-radius:8px; padding:10px 14px; }
.reason { color:var(--bad); font-size:12.5px; }
footer { color:var(--muted); font-size:12px; border-top:1px solid var(--line); margin-top:36px; padding-top:10px; }
code { background:var(--card); padding:1px 4px; border-radius:4px; font-size:12.5px; }
@media (max-width: 760px) { .facts { grid-template-columns: 1fr; } main { padding:8px 12px; } }
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_html(png: bytes | None, alt: str, caption: str, *, missing: str) -> str:
    if not png:
        return f'<p class="na">{_esc(missing)}</p>'
    return (
        f'<figure><img src="{_data_uri(png)}" alt="{_esc(alt)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _range_text(values: Sequence, fmt: str = "{:g}") -> str:
    vals = sorted({v for v in (_finite(x) for x in values) if v is not None})
    if not vals:
        return "—"
    return (
        fmt.format(vals[0]) if len(vals) == 1 else f"{fmt.format(vals[0])}–{fmt.format(vals[-1])}"
    )


def _weather_range(w: Mapping[str, Any]) -> str:
    """Range of a weather keyword: ``"-12 to -8"``, or the single value when it did not change."""
    lo, hi = _fmt(w.get("min"), "{:.4g}"), _fmt(w.get("max"), "{:.4g}")
    return lo if lo == hi else f"{lo} to {hi}"


def _utc(value) -> str:
    t = _parse_time(value)
    return t.strftime("%Y-%m-%d %H:%M:%S") if t else (str(value) if value else "—")


def render_report_html(
    summary: Mapping[str, Any],
    *,
    plots: Mapping[str, bytes | None] | None = None,
    facts: Mapping[str, Any] | None = None,
    site: Mapping[str, Any] | None = None,
    title: str | None = None,
    candidates: Mapping[str, Any] | None = None,
    preview_frame: str | None = None,
    products_zip: str | None = None,
    generated_utc: str | None = None,
    cutouts: Mapping[tuple[str, str], bytes] | None = None,
    zeropoint_reason: str = "",
    candidates_reason: str = "",
) -> str:
    """
    Render the self-contained HTML report of a session.

    Parameters
    ----------
    summary : mapping
        ``session_summary.json`` (frames with status, reason, FWHM, background, limiting magnitude,
        and, when the zero-point stage ran, ``zp_mag``, ``zp_err_mag``, ``n_zp_stars`` and the
        calibrated limit ``limiting_mag_cal`` added by `build_report`).
    plots : mapping of str to bytes, optional
        PNG bytes by section: ``preview``, ``trends``, ``mag_error``, ``zeropoint``, ``field``.
        A missing or None entry renders "not available yet" with the reason.
    facts : mapping, optional
        Output of `header_facts`.
    site : mapping, optional
        ``name``, ``latitude_deg``, ``longitude_deg``, ``elevation_m``, ``telescope``, ``camera``
        from the observatory configuration.
    title : str, optional
        Observatory title for the page header.
    candidates : mapping of str to `~astropy.table.Table`, optional
        Frame name -> transient candidates; None means no usable transient search (not run, or no
        reference catalogue: ``candidates_reason``).
    cutouts : mapping of (frame, id) to bytes, optional
        PNG cutouts of the candidates, shown in the table.
    zeropoint_reason, candidates_reason : str, optional
        Why zero points / candidates are missing, appended to "not available yet".
    preview_frame : str, optional
        Name of the frame shown in the preview.
    products_zip : str, optional
        Relative link to the products ZIP.
    generated_utc : str, optional
        Generation time (default: now).

    Returns
    -------
    html : str
    """
    plots = dict(plots or {})
    facts = dict(facts or {})
    site = dict(site or {})
    frames = list(summary.get("frames") or [])
    ok = [f for f in frames if f.get("status") == "ok"]
    n_sci, n_ok = (
        int(summary.get("n_science", len(frames)) or 0),
        int(summary.get("n_ok", len(ok)) or 0),
    )
    session_id = summary.get("session_id", "?")
    obs_name = summary.get("observatory", "")
    generated_utc = generated_utc or _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    has_zp = any(_finite(f.get("zp_mag")) is not None for f in ok)
    has_cand = candidates is not None
    n_cand = sum(len(t) for t in (candidates or {}).values() if t is not None)

    fwhm_as = _finite(summary.get("median_fwhm_arcsec"))
    fwhm_px = _finite(summary.get("median_fwhm_px"))
    bkgs = [_finite(f.get("background_adu")) for f in ok]
    bkgs = [b for b in bkgs if b is not None]
    lims_inst = [(_finite(f.get("limiting_mag_inst")), None) for f in ok]
    lims_cal = [v for v in (_finite(f.get("limiting_mag_cal")) for f in ok) if v is not None]
    n_src = sum(int(f.get("n_sources") or 0) for f in ok)
    objects = sorted({str(f.get("object")) for f in frames if f.get("object")})
    bands = sorted({str(f.get("band")) for f in frames if f.get("band")})
    times = sorted(t for t in (_parse_time(f.get("date_obs")) for f in frames) if t)

    def card(value, label, sub=""):
        return (
            f'<div class="card"><div class="l">{_esc(label)}</div><div class="v">{value}</div>'
            f'<div class="s">{sub}</div></div>'
        )

    status_pill = (
        f'<span class="pill ok">{n_ok}/{n_sci} reduced</span>'
        if n_ok == n_sci and n_sci
        else f'<span class="pill bad">{n_ok}/{n_sci} reduced</span>'
    )
    cards = [
        card(
            f"{n_ok}<span style='font-size:15px;color:#5b6575'> / {n_sci}</span>",
            "frames reduced",
            status_pill + (f" &nbsp;{n_sci - n_ok} rejected" if n_sci - n_ok else ""),
        ),
        card(
            f"{fwhm_as:.2f}\u2033"
            if fwhm_as is not None
            else (f"{fwhm_px:.2f} px" if fwhm_px else "—"),
            "median FWHM",
            f"{fwhm_px:.2f} px" if fwhm_px is not None and fwhm_as is not None else "",
        ),
        card(
            f"{np.median(bkgs):.0f}" if bkgs else "—",
            "median sky (ADU)",
            f"range {min(bkgs):.0f}–{max(bkgs):.0f}" if len(bkgs) > 1 else "",
        ),
        card(
            f"{max(lims_cal):.2f}"
            if lims_cal
            else (
                f"{max(v for v, _ in lims_inst if v is not None):.2f}"
                if any(v is not None for v, _ in lims_inst)
                else "—"
            ),
            "deepest limiting mag",
            "5σ, calibrated" if lims_cal else "5σ, instrumental (zero point " + NOT_AVAILABLE + ")",
        ),
        card(f"{n_src:,}", "sources measured", "all reduced frames"),
        card(
            str(n_cand) if has_cand else "—",
            "transient candidates",
            "" if has_cand else NOT_AVAILABLE,
        ),
    ]

    # --- header facts
    fact_rows = []
    f_facts = dict(facts.get("facts") or {})
    fact_rows.append(("object", ", ".join(objects) or ", ".join(f_facts.get("object", [])) or "—"))
    fact_rows.append(("bands", ", ".join(bands) or ", ".join(f_facts.get("filter", [])) or "—"))
    fact_rows.append(
        (
            "exposure",
            (_range_text([f.get("exptime_s") for f in frames]) + " s")
            if any(_finite(f.get("exptime_s")) for f in frames)
            else "—",
        )
    )
    total_exp = sum(_finite(f.get("exptime_s")) or 0 for f in ok)
    fact_rows.append(
        ("total exposure (reduced)", f"{total_exp / 60:.1f} min" if total_exp else "—")
    )
    fact_rows.append(
        (
            "first / last frame (UTC)",
            f"{times[0]:%Y-%m-%d %H:%M} – {times[-1]:%H:%M}" if times else "—",
        )
    )
    for label in ("telescope", "instrument", "observer"):
        vals = f_facts.get(label) or ([site[label]] if site.get(label) else [])
        if label == "instrument" and not vals and site.get("camera"):
            vals = [site["camera"]]
        fact_rows.append((label, ", ".join(vals) or "—"))
    site_txt = site.get("name") or ", ".join(f_facts.get("site", [])) or ""
    if (
        _finite(site.get("latitude_deg")) is not None
        and _finite(site.get("longitude_deg")) is not None
    ):
        site_txt += (
            f" ({site['latitude_deg']:.4f}°, {site['longitude_deg']:.4f}°"
            + (
                f", {site['elevation_m']:.0f} m"
                if _finite(site.get("elevation_m")) is not None
                else ""
            )
            + ")"
        )
    fact_rows.append(("site", site_txt.strip() or "—"))
    cal = summary.get("n_calibration") or {}
    if cal:
        fact_rows.append(("calibration frames", ", ".join(f"{v} {k}" for k, v in cal.items())))
    facts_html = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in fact_rows)
    weather = facts.get("weather") or {}
    if weather:
        wrows = "".join(
            f"<tr><td>{_esc(w['label'])} <code>{_esc(k)}</code></td>"
            f"<td class='n'>{_esc(_fmt(w['median'], '{:.4g}'))}</td>"
            f"<td class='n'>{_esc(_weather_range(w))}</td>"
            f"<td>{_esc(w.get('comment', ''))}</td></tr>"
            for k, w in weather.items()
        )
        weather_html = (
            "<table><tr><th>condition</th><th class='n'>median</th><th class='n'>range</th>"
            f"<th>header comment</th></tr>{wrows}</table>"
        )
    else:
        weather_html = "<p class='na'>No weather keywords in the headers (e.g. AMBTEMP, HUMIDITY, SKYQUAL).</p>"

    # --- per-frame table
    rows = []
    for f in frames:
        st = f.get("status", "?")
        good = st == "ok"
        zp = _finite(f.get("zp_mag"))
        lim_i = _finite(f.get("limiting_mag_inst"))
        lim_c = _finite(f.get("limiting_mag_cal"))
        lim = (
            f"{lim_c:.2f}"
            if lim_c is not None
            else (
                f"{lim_i:.2f} <span style='color:#5b6575'>inst</span>" if lim_i is not None else "—"
            )
        )
        zp_txt = (
            (
                f"{zp:.3f}"
                + (f" ± {f['zp_err_mag']:.3f}" if _finite(f.get("zp_err_mag")) is not None else "")
                + (
                    f" <span style='color:#5b6575'>({int(f['n_zp_stars'])}★)</span>"
                    if _finite(f.get("n_zp_stars")) is not None
                    else ""
                )
            )
            if zp is not None
            else "—"
        )
        cand = (
            str(len(candidates[f["frame"]]))
            if has_cand and candidates.get(f.get("frame")) is not None
            else "—"
        )
        pill = (
            '<span class="pill ok">ok</span>'
            if good
            else f'<span class="pill bad">{_esc(st)}</span>'
        )
        reason = (
            ""
            if good
            else (
                f"<div class='reason'>{_esc(f.get('failed_stage') or '')}: "
                f"{_esc(f.get('reason') or 'no reason recorded')}</div>"
            )
        )
        fwhm = "—"
        if _finite(f.get("fwhm_px")) is not None:
            fwhm = (
                f"{f['fwhm_arcsec']:.2f}\u2033 / "
                if _finite(f.get("fwhm_arcsec")) is not None
                else ""
            ) + f"{f['fwhm_px']:.2f} px"
        t = _parse_time(f.get("date_obs"))
        rows.append(
            f"<tr class='{'' if good else 'rejected'}'><td><b>{_esc(f.get('frame'))}</b>{reason}</td><td>{pill}</td>"
            f"<td>{_esc(t.strftime('%H:%M:%S') if t else '—')}</td><td>{_esc(f.get('object') or '—')}</td>"
            f"<td>{_esc(f.get('band') or '—')}</td><td class='n'>{_esc(_fmt(f.get('exptime_s'), '{:g}'))}</td>"
            f"<td class='n'>{_esc(f.get('n_sources') if f.get('n_sources') is not None else '—')}</td>"
            f"<td class='n'>{fwhm}</td><td class='n'>{_esc(_fmt(f.get('background_adu'), '{:.0f}'))}</td>"
            f"<td class='n'>{zp_txt}</td><td class='n'>{lim}</td><td class='n'>{_esc(cand)}</td></tr>"
        )
    table_html = (
        "<table><tr><th>frame</th><th>status</th><th>UTC</th><th>object</th><th>band</th>"
        "<th class='n'>exp (s)</th><th class='n'>sources</th><th class='n'>FWHM</th>"
        "<th class='n'>sky (ADU)</th><th class='n'>zero point</th><th class='n'>lim. mag (5σ)</th>"
        f"<th class='n'>cand.</th></tr>{''.join(rows)}</table>"
    )
    if not has_zp:
        table_html += (
            "<p style='color:#5b6575;font-size:13px'>Zero points: "
            + NOT_AVAILABLE
            + " for this session"
            + (f" ({_esc(zeropoint_reason)})" if zeropoint_reason else "")
            + ", so limiting magnitudes are instrumental (per second, before zero point).</p>"
        )
    rejected_files = summary.get("rejected_files") or {}
    if rejected_files:
        items = "".join(
            f"<li><code>{_esc(k)}</code>: {_esc((v or {}).get('reason'))}</li>"
            for k, v in rejected_files.items()
        )
        table_html += f"<p><b>Files set aside while grouping the session:</b></p><ul>{items}</ul>"

    # --- candidates
    if not has_cand:
        why = (
            f"the transient search had no reference catalogue ({_esc(candidates_reason)}), so no source "
            "could be called new"
            if candidates_reason
            else "the transient search has not run on this session"
        )
        cand_html = f"<p class='na'>Transient candidates: {NOT_AVAILABLE} ({why}).</p>"
    elif n_cand == 0:
        cand_html = "<p>No transient candidate in this session.</p>"
    else:
        crow = []
        for frame, t in candidates.items():
            if t is None:
                continue
            for r in t[:50]:
                cols = t.colnames
                get = lambda *names, r=r, cols=cols: next((r[n] for n in names if n in cols), None)
                cid = str(get("id", "name", "candidate_id"))
                png = (cutouts or {}).get((frame, cid))
                img = (
                    f"<img src=\"{_data_uri(png)}\" alt='cutout' style='height:72px;image-rendering:pixelated'>"
                    if png
                    else ""
                )
                crow.append(
                    f"<tr><td>{img}</td><td>{_esc(frame)}</td><td>{_esc(cid)}</td>"
                    f"<td class='n'>{_esc(_fmt(get('ra', 'ra_deg'), '{:.5f}'))}</td>"
                    f"<td class='n'>{_esc(_fmt(get('dec', 'dec_deg'), '{:.5f}'))}</td>"
                    f"<td class='n'>{_esc(_fmt(get('x_centroid', 'x'), '{:.1f}'))}, "
                    f"{_esc(_fmt(get('y_centroid', 'y'), '{:.1f}'))}</td>"
                    f"<td class='n'>{_esc(_fmt(get('mag_cal_psf', 'mag_cal_1p3fwhm', 'mag', 'mag_psf', 'mag_1p3fwhm'), '{:.2f}'))}</td>"
                    f"<td class='n'>{_esc(_fmt(get('snr', 'snr_psf'), '{:.1f}'))}</td>"
                    f"<td>{_esc(get('reason', 'kind', 'classification', 'type', 'simbad_main_id') or '')}</td></tr>"
                )
        cand_html = (
            "<table><tr><th>cutout</th><th>frame</th><th>id</th><th class='n'>RA (°)</th><th class='n'>Dec (°)</th>"
            "<th class='n'>x, y (px)</th><th class='n'>mag</th><th class='n'>S/N</th><th>note</th></tr>"
            f"{''.join(crow)}</table>"
        )

    preview_caption = (
        (
            f"Frame <b>{_esc(preview_frame)}</b> (best FWHM of the night), zscale. Circles: detections "
            "coloured by S/N class (green &gt; 10, amber 5–10, red &le; 5)"
            + (
                "; magenta squares: transient candidates."
                if has_cand
                else "; transient candidates: " + NOT_AVAILABLE + "."
            )
        )
        if preview_frame
        else ""
    )
    zp_missing = (
        "Zero-point residuals: "
        + NOT_AVAILABLE
        + " ("
        + (
            f"no zero point for this session: {zeropoint_reason}"
            if zeropoint_reason
            else "no zero-point stars recorded for this session"
        )
        + ")."
    )
    zip_html = (
        f"<p>All products of the session (calibrated frames, catalogues, summaries, this report): "
        f"<a href='{_esc(products_zip)}'>{_esc(Path(products_zip).name)}</a></p>"
        if products_zip
        else ""
    )

    sub = " · ".join(
        x
        for x in [
            f"{n_ok} of {n_sci} science frames reduced",
            f"median FWHM {fwhm_as:.2f}\u2033" if fwhm_as is not None else "",
            ", ".join(objects[:4]) + ("…" if len(objects) > 4 else ""),
            ", ".join(bands),
        ]
        if x
    )
    page_title = f"{title or obs_name} — night {session_id}"
    body = f"""
<header><h1>{_esc(page_title)}</h1><div class="sub">{_esc(sub)}</div></header>
<main>
<div class="cards">{"".join(cards)}</div>

<h2>The night</h2>
<div class="facts"><div><table>{facts_html}</table></div><div>{weather_html}</div></div>
{_figure_html(plots.get("trends"), "night trends", "Seeing, sky, number of sources and limiting magnitude through the night (limiting magnitude: up = deeper).", missing="Night trends: no reduced frame.")}

<h2>Frame preview</h2>
{_figure_html(plots.get("preview"), "frame preview", preview_caption, missing="Frame preview: no reduced frame to show.")}

<h2>Photometry</h2>
{_figure_html(plots.get("mag_error"), "magnitude vs error", "Magnitude against its error for every measured source (PSF photometry where the fit succeeded, else the 1.3 FWHM aperture). Dashed: S/N 10 and 5.", missing="Photometry: no catalogue with magnitudes.")}

<h2>Zero point</h2>
{_figure_html(plots.get("zeropoint"), "zero-point residuals", "Reference minus calibrated magnitude of the zero-point stars; grey band: RMS.", missing=zp_missing)}

<h2>Across the field</h2>
{_figure_html(plots.get("psf_map"), "PSF model across the field", f"PSF model of frame {_esc(preview_frame or '')}: FWHM (colour) and ellipticity (whisker length, along the major axis) across the field, the stars it was fitted on, and what is left when the model is subtracted from an isolated star near the centre, the edges and the corners (a good model leaves noise).", missing="PSF model across the field: no PSF model for this frame.")}
{_figure_html(plots.get("field"), "FWHM and background across the field", f"FWHM in a 3×3 grid (stacked fit of the stars in each cell) and the sky background of frame {_esc(preview_frame or '')}. Corner-to-centre FWHM differences show tilt, field curvature or coma.", missing="FWHM and background across the field: no reduced frame.")}

<h2>Transient candidates</h2>
{cand_html}

<h2>Frames</h2>
{table_html}

<h2>Products</h2>
{zip_html}
<p>Work folder: <code>{_esc(summary.get("workdir", ""))}</code></p>

<footer>Generated {_esc(generated_utc)} by rpp_tasks {_esc(summary.get("rpp_version") or __version__)}
· configuration hash {_esc(summary.get("config_hash") or "—")} · observatory {_esc(obs_name)}
· this page is self-contained (plots embedded) and can be read offline.</footer>
</main>"""
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_esc(page_title)}</title><style>{_CSS}</style></head><body>{body}\n</body></html>\n"
    )


# =============================================================================== building
@dataclass(frozen=True)
class ReportResult:
    """Outcome of `build_report`.

    Attributes
    ----------
    html_path : str
        The self-contained report.
    plot_paths : dict of str to str
        PNG file of each plot that could be drawn (``preview``, ``trends``, ``mag_error``,
        ``zeropoint``, ``field``).
    frames : dict
        Frame name -> ``zp_mag``, ``zp_err_mag``, ``n_zp_stars``, ``limiting_mag_cal`` (calibrated
        5-sigma limit or None) and ``n_candidates`` (None when the transient search had no reference).
    n_frames, n_ok : int
    preview_frame : str or None
        Frame shown in the preview (best FWHM).
    available : dict of str to bool
        Which data-dependent sections had data (``zeropoint``, ``candidates``, ...).
    flags : tuple of str
        ``"no_reduced_frame"``; ``"<plot>_failed"`` when a plot raised (the page says so).
    """

    html_path: str
    plot_paths: dict[str, str]
    n_frames: int
    n_ok: int
    preview_frame: str | None
    available: dict[str, bool]
    size_bytes: int
    flags: tuple[str, ...] = ()
    frames: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "html_path": self.html_path,
            "plot_paths": dict(self.plot_paths),
            "n_frames": self.n_frames,
            "n_ok": self.n_ok,
            "preview_frame": self.preview_frame,
            "available": dict(self.available),
            "size_bytes": self.size_bytes,
            "flags": list(self.flags),
            "frames": {k: dict(v) for k, v in self.frames.items()},
        }


def _frame_dir(workdir: Path, frame: Mapping) -> Path:
    if frame.get("catalog"):
        p = Path(frame["catalog"]).parent
        if p.is_dir():
            return p
    return workdir / "frames" / str(frame.get("frame"))


def _read_table(path: Path):
    from astropy.table import Table

    if not path.is_file():
        return None
    try:
        return Table.read(path, format="ascii.ecsv") if path.suffix == ".ecsv" else Table.read(path)
    except Exception as exc:
        log.warning("report: cannot read %s: %s", path, exc)
        return None


def _read_image(path: Path):
    from astropy.io import fits

    with fits.open(path, mode="readonly", memmap=False) as hdul:
        data = np.asarray(hdul[0].data, dtype=np.float32)
        header = hdul[0].header.copy()
        mask = hdul["MASK"].data.astype(bool) if "MASK" in hdul else None
    return data, header, mask


def _read_header(path: Path):
    from astropy.io import fits

    try:
        return fits.getheader(path, 0)
    except Exception as exc:
        log.warning("report: cannot read the header of %s: %s", path, exc)
        return None


def build_report(
    session_summary: Mapping[str, Any],
    *,
    workdir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    title: str | None = None,
    site: Mapping[str, Any] | None = None,
    products_zip: str | os.PathLike | None = None,
    saturation_adu: float | None = None,
    max_catalogs: int = 40,
) -> ReportResult:
    """
    Build the self-contained HTML report of a session and write its plots as PNG files.

    Parameters
    ----------
    session_summary : mapping
        Content of ``session_summary.json``.
    workdir : path, optional
        Session work folder (default: ``session_summary["workdir"]``); frame products are read
        from ``frames/<stem>/`` (``calibrated.fits``, ``catalog.ecsv``, ``background.fits``,
        ``zeropoint.json``, ``candidates.ecsv``).
    out_dir : path, optional
        Where ``report.html`` and the PNGs go (default ``<workdir>/report``).
    title : str, optional
        Observatory title for the page header.
    site : mapping, optional
        Site and instrument facts from the configuration (see `render_report_html`).
    products_zip : path, optional
        The products ZIP, linked relative to the report.
    saturation_adu : float, optional
        Passed to the field FWHM measurement.
    max_catalogs : int, optional
        At most this many catalogues in the magnitude-error plot (evenly spread over the night).

    Returns
    -------
    result : `ReportResult`
    """
    if not isinstance(session_summary, Mapping) or "frames" not in session_summary:
        raise ValueError("build_report needs a session summary mapping with a 'frames' list")
    workdir = Path(workdir or session_summary.get("workdir") or ".")
    out_dir = Path(out_dir) if out_dir else workdir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = list(session_summary["frames"])
    ok = [f for f in frames if f.get("status") == "ok"]
    sid = session_summary.get("session_id", workdir.name)
    flags: list[str] = []
    plots: dict[str, bytes | None] = {}

    def attempt(name, fn):
        try:
            plots[name] = fn()
        except Exception as exc:
            log.warning("[%s] report: %s plot failed: %s", sid, name, exc, exc_info=True)
            flags.append(f"{name}_failed")
            plots[name] = None

    # per-frame side products (zero points, candidates, headers)
    zp_stars, zp_values, candidates, headers, cutouts = {}, {}, {}, {}, {}
    zp_reasons, cand_reasons, extra = [], [], {}
    catalog_cache = {}
    for f in frames:
        d = _frame_dir(workdir, f)
        name = str(f.get("frame"))
        zp = read_json(d / "zeropoint.json")
        zp_mag = (
            _finite(f.get("zp_mag"))
            if _finite(f.get("zp_mag")) is not None
            else _finite((zp or {}).get("zp_mag"))
        )
        row = {
            "zp_mag": zp_mag,
            "zp_err_mag": _finite(f.get("zp_err_mag", (zp or {}).get("zp_err_mag"))),
            "n_zp_stars": f.get("n_zp_stars", (zp or {}).get("n_zp_stars")),
            "limiting_mag_cal": calibrated_limiting_mag(f, zp) if f.get("status") == "ok" else None,
            "n_candidates": None,
        }
        if zp_mag is not None:
            zp_values[name] = {"zp_mag": zp_mag, "zp_err_mag": row["zp_err_mag"]}
            stars = zeropoint_stars(zp) if zp else None
            if stars is None and f.get("status") == "ok":
                catalog_cache[name] = _read_table(d / "catalog.ecsv")
                stars = zeropoint_stars_from_catalog(catalog_cache[name], zp)
            if stars is not None and len(stars):
                zp_stars[name] = stars
        elif zp is not None and f.get("status") == "ok":
            zp_reasons.append(_unavailable_reason(zp))
        cpath = d / "candidates.ecsv"
        if cpath.is_file():
            table = _read_table(cpath)
            flags = (
                list((table.meta or {}).get("flags") or []) if table is not None else ["unreadable"]
            )
            if table is not None and "no_reference" not in flags:
                candidates[name] = table
                row["n_candidates"] = len(table)
                if "cutout" in table.colnames:
                    for r in table:
                        png = d / "cutouts" / str(r["cutout"])
                        if str(r["cutout"]) and png.is_file() and png.stat().st_size < 200_000:
                            cutouts[
                                (name, str(r["id"]) if "id" in table.colnames else str(r["cutout"]))
                            ] = png.read_bytes()
            else:
                cand_reasons.append(", ".join(flags) or "unknown")
        img = d / "calibrated.fits"
        if img.is_file():
            headers[name] = _read_header(img)
        extra[name] = row
    # a copy of the summary enriched with what the frame folders say (zero point, calibrated limit)
    summary = dict(session_summary)
    summary["frames"] = [
        {
            **f,
            **{
                k: v
                for k, v in extra.get(str(f.get("frame")), {}).items()
                if f.get(k) is None and v is not None
            },
        }
        for f in frames
    ]
    ok = [f for f in summary["frames"] if f.get("status") == "ok"]
    zp_missing_reason = "; ".join(dict.fromkeys(r for r in zp_reasons if r))
    cand_missing_reason = "; ".join(dict.fromkeys(r for r in cand_reasons if r))

    preview_frame = None
    if ok:
        attempt("trends", lambda: plot_night_trends(summary["frames"]))
        ranked = sorted(
            ok, key=lambda f: (_finite(f.get("fwhm_px")) is None, _finite(f.get("fwhm_px")) or 0.0)
        )
        best = ranked[0]
        preview_frame = str(best.get("frame"))
        d = _frame_dir(workdir, best)
        cat = _read_table(d / "catalog.ecsv")
        if (d / "calibrated.fits").is_file():
            data, header, mask = _read_image(d / "calibrated.fits")
            fwhm = _finite(best.get("fwhm_px")) or 3.0
            attempt(
                "preview",
                lambda: plot_frame_preview(
                    data,
                    sources=cat,
                    candidates=candidates.get(preview_frame),
                    mask=mask,
                    marker_radius_px=max(4.0, 2.5 * fwhm),
                    title=f"{preview_frame} · {best.get('object') or ''} · {best.get('band') or ''} · "
                    f"{_fmt(best.get('exptime_s'), '{:g}')} s · {_utc(best.get('date_obs'))} UTC",
                ),
            )

            def field_plot():
                background = None
                if (d / "background.fits").is_file():
                    from astropy.io import fits

                    try:
                        with fits.open(d / "background.fits", memmap=False) as hdul:
                            if "BKG" in hdul:
                                background = np.asarray(hdul["BKG"].data, np.float32)
                    except (OSError, ValueError) as exc:
                        log.warning(
                            "[%s] report: %s unreadable (%s); background re-estimated",
                            sid,
                            d / "background.fits",
                            exc,
                        )
                maps = measure_field_maps(
                    data,
                    cat,
                    background=background,
                    mask=mask,
                    saturation_adu=saturation_adu,
                    fwhm_guess_px=fwhm,
                )
                return plot_field_maps(
                    maps, pixel_scale_arcsec=_finite(best.get("pixel_scale_arcsec"))
                )

            attempt("field", field_plot)
            psf_model = ((best.get("stages") or {}).get("photometry") or {}).get("psf_model")
            if psf_model and cat is not None:
                from rpp_tasks.outputs.psf_plots import plot_psf_map

                attempt(
                    "psf_map",
                    lambda: plot_psf_map(
                        psf_model,
                        image=data,
                        catalog=cat,
                        pixel_scale_arcsec=_finite(best.get("pixel_scale_arcsec")),
                    ),
                )
        else:
            flags.append("no_calibrated_image")
        step = max(1, int(math.ceil(len(ok) / max_catalogs)))
        catalogs = {}
        for f in ok[::step]:
            name = str(f.get("frame"))
            t = (
                cat
                if name == preview_frame
                else catalog_cache.get(name) or _read_table(_frame_dir(workdir, f) / "catalog.ecsv")
            )
            if t is not None:
                catalogs[str(f.get("frame"))] = t
        if catalogs:
            attempt("mag_error", lambda: plot_mag_error(catalogs))
    else:
        flags.append("no_reduced_frame")
    if zp_stars:
        attempt("zeropoint", lambda: plot_zeropoint_residuals(zp_stars, zero_points=zp_values))

    facts = header_facts(headers)
    zip_rel = None
    if products_zip:
        zip_rel = os.path.relpath(Path(products_zip), out_dir)
    page = render_report_html(
        summary,
        plots=plots,
        facts=facts,
        site=site,
        title=title,
        candidates=candidates if candidates else None,
        cutouts=cutouts,
        preview_frame=preview_frame,
        products_zip=zip_rel,
        zeropoint_reason=zp_missing_reason,
        candidates_reason=cand_missing_reason,
    )
    plot_paths = {}
    for name, png in plots.items():
        if png:
            p = out_dir / f"{name}.png"
            p.write_bytes(png)
            plot_paths[name] = str(p)
    html_path = out_dir / "report.html"
    tmp = html_path.with_name(".report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, html_path)
    available = {
        "zeropoint": bool(zp_values),
        "zeropoint_residuals": bool(zp_stars),
        "candidates": bool(candidates),
        "weather": bool(facts["weather"]),
    }
    log.info(
        "[%s] report written: %s (%d plots, %.0f kB%s)",
        sid,
        html_path,
        len(plot_paths),
        html_path.stat().st_size / 1024,
        f", flags {flags}" if flags else "",
    )
    return ReportResult(
        html_path=str(html_path),
        plot_paths=plot_paths,
        n_frames=len(frames),
        n_ok=len(ok),
        preview_frame=preview_frame,
        available=available,
        size_bytes=html_path.stat().st_size,
        flags=tuple(flags),
        frames=extra,
    )


#: Per-frame files that belong in the products ZIP (when present).
PRODUCT_FILES = (
    "calibrated.fits",
    "catalog.ecsv",
    "catalog.fits",
    "summary.json",
    "zeropoint.json",
    "candidates.ecsv",
    "rejected.json",
    "check.json",
)
#: Session-level files that belong in the products ZIP (when present).
SESSION_FILES = (
    "session_summary.json",
    "manifest.json",
    "masters.json",
    "rejected.json",
    "notify.json",
)


def zip_products(
    session: Session, *, out_path: str | os.PathLike | None = None, include_images: bool = True
) -> Path:
    """
    Write a ZIP of the session's products (written atomically; a re-run replaces it).

    Contents, under ``<session_id>/``: the session files (``session_summary.json``, ``manifest.json``,
    ``masters.json``, ``rejected.json``), ``report/`` (HTML and PNGs) and, per frame,
    ``frames/<stem>/`` with the calibrated image, catalogues, summary, zero point and candidates.
    Raw frames and intermediate checkpoints (``background.fits``, ``sources.ecsv``) are left out.

    Parameters
    ----------
    session : `~rpp_tasks.session.workdir.Session`
    out_path : path, optional
        Default ``<workdir>/<session_id>_products.zip``.
    include_images : bool, optional
        False leaves the calibrated FITS images out (a small ZIP of catalogues and report).

    Returns
    -------
    path : Path
    """
    workdir = Path(session.workdir)
    out = Path(out_path) if out_path else workdir / f"{session.session_id}_products.zip"
    root = session.session_id
    members: list[tuple[Path, str]] = []
    for name in SESSION_FILES:
        if (workdir / name).is_file():
            members.append((workdir / name, f"{root}/{name}"))
    report_dir = workdir / "report"
    if report_dir.is_dir():
        for p in sorted(report_dir.iterdir()):
            if p.is_file() and not p.name.startswith("."):
                members.append((p, f"{root}/report/{p.name}"))
    for d in sorted((workdir / "frames").glob("*")):
        if not d.is_dir():
            continue
        for png in sorted((d / "cutouts").glob("*.png")):
            members.append((png, f"{root}/frames/{d.name}/cutouts/{png.name}"))
        for name in PRODUCT_FILES:
            if name == "calibrated.fits" and not include_images:
                continue
            if (d / name).is_file():
                members.append((d / name, f"{root}/frames/{d.name}/{name}"))
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path, arc in members:
            # float32 images barely compress (noise) and deflating GBs would dominate the task: store them
            zf.write(
                path,
                arc,
                compress_type=zipfile.ZIP_STORED
                if path.suffix in (".fits", ".fz", ".png")
                else zipfile.ZIP_DEFLATED,
            )
    os.replace(tmp, out)
    log.info(
        "[%s] products ZIP: %s (%d files, %.1f MB)",
        session.session_id,
        out,
        len(members),
        out.stat().st_size / 1e6,
    )
    return out


def site_facts(obs) -> dict:
    """Site and instrument facts of an `~rpp_tasks.config.ObservatoryConfig` for the report."""
    site, cam = getattr(obs, "site", None), getattr(obs, "camera", None)
    return {
        "name": getattr(site, "name", None),
        "latitude_deg": getattr(site, "latitude_deg", None),
        "longitude_deg": getattr(site, "longitude_deg", None),
        "elevation_m": getattr(site, "elevation_m", None),
        "telescope": getattr(cam, "telescope", None),
        "camera": getattr(cam, "name", None),
    }


def run_report(session: Session, obs) -> dict:
    """
    Adapter: build ``<workdir>/report/report.html`` (+ PNGs) and ``<workdir>/<session>_products.zip``.

    Parameters
    ----------
    session : `~rpp_tasks.session.workdir.Session`
    obs : `~rpp_tasks.config.ObservatoryConfig`

    Returns
    -------
    summary : dict
        `ReportResult.to_dict` plus ``products_zip`` and ``products_zip_bytes``.

    Raises
    ------
    FileNotFoundError
        When the session has no ``session_summary.json`` (the products task has not run).
    """
    summary = session.read_json("session_summary.json")
    if summary is None:
        raise FileNotFoundError(
            f"{session.workdir}: no session_summary.json (run the products step first)"
        )
    zip_path = Path(session.workdir) / f"{session.session_id}_products.zip"
    result = build_report(
        summary,
        workdir=session.workdir,
        title=getattr(obs, "title", None) or obs.name,
        site=site_facts(obs),
        products_zip=zip_path,
        saturation_adu=getattr(getattr(obs, "camera", None), "saturation_adu", None),
    )
    zip_path = zip_products(session, out_path=zip_path)
    out = result.to_dict()
    out.update(products_zip=str(zip_path), products_zip_bytes=zip_path.stat().st_size)
    session.write_json("report/report.json", out)
    return out
