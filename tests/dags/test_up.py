"""The `rpp up` launcher's configuration (no Airflow process is started here)."""

from __future__ import annotations

import json
import stat

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
