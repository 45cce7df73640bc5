"""DAG integrity: the DAG files import cleanly, one DAG per observatory, policy, order, broken
YAML."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

try:
    from airflow.dag_processing.dagbag import DagBag  # Airflow >= 3.1
except ImportError:  # pragma: no cover
    from airflow.models.dagbag import DagBag  # Airflow 3.0

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
#: validate -> the session stages -> the frame stages mapped over chunks of frames -> the
#: session-wide targets stage -> products
CHAIN = ("validate", "masters", "frames", "targets", "products")
HEAVY = {
    "numpy",
    "scipy",
    "astropy",
    "photutils",
    "sep",
    "astroscrappy",
    "matplotlib",
    "astroquery",
    "pyvo",
    "psycopg2",
    "watchdog",
}


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _observatories(config_dir: Path) -> list[str]:
    return sorted(p.stem for p in (config_dir / "observatories").glob("*.yaml"))


@pytest.fixture(scope="module")
def dagbag():
    return DagBag(dag_folder=str(DAGS))


@pytest.fixture
def broken_config_dir(tmp_path, monkeypatch):
    """A copy of config/ where huntsman.yaml has an invalid value and one file is not YAML at
    all."""
    cfg = tmp_path / "config"
    shutil.copytree(REPO / "config", cfg)
    hunts = cfg / "observatories" / "huntsman.yaml"
    hunts.write_text(hunts.read_text().replace("gain_e_per_adu: 1.145", "gain_e_per_adu: -1.0"))
    (cfg / "observatories" / "garbled.yaml").write_text(
        "observatory: garbled\ncamera: {gain: [1, 2\n"
    )
    monkeypatch.setenv("RPP_CONFIG_DIR", str(cfg))
    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path / "data"))
    return cfg


# ----------------------------------------------------------------------------- import and inventory
def test_dags_import_cleanly(dagbag):
    assert dagbag.import_errors == {}


def test_one_dag_per_observatory_plus_reconcile(dagbag):
    expected = [f"rpp_{n}" for n in _observatories(REPO / "config")] + ["rpp_reconcile"]
    assert sorted(dagbag.dag_ids) == sorted(expected)


def test_dag_policy(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert "rpp" in dag.tags, dag_id
        assert dag.doc_md, dag_id
        assert dag.default_args["retries"] >= 2, dag_id
        assert dag.default_args["retry_delay"].total_seconds() > 0, dag_id
        assert dag.default_args["retry_exponential_backoff"] > 0, dag_id
        for t in dag.tasks:
            assert t.retries >= 2, (dag_id, t.task_id)
            assert t.retry_exponential_backoff, (dag_id, t.task_id)
        assert dag.max_active_runs <= 2 and dag.max_active_tasks <= 2, dag_id


#: The long-slit observatories' chain (the ``longslit`` stage table).
LONGSLIT_CHAIN = ("validate", "masters", "spectra", "products")


def test_concurrency_and_retries_come_from_the_scheduling_section(tmp_path, monkeypatch):
    """scheduling.* of the observatory YAML sizes its DAG; a bad value is a config-error DAG
    naming the file and the key."""
    cfg = tmp_path / "config"
    shutil.copytree(REPO / "config", cfg)
    demo = cfg / "observatories" / "demo.yaml"
    demo.write_text(
        demo.read_text()
        + "\nscheduling: {max_active_runs: 3, max_active_tasks: 16, retries: 4, retry_delay_s: 5}\n"
    )
    hunts = cfg / "observatories" / "huntsman.yaml"
    hunts.write_text(hunts.read_text() + "\nscheduling: {max_active_tasks: 0}\n")
    monkeypatch.setenv("RPP_CONFIG_DIR", str(cfg))
    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path / "data"))
    bag = DagBag(dag_folder=str(DAGS))
    demo_dag = bag.dags["rpp_demo"]
    assert (demo_dag.max_active_runs, demo_dag.max_active_tasks) == (3, 16)
    assert demo_dag.get_task("frames").retries == 4
    assert demo_dag.get_task("frames").retry_delay.total_seconds() == 5
    # the shipped defaults: 2 runs, 2 tasks, 2 retries, 10 s first delay (a lost worker)
    seestar = bag.dags["rpp_seestar_s50"]
    assert (seestar.max_active_runs, seestar.max_active_tasks) == (2, 2)
    assert seestar.get_task("masters").retry_delay.total_seconds() == 10
    hunts_dag = bag.dags["rpp_huntsman"]
    assert "config-error" in hunts_dag.tags
    assert "scheduling.max_active_tasks" in hunts_dag.doc_md and "1 to 1024" in hunts_dag.doc_md


def test_reduction_dags_shape(dagbag):
    from rpp_tasks.config import find_config

    kinds = set()
    for name in _observatories(REPO / "config"):
        dag = dagbag.dags[f"rpp_{name}"]
        assert set(dag.tags) == {"rpp", name}
        kind = find_config(name, REPO / "config").instrument_kind
        kinds.add(kind)
        chain = LONGSLIT_CHAIN if kind == "longslit" else CHAIN
        for down in chain[1:]:
            # each task also reads validate's result (the session and its chunks)
            want = set(chain[: chain.index(down)])
            if down == "targets":  # a session task: validate's result, after the frames
                want = {"validate", "frames"}
            assert dag.get_task(down).upstream_task_ids == want, (name, down)
        assert set(dag.task_ids) == {*chain, "archive", "notify"}
        assert dag.get_task("products").downstream_task_ids == {"archive", "notify"}
        assert dag.get_task("validate").upstream_task_ids == set()
        heavy = ("spectra",) if kind == "longslit" else ("masters", "frames")
        for tid in heavy:
            assert dag.get_task(tid).pool == "rpp_heavy"
        if kind == "imaging":  # one task instance per chunk of the night's frames
            assert dag.get_task("frames").is_mapped
        else:  # session stages only: nothing mapped
            assert not any(t.is_mapped for t in dag.tasks)
        assert all(t.on_failure_callback for t in dag.tasks)
        assert dag.on_failure_callback
        assert {"session_dir", "session_id", "observatory"} <= set(dag.params.keys())
        assert dag.schedule is None if hasattr(dag, "schedule") else True
    assert kinds == {"imaging", "longslit"}  # 2spot and ast325_st7 are long-slit


def test_reconcile_dag(dagbag):
    dag = dagbag.dags["rpp_reconcile"]
    assert dag.max_active_runs == 1
    assert dag.get_task("find_missing_runs").downstream_task_ids == {"trigger_missing_runs"}


# ----------------------------------------------------------------------------- broken
# configurations
def test_broken_yaml_keeps_other_dags_and_names_file_and_key(broken_config_dir):
    bag = DagBag(dag_folder=str(DAGS))
    good = [n for n in _observatories(broken_config_dir) if n not in ("huntsman", "garbled")]
    for name in good:
        dag = bag.dags[f"rpp_{name}"]
        assert "config-error" not in dag.tags
        assert dag.task_ids[0] == "validate" or "validate" in dag.task_ids
    # the broken ones become placeholder DAGs carrying the error text
    hunts = bag.dags["rpp_huntsman"]
    assert "config-error" in hunts.tags and hunts.task_ids == ["config_error"]
    assert "huntsman.yaml" in hunts.doc_md and "camera.gain_e_per_adu" in hunts.doc_md
    garbled = bag.dags["rpp_garbled"]
    assert "garbled.yaml" in garbled.doc_md and "<syntax>" in garbled.doc_md
    # ... and an import error on the DAG list page names both files and keys
    (err_file,) = [f for f in bag.import_errors if f.endswith("rpp_config_errors.py")]
    text = bag.import_errors[err_file]
    assert "huntsman.yaml" in text and "camera.gain_e_per_adu" in text
    assert "garbled.yaml" in text
    assert all(not f.endswith("rpp_reduction.py") for f in bag.import_errors)


def test_config_error_task_fails_with_the_error(broken_config_dir):
    from airflow.sdk.exceptions import AirflowFailException

    bag = DagBag(dag_folder=str(DAGS))
    task = bag.dags["rpp_huntsman"].get_task("config_error")
    with pytest.raises(AirflowFailException, match=r"huntsman\.yaml.*camera\.gain_e_per_adu"):
        task.python_callable()


# ----------------------------------------------------------------------------- parse-time behaviour
def _run(code: str, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True, text=True, timeout=120
    )


def test_parsing_imports_no_science_stack():
    code = (
        "import runpy, sys, json\n"
        "for f in ('dags/rpp_reduction.py', 'dags/rpp_reconcile.py',\n"
        "          'dags/rpp_config_errors.py'):\n"
        "    runpy.run_path(f)\n"
        "tops = {n.split('.')[0] for n in sys.modules}\n"
        "mods = sorted(tops | {n for n in sys.modules if n.startswith('rpp_tasks')})\n"
        "print(json.dumps(mods))\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr[-3000:]
    mods = set(json.loads(res.stdout.strip().splitlines()[-1]))
    assert not (HEAVY & mods), HEAVY & mods
    # only the light config layer of rpp_tasks (and the stage table, standard library only) is
    # imported at parse time
    assert {m for m in mods if m.startswith("rpp_tasks.")} <= {
        "rpp_tasks.config",
        "rpp_tasks.config_schema",
        "rpp_tasks.exceptions",
        "rpp_tasks.session",
        "rpp_tasks.session.table",
    }


def test_parsing_context_builds_only_the_dag_being_run():
    code = (
        "import runpy, json\n"
        "g = runpy.run_path('dags/rpp_reduction.py')\n"
        "print(json.dumps(sorted(g['_DAGS'])))\n"
    )
    res = _run(
        code,
        _AIRFLOW_PARSING_CONTEXT_DAG_ID="rpp_demo",
        _AIRFLOW_PARSING_CONTEXT_TASK_ID="validate",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == ["rpp_demo"]


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def reduction_module():
    return _load_module(DAGS / "rpp_reduction.py", "rpp_reduction_under_test")


def test_failure_callback_records_and_calls_notifier(tmp_path, monkeypatch):
    from rpp_tasks.config import find_config
    from rpp_tasks.session import connections, lifecycle

    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path))
    obs = find_config("demo")
    calls = []
    fake_notify = SimpleNamespace(notify_failure=lambda info, o: calls.append((info, o)))
    monkeypatch.setitem(sys.modules, "rpp_tasks.outputs.notify", fake_notify)
    ti = SimpleNamespace(
        dag_id="rpp_demo",
        task_id="detect",
        run_id="session__n1",
        try_number=3,
        max_tries=2,
        log_url="http://x/log",
    )
    ctx = {
        "ti": ti,
        "dag_run": SimpleNamespace(
            conf={"observatory": "demo", "session_id": "n1", "session_dir": "/d/n1"}
        ),
        "exception": RuntimeError("boom"),
        "params": {},
    }
    info = connections.failure_info(ctx)
    assert info["task_id"] == "detect" and info["session_id"] == "n1" and "boom" in info["error"]
    path = lifecycle.record_failure(info, obs)
    assert path == tmp_path / "data/work/demo" / "failures.jsonl"
    assert json.loads(path.read_text().splitlines()[-1])["run_id"] == "session__n1"
    assert calls and calls[0][1] is obs


def test_retry_forgets_only_its_own_rejections(tmp_path):
    from rpp_tasks.session.lifecycle import forget_rejections
    from rpp_tasks.session.table import IMAGING
    from rpp_tasks.session.workdir import Session

    s = Session.create(
        tmp_path / "raw", observatory="demo", work_root=tmp_path / "work", session_id="n1"
    )
    s.reject("a", reason="x", stage="calibrate")
    s.reject("b", reason="x", stage="detect")
    s.reject("c", reason="x", stage="read")  # a checking step inside the calibrate task
    forget_rejections(s, ("background", "detect"), table=IMAGING)
    assert set(s.rejected()) == {"a", "c"}
    forget_rejections(s, ("calibrate",), table=IMAGING)
    assert set(s.rejected()) == set()


def test_reconcile_finds_ready_untriggered_sessions(tmp_path, monkeypatch):
    cfg = tmp_path / "config"
    (cfg / "observatories").mkdir(parents=True)
    shutil.copy(REPO / "config" / "defaults.yaml", cfg / "defaults.yaml")
    (cfg / "observatories" / "obs1.yaml").write_text(
        "observatory: obs1\nsession: {ready_rule: quiet, quiet_seconds: 1}\n"
    )
    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path))
    night = tmp_path / "data/incoming/obs1/2025-01-15"
    night.mkdir(parents=True)
    f = night / "light_001.fits"
    f.write_bytes(b"\0" * 2880)
    time.sleep(1.1)  # quiet_seconds (ctime cannot be faked)
    mod = _load_module(DAGS / "rpp_reconcile.py", "rpp_reconcile_under_test")
    monkeypatch.setattr(mod, "SETTLE_SECONDS", 0.0)
    out = mod.find_missing_runs(cfg)
    assert out == [
        {
            "trigger_dag_id": "rpp_obs1",
            "trigger_run_id": "session__2025-01-15",
            "conf": {
                "observatory": "obs1",
                "session_id": "2025-01-15",
                "session_dir": str(night),
                "revision": 1,
            },
        }
    ]
    assert mod.find_missing_runs(cfg, run_exists=lambda d, r: True) == []
