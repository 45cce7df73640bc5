"""Cosmic-ray detection: candidate finder + L.A.Cosmic on tiles (rpp_tasks.stages.cosmics)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.special import erf

from rpp_tasks.stages.cosmics import clean_cosmic_rays

GAIN, RN, SKY = 1.5, 8.0, 200.0
SKY_NOISE = np.sqrt(SKY / GAIN + (RN / GAIN) ** 2)  # ADU


def _render_field(shape=(1024, 1024), *, n_stars=500, n_hits=40, n_tracks=20, seed=0):
    """Pixel-integrated Gaussian stars (FWHM 2.5-4 px) on a flat sky, Poisson + read noise, then
    cosmic rays: hits of 1-3 px (100-3000 ADU each) and straight tracks 4-25 px long (100-2000 ADU
    per pixel). Returns data, noiseless truth (sky + stars), CR deposit map and the star table."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    img = np.full(shape, SKY)
    xs, ys = rng.uniform(10, nx - 10, n_stars), rng.uniform(10, ny - 10, n_stars)
    fwhm = rng.uniform(2.5, 4.0, n_stars)
    flux = np.exp(rng.uniform(np.log(300), np.log(3e5), n_stars))
    for x, y, f, F in zip(xs, ys, fwhm, flux):
        s = f / 2.3548
        r = int(np.ceil(4 * s)) + 1
        xa = np.arange(max(0, round(x) - r), min(nx, round(x) + r + 1))
        ya = np.arange(max(0, round(y) - r), min(ny, round(y) + r + 1))
        ex = 0.5 * (erf((xa + 0.5 - x) / (np.sqrt(2) * s)) - erf((xa - 0.5 - x) / (np.sqrt(2) * s)))
        ey = 0.5 * (erf((ya + 0.5 - y) / (np.sqrt(2) * s)) - erf((ya - 0.5 - y) / (np.sqrt(2) * s)))
        img[ya[0] : ya[-1] + 1, xa[0] : xa[-1] + 1] += F * np.outer(ey, ex)
    noisy = rng.poisson(img * GAIN) / GAIN + rng.normal(0, RN / GAIN, shape)
    cr = np.zeros(shape)
    for _ in range(n_hits):
        x, y = rng.integers(5, nx - 6), rng.integers(5, ny - 6)
        for _ in range(rng.integers(1, 4)):
            cr[y + rng.integers(0, 2), x + rng.integers(0, 2)] += rng.uniform(100, 3000)
    for _ in range(n_tracks):
        length, theta = rng.uniform(4, 25), rng.uniform(0, np.pi)
        x, y = rng.uniform(30, nx - 30), rng.uniform(30, ny - 30)
        t = np.linspace(0, length, int(length * 3))
        for a, b in set(
            zip(
                np.round(y + t * np.sin(theta)).astype(int),
                np.round(x + t * np.cos(theta)).astype(int),
            )
        ):
            cr[a, b] += rng.uniform(100, 2000)
    stars = np.column_stack([xs, ys, fwhm, flux])
    return (noisy + cr).astype(np.float32), img.astype(np.float32), cr, stars


def _star_cores(shape, stars):
    """Pixels within 1 FWHM of a true star centre."""
    core = np.zeros(shape, dtype=bool)
    for x, y, f, _ in stars:
        r = int(np.ceil(f)) + 1
        x0, y0 = int(round(x)), int(round(y))
        sl = (
            slice(max(0, y0 - r), min(shape[0], y0 + r + 1)),
            slice(max(0, x0 - r), min(shape[1], x0 + r + 1)),
        )
        yy, xx = np.mgrid[sl]
        core[sl] |= (yy - y) ** 2 + (xx - x) ** 2 <= f**2
    return core


@pytest.fixture(scope="module")
def field():
    return _render_field()


@pytest.fixture(scope="module")
def tiled(field):
    data = field[0]
    return clean_cosmic_rays(data, gain_e_per_adu=GAIN, read_noise_e=RN, saturation_adu=60000)


def test_recovers_injected_cosmic_ray_pixels(field, tiled):
    _, _, cr, _ = field
    truth = cr > 5 * SKY_NOISE  # every injected pixel is >= 100 ADU = 8.6 sigma here
    assert truth.sum() > 300
    recovered = np.count_nonzero(tiled.mask & truth) / truth.sum()
    assert recovered >= 0.95, recovered
    assert tiled.method == "tiled"
    assert 0 < tiled.tile_fraction < 0.05  # the expensive test ran on a few % of the frame


def test_star_cores_are_not_flagged(field, tiled):
    data, _, cr, stars = field
    near_cr = ndimage.binary_dilation(cr > 0, iterations=2)
    core = _star_cores(data.shape, stars)
    # 500 stars, FWHM 2.5-4 px, peaks up to ~3e4 ADU above sky
    assert np.count_nonzero(tiled.mask & core & ~near_cr) <= 2


def test_few_flags_away_from_cosmic_rays(field, tiled):
    _, _, cr, _ = field
    near_cr = ndimage.binary_dilation(cr > 0, iterations=2)
    false = np.count_nonzero(tiled.mask & ~near_cr)
    assert false <= 0.1 * np.count_nonzero(tiled.mask), false


def test_cleaned_values_are_near_the_truth(field, tiled):
    data, truth, cr, _ = field
    hit = tiled.mask & (cr > 0)
    resid = (tiled.cleaned[hit] - truth[hit]) / SKY_NOISE
    # replaced by the local median of clean neighbours: unbiased on the sky, within the noise
    on_sky = hit & (truth < SKY + 2 * SKY_NOISE)
    resid_sky = (tiled.cleaned[on_sky] - truth[on_sky]) / SKY_NOISE
    assert abs(np.median(resid_sky)) < 0.5
    assert np.percentile(np.abs(resid), 90) < 3.0
    untouched = ~tiled.mask
    np.testing.assert_array_equal(tiled.cleaned[untouched], data[untouched])
    assert tiled.cleaned.dtype == np.float32


