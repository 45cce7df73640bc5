"""What each task of the reduction DAG does, as plain functions (no Airflow here).

``dags/rpp_reduction.py`` only wires these: every task calls one function below with the small
dict the previous task returned, and maps the two outcomes that are not a plain failure to task
states: `TaskSkipped` (nothing to do: the task is skipped) and `TaskFailed` (a failure that no
retry can cure: the task fails at once and the operators are alerted). Any other exception is an
ordinary failure that Airflow retries. The session itself is handled by
`rpp_tasks.session.lifecycle`, the same functions `rpp reduce` calls.
"""

from __future__ import annotations

from collections.abc import Callable

from rpp_tasks.exceptions import NothingReduced, TaskFailed, TaskSkipped
from rpp_tasks.session import lifecycle
from rpp_tasks.session.table import StageTable
from rpp_tasks.session.workdir import Session

__all__ = [
    "TaskSkipped",
    "TaskFailed",
    "session_of",
    "validate",
    "run_stage",
    "chunk_label",
    "run_chunk",
    "products",
    "archive",
    "notify",
    "NOTIFY_KEYS",
]

#: What the notify task returns (small enough for XCom).
NOTIFY_KEYS = (
    "status",
    "n_ok",
    "n_failed",
    "n_skipped",
    "failed",
    "report",
    "products_zip",
    "notify_json",
)


def session_of(prev: dict | list) -> Session:
    """The session of a task's input: a chunk list (validate's result) or a task's dict."""
    return lifecycle.resume((prev if isinstance(prev, dict) else prev[0])["workdir"])


def validate(params: dict, obs) -> list[dict]:
    """Open the session afresh (manifest of frames by type) and cut the night into chunks of
    frames, at least one per chunk task the deployment runs at once
    (`~rpp_tasks.session.lifecycle.deployment_lanes`): one dict per chunk, the session's
    description plus ``chunk`` (its frame stems).

    Raises `TaskFailed` for a refused run conf or a folder with files but no science frame, and
    `TaskSkipped` for a folder without any file."""
    try:
        out = lifecycle.open_from_conf(params, obs, lanes=lifecycle.deployment_lanes(obs))
    except ValueError as exc:
        raise TaskFailed(str(exc)) from None
    except NothingReduced as exc:  # files but no science frame: a failed night
        raise (TaskSkipped if exc.empty else TaskFailed)(str(exc)) from None
    chunks = out.pop("chunks") or [[]]  # (a table of session stages only: no chunk)
    return [{**out, "n_chunks": len(chunks), "chunk": c} for c in chunks]


def run_stage(prev: list, obs, name: str, table: StageTable) -> dict:
    """Run one session stage (``masters``...) over the session; its result without the per-frame
    details (`rpp_tasks.session.lifecycle.run_stage`)."""
    res = lifecycle.run_stage(session_of(prev), obs, name, table=table)
    res.pop("stages", None)
    return res


def chunk_label(job: dict) -> str:
    """The name of a chunk in the Airflow UI (its first and last frame)."""
    return lifecycle.chunk_label(job["chunk"])


def run_chunk(job: dict, obs, names, table: StageTable) -> dict:
    """Run the frame stages ``names`` for one chunk of the night's frames (``job`` is one of
    `validate`'s dicts; `rpp_tasks.session.lifecycle.run_chunk`)."""
    return lifecycle.run_chunk(session_of(job), obs, names, job["chunk"], table=table)


def products(prev: list, obs, table: StageTable, runs: dict, *, airflow: dict) -> dict:
    """Session summary, results database, morning report and products ZIP; `TaskFailed` (after
    writing them) when no science frame was reduced.

    Runs when at least one task before it succeeded, even if a chunk task failed: the frames of a
    chunk that did not complete are rejected with the reason
    (`~rpp_tasks.session.lifecycle.reject_unfinished_chunks`) and the rest of the night is
    published."""
    # a mapped task's results arrive as a lazy sequence (one API call per item): read them once
    runs = {k: v if v is None or isinstance(v, dict) else list(v) for k, v in runs.items()}
    session = session_of(prev)
    chunks = [job.get("chunk") or [] for job in prev] if isinstance(prev, list) else []
    lifecycle.reject_unfinished_chunks(session, obs, table, chunks, runs)
    stage_runs = lifecycle.merge_stage_runs(table, runs)
    summary, made = lifecycle.finish(session, obs, airflow=airflow, stage_runs=stage_runs)
    try:
        lifecycle.require_reduced(summary)
    except NothingReduced as exc:
        raise TaskFailed(str(exc)) from None
    return made


def archive(prev: dict, obs, *, url: Callable[[], str]) -> dict:
    """Upsert the session's ObsCore rows; `TaskSkipped` when the archive is disabled or nothing
    was reduced. ``url`` is called only when the archive is enabled (it reads a connection)."""
    if not obs.archive.enabled:
        raise TaskSkipped(f"archive disabled in {obs.source}")
    res = lifecycle.archive(session_of(prev), obs, url=url())
    if res is None:
        raise TaskSkipped(f"[{prev['session_id']}] no reduced frame to archive")
    return {k: v for k, v in res.items() if not isinstance(v, list) or len(v) <= 50}


def notify(prev: dict, obs, *, get_connection, mask, run_key=None) -> dict:
    """Tell the observers (e-mail, Telegram). A failed send raises
    `~rpp_tasks.outputs.notify.NotificationError` (retried; the products and the archive are not
    affected); nothing to send is `TaskSkipped`."""
    from rpp_tasks.outputs.notify import NotificationError

    res = lifecycle.notify(
        session_of(prev), obs, get_connection=get_connection, mask=mask, run_key=run_key
    )
    if res["status"] == "failed":
        raise NotificationError(
            "notification failed (the products and the archive are not affected): "
            + "; ".join(res["failed"])
        )
    if res["status"] == "skipped":
        why = "; ".join(f"{n['channel']}: {n['error']}" for n in res["notices"])
        raise TaskSkipped("nothing sent: " + (why or "no notification channel configured"))
    return {k: res.get(k) for k in NOTIFY_KEYS}
