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

Rooms: the tables and value checks are `rpp_tasks.outputs.db_schema`; objects and their
photometry (light curves) are the `rpp_tasks.outputs.db_targets.TargetRows` part of `ResultsDB`;
the observers' decisions and the dashboard's index are `rpp_tasks.outputs.db_decisions`.

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
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite

from rpp_tasks.exceptions import ConfigError
from rpp_tasks.jsonsafe import json_safe
from rpp_tasks.outputs.db_schema import (
    _FRAME_FLOAT_FIELDS,
    _SESSION_N_COLUMNS,
    FRAME_FIELDS,
    FRAME_STATUSES,
    FRAME_TYPES,
    OBJECT_KINDS,
    PHOTOMETRY_FIELDS,
    PHOTOMETRY_STATUSES,
    SESSION_STATUSES,
    STAGE_RUN_STATUSES,
    Base,
    FrameRow,
    MasterRow,
    SessionRow,
    StageRunRow,
    _as_date,
    _check_aware,
    _check_choice,
    _check_key,
    _finite_or_none,
    _json_dumps,
    _session_dict,
    _utcnow,
)
from rpp_tasks.outputs.db_targets import TargetRows
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
    "default_results_url",
    "file_sha256",
    "results_url_from_env",
]

log = logging.getLogger(__name__)

RESULTS_URL_ENV = "RPP_RESULTS_DB_URL"
RESULTS_FILENAME = "rpp_results.sqlite"


# Arbitrary constant key of the PostgreSQL advisory lock that serialises create_schema().
_PG_SCHEMA_LOCK_KEY = 0x52505044  # "RPPD"


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
# ResultsDB
# --------------------------------------------------------------------------------------------


class ResultsDB(TargetRows):
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
        from rpp_tasks.outputs import db_decisions  # noqa: F401  (registers its tables on Base)

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
