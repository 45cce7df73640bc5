"""Notifications: the morning e-mail and Telegram message to observers, failure alerts to operators.

The messages are composed from the session summary's headline
(`~rpp_tasks.session.summary.Headline`) and sent through `rpp_tasks.outputs.channels` (SMTP and the
Telegram Bot API, with retries; its names are re-exported here). No Airflow import: the DAG hands
plain settings (`SmtpSettings`, `TelegramSettings`; see ``docs/notifications.md``).

* Outcomes are appended to ``<workdir>/notify.json`` (a list of `Notice.to_dict` records).

Adapters: `run_notify(session, obs, ...)` (builds the report if missing, then e-mail + Telegram),
`notify_failure(info, obs, ...)` (operators' alert: DAG, session, task, error, log link).
"""

from __future__ import annotations

import html
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rpp_tasks.outputs.channels import (
    TELEGRAM_API,
    Notice,
    NotificationError,
    RetryPolicy,
    SmtpSettings,
    TelegramSettings,
    _cut,
    _now,
    printable,
    scrub,
    send_email,
    send_telegram_message,
    send_telegram_photo,
)
from rpp_tasks.outputs.report_target import target_email_rows, target_lines
from rpp_tasks.session.summary import SessionSummary
from rpp_tasks.session.workdir import Session, read_json, write_json_atomic

__all__ = [
    "TELEGRAM_API",
    "NotificationError",
    "SmtpSettings",
    "TelegramSettings",
    "RetryPolicy",
    "Notice",
    "scrub",
    "printable",
    "send_email",
    "send_telegram_message",
    "send_telegram_photo",
    "compose_session_email",
    "compose_session_telegram",
    "compose_failure_alert",
    "record_notices",
    "run_notify",
    "notify_failure",
]

log = logging.getLogger(__name__)


# =============================================================================== composing
def _f(value, fmt="{:.2f}", missing="—") -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return missing
    return fmt.format(v) if v == v and abs(v) != float("inf") else missing


def _gain_note(summary: SessionSummary) -> str:
    """The camera gain the observer must fix (`FrameSummary.gain_warning`), once per session."""
    notes = [f.gain_warning for f in summary.frames if f.gain_warning]
    if not notes:
        return ""
    return f"{len(notes)} frame(s): {notes[0]}" + (" (first frame)" if len(notes) > 1 else "")


def _session_facts(summary: SessionSummary) -> dict:
    """The headline of a session (`~rpp_tasks.session.summary.Headline`) as the messages show it."""
    h = summary.headline
    return {
        "n_science": h.n_science,
        "n_ok": h.n_ok,
        "rejected": [f.to_dict() for f in summary.frames if not f.ok],
        "gain_note": _gain_note(summary),
        "fwhm_arcsec": h.median_fwhm_arcsec,
        "fwhm_px": h.median_fwhm_px,
        "sky_adu": h.median_sky_adu,
        "limit": (h.limiting_mag, h.limiting_mag_kind or ""),
        "objects": list(h.objects),
        "bands": list(h.bands),
        "n_sources": h.n_sources,
        "n_candidates": h.n_transient_candidates,
    }


