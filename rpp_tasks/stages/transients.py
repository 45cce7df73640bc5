"""Transient candidates: good detections absent from the reference catalogue, after removing
solar-system objects, edge, saturated, blended and otherwise flagged sources; PNG cutouts.

Without a reference catalogue (service down, no cache) no source can be called a transient: the
result is empty with flag ``"no_reference"`` rather than every star of the field.
"""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["TransientResult", "find_candidates", "write_png", "write_cutouts"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransientResult:
    candidates: object  # astropy Table (possibly empty, same columns as the catalogue + cutout)
    n_checked: int
    n_sso_removed: int
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "n_candidates": len(self.candidates),
            "n_checked": self.n_checked,
            "n_sso_removed": self.n_sso_removed,
            "flags": list(self.flags),
        }


def find_candidates(
    cat, *, reference_available: bool, min_snr: float = 10.0, max_candidates: int = 50
) -> TransientResult:
    """
    Select transient candidates from an enriched catalogue.

    Parameters
    ----------
    cat : astropy.table.Table
        With ``ra``, ``dec``, ``snr``, flags and the enrichment columns ``gaia_source_id`` (0 = no
        Gaia counterpart) and ``sso_name``.
    reference_available : bool
        Whether the Gaia match was actually made (otherwise: empty result, flag ``no_reference``).
    min_snr : float
        Minimum S/N of a candidate.

    Returns
    -------
    TransientResult
    """
    n = len(cat)
    if not reference_available or "gaia_source_id" not in cat.colnames:
        return TransientResult(cat[:0], 0, 0, ("no_reference",))
    ok = np.isfinite(np.asarray(cat["ra"], float)) & np.isfinite(np.asarray(cat["dec"], float))
    snr = np.asarray(cat["snr"], float) if "snr" in cat.colnames else np.full(n, np.inf)
    ok &= np.nan_to_num(snr, nan=0.0) >= min_snr
    for name in ("saturated", "near_edge", "blended"):
        if name in cat.colnames:
            ok &= ~np.asarray(cat[name], bool)
    if "quality" in cat.colnames:
        ok &= np.asarray(cat["quality"]).astype(str) != "poor"
    if "flag" in cat.colnames:  # detection flags other than "blended" (1): truncated, bad pixels...
        ok &= (np.asarray(cat["flag"], np.int64) & ~1) == 0
    n_checked = int(ok.sum())
    absent = ok & (np.asarray(cat["gaia_source_id"], np.int64) == 0)
    sso = np.zeros(n, bool)
    if "sso_name" in cat.colnames:
        sso = np.asarray(cat["sso_name"]).astype(str) != ""
    n_sso = int((absent & sso).sum())
    sel = absent & ~sso
    cand = cat[sel]
    if len(cand) > max_candidates:
        cand = cand[np.argsort(-np.asarray(cand["snr"], float))[:max_candidates]]
    flags = ("too_many_candidates",) if int(sel.sum()) > max_candidates else ()
    return TransientResult(cand, n_checked, n_sso, flags)


def write_png(path, image: np.ndarray) -> None:
    """Write a 2-D uint8 array as an 8-bit greyscale PNG (row 0 at the bottom, as images are
    shown)."""
    img = np.ascontiguousarray(np.flipud(np.asarray(image, np.uint8)))
    h, w = img.shape
    raw = b"".join(b"\x00" + img[i].tobytes() for i in range(h))

    def chunk(tag, data):
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
    Path(path).write_bytes(png)


def _stretch(stamp):
    good = np.isfinite(stamp)
    if not good.any():
        return np.zeros(stamp.shape, np.uint8)
    lo, hi = np.percentile(stamp[good], [5.0, 99.5])
    hi = max(hi, lo + 1e-6)
    s = np.clip((np.where(good, stamp, lo) - lo) / (hi - lo), 0, 1)
    return (np.arcsinh(10 * s) / np.arcsinh(10) * 255).astype(np.uint8)


def write_cutouts(
    data: np.ndarray, candidates, outdir, *, size_px: int = 31, prefix: str = "cand"
) -> list[str]:
    """PNG cutouts (``size_px`` square, asinh stretch, upscaled x4) centred on each candidate."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    h = size_px // 2
    ny, nx = data.shape
    paths = []
    for k, row in enumerate(candidates):
        x = (
            float(row["x_psf"])
            if "x_psf" in candidates.colnames and np.isfinite(row["x_psf"])
            else float(row["x_centroid"])
        )
        y = (
            float(row["y_psf"])
            if "y_psf" in candidates.colnames and np.isfinite(row["y_psf"])
            else float(row["y_centroid"])
        )
        ix, iy = int(round(x)), int(round(y))
        stamp = np.full((2 * h + 1, 2 * h + 1), np.nan, np.float32)
        x0, x1, y0, y1 = max(ix - h, 0), min(ix + h + 1, nx), max(iy - h, 0), min(iy + h + 1, ny)
        if x1 > x0 and y1 > y0:
            stamp[y0 - (iy - h) : y1 - (iy - h), x0 - (ix - h) : x1 - (ix - h)] = data[y0:y1, x0:x1]
        img = np.kron(_stretch(stamp), np.ones((4, 4), np.uint8))
        name = (
            f"{prefix}_{k + 1:03d}_{int(row['id']) if 'id' in candidates.colnames else k + 1}.png"
        )
        write_png(outdir / name, img)
        paths.append(str(outdir / name))
    return paths
