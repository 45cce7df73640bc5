"""A throw-away PostgreSQL database with pgsphere and the ObsCore table, for the tests that write
the archive for real (``RPP_TEST_PG_ADMIN_URL``, default the local server with trust auth).

The test is skipped with the reason when PostgreSQL is not reachable or pgsphere is not installed
(``apt-get install postgresql-15-pgsphere``; archive/dachs/setup_dachs.sh has the PG >= 15.19
work-around).
"""

from __future__ import annotations

import contextlib
import os

import pytest

ADMIN_URL = os.environ.get("RPP_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _engine(url, **kw):
    import sqlalchemy as sa

    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://"), **kw)


@contextlib.contextmanager
def obscore_database(name: str, *, admin_url: str = ADMIN_URL):
    """Create database ``name`` (dropped first if left over), with pg_sphere and the ObsCore
    table of `create_obscore_table`; yield its URL; drop it at the end."""
    sa = pytest.importorskip("sqlalchemy")
    from rpp_tasks.outputs.archive import create_obscore_table

    admin = _engine(admin_url, isolation_level="AUTOCOMMIT")
    drop = sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    try:
        with admin.connect() as conn:
            conn.execute(drop)
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {admin_url}: {exc.orig}")
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        eng = _engine(url)
        try:
            with eng.begin() as conn:
                conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_sphere"))
        except sa.exc.DBAPIError as exc:
            pytest.skip(
                f"pgsphere unavailable in PostgreSQL ({exc.orig}); "
                "install postgresql-15-pgsphere (archive/dachs/setup_dachs.sh)"
            )
        finally:
            eng.dispose()
        create_obscore_table(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(drop)
        admin.dispose()
