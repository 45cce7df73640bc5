"""The CeleryExecutor deployment, run for real on this machine from the project's own settings.

`rpp_tasks.ops.localcelery.scratch_deployment` starts what ``rpp up --executor celery`` starts
(the settings of `rpp_tasks.ops.deploy`, the same that generate docker-compose.yaml): a private
PostgreSQL database, a private Redis database number, free ports, the API server, scheduler, DAG
processor, triggerer, a log server and **two Celery workers, prefork pool, concurrency 1 each**,
``RPP_WORKERS=2`` frame processes per task (inside the prefork children). The project's
configuration, with the demo nights cut into chunks of 2 frames (``scheduling.chunk_frames``).
Synthetic sessions go in through the REST API trigger, as the watcher sends them.

1. A multi-frame night: every task's state, which worker (host name) ran each task instance: the
   night's two chunks ran on the two workers; one catalogue per frame, exactly one archive row
   per frame.
2. A lost worker: while the frame stages of a chunk are half-way, the worker running it is
   SIGKILLed with its whole process tree (as a machine dying). The scheduler notices the silent
   task after the heartbeat timeout, the retry of that chunk runs on the other worker and the
   night completes with complete, non-duplicated products. What the loss cost is printed.

Skipped with the reason when PostgreSQL (127.0.0.1:5432) or Redis (127.0.0.1:6379) is not reachable.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from rpp_tasks.ops import deploy
from rpp_tasks.ops.localcelery import pid_alive

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DAG = "rpp_demo"
N_FIRST = 4  # frames of the first night: 2 chunks of 2
N_KILL = 4  # frames of the night that loses a worker: 2 chunks of 2
CHUNK = 2  # scheduling.chunk_frames of the demo observatory here
TUNING = replace(deploy.CELERY, worker_concurrency=1, frame_processes=2, heavy_pool_slots=2)
CHAIN = ("validate", "masters", "frames[0]", "frames[1]", "products", "archive")


def _reachable(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ts(s: str | None) -> float | None:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() if s else None


@pytest.fixture(scope="module")
def cluster():
    missing = [n for n, p in (("PostgreSQL", 5432), ("Redis", 6379)) if not _reachable(p)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not reachable on 127.0.0.1 (.ci/run starts them)")
    from rpp_tasks.ops.localcelery import scratch_deployment

    root = Path(tempfile.mkdtemp(prefix="rpp_celery_"))
    config = root / "config"
    shutil.copytree(REPO / "config", config)
    demo = config / "observatories" / "demo.yaml"
    demo.write_text(demo.read_text() + f"\nscheduling: {{chunk_frames: {CHUNK}}}\n")
    t0 = time.monotonic()
    try:
        with scratch_deployment(
            root, n_workers=2, tuning=TUNING, dag_ids=(DAG,), config_dir=config
        ) as dep:
            print(f"\ndeployment up in {dep.started_s:.0f} s ({dep.base_url}, {root})")
            yield dep
    finally:
        print(f"\ncelery integration: {time.monotonic() - t0:.0f} s wall in total")
        shutil.rmtree(root, ignore_errors=True)


def _night(dep, name: str, n: int, night: str, seed: int, shape=(512, 512)) -> dict:
    """Write a synthetic session outside the watched incoming folder and trigger it by REST."""
    from rpp_tasks.sim.synthetic import write_synthetic_session

    raw = dep.data_root / "nights" / name
    write_synthetic_session(
        raw, truth_folder=dep.data_root / "truth" / name, n_science=n, n_bias=3, n_dark=2,
        n_flat=3, night=night, seed=seed, shape=shape,
    )  # fmt: skip
    run_id = f"session__{name}"
    out = dep.api.trigger(
        DAG, run_id, {"observatory": "demo", "session_id": name, "session_dir": str(raw)}
    )
    assert out.result == "created", out
    return {"run_id": run_id, "workdir": dep.data_root / "data" / "work" / "demo" / name}


def _archive_rows(dep, session: str) -> list[str]:
    db = dep.data_root / "data" / "products" / "demo" / "archive.sqlite"
    with sqlite3.connect(db) as con:
        return [
            r[0]
            for r in con.execute(
                "select obs_publisher_did from rpp_main where rpp_session = ?", (session,)
            )
        ]


def _check_products(dep, workdir: Path, n: int) -> dict:
    summary = json.loads((workdir / "session_summary.json").read_text())
    frames = [f["frame"] for f in summary["frames"]]
    assert summary["n_science"] == n and summary["n_ok"] == n, [
        (f["frame"], f.get("status"), f.get("reason")) for f in summary["frames"]
    ]
    assert len(set(frames)) == n
    assert sorted(p.name for p in (workdir / "frames").iterdir()) == sorted(frames)
    for f in frames:
        for product in ("catalog.ecsv", "catalog.fits", "calibrated.fits", "summary.json"):
            assert (workdir / "frames" / f / product).is_file(), (f, product)
    rows = _archive_rows(dep, workdir.name)
    assert len(rows) == n and len(set(rows)) == n, rows  # exactly one row per frame
    return summary


def _workers(dep) -> dict:
    """host name recorded on a task instance -> local worker name"""
    return {dep.celery.worker_hostname(n): n for n in dep.celery.worker_names}


def _by_task(tis: list[dict]) -> dict:
    """``task_id`` (``task_id[i]`` for the i-th instance of a mapped task) -> task instance"""
    return {t["task_id"] + (f"[{t['map_index']}]" if t["map_index"] >= 0 else ""): t for t in tis}


def test_night_runs_on_celery_workers_with_prefork_pool(cluster):
    dep = cluster
    assert dep.env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert dep.env["AIRFLOW__CELERY__POOL"] == "prefork"
    # the live deployment has every setting of docker-compose.yaml, with the same values except
    # where things are (topology) and what this test sizes on purpose
    compose = deploy.airflow_settings(deploy.compose_site(), deploy.CELERY)
    sized = {"AIRFLOW__CELERY__WORKER_CONCURRENCY", "RPP_HEAVY_POOL_SLOTS", "RPP_TASKS_PER_HOST"}
    assert set(compose) <= set(dep.env)
    assert {k: dep.env[k] for k in compose if k not in deploy.TOPOLOGY_KEYS | sized} == {
        k: v for k, v in compose.items() if k not in deploy.TOPOLOGY_KEYS | sized
    }

    t0 = time.monotonic()
    # 2048² frames: a chunk's task (~10 s) outlasts the few seconds a worker's slot stays busy
    # after its previous task ended (supervisor teardown, result backend), so the idle worker
    # takes the second chunk; with 512² chunks of 3 s the first worker could take both
    night = _night(dep, "celery-first", N_FIRST, "2025-01-15", seed=21, shape=(2048, 2048))
    state = dep.wait_run(DAG, night["run_id"], timeout=900)
    wall = time.monotonic() - t0
    tis = _by_task(dep.task_instances(DAG, night["run_id"]))
    assert state == "success", {k: (t["state"], t["hostname"]) for k, t in tis.items()}
    assert {t: tis[t]["state"] for t in CHAIN} == {t: "success" for t in CHAIN}
    assert tis["notify"]["state"] == "skipped"  # the demo observatory has no channel configured
    hosts = {k: t["hostname"] for k, t in tis.items() if t["state"] == "success"}
    workers = _workers(dep)
    assert set(hosts.values()) <= set(workers), hosts  # every task ran on one of our workers
    summary = _check_products(dep, night["workdir"], N_FIRST)
    per_worker = {
        workers[h]: sorted(k for k, v in hosts.items() if v == h) for h in set(hosts.values())
    }
    # one night spread over the workers: its two chunks ran on different workers, at once
    chunks = [tis["frames[0]"], tis["frames[1]"]]
    t_0 = min(_ts(t["queued_when"] or t["start_date"]) for t in tis.values() if t["start_date"])
    timeline = {  # for the failure message: when each task was queued, started and ended
        k: (
            workers.get(t["hostname"]),
            *(
                round(_ts(t[f]) - t_0, 1) if t.get(f) else None
                for f in ("queued_when", "start_date", "end_date")
            ),
        )
        for k, t in sorted(tis.items(), key=lambda kv: kv[1]["start_date"] or "")
    }
    assert {t["hostname"] for t in chunks} == set(workers), timeline
    assert max(_ts(t["start_date"]) for t in chunks) < min(_ts(t["end_date"]) for t in chunks)
    assert summary["stage_runs"]["frames"]["chunk_frames"] == [CHUNK, CHUNK]
    print(
        f"\nfirst night: {N_FIRST} frames, {state} in {wall:.0f} s (trigger -> done); "
        f"run_stage {sum(v.get('wall_s', 0) for v in summary['stage_runs'].values()):.1f} s; "
        f"tasks per worker: {per_worker}; (worker, queued, start, end) s: {timeline}"
    )


def _chunks(workdir: Path) -> list[list[str]]:
    """The night's chunks as validate cut them (manifest order, CHUNK frames each)."""
    science = json.loads((workdir / "manifest.json").read_text())["science"]
    stems = [f["stem"] for f in science]
    return [stems[i : i + CHUNK] for i in range(0, len(stems), CHUNK)]


