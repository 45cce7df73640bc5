"""Cosmic-ray detection and cleaning: L.A.Cosmic (astroscrappy) run only where it is needed.

Whole-frame L.A.Cosmic (van Dokkum 2001, via ``astroscrappy``) costs 4-7 CPU-s on a 2048 x 2048
frame, more than the whole per-frame budget of the reduction chain. Cosmic rays cover well under
0.1 % of a typical frame, so this module runs it in two steps:

1. **Candidate finder** (whole frame, vectorised numpy, ~0.15 CPU-s on 2048^2). A pixel is a
   candidate when it stands out of the mean of its 4 neighbours both
   *significantly* -- ``data - mean4 > candidate_sigma * noise`` with the noise model
   ``sqrt(mean4 / gain + (read_noise / gain)^2)`` (ADU) -- and *sharply*:
   ``data - mean4 > min_sharpness * (data - sky)``. A pixel-integrated Gaussian star has a
   sharpness of at most ~0.34 (FWHM 2.5 px, centred) and ~0.16 at FWHM 4 px, a single-pixel hit ~1,
   a straight track or a 2x2 hit ~0.5. The sharpness cut therefore discards the cores of most
   stars before the expensive test, the significance cut discards noise.
2. **L.A.Cosmic on tiles.** The frame is divided into ``tile_px`` square cells; every cell holding
   a candidate is cut out with a ``margin_px`` border (reflected at the frame edges), the cut-outs
   are packed side by side into one mosaic, and ``astroscrappy.detect_cosmics`` runs once on the
   mosaic with the camera's gain, read noise and saturation. The margin (8 px by default) is wider
   than the reach of L.A.Cosmic's filters (fine-structure median 3 then 7: 4 px), so the result in
   a cell and its first ``trust_px`` border pixels does not depend on the neighbouring cut-out.
   L.A.Cosmic's own sigma-clip, fine-structure (``objlim``) and neighbour-growth (``sigfrac``)
   tests then decide; candidates on stars are protected by the ``objlim`` test as usual.
3. **Seeded flags only.** A group of flagged pixels is kept only if it contains a candidate, and
   only its pixels within ``max_growth_px`` (1) of a candidate. This removes L.A.Cosmic's flags on
   bright star rims and sky-noise peaks (no sharp seed) and stops its neighbour growth from
   spilling into the core of a star next to a hit. On seeded synthetic 1024^2 fields (500 stars,
   FWHM 2.5-4 px, 60 hits/tracks) this keeps ~99 % of cosmic-ray pixels with ~0.3 star-core
   pixels flagged per field, against ~27 for whole-frame L.A.Cosmic with the same parameters.

Flagged pixels are replaced by the median of the unflagged, unmasked pixels of their 5 x 5
neighbourhood (7 x 7 when the 5 x 5 is empty). If the candidate cells cover more than
``max_tile_fraction`` of the frame the whole frame is processed at once (``method="full"``),
which is also available on request for comparisons.

Input convention: ``data`` in ADU (the units in which ``gain_e_per_adu`` converts to electrons),
**including the sky**. If the sky has been subtracted already, pass it as ``background``: it is
added back for the noise model and removed again from ``cleaned``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import astroscrappy
import numpy as np
from scipy import ndimage

__all__ = ["CosmicRayResult", "clean_cosmic_rays"]

log = logging.getLogger(__name__)

_METHODS = ("tiled", "full")


@dataclass(frozen=True)
class CosmicRayResult:
    """Cosmic-ray mask and cleaned image.

    Attributes
    ----------
    mask : numpy.ndarray
        bool, True on pixels flagged as cosmic rays.
    cleaned : numpy.ndarray
        float32 image (same convention as the input ``data``) with flagged pixels replaced.
    n_pixels : int
        Number of flagged pixels.
    n_candidates : int
        Pixels passed by the cheap candidate finder (0 with ``method="full"``).
    n_tiles : int
        Cells processed by L.A.Cosmic (0 with ``method="full"``).
    tile_fraction : float
        Fraction of the frame area sent to L.A.Cosmic (1.0 for ``method="full"``).
    method : str
        ``"tiled"`` or ``"full"``.
    cpu_s : float
        Process CPU time spent in the call (all threads).
    flags : tuple of str
        ``"no_candidates"``, ``"fallback_full_frame"``.
    """

    mask: np.ndarray = field(repr=False)
    cleaned: np.ndarray = field(repr=False)
    n_pixels: int
    n_candidates: int
    n_tiles: int
    tile_fraction: float
    method: str
    cpu_s: float
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-safe summary (without the arrays)."""
        return {
            "n_pixels": self.n_pixels,
            "n_candidates": self.n_candidates,
            "n_tiles": self.n_tiles,
            "tile_fraction": self.tile_fraction,
            "method": self.method,
            "cpu_s": self.cpu_s,
            "flags": list(self.flags),
        }


