"""A session summary in the results database: the rows `rpp_tasks.outputs.db.ResultsDB` keeps.

`record_session` reads a `~rpp_tasks.session.summary.SessionSummary` and upserts the session, its
frames and masters, and appends one stage run per frame and stage (a re-run is a new attempt).
The session's night is the summary's ``night_date`` (one definition:
`~rpp_tasks.session.summary.night_date_for`).
"""

from __future__ import annotations

import datetime as dt

from rpp_tasks.outputs.db import ResultsDB

__all__ = ["record_session"]


def record_session(summary, url: str) -> str:
    """Upsert ``summary`` (a `SessionSummary` or its dict) into the results database at ``url``.

    Returns the URL. A session without any frame time is recorded under today's (UTC) date.
    """
    from rpp_tasks.session.summary import SessionSummary

    s = SessionSummary.coerce(summary)
    now = dt.datetime.now(dt.UTC)
    with ResultsDB(url) as rdb:
        rdb.create_schema()
        rdb.upsert_session(
            s.observatory,
            s.session_id,
            s.night_date or now.date().isoformat(),
            folder=s.raw_dir,
            status="done" if s.n_ok else "failed",
            finished_utc=now,
            n_frames={"science": s.n_science, **s.n_calibration},
            n_rejected=s.n_rejected,
            summary={k: v for k, v in s.to_dict().items() if k not in ("frames", "files")},
        )
        for f in s.frames:
            rdb.upsert_frame(
                s.observatory,
                s.session_id,
                f.frame,
                raw_path=f.raw_path,
                imagetyp="science",
                band=f.band,
                exptime_s=f.exptime_s,
                mjd_obs=f.mjd_obs,
                status="ok" if f.ok else "rejected",
                reject_reason=f.reason,
                reject_stage=f.failed_stage,
                calibrated_path=f.calibrated,
                catalog_path=f.catalog,
                n_sources=f.n_sources,
                fwhm_px=f.fwhm_px,
                fwhm_arcsec=f.fwhm_arcsec,
                background_adu=f.background_adu,
                background_rms_adu=f.background_rms_adu,
                limiting_mag=f.limiting_mag_inst,
                zp_mag=f.zp_mag,
                zp_err_mag=f.zp_err_mag,
                zp_n_stars=f.n_zp_stars,
            )
            for stage, info in (f.stages or {}).items():
                if not isinstance(info, dict) or "finished_utc" not in info:
                    continue
                end = dt.datetime.fromisoformat(info["finished_utc"])
                rdb.record_stage_run(
                    s.observatory,
                    s.session_id,
                    stage,
                    frame_stem=f.frame,
                    status="success",
                    cpu_s=info.get("cpu_s"),
                    wall_s=info.get("wall_s"),
                    started_utc=end - dt.timedelta(seconds=info.get("wall_s") or 0.0),
                    finished_utc=end,
                )
        m = s.masters or {}
        entries = [("bias", m.get("bias")), ("dark", m.get("dark"))] + [
            (f"flat_{b}", e) for b, e in (m.get("flat") or {}).items()
        ]
        for kind, e in entries:
            if isinstance(e, dict) and e.get("path"):
                rdb.record_master(
                    s.observatory,
                    s.session_id,
                    kind,
                    e["path"],
                    from_library=e.get("source") == "library",
                    delta_days=e.get("delta_days"),
                )
    return url
