"""Tests of FITS input (rpp_tasks.inputs.reader, amplifiers, bayer, header, wcs): real frames of
every layout, header conventions, WCS checks, bad inputs."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from rpp_tasks.exceptions import FrameRejected
from rpp_tasks.inputs.amplifiers import mosaic_amplifiers
from rpp_tasks.inputs.bayer import debayer_to_luminance
from rpp_tasks.inputs.header import FrameMeta, frame_stem, normalize_header, normalize_imagetyp
from rpp_tasks.inputs.reader import check_image, read_frame, read_header
from rpp_tasks.inputs.wcs import header_wcs

SEESTAR_NGC = "seestar_s50/Light_NGC7023_10.0s_IRCUT_20240730-224459.fit"
SEESTAR_M94 = "seestar_s50/Light_M94_10.0s_IRCUT_20250326-212046.fit"
LCO = "lco_sinistro_mef/mef_raw_test_frame.fits"
SAAO = "saao_1m/a8280271.fits"

# every real star-field / calibration frame: relative path -> shape after read_frame
REAL_FRAMES = {
    SEESTAR_NGC: (960, 540),  # GRBG -> 2x2 luminance
    SEESTAR_M94: (960, 540),
    "seestar_s50/Light_M94_10.0s_IRCUT_20250326-212057.fit": (960, 540),
    "huntsman/raw/science_0.fits": (800, 800),
    "huntsman/raw/bias_0.fits": (800, 800),
    "huntsman/raw/dark_0.fits": (800, 800),
    "huntsman/raw/flat_0.fits": (800, 800),
    "huntsman/calib/bias_14_Huntsman_2021-01-07.fits": (801, 801),
    "huntsman/calib/dark_14_Huntsman_2021-01-07.fits": (801, 801),
    "huntsman/calib/flat_14_Huntsman_g_band_2021-01-07.fits": (801, 801),
    "panoptes/solved.fits.fz": (350, 350),  # compressed, RGGB -> luminance
    "panoptes/unsolved.fits": (350, 350),
    "panoptes/pole.fits": (200, 200),  # no Bayer keyword in this cut-out
    "panoptes/noheader.fits": (200, 200),
    LCO: (1024, 1024),  # 4 amps of 512x512 after trimming
    "feder_observatory/sip-wcs.fit": (50, 100),
    "feder_observatory/thumbnail-image.fit.gz": (256, 256),
    SAAO: (520, 512),  # BIASSEC overscan subtracted, trimmed to TRIMSEC
}


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# real files
# ----------------------------------------------------------------------------------------------
def test_every_real_frame_reads_as_float32_2d_and_files_are_untouched(real_data):
    before = {rel: _sha256(real_data / rel) for rel in REAL_FRAMES}
    for rel, shape in REAL_FRAMES.items():
        frame = read_frame(real_data / rel)
        assert frame.data.dtype == np.float32, rel
        assert frame.data.shape == shape, rel
        assert np.isfinite(frame.data).all(), rel
        assert (frame.header["NAXIS2"], frame.header["NAXIS1"]) == shape, rel
        # headers written back by downstream stages must not rescale the float data
        assert "BZERO" not in frame.header and "BSCALE" not in frame.header, rel
        # no header "fix" leaks as a python warning: everything is in notes
    after = {rel: _sha256(real_data / rel) for rel in REAL_FRAMES}
    assert before == after


def test_reading_emits_no_python_warnings(real_data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for rel in ("huntsman/raw/science_0.fits", LCO, "panoptes/solved.fits.fz"):
            frame = read_frame(real_data / rel)
            normalize_header(frame.header, path=rel, required=())
            header_wcs(frame.header)


def test_bzero_applied_values_match_astropy(real_data):
    frame = read_frame(real_data / "huntsman/raw/science_0.fits")
    with fits.open(real_data / "huntsman/raw/science_0.fits") as hdul:
        ref = hdul[0].data.astype(np.float64)
    np.testing.assert_array_equal(frame.data, ref)
    assert frame.data.max() == 4094.0  # 12-bit data stored with BZERO=32768


def test_lco_sinistro_mef_is_overscan_subtracted_trimmed_and_mosaicked(real_data):
    path = real_data / LCO
    frame = read_frame(path)
    assert frame.data.shape == (1024, 1024)
    assert frame.hdu_index == 1
    assert frame.header["RPPNAMPS"] == 4
    assert "DATASEC" not in frame.header and "BIASSEC" not in frame.header
    assert frame.header["GAIN"] == pytest.approx(np.mean([6.42, 6.23, 6.27, 6.26]))
    assert frame.header["OBJECT"] == "2021 SO2"  # primary keywords kept
    with fits.open(path) as hdul:
        raw = [hdul[i].data.astype(np.float64) for i in range(1, 5)]
    over = [np.median(r[0:512, 519:540]) for r in raw]
    sky_raw = [np.median(r[0:512, 0:512]) for r in raw]
    assert min(over) > 2500  # raw overscan level ~2520-2580 ADU
    # each quadrant of the mosaic is its amp's sky minus its overscan level: the level is gone
    quads = [
        frame.data[:512, :512],
        frame.data[:512, 512:],
        frame.data[512:, :512],
        frame.data[512:, 512:],
    ]
    quad_medians = sorted(float(np.median(q)) for q in quads)
    expected = sorted(s - o for s, o in zip(sky_raw, over, strict=True))
    np.testing.assert_allclose(quad_medians, expected, atol=1.0)
    assert all(250 < m < 350 for m in quad_medians)
    # DETSEC orientation: pixels across the amp seams are continuous (sky + stars correlate),
    # whereas a wrongly flipped neighbour would not correlate
    d = frame.data.astype(np.float64)
    assert np.corrcoef(d[:, 511], d[:, 512])[0, 1] > 0.8
    assert abs(np.corrcoef(d[:, 511], d[::-1, 512])[0, 1]) < 0.2
    assert np.corrcoef(d[511, :], d[512, :])[0, 1] > 0.25
    assert abs(np.corrcoef(d[511, :], d[512, ::-1])[0, 1]) < 0.2
    assert any("overscan subtracted" in n for n in frame.notes)
    # the pointing WCS of the primary describes the mosaic
    wcs = header_wcs(frame.header)
    assert wcs.status == "valid"
    assert wcs.pixel_scale_arcsec == pytest.approx(0.778, abs=0.001)


def test_lsst_mef_master_reads_the_image_plane(real_data):
    path = real_data / "huntsman/calib/flat_14_Huntsman_g_band_2021-01-07.fits"
    frame = read_frame(path)
    assert frame.hdu_index == 1
    assert "tile-compressed" in frame.notes
    assert np.median(frame.data) == pytest.approx(1.0, abs=0.02)  # normalised master flat
    meta = normalize_header(frame.header, path=path)
    assert meta.imagetyp == "flat"  # OBSTYPE='flat' wins over the copied IMAGETYP='Light Frame'
    assert meta.filter_raw == "g_band"


def test_seestar_bayer_frame_becomes_half_resolution_luminance_with_binned_wcs(real_data):
    path = real_data / SEESTAR_NGC
    frame = read_frame(path)
    with fits.open(path) as hdul:
        raw = hdul[0].data.astype(np.float64)
        raw_header = hdul[0].header
    assert raw.shape == (1920, 1080)
    np.testing.assert_array_equal(frame.data, raw.reshape(960, 2, 540, 2).sum(axis=(1, 3)))
    assert frame.data.sum() == pytest.approx(raw.sum(), rel=1e-6)  # flux conserved
    assert frame.header["RPPDEBAY"] == "GRBG" and frame.header["RPPBIN"] == 2
    assert "bayer GRBG -> luminance 2x2 binned" in frame.notes
    check = header_wcs(frame.header)
    assert check.status == "valid"
    assert check.center_ra_deg == pytest.approx(315.4441, abs=1 / 3600)
    assert check.center_dec_deg == pytest.approx(68.1267, abs=1 / 3600)
    assert check.pixel_scale_arcsec == pytest.approx(2 * 2.374, abs=0.01)
    # a raw pixel and the super-pixel that contains it see the same sky: x' = (x - 0.5) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw_wcs = WCS(raw_header)
    for x, y in [(0.5, 0.5), (1000.5, 1800.5), (300.5, 77.5)]:
        ra0, dec0 = raw_wcs.pixel_to_world_values(x, y)
        ra1, dec1 = check.wcs.pixel_to_world_values((x - 0.5) / 2, (y - 0.5) / 2)
        assert abs((ra0 - ra1) * np.cos(np.radians(dec0))) * 3600 < 1e-3
        assert abs(dec0 - dec1) * 3600 < 1e-3
    meta = normalize_header(frame.header, path=path, read_noise_e=1.5, pixel_scale_arcsec=2.39)
    assert meta.bayer_pattern == "GRBG"
    assert meta.read_noise_e == pytest.approx(3.0)  # 4 pixels summed: 2 x read noise
    assert meta.shape == (960, 540)


def test_compressed_rggb_frame_sip_wcs_survives_binning(real_data):
    path = real_data / "panoptes/solved.fits.fz"
    frame = read_frame(path)
    assert "tile-compressed" in frame.notes
    assert frame.header["RPPDEBAY"] == "RGGB"
    check = header_wcs(frame.header)
    assert check.status == "valid"
    assert check.wcs.sip is not None
    assert check.center_ra_deg == pytest.approx(303.2064, abs=2 / 3600)
    assert check.center_dec_deg == pytest.approx(46.0174, abs=2 / 3600)
    with fits.open(path) as hdul, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy's 'datfix' note on the raw header
        raw_wcs = WCS(hdul[1].header)
    # corners (where SIP matters most) map to the same sky within 0.01 arcsec
    for x, y in [(0.5, 0.5), (698.5, 698.5), (0.5, 698.5), (420.5, 100.5)]:
        ra0, dec0 = raw_wcs.all_pix2world(x, y, 0)
        ra1, dec1 = check.wcs.all_pix2world((x - 0.5) / 2, (y - 0.5) / 2, 0)
        sep = np.hypot((ra0 - ra1) * np.cos(np.radians(dec0)), dec0 - dec1) * 3600
        assert sep < 0.01


def test_debayer_can_be_switched_off(real_data):
    frame = read_frame(real_data / "panoptes/unsolved.fits", debayer=False)
    assert frame.data.shape == (700, 700)
    assert "RPPDEBAY" not in frame.header


def test_noheader_frame_reads_but_cannot_be_normalised(real_data):
    path = real_data / "panoptes/noheader.fits"
    frame = read_frame(path)
    assert frame.data.shape == (200, 200)
    with pytest.raises(FrameRejected, match=r"noheader\.fits: \[check\] missing DATE-OBS"):
        normalize_header(frame.header, path=path)
    with pytest.raises(FrameRejected, match=r"noheader\.fits: \[check\] missing EXPTIME"):
        normalize_header(frame.header, path=path, required=("EXPTIME",))


def test_saao_header_sexagesimal_kelvin_and_date_plus_ut(real_data):
    path = real_data / SAAO
    meta = normalize_header(read_frame(path).header, path=path)
    assert meta.ra_deg == pytest.approx(15 * (22 + 4 / 60 + 8 / 3600))  # ' 22:04:08' is hours
    assert meta.ra_deg == pytest.approx(331.0334, abs=1e-3)  # header RA_OBS
    assert meta.dec_deg == pytest.approx(-(55 / 60 + 31 / 3600))
    assert meta.ccd_temp_c == pytest.approx(180.2 - 273.15)
    assert any("Kelvin" in w for w in meta.warnings)
    assert meta.date_obs == "2013-07-13T00:57:33.000"
    assert meta.mjd_obs == pytest.approx(56486 + (57 * 60 + 33) / 86400, abs=1e-8)
    assert meta.exptime_s == pytest.approx(150.04)
    assert meta.gain_e_per_adu == 1.9 and meta.read_noise_e == 5.0
    assert meta.imagetyp == "science"
    assert meta.telescope == "SAAO 1.0m"


def test_huntsman_headers(real_data):
    raw = real_data / "huntsman/raw"
    kw = {
        "filter_aliases": {"G_BAND": "g", "unknown": "Clear"},
        "read_noise_e": 2.4,
        "saturation_adu": 4094,
    }
    sci = normalize_header(
        read_header(raw / "science_0.fits")[0], path=raw / "science_0.fits", **kw
    )
    assert (sci.imagetyp, sci.band, sci.exptime_s) == ("science", "g", 300.0)
    assert sci.gain_e_per_adu == pytest.approx(1.1447445)  # EGAIN
    assert sci.read_noise_e == 2.4 and sci.saturation_adu == 4094  # from the camera config
    assert sci.ra_deg == pytest.approx(65.0) and sci.dec_deg == pytest.approx(
        -54.938056
    )  # RA-MNT/DEC-MNT
    assert sci.object == "DoradoGroup-p0p0"  # FIELD
    assert sci.wcs_status == "valid-sip-fixed"
    assert sci.pixel_scale_arcsec == pytest.approx(1.2597, abs=1e-3)
    bias = normalize_header(read_header(raw / "bias_0.fits")[0], **kw)
    assert bias.imagetyp == "bias"  # IMAGETYP='Dark Frame' with EXPTIME=1e-32
    assert bias.exptime_s == 0.0 and bias.band == "Clear"
    dark = normalize_header(read_header(raw / "dark_0.fits")[0], **kw)
    assert (dark.imagetyp, dark.exptime_s, dark.ccd_temp_c) == ("dark", 300.0, -1.5)
    flat = normalize_header(read_header(raw / "flat_0.fits")[0], **kw)
    assert flat.imagetyp == "science"  # the header says Light Frame; frames.classify_frame fixes it
    assert flat.wcs_status == "absent"  # CDELT/CRVAL without CTYPE


def test_constant_bias_is_legal_but_constant_science_is_not(real_data, tmp_path):
    frame = read_frame(real_data / "huntsman/raw/bias_0.fits")
    assert np.all(frame.data == 32.0)
    assert any("constant image" in n for n in frame.notes)
    with pytest.raises(
        FrameRejected, match=r"bias_0\.fits: \[check\] constant image .*32 ADU.* science"
    ):
        read_frame(real_data / "huntsman/raw/bias_0.fits", imagetyp="science")


def test_header_wcs_of_real_frames(real_data):
    sci = header_wcs(fits.getheader(real_data / "huntsman/raw/science_0.fits"))
    assert sci.status == "valid-sip-fixed"
    assert sci.wcs.sip is not None and sci.wcs.sip.a_order == 2
    assert abs(sci.center_ra_deg - 65.1621) * np.cos(np.radians(54.9358)) * 3600 < 1.0
    assert abs(sci.center_dec_deg + 54.9358) * 3600 < 1.0
    assert sci.footprint.shape == (4, 2)
    assert sci.pixel_scale_arcsec == pytest.approx(1.26, abs=0.01)
    assert json.loads(json.dumps(sci.to_dict()))["status"] == "valid-sip-fixed"
    for rel, (ra, dec, scale) in {
        "panoptes/pole.fits": (35.2203, 80.5673, 10.318),
        "feder_observatory/sip-wcs.fit": (280.5461, 0.1126, 0.558),
        "feder_observatory/thumbnail-image.fit.gz": (135.0211, 49.6087, 0.563),
    }.items():
        c = header_wcs(read_frame(real_data / rel).header)
        assert c.status == "valid", rel
        assert c.center_ra_deg == pytest.approx(ra, abs=2e-4), rel
        assert c.center_dec_deg == pytest.approx(dec, abs=2e-4), rel
        assert c.pixel_scale_arcsec == pytest.approx(scale, abs=2e-3), rel
    absent = header_wcs(read_frame(real_data / SEESTAR_M94).header)
    assert absent.status == "absent" and absent.wcs is None


def test_check_json_is_the_normalised_header_the_pipeline_writes(real_data, tmp_path):
    """The calibrate stage of a session writes ``frames/<stem>/check.json``: the `FrameMeta` of
    `adapters.read_raw` (config fallbacks and filter aliases applied) plus the read notes."""
    from rpp_tasks.config import find_config
    from rpp_tasks.session import adapters, lifecycle

    obs = find_config("huntsman")  # gain 1.145, RN 2.4, 4094 ADU, 1.26"/px, g_band -> g
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(real_data / "huntsman/raw/science_0.fits", raw)
    _, _, out = adapters.read_raw(raw / "science_0.fits", obs)
    session = lifecycle.open_session(raw, obs, work_root=tmp_path / "work")
    lifecycle.run_stage(session, obs, ("masters", "calibrate"), workers=1)
    written = json.loads((session.frame_dir("science_0") / "check.json").read_text())
    assert written == out
    assert written["band"] == "g" and written["wcs_status"] == "valid-sip-fixed"
    meta = FrameMeta.from_dict({k: v for k, v in written.items() if k != "notes"})
    assert meta.binning == (1, 1) and meta.shape == (800, 800)


# ----------------------------------------------------------------------------------------------
# bad inputs (made in tmp_path)
# ----------------------------------------------------------------------------------------------
def _write(path, data, **cards):
    hdr = fits.Header()
    for k, v in cards.items():
        hdr[k.replace("_", "-") if k in ("DATE_OBS", "CCD_TEMP") else k] = v
    fits.PrimaryHDU(data=data, header=hdr).writeto(path)
    return path


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.fits"
    p.write_bytes(b"")
    with pytest.raises(FrameRejected, match=r"empty\.fits: \[check\] empty file \(zero bytes\)"):
        read_frame(p)


def test_truncated_fits(real_data, tmp_path):
    raw = (real_data / "huntsman/raw/science_0.fits").read_bytes()
    p = tmp_path / "half.fits"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FrameRejected, match=r"half\.fits: \[check\] truncated FITS file"):
        read_frame(p)
    with pytest.raises(FrameRejected, match=r"half\.fits: \[check\] truncated FITS file"):
        read_header(p)


def test_text_file_named_fits(tmp_path):
    p = tmp_path / "notes.fits"
    p.write_text("observing log: clouds after 2am\n")
    with pytest.raises(FrameRejected, match=r"notes\.fits: \[check\] not a FITS file"):
        read_frame(p)


def test_missing_file(tmp_path):
    with pytest.raises(FrameRejected, match=r"nope\.fits: \[check\] file does not exist"):
        read_frame(tmp_path / "nope.fits")


def test_table_only_fits(tmp_path):
    p = tmp_path / "table.fits"
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name="flux", format="E", array=np.arange(3.0))]
    )
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(p)
    with pytest.raises(
        FrameRejected, match=r"table\.fits: \[check\] no image data in any HDU.*BinTableHDU"
    ):
        read_frame(p)


def test_one_d_data(tmp_path):
    p = _write(tmp_path / "spec.fits", np.arange(100, dtype=np.float32))
    with pytest.raises(FrameRejected, match=r"spec\.fits: \[check\] 1-D data"):
        read_frame(p)
    p2 = _write(tmp_path / "row.fits", np.arange(100, dtype=np.float32)[None, :])
    with pytest.raises(FrameRejected, match=r"row\.fits: \[check\] 1-D data"):
        read_frame(p2)


def test_all_nan_image(tmp_path):
    p = _write(
        tmp_path / "nan.fits", np.full((20, 30), np.nan, dtype=np.float32), IMAGETYP="Light Frame"
    )
    with pytest.raises(FrameRejected, match=r"nan\.fits: \[check\] image has no finite pixel"):
        read_frame(p)


def test_constant_science_image(tmp_path):
    p = _write(tmp_path / "const.fits", np.full((20, 30), 100, dtype=np.int16), IMAGETYP="LIGHT")
    with pytest.raises(
        FrameRejected, match=r"const\.fits: \[check\] constant image \(every pixel = 100 ADU\)"
    ):
        read_frame(p)
    p2 = _write(
        tmp_path / "cbias.fits", np.full((20, 30), 100, dtype=np.int16), IMAGETYP="Bias Frame"
    )
    assert read_frame(p2).data.mean() == 100.0
    assert read_frame(p, allow_constant=True).data.shape == (20, 30)


def test_missing_exptime_and_date(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(100, 5, (10, 10)).astype(np.float32)
    p = _write(tmp_path / "noexp.fits", data, DATE_OBS="2024-01-01T00:00:00")
    with pytest.raises(FrameRejected, match=r"noexp\.fits: \[check\] missing EXPTIME"):
        normalize_header(read_frame(p).header, path=p)
    p2 = _write(tmp_path / "nodate.fits", data, EXPTIME=30.0)
    with pytest.raises(FrameRejected, match=r"nodate\.fits: \[check\] missing DATE-OBS"):
        normalize_header(read_frame(p2).header, path=p2)


def test_non_ascii_header_bytes(real_data, tmp_path):
    raw = bytearray((real_data / "feder_observatory/sip-wcs.fit").read_bytes())
    i = raw.find(b"OBSERVER= 'Matt Craig'")
    assert i > 0
    raw[i + 11 : i + 15] = "Mätt".encode("latin-1")  # same length: 4 bytes
    p = tmp_path / "latin1.fits"
    p.write_bytes(bytes(raw))
    with pytest.raises(
        FrameRejected, match=r"latin1\.fits: \[check\] header contains non-ASCII bytes"
    ):
        read_frame(p)


def test_non_ascii_bytes_in_a_comment_are_noted_not_rejected(real_data, tmp_path):
    raw = (real_data / "feder_observatory/sip-wcs.fit").read_bytes()
    assert raw.count(b"setpoint in C ") == 1
    p = tmp_path / "degree.fits"
    p.write_bytes(raw.replace(b"setpoint in C ", "setpoint in °C".encode("latin-1")))
    frame = read_frame(p)
    assert any("non-ASCII bytes in the comments of SET-TEMP" in n for n in frame.notes)
    assert frame.header["SET-TEMP"] == pytest.approx(-18.9)


def test_non_ascii_value_names_the_keyword(real_data, tmp_path):
    raw = bytearray((real_data / "feder_observatory/sip-wcs.fit").read_bytes())
    i = raw.find(b"OBSERVER= 'Matt Craig'")
    raw[i + 11 : i + 15] = "Mätt".encode("latin-1")
    p = tmp_path / "latin1.fits"
    p.write_bytes(bytes(raw))
    with pytest.raises(FrameRejected, match=r"non-ASCII bytes in OBSERVER \(value\)"):
        read_header(p)


def test_valid_fits_with_trailing_bytes_is_read(real_data, tmp_path):
    # issue 12: was rejected as "header contains non-ASCII bytes" (astropy parses the tail as one
    # more header and warns about its bytes)
    good = (real_data / "feder_observatory/sip-wcs.fit").read_bytes()
    p = tmp_path / "trailing.fit"
    p.write_bytes(good + b"\x00\xff garbage from a resumed copy \xfe" * 40)
    frame = read_frame(p)
    assert frame.data.shape == (50, 100)
    assert any("bytes after the last HDU are not FITS: ignored" in n for n in frame.notes)
    np.testing.assert_array_equal(
        frame.data, read_frame(real_data / "feder_observatory/sip-wcs.fit").data
    )


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        # gzip magic + garbage: zlib.error escaped _check_file before issue 12
        ("magic.fits.gz", lambda good: b"\x1f\x8b\x08\x00" + bytes(range(256)) * 8, "gzip"),
        ("half.fit.gz", lambda good: good[: len(good) // 2], "FITS file"),
        (
            "flipped.fit.gz",
            lambda good: bytes(
                b ^ 0x55 if 3000 < i < len(good) - 50 and i % 13 == 0 else b
                for i, b in enumerate(good)
            ),
            "zlib.error",
        ),
        ("text.fits.gz", lambda good: gzip.compress(b"observing log\n" * 50), "not a FITS file"),
    ],
)
def test_corrupt_gzip_files_are_rejected_with_the_reason(real_data, tmp_path, name, make, reason):
    good = (real_data / "feder_observatory/thumbnail-image.fit.gz").read_bytes()
    p = tmp_path / name
    p.write_bytes(make(good))
    for read in (read_header, read_frame):
        with pytest.raises(FrameRejected) as exc:
            read(p)
        assert exc.value.path == str(p) and exc.value.stage == "check"
        assert reason in exc.value.reason, exc.value.reason


def test_corrupt_tile_compressed_pixels_are_rejected(real_data, tmp_path):
    raw = bytearray((real_data / "panoptes/solved.fits.fz").read_bytes())
    for i in range(40000, 500000, 7):
        raw[i] = (raw[i] * 31 + 7) % 256
    p = tmp_path / "corrupt.fits.fz"
    p.write_bytes(bytes(raw))
    with pytest.raises(FrameRejected, match=r"corrupt\.fits\.fz: \[check\] cannot read the pixels"):
        read_frame(p)


def test_check_image_rules():
    rng = np.random.default_rng(3)
    ok = check_image(rng.normal(0, 1, (5, 5)), "science")
    assert not ok.constant and ok.n_nonfinite == 0
    part = np.ones((4, 4))
    part[0, 0] = np.nan
    c = check_image(part, "bias")
    assert c.constant and c.n_nonfinite == 1 and c.median_adu == 1.0
    with pytest.raises(FrameRejected, match="constant image"):
        check_image(part, "dark")
    with pytest.raises(FrameRejected, match="3-D data"):
        check_image(np.zeros((2, 3, 4)))


# ----------------------------------------------------------------------------------------------
# header conventions (synthetic headers)
# ----------------------------------------------------------------------------------------------
def _hdr(**cards):
    h = fits.Header()
    h["NAXIS"], h["NAXIS1"], h["NAXIS2"] = 2, 40, 30
    for k, v in cards.items():
        h[k] = v
    return h


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("Light Frame", "science"),
        ("LIGHT", "science"),
        ("object", "science"),
        ("science", "science"),
        ("Bias Frame", "bias"),
        ("Offset", "bias"),
        ("zero", "bias"),
        ("Dark Frame", "dark"),
        ("Flat Field", "flat"),
        ("FLAT", "flat"),
        ("skyflat", "flat"),
        ("twilight", "flat"),
        ("Tricolour", "unknown"),
    ],
)
def test_imagetyp_values(value, kind):
    assert normalize_imagetyp(value)[0] == kind
    for key in ("IMAGETYP", "FRAME", "OBSTYPE", "HIERARCH IMAGETYPE"):
        assert normalize_header(_hdr(**{key: value}), required=()).imagetyp == kind


def test_date_forms():
    base = {"EXPTIME": 1.0}
    iso = normalize_header(_hdr(**base, **{"DATE-OBS": "2024-07-31T02:44:45.267817"}))
    assert iso.date_obs == "2024-07-31T02:44:45.268"
    assert iso.mjd_obs == pytest.approx(60522.114412822, abs=1e-8)
    nofrac = normalize_header(_hdr(**base, **{"DATE-OBS": "2024-07-31T02:44:45"}))
    assert nofrac.mjd_obs == pytest.approx(60522.11441, abs=1e-5)
    timeobs = normalize_header(_hdr(**base, **{"DATE-OBS": "2024-07-31", "TIME-OBS": "02:44:45"}))
    assert timeobs.mjd_obs == nofrac.mjd_obs
    mjd = normalize_header(_hdr(**base, **{"MJD-OBS": 60522.5}))
    assert mjd.date_obs == "2024-07-31T12:00:00.000"
    jd = normalize_header(_hdr(**base, JD=2460523.0))
    assert jd.mjd_obs == pytest.approx(60522.5)
    dateonly = normalize_header(_hdr(**base, **{"DATE-OBS": "2024-07-31"}))
    assert dateonly.mjd_obs == 60522.0 and any("no time of day" in w for w in dateonly.warnings)


def test_exposure_keywords_and_placeholder():
    d = {"DATE-OBS": "2024-01-01T00:00:00"}
    assert normalize_header(_hdr(**d, EXPOSURE=12.5)).exptime_s == 12.5
    assert normalize_header(_hdr(**d, EXP_TIME=3)).exptime_s == 3.0
    bias = normalize_header(_hdr(**d, EXPTIME=1e-32, IMAGETYP="Dark Frame"))
    assert bias.exptime_s == 0.0 and bias.imagetyp == "bias"


def test_pointing_forms():
    d = {"DATE-OBS": "2024-01-01T00:00:00", "EXPTIME": 1}
    deg = normalize_header(_hdr(**d, RA=315.5, DEC=68.2))
    assert (deg.ra_deg, deg.dec_deg) == (315.5, 68.2)
    maxim = normalize_header(_hdr(**d, OBJCTRA="09 02 20", OBJCTDEC="+49 49 19"))
    assert maxim.ra_deg == pytest.approx(135.5833333) and maxim.dec_deg == pytest.approx(49.8219444)
    lco = normalize_header(_hdr(**d, RA="19:09:17.959", DEC="+59:29:38.15"))
    assert lco.ra_deg == pytest.approx(287.3248292) and lco.dec_deg == pytest.approx(59.4939306)
    neg = normalize_header(_hdr(**d, RA="00:30:00", DEC="-00:30:00"))
    assert neg.ra_deg == pytest.approx(7.5) and neg.dec_deg == pytest.approx(-0.5)
    mount = normalize_header(_hdr(**d, **{"RA-MNT": 10.0, "DEC-MNT": -20.0}))
    assert (mount.ra_deg, mount.dec_deg) == (10.0, -20.0)
    bad = normalize_header(_hdr(**d, RA="junk", DEC="junk"))
    assert bad.ra_deg is None and any("unusable pointing" in w for w in bad.warnings)


def test_detector_keywords_and_config_fallbacks():
    d = {"DATE-OBS": "2024-01-01T00:00:00", "EXPTIME": 1}
    m = normalize_header(
        _hdr(
            **d,
            GAIN=1.6,
            READNOIS=9.0,
            DATAMAX=60000,
            XBINNING=2,
            YBINNING=2,
            **{"CCD-TEMP": -10.0},
        ),
        gain_e_per_adu=5.0,
        read_noise_e=1.0,
    )
    assert (m.gain_e_per_adu, m.read_noise_e, m.saturation_adu) == (1.6, 9.0, 60000.0)
    assert m.binning == (2, 2) and m.ccd_temp_c == -10.0
    zwo = normalize_header(
        _hdr(**d, GAIN=80), gain_e_per_adu=1.0, read_noise_e=1.5, saturation_adu=65500
    )
    assert zwo.gain_e_per_adu == 1.0 and any("GAIN=80" in w for w in zwo.warnings)
    assert (zwo.read_noise_e, zwo.saturation_adu) == (1.5, 65500.0)
    assert normalize_header(_hdr(**d, BINNING="3x3")).binning == (3, 3)
    assert normalize_header(_hdr(**d, CCDSUM="2 1")).binning == (2, 1)
    kelvin = normalize_header(_hdr(**d, **{"CCD-TEMP": 253.15}))
    assert kelvin.ccd_temp_c == pytest.approx(-20.0)
    none = normalize_header(_hdr(**d))
    assert np.isnan(none.gain_e_per_adu) and none.to_dict()["gain_e_per_adu"] is None


def test_filter_aliases_case_insensitive_and_defaults():
    d = {"DATE-OBS": "2024-01-01T00:00:00", "EXPTIME": 1}
    aliases = {"Johnson V": "V", "L": "Clear"}
    assert normalize_header(_hdr(**d, FILTER="johnson v "), filter_aliases=aliases).band == "V"
    assert normalize_header(_hdr(**d), filter_aliases=aliases, default_band="Clear").band == "Clear"
    other = normalize_header(_hdr(**d, FILTER="Ha"), filter_aliases=aliases, default_band="Clear")
    assert other.band == "Ha" and any("not in filter_aliases" in w for w in other.warnings)
    osc = normalize_header(_hdr(**d, FILTER="RGGB"), default_band="Clear")
    assert osc.band == "Clear" and osc.bayer_pattern == "RGGB"


def test_filter_alias_case_never_changes_the_band_and_numeric_codes_are_not_bands():
    """qa12: the demo config's Johnson ``R`` alias caught the Feder frame's Sloan ``r`` (band 'R');
    the SAAO frame's ``FILTERS = 48`` (a wheel code "10*A+B") became band '48'."""
    d = {"DATE-OBS": "2024-01-01T00:00:00", "EXPTIME": 1}
    aliases = {"R": "R", "Lum": "Clear", "g_band": "g"}

    def norm(f):
        return normalize_header(_hdr(**d, FILTER=f), filter_aliases=aliases, default_band="Clear")

    assert norm("R").band == "R"
    assert norm("r").band == "r"  # Sloan r is not Johnson R
    assert norm("LUM").band == "Clear" and norm("G_BAND").band == "g"  # case-insensitive still
    code = norm("48")
    assert code.band == "Clear" and code.filter_raw == "48"
    assert any("numeric wheel code" in w for w in code.warnings)
    named = normalize_header(_hdr(**d, FILTER="48"), filter_aliases={"48": "V"})
    assert named.band == "V"
    assert normalize_header(_hdr(**d, FILTER="48")).band == "48"  # no default band: kept


