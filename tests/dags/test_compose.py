"""docker-compose.yaml (the scaled-out deployment) against the Airflow that is locked in this project.

Docker is not available on the CI machine, so the containers are not started here; what can be
checked without them is: every ``AIRFLOW__SECTION__KEY`` is a real option of this Airflow (a typo
would be silently ignored at run time), every service command is a real command of this
environment, the URLs agree with each other, the pool is the one the DAGs use and the Dockerfile
copies what exists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
SERVICES = COMPOSE["services"]
ENV = {k: str(v) for k, v in SERVICES["airflow-scheduler"]["environment"].items()}


def _airflow_env(tmp_path) -> dict:
    return {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}


def test_every_airflow_setting_is_a_real_option(tmp_path):
    keys = sorted(
        {
            k
            for svc in SERVICES.values()
            for k in (svc.get("environment") or {})
            if k.startswith("AIRFLOW__")
        }
    )
    assert len(keys) >= 20
    code = (
        "import json, sys\nfrom airflow.configuration import conf\nd = conf.configuration_description\n"
        "print('RESULT ' + json.dumps({k: k.split('__')[2].lower() in d.get(k.split('__')[1].lower(), {})"
        ".get('options', {}) for k in json.loads(sys.argv[1])}))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, json.dumps(keys)],
        env=_airflow_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, res.stderr[-3000:]
    known = json.loads(line[-1][7:])
    assert [k for k, ok in known.items() if not ok] == []


def test_services_run_real_commands(tmp_path):
    cmds = {
        name: svc["command"]
        for name, svc in SERVICES.items()
        if isinstance(svc.get("command"), list) and svc["command"][0] in ("airflow", "rpp")
    }
    assert set(cmds) == {
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
        "rpp-watcher",
    }
    bin_dir = Path(sys.executable).parent
    for name, cmd in cmds.items():
        res = subprocess.run(
            [str(bin_dir / cmd[0]), *cmd[1:], "--help"],
            env=_airflow_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, (name, cmd, res.stdout[-1000:], res.stderr[-2000:])
    init = "\n".join(SERVICES["airflow-init"]["command"])
    assert "airflow db migrate" in init
    from_dag = re.search(
        r'RPP_AIRFLOW_POOL", "([^"]+)"', (REPO / "dags" / "rpp_reduction.py").read_text()
    ).group(1)
    assert f"airflow pools set {from_dag} " in init


def test_urls_and_ports_agree():
    port = ENV["AIRFLOW__API__PORT"]
    assert SERVICES["airflow-apiserver"]["ports"] == [f"{port}:{port}"]
    assert (
        ENV["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]
        == f"http://airflow-apiserver:{port}/execution/"
    )
    assert (
        SERVICES["rpp-watcher"]["environment"]["RPP_AIRFLOW_API_URL"]
        == f"http://airflow-apiserver:{port}"
    )
    assert port not in (
        ENV["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"],
        ENV["AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT"],
    )
    assert ENV["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert "postgres:5432" in ENV["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    # secrets come from .env, never from the file
    assert ENV["AIRFLOW__API_AUTH__JWT_SECRET"].startswith("${") and ENV[
        "AIRFLOW__API__SECRET_KEY"
    ].startswith("${")
    assert ".env" in (REPO / ".gitignore").read_text().split()


@pytest.mark.parametrize(
    "line", [ln for ln in (REPO / "Dockerfile").read_text().splitlines() if ln.startswith("COPY ")]
)
def test_dockerfile_copies_what_exists(line):
    for src in line.split()[1:-1]:
        assert (REPO / src).exists(), line
