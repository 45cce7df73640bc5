"""End-to-end reduction of synthetic sessions: products, rejections with reasons, idempotent
re-runs, the per-stage (Airflow) driver agreeing with the in-memory chain, and raw files never
modified."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from rpp_tasks.config import config_from_dict, find_config
from rpp_tasks.ops.cli import main as rpp_main
from rpp_tasks.session import lifecycle, pipeline
from rpp_tasks.session.workdir import Session

REPO = Path(__file__).resolve().parents[2]
FWHM_TRUE = 3.5


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def obs():
    return find_config("demo", REPO / "config")


@pytest.fixture(scope="module")
def raw_session(tmp_path_factory):
    """A synthetic night: 3 science frames (256x256) + bias/dark/flat, plus three broken files."""
    from rpp_tasks.sim import synthetic

    root = tmp_path_factory.mktemp("night")
    raw = root / "incoming" / "2025-01-15"
    paths = synthetic.write_synthetic_session(
        raw,
        truth_folder=root / "truth",
        n_science=3,
        n_bias=3,
        n_dark=2,
        n_flat=3,
        shape=(256, 256),
        fwhm_px=FWHM_TRUE,
        seed=3,
    )
    (raw / "zero_length.fits").write_bytes(b"")
    (raw / "notes.fits").write_text("this is not a FITS file\n")
    good = Path(paths["science"][0]).read_bytes()
    (raw / "truncated.fits").write_bytes(good[: len(good) // 2])
    return raw, paths


def _reduce(raw, obs, **kwargs) -> dict:
    """``rpp reduce`` of a folder (without the report): the session summary as a dict."""
    return lifecycle.reduce_session(raw, obs, report=False, **kwargs)[0].to_dict()


def _checksums(folder: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(folder.iterdir()) if p.is_file()}


def test_session_reduces_and_rejects_bad_files_with_reasons(raw_session, obs, tmp_path):
    raw, paths = raw_session
    before = _checksums(raw)
    summary = _reduce(raw, obs, work_root=tmp_path / "work", workers=1)

    assert summary["n_science"] == 3 and summary["n_ok"] == 3, summary["frames"]
    rej = summary["rejected_files"]
    assert set(rej) == {"zero_length", "notes", "truncated"}
    assert (
        "empty" in rej["zero_length"]["reason"].lower()
        or "zero" in rej["zero_length"]["reason"].lower()
    )
    assert "fits" in rej["notes"]["reason"].lower()
    assert "truncat" in rej["truncated"]["reason"].lower()
    assert _checksums(raw) == before, "raw files must never be modified"

    masters = Session.load(summary["workdir"]).read_json("masters.json")
    assert masters, "masters.json must record the calibration used"

    for f in summary["frames"]:
        cal = Path(f["calibrated"])
        with fits.open(cal) as hdul:
            assert hdul[0].data.dtype.kind == "f" and hdul[0].data.dtype.itemsize == 4
            assert "MASK" in hdul
            assert hdul[0].header["CTYPE1"].startswith("RA---TAN")  # WCS kept
        cat = Table.read(f["catalog"], format="ascii.ecsv")
        for col in (
            "x_centroid",
            "y_centroid",
            "flux_1p1fwhm",
            "flux_1p3fwhm",
            "flux_fixed",
            "flux_psf",
            "flux_err_psf",
            "mag_psf",
            "snr",
            "quality",
            "saturated",
            "near_edge",
            "blended",
            "ra",
            "dec",
        ):
            assert col in cat.colnames, col
        assert set(np.unique(cat["quality"])) <= {"poor", "marginal", "good"}
        good = cat["quality"] == "good"
        assert np.all(cat["snr"][good] > 10)
        assert np.isfinite(cat["ra"]).all()
        assert f["fwhm_px"] == pytest.approx(FWHM_TRUE, rel=0.1)
        assert set(f["stages"]) >= set(pipeline.FRAME_STAGES)
        assert all(v["cpu_s"] >= 0 for v in f["stages"].values())
        assert f["limiting_mag_inst"] is not None and np.isfinite(f["limiting_mag_inst"])


def test_rerun_replaces_products(raw_session, obs, tmp_path):
    raw, _ = raw_session
    s1 = _reduce(raw, obs, work_root=tmp_path / "work", workers=1)
    s2 = _reduce(raw, obs, work_root=tmp_path / "work", workers=1)
    assert s1["session_id"] == s2["session_id"] == "2025-01-15"
    frames_dir = Path(s2["workdir"]) / "frames"
    assert sorted(p.name for p in frames_dir.iterdir()) == sorted(f["frame"] for f in s2["frames"])
    c1 = Table.read(s1["frames"][0]["catalog"])
    c2 = Table.read(s2["frames"][0]["catalog"])
    assert len(c1) == len(c2)
    np.testing.assert_allclose(c1["flux_psf"], c2["flux_psf"], rtol=1e-6)


def test_per_stage_driver_matches_in_memory_chain(raw_session, obs, tmp_path):
    """What Airflow runs (one stage per task, checkpoints on disk) equals the one-process chain."""
    raw, _ = raw_session
    chained = _reduce(raw, obs, work_root=tmp_path / "a", workers=1)

    session = lifecycle.open_session(raw, obs, work_root=tmp_path / "b")
    lifecycle.run_stage(session, obs, "masters")
    for stage in pipeline.FRAME_STAGES:
        out = lifecycle.run_stage(session.workdir, obs, stage, workers=2)
        assert out["n_ok"] == 3, out
    staged = lifecycle.summarise(session, obs).to_dict()
    for fa, fb in zip(chained["frames"], staged["frames"]):
        ca, cb = Table.read(fa["catalog"]), Table.read(fb["catalog"])
        assert len(ca) == len(cb)
        np.testing.assert_allclose(ca["flux_1p3fwhm"], cb["flux_1p3fwhm"], rtol=1e-5)
        np.testing.assert_allclose(ca["flux_psf"], cb["flux_psf"], rtol=1e-5)


def test_frame_without_exptime_is_rejected_and_others_go_on(raw_session, obs, tmp_path):
    raw, paths = raw_session
    night = tmp_path / "night"
    shutil.copytree(raw, night)
    victim = night / Path(paths["science"][1]).name
    with fits.open(victim) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
    for key in ("EXPTIME", "EXPOSURE", "EXP_TIME"):  # every keyword an exposure time is read from
        hdul[0].header.remove(key, ignore_missing=True)
    hdul.writeto(victim, overwrite=True)
    summary = _reduce(night, obs, work_root=tmp_path / "work", workers=1)
    by_name = {f["frame"]: f for f in summary["frames"]}
    stem = victim.name.removesuffix(".fits")
    rejected = {
        **summary["rejected_files"],
        **{k: v for k, v in by_name.items() if v["status"] != "ok"},
    }
    assert stem in rejected
    assert "EXPTIME" in str(rejected[stem].get("reason"))
    assert sum(f["status"] == "ok" for f in summary["frames"]) == 2


def test_config_without_psf_still_gives_aperture_catalogue(raw_session, tmp_path):
    raw, paths = raw_session
    obs = config_from_dict(
        {
            "observatory": "nopsf",
            "camera": {"gain_e_per_adu": 1.5, "read_noise_e": 8.0, "saturation_adu": 60000},
            "stages": {"photometry": {"psf": False}},
        }
    )
    s = pipeline.reduce_frame(paths["science"][0], obs, tmp_path / "f")
    assert s["status"] == "ok", s
    cat = Table.read(s["catalog"])
    assert "flux_psf" not in cat.colnames and "flux_1p1fwhm" in cat.colnames
    assert set(cat["quality"]) <= {"poor", "marginal", "good"}


def test_cli_reduce_frame_and_folder(raw_session, tmp_path, capsys):
    raw, paths = raw_session
    assert (
        rpp_main(
            [
                "-q",
                "reduce",
                str(paths["science"][0]),
                "--observatory",
                "demo",
                "--work",
                str(tmp_path / "w1"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "ok" in out and "sources" in out
    assert (
        rpp_main(
            [
                "-q",
                "reduce",
                str(raw),
                "--observatory",
                "demo",
                "--work",
                str(tmp_path / "w2"),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "3/3 science frames reduced" in out
    assert "truncated" in out
    # qa12: FWHM in px and arcsec in their own columns (one column mixed them, unit-less), and
    # the limit says whether it is calibrated or instrumental
    assert "FWHM px" in out and 'FWHM "' in out and "c = calibrated, i = instrumental" in out
    assert rpp_main(["-q", "reduce", str(tmp_path / "nope.fits"), "--observatory", "demo"]) == 2


def test_session_table_keeps_the_end_of_long_frame_names():
    """qa12: the two Seestar M 94 subs (…-212046, …-212057) were both printed as
    'Light_M94_10.0s_IRCUT_20250326-2' in `rpp reduce`'s session table."""
    from rpp_tasks.ops.cli import _fit_name

    a, b = (f"Light_M94_10.0s_IRCUT_20250326-2120{s}" for s in ("46", "57"))
    assert _fit_name(a, 32) != _fit_name(b, 32)
    assert _fit_name(a, 32) == "Light_M94_\u2026IRCUT_20250326-212046"
    assert _fit_name("science_0", 32) == "science_0"


