"""One source of the deployment settings of every Airflow component of an RPP installation.

Three deployments read their Airflow configuration from here, so they cannot drift apart:

* ``rpp up`` (embedded, ``airflow standalone``, LocalExecutor): `STANDALONE`;
* ``rpp up --executor celery`` (`rpp_tasks.ops.localcelery`: api-server, scheduler,
  dag-processor, triggerer, a log server and N Celery workers as local processes, for a machine
  with PostgreSQL and Redis but no Docker): `CELERY`;
* ``docker-compose.yaml``: its ``x-airflow-common`` environment block is generated from `CELERY`
  and `compose_site` (``python -m rpp_tasks.ops.deploy --write-compose``;
  ``tests/dags/test_compose.py`` fails when the file differs from what this module renders).

What differs between them is only *where* things are (`Site`: paths, host names, ports, the
database and broker URLs, secrets); *how* the deployment behaves (`Tuning`: executor, worker
concurrency and pool, parallelism, the ``rpp_heavy`` pool, the lost-worker timeouts) is one
object per kind of deployment. Everything is configured by ``AIRFLOW__SECTION__KEY`` variables;
nothing is written into ``airflow.cfg``.

Losing a worker (docs/airflow.md, "A lost worker"): a task's supervisor heartbeats every 5 s
(``[workers] min_heartbeat_interval``); the scheduler looks every `Tuning.heartbeat_check_s` for
task instances silent for `Tuning.heartbeat_timeout_s` (Airflow's default is 300 s), fails them
and the retry goes to a live worker after the DAG's ``retry_delay``. Celery acknowledges a task
message only when the task has finished (``task_acks_late``) and each worker reserves no more
than it runs (``worker_prefetch_multiplier`` 1), so an idle worker is never starved by a busy
one holding a prefetched task. A message of a dead worker is redelivered by Redis after the
visibility timeout, which must exceed the longest task (the DAG's ``execution_timeout``, 3 h);
Airflow ignores such a redelivery of a task that already ran elsewhere.

This module imports only the standard library (the DAG processor may read it at parse time).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = [
    "HEAVY_POOL",
    "Tuning",
    "OVERRIDES",
    "tuning_from_env",
    "STANDALONE",
    "standalone_tuning",
    "CELERY",
    "Site",
    "compose_site",
    "airflow_settings",
    "TOPOLOGY_KEYS",
    "worker_hostname",
    "render_compose_block",
    "render_compose",
    "write_compose",
]

#: Airflow pool of the CPU-heavy stage tasks (``RPP_AIRFLOW_POOL`` in dags/rpp_reduction.py).
HEAVY_POOL = "rpp_heavy"
HEAVY_POOL_DESCRIPTION = "CPU-heavy RPP stage tasks (each runs a process pool of RPP_WORKERS)"


@dataclass(frozen=True)
class Tuning:
    """How a deployment behaves; the same wherever it runs.

    Parameters
    ----------
    executor : str
        ``LocalExecutor`` or ``CeleryExecutor``.
    worker_concurrency : int
        Tasks one Celery worker runs at a time (``[celery] worker_concurrency``).
    worker_pool : str
        Celery pool: ``prefork`` (the default; each task in a pool child) or ``solo`` (one task
        at a time in the worker process). Not ``threads``: Airflow's task supervisor installs
        signal handlers, which only the main thread may do.
    frame_processes : int
        ``RPP_WORKERS``: frame processes of one stage task
        (`rpp_tasks.session.lifecycle.run_stage`).
    parallelism : int
        Task instances running at once in the whole deployment (``[core] parallelism``).
    heavy_pool_slots : int
        Slots of the ``rpp_heavy`` Airflow pool (the CPU stages).
    heartbeat_timeout_s, heartbeat_check_s : int
        A task instance whose supervisor has not heartbeated for ``heartbeat_timeout_s`` is
        failed (and retried) by the scheduler, which checks every ``heartbeat_check_s``.
    visibility_timeout_s : int
        Redis redelivers an unacknowledged task message after this; longer than any task.
    queued_timeout_s : int
        A task queued this long without starting is given back to the scheduler
        (``[scheduler] task_queued_timeout``); long enough for a night's tasks waiting in the
        broker for a free worker.
    """

    executor: str = "CeleryExecutor"
    worker_concurrency: int = 2
    worker_pool: str = "prefork"
    frame_processes: int = 2
    parallelism: int = 8
    heavy_pool_slots: int = 4
    heartbeat_timeout_s: int = 30
    heartbeat_check_s: int = 5
    visibility_timeout_s: int = 6 * 3600
    queued_timeout_s: int = 1800
    dag_refresh_s: int = 30

    @property
    def tasks_per_host(self) -> int:
        """Heavy tasks one machine runs at once: the pool's slots on one LocalExecutor host, a
        Celery worker's concurrency (``RPP_TASKS_PER_HOST``: the frame pool's default memory
        budget is shared by ``RPP_WORKERS`` x this)."""
        if self.executor == "LocalExecutor":
            return self.heavy_pool_slots
        return self.worker_concurrency

    def __post_init__(self):
        if self.executor not in ("LocalExecutor", "CeleryExecutor"):
            raise ValueError(f"executor must be LocalExecutor or CeleryExecutor: {self.executor}")
        if self.worker_pool not in ("prefork", "solo"):
            raise ValueError(
                f"worker_pool must be prefork or solo, not {self.worker_pool!r} (the threads "
                "pool cannot run Airflow tasks: signal handlers need the main thread)"
            )
        if self.heartbeat_timeout_s < 4 * 5:  # the supervisor heartbeats every 5 s
            raise ValueError("heartbeat_timeout_s below 20 s would fail healthy busy tasks")


#: Settings of a `Tuning` an operator may override in the launcher's environment (``rpp up``,
#: ``rpp up --executor celery``): variable -> (field, lowest, highest, what it is).
OVERRIDES = {
    "RPP_HEAVY_POOL_SLOTS": ("heavy_pool_slots", 1, 1024, "slots of the rpp_heavy Airflow pool"),
    "RPP_WORKER_CONCURRENCY": ("worker_concurrency", 1, 256, "tasks one Celery worker runs"),
    "RPP_HEARTBEAT_TIMEOUT_S": (
        "heartbeat_timeout_s",
        20,
        3600,
        "seconds without a heartbeat before a task instance counts as lost",
    ),
}


def tuning_from_env(tuning: Tuning, environ=None) -> Tuning:
    """``tuning`` with the `OVERRIDES` set in ``environ`` (default ``os.environ``), checked.

    Raises
    ------
    ValueError
        A value that is not an integer in its range, naming the variable and what it sets.
    """
    environ = os.environ if environ is None else environ
    changes = {}
    for var, (name, lo, hi, what) in OVERRIDES.items():
        raw = environ.get(var)
        if raw in (None, ""):
            continue
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise ValueError(f"{var}={raw!r}: expected an integer from {lo} to {hi} ({what})")
        changes[name] = value
    return replace(tuning, **changes) if changes else tuning


def standalone_tuning(cpus: int | None = None) -> Tuning:
    """``rpp up``'s tuning on a host of ``cpus`` cores (default: this one's).

    One machine runs every task, so the heavy tasks times their frame processes should fill the
    cores and no more: ``RPP_WORKERS`` 2 (1 on a single core) and ``cpus // 2`` ``rpp_heavy``
    slots. On 2 cores that is one heavy task at a time with 2 frame processes, which is what a
    plain run does: two chunk tasks of 2 processes each on 2 cores took 8-15 % longer than one
    (bench/README.md, "Issue 16"). Light tasks (validate, products, archive, notify, the
    watcher's reconcile) run beside it (``parallelism`` = slots + 3, at least 4).
    """
    cpus = max(1, int(cpus or os.cpu_count() or 2))
    frames = 2 if cpus >= 2 else 1
    slots = max(1, cpus // frames)
    return Tuning(
        executor="LocalExecutor",
        frame_processes=frames,
        heavy_pool_slots=slots,
        parallelism=max(4, slots + 3),
    )


#: ``rpp up``: airflow standalone on this machine (`standalone_tuning`).
STANDALONE = standalone_tuning()
#: ``rpp up --executor celery`` and docker-compose.yaml.
CELERY = Tuning()


@dataclass(frozen=True)
class Site:
    """Where the components of one deployment are and how they reach each other."""

    airflow_home: str
    code_root: str  # holds dags/ and plugins/
    config_dir: str  # RPP_CONFIG_DIR
    data_root: str  # RPP_DATA_ROOT: incoming, work, products, masters (shared storage)
    base_url: str  # the API server as users and the watcher reach it
    api_bind: str  # interface the API server listens on
    api_port: int
    execution_api_url: str  # the API server as task supervisors reach it
    worker_log_port: int
    trigger_log_port: int
    jwt_secret: str
    api_secret_key: str
    passwords_file: str  # simple auth manager's password file
    metadata_db: str | None = None  # SQLAlchemy URL; None: leave it to the environment
    broker_url: str | None = None  # Celery only
    result_backend: str | None = None  # Celery only; default "db+" + metadata_db


#: Settings that say where things are (differ between compose and local processes); every other
#: setting is the same in every deployment of one `Tuning`.
TOPOLOGY_KEYS = frozenset(
    {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CELERY__BROKER_URL",
        "AIRFLOW__CELERY__RESULT_BACKEND",
        "AIRFLOW__CORE__DAGS_FOLDER",
        "AIRFLOW__CORE__PLUGINS_FOLDER",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
        "AIRFLOW__API__HOST",
        "AIRFLOW__API__PORT",
        "AIRFLOW__API__BASE_URL",
        "AIRFLOW__API__SECRET_KEY",
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT",
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT",
        "RPP_CONFIG_DIR",
        "RPP_DATA_ROOT",
    }
)


def airflow_settings(site: Site, tuning: Tuning = CELERY) -> dict[str, str]:
    """The ``AIRFLOW__*`` and ``RPP_*`` environment of every component of one deployment.

    ``AIRFLOW_HOME`` is not included (the compose image sets it; local launchers add it).
    """
    env: dict[str, str] = {"AIRFLOW__CORE__EXECUTOR": tuning.executor}
    if site.metadata_db:
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = site.metadata_db
    if tuning.executor == "CeleryExecutor":
        if not (site.metadata_db and site.broker_url):
            raise ValueError("the CeleryExecutor needs a metadata database and a broker URL")
        env.update(
            {
                "AIRFLOW__CELERY__BROKER_URL": site.broker_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": site.result_backend or "db+" + site.metadata_db,
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(tuning.worker_concurrency),
                "AIRFLOW__CELERY__POOL": tuning.worker_pool,
                "AIRFLOW__CELERY__TASK_ACKS_LATE": "True",
                "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
                "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": str(
                    tuning.visibility_timeout_s
                ),
            }
        )
    code = site.code_root.rstrip("/")
    env.update(
        {
            "AIRFLOW__CORE__PARALLELISM": str(tuning.parallelism),
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(tuning.parallelism),
            "AIRFLOW__CORE__DAGS_FOLDER": f"{code}/dags",
            "AIRFLOW__CORE__PLUGINS_FOLDER": f"{code}/plugins",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "rpp_tasks.ops.deploy.worker_hostname",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": site.passwords_file,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": site.execution_api_url,
            "AIRFLOW__API__HOST": site.api_bind,
            "AIRFLOW__API__PORT": str(site.api_port),
            "AIRFLOW__API__BASE_URL": site.base_url,
            "AIRFLOW__API__SECRET_KEY": site.api_secret_key,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": site.jwt_secret,
            # the log servers default to 8793/8794: out of the API port's way
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(site.worker_log_port),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(site.trigger_log_port),
            # a lost worker costs about a minute, not six (module docstring)
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(tuning.heartbeat_timeout_s),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": str(
                tuning.heartbeat_check_s
            ),
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": str(tuning.queued_timeout_s),
            # a new observatory YAML becomes a DAG within ~30 s
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": str(tuning.dag_refresh_s),
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": str(tuning.dag_refresh_s),
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "RPP_CONFIG_DIR": site.config_dir,
            "RPP_DATA_ROOT": site.data_root,
            "RPP_WORKERS": str(tuning.frame_processes),
            "RPP_AIRFLOW_POOL": HEAVY_POOL,
            "RPP_HEAVY_POOL_SLOTS": str(tuning.heavy_pool_slots),
            "RPP_TASKS_PER_HOST": str(tuning.tasks_per_host),
        }
    )
    return env


def worker_hostname() -> str:
    """The host name a worker records on the task instances it runs (``[core] hostname_callable``).

    ``RPP_WORKER_HOSTNAME`` when set, else the fully qualified host name. The API server fetches a
    running task's log from ``http://<host name>:<worker_log_server_port>``, so on several machines
    set it to a name (or address) the API server can reach; ``rpp up --executor celery`` gives its
    local workers 127.0.0.1, 127.0.0.2, ... so the UI tells them apart.
    """
    return os.environ.get("RPP_WORKER_HOSTNAME") or socket.getfqdn()


# ================================================================================ docker compose
COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yaml"
BEGIN = (
    "    # BEGIN generated by `python -m rpp_tasks.ops.deploy --write-compose`: do not edit here"
)
END = "    # END generated"
COMPOSE_API_PORT = 8793


def _required(var: str, what: str) -> str:
    return "${" + var + ":?set " + var + " " + what + "in .env}"


def compose_site() -> Site:
    """Where things are inside docker compose (service names as hosts; secrets from ``.env``)."""
    pg = _required("RPP_POSTGRES_PASSWORD", "")
    port = COMPOSE_API_PORT
    return Site(
        airflow_home="/opt/airflow",
        code_root="/opt/rpp",
        config_dir="/opt/rpp/config",
        data_root="/srv/rpp",
        base_url="${RPP_BASE_URL:-http://localhost:" + str(port) + "}",
        api_bind="0.0.0.0",
        api_port=port,
        execution_api_url=f"http://airflow-apiserver:{port}/execution/",
        worker_log_port=port + 2,
        trigger_log_port=port + 3,
        jwt_secret=_required("RPP_JWT_SECRET", "(64+ random characters) "),
        api_secret_key=_required("RPP_API_SECRET_KEY", ""),
        passwords_file="/opt/airflow/simple_auth_manager_passwords.json",
        metadata_db=f"postgresql+psycopg2://airflow:{pg}@postgres:5432/airflow",
        broker_url="redis://redis:6379/0",
        result_backend=f"db+postgresql+psycopg2://airflow:{pg}@postgres:5432/airflow",
    )


def render_compose_block(tuning: Tuning = CELERY) -> str:
    """The generated ``environment`` block of ``x-airflow-common`` (between the markers)."""
    lines = [BEGIN]
    lines += [
        f"    {k}: {json.dumps(v)}" for k, v in airflow_settings(compose_site(), tuning).items()
    ]
    lines.append(END)
    return "\n".join(lines) + "\n"


def render_compose(text: str, tuning: Tuning = CELERY) -> str:
    """``text`` (a docker-compose.yaml) with its generated block replaced by the current one."""
    try:
        i = text.index(BEGIN)
        j = text.index(END, i) + len(END) + 1
    except ValueError:
        raise ValueError(f"markers {BEGIN!r} ... {END!r} not found in the compose file") from None
    return text[:i] + render_compose_block(tuning) + text[j:]


def write_compose(path: Path = COMPOSE_FILE, *, check: bool = False) -> bool:
    """Regenerate the compose file's block; with ``check``, only report. True when up to date."""
    text = Path(path).read_text()
    new = render_compose(text)
    if new == text:
        return True
    if not check:
        Path(path).write_text(new)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rpp_tasks.ops.deploy",
        description="Show the deployment settings or regenerate docker-compose.yaml from them.",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write-compose", action="store_true", help="regenerate the compose block")
    g.add_argument("--check-compose", action="store_true", help="exit 1 if it is out of date")
    p.add_argument("--compose-file", type=Path, default=COMPOSE_FILE)
    args = p.parse_args(argv)
    if args.write_compose or args.check_compose:
        ok = write_compose(args.compose_file, check=args.check_compose)
        what = "up to date" if ok else ("OUT OF DATE" if args.check_compose else "regenerated")
        print(f"{args.compose_file}: {what}")
        return 0 if ok or not args.check_compose else 1
    for k, v in airflow_settings(compose_site(), replace(CELERY)).items():
        print(f"{k}={v}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
