"""Local reference catalogues (Gaia DR3 extracts as FITS/ECSV/CSV, fetched cones, ATLAS-RefCat2
tiles): the same answer and the same zero point as the loopback Gaia peer; missing, corrupt or
non-covering files fall back to the next service with the reason recorded."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from service_peers import Peer, add_gaia_routes, make_sky, refused_url

from rpp_tasks.config import config_from_dict
from rpp_tasks.stages import catalogs, localcat
from rpp_tasks.stages.catalogs import ServiceClient, ServicesSetup, fetch_reference

RA0, DEC0 = 150.0, 20.0


# ----------------------------------------------------------------------------- file writers
def gaia_archive_table(sky: Table) -> Table:
    """``sky`` with the Gaia archive column names, as a user's DR3 extract has them."""
    n = len(sky)
    return Table(
        {
            "source_id": np.asarray(sky["source_id"], np.int64),
            "ra": np.asarray(sky["ra"], float),
            "dec": np.asarray(sky["dec"], float),
            "pmra": np.zeros(n),
            "pmdec": np.zeros(n),
            "phot_g_mean_mag": np.asarray(sky["G"], float),
            "phot_bp_mean_mag": np.asarray(sky["BP"], float),
            "phot_rp_mean_mag": np.asarray(sky["RP"], float),
            "phot_g_mean_flux_over_error": np.full(n, 2000.0),
            "phot_bp_mean_flux_over_error": np.full(n, 500.0),
            "phot_rp_mean_flux_over_error": np.full(n, 500.0),
        }
    )


def vizier_table(sky: Table) -> Table:
    n = len(sky)
    t = Table()
    t["Source"] = np.asarray(sky["source_id"], np.int64)
    t["RA_ICRS"], t["DE_ICRS"] = np.asarray(sky["ra"], float), np.asarray(sky["dec"], float)
    t["pmRA"] = t["pmDE"] = np.zeros(n)
    for b in ("G", "BP", "RP"):
        t[f"{b}mag"] = np.asarray(sky[b], float)
        t[f"e_{b}mag"] = np.full(n, 0.003)
    return t


def refcat2_tile_text(sky: Table, *, g_offset=0.0) -> str:
    """Rows in the distributed RefCat2 tile format: 44 integer columns (1e-8 deg, mmag...)."""
    rows = []
    for s in sky:
        vals = dict.fromkeys(localcat.REFCAT2_COLUMNS, 0)
        vals["RA"] = int(round(float(s["ra"]) * 1e8))
        vals["Dec"] = int(round(float(s["dec"]) * 1e8))
        vals["Gaia"], vals["dGaia"] = int(round(float(s["G"]) * 1e3)), 1
        vals["BP"], vals["dBP"] = int(round(float(s["BP"]) * 1e3)), 5
        vals["RP"], vals["dRP"] = int(round(float(s["RP"]) * 1e3)), 5
        vals["dupvar"] = 0
        vals["g"], vals["dg"] = int(round((float(s["G"]) + 0.4 + g_offset) * 1e3)), 8
        vals["r"], vals["dr"] = int(round((float(s["G"]) + 0.1) * 1e3)), 8
        vals["gcontrib"] = vals["rcontrib"] = vals["icontrib"] = vals["zcontrib"] = "1f"
        rows.append(",".join(str(vals[c]) for c in localcat.REFCAT2_COLUMNS))
    return "\n".join(rows) + "\n"


def write_refcat2_tiles(folder, sky: Table, **kw) -> list:
    """Split ``sky`` into one-square-degree tiles named as distributed (``ddd+dd.rc2``)."""
    folder.mkdir(parents=True, exist_ok=True)
    ra0 = np.floor(np.asarray(sky["ra"], float)).astype(int)
    dec0 = np.floor(np.asarray(sky["dec"], float)).astype(int)
    paths = []
    for a, d in sorted(set(zip(ra0, dec0))):
        sel = (ra0 == a) & (dec0 == d)
        p = folder / f"{a:03d}{d:+03d}.rc2"
        p.write_text(refcat2_tile_text(sky[sel], **kw))
        paths.append(p)
    return paths


