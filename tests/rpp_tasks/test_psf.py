"""Tests of rpp_tasks.stages.psf: FWHM of pixel-integrated Gaussian/Moffat stars, effective PSF
model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table

from rpp_tasks.stages.epsf import EPSFModel, build_epsf
from rpp_tasks.stages.psf import measure_fwhm, pixel_integrated_profile

SKY_ADU, GAIN, RN_E = 800.0, 1.5, 8.0
RMS = math.sqrt(SKY_ADU / GAIN + (RN_E / GAIN) ** 2)


def render(shape, x, y, flux, fwhm, beta=None, over=8):
    """Independent brute-force renderer: the PSF averaged over over x over sub-pixels."""
    img = np.zeros(shape)
    half = int(math.ceil(5 * fwhm))
    s = (np.arange(over) + 0.5) / over - 0.5
    if beta is None:
        sig = fwhm / (2 * math.sqrt(2 * math.log(2)))
        prof = lambda r2: np.exp(-0.5 * r2 / sig**2) / (2 * math.pi * sig**2)  # noqa: E731
    else:
        alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
        prof = lambda r2: (beta - 1) / (math.pi * alpha**2) * (1 + r2 / alpha**2) ** (-beta)  # noqa: E731
    k = np.arange(-half, half + 1)
    for xi, yi, fi in zip(x, y, flux):
        px, py = int(round(xi)) + k, int(round(yi)) + k
        ddx = px[None, :, None, None] + s[None, None, None, :] - xi
        ddy = py[:, None, None, None] + s[None, None, :, None] - yi
        img[py[0] : py[-1] + 1, px[0] : px[-1] + 1] += prof(ddx**2 + ddy**2).mean(axis=(2, 3)) * fi
    return img


def star_field(*, fwhm, beta, n=70, size=384, seed=0, flux_range=(2e4, 3e5)):
    rng = np.random.default_rng(seed)
    margin = int(6 * fwhm) + 2
    # a jittered grid keeps the stars isolated
    g = int(math.ceil(math.sqrt(n)))
    step = (size - 2 * margin) / g
    gx, gy = np.meshgrid(np.arange(g), np.arange(g))
    x = margin + (gx.ravel()[:n] + 0.5) * step + rng.uniform(-0.2, 0.2, n) * step
    y = margin + (gy.ravel()[:n] + 0.5) * step + rng.uniform(-0.2, 0.2, n) * step
    flux = rng.uniform(*flux_range, n)
    clean = render((size, size), x, y, flux, fwhm, beta)
    data = (
        rng.poisson((clean + SKY_ADU) * GAIN) / GAIN
        + rng.normal(0, RN_E / GAIN, clean.shape)
        - SKY_ADU
    )
    # sources as a detector would give them: centroids good to ~0.1 px
    src = Table(
        {
            "x_centroid": x + rng.normal(0, 0.1, n),
            "y_centroid": y + rng.normal(0, 0.1, n),
            "flux": flux,
            "flag": np.zeros(n, int),
        }
    )
    return data, np.full(data.shape, RMS), src, Table({"x": x, "y": y, "flux": flux})


@pytest.mark.parametrize("beta", [None, 2.5, 3.5, 4.5])
@pytest.mark.parametrize("fwhm", [2.6, 4.0])
def test_fwhm_within_3_percent_gaussian_and_moffat(fwhm, beta):
    data, rms, src, _ = star_field(fwhm=fwhm, beta=beta, seed=int(fwhm * 10 + (beta or 0) * 100))
    res = measure_fwhm(data, src, rms=rms)
    assert res.fwhm_px == pytest.approx(fwhm, rel=0.03)
    assert res.n_stars >= 30
    assert res.ellipticity < 0.03
    assert res.fwhm_err_px < 0.01 * fwhm
    if beta is None:
        assert res.beta > 8.0  # Gaussian is the beta -> infinity limit
    else:
        assert res.beta == pytest.approx(beta, rel=0.15)
    assert res.to_dict()["n_stars"] == res.n_stars


def test_fwhm_elliptical_psf_reports_ellipticity():
    # a sheared Gaussian: sigma_x = 1.3 sigma_y -> ellipticity 1 - 1/1.3 = 0.23
    rng = np.random.default_rng(3)
    size, n = 256, 30
    x = rng.uniform(20, size - 20, n)
    y = rng.uniform(20, size - 20, n)
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size))
    for xi, yi in zip(x, y):
        sx, sy = 1.3 * 1.3, 1.3
        img += (
            5e4
            / (2 * math.pi * sx * sy)
            * np.exp(-0.5 * (((xx - xi) / sx) ** 2 + ((yy - yi) / sy) ** 2))
        )
    img += rng.normal(0, 5.0, img.shape)
    src = Table({"x_centroid": x, "y_centroid": y, "flux": np.full(n, 5e4)})
    res = measure_fwhm(img, src, rms=np.full(img.shape, 5.0), min_peak_snr=5.0)
    assert res.ellipticity == pytest.approx(1 - 1 / 1.3, abs=0.05)


def test_fwhm_without_eligible_stars_is_flagged_not_raised():
    data = np.zeros((64, 64))
    empty = Table({"x_centroid": np.zeros(0), "y_centroid": np.zeros(0), "flux": np.zeros(0)})
    res = measure_fwhm(data, empty, rms=np.ones_like(data))
    assert math.isnan(res.fwhm_px) and res.n_stars == 0 and res.flags == ("no_psf_stars",)
    assert res.to_dict()["fwhm_px"] is None


def test_fwhm_shape_mismatch_raises():
    src = Table({"x_centroid": [10.0], "y_centroid": [10.0], "flux": [1.0]})
    with pytest.raises(ValueError, match="does not match"):
        measure_fwhm(np.zeros((32, 32)), src, rms=np.ones((32, 31)))


def test_saturated_and_masked_stars_are_not_used():
    data, rms, src, truth = star_field(fwhm=3.0, beta=3.0, n=36, seed=5)
    mask = np.zeros(data.shape, bool)
    mask[int(round(truth["y"][0])), int(round(truth["x"][0]))] = True
    res_all = measure_fwhm(data, src, rms=rms)
    res = measure_fwhm(
        data, src, rms=rms, mask=mask, saturation_adu=float(np.sort(truth["flux"])[-5] * 0.02)
    )
    assert res.n_stars < res_all.n_stars
    assert res.fwhm_px == pytest.approx(3.0, rel=0.03)


@pytest.mark.parametrize("beta", [None, 3.0])
def test_epsf_is_the_pixel_integrated_psf_with_unit_flux(beta):
    fwhm = 3.2
    data, rms, src, _ = star_field(fwhm=fwhm, beta=beta, n=100, size=448, seed=11)
    epsf = build_epsf(data, src, fwhm_px=fwhm, rms=rms)
    assert isinstance(epsf, EPSFModel) and epsf.n_stars >= 60 and epsf.oversampling == 4
    assert epsf.fwhm_px == pytest.approx(fwhm, rel=0.02)
    # values at arbitrary sub-pixel offsets match the true pixel-integrated profile
    rng = np.random.default_rng(0)
    dx, dy = rng.uniform(-3, 3, 500), rng.uniform(-3, 3, 500)
    truth = pixel_integrated_profile(dx, dy, fwhm_px=fwhm, beta=math.inf if beta is None else beta)
    got = epsf.evaluate(dx, dy)
    peak = pixel_integrated_profile(0.0, 0.0, fwhm_px=fwhm, beta=math.inf if beta is None else beta)
    assert np.max(np.abs(got - truth)) < 0.01 * peak
    # sum over a pixel lattice = enclosed flux within the footprint (<= 1, ~1 for a Gaussian)
    k = np.arange(-(epsf.size_px // 2), epsf.size_px // 2 + 1)
    total = epsf.evaluate(k[None, :] + 0.3, k[:, None] - 0.2).sum()
    expected = pixel_integrated_profile(
        k[None, :] + 0.3, k[:, None] - 0.2, fwhm_px=fwhm, beta=math.inf if beta is None else beta
    ).sum()
    assert total == pytest.approx(expected, abs=0.003)
    assert expected <= 1.0 + 1e-9


def test_epsf_stamps_match_evaluate_and_gradient():
    fwhm = 3.0
    grid_off = (np.arange(4 * 15 + 1) - 30) / 4
    grid = pixel_integrated_profile(grid_off[None, :], grid_off[:, None], fwhm_px=fwhm, beta=3.0)
    epsf = EPSFModel(grid, 4, fwhm, 0, 3.0, 15)
    x, y = np.array([10.37, 20.5, 7.01]), np.array([5.8, 9.49, 3.3])
    val, gx, gy = epsf.stamps(x, y, 5, derivatives=True)
    k = np.arange(-5, 6)
    for i in range(3):
        dx = np.rint(x[i]) + k[None, :] - x[i]
        dy = np.rint(y[i]) + k[:, None] - y[i]
        np.testing.assert_allclose(val[i], epsf.evaluate(dx, dy), atol=1e-12)
        eps = 1e-5
        num_gx = (epsf.evaluate(dx - eps, dy) - epsf.evaluate(dx + eps, dy)) / (2 * eps)
        np.testing.assert_allclose(gx[i], num_gx, atol=1e-6)
        num_gy = (epsf.evaluate(dx, dy - eps) - epsf.evaluate(dx, dy + eps)) / (2 * eps)
        np.testing.assert_allclose(gy[i], num_gy, atol=1e-6)
    assert epsf.to_dict()["grid_shape"] == [61, 61]


def test_build_epsf_without_stars_falls_back_to_flagged_gaussian():
    empty = Table({"x_centroid": np.zeros(0), "y_centroid": np.zeros(0), "flux": np.zeros(0)})
    epsf = build_epsf(np.zeros((64, 64)), empty, fwhm_px=3.0)
    assert epsf.flags == ("no_psf_stars",) and epsf.n_stars == 0
    assert epsf.evaluate(0.0, 0.0) == pytest.approx(
        pixel_integrated_profile(0.0, 0.0, fwhm_px=3.0), rel=1e-3
    )
    with pytest.raises(ValueError, match="fwhm_px"):
        build_epsf(np.zeros((64, 64)), empty, fwhm_px=float("nan"))
