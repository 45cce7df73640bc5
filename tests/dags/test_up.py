"""The `rpp up` launcher's configuration (no Airflow process is started here)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rpp_tasks.ops.up import UpSettings, airflow_env, prepare_home, write_env_script


def test_home_secrets_are_persisted_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv("RPP_AIRFLOW_PASSWORD", raising=False)
    settings = UpSettings(home=tmp_path / "home", port=8793)
    first = prepare_home(settings)
    again = prepare_home(settings)
    assert first == again and len(first["jwt_secret"]) >= 48
    pw_file = tmp_path / "home" / "simple_auth_manager_passwords.json"
    assert json.loads(pw_file.read_text()) == {"admin": first["password"]}
    for name in ("jwt_secret", "api_secret_key", "simple_auth_manager_passwords.json"):
        assert stat.S_IMODE((tmp_path / "home" / name).stat().st_mode) == 0o600
    assert prepare_home(settings, password="s3cret")["password"] == "s3cret"


def test_airflow_env(tmp_path):
    settings = UpSettings(home=tmp_path / "home", port=8793)
    sec = prepare_home(settings, password="Pa55-unique-xyz")
    env = airflow_env(settings, sec, base={"PATH": "/usr/bin"})
    assert env["AIRFLOW__API__PORT"] == "8793"
    assert env["AIRFLOW__API__BASE_URL"] == "http://localhost:8793"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://localhost:8793/execution/"
    assert {
        env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"],
        env["AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT"],
    }.isdisjoint({"8793"})
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite:///")
    assert env["AIRFLOW__CORE__DAGS_FOLDER"].endswith("/dags")
    pg = "postgresql+psycopg2://airflow:airflow@127.0.0.1:5432/airflow"
    env_pg = airflow_env(settings, sec, base={"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg})
    assert env_pg["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == pg
    script = write_env_script(settings, env).read_text()
    assert "AIRFLOW_HOME" in script
    assert (
        sec["jwt_secret"] not in script
        and sec["secret_key"] not in script
        and "Pa55-unique-xyz" not in script
    )


# ----------------------------------------------------------------------------- stopping
_FAKE_STANDALONE = """#!{python}
# stands in for `airflow standalone`: a component in its process group, stops on SIGINT
# (leaving that component behind, as a scheduler's task process may be)
import os, pathlib, signal, subprocess, sys, time
child = subprocess.Popen(["sleep", "600"])
signal.signal(signal.SIGINT, lambda *a: sys.exit(0))
pathlib.Path(os.environ["FAKE_AIRFLOW_PIDS"]).write_text(f"{{os.getpid()}} {{child.pid}}")
while True:
    time.sleep(1)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"  # a zombie is dead (nobody may reap it in a container)


def _free_port_block() -> int:
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000 and all(socket.socket().connect_ex(("127.0.0.1", p)) != 0 for p in
                                (port + 2, port + 3)):  # fmt: skip
            return port
    raise RuntimeError("no free port")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_rpp_up_stops_airflow_and_its_process_group_on(sig, tmp_path):
    """`rpp up` in a real subprocess, `airflow standalone` replaced by a script that starts a
    component in its process group: SIGTERM (a service manager) or SIGHUP (the terminal closed)
    stop `rpp up`, the standalone and the component. Before, `rpp up` died at once and both were
    left running, orphaned."""
    fake = tmp_path / "airflow"
    fake.write_text(_FAKE_STANDALONE.format(python=sys.executable))
    fake.chmod(0o755)
    pids_file = tmp_path / "pids"
    env = {
        **os.environ,
        "RPP_AIRFLOW_CMD": str(fake),
        "FAKE_AIRFLOW_PIDS": str(pids_file),
        "RPP_DATA_ROOT": str(tmp_path / "data"),
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [sys.executable, "-m", "rpp_tasks.ops.up", "--no-demo", "--home", str(tmp_path / "home")]
    proc = subprocess.Popen(
        [*cmd, "--port", str(_free_port_block())],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    started = []
    try:
        deadline = time.monotonic() + 120
        while not pids_file.is_file() or len(pids_file.read_text().split()) < 2:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the fake standalone never started"
            time.sleep(0.2)
        started = [int(p) for p in pids_file.read_text().split()]
        assert all(_running(p) for p in started)
        time.sleep(0.5)  # rpp up is now waiting for the API to become healthy
        proc.send_signal(sig)
        rc = proc.wait(60)
        out = proc.stdout.read()
        assert rc == 0, out
        assert f"{sig.name} received, stopping" in out and "stopping Airflow" in out
        deadline = time.monotonic() + 20
        while any(_running(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_running(p) for p in started), "Airflow's process group outlived rpp up"
    finally:
        for pid in [proc.pid, *started]:  # only what this test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
