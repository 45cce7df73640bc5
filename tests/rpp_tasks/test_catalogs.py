"""Catalogue adapter against loopback peers answering in the services' real formats: answers,
connection refused, timeout, HTTP 500, malformed reply; fallbacks, cache, recorded statuses."""

from __future__ import annotations

import numpy as np
import pytest
from service_peers import Peer, add_gaia_routes, make_sky, refused_url

from rpp_tasks.stages import catalogs
from rpp_tasks.stages.catalogs import (
    CatalogCache,
    ServiceClient,
    ServicesSetup,
    fetch_reference,
    gaia_transform,
    match_catalogs,
    normalize_reference,
    parse_service_table,
)

RA0, DEC0 = 150.0, 20.0


@pytest.fixture
def sky():
    return make_sky(RA0, DEC0, n=200, radius_deg=0.2)


@pytest.fixture
def peer(sky):
    catalogs.reset_circuit_breaker()
    p = Peer()
    add_gaia_routes(p, sky)
    yield p
    p.close()
    catalogs.reset_circuit_breaker()


def _setup(
    tmp_path, *, gaia_tap, vizier, ps1=None, skymapper=None, timeout_s=0.5, retries=1, breaker_s=0.0
):
    urls = dict(
        catalogs.DEFAULT_SERVICES,
        gaia_tap=gaia_tap + "/tap",
        gaia_vizier=vizier + "/viz-bin/votable",
    )
    if ps1:
        urls["ps1"] = ps1 + "/panstarrs"
    if skymapper:
        urls["skymapper"] = skymapper + "/skymapper"
    client = ServiceClient(
        timeout_s=timeout_s, max_retries=retries, backoff_s=0.01, breaker_s=breaker_s
    )
    return ServicesSetup(urls=urls, client=client, cache_dir=str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- recorded formats
def test_parse_recorded_gaia_votable_ecsv_json(real_data):
    d = real_data / "catalog_responses/astroquery/gaia"
    for name, n in (
        ("1710099405832VAL-result.vot", 2),
        ("1712337806100O-result.ecsv", 5),
        ("cone_search.json", 50),
    ):
        ref = normalize_reference(parse_service_table((d / name).read_bytes()), "gaia")
        assert len(ref) == n, name
        assert np.isfinite(ref["mag_G"]).all() and (ref["gaia_source_id"] > 0).all()
        assert str(ref["ref_id"][0]).startswith("Gaia DR3 ")


def test_parse_recorded_skybot_vizier_empty_and_ps1(real_data):
    d = real_data / "catalog_responses/astroquery"
    sk = parse_service_table((d / "imcce/skybot_query.vot").read_bytes())
    assert len(sk) == 4 and "Name" in sk.colnames
    assert len(parse_service_table((d / "vizier/find_kangapj70683.xml").read_bytes())) == 0
    ps = parse_service_table((d / "mast/panstarrs.json").read_bytes())
    assert len(ps) == 35 and "objID" in ps.colnames
    with pytest.raises(catalogs.ServiceError, match="no usable ra/dec"):
        normalize_reference(ps, "ps1")  # the recorded query asked for no coordinates


@pytest.mark.parametrize(
    "content",
    [b'{"metadata": [{"name": "ra"}], "da', b"<html><body>502</body></html>", b"garbage\x00\x01"],
)
def test_malformed_replies_raise_service_error(content):
    with pytest.raises(catalogs.ServiceError) as exc:
        parse_service_table(content)
    assert exc.value.kind == "malformed"


def test_error_votable_is_a_failure():
    vot = (
        b'<?xml version="1.0"?><VOTABLE version="1.3"><RESOURCE type="results">'
        b'<INFO name="QUERY_STATUS" value="ERROR">Cannot parse query</INFO></RESOURCE></VOTABLE>'
    )
    with pytest.raises(catalogs.ServiceError, match="Cannot parse"):
        parse_service_table(vot)


# ----------------------------------------------------------------------------- chain
def test_gaia_tap_answers_then_cache_serves_a_neighbour(peer, sky, tmp_path):
    setup = _setup(tmp_path, gaia_tap=peer.url, vizier=peer.url)
    res = fetch_reference(RA0, DEC0, 0.15, catalog="gaia", band="G", setup=setup)
    assert res.ok and res.catalog == "gaia" and res.source == "network"
    inside = catalogs.angular_sep_deg(RA0, DEC0, sky["ra"], sky["dec"]) <= 0.15
    assert len(res.table) == inside.sum()
    assert [s.status for s in res.statuses] == ["ok"]
    assert "ADQL" in peer.calls[0][2]["LANG"] and "gaiadr3.gaia_source" in peer.calls[0][2]["QUERY"]
    n_calls = len(peer.calls)
    # a neighbouring session: a smaller cone inside the cached one -> no network
    res2 = fetch_reference(RA0 + 0.02, DEC0 - 0.02, 0.1, catalog="gaia", band="G", setup=setup)
    assert (
        res2.source == "cache"
        and res2.statuses[0].status == "cached"
        and len(peer.calls) == n_calls
    )
    assert 0 < len(res2.table) < len(res.table)
    # the cache alone works offline
    res3 = fetch_reference(RA0, DEC0, 0.15, catalog="gaia", band="G", setup=setup, offline=True)
    assert len(res3.table) == len(res.table)


@pytest.mark.parametrize("failure", ["refused", "timeout", "500", "malformed"])
def test_gaia_tap_failure_falls_back_to_vizier(peer, tmp_path, failure):
    tap = refused_url() if failure == "refused" else peer.url
    if failure == "timeout":
        peer.mode["/tap/sync"] = "slow"
        peer.slow_s = 1.5
    elif failure in ("500", "malformed"):
        peer.mode["/tap/sync"] = failure
    setup = _setup(tmp_path, gaia_tap=tap, vizier=peer.url, timeout_s=0.4, retries=1)
    res = fetch_reference(RA0, DEC0, 0.15, catalog="gaia", band="G", setup=setup)
    st = {s.service: s for s in res.statuses}
    assert st["gaia_tap"].status == "failed"
    expected_kind = {
        "refused": "refused",
        "timeout": "timeout",
        "500": "http",
        "malformed": "malformed",
    }[failure]
    assert st["gaia_tap"].reason.startswith(expected_kind)
    # bounded retries: transient failures are retried once, a malformed reply is not
    assert st["gaia_tap"].attempts == (1 if failure == "malformed" else 2)
    assert st["gaia_vizier"].status == "ok" and res.ok and len(res.table) > 100
    assert res.to_dict()["services"][0]["status"] == "failed"


def test_everything_down_gives_an_empty_flagged_result(tmp_path):
    catalogs.reset_circuit_breaker()
    dead = refused_url()
    setup = _setup(tmp_path, gaia_tap=dead, vizier=dead, retries=0)
    res = fetch_reference(RA0, DEC0, 0.1, catalog="gaia", band="V", setup=setup)
    assert not res.ok and res.flags == ("no_reference",) and len(res.table) == 0
    assert [s.status for s in res.statuses] == ["failed", "failed"]


def test_circuit_breaker_stops_asking_a_dead_host(tmp_path, caplog):
    import logging

    catalogs.reset_circuit_breaker()
    dead = refused_url()
    setup = _setup(tmp_path, gaia_tap=dead, vizier=dead, retries=0, breaker_s=60)
    with caplog.at_level(logging.INFO, logger="rpp_tasks.stages.catalogs"):
        fetch_reference(RA0, DEC0, 0.1, setup=setup)
        first = [r.levelno for r in caplog.records if "trying the next service" in r.getMessage()]
        caplog.clear()
        res = fetch_reference(RA0, DEC0, 0.1, setup=setup)
        again = [r.levelno for r in caplog.records if "trying the next service" in r.getMessage()]
    assert all("circuit open" in s.reason for s in res.statuses)
    assert [s.status for s in res.statuses] == ["failed", "failed"]  # still recorded as failed
    # the outage is a warning once per host (both services are on the one dead host here); the
    # frames after it do not repeat it at WARNING
    assert first == [logging.WARNING, logging.INFO] and again == [logging.INFO, logging.INFO]
    catalogs.reset_circuit_breaker()


def test_ps1_answers_in_coverage(peer, sky, tmp_path):
    sky = sky.copy()
    for b, off in zip("grizy", (0.4, 0.0, -0.2, -0.3, -0.35)):
        sky[b] = sky["G"] + off
    peer.routes["/panstarrs"] = lambda q, b, m: (
        200,
        "application/json",
        __import__("service_peers").ps1_json(sky),
    )
    setup = _setup(tmp_path, gaia_tap=peer.url, vizier=peer.url, ps1=peer.url)
    res = fetch_reference(RA0, DEC0, 0.15, catalog="ps1", band="r", setup=setup)
    assert res.catalog == "ps1" and not res.transformed
    assert np.allclose(res.table["mag_r"] - res.table["mag_g"], -0.4, atol=1e-9)
    assert peer.calls[0][1]["ra"].startswith("150.0")


def test_no_ps1_coverage_or_empty_ps1_uses_gaia_transformation(peer, sky, tmp_path):
    setup = _setup(tmp_path, gaia_tap=peer.url, vizier=peer.url, ps1=peer.url)
    n = len(peer.calls)
    south = fetch_reference(RA0, -45.0, 0.1, catalog="ps1", band="g", setup=setup)
    assert south.statuses[0].status == "skipped" and "coverage" in south.statuses[0].reason
    assert not any(c[0] == "/panstarrs" for c in peer.calls[n:])  # PS1 not asked outside its sky
    assert (
        south.statuses[1].service == "gaia_tap"
    )  # Gaia asked next (this peer's sky is at Dec +20: empty)
    peer.mode["/panstarrs"] = "empty"
    res = fetch_reference(RA0, DEC0, 0.15, catalog="ps1", band="r", setup=setup)
    assert [s.status for s in res.statuses][:2] == ["empty", "ok"]
    _check_transformed_r(res, sky)


def _riello_r(g, bp, rp):
    """Riello et al. (2021) Table C.2: G - r_SDSS = poly(BP - RP), written out independently
    here."""
    x = np.asarray(bp) - np.asarray(rp)
    return np.asarray(g) - (-0.09837 + 0.08592 * x + 0.1907 * x**2 - 0.1701 * x**3 + 0.02263 * x**4)


def _check_transformed_r(res, sky):
    """The fallback's mag_r is the Gaia transformation of exactly the stars the peer served."""
    assert res.catalog == "gaia" and res.transformed and res.band == "r"
    by_id = {int(s): k for k, s in enumerate(sky["source_id"])}
    k = np.asarray([by_id[int(s)] for s in res.table["gaia_source_id"]])
    expect = _riello_r(sky["G"][k], sky["BP"][k], sky["RP"][k])
    ok = np.isfinite(res.table["mag_r"])
    assert ok.sum() > 100
    assert np.allclose(np.asarray(res.table["mag_r"])[ok], expect[ok], atol=1e-6)
    assert np.all(np.asarray(res.table["mag_err_r"])[ok] > 0.035)  # relation scatter in quadrature


@pytest.mark.parametrize("failure", ["refused", "timeout", "500", "malformed"])
def test_ps1_failure_falls_back_to_gaia_transformation(peer, sky, tmp_path, failure):
    ps1 = refused_url() if failure == "refused" else peer.url
    if failure == "timeout":
        peer.mode["/panstarrs"] = "slow"
        peer.slow_s = 1.5
    elif failure in ("500", "malformed"):
        peer.mode["/panstarrs"] = failure
    setup = _setup(tmp_path, gaia_tap=peer.url, vizier=peer.url, ps1=ps1, timeout_s=0.4, retries=1)
    res = fetch_reference(RA0, DEC0, 0.15, catalog="ps1", band="r", setup=setup)
    st = [(s.service, s.status) for s in res.statuses]
    assert st == [("ps1", "failed"), ("gaia_tap", "ok")], st
    kind = {"refused": "refused", "timeout": "timeout", "500": "http", "malformed": "malformed"}[
        failure
    ]
    assert res.statuses[0].reason.startswith(kind) and res.statuses[0].attempts == (
        1 if failure == "malformed" else 2
    )
    _check_transformed_r(res, sky)
    if failure != "refused":
        assert any(c[0] == "/panstarrs" and c[1]["ra"].startswith("150.0") for c in peer.calls)


def test_skymapper_answers_in_the_south_and_is_skipped_in_the_north(tmp_path):
    from astropy.table import vstack

    catalogs.reset_circuit_breaker()
    south = make_sky(RA0, -45.0, n=150, radius_deg=0.2, seed=3)
    north = make_sky(RA0, DEC0, n=150, radius_deg=0.2, seed=4)
    north["source_id"] += 1000
    for t in (south, north):
        for b, off in zip("griz", (0.45, 0.05, -0.15, -0.25)):
            t[b] = t["G"] + off
    p = Peer()
    add_gaia_routes(p, vstack([south, north]))  # one all-sky peer: both fields
    try:
        setup = _setup(tmp_path, gaia_tap=p.url, vizier=p.url, skymapper=p.url)
        res = fetch_reference(RA0, -45.0, 0.15, catalog="skymapper", band="i", setup=setup)
        assert (
            [s.status for s in res.statuses] == ["ok"]
            and res.catalog == "skymapper"
            and not res.transformed
        )
        inside = catalogs.angular_sep_deg(RA0, -45.0, south["ra"], south["dec"]) <= 0.15
        assert len(res.table) == inside.sum()
        assert np.allclose(np.sort(res.table["mag_i"]), np.sort(south["i"][inside]), atol=1e-9)
        assert np.allclose(res.table["mag_err_z"], 0.02)
        q = [c for c in p.calls if c[0] == "/skymapper/sync"][0][2]
        assert "dr4.master" in q["QUERY"] and "raj2000" in q["QUERY"] and q["LANG"] == "ADQL"
        # Dec +20: outside SkyMapper's sky -> not asked, Gaia transformation instead
        n = len(p.calls)
        north = fetch_reference(RA0, DEC0, 0.1, catalog="skymapper", band="g", setup=setup)
        assert north.statuses[0].service == "skymapper" and north.statuses[0].status == "skipped"
        assert "coverage" in north.statuses[0].reason
        assert north.statuses[1].service == "gaia_tap" and north.statuses[1].status == "ok"
        assert (
            north.catalog == "gaia"
            and north.transformed
            and np.isfinite(north.table["mag_g"]).sum() > 10
        )
        assert not any(c[0] == "/skymapper/sync" for c in p.calls[n:])
        # SkyMapper down (HTTP 500) in its own sky, nothing cached -> Gaia transformation, status
        # recorded
        p.mode["/skymapper/sync"] = "500"
        (tmp_path / "other").mkdir()
        setup2 = _setup(tmp_path / "other", gaia_tap=p.url, vizier=p.url, skymapper=p.url)
        down = fetch_reference(RA0, -45.0, 0.15, catalog="skymapper", band="g", setup=setup2)
        assert [s.status for s in down.statuses] == ["failed", "ok"] and down.statuses[
            0
        ].reason.startswith("http")
        assert down.catalog == "gaia" and down.transformed
    finally:
        p.close()


def test_cache_serves_a_rerun_while_every_service_times_out(peer, sky, tmp_path):
    setup = _setup(
        tmp_path, gaia_tap=peer.url, vizier=peer.url, ps1=peer.url, timeout_s=0.3, retries=0
    )
    first = fetch_reference(RA0, DEC0, 0.15, catalog="gaia", band="V", setup=setup)
    assert first.source == "network" and first.transformed
    for route in ("/tap/sync", "/viz-bin/votable", "/panstarrs"):
        peer.mode[route] = "slow"
    n = len(peer.calls)
    again = fetch_reference(RA0, DEC0, 0.15, catalog="gaia", band="V", setup=setup)
    assert again.source == "cache" and [s.status for s in again.statuses] == ["cached"]
    assert len(peer.calls) == n  # no network at all
    assert np.allclose(np.sort(again.table["mag_V"]), np.sort(first.table["mag_V"]), equal_nan=True)
    # a cone the cache does not contain: every service times out -> empty, flagged, statuses
    # recorded
    miss = fetch_reference(RA0 + 3.0, DEC0, 0.05, catalog="gaia", band="V", setup=setup)
    assert miss.flags == ("no_reference",)
    assert [(s.service, s.status, s.reason.split(":")[0]) for s in miss.statuses] == [
        ("gaia_tap", "failed", "timeout"),
        ("gaia_vizier", "failed", "timeout"),
    ]


def test_gaia_transformation_values():
    from astropy.table import Table

    t = Table(
        {
            "ra": [0.0],
            "dec": [0.0],
            "mag_G": [12.0],
            "mag_BP": [12.4],
            "mag_RP": [11.4],
            "mag_err_G": [0.003],
            "mag_err_BP": [0.004],
            "mag_err_RP": [0.004],
        }
    )
    out = gaia_transform(t)
    # BP-RP = 1.0: G-V = -0.02704+0.01424-0.2156+0.01426 = -0.2141
    assert out["mag_V"][0] == pytest.approx(12.2141, abs=1e-4)
    assert out["mag_R"][0] < out["mag_V"][0] < out["mag_B"][0]
    assert out["mag_I"][0] < out["mag_R"][0]
    assert 0.4 < out["mag_B"][0] - out["mag_V"][0] < 1.0


def test_match_catalogs_radius_and_nan():
    idx, sep = match_catalogs(
        [10.0, 10.001, np.nan], [0.0, 0.0, 0.0], [10.0, 20.0], [0.0, 0.0], radius_arcsec=2.0
    )
    assert list(idx) == [0, -1, -1] and sep[0] == pytest.approx(0.0, abs=1e-6)


def test_cache_ignores_corrupt_files(tmp_path):
    from astropy.table import Table

    cache = CatalogCache(tmp_path)
    cache.put("gaia", 10.0, 5.0, 0.2, Table({"ra": [10.0], "dec": [5.0]}))
    assert len(cache.get("gaia", 10.0, 5.0, 0.1)) == 1
    assert cache.get("gaia", 10.0, 5.3, 0.1) is None  # not contained
    next((tmp_path / "gaia").iterdir()).write_text("junk")
    assert cache.get("gaia", 10.0, 5.0, 0.1) is None


def test_bad_cone_raises():
    with pytest.raises(ValueError, match="invalid cone"):
        fetch_reference(np.nan, 0.0, 0.1)
    with pytest.raises(ValueError, match="unknown catalogue"):
        fetch_reference(1.0, 0.0, 0.1, catalog="2mass")