def compose_session_email(
    summary: Mapping[str, Any],
    *,
    title: str | None = None,
    report_url: str | None = None,
    products_url: str | None = None,
    products_path: str | None = None,
    inline_cid: str | None = "night_plot",
    report_attached: bool = True,
) -> tuple[str, str, str]:
    """
    Subject, HTML body and text body of the morning e-mail of a session.

    Returns
    -------
    subject, html_body, text_body : str
    """
    summary = SessionSummary.coerce(summary)
    s = _session_facts(summary)
    name = title or summary.observatory
    sid = summary.session_id or "?"
    n_candidates = s["n_candidates"]
    fwhm = (
        f"FWHM {_f(s['fwhm_arcsec'])}\u2033"
        if s["fwhm_arcsec"] is not None
        else f"FWHM {_f(s['fwhm_px'])} px"
        if s["fwhm_px"] is not None
        else ""
    )
    flag = "" if s["n_ok"] == s["n_science"] and s["n_science"] else " [frames rejected]"
    lead = target_lines(summary)
    subject = (
        f"[RPP {summary.observatory}] night {sid}: "
        + (f"{_cut_line(lead[0], 90)}; " if lead else "")
        + f"{s['n_ok']}/{s['n_science']} frames reduced"
        + (f", {fwhm}" if fwhm else "")
        + flag
    )
    lim, lim_kind = s["limit"]
    cand = str(n_candidates) if n_candidates is not None else "not available yet"
    # the observer's targets lead (rpp_tasks.outputs.report_target, from the summary)
    rows = target_email_rows(summary) + [
        ("Frames reduced", f"{s['n_ok']} of {s['n_science']}"),
        ("Objects", ", ".join(s["objects"]) or "—"),
        ("Bands", ", ".join(s["bands"]) or "—"),
        (
            "Median FWHM",
            (
                f"{_f(s['fwhm_arcsec'])}\u2033 ({_f(s['fwhm_px'])} px)"
                if s["fwhm_arcsec"] is not None
                else f"{_f(s['fwhm_px'])} px"
            ),
        ),
        ("Median sky", f"{_f(s['sky_adu'], '{:.0f}')} ADU"),
        ("Deepest 5σ limit", f"{_f(lim)} ({lim_kind})" if lim is not None else "—"),
        ("Sources measured", f"{s['n_sources']:,}"),
        ("Transient candidates", cand),
    ]
    td = "padding:4px 12px;border-bottom:1px solid #e3e7ee"
    table = "".join(
        f"<tr><td style='{td};color:#5b6575'>{html.escape(k)}</td>"
        f"<td style='{td}'><b>{html.escape(v)}</b></td></tr>"
        for k, v in rows
    )
    rej = ""
    if s["rejected"]:
        items = "".join(
            f"<li><b>{html.escape(str(f.get('frame')))}</b>: "
            f"{html.escape(str(f.get('failed_stage') or ''))}"
            f" — {html.escape(str(f.get('reason') or 'no reason recorded'))}</li>"
            for f in s["rejected"][:20]
        )
        rej = f"<p style='color:#c62828'><b>Rejected frames</b></p><ul>{items}</ul>"
    gain = (
        f"<p style='color:#b26a00'><b>Camera gain</b>: {html.escape(s['gain_note'])}</p>"
        if s["gain_note"]
        else ""
    )
    links = []
    if report_url:
        links.append(f"<a href='{html.escape(report_url)}'>full report</a>")
    if products_url:
        links.append(f"<a href='{html.escape(products_url)}'>products (ZIP)</a>")
    attached = (
        "The full report (self-contained HTML, opens offline) is attached. "
        if report_attached
        else ""
    )
    if products_path and not products_url:
        links.append(
            f"Products ZIP on the pipeline host: <code>{html.escape(str(products_path))}</code>"
        )
    img = (
        f"<p><img src='cid:{inline_cid}' alt='night trends' "
        "style='max-width:100%;border:1px solid #e3e7ee'></p>"
        if inline_cid
        else ""
    )
    font = "font-family:Segoe UI,Roboto,Helvetica,Arial,sans-serif;color:#1d2430"
    version = html.escape(str(summary.rpp_version or ""))
    html_body = f"""<html><body style="{font}">
<h2 style="color:#283593;margin-bottom:4px">{html.escape(name)} — night {html.escape(str(sid))}</h2>
<table style="border-collapse:collapse;font-size:14px">{table}</table>
{rej}{gain}{img}
<p style="font-size:13px">{attached}{" · ".join(links)}</p>
<p style="font-size:12px;color:#5b6575">Sent by the RPP nightly pipeline (rpp_tasks {version}).</p>
</body></html>"""
    text_lines = [f"{name} — night {sid}", ""] + [f"{k}: {v}" for k, v in rows]
    if s["rejected"]:
        text_lines += ["", "Rejected frames:"] + [
            f"  {f.get('frame')}: {f.get('failed_stage')} — {f.get('reason')}"
            for f in s["rejected"][:20]
        ]
    if s["gain_note"]:
        text_lines += ["", f"Camera gain: {s['gain_note']}"]
    if report_url:
        text_lines += ["", f"Report: {report_url}"]
    if products_url or products_path:
        text_lines += [f"Products: {products_url or products_path}"]
    return subject, html_body, "\n".join(text_lines) + "\n"


