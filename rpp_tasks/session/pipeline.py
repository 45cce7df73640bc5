"""Drivers of the per-frame stages: one frame in memory, or the frames of a session in a pool.

* `reduce_frame` runs every frame stage of the table on one frame in memory and writes its
  products once (``rpp reduce FILE`` and the benchmark);
* `run_frames` runs one stage or consecutive stages for the frames of a session (all of them, or
  a chunk) in a process pool, each frame resuming from the artefacts its first stage reads and
  saving what later stages read (`rpp_tasks.session.lifecycle.run_stage` calls it for every
  Airflow stage task and for ``rpp reduce FOLDER``).

Both go through `rpp_tasks.session.frame.run_chain`, so there is one implementation of the chain.
A frame that fails is recorded as rejected with the stage and the reason, and the other frames go
on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from rpp_tasks.config import ObservatoryConfig
from rpp_tasks.exceptions import FrameRejected
from rpp_tasks.session import pool
from rpp_tasks.session.frame import FrameWork, frame_summary, run_chain
from rpp_tasks.session.table import IMAGING, StageTable
from rpp_tasks.session.workdir import Session, read_json, write_json_atomic

__all__ = ["FRAME_STAGES", "reduce_frame", "run_frames", "frame_stem", "give_up"]

log = logging.getLogger(__name__)

#: The per-frame stages of the imaging table, in order.
FRAME_STAGES = IMAGING.frame_stages


def frame_stem(path) -> str:
    """Name of a frame's folder (``frames/<stem>``) for its raw file."""
    from rpp_tasks.inputs.header import frame_stem as _stem

    return _stem(Path(path))


def _run_frame(
    fw: FrameWork,
    obs,
    names: Sequence[str],
    table: StageTable,
    session: Session | None,
    **chain_kwargs,
) -> dict:
    """Run the chain on one frame; a rejection or an error becomes the frame's outcome."""
    try:
        run_chain(fw, obs, names, table, **chain_kwargs)
        summary = frame_summary(fw, obs)
    except Exception as exc:
        stage = fw.stage or names[0]
        if isinstance(exc, FrameRejected):
            status, reason = "rejected", exc.reason
            if session is None:  # (Session.reject logs it)
                log.warning("[%s] rejected at %s: %s", fw.stem, stage, reason)
        else:  # a bad frame must not stop the others; the traceback goes to the log
            status, reason = "failed", f"{type(exc).__name__}: {exc}"
            log.error("[%s] %s failed: %s\n%s", fw.stem, stage, exc, traceback.format_exc())
        if session is not None:
            session.reject(fw.stem, reason=reason, stage=stage, path=str(fw.raw_path))
        if fw.meta and not (fw.outdir / "check.json").exists():
            write_json_atomic(fw.outdir / "check.json", fw.meta)
        summary = frame_summary(fw, obs, status=status, reason=reason, stage=stage)
    write_json_atomic(fw.outdir / "summary.json", summary)
    return summary


def reduce_frame(
    path: str | os.PathLike,
    obs: ObservatoryConfig,
    workdir: str | os.PathLike,
    *,
    masters: dict | None = None,
    keep_intermediate: bool = False,
    table: StageTable = IMAGING,
) -> dict:
    """Run every frame stage on one science frame in memory; write its products and summary.

    Parameters
    ----------
    path : path-like
        Raw FITS frame (never modified).
    obs : ObservatoryConfig
    workdir : path-like
        Output folder for this frame (created).
    masters : dict, optional
        ``masters.json`` content (paths of master bias/dark/flat); none = no calibration frames.
    keep_intermediate : bool
        Also write the checkpoints (``background.fits``, ``sources.ecsv``).
    table : `~rpp_tasks.session.table.StageTable`, optional

    Returns
    -------
    summary : dict
        `~rpp_tasks.session.summary.FrameSummary` as written to ``summary.json``; ``status`` is
        ``"rejected"`` or ``"failed"`` (with ``reason`` and ``failed_stage``) when the frame could
        not be reduced. Nothing is raised for a bad frame.
    """
    path, outdir = Path(path), Path(workdir)
    outdir.mkdir(parents=True, exist_ok=True)
    fw = FrameWork(stem=frame_stem(path), raw_path=path, outdir=outdir, masters=dict(masters or {}))
    return _run_frame(
        fw,
        obs,
        table.frame_stages,
        table,
        None,
        keep_intermediate=keep_intermediate,
        time_write=True,
    )


