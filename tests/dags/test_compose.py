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
    (mapping,) = SERVICES["airflow-apiserver"]["ports"]
    assert mapping.endswith(f":{port}:{port}")  # [bind address:]host port:container port
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


# ----------------------------------------------------------------------------- secrets and exposure
_VAR = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def interpolate(text: str, env: dict) -> str:
    """Compose's variable substitution for the forms this file uses: ``${VAR}``, ``${VAR:-default}``
    (default when unset or empty) and ``${VAR:?message}`` (error when unset or empty)."""

    def sub(m):
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name) or ""
        if op == "-":
            return value or arg
        if op == "?" and not value:
            raise KeyError(f"{name}: {arg}")
        return value

    return _VAR.sub(sub, text)


def _env_example() -> dict:
    out = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def test_ui_is_published_on_loopback_unless_told_otherwise():
    (mapping,) = SERVICES["airflow-apiserver"]["ports"]
    port = ENV["AIRFLOW__API__PORT"]
    assert interpolate(mapping, {}) == f"127.0.0.1:{port}:{port}"
    assert interpolate(mapping, {"RPP_UI_BIND": "0.0.0.0"}) == f"0.0.0.0:{port}:{port}"
    # no other service publishes a port (PostgreSQL and Redis stay on the compose network)
    assert [n for n, s in SERVICES.items() if s.get("ports")] == ["airflow-apiserver"]
    assert "RPP_UI_BIND" in _env_example()


def test_no_default_passwords_and_every_secret_is_required():
    example = _env_example()
    secrets = [k for k in example if re.search(r"PASSWORD|SECRET", k)]
    assert {"RPP_AIRFLOW_PASSWORD", "RPP_POSTGRES_PASSWORD", "RPP_JWT_SECRET"} <= set(secrets)
    assert {k: example[k] for k in secrets if example[k]} == {}  # nothing like 'change-me'
    text = (REPO / "docker-compose.yaml").read_text()
    for name in secrets:
        uses = re.findall(r"\$\{" + name + r"(:[-?][^}]*)?\}", text)
        assert uses and all(u.startswith(":?") for u in uses), (name, uses)
    # with .env copied from the example as it is, compose refuses to start
    with pytest.raises(KeyError, match="RPP_AIRFLOW_PASSWORD|RPP_POSTGRES_PASSWORD|RPP_JWT"):
        interpolate(text, example)
    filled = {**example, **{k: "x" * 64 for k in secrets}}
    rendered = yaml.safe_load(interpolate(text, filled))
    pg = rendered["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    conn = rendered["services"]["airflow-scheduler"]["environment"]
    assert pg == "x" * 64 and f":{pg}@postgres:5432/" in conn["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert f":{pg}@postgres:5432/" in conn["AIRFLOW__CELERY__RESULT_BACKEND"]
    assert "airflow:airflow@" not in text  # the old built-in database password