def compose_session_telegram(
    summary: Mapping[str, Any],
    *,
    title: str | None = None,
    report_url: str | None = None,
) -> tuple[str, str]:
    """Short Telegram message (HTML parse mode) and photo caption of a session."""
    summary = SessionSummary.coerce(summary)
    s = _session_facts(summary)
    n_candidates = s["n_candidates"]
    e = html.escape
    name = title or summary.observatory
    sid = summary.session_id or "?"
    icon = "\u2705" if s["n_ok"] == s["n_science"] and s["n_science"] else "\u26a0\ufe0f"
    fwhm = (
        f"{_f(s['fwhm_arcsec'])}\u2033"
        if s["fwhm_arcsec"] is not None
        else f"{_f(s['fwhm_px'])} px"
    )
    lim, lim_kind = s["limit"]
    lead = target_lines(summary)
    lines = [
        f"\U0001f52d <b>{e(name)}</b> — night {e(str(sid))}",
        *(f"\U0001f3af {e(t)}" for t in lead[:8]),
        *([f"… and {len(lead) - 8} more target lines in the report"] if len(lead) > 8 else []),
        f"{icon} {s['n_ok']}/{s['n_science']} frames reduced · FWHM {fwhm} · "
        f"sky {_f(s['sky_adu'], '{:.0f}')} ADU",
        f"Objects: {e(', '.join(s['objects']) or '—')} · bands: {e(', '.join(s['bands']) or '—')}",
        f"Deepest 5σ limit: {_f(lim)} ({lim_kind})" if lim is not None else "Limiting magnitude: —",
        "Transient candidates: "
        + (str(n_candidates) if n_candidates is not None else "not available yet"),
    ]
    for f in s["rejected"][:5]:
        lines.append(f"\u274c {e(str(f.get('frame')))}: {e(str(f.get('reason') or '?'))}")
    if len(s["rejected"]) > 5:
        lines.append(f"… and {len(s['rejected']) - 5} more rejected")
    if report_url:
        lines.append(f'<a href="{e(report_url)}">Full report</a>')
    caption = f"{e(name)} · {e(str(sid))} · {s['n_ok']}/{s['n_science']} frames · FWHM {fwhm}"
    return "\n".join(lines), caption