def test_saao_numeric_filter_code_gets_the_default_band(real_data):
    meta = normalize_header(read_frame(real_data / SAAO).header, default_band="Clear")
    assert meta.filter_raw == "48" and meta.band == "Clear"


def test_frame_meta_json_round_trip(real_data):
    meta = normalize_header(read_frame(real_data / SAAO).header, path="x.fits")
    assert np.isnan(meta.saturation_adu)  # no SATURATE and no config: NaN, JSON null
    back = FrameMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert back.to_dict() == meta.to_dict()
    assert back.binning == meta.binning and np.isnan(back.saturation_adu)


# ----------------------------------------------------------------------------------------------
# WCS checks (synthetic headers)
# ----------------------------------------------------------------------------------------------
def _tan(**over):
    h = _hdr(
        CTYPE1="RA---TAN",
        CTYPE2="DEC--TAN",
        CRPIX1=20.5,
        CRPIX2=15.5,
        CRVAL1=150.0,
        CRVAL2=2.0,
        CD1_1=-1e-4,
        CD1_2=0.0,
        CD2_1=0.0,
        CD2_2=1e-4,
    )
    for k, v in over.items():
        h[k] = v
    return h


def test_header_wcs_valid_and_broken():
    ok = header_wcs(_tan())
    assert ok.status == "valid"
    assert ok.center_ra_deg == pytest.approx(150.0) and ok.center_dec_deg == pytest.approx(2.0)
    assert ok.pixel_scale_arcsec == pytest.approx(0.36)
    singular = header_wcs(_tan(CD1_1=1e-4, CD1_2=1e-4, CD2_1=1e-4, CD2_2=1e-4))
    assert singular.status.startswith("invalid: singular") and singular.wcs is None
    zero = header_wcs(_tan(CD1_1=0.0, CD2_2=0.0))
    assert zero.status.startswith("invalid")
    text = header_wcs(_tan(CRVAL1="nan"))
    assert text.status == "invalid: CRVAL1='nan' is not a number"
    unparsable = fits.Header.fromstring(
        _tan()
        .tostring()
        .replace("CRVAL1  =                150.0", "CRVAL1  =                  NaN")
    )
    assert header_wcs(unparsable).status.startswith("invalid: unparsable WCS card")
    linear = header_wcs(_tan(CTYPE1="LINEAR", CTYPE2="LINEAR"))
    assert linear.status.startswith("invalid: not a celestial WCS")
    assert header_wcs(_hdr()).status == "absent"
    huge = header_wcs(_tan(CD1_1=-1.0, CD2_2=1.0))
    assert huge.status.startswith("invalid: implausible pixel scale")


