"""What each dashboard route returns, as plain values: the plugin (``plugins/rpp_reports.py``) only
maps HTTP to these calls and their exceptions to status codes (`ValueError` 400,
`PermissionError` 403, `LookupError`/`FileNotFoundError` 404, `ConflictError` 409)."""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path

from rpp_tasks.outputs.dashboard import files, pages, search
from rpp_tasks.outputs.dashboard.roles import Actor
from rpp_tasks.outputs.dashboard.store import Store, effective_decision

__all__ = [
    "search_view",
    "frame_view",
    "frame_file",
    "session_view",
    "target_view",
    "parse_decision",
]


def search_view(store: Store, actor: Actor, params, *, base: str, online: bool = False):
    """``(media type, body)`` of a search: HTML page, JSON, CSV or VOTable."""
    actor.require("browse")
    q = search.parse_query(params, observatories=tuple(store.configs))
    res = search.search(store, q, online=online)
    allowed = {n for n, o in store.configs.items() if actor.allowed("browse", o.dag_id)}
    res.rows = [r for r in res.rows if r["observatory"] in allowed]
    if q.format == "csv":
        return "text/csv; charset=utf-8", search.to_csv(res)
    if q.format == "votable":
        return "application/x-votable+xml", search.to_votable(res)
    if q.format == "json":
        body = {
            "total": res.total,
            "page": q.page,
            "per_page": q.per_page,
            "resolved": res.query.resolved,
            "rows": res.rows,
        }
        return "application/json", json.dumps(body, default=str)
    return "text/html; charset=utf-8", pages.search_page(
        res, base=base, observatories=sorted(store.configs)
    )


def frame_view(
    store: Store, actor: Actor, observatory: str, session_id: str, stem: str, *, base: str
) -> str:
    obs = store.obs(observatory)
    actor.require("browse", obs.dag_id)
    frame = store.frame(obs, session_id, stem)
    summary = store.summary(obs, session_id)
    current = {d["frame_stem"]: d for d in store.decisions(obs, session_id)}
    history = [
        h for h in store.decisions(obs, session_id, history=True) if h["frame_stem"] in (stem, "*")
    ]
    workdir = store.workdir(obs, session_id)
    return pages.frame_page(
        base=base,
        obs=obs.name,
        dag_id=obs.dag_id,
        session=session_id,
        frame=frame,
        decision=effective_decision(stem, current),
        history=history,
        can_decide=actor.allowed("decide", obs.dag_id),
        run_id=(summary.get("airflow") or {}).get("run_id"),
        psf_map=(workdir / "report" / "psf_map.png").is_file(),
    )


def frame_file(
    store: Store, actor: Actor, observatory: str, session_id: str, stem: str, name: str
) -> Path:
    obs = store.obs(observatory)
    actor.require("download", obs.dag_id)
    workdir = store.workdir(obs, session_id)
    return files.frame_product(workdir, stem, name)


def _spectra(workdir: Path) -> list[str]:
    return files.spectrum_products(workdir)


def spectrum_view(
    store: Store, actor: Actor, observatory: str, session_id: str, base_rel: str, *, base: str
) -> str:
    """The spectrum page: the pipeline's plot and the downloads (FITS, ECSV)."""
    obs = store.obs(observatory)
    actor.require("browse", obs.dag_id)
    workdir = store.workdir(obs, session_id)
    files.spectrum_file(workdir, base_rel + ".fits")  # checks the path and that it is listed
    return pages.spectrum_page(base=base, obs=obs.name, session=session_id, spectrum=base_rel)


def spectrum_file(store: Store, actor: Actor, observatory: str, session_id: str, relpath: str):
    obs = store.obs(observatory)
    actor.require("download", obs.dag_id)
    return files.spectrum_file(store.workdir(obs, session_id), relpath)


def _stage_names(obs):
    from rpp_tasks.session.lifecycle import table_for

    t = table_for(obs)
    return t.names, t.frame_stages


