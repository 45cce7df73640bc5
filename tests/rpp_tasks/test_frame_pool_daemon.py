"""The frame pool of ``run_stage`` starts inside a Celery prefork pool child.

A Celery prefork worker (billiard) runs a task in a daemonic pool child and Airflow's supervisor
forks the task process from it; the fork inherits the daemon flag, and ``ProcessPoolExecutor``
refused to start there (``AssertionError: daemonic processes are not allowed to have children``:
every ``calibrate`` failed on a CeleryExecutor deployment). Reproduced here without Celery:
a billiard daemonic process forks a "task process" that runs ``run_stage`` with two frame workers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, os, sys
import billiard
import multiprocessing as mp

raw, work, out = sys.argv[1:4]

def task_process():
    from rpp_tasks.config import find_config
    from rpp_tasks.session import lifecycle
    obs = find_config("demo")
    s = lifecycle.open_session(raw, obs, work_root=work)
    lifecycle.run_stage(s, obs, "masters")
    res = lifecycle.run_stage(s, obs, ("calibrate", "cosmics"), workers=2)
    with open(out, "w") as fh:
        json.dump({"n_ok": res["n_ok"], "n_frames": res["n_frames"],
                   "daemon_after": mp.current_process()._config.get("daemon")}, fh)

def pool_child():                      # what billiard runs a Celery task in
    assert mp.current_process()._config.get("daemon") is True
    pid = os.fork()                    # Airflow's supervisor forks the task process
    if pid == 0:
        code = 0
        try:
            task_process()
        except BaseException as exc:
            import traceback; traceback.print_exc()
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))

ctx = billiard.get_context("fork")
p = ctx.Process(target=pool_child, daemon=True)
p.start()
p.join()
sys.exit(p.exitcode)
"""


@pytest.fixture(scope="module")
def raw_night(tmp_path_factory):
    from rpp_tasks.sim import synthetic

    root = tmp_path_factory.mktemp("daemon_night")
    raw = root / "2025-01-15"
    synthetic.write_synthetic_session(
        raw, truth_folder=root / "truth", n_science=3, n_bias=2, n_dark=2, n_flat=2,
        shape=(256, 256), seed=11,
    )  # fmt: skip
    return raw


def test_run_stage_pool_starts_in_a_daemonic_celery_child(raw_night, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(raw_night), str(tmp_path / "work"), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "daemonic processes are not allowed" not in proc.stderr
    res = json.loads(out.read_text())
    assert res["n_frames"] == 3 and res["n_ok"] == 3, res
    assert res["daemon_after"] is True  # the inherited process object is restored afterwards
