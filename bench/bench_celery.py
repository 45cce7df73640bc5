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
  parse, imports, XCom), from ``session_summary.json``'s ``stage_runs`` (per chunk for the
  mapped ``frames`` task).

The night is cut into chunks by the demo observatory's ``scheduling`` section and the lanes (at
most 256 Mpx per chunk by default, at least one chunk per ``rpp_heavy`` slot: 2 chunks of 12
frames of 2048^2 here; ``--chunk-frames`` sets ``chunk_frames``). From the
measured costs (per frame inside a chunk, per frame of validate and products, masters, per-task
overhead) the script prints the expected wall time of a bigger night on more workers, each worker
a machine like this one (``--project-frames``, ``--project-workers``).

Usage::

    python bench/bench_celery.py                      # 24 frames 2048^2, 1 and 2 workers
    python bench/bench_celery.py --frames 6 --shape 1024 --workers 2 --chunk-frames 3
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


def _config(root: Path, chunk_frames: int | None, n_workers: int) -> Path:
    """The project's configuration; the demo observatory runs max(2, workers) tasks at once."""
    config = root / "config"
    shutil.copytree(REPO / "config", config)
    demo = config / "observatories" / "demo.yaml"
    extra = f"chunk_frames: {chunk_frames}, " if chunk_frames else ""
    demo.write_text(
        demo.read_text() + f"\nscheduling: {{{extra}max_active_tasks: {max(2, n_workers)}}}\n"
    )
    return config


def _key(t: dict) -> str:
    return t["task_id"] + (f"[{t['map_index']}]" if t.get("map_index", -1) >= 0 else "")


def run_once(
    raw: Path, n_workers: int, frame_processes: int, root: Path, chunk_frames: int | None
) -> dict:
    from rpp_tasks.ops import deploy
    from rpp_tasks.ops.localcelery import scratch_deployment

    tuning = replace(
        deploy.CELERY,
        worker_concurrency=1,
        frame_processes=frame_processes,
        heavy_pool_slots=max(2, n_workers),
    )
    root.mkdir(parents=True, exist_ok=True)
    config = _config(root, chunk_frames, n_workers)
    with scratch_deployment(
        root, n_workers=n_workers, tuning=tuning, dag_ids=(DAG,), config_dir=config
    ) as dep:
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
    durs = {_key(t): t["duration"] for t in ran}
    inside = {k: v["wall_s"] for k, v in stage_runs.items() if k in durs and "wall_s" in v}
    for k, v in stage_runs.items():  # mapped frame segments: one run_stage wall per chunk
        for i, w in enumerate(v.get("chunk_wall_s") or []):
            inside[f"{k}[{i}]"] = w
    in_task = sum(durs[k] - w for k, w in inside.items() if k in durs)
    frames_run = stage_runs.get("frames", {})
    chunk_tis = [t for t in ran if t["task_id"] == "frames"]
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
        "run_stage_s": round(sum(v.get("wall_s", 0.0) for v in stage_runs.values()), 1),
        "overhead_share": round((wall - covered + in_task) / wall, 3),
        "chunks": frames_run.get("chunk_frames"),
        "chunk_task_s": [round(t["duration"], 1) for t in sorted(chunk_tis, key=_key)],
        "chunk_hosts": [t["hostname"] for t in sorted(chunk_tis, key=_key)],
        "tasks": {_key(t): {"host": t["hostname"], "s": round(t["duration"], 1)} for t in ran},
    }


def project(res: dict, n_frames: int, workers: list[int], shape: int) -> dict:
    """Expected wall time of an ``n_frames`` night on ``workers`` machines like this one, from
    the measured costs of one run: frame stages per frame (chunk task time / chunk frames),
    validate and products per frame, masters once, and the scheduling overhead per task (idle
    gaps + time outside run_stage, over the run's tasks). Chunks as `plan_chunks` cuts them
    (the largest chunk ``scheduling.chunk_megapixels``, a multiple of the workers) and, for
    comparison, one chunk per worker."""
    import math

    from rpp_tasks.config import SchedulingConfig

    largest = SchedulingConfig().chunk_megapixels

    t = res["tasks"]
    n = res["frames"]
    chunk_s = [s for s in res["chunk_task_s"]]
    per_frame = sum(chunk_s) / n
    validate_pf = t["validate"]["s"] / n
    products_pf = t["products"]["s"] / n
    masters = t["masters"]["s"]
    n_tasks = len(t)
    per_task = (res["idle_gaps_s"] + res["stage_task_overhead_s"]) / n_tasks
    mpx = shape * shape / 1e6
    out = {}
    for w in workers:
        row = {}
        for label, n_chunks in (
            ("default chunks", w * math.ceil(math.ceil(n_frames * mpx / largest) / w)),
            ("one chunk per worker", w),
        ):
            n_chunks = max(1, min(n_chunks, n_frames))
            waves = math.ceil(n_chunks / w)
            chunk_frames = math.ceil(n_frames / n_chunks)
            serial = (validate_pf + products_pf) * n_frames + masters + t["archive"]["s"]
            wall = serial + waves * (chunk_frames * per_frame + per_task) + 5 * per_task
            row[label] = {"chunks": n_chunks, "waves": waves, "wall_s": round(wall)}
        out[w] = row
    return {
        "frames": n_frames,
        "per_frame_in_chunk_s": round(per_frame, 2),
        "validate_per_frame_s": round(validate_pf, 3),
        "products_per_frame_s": round(products_pf, 3),
        "masters_s": masters,
        "overhead_per_task_s": round(per_task, 2),
        "by_workers": out,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--shape", type=int, default=2048)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--frame-processes", type=int, default=2, help="RPP_WORKERS per task")
    p.add_argument("--chunk-frames", type=int, help="scheduling.chunk_frames (default: by Mpx)")
    p.add_argument("--project-frames", type=int, default=400)
    p.add_argument("--project-workers", type=int, nargs="+", default=[1, 4, 16])
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
            res = run_once(raw, n, args.frame_processes, base / f"deploy{n}", args.chunk_frames)
            print(json.dumps({k: v for k, v in res.items() if k != "tasks"}, indent=1), flush=True)
            results.append(res)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(results, indent=1))
    one = min(results, key=lambda r: r["workers"])  # costs without a second chunk competing
    print(f"\nprojection from the {one['workers']}-worker run (each worker a machine like this):")
    print(json.dumps(project(one, args.project_frames, args.project_workers, args.shape), indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
