"""Files of a session the dashboard serves, the images it draws, and a running session's progress.

* `frame_product` -- a published file of one frame (calibrated image, catalogue as ECSV, FITS or
  VOTable, transient candidates, preview and thumbnail PNG), refusing anything else, any name that
  is not a plain file name and any link out of the frame's folder;
* `frame_preview` -- the calibrated image (zscale) with the detections circled and the target
  marked, cached next to the frame's products (``dashboard/`` in the frame folder);
* `progress` -- frames done / total per stage, read from the work folder while the DAG runs.
"""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

from rpp_tasks.outputs.browse import safe_name

log = logging.getLogger(__name__)

CACHE_DIR = "dashboard"
#: Published files of a frame folder -> MIME type. ``catalog.vot``, ``preview.png`` and
#: ``thumb.png`` are made on first request.
FRAME_PRODUCTS = {
    "calibrated.fits": "image/fits",
    "catalog.ecsv": "text/plain; charset=utf-8",
    "catalog.fits": "application/fits",
    "catalog.vot": "application/x-votable+xml",
    "candidates.ecsv": "text/plain; charset=utf-8",
    "preview.png": "image/png",
    "thumb.png": "image/png",
}
_GENERATED = ("catalog.vot", "preview.png", "thumb.png")


def _regular_inside(path: Path, folder: Path) -> Path:
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise FileNotFoundError(f"no product {path.name!r}") from None
    if not target.is_relative_to(folder.resolve()):
        raise PermissionError(f"{path.name!r} is a link that leaves the frame folder")
    if not stat.S_ISREG(target.stat().st_mode):
        raise FileNotFoundError(f"no product {path.name!r}")
    return target


def frame_dir(workdir: Path, stem: str) -> Path:
    if not safe_name(stem):
        raise ValueError(f"invalid frame name {stem!r:.80}")
    d = workdir / "frames" / stem
    if not d.is_dir() or d.resolve().parent != (workdir / "frames").resolve():
        raise FileNotFoundError(f"no frame folder {stem!r}")
    return d


def frame_product(workdir: Path, stem: str, name: str, *, frame: dict | None = None) -> Path:
    """The published file ``name`` of frame ``stem`` (ValueError for a malformed name,
    PermissionError for a file that is not a product, FileNotFoundError when absent)."""
    if not safe_name(name):
        raise ValueError(f"invalid file name {name!r:.80}")
    if name not in FRAME_PRODUCTS:
        raise PermissionError(f"{name!r:.80} is not a published product of a frame")
    d = frame_dir(workdir, stem)
    if name == "catalog.vot":
        src = _regular_inside(d / "catalog.ecsv", d)
        out = d / CACHE_DIR / name
        if not out.is_file() or out.stat().st_mtime < src.stat().st_mtime:
            from astropy.table import Table

            out.parent.mkdir(exist_ok=True)
            tmp = out.with_suffix(".tmp")
            Table.read(src, format="ascii.ecsv").write(tmp, format="votable", overwrite=True)
            tmp.replace(out)
        return out
    if name in ("preview.png", "thumb.png"):
        return frame_preview(d, frame or {}, thumb=name == "thumb.png")
    return _regular_inside(d / name, d)


def _target_xy(fdir: Path, frame: dict):
    """Pixel position and name of the frame's target: the target stage's measurement in the
    session's ``targets.json`` (`rpp_tasks.stages.target.run_targets`), when there is one."""
    import math

    path = fdir.parent.parent / "targets.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for m in d.get("measurements") or [] if isinstance(d, dict) else []:
        if not isinstance(m, dict) or m.get("frame") != fdir.name:
            continue
        x, y = m.get("x_px"), m.get("y_px")
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            if math.isfinite(x) and math.isfinite(y):
                return float(x), float(y), str(m.get("target") or "target")
    return None


