"""Master calibrations, frame calibration and the master library (rpp_tasks.stages.calibration)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from rpp_tasks.stages import calibration
from rpp_tasks.stages.calibration import (
    calibrate_image,
    combine_frames,
    make_master_bias,
    make_master_dark,
    make_master_flat,
)
from rpp_tasks.stages.master_library import MasterLibrary, load_master, write_master
from rpp_tasks.stages.masters import run_masters

SHAPE = (64, 80)


def _noise_frames(n, level, sigma, *, seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return [(level + rng.normal(0, sigma, shape)).astype(np.float32) for _ in range(n)]


# ------------------------------------------------------------------------------ combine_frames
@pytest.mark.parametrize("method", ["median", "mean"])
def test_cosmic_ray_in_one_frame_is_rejected(method):
    frames = _noise_frames(7, 100.0, 5.0)
    frames[3][10, 20] += 5000.0
    image, n_used, n_rej = combine_frames(frames, method=method, clip_sigma=3.0)
    assert n_used == 7
    assert image[10, 20] == pytest.approx(100.0, abs=10.0)
    assert n_rej >= 1
    assert image.dtype == np.float32 and image.shape == SHAPE
    # without clipping the mean keeps the hit (so the check above can fail)
    unclipped, _, none = combine_frames(frames, method="mean", clip_sigma=None)
    assert unclipped[10, 20] > 700.0 and none == 0


def test_clipping_rate_is_gaussian_and_noise_drops_as_sqrt_n():
    frames = _noise_frames(15, 1000.0, 10.0, seed=1, shape=(200, 200))
    image, _, n_rej = combine_frames(frames, method="mean", clip_sigma=3.0)
    frac = n_rej / (15 * 200 * 200)
    assert 0.0015 < frac < 0.006  # 3-sigma two-sided: 0.27 % expected
    assert np.std(image) == pytest.approx(10.0 / np.sqrt(15), rel=0.1)
    assert np.mean(image) == pytest.approx(1000.0, abs=0.1)


def test_chunked_result_equals_numpy_median(monkeypatch):
    frames = _noise_frames(5, 50.0, 3.0, seed=2)
    monkeypatch.setattr(calibration, "_CHUNK_ELEMENTS", 5 * SHAPE[1] * 3)  # 3 rows per block
    image, _, _ = combine_frames(np.stack(frames), method="median", clip_sigma=None)
    np.testing.assert_allclose(image, np.median(np.stack(frames), axis=0), rtol=1e-6)


def test_quantised_identical_frames_are_not_clipped():
    frames = [np.full(SHAPE, 32, dtype=np.uint16) for _ in range(5)]
    image, n, n_rej = combine_frames(frames)
    assert n_rej == 0 and np.all(image == 32.0)


def test_nan_pixels_are_ignored_and_scale_is_applied():
    frames = _noise_frames(4, 10.0, 0.1, seed=3)
    frames[0][0, 0] = np.nan
    image, _, _ = combine_frames(frames, method="mean", scale=[2.0, 2.0, 2.0, 2.0])
    assert image[0, 0] == pytest.approx(20.0, abs=0.5)
    all_nan = [np.full((2, 2), np.nan, np.float32)] * 3
    assert np.all(np.isnan(combine_frames(all_nan)[0]))


@pytest.mark.parametrize(
    ("stack", "kwargs", "match"),
    [
        ([], {}, "empty"),
        ([np.zeros((3, 3)), np.zeros((4, 3))], {}, "same shape"),
        ([np.zeros((3, 3))] * 3, {"method": "mode"}, "method"),
        ([np.zeros((3, 3))] * 3, {"scale": [1.0]}, "scale"),
    ],
)
def test_combine_bad_input_raises(stack, kwargs, match):
    with pytest.raises(ValueError, match=match):
        combine_frames(stack, **kwargs)


# ------------------------------------------------------------------------------ masters
@pytest.fixture(scope="module")
def detector():
    """Bias 100 ADU + structure, dark current rate 0.01-0.5 ADU/s, vignetted flat."""
    rng = np.random.default_rng(10)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    bias = (100.0 + 0.05 * xx).astype(np.float32)
    rate = rng.uniform(0.01, 0.5, SHAPE).astype(np.float32)
    r2 = ((xx - 40) ** 2 + (yy - 32) ** 2) / 60.0**2
    response = (1.0 - 0.3 * r2).astype(np.float32)
    return bias, rate, response


def test_master_dark_is_a_rate_that_scales_with_exposure(detector):
    bias, rate, _ = detector
    rng = np.random.default_rng(11)
    t = [30.0, 60.0, 120.0, 60.0, 30.0]
    darks = [bias + rate * ti + rng.normal(0, 1.0, SHAPE).astype(np.float32) for ti in t]
    mbias = make_master_bias([bias + f for f in _noise_frames(9, 0.0, 1.0, seed=12)])
    master = make_master_dark(darks, exptimes_s=t, master_bias=mbias.image)
    assert master.kind == "dark" and master.flags == () and master.exptime_s == 60.0
    err = master.image - rate
    # per-dark rate noise is 1 ADU / t (0.008-0.033 ADU/s); median of 5
    assert abs(np.mean(err)) < 0.003
    assert np.std(err) < 0.025
    # a frame of 2x the exposure gets 2x the dark subtracted
    sky = 500.0
    for texp in (60.0, 120.0):
        raw = bias + rate * texp + sky
        cal = calibrate_image(
            raw,
            exptime_s=texp,
            bias=mbias.image,
            dark_rate=master.image,
            dark_exptime_s=master.exptime_s,
        )
        assert np.median(cal.image) == pytest.approx(sky, abs=1.0)
        scaled = () if texp == 60.0 else ("dark_scaled_from_60_s",)
        assert cal.flags == ("no_saturation_level", *scaled, "flat_missing")


def test_dark_without_bias_is_flagged(detector):
    bias, rate, _ = detector
    master = make_master_dark([bias + rate * 100.0], exptimes_s=[100.0], master_bias=None)
    assert "dark_includes_bias" in master.flags
    # exact for a science frame of the dark's exposure
    cal = calibrate_image(bias + rate * 100.0 + 42.0, exptime_s=100.0, dark_rate=master.image)
    np.testing.assert_allclose(cal.image, 42.0, atol=1e-3)


def test_master_flat_is_normalised_and_bad_pixels_are_masked(detector):
    bias, rate, response = detector
    rng = np.random.default_rng(13)
    levels, t = [5000.0, 10000.0, 20000.0], [2.0, 4.0, 8.0]
    flats = [
        bias + rate * ti + lv * response + rng.normal(0, np.sqrt(lv) / 10, SHAPE)
        for lv, ti in zip(levels, t)
    ]
    for f in flats:
        f[:, 7] = bias[:, 7]  # a dead column: no response
    master = make_master_flat(flats, master_bias=bias, master_dark_rate=rate, exptimes_s=t)
    assert np.median(master.image) == pytest.approx(1.0, abs=1e-6)
    good = np.ones(SHAPE, bool)
    good[:, 7] = False
    expected = response / np.median(response[good])
    np.testing.assert_allclose(master.image[good], expected[good], rtol=0.01)
    assert master.mask[:, 7].all() and not master.mask[good].any()
    assert np.all(master.image[:, 7] == 1.0)
    assert master.levels_adu[0] == pytest.approx(5000 * np.median(response), rel=0.02)
    # the flat's bad pixels follow the frame through calibrate_image
    cal = calibrate_image(
        bias + 300.0 * response,
        exptime_s=0.0,
        bias=bias,
        flat=master.image,
        bad_pixel_mask=master.mask,
    )
    np.testing.assert_allclose(cal.image[good], 300.0 * np.median(response[good]), rtol=0.01)
    assert cal.mask[:, 7].all()


def test_flat_with_non_positive_level_is_dropped(detector):
    bias, _, response = detector
    good = bias + 1000.0 * response
    master = make_master_flat(
        [good, bias.copy()], master_bias=bias, master_dark_rate=None, exptimes_s=[1.0, 1.0]
    )
    assert master.n_frames == 1
    assert "dropped_1_non_positive_level" in master.flags and "no_dark" in master.flags
    with pytest.raises(ValueError, match="positive median"):
        make_master_flat([bias.copy()], master_bias=bias, master_dark_rate=None, exptimes_s=[1.0])


# ------------------------------------------------------------------------------ calibrate_image
def test_missing_masters_are_flagged_and_frame_still_reduced():
    raw = np.arange(12, dtype=np.uint16).reshape(3, 4)
    cal = calibrate_image(raw, exptime_s=10.0)
    assert cal.flags == ("no_saturation_level", "no_bias", "no_dark", "flat_missing")
    assert cal.steps == ()
    np.testing.assert_array_equal(cal.image, raw.astype(np.float32))
    assert cal.image.dtype == np.float32 and not cal.mask.any()


def test_saturation_is_detected_on_the_raw_frame():
    raw = np.full((4, 4), 1000.0, np.float32)
    raw[0, 0] = 4095.0  # saturated raw pixel
    raw[1, 1] = 4000.0  # not saturated, but becomes > 4095 after the flat
    flat = np.ones((4, 4), np.float32)
    flat[0, 0] = 2.0  # calibrated value of the saturated pixel drops below the level
    flat[1, 1] = 0.5
    cal = calibrate_image(
        raw, exptime_s=1.0, bias=np.zeros((4, 4)), flat=flat, saturation_adu=4095.0
    )
    assert cal.mask[0, 0] and not cal.mask[1, 1]
    assert cal.n_saturated == 1
    assert cal.image[1, 1] == pytest.approx(8000.0)
    assert cal.steps[0].startswith("saturation mask")


def test_non_positive_flat_pixels_are_masked_not_divided():
    flat = np.ones((3, 3), np.float32)
    flat[1, 1], flat[2, 2] = 0.0, np.nan
    cal = calibrate_image(np.full((3, 3), 10.0), exptime_s=1.0, flat=flat)
    assert cal.mask[1, 1] and cal.mask[2, 2] and cal.n_masked == 2
    assert np.all(np.isfinite(cal.image)) and cal.image[1, 1] == 10.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bias": np.zeros((2, 2))}, "binning"),
        ({"dark_rate": np.zeros((3, 3)), "exptime_s": None}, "exptime_s"),
        ({"dark_rate": np.zeros((3, 3)), "exptime_s": -1.0}, "exptime_s"),
    ],
)
def test_calibrate_bad_input_raises(kwargs, match):
    kw = {"exptime_s": 1.0} | kwargs
    with pytest.raises(ValueError, match=match):
        calibrate_image(np.zeros((3, 3)), **kw)


# ------------------------------------------------------------------------------ library
def test_library_nearest_in_time_with_filters(tmp_path):
    lib = MasterLibrary(tmp_path / "lib")
    img = np.ones((8, 8), np.float32)
    lib.add(img, kind="bias", camera="CAM1", binning=(1, 1), mjd=60000.0, n_frames=10)
    lib.add(img, kind="bias", camera="CAM1", binning=(1, 1), mjd=60010.0, n_frames=10)
    lib.add(img, kind="bias", camera="CAM1", binning=(2, 2), mjd=60004.9, n_frames=10)
    lib.add(img, kind="bias", camera="CAM2", binning=(1, 1), mjd=60005.0, n_frames=10)
    lib.add(img, kind="flat", camera="CAM1", binning=1, band="V", mjd=60001.0)
    lib.add(img, kind="flat", camera="CAM1", binning=1, band="R", mjd=60004.0)

    m = lib.find_nearest("bias", camera="CAM1", binning=(1, 1), mjd=60003.0)
    assert m.mjd == 60000.0 and m.delta_days == pytest.approx(3.0)
    assert m.path.is_file() and m.path.parent.parent == lib.root
    assert lib.find_nearest("bias", camera="CAM1", binning=(1, 1), mjd=60008.0).mjd == 60010.0
    assert lib.find_nearest("bias", camera="CAM1", binning="2x2", mjd=60000.0).binning == (2, 2)
    assert (
        lib.find_nearest("flat", camera="CAM1", binning=(1, 1), band="V", mjd=60004.0).mjd
        == 60001.0
    )
    assert lib.find_nearest("flat", camera="CAM1", binning=(1, 1), band="B", mjd=60004.0) is None
    assert lib.find_nearest("dark", camera="CAM1", binning=(1, 1), mjd=60004.0) is None
    assert lib.find_nearest("bias", camera="CAM3", binning=(1, 1), mjd=60004.0) is None
    assert (
        lib.find_nearest("bias", camera="CAM1", binning=(1, 1), mjd=60020.0, max_delta_days=5.0)
        is None
    )
    with pytest.raises(ValueError, match="kind"):
        lib.find_nearest("sky", camera="CAM1", binning=(1, 1), mjd=60000.0)


def test_library_passes_over_masters_of_another_frame_shape(tmp_path):
    """A master of another shape (a sub-frame or another region of interest of the same camera
    and binning) cannot calibrate the frames: the nearest master of their shape is chosen, and
    none when there is none. Indexes written before the shape was kept read it from the file."""
    lib = MasterLibrary(tmp_path / "lib")
    lib.add(np.ones((64, 64), np.float32), kind="dark", camera="C", binning=1, mjd=60000.0)
    lib.add(np.ones((32, 48), np.float32), kind="dark", camera="C", binning=1, mjd=59990.0)
    assert lib.find_nearest("dark", camera="C", binning=1, mjd=60001.0).mjd == 60000.0
    m = lib.find_nearest("dark", camera="C", binning=1, mjd=60001.0, shape=(32, 48))
    assert m.mjd == 59990.0 and load_master(m.path)[0].shape == (32, 48)
    assert lib.find_nearest("dark", camera="C", binning=1, mjd=60001.0, shape=(256, 256)) is None
    index = json.loads((lib.root / "index.json").read_text())
    assert sorted(tuple(e["shape"]) for e in index["masters"]) == [(32, 48), (64, 64)]
    for e in index["masters"]:  # an index of an earlier version: no shape recorded
        del e["shape"]
    (lib.root / "index.json").write_text(json.dumps(index))
    old = MasterLibrary(lib.root)
    assert old.find_nearest("dark", camera="C", binning=1, mjd=60001.0, shape=(64, 64)).mjd == (
        60000.0
    )
    assert old.find_nearest("dark", camera="C", binning=1, mjd=60001.0, shape=(8, 8)) is None


def test_library_re_add_replaces_and_survives_reopen(tmp_path):
    lib = MasterLibrary(tmp_path)
    lib.add(np.zeros((4, 4)), kind="dark", camera="C", binning=(1, 1), mjd=59000.5, exptime_s=60.0)
    lib.add(np.full((4, 4), 2.0), kind="dark", camera="C", binning=(1, 1), mjd=59000.5)
    again = MasterLibrary(tmp_path)
    assert len(again.entries()) == 1
    match = again.find_nearest("dark", camera="C", binning=(1, 1), mjd=59000.0)
    image, header, _ = load_master(match.path)
    assert np.all(image == 2.0) and header["IMAGETYP"] == "MASTER DARK"
    assert json.loads((tmp_path / "index.json").read_text())["masters"][0]["path"].startswith(
        "dark/"
    )


def test_write_master_provenance_roundtrip(tmp_path):
    master = make_master_bias(_noise_frames(5, 300.0, 2.0, seed=20))
    path = write_master(
        master,
        tmp_path / "bias.fits",
        camera="CAM",
        binning=(2, 2),
        mjd=60000.25,
        sources=["a.fits", "b.fits"],
    )
    image, header, mask = load_master(path)
    np.testing.assert_array_equal(image, master.image)
    assert mask is None
    assert header["IMAGETYP"] == "MASTER BIAS" and header["NCOMBINE"] == 5
    assert header["XBINNING"] == 2 and header["MJD-OBS"] == 60000.25
    history = "\n".join(str(h) for h in header["HISTORY"])
    assert "5 frames" in history and "clip 3.0" in history and "input: a.fits" in history


# ------------------------------------------------------------------------------ real data
RAW = ("bias_0", "dark_0", "flat_0", "science_0")


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.realdata
def test_huntsman_masters_and_calibration(real_data, tmp_path):
    raw = real_data / "huntsman" / "raw"
    paths = {name: raw / f"{name}.fits" for name in RAW}
    before = {name: _sha256(p) for name, p in paths.items()}
    assert before["bias_0"].startswith("0cf0c82f1a2e") and before["science_0"].startswith(
        "4d46537cdbe8"
    )

    summary = run_masters(
        {"bias": [paths["bias_0"]], "dark": [paths["dark_0"]], "flat_g_band": [paths["flat_0"]]},
        out_dir=tmp_path / "masters",
        camera="TESTCAM03",
        binning=(1, 1),
        library_root=tmp_path / "library",
        bands=["g_band", "r_band"],
    )
    bias, hb, _ = load_master(summary["bias"]["path"])
    dark, hd, _ = load_master(summary["dark"]["path"])
    flat, hf, flat_mask = load_master(summary["flat"]["g_band"]["path"])
    assert np.all(bias == 32.0)  # the test bias is a constant 32 ADU
    assert hd["BUNIT"] == "adu / s" and hf["IMAGETYP"] == "MASTER FLAT"
    assert np.median(dark) == pytest.approx((37.0 - 32.0) / 300.0, rel=1e-4)  # dark_0 median 37
    assert np.median(flat) == pytest.approx(1.0, abs=1e-6)
    assert not flat_mask.any()
    assert summary["flags"] == ["flat_missing_r_band"]
    assert {e.kind for e in MasterLibrary(tmp_path / "library").entries()} == {
        "bias",
        "dark",
        "flat",
    }

    with fits.open(paths["science_0"]) as h:
        sci = h[0].data.astype(np.float32)
        texp = float(h[0].header["EXPTIME"])
    with fits.open(paths["dark_0"]) as h:
        dark_raw = h[0].data.astype(np.float32)
    with fits.open(paths["flat_0"]) as h:
        flat_raw = h[0].data.astype(np.float32)
    cal = calibrate_image(
        sci,
        exptime_s=texp,
        bias=bias,
        dark_rate=dark,
        flat=flat,
        saturation_adu=4094.0,
        dark_exptime_s=hd["EXPTIME"],
    )
    # independent expectation: equal 300 s exposures, so bias + rate * t is the raw dark itself
    flat_expected = (flat_raw - dark_raw) / np.median(flat_raw - dark_raw)
    expected = (sci - dark_raw) / flat_expected
    sat = sci >= 4094.0  # saturated pixels stay at or above the level (issue 12)
    expected[sat] = np.maximum(expected[sat], 4094.0)
    np.testing.assert_allclose(cal.image, expected, rtol=1e-4, atol=1e-3)
    assert np.median(cal.image) == pytest.approx(
        (np.median(sci) - 32.0 - np.median(dark) * texp) / 1.0, abs=2.0
    )
    assert cal.n_saturated == int(np.count_nonzero(sci >= 4094))
    assert cal.n_saturated > 0 and cal.flags == ()

    assert {name: _sha256(p) for name, p in paths.items()} == before


@pytest.mark.realdata
def test_huntsman_lsst_mef_masters_as_library_entries(real_data, tmp_path):
    calib = real_data / "huntsman" / "calib"
    lib = MasterLibrary(tmp_path)
    flat_src = calib / "flat_14_Huntsman_g_band_2021-01-07.fits"
    dark_src = calib / "dark_14_Huntsman_2021-01-07.fits"
    lib.add(flat_src, kind="flat", camera="TESTCAM03", binning=(1, 1), band="g_band", mjd=59221.0)
    lib.add(dark_src, kind="dark", camera="TESTCAM03", binning=(1, 1), mjd=59221.0)
    match = lib.find_nearest("flat", camera="TESTCAM03", binning=(1, 1), band="g_band", mjd=59232.5)
    assert match.delta_days == pytest.approx(11.5)
    flat, header, _ = load_master(match.path)  # the IMAGE plane of the 9-HDU MEF
    assert flat.shape == (801, 801) and flat.dtype == np.float32
    assert np.nanmedian(flat) == pytest.approx(1.0, abs=0.01)
    dark, _, _ = load_master(
        lib.find_nearest("dark", camera="TESTCAM03", binning=(1, 1), mjd=59221.0).path
    )
    assert np.nanmedian(dark) == pytest.approx(5.0 / 300.0, rel=0.02)  # same as ours from dark_0
    # 801x801 LSST masters do not fit the 800x800 raw frames: a clear error, not a silent crop
    with pytest.raises(ValueError, match="differs"):
        calibrate_image(np.zeros((800, 800)), exptime_s=300.0, dark_rate=dark)


@pytest.mark.realdata
def test_session_manifest_then_library_fallback(real_data, tmp_path):
    from rpp_tasks.inputs import frames

    raw = real_data / "huntsman" / "raw"
    manifest = frames.group_session(sorted(raw.glob("*.fits"))).to_dict()
    assert manifest["bands"] == ["g"]  # FILTER='g_band' read as the standard band g
    first = run_masters(
        manifest, out_dir=tmp_path / "s1", camera="TESTCAM03", library_root=tmp_path / "lib"
    )
    assert first["binning"] == [1, 1] and first["flags"] == []
    assert first["bias"]["source"] == first["dark"]["source"] == "session"
    assert first["dark"]["inputs"] == [str(raw / "dark_0.fits")]
    assert first["flat"]["g"]["source"] == "session"

    # a later night with science frames only: every master comes from the library
    science_only = {
        "groups": [g for g in manifest["groups"] if g["kind"] == "science"],
        "frames": [f for f in manifest["frames"] if f["imagetyp"] == "science"],
        "bands": manifest["bands"],
    }
    second = run_masters(
        science_only, out_dir=tmp_path / "s2", camera="TESTCAM03", library_root=tmp_path / "lib"
    )
    sci_mjd = science_only["frames"][0]["mjd_obs"]
    for entry, master_mjd in (
        (second["bias"], first["bias"]["mjd"]),
        (second["flat"]["g"], first["flat"]["g"]["mjd"]),
    ):
        assert entry["source"] == "library"
        assert entry["delta_days"] == pytest.approx(sci_mjd - master_mjd, abs=1e-6)
    assert np.median(load_master(second["dark"]["path"])[0]) == pytest.approx(5.0 / 300.0, rel=1e-4)
    # too old for max_age_days: no master, flagged
    third = run_masters(
        science_only,
        out_dir=tmp_path / "s3",
        camera="TESTCAM03",
        library_root=tmp_path / "lib",
        max_age_days=5.0,
    )
    assert third["bias"] is None and third["dark"] is None and third["flat"] == {}
    assert third["flags"] == ["no_bias", "no_dark", "flat_missing_g"]
    assert not (tmp_path / "s2").exists() or not any((tmp_path / "s2").iterdir())


# ----------------------------------------------------------------------------------------------
# bad calibration frames never take the night down (issue 12)
# ----------------------------------------------------------------------------------------------
def _bad_calibration_night(tmp_path):
    from rpp_tasks.sim import synthetic

    raw = tmp_path / "2025-01-15"
    paths = synthetic.write_synthetic_session(
        raw,
        truth_folder=tmp_path / "truth",
        n_science=2,
        n_bias=3,
        n_dark=2,
        n_flat=3,
        shape=(256, 256),
        seed=21,
    )
    template = fits.getheader(paths["flat"][0])
    nan_flat = np.full((256, 256), np.nan, np.float32)
    fits.PrimaryHDU(nan_flat, header=template).writeto(raw / "flat_V_nan.fits")
    fits.PrimaryHDU(np.zeros((256, 256), np.uint16), header=template).writeto(
        raw / "flat_V_zero.fits"
    )
    dark_h = fits.getheader(paths["dark"][0])
    fits.PrimaryHDU(np.array([[500]], np.uint16), header=dark_h).writeto(raw / "dark_1x1.fits")
    noise = np.random.default_rng(1).normal(500, 5, (16, 16)).astype(np.uint16)
    fits.PrimaryHDU(noise, header=dark_h).writeto(raw / "dark_16x16.fits")
    fits.PrimaryHDU(
        np.full((256, 256), np.nan, np.float32), header=fits.getheader(paths["bias"][0])
    ).writeto(raw / "bias_nan.fits")
    return raw, paths


def test_bad_calibration_frames_are_dropped_from_their_masters(tmp_path):
    """issue 12: an all-NaN/all-zero flat or a 1x1 dark raised FrameRejected out of
    reduce_session."""
    from rpp_tasks.config import find_config
    from rpp_tasks.session import lifecycle

    raw, paths = _bad_calibration_night(tmp_path)
    obs = find_config("demo")
    summary = lifecycle.reduce_session(raw, obs, work_root=tmp_path / "work", workers=1)
    summary = summary[0].to_dict()
    assert summary["n_ok"] == 2, summary["frames"]
    masters = summary["masters"]
    reasons = {Path(r["path"]).name: r["reason"] for r in masters["rejected"]}
    assert set(reasons) == {
        "flat_V_nan.fits",
        "flat_V_zero.fits",
        "dark_16x16.fits",
        "bias_nan.fits",
    }
    assert "no finite pixel" in reasons["flat_V_nan.fits"]
    assert "constant image" in reasons["flat_V_zero.fits"]
    # the 1x1 dark is rejected from its header already, when the session is grouped
    dark_1x1 = summary["rejected_files"]["dark_1x1"]
    assert dark_1x1["reason"].startswith("a single pixel (1x1 image)")
    assert reasons["dark_16x16.fits"] == "shape 16x16 differs from the science frames' 256x256"
    assert all(r["band"] == "V" for r in masters["rejected"] if r["kind"] == "flat")
    assert masters["bias"]["n_frames"] == 3 and masters["bias"]["n_rejected_inputs"] == 1
    assert masters["dark"]["n_frames"] == 2 and masters["dark"]["n_rejected_inputs"] == 1
    assert masters["flat"]["V"]["n_frames"] == 3 and masters["flat"]["V"]["n_rejected_inputs"] == 2
    assert sorted(masters["flat"]["V"]["inputs"]) == sorted(str(p) for p in paths["flat"])
    for f in summary["frames"]:
        assert f["stages"]["calibrate"]["flags"] == [], f["stages"]["calibrate"]


def test_unusable_session_flats_fall_back_on_the_library_with_the_reason(tmp_path):
    raw, paths = _bad_calibration_night(tmp_path)
    from rpp_tasks.inputs import frames

    lib = tmp_path / "library"
    good = frames.group_session(raw).to_dict()
    first = run_masters(good, out_dir=tmp_path / "m1", camera="SYNTH", library_root=lib)
    assert first["flat"]["V"]["source"] == "session"
    # a later night whose flats are all broken: the library flat, with the reason
    bad = {
        **good,
        "groups": [
            g
            if g["kind"] != "flat"
            else {**g, "paths": [str(raw / "flat_V_nan.fits"), str(raw / "flat_V_zero.fits")]}
            for g in good["groups"]
        ],
    }
    second = run_masters(bad, out_dir=tmp_path / "m2", camera="SYNTH", library_root=lib)
    flat = second["flat"]["V"]
    assert flat["source"] == "library"
    assert flat["reason"] == (
        "none of the 2 session flat frames of band V is usable (2 rejected): library master used"
    )
    # no library: the band is flagged, nothing raised
    third = run_masters(bad, out_dir=tmp_path / "m3", camera="SYNTH")
    assert "V" not in third["flat"] and "flat_missing_V" in third["flags"]
    assert len(third["rejected"]) == 4


def _pedestal_dslr_frame(tmp_path, *, pedestal, gain, sky_adu, rn_e=3.0, seed=31):
    """A raw RGGB mosaic (per raw pixel: ``pedestal`` + Poisson sky + read noise) as a FITS
    file, with a few pixels clipped at 15000 ADU."""
    rng = np.random.default_rng(seed)
    shape = (400, 400)
    raw = pedestal + (rng.poisson(sky_adu * gain, shape) + rng.normal(0, rn_e, shape)) / gain
    raw[100:102, 200:202] = 15000.0  # one saturated super-pixel
    hdr = fits.Header({"DATE-OBS": "2024-05-01T03:00:00", "EXPTIME": 60.0, "BAYERPAT": "RGGB"})
    path = tmp_path / "dslr_0001.fits"
    fits.writeto(path, np.round(raw).astype(np.uint16), hdr)
    return path


def _calibrate_and_check_gain(path, camera):
    from types import SimpleNamespace

    from rpp_tasks.config import config_from_dict
    from rpp_tasks.session.adapters import check_gain, step_calibrate

    obs = config_from_dict({"observatory": "dslr", "camera": camera})
    fw = SimpleNamespace(stem="f", raw_path=path, masters={}, meta={}, data=None, mask=None)
    rec = step_calibrate(fw, obs)
    return fw, rec, check_gain(fw)


def test_black_level_without_bias_frames_is_subtracted_and_unblinds_the_gain_check(tmp_path):
    """A DSLR frame with a 2048 ADU black level per raw pixel and no bias frames: the 2x2
    luminance sums four raw pixels, so 8192 ADU are subtracted, the sky is the true one, the
    saturation level drops by the same amount, and the sky-noise gain bound comes out at the true
    gain, which replaces a configured gain 2x too large. Without ``camera.bias_level_adu`` the
    pedestal hides it (bound ~4 e-/ADU)."""
    gain, sky = 0.7, 400.0  # e-/ADU; ADU per raw pixel
    path = _pedestal_dslr_frame(tmp_path, pedestal=2048.0, gain=gain, sky_adu=sky)
    camera = {
        "gain_e_per_adu": 1.5,
        "read_noise_e": 3.0,
        "saturation_adu": 15000,
        "bayer_pattern": "RGGB",
    }
    fw0, rec0, chk0 = _calibrate_and_check_gain(path, camera)
    assert rec0["black_level_adu"] == 0.0 and rec0["saturation_adu"] == 60000.0
    assert np.median(fw0.data) == pytest.approx(4 * (sky + 2048.0), rel=0.01)
    assert chk0["bound_e_per_adu"] > 3.0 and chk0["used_e_per_adu"] == 1.5  # blinded

    fw, rec, chk = _calibrate_and_check_gain(path, {**camera, "bias_level_adu": 2048})
    assert "black level 8192 ADU subtracted (camera.bias_level_adu)" in rec["steps"]
    assert rec["black_level_adu"] == 8192.0 and "no_bias" in rec["flags"]
    assert rec["saturation_adu"] == fw.meta["saturation_adu"] == 60000.0 - 8192.0
    assert np.median(fw.data) == pytest.approx(4 * sky, rel=0.01)
    # the saturated super-pixel stays at or above the calibrated image's saturation level
    assert fw.mask[50, 100] and fw.data[50, 100] >= 60000.0 - 8192.0
    assert chk["bound_e_per_adu"] == pytest.approx(gain, rel=0.05)
    assert chk["source"] == "sky noise bound" and fw.meta["gain_e_per_adu"] == pytest.approx(
        gain, rel=0.05
    )


def test_black_level_is_not_subtracted_over_a_master_bias_or_dark():
    """A master bias removes the pedestal itself, and a dark made without bias carries it."""
    raw = np.full(SHAPE, 1100.0, np.float32)
    for masters in ({"bias": np.full(SHAPE, 1000.0)}, {"dark_rate": np.full(SHAPE, 10.0)}):
        res = calibrate_image(raw, exptime_s=100.0, black_level_adu=1000.0, **masters)
        assert res.black_level_adu == 0.0
        assert np.allclose(res.image, 100.0)
        assert not any(s.startswith("black level") for s in res.steps)
    res = calibrate_image(raw, exptime_s=100.0, black_level_adu=1000.0, saturation_adu=1100.0)
    assert res.black_level_adu == 1000.0 and np.allclose(res.image, 100.0)
    assert "saturated pixels kept >= 100 ADU" in res.steps


def test_black_level_from_header_wins_and_scales_with_software_binning():
    from rpp_tasks.inputs.header import normalize_header

    base = {"DATE-OBS": "2024-05-01T03:00:00", "EXPTIME": 60.0}
    meta = normalize_header(fits.Header({**base, "RPPBIN": 2}), bias_level_adu=2048)
    assert (meta.bias_level_adu, meta.bias_level_origin) == (8192.0, "camera.bias_level_adu")
    meta = normalize_header(fits.Header({**base, "BLKLEVEL": 512}), bias_level_adu=2048)
    assert (meta.bias_level_adu, meta.bias_level_origin) == (512.0, "header BLKLEVEL")
    meta = normalize_header(fits.Header(base))
    assert meta.bias_level_adu is None and meta.bias_level_origin is None


def test_no_black_level_on_top_of_a_subtracted_overscan():
    """A frame whose overscan the reader subtracted (RPPOVSCN) has no pedestal left: a configured
    black level is not subtracted again (and the frame says why)."""
    from astropy.io import fits

    from rpp_tasks.inputs.header import normalize_header

    h = fits.Header({"IMAGETYP": "Light Frame", "EXPTIME": 10.0, "DATE-OBS": "2025-03-26T21:20:46"})
    h["NAXIS"], h["NAXIS1"], h["NAXIS2"] = 2, 64, 64
    assert normalize_header(h, path="x.fits", bias_level_adu=2048).bias_level_adu == 2048
    h["RPPOVSCN"] = 214.0
    meta = normalize_header(h, path="x.fits", bias_level_adu=2048, saturation_adu=60000)
    assert meta.bias_level_adu is None and meta.saturation_adu == 60000 - 214
    assert any("overscan was subtracted" in w for w in meta.warnings)
