"""Photometry on fields built like real optics (issue 11): a PSF varying across the field, local
aperture corrections, honest errors, saturated stars without spurious halos, repeatability.

The end-to-end tests reduce one seeded 2048x2048 field of
`rpp_tasks.sim.synthetic.make_optics_field` (FWHM +15 % in the corners, Moffat beta 3.3 -> 2.7,
ellipticity up to 0.1 turning around the field, 4 % sky gradient, gain 0.8, close pairs, saturated
stars with bleed trails and halos, cosmic rays, hot pixels) through the whole per-frame chain. On it
the code before issue 11 (one circular PSF, one aperture correction) gave PSF scatter / Cramer-Rao
1.2 / 1.9 / 3.4 / 24 in the S/N bins 10-20 / 20-50 / 50-200 / 200-500, reported PSF errors 2.4x too
small, 45 duplicate detections, 143 spurious detections around saturated stars, a 7 % FWHM error in
the corners and aperture magnitudes whose offset changes by 5 % from the centre to the corners.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from rpp_tasks.config import find_config
from rpp_tasks.session import pipeline
from rpp_tasks.sim.evaluate import fidelity_report, match_to_truth, robust_std
from rpp_tasks.sim.synthetic import (
    PsfVariation,
    make_optics_field,
    make_star_field,
    render_elliptical_moffat_stamps,
)
from rpp_tasks.stages.detection import FLAG_SATURATED, detect_sources, find_saturated_stars
from rpp_tasks.stages.field_psf import FieldPSF, _poly_terms
from rpp_tasks.stages.field_psf_fit import fit_field_psf
from rpp_tasks.stages.photometry import repeatability

SNR_BINS = (10.0, 20.0, 50.0, 200.0, 500.0, math.inf)


def _write(path, field):
    raw = np.clip(np.rint(field.data), 0, 65535).astype(np.uint16)
    fits.PrimaryHDU(raw, header=field.header).writeto(path, overwrite=True)
    return path


@pytest.fixture(scope="module")
def optics(tmp_path_factory):
    """One optics field reduced by the whole chain: (field, summary, catalogue, fidelity)."""
    tmp = tmp_path_factory.mktemp("optics")
    field = make_optics_field((2048, 2048), seed=2026)
    s = pipeline.reduce_frame(_write(tmp / "optics.fits", field), find_config("demo"), tmp / "out")
    assert s["status"] == "ok", s.get("reason")
    cat = Table.read(s["catalog"])
    rep = fidelity_report(
        cat,
        field.truth,
        cr_mask=field.cr_mask,
        hot_mask=field.hot_mask,
        bleed_mask=field.bleed_mask,
        fwhm_measured_px=s["fwhm_px"],
        snr_bins=SNR_BINS,
    )
    return field, s, cat, rep


# ------------------------------------------------------------------------------ end to end


def test_psf_and_aperture_scatter_near_the_photon_limit_in_every_bin(optics):
    _, _, _, rep = optics
    for col in ("flux_psf", "flux_1p3fwhm"):
        fid = rep.for_column(col)
        # pooled over the sample, and bin by bin up to S/N 500 with room for the statistics of
        # 30-200 stars per bin and for what the model still misses on the brightest (the code
        # before issue 11: 1.9 / 3.4 / 24 in the 20-50 / 50-200 / 200-500 bins)
        assert fid.scatter_ratio <= 1.15, (col, fid.scatter_ratio)
        for b in fid.bins:
            if b["snr_hi"] <= 500 and b["n"] >= 15:
                assert b["scatter_ratio"] <= (1.2 if b["snr_hi"] <= 200 else 1.5), (col, b)
        assert fid.bright_floor_mag <= 0.005, (col, fid.bright_floor_mag)


def test_reported_errors_match_the_scatter(optics):
    _, _, _, rep = optics
    for col in ("flux_psf", "flux_1p3fwhm"):
        fid = rep.for_column(col)
        assert 0.85 <= fid.error_ratio <= 1.15, (col, fid.error_ratio)
        for b in fid.bins:
            if b["n"] >= 15:
                assert 0.8 <= b["error_ratio"] <= 1.3, (col, b)


def test_bright_star_errors_include_the_psf_model_uncertainty(optics):
    """Above S/N 200 the photon noise is below what the PSF model's own statistical error does
    to the extrapolation to a total flux (0.1-0.3 %): the reported errors carry that term (from
    the covariance of the model's polynomial coefficients), so they stay honest for the bright
    stars too. Without it the reported errors of the stars above S/N 500 were 2x too small on the
    bench fields (1.9-2.1)."""
    _, s, cat, rep = optics
    info = s["stages"]["photometry"]["psf_model_error"]
    assert info["n_stars"] > 100
    assert 2e-4 < info["median_frac"] < 5e-3, info
    assert info["p90_frac"] >= info["median_frac"]
    for col in ("flux_psf", "flux_1p3fwhm"):
        smp = rep.for_column(col).samples
        bright = smp["snr_expected"] > 200
        assert bright.sum() >= 20
        ratio = robust_std(smp["z_reported"][bright])
        assert 0.8 <= ratio <= 1.25, (col, ratio, int(bright.sum()))
    # the term is largest where the PSF stars constrain the polynomials least (not at the centre)
    x = np.asarray(cat["x_psf"], float)
    y = np.asarray(cat["y_psf"], float)
    ok = np.isfinite(x) & np.isfinite(y)
    from rpp_tasks.stages.field_psf import FieldPSF

    model = FieldPSF.from_dict(s["stages"]["photometry"]["psf_model"])
    assert model.cov is None  # not serialised: a rebuilt model adds nothing
    assert np.all(model.flux_fraction_sigma(x[ok][:5], y[ok][:5], 9.0) == 0.0)


def test_psf_fluxes_of_bright_stars_near_the_bound_on_one_sky(optics):
    """Above S/N 50 the PSF fluxes are limited by the PSF model's error, a smooth function of the
    position (the same stars fitted with the true local PSF reach the Cramer-Rao bound). The
    large-aperture references that remove it now stand on the sky map, weighted with its error
    (``map_sigma_adu``) and with the model's uncertainty beyond the aperture, and the PSF stars'
    local sky has a prior of that width. On this frame the code before gave PSF scatter / CR
    1.198 over the 172 sample stars above S/N 50 and 1.78 over the 38 above S/N 200 (psf11c: 1.125
    and 1.567; nine bench frames pooled: 1.36 -> 1.24 at S/N 200-500)."""
    _, s, _, rep = optics
    sky = s["stages"]["background"]
    assert sky["map_sigma_adu"] == pytest.approx(1.2533 * sky["background_rms_adu"] / 64, rel=1e-3)
    smp = rep.for_column("flux_psf").samples
    bright = smp["snr_expected"] > 50
    assert bright.sum() >= 100
    scatter = robust_std(smp["z"][bright])
    errors = robust_std(smp["z_reported"][bright])
    assert scatter <= 1.16, scatter
    assert 0.9 <= errors <= 1.1, errors
    above_200 = smp["snr_expected"] > 200
    assert robust_std(smp["z"][above_200]) <= 1.65


def test_calibration_tied_to_the_psf_model_brings_bright_stars_closer_to_the_bound(optics):
    """The large-aperture calibration fits the PSF model's own coefficient error (its covariance
    as the prior, one free offset) instead of a free order-3 polynomial of the position, and
    corrects each star by what that error does to its own flux, the reference's extrapolation
    beyond the large aperture included. On this frame the polynomial calibration gave scatter /
    bound above S/N 200 of 1.567 (PSF, 38 stars) and 1.532 (1.3 FWHM aperture), above S/N 50
    1.125 and 1.181 (then 1.212 / 1.270 and 1.085 / 1.107; nine bench frames pooled, S/N
    200-500: PSF 1.244 -> 1.232, aperture 1.260 -> 1.175). With the PSF model's brightest stars
    kept (psf11e: outliers rejected on the first varying model) above S/N 200 now 1.096 / 1.139,
    above S/N 50 1.065 / 1.079."""
    _, s, _, rep = optics
    cal = s["stages"]["photometry"]["flux_calibration"]
    assert cal["applied"] and cal["n_stars"] >= 100
    assert cal["psf"]["method"] == "model" and cal["1p3fwhm"]["method"] == "model"
    limits = {"flux_psf": (1.10, 1.18), "flux_1p3fwhm": (1.14, 1.22)}
    for col, (lim_50, lim_200) in limits.items():
        smp = rep.for_column(col).samples
        above_50 = smp["snr_expected"] > 50
        above_200 = smp["snr_expected"] > 200
        assert above_200.sum() >= 30
        assert robust_std(smp["z"][above_50]) <= lim_50, col
        assert robust_std(smp["z"][above_200]) <= lim_200, col
        # the correction's posterior is in the errors, not counted twice
        assert 0.9 <= robust_std(smp["z_reported"][above_50]) <= 1.1, col


def test_flux_responses_match_a_changed_model():
    """`FieldPSF.flux_responses`: the first-order change of an aperture's fraction of light and
    of a PSF-fit flux when the model's coefficients change, against the changed model itself."""
    coeffs = np.zeros((4, 3))
    coeffs[:, 0] = [3.6, 0.04, -0.02, 0.32]
    coeffs[0, 1] = 0.25
    m = FieldPSF(coeffs, 1, (100.0, 100.0, 100.0, 100.0), (200, 200), 1, 31)
    x, y = np.array([20.3, 150.6, 99.5]), np.array([30.2, 170.9, 101.1])
    dp = np.zeros((4, 3))
    dp[0, 0], dp[0, 1], dp[3, 0], dp[3, 2] = 0.02, -0.015, 0.006, 0.004
    m2 = FieldPSF(coeffs + dp, 1, m.norm, m.shape, 1, 31)
    radii = {"small": 4.5, "big": 9.0}
    resp = m.flux_responses(x, y, radii, fit_half=7, sky_var=np.full(3, 30.0), gain=1.0)
    f1, f2 = m.aperture_fractions(x, y, radii), m2.aperture_fractions(x, y, radii)
    for lab in radii:
        change = np.log(f2[lab] / f1[lab])
        assert np.allclose(resp[lab] @ dp.ravel(), change, rtol=0.1, atol=2e-5), lab
    # a flux-only fit with the changed model to the data of the first (sky-limited weights)
    p1, p2 = m.stamps(x, y, 7), m2.stamps(x, y, 7)
    f_fit = np.sum(p2 * p1, axis=(1, 2)) / np.sum(p2 * p2, axis=(1, 2))
    assert np.allclose(-resp["fit"] @ dp.ravel(), np.log(f_fit), rtol=0.1, atol=2e-5)


