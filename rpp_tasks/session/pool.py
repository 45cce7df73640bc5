"""The frame pool's safety: memory planned from the headers, worker deaths detected.

* **Memory is planned, not discovered.** `frame_peak_bytes` estimates a frame's peak memory in a
  worker from its header (``NAXIS1 x NAXIS2 x session.bytes_per_pixel`` + the process's base);
  `memory_budget_bytes` is the configured budget per worker (``session.memory_per_worker_mb``,
  default 80 % of the machine's RAM shared by the workers). `plan_memory` sorts the frames:
  those that fit run side by side, those above the budget per worker run **alone** (one worker,
  after the others), and a frame above the whole session's budget (budget x workers) is rejected
  before it is read, with the figures in the reason.
* **No worker takes the night down.** `run_supervised` runs the jobs in process pools; when a
  worker process dies (``BrokenProcessPool``: SIGKILL from the out-of-memory killer, a crash in
  C code), the frame it was reducing is found from its marker file (``frames/<stem>/.worker``:
  the worker's pid and current stage), the frames that had not started go on in a new pool, and
  the frame is retried once **alone**; if it dies again (or it was already alone) it is rejected
  with the reason (``worker killed (signal 9, SIGKILL) while reducing 8192x8192 frame at
  photometry; likely out of memory ...``). The other frames' results are kept.

Fault injection for tests (a real process death, not a mock): ``RPP_TEST_KILL_FRAME=<stem>``
makes the pool worker reducing that frame SIGKILL itself at the start of the stage
``RPP_TEST_KILL_STAGE`` (default: the first stage it runs); with ``RPP_TEST_KILL_ONCE=1`` only
the first time (the retry then succeeds). Only pool workers do it, never the calling process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_BYTES_PER_PIXEL",
    "BASE_BYTES",
    "PoolJob",
    "machine_memory_bytes",
    "frame_peak_bytes",
    "memory_budget_bytes",
    "count_from_env",
    "plan_memory",
    "run_supervised",
    "worker_marker",
    "peak_rss_reset",
    "peak_rss_bytes",
    "test_fault_from_env",
    "maybe_kill_for_test",
]

log = logging.getLogger(__name__)

#: Peak bytes per pixel of the frame chain in a worker (measured: bench/README.md, "Issue 12").
DEFAULT_BYTES_PER_PIXEL = 40.0
#: A worker's memory before its first frame (Python, numpy, astropy, scipy, the stage modules).
BASE_BYTES = 300 * 2**20
#: Share of the machine's RAM the frame workers may use together by default.
DEFAULT_RAM_SHARE = 0.8
MARKER = ".worker"


def machine_memory_bytes() -> int:
    """Physical memory of the machine (bytes)."""
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def frame_peak_bytes(
    shape: Sequence[int] | None,
    *,
    bytes_per_pixel: float = DEFAULT_BYTES_PER_PIXEL,
    base_bytes: int = BASE_BYTES,
) -> int:
    """Estimated peak memory (bytes) of a worker reducing a frame of ``shape`` (ny, nx)."""
    if not shape:
        return base_bytes
    n = 1
    for s in shape:
        n *= max(int(s), 1)
    return int(base_bytes + bytes_per_pixel * n)


def memory_budget_bytes(obs, workers: int, environ=None) -> int:
    """Memory budget of one frame worker: ``session.memory_per_worker_mb`` when configured, else
    `DEFAULT_RAM_SHARE` of the machine's RAM divided by the workers of all the heavy tasks this
    machine runs at once (``workers`` x ``RPP_TASKS_PER_HOST``, which the deployment sets: the
    ``rpp_heavy`` slots of one LocalExecutor host, a Celery worker's concurrency; 1 when unset)."""
    mb = getattr(getattr(obs, "session", None), "memory_per_worker_mb", None)
    if mb:
        return int(float(mb) * 2**20)
    tasks = count_from_env("RPP_TASKS_PER_HOST", environ)
    return int(DEFAULT_RAM_SHARE * machine_memory_bytes() / (max(int(workers), 1) * tasks))


def count_from_env(name: str, environ=None) -> int:
    """A count the deployment sets in every component's environment (``RPP_TASKS_PER_HOST``,
    ``RPP_HEAVY_POOL_SLOTS``): at least 1; 1 when unset or not an integer."""
    environ = os.environ if environ is None else environ
    try:
        return max(1, int(environ.get(name) or 1))
    except ValueError:
        return 1


@dataclass
class PoolJob:
    """One frame to run in the pool: its stem, the job's arguments, its size and estimate."""

    stem: str
    args: tuple
    outdir: Path
    shape: tuple[int, ...] | None = None
    peak_bytes: int = 0
    alone: bool = False  # planned (or retried) with one worker
    notes: dict = field(default_factory=dict)

    def size_text(self) -> str:
        if not self.shape or len(self.shape) < 2:
            return "a"
        return f"{self.shape[-1]}×{self.shape[-2]}"


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def plan_memory(
    jobs: Sequence[PoolJob], *, budget_bytes: int, workers: int
) -> tuple[list[PoolJob], list[PoolJob], dict[str, str]]:
    """Split the jobs by their estimated peak: (side by side, alone, {stem: rejection reason}).

    A frame above ``budget_bytes`` runs alone; above ``budget_bytes * workers`` (all the memory
    the session's workers may use) it can never fit and is rejected before it is read."""
    shared, alone, never = [], [], {}
    limit = budget_bytes * max(int(workers), 1)
    for j in jobs:
        if j.peak_bytes > limit:
            never[j.stem] = (
                f"{j.size_text()} frame needs about {_gb(j.peak_bytes)} of memory "
                f"(estimated from its header), more than the session's memory budget of "
                f"{_gb(limit)} ({max(int(workers), 1)} worker(s) x {_gb(budget_bytes)}, "
                "session.memory_per_worker_mb); not read"
            )
        elif j.peak_bytes > budget_bytes and workers > 1:
            j.alone = True
            alone.append(j)
        else:
            shared.append(j)
    return shared, alone, never


# =============================================================================== in the worker
def worker_marker(outdir: Path, stage: str | None) -> None:
    """Say which process works on this frame, at which stage (read if the worker dies)."""
    tmp = outdir / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "stage": stage}))
    os.replace(tmp, outdir / MARKER)


