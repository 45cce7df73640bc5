"""Night reports in a browser: the index of reduced sessions and safe access to their products.

Pure functions used by the Airflow UI plugin ``plugins/rpp_reports.py`` (which only wires them to
FastAPI routes) and usable from anything else that serves the work folders:

* `session_index` lists every session that has a ``session_summary.json`` under each
  observatory's work folder, newest first, with the figures observers look for first;
* `render_index_html` renders that list as one self-contained HTML page with relative links;
* `product_path` maps ``(observatory, session_id, relative path)`` to a file inside that session's
  work folder, refusing anything outside it (no ``..``, no symlink escape) and anything that is
  not a published product (the report folder and the products ZIP).

This module never imports Airflow or FastAPI.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import math
import stat
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote

log = logging.getLogger(__name__)

#: Files of a session that may be served: the report folder and the products ZIP.
REPORT_DIR = "report"


@dataclass(frozen=True)
class SessionEntry:
    """One reduced session, as listed on the index page."""

    observatory: str
    dag_id: str
    session_id: str
    night: str | None  # first frame's DATE-OBS date (UTC), when known
    n_science: int
    n_ok: int
    n_rejected: int
    median_fwhm_arcsec: float | None
    median_zp_mag: float | None
    n_transient_candidates: int
    has_report: bool
    products_zip: str | None  # file name inside the work folder, when present
    updated_utc: str  # session_summary.json modification time (ISO, seconds)
    run_id: str | None  # Airflow run that produced it, when it ran under Airflow

    def to_dict(self) -> dict:
        return asdict(self)


def _median(values):
    vals = sorted(v for v in values if isinstance(v, (int, float)) and math.isfinite(v))
    if not vals:
        return None
    n = len(vals)
    return vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])


def _entry(obs, workdir: Path) -> SessionEntry | None:
    path = workdir / "session_summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        mtime = path.stat().st_mtime
    except (OSError, ValueError) as exc:
        log.warning("browse: skipping %s: %s", path, exc)
        return None
    frames = [f for f in summary.get("frames", []) if isinstance(f, dict)]
    ok = [f for f in frames if f.get("status") == "ok"]
    dates = sorted(str(f["date_obs"]) for f in frames if f.get("date_obs"))
    zips = sorted(p.name for p in workdir.glob("*_products.zip"))
    fwhm = summary.get("median_fwhm_arcsec")
    return SessionEntry(
        observatory=obs.name,
        dag_id=obs.dag_id,
        session_id=str(summary.get("session_id") or workdir.name),
        night=dates[0][:10] if dates else None,
        n_science=int(summary.get("n_science") or len(frames)),
        n_ok=int(summary.get("n_ok") or len(ok)),
        n_rejected=int(summary.get("n_rejected") or 0),
        median_fwhm_arcsec=float(fwhm)
        if isinstance(fwhm, (int, float)) and math.isfinite(fwhm)
        else None,
        median_zp_mag=_median([f.get("zp_mag") for f in ok]),
        n_transient_candidates=int(sum(int(f.get("n_transient_candidates") or 0) for f in ok)),
        has_report=(workdir / REPORT_DIR / "report.html").is_file(),
        products_zip=zips[0] if zips else None,
        updated_utc=_dt.datetime.fromtimestamp(mtime, _dt.UTC).isoformat(timespec="seconds"),
        run_id=(summary.get("airflow") or {}).get("run_id"),
    )


def session_index(configs, *, limit: int | None = 500) -> list[SessionEntry]:
    """Every reduced session of the given observatories, most recently updated first.

    Parameters
    ----------
    configs : iterable of `~rpp_tasks.config.ObservatoryConfig`
    limit : int or None, optional
        At most this many entries (the newest).

    Returns
    -------
    list of `SessionEntry`
        Sessions are the folders ``<paths.work>/<session_id>/`` that hold a ``session_summary.json``;
        an unreadable summary is skipped with a warning, never an error.
    """
    out = []
    for obs in configs:
        work = obs.resolve_path("work")
        if not work.is_dir():
            continue
        for d in work.iterdir():
            if d.is_dir() and (d / "session_summary.json").is_file():
                e = _entry(obs, d)
                if e is not None:
                    out.append(e)
    out.sort(key=lambda e: (e.updated_utc, e.observatory, e.session_id), reverse=True)
    return out[:limit] if limit else out


def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def render_index_html(
    entries, *, title: str = "RPP night reports", airflow_base: str = "../"
) -> str:
    """The index page: one row per session with links to its report, its ZIP and its Airflow run.

    Links are relative (``<observatory>/<session>/report/report.html``), so the page works behind a
    reverse proxy and wherever the plugin is mounted. ``airflow_base`` is the relative path from the
    page to the Airflow UI root (for the link to the DAG run).
    """
    esc = html.escape
    rows = []
    for e in entries:
        base = f"{quote(e.observatory)}/{quote(e.session_id)}/"
        report = (
            f"<a href='{base}{REPORT_DIR}/report.html'>report</a>"
            if e.has_report
            else "<i>no report</i>"
        )
        zip_link = f" · <a href='{base}{quote(e.products_zip)}'>ZIP</a>" if e.products_zip else ""
        run = (
            f"<a target='_top' href='{airflow_base}dags/{quote(e.dag_id)}/runs/{quote(e.run_id)}'>run</a>"
            if e.run_id
            else ""
        )
        status = (
            "ok"
            if e.n_rejected == 0 and e.n_ok == e.n_science
            else ("failed" if e.n_ok == 0 else "partial")
        )
        rows.append(
            f"<tr class='{status}'><td>{esc(e.observatory)}</td><td>{esc(e.session_id)}</td>"
            f"<td>{esc(e.night or '–')}</td><td class='n'>{e.n_ok}/{e.n_science}</td>"
            f"<td class='n'>{e.n_rejected}</td><td class='n'>{_fmt(e.median_fwhm_arcsec, '.2f')}</td>"
            f"<td class='n'>{_fmt(e.median_zp_mag, '.3f')}</td><td class='n'>{e.n_transient_candidates}</td>"
            f"<td>{report}{zip_link}</td><td>{run}</td><td>{esc(e.updated_utc.replace('T', ' ').removesuffix('+00:00'))}</td></tr>"
        )
    body = (
        "\n".join(rows)
        if rows
        else (
            "<tr><td colspan='11'>No reduced session yet. Sessions appear here when a run's "
            "<code>products</code> task has written <code>session_summary.json</code>.</td></tr>"
        )
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; font-size: 14px; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; }}
th {{ background: #f4f4f4; position: sticky; top: 0; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.partial td:first-child {{ border-left: 4px solid #e0a000; }}
tr.failed td:first-child {{ border-left: 4px solid #c00; }}
tr.ok td:first-child {{ border-left: 4px solid #2a2; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p>{len(entries)} session(s), most recent first. FWHM and zero point are medians over the reduced frames;
the zero point is in magnitudes for 1 ADU/s.</p>
<table><thead><tr><th>observatory</th><th>session</th><th>night (UTC)</th><th>frames ok</th><th>rejected</th>
<th>FWHM ″</th><th>ZP mag</th><th>transient cand.</th><th>products</th><th>Airflow</th><th>updated (UTC)</th></tr></thead>
<tbody>
{body}
</tbody></table></body></html>
"""


