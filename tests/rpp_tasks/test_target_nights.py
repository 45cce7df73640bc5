"""Synthetic multi-night truth (`rpp_tasks.sim.nights`) through the per-frame chain, offline with
the field's reference catalogue as a local file: the variable's period and amplitude, the constant
target's differential scatter against its errors, the transient only on its nights, field
variables kept out of the comparison ensemble; bad nights recorded with their reasons.

The frames go through `rpp_tasks.session.pipeline.reduce_frame` (every per-frame stage: calibration
with the first night's masters, detection, astrometry, photometry, zero point, enrichment,
transients), then `rpp_tasks.stages.target.run_targets` for each night, which records the
photometry in a results database; the light curves are read back from it. The bad-input and
two-field nights go through `rpp_tasks.session.lifecycle.reduce_session`, whose ``targets`` stage
and record step do the same.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from astropy.table import Table

from rpp_tasks.config import config_from_dict
from rpp_tasks.outputs import db, lightcurve
from rpp_tasks.session import lifecycle, pipeline
from rpp_tasks.sim.nights import write_nights
from rpp_tasks.stages import catalogs
from rpp_tasks.stages.catalogs import CatalogCache, angular_sep_deg
from rpp_tasks.stages.target import run_targets

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _obs(root, truth, *, enrichment=("vsx",), resolve_online=False):
    d = truth.offline_config(
        root, enrichment=enrichment, resolve_online=resolve_online, store_all_sources=True
    )
    d["targets"]["objects"][1]["aliases"] = ["the constant one"]
    return config_from_dict(d)


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    root = tmp_path_factory.mktemp("nights")
    truth = write_nights(
        root, n_nights=40, frames_per_night=4, shape=(256, 256), density_per_deg2=16000, seed=0
    )
    # the VSX variables of the field were cached while online (as `rpp catalog fetch` does)
    vsx = Table.read(truth.vsx, format="ascii.ecsv")
    CatalogCache(root / "cache").put("vsx", 120.0, 25.0, 0.15, vsx)
    obs = _obs(root, truth)
    url = db.default_results_url(root)
    catalogs.reset_circuit_breaker()
    first = lifecycle.open_session(truth.nights[0], obs, work_root=root / "work")
    lifecycle.run_stage(first, obs, "masters")
    masters = first.read_json("masters.json")
    summaries = {}
    for night in truth.nights:
        wd = root / "work" / night.name
        for raw in sorted(night.glob("SYNTH-FIELD_*.fits")):
            s = pipeline.reduce_frame(raw, obs, wd / "frames" / raw.stem, masters=masters)
            assert s["status"] == "ok", (raw.name, s["reason"])
        summaries[night.name] = run_targets(wd, obs, results_url=url)
    return root, truth, url, summaries


def _lc(url, name):
    with db.ResultsDB(url) as rdb:
        return lightcurve.light_curve(rdb, name)


def test_variable_light_curve_recovers_period_and_amplitude(nights):
    root, truth, url, _ = nights
    var = truth.targets["variable"]
    lc = _lc(url, "SYN-VAR")
    assert len(lc.table) == len(truth.frames) == 160
    assert lc.to_dict()["n_detected"] == 160 and lc.to_dict()["n_nights"] == 40
    for column in ("mag_diff", "mag"):  # differential and absolute
        period, amp = lightcurve.period_amplitude(lc, column=column)
        assert period == pytest.approx(var["period_d"], rel=0.005), (column, period)
        assert amp == pytest.approx(var["amplitude_mag"], rel=0.02), (column, amp)
    # each point against the truth: unbiased, and the errors describe the scatter
    true_mag = {f["frame"]: f["variable_mag"] for f in truth.frames}
    t = lc.table
    d = np.asarray(t["mag_diff"]) - np.asarray([true_mag[f] for f in t["frame"]])
    assert abs(np.median(d)) < 0.005
    assert 0.8 < np.std(d / np.asarray(t["mag_diff_err"])) < 1.25
    # BJD_TDB of the variable at mid-exposure, as the truth computed it
    bjd_true = {f["frame"]: f["bjd_tdb_variable"] for f in truth.frames}
    dt_s = (np.asarray(t["bjd_tdb"]) - [bjd_true[f] for f in t["frame"]]) * 86400
    assert np.max(np.abs(dt_s)) < 0.01


def test_constant_target_scatter_matches_its_errors(nights):
    _, truth, url, _ = nights
    t = _lc(url, "the constant one").table  # an alias of the configured target
    m, e = np.asarray(t["mag_diff"]), np.asarray(t["mag_diff_err"])
    assert len(m) == 160 and np.isfinite(m).all() and (e > 0).all()
    w = 1 / e**2
    mean = np.sum(w * m) / np.sum(w)
    norm_rms = math.sqrt(np.sum(((m - mean) / e) ** 2) / (len(m) - 1))
    assert 0.9 < norm_rms < 1.1, norm_rms  # scatter within 10 % of the reported errors
    assert mean == pytest.approx(truth.targets["constant"]["mag"], abs=0.01)  # catalogue scale


def test_transient_is_a_candidate_only_on_its_nights(nights):
    root, truth, url, _ = nights
    tr = truth.targets["transient"]
    on_nights = {truth.nights[i].name for i in tr["nights"]}
    per_night = {}
    for night in truth.nights:
        hits = []
        for fdir in sorted((root / "work" / night.name / "frames").iterdir()):
            cand = Table.read(fdir / "candidates.ecsv", format="ascii.ecsv")
            sep = angular_sep_deg(tr["ra_deg"], tr["dec_deg"], cand["ra"], cand["dec"]) * 3600
            hits.append(bool(len(cand)) and bool(np.any(sep < 2.0)))
        per_night[night.name] = hits
    for name, hits in per_night.items():
        assert all(hits) if name in on_nights else not any(hits), (name, hits)
    # its light curve: detections on those nights, upper limits (fainter than it) elsewhere
    t = _lc(url, "SYN-TRANSIENT").table
    lim = np.asarray(t["upper_limit"], bool)
    det_nights = set(np.asarray(t["night_date"]).astype(str)[~lim])
    assert det_nights == on_nights
    assert np.all(np.asarray(t["limit_mag"])[lim] > tr["mag"] + 1.5)
    assert np.nanmedian(np.asarray(t["mag_diff"])[~lim]) == pytest.approx(tr["mag"], abs=0.03)


def test_field_variables_are_kept_out_of_the_ensemble(nights):
    root, truth, _, summaries = nights
    fvs = [v for v in truth.targets["field_variables"] if not v["in_vsx"]]
    vsx = [v for v in truth.targets["field_variables"] if v["in_vsx"]]
    rejected = {v["name"]: 0 for v in fvs}
    used = {v["name"]: 0 for v in fvs + vsx}
    for night in truth.nights:
        comp = Table.read(root / "work" / night.name / "comparison_stars.ecsv")
        comp = comp[comp["phot_type"] == "psf"]
        for v in fvs + vsx:
            sep = angular_sep_deg(v["ra_deg"], v["dec_deg"], comp["ra"], comp["dec"]) * 3600
            row = comp[sep < 2.0]
            if len(row):
                used[v["name"]] += int(row["used"][0])
                if v in fvs:
                    rejected[v["name"]] += "variable" in str(row["reason"][0])
    assert sum(used.values()) == 0, used  # never a comparison star
    assert all(n >= 30 for n in rejected.values()), rejected  # found variable night by night
    # the VSX variable is excluded before any fit (from the cached VSX cone, offline)
    ens = json.loads((root / "work" / truth.nights[0].name / "targets.json").read_text())
    assert ens["ensembles"]["V"]["psf"]["removed"]["vsx_variable"] >= 1
    for s in summaries.values():
        assert s["ensembles"]["V"]["psf"]["status"] == "ok"
        assert s["ensembles"]["V"]["psf"]["n_used"] >= 10


def test_every_catalogue_source_has_its_light_curve_too(nights):
    """``targets.store_all_sources``: the light curve of any catalogue-matched star is one query."""
    root, truth, url, _ = nights
    with db.ResultsDB(url) as rdb:
        sources = rdb.find_objects(kind="source")
        assert len(sources) > 50
        fv = next(v for v in truth.targets["field_variables"] if not v["in_vsx"])
        lc = lightcurve.light_curve(rdb, (fv["ra_deg"], fv["dec_deg"]))
    assert lc.objects[0]["kind"] == "source" and lc.objects[0]["key"].startswith("ref:Gaia DR3 ")
    t = lc.table
    assert len(t) >= 150
    true_mag = {f["frame"]: f["field_variables"][fv["name"]] for f in truth.frames}
    d = np.asarray(t["mag_diff"]) - np.asarray([true_mag[f] for f in t["frame"]])
    assert np.nanstd(d) < 0.02 and abs(np.nanmedian(d)) < 0.01  # it follows its true variation


def test_bad_input_is_recorded_and_the_session_goes_on(tmp_path, monkeypatch):
    """An unknown name offline, a target outside the field, a night of thick clouds without
    comparison stars: each recorded with its reason by the reduction's ``targets`` stage (run
    parameters of ``reduce_session``), the sessions reduced, summarised and recorded."""
    truth = write_nights(
        tmp_path,
        n_nights=2,
        frames_per_night=3,
        shape=(256, 256),
        density_per_deg2=16000,
        cloud_nights={1: 3.0},
        seed=5,
    )
    obs = _obs(tmp_path, truth, enrichment=())
    url = db.default_results_url(tmp_path)
    monkeypatch.setenv("RPP_RESULTS_DB_URL", url)  # the record step's database
    catalogs.reset_circuit_breaker()
    outs, sids, sums = [], [], []
    for night in truth.nights:
        summary = lifecycle.reduce_session(
            night,
            obs,
            work_root=tmp_path / "work",
            workers=1,
            report=False,
            targets=["SN 2099zzz", "121.0 +25.0", "SYN-VAR"],
        )[0]
        s = summary.to_dict()
        assert s["n_ok"] == s["n_science"] == 3
        assert summary.results_db_error is None
        sids.append(s["session_id"])
        sums.append(summary)
        outs.append(json.loads((tmp_path / "work" / night.name / "targets.json").read_text()))
    clear, cloudy = (o["summary"] for o in outs)
    for out, summary in zip((clear, cloudy), sums):
        why = {u["query"]: u["reason"] for u in out["unresolved"]}
        assert (
            "not in the observatory's targets" in why["SN 2099zzz"]
            and "offline" in why["SN 2099zzz"]
        )
        assert "SYNTH-FIELD" in why  # the OBJECT card names the field, not a target
        far = next(t for t in out["targets"] if t["name"] == "J121.00000+25.00000")
        assert far["n_outside_field"] == 3 and "outside the field" in far["reason"]
        assert out["results_db"] == {"recorded": False}  # the record step writes the database
        # the typed summary carries the same facts
        assert {u["query"]: u["reason"] for u in summary.targets_unresolved} == why
        t_far = next(t for t in summary.targets if t.name == "J121.00000+25.00000")
        assert not t_far.measured and "outside the field" in t_far.reason
    assert clear["ensembles"]["V"]["psf"]["status"] == "ok"
    ens = cloudy["ensembles"]["V"]["psf"]
    assert ens["status"] == "failed" and "no comparison stars" in ens["reason"]
    assert "low_snr" in ens["reason"]
    var = next(t for t in cloudy["targets"] if t["name"] == "SYN-VAR")
    assert var["n_frames"] == 3  # still measured: absolute magnitude or upper limit
    (band,) = next(t for t in sums[1].targets if t.name == "SYN-VAR").bands
    assert band.mag_diff is None and "no comparison stars" in band.ensemble
    # the light curve holds both nights; the cloudy night has no differential magnitude
    t = _lc(url, "SYN-VAR").table
    assert len(t) == 6
    cloudy_rows = np.asarray(t["session_id"]).astype(str) == sids[1]
    assert np.all(np.isnan(np.asarray(t["mag_diff"])[cloudy_rows]))
    assert np.all(np.isfinite(np.asarray(t["mag_diff"])[~cloudy_rows]))
    # the pipeline's own records of the sessions are there too (frames joined to photometry)
    with db.ResultsDB(url) as rdb:
        rows = rdb.frame_rows("nights", sids[1])
        assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    # a database that cannot be written is kept in the summary; the products stand
    monkeypatch.setenv("RPP_RESULTS_DB_URL", "postgresql://rpp@127.0.0.1:9/nowhere")  # refused
    summary = lifecycle.reduce_session(
        truth.nights[0], obs, work_root=tmp_path / "work2", workers=1, report=False
    )[0]
    assert summary.n_ok == 3 and summary.results_db_error
    assert any(t.name == "SYN-VAR" and t.n_detected == 3 for t in summary.targets)


def test_two_fields_in_one_night_get_their_own_ensembles(tmp_path):
    """An observer images two fields in a night: each field (and band) has its own comparison
    ensemble; a target is measured where it is and recorded as outside the other field."""
    import shutil

    a = write_nights(
        tmp_path / "a",
        n_nights=1,
        frames_per_night=3,
        shape=(256, 256),
        density_per_deg2=16000,
        seed=7,
    )
    b = write_nights(
        tmp_path / "b",
        n_nights=1,
        frames_per_night=3,
        shape=(256, 256),
        density_per_deg2=16000,
        center_deg=(121.0, 26.0),
        object_name="FIELD-B",
        seed=8,
    )
    night = a.nights[0]
    for p in b.nights[0].glob("FIELD-B_*.fits"):
        shutil.copy(p, night / p.name)
    obs = _obs(tmp_path / "a", a, enrichment=())
    obs = config_from_dict(
        {
            **{k: v for k, v in obs.to_dict().items() if k not in ("source", "config_hash")},
            "catalogs": {
                **obs.to_dict()["catalogs"],
                "local": [str(tmp_path / "a" / "catalogs"), str(tmp_path / "b" / "catalogs")],
            },
        }
    )
    catalogs.reset_circuit_breaker()
    s = lifecycle.reduce_session(night, obs, work_root=tmp_path / "work", workers=1, report=False)[
        0
    ].to_dict()
    assert s["n_ok"] == s["n_science"] == 6
    url = db.default_results_url(tmp_path)
    out = run_targets(s["workdir"], obs, results_url=url)
    ens = out["ensembles"]
    assert set(ens) == {"V field 1", "V field 2"}
    assert all(e["psf"]["status"] == "ok" and e["psf"]["n_used"] >= 5 for e in ens.values())
    var = next(t for t in out["targets"] if t["name"] == "SYN-VAR")
    assert var["n_detected"] == 3 and var["n_outside_field"] == 3
    t = _lc(url, "SYN-VAR").table
    assert len(t) == 3 and np.isfinite(np.asarray(t["mag_diff"])).all()  # no outside-field rows
