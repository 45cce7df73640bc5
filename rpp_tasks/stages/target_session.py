"""The targets of a session: the session stage that measures the observer's targets in every
reduced frame of a night (`run_targets`) and the record step that puts their photometry in the
results database (`record_target_photometry`).

`run_targets` is the ``targets`` stage of the stage table (`rpp_tasks.session.table.IMAGING`,
session scope: the comparison ensemble of a band and field is solved over the night's frames, so
it runs once after the per-frame stages). It reads the frames' products, never the raw files, and
writes ``targets.json``, ``targets.ecsv``, ``comparison_stars.ecsv`` and
``targets_photometry.json`` (the rows the results database gets). `record_target_photometry` is
called by `rpp_tasks.session.lifecycle.record_results`, the one step that writes the results
database. The science is in `rpp_tasks.stages.target` (names, positions, a target in a frame,
limits, times) and `rpp_tasks.stages.differential` (the ensemble).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from rpp_tasks.stages.target import (
    PHOT_TYPES,
    Target,
    bjd_tdb,
    limiting_mag_at,
    measure_target,
    mid_exposure_mjd,
    targets_for_session,
)

__all__ = ["run_targets", "record_target_photometry", "PHOTOMETRY_FILE"]

log = logging.getLogger(__name__)

#: What the record step reads: objects and photometry rows of the session (``targets`` stage).
PHOTOMETRY_FILE = "targets_photometry.json"


# =============================================================================== session adapter
def _read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _session_frames(workdir: Path) -> tuple[list[dict], list[dict]]:
    """(reduced frames, other frames) of a session folder from ``frames/*/summary.json``."""
    ok, other = [], []
    for d in sorted((workdir / "frames").glob("*/")):
        s = _read_json(d / "summary.json")
        if not isinstance(s, dict):
            continue
        s = dict(s, _dir=str(d))
        has_cat = (d / "catalog.fits").is_file() or (d / "catalog.ecsv").is_file()
        (ok if s.get("status") == "ok" and has_cat else other).append(s)
    ok.sort(key=lambda s: (s.get("mjd_obs") is None, s.get("mjd_obs") or 0.0, s["frame"]))
    return ok, other


def _read_catalog(frame_dir: Path):
    from astropy.table import Table

    if (frame_dir / "catalog.fits").is_file():
        return Table.read(frame_dir / "catalog.fits", format="fits")
    return Table.read(frame_dir / "catalog.ecsv", format="ascii.ecsv")


def _frame_wcs(summary: dict):
    """(WCS or None, (ny, nx), cone) of a reduced frame from its calibrated image header."""
    from astropy.io import fits

    from rpp_tasks.inputs.wcs import header_wcs

    path = summary.get("calibrated") or str(Path(summary["_dir"]) / "calibrated.fits")
    try:
        hdr = fits.getheader(path, 0)
    except (OSError, KeyError):
        return None, None, None
    shape = (int(hdr.get("NAXIS2", 0)), int(hdr.get("NAXIS1", 0)))
    chk = header_wcs(hdr)
    if chk.wcs is None:
        return None, shape, None
    scale = chk.pixel_scale_arcsec or 1.0
    cone = (
        chk.center_ra_deg,
        chk.center_dec_deg,
        0.5 * math.hypot(*shape) * scale / 3600.0,
    )
    return chk.wcs, shape, cone


def _cutout(path: str, x: float, y: float, box_px: int):
    """A box of the calibrated image (and its mask) around (x, y), read through a memory map."""
    from astropy.io import fits

    with fits.open(path, memmap=True) as hdul:
        ny, nx = hdul[0].shape
        h = box_px // 2
        ix, iy = int(round(x)), int(round(y))
        x0, x1, y0, y1 = max(ix - h, 0), min(ix + h + 1, nx), max(iy - h, 0), min(iy + h + 1, ny)
        data = np.asarray(hdul[0].section[y0:y1, x0:x1], float)
        mask = None
        if "MASK" in hdul:
            mask = np.asarray(hdul["MASK"].section[y0:y1, x0:x1], bool)
    return data, mask, x - x0, y - y0


