"""Transient candidates: a star absent from the loopback Gaia is found (with a PNG cutout),
solar-system objects and flagged sources are removed, no reference -> no candidates; with every
service down the catalogue is still written with the affected columns empty and flagged."""

from __future__ import annotations

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack
from service_peers import Peer, add_gaia_routes, make_sky, refused_url

from rpp_tasks.config import config_from_dict
from rpp_tasks.session import pipeline
from rpp_tasks.stages import catalogs
from rpp_tasks.stages.transients import find_candidates, write_png


def _cat():
    return Table(
        {
            "id": [1, 2, 3, 4, 5],
            "ra": [1.0, 1.1, 1.2, 1.3, np.nan],
            "dec": [0.0] * 5,
            "x_centroid": [10.0] * 5,
            "y_centroid": [10.0] * 5,
            "snr": [50.0, 50.0, 50.0, 5.0, 50.0],
            "saturated": [False, False, True, False, False],
            "near_edge": [False] * 5,
            "blended": [False] * 5,
            "quality": ["good"] * 5,
            "gaia_source_id": np.array([0, 7, 0, 0, 0], np.int64),
            "sso_name": np.full(5, "", dtype="<U32"),
        }
    )


def test_selection_rules():
    res = find_candidates(_cat(), reference_available=True, min_snr=10)
    assert list(res.candidates["id"]) == [1]  # 2 in Gaia, 3 saturated, 4 faint, 5 no position
    c = _cat()
    c["sso_name"][0] = "(1) Ceres"
    assert c["sso_name"][0] == "(1) Ceres"
    res = find_candidates(c, reference_available=True, min_snr=10)
    assert len(res.candidates) == 0 and res.n_sso_removed == 1


def test_no_reference_means_no_candidates():
    res = find_candidates(_cat(), reference_available=False)
    assert len(res.candidates) == 0 and res.flags == ("no_reference",)


def test_png_is_valid(tmp_path):
    write_png(tmp_path / "a.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    b = (tmp_path / "a.png").read_bytes()
    assert b[:8] == b"\x89PNG\r\n\x1a\n" and b[-8:-4] == b"IEND"
    from PIL import Image  # noqa: PLC0415 (matplotlib's dependency)

    im = Image.open(tmp_path / "a.png")
    assert im.size == (8, 8) and np.asarray(im)[7, 0] == 0


def _emptiest_spot(sky):
    g = np.linspace(-0.035, 0.035, 36)
    gra, gdec = np.meshgrid(150.0 + g / np.cos(np.radians(20.0)), 20.0 + g)
    d = catalogs.angular_sep_deg(
        gra.ravel()[:, None], gdec.ravel()[:, None], sky["ra"][None, :], sky["dec"][None, :]
    )
    k = int(np.argmax(d.min(axis=1)))
    return float(gra.ravel()[k]), float(gdec.ravel()[k])


NEW = _emptiest_spot(make_sky(150.0, 20.0, n=1200, radius_deg=0.16, seed=7, g_range=(13.0, 17.5)))


def _frame(tmp_path, extra_star: bool):
    from rpp_tasks.sim.synthetic import make_star_field

    sky = make_sky(150.0, 20.0, n=1200, radius_deg=0.16, seed=7, g_range=(13.0, 17.5))
    stars = Table({"ra": sky["ra"], "dec": sky["dec"], "mag": sky["G"]})
    if (
        extra_star
    ):  # a new bright source, the farthest possible from the others, not in the reference
        stars = vstack([stars, Table({"ra": [NEW[0]], "dec": [NEW[1]], "mag": [14.5]})])
    fld = make_star_field(
        (384, 384),
        stars=stars,
        fwhm_px=3.5,
        zero_point_mag=22.0,
        exptime_s=60.0,
        wcs_center_deg=(150.0, 20.0),
        filter_name="G",
        n_cosmic_rays=0,
        n_hot_pixels=0,
        seed=8,
    )
    path = tmp_path / "frame.fits"
    fits.PrimaryHDU(fld.data, fld.header).writeto(path)
    return path, sky


def test_end_to_end_candidate_with_cutout(tmp_path):
    path, sky = _frame(tmp_path, extra_star=True)
    p = Peer()
    add_gaia_routes(p, sky)
    catalogs.reset_circuit_breaker()
    try:
        obs = config_from_dict(
            {
                "observatory": "trtest",
                "camera": {"gain_e_per_adu": 1.5, "read_noise_e": 8.0},
                "stages": {"astrometry": {"solve": "never"}},
                "catalogs": {
                    "services": {"gaia_tap": p.url + "/tap"},
                    "enrichment": [],
                    "cache_dir": str(tmp_path / "cache"),
                    "timeout_s": 2.0,
                },
            }
        )
        s = pipeline.reduce_frame(path, obs, tmp_path / "out")
    finally:
        p.close()
    assert s["status"] == "ok", s["reason"]
    cand = Table.read(tmp_path / "out" / "candidates.ecsv")
    assert s["n_transient_candidates"] == len(cand) >= 1
    d = catalogs.angular_sep_deg(cand["ra"], cand["dec"], NEW[0], NEW[1])
    assert (d * 3600 < 1.0).sum() == 1
    assert len(cand) <= 3  # the field's real stars are all in the reference
    assert (tmp_path / "out" / "cutouts" / cand["cutout"][int(np.argmin(d))]).is_file()


def test_offline_every_service_down_catalogue_still_written(tmp_path):
    path, _ = _frame(tmp_path, extra_star=False)
    dead = refused_url()
    catalogs.reset_circuit_breaker()
    obs = config_from_dict(
        {
            "observatory": "offline",
            "camera": {"gain_e_per_adu": 1.5, "read_noise_e": 8.0},
            "catalogs": {
                "services": {k: dead for k in catalogs.DEFAULT_SERVICES},
                "cache_dir": str(tmp_path / "cache"),
                "timeout_s": 0.5,
                "max_retries": 1,
                "backoff_s": 0.01,
            },
        }
    )
    s = pipeline.reduce_frame(path, obs, tmp_path / "out")
    assert s["status"] == "ok", s["reason"]
    assert s["wcs_source"] == "header" and s["zp_mag"] is None and s["n_transient_candidates"] == 0
    cat = Table.read(s["catalog"])
    assert np.isfinite(cat["mag_psf"]).sum() > 50 and np.isfinite(cat["ra"]).all()
    assert np.isnan(cat["mag_cal_psf"]).all()
    services = cat.meta["enrichment"]
    assert services["gaia"]["status"] == "failed" and services["simbad"]["status"] == "failed"
    assert services["colibri"]["status"] == "skipped"
    assert "no_reference" in s["stages"]["zero_point"]["flags"]
    assert s["stages"]["transients"]["flags"] == ["no_reference"]
    assert s["stages"]["enrich"]["cpu_s"] < 1.0
