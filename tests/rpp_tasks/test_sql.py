"""The one SQL engine helper (rpp_tasks.outputs.sql) that the results DB and the archive share."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy.pool import NullPool

from rpp_tasks.outputs import obscore_sql
from rpp_tasks.outputs.db import ResultsDB
from rpp_tasks.outputs.sql import make_engine, normalize_url, write_transaction


def test_urls_are_normalised_once_for_both_users(tmp_path):
    url = normalize_url("postgres://rpp:pw@127.0.0.1:5432/gavo")  # Airflow Connection URI
    assert url.render_as_string(hide_password=False) == "postgresql://rpp:pw@127.0.0.1:5432/gavo"
    bare = normalize_url(tmp_path / "x" / ".." / "archive.db")  # a bare path is a SQLite file
    assert bare.render_as_string() == f"sqlite:///{tmp_path / 'archive.db'}"
    # the archive's one-shot engine and the results DB's pooled one use the same driver
    one_shot = obscore_sql._engine("postgres://rpp@127.0.0.1:1/gavo")  # no connection is made
    assert one_shot.dialect.driver == "psycopg2" and isinstance(one_shot.pool, NullPool)
    with ResultsDB("postgres://rpp@127.0.0.1:1/results") as db:
        assert db.engine.dialect.driver == "psycopg2" and not isinstance(db.engine.pool, NullPool)
        assert db.url == "postgresql://rpp@127.0.0.1:1/results"


def test_sqlite_engines_get_wal_busy_timeout_and_immediate_writes(tmp_path):
    path = tmp_path / "new_folder" / "archive.db"  # the parent folder is created
    engine = make_engine(path, one_shot=True)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    with engine.begin() as conn:  # a plain (read) transaction does not take the write lock
        conn.exec_driver_sql("SELECT 1")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    with write_transaction(engine) as conn:  # BEGIN IMMEDIATE: the write lock is taken up front
        conn.exec_driver_sql("SELECT 1")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
    other.close()
    engine.dispose()