def session_view(
    store: Store,
    actor: Actor,
    observatory: str,
    session_id: str,
    *,
    base: str,
    as_json: bool = False,
):
    """The session page (or its data as a dict); also while the DAG runs (no summary yet:
    progress only, from the work folder)."""
    from rpp_tasks.outputs.browse import safe_name

    obs = store.obs(observatory)
    actor.require("browse", obs.dag_id)
    if not safe_name(session_id):
        raise ValueError(f"invalid session id {session_id!r:.80}")
    work = obs.resolve_path("work").resolve()
    workdir = (work / session_id).resolve()
    if workdir.parent != work or not workdir.is_dir():
        raise LookupError(f"no session {session_id!r} for observatory {observatory!r}")
    summary = None
    if (workdir / "session_summary.json").is_file():
        summary = store.summary(obs, session_id)
    names, frame_names = _stage_names(obs)
    prog = files.progress(workdir, names, frame_names)
    decisions = {d["frame_stem"]: d for d in store.decisions(obs, session_id)}
    if as_json:
        return {
            "observatory": observatory,
            "session_id": session_id,
            "progress": prog,
            "decisions": decisions,
            "files": (summary or {}).get("files") or [],
            "frames": [
                {"frame": f["frame"], "status": f.get("status"), "reason": f.get("reason")}
                for f in (summary or {}).get("frames") or []
            ],
        }
    return pages.session_page(
        base=base,
        obs=obs.name,
        session=session_id,
        summary=summary,
        progress=prog,
        decisions=decisions,
        history=store.decisions(obs, session_id, history=True),
        can_decide=actor.allowed("decide", obs.dag_id),
        can_delete=actor.allowed("delete", obs.dag_id),
        has_report=(workdir / "report" / "report.html").is_file(),
        spectra=_spectra(workdir),
    )


def target_view(store: Store, actor: Actor, name: str | None, *, base: str) -> str:
    """The light curve of a target over every observatory (`rpp_tasks.outputs.lightcurve`)."""
    actor.require("browse")
    if name is not None:
        name = search._text({"name": name}, "name")
    info = plot = error = None
    if name:
        from rpp_tasks.outputs import lightcurve

        tables = []
        for d, _names in store.groups().values():
            try:
                lc = lightcurve.light_curve(d, name)
            except LookupError as exc:
                error = str(exc)
                continue
            if len(lc.table):
                tables.append(lc)
        if tables:
            lc = max(tables, key=lambda x: len(x.table))
            info = lc.to_dict()
            with tempfile.TemporaryDirectory(prefix="rpp_dash_") as tmp:
                png = lightcurve.plot_light_curve(lc, Path(tmp) / "lc.png")
                plot = base64.b64encode(Path(png).read_bytes()).decode()
            error = None
        elif error is None:
            error = f"no photometry recorded for {name!r}"
    return pages.target_page(base=base, name=name, info=info, plot=plot, error=error)


def parse_decision(body: bytes, content_type: str | None) -> dict:
    """The JSON body of a decision: ``{"decision", "reason", "frames": [...] | null}``.

    Only ``application/json`` is accepted (a cross-site HTML form cannot send it without CORS
    consent, so a logged-in user's cookie cannot be used to withdraw from another site)."""
    if not (content_type or "").split(";")[0].strip().lower() == "application/json":
        raise ValueError("send the decision as application/json")
    if len(body) > 100_000:
        raise ValueError("request body too large")
    try:
        d = json.loads(body or b"{}")
    except ValueError:
        raise ValueError("the body is not valid JSON") from None
    if not isinstance(d, dict):
        raise ValueError("the body must be a JSON object")
    unknown = set(d) - {"decision", "reason", "frames"}
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))[:200]}")
    frames = d.get("frames")
    if frames is not None and (
        not isinstance(frames, list) or not all(isinstance(f, str) for f in frames)
    ):
        raise ValueError("frames must be a list of frame names, or null for the whole session")
    reason = d.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise ValueError("reason must be a string")
    decision = d.get("decision")
    if not isinstance(decision, str):
        raise ValueError("decision must be 'validated' or 'withdrawn'")
    return {"decision": decision, "reason": reason, "frames": frames}


def moc_view(store: Store, actor: Actor, observatory: str, session_id: str | None = None) -> dict:
    """The coverage MOC of an observatory's archived rows (or of one session): MOC 2.0 JSON plus
    the ASCII form and the sessions it gathers."""
    from rpp_tasks.outputs.browse import safe_name
    from rpp_tasks.outputs.dashboard import moc

    obs = store.obs(observatory)
    actor.require("browse", obs.dag_id)
    if session_id is not None and not safe_name(session_id):
        raise ValueError(f"invalid session id {session_id!r:.80}")
    by_session = moc.archive_mocs(store._archive_url(obs), obs.archive.obs_collection or obs.name)
    if session_id is not None:
        if session_id not in by_session:
            raise LookupError(f"no archived footprint for session {observatory}/{session_id}")
        by_session = {session_id: by_session[session_id]}
    cells = set().union(*by_session.values()) if by_session else set()
    return {
        "observatory": observatory,
        "session_id": session_id,
        "sessions": sorted(by_session),
        "order": moc.DEFAULT_ORDER,
        "n_cells": len(cells),
        "moc": moc.to_json(cells),
        "ascii": moc.to_ascii(cells),
    }
