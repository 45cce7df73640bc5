"""The report's plots: PNG bytes from catalogues, images and frame summaries.

Pure functions (no file I/O): `zscale_limits`, `plot_frame_preview`, `plot_mag_error`,
`zeropoint_stars_from_catalog`, `plot_zeropoint_residuals`, `plot_night_trends`; the field maps
are in `rpp_tasks.outputs.field_maps`. Catalogue columns are read by their one name
(`rpp_tasks.stages.columns`).

matplotlib is imported lazily and used through ``matplotlib.figure.Figure`` with the Agg canvas
(no pyplot, no global backend switch), so importing this module stays cheap.
"""

from __future__ import annotations

import datetime as _dt
import functools
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rpp_tasks.stages import columns as C

__all__ = [
    "zscale_limits",
    "plot_frame_preview",
    "plot_mag_error",
    "zeropoint_stars_from_catalog",
    "plot_zeropoint_residuals",
    "plot_night_trends",
    "figure",
    "png",
]

_PLOT_DPI = 100
_QUALITY_COLOURS = {"good": "#2ca02c", "marginal": "#ffbf00", "poor": "#d62728"}
_CANDIDATE_COLOUR = "#ff00ff"
_SNR_LINES = ((10.0, "S/N 10"), (5.0, "S/N 5"))


def _finite(value) -> float | None:
    """A finite float or None (summaries store NaN as null)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def literal_text(plot):
    """Run a plot function with matplotlib's mathtext off: the plots draw file names, OBJECT and
    other header values, which are never TeX (``M42_$1_$2.fits`` made matplotlib parse ``1_`` as
    math and lose the preview, magnitude-error and zero-point plots)."""

    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)

    return wrapper


def figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=_PLOT_DPI, layout="constrained")


def png(fig, *, palette_colors: int | None = None) -> bytes:
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


def _col(table, name: str):
    """Column ``name`` of ``table`` as a float array, or None when absent."""
    if table is None or name not in table.colnames:
        return None
    return np.asarray(table[name], dtype=float)


def _has_calibrated(table) -> bool:
    """True when the catalogue has finite calibrated magnitudes (``mag_cal_*``)."""
    for t in ("psf", "1p3fwhm"):
        v = _col(table, C.mag(t, calibrated=True))
        if v is not None and np.isfinite(v).any():
            return True
    return False


def _best_mag(
    table, *, calibrated: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """PSF magnitude where finite, else the 1.3 FWHM aperture magnitude (with matching error);
    ``calibrated`` uses the ``mag_cal_*`` columns of the zero-point stage."""
    mag = _col(table, C.mag("psf", calibrated=calibrated))
    err = _col(table, C.mag_err("psf", calibrated=calibrated))
    amag = _col(table, C.mag("1p3fwhm", calibrated=calibrated))
    aerr = _col(table, C.mag_err("1p3fwhm", calibrated=calibrated))
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
@literal_text
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
        Transient candidates with ``x_centroid``/``y_centroid``; magenta squares, labelled with
        their ``id`` when present.
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
    fig = figure(width_in, max(3.0, width_in * aspect * 0.92 + 0.6))
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
    if sources is not None and len(sources) and {C.X, C.Y} <= set(sources.colnames):
        quality = (
            np.asarray(sources[C.QUALITY]).astype(str)
            if C.QUALITY in sources.colnames
            else np.full(len(sources), "good")
        )
        xs, ys = np.asarray(sources[C.X], float), np.asarray(sources[C.Y], float)
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
            _col(candidates, C.X),
            _col(candidates, C.Y),
        )
        if cx is not None and cy is not None:
            labels = [str(v) for v in candidates[C.ID]] if C.ID in candidates.colnames else None
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
    return png(fig, palette_colors=96)


@literal_text
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
    fig = figure(width_in, height_in)
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
    return png(fig)


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


def zeropoint_stars_from_catalog(catalog, zp_by_type: Mapping[str, Any] | None = None):
    """
    Zero-point stars of one frame from its calibrated catalogue (columns of the zero-point stage).

    Uses ``ref_mag`` (matched reference magnitude), ``mag_cal_<t>`` of the headline photometry type
    ``t`` (PSF when its zero point was measured, else the 1.3 FWHM aperture, ...) and ``zp_star``
    (used in the fit). The residual is ``ref_mag - mag_cal_<t>``.

    Parameters
    ----------
    catalog : `~astropy.table.Table`
    zp_by_type : mapping, optional
        Photometry type -> zero point (``zp_by_type`` of the zero-point stage's result).

    Returns
    -------
    table : `~astropy.table.Table` or None
        ``mag_ref``, ``residual_mag``, ``used``; None when the catalogue has no matched star.
    """
    from astropy.table import Table

    if catalog is None or C.REF_MAG not in catalog.colnames:
        return None
    measured = [t for t in C.PHOT_TYPES if _finite((zp_by_type or {}).get(t)) is not None]
    order = measured[:1] + [t for t in C.PHOT_TYPES if t not in measured[:1]]
    ref = np.asarray(catalog[C.REF_MAG], float)
    for typ in order:
        cal = _col(catalog, C.mag(typ, calibrated=True))
        if cal is None:
            continue
        ok = np.isfinite(ref) & np.isfinite(cal)
        if ok.sum() == 0:
            continue
        used = (
            np.ma.filled(np.ma.asarray(catalog[C.ZP_STAR]), False).astype(bool)
            if C.ZP_STAR in catalog.colnames
            else np.ones(len(catalog), bool)
        )
        return Table(
            {"mag_ref": ref[ok], "residual_mag": (ref - cal)[ok], "used": used[ok]},
            meta={"phot_type": typ},
        )
    return None


@literal_text
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
    fig = figure(width_in, height_in)
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
    return png(fig)


def _parse_time(value) -> _dt.datetime | None:
    if not value:
        return None
    try:
        t = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.UTC)


@literal_text
def plot_night_trends(
    frames: Sequence[Mapping[str, Any]], *, width_in: float = 9.0, height_in: float = 5.2
) -> bytes:
    """
    FWHM, background, number of sources and limiting magnitude of the reduced frames against time.

    Parameters
    ----------
    frames : sequence of mapping
        Frame summaries (``date_obs``, ``fwhm_px``/``fwhm_arcsec``, ``background_adu``,
        ``n_sources``, ``limiting_mag_inst``, optional ``limiting_mag_cal``). Frames without
        ``date_obs`` are placed
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
    fig = figure(width_in, height_in)
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
    return png(fig)
