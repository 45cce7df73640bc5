"""ObsCore archive in a real PostgreSQL with pgsphere (no DaCHS needed).

Uses a throw-away database ``rpp_archive_test`` on ``RPP_TEST_PG_ADMIN_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``), creates ``pg_sphere`` in it and the table with
`create_obscore_table` (the same DDL DaCHS makes from archive/dachs/q.rd). Skips with the reason
when PostgreSQL is not reachable or pgsphere is not installed
(``apt-get install postgresql-15-pgsphere``, see archive/dachs/setup_dachs.sh for the PG >= 15.19
work-around).
"""

from __future__ import annotations

import os

import pytest

from rpp_tasks.outputs.archive import (
    covering_query,
    polygon_contains,
    read_product_header,
    to_obscore_row,
    upsert_obscore,
)
from tests.pgdb import obscore_database

pytestmark = [pytest.mark.integration, pytest.mark.realdata]

ADMIN_URL = os.environ.get("RPP_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DB = "rpp_archive_test"
HUNTSMAN = "huntsman/raw/science_0.fits"
SPECTRUM = "spectra/ciboulette_sa200/Pn_R_hd8538_20231008_836.fits"
COMMON = dict(obs_collection="rpp-test/pg", publisher_authority="rpp.example.org")


@pytest.fixture(scope="module")
def pg_url():
    with obscore_database(DB) as url:
        yield url


def _count(url, where="true"):
    import sqlalchemy

    eng = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg2://"))
    with eng.connect() as conn:
        n = conn.execute(sqlalchemy.text(f"SELECT count(*) FROM rpp.main WHERE {where}")).scalar()
    eng.dispose()
    return n


def test_upsert_reupsert_and_spatial_query(pg_url, real_data):
    path = real_data / HUNTSMAN
    header = read_product_header(path)
    row = to_obscore_row(
        header,
        product_path=path,
        access_url="https://a.example.org/h.fits",
        fwhm_arcsec=2.7,
        session_id="huntsman/2021-01-18",
        **COMMON,
    )
    first = upsert_obscore([row], pg_url)
    assert (first.n_inserted, first.n_updated, first.dialect) == (1, 0, "postgresql")

    again = to_obscore_row(
        header,
        product_path=path,
        access_url="https://a.example.org/h.fits",
        fwhm_arcsec=3.1,
        session_id="huntsman/2021-01-18-rerun",
        **COMMON,
    )
    second = upsert_obscore(again, pg_url)
    assert (second.n_inserted, second.n_updated) == (0, 1)
    assert _count(pg_url) == 1

    # the stored spoly is the footprint: pgsphere agrees with our own polygon test
    assert _count(pg_url, "s_region @> spoint(radians(65.1621), radians(-54.9358))") == 1
    assert _count(pg_url, "npoints(s_region) = 16") == 1

    inside = covering_query(pg_url, 65.1621, -54.9358)
    assert [r["obs_publisher_did"] for r in inside] == [row.obs_publisher_did]
    hit = inside[0]
    assert hit["s_resolution"] == pytest.approx(3.1) and hit["rpp_session"].endswith("-rerun")
    assert hit["t_min"] == pytest.approx(row.t_min, abs=1e-9)
    assert hit["em_min"] == pytest.approx(378e-9) and hit["access_estsize"] == 1275
    # spoly round trip (radians text output -> DALI degrees) keeps the vertices to < 1 mas
    got = [float(v) for v in hit["s_region"].split()]
    want = [float(v) for v in row.s_region.split()]
    assert max(abs(a - b) for a, b in zip(got, want)) < 3e-7

    # a point outside the footprint does not find it; a circle reaching the footprint does
    assert polygon_contains(row.s_region, 65.1621, -54.6) is False
    assert covering_query(pg_url, 65.1621, -54.6) == []  # outside (0.34 deg N)
    assert covering_query(pg_url, 120.0, 30.0) == []  # far away
    assert len(covering_query(pg_url, 65.1621, -54.6, radius_deg=0.2)) == 1
    assert covering_query(pg_url, 65.1621, -54.9358, dataproduct_type="spectrum") == []


def test_frame_without_wcs_and_spectrum_rows(pg_url, real_data):
    no_wcs = real_data / "saao_1m/a8280271.fits"
    r1 = to_obscore_row(
        read_product_header(no_wcs),
        product_path=no_wcs,
        access_url="https://a.example.org/saao.fits",
        **COMMON,
    )
    spec = real_data / SPECTRUM
    r2 = to_obscore_row(
        read_product_header(spec),
        product_path=spec,
        access_url="https://a.example.org/spec.fits",
        ra_deg=21.454,
        dec_deg=60.2353,
        aperture_arcsec=10.0,
        **COMMON,
    )
    res = upsert_obscore([r1, r2], pg_url)
    assert res.n_inserted == 2
    assert _count(pg_url, f"obs_id = '{r1.obs_id}' AND s_region IS NULL AND s_ra IS NOT NULL") == 1
    assert covering_query(pg_url, r1.s_ra, r1.s_dec) == []  # no footprint: not found
    found = covering_query(pg_url, 21.454, 60.2353)
    assert [r["dataproduct_type"] for r in found] == ["spectrum"]
    assert found[0]["em_xel"] == 560 and found[0]["em_res_power"] == pytest.approx(200.0)
