"""Observers' decisions and the dashboard's frame index, in the results database.

rpp_decision holds the current decision per frame (or, with frame_stem '*', per session):
validated or withdrawn, with who, when and why, upserted; rpp_decision_log keeps every decision
(append-only); rpp_frame_index is the dashboard's search index, synced from session summaries.
The tables are registered on the same declarative Base as the others (rpp_tasks.outputs.db_schema)
so ResultsDB.create_schema creates them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    CheckConstraint,
    Double,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    select,
)
from sqlalchemy.orm import Mapped, mapped_column

from rpp_tasks.outputs.db_schema import (
    Base,
    UTCDateTime,
    _check_aware,
    _check_choice,
    _check_key,
    _finite_or_none,
    _in,
    _utcnow,
)

if TYPE_CHECKING:
    from rpp_tasks.outputs.db import ResultsDB

__all__ = [
    "DECISIONS",
    "SESSION_WIDE",
    "DecisionRow",
    "DecisionLogRow",
    "FrameIndexRow",
    "FRAME_INDEX_FIELDS",
    "record_decision",
    "decisions",
    "upsert_frame_index",
]


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
