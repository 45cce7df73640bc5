"""
## RPP reduction: one DAG per observatory

One DAG per `config/observatories/*.yaml` (`rpp_<observatory>`). A run reduces one **session** (a
night's frames with its calibration frames), handed over by the watcher as the run conf
`{"observatory", "session_id", "session_dir"}` (run id `session__<session_id>`), or typed into the
trigger form: validate -> one task per stage of the stage table -> products -> (archive, notify).

Wiring only: Params, connections -> plain settings, skip/fail decisions and the factory over the
stage table (`rpp_tasks.session.table`). Each task calls one `rpp_tasks.session.lifecycle`
function, the same ones `rpp reduce` calls; tasks hand each other the work folder and a small dict.
A broken YAML becomes a small `rpp_<file stem>` DAG carrying the error (see rpp_config_errors.py).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path

from airflow.sdk import Param, dag, get_parsing_context, task

from rpp_tasks import config as rpp_config
from rpp_tasks.config import ObservatoryConfig
from rpp_tasks.exceptions import ConfigError
from rpp_tasks.session.table import StageTable, table_for

CONFIG_DIR = rpp_config.default_config_dir()
#: Airflow pool that bounds the CPU-heavy stage tasks (created by the launcher, ``rpp up``).
HEAVY_POOL = os.environ.get("RPP_AIRFLOW_POOL", "rpp_heavy")
START_DATE = _dt.datetime(2025, 1, 1, tzinfo=_dt.UTC)
_DOC = (
    "Triggered per session by the watcher or rpp_reconcile; by hand, with `session_dir` (absolute, "
    "or in the incoming folder). A re-run replaces the session's products. Tasks: validate ->"
)
DEFAULT_ARGS = {
    "owner": "rpp",
    "retries": 2,
    "retry_delay": _dt.timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,  # 30 s, 60 s, ... (capped below)
    "max_retry_delay": _dt.timedelta(minutes=10),
    "execution_timeout": _dt.timedelta(hours=3),
}


def dag_id_for_stem(stem: str) -> str:
    """DAG id of a config file stem (also of a broken file whose ``observatory`` is unusable)."""
    return "rpp_" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "unnamed")


def _conn(conn_id: str):  # Airflow's connection store, in a task
    from airflow.sdk import Connection

    return Connection.get(conn_id)


def _mask(secret: str) -> None:  # Airflow's log masker, in a task
    from airflow.sdk.log import mask_secret

    mask_secret(secret)


def _make_failure_callback(obs: ObservatoryConfig | None):
    def rpp_on_failure(context):  # failures.jsonl + operators' alert
        from rpp_tasks.session import connections, lifecycle

        info = connections.failure_info(context)
        lifecycle.record_failure(info, obs, get_connection=_conn, mask=_mask)

    return rpp_on_failure


def _session(prev: dict):
    from rpp_tasks.session import lifecycle

    return lifecycle.resume(prev["workdir"])


def build_reduction_dag(obs: ObservatoryConfig, table: StageTable | None = None):
    """The `rpp_<observatory>` DAG of one valid configuration, one task per stage of ``table``."""
    table = table or table_for(obs)
    on_failure = _make_failure_callback(obs)
    incoming = obs.resolve_path("incoming")

    @dag(
        dag_id=obs.dag_id,
        description=f"Nightly reduction of {obs.title or obs.name}",
        schedule=None,  # one run per session, from the watcher / rpp_reconcile
        start_date=START_DATE,
        catchup=False,
        max_active_runs=2,  # sized for a small (2-core) host; the pool bounds the CPU work
        max_active_tasks=2,
        tags=["rpp", obs.name],
        default_args={**DEFAULT_ARGS, "on_failure_callback": on_failure},
        on_failure_callback=on_failure,
        doc_md=f"### {obs.title or obs.name} (`{obs.dag_id}`)\n\n{_DOC}\n\n{table.describe()}",
        params={
            "observatory": Param(obs.name, type="string", enum=[obs.name]),
            "session_dir": Param("", type="string", description=f"absolute, or in {incoming}"),
            "session_id": Param(None, type=["null", "string"], description="Work folder name"),
        },
        render_template_as_native_obj=False,
    )
    def reduction():
        @task(task_id="validate")
        def validate(**context) -> dict:
            """Open the session afresh: manifest of frames by type (lifecycle.open_session)."""
            from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

            from rpp_tasks.session import lifecycle

            try:
                out = lifecycle.open_from_conf(context["params"], obs)
            except ValueError as exc:
                raise AirflowFailException(str(exc)) from None
            if out["n_science"] == 0:
                raise AirflowSkipException(
                    f"session {out['session_id']}: no science frames in {out['raw_dir']} "
                    f"({out['n_calibration']}); nothing to reduce"
                    + (f" ({out['spectra_error']})" if out.get("spectra_error") else "")
                )
            return out

        def stage_task(name: str, heavy: bool):
            @task(task_id=name, **({"pool": HEAVY_POOL} if heavy else {}))
            def run(prev: dict) -> dict:
                """Run this stage for the session (lifecycle.run_stage; retries start clean)."""
                from rpp_tasks.session import connections, lifecycle

                if name == "enrich":
                    connections.colibri_key_to_env(
                        obs.catalogs.colibri_conn_id, get_connection=_conn, mask=_mask
                    )
                res = lifecycle.run_stage(_session(prev), obs, name, table=table)
                res.pop("stages", None)
                return {"workdir": prev["workdir"], "session_id": prev["session_id"], **res}

            return run

        @task(task_id="products")
        def products(prev: dict, **context) -> dict:
            """Session summary, results database, morning report and products ZIP."""
            from rpp_tasks.session import lifecycle

            runs = {n: context["ti"].xcom_pull(task_ids=n) or {} for n in table.names}
            runs = {n: {k: v for k, v in r.items() if k != "workdir"} for n, r in runs.items()}
            airflow = {"dag_id": obs.dag_id, "run_id": context["run_id"]}
            return lifecycle.finish(_session(prev), obs, airflow=airflow, stage_runs=runs)[1]

        @task(task_id="archive")
        def archive(prev: dict) -> dict:
            """Upsert the session's ObsCore rows (skipped when disabled or nothing was reduced)."""
            from airflow.sdk.exceptions import AirflowSkipException

            from rpp_tasks.session import connections, lifecycle

            if not obs.archive.enabled:
                raise AirflowSkipException(f"archive disabled in {obs.source}")
            url = connections.archive_url(obs, get_connection=_conn)
            res = lifecycle.archive(_session(prev), obs, url=url)
            if res is None:
                raise AirflowSkipException(f"[{prev['session_id']}] no reduced frame to archive")
            return {k: v for k, v in res.items() if not isinstance(v, list) or len(v) <= 50}

        @task(task_id="notify")
        def notify(prev: dict, **context) -> dict:
            """Tell the observers (e-mail, Telegram); a failed send fails this task only."""
            from airflow.sdk.exceptions import AirflowSkipException

            from rpp_tasks.outputs.notify import NotificationError
            from rpp_tasks.session import lifecycle

            res = lifecycle.notify(
                _session(prev), obs, get_connection=_conn, mask=_mask, run_key=context.get("run_id")
            )
            if res["status"] == "failed":
                raise NotificationError(
                    "notification failed (the products and the archive are not affected): "
                    + "; ".join(res["failed"])
                )
            if res["status"] == "skipped":
                why = "; ".join(f"{n['channel']}: {n['error']}" for n in res["notices"])
                raise AirflowSkipException(
                    "nothing sent: " + (why or "no notification channel configured")
                )
            keys = ("status", "n_ok", "n_failed", "n_skipped", "failed", "report", "products_zip")
            return {k: res.get(k) for k in (*keys, "notify_json")}

        prev = validate()
        for stage in table:
            prev = stage_task(stage.name, stage.heavy)(prev)
        made = products(prev)
        archive(made)
        notify(made)

    return reduction()


