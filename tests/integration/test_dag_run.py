"""A real run of the rpp_demo DAG through Airflow itself (``dag.test()``) on a synthetic session.

Airflow runs in a subprocess with a throw-away AIRFLOW_HOME and SQLite metadata DB (``airflow db
migrate`` first; ``dag.test()`` serialises the DAG and syncs the dags folder to the DB itself on
3.3). The run must produce a catalogue per science frame and a session summary with
``n_ok == n_science``; a second run of the same session replaces the products (same work folder,
same number of archive rows).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.cli_runs import rpp_reduce, tree_files

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
N_SCIENCE = 3

RUNNER = r"""
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
dag = bag.dags["rpp_demo"]
conf = json.loads(sys.argv[2])
t0 = time.perf_counter()
dr = dag.test(run_conf=conf)
wall = time.perf_counter() - t0
tis = {
    ti.task_id + (f"[{ti.map_index}]" if ti.map_index >= 0 else ""): {
        "state": str(ti.state), "duration": ti.duration, "map_index": ti.map_index
    }
    for ti in dr.get_task_instances()
}
print("RESULT " + json.dumps({"state": str(dr.state), "wall_s": wall, "tasks": tis}))
"""


@pytest.fixture(scope="module")
def airflow_env():
    # A private folder, not pytest's tmp_path: pytest-of-<user> is shared by concurrent pytest
    # sessions, which prune each other's old folders while this long test runs.
    root = Path(tempfile.mkdtemp(prefix="rpp_dag_run_"))
    home, data, config = root / "airflow_home", root / "data", root / "config"
    home.mkdir()
    data.mkdir()
    # the project's configuration, the demo night cut into chunks of at most 2 frames: the DAG
    # runs the frame stages as 2 mapped tasks (2 + 1 frames), rpp reduce in one process
    shutil.copytree(REPO / "config", config)
    demo = config / "observatories" / "demo.yaml"
    # (retries 1 s, 2 s apart: the failing-chunk test waits through them)
    demo.write_text(demo.read_text() + "\nscheduling: {chunk_frames: 2, retry_delay_s: 1}\n")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "RPP_CONFIG_DIR": str(config),
        "RPP_DATA_ROOT": str(data),
        "RPP_WORKERS": "2",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("AIRFLOW__CORE__UNIT_TEST_MODE", None)
    airflow = Path(sys.executable).with_name("airflow")
    res = subprocess.run(
        [str(airflow), "db", "migrate"], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    yield env, data
    shutil.rmtree(root, ignore_errors=True)


def _run_dag(env, conf) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", RUNNER, str(REPO / "dags"), json.dumps(conf)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=REPO,
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stdout[-4000:] + "\n" + res.stderr[-6000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_demo_dag_run_produces_products_and_reruns_idempotently(airflow_env):
    from rpp_tasks.session.table import IMAGING
    from rpp_tasks.sim.synthetic import write_synthetic_session

    env, data = airflow_env
    data = data / "data"  # the configs' relative paths start with data/
    night = data / "incoming" / "demo" / "2025-01-15"
    write_synthetic_session(
        night, truth_folder=data / "truth" / "2025-01-15", n_science=N_SCIENCE, seed=3
    )
    conf = {"observatory": "demo", "session_id": "2025-01-15", "session_dir": str(night)}

    first = _run_dag(env, conf)
    chain = [
        "validate",
        "masters",
        "frames[0]",
        "frames[1]",
        "targets",
        "products",
        "archive",
    ]  # 2 chunks
    assert first["state"] == "success", first
    assert {t: first["tasks"][t]["state"] for t in chain} == {t: "success" for t in chain}, first[
        "tasks"
    ]
    # the demo observatory configures no notification channel: notify is skipped, visibly
    assert first["tasks"]["notify"]["state"] == "skipped", first["tasks"]

    workdir = data / "work" / "demo" / "2025-01-15"
    summary = json.loads((workdir / "session_summary.json").read_text())
    assert summary["n_science"] == N_SCIENCE
    assert summary["n_ok"] == summary["n_science"], [
        (f["frame"], f.get("reason")) for f in summary["frames"]
    ]
    for f in summary["frames"]:
        assert (workdir / "frames" / f["frame"] / "catalog.ecsv").is_file()
        assert (workdir / "frames" / f["frame"] / "catalog.fits").is_file()
    assert set(summary["stage_runs"]) == {"masters", "frames", "targets"}
    frames_run = summary["stage_runs"]["frames"]
    assert frames_run["stages"] == list(IMAGING.frame_stages)
    assert (frames_run["n_chunks"], frames_run["n_frames"]) == (2, N_SCIENCE)
    assert sorted(frames_run["chunk_frames"]) == [1, 2]

    # a re-run of the same session replaces the products in the same work folder
    mtime = (workdir / "session_summary.json").stat().st_mtime
    second = _run_dag(env, conf)
    assert second["state"] == "success", second
    summary2 = json.loads((workdir / "session_summary.json").read_text())
    assert (workdir / "session_summary.json").stat().st_mtime > mtime
    assert summary2["n_ok"] == N_SCIENCE
    assert sorted(p.name for p in (workdir.parent).iterdir() if p.is_dir()) == ["2025-01-15"]
    assert second["tasks"]["archive"]["state"] == "success", second["tasks"]
    import sqlite3

    db = data / "products" / "demo" / "archive.sqlite"
    with sqlite3.connect(db) as con:  # two runs of the session, one row per frame (upsert)
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        (table,) = [t for t in tables if t.endswith("main")]
        assert con.execute(f'select count(*) from "{table}"').fetchone()[0] == N_SCIENCE
    # the products task also built the morning report and the products ZIP
    assert (workdir / "report" / "report.html").stat().st_size > 10_000
    assert (workdir / "2025-01-15_products.zip").stat().st_size > 0

    stage_s = sum(v.get("wall_s", 0) for v in summary2["stage_runs"].values())
    print(
        f"\ndag.test wall {second['wall_s']:.1f} s, run_stage wall {stage_s:.1f} s, "
        f"tasks: { {k: round(v['duration'] or 0, 2) for k, v in second['tasks'].items()} }"
    )


def test_rpp_reduce_and_the_dag_make_the_same_products(airflow_env):
    """``rpp reduce`` (one process, all frames in one pool) and the DAG (masters, then the frame
    stages as one mapped task per chunk of frames, checkpoints on disk) run the same lifecycle:
    same frames, same product files, same catalogue values."""
    import numpy as np
    from astropy.io import fits
    from astropy.table import Table

    from rpp_tasks.session.table import IMAGING
    from rpp_tasks.sim.synthetic import write_synthetic_session

    env, data = airflow_env
    data = data / "data"
    night = data / "incoming" / "demo" / "2025-01-15"
    if not night.is_dir():
        write_synthetic_session(
            night, truth_folder=data / "truth" / "2025-01-15", n_science=N_SCIENCE, seed=3
        )
    dag_dir = data / "work" / "demo" / "2025-01-15"
    if not (dag_dir / "session_summary.json").is_file():
        conf = {"observatory": "demo", "session_id": "2025-01-15", "session_dir": str(night)}
        assert _run_dag(env, conf)["state"] == "success"
    cli_root = data / "cli_work"
    rpp_reduce(env, night, "demo", cli_root)
    cli_dir = cli_root / "2025-01-15"

    checkpoints = {
        f
        for a in IMAGING.artefacts.values()
        if not a.product and a.scope == "frame"
        for f in a.files
    }
    dag_files = {f for f in tree_files(dag_dir) if Path(f).name not in checkpoints}
    dag_files -= {"notify.json"}  # the DAG also tells the observers
    assert tree_files(cli_dir) == dag_files
    s_dag = json.loads((dag_dir / "session_summary.json").read_text())
    s_cli = json.loads((cli_dir / "session_summary.json").read_text())
    assert [f["frame"] for f in s_cli["frames"]] == [f["frame"] for f in s_dag["frames"]]
    assert s_cli["n_ok"] == s_dag["n_ok"] == N_SCIENCE
    assert s_cli["night_date"] == s_dag["night_date"] == "2025-01-15"
    for fc, fd in zip(s_cli["frames"], s_dag["frames"]):
        for key in ("n_sources", "fwhm_px", "fwhm_arcsec", "background_adu", "limiting_mag_inst"):
            assert fc[key] == pytest.approx(fd[key], rel=1e-6), (fc["frame"], key)
        frame = f"frames/{fc['frame']}"
        cat_cli = Table.read(cli_dir / frame / "catalog.ecsv", format="ascii.ecsv")
        cat_dag = Table.read(dag_dir / frame / "catalog.ecsv", format="ascii.ecsv")
        assert cat_cli.colnames == cat_dag.colnames and len(cat_cli) == len(cat_dag)
        for col in cat_cli.colnames:
            a, b = np.asarray(cat_cli[col]), np.asarray(cat_dag[col])
            if a.dtype.kind == "f":
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, equal_nan=True, err_msg=col)
            else:
                assert np.array_equal(a, b), col
        img_cli = fits.getdata(cli_dir / frame / "calibrated.fits")
        img_dag = fits.getdata(dag_dir / frame / "calibrated.fits")
        np.testing.assert_array_equal(img_cli, img_dag)


def _small_night(data: Path, night: str, *, seed: int) -> tuple[Path, list[str]]:
    """A 3-frame 256² demo night with its own calibration frames (the library's masters, of the
    module's 512² nights, do not fit): its folder and science stems."""
    from rpp_tasks.inputs.header import frame_stem
    from rpp_tasks.sim.synthetic import write_synthetic_session

    folder = data / "incoming" / "demo" / night
    paths = write_synthetic_session(
        folder, truth_folder=data / "truth" / night, n_science=3, n_bias=3, n_dark=2, n_flat=3,
        shape=(256, 256), seed=seed, night=night,
    )  # fmt: skip
    return folder, [frame_stem(Path(p)) for p in paths["science"]]


def test_a_killed_worker_does_not_take_the_night_down(airflow_env):
    """Issue 12: the photometry worker of one frame is SIGKILLed (a real process death, as the
    out-of-memory killer does; ``RPP_TEST_KILL_FRAME``) every time it reduces that frame. The
    frame is retried alone, then rejected with the reason; the other frames are reduced and the
    night ends with its summary, report and archive rows."""
    env, data = airflow_env
    data = data / "data"
    night, stems = _small_night(data, "2025-01-20", seed=7)
    victim = stems[1]
    env = {**env, "RPP_TEST_KILL_FRAME": victim, "RPP_TEST_KILL_STAGE": "photometry"}
    conf = {"observatory": "demo", "session_id": "2025-01-20", "session_dir": str(night)}
    run = _run_dag(env, conf)
    states = {t: v["state"] for t, v in run["tasks"].items()}
    failures = data / "work" / "demo" / "failures.jsonl"
    assert run["state"] == "success", (
        json.dumps(states),
        failures.read_text()[-3000:] if failures.is_file() else "",
    )
    assert [t for t in states if t.startswith("frames[")], states
    for t in [*(t for t in states if t.startswith("frames[")), "products", "archive"]:
        assert states[t] == "success", states
    workdir = data / "work" / "demo" / "2025-01-20"
    summary = json.loads((workdir / "session_summary.json").read_text())
    assert summary["n_science"] == 3 and summary["n_ok"] == 2
    (bad,) = [f for f in summary["frames"] if f["status"] != "ok"]
    assert bad["frame"] == victim and bad["failed_stage"] == "photometry"
    assert bad["reason"].startswith("worker killed (signal 9, SIGKILL) while reducing 256×256")
    assert "retried alone" in bad["reason"]
    assert summary["stage_runs"]["frames"]["n_ok"] == 2
    page = (workdir / "report" / "report.html").read_text()
    assert victim in page and "worker killed (signal 9, SIGKILL)" in page
    import sqlite3

    with sqlite3.connect(data / "products" / "demo" / "archive.sqlite") as con:
        ids = [r[0] for r in con.execute("select obs_id from rpp_main")]
    assert sorted(i for i in ids if i.startswith("2025-01-20/")) == sorted(
        f"2025-01-20/{f['frame']}" for f in summary["frames"] if f["status"] == "ok"
    )


def test_a_chunk_that_fails_after_its_retries_costs_its_frames_not_the_night(airflow_env):
    """Issue 16: the chunk task holding one frame fails at every try (``RPP_TEST_FAIL_CHUNK``, as a
    worker that cannot read the work folder or is lost every time). The other chunk, products,
    the report and the archive still run; the failed chunk's frames are rejected naming the task,
    the operators are alerted, and the run ends in success with that one task failed."""
    env, data = airflow_env
    data = data / "data"
    night, stems = _small_night(data, "2025-01-22", seed=8)
    victim = stems[2]  # chunks of at most 2 frames, even shares: [stems[0]], [stems[1], victim]
    env = {**env, "RPP_TEST_FAIL_CHUNK": victim}
    conf = {"observatory": "demo", "session_id": "2025-01-22", "session_dir": str(night)}
    run = _run_dag(env, conf)
    states = {t: v["state"] for t, v in run["tasks"].items()}
    assert run["state"] == "success", states
    assert sorted(t for t in states if t.startswith("frames[")) == ["frames[0]", "frames[1]"]
    assert (states["frames[0]"], states["frames[1]"]) == ("success", "failed"), states
    for t in ("targets", "products", "archive"):
        assert states[t] == "success", states

    workdir = data / "work" / "demo" / "2025-01-22"
    summary = json.loads((workdir / "session_summary.json").read_text())
    assert (summary["n_science"], summary["n_ok"]) == (3, 1)
    by_frame = {f["frame"]: f for f in summary["frames"]}
    assert by_frame[stems[0]]["status"] == "ok"
    for stem in stems[1:]:  # both frames of the failed chunk, each with the reason
        f = by_frame[stem]
        assert f["status"] == "failed" and f["failed_stage"] == "frames", f
        assert f["reason"].startswith("not reduced: its chunk task frames [") and (
            "did not complete" in f["reason"]
        ), f["reason"]
    assert summary["stage_runs"]["frames"]["n_chunks"] == 1  # the chunk that completed
    page = (workdir / "report" / "report.html").read_text()
    assert all(s in page for s in stems[1:]) and "did not complete" in page
    failures = data / "work" / "demo" / "failures.jsonl"
    mine = [
        json.loads(ln)
        for ln in failures.read_text().splitlines()
        if json.loads(ln).get("session_id") == "2025-01-22"
    ]
    assert [m["task_id"] for m in mine] == ["frames"], mine  # the operators' alert, once
    assert "RPP_TEST_FAIL_CHUNK" in mine[0]["error"]
    import sqlite3

    with sqlite3.connect(data / "products" / "demo" / "archive.sqlite") as con:
        ids = [r[0] for r in con.execute("select obs_id from rpp_main")]
    assert sorted(i for i in ids if i.startswith("2025-01-22/")) == [f"2025-01-22/{stems[0]}"]


def test_a_folder_without_science_frames_fails_and_alerts(airflow_env):
    """Issue 12: files but no science frame is a failed run (validate fails, the failure callback
    writes failures.jsonl naming the files), not a skipped one."""
    env, data = airflow_env
    data = data / "data"
    night = data / "incoming" / "demo" / "2025-01-21"
    night.mkdir(parents=True)
    (night / "notes.fits").write_text("not a FITS file\n")
    (night / "focus_0001.fits").write_bytes(b"")
    conf = {"observatory": "demo", "session_id": "2025-01-21", "session_dir": str(night)}
    run = _run_dag(env, conf)
    assert run["state"] == "failed" and run["tasks"]["validate"]["state"] == "failed", run
    failures = data / "work" / "demo" / "failures.jsonl"
    lines = [json.loads(ln) for ln in failures.read_text().splitlines()]
    mine = [ln for ln in lines if ln.get("session_id") == "2025-01-21"]
    assert mine and mine[0]["task_id"] == "validate"
    assert "notes.fits" in mine[0]["error"] and "focus_0001.fits" in mine[0]["error"]
    summary = json.loads((data / "work/demo/2025-01-21/session_summary.json").read_text())
    assert {Path(f["path"]).name for f in summary["files"]} == {"notes.fits", "focus_0001.fits"}