def _cut_line(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip(", ") + "…"


def _is_absolute_url(url: str) -> bool:
    return bool(re.match(r"^https?://[^/\s]+", str(url)))


def compose_failure_alert(info: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """
    Subject, HTML body, text body and Telegram text of an operators' failure alert.

    Parameters
    ----------
    info : mapping
        ``dag_id``, ``task_id``, ``run_id``, ``try_number``, ``max_tries``, ``observatory``,
        ``session_id``, ``session_dir``, ``error``, ``log_url``, ``at``
        (`rpp_tasks.session.connections.failure_info`).
    """
    e = html.escape
    # every value shown as it is but printable: a newline or control character in a session id
    # or a header value must not make the alert undeliverable (the error keeps its line breaks)
    info = {
        k: printable(v, one_line=k != "error", limit=4000 if k == "error" else 300)
        if isinstance(v, str)
        else v
        for k, v in dict(info).items()
    }
    dag, task = info.get("dag_id") or "?", info.get("task_id")
    session = info.get("session_id") or info.get("session_dir") or "?"
    what = f"task {task}" if task else "run"
    subject = printable(f"[RPP FAILURE] {dag} / {session}: {what} failed", limit=200)
    rows = [
        ("DAG", dag),
        ("session", session),
        ("task", task or "(whole run)"),
        ("run", info.get("run_id")),
        (
            "try",
            f"{info.get('try_number')} of {(info.get('max_tries') or 0) + 1}"
            if info.get("try_number") is not None
            else None,
        ),
        ("observatory", info.get("observatory")),
        ("session folder", info.get("session_dir")),
        ("error", info.get("error")),
        ("at", info.get("at")),
    ]
    rows = [(k, str(v)) for k, v in rows if v not in (None, "")]
    log_url = info.get("log_url")
    bad_link = None
    if log_url and not _is_absolute_url(log_url):  # a mail client cannot open a relative link
        bad_link = (
            f"{log_url} (not an absolute URL: set Airflow's [api] base_url to the address "
            "operators use)"
        )
        rows.append(("log", bad_link))
        log_url = None
    td = "padding:4px 12px;border-bottom:1px solid #e3e7ee;vertical-align:top"
    table = "".join(
        f"<tr><td style='{td};color:#5b6575'>{e(k)}</td><td style='{td}'>"
        + (f"<pre style=margin:0;white-space:pre-wrap>{e(v)}</pre>" if k == "error" else e(v))
        + "</td></tr>"
        for k, v in rows
    )
    link = (
        f"<p><a href='{e(log_url)}'>Open the task log</a><br>"
        "<span style='font-size:12px;color:#5b6575'>"
        f"{e(log_url)}</span></p>"
        if log_url
        else "<p>(no log link available)</p>"
    )
    html_body = (
        f"<html><body style='font-family:Segoe UI,Roboto,Helvetica,Arial,sans-serif'>"
        f"<h2 style='color:#c62828'>{e(subject)}</h2>"
        "<table style='border-collapse:collapse;font-size:14px'>"
        f"{table}</table>{link}<p style='font-size:12px;color:#5b6575'>Products of the session's "
        "other frames and tasks are kept; clear the failed task in Airflow to retry it.</p>"
        "</body></html>"
    )
    text = "\n".join(
        [subject, ""] + [f"{k}: {v}" for k, v in rows] + ([f"log: {log_url}"] if log_url else [])
    )
    err = str(info.get("error") or "")
    tg = "\n".join(
        [
            f"\U0001f6a8 <b>RPP failure</b>: {e(dag)} / {e(str(session))}",
            f"{e(what)} failed"
            + (f" (try {info.get('try_number')})" if info.get("try_number") else ""),
            f"<code>{e(_cut(err, 1500))}</code>" if err else "",
            f'<a href="{e(log_url)}">task log</a>'
            if log_url
            else (f"log: {e(bad_link)}" if bad_link else ""),
        ]
    )
    return subject, html_body, text + "\n", "\n".join(x for x in tg.splitlines() if x)


# =============================================================================== recording
def record_notices(path: str | Path, notices: Sequence[Notice]) -> Path:
    """Append notices to a ``notify.json`` list (created if missing; written atomically)."""
    path = Path(path)
    old = read_json(path, [])
    if not isinstance(old, list):
        old = []
    return write_json_atomic(path, old + [n.to_dict() for n in notices])


def _delivered(path: Path, run_key: str | None) -> set[tuple[str, str, tuple[str, ...]]]:
    if not run_key:
        return set()
    records = read_json(path, []) or []
    return {
        (r.get("channel"), r.get("kind"), tuple(r.get("recipients") or ()))
        for r in records
        if isinstance(r, dict) and r.get("run_key") == run_key and r.get("status") == "ok"
    }


def _skipped(channel: str, kind: str, recipients, reason: str, run_key) -> Notice:
    return Notice(
        channel=channel,
        kind=kind,
        recipients=tuple(recipients),
        status="skipped",
        attempts=0,
        error=reason,
        at=_now(),
        run_key=run_key,
    )


def _aggregate(notices: Sequence[Notice]) -> str:
    if any(n.status == "failed" for n in notices):
        return "failed"
    return "ok" if any(n.status == "ok" for n in notices) else "skipped"


# =============================================================================== adapters
def run_notify(
    session: Session,
    obs,
    *,
    smtp: SmtpSettings | None = None,
    telegram: TelegramSettings | None = None,
    report_url: str | None = None,
    products_url: str | None = None,
    run_key: str | None = None,
    config_errors: Mapping[str, str] | None = None,
    policy: RetryPolicy | None = None,
    attach_limit_bytes: int = 8_000_000,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """
    Tell the observers: e-mail (``obs.notifications.email_to``) and Telegram, after building the
    report if it is missing or older than ``session_summary.json``.

    Parameters
    ----------
    session : `~rpp_tasks.session.workdir.Session`
    obs : `~rpp_tasks.config.ObservatoryConfig`
    smtp, telegram : settings, optional
        None = channel not configured (recorded as ``skipped``).
    report_url, products_url : str, optional
        Links to the published report and ZIP (when a web server serves the products).
    run_key : str, optional
        Airflow run id: a notice already delivered with this key is not sent again (task retries).
    config_errors : mapping of str to str, optional
        Channel -> why its settings could not be resolved (e.g. a missing Airflow connection);
        recorded as ``failed``.
    policy : `RetryPolicy`, optional
    attach_limit_bytes : int, optional
        The report is attached only when smaller (else linked).
    sleep : callable, optional

    Returns
    -------
    result : dict
        ``status`` (``ok`` | ``failed`` | ``skipped``), ``n_ok``, ``n_failed``, ``n_skipped``,
        ``notices`` (list of dicts), ``failed`` (short texts), ``report``, ``products_zip``,
        ``notify_json``.
    """
    from rpp_tasks.outputs import report as rpp_report

    summary = session.read_json("session_summary.json")
    if summary is None:
        raise FileNotFoundError(
            f"{session.workdir}: no session_summary.json (run the products step first)"
        )
    notify_path = session.path("notify.json")
    report_html = session.path("report", "report.html")
    summary_path = session.path("session_summary.json")
    info = session.read_json("report/report.json", {}) or {}
    if not report_html.is_file() or report_html.stat().st_mtime < summary_path.stat().st_mtime:
        try:
            info = rpp_report.run_report(session, obs)
        except Exception as exc:  # the message still goes out, without the report
            log.error("[%s] report could not be built: %s", session.session_id, exc, exc_info=True)
            info = {}
    plots = {k: Path(v) for k, v in (info.get("plot_paths") or {}).items() if Path(v).is_file()}
    email_text, telegram_text = compose_session_email, compose_session_telegram
    if summary.get("instrument_kind") == "longslit":  # spectra: the first spectrum is the plot
        from rpp_tasks.outputs import spectra_notify as sn

        email_text, telegram_text = sn.compose_spectra_email, sn.compose_spectra_telegram
        spectra = [v for k, v in plots.items() if k.startswith("spectrum_")]
        plots = {"preview": spectra[0]} if spectra else {}
    zip_path = info.get("products_zip")
    title = getattr(obs, "title", None) or obs.name
    cfg = obs.notifications
    done = _delivered(notify_path, run_key)
    notices: list[Notice] = []
    errors = dict(config_errors or {})

    # ---- e-mail
    to = tuple(cfg.email_to)
    if "email" in errors:
        notices.append(
            Notice("email", "session", to, "failed", 0, scrub(errors["email"]), _now(), run_key)
        )
    elif not to:
        notices.append(
            _skipped("email", "session", to, "no recipients in notifications.email_to", run_key)
        )
    elif smtp is None:
        notices.append(_skipped("email", "session", to, "no SMTP settings", run_key))
    elif ("email", "session", to) in done:
        notices.append(_skipped("email", "session", to, "already delivered in this run", run_key))
    else:
        inline = plots.get("trends") or plots.get("preview")
        attach = report_html.is_file() and report_html.stat().st_size <= attach_limit_bytes
        subject, body, text = email_text(
            summary,
            title=title,
            report_url=report_url,
            products_url=products_url,
            products_path=zip_path,
            inline_cid="night_plot" if inline else None,
            report_attached=attach,
        )
        attachments = (
            [
                (
                    f"report_{obs.name}_{session.session_id}.html",
                    report_html.read_bytes(),
                    "text/html",
                )
            ]
            if attach
            else []
        )
        notices.append(
            send_email(
                smtp,
                to=to,
                subject=subject,
                html_body=body,
                text_body=text,
                inline_images={"night_plot": inline.read_bytes()} if inline else None,
                attachments=attachments,
                kind="session",
                policy=policy,
                run_key=run_key,
                sleep=sleep,
            )
        )

    # ---- Telegram
    if "telegram" in errors:
        notices.append(
            Notice(
                "telegram", "session", (), "failed", 0, scrub(errors["telegram"]), _now(), run_key
            )
        )
    elif telegram is None:
        if getattr(cfg, "telegram_conn_id", None):
            notices.append(_skipped("telegram", "session", (), "no Telegram settings", run_key))
    else:
        text, caption = telegram_text(summary, title=title, report_url=report_url)
        chat = (str(telegram.chat_id),)
        if ("telegram", "session", chat) in done:
            notices.append(
                _skipped("telegram", "session", chat, "already delivered in this run", run_key)
            )
        else:
            notices.append(
                send_telegram_message(
                    telegram, text, kind="session", policy=policy, run_key=run_key, sleep=sleep
                )
            )
        photo = plots.get("preview") or plots.get("trends")
        if photo is not None:
            if ("telegram", "session_photo", chat) in done:
                notices.append(
                    _skipped(
                        "telegram", "session_photo", chat, "already delivered in this run", run_key
                    )
                )
            else:
                notices.append(
                    send_telegram_photo(
                        telegram,
                        photo.read_bytes(),
                        caption=caption,
                        filename=photo.name,
                        policy=policy,
                        run_key=run_key,
                        sleep=sleep,
                    )
                )

    record_notices(notify_path, notices)
    status = _aggregate(notices)
    failed = [
        f"{n.channel} {n.kind} to {', '.join(n.recipients) or '?'}: {n.error}"
        for n in notices
        if n.status == "failed"
    ]
    log.log(
        logging.ERROR if failed else logging.INFO,
        "[%s] notify: %s (%s)",
        session.session_id,
        status,
        "; ".join(failed) or ", ".join(f"{n.channel}/{n.kind} {n.status}" for n in notices),
    )
    return {
        "status": status,
        "n_ok": sum(n.status == "ok" for n in notices),
        "n_failed": len(failed),
        "n_skipped": sum(n.status == "skipped" for n in notices),
        "failed": failed,
        "notices": [n.to_dict() for n in notices],
        "report": str(report_html) if report_html.is_file() else None,
        "products_zip": zip_path,
        "notify_json": str(notify_path),
    }


def notify_failure(
    info: Mapping[str, Any],
    obs,
    *,
    smtp: SmtpSettings | None = None,
    telegram: TelegramSettings | None = None,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """
    Alert the operators of a failed task or run (e-mail to ``notifications.operators_email_to``,
    Telegram via the operators' settings). Never raises.

    The notices are appended to ``<paths.work>/<session_id>/notify.json`` when that session folder
    exists, else to ``<paths.work>/notify.json``; their ``run_key`` is
    ``run_id|task_id|try_number``,
    and a failure already alerted on a channel (the task's callback and the run's callback report
    the same failure) is not sent again.

    Returns
    -------
    result : dict
        ``status``, ``notices``, ``notify_json``.
    """
    policy = policy or RetryPolicy(attempts=3, backoff_s=1.0, max_backoff_s=10.0)
    secrets = [s for st in (smtp, telegram) if st is not None for s in st.secrets()]
    info = {k: (scrub(v, secrets) if isinstance(v, str) else v) for k, v in dict(info).items()}
    notices: list[Notice] = []
    path = None
    if obs is not None:
        try:
            from rpp_tasks.outputs.browse import safe_name

            work = obs.resolve_path("work")
            sid = info.get("session_id")
            # only a plain folder name: '../x' or an odd id must not put the notices elsewhere
            in_session = isinstance(sid, str) and safe_name(sid)
            path = (
                work / sid / "notify.json"
                if in_session and (work / sid / "session.json").is_file()
                else work / "notify.json"
            )
        except Exception as exc:
            log.warning("no place to record the failure alert: %s", exc)
    # The task's callback and the run's callback report the same failure: alert once per
    # (run, task, try) and channel.
    key = "|".join(str(info.get(k) or "") for k in ("run_id", "task_id", "try_number"))
    done = set()
    if path is not None and path.is_file():
        try:
            done = {
                (r.get("channel"), tuple(r.get("recipients") or ()))
                for r in read_json(path, []) or []
                if isinstance(r, dict)
                and r.get("kind") == "failure"
                and r.get("run_key") == key
                and r.get("status") == "ok"
            }
        except ValueError:
            done = set()
    try:
        subject, body, text, tg = compose_failure_alert(info)
    except Exception as exc:  # an alert must never hide the original failure
        log.error("failure alert could not be composed: %s", scrub(exc, secrets))
        subject = f"[RPP FAILURE] {printable(info.get('dag_id'), limit=100)}"
        body = text = tg = f"{subject}\n(the alert could not be composed: {type(exc).__name__})"
    cfg = getattr(obs, "notifications", None)
    to = tuple(getattr(cfg, "operators_email_to", None) or ())
    try:  # each channel on its own: one that cannot send must not silence the other
        if to and smtp is not None:
            if ("email", to) in done:
                log.info("failure alert for %s already e-mailed to %s", key, ", ".join(to))
            else:
                notices.append(
                    send_email(
                        smtp,
                        to=to,
                        subject=subject,
                        html_body=body,
                        text_body=text,
                        kind="failure",
                        policy=policy,
                        run_key=key,
                        sleep=sleep,
                    )
                )
        elif to:
            notices.append(_skipped("email", "failure", to, "no SMTP settings", key))
    except Exception as exc:
        log.error("failure alert could not be e-mailed: %s", scrub(exc, secrets))
    try:
        if telegram is not None:
            if ("telegram", (str(telegram.chat_id),)) in done:
                log.info("failure alert for %s already sent to chat %s", key, telegram.chat_id)
            else:
                notices.append(
                    send_telegram_message(
                        telegram, tg, kind="failure", policy=policy, run_key=key, sleep=sleep
                    )
                )
    except Exception as exc:  # an alert must never hide the original failure
        log.error("failure alert could not be sent to Telegram: %s", scrub(exc, secrets))
    if path is not None and notices:
        try:
            record_notices(path, notices)
        except Exception as exc:
            log.warning("could not record the failure alert: %s", exc)
            path = None
    return {
        "status": _aggregate(notices) if notices else "skipped",
        "notices": [n.to_dict() for n in notices],
        "notify_json": str(path) if path and notices else None,
    }