def _frame_job(
    workdir: str,
    stem: str,
    raw_path: str,
    names: tuple[str, ...],
    obs: ObservatoryConfig,
    table: StageTable,
    keep_intermediate: bool,
    in_pool: bool = False,
    fault: dict | None = None,
) -> dict:
    """Run ``names`` on one frame of a session (in a worker process when ``in_pool``: the
    worker's marker file says which frame and stage it works on, its peak RSS is measured)."""
    session = Session.load(workdir)
    fw = FrameWork(
        stem=stem, raw_path=Path(raw_path), outdir=session.frame_dir(stem), session=session
    )
    if not in_pool:
        return _run_frame(fw, obs, names, table, session, keep_intermediate=keep_intermediate)

    def on_stage(stage: str) -> None:
        pool.worker_marker(fw.outdir, stage)
        pool.maybe_kill_for_test(fault, stem, stage, names[0], fw.outdir)

    pool.peak_rss_reset()
    pool.worker_marker(fw.outdir, names[0])
    try:
        out = _run_frame(
            fw, obs, names, table, session, keep_intermediate=keep_intermediate, on_stage=on_stage
        )
    finally:
        (fw.outdir / pool.MARKER).unlink(missing_ok=True)
    return {**out, "_peak_rss_bytes": pool.peak_rss_bytes()}


def give_up(
    session: Session, obs, stem: str, entry: dict, reason: str, status: str, stage: str
) -> dict:
    """Record a frame that did not run, whose worker died or whose task never completed:
    ``rejected.json`` and ``summary.json`` (with the stages it did finish). ``entry`` is the
    frame's manifest entry. Returns the summary."""
    outdir = session.frame_dir(stem)
    meta = read_json(outdir / "check.json") or {
        k: v for k, v in entry.items() if k not in ("stem", "path")
    }
    fw = FrameWork(
        stem=stem, raw_path=Path(entry["path"]), outdir=outdir, session=session, meta=meta
    )
    prev = read_json(outdir / "summary.json", {}) or {}
    fw.results = dict(prev.get("stages") or {})
    session.reject(stem, reason=reason, stage=stage, path=entry["path"])
    summary = frame_summary(fw, obs, status=status, reason=reason, stage=stage)
    write_json_atomic(outdir / "summary.json", summary)
    return summary