def clean_cosmic_rays(
    data,
    *,
    gain_e_per_adu,
    read_noise_e,
    saturation_adu,
    sigclip=4.5,
    sigfrac=0.3,
    objlim=5.0,
    mask=None,
    background=None,
    method="tiled",
    niter=4,
    candidate_sigma=None,
    min_sharpness=0.45,
    tile_px=16,
    margin_px=8,
    trust_px=3,
    max_tile_fraction=0.4,
    max_growth_px=1,
):
    """
    Detect and clean cosmic rays with L.A.Cosmic restricted to candidate tiles.

    Parameters
    ----------
    data : array_like
        2-D image in ADU, sky included (see ``background``).
    gain_e_per_adu : float
        Camera gain (e-/ADU), > 0.
    read_noise_e : float
        Read noise (e-), >= 0.
    saturation_adu : float
        Level (in the units of ``data + background``) from which pixels count as saturated;
        L.A.Cosmic masks saturated stars. ``numpy.inf`` when saturated pixels are in ``mask``.
    sigclip, sigfrac, objlim : float, optional
        L.A.Cosmic parameters: detection limit (Laplacian-to-noise), fraction of it used to grow
        into neighbours, and minimum contrast with the fine-structure image (raise ``objlim`` if
        star cores are flagged).
    mask : array_like of bool, optional
        Pixels to ignore (bad, saturated); never flagged and not used for cleaning.
    background : array_like or float, optional
        Sky already subtracted from ``data`` (ADU); added back for the noise model only.
    method : {"tiled", "full"}, optional
        ``"tiled"``: candidate finder + L.A.Cosmic on cells (default); ``"full"``: whole frame.
    niter : int, optional
        L.A.Cosmic iterations.
    candidate_sigma : float, optional
        Significance cut of the candidate finder; default ``0.6 * sigclip``.
    min_sharpness : float, optional
        Sharpness cut of the candidate finder, ``(data - mean4) / (data - sky)``.
    tile_px, margin_px, trust_px : int, optional
        Cell size, cut-out border and how far beyond its cell a cut-out's mask is kept.
    max_tile_fraction : float, optional
        Above this fraction of the frame in cells, process the whole frame instead.
    max_growth_px : int or None, optional
        Keep L.A.Cosmic flags only within this many pixels (8-connected) of a candidate, and only
        in connected groups that contain a candidate. 1 stops the neighbour growth from spilling
        into the core of a star next to a cosmic ray; None keeps L.A.Cosmic's growth as is.

    Returns
    -------
    result : `CosmicRayResult`

    Raises
    ------
    ValueError
        On a non-2-D ``data``, shape mismatches, a non-positive gain, a negative read noise, an
        unknown ``method`` or ``margin_px < trust_px + 5``.
    """
    t0 = time.process_time()
    data = np.asarray(data)
    if data.ndim != 2:
        msg = f"data must be a 2-D image, got shape {data.shape}"
        raise ValueError(msg)
    if not gain_e_per_adu > 0:
        msg = f"gain_e_per_adu must be > 0, got {gain_e_per_adu!r}"
        raise ValueError(msg)
    if not read_noise_e >= 0:
        msg = f"read_noise_e must be >= 0, got {read_noise_e!r}"
        raise ValueError(msg)
    if method not in _METHODS:
        msg = f"method must be one of {_METHODS}, got {method!r}"
        raise ValueError(msg)
    if margin_px < trust_px + 5:
        msg = f"margin_px ({margin_px}) must be >= trust_px + 5 ({trust_px + 5})"
        raise ValueError(msg)
    gain = float(gain_e_per_adu)

    bkg = None
    if background is not None:
        bkg = np.broadcast_to(np.asarray(background, dtype=np.float32), data.shape)
    work = np.array(data, dtype=np.float32, order="C")
    if bkg is not None:
        work += bkg

    bad = ~np.isfinite(work)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape:
            msg = f"mask shape {mask.shape} differs from data shape {data.shape}"
            raise ValueError(msg)
        bad |= mask
    if bad.any():
        # (no NaN left outside ``bad``: the plain median, without nanmedian's extra pass)
        work[bad] = np.float32(np.median(work[~bad])) if (~bad).any() else np.float32(0.0)

    sat_e = float(saturation_adu) * gain if np.isfinite(saturation_adu) else np.inf
    lacosmic = dict(
        sigclip=sigclip,
        sigfrac=sigfrac,
        objlim=objlim,
        gain=gain,
        readnoise=float(read_noise_e),
        satlevel=sat_e,
        niter=int(niter),
        sepmed=True,
        cleantype="meanmask",
        fsmode="median",
    )

    flags = []
    n_cand = n_tiles = 0
    if method == "tiled":
        cand = _find_candidates(
            work,
            bad,
            gain=gain,
            read_noise_e=float(read_noise_e),
            k_sigma=sigclip * np.sqrt(1.25) if candidate_sigma is None else candidate_sigma,
            min_sharpness=min_sharpness,
        )
        n_cand = int(np.count_nonzero(cand))
        cells = _candidate_cells(cand, tile_px)
        n_tiles = len(cells)
        frac = n_tiles * tile_px**2 / data.size
        if n_cand == 0:
            flags.append("no_candidates")
            crmask = np.zeros(data.shape, dtype=bool)
        elif frac > max_tile_fraction:
            log.info(
                "cosmics: %d candidate cells cover %.0f%% of the frame; whole frame instead",
                n_tiles,
                100 * frac,
            )
            flags.append("fallback_full_frame")
            method = "full"
        else:
            crmask = _lacosmic_on_cells(
                work,
                bad,
                cells,
                tile_px=tile_px,
                margin_px=margin_px,
                trust_px=trust_px,
                lacosmic=lacosmic,
            )
            crmask = _keep_seeded(crmask, cand)
            if max_growth_px is not None:
                crmask &= _square_dilation(cand, int(max_growth_px))
    if method == "full":
        crmask, _ = astroscrappy.detect_cosmics(work, inmask=bad, **lacosmic)
        crmask = np.asarray(crmask, dtype=bool)
        frac = 1.0
    crmask &= ~bad

    cleaned_work = _fill_masked_median(work, crmask, bad)
    if bkg is not None:
        cleaned_work -= bkg
    # Pixels that were masked keep their input values (NaN stays NaN).
    cleaned = np.where(bad, np.asarray(data, dtype=np.float32), cleaned_work).astype(np.float32)

    n_pix = int(np.count_nonzero(crmask))
    cpu = time.process_time() - t0
    log.info(
        "cosmics: %d px flagged (%s, %d candidates, %d cells = %.1f%% of frame), %.2f CPU-s",
        n_pix,
        method,
        n_cand,
        n_tiles,
        100 * frac,
        cpu,
    )
    return CosmicRayResult(
        mask=crmask,
        cleaned=cleaned,
        n_pixels=n_pix,
        n_candidates=n_cand,
        n_tiles=n_tiles if method == "tiled" else 0,
        tile_fraction=float(frac),
        method=method,
        cpu_s=float(cpu),
        flags=tuple(flags),
    )