def test_model_tied_fit_equals_the_direct_solution_with_a_singular_prior():
    """The model-tied calibration solves with the Woodbury identity (O(n P^2): ~4000 references
    on a 61-Mpx frame took 45 of its 77 photometry CPU-s as an n x n inverse); the result is the
    direct formula's, with fixed model terms (zero rows of the prior) and clipping."""
    from rpp_tasks.stages.flux_calibration import _model_tied_fit

    rng = np.random.default_rng(7)
    n, p = 300, 12
    h = rng.normal(size=(n, p)) * 0.02
    a = rng.normal(size=(p, p))
    cov = a @ a.T * 1e-4
    cov[:, 9:] = cov[9:, :] = 0.0  # three fixed terms
    var = rng.uniform(0.5, 2.0, n) * 1e-4
    dp_true = rng.multivariate_normal(np.zeros(p), cov)
    d = 1.003 + h @ dp_true + rng.normal(size=n) * np.sqrt(var)
    d[:3] += 0.5  # outliers, clipped
    c0, dp, post, var_c0, a1 = _model_tied_fit(h, d, var, cov)

    keep = np.ones(n, bool)
    for _ in range(3):  # the direct solution, as before
        hk, dk = h[keep], d[keep]
        kin = np.linalg.inv(hk @ cov @ hk.T + np.diag(var[keep]))
        one = np.ones(dk.size)
        v0 = 1.0 / float(one @ kin @ one)
        c = float(one @ kin @ dk) * v0
        aa = cov @ hk.T
        x = aa @ kin @ (dk - c)
        ref = (c, x, cov - aa @ kin @ aa.T, v0, aa @ kin @ one)
        new = np.abs((d - c - h @ x) / np.sqrt(var)) < 4.0
        if np.array_equal(new, keep):
            break
        keep = new
    assert not keep[:3].any() and keep[3:].all()
    assert c0 == pytest.approx(ref[0], rel=1e-12) and abs(c0 - 1.003) < 3e-3
    assert var_c0 == pytest.approx(ref[3], rel=1e-9)
    for got, want in zip((dp, post, a1), (ref[1], ref[2], ref[4]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12 * np.abs(want).max())
    assert np.all(dp[9:] == 0.0) and np.all(post[9:] == 0.0)


def test_no_duplicates_few_spurious_and_complete(optics):
    _, s, cat, rep = optics
    assert rep.spurious_breakdown["duplicate"] == 0
    assert rep.spurious_breakdown["saturated"] <= 3
    assert rep.spurious_fraction_raw <= 0.01
    assert rep.completeness >= 0.98
    # every saturated star is found, once
    assert rep.completeness_bins  # the S/N bins are filled
    sat = np.flatnonzero(np.asarray(optics[0].truth["saturated"]))
    m = match_to_truth(cat, optics[0].truth, radius_px=3.0)
    found = np.isin(sat, m.truth_index)
    assert found.mean() >= 0.9, f"{found.sum()} of {sat.size} saturated stars found"


def test_fwhm_at_centre_and_corners_within_3_percent(optics):
    _, s, _, rep = optics
    z = rep.fwhm_zones
    assert z["source"] == "psf_fwhm_px"
    assert z["max_abs_rel_err"] <= 0.03, z
    # the frame's PSF model is in summary.json, with its order and why
    pm = s["stages"]["photometry"]["psf_model"]
    assert pm["kind"] == "field_moffat" and pm["order"] >= 2
    assert "cells covered" in pm["stats"]["order_reason"]
    assert {"centre", "corner_ll", "corner_ur"} <= set(pm["at"])
    assert pm["at"]["corner_ur"]["fwhm_px"] > 1.05 * pm["at"]["centre"]["fwhm_px"]


def test_aperture_magnitudes_are_total_magnitudes_everywhere(optics):
    """A bright star gives the same magnitude in the centre and in a corner (the old single
    aperture correction left a centre-corner difference of several percent)."""
    field, _, cat, _ = optics
    m = match_to_truth(cat, field.truth)
    t = field.truth[m.truth_index]
    c = cat[m.catalog_index]
    ok = (
        (np.asarray(t["snr_expected"]) > 50)
        & ~np.asarray(t["saturated"])
        & ~np.asarray(c["blended"])
        & np.isfinite(np.asarray(c["flux_1p3fwhm"], float))
    )
    ny, nx = field.data.shape
    r = np.hypot(t["x"] - nx / 2, t["y"] - ny / 2) / (0.5 * math.hypot(nx, ny))
    for col in ("flux_1p3fwhm", "flux_1p1fwhm", "flux_psf"):
        dm = -2.5 * np.log10(np.asarray(c[col], float) / np.asarray(t["flux_adu"], float))
        centre = np.median(dm[ok & (r < 0.4)])
        corners = np.median(dm[ok & (r > 0.8)])
        assert abs(corners - centre) < 0.01, (col, centre, corners)
        assert abs(centre) < 0.02, (col, centre)  # total magnitudes: no aperture offset left
    assert "apcorr_1p3fwhm" in cat.colnames and cat.meta["aperture_corrected"]
    apc = np.asarray(cat["apcorr_1p3fwhm"], float)
    assert 1.05 < np.nanmedian(apc) < 1.4  # a 1.3 FWHM aperture misses 10-25 % of a Moffat star


# ------------------------------------------------------------------------------ PSF model


def test_field_psf_stamps_are_normalised_with_exact_gradients():
    coeffs = np.zeros((4, 3))
    coeffs[:, 0] = [3.8, 0.05, -0.03, 0.33]
    coeffs[0, 1] = 0.3  # FWHM grows along x
    m = FieldPSF(coeffs, 1, (100.0, 100.0, 100.0, 100.0), (200, 200), 1, 31)
    x, y = np.array([20.3, 150.6]), np.array([30.2, 170.9])
    v = m.stamps(x, y, 30)
    # unit total flux: what the stamp misses is the Moffat wing beyond 30 px
    assert np.all(np.abs(v.sum(axis=(1, 2)) - 1) < 2e-3)
    # position derivatives (at the local shape) against finite differences of a constant model
    m0 = FieldPSF(coeffs[:, :1], 0, m.norm, m.shape, 1, 31)
    v0, gx, gy = m0.stamps(x, y, 30, derivatives=True)
    e = 1e-4  # central differences
    ddx = (m0.stamps(x + e, y, 30) - m0.stamps(x - e, y, 30)) / (2 * e)
    ddy = (m0.stamps(x, y + e, 30) - m0.stamps(x, y - e, 30)) / (2 * e)
    assert np.allclose(ddx, gx, atol=1e-6 * v0.max())
    assert np.allclose(ddy, gy, atol=1e-6 * v0.max())
    sh = m.shape_at(x, y)
    assert sh["fwhm_px"][1] > sh["fwhm_px"][0]
    assert sh["ellipticity"] == pytest.approx(np.hypot(0.05, 0.03), abs=1e-9)
    assert np.allclose(sh["beta"], 1 / 0.33)
    # round trip through summary.json
    m2 = FieldPSF.from_dict(m.to_dict())
    assert np.array_equal(m2.stamps(x, y, 5), m.stamps(x, y, 5))


def test_field_psf_matches_the_synthetic_renderer():
    """The model and the synthetic truth describe the same elliptical Moffat."""
    fw, beta, e, th = 3.9, 2.8, 0.08, 0.6
    coeffs = np.zeros((4, 1))
    coeffs[:, 0] = [fw, e * math.cos(2 * th), e * math.sin(2 * th), 1 / beta]
    m = FieldPSF(coeffs, 0, (50.0, 50.0, 50.0, 50.0), (100, 100), 1, 31)
    truth = render_elliptical_moffat_stamps(
        [0.2], [-0.3], 12, fwhm_px=fw, beta=beta, ellipticity=e, theta_rad=th
    )[0]
    model = m.stamps(np.array([50.2]), np.array([49.7]), 12, ix=[50], iy=[50])[0]
    assert np.abs(model - truth).max() < 2e-4 * truth.max()


def _sky_subtracted_sources(field, *, fwhm_guess_px):
    """A synthetic field's image less its constant sky, its noise from the truth's sky, gain and
    read noise, and the sources detected on it: the inputs of `fit_field_psf`."""
    m = field.truth.meta
    sky, gain, rn = float(m["sky_adu"]), float(m["gain_e_per_adu"]), float(m["read_noise_e"])
    data = field.data.astype(np.float32) - sky
    rms = math.sqrt(sky / gain + (rn / gain) ** 2)
    return data, rms, detect_sources(data, rms, fwhm_px=fwhm_guess_px, peak_search=False)


def test_fit_field_psf_follows_the_optics_and_stays_constant_when_it_should(tmp_path):
    var = PsfVariation()
    field = make_optics_field((1536, 1536), seed=5, n_bright=0, n_cosmic_rays=0, n_hot_pixels=0)
    data = field.data.astype(np.float32) - np.asarray(field.truth["sky_adu"]).mean()
    sky = float(field.params["sky_adu"])
    rms = math.sqrt(sky / 0.8 + (6 / 0.8) ** 2)
    src = detect_sources(data, rms, fwhm_px=3.5, peak_search=False)
    m = fit_field_psf(data, src, rms=rms, gain_e_per_adu=0.8, saturation_adu=59000)
    assert m.order >= 2
    pts = np.array([[768, 768], [80, 80], [1456, 80], [80, 1456], [1456, 1456]], float)
    true_fw, true_beta, true_e, _ = var.params_at(pts[:, 0], pts[:, 1], (1536, 1536))
    sh = m.shape_at(pts[:, 0], pts[:, 1])
    assert np.all(np.abs(sh["fwhm_px"] / true_fw - 1) < 0.03), (sh["fwhm_px"], true_fw)
    assert np.all(np.abs(sh["ellipticity"] - true_e) < 0.03)
    assert "beta_constant" not in m.flags  # the wings vary (beta 3.3 -> 2.7) and it shows
    # the coefficients' covariance: the uncertainty of the flux fraction within 2.5 FWHM is
    # small at the centre, larger in the corners (polynomials pinned by fewer stars there)
    n_coef = 4 * len(_poly_terms(m.order))
    assert m.cov.shape == (n_coef, n_coef)
    assert np.all(np.linalg.eigvalsh(m.cov) > -1e-12 * np.abs(m.cov).max())
    sig = m.flux_fraction_sigma(pts[:, 0], pts[:, 1], 2.5 * 3.6)
    assert np.all(sig > 0) and np.all(sig < 0.02), sig
    assert np.median(sig[1:]) > 1.5 * sig[0], sig
    # one PSF everywhere: the AIC keeps order 0
    flat = make_star_field((1024, 1024), n_stars=700, psf="moffat", seed=3, n_cosmic_rays=0)
    d2 = flat.data.astype(np.float32) - 800.0
    rms2 = math.sqrt(800 / 1.5 + (8 / 1.5) ** 2)
    src2 = detect_sources(d2, rms2, fwhm_px=3.5, peak_search=False)
    m2 = fit_field_psf(d2, src2, rms=rms2, gain_e_per_adu=1.5, saturation_adu=59000)
    assert m2.order == 0 and m2.fwhm_px == pytest.approx(3.5, rel=0.01)
    assert len(_poly_terms(m2.order)) == 1
    # few stars: constant model, and the reason is recorded
    m3 = fit_field_psf(d2, src2[:12], rms=rms2, gain_e_per_adu=1.5, saturation_adu=59000)
    assert m3.order == 0 and "too few" in m3.stats["order_reason"]


def test_fit_field_psf_keeps_beta_constant_when_its_variation_runs_to_the_clip():
    """Undersampled stars (FWHM 1.1 px, +30 % towards the corners, Seestar-like after the 2x2
    Bayer binning; ~20 PSF stars, order 1) with heavy wings, one Moffat beta 1.5 everywhere: the
    cores do not pin the wings and the free gradient of ``u = 1/beta`` ran to its clip (beta 1.3)
    on one side of the frame, where the clipped ``u`` has no derivative -- as on the real Seestar
    M 94 pair. Such a variation is not measured: ``u`` is now constant, and the light inside
    4 px follows the truth within 0.05 mag over the frame (the code before: 0.21 mag off on one
    side, 0.11 mag rms; 5 of 10 seeds ran to the clip). Where ``u`` stays inside its bounds
    (optics field, `test_fit_field_psf_follows_the_optics_...`) its variation is kept."""
    shape = (960, 540)
    var = PsfVariation(
        fwhm_px=1.1, fwhm_corner_frac=0.3, beta_centre=1.5, beta_corner=1.5,
        ellipticity_corner=0.25, ellipticity_power=0.5, angle_twist_deg=20.0,
    )  # fmt: skip
    f = make_star_field(
        shape, n_stars=45, psf="moffat", fwhm_px=1.1, psf_variation=var, sky_adu=3600.0,
        gain_e_per_adu=0.13, read_noise_e=3.0, exptime_s=10.0, mag_range=(15.0, 19.5),
        mag_slope=0.0, n_cosmic_rays=0, n_hot_pixels=0, seed=0,
    )  # fmt: skip
    data, rms, src = _sky_subtracted_sources(f, fwhm_guess_px=1.5)
    # the order by AIC (``cv_max_stars=0``): the rule acts on whatever order is chosen -- with
    # these ~20 stars the cross-validation would choose order 0 (no u to vary), on the real pair
    # it keeps order 1
    m = fit_field_psf(data, src, rms=rms, gain_e_per_adu=0.13, saturation_adu=60000, cv_max_stars=0)
    assert m.order == 1 and m.n_stars >= 15
    assert "beta_constant" in m.flags
    assert m.stats["orders_tried"][-1]["beta"] == "constant"
    gx, gy = np.meshgrid(np.linspace(10, shape[1] - 11, 6), np.linspace(10, shape[0] - 11, 10))
    x, y = gx.ravel() + 0.3, gy.ravel() + 0.2
    beta_m = m.shape_at(x, y)["beta"]
    assert np.ptp(beta_m) < 1e-6 and 1.35 < beta_m[0] < 1.7, beta_m[0]
    fw, beta, ell, th = var.params_at(x, y, shape)
    h = 25
    dx, dy = x - np.rint(x), y - np.rint(y)
    truth = render_elliptical_moffat_stamps(
        dx, dy, h, fwhm_px=fw, beta=beta, ellipticity=ell, theta_rad=th
    )
    k = np.arange(-h, h + 1, dtype=float)
    r2 = (k[None, None, :] - dx[:, None, None]) ** 2 + (k[None, :, None] - dy[:, None, None]) ** 2
    frac_t = np.sum(truth * (r2 <= 16.0), (1, 2)) / truth.sum((1, 2))
    frac_m = m.aperture_fractions(x, y, {"r4": 4.0})["r4"]
    err = 2.5 * np.log10(frac_t / frac_m)
    assert np.max(np.abs(err)) < 0.07, err
    assert np.sqrt(np.mean(err**2)) < 0.04


def _few_star_field(seed, n_stars, fwhm_px, *, halo=0.0, psf_variation=None, size=768):
    """A 768^2 field of ``n_stars`` Moffat stars (mag 13-19, gain 1.5, sky 800 ADU) and its
    detections. With ``halo``, the stars are ``(1 - halo)`` of a Moffat (beta 3) plus ``halo`` of
    one 2.5x wider (beta 2), the same everywhere: a constant PSF outside the model's family (two
    noisy renderings mixed; the noise rms scales with ``sqrt((1-halo)^2 + halo^2)``)."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / 3600.0
    stars = Table(
        {
            "ra": 150.0 + rng.uniform(-size / 2 + 10, size / 2 - 10, n_stars) * scale,
            "dec": 2.2 + rng.uniform(-size / 2 + 10, size / 2 - 10, n_stars) * scale,
            "mag": rng.uniform(13.0, 19.0, n_stars),
        }
    )
    kw = dict(stars=stars, psf="moffat", n_cosmic_rays=0, n_hot_pixels=0)
    core = make_star_field(
        (size, size), fwhm_px=fwhm_px, beta=3.0, psf_variation=psf_variation, seed=seed, **kw
    )
    data = core.data.astype(np.float32) - 800.0
    rms = math.sqrt(800 / 1.5 + (8 / 1.5) ** 2)
    if halo:
        wide = make_star_field(
            (size, size), fwhm_px=2.5 * fwhm_px, beta=2.0, seed=seed + 1000, **kw
        )
        data = (1 - halo) * data + halo * (wide.data.astype(np.float32) - 800.0)
        rms *= math.sqrt((1 - halo) ** 2 + halo**2)
    return data, detect_sources(data, rms, fwhm_px=fwhm_px, peak_search=False), rms


def test_psf_order_of_few_stars_is_chosen_by_cross_validation_over_the_stars():
    """With fewer than 100 kept PSF stars, the order is the one that best predicts stars left
    out of the fit (5 folds, one-standard-error rule), not the pixel AIC: a misfit correlated
    within each star makes its pixels count as far more evidence than they are.

    A constant, undersampled PSF the model cannot follow exactly (FWHM 1.2 px with a 30 % halo,
    ~20-30 PSF stars): the pixel AIC took order 1 on each of these fields (chi^2 lower by 25-1100
    for 8 coefficients), cross-validation keeps the constant model. A PSF that really varies
    (FWHM +40 % and ellipticity 0.3 in the corners, ~50 PSF stars) still gets a varying model."""
    kw = dict(gain_e_per_adu=1.5, saturation_adu=59000)
    for seed in (0, 1, 4, 5):
        data, src, rms = _few_star_field(seed, 50, 1.2, halo=0.3)
        m = fit_field_psf(data, src, rms=rms, **kw)
        aic = fit_field_psf(data, src, rms=rms, cv_max_stars=0, **kw)
        assert 15 <= m.n_stars < 100 and m.stats["order_max_allowed"] >= 1
        assert aic.order >= 1 and aic.stats["order_choice"] == "aic", aic.stats
        assert m.order == 0 and m.stats["order_choice"] == "cv", m.stats
        tried = m.stats["orders_tried"]
        assert [t["order"] for t in tried] == [0, 1]
        assert all(t["cv_chi2"] > 0 and t["cv_se"] >= 0 for t in tried)
        # the pixel criterion prefers order 1, the held-out stars do not (within one s.e.)
        assert tried[1]["bic"] < tried[0]["bic"]
        assert tried[0]["cv_chi2"] - min(t["cv_chi2"] for t in tried) <= tried[0]["cv_se"]
    var = PsfVariation(
        fwhm_px=1.2, fwhm_corner_frac=0.4, ellipticity_corner=0.3, ellipticity_power=1.0,
        beta_centre=3.0, beta_corner=2.5,
    )  # fmt: skip
    for seed in (0, 3):
        data, src, rms = _few_star_field(seed, 120, 1.2, psf_variation=var)
        m = fit_field_psf(data, src, rms=rms, **kw)
        assert 40 <= m.n_stars < 100 and m.stats["order_choice"] == "cv", m.stats
        assert m.order >= 2, m.stats
        tried = {t["order"]: t for t in m.stats["orders_tried"]}
        # the constant model predicts the held-out stars far worse
        assert tried[0]["cv_chi2"] > 1.5 * tried[m.order]["cv_chi2"], tried
        fw = m.shape_at(np.array([384.0, 20.0]), np.array([384.0, 20.0]))["fwhm_px"]
        assert fw[1] > 1.2 * fw[0], fw


def test_fit_field_psf_keeps_its_brightest_stars_and_follows_the_truth_closer():
    """Outlier PSF stars (blends, cosmic rays) are rejected on the first model that can vary
    across the field, with a 2 % model-error floor, not on the constant model: there the
    brightest stars far from the centre stand out by the PSF's own variation (reduced chi^2
    3-10) and were dropped, leaving the shape to the fainter stars. On this field the code
    before kept 3 PSF stars above 10 000 ADU at the peak (now 16), and its model misjudged the
    PSF-fit flux of an S/N ~300 star by 4.1 x 10^-3 rms over the frame and the light outside a
    1.3 FWHM aperture by 3.5 x 10^-3 (now 2.4 and 1.9 x 10^-3)."""
    shape = (2048, 2048)
    field = make_optics_field(shape, seed=7, n_bright=0, n_cosmic_rays=0, n_hot_pixels=0)
    data = field.data.astype(np.float32) - np.asarray(field.truth["sky_adu"]).mean()
    sky = float(field.params["sky_adu"])
    rms = math.sqrt(sky / 0.8 + (6 / 0.8) ** 2)
    src = detect_sources(data, rms, fwhm_px=3.5, peak_search=False)
    m = fit_field_psf(data, src, rms=rms, gain_e_per_adu=0.8, saturation_adu=59000)
    assert m.order == 3 and m.n_stars >= 200
    assert m.stats["n_candidates"] >= m.n_stars
    # the bright PSF stars are in the fit
    used = np.array(m.stats["psf_star_xy"])
    tx, ty = np.asarray(field.truth["x"], float), np.asarray(field.truth["y"], float)
    d2 = (tx[None, :] - used[:, :1]) ** 2 + (ty[None, :] - used[:, 1:]) ** 2
    peak = np.asarray(field.truth["peak_adu"], float)[np.argmin(d2, axis=1)]
    assert np.sum(peak > 10_000) >= 10, np.sort(peak)[-10:]
    # the model against the true PSF on a grid over the frame
    g = np.linspace(40, 2007, 12)
    x, y = (v.ravel() + 0.3 for v in np.meshgrid(g, g))
    fw, beta, ell, th = PsfVariation().params_at(x, y, shape)
    h = 30
    dx, dy = x - np.rint(x), y - np.rint(y)
    truth = render_elliptical_moffat_stamps(
        dx, dy, h, fwhm_px=fw, beta=beta, ellipticity=ell, theta_rad=th
    )
    model = m.stamps(x, y, h)
    # PSF-fit flux of an S/N ~300 star (flux-only fit, its shot noise in the weights)
    c = slice(h - 8, h + 9)
    t_c, m_c = truth[:, c, c], model[:, c, c]
    w = 1.0 / (sky / 0.8 + 1e5 * t_c / 0.8)
    psf_ratio = np.sum(w * m_c * t_c, (1, 2)) / np.sum(w * m_c**2, (1, 2))
    # 1.3 FWHM aperture corrected to total by the model
    k = np.arange(-h, h + 1, dtype=float)
    r2 = (k[None, None, :] - dx[:, None, None]) ** 2 + (k[None, :, None] - dy[:, None, None]) ** 2
    ap = r2 <= (1.3 * fw[:, None, None]) ** 2
    frac_t = np.sum(truth * ap, (1, 2)) / truth.sum((1, 2))
    frac_m = np.sum(model * ap, (1, 2)) / model.sum((1, 2))
    assert np.std(psf_ratio) < 3.0e-3, np.std(psf_ratio)
    assert np.std(frac_t / frac_m) < 2.7e-3, np.std(frac_t / frac_m)


# ------------------------------------------------------------------------------ saturation


def test_saturated_star_with_bleed_trail_is_one_source():
    f = make_star_field(
        (512, 512),
        n_stars=60,
        psf="moffat",
        n_bright=1,
        bright_mag_range=(9.5, 9.5),
        bleed_trails=True,
        max_half_width_px=160,
        n_cosmic_rays=0,
        n_hot_pixels=0,
        seed=11,
    )
    assert f.bleed_mask.sum() > 50  # a long trail
    data = f.data.astype(np.float32) - 800.0
    mask = f.data >= 60000
    rms = math.sqrt(800 / 1.5 + (8 / 1.5) ** 2)
    sat, zone = find_saturated_stars(data, mask, saturation_adu=59200, rms=rms, fwhm_px=3.5)
    bright = f.truth[np.argmin(f.truth["mag"])]
    assert len(sat) == 1
    assert math.hypot(sat["x_centroid"][0] - bright["x"], sat["y_centroid"][0] - bright["y"]) < 1.5
    src = detect_sources(data, rms, fwhm_px=3.5, mask=mask, saturation_adu=59200, peak_search=False)
    is_sat = (np.asarray(src["flag"]) & FLAG_SATURATED) != 0
    assert is_sat.sum() == 1
    # nothing else on the trail or in the halo
    iy = np.clip(np.rint(src["y_centroid"]).astype(int), 0, 511)
    ix = np.clip(np.rint(src["x_centroid"]).astype(int), 0, 511)
    assert not zone[iy[~is_sat], ix[~is_sat]].any()


def _moffat_star(img, x, y, flux, fwhm=3.5, beta=3.0, half=15):
    from rpp_tasks.sim.synthetic import render_psf_stamps

    ix, iy = int(round(x)), int(round(y))
    st = render_psf_stamps([x - ix], [y - iy], half, psf="moffat", fwhm_px=fwhm, beta=beta)[0]
    img[iy - half : iy + half + 1, ix - half : ix + half + 1] += flux * st


def test_star_lying_across_a_bleed_trail_is_detected_and_a_bare_trail_is_not():
    rng = np.random.default_rng(7)
    ny, nx = 400, 300
    img = np.zeros((ny, nx))
    _moffat_star(img, 100.3, 300.6, 1.5e5)  # on the trail, 200 px from the saturated core
    _moffat_star(img, 220.0, 200.0, 2.0e4)  # an ordinary star
    img[95:106, 97:104] = 6e4  # saturated core
    img[20:380, 99:102] = 6e4  # its bleed trail along the columns
    rms = 20.0
    img += rng.normal(0.0, rms, img.shape)
    img = np.minimum(img, 6e4).astype(np.float32)
    mask = img >= 5.9e4
    src = detect_sources(img, rms, fwhm_px=3.5, mask=mask, saturation_adu=5.9e4, peak_search=False)
    x = np.asarray(src["x_centroid"], float)
    y = np.asarray(src["y_centroid"], float)
    is_sat = (np.asarray(src["flag"]) & FLAG_SATURATED) != 0
    assert is_sat.sum() == 1
    assert np.min(np.hypot(x - 100.3, y - 300.6)) < 1.5  # before: dropped as "on the trail"
    assert np.min(np.hypot(x - 220.0, y - 200.0)) < 0.5
    # the rest of the trail gives nothing
    on_trail = (np.abs(x - 100) < 5) & ~is_sat & (np.hypot(x - 100.3, y - 300.6) > 5)
    assert not on_trail.any(), list(zip(x[on_trail], y[on_trail]))


def _field_with_saturated_pairs(extra, seed=7):
    """A 768x768 optics field: its random stars fainter than mag 14.5 plus ``extra`` stars
    ``(x, y, flux_adu)``; no random pairs or bright stars."""
    from astropy.wcs import WCS

    base = make_optics_field((768, 768), seed=seed, n_close_pairs=0, n_bright=0)
    t = base.truth
    keep = np.asarray(t["mag"]) > 14.5
    xs = np.r_[np.asarray(t["x"])[keep], [e[0] for e in extra]]
    ys = np.r_[np.asarray(t["y"])[keep], [e[1] for e in extra]]
    mags = np.r_[np.asarray(t["mag"])[keep], [25.0 - 2.5 * math.log10(e[2] / 60.0) for e in extra]]
    ra, dec = WCS(base.header).all_pix2world(xs, ys, 0)
    stars = Table({"ra": ra, "dec": dec, "mag": mags})
    return make_optics_field((768, 768), seed=seed, stars=stars, n_close_pairs=0, n_bright=0)


def test_saturated_stars_beside_other_bright_stars_are_separate_sources(tmp_path):
    # Before (4096^2 optics bench): a saturated star with a companion 5 px away was one source
    # 1.7-2.9 px off (its wing fit pulled by the companion, flux 1.3-1.6x), or two saturated
    # sources both fitted to the middle; neither star matched. 8 of the 10 missed S/N > 500
    # stars of that frame.
    pairs = [
        ((200.3, 250.6, 1.8e6), (204.6, 252.4, 1.1e6)),  # both saturated, 4.7 px
        ((520.7, 180.2, 3.6e6), (524.4, 183.7, 4.7e5)),  # saturated + a 0.13 companion, 5.1 px
    ]
    lone = (600.2, 600.8, 2.0e6)
    # two mag-9 stars 16.5 px apart: bleed trails as wide as their saturated discs join them into
    # one saturated region, whose wing fit failed (before: one source 5 and 12 px from them)
    merged = [(300.4, 520.5, 1.2e8), (308.5, 534.9, 1.1e8)]
    f = _field_with_saturated_pairs([s for p in pairs for s in p] + [lone] + merged)
    s = pipeline.reduce_frame(_write(tmp_path / "f.fits", f), find_config("demo"), tmp_path / "o")
    assert s["status"] == "ok", s.get("reason")
    cat = Table.read(s["catalog"])
    t = f.truth
    m = match_to_truth(cat, t, radius_px=1.5)
    cat_of = dict(zip(m.truth_index, m.catalog_index))
    flag_psf = np.asarray(cat["flag_psf"])
    for x, y, _ in [st for p in pairs for st in p] + [lone]:
        i = int(np.argmin(np.hypot(t["x"] - x, t["y"] - y)))
        assert i in cat_of, f"star at ({x}, {y}) not found"
        j = cat_of[i]
        assert math.hypot(cat["x_centroid"][j] - t["x"][i], cat["y_centroid"][j] - t["y"][i]) < 0.5
        # a saturated star's flux comes from its far wings, which the field PSF model of 40 stars
        # knows to a few % (0.947-0.999 of the truth here): 8 %; the others 5 %
        tol = 0.08 if t["saturated"][i] else 0.05
        assert cat["flux_psf"][j] == pytest.approx(t["flux_adu"][i], rel=tol)
        if t["saturated"][i]:
            assert flag_psf[j] & 16
    # the companions are rows of their own, flagged, each a true star (here also a faint star
    # 9.4 px from the lone saturated one, inside its halo); nothing unmatched near the pairs
    comp = np.flatnonzero((flag_psf & 32) != 0)
    assert comp.size >= 2
    assert set(comp) <= set(m.catalog_index)
    un = m.unmatched_catalog
    ux, uy = np.asarray(cat["x_centroid"])[un], np.asarray(cat["y_centroid"])[un]
    for p in pairs:
        assert not np.any(np.hypot(ux - p[0][0], uy - p[0][1]) < 30.0)
    for x, y, _ in merged:
        i = int(np.argmin(np.hypot(t["x"] - x, t["y"] - y)))
        assert i in cat_of, f"star at ({x}, {y}) not found"
        j = cat_of[i]
        assert flag_psf[j] & 16 and cat["flag"][j] & FLAG_SATURATED
        assert math.hypot(cat["x_centroid"][j] - x, cat["y_centroid"][j] - y) < 0.5
        assert cat["flux_psf"][j] == pytest.approx(t["flux_adu"][i], rel=0.15)
    assert not np.any(np.hypot(ux - 304.5, uy - 527.7) < 60.0)


def test_companion_search_does_not_refind_a_star_detected_beside_the_fit_disc():
    """61-Mpx bench: a mag-15.3 star 22 px from a saturated one, detected but outside the wing fit,
    left the part of its light inside the disc on the fit's residual; the companion search took it
    for a second star (a duplicate 2.25 px from the detection)."""
    from rpp_tasks.stages.photometry import _find_companion

    k = np.arange(-30, 31)
    px, py = 100 + k[None, :] + 0 * k[:, None], 100 + k[:, None] + 0 * k[None, :]
    r2 = (px - 100.0) ** 2 + (py - 100.0) ** 2
    sel = (r2 > 6.0**2) & (r2 <= 20.0**2)  # the fit disc around a saturated core at (100, 100)
    star = 5000.0 * np.exp(-((px - 121.0) ** 2 + (py - 100.5) ** 2) / (2 * 1.5**2))
    fit = dict(
        sel=sel, d=10.0 + star, model=np.zeros(px.shape), bk=10.0, var=np.full(px.shape, 25.0),
        px=px, py=py,
    )  # fmt: skip
    comps = [{"x": 100.0, "y": 100.0, "kind": "sat", "r_sat": 5.0}]
    found = _find_companion(fit, comps, 3.6)
    assert found is not None and 118.0 < found["x"] <= 120.0  # the light inside the disc
    detected = (np.array([121.0, 300.0]), np.array([100.5, 40.0]))
    assert _find_companion(fit, comps, 3.6, others=detected) is None
    # a star that no detection accounts for is still found
    far = (np.array([300.0]), np.array([40.0]))
    assert _find_companion(fit, comps, 3.6, others=far) == found


# ------------------------------------------------------------------------------ repeatability


def _session_catalogs(tmp_path, n_frames=3, err_scale=1.0):
    from rpp_tasks.sim.synthetic import _draw_magnitudes  # noqa: F401  (documents the LF)

    rng = np.random.default_rng(8)
    stars = Table(
        {
            "ra": 150.0 + rng.uniform(-0.13, 0.13, 500),
            "dec": 2.2 + rng.uniform(-0.13, 0.13, 500),
            "mag": rng.uniform(14.0, 21.0, 500),
        }
    )
    cats = []
    for k in range(n_frames):
        f = make_star_field(
            (1024, 1024),
            stars=stars,
            psf="moffat",
            wcs_center_deg=(150.0 + 2e-4 * k, 2.2 - 1e-4 * k),
            seed=100 + k,
        )
        s = pipeline.reduce_frame(
            _write(tmp_path / f"f{k}.fits", f), find_config("demo"), tmp_path / f"o{k}"
        )
        c = Table.read(s["catalog"])
        c["mag_err_psf"] = np.asarray(c["mag_err_psf"]) * err_scale
        cats.append(c)
    return cats


def test_repeatability_of_a_synthetic_session(tmp_path):
    cats = _session_catalogs(tmp_path)
    r = repeatability(cats, kind="psf")
    assert r.n_frames == 3 and r.n_stars > 150
    assert 0.85 <= r.ratio <= 1.15, r
    assert "matched_on_sky" in r.flags
    assert all(abs(o) < 0.01 for o in r.frame_offsets_mag)
    for b in r.bins:
        if b["n_stars"] >= 20:
            assert 0.8 <= b["ratio"] <= 1.25, b
    # errors reported half as large as they are: the figure says so
    for c in cats:
        c["mag_err_psf"] = np.asarray(c["mag_err_psf"]) * 0.5
    assert repeatability(cats, kind="psf").ratio == pytest.approx(2.0 * r.ratio, rel=0.1)
    # on pixel positions (no WCS) the dithers are found
    for c in cats:
        c["ra"] = np.nan
    r2 = repeatability(cats, kind="psf")
    assert "matched_on_pixels" in r2.flags and r2.n_stars >= 0.9 * r.n_stars
    d = r.to_dict()
    assert d["bins"] and "definition" in d


_UNDERSAMPLED_YAML = """observatory: {name}
title: Undersampled synthetic camera (Seestar-like after the 2x2 binning)
site: {{name: Demo site, latitude_deg: 43.75, longitude_deg: 6.92, elevation_m: 1270}}
camera: {{name: SYNTH-CMOS, telescope: Synth 50 mm, gain_e_per_adu: {gain}, read_noise_e: 3.0,
          saturation_adu: 65500, pixel_scale_arcsec: 4.78, binning: [1, 1]}}
