"""The faster code paths of issue 11's CPU work give the same numbers as the plain ones.

Each check compares a fast path with the straightforward computation it replaces (kept here as the
reference), bit for bit: the ECSV writer, the sparse 3x3 dilation of the cosmic-ray candidates,
the vectorised in-painting of masked rows, `FieldPSF.stamps` evaluated on selected pixels, and
the field-PSF fit's reuse of the accepted trial step's model.
"""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
from astropy.table import MaskedColumn, Table
from scipy import ndimage

from rpp_tasks.session.ecsv_fast import write_ecsv
from rpp_tasks.stages import field_psf_fit
from rpp_tasks.stages.cosmics import _square_dilation
from rpp_tasks.stages.field_psf import FieldPSF, _poly_basis
from rpp_tasks.stages.field_psf_fit import _field_model
from rpp_tasks.stages.saturation import _inpaint_rows


def test_write_ecsv_gives_astropys_bytes(tmp_path):
    rng = np.random.default_rng(11)
    n = 3000
    vals = 10.0 ** rng.uniform(-320, 308, n) * rng.choice([-1, 1], n)
    vals[:12] = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e16, 1e-4, 1e-5, 0.1, 5e-324, 2.0**53, 1e308]
    t = Table(
        {
            "f8": vals,
            "i8": rng.integers(-(2**62), 2**62, n),
            "u1": rng.integers(0, 255, n).astype(np.uint8),
            "b": rng.random(n) < 0.5,
            "f4": vals.astype(np.float32),
            "s": np.array(["a b", 'x"y', ""] * (n // 3)),
            "m8": MaskedColumn(rng.normal(size=n), mask=rng.random(n) < 0.3),
            "mi": MaskedColumn(rng.integers(0, 9, n), mask=rng.random(n) < 0.3),
            "v": rng.normal(size=(n, 2)),
        },
        meta={"k": 1.5, "name": "x"},
    )
    t["f8"].unit = "adu"
    t.write(tmp_path / "ref.ecsv", format="ascii.ecsv", overwrite=True)
    write_ecsv(t, tmp_path / "fast.ecsv")
    assert filecmp.cmp(tmp_path / "ref.ecsv", tmp_path / "fast.ecsv", shallow=False)
    back = Table.read(tmp_path / "fast.ecsv")
    assert np.array_equal(np.asarray(back["f8"]), vals, equal_nan=True)


@pytest.mark.parametrize("grow", [1, 2, 3])
def test_square_dilation_is_scipys(grow):
    rng = np.random.default_rng(grow)
    for frac in (0.0, 0.001, 0.02, 0.3):
        seeds = rng.random((97, 131)) < frac
        seeds[0, 0] = seeds[-1, -1] = seeds[0, -1] = True
        ref = ndimage.binary_dilation(seeds, structure=np.ones((3, 3), bool), iterations=grow)
        assert np.array_equal(_square_dilation(seeds, grow), ref)


def _inpaint_rows_loop(work, bad_y, bad_x, max_gap=8):
    """The row-by-row loop `_inpaint_rows` replaced (reference)."""
    nx = work.shape[1]
    is_bad = np.zeros(work.shape, bool)
    is_bad[bad_y, bad_x] = True
    for y in np.unique(bad_y):
        xs = np.flatnonzero(is_bad[y])
        starts = xs[np.r_[True, np.diff(xs) > 1]]
        stops = xs[np.r_[np.diff(xs) > 1, True]]
        for a, b in zip(starts, stops):
            left, right = a - 1, b + 1
            if b - a + 1 > max_gap or left < 0 or right >= nx:
                work[y, a : b + 1] = 0.0
                continue
            vl, vr = work[y, left], work[y, right]
            t = (np.arange(a, b + 1) - left) / (right - left)
            work[y, a : b + 1] = vl + t * (vr - vl)


@pytest.mark.parametrize("frac", [0.01, 0.2, 0.7])
def test_inpaint_rows_matches_the_loop(frac):
    rng = np.random.default_rng(int(frac * 100))
    work = rng.normal(100, 10, (120, 90)).astype(np.float32)
    bad = rng.random(work.shape) < frac
    bad[:, [0, 45, 46, 89]] = True  # runs on the edges and across rows
    by, bx = np.nonzero(bad)
    perm = rng.permutation(by.size)
    for gap in (1, 3, 8):
        a, b = work.copy(), work.copy()
        _inpaint_rows_loop(a, by[perm], bx[perm], max_gap=gap)
        _inpaint_rows(b, by[perm], bx[perm], max_gap=gap)
        assert np.array_equal(a, b)


def test_stamps_on_selected_pixels_are_the_full_stamps_there():
    coeffs = np.zeros((4, 10))
    coeffs[0, :3] = [3.6, 0.2, 0.2]
    coeffs[1, 0], coeffs[2, 3], coeffs[3, 0], coeffs[3, 2] = 0.05, 0.04, 0.33, 0.03
    model = FieldPSF(
        coeffs=coeffs,
        order=3,
        norm=(1024, 1024, 1024, 1024),
        shape=(2048, 2048),
        n_stars=1,
        size_px=15,
    )
    rng = np.random.default_rng(5)
    x, y = rng.uniform(0, 2047, 40), rng.uniform(0, 2047, 40)
    for half in (2, 7, 16):
        where = rng.random((2 * half + 1, 2 * half + 1)) < 0.5
        for deriv in (False, True):
            full = model.stamps(x, y, half, derivatives=deriv)
            part = model.stamps(x, y, half, derivatives=deriv, where=where)
            for f, p in zip(full if deriv else (full,), part if deriv else (part,)):
                assert np.array_equal(f[:, where], p[:, where])
                assert not np.any(p[:, ~where])


def _psf_star_stamps(seed, n=60, half=7):
    """Noisy stamps of ``n`` stars of a PSF varying linearly across a 2048² field (for
    `_gn_field`), with the pixel offsets, noise, mask and polynomial basis of order 1."""
    rng = np.random.default_rng(seed)
    norm = (1023.5, 1023.5, 1024.0, 1024.0)
    x, y = rng.uniform(0, 2047, n), rng.uniform(0, 2047, n)
    bas = _poly_basis(x, y, 1, norm)
    theta = np.array([[3.5, 0.3, -0.2], [0.04, 0.02, 0.0], [0.0, 0.0, 0.03], [0.32, 0.0, 0.0]])
    k = np.arange(-half, half + 1, dtype=float)
    off_x, off_y = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
    dx0 = off_x[:, None, None] + k[None, None, :] + 0.0 * k[None, :, None]
    dy0 = off_y[:, None, None] + k[None, :, None] + 0.0 * k[None, None, :]
    flux = 10.0 ** rng.uniform(3.5, 5.0, n)
    truth = flux[:, None, None] * _field_model(dx0, dy0, np.zeros(n), np.zeros(n), bas, theta)
    var_bkg = np.full(truth.shape, 25.0)
    stamps = truth + rng.normal(size=truth.shape) * np.sqrt(var_bkg + truth)
    return stamps, var_bkg, np.ones(truth.shape), dx0, dy0, bas, theta, flux


def test_field_model_values_are_the_same_with_and_without_derivatives():
    # `_gn_field` keeps the values of a trial step evaluated with its derivatives as the model
    # of the accepted state: they must be those of the plain evaluation, bit for bit
    stamps, _, _, dx0, dy0, bas, theta, _ = _psf_star_stamps(3)
    rng = np.random.default_rng(4)
    sx, sy = rng.normal(0, 0.1, len(stamps)), rng.normal(0, 0.1, len(stamps))
    for half in (2, 7):
        c = slice(7 - half, 7 + half + 1)
        args = (dx0[:, c, c], dy0[:, c, c], sx, sy, bas, theta)
        val, d = _field_model(*args, derivs=True)
        assert np.array_equal(val, _field_model(*args))
        assert {"x", "y", "fwhm_px", "e1", "e2", "u"} <= set(d)


def test_gn_field_final_chi2_is_that_of_the_model_at_its_solution(monkeypatch):
    stamps, var_bkg, good, dx0, dy0, bas, theta_true, flux = _psf_star_stamps(7)
    n = len(stamps)
    theta0 = np.zeros_like(theta_true)
    theta0[:, 0] = [3.2, 0.0, 0.0, 0.3]
    state = {"f": flux * 0.9, "b": np.zeros(n), "sx": np.zeros(n), "sy": np.zeros(n)}
    calls = []

    def counted(*args, **kwargs):
        calls.append(bool(kwargs.get("derivs")))
        return _field_model(*args, **kwargs)

    monkeypatch.setattr(field_psf_fit, "_field_model", counted)
    theta, chi2_star, dof = field_psf_fit._gn_field(
        stamps,
        var_bkg,
        good,
        dx0,
        dy0,
        bas,
        theta0.copy(),
        state,
        gain=1.0,
        free=np.ones(4, bool),
        n_iter=25,
    )
    # converged close to the truth
    assert np.allclose(theta[:, 0], theta_true[:, 0], atol=0.05)
    assert 3 <= state["iterations"] < 25
    # one evaluation (with derivatives) per iteration and one at the start; retried steps add
    # plain ones; none at the end
    assert sum(calls) == state["iterations"] + 1
    assert len(calls) - sum(calls) <= 7 * state["iterations"]
    # the final chi^2 uses the kept model: the same as a fresh evaluation at the solution
    star = state["f"][:, None, None] * _field_model(dx0, dy0, state["sx"], state["sy"], bas, theta)
    w = good / (var_bkg + np.maximum(star, 0.0))
    r = stamps - star - state["b"][:, None, None]
    assert np.array_equal(chi2_star, np.sum(r * r * w, axis=(1, 2)))
    assert np.all(dof == 15 * 15 - 4)
    assert 0.8 < np.sum(chi2_star) / np.sum(dof) < 1.2


def test_field_model_on_row_and_column_offsets_is_the_full_stamps():
    # fit_field_psf passes the offsets as (N, 1, S) and (N, S, 1): the same numbers as (N, S, S)
    _, _, _, dx0, dy0, bas, theta, _ = _psf_star_stamps(5)
    rng = np.random.default_rng(6)
    sx, sy = rng.normal(0, 0.2, len(dx0)), rng.normal(0, 0.2, len(dx0))
    for half in (2, 5, 7):
        c = slice(7 - half, 7 + half + 1)
        full = (dx0[:, c, c], dy0[:, c, c])
        rows = (dx0[:, :1, c], dy0[:, c, :1])
        for derivs in (False, True):
            a = _field_model(*full, sx, sy, bas, theta, derivs=derivs)
            b = _field_model(*rows, sx, sy, bas, theta, derivs=derivs)
            if derivs:
                assert a[1].keys() == b[1].keys()
                assert all(np.array_equal(a[1][k], b[1][k]) for k in a[1])
                a, b = a[0], b[0]
            assert a.shape == b.shape == (len(dx0), 2 * half + 1, 2 * half + 1)
            assert np.array_equal(a, b)
