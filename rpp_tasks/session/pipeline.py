"""The reduction chain: an ordered list of per-frame stages and two drivers.

* `reduce_frame` runs every stage of one frame in memory and writes the products once
  (what ``rpp reduce`` and the benchmark use);
* `run_stage` runs one stage for all frames of a session, reading the previous stage's
  checkpoint files from the session work folder and writing its own (what each Airflow task
  calls, so tasks hand each other paths, never data).

Both drivers call the same step functions, so there is one implementation of the science. A frame
that fails is recorded as rejected with the stage and reason and the other frames go on.

Per-frame files (``frames/<stem>/``)::

    check.json        FrameMeta of the raw frame
    calibrated.fits   float32 image (header and WCS kept, HISTORY of steps) + MASK extension
    background.fits   BKG and RMS images (checkpoint for the per-stage driver only)
    sources.ecsv      detections
    catalog.ecsv/.fits  photometry catalogue
    summary.json      per-stage CPU/wall seconds, counts, FWHM, background, limiting magnitude
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rpp_tasks import __version__
from rpp_tasks.config import ObservatoryConfig
from rpp_tasks.exceptions import FrameRejected
from rpp_tasks.session.workdir import Session, read_json, write_json_atomic

__all__ = [
    "FRAME_STAGES",
    "FrameWork",
    "reduce_frame",
    "open_session",
    "prepare_masters",
    "run_stage",
    "reduce_session",
    "frame_summary",
]

log = logging.getLogger(__name__)

#: Per-frame stages in the order they run (BANZAI-style ordered list).
#: astrometry updates the header WCS before photometry computes RA/Dec; zero_point, enrich and transients
#: (rpp_tasks.session.skycal) update the catalogue after it and never stop a frame when a service is down.
FRAME_STAGES = (
    "calibrate",
    "cosmics",
    "background",
    "detect",
    "astrometry",
    "photometry",
    "zero_point",
    "enrich",
    "transients",
)
_PHOT = FRAME_STAGES.index("photometry")


# =============================================================================== state
@dataclass
class FrameWork:
    """Mutable in-memory state of one frame between stages (never crosses a process boundary)."""

    stem: str
    raw_path: Path
    outdir: Path
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
    notes: list = field(default_factory=list)


class _Timer:
    def __enter__(self):
        self.c0, self.w0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu_s = time.process_time() - self.c0
        self.wall_s = time.perf_counter() - self.w0
        return False


# =============================================================================== steps
def check_frame(path: Path, obs: ObservatoryConfig) -> tuple[Any, dict]:
    """Read a raw frame (Bayer -> luminance, MEF amplifiers mosaicked) and normalise its header.

    Raises `FrameRejected` with a clear reason (unreadable file, missing EXPTIME, constant image...).
    """
    from rpp_tasks.inputs.header import normalize_header, normalize_kwargs_from_config
    from rpp_tasks.inputs.reader import read_frame

    raw = read_frame(
        path, bayer_pattern=obs.camera.bayer_pattern, saturation_adu=obs.camera.saturation_adu
    )
    meta = normalize_header(raw.header, path=str(path), **normalize_kwargs_from_config(obs))
    md = meta.to_dict()
    md["notes"] = list(raw.notes)
    return (raw.data, raw.header), md


def step_calibrate(fw: FrameWork, obs: ObservatoryConfig, masters: dict) -> dict:
    """Raw frame -> calibrated image (bias, dark scaled by exposure, flat), saturation + bad-pixel mask."""
    from rpp_tasks.stages import calibration

    (data, header), meta = check_frame(fw.raw_path, obs)
    fw.meta.update(meta)
    band = meta.get("band")
    entries = {
        "bias": masters.get("bias"),
        "dark": masters.get("dark"),
        "flat": (masters.get("flat") or {}).get(band),
    }
    bias, _, _ = _load_master(entries["bias"])
    dark, dark_hdr, _ = _load_master(entries["dark"])
    flat, _, flat_mask = _load_master(entries["flat"])
    for kind, img in (("bias", bias), ("dark", dark), ("flat", flat)):
        if img is not None and img.shape != data.shape:
            raise FrameRejected(
                f"master {kind} {img.shape[::-1]} does not match the frame {data.shape[::-1]} "
                f"(binning or sub-frame differs): {entries[kind]['path']}",
                path=str(fw.raw_path),
                stage="calibrate",
            )
    result = calibration.calibrate_image(
        data,
        exptime_s=meta["exptime_s"] or 0.0,
        bias=bias,
        dark_rate=dark,
        flat=flat,
        saturation_adu=meta["saturation_adu"],
        bad_pixel_mask=flat_mask,
        dark_exptime_s=dark_hdr.get("EXPTIME") if dark_hdr is not None else None,
    )
    fw.data, fw.mask, fw.header = result.image, result.mask, header.copy()
    for step in result.steps:
        fw.header.add_history(f"rpp {__version__}: {step}")
    used = {
        k: {"path": e.get("path"), "source": e.get("source"), "delta_days": e.get("delta_days")}
        for k, e in entries.items()
        if e
    }
    return {
        "steps": list(result.steps),
        "flags": list(result.flags),
        "masters": used,
        "n_masked": int(np.count_nonzero(fw.mask)),
    }


_MASTER_CACHE: dict[str, tuple] = {}


def _load_master(entry: dict | None) -> tuple:
    """``(image, header, mask)`` of a masters.json entry (``(None, None, None)`` when absent), cached per
    process since every frame of a session shares its masters."""
    if not entry or not entry.get("path"):
        return None, None, None
    path = entry["path"]
    if path not in _MASTER_CACHE:
        from rpp_tasks.stages import calibration

        if len(_MASTER_CACHE) > 8:
            _MASTER_CACHE.clear()
        _MASTER_CACHE[path] = calibration.load_master(path)
    return _MASTER_CACHE[path]


def step_cosmics(fw: FrameWork, obs: ObservatoryConfig) -> dict:
    cfg = obs.stages.cosmics
    if not cfg.enabled:
        return {"enabled": False, "n_pixels": 0}
    from rpp_tasks.stages import background, cosmics

    gain, rn = fw.meta["gain_e_per_adu"], fw.meta["read_noise_e"]
    noise = background.check_noise_model(
        fw.data, gain_e_per_adu=gain, read_noise_e=rn, mask=fw.mask
    )
    if noise.ratio > 1.5:
        log.warning(
            "[%s] measured sky noise %.1f ADU is %.1fx the camera model (gain %.3g e-/ADU, read noise "
            "%.3g e-): check camera.gain_e_per_adu / read_noise_e; cosmic-ray thresholds use an "
            "effective read noise of %.3g e-",
            fw.stem,
            noise.measured_sigma_adu,
            noise.ratio,
            gain,
            rn,
            noise.effective_read_noise_e,
        )
        rn = noise.effective_read_noise_e
    res = cosmics.clean_cosmic_rays(
        fw.data,
        gain_e_per_adu=gain,
        read_noise_e=rn,
        saturation_adu=fw.meta["saturation_adu"],
        sigclip=cfg.sigclip,
        sigfrac=cfg.sigfrac,
        objlim=cfg.objlim,
        mask=fw.mask,
    )
    fw.data = res.cleaned
    fw.mask = fw.mask | res.mask if fw.mask is not None else res.mask
    fw.header.add_history(f"rpp {__version__}: cosmic rays cleaned ({res.n_pixels} px)")
    return {
        "enabled": True,
        "n_pixels": int(res.n_pixels),
        "noise_model_ratio": round(noise.ratio, 3),
        "read_noise_used_e": round(float(rn), 3),
    }


def step_background(fw: FrameWork, obs: ObservatoryConfig) -> dict:
    from rpp_tasks.stages import background

    cfg = obs.stages.background
    res = background.estimate_background(
        fw.data, mask=fw.mask, box_size_px=cfg.box_size_px, filter_size=cfg.filter_size
    )
    fw.background, fw.rms = res.background, res.rms
    fw.bkg_summary = {
        "background_adu": float(res.global_median_adu),
        "background_rms_adu": float(res.global_rms_adu),
    }
    return dict(fw.bkg_summary)


def step_detect(fw: FrameWork, obs: ObservatoryConfig) -> dict:
    from rpp_tasks.stages import detection

    cfg = obs.stages.detection
    data_sub = fw.data - fw.background
    # with PSF photometry, faint stars on the wings of bright ones are found on the fit residual
    # (photometry.psf_photometry_with_residual_detection), so the whole-frame peak search is not needed
    fw.sources = detection.detect_sources(
        data_sub,
        fw.rms,
        method=cfg.method,
        threshold_sigma=cfg.threshold_sigma,
        fwhm_px=cfg.fwhm_guess_px,
        mask=fw.mask,
        min_area_px=cfg.min_area_px,
        deblend_cont=cfg.deblend_cont,
        peak_search=not obs.stages.photometry.psf,
        saturation_adu=fw.meta["saturation_adu"] - float(fw.bkg_summary["background_adu"]),
        overwrite=True,  # data_sub is ours
    )
    n = len(fw.sources)
    if n == 0:
        raise FrameRejected(
            "no sources detected (empty field, closed dome or clouds?)",
            path=str(fw.raw_path),
            stage="detect",
        )
    return {"n_sources": n, "method": cfg.method}


def step_photometry(fw: FrameWork, obs: ObservatoryConfig) -> dict:
    """FWHM, aperture photometry (1.1, 1.3 FWHM and fixed radius), ePSF photometry, S/N flags, RA/Dec."""
    from rpp_tasks.stages import photometry, psf

    cfg = obs.stages.photometry
    meta = fw.meta
    gain, exptime = meta["gain_e_per_adu"], meta["exptime_s"]
    res = photometry.measure_frame(
        None,  # made from image - background inside, freed as soon as possible
        fw.rms,
        fw.sources,
        gain_e_per_adu=gain,
        exptime_s=exptime,
        saturation_adu=meta["saturation_adu"],
        fixed_radius_px=cfg.fixed_radius_px,
        annulus_fwhm=cfg.annulus_fwhm,
        mask=fw.mask,
        image=fw.data,
        background=fw.background,
        psf=cfg.psf,
        psf_max_stars=max(cfg.epsf_max_stars, 250),
        frame=fw.stem,
    )
    if res.psf is None:
        raise FrameRejected(
            "FWHM could not be measured (no isolated unsaturated stars)",
            path=str(fw.raw_path),
            stage="photometry",
        )
    cat, fwhm = (
        res.catalog,
        psf.FwhmResult(
            res.fwhm_px, float("nan"), res.psf.n_stars, float("nan"), res.psf.beta, "field PSF"
        ),
    )
    epsf_info = {k: v for k, v in res.info.items() if k not in ("fwhm_px",)}
    _add_sky_coordinates(cat, fw.header)
    scale = meta.get("pixel_scale_arcsec")
    r_lim = 1.3 * fwhm.fwhm_px
    apc = (res.info.get("aperture_corrections") or {}).get("1p3fwhm", {}).get("median_mag", 0.0)
    noise = fw.bkg_summary["background_rms_adu"] * np.sqrt(np.pi) * r_lim * 10 ** (0.4 * apc)
    lim_mag = (
        float(-2.5 * np.log10(5.0 * noise / exptime)) if exptime and noise > 0 else float("nan")
    )
    cat.meta.update(
        {
            "rpp_version": __version__,
            "fwhm_px": float(fwhm.fwhm_px),
            "exptime_s": exptime,
            "gain_e_per_adu": gain,
            "observatory": obs.name,
            "config_hash": obs.config_hash,
            "frame": fw.stem,
            "band": meta.get("band"),
        }
    )
    fw.catalog = cat
    q = np.asarray(cat["quality"]).astype(str)
    return {
        "fwhm_px": float(fwhm.fwhm_px),
        "fwhm_err_px": float(getattr(fwhm, "fwhm_err_px", np.nan)),
        "fwhm_arcsec": float(fwhm.fwhm_px * scale) if scale else None,
        "fwhm_n_stars": int(fwhm.n_stars),
        "n_sources": len(cat),
        "n_good": int(np.sum(q == "good")),
        "n_marginal": int(np.sum(q == "marginal")),
        "n_poor": int(np.sum(q == "poor")),
        "limiting_mag_inst": lim_mag,
        "limiting_mag_definition": "5-sigma point source in a 1.3 FWHM aperture from the background RMS, "
        "instrumental (per second, before zero point)",
        **epsf_info,
    }


def _add_sky_coordinates(cat, header) -> None:
    """RA/Dec columns from the header WCS when it is valid (NaN otherwise)."""
    from rpp_tasks.inputs.wcs import header_wcs

    check = header_wcs(header)
    ra = np.full(len(cat), np.nan)
    dec = np.full(len(cat), np.nan)
    if check.wcs is not None:
        x = cat["x_psf"] if "x_psf" in cat.colnames else cat["x_centroid"]
        y = cat["y_psf"] if "y_psf" in cat.colnames else cat["y_centroid"]
        x = np.where(np.isfinite(x), x, cat["x_centroid"])
        y = np.where(np.isfinite(y), y, cat["y_centroid"])
        ra, dec = check.wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
    cat["ra"] = ra
    cat["dec"] = dec
    cat.meta["wcs_status"] = check.status


_STEPS: dict[str, Callable] = {
    "cosmics": step_cosmics,
    "background": step_background,
    "detect": step_detect,
    "photometry": step_photometry,
}


def _register_skycal_steps() -> None:
    from rpp_tasks.session import skycal

    _STEPS.update(
        {
            "astrometry": skycal.step_astrometry,
            "zero_point": skycal.step_zero_point,
            "enrich": skycal.step_enrich,
            "transients": skycal.step_transients,
        }
    )


_register_skycal_steps()


# =============================================================================== checkpoint I/O
def _save_calibrated(fw: FrameWork) -> Path:
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
    return path


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
    fw.bkg_summary = (
        read_json(fw.outdir / "summary.json", {}).get("stages", {}).get("background", {})
    )


def _save_catalog(fw: FrameWork) -> dict:
    from astropy.io.fits.verify import VerifyWarning

    cat = fw.catalog
    ecsv, fitsf = fw.outdir / "catalog.ecsv", fw.outdir / "catalog.fits"
    cat.write(ecsv, format="ascii.ecsv", overwrite=True)
    out = cat.copy(copy_data=False)
    out.meta = {
        k: v for k, v in cat.meta.items() if isinstance(v, (str, int, float, bool)) or v is None
    }
    with warnings.catch_warnings():  # long meta keys become HIERARCH cards, which is what we want
        warnings.simplefilter("ignore", VerifyWarning)
        out.write(fitsf, format="fits", overwrite=True)
    return {"catalog": str(ecsv), "catalog_fits": str(fitsf)}


# =============================================================================== drivers
def _record(fw: FrameWork, stage: str, timer: _Timer, result: dict) -> None:
    fw.results[stage] = {
        "cpu_s": round(timer.cpu_s, 4),
        "wall_s": round(timer.wall_s, 4),
        "finished_utc": _utcnow_iso(),
        **(result or {}),
    }
    log.info(
        "[%s] %-10s %6.2f CPU-s %6.2f s  %s",
        fw.stem,
        stage,
        timer.cpu_s,
        timer.wall_s,
        _short(result),
    )


def _utcnow_iso() -> str:
    import datetime as dt

    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _short(result: dict) -> str:
    keys = ("n_sources", "fwhm_px", "n_pixels", "background_adu", "steps")
    return " ".join(f"{k}={_fmt(result[k])}" for k in keys if result and k in result)


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def frame_summary(
    fw: FrameWork,
    obs: ObservatoryConfig,
    *,
    status: str = "ok",
    reason: str | None = None,
    stage: str | None = None,
) -> dict:
    """JSON-safe per-frame summary (the contract with the report, archive and results DB)."""
    phot = fw.results.get("photometry", {})
    stages = {k: v for k, v in fw.results.items()}
    return {
        "frame": fw.stem,
        "raw_path": str(fw.raw_path),
        "status": status,
        "reason": reason,
        "failed_stage": stage,
        "observatory": obs.name,
        "config_hash": obs.config_hash,
        "rpp_version": __version__,
        "object": fw.meta.get("object"),
        "band": fw.meta.get("band"),
        "filter_raw": fw.meta.get("filter_raw"),
        "exptime_s": fw.meta.get("exptime_s"),
        "date_obs": fw.meta.get("date_obs"),
        "mjd_obs": fw.meta.get("mjd_obs"),
        "wcs_status": fw.results.get("astrometry", {}).get("wcs_status")
        or fw.meta.get("wcs_status"),
        "pixel_scale_arcsec": fw.results.get("astrometry", {}).get("pixel_scale_arcsec")
        or fw.meta.get("pixel_scale_arcsec"),
        "n_sources": phot.get("n_sources", fw.results.get("detect", {}).get("n_sources")),
        "fwhm_px": phot.get("fwhm_px"),
        "fwhm_arcsec": phot.get("fwhm_arcsec"),
        "background_adu": fw.bkg_summary.get("background_adu"),
        "background_rms_adu": fw.bkg_summary.get("background_rms_adu"),
        "limiting_mag_inst": phot.get("limiting_mag_inst"),
        "wcs_source": fw.results.get("astrometry", {}).get("wcs_source"),
        "astrometric_rms_arcsec": fw.results.get("astrometry", {}).get("astrometric_rms_arcsec"),
        "zp_mag": fw.results.get("zero_point", {}).get("zp_mag"),
        "zp_err_mag": fw.results.get("zero_point", {}).get("zp_err_mag"),
        "n_zp_stars": fw.results.get("zero_point", {}).get("n_zp_stars"),
        "airmass": fw.results.get("zero_point", {}).get("airmass"),
        "n_transient_candidates": fw.results.get("transients", {}).get("n_candidates"),
        "cpu_s_total": round(sum(v.get("cpu_s", 0.0) for v in stages.values()), 4),
        "wall_s_total": round(sum(v.get("wall_s", 0.0) for v in stages.values()), 4),
        "stages": stages,
        "calibrated": str(fw.outdir / "calibrated.fits")
        if (fw.outdir / "calibrated.fits").exists()
        else None,
        "catalog": str(fw.outdir / "catalog.ecsv")
        if (fw.outdir / "catalog.ecsv").exists()
        else None,
    }


def reduce_frame(
    path: str | os.PathLike,
    obs: ObservatoryConfig,
    workdir: str | os.PathLike,
    *,
    masters: dict | None = None,
    keep_intermediate: bool = False,
) -> dict:
    """Run the whole chain on one science frame in memory; write calibrated image, catalogue, summary.

    Parameters
    ----------
    path : path-like
        Raw FITS frame (never modified).
    obs : ObservatoryConfig
    workdir : path-like
        Output folder for this frame (created).
    masters : dict, optional
        ``masters.json`` content (paths of master bias/dark/flat); none = no calibration frames.
    keep_intermediate : bool
        Also write ``background.fits`` and ``sources.ecsv``.

    Returns
    -------
    summary : dict
        As written to ``summary.json``. ``status`` is ``"rejected"`` (with ``reason`` and
        ``failed_stage``) when the frame could not be reduced; nothing is raised for a bad frame.
    """
    path = Path(path)
    outdir = Path(workdir)
    outdir.mkdir(parents=True, exist_ok=True)
    fw = FrameWork(stem=_stem(path), raw_path=path, outdir=outdir)
    stage = "calibrate"
    try:
        with _Timer() as t:
            res = step_calibrate(fw, obs, masters or {})
        _record(fw, "calibrate", t, res)
        for stage in FRAME_STAGES[1:]:
            with _Timer() as t:
                res = _STEPS[stage](fw, obs)
            _record(fw, stage, t, res)
        stage = "write"
        with _Timer() as t:
            _save_checkpoints(fw, FRAME_STAGES, keep_intermediate=keep_intermediate)
        _record(fw, "write", t, {})
        summary = frame_summary(fw, obs)
    except FrameRejected as exc:
        summary = frame_summary(
            fw, obs, status="rejected", reason=exc.reason, stage=exc.stage or stage
        )
        log.warning("[%s] rejected at %s: %s", fw.stem, exc.stage or stage, exc.reason)
    except Exception as exc:  # a bad frame must not stop the others; the traceback goes to the log
        log.error("[%s] failed at %s: %s\n%s", fw.stem, stage, exc, traceback.format_exc())
        summary = frame_summary(
            fw, obs, status="failed", reason=f"{type(exc).__name__}: {exc}", stage=stage
        )
    write_json_atomic(outdir / "summary.json", summary)
    return summary


def _stem(path: Path) -> str:
    from rpp_tasks.inputs.header import frame_stem

    return frame_stem(path)


# ------------------------------------------------------------------------------- session level
def open_session(
    raw_dir: str | os.PathLike,
    obs: ObservatoryConfig,
    *,
    work_root=None,
    session_id: str | None = None,
) -> Session:
    """Create the session work folder and its manifest (frames grouped by type, band, exposure, binning).

    Only headers are read here. Files that are not readable FITS are listed in ``rejected.json`` with
    the reason; they never stop the session.
    """
    from rpp_tasks.inputs import frames

    raw_dir = Path(raw_dir)
    work_root = Path(work_root) if work_root is not None else obs.resolve_path("work")
    session = Session.create(
        raw_dir,
        observatory=obs.name,
        work_root=work_root,
        session_id=session_id,
        incoming_root=obs.resolve_path("incoming"),
    )
    # every file of the folder gets an outcome in the plan (frames, rejected with the reason, or
    # ignored with the reason: session.extensions, ignore patterns); stems are unique
    plan = frames.group_session(raw_dir, obs)
    manifest = plan.to_dict()
    manifest["science"] = [
        dict(f, stem=f.get("stem") or _stem(Path(f["path"])))
        for f in manifest.get("frames", [])
        if f.get("imagetyp") == "science"
    ]
    for kind in ("bias", "dark", "flat"):
        manifest[kind] = [
            f["path"] for f in manifest.get("frames", []) if f.get("imagetyp") == kind
        ]
    session.write_json("manifest.json", manifest)
    session.write_json(
        "rejected.json",
        {
            r.get("stem") or _stem(Path(r["path"])): {
                "reason": r["reason"],
                "stage": "validate",
                "path": r["path"],
            }
            for r in manifest.get("rejected", [])
        },
    )
    for f in manifest["science"]:  # a re-run starts clean
        session.unreject(f["stem"])
    log.info(
        "[%s] session opened: %d science, %d bias, %d dark, %d flat, %d rejected files",
        session.session_id,
        len(manifest["science"]),
        len(manifest.get("bias", [])),
        len(manifest.get("dark", [])),
        len(manifest.get("flat", [])),
        len(manifest.get("rejected", [])),
    )
    return session


def prepare_masters(session: Session, obs: ObservatoryConfig) -> dict:
    """Build master bias/dark/flat from the session's calibration frames, or take the nearest masters
    of the same camera and binning (and band, for flats) from the master library. Writes masters.json."""
    from rpp_tasks.stages import calibration

    manifest = session.read_json("manifest.json", {})
    summary = calibration.run_masters(
        manifest,
        out_dir=session.masters_dir(),
        camera=obs.camera.name,
        library_root=obs.resolve_path("master_library")
        if obs.stages.calibration.use_master_library
        else None,
        combine=obs.stages.calibration.combine,
        clip_sigma=obs.stages.calibration.clip_sigma,
        max_age_days=obs.stages.calibration.max_library_age_days,
        read_kwargs={"bayer_pattern": obs.camera.bayer_pattern},
    )
    session.write_json("masters.json", summary)
    return summary


def _save_checkpoints(fw: FrameWork, stages: tuple[str, ...], *, keep_intermediate: bool) -> None:
    """Write what later stages (possibly other processes) will read, and the final products."""
    if "calibrate" in stages or "cosmics" in stages or "astrometry" in stages:
        _save_calibrated(fw)
    finishes = "photometry" in stages
    if "background" in stages and (keep_intermediate or not finishes):
        _save_background(fw)
    if "detect" in stages and (keep_intermediate or not finishes):
        fw.sources.write(fw.outdir / "sources.ecsv", format="ascii.ecsv", overwrite=True)
    if finishes or any(s in stages for s in FRAME_STAGES[_PHOT + 1 :]):
        _save_catalog(fw)


def _frame_job(
    workdir: str,
    stem: str,
    raw_path: str,
    stages: tuple[str, ...],
    obs: ObservatoryConfig,
    masters: dict,
    keep_intermediate: bool,
) -> dict:
    """Run ``stages`` of one frame from its checkpoint; write the next checkpoint (runs in a worker)."""
    session = Session.load(workdir)
    outdir = session.frame_dir(stem)
    fw = FrameWork(stem=stem, raw_path=Path(raw_path), outdir=outdir)
    prev = read_json(outdir / "summary.json", {}) or {}
    fw.results = dict(prev.get("stages", {})) if stages[0] != "calibrate" else {}
    if stages[0] != "calibrate":
        fw.meta = read_json(outdir / "check.json", {}) or {}
    stage = stages[0]
    try:
        i0 = FRAME_STAGES.index(stages[0])
        if i0 >= 1:
            _load_calibrated(fw)
        if 3 <= i0 <= _PHOT:
            _load_background(fw)
        if 4 <= i0 <= _PHOT:
            from astropy.table import Table

            fw.sources = Table.read(outdir / "sources.ecsv", format="ascii.ecsv")
        if i0 > _PHOT:
            from astropy.table import Table

            fw.catalog = Table.read(outdir / "catalog.ecsv", format="ascii.ecsv")
            fw.bkg_summary = dict(fw.results.get("background", {}))
        for stage in stages:
            with _Timer() as t:
                res = (
                    step_calibrate(fw, obs, masters)
                    if stage == "calibrate"
                    else _STEPS[stage](fw, obs)
                )
                if stage == "calibrate":
                    write_json_atomic(outdir / "check.json", fw.meta)
            _record(fw, stage, t, res)
        _save_checkpoints(fw, stages, keep_intermediate=keep_intermediate)
        summary = frame_summary(fw, obs)
    except FrameRejected as exc:
        session.reject(stem, reason=exc.reason, stage=exc.stage or stage, path=raw_path)
        summary = frame_summary(
            fw, obs, status="rejected", reason=exc.reason, stage=exc.stage or stage
        )
    except Exception as exc:
        log.error("[%s] %s failed: %s\n%s", stem, stage, exc, traceback.format_exc())
        session.reject(stem, reason=f"{type(exc).__name__}: {exc}", stage=stage, path=raw_path)
        summary = frame_summary(
            fw, obs, status="failed", reason=f"{type(exc).__name__}: {exc}", stage=stage
        )
    write_json_atomic(outdir / "summary.json", summary)
    return summary


@contextlib.contextmanager
def _main_module_without_path():
    """Hide ``__main__.__file__`` while the frame process pool starts its workers.

    In a task process ``__main__`` is the ``airflow`` command script (or Celery's); multiprocessing's
    forkserver and spawn start methods re-run the main script in every worker, which imports and
    initialises Airflow there (and fails: task processes have no metadata DB), so every frame dies
    with BrokenProcessPool. Without a path the workers import only what the frame job needs
    (``rpp_tasks.session.pipeline``).
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def run_stage(
    session: Session | str | os.PathLike,
    obs: ObservatoryConfig,
    stages: str | tuple[str, ...],
    *,
    workers: int | None = None,
    keep_intermediate: bool = True,
) -> dict:
    """Run one or several consecutive per-frame stages for every frame still in play.

    Frames run in a process pool (``workers``; default ``RPP_WORKERS`` or 2). Returns counts and the
    rejected frames; raises `RuntimeError` only if every frame failed with an unexpected error (a
    systemic problem worth a retry), never for rejected frames.
    """
    session = session if isinstance(session, Session) else Session.load(session)
    stages = (stages,) if isinstance(stages, str) else tuple(stages)
    i0 = FRAME_STAGES.index(stages[0])
    if stages != FRAME_STAGES[i0 : i0 + len(stages)]:
        raise ValueError(f"stages must be consecutive in {FRAME_STAGES}, got {stages}")
    manifest = session.read_json("manifest.json", {})
    masters = session.read_json("masters.json", {}) or {}
    rejected_before = session.rejected()
    jobs = [
        (f["stem"], f["path"])
        for f in manifest.get("science", [])
        if f["stem"] not in rejected_before
    ]
    workers = int(workers or os.environ.get("RPP_WORKERS", 2))
    t0 = time.perf_counter()
    log.info(
        "[%s] %s: %d frames, %d workers", session.session_id, "+".join(stages), len(jobs), workers
    )
    summaries = []
    args = [
        (str(session.workdir), stem, raw, stages, obs, masters, keep_intermediate)
        for stem, raw in jobs
    ]
    if workers <= 1 or len(jobs) <= 1:
        summaries = [_frame_job(*a) for a in args]
    else:
        import multiprocessing as mp

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["rpp_tasks.session.pipeline", "numpy", "astropy.io.fits"])
        with (
            _main_module_without_path(),
            ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool,
        ):
            futures = [pool.submit(_frame_job, *a) for a in args]
            for i, fut in enumerate(as_completed(futures), 1):
                s = fut.result()
                summaries.append(s)
                log.info(
                    "[%s] %s %d/%d frames done (%s %s)",
                    session.session_id,
                    "+".join(stages),
                    i,
                    len(jobs),
                    s["frame"],
                    s["status"],
                )
    n_ok = sum(s["status"] == "ok" for s in summaries)
    failed = [s for s in summaries if s["status"] == "failed"]
    out = {
        "stages": list(stages),
        "n_frames": len(jobs),
        "n_ok": n_ok,
        "n_rejected": sum(s["status"] == "rejected" for s in summaries),
        "n_failed": len(failed),
        "wall_s": round(time.perf_counter() - t0, 3),
        "rejected": {
            s["frame"]: {"reason": s["reason"], "stage": s["failed_stage"]}
            for s in summaries
            if s["status"] != "ok"
        },
    }
    if jobs and len(failed) == len(jobs):
        raise RuntimeError(
            f"{'+'.join(stages)} failed for every frame; first error: {failed[0]['reason']}"
        )
    return out


