"""Tests of rpp_tasks.inputs.frames: frame classification and session grouping."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from astropy.io import fits

from rpp_tasks.inputs.frames import FrameGroup, SessionPlan, classify_frame, group_session
from rpp_tasks.inputs.header import normalize_header
from rpp_tasks.inputs.reader import read_header

PATTERNS = {"bias": ["bias*", "offset*"], "dark": ["dark*"], "flat": ["flat*"]}
HUNTSMAN_KW = {
    "filter_aliases": {"g_band": "g", "UNKNOWN": "Clear"},
    "default_band": "Clear",
    "read_noise_e": 2.4,
    "saturation_adu": 4094,
}


def _meta(**cards):
    h = fits.Header()
    h["NAXIS"], h["NAXIS1"], h["NAXIS2"] = 2, 10, 10
    for k, v in cards.items():
        h[k] = v
    return normalize_header(h, required=())


# ----------------------------------------------------------------------------------------------
# classify_frame
# ----------------------------------------------------------------------------------------------
def test_header_calibration_type_is_trusted_over_the_file_name():
    assert (
        classify_frame(_meta(IMAGETYP="Bias Frame"), "flat_001.fits", patterns=PATTERNS) == "bias"
    )
    assert (
        classify_frame(_meta(IMAGETYP="Dark Frame"), "Light_001.fits", patterns=PATTERNS) == "dark"
    )
    assert classify_frame(_meta(IMAGETYP="FLAT"), "whatever.fit", patterns=PATTERNS) == "flat"


def test_pattern_overrides_a_light_or_missing_type():
    assert (
        classify_frame(_meta(IMAGETYP="Light Frame"), "/n/FLAT_g_001.FITS", patterns=PATTERNS)
        == "flat"
    )
    assert classify_frame(_meta(), "Offset_0001.fit", patterns=PATTERNS) == "bias"
    assert classify_frame(_meta(), "m31_001.fit", patterns=PATTERNS) == "unknown"
    assert classify_frame(_meta(IMAGETYP="LIGHT"), "m31_001.fit", patterns=PATTERNS) == "science"
    # without patterns the name means nothing
    assert (
        classify_frame(_meta(IMAGETYP="Light Frame"), "flat_001.fits", patterns=None) == "science"
    )


def test_object_or_field_naming_a_flat_overrides_light():
    assert classify_frame(_meta(IMAGETYP="Light Frame", FIELD="FlatDither00"), "x.fits") == "flat"
    assert classify_frame(_meta(IMAGETYP="LIGHT", OBJECT="SkyFlat V"), "x.fits") == "flat"
    assert classify_frame(_meta(IMAGETYP="LIGHT", OBJECT="twilight flat"), "x.fits") == "flat"
    assert classify_frame(_meta(OBJECT="Bias"), "x.fits") == "bias"
    # object names are not trusted for darks (real targets are called "Dark ...")
    assert (
        classify_frame(_meta(IMAGETYP="LIGHT", OBJECT="Dark Doodad Nebula"), "x.fits") == "science"
    )
    assert classify_frame(_meta(IMAGETYP="LIGHT", OBJECT="NGC 7023"), "x.fits") == "science"


def test_classify_accepts_imagetyp_strings():
    assert classify_frame("Flat Field", "a.fits") == "flat"
    assert classify_frame("science", "a.fits") == "science"
    assert classify_frame(None, "dark_5s.fits", patterns=PATTERNS) == "dark"
    with pytest.raises(ValueError, match="unknown frame kinds"):
        classify_frame("LIGHT", "a.fits", patterns={"flats": ["flat*"]})
    with pytest.raises(TypeError, match="FrameMeta, a str or None"):
        classify_frame(3, "a.fits")


def test_huntsman_raw_frames_classify(real_data):
    raw = real_data / "huntsman/raw"
    kinds = {}
    for name in ("bias_0.fits", "dark_0.fits", "flat_0.fits", "science_0.fits"):
        meta = normalize_header(read_header(raw / name)[0], **HUNTSMAN_KW)
        kinds[name] = classify_frame(meta, raw / name)  # no patterns: header + FIELD only
    assert kinds == {
        "bias_0.fits": "bias",
        "dark_0.fits": "dark",
        "flat_0.fits": "flat",
        "science_0.fits": "science",
    }


# ----------------------------------------------------------------------------------------------
# group_session
# ----------------------------------------------------------------------------------------------
def _frame(path, *, imagetyp, exptime, filt=None, binning=1, seed=0, date="2024-03-01T22:00:00"):
    rng = np.random.default_rng(seed)
    h = fits.Header()
    h["IMAGETYP"] = imagetyp
    h["EXPTIME"] = exptime
    h["DATE-OBS"] = date
    h["XBINNING"] = binning
    h["YBINNING"] = binning
    if filt is not None:
        h["FILTER"] = filt
    data = rng.normal(1000, 10, (16 // binning, 24 // binning)).astype(np.uint16)
    fits.PrimaryHDU(data=data, header=h).writeto(path)


@pytest.fixture
def mixed_session(tmp_path):
    s = tmp_path / "2024-03-01"
    s.mkdir()
    for i in range(3):
        _frame(s / f"bias_{i}.fits", imagetyp="Bias Frame", exptime=0.0, seed=i)
        _frame(s / f"dark_60_{i}.fits", imagetyp="Dark Frame", exptime=60.0, seed=10 + i)
        _frame(
            s / f"m42_V_{i}.fits",
            imagetyp="Light Frame",
            exptime=60.0,
            filt="Johnson V",
            seed=20 + i,
        )
        _frame(s / f"flat_V_{i}.fits", imagetyp="Light Frame", exptime=2.0, filt="V", seed=30 + i)
    _frame(s / "dark_120.fits", imagetyp="Dark Frame", exptime=120.0)
    _frame(s / "m42_B.fits", imagetyp="Light Frame", exptime=120.0, filt="B")
    _frame(s / "m42_V_bin2.fits", imagetyp="Light Frame", exptime=60.0, filt="V", binning=2)
    _frame(s / "bias_bin2.fits", imagetyp="Bias Frame", exptime=0.0, binning=2)
    (s / "session.yaml").write_text("observer: me\n")
    (s / "readme.txt").write_text("notes\n")
    (s / "broken.fits").write_text("not a FITS file\n")
    return s


def test_group_session_groups_by_the_calibration_keys(mixed_session):
    plan = group_session(
        mixed_session,
        normalize_kwargs={"filter_aliases": {"Johnson V": "V", "V": "V"}},
        patterns=PATTERNS,
    )
    labels = [g.label for g in plan.groups]
    assert labels == [
        "bias_1x1",
        "bias_2x2",
        "dark_60s_1x1",
        "dark_120s_1x1",
        "flat_V_1x1",
        "science_B_120s_1x1",
        "science_V_60s_1x1",
        "science_V_60s_2x2",
    ]
    by_label = {g.label: g for g in plan.groups}
    assert len(by_label["bias_1x1"].paths) == 3
    assert len(by_label["science_V_60s_1x1"].paths) == 3  # 'Johnson V' and 'V' are the same band
    assert by_label["flat_V_1x1"].paths == tuple(
        str(mixed_session / f"flat_V_{i}.fits") for i in range(3)
    )
    assert plan.counts == {
        "bias": 4,
        "dark": 4,
        "flat": 3,
        "science": 5,
        "unknown": 0,
        "rejected": 1,
    }
    assert plan.bands == ("B", "V")
    assert [r.path for r in plan.rejected] == [str(mixed_session / "broken.fits")]
    assert "not a FITS file" in plan.rejected[0].reason
    assert [os.path.basename(p) for p in plan.ignored] == ["readme.txt", "session.yaml"]
    flats = [m for m in plan.frames if m.imagetyp == "flat"]
    assert len(flats) == 3 and all("classified as flat" in m.warnings[-1] for m in flats)


def test_group_session_is_deterministic_and_round_trips_json(mixed_session):
    files = sorted(p for p in mixed_session.iterdir())
    a = group_session(files, patterns=PATTERNS)
    b = group_session(list(reversed(files)), patterns=PATTERNS)
    assert a.to_dict() == b.to_dict()
    text = json.dumps(a.to_dict(), sort_keys=True)
    back = SessionPlan.from_dict(json.loads(text))
    assert json.dumps(back.to_dict(), sort_keys=True) == text
    assert back.groups == a.groups
    assert back.paths("dark") == a.paths("dark")


def test_huntsman_folder_with_a_bad_file(real_data, tmp_path):
    session = tmp_path / "huntsman_night"
    session.mkdir()
    for name in ("bias_0.fits", "dark_0.fits", "flat_0.fits", "science_0.fits"):
        os.symlink(real_data / "huntsman/raw" / name, session / name)
    raw = (real_data / "huntsman/raw/science_0.fits").read_bytes()
    (session / "science_1.fits").write_bytes(raw[: len(raw) // 2])  # truncated transfer
    (session / "empty.fits").write_bytes(b"")
    shutil.copy(real_data / "panoptes/noheader.fits", session / "noheader.fits")
    plan = group_session(session, normalize_kwargs=HUNTSMAN_KW, patterns=PATTERNS)
    assert [(g.label, [os.path.basename(p) for p in g.paths]) for g in plan.groups] == [
        ("bias_1x1", ["bias_0.fits"]),
        ("dark_300s_1x1", ["dark_0.fits"]),
        ("flat_g_1x1", ["flat_0.fits"]),
        ("science_g_300s_1x1", ["science_0.fits"]),
    ]
    reasons = {os.path.basename(r.path): r.reason for r in plan.rejected}
    assert set(reasons) == {"science_1.fits", "empty.fits", "noheader.fits"}
    assert reasons["science_1.fits"].startswith("truncated FITS file")
    assert reasons["empty.fits"] == "empty file (zero bytes)"
    assert reasons["noheader.fits"].startswith("missing DATE-OBS")
    sci = next(m for m in plan.frames if m.imagetyp == "science")
    assert sci.wcs_status == "valid-sip-fixed" and sci.band == "g"


def test_group_session_uses_the_observatory_config(real_data):
    from rpp_tasks.config import find_config

    obs = find_config("seestar_s50")  # config/observatories/seestar_s50.yaml (RPP_CONFIG_DIR)
    plan = group_session([real_data / "seestar_s50"], obs)
    (group,) = plan.groups
    assert group.label == "science_Clear_10s_1x1" and len(group.paths) == 3
    meta = plan.frames[0]
    assert meta.shape == (960, 540)  # the header as read_frame will return it: 2x2 luminance
    assert meta.bayer_pattern == "GRBG"
    assert meta.pixel_scale_arcsec == pytest.approx(4.78, abs=0.05)


def test_frame_group_from_dict():
    g = FrameGroup(kind="dark", band=None, exptime_s=30.0, binning=(2, 2), paths=("a.fits",))
    assert FrameGroup.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    assert g.label == "dark_30s_2x2"