def test_lost_worker_mid_stage_costs_a_retry_not_the_night(cluster):
    dep = cluster
    night = _night(dep, "celery-kill", N_KILL, "2025-01-16", seed=22)
    workdir, frames = night["workdir"], night["workdir"] / "frames"
    t0 = time.monotonic()
    # wait until a chunk is half-way through its frame stages: a frame of it calibrated, not
    # every frame of it finished
    victim = i = None
    while victim is None and time.monotonic() - t0 < 900:
        tis = _by_task(dep.task_instances(DAG, night["run_id"]))
        assert tis.get("products", {}).get("state") is None, "the night ended before the kill"
        for key in ("frames[0]", "frames[1]"):
            ti = tis.get(key, {})
            if ti.get("state") != "running" or not ti.get("hostname"):
                continue
            chunk = _chunks(workdir)[ti["map_index"]]
            started = [s for s in chunk if (frames / s / "calibrated.fits").is_file()]
            finished = [s for s in chunk if (frames / s / "summary.json").is_file()]
            if started and len(finished) < len(chunk):
                victim, i = _workers(dep)[ti["hostname"]], ti["map_index"]
                break
        time.sleep(0.1)
    assert victim is not None, "no chunk seen half-way"
    t_kill = time.time()
    killed = dep.celery.kill_worker(victim)
    assert len(killed) >= 4  # celery main, pool child, task supervisor, task process (+ frames)
    alive = {p: Path(f"/proc/{p}/stat").read_text()[:80] for p in killed if pid_alive(p)}
    assert alive == {}  # nothing of the lost worker lives on
    chunk = _chunks(workdir)[i]
    print(
        f"\nkilled {victim} ({len(killed)} processes) running chunk {i} {chunk}, "
        f"{len(started)} of its frames calibrated, {len(finished)} finished"
    )

    state = dep.wait_run(DAG, night["run_id"], timeout=1200)
    t_done = time.monotonic()
    tis = _by_task(dep.task_instances(DAG, night["run_id"]))
    assert state == "success", {k: (t["state"], t["try_number"]) for k, t in tis.items()}
    assert {t: tis[t]["state"] for t in CHAIN} == {t: "success" for t in CHAIN}
    tries = dep.tries(DAG, night["run_id"], "frames", map_index=i)
    assert [t["try_number"] for t in tries] == [1, 2], tries
    first, retry = tries
    assert first["state"] == "failed" and retry["state"] == "success", tries
    assert first["hostname"] == dep.celery.worker_hostname(victim)
    assert retry["hostname"] != first["hostname"]  # the retry ran on the surviving worker
    # retries are per chunk: the other chunk ran once
    other = dep.tries(DAG, night["run_id"], "frames", map_index=1 - i)
    assert [t["try_number"] for t in other] == [1], other
    # the products are complete and not duplicated; the lost chunk's frames were redone
    _check_products(dep, workdir, N_KILL)
    for stem in chunk:
        assert (frames / stem / "catalog.ecsv").stat().st_mtime > t_kill, stem
    noticed = _ts(first["end_date"]) - t_kill
    restarted = _ts(retry["start_date"]) - t_kill
    # the heartbeat timeout of deploy.py took effect (Airflow's default would notice after 300 s)
    assert noticed < 240, f"lost worker noticed only after {noticed:.0f} s"
    print(
        f"lost worker: noticed {noticed:.0f} s after the kill (heartbeat timeout "
        f"{TUNING.heartbeat_timeout_s} s), retry started after {restarted:.0f} s on "
        f"{retry['hostname']} (retry_delay 10 s included), chunk redone in "
        f"{retry['duration']:.0f} s (first try ran {t_kill - _ts(first['start_date']):.0f} s "
        f"before the kill); night done {t_done - t0:.0f} s after the trigger"
    )
