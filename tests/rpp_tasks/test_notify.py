"""Notifications on loopback only: a real SMTP server (aiosmtpd) and a fake Telegram Bot API server.

Checks what arrives (subject, recipients, inline image, attachment; chat id, text, photo), the
retries with backoff, that a failed notification is recorded and leaves the products intact, that no
token or password leaks into logs or records, and the DAG's connection conventions and task states.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import importlib.util
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_report import FAKE_OBS, make_fake_session  # same folder (pytest rootdir import mode)

from rpp_tasks.outputs import notify
from rpp_tasks.outputs.notify import RetryPolicy, SmtpSettings, TelegramSettings

REPO = Path(__file__).resolve().parents[2]
TOKEN = "123456789:AAHsecretTOKENvalue_abcdefghijklmnop"
PASSWORD = "s3cret-Passw0rd!"
FAST = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- loopback SMTP server
class _Inbox:
    def __init__(self, rcpt_reply: str | None = None):
        self.messages = []
        self.rcpt_reply = rcpt_reply

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(
            {
                "from": envelope.mail_from,
                "to": list(envelope.rcpt_tos),
                "msg": email.message_from_bytes(envelope.content, policy=email.policy.default),
            }
        )
        return "250 Message accepted"


@pytest.fixture
def smtp_server():
    from aiosmtpd.controller import Controller

    servers = []

    def start(rcpt_reply=None):
        inbox = _Inbox(rcpt_reply)
        ctl = Controller(inbox, hostname="127.0.0.1", port=_free_port())
        ctl.start()
        servers.append(ctl)
        return inbox, SmtpSettings(
            host="127.0.0.1", port=ctl.port, from_addr="rpp@example.org", timeout_s=5
        )

    yield start
    for ctl in servers:
        ctl.stop()


# ---------------------------------------------------------------------------- fake Telegram Bot API
class _BotApi:
    def __init__(self):
        self.calls = []  # (method, token, fields: {name: str|bytes})
        self.fail_next = 0  # answer HTTP 500 this many times
        self.status = None  # fixed error status (e.g. 400) for every call


def _parse_form(content_type: str, body: bytes) -> dict:
    if content_type.startswith("multipart/"):
        msg = email.message_from_bytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body,
            policy=email.policy.default,
        )
        out = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            data = part.get_payload(decode=True)
            out[name] = data if part.get_filename() else data.decode()
        return out
    from urllib.parse import parse_qsl

    return dict(parse_qsl(body.decode()))


@pytest.fixture
def bot_api():
    api = _BotApi()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            _, bot, method = self.path.split("/", 2)
            api.calls.append(
                (method, bot[3:], _parse_form(self.headers.get("Content-Type", ""), body))
            )
            if api.fail_next > 0 or api.status:
                code = api.status or 500
                api.fail_next -= 1
                payload = {
                    "ok": False,
                    "error_code": code,
                    "description": "Internal Server Error"
                    if code == 500
                    else "Bad Request: chat not found",
                }
            else:
                code, payload = 200, {"ok": True, "result": {"message_id": len(api.calls)}}
            raw = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    api.settings = TelegramSettings(
        token=TOKEN,
        chat_id="-100424242",
        api_base=f"http://127.0.0.1:{server.server_port}",
        timeout_s=5,
    )
    yield api
    server.shutdown()
    server.server_close()


def _obs(**notifications):
    cfg = {
        "email_to": ["observer@example.org", "team@example.org"],
        "operators_email_to": ["ops@example.org"],
        "smtp_conn_id": "rpp_smtp",
        "telegram_conn_id": "rpp_telegram",
        "operators_telegram_conn_id": None,
    }
    cfg.update(notifications)
    return SimpleNamespace(**vars(FAKE_OBS), notifications=SimpleNamespace(**cfg))


def _products_digest(workdir: Path) -> dict:
    """Every file of the session folder (frames, summaries, report, ZIP) -> its SHA-256."""
    return {
        str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(workdir.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------- e-mail
def test_send_email_arrives_with_inline_image_and_attachment(smtp_server):
    inbox, settings = smtp_server()
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 64
    notice = notify.send_email(
        settings,
        to=["a@example.org", "b@example.org"],
        subject="Night 2025-01-15",
        html_body="<p>hello <img src='cid:plot'></p>",
        inline_images={"plot": png},
        attachments=[("report.html", b"<html>report</html>", "text/html")],
        policy=FAST,
    )
    assert notice.status == "ok" and notice.attempts == 1 and notice.error is None
    (got,) = inbox.messages
    msg = got["msg"]
    assert got["to"] == ["a@example.org", "b@example.org"] and got["from"] == "rpp@example.org"
    assert msg["Subject"] == "Night 2025-01-15"
    related = [p for p in msg.walk() if p.get_content_type() == "multipart/related"]
    assert related, "HTML part with inline image expected"
    (img,) = [p for p in msg.walk() if p.get_content_type() == "image/png"]
    assert img["Content-ID"] == "<plot>" and img.get_payload(decode=True) == png
    (att,) = [p for p in msg.walk() if p.get_filename() == "report.html"]
    assert (
        att.get_content_disposition() == "attachment"
        and att.get_payload(decode=True) == b"<html>report</html>"
    )


def test_smtp_refused_is_retried_with_backoff_then_failed(caplog):
    waits = []
    settings = SmtpSettings(
        host="127.0.0.1", port=_free_port(), login="rpp", password=PASSWORD, timeout_s=2
    )
    notice = notify.send_email(
        settings,
        to=["a@example.org"],
        subject="s",
        html_body="<p>x</p>",
        policy=RetryPolicy(attempts=3, backoff_s=2.0, factor=2.0),
        sleep=waits.append,
    )
    assert notice.status == "failed" and notice.attempts == 3 and "Connection" in notice.error
    assert waits == [2.0, 4.0]  # exponential backoff, bounded
    assert PASSWORD not in caplog.text and PASSWORD not in json.dumps(notice.to_dict())


def test_smtp_permanent_rejection_is_not_retried(smtp_server):
    inbox, settings = smtp_server(rcpt_reply="550 5.1.1 mailbox unavailable")
    waits = []
    notice = notify.send_email(
        settings,
        to=["nobody@example.org"],
        subject="s",
        html_body="x",
        policy=FAST,
        sleep=waits.append,
    )
    assert (
        notice.status == "failed" and notice.attempts == 1 and waits == [] and "550" in notice.error
    )
    assert inbox.messages == []


def test_send_email_without_recipient_raises():
    with pytest.raises(ValueError, match="no recipient"):
        notify.send_email(SmtpSettings(host="127.0.0.1"), to=[" "], subject="s", html_body="x")


def test_settings_repr_hides_secrets():
    assert PASSWORD not in repr(SmtpSettings(host="h", password=PASSWORD))
    assert TOKEN not in repr(TelegramSettings(token=TOKEN, chat_id="1"))
    with pytest.raises(ValueError, match="chat_id"):
        TelegramSettings(token=TOKEN, chat_id="")


# ----------------------------------------------------------------------------- Telegram
def test_telegram_message_and_photo_reach_the_bot_api(bot_api):
    m = notify.send_telegram_message(bot_api.settings, "<b>Night</b> 4/4 frames", policy=FAST)
    p = notify.send_telegram_photo(
        bot_api.settings, b"\x89PNG\r\n\x1a\nIMG", caption="preview", policy=FAST
    )
    assert m.status == p.status == "ok" and m.recipients == ("-100424242",)
    (m_method, m_token, m_fields), (p_method, p_token, p_fields) = bot_api.calls
    assert (m_method, p_method) == ("sendMessage", "sendPhoto") and m_token == p_token == TOKEN
    assert m_fields["chat_id"] == p_fields["chat_id"] == "-100424242"
    assert m_fields["text"] == "<b>Night</b> 4/4 frames" and m_fields["parse_mode"] == "HTML"
    assert p_fields["photo"] == b"\x89PNG\r\n\x1a\nIMG" and p_fields["caption"] == "preview"


def test_telegram_http_500_is_retried(bot_api):
    bot_api.fail_next = 1
    waits = []
    ok = notify.send_telegram_message(bot_api.settings, "hi", policy=FAST, sleep=waits.append)
    assert ok.status == "ok" and ok.attempts == 2 and len(waits) == 1
    bot_api.fail_next = 10
    bad = notify.send_telegram_message(bot_api.settings, "hi", policy=FAST, sleep=waits.append)
    assert bad.status == "failed" and bad.attempts == 3 and "HTTP 500" in bad.error


def test_telegram_client_error_is_not_retried(bot_api):
    bot_api.status = 400
    bad = notify.send_telegram_message(bot_api.settings, "hi", policy=FAST, sleep=lambda s: None)
    assert bad.status == "failed" and bad.attempts == 1 and "chat not found" in bad.error


def test_token_never_in_logs_or_errors(caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    settings = TelegramSettings(
        token=TOKEN, chat_id="1", api_base=f"http://127.0.0.1:{_free_port()}", timeout_s=2
    )
    bad = notify.send_telegram_message(settings, "hi", policy=FAST, sleep=lambda s: None)
    assert bad.status == "failed" and "/bot***/" in bad.error  # the URL is there, the token is not
    assert TOKEN not in caplog.text and TOKEN.split(":")[1] not in caplog.text
    assert TOKEN not in json.dumps(bad.to_dict())


def test_scrub_masks_known_and_token_shaped_secrets():
    text = f"https://api.telegram.org/bot{TOKEN}/sendMessage failed; password={PASSWORD}"
    clean = notify.scrub(text, [PASSWORD])
    assert TOKEN not in clean and PASSWORD not in clean and "/bot***/sendMessage" in clean
    assert notify.scrub("token 987654:ABCDEFGHIJKLMNOPQRSTUVWXYZ012") == "token ***"


# ---------------------------------------------------------------------- run_notify / notify_failure
def test_run_notify_sends_report_email_and_telegram(tmp_path, smtp_server, bot_api):
    s = make_fake_session(tmp_path)
    inbox, smtp = smtp_server()
    res = notify.run_notify(
        s, _obs(), smtp=smtp, telegram=bot_api.settings, policy=FAST, run_key="run1"
    )
    assert res["status"] == "ok" and res["n_ok"] == 3 and res["n_failed"] == 0
    assert (s.workdir / "report" / "report.html").is_file()  # built because missing
    (got,) = inbox.messages
    msg = got["msg"]
    assert got["to"] == ["observer@example.org", "team@example.org"]
    assert msg["Subject"].startswith("[RPP demo] night 2025-01-15: 2/3 frames reduced")
    assert [
        p
        for p in msg.walk()
        if p.get_content_type() == "image/png" and p["Content-ID"] == "<night_plot>"
    ]
    (att,) = [p for p in msg.walk() if p.get_filename() == "report_demo_2025-01-15.html"]
    assert b"data:image/png;base64," in att.get_payload(decode=True)
    html_part = next(p for p in msg.walk() if p.get_content_type() == "text/html")
    assert (
        "truncated FITS file" in html_part.get_content()
        and "cid:night_plot" in html_part.get_content()
    )
    methods = [c[0] for c in bot_api.calls]
    assert methods == ["sendMessage", "sendPhoto"]
    assert (
        bot_api.calls[1][2]["photo"] == (s.workdir / "report" / "preview.png").read_bytes()
    )  # the frame preview
    assert (
        "demo_V_001" not in bot_api.calls[1][2]["caption"]
        and "2/3 frames" in bot_api.calls[1][2]["caption"]
    )
    inline = next(p for p in msg.walk() if p["Content-ID"] == "<night_plot>")
    assert inline.get_payload(decode=True) == (s.workdir / "report" / "trends.png").read_bytes()
    assert all(c[2]["chat_id"] == "-100424242" for c in bot_api.calls)
    assert "2/3 frames reduced" in bot_api.calls[0][2]["text"]
    records = json.loads((s.workdir / "notify.json").read_text())
    assert [(r["channel"], r["status"]) for r in records] == [
        ("email", "ok"),
        ("telegram", "ok"),
        ("telegram", "ok"),
    ]
    assert records[0]["recipients"] == ["observer@example.org", "team@example.org"]


def test_failed_notifications_are_recorded_and_products_stay_intact(tmp_path, bot_api, caplog):
    s = make_fake_session(tmp_path)
    from rpp_tasks.outputs import report

    report.run_report(s, FAKE_OBS)
    before = _products_digest(s.workdir)
    assert {
        "report/report.html",
        "report/preview.png",
        "2025-01-15_products.zip",
        "frames/demo_V_001/calibrated.fits",
    } <= set(before)
    bot_api.fail_next = 100
    smtp = SmtpSettings(
        host="127.0.0.1", port=_free_port(), login="rpp", password=PASSWORD, timeout_s=2
    )
    waits = []
    res = notify.run_notify(
        s, _obs(), smtp=smtp, telegram=bot_api.settings, policy=FAST, sleep=waits.append
    )
    assert res["status"] == "failed" and res["n_failed"] == 3 and len(res["failed"]) == 3
    assert len(waits) == 6  # 2 waits x 3 sends
    records = json.loads((s.workdir / "notify.json").read_text())
    assert {(r["channel"], r["status"], r["attempts"]) for r in records} == {
        ("email", "failed", 3),
        ("telegram", "failed", 3),
    }
    after = _products_digest(s.workdir)
    assert set(after) == set(before) | {"notify.json"}  # only the delivery record is new
    assert {
        k: v for k, v in after.items() if k != "notify.json"
    } == before  # report, ZIP, frames byte-identical
    text = caplog.text + (s.workdir / "notify.json").read_text()
    assert TOKEN not in text and PASSWORD not in text


def test_retried_run_does_not_resend_what_was_delivered(tmp_path, smtp_server, bot_api):
    s = make_fake_session(tmp_path)
    inbox, smtp = smtp_server()
    bot_api.fail_next = 100
    first = notify.run_notify(
        s,
        _obs(),
        smtp=smtp,
        telegram=bot_api.settings,
        policy=FAST,
        run_key="r1",
        sleep=lambda x: None,
    )
    assert first["status"] == "failed" and len(inbox.messages) == 1
    bot_api.fail_next = 0
    second = notify.run_notify(
        s, _obs(), smtp=smtp, telegram=bot_api.settings, policy=FAST, run_key="r1"
    )
    assert second["status"] == "ok" and len(inbox.messages) == 1  # e-mail not sent twice
    assert [n["status"] for n in second["notices"]] == ["skipped", "ok", "ok"]


def test_nothing_configured_is_skipped_and_config_errors_fail(tmp_path):
    s = make_fake_session(tmp_path)
    res = notify.run_notify(s, _obs(email_to=[], telegram_conn_id=None))
    assert res["status"] == "skipped" and res["n_failed"] == 0
    res = notify.run_notify(
        s, _obs(), config_errors={"email": "Airflow connection 'rpp_smtp': not found"}
    )
    assert res["status"] == "failed" and "not found" in res["failed"][0]


def test_notify_failure_alerts_operators(tmp_path, smtp_server, bot_api, monkeypatch):
    inbox, smtp = smtp_server()
    obs = _obs()
    monkeypatch.setattr(obs, "resolve_path", lambda which: tmp_path / "work", raising=False)
    info = {
        "dag_id": "rpp_demo",
        "task_id": "detect",
        "run_id": "session__2025-01-15",
        "try_number": 3,
        "max_tries": 2,
        "observatory": "demo",
        "session_id": "2025-01-15",
        "session_dir": "/in/2025-01-15",
        "error": f"RuntimeError: boom at https://api.telegram.org/bot{TOKEN}/x",
        "log_url": "http://airflow.local/dags/rpp_demo/runs/x/tasks/detect",
        "at": "2025-01-16T03:00:00+00:00",
    }
    res = notify.notify_failure(info, obs, smtp=smtp, telegram=bot_api.settings, policy=FAST)
    assert res["status"] == "ok"
    (got,) = inbox.messages
    assert got["to"] == ["ops@example.org"]
    assert got["msg"]["Subject"] == "[RPP FAILURE] rpp_demo / 2025-01-15: task detect failed"
    body = got["msg"].get_body(("html",)).get_content()
    for text in (
        "rpp_demo",
        "2025-01-15",
        "detect",
        "RuntimeError: boom",
        "http://airflow.local/dags/rpp_demo",
    ):
        assert text in body
    assert TOKEN not in body
    (call,) = bot_api.calls
    assert (
        call[0] == "sendMessage"
        and "detect failed" in call[2]["text"]
        and TOKEN not in call[2]["text"]
    )
    assert Path(res["notify_json"]) == tmp_path / "work" / "notify.json"


def test_notify_failure_never_raises(tmp_path):
    obs = _obs()
    res = notify.notify_failure(
        {"dag_id": "d"},
        obs,
        smtp=SmtpSettings(host="127.0.0.1", port=_free_port()),
        policy=RetryPolicy(attempts=1),
    )
    assert res["status"] == "failed"


# ----------------------------------------------------------------------------- DAG wiring
@pytest.fixture(scope="module")
def dag_module():
    spec = importlib.util.spec_from_file_location(
        "rpp_reduction_notify_test", REPO / "dags" / "rpp_reduction.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_connection_conventions():
    from rpp_tasks.session import connections

    smtp_conn = SimpleNamespace(
        host="smtp.example.org",
        port=587,
        login="rpp",
        password=PASSWORD,
        extra_dejson={"from_email": "night@example.org", "disable_ssl": True},
    )
    st = connections.smtp_settings_from_connection(smtp_conn)
    assert (st.host, st.port, st.from_addr, st.ssl, st.starttls, st.password) == (
        "smtp.example.org",
        587,
        "night@example.org",
        False,
        True,
        PASSWORD,
    )
    tg = connections.telegram_settings_from_connection(
        SimpleNamespace(host=None, password=TOKEN, extra_dejson={"chat_id": -1001})
    )
    assert tg.token == TOKEN and tg.chat_id == "-1001" and tg.api_base == "https://api.telegram.org"
    tg2 = connections.telegram_settings_from_connection(
        SimpleNamespace(host="4242", password=TOKEN, extra_dejson={})
    )
    assert tg2.chat_id == "4242"


def test_notify_settings_resolves_only_configured_channels():
    from rpp_tasks.session import connections

    conns = {
        "rpp_smtp": SimpleNamespace(
            host="h",
            port=25,
            login=None,
            password=None,
            extra_dejson={"disable_ssl": True, "disable_tls": True},
        )
    }

    def get(conn_id):
        return conns[conn_id]

    settings, errors = connections.notify_settings(_obs(), get_connection=get)
    assert set(settings) == {"smtp"} and "rpp_telegram" in errors["telegram"]
    settings, errors = connections.notify_settings(
        _obs(email_to=[], telegram_conn_id=None), get_connection=get
    )
    assert settings == {} and errors == {}


def _notify_callable(dag_module, obs):
    return dag_module.build_reduction_dag(obs).get_task("notify").python_callable


def test_notify_task_states(dag_module, tmp_path, monkeypatch):
    from airflow.sdk.exceptions import AirflowSkipException

    from rpp_tasks.config import find_config

    obs = find_config("demo")
    s = make_fake_session(tmp_path)
    call = _notify_callable(dag_module, obs)
    prev = {"workdir": str(s.workdir)}
    # demo config: nothing configured -> skipped (visible, the run stays green)
    with pytest.raises(AirflowSkipException, match="nothing sent"):
        call(prev, run_id="r1")
    # a failed send -> the task fails (products untouched), with the recorded reason
    monkeypatch.setattr(
        notify,
        "run_notify",
        lambda *a, **k: {
            "status": "failed",
            "failed": ["email session to a@b: ConnectionRefusedError"],
            "notices": [],
        },
    )
    with pytest.raises(notify.NotificationError, match="products and the archive are not affected"):
        call(prev, run_id="r1")
    monkeypatch.setattr(
        notify, "run_notify", lambda *a, **k: {"status": "ok", "n_ok": 2, "notices": []}
    )
    assert call(prev, run_id="r1")["status"] == "ok"


def test_same_failure_is_alerted_once(tmp_path, smtp_server, monkeypatch):
    inbox, smtp = smtp_server()
    obs = _obs()
    monkeypatch.setattr(obs, "resolve_path", lambda which: tmp_path / "work", raising=False)
    info = {
        "dag_id": "rpp_demo",
        "task_id": "notify",
        "run_id": "r1",
        "try_number": 3,
        "error": "x",
    }
    assert notify.notify_failure(info, obs, smtp=smtp, policy=FAST)["status"] == "ok"
    again = notify.notify_failure(
        {**info, "error": "task_failure"}, obs, smtp=smtp, policy=FAST
    )  # run callback
    assert again["status"] == "skipped" and len(inbox.messages) == 1
    notify.notify_failure({**info, "task_id": "detect"}, obs, smtp=smtp, policy=FAST)
    assert len(inbox.messages) == 2


def test_calibrated_limit_and_candidates_reach_the_messages(tmp_path, smtp_server, bot_api):
    s = make_fake_session(tmp_path, zeropoint=True, candidates=True)
    inbox, smtp = smtp_server()
    res = notify.run_notify(s, _obs(), smtp=smtp, telegram=bot_api.settings, policy=FAST)
    assert res["status"] == "ok"
    text = bot_api.calls[0][2]["text"]
    assert "(calibrated)" in text and "Transient candidates: 2" in text
    html_part = next(
        p for p in inbox.messages[0]["msg"].walk() if p.get_content_type() == "text/html"
    )
    assert "calibrated" in html_part.get_content()


def test_email_and_report_agree_on_the_median_sky(tmp_path, smtp_server):
    # two frames at 500 and 505 ADU: the median is 502.5 (the report's number), not the upper value
    # 505
    s = make_fake_session(tmp_path)
    inbox, smtp = smtp_server()
    notify.run_notify(s, _obs(telegram_conn_id=None), smtp=smtp, policy=FAST)
    html_part = next(
        p for p in inbox.messages[0]["msg"].walk() if p.get_content_type() == "text/html"
    )
    assert "502 ADU" in html_part.get_content() and "505 ADU" not in html_part.get_content()
    page = (s.workdir / "report" / "report.html").read_text()
    assert '<div class="l">median sky (ADU)</div><div class="v">502</div>' in page


def _airflow3_ti(task_id="detect", run_id="manual__2025-01-16T03:00:00+00:00", try_number=2):
    """A task instance as Airflow 3's task runner (and the DAG-processor's run callback) hands it
    over."""
    import uuid

    from airflow.sdk import BaseOperator
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    return RuntimeTaskInstance.model_construct(
        id=uuid.uuid4(),
        task_id=task_id,
        dag_id="rpp_demo",
        run_id=run_id,
        try_number=try_number,
        map_index=-1,
        max_tries=2,
        task=BaseOperator(task_id=task_id),
    )


def test_failure_alert_links_the_airflow3_task_log(tmp_path, smtp_server, bot_api, monkeypatch):
    from rpp_tasks.session import connections

    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.org/rpp/")
    ctx = {
        "ti": _airflow3_ti(),
        "exception": RuntimeError("boom"),
        "dag_run": SimpleNamespace(conf={"observatory": "demo", "session_id": "2025-01-15"}),
        "params": {},
    }
    info = connections.failure_info(ctx)
    url = (
        "https://airflow.example.org/rpp/dags/rpp_demo/runs/manual__2025-01-16T03%3A00%3A00%2B00%3A00"
        "/tasks/detect?try_number=2"
    )
    assert info["log_url"] == url  # Airflow 3 ti.log_url: absolute, [api] base_url
    inbox, smtp = smtp_server()
    obs = _obs(operators_telegram_conn_id="rpp_ops")
    monkeypatch.setattr(obs, "resolve_path", lambda which: tmp_path / "work", raising=False)
    assert (
        notify.notify_failure(info, obs, smtp=smtp, telegram=bot_api.settings, policy=FAST)[
            "status"
        ]
        == "ok"
    )
    msg = inbox.messages[0]["msg"]
    assert f"href='{url}'" in msg.get_body(("html",)).get_content()
    assert f"log: {url}" in msg.get_body(("plain",)).get_content().splitlines()
    assert f'<a href="{url}">task log</a>' in bot_api.calls[0][2]["text"]


def test_failure_alert_flags_a_relative_log_link():
    subject, body, text, tg = notify.compose_failure_alert(
        {
            "dag_id": "rpp_demo",
            "task_id": "detect",
            "log_url": "/dags/rpp_demo/runs/r1/tasks/detect",
        }
    )
    assert "href=" not in body and "href=" not in tg  # no dead link in the mail or the chat
    assert "not an absolute URL: set Airflow's [api] base_url" in text and "[api] base_url" in tg
    assert "/dags/rpp_demo/runs/r1/tasks/detect" in body


def test_failure_alert_with_newlines_and_control_characters_is_sanitised_not_dropped(
    tmp_path, smtp_server, bot_api, monkeypatch
):
    """A session id with a newline (an e-mail header may not hold one: the whole alert was
    dropped, e-mail and Telegram), control characters, a non-UTF-8 file name (surrogates) and a
    header value with a carriage return: both channels deliver, the odd characters shown escaped."""
    inbox, smtp = smtp_server()
    obs = _obs(operators_telegram_conn_id="rpp_ops")
    monkeypatch.setattr(obs, "resolve_path", lambda which: tmp_path / "work", raising=False)
    (tmp_path / "work").mkdir()
    info = {
        "dag_id": "rpp_demo",
        "task_id": "detect\r\nBcc: victim@example.org",
        "run_id": "manual__x",
        "try_number": 1,
        "observatory": "demo",
        "session_id": "night\n2025-01-15\x00\x1b[31m",
        "session_dir": "/in/caf\udce9",  # os.fsdecode of a Latin-1 name
        "error": "FrameRejected: OBJECT='M\x0851'\nsecond line",
        "log_url": "http://airflow.local/log",
    }
    res = notify.notify_failure(info, obs, smtp=smtp, telegram=bot_api.settings, policy=FAST)
    assert res["status"] == "ok", res
    (got,) = inbox.messages
    subject = got["msg"]["Subject"]
    assert "\n" not in subject and "\r" not in subject and "\x00" not in subject
    assert subject.startswith("[RPP FAILURE] rpp_demo / night\\n2025-01-15\\x00\\x1b[31m")
    assert got["to"] == ["ops@example.org"]  # no header injection
    assert got["msg"]["Bcc"] is None
    text = got["msg"].get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert "task: detect\\r\\nBcc: victim@example.org" in text
    assert "session folder: /in/caf\\udce9" in text
    assert "error: FrameRejected: OBJECT='M\\x0851'\nsecond line" in text  # newlines kept here
    (call,) = bot_api.calls
    tg = call[2]["text"]
    assert "night\\n2025-01-15\\x00" in tg and "\x00" not in tg and "\x1b" not in tg
    # the odd session id is no path: the notices go to the work folder's notify.json
    assert Path(res["notify_json"]) == tmp_path / "work" / "notify.json"


def test_failure_alert_session_id_never_leaves_the_work_folder(tmp_path, smtp_server, monkeypatch):
    """notify.json is written in <work>/<session_id>/ only when the id is a plain folder name:
    '../<elsewhere>' with a session.json there wrote the notices into another folder."""
    inbox, smtp = smtp_server()
    obs = _obs()
    work = tmp_path / "work"
    elsewhere = tmp_path / "elsewhere"
    for d in (work, elsewhere):
        d.mkdir()
    (elsewhere / "session.json").write_text("{}")
    monkeypatch.setattr(obs, "resolve_path", lambda which: work, raising=False)
    info = {"dag_id": "rpp_demo", "task_id": "t", "session_id": "../elsewhere"}
    res = notify.notify_failure(info, obs, smtp=smtp, policy=FAST)
    assert res["status"] == "ok" and Path(res["notify_json"]) == work / "notify.json"
    assert not (elsewhere / "notify.json").exists()


def test_email_tells_the_camera_gain_to_fix_once():
    """Frames whose gain was replaced by the sky-noise bound (summary.json ``gain``): the e-mail
    carries one line with the value to configure; a session with a consistent gain has none."""
    from rpp_tasks.session.summary import SessionSummary

    bound = {"used_e_per_adu": 0.1364, "source": "sky noise bound", "configured_e_per_adu": 1.0}
    frames = [
        {"frame": "a", "status": "ok", "gain": bound},
        {"frame": "b", "status": "ok", "gain": {**bound, "used_e_per_adu": 0.1559}},
    ]
    s = SessionSummary.from_dict({"session_id": "n1", "observatory": "o", "frames": frames})
    _, html_body, text = notify.compose_session_email(s)
    line = (
        "Camera gain: 2 frame(s): gain 1 e-/ADU configured, impossible for the sky noise: "
        "0.136 e-/ADU used (sky noise bound); set camera.gain_e_per_adu to about that value "
        "(first frame)"
    )
    assert text.count(line) == 1 and html_body.count("<b>Camera gain</b>") == 1
    kept = [{**f, "gain": {**bound, "source": "configured", "used_e_per_adu": 1.0}} for f in frames]
    s = SessionSummary.from_dict({"session_id": "n1", "observatory": "o", "frames": kept})
    _, html_body, text = notify.compose_session_email(s)
    assert "Camera gain" not in text and "Camera gain" not in html_body


def test_a_header_gain_that_is_impossible_is_told_to_the_camera_software():
    """The gain came from the frame's EGAIN card, which takes precedence over the configuration:
    the e-mail says to fix the camera software's gain, not ``camera.gain_e_per_adu``."""
    from astropy.io import fits

    from rpp_tasks.inputs.header import normalize_header
    from rpp_tasks.session.summary import SessionSummary

    h = fits.Header({"IMAGETYP": "Light Frame", "EXPTIME": 10.0, "DATE-OBS": "2025-03-26T21:20:46"})
    h["EGAIN"] = 1.0
    h["NAXIS"], h["NAXIS1"], h["NAXIS2"] = 2, 64, 64
    assert normalize_header(h, path="x.fits").gain_origin == "header EGAIN"
    gain = {
        "used_e_per_adu": 0.1364,
        "source": "sky noise bound",
        "configured_e_per_adu": 1.0,
        "configured_from": "header EGAIN",
    }
    s = SessionSummary.from_dict(
        {
            "session_id": "n1",
            "observatory": "o",
            "frames": [{"frame": "a", "status": "ok", "gain": gain}],
        }
    )
    _, _, text = notify.compose_session_email(s)
    assert (
        "gain 1 e-/ADU in the EGAIN header card, impossible for the sky noise: 0.136 e-/ADU used "
        "(sky noise bound); fix the camera software's gain"
    ) in text
    assert "camera.gain_e_per_adu" not in text
