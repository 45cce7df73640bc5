"""Dashboard speed (issue 15): search over N synthetic frames on PostgreSQL and SQLite, and the
frame page render.

The frames go straight into the dashboard's search index (``rpp_frame_index``, as
`rpp_tasks.outputs.dashboard.store.Store.sync_index` fills it) spread over 5 observatories,
``N / 100`` sessions of 100 frames, 200 object names, 5 bands, 3 years of nights and positions
over the whole sky; 1 % of the frames carry a decision. Each search is
`rpp_tasks.outputs.dashboard.search.search` (the same call as the web route, page of 50) timed
``--repeat`` times after one warm-up; the median and the max are printed.

The frame page is `rpp_tasks.outputs.dashboard.views.frame_view` on a synthetic night reduced by
the pipeline (first render draws nothing: the preview PNG is a separate request; the thumbnail and
the preview are timed separately, cold and cached).

    .venv/bin/python bench/bench_dashboard.py --frames 100000
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PG_ADMIN = os.environ.get("RPP_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_DB = "rpp_dash_bench"


def _pg_url():
    import sqlalchemy as sa

    admin = sa.create_engine(
        PG_ADMIN.replace("postgresql://", "postgresql+psycopg2://"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as c:
        c.execute(sa.text(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)"))
        c.execute(sa.text(f"CREATE DATABASE {PG_DB}"))
    admin.dispose()
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{PG_DB}"


def fill(url: str, n_frames: int, seed: int = 1) -> float:
    """Insert the synthetic index; returns seconds."""
    from rpp_tasks.outputs import db, db_decisions

    rng = random.Random(seed)
    objects = [f"Obj {i:03d}" for i in range(200)]
    pos = {o: (rng.uniform(0, 360), rng.uniform(-60, 80)) for o in objects}
    bands = ["B", "V", "R", "I", "Clear"]
    t0 = time.perf_counter()
    with db.ResultsDB(url) as rdb:
        rdb.create_schema()
        idx, dec = [], []
        now = dt.datetime.now(dt.UTC)
        start = dt.date(2023, 1, 1)
        for s in range(max(1, n_frames // 100)):
            obs = f"bench{s % 5}"
            night = start + dt.timedelta(days=s % 1095)
            sid = f"{night.isoformat()}_{s}"
            for k in range(100):
                o = rng.choice(objects)
                ra, de = pos[o]
                mjd = 59945.0 + (night - start).days + 0.3 + k * 0.002
                idx.append(
                    {
                        "observatory": obs,
                        "session_id": sid,
                        "frame_stem": f"f{k:03d}",
                        "night_date": night.isoformat(),
                        "object_name": o,
                        "object_key": o.lower(),
                        "band": rng.choice(bands),
                        "mjd_obs": mjd,
                        "date_obs": None,
                        "exptime_s": 60.0,
                        "ra_deg": (ra + rng.gauss(0, 0.01)) % 360,
                        "dec_deg": de + rng.gauss(0, 0.01),
                        "status": "ok" if rng.random() > 0.05 else "rejected",
                        "fwhm_arcsec": rng.uniform(1.5, 4),
                        "zp_mag": rng.uniform(20, 22),
                        "limiting_mag": 19.0,
                        "summary_mtime": 0.0,
                        "indexed_utc": now,
                    }
                )
                if rng.random() < 0.01:
                    dec.append(
                        {
                            "observatory": obs,
                            "session_id": sid,
                            "frame_stem": f"f{k:03d}",
                            "decision": rng.choice(["validated", "withdrawn"]),
                            "reason": "bench",
                            "decided_by": "bench",
                            "decided_utc": now,
                        }
                    )
        with rdb._write() as conn:
            for i in range(0, len(idx), 5000):
                conn.execute(db_decisions.FrameIndexRow.__table__.insert(), idx[i : i + 5000])
            if dec:
                conn.execute(db_decisions.DecisionRow.__table__.insert(), dec)
        if rdb.dialect == "postgresql":
            with rdb._write() as conn:
                conn.exec_driver_sql("ANALYZE")
        else:
            with rdb._write() as conn:
                conn.exec_driver_sql("ANALYZE")
    return time.perf_counter() - t0, pos


def searches(pos):
    o = "Obj 007"
    ra, dec = pos[o]
    return {
        "name (object key + 15' cone)": {"name": o},
        "position, 10' radius": {"ra": f"{ra:.4f}", "dec": f"{dec:.4f}", "radius_arcmin": "10"},
        "band + date range": {"band": "V", "date_from": "2024-03-01", "date_to": "2024-03-31"},
        "observatory + status withdrawn": {"observatory": "bench2", "status": "withdrawn"},
        "everything, page 1": {},
        "everything, page 100": {"page": "100"},
    }


def time_searches(url, pos, repeat):
    from rpp_tasks.config import find_config
    from rpp_tasks.outputs.dashboard import search
    from rpp_tasks.outputs.dashboard.store import Store

    demo = find_config("demo")
    empty = Path(tempfile.mkdtemp(prefix="rpp_bench_empty_"))
    paths = dataclasses.replace(demo.paths, work=str(empty / "none"))
    configs = [dataclasses.replace(demo, observatory=f"bench{i}", paths=paths) for i in range(5)]
    store = Store(configs, results_url=lambda o: url, archive_url=lambda o: url)
    store.sync_index(force=True)
    out = {}
    for label, params in searches(pos).items():
        q = search.parse_query(params, observatories=tuple(store.configs))
        res = search.search(store, q)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            res = search.search(store, q)
            times.append(time.perf_counter() - t0)
        out[label] = (statistics.median(times) * 1e3, max(times) * 1e3, res.total)
    return out


def frame_page(repeat):
    import importlib.util

    from rpp_tasks.outputs.dashboard import files, views
    from rpp_tasks.outputs.dashboard.roles import Actor
    from rpp_tasks.outputs.dashboard.store import Store

    root = Path(tempfile.mkdtemp(prefix="rpp_bench_dash_"))
    os.environ["RPP_DATA_ROOT"] = str(root)
    spec = importlib.util.spec_from_file_location("_h", REPO / "tests/plugins/test_dashboard.py")
    h = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(h)
    night = h.reduce_night(root, n_science=3)
    store = Store([night["obs"]])
    actor = Actor("bench", ("user",), can=lambda m, d: True)
    stem = night["summary"]["frames"][0]["frame"]
    sid = night["summary"]["session_id"]
    t0 = time.perf_counter()
    views.frame_view(store, actor, "demo", sid, stem, base="../../../")
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        views.frame_view(store, actor, "demo", sid, stem, base="../../../")
        times.append(time.perf_counter() - t0)
    out = {
        "frame page HTML, first": first * 1e3,
        "frame page HTML, median": statistics.median(times) * 1e3,
    }
    for name in ("thumb.png", "preview.png"):
        t0 = time.perf_counter()
        files.frame_product(night["workdir"], stem, name)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        files.frame_product(night["workdir"], stem, name)
        out[f"{name} cold"] = cold * 1e3
        out[f"{name} cached"] = (time.perf_counter() - t0) * 1e3
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--skip-pg", action="store_true")
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.INFO)
    backends = [("SQLite", f"sqlite:///{tempfile.mkdtemp(prefix='rpp_bench_')}/results.sqlite")]
    if not args.skip_pg:
        backends.insert(0, ("PostgreSQL", _pg_url()))
    for name, url in backends:
        secs, pos = fill(url, args.frames)
        print(f"\n{name}: {args.frames} frames indexed in {secs:.1f} s")
        print(f"{'search':40s} {'median ms':>10s} {'max ms':>8s} {'matches':>8s}")
        for label, (med, mx, total) in time_searches(url, pos, args.repeat).items():
            print(f"{label:40s} {med:10.1f} {mx:8.1f} {total:8d}")
    print("\nframe page (3-frame synthetic night, demo configuration)")
    for label, ms in frame_page(args.repeat).items():
        print(f"{label:40s} {ms:10.1f} ms")


if __name__ == "__main__":
    main()
