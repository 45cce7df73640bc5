"""Long-slit sessions in the session lifecycle: the adapters of the ``longslit`` stage table.

The science is in `rpp_tasks.spectra.reduce` (plain functions over arrays and files); this module
is the thin layer between it and a session work folder (`rpp_tasks.session.workdir.Session`):

* `plan_manifest` (called by `rpp_tasks.session.lifecycle.open_session`): the night's targets by
  role (``last_obs.yaml``/``setup_config.yaml`` of 2SPOT, else IMAGETYP and file patterns) go into
  ``manifest.json`` (``spectra_targets``); the manifest's ``science`` list is the targets'
  exposures (lamps, flats, darks and offsets are calibration frames).
* `step_masters` (stage ``masters``): offset, dark-rate and long-slit flat masters, once per
  distinct calibration set, saved to ``spectra/masters/set<k>.npz`` with ``spectra/masters.json``.
* `step_spectra` (stage ``spectra``): every target reduced independently (calibrate, trace and
  tilt, saturation check, cosmic rays, slit curvature, wavelength solution, sky, optimal
  extraction, combination, heliocentric correction, BeSS products); a target that cannot be
  reduced is rejected with the reason and its stage, the others go on. Results per target in
  ``spectra/spectra_summary.json`` and ``spectra/<target>/``.
* `spectrum_summaries` turns that into `~rpp_tasks.session.summary.SpectrumSummary` objects for
  the session summary; `list_spectra` lists a session's spectra with their plot and product paths
  (the dashboard's spectrum page).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from rpp_tasks.exceptions import FrameRejected
from rpp_tasks.session.summary import FileOutcome, SpectrumSummary

__all__ = [
    "plan_manifest",
    "step_masters",
    "step_spectra",
    "spectrum_summaries",
    "file_outcomes",
    "list_spectra",
]

log = logging.getLogger(__name__)

SPECTRA_DIR = "spectra"
#: BeSS keywords copied from each product into its `SpectrumSummary.header`.
HEADER_KEYS = (
    "OBJNAME",
    "DATE-OBS",
    "EXPTIME",
    "EXPTIME2",
    "JD-OBS",
    "JD-MID",
    "BSS_INST",
    "BSS_SITE",
    "BSS_VHEL",
    "SPE_RPOW",
    "GEO_LONG",
    "GEO_LAT",
    "GEO_ELEV",
    "OBSERVER",
    "CRVAL1",
    "CDELT1",
    "CUNIT1",
    "NAXIS1",
    "WAV_RMS",
    "WAV_NLIN",
    "SNR",
    "FLUXCAL",
)


def _targets_from_manifest(manifest: dict):
    from rpp_tasks.spectra.plan import TargetFrames

    return {
        k: TargetFrames(**{r: (tuple(v) if isinstance(v, list) else v) for r, v in t.items()})
        for k, t in (manifest.get("spectra_targets") or {}).items()
    }


def _plan(session, obs):
    """(targets, spec, site, camera) of an opened session (the setup re-read from the folder)."""
    from rpp_tasks.spectra.plan import plan_session

    _, spec, _, site, camera = plan_session(session.raw_dir, obs)
    return _targets_from_manifest(session.read_json("manifest.json", {})), spec, site, camera


# =============================================================================== open
def plan_manifest(raw_dir, obs, manifest: dict) -> dict:
    """The manifest of a long-slit session: ``spectra_targets`` (name -> frames by role),
    ``science`` = the targets' exposures, ``missing_files``; a folder without any target gets
    ``spectra_error`` and no science (the DAG's validate then skips the run with the reason)."""
    from rpp_tasks.session.pipeline import frame_stem
    from rpp_tasks.spectra.plan import plan_session

    by_path = {f["path"]: f for f in manifest.get("frames", [])}
    try:
        targets, _, missing, _, _ = plan_session(raw_dir, obs)
    except (FrameRejected, ValueError, OSError) as exc:
        return {**manifest, "science": [], "spectra_targets": {}, "spectra_error": str(exc)}
    science, roles = [], {"lamp": set(), "flat": set(), "dark": set(), "offset": set()}
    for key, t in targets.items():
        for p in t.target:
            f = by_path.get(p, {"path": p})
            science.append(dict(f, stem=frame_stem(p), imagetyp="science", target=key))
        for r in roles:
            roles[r].update(getattr(t, r))
    return {
        **manifest,
        "science": science,
        "bias": sorted(roles["offset"]),
        "dark": sorted(roles["dark"]),
        "flat": sorted(roles["flat"]),
        "lamp": sorted(roles["lamp"]),
        "spectra_targets": {k: t.to_dict() for k, t in targets.items()},
        "missing_files": list(missing),
    }


# =============================================================================== stages
def _set_key(frames) -> tuple:
    return (tuple(frames.offset), tuple(frames.dark), tuple(frames.flat))


def step_masters(session, obs) -> dict:
    """Stage ``masters``: the masters of each calibration set, saved for the ``spectra`` stage."""
    from rpp_tasks.spectra.plan import build_masters

    t0 = time.process_time()
    targets, spec, _, camera = _plan(session, obs)
    built, errors, _ = build_masters(targets, spec, camera)
    d = session.path(SPECTRA_DIR, "masters")
    d.mkdir(parents=True, exist_ok=True)
    sets = []
    for i, (key, (arrays, info)) in enumerate(built.items(), 1):
        names = ("bias", "dark", "flat", "flat_mask", "illum")
        np.savez(
            d / f"set{i}.npz",
            **{n: a for n, a in zip(names, arrays) if a is not None},
        )
        sets.append({"key": [list(k) for k in key], "file": f"set{i}.npz", "info": info})
    for key, why in errors.items():
        sets.append({"key": [list(k) for k in key], "error": why})
    session.write_json(f"{SPECTRA_DIR}/masters.json", {"sets": sets})
    return {
        "n_sets": len(built),
        "errors": list(errors.values()),
        "cpu_s": round(time.process_time() - t0, 3),
    }


def _load_masters(session) -> dict:
    info = session.read_json(f"{SPECTRA_DIR}/masters.json", {}) or {}
    out = {}
    for s in info.get("sets", []):
        if "file" not in s:
            continue
        with np.load(session.path(SPECTRA_DIR, "masters", s["file"])) as z:
            arrays = tuple(
                z[n] if n in z.files else None for n in ("bias", "dark", "flat", "flat_mask")
            )
            illum = z["illum"] if "illum" in z.files else None
        out[tuple(tuple(k) for k in s["key"])] = ((*arrays, illum), s["info"])
    return out


def step_spectra(session, obs) -> dict:
    """Stage ``spectra``: every target reduced to its BeSS products (a rejected target keeps its
    reason and stage; the others go on)."""
    from rpp_tasks.outputs.report_html import header_facts
    from rpp_tasks.spectra.reduce import reduce_with_response

    targets, spec, site, camera = _plan(session, obs)
    out_dir = session.path(SPECTRA_DIR)
    res = reduce_with_response(
        targets,
        spec=spec,
        camera=camera,
        site=site,
        out_dir=out_dir,
        masters=_load_masters(session),
    )
    # the raw headers' facts and weather, per target (what the report shows)
    facts = {}
    for key, t in targets.items():
        headers = {}
        for p in t.target:
            try:
                from astropy.io import fits

                headers[p] = fits.getheader(p)
            except OSError:
                continue
        facts[key] = header_facts(headers)
    doc = json.loads((out_dir / "spectra_summary.json").read_text(encoding="utf-8"))
    doc["targets"] = {k: t.to_dict() for k, t in targets.items()}
    doc["header_facts"] = facts
    doc["positions"] = _positions(res.outcomes, obs)
    (out_dir / "spectra_summary.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return {
        "n_targets": len(res.outcomes),
        "n_ok": res.n_ok,
        "n_rejected": res.n_rejected,
        "rejected": {o.name: f"{o.stage}: {o.reason}" for o in res.outcomes if not o.ok},
        "cpu_s": {k: round(v, 3) for k, v in res.timings_cpu_s.items()},
    }


def _positions(outcomes, obs) -> dict:
    """Targets reduced without a header pointing: position from the target name (the
    observatory's ``targets.objects``, the name cache, then Sesame/SIMBAD when
    ``targets.resolve_online``), else the reason; used for the archive's s_ra/s_dec."""
    out = {}
    for o in outcomes:
        if not o.ok or o.summary.get("ra_deg") is not None:
            continue
        try:
            from rpp_tasks.session.adapters import services_setup
            from rpp_tasks.stages.target import resolve_target

            targets = getattr(obs, "targets", None)
            res = resolve_target(
                o.name,
                named_by="header",
                config_targets=getattr(targets, "objects", ()),
                setup=services_setup(obs),
                online=bool(getattr(targets, "resolve_online", False)),
            )
        except Exception as exc:  # a name service problem never costs the spectrum
            out[o.name] = {"reason": f"{type(exc).__name__}: {exc}"}
            continue
        if res.target is None:
            out[o.name] = {"reason": res.reason}
        else:
            t = res.target
            out[o.name] = {"ra_deg": t.ra_deg, "dec_deg": t.dec_deg, "source": t.source}
    return out


# =============================================================================== summary
def _mjd(iso) -> float | None:
    if not iso:
        return None
    from astropy.time import Time

    return float(Time(iso, scale="utc").mjd)


def spectrum_summaries(session) -> tuple[SpectrumSummary, ...]:
    """One `SpectrumSummary` per target of the session (``pending`` before the spectra stage)."""
    from rpp_tasks.outputs.obscore import read_product_header

    manifest = session.read_json("manifest.json", {}) or {}
    planned = manifest.get("spectra_targets") or {}
    doc = session.read_json(f"{SPECTRA_DIR}/spectra_summary.json", {}) or {}
    outcomes = {o["name"]: o for o in doc.get("outcomes", [])}
    facts = doc.get("header_facts") or {}
    positions = doc.get("positions") or {}
    out = []
    for key, t in planned.items():
        o = outcomes.get(t.get("name") or key) or outcomes.get(key)
        base = {
            "target": t.get("name") or key,
            "raw_paths": tuple(t.get("target") or ()),
            "lamp_paths": tuple(t.get("lamp") or ()),
            "n_exposures": len(t.get("target") or ()),
            "facts": (facts.get(key) or {}).get("facts", {}),
            "weather": (facts.get(key) or {}).get("weather", {}),
        }
        if o is None:
            out.append(SpectrumSummary(**base))
            continue
        if not o.get("ok"):
            out.append(
                SpectrumSummary(
                    **base,
                    status="rejected",
                    reason=o.get("reason"),
                    failed_stage=o.get("stage"),
                    cpu_s=o.get("timings_cpu_s") or {},
                )
            )
            continue
        s, p = o.get("summary") or {}, o.get("products") or {}
        wl = s.get("wavelength") or {}
        header = {}
        try:
            h = read_product_header(p["bess_fits"])
            header = {k: h[k] for k in HEADER_KEYS if k in h}
        except (OSError, KeyError, ValueError) as exc:
            log.warning("%s: BeSS header not read: %s", key, exc)
        exptimes = [e.get("exptime_s") or 0.0 for e in s.get("exposures") or ()]
        dates = [e.get("date_obs") for e in s.get("exposures") or () if e.get("date_obs")]
        ends = [_mjd(d) + (x or 0.0) / 86400.0 for d, x in zip(dates, exptimes) if d]
        pos = positions.get(o["name"]) or {}
        ra, dec = s.get("ra_deg"), s.get("dec_deg")
        if ra is None or dec is None:  # from the target name, when it could be resolved
            ra, dec = pos.get("ra_deg"), pos.get("dec_deg")
        out.append(
            SpectrumSummary(
                **base,
                status="ok",
                object=header.get("OBJNAME") or s.get("target"),
                exptime_s=s.get("exptime_total_s"),
                exptime2=s.get("exptime2"),
                date_obs=s.get("date_obs"),
                mjd_start=_mjd(s.get("date_obs")),
                mjd_end=max(ends) if ends else None,
                ra_deg=ra,
                dec_deg=dec,
                position_source="header" if s.get("ra_deg") is not None else pos.get("source"),
                wavelength_min_a=s.get("wavelength_min_a"),
                wavelength_max_a=s.get("wavelength_max_a"),
                dispersion_a_per_px=(s.get("grid") or {}).get("cdelt1"),
                rms_a=wl.get("rms_a"),
                rms_px=wl.get("rms_px"),
                n_lamp_lines=wl.get("n_lines"),
                resolving_power=s.get("resolving_power"),
                snr_median=s.get("snr_median"),
                flux_calibrated=bool(s.get("flux_calibrated")),
                v_helio_kms=s.get("v_helio_kms"),
                flags=tuple(s.get("flags") or ()),
                bess_fits=p.get("bess_fits"),
                ecsv=p.get("ecsv"),
                lamp_solution=p.get("lamp_solution"),
                spectrum_png=p.get("spectrum_png"),
                wavesol_png=p.get("wavesol_png"),
                calibrated_2d=tuple(p.get("calibrated_2d") or ()),
                header=header,
                cpu_s=o.get("timings_cpu_s") or {},
            )
        )
    return tuple(out)


def file_outcomes(manifest: dict, spectra) -> tuple[FileOutcome, ...]:
    """Every input file of a long-slit session with its outcome (target exposures follow their
    target; lamps, flats, darks and offsets are calibration; the rest as the plan said)."""
    by_raw = {}
    for s in spectra:
        for p in (*s.raw_paths, *s.lamp_paths):
            by_raw.setdefault(p, s)
    roles = {p: k for k in ("lamp", "flat", "dark", "bias") for p in manifest.get(k) or ()}
    out = []
    for m in manifest.get("files") or ():
        path = str(m.get("path"))
        s = by_raw.get(path)
        if path in roles and (s is None or path not in s.raw_paths):
            out.append(FileOutcome(path, roles[path], "calibration used"))
        elif s is not None:
            outcome = {"ok": "reduced"}.get(s.status, s.status)
            out.append(
                FileOutcome(path, "science", outcome, None if s.ok else s.reason, s.failed_stage)
            )
        elif m.get("outcome") == "rejected":
            out.append(FileOutcome(path, "unreadable", "rejected", m.get("reason"), "validate"))
        elif m.get("outcome") in ("ignored",):
            out.append(FileOutcome(path, "ignored", "ignored", m.get("reason")))
        else:
            out.append(
                FileOutcome(path, "unknown", "not used", "not declared for any target", "validate")
            )
    return tuple(sorted(out, key=lambda o: o.path))


# =============================================================================== dashboard
def list_spectra(workdir) -> list[dict]:
    """A session's spectra for the dashboard: one dict per target with its status, reason,
    headline figures and the paths of its plot and products (``session_summary.json`` first,
    else the spectra stage's own file)."""
    from rpp_tasks.session.summary import SessionSummary
    from rpp_tasks.session.workdir import Session, read_json

    workdir = Path(workdir)
    doc = read_json(workdir / "session_summary.json")
    if doc is not None:
        spectra = SessionSummary.from_dict(doc).spectra
    else:
        spectra = spectrum_summaries(Session.load(workdir))
    keys = (
        "target",
        "status",
        "reason",
        "failed_stage",
        "date_obs",
        "exptime2",
        "wavelength_min_a",
        "wavelength_max_a",
        "rms_a",
        "rms_px",
        "resolving_power",
        "snr_median",
        "flux_calibrated",
        "spectrum_png",
        "wavesol_png",
        "bess_fits",
        "ecsv",
        "lamp_solution",
    )
    return [{k: s.to_dict()[k] for k in keys} for s in spectra]