def test_tiled_agrees_with_whole_frame_lacosmic_on_cosmic_rays():
    data, _, cr, _ = _render_field((256, 256), n_stars=40, n_hits=8, n_tracks=4, seed=3)
    kw = dict(gain_e_per_adu=GAIN, read_noise_e=RN, saturation_adu=60000)
    full = clean_cosmic_rays(data, method="full", **kw)
    tiled = clean_cosmic_rays(data, **kw)
    truth = cr > 0
    assert full.method == "full" and full.tile_fraction == 1.0
    assert np.count_nonzero(tiled.mask & truth) >= 0.97 * np.count_nonzero(full.mask & truth)


def test_background_subtracted_input_gives_same_mask(field):
    data = field[0][:384, :384]
    kw = dict(gain_e_per_adu=GAIN, read_noise_e=RN, saturation_adu=60000)
    with_sky = clean_cosmic_rays(data, **kw)
    sub = clean_cosmic_rays(data - np.float32(SKY), background=SKY, **kw)
    np.testing.assert_array_equal(with_sky.mask, sub.mask)
    np.testing.assert_allclose(sub.cleaned + SKY, with_sky.cleaned, atol=1e-3)


def test_masked_pixels_are_never_flagged_and_keep_their_values():
    data, _, cr, _ = _render_field((256, 256), n_stars=20, n_hits=10, n_tracks=3, seed=5)
    mask = cr > 0  # pretend every CR pixel is a known bad pixel
    data = data.copy()
    data[0, 0] = np.nan
    res = clean_cosmic_rays(
        data, gain_e_per_adu=GAIN, read_noise_e=RN, saturation_adu=60000, mask=mask
    )
    assert not res.mask[mask].any()
    np.testing.assert_array_equal(res.cleaned[mask], data[mask])
    assert np.isnan(res.cleaned[0, 0]) and not res.mask[0, 0]


def test_noise_only_frame_has_no_candidates():
    rng = np.random.default_rng(1)
    data = (rng.poisson(SKY * GAIN, (128, 128)) / GAIN).astype(np.float32)
    res = clean_cosmic_rays(data, gain_e_per_adu=GAIN, read_noise_e=RN, saturation_adu=60000)
    assert res.n_pixels == 0 and res.flags == ("no_candidates",)
    assert res.mask.shape == data.shape
    assert res.to_dict()["n_pixels"] == 0


def test_synthetic_module_field():
    synthetic = pytest.importorskip("rpp_tasks.sim.synthetic")
    f = synthetic.make_star_field((1024, 1024), n_stars=500, fwhm_px=3.0, seed=2)
    p = f.params
    res = clean_cosmic_rays(
        f.data,
        gain_e_per_adu=p["gain_e_per_adu"],
        read_noise_e=p["read_noise_e"],
        saturation_adu=p["saturation_adu"],
    )
    assert f.cr_mask.sum() > 20
    assert np.count_nonzero(res.mask & f.cr_mask) >= 0.95 * f.cr_mask.sum()
    stars = np.column_stack(
        [f.truth["x"], f.truth["y"], np.full(len(f.truth), 3.0), f.truth["flux_adu"]]
    )
    near_defect = ndimage.binary_dilation(f.cr_mask | f.hot_mask, iterations=2)
    assert np.count_nonzero(res.mask & _star_cores(f.data.shape, stars) & ~near_defect) <= 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gain_e_per_adu": 0.0}, "gain_e_per_adu"),
        ({"read_noise_e": -1.0}, "read_noise_e"),
        ({"method": "fast"}, "method"),
        ({"mask": np.zeros((3, 3), bool)}, "mask shape"),
        ({"margin_px": 4}, "margin_px"),
    ],
)
def test_bad_input_raises(kwargs, match):
    kw = dict(gain_e_per_adu=GAIN, read_noise_e=RN, saturation_adu=60000) | kwargs
    with pytest.raises(ValueError, match=match):
        clean_cosmic_rays(np.zeros((32, 32), np.float32), **kw)


def test_non_2d_raises():
    with pytest.raises(ValueError, match="2-D"):
        clean_cosmic_rays(np.zeros(10), gain_e_per_adu=GAIN, read_noise_e=RN, saturation_adu=1e5)


def test_saturated_star_is_not_flagged():
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:128, :128]
    s = 3.0 / 2.3548
    star = 2e6 / (2 * np.pi * s**2) * np.exp(-((xx - 64.3) ** 2 + (yy - 63.8) ** 2) / (2 * s**2))
    truth = SKY + star
    data = rng.poisson(truth * GAIN) / GAIN + rng.normal(0, RN / GAIN, truth.shape)
    data = np.minimum(data, 4095.0).astype(np.float32)  # clipped at the ADC ceiling
    assert np.count_nonzero(data >= 4095.0) >= 9
    res = clean_cosmic_rays(data, gain_e_per_adu=GAIN, read_noise_e=RN, saturation_adu=4095.0)
    assert res.n_pixels == 0
    # same when the saturated pixels come in the mask (as after calibrate_image)
    masked = clean_cosmic_rays(
        data, gain_e_per_adu=GAIN, read_noise_e=RN, saturation_adu=np.inf, mask=data >= 4095.0
    )
    assert masked.n_pixels == 0
