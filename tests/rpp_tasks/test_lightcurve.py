"""Light curves in the results database (SQLite and PostgreSQL): objects and per-frame photometry
upserted, one query across sessions and observatories, ECSV readable as an astropy TimeSeries, a
PNG plot; ``rpp lightcurve`` and ``rpp catalog fetch`` on the command line."""

from __future__ import annotations

import datetime as dt
import math
import os
import uuid

import numpy as np
import pytest
from astropy.timeseries import TimeSeries
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from rpp_tasks.outputs import lightcurve
from rpp_tasks.outputs.db import ResultsDB, default_results_url
from rpp_tasks.outputs.db_schema import PhotometryRow

PG_ADMIN_URL = os.environ.get(
    "RPP_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="module")
def pg_url():
    admin = create_engine(
        PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    try:
        conn = admin.connect()
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN_URL} ({exc.orig})")
    name = f"rpp_test_{uuid.uuid4().hex[:12]}"
    conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def rdb(request, tmp_path):
    url = (
        default_results_url(tmp_path)
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    with ResultsDB(url) as r:
        r.create_schema()
        if request.param == "postgresql":
            with r.engine.begin() as conn:
                conn.exec_driver_sql(
                    "TRUNCATE rpp_photometry, rpp_object, rpp_frame, rpp_session "
                    "RESTART IDENTITY CASCADE"
                )
        yield r


TARGET = {
    "key": "target:sn 2025abc",
    "name": "SN 2025abc",
    "kind": "target",
    "ra_deg": 150.1,
    "dec_deg": 2.2,
}


def _session_rows(night: int, n_frames: int = 3, *, band="V", limit_night=False):
    rows = []
    for j in range(n_frames):
        mjd = 60690.8 + night + 0.05 * j
        status = "upper_limit" if limit_night else "detected"
        rows.append(
            {
                "object_key": TARGET["key"],
                "frame": f"f{night:02d}_{j}",
                "status": status,
                "band": band,
                "phot_type": "psf",
                "mjd_mid": mjd,
                "bjd_tdb": mjd + 2400000.5 + 0.004,
                "airmass": 1.2 + 0.01 * j,
                "mag": float("nan") if limit_night else 15.0 + 0.1 * night,
                "mag_err": float("nan") if limit_night else 0.01,
                "mag_diff": float("nan") if limit_night else 15.01 + 0.1 * night,
                "mag_diff_err": float("nan") if limit_night else 0.008,
                "snr": 3.0 if limit_night else 120.0,
                "limit_mag": 18.2 if limit_night else float("nan"),
                "match_sep_arcsec": float("nan") if limit_night else 0.3,
                "n_comp": 12,
                "flags": ["in_gaia"],
                "by_type": {"psf": {"mag": 15.0, "mag_err": float("nan")}},
            }
        )
    return rows


def _record(rdb, obs, night, **kw):
    sid = f"{obs}_2025-01-{10 + night:02d}"
    rows = _session_rows(night, **kw)
    frames = {
        r["frame"]: {"band": r["band"], "mjd_obs": r["mjd_mid"], "exptime_s": 60.0} for r in rows
    }
    return lightcurve.record_session_photometry(
        rdb,
        obs,
        sid,
        objects=[TARGET],
        rows=rows,
        night_date=f"2025-01-{10 + night:02d}",
        frames=frames,
    )


def test_light_curve_across_sessions_is_one_query(rdb):
    for night in range(4):
        assert _record(rdb, "east", night) == 3
    _record(rdb, "east", 4, limit_night=True)
    _record(rdb, "west", 5, band="R")
    # a re-run of a session updates its rows, never duplicates them
    _record(rdb, "east", 1)
    with rdb.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(PhotometryRow)).scalar_one() == 18
    lc = lightcurve.light_curve(rdb, "SN 2025abc")
    t = lc.table
    assert len(t) == 18 and lc.to_dict()["n_nights"] == 6
    assert np.all(np.diff(t["mjd"]) > 0)
    assert list(t["observatory"][:3]) == ["east"] * 3 and t["session_id"][0] == "east_2025-01-10"
    assert t["mag"][3] == pytest.approx(15.1) and t["mag_diff_err"][3] == pytest.approx(0.008)
    lim = np.asarray(t["upper_limit"], bool)
    assert lim.sum() == 3 and np.all(np.isnan(np.asarray(t["mag"])[lim]))
    assert np.all(np.asarray(t["limit_mag"])[lim] == 18.2)
    assert t["flags"][0] == "in_gaia" and t["exptime_s"][0] == 60.0
    assert t.time.scale == "tdb" and t.time.jd[0] == pytest.approx(60690.8 + 2400000.5 + 0.004)
    # filters, by position, unknown name
    assert len(lightcurve.light_curve(rdb, "SN 2025abc", band="R").table) == 3
    assert len(lightcurve.light_curve(rdb, "SN 2025abc", observatory="west").table) == 3
    near = lightcurve.light_curve(rdb, (150.1 + 1.0 / 3600, 2.2))
    assert len(near.table) == 18 and near.objects[0]["sep_arcsec"] == pytest.approx(
        math.cos(math.radians(2.2)), rel=1e-3
    )
    assert len(lightcurve.light_curve(rdb, (150.2, 2.2)).table) == 0
    with pytest.raises(LookupError, match="not in the observatory's targets"):
        lightcurve.light_curve(rdb, "SN 2099zzz")


def test_ecsv_is_a_timeseries_and_the_plot_a_png(rdb, tmp_path):
    for night in range(3):
        _record(rdb, "east", night)
    _record(rdb, "east", 3, limit_night=True)
    lc = lightcurve.light_curve(rdb, "SN 2025abc")
    path = lightcurve.write_light_curve(lc, tmp_path / "out" / "sn.ecsv")
    ts = TimeSeries.read(path, format="ascii.ecsv")
    assert len(ts) == 12 and ts.time.scale == "tdb"
    np.testing.assert_allclose(ts.time.jd, lc.table.time.jd, rtol=0, atol=1e-9)
    for col in ("bjd_tdb", "mjd", "mag", "mag_err", "band", "frame", "airmass", "flags"):
        assert col in ts.colnames
    assert ts.meta["object"] == "SN 2025abc"
    png = lightcurve.plot_light_curve(lc, tmp_path / "out" / "sn.png")
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") > 500


def test_the_query_uses_the_light_curve_index(tmp_path):
    with ResultsDB(default_results_url(tmp_path)) as r:
        r.create_schema()
        _record(r, "east", 0)
        with r.engine.connect() as conn:
            plan = conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN SELECT * FROM rpp_photometry WHERE object_pk = 1 "
                "AND band = 'V' ORDER BY mjd_mid"
            ).fetchall()
        assert any("ix_rpp_photometry_curve" in str(row) for row in plan), plan


