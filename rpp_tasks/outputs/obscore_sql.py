"""The ObsCore table in SQL: its DDL, insert-or-update of rows, and the coverage query.

create_obscore_table creates the table (and its indexes) on PostgreSQL (the schema DaCHS
publishes, rpp.main) or SQLite (rpp_main); upsert_obscore inserts or updates rows keyed by
obs_publisher_did, as BANZAI's add_or_update_record does; covering_query answers which rows
cover a position. The rows themselves are built by rpp_tasks.outputs.archive.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass

import numpy as np

from rpp_tasks.exceptions import RppError
from rpp_tasks.outputs.footprint import (
    dali_to_spoly,
    polygon_contains,
    spoly_to_dali,
)
from rpp_tasks.outputs.obscore import (
    OBSCORE_COLUMNS,
    ObsCoreRow,
)

__all__ = [
    "DEFAULT_TABLE",
    "UpsertResult",
    "create_obscore_table",
    "upsert_obscore",
    "covering_query",
]

log = logging.getLogger(__name__)

#: Default table: the one declared by ``archive/dachs/q.rd`` (schema ``rpp``). In SQLite the dot
#: becomes an underscore (``rpp_main``).
DEFAULT_TABLE = "rpp.main"

# SQL types: PostgreSQL as DaCHS 2.7 declares them (obscore.rd), SQLite affinities.
_PG_TYPES = {
    "calib_level": "smallint NOT NULL",
    "access_estsize": "bigint",
    "s_ra": "double precision",
    "s_dec": "double precision",
    "s_fov": "double precision",
    "s_region": "spoly",
    "s_resolution": "double precision",
    "t_min": "double precision",
    "t_max": "double precision",
    "t_exptime": "real",
    "t_resolution": "real",
    "em_min": "double precision",
    "em_max": "double precision",
    "em_res_power": "double precision",
    "s_xel1": "bigint",
    "s_xel2": "bigint",
    "t_xel": "bigint",
    "em_xel": "bigint",
    "pol_xel": "bigint",
    "s_pixel_scale": "double precision",
}
_INT_COLUMNS = {"calib_level", "access_estsize", "s_xel1", "s_xel2", "t_xel", "em_xel", "pol_xel"}


# ---------------------------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpsertResult:
    """Outcome of `upsert_obscore`."""

    table: str
    dialect: str
    n_inserted: int
    n_updated: int
    dids: tuple[str, ...]

    def to_dict(self) -> dict:
        """JSON-safe dictionary."""
        return {**asdict(self), "dids": list(self.dids)}


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


def _engine(url):
    """One-shot engine (no pool) for a URL: `rpp_tasks.outputs.sql.make_engine`."""
    from rpp_tasks.outputs.sql import make_engine

    return make_engine(url, one_shot=True)


def _table_name(table, dialect) -> str:
    if not _IDENT.match(str(table)):
        msg = f"invalid table name {table!r} (expected [schema.]name)"
        raise ValueError(msg)
    return table.replace(".", "_") if dialect == "sqlite" else table


def _ddl(table, dialect) -> list[str]:
    name = _table_name(table, dialect)
    if dialect == "sqlite":
        cols = []
        for c in OBSCORE_COLUMNS:
            sql_type = (
                "INTEGER"
                if c in _INT_COLUMNS
                else ("REAL" if _PG_TYPES.get(c, "").startswith(("double", "real")) else "TEXT")
            )
            extra = (
                " NOT NULL"
                if c in ("calib_level", "obs_collection", "obs_id", "obs_publisher_did")
                else ""
            )
            cols.append(f"{c} {sql_type}{extra}")
        cols.append("PRIMARY KEY (obs_publisher_did)")
        base = name
        return [
            f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(cols)})",
            f"CREATE INDEX IF NOT EXISTS {base}_pos ON {name} (s_dec, s_ra)",
            f"CREATE INDEX IF NOT EXISTS {base}_tmin ON {name} (t_min)",
            f"CREATE INDEX IF NOT EXISTS {base}_session ON {name} (rpp_session)",
        ]
    cols = [f"{c} {_PG_TYPES.get(c, 'text')}" for c in OBSCORE_COLUMNS]
    cols.append("source_table text")
    cols.append("PRIMARY KEY (obs_publisher_did)")
    base = name.replace(".", "_")
    stmts = []
    if "." in name:
        stmts.append(f"CREATE SCHEMA IF NOT EXISTS {name.split('.')[0]}")
    stmts += [
        f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(cols)})",
        f"CREATE INDEX IF NOT EXISTS {base}_s_region ON {name} USING gist (s_region)",
        f"CREATE INDEX IF NOT EXISTS {base}_t_min ON {name} (t_min)",
    ]
    return stmts


def create_obscore_table(url, *, table=DEFAULT_TABLE) -> str:
    """
    Create the ObsCore-shaped table if it does not exist (SQLite, or PostgreSQL without DaCHS).

    With DaCHS, do **not** call this: DaCHS creates ``rpp.main`` from ``archive/dachs/q.rd`` and
    the pipeline role has no DDL rights. For a plain PostgreSQL the ``pg_sphere`` extension must be
    installed in the database (``CREATE EXTENSION pg_sphere``).

    Returns
    -------
    name : str
        The table name as created (``rpp_main`` in SQLite).
    """
    from sqlalchemy import text

    engine = _engine(url)
    dialect = engine.dialect.name
    try:
        with engine.begin() as conn:
            for stmt in _ddl(table, dialect):
                conn.execute(text(stmt))
    finally:
        engine.dispose()
    return _table_name(table, dialect)


def _row_params(row: ObsCoreRow) -> dict:
    params = row.to_dict()
    for key, value in params.items():
        if isinstance(value, np.generic):
            params[key] = value.item()
        if isinstance(params[key], float) and not math.isfinite(params[key]):
            params[key] = None
    return params


def upsert_obscore(rows, url, *, table=DEFAULT_TABLE) -> UpsertResult:
    """
    Insert or update ObsCore rows, keyed by ``obs_publisher_did`` (idempotent).

    Runs ``INSERT ... ON CONFLICT (obs_publisher_did) DO UPDATE SET <every column>`` in one
    transaction: re-processing a frame updates its row and never duplicates it.

    Parameters
    ----------
    rows : `ObsCoreRow` or iterable of `ObsCoreRow`
    url : str
        SQLAlchemy URL: ``postgresql://rpp_pipeline@127.0.0.1:5432/gavo`` (also ``postgres://``
        Airflow URIs), or ``sqlite:///path/archive.db`` (a bare file path works too).
    table : str, optional
        ``[schema.]name``; default ``rpp.main`` (``rpp_main`` in SQLite). In PostgreSQL
        ``s_region`` is written as ``CAST(:s_region AS spoly)`` (pgsphere); in SQLite as the DALI
        polygon string. The table must exist (DaCHS or `create_obscore_table`).

    Returns
    -------
    result : `UpsertResult`
    """
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError, ProgrammingError

    if isinstance(rows, ObsCoreRow):
        rows = [rows]
    rows = list(rows)
    engine = _engine(url)
    dialect = engine.dialect.name
    name = _table_name(table, dialect)
    cols = list(OBSCORE_COLUMNS)
    values = []
    for c in cols:
        if c == "s_region" and dialect == "postgresql":
            values.append("CAST(:s_region_spoly AS spoly)")
        else:
            values.append(f":{c}")
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c != "obs_publisher_did")
    sql = (
        f"INSERT INTO {name} ({', '.join(cols)}) VALUES ({', '.join(values)}) "
        f"ON CONFLICT (obs_publisher_did) DO UPDATE SET {updates}"
    )
    if dialect == "postgresql":
        sql += " RETURNING (xmax = 0) AS inserted"
    n_ins = n_upd = 0
    try:
        with engine.begin() as conn:
            for row in rows:
                params = _row_params(row)
                if dialect == "postgresql":
                    params["s_region_spoly"] = dali_to_spoly(params.pop("s_region"))
                    inserted = bool(conn.execute(text(sql), params).scalar_one())
                else:
                    exists = (
                        conn.execute(
                            text(f"SELECT 1 FROM {name} WHERE obs_publisher_did = :d"),
                            {"d": row.obs_publisher_did},
                        ).first()
                        is not None
                    )
                    conn.execute(text(sql), params)
                    inserted = not exists
                n_ins += inserted
                n_upd += not inserted
    except (ProgrammingError, OperationalError) as exc:
        cause = exc.orig if hasattr(exc, "orig") else exc
        msg = f"archive: upsert into {name} ({dialect}) failed: {cause}"
        raise RppError(msg) from exc
    finally:
        engine.dispose()
    log.info("archive: %s: %d inserted, %d updated", name, n_ins, n_upd)
    return UpsertResult(
        table=name,
        dialect=dialect,
        n_inserted=n_ins,
        n_updated=n_upd,
        dids=tuple(r.obs_publisher_did for r in rows),
    )


def covering_query(
    url, ra_deg, dec_deg, *, table=DEFAULT_TABLE, radius_deg=0.0, dataproduct_type=None
) -> list[dict]:
    """
    Rows whose footprint contains a position (or intersects a circle): "which sessions cover it".

    PostgreSQL: ``s_region @> spoint(...)`` / ``s_region && scircle(...)`` (GiST-indexed).
    SQLite: a declination-band pre-filter, then the exact spherical test of `polygon_contains`.
    Rows without a footprint are never returned.

    Parameters
    ----------
    url : str
        Database URL (see `upsert_obscore`).
    ra_deg, dec_deg : float
        ICRS position in degrees.
    table : str, optional
    radius_deg : float, optional
        Search radius; 0 means "footprint contains the point".
    dataproduct_type : str, optional
        Only rows of this type (e.g. ``"image"``).

    Returns
    -------
    rows : list of dict
        Column name -> value, ``s_region`` as a DALI polygon string, sorted by ``t_min``.
        Group by ``rpp_session`` for sessions.
    """
    from sqlalchemy import text

    ra_deg, dec_deg, radius_deg = float(ra_deg), float(dec_deg), float(radius_deg)
    if not -90.0 <= dec_deg <= 90.0:
        msg = f"dec_deg must be in [-90, 90], got {dec_deg}"
        raise ValueError(msg)
    engine = _engine(url)
    dialect = engine.dialect.name
    name = _table_name(table, dialect)
    cols = ", ".join(OBSCORE_COLUMNS)
    params = {"ra": ra_deg % 360.0, "dec": dec_deg, "r": radius_deg, "t": dataproduct_type}
    type_clause = " AND dataproduct_type = :t" if dataproduct_type else ""
    try:
        with engine.connect() as conn:
            if dialect == "postgresql":
                geom = (
                    "scircle(spoint(radians(:ra), radians(:dec)), radians(:r)) && s_region"
                    if radius_deg > 0
                    else "s_region @> spoint(radians(:ra), radians(:dec))"
                )
                result = conn.execute(
                    text(
                        f"SELECT {cols} FROM {name} WHERE {geom}{type_clause} "
                        "ORDER BY t_min, obs_publisher_did"
                    ),
                    params,
                )
                rows = [dict(r._mapping) for r in result]
                for r in rows:
                    r["s_region"] = spoly_to_dali(r["s_region"])
            else:
                # any footprint covering the point has its centre within fov/2 (+ r) of it
                result = conn.execute(
                    text(
                        f"SELECT {cols} FROM {name} WHERE s_region IS NOT NULL{type_clause} "
                        "AND s_dec BETWEEN :dec - s_fov - :r AND :dec + s_fov + :r "
                        "ORDER BY t_min, obs_publisher_did"
                    ),
                    params,
                )
                rows = [
                    dict(r._mapping)
                    for r in result
                    if polygon_contains(r.s_region, ra_deg, dec_deg, radius_deg=radius_deg)
                ]
    finally:
        engine.dispose()
    return rows