def reduce_session(
    raw_dir: str | os.PathLike,
    obs: ObservatoryConfig,
    *,
    work_root=None,
    session_id: str | None = None,
    workers: int | None = None,
) -> dict:
    """Open a session, build/choose masters, run every per-frame stage; write session_summary.json."""
    t0 = time.perf_counter()
    session = open_session(raw_dir, obs, work_root=work_root, session_id=session_id)
    masters = prepare_masters(session, obs)
    result = run_stage(session, obs, FRAME_STAGES, workers=workers, keep_intermediate=False)
    return summarize_session(
        session,
        obs,
        extra={"masters": masters, "wall_s": round(time.perf_counter() - t0, 3), "run": result},
    )


def summarize_session(
    session: Session, obs: ObservatoryConfig, *, extra: dict | None = None
) -> dict:
    """Collect the frame summaries into ``session_summary.json``."""
    manifest = session.read_json("manifest.json", {})
    frames_out = []
    for f in manifest.get("science", []):
        s = read_json(session.path("frames", f["stem"], "summary.json"))
        if s is None:
            rej = session.rejected().get(f["stem"], {})
            s = {
                "frame": f["stem"],
                "raw_path": f["path"],
                "status": "rejected" if rej else "pending",
                "reason": rej.get("reason"),
                "failed_stage": rej.get("stage"),
            }
        frames_out.append(s)
    ok = [s for s in frames_out if s.get("status") == "ok"]
    summary = {
        "observatory": obs.name,
        "session_id": session.session_id,
        "raw_dir": str(session.raw_dir),
        "workdir": str(session.workdir),
        "rpp_version": __version__,
        "config_hash": obs.config_hash,
        "n_science": len(frames_out),
        "n_ok": len(ok),
        "n_rejected": len(frames_out) - len(ok),
        "n_calibration": {k: len(manifest.get(k, [])) for k in ("bias", "dark", "flat")},
        "rejected_files": session.read_json("rejected.json", {}),
        "median_fwhm_arcsec": _median([s.get("fwhm_arcsec") for s in ok]),
        "median_fwhm_px": _median([s.get("fwhm_px") for s in ok]),
        "masters": session.read_json("masters.json", {}) or {},
        "frames": frames_out,
        **(extra or {}),
    }
    session.write_json("session_summary.json", summary)
    try:
        record_results(summary, obs)
    except Exception as exc:  # the results DB is a record, never a reason to lose the products
        log.error("[%s] results database not updated: %s", session.session_id, exc)
        summary["results_db_error"] = str(exc)
        session.write_json("session_summary.json", summary)
    return summary


