"""Delivery channels of the notifications: SMTP e-mail and the Telegram Bot API, with retries.

No Airflow import: the DAG resolves the Airflow connections into plain settings (`SmtpSettings`,
`TelegramSettings`; `rpp_tasks.session.connections`, ``docs/notifications.md``).

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
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
import smtplib
import ssl as _ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any
from urllib.parse import quote

from rpp_tasks.exceptions import RppError

__all__ = [
    "TELEGRAM_API",
    "NotificationError",
    "SmtpSettings",
    "TelegramSettings",
    "RetryPolicy",
    "Notice",
    "scrub",
    "printable",
    "build_email",
    "send_email",
    "send_telegram_message",
    "send_telegram_photo",
]

log = logging.getLogger(__name__)

TELEGRAM_API = "https://api.telegram.org"
TELEGRAM_TEXT_MAX = 4096
TELEGRAM_CAPTION_MAX = 1024
_BOT_PATH = re.compile(r"/bot[^/\s'\"]+/")
_BOT_TOKEN = re.compile(r"\b\d{5,}:[A-Za-z0-9_-]{20,}\b")


class NotificationError(RppError):
    """Raised by the DAG's notify task when a notification could not be delivered (recorded)."""


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
    """Bot API access (filled from an Airflow connection); ``token`` is not in ``repr``."""

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
    """Bounded retries: ``attempts`` tries in all, waits ``backoff_s * factor**k`` (capped)."""

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


def _send(fn, *, channel, kind, recipients, run_key, policy, secrets, what, sleep) -> Notice:
    """`_with_retries` of ``fn``, logged, as the `Notice` of one message."""
    ok, attempts, error = _with_retries(fn, policy=policy, secrets=secrets, what=what, sleep=sleep)
    if ok:
        log.info("%s: sent (%d attempt%s)", what, attempts, "" if attempts == 1 else "s")
    return Notice(
        channel=channel,
        kind=kind,
        recipients=recipients,
        status="ok" if ok else "failed",
        attempts=attempts,
        error=error,
        at=_now(),
        run_key=run_key,
    )


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
    return _send(
        once,
        channel="email",
        kind=kind,
        recipients=tuple(to),
        run_key=run_key,
        policy=policy,
        secrets=settings.secrets(),
        what=what,
        sleep=sleep,
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
    return _send(
        once,
        channel="telegram",
        kind=kind,
        recipients=(str(settings.chat_id),),
        run_key=run_key,
        policy=policy,
        secrets=settings.secrets(),
        what=what,
        sleep=sleep,
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
