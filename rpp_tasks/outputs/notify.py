"""Notifications: the morning e-mail and Telegram message to observers, failure alerts to operators.

No Airflow import: the DAG resolves the Airflow connections and hands this module plain settings
(`SmtpSettings`, `TelegramSettings`; see ``docs/notifications.md`` for the connection conventions).

* `send_email` sends one multipart message (text + HTML with inline images + attachments) through
  SMTP (plain, STARTTLS or SSL, optional login).
* `send_telegram_message` / `send_telegram_photo` call the Bot API methods ``sendMessage`` and
  ``sendPhoto`` (``{api_base}/bot{token}/<method>``) with ``requests``.
* Every send has bounded retries with exponential backoff (`RetryPolicy`); permanent errors
  (authentication, unknown chat, refused recipient) are not retried.
* A send never raises on a delivery problem: it returns a `Notice` with ``status`` ``"ok"`` or
  ``"failed"``, the number of attempts and the error text. Bad input (no recipient, empty text)
  raises ``ValueError``.
* Error texts are scrubbed of the bot token and the SMTP password (`scrub`) before they are logged
  or recorded; urllib3's debug log lines are scrubbed of ``/bot<token>/`` too.
* Outcomes are appended to ``<workdir>/notify.json`` (a list of `Notice.to_dict` records).

Adapters: `run_notify(session, obs, ...)` (builds the report if missing, then e-mail + Telegram),
`notify_failure(info, obs, ...)` (operators' alert: DAG, session, task, error, log link).
"""

from __future__ import annotations

import datetime as _dt
import html
import logging
import re
import smtplib
import ssl as _ssl
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rpp_tasks.exceptions import RppError
from rpp_tasks.session.workdir import Session, read_json, write_json_atomic

__all__ = [
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

TELEGRAM_API = "https://api.telegram.org"
TELEGRAM_TEXT_MAX = 4096
TELEGRAM_CAPTION_MAX = 1024
_BOT_PATH = re.compile(r"/bot[^/\s'\"]+/")
_BOT_TOKEN = re.compile(r"\b\d{5,}:[A-Za-z0-9_-]{20,}\b")


class NotificationError(RppError):
    """Raised by the DAG's notify task when a notification could not be delivered (already recorded)."""


# =============================================================================== settings
@dataclass(frozen=True)
class SmtpSettings:
    """Where and how to send e-mail (filled by the DAG from an Airflow SMTP connection).

    ``password`` is left out of ``repr``. ``port=0`` means the default for the mode
    (465 with ``ssl``, 587 with ``starttls``, else 25).
    """

    host: str
    port: int = 0
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    from_addr: str = "rpp@localhost"
    starttls: bool = False
    ssl: bool = False
    timeout_s: float = 30.0

    @property
    def effective_port(self) -> int:
        return int(self.port) if self.port else (465 if self.ssl else 587 if self.starttls else 25)

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.password,) if s)


