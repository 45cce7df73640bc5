"""Enrichment against loopback peers: the recorded SkyBoT reply, SIMBAD TAP and VizieR VOTables;
each service optional with its status recorded; a dead service leaves only its columns empty."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table
from service_peers import RESPONSES, Peer, gaia_tap_json, make_sky, refused_url, votable_bytes

from rpp_tasks.stages import catalogs
from rpp_tasks.stages.catalogs import ServiceClient, ServicesSetup
from rpp_tasks.stages.enrich import enrich_catalog

# the recorded SkyBoT cone search: RA 81.2833, Dec +4.49278, r = 720", epoch 2025-01-02
RA0, DEC0 = 81.2833, 4.49278
MJD = 60677.0


@pytest.fixture
def field(real_data):
    sky = make_sky(RA0, DEC0, n=60, radius_deg=0.15, seed=2)
    sk = catalogs.parse_service_table(
        (RESPONSES / "astroquery/imcce/skybot_query.vot").read_bytes()
    )
    # the catalogue: 20 Gaia stars, the 4 recorded asteroids, one unknown source
    ra = np.concatenate([sky["ra"][:20], np.asarray(sk["_RAJ2000"], float), [RA0 + 0.01]])
    dec = np.concatenate([sky["dec"][:20], np.asarray(sk["_DECJ2000"], float), [DEC0 - 0.01]])
    cat = Table({"id": np.arange(1, ra.size + 1), "ra": ra, "dec": dec})
    return sky, sk, cat


def _peer(sky):
    p = Peer()
    p.routes["/tap/sync"] = lambda q, b, m: (200, "application/json", gaia_tap_json(sky))
    simbad = Table(
        {
            "main_id": ["HD 1", "V* XX Ori"],
            "ra": [float(sky["ra"][0]), float(sky["ra"][1])],
            "dec": [float(sky["dec"][0]), float(sky["dec"][1])],
            "otype": ["*", "RR*"],
        }
    )
    p.routes["/simbad/sync"] = lambda q, b, m: (200, "text/xml", votable_bytes(simbad))
    p.routes["/skybot"] = lambda q, b, m: (
        200,
        "text/xml",
        (RESPONSES / "astroquery/imcce/skybot_query.vot").read_bytes(),
    )
    vsx = Table(
        {
            "_RAJ": [float(sky["ra"][1])],
            "_DEJ": [float(sky["dec"][1])],
            "Name": ["XX Ori"],
            "Type": ["RRAB"],
        }
    )
    mq = Table(
        {
            "_RAJ": [float(sky["ra"][2])],
            "_DEJ": [float(sky["dec"][2])],
            "Name": ["QSO J0525+0429"],
            "z": [1.234],
        }
    )

    def vizier(q, b, m):
        return (
            200,
            "text/xml",
            votable_bytes(vsx if q.get("-source", "").startswith("B/vsx") else mq),
        )

    p.routes["/viz"] = vizier
    p.routes["/colibri/cone_search"] = lambda q, b, m: (
        200,
        "application/json",
        b'{"voevents": [{"trigger_id": "GRB250102A", "type": "grb"}]}',
    )
    return p


def _setup(
    tmp_path, url, *, uid=None, enabled=("simbad", "skybot", "vsx", "milliquas", "colibri"), dead=()
):
    urls = {
        "gaia_tap": url + "/tap",
        "simbad": url + "/simbad",
        "skybot": url + "/skybot",
        "vizier": url + "/viz",
        "colibri": url + "/colibri",
    }
    for d in dead:
        urls[d] = refused_url()
    return ServicesSetup(
        urls=urls,
        client=ServiceClient(timeout_s=1.0, max_retries=1, backoff_s=0.01, breaker_s=0),
        cache_dir=str(tmp_path / "cache"),
        gaia_order=("gaia_tap",),
        enabled=tuple(enabled),
        colibri_uid=uid,
    )


def test_every_service_answers(field, tmp_path):
    sky, sk, cat = field
    p = _peer(sky)
    try:
        out, res = enrich_catalog(
            cat,
            center_ra_deg=RA0,
            center_dec_deg=DEC0,
            radius_deg=0.2,
            mjd=MJD,
            setup=_setup(tmp_path, p.url, uid="test-uid"),
        )
    finally:
        p.close()
    st = {k: v["status"] for k, v in res.to_dict()["services"].items()}
    assert st == {
        "gaia": "ok",
        "simbad": "ok",
        "skybot": "ok",
        "vsx": "ok",
        "milliquas": "ok",
        "colibri": "ok",
    }
    assert (out["gaia_source_id"][:20] == sky["source_id"][:20]).all() and out["gaia_source_id"][
        -1
    ] == 0
    assert (
        list(out["simbad_main_id"][:2]) == ["HD 1", "V* XX Ori"] and out["simbad_otype"][1] == "RR*"
    )
    assert set(out["sso_name"][20:24]) == set(np.asarray(sk["Name"]).astype(str))
    assert out["vsx_name"][1] == "XX Ori" and out["vsx_type"][1] == "RRAB"
    assert out["milliquas_name"][2] == "QSO J0525+0429" and out["milliquas_z"][2] == pytest.approx(
        1.234
    )
    assert out.meta["colibri_events"][0]["trigger_id"] == "GRB250102A"
    assert out.meta["enrichment"]["skybot"]["n_rows"] == 4
    # the SkyBoT request carried the epoch as JD and the field
    skyq = [c for c in p.calls if c[0] == "/skybot"][0][1]
    assert float(skyq["-ep"]) == pytest.approx(MJD + 2400000.5) and float(
        skyq["-ra"]
    ) == pytest.approx(RA0)
    assert "test-uid" == [c for c in p.calls if c[0].startswith("/colibri")][0][2]["uid"]


def test_dead_services_leave_only_their_columns_empty_and_cache_serves_rerun(field, tmp_path):
    sky, sk, cat = field
    p = _peer(sky)
    p.mode["/simbad/sync"] = "500"
    p.mode["/viz"] = "malformed"
    try:
        setup = _setup(tmp_path, p.url, dead=("skybot",))
        out, res = enrich_catalog(
            cat, center_ra_deg=RA0, center_dec_deg=DEC0, radius_deg=0.2, mjd=MJD, setup=setup
        )
        services = res.to_dict()["services"]
        assert services["simbad"]["status"] == "failed" and services["simbad"]["reason"].startswith(
            "http"
        )
        assert services["simbad"]["attempts"] == 2  # one bounded retry on HTTP 500
        assert services["skybot"]["status"] == "failed" and services["skybot"]["reason"].startswith(
            "refused"
        )
        assert services["vsx"]["status"] == "failed" and services["vsx"]["reason"].startswith(
            "malformed"
        )
        assert (
            services["colibri"]["status"] == "skipped"
            and "API key" in services["colibri"]["reason"]
        )
        assert services["gaia"]["status"] == "ok"
        assert (out["simbad_main_id"] == "").all() and (out["sso_name"] == "").all()
        assert (out["gaia_source_id"][:20] > 0).all()
        # a re-run with every service now down: Gaia comes from the cache
        p.mode["/tap/sync"] = "500"
        out2, res2 = enrich_catalog(
            cat, center_ra_deg=RA0, center_dec_deg=DEC0, radius_deg=0.2, mjd=MJD, setup=setup
        )
        assert res2.to_dict()["services"]["gaia"]["status"] == "cached"
        assert (out2["gaia_source_id"] == out["gaia_source_id"]).all()
    finally:
        p.close()


def test_services_not_enabled_are_skipped_and_no_wcs_is_handled(field, tmp_path):
    sky, sk, cat = field
    setup = _setup(tmp_path, refused_url(), enabled=())
    cat2 = cat.copy()
    cat2["ra"] = np.nan
    out, res = enrich_catalog(
        cat2, center_ra_deg=np.nan, center_dec_deg=np.nan, radius_deg=np.nan, mjd=None, setup=setup
    )
    st = res.to_dict()["services"]
    assert st["gaia"]["status"] == "skipped" and "RA/Dec" in st["gaia"]["reason"]
    assert st["simbad"]["status"] == "skipped" and "not enabled" in st["simbad"]["reason"]
    assert "gaia_source_id" in out.colnames and len(out) == len(cat)


def test_timeouts_are_bounded_recorded_and_only_their_columns_are_empty(field, tmp_path):
    """SkyBoT and VizieR answer after the client's timeout: each is retried once, recorded as a
    timeout; SIMBAD and Gaia (answering) still fill their columns; a re-run is served from the
    cache."""
    import time as _time

    sky, sk, cat = field
    p = _peer(sky)
    p.slow_s = 1.2
    p.mode["/skybot"] = p.mode["/viz"] = "slow"
    try:
        setup = ServicesSetup(
            urls={
                "gaia_tap": p.url + "/tap",
                "simbad": p.url + "/simbad",
                "skybot": p.url + "/skybot",
                "vizier": p.url + "/viz",
                "colibri": p.url + "/colibri",
            },
            client=ServiceClient(timeout_s=0.3, max_retries=1, backoff_s=0.01, breaker_s=0),
            cache_dir=str(tmp_path / "cache"),
            gaia_order=("gaia_tap",),
            enabled=("simbad", "skybot", "vsx", "milliquas"),
        )
        t0 = _time.perf_counter()
        out, res = enrich_catalog(
            cat, center_ra_deg=RA0, center_dec_deg=DEC0, radius_deg=0.2, mjd=MJD, setup=setup
        )
        wall = _time.perf_counter() - t0
        st = res.to_dict()["services"]
        for name in ("skybot", "vsx", "milliquas"):
            assert st[name]["status"] == "failed" and st[name]["reason"].startswith("timeout"), st[
                name
            ]
            assert st[name]["attempts"] == 2
        assert wall < 3 * 2 * 0.3 + 2.0  # 3 services x 2 attempts x 0.3 s timeout, not 1.2 s waits
        assert st["simbad"]["status"] == "ok" and st["gaia"]["status"] == "ok"
        assert list(out["simbad_main_id"][:2]) == ["HD 1", "V* XX Ori"]
        assert (
            (out["sso_name"] == "").all()
            and (out["vsx_name"] == "").all()
            and np.isnan(out["milliquas_z"]).all()
        )
        assert out.meta["enrichment"]["skybot"]["reason"].startswith("timeout")
        # the answering services were cached: with everything timing out now, they come from disk
        p.mode["/tap/sync"] = p.mode["/simbad/sync"] = "slow"
        out2, res2 = enrich_catalog(
            cat, center_ra_deg=RA0, center_dec_deg=DEC0, radius_deg=0.2, mjd=MJD, setup=setup
        )
        st2 = res2.to_dict()["services"]
        assert st2["gaia"]["status"] == "cached" and st2["simbad"]["status"] == "cached"
        assert list(out2["simbad_main_id"]) == list(out["simbad_main_id"])
    finally:
        p.close()


@pytest.mark.parametrize("mode", ["ok", "echo401", "500", "malformed", "refused"])
def test_astro_colibri_key_never_reaches_logs_or_metadata(field, tmp_path, caplog, mode):
    """The key is sent in the request body (checked on the peer) but appears nowhere in the
    catalogue metadata, the written ECSV, the result, the ServicesSetup repr or any log record, even
    when the service answers with an error page that echoes the request."""
    import json
    import logging

    secret = "uid-S3CRET-7f3a9c"
    sky, sk, cat = field
    p = _peer(sky)

    def colibri(q, b, m):
        if m == "echo401":
            return (
                401,
                "application/json",
                json.dumps({"error": f"unknown uid {b.get('uid')}", "request": b}).encode(),
            )
        return (
            200,
            "application/json",
            json.dumps(
                {"voevents": [{"trigger_id": "GRB250102A", "type": "grb", "note": b.get("uid")}]}
            ).encode(),
        )

    p.routes["/colibri/cone_search"] = colibri
    if mode in ("echo401", "500", "malformed"):
        p.mode["/colibri/cone_search"] = mode
    caplog.set_level(logging.DEBUG)
    try:
        setup = _setup(
            tmp_path,
            p.url,
            uid=secret,
            enabled=("colibri",),
            dead=("colibri",) if mode == "refused" else (),
        )
        out, res = enrich_catalog(
            cat, center_ra_deg=RA0, center_dec_deg=DEC0, radius_deg=0.2, mjd=MJD, setup=setup
        )
    finally:
        p.close()
    st = res.to_dict()["services"]["colibri"]
    assert st["status"] == ("ok" if mode == "ok" else "failed"), st
    if mode != "refused":
        assert [c for c in p.calls if c[0].startswith("/colibri")][0][2][
            "uid"
        ] == secret  # it was really sent
    if mode == "echo401":
        assert st["reason"].startswith("http") and "401" in st["reason"] and "***" in st["reason"]
    logging.getLogger("rpp_tasks.test").error(
        "setup used: %r", setup
    )  # what a careless log line would show
    out.write(tmp_path / "cat.ecsv", format="ascii.ecsv")
    for where, text in (
        ("meta", json.dumps(out.meta, default=str)),
        ("result", json.dumps(res.to_dict(), default=str)),
        ("ecsv", (tmp_path / "cat.ecsv").read_text()),
        ("repr", repr(setup)),
        ("logs", caplog.text),
    ):
        assert secret not in text, where
