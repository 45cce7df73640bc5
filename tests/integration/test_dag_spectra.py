"""A synthetic 2SPOT night reduced through the Airflow DAG itself (``dag.test()``).

The observatory is long-slit (``instrument_kind: longslit``): the same DAG factory builds
validate -> masters -> spectra -> products -> (archive, notify) from the ``longslit`` stage table.
The night (`rpp_tasks.sim.longslit`, known truth) is written as a 2SPOT session with
``last_obs.yaml``/``setup_config.yaml``; a third declared target has no lamp file. Asserted through
the DAG's products: wavelength RMS <= 0.1 px, the injected absorption lines within 0.2 px in the
final BeSS spectra, the BeSS header keywords, the rejected target's reason, one ObsCore spectrum
row per reduced target upserted on a re-run. (S/N >= 95 % of the optimal-extraction limit and
errors within 10 % of the scatter need repeated realisations: tests/rpp_tasks/
test_spectra_synthetic.py asserts them on the same extraction code.)
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.cli_runs import rpp_reduce, tree_files

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RUNNER = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
dag = bag.dags["rpp_synth2spot"]
dr = dag.test(run_conf=json.loads(sys.argv[2]))
tis = {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}
print("RESULT " + json.dumps({"state": str(dr.state), "tasks": tis}))
"""
OBS = {
    "observatory": "synth2spot",
    "title": "Synthetic 2SPOT",
    "instrument_kind": "longslit",
    "site": {"name": "2SPOT Chile", "latitude_deg": -30.17, "longitude_deg": -70.8,
             "elevation_m": 1550},
    "camera": {"name": "SYNTHCAM", "telescope": "RC12", "gain_e_per_adu": 1.4,
               "read_noise_e": 9.0, "saturation_adu": 65000},
    "spectrograph": {"name": "Alpy600", "dispersion_a_per_px": 3.0,
                     "central_wavelength_a": 5600.0, "lamp_elements": ["Ar", "Ne"],
                     "bin_size_px": 16, "sky_offset_px": 15, "sky_width_px": 40,
                     "poly_degree": 3, "resolving_power": 500, "bss_site": "2SPOT Chile",
                     "bss_inst": "RC12 Alpy600 SYNTHCAM", "observer": "2SPOT team"},
    "session": {"ready_rule": "twospot"},
    "archive": {"obs_collection": "2SPOT/Alpy600"},
}  # fmt: skip


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory):
    from rpp_tasks.sim.longslit import make_longslit_night, write_longslit_session

    root = Path(tempfile.mkdtemp(prefix="rpp_dag_spectra_"))
    home, data, cfg = root / "airflow_home", root / "data", root / "config"
    (cfg / "observatories").mkdir(parents=True)
    home.mkdir()
    shutil.copy(REPO / "config" / "defaults.yaml", cfg / "defaults.yaml")
    (cfg / "observatories" / "synth2spot.yaml").write_text(yaml.safe_dump(OBS))
    night = make_longslit_night(shape=(400, 1200), targets=("HD 7", "HD 8"), n_target=3, seed=21)
    raw = data / "data" / "incoming" / "synth2spot" / "2025-03-14"
    write_longslit_session(raw, night, bin_size=16)
    # a third target whose lamp file never arrived
    for i in (1, 2, 3):
        shutil.copy(raw / f"HD_8-{i}.fits", raw / f"NOLAMP-{i}.fits")
    obs_file = yaml.safe_load((raw / "last_obs.yaml").read_text())
    obs_file["NOLAMP"] = ["NOLAMP", "NOLAMP-", 3, "NOLAMP_Neon-", 1, *obs_file["HD 8"][5:]]
    (raw / "last_obs.yaml").write_text(yaml.safe_dump(obs_file, sort_keys=False))
    env = {
        **__import__("os").environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "RPP_CONFIG_DIR": str(cfg),
        "RPP_DATA_ROOT": str(data),
        "PYTHONPATH": str(REPO),
    }
    env.pop("AIRFLOW__CORE__UNIT_TEST_MODE", None)
    res = subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    yield env, data / "data", raw, night
    shutil.rmtree(root, ignore_errors=True)


def _run(env, conf) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", RUNNER, str(REPO / "dags"), json.dumps(conf)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=REPO,
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stdout[-3000:] + res.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _line_centres_px(night, fits_path, lo, hi):
    """Offsets (px) of the isolated injected absorption lines fitted in the final spectrum."""
    from scipy.optimize import curve_fit

    from rpp_tasks.spectra.products import read_spectrum_1d

    t = night.truth
    spec = read_spectrum_1d(fits_path)
    lam, flux = spec.wavelength_a, spec.flux
    disp = t.dispersion_coeffs[1]
    fwhm_a = t.line_fwhm_px * disp
    features = [w for w, _ in t.metal_lines] + [5889.95, 5895.92]
    balmer = [6562.79, 4861.35, 4340.47, 4101.74, 3970.07, 3889.05, 3835.38]
    out = []
    for w0, _ in t.metal_lines:
        others = [w for w in features + balmer if w != w0]
        if min(abs(w0 - w) for w in others) < 4 * fwhm_a + 20 or not lo < w0 < hi:
            continue
        sel = np.abs(lam - w0) < 1.5 * fwhm_a
        side = (np.abs(lam - w0) > 2.5 * fwhm_a) & (np.abs(lam - w0) < 4 * fwhm_a)
        cont = np.median(flux[side])
        p, _ = curve_fit(
            lambda x, a, m, s, c=cont: c * (1 - a * np.exp(-0.5 * ((x - m) / s) ** 2)),
            lam[sel],
            flux[sel],
            p0=(0.2, w0, fwhm_a / 2.35),
        )
        out.append((p[1] - w0) / disp)
    return out