def test_header_wcs_does_not_modify_its_input(real_data):
    header = fits.getheader(real_data / "huntsman/raw/science_0.fits")
    before = header.tostring()
    assert header_wcs(header).status == "valid-sip-fixed"
    assert header.tostring() == before


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------
def test_debayer_to_luminance_sums_superpixels():
    data = np.arange(6 * 8, dtype=np.uint16).reshape(6, 8)
    lum = debayer_to_luminance(data, "rggb")
    assert lum.shape == (3, 4) and lum.dtype == np.float32
    assert lum[0, 0] == 0 + 1 + 8 + 9
    assert lum.sum() == data.sum()
    odd = debayer_to_luminance(np.ones((5, 7)), "GBRG")
    assert odd.shape == (2, 3) and np.all(odd == 4)
    with pytest.raises(ValueError, match="pattern must be one of"):
        debayer_to_luminance(data, "RGB")
    with pytest.raises(ValueError, match="2-D"):
        debayer_to_luminance(np.ones(8), "RGGB")


def test_debayer_noise_is_twice_the_read_noise():
    rng = np.random.default_rng(42)
    raw = rng.normal(1000.0, 5.0, (400, 400))
    lum = debayer_to_luminance(raw, "GRBG")
    assert np.std(lum) == pytest.approx(10.0, rel=0.02)
    # no interpolation: neighbouring output pixels stay uncorrelated
    assert abs(np.corrcoef(lum[:, :-1].ravel(), lum[:, 1:].ravel())[0, 1]) < 0.02


