"""Headers of real camera software (issue 12, item 5): exposure times with precise reasons, DATE-OBS
with time zones and 2-digit years, filter wheels (FILTER1/FILTER2 with open positions), and the
real LCO/Liverpool conventions."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from rpp_tasks.exceptions import FrameRejected
from rpp_tasks.inputs.header import normalize_header
from rpp_tasks.inputs.reader import read_header

LCO = "lco_sinistro_mef/mef_raw_test_frame.fits"
DATE = {"DATE-OBS": "2025-01-15T22:10:00"}


def _hdr(**cards):
    h = fits.Header()
    h["NAXIS"], h["NAXIS1"], h["NAXIS2"] = 2, 40, 30
    for k, v in cards.items():
        h[k] = v
    return h


# ----------------------------------------------------------------------------------------------
# EXPTIME
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cards", "reason"),
    [
        ({"EXPTIME": -5.0}, "negative EXPTIME=-5 s"),
        ({"EXPTIME": "abc"}, "EXPTIME='abc' is not a number"),
        ({"EXPTIME": "NaN"}, "EXPTIME='NaN' is not a finite number"),
        ({"EXPTIME": True}, "EXPTIME=True is not a number"),
        ({"EXPTIME": 3.0e6}, "EXPTIME=3e+06 s is longer than a day"),
        ({"EXPOSURE": -1}, "negative EXPOSURE=-1 s"),
        ({}, "missing EXPTIME (no EXPTIME, EXPOSURE or EXP_TIME keyword)"),
    ],
)
def test_bad_exptime_gets_a_precise_reason(cards, reason):
    # issue 12: negative and non-numeric values were reported as "missing EXPTIME"
    with pytest.raises(FrameRejected) as exc:
        normalize_header(_hdr(**DATE, **cards), path="a.fits")
    assert exc.value.reason.startswith(reason), exc.value.reason
    assert exc.value.stage == "check"


def test_exptime_fallbacks_and_units():
    assert normalize_header(_hdr(**DATE, EXPTIME=0)).exptime_s == 0.0
    assert normalize_header(_hdr(**DATE, EXPTIME="300.0 s")).exptime_s == 300.0
    assert normalize_header(_hdr(**DATE, EXPTIME="1500 ms")).exptime_s == 1.5
    # a bad EXPTIME next to a good EXPOSURE: the good one is used
    m = normalize_header(_hdr(**DATE, EXPTIME="n/a", EXPOSURE=30.0))
    assert m.exptime_s == 30.0
    placeholder = normalize_header(_hdr(**DATE, EXPTIME=1e-32))
    assert placeholder.exptime_s == 0.0
    assert any("placeholder" in w for w in placeholder.warnings)


# ----------------------------------------------------------------------------------------------
# DATE-OBS
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "utc"),
    [
        ("2025-01-15T22:10:00+02:00", "2025-01-15T20:10:00.000"),
        ("2025-01-15T22:10:00Z", "2025-01-15T22:10:00.000"),
        ("2025-01-15T22:10:00.123456Z", "2025-01-15T22:10:00.123"),
        ("2025-01-15T01:10:00-0500", "2025-01-15T06:10:00.000"),
        ("2025-01-15 22:10:00", "2025-01-15T22:10:00.000"),
        ("2025-01-15T22:10", "2025-01-15T22:10:00.000"),
        ("2025-01-15T9:05:00", "2025-01-15T09:05:00.000"),
    ],
)
def test_date_obs_with_time_zone_is_parsed_to_utc(value, utc):
    # issue 12: '+02:00' and 'Z' were "missing DATE-OBS"
    m = normalize_header(_hdr(**{"DATE-OBS": value}, EXPTIME=10.0))
    assert m.date_obs == utc
    if "+02:00" in value:
        assert any("UTC offset +02:00 converted to UTC" in w for w in m.warnings)


def test_unparsable_date_obs_is_named_not_missing():
    with pytest.raises(FrameRejected, match=r"unparsable DATE-OBS='yesterday evening'"):
        normalize_header(_hdr(**{"DATE-OBS": "yesterday evening"}, EXPTIME=1.0))
    with pytest.raises(FrameRejected, match=r"missing DATE-OBS"):
        normalize_header(_hdr(EXPTIME=1.0))


def test_two_digit_year_needs_a_confirming_date():
    # issue 12: '15/01/25' was read as 1925-01-15 and the night recorded as 1925
    alone = _hdr(**{"DATE-OBS": "15/01/25", "TIME-OBS": "22:10:00"}, EXPTIME=1.0)
    with pytest.raises(FrameRejected) as exc:
        normalize_header(alone, path="/n/m31_001.fits")
    assert "DATE-OBS '15/01/25' has a 2-digit year (1925-01-15 or 2025-01-15?)" in exc.value.reason
    assert "no other date in the file" in exc.value.reason

    # the file's DATE (written when the file was saved) tells the century
    dated = _hdr(**{"DATE-OBS": "15/01/25", "TIME-OBS": "22:10:00", "DATE": "2025-01-15T22:11:02"})
    dated["EXPTIME"] = 1.0
    m = normalize_header(dated, path="/n/m31_001.fits")
    assert m.date_obs == "2025-01-15T22:10:00.000"
    assert any("read as 2025-01-15 (agrees with DATE)" in w for w in m.warnings)

    # a date in the file name or the session folder does too
    m = normalize_header(alone, path="/incoming/2025-01-15/m31_001.fits")
    assert m.date_obs.startswith("2025-01-15T22:10")
    m = normalize_header(alone, path="/n/M31_20250115_001.fits")
    assert m.date_obs.startswith("2025-01-15T22:10")

    # MJD-OBS of 1925 confirms 1925 (a real 1920s plate scan)
    old = _hdr(**{"DATE-OBS": "15/01/25", "MJD-OBS": 24165.92}, EXPTIME=1.0)
    assert normalize_header(old).date_obs.startswith("1925-01-15")

    # month/day order: '01/15/25' (US order) is resolved by the confirming date too
    us = _hdr(**{"DATE-OBS": "01/15/25", "UT": "22:10:00", "DATE": "2025-01-16"}, EXPTIME=1.0)
    assert normalize_header(us).date_obs.startswith("2025-01-15T22:10")

    # a contradicting date rejects with both readings named
    bad = _hdr(**{"DATE-OBS": "15/01/25", "DATE": "2024-06-01T12:00:00"}, EXPTIME=1.0)
    with pytest.raises(
        FrameRejected, match=r"no reading agrees with the file's other dates \(DATE"
    ):
        normalize_header(bad)


# ----------------------------------------------------------------------------------------------
# filters
# ----------------------------------------------------------------------------------------------
def test_liverpool_filter_wheels_skip_the_clear_position():
    # Liverpool Telescope IO:O writes one keyword per wheel; issue 12: band was read as Clear
    h = _hdr(
        **DATE,
        EXPTIME=30.0,
        TELESCOP="Liverpool Telescope",
        INSTRUME="IO:O",
        FILTER1="clear",
        FILTERI1="Clear-01",
        FILTER2="SDSS-G",
        FILTERI2="SDSS-G-01",
    )
    m = normalize_header(h)
    assert m.filter_raw == "SDSS-G" and m.band == "g"
    assert any("open wheel positions FILTER1='clear'" in w for w in m.warnings)
    # observatory aliases still win over the standard names
    assert normalize_header(h, filter_aliases={"SDSS-G": "gp"}).band == "gp"


@pytest.mark.parametrize(
    ("cards", "raw", "band"),
    [
        ({"FILTER": "V"}, "V", "V"),
        ({"FILTNAME": "Bessell-R"}, "Bessell-R", "R"),
        ({"FILTER1": "open", "FILTER2": "empty", "FILTER3": "Ha"}, "Ha", "Ha"),
        ({"FILTERS": "r'"}, "r'", "r'"),
        ({"INSFLNAM": "Johnson B"}, "Johnson B", "B"),
        ({"FILTER": "Clear"}, "Clear", "Clear"),
        ({"FILTER1": "air", "FILTER2": "air"}, "air", "Clear"),
        ({"FILTER": "Luminance"}, "Luminance", "L"),
        ({"FILTER": "RGGB", "FILTER2": "L-eXtreme"}, "L-eXtreme", "L-eXtreme"),
    ],
)
def test_filter_keywords_of_real_software(cards, raw, band):
    m = normalize_header(_hdr(**DATE, EXPTIME=1.0, **cards), default_band="Clear")
    assert (m.filter_raw, m.band) == (raw, band)


def test_two_filters_in_the_beam_take_the_first_and_say_so():
    m = normalize_header(_hdr(**DATE, EXPTIME=1.0, FILTER1="V", FILTER2="ND2"))
    assert m.band == "V"
    assert any("several filters in the beam (FILTER1='V', FILTER2='ND2')" in w for w in m.warnings)


def test_real_lco_frame_band_from_filter_with_air_wheels(real_data):
    header, _, _ = read_header(real_data / LCO)
    assert header["FILTER1"] == "air" and header["FILTER2"] == "w"
    m = normalize_header(header)
    assert (m.filter_raw, m.band) == ("w", "w")
    assert not any("wheel" in w for w in m.warnings)
    # the same frame with FILTER removed: the band comes from the wheel keywords
    del header["FILTER"]
    m = normalize_header(header)
    assert (m.filter_raw, m.band) == ("w", "w")
    assert np.isclose(m.mjd_obs, 59495.0800082, atol=1e-6)


def test_exptime_card_astropy_cannot_parse_is_named():
    h = fits.Header.fromstring(
        "".join(
            c.ljust(80)
            for c in (
                "SIMPLE  =                    T",
                "BITPIX  =                   16",
                "NAXIS   =                    0",
                "DATE-OBS= '2025-01-15T22:10:00'",
                "EXPTIME =                  NaN",
                "END",
            )
        )
    )
    with pytest.raises(FrameRejected, match=r"EXPTIME=NaN is not a valid FITS value"):
        normalize_header(h)