def _setup(tmp_path, *, local=(), gaia_tap=None, vizier=None, order=("local", "gaia_tap")):
    dead = refused_url()
    urls = dict(
        catalogs.DEFAULT_SERVICES,
        gaia_tap=(gaia_tap or dead) + "/tap",
        gaia_vizier=(vizier or dead) + "/viz-bin/votable",
        ps1=dead + "/panstarrs",
    )
    client = ServiceClient(timeout_s=0.5, max_retries=0, backoff_s=0.01, breaker_s=0.0)
    return ServicesSetup(
        urls=urls,
        client=client,
        cache_dir=str(tmp_path / "cache"),
        gaia_order=tuple(order),
        local_paths=tuple(str(p) for p in local),
    )


@pytest.fixture
def sky():
    return make_sky(RA0, DEC0, n=300, radius_deg=0.3, seed=11)


@pytest.fixture
def peer(sky):
    catalogs.reset_circuit_breaker()
    p = Peer()
    add_gaia_routes(p, sky)
    yield p
    p.close()
    catalogs.reset_circuit_breaker()


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("fmt", ["fits", "ecsv", "csv", "csv.gz", "vizier-fits"])
def test_local_extract_answers_the_same_cone_as_the_gaia_peer(peer, sky, tmp_path, fmt):
    online = fetch_reference(
        RA0,
        DEC0,
        0.2,
        band="G",
        setup=_setup(tmp_path / "a", gaia_tap=peer.url, order=("gaia_tap",)),
    )
    assert online.ok and online.source == "network"
    path = tmp_path / f"extract.{fmt.replace('vizier-', '')}"
    tab = vizier_table(sky) if fmt.startswith("vizier") else gaia_archive_table(sky)
    if fmt == "csv.gz":
        import gzip

        with gzip.open(path, "wt") as fh:
            tab.write(fh, format="ascii.csv")
    else:
        tab.write(path, format={"ecsv": "ascii.ecsv", "csv": "ascii.csv"}.get(fmt, "fits"))
    n_calls = len(peer.calls)
    local = fetch_reference(
        RA0, DEC0, 0.2, band="G", setup=_setup(tmp_path / "b", local=[path], gaia_tap=peer.url)
    )
    assert local.ok and local.source == "local" and local.catalog == "gaia"
    assert [s.service for s in local.statuses] == ["local"] and local.statuses[0].status == "ok"
    assert path.name in local.statuses[0].reason
    assert len(peer.calls) == n_calls  # the network was not asked
    assert len(local.table) == len(online.table) > 100
    a = {int(s): g for s, g in zip(online.table["gaia_source_id"], online.table["mag_G"])}
    b = {int(s): g for s, g in zip(local.table["gaia_source_id"], local.table["mag_G"])}
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-9 for k in a)
    # the same columns and the same band transformations as the online path
    v_on = fetch_reference(
        RA0,
        DEC0,
        0.2,
        band="V",
        setup=_setup(tmp_path / "c", gaia_tap=peer.url, order=("gaia_tap",)),
    )
    v_loc = fetch_reference(RA0, DEC0, 0.2, band="V", setup=_setup(tmp_path / "d", local=[path]))
    assert v_on.transformed and v_loc.transformed
    assert set(v_on.table.colnames) <= set(v_loc.table.colnames)
    va = dict(zip(v_on.table["gaia_source_id"], v_on.table["mag_V"]))
    vb = dict(zip(v_loc.table["gaia_source_id"], v_loc.table["mag_V"]))
    assert max(abs(va[k] - vb[k]) for k in va) < 1e-9