filters: {{aliases: {{V: V}}, default_band: V}}
stages:
  cosmics: {{enabled: false}}
  detection: {{fwhm_guess_px: 2.5}}
  photometry: {{fixed_radius_px: 5.0}}
"""


def undersampled_frames(folder, n_frames):
    """``n_frames`` 540 x 960 frames like the Seestar M 94 subs after the 2x2 binning (FWHM
    ~1.1-1.4 px, Moffat beta 1.8-2.2, ellipticity ~0.25, sky 3600 ADU, gain 0.13 e-/ADU, read
    noise 3 e-, 110 stars), shifted by (0.86, -0.5) px from frame to frame, without a gain in
    their headers (it comes from the configuration); written in ``folder``, paths returned (also
    used by ``bench/cv_psf_order.py --synthetic``)."""
    rng = np.random.default_rng(8)
    scale = 4.78 / 3600.0
    stars = Table(
        {
            "ra": 150.0 + rng.uniform(-270, 270, 110) * scale,
            "dec": 2.2 + rng.uniform(-480, 480, 110) * scale,
            "mag": rng.uniform(15.0, 19.5, 110),
        }
    )
    var = PsfVariation(
        fwhm_px=1.1, fwhm_corner_frac=0.3, beta_centre=2.2, beta_corner=1.8,
        ellipticity_corner=0.25, ellipticity_power=0.5, angle_twist_deg=20.0,
    )  # fmt: skip
    paths = []
    for k in range(n_frames):
        f = make_star_field(
            (960, 540), stars=stars, psf="moffat", fwhm_px=1.1, psf_variation=var,
            sky_adu=3600.0, gain_e_per_adu=0.13, read_noise_e=3.0, exptime_s=10.0,
            pixel_scale_arcsec=4.78, n_cosmic_rays=0, n_hot_pixels=0,
            wcs_center_deg=(150.0 + 0.86 * k * scale, 2.2 - 0.5 * k * scale), seed=100 + k,
        )  # fmt: skip
        for key in ("GAIN", "EGAIN"):  # the gain comes from the configuration
            f.header.remove(key, ignore_missing=True)
        paths.append(_write(Path(folder) / f"u{k}.fits", f))
    return paths


def test_repeatability_of_an_undersampled_session_and_of_a_wrong_gain(tmp_path):
    """Four 540 x 960 frames like the Seestar M 94 subs after the 2x2 binning (FWHM ~1.1-1.4 px,
    Moffat beta 1.8-2.2, ellipticity ~0.25, sky 3600 ADU, gain 0.13 e-/ADU, 110 stars), shifted
    by (0.86, -0.5) px from frame to frame: with the right gain the errors are honest on these
    undersampled stars (pixel phase included). Configured with a gain 7.7x too large -- what the
    ``seestar_s50`` configuration's 1.0 e-/ADU is for the real subs, whose sky noise (166 ADU
    rms on 3629 ADU) bounds the gain at 0.13 -- the PSF errors came out ~20 % too small
    (ratio 1.21, bench/README.md, seestar12); the chain now replaces that gain by the bound of
    the sky noise (`rpp_tasks.session.adapters.check_gain`), within 10 % of the truth, and the
    errors are as honest as with the right gain, which is kept as configured."""
    paths = undersampled_frames(tmp_path, 4)
    ratios, gains = {}, {}
    for name, gain in (("right_gain", 0.13), ("gain_too_large", 1.0)):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(_UNDERSAMPLED_YAML.format(name=name, gain=gain))
        obs = find_config(str(cfg))
        cats, gains[name] = [], []
        for k, p in enumerate(paths):
            s = pipeline.reduce_frame(p, obs, tmp_path / f"{name}_{k}")
            assert s["status"] == "ok", s["reason"]
            cats.append(Table.read(s["catalog"]))
            gains[name].append(s["gain"])
        ratios[name] = {kind: repeatability(cats, kind=kind) for kind in ("psf", "1p3fwhm")}
    right, wrong = ratios["right_gain"], ratios["gain_too_large"]
    assert right["psf"].n_stars >= 80
    assert 0.85 <= right["psf"].ratio <= 1.12, right["psf"]
    assert 0.8 <= right["1p3fwhm"].ratio <= 1.12, right["1p3fwhm"]
    for g in gains["right_gain"]:  # consistent with the sky noise: kept
        assert g["source"] == "configured" and g["used_e_per_adu"] == 0.13, g
        assert g["bound_e_per_adu"] == pytest.approx(0.13, rel=0.1) and g["sky_dominated"]
    for g in gains["gain_too_large"]:  # 1.0 > 1.5 x the bound: the bound is used
        assert g["source"] == "sky noise bound" and g["configured_e_per_adu"] == 1.0, g
        assert g["used_e_per_adu"] == pytest.approx(0.13, rel=0.1), g
        assert g["noise_ratio"] > 2.5
    # with the configured 1.0 the stars' photon noise was left out of their errors (ratio 1.21)
    assert 0.85 <= wrong["psf"].ratio <= 1.12, wrong["psf"]
    assert wrong["psf"].ratio == pytest.approx(right["psf"].ratio, abs=0.05)


def test_repeatability_of_the_real_seestar_m94_pair(real_data, tmp_path):
    """Two consecutive 10 s Seestar S50 subs of M 94 (11 s apart): the stars' frame-to-frame
    scatter against their reported errors (bench/README.md quotes the figure)."""
    obs = find_config("seestar_s50")
    cats = []
    for stamp in ("212046", "212057"):
        path = real_data / "seestar_s50" / f"Light_M94_10.0s_IRCUT_20250326-{stamp}.fit"
        s = pipeline.reduce_frame(path, obs, tmp_path / stamp)
        assert s["status"] == "ok", s["reason"]
        cats.append(Table.read(s["catalog"]))
    for kind in ("psf", "1p3fwhm"):
        r = repeatability(cats, kind=kind)
        assert r.n_frames == 2 and r.n_stars >= 25
        # a finite, sensible figure: undersampled (FWHM ~1.2 px after the 2x2 Bayer binning)
        # real stars scatter somewhat more than their errors say
        assert 0.7 < r.ratio < 2.5, r
        assert abs(r.frame_offsets_mag[1]) < 0.2


def test_robust_std_of_repeatability_deviations_is_unit_for_pure_noise():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(5000)
    assert robust_std(x) == pytest.approx(1.0, rel=0.03)


def test_repeatability_matches_on_the_sky_within_a_radius_in_pixels():
    """Frames with a WCS are matched on the sky within ``match_radius_px`` times the pixel scale
    their positions imply: at 4.78"/px (a binned Seestar frame) with 0.25 px of position noise
    every star is found, where a fixed 1.5" (0.31 px) lost a third of them (real M 94 pair: 43
    stars of 62); the same at 1"/px."""
    rng = np.random.default_rng(4)
    n = 120
    x0, y0 = rng.uniform(20, 520, n), rng.uniform(20, 940, n)
    mag = rng.uniform(12.0, 17.0, n)
    for scale in (4.78, 1.0):
        cats = []
        for k in range(2):
            x = x0 + 0.86 * k + rng.normal(0, 0.25, n)
            y = y0 - 0.5 * k + rng.normal(0, 0.25, n)
            # sky positions of the frame's own pixel positions through its (shifted) WCS
            xs, ys = x0 + rng.normal(0, 0.25, n), y0 + rng.normal(0, 0.25, n)
            dec = 41.0 + ys * scale / 3600.0
            ra = 193.0 + xs * scale / 3600.0 / math.cos(math.radians(41.0))
            err = np.full(n, 0.02)
            cats.append(
                Table(
                    {
                        "x_centroid": x, "y_centroid": y, "ra": ra, "dec": dec,
                        "mag_psf": mag + rng.normal(0, 0.02, n), "mag_err_psf": err,
                    }
                )
            )  # fmt: skip
        r = repeatability(cats, kind="psf")
        assert "matched_on_sky" in r.flags
        assert r.n_stars >= n - 2, (scale, r.n_stars)
        assert 0.85 < r.ratio < 1.15, r