def peak_rss_reset() -> None:
    """Reset this process's peak RSS (VmHWM), so that it measures the next frame only."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int | None:
    """This process's peak RSS (VmHWM) in bytes, None where /proc is not available."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def test_fault_from_env() -> dict | None:
    """The fault-injection settings (module docstring), read in the calling process: workers
    forked from a forkserver started earlier would not see a later change of the environment."""
    stem = os.environ.get("RPP_TEST_KILL_FRAME")
    if not stem:
        return None
    return {
        "frame": stem,
        "stage": os.environ.get("RPP_TEST_KILL_STAGE") or None,
        "once": bool(os.environ.get("RPP_TEST_KILL_ONCE")),
    }


def maybe_kill_for_test(
    fault: dict | None, stem: str, stage: str, first_stage: str, outdir: Path
) -> None:
    """The fault-injection hook of the module docstring (pool workers only)."""
    if not fault or fault.get("frame") != stem:
        return
    import multiprocessing

    if multiprocessing.parent_process() is None:
        return  # never the caller's own process
    if stage != (fault.get("stage") or first_stage):
        return
    if fault.get("once"):
        flag = outdir / ".test_killed"
        if flag.exists():
            return
        flag.write_text(str(os.getpid()))
    log.warning("[%s] RPP_TEST_KILL_FRAME: worker %d kills itself at %s", stem, os.getpid(), stage)
    os.kill(os.getpid(), signal.SIGKILL)


