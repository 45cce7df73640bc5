"""Tests of rpp_tasks.sim.evaluate on constructed catalogues whose answers are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from astropy.table import Table

from rpp_tasks.sim.evaluate import (
    expected_aperture_error_adu,
    fidelity_report,
    match_to_truth,
    pixelated_fwhm_px,
    pooled_bins,
    robust_std,
)
from rpp_tasks.sim.synthetic import make_star_field, psf_encircled_energy

FWHM = 3.5


@pytest.fixture(scope="module")
def truth():
    # the truth of a 1024^2 field (the image itself is not needed here)
    return make_star_field(
        (1024, 1024),
        n_stars=1500,
        fwhm_px=FWHM,
        mag_range=(13, 22),
        seed=21,
        n_cosmic_rays=0,
        n_hot_pixels=0,
    ).truth


def _catalog(truth, *, seed=0, ap_scale=1.0, err_scale=1.0, extra_frac=0.0, pos_sigma=0.05):
    """An ideal catalogue: positions near truth, photon-noise fluxes, honest errors (scaled on
    request)."""
    rng = np.random.default_rng(seed)
    m = truth.meta
    n = len(truth)
    f = np.asarray(truth["flux_adu"], float)
    r = 1.3 * FWHM
    f_ap = ap_scale * f * psf_encircled_energy(r, fwhm_px=FWHM)
    n_ann = np.full(n, math.pi * ((5 * FWHM) ** 2 - (3 * FWHM) ** 2))
    sig_ap = expected_aperture_error_adu(
        f_ap,
        radius_px=r,
        sky_adu=m["sky_adu"],
        gain_e_per_adu=m["gain_e_per_adu"],
        read_noise_e=m["read_noise_e"],
        n_annulus=n_ann,
    )
    sig_psf = np.asarray(truth["flux_err_crb_adu"], float)
    cat = Table(
        {
            "x_centroid": truth["x"] + rng.normal(0, pos_sigma, n),
            "y_centroid": truth["y"] + rng.normal(0, pos_sigma, n),
            "flux_1p3fwhm": f_ap * (1 + extra_frac * rng.standard_normal(n))
            + sig_ap * rng.standard_normal(n),
            "flux_err_1p3fwhm": sig_ap * err_scale,
            "flux_psf": f * (1 + extra_frac * rng.standard_normal(n))
            + sig_psf * rng.standard_normal(n),
            "flux_err_psf": sig_psf * err_scale,
            "n_annulus": n_ann,
        }
    )
    cat.meta.update(fwhm_px=FWHM * 1.02, aperture_radii_px={"1p3fwhm": r})
    return cat


# ------------------------------------------------------------------------------ helpers


def test_robust_std_unbiased_and_resistant():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2.0, 20000)
    assert robust_std(x) == pytest.approx(2.0, rel=0.015)
    x[:200] = 1e4  # 1 % wild outliers
    assert robust_std(x) == pytest.approx(2.0, rel=0.02)
    assert math.isnan(robust_std([1.0, np.nan]))


def test_pixelated_fwhm():
    # Gaussian convolved with a 1-px box ~ Gaussian with sigma^2 + 1/12
    s = 3.5 / 2.3548200450309493
    assert pixelated_fwhm_px(psf="gaussian", fwhm_px=3.5) == pytest.approx(
        2.3548200 * math.sqrt(s * s + 1 / 12), rel=2e-3
    )
    assert pixelated_fwhm_px(psf="moffat", fwhm_px=20.0, beta=3.0) == pytest.approx(20.0, rel=2e-3)


# ------------------------------------------------------------------------------ matching


def test_match_is_one_to_one_and_greedy_by_distance():
    truth = Table({"x": [10.0, 12.0, 50.0], "y": [10.0, 10.0, 50.0]})
    cat = Table(
        {
            "x_centroid": [10.2, 11.0, 11.9, 80.0, np.nan],
            "y_centroid": [10.0, 10.0, 10.0, 80.0, 1.0],
        }
    )
    m = match_to_truth(cat, truth, radius_px=1.5)
    assert list(m.catalog_index) == [0, 2] and list(m.truth_index) == [0, 1]
    assert m.separation_px == pytest.approx([0.2, 0.1])
    assert list(m.unmatched_catalog) == [1, 3, 4] and list(m.unmatched_truth) == [2]
    joined = m.joined(cat, truth)
    assert list(joined["true_x"]) == [10.0, 12.0]


def test_match_empty_and_bad_input():
    truth = Table({"x": [1.0], "y": [1.0]})
    empty = Table({"x_centroid": np.zeros(0), "y_centroid": np.zeros(0)})
    m = match_to_truth(empty, truth)
    assert m.n_matched == 0 and list(m.unmatched_truth) == [0]
    with pytest.raises(ValueError, match="lacks column"):
        match_to_truth(Table({"x": [1.0]}), truth)
    with pytest.raises(ValueError, match="radius_px"):
        match_to_truth(empty, truth, radius_px=0)


# ------------------------------------------------------------------------------ report


def test_perfect_catalog(truth):
    rep = fidelity_report(_catalog(truth), truth)
    assert rep.completeness == 1.0 and rep.spurious_fraction == 0.0 and rep.n_matched == len(truth)
    assert rep.n_truth_snr > 500
    assert rep.position_rms_px == pytest.approx(0.05 * math.sqrt(2), rel=0.1)
    assert rep.fwhm_rel_err == pytest.approx(0.02, abs=1e-12)
    ap, psf = rep.for_column("flux_1p3fwhm"), rep.for_column("flux_psf")
    assert ap.kind == "aperture" and ap.radius_px == pytest.approx(1.3 * FWHM)
    assert ap.offset_mag == pytest.approx(ap.offset_ideal_mag, abs=0.002)
    assert psf.offset_mag == pytest.approx(0.0, abs=0.002)
    for p in (ap, psf):
        assert p.scatter_ratio == pytest.approx(1.0, abs=0.07)
        assert p.error_ratio == pytest.approx(1.0, abs=0.07)
        assert p.bright_floor_mag < 0.003
    json.dumps(rep.to_dict())  # JSON-safe


def test_injected_offset_error_scale_and_floor_are_recovered(truth):
    cat = _catalog(truth, seed=3, ap_scale=0.97, err_scale=0.8, extra_frac=0.01)
    rep = fidelity_report(cat, truth)
    ap = rep.for_column("flux_1p3fwhm")
    assert ap.offset_mag - ap.offset_ideal_mag == pytest.approx(-2.5 * math.log10(0.97), abs=0.003)
    # errors reported 20 % too small -> error ratio about 1.25 (plus the 1 % floor at the bright
    # end)
    assert rep.for_column("flux_psf").bins[0]["error_ratio"] == pytest.approx(1.25, abs=0.1)
    # a 1 % multiplicative floor shows up at the bright end
    assert ap.bright_floor_mag == pytest.approx(0.01086, rel=0.3)
    assert ap.scatter_ratio > 1.05


def test_offset_uncertainty_does_not_inflate_bright_star_error_ratios(truth):
    """Honest errors score 1 in the brightest bin too: the offset's own error (common to a
    frame's stars, 0.6 mmag here, comparable to the photon noise of S/N > 500 stars) is part of
    the comparison, and its bootstrap estimate matches the spread of the offsets over frames.
    Without it the pooled S/N > 500 ratios of this seeded set are 1.06-1.08."""
    bins = (10.0, 20.0, 50.0, 200.0, 500.0, math.inf)
    fids = {"flux_psf": [], "flux_1p3fwhm": []}
    for s in range(60):
        rep = fidelity_report(_catalog(truth, seed=100 + s), truth, snr_bins=bins)
        for col, lst in fids.items():
            lst.append(rep.for_column(col))
    for col, lst in fids.items():
        pooled, _ = pooled_bins(lst, bins)
        top = pooled[-1]
        assert top["n"] >= 400
        # its statistical uncertainty: about 1 / sqrt(2 n) for Gaussian z
        assert top["error_ratio_sigma"] == pytest.approx(1.0 / math.sqrt(2 * top["n"]), rel=0.3)
        assert top["error_ratio"] == pytest.approx(1.0, abs=0.045), (col, top)
        assert top["scatter_ratio"] == pytest.approx(1.0, abs=0.045), (col, top)
        for b in pooled[:-1]:  # fainter bins: the term is negligible there
            assert b["error_ratio"] == pytest.approx(1.0, abs=0.05), (col, b)
        offsets = np.array([p.offset_mag for p in lst])
        sigmas = np.array([p.offset_sigma_mag for p in lst])
        assert np.median(sigmas) == pytest.approx(np.std(offsets, ddof=1), rel=0.25)
        assert 3e-4 < np.median(sigmas) < 1e-3


def test_missing_stars_and_spurious_detections(truth):
    cat = _catalog(truth, seed=4)
    rng = np.random.default_rng(5)
    snr = np.asarray(truth["snr_expected"])
    bright = np.flatnonzero((snr > 10) & (np.asarray(truth["frac_in_image"]) >= 0.99))
    drop = rng.choice(bright, size=int(0.05 * bright.size), replace=False)
    cat.remove_rows(drop)
    # 12 detections far (> 5 px) from any star
    xs, ys = [], []
    while len(xs) < 12:
        x, y = rng.uniform(0, 1023, 2)
        if np.min(np.hypot(truth["x"] - x, truth["y"] - y)) > 5:
            xs.append(x)
            ys.append(y)
    extra = Table({c: np.full(12, 1000.0) for c in cat.colnames})
    extra["x_centroid"], extra["y_centroid"] = xs, ys
    from astropy.table import vstack

    cat = vstack([cat, extra])
    # a cosmic-ray mask excuses one of them
    cr = np.zeros((1024, 1024), bool)
    cr[int(round(ys[0])), int(round(xs[0]))] = True
    rep = fidelity_report(cat, truth, cr_mask=cr)
    assert rep.completeness == pytest.approx(1 - drop.size / bright.size, abs=1e-12)
    assert rep.n_spurious == 11 and rep.n_spurious_excused == 1
    assert rep.spurious_fraction == pytest.approx(11 / len(cat))
    assert rep.spurious_fraction_raw == pytest.approx(12 / len(cat))
    low = [b for b in rep.completeness_bins if b["snr_hi"] <= 10]
    assert all(b["completeness"] == 1.0 for b in low if b["n_true"])


def test_empty_catalog_is_flagged_not_raised(truth):
    cat = _catalog(truth)[:0]
    rep = fidelity_report(cat, truth)
    assert rep.completeness == 0.0 and math.isnan(rep.spurious_fraction)
    assert "too_few_stars" in rep.for_column("flux_psf").flags


def test_bad_input_raises(truth):
    with pytest.raises(ValueError, match="truth lacks"):
        fidelity_report(_catalog(truth), Table({"x": [1.0]}))
    with pytest.raises(ValueError, match="flux column"):
        fidelity_report(_catalog(truth), truth, flux_cols=("flux_nope",))


def test_spurious_breakdown_and_fwhm_zones():
    truth = Table(
        {
            "x": [100.0, 300.0, 500.0, 10.0],
            "y": [100.0, 300.0, 500.0, 10.0],
            "flux_adu": [1e5, 1e5, 1e7, 1e4],
            "snr_expected": [200.0, 200.0, 5000.0, 50.0],
            "saturated": [False, False, True, False],
            "fwhm_px": [3.5, 3.6, 3.7, 4.0],
        },
        meta={"gain_e_per_adu": 1.0, "read_noise_e": 5.0, "sky_adu": 100.0, "shape": [600, 600]},
    )
    cr = np.zeros((600, 600), bool)
    cr[200, 200] = True
    cat = Table(
        {
            "x_centroid": [100.0, 104.0, 300.0, 510.0, 200.5, 50.0],
            "y_centroid": [100.0, 100.0, 300.0, 505.0, 200.0, 400.0],
            "flux_1p3fwhm": np.ones(6),
            "psf_fwhm_px": [3.5, 3.5, 3.6, 3.7, 3.0, 3.0],
        },
        meta={"fwhm_px": 3.5},
    )
    rep = fidelity_report(cat, truth, cr_mask=cr, flux_cols=())
    assert rep.spurious_breakdown == {"duplicate": 1, "saturated": 1, "defect": 1, "other": 1}
    assert rep.spurious_fraction_raw == pytest.approx(4 / 6)
    assert rep.fwhm_zones["source"] == "psf_fwhm_px"
