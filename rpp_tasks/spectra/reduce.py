"""Session driver: a night's long-slit frames by role -> one BeSS spectrum per target.

`reduce_longslit_session` is a plain function: it takes each target's frames by role (target
exposures, lamp, flats, darks, offsets), builds the masters once per set of calibration files,
and reduces every target independently -- a target that cannot be reduced (no lamp, a lamp
without recognisable lines, no trace, a saturated spectrum, an unreadable file) is rejected with
its reason and the stage that rejected it, and the other targets go on. A night where no target
is reduced is reported as such (``n_ok == 0``), never as a silent success.

Per target: read -> orient -> calibrate (offset, dark scaled by exposure, long-slit flat) ->
trace -> saturation check -> cosmic rays (L.A.Cosmic on a band around the trace) -> lamp
(combined, calibrated) -> slit tilt/curvature -> lamp spectrum along the trace -> wavelength
solution -> per exposure: sky, optimal extraction, zero-point (flexure) check -> resampling on a
linear grid -> weighted combination -> heliocentric correction -> optional response -> products.

The frames by role, the setup and the masters come from `rpp_tasks.spectra.plan`
(`plan_session`, `build_masters`; re-exported here). `run_spectra` reduces a folder in one call
(tests, bench); the DAG's ``longslit`` stage table calls the adapters of
`rpp_tasks.spectra.session`, which call `build_masters` and `reduce_longslit_session`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rpp_tasks.exceptions import FrameRejected
from rpp_tasks.jsonsafe import json_safe
from rpp_tasks.spectra.plan import (  # noqa: F401 (re-exported: the planning moved to plan.py)
    TargetFrames,
    _masters,
    _meta,
    _read,
    _Timer,
    build_masters,
    effective_setup,
    frames_from_headers,
    frames_from_twospot,
    plan_session,
)

__all__ = [
    "TargetFrames",
    "TargetOutcome",
    "SpectraSessionResult",
    "effective_setup",
    "frames_from_twospot",
    "frames_from_headers",
    "reduce_longslit_session",
    "plan_session",
    "build_masters",
    "reduce_with_response",
    "run_spectra",
]

log = logging.getLogger(__name__)
_C_KMS = 299792.458


@dataclass(frozen=True)
class TargetOutcome:
    """What happened to one target: products, or the reason it was rejected."""

    name: str
    ok: bool
    reason: str | None = None
    stage: str | None = None
    products: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    timings_cpu_s: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SpectraSessionResult:
    """Outcome of a night: one `TargetOutcome` per target, masters, timings."""

    outcomes: tuple[TargetOutcome, ...]
    masters: dict
    timings_cpu_s: dict
    out_dir: str

    @property
    def n_ok(self) -> int:
        return sum(o.ok for o in self.outcomes)

    @property
    def n_rejected(self) -> int:
        return sum(not o.ok for o in self.outcomes)

    def to_dict(self) -> dict:
        return {
            "n_targets": len(self.outcomes),
            "n_ok": self.n_ok,
            "n_rejected": self.n_rejected,
            "outcomes": [o.to_dict() for o in self.outcomes],
            "masters": self.masters,
            "timings_cpu_s": self.timings_cpu_s,
            "out_dir": self.out_dir,
        }


# ----------------------------------------------------------------------------- helpers
def _write_2d(path, cal, header):
    from astropy.io import fits

    h = header.copy()
    h["BUNIT"] = "adu"
    h["HISTORY"] = "rpp_tasks.spectra: offset, dark, flat, cosmic rays corrected"
    hdus = fits.HDUList(
        [
            fits.PrimaryHDU(data=cal.data.astype(np.float32), header=h),
            fits.ImageHDU(data=cal.variance.astype(np.float32), name="VARIANCE"),
            fits.ImageHDU(data=cal.mask.astype(np.uint8), name="MASK"),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    hdus.writeto(path, overwrite=True)


def _safe(name):
    return (
        "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).strip("_") or "target"
    )


def _jd(iso):
    from astropy.time import Time

    return float(Time(iso, scale="utc").jd)


# ----------------------------------------------------------------------------- one target
def _reduce_target(name, frames, masters, *, spec, camera, site, out_dir, night, extra, timer):
    """Reduce one target; raises FrameRejected(reason, stage=...) when it cannot."""
    import astropy.units as u
    from astropy.time import Time

    from rpp_tasks.spectra import calib, combine, products, wavecal
    from rpp_tasks.spectra import extract as ex
    from rpp_tasks.spectra import trace as tr
    from rpp_tasks.stages.cosmics import clean_cosmic_rays

    bias, dark, flat, flat_mask, illum = masters
    stem = _safe(name)
    tdir = Path(out_dir) / stem
    if not frames.target:
        raise FrameRejected("no target exposure", stage="read")
    if not frames.lamp:
        raise FrameRejected(
            "no arc lamp frame for this target: no wavelength calibration possible", stage="lamp"
        )
    with timer("read"):
        try:
            raws = _read(frames.target, spec.dispersion_axis)
            lamps = _read(frames.lamp, spec.dispersion_axis)
        except Exception as exc:
            raise FrameRejected(f"unreadable frame: {exc}", stage="read") from exc
    metas = [_meta(h, p, camera) for _, h, p in raws]
    gain = metas[0].gain_e_per_adu or camera["gain_e_per_adu"]
    rn = metas[0].read_noise_e or camera["read_noise_e"]
    sat = camera["saturation_adu"]
    shape = raws[0][0].shape
    for d, _, p in raws + lamps:
        if d.shape != shape:
            raise FrameRejected(f"{Path(p).name}: shape {d.shape} != {shape}", stage="read")
    kw = dict(
        gain_e_per_adu=gain,
        read_noise_e=rn,
        saturation_adu=sat,
        master_bias=bias,
        master_dark_rate=dark,
        flat=flat,
        flat_mask=flat_mask,
    )
    with timer("calibrate"):
        cals = [
            calib.calibrate_longslit(d, exptime_s=m.exptime_s or 0.0, **kw)
            for (d, _, _), m in zip(raws, metas)
        ]
        lamp_stack = []
        for d, h, p in lamps:
            lm = _meta(h, p, camera)
            lamp_stack.append(calib.calibrate_longslit(d, exptime_s=lm.exptime_s or 0.0, **kw))
        lamp_data = (
            lamp_stack[0].data
            if len(lamp_stack) == 1
            else np.median(np.stack([c.data for c in lamp_stack]), axis=0)
        )
    ny, nx = shape
    half = spec.bin_size_px / 2.0
    # trace on the sum of the exposures (robust to one bad exposure)
    with timer("trace"):
        stack = np.sum([c.data for c in cals], axis=0) if len(cals) > 1 else cals[0].data
        mask_any = np.any([c.mask for c in cals], axis=0)
        trc = tr.find_trace(stack, mask=mask_any, y_guess=spec.spectrum_y_px, rows=illum, n_bins=24)
    if not trc.found:
        raise FrameRejected(f"trace not found: {trc.reason}", stage="trace")
    x = np.arange(nx)
    core = np.abs(np.arange(ny)[:, None] - trc.y_px[None, :]) <= max(1.0, 0.5 * trc.fwhm_px)
    for c, (_, _, p) in zip(cals, raws):
        frac = float(np.count_nonzero((c.saturated & core).any(axis=0)) / nx)
        if frac > spec.max_saturated_fraction:
            raise FrameRejected(
                f"saturated spectrum: {Path(p).name} has saturated pixels in the trace core "
                f"over {100 * frac:.1f} % of the columns "
                f"(limit {100 * spec.max_saturated_fraction:g} %)",
                stage="saturation",
            )
    # cosmic rays on the band that the sky and the extraction use
    y0 = max(0, int(np.floor(trc.y_px.min() - spec.sky_offset_px - spec.sky_width_px - 4)))
    y1 = min(ny, int(np.ceil(trc.y_px.max() + spec.sky_offset_px + spec.sky_width_px + 5)))
    # the trace core is left to the optimal extraction's outlier rejection: L.A.Cosmic's
    # neighbour tests misfire on a steep, bright spatial profile (and a 5x5 median fill there
    # would be wrong); the wings and the sky windows are cleaned here
    protect = np.abs(np.arange(y0, y1)[:, None] - trc.y_px[None, :]) <= 1.5 * trc.fwhm_px + 2
    n_cr = []
    with timer("cosmics"):
        for c in cals:
            band = c.data[y0:y1]
            try:
                cr = clean_cosmic_rays(
                    band,
                    gain_e_per_adu=gain,
                    read_noise_e=rn,
                    saturation_adu=np.inf,
                    mask=c.mask[y0:y1] | protect,
                )
                band[...] = cr.cleaned
                c.mask[y0:y1] |= cr.mask
                n_cr.append(cr.n_pixels)
            except ValueError as exc:
                log.warning("%s: cosmic-ray cleaning skipped: %s", name, exc)
                n_cr.append(0)
    with timer("curvature"):
        cur = tr.measure_slit_curvature(lamp_data, y_ref=trc.at(trc.x_c), rows=illum)
    with timer("wavelength"):
        yy = np.arange(ny)[:, None]
        inap = np.abs(yy - trc.y_px[None, :]) <= half
        n_ap = inap.sum(axis=0)
        with np.errstate(invalid="ignore"):
            lamp_spec = np.nanmedian(np.where(inap, lamp_data, np.nan), axis=0) * n_ap
        sol = wavecal.solve_wavelength(
            lamp_spec,
            elements=spec.lamp_elements,
            dispersion_a_per_px=spec.dispersion_a_per_px,
            central_wavelength_a=spec.central_wavelength_a,
            wavelength_range_a=spec.wavelength_range_a,
            degree=spec.poly_degree,
            min_lines=spec.min_lamp_lines,
            dispersion_tolerance=spec.dispersion_tolerance,
        )
    if not sol.ok:
        raise FrameRejected(f"wavelength calibration failed: {sol.reason}", stage="wavelength")
    flags = list(sol.flags)
    if spec.resolving_power and not (
        0.5 * spec.resolving_power < sol.resolving_power < 2.0 * spec.resolving_power
    ):
        flags.append("resolving_power_unexpected")
    lam_cols = sol.wavelength(x)
    # per exposure: sky, extraction, zero point, resampling
    exts, zps, per_exp = [], [], []
    for c, m, (_, _, p) in zip(cals, metas, raws):
        with timer("sky"):
            try:
                sky = ex.model_sky(
                    c.data,
                    trace_y=trc.y_px,
                    aperture_half_px=half,
                    sky_offset_px=spec.sky_offset_px,
                    sky_width_px=spec.sky_width_px,
                    mask=c.mask,
                    offset=cur.offset if cur.ok else None,
                    rows=illum,
                )
            except ValueError as exc:
                raise FrameRejected(f"sky: {exc}", stage="sky") from exc
        with timer("extract"):
            fl = 1.0 if flat is None else flat
            dark_e = 0.0 if dark is None else np.clip(dark, 0, None) * (m.exptime_s or 0.0)
            var_read = ((rn / gain) ** 2 + (dark_e / gain if bias is not None else 0.0)) / (
                np.asarray(fl, np.float32) ** 2
            )
            e = ex.extract_spectrum(
                c.data,
                trace_y=trc.y_px,
                aperture_half_px=half,
                sky=sky,
                var_read=var_read,
                flat=fl,
                gain_e_per_adu=gain,
                mask=c.mask,
                method=spec.extraction,
            )
        with timer("zero_point"):
            if spec.zero_point == "auto":
                zp = wavecal.measure_zero_point_shift(
                    lam_cols, e.flux, sky=e.sky, resolution_a=sol.fwhm_a
                )
            else:
                zp = wavecal.ZeroPointShift(0.0, float("nan"), 0, reason="disabled")
        exts.append(e)
        zps.append(zp)
        per_exp.append(
            {
                "file": Path(p).name,
                "date_obs": m.date_obs,
                "exptime_s": m.exptime_s,
                "extraction": e.to_dict(),
                "sky": sky.to_dict(),
                "zero_point": zp.to_dict(),
                "calibration": c.to_dict(),
            }
        )
    # one zero point for the night's target: median of the significant exposure shifts
    shifts = [z.shift_a for z in zps if z.applied]
    zp_shift = float(np.median(shifts)) if shifts else 0.0
    if shifts:
        flags.append("zero_point_corrected")
    # heliocentric correction
    dates = [m.date_obs for m in metas if m.date_obs]
    exptimes = [float(m.exptime_s or 0.0) for m in metas]
    t_start = min(dates) if dates else None
    mid_iso = None
    if dates:
        tt = Time(sorted(dates))
        mid = tt[0] + (tt[-1] - tt[0]) / 2 + (exptimes[-1] / 2.0) / 86400.0 * u.day
        mid_iso = mid.isot
    ra, dec = metas[0].ra_deg, metas[0].dec_deg
    v_hel = None
    if ra is not None and dec is not None and mid_iso and site["configured"]:
        with timer("heliocentric"):
            v_hel = combine.heliocentric_correction(
                ra_deg=ra,
                dec_deg=dec,
                time_iso=mid_iso,
                longitude_deg=site["longitude_deg"],
                latitude_deg=site["latitude_deg"],
                elevation_m=site["elevation_m"],
            )
    else:
        flags.append("no_heliocentric_correction")
    applied_vhel = 0.0
    with timer("resample"):
        lam_exp = lam_cols - zp_shift  # features measured zp_shift too red: move them back
        if spec.heliocentric == "apply" and v_hel is not None:
            lam_exp = lam_exp * (1.0 + v_hel / _C_KMS)
            applied_vhel = v_hel
        step = spec.resample_step_a or float(abs(np.median(np.diff(lam_exp))))
        grid = combine.linear_grid([(lam_exp.min(), lam_exp.max())], step_a=round(step, 4))
        res = [combine.resample_to_grid(lam_exp, e.flux, e.variance, grid) for e in exts]
    with timer("combine"):
        comb = combine.combine_exposures([r[0] for r in res], [r[1] for r in res])
    flux, var = comb.flux, comb.variance
    calibrated_flux = False
    response_note = None
    ref = extra.get("response")
    if ref is not None:
        flux, var = combine.apply_response(flux, var, np.interp(grid.wavelength_a, *ref))
        calibrated_flux = True
        response_note = extra.get("response_source")
    else:
        flags.append("not_flux_calibrated")
    # products
    with timer("products"):
        date_tag = (night or (t_start or "")[:10]).replace("-", "")
        base = f"{stem}_{date_tag}" if date_tag else stem
        h0 = raws[0][1]
        telescope = metas[0].telescope or camera.get("telescope") or ""
        inst = spec.bss_inst or " ".join(v for v in (telescope, spec.name) if v)
        with np.errstate(invalid="ignore"):
            norm = (
                float(np.nanmedian(flux[np.isfinite(flux) & (flux > 0)]))
                if np.any(flux > 0)
                else 1.0
            )
        keywords = {
            "OBJNAME": (str(name), "target"),
            "OBJECT": (str(metas[0].object or name), "header OBJECT of the first exposure"),
            "DATE-OBS": (t_start or "", "[UTC] start of the first exposure"),
            "EXPTIME": (float(sum(exptimes)), "[s] total exposure"),
            "EXPTIME2": (products.format_exptime2(exptimes), "exposure decomposition"),
            "JD-OBS": (_jd(t_start) if t_start else 0.0, "JD start of the observation"),
            "JD-MID": (_jd(mid_iso) if mid_iso else 0.0, "JD middle of the observation"),
            "BSS_INST": (inst[:68], "instrument"),
            "BSS_SITE": ((spec.bss_site or site.get("name") or "")[:68], "observation site"),
            "BSS_VHEL": (float(applied_vhel), "[km/s] heliocentric correction applied"),
            "BSS_TELL": ("", "telluric correction (none)"),
            "BSS_COSM": ("L.A.Cosmic", "cosmic rays removed"),
            "SPE_RPOW": (int(round(sol.resolving_power)), "resolving power from lamp lines"),
            "GEO_LONG": (float(site["longitude_deg"]), "[deg] site longitude, east positive"),
            "GEO_LAT": (float(site["latitude_deg"]), "[deg] site latitude"),
            "GEO_ELEV": (float(site["elevation_m"]), "[m] site elevation"),
            "OBSERVER": (
                str(spec.observer or metas[0].observer or h0.get("OBSERVER", ""))[:68],
                "",
            ),
            "TELESCOP": (telescope[:68], "telescope"),
            "BUNIT": ("relative flux" if not calibrated_flux else "relative flux (response)", ""),
            "VHELIO": (
                float(v_hel) if v_hel is not None else 0.0,
                "[km/s] heliocentric correction computed",
            ),
            "WAV_RMS": (round(sol.rms_a, 4), "[Angstrom] lamp solution RMS"),
            "WAV_RMSP": (round(sol.rms_px, 4), "[px] lamp solution RMS"),
            "WAV_NLIN": (sol.n_lines, "lamp lines used"),
            "WAV_DEG": (sol.degree, "polynomial degree"),
            "WAV_ZP": (round(-zp_shift, 3), "[A] zero-point (flexure) correction added"),
            "WAV_LAMP": ("+".join(sol.elements), "lamp elements"),
            "SNR": (round(comb.snr_median, 1), "median S/N per pixel"),
            "FLUXCAL": (calibrated_flux, "instrumental response applied"),
        }
        for k, v in (extra.get("weather") or {}).items():
            keywords[k] = v
        history = [
            f"rpp_tasks.spectra: {len(raws)} exposure(s), {e.method} extraction",
            f"lamp {Path(frames.lamp[0]).name}: {sol.n_lines} lines, RMS {sol.rms_a:.3f} A",
        ]
        if response_note:
            history.append(f"response from {response_note}")
        fits_path = products.write_bess_fits(
            tdir / f"{base}.fits",
            flux=flux / norm,
            crval1=grid.crval1,
            cdelt1=grid.cdelt1,
            keywords=keywords,
            history=history,
        )
        err = np.sqrt(var) / norm
        ecsv_path = products.write_spectrum_ecsv(
            tdir / f"{base}.ecsv",
            wavelength_a=grid.wavelength_a,
            flux=flux / norm,
            error=err,
            meta={k: v[0] if isinstance(v, tuple) else v for k, v in keywords.items()},
        )
        lamp_path = products.write_lamp_solution(tdir / f"{base}_lamp_solution.ecsv", sol)
        png = products.plot_spectrum(
            grid.wavelength_a,
            flux / norm,
            err,
            title=f"{name}  {t_start or ''}  {products.format_exptime2(exptimes)}  "
            f"R={sol.resolving_power:.0f}  S/N={comb.snr_median:.0f}",
        )
        (tdir / f"{base}_spectrum.png").write_bytes(png)
        (tdir / f"{base}_wavesol.png").write_bytes(products.plot_wavelength_residuals(sol))
        two_d = []
        for c, (_, h, p) in zip(cals, raws):
            q = tdir / "2d" / f"{Path(p).stem}_calibrated.fits"
            _write_2d(q, c, h)
            two_d.append(str(q))
    wl = grid.wavelength_a
    summary = {
        "target": name,
        "n_exposures": len(raws),
        "exptime_total_s": float(sum(exptimes)),
        "exptime2": products.format_exptime2(exptimes),
        "date_obs": t_start,
        "jd_mid": _jd(mid_iso) if mid_iso else None,
        "ra_deg": ra,
        "dec_deg": dec,
        "trace": trc.to_dict(),
        "curvature": cur.to_dict(),
        "wavelength": {k: v for k, v in sol.to_dict().items() if k != "lines"},
        "zero_point_shift_a": zp_shift,
        "v_helio_kms": v_hel,
        "v_helio_applied_kms": applied_vhel,
        "grid": grid.to_dict(),
        "wavelength_min_a": float(wl[0]),
        "wavelength_max_a": float(wl[-1]),
        "resolving_power": sol.resolving_power,
        "snr_median": comb.snr_median,
        "combine": comb.to_dict(),
        "cosmic_ray_px": n_cr,
        "flux_calibrated": calibrated_flux,
        "flags": flags,
        "exposures": per_exp,
    }
    prods = {
        "bess_fits": str(fits_path),
        "ecsv": str(ecsv_path),
        "lamp_solution": str(lamp_path),
        "spectrum_png": str(tdir / f"{base}_spectrum.png"),
        "wavesol_png": str(tdir / f"{base}_wavesol.png"),
        "calibrated_2d": two_d,
    }
    (tdir / "summary.json").write_text(json.dumps(json_safe(summary), indent=1), encoding="utf-8")
    return prods, summary


def reduce_longslit_session(
    targets,
    *,
    spec,
    camera,
    site,
    out_dir,
    night=None,
    response=None,
    weather=None,
    masters=None,
):
    """
    Reduce a night of long-slit frames, each target independently.

    Parameters
    ----------
    targets : mapping
        Name -> `TargetFrames`.
    spec : `~rpp_tasks.config.SpectrographConfig`
        With the night's overrides applied (`effective_setup`).
    camera : mapping
        ``gain_e_per_adu``, ``read_noise_e``, ``saturation_adu`` (header values win), optional
        ``telescope``.
    site : mapping
        ``latitude_deg``, ``longitude_deg``, ``elevation_m``, ``name``; ``configured`` False when
        the site is unknown (no heliocentric correction then).
    out_dir : str or Path
        Products go to ``<out_dir>/<target>/``; the session summary to
        ``<out_dir>/spectra_summary.json``.
    night : str, optional
        Night date ``YYYY-MM-DD`` for the file names (default: the first exposure's date).
    response : (wavelength_a, response) or None
        Instrumental response to apply (from `~rpp_tasks.spectra.combine.instrumental_response`).
    weather : mapping, optional
        Extra header keywords (weather) for the products.
    masters : mapping, optional
        Masters built beforehand (`build_masters`): ``(offset, dark, flat)`` file tuple ->
        ``((bias, dark, flat, flat_mask, illum), info)``; sets not in it are built here.

    Returns
    -------
    result : `SpectraSessionResult`
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    cache = dict(masters or {})
    outcomes, masters_info = [], {f"set{i + 1}": v[1] for i, v in enumerate(cache.values())}
    site = {"configured": True, "name": None, **dict(site)}
    cam = dict(camera)
    for name, frames in targets.items():
        key = (frames.offset, frames.dark, frames.flat)
        t_target = _Timer()
        try:
            if key not in cache:
                try:
                    *m, info = _masters(
                        {"offset": frames.offset, "dark": frames.dark, "flat": frames.flat},
                        cam,
                        spec,
                        timer,
                    )
                except Exception as exc:
                    raise FrameRejected(f"calibration masters: {exc}", stage="masters") from exc
                cache[key] = (tuple(m), info)
                masters_info[f"set{len(cache)}"] = info
            m, info = cache[key]
            extra = {"weather": weather}
            if response is not None:
                extra["response"] = response
                extra["response_source"] = spec.reference_star
            prods, summary = _reduce_target(
                name,
                frames,
                m,
                spec=spec,
                camera=cam,
                site=site,
                out_dir=out_dir,
                night=night,
                extra=extra,
                timer=t_target,
            )
            outcomes.append(
                TargetOutcome(
                    name=name,
                    ok=True,
                    products=prods,
                    summary=summary,
                    timings_cpu_s=dict(t_target.t),
                )
            )
        except FrameRejected as exc:
            log.warning("target %s rejected: %s", name, exc)
            outcomes.append(
                TargetOutcome(
                    name=name,
                    ok=False,
                    reason=exc.reason,
                    stage=exc.stage,
                    timings_cpu_s=dict(t_target.t),
                )
            )
        except Exception as exc:  # one target never takes the night down
            log.exception("target %s failed", name)
            outcomes.append(
                TargetOutcome(
                    name=name,
                    ok=False,
                    reason=f"{type(exc).__name__}: {exc}",
                    stage="error",
                    timings_cpu_s=dict(t_target.t),
                )
            )
        for k, v in t_target.t.items():
            timer.t[k] = timer.t.get(k, 0.0) + v
    result = SpectraSessionResult(
        outcomes=tuple(outcomes),
        masters=masters_info,
        timings_cpu_s=dict(timer.t),
        out_dir=str(out_dir),
    )
    (out_dir / "spectra_summary.json").write_text(
        json.dumps(json_safe(result.to_dict()), indent=1), encoding="utf-8"
    )
    log.info(
        "spectra: %d of %d target(s) reduced, %d rejected",
        result.n_ok,
        len(outcomes),
        result.n_rejected,
    )
    return result


def run_spectra(session_folder, obs, out_dir, *, night=None) -> dict:
    """
    Adapter: reduce the long-slit session in ``session_folder`` for observatory ``obs``.

    Frames by role come from the 2SPOT files when the folder has them (``setup_config.yaml``
    overriding ``bin_size`` and ``posy``), else from headers and file-name patterns.

    Returns
    -------
    summary : dict
        `SpectraSessionResult.to_dict` (also written to ``<out_dir>/spectra_summary.json``).

    Raises
    ------
    FrameRejected
        The session has no target at all, or no target could be reduced (a night with files but
        nothing reduced is a failure).
    """
    folder = Path(session_folder)
    targets, spec, missing, site, camera = plan_session(folder, obs)
    res = reduce_with_response(
        targets, spec=spec, camera=camera, site=site, out_dir=out_dir, night=night
    )
    out = res.to_dict()
    out["missing_files"] = list(missing)
    if res.n_ok == 0:
        reasons = "; ".join(f"{o.name}: {o.reason}" for o in res.outcomes)
        raise FrameRejected(f"no target reduced ({reasons})", path=folder, stage="spectra")
    return out


def reduce_with_response(targets, *, spec, camera, site, out_dir, night=None, masters=None):
    """
    `reduce_longslit_session` of every target, with the instrumental response derived first
    from the configured reference star when the session has it (``spec.reference_star``).

    Returns
    -------
    result : `SpectraSessionResult`
    """
    response = None
    if spec.reference_star and spec.reference_star in targets:
        response = _response_from_reference(
            targets, spec, camera, site, out_dir, night, masters=masters
        )
    return reduce_longslit_session(
        targets,
        spec=spec,
        camera=camera,
        site=site,
        out_dir=out_dir,
        night=night,
        response=response,
        masters=masters,
    )


def _response_from_reference(targets, spec, camera, site, out_dir, night, *, masters=None):
    """Reduce the reference star alone and derive the response from its known spectrum."""
    from rpp_tasks.spectra import combine, products

    ref_dir = Path(out_dir) / "_response"
    res = reduce_longslit_session(
        {spec.reference_star: targets[spec.reference_star]},
        spec=spec,
        camera=camera,
        site=site,
        out_dir=ref_dir,
        night=night,
        masters=masters,
    )
    if not res.n_ok:
        log.warning("reference star %s not reduced: no response", spec.reference_star)
        return None
    obs_file = res.outcomes[0].products["ecsv"]
    from astropy.table import Table

    t = Table.read(obs_file)
    known = (
        products.read_spectrum_1d(spec.reference_spectrum)
        if str(spec.reference_spectrum).lower().endswith((".fits", ".fit"))
        else None
    )
    if known is None:
        kt = Table.read(spec.reference_spectrum)
        kw, kf = np.asarray(kt["wavelength"], float), np.asarray(kt["flux"], float)
    else:
        kw, kf = known.wavelength_a, known.flux
    resp = combine.instrumental_response(
        np.asarray(t["wavelength"], float), np.asarray(t["flux"], float), kw, kf
    )
    return np.asarray(t["wavelength"], float), resp