def _find_candidates(work, bad, *, gain, read_noise_e, k_sigma, min_sharpness, sky_block=64):
    """Pixels significantly and sharply above the mean of their 4 neighbours (see module doc)."""
    p = np.pad(work, 1, mode="edge")
    lap = p[:-2, 1:-1] + p[2:, 1:-1]
    lap += p[1:-1, :-2]
    lap += p[1:-1, 2:]
    lap *= -0.25
    lap += work  # data - mean4
    # Cheap pre-cut at the smallest possible noise (read noise only), then the full noise model
    # in ADU at the level of the neighbours (not inflated by the hit itself) on the survivors.
    rn_adu = read_noise_e / gain
    cand = np.zeros(work.shape, dtype=bool)
    ys, xs = np.nonzero(lap > k_sigma * rn_adu)
    if ys.size == 0:
        return cand
    lap_c = lap[ys, xs]
    var = np.maximum(work[ys, xs] - lap_c, 0.0) / gain + rn_adu**2
    keep = lap_c * lap_c > (k_sigma * k_sigma) * var
    ys, xs, lap_c = ys[keep], xs[keep], lap_c[keep]
    if ys.size == 0:
        return cand
    # Sharpness against a coarse sky: median of the sky_block x sky_block cell of the pixel,
    # computed only for the cells that hold significant pixels.
    ncx = -(-work.shape[1] // sky_block)
    ucell, inv = np.unique((ys // sky_block) * ncx + xs // sky_block, return_inverse=True)
    sky = np.empty(ucell.size, dtype=np.float32)
    for i, c in enumerate(ucell):
        cy, cx = divmod(int(c), ncx)
        sl = (
            slice(cy * sky_block, (cy + 1) * sky_block),
            slice(cx * sky_block, (cx + 1) * sky_block),
        )
        good = ~bad[sl]
        sky[i] = np.median(work[sl][good]) if good.any() else 0.0
    keep = lap_c > min_sharpness * (work[ys, xs] - sky[inv])
    cand[ys[keep], xs[keep]] = True
    cand &= ~bad
    return cand


def _square_dilation(seeds, grow):
    """``binary_dilation(seeds, ones((3, 3)), iterations=grow)`` for a sparse ``seeds``: every
    pixel within ``grow`` px (8-connected) of a seed, set from the seeds' positions instead of a
    full-frame pass per iteration (offsets clipped at the edges land on pixels already set)."""
    if grow < 1:  # scipy's meaning of iterations < 1: until nothing changes
        return ndimage.binary_dilation(seeds, structure=np.ones((3, 3), bool), iterations=grow)
    out = np.zeros(seeds.shape, dtype=bool)
    ys, xs = np.nonzero(seeds)
    ny, nx = seeds.shape
    for dy in range(-grow, grow + 1):
        yy = np.clip(ys + dy, 0, ny - 1)
        for dx in range(-grow, grow + 1):
            out[yy, np.clip(xs + dx, 0, nx - 1)] = True
    return out


def _candidate_cells(cand, tile_px):
    """Unique (cy, cx) cell indices holding at least one candidate."""
    ys, xs = np.nonzero(cand)
    if ys.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    ncx = -(-cand.shape[1] // tile_px)
    ids = np.unique((ys // tile_px) * ncx + xs // tile_px)
    return np.column_stack([ids // ncx, ids % ncx])


def _lacosmic_on_cells(work, bad, cells, *, tile_px, margin_px, trust_px, lacosmic):
    """Run astroscrappy once on a mosaic of the cut-outs around ``cells``; merge the masks."""
    ny, nx = work.shape
    t, m = tile_px, margin_px
    size = t + 2 * m
    ncy, ncx = -(-ny // t), -(-nx // t)
    # Reflect-pad so every cut-out is complete (right/bottom padded up to whole cells).
    pad_spec = ((m, ncy * t - ny + m), (m, ncx * t - nx + m))
    wpad = np.pad(work, pad_spec, mode="reflect")
    bpad = np.pad(bad, pad_spec, mode="reflect")

    n = len(cells)
    cols = int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    mosaic = np.zeros((rows * size, cols * size), dtype=np.float32)
    mmask = np.ones(mosaic.shape, dtype=bool)  # unused mosaic slots stay masked
    for i, (cy, cx) in enumerate(cells):
        r, c = divmod(i, cols)
        src = (slice(cy * t, cy * t + size), slice(cx * t, cx * t + size))
        dst = (slice(r * size, (r + 1) * size), slice(c * size, (c + 1) * size))
        mosaic[dst] = wpad[src]
        mmask[dst] = bpad[src]
    crm, _ = astroscrappy.detect_cosmics(mosaic, inmask=mmask, **lacosmic)
    crm = np.asarray(crm, dtype=bool)

    out = np.zeros((ncy * t + 2 * m, ncx * t + 2 * m), dtype=bool)
    lo, hi = m - trust_px, m + t + trust_px  # trusted part of a cut-out
    for i, (cy, cx) in enumerate(cells):
        r, c = divmod(i, cols)
        piece = crm[r * size + lo : r * size + hi, c * size + lo : c * size + hi]
        out[cy * t + lo : cy * t + hi, cx * t + lo : cx * t + hi] |= piece
    return out[m : m + ny, m : m + nx]


def _keep_seeded(crmask, seeds):
    """Keep the 8-connected components of ``crmask`` that contain at least one seed pixel."""
    if not crmask.any():
        return crmask
    labels, n = ndimage.label(crmask, structure=np.ones((3, 3), dtype=bool))
    keep = np.zeros(n + 1, dtype=bool)
    keep[np.unique(labels[seeds & crmask])] = True
    keep[0] = False
    return keep[labels]


def _fill_masked_median(work, crmask, bad):
    """Replace ``crmask`` pixels by the median of valid neighbours (5 x 5, else 7 x 7, else 11 x
    11)."""
    out = work.copy()
    ys, xs = np.nonzero(crmask)
    if ys.size == 0:
        return out
    invalid = crmask | bad
    todo = np.arange(ys.size)
    big = 5
    p = np.pad(work, big, mode="reflect")
    q = np.pad(invalid, big, mode="reflect")
    for half in (2, 3, big):
        if todo.size == 0:
            break
        off = np.arange(-half, half + 1)
        yy = ys[todo, None, None] + big + off[None, :, None]
        xx = xs[todo, None, None] + big + off[None, None, :]
        vals = np.where(q[yy, xx], np.nan, p[yy, xx]).reshape(todo.size, -1)
        ok = np.isfinite(vals).any(axis=1)
        if ok.any():
            med = np.nanmedian(vals[ok], axis=1)
            out[ys[todo[ok]], xs[todo[ok]]] = med
        todo = todo[~ok]
    if todo.size:  # isolated in a sea of flagged pixels: leave the coarse sky
        out[ys[todo], xs[todo]] = np.median(work[~invalid]) if (~invalid).any() else 0.0
    return out
