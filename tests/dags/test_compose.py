"""docker-compose.yaml (the scaled-out deployment) against the Airflow locked in this project and
against `rpp_tasks.ops.deploy`, the one source of its settings (and of ``rpp up --executor
celery``, the same deployment as local processes: tests/integration/test_celery.py runs it).

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

from rpp_tasks.ops import deploy

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
        "import json, sys\n"
        "from airflow.configuration import conf\n"
        "d = conf.configuration_description\n"
        "def known(k):\n"
        "    section, option = k.split('__')[1].lower(), k.split('__')[2].lower()\n"
        "    return option in d.get(section, {}).get('options', {})\n"
        "print('RESULT ' + json.dumps({k: known(k) for k in json.loads(sys.argv[1])}))"
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
    # the pool name and size come from the generated settings ($$ = a literal $ for the shell)
    assert 'airflow pools set "$$RPP_AIRFLOW_POOL" "$$RPP_HEAVY_POOL_SLOTS" ' in init
    assert ENV["RPP_AIRFLOW_POOL"] == from_dag == deploy.HEAVY_POOL
    assert int(ENV["RPP_HEAVY_POOL_SLOTS"]) == deploy.CELERY.heavy_pool_slots


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


# --------------------------------------------------------------------------- one source of settings
def test_compose_settings_are_generated_from_the_library():
    """The file's environment block is exactly what rpp_tasks.ops.deploy renders (regenerate with
    `python -m rpp_tasks.ops.deploy --write-compose`)."""
    text = (REPO / "docker-compose.yaml").read_text()
    assert deploy.render_compose(text) == text, (
        "run: python -m rpp_tasks.ops.deploy --write-compose"
    )
    generated = deploy.airflow_settings(deploy.compose_site(), deploy.CELERY)
    assert COMPOSE["x-airflow-common"]["environment"] == generated
    for name in ("airflow-scheduler", "airflow-worker", "airflow-apiserver", "rpp-watcher"):
        env = SERVICES[name]["environment"]
        assert {k: env[k] for k in generated} == generated, name


def test_local_celery_deployment_has_the_compose_settings(tmp_path):
    """`rpp up --executor celery` runs with every setting of the compose file; only where things
    are (hosts, paths, ports, secrets) differs."""
    from rpp_tasks.ops.localcelery import LocalCelery
    from rpp_tasks.ops.up import UpSettings, airflow_env, prepare_home

    settings = UpSettings(home=tmp_path / "home", port=28793, data_root=tmp_path / "data")
    pg = "postgresql+psycopg2://airflow:pw@127.0.0.1:5432/airflow"
    env = airflow_env(
        settings,
        prepare_home(settings, password="x"),
        base={"PATH": "/usr/bin", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg},
        tuning=deploy.CELERY,
        broker_url="redis://127.0.0.1:6379/3",
    )
    compose = COMPOSE["x-airflow-common"]["environment"]
    assert set(compose) <= set(env)
    same = set(compose) - deploy.TOPOLOGY_KEYS
    assert {k: env[k] for k in same} == {k: compose[k] for k in same}
    assert len(same) >= 20
    # where things are: this machine instead of the compose network
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == pg
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+" + pg
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://127.0.0.1:6379/3"
    assert env["AIRFLOW__API__BASE_URL"] == "http://localhost:28793"
    assert env["RPP_DATA_ROOT"] == str(tmp_path / "data")
    # the same commands as the compose services, plus one log server for the local workers
    cmds = LocalCelery(env, settings.home, n_workers=3).commands()
    assert list(cmds) == [
        "api-server", "scheduler", "dag-processor", "triggerer", "log-server",
        "worker1", "worker2", "worker3",
    ]  # fmt: skip
    for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
        assert (
            cmds[name][0][1:]
            == SERVICES[f"airflow-{name.replace('-server', 'server')}"]["command"][1:]
        )
    worker, extra = cmds["worker2"]
    assert worker[1:4] == SERVICES["airflow-worker"]["command"][1:] + ["--skip-serve-logs"]
    assert extra == {"RPP_WORKER_HOSTNAME": "127.0.0.2"}
    with pytest.raises(ValueError, match="PostgreSQL"):
        LocalCelery({**env, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////x.db"}, tmp_path)


def test_lost_worker_settings():
    """A lost worker is noticed within the heartbeat timeout, not Airflow's 300 s; a running
    task's message is never redelivered while it runs (visibility > execution_timeout 3 h)."""
    assert int(ENV["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"]) <= 60
    assert int(ENV["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL"]) <= 10
    dag_src = (REPO / "dags" / "rpp_reduction.py").read_text()
    hours = int(re.search(r'"execution_timeout": _dt.timedelta\(hours=(\d+)\)', dag_src).group(1))
    assert int(ENV["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT"]) > hours * 3600
    assert ENV["AIRFLOW__CELERY__TASK_ACKS_LATE"] == "True"
    assert ENV["AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER"] == "1"
    assert ENV["AIRFLOW__CELERY__POOL"] in ("prefork", "solo")
    with pytest.raises(ValueError, match="threads"):
        deploy.Tuning(worker_pool="threads")
    # the DAGs' first retry delay (scheduling.retry_delay_s) is 10 s: heartbeat timeout + 10 s
    from rpp_tasks.config import SchedulingConfig

    assert SchedulingConfig().retry_delay_s == 10


