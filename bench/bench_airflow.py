"""Airflow-side costs of the RPP DAGs.

1. **Parse time** of the dags folder with N generated observatory configurations (default 20):
   what the DAG processor pays at every parse (Airflow already imported, as in the processor),
   and what a task process pays to build only its own DAG (``get_parsing_context``).
   Target: <= 0.3 s for the folder.
2. **Overhead share** of a session run (``--overhead``): the same synthetic session reduced
   (a) by plain Python (`rpp_tasks.session.pipeline` stage by stage, as the tasks do, in one
   process, up to and including the products task's summary, report and ZIP) and (b) as a DAG
   run through a running Airflow (``rpp up``; REST API), timed from queued to the end of
   ``products``, then ``overhead = (airflow_wall - plain_wall) / airflow_wall``. Target: <= 10 %.
3. **Ready -> run started** (``--latency``): the real watcher (`rpp_tasks.ops.watch.SessionWatcher`,
   inotify) on a scratch incoming folder, the demo observatory's rules, a running Airflow. A small
   session is written; "ready" is the moment its readiness rule is satisfied (``marker``: the marker
   file is written; ``quiet``: the last frame write + ``quiet_seconds``). Printed: ready -> trigger
   accepted by the API (watcher side), ready -> run ``start_date`` (scheduler picked it up) and
   ready -> first task started. Target: ready -> run started <= 30 s.

Usage::

    python bench/bench_airflow.py                       # parse time, 20 configs
    python bench/bench_airflow.py --n-configs 50 --repeat 7
    # with `rpp up` running in another terminal (prints the password):
    RPP_AIRFLOW_PASSWORD=... python bench/bench_airflow.py --overhead --frames 8 --shape 2048
    python bench/bench_airflow.py --latency --repeat 3     # watcher -> Airflow, `rpp up` running
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PARSE_CODE = r"""
import json, os, sys, time
t0 = time.perf_counter()
import airflow.sdk  # noqa: F401  (the DAG processor has Airflow loaded before it parses files)
from airflow.dag_processing.dagbag import DagBag
t_import = time.perf_counter() - t0
dags = sys.argv[1]
repeat = int(sys.argv[2])
folder, per_file = [], {}
for i in range(repeat + 1):  # the first round warms the file-system cache and rpp_tasks.config
    t = time.perf_counter()
    bag = DagBag(dag_folder=dags)
    dt = time.perf_counter() - t
    if i:
        folder.append(dt)
        for s in bag.dagbag_stats:
            per_file.setdefault(s.file, []).append(s.duration.total_seconds())
assert not bag.import_errors, bag.import_errors
# a task process: only the DAG being run is built
os.environ["_AIRFLOW_PARSING_CONTEXT_DAG_ID"] = sys.argv[3]
one = []
for i in range(repeat):
    t = time.perf_counter()
    b1 = DagBag(dag_folder=os.path.join(dags, "rpp_reduction.py"))
    one.append(time.perf_counter() - t)