def _amp(level, sky, detsec, seed):
    rng = np.random.default_rng(seed)
    data = np.full((12, 14), level, dtype=np.float64) + rng.normal(0, 0.5, (12, 14))
    data[0:10, 0:10] += sky
    hdr = fits.Header({"DATASEC": "[1:10,1:10]", "BIASSEC": "[12:14,1:10]"})
    if detsec:
        hdr["DETSEC"] = detsec
    return data, hdr


def test_mosaic_amplifiers_follows_detsec_with_flips():
    amps = [
        _amp(1000, 10, "[1:10,1:10]", 0),
        _amp(2000, 20, "[20:11,1:10]", 1),
        _amp(3000, 30, "[1:10,20:11]", 2),
        _amp(4000, 40, "[20:11,20:11]", 3),
    ]
    ramp = np.arange(10, dtype=np.float64)[None, :] * np.ones((10, 1))
    amps[1][0][0:10, 0:10] += ramp  # gradient that must come out mirrored in x
    image, notes = mosaic_amplifiers(amps)
    assert image.shape == (20, 20)
    np.testing.assert_allclose(np.median(image[:10, :10]), 10, atol=0.5)
    np.testing.assert_allclose(np.median(image[:10, 10:]), 20 + 4.5, atol=0.6)
    np.testing.assert_allclose(np.median(image[10:, :10]), 30, atol=0.5)
    np.testing.assert_allclose(np.median(image[10:, 10:]), 40, atol=0.5)
    # amp 2 is flipped in x: its first data column lands at the right edge
    assert np.mean(image[:10, 19]) < np.mean(image[:10, 10]) - 7
    assert "by DETSEC" in notes[1]


