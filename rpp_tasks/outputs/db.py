"""Results database: what each night's reduction did, per session, frame, stage run and master.

The pipeline records one row per observatory session (``rpp_session``), one row per frame of the
session (``rpp_frame``), one row per stage execution (``rpp_stage_run``, append-only: a retry is a
new attempt) and one row per calibration master used (``rpp_master``).

Re-running a session is idempotent. Sessions, frames and masters are written with a dialect-aware
``INSERT ... ON CONFLICT DO UPDATE`` keyed by their natural keys (observatory + session id;
session + frame stem; session + master kind), as BANZAI's ``add_or_update_record`` does, never
with delete + insert. Stage runs are appended.

Backends are SQLite (the default, one file per installation, see `default_results_url`) and
PostgreSQL (``postgresql://user@host/db``), opened by `rpp_tasks.outputs.sql.make_engine`: for
SQLite the connection uses WAL journaling, a busy timeout and ``BEGIN IMMEDIATE`` for writes, so
that several processes (e.g. Airflow tasks of one session) can write at the same time.
Timestamps are timezone-aware and stored as UTC; they come back as aware `datetime` objects in UTC
on both backends. JSON columns use the portable SQLAlchemy ``JSON`` type (``JSONB`` on
PostgreSQL); NaN and infinities are stored as SQL ``NULL`` / JSON ``null`` so that both backends
hold the same values.

This module imports only SQLAlchemy and the standard library: Airflow tasks may import it, and it
never imports Airflow.

Examples
--------
>>> db = ResultsDB(default_results_url("/data/work"))          # doctest: +SKIP
>>> db.create_schema()                                         # doctest: +SKIP
>>> db.upsert_session("demo", "demo_20250101", date(2025, 1, 1), status="running")  # doctest: +SKIP
>>> db.upsert_frame(  # doctest: +SKIP
...     "demo", "demo_20250101", "sci_001", imagetyp="science", band="V"
... )
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Connection,
    Date,
    DateTime,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from rpp_tasks.exceptions import ConfigError
from rpp_tasks.jsonsafe import dumps, json_safe
from rpp_tasks.outputs.sql import make_engine, normalize_url, write_transaction

__all__ = [
    "FRAME_FIELDS",
    "FRAME_STATUSES",
    "FRAME_TYPES",
    "OBJECT_KINDS",
    "PHOTOMETRY_FIELDS",
    "PHOTOMETRY_STATUSES",
    "RESULTS_URL_ENV",
    "SESSION_STATUSES",
    "STAGE_RUN_STATUSES",
    "ResultsDB",
    "decisions",
    "default_results_url",
    "record_decision",
    "upsert_frame_index",
    "file_sha256",
    "results_url_from_env",
]

log = logging.getLogger(__name__)

RESULTS_URL_ENV = "RPP_RESULTS_DB_URL"
RESULTS_FILENAME = "rpp_results.sqlite"

SESSION_STATUSES = ("pending", "running", "done", "failed")
FRAME_STATUSES = ("ok", "rejected")
STAGE_RUN_STATUSES = ("running", "success", "failed", "rejected", "skipped")
FRAME_TYPES = ("bias", "dark", "flat", "science", "unknown")

# Arbitrary constant key of the PostgreSQL advisory lock that serialises create_schema().
_PG_SCHEMA_LOCK_KEY = 0x52505044  # "RPPD"


# --------------------------------------------------------------------------------------------
# Column types
# --------------------------------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware timestamp stored as UTC on every backend.

    Binding a naive `datetime` raises `ValueError` (its time zone would be a guess). Results are
    aware datetimes in UTC: ``timestamptz`` on PostgreSQL, a naive UTC string on SQLite.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            msg = f"expected a timezone-aware datetime, got {type(value).__name__} {value!r}"
            raise ValueError(msg)
        if value.tzinfo is None or value.utcoffset() is None:
            msg = (
                f"naive datetime {value.isoformat()} is ambiguous: "
                "give it a tzinfo (e.g. datetime.UTC)"
            )
            raise ValueError(msg)
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


_JSONType = JSON().with_variant(postgresql.JSONB(), "postgresql")


# --------------------------------------------------------------------------------------------
# Schema (SQLAlchemy 2.x declarative)
# --------------------------------------------------------------------------------------------


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    """Declarative base of the results schema (``Base.metadata`` holds the four tables)."""


class SessionRow(Base):
    """One observatory session (a night's frames of one observatory)."""

    __tablename__ = "rpp_session"
    __table_args__ = (
        UniqueConstraint("observatory", "session_id", name="uq_rpp_session_key"),
        CheckConstraint(_in("status", SESSION_STATUSES), name="ck_rpp_session_status"),
        Index("ix_rpp_session_night", "night_date"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    observatory: Mapped[str] = mapped_column(String(64))
    session_id: Mapped[str] = mapped_column(String(128))
    night_date: Mapped[dt.date] = mapped_column(Date)
    folder: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    started_utc: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_utc: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    n_bias: Mapped[int | None] = mapped_column(Integer)
    n_dark: Mapped[int | None] = mapped_column(Integer)
    n_flat: Mapped[int | None] = mapped_column(Integer)
    n_science: Mapped[int | None] = mapped_column(Integer)
    n_unknown: Mapped[int | None] = mapped_column(Integer)
    n_rejected: Mapped[int | None] = mapped_column(Integer)
    summary: Mapped[Any | None] = mapped_column(_JSONType)
    created_utc: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_utc: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class FrameRow(Base):
    """One frame of a session, with its outcome and quality numbers."""

    __tablename__ = "rpp_frame"
    __table_args__ = (
        UniqueConstraint("session_pk", "frame_stem", name="uq_rpp_frame_key"),
        CheckConstraint(_in("status", FRAME_STATUSES), name="ck_rpp_frame_status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_pk: Mapped[int] = mapped_column(ForeignKey("rpp_session.id", ondelete="CASCADE"))
    frame_stem: Mapped[str] = mapped_column(String(255))
    raw_path: Mapped[str | None] = mapped_column(Text)
    raw_sha256: Mapped[str | None] = mapped_column(String(64))
    imagetyp: Mapped[str | None] = mapped_column(String(16))
    band: Mapped[str | None] = mapped_column(String(32))
    exptime_s: Mapped[float | None] = mapped_column(Double)
    mjd_obs: Mapped[float | None] = mapped_column(Double)
    status: Mapped[str] = mapped_column(String(16), default="ok")
    reject_reason: Mapped[str | None] = mapped_column(Text)
    reject_stage: Mapped[str | None] = mapped_column(String(32))
    calibrated_path: Mapped[str | None] = mapped_column(Text)
    catalog_path: Mapped[str | None] = mapped_column(Text)
    n_sources: Mapped[int | None] = mapped_column(Integer)
    fwhm_px: Mapped[float | None] = mapped_column(Double)
    fwhm_arcsec: Mapped[float | None] = mapped_column(Double)
    background_adu: Mapped[float | None] = mapped_column(Double)
    background_rms_adu: Mapped[float | None] = mapped_column(Double)
    limiting_mag: Mapped[float | None] = mapped_column(Double)
    zp_mag: Mapped[float | None] = mapped_column(Double)
    zp_err_mag: Mapped[float | None] = mapped_column(Double)
    zp_n_stars: Mapped[int | None] = mapped_column(Integer)
    zp_catalog: Mapped[str | None] = mapped_column(String(32))
    created_utc: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_utc: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class StageRunRow(Base):
    """One execution of one stage, for the whole session (``frame_stem`` NULL) or one frame.

    Append-only: a retry is a new row with the next ``attempt``. ``frame_stem`` is deliberately
    not a foreign key, so a stage that fails before its frame row exists can still be recorded.
    """

    __tablename__ = "rpp_stage_run"
    __table_args__ = (
        CheckConstraint(_in("status", STAGE_RUN_STATUSES), name="ck_rpp_stage_run_status"),
        Index("ix_rpp_stage_run_key", "session_pk", "stage", "frame_stem"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_pk: Mapped[int] = mapped_column(ForeignKey("rpp_session.id", ondelete="CASCADE"))
    frame_stem: Mapped[str | None] = mapped_column(String(255))
    stage: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    started_utc: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_utc: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    cpu_s: Mapped[float | None] = mapped_column(Double)
    wall_s: Mapped[float | None] = mapped_column(Double)
    message: Mapped[str | None] = mapped_column(Text)
    recorded_utc: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class MasterRow(Base):
    """A calibration master used by a session (``kind`` is the file stem: bias, dark, flat_V...)."""

    __tablename__ = "rpp_master"
    __table_args__ = (UniqueConstraint("session_pk", "kind", name="uq_rpp_master_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_pk: Mapped[int] = mapped_column(ForeignKey("rpp_session.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    from_library: Mapped[bool] = mapped_column(Boolean)
    delta_days: Mapped[float | None] = mapped_column(Double)
    updated_utc: Mapped[dt.datetime] = mapped_column(UTCDateTime)


OBJECT_KINDS = ("target", "source")
PHOTOMETRY_STATUSES = ("detected", "upper_limit", "outside_field", "no_wcs")


class ObjectRow(Base):
    """A sky object followed across frames: an observer's target (``kind='target'``, key
    ``target:<normalised name>``) or a reference-catalogue source (``kind='source'``, key
    ``ref:<reference id>``), kept when ``targets.store_all_sources`` is on."""

    __tablename__ = "rpp_object"
    __table_args__ = (
        UniqueConstraint("key", name="uq_rpp_object_key"),
        CheckConstraint(_in("kind", OBJECT_KINDS), name="ck_rpp_object_kind"),
        Index("ix_rpp_object_position", "dec_deg", "ra_deg"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(160))
    name: Mapped[str] = mapped_column(String(160))
    kind: Mapped[str] = mapped_column(String(16))
    ra_deg: Mapped[float] = mapped_column(Double)
    dec_deg: Mapped[float] = mapped_column(Double)
    ref_id: Mapped[str | None] = mapped_column(String(64))
    info: Mapped[Any | None] = mapped_column(_JSONType)
    created_utc: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_utc: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class PhotometryRow(Base):
    """An object in one frame: calibrated (absolute) and differential magnitude, or an upper limit.

    One row per (object, frame), upserted; a light curve is one indexed query on
    ``(object_pk, band, mjd_mid)`` joined to the frame and its session.
    """

    __tablename__ = "rpp_photometry"
    __table_args__ = (
        UniqueConstraint("object_pk", "frame_pk", name="uq_rpp_photometry_key"),
        CheckConstraint(_in("status", PHOTOMETRY_STATUSES), name="ck_rpp_photometry_status"),
        Index("ix_rpp_photometry_curve", "object_pk", "band", "mjd_mid"),
        Index("ix_rpp_photometry_frame", "frame_pk"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    object_pk: Mapped[int] = mapped_column(ForeignKey("rpp_object.id", ondelete="CASCADE"))
    frame_pk: Mapped[int] = mapped_column(ForeignKey("rpp_frame.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))
    band: Mapped[str | None] = mapped_column(String(32))
    phot_type: Mapped[str | None] = mapped_column(String(16))
    mjd_mid: Mapped[float | None] = mapped_column(Double)
    bjd_tdb: Mapped[float | None] = mapped_column(Double)
    airmass: Mapped[float | None] = mapped_column(Double)
    mag: Mapped[float | None] = mapped_column(Double)
    mag_err: Mapped[float | None] = mapped_column(Double)
    mag_diff: Mapped[float | None] = mapped_column(Double)
    mag_diff_err: Mapped[float | None] = mapped_column(Double)
    mag_inst: Mapped[float | None] = mapped_column(Double)
    mag_inst_err: Mapped[float | None] = mapped_column(Double)
    snr: Mapped[float | None] = mapped_column(Double)
    limit_mag: Mapped[float | None] = mapped_column(Double)
    limit_diff_mag: Mapped[float | None] = mapped_column(Double)
    match_sep_arcsec: Mapped[float | None] = mapped_column(Double)
    x_px: Mapped[float | None] = mapped_column(Double)
    y_px: Mapped[float | None] = mapped_column(Double)
    zp_rel_mag: Mapped[float | None] = mapped_column(Double)
    n_comp: Mapped[int | None] = mapped_column(Integer)
    flags: Mapped[str | None] = mapped_column(String(255))
    by_type: Mapped[Any | None] = mapped_column(_JSONType)
    updated_utc: Mapped[dt.datetime] = mapped_column(UTCDateTime)


#: Columns `ResultsDB.record_photometry` accepts in each row (besides ``object_key``, ``frame``).
PHOTOMETRY_FIELDS = tuple(
    c.name
    for c in PhotometryRow.__table__.columns
    if c.name not in {"id", "object_pk", "frame_pk", "updated_utc"}
)
_PHOT_FLOAT_FIELDS = frozenset(
    c.name for c in PhotometryRow.__table__.columns if isinstance(c.type, Double)
)


#: Columns `ResultsDB.upsert_frame` accepts as keyword arguments.
FRAME_FIELDS = tuple(
    c.name
    for c in FrameRow.__table__.columns
    if c.name not in {"id", "session_pk", "frame_stem", "created_utc", "updated_utc"}
)
_FRAME_FLOAT_FIELDS = frozenset(
    c.name for c in FrameRow.__table__.columns if isinstance(c.type, Double)
)


# --------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------


def default_results_url(base_dir: str | os.PathLike) -> str:
    """
    SQLite URL of the results database kept in ``base_dir``.

    Parameters
    ----------
    base_dir : str or path-like
        Folder of the database file (typically the work root). Made absolute.

    Returns
    -------
    url : str
        ``"sqlite:///<base_dir>/rpp_results.sqlite"`` (four slashes for an absolute path).
    """
    return f"sqlite:///{(Path(base_dir).expanduser().resolve() / RESULTS_FILENAME).as_posix()}"


def results_url_from_env(
    default: str | None = None, *, environ: Mapping[str, str] | None = None
) -> str:
    """
    Results database URL: ``$RPP_RESULTS_DB_URL`` when set and non-empty, else ``default``.

    Parameters
    ----------
    default : str, optional
        URL used when the variable is unset, e.g. ``default_results_url(work_root)``.
    environ : mapping, optional
        Environment to read (``os.environ`` by default; tests pass a dict).

    Returns
    -------
    url : str

    Raises
    ------
    ConfigError
        Neither the variable nor ``default`` gives a URL.
    """
    env = os.environ if environ is None else environ
    url = (env.get(RESULTS_URL_ENV) or "").strip()
    if url:
        return url
    if default:
        return default
    raise ConfigError(
        "environment",
        RESULTS_URL_ENV,
        "a SQLAlchemy URL (sqlite:///path or postgresql://user@host/db)",
    )


def file_sha256(path: str | os.PathLike, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (for ``raw_sha256``; raw files are only read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Value normalisation
# --------------------------------------------------------------------------------------------


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _json_dumps(obj: Any) -> str:
    return dumps(obj, sort_keys=True)


def _as_date(value: dt.date | str, name: str) -> dt.date:
    if isinstance(value, dt.datetime):
        msg = f"{name} must be a date, not a datetime ({value.isoformat()}); pass value.date()"
        raise ValueError(msg)
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    msg = f"{name} must be a date or an ISO 'YYYY-MM-DD' string, got {value!r}"
    raise ValueError(msg)


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        msg = f"{name} must be one of {', '.join(choices)}; got {value!r}"
        raise ValueError(msg)
    return value


def _check_aware(value: dt.datetime | None, name: str) -> dt.datetime | None:
    """Reject naive datetimes up front (the column type would, wrapped in a StatementError)."""
    if value is None:
        return None
    if not isinstance(value, dt.datetime):
        msg = f"{name} must be a timezone-aware datetime, got {type(value).__name__} {value!r}"
        raise ValueError(msg)
    if value.tzinfo is None or value.utcoffset() is None:
        msg = (
            f"{name}: naive datetime {value.isoformat()} is ambiguous; "
            "give it a tzinfo (e.g. datetime.UTC)"
        )
        raise ValueError(msg)
    return value


def _check_key(value: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        msg = f"{name} must be a non-empty string, got {value!r}"
        raise ValueError(msg)
    return value


_SESSION_N_COLUMNS = {t: f"n_{t}" for t in FRAME_TYPES}


def _session_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k != "id" and k not in _SESSION_N_COLUMNS.values()}
    counts = {t: row[c] for t, c in _SESSION_N_COLUMNS.items()}
    out["n_frames"] = None if all(v is None for v in counts.values()) else counts
    return out


# --------------------------------------------------------------------------------------------
# ResultsDB
# --------------------------------------------------------------------------------------------


class ResultsDB:
    """
    Read and write the results database.

    Parameters
    ----------
    url : str
        SQLAlchemy URL: ``sqlite:///<path>`` (see `default_results_url`) or
        ``postgresql://user[:password]@host[:port]/db`` (``postgres://`` is accepted too).
        The parent folder of a SQLite file is created if missing.
    echo : bool, optional
        Log every SQL statement (SQLAlchemy ``echo``).

    Notes
    -----
    Write methods take keyword-only values where ``None`` means "leave the stored value
    unchanged" (and SQL ``NULL`` on first insert), so each stage can record what it knows
    without overwriting what earlier stages wrote. Every method is one transaction.

    The instance owns a connection pool: call `close` (or use it as a context manager) when done.
    Do not share an instance across `fork`; open one per process.
    """

    def __init__(self, url: str, *, echo: bool = False):
        parsed = normalize_url(url)
        backend = parsed.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            msg = (
                f"unsupported results database backend {backend!r} in {parsed!r}: "
                "use sqlite or postgresql"
            )
            raise ValueError(msg)
        self.url = parsed.render_as_string(hide_password=True)
        self._engine = make_engine(parsed, echo=echo, json_serializer=_json_dumps)
        self._insert = sqlite.insert if backend == "sqlite" else postgresql.insert
        self.dialect = backend
        log.debug("results db: opened %s", self.url)

    # ---- lifecycle --------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for ad-hoc reporting queries)."""
        return self._engine

    def close(self) -> None:
        """Dispose of the connection pool."""
        self._engine.dispose()

    def __enter__(self) -> ResultsDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultsDB({self.url!r})"

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction (BEGIN IMMEDIATE on SQLite)."""
        with write_transaction(self._engine) as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            yield conn

    def create_schema(self) -> None:
        """Create the tables and indexes that do not exist yet (idempotent, safe to race).

        Concurrent callers are serialised (SQLite write lock; PostgreSQL advisory lock), so two
        tasks starting on a fresh database do not both try to create the same table.
        """
        with self._write() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_SCHEMA_LOCK_KEY})
            Base.metadata.create_all(conn, checkfirst=True)
        log.info("results db: schema ready in %s", self.url)

    # ---- writes -----------------------------------------------------------------------------

    def upsert_session(
        self,
        observatory: str,
        session_id: str,
        night_date: dt.date | str,
        *,
        folder: str | os.PathLike | None = None,
        status: str | None = None,
        started_utc: dt.datetime | None = None,
        finished_utc: dt.datetime | None = None,
        n_frames: Mapping[str, int] | None = None,
        n_rejected: int | None = None,
        summary: Mapping[str, Any] | None = None,
    ) -> None:
        """
        Insert or update the session keyed by ``(observatory, session_id)``.

        Parameters
        ----------
        observatory, session_id : str
            Natural key.
        night_date : datetime.date or str
            Local date of the start of the night (``YYYY-MM-DD``).
        folder : str or path-like, optional
            Work folder of the session.
        status : {'pending', 'running', 'done', 'failed'}, optional
            ``'pending'`` on first insert when not given.
        started_utc, finished_utc : datetime.datetime, optional
            Timezone-aware; stored as UTC. Naive datetimes raise `ValueError`.
        n_frames : mapping, optional
            Frame counts by type (keys among ``bias, dark, flat, science, unknown``; a missing
            key counts 0).
        n_rejected : int, optional
            Number of rejected frames.
        summary : mapping, optional
            JSON-able session summary (numpy values unwrapped, NaN stored as ``null``).

        Notes
        -----
        A ``None`` option leaves the stored value unchanged, so a second call with
        ``status='done'`` only changes the status (and ``updated_utc``).
        """
        _check_key(observatory, "observatory")
        _check_key(session_id, "session_id")
        values: dict[str, Any] = {"night_date": _as_date(night_date, "night_date")}
        if folder is not None:
            values["folder"] = os.fspath(folder)
        if status is not None:
            values["status"] = _check_choice(status, SESSION_STATUSES, "session status")
        if started_utc is not None:
            values["started_utc"] = _check_aware(started_utc, "started_utc")
        if finished_utc is not None:
            values["finished_utc"] = _check_aware(finished_utc, "finished_utc")
        if n_frames is not None:
            unknown = set(n_frames) - set(FRAME_TYPES)
            if unknown:
                msg = f"n_frames keys must be among {', '.join(FRAME_TYPES)}; got {sorted(unknown)}"
                raise ValueError(msg)
            values.update({c: int(n_frames.get(t, 0)) for t, c in _SESSION_N_COLUMNS.items()})
        if n_rejected is not None:
            values["n_rejected"] = int(n_rejected)
        if summary is not None:
            values["summary"] = json_safe(summary)
        now = _utcnow()
        stmt = self._insert(SessionRow).values(
            observatory=observatory,
            session_id=session_id,
            status=values.get("status", "pending"),
            created_utc=now,
            updated_utc=now,
            **{k: v for k, v in values.items() if k != "status"},
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[SessionRow.observatory, SessionRow.session_id],
            set_={**values, "updated_utc": now},
        )
        with self._write() as conn:
            conn.execute(stmt)
        log.info(
            "results db: session %s/%s recorded (%s)",
            observatory,
            session_id,
            ", ".join(sorted(values)),
        )

    def upsert_frame(
        self, observatory: str, session_id: str, frame_stem: str, **fields: Any
    ) -> None:
        """
        Insert or update the frame keyed by ``(session, frame_stem)``.

        Parameters
        ----------
        observatory, session_id : str
            The session, which must have been recorded with `upsert_session`.
        frame_stem : str
            Name of the frame (raw file name without extension; the ``frames/<stem>`` folder).
        **fields
            Any of `FRAME_FIELDS`: ``raw_path``, ``raw_sha256``, ``imagetyp``
            (bias/dark/flat/science/unknown), ``band``, ``exptime_s``, ``mjd_obs``, ``status``
            (``'ok'`` or ``'rejected'``; ``'ok'`` on first insert), ``reject_reason``,
            ``reject_stage``, ``calibrated_path``, ``catalog_path``, ``n_sources``, ``fwhm_px``,
            ``fwhm_arcsec``, ``background_adu``, ``background_rms_adu``, ``limiting_mag``,
            ``zp_mag``, ``zp_err_mag``, ``zp_n_stars``, ``zp_catalog``.
            ``None`` leaves the stored value unchanged; NaN is stored as ``NULL``.

        Raises
        ------
        ValueError
            Unknown field, invalid status or imagetyp, or unknown session.

        Notes
        -----
        ``status='ok'`` without ``reject_reason``/``reject_stage`` clears them, so a frame
        rejected by an earlier run and accepted by a re-run does not keep a stale reason.
        """
        _check_key(frame_stem, "frame_stem")
        unknown = set(fields) - set(FRAME_FIELDS)
        if unknown:
            expected = ", ".join(FRAME_FIELDS)
            msg = f"unknown frame field(s) {sorted(unknown)}; expected among {expected}"
            raise ValueError(msg)
        values = {k: v for k, v in fields.items() if v is not None}
        for key in values.keys() & _FRAME_FLOAT_FIELDS:
            values[key] = _finite_or_none(values[key])
        for key in ("raw_path", "calibrated_path", "catalog_path"):
            if key in values:
                values[key] = os.fspath(values[key])
        if "status" in values:
            _check_choice(values["status"], FRAME_STATUSES, "frame status")
            if values["status"] == "ok":
                values.setdefault("reject_reason", None)
                values.setdefault("reject_stage", None)
        if "imagetyp" in values:
            _check_choice(values["imagetyp"], FRAME_TYPES, "imagetyp")
        now = _utcnow()
        with self._write() as conn:
            session_pk = self._session_pk(conn, observatory, session_id)
            stmt = self._insert(FrameRow).values(
                session_pk=session_pk,
                frame_stem=frame_stem,
                created_utc=now,
                updated_utc=now,
                **{"status": "ok", **values},
            )
            stmt = stmt.on_conflict_do_update(
                index_elements=[FrameRow.session_pk, FrameRow.frame_stem],
                set_={**values, "updated_utc": now},
            )
            conn.execute(stmt)
        log.debug(
            "results db: frame %s of %s/%s recorded (%s)",
            frame_stem,
            observatory,
            session_id,
            ", ".join(sorted(values)),
        )

    def record_stage_run(
        self,
        observatory: str,
        session_id: str,
        stage: str,
        *,
        status: str,
        started_utc: dt.datetime,
        finished_utc: dt.datetime | None = None,
        frame_stem: str | None = None,
        cpu_s: float | None = None,
        wall_s: float | None = None,
        message: str | None = None,
        attempt: int | None = None,
    ) -> int:
        """
        Append one stage execution (never updates: a retry is a new attempt).

        Parameters
        ----------
        observatory, session_id : str
            The session, which must have been recorded with `upsert_session`.
        stage : str
            Stage name (the task id: ``check``, ``calibrate``, ``detect``...).
        status : {'running', 'success', 'failed', 'rejected', 'skipped'}
        started_utc : datetime.datetime
            Timezone-aware start time.
        finished_utc : datetime.datetime, optional
            Timezone-aware end time.
        frame_stem : str, optional
            The frame, or ``None`` for a session-level stage.
        cpu_s, wall_s : float, optional
            CPU and wall-clock seconds. ``wall_s`` defaults to ``finished_utc - started_utc``.
        message : str, optional
            Error or rejection message.
        attempt : int, optional
            Attempt number (e.g. Airflow's ``try_number``). By default one more than the
            highest attempt recorded for the same session, stage and frame (1 for the first).

        Returns
        -------
        attempt : int
            The attempt number stored.
        """
        _check_key(stage, "stage")
        _check_choice(status, STAGE_RUN_STATUSES, "stage run status")
        if started_utc is None:
            msg = "started_utc is required"
            raise ValueError(msg)
        _check_aware(started_utc, "started_utc")
        _check_aware(finished_utc, "finished_utc")
        if attempt is not None and int(attempt) < 1:
            msg = f"attempt must be >= 1, got {attempt}"
            raise ValueError(msg)
        if wall_s is None and finished_utc is not None:
            wall_s = (finished_utc - started_utc).total_seconds()
        with self._write() as conn:
            session_pk = self._session_pk(conn, observatory, session_id)
            if attempt is None:
                latest = conn.execute(
                    select(func.max(StageRunRow.attempt)).where(
                        StageRunRow.session_pk == session_pk,
                        StageRunRow.stage == stage,
                        StageRunRow.frame_stem.is_not_distinct_from(frame_stem),
                    )
                ).scalar_one()
                attempt = 1 if latest is None else latest + 1
            conn.execute(
                StageRunRow.__table__.insert().values(
                    session_pk=session_pk,
                    frame_stem=frame_stem,
                    stage=stage,
                    attempt=int(attempt),
                    status=status,
                    started_utc=started_utc,
                    finished_utc=finished_utc,
                    cpu_s=_finite_or_none(cpu_s),
                    wall_s=_finite_or_none(wall_s),
                    message=message,
                    recorded_utc=_utcnow(),
                )
            )
        log.debug(
            "results db: stage %s of %s/%s%s attempt %d: %s",
            stage,
            observatory,
            session_id,
            f" frame {frame_stem}" if frame_stem else "",
            attempt,
            status,
        )
        return int(attempt)

    def record_master(
        self,
        observatory: str,
        session_id: str,
        kind: str,
        path: str | os.PathLike,
        *,
        from_library: bool,
        delta_days: float | None = None,
    ) -> None:
        """
        Insert or update the calibration master of one kind used by a session.

        Parameters
        ----------
        observatory, session_id : str
            The session, which must have been recorded with `upsert_session`.
        kind : str
            Master kind, the file stem in ``masters/``: ``bias``, ``dark``, ``flat_<band>``.
        path : str or path-like
            The master file used.
        from_library : bool
            True when taken from the master library instead of built from this session's frames.
        delta_days : float, optional
            Age of a library master relative to the session night, in days.
        """
        _check_key(kind, "kind")
        values = {
            "path": os.fspath(path),
            "from_library": bool(from_library),
            "delta_days": _finite_or_none(delta_days),
            "updated_utc": _utcnow(),
        }
        with self._write() as conn:
            session_pk = self._session_pk(conn, observatory, session_id)
            stmt = self._insert(MasterRow).values(session_pk=session_pk, kind=kind, **values)
            stmt = stmt.on_conflict_do_update(
                index_elements=[MasterRow.session_pk, MasterRow.kind], set_=values
            )
            conn.execute(stmt)
        log.debug(
            "results db: master %s of %s/%s recorded (library=%s)",
            kind,
            observatory,
            session_id,
            from_library,
        )

    # Names used in docs/ARCHITECTURE.md.
    record_session = upsert_session
    record_frame = upsert_frame

    # ---- reads ------------------------------------------------------------------------------

    @staticmethod
    def _session_pk(conn: Connection, observatory: str, session_id: str) -> int:
        pk = conn.execute(
            select(SessionRow.id).where(
                SessionRow.observatory == observatory, SessionRow.session_id == session_id
            )
        ).scalar_one_or_none()
        if pk is None:
            msg = (
                f"unknown session {observatory}/{session_id}: record it with upsert_session() first"
            )
            raise ValueError(msg)
        return pk

    def get_session(self, observatory: str, session_id: str) -> dict[str, Any] | None:
        """
        The session row as a dict, or ``None`` when it was never recorded.

        Returns
        -------
        row : dict or None
            Columns ``observatory, session_id, night_date, folder, status, started_utc,
            finished_utc, n_frames`` (dict by type, or ``None``), ``n_rejected, summary,
            created_utc, updated_utc``. Timestamps are aware UTC datetimes.
        """
        with self._read() as conn:
            row = (
                conn.execute(
                    select(SessionRow.__table__).where(
                        SessionRow.observatory == observatory, SessionRow.session_id == session_id
                    )
                )
                .mappings()
                .one_or_none()
            )
        return None if row is None else _session_dict(row)

    def list_sessions(
        self,
        observatory: str | None = None,
        since: dt.date | str | None = None,
        *,
        status: str | None = None,
    ) -> list[dict[str, Any]]:
        """
        Sessions, newest night first (then observatory, session id).

        Parameters
        ----------
        observatory : str, optional
            Only this observatory.
        since : datetime.date or str, optional
            Only nights on or after this date.
        status : str, optional
            Only sessions in this status.

        Returns
        -------
        rows : list of dict
            As `get_session`; empty list when nothing matches.
        """
        stmt = select(SessionRow.__table__)
        if observatory is not None:
            stmt = stmt.where(SessionRow.observatory == observatory)
        if since is not None:
            stmt = stmt.where(SessionRow.night_date >= _as_date(since, "since"))
        if status is not None:
            stmt = stmt.where(
                SessionRow.status == _check_choice(status, SESSION_STATUSES, "status")
            )
        stmt = stmt.order_by(
            SessionRow.night_date.desc(), SessionRow.observatory, SessionRow.session_id
        )
        with self._read() as conn:
            return [_session_dict(r) for r in conn.execute(stmt).mappings()]

    def _session_children(
        self, table, observatory: str, session_id: str, *where, order_by
    ) -> list[dict]:
        stmt = (
            select(*[c for c in table.columns if c.name not in ("id", "session_pk")])
            .join(SessionRow.__table__, SessionRow.id == table.c.session_pk)
            .where(
                SessionRow.observatory == observatory, SessionRow.session_id == session_id, *where
            )
            .order_by(*order_by)
        )
        with self._read() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def frame_rows(self, observatory: str, session_id: str) -> list[dict[str, Any]]:
        """Frames of a session as dicts (``frame_stem`` + `FRAME_FIELDS` + timestamps), by stem."""
        t = FrameRow.__table__
        return self._session_children(t, observatory, session_id, order_by=[t.c.frame_stem])

    def stage_runs(
        self,
        observatory: str,
        session_id: str,
        *,
        stage: str | None = None,
        frame_stem: str | None = None,
    ) -> list[dict[str, Any]]:
        """Stage runs of a session as dicts, in the order they were recorded.

        ``stage`` and ``frame_stem`` filter when given.
        """
        t = StageRunRow.__table__
        where = []
        if stage is not None:
            where.append(t.c.stage == stage)
        if frame_stem is not None:
            where.append(t.c.frame_stem == frame_stem)
        return self._session_children(t, observatory, session_id, *where, order_by=[t.c.id])

    def masters(self, observatory: str, session_id: str) -> list[dict[str, Any]]:
        """Calibration masters used by a session as dicts, by kind."""
        t = MasterRow.__table__
        return self._session_children(t, observatory, session_id, order_by=[t.c.kind])

    # ---- objects and their photometry (light curves) ------------------------------------------

    def upsert_objects(self, objects: list[Mapping[str, Any]]) -> dict[str, int]:
        """
        Insert or update sky objects keyed by ``key``; return ``{key: primary key}``.

        Parameters
        ----------
        objects : list of mapping
            ``key``, ``name``, ``kind`` (``'target'`` or ``'source'``), ``ra_deg``, ``dec_deg``,
            optional ``ref_id`` and ``info`` (JSON-able: aliases, how it was resolved...). The last
            values written win (a target's position follows its latest resolution).
        """
        if not objects:
            return {}
        now = _utcnow()
        rows = []
        for o in objects:
            _check_key(o.get("key"), "object key")
            _check_choice(o.get("kind"), OBJECT_KINDS, "object kind")
            ra, dec = _finite_or_none(o.get("ra_deg")), _finite_or_none(o.get("dec_deg"))
            if ra is None or dec is None:
                msg = f"object {o['key']!r} needs a finite ra_deg and dec_deg"
                raise ValueError(msg)
            rows.append(
                {
                    "key": o["key"],
                    "name": str(o.get("name") or o["key"])[:160],
                    "kind": o["kind"],
                    "ra_deg": ra,
                    "dec_deg": dec,
                    "ref_id": o.get("ref_id"),
                    "info": json_safe(o.get("info")),
                    "created_utc": now,
                    "updated_utc": now,
                }
            )
        stmt = self._insert(ObjectRow)
        stmt = stmt.on_conflict_do_update(
            index_elements=[ObjectRow.key],
            set_={
                c: stmt.excluded[c]
                for c in ("name", "ra_deg", "dec_deg", "ref_id", "info", "updated_utc")
            },
        )
        keys = [r["key"] for r in rows]
        out: dict[str, int] = {}
        with self._write() as conn:
            conn.execute(stmt, rows)
            for i in range(0, len(keys), 500):
                q = select(ObjectRow.key, ObjectRow.id).where(ObjectRow.key.in_(keys[i : i + 500]))
                out.update({k: pk for k, pk in conn.execute(q)})
        return out

    def record_photometry(
        self,
        observatory: str,
        session_id: str,
        rows: list[Mapping[str, Any]],
        *,
        frames: Mapping[str, Mapping[str, Any]] | None = None,
        batch_rows: int = 500,
    ) -> int:
        """
        Insert or update the photometry of objects in the frames of one session.

        Parameters
        ----------
        observatory, session_id : str
            The session (recorded with `upsert_session`).
        rows : list of mapping
            ``object_pk`` (from `upsert_objects`), ``frame`` (frame stem) and any of
            `PHOTOMETRY_FIELDS` (``status`` required: detected, upper_limit, outside_field,
            no_wcs). NaN is stored as ``NULL``; ``by_type`` is JSON. A repeated (object, frame)
            keeps its last row.
        frames : mapping, optional
            ``{stem: {"band", "mjd_obs", "exptime_s"}}``: frames of ``rows`` the database does
            not hold yet are inserted with these values (science, status ok) in the same
            transaction; without it an unknown frame raises `ValueError`.
        batch_rows : int
            Rows per multi-row ``INSERT ... ON CONFLICT DO UPDATE`` statement.

        Returns
        -------
        n : int
            Rows written. Raises `ValueError` for an unknown session or frame.
        """
        if not rows:
            return 0
        now = _utcnow()
        t = FrameRow.__table__
        with self._write() as conn:
            session_pk = self._session_pk(conn, observatory, session_id)
            q = select(t.c.frame_stem, t.c.id).where(t.c.session_pk == session_pk)
            known = dict(conn.execute(q).all())
            missing = sorted({r["frame"] for r in rows} - set(known))
            if missing and frames is not None:
                new = []
                for stem in missing:
                    info = frames.get(stem) or {}
                    new.append(
                        {
                            "session_pk": session_pk,
                            "frame_stem": _check_key(stem, "frame_stem"),
                            "imagetyp": "science",
                            "status": "ok",
                            "band": info.get("band"),
                            "mjd_obs": _finite_or_none(info.get("mjd_obs")),
                            "exptime_s": _finite_or_none(info.get("exptime_s")),
                            "created_utc": now,
                            "updated_utc": now,
                        }
                    )
                stmt = self._insert(FrameRow).values(new)
                conn.execute(
                    stmt.on_conflict_do_nothing(index_elements=["session_pk", "frame_stem"])
                )
                known = dict(conn.execute(q).all())
            by_key: dict[tuple[int, int], dict] = {}
            for r in rows:
                unknown = set(r) - set(PHOTOMETRY_FIELDS) - {"object_pk", "frame"}
                if unknown:
                    msg = f"unknown photometry field(s) {sorted(unknown)}"
                    raise ValueError(msg)
                if r["frame"] not in known:
                    msg = f"unknown frame {r['frame']!r} of {observatory}/{session_id}"
                    raise ValueError(msg)
                v = {k: r.get(k) for k in PHOTOMETRY_FIELDS}
                _check_choice(v["status"], PHOTOMETRY_STATUSES, "photometry status")
                for k in _PHOT_FLOAT_FIELDS:
                    v[k] = _finite_or_none(v[k])
                v["by_type"] = json_safe(v["by_type"]) if v["by_type"] is not None else None
                if v["flags"] is not None and not isinstance(v["flags"], str):
                    v["flags"] = ",".join(v["flags"])[:255]
                v.update(object_pk=int(r["object_pk"]), frame_pk=known[r["frame"]])
                v["updated_utc"] = now
                by_key[(v["object_pk"], v["frame_pk"])] = v
            values = list(by_key.values())
            for i in range(0, len(values), max(1, int(batch_rows))):
                stmt = self._insert(PhotometryRow).values(values[i : i + batch_rows])
                stmt = stmt.on_conflict_do_update(
                    index_elements=[PhotometryRow.object_pk, PhotometryRow.frame_pk],
                    set_={c: stmt.excluded[c] for c in (*PHOTOMETRY_FIELDS, "updated_utc")},
                )
                conn.execute(stmt)
        log.debug(
            "results db: %d photometry rows of %s/%s recorded", len(values), observatory, session_id
        )
        return len(values)

    def find_objects(
        self,
        *,
        key: str | None = None,
        ra_deg: float | None = None,
        dec_deg: float | None = None,
        radius_arcsec: float = 2.0,
        kind: str | None = None,
    ) -> list[dict[str, Any]]:
        """
        Objects by key, or within ``radius_arcsec`` of a position (nearest first, with
        ``sep_arcsec``), or every object of ``kind``. The position search uses the
        ``(dec_deg, ra_deg)`` index.
        """
        t = ObjectRow.__table__
        stmt = select(t)
        if kind is not None:
            stmt = stmt.where(t.c.kind == _check_choice(kind, OBJECT_KINDS, "kind"))
        if key is not None:
            stmt = stmt.where(t.c.key == key)
        elif ra_deg is not None and dec_deg is not None:
            r = radius_arcsec / 3600.0
            stmt = stmt.where(t.c.dec_deg.between(dec_deg - r, dec_deg + r))
            cosd = max(math.cos(math.radians(dec_deg)), 1e-6)
            dra = min(r / cosd, 180.0)
            lo, hi = (ra_deg - dra) % 360.0, (ra_deg + dra) % 360.0
            if dra >= 180.0:
                pass
            elif lo <= hi:
                stmt = stmt.where(t.c.ra_deg.between(lo, hi))
            else:
                stmt = stmt.where((t.c.ra_deg >= lo) | (t.c.ra_deg <= hi))
        elif kind is None:
            msg = "give key, or ra_deg and dec_deg, or kind (every object of that kind)"
            raise ValueError(msg)
        with self._read() as conn:
            rows = [dict(r) for r in conn.execute(stmt).mappings()]
        if key is None and ra_deg is not None and dec_deg is not None:
            for row in rows:
                row["sep_arcsec"] = _sep_arcsec(ra_deg, dec_deg, row["ra_deg"], row["dec_deg"])
            rows = sorted(
                (r for r in rows if r["sep_arcsec"] <= radius_arcsec),
                key=lambda r: r["sep_arcsec"],
            )
        return rows

    def photometry_rows(
        self,
        object_pks: list[int],
        *,
        observatory: str | None = None,
        band: str | None = None,
        include_rejected_frames: bool = False,
        fields: tuple[str, ...] | None = None,
        columns: bool = False,
        statuses: tuple[str, ...] | None = None,
    ) -> list[dict[str, Any]] | dict[str, list]:
        """
        The photometry of objects over every session: one query, ordered by time.

        Each row has the `PHOTOMETRY_FIELDS` (or only ``fields``) plus ``object_key``,
        ``object_name``, ``frame`` (stem), ``session_id``, ``observatory``, ``night_date``,
        ``exptime_s``. Frames rejected by a later re-run are left out unless
        ``include_rejected_frames``. ``columns=True`` returns ``{name: [values]}`` instead of a
        list of row dicts (much faster for long light curves); ``statuses`` keeps only these.
        """
        p, f, s, o = (
            PhotometryRow.__table__,
            FrameRow.__table__,
            SessionRow.__table__,
            ObjectRow.__table__,
        )
        stmt = (
            select(
                *[p.c[c] for c in (fields or PHOTOMETRY_FIELDS)],
                o.c.key.label("object_key"),
                o.c.name.label("object_name"),
                f.c.frame_stem.label("frame"),
                f.c.exptime_s,
                s.c.session_id,
                s.c.observatory,
                s.c.night_date,
            )
            .select_from(p.join(o, o.c.id == p.c.object_pk).join(f, f.c.id == p.c.frame_pk))
            .join(s, s.c.id == f.c.session_pk)
            .where(p.c.object_pk.in_([int(k) for k in object_pks]))
            .order_by(p.c.mjd_mid, f.c.frame_stem)
        )
        if band is not None:
            stmt = stmt.where(p.c.band == band)
        if observatory is not None:
            stmt = stmt.where(s.c.observatory == observatory)
        if not include_rejected_frames:
            stmt = stmt.where(f.c.status == "ok")
        if statuses is not None:
            stmt = stmt.where(p.c.status.in_(list(statuses)))
        with self._read() as conn:
            result = conn.execute(stmt)
            names = list(result.keys())
            if columns:
                data = result.all()
                cols = list(zip(*data)) if data else [() for _ in names]
                return {n: list(c) for n, c in zip(names, cols)}
            return [dict(zip(names, r)) for r in result]


def _sep_arcsec(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    r1, d1, r2, d2 = (math.radians(v) for v in (ra1, dec1, ra2, dec2))
    h = math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((r2 - r1) / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h)))) * 3600.0


# --------------------------------------------------------------------------------------------
# Observers' decisions and the dashboard's frame index (issue 15)
# --------------------------------------------------------------------------------------------

DECISIONS = ("validated", "withdrawn")
#: ``frame_stem`` of a decision about a whole session.
SESSION_WIDE = "*"


class DecisionRow(Base):
    """An observer's decision on a frame (or, with ``frame_stem='*'``, a whole session).

    One row per (observatory, session, frame), upserted: the current decision with who, when and
    why. Every decision is also appended to ``rpp_decision_log``.
    """

    __tablename__ = "rpp_decision"
    __table_args__ = (
        UniqueConstraint("observatory", "session_id", "frame_stem", name="uq_rpp_decision_key"),
        CheckConstraint(_in("decision", DECISIONS), name="ck_rpp_decision_decision"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    observatory: Mapped[str] = mapped_column(String(64))
    session_id: Mapped[str] = mapped_column(String(128))
    frame_stem: Mapped[str] = mapped_column(String(255))
    decision: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    decided_by: Mapped[str] = mapped_column(String(128))
    decided_utc: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class DecisionLogRow(Base):
    """Append-only history of `DecisionRow` writes."""

    __tablename__ = "rpp_decision_log"
    __table_args__ = (Index("ix_rpp_decision_log_key", "observatory", "session_id", "frame_stem"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    observatory: Mapped[str] = mapped_column(String(64))
    session_id: Mapped[str] = mapped_column(String(128))
    frame_stem: Mapped[str] = mapped_column(String(255))
    decision: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    decided_by: Mapped[str] = mapped_column(String(128))
    decided_utc: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class FrameIndexRow(Base):
    """The dashboard's search index: one row per science frame of every reduced session
    (filled from ``session_summary.json`` by `rpp_tasks.outputs.dashboard.index`)."""

    __tablename__ = "rpp_frame_index"
    __table_args__ = (
        UniqueConstraint("observatory", "session_id", "frame_stem", name="uq_rpp_frame_index_key"),
        Index("ix_rpp_frame_index_pos", "dec_deg", "ra_deg"),
        Index("ix_rpp_frame_index_mjd", "mjd_obs"),
        Index("ix_rpp_frame_index_object", "object_key"),
        Index("ix_rpp_frame_index_night", "night_date"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    observatory: Mapped[str] = mapped_column(String(64))
    session_id: Mapped[str] = mapped_column(String(128))
    frame_stem: Mapped[str] = mapped_column(String(255))
    night_date: Mapped[str | None] = mapped_column(String(10))
    object_name: Mapped[str | None] = mapped_column(String(160))
    object_key: Mapped[str | None] = mapped_column(String(160))
    band: Mapped[str | None] = mapped_column(String(32))
    mjd_obs: Mapped[float | None] = mapped_column(Double)
    date_obs: Mapped[str | None] = mapped_column(String(32))
    exptime_s: Mapped[float | None] = mapped_column(Double)
    ra_deg: Mapped[float | None] = mapped_column(Double)
    dec_deg: Mapped[float | None] = mapped_column(Double)
    status: Mapped[str] = mapped_column(String(16))
    fwhm_arcsec: Mapped[float | None] = mapped_column(Double)
    zp_mag: Mapped[float | None] = mapped_column(Double)
    limiting_mag: Mapped[float | None] = mapped_column(Double)
    summary_mtime: Mapped[float | None] = mapped_column(Double)  # of session_summary.json
    indexed_utc: Mapped[dt.datetime] = mapped_column(UTCDateTime)


FRAME_INDEX_FIELDS = tuple(
    c.name
    for c in FrameIndexRow.__table__.columns
    if c.name not in {"id", "observatory", "session_id", "frame_stem", "indexed_utc"}
)


_INDEX_FLOAT_FIELDS = frozenset(
    c.name for c in FrameIndexRow.__table__.columns if isinstance(c.type, Double)
)


def record_decision(
    rdb: ResultsDB,
    observatory: str,
    session_id: str,
    frame_stems: list[str],
    decision: str,
    *,
    by: str,
    reason: str | None = None,
    when: dt.datetime | None = None,
) -> dt.datetime:
    """Upsert the decision on each frame (``'*'``: the session) and append it to the log, in one
    transaction. Returns the decision time (aware UTC)."""
    _check_key(observatory, "observatory")
    _check_key(session_id, "session_id")
    _check_choice(decision, DECISIONS, "decision")
    _check_key(by, "decided_by")
    when = _check_aware(when, "when") or _utcnow()
    rows = [
        {
            "observatory": observatory,
            "session_id": session_id,
            "frame_stem": _check_key(stem, "frame_stem"),
            "decision": decision,
            "reason": (reason or None) and str(reason)[:2000],
            "decided_by": str(by)[:128],
            "decided_utc": when,
        }
        for stem in dict.fromkeys(frame_stems)
    ]
    if not rows:
        return when
    stmt = rdb._insert(DecisionRow)
    stmt = stmt.on_conflict_do_update(
        index_elements=[DecisionRow.observatory, DecisionRow.session_id, DecisionRow.frame_stem],
        set_={c: stmt.excluded[c] for c in ("decision", "reason", "decided_by", "decided_utc")},
    )
    with rdb._write() as conn:
        conn.execute(stmt, rows)
        conn.execute(rdb._insert(DecisionLogRow), rows)
    return when


def decisions(
    rdb: ResultsDB, observatory: str, session_id: str, *, history: bool = False
) -> list[dict[str, Any]]:
    """Current decisions of a session (``history=True``: every decision, oldest first)."""
    t = (DecisionLogRow if history else DecisionRow).__table__
    stmt = (
        select(*[c for c in t.columns if c.name != "id"])
        .where(t.c.observatory == observatory, t.c.session_id == session_id)
        .order_by(t.c.id if history else t.c.frame_stem)
    )
    with rdb._read() as conn:
        return [dict(r) for r in conn.execute(stmt).mappings()]


def upsert_frame_index(
    rdb: ResultsDB, observatory: str, session_id: str, frames: list[Mapping[str, Any]]
) -> int:
    """Insert or update the search-index rows of a session's frames (``frame_stem`` + any of
    `FRAME_INDEX_FIELDS`); frames of the session no longer listed are removed."""
    now = _utcnow()
    rows = []
    for f in frames:
        v = {k: f.get(k) for k in FRAME_INDEX_FIELDS}
        for k in _INDEX_FLOAT_FIELDS:
            v[k] = _finite_or_none(v[k])
        rows.append(
            {
                **v,
                "observatory": observatory,
                "session_id": session_id,
                "frame_stem": _check_key(f.get("frame_stem"), "frame_stem"),
                "indexed_utc": now,
            }
        )
    t = FrameIndexRow.__table__
    with rdb._write() as conn:
        stems = [r["frame_stem"] for r in rows]
        conn.execute(
            t.delete().where(
                t.c.observatory == observatory,
                t.c.session_id == session_id,
                *([t.c.frame_stem.not_in(stems)] if stems else []),
            )
        )
        for i in range(0, len(rows), 500):
            stmt = rdb._insert(FrameIndexRow).values(rows[i : i + 500])
            stmt = stmt.on_conflict_do_update(
                index_elements=[
                    FrameIndexRow.observatory,
                    FrameIndexRow.session_id,
                    FrameIndexRow.frame_stem,
                ],
                set_={c: stmt.excluded[c] for c in (*FRAME_INDEX_FIELDS, "indexed_utc")},
            )
            conn.execute(stmt)
    return len(rows)
