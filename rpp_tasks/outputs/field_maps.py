"""FWHM and sky background across the field of one frame (measured, then plotted)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from rpp_tasks.outputs.plots import _downsample, _finite, figure, literal_text, png
from rpp_tasks.stages import columns as C

__all__ = ["FieldMaps", "measure_field_maps", "plot_field_maps"]

log = logging.getLogger(__name__)


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
        x, y = np.asarray(sources[C.X], float), np.asarray(sources[C.Y], float)
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


@literal_text
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
    fig = figure(width_in, height_in)
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
    return png(fig)
