"""Targets: names and coordinates, resolution (configuration, cache, Sesame and SIMBAD on loopback
peers, offline), the target's row of a frame's catalogue or an upper limit, the limiting magnitude
at a position, barycentric times."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table
from service_peers import Peer, add_name_routes, refused_url

from rpp_tasks.config import TargetEntry
from rpp_tasks.stages import catalogs
from rpp_tasks.stages.catalogs import ServiceClient, ServicesSetup
from rpp_tasks.stages.target import (
    Target,
    bjd_tdb,
    limiting_mag_at,
    measure_target,
    normalize_name,
    parse_coordinates,
    resolve_target,
    targets_for_session,
)

CONFIG = [
    TargetEntry(name="SN 2025abc", ra="10:00:24.0", dec="+02:12:00", aliases=["AT2025abc"]),
    TargetEntry(name="RR Lyr"),  # no coordinates: resolved online under its name
]


@pytest.mark.parametrize(
    "text, ra, dec",
    [
        ("150.1 +2.2", 150.1, 2.2),
        ("150.1, -2.2", 150.1, -2.2),
        ("10:00:24.0 +02:12:00", 150.1, 2.2),
        ("10 00 24.0 -02 12 00", 150.1, -2.2),
        ("10h00m24s +2d12m0s", 150.1, 2.2),
        ("00:00:00.0 -00:30:00", 0.0, -0.5),
    ],
)
def test_parse_coordinates(text, ra, dec):
    got = parse_coordinates(text)
    assert got is not None
    assert got[0] == pytest.approx(ra, abs=1e-9) and got[1] == pytest.approx(dec, abs=1e-9)


@pytest.mark.parametrize(
    "text", ["RR Lyr", "M 31", "SN 2025abc", "V1234 Her", "25:00:00 +10", "1 2 3"]
)
def test_names_are_not_coordinates(text):
    assert parse_coordinates(text) is None


def test_normalize_name():
    assert normalize_name("  V*  RR   Lyr ") == normalize_name("v* rr lyr") == "v* rr lyr"


def _setup(tmp_path, url):
    urls = dict(
        catalogs.DEFAULT_SERVICES, sesame=url + "/sesame/nph-sesame", simbad=url + "/simbad"
    )
    client = ServiceClient(timeout_s=1.0, max_retries=0, backoff_s=0.01, breaker_s=0.0)
    return ServicesSetup(urls=urls, client=client, cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def names_peer():
    catalogs.reset_circuit_breaker()
    p = Peer()
    add_name_routes(
        p,
        {
            "RR Lyr": {
                "ra": 291.36627,
                "dec": 42.78436,
                "main_id": "V* RR Lyr",
                "otype": "RR*",
                "pmra": -109.7,
                "pmdec": -195.0,
            },
            "M 31": {"ra": 10.684708, "dec": 41.26875, "main_id": "M  31", "otype": "AGN"},
        },
        simbad_names={"V* V1234 Her": {"ra": 250.0, "dec": 30.0, "main_id": "V* V1234 Her"}},
    )
    yield p
    p.close()
    catalogs.reset_circuit_breaker()


def test_configured_names_and_aliases_resolve_offline():
    for q in ("SN 2025abc", "sn  2025ABC", "AT2025abc"):
        r = resolve_target(q, config_targets=CONFIG, online=False)
        assert r.ok and r.target.source == "config" and r.target.name == "SN 2025abc"
        assert r.target.ra_deg == pytest.approx(150.1) and r.target.dec_deg == pytest.approx(2.2)
    r = resolve_target("150.1 +2.2", online=False)
    assert r.ok and r.target.source == "coordinates" and r.target.name == "J150.10000+02.20000"


def test_unknown_name_offline_is_recorded_not_raised():
    r = resolve_target("SN 2099zzz", named_by="param", config_targets=CONFIG, online=False)
    assert not r.ok and r.target is None
    assert "not in the observatory's targets" in r.reason and "offline" in r.reason
    assert r.to_dict()["status"] == "failed"


def test_sesame_resolves_then_the_cache_answers_offline(names_peer, tmp_path):
    setup = _setup(tmp_path, names_peer.url)
    r = resolve_target("RR Lyr", config_targets=CONFIG, setup=setup)
    assert r.ok and r.target.source == "sesame" and r.target.name == "RR Lyr"
    assert r.target.ra_deg == pytest.approx(291.36627) and r.target.pmdec_mas_yr == -195.0
    assert r.target.otype == "RR*" and "V* RR Lyr" in r.target.aliases
    assert [a["service"] for a in r.attempts] == ["sesame"]
    assert names_peer.raw_query == "RR%20Lyr"
    n = len(names_peer.calls)
    # offline now: the cache answers
    r2 = resolve_target("rr lyr", config_targets=CONFIG, setup=setup, online=False)
    assert r2.ok and r2.target.source == "cache" and r2.target.ra_deg == pytest.approx(291.36627)
    assert len(names_peer.calls) == n
    # a name never configured: Sesame, cached too
    r3 = resolve_target("M 31", setup=setup)
    assert r3.ok and r3.target.dec_deg == pytest.approx(41.26875)


def test_simbad_answers_when_sesame_fails_or_finds_nothing(names_peer, tmp_path):
    setup = _setup(tmp_path, names_peer.url)
    r = resolve_target("V* V1234 Her", setup=setup)  # Sesame: nothing found -> SIMBAD ident
    assert r.ok and r.target.source == "simbad" and r.target.ra_deg == 250.0
    assert [(a["service"], a["status"]) for a in r.attempts] == [
        ("sesame", "empty"),
        ("simbad", "ok"),
    ]
    names_peer.mode["/sesame"] = "500"
    r = resolve_target("V* V1234 Her", setup=_setup(tmp_path / "b", names_peer.url))
    assert r.ok and r.attempts[0]["status"] == "failed" and "HTTP 500" in r.attempts[0]["reason"]
    # known nowhere
    r = resolve_target("NOT A STAR 42", setup=_setup(tmp_path / "c", names_peer.url))
    assert (
        not r.ok and "sesame: http: HTTP 500" in r.reason and "simbad: name not found" in r.reason
    )


def test_everything_down_gives_the_reason(tmp_path):
    catalogs.reset_circuit_breaker()
    r = resolve_target("RR Lyr", setup=_setup(tmp_path, refused_url()))
    assert not r.ok and "refused" in r.reason
    assert [a["service"] for a in r.attempts] == ["sesame", "simbad"]


def test_targets_for_session_orders_and_deduplicates(names_peer, tmp_path):
    setup = _setup(tmp_path, names_peer.url)
    config = [*CONFIG, TargetEntry(name="Elsewhere", ra=200.0, dec=-30.0)]
    targets, res = targets_for_session(
        params=["AT2025abc", "SN 2099zzz"],
        objects=["SN 2025abc", "SN 2025abc", "flat field"],
        config_targets=config,
        field_cones=[(150.1, 2.2, 0.2)],
        setup=setup,
        online=False,
    )
    # the parameter names SN 2025abc (alias); OBJECT names it again and the configuration lists it
    # in the field: one target. 'Elsewhere' is outside every field.
    assert [t.name for t in targets] == ["SN 2025abc"] and targets[0].named_by == "param"
    failed = {r.query: r.reason for r in res if not r.ok}
    assert set(failed) == {"SN 2099zzz", "flat field"}


def test_proper_motion_moves_the_target():
    t = Target("HPM", 10.0, 60.0, pmra_mas_yr=3600.0, pmdec_mas_yr=-7200.0, epoch_jyear=2000.0)
    ra, dec = t.position_at(51544.5 + 365.25 * 10)  # J2010.0
    assert (dec - 60.0) * 3600 == pytest.approx(-72.0, abs=1e-6)  # -7.2"/yr x 10 yr
    assert (ra - 10.0) * 3600 * math.cos(math.radians(60.0)) == pytest.approx(36.0, abs=1e-6)
    assert t.position_at(None) == (10.0, 60.0)


# ----------------------------------------------------------------------------- measurement
def _catalog():
    n = 4
    return Table(
        {
            "id": np.arange(1, n + 1),
            "ra": [150.0, 150.001, 150.01, 150.02],
            "dec": [2.0, 2.0005, 2.01, 2.02],
            "snr": [200.0, 2.0, 50.0, 80.0],
            "mag_psf": [-8.0, -3.0, -7.0, -7.5],
            "mag_err_psf": [0.005, 0.5, 0.02, 0.01],
            "snr_psf": [200.0, 2.0, 50.0, 80.0],
            "mag_cal_psf": [15.0, 20.0, 16.0, 15.5],
            "mag_cal_err_psf": [0.006, 0.5, 0.021, 0.011],
            "saturated": [False, False, False, True],
            "near_edge": [False] * n,
            "blended": [False] * n,
            "gaia_source_id": [5, 0, 6, 7],
        }
    )


def test_target_row_found_by_position_with_its_distance():
    cat = _catalog()
    m = measure_target(
        cat,
        150.0,
        2.0 + 0.5 / 3600,
        target="T",
        frame="f1",
        band="V",
        x_px=100.0,
        y_px=120.0,
        shape=(512, 512),
        types=("psf",),
    )
    assert m.status == "detected" and m.match_sep_arcsec == pytest.approx(0.5, abs=1e-3)
    assert m.by_type["psf"]["mag"] == 15.0 and m.by_type["psf"]["mag_err"] == 0.006
    assert m.by_type["psf"]["mag_inst"] == -8.0 and m.snr == 200.0 and "in_gaia" in m.flags
    sat = measure_target(
        cat,
        150.02,
        2.02,
        target="T",
        frame="f1",
        band="V",
        x_px=10.0,
        y_px=10.0,
        shape=(512, 512),
        types=("psf",),
    )
    assert sat.detected and "saturated" in sat.flags


def test_faint_or_absent_target_gives_an_upper_limit():
    cat = _catalog()
    faint = measure_target(
        cat,
        150.001,
        2.0005,
        target="T",
        frame="f",
        band="V",
        x_px=50.0,
        y_px=50.0,
        shape=(512, 512),
        limit_mag=18.7,
        limit_kind="calibrated",
        types=("psf",),
    )
    assert (
        faint.status == "upper_limit" and faint.limit_mag == 18.7 and "S/N 2.0 < 3" in faint.reason
    )
    absent = measure_target(
        cat,
        150.3,
        2.3,
        target="T",
        frame="f",
        band="V",
        x_px=50.0,
        y_px=50.0,
        shape=(512, 512),
        limit_mag=18.7,
        limit_kind="calibrated",
    )
    assert absent.status == "upper_limit" and "no source within 2 arcsec" in absent.reason
    d = absent.to_dict()
    assert d["limit_mag"] == 18.7 and d["match_sep_arcsec"] is None


def test_target_outside_the_field_or_without_wcs_is_recorded():
    cat = _catalog()
    out = measure_target(
        cat,
        150.0,
        2.0,
        target="T",
        frame="f",
        band="V",
        x_px=-300.0,
        y_px=100.0,
        shape=(512, 512),
    )
    assert out.status == "outside_field" and "outside the field" in out.reason
    assert "x=-300" in out.reason
    nowcs = measure_target(
        cat,
        150.0,
        2.0,
        target="T",
        frame="f",
        band="V",
        x_px=float("nan"),
        y_px=float("nan"),
        shape=(512, 512),
    )
    assert nowcs.status == "no_wcs"


def test_limiting_magnitude_at_a_position_from_the_local_noise():
    rng = np.random.default_rng(1)
    data = 1000.0 + rng.normal(0, 12.0, (200, 200))
    data[90:110, 90:110] += 5000.0  # a bright source next to the position is clipped away
    data[:, :100] += rng.normal(0, 30.0, (200, 100))  # a noisier left half: the limit is local
    lim, rms = limiting_mag_at(data, 150.0, 100.0, fwhm_px=3.0, exptime_s=60.0)
    assert rms == pytest.approx(12.0, rel=0.05)
    expect = -2.5 * math.log10(5 * 12.0 * math.sqrt(math.pi) * 3.9 / 60.0)
    assert lim == pytest.approx(expect, abs=0.05)
    lim_cal, _ = limiting_mag_at(
        data, 150.0, 100.0, fwhm_px=3.0, exptime_s=60.0, zero_point_mag=23.0, extinction_mag=0.2
    )
    assert lim_cal == pytest.approx(lim + 23.0 - 0.2, abs=1e-9)
    left, rms_left = limiting_mag_at(data, 40.0, 100.0, fwhm_px=3.0, exptime_s=60.0)
    assert rms_left > 2 * rms and left < lim - 0.8


# ----------------------------------------------------------------------------- time
@pytest.mark.parametrize("site", [None, (43.75, 6.92, 1270.0)])
def test_bjd_tdb_agrees_with_astropy(site):
    import astropy.units as u
    from astropy.coordinates import EarthLocation, SkyCoord
    from astropy.time import Time

    mjd = np.array([60690.875, 60750.1, 60900.5, 58000.3])
    ra, dec = 291.37, 42.78
    if site is None:
        loc = EarthLocation.from_geocentric(0, 0, 0, unit=u.m)
        mine = bjd_tdb(mjd, ra, dec)
    else:
        loc = EarthLocation.from_geodetic(site[1] * u.deg, site[0] * u.deg, site[2] * u.m)
        mine = bjd_tdb(
            mjd, ra, dec, latitude_deg=site[0], longitude_deg=site[1], elevation_m=site[2]
        )
    t = Time(mjd, format="mjd", scale="utc", location=loc)
    ref = t.tdb + t.light_travel_time(SkyCoord(ra, dec, unit="deg"), "barycentric")
    diff_s = (mine - (ref.jd1 + ref.jd2)) * 86400.0
    assert np.all(np.abs(diff_s) < 1e-4), diff_s  # 0.1 ms (the light time is up to 499 s)
    assert abs(bjd_tdb(60690.875, ra, dec) - (60690.875 + 2400000.5)) > 0.001  # not a no-op
    assert math.isnan(bjd_tdb(float("nan"), ra, dec))


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "targets, key",
    [
        ({"objects": [{"name": "A", "ra": "25:00:00", "dec": 10}]}, "targets.objects[0].ra"),
        ({"objects": [{"name": "A", "ra": 10.0, "dec": "+95:00:00"}]}, "targets.objects[0].dec"),
        ({"objects": [{"name": "A", "ra": 10.0}]}, "targets.objects[0].ra"),
        ({"objects": [{"name": "A"}, {"name": "B", "aliases": ["a"]}]}, "targets.objects[1].name"),
        ({"objects": [{"name": " "}]}, "targets.objects[0].name"),
        ({"ensemble": {"min_stars": 5, "max_stars": 3}}, "targets.ensemble.max_stars"),
        ({"phot_type": "big"}, "targets.phot_type"),
        ({"objects": [{"name": "A", "colour": "red"}]}, "targets.objects[0].colour"),
    ],
)
def test_bad_target_configuration_names_the_key(targets, key):
    from rpp_tasks.config import config_from_dict
    from rpp_tasks.exceptions import ConfigError

    with pytest.raises(ConfigError) as exc:
        config_from_dict({"observatory": "x", "targets": targets})
    assert key in str(exc.value)


def test_catalogue_order_and_local_paths_are_validated():
    from rpp_tasks.config import config_from_dict
    from rpp_tasks.exceptions import ConfigError

    obs = config_from_dict({"observatory": "x", "catalogs": {"local": ["data/catalogs"]}})
    assert obs.catalogs.gaia_order == ["local", "gaia_tap", "gaia_vizier"]
    setup = catalogs.client_from_config(obs.catalogs)
    assert setup.local_paths[0].endswith("data/catalogs") and setup.local_paths[0].startswith("/")
    with pytest.raises(ConfigError, match=r"catalogs.gaia_order\[1\]"):
        config_from_dict({"observatory": "x", "catalogs": {"gaia_order": ["local", "simbad"]}})


def test_run_targets_from_the_run_conf_reach_the_manifest(tmp_path):
    """A DAG run's ``targets`` (one or a list) are checked and kept in the manifest, where the
    ``targets`` stage reads them; anything else is refused before anything is written."""
    from rpp_tasks.config import find_config
    from rpp_tasks.session import lifecycle
    from rpp_tasks.sim.synthetic import write_synthetic_session

    assert lifecycle.run_conf_targets({"targets": "SN 2025abc"}) == ("SN 2025abc",)
    assert lifecycle.run_conf_targets({"targets": [" 150.1 +2.2", "RR Lyr"]}) == (
        "150.1 +2.2",
        "RR Lyr",
    )
    assert lifecycle.run_conf_targets({}) == ()
    for bad in (3, ["ok", 4], [""], {"name": "x"}, "x" * 201):
        with pytest.raises(ValueError, match="run conf 'targets'"):
            lifecycle.run_conf_targets({"targets": bad})
    raw = tmp_path / "incoming" / "2025-01-15"
    write_synthetic_session(
        raw, truth_folder=tmp_path / "truth", n_science=1, n_bias=1, n_dark=1, n_flat=1
    )
    obs = find_config("demo")
    session = lifecycle.open_session(
        raw, obs, work_root=tmp_path / "work", targets=("SN 2025abc", " ")
    )
    assert session.read_json("manifest.json")["run_targets"] == ["SN 2025abc"]
