"""The session summary: what a reduction produced, typed, with the night's headline facts.

`FrameSummary` is one science frame's outcome and measurements (``frames/<stem>/summary.json``);
`SessionSummary` is the session's (``session_summary.json``): its frames, every input file with
its outcome (`FileOutcome`), the masters used, the night (`night_date_for`) and the headline facts
(`Headline`) computed once, here. The report, the notifications, the browse index, the archive and
the results database read these objects; none of them recomputes a fact or parses a header.

Both are frozen dataclasses with ``to_dict``/``from_dict``; the JSON files keep the keys they had
(new keys: ``ra_deg``, ``dec_deg``, ``telescope``, ``instrument``, ``limiting_mag_cal``,
``zp_reason`` per frame; ``night_date``, ``headline``, ``files`` per session).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from rpp_tasks.jsonsafe import json_safe
from rpp_tasks.session.target_summary import TargetBand, TargetSummary, target_summaries

__all__ = [
    "FrameSummary",
    "SpectrumSummary",
    "FileOutcome",
    "Headline",
    "TargetBand",
    "TargetSummary",
    "target_summaries",
    "SessionSummary",
    "night_date_for",
    "calibrated_limiting_mag",
    "headline",
    "spectra_headline",
]


def _finite(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _median(values: Iterable) -> float | None:
    v = [x for x in (_finite(x) for x in values) if x is not None]
    return float(statistics.median(v)) if v else None


def night_date_for(mjd: float | None, longitude_deg: float) -> str | None:
    """The local night a time belongs to: the civil date at the local noon before it.

    Local time is mean solar time at the site (``longitude_deg`` east-positive / 15 hours from
    UTC), so 02:00 local time belongs to the night that started the evening before, wherever the
    site is. This is the night of the results database, the browse index and the report.
    """
    if mjd is None or not math.isfinite(float(mjd)):
        return None
    t = _dt.datetime(1858, 11, 17, tzinfo=_dt.UTC) + _dt.timedelta(days=float(mjd))
    local = t + _dt.timedelta(hours=float(longitude_deg) / 15.0) - _dt.timedelta(hours=12)
    return local.date().isoformat()


def calibrated_limiting_mag(
    limiting_mag_inst: float | None,
    *,
    zp_by_type: Mapping[str, float | None] | None,
    zp_mag: float | None,
    extinction_k_mag: float | None,
    airmass: float | None,
) -> float | None:
    """Calibrated 5-sigma limit: ``limiting_mag_inst - k X + ZP``, or None without a zero point.

    The zero point of the 1.3 FWHM aperture (the aperture of the instrumental limit) when measured,
    else the headline one; ``k X`` as for the catalogue's ``mag_cal_*`` columns.
    """
    lim = _finite(limiting_mag_inst)
    zp = _finite((zp_by_type or {}).get("1p3fwhm"))
    if zp is None:
        zp = _finite(zp_mag)
    if lim is None or zp is None:
        return None
    k = _finite(extinction_k_mag) or 0.0
    x = _finite(airmass)
    if k and x is None:
        return None
    return lim - k * (x or 0.0) + zp


# =============================================================================== frames
def gain_fix(origin: str | None) -> str:
    """What to fix when a gain from ``origin`` ("header EGAIN", "header GAIN" or "config", the
    frame's ``gain_origin``) is impossible: a header card takes precedence over the config."""
    origin = str(origin or "config")
    if origin.startswith("header"):
        return "fix the camera software's gain"
    return "set camera.gain_e_per_adu"


def gain_warning(gain: Mapping[str, Any] | None) -> str | None:
    """The observer's line for a frame's ``summary.json`` ``gain`` record
    (`rpp_tasks.session.adapters.check_gain`) when the photometry could not use the configured
    gain (``source`` is not "configured"), else None."""
    g = gain or {}
    if g.get("source") in (None, "configured") or _finite(g.get("used_e_per_adu")) is None:
        return None
    conf = _finite(g.get("configured_e_per_adu"))
    said = f"gain {conf:.3g} e-/ADU" if conf is not None else "no gain"
    origin = str(g.get("configured_from") or "config")
    where = (
        f"in the {origin.split()[-1]} header card" if origin.startswith("header") else "configured"
    )
    return (
        f"{said} {where}, impossible for the sky noise: {g['used_e_per_adu']:.3g} e-/ADU "
        f"used ({g['source']}); {gain_fix(origin)} to about that value"
    )


@dataclass(frozen=True)
class FrameSummary:
    """One science frame: outcome, normalised header facts, measurements, timings, products."""

    frame: str
    raw_path: str | None = None
    status: str = "pending"  # ok | rejected | failed | pending
    reason: str | None = None
    failed_stage: str | None = None
    observatory: str | None = None
    config_hash: str | None = None
    rpp_version: str | None = None
    object: str | None = None
    band: str | None = None
    filter_raw: str | None = None
    exptime_s: float | None = None
    date_obs: str | None = None
    mjd_obs: float | None = None
    ra_deg: float | None = None
    dec_deg: float | None = None
    telescope: str | None = None
    instrument: str | None = None
    wcs_status: str | None = None
    pixel_scale_arcsec: float | None = None
    n_sources: int | None = None
    fwhm_px: float | None = None
    fwhm_arcsec: float | None = None
    background_adu: float | None = None
    background_rms_adu: float | None = None
    #: the gain the photometry used (``used_e_per_adu``) and its ``source`` ("configured", or
    #: "sky noise bound" when the configured one was impossible for the frame's sky noise), with
    #: ``configured_e_per_adu``, ``bound_e_per_adu``, ``sky_dominated``, ``noise_ratio``
    #: (`rpp_tasks.session.adapters.check_gain`)
    gain: dict | None = None
    limiting_mag_inst: float | None = None
    limiting_mag_cal: float | None = None
    wcs_source: str | None = None
    astrometric_rms_arcsec: float | None = None
    zp_mag: float | None = None
    zp_err_mag: float | None = None
    n_zp_stars: int | None = None
    zp_reason: str | None = None
    airmass: float | None = None
    n_transient_candidates: int | None = None
    cpu_s_total: float | None = None
    wall_s_total: float | None = None
    stages: dict = field(default_factory=dict)
    calibrated: str | None = None
    catalog: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def transient_search(self) -> bool:
        """Whether a transient search with a reference catalogue ran on this frame (without one,
        ``n_transient_candidates`` is 0 but nothing could be called new)."""
        tr = (self.stages or {}).get("transients") or {}
        return "n_candidates" in tr and "no_reference" not in (tr.get("flags") or ())

    @property
    def gain_warning(self) -> str | None:
        """What the observer must fix when the photometry could not use the configured gain
        (`gain_warning`), else None."""
        return gain_warning(self.gain)

    def to_dict(self) -> dict:
        return json_safe({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FrameSummary:
        """From ``summary.json`` (keys this version does not know are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_work(
        cls,
        fw,
        obs,
        *,
        status: str = "ok",
        reason: str | None = None,
        stage: str | None = None,
    ) -> FrameSummary:
        """The summary of a frame from its in-memory state (`rpp_tasks.session.frame.FrameWork`)."""
        from rpp_tasks import __version__

        r, m = fw.results, fw.meta
        phot, astro = r.get("photometry", {}), r.get("astrometry", {})
        zp, bkg, tr = r.get("zero_point", {}), r.get("background", {}), r.get("transients", {})
        timed = [v for v in r.values() if isinstance(v, dict)]
        calibrated, catalog = fw.outdir / "calibrated.fits", fw.outdir / "catalog.ecsv"
        return cls(
            frame=fw.stem,
            raw_path=str(fw.raw_path),
            status=status,
            reason=reason,
            failed_stage=stage,
            observatory=obs.name,
            config_hash=obs.config_hash,
            rpp_version=__version__,
            object=m.get("object"),
            band=m.get("band"),
            filter_raw=m.get("filter_raw"),
            exptime_s=m.get("exptime_s"),
            date_obs=m.get("date_obs"),
            mjd_obs=m.get("mjd_obs"),
            ra_deg=m.get("ra_deg"),
            dec_deg=m.get("dec_deg"),
            telescope=m.get("telescope"),
            instrument=m.get("instrument"),
            wcs_status=astro.get("wcs_status") or m.get("wcs_status"),
            pixel_scale_arcsec=astro.get("pixel_scale_arcsec") or m.get("pixel_scale_arcsec"),
            n_sources=phot.get("n_sources", r.get("detect", {}).get("n_sources")),
            fwhm_px=phot.get("fwhm_px"),
            fwhm_arcsec=phot.get("fwhm_arcsec"),
            background_adu=bkg.get("background_adu"),
            background_rms_adu=bkg.get("background_rms_adu"),
            gain=m.get("gain_check"),
            limiting_mag_inst=phot.get("limiting_mag_inst"),
            limiting_mag_cal=calibrated_limiting_mag(
                phot.get("limiting_mag_inst"),
                zp_by_type=zp.get("zp_by_type"),
                zp_mag=zp.get("zp_mag"),
                extinction_k_mag=zp.get("extinction_k_mag"),
                airmass=zp.get("airmass"),
            ),
            wcs_source=astro.get("wcs_source"),
            astrometric_rms_arcsec=astro.get("astrometric_rms_arcsec"),
            zp_mag=zp.get("zp_mag"),
            zp_err_mag=zp.get("zp_err_mag"),
            n_zp_stars=zp.get("n_zp_stars"),
            zp_reason=zp.get("reason"),
            airmass=zp.get("airmass"),
            n_transient_candidates=tr.get("n_candidates"),
            cpu_s_total=round(sum(v.get("cpu_s", 0.0) for v in timed), 4),
            wall_s_total=round(sum(v.get("wall_s", 0.0) for v in timed), 4),
            stages=dict(r),
            calibrated=str(calibrated) if calibrated.exists() else None,
            catalog=str(catalog) if catalog.exists() else None,
        )


@dataclass(frozen=True)
class SpectrumSummary:
    """One target of a long-slit session: its 1-D spectrum's facts, or why it was rejected.

    Written by `rpp_tasks.spectra.session` (``spectra/spectra_summary.json`` per target) and kept
    in `SessionSummary.spectra`; the report, the notifications, the archive and the dashboard
    read it. Wavelengths in Angstrom; ``mjd_start``/``mjd_end`` bracket the exposures.
    """

    target: str
    status: str = "pending"  # ok | rejected
    reason: str | None = None
    failed_stage: str | None = None
    object: str | None = None
    n_exposures: int = 0
    exptime_s: float | None = None
    exptime2: str | None = None
    date_obs: str | None = None
    mjd_start: float | None = None
    mjd_end: float | None = None
    ra_deg: float | None = None
    dec_deg: float | None = None
    position_source: str | None = None  # header, or how the target name was resolved
    wavelength_min_a: float | None = None
    wavelength_max_a: float | None = None
    dispersion_a_per_px: float | None = None
    rms_a: float | None = None
    rms_px: float | None = None
    n_lamp_lines: int | None = None
    resolving_power: float | None = None
    snr_median: float | None = None
    flux_calibrated: bool = False
    v_helio_kms: float | None = None
    flags: tuple[str, ...] = ()
    raw_paths: tuple[str, ...] = ()
    lamp_paths: tuple[str, ...] = ()
    bess_fits: str | None = None
    ecsv: str | None = None
    lamp_solution: str | None = None
    spectrum_png: str | None = None
    wavesol_png: str | None = None
    calibrated_2d: tuple[str, ...] = ()
    header: dict = field(default_factory=dict)  # BeSS keywords of the product
    facts: dict = field(default_factory=dict)  # who/what/where from the raw headers
    weather: dict = field(default_factory=dict)  # weather keywords (min/median/max)
    cpu_s: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return json_safe({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpectrumSummary:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("flags", "raw_paths", "lamp_paths", "calibrated_2d"):
            kw[k] = tuple(kw.get(k) or ())
        return cls(**kw)


def spectra_headline(spectra: Iterable[SpectrumSummary]) -> Headline:
    """The headline of a long-slit session: targets instead of frames."""
    spectra = list(spectra)
    ok = [s for s in spectra if s.ok]
    dates = sorted(str(s.date_obs) for s in spectra if s.date_obs)
    return Headline(
        n_science=len(spectra),
        n_ok=len(ok),
        n_rejected=len(spectra) - len(ok),
        objects=tuple(sorted({str(s.object or s.target) for s in spectra})),
        first_date_obs=dates[0] if dates else None,
        last_date_obs=dates[-1] if dates else None,
        total_exptime_s=float(sum(_finite(s.exptime_s) or 0.0 for s in ok)),
    )


@dataclass(frozen=True)
class FileOutcome:
    """What became of one input file of the session."""

    path: str
    kind: str  # science | bias | dark | flat | unknown | unreadable | ignored
    #: reduced | rejected | failed | pending | calibration used | calibration rejected | not used
    #: | ignored
    outcome: str
    reason: str | None = None
    stage: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# =============================================================================== headline
@dataclass(frozen=True)
class Headline:
    """The night at a glance, as the report, the e-mail, Telegram and the index show it.

    ``limiting_mag`` is the deepest calibrated 5-sigma limit of the frames with a zero point
    (``limiting_mag_kind = "calibrated"``), else the deepest instrumental one. Sky, FWHM and zero
    point are medians over the reduced frames. ``n_transient_candidates`` is None when no frame
    had a transient search with a reference catalogue.
    """

    n_science: int = 0
    n_ok: int = 0
    n_rejected: int = 0
    median_fwhm_arcsec: float | None = None
    median_fwhm_px: float | None = None
    median_sky_adu: float | None = None
    min_sky_adu: float | None = None
    max_sky_adu: float | None = None
    median_zp_mag: float | None = None
    limiting_mag: float | None = None
    limiting_mag_kind: str | None = None  # calibrated | instrumental
    n_sources: int = 0
    n_transient_candidates: int | None = None
    objects: tuple[str, ...] = ()
    bands: tuple[str, ...] = ()
    first_date_obs: str | None = None
    last_date_obs: str | None = None
    total_exptime_s: float = 0.0

    def to_dict(self) -> dict:
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Headline:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("objects", "bands"):
            kw[k] = tuple(kw.get(k) or ())
        return cls(**kw)


def headline(frames: Iterable[FrameSummary], *, n_science: int | None = None) -> Headline:
    """The headline facts of a session's frames (the one definition)."""
    frames = list(frames)
    ok = [f for f in frames if f.ok]
    sky = [v for v in (_finite(f.background_adu) for f in ok) if v is not None]
    cal = [v for v in (_finite(f.limiting_mag_cal) for f in ok) if v is not None]
    inst = [v for v in (_finite(f.limiting_mag_inst) for f in ok) if v is not None]
    cands = [int(f.n_transient_candidates or 0) for f in ok if f.transient_search]
    dates = sorted(str(f.date_obs) for f in frames if f.date_obs)
    n_sci = len(frames) if n_science is None else int(n_science)
    return Headline(
        n_science=n_sci,
        n_ok=len(ok),
        n_rejected=n_sci - len(ok),
        median_fwhm_arcsec=_median(f.fwhm_arcsec for f in ok),
        median_fwhm_px=_median(f.fwhm_px for f in ok),
        median_sky_adu=_median(sky),
        min_sky_adu=min(sky) if sky else None,
        max_sky_adu=max(sky) if sky else None,
        median_zp_mag=_median(f.zp_mag for f in ok),
        limiting_mag=max(cal) if cal else (max(inst) if inst else None),
        limiting_mag_kind="calibrated" if cal else ("instrumental" if inst else None),
        n_sources=sum(int(f.n_sources or 0) for f in ok),
        n_transient_candidates=sum(cands) if cands else None,
        objects=tuple(sorted({str(f.object) for f in frames if f.object})),
        bands=tuple(sorted({str(f.band) for f in frames if f.band})),
        first_date_obs=dates[0] if dates else None,
        last_date_obs=dates[-1] if dates else None,
        total_exptime_s=float(sum(_finite(f.exptime_s) or 0.0 for f in ok)),
    )


# =============================================================================== session
@dataclass(frozen=True)
class SessionSummary:
    """One session's reduction (``session_summary.json``)."""

    observatory: str
    session_id: str
    raw_dir: str | None = None
    workdir: str | None = None
    rpp_version: str | None = None
    config_hash: str | None = None
    night_date: str | None = None
    n_science: int = 0
    n_ok: int = 0
    n_rejected: int = 0
    n_calibration: dict = field(default_factory=dict)
    rejected_files: dict = field(default_factory=dict)
    median_fwhm_arcsec: float | None = None
    median_fwhm_px: float | None = None
    headline: Headline = field(default_factory=Headline)
    masters: dict = field(default_factory=dict)
    frames: tuple[FrameSummary, ...] = ()
    files: tuple[FileOutcome, ...] = ()
    targets: tuple[TargetSummary, ...] = ()  # the observer's targets (``targets`` stage)
    targets_unresolved: tuple[dict, ...] = ()  # names that did not resolve, with the reason
    instrument_kind: str = "imaging"  # imaging | longslit (then ``spectra``, one per target)
    spectra: tuple[SpectrumSummary, ...] = ()
    wall_s: float | None = None
    run: dict | None = None  # the one-process run of ``rpp reduce``
    airflow: dict | None = None  # {"dag_id", "run_id"} of the DAG run that made it
    stage_runs: dict | None = None  # task -> its small result, under Airflow
    results_db_error: str | None = None

    @property
    def ok_frames(self) -> tuple[FrameSummary, ...]:
        return tuple(f for f in self.frames if f.ok)

    @property
    def ok_spectra(self) -> tuple[SpectrumSummary, ...]:
        return tuple(s for s in self.spectra if s.ok)

    def frame(self, name: str) -> FrameSummary:
        for f in self.frames:
            if f.frame == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("wall_s", "run", "airflow", "stage_runs", "results_db_error") and (
                v is None
            ):
                continue  # optional keys: absent, as before
            out[f.name] = v
        return json_safe(out)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SessionSummary:
        """From ``session_summary.json`` (older files without the headline get it computed)."""
        if "frames" not in d:
            raise ValueError("a session summary needs a 'frames' list")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        frames = tuple(
            f if isinstance(f, FrameSummary) else FrameSummary.from_dict(f)
            for f in d.get("frames") or ()
        )
        kw["frames"] = frames
        kw["files"] = tuple(
            f if isinstance(f, FileOutcome) else FileOutcome(**f) for f in d.get("files") or ()
        )
        kw["targets"] = tuple(
            t if isinstance(t, TargetSummary) else TargetSummary.from_dict(t)
            for t in d.get("targets") or ()
        )
        kw["targets_unresolved"] = tuple(dict(u) for u in d.get("targets_unresolved") or ())
        kw["spectra"] = tuple(
            s if isinstance(s, SpectrumSummary) else SpectrumSummary.from_dict(s)
            for s in d.get("spectra") or ()
        )
        h = d.get("headline")
        if isinstance(h, Headline):
            kw["headline"] = h
        elif isinstance(h, Mapping):
            kw["headline"] = Headline.from_dict(h)
        else:
            kw["headline"] = headline(frames, n_science=d.get("n_science"))
        kw.setdefault("observatory", "")
        kw.setdefault("session_id", "")
        return cls(**kw)

    @classmethod
    def coerce(cls, value: SessionSummary | Mapping[str, Any]) -> SessionSummary:
        """A `SessionSummary` from itself or from its dict."""
        if isinstance(value, SessionSummary):
            return value
        if not isinstance(value, Mapping):
            msg = f"expected a session summary, got {type(value).__name__}"
            raise ValueError(msg)
        return cls.from_dict(value)

    def replace(self, **changes) -> SessionSummary:
        return dataclasses.replace(self, **changes)


def file_outcomes(manifest: Mapping, frames: Iterable[FrameSummary], masters: Mapping):
    """Every input file of a session with its outcome (science, calibration, unreadable,
    ignored): from the manifest's ``files`` (the plan's outcome and reason of every file) when it
    has them, else from its frames, rejected and ignored lists."""
    by_path = {f.raw_path: f for f in frames if f.raw_path}
    left_out = {str(r.get("path")): r.get("reason") for r in masters.get("rejected") or ()}
    used = set()
    entries = [masters.get("bias"), masters.get("dark"), *(masters.get("flat") or {}).values()]
    for e in entries:
        if isinstance(e, Mapping):
            used.update(str(p) for p in e.get("inputs") or ())
    out = []
    if manifest.get("files"):  # the plan's outcome of every file (rpp_tasks.inputs.frames)
        for m in manifest["files"]:
            path, kind, why = str(m.get("path")), str(m.get("outcome")), m.get("reason")
            if kind == "science":
                f = by_path.get(path)
                status = f.status if f is not None else "pending"
                outcome = {"ok": "reduced"}.get(status, status)
                out.append(
                    FileOutcome(
                        path,
                        kind,
                        outcome,
                        f.reason if f is not None and not f.ok else None,
                        f.failed_stage if f is not None else None,
                    )
                )
            elif kind in ("bias", "dark", "flat"):
                if path in used:
                    out.append(FileOutcome(path, kind, "calibration used"))
                elif left_out.get(path):  # dropped from its master, with the reason
                    out.append(
                        FileOutcome(path, kind, "calibration rejected", left_out[path], "masters")
                    )
                else:
                    out.append(FileOutcome(path, kind, "not used", "not combined into a master"))
            elif kind == "rejected":
                out.append(FileOutcome(path, "unreadable", "rejected", why, "validate"))
            else:
                out.append(FileOutcome(path, "ignored", "ignored", why))
        return tuple(sorted(out, key=lambda o: o.path))
    for m in manifest.get("frames") or ():
        path, kind = str(m.get("path")), str(m.get("imagetyp") or "unknown")
        if kind == "science":
            f = by_path.get(path)
            status = f.status if f is not None else "pending"
            outcome = {"ok": "reduced"}.get(status, status)
            out.append(
                FileOutcome(
                    path, kind, outcome, f.reason if f else None, f.failed_stage if f else None
                )
            )
        elif kind in ("bias", "dark", "flat"):
            if path in used:
                out.append(FileOutcome(path, kind, "calibration used"))
            else:
                out.append(FileOutcome(path, kind, "not used", "not combined into a master"))
        else:
            out.append(FileOutcome(path, kind, "ignored", "frame type not recognised"))
    for r in manifest.get("rejected") or ():
        out.append(
            FileOutcome(str(r["path"]), "unreadable", "rejected", r.get("reason"), "validate")
        )
    for p in manifest.get("ignored") or ():
        out.append(FileOutcome(str(p), "ignored", "ignored", "matches an ignore pattern"))
    return tuple(sorted(out, key=lambda o: o.path))
