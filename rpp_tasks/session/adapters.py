"""The adapters of the imaging stage table (`rpp_tasks.session.table.IMAGING`).

A frame adapter ``step_<stage>(fw, obs) -> dict`` takes the frame's in-memory state
(`rpp_tasks.session.frame.FrameWork`, its artefacts already loaded by the driver) and the
observatory configuration, calls the science in `rpp_tasks.stages`, puts what it produced back on
``fw`` (the driver saves the artefacts the table says it writes) and returns a small JSON-safe
result. A session adapter (``build_masters(session, obs)``) runs once per session.

A frame that must stop raises `~rpp_tasks.exceptions.FrameRejected`. The sky-calibration stages
(astrometry, zero point, enrichment, transients) depend on outside services and never stop a
frame: a service that is down, or an unexpected error inside them, is recorded (``status:
failed`` with the reason) and the catalogue from the stages that could run is kept.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import traceback

import numpy as np

from rpp_tasks import __version__
from rpp_tasks.exceptions import FrameRejected
from rpp_tasks.session.workdir import Session, write_json_atomic

__all__ = [
    "build_masters",
    "measure_targets",
    "step_calibrate",
    "step_cosmics",
    "step_background",
    "step_detect",
    "step_astrometry",
    "step_photometry",
    "step_zero_point",
    "step_enrich",
    "step_transients",
    "services_setup",
    "reference_for_band",
]

log = logging.getLogger(__name__)


# =============================================================================== session scope
def build_masters(session: Session, obs) -> dict:
    """Master bias/dark/flat from the session's calibration frames, else the nearest masters of the
    same camera and binning (and band, for flats) from the master library. Writes masters.json and
    returns which masters were used (source and frame count, small enough for XCom)."""
    from rpp_tasks.stages import masters

    cfg = obs.stages.calibration
    summary = masters.run_masters(
        session.read_json("manifest.json", {}),
        out_dir=session.masters_dir(),
        camera=obs.camera.name,
        library_root=obs.resolve_path("master_library") if cfg.use_master_library else None,
        combine=cfg.combine,
        clip_sigma=cfg.clip_sigma,
        max_age_days=cfg.max_library_age_days,
        read_kwargs={"bayer_pattern": obs.camera.bayer_pattern},
    )
    session.write_json("masters.json", summary)
    return masters_brief(summary)


def masters_brief(masters: dict) -> dict:
    """Which masters a session uses: source and frame count of each, and the flags."""

    def brief(v):
        if not isinstance(v, dict):
            return None
        return {"source": v.get("source"), "n_frames": v.get("n_frames")}

    flats = masters.get("flat") if isinstance(masters.get("flat"), dict) else {}
    return {
        "bias": brief(masters.get("bias")),
        "dark": brief(masters.get("dark")),
        "flat": {band: brief(v) for band, v in flats.items()},
        "flags": list(masters.get("flags") or []),
    }


def measure_targets(session: Session, obs) -> dict:
    """The observer's targets in every reduced frame of the session, with the night's comparison
    ensembles (`rpp_tasks.stages.target_session.run_targets`, session scope: the ensemble of a
    band and field is solved over the night's frames). Targets: the run's (``run_targets`` of the
    manifest, from ``rpp reduce --target`` or the run conf), the frames' OBJECT, the configured
    ones in the field. Writes ``targets.json`` and the rows the record step puts in the results
    database (``targets_photometry.json``); returns a small brief. Never stops the session."""
    from rpp_tasks.stages.target_session import run_targets

    manifest = session.read_json("manifest.json", {}) or {}
    out = run_targets(
        session.workdir,
        obs,
        targets=tuple(manifest.get("run_targets") or ()),
        record=False,
        session_id=session.session_id,
    )
    if not out.get("targets") and out.get("enabled") is False:
        return {"enabled": False}
    return {
        "n_targets": len(out.get("targets") or ()),
        "n_unresolved": len(out.get("unresolved") or ()),
        "targets": {
            t["name"]: {k: t[k] for k in ("n_detected", "n_upper_limits", "n_outside_field")}
            for t in out.get("targets") or ()
        },
        "ensembles": {
            label: {t: e.get("status") for t, e in d.items()}
            for label, d in (out.get("ensembles") or {}).items()
        },
        "cpu_s": out.get("cpu_s"),
    }


# =============================================================================== frame scope
def read_raw(path, obs) -> tuple:
    """``(data, header, meta)`` of a raw frame: Bayer -> luminance, MEF amplifiers mosaicked,
    header normalised (`~rpp_tasks.inputs.header.FrameMeta` as a dict, with the reading notes).

    Raises `FrameRejected` with a clear reason (unreadable file, missing EXPTIME, constant
    image...).
    """
    from rpp_tasks.inputs.header import normalize_header, normalize_kwargs_from_config
    from rpp_tasks.inputs.reader import read_frame

    raw = read_frame(
        path, bayer_pattern=obs.camera.bayer_pattern, saturation_adu=obs.camera.saturation_adu
    )
    meta = normalize_header(
        raw.header, path=str(path), **normalize_kwargs_from_config(obs)
    ).to_dict()
    meta["notes"] = list(raw.notes)
    return raw.data, raw.header, meta


_MASTER_CACHE: dict[str, tuple] = {}


def _load_master(entry: dict | None) -> tuple:
    """``(image, header, mask)`` of a masters.json entry (``(None, None, None)`` when absent),
    cached per process since every frame of a session shares its masters."""
    if not entry or not entry.get("path"):
        return None, None, None
    path = entry["path"]
    if path not in _MASTER_CACHE:
        from rpp_tasks.stages import master_library

        if len(_MASTER_CACHE) > 8:
            _MASTER_CACHE.clear()
        _MASTER_CACHE[path] = master_library.load_master(path)
    return _MASTER_CACHE[path]


def step_calibrate(fw, obs) -> dict:
    """Raw frame -> calibrated image (bias, dark scaled by exposure, flat), saturation + bad-pixel
    mask."""
    from rpp_tasks.stages import calibration

    data, header, meta = read_raw(fw.raw_path, obs)
    fw.meta.update(meta)
    entries = {
        "bias": fw.masters.get("bias"),
        "dark": fw.masters.get("dark"),
        "flat": (fw.masters.get("flat") or {}).get(meta.get("band")),
    }
    (bias, _, _), (dark, dark_hdr, _), (flat, _, flat_mask) = (
        _load_master(entries[k]) for k in ("bias", "dark", "flat")
    )
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
        black_level_adu=meta.get("bias_level_adu"),
        black_level_source=meta.get("bias_level_origin") or "camera.bias_level_adu",
    )
    if result.black_level_adu:
        # every later level test (cosmics, detection, photometry) sees the pedestal-free image
        fw.meta["saturation_adu"] = meta["saturation_adu"] - result.black_level_adu
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
        "black_level_adu": result.black_level_adu,
        "saturation_adu": fw.meta["saturation_adu"],
    }


def check_gain(fw) -> dict:
    """The sky noise of the frame against its camera model, and the gain the rest of the chain
    uses (`rpp_tasks.stages.background.check_noise_model` and ``gain_from_noise``).

    Runs on every frame (cosmic rays cleaned or not). When the configured or header gain is
    unknown, or exceeds 1.5x the largest gain the sky noise of a sky-dominated frame allows
    (e.g. 12-bit data written as 16-bit, or a guessed ``camera.gain_e_per_adu``), every Poisson
    error would be too small: ``fw.meta["gain_e_per_adu"]`` becomes the bound, and
    ``fw.meta["gain_check"]`` records the gain used, its source, the configured value and the
    noise ratio (the frame's ``summary.json`` key ``gain``). Idempotent: a resumed frame
    compares with the configured gain, not with the one already replaced.
    """
    from rpp_tasks.session.summary import gain_fix
    from rpp_tasks.stages import background

    prev = fw.meta.get("gain_check") or {}
    configured = prev.get("configured_e_per_adu", fw.meta.get("gain_e_per_adu"))
    configured = float("nan") if configured is None else float(configured)
    rn = fw.meta.get("read_noise_e")
    rn = 0.0 if rn is None or not math.isfinite(float(rn)) else float(rn)
    noise = background.check_noise_model(
        fw.data, gain_e_per_adu=configured, read_noise_e=rn, mask=fw.mask
    )
    used, source = background.gain_from_noise(noise, configured)
    origin = prev.get("configured_from", fw.meta.get("gain_origin") or "config")
    info = {
        "used_e_per_adu": _round_sig(used),
        "source": source,
        "configured_e_per_adu": _round_sig(configured),
        "configured_from": origin,
        "bound_e_per_adu": _round_sig(noise.gain_max_e_per_adu),
        "sky_dominated": noise.sky_dominated,
        "noise_ratio": _round_sig(noise.ratio),
        "sky_adu": _round_sig(noise.sky_adu),
        "measured_sigma_adu": _round_sig(noise.measured_sigma_adu),
    }
    fw.meta["gain_check"] = info
    if source != "configured":
        used = fw.meta["gain_e_per_adu"] = info["used_e_per_adu"]  # what is recorded is used
        if fw.header is not None:
            fw.header.add_history(
                f"rpp {__version__}: gain {used:.4g} e-/ADU from the sky noise bound "
                f"(configured {configured:.4g})"
            )
        log.warning(
            "[%s] gain %s e-/ADU (%s) is impossible for this frame: its sky noise (%.3g ADU on a "
            "sky of %.4g ADU, %.2fx the camera model) allows at most %.3g e-/ADU; photometry "
            "errors and cosmic rays use %.3g e-/ADU. %s (about %.3g, or lower if the frames "
            "carry a bias pedestal)",
            fw.stem,
            "unknown" if not configured > 0 else f"{configured:.3g}",
            origin,
            noise.measured_sigma_adu,
            noise.sky_adu,
            noise.ratio,
            noise.gain_max_e_per_adu,
            used,
            gain_fix(origin).capitalize(),
            used,
        )
    return {"noise": noise, **info}


def _round_sig(v, digits: int = 4):
    """``v`` to ``digits`` significant figures (None when not finite), for JSON records."""
    v = None if v is None else float(v)
    return float(f"{v:.{digits}g}") if v is not None and math.isfinite(v) else None


def step_cosmics(fw, obs) -> dict:
    """The gain checked against the sky noise (`check_gain`, every frame); then cosmic rays
    cleaned and masked when enabled."""
    gain_info = check_gain(fw)
    noise = gain_info.pop("noise")
    gain_rec = {"gain": gain_info}
    cfg = obs.stages.cosmics
    if not cfg.enabled:
        return {"enabled": False, "n_pixels": 0, **gain_rec}
    from rpp_tasks.stages import cosmics

    gain, rn = fw.meta["gain_e_per_adu"], fw.meta["read_noise_e"]
    if gain_info["source"] != "configured":
        noise = noise.with_gain(gain, rn)  # the replaced gain's model, same measurement
    if noise.ratio > 1.5:
        log.warning(
            "[%s] measured sky noise %.1f ADU is %.1fx the camera model (gain %.3g e-/ADU, read "
            "noise %.3g e-): check camera.gain_e_per_adu / read_noise_e; cosmic-ray thresholds "
            "use an effective read noise of %.3g e-",
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
        **gain_rec,
    }


def step_background(fw, obs) -> dict:
    """2-D sky background and RMS."""
    from rpp_tasks.stages import background

    cfg = obs.stages.background
    res = background.estimate_background(
        fw.data, mask=fw.mask, box_size_px=cfg.box_size_px, filter_size=cfg.filter_size
    )
    fw.background, fw.rms = res.background, res.rms
    fw.bkg_summary = {
        "background_adu": float(res.global_median_adu),
        "background_rms_adu": float(res.global_rms_adu),
        "map_sigma_adu": round(res.map_sigma_adu, 4),
    }
    return dict(fw.bkg_summary)


def step_detect(fw, obs) -> dict:
    """Sources on the background-subtracted image; a frame without any is rejected."""
    from rpp_tasks.stages import detection

    cfg = obs.stages.detection
    # with PSF photometry, faint stars on the wings of bright ones are found on the fit residual
    # (photometry.psf_photometry_with_residual_detection): no whole-frame peak search needed
    fw.sources = detection.detect_sources(
        fw.data - fw.background,
        fw.rms,
        method=cfg.method,
        threshold_sigma=cfg.threshold_sigma,
        fwhm_px=cfg.fwhm_guess_px,
        mask=fw.mask,
        min_area_px=cfg.min_area_px,
        deblend_cont=cfg.deblend_cont,
        peak_search=not obs.stages.photometry.psf,
        saturation_adu=fw.meta["saturation_adu"] - float(fw.bkg_summary["background_adu"]),
        overwrite=True,  # the background-subtracted copy is ours
    )
    if len(fw.sources) == 0:
        raise FrameRejected(
            "no sources detected (empty field, closed dome or clouds?)",
            path=str(fw.raw_path),
            stage="detect",
        )
    return {"n_sources": len(fw.sources), "method": cfg.method}


def step_photometry(fw, obs) -> dict:
    """FWHM, aperture (1.1, 1.3 FWHM and fixed radius) and ePSF photometry, S/N flags, RA/Dec."""
    from rpp_tasks.stages import measure

    fw.catalog, result = measure.measure_catalog(
        fw.data,
        fw.background,
        fw.rms,
        fw.sources,
        mask=fw.mask,
        header=fw.header,
        meta=fw.meta,
        background_rms_adu=fw.bkg_summary["background_rms_adu"],
        sky_map_sigma_adu=fw.bkg_summary.get("map_sigma_adu"),
        cfg=obs.stages.photometry,
        provenance={"observatory": obs.name, "config_hash": obs.config_hash},
        frame=fw.stem,
        path=str(fw.raw_path),
    )
    return result


# =============================================================================== sky calibration
def _guarded(stage):
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(fw, obs):
            try:
                return fn(fw, obs)
            except FrameRejected:
                raise
            except Exception as exc:  # an optional stage must not lose the catalogue
                log.error(
                    "[%s] %s failed, catalogue kept: %s\n%s",
                    fw.stem,
                    stage,
                    exc,
                    traceback.format_exc(),
                )
                return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]}

        return wrapper

    return deco


@functools.lru_cache(maxsize=8)
def _setup_cached(catalogs_cfg, uid):
    from rpp_tasks.stages import catalogs

    return catalogs.client_from_config(catalogs_cfg)


def services_setup(obs):
    """`~rpp_tasks.stages.catalogs.ServicesSetup` of an observatory (cached per process)."""
    try:
        return _setup_cached(obs.catalogs, os.environ.get("RPP_ASTRO_COLIBRI_UID"))
    except TypeError:  # unhashable config (dict fields): build it each time
        from rpp_tasks.stages import catalogs

        return catalogs.client_from_config(obs.catalogs)


def reference_for_band(obs, band: str | None) -> tuple[str, str]:
    """(catalogue, reference band) of a frame band from ``catalogs.bands`` (Gaia G if unknown)."""
    spec = obs.catalogs.bands.get(band or "") if band else None
    if spec is None and band:
        low = {k.lower(): v for k, v in obs.catalogs.bands.items()}
        spec = low.get(band.lower())
    if spec is None:
        return "gaia", "G"
    cat, ref_band = spec.split("/")
    return cat, ref_band


def _field_cone(header, shape):
    from rpp_tasks.inputs.wcs import header_wcs

    chk = header_wcs(header)
    if chk.wcs is None:
        return None
    ny, nx = shape
    scale = chk.pixel_scale_arcsec or 1.0
    return chk.center_ra_deg, chk.center_dec_deg, 0.5 * math.hypot(nx, ny) * scale / 3600.0 * 1.02


def _site(obs, header) -> tuple[float | None, float | None, str]:
    """(latitude, east longitude, source) for the airmass: the observatory config, or -- when the
    config leaves the site at its unset default (0, 0) -- the header's SITELAT/SITELONG (or
    LAT-OBS/LONG-OBS, OBSGEO-B/OBSGEO-L); (None, None, "none") when neither says where it is."""
    lat, lon = float(obs.site.latitude_deg), float(obs.site.longitude_deg)
    if lat != 0.0 or lon != 0.0:
        return lat, lon, "config"
    for klat, klon in (("SITELAT", "SITELONG"), ("LAT-OBS", "LONG-OBS"), ("OBSGEO-B", "OBSGEO-L")):
        try:
            hlat, hlon = float(header[klat]), float(header[klon])
        except (KeyError, TypeError, ValueError):
            continue  # (sexagesimal strings are not guessed at)
        if -90 <= hlat <= 90 and -360 <= hlon <= 360 and (hlat != 0.0 or hlon != 0.0):
            return hlat, hlon, f"header {klat}/{klon}"
    return None, None, "none"


def _header_airmass_mismatch(x, header, lat, lon, site_src) -> tuple[float | None, str | None]:
    """(header airmass, message) when the header's AIRMASS (or SECZ) disagrees with the airmass
    ``x`` computed at the site in use by more than 0.1 and 10 %: the site is then most likely
    wrong (a frame reduced with another camera's config, e.g. ``demo``: the LCO frame's
    AIRMASS=1.160 came out as 2.59 at the demo site); (header airmass or None, None) else."""
    hx = None
    for key in ("AIRMASS", "SECZ"):
        try:
            v = float(header[key])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(v) and 1.0 <= v < 40.0:
            hx = v
            break
    if hx is None or not (x is not None and math.isfinite(x)):
        return hx, None
    if abs(x - hx) <= max(0.1, 0.1 * hx):
        return hx, None
    return hx, (
        f"airmass {x:.3f} computed at the {site_src} site (lat {lat:.2f}, lon {lon:.2f}) "
        f"differs from the header's {key}={hx:.3f}: is the observatory's site right?"
    )


def _mid_mjd(meta):
    mjd = meta.get("mjd_obs")
    if mjd is None:
        return None
    return float(mjd) + 0.5 * float(meta.get("exptime_s") or 0.0) / 86400.0


@_guarded("astrometry")
def step_astrometry(fw, obs) -> dict:
    """Plate solve when needed, refine against Gaia; the WCS goes into ``fw.header``."""
    from rpp_tasks.inputs.wcs import header_wcs
    from rpp_tasks.stages import astrometry

    cfg = obs.stages.astrometry
    if not cfg.enabled:
        return {"enabled": False, "wcs_source": "header"}
    _, res = astrometry.run_astrometry(
        fw.header,
        fw.sources,
        fw.data.shape,
        meta=fw.meta,
        cfg=cfg,
        setup=services_setup(obs),
        frame=fw.stem,
    )
    write_json_atomic(fw.outdir / "astrometry.json", res.to_dict())
    chk = header_wcs(fw.header)
    if chk.pixel_scale_arcsec:
        fw.meta["pixel_scale_arcsec"] = chk.pixel_scale_arcsec
    fw.meta["wcs_status"] = chk.status
    return {
        "wcs_source": res.wcs_source,
        "wcs_status": res.wcs_status,
        "astrometric_rms_arcsec": res.astrometric_rms_arcsec,
        "n_astrometric_matches": res.n_matches,
        "pixel_scale_arcsec": chk.pixel_scale_arcsec,
        "flags": list(res.flags),
        "solve_status": (res.solve or {}).get("status"),
        "reference": (res.reference or {}).get("catalog"),
    }


def _zp_unavailable_reason(d: dict) -> str | None:
    """Short reason why a frame has no zero point (flags and failing reference services)."""
    if d.get("zp_mag") is not None:
        return None
    parts = [str(f) for f in d.get("flags") or []]
    for svc in (d.get("reference") or {}).get("services") or []:
        if svc.get("status") == "failed" and svc.get("reason"):
            parts.append(f"{svc.get('service')}: {svc['reason']}")
    return "; ".join(dict.fromkeys(parts)) or None


@_guarded("zero_point")
def step_zero_point(fw, obs) -> dict:
    """Zero point of each photometry type; adds ``mag_cal_*`` columns; writes zeropoint.json."""
    from rpp_tasks.stages import catalogs, zeropoint
    from rpp_tasks.stages.astrometry import propagate_proper_motion

    cfg = obs.stages.zero_point
    if not cfg.enabled:
        return {"enabled": False}
    band = fw.meta.get("band")
    ref_cat, ref_band = reference_for_band(obs, band)
    cone = _field_cone(fw.header, fw.data.shape) if fw.data is not None else None
    mjd = _mid_mjd(fw.meta)
    x, ref, info = float("nan"), None, None
    lat, lon, site_src = _site(obs, fw.header)
    if cone is not None:
        if lat is not None:
            x = zeropoint.airmass(
                cone[0],
                cone[1],
                mjd if mjd is not None else float("nan"),
                latitude_deg=lat,
                longitude_deg=lon,
            )
        rr = catalogs.fetch_reference(
            *cone, catalog=ref_cat, band=ref_band, setup=services_setup(obs)
        )
        info = rr.to_dict()
        ref = rr.table if rr.ok else None
        if ref is not None:
            ref = ref.copy(copy_data=False)
            ref["ra"], ref["dec"] = propagate_proper_motion(ref, fw.meta.get("mjd_obs"))
            ref_cat = rr.catalog
    k = cfg.extinction_mag_per_airmass.get(
        band or "", cfg.extinction_mag_per_airmass.get(ref_band, 0.0)
    )
    out, zps = zeropoint.calibrate_catalog(
        fw.catalog,
        ref,
        band=band,
        ref_band=ref_band,
        ref_catalog=ref_cat,
        airmass_value=x,
        extinction_k_mag=k,
        match_radius_arcsec=cfg.match_radius_arcsec,
        clip_sigma=cfg.clip_sigma,
        max_residual_mag=cfg.max_residual_mag,
        min_stars=cfg.min_stars,
        min_snr=cfg.min_snr,
        ref_mag_range=cfg.ref_mag_range,
        colour_term=cfg.colour_term,
    )
    d = zps.to_dict()
    d["reference"] = info
    d["airmass_site"] = site_src
    d["airmass_header"], mismatch = _header_airmass_mismatch(x, fw.header, lat, lon, site_src)
    if mismatch:
        log.warning("[%s] %s", fw.stem, mismatch)
        d["flags"] = list(d["flags"]) + ["airmass_header_mismatch"]
    if cone is None:
        d["flags"] = list(d["flags"]) + ["no_wcs"]
    if lat is None:
        d["flags"] = list(d["flags"]) + ["site_not_configured"]
    out.meta["zero_point"] = d["types"]
    out.meta["zero_point_summary"] = {
        key: d[key]
        for key in (
            "band",
            "ref_catalog",
            "ref_band",
            "airmass",
            "extinction_k_mag",
            "zp_mag",
            "zp_err_mag",
            "n_zp_stars",
        )
    }
    out.meta["reference_services"] = (info or {}).get("services", [])
    fw.catalog = out
    write_json_atomic(fw.outdir / "zeropoint.json", d)
    return {
        "zp_mag": d["zp_mag"],
        "zp_err_mag": d["zp_err_mag"],
        "n_zp_stars": d["n_zp_stars"],
        "airmass": d["airmass"],
        "airmass_site": site_src,
        "extinction_k_mag": d["extinction_k_mag"],
        "ref_catalog": d["ref_catalog"],
        "ref_band": ref_band,
        "transformed": bool((info or {}).get("transformed")),
        "flags": d["flags"],
        "reason": _zp_unavailable_reason(d),
        "zp_by_type": {t: v["zp_mag"] for t, v in d["types"].items()},
    }


@_guarded("enrich")
def step_enrich(fw, obs) -> dict:
    """Gaia id, SIMBAD, SkyBoT, VSX, Milliquas, Astro-Colibri columns; statuses in catalog meta."""
    from rpp_tasks.stages import enrich

    cone = _field_cone(fw.header, fw.data.shape) if fw.data is not None else None
    if cone is None:
        cone = (float("nan"),) * 3
    out, res = enrich.enrich_catalog(
        fw.catalog,
        center_ra_deg=cone[0],
        center_dec_deg=cone[1],
        radius_deg=cone[2],
        mjd=_mid_mjd(fw.meta),
        setup=services_setup(obs),
        match_radius_arcsec=obs.stages.transients.match_radius_arcsec,
    )
    fw.catalog = out
    d = res.to_dict()
    return {
        "services": {k: v["status"] for k, v in d["services"].items()},
        "counts": d["counts"],
        "reasons": {k: v["reason"] for k, v in d["services"].items() if v["status"] == "failed"},
    }


@_guarded("transients")
def step_transients(fw, obs) -> dict:
    """Candidates absent from Gaia (after SSO/edge/flag removal) -> candidates.ecsv + cutouts."""
    from rpp_tasks.stages import transients

    cfg = obs.stages.transients
    if not cfg.enabled:
        return {"enabled": False}
    cat = fw.catalog
    gaia = (cat.meta.get("enrichment") or {}).get("gaia", {})
    res = transients.find_candidates(
        cat,
        reference_available=gaia.get("status") in ("ok", "cached"),
        min_snr=cfg.min_snr,
        max_candidates=cfg.max_candidates,
    )
    cand = res.candidates
    paths = []
    if len(cand) and fw.data is not None:
        data = fw.data - fw.background if fw.background is not None else fw.data
        paths = transients.write_cutouts(data, cand, fw.outdir / "cutouts", size_px=cfg.cutout_px)
    cand = cand.copy()
    cand["cutout"] = np.asarray(
        [p.split("/")[-1] for p in paths] if paths else [""] * len(cand), dtype=str
    )
    cand.meta = {"frame": fw.stem, **res.to_dict()}
    cand.write(fw.outdir / "candidates.ecsv", format="ascii.ecsv", overwrite=True)
    return res.to_dict()
