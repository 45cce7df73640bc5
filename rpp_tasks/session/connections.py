"""Airflow's side of a run as plain values: connections -> settings, a failure -> a dict.

The DAG hands these functions what Airflow gives it (a connection object with ``host``, ``port``,
``login``, ``password``, ``extra_dejson`` and ``get_uri()``; a task context); they never import
Airflow, so the same code serves ``rpp reduce`` (no connection store: ``get_connection=None``) and
the tests (a `types.SimpleNamespace` is a connection). ``mask`` registers a secret with Airflow's
log masker when the DAG passes it.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from typing import Any

__all__ = [
    "smtp_settings_from_connection",
    "telegram_settings_from_connection",
    "notify_settings",
    "archive_url",
    "colibri_key_to_env",
    "failure_info",
]

GetConnection = Callable[[str], Any]
Mask = Callable[[str], None]


def _no_mask(secret: str) -> None:
    pass


def smtp_settings_from_connection(conn, *, mask: Mask = _no_mask):
    """`~rpp_tasks.outputs.notify.SmtpSettings` from an SMTP connection (the Airflow smtp
    provider's conventions: extras ``from_email``, ``disable_ssl``, ``disable_tls``,
    ``timeout``)."""
    from rpp_tasks.outputs.notify import SmtpSettings

    extra = dict(getattr(conn, "extra_dejson", None) or {})
    if conn.password:
        mask(conn.password)
    use_ssl = not bool(extra.get("disable_ssl", False))
    return SmtpSettings(
        host=conn.host or "localhost",
        port=int(conn.port or 0),
        login=conn.login or None,
        password=conn.password or None,
        from_addr=extra.get("from_email") or conn.login or f"rpp@{conn.host or 'localhost'}",
        ssl=use_ssl,
        starttls=(not use_ssl) and not bool(extra.get("disable_tls", False)),
        timeout_s=float(extra.get("timeout", 30)),
    )


def telegram_settings_from_connection(conn, *, mask: Mask = _no_mask):
    """`~rpp_tasks.outputs.notify.TelegramSettings` from a connection: password = bot token, extra
    ``{"chat_id": ...}`` (else host = chat id), optional extra ``api_base``."""
    from rpp_tasks.outputs.notify import TELEGRAM_API, TelegramSettings

    extra = dict(getattr(conn, "extra_dejson", None) or {})
    if conn.password:
        mask(conn.password)
    return TelegramSettings(
        token=conn.password or "",
        chat_id=str(extra.get("chat_id") or conn.host or ""),
        api_base=extra.get("api_base") or TELEGRAM_API,
        timeout_s=float(extra.get("timeout", 30)),
    )


def notify_settings(
    obs,
    *,
    operators: bool = False,
    get_connection: GetConnection | None = None,
    mask: Mask = _no_mask,
) -> tuple[dict, dict]:
    """Settings of the notification channels named in ``obs.notifications``.

    Returns ``({"smtp": ..., "telegram": ...}, {channel: error})``: a channel is resolved only
    when it has recipients; a configured connection that cannot be read (or no connection store,
    ``get_connection=None``) is an error (the notice is recorded as failed), never a silent skip.
    """
    cfg = obs.notifications

    def get(conn_id):
        if get_connection is None:
            raise LookupError("no connection store outside Airflow")
        return get_connection(conn_id)

    settings, errors = {}, {}
    if (cfg.operators_email_to if operators else cfg.email_to) and cfg.smtp_conn_id:
        try:
            settings["smtp"] = smtp_settings_from_connection(get(cfg.smtp_conn_id), mask=mask)
        except Exception as exc:
            errors["email"] = (
                f"Airflow connection {cfg.smtp_conn_id!r}: {type(exc).__name__}: {exc}"
            )
    tg_id = cfg.operators_telegram_conn_id if operators else cfg.telegram_conn_id
    if tg_id:
        try:
            settings["telegram"] = telegram_settings_from_connection(get(tg_id), mask=mask)
        except Exception as exc:
            errors["telegram"] = f"Airflow connection {tg_id!r}: {type(exc).__name__}: {exc}"
    return settings, errors


def archive_url(obs, *, get_connection: GetConnection | None = None) -> str:
    """Archive database URL: the connection ``archive.conn_id`` when configured, else the embedded
    SQLite archive ``<paths.products>/archive.sqlite`` (its folder is created)."""
    if obs.archive.conn_id:
        if get_connection is None:
            msg = f"archive.conn_id {obs.archive.conn_id!r} needs Airflow's connection store"
            raise LookupError(msg)
        return get_connection(obs.archive.conn_id).get_uri()
    products = obs.resolve_path("products")
    products.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{products / 'archive.sqlite'}"


def colibri_key_to_env(
    conn_id: str | None, *, get_connection: GetConnection | None, mask: Mask = _no_mask
) -> None:
    """The Astro-Colibri user id of a connection (password, else login) into this process's
    environment (inherited by its frame workers); nothing when it is already set or the connection
    does not exist (the service is then recorded as skipped)."""
    if not conn_id or os.environ.get("RPP_ASTRO_COLIBRI_UID") or get_connection is None:
        return
    try:
        conn = get_connection(conn_id)
    except Exception:  # no such connection
        return
    uid = conn.password or conn.login
    if uid:
        mask(uid)
        os.environ["RPP_ASTRO_COLIBRI_UID"] = uid


def failure_info(context) -> dict:
    """Plain-dict description of a failed task or run from an Airflow callback context."""
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    conf = dict(getattr(dag_run, "conf", None) or {})
    params = context.get("params") or {}
    exc = context.get("exception") or context.get("reason")
    return {
        "dag_id": getattr(ti, "dag_id", None) or getattr(dag_run, "dag_id", None),
        "task_id": getattr(ti, "task_id", None),
        "run_id": getattr(ti, "run_id", None) or getattr(dag_run, "run_id", None),
        "try_number": getattr(ti, "try_number", None),
        "max_tries": getattr(ti, "max_tries", None),
        "observatory": conf.get("observatory") or params.get("observatory"),
        "session_id": conf.get("session_id") or params.get("session_id"),
        "session_dir": conf.get("session_dir") or params.get("session_dir"),
        "error": f"{type(exc).__name__}: {exc}"
        if isinstance(exc, BaseException)
        else (str(exc) if exc else None),
        "log_url": getattr(ti, "log_url", None),
        "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