def frame_preview(fdir: Path, frame: dict, *, thumb: bool = False) -> Path:
    """The frame's preview PNG (cached; redrawn when the calibrated image is newer)."""
    src = _regular_inside(fdir / "calibrated.fits", fdir)
    out = fdir / CACHE_DIR / ("thumb.png" if thumb else "preview.png")
    targets = fdir.parent.parent / "targets.json"
    newest = max(src.stat().st_mtime, targets.stat().st_mtime if targets.is_file() else 0.0)
    if out.is_file() and out.stat().st_mtime >= newest:
        return out
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from astropy.io import fits
    from astropy.visualization import ZScaleInterval
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, Rectangle

    with fits.open(src, memmap=False) as hdul:
        data = next(h.data for h in hdul if getattr(h, "data", None) is not None)
    data = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(data)
    vmin, vmax = ZScaleInterval().get_limits(data[finite]) if finite.any() else (0.0, 1.0)
    size = 1.6 if thumb else 7.0
    ny, nx = data.shape
    fig = Figure(figsize=(size, size * ny / nx), dpi=80 if thumb else 100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(data, origin="lower", cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_axis_off()
    if not thumb:
        cat = fdir / "catalog.ecsv"
        if cat.is_file():
            from astropy.table import Table

            try:
                t = Table.read(cat, format="ascii.ecsv")
                xs, ys = t["x_centroid"], t["y_centroid"]
                for x, y in zip(np.asarray(xs), np.asarray(ys)):
                    if np.isfinite(x) and np.isfinite(y):
                        ax.add_patch(Circle((x, y), 6, fill=False, ec="#00ff00", lw=0.8))
            except (KeyError, ValueError, OSError) as exc:
                log.warning("dashboard: %s: detections not drawn: %s", cat, exc)
        txy = _target_xy(fdir, frame)
        if txy is not None:
            x, y, name = txy
            ax.add_patch(Rectangle((x - 10, y - 10), 20, 20, fill=False, ec="#ff00ff", lw=1.5))
            ax.text(x + 12, y + 12, name, color="#ff00ff", fontsize=9)
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(-0.5, ny - 0.5)
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(out)
    return out


def progress(workdir: Path, stage_names, frame_stage_names) -> dict:
    """Frames done / total per frame stage, from the work folder (while the DAG runs).

    ``total`` is the number of science frames of the manifest; a frame has done a stage when its
    ``summary.json`` records the stage's finish time; a rejected frame counts as done for the
    stages after its rejection (it will not run them)."""
    manifest = {}
    try:
        manifest = json.loads((workdir / "manifest.json").read_text())
    except (OSError, ValueError):
        pass
    total = int((manifest.get("counts") or {}).get("science") or 0)
    done = dict.fromkeys(frame_stage_names, 0)
    frames = workdir / "frames"
    n_rejected = 0
    for fdir in sorted(frames.iterdir()) if frames.is_dir() else []:
        try:
            s = json.loads((fdir / "summary.json").read_text())
        except (OSError, ValueError):
            continue
        stages = s.get("stages") or {}
        rejected = s.get("status") in ("rejected", "failed")
        n_rejected += rejected
        for name in done:
            if (isinstance(stages.get(name), dict) and "finished_utc" in stages[name]) or rejected:
                done[name] += 1
    finished = (workdir / "session_summary.json").is_file()
    return {
        "total": total,
        "n_rejected": n_rejected,
        "finished": finished,
        "stages": [{"stage": n, "done": done[n], "total": total} for n in stage_names if n in done],
        "masters": (workdir / "masters.json").is_file(),
    }


_SPECTRUM_SUFFIXES = {
    ".fits": "application/fits",
    ".ecsv": "text/plain; charset=utf-8",
    "_spectrum.png": "image/png",
}


def spectrum_products(workdir: Path) -> list[str]:
    """1-D spectra of a session (`rpp_tasks.spectra`: ``<base>.fits`` with its
    ``<base>_spectrum.png`` plot), as ``<base>`` paths relative to the work folder."""
    out = []
    for png in sorted(workdir.glob("**/*_spectrum.png")):
        base = png.with_name(png.name[: -len("_spectrum.png")])
        if base.with_suffix(".fits").is_file() and CACHE_DIR not in png.parts:
            out.append(base.relative_to(workdir).as_posix())
    return out[:500]


def spectrum_file(workdir: Path, relpath: str) -> tuple[Path, str]:
    """A file of a listed spectrum (``<base>.fits``, ``.ecsv`` or ``_spectrum.png``) and its MIME
    type; refuses anything else (PermissionError) and malformed paths (ValueError)."""
    parts = relpath.split("/")
    if len(relpath) > 1024 or not all(safe_name(p) for p in parts):
        raise ValueError(f"invalid spectrum path {relpath!r:.80}")
    for suffix, mime in _SPECTRUM_SUFFIXES.items():
        if relpath.endswith(suffix):
            base = relpath[: -len(suffix)]
            if base in spectrum_products(workdir):
                return _regular_inside(workdir / relpath, workdir), mime
            break
    raise PermissionError(f"{relpath!r:.80} is not a spectrum product of this session")