def test_missing_or_corrupt_local_file_falls_back_with_the_reason(peer, sky, tmp_path):
    missing = tmp_path / "nowhere" / "gaia.fits"
    res = fetch_reference(
        RA0, DEC0, 0.2, band="G", setup=_setup(tmp_path / "a", local=[missing], gaia_tap=peer.url)
    )
    assert res.ok and res.source == "network"
    assert [(s.service, s.status) for s in res.statuses] == [
        ("local", "failed"),
        ("gaia_tap", "ok"),
    ]
    assert "no such file" in res.statuses[0].reason and "nowhere" in res.statuses[0].reason

    corrupt = tmp_path / "bad.fits"
    corrupt.write_bytes(b"SIMPLE  =                    T" + b"\x00garbage" * 50)
    truncated = tmp_path / "cut.ecsv"
    text = gaia_archive_table(sky)
    text.write(truncated, format="ascii.ecsv")
    truncated.write_text(truncated.read_text()[:900])  # header cut in the middle
    for bad in (corrupt, truncated):
        localcat._CACHE.clear()
        res = fetch_reference(
            RA0,
            DEC0,
            0.2,
            band="G",
            setup=_setup(tmp_path / bad.stem, local=[bad], gaia_tap=peer.url),
        )
        assert res.ok and res.source == "network", bad
        st = res.statuses[0]
        assert st.service == "local" and st.status == "failed"
        assert bad.name in st.reason and "unreadable" in st.reason, st.reason
    # offline with a corrupt file: no reference, every reason kept
    res = fetch_reference(RA0, DEC0, 0.2, band="G", setup=_setup(tmp_path / "off", local=[corrupt]))
    assert not res.ok and res.flags == ("no_reference",)
    assert [s.status for s in res.statuses] == ["failed", "failed"]
    assert "unreadable" in res.statuses[0].reason and "refused" in res.statuses[1].reason


def test_a_local_cone_not_covering_the_field_is_partial(peer, sky, tmp_path):
    folder = tmp_path / "local"
    small = sky[catalogs.angular_sep_deg(RA0, DEC0, sky["ra"], sky["dec"]) <= 0.1]
    tab = catalogs.normalize_reference(gaia_archive_table(small), "gaia")
    localcat.write_local_cone(folder, RA0, DEC0, 0.1, tab, provenance={"service": "test"})
    # inside the fetched cone: answered locally
    inside = fetch_reference(
        RA0 + 0.01, DEC0, 0.05, band="G", setup=_setup(tmp_path, local=[folder])
    )
    assert inside.ok and inside.source == "local" and inside.statuses[0].status == "ok"
    # a larger field: the online Gaia answers, the local catalogue is recorded as partial
    res = fetch_reference(
        RA0, DEC0, 0.2, band="G", setup=_setup(tmp_path / "a", local=[folder], gaia_tap=peer.url)
    )
    assert res.source == "network" and res.statuses[0].status == "partial"
    assert "covers" in res.statuses[0].reason and "%" in res.statuses[0].reason
    # offline: the partial answer is used, flagged, and its status says partial (no transients)
    off = fetch_reference(RA0, DEC0, 0.2, band="G", setup=_setup(tmp_path / "b", local=[folder]))
    assert off.ok and off.source == "local" and off.flags == ("partial_reference",)
    assert off.statuses[-1].status == "partial"
    # an extract of another part of the sky says so
    far = fetch_reference(
        RA0 + 5, DEC0, 0.2, band="G", setup=_setup(tmp_path / "c", local=[folder])
    )
    assert not far.ok and far.statuses[0].status == "skipped"
    assert "no local file covers" in far.statuses[0].reason


def test_data_derived_coverage_of_an_unnamed_extract(sky, tmp_path):
    """An extract that states no region covers the cap around its stars, with no holes."""
    half = sky[np.asarray(sky["dec"]) > DEC0]  # the northern half of the cone only
    p = tmp_path / "my_extract.fits"
    gaia_archive_table(half).write(p)
    ans = localcat.query_local([p], RA0, DEC0 + 0.15, 0.1)
    assert ans.status == "ok" and ans.coverage == 1.0
    ans = localcat.query_local([p], RA0, DEC0 - 0.06, 0.1)  # mostly south of the extract
    assert ans.status == "partial" and 0.1 < ans.coverage < 0.7, ans.coverage
    assert len(ans.table) > 0 and (np.asarray(ans.table["dec"]) > DEC0).all()