def test_mosaic_amplifiers_without_detsec_left_to_right_and_row_mode():
    amps = [_amp(500, 1, None, 4), _amp(600, 2, None, 5)]
    amps[0][0][3, :] += 50  # a bias jump on one row, overscan included
    image, notes = mosaic_amplifiers(amps, overscan="row")
    assert image.shape == (10, 20)
    assert abs(np.median(image[3, :10]) - 1) < 1.0  # the row-wise overscan removed the jump
    assert "left to right" in notes[1]
    with pytest.raises(ValueError, match="overscan must be"):
        mosaic_amplifiers(amps, overscan="mean")


def test_frame_stem():
    assert frame_stem("/x/solved.fits.fz") == "solved"
    assert frame_stem("thumb.fit.gz") == "thumb"
    assert frame_stem("Light_M94_10.0s.fit") == "Light_M94_10.0s"
    assert re.fullmatch(r"a8280271", frame_stem("a8280271.FITS"))


def test_read_header_matches_read_frame_without_reading_pixels(real_data):
    for rel in (
        LCO,
        SEESTAR_NGC,
        "panoptes/solved.fits.fz",
        "huntsman/calib/dark_14_Huntsman_2021-01-07.fits",
    ):
        header, idx, _ = read_header(real_data / rel)
        frame = read_frame(real_data / rel)
        assert (header["NAXIS2"], header["NAXIS1"]) == frame.data.shape, rel
        assert idx == frame.hdu_index, rel
        assert header_wcs(header).status == header_wcs(frame.header).status, rel


