"""The demo's first run, offline, end to end: ``rpp reduce`` on the night `rpp_tasks.sim.demo`
writes (the one ``rpp demo`` and ``rpp up`` write) ends with calibrated magnitudes, a calibrated
limiting magnitude in the band, a transient candidate with its cutout in the frames where the
transient is (and only there), and the target first in the summary, the report (with its light
curve from the results database), the e-mail and the Telegram message.

Offline: every catalogue and name service points at a closed loopback port; the reference
catalogue is the demo's local one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.table import Table

from rpp_tasks.config import find_config
from rpp_tasks.ops import cli
from rpp_tasks.outputs import notify
from rpp_tasks.outputs.lightcurve import target_light_curve
from rpp_tasks.session.summary import SessionSummary
from rpp_tasks.sim.demo import write_demo_night
from rpp_tasks.stages import catalogs
from rpp_tasks.stages.catalogs import angular_sep_deg

pytestmark = pytest.mark.timeout(900)

DEAD = "http://127.0.0.1:9"  # nothing listens: the night is offline
SERVICES = ("gaia_tap", "gaia_vizier", "vizier", "simbad", "skybot", "sesame", "ps1", "milliquas")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("RPP_DATA_ROOT", str(root))
    mp.setenv("RPP_RESULTS_DB_URL", f"sqlite:///{root / 'results.sqlite'}")
    # the shipped demo configuration, offline: every online service on a closed port
    conf = yaml.safe_load(Path(find_config("demo").source).read_text())
    conf["catalogs"] = {
        **conf.get("catalogs", {}),
        "services": dict.fromkeys(SERVICES, DEAD),
        "timeout_s": 1.0,
        "max_retries": 0,
        "cache_dir": str(root / "cache"),
    }
    cfg = root / "demo.yaml"
    cfg.write_text(yaml.safe_dump(conf))
    obs = find_config(str(cfg))
    night = root / "data" / "incoming" / "demo" / "2025-01-15"
    written = write_demo_night(obs, night, night="2025-01-15", n_science=4, seed=1)
    truth = json.loads(written["truth"].read_text())
    catalogs.reset_circuit_breaker()
    rc = cli.main(["reduce", str(night), "--observatory", str(cfg), "--workers", "1"])
    workdir = obs.resolve_path("work") / "2025-01-15"
    summary = SessionSummary.from_dict(json.loads((workdir / "session_summary.json").read_text()))
    yield {
        "rc": rc,
        "root": root,
        "obs": obs,
        "written": written,
        "truth": truth,
        "workdir": workdir,
        "summary": summary,
        "url": f"sqlite:///{root / 'results.sqlite'}",
    }
    mp.undo()


def test_demo_night_ships_its_catalogue_a_variable_target_and_a_late_transient(demo_run):
    w = demo_run["written"]
    # demo.yaml's catalogs.local, under RPP_DATA_ROOT
    assert w["catalog"] == demo_run["root"] / "data" / "catalogs" / "demo" / "demo_reference.fits"
    cat = Table.read(w["catalog"])
    assert len(cat) > 100 and "phot_g_mean_mag" in cat.colnames
    frames = demo_run["truth"]["frames"]
    assert [f["transient_present"] for f in frames] == [False, False, True, True]
    var = [f["variable_mag"] for f in frames]
    assert max(var) - min(var) > 0.1  # it varies within the night
    assert w["target"]["name"] == "DEMO-VAR" and w["target"]["ra_deg"] == pytest.approx(150.02)


def test_first_run_is_calibrated_offline(demo_run):
    s, truth = demo_run["summary"], demo_run["truth"]
    assert demo_run["rc"] == 0
    assert s.n_ok == s.n_science == 4
    h = s.headline
    assert h.limiting_mag_kind == "calibrated" and 18.5 < h.limiting_mag < 21.0
    assert h.bands == ("V",)
    zp_above_atmosphere = truth["params"]["zero_point_mag"]  # extinction is applied apart
    for f in s.frames:
        assert f.zp_mag == pytest.approx(zp_above_atmosphere, abs=0.02), f.frame
        assert f.limiting_mag_cal is not None and f.limiting_mag_cal > 18.5
        zp = json.loads((demo_run["workdir"] / "frames" / f.frame / "zeropoint.json").read_text())
        assert zp["reference"]["source"] == "local"  # the demo's own catalogue, offline


def test_transient_candidate_with_cutout_only_in_the_frames_it_is_in(demo_run):
    s, w = demo_run["summary"], demo_run["written"]
    tr = w["transient"]
    assert s.headline.n_transient_candidates == len(tr["frames"]) == 2
    for f in s.frames:
        d = demo_run["workdir"] / "frames" / f.frame
        cand = Table.read(d / "candidates.ecsv", format="ascii.ecsv")
        sep = angular_sep_deg(tr["ra_deg"], tr["dec_deg"], cand["ra"], cand["dec"]) * 3600
        hit = np.flatnonzero(np.asarray(sep) < 2.0)
        if f.frame in tr["frames"]:
            assert len(hit) == 1 and len(cand) == 1, (f.frame, len(cand))
            assert (d / "cutouts" / str(cand["cutout"][hit[0]])).is_file()
        else:
            assert len(cand) == 0, f.frame


def test_the_target_leads_summary_report_email_and_telegram(demo_run):
    s, truth, workdir = demo_run["summary"], demo_run["truth"], demo_run["workdir"]
    (t,) = s.targets
    assert t.name == "DEMO-VAR" and t.named_by == "header" and t.n_detected == 4
    (b,) = t.bands
    assert b.band == "V" and b.phot_type == "psf" and b.ensemble == "ok" and b.n_comp >= 10
    assert b.match_sep_arcsec < 0.3 and b.snr_median > 100
    # every photometry type of the latest frame, calibrated, against the truth
    last = truth["frames"][-1]
    assert b.latest["frame"] == last["frame"]
    for ptype, d in b.by_type.items():
        assert d["mag"] == pytest.approx(last["variable_mag"], abs=0.03), ptype
        assert d["mag_diff"] == pytest.approx(last["variable_mag"], abs=0.03), ptype
        assert 0 < d["mag_err"] < 0.03
    rows = Table.read(workdir / "targets.ecsv", format="ascii.ecsv")
    want = {f["frame"]: f["variable_mag"] for f in truth["frames"]}
    for r in rows:
        assert r["mag"] == pytest.approx(want[r["frame"]], abs=0.03)
        assert r["mag_diff"] == pytest.approx(want[r["frame"]], abs=0.03)

    # the report opens with the target and shows its light curve from the results database
    page = (workdir / "report" / "report.html").read_text()
    assert page.index("Your targets") < page.index('class="cards"')
    assert "DEMO-VAR" in page[: page.index('class="cards"')]
    assert f"{b.mag:.3f} ± {b.mag_err:.3f}" in page
    rep = json.loads((workdir / "report" / "report.json").read_text())
    assert rep["available"]["target_light_curves"] is True
    png = rep["plot_paths"]["lightcurve:DEMO-VAR"]
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    lc = target_light_curve(demo_run["url"], "DEMO-VAR", last_nights=30)
    assert len(lc) == 4 and not np.asarray(lc["upper_limit"]).any()
    assert sorted(lc["frame"]) == sorted(want)

    subject, html_body, text = notify.compose_session_email(s)
    assert "DEMO-VAR: V = " in subject
    assert text.splitlines()[2].startswith("Target DEMO-VAR: V = ")
    assert html_body.index("DEMO-VAR") < html_body.index("Frames reduced")
    tg, _ = notify.compose_session_telegram(s)
    assert tg.splitlines()[1].startswith("\U0001f3af DEMO-VAR: V = ")
    assert "differential" in tg.splitlines()[1]
