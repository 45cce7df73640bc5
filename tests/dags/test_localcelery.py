"""`rpp up --executor celery` starts every component of the Celery deployment and stops them all.

`airflow` is replaced by a script (``RPP_AIRFLOW_CMD``) that records what it was asked to run;
each "component" starts a child in a process group of its own, as Airflow's task supervisor does
with a task process. SIGTERM to ``rpp up`` must leave nothing behind. The real deployment is run
by tests/integration/test_celery.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from rpp_tasks.ops.localcelery import free_port, pid_alive, process_tree

_FAKE_AIRFLOW = """#!{python}
import json, os, pathlib, signal, subprocess, sys, time
rec = pathlib.Path(os.environ["FAKE_AIRFLOW_DIR"])
if sys.argv[1:3] == ["db", "migrate"]:
    (rec / "migrated").write_text("yes")
    sys.exit(0)
# a task process: its own process group (os.setpgid in Airflow's supervisor), ignores SIGTERM
child = subprocess.Popen(["sleep", "600"], start_new_session=True)
name = "-".join(a for a in sys.argv[1:3] if not a.startswith("-"))
(rec / f"{{name}}-{{os.getpid()}}.json").write_text(json.dumps({{
    "argv": sys.argv[1:], "pid": os.getpid(), "child": child.pid,
    "hostname": os.environ.get("RPP_WORKER_HOSTNAME"),
    "executor": os.environ["AIRFLOW__CORE__EXECUTOR"],
}}))
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    time.sleep(1)
"""


def test_rpp_up_celery_starts_every_component_and_sigterm_stops_them_all(tmp_path):
    fake = tmp_path / "airflow"
    fake.write_text(_FAKE_AIRFLOW.format(python=sys.executable))
    fake.chmod(0o755)
    rec = tmp_path / "rec"
    rec.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        "RPP_AIRFLOW_CMD": str(fake),
        "FAKE_AIRFLOW_DIR": str(rec),
        "RPP_DATA_ROOT": str(tmp_path / "data"),
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [
        sys.executable, "-m", "rpp_tasks.ops.up", "--no-demo", "--home", str(tmp_path / "home"),
        "--port", str(free_port()), "--executor", "celery", "--workers", "3",
        "--db", "postgresql+psycopg2://nobody@127.0.0.1:9/none",
        "--broker", "redis://127.0.0.1:9/0",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    seen: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(list(rec.glob("*.json"))) < 7:  # 4 services + 3 workers
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, sorted(p.name for p in rec.iterdir())
            time.sleep(0.2)
        comps = [json.loads(p.read_text()) for p in rec.glob("*.json")]
        assert (rec / "migrated").is_file()  # the schema is migrated before anything starts
        assert sorted(" ".join(c["argv"][:2]) for c in comps) == sorted(
            ["api-server", "scheduler", "dag-processor", "triggerer", *["celery worker"] * 3]
        )
        assert {c["executor"] for c in comps} == {"CeleryExecutor"}
        workers = [c for c in comps if c["argv"][:2] == ["celery", "worker"]]
        assert sorted(c["hostname"] for c in workers) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        assert all("--skip-serve-logs" in c["argv"] for c in workers)
        seen = process_tree(proc.pid)  # rpp up, the components, their task processes, log server
        assert {c["child"] for c in comps} <= set(seen)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(90)
        out = proc.stdout.read()
        assert rc == 0, out
        assert "SIGTERM received, stopping" in out
        assert not [p for p in seen if pid_alive(p)], "a process outlived rpp up"
    finally:
        for pid in seen or [proc.pid]:  # only what this test started
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
