"""Plots of the PSF model of a frame: how the PSF changes across the field, and how well it fits.

`plot_psf_map` draws the model written by the photometry stage into the frame's ``summary.json``
(``stages.photometry.psf_model``, see `rpp_tasks.stages.field_psf.FieldPSF.to_dict`):

* left: the FWHM across the field (colour), with whiskers along the major axis whose length is the
  ellipticity, and the PSF stars the model was fitted on;
* right: residual stamps (data minus the fitted star, in percent of the star's peak) of the
  brightest well-measured star near the centre, the middle of each edge and each corner, with
  the local FWHM, ellipticity and beta; a good model leaves only noise.

Pure matplotlib (Agg, no pyplot), like `rpp_tasks.outputs.report`.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np

__all__ = ["plot_psf_map", "psf_residual_stamps"]

log = logging.getLogger(__name__)

_DPI = 100
#: the nine places where residual stamps are shown, as fractions of the frame (x, y); row 0 = top
_PLACES = (
    ((0.08, 0.92), (0.5, 0.92), (0.92, 0.92)),
    ((0.08, 0.5), (0.5, 0.5), (0.92, 0.5)),
    ((0.08, 0.08), (0.5, 0.08), (0.92, 0.08)),
)


def _model(psf):
    from rpp_tasks.stages.field_psf import FieldPSF

    if isinstance(psf, FieldPSF):
        return psf
    if isinstance(psf, dict) and psf.get("coeffs") is not None:
        return FieldPSF.from_dict(psf)
    raise ValueError("plot_psf_map needs a FieldPSF or its to_dict() (summary psf_model)")


def psf_residual_stamps(model, image, catalog, *, half=None, background=None):
    """
    Residual stamps of the brightest suitable star near nine places of the frame.

    Parameters
    ----------
    model : `rpp_tasks.stages.field_psf.FieldPSF`
    image : numpy.ndarray
        Calibrated image (ADU, sky included).
    catalog : `~astropy.table.Table`
        The frame's catalogue (``x_psf``, ``y_psf``, ``flux_psf``; ``saturated``, ``blended``,
        ``near_edge`` when present).
    half : int, optional
        Stamp half-width (default ``ceil(2.5 FWHM)``).
    background : float, optional
        Sky level to subtract (default: the median of the stamp's border).

    Returns
    -------
    list of dict
        One per place with a star: ``x``, ``y``, ``residual`` (percent of the model peak, 2-D),
        ``fwhm_px``, ``ellipticity``, ``beta``, ``snr``, ``row``, ``col``.
    """
    ny, nx = image.shape
    if half is None:
        half = int(math.ceil(2.5 * model.fwhm_px))
    cols = catalog.colnames
    if not all(c in cols for c in ("x_psf", "y_psf", "flux_psf")):
        return []
    x = np.asarray(catalog["x_psf"], float)
    y = np.asarray(catalog["y_psf"], float)
    f = np.asarray(catalog["flux_psf"], float)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(f) & (f > 0)
    for name in ("saturated", "blended", "near_edge"):
        if name in cols:
            ok &= ~np.asarray(catalog[name], bool)
    if "flag_psf" in cols:
        ok &= np.asarray(catalog["flag_psf"]) == 0
    ok &= (x > half + 1) & (y > half + 1) & (x < nx - half - 2) & (y < ny - half - 2)
    snr = (
        np.asarray(catalog["snr_psf"], float)
        if "snr_psf" in cols
        else np.full(len(catalog), np.nan)
    )
    # no other source closer than 2 FWHM brighter than 1 % of the star (neighbours farther out
    # are subtracted with their own fitted models)
    from scipy.spatial import cKDTree

    pts = np.column_stack([np.nan_to_num(x, nan=-1e9), np.nan_to_num(y, nan=-1e9)])
    fa = np.nan_to_num(f, nan=0.0)
    tree = cKDTree(pts)
    for i in np.flatnonzero(ok):
        nb = [j for j in tree.query_ball_point(pts[i], 2.0 * model.fwhm_px) if j != i]
        if nb and np.max(np.abs(fa[nb])) > 0.01 * fa[i]:
            ok[i] = False
    reach = half * math.sqrt(2.0) + 4.0 * model.fwhm_px
    idx_ok = np.flatnonzero(ok)
    out = []
    if idx_ok.size == 0:
        return out
    radius = 0.18 * math.hypot(nx, ny)
    for r, row in enumerate(_PLACES):
        for c, (fx, fy) in enumerate(row):
            px, py = fx * (nx - 1), fy * (ny - 1)
            d = np.hypot(x[idx_ok] - px, y[idx_ok] - py)
            near = idx_ok[d < radius]
            if near.size == 0:
                continue
            i = near[np.argmax(f[near])]
            ix, iy = int(round(x[i])), int(round(y[i]))
            cut = np.asarray(image[iy - half : iy + half + 1, ix - half : ix + half + 1], float)
            mod = model.stamps(np.array([x[i]]), np.array([y[i]]), half, ix=[ix], iy=[iy])[0]
            nb = [j for j in tree.query_ball_point(pts[i], reach) if j != i and fa[j] > 0]
            others = 0.0
            if nb:
                nb = np.asarray(nb)
                others = np.einsum(
                    "n,nij->ij",
                    fa[nb],
                    model.stamps(
                        x[nb], y[nb], half, ix=np.full(nb.size, ix), iy=np.full(nb.size, iy)
                    ),
                )
            sky = background
            if sky is None:
                border = np.concatenate([cut[0], cut[-1], cut[:, 0], cut[:, -1]])
                sky = float(np.median(border))
            res = cut - sky - f[i] * mod - others
            peak = f[i] * float(mod.max())
            sh = model.shape_at(np.array([x[i]]), np.array([y[i]]))
            out.append(
                {
                    "x": float(x[i]),
                    "y": float(y[i]),
                    "residual": 100.0 * res / peak,
                    "fwhm_px": float(sh["fwhm_px"][0]),
                    "ellipticity": float(sh["ellipticity"][0]),
                    "beta": float(sh["beta"][0]),
                    "snr": float(snr[i]),
                    "row": r,
                    "col": c,
                }
            )
    return out


def plot_psf_map(
    psf,
    *,
    image=None,
    catalog=None,
    pixel_scale_arcsec=None,
    title=None,
    width_in=11.0,
    height_in=5.2,
) -> bytes:
    """
    The PSF across the field: FWHM map with ellipticity whiskers, and residual stamps.

    Parameters
    ----------
    psf : `rpp_tasks.stages.field_psf.FieldPSF` or dict
        The model, or its ``to_dict()`` (``summary.json``: ``stages.photometry.psf_model``).
    image : numpy.ndarray, optional
        Calibrated image; with ``catalog``, the right panel shows residual stamps.
    catalog : `~astropy.table.Table`, optional
        The frame's catalogue.
    pixel_scale_arcsec : float, optional
        Adds arcseconds to the FWHM colour bar label.
    title : str, optional

    Returns
    -------
    png : bytes
    """
    from matplotlib.figure import Figure
    from matplotlib.gridspec import GridSpecFromSubplotSpec

    model = _model(psf)
    ny, nx = model.shape
    fig = Figure(figsize=(width_in, height_in), dpi=_DPI, layout="constrained")
    gs = fig.add_gridspec(1, 2, width_ratios=[1.15, 1.0])
    ax = fig.add_subplot(gs[0])
    # FWHM map on a 48 x 48 grid, whiskers on a 9 x 9 grid
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 48), np.linspace(0, ny - 1, 48))
    sh = model.shape_at(gx.ravel(), gy.ravel())
    fw = sh["fwhm_px"].reshape(gx.shape)
    im = ax.imshow(
        fw,
        origin="lower",
        extent=(-0.5, nx - 0.5, -0.5, ny - 0.5),
        cmap="viridis",
        aspect="equal",
    )
    label = "FWHM (px)"
    if pixel_scale_arcsec:
        label += f"; 1 px = {pixel_scale_arcsec:.3g}\u2033"
    fig.colorbar(im, ax=ax, location="bottom", shrink=0.85, aspect=35, label=label)
    wx, wy = np.meshgrid(
        np.linspace(0.06, 0.94, 9) * (nx - 1), np.linspace(0.06, 0.94, 9) * (ny - 1)
    )
    ws = model.shape_at(wx.ravel(), wy.ravel())
    e = ws["ellipticity"]
    th = np.radians(ws["theta_deg"])
    e_max = max(float(np.nanmax(e)), 1e-3)
    scale = 0.9 * (nx / 9.0) / max(e_max, 0.05)  # the longest whisker ~ one grid step
    length = e * scale
    ax.quiver(
        wx.ravel(),
        wy.ravel(),
        length * np.cos(th),
        length * np.sin(th),
        angles="xy",
        scale_units="xy",
        scale=1.0,
        headwidth=0,
        headlength=0,
        headaxislength=0,
        pivot="middle",
        color="white",
        width=0.006,
    )
    stars = (model.stats or {}).get("psf_star_xy") or []
    if stars:
        s = np.asarray(stars, float)
        ax.plot(s[:, 0], s[:, 1], ".", ms=2.0, color="#ff7f0e", alpha=0.7, label="PSF stars")
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(-0.5, ny - 0.5)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    betas = np.asarray(sh["beta"], float)
    beta_txt = (
        "Gaussian"
        if not np.isfinite(betas).any()
        else f"beta {np.nanmin(betas):.2f}\u2013{np.nanmax(betas):.2f}"
    )
    ax.set_title(
        f"FWHM {np.min(fw):.2f}\u2013{np.max(fw):.2f} px, {beta_txt}; whiskers: ellipticity "
        f"(max {e_max:.3f}); order {model.order}, {model.n_stars} stars",
        fontsize=9,
    )
    if stars:
        ax.legend(loc="upper right", fontsize=7, markerscale=3, framealpha=0.6)

    stamps = []
    if image is not None and catalog is not None:
        try:
            stamps = psf_residual_stamps(model, np.asarray(image), catalog)
        except Exception as exc:  # the map is still worth showing
            log.warning("psf map: residual stamps failed: %s", exc)
    sub = GridSpecFromSubplotSpec(3, 3, subplot_spec=gs[1], wspace=0.05, hspace=0.15)
    by_place = {(s["row"], s["col"]): s for s in stamps}
    lim = 5.0
    if stamps:
        lim = float(
            np.clip(
                np.nanpercentile(
                    np.abs(np.concatenate([s["residual"].ravel() for s in stamps])), 99
                ),
                1.0,
                20.0,
            )
        )
    last = None
    for r in range(3):
        for c in range(3):
            a = fig.add_subplot(sub[r, c])
            a.set_xticks([])
            a.set_yticks([])
            st = by_place.get((r, c))
            if st is None:
                a.text(
                    0.5, 0.5, "no star", ha="center", va="center", fontsize=7, transform=a.transAxes
                )
                continue
            last = a.imshow(st["residual"], origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
            beta = "G" if not math.isfinite(st["beta"]) else f"\u03b2 {st['beta']:.2f}"
            a.set_title(
                f"({st['x']:.0f}, {st['y']:.0f}) S/N {st['snr']:.0f}\n"
                f"FWHM {st['fwhm_px']:.2f} e {st['ellipticity']:.3f} {beta}",
                fontsize=6.5,
            )
    if last is not None:
        fig.colorbar(
            last,
            ax=fig.axes[-9:],
            location="bottom",
            shrink=0.85,
            aspect=35,
            label="data \u2212 model, % of the star's peak",
        )
    if title:
        fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, facecolor="white")
    return buf.getvalue()