@dataclass(frozen=True)
class TelegramSettings:
    """Bot API access (filled by the DAG from an Airflow connection). ``token`` is left out of ``repr``."""

    token: str = field(repr=False)
    chat_id: str = ""
    api_base: str = TELEGRAM_API
    timeout_s: float = 30.0

    def __post_init__(self):
        if not self.token:
            raise ValueError("TelegramSettings: empty bot token")
        if not str(self.chat_id).strip():
            raise ValueError("TelegramSettings: empty chat_id")

    def url(self, method: str) -> str:
        return f"{self.api_base.rstrip('/')}/bot{self.token}/{method}"

    def secrets(self) -> tuple[str, ...]:
        return (self.token,)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: ``attempts`` tries in all, waits ``backoff_s * factor**k`` (capped) in between."""

    attempts: int = 3
    backoff_s: float = 2.0
    factor: float = 2.0
    max_backoff_s: float = 60.0

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.backoff_s < 0 or self.factor < 1:
            raise ValueError("RetryPolicy: backoff_s must be >= 0 and factor >= 1")

    def delay_s(self, attempt: int) -> float:
        """Wait after the failed ``attempt`` (1-based)."""
        return min(self.max_backoff_s, self.backoff_s * self.factor ** (attempt - 1))


@dataclass(frozen=True)
class Notice:
    """Outcome of one notification (one e-mail, one Bot API call).

    Attributes
    ----------
    channel : str
        ``"email"`` or ``"telegram"``.
    kind : str
        What was sent: ``"session"``, ``"session_photo"``, ``"failure"``.
    recipients : tuple of str
        E-mail addresses, or the Telegram chat id.
    status : str
        ``"ok"``, ``"failed"`` or ``"skipped"`` (channel not configured, or already delivered).
    attempts : int
    error : str or None
        Scrubbed error text (or why it was skipped).
    at : str
        UTC time of the outcome (ISO).
    run_key : str or None
        Airflow run id when sent from a DAG run (a retried task does not resend what was delivered).
    """

    channel: str
    kind: str
    recipients: tuple[str, ...]
    status: str
    attempts: int
    error: str | None = None
    at: str = ""
    run_key: str | None = None

    def to_dict(self) -> dict:
        return {
            "channel": self.channel,
            "kind": self.kind,
            "recipients": list(self.recipients),
            "status": self.status,
            "attempts": self.attempts,
            "error": self.error,
            "at": self.at,
            "run_key": self.run_key,
        }


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# =============================================================================== scrubbing
def scrub(text: Any, secrets: Iterable[str | None] = ()) -> str:
    """
    Remove secrets from a text before it is logged or recorded.

    Each secret (and its URL-quoted form) becomes ``***``; Bot API paths ``/bot<token>/`` and
    anything shaped like a bot token are masked even when the token is not known.
    """
    out = "" if text is None else str(text)
    for s in sorted({s for s in secrets if s}, key=len, reverse=True):
        for form in {s, quote(s, safe=""), quote(s)}:
            out = out.replace(form, "***")
    out = _BOT_PATH.sub("/bot***/", out)
    return _BOT_TOKEN.sub("***", out)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def printable(value: Any, *, one_line: bool = True, limit: int | None = None) -> str:
    """
    Text safe for an e-mail header, an HTML or Telegram message and a log line.

    Control characters (and with ``one_line`` also CR, LF and TAB) are shown as escapes (``\\n``,
    ``\\x1b``), as are undecodable bytes of file names (lone surrogates: ``\\udce9``): an odd
    session id or header value is shown as it is, never a reason to drop a message (an e-mail
    header with a line break is refused by the mail library). ``limit`` cuts with an ellipsis.
    """
    out = "" if value is None else str(value)
    out = out.encode("utf-8", "backslashreplace").decode("utf-8")
    if one_line:
        out = out.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    else:
        out = out.replace("\r\n", "\n").replace("\r", "\\r")
    out = _CONTROL.sub(
        lambda m: (
            f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}"
        ),
        out,
    )
    return _cut(out, limit) if limit else out


class _ScrubFilter(logging.Filter):
    """Masks ``/bot<token>/`` in records of urllib3 (its debug lines carry the request path)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            return True
        clean = scrub(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


_SCRUB_FILTER = _ScrubFilter()
for _name in ("urllib3.connectionpool", "urllib3.util.retry", "requests"):
    _logger = logging.getLogger(_name)
    if _SCRUB_FILTER not in _logger.filters:
        _logger.addFilter(_SCRUB_FILTER)


# =============================================================================== retries
class _Permanent(Exception):
    """A failure that retrying cannot fix (wrong credentials, unknown chat, refused recipient)."""


class _Transient(Exception):
    """A failure worth retrying; ``retry_after_s`` from the server when it said so (HTTP 429)."""

    def __init__(self, msg, retry_after_s: float | None = None):
        super().__init__(msg)
        self.retry_after_s = retry_after_s


def _with_retries(
    fn: Callable[[], None],
    *,
    policy: RetryPolicy,
    secrets: Sequence[str],
    what: str,
    sleep: Callable[[float], None],
) -> tuple[bool, int, str | None]:
    """Run ``fn`` until it succeeds, fails permanently or runs out of attempts."""
    error = None
    for attempt in range(1, policy.attempts + 1):
        try:
            fn()
            if attempt > 1:
                log.info("%s: delivered at attempt %d", what, attempt)
            return True, attempt, None
        except _Permanent as exc:
            error = scrub(exc, secrets)
            log.error("%s: permanent failure at attempt %d, not retried: %s", what, attempt, error)
            return False, attempt, error
        except Exception as exc:  # transient by default: network, timeouts, 5xx, 4xx SMTP replies
            error = scrub(
                f"{type(exc).__name__}: {exc}" if not isinstance(exc, _Transient) else exc, secrets
            )
            if attempt == policy.attempts:
                break
            wait = policy.delay_s(attempt)
            if isinstance(exc, _Transient) and exc.retry_after_s:
                wait = min(policy.max_backoff_s, max(wait, float(exc.retry_after_s)))
            log.warning(
                "%s: attempt %d/%d failed (%s); retrying in %.1f s",
                what,
                attempt,
                policy.attempts,
                error,
                wait,
            )
            sleep(wait)
    log.error("%s: failed after %d attempts: %s", what, policy.attempts, error)
    return False, policy.attempts, error


# =============================================================================== e-mail
def _image_subtype(data: bytes) -> str:
    return (
        "png"
        if data[:8] == b"\x89PNG\r\n\x1a\n"
        else "jpeg"
        if data[:2] == b"\xff\xd8"
        else "octet-stream"
    )


def build_email(
    *,
    from_addr: str,
    to: Sequence[str],
    subject: str,
    html_body: str,
    text_body: str | None = None,
    inline_images: Mapping[str, bytes] | None = None,
    attachments: Sequence[tuple[str, bytes, str]] | None = None,
) -> EmailMessage:
    """
    Build a multipart message: text and HTML alternatives, inline images and attachments.

    Parameters
    ----------
    inline_images : mapping of str to bytes, optional
        Content id -> image bytes; reference them in the HTML as ``<img src="cid:<id>">``.
    attachments : sequence of (filename, bytes, mime type), optional
    """
    msg = EmailMessage()
    msg["Subject"] = printable(subject, limit=250)  # a line break would make the header invalid
    msg["From"] = from_addr
    msg["To"] = ", ".join(to)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid(domain="rpp.local")
    msg.set_content(text_body or re.sub(r"<[^>]+>", "", html_body))
    msg.add_alternative(html_body, subtype="html")
    if inline_images:
        html_part = msg.get_payload()[-1]
        for cid, data in inline_images.items():
            html_part.add_related(
                data,
                maintype="image",
                subtype=_image_subtype(data),
                cid=f"<{cid}>",
                filename=f"{cid}.{_image_subtype(data)}",
                disposition="inline",
            )
    for filename, data, mime in attachments or ():
        maintype, _, subtype = (mime or "application/octet-stream").partition("/")
        msg.add_attachment(
            data, maintype=maintype, subtype=subtype or "octet-stream", filename=filename
        )
    return msg


def send_email(
    settings: SmtpSettings,
    *,
    to: Sequence[str],
    subject: str,
    html_body: str,
    text_body: str | None = None,
    inline_images: Mapping[str, bytes] | None = None,
    attachments: Sequence[tuple[str, bytes, str]] | None = None,
    kind: str = "session",
    policy: RetryPolicy | None = None,
    run_key: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Notice:
    """
    Send one e-mail through SMTP with bounded retries.

    Parameters
    ----------
    settings : `SmtpSettings`
    to : sequence of str
        Recipients (at least one).
    subject, html_body : str
    text_body : str, optional
        Plain-text alternative (default: the HTML without tags).
    inline_images, attachments : optional
        See `build_email`.
    kind : str, optional
        Recorded in the `Notice`.
    policy : `RetryPolicy`, optional
    run_key : str, optional
        Recorded in the `Notice`.
    sleep : callable, optional
        Injected in tests.

    Returns
    -------
    notice : `Notice`
        ``status="failed"`` with the scrubbed error when delivery failed (never raises for that).

    Raises
    ------
    ValueError
        No recipient.
    """
    to = [t.strip() for t in to if t and t.strip()]
    if not to:
        raise ValueError("send_email: no recipient")
    policy = policy or RetryPolicy()
    msg = build_email(
        from_addr=settings.from_addr,
        to=to,
        subject=subject,
        html_body=html_body,
        text_body=text_body,
        inline_images=inline_images,
        attachments=attachments,
    )

    def once():
        cls = smtplib.SMTP_SSL if settings.ssl else smtplib.SMTP
        kwargs = {"context": _ssl.create_default_context()} if settings.ssl else {}
        try:
            with cls(
                settings.host, settings.effective_port, timeout=settings.timeout_s, **kwargs
            ) as smtp:
                if settings.starttls and not settings.ssl:
                    smtp.starttls(context=_ssl.create_default_context())
                if settings.login:
                    smtp.login(settings.login, settings.password or "")
                refused = smtp.send_message(msg, from_addr=settings.from_addr, to_addrs=to)
        except (
            smtplib.SMTPAuthenticationError,
            smtplib.SMTPRecipientsRefused,
            smtplib.SMTPSenderRefused,
            smtplib.SMTPNotSupportedError,
        ) as exc:
            raise _Permanent(f"{type(exc).__name__}: {exc}") from None
        except smtplib.SMTPResponseException as exc:
            if 500 <= exc.smtp_code < 600:
                raise _Permanent(
                    f"{type(exc).__name__}: {exc.smtp_code} {exc.smtp_error!r}"
                ) from None
            raise
        if refused:
            raise _Permanent(f"recipients refused: {refused}")

    what = f"email {kind!r} to {', '.join(to)} via {settings.host}:{settings.effective_port}"
    ok, attempts, error = _with_retries(
        once, policy=policy, secrets=settings.secrets(), what=what, sleep=sleep
    )
    if ok:
        log.info("%s: sent (%d attempt%s)", what, attempts, "" if attempts == 1 else "s")
    return Notice(
        channel="email",
        kind=kind,
        recipients=tuple(to),
        status="ok" if ok else "failed",
        attempts=attempts,
        error=error,
        at=_now(),
        run_key=run_key,
    )


# =============================================================================== Telegram
def _telegram_call(
    settings: TelegramSettings,
    method: str,
    *,
    data: dict,
    files: dict | None,
    kind: str,
    policy: RetryPolicy | None,
    run_key: str | None,
    sleep,
) -> Notice:
    import requests

    policy = policy or RetryPolicy()

    def once():
        try:
            resp = requests.post(
                settings.url(method), data=data, files=files, timeout=settings.timeout_s
            )
        except requests.RequestException as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code == 200 and body.get("ok"):
            return
        desc = body.get("description") or resp.text[:200]
        text = f"HTTP {resp.status_code} from {method}: {desc}"
        if resp.status_code == 429 or resp.status_code >= 500:
            retry_after = (body.get("parameters") or {}).get("retry_after")
            raise _Transient(text, retry_after_s=float(retry_after) if retry_after else None)
        raise _Permanent(text)

    what = f"telegram {method} ({kind}) to chat {settings.chat_id}"
    ok, attempts, error = _with_retries(
        once, policy=policy, secrets=settings.secrets(), what=what, sleep=sleep
    )
    if ok:
        log.info("%s: sent (%d attempt%s)", what, attempts, "" if attempts == 1 else "s")
    return Notice(
        channel="telegram",
        kind=kind,
        recipients=(str(settings.chat_id),),
        status="ok" if ok else "failed",
        attempts=attempts,
        error=error,
        at=_now(),
        run_key=run_key,
    )


def send_telegram_message(
    settings: TelegramSettings,
    text: str,
    *,
    parse_mode: str | None = "HTML",
    kind: str = "session",
    policy: RetryPolicy | None = None,
    run_key: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Notice:
    """
    Send a text message with the Bot API ``sendMessage`` (text cut to 4096 characters).

    Returns
    -------
    notice : `Notice`
        ``status="failed"`` after the retries (HTTP 5xx, 429, network) or at once (other 4xx).

    Raises
    ------
    ValueError
        Empty text.
    """
    if not text or not text.strip():
        raise ValueError("send_telegram_message: empty text")
    data = {
        "chat_id": str(settings.chat_id),
        "text": printable(text, one_line=False, limit=TELEGRAM_TEXT_MAX),
        "disable_web_page_preview": "true",
    }
    if parse_mode:
        data["parse_mode"] = parse_mode
    return _telegram_call(
        settings,
        "sendMessage",
        data=data,
        files=None,
        kind=kind,
        policy=policy,
        run_key=run_key,
        sleep=sleep,
    )


def send_telegram_photo(
    settings: TelegramSettings,
    photo: bytes,
    *,
    caption: str = "",
    filename: str = "plot.png",
    parse_mode: str | None = "HTML",
    kind: str = "session_photo",
    policy: RetryPolicy | None = None,
    run_key: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Notice:
    """
    Send a photo (PNG/JPEG bytes, multipart upload) with the Bot API ``sendPhoto``.

    Raises
    ------
    ValueError
        Empty photo.
    """
    if not photo:
        raise ValueError("send_telegram_photo: empty photo")
    data = {"chat_id": str(settings.chat_id)}
    if caption:
        data["caption"] = printable(caption, one_line=False, limit=TELEGRAM_CAPTION_MAX)
        if parse_mode:
            data["parse_mode"] = parse_mode
    mime = "image/png" if _image_subtype(photo) == "png" else "image/jpeg"
    return _telegram_call(
        settings,
        "sendPhoto",
        data=data,
        files={"photo": (filename, photo, mime)},
        kind=kind,
        policy=policy,
        run_key=run_key,
        sleep=sleep,
    )


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# =============================================================================== composing
def _f(value, fmt="{:.2f}", missing="—") -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return missing
    return fmt.format(v) if v == v and abs(v) != float("inf") else missing


def _session_facts(
    summary: Mapping[str, Any], per_frame: Mapping[str, Mapping] | None = None
) -> dict:
    """Headline numbers; ``per_frame`` is the report's frame record (calibrated limit, candidates)."""
    frames = list(summary.get("frames") or [])
    ok = [f for f in frames if f.get("status") == "ok"]
    per_frame = per_frame or {}
    lim = []
    for f in ok:
        cal = f.get(
            "limiting_mag_cal", (per_frame.get(str(f.get("frame"))) or {}).get("limiting_mag_cal")
        )
        if cal is not None:
            lim.append(("cal", cal))
        elif f.get("limiting_mag_inst") is not None:
            lim.append(("inst", f["limiting_mag_inst"]))
    calibrated = bool(lim) and all(k == "cal" for k, _ in lim)
    if not calibrated:
        lim = [(k, v) for k, v in lim if k == "inst"]
    bkg = [float(f["background_adu"]) for f in ok if f.get("background_adu") is not None]
    return {
        "n_science": int(summary.get("n_science", len(frames)) or 0),
        "n_ok": len(ok),
        "rejected": [f for f in frames if f.get("status") != "ok"],
        "fwhm_arcsec": summary.get("median_fwhm_arcsec"),
        "fwhm_px": summary.get("median_fwhm_px"),
        "sky_adu": statistics.median(bkg)
        if bkg
        else None,  # the report's median, not the upper one
        "limit": (max(v for _, v in lim), "calibrated" if calibrated else "instrumental")
        if lim
        else (None, ""),
        "objects": sorted({str(f["object"]) for f in frames if f.get("object")}),
        "bands": sorted({str(f["band"]) for f in frames if f.get("band")}),
        "n_sources": sum(int(f.get("n_sources") or 0) for f in ok),
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
    n_candidates: int | None = None,
    per_frame: Mapping[str, Mapping] | None = None,
) -> tuple[str, str, str]:
    """
    Subject, HTML body and text body of the morning e-mail of a session.

    Returns
    -------
    subject, html_body, text_body : str
    """
    s = _session_facts(summary, per_frame)
    name = title or summary.get("observatory", "")
    sid = summary.get("session_id", "?")
    fwhm = (
        f"FWHM {_f(s['fwhm_arcsec'])}\u2033"
        if s["fwhm_arcsec"] is not None
        else f"FWHM {_f(s['fwhm_px'])} px"
        if s["fwhm_px"] is not None
        else ""
    )
    flag = "" if s["n_ok"] == s["n_science"] and s["n_science"] else " [frames rejected]"
    subject = (
        f"[RPP {summary.get('observatory', '')}] night {sid}: {s['n_ok']}/{s['n_science']} frames reduced"
        + (f", {fwhm}" if fwhm else "")
        + flag
    )
    lim, lim_kind = s["limit"]
    cand = str(n_candidates) if n_candidates is not None else "not available yet"
    rows = [
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
            f"<li><b>{html.escape(str(f.get('frame')))}</b>: {html.escape(str(f.get('failed_stage') or ''))}"
            f" — {html.escape(str(f.get('reason') or 'no reason recorded'))}</li>"
            for f in s["rejected"][:20]
        )
        rej = f"<p style='color:#c62828'><b>Rejected frames</b></p><ul>{items}</ul>"
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
        f"<p><img src='cid:{inline_cid}' alt='night trends' style='max-width:100%;border:1px solid #e3e7ee'></p>"
        if inline_cid
        else ""
    )
    html_body = f"""<html><body style="font-family:Segoe UI,Roboto,Helvetica,Arial,sans-serif;color:#1d2430">
<h2 style="color:#283593;margin-bottom:4px">{html.escape(name)} — night {html.escape(str(sid))}</h2>
<table style="border-collapse:collapse;font-size:14px">{table}</table>
{rej}{img}
<p style="font-size:13px">{attached}{" · ".join(links)}</p>
<p style="font-size:12px;color:#5b6575">Sent by the RPP nightly pipeline (rpp_tasks {html.escape(str(summary.get("rpp_version", "")))}).</p>
</body></html>"""
    text_lines = [f"{name} — night {sid}", ""] + [f"{k}: {v}" for k, v in rows]
    if s["rejected"]:
        text_lines += ["", "Rejected frames:"] + [
            f"  {f.get('frame')}: {f.get('failed_stage')} — {f.get('reason')}"
            for f in s["rejected"][:20]
        ]
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
    n_candidates: int | None = None,
    per_frame: Mapping[str, Mapping] | None = None,
) -> tuple[str, str]:
    """Short Telegram message (HTML parse mode) and photo caption of a session."""
    s = _session_facts(summary, per_frame)
    e = html.escape
    name = title or summary.get("observatory", "")
    sid = summary.get("session_id", "?")
    icon = "\u2705" if s["n_ok"] == s["n_science"] and s["n_science"] else "\u26a0\ufe0f"
    fwhm = (
        f"{_f(s['fwhm_arcsec'])}\u2033"
        if s["fwhm_arcsec"] is not None
        else f"{_f(s['fwhm_px'])} px"
    )
    lim, lim_kind = s["limit"]
    lines = [
        f"\U0001f52d <b>{e(name)}</b> — night {e(str(sid))}",
        f"{icon} {s['n_ok']}/{s['n_science']} frames reduced · FWHM {fwhm} · sky {_f(s['sky_adu'], '{:.0f}')} ADU",
        f"Objects: {e(', '.join(s['objects']) or '—')} · bands: {e(', '.join(s['bands']) or '—')}",
        f"Deepest 5σ limit: {_f(lim)} ({lim_kind})" if lim is not None else "Limiting magnitude: —",
        f"Transient candidates: {n_candidates if n_candidates is not None else 'not available yet'}",
    ]
    for f in s["rejected"][:5]:
        lines.append(f"\u274c {e(str(f.get('frame')))}: {e(str(f.get('reason') or '?'))}")
    if len(s["rejected"]) > 5:
        lines.append(f"… and {len(s['rejected']) - 5} more rejected")
    if report_url:
        lines.append(f'<a href="{e(report_url)}">Full report</a>')
    caption = f"{e(name)} · {e(str(sid))} · {s['n_ok']}/{s['n_science']} frames · FWHM {fwhm}"
    return "\n".join(lines), caption


def _is_absolute_url(url: str) -> bool:
    return bool(re.match(r"^https?://[^/\s]+", str(url)))


def compose_failure_alert(info: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """
    Subject, HTML body, text body and Telegram text of an operators' failure alert.

    Parameters
    ----------
    info : mapping
        ``dag_id``, ``task_id``, ``run_id``, ``try_number``, ``max_tries``, ``observatory``,
        ``session_id``, ``session_dir``, ``error``, ``log_url``, ``at`` (the DAG's ``failure_info``).
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
        f"{'<pre style=margin:0;white-space:pre-wrap>' + e(v) + '</pre>' if k == 'error' else e(v)}</td></tr>"
        for k, v in rows
    )
    link = (
        f"<p><a href='{e(log_url)}'>Open the task log</a><br><span style='font-size:12px;color:#5b6575'>"
        f"{e(log_url)}</span></p>"
        if log_url
        else "<p>(no log link available)</p>"
    )
    html_body = (
        f"<html><body style='font-family:Segoe UI,Roboto,Helvetica,Arial,sans-serif'>"
        f"<h2 style='color:#c62828'>{e(subject)}</h2><table style='border-collapse:collapse;font-size:14px'>"
        f"{table}</table>{link}<p style='font-size:12px;color:#5b6575'>Products of the session's "
        f"other frames and tasks are kept; clear the failed task in Airflow to retry it.</p></body></html>"
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
    zip_path = info.get("products_zip")
    per_frame = info.get("frames") or {}
    counts = [
        v.get("n_candidates") for v in per_frame.values() if v.get("n_candidates") is not None
    ]
    n_cand = sum(counts) if counts else None
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
        subject, body, text = compose_session_email(
            summary,
            title=title,
            report_url=report_url,
            products_url=products_url,
            products_path=zip_path,
            inline_cid="night_plot" if inline else None,
            report_attached=attach,
            n_candidates=n_cand,
            per_frame=per_frame,
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
        text, caption = compose_session_telegram(
            summary, title=title, report_url=report_url, n_candidates=n_cand, per_frame=per_frame
        )
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
    exists, else to ``<paths.work>/notify.json``; their ``run_key`` is ``run_id|task_id|try_number``,
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
