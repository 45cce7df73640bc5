"""
## RPP reduction: one DAG per observatory

One DAG per `config/observatories/*.yaml` (`rpp_<observatory>`). A run reduces one **session** (a
night's frames with its calibration frames), handed over by the watcher as the run conf
`{"observatory", "session_id", "session_dir"}` (run id `session__<session_id>`), or typed into the
trigger form: validate (cuts the night into chunks of frames) -> the session stages (masters) ->
the frame stages as one task per chunk (`frames`, mapped) -> products -> (archive, notify).

Wiring only: Params, connections -> plain settings, skip/fail decisions and the factory over the
stage table (`rpp_tasks.session.table`: its session- and frame-scope segments). Each task calls one
`rpp_tasks.session.lifecycle` function, the same ones `rpp reduce` calls; tasks hand each other
the work folder and a small dict. Concurrency and retries come from the observatory's
`scheduling` section. A broken YAML becomes a small `rpp_<file stem>` DAG carrying the error.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path

from airflow.sdk import Param, dag, get_parsing_context, task

from rpp_tasks import config as rpp_config
from rpp_tasks.config import ObservatoryConfig
from rpp_tasks.exceptions import ConfigError, NothingReduced
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


def _session(prev: dict | list):  # validate's result is the list of the night's chunks
    from rpp_tasks.session import lifecycle

    return lifecycle.resume((prev if isinstance(prev, dict) else prev[0])["workdir"])


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
            """Open the session afresh (manifest of frames by type) and cut the night into chunks
            of frames: one dict per chunk, the session's description + ``chunk`` (its stems)."""
            from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

            from rpp_tasks.session import lifecycle

            try:
                out = lifecycle.open_from_conf(context["params"], obs)
            except ValueError as exc:
                raise AirflowFailException(str(exc)) from None
            except NothingReduced as exc:  # files but no science frame: a failed night
                if exc.empty:
                    raise AirflowSkipException(str(exc)) from None
                raise AirflowFailException(str(exc)) from None
            chunks = out.pop("chunks") or [[]]  # (a table of session stages only: no chunk)
            return [{**out, "n_chunks": len(chunks), "chunk": c} for c in chunks]

        def stage_task(name: str, heavy: bool):
            @task(task_id=name, **({"pool": HEAVY_POOL} if heavy else {}))
            def run(prev: list) -> dict:
                """Run this session stage once (lifecycle.run_stage; retries start clean)."""
                from rpp_tasks.session import lifecycle

                _with_colibri_key(obs, (name,))
                res = lifecycle.run_stage(_session(prev), obs, name, table=table)
                res.pop("stages", None)
                return res

            return run

        def chunk_task(task_id: str, names: tuple[str, ...], heavy: bool):
            @task(
                task_id=task_id,
                map_index_template="{{ rpp_chunk_label | default('') }}",
                **({"pool": HEAVY_POOL} if heavy else {}),
            )
            def run(job: dict) -> dict:
                """Run the frame stages for one chunk of the night's frames (lifecycle.run_chunk;
                a retry redoes this chunk only)."""
                from airflow.sdk import get_current_context

                from rpp_tasks.session import lifecycle

                chunk = job["chunk"]
                get_current_context()["rpp_chunk_label"] = lifecycle.chunk_label(chunk)
                _with_colibri_key(obs, names)
                return lifecycle.run_chunk(_session(job), obs, names, chunk, table=table)

            return run

        @task(task_id="products")
        def products(prev: list, runs: dict, **context) -> dict:
            """Session summary, results database, morning report and products ZIP; fails (after
            writing them) when no science frame was reduced."""
            from airflow.sdk.exceptions import AirflowFailException

            from rpp_tasks.session import lifecycle

            stage_runs = lifecycle.merge_stage_runs(table, runs)
            airflow = {"dag_id": obs.dag_id, "run_id": context["run_id"]}
            summary, made = lifecycle.finish(
                _session(prev), obs, airflow=airflow, stage_runs=stage_runs
            )
            try:  # summary and report are written; no frame reduced fails the night
                lifecycle.require_reduced(summary)
            except NothingReduced as exc:
                raise AirflowFailException(str(exc)) from None
            return made

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

        opened = validate()
        last, runs = opened, {}
        for scope, names in table.segments():
            if scope == "session":
                for n in names:
                    runs[n] = stage_task(n, table[n].heavy)(opened)
                    last >> runs[n]
                    last = runs[n]
                continue
            tid, heavy = table.segment_task_id(names), any(table[n].heavy for n in names)
            runs[tid] = chunk_task(tid, names, heavy).expand(job=opened)
            last >> runs[tid]
            last = runs[tid]
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