def _f(v):
    return float("nan") if v is None else float(v)


def run_targets(
    workdir: str | os.PathLike,
    obs,
    *,
    targets=(),
    results_url: str | None = None,
    record: bool = True,
    setup=None,
    session_id: str | None = None,
) -> dict:
    """
    Session adapter: target and differential photometry of every reduced frame of a session.

    Reads ``frames/*/summary.json``, ``catalog.fits`` (or ``.ecsv``), ``zeropoint.json`` and the
    header (and, for upper limits, a cutout) of ``calibrated.fits``; resolves the targets (run
    parameters ``targets``, the frames' OBJECT, the configured targets in the field); solves the
    comparison ensemble of each band and photometry type (`rpp_tasks.stages.differential`);
    measures each target in each frame. Writes ``targets.json`` (resolutions with reasons,
    ensembles, per-target summary), ``targets.ecsv`` (one row per target and frame) and
    ``comparison_stars.ecsv``, and ``targets_photometry.json`` (the objects and photometry rows
    for the results database). With ``record`` (a standalone call) it also records them
    (`record_target_photometry`, ``results_url`` default: ``RPP_RESULTS_DB_URL`` or
    ``<work root>/rpp_results.sqlite``); the ``targets`` stage of a reduction passes
    ``record=False``: the lifecycle's record step writes the database.

    Nothing here stops the session: an unknown target name, a target outside the field, a night
    without comparison stars or an unreachable database are recorded with the reason.

    Returns
    -------
    dict
        The small summary also written as ``targets.json["summary"]``.
    """
    from rpp_tasks.stages import catalogs
    from rpp_tasks.stages.differential import differential_ensemble

    c0, w0 = time.process_time(), time.perf_counter()
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"session folder {workdir} not found")
    cfg = obs.targets
    out_path = workdir / "targets.json"
    (workdir / PHOTOMETRY_FILE).unlink(missing_ok=True)
    if not cfg.enabled:
        _write_json(out_path, {"enabled": False})
        return {"enabled": False}
    frames, skipped = _session_frames(workdir)
    if session_id is None:
        sess = _read_json(workdir / "session_summary.json", {}) or {}
        session_id = sess.get("session_id") or (
            _read_json(workdir / "manifest.json", {}) or {}
        ).get("session_id", workdir.name)
    if setup is None:
        setup = catalogs.client_from_config(obs.catalogs)
    geo = {f["frame"]: _frame_wcs(f) for f in frames}
    cones = [g[2] for g in geo.values() if g[2] is not None]
    objects = [f.get("object") for f in frames] if cfg.use_object_header else []
    tlist, resolutions = targets_for_session(
        params=[t for t in (targets or ()) if t],
        objects=objects,
        config_targets=cfg.objects,
        field_cones=cones,
        setup=setup,
        online=cfg.resolve_online,
        match_radius_arcsec=cfg.match_radius_arcsec,
    )
    for r in resolutions:
        if not r.ok:  # an OBJECT that is a field name, not a target, is no surprise
            level = logging.INFO if r.named_by == "header" else logging.WARNING
            log.log(level, "[%s] target %s (%s): %s", session_id, r.query, r.named_by, r.reason)
    ens_cfg = cfg.ensemble
    rows: list[dict] = []
    source_rows: list[dict] = []
    source_objects: dict[str, dict] = {}
    ensembles_out: dict = {}
    comp_tables = []
    for label, band, group in _frame_groups(frames, geo):
        cats = [_read_catalog(Path(f["_dir"])) for f in group]
        stems = [f["frame"] for f in group]
        types = [t for t in PHOT_TYPES if any(f"mag_{t}" in c.colnames for c in cats)]
        mids = [mid_exposure_mjd(f.get("mjd_obs"), f.get("exptime_s")) for f in group]
        exclude = [t.position_at(np.nanmedian(mids) if mids else None) for t in tlist]
        ens = {}
        for t in types:
            ens[t] = differential_ensemble(
                cats,
                stems,
                phot_type=t,
                exclude=exclude,
                min_snr=ens_cfg.min_snr,
                max_stars=ens_cfg.max_stars,
                min_stars=ens_cfg.min_stars,
                min_frame_fraction=ens_cfg.min_frame_fraction,
                clip_sigma=ens_cfg.clip_sigma,
                max_chi2=ens_cfg.max_chi2,
                exclude_radius_arcsec=ens_cfg.exclude_radius_arcsec,
                ref_mag_range=ens_cfg.ref_mag_range,
            )
            if ens[t].status != "ok":
                log.warning("[%s] %s %s ensemble: %s", session_id, label, t, ens[t].reason)
            st = ens[t].stars.copy()
            st["band"], st["phot_type"], st["group"] = band, t, label
            comp_tables.append(st)
        ensembles_out[label] = {t: e.to_dict() for t, e in ens.items()}
        primary = cfg.phot_type
        if primary == "auto":  # as the zero point stage: PSF when measured, else 1.3 FWHM
            has_psf = any(
                "mag_psf" in c.colnames and np.isfinite(np.asarray(c["mag_psf"], float)).any()
                for c in cats
            )
            primary = "psf" if has_psf else "1p3fwhm"
        for k, (f, cat) in enumerate(zip(group, cats)):
            wcs, shape, _ = geo[f["frame"]]
            zpj = _read_json(Path(f["_dir"]) / "zeropoint.json", {}) or {}
            zp_types = zpj.get("types") or {}
            airmass = f.get("airmass")
            kx = (zpj.get("extinction_k_mag") or 0.0) * airmass if airmass else 0.0
            mid = mids[k]
            for tgt in tlist:
                ra, dec = tgt.position_at(mid)
                if wcs is not None:
                    x, y = (float(v) for v in wcs.all_world2pix([[ra, dec]], 0, quiet=True)[0])
                else:
                    x = y = float("nan")
                m = measure_target(
                    cat,
                    ra,
                    dec,
                    target=tgt.name,
                    frame=f["frame"],
                    band=f.get("band"),
                    x_px=x,
                    y_px=y,
                    shape=shape or (0, 0),
                    match_radius_arcsec=cfg.match_radius_arcsec,
                    detect_min_snr=cfg.detect_min_snr,
                    edge_margin_px=cfg.edge_margin_px,
                    types=types,
                )
                lim = lim_diff = float("nan")
                lim_kind = None
                if m.status == "upper_limit":
                    lim_inst = _limit_inst(f, x, y)
                    zp13 = _f((zp_types.get("1p3fwhm") or {}).get("zp_mag"))
                    if math.isfinite(zp13):
                        lim, lim_kind = lim_inst - kx + zp13, "calibrated"
                    elif math.isfinite(lim_inst):
                        lim, lim_kind = lim_inst, "instrumental"
                    if "1p3fwhm" in ens:
                        lim_diff = lim_inst + ens["1p3fwhm"].zp_rel[k]
                    m = dataclasses.replace(m, limit_mag=lim, limit_kind=lim_kind)
                by_type = {}
                for t, d in m.by_type.items():
                    e = ens.get(t)
                    z = e.zp_rel[k] if e is not None else float("nan")
                    ze = e.zp_rel_err[k] if e is not None else float("nan")
                    fl = e.floor_mag if e is not None else 0.0
                    by_type[t] = {
                        **d,
                        "mag_diff": d["mag_inst"] + z,
                        "mag_diff_err": math.sqrt(d["mag_inst_err"] ** 2 + fl**2 + ze**2),
                        "zp_rel_mag": z,
                    }
                m = dataclasses.replace(m, by_type=by_type)
                p = by_type.get(primary, {})
                e = ens.get(primary)
                bjd = (
                    bjd_tdb(
                        mid,
                        ra,
                        dec,
                        latitude_deg=obs.site.latitude_deg if _site_set(obs) else None,
                        longitude_deg=obs.site.longitude_deg if _site_set(obs) else None,
                        elevation_m=obs.site.elevation_m,
                    )
                    if math.isfinite(mid)
                    else float("nan")
                )
                rows.append(
                    {
                        "object_key": tgt.key,
                        "target": tgt.name,
                        "frame": f["frame"],
                        "status": m.status,
                        "band": f.get("band"),
                        "phot_type": primary,
                        "mjd_mid": mid,
                        "bjd_tdb": bjd,
                        "airmass": _f(airmass),
                        "mag": _f(p.get("mag")) if m.detected else float("nan"),
                        "mag_err": _f(p.get("mag_err")) if m.detected else float("nan"),
                        "mag_diff": _f(p.get("mag_diff")) if m.detected else float("nan"),
                        "mag_diff_err": _f(p.get("mag_diff_err")) if m.detected else float("nan"),
                        "mag_inst": _f(p.get("mag_inst")),
                        "mag_inst_err": _f(p.get("mag_inst_err")),
                        "snr": m.snr,
                        "limit_mag": lim,
                        "limit_diff_mag": lim_diff,
                        "match_sep_arcsec": m.match_sep_arcsec,
                        "x_px": x,
                        "y_px": y,
                        "zp_rel_mag": e.zp_rel[k] if e is not None else float("nan"),
                        "n_comp": int(e.n_comp[k]) if e is not None else 0,
                        "flags": ",".join(m.flags),
                        "by_type": m.to_dict()["by_type"],
                        "_measurement": m,
                    }
                )
            if cfg.store_all_sources:
                _collect_sources(
                    cat,
                    f,
                    k,
                    primary,
                    ens.get(primary),
                    zp_types,
                    source_objects,
                    source_rows,
                    mid,
                    kx,
                )
    # ---- per-target summary
    summary_targets = []
    for tgt in tlist:
        mine = [r for r in rows if r["object_key"] == tgt.key]
        summary_targets.append(_target_summary(tgt, mine))
    measured_rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    _write_rows(workdir / "targets.ecsv", measured_rows, session_id)
    if comp_tables:
        from astropy.table import vstack

        comp = vstack(comp_tables, metadata_conflicts="silent")
        comp.meta = {"session_id": session_id, "observatory": obs.name}
        comp.write(workdir / "comparison_stars.ecsv", format="ascii.ecsv", overwrite=True)
    _write_json(
        workdir / PHOTOMETRY_FILE,
        _photometry_payload(
            obs, session_id, frames, tlist, measured_rows, source_objects, source_rows
        ),
    )
    db_info: dict = {"recorded": False}
    if record and (rows or source_rows):
        try:
            db_info = record_target_photometry(workdir, obs, url=results_url)
        except Exception as exc:  # the results DB is a record, never a reason to lose the products
            log.error("[%s] target photometry not recorded in the results DB: %s", session_id, exc)
            db_info = {"recorded": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    summary = {
        "session_id": session_id,
        "n_frames": len(frames),
        "n_frames_skipped": len(skipped),
        "targets": summary_targets,
        "unresolved": [r.to_dict() for r in resolutions if not r.ok],
        "ensembles": {
            b: {
                t: {k: e[k] for k in ("status", "reason", "n_used", "n_candidates")}
                for t, e in d.items()
            }
            for b, d in ensembles_out.items()
        },
        "results_db": db_info,
        "cpu_s": round(time.process_time() - c0, 4),
        "wall_s": round(time.perf_counter() - w0, 4),
    }
    _write_json(
        out_path,
        {
            "summary": summary,
            "resolutions": [r.to_dict() for r in resolutions],
            "ensembles": ensembles_out,
            "measurements": [r["_measurement"].to_dict() for r in rows],
        },
    )
    log.info(
        "[%s] targets: %d resolved, %d unresolved, %d measurements, %.2f CPU-s",
        session_id,
        len(tlist),
        len(summary["unresolved"]),
        len(rows),
        summary["cpu_s"],
    )
    return summary


def _frame_groups(frames: list[dict], geo: dict) -> list[tuple[str, str, list[dict]]]:
    """The night's frames by band and field: one comparison ensemble each.

    Frames whose centres are within half a field radius of a group's first frame share its field
    (an observer may image several fields a night); frames without a WCS form their own group.
    Returns ``(label, band, frames)``: the label is the band (``"none"`` without one), with
    ``" field <k>"`` when the band has several fields.
    """
    from rpp_tasks.stages.catalogs import angular_sep_deg

    out = []
    for band in sorted({f.get("band") or "" for f in frames}):
        fields: list[tuple[tuple | None, list[dict]]] = []
        for f in (f for f in frames if (f.get("band") or "") == band):
            cone = geo[f["frame"]][2]
            for c0, members in fields:
                if cone is None and c0 is None:
                    members.append(f)
                    break
                if cone is not None and c0 is not None:
                    if float(angular_sep_deg(cone[0], cone[1], c0[0], c0[1])) <= 0.5 * c0[2]:
                        members.append(f)
                        break
            else:
                fields.append((cone, [f]))
        for k, (_, members) in enumerate(fields, start=1):
            label = band or "none"
            if len(fields) > 1:
                label += f" field {k}"
            out.append((label, band, members))
    return out


def _site_set(obs) -> bool:
    return bool(obs.site.latitude_deg or obs.site.longitude_deg)


def _write_json(path: Path, data) -> None:
    from rpp_tasks.session.workdir import write_json_atomic

    write_json_atomic(path, data)


def _limit_inst(frame: dict, x: float, y: float) -> float:
    path = frame.get("calibrated") or str(Path(frame["_dir"]) / "calibrated.fits")
    fwhm = frame.get("fwhm_px")
    if not (fwhm and math.isfinite(x) and math.isfinite(y) and Path(path).is_file()):
        return float("nan")
    try:
        data, mask, cx, cy = _cutout(path, x, y, 65)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("[%s] limit at the target not measured: %s", frame["frame"], exc)
        return float("nan")
    lim, _ = limiting_mag_at(
        data, cx, cy, fwhm_px=float(fwhm), exptime_s=frame.get("exptime_s") or 0.0, mask=mask
    )
    return lim


def _collect_sources(cat, f, k, primary, ens, zp_types, objects, rows, mid, kx) -> None:
    """Photometry of every Gaia-matched source of a frame (``targets.store_all_sources``)."""
    if "gaia_source_id" not in cat.colnames or f"mag_{primary}" not in cat.colnames:
        return
    sid = np.asarray(cat["gaia_source_id"], np.int64)
    sel = np.flatnonzero(sid > 0)
    if not sel.size:
        return
    z = ens.zp_rel[k] if ens is not None else float("nan")
    ze = ens.zp_rel_err[k] if ens is not None else float("nan")
    ze = math.hypot(ze, ens.floor_mag) if ens is not None else ze
    mag = np.asarray(cat[f"mag_{primary}"], float)
    err = np.asarray(cat[f"mag_err_{primary}"], float)
    cal = (
        np.asarray(cat[f"mag_cal_{primary}"], float)
        if f"mag_cal_{primary}" in cat.colnames
        else None
    )
    cal_e = (
        np.asarray(cat[f"mag_cal_err_{primary}"], float)
        if f"mag_cal_err_{primary}" in cat.colnames
        else None
    )
    snr = np.asarray(cat[f"snr_{primary}"], float) if f"snr_{primary}" in cat.colnames else None
    ra, dec = np.asarray(cat["ra"], float), np.asarray(cat["dec"], float)
    for i in sel:
        key = f"ref:Gaia DR3 {int(sid[i])}"
        if key not in objects:
            objects[key] = {
                "key": key,
                "name": f"Gaia DR3 {int(sid[i])}",
                "kind": "source",
                "ra_deg": float(ra[i]),
                "dec_deg": float(dec[i]),
                "ref_id": f"Gaia DR3 {int(sid[i])}",
            }
        flags = [
            n for n in ("saturated", "near_edge", "blended") if n in cat.colnames and cat[n][i]
        ]
        rows.append(
            {
                "object_key": key,
                "frame": f["frame"],
                "status": "detected",
                "band": f.get("band"),
                "phot_type": primary,
                "mjd_mid": mid,
                "airmass": _f(f.get("airmass")),
                "mag": float(cal[i]) if cal is not None else float("nan"),
                "mag_err": float(cal_e[i]) if cal_e is not None else float("nan"),
                "mag_diff": float(mag[i] + z),
                "mag_diff_err": float(math.hypot(err[i], ze)),
                "mag_inst": float(mag[i]),
                "mag_inst_err": float(err[i]),
                "snr": float(snr[i]) if snr is not None else float("nan"),
                "zp_rel_mag": z,
                "n_comp": int(ens.n_comp[k]) if ens is not None else 0,
                "flags": ",".join(flags),
            }
        )


def _target_summary(tgt: Target, rows: list[dict]) -> dict:
    det = [r for r in rows if r["status"] == "detected"]
    lims = [r for r in rows if r["status"] == "upper_limit"]
    out = {
        "name": tgt.name,
        "key": tgt.key,
        "ra_deg": round(tgt.ra_deg, 7),
        "dec_deg": round(tgt.dec_deg, 7),
        "source": tgt.source,
        "named_by": tgt.named_by,
        "n_frames": len(rows),
        "n_detected": len(det),
        "n_upper_limits": len(lims),
        "n_outside_field": sum(r["status"] == "outside_field" for r in rows),
        "bands": {},
    }
    if rows and not det and not lims:
        out["reason"] = next(
            (m["_measurement"].reason for m in rows if m["_measurement"].reason), None
        )
    for band in sorted({r["band"] or "" for r in rows}):
        b_det = [r for r in det if (r["band"] or "") == band]
        b_lim = [r for r in lims if (r["band"] or "") == band]
        info: dict = {"n_detected": len(b_det), "n_upper_limits": len(b_lim)}
        if b_det:
            info["phot_type"] = b_det[0]["phot_type"]
            for col in ("mag", "mag_diff"):
                v = np.asarray([r[col] for r in b_det], float)
                e = np.asarray([r[f"{col}_err"] for r in b_det], float)
                ok = np.isfinite(v) & np.isfinite(e) & (e > 0)
                if ok.any():
                    w = 1 / e[ok] ** 2
                    mean = float(np.sum(w * v[ok]) / np.sum(w))
                    info[col] = round(mean, 4)
                    err = math.sqrt(1 / float(np.sum(w)))
                    if ok.sum() > 1:  # the scatter when it exceeds the errors
                        chi2 = float(np.sum(w * (v[ok] - mean) ** 2) / (ok.sum() - 1))
                        err *= math.sqrt(max(chi2, 1.0))
                    info[f"{col}_err"] = round(err, 4)
            info["snr_median"] = round(float(np.nanmedian([r["snr"] for r in b_det])), 1)
            seps = [r["match_sep_arcsec"] for r in b_det if math.isfinite(r["match_sep_arcsec"])]
            info["match_sep_arcsec"] = round(float(np.median(seps)), 3) if seps else None
            info["n_comp"] = int(np.median([r["n_comp"] for r in b_det]))
            info["latest"] = {
                k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else None)
                if isinstance(v, float)
                else v
                for k, v in b_det[-1].items()
                if k
                in (
                    "frame",
                    "mjd_mid",
                    "mag",
                    "mag_err",
                    "mag_diff",
                    "mag_diff_err",
                    "snr",
                    "match_sep_arcsec",
                )
            }
            info["by_type"] = b_det[-1]["by_type"]
        if b_lim:
            deepest = max(
                (r["limit_mag"] for r in b_lim if math.isfinite(r["limit_mag"])), default=None
            )
            info["deepest_limit_mag"] = None if deepest is None else round(deepest, 3)
            info["limit_kind"] = b_lim[0]["_measurement"].limit_kind
        out["bands"][band or "none"] = info
    return out


