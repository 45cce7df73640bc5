"""Results database: idempotent upserts, appended stage runs, UTC timestamps, JSON, concurrency.

Every behaviour is checked on a SQLite file in ``tmp_path`` and on the real PostgreSQL server
(a throw-away ``rpp_test_<random>`` database created for the test session and dropped at the end;
set ``RPP_TEST_PG_ADMIN_URL`` to point elsewhere). PostgreSQL tests are skipped, with the reason,
only when the server is unreachable.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import multiprocessing
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
from sqlalchemy import create_engine, func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from rpp_tasks.exceptions import ConfigError
from rpp_tasks.outputs.db import (
    RESULTS_URL_ENV,
    FrameRow,
    ResultsDB,
    SessionRow,
    StageRunRow,
    default_results_url,
    file_sha256,
    results_url_from_env,
)

PG_ADMIN_URL = os.environ.get(
    "RPP_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
TABLES = ("rpp_session", "rpp_frame", "rpp_stage_run", "rpp_master")
T0 = dt.datetime(2025, 1, 1, 20, 30, tzinfo=dt.UTC)


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_database_factory():
    """Create throw-away PostgreSQL databases; all are dropped at the end of the test session."""
    admin = create_engine(
        PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    try:
        conn = admin.connect()
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(
            f"PostgreSQL unreachable at {PG_ADMIN_URL} ({exc.orig}); "
            "set RPP_TEST_PG_ADMIN_URL to a server where CREATE DATABASE is allowed"
        )
    created: list[str] = []

    def make() -> str:
        name = f"rpp_test_{uuid.uuid4().hex[:12]}"
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        created.append(name)
        return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    yield make
    for name in created:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()
    admin.dispose()


@pytest.fixture(scope="session")
def pg_url(pg_database_factory) -> str:
    """One PostgreSQL database shared by the tests (tables truncated before each)."""
    url = pg_database_factory()
    with ResultsDB(url) as db:
        db.create_schema()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """An empty results database with its schema, on each backend."""
    if request.param == "sqlite":
        rdb = ResultsDB(default_results_url(tmp_path))
        rdb.create_schema()
    else:
        rdb = ResultsDB(request.getfixturevalue("pg_url"))
        with rdb.engine.begin() as conn:
            conn.exec_driver_sql(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    yield rdb
    rdb.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request, tmp_path) -> str:
    """URL of a database without any table yet, on each backend."""
    if request.param == "sqlite":
        return default_results_url(tmp_path / "fresh")
    return request.getfixturevalue("pg_database_factory")()


def _count(db: ResultsDB, row_class) -> int:
    with db.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(row_class)).scalar_one()


# ---- URLs -----------------------------------------------------------------------------------


def test_default_results_url_is_an_absolute_sqlite_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = default_results_url("work")
    assert url == f"sqlite:///{tmp_path.resolve()}/work/rpp_results.sqlite"
    with ResultsDB(url) as db:  # the missing folder is created
        db.create_schema()
    assert (tmp_path / "work" / "rpp_results.sqlite").is_file()


def test_results_url_env_var_overrides_default(monkeypatch):
    monkeypatch.setenv(RESULTS_URL_ENV, "postgresql://rpp@db.example/results")
    assert results_url_from_env("sqlite:////tmp/x.sqlite") == "postgresql://rpp@db.example/results"
    assert results_url_from_env() == "postgresql://rpp@db.example/results"


def test_results_url_falls_back_to_default_when_env_unset_or_empty():
    assert results_url_from_env("sqlite:////w/a.sqlite", environ={}) == "sqlite:////w/a.sqlite"
    assert (
        results_url_from_env("sqlite:////w/a.sqlite", environ={RESULTS_URL_ENV: "  "})
        == "sqlite:////w/a.sqlite"
    )


def test_results_url_missing_everywhere_raises_config_error():
    with pytest.raises(ConfigError, match=RESULTS_URL_ENV):
        results_url_from_env(environ={})


def test_postgres_scheme_is_accepted_and_password_hidden():
    db = ResultsDB("postgres://rpp:secret@127.0.0.1:1/results")  # no connection is made
    assert db.dialect == "postgresql"
    assert db.url.startswith("postgresql://rpp:***@")
    assert "secret" not in repr(db)
    db.close()


def test_unsupported_backend_raises():
    with pytest.raises(ValueError, match="unsupported results database backend 'mysql'"):
        ResultsDB("mysql://u@h/db")


def test_file_sha256_matches_hashlib(tmp_path):
    payload = os.urandom(3 * 1024 + 7)
    path = tmp_path / "raw.fits"
    path.write_bytes(payload)
    assert file_sha256(path, chunk_bytes=1024) == hashlib.sha256(payload).hexdigest()


def test_db_module_imports_only_sqlalchemy_and_stdlib():
    code = (
        "import sys, rpp_tasks.outputs.db\n"
        "heavy = {'airflow', 'numpy', 'astropy', 'yaml'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not heavy, heavy"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )


# ---- schema -----------------------------------------------------------------------------------


def test_create_schema_is_idempotent(fresh_url):
    with ResultsDB(fresh_url) as db:
        db.create_schema()
        db.upsert_session("demo", "n1", "2025-01-01")
        db.create_schema()  # no error, data kept
        assert set(TABLES) <= set(inspect(db.engine).get_table_names())
        assert db.get_session("demo", "n1")["status"] == "pending"


def test_sqlite_uses_wal_and_busy_timeout(tmp_path):
    with ResultsDB(default_results_url(tmp_path)) as db, db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


# ---- sessions ---------------------------------------------------------------------------------


def test_upsert_session_twice_keeps_one_row_with_updated_values(db):
    db.upsert_session(
        "demo",
        "demo_20250101",
        dt.date(2025, 1, 1),
        folder="/w/demo/demo_20250101",
        status="running",
        started_utc=T0,
        n_frames={"bias": 5, "science": 20},
    )
    first = db.get_session("demo", "demo_20250101")
    db.upsert_session(
        "demo",
        "demo_20250101",
        "2025-01-01",
        status="done",
        finished_utc=T0 + dt.timedelta(hours=2),
        n_rejected=3,
        n_frames={"bias": 5, "flat": 7, "science": 20},
    )
    assert _count(db, SessionRow) == 1
    row = db.get_session("demo", "demo_20250101")
    assert row["status"] == "done"
    assert row["folder"] == "/w/demo/demo_20250101"  # None left it unchanged
    assert row["started_utc"] == T0
    assert row["finished_utc"] == T0 + dt.timedelta(hours=2)
    assert row["night_date"] == dt.date(2025, 1, 1)
    assert row["n_frames"] == {"bias": 5, "dark": 0, "flat": 7, "science": 20, "unknown": 0}
    assert row["n_rejected"] == 3
    assert row["created_utc"] == first["created_utc"]
    assert row["updated_utc"] >= first["updated_utc"]


def test_new_session_defaults_to_pending_without_counts(db):
    db.upsert_session("demo", "n1", "2025-01-01")
    row = db.get_session("demo", "n1")
    assert row["status"] == "pending"
    assert row["n_frames"] is None and row["summary"] is None and row["started_utc"] is None


def test_same_session_id_at_two_observatories_are_two_sessions(db):
    db.upsert_session("demo", "n1", "2025-01-01", status="done")
    db.upsert_session("huntsman", "n1", "2025-01-01", status="failed")
    assert _count(db, SessionRow) == 2
    assert db.get_session("demo", "n1")["status"] == "done"
    assert db.get_session("huntsman", "n1")["status"] == "failed"


def test_get_unknown_session_returns_none(db):
    assert db.get_session("demo", "never") is None
    assert db.frame_rows("demo", "never") == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"status": "finished"}, "session status must be one of pending, running, done, failed"),
        ({"n_frames": {"light": 3}}, "n_frames keys must be among"),
        ({"started_utc": dt.datetime(2025, 1, 1, 20)}, "naive datetime"),
    ],
)
def test_upsert_session_bad_input_raises(tmp_path, kwargs, match):
    with ResultsDB(default_results_url(tmp_path)) as db:
        db.create_schema()
        with pytest.raises(ValueError, match=match):
            db.upsert_session("demo", "n1", "2025-01-01", **kwargs)
        assert db.get_session("demo", "n1") is None


def test_bad_night_date_raises(tmp_path):
    with ResultsDB(default_results_url(tmp_path)) as db:
        with pytest.raises(ValueError, match="night_date must be a date"):
            db.upsert_session("demo", "n1", "01/01/2025")
        with pytest.raises(ValueError, match="not a datetime"):
            db.upsert_session("demo", "n1", T0)


def test_summary_json_round_trip(db):
    summary = {
        "n_science": 20,
        "fwhm_px_median": 3.25,
        "ok": True,
        "note": None,
        "bands": ["V", "R"],
        "object": "M 42 — Orion",
        "nested": {"detect": {"n": [1, 2, 3]}},
        "zp_mag": float("nan"),
        "limiting_mag": float("inf"),
        "np_float": np.float32(1.5),
        "np_int": np.int64(7),
        "np_array": np.array([0.5, np.nan]),
    }
    db.upsert_session("demo", "n1", "2025-01-01", summary=summary)
    stored = db.get_session("demo", "n1")["summary"]
    assert stored == {
        "n_science": 20,
        "fwhm_px_median": 3.25,
        "ok": True,
        "note": None,
        "bands": ["V", "R"],
        "object": "M 42 — Orion",
        "nested": {"detect": {"n": [1, 2, 3]}},
        "zp_mag": None,
        "limiting_mag": None,
        "np_float": 1.5,
        "np_int": 7,
        "np_array": [0.5, None],
    }
    assert type(stored["np_int"]) is int


def test_timestamps_are_stored_as_utc_and_returned_aware(db):
    paris_winter = dt.timezone(dt.timedelta(hours=1))
    started = dt.datetime(2025, 1, 1, 21, 30, 15, 250000, tzinfo=paris_winter)
    db.upsert_session("demo", "n1", "2025-01-01", started_utc=started)
    got = db.get_session("demo", "n1")["started_utc"]
    assert got == started
    assert got.utcoffset() == dt.timedelta(0)
    assert (got.hour, got.minute, got.microsecond) == (20, 30, 250000)
    with db.engine.connect() as conn:
        if db.dialect == "sqlite":
            raw = conn.exec_driver_sql("SELECT started_utc FROM rpp_session").scalar()
            assert raw == "2025-01-01 20:30:15.250000"
        else:
            raw = conn.exec_driver_sql(
                "SELECT to_char(started_utc AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') "
                "FROM rpp_session"
            ).scalar()
            assert raw == "2025-01-01 20:30:15.250000"


def test_postgres_session_time_zone_does_not_leak(pg_url):
    """A server/session TimeZone other than UTC still gives UTC datetimes back."""
    with ResultsDB(pg_url) as db:
        with db.engine.begin() as conn:
            conn.exec_driver_sql(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
        db.upsert_session("demo", "n1", "2025-01-01", started_utc=T0)
    with ResultsDB(pg_url + "?options=-c%20timezone%3DAsia/Tokyo") as tokyo:
        with tokyo.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW TimeZone").scalar() == "Asia/Tokyo"
        got = tokyo.get_session("demo", "n1")["started_utc"]
    assert got == T0 and got.tzinfo == dt.UTC


def test_list_sessions_filters_and_orders(db):
    db.upsert_session("demo", "demo_a", "2024-12-30", status="done")
    db.upsert_session("demo", "demo_b", "2025-01-02", status="failed")
    db.upsert_session("huntsman", "h_a", "2025-01-01", status="done")
    db.upsert_session("huntsman", "h_b", "2025-01-02", status="running")

    def keys(rows):
        return [(r["observatory"], r["session_id"]) for r in rows]

    assert keys(db.list_sessions()) == [
        ("demo", "demo_b"),
        ("huntsman", "h_b"),
        ("huntsman", "h_a"),
        ("demo", "demo_a"),
    ]
    assert keys(db.list_sessions("demo")) == [("demo", "demo_b"), ("demo", "demo_a")]
    assert keys(db.list_sessions(since=dt.date(2025, 1, 1))) == [
        ("demo", "demo_b"),
        ("huntsman", "h_b"),
        ("huntsman", "h_a"),
    ]
    assert keys(db.list_sessions("huntsman", since="2025-01-02")) == [("huntsman", "h_b")]
    assert keys(db.list_sessions(status="done")) == [("huntsman", "h_a"), ("demo", "demo_a")]
    assert db.list_sessions("nowhere") == []
    with pytest.raises(ValueError, match="status must be one of"):
        db.list_sessions(status="ok")


# ---- frames -----------------------------------------------------------------------------------


def test_upsert_frame_twice_keeps_one_row_with_updated_values(db):
    db.upsert_session("demo", "n1", "2025-01-01")
    db.upsert_frame(
        "demo",
        "n1",
        "sci_001",
        raw_path="/in/sci_001.fits",
        raw_sha256="ab" * 32,
        imagetyp="science",
        band="V",
        exptime_s=60.0,
        mjd_obs=60676.8541666667,
    )
    first = db.frame_rows("demo", "n1")[0]
    db.upsert_frame(
        "demo",
        "n1",
        "sci_001",
        calibrated_path="/w/frames/sci_001/calibrated.fits",
        n_sources=412,
        fwhm_px=3.1,
        fwhm_arcsec=3.72,
        background_adu=1021.5,
        background_rms_adu=11.2,
        limiting_mag=19.84,
    )
    assert _count(db, FrameRow) == 1
    (row,) = db.frame_rows("demo", "n1")
    assert row["frame_stem"] == "sci_001"
    assert row["raw_path"] == "/in/sci_001.fits" and row["band"] == "V"  # kept
    assert row["mjd_obs"] == 60676.8541666667  # double precision
    assert row["status"] == "ok"
    assert (row["n_sources"], row["fwhm_px"], row["limiting_mag"]) == (412, 3.1, 19.84)
    assert row["zp_mag"] is None and row["zp_err_mag"] is None  # for later
    assert row["created_utc"] == first["created_utc"]
    assert row["updated_utc"] >= first["updated_utc"]


def test_rejected_frame_accepted_on_rerun_loses_its_reason(db):
    db.upsert_session("demo", "n1", "2025-01-01")
    db.upsert_frame(
        "demo",
        "n1",
        "sci_002",
        status="rejected",
        reject_reason="missing EXPTIME",
        reject_stage="check",
    )
    assert db.frame_rows("demo", "n1")[0]["reject_reason"] == "missing EXPTIME"
    db.upsert_frame("demo", "n1", "sci_002", status="ok", exptime_s=30.0)
    (row,) = db.frame_rows("demo", "n1")
    assert (row["status"], row["reject_reason"], row["reject_stage"]) == ("ok", None, None)


def test_frame_nan_is_stored_as_null(db):
    db.upsert_session("demo", "n1", "2025-01-01")
    db.upsert_frame(
        "demo",
        "n1",
        "sci_003",
        fwhm_px=float("nan"),
        limiting_mag=np.float64("inf"),
        background_adu=np.float32(100.5),
        n_sources=0,
    )
    (row,) = db.frame_rows("demo", "n1")
    assert row["fwhm_px"] is None and row["limiting_mag"] is None
    assert row["background_adu"] == 100.5 and row["n_sources"] == 0


def test_frames_of_one_session_only_sorted_by_stem(db):
    for sid in ("n1", "n2"):
        db.upsert_session("demo", sid, "2025-01-01")
    for stem in ("b", "c", "a"):
        db.upsert_frame("demo", "n1", stem)
    db.upsert_frame("demo", "n2", "z")
    assert [r["frame_stem"] for r in db.frame_rows("demo", "n1")] == ["a", "b", "c"]
    assert [r["frame_stem"] for r in db.frame_rows("demo", "n2")] == ["z"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fwhm": 3.0}, r"unknown frame field\(s\) \['fwhm'\]"),
        ({"status": "failed"}, "frame status must be one of ok, rejected"),
        ({"imagetyp": "light"}, "imagetyp must be one of"),
    ],
)
def test_upsert_frame_bad_input_raises(tmp_path, kwargs, match):
    with ResultsDB(default_results_url(tmp_path)) as db:
        db.create_schema()
        db.upsert_session("demo", "n1", "2025-01-01")
        with pytest.raises(ValueError, match=match):
            db.upsert_frame("demo", "n1", "f", **kwargs)
        assert db.frame_rows("demo", "n1") == []


def test_writes_to_unknown_session_raise(db):
    with pytest.raises(ValueError, match="unknown session demo/nope"):
        db.upsert_frame("demo", "nope", "f")
    with pytest.raises(ValueError, match="unknown session demo/nope"):
        db.record_stage_run("demo", "nope", "check", status="success", started_utc=T0)
    with pytest.raises(ValueError, match="unknown session demo/nope"):
        db.record_master("demo", "nope", "bias", "/m/bias.fits", from_library=False)


# ---- stage runs and masters -------------------------------------------------------------------


def test_stage_runs_append_and_retries_are_attempts(db):
    db.upsert_session("demo", "n1", "2025-01-01")
    end = T0 + dt.timedelta(seconds=12.5)
    assert (
        db.record_stage_run(
            "demo",
            "n1",
            "calibrate",
            frame_stem="sci_001",
            status="failed",
            started_utc=T0,
            finished_utc=end,
            cpu_s=3.5,
            message="MemoryError",
        )
        == 1
    )
    assert (
        db.record_stage_run(
            "demo",
            "n1",
            "calibrate",
            frame_stem="sci_001",
            status="success",
            started_utc=end,
            finished_utc=end + dt.timedelta(seconds=2),
        )
        == 2
    )
    # another frame, and the session-level stage, count their own attempts
    assert (
        db.record_stage_run(
            "demo", "n1", "calibrate", frame_stem="sci_002", status="success", started_utc=T0
        )
        == 1
    )
    assert db.record_stage_run("demo", "n1", "masters", status="success", started_utc=T0) == 1
    assert db.record_stage_run("demo", "n1", "masters", status="success", started_utc=T0) == 2
    # Airflow's try_number given explicitly is stored as is
    assert (
        db.record_stage_run(
            "demo",
            "n1",
            "detect",
            frame_stem="sci_001",
            status="rejected",
            started_utc=T0,
            attempt=3,
            message="no sources",
        )
        == 3
    )

    assert _count(db, StageRunRow) == 6
    runs = db.stage_runs("demo", "n1", stage="calibrate", frame_stem="sci_001")
    assert [(r["attempt"], r["status"]) for r in runs] == [(1, "failed"), (2, "success")]
    assert runs[0]["wall_s"] == 12.5 and runs[0]["cpu_s"] == 3.5
    assert runs[0]["message"] == "MemoryError" and runs[0]["finished_utc"] == end
    assert runs[1]["wall_s"] == 2.0
    masters = db.stage_runs("demo", "n1", stage="masters")
    assert [(r["frame_stem"], r["attempt"]) for r in masters] == [(None, 1), (None, 2)]
    assert len(db.stage_runs("demo", "n1")) == 6


def test_stage_run_bad_input_raises(db):
    db.upsert_session("demo", "n1", "2025-01-01")
    with pytest.raises(ValueError, match="stage run status must be one of"):
        db.record_stage_run("demo", "n1", "check", status="ok", started_utc=T0)
    with pytest.raises(ValueError, match="attempt must be >= 1"):
        db.record_stage_run("demo", "n1", "check", status="success", started_utc=T0, attempt=0)
    with pytest.raises(ValueError, match="naive datetime"):
        db.record_stage_run(
            "demo", "n1", "check", status="success", started_utc=dt.datetime(2025, 1, 1)
        )
    assert db.stage_runs("demo", "n1") == []


def test_record_master_upserts_by_kind(db):
    db.upsert_session("demo", "n1", "2025-01-01")
    db.record_master("demo", "n1", "bias", "/w/masters/bias.fits", from_library=False)
    db.record_master(
        "demo", "n1", "flat_V", "/lib/flat_V_20241228.fits", from_library=True, delta_days=4.0
    )
    db.record_master(
        "demo", "n1", "bias", "/lib/bias_20241231.fits", from_library=True, delta_days=1.0
    )
    rows = db.masters("demo", "n1")
    assert [(r["kind"], r["path"], r["from_library"], r["delta_days"]) for r in rows] == [
        ("bias", "/lib/bias_20241231.fits", True, 1.0),
        ("flat_V", "/lib/flat_V_20241228.fits", True, 4.0),
    ]


def test_rerunning_a_whole_session_is_idempotent(db):
    def run_once(fwhm_px):
        db.upsert_session("demo", "n1", "2025-01-01", status="running", started_utc=T0)
        db.record_master("demo", "n1", "bias", "/w/bias.fits", from_library=False)
        for i in range(3):
            db.upsert_frame("demo", "n1", f"sci_{i}", imagetyp="science", fwhm_px=fwhm_px)
            db.record_stage_run(
                "demo", "n1", "detect", frame_stem=f"sci_{i}", status="success", started_utc=T0
            )
        db.upsert_session("demo", "n1", "2025-01-01", status="done", n_rejected=0)

    run_once(3.0)
    run_once(2.5)
    assert (_count(db, SessionRow), _count(db, FrameRow), len(db.masters("demo", "n1"))) == (
        1,
        3,
        1,
    )
    assert {r["fwhm_px"] for r in db.frame_rows("demo", "n1")} == {2.5}
    assert [r["attempt"] for r in db.stage_runs("demo", "n1", frame_stem="sci_0")] == [1, 2]


# ---- concurrency ------------------------------------------------------------------------------


def _write_frames(url: str, worker: int, n_frames: int, barrier) -> None:
    """One process (think: one Airflow task) recording its frames of the shared session."""
    with ResultsDB(url) as db:
        barrier.wait(timeout=60)  # both processes race from here, schema creation included
        db.create_schema()
        db.upsert_session("demo", "night_1", "2025-01-01", status="running", started_utc=T0)
        for i in range(n_frames):
            stem = f"w{worker}_{i:03d}"
            db.upsert_frame(
                "demo",
                "night_1",
                stem,
                imagetyp="science",
                band="V",
                fwhm_px=2.0 + i / 100,
                n_sources=100 + i,
            )
            db.record_stage_run(
                "demo",
                "night_1",
                "photometry",
                frame_stem=stem,
                status="success",
                started_utc=T0,
                cpu_s=0.1,
            )
        db.upsert_frame("demo", "night_1", "shared", n_sources=worker)  # same row from both


def test_two_processes_write_frames_of_one_session(fresh_url):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_frames, args=(fresh_url, w, 50, barrier)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0], "a writer process failed (see captured stderr)"

    with ResultsDB(fresh_url) as db:
        rows = db.frame_rows("demo", "night_1")
        assert len(rows) == 101
        stems = [r["frame_stem"] for r in rows if r["frame_stem"] != "shared"]
        assert stems == sorted(f"w{w}_{i:03d}" for w in (1, 2) for i in range(50))
        by_stem = {r["frame_stem"]: r for r in rows}
        assert by_stem["w2_049"]["fwhm_px"] == pytest.approx(2.49)
        assert by_stem["w1_000"]["n_sources"] == 100
        assert by_stem["shared"]["n_sources"] in (1, 2)
        runs = db.stage_runs("demo", "night_1", stage="photometry")
        assert len(runs) == 100 and {r["attempt"] for r in runs} == {1}
        assert _count(db, SessionRow) == 1
        assert db.get_session("demo", "night_1")["status"] == "running"
