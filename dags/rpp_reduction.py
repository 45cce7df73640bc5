"""
## RPP reduction: one DAG per observatory

One DAG per `config/observatories/*.yaml` (`rpp_<observatory>`). A run reduces one **session** (a
night's frames with its calibration frames), handed over by the watcher as the run conf
`{"observatory", "session_id", "session_dir"}` (run id `session__<session_id>`), or typed into the
trigger form: validate (cuts the night into chunks of frames) -> the session stages (masters) ->
the frame stages as one task per chunk (`frames`, mapped) -> products -> (archive, notify).

Wiring only: Params, connections -> plain settings, skip/fail decisions and the factory over the
stage table (`rpp_tasks.session.table`: its session- and frame-scope segments). Each task calls one
function of `rpp_tasks.session.tasks` (over `rpp_tasks.session.lifecycle`, which `rpp reduce` calls
too); tasks hand each other the work folder and a small dict. Concurrency and retries come from the
observatory's `scheduling` section. A broken YAML becomes a small `rpp_<file stem>` DAG carrying the
error.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
from pathlib import Path

from airflow.sdk import Param, dag, get_parsing_context, task

from rpp_tasks import config as rpp_config
from rpp_tasks.config import ObservatoryConfig
from rpp_tasks.exceptions import ConfigError, TaskFailed, TaskSkipped
from rpp_tasks.session.table import StageTable, table_for

CONFIG_DIR = rpp_config.default_config_dir()
#: Airflow pool that bounds the CPU-heavy stage tasks (created by the launcher, ``rpp up``).
HEAVY_POOL = os.environ.get("RPP_AIRFLOW_POOL", "rpp_heavy")
START_DATE = _dt.datetime(2025, 1, 1, tzinfo=_dt.UTC)
_DOC = (
    "Triggered per session by the watcher or rpp_reconcile; by hand, with `session_dir` (absolute, "
    "or in the incoming folder). A re-run replaces the session's products. Tasks: validate ->"
)
DEFAULT_ARGS = {  # + retries and retry_delay from the observatory's scheduling section
    "owner": "rpp",
    "retry_exponential_backoff": 2.0,  # retry_delay (10 s), 20 s, ... (capped below)
    "max_retry_delay": _dt.timedelta(minutes=10),
    "execution_timeout": _dt.timedelta(hours=3),
}
#: Tasks after the chunks run if any task before them succeeded: a chunk that failed after its
#: retries costs its frames (rejected with the reason by products), not the rest of the night.
AFTER_CHUNKS = {"trigger_rule": "all_done_min_one_success"}


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


@contextlib.contextmanager
def _states():  # the library's outcomes -> Airflow task states (other errors are retried)
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    try:
        yield
    except TaskSkipped as exc:
        raise AirflowSkipException(str(exc)) from None
    except TaskFailed as exc:
        raise AirflowFailException(str(exc)) from None


def _with_colibri_key(obs: ObservatoryConfig, names) -> None:
    if "enrich" in names:
        from rpp_tasks.session import connections

        connections.colibri_key_to_env(
            obs.catalogs.colibri_conn_id, get_connection=_conn, mask=_mask
        )


def build_reduction_dag(obs: ObservatoryConfig, table: StageTable | None = None):
    """The `rpp_<observatory>` DAG of one valid configuration: one task per session stage of
    ``table``, one task mapped over the night's chunks per run of frame stages."""
    table = table or table_for(obs)
    on_failure = _make_failure_callback(obs)
    incoming = obs.resolve_path("incoming")

    @dag(
        dag_id=obs.dag_id,
        description=f"Nightly reduction of {obs.title or obs.name}",
        schedule=None,  # one run per session, from the watcher / rpp_reconcile
        start_date=START_DATE,
        catchup=False,
        max_active_runs=obs.scheduling.max_active_runs,  # 2 by default: a small host
        max_active_tasks=obs.scheduling.max_active_tasks,  # the rpp_heavy pool bounds the CPU
        tags=["rpp", obs.name],
        default_args={
            **DEFAULT_ARGS,
            "retries": obs.scheduling.retries,
            "retry_delay": _dt.timedelta(seconds=obs.scheduling.retry_delay_s),
            "on_failure_callback": on_failure,
        },
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
        def validate(**context) -> list[dict]:
            """Open the session afresh and cut the night into chunks (tasks.validate)."""
            from rpp_tasks.session import tasks

            with _states():
                return tasks.validate(context["params"], obs)

        def stage_task(name: str, heavy: bool, after_chunks: bool):
            @task(
                task_id=name,
                **({"pool": HEAVY_POOL} if heavy else {}),
                **(AFTER_CHUNKS if after_chunks else {}),
            )
            def run(prev: list) -> dict:
                """Run this session stage once (tasks.run_stage; retries start clean)."""
                from rpp_tasks.session import tasks

                _with_colibri_key(obs, (name,))
                return tasks.run_stage(prev, obs, name, table)

            return run

        def chunk_task(task_id: str, names: tuple[str, ...], heavy: bool):
            @task(
                task_id=task_id,
                map_index_template="{{ rpp_chunk_label | default('') }}",
                **({"pool": HEAVY_POOL} if heavy else {}),
            )
            def run(job: dict) -> dict:
                """Run the frame stages for one chunk of the night's frames (tasks.run_chunk; a
                retry redoes this chunk only)."""
                from airflow.sdk import get_current_context

                from rpp_tasks.session import tasks

                get_current_context()["rpp_chunk_label"] = tasks.chunk_label(job)
                _with_colibri_key(obs, names)
                return tasks.run_chunk(job, obs, names, table)

            return run

        @task(task_id="products", **AFTER_CHUNKS)
        def products(prev: list, runs: dict, **context) -> dict:
            """Session summary, results database, report, products ZIP (tasks.products)."""
            from rpp_tasks.session import tasks

            airflow = {"dag_id": obs.dag_id, "run_id": context["run_id"]}
            with _states():
                return tasks.products(prev, obs, table, runs, airflow=airflow)

        @task(task_id="archive")
        def archive(prev: dict) -> dict:
            """Upsert the session's ObsCore rows (tasks.archive)."""
            from rpp_tasks.session import tasks
            from rpp_tasks.session.connections import archive_url

            with _states():
                return tasks.archive(prev, obs, url=lambda: archive_url(obs, get_connection=_conn))

        @task(task_id="notify")
        def notify(prev: dict, **context) -> dict:
            """Tell the observers; a failed send fails this task only (tasks.notify)."""
            from rpp_tasks.session import tasks

            with _states():
                return tasks.notify(
                    prev, obs, get_connection=_conn, mask=_mask, run_key=context.get("run_id")
                )

        opened = validate()
        last, runs, chunked = opened, {}, False
        for scope, names in table.segments():
            if scope == "session":
                for n in names:
                    runs[n] = stage_task(n, table[n].heavy, chunked)(opened)
                    last >> runs[n]
                    last = runs[n]
                continue
            tid, heavy = table.segment_task_id(names), any(table[n].heavy for n in names)
            runs[tid] = chunk_task(tid, names, heavy).expand(job=opened)
            last >> runs[tid]
            last, chunked = runs[tid], True
        made = products(opened, runs)
        last >> made
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
