"""Per-frame pipeline steps for the sky calibration stages (astrometry, zero point, enrichment,
transients). `rpp_tasks.session.pipeline` registers them in its ordered stage list; each step takes the
in-memory `~rpp_tasks.session.pipeline.FrameWork` and the observatory config, writes its small product
file into the frame folder and returns a JSON-safe summary.

These stages depend on outside services. They never stop a frame: a service that is down, or an
unexpected error inside one of them, is recorded (``status: failed`` with the reason) and the
catalogue from the stages that could run is still written (issue: "never lose the catalogue").
"""

from __future__ import annotations

import functools
import logging
import math
import traceback

import numpy as np

from rpp_tasks.session.workdir import write_json_atomic

__all__ = [
    "step_astrometry",
    "step_zero_point",
    "step_enrich",
    "step_transients",
    "services_setup",
    "reference_for_band",
]

log = logging.getLogger(__name__)


def _guarded(stage):
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(fw, obs):
            try:
                return fn(fw, obs)
            except Exception as exc:  # an optional stage must not lose the catalogue
                from rpp_tasks.exceptions import FrameRejected

                if isinstance(exc, FrameRejected):
                    raise
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
    import os

    try:
        return _setup_cached(obs.catalogs, os.environ.get("RPP_ASTRO_COLIBRI_UID"))
    except TypeError:  # unhashable config (dict fields): build it each time
        from rpp_tasks.stages import catalogs

        return catalogs.client_from_config(obs.catalogs)


def reference_for_band(obs, band: str | None) -> tuple[str, str]:
    """(catalogue, reference band) for a frame band from ``catalogs.bands`` (Gaia G when unknown)."""
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
    """(latitude, east longitude, source) for the airmass: the observatory config, or -- when the config
    leaves the site at its unset default (0, 0) -- the header's SITELAT/SITELONG (or LAT-OBS/LONG-OBS,
    OBSGEO-B/OBSGEO-L); (None, None, "none") when neither says where the telescope is."""
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


def _mid_mjd(meta):
    mjd = meta.get("mjd_obs")
    if mjd is None:
        return None
    return float(mjd) + 0.5 * float(meta.get("exptime_s") or 0.0) / 86400.0


# ----------------------------------------------------------------------------- steps
@_guarded("astrometry")
def step_astrometry(fw, obs) -> dict:
    """Plate solve when needed, refine against Gaia; the WCS goes into ``fw.header`` (and calibrated.fits)."""
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
    out = res.to_dict()
    write_json_atomic(fw.outdir / "astrometry.json", out)
    from rpp_tasks.inputs.wcs import header_wcs

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


@_guarded("zero_point")
def step_zero_point(fw, obs) -> dict:
    """Zero point of each photometry type; adds ``mag_cal_*`` columns; writes zeropoint.json."""
    from rpp_tasks.stages import catalogs, zeropoint

    cfg = obs.stages.zero_point
    if not cfg.enabled:
        return {"enabled": False}
    cat = fw.catalog
    band = fw.meta.get("band")
    ref_cat, ref_band = reference_for_band(obs, band)
    cone = _field_cone(fw.header, fw.data.shape) if fw.data is not None else None
    mjd = _mid_mjd(fw.meta)
    x = float("nan")
    ref = None
    info = None
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
            from rpp_tasks.stages.astrometry import propagate_proper_motion

            ref = ref.copy(copy_data=False)
            ref["ra"], ref["dec"] = propagate_proper_motion(ref, fw.meta.get("mjd_obs"))
            ref_cat = rr.catalog
    k = cfg.extinction_mag_per_airmass.get(
        band or "", cfg.extinction_mag_per_airmass.get(ref_band, 0.0)
    )
    out, zps = zeropoint.calibrate_catalog(
        cat,
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
    if cone is None:
        d["flags"] = list(d["flags"]) + ["no_wcs"]
    if lat is None:
        d["flags"] = list(d["flags"]) + ["site_not_configured"]
    out.meta["zero_point"] = d["types"]
    out.meta["zero_point_summary"] = {
        k2: d[k2]
        for k2 in (
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
        "ref_catalog": d["ref_catalog"],
        "ref_band": ref_band,
        "transformed": bool((info or {}).get("transformed")),
        "flags": d["flags"],
        "zp_by_type": {t: v["zp_mag"] for t, v in d["types"].items()},
    }


@_guarded("enrich")
def step_enrich(fw, obs) -> dict:
    """Gaia id, SIMBAD, SkyBoT, VSX, Milliquas, Astro-Colibri columns; statuses in catalog meta."""
    from rpp_tasks.stages import enrich

    cone = _field_cone(fw.header, fw.data.shape) if fw.data is not None else None
    setup = services_setup(obs)
    if cone is None:
        cone = (float("nan"),) * 3
    out, res = enrich.enrich_catalog(
        fw.catalog,
        center_ra_deg=cone[0],
        center_dec_deg=cone[1],
        radius_deg=cone[2],
        mjd=_mid_mjd(fw.meta),
        setup=setup,
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
    """Candidates absent from Gaia (after SSO/edge/flag removal) -> candidates.ecsv + PNG cutouts."""
    from rpp_tasks.stages import transients

    cfg = obs.stages.transients
    if not cfg.enabled:
        return {"enabled": False}
    cat = fw.catalog
    gaia = (cat.meta.get("enrichment") or {}).get("gaia", {})
    ref_ok = gaia.get("status") in ("ok", "cached")
    res = transients.find_candidates(
        cat, reference_available=ref_ok, min_snr=cfg.min_snr, max_candidates=cfg.max_candidates
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
