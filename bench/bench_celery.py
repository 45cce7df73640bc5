"""One night on the CeleryExecutor deployment with 1 worker and with 2 workers.

The deployment is the one ``rpp up --executor celery`` starts (settings of
`rpp_tasks.ops.deploy`; `rpp_tasks.ops.localcelery.scratch_deployment`: a private PostgreSQL
database and Redis database number, free ports), with N Celery workers of concurrency 1 (prefork
pool) and ``RPP_WORKERS`` frame processes per task. The same synthetic night (written once) is
triggered through the REST API on a fresh deployment per worker count. From the task instances
the REST API reports:

* **wall**: run queued -> run end;
* **share of task time per worker**: each worker's summed task durations / all task durations,
  each worker's busy fraction of the wall time, and the mean number of busy workers (summed task
  time / wall: 1.0 means one task at a time whatever the number of workers);
* **scheduling overhead**: wall time during which no task of the run was running (between tasks,
  queueing), and inside the stage tasks the time not spent in ``run_stage`` (process start, DAG
  parse, imports, XCom), from ``session_summary.json``'s ``stage_runs``.

Usage::

    python bench/bench_celery.py                      # 24 frames 2048^2, 1 and 2 workers
    python bench/bench_celery.py --frames 6 --shape 1024 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DAG = "rpp_demo"


def _ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() if s else None


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def run_once(raw: Path, n_workers: int, frame_processes: int, root: Path) -> dict:
    from rpp_tasks.ops import deploy
    from rpp_tasks.ops.localcelery import scratch_deployment

    tuning = replace(
        deploy.CELERY,
        worker_concurrency=1,
        frame_processes=frame_processes,
        heavy_pool_slots=max(2, n_workers),
    )
    with scratch_deployment(root, n_workers=n_workers, tuning=tuning, dag_ids=(DAG,)) as dep:
        print(f"[{n_workers} worker(s)] deployment up in {dep.started_s:.0f} s", flush=True)
        run_id = f"bench__celery{n_workers}"
        session_id = f"bench-celery{n_workers}"
        out = dep.api.trigger(
            DAG, run_id, {"observatory": "demo", "session_id": session_id, "session_dir": str(raw)}
        )
        assert out.result == "created", out
        state = dep.wait_run(DAG, run_id, timeout=7200)
        run = dep.api.request("GET", f"/dags/{DAG}/dagRuns/{run_id}").json()
        tis = dep.task_instances(DAG, run_id)
        summary = json.loads(
            (
                dep.data_root / "data" / "work" / "demo" / session_id / "session_summary.json"
            ).read_text()
        )
    t_q, t_end = _ts(run.get("queued_at") or run["start_date"]), _ts(run["end_date"])
    wall = t_end - t_q
    ran = [t for t in tis if t.get("start_date") and t.get("end_date")]
    busy = {}
    for t in ran:
        busy[t["hostname"]] = busy.get(t["hostname"], 0.0) + t["duration"]
    total = sum(busy.values())
    covered = _union([(_ts(t["start_date"]), _ts(t["end_date"])) for t in ran])
    stage_runs = summary.get("stage_runs", {})
    durs = {t["task_id"]: t["duration"] for t in ran}
    in_task = sum(durs[k] - v["wall_s"] for k, v in stage_runs.items() if k in durs)
    return {
        "workers": n_workers,
        "state": state,
        "frames": summary["n_science"],
        "frames_ok": summary["n_ok"],
        "wall_s": round(wall, 1),
        "task_time_s": round(total, 1),
        "share_of_task_time": {h: round(b / total, 3) for h, b in sorted(busy.items())},
        "busy_fraction_of_wall": {h: round(b / wall, 3) for h, b in sorted(busy.items())},
        "mean_busy_workers": round(total / wall, 3),  # 1.0 = one task at a time
        "idle_gaps_s": round(wall - covered, 1),
        "stage_task_overhead_s": round(in_task, 1),
        "run_stage_s": round(sum(v["wall_s"] for v in stage_runs.values()), 1),
        "overhead_share": round((wall - covered + in_task) / wall, 3),
        "tasks": {t["task_id"]: {"host": t["hostname"], "s": round(t["duration"], 1)} for t in ran},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--shape", type=int, default=2048)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--frame-processes", type=int, default=2, help="RPP_WORKERS per task")
    p.add_argument("--keep", help="keep the scratch folders here")
    args = p.parse_args(argv)

    from rpp_tasks.sim.synthetic import write_synthetic_session

    base = Path(args.keep or tempfile.mkdtemp(prefix="rpp_bench_celery_"))
    raw = base / "night"
    t0 = time.perf_counter()
    if not raw.is_dir():
        write_synthetic_session(
            raw,
            truth_folder=base / "truth",
            n_science=args.frames,
            shape=(args.shape, args.shape),
            seed=5,
        )
    print(f"night of {args.frames} x {args.shape}^2 written in {time.perf_counter() - t0:.0f} s")
    results = []
    try:
        for n in args.workers:
            res = run_once(raw, n, args.frame_processes, base / f"deploy{n}")
            print(json.dumps({k: v for k, v in res.items() if k != "tasks"}, indent=1), flush=True)
            results.append(res)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