def test_period_and_amplitude_of_a_sampled_sinusoid(rdb):
    rng = np.random.default_rng(2)
    t = np.sort(rng.uniform(0, 40, 150))
    mag = 14.0 + 0.25 * np.sin(2 * np.pi * t / 3.137) + rng.normal(0, 0.005, t.size)
    rows = [
        {
            "object_key": TARGET["key"],
            "frame": f"f{i:03d}",
            "status": "detected",
            "band": "V",
            "mjd_mid": 60690.0 + ti,
            "bjd_tdb": 2460690.5 + ti,
            "mag": m,
            "mag_err": 0.005,
            "mag_diff": m,
            "mag_diff_err": 0.005,
        }
        for i, (ti, m) in enumerate(zip(t, mag))
    ]
    lightcurve.record_session_photometry(rdb, "east", "s1", objects=[TARGET], rows=rows)
    p, a = lightcurve.period_amplitude(lightcurve.light_curve(rdb, "SN 2025abc"))
    assert p == pytest.approx(3.137, rel=0.001) and a == pytest.approx(0.25, rel=0.01)


# ----------------------------------------------------------------------------- command line
def test_rpp_lightcurve_command(tmp_path, capsys):
    from rpp_tasks.ops.cli import main

    url = default_results_url(tmp_path / "db")
    with ResultsDB(url) as r:
        r.create_schema()
        for night in range(3):
            _record(r, "east", night)
    out = tmp_path / "lc"
    assert main(["-q", "lightcurve", "SN", "2025abc", "--db", url, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SN 2025abc: 9 points (9 detections, 0 upper limits) over 3 nights, bands V" in text
    assert "latest: 2025-01-12 V 15.200 +- 0.010" in text
    assert len(TimeSeries.read(out / "SN_2025abc_lightcurve.ecsv", format="ascii.ecsv")) == 9
    assert (out / "SN_2025abc_lightcurve.png").stat().st_size > 1000
    # by coordinates (sexagesimal, one argument) and an unknown name
    assert main(["-q", "lightcurve", "10:00:24 +02:12:00", "--db", url, "--out", str(out)]) == 0
    assert main(["-q", "lightcurve", "SN 2099zzz", "--db", url, "--out", str(out)]) == 2
    assert "SN 2099zzz" in capsys.readouterr().err


def test_rpp_catalog_fetch_stores_cones_that_answer_offline(tmp_path, capsys):
    import yaml
    from astropy.table import Table
    from service_peers import Peer, add_gaia_routes, make_sky, refused_url, votable_bytes

    from rpp_tasks.config import find_config
    from rpp_tasks.ops.cli import main
    from rpp_tasks.stages import catalogs
    from rpp_tasks.stages.catalogs import client_from_config, fetch_reference

    sky = make_sky(150.1, 2.2, n=400, radius_deg=0.4, seed=3)
    peer = Peer()
    add_gaia_routes(peer, sky)
    gaia_votable = peer.routes["/viz-bin/votable"]
    vsx = Table({"_RAJ": [150.11], "_DEJ": [2.21], "Name": ["V0001 Sex"], "Type": ["EW"]})
    peer.routes["/viz-bin/votable"] = lambda q, b, m: (
        (200, "text/xml", votable_bytes(vsx))
        if q.get("-source") == "B/vsx/vsx"
        else gaia_votable(q, b, m)
    )
    catalogs.reset_circuit_breaker()
    cfg = {
        "observatory": "fetchtest",
        "catalogs": {
            "services": {"gaia_tap": peer.url + "/tap", "vizier": peer.url + "/viz-bin/votable"},
            "cache_dir": str(tmp_path / "cache"),
            "local": [str(tmp_path / "local")],
            "local_fetch_radius_deg": 0.2,
            "timeout_s": 2.0,
        },
        "targets": {"objects": [{"name": "SN 2025abc", "ra": "10:00:24", "dec": "+02:12:00"}]},
    }
    path = tmp_path / "observatories" / "fetchtest.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(cfg))
    try:
        assert main(["-q", "catalog", "fetch", "--observatory", str(path)]) == 0
        first = capsys.readouterr().out
        n_calls = len(peer.calls)
        assert main(["-q", "catalog", "fetch", "--observatory", str(path)]) == 0
        again = capsys.readouterr().out
    finally:
        peer.close()
        catalogs.reset_circuit_breaker()
    inside = catalogs.angular_sep_deg(150.1, 2.2, sky["ra"], sky["dec"]) <= 0.2
    assert f"SN 2025abc (150.10000 +2.20000): {inside.sum()} stars from gaia_tap" in first
    assert "1 variables cached" in first
    assert "already covered" in again and len(peer.calls) == n_calls  # nothing asked again
    files = list((tmp_path / "local").glob("*.ecsv"))
    assert len(files) == 1 and files[0].name.startswith("150.100000_+2.200000_0.200000")
    # offline now (every service refused): the local cone answers the field
    obs = find_config(str(path))
    dead = refused_url()
    setup = client_from_config(obs.catalogs)
    import dataclasses

    setup = dataclasses.replace(
        setup, urls={**setup.urls, "gaia_tap": dead + "/tap", "gaia_vizier": dead + "/v"}
    )
    res = fetch_reference(150.12, 2.19, 0.1, band="V", setup=setup)
    assert res.ok and res.source == "local" and res.transformed
    want = catalogs.angular_sep_deg(150.12, 2.19, sky["ra"], sky["dec"]) <= 0.1
    assert sorted(res.table["gaia_source_id"]) == sorted(sky["source_id"][want])
    # and the VSX variables are in the cache the enrichment stage reads
    cached = catalogs.CatalogCache(str(tmp_path / "cache")).get("vsx", 150.12, 2.19, 0.05)
    assert cached is not None and list(cached["Name"]) == ["V0001 Sex"]
    assert (
        dt.datetime.fromisoformat(
            Table.read(files[0], format="ascii.ecsv").meta["fetched_utc"]
        ).tzinfo
        is not None
    )