# ------------------------------------------------------------------------------ mismatch term


def _mismatch_draw(rng, n, eta, *, outlier=False):
    """``n`` references as `measure_model_mismatch` sees them: fluxes 5e4-2e6 ADU, noise of the
    difference 0.2-4 % of the flux, a true relative mismatch ``eta`` and a common offset (ADU)."""
    flux = 10 ** rng.uniform(4.7, 6.3, n)
    sig = flux * 10 ** rng.uniform(-2.7, -1.4, n)
    d = 300.0 + rng.normal(0.0, np.sqrt(sig**2 + (eta * flux) ** 2))
    if outlier:
        d[0] = 0.6 * flux[0]  # a reference whose large-aperture flux is broken
    return d, sig**2, flux


def test_mismatch_term_is_honest_with_few_references_and_one_outlier():
    from rpp_tasks.stages.flux_calibration import _ml_mismatch

    rng = np.random.default_rng(11)
    eta_true = 0.03
    # eight references, as on a small undersampled frame (the Seestar pair): over many draws the
    # estimated variance is the true one on average (the maximum likelihood with the offset
    # fitted to the same stars sits ~30 % low in eta^2)
    est = np.array([_ml_mismatch(*_mismatch_draw(rng, 8, eta_true))[0] for _ in range(300)])
    assert np.mean(est**2) == pytest.approx(eta_true**2, rel=0.25)
    # one broken reference among nine does not set the figure (it is rejected)
    bad = [_ml_mismatch(*_mismatch_draw(rng, 9, eta_true, outlier=True)) for _ in range(100)]
    assert not any(kept[0] for _, _, kept in bad)
    assert np.mean([n >= 7 for _, n, _ in bad]) > 0.9
    assert np.nanmedian([e for e, _, _ in bad]) < 1.5 * eta_true
    # many references: the figure is the truth; no mismatch: a small one
    e_many, n_many, _ = _ml_mismatch(*_mismatch_draw(rng, 400, eta_true))
    assert n_many >= 395 and e_many == pytest.approx(eta_true, rel=0.1)
    e_none = np.median([_ml_mismatch(*_mismatch_draw(rng, 400, 0.0))[0] for _ in range(20)])
    assert e_none < 0.002
    # fewer than five usable references: not measured
    d, v, f = _mismatch_draw(rng, 6, eta_true)
    assert math.isnan(_ml_mismatch(d, v, f, exclude=np.arange(6) < 2)[0])


