"""The faster code paths of issue 11's CPU work give the same numbers as the plain ones.

Each check compares a fast path with the straightforward computation it replaces (kept here as the
reference), bit for bit: the ECSV writer, the sparse 3x3 dilation of the cosmic-ray candidates,
the vectorised in-painting of masked rows, and `FieldPSF.stamps` evaluated on selected pixels.
"""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
from astropy.table import MaskedColumn, Table
from scipy import ndimage

from rpp_tasks.session.ecsv_fast import write_ecsv
from rpp_tasks.stages.cosmics import _square_dilation
from rpp_tasks.stages.field_psf import FieldPSF
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
