"""``rpp up``: start Airflow with this project's DAGs and reduce a demo session through it.

What it does, in order:

1. prepares ``AIRFLOW_HOME`` (default ``<repo>/airflow_home``, git-ignored): a long random JWT
   secret and API secret key (persisted, mode 600), the admin password of the simple auth manager
   (persisted, printed), and ``rpp_env.sh`` to ``source`` for the ``airflow`` CLI;
2. configures Airflow through environment variables only (``AIRFLOW__SECTION__KEY``): SQLite
   metadata DB (or whatever ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` already says, e.g.
   PostgreSQL), LocalExecutor, parallelism 4, 4 active tasks per DAG, no example DAGs,
   ``dags_folder = <repo>/dags``, API server on port 8793 with a matching ``base_url``;
3. starts ``airflow standalone`` as a child process (its output goes to
   ``AIRFLOW_HOME/standalone.log``), waits for ``/api/v2/monitor/health``, creates the
   ``rpp_heavy`` pool (2 slots) through the REST API;
4. starts the session watcher of the demo observatory (`rpp_tasks.ops.watch`), writes a synthetic
   session into the demo incoming folder (atomically: written under a hidden name, then renamed),
   waits until the DAG run ``session__<night>`` finishes, and prints the UI address, the login and
   where the products are;
5. keeps Airflow and the watcher running until Ctrl-C, SIGTERM or SIGHUP, which stop Airflow's
   whole process group (``--exit-when-done`` stops after the run, for CI).

This module never imports Airflow: it runs the ``airflow`` command and speaks HTTP to the API.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rpp_tasks.config import REPO_ROOT, default_config_dir
from rpp_tasks.ops import deploy
from rpp_tasks.ops.airflow_api import AirflowApiError, AirflowClient

__all__ = [
    "UpSettings",
    "airflow_env",
    "prepare_home",
    "AirflowProcess",
    "run_up",
    "up_main",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 8793
ADMIN_USER = "admin"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


@dataclass
class UpSettings:
    """Where things go and how Airflow is reached."""

    repo: Path = REPO_ROOT
    home: Path | None = None  # AIRFLOW_HOME; default <repo>/airflow_home
    port: int = DEFAULT_PORT
    host: str = "localhost"
    config_dir: Path | None = None  # RPP_CONFIG_DIR
    data_root: Path | None = None  # RPP_DATA_ROOT
    extra_env: dict = field(default_factory=dict)

    def __post_init__(self):
        self.repo = Path(self.repo).resolve()
        self.home = Path(
            self.home or os.environ.get("RPP_AIRFLOW_HOME") or self.repo / "airflow_home"
        ).resolve()
        self.config_dir = Path(self.config_dir or default_config_dir()).resolve()
        self.data_root = Path(
            self.data_root or os.environ.get("RPP_DATA_ROOT") or self.repo
        ).resolve()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


# ================================================================================ configuration
def _secret_file(path: Path, nbytes: int = 48) -> str:
    """Read a persisted secret, creating it (mode 600) the first time."""
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(nbytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value


def prepare_home(settings: UpSettings, *, password: str | None = None) -> dict:
    """Create AIRFLOW_HOME and its secrets. Returns ``{"jwt_secret", "secret_key", "password",
    "passwords_file"}``.

    The admin password is ``password``, else ``RPP_AIRFLOW_PASSWORD``, else the one persisted in
    ``simple_auth_manager_passwords.json`` (the simple auth manager's own file), else a new random
    one.
    """
    home = settings.home
    home.mkdir(parents=True, exist_ok=True)
    jwt_secret = _secret_file(home / "jwt_secret")
    secret_key = _secret_file(home / "api_secret_key")
    pw_file = home / "simple_auth_manager_passwords.json"
    current = {}
    if pw_file.is_file():
        with contextlib.suppress(ValueError):
            current = json.loads(pw_file.read_text() or "{}")
    password = (
        password
        or os.environ.get("RPP_AIRFLOW_PASSWORD")
        or current.get(ADMIN_USER)
        or secrets.token_urlsafe(12)
    )
    if current.get(ADMIN_USER) != password:
        current[ADMIN_USER] = password
        fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(current) + "\n")
    return {
        "jwt_secret": jwt_secret,
        "secret_key": secret_key,
        "password": password,
        "passwords_file": str(pw_file),
    }


def local_site(settings: UpSettings, secrets_: dict, **urls) -> deploy.Site:
    """Where the components of a deployment on this machine are (`rpp_tasks.ops.deploy.Site`);
    ``urls``: ``metadata_db``, ``broker_url``, ``result_backend``."""
    return deploy.Site(
        airflow_home=str(settings.home),
        code_root=str(settings.repo),
        config_dir=str(settings.config_dir),
        data_root=str(settings.data_root),
        base_url=settings.base_url,
        api_bind="127.0.0.1" if settings.host in ("localhost", "127.0.0.1") else "0.0.0.0",
        api_port=settings.port,
        execution_api_url=f"{settings.base_url}/execution/",
        # the log servers default to 8793/8794: out of the API port's way
        worker_log_port=settings.port + 2,
        trigger_log_port=settings.port + 3,
        jwt_secret=secrets_["jwt_secret"],
        api_secret_key=secrets_["secret_key"],
        passwords_file=secrets_["passwords_file"],
        **urls,
    )


def airflow_env(
    settings: UpSettings,
    secrets_: dict,
    base: dict | None = None,
    *,
    tuning: deploy.Tuning = deploy.STANDALONE,
    broker_url: str | None = None,
) -> dict:
    """The environment of every Airflow process (configuration by ``AIRFLOW__*`` variables).

    The settings are `rpp_tasks.ops.deploy.airflow_settings` of ``tuning`` (standalone by default)
    on this machine. A value already set in ``base`` for the metadata DB
    (``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``) wins, so PostgreSQL works by configuration alone;
    so do ``RPP_WORKERS`` and the `rpp_tasks.ops.deploy.OVERRIDES` (``RPP_HEAVY_POOL_SLOTS``,
    ``RPP_WORKER_CONCURRENCY``, ``RPP_HEARTBEAT_TIMEOUT_S``; checked, `ValueError` otherwise).
    """
    env = dict(os.environ if base is None else base)
    tuning = deploy.tuning_from_env(tuning, env)
    home = settings.home
    db = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN") or f"sqlite:///{home / 'airflow.db'}"
    frames = env.get("RPP_WORKERS")
    env.update(
        deploy.airflow_settings(
            local_site(settings, secrets_, metadata_db=db, broker_url=broker_url), tuning
        )
    )
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "RPP_WORKERS": frames or env["RPP_WORKERS"],
            "RPP_AIRFLOW_API_URL": settings.base_url,
            "RPP_AIRFLOW_USER": ADMIN_USER,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(settings.repo), env.get("PYTHONPATH", "")) if p
            ),
            # `airflow standalone` starts its components as `airflow ...` subprocesses found on
            # PATH: this environment's bin first, so `.venv/bin/rpp up` works without a venv
            "PATH": os.pathsep.join(
                p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p
            ),
        }
    )
    env.update(settings.extra_env)
    return env


def write_env_script(settings: UpSettings, env: dict) -> Path:
    """``AIRFLOW_HOME/rpp_env.sh``: ``source`` it to use the ``airflow`` CLI on this installation
    (secrets are read from their files, not copied into the script)."""
    keys = [
        k
        for k in sorted(env)
        if (k.startswith("AIRFLOW") or k.startswith("RPP_"))
        and k
        not in ("AIRFLOW__API__SECRET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "RPP_AIRFLOW_PASSWORD")
    ]
    lines = [
        "# generated by `rpp up`: source this file to use the airflow CLI on this installation"
    ]
    lines += [f"export {k}={_shquote(env[k])}" for k in keys]
    key_file, jwt_file = (
        _shquote(str(settings.home / n)) for n in ("api_secret_key", "jwt_secret")
    )
    lines += [
        f'export AIRFLOW__API__SECRET_KEY="$(cat {key_file})"',
        f'export AIRFLOW__API_AUTH__JWT_SECRET="$(cat {jwt_file})"',
    ]
    path = settings.home / "rpp_env.sh"
    path.write_text("\n".join(lines) + "\n")
    return path


def _shquote(s: str) -> str:
    return "'" + str(s).replace("'", "'\"'\"'") + "'"


# ================================================================================ processes
class AirflowProcess:
    """``airflow standalone`` as a child process in its own process group."""

    def __init__(self, env: dict, log_path: Path, *, echo: bool = False):
        self.env = env
        self.log_path = Path(log_path)
        self.echo = echo
        self.proc: subprocess.Popen | None = None

    def start(self) -> AirflowProcess:
        airflow = (
            self.env.get("RPP_AIRFLOW_CMD")  # another launcher (a wrapper script; the tests)
            or shutil.which("airflow", path=self.env.get("PATH"))
            or str(Path(sys.executable).with_name("airflow"))
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = None if self.echo else open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [airflow, "standalone"],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if out is not None:
            out.close()
        log.info("airflow standalone started (pid %d), output in %s", self.proc.pid, self.log_path)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 45.0) -> None:
        """SIGINT (standalone stops its components), then SIGTERM / SIGKILL of its process group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                if sig == signal.SIGINT:
                    self.proc.send_signal(sig)
                else:
                    os.killpg(pgid, sig)  # the group this launcher created
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)  # leftovers of the group (task processes)


