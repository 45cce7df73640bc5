"""Benchmark of light curves and target photometry (issue 14).

* **Light curve from the results database**: a database holding ``--nights`` sessions (default
  300) of ``--frames`` frames (default 50), each frame with the photometry of the target, of
  ``--targets`` other targets and of ``--sources`` catalogue-matched sources (the
  ``targets.store_all_sources`` mode), written through the real code path
  (`rpp_tasks.outputs.lightcurve.record_session_photometry`, one call per session). Then the
  target's light curve over every night is built (`light_curve`: name lookup + one indexed query
  + the TimeSeries), timed cold (new connection pool, modules already imported) and warm (median
  of 5); writing the ECSV and
  the PNG is timed separately. On SQLite (a file) and PostgreSQL (a throw-away database on
  ``--pg-url``, dropped at the end).
* **Target + ensemble photometry per frame**: a synthetic night (`rpp_tasks.sim.nights`,
  ``--size`` px frames) is reduced with `reduce_frame`; then `run_targets` (targets resolved from
  the configuration, the comparison ensemble of every photometry type, each target measured in each
  frame, upper limits from the calibrated image, ``targets.json``/``.ecsv``) is timed: CPU seconds
  per frame, without and with recording into a SQLite results database.

Run: ``.venv/bin/python bench/bench_lightcurve.py`` (``--help`` for the sizes).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def fill_database(url: str, *, nights: int, frames: int, targets: int, sources: int, seed=0):
    from rpp_tasks.outputs import db, lightcurve

    rng = np.random.default_rng(seed)
    objs = [
        {
            "key": "target:bench-target",
            "name": "BENCH-TARGET",
            "kind": "target",
            "ra_deg": 150.0,
            "dec_deg": 2.2,
            "info": {"aliases": ["BT"]},
        }
    ]
    objs += [
        {
            "key": f"target:other-{k}",
            "name": f"OTHER-{k}",
            "kind": "target",
            "ra_deg": 150.0 + 0.01 * k,
            "dec_deg": 2.3,
            "info": None,
        }
        for k in range(targets)
    ]
    objs += [
        {
            "key": f"ref:Gaia DR3 {4_000_000 + k}",
            "name": f"Gaia DR3 {4_000_000 + k}",
            "kind": "source",
            "ra_deg": 150.0 + rng.uniform(-0.2, 0.2),
            "dec_deg": 2.2 + rng.uniform(-0.2, 0.2),
            "info": None,
        }
        for k in range(sources)
    ]
    t0 = time.perf_counter()
    n_rows = 0
    with db.ResultsDB(url) as rdb:
        rdb.create_schema()
        for night in range(nights):
            sid = f"bench_{night:04d}"
            mjd0 = 60300.8 + night
            rows, finfo = [], {}
            for f in range(frames):
                stem = f"frame_{f:03d}"
                mjd = mjd0 + f * 0.006
                finfo[stem] = {"band": "V", "mjd_obs": mjd, "exptime_s": 60.0}
                for o in objs:
                    mag = 14.0 + 0.2 * math.sin(2 * math.pi * mjd / 3.137)
                    rows.append(
                        {
                            "object_key": o["key"],
                            "frame": stem,
                            "status": "detected",
                            "band": "V",
                            "phot_type": "psf",
                            "mjd_mid": mjd,
                            "bjd_tdb": mjd + 2400000.5 + 0.003,
                            "airmass": 1.2,
                            "mag": mag,
                            "mag_err": 0.01,
                            "mag_diff": mag,
                            "mag_diff_err": 0.005,
                            "mag_inst": mag - 22.0,
                            "mag_inst_err": 0.004,
                            "snr": 200.0,
                            "match_sep_arcsec": 0.2,
                            "zp_rel_mag": 22.0,
                            "n_comp": 25,
                            "flags": "in_gaia",
                            "by_type": {"psf": {"mag": mag}} if o["kind"] == "target" else None,
                        }
                    )
            n_rows += lightcurve.record_session_photometry(
                rdb,
                "bench",
                sid,
                objects=objs,
                rows=rows,
                night_date=f"2024-{1 + night // 28 % 12:02d}-{1 + night % 28:02d}",
                frames=finfo,
            )
            if night % 50 == 49:
                print(
                    f"    {night + 1} sessions, {n_rows} rows, {time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
    return n_rows, time.perf_counter() - t0


def time_light_curve(url: str, out: Path, *, n_expected: int) -> dict:
    import astropy.timeseries  # noqa: F401  imports are not part of "cold"

    from rpp_tasks.outputs import db, lightcurve
    from rpp_tasks.stages import target  # noqa: F401

    with db.ResultsDB(url) as rdb:
        t = time.perf_counter()
        lc = lightcurve.light_curve(rdb, "BENCH-TARGET")
        cold = time.perf_counter() - t
    assert len(lc.table) == n_expected, (len(lc.table), n_expected)
    warm = []
    with db.ResultsDB(url) as rdb:
        lightcurve.light_curve(rdb, "BENCH-TARGET")
        warm_cpu = []  # this process's CPU (SQLite works in-process): less load-dependent
        for _ in range(5):
            t, c = time.perf_counter(), time.process_time()
            lc = lightcurve.light_curve(rdb, "BENCH-TARGET")
            warm.append(time.perf_counter() - t)
            warm_cpu.append(time.process_time() - c)
        t = time.perf_counter()
        alias = lightcurve.light_curve(rdb, "BT")  # an alias: every target is looked at
        t_alias = time.perf_counter() - t
        assert len(alias.table) == n_expected
        t = time.perf_counter()
        rows = rdb.photometry_rows(
            [lc.objects[0]["id"]], fields=lightcurve._DB_FIELDS, columns=True
        )["mag"]
        t_query = time.perf_counter() - t
        assert len(rows) == n_expected
    # the report's light curve (`target_light_curve`: its own connection, the last 30 nights)
    lightcurve.target_light_curve(url, "BENCH-TARGET", last_nights=30)
    t = time.perf_counter()
    last30 = lightcurve.target_light_curve(url, "BENCH-TARGET", last_nights=30)
    t_report = time.perf_counter() - t
    assert len(set(last30["night_date"])) == min(30, len(set(lc.table["night_date"])))
    t = time.perf_counter()
    lightcurve.write_light_curve(lc, out / "bench.ecsv")
    t_ecsv = time.perf_counter() - t
    t = time.perf_counter()
    lightcurve.plot_light_curve(lc, out / "bench.png")
    t_png = time.perf_counter() - t
    return {
        "points": len(lc.table),
        "cold_s": cold,
        "warm_s": statistics.median(warm),
        "warm_cpu_s": statistics.median(warm_cpu),
        "alias_s": t_alias,
        "query_only_s": t_query,
        "report_last30_s": t_report,
        "report_points": len(last30),
        "ecsv_s": t_ecsv,
        "png_s": t_png,
    }


def _n_rows(url: str) -> int:
    from sqlalchemy import func, select

    from rpp_tasks.outputs import db, db_schema

    try:
        with db.ResultsDB(url) as rdb, rdb.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(db_schema.PhotometryRow)).scalar()
    except Exception:  # no table yet
        return 0


def bench_database(args) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rpp_bench_lc_"))
    tmp.mkdir(parents=True, exist_ok=True)
    n_expected = args.nights * args.frames
    per_frame = 1 + args.targets + args.sources
    print(
        f"\nLight curve from the results database: {args.nights} nights x {args.frames} frames, "
        f"{per_frame} objects per frame ({args.nights * args.frames * per_frame} photometry rows)"
    )
    backends = [("SQLite", f"sqlite:///{tmp / 'bench.sqlite'}")]
    admin = None
    if not args.no_pg:
        admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
        name = "rpp_bench_kept" if args.keep else f"rpp_bench_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            q = "SELECT 1 FROM pg_database WHERE datname = %s"
            if not conn.exec_driver_sql(q, (name,)).scalar():
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        backends.append(
            ("PostgreSQL", make_url(args.pg_url).set(database=name).render_as_string(False))
        )
    try:
        for label, url in backends:
            n, fill_s = _n_rows(url), 0.0
            if n != n_expected * per_frame:  # a kept database already filled is reused
                n, fill_s = fill_database(
                    url,
                    nights=args.nights,
                    frames=args.frames,
                    targets=args.targets,
                    sources=args.sources,
                )
            r = time_light_curve(url, tmp, n_expected=n_expected)
            print(
                f"  {label:10s} {n} rows (filled in {fill_s:.0f} s); light curve of "
                f"{r['points']} points: cold {r['cold_s']:.3f} s, warm {r['warm_s']:.3f} s "
                f"(client CPU {r['warm_cpu_s']:.3f} s) "
                f"(query alone {r['query_only_s']:.3f} s, by alias {r['alias_s']:.3f} s); "
                f"report's last 30 nights ({r['report_points']} points, own connection) "
                f"{r['report_last30_s']:.3f} s; "
                f"ECSV {r['ecsv_s']:.3f} s, PNG {r['png_s']:.3f} s"
            )
    finally:
        if admin is not None:
            if not args.keep:
                with admin.connect() as conn:
                    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.dispose()


def bench_target_photometry(args) -> None:
    sys.path.insert(0, str(REPO / "tests" / "rpp_tasks"))
    from rpp_tasks.config import config_from_dict
    from rpp_tasks.outputs import db
    from rpp_tasks.session import lifecycle, pipeline
    from rpp_tasks.sim.nights import write_nights
    from rpp_tasks.stages.target import run_targets

    root = Path(tempfile.mkdtemp(prefix="rpp_bench_targets_"))
    n = args.night_frames
    truth = write_nights(
        root,
        n_nights=1,
        frames_per_night=n,
        shape=(args.size, args.size),
        density_per_deg2=args.density,
        seed=1,
    )
    obs = config_from_dict(truth.offline_config(root, observatory="bench"))
    session = lifecycle.open_session(truth.nights[0], obs, work_root=root / "work")
    lifecycle.run_stage(session, obs, "masters")
    masters = session.read_json("masters.json")
    print(f"\nTarget + ensemble photometry: {n} frames of {args.size}x{args.size} px, 3 targets")
    t0 = time.perf_counter()
    n_src = []
    for raw in sorted(truth.nights[0].glob("SYNTH-FIELD_*.fits")):
        s = pipeline.reduce_frame(raw, obs, session.workdir / "frames" / raw.stem, masters=masters)
        assert s["status"] == "ok", s["reason"]
        n_src.append(s["n_sources"])
    print(f"  reduced in {time.perf_counter() - t0:.0f} s ({int(np.median(n_src))} sources/frame)")
    url = db.default_results_url(root)
    # as a reduction runs it: the session-scope `targets` stage of the table, then the record step
    from rpp_tasks.stages.target_session import record_target_photometry

    cpu_stage, cpu_rec = [], []
    for _ in range(3):
        c0 = time.process_time()
        res = lifecycle.run_stage(session, obs, "targets")
        cpu_stage.append(time.process_time() - c0)
        c0 = time.process_time()
        rec = record_target_photometry(session.workdir, obs, url=url)
        cpu_rec.append(time.process_time() - c0)
    assert res["targets"]["n_targets"] == 3 and rec["recorded"], (res, rec)
    chain = [
        json.loads((session.workdir / "frames" / r.stem / "summary.json").read_text())[
            "cpu_s_total"
        ]
        for r in sorted(truth.nights[0].glob("SYNTH-FIELD_*.fits"))
    ]
    print(
        f"  targets stage (lifecycle.run_stage): {statistics.median(cpu_stage) / n:.3f} CPU-s per "
        f"frame; record step (record_target_photometry, SQLite): "
        f"{statistics.median(cpu_rec) / n:.3f} CPU-s per frame (median of 3); the frame stages: "
        f"{statistics.median(chain):.2f} CPU-s per frame"
    )
    for label, record in (("without the database", False), ("recorded in SQLite", True)):
        cpu = []
        for _ in range(3):
            c0 = time.process_time()
            out = run_targets(session.workdir, obs, record=record, results_url=url)
            cpu.append(time.process_time() - c0)
        e = out["ensembles"]["V"]["psf"]
        print(
            f"  run_targets {label:22s}: {statistics.median(cpu) / n:.3f} CPU-s per frame "
            f"(median of 3; {e['n_used']} comparison stars, {len(out['targets'])} targets)"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nights", type=int, default=300)
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--targets", type=int, default=4, help="other targets in every frame")
    p.add_argument("--sources", type=int, default=40, help="catalogue sources in every frame")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--no-pg", action="store_true")
    p.add_argument("--size", type=int, default=1024, help="frame size for the photometry bench")
    p.add_argument("--density", type=float, default=8000.0, help="catalogue stars per deg^2")
    p.add_argument("--night-frames", type=int, default=10)
    p.add_argument(
        "--keep",
        help="folder for the SQLite file; also keep the PostgreSQL database rpp_bench_kept: a "
        "second run reuses both (drop it by hand)",
    )
    p.add_argument("--skip-db", action="store_true")
    p.add_argument("--skip-photometry", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if not args.skip_db:
        bench_database(args)
    if not args.skip_photometry:
        bench_target_photometry(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
