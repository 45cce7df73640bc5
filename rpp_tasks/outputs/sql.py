"""One way to open a SQL database: the results DB (`rpp_tasks.outputs.db`) and the ObsCore
archive (`rpp_tasks.outputs.archive`) both get their SQLAlchemy engines here.

* `normalize_url` -- ``postgres://`` (Airflow Connection URIs, Heroku-style DSNs; SQLAlchemy 2
  refuses the scheme) becomes ``postgresql://``; a bare file path becomes an absolute
  ``sqlite:///`` URL.
* `make_engine` -- PostgreSQL through psycopg2 (the declared ``psycopg2-binary`` dependency, not
  whichever driver SQLAlchemy defaults to), pooled with pre-ping for a long-lived owner
  (`ResultsDB`) or without a pool (``one_shot=True``: an archive upsert from a task leaves no
  connection open). SQLite: the parent folder is created; every connection gets a 60 s busy
  timeout, the WAL journal, ``synchronous=NORMAL`` and foreign keys, and transactions start with
  a plain ``BEGIN`` -- or ``BEGIN IMMEDIATE`` in `write_transaction`, so that a writer that read
  first cannot fail with "database is locked" without waiting.
* `write_transaction` -- one write transaction on any backend.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

__all__ = ["SQLITE_BUSY_TIMEOUT_MS", "normalize_url", "make_engine", "write_transaction"]

log = logging.getLogger(__name__)

# SQLite waits this long for another writer before failing with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 60_000
_PG_DRIVER = "postgresql+psycopg2"
# Execution option that makes a SQLite transaction start with BEGIN IMMEDIATE.
_WRITE_OPTION = "rpp_write"


def normalize_url(url) -> URL:
    """
    The SQLAlchemy URL of a database address, without a driver chosen.

    Parameters
    ----------
    url : str or path-like or `~sqlalchemy.engine.URL`
        ``postgresql://...``, ``postgres://...``, ``sqlite:///path``, or a bare file path (SQLite).

    Returns
    -------
    `~sqlalchemy.engine.URL`
        ``render_as_string(hide_password=True)`` gives a loggable form.
    """
    if isinstance(url, URL):
        return url
    text = str(url)
    if "://" not in text:
        text = f"sqlite:///{Path(text).expanduser().resolve()}"
    if text.startswith("postgres://"):
        text = "postgresql://" + text[len("postgres://") :]
    return make_url(text)


def make_engine(url, *, one_shot: bool = False, echo: bool = False, **kwargs) -> Engine:
    """
    A SQLAlchemy engine for a database URL (see the module docstring for what each backend gets).

    Parameters
    ----------
    url : str or path-like or `~sqlalchemy.engine.URL`
        See `normalize_url`.
    one_shot : bool, optional
        No connection pool (``NullPool``): for a caller that opens, writes and disposes within
        one task. Default: the dialect's pool, with ``pool_pre_ping`` on PostgreSQL.
    echo : bool, optional
        Log every SQL statement.
    **kwargs
        Passed to `~sqlalchemy.create_engine` (e.g. ``json_serializer``).

    Returns
    -------
    `~sqlalchemy.Engine`
    """
    parsed = normalize_url(url)
    backend = parsed.get_backend_name()
    if one_shot:
        kwargs["poolclass"] = NullPool
    if backend == "postgresql":
        parsed = parsed.set(drivername=_PG_DRIVER)
        if not one_shot:
            kwargs.setdefault("pool_pre_ping", True)
        return create_engine(parsed, echo=echo, **kwargs)
    if backend == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, echo=echo, **kwargs)
        _install_sqlite_listeners(engine)
        return engine
    return create_engine(parsed, echo=echo, **kwargs)


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """One write transaction (``BEGIN IMMEDIATE`` on SQLite), committed on success."""
    with engine.connect() as conn:
        conn.execution_options(**{_WRITE_OPTION: True})
        with conn.begin():
            yield conn


def _enable_wal(cursor) -> str:
    """Switch the database file to WAL (persistent) and return the journal mode now in force.

    Switching needs an exclusive lock and SQLite does not always call the busy handler for it:
    two processes opening a fresh file at once can get "database is locked" immediately. Retry
    with back-off until the busy timeout; once the file is in WAL mode only a read is needed.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay_s = 0.005
    while True:
        try:
            mode = cursor.execute("PRAGMA journal_mode").fetchone()[0].lower()
            if mode in ("wal", "memory"):
                return mode
            return cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(delay_s)
            delay_s = min(2 * delay_s, 0.25)


def _install_sqlite_listeners(engine: Engine) -> None:
    """WAL + busy timeout + foreign keys; BEGIN IMMEDIATE for writes, plain BEGIN for reads.

    pysqlite's own transaction handling is switched off (``isolation_level = None``) so the
    ``begin`` event decides how each transaction starts (SQLAlchemy's documented recipe). A write
    transaction takes the write lock up front: a deferred one that read first could otherwise
    fail with SQLITE_BUSY without waiting when another process committed in between.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        mode = _enable_wal(cur)
        if mode not in ("wal", "memory"):
            log.warning("%s: SQLite journal_mode is %s, not WAL", engine.url.database, mode)
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