def test_degenerate_shapes_are_named(tmp_path):
    def write(name, data):
        h = fits.Header()
        h["EXPTIME"], h["DATE-OBS"] = 1.0, "2025-01-15T22:00:00"
        fits.PrimaryHDU(data, header=h).writeto(tmp_path / name)
        return tmp_path / name

    rng = np.random.default_rng(0)
    one = write("one.fits", np.array([[500]], np.uint16))
    for read in (read_header, read_frame):
        with pytest.raises(FrameRejected, match=r"a single pixel \(1x1 image\)"):
            read(one)
    cube1 = write("cube1.fits", rng.normal(100, 5, (1, 20, 30)).astype(np.float32))
    assert read_header(cube1)[0]["NAXIS1"] == 30 and read_frame(cube1).data.shape == (20, 30)
    cube5 = write("cube5.fits", rng.normal(100, 5, (5, 20, 30)).astype(np.float32))
    for read in (read_header, read_frame):
        with pytest.raises(FrameRejected, match=r"3-D data \(5, 20, 30\): expected a 2-D image"):
            read(cube5)


def test_bzip2_files_are_read_and_corrupt_ones_rejected(real_data, tmp_path):
    import bz2

    good = (real_data / "feder_observatory/sip-wcs.fit").read_bytes()
    p = tmp_path / "sip.fits.bz2"
    p.write_bytes(bz2.compress(good))
    assert read_frame(p).data.shape == (50, 100)  # was "not a FITS file": bzip2 magic unknown
    bad = tmp_path / "bad.fits.bz2"
    bad.write_bytes(b"BZh91AY&SY" + bytes(range(256)))
    with pytest.raises(FrameRejected, match=r"bad\.fits\.bz2: \[check\] corrupt bzip2 file"):
        read_header(bad)