def test_twospot_night_through_the_dag(airflow_env):
    from astropy.io import fits

    from rpp_tasks.spectra.products import BESS_REQUIRED

    env, data, raw, night = airflow_env
    conf = {"observatory": "synth2spot", "session_id": "2025-03-14", "session_dir": str(raw)}
    first = _run(env, conf)
    chain = ["validate", "masters", "spectra", "products", "archive"]
    assert first["state"] == "success", first
    assert {t: first["tasks"][t] for t in chain} == dict.fromkeys(chain, "success"), first
    assert first["tasks"]["notify"] == "skipped"  # no channel configured, visibly

    workdir = data / "work" / "synth2spot" / "2025-03-14"
    summary = json.loads((workdir / "session_summary.json").read_text())
    assert summary["instrument_kind"] == "longslit"
    assert set(summary["stage_runs"]) == {"masters", "spectra"}
    by = {s["target"]: s for s in summary["spectra"]}
    assert (summary["n_science"], summary["n_ok"]) == (3, 2)
    assert by["NOLAMP"]["status"] == "rejected" and by["NOLAMP"]["failed_stage"] == "lamp"
    assert "no arc lamp" in by["NOLAMP"]["reason"]
    for name in ("HD 7", "HD 8"):
        s = by[name]
        assert s["status"] == "ok" and s["rms_px"] <= 0.1, s
        h = fits.getheader(s["bess_fits"])
        assert all(k in h for k in BESS_REQUIRED)
        assert h["NAXIS"] == 1 and h["CUNIT1"] == "Angstrom" and h["OBJNAME"] == name
        assert h["EXPTIME2"] == "3 x 600.0 s" and h["EXPTIME"] == 1800.0
        assert h["BSS_SITE"] == "2SPOT Chile" and h["BSS_INST"] == "RC12 Alpy600 SYNTHCAM"
        assert h["OBSERVER"] == "2SPOT team" and h["GEO_ELEV"] == 1550.0
        assert h["SPE_RPOW"] == round(s["resolving_power"]) and h["WAV_RMSP"] <= 0.1
        offsets = _line_centres_px(night, s["bess_fits"], s["wavelength_min_a"] + 30,
                                   s["wavelength_max_a"] - 30)  # fmt: skip
        assert len(offsets) >= 3 and max(abs(o) for o in offsets) < 0.2, offsets
    page = (workdir / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "no arc lamp" in page

    # a re-run replaces the products; the archive keeps one row per spectrum (upsert)
    second = _run(env, conf)
    assert second["state"] == "success", second
    db = data / "products" / "synth2spot" / "archive.sqlite"
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "select target_name, dataproduct_type, em_min, em_max, em_res_power, t_exptime "
            "from rpp_main order by target_name"
        ).fetchall()
    assert [r[:2] for r in rows] == [("HD 7", "spectrum"), ("HD 8", "spectrum")]
    for name, _, em_min, em_max, rpow, texp in rows:
        s = by[name]
        assert em_min == pytest.approx(s["wavelength_min_a"] * 1e-10, rel=1e-3)
        assert em_max == pytest.approx(s["wavelength_max_a"] * 1e-10, rel=1e-3)
        assert rpow == pytest.approx(s["resolving_power"]) and texp == 1800.0


def test_rpp_reduce_gives_the_dag_s_spectra(airflow_env):
    """``rpp reduce`` runs the same lifecycle in one process: same targets, same outcomes, same
    spectra (figures and BeSS data) and the same product files as the DAG."""
    from astropy.io import fits

    env, data, raw, _ = airflow_env
    dag_dir = data / "work" / "synth2spot" / "2025-03-14"
    if not (dag_dir / "session_summary.json").is_file():
        conf = {"observatory": "synth2spot", "session_id": "2025-03-14", "session_dir": str(raw)}
        assert _run(env, conf)["state"] == "success"
    cli_root = data / "cli_work"
    res = rpp_reduce(env, raw, "synth2spot", cli_root)
    assert "2/3 target spectra reduced" in res.stdout
    cli_dir = cli_root / "2025-03-14"

    assert tree_files(cli_dir) == tree_files(dag_dir) - {"notify.json"}
    s_dag = json.loads((dag_dir / "session_summary.json").read_text())
    s_cli = json.loads((cli_dir / "session_summary.json").read_text())
    for a, b in zip(s_cli["spectra"], s_dag["spectra"], strict=True):
        assert (a["target"], a["status"], a["reason"]) == (b["target"], b["status"], b["reason"])
        if a["status"] == "ok":
            for key in ("rms_px", "resolving_power", "snr_median", "wavelength_min_a"):
                assert a[key] == pytest.approx(b[key], rel=1e-9), key
            fa = fits.getdata(a["bess_fits"])
            fb = fits.getdata(b["bess_fits"])
            np.testing.assert_array_equal(fa, fb)