def night_date_for(mjd: float | None, longitude_deg: float) -> str | None:
    """Local civil night a time belongs to: the date at local noon before it (so 03:00 is last night)."""
    import datetime as dt

    if mjd is None or not np.isfinite(mjd):
        return None
    t = dt.datetime(1858, 11, 17, tzinfo=dt.UTC) + dt.timedelta(days=float(mjd))
    local = t + dt.timedelta(hours=longitude_deg / 15.0) - dt.timedelta(hours=12)
    return local.date().isoformat()


def record_results(summary: dict, obs: ObservatoryConfig, *, url: str | None = None) -> str:
    """Upsert the session, its frames, stage runs and masters into the results database.

    ``url`` defaults to ``RPP_RESULTS_DB_URL`` or ``<work root>/rpp_results.sqlite``. Re-running a
    session updates its rows (stage runs are appended as new attempts).
    """
    import datetime as dt

    from rpp_tasks.outputs import db

    url = url or db.results_url_from_env(db.default_results_url(obs.resolve_path("work")))
    frames_ = summary.get("frames", [])
    mjds = [f.get("mjd_obs") for f in frames_ if f.get("mjd_obs") is not None]
    night = (
        night_date_for(min(mjds), obs.site.longitude_deg) if mjds else None
    ) or dt.datetime.now(dt.UTC).date().isoformat()
    with db.ResultsDB(url) as rdb:
        rdb.create_schema()
        rdb.upsert_session(
            obs.name,
            summary["session_id"],
            night,
            folder=summary.get("raw_dir"),
            status="done" if summary.get("n_ok") else "failed",
            finished_utc=dt.datetime.now(dt.UTC),
            n_frames={"science": summary.get("n_science", 0), **summary.get("n_calibration", {})},
            n_rejected=summary.get("n_rejected"),
            summary={k: v for k, v in summary.items() if k != "frames"},
        )
        for f in frames_:
            status = "ok" if f.get("status") == "ok" else "rejected"
            rdb.upsert_frame(
                obs.name,
                summary["session_id"],
                f["frame"],
                raw_path=f.get("raw_path"),
                imagetyp="science",
                band=f.get("band"),
                exptime_s=f.get("exptime_s"),
                mjd_obs=f.get("mjd_obs"),
                status=status,
                reject_reason=f.get("reason"),
                reject_stage=f.get("failed_stage"),
                calibrated_path=f.get("calibrated"),
                catalog_path=f.get("catalog"),
                n_sources=f.get("n_sources"),
                fwhm_px=f.get("fwhm_px"),
                fwhm_arcsec=f.get("fwhm_arcsec"),
                background_adu=f.get("background_adu"),
                background_rms_adu=f.get("background_rms_adu"),
                limiting_mag=f.get("limiting_mag_inst"),
                zp_mag=f.get("zp_mag"),
                zp_err_mag=f.get("zp_err_mag"),
                zp_n_stars=f.get("n_zp_stars"),
            )
            for stage, info in (f.get("stages") or {}).items():
                if not isinstance(info, dict) or "finished_utc" not in info:
                    continue
                end = dt.datetime.fromisoformat(info["finished_utc"])
                rdb.record_stage_run(
                    obs.name,
                    summary["session_id"],
                    stage,
                    frame_stem=f["frame"],
                    status="success",
                    cpu_s=info.get("cpu_s"),
                    wall_s=info.get("wall_s"),
                    started_utc=end - dt.timedelta(seconds=info.get("wall_s") or 0.0),
                    finished_utc=end,
                )
        masters = summary.get("masters") or {}
        entries = [("bias", masters.get("bias")), ("dark", masters.get("dark"))] + [
            (f"flat_{b}", e) for b, e in (masters.get("flat") or {}).items()
        ]
        for kind, e in entries:
            if isinstance(e, dict) and e.get("path"):
                rdb.record_master(
                    obs.name,
                    summary["session_id"],
                    kind,
                    e["path"],
                    from_library=e.get("source") == "library",
                    delta_days=e.get("delta_days"),
                )
    return url


def _median(values):
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.median(v)) if v else None
