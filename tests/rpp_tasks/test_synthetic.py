"""Tests of rpp_tasks.sim.synthetic: the truth must be what an ideal measurement gets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.interpolate import CubicSpline
from scipy.special import erf

from rpp_tasks.sim.synthetic import (
    make_calibration_frames,
    make_camera,
    make_star_field,
    moffat_alpha_px,
    psf_encircled_energy,
    render_psf_stamps,
    write_synthetic_session,
)

QUIET = {"n_cosmic_rays": 0, "n_hot_pixels": 0}


# ------------------------------------------------------------------------------ PSF rendering


@pytest.mark.parametrize("fwhm", [2.0, 3.5, 6.0])
def test_moffat_stamps_match_brute_force_integration(fwhm):
    dx, dy, h, beta = np.array([0.23]), np.array([-0.41]), 12, 2.5
    stamp = render_psf_stamps(dx, dy, h, psf="moffat", fwhm_px=fwhm, beta=beta)[0]
    n = 40  # 40x40 midpoint samples per pixel
    t = (np.arange(n) + 0.5) / n - 0.5
    k = np.arange(-h, h + 1)
    a2 = moffat_alpha_px(fwhm, beta) ** 2
    xs = (k[:, None] + t[None, :]).ravel() - dx[0]
    ys = (k[:, None] + t[None, :]).ravel() - dy[0]
    ref = (beta - 1) / (math.pi * a2) * (1 + (xs[None, :] ** 2 + ys[:, None] ** 2) / a2) ** -beta
    ref = ref.reshape(2 * h + 1, n, 2 * h + 1, n).mean(axis=(1, 3))
    assert np.abs(stamp - ref).max() < 1e-4 * ref.max()
    assert stamp.sum() == pytest.approx(ref.sum(), rel=1e-4)


def test_gaussian_stamps_are_exact_erf_integrals():
    fwhm, h = 3.5, 8
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    stamp = render_psf_stamps([0.3], [-0.2], h, psf="gaussian", fwhm_px=fwhm)[0]
    # pixel (i, j) = (2, -1) relative to the central pixel
    fx = 0.5 * (
        erf((2.5 - 0.3) / (math.sqrt(2) * sigma)) - erf((1.5 - 0.3) / (math.sqrt(2) * sigma))
    )
    fy = 0.5 * (
        erf((-0.5 + 0.2) / (math.sqrt(2) * sigma)) - erf((-1.5 + 0.2) / (math.sqrt(2) * sigma))
    )
    assert stamp[h - 1, h + 2] == pytest.approx(fx * fy, rel=1e-12)
    assert stamp.sum() == pytest.approx(erf(8.5 / (math.sqrt(2) * sigma)) ** 2 - 0.0, abs=1e-6)


def test_encircled_energy_half_at_half_light_radius():
    # FWHM/2 is where the profile is half the peak; EE at r -> inf is 1
    assert psf_encircled_energy(1e6, psf="moffat", fwhm_px=3.5, beta=3.0) == pytest.approx(1.0)
    assert psf_encircled_energy(3.5 / 2, psf="gaussian", fwhm_px=3.5) == pytest.approx(
        0.5, rel=1e-12
    )


# ------------------------------------------------------------------------------ truth consistency


@pytest.mark.parametrize("psf", ["gaussian", "moffat"])
def test_noiseless_image_sums_to_rendered_fluxes_plus_sky(psf):
    f = make_star_field(
        (256, 256), n_stars=150, psf=psf, sky_adu=500.0, bias_adu=100.0, seed=3, **QUIET
    )
    t = f.truth
    total = float(np.sum(f.model, dtype=float))
    expect = float(np.sum(t["flux_rendered_adu"])) + (500.0 + 100.0) * 256 * 256
    assert total == pytest.approx(expect, rel=1e-6)
    # stamps hold >= 99.5 % of the flux of every star whose stamp is inside the image
    inner = (t["x"] > 70) & (t["x"] < 185) & (t["y"] > 70) & (t["y"] < 185)
    assert inner.sum() > 20
    assert np.all(t["frac_in_image"][inner] >= 0.995)
    assert np.all(t["frac_in_image"] <= 1.0 + 1e-12)


@pytest.mark.parametrize("psf", ["gaussian", "moffat"])
def test_single_star_flux_and_peak(psf):
    sky = 300.0
    stars = None
    f = make_star_field(
        (161, 161),
        n_stars=1,
        psf=psf,
        sky_adu=sky,
        border_px=78,
        mag_range=(16, 16),
        seed=1,
        stars=stars,
        **QUIET,
    )
    row = f.truth[0]
    star = f.model.astype(float) - sky
    assert star.sum() == pytest.approx(row["flux_rendered_adu"], rel=1e-5)
    assert row["flux_rendered_adu"] == pytest.approx(row["flux_adu"], rel=0.005)
    assert star.max() == pytest.approx(row["peak_adu"], rel=1e-5)
    assert row["flux_adu"] == pytest.approx(60.0 * 10 ** (-0.4 * (16 - 25.0)), rel=1e-12)
    # flux-weighted centroid of the noiseless star is the true position
    yy, xx = np.indices(star.shape)
    assert (star * xx).sum() / star.sum() == pytest.approx(row["x"], abs=2e-3)
    assert (star * yy).sum() / star.sum() == pytest.approx(row["y"], abs=2e-3)


@pytest.mark.parametrize(("psf", "beta"), [("gaussian", 3.0), ("moffat", 2.5), ("moffat", 4.0)])
def test_fwhm_of_oversampled_star_is_requested_fwhm(psf, beta):
    fwhm = 16.0
    n = 201
    tab = Table(
        {"ra": [150.0], "dec": [2.2], "mag": [15.0]}
    )  # at the image centre = a pixel centre
    f = make_star_field(
        (n, n),
        psf=psf,
        fwhm_px=fwhm,
        beta=beta,
        sky_adu=0.0,
        stars=tab,
        saturation_adu=1e30,
        **QUIET,
    )
    c = n // 2
    assert f.truth["x"][0] == pytest.approx(c, abs=1e-9)
    cut = f.model[c, c:].astype(float)
    spline = CubicSpline(np.arange(cut.size), cut)
    r = np.linspace(0, 3 * fwhm, 30001)
    half = r[np.argmin(np.abs(spline(r) - 0.5 * cut[0]))]
    assert 2 * half == pytest.approx(fwhm, rel=0.005)


def test_wcs_round_trip_of_truth_positions():
    f = make_star_field(
        (300, 400),
        n_stars=200,
        rotation_deg=30.0,
        pixel_scale_arcsec=0.6,
        wcs_center_deg=(250.0, 60.0),
        seed=2,
        **QUIET,
    )
    w = WCS(f.header)
    x, y = w.world_to_pixel_values(f.truth["ra"], f.truth["dec"])
    assert np.allclose(x, f.truth["x"], atol=1e-6) and np.allclose(y, f.truth["y"], atol=1e-6)
    ra, dec = w.pixel_to_world_values((400 - 1) / 2, (300 - 1) / 2)
    assert (ra, dec) == pytest.approx((250.0, 60.0), abs=1e-9)
    scales = np.sqrt((w.pixel_scale_matrix**2).sum(axis=0)) * 3600
    assert scales == pytest.approx([0.6, 0.6], rel=1e-9)


def test_header_has_observatory_keywords():
    h = make_star_field((64, 64), n_stars=5, exptime_s=30.0, filter_name="R", seed=0).header
    assert h["IMAGETYP"] == "Light Frame" and h["EXPTIME"] == 30.0 and h["FILTER"] == "R"
    for key in (
        "DATE-OBS",
        "GAIN",
        "RDNOISE",
        "SATURATE",
        "OBJECT",
        "TELESCOP",
        "INSTRUME",
        "RA",
        "DEC",
        "CTYPE1",
        "CRVAL1",
        "CRPIX1",
    ):
        assert key in h, key


def test_seeded_determinism():
    a = make_star_field((128, 128), n_stars=50, psf="moffat", seed=7)
    b = make_star_field((128, 128), n_stars=50, psf="moffat", seed=7)
    c = make_star_field((128, 128), n_stars=50, psf="moffat", seed=8)
    assert np.array_equal(a.data, b.data) and np.array_equal(a.cr_mask, b.cr_mask)
    assert all(np.array_equal(a.truth[k], b.truth[k]) for k in a.truth.colnames)
    assert not np.array_equal(a.data, c.data)


def test_luminosity_function_slope():
    f = make_star_field(
        (512, 512), n_stars=6000, mag_range=(14, 22), mag_slope=0.3, seed=4, **QUIET
    )
    counts, edges = np.histogram(f.truth["mag"], bins=8, range=(14, 22))
    slope = np.polyfit(0.5 * (edges[1:] + edges[:-1]), np.log10(counts), 1)[0]
    assert slope == pytest.approx(0.3, abs=0.03)
    assert np.all(np.diff(counts) > 0)  # most stars are faint


def test_min_separation_is_respected():
    from scipy.spatial import cKDTree

    f = make_star_field((256, 256), n_stars=300, min_separation_px=8.0, seed=5, **QUIET)
    xy = np.column_stack([f.truth["x"], f.truth["y"]])
    assert len(f.truth) == 300
    assert cKDTree(xy).query(xy, k=2)[0][:, 1].min() >= 8.0


# ------------------------------------------------------------------------------ noise, defects


def test_blank_field_noise_statistics():
    sky, g, rn = 800.0, 1.5, 8.0
    f = make_star_field(
        (512, 512),
        n_stars=0,
        sky_adu=sky,
        gain_e_per_adu=g,
        read_noise_e=rn,
        bias_adu=200.0,
        seed=9,
        **QUIET,
    )
    d = f.data.astype(float)
    assert d.mean() == pytest.approx(sky + 200.0, abs=0.2)
    assert d.std() == pytest.approx(math.sqrt(sky / g + (rn / g) ** 2), rel=0.01)
    # low sky: Poisson (skewed), read noise dominated variance still right
    f2 = make_star_field(
        (512, 512), n_stars=0, sky_adu=2.0, gain_e_per_adu=g, read_noise_e=rn, seed=9, **QUIET
    )
    assert f2.data.std() == pytest.approx(math.sqrt(2.0 / g + (rn / g) ** 2), rel=0.01)


def test_aperture_noise_and_crb_match_truth_columns():
    """Repeated noise realisations of one star: the scatter is what snr_expected / CRB predict."""
    n_real, sky, g, rn, fwhm = 300, 400.0, 1.5, 8.0, 3.5
    tab = Table({"ra": [150.0], "dec": [2.2], "mag": [20.0]})
    r = 1.0 * fwhm
    ap_flux, psf_flux = [], []
    for seed in range(n_real):
        f = make_star_field(
            (33, 33),
            stars=tab,
            fwhm_px=fwhm,
            sky_adu=sky,
            gain_e_per_adu=g,
            read_noise_e=rn,
            seed=seed,
            **QUIET,
        )
        if seed == 0:
            row = f.truth[0]
            yy, xx = np.indices(f.data.shape)
            # exact-area aperture by 10x10 supersampling of each pixel
            s = (np.arange(10) + 0.5) / 10 - 0.5
            sub = (
                (xx[..., None, None] + s[None, None, :, None] - row["x"]) ** 2
                + (yy[..., None, None] + s[None, None, None, :] - row["y"]) ** 2
            ) <= r * r
            w_ap = sub.mean(axis=(2, 3))
            p = (f.model.astype(float) - sky) / row["flux_adu"]
            var = (row["flux_adu"] * p + sky) / g + (rn / g) ** 2
        d = f.data.astype(float) - sky
        ap_flux.append((w_ap * d).sum())
        psf_flux.append((p * d / var).sum() / (p * p / var).sum())  # weighted LS with the true PSF
    f_ap = row["flux_adu"] * psf_encircled_energy(r, fwhm_px=fwhm)
    assert np.std(ap_flux, ddof=1) == pytest.approx(f_ap / row["snr_expected"], rel=0.10)
    assert np.std(psf_flux, ddof=1) == pytest.approx(row["flux_err_crb_adu"], rel=0.10)
    assert np.mean(psf_flux) == pytest.approx(row["flux_adu"], rel=0.01)


def test_cosmic_rays_are_where_the_mask_says():
    f = make_star_field(
        (512, 512), n_stars=0, n_cosmic_rays=40, n_hot_pixels=0, sky_adu=500.0, seed=11
    )
    excess = f.data.astype(float) - f.model
    sigma = math.sqrt(500.0 / 1.5 + (8.0 / 1.5) ** 2)
    assert f.cr_mask.sum() >= 40
    assert np.median(excess[f.cr_mask]) > 10 * sigma
    assert np.abs(excess[~f.cr_mask]).max() < 6 * sigma
    # sharp: no CR is wider than a 15-px track
    from scipy import ndimage

    lab, n = ndimage.label(f.cr_mask, structure=np.ones((3, 3)))
    assert 30 <= n <= 40
    sizes = ndimage.sum(f.cr_mask, lab, range(1, n + 1))
    assert sizes.max() <= 32


def test_hot_pixels_and_saturation():
    f = make_star_field(
        (256, 256), n_stars=80, mag_range=(10, 18), n_hot_pixels=25, n_cosmic_rays=0, seed=12
    )
    assert f.hot_mask.sum() == 25
    assert np.all(f.model[f.hot_mask] > f.params["sky_adu"] + 90)
    assert f.data.max() <= 60000.0
    sat = f.truth[f.truth["saturated"]]
    assert len(sat) > 0
    for row in sat:
        assert f.data[int(round(row["y"])), int(round(row["x"]))] == pytest.approx(60000.0)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="psf must be"):
        make_star_field((64, 64), psf="airy")
    with pytest.raises(ValueError, match="beta"):
        make_star_field((64, 64), psf="moffat", beta=1.0)
    with pytest.raises(ValueError, match="camera shape"):
        make_star_field((64, 64), camera=make_camera((32, 32)))


# ------------------------------------------------------------------------------ camera and session


def test_calibration_frames_statistics():
    cam = make_camera((128, 128), seed=1)
    bias = make_calibration_frames(cam, "bias", n=3, seed=2)
    assert [h["IMAGETYP"] for _, h in bias] == ["Bias Frame"] * 3
    b = np.stack([d for d, _ in bias]).astype(float)
    assert (b - cam.bias_adu).std() == pytest.approx(8.0 / 1.5, rel=0.02)
    dark = make_calibration_frames(
        cam, "dark", n=1, exptime_s=300.0, cosmic_rate_per_mpx_s=0.0, seed=3
    )[0][0]
    cur = (dark.astype(float) - cam.bias_adu) * 1.5 / 300.0
    assert np.median(cur[~cam.hot_mask]) == pytest.approx(0.02, abs=0.01)
    assert np.median(cur[cam.hot_mask] / cam.dark_e_per_s[cam.hot_mask]) == pytest.approx(
        1.0, abs=0.05
    )
    flats = make_calibration_frames(cam, "flat", n=2, flat_level_adu=(20000.0, 10000.0), seed=4)
    assert [h["IMAGETYP"] for _, h in flats] == ["Flat Field"] * 2
    ratio = (flats[0][0] - cam.bias_adu) / 20000.0 / cam.flat_response
    assert np.median(ratio) == pytest.approx(1.0, abs=0.002)
    assert np.median(cam.flat_response) == pytest.approx(1.0, abs=1e-6)
    assert cam.flat_response[0, 0] < 0.9 < cam.flat_response[64, 64]  # vignetted corners


def test_write_synthetic_session(tmp_path):
    raw, truth_dir = tmp_path / "incoming" / "night1", tmp_path / "truth"
    out = write_synthetic_session(
        raw,
        truth_folder=truth_dir,
        n_science=2,
        n_bias=3,
        n_dark=2,
        n_flat=2,
        shape=(128, 160),
        seed=5,
    )
    names = sorted(p.name for p in raw.iterdir())
    assert names == [
        "bias_001.fits",
        "bias_002.fits",
        "bias_003.fits",
        "dark_001.fits",
        "dark_002.fits",
        "demo_V_001.fits",
        "demo_V_002.fits",
        "flat_V_001.fits",
        "flat_V_002.fits",
    ]
    assert not any(p.suffix == ".ecsv" for p in raw.rglob("*"))
    with fits.open(out["science"][0]) as hdul:
        h = hdul[0].header
        assert h["BITPIX"] == 16 and h["BZERO"] == 32768 and h["IMAGETYP"] == "Light Frame"
        assert hdul[0].data.shape == (128, 160)
        sci = hdul[0].data.astype(float)
    assert fits.getheader(out["dark"][0])["IMAGETYP"] == "Dark Frame"
    assert fits.getheader(out["dark"][0])["EXPTIME"] == 60.0
    # the truth of frame 1 is consistent with its WCS, and its stars are on the image
    t = Table.read(out["truth"][0])
    x, y = WCS(h).world_to_pixel_values(t["ra"], t["dec"])
    assert np.allclose(x, t["x"], atol=1e-6) and len(t) > 5
    # calibrating with the true camera recovers sky + stars
    with fits.open(out["camera"]) as cam:
        bias, dark, flat = (cam[k].data.astype(float) for k in ("BIAS", "DARK", "FLAT"))
    cal = (sci - bias - dark * 60.0 / 1.5) / flat
    sky = t.meta["sky_adu"]
    assert np.median(cal) == pytest.approx(sky, rel=0.02)
    # the same seed writes identical files
    out2 = write_synthetic_session(
        tmp_path / "again",
        truth_folder=tmp_path / "truth2",
        n_science=2,
        n_bias=3,
        n_dark=2,
        n_flat=2,
        shape=(128, 160),
        seed=5,
    )
    assert out["science"][1].read_bytes() == out2["science"][1].read_bytes()
    with pytest.raises(ValueError, match="must not be inside"):
        write_synthetic_session(raw, truth_folder=raw / "truth", n_science=1, shape=(64, 64))


# --------------------------------------------------------------------------- real optics (issue 11)


def test_elliptical_moffat_stamps_match_brute_force_integration():
    from rpp_tasks.sim.psf_render import _moffat_shape, render_elliptical_moffat_stamps

    fw, beta, e, th, h = 3.8, 2.8, 0.1, 0.7, 10
    stamp = render_elliptical_moffat_stamps(
        [0.2], [-0.3], h, fwhm_px=fw, beta=beta, ellipticity=e, theta_rad=th
    )[0]
    n = 30
    t = (np.arange(n) + 0.5) / n - 0.5
    k = np.arange(-h, h + 1)
    a, b, c, norm, _ = _moffat_shape(fw, beta, e, th)
    xs = (k[:, None] + t[None, :]).ravel() - 0.2
    ys = (k[:, None] + t[None, :]).ravel() + 0.3
    q = a * xs[None, :] ** 2 + 2 * b * xs[None, :] * ys[:, None] + c * ys[:, None] ** 2
    ref = (norm * (1 + q) ** -beta).reshape(2 * h + 1, n, 2 * h + 1, n).mean(axis=(1, 3))
    assert np.abs(stamp - ref).max() < 1e-4 * ref.max()
    # the major axis is along theta and 1 - b/a = e: second moments of a finely sampled star
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1] + 0.0
    big = render_elliptical_moffat_stamps(
        [0.0], [0.0], h, fwhm_px=fw, beta=9.0, ellipticity=e, theta_rad=th
    )[0]
    mxx, myy, mxy = (np.sum(big * v) for v in (xx * xx, yy * yy, xx * yy))
    ang = 0.5 * math.atan2(2 * mxy, mxx - myy)
    assert ang == pytest.approx(th, abs=0.02)


def test_optics_field_truth_follows_the_psf_variation():
    from rpp_tasks.sim.synthetic import PsfVariation, make_optics_field

    f = make_optics_field((1024, 1024), seed=3)
    t = f.truth
    var = PsfVariation()
    fw, beta, e, th = var.params_at(np.asarray(t["x"]), np.asarray(t["y"]), (1024, 1024))
    assert np.allclose(t["fwhm_px"], fw) and np.allclose(t["beta"], beta)
    assert np.allclose(t["ellipticity"], e)
    assert 1.12 < np.max(fw) / np.min(fw) < 1.22  # about 15 % across the field
    assert 2.6 < np.min(beta) and np.max(beta) <= 3.3 and 0.08 < np.max(e) < 0.13
    # 4 % sky gradient, gain 0.8, close pairs (both members in the truth), bright saturated stars
    assert np.max(t["sky_adu"]) / np.min(t["sky_adu"]) == pytest.approx(1.04, abs=0.01)
    assert f.params["gain_e_per_adu"] == 0.8
    pairs = np.asarray(t["pair"])
    assert np.sum(pairs > 0) >= 20 and np.all(np.bincount(pairs[pairs > 0])[1:] == 2)
    assert np.sum(t["saturated"]) >= 2
    # bleed trails read the ADC maximum and run along the columns of the saturated stars
    assert f.bleed_mask.sum() > 0
    assert np.all(f.data[f.bleed_mask] >= 59999.0) or np.mean(f.data[f.bleed_mask] >= 59999.0) > 0.8
    cols = np.unique(np.nonzero(f.bleed_mask)[1])
    sat_x = np.rint(np.asarray(t["x"])[np.asarray(t["saturated"])]).astype(int)
    assert all(np.min(np.abs(sat_x - c)) <= 12 for c in cols)
    # the Cramer-Rao column uses the local PSF: at equal flux a broader star has a larger bound
    assert np.all(np.isfinite(t["flux_err_crb_adu"]))


def test_constant_psf_fields_are_unchanged_by_the_new_options():
    a = make_star_field((128, 128), n_stars=50, psf="moffat", seed=7)
    b = make_star_field((128, 128), n_stars=50, psf="moffat", seed=7, n_close_pairs=0, n_bright=0)
    assert np.array_equal(a.data, b.data)
    assert np.all(a.truth["fwhm_px"] == 3.5) and np.all(a.truth["ellipticity"] == 0)
