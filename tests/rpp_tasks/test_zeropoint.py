"""Zero point per photometry type: clipping, residual cut, colour term, extinction, error
propagation, and end to end on a synthetic frame rendered from the sky the loopback Gaia answers
with."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table
from service_peers import Peer, add_gaia_routes, make_sky

from rpp_tasks.stages import catalogs
from rpp_tasks.stages.zeropoint import airmass, calibrate_catalog, measure_zero_point

ZP_TRUE = 22.0


def test_recovers_known_offset_with_weights():
    rng = np.random.default_rng(0)
    ref = rng.uniform(12, 16, 200)
    err = np.full(200, 0.02)
    r = measure_zero_point(
        ref - 25.0 + rng.normal(0, 0.02, 200), ref, instr_err=err, ref_err=err * 0
    )
    assert r.zp_mag == pytest.approx(25.0, abs=0.006) and r.flags == ()
    assert 0.001 < r.zp_err_mag < 0.004


def test_outliers_are_clipped_and_residual_cut():
    ref = np.full(50, 14.0) + np.linspace(0, 1, 50)
    instr = ref - 25.0
    instr[:3] += 2.0  # clipped
    instr[3:5] += 0.2  # inside 3 sigma of a zero MAD? no: MAD ~ 0 -> clipped too
    r = measure_zero_point(instr, ref, max_residual_mag=0.1)
    assert r.n_rejected == 5 and r.zp_mag == pytest.approx(25.0, abs=1e-9)


def test_colour_term_is_fitted():
    rng = np.random.default_rng(1)
    colour = rng.uniform(0.3, 2.0, 300)
    ref = rng.uniform(12, 16, 300)
    instr = ref - 24.0 - 0.08 * colour + rng.normal(0, 0.01, 300)
    r = measure_zero_point(instr, ref, colour=colour, colour_term=True)
    assert r.colour_term == pytest.approx(0.08, abs=0.005) and r.zp_mag == pytest.approx(
        24.0, abs=0.006
    )


def test_extinction_is_applied():
    ref = np.linspace(12, 16, 20)
    r = measure_zero_point(ref - 25.0, ref, extinction_mag=0.3)
    assert r.zp_mag == pytest.approx(25.3)


def test_too_few_stars_is_flagged_not_raised():
    r = measure_zero_point([1.0, 2.0], [26.0, 27.0], min_stars=5)
    assert math.isnan(r.zp_mag) and r.flags == ("too_few_stars",)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="same shape"):
        measure_zero_point([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="colour_term"):
        measure_zero_point([1.0], [1.0], colour_term=True)


def test_airmass_zenith_and_horizon():
    # a star on the meridian at the site's latitude: X = 1; lon 0, RA = GMST at that instant
    mjd = 60000.0
    d = mjd + 2400000.5 - 2451545.0
    gmst = (280.46061837 + 360.98564736629 * d) % 360
    assert airmass(gmst, 40.0, mjd, latitude_deg=40.0, longitude_deg=0.0) == pytest.approx(
        1.0, abs=1e-3
    )
    x60 = airmass(gmst, -20.0, mjd, latitude_deg=40.0, longitude_deg=0.0)  # zenith distance 60 deg
    assert x60 == pytest.approx(1.995, abs=0.01)
    assert math.isnan(airmass((gmst + 180) % 360, -60.0, mjd, latitude_deg=40.0, longitude_deg=0.0))


def _astropy_airmass(ra, dec, isot, lat, lon):
    """Independent airmass: astropy AltAz (no refraction, offline IERS) + the same Kasten & Young
    formula."""
    import warnings

    import astropy.units as u
    from astropy.coordinates import AltAz, EarthLocation, SkyCoord
    from astropy.time import Time
    from astropy.utils import iers

    with iers.conf.set_temp("auto_download", False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = Time(isot, scale="utc")
        alt = (
            SkyCoord(ra * u.deg, dec * u.deg)
            .transform_to(
                AltAz(obstime=t, location=EarthLocation(lat=lat * u.deg, lon=lon * u.deg))
            )
            .alt.deg
        )
    return t.mjd, 1.0 / (math.sin(math.radians(alt)) + 0.50572 * (alt + 6.07995) ** -1.6364)


@pytest.mark.parametrize(
    "ra, dec, isot, lat, lon",
    [
        (150.0, 20.0, "2025-01-15T21:00:30", 43.75, 6.92),  # Calern, low field: X ~ 2.3
        (
            315.44,
            68.13,
            "2024-07-31T02:44:50",
            32.90,
            -79.76,
        ),  # the real Seestar NGC 7023 frame's site and time
        (
            65.16,
            -54.94,
            "2021-01-18T11:26:32",
            -31.27,
            149.06,
        ),  # Huntsman (Siding Spring) science_0
        (10.0, -30.0, "2019-10-01T23:00:00", -29.26, -70.73),
    ],
)
def test_airmass_from_site_and_time_matches_astropy_altaz(ra, dec, isot, lat, lon):
    mjd, expect = _astropy_airmass(ra, dec, isot, lat, lon)
    got = airmass(ra, dec, mjd, latitude_deg=lat, longitude_deg=lon)
    assert got == pytest.approx(expect, abs=2e-3 * expect), (got, expect)


def test_no_reference_leaves_flagged_empty_columns():
    cat = Table(
        {"ra": [1.0], "dec": [1.0], "mag_psf": [-5.0], "mag_err_psf": [0.01], "snr_psf": [100.0]}
    )
    out, zps = calibrate_catalog(cat, None, band="V", ref_band="V", types=("psf",))
    assert "no_reference" in zps.flags and math.isnan(out["mag_cal_psf"][0])
    assert zps.to_dict()["zp_mag"] is None


# ----------------------------------------------------------------------------- end to end
def _aperture_fraction(radius_px, fwhm_px):
    """Fraction of a pixel-integrated Gaussian star's flux inside a circular aperture (mean over
    sub-pixel positions), with the exact-overlap aperture photutils uses."""
    from photutils.aperture import CircularAperture

    from rpp_tasks.sim.synthetic import render_psf_stamps

    rng = np.random.default_rng(3)
    dx, dy = rng.uniform(-0.5, 0.5, 16), rng.uniform(-0.5, 0.5, 16)
    h = 25
    stamps = render_psf_stamps(dx, dy, h, psf="gaussian", fwhm_px=fwhm_px)
    fr = [
        CircularAperture((h + a, h + b), radius_px).do_photometry(s, method="exact")[0][0]
        for s, a, b in zip(stamps, dx, dy)
    ]
    return float(np.mean(fr))


@pytest.fixture(scope="module")
def synthetic_frame(tmp_path_factory):
    from rpp_tasks.sim.synthetic import make_star_field

    sky = make_sky(150.0, 20.0, n=1500, radius_deg=0.16, seed=4, g_range=(13.0, 18.0))
    rend = Table({"ra": sky["ra"], "dec": sky["dec"], "mag": sky["G"]})
    fld = make_star_field(
        (512, 512),
        stars=rend,
        fwhm_px=3.5,
        zero_point_mag=ZP_TRUE,
        exptime_s=60.0,
        wcs_center_deg=(150.0, 20.0),
        pixel_scale_arcsec=1.0,
        filter_name="G",
        n_cosmic_rays=0,
        n_hot_pixels=0,
        seed=5,
        date_obs="2025-01-15T21:00:00.000",
    )
    path = tmp_path_factory.mktemp("zp") / "frame_G.fits"
    from astropy.io import fits

    fits.PrimaryHDU(fld.data, fld.header).writeto(path)
    return path, sky, fld


def test_end_to_end_zero_point_every_type_within_5_mmag(synthetic_frame, tmp_path):
    from rpp_tasks.config import config_from_dict
    from rpp_tasks.session import pipeline

    path, sky, fld = synthetic_frame
    peer = Peer()
    add_gaia_routes(peer, sky)
    catalogs.reset_circuit_breaker()
    try:
        obs = config_from_dict(
            {
                "observatory": "zptest",
                "site": {"latitude_deg": 43.75, "longitude_deg": 6.92},
                "camera": {"gain_e_per_adu": 1.5, "read_noise_e": 8.0, "saturation_adu": 60000},
                "filters": {"aliases": {"G": "G"}},
                "stages": {"astrometry": {"solve": "never"}, "zero_point": {"min_snr": 30.0}},
                "catalogs": {
                    "services": {
                        "gaia_tap": peer.url + "/tap",
                        "gaia_vizier": peer.url + "/viz-bin/votable",
                        "simbad": peer.url + "/simbad",
                        "skybot": peer.url + "/skybot",
                        "vizier": peer.url + "/viz-bin/votable",
                    },
                    "enrichment": [],
                    "cache_dir": str(tmp_path / "cache"),
                    "timeout_s": 2.0,
                },
            }
        )
        s = pipeline.reduce_frame(path, obs, tmp_path / "out")
    finally:
        peer.close()
    assert s["status"] == "ok", s["reason"]
    cat = Table.read(s["catalog"])
    zp = cat.meta["zero_point"]
    k = obs.stages.zero_point.extinction_mag_per_airmass["G"]
    x = s["airmass"]
    # the airmass comes from the site, the mid-exposure time and the field centre (no AIRMASS card
    # is used): DATE-OBS 21:00:00 + 30 s, Calern, RA 150 Dec +20 -> about 2.28
    assert "AIRMASS" not in fld.header
    _, x_expect = _astropy_airmass(150.0, 20.0, "2025-01-15T21:00:30", 43.75, 6.92)
    assert x == pytest.approx(x_expect, abs=3e-3) and 2.2 < x < 2.4
    assert k > 0 and s["stages"]["zero_point"]["airmass"] == x
    fwhm = cat.meta["fwhm_px"]
    radii = cat.meta["aperture_radii_px"]
    assert cat.meta["aperture_corrected"] and radii and fwhm > 0
    for t in ("1p1fwhm", "1p3fwhm", "fixed", "psf"):
        # aperture magnitudes are total magnitudes (local aperture corrections, issue 11): every
        # photometry type has the true zero point
        truth = ZP_TRUE
        got = zp[t]["zp_mag"] - k * x  # the frame was rendered without extinction
        assert got == pytest.approx(truth, abs=0.005), (t, got, truth, zp[t])
        assert zp[t]["n_used"] >= 20
        assert np.isfinite(cat[f"mag_cal_{t}"]).sum() > 50
    assert s["zp_mag"] is not None and s["n_zp_stars"] >= 20
    # calibrated magnitudes of the zero-point stars reproduce Gaia G; the zero-point error is
    # propagated
    sel = cat["zp_star"]
    assert np.median(np.abs(cat["mag_cal_psf"][sel] - cat["ref_mag"][sel])) < 0.02
    for t in ("1p1fwhm", "1p3fwhm", "fixed", "psf"):
        zp_err = zp[t]["zp_err_mag"]
        assert 0 < zp_err < 0.005, (t, zp_err)
        fin = np.isfinite(cat[f"mag_err_{t}"])
        assert fin.sum() > 50
        np.testing.assert_allclose(
            cat[f"mag_cal_err_{t}"][fin],
            np.hypot(cat[f"mag_err_{t}"][fin], zp_err),
            rtol=0,
            atol=1e-6,
        )  # zp_err_mag is stored rounded to 1e-6
        # the extinction k*X and the zero point are both in the calibrated magnitudes
        np.testing.assert_allclose(
            cat[f"mag_cal_{t}"][fin], cat[f"mag_{t}"][fin] - k * x + zp[t]["zp_mag"], atol=2e-5
        )
        # the brightest stars: error dominated by the zero point's, not by photon noise
        bright = fin & (cat[f"mag_err_{t}"] < 0.3 * zp_err)
        if bright.any():
            assert np.all(cat[f"mag_cal_err_{t}"][bright] > 0.95 * zp_err)


@pytest.mark.parametrize("where", ["header", "nowhere"])
def test_site_from_header_when_config_has_none_else_no_extinction(synthetic_frame, tmp_path, where):
    """An observatory YAML without ``site``: the airmass comes from the header's SITELAT/SITELONG;
    with no site anywhere no airmass is guessed (flag ``site_not_configured``, no extinction
    term)."""
    import json

    from astropy.io import fits

    from rpp_tasks.config import config_from_dict
    from rpp_tasks.session import pipeline

    path, sky, fld = synthetic_frame
    hdr = fld.header.copy()
    if where == "header":
        hdr["SITELAT"], hdr["SITELONG"] = 43.75, 6.92
    fits.PrimaryHDU(fld.data, hdr).writeto(tmp_path / "frame_G.fits")
    peer = Peer()
    add_gaia_routes(peer, sky)
    catalogs.reset_circuit_breaker()
    try:
        obs = config_from_dict(
            {
                "observatory": "nosite",
                "camera": {"gain_e_per_adu": 1.5, "read_noise_e": 8.0, "saturation_adu": 60000},
                "filters": {"aliases": {"G": "G"}},
                "stages": {"astrometry": {"solve": "never"}, "zero_point": {"min_snr": 30.0}},
                "catalogs": {
                    "services": {"gaia_tap": peer.url + "/tap"},
                    "enrichment": [],
                    "cache_dir": str(tmp_path / "cache"),
                    "timeout_s": 2.0,
                },
            }
        )
        s = pipeline.reduce_frame(tmp_path / "frame_G.fits", obs, tmp_path / "out")
    finally:
        peer.close()
    assert s["status"] == "ok", s["reason"]
    zpj = json.loads((tmp_path / "out" / "zeropoint.json").read_text())
    psf = zpj["types"]["psf"]["zp_mag"]
    if where == "header":
        _, x_expect = _astropy_airmass(150.0, 20.0, "2025-01-15T21:00:30", 43.75, 6.92)
        assert zpj["airmass_site"] == "header SITELAT/SITELONG" and s["airmass"] == pytest.approx(
            x_expect, abs=3e-3
        )
        assert psf - zpj["extinction_k_mag"] * s["airmass"] == pytest.approx(ZP_TRUE, abs=0.005)
    else:
        assert zpj["airmass_site"] == "none" and s["airmass"] is None
        assert "site_not_configured" in zpj["flags"] and "no_airmass" in zpj["flags"]
        assert psf == pytest.approx(ZP_TRUE, abs=0.005)  # no k*X term at all


def test_header_airmass_flags_a_wrong_site(real_data):
    """qa12: the LCO Sinistro frame reduced with ``--observatory demo`` got airmass 2.59 (the demo
    site in France) while its header says AIRMASS=1.160 (McDonald); at the frame's own site the
    computed airmass agrees with the header and nothing is said."""
    from astropy.time import Time

    from rpp_tasks.inputs.reader import read_frame
    from rpp_tasks.session.adapters import _header_airmass_mismatch

    hdr = read_frame(real_data / "lco_sinistro_mef" / "mef_raw_test_frame.fits").header
    mjd = Time(hdr["DATE-OBS"], scale="utc").mjd + 0.5 * hdr["EXPTIME"] / 86400.0
    ra, dec = 287.4266, 59.4398
    sites = {"demo": (43.75, 6.92), "elp": (hdr["LATITUDE"], hdr["LONGITUD"])}
    x = {k: airmass(ra, dec, mjd, latitude_deg=a, longitude_deg=o) for k, (a, o) in sites.items()}
    hx, msg = _header_airmass_mismatch(x["elp"], hdr, *sites["elp"], "config")
    assert hx == pytest.approx(1.1598, abs=1e-4) and x["elp"] == pytest.approx(hx, abs=0.02)
    assert msg is None
    hx, msg = _header_airmass_mismatch(x["demo"], hdr, *sites["demo"], "config")
    assert x["demo"] > 2.0 and "AIRMASS=1.160" in msg and "site right" in msg
    no_header, msg = _header_airmass_mismatch(x["demo"], {"SECZ": "n/a"}, 0.0, 0.0, "config")
    assert no_header is None and msg is None