@contextlib.contextmanager
def _main_module_without_path():
    """Hide ``__main__.__file__`` while the frame process pool starts its workers.

    In a task process ``__main__`` is the ``airflow`` command script (or Celery's);
    multiprocessing's forkserver and spawn start methods re-run the main script in every worker,
    which imports and initialises Airflow there (and fails: task processes have no metadata DB),
    so every frame dies with BrokenProcessPool. Without a path the workers import only what the
    frame job needs (``rpp_tasks.session.pipeline``).
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


@contextlib.contextmanager
def _multiprocessing_main():
    """Let the frame pool start in a task process that inherited a Celery pool child's identity.

    A Celery prefork worker runs each task in a daemonic billiard pool child, and billiard makes
    that child the standard library's ``current_process()`` too; Airflow's supervisor forks the
    task process from it and the fork inherits that object. ``ProcessPoolExecutor`` then refused
    to start (``AssertionError: daemonic processes are not allowed to have children``) and, past
    that, could not hand billiard's authentication key to the forkserver (billiard's key type
    refuses to be pickled by the standard library). The task process is not that pool child: it
    is an ``os.fork`` of it, waited for by its supervisor, and the pool is shut down before
    `run_frames` returns. So, only while the pool lives, the inherited process object says "not
    daemonic" and carries the same key as a standard-library key; its settings are restored after.
    """
    from multiprocessing import process as mp_process

    inherited = mp_process.current_process()
    config = getattr(inherited, "_config", None)
    if not isinstance(config, dict) or not config.get("daemon"):
        yield
        return
    log.info("daemonic parent (a Celery prefork pool child): frame pool started all the same")
    inherited._config = {
        **config,
        "daemon": False,
        "authkey": mp_process.AuthenticationString(bytes(config["authkey"])),
    }
    try:
        yield
    finally:
        inherited._config = config


def run_frames(
    session: Session,
    obs: ObservatoryConfig,
    names: Sequence[str],
    *,
    frames: Sequence[str] | None = None,
    workers: int | None = None,
    keep_intermediate: bool = True,
    table: StageTable = IMAGING,
) -> dict:
    """Run consecutive frame stages ``names`` for the session's frames still in play.

    ``frames`` limits the run to those frame stems (a chunk); by default every science frame of
    the manifest that is not rejected. Frames run in a process pool (``workers``; default
    ``RPP_WORKERS`` or 2; with one worker the frames run in this process). Memory is planned
    from the headers and worker deaths are survived (`rpp_tasks.session.pool`): a frame above
    the budget per worker runs alone, one that can never fit is rejected unread, and a frame
    whose worker dies is retried once alone, then rejected with the reason; the other frames'
    results are kept. Returns counts, the rejected frames, the budget (``memory_budget_mb``), the
    frames run alone and each frame's peak RSS in its worker (``peak_rss_mb``); raises
    `RuntimeError` only if every frame failed with an unexpected error (a systemic problem worth
    a retry), never for rejected frames.
    """
    names = tuple(s.name for s in table.chain(tuple(names)))
    rejected_before = session.rejected()
    wanted = None if frames is None else set(frames)
    entries = {
        f["stem"]: f
        for f in session.read_json("manifest.json", {}).get("science", [])
        if f["stem"] not in rejected_before and (wanted is None or f["stem"] in wanted)
    }
    workers = max(int(workers or os.environ.get("RPP_WORKERS", 2)), 1)
    label = "+".join(names)
    t0 = time.perf_counter()
    log.info("[%s] %s: %d frames, %d workers", session.session_id, label, len(entries), workers)
    budget = pool.memory_budget_bytes(obs, workers)
    bpp = getattr(obs.session, "bytes_per_pixel", None) or pool.DEFAULT_BYTES_PER_PIXEL
    jobs = [
        pool.PoolJob(
            stem=stem,
            args=(str(session.workdir), stem, e["path"], names, obs, table, keep_intermediate),
            outdir=session.frame_dir(stem),
            shape=tuple(e.get("shape") or ()) or None,
            peak_bytes=pool.frame_peak_bytes(e.get("shape"), bytes_per_pixel=bpp),
        )
        for stem, e in entries.items()
    ]
    shared, alone, never = pool.plan_memory(jobs, budget_bytes=budget, workers=workers)
    summaries = [
        give_up(session, obs, stem, entries[stem], why, "rejected", names[0])
        for stem, why in never.items()
    ]
    if alone:
        log.info(
            "[%s] %d frames above the memory budget of %.1f GB per worker run alone: %s",
            session.session_id,
            len(alone),
            budget / 2**30,
            ", ".join(j.stem for j in alone),
        )
    peaks: dict[str, int] = {}
    if workers <= 1:
        summaries += [_frame_job(*j.args) for j in shared]
    elif shared or alone:
        import multiprocessing as mp

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["rpp_tasks.session.pipeline", "numpy", "astropy.io.fits"])
        fault = pool.test_fault_from_env()
        for j in jobs:
            j.args = (*j.args, True, fault)
        done = []

        def on_done(job, s):
            done.append(job.stem)
            if s.get("_peak_rss_bytes"):
                peaks[job.stem] = s["_peak_rss_bytes"]
            log.info(
                "[%s] %s %d/%d frames done (%s %s)",
                session.session_id,
                label,
                len(done),
                len(jobs),
                s["frame"],
                s["status"],
            )

        def on_death(job, reason, status, stage=None):
            stage = stage if stage in names else names[0]
            return give_up(session, obs, job.stem, entries[job.stem], reason, status, stage)

        with _main_module_without_path(), _multiprocessing_main():
            results = pool.run_supervised(
                _frame_job,
                shared,
                alone,
                workers=workers,
                ctx=ctx,
                budget_bytes=budget,
                on_done=on_done,
                on_death=on_death,
            )
        summaries += [
            {k: v for k, v in s.items() if k != "_peak_rss_bytes"} for s in results.values()
        ]
    failed = [s for s in summaries if s["status"] == "failed"]
    out = {
        "stages": list(names),
        "n_frames": len(jobs),
        "memory_budget_mb": round(budget / 2**20),
        "alone": [j.stem for j in alone],
        "peak_rss_mb": {k: round(v / 2**20, 1) for k, v in sorted(peaks.items())},
        "n_ok": sum(s["status"] == "ok" for s in summaries),
        "n_rejected": sum(s["status"] == "rejected" for s in summaries),
        "n_failed": len(failed),
        "wall_s": round(time.perf_counter() - t0, 3),
        "rejected": {
            s["frame"]: {"reason": s["reason"], "stage": s["failed_stage"]}
            for s in summaries
            if s["status"] != "ok"
        },
    }
    if jobs and len(failed) == len(jobs):
        raise RuntimeError(f"{label} failed for every frame; first error: {failed[0]['reason']}")
    return out
