"""End to end against the real GAVO DaCHS 2.7: RD imported, archive task, TAP and SIAP2 via pyvo.

Needs ``archive/dachs/setup_dachs.sh`` (DaCHS installed, ``rpp/q`` imported, role
``rpp_pipeline``, server on ``RPP_DACHS_URL``, default http://localhost:8089). ``.ci/run`` runs
that script before pytest; if DaCHS is installed but its server is down, this module runs the
script itself (``RPP_DACHS_NO_INSTALL=1``: no apt) when it runs as root. Skips only when DaCHS is
not installed; a broken installation fails.

Rows of this module use the collection ``rpp-ci-test`` and are deleted (as the PostgreSQL admin:
the pipeline role has no DELETE right) before and after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest

from rpp_tasks.exceptions import RppError
from rpp_tasks.outputs.archive import (
    read_product_header,
    run_archive,
    to_obscore_row,
    upsert_obscore,
)
from rpp_tasks.outputs.obscore import OBSCORE_MANDATORY as MANDATORY

pytestmark = [pytest.mark.integration, pytest.mark.realdata]

REPO = Path(__file__).resolve().parents[2]
DACHS_URL = os.environ.get("RPP_DACHS_URL", "http://localhost:8089").rstrip("/")
PIPELINE_URL = os.environ.get(
    "RPP_DACHS_PIPELINE_URL",
    f"postgresql://rpp_pipeline:{os.environ.get('RPP_PIPELINE_PASSWORD', 'rpp-pipeline-dev')}"
    "@127.0.0.1:5432/gavo",
)
ADMIN_URL = os.environ.get("RPP_DACHS_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/gavo")
COLLECTION = "rpp-ci-test"
AUTH = "rpp.example.org"
HUNTSMAN = "huntsman/raw/science_0.fits"
SPECTRUM = "spectra/ciboulette_sa200/Pn_R_hd8538_20231008_836.fits"
PROJECT_RD = REPO / "archive/dachs/q.rd"
INSTALLED_RD = Path("/var/gavo/inputs/rpp/q.rd")  # where setup_dachs.sh imports it from
HD8538 = (21.4540, 60.2353)  # delta Cas, the spectrum's target (the header has no position)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # loopback only
            return resp.status == 200
    except OSError:
        return False


def _admin_sql(sql: str, **params):
    import sqlalchemy

    eng = sqlalchemy.create_engine(ADMIN_URL.replace("postgresql://", "postgresql+psycopg2://"))
    try:
        with eng.begin() as conn:
            return (
                conn.execute(sqlalchemy.text(sql), params).fetchall()
                if sql.lstrip().upper().startswith("SELECT")
                else conn.execute(sqlalchemy.text(sql), params).rowcount
            )
    finally:
        eng.dispose()


@pytest.fixture(scope="module")
def dachs():
    if shutil.which("dachs") is None:
        pytest.skip(
            "GAVO DaCHS is not installed (Debian package gavodachs2-server): "
            "run 'sudo archive/dachs/setup_dachs.sh' on Debian bookworm"
        )
    if not _answers(DACHS_URL + "/"):
        if os.geteuid() != 0:
            pytest.fail(
                f"DaCHS installed but not answering at {DACHS_URL}; "
                "run 'sudo archive/dachs/setup_dachs.sh'"
            )
        proc = subprocess.run(
            [str(REPO / "archive/dachs/setup_dachs.sh")],
            capture_output=True,
            text=True,
            env={**os.environ, "RPP_DACHS_NO_INSTALL": "1"},
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert _answers(DACHS_URL + "/"), f"DaCHS still not answering at {DACHS_URL}"
    # the tests must run against the project's RD, not an older copy imported earlier
    if INSTALLED_RD.read_bytes() != PROJECT_RD.read_bytes():
        if os.geteuid() != 0:
            pytest.fail(
                f"{INSTALLED_RD} differs from {PROJECT_RD}; "
                "run 'sudo archive/dachs/setup_dachs.sh' (re-imports the RD)"
            )
        proc = subprocess.run(
            [str(REPO / "archive/dachs/setup_dachs.sh")],
            capture_output=True,
            text=True,
            env={**os.environ, "RPP_DACHS_NO_INSTALL": "1"},
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert INSTALLED_RD.read_bytes() == PROJECT_RD.read_bytes()
    # DaCHS imported it: rpp.main is a participant of the ivoa.obscore view
    assert _admin_sql(
        "SELECT tablename FROM ivoa._obscoresources WHERE tablename = 'rpp.main'"
    ) == [("rpp.main",)]
    _admin_sql("DELETE FROM rpp.main WHERE obs_collection = :c", c=COLLECTION)
    yield DACHS_URL
    _admin_sql("DELETE FROM rpp.main WHERE obs_collection = :c", c=COLLECTION)


@pytest.fixture(scope="module")
def archived(dachs, real_data):
    """Run the archive task twice (re-processing) for one image and one spectrum."""
    products = [
        {"product_path": str(real_data / HUNTSMAN), "fwhm_arcsec": 2.9},
        {
            "product_path": str(real_data / SPECTRUM),
            "ra_deg": HD8538[0],
            "dec_deg": HD8538[1],
            "aperture_arcsec": 12.0,
        },
    ]
    kwargs = dict(
        url=PIPELINE_URL,
        obs_collection=COLLECTION,
        publisher_authority=AUTH,
        access_url_base="http://localhost:8089/rpp-products",
        products_root=real_data,
        facility_name="Huntsman",
    )
    first = run_archive(products, session_id="ci/first", **kwargs)
    products[0]["fwhm_arcsec"] = 3.2
    second = run_archive(products, session_id="ci/second", **kwargs)
    return first, second


def _tap(dachs):
    import pyvo

    return pyvo.dal.TAPService(dachs + "/tap")


def test_archive_task_upserts_as_pipeline_role(archived):
    first, second = archived
    assert first["dialect"] == "postgresql" and first["table"] == "rpp.main"
    assert (first["n_inserted"], first["n_updated"]) == (2, 0)
    assert (second["n_inserted"], second["n_updated"]) == (0, 2)
    rows = _admin_sql(
        "SELECT count(*), count(DISTINCT obs_publisher_did) FROM rpp.main "
        "WHERE obs_collection = :c",
        c=COLLECTION,
    )
    assert tuple(rows[0]) == (2, 2)


def test_pipeline_role_is_least_privilege(dachs, archived):
    import sqlalchemy

    eng = sqlalchemy.create_engine(PIPELINE_URL.replace("postgresql://", "postgresql+psycopg2://"))
    try:
        for sql in (
            f"DELETE FROM rpp.main WHERE obs_collection = '{COLLECTION}'",
            "DROP TABLE rpp.main",
            "SELECT count(*) FROM ivoa.obscore",
        ):
            with pytest.raises(
                sqlalchemy.exc.ProgrammingError, match="permission denied|must be owner"
            ):
                with eng.begin() as conn:
                    conn.execute(sqlalchemy.text(sql))
    finally:
        eng.dispose()
    row = to_obscore_row(
        {"NAXIS": 2, "NAXIS1": 10, "NAXIS2": 10, "DATE-OBS": "2024-01-01T00:00:00"},
        access_url="http://x",
        obs_collection=COLLECTION,
        publisher_authority=AUTH,
    )
    with pytest.raises(RppError, match="permission denied"):
        upsert_obscore(row, PIPELINE_URL, table="ivoa.obscore")


def test_tap_returns_the_row_with_the_right_values(dachs, archived, real_data):
    expected = to_obscore_row(
        read_product_header(real_data / HUNTSMAN),
        product_path=real_data / HUNTSMAN,
        access_url="x",
        obs_collection=COLLECTION,
        publisher_authority=AUTH,
        facility_name="Huntsman",
        fwhm_arcsec=3.2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = (
            _tap(dachs)
            .search(
                "SELECT * FROM ivoa.obscore WHERE obs_collection = 'rpp-ci-test' "
                "AND 1 = CONTAINS(POINT('ICRS', 65.1621, -54.9358), s_region)"
            )
            .to_table()
        )
    assert len(result) == 1
    r = result[0]
    assert r["dataproduct_type"] == "image" and r["calib_level"] == 2
    assert r["obs_publisher_did"] == expected.obs_publisher_did
    assert r["obs_id"] == "371d420013090900_20210118T112632.228"
    assert r["source_table"] == "rpp.main"
    assert r["t_min"] == pytest.approx(59232.476761898, abs=1e-8)  # MJD
    assert (r["t_max"] - r["t_min"]) * 86400 == pytest.approx(300, abs=1e-3)
    assert r["em_min"] == pytest.approx(378e-9, rel=1e-6)  # metres (real)
    assert r["em_max"] == pytest.approx(555e-9, rel=1e-6)
    assert r["s_resolution"] == pytest.approx(3.2, rel=1e-6)  # re-processed
    assert r["s_ra"] == pytest.approx(expected.s_ra, abs=1e-9)
    assert r["s_dec"] == pytest.approx(expected.s_dec, abs=1e-9)
    assert r["s_fov"] == pytest.approx(expected.s_fov, rel=1e-6)
    assert r["s_xel1"] == 800 and r["s_xel2"] == 800 and r["t_exptime"] == 300
    assert r["access_estsize"] == 1275 and r["access_format"] == "image/fits"
    assert r["access_url"] == "http://localhost:8089/rpp-products/huntsman/raw/science_0.fits"
    assert r["facility_name"] == "Huntsman" and r["target_name"] == "DoradoGroup-p0p0"
    assert r["obs_collection"] == COLLECTION and r["instrument_name"] == "371d420013090900"
    assert r["o_ucd"] == "phot.count" and r["t_resolution"] == 300 and r["t_xel"] == 1
    assert r["em_xel"] == 1 and r["s_pixel_scale"] == pytest.approx(1.2597, abs=1e-4)
    # NULLs (no polarisation, no spectral resolving power for an image): DaCHS's VOTable gives
    # masked numbers and empty strings
    assert np.ma.is_masked(r["em_res_power"]) and np.ma.is_masked(r["pol_xel"])
    assert r["pol_states"] == ""
    # every mandatory ObsCore 1.1 column survives the round trip through DaCHS (reals: 1e-6)
    want = expected.to_dict()
    want["access_url"] = "http://localhost:8089/rpp-products/huntsman/raw/science_0.fits"
    for col in MANDATORY:
        got, exp = r[col], want[col]
        if col == "s_region":
            continue
        if exp is None:
            assert np.ma.is_masked(got) or got == "", col
        elif isinstance(exp, float):
            assert float(got) == pytest.approx(exp, rel=1e-6, abs=1e-12), col
        else:
            assert got == exp, col
    # units and UCDs as published by DaCHS (what TOPCAT/Aladin read)
    assert str(result["t_min"].unit) == "d" and str(result["em_min"].unit) == "m"
    assert str(result["s_ra"].unit) == "deg" and str(result["access_estsize"].unit) == "kbyte"
    # the footprint comes back as a polygon with our 16 vertices
    region = str(r["s_region"])
    assert region.startswith("Polygon ICRS ")
    numbers = [float(v) for v in region.replace("Polygon", " ").replace("ICRS", " ").split()]
    assert len(numbers) == 32
    assert np.allclose(numbers, [float(v) for v in expected.s_region.split()], atol=2e-7)
    assert numbers[:2] == pytest.approx([64.8298222, -54.9888272], abs=2e-7)  # first vertex
    # a point outside the footprint does not find it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outside = _tap(dachs).search(
            "SELECT obs_id FROM ivoa.obscore WHERE obs_collection = 'rpp-ci-test' "
            "AND 1 = CONTAINS(POINT('ICRS', 65.1621, -54.6), s_region)"
        )
    assert len(outside) == 0


def test_tap_which_sessions_cover_this_position(dachs, archived):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = (
            _tap(dachs)
            .search(
                "SELECT rpp_session, COUNT(*) AS n_frames, MIN(t_min) AS first_mjd FROM rpp.main "
                "WHERE 1 = CONTAINS(POINT('ICRS', 65.1621, -54.9358), s_region) "
                "AND obs_collection = 'rpp-ci-test' GROUP BY rpp_session"
            )
            .to_table()
        )
    assert list(result["rpp_session"]) == ["ci/second"] and list(result["n_frames"]) == [1]


def test_siap2_returns_image_not_spectrum(dachs, archived):
    import pyvo
    from astropy import units as u

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for endpoint in ("/rpp/q/siap2/siap2.xml", "/__system__/siap2/sitewide/siap2.xml"):
            sia = pyvo.dal.SIA2Service(dachs + endpoint, check_baseurl=False)
            hits = sia.search(
                pos=(65.1621 * u.deg, -54.9358 * u.deg, 0.01 * u.deg), collection=COLLECTION
            )
            assert [rec["obs_id"] for rec in hits] == ["371d420013090900_20210118T112632.228"]
            assert hits[0].getdataurl().endswith("/huntsman/raw/science_0.fits")
            # BAND overlaps SDSS g (378-555 nm) -> found; 800-900 nm -> not found
            assert (
                len(
                    sia.search(
                        pos=(65.1621 * u.deg, -54.9358 * u.deg, 0.01 * u.deg),
                        band=(4.5e-7 * u.m, 5.0e-7 * u.m),
                        collection=COLLECTION,
                    )
                )
                == 1
            )
            assert (
                len(
                    sia.search(
                        pos=(65.1621 * u.deg, -54.9358 * u.deg, 0.01 * u.deg),
                        band=(8e-7 * u.m, 9e-7 * u.m),
                        collection=COLLECTION,
                    )
                )
                == 0
            )
            # the spectrum covers HD 8538, but SIAP2 serves images and cubes only
            assert (
                len(
                    sia.search(
                        pos=(HD8538[0] * u.deg, HD8538[1] * u.deg, 0.01 * u.deg),
                        collection=COLLECTION,
                    )
                )
                == 0
            )
        tap_spec = (
            _tap(dachs)
            .search(
                "SELECT dataproduct_type, em_min, em_max, em_xel, em_res_power FROM ivoa.obscore "
                f"WHERE 1 = CONTAINS(POINT('ICRS', {HD8538[0]}, {HD8538[1]}), s_region) "
                "AND obs_collection = 'rpp-ci-test'"
            )
            .to_table()
        )
    assert list(tap_spec["dataproduct_type"]) == ["spectrum"]
    assert tap_spec[0]["em_min"] == pytest.approx(5.98991e-7, rel=1e-5)
    assert tap_spec[0]["em_max"] == pytest.approx(7.39081e-7, rel=1e-5)
    assert tap_spec[0]["em_xel"] == 560 and tap_spec[0]["em_res_power"] == pytest.approx(200)


def _load_test_module(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"rpp_{path.stem}_helpers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_access_url_found_by_tap_downloads_the_product(dachs, tmp_path, monkeypatch):
    """Issue 15: with ``archive.base_url`` set to the dashboard's download route, the
    ``access_url`` that DaCHS's TAP service returns for a reduced frame downloads, with a login,
    the same bytes as the product (and nothing without one)."""
    import dataclasses

    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from rpp_tasks.session import lifecycle
    from rpp_tasks.session.workdir import Session

    dash = _load_test_module(REPO / "tests/plugins/test_dashboard.py")
    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path))
    night = dash.reduce_night(tmp_path, n_science=1, archive=False)
    archive_cfg = dataclasses.replace(
        night["obs"].archive,
        base_url="http://testserver/rpp-reports/{observatory}/",
        obs_collection=COLLECTION,
    )
    obs = dataclasses.replace(night["obs"], archive=archive_cfg)
    res = lifecycle.archive(Session.load(night["workdir"]), obs, url=PIPELINE_URL)
    assert res["table"] == "rpp.main" and res["n_inserted"] + res["n_updated"] == 1

    rows = (
        _tap(dachs)
        .search(
            "SELECT access_url, obs_publisher_did FROM ivoa.obscore "
            f"WHERE obs_collection = '{COLLECTION}' AND access_url LIKE 'http://testserver/%'"
        )
        .to_table()
    )
    assert len(rows) == 1
    access_url = str(rows["access_url"][0])
    stem = night["summary"]["frames"][0]["frame"]
    assert access_url.endswith(f"/rpp-reports/demo/{dash.SESSION}/frames/{stem}/calibrated.fits")

    plugin = dash._load_plugin()
    app = plugin.create_app(
        auth_dependency=lambda: None,
        user_dependency=dash._user_from_header(),
        auth_manager=SimpleAuthManager(),
    )
    outer = FastAPI()
    outer.mount("/rpp-reports", app)
    got = TestClient(outer, headers={"X-Test-User": "v:viewer"}).get(access_url)
    assert got.status_code == 200
    assert got.content == (night["workdir"] / "frames" / stem / "calibrated.fits").read_bytes()
    assert TestClient(outer).get(access_url, follow_redirects=True).status_code == 401