def test_frame_pool_does_not_rerun_the_callers_main_script(raw_session, obs, tmp_path):
    """Inside an Airflow task ``__main__`` is the ``airflow`` script; the frame pool's workers must
    not re-run it (forkserver/spawn would, and every frame would die with BrokenProcessPool)."""
    import subprocess
    import sys

    raw, _ = raw_session
    script = tmp_path / "fake_airflow.py"
    script.write_text(
        "import sys\n"
        "if __name__ != '__main__':\n"
        "    raise SystemExit('the main script was re-run in a worker')\n"
        "from rpp_tasks.session import lifecycle\n"
        "from rpp_tasks.config import find_config\n"
        "obs = find_config('demo')\n"
        f"s = lifecycle.open_session({str(raw)!r}, obs, work_root={str(tmp_path / 'w')!r})\n"
        "lifecycle.run_stage(s, obs, 'masters')\n"
        "out = lifecycle.run_stage(s, obs, ('calibrate', 'cosmics'), workers=2)\n"
        "print('n_ok', out['n_ok'])\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "n_ok 3" in proc.stdout


def test_session_is_recorded_in_the_results_database(raw_session, obs, tmp_path, monkeypatch):
    from rpp_tasks.outputs.db import ResultsDB

    raw, _ = raw_session
    url = f"sqlite:///{tmp_path / 'results.sqlite'}"
    monkeypatch.setenv("RPP_RESULTS_DB_URL", url)
    for _ in range(2):  # a re-run updates, it does not duplicate
        summary = _reduce(raw, obs, work_root=tmp_path / "work", workers=1)
    with ResultsDB(url) as rdb:
        sess = rdb.get_session("demo", summary["session_id"])
        assert sess["status"] == "done" and sess["n_rejected"] == 0
        assert str(sess["night_date"]) == "2025-01-15"
        rows = rdb.frame_rows("demo", summary["session_id"])
        assert sorted(r["frame_stem"] for r in rows) == sorted(
            f["frame"] for f in summary["frames"]
        )
        by_stem = {r["frame_stem"]: r for r in rows}
        for f in summary["frames"]:
            assert by_stem[f["frame"]]["fwhm_px"] == pytest.approx(f["fwhm_px"])
            assert by_stem[f["frame"]]["n_sources"] == f["n_sources"]
        runs = rdb.stage_runs("demo", summary["session_id"], stage="photometry")
        assert len(runs) == 2 * len(rows)  # one per frame and run: attempts 1 and 2
        assert {r["attempt"] for r in runs} == {1, 2}
        kinds = {m["kind"] for m in rdb.masters("demo", summary["session_id"])}
        assert {"bias", "dark", "flat_V"} <= kinds


def test_rpp_command_in_a_fresh_process(raw_session, tmp_path):
    """The console script as a user runs it (nothing imported beforehand)."""
    import subprocess
    import sys

    _, paths = raw_session
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rpp_tasks.ops.cli",
            "reduce",
            str(paths["science"][0]),
            "--observatory",
            "demo",
            "--work",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sources, FWHM" in proc.stdout
    assert "photometry" in proc.stderr  # per-stage progress and timings in the log
