"""2-D background and RMS (rpp_tasks.stages.background)."""

from __future__ import annotations

import numpy as np
import pytest

from rpp_tasks.stages.background import estimate_background

GAIN, RN = 2.0, 6.0  # e-/ADU, e-


def _sky(shape=(512, 512), *, level=1000.0, gx=0.2, gy=-0.1, seed=0):
    """Sky level + linear gradient (ADU), Poisson noise in electrons + read noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    truth = level + gx * xx + gy * yy
    data = rng.poisson(truth * GAIN) / GAIN + rng.normal(0.0, RN / GAIN, shape)
    return data.astype(np.float32), truth


def test_gradient_is_recovered():
    data, truth = _sky()
    res = estimate_background(data, box_size_px=64)
    rel = (res.background - truth) / truth
    assert np.max(np.abs(rel)) < 0.01  # within 1 % everywhere (truth spans 949-1102 ADU)
    assert res.global_median_adu == pytest.approx(np.median(truth), rel=0.002)
    assert res.background.dtype == np.float32 and res.rms.dtype == np.float32
    assert res.background.shape == data.shape


def test_rms_matches_photon_plus_read_noise():
    data, truth = _sky()
    res = estimate_background(data)
    expected = np.sqrt(truth / GAIN + (RN / GAIN) ** 2)  # ADU; read noise included
    rel = np.median(res.rms / expected)
    assert rel == pytest.approx(1.0, abs=0.03)
    assert res.global_rms_adu == pytest.approx(np.median(expected), rel=0.03)


def test_mask_keeps_a_bright_blob_out_of_the_sky():
    data, truth = _sky(level=500.0, gx=0.0, gy=0.0, seed=1)
    yy, xx = np.mgrid[:512, :512]
    blob = 3000.0 * np.exp(-((xx - 256) ** 2 + (yy - 256) ** 2) / (2 * 30.0**2))
    data = data + blob.astype(np.float32)
    biased = estimate_background(data)
    masked = estimate_background(data, mask=blob > 5.0)
    # without the mask the blob leaks into the sky at the blob's position (test can fail)
    assert biased.background[256, 256] > 504.0
    assert masked.background[256, 256] == pytest.approx(500.0, abs=2.0)
    assert masked.n_masked_px == int(np.count_nonzero(blob > 5.0))


def test_nan_pixels_are_ignored():
    data, _ = _sky(level=300.0, gx=0.0, gy=0.0, seed=2)
    data[100:110, :] = np.nan
    res = estimate_background(data)
    assert np.all(np.isfinite(res.background))
    assert res.global_median_adu == pytest.approx(300.0, abs=1.0)
    assert res.n_masked_px == 10 * 512


def test_box_larger_than_image_is_clipped_and_flagged():
    data, _ = _sky((40, 50), level=200.0, gx=0.0, gy=0.0, seed=3)
    res = estimate_background(data, box_size_px=64)
    assert "box_clipped_to_image" in res.flags
    assert res.global_median_adu == pytest.approx(200.0, abs=2.0)


def test_all_masked_returns_flagged_nan_maps():
    data = np.ones((64, 64), np.float32)
    res = estimate_background(data, mask=np.ones((64, 64), bool))
    assert res.flags == ("all_masked",)
    assert np.isnan(res.global_median_adu) and res.background.shape == (64, 64)
    assert res.to_dict()["flags"] == ["all_masked"]


def test_non_contiguous_big_endian_input():
    data, truth = _sky((256, 256), seed=4)
    swapped = data.astype(">f8")[:, ::1].T.T  # other dtype, other byte order
    res = estimate_background(swapped)
    assert np.median(res.background) == pytest.approx(np.median(truth), rel=0.005)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((np.zeros(10),), {}, "2-D"),
        ((np.zeros((8, 8)),), {"mask": np.zeros((4, 4), bool)}, "mask shape"),
        ((np.zeros((8, 8)),), {"box_size_px": 0}, ">= 1"),
    ],
)
def test_bad_input_raises(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate_background(*args, **kwargs)


def test_noise_model_check_agrees_with_a_right_camera_and_flags_a_wrong_one():
    from rpp_tasks.stages.background import check_noise_model

    rng = np.random.default_rng(5)
    gain, rn, sky = 1.5, 8.0, 800.0
    img = (rng.poisson(sky * gain, (512, 512)) + rng.normal(0, rn, (512, 512))) / gain
    right = check_noise_model(img, gain_e_per_adu=gain, read_noise_e=rn)
    assert right.ratio == pytest.approx(1.0, abs=0.05)
    assert right.effective_read_noise_e == pytest.approx(
        rn, rel=0.6
    )  # >= configured; noisy estimate
    # a camera configured with a gain 10x too high underestimates the noise by ~3x
    wrong = check_noise_model(img, gain_e_per_adu=15.0, read_noise_e=rn)
    assert wrong.ratio > 2.5
    model_fixed = np.sqrt(sky / 15.0 + (wrong.effective_read_noise_e / 15.0) ** 2)
    assert model_fixed == pytest.approx(wrong.measured_sigma_adu, rel=0.02)


def _sky_frame(rng, *, gain, rn, sky, shape=(512, 512)):
    """A bias-subtracted sky frame in ADU: Poisson sky electrons plus Gaussian read noise."""
    return (rng.poisson(sky * gain, shape) + rng.normal(0, rn, shape)) / gain


def test_gain_bound_replaces_a_gain_8x_too_large_on_a_sky_dominated_frame():
    from rpp_tasks.stages.background import check_noise_model, gain_from_noise

    rng = np.random.default_rng(11)
    gain, rn = 0.13, 3.0  # Seestar-like after the 2x2 binning
    img = _sky_frame(rng, gain=gain, rn=rn, sky=3600.0)
    wrong = check_noise_model(img, gain_e_per_adu=8 * gain, read_noise_e=rn)
    assert wrong.sky_dominated and wrong.ratio > 2.5
    # bias-subtracted: the bound is the true gain
    assert wrong.gain_max_e_per_adu == pytest.approx(gain, rel=0.05)
    used, source = gain_from_noise(wrong, 8 * gain)
    assert source == "sky noise bound" and used == wrong.gain_max_e_per_adu
    # an unknown gain (NaN) gets the bound too
    unknown = check_noise_model(img, gain_e_per_adu=float("nan"), read_noise_e=rn)
    assert np.isnan(unknown.ratio)
    assert gain_from_noise(unknown, float("nan")) == (unknown.gain_max_e_per_adu, source)
    # the right gain, and one 1.3x too large (within the tolerance), are kept
    for g in (gain, 1.3 * gain):
        assert gain_from_noise(check_noise_model(img, gain_e_per_adu=g, read_noise_e=rn), g) == (
            g,
            "configured",
        )
    # a bias pedestal left in the frame only raises the bound: the right gain is still kept
    ped = check_noise_model(img + 500.0, gain_e_per_adu=gain, read_noise_e=rn)
    assert ped.gain_max_e_per_adu > 1.1 * gain
    assert gain_from_noise(ped, gain) == (gain, "configured")


@pytest.mark.parametrize("sky", [0.0, 5.0, 30.0, 100.0, 400.0, 2000.0])
def test_a_right_gain_is_never_replaced_even_with_a_read_noise_2x_too_small(sky):
    """From read-noise-dominated (sky ~0, where the bound is rn/sigma and hangs on the
    configured read noise) to sky-dominated frames, a right gain survives a configured read
    noise half the true one."""
    from rpp_tasks.stages.background import check_noise_model, gain_from_noise

    rng = np.random.default_rng(int(sky) + 3)
    gain, rn = 1.5, 8.0
    img = _sky_frame(rng, gain=gain, rn=rn, sky=sky)
    chk = check_noise_model(img, gain_e_per_adu=gain, read_noise_e=rn / 2)
    assert gain_from_noise(chk, gain) == (gain, "configured"), chk
    if sky <= 5.0:  # read noise dominates: the frame is not sky-dominated
        assert not chk.sky_dominated
        # here the bound is below the true gain (it believes the small read noise)
        assert chk.gain_max_e_per_adu < 0.6 * gain
    if sky >= 2000.0:
        assert chk.sky_dominated


def test_check_gain_records_the_gain_used_and_is_idempotent_on_a_resumed_frame():
    """The adapter replaces ``meta["gain_e_per_adu"]`` and records why; run again (a frame resumed
    at the cosmics stage, its check.json already holding the replaced gain) it still compares
    with the configured gain."""
    from types import SimpleNamespace

    from astropy.io import fits

    from rpp_tasks.session.adapters import check_gain

    rng = np.random.default_rng(12)
    img = _sky_frame(rng, gain=0.13, rn=3.0, sky=3600.0).astype(np.float32)
    fw = SimpleNamespace(
        stem="f", data=img, mask=None, header=fits.Header(),
        meta={"gain_e_per_adu": 1.0, "read_noise_e": 3.0},
    )  # fmt: skip
    first = check_gain(fw)
    assert first["source"] == "sky noise bound" and first["configured_e_per_adu"] == 1.0
    assert fw.meta["gain_e_per_adu"] == pytest.approx(0.13, rel=0.05)
    assert fw.meta["gain_check"]["used_e_per_adu"] == fw.meta["gain_e_per_adu"]
    assert "sky noise bound" in str(fw.header["HISTORY"])
    again = check_gain(fw)
    assert {k: v for k, v in again.items() if k != "noise"} == fw.meta["gain_check"]
    assert again["configured_e_per_adu"] == 1.0 and again["source"] == "sky noise bound"
    fw.meta = {"gain_e_per_adu": 0.13, "read_noise_e": 3.0}
    kept = check_gain(fw)
    assert kept["source"] == "configured" and fw.meta["gain_e_per_adu"] == 0.13


def test_noise_check_against_another_gain_is_that_of_a_new_measurement():
    """`NoiseCheck.with_gain` (what the cosmics stage uses once the gain was replaced) gives what
    `check_noise_model` gives with that gain, without measuring the image again."""
    from rpp_tasks.stages.background import check_noise_model

    rng = np.random.default_rng(2)
    img = (rng.poisson(900.0 * 0.13, (300, 300)) / 0.13).astype(np.float32)
    first = check_noise_model(img, gain_e_per_adu=1.0, read_noise_e=1.5)
    for gain, rn in ((0.13, 1.5), (0.5, 3.0), (float("nan"), 1.5)):
        again = check_noise_model(img, gain_e_per_adu=gain, read_noise_e=rn)
        # field by field, NaN equal to NaN (an unknown gain has no model)
        np.testing.assert_equal(first.with_gain(gain, rn).to_dict(), again.to_dict())
