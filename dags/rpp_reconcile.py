"""
## RPP reconcile: the watcher's safety net

Every 15 minutes, for each observatory, finds the sessions that are ready (same rule as the
watcher: quiet period / marker / 2SPOT file) but whose trigger the watcher has not confirmed in its
state file (`<paths.work>/watch_state.json`), or whose data files changed after their last
confirmed run, and triggers the missing `rpp_<observatory>` runs with the deterministic run id
`session__<session_id>` (`session__<session_id>__r<N>` for revision N, conf `revision`). A run
that exists already is skipped, so this never reduces a revision twice; a revision waits while the
run of the previous one is still queued or running (both would rebuild one work folder).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path

from airflow.sdk import dag, get_parsing_context, task

from rpp_tasks.config import default_config_dir

log = logging.getLogger(__name__)

CONFIG_DIR = default_config_dir()  # RPP_CONFIG_DIR, else <repo>/config
DAG_ID = "rpp_reconcile"
#: Seconds between the two snapshots of a session folder (files must not change in between).
SETTLE_SECONDS = float(os.environ.get("RPP_RECONCILE_SETTLE_S", "5"))


def session_rule(obs):
    """The watcher's readiness rule for an observatory configuration."""
    from rpp_tasks.ops.readiness import rule_from_config

    return rule_from_config(obs, settle_seconds=SETTLE_SECONDS)


def find_missing_runs(
    config_dir: Path = CONFIG_DIR, run_exists=None, run_active=None
) -> list[dict]:
    """Trigger kwargs (``trigger_dag_id``, ``trigger_run_id``, ``conf``) of ready, untriggered
    sessions and revisions.

    ``run_exists(dag_id, run_id) -> bool | None`` filters out those that already have a run;
    ``run_active(dag_id, run_id) -> bool | None`` holds back a revision while the previous
    revision's run is queued or running (``None``, unknown, holds it back too: the next
    reconcile run or the watcher triggers it). Observatories are scanned in parallel threads
    (each scan sleeps ``SETTLE_SECONDS``).
    """
    from concurrent.futures import ThreadPoolExecutor

    from rpp_tasks.config import load_observatory_configs
    from rpp_tasks.ops.watch_state import find_ready_untriggered

    configs, errors = load_observatory_configs(config_dir, strict=False)
    for exc in errors.values():
        log.warning("skipping a broken configuration: %s", exc)

    def scan(obs):
        incoming = obs.resolve_path("incoming")
        if not incoming.is_dir():
            log.info("%s: incoming folder %s does not exist", obs.name, incoming)
            return []
        state = obs.resolve_path("work") / "watch_state.json"
        return [(obs, c) for c in find_ready_untriggered(incoming, session_rule(obs), state)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        found = [pair for pairs in pool.map(scan, configs) for pair in pairs]
    out = []
    for obs, cand in found:
        if run_exists is not None and run_exists(obs.dag_id, cand.run_id):
            continue
        prev = cand.previous_run_id
        if prev and run_active is not None and run_active(obs.dag_id, prev) is not False:
            log.info(
                "%s: session %s revision %d waits for run %s to finish",
                obs.name,
                cand.session_id,
                cand.revision,
                prev,
            )
            continue
        log.info(
            "%s: session %s ready but not triggered: triggering %s",
            obs.name,
            cand.session_id,
            cand.run_id,
        )
        out.append(
            {
                "trigger_dag_id": obs.dag_id,
                "trigger_run_id": cand.run_id,
                "conf": cand.conf(obs.name),
            }
        )
    return out


def build_reconcile_dag():
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator

    @dag(
        dag_id=DAG_ID,
        schedule="*/15 * * * *",
        start_date=_dt.datetime(2025, 1, 1, tzinfo=_dt.UTC),
        catchup=False,
        max_active_runs=1,
        max_active_tasks=2,
        dagrun_timeout=_dt.timedelta(minutes=14),
        tags=["rpp", "reconcile"],
        default_args={
            "owner": "rpp",
            "retries": 2,
            "retry_delay": _dt.timedelta(seconds=30),
            "retry_exponential_backoff": 2.0,
            "max_retry_delay": _dt.timedelta(minutes=5),
        },
        doc_md=__doc__,
    )
    def reconcile():
        @task(task_id="find_missing_runs")
        def find_missing(**context) -> list[dict]:
            from rpp_tasks.ops.watch import ACTIVE_RUN_STATES

            ti = context["ti"]

            def run_exists(dag_id, run_id):
                try:
                    return ti.get_dr_count(dag_id=dag_id, run_ids=[run_id]) > 0
                except Exception as exc:  # unknown: let the trigger decide (it skips existing runs)
                    log.debug("run count for %s/%s unavailable: %s", dag_id, run_id, exc)
                    return None

            def run_active(dag_id, run_id):
                try:
                    n = ti.get_dr_count(
                        dag_id=dag_id, run_ids=[run_id], states=list(ACTIVE_RUN_STATES)
                    )
                    return n > 0
                except Exception as exc:  # unknown: wait (see find_missing_runs)
                    log.debug("run state of %s/%s unavailable: %s", dag_id, run_id, exc)
                    return None

            return find_missing_runs(CONFIG_DIR, run_exists, run_active)

        TriggerDagRunOperator.partial(
            task_id="trigger_missing_runs",
            skip_when_already_exists=True,
            fail_when_dag_is_paused=False,
            logical_date=None,
        ).expand_kwargs(find_missing())

    return reconcile()


if get_parsing_context().dag_id in (None, DAG_ID):
    build_reconcile_dag()