def _write_rows(path: Path, rows: list[dict], session_id: str) -> None:
    from astropy.table import Table

    cols = (
        "target frame status band phot_type mjd_mid bjd_tdb airmass mag mag_err mag_diff "
        "mag_diff_err mag_inst mag_inst_err snr limit_mag limit_diff_mag match_sep_arcsec x_px "
        "y_px zp_rel_mag n_comp flags"
    ).split()
    data = {}
    for c in cols:
        vals = [r.get(c) for r in rows]
        if c in ("target", "frame", "status", "band", "phot_type", "flags"):
            data[c] = np.asarray(["" if v is None else str(v) for v in vals], dtype=str)
        elif c == "n_comp":
            data[c] = np.asarray([int(v or 0) for v in vals], dtype=int)
        else:
            data[c] = np.asarray([_f(v) for v in vals], dtype=float)
    tab = Table(data, meta={"session_id": session_id})
    tab.write(path, format="ascii.ecsv", overwrite=True)


def _photometry_payload(obs, session_id, frames, tlist, rows, source_objects, source_rows):
    """What the results database gets for the session (``targets_photometry.json``)."""
    from rpp_tasks.outputs import db
    from rpp_tasks.session.summary import night_date_for

    mjds = [f.get("mjd_obs") for f in frames if f.get("mjd_obs") is not None]
    night = night_date_for(min(mjds), obs.site.longitude_deg) if mjds else None
    objects = [
        {
            "key": t.key,
            "name": t.name,
            "kind": "target",
            "ra_deg": t.ra_deg,
            "dec_deg": t.dec_deg,
            "info": {"source": t.source, "aliases": list(t.aliases), "otype": t.otype},
        }
        for t in tlist
    ]
    keep = set(db.PHOTOMETRY_FIELDS) | {"object_key", "frame"}
    # a light curve holds measurements and limits; frames that did not contain the target (or had
    # no WCS) are in targets.json with the reason, not in the database
    prow = [
        {k: v for k, v in r.items() if k in keep}
        for r in rows
        if r["status"] in ("detected", "upper_limit")
    ]
    info = {
        f["frame"]: {
            "band": f.get("band"),
            "mjd_obs": f.get("mjd_obs"),
            "exptime_s": f.get("exptime_s"),
        }
        for f in frames
    }
    return {
        "observatory": obs.name,
        "session_id": session_id,
        "night_date": night,
        "frames": info,
        "objects": objects,
        "rows": prow,
        "source_objects": list(source_objects.values()),
        "source_rows": source_rows,
    }