def test_refcat2_tiles_give_native_griz_and_transformed_johnson(peer, sky, tmp_path):
    tiles = write_refcat2_tiles(tmp_path / "refcat2" / "00_m_16", sky)
    assert all(p.name.endswith(".rc2") for p in tiles)
    setup = _setup(tmp_path, local=[tmp_path / "refcat2"])
    g = fetch_reference(RA0, DEC0, 0.2, catalog="ps1", band="g", setup=setup)
    assert g.ok and g.source == "local" and g.catalog == "refcat2" and not g.transformed
    assert [s.service for s in g.statuses] == ["local"]  # asked before PS1 (band is native)
    inside = catalogs.angular_sep_deg(RA0, DEC0, sky["ra"], sky["dec"]) <= 0.2
    assert len(g.table) == inside.sum()
    truth = dict(zip(np.round(sky["G"][inside] + 0.4, 3), sky["source_id"][inside]))
    assert all(round(float(m), 3) in truth for m in g.table["mag_g"])
    assert (g.table["gaia_source_id"] == -1).all()  # a reference star without a Gaia id
    v = fetch_reference(RA0, DEC0, 0.2, band="V", setup=setup)
    assert v.ok and v.transformed and np.isfinite(v.table["mag_V"]).sum() > 0.9 * len(v.table)


def test_gaia_only_local_extract_yields_to_ps1_for_a_ps1_band(sky, tmp_path):
    """A Gaia extract for a g frame: PS1 (native) is asked first, the local Gaia stands among the
    Gaia services and answers with the same transformation as the online Gaia when PS1 is down."""
    p = tmp_path / "gaia.ecsv"
    gaia_archive_table(sky).write(p, format="ascii.ecsv")
    res = fetch_reference(
        RA0, DEC0, 0.2, catalog="ps1", band="g", setup=_setup(tmp_path, local=[p])
    )
    assert [(s.service, s.status) for s in res.statuses] == [("ps1", "failed"), ("local", "ok")]
    assert res.ok and res.transformed and res.source == "local"


def test_overlapping_fetched_cones_are_deduplicated(sky, tmp_path):
    folder = tmp_path / "cones"
    ref = catalogs.normalize_reference(gaia_archive_table(sky), "gaia")
    for dra in (-0.05, 0.05):
        sel = catalogs.angular_sep_deg(RA0 + dra, DEC0, ref["ra"], ref["dec"]) <= 0.15
        localcat.write_local_cone(folder, RA0 + dra, DEC0, 0.15, ref[sel])
    ans = localcat.query_local([folder], RA0, DEC0, 0.1)
    assert ans.status == "ok" and len(ans.files) == 2
    ids = np.asarray(ans.table["gaia_source_id"])
    inside = catalogs.angular_sep_deg(RA0, DEC0, sky["ra"], sky["dec"]) <= 0.1
    assert len(ids) == len(set(ids)) == inside.sum()


# ----------------------------------------------------------------------------- zero point
ZP_TRUE = 24.0


@pytest.fixture(scope="module")
def frame(tmp_path_factory):
    from rpp_tasks.sim.synthetic import make_star_field

    sky = make_sky(RA0, DEC0, n=1500, radius_deg=0.16, seed=4, g_range=(13.0, 18.0))
    fld = make_star_field(
        (512, 512),
        stars=Table({"ra": sky["ra"], "dec": sky["dec"], "mag": sky["G"]}),
        fwhm_px=3.5,
        zero_point_mag=ZP_TRUE,
        exptime_s=60.0,
        wcs_center_deg=(RA0, DEC0),
        filter_name="G",
        n_cosmic_rays=0,
        n_hot_pixels=0,
        seed=5,
        date_obs="2025-01-15T21:00:00.000",
    )
    path = tmp_path_factory.mktemp("localzp") / "frame_G.fits"
    fits.PrimaryHDU(fld.data, fld.header).writeto(path)
    return path, sky


