"""Session report: the page observers read in the morning, and a ZIP of the session's products.

The report is one self-contained HTML file (``<workdir>/report/report.html``, rendered by
`rpp_tasks.outputs.report_html`); the PNG files of its plots (`rpp_tasks.outputs.plots`,
`rpp_tasks.outputs.field_maps`) are written next to it (``report/*.png``) for the e-mail inline
image and the Telegram photo. Sections:

* the night at a glance (frames reduced, median FWHM, sky, limiting magnitude, sources,
  candidates: the summary's `~rpp_tasks.session.summary.Headline`);
* header facts observers look for, weather keywords when the headers carry them;
* night trends (FWHM, sky, sources and limiting magnitude against time);
* a frame preview (zscale) with the detections and the transient candidates marked;
* magnitude against error (all frames); zero-point fit residuals (calibrated catalogues);
* FWHM and background across the field;
* transient candidates (``frames/<stem>/candidates.ecsv``) and a per-frame table.

`build_report` reads the session summary (`~rpp_tasks.session.summary.SessionSummary`) for every
fact and number, and the frame products (images, catalogues, candidates) only to draw them.
`zip_products` writes the products ZIP; `run_report(session, obs)` is the adapter.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rpp_tasks.outputs.field_maps import measure_field_maps, plot_field_maps
from rpp_tasks.outputs.plots import (
    _finite,
    plot_frame_preview,
    plot_mag_error,
    plot_night_trends,
    plot_zeropoint_residuals,
    zeropoint_stars_from_catalog,
)
from rpp_tasks.outputs.report_html import _fmt, _utc, header_facts, render_report_html
from rpp_tasks.session.summary import FrameSummary, SessionSummary
from rpp_tasks.session.workdir import Session

__all__ = ["ReportResult", "build_report", "zip_products", "site_facts", "run_report"]

log = logging.getLogger(__name__)


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
        5-sigma limit or None) and ``n_candidates`` (None when the transient search had no
        reference).
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


def _frame_dir(workdir: Path, frame: FrameSummary) -> Path:
    if frame.catalog:
        p = Path(frame.catalog).parent
        if p.is_dir():
            return p
    return workdir / "frames" / frame.frame


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
    session_summary: SessionSummary | Mapping[str, Any],
    *,
    workdir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    title: str | None = None,
    site: Mapping[str, Any] | None = None,
    products_zip: str | os.PathLike | None = None,
    saturation_adu: float | None = None,
    max_catalogs: int = 40,
    results_url: str | None = None,
    lightcurve_nights: int = 30,
) -> ReportResult:
    """
    Build the self-contained HTML report of a session and write its plots as PNG files.

    Parameters
    ----------
    session_summary : `~rpp_tasks.session.summary.SessionSummary` or its dict
        Content of ``session_summary.json``.
    workdir : path, optional
        Session work folder (default: the summary's ``workdir``); frame products are read from
        ``frames/<stem>/`` (``calibrated.fits``, ``catalog.ecsv``, ``background.fits``,
        ``candidates.ecsv``).
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
    results_url : str, optional
        The results database: the targets' light curves over the last ``lightcurve_nights``
        nights are drawn from it (`rpp_tasks.outputs.report_target`); none without it.

    Returns
    -------
    result : `ReportResult`
    """
    try:
        summary = SessionSummary.coerce(session_summary)
    except ValueError:
        raise ValueError("build_report needs a session summary with a 'frames' list") from None
    workdir = Path(workdir or summary.workdir or ".")
    out_dir = Path(out_dir) if out_dir else workdir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    frames, ok = summary.frames, summary.ok_frames
    sid = summary.session_id or workdir.name
    flags: list[str] = []
    plots: dict[str, bytes | None] = {}

    def attempt(name, fn):
        try:
            plots[name] = fn()
        except Exception as exc:
            log.warning("[%s] report: %s plot failed: %s", sid, name, exc, exc_info=True)
            flags.append(f"{name}_failed")
            plots[name] = None

    # what the frame folders hold for the plots and tables (the facts are in the summary)
    zp_stars, zp_values, candidates, headers, cutouts = {}, {}, {}, {}, {}
    cand_reasons, per_frame, catalogs_read = [], {}, {}
    for f in frames:
        d = _frame_dir(workdir, f)
        per_frame[f.frame] = {
            "zp_mag": f.zp_mag,
            "zp_err_mag": f.zp_err_mag,
            "n_zp_stars": f.n_zp_stars,
            "limiting_mag_cal": f.limiting_mag_cal,
            "n_candidates": f.n_transient_candidates if f.transient_search else None,
        }
        if f.zp_mag is not None and f.ok:
            zp_values[f.frame] = {"zp_mag": f.zp_mag, "zp_err_mag": f.zp_err_mag}
            catalogs_read[f.frame] = _read_table(d / "catalog.ecsv")
            zp_by_type = (f.stages.get("zero_point") or {}).get("zp_by_type")
            stars = zeropoint_stars_from_catalog(catalogs_read[f.frame], zp_by_type)
            if stars is not None and len(stars):
                zp_stars[f.frame] = stars
        cpath = d / "candidates.ecsv"
        if cpath.is_file():
            table = _read_table(cpath)
            cflags = list((table.meta or {}).get("flags") or []) if table is not None else []
            if table is not None and "no_reference" not in cflags:
                candidates[f.frame] = table
                _collect_cutouts(cutouts, f.frame, table, d)
            else:
                cand_reasons.append(", ".join(cflags) or "unreadable")
        if (d / "calibrated.fits").is_file():
            headers[f.frame] = _read_header(d / "calibrated.fits")

    preview_frame = None
    if ok:
        attempt("trends", lambda: plot_night_trends([x.to_dict() for x in frames]))
        best = sorted(ok, key=lambda x: (x.fwhm_px is None, x.fwhm_px or 0.0))[0]
        preview_frame = best.frame
        d = _frame_dir(workdir, best)
        cat = catalogs_read.get(best.frame) or _read_table(d / "catalog.ecsv")
        if (d / "calibrated.fits").is_file():
            data, _, mask = _read_image(d / "calibrated.fits")
            fwhm = _finite(best.fwhm_px) or 3.0
            attempt(
                "preview",
                lambda: plot_frame_preview(
                    data,
                    sources=cat,
                    candidates=candidates.get(preview_frame),
                    mask=mask,
                    marker_radius_px=max(4.0, 2.5 * fwhm),
                    title=f"{preview_frame} · {best.object or ''} · {best.band or ''} · "
                    f"{_fmt(best.exptime_s, '{:g}')} s · {_utc(best.date_obs)} UTC",
                ),
            )
            attempt(
                "field",
                lambda: plot_field_maps(
                    measure_field_maps(
                        data,
                        cat,
                        background=_read_background(d / "background.fits", sid),
                        mask=mask,
                        saturation_adu=saturation_adu,
                        fwhm_guess_px=fwhm,
                    ),
                    pixel_scale_arcsec=_finite(best.pixel_scale_arcsec),
                ),
            )
            psf_model = (best.stages.get("photometry") or {}).get("psf_model")
            if psf_model and cat is not None:
                from rpp_tasks.outputs.psf_plots import plot_psf_map

                attempt(
                    "psf_map",
                    lambda: plot_psf_map(
                        psf_model,
                        image=data,
                        catalog=cat,
                        pixel_scale_arcsec=_finite(best.pixel_scale_arcsec),
                    ),
                )
        else:
            flags.append("no_calibrated_image")
        step = max(1, int(math.ceil(len(ok) / max_catalogs)))
        catalogs = {}
        for f in ok[::step]:
            t = (
                cat
                if f.frame == preview_frame
                else catalogs_read.get(f.frame)
                or _read_table(_frame_dir(workdir, f) / "catalog.ecsv")
            )
            if t is not None:
                catalogs[f.frame] = t
        if catalogs:
            attempt("mag_error", lambda: plot_mag_error(catalogs))
    else:
        flags.append("no_reduced_frame")
    if zp_stars:
        attempt("zeropoint", lambda: plot_zeropoint_residuals(zp_stars, zero_points=zp_values))

    facts = header_facts(headers)
    zip_rel = os.path.relpath(Path(products_zip), out_dir) if products_zip else None
    target_html, target_plots = _target_section(
        summary, results_url, out_dir, lightcurve_nights, flags
    )
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
        zeropoint_reason="; ".join(dict.fromkeys(f.zp_reason for f in ok if f.zp_reason)),
        candidates_reason="; ".join(dict.fromkeys(r for r in cand_reasons if r)),
        target_html=target_html,
    )
    plot_paths = {}
    for name, png in plots.items():
        if png:
            p = out_dir / f"{name}.png"
            p.write_bytes(png)
            plot_paths[name] = str(p)
    plot_paths.update(target_plots)
    html_path = out_dir / "report.html"
    tmp = html_path.with_name(".report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, html_path)
    available = {
        "zeropoint": bool(zp_values),
        "zeropoint_residuals": bool(zp_stars),
        "candidates": bool(candidates),
        "weather": bool(facts["weather"]),
        "targets": bool(summary.targets),
        "target_light_curves": bool(target_plots),
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
        frames=per_frame,
    )


def _target_section(summary, results_url, out_dir: Path, nights: int, flags: list):
    """The targets section (HTML) and the light-curve PNG paths (``lightcurve:<target>``)."""
    from rpp_tasks.outputs.report_target import target_light_curve_plots, target_section_html

    plots: dict = {}
    try:
        plots = target_light_curve_plots(summary, results_url, out_dir, nights=nights)
    except Exception as exc:
        log.warning("[%s] report: target light curves failed: %s", summary.session_id, exc)
        flags.append("target_light_curves_failed")
    paths = {
        f"lightcurve:{t.name}": str(out_dir / f"lightcurve_{k}.png")
        for k, t in enumerate(summary.targets, start=1)
        if t.name in plots
    }
    return target_section_html(summary, plots), paths


def _collect_cutouts(cutouts: dict, frame: str, table, d: Path) -> None:
    """PNG cutouts of a frame's candidates (small files only), keyed by (frame, candidate id)."""
    from rpp_tasks.stages import columns as C

    if C.CUTOUT not in table.colnames:
        return
    for r in table:
        png = d / "cutouts" / str(r[C.CUTOUT])
        if str(r[C.CUTOUT]) and png.is_file() and png.stat().st_size < 200_000:
            key = str(r[C.ID]) if C.ID in table.colnames else str(r[C.CUTOUT])
            cutouts[(frame, key)] = png.read_bytes()


def _read_background(path: Path, sid: str):
    """The sky map of ``background.fits`` (a checkpoint; None when absent or unreadable: the
    field maps then re-estimate it)."""
    if not path.is_file():
        return None
    from astropy.io import fits

    try:
        with fits.open(path, memmap=False) as hdul:
            return np.asarray(hdul["BKG"].data, np.float32) if "BKG" in hdul else None
    except (OSError, ValueError) as exc:
        log.warning("[%s] report: %s unreadable (%s); background re-estimated", sid, path, exc)
        return None


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
    "targets.json",
    "targets.ecsv",
    "comparison_stars.ecsv",
)


