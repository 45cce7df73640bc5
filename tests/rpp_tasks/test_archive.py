"""Pure ObsCore row tests (units, MJD, metres, kB, SIP footprint) and the SQLite archive."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from rpp_tasks.outputs.archive import (
    OBSCORE_COLUMNS,
    celestial_footprint,
    covering_query,
    dali_to_spoly,
    dali_to_stcs,
    make_publisher_did,
    polygon_contains,
    read_product_header,
    run_archive,
    spectral_range_m,
    spoly_to_dali,
    to_obscore_row,
    upsert_obscore,
)
from rpp_tasks.outputs.bandpasses import BANDPASSES, canonical_band, lookup_bandpass
from rpp_tasks.outputs.obscore import OBSCORE_MANDATORY as MANDATORY

HUNTSMAN = "huntsman/raw/science_0.fits"
SPECTRUM = "spectra/ciboulette_sa200/Pn_R_hd8538_20231008_836.fits"
COMMON = dict(
    access_url="http://localhost/x.fits",
    obs_collection="rpp-test/demo",
    publisher_authority="rpp.example.org",
)


def _tan_header(*, ra=150.0, dec=2.0, nx=200, ny=100, scale_deg=1 / 3600, flip=False):
    h = fits.Header()
    h["NAXIS"], h["NAXIS1"], h["NAXIS2"] = 2, nx, ny
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRVAL1"], h["CRVAL2"] = ra, dec
    h["CRPIX1"], h["CRPIX2"] = (nx + 1) / 2, (ny + 1) / 2
    h["CD1_1"], h["CD2_2"] = (scale_deg if flip else -scale_deg), scale_deg
    h["CD1_2"] = h["CD2_1"] = 0.0
    h["RADESYS"] = "ICRS"
    h["DATE-OBS"] = "2024-01-15T19:29:42.5"
    h["EXPTIME"] = 120.0
    h["FILTER"] = "V"
    h["OBJECT"] = "M 42"
    h["TELESCOP"] = "T60"
    h["INSTRUME"] = "QHY600"
    return h


# ------------------------------------------------------------------ bandpasses


@pytest.mark.parametrize(
    ("raw", "band"),
    [
        ("V", "V"),
        ("Johnson V", "V"),
        ("R", "R"),
        ("r", "r"),
        ("r'", "r'"),
        ("Sloan r'", "r'"),
        ("g_band", "g"),
        ("IRCUT", "L"),
        ("Lum", "L"),
        ("Clear", "Clear"),
        ("CLR", "Clear"),
        ("Gaia G", "Gaia G"),
        ("BP", "Gaia BP"),
        ("G_RP", "Gaia RP"),
        ("i_PS1", "PS1 i"),
        ("H-alpha", "Ha"),
        ("G", None),
        ("w", None),
        ("", None),
        (None, None),
    ],
)
def test_canonical_band_aliases(raw, band):
    assert canonical_band(raw) == band


def test_bandpass_edges_in_metres():
    v = lookup_bandpass("V")
    assert (v.em_min_m, v.em_max_m) == pytest.approx((480e-9, 730e-9))
    assert lookup_bandpass("Gaia G").em_max_m == pytest.approx(1030e-9)
    # Gaia BP/RP, Cousins, Sloan and the project's own Clear / L definitions (metres)
    for raw, lo_nm, hi_nm in (
        ("Gaia BP", 325, 673),
        ("Gaia RP", 620, 1042),
        ("Rc", 560, 870),
        ("Ic", 700, 920),
        ("Sloan g'", 365, 580),
        ("SDSS r", 542, 699),
        ("Clear", 300, 1100),
        ("Unfiltered", 300, 1100),
        ("L", 390, 710),
        ("IRCUT", 390, 710),
    ):
        bp = lookup_bandpass(raw)
        assert (bp.em_min_m, bp.em_max_m) == pytest.approx((lo_nm * 1e-9, hi_nm * 1e-9)), raw
    for bp in BANDPASSES.values():
        assert 2e-7 < bp.em_min_m < bp.em_eff_m < bp.em_max_m < 1.2e-6, bp.name
        assert bp.source


# ------------------------------------------------------------------ footprint / WCS


def test_linear_footprint_matches_pixel_edges_and_is_counter_clockwise():
    h = _tan_header()
    fp = celestial_footprint(h)
    assert len(fp.vertices_deg) == 4 and not fp.sip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # datfix: MJD-OBS from DATE-OBS
        w = WCS(h)
    corners = w.calc_footprint(center=False)  # outer pixel edges, 1-based 0.5 ... n+0.5
    got = sorted(fp.vertices_deg)
    want = sorted(map(tuple, corners))
    assert np.allclose(got, want, atol=1e-9)
    assert fp.center_ra_deg == pytest.approx(150.0, abs=1e-9)
    assert fp.fov_deg == pytest.approx(math.hypot(200, 100) / 3600, rel=1e-4)  # diagonal
    assert fp.pixel_scale_arcsec == pytest.approx(1.0)
    # the same handedness as DALI's example whatever the image parity
    flipped = celestial_footprint(_tan_header(flip=True))
    for f in (fp, flipped):
        xyz = [
            (
                math.cos(math.radians(d)) * math.cos(math.radians(r)),
                math.cos(math.radians(d)) * math.sin(math.radians(r)),
                math.sin(math.radians(d)),
            )
            for r, d in f.vertices_deg
        ]
        c = np.mean(xyz, axis=0)
        s = sum(np.dot(np.cross(xyz[i], xyz[(i + 1) % 4]), c) for i in range(4))
        assert s > 0


def test_footprint_across_ra_zero():
    fp = celestial_footprint(_tan_header(ra=0.01, nx=600, ny=600))
    ras = [ra for ra, _ in fp.vertices_deg]
    assert all(0 <= ra < 360 for ra in ras) and min(ras) < 1 and max(ras) > 359
    assert polygon_contains(fp.to_dali(), 0.0, 2.0)
    assert polygon_contains(fp.to_dali(), 359.99, 2.0)
    assert not polygon_contains(fp.to_dali(), 180.0, 2.0)


@pytest.mark.realdata
def test_huntsman_sip_footprint_equals_astropy_with_sip(real_data):
    """science_0 has SIP terms but CTYPE without -SIP: the footprint must include SIP."""
    header = read_product_header(real_data / HUNTSMAN)
    fp = celestial_footprint(header)
    assert fp.sip and len(fp.vertices_deg) == 16
    assert "CTYPE without -SIP: SIP applied" in fp.notes
    fixed = header.copy()
    fixed["CTYPE1"], fixed["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = WCS(fixed)
        lin = WCS(fixed)
    lin.sip = None
    # the 4 outer corners (every 4th vertex) equal astropy's SIP-aware footprint
    # once converted from RADESYS='FK5' to ICRS (a ~14 mas shift here)
    from astropy.coordinates import FK5, SkyCoord

    fk5 = w.calc_footprint(center=False)
    icrs = SkyCoord(fk5[:, 0], fk5[:, 1], unit="deg", frame=FK5(equinox="J2000")).icrs
    corners_ours = sorted(fp.vertices_deg[::4])
    corners_astropy = sorted(zip(icrs.ra.deg, icrs.dec.deg))
    assert np.max(np.abs(np.subtract(corners_ours, corners_astropy))) < 1e-8
    # these SIP terms move the corners by ~0.07 arcsec versus the linear WCS: we see it
    corners_linear = sorted(map(tuple, lin.calc_footprint(center=False)))
    assert np.max(np.abs(np.subtract(corners_ours, corners_linear))) > 1e-5
    # the centre, the 16.8' x 16.8' field and the 1.26"/px scale of SOURCES.md
    assert (fp.center_ra_deg, fp.center_dec_deg) == pytest.approx((65.1621, -54.9358), abs=2e-4)
    assert fp.fov_deg == pytest.approx(800 * 1.26 * math.sqrt(2) / 3600, rel=0.01)
    assert fp.pixel_scale_arcsec == pytest.approx(1.26, abs=0.005)
    # a pixel-edge midpoint from the SIP-aware WCS lies on our polygon's edge sample
    mid = SkyCoord(
        *w.pixel_to_world_values(399.5 - 200, -0.5), unit="deg", frame=FK5(equinox="J2000")
    ).icrs
    assert np.min(np.hypot(*(np.array(fp.vertices_deg) - [mid.ra.deg, mid.dec.deg]).T)) < 1e-8


# ------------------------------------------------------------------ rows


@pytest.mark.realdata
def test_huntsman_row_units(real_data):
    path = real_data / HUNTSMAN
    header = read_product_header(path)
    row = to_obscore_row(
        header,
        product_path=path,
        fwhm_arcsec=2.7,
        facility_name="Huntsman",
        session_id="huntsman/2021-01-18",
        **COMMON,
    )
    assert row.dataproduct_type == "image" and row.calib_level == 2
    assert row.t_min == pytest.approx(Time("2021-01-18T11:26:32.228", scale="utc").mjd, abs=1e-9)
    assert row.t_min == pytest.approx(header["MJD-OBS"], abs=1e-6)
    assert (row.t_max - row.t_min) * 86400 == pytest.approx(300.0, abs=1e-3)
    assert row.t_exptime == 300.0
    assert (row.em_min, row.em_max) == pytest.approx((378e-9, 555e-9))  # g_band -> SDSS g
    assert row.rpp_band == "g"
    assert row.access_estsize == math.ceil(path.stat().st_size / 1024) == 1275  # kB
    assert row.s_xel1 == row.s_xel2 == 800
    assert row.s_resolution == 2.7 and row.s_pixel_scale == pytest.approx(1.26, abs=0.005)
    assert row.target_name == "DoradoGroup-p0p0"
    assert row.instrument_name == "371d420013090900" and row.facility_name == "Huntsman"
    assert row.obs_publisher_did == (
        "ivo://rpp.example.org/~?rpp-test/demo/371d420013090900_20210118T112632.228/image"
    )
    assert row.o_ucd == "phot.count" and row.em_ucd == "em.wl" and row.access_format == "image/fits"
    assert len(row.s_region.split()) == 32
    assert polygon_contains(row.s_region, 65.1621, -54.9358)
    assert not polygon_contains(row.s_region, 65.1621, -54.6)
    assert set(row.to_dict()) == set(OBSCORE_COLUMNS)


@pytest.mark.realdata
def test_huntsman_row_every_mandatory_column(real_data):
    """All 30 mandatory columns (plus s_pixel_scale) with values derived independently of the
    archive code: header keywords, astropy's SIP-aware WCS, the file size."""
    from astropy.coordinates import FK5, SkyCoord

    assert len(MANDATORY) == 30 and set(MANDATORY) <= set(OBSCORE_COLUMNS)
    path = real_data / HUNTSMAN
    header = read_product_header(path)
    row = to_obscore_row(
        header, product_path=path, fwhm_arcsec=2.7, facility_name="Huntsman", **COMMON
    ).to_dict()
    sip = header.copy()
    sip["CTYPE1"], sip["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = WCS(sip)
    fk5 = FK5(equinox="J2000")  # header RADESYS = 'FK5'
    centre = SkyCoord(*w.pixel_to_world_values(399.5, 399.5), unit="deg", frame=fk5).icrs
    c = w.calc_footprint(center=False)
    corners = SkyCoord(c[:, 0], c[:, 1], unit="deg", frame=fk5).icrs
    t0 = Time("2021-01-18T11:26:32.228", scale="utc").mjd  # DATE-OBS
    expected = {
        "dataproduct_type": "image",
        "calib_level": 2,
        "obs_collection": "rpp-test/demo",
        "obs_id": "371d420013090900_20210118T112632.228",  # INSTRUME_DATE-OBS
        "obs_publisher_did": "ivo://rpp.example.org/~?rpp-test/demo/"
        "371d420013090900_20210118T112632.228/image",
        "access_url": "http://localhost/x.fits",
        "access_format": "image/fits",
        "access_estsize": math.ceil(path.stat().st_size / 1024),  # kB
        "target_name": "DoradoGroup-p0p0",  # OBJECT
        "s_ra": centre.ra.deg,
        "s_dec": centre.dec.deg,
        "s_fov": corners[0].separation(corners[2]).deg,  # diagonal, as DaCHS
        "s_resolution": 2.7,
        "s_xel1": 800,
        "s_xel2": 800,
        "t_min": t0,
        "t_max": t0 + 300.0 / 86400,
        "t_exptime": 300.0,
        "t_resolution": 300.0,
        "t_xel": 1,
        "em_min": 378e-9,
        "em_max": 555e-9,  # FILTER g_band: SDSS g
        "em_res_power": None,
        "em_xel": 1,
        "o_ucd": "phot.count",
        "pol_states": None,
        "pol_xel": None,
        "facility_name": "Huntsman",
        "instrument_name": "371d420013090900",
    }
    for col in MANDATORY:
        if col == "s_region":
            continue
        want, got = expected[col], row[col]
        if isinstance(want, float):
            tol = {"s_ra": 1e-8, "s_dec": 1e-8, "s_fov": 1e-6, "t_min": 1e-9, "t_max": 1e-9}
            assert got == pytest.approx(want, abs=tol.get(col, 0) or None, rel=1e-12), col
        else:
            assert got == want and type(got) is type(want), col
    assert row["s_pixel_scale"] == pytest.approx(
        3600 * math.sqrt(abs(np.linalg.det(w.pixel_scale_matrix))), rel=1e-3
    )
    # s_region: 16 vertices; its 4 outer corners are astropy's SIP corners (in ICRS)
    verts = np.array([float(v) for v in row["s_region"].split()]).reshape(-1, 2)
    assert verts.shape == (16, 2)
    assert np.allclose(
        sorted(map(tuple, verts[::4])), sorted(zip(corners.ra.deg, corners.dec.deg)), atol=1e-7
    )


@pytest.mark.realdata
def test_did_is_stable_and_reprocessing_gives_same_row_key(real_data):
    header = read_product_header(real_data / HUNTSMAN)
    a = to_obscore_row(header, **COMMON)
    b = to_obscore_row(header.copy(), fwhm_arcsec=3.1, **COMMON)
    assert a.obs_publisher_did == b.obs_publisher_did and a.obs_id == b.obs_id


@pytest.mark.realdata
def test_spectrum_row_from_1d_wcs(real_data):
    header = read_product_header(real_data / SPECTRUM)
    lo, hi, n = spectral_range_m(header)
    # CRVAL1=5991.16 A, CDELT1=2.5016 A, 560 px, pixel edges: 5989.91 ... 7390.81 A
    assert n == 560
    assert lo == pytest.approx((5991.161814412 - 0.5 * 2.501599867) * 1e-10, rel=1e-9)
    assert hi == pytest.approx((5991.161814412 + 559.5 * 2.501599867) * 1e-10, rel=1e-9)
    row = to_obscore_row(header, **COMMON)
    assert row.dataproduct_type == "spectrum" and row.access_format == "application/fits"
    assert (row.em_min, row.em_max, row.em_xel) == (lo, hi, 560)
    assert row.em_res_power == 200.0 and row.t_exptime == 600.0
    assert row.t_min == pytest.approx(Time("2023-10-08T20:04:00").mjd)
    assert row.target_name == "HD8538" and row.instrument_name == "O85mmF6_SA200_R_imx219"
    # no position in the header: no footprint, never a guessed one
    assert row.s_region is None and row.s_ra is None and row.s_fov is None
    with_pos = to_obscore_row(
        header, ra_deg=21.454, dec_deg=60.2353, aperture_arcsec=10.0, **COMMON
    )
    assert with_pos.s_fov == pytest.approx(10 / 3600)
    assert polygon_contains(with_pos.s_region, 21.454, 60.2353)
    assert not polygon_contains(with_pos.s_region, 21.454, 60.2353 + 6 / 3600)


def test_spectrum_units_nm_and_air_to_vacuum():
    h = fits.Header(
        {
            "NAXIS": 1,
            "NAXIS1": 100,
            "CTYPE1": "AWAV",
            "CUNIT1": "nm",
            "CRVAL1": 650.0,
            "CDELT1": 0.1,
            "CRPIX1": 1,
        }
    )
    lo, hi, n = spectral_range_m(h)
    assert lo == pytest.approx(649.95e-9 * 1.000276, rel=2e-6)  # n_air(650 nm) ~ 1.000276
    assert hi == pytest.approx(659.95e-9 * 1.000276, rel=2e-6)
    h["CUNIT1"] = "deg"
    assert spectral_range_m(h) is None


@pytest.mark.realdata
def test_frame_without_wcs_gets_row_without_footprint(real_data):
    path = real_data / "saao_1m/a8280271.fits"
    row = to_obscore_row(read_product_header(path), product_path=path, **COMMON)
    assert row.s_region is None and row.s_fov is None and row.s_pixel_scale is None
    # position = the header pointing (RA ' 22:04:08' hours, DEC '-00:55:31')
    assert (row.s_ra, row.s_dec) == pytest.approx((331.03333, -0.92528), abs=1e-4)
    assert row.t_min == pytest.approx(Time("2013-07-13T00:57:33", scale="utc").mjd, abs=0.02)


def test_broken_wcs_gives_no_footprint():
    h = _tan_header()
    h["CD1_1"] = h["CD2_2"] = 0.0  # singular matrix
    row = to_obscore_row(h, **COMMON)
    assert row.s_region is None and row.s_fov is None
    h2 = _tan_header(scale_deg=1.0)  # 200 deg wide "image": not plausible
    assert celestial_footprint(h2) is None


def test_pointing_only_wcs_without_scale_gets_no_footprint():
    """CTYPE/CRVAL/CRPIX but no CDELT/CD: astropy would read 1 deg/px (a 47 deg 'footprint' for
    40x30 px); the row must have no footprint, only the header pointing."""
    h = fits.Header()
    h["NAXIS"], h["NAXIS1"], h["NAXIS2"] = 2, 40, 30
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRVAL1"], h["CRVAL2"], h["CRPIX1"], h["CRPIX2"] = 150.0, 2.0, 20.0, 15.0
    h["RA"], h["DEC"] = 150.0, 2.0
    h["DATE-OBS"], h["EXPTIME"], h["FILTER"] = "2024-01-15T19:29:42.5", 10.0, "V"
    assert celestial_footprint(h) is None
    row = to_obscore_row(h, **COMMON)
    assert row.s_region is None and row.s_fov is None and row.s_pixel_scale is None
    assert (row.s_ra, row.s_dec) == (150.0, 2.0)  # the pointing, not a WCS centre
    assert (row.s_xel1, row.s_xel2) == (40, 30)
    # the same header with a real scale (0.3 deg/px) does get its 12 x 9 deg footprint
    h["CDELT1"], h["CDELT2"] = -0.3, 0.3
    fp = celestial_footprint(h)
    assert fp is not None and fp.fov_deg == pytest.approx(14.9151, abs=1e-3)
    assert polygon_contains(fp.to_dali(), 150.0, 2.0) and not polygon_contains(
        fp.to_dali(), 150.0, 7.0
    )


def test_row_validation():
    h = _tan_header()
    with pytest.raises(ValueError, match="calib_level"):
        to_obscore_row(h, calib_level=7, **COMMON)
    with pytest.raises(ValueError, match="dataproduct_type"):
        to_obscore_row(h, dataproduct_type="picture", **COMMON)
    with pytest.raises(ValueError, match="obs_collection"):
        to_obscore_row(h, **{**COMMON, "obs_collection": " "})
    del h["DATE-OBS"]
    with pytest.raises(ValueError, match="obs_id"):
        to_obscore_row(h, **COMMON)


def test_unknown_filter_leaves_em_empty():
    h = _tan_header()
    h["FILTER"] = "RGGB"
    row = to_obscore_row(h, **COMMON)
    assert row.em_min is None and row.em_max is None and row.rpp_band == "RGGB"
    assert to_obscore_row(h, band="L", **COMMON).em_min == pytest.approx(390e-9)


def test_did_forms():
    assert (
        make_publisher_did("ivo://rpp.example.org/archive", "c", "o 1", "image")
        == "ivo://rpp.example.org/archive?c/o%201/image"
    )
    assert (
        make_publisher_did("rpp.example.org", "c", "o", "image")
        == "ivo://rpp.example.org/~?c/o/image"
    )


def test_polygon_serialisations_round_trip():
    dali = "10.0000000 10.0000000 10.2000000 10.0000000 10.2000000 10.2000000 10.0000000 10.2000000"
    assert dali_to_spoly(dali).startswith("{(10.0000000d,10.0000000d),(10.2000000d,")
    assert dali_to_stcs(dali).startswith("Polygon ICRS 10.0000000 10.0000000")
    rad = "{(%r , %r),(%r , %r),(%r , %r)}" % (  # noqa: UP031 - pgsphere literal
        math.radians(10),
        math.radians(10),
        math.radians(10.2),
        math.radians(10),
        math.radians(10.2),
        math.radians(10.2),
    )
    assert np.allclose(
        [float(v) for v in spoly_to_dali(rad).split()], [10, 10, 10.2, 10, 10.2, 10.2], atol=1e-7
    )
    assert polygon_contains(dali, 10.1, 10.1)
    assert not polygon_contains(dali, 10.3, 10.1)
    assert polygon_contains(dali, 10.3, 10.1, radius_deg=0.11)
    assert not polygon_contains(dali, 10.3, 10.1, radius_deg=0.09)


# ------------------------------------------------------------------ SQLite archive


@pytest.mark.realdata
def test_sqlite_upsert_reupsert_and_covering_query(real_data, tmp_path):
    url = f"sqlite:///{tmp_path / 'archive.db'}"
    first = run_archive(
        [real_data / HUNTSMAN, real_data / "saao_1m/a8280271.fits"],
        url=url,
        obs_collection="rpp-test/sqlite",
        publisher_authority="rpp.example.org",
        access_url_base="https://archive.example.org/products",
        products_root=real_data,
        session_id="s1",
        facility_name="Huntsman",
    )
    assert first["table"] == "rpp_main" and first["dialect"] == "sqlite"
    assert (first["n_rows"], first["n_inserted"], first["n_updated"]) == (2, 2, 0)
    assert first["no_footprint"] == [str(real_data / "saao_1m/a8280271.fits")]
    again = run_archive(
        [{"product_path": str(real_data / HUNTSMAN), "fwhm_arcsec": 3.3}],
        url=url,
        obs_collection="rpp-test/sqlite",
        publisher_authority="rpp.example.org",
        session_id="s2",
    )
    assert (again["n_inserted"], again["n_updated"]) == (0, 1)

    import sqlite3

    con = sqlite3.connect(tmp_path / "archive.db")
    assert con.execute("SELECT count(*) FROM rpp_main").fetchone()[0] == 2
    assert con.execute("SELECT count(DISTINCT obs_publisher_did) FROM rpp_main").fetchone()[0] == 2
    con.close()

    hits = covering_query(url, 65.1621, -54.9358)
    assert [h["obs_id"] for h in hits] == ["371d420013090900_20210118T112632.228"]
    assert hits[0]["s_resolution"] == 3.3 and hits[0]["rpp_session"] == "s2"  # updated values
    assert hits[0]["access_url"].startswith("file://")
    assert polygon_contains(hits[0]["s_region"], 65.1621, -54.9358)
    assert covering_query(url, 65.1621, -54.6) == []  # 0.34 deg north: outside
    assert len(covering_query(url, 65.1621, -54.6, radius_deg=0.2)) == 1  # circle reaches it
    assert covering_query(url, 331.0333, -0.9253) == []  # no footprint, not found


def test_upsert_single_row_sqlite_bare_path(tmp_path):
    from rpp_tasks.outputs.archive import create_obscore_table

    db = tmp_path / "a.db"
    assert create_obscore_table(str(db)) == "rpp_main"
    row = to_obscore_row(_tan_header(), **COMMON)
    assert upsert_obscore(row, str(db)).n_inserted == 1
    assert upsert_obscore([row], str(db)).n_updated == 1
    assert [r["obs_id"] for r in covering_query(str(db), 150.0, 2.0)] == [row.obs_id]


def test_run_archive_on_pipeline_frame_summary_as_the_dag_calls_it(tmp_path):
    """The DAG passes ``frames/<stem>/summary.json`` of ok frames: the row must describe the
    calibrated product (not the raw frame), with the summary's FWHM and band."""
    from pathlib import Path

    from rpp_tasks.config import find_config
    from rpp_tasks.inputs.wcs import header_wcs
    from rpp_tasks.session import pipeline
    from rpp_tasks.sim import synthetic

    repo = Path(__file__).resolve().parents[2]
    paths = synthetic.write_synthetic_session(
        tmp_path / "raw",
        truth_folder=tmp_path / "truth",
        n_science=1,
        n_bias=1,
        n_dark=1,
        n_flat=1,
        shape=(256, 256),
        seed=5,
    )
    obs = find_config("demo", repo / "config")
    frame_dir = tmp_path / "work" / "frames" / "demo_V_001"
    summary = pipeline.reduce_frame(paths["science"][0], obs, frame_dir)
    assert summary["status"] == "ok", summary["reason"]
    calibrated = Path(summary["calibrated"])
    url = f"sqlite:///{tmp_path / 'archive.sqlite'}"
    kwargs = dict(
        url=url,
        obs_collection=obs.archive.obs_collection,
        publisher_authority=obs.archive.publisher_authority,
        session_id="demo/2025-01-15",
        facility_name=obs.camera.telescope,
        instrument_name=obs.camera.name,
    )
    res = run_archive([str(frame_dir / "summary.json")], **kwargs)
    assert (res["n_rows"], res["n_inserted"], res["no_footprint"], res["skipped"]) == (1, 1, [], [])
    wcs = header_wcs(fits.getheader(calibrated))
    (hit,) = covering_query(url, wcs.center_ra_deg, wcs.center_dec_deg)
    assert hit["access_url"] == calibrated.resolve().as_uri()
    assert hit["access_estsize"] == math.ceil(calibrated.stat().st_size / 1024)
    assert hit["s_resolution"] == pytest.approx(summary["fwhm_arcsec"], rel=1e-12)
    assert hit["t_min"] == pytest.approx(summary["mjd_obs"], abs=1e-8) and hit["t_exptime"] == 60.0
    assert (hit["em_min"], hit["em_max"]) == pytest.approx((480e-9, 730e-9), rel=1e-12)
    assert hit["rpp_band"] == "V"
    assert (hit["s_xel1"], hit["s_xel2"]) == (256, 256)
    assert hit["s_ra"] == pytest.approx(wcs.center_ra_deg, abs=1e-9)
    assert (hit["obs_collection"], hit["facility_name"], hit["instrument_name"]) == (
        "RPP/DEMO",
        "Demo 0.4 m",
        "SYNTH-CCD",
    )
    assert hit["obs_publisher_did"].startswith("ivo://rpp.example/archive?RPP/DEMO/")
    # 0.1 deg away from a 256" field: outside
    assert covering_query(url, wcs.center_ra_deg, wcs.center_dec_deg + 0.1) == []
    # the DAG's re-run of the session: same row updated
    again = run_archive([str(frame_dir / "summary.json")], **kwargs)
    assert (again["n_inserted"], again["n_updated"]) == (0, 1)