# ----------------------------------------------------------------------------------------------
# single-HDU frames with BIASSEC / TRIMSEC (one-amplifier overscan and trim)
# ----------------------------------------------------------------------------------------------
def _overscan_frame(path, *, pedestal=500.0, sky=100.0, seed=0, **cards):
    """30x40 (ny x nx) frame: overscan columns 33-38 at ``pedestal``, data section [3:30,2:29]
    at ``pedestal + sky``, a TAN WCS; noise 2 ADU."""
    rng = np.random.default_rng(seed)
    data = pedestal + rng.normal(0.0, 2.0, (30, 40))
    data[1:29, 2:30] += sky
    hdr = {
        "BIASSEC": "[33:38,1:30]",
        "TRIMSEC": "[3:30,2:29]",
        "CTYPE1": "RA---TAN",
        "CTYPE2": "DEC--TAN",
        "CRVAL1": 150.0,
        "CRVAL2": 2.0,
        "CRPIX1": 20.0,
        "CRPIX2": 15.0,
        "CDELT1": -1e-4,
        "CDELT2": 1e-4,
        "LTV1": 5.0,
        "EXPTIME": 10.0,
        "DATE-OBS": "2024-05-01T22:00:00",
        "MJD-OBS": 60431.916667,
        "IMAGETYP": "object",
    }
    hdr.update(cards)
    fits.PrimaryHDU(data=data.astype(np.float32), header=fits.Header(hdr)).writeto(path)
    return path


