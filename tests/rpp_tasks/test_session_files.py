"""Every file of a session gets an outcome and a reason (issue 12, items 1, 4, 5).

The classification rule for frames without a usable IMAGETYP, unique frame stems, the FITS
extensions of real software (a Siril session of ``.fit.fz`` files), and the real PANOPTES folder
reduced end to end."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from rpp_tasks.config import find_config
from rpp_tasks.inputs.frames import (
    OUTCOMES,
    SessionPlan,
    assign_stems,
    classify_frame_reason,
    group_session,
)
from rpp_tasks.inputs.header import normalize_header
from rpp_tasks.session import lifecycle

REPO = Path(__file__).resolve().parents[2]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write(path, *, seed=0, **cards):
    rng = np.random.default_rng(seed)
    h = fits.Header()
    for k, v in cards.items():
        h[k] = v
    data = rng.normal(1000, 10, (16, 24)).astype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(data=data, header=h).writeto(path)
    return path


SKY = {"DATE-OBS": "2025-01-15T22:10:00", "EXPTIME": 60.0, "OBJECT": "M 42"}


# ----------------------------------------------------------------------------------------------
# classification rule
# ----------------------------------------------------------------------------------------------
def _meta(**cards):
    h = fits.Header()
    h["NAXIS"], h["NAXIS1"], h["NAXIS2"] = 2, 10, 10
    for k, v in cards.items():
        h[k] = v
    return normalize_header(h, required=()), h


@pytest.mark.parametrize(
    ("cards", "name", "kind", "why"),
    [
        # no IMAGETYP: the exposure and a sign of the sky decide
        (SKY, "m42_001.fits", "science", "no IMAGETYP; a 60 s exposure with OBJECT/FIELD 'M 42'"),
        (
            {"EXPTIME": 30.0, "RA": 83.8, "DEC": -5.4},
            "img_001.fits",
            "science",
            "a pointing RA/DEC",
        ),
        ({**SKY, "IMAGETYP": "Focus"}, "af_01.fits", "science", "IMAGETYP='Focus' is not a frame"),
        ({"EXPTIME": 0.0}, "img_002.fits", "bias", "a zero-second exposure is a bias"),
        ({"EXPTIME": 120.0, "SHUTTER": "CLOSED"}, "img_003.fits", "dark", "shutter closed"),
        # the words of the name (ASIAIR/KStars/SGP prefixes), before the header heuristics
        ({"EXPTIME": 2.0}, "Flat_L_0001.fits", "flat", "the name says 'flat'"),
        ({"EXPTIME": 300.0}, "Light_M31_300.0s_Bin1.fit", "science", "the name says 'light'"),
        ({"EXPTIME": 300.0}, "DarkFlat_2s_001.fits", "dark", "the name says 'darkflat'"),
        # nothing to go on: unknown (the session rejects it with this reason)
        ({"EXPTIME": 60.0}, "img_004.fits", "unknown", "no OBJECT, pointing or WCS"),
        ({}, "img_005.fits", "unknown", "no usable exposure time"),
        ({**SKY, "IMAGETYP": "ARC"}, "neon.fits", "unknown", "spectroscopic lamp"),
        # header types still win
        ({**SKY, "IMAGETYP": "Light Frame"}, "x.fits", "science", "header IMAGETYP='Light Frame'"),
        ({**SKY, "IMAGETYP": "Dark"}, "Light_1.fits", "dark", "header IMAGETYP='Dark'"),
        ({**SKY, "OBSTYPE": "STANDARD"}, "x.fits", "science", "header OBSTYPE='STANDARD'"),
    ],
)
def test_classification_rule(cards, name, kind, why):
    meta, header = _meta(**cards)
    got, reason = classify_frame_reason(meta, f"/night/{name}", header=header)
    assert got == kind, reason
    assert why in reason, reason


def test_folder_names_count_below_the_session_root():
    meta, header = _meta(EXPTIME=60.0)  # NINA: <night>/DARK/2025-01-15_22-10-00_0001.fits
    kind, reason = classify_frame_reason(
        meta, "/in/night/DARK/2025-01-15_22-10-00_0001.fits", header=header, root="/in/night"
    )
    assert kind == "dark" and "'dark'" in reason
    # the session folder's own name does not count (a night called "darksky" says nothing)
    kind, _ = classify_frame_reason(
        meta, "/in/darksky/2025-01-15_0001.fits", header=header, root="/in/darksky"
    )
    assert kind == "unknown"


def test_every_file_of_a_session_has_an_outcome_and_a_reason(tmp_path):
    s = tmp_path / "2025-01-15"
    _write(s / "m42_001.fits", IMAGETYP="Light Frame", **SKY)
    _write(s / "m42_002.fits", IMAGETYP="Focus", seed=1, **SKY)  # issue 12: dropped silently
    _write(s / "m42_003.fits", seed=2, **SKY)  # no IMAGETYP: dropped silently before
    _write(s / "bias_001.fits", IMAGETYP="Bias Frame", EXPTIME=0.0, seed=3)  # no DATE-OBS: fine
    _write(s / "mystery.fits", EXPTIME=10.0, seed=4)
    _write(s / "zero_light.fits", IMAGETYP="Light", seed=5, **{**SKY, "EXPTIME": 0.0})
    _write(s / "frame.new", IMAGETYP="Light", seed=6, **SKY)  # astrometry.net output
    (s / "log.txt").write_text("clouds\n")
    (s / "preview.jpg").write_bytes(b"\xff\xd8\xff")
    _write(s / ".stversions" / "m42_001~20250116.fits", IMAGETYP="Light", seed=7, **SKY)
    (s / "broken.fits").write_bytes(b"\x1f\x8b\x08\x00" + bytes(200))

    plan = group_session(s, patterns={"bias": ["bias*"]})
    by_name = {Path(f.path).name: f for f in plan.files}
    every = sorted(p.name for p in s.rglob("*") if p.is_file())
    assert sorted(by_name) == every, "every file of the folder is in the plan"
    assert all(f.outcome in OUTCOMES and f.reason for f in plan.files)
    outcome = {n: f.outcome for n, f in by_name.items()}
    assert outcome == {
        "m42_001.fits": "science",
        "m42_002.fits": "science",
        "m42_003.fits": "science",
        "bias_001.fits": "bias",
        "mystery.fits": "rejected",
        "zero_light.fits": "rejected",
        "frame.new": "ignored",
        "log.txt": "ignored",
        "preview.jpg": "ignored",
        "m42_001~20250116.fits": "ignored",
        "broken.fits": "rejected",
    }
    reason = {n: f.reason for n, f in by_name.items()}
    assert "IMAGETYP='Focus' is not a frame type" in reason["m42_002.fits"]
    assert reason["mystery.fits"].startswith("missing DATE-OBS")
    assert "frame type unknown" in reason["mystery.fits"]
    assert "EXPTIME=0 s for a science frame" in reason["zero_light.fits"]
    assert "add its extension to session.extensions" in reason["frame.new"]
    assert "hidden folder '.stversions'" in reason["m42_001~20250116.fits"]
    assert "ignore pattern '*.txt'" in reason["log.txt"]
    assert "gzip" in reason["broken.fits"]
    # rejected keeps its shape (path + reason) and gains the stem
    assert {Path(r.path).name for r in plan.rejected} == {
        "mystery.fits",
        "zero_light.fits",
        "broken.fits",
    }
    assert all(r.stem for r in plan.rejected)
    # the plan round-trips through manifest.json
    back = SessionPlan.from_dict(plan.to_dict())
    assert back.files == plan.files and back.to_dict() == plan.to_dict()
    assert plan.counts["science"] == 3 and plan.counts["unknown"] == 0


# ----------------------------------------------------------------------------------------------
# stems
# ----------------------------------------------------------------------------------------------
def test_stems_are_unique_and_deterministic():
    paths = [
        "/n/x.fits",
        "/n/x.fit",
        "/n/a/y.fits",
        "/n/b/y.fits",
        "/n/z.fits",
        "/n/Z.FITS",
        "/n/a__y.fits",  # equals the disambiguated form of a/y.fits
        "/n/m31 $1.fits",
        "/n/...fits",
    ]
    stems = assign_stems(paths, root="/n")
    assert stems["/n/z.fits"] != stems["/n/Z.FITS"]
    assert (stems["/n/x.fits"], stems["/n/x.fit"]) == ("x.fits", "x.fit")
    assert stems["/n/m31 $1.fits"] == "m31_1"
    assert stems["/n/...fits"] not in (".", "..", "")
    assert len({s.casefold() for s in stems.values()}) == len(paths)
    assert all("/" not in s and s.strip(".") for s in stems.values())
    assert assign_stems(list(reversed(paths)), root="/n") == stems  # order does not matter
    only_ab = assign_stems(["/n/a/y.fits", "/n/b/y.fits"], root="/n")
    assert only_ab == {"/n/a/y.fits": "a__y", "/n/b/y.fits": "b__y"}
    assert assign_stems(["/n/m42_001.fits"]) == {"/n/m42_001.fits": "m42_001"}


def test_colliding_file_names_get_separate_products(tmp_path):
    """issue 12: x.fits and x.fit (or a/x.fits, b/x.fits) all wrote to frames/x/."""
    from rpp_tasks.sim import synthetic

    src = synthetic.write_synthetic_session(
        tmp_path / "src",
        truth_folder=tmp_path / "truth",
        n_science=4,
        n_bias=0,
        n_dark=0,
        n_flat=0,
        shape=(256, 256),
        seed=5,
    )
    night = tmp_path / "2025-01-15"
    night.mkdir()
    sci = [Path(p) for p in src["science"]]
    targets = [night / "x.fits", night / "x.fit", night / "a" / "x.fits", night / "b" / "x.fits"]
    for s, t in zip(sci, targets):
        t.parent.mkdir(exist_ok=True)
        shutil.copy(s, t)
    obs = find_config("demo", REPO / "config")
    summary = lifecycle.reduce_session(
        night, obs, work_root=tmp_path / "work", workers=1, report=False
    )[0].to_dict()
    stems = sorted(f["frame"] for f in summary["frames"])
    assert stems == ["a__x", "b__x", "x.fit", "x.fits"]
    assert summary["n_ok"] == 4, [(f["frame"], f.get("reason")) for f in summary["frames"]]
    raw_of = {
        f["frame"]: Path(f["raw_path"]).relative_to(night).as_posix() for f in summary["frames"]
    }
    assert raw_of == {"a__x": "a/x.fits", "b__x": "b/x.fits", "x.fit": "x.fit", "x.fits": "x.fits"}
    frames_dir = Path(summary["workdir"]) / "frames"
    assert sorted(p.name for p in frames_dir.iterdir()) == stems
    # a second run of the same folder gives the same stems
    again = lifecycle.open_session(night, obs, work_root=tmp_path / "work2")
    assert sorted(f["stem"] for f in again.read_json("manifest.json")["science"]) == stems


# ----------------------------------------------------------------------------------------------
# extensions
# ----------------------------------------------------------------------------------------------
def test_default_extensions_cover_every_spelling():
    obs = find_config("demo", REPO / "config")
    exts = {e.lower() for e in obs.session.extensions}
    for e in (".fits", ".fit", ".fts", ".fits.fz", ".fit.fz", ".fits.gz", ".fit.gz", ".fts.gz"):
        assert e in exts
    # one list: config/defaults.yaml, the schema's default and the session reader's default
    from rpp_tasks.config_schema import FITS_EXTENSIONS, SessionConfig
    from rpp_tasks.inputs.frames import DEFAULT_EXTENSIONS

    assert list(obs.session.extensions) == list(FITS_EXTENSIONS) == list(DEFAULT_EXTENSIONS)
    assert SessionConfig().extensions == list(FITS_EXTENSIONS)


def test_siril_session_of_fit_fz_files_is_reduced(tmp_path):
    """issue 12: a Siril session of .fit.fz files gave 0/0 science frames and exit 0."""
    from rpp_tasks.sim import synthetic

    src = synthetic.write_synthetic_session(
        tmp_path / "src",
        truth_folder=tmp_path / "truth",
        n_science=2,
        n_bias=2,
        n_dark=2,
        n_flat=2,
        shape=(256, 256),
        seed=8,
    )
    night = tmp_path / "2025-01-15"
    night.mkdir()
    kinds = ("bias", "dark", "flat", "science")
    for kind in kinds:
        for i, p in enumerate(src[kind]):
            with fits.open(p) as hdul:
                h = hdul[0].header.copy()
                h["PROGRAM"] = ("Siril v1.2.6", "Software that created this HDU")
                h["ROWORDER"] = "TOP-DOWN"
                comp = fits.CompImageHDU(hdul[0].data, header=h, compression_type="RICE_1")
                name = (
                    f"{kind}_{i + 1:05d}.fit.fz" if kind != "science" else f"light_{i:05d}.FIT.FZ"
                )
                fits.HDUList([fits.PrimaryHDU(), comp]).writeto(night / name)
    before = {p.name: _sha(p) for p in night.iterdir()}
    obs = find_config("demo", REPO / "config")
    summary = lifecycle.reduce_session(
        night, obs, work_root=tmp_path / "work", workers=1, report=False
    )[0].to_dict()
    assert summary["n_science"] == 2 and summary["n_ok"] == 2, summary["frames"]
    assert summary["n_calibration"] == {"bias": 2, "dark": 2, "flat": 2}
    masters = summary["masters"]
    assert masters["bias"]["source"] == "session" and masters["bias"]["n_frames"] == 2
    assert {p.name: _sha(p) for p in night.iterdir()} == before


# ----------------------------------------------------------------------------------------------
# the real PANOPTES folder
# ----------------------------------------------------------------------------------------------
def test_real_panoptes_folder_is_reduced(real_data, tmp_path):
    """issue 12: no IMAGETYP anywhere; the folder printed '0/0 science frames reduced', exit 0."""
    obs = find_config("panoptes", REPO / "config")
    plan = group_session(real_data / "panoptes", obs)
    outcome = {Path(f.path).name: (f.outcome, f.reason) for f in plan.files}
    assert {n: o for n, (o, _) in outcome.items()} == {
        "noheader.fits": "rejected",
        "pole.fits": "science",
        "solved.fits.fz": "science",
        "unsolved.fits": "science",
    }
    assert "FIELD 'KIC 8462852'" in outcome["unsolved.fits"][1]
    assert "pointing RA/DEC" in outcome["unsolved.fits"][1]
    assert "valid WCS" in outcome["pole.fits"][1]
    assert outcome["noheader.fits"][1].startswith("missing DATE-OBS")

    night = tmp_path / "panoptes_night"
    shutil.copytree(real_data / "panoptes", night)
    summary = lifecycle.reduce_session(
        night, obs, work_root=tmp_path / "work", workers=1, report=False
    )[0].to_dict()
    assert summary["n_science"] == 3
    assert summary["n_ok"] >= 2, [(f["frame"], f.get("reason")) for f in summary["frames"]]
    assert set(summary["rejected_files"]) == {"noheader"}
