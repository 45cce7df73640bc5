"""A night cut into chunks of frames: how the DAG spreads one night over its workers.

`plan_chunks` (in the validate task) cuts the night's science frames into chunks of about the same
pixels; each chunk runs the table's frame stages as one mapped task (`run_chunk`); the products
task merges the chunks' results into the summary's ``stage_runs`` (`merge_stage_runs`) and gives
the frames of a chunk whose task never completed their outcome (`reject_unfinished_chunks`), so
one lost chunk never takes the rest of the night down. ``rpp reduce`` runs every frame in one
pool and needs none of this.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

from rpp_tasks.session.table import StageTable
from rpp_tasks.session.workdir import Session, read_json

__all__ = [
    "plan_chunks",
    "deployment_lanes",
    "chunk_label",
    "run_chunk",
    "merge_chunk_runs",
    "merge_stage_runs",
    "reject_unfinished_chunks",
]

log = logging.getLogger(__name__)


def plan_chunks(session: Session, obs, *, lanes: int = 1) -> list[list[str]]:
    """Cut the night's science frames still in play into chunks (lists of stems, manifest order).

    The number of chunks is the night's megapixels (frame shapes from the manifest) over
    ``scheduling.chunk_megapixels`` (the largest chunk; or the frames over
    ``scheduling.chunk_frames``), rounded up to a multiple of ``lanes`` (chunk tasks the
    deployment runs at once, `deployment_lanes`) so that the chunks run in whole waves with every
    lane busy to the end, and at most one chunk per frame. The
    frames are shared out in order so that every chunk has about the same pixels: the chunks of
    one night then take about the same time on different workers. One host with one lane runs
    a night of up to ``chunk_megapixels`` as one chunk: no start-up and no pool tail paid twice.
    """
    sc = obs.scheduling
    rejected = session.rejected()
    frames = [
        f for f in session.read_json("manifest.json", {}).get("science", [])
        if f["stem"] not in rejected
    ]  # fmt: skip
    if not frames:
        return []
    mpx = []
    for f in frames:
        shape = f.get("shape") or (2048, 2048)
        mpx.append(max(float(shape[0]) * float(shape[1]) / 1e6, 1e-3))
    total = sum(mpx)
    if sc.chunk_frames:
        n_chunks = math.ceil(len(frames) / sc.chunk_frames)
        mpx = [1.0] * len(frames)  # equal shares of frames
        total = float(len(frames))
    else:
        n_chunks = math.ceil(total / sc.chunk_megapixels - 1e-9)
    lanes = max(1, int(lanes))
    n_chunks = lanes * math.ceil(n_chunks / lanes)  # whole waves: every lane busy to the end
    n_chunks = max(1, min(n_chunks, len(frames)))
    target = total / n_chunks
    chunks: list[list[str]] = [[] for _ in range(n_chunks)]
    done = 0.0
    for f, m in zip(frames, mpx):  # a frame goes to the chunk its pixel mid-point falls in
        chunks[min(n_chunks - 1, int((done + m / 2) / target))].append(f["stem"])
        done += m
    return [c for c in chunks if c]


def deployment_lanes(obs, environ=None) -> int:
    """How many chunk tasks of one night the deployment runs at once: the ``rpp_heavy`` pool's
    slots (``RPP_HEAVY_POOL_SLOTS``, set in every component's environment by
    `rpp_tasks.ops.deploy.airflow_settings`; 1 when unset) capped by
    ``scheduling.max_active_tasks``."""
    from rpp_tasks.session.pool import count_from_env

    slots = count_from_env("RPP_HEAVY_POOL_SLOTS", environ)
    return max(1, min(slots, int(obs.scheduling.max_active_tasks)))


def chunk_label(chunk: Sequence[str]) -> str:
    """How a chunk is named in the Airflow UI (its mapped task's map index)."""
    if not chunk:
        return "no frame"
    ends = chunk[0] if len(chunk) == 1 else f"{chunk[0]} .. {chunk[-1]}"
    return f"{ends} ({len(chunk)} frame{'s' if len(chunk) > 1 else ''})"


def run_chunk(
    session: Session,
    obs,
    stages: Sequence[str],
    chunk: Sequence[str],
    *,
    table: StageTable | None = None,
    workers: int | None = None,
) -> dict:
    """One mapped task of the DAG: the frame stages ``stages`` for the frames ``chunk`` (stems),
    in one process pool, each frame kept in memory from stage to stage (`run_stage` with
    ``frames``; a retry forgets this chunk's own rejections and redoes its frames). Returns the
    run's counts with ``chunk`` (the stems)."""
    from rpp_tasks.session.lifecycle import run_stage

    _test_fault(chunk)
    res = run_stage(session, obs, list(stages), frames=list(chunk), table=table, workers=workers)
    res.pop("stages", None)
    return {"chunk": list(chunk), **res}


def merge_chunk_runs(stages: Sequence[str], chunk_runs: Sequence[dict]) -> dict:
    """The chunks' results of one frame segment as one stage run (the summary's ``stage_runs``):
    summed counts, the chunks' wall times and every rejected frame."""
    runs = [r for r in chunk_runs if r]
    out: dict = {"stages": list(stages), "n_chunks": len(runs)}
    for key in ("n_frames", "n_ok", "n_rejected", "n_failed"):
        out[key] = sum(int(r.get(key, 0)) for r in runs)
    out["wall_s"] = round(sum(float(r.get("wall_s", 0.0)) for r in runs), 3)
    out["chunk_wall_s"] = [r.get("wall_s") for r in runs]
    out["chunk_frames"] = [len(r.get("chunk", [])) for r in runs]
    out["rejected"] = {k: v for r in runs for k, v in (r.get("rejected") or {}).items()}
    return out


def merge_stage_runs(table: StageTable, runs: dict) -> dict:
    """The DAG's task results as the summary's ``stage_runs``: one entry per session stage and
    one per frame segment (its mapped task id, the chunks merged by `merge_chunk_runs`)."""
    out = {}
    for scope, names in table.segments():
        if scope == "session":
            out.update({n: dict(runs.get(n) or {}) for n in names})
        else:
            tid = table.segment_task_id(names)
            out[tid] = merge_chunk_runs(names, list(runs.get(tid) or []))
    return out


def reject_unfinished_chunks(
    session: Session, obs, table: StageTable, chunks: Sequence[Sequence[str]], runs: dict
) -> list[str]:
    """Give an outcome to the frames of the chunks whose mapped task returned nothing.

    A chunk's task that failed after its retries (a worker lost every time, a frame that kills its
    whole task, a worker that cannot see the work folder), or that never ran because a task before
    it failed, leaves its frames without an outcome. Each such frame that did not finish the
    segment's stages (its ``summary.json`` says ``ok`` with the segment's last stage) is rejected
    with the task and chunk named, so the products task publishes the rest of the night and the
    summary, report and archive account for every frame.

    Parameters
    ----------
    chunks : sequence of sequence of str
        The night's chunks (frame stems), as `plan_chunks` cut them in the validate task.
    runs : dict
        The DAG's task results: per frame segment's task id, the results of the chunk tasks that
        completed (`run_chunk`'s dicts, with ``chunk``).

    Returns
    -------
    stems : list of str
        The frames rejected here.
    """
    from rpp_tasks.session.pipeline import give_up

    entries = {f["stem"]: f for f in session.read_json("manifest.json", {}).get("science", [])}
    rejected = session.rejected()
    out: list[str] = []
    for scope, names in table.segments():
        if scope != "frame":
            continue
        tid = table.segment_task_id(names)
        done = {stem for r in (runs.get(tid) or []) if r for stem in r.get("chunk", [])}
        for chunk in chunks:
            lost = [s for s in chunk if s not in done and s not in rejected and s in entries]
            lost = [s for s in lost if s not in out]  # (a later frame segment: already given up)
            for stem in lost:
                prev = read_json(session.path("frames", stem, "summary.json"), {}) or {}
                if prev.get("status") == "ok" and names[-1] in (prev.get("stages") or {}):
                    continue  # finished in a try whose task died afterwards: its products stand
                why = (
                    f"not reduced: its chunk task {tid} [{chunk_label(chunk)}] did not complete "
                    "(it failed after its retries, or a task before it failed); see that task's "
                    "log in the Airflow UI"
                )
                give_up(session, obs, stem, entries[stem], why, "failed", tid)
                out.append(stem)
    if out:
        log.error(
            "[%s] %d frames of chunks that did not complete are rejected: %s",
            session.session_id,
            len(out),
            ", ".join(out),
        )
    return out


def _test_fault(chunk: Sequence[str]) -> None:
    """Fault injection for tests (a real task failure, not a mock): ``RPP_TEST_FAIL_CHUNK=<stem>``
    makes every try of the chunk task holding that frame fail before it reduces anything, as a
    task whose worker cannot read the work folder or is lost at every try would."""
    stem = os.environ.get("RPP_TEST_FAIL_CHUNK")
    if stem and stem in chunk:
        raise RuntimeError(f"RPP_TEST_FAIL_CHUNK: the chunk task holding {stem} fails")
