"""No worker takes the night down, and memory is planned from the headers (issue 12, items 2-3).

The worker deaths are real: the pool worker reducing the named frame SIGKILLs itself
(``RPP_TEST_KILL_FRAME``, `rpp_tasks.session.pool`), as the out-of-memory killer would."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from rpp_tasks.config import find_config
from rpp_tasks.session import lifecycle, pool
from rpp_tasks.sim import synthetic

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _data_root(tmp_path, monkeypatch):  # master library and work folders of the test's own
    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path / "root"))


@pytest.fixture(scope="module")
def obs():
    return find_config("demo", REPO / "config")


@pytest.fixture(scope="module")
def small_night(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool_night")
    raw = root / "2025-01-15"
    synthetic.write_synthetic_session(
        raw, truth_folder=root / "truth", n_science=3, n_bias=3, n_dark=0, n_flat=0,
        shape=(128, 128), seed=11,
    )  # fmt: skip
    return raw


def _stems(session):
    return [f["stem"] for f in session.read_json("manifest.json")["science"]]


def test_killed_worker_frame_is_retried_alone_then_rejected(
    small_night, obs, tmp_path, monkeypatch
):
    session = lifecycle.open_session(small_night, obs, work_root=tmp_path)
    victim = _stems(session)[1]
    monkeypatch.setenv("RPP_TEST_KILL_FRAME", victim)
    monkeypatch.setenv("RPP_TEST_KILL_STAGE", "cosmics")
    lifecycle.run_stage(session, obs, "masters")
    res = lifecycle.run_stage(session, obs, ("calibrate", "cosmics"), workers=2)
    assert res["n_ok"] == 2 and res["n_rejected"] == 1, res
    reason = res["rejected"][victim]["reason"]
    assert reason.startswith("worker killed (signal 9, SIGKILL) while reducing 128×128 frame")
    assert "at cosmics" in reason and "likely out of memory" in reason
    assert "retried alone" in reason  # it died twice: in the shared pool, then alone
    assert session.rejected()[victim] == {
        "reason": reason,
        "stage": "cosmics",  # the stage its worker was running
        "path": session.read_json("manifest.json")["science"][1]["path"],
    }
    # the others' results are kept and the night goes on: summary and report
    monkeypatch.delenv("RPP_TEST_KILL_FRAME")
    lifecycle.run_stage(session, obs, lifecycle.table_for(obs).names[3:], workers=2)
    summary, made = lifecycle.finish(session, obs)
    assert summary.n_ok == 2 and summary.n_science == 3
    bad = next(f for f in summary.frames if f.frame == victim)
    assert bad.status == "rejected" and bad.reason == reason and bad.date_obs
    assert Path(made["report"]).is_file()
    assert not list(session.workdir.glob("frames/*/.worker"))


def test_worker_killed_once_frame_succeeds_when_retried_alone(
    small_night, obs, tmp_path, monkeypatch
):
    session = lifecycle.open_session(small_night, obs, work_root=tmp_path)
    victim = _stems(session)[0]
    monkeypatch.setenv("RPP_TEST_KILL_FRAME", victim)
    monkeypatch.setenv("RPP_TEST_KILL_ONCE", "1")
    lifecycle.run_stage(session, obs, "masters")
    res = lifecycle.run_stage(session, obs, ("calibrate", "cosmics"), workers=2)
    assert res["n_ok"] == 3 and res["n_rejected"] == 0, res
    assert (session.frame_dir(victim) / ".test_killed").is_file()  # it did die once
    assert set(res["peak_rss_mb"]) == set(_stems(session))
    assert all(50 < v < 4000 for v in res["peak_rss_mb"].values()), res["peak_rss_mb"]


def test_memory_plan_runs_big_frames_alone_and_rejects_what_never_fits(obs, tmp_path):
    """Budget 500 MB per worker, 2 workers, 10 000 B/px: 128² (464 MB) shares the pool, 256²
    (955 MB) runs alone, 512² (2.9 GB > 2 x 500 MB) is rejected before it is read."""
    raw = tmp_path / "raw" / "2025-01-15"
    raw.mkdir(parents=True)
    for size in (128, 256, 512):
        d = tmp_path / f"s{size}"
        paths = synthetic.write_synthetic_session(
            d, truth_folder=tmp_path / f"t{size}", n_science=1, n_bias=0, n_dark=0, n_flat=0,
            shape=(size, size), seed=size,
        )  # fmt: skip
        shutil.copy(paths["science"][0], raw / f"sci_{size}.fits")
    o = dataclasses.replace(
        obs,
        session=dataclasses.replace(obs.session, memory_per_worker_mb=500, bytes_per_pixel=1e4),
    )
    session = lifecycle.open_session(raw, o, work_root=tmp_path / "work")
    lifecycle.run_stage(session, o, "masters")
    res = lifecycle.run_stage(session, o, ("calibrate",), workers=2)
    assert res["memory_budget_mb"] == 500
    assert res["alone"] == ["sci_256"], res
    assert set(res["rejected"]) == {"sci_512"}, res
    reason = res["rejected"]["sci_512"]["reason"]
    assert reason.startswith("512×512 frame needs about 2.7 GB")
    assert "session's memory budget of 1.0 GB (2 worker(s) x 0.5 GB" in reason
    assert res["n_ok"] == 2 and set(res["peak_rss_mb"]) == {"sci_128", "sci_256"}
    summ = json.loads((session.frame_dir("sci_512") / "summary.json").read_text())
    assert summ["status"] == "rejected" and summ["exptime_s"]  # header facts kept
    # one worker: a frame above the budget can never fit
    res1 = lifecycle.run_stage(session, o, ("calibrate",), workers=1)
    assert set(res1["rejected"]) == {"sci_256", "sci_512"}


def test_estimate_and_budget_defaults(obs):
    assert pool.frame_peak_bytes((8192, 8192)) == pool.BASE_BYTES + 40 * 8192**2
    assert pool.frame_peak_bytes(None) == pool.BASE_BYTES
    ram = pool.machine_memory_bytes()
    assert pool.memory_budget_bytes(obs, 2, {}) == int(0.8 * ram / 2)
    # heavy tasks that share the host (the deployment's RPP_TASKS_PER_HOST) share its RAM
    assert pool.memory_budget_bytes(obs, 2, {"RPP_TASKS_PER_HOST": "3"}) == int(0.8 * ram / 6)
    assert pool.memory_budget_bytes(obs, 2, {"RPP_TASKS_PER_HOST": "?"}) == int(0.8 * ram / 2)
    o = dataclasses.replace(
        obs, session=dataclasses.replace(obs.session, memory_per_worker_mb=3000)
    )
    assert pool.memory_budget_bytes(o, 2) == 3000 * 2**20
