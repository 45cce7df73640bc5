#!/usr/bin/env python
"""Issue 12: peak memory per frame worker and what the memory budget does with big frames.

A session of synthetic star fields (``rpp_tasks.sim.synthetic.make_star_field``, Moffat PSF,
2000 stars per 2048² like bench_reduction.py's ``moffat`` fields,
16-bit FITS with an IMAGETYP/EXPTIME/DATE-OBS header; no calibration frames) is reduced by
``rpp_tasks.session.lifecycle.run_stage`` (every stage of the imaging table, two frame workers,
the frames in memory as ``rpp reduce`` does) once per budget given. For each run it prints the
budget per worker, the frames planned alone or rejected before reading (with the reason), and
for each reduced frame the peak RSS of its worker (VmHWM reset at the start of each frame) with
the header estimate (`rpp_tasks.session.pool.frame_peak_bytes`) and the measured bytes per pixel
(peak - base) / pixels, base = `rpp_tasks.session.pool.BASE_BYTES`.

    .venv/bin/python bench/bench_memory_budget.py               # 2048², 4096²; default budget
    .venv/bin/python bench/bench_memory_budget.py --big --budgets 0 2000 1200
        # + a 9576 x 6388 (61 Mpx) and an 8192² frame; budgets 0 = default (80 % RAM / workers)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def write_frames(folder: Path, shapes) -> list[str]:
    import numpy as np
    from astropy.io import fits

    from rpp_tasks.sim.synthetic import make_star_field

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (ny, nx) in enumerate(shapes):
        name = f"sci_{nx}x{ny}"
        t0 = time.perf_counter()
        n_stars = int(round(2000 * ny * nx / 2048**2))
        field = make_star_field(
            (ny, nx), n_stars=n_stars, psf="moffat", fwhm_px=3.5, beta=3.0, seed=100 + i,
            object_name=name,
        )  # fmt: skip
        h = field.header.copy()
        h["IMAGETYP"] = "Light Frame"
        raw = np.clip(np.rint(field.data), 0, 65535).astype(np.uint16)
        fits.PrimaryHDU(data=raw, header=h).writeto(folder / f"{name}.fits", overwrite=True)
        del field, raw
        print(f"wrote {name}.fits ({time.perf_counter() - t0:.0f} s)", flush=True)
        names.append(name)
    return names


def run_once(raw: Path, work: Path, obs, budget_mb: float, workers: int) -> None:
    from rpp_tasks.session import lifecycle, pool
    from rpp_tasks.session.table import table_for

    o = dataclasses.replace(
        obs, session=dataclasses.replace(obs.session, memory_per_worker_mb=budget_mb or None)
    )
    session = lifecycle.open_session(raw, o, work_root=work)
    manifest = session.read_json("manifest.json")
    shapes = {f["stem"]: tuple(f["shape"]) for f in manifest["science"]}
    t0 = time.perf_counter()
    res = lifecycle.run_stage(
        session, o, table_for(o).names, workers=workers, keep_intermediate=False
    )
    wall = time.perf_counter() - t0
    print(
        f"\n== budget {res['memory_budget_mb']} MB per worker "
        f"({'configured' if budget_mb else 'default: 80 % RAM / workers'}), {workers} workers, "
        f"wall {wall:.0f} s; alone: {res['alone'] or 'none'}"
    )
    print(
        f"{'frame':18s} {'Mpx':>6s} {'estimate MB':>11s} {'peak RSS MB':>11s} {'B/px':>6s}  outcome"
    )
    bpp = o.session.bytes_per_pixel
    for stem, shape in sorted(shapes.items(), key=lambda kv: kv[1][0] * kv[1][1]):
        npx = shape[0] * shape[1]
        est = pool.frame_peak_bytes(shape, bytes_per_pixel=bpp) / 2**20
        peak = res["peak_rss_mb"].get(stem)
        per_px = (peak * 2**20 - pool.BASE_BYTES) / npx if peak else float("nan")
        rej = res["rejected"].get(stem)
        outcome = "reduced" if rej is None else f"{rej['stage']}: {rej['reason']}"
        print(
            f"{stem:18s} {npx / 1e6:6.1f} {est:11.0f} "
            f"{peak if peak is not None else float('nan'):11.0f} {per_px:6.1f}  {outcome}"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big", action="store_true", help="add 9576x6388 and 8192x8192 frames")
    ap.add_argument(
        "--budgets", type=float, nargs="+", default=[0.0], help="MB per worker; 0 = default"
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="folder to keep the raw frames in (reused)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from rpp_tasks.config import find_config

    obs = find_config("demo", REPO / "config")
    root = Path(tempfile.mkdtemp(prefix="rpp_bench_mem_"))
    os.environ["RPP_DATA_ROOT"] = str(root)  # no master library: the frames alone
    raw = (args.keep or root / "raw") / "2025-01-15"
    shapes = [(2048, 2048), (4096, 4096)] + ([(6388, 9576), (8192, 8192)] if args.big else [])
    if not raw.is_dir() or len(list(raw.glob("*.fits"))) < len(shapes):
        write_frames(raw, shapes)
    from rpp_tasks.session.pool import machine_memory_bytes

    print(f"machine RAM {machine_memory_bytes() / 2**30:.1f} GB, load {os.getloadavg()[0]:.1f}")
    for i, b in enumerate(args.budgets):
        run_once(raw, root / f"work{i}", obs, b, args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