def test_pool_size_and_timeouts_from_the_launchers_environment(tmp_path):
    """RPP_HEAVY_POOL_SLOTS, RPP_WORKER_CONCURRENCY, RPP_HEARTBEAT_TIMEOUT_S override the
    deployment's tuning (the defaults otherwise); a bad value names the variable."""
    from rpp_tasks.ops.up import UpSettings, airflow_env

    assert deploy.tuning_from_env(deploy.CELERY, {}) is deploy.CELERY
    t = deploy.tuning_from_env(
        deploy.CELERY, {"RPP_HEAVY_POOL_SLOTS": "16", "RPP_HEARTBEAT_TIMEOUT_S": "45"}
    )
    assert (t.heavy_pool_slots, t.heartbeat_timeout_s, t.worker_concurrency) == (16, 45, 2)
    settings = UpSettings(home=tmp_path / "home", data_root=tmp_path / "data")
    secrets_ = {"jwt_secret": "j" * 64, "secret_key": "k", "passwords_file": "p"}
    env = airflow_env(settings, secrets_, {"RPP_HEAVY_POOL_SLOTS": "6"})
    assert env["RPP_HEAVY_POOL_SLOTS"] == "6"  # what `rpp up` gives the rpp_heavy pool
    standalone = airflow_env(settings, secrets_, {})
    assert standalone["RPP_HEAVY_POOL_SLOTS"] == str(deploy.STANDALONE.heavy_pool_slots)
    assert standalone["RPP_TASKS_PER_HOST"] == standalone["RPP_HEAVY_POOL_SLOTS"]  # one host
    assert env["RPP_TASKS_PER_HOST"] == "6"
    for var, bad in (
        ("RPP_HEAVY_POOL_SLOTS", "0"),
        ("RPP_HEAVY_POOL_SLOTS", "many"),
        ("RPP_WORKER_CONCURRENCY", "-1"),
        ("RPP_HEARTBEAT_TIMEOUT_S", "5"),
    ):
        with pytest.raises(ValueError, match=f"{var}='{bad}': expected an integer from"):
            deploy.tuning_from_env(deploy.STANDALONE, {var: bad})