def _obs(tmp_path, *, services, local=()):
    return config_from_dict(
        {
            "observatory": "localzp",
            "site": {"latitude_deg": 43.75, "longitude_deg": 6.92},
            "camera": {"gain_e_per_adu": 1.5, "read_noise_e": 8.0, "saturation_adu": 60000},
            "filters": {"aliases": {"G": "G"}},
            "stages": {"astrometry": {"solve": "never"}, "zero_point": {"min_snr": 30.0}},
            "catalogs": {
                "services": services,
                "enrichment": [],
                "cache_dir": str(tmp_path / "cache"),
                "timeout_s": 1.0,
                "max_retries": 0,
                "local": [str(p) for p in local],
            },
        }
    )


def _zp(summary_dir):
    return json.loads((summary_dir / "zeropoint.json").read_text())


@pytest.mark.parametrize("fmt", ["fits", "refcat2"])
def test_same_zero_point_from_the_local_catalogue_as_from_the_gaia_peer(frame, tmp_path, fmt):
    from rpp_tasks.session import pipeline

    path, sky = frame
    peer = Peer()
    add_gaia_routes(peer, sky)
    catalogs.reset_circuit_breaker()
    try:
        obs = _obs(tmp_path / "on", services={"gaia_tap": peer.url + "/tap"})
        s_on = pipeline.reduce_frame(path, obs, tmp_path / "online")
    finally:
        peer.close()
    catalogs.reset_circuit_breaker()
    if fmt == "fits":
        local = tmp_path / "gaia_dr3_extract.fits"
        gaia_archive_table(sky).write(local)
    else:
        local = tmp_path / "refcat2"
        write_refcat2_tiles(local, sky)
    dead = refused_url()  # offline: every online service refuses the connection
    obs = _obs(
        tmp_path / "off",
        services={"gaia_tap": dead + "/tap", "gaia_vizier": dead + "/viz"},
        local=[local],
    )
    s_off = pipeline.reduce_frame(path, obs, tmp_path / "local")
    assert s_on["status"] == s_off["status"] == "ok", (s_on["reason"], s_off["reason"])
    zon, zoff = _zp(tmp_path / "online"), _zp(tmp_path / "local")
    assert zoff["reference"]["source"] == "local"
    assert zoff["reference"]["services"][0]["status"] == "ok"
    assert zon["reference"]["source"] in ("network", "cache")  # the astrometry stage asked first
    assert zon["reference"]["services"][0]["service"] == "gaia_tap"
    for t in ("1p1fwhm", "1p3fwhm", "fixed", "psf"):
        a, b = zon["types"][t], zoff["types"][t]
        # RefCat2 rounds to 1 mmag: a star or two may cross the clipping limits
        assert a["n_used"] >= 20 and abs(a["n_used"] - b["n_used"]) <= 0.03 * a["n_used"], (t, a, b)
        assert abs(a["zp_mag"] - b["zp_mag"]) < 0.001, (t, a["zp_mag"], b["zp_mag"])
    assert math.isclose(s_on["zp_mag"], s_off["zp_mag"], abs_tol=0.001)
    # offline, the enrichment and transients stages still have their reference: every star of the
    # field has its counterpart, so none is a transient candidate
    assert s_off["stages"]["enrich"]["services"]["gaia"] == "ok"
    tr = s_off["stages"]["transients"]
    assert "no_reference" not in tr["flags"] and tr["n_checked"] > 50
    assert tr["n_candidates"] == 0


def test_a_missing_local_folder_is_warned_once(tmp_path, caplog):
    """qa12: ``--observatory demo`` on a real frame (no ``data/catalogs/demo``) warned 'local
    reference catalogue failed: ... no such file or folder' 2-3 times per frame, every frame."""
    import logging

    missing = tmp_path / "nowhere"
    setup = _setup(tmp_path, local=[missing], order=("local",))
    with caplog.at_level(logging.INFO, logger="rpp_tasks.stages.catalogs"):
        for dec in (DEC0, DEC0 + 1.0, DEC0 + 2.0):
            res = fetch_reference(RA0, dec, 0.2, band="G", setup=setup)
            assert not res.ok and "no such file" in res.statuses[0].reason
    said = [r for r in caplog.records if "local reference catalogue failed" in r.getMessage()]
    assert len(said) == 3
    assert [r.levelno for r in said].count(logging.WARNING) == 1
    assert said[-1].levelno == logging.INFO
