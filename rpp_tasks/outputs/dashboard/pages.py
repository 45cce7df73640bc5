"""HTML pages of the dashboard: search, frame, session and target. Self-contained (inline CSS, a
few lines of JavaScript for the validate/withdraw buttons), relative links only, every value
escaped. ``base`` is the relative path from the page to the dashboard's root (``/dash/``)."""

from __future__ import annotations

import html
import json
from urllib.parse import quote, urlencode

from rpp_tasks.outputs.dashboard.search import Result

esc = html.escape

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.4em; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 7px; text-align: left;
  vertical-align: middle; }
th { background: #f4f4f4; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
form.search input, form.search select { margin: 0 .6em .4em 0; }
.withdrawn { background: #fde8e8; } .validated { background: #e8f7e8; }
.rejected { color: #888; }
.badge { padding: 1px 6px; border-radius: 8px; font-size: 12px; background: #eee; }
.badge.withdrawn { background: #e33; color: #fff; }
.badge.validated { background: #2a2; color: #fff; }
nav a { margin-right: 1em; }
.bar { background: #eee; width: 220px; height: 12px; display: inline-block; }
.bar span { background: #3a7; height: 12px; display: block; }
#msg { font-weight: bold; }
"""

JS = """
async function rppDecide(url, decision, frames) {
  const reason = document.getElementById('reason').value;
  const r = await fetch(url, {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({decision: decision, reason: reason, frames: frames})});
  const d = await r.json();
  document.getElementById('msg').textContent = r.ok
    ? decision + ' by ' + d.by + ' (' + d.archive_rows_removed + ' archive row(s) removed, '
      + d.archive_rows_added + ' added)'
    : 'refused: ' + (d.detail || r.status);
  if (r.ok) { setTimeout(() => location.reload(), 600); }
}
"""


def _page(title: str, body: str, base: str, *, script: bool = False) -> str:
    nav = (
        f"<nav><a href='{base}'>Search</a><a href='{base}../'>Night reports</a>"
        f"<a href='{base}target'>Light curves</a></nav>"
    )
    js = f"<script>{JS}</script>" if script else ""
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{CSS}</style>{js}</head><body>{nav}<h1>{esc(title)}</h1>\n{body}\n</body></html>"
    )


def _fmt(v, spec=".2f"):
    if v is None:
        return "–"
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return esc(str(v))


def _frame_url(base, r):
    return (
        f"{base}frame/{quote(r['observatory'])}/{quote(r['session_id'])}/{quote(r['frame_stem'])}"
    )


def _file_url(base, obs, session, stem, name):
    return f"{base}files/{quote(obs)}/{quote(session)}/frames/{quote(stem)}/{name}"


def search_page(result: Result, *, base: str, observatories, message: str | None = None) -> str:
    q = result.query
    p = q.params()

    def inp(name, label, size=10):
        return (
            f"<label>{label} <input name='{name}' size='{size}' "
            f"value='{esc(p.get(name, ''))}'></label>"
        )

    obs_opts = "".join(
        f"<option value='{esc(o)}'{' selected' if o == q.observatory else ''}>{esc(o)}</option>"
        for o in observatories
    )
    st_opts = "".join(
        f"<option{' selected' if s == q.status else ''}>{s}</option>"
        for s in ("ok", "rejected", "pending", "validated", "withdrawn")
    )
    form = (
        "<form class='search' method='get' action=''>"
        + inp("name", "Object", 16)
        + inp("ra", "RA°", 8)
        + inp("dec", "Dec°", 8)
        + inp("radius_arcmin", "radius ′", 5)
        + inp("band", "band", 5)
        + inp("date_from", "from", 10)
        + inp("date_to", "to", 10)
        + f"<label>observatory <select name='observatory'><option value=''>all</option>{obs_opts}"
        "</select></label>"
        + f"<label>status <select name='status'><option value=''>any</option>{st_opts}</select>"
        "</label><button id='go' type='submit'>Search</button></form>"
    )
    info = []
    if message:
        info.append(f"<p id='msg'>{esc(message)}</p>")
    if q.name:
        r = q.resolved
        info.append(
            f"<p>{esc(q.name)}: "
            + (
                f"RA {r['ra']:.5f}° Dec {r['dec']:+.5f}° ({esc(str(r['source']))}); frames within "
                f"{q.radius_arcmin or 15:g}′ or named so."
                if r
                else "not resolved offline: frames whose OBJECT is this name."
            )
            + f" <a href='{base}target?{urlencode({'name': q.name})}'>light curve</a></p>"
        )
    rows = []
    for r in result.rows:
        cls = r.get("decision") or ("rejected" if r["status"] == "rejected" else "")
        thumb = (
            f"<img loading='lazy' width='96' alt='thumbnail' src='"
            f"{_file_url(base, r['observatory'], r['session_id'], r['frame_stem'], 'thumb.png')}'>"
            if r["status"] == "ok"
            else ""
        )
        dec = r.get("decision") or ""
        badge = f"<span class='badge {esc(dec)}'>{esc(dec or 'pending')}</span>"
        rows.append(
            f"<tr class='{esc(cls)}'><td>{thumb}</td>"
            f"<td><a class='frame' href='{_frame_url(base, r)}'>{esc(r['frame_stem'])}</a></td>"
            f"<td>{esc(r['observatory'])}</td>"
            f"<td><a href='{base}session/{quote(r['observatory'])}/{quote(r['session_id'])}'>"
            f"{esc(r['session_id'])}</a></td><td>{esc(r.get('date_obs') or '')[:19]}</td>"
            f"<td>{esc(r.get('object_name') or '')}</td><td>{esc(r.get('band') or '')}</td>"
            f"<td class='n'>{_fmt(r.get('exptime_s'), 'g')}</td>"
            f"<td class='n'>{_fmt(r.get('fwhm_arcsec'))}</td>"
            f"<td class='n'>{_fmt(r.get('zp_mag'), '.3f')}</td>"
            f"<td>{esc(r['status'])} {badge if r['status'] == 'ok' else ''}</td></tr>"
        )
    exports = " · ".join(
        f"<a href='?{urlencode(q.params(format=f, page=None, per_page=500))}'>{f.upper()}</a>"
        for f in ("csv", "votable", "json")
    )
    pages = []
    if q.page > 1:
        pages.append(f"<a href='?{urlencode(q.params(page=q.page - 1))}'>« previous</a>")
    if q.page < result.n_pages:
        pages.append(f"<a href='?{urlencode(q.params(page=q.page + 1))}'>next »</a>")
    body = (
        form
        + "".join(info)
        + f"<p id='count'>{result.total} frame(s); page {q.page} of {result.n_pages}. "
        f"Export this page: {exports}</p>"
        "<table id='results'><thead><tr><th></th><th>frame</th><th>observatory</th><th>session</th>"
        "<th>date (UTC)</th><th>object</th><th>band</th><th>exp s</th><th>FWHM ″</th>"
        "<th>ZP</th><th>status</th></tr></thead><tbody>"
        + ("".join(rows) or "<tr><td colspan='11'>No frame matches.</td></tr>")
        + "</tbody></table><p>"
        + " ".join(pages)
        + "</p>"
    )
    return _page("Observations", body, base)


def _decisions_html(history) -> str:
    if not history:
        return "<p>No decision yet: the frame is pending.</p>"
    rows = "".join(
        f"<tr class='{esc(h['decision'])}'><td>{esc(str(h['decided_utc'])[:19])}</td>"
        f"<td>{esc(h['frame_stem'])}</td><td>{esc(h['decision'])}</td>"
        f"<td>{esc(h['decided_by'])}</td><td>{esc(h.get('reason') or '')}</td></tr>"
        for h in history
    )
    return (
        "<table class='decisions'><tr><th>when (UTC)</th><th>frame</th><th>decision</th>"
        f"<th>by</th><th>why</th></tr>{rows}</table>"
    )


def _decide_controls(base, obs, session, frames, can_decide) -> str:
    if not can_decide:
        return "<p><i>Validating and withdrawing needs the observer (Airflow User) role.</i></p>"
    url = f"{base}decide/{quote(obs)}/{quote(session)}"
    fr = json.dumps(frames).replace("'", "&#39;") if frames is not None else "null"
    return (
        "<p><label>Reason <input id='reason' size='50'></label> "
        f"<button id='validate' onclick='rppDecide(\"{url}\", \"validated\", {fr})'>"
        "Validate</button> "
        f"<button id='withdraw' onclick='rppDecide(\"{url}\", \"withdrawn\", {fr})'>"
        "Withdraw</button>"
        " <span id='msg'></span></p>"
    )


def _gain_fact(gain) -> str | None:
    """The gain the photometry used and where it came from; when the configured one was
    impossible for the frame's sky noise, the observer's line of the session summary
    (`rpp_tasks.session.summary.gain_warning`: the gain used and what to fix)."""
    from rpp_tasks.session.summary import gain_warning

    g = gain or {}
    if g.get("used_e_per_adu") is None:
        return None
    return (
        gain_warning(g) or f"{_fmt(g['used_e_per_adu'], '.3g')} ({g.get('source') or 'configured'})"
    )


def frame_page(
    *,
    base: str,
    obs: str,
    dag_id: str,
    session: str,
    frame: dict,
    decision: dict | None,
    history,
    can_decide: bool,
    run_id: str | None,
    psf_map: bool,
) -> str:
    stem = frame["frame"]
    ok = frame.get("status") == "ok"
    state = decision["decision"] if decision else ("pending" if ok else "not archived")
    facts = [
        ("status", f"{frame.get('status')} {frame.get('reason') or ''}"),
        ("decision", state),
        ("object", frame.get("object")),
        ("band", frame.get("band")),
        ("date (UTC)", frame.get("date_obs")),
        ("exposure (s)", _fmt(frame.get("exptime_s"), "g")),
        (
            "RA, Dec (°)",
            f"{_fmt(frame.get('ra_deg'), '.5f')}, {_fmt(frame.get('dec_deg'), '+.5f')}",
        ),
        ("telescope / instrument", f"{frame.get('telescope')} / {frame.get('instrument')}"),
        ("airmass", _fmt(frame.get("airmass"), ".3f")),
        ("FWHM (″)", _fmt(frame.get("fwhm_arcsec"))),
        (
            "zero point (mag)",
            f"{_fmt(frame.get('zp_mag'), '.3f')} ± {_fmt(frame.get('zp_err_mag'), '.3f')}",
        ),
        (
            "limiting mag",
            f"{_fmt(frame.get('limiting_mag_cal'))} (cal), "
            f"{_fmt(frame.get('limiting_mag_inst'))} (inst)",
        ),
        (
            "astrometric RMS (″)",
            f"{_fmt(frame.get('astrometric_rms_arcsec'), '.3f')} "
            f"({frame.get('wcs_source')}, {frame.get('wcs_status')})",
        ),
        ("sources", frame.get("n_sources")),
        ("gain (e⁻/ADU)", _gain_fact(frame.get("gain"))),
        (
            "background (ADU)",
            f"{_fmt(frame.get('background_adu'), '.1f')} ± "
            f"{_fmt(frame.get('background_rms_adu'), '.1f')}",
        ),
    ]
    rows = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(str(v if v is not None else '–'))}</td></tr>"
        for k, v in facts
    )
    f = lambda name: _file_url(base, obs, session, stem, name)  # noqa: E731
    downloads = (
        f"<a href='{f('calibrated.fits')}'>calibrated image (FITS)</a> · catalogue: "
        f"<a href='{f('catalog.ecsv')}'>ECSV</a> · <a href='{f('catalog.fits')}'>FITS</a> · "
        f"<a href='{f('catalog.vot')}'>VOTable</a>"
        if ok
        else "<i>no products: the frame was rejected</i>"
    )
    logs = ""
    if run_id:
        logs = (
            f"<p><a target='_top' href='{base}../../dags/{quote(dag_id)}/runs/{quote(run_id)}'>"
            "Airflow run and task logs of this frame's session</a></p>"
        )
    preview = (
        f"<p><img id='preview' alt='preview' src='{f('preview.png')}' width='640'><br>"
        "green circles: detections; magenta square: the target</p>"
        if ok
        else ""
    )
    psf = (
        f"<h2>PSF map (session)</h2><img alt='PSF map' width='480' src='{base}../{quote(obs)}/"
        f"{quote(session)}/report/psf_map.png'>"
        if psf_map
        else ""
    )
    body = (
        f"<p>Session <a href='{base}session/{quote(obs)}/{quote(session)}'>{esc(obs)} / "
        f"{esc(session)}</a> · <span class='badge {esc(state)}' id='state'>{esc(state)}</span></p>"
        + (_decide_controls(base, obs, session, [stem], can_decide) if ok else "")
        + preview
        + f"<table class='facts'>{rows}</table><h2>Downloads</h2><p>{downloads}</p>{logs}{psf}"
        + "<h2>Decisions</h2>"
        + _decisions_html(history)
    )
    return _page(f"Frame {stem}", body, base, script=True)


def session_page(
    *,
    base: str,
    obs: str,
    session: str,
    summary: dict | None,
    progress: dict,
    decisions: dict,
    history,
    can_decide: bool,
    can_delete: bool,
    has_report: bool,
    spectra: list[str],
) -> str:
    prog_rows = "".join(
        f"<tr><td>{esc(s['stage'])}</td><td><span class='bar'><span style='width:"
        f"{(100 * s['done'] / s['total']) if s['total'] else 0:.0f}%'></span></span></td>"
        f"<td class='n'>{s['done']}/{s['total']}</td></tr>"
        for s in progress["stages"]
    )
    state = "finished" if progress["finished"] else "running"
    body = [
        f"<p>State: <b id='run-state'>{state}</b> · "
        + (
            f"<a href='{base}../{quote(obs)}/{quote(session)}/report/report.html'>night report</a>"
            if has_report
            else "no report yet"
        )
        + "</p>",
        f"<h2>Progress</h2><table id='progress'>{prog_rows}</table>",
    ]
    if summary:
        body.append(_decide_controls(base, obs, session, None, can_decide))
        frows = []
        for fr in summary.get("frames") or []:
            d = decisions.get(fr["frame"]) or decisions.get("*")
            st = d["decision"] if d else ("pending" if fr.get("status") == "ok" else "")
            frows.append(
                f"<tr class='{esc(st)}'><td><a href='{base}frame/{quote(obs)}/{quote(session)}/"
                f"{quote(fr['frame'])}'>{esc(fr['frame'])}</a></td>"
                f"<td>{esc(fr.get('status') or '')}</td>"
                f"<td>{esc(st)}</td><td>{esc(fr.get('reason') or '')}</td>"
                f"<td class='n'>{_fmt(fr.get('fwhm_arcsec'))}</td></tr>"
            )
        body.append(
            "<h2>Science frames</h2><table id='frames'><tr><th>frame</th><th>outcome</th>"
            "<th>decision</th><th>reason</th><th>FWHM ″</th></tr>" + "".join(frows) + "</table>"
        )
        files = "".join(
            f"<tr><td>{esc(str(x.get('path', '')).rsplit('/', 1)[-1])}</td>"
            f"<td>{esc(x.get('kind') or '')}</td>"
            f"<td>{esc(x.get('outcome') or '')}</td><td>{esc(x.get('reason') or '')}</td></tr>"
            for x in summary.get("files") or []
        )
        body.append(
            "<h2>Every file</h2><table id='files'><tr><th>file</th><th>kind</th><th>outcome</th>"
            f"<th>reason</th></tr>{files}</table>"
        )
    if spectra:
        body.append(
            "<h2>Spectra</h2><ul>"
            + "".join(
                f"<li><a href='{base}spectrum/{quote(obs)}/{quote(session)}/{quote(s)}'>"
                f"{esc(s)}</a></li>"
                for s in spectra
            )
            + "</ul>"
        )
    body.append(
        f"<p>Coverage: <a href='{base}moc/{quote(obs)}/{quote(session)}.json'>"
        "MOC of this session</a></p>"
    )
    if can_delete:
        body.append(
            "<h2>Admin</h2><p><button id='delete' onclick=\"if(confirm('Delete every product of "
            "this session (raw files are kept)?')) "
            f"fetch('{base}delete/{quote(obs)}/{quote(session)}',"
            "{method:'POST',headers:{'Content-Type':'application/json'},body:'{}'}).then(r=>r.json())"
            ".then(d=>{document.getElementById('msg').textContent=JSON.stringify(d)})\">Delete "
            "products</button></p>"
        )
    body.append("<h2>Decisions</h2>" + _decisions_html(history))
    return _page(f"Session {obs} / {session}", "\n".join(body), base, script=True)


def target_page(
    *, base: str, name: str | None, info: dict | None, plot: str | None, error: str | None
) -> str:
    form = (
        "<form method='get'><label>Target <input name='name' value='"
        f"{esc(name or '')}'></label> <button>Light curve</button></form>"
    )
    body = [form]
    if error:
        body.append(f"<p id='msg'>{esc(error)}</p>")
    if info:
        body.append(
            f"<p>{esc(str(info['name']))}: {info['n_points']} point(s), {info['n_detected']} "
            f"detection(s), {info['n_upper_limits']} upper limit(s), bands "
            f"{esc(', '.join(info['bands']))}, {info['n_nights']} night(s).</p>"
        )
    if plot:
        body.append(f"<img alt='light curve' src='data:image/png;base64,{plot}'>")
    return _page(f"Light curve {name or ''}".strip(), "\n".join(body), base)


def spectrum_page(*, base: str, obs: str, session: str, spectrum: str) -> str:
    url = f"{base}spectrum-file/{quote(obs)}/{quote(session)}/{quote(spectrum)}"
    body = (
        f"<p>Session <a href='{base}session/{quote(obs)}/{quote(session)}'>{esc(obs)} / "
        f"{esc(session)}</a></p><p><img id='spectrum' alt='spectrum' width='900' "
        f"src='{url}_spectrum.png'></p><p>Download: <a href='{url}.fits'>FITS (BeSS)</a> · "
        f"<a href='{url}.ecsv'>ECSV</a></p>"
    )
    return _page(f"Spectrum {spectrum.rsplit('/', 1)[-1]}", body, base)
