"""Saturation survives the Bayer 2x2 sum (issue 12).

A star whose green pixels saturate while its red and blue ones do not sums to less than 4x the
native level, and was not flagged saturated."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy.spatial import cKDTree

from rpp_tasks.config import config_from_dict
from rpp_tasks.inputs.bayer import (
    debayer_to_luminance,
    lift_saturated_superpixels,
    superpixel_max,
)
from rpp_tasks.inputs.reader import read_frame
from rpp_tasks.session import pipeline
from rpp_tasks.stages.calibration import calibrate_image

NATIVE_SAT = 16000.0
CFA = {(0, 0): 0.55, (0, 1): 1.0, (1, 0): 1.0, (1, 1): 0.45}  # RGGB response


def test_superpixel_max_and_lift():
    raw = np.array([[100, 16000, 5, 6], [9000, 7000, 7, 8]], dtype=np.uint16)
    np.testing.assert_array_equal(superpixel_max(raw), [[16000, 8]])
    lum = debayer_to_luminance(raw, "RGGB")
    assert lum[0, 0] == 32100.0  # below 4 x 16000: the sum alone hides the saturation
    assert lift_saturated_superpixels(lum, raw, NATIVE_SAT) == 1
    np.testing.assert_array_equal(lum, [[64000.0, 26.0]])


def test_calibrated_saturated_pixels_stay_at_the_level():
    raw = np.full((4, 4), 1000.0, np.float32)
    raw[0, 0] = 4095.0
    cal = calibrate_image(raw, exptime_s=1.0, bias=np.full((4, 4), 100.0), saturation_adu=4095.0)
    assert cal.mask[0, 0] and cal.image[0, 0] == 4095.0  # not 3995: still saturated downstream
    assert cal.image[1, 1] == 900.0


def _bayer_field(tmp_path):
    from rpp_tasks.sim.synthetic import make_star_field

    field = make_star_field(
        (384, 384),
        n_stars=120,
        fwhm_px=5.0,
        sky_adu=400.0,
        saturation_adu=1e12,
        mag_range=(9.0, 17.0),
        n_cosmic_rays=0,
        n_hot_pixels=0,
        min_separation_px=14.0,
        border_px=12,
        seed=11,
    )
    cfa = np.empty(field.data.shape, np.float32)
    for (dy, dx), r in CFA.items():
        cfa[dy::2, dx::2] = r
    raw = np.clip(field.data * cfa, 0, NATIVE_SAT)
    header = field.header.copy()
    header["BAYERPAT"] = "RGGB"
    header["SATURATE"] = NATIVE_SAT
    header["IMAGETYP"] = "Light Frame"
    path = tmp_path / "osc.fits"
    fits.PrimaryHDU(raw.astype(np.uint16), header=header).writeto(path)
    return path, raw, field.truth


def test_partly_saturated_bayer_star_is_flagged(tmp_path):
    path, raw, truth = _bayer_field(tmp_path)
    clipped = raw >= NATIVE_SAT
    lum_sum = debayer_to_luminance(raw, "RGGB")
    cell_sat = superpixel_max(raw) >= NATIVE_SAT
    # stars with a saturated raw pixel whose brightest 2x2 sum stays below 4x the level
    partly = []
    for row in truth:
        ix, iy = round((row["x"] - 0.5) / 2), round((row["y"] - 0.5) / 2)
        box = (slice(max(iy - 1, 0), iy + 2), slice(max(ix - 1, 0), ix + 2))
        if cell_sat[box].any() and lum_sum[box].max() < 4 * NATIVE_SAT:
            partly.append(row)
    assert clipped.any() and len(partly) >= 3, "the field must hold partly saturated stars"

    frame = read_frame(path)
    assert frame.data[cell_sat].min() >= 4 * NATIVE_SAT
    assert any("super-pixels with a saturated raw pixel" in n for n in frame.notes)

    obs = config_from_dict(
        {
            "observatory": "osc",
            "camera": {
                "gain_e_per_adu": 1.5,
                "read_noise_e": 8.0,
                "saturation_adu": 65000,
                "bayer_pattern": "RGGB",
            },
            "stages": {"cosmics": {"enabled": False}},
        }
    )
    s = pipeline.reduce_frame(path, obs, tmp_path / "out")
    assert s["status"] == "ok", s
    cat = Table.read(s["catalog"])
    tree = cKDTree(np.column_stack([cat["x_centroid"], cat["y_centroid"]]))
    # luminance pixel (i, j) covers raw pixels 2i..2i+1: centre (x - 0.5) / 2
    xy = np.array([[(r["x"] - 0.5) / 2, (r["y"] - 0.5) / 2] for r in partly])
    dist, idx = tree.query(xy)
    found = dist < 1.0
    assert found.sum() >= 0.8 * len(partly), dist
    flagged = np.asarray(cat["saturated"])[idx[found]]
    assert flagged.all(), f"{int((~flagged).sum())} of {found.sum()} partly saturated stars missed"
    # and the faint stars are not flagged
    faint = truth[truth["peak_adu"] < 0.3 * NATIVE_SAT]
    fxy = np.column_stack([(faint["x"] - 0.5) / 2, (faint["y"] - 0.5) / 2])
    fd, fi = tree.query(fxy)
    near = fd < 1.0
    assert near.sum() > 10
    assert not np.asarray(cat["saturated"])[fi[near]].any()


@pytest.mark.parametrize("level", [NATIVE_SAT])
def test_saturation_from_the_camera_config_when_the_header_has_none(tmp_path, level):
    raw = np.full((8, 8), 500, np.uint16)
    raw[2, 3] = int(level)  # one saturated green pixel
    h = fits.Header()
    h["BAYERPAT"] = "RGGB"
    p = tmp_path / "nosat.fits"
    fits.PrimaryHDU(raw, header=h).writeto(p)
    assert read_frame(p).data[1, 1] == 500 * 3 + level  # no level known: the sum
    assert read_frame(p, saturation_adu=level).data[1, 1] == 4 * level
