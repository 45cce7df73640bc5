"""Tests of rpp_tasks.stages.detection.detect_sources: completeness, spurious rate, shape of the
output."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.special import erf

from rpp_tasks.stages.detection import SOURCE_COLUMNS, detect_sources

SKY_ADU, GAIN, RN_E = 800.0, 1.5, 8.0
RMS = math.sqrt(SKY_ADU / GAIN + (RN_E / GAIN) ** 2)
FWHM = 3.5


def gaussian_stars(shape, x, y, flux, fwhm=FWHM):
    s = fwhm / (2 * math.sqrt(2 * math.log(2))) * math.sqrt(2)
    img = np.zeros(shape)
    half = int(4 * fwhm)
    k = np.arange(-half, half + 1)
    for xi, yi, fi in zip(x, y, flux):
        px, py = int(round(xi)) + k, int(round(yi)) + k
        fx = 0.5 * (erf((px - xi + 0.5) / s) - erf((px - xi - 0.5) / s))
        fy = 0.5 * (erf((py - yi + 0.5) / s) - erf((py - yi - 0.5) / s))
        ok_x = (px >= 0) & (px < shape[1])
        ok_y = (py >= 0) & (py < shape[0])
        img[np.ix_(py[ok_y], px[ok_x])] += fi * np.outer(fy[ok_y], fx[ok_x])
    return img


@pytest.fixture(scope="module")
def field():
    """512^2, 300 random stars (S/N 3..2000), Poisson + read noise, 150 masked cosmic rays."""
    rng = np.random.default_rng(2024)
    size, n = 512, 300
    x = rng.uniform(0, size - 1, n)
    y = rng.uniform(0, size - 1, n)
    flux = 10 ** rng.uniform(2.3, 5.3, n)
    clean = gaussian_stars((size, size), x, y, flux)
    data = (
        rng.poisson((clean + SKY_ADU) * GAIN) / GAIN
        + rng.normal(0, RN_E / GAIN, clean.shape)
        - SKY_ADU
    )
    mask = np.zeros(data.shape, bool)
    cy, cx = rng.integers(0, size, 150), rng.integers(0, size, 150)
    data[cy, cx] += rng.uniform(300, 3000, 150)
    mask[cy, cx] = True
    # optimal (PSF-fit) S/N of each star
    sig = FWHM / 2.3548
    neff = 4 * math.pi * sig**2
    snr = flux / np.sqrt(RMS**2 * neff + flux / GAIN)
    return data.astype(np.float32), np.full(data.shape, RMS, np.float32), mask, x, y, flux, snr


def _match(src, x, y):
    dt, _ = cKDTree(np.column_stack([src["x_centroid"], src["y_centroid"]])).query(
        np.column_stack([x, y])
    )
    ds, _ = cKDTree(np.column_stack([x, y])).query(
        np.column_stack([src["x_centroid"], src["y_centroid"]])
    )
    return dt < 1.5, ds >= 1.5


def test_completeness_and_spurious_rate(field):
    data, rms, mask, x, y, flux, snr = field
    src = detect_sources(data, rms, fwhm_px=FWHM, mask=mask)
    found, spurious = _match(src, x, y)
    nn, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=2)
    inside = (x > 3) & (y > 3) & (x < 508) & (y < 508)
    target = inside & (snr > 10) & (nn[:, 1] > 2 * FWHM)
    assert target.sum() > 150
    assert found[target].mean() >= 0.99
    assert spurious.sum() <= 1  # <= 0.5 % of ~250 detections
    # the detection S/N tracks the true S/N
    assert src.meta["n_rejected_snr"] > 0 and np.all(src["snr_det"] >= 5.0)


def test_centroids_are_accurate(field):
    data, rms, mask, x, y, flux, snr = field
    src = detect_sources(data, rms, fwhm_px=FWHM, mask=mask)
    tree = cKDTree(np.column_stack([x, y]))
    d, j = tree.query(np.column_stack([src["x_centroid"], src["y_centroid"]]))
    bright = snr[j] > 100
    assert np.median(d[bright]) < 0.05


def test_pure_noise_gives_no_detection_and_shaped_empty_table():
    rng = np.random.default_rng(5)
    data = rng.normal(0, 20.0, (512, 512)).astype(np.float32)
    src = detect_sources(data, np.full(data.shape, 20.0, np.float32), fwhm_px=3.0)
    assert len(src) <= 1
    empty = detect_sources(np.zeros((64, 64), np.float32), 1.0, fwhm_px=3.0)
    assert len(empty) == 0 and empty.meta["no_sources"] is True
    assert empty.colnames == [name for name, _ in SOURCE_COLUMNS]
    assert empty.meta["method"] == "sep"


def test_output_sorted_by_flux_with_1_based_ids(field):
    data, rms, mask, *_ = field
    src = detect_sources(data, rms, fwhm_px=FWHM, mask=mask, max_sources=50)
    assert len(src) == 50
    assert list(src["id"]) == list(range(1, 51))
    assert np.all(np.diff(src["flux"]) <= 0)
    assert src.meta["threshold_sigma"] == 3.0


def test_faint_star_on_bright_wing_is_found():
    rng = np.random.default_rng(11)
    x, y, flux = (
        np.array([60.0, 69.0]),
        np.array([60.0, 64.0]),
        np.array([3e5, 4e3]),
    )  # 9.8 px = 2.8 FWHM, 1:75
    data = gaussian_stars((128, 128), x, y, flux) + rng.normal(0, RMS, (128, 128))
    src = detect_sources(data, RMS, fwhm_px=FWHM)
    found, spurious = _match(src, x, y)
    assert found.all() and not spurious.any()


def test_masked_cosmic_rays_are_not_detected():
    rng = np.random.default_rng(8)
    data = rng.normal(0, 10.0, (128, 128))
    mask = np.zeros(data.shape, bool)
    for yy, xx in [(20, 30), (70, 90), (100, 15)]:
        data[yy, xx] += 2000.0
        mask[yy, xx] = True
    assert len(detect_sources(data, 10.0, fwhm_px=3.0, mask=mask)) == 0
    assert len(detect_sources(data, 10.0, fwhm_px=3.0)) >= 1  # unmasked they would be


def test_dao_method_finds_bright_stars(field):
    data, rms, mask, x, y, flux, snr = field
    src = detect_sources(data, rms, method="dao", fwhm_px=FWHM, mask=mask, threshold_sigma=5.0)
    found, _ = _match(src, x, y)
    inside = (x > 5) & (y > 5) & (x < 506) & (y < 506)
    assert found[inside & (snr > 50)].mean() > 0.85  # no deblending, no CR-aware S/N cut
    assert src.meta["method"] == "dao"


def test_bad_input_raises():
    with pytest.raises(ValueError, match="does not match"):
        detect_sources(np.zeros((32, 32)), np.ones((32, 31)))
    with pytest.raises(ValueError, match="does not match"):
        detect_sources(np.zeros((32, 32)), 1.0, mask=np.zeros((31, 32), bool))
    with pytest.raises(ValueError, match="2-D"):
        detect_sources(np.zeros(32), 1.0)
    with pytest.raises(ValueError, match="method"):
        detect_sources(np.zeros((32, 32)), 1.0, method="dog")


@pytest.mark.parametrize("remainder_adu", [2600.0, 900.0])
def test_the_partly_filled_end_of_a_long_bleed_trail_is_not_a_star(remainder_adu):
    """A saturated star's bleed trail ends in a pixel holding what charge was left (anything
    from zero to the full well). Far from the star's halo, a 2600 ADU remainder (below 5 % of a
    60000 ADU saturation) was detected as a star of its own (61-Mpx bench frame)."""
    from rpp_tasks.sim.psf_render import _bleed_columns

    rng = np.random.default_rng(7)
    ny, nx, sat, rms = 300, 200, 60000.0, 30.0
    yy, xx = np.mgrid[0:ny, 0:nx]
    x0, y0, fwhm = 100.3, 100.6, 3.5
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1 / 3.0) - 1.0))
    prof = (1.0 + ((xx - x0) ** 2 + (yy - y0) ** 2) / alpha**2) ** -3.0
    img = (4.0e7 * prof / prof.sum()).astype(np.float32)
    bleed = _bleed_columns(img, sat, np.array([100]), np.array([101]), np.array([12]))
    # the last filled pixel of the longest trail holds ``remainder_adu``
    cols = np.flatnonzero(bleed.any(axis=0))
    lengths = [np.flatnonzero(bleed[:, c]).max() for c in cols]
    c = int(cols[int(np.argmax(lengths))])
    end = int(max(lengths))
    assert end - y0 > 60  # a trail reaching far beyond the halo disc
    img[end, c] = remainder_adu
    mask = img >= sat
    data = img + rng.normal(0.0, rms, img.shape).astype(np.float32)
    data[mask] = sat
    tab = detect_sources(
        data, np.full(img.shape, rms, np.float32), fwhm_px=fwhm, mask=mask, saturation_adu=sat
    )
    d = np.hypot(np.asarray(tab["x_centroid"]) - c, np.asarray(tab["y_centroid"]) - end)
    assert not np.any(d < 4.0), tab[d < 4.0]
    # the saturated star itself is one source
    ds = np.hypot(np.asarray(tab["x_centroid"]) - x0, np.asarray(tab["y_centroid"]) - y0)
    assert np.sum(ds < 3.0) == 1