def zip_products(
    session: Session, *, out_path: str | os.PathLike | None = None, include_images: bool = True
) -> Path:
    """
    Write a ZIP of the session's products (written atomically; a re-run replaces it).

    Contents, under ``<session_id>/``: the session files (``session_summary.json``,
    ``manifest.json``,
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
    spectra = workdir / "spectra"  # long-slit products (masters' arrays left out)
    for p in sorted(spectra.rglob("*")) if spectra.is_dir() else ():
        if p.is_file() and p.suffix != ".npz" and not p.name.startswith("."):
            members.append((p, f"{root}/{p.relative_to(workdir).as_posix()}"))
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path, arc in members:
            # float32 images barely compress (noise) and deflating GBs would dominate the task:
            # store them
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


def _results_url(obs) -> str | None:
    """The results database the record step wrote (`rpp_tasks.session.lifecycle.record_results`)."""
    from rpp_tasks.outputs import db

    try:
        return db.results_url_from_env(db.default_results_url(obs.resolve_path("work")))
    except Exception as exc:  # a report without light curves, never no report
        log.warning("report: no results database: %s", exc)
        return None


def run_report(session: Session, obs) -> dict:
    """
    Adapter: build ``<workdir>/report/report.html`` (+ PNGs) and
    ``<workdir>/<session>_products.zip``.

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
    build = build_report
    kw = {
        "saturation_adu": getattr(getattr(obs, "camera", None), "saturation_adu", None),
        "results_url": _results_url(obs),  # the targets' light curves
    }
    if summary.get("instrument_kind") == "longslit":
        from rpp_tasks.outputs.spectra_report import build_spectra_report as build

        kw = {}
    result = build(
        summary,
        workdir=session.workdir,
        title=getattr(obs, "title", None) or obs.name,
        site=site_facts(obs),
        products_zip=zip_path,
        **kw,
    )
    zip_path = zip_products(session, out_path=zip_path)
    out = result.to_dict()
    out.update(products_zip=str(zip_path), products_zip_bytes=zip_path.stat().st_size)
    session.write_json("report/report.json", out)
    return out
