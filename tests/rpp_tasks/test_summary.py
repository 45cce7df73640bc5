"""The typed session summary: one night, one set of headline facts, every file with its outcome."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from rpp_tasks.session.summary import (
    FrameSummary,
    Headline,
    SessionSummary,
    calibrated_limiting_mag,
    file_outcomes,
    headline,
    night_date_for,
)


def _mjd(iso: str) -> float:
    from astropy.time import Time

    return float(Time(iso, scale="utc").mjd)


@pytest.mark.parametrize(
    ("iso", "longitude_deg", "night"),
    [
        # Chile (70.7 W): 03:30 UTC is 22:47 local the evening before; the UTC date is the next day
        ("2025-01-16T03:30:00", -70.7, "2025-01-15"),
        # Chile, after local midnight: 07:00 UTC is 02:17 local, still the night of the 15th
        ("2025-01-16T07:00:00", -70.7, "2025-01-15"),
        # Siding Spring (149.1 E): 10:00 UTC is 19:56 local, the evening of the 15th
        ("2025-01-15T10:00:00", 149.1, "2025-01-15"),
        # Siding Spring, 18:00 UTC is 03:56 local on the 16th: the night of the 15th
        ("2025-01-15T18:00:00", 149.1, "2025-01-15"),
        # Europe (7 E): 20:30 UTC, the demo observatory's sessions
        ("2025-01-15T20:30:00", 7.0, "2025-01-15"),
        ("2025-01-16T04:00:00", 7.0, "2025-01-15"),
    ],
)
def test_night_is_the_local_night_of_the_first_frame(iso, longitude_deg, night):
    assert night_date_for(_mjd(iso), longitude_deg) == night
    assert night_date_for(None, longitude_deg) is None


def _session(frames, **kw) -> SessionSummary:
    fs = tuple(FrameSummary.from_dict(f) for f in frames)
    h = headline(fs)
    counts = {"n_science": h.n_science, "n_ok": h.n_ok, "n_rejected": h.n_rejected}
    return SessionSummary(observatory="o", session_id="s1", frames=fs, headline=h, **counts, **kw)


def test_browse_and_results_db_agree_on_the_night(tmp_path):
    """A Chilean session starting after 00:00 UTC: the index and the database show the local night
    (the UTC date of the first frame would be the next day)."""
    from rpp_tasks.outputs.browse import session_index
    from rpp_tasks.outputs.db import ResultsDB
    from rpp_tasks.outputs.results import record_session

    first = _mjd("2025-01-16T01:10:00")
    frames = [
        {"frame": "a", "status": "ok", "mjd_obs": first, "date_obs": "2025-01-16T01:10:00.000"},
        {"frame": "b", "status": "ok", "mjd_obs": first + 0.01, "date_obs": "2025-01-16T01:24"},
    ]
    s = _session(frames, night_date=night_date_for(first, -70.7))
    assert s.night_date == "2025-01-15"
    work = tmp_path / "work"
    (work / "s1").mkdir(parents=True)
    (work / "s1" / "session_summary.json").write_text(json.dumps(s.to_dict()))
    obs = SimpleNamespace(name="o", dag_id="rpp_o", resolve_path=lambda which: work)
    (entry,) = session_index([obs])
    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    record_session(s, url)
    with ResultsDB(url) as rdb:
        assert str(rdb.get_session("o", "s1")["night_date"]) == entry.night == "2025-01-15"


def test_headline_facts_are_computed_once_from_the_frames():
    frames = [
        {
            "frame": "a",
            "status": "ok",
            "background_adu": 500.0,
            "fwhm_px": 3.0,
            "fwhm_arcsec": 3.3,
            "limiting_mag_inst": -2.0,
            "limiting_mag_cal": 19.0,
            "zp_mag": 21.0,
            "n_sources": 10,
            "n_transient_candidates": 1,
            "stages": {"transients": {"n_candidates": 1, "flags": []}},
            "object": "M 42",
            "band": "V",
            "exptime_s": 60.0,
            "date_obs": "2025-01-15T20:30:00",
        },
        {
            "frame": "b",
            "status": "ok",
            "background_adu": 505.0,
            "fwhm_px": 4.0,
            "limiting_mag_inst": -1.5,
            "zp_mag": 21.2,
            "n_sources": 5,
            "band": "R",
            "exptime_s": 30.0,
            "date_obs": "2025-01-15T20:40:00",
        },
        {"frame": "c", "status": "rejected", "reason": "x", "date_obs": "2025-01-15T20:20:00"},
    ]
    h = headline(FrameSummary.from_dict(f) for f in frames)
    assert (h.n_science, h.n_ok, h.n_rejected) == (3, 2, 1)
    assert h.median_sky_adu == 502.5 and (h.min_sky_adu, h.max_sky_adu) == (500.0, 505.0)
    assert h.median_fwhm_px == 3.5 and h.median_fwhm_arcsec == 3.3
    assert h.median_zp_mag == pytest.approx(21.1)
    # the deepest calibrated limit of the frames with a zero point, said so
    assert (h.limiting_mag, h.limiting_mag_kind) == (19.0, "calibrated")
    assert h.n_sources == 15 and h.n_transient_candidates == 1
    assert h.objects == ("M 42",) and h.bands == ("R", "V")
    assert (h.first_date_obs, h.last_date_obs) == ("2025-01-15T20:20:00", "2025-01-15T20:40:00")
    assert h.total_exptime_s == 90.0
    # without any zero point: the instrumental limit; without a transient search: None
    h2 = headline([FrameSummary.from_dict({**frames[1], "zp_mag": None})])
    assert (h2.limiting_mag, h2.limiting_mag_kind, h2.n_transient_candidates) == (
        -1.5,
        "instrumental",
        None,
    )
    assert Headline.from_dict(h.to_dict()) == h


def test_calibrated_limit_uses_the_aperture_zero_point_and_extinction():
    lim = calibrated_limiting_mag(
        -2.5,
        zp_by_type={"psf": 21.4, "1p3fwhm": 21.39},
        zp_mag=21.4,
        extinction_k_mag=0.15,
        airmass=1.2,
    )
    assert lim == pytest.approx(-2.5 - 0.15 * 1.2 + 21.39)
    assert calibrated_limiting_mag(
        -2.5, zp_by_type={}, zp_mag=21.4, extinction_k_mag=0.0, airmass=None
    ) == pytest.approx(18.9)
    assert (
        calibrated_limiting_mag(
            -2.5, zp_by_type=None, zp_mag=None, extinction_k_mag=0.1, airmass=1.0
        )
        is None
    )
    # an extinction without an airmass cannot be applied: no calibrated limit
    assert (
        calibrated_limiting_mag(
            -2.5, zp_by_type=None, zp_mag=21.0, extinction_k_mag=0.1, airmass=None
        )
        is None
    )


def test_summary_round_trips_through_its_json():
    s = _session(
        [{"frame": "a", "status": "ok", "fwhm_px": 3.0, "stages": {"calibrate": {"cpu_s": 0.1}}}],
        airflow={"dag_id": "rpp_o", "run_id": "r1"},
    )
    d = json.loads(json.dumps(s.to_dict()))
    assert SessionSummary.from_dict(d) == s
    assert "wall_s" not in d and d["airflow"]["run_id"] == "r1"  # optional keys stay absent
    # an older summary without headline gets it computed; unknown keys are ignored
    old = {k: v for k, v in d.items() if k != "headline"}
    old["frames"][0]["some_future_key"] = 1
    assert SessionSummary.from_dict(old).headline == s.headline
    with pytest.raises(ValueError, match="frames"):
        SessionSummary.from_dict({"session_id": "x"})


def test_every_input_file_has_an_outcome():
    manifest = {
        "frames": [
            {"path": "/n/sci1.fits", "imagetyp": "science"},
            {"path": "/n/sci2.fits", "imagetyp": "science"},
            {"path": "/n/bias1.fits", "imagetyp": "bias"},
            {"path": "/n/flat_R.fits", "imagetyp": "flat"},
            {"path": "/n/odd.fits", "imagetyp": "unknown"},
        ],
        "rejected": [{"path": "/n/broken.fits", "reason": "truncated FITS file"}],
        "ignored": ["/n/notes.txt"],
    }
    frames = [
        FrameSummary(frame="sci1", raw_path="/n/sci1.fits", status="ok"),
        FrameSummary(
            frame="sci2",
            raw_path="/n/sci2.fits",
            status="rejected",
            reason="no sources",
            failed_stage="detect",
        ),
    ]
    masters = {"bias": {"path": "/w/bias.fits", "inputs": ["/n/bias1.fits"]}, "flat": {}}
    out = {
        o.path: (o.kind, o.outcome, o.reason, o.stage)
        for o in file_outcomes(manifest, frames, masters)
    }
    assert out == {
        "/n/sci1.fits": ("science", "reduced", None, None),
        "/n/sci2.fits": ("science", "rejected", "no sources", "detect"),
        "/n/bias1.fits": ("bias", "calibration used", None, None),
        "/n/flat_R.fits": ("flat", "not used", "not combined into a master", None),
        "/n/odd.fits": ("unknown", "ignored", "frame type not recognised", None),
        "/n/broken.fits": ("unreadable", "rejected", "truncated FITS file", "validate"),
        "/n/notes.txt": ("ignored", "ignored", "matches an ignore pattern", None),
    }
