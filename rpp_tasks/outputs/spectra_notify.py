"""Messages of a long-slit session (`rpp_tasks.outputs.notify.run_notify` sends them).

Per target: wavelength range, RMS, resolving power, S/N, flux-calibrated or not, or why it was
rejected; the first reduced target's spectrum plot is the e-mail's inline image and the Telegram
photo. Read from the session summary only.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from rpp_tasks.session.summary import SessionSummary

__all__ = ["compose_spectra_email", "compose_spectra_telegram", "spectrum_line"]


def spectrum_line(s) -> str:
    """One line of text for a target (a `~rpp_tasks.session.summary.SpectrumSummary`)."""
    if not s.ok:
        return f"{s.target}: rejected ({s.failed_stage}: {s.reason})"
    return (
        f"{s.target}: {s.exptime2}, {s.wavelength_min_a:.0f}-{s.wavelength_max_a:.0f} Å, "
        f"RMS {s.rms_a:.3f} Å ({s.rms_px:.3f} px), R={s.resolving_power:.0f}, "
        f"S/N={s.snr_median:.0f}, "
        f"{'flux-calibrated' if s.flux_calibrated else 'not flux-calibrated'}"
    )


def compose_spectra_email(
    summary: Mapping[str, Any] | SessionSummary,
    *,
    title: str | None = None,
    report_url: str | None = None,
    products_url: str | None = None,
    products_path: str | None = None,
    inline_cid: str | None = "night_plot",
    report_attached: bool = True,
) -> tuple[str, str, str]:
    """Subject, HTML body and text body of the morning e-mail of a long-slit session."""
    s = SessionSummary.coerce(summary)
    h = s.headline
    name = title or s.observatory
    sid = s.session_id or "?"
    flag = "" if h.n_ok == h.n_science and h.n_science else " [targets rejected]"
    subject = f"[RPP {s.observatory}] night {sid}: {h.n_ok}/{h.n_science} spectra reduced{flag}"
    lines = [spectrum_line(x) for x in s.spectra]
    items = "".join(f"<li>{html.escape(t)}</li>" for t in lines)
    links = []
    if report_url:
        links.append(f"<a href='{html.escape(report_url)}'>full report</a>")
    if products_url:
        links.append(f"<a href='{html.escape(products_url)}'>products (ZIP)</a>")
    elif products_path:
        links.append(f"Products ZIP: <code>{html.escape(str(products_path))}</code>")
    attached = "The full report (HTML) is attached. " if report_attached else ""
    img = (
        f"<p><img src='cid:{inline_cid}' alt='spectrum' style='max-width:100%'></p>"
        if inline_cid
        else ""
    )
    body = (
        f"<html><body><h2>{html.escape(name)} — night {html.escape(str(sid))}</h2>"
        f"<p>{h.n_ok} of {h.n_science} target(s) reduced.</p><ul>{items}</ul>{img}"
        f"<p>{attached}{' · '.join(links)}</p></body></html>"
    )
    text = [f"{name} — night {sid}", "", *lines]
    if report_url:
        text += ["", f"Report: {report_url}"]
    if products_url or products_path:
        text += [f"Products: {products_url or products_path}"]
    return subject, body, "\n".join(text) + "\n"


def compose_spectra_telegram(
    summary: Mapping[str, Any] | SessionSummary,
    *,
    title: str | None = None,
    report_url: str | None = None,
) -> tuple[str, str]:
    """Telegram message (HTML parse mode) and photo caption of a long-slit session."""
    s = SessionSummary.coerce(summary)
    h = s.headline
    e = html.escape
    icon = "\u2705" if h.n_ok == h.n_science and h.n_science else "\u26a0\ufe0f"
    out = [
        f"\U0001f52d <b>{e(title or s.observatory)}</b> — night {e(str(s.session_id))}",
        f"{icon} {h.n_ok}/{h.n_science} spectra reduced",
        *(("\u274c " if not x.ok else "") + e(spectrum_line(x)) for x in s.spectra[:10]),
    ]
    if report_url:
        out.append(f'<a href="{e(report_url)}">Full report</a>')
    first = s.ok_spectra[0] if s.ok_spectra else None
    caption = f"{e(title or s.observatory)} · {e(str(s.session_id))}" + (
        f" · {e(first.target)} S/N={first.snr_median:.0f} R={first.resolving_power:.0f}"
        if first
        else ""
    )
    return "\n".join(out), caption
