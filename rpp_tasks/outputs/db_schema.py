"""The results database's tables (SQLAlchemy 2.x declarative), column types and value checks.

rpp_session, rpp_frame, rpp_stage_run, rpp_master, rpp_object and rpp_photometry, with their
allowed values (CHECK constraints), natural-key unique constraints and indexes; UTCDateTime stores
aware datetimes as UTC on SQLite and PostgreSQL alike; the value helpers turn NaN into NULL and
refuse naive datetimes and unknown choices. The class that reads and writes them is
rpp_tasks.outputs.db.ResultsDB.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from rpp_tasks.jsonsafe import dumps

SESSION_STATUSES = ("pending", "running", "done", "failed")
FRAME_STATUSES = ("ok", "rejected")
STAGE_RUN_STATUSES = ("running", "success", "failed", "rejected", "skipped")
FRAME_TYPES = ("bias", "dark", "flat", "science", "unknown")
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