def test_standalone_fills_the_cores_once():
    """`rpp up` on one host: heavy slots x frame processes = the cores (2 frame processes per
    task; one task on 2 cores), never more; a Celery worker's host runs its concurrency."""
    sized = {
        n: (t.heavy_pool_slots, t.frame_processes, t.parallelism, t.tasks_per_host)
        for n in (1, 2, 3, 8, 64)
        for t in [deploy.standalone_tuning(n)]
    }
    assert sized == {
        1: (1, 1, 4, 1),
        2: (1, 2, 4, 1),
        3: (1, 2, 4, 1),
        8: (4, 2, 7, 4),
        64: (32, 2, 35, 32),
    }
    assert deploy.STANDALONE == deploy.standalone_tuning(os.cpu_count())
    assert deploy.CELERY.tasks_per_host == deploy.CELERY.worker_concurrency


# ----------------------------------------------------------------------------- compose structure
# The rules of the compose specification (compose-spec.json) this file can break; Docker itself
# is not available on the CI machine to run `docker compose config`.
TOP_LEVEL = {"version", "name", "services", "networks", "volumes", "configs", "secrets", "include"}
SERVICE_KEYS = {
    "build", "image", "restart", "environment", "env_file", "volumes", "depends_on", "command",
    "entrypoint", "healthcheck", "ports", "expose", "stop_grace_period", "stop_signal", "user",
    "working_dir", "hostname", "networks", "labels", "deploy", "profiles", "init", "extra_hosts",
    "logging", "ulimits", "shm_size", "tmpfs", "container_name",
}  # fmt: skip
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
RESTART = {"no", "always", "on-failure", "unless-stopped"}
DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")


def test_compose_structure_follows_the_compose_specification():
    assert set(COMPOSE) - TOP_LEVEL <= {k for k in COMPOSE if k.startswith("x-")}
    named_volumes = set(COMPOSE.get("volumes") or {})
    for name, svc in SERVICES.items():
        assert re.fullmatch(r"[a-zA-Z0-9._-]+", name), name
        assert set(svc) <= SERVICE_KEYS, (name, set(svc) - SERVICE_KEYS)
        assert "image" in svc or "build" in svc, name
        assert str(svc.get("restart", "no")) in RESTART, name
        env = svc.get("environment") or {}
        assert isinstance(env, dict), name
        bad = {k: v for k, v in env.items() if not isinstance(v, (str, int, float, bool))}
        assert bad == {}, (name, bad)  # mapping values must be scalars
        cmd = svc.get("command")
        assert cmd is None or isinstance(cmd, str) or all(isinstance(c, str) for c in cmd), name
        for dep_name, dep in (svc.get("depends_on") or {}).items():
            assert dep_name in SERVICES and dep_name != name, (name, dep_name)
            assert dep.get("condition") in CONDITIONS, (name, dep)
            if dep["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dep_name], (name, dep_name)
        hc = svc.get("healthcheck")
        if hc:
            assert set(hc) <= HEALTHCHECK_KEYS, name
            assert hc["test"][0] in ("CMD", "CMD-SHELL", "NONE"), name
            for k in ("interval", "timeout", "start_period", "start_interval"):
                assert k not in hc or DURATION.match(str(hc[k])), (name, k, hc.get(k))
        for k in ("stop_grace_period",):
            assert k not in svc or DURATION.match(str(svc[k])), (name, k)
        for v in svc.get("volumes") or []:
            src = str(v).split(":")[0]
            assert src.startswith((".", "/")) or src in named_volumes, (name, v)
        for port in svc.get("ports", []) + svc.get("expose", []):
            assert isinstance(port, str), (
                name,
                port,
            )  # "a:b" unquoted would be base-60 in YAML 1.1

    # in values, a `$` meant for the container's shell is written `$$`; every other `$` starts a
    # braced compose variable (an unbraced $VAR would silently become "" from .env)
    def strings(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
        elif isinstance(node, str):
            yield node

    for value in strings(COMPOSE):
        for m in re.finditer(r"\$+", value):
            run = m.group(0)
            assert len(run) % 2 == 0 or value[m.end() : m.end() + 1] == "{", value