def record_target_photometry(
    workdir: str | os.PathLike, obs, *, url: str | None = None, night_date: str | None = None
) -> dict:
    """
    The record step of the targets: objects and photometry of the session
    (``targets_photometry.json``, written by `run_targets`) into the results database.

    Called by `rpp_tasks.session.lifecycle.record_results` after the session itself is recorded
    (idempotent: a re-run upserts the same rows). ``url`` default: ``RPP_RESULTS_DB_URL`` or
    ``<work root>/rpp_results.sqlite``; ``night_date``: the session summary's night.

    Returns
    -------
    dict
        ``recorded`` (False when the session had no target photometry), ``n_rows``,
        ``n_source_rows``, ``url`` (password hidden). Database errors raise (the caller keeps
        them in the summary).
    """
    from rpp_tasks.outputs import db
    from rpp_tasks.outputs.lightcurve import record_session_photometry

    payload = _read_json(Path(workdir) / PHOTOMETRY_FILE)
    if not isinstance(payload, dict) or not (payload.get("rows") or payload.get("source_rows")):
        return {"recorded": False}
    url = url or db.results_url_from_env(db.default_results_url(obs.resolve_path("work")))
    night = night_date or payload.get("night_date")
    observatory, session_id = payload.get("observatory") or obs.name, payload["session_id"]
    with db.ResultsDB(url) as rdb:
        n = n_src = 0
        if payload.get("rows"):
            n = record_session_photometry(
                rdb,
                observatory,
                session_id,
                objects=payload["objects"],
                rows=payload["rows"],
                night_date=night,
                frames=payload.get("frames"),
            )
        if payload.get("source_rows"):
            n_src = record_session_photometry(
                rdb,
                observatory,
                session_id,
                objects=payload["source_objects"],
                rows=payload["source_rows"],
                night_date=night,
                frames=payload.get("frames"),
            )
    return {"recorded": True, "url": _hide(url), "n_rows": n, "n_source_rows": n_src}


def _hide(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