def session_for_run(configs, dag_id: str, run_id: str) -> SessionEntry | None:
    """The session a DAG run produced (its ``session_summary.json`` names the run), or None.

    Watcher runs are ``session__<session_id>``, which is tried first; a run triggered by hand with
    another run id is found by the run id recorded in the summaries.
    """
    for obs in configs:
        if obs.dag_id != dag_id:
            continue
        work = obs.resolve_path("work")
        guess = run_id[len("session__") :] if run_id.startswith("session__") else None
        candidates = [work / guess] if guess and safe_name(guess) else []
        candidates += sorted(work.iterdir()) if work.is_dir() else []
        for d in candidates:
            try:
                has_summary = (d / "session_summary.json").is_file()
            except (OSError, ValueError):
                has_summary = False
            if has_summary:
                e = _entry(obs, d)
                if e is not None and e.run_id == run_id:
                    return e
    return None


_MAX_NAME_BYTES = 255  # one path component (NAME_MAX of the usual file systems)
_MAX_PATH_CHARS = 1024


def safe_name(name: str) -> bool:
    """True for a plain file or folder name: not empty, ``.`` or ``..``, no ``/``, ``\\``, NUL or
    other control character, at most 255 bytes in UTF-8."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        return False
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return False
    return len(name.encode("utf-8", "surrogatepass")) <= _MAX_NAME_BYTES


def product_path(configs, observatory: str, session_id: str, relpath: str) -> Path:
    """The file ``relpath`` of a session's published products, or an error.

    Parameters
    ----------
    configs : iterable of `~rpp_tasks.config.ObservatoryConfig`
    observatory, session_id : str
    relpath : str
        ``report/<file>`` or the session's ``<session>_products.zip``.

    Returns
    -------
    pathlib.Path
        A regular file that resolves inside the session's ``report/`` folder, or the ZIP itself.

    Raises
    ------
    ValueError
        A malformed request: a session id or path part that is not a plain name (``..``, NUL or
        control characters, more than 255 bytes), an absolute path.
    FileNotFoundError
        Unknown observatory or session, no such product, or not a regular file.
    PermissionError
        Not a published product (raw or intermediate files), or a symbolic link that resolves
        outside ``report/`` (or a ZIP that is a link to elsewhere).
    """
    by_name = {obs.name: obs for obs in configs}
    obs = by_name.get(observatory)
    if obs is None:
        raise FileNotFoundError(f"unknown observatory {observatory!r:.80}")
    if not safe_name(session_id):
        raise ValueError(f"invalid session id {session_id!r:.80}")
    rel = PurePosixPath(relpath)
    if (
        len(relpath) > _MAX_PATH_CHARS
        or rel.is_absolute()
        or not rel.parts
        or not all(safe_name(p) for p in rel.parts)
    ):
        raise ValueError(f"invalid product path {relpath!r:.80}")
    published = (rel.parts[0] == REPORT_DIR and len(rel.parts) >= 2) or (
        len(rel.parts) == 1 and rel.name.endswith("_products.zip")
    )
    if not published:
        raise PermissionError(
            f"{relpath!r:.80} is not a published product (report/... or the products ZIP)"
        )
    missing = FileNotFoundError(f"no product {relpath!r:.80} in session {session_id!r}")
    try:
        work = obs.resolve_path("work").resolve()
        workdir = (work / session_id).resolve(strict=True)
        if not workdir.is_relative_to(work) or not (workdir / "session_summary.json").is_file():
            raise FileNotFoundError(
                f"no reduced session {session_id!r} for observatory {observatory!r}"
            )
        if rel.parts[0] == REPORT_DIR:
            base = (workdir / REPORT_DIR).resolve(strict=True)
            if base.parent != workdir:
                raise PermissionError(f"{REPORT_DIR}/ of session {session_id!r} is a link")
            target = (workdir / Path(*rel.parts)).resolve(strict=True)
            inside = target.is_relative_to(base)
        else:
            target = (workdir / rel.name).resolve(strict=True)
            inside = target.parent == workdir and target.name == rel.name
        if not inside:
            raise PermissionError(f"{relpath!r:.80} is a link that leaves {REPORT_DIR}/")
        if not stat.S_ISREG(target.stat().st_mode):
            raise missing
    except (FileNotFoundError, PermissionError):
        raise
    except (OSError, RuntimeError, ValueError):  # ENAMETOOLONG, ELOOP, a link loop...
        raise missing from None
    return target