def _wait(predicate, timeout: float, interval: float, what: str, alive=None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if alive is not None and not alive():
            raise RuntimeError(f"airflow standalone exited while waiting for {what}")
        try:
            if predicate():
                return time.monotonic() - t0
        except Exception as exc:  # noqa: BLE001 - keep polling until the timeout
            log.debug("waiting for %s: %s", what, exc)
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# ================================================================================ demo session
def write_demo_session(obs, night: str, *, n_science: int = 4, seed: int = 1) -> Path:
    """Write a synthetic session into ``<incoming>/<night>`` atomically (hidden name, then rename).

    An existing session folder is reused as it is.
    """
    from rpp_tasks.sim.demo import write_demo_night

    incoming = obs.resolve_path("incoming")
    final = incoming / night
    if final.is_dir() and any(final.iterdir()):
        log.info("demo session %s already present: reusing it", final)
        return final
    tmp = incoming / f".writing-{night}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_demo_night(obs, tmp, night=night, n_science=n_science, seed=seed)
    os.replace(tmp, final)
    return final


# ================================================================================ main job
def run_up(
    settings: UpSettings | None = None,
    *,
    observatory: str = "demo",
    night: str = "2025-01-15",
    n_science: int = 4,
    exit_when_done: bool = False,
    timeout_s: float = 1800.0,
    demo: bool = True,
    echo: bool = False,
    password: str | None = None,
    executor: str = "local",
    workers: int = 2,
    broker_url: str | None = None,
) -> int:
    """Start Airflow (standalone), the demo watcher and a demo session run; see the module
    docstring.

    ``executor="celery"``: the CeleryExecutor deployment of docker-compose.yaml as local processes
    instead (`rpp_tasks.ops.localcelery`, ``workers`` Celery workers; the metadata DB must be
    PostgreSQL, the broker ``broker_url`` or ``AIRFLOW__CELERY__BROKER_URL``).

    Returns 0 when the demo run succeeded (or on Ctrl-C afterwards), 1 when it failed, 2 on a
    start-up problem.
    """
    from rpp_tasks.config import find_config

    settings = settings or UpSettings()
    secrets_ = prepare_home(settings, password=password)
    celery = executor == "celery"
    if celery:
        broker_url = broker_url or os.environ.get("AIRFLOW__CELERY__BROKER_URL") or DEFAULT_BROKER
    env = airflow_env(
        settings,
        secrets_,
        tuning=deploy.CELERY if celery else deploy.STANDALONE,
        broker_url=broker_url if celery else None,
    )
    write_env_script(settings, env)
    # the watcher and synthetic data run in this process: same RPP_* settings as the tasks
    for k in ("RPP_CONFIG_DIR", "RPP_DATA_ROOT", "RPP_WORKERS"):
        os.environ[k] = env[k]
    obs = find_config(observatory, settings.config_dir)
    db = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    print(
        f"AIRFLOW_HOME   {settings.home}\nmetadata DB    {_redact(db)}\n"
        f"DAGs           {settings.repo / 'dags'}  (configs {settings.config_dir})",
        flush=True,
    )

    busy = [p for p in (settings.port, settings.port + 2, settings.port + 3) if _port_in_use(p)]
    if busy:
        print(
            f"rpp up: port(s) {busy} already in use on this machine (another Airflow?); "
            f"choose another with --port",
            file=sys.stderr,
        )
        return 2
    if celery:
        from rpp_tasks.ops.localcelery import LocalCelery

        try:
            af = LocalCelery(env, settings.home, n_workers=workers, echo=echo)
        except ValueError as exc:
            print(f"rpp up: {exc}", file=sys.stderr)
            return 2
        print(
            f"broker         {_redact(env['AIRFLOW__CELERY__BROKER_URL'])}\n"
            f"workers        {workers} x {env['AIRFLOW__CELERY__WORKER_CONCURRENCY']} tasks "
            f"({env['AIRFLOW__CELERY__POOL']} pool), output in {af.log_path}",
            flush=True,
        )
    else:
        af = AirflowProcess(env, settings.home / "standalone.log", echo=echo).start()
    api = AirflowClient(settings.base_url, ADMIN_USER, secrets_["password"])
    watcher = None
    t_start = time.monotonic()
    try:
        if celery:
            af.start()  # db migrate, then every component; stopped in `finally`
        dt = _wait(api.healthy, 600, 2.0, "the Airflow API to be healthy", alive=af.alive)
        print(f"Airflow API healthy after {dt:.0f} s at {settings.base_url}", flush=True)
        api.ensure_pool(
            env["RPP_AIRFLOW_POOL"],
            int(env["RPP_HEAVY_POOL_SLOTS"]),
            deploy.HEAVY_POOL_DESCRIPTION,
        )
        _wait(
            lambda: api.dag_registered(obs.dag_id),
            300,
            2.0,
            f"DAG {obs.dag_id} to be parsed",
            alive=af.alive,
        )
        api.unpause(obs.dag_id)
        api.unpause("rpp_reconcile")
        if not demo:
            _print_banner(settings, secrets_, obs, None)
            return _serve(af, watcher, exit_when_done)
        from rpp_tasks.ops.readiness import rule_from_config
        from rpp_tasks.ops.session_ids import run_id_for, session_id_for
        from rpp_tasks.ops.watch import SessionWatcher

        watcher = SessionWatcher(
            obs.name,
            obs.resolve_path("incoming"),
            obs.dag_id,
            rule_from_config(obs, settle_seconds=2.0),
            obs.resolve_path("work") / "watch_state.json",
            AirflowClient(settings.base_url, ADMIN_USER, secrets_["password"]),
            use_polling=obs.session.use_polling,
            rescan_s=10.0,
            unpause=True,
        )
        obs.resolve_path("incoming").mkdir(parents=True, exist_ok=True)
        watcher.start()
        session_dir = write_demo_session(obs, night, n_science=n_science)
        session_id = session_id_for(night)
        run_id = run_id_for(session_id)
        print(f"Demo session written to {session_dir}", flush=True)
        print(
            f"watcher: waiting for the session to be quiet for {obs.session.quiet_seconds:g} s, "
            f"then it triggers {obs.dag_id} run {run_id}",
            flush=True,
        )
        state = _follow_run(api, obs.dag_id, run_id, timeout_s, alive=af.alive)
        wall = time.monotonic() - t_start
        _print_banner(
            settings,
            secrets_,
            obs,
            {
                "run_id": run_id,
                "state": state,
                "wall_s": wall,
                "workdir": obs.resolve_path("work") / session_id,
            },
        )
        if exit_when_done:
            return 0 if state == "success" else 1
        rc = _serve(af, watcher, exit_when_done=False)
        return rc if state == "success" else 1
    except (RuntimeError, TimeoutError, AirflowApiError, subprocess.TimeoutExpired) as exc:
        print(f"rpp up: {exc}\n(see {af.log_path})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        if watcher is not None:
            watcher.stop()
        print("stopping Airflow ...", flush=True)
        af.stop()


def _follow_run(api: AirflowClient, dag_id: str, run_id: str, timeout_s: float, alive) -> str:
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout_s:
        if not alive():
            raise RuntimeError("airflow standalone exited during the demo run")
        state = None
        with contextlib.suppress(Exception):
            state = api.run_state(dag_id, run_id)
            if state is not None:
                tasks = api.task_states(dag_id, run_id)
                line = f"run {run_id}: {state}  " + " ".join(f"{k}={v}" for k, v in tasks.items())
                if line != last:
                    print(f"[{time.monotonic() - t0:5.0f} s] {line}", flush=True)
                    last = line
        if state in ("success", "failed"):
            return state
        time.sleep(3.0)
    raise TimeoutError(f"run {run_id} of {dag_id} did not finish within {timeout_s:.0f} s")


def _print_banner(settings: UpSettings, secrets_: dict, obs, run: dict | None) -> None:
    print("\n" + "=" * 72)
    if run is not None:
        ok = run["state"] == "success"
        print(
            f"Demo run {run['run_id']} of {obs.dag_id}: {run['state'].upper()} "
            f"({run['wall_s']:.0f} s since start)"
        )
        summary_path = Path(run["workdir"]) / "session_summary.json"
        if ok and summary_path.is_file():
            s = json.loads(summary_path.read_text())
            print(
                f"  {s.get('n_ok')}/{s.get('n_science')} science frames reduced; "
                f"median FWHM {s.get('median_fwhm_px') or float('nan'):.2f} px"
            )
        print(f"  products:  {run['workdir']}  (frames/<frame>/catalog.ecsv, session_summary.json)")
    print(f"Airflow UI:  {settings.base_url}   login {ADMIN_USER} / {secrets_['password']}")
    print(f"  (password kept in {secrets_['passwords_file']}; logs in {settings.home / 'logs'})")
    print(f"Drop a night's folder into {obs.resolve_path('incoming')}/<night>/ to reduce it.")
    print(f"airflow CLI: source {settings.home / 'rpp_env.sh'}")
    print("=" * 72 + "\n", flush=True)


def _serve(af: AirflowProcess, watcher, exit_when_done: bool) -> int:
    if exit_when_done:
        return 0
    print(
        ("Airflow and the watcher keep" if watcher is not None else "Airflow keeps")
        + " running; Ctrl-C to stop.",
        flush=True,
    )
    try:
        while af.alive():
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0
    print("airflow standalone exited", file=sys.stderr)
    return 2


def _port_in_use(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_on_signals(signals=STOP_SIGNALS):
    """SIGTERM (a service manager stopping ``rpp up``) and SIGHUP (its terminal closed) stop it as
    Ctrl-C does: a KeyboardInterrupt in the main thread, so the ``finally`` blocks stop the watcher
    and Airflow's whole process group. The first signal switches the others off, so a second one
    cannot interrupt that cleanup. (Before, either killed ``rpp up`` and left Airflow running.)"""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        print(f"rpp up: {signal.Signals(signum).name} received, stopping", flush=True)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def up_main(argv: list[str] | None = None) -> int:
    """Command line of ``rpp up`` (the lead wires it as a subcommand: ``return up_main(argv)``)."""
    p = argparse.ArgumentParser(
        prog="rpp up",
        description="Start Airflow with the RPP DAGs and reduce a demo session through it.",
    )
    p.add_argument(
        "--port", type=int, default=int(os.environ.get("RPP_AIRFLOW_PORT", DEFAULT_PORT))
    )
    p.add_argument("--home", help="AIRFLOW_HOME (default <repo>/airflow_home or $RPP_AIRFLOW_HOME)")
    p.add_argument(
        "--observatory", default="demo", help="observatory of the demo session (default demo)"
    )
    p.add_argument(
        "--night", default="2025-01-15", help="demo session folder name (reused if present)"
    )
    p.add_argument("--frames", type=int, default=4, help="science frames in the demo session")
    p.add_argument("--no-demo", action="store_true", help="only start Airflow (no demo session)")
    p.add_argument("--exit-when-done", action="store_true", help="stop after the demo run (CI)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the demo run")
    p.add_argument("--echo", action="store_true", help="show Airflow's own output on the console")
    g = p.add_argument_group(
        "scale-out", "the docker-compose.yaml deployment as local processes (no Docker needed)"
    )
    g.add_argument(
        "--executor",
        choices=("local", "celery"),
        default="local",
        help="local: airflow standalone (default); celery: api-server, scheduler, dag-processor, "
        "triggerer and Celery workers, PostgreSQL metadata DB, Redis broker",
    )
    g.add_argument("--workers", type=int, default=2, help="Celery workers (default 2)")
    g.add_argument(
        "--db",
        help="metadata DB, e.g. postgresql+psycopg2://airflow:airflow@127.0.0.1:5432/airflow "
        "(default $AIRFLOW__DATABASE__SQL_ALCHEMY_CONN)",
    )
    g.add_argument(
        "--broker",
        help=f"Celery broker (default $AIRFLOW__CELERY__BROKER_URL or {DEFAULT_BROKER})",
    )
    args = p.parse_args(argv)
    if args.db:
        os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = args.db
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    settings = UpSettings(home=Path(args.home) if args.home else None, port=args.port)
    with stop_on_signals():
        try:
            return run_up(
                settings,
                observatory=args.observatory,
                night=args.night,
                n_science=args.frames,
                exit_when_done=args.exit_when_done,
                timeout_s=args.timeout,
                demo=not args.no_demo,
                echo=args.echo,
                executor=args.executor,
                workers=args.workers,
                broker_url=args.broker,
            )
        except KeyboardInterrupt:  # before Airflow was started: nothing to stop
            return 0
        except ValueError as exc:  # a deployment setting out of range (deploy.OVERRIDES)
            print(f"rpp up: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(up_main())
