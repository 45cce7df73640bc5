"""The life of a session, step by step: what ``rpp reduce`` and every DAG task call.

::

    open_session ─► run_stage (masters, ..., transients, targets) ─► summarise ─► record_results
                                                                       │
                                                     make_report ◄─────┘─► archive, notify
    record_failure (any task or run that fails)

* `open_session` groups the raw folder into a manifest and starts fresh: outputs of an earlier
  run of the same session (``frames/``, ``session_summary.json``) are removed, the same way for
  ``rpp reduce`` and the DAG. Later steps re-open the session from its work folder
  (`~rpp_tasks.session.workdir.Session.load`): tasks hand each other that path only.
* `run_stage` runs one stage of the table (or consecutive stages) for the session's frames, or a
  chunk of them; a retried stage first forgets the rejections it made itself in an earlier try.
  Under Airflow the night is cut into chunks (`plan_chunks`, in the validate task); after the
  session stages (masters) each chunk runs the table's frame stages as one mapped task
  (`run_chunk`) and the products task merges the chunks' results (`merge_chunk_runs`).
* `summarise` writes ``session_summary.json`` (`~rpp_tasks.session.summary.SessionSummary`);
  `record_results` upserts it into the results database (a failure there is recorded in the
  summary, never a lost night); `make_report`, `archive` and `notify` read the summary.
* `record_failure` appends a failure to ``<paths.work>/failures.jsonl`` and alerts the operators.
* A folder with files but no science frame reduced is a failed night, never a skipped run:
  `require_science` (after opening) and `require_reduced` (after the stages) raise
  `~rpp_tasks.exceptions.NothingReduced` naming every file with its outcome and reason (the DAG
  fails and alerts the operators, ``rpp reduce`` exits non-zero); only an empty folder is a skip.

`reduce_session` chains the first four for ``rpp reduce`` in one process (the frame stages in
memory, without checkpoints); the DAG runs the same functions one task each.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from rpp_tasks import __version__
from rpp_tasks.exceptions import ConfigError, NothingReduced
from rpp_tasks.session import connections
from rpp_tasks.session.chunks import (
    chunk_label,
    deployment_lanes,
    merge_chunk_runs,
    merge_stage_runs,
    plan_chunks,
    reject_unfinished_chunks,
    run_chunk,
)
from rpp_tasks.session.summary import (
    FrameSummary,
    SessionSummary,
    file_outcomes,
    headline,
    night_date_for,
    target_summaries,
)
from rpp_tasks.session.table import StageTable, table_for
from rpp_tasks.session.workdir import Session, read_json

__all__ = [
    "open_session",
    "open_from_conf",
    "run_conf_targets",
    "resume",
    "describe",
    "require_science",
    "require_reduced",
    "run_stage",
    "forget_rejections",
    "plan_chunks",
    "deployment_lanes",
    "run_chunk",
    "chunk_label",
    "merge_chunk_runs",
    "merge_stage_runs",
    "reject_unfinished_chunks",
    "summarise",
    "record_results",
    "make_report",
    "finish",
    "archive",
    "notify",
    "record_failure",
    "reduce_session",
]

log = logging.getLogger(__name__)

#: Outputs of an earlier run that a fresh run removes (raw files and masters are never touched).
STALE_OUTPUTS = (
    "frames",
    "spectra",
    "session_summary.json",
    "targets.json",
    "targets.ecsv",
    "comparison_stars.ecsv",
    "targets_photometry.json",
)


# =============================================================================== open
def open_session(
    raw_dir: str | os.PathLike,
    obs,
    *,
    work_root=None,
    session_id: str | None = None,
    targets: Sequence[str] = (),
) -> Session:
    """Open a session afresh: work folder, manifest of frames by type, band, exposure, binning.

    ``targets``: the run's targets (names or coordinates, ``rpp reduce --target``), kept in the
    manifest (``run_targets``) for the ``targets`` stage.

    Only headers are read. Every file of the folder gets an outcome in the manifest
    (`rpp_tasks.inputs.frames.group_session`); files that are not usable frames are listed in
    ``rejected.json`` with the reason (stage ``validate``); they never stop the session. Outputs of
    an earlier run of the same session are removed first (`STALE_OUTPUTS`), so a re-run replaces its
    products.
    """
    from rpp_tasks.inputs import frames
    from rpp_tasks.session.pipeline import frame_stem

    raw_dir = Path(raw_dir)
    session = Session.create(
        raw_dir,
        observatory=obs.name,
        work_root=Path(work_root) if work_root is not None else obs.resolve_path("work"),
        session_id=session_id,
        incoming_root=obs.resolve_path("incoming"),
    )
    for name in STALE_OUTPUTS:
        p = session.workdir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    # every file of the folder gets an outcome in the plan (frames, rejected with the reason, or
    # ignored with the reason: session.extensions, ignore patterns); stems are unique
    manifest = frames.group_session(raw_dir, obs).to_dict()
    manifest["science"] = [
        dict(f, stem=f.get("stem") or frame_stem(f["path"]))
        for f in manifest.get("frames", [])
        if f.get("imagetyp") == "science"
    ]
    for kind in ("bias", "dark", "flat"):
        manifest[kind] = [
            f["path"] for f in manifest.get("frames", []) if f.get("imagetyp") == kind
        ]
    manifest["run_targets"] = [str(t) for t in targets if str(t).strip()]
    if table_for(obs).kind == "longslit":  # targets by role (2SPOT files, else headers)
        from rpp_tasks.spectra.session import plan_manifest

        manifest = plan_manifest(raw_dir, obs, manifest)
    session.write_json("manifest.json", manifest)
    session.write_json(
        "rejected.json",
        {
            r.get("stem") or frame_stem(r["path"]): {
                "reason": r["reason"],
                "stage": "validate",
                "path": r["path"],
            }
            for r in manifest.get("rejected", [])
        },
    )
    log.info(
        "[%s] session opened: %d science, %d bias, %d dark, %d flat, %d rejected files",
        session.session_id,
        len(manifest["science"]),
        len(manifest["bias"]),
        len(manifest["dark"]),
        len(manifest["flat"]),
        len(manifest.get("rejected", [])),
    )
    return session


def open_from_conf(conf, obs, *, lanes: int = 1) -> dict:
    """The DAG's validate step: the run's conf checked before anything is written
    (`rpp_tasks.ops.session_ids.check_run_conf`: observatory, ``session_dir`` inside the incoming
    folder when relative, a plain ``session_id``; `run_conf_targets`: the run's ``targets``), then
    `open_session`; returns `describe` of it with the night's ``chunks`` (`plan_chunks` for
    ``lanes`` chunk tasks at once).
    Raises `ValueError` for a conf to fix."""
    from rpp_tasks.ops.session_ids import check_run_conf

    try:
        table = table_for(obs, strict=True)
    except ConfigError as exc:
        raise ValueError(f"{exc}: sessions of this observatory cannot be reduced") from None
    raw_dir, session_id = check_run_conf(obs, conf)
    targets = run_conf_targets(conf)
    session = open_session(raw_dir, obs, session_id=session_id, targets=targets)
    try:
        require_science(session)
    except NothingReduced as exc:
        if not exc.empty:  # the summary and report list every file with its reason
            try:
                finish(session, obs)
            except Exception:
                log.exception("[%s] summary of a session without science frames", session_id)
        raise
    chunks = plan_chunks(session, obs, lanes=lanes) if table.frame_stages else []  # (or none)
    return {**describe(session), "chunks": chunks}


def run_conf_targets(conf) -> tuple[str, ...]:
    """The run's targets from a DAG run conf (``targets``: a name or ``"RA DEC"``, or a list of
    them; the ``targets`` stage resolves them). Raises `ValueError` for anything else."""
    value = conf.get("targets") if conf else None
    if value in (None, "", []):
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(
        isinstance(t, str) and 0 < len(t.strip()) <= 200 for t in items
    ):
        raise ValueError(
            "run conf 'targets' must be a target name or 'RA DEC' (at most 200 characters), or "
            f"a list of them; got {str(value)[:100]!r}"
        )
    return tuple(t.strip() for t in items)


def resume(workdir) -> Session:
    """Re-open a session in a later task: the work folder checked first
    (`rpp_tasks.ops.shared_storage.check_shared_storage`: a Celery worker that cannot see or
    write the folder an earlier task wrote fails naming itself, the folder and the setting)."""
    from rpp_tasks.ops.shared_storage import check_shared_storage

    return Session.load(check_shared_storage(workdir))


def describe(session: Session) -> dict:
    """Small description of an opened session (the validate task's result)."""
    manifest = session.read_json("manifest.json", {})
    out = {
        "workdir": str(session.workdir),
        "session_id": session.session_id,
        "raw_dir": str(session.raw_dir),
        "n_science": len(manifest.get("science", [])),
        "n_calibration": {k: len(manifest.get(k, [])) for k in ("bias", "dark", "flat")},
        "n_rejected_files": len(manifest.get("rejected", [])),
    }
    if "spectra_targets" in manifest:  # long-slit: targets, lamps, what is missing
        out["n_targets"] = len(manifest["spectra_targets"])
        out["n_calibration"]["lamp"] = len(manifest.get("lamp", []))
        out["missing_files"] = manifest.get("missing_files", [])[:20]
        if manifest.get("spectra_error"):
            out["spectra_error"] = manifest["spectra_error"]
    return out


def _plan_files(manifest: dict) -> list[dict]:
    return [
        {"path": f.get("path"), "outcome": f.get("outcome"), "reason": f.get("reason")}
        for f in manifest.get("files") or ()
    ]


def require_science(session: Session) -> dict:
    """After `open_session`: raise `~rpp_tasks.exceptions.NothingReduced` when the folder has no
    science frame (``empty`` when it has no file at all); else return `describe` of it."""
    manifest = session.read_json("manifest.json", {}) or {}
    if not manifest.get("science"):
        raise NothingReduced(session.session_id, _plan_files(manifest), when="validate")
    return describe(session)


def require_reduced(summary: SessionSummary) -> SessionSummary:
    """After the stages: raise `~rpp_tasks.exceptions.NothingReduced` when no science frame was
    reduced (every file of ``summary.files`` with its outcome and reason; ``empty`` when the
    folder had no file). Returns ``summary`` when at least one frame was reduced."""
    if summary.n_ok > 0:
        return summary
    files = [
        {"path": f.path, "outcome": f.outcome, "reason": _with_stage(f)} for f in summary.files
    ]
    raise NothingReduced(summary.session_id, files, n_science=summary.n_science, when="products")


def _with_stage(f) -> str | None:
    if f.reason and f.stage and f.stage != "validate":
        return f"{f.stage}: {f.reason}"
    return f.reason


# =============================================================================== stages
def forget_rejections(
    session: Session,
    stages: Sequence[str],
    *,
    table: StageTable,
    frames: Sequence[str] | None = None,
) -> None:
    """Un-reject the frames that ``stages`` themselves rejected in an earlier try (a retried
    stage starts clean; rejections by earlier stages stand). The first frame stage of the table
    also owns rejections recorded under names that are not stages (its reading/checking steps);
    files rejected while opening the session (``validate``) always stand."""
    owned = set(stages)
    first = table.frame_stages[0] if table.frame_stages else None
    for stem, rec in session.rejected().items():
        if frames is not None and stem not in frames:
            continue
        stage = (rec or {}).get("stage")
        if stage == "validate":
            continue
        if stage in owned or (first in owned and stage not in table):
            session.unreject(stem)


def run_stage(
    session: Session | str | os.PathLike,
    obs,
    stages: str | Sequence[str],
    *,
    frames: Sequence[str] | None = None,
    workers: int | None = None,
    keep_intermediate: bool = True,
    table: StageTable | None = None,
) -> dict:
    """Run a stage (or consecutive stages) of the table for the session.

    Frame stages run for every frame still in play, or for the chunk ``frames`` (stems), in a
    process pool (``workers``); session stages run once. Before running, the rejections these
    stages made in an earlier try are forgotten (`forget_rejections`). ``keep_intermediate=False``
    saves only products and what later stages read (the one-process run of `reduce_session`).

    Returns
    -------
    result : dict
        ``stages``; for frame stages ``n_frames``, ``n_ok``, ``n_rejected``, ``n_failed``,
        ``wall_s``, ``rejected``; for a session stage its result under its name.
    """
    from rpp_tasks.session import pipeline

    session = session if isinstance(session, Session) else Session.load(session)
    table = table or table_for(obs)
    chain = table.chain(stages)
    names = [s.name for s in chain]
    forget_rejections(session, names, table=table, frames=frames)
    out: dict = {"stages": names}
    i = 0
    while i < len(chain):
        if chain[i].scope == "session":
            t0 = time.perf_counter()
            out[chain[i].name] = chain[i].function()(session, obs)
            log.info(
                "[%s] %s done in %.1f s",
                session.session_id,
                chain[i].name,
                time.perf_counter() - t0,
            )
            i += 1
            continue
        j = i
        while j < len(chain) and chain[j].scope == "frame":
            j += 1
        res = pipeline.run_frames(
            session,
            obs,
            names[i:j],
            frames=frames,
            workers=workers,
            keep_intermediate=keep_intermediate,
            table=table,
        )
        out.update({k: v for k, v in res.items() if k != "stages"})
        i = j
    return out


# =============================================================================== summary
def summarise(session: Session, obs, **extra) -> SessionSummary:
    """Collect the frame summaries into ``session_summary.json`` and return it.

    ``extra`` sets the optional fields of `SessionSummary` (``airflow``, ``stage_runs``,
    ``wall_s``, ``run``).
    """
    if table_for(obs).kind == "longslit":
        return _summarise_spectra(session, obs, **extra)
    manifest = session.read_json("manifest.json", {})
    rejected = session.rejected()
    frames = []
    for f in manifest.get("science", []):
        s = read_json(session.path("frames", f["stem"], "summary.json"))
        if s is None:
            rej = rejected.get(f["stem"], {})
            s = {
                "frame": f["stem"],
                "raw_path": f.get("path"),
                "status": "rejected" if rej else "pending",
                "reason": rej.get("reason"),
                "failed_stage": rej.get("stage"),
            }
        frames.append(FrameSummary.from_dict(s))
    masters = session.read_json("masters.json", {}) or {}
    targets, unresolved = target_summaries(
        (session.read_json("targets.json", {}) or {}).get("summary")
    )
    head = headline(frames)
    summary = SessionSummary(
        **_session_fields(session, obs, manifest, head, [f.mjd_obs for f in frames]),
        median_fwhm_arcsec=head.median_fwhm_arcsec,
        median_fwhm_px=head.median_fwhm_px,
        headline=head,
        masters=masters,
        frames=tuple(frames),
        files=file_outcomes(manifest, frames, masters),
        targets=targets,
        targets_unresolved=unresolved,
        **extra,
    )
    session.write_json("session_summary.json", summary.to_dict())
    if head.n_science and not head.n_ok:
        log.warning("[%s] no frame of the session could be reduced", session.session_id)
    return summary


def _session_fields(session: Session, obs, manifest: dict, head, mjds) -> dict:
    """The `SessionSummary` fields an imaging and a long-slit session fill the same way: who,
    where, which code and configuration, the night (from the earliest exposure) and the counts."""
    mjds = [m for m in mjds if m is not None]
    return {
        "observatory": obs.name,
        "session_id": session.session_id,
        "raw_dir": str(session.raw_dir),
        "workdir": str(session.workdir),
        "rpp_version": __version__,
        "config_hash": obs.config_hash,
        "night_date": night_date_for(min(mjds), obs.site.longitude_deg) if mjds else None,
        "n_science": head.n_science,
        "n_ok": head.n_ok,
        "n_rejected": head.n_rejected,
        "n_calibration": {k: len(manifest.get(k, [])) for k in ("bias", "dark", "flat")},
        "rejected_files": session.read_json("rejected.json", {}) or {},
    }


def _summarise_spectra(session: Session, obs, **extra) -> SessionSummary:
    """`summarise` for a long-slit session: one `SpectrumSummary` per target."""
    from rpp_tasks.session.summary import spectra_headline
    from rpp_tasks.spectra import session as spectra_session

    manifest = session.read_json("manifest.json", {}) or {}
    spectra = spectra_session.spectrum_summaries(session)
    head = spectra_headline(spectra)
    summary = SessionSummary(
        **_session_fields(session, obs, manifest, head, [s.mjd_start for s in spectra]),
        headline=head,
        masters=session.read_json("spectra/masters.json", {}) or {},
        files=spectra_session.file_outcomes(manifest, spectra),
        instrument_kind="longslit",
        spectra=spectra,
        **extra,
    )
    session.write_json("session_summary.json", summary.to_dict())
    if head.n_science and not head.n_ok:
        log.warning("[%s] no target of the session could be reduced", session.session_id)
    return summary


def record_results(
    session: Session, summary: SessionSummary, obs, *, url: str | None = None
) -> SessionSummary:
    """Upsert the session into the results database (`rpp_tasks.outputs.results.record_session`),
    then its targets' photometry (`rpp_tasks.stages.target_session.record_target_photometry`:
    the rows of the ``targets`` stage, so a target's light curve over the nights is one query).

    The database is a record, never a reason to lose the products: an error is logged and kept in
    the summary (``results_db_error``, written back to ``session_summary.json``).
    """
    from rpp_tasks.outputs import db, results
    from rpp_tasks.stages.target_session import record_target_photometry

    try:
        url = url or db.results_url_from_env(db.default_results_url(obs.resolve_path("work")))
        results.record_session(summary, url)
        record_target_photometry(session.workdir, obs, url=url, night_date=summary.night_date)
    except Exception as exc:
        log.error("[%s] results database not updated: %s", session.session_id, exc)
        summary = summary.replace(results_db_error=str(exc))
        session.write_json("session_summary.json", summary.to_dict())
    return summary


# =============================================================================== products
def make_report(session: Session, obs) -> dict:
    """The morning report and products ZIP (`rpp_tasks.outputs.report.run_report`); a failure is
    returned as ``{"report_error": ...}`` (the products and the archive do not depend on it)."""
    from rpp_tasks.outputs import report

    try:
        return report.run_report(session, obs)
    except Exception as exc:
        log.warning("[%s] session report not built: %s", session.session_id, exc, exc_info=True)
        return {"report_error": str(exc)[:500]}


def finish(session: Session, obs, *, report: bool = True, **extra) -> tuple[SessionSummary, dict]:
    """After the stages: `summarise` (``extra``: its optional fields), `record_results` and
    `make_report`. Returns the summary and a small dict of what was made (the products task's
    result: counts, summary path, report and ZIP, or the report error)."""
    summary = record_results(session, summarise(session, obs, **extra), obs)
    made = {
        "workdir": str(session.workdir),
        "session_id": session.session_id,
        "n_science": summary.n_science,
        "n_ok": summary.n_ok,
        "n_rejected": summary.n_rejected,
        "median_fwhm_px": summary.median_fwhm_px,
        "session_summary": str(session.path("session_summary.json")),
    }
    if report:
        rep = make_report(session, obs)
        if "html_path" in rep:
            made.update(report=rep["html_path"], products_zip=rep["products_zip"])
        else:
            made.update(rep)
    return summary, made


def archive(session: Session, obs, *, url: str, results_url: str | None = None) -> dict | None:
    """Upsert one ObsCore row per reduced frame or 1-D spectrum
    (`rpp_tasks.outputs.archive.archive_session`); None when the session has no reduced frame or
    spectrum.

    The observers' decisions (dashboard, results database) apply: a withdrawn frame is never
    published, and with ``archive.publish: on_validation`` only validated frames are."""
    from rpp_tasks.outputs import archive as rpp_archive
    from rpp_tasks.outputs import db, db_decisions
    from rpp_tasks.outputs.dashboard.store import archive_kwargs, publishable_frames

    summary = SessionSummary.from_dict(session.read_json("session_summary.json", {"frames": []}))
    if not summary.ok_frames and not summary.ok_spectra:
        return None
    results_url = results_url or db.results_url_from_env(
        db.default_results_url(obs.resolve_path("work"))
    )
    with db.ResultsDB(results_url) as rdb:
        rdb.create_schema()
        decided = db_decisions.decisions(rdb, obs.name, summary.session_id)
    stems = [f.frame for f in summary.ok_frames] + [sp.target for sp in summary.ok_spectra]
    frames = publishable_frames(stems, decided, obs.archive.publish)
    if len(frames) < len(stems):
        log.info(
            "[%s] archive: %d of %d reduced frame(s) published "
            "(archive.publish: %s, %d decision(s))",
            session.session_id,
            len(frames),
            len(stems),
            obs.archive.publish,
            len(decided),
        )
    kwargs = archive_kwargs(obs, session.workdir)
    if summary.ok_spectra and obs.spectrograph:
        kwargs["instrument_name"] = obs.spectrograph.name
    return rpp_archive.archive_session(summary, url=url, frames=frames, **kwargs)


def notify(
    session: Session,
    obs,
    *,
    get_connection=None,
    mask=connections._no_mask,
    run_key: str | None = None,
) -> dict:
    """Tell the observers (`rpp_tasks.outputs.notify.run_notify`) with the channels' settings
    resolved from the connections named in the configuration."""
    from rpp_tasks.outputs import notify as rpp_notify

    settings, errors = connections.notify_settings(obs, get_connection=get_connection, mask=mask)
    return rpp_notify.run_notify(session, obs, **settings, config_errors=errors, run_key=run_key)


def record_failure(
    info: dict, obs, *, get_connection=None, mask=connections._no_mask
) -> Path | None:
    """Log a failure, append it to ``<paths.work>/failures.jsonl`` and alert the operators
    (`rpp_tasks.outputs.notify.notify_failure`, which never raises; errors are logged here)."""
    log.error("RPP failure: %s", json.dumps(info, default=str))
    path = None
    if obs is not None:
        try:
            path = obs.resolve_path("work") / "failures.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(info, default=str) + "\n")
        except OSError as exc:
            log.warning("could not record the failure in %s: %s", path, exc)
            path = None
    try:  # (import_module honours a notifier replaced in sys.modules)
        hook = importlib.import_module("rpp_tasks.outputs.notify").notify_failure
        settings, errors = (
            connections.notify_settings(
                obs, operators=True, get_connection=get_connection, mask=mask
            )
            if obs is not None
            else ({}, {})
        )
        for channel, err in errors.items():
            log.warning("operators' %s alert unavailable: %s", channel, err)
        hook(info, obs, **settings) if settings else hook(info, obs)
    except Exception:  # a broken notifier must not hide the original failure
        log.exception("rpp_tasks.outputs.notify.notify_failure failed")
    return path


# =============================================================================== one process
def reduce_session(
    raw_dir: str | os.PathLike,
    obs,
    *,
    work_root=None,
    session_id: str | None = None,
    workers: int | None = None,
    table: StageTable | None = None,
    report: bool = True,
    targets: Sequence[str] = (),
) -> tuple[SessionSummary, dict]:
    """``rpp reduce FOLDER``: `open_session`, every stage (frames in memory, no checkpoints),
    `finish` (summary, results database, report). Returns what `finish` returns."""
    t0 = time.perf_counter()
    table = table or table_for(obs, strict=True)
    session = open_session(
        raw_dir, obs, work_root=work_root, session_id=session_id, targets=targets
    )
    run = run_stage(
        session, obs, table.names, workers=workers, keep_intermediate=False, table=table
    )
    return finish(session, obs, report=report, wall_s=round(time.perf_counter() - t0, 3), run=run)
