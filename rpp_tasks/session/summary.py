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

__all__ = [
    "FrameSummary",
    "FileOutcome",
    "Headline",
    "TargetBand",
    "TargetSummary",
    "target_summaries",
    "SessionSummary",
    "night_date_for",
    "calibrated_limiting_mag",
    "headline",
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
class FileOutcome:
    """What became of one input file of the session."""

    path: str
    kind: str  # science | bias | dark | flat | unknown | unreadable | ignored
    outcome: str  # reduced | rejected | failed | pending | calibration used | not used | ignored
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


# =============================================================================== targets
_PHOT_FACTS = ("mag", "mag_err", "mag_diff", "mag_diff_err", "snr")


@dataclass(frozen=True)
class TargetBand:
    """A target in one band over the night (from the ``targets`` stage).

    ``mag``/``mag_diff`` (± ``_err``) are the night's weighted means of the calibrated and the
    differential magnitudes of the primary photometry type ``phot_type`` (errors scaled by the
    scatter when it exceeds them); ``by_type`` the latest detection in every photometry type
    (``mag``, ``mag_err``, ``mag_diff``, ``mag_diff_err``, ``snr``); ``latest`` that frame
    (``frame``, ``mjd_mid``, ``mag``, ``mag_err``, ``mag_diff``, ``mag_diff_err``, ``snr``,
    ``match_sep_arcsec``). Not detected in any frame: ``limit_mag`` is the deepest 5-sigma limit at
    the target's position (``limit_kind``: calibrated or instrumental). ``ensemble`` is the
    comparison ensemble's status (``ok`` or the reason it failed), ``n_comp`` its median number of
    comparison stars per frame.
    """

    band: str
    n_detected: int = 0
    n_upper_limits: int = 0
    phot_type: str | None = None
    mag: float | None = None
    mag_err: float | None = None
    mag_diff: float | None = None
    mag_diff_err: float | None = None
    snr_median: float | None = None
    match_sep_arcsec: float | None = None
    n_comp: int | None = None
    by_type: dict = field(default_factory=dict)
    latest: dict = field(default_factory=dict)
    limit_mag: float | None = None
    limit_kind: str | None = None
    ensemble: str | None = None

    @property
    def detected(self) -> bool:
        return self.n_detected > 0

    def to_dict(self) -> dict:
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TargetBand:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class TargetSummary:
    """One of the night's targets: who it is, how it was named, and its photometry per band.

    ``reason`` says why it has no measurement at all (outside every frame, no WCS).
    """

    name: str
    ra_deg: float | None = None
    dec_deg: float | None = None
    named_by: str | None = None  # run | header | config
    source: str | None = None  # where its position came from (config, sesame, simbad, ...)
    n_frames: int = 0
    n_detected: int = 0
    n_upper_limits: int = 0
    n_outside_field: int = 0
    reason: str | None = None
    bands: tuple[TargetBand, ...] = ()

    @property
    def measured(self) -> bool:
        return bool(self.n_detected or self.n_upper_limits)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["bands"] = [b.to_dict() for b in self.bands]
        return json_safe(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TargetSummary:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["bands"] = tuple(
            b if isinstance(b, TargetBand) else TargetBand.from_dict(b)
            for b in d.get("bands") or ()
        )
        return cls(**kw)


def _round(v, nd):
    v = _finite(v)
    return None if v is None else round(v, nd)


def target_summaries(stage: Mapping[str, Any] | None) -> tuple[tuple[TargetSummary, ...], tuple]:
    """The typed targets of a session from the ``targets`` stage's summary (``targets.json``'s
    ``summary``): ``(targets, unresolved)``, unresolved as ``{query, named_by, reason}``. The one
    place that file is read for the summary."""
    if not isinstance(stage, Mapping):
        return (), ()
    ens = stage.get("ensembles") or {}
    out = []
    for t in stage.get("targets") or ():
        bands = []
        for band, b in (t.get("bands") or {}).items():
            pt = b.get("phot_type")
            e = {}
            for label, by_t in ens.items():  # "V" or "V field 2": the band's ensemble(s)
                if label == band or label.startswith(f"{band} field "):
                    e = by_t.get(pt) or next(iter(by_t.values()), {}) if by_t else {}
                    if e.get("status") == "ok":
                        break
            latest = dict(b.get("latest") or {})
            bands.append(
                TargetBand(
                    band=band,
                    n_detected=int(b.get("n_detected") or 0),
                    n_upper_limits=int(b.get("n_upper_limits") or 0),
                    phot_type=pt,
                    mag=_round(b.get("mag"), 4),
                    mag_err=_round(b.get("mag_err"), 4),
                    mag_diff=_round(b.get("mag_diff"), 4),
                    mag_diff_err=_round(b.get("mag_diff_err"), 4),
                    snr_median=_round(b.get("snr_median"), 1),
                    match_sep_arcsec=_round(b.get("match_sep_arcsec"), 3),
                    n_comp=b.get("n_comp"),
                    by_type={
                        k: {f: _round(v.get(f), 4) for f in _PHOT_FACTS}
                        for k, v in (b.get("by_type") or {}).items()
                        if isinstance(v, Mapping)
                    },
                    latest=latest,
                    limit_mag=_round(b.get("deepest_limit_mag"), 3),
                    limit_kind=b.get("limit_kind"),
                    ensemble=None
                    if not e
                    else ("ok" if e.get("status") == "ok" else e.get("reason") or e.get("status")),
                )
            )
        out.append(
            TargetSummary(
                name=str(t.get("name")),
                ra_deg=_finite(t.get("ra_deg")),
                dec_deg=_finite(t.get("dec_deg")),
                named_by=t.get("named_by"),
                source=t.get("source"),
                n_frames=int(t.get("n_frames") or 0),
                n_detected=int(t.get("n_detected") or 0),
                n_upper_limits=int(t.get("n_upper_limits") or 0),
                n_outside_field=int(t.get("n_outside_field") or 0),
                reason=t.get("reason"),
                bands=tuple(bands),
            )
        )
    unresolved = tuple(
        {k: u.get(k) for k in ("query", "named_by", "reason")}
        for u in stage.get("unresolved") or ()
    )
    return tuple(out), unresolved


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
    wall_s: float | None = None
    run: dict | None = None  # the one-process run of ``rpp reduce``
    airflow: dict | None = None  # {"dag_id", "run_id"} of the DAG run that made it
    stage_runs: dict | None = None  # task -> its small result, under Airflow
    results_db_error: str | None = None

    @property
    def ok_frames(self) -> tuple[FrameSummary, ...]:
        return tuple(f for f in self.frames if f.ok)

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
                used_ = path in used
                why_not = left_out.get(path) or "not combined into a master"
                out.append(
                    FileOutcome(
                        path,
                        kind,
                        "calibration used" if used_ else "not used",
                        None if used_ else why_not,
                    )
                )
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