def test_single_hdu_frame_with_biassec_is_overscan_subtracted_and_trimmed(tmp_path):
    path = _overscan_frame(tmp_path / "ovs.fits")
    frame = read_frame(path)
    assert frame.data.shape == (28, 28)  # TRIMSEC [3:30,2:29]
    assert np.median(frame.data) == pytest.approx(100.0, abs=0.5)  # 500 ADU pedestal gone
    assert frame.header["RPPOVSCN"] == pytest.approx(500.0, abs=0.3)
    assert frame.header["CRPIX1"] == 18.0 and frame.header["CRPIX2"] == 14.0
    assert frame.header["LTV1"] == 3.0 and "LTV2" not in frame.header
    for key in ("BIASSEC", "TRIMSEC", "DATASEC"):
        assert key not in frame.header
    assert "ADU subtracted (median), trimmed to 28x28" in "".join(frame.header["HISTORY"])
    assert any("trimmed to 28x28" in n for n in frame.notes)
    # the same sky at the same pixel: trimmed (x, y) is raw (x + 2, y + 1)
    with fits.open(path) as hdul:
        raw_wcs = WCS(hdul[0].header)
    sky_raw = raw_wcs.pixel_to_world_values(12.0, 7.0)
    sky_new = WCS(frame.header).pixel_to_world_values(10.0, 6.0)
    np.testing.assert_allclose(sky_new, sky_raw, atol=1e-10)
    # grouping sees the trimmed shape without pixels; the saturation level drops by the pedestal
    header, _, _ = read_header(path)
    assert (header["NAXIS2"], header["NAXIS1"]) == (28, 28)
    assert normalize_header(frame.header, saturation_adu=65535).saturation_adu == pytest.approx(
        65535 - frame.header["RPPOVSCN"]
    )
    # row mode removes a bias jump on one row
    jump = _overscan_frame(tmp_path / "jump.fits", seed=1)
    with fits.open(jump, mode="update") as hdul:
        hdul[0].data[10, :] += 40.0
    rows = read_frame(jump, overscan="row").data
    assert np.median(rows[9, :]) == pytest.approx(100.0, abs=1.5)  # raw row 10 is trimmed row 9
    assert np.median(read_frame(jump).data[9, :]) == pytest.approx(140.0, abs=1.5)


@pytest.mark.parametrize(
    ("cards", "problem"),
    [
        ({"BIASSEC": "[33-38,1:30]"}, "cannot parse BIASSEC"),
        ({"BIASSEC": "[33:45,1:30]"}, "outside the 40x30 image"),
        ({"TRIMSEC": "[1:35,1:30]"}, "overlaps TRIMSEC"),
        ({"TRIMSEC": "[30:3,2:29]"}, "reversed TRIMSEC"),
        ({"TRIMSEC": ""}, "BIASSEC without TRIMSEC or DATASEC"),
    ],
)
def test_single_hdu_frame_with_unusable_sections_is_left_as_is(tmp_path, caplog, cards, problem):
    path = _overscan_frame(tmp_path / "bad.fits", **cards)
    with caplog.at_level("WARNING", logger="rpp_tasks.inputs.reader"):
        frames = [read_frame(path), read_frame(path)]
    for frame in frames:
        assert frame.data.shape == (30, 40)
        assert np.median(frame.data[1:29, 2:30]) == pytest.approx(600.0, abs=0.5)
        assert frame.header["CRPIX1"] == 20.0 and "RPPOVSCN" not in frame.header
        assert any(problem in n for n in frame.notes)
    assert sum(problem in r.getMessage() for r in caplog.records) == 1  # warned once


def test_single_hdu_without_biassec_or_with_datasec_only(tmp_path):
    plain = tmp_path / "plain.fits"
    fits.PrimaryHDU(data=np.arange(400, dtype=np.float32).reshape(20, 20)).writeto(plain)
    frame = read_frame(plain)
    assert frame.data.shape == (20, 20) and frame.data[0, 0] == 0.0 and not frame.notes
    datasec = _overscan_frame(tmp_path / "datasec.fits", TRIMSEC="", DATASEC="[3:30,1:30]")
    frame = read_frame(datasec)
    assert frame.data.shape == (30, 28)
    assert frame.header["CRPIX1"] == 18.0 and frame.header["CRPIX2"] == 15.0


def test_calibration_frames_of_an_overscan_camera_match_the_science_shape(tmp_path):
    from rpp_tasks.stages.calibration import calibrate_image
    from rpp_tasks.stages.masters import run_masters

    # the bias has a 3 ADU structure on top of its overscan level: the master keeps only that
    bias = []
    for i in range(3):
        p = _overscan_frame(tmp_path / f"bias{i}.fits", sky=0.0, seed=10 + i, IMAGETYP="bias")
        with fits.open(p, mode="update") as hdul:
            hdul[0].data[1:29, 2:10] += 3.0
        bias.append(p)
    flats = [
        _overscan_frame(
            tmp_path / f"flat{i}.fits", sky=5000.0, seed=20 + i, IMAGETYP="flat", FILTER="V"
        )
        for i in range(3)
    ]
    summary = run_masters(
        {"bias": [str(p) for p in bias], "flat_V": [str(p) for p in flats]},
        out_dir=tmp_path / "masters",
        camera="OVSCAM",
        binning=(1, 1),
        bands=["V"],
    )
    master_bias = fits.getdata(summary["bias"]["path"])
    master_flat = fits.getdata(summary["flat"]["V"]["path"])
    assert master_bias.shape == master_flat.shape == (28, 28)
    assert np.median(master_bias[:, :8]) == pytest.approx(3.0, abs=0.5)
    assert np.median(master_bias[:, 8:]) == pytest.approx(0.0, abs=0.5)
    sci = read_frame(_overscan_frame(tmp_path / "sci.fits", seed=30))
    result = calibrate_image(sci.data, exptime_s=10.0, bias=master_bias, flat=master_flat)
    assert result.image.shape == (28, 28)
    assert np.median(result.image[:, 8:]) == pytest.approx(100.0, abs=1.0)


def test_saao_single_hdu_frame_loses_its_overscan(real_data):
    frame = read_frame(real_data / SAAO)
    assert frame.data.shape == (520, 512)  # TRIMSEC [17:528,1:520] of 536x520
    assert frame.header["RPPOVSCN"] == pytest.approx(214.0, abs=1.0)  # BIASSEC [4:13,1:520]
    assert np.median(frame.data) == pytest.approx(86.0, abs=2.0)  # was 300 ADU with the pedestal
    # no pre/overscan column left at the edges: the edge columns sit at the sky level
    edges = np.median(frame.data[:, [0, -1]], axis=0)
    assert np.all(np.abs(edges - np.median(frame.data)) < 10.0)