# =============================================================================== supervision
def _death_text(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown"
        return f"killed (signal {-exitcode}, {name})"
    if exitcode is None:
        return "lost"
    return f"exited with code {exitcode}"


def _death_reason(job: PoolJob, info: dict, exitcode: int | None, budget_bytes: int) -> str:
    stage = info.get("stage")
    reason = f"worker {_death_text(exitcode)} while reducing {job.size_text()} frame"
    if stage:
        reason += f" at {stage}"
    if exitcode == -signal.SIGKILL:
        reason += (
            f"; likely out of memory (estimated peak {_gb(job.peak_bytes)}, "
            f"budget {_gb(budget_bytes)} per worker)"
        )
    return reason + ("; retried alone" if job.notes.get("retried") else "")


def _read_marker(job: PoolJob) -> dict | None:
    try:
        return json.loads((job.outdir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _one_pool(fn, jobs, workers, ctx, on_done):
    """Run ``jobs`` in one pool. Returns (results, dead [(job, marker, exitcode)], not started)."""
    for j in jobs:
        (j.outdir / MARKER).unlink(missing_ok=True)
    results, lost = {}, []
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        futures = {pool.submit(fn, *j.args): j for j in jobs}
        procs = list(getattr(pool, "_processes", {}).values())
        for fut in as_completed(futures):
            j = futures[fut]
            try:
                results[j.stem] = fut.result()
            except BrokenProcessPool:
                lost.append(j)
                continue
            except Exception as exc:  # the job itself could not run (its errors are caught)
                results[j.stem] = {"_error": f"{type(exc).__name__}: {exc}"}
                continue
            on_done(j, results[j.stem])
    if not lost:
        return results, [], []
    exitcodes = {p.pid: p.exitcode for p in procs}
    dead, not_started = [], []
    for j in lost:
        info = _read_marker(j)
        if info is None:
            not_started.append(j)
        else:
            dead.append((j, info, exitcodes.get(info.get("pid"))))
        (j.outdir / MARKER).unlink(missing_ok=True)
    return results, dead, not_started


def run_supervised(
    fn: Callable,
    shared: Sequence[PoolJob],
    alone: Sequence[PoolJob],
    *,
    workers: int,
    ctx,
    budget_bytes: int,
    on_done: Callable[[PoolJob, dict], None],
    on_death: Callable[..., dict],
) -> dict[str, dict]:
    """Run ``fn(*job.args)`` for every job (``shared`` side by side in ``workers`` processes,
    then ``alone`` one at a time), surviving worker deaths: see the module docstring.

    ``on_done(job, result)`` is called for every result; ``on_death(job, reason, status[, stage])``
    records a frame given up after its worker died (status ``rejected``, at the stage it was
    running; ``failed`` when the pool died before the frame started) and returns its result. Returns
    ``{stem: result}``."""
    results: dict[str, dict] = {}
    queue, retry = list(shared), []
    while queue:
        res, dead, rest = _one_pool(fn, queue, workers, ctx, on_done)
        results.update(res)
        if rest and not res and not dead:  # the pool broke before any frame started
            for j in rest:
                results[j.stem] = on_death(
                    j, "the worker processes died before starting the frame", "failed"
                )
            break
        queue = rest
        for j, info, code in dead:
            log.warning(
                "[%s] worker %s %s at %s; the frame is retried alone",
                j.stem,
                info.get("pid"),
                _death_text(code),
                info.get("stage"),
            )
            retry.append(j)
        if queue:
            log.info("%d frames that had not started go on in a new pool", len(queue))
    for j in [*alone, *retry]:
        j.notes["retried"] = j in retry
        res, dead, rest = _one_pool(fn, [j], 1, ctx, on_done)
        results.update(res)
        for j2, info, code in dead:  # died alone: given up
            reason = _death_reason(j2, info, code, budget_bytes)
            results[j2.stem] = on_death(j2, reason, "rejected", info.get("stage"))
        for j2 in rest:
            results[j2.stem] = on_death(
                j2, "the worker process died before starting the frame", "failed"
            )
    for stem, res in list(results.items()):
        if isinstance(res, dict) and "_error" in res:
            job = next(j for j in [*shared, *alone] if j.stem == stem)
            results[stem] = on_death(job, f"frame job failed: {res['_error']}", "failed")
    return results
