"""Issue 12 at the DAG edges: the reconcile DAG triggers revisions in order, and a reduction
DAG run's conf cannot reach outside the observatory's folders."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
FITS_BLOCK = b"SIMPLE  =                    T".ljust(80) + b"END".ljust(80) + b" " * 2720


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def obs1(tmp_path, monkeypatch):
    cfg = tmp_path / "config"
    (cfg / "observatories").mkdir(parents=True)
    shutil.copy(REPO / "config" / "defaults.yaml", cfg / "defaults.yaml")
    (cfg / "observatories" / "obs1.yaml").write_text(
        "observatory: obs1\nsession: {ready_rule: quiet, quiet_seconds: 1}\n"
    )
    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("RPP_CONFIG_DIR", str(cfg))
    return cfg


def test_reconcile_triggers_a_changed_session_as_its_next_revision(obs1, tmp_path, monkeypatch):
    """Files added after the watcher's confirmed run: the reconcile DAG triggers revision 2
    (``session__<id>__r2``) once the first run is no longer queued or running."""
    from rpp_tasks.config import find_config
    from rpp_tasks.ops.readiness import content_digests, rule_from_config, take_snapshot
    from rpp_tasks.ops.watch_state import WatchState

    night = tmp_path / "data/incoming/obs1/2025-01-15"
    night.mkdir(parents=True)
    (night / "light_001.fits").write_bytes(FITS_BLOCK)
    obs = find_config("obs1")
    rule = rule_from_config(obs)
    state = WatchState(tmp_path / "data/work/obs1/watch_state.json")
    state.sessions["2025-01-15"] = {
        "revision": 1,
        "run_id": "session__2025-01-15",
        "confirmed": True,
        "files": content_digests(take_snapshot(night, rule), rule),
    }
    state.save()
    (night / "light_002.fits").write_bytes(FITS_BLOCK)
    time.sleep(1.1)  # quiet_seconds (ctime cannot be faked)
    mod = _load_module(DAGS / "rpp_reconcile.py", "rpp_reconcile_revisions_under_test")
    monkeypatch.setattr(mod, "SETTLE_SECONDS", 0.0)
    active = {"session__2025-01-15": True}
    asked = []

    def run_active(dag_id, run_id):
        asked.append((dag_id, run_id))
        return active.get(run_id, False)

    assert mod.find_missing_runs(obs1, run_active=run_active) == []
    assert asked == [("rpp_obs1", "session__2025-01-15")]
    assert mod.find_missing_runs(obs1, run_active=lambda d, r: None) == []  # unknown: wait
    active.clear()
    assert mod.find_missing_runs(obs1, run_active=run_active) == [
        {
            "trigger_dag_id": "rpp_obs1",
            "trigger_run_id": "session__2025-01-15__r2",
            "conf": {
                "observatory": "obs1",
                "session_id": "2025-01-15",
                "session_dir": str(night),
                "revision": 2,
            },
        }
    ]


def test_dag_validate_refuses_a_session_id_that_leaves_the_work_folder(tmp_path, monkeypatch):
    """The run conf ``session_id='../../victim'`` wrote into and deleted ``frames/`` of
    another folder. The validate task must fail the run and leave that folder alone."""
    from airflow.sdk.exceptions import AirflowFailException

    from rpp_tasks.config import find_config

    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path))
    obs = find_config("demo")
    night = obs.resolve_path("incoming") / "2025-01-15"
    night.mkdir(parents=True)
    (night / "light_001.fits").write_bytes(FITS_BLOCK)
    victim = tmp_path / "data" / "victim" / "frames" / "x"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("someone's products")
    mod = _load_module(DAGS / "rpp_reduction.py", "rpp_reduction_conf_under_test")
    validate = mod.build_reduction_dag(obs).get_task("validate")
    params = {"observatory": "demo", "session_dir": str(night), "session_id": "../../victim"}
    try:
        with pytest.raises(AirflowFailException, match="session_id"):
            validate.python_callable(params=params)
    finally:
        assert (victim / "keep.txt").exists(), "frames/ of another folder was deleted"
        assert not (tmp_path / "data" / "victim" / "session.json").exists()
