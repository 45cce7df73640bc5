"""One frame between stages: its in-memory state, its artefacts on disk, a chain of stages over it.

`FrameWork` is the state a chain of stages shares inside one process. The named artefacts of the
stage table (`rpp_tasks.session.table.ARTEFACTS`) have one save and one load each
(`ARTEFACT_IO`); `run_chain` loads what the first stages of a chain read, runs the adapters
(timed), and saves what they wrote: products always, checkpoints only when a later stage (in another
process) reads them or intermediates are kept. `frame_summary` is the frame's typed summary
(`rpp_tasks.session.summary.FrameSummary`) written to ``summary.json``.

Per-frame files (``frames/<stem>/``)::

    check.json        FrameMeta of the frame (pixel scale and WCS status after astrometry)
    calibrated.fits   float32 image (header and WCS kept, HISTORY of steps) + MASK extension
    background.fits   BKG and RMS images (checkpoint)
    sources.ecsv      detections (checkpoint)
    catalog.ecsv/.fits  photometry catalogue
    summary.json      per-stage CPU/wall seconds, counts, FWHM, background, limiting magnitude
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rpp_tasks.session.table import StageTable
from rpp_tasks.session.workdir import Session, read_json, write_json_atomic

__all__ = ["FrameWork", "ARTEFACT_IO", "run_chain", "frame_summary"]

log = logging.getLogger(__name__)


@dataclass
class FrameWork:
    """In-memory state of one frame between the stages of a chain (never crosses processes)."""

    stem: str
    raw_path: Path
    outdir: Path
    session: Session | None = None
    masters: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    data: np.ndarray | None = None
    header: Any = None
    mask: np.ndarray | None = None
    background: np.ndarray | None = None
    rms: np.ndarray | None = None
    bkg_summary: dict = field(default_factory=dict)
    sources: Any = None
    catalog: Any = None
    results: dict = field(default_factory=dict)  # stage -> small summary dict (incl. timings)
    stage: str | None = None  # the stage running now (the one a rejection is recorded under)


# =============================================================================== artefact I/O
def _load_raw(fw: FrameWork) -> None:
    fw.results = {}  # a chain that starts from the raw frame starts clean


def _load_masters(fw: FrameWork) -> None:
    if not fw.masters and fw.session is not None:
        fw.masters = fw.session.read_json("masters.json", {}) or {}


def _save_masters(fw: FrameWork) -> None:  # written by the session-scope stage itself
    pass


def _load_check(fw: FrameWork) -> None:
    fw.meta = read_json(fw.outdir / "check.json", {}) or {}


def _save_check(fw: FrameWork) -> None:
    write_json_atomic(fw.outdir / "check.json", fw.meta)


def _save_calibrated(fw: FrameWork) -> None:
    from astropy.io import fits

    path = fw.outdir / "calibrated.fits"
    hdr = fw.header.copy()
    for key in ("BZERO", "BSCALE", "BLANK"):
        hdr.remove(key, ignore_missing=True, remove_all=True)
    hdus = [fits.PrimaryHDU(np.asarray(fw.data, dtype=np.float32), header=hdr)]
    if fw.mask is not None:
        hdus.append(fits.ImageHDU(fw.mask.astype(np.uint8), name="MASK"))
    tmp = path.with_suffix(".fits.tmp")
    fits.HDUList(hdus).writeto(tmp, overwrite=True, output_verify="silentfix")
    os.replace(tmp, path)


def _load_calibrated(fw: FrameWork) -> None:
    from astropy.io import fits

    with fits.open(fw.outdir / "calibrated.fits", memmap=False) as hdul:
        fw.data = hdul[0].data.astype(np.float32)
        fw.header = hdul[0].header.copy()
        fw.mask = (
            hdul["MASK"].data.astype(bool) if "MASK" in hdul else np.zeros(fw.data.shape, bool)
        )


def _save_background(fw: FrameWork) -> None:
    from astropy.io import fits

    hdr = fits.Header()
    for k, v in fw.bkg_summary.items():
        hdr[k[:8].upper()] = v
    fits.HDUList(
        [
            fits.PrimaryHDU(header=hdr),
            fits.ImageHDU(fw.background.astype(np.float32), name="BKG"),
            fits.ImageHDU(fw.rms.astype(np.float32), name="RMS"),
        ]
    ).writeto(fw.outdir / "background.fits", overwrite=True)


def _load_background(fw: FrameWork) -> None:
    from astropy.io import fits

    with fits.open(fw.outdir / "background.fits", memmap=False) as hdul:
        fw.background = hdul["BKG"].data.astype(np.float32)
        fw.rms = hdul["RMS"].data.astype(np.float32)
    fw.bkg_summary = {
        k: v
        for k, v in (fw.results.get("background") or {}).items()
        if k in ("background_adu", "background_rms_adu", "map_sigma_adu")
    }


def _save_sources(fw: FrameWork) -> None:
    fw.sources.write(fw.outdir / "sources.ecsv", format="ascii.ecsv", overwrite=True)


def _load_sources(fw: FrameWork) -> None:
    from astropy.table import Table

    fw.sources = Table.read(fw.outdir / "sources.ecsv", format="ascii.ecsv")


def _save_catalog(fw: FrameWork) -> None:
    from astropy.io.fits.verify import VerifyWarning

    from rpp_tasks.session.ecsv_fast import write_ecsv

    cat = fw.catalog
    write_ecsv(cat, fw.outdir / "catalog.ecsv")  # astropy's ECSV, the same bytes, faster
    out = cat.copy(copy_data=False)
    out.meta = {
        k: v for k, v in cat.meta.items() if isinstance(v, (str, int, float, bool)) or v is None
    }
    with warnings.catch_warnings():  # long meta keys become HIERARCH cards, which is what we want
        warnings.simplefilter("ignore", VerifyWarning)
        out.write(fw.outdir / "catalog.fits", format="fits", overwrite=True)


def _load_catalog(fw: FrameWork) -> None:
    from astropy.table import Table

    fw.catalog = Table.read(fw.outdir / "catalog.ecsv", format="ascii.ecsv")


def _nothing(fw: FrameWork) -> None:
    pass


#: artefact name -> (save, load): the one place each artefact is written and read.
ARTEFACT_IO: dict[str, tuple[Callable[[FrameWork], None], Callable[[FrameWork], None]]] = {
    "raw": (_nothing, _load_raw),
    "masters": (_save_masters, _load_masters),
    "check": (_save_check, _load_check),
    "calibrated": (_save_calibrated, _load_calibrated),
    "background": (_save_background, _load_background),
    "sources": (_save_sources, _load_sources),
    "catalog": (_save_catalog, _load_catalog),
    # session-wide, written and read by the ``targets`` stage and the record step themselves
    "targets": (_nothing, _nothing),
}


# =============================================================================== the chain
def _utcnow_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _record(fw: FrameWork, stage: str, cpu_s: float, wall_s: float, result: dict) -> None:
    fw.results[stage] = {
        "cpu_s": round(cpu_s, 4),
        "wall_s": round(wall_s, 4),
        "finished_utc": _utcnow_iso(),
        **(result or {}),
    }
    keys = ("n_sources", "fwhm_px", "n_pixels", "background_adu", "steps")
    short = " ".join(f"{k}={_fmt(result[k])}" for k in keys if result and k in result)
    log.info("[%s] %-10s %6.2f CPU-s %6.2f s  %s", fw.stem, stage, cpu_s, wall_s, short)


def run_chain(
    fw: FrameWork,
    obs,
    names: Sequence[str],
    table: StageTable,
    *,
    keep_intermediate: bool = True,
    time_write: bool = False,
    on_stage=None,
) -> None:
    """Run the consecutive frame stages ``names`` of ``table`` on one frame.

    Before each stage, the artefacts it reads that no earlier stage of the chain produced are
    loaded from the frame folder (with the earlier stages' results from ``summary.json``). After
    the chain, the artefacts it wrote are saved: products always, checkpoints when a later stage
    of the table reads them or ``keep_intermediate``. ``FrameRejected`` and other errors propagate
    (the caller records them); ``fw.results`` holds the timings and results of the stages that ran.
    ``time_write`` records the saving as a ``write`` step (the one-process chain of
    ``reduce_frame``). ``on_stage(name)`` is called as each stage starts (the frame pool's
    worker marker, `rpp_tasks.session.pool`).
    """
    stages = table.chain(tuple(names))
    if "raw" not in stages[0].reads:  # resume: earlier stages' results and timings
        prev = read_json(fw.outdir / "summary.json", {}) or {}
        fw.results = dict(prev.get("stages") or {})
    available: set[str] = set()
    written: list[str] = []
    for stage in stages:
        fw.stage = stage.name
        if on_stage is not None:
            on_stage(stage.name)
        for name in stage.reads:
            if name not in available:
                ARTEFACT_IO[name][1](fw)
                available.add(name)
        fn = stage.function()
        c0, w0 = time.process_time(), time.perf_counter()
        res = fn(fw, obs)
        _record(fw, stage.name, time.process_time() - c0, time.perf_counter() - w0, res)
        available.update(stage.writes)
        written += [a for a in stage.writes if a not in written]
    later = table.read_after(stages[-1].name)
    to_save = [
        a
        for a in written
        if table.artefacts[a].scope == "frame"
        and (table.artefacts[a].product or keep_intermediate or a in later)
    ]
    if time_write:
        fw.stage = "write"
    c0, w0 = time.process_time(), time.perf_counter()
    for name in to_save:
        ARTEFACT_IO[name][0](fw)
    if time_write:
        _record(fw, "write", time.process_time() - c0, time.perf_counter() - w0, {})


# =============================================================================== summary
def frame_summary(
    fw: FrameWork,
    obs,
    *,
    status: str = "ok",
    reason: str | None = None,
    stage: str | None = None,
) -> dict:
    """The frame's summary (`~rpp_tasks.session.summary.FrameSummary.from_work`) as a dict."""
    from rpp_tasks.session.summary import FrameSummary

    return FrameSummary.from_work(fw, obs, status=status, reason=reason, stage=stage).to_dict()