loaded = {m.split(".")[0] for m in sys.modules}
heavy = sorted({"numpy", "astropy", "photutils", "scipy", "sep"} & loaded)
print("RESULT " + json.dumps({
    "airflow_import_s": t_import, "folder_s": folder, "per_file_s": per_file,
    "n_dags": len(bag.dags), "task_parse_s": one, "task_dags": sorted(b1.dags),
    "heavy_modules": heavy,
}))
"""


def make_configs(root: Path, n: int) -> Path:
    """A config dir with ``n`` observatories (copies of demo.yaml under new names)."""
    cfg = root / "config"
    (cfg / "observatories").mkdir(parents=True)
    shutil.copy(REPO / "config" / "defaults.yaml", cfg / "defaults.yaml")
    demo = (REPO / "config" / "observatories" / "demo.yaml").read_text()
    for i in range(n):
        name = f"obs_{i:02d}"
        (cfg / "observatories" / f"{name}.yaml").write_text(
            demo.replace("observatory: demo", f"observatory: {name}")
        )
    return cfg


def bench_parse(n_configs: int, repeat: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="rpp_bench_airflow_") as tmp:
        cfg = make_configs(Path(tmp), n_configs)
        env = {
            **os.environ,
            "RPP_CONFIG_DIR": str(cfg),
            "AIRFLOW_HOME": str(Path(tmp) / "home"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "RPP_DATA_ROOT": tmp,
        }
        res = subprocess.run(
            [sys.executable, "-c", PARSE_CODE, str(REPO / "dags"), str(repeat), "rpp_obs_07"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode or not line:
            raise SystemExit(res.stdout[-2000:] + res.stderr[-4000:])
        r = json.loads(line[-1][7:])
    med = statistics.median
    out = {
        "n_configs": n_configs,
        "n_dags": r["n_dags"],
        "folder_parse_median_s": round(med(r["folder_s"]), 4),
        "folder_parse_min_s": round(min(r["folder_s"]), 4),
        "per_file_median_s": {k: round(med(v), 4) for k, v in r["per_file_s"].items()},
        "task_process_parse_median_s": round(med(r["task_parse_s"]), 4),
        "task_process_dags": r["task_dags"],
        "airflow_sdk_import_s": round(r["airflow_import_s"], 3),
        "heavy_modules_at_parse": r["heavy_modules"],
    }
    return out


# ----------------------------------------------------------------------------------------- overhead
def _segments(obs):
    """The DAG's stage tasks: the stage table's segments (session stages one task each, a run of
    frame stages one task mapped over the night's chunks)."""
    from rpp_tasks.session.table import table_for

    return table_for(obs).segments()


def plain_run(raw_dir: Path, obs, work_root: Path) -> tuple[float, dict]:
    """The DAG's work up to and including ``products`` (validate, the session stages, the frame
    stages over every frame in one pool, summary, report and ZIP), in one process with the same
    lifecycle functions and frame pool, without Airflow."""
    from rpp_tasks.session import lifecycle
    from rpp_tasks.session.table import table_for

    table = table_for(obs)
    parts = {}
    t0 = time.perf_counter()
    s = lifecycle.open_session(raw_dir, obs, work_root=work_root, session_id="plain")
    parts["validate"] = time.perf_counter() - t0
    for scope, names in _segments(obs):
        t = time.perf_counter()
        lifecycle.run_stage(s, obs, list(names))
        key = names[0] if scope == "session" else table.segment_task_id(names)
        parts[key] = time.perf_counter() - t
    t = time.perf_counter()
    summary, _ = lifecycle.finish(s, obs)
    parts["products"] = time.perf_counter() - t
    wall = time.perf_counter() - t0
    print(f"plain Python: {summary.n_ok}/{summary.n_science} frames in {wall:.1f} s")
    return wall, {k: round(v, 2) for k, v in parts.items()}


def _key(t: dict) -> str:
    return t["task_id"] + (f"[{t['map_index']}]" if t.get("map_index", -1) >= 0 else "")


def _union(intervals) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total, end = total + b - a, b
        elif b > end:
            total, end = total + b - end, b
    return total


def airflow_run(
    raw_dir: Path, obs, base_url: str, user: str, password: str, session_id: str
) -> dict:
    from datetime import datetime

    from rpp_tasks.ops.airflow_api import AirflowClient

    api = AirflowClient(base_url, user, password)
    run_id = f"bench__{session_id}"
    out = api.trigger(
        obs.dag_id,
        run_id,
        {"observatory": obs.name, "session_id": session_id, "session_dir": str(raw_dir)},
    )
    if out.result != "created":
        raise SystemExit(f"trigger failed: {out.message}")
    while api.run_state(obs.dag_id, run_id) not in ("success", "failed"):
        time.sleep(1.0)
    run = api.request("GET", f"/dags/{obs.dag_id}/dagRuns/{run_id}").json()
    tis = api.request("GET", f"/dags/{obs.dag_id}/dagRuns/{run_id}/taskInstances").json()[
        "task_instances"
    ]

    def ts(s):
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() if s else None

    t_q, t_end = ts(run.get("queued_at") or run.get("start_date")), ts(run.get("end_date"))
    products_end = next((ts(t.get("end_date")) for t in tis if t["task_id"] == "products"), None)
    upto = [
        (ts(t["start_date"]), ts(t["end_date"]))
        for t in tis
        if t.get("start_date") and t.get("end_date") and t["task_id"] not in ("archive", "notify")
    ]
    return {
        "state": run["state"],
        "wall_s": t_end - t_q,
        "run_start_to_end_s": t_end - ts(run["start_date"]),
        "wall_to_products_s": (products_end - t_q) if products_end else None,
        "task_time_to_products_covered_s": _union(upto),  # wall with a task of the run running
        "task_durations_s": {_key(t): t.get("duration") for t in tis},
    }


def bench_overhead(args) -> dict:
    os.environ.setdefault("RPP_DATA_ROOT", str(REPO))
    from rpp_tasks.config import find_config
    from rpp_tasks.sim.synthetic import write_synthetic_session

    obs = find_config("demo")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    raw_dir = (
        obs.resolve_path("incoming").parent / "bench" / f"bench-{stamp}"
    )  # outside the watched folder
    write_synthetic_session(
        raw_dir,
        truth_folder=raw_dir.parent / f"truth-{stamp}",
        n_science=args.frames,
        shape=(args.shape, args.shape),
        seed=5,
    )
    with tempfile.TemporaryDirectory(prefix="rpp_bench_plain_") as tmp:
        plain, plain_parts = plain_run(raw_dir, obs, Path(tmp))
    password = _password(args)
    af = airflow_run(raw_dir, obs, args.api_url, "admin", password, f"bench-{stamp}")
    # like for like: the plain run stops after products (archive and notify run beside each other
    # after it in the DAG and are not part of the plain run)
    af_wall = af["wall_to_products_s"] or af["wall_s"]
    share = (af_wall - plain) / af_wall
    # The same split measured inside the one Airflow run (robust to the load of a shared machine,
    # which makes the plain-vs-Airflow difference above noisy): time between tasks, and time inside
    # the stage tasks that is not run_stage's own work (process start, DAG parse, imports, XCom).
    # Chunks run beside each other: the gaps are the wall time with no task of the run running,
    # and the stage-task overhead is summed over the tasks (an upper bound when they overlap).
    durs = af["task_durations_s"]
    gaps = af_wall - af["task_time_to_products_covered_s"]
    summary = json.loads(
        (obs.resolve_path("work") / f"bench-{stamp}" / "session_summary.json").read_text()
    )
    inside = {}
    for key, run in summary["stage_runs"].items():
        if "chunk_wall_s" in run:  # a mapped frame segment: run_stage's wall per chunk
            inside.update({f"{key}[{i}]": w for i, w in enumerate(run["chunk_wall_s"])})
        elif "wall_s" in run:  # (session stages report no frame-pool time)
            inside[key] = run["wall_s"]
    in_task = sum(durs[k] - w for k, w in inside.items() if durs.get(k) is not None)
    return {
        "frames": args.frames,
        "shape": args.shape,
        "plain_wall_s": round(plain, 2),
        "plain_parts_s": plain_parts,  # the same split as the task durations below
        "in_run_gaps_between_tasks_s": round(gaps, 2),
        "in_run_stage_task_overhead_s": round(in_task, 2),
        "in_run_overhead_share": round((gaps + in_task) / af_wall, 3),
        "chunks": summary["stage_runs"].get("frames", {}).get("chunk_frames"),
        "airflow_wall_to_products_s": round(af_wall, 2),
        "airflow_wall_s": round(af["wall_s"], 2),
        "airflow_state": af["state"],
        "overhead_share": round(share, 3),
        "task_durations_s": af["task_durations_s"],
    }


def _password(args) -> str:
    password = args.password or os.environ.get("RPP_AIRFLOW_PASSWORD")
    if not password:
        pw_file = REPO / "airflow_home" / "simple_auth_manager_passwords.json"
        password = json.loads(pw_file.read_text())["admin"]
    return password


def bench_latency(args) -> dict:
    """Ready -> trigger -> run started, through the real watcher and a running Airflow."""
    import logging
    from datetime import datetime

    os.environ.setdefault("RPP_DATA_ROOT", str(REPO))
    from rpp_tasks.config import find_config
    from rpp_tasks.ops.airflow_api import AirflowClient
    from rpp_tasks.ops.readiness import SessionRule
    from rpp_tasks.ops.session_ids import run_id_for
    from rpp_tasks.ops.watch import SessionWatcher
    from rpp_tasks.ops.watch_state import WatchState
    from rpp_tasks.sim.synthetic import write_synthetic_session

    logging.basicConfig(level=logging.WARNING)
    obs = find_config("demo")
    password = _password(args)
    api = AirflowClient(args.api_url, "admin", password)

    def ts(s):
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() if s else None

    stamp = time.strftime("%Y%m%dT%H%M%S")
    root = (
        obs.resolve_path("incoming").parent / "bench" / f"latency-{stamp}"
    )  # not the demo's watched folder
    rules = {
        "marker": SessionRule(
            "marker", marker_file="transfer.done", settle_seconds=obs.session.settle_seconds
        ),
        "quiet": SessionRule(
            "quiet", quiet_seconds=args.quiet_seconds, settle_seconds=obs.session.settle_seconds
        ),
    }
    results = []
    for kind, rule in rules.items():
        incoming = root / kind
        incoming.mkdir(parents=True)
        trigger = AirflowClient(args.api_url, "admin", password, timeout=10.0)
        w = SessionWatcher(
            obs.name,
            incoming,
            obs.dag_id,
            rule,
            root / f"state_{kind}.json",
            trigger,
            rescan_s=60.0,
            unpause=True,
        )
        w.start()
        try:
            for i in range(args.repeat):
                name = f"lat-{kind}-{stamp}-{i}"
                tmp_dir = incoming / f".{name}.part"  # written hidden, then renamed, as rpp up does
                write_synthetic_session(
                    tmp_dir,
                    truth_folder=root / "truth" / name,
                    n_science=2,
                    n_bias=2,
                    n_dark=2,
                    n_flat=2,
                    shape=(256, 256),
                    seed=i,
                )
                session = incoming / name
                os.rename(tmp_dir, session)
                if kind == "marker":
                    time.sleep(1.0)  # the frames alone never make it ready
                    (session / "transfer.done").write_text("done\n")
                    t_ready = time.time()
                else:
                    t_ready = max(p.stat().st_mtime for p in session.iterdir()) + rule.quiet_seconds
                run_id = run_id_for(name)
                t_trig = None
                deadline = time.time() + 300
                run = None
                while time.time() < deadline:
                    rec = WatchState.load(root / f"state_{kind}.json").sessions.get(name) or {}
                    if t_trig is None and rec.get("confirmed"):
                        t_trig = ts(rec.get("confirmed_at")) or time.time()
                    r = api.request("GET", f"/dags/{obs.dag_id}/dagRuns/{run_id}")
                    if r.status_code == 200:
                        run = r.json()
                        if run.get("start_date"):
                            break
                    time.sleep(0.2)
                if run is None or not run.get("start_date"):
                    raise SystemExit(f"run {run_id} did not start within 300 s")
                t_first = None
                while time.time() < deadline and t_first is None:
                    tis = api.request(
                        "GET", f"/dags/{obs.dag_id}/dagRuns/{run_id}/taskInstances"
                    ).json()
                    starts = [
                        ts(t.get("start_date"))
                        for t in tis.get("task_instances", [])
                        if t.get("start_date")
                    ]
                    t_first = min(starts) if starts else None
                    time.sleep(0.2)
                row = {
                    "rule": kind,
                    "session": name,
                    "ready_to_trigger_confirmed_s": round(t_trig - t_ready, 2) if t_trig else None,
                    "ready_to_run_queued_s": round(ts(run.get("queued_at")) - t_ready, 2),
                    "ready_to_run_started_s": round(ts(run["start_date"]) - t_ready, 2),
                    "ready_to_first_task_started_s": round(t_first - t_ready, 2)
                    if t_first
                    else None,
                }
                print(json.dumps(row), flush=True)
                results.append(row)
                # one session at a time: the next one must not wait behind max_active_runs
                while time.time() < deadline + 600 and api.run_state(obs.dag_id, run_id) not in (
                    "success",
                    "failed",
                ):
                    time.sleep(1.0)
        finally:
            w.stop()
    started = [r["ready_to_run_started_s"] for r in results]
    return {
        "runs": results,
        "ready_to_run_started_median_s": round(statistics.median(started), 2),
        "ready_to_run_started_max_s": round(max(started), 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-configs", type=int, default=20)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument(
        "--overhead",
        action="store_true",
        help="also measure a session run through a running Airflow",
    )
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--shape", type=int, default=1024)
    p.add_argument(
        "--api-url", default=os.environ.get("RPP_AIRFLOW_API_URL", "http://localhost:8793")
    )
    p.add_argument("--password")
    p.add_argument(
        "--latency",
        action="store_true",
        help="ready -> run started through the real watcher and a running Airflow",
    )
    p.add_argument(
        "--quiet-seconds", type=float, default=10.0, help="quiet rule of the --latency sessions"
    )
    p.add_argument("--no-parse", action="store_true", help="skip the parse-time measurement")
    args = p.parse_args(argv)
    res = {}
    if not args.no_parse:
        res["parse"] = bench_parse(args.n_configs, args.repeat)
        print(json.dumps(res["parse"], indent=1))
    if args.latency:
        res["latency"] = bench_latency(args)
        print(json.dumps({k: v for k, v in res["latency"].items() if k != "runs"}, indent=1))
    if args.overhead:
        res["overhead"] = bench_overhead(args)
        print(json.dumps(res["overhead"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
