"""The CeleryExecutor deployment as local processes: ``rpp up --executor celery``.

For a machine with PostgreSQL and Redis but no Docker: the same deployment as
``docker-compose.yaml`` (both take their settings from `rpp_tasks.ops.deploy`), each component a
process of this machine in its own process group, its output in
``AIRFLOW_HOME/components/<name>.log``:

* ``airflow db migrate`` first (the metadata schema in PostgreSQL);
* ``api-server``, ``scheduler``, ``dag-processor``, ``triggerer``;
* ``log-server``: Airflow's worker log server, once for every local worker (they share this
  machine's ``AIRFLOW_HOME/logs``; a dying worker does not take the running tasks' logs with it);
* ``worker1`` ... ``workerN``: ``airflow celery worker --skip-serve-logs`` named
  ``worker<k>@<host>`` in Celery; each records the host name ``127.0.0.<k>`` on the task
  instances it runs (``RPP_WORKER_HOSTNAME``, `rpp_tasks.ops.deploy.worker_hostname`), so the UI and
  the REST API tell which worker ran a task, and the log server answers on every one of them.

`LocalCelery.stop` stops them all (SIGTERM, then SIGKILL of whatever is left of every component's
process tree, task processes included); ``rpp up`` calls it on Ctrl-C, SIGTERM and SIGHUP.
`LocalCelery.kill_worker` SIGKILLs one worker's whole process tree at once, as a machine that
dies would (the integration test of a lost worker).

This module never imports Airflow: it runs the ``airflow`` command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LocalCelery",
    "process_tree",
    "pid_alive",
    "free_port",
    "scratch_postgres_db",
    "scratch_redis_db",
    "scratch_deployment",
    "ScratchDeployment",
]

log = logging.getLogger(__name__)

SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")


def _airflow_cmd(env: dict) -> str:
    return (
        env.get("RPP_AIRFLOW_CMD")
        or shutil.which("airflow", path=env.get("PATH"))
        or str(Path(sys.executable).with_name("airflow"))
    )


class LocalCelery:
    """
    The CeleryExecutor deployment as processes of this machine.

    Parameters
    ----------
    env : dict
        Environment of every component (``rpp_tasks.ops.up.airflow_env`` with
        `rpp_tasks.ops.deploy.CELERY`): PostgreSQL metadata DB, Redis broker.
    home : Path
        ``AIRFLOW_HOME``; component output goes to ``home/components/<name>.log``.
    n_workers : int
        Celery workers (each ``AIRFLOW__CELERY__WORKER_CONCURRENCY`` tasks at a time).
    echo : bool
        Component output on this console instead of the log files.
    """

    def __init__(self, env: dict, home: Path, *, n_workers: int = 2, echo: bool = False):
        if n_workers < 1:
            raise ValueError("at least one Celery worker")
        db = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
        if not db or db.startswith("sqlite"):
            raise ValueError(
                "the CeleryExecutor needs a PostgreSQL metadata database (SQLite cannot be shared "
                "by the scheduler and the workers): set AIRFLOW__DATABASE__SQL_ALCHEMY_CONN or --db"
            )
        self.env = dict(env)
        self.home = Path(home)
        self.n_workers = int(n_workers)
        self.echo = echo
        self.log_path = self.home / "components"
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------------ what runs
    @property
    def worker_names(self) -> list[str]:
        return [f"worker{k}" for k in range(1, self.n_workers + 1)]

    def worker_hostname(self, name: str) -> str:
        """The host name ``name`` records on its task instances (``127.0.0.<k>``)."""
        return f"127.0.0.{int(name.removeprefix('worker'))}"

    def commands(self) -> dict[str, tuple[list[str], dict]]:
        """``name -> (argv, extra environment)`` of every component, in start order."""
        airflow = _airflow_cmd(self.env)
        out = {name: ([airflow, name], {}) for name in SERVICES}
        out["log-server"] = (
            [sys.executable, "-c", "from airflow.utils.serve_logs import serve_logs; serve_logs()"],
            {},
        )
        for name in self.worker_names:
            out[name] = (
                [airflow, "celery", "worker", "--skip-serve-logs", "--celery-hostname",
                 f"{name}@%h"],
                {"RPP_WORKER_HOSTNAME": self.worker_hostname(name)},
            )  # fmt: skip
        return out

    # ------------------------------------------------------------------------ lifecycle
    def migrate(self, timeout: float = 900.0) -> float:
        """``airflow db migrate`` (idempotent); seconds it took."""
        t0 = time.monotonic()
        self.log_path.mkdir(parents=True, exist_ok=True)
        with open(self.log_path / "db-migrate.log", "ab") as out:
            res = subprocess.run(
                [_airflow_cmd(self.env), "db", "migrate"],
                env=self.env,
                stdout=None if self.echo else out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        if res.returncode != 0:
            raise RuntimeError(
                f"airflow db migrate failed (exit {res.returncode}); see "
                f"{self.log_path / 'db-migrate.log'}"
            )
        return time.monotonic() - t0

    def start(self, *, migrate: bool = True) -> LocalCelery:
        """Migrate the metadata schema, then start every component."""
        if migrate:
            dt = self.migrate()
            log.info("metadata schema migrated in %.0f s", dt)
        for name, (argv, extra) in self.commands().items():
            self._spawn(name, argv, extra)
        log.info(
            "CeleryExecutor deployment started: %s (output in %s)",
            ", ".join(f"{n}={p.pid}" for n, p in self.procs.items()),
            self.log_path,
        )
        return self

    def _spawn(self, name: str, argv: list[str], extra: dict) -> None:
        self.log_path.mkdir(parents=True, exist_ok=True)
        out = None if self.echo else open(self.log_path / f"{name}.log", "ab")
        try:
            self.procs[name] = subprocess.Popen(
                argv,
                env={**self.env, **extra},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole
            )
        finally:
            if out is not None:
                out.close()

    def restart_worker(self, name: str) -> None:
        """Start worker ``name`` again (after `kill_worker`)."""
        argv, extra = self.commands()[name]
        self._spawn(name, argv, extra)

    def alive(self) -> bool:
        """The services run and at least one worker does."""
        up = {n: p.poll() is None for n, p in self.procs.items()}
        return (
            bool(up)
            and all(up.get(n) for n in SERVICES)
            and any(up.get(n) for n in self.worker_names)
        )

    def exited(self) -> dict[str, int]:
        """``name -> exit code`` of the components that are no longer running."""
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def tree(self, name: str) -> list[int]:
        """PIDs of component ``name`` and all its descendants (task and frame processes)."""
        proc = self.procs.get(name)
        return process_tree(proc.pid) if proc is not None and proc.poll() is None else []

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL worker ``name``'s whole process tree at once (stopped first, so nothing in it
        can react or respawn): a machine that dies. Returns the PIDs killed."""
        pids = self.tree(name)
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.procs[name].wait(10)
        deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        log.warning("worker %s killed (%d processes)", name, len(pids))
        return pids

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every component (workers first), then SIGKILL every process left of their trees.

        Task processes run in process groups of their own (Airflow's supervisor), so the trees
        are collected before anything is signalled.
        """
        order = [*self.worker_names, "log-server", *reversed(SERVICES)]
        running = {n: p for n, p in self.procs.items() if p.poll() is None}
        if not running:
            return
        trees = {n: process_tree(p.pid) for n, p in running.items()}
        for name in order:
            proc = running.get(name)
            if proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        left = [pid for pids in trees.values() for pid in pids if pid_alive(pid)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        if left:
            log.info("%d processes did not stop within %.0f s: killed", len(left), timeout)


# ================================================================================ processes
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may contain spaces and ")"
        kids[ppid].append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its living descendants (Linux ``/proc``), parents before children."""
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        if p in out:
            continue
        out.append(p)
        todo.extend(kids.get(p, []))
    return [p for p in out if pid_alive(p)]


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # zombie (nobody may reap it in a container), dead


# ================================================================================ scratch resources
def free_port(start: int = 20000, *, span: int = 4) -> int:
    """A port ``p`` such that ``p .. p+span-1`` are free on 127.0.0.1 (API + log server ports)."""
    import random
    import socket

    rng = random.Random(os.getpid() ^ int(time.time()))
    for _ in range(200):
        p = rng.randrange(start, 60000 - span)
        ok = True
        for q in range(p, p + span):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", q))
                except OSError:
                    ok = False
                    break
        if ok:
            return p
    raise RuntimeError("no free port range found")


@contextlib.contextmanager
def scratch_postgres_db(admin_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"):
    """A new, empty PostgreSQL database for one run (tests, bench); dropped afterwards.

    Yields its SQLAlchemy URL (``postgresql+psycopg2://...``).
    """
    import secrets

    import psycopg2
    from sqlalchemy.engine import make_url

    name = f"rpp_celery_{os.getpid()}_{secrets.token_hex(3)}"
    admin = make_url(admin_url)
    con = psycopg2.connect(
        host=admin.host, port=admin.port, user=admin.username, dbname=admin.database
    )
    con.autocommit = True
    try:
        with con.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield str(admin.set(drivername="postgresql+psycopg2", database=name))
    finally:
        with contextlib.suppress(Exception), con.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        con.close()


@contextlib.contextmanager
def scratch_redis_db(host: str = "127.0.0.1", port: int = 6379):
    """A Redis database number nobody else uses, claimed atomically for one run (tests, bench);
    emptied afterwards. Yields the broker URL ``redis://host:port/<n>``."""
    import secrets

    import redis

    token = secrets.token_hex(8)
    for n in range(15, 0, -1):
        r = redis.Redis(host=host, port=port, db=n)
        if r.dbsize() == 0 and r.set("rpp:scratch-owner", token, nx=True, ex=6 * 3600):
            break
        r.close()
    else:
        raise RuntimeError(f"no free Redis database number on {host}:{port}")
    try:
        yield f"redis://{host}:{port}/{n}"
    finally:
        if r.get("rpp:scratch-owner") == token.encode():
            r.flushdb()
        r.close()


@dataclass
class ScratchDeployment:
    """A running throw-away Celery deployment (`scratch_deployment`)."""

    celery: LocalCelery
    api: object  # rpp_tasks.ops.airflow_api.AirflowClient, logged in as admin
    env: dict
    data_root: Path
    base_url: str
    started_s: float  # migrate + start until the API was healthy and the DAGs parsed

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        """Task instances of a run as the REST API reports them (state, hostname, try_number,
        start/end dates, duration)."""
        r = self.api.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        r.raise_for_status()
        return r.json()["task_instances"]

    def tries(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[dict]:
        """Every try of one task instance (``.../taskInstances/{task_id}[/{map_index}]/tries``)."""
        ti = task_id if map_index < 0 else f"{task_id}/{map_index}"
        r = self.api.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{ti}/tries")
        r.raise_for_status()
        return sorted(r.json()["task_instances"], key=lambda t: t["try_number"])

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 1200.0) -> str:
        """Wait until the run is ``success`` or ``failed``; its state."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            state = self.api.run_state(dag_id, run_id)
            if state in ("success", "failed"):
                return state
            if not self.celery.alive():
                raise RuntimeError(f"deployment died: {self.celery.exited()}")
            time.sleep(1.0)
        raise TimeoutError(f"{dag_id} {run_id} not finished after {timeout:.0f} s")


@contextlib.contextmanager
def scratch_deployment(
    root: Path,
    *,
    n_workers: int = 2,
    tuning=None,
    dag_ids: tuple[str, ...] = (),
    timeout: float = 600.0,
    config_dir: Path | None = None,
):
    """Start the Celery deployment of `rpp_tasks.ops.deploy` in a private corner of this machine
    (tests, bench): a new PostgreSQL database, a free Redis database number, free ports,
    ``AIRFLOW_HOME`` and ``RPP_DATA_ROOT`` under ``root``, the project's dags and its config
    (or ``config_dir``).

    Waits until the API is healthy, the ``rpp_heavy`` pool exists and ``dag_ids`` are parsed and
    unpaused. Yields a `ScratchDeployment`; stops every process and drops the database after.
    """
    import secrets

    from rpp_tasks.ops import deploy
    from rpp_tasks.ops.airflow_api import AirflowClient
    from rpp_tasks.ops.up import UpSettings, airflow_env, prepare_home

    tuning = tuning or deploy.CELERY
    root = Path(root)
    with scratch_postgres_db() as db, scratch_redis_db() as broker:
        settings = UpSettings(
            home=root / "home", port=free_port(), data_root=root / "data", config_dir=config_dir
        )
        password = secrets.token_urlsafe(12)
        secrets_ = prepare_home(settings, password=password)
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("AIRFLOW") and k not in ("RPP_WORKERS", "RPP_AIRFLOW_PASSWORD")
        }
        base["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = db
        env = airflow_env(settings, secrets_, base, tuning=tuning, broker_url=broker)
        celery = LocalCelery(env, settings.home, n_workers=n_workers)
        api = AirflowClient(settings.base_url, "admin", password, timeout=30.0)
        t0 = time.monotonic()
        try:
            celery.start()
            while not api.healthy():
                if not celery.alive() or time.monotonic() - t0 > timeout:
                    raise RuntimeError(
                        f"deployment not healthy after {time.monotonic() - t0:.0f} s "
                        f"(exited: {celery.exited()}; logs in {celery.log_path})"
                    )
                time.sleep(1.0)
            api.ensure_pool(
                env["RPP_AIRFLOW_POOL"],
                int(env["RPP_HEAVY_POOL_SLOTS"]),
                deploy.HEAVY_POOL_DESCRIPTION,
            )
            for dag_id in dag_ids:
                while not api.dag_registered(dag_id):
                    if time.monotonic() - t0 > timeout:
                        raise RuntimeError(f"DAG {dag_id} not parsed after {timeout:.0f} s")
                    time.sleep(1.0)
                api.unpause(dag_id)
            yield ScratchDeployment(
                celery=celery,
                api=api,
                env=env,
                data_root=settings.data_root,
                base_url=settings.base_url,
                started_s=time.monotonic() - t0,
            )
        finally:
            celery.stop()
            api.close()
