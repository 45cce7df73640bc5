"""Differential photometry: the ensemble solution recovers known frame zero points with honest
errors, rejects variable stars and outliers night by night, and says why when a night has no
comparison stars."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from rpp_tasks.stages.differential import (
    comparison_candidates,
    differential_ensemble,
    solve_ensemble,
)


def _night(seed=0, n_star=30, n_frame=40, *, variable=None, missing=0.0):
    """Stars with catalogue magnitudes, frames with zero points; instrumental = ref - Z + noise."""
    rng = np.random.default_rng(seed)
    ref = rng.uniform(12.0, 17.0, n_star)
    offset = rng.normal(0, 0.03, n_star)  # colour terms: each star off its catalogue value
    z_true = 22.0 + rng.normal(0, 0.2, n_frame)  # transparency and airmass
    err = 0.002 * 10 ** (0.2 * (ref - 12.0))[:, None] * np.ones(n_frame)
    mag = (ref + offset)[:, None] - z_true[None, :] + rng.normal(0, 1, (n_star, n_frame)) * err
    if variable is not None:
        i, amp = variable
        mag[i] += amp * np.sin(np.linspace(0, 6 * np.pi, n_frame))
    if missing:
        drop = rng.uniform(0, 1, mag.shape) < missing
        mag[drop] = np.nan
    return mag, err, ref, offset, z_true


def test_solution_recovers_frame_zero_points_with_honest_errors():
    pulls = []
    for seed in range(20):
        mag, err, ref, offset, z_true = _night(seed, missing=0.1)
        sol = solve_ensemble(mag, err, ref)
        assert sol.used.all() and not sol.rejected
        # Z is defined up to the night's tie to the catalogue: compare frame-to-frame
        dz = (sol.Z - z_true) - np.mean(sol.Z - z_true)
        pulls.append(dz / sol.Z_err)
        # the tie to the catalogue is good to its stated error (mean colour offset of the stars)
        assert abs(np.mean(sol.Z - z_true) - (-np.mean(offset))) < 4 * sol.anchor_err_mag
    pulls = np.concatenate(pulls)
    assert 0.85 < np.std(pulls) < 1.15, np.std(pulls)


def test_scatter_beyond_the_errors_is_measured_as_a_floor():
    """Flat-field residuals of 6 mmag the photometric errors do not include: the night's stars
    show it, it is estimated and carried in the errors (frame zero points and targets)."""
    floors, pulls = [], []
    for seed in range(10):
        mag, err, ref, _, z_true = _night(seed)
        rng = np.random.default_rng(100 + seed)
        mag = mag + rng.normal(0, 0.006, mag.shape)
        sol = solve_ensemble(mag, err, ref)
        floors.append(sol.floor_mag)
        dz = (sol.Z - z_true) - np.mean(sol.Z - z_true)
        pulls.append(dz / sol.Z_err)
    assert np.median(floors) == pytest.approx(0.006, rel=0.15)
    assert 0.85 < np.std(np.concatenate(pulls)) < 1.15


def test_a_variable_star_and_single_outliers_are_rejected():
    mag, err, ref, _, z_true = _night(3, variable=(5, 0.1))
    mag[7, 11] += 0.5  # a cosmic ray on one measurement of a constant star
    sol = solve_ensemble(mag, err, ref)
    assert not sol.used[5] and "variable" in sol.rejected[5]
    assert sol.used.sum() == 29
    assert not sol.point_used[7, 11] and sol.point_used[7].sum() == 39
    dz = (sol.Z - z_true) - np.mean(sol.Z - z_true)
    assert np.max(np.abs(dz)) < 5 * np.max(sol.Z_err)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        solve_ensemble(np.zeros((3, 4)), np.zeros((3, 5)), np.zeros(3))


# ----------------------------------------------------------------------------- catalogues
def _frames(n_frame=6, n_star=25, seed=1, *, snr=200.0):
    rng = np.random.default_rng(seed)
    ra = 150.0 + rng.uniform(-0.05, 0.05, n_star)
    dec = 2.0 + rng.uniform(-0.05, 0.05, n_star)
    ref = rng.uniform(12.0, 16.0, n_star)
    z = 21.5 + rng.normal(0, 0.1, n_frame)
    cats = []
    for f in range(n_frame):
        m = ref - z[f] + rng.normal(0, 0.003, n_star)
        cats.append(
            Table(
                {
                    "ra": ra + rng.normal(0, 1e-5, n_star),
                    "dec": dec + rng.normal(0, 1e-5, n_star),
                    "ref_mag": ref,
                    "mag_psf": m,
                    "mag_err_psf": np.full(n_star, 0.003),
                    "snr_psf": np.full(n_star, snr),
                    "saturated": np.zeros(n_star, bool),
                    "blended": np.zeros(n_star, bool),
                    "near_edge": np.zeros(n_star, bool),
                    "flag": np.zeros(n_star, int),
                    "vsx_name": np.asarray(["V1 Her" if i == 2 else "" for i in range(n_star)]),
                }
            )
        )
    return cats, z, ra, dec


def test_candidates_exclude_vsx_saturated_and_the_target_surroundings():
    cats, _, ra, dec = _frames()
    cat = cats[0]
    cat["saturated"][0] = True
    mask, counts = comparison_candidates(
        cat, phot_type="psf", exclude=[(ra[1], dec[1])], exclude_radius_arcsec=5.0
    )
    assert not mask[0] and not mask[1] and not mask[2]
    assert counts["saturated"] == 1 and counts["vsx_variable"] == 1 and counts["near_a_target"] == 1
    assert mask.sum() == 22


def test_night_ensemble_gives_relative_zero_points():
    cats, z, _, _ = _frames()
    res = differential_ensemble(cats, [f"f{i}" for i in range(6)], phot_type="psf")
    assert res.status == "ok" and res.n_comp.min() >= 20
    dz = (res.zp_rel - z) - np.mean(res.zp_rel - z)
    assert np.max(np.abs(dz)) < 0.003
    d = res.to_dict()
    assert d["n_used"] == 24 and set(d["frames"]) == {f"f{i}" for i in range(6)}


def test_a_night_without_comparison_stars_is_recorded_with_the_reason():
    cats, _, _, _ = _frames(snr=8.0)  # every star too faint for a comparison star
    res = differential_ensemble(cats, [f"f{i}" for i in range(6)], phot_type="psf", min_snr=30.0)
    assert res.status == "failed" and np.isnan(res.zp_rel).all()
    assert "no comparison stars" in res.reason and "low_snr" in res.reason
    assert res.to_dict()["status"] == "failed"
    empty = differential_ensemble([], [], phot_type="psf")
    assert empty.status == "failed"