def build_config_error_dag(stem: str, source: str, error: ConfigError | Exception):
    """A placeholder ``rpp_<stem>`` DAG for a broken YAML: its description and only task carry the
    error, so the watcher's trigger for that observatory fails loudly instead of "DAG not found"."""
    text = str(error)
    on_failure = _make_failure_callback(None)

    @dag(
        dag_id=dag_id_for_stem(stem),
        description=f"CONFIGURATION ERROR: {text}"[:200],
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        tags=["rpp", stem, "config-error"],
        default_args={"owner": "rpp", "retries": 0, "on_failure_callback": on_failure},
        doc_md=f"### Configuration error in `{source}`\n\n```\n{text}\n```\n\n"
        "Fix the YAML (`rpp config` validates it); the real DAG replaces this one at the next "
        "parse.",
        params={
            "session_dir": Param("", type="string"),
            "session_id": Param(None, type=["null", "string"]),
            "observatory": Param(stem, type="string"),
        },
    )
    def config_error():
        @task(task_id="config_error", doc_md=f"```\n{text}\n```")
        def fail():
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(f"configuration error: {text}")

        fail()

    return config_error()


def build_dags(config_dir: Path = CONFIG_DIR, only_dag_id: str | None = None) -> dict:
    """One DAG per observatory YAML (a config-error DAG for a broken one): ``{dag_id: DAG}``.
    In a task process (``only_dag_id``) only the YAML of the DAG being run is parsed."""
    one = config_dir / "observatories" / f"{(only_dag_id or '')[4:]}.yaml"
    if only_dag_id and only_dag_id.startswith("rpp_") and one.is_file():
        found, errors = [], {}
        try:
            found = [rpp_config.load_observatory_config(one, defaults=config_dir / "defaults.yaml")]
        except ConfigError as exc:
            errors = {str(one): exc}
    else:
        found, errors = rpp_config.load_observatory_configs(config_dir, strict=False)
    built = {}
    for obs in found:
        if only_dag_id in (None, obs.dag_id):
            try:
                built[obs.dag_id] = build_reduction_dag(obs)
            except ConfigError as exc:  # no stage table for the instrument kind
                errors.setdefault(obs.source, exc)
    for source, exc in errors.items():
        dag_id = dag_id_for_stem(Path(source).stem)
        if only_dag_id in (None, dag_id) and dag_id not in built:
            built[dag_id] = build_config_error_dag(Path(source).stem, source, exc)
    return built


_DAGS = build_dags(CONFIG_DIR, get_parsing_context().dag_id)
globals().update({f"dag_{k}": v for k, v in _DAGS.items()})