def test_fit_field_psf_flags_a_fwhm_at_the_model_floor(caplog):
    """qa12: the real PANOPTES frames (10"/px DSLR) and the block-averaged Feder thumbnail came
    out at FWHM 0.500 px, the model's floor, reported as a measured seeing. Stars of FWHM 0.3 px
    (all their light in ~1 pixel) reach the floor: flag ``fwhm_at_floor`` and a warning; stars of
    FWHM 1.1 px do not."""
    import logging

    out = {}
    for fw in (0.3, 1.1):
        f = make_star_field(
            (400, 400), n_stars=60, psf="gaussian", fwhm_px=fw, sky_adu=1000.0,
            gain_e_per_adu=1.5, read_noise_e=5.0, exptime_s=30.0, mag_range=(15.5, 18.0),
            mag_slope=0.0, n_cosmic_rays=0, n_hot_pixels=0, seed=4,
        )  # fmt: skip
        data, rms, src = _sky_subtracted_sources(f, fwhm_guess_px=1.5)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rpp_tasks.stages.field_psf_fit"):
            out[fw] = fit_field_psf(data, src, rms=rms, gain_e_per_adu=1.5, saturation_adu=60000)
        out[fw, "warned"] = any("lower limit" in r.getMessage() for r in caplog.records)
    assert out[0.3].fwhm_px == pytest.approx(0.5, abs=0.01)
    assert "fwhm_at_floor" in out[0.3].flags and out[0.3, "warned"]
    assert out[0.3].to_dict()["flags"][-1] == "fwhm_at_floor"
    assert out[1.1].fwhm_px == pytest.approx(1.1, rel=0.05)
    assert "fwhm_at_floor" not in out[1.1].flags and not out[1.1, "warned"]
