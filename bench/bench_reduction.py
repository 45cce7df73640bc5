#!/usr/bin/env python
"""Reduction benchmark: CPU/wall time per stage and catalogue fidelity on synthetic fields.

For each size and PSF, ``--repeat`` seeded fields (``rpp_tasks.sim.synthetic.make_star_field``: 2000
stars per 2048x2048, magnitudes 13-22 from ``dN/dm ∝ 10**(0.3 m)``, sky 800 ADU, gain 1.5,
read noise 8 e-, FWHM 3.5 px, cosmic rays and hot pixels) are written as 16-bit FITS like an
observatory would, reduced by ``rpp_tasks.session.pipeline.reduce_frame`` with the ``demo``
observatory configuration (no master frames), and the catalogue is scored with
``rpp_tasks.sim.evaluate.fidelity_report``. Prints medians over the repeats and the targets.

Not a test: run it by hand, e.g.::

    .venv/bin/python bench/bench_reduction.py --quick
    .venv/bin/python bench/bench_reduction.py --sizes 2048 4096 --psf gaussian moffat --repeat 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# target: (label, figure key, comparison, threshold)
TARGETS = {
    2048: {"cpu_s": 4.0},
    4096: {"cpu_s": 15.0},
}
FIDELITY_TARGETS = [
    ("completeness S/N>10", "completeness", ">=", 0.99),
    ("spurious fraction", "spurious_fraction", "<=", 0.005),
    ("aperture 1.3 FWHM scatter / photon noise", "ap_scatter_ratio", "<=", 1.05),
    ("PSF scatter / Cramer-Rao", "psf_scatter_ratio", "<=", 1.10),
    ("PSF bright-star floor [mag]", "psf_bright_floor_mag", "<=", 0.003),
    ("aperture error honesty |ratio-1|", "ap_error_dev", "<=", 0.10),
    ("PSF error honesty |ratio-1|", "psf_error_dev", "<=", 0.10),
    ("FWHM |rel. error| (continuous PSF)", "fwhm_abs_rel_err", "<=", 0.03),
]


def _write_raw(path, field):
    from astropy.io import fits

    raw = np.clip(np.rint(field.data), 0, 65535).astype(np.uint16)
    fits.PrimaryHDU(data=raw, header=field.header).writeto(path, overwrite=True)


def run_one(size, psf, seed, obs, workdir):
    """Make, write, reduce and score one field; return a flat dict of figures."""
    from astropy.table import Table

    from rpp_tasks.session.pipeline import reduce_frame
    from rpp_tasks.sim.evaluate import fidelity_report
    from rpp_tasks.sim.synthetic import make_star_field

    n_stars = int(round(2000 * (size / 2048) ** 2))
    t0 = time.perf_counter()
    field = make_star_field(
        (size, size),
        n_stars=n_stars,
        psf=psf,
        fwhm_px=3.5,
        beta=3.0,
        seed=seed,
        object_name=f"bench_{psf}_{size}",
    )
    t_make = time.perf_counter() - t0
    path = Path(workdir) / f"bench_{psf}_{size}_{seed}.fits"
    _write_raw(path, field)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    summary = reduce_frame(path, obs, Path(workdir) / f"work_{psf}_{size}_{seed}")
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if summary.get("status") != "ok":
        raise SystemExit(
            f"reduce_frame failed on {path.name}: {summary.get('failed_stage')}: {summary.get('reason')}"
        )
    cat = Table.read(summary["catalog"])
    rep = fidelity_report(
        cat,
        field.truth,
        cr_mask=field.cr_mask,
        hot_mask=field.hot_mask,
        fwhm_measured_px=summary.get("fwhm_px"),
    )
    out = {
        "size": size,
        "psf": psf,
        "seed": seed,
        "n_stars": n_stars,
        "make_wall_s": t_make,
        "process_cpu_s": cpu,
        "process_wall_s": wall,
        "stage_cpu_s": {k: v["cpu_s"] for k, v in summary["stages"].items()},
        "stage_wall_s": {k: v["wall_s"] for k, v in summary["stages"].items()},
        "cpu_s": summary["cpu_s_total"],
        "wall_s": summary["wall_s_total"],
        "n_sources": len(cat),
        "report": rep.to_dict(),
    }
    ap = rep.for_column("flux_1p3fwhm") if "flux_1p3fwhm" in cat.colnames else None
    ps = rep.for_column("flux_psf") if "flux_psf" in cat.colnames else None
    nan = float("nan")
    out.update(
        {
            "completeness": rep.completeness,
            "completeness_isolated": rep.completeness_isolated,
            "spurious_fraction": rep.spurious_fraction,
            "spurious_fraction_raw": rep.spurious_fraction_raw,
            "ap_scatter_ratio": ap.scatter_ratio if ap else nan,
            "ap_error_ratio": ap.error_ratio if ap else nan,
            "ap_error_dev": abs(ap.error_ratio - 1) if ap else nan,
            "ap_bright_floor_mag": ap.bright_floor_mag if ap else nan,
            "ap_offset_mag": ap.offset_mag if ap else nan,
            "psf_scatter_ratio": ps.scatter_ratio if ps else nan,
            "psf_error_ratio": ps.error_ratio if ps else nan,
            "psf_error_dev": abs(ps.error_ratio - 1) if ps else nan,
            "psf_bright_floor_mag": ps.bright_floor_mag if ps else nan,
            "psf_offset_mag": ps.offset_mag if ps else nan,
            "fwhm_measured_px": rep.fwhm_measured_px,
            "fwhm_rel_err": rep.fwhm_rel_err,
            "fwhm_rel_err_pixelated": rep.fwhm_rel_err_pixelated,
            "fwhm_abs_rel_err": abs(rep.fwhm_rel_err),
            "position_rms_px": rep.position_rms_px,
        }
    )
    return out


def _median(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key])]
    return float(np.median(vals)) if vals else float("nan")


def _check(value, op, thr):
    if not np.isfinite(value):
        return "n/a"
    ok = value >= thr if op == ">=" else value <= thr
    return "PASS" if ok else "FAIL"


def report(rows, size, psf):
    """Print the timing and fidelity table of one (size, psf) group."""
    stages = list(rows[0]["stage_cpu_s"])
    print(
        f"\n=== {size}x{size}, {psf} PSF, {rows[0]['n_stars']} stars, {len(rows)} frame(s) "
        f"(medians) ==="
    )
    print(f"  {'stage':<12}{'CPU s':>9}{'wall s':>9}")
    for st in stages:
        cpu = float(np.median([r["stage_cpu_s"].get(st, np.nan) for r in rows]))
        wall = float(np.median([r["stage_wall_s"].get(st, np.nan) for r in rows]))
        print(f"  {st:<12}{cpu:9.2f}{wall:9.2f}")
    cpu, wall = _median(rows, "cpu_s"), _median(rows, "wall_s")
    print(
        f"  {'total':<12}{cpu:9.2f}{wall:9.2f}   (process: {_median(rows, 'process_cpu_s'):.2f} CPU-s, "
        f"{_median(rows, 'process_wall_s'):.2f} s wall incl. imports on first frame)"
    )
    fpm = 60.0 / wall if wall > 0 else float("nan")
    print(
        f"  frames per minute (one worker): {fpm:.1f}; field generation {_median(rows, 'make_wall_s'):.2f} s "
        f"(not part of the chain)"
    )
    target = TARGETS.get(size, {}).get("cpu_s")
    lines = []
    if target is not None:
        lines.append(("full chain CPU-s", cpu, "<=", target))
    lines += [(label, _median(rows, key), op, thr) for label, key, op, thr in FIDELITY_TARGETS]
    print(f"  {'figure':<42}{'value':>10}  target      ")
    for label, val, op, thr in lines:
        print(f"  {label:<42}{val:10.4f}  {op} {thr:<8g} {_check(val, op, thr)}")
    extra = (
        "completeness_isolated",
        "spurious_fraction_raw",
        "ap_offset_mag",
        "psf_offset_mag",
        "ap_bright_floor_mag",
        "ap_error_ratio",
        "psf_error_ratio",
        "fwhm_measured_px",
        "fwhm_rel_err_pixelated",
        "position_rms_px",
    )
    print("  also: " + ", ".join(f"{k}={_median(rows, k):.4g}" for k in extra))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[2048, 4096], help="square image sizes (px)"
    )
    p.add_argument(
        "--psf", nargs="+", default=["gaussian", "moffat"], choices=["gaussian", "moffat"]
    )
    p.add_argument(
        "--repeat", type=int, default=3, help="frames per (size, psf); medians are reported"
    )
    p.add_argument("--quick", action="store_true", help="2048 px, Gaussian, one frame")
    p.add_argument("--observatory", default="demo", help="observatory config name or YAML path")
    p.add_argument(
        "--workdir", default=None, help="keep frames and products here (default: a temp dir)"
    )
    p.add_argument("--json", default=None, help="write all per-frame figures to this JSON file")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.psf, args.repeat = [2048], ["gaussian"], 1
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:
        import warnings

        import astropy  # noqa: F401  (astropy installs its own logger class on import)

        warnings.filterwarnings("ignore")
        logging.getLogger("astropy").setLevel(logging.ERROR)

    try:
        from rpp_tasks.session.pipeline import reduce_frame  # noqa: F401
    except ImportError as exc:
        print(
            f"bench_reduction: rpp_tasks.session.pipeline.reduce_frame is not available ({exc}); "
            "the benchmark needs the pipeline entry point of docs/ARCHITECTURE.md",
            file=sys.stderr,
        )
        return 2
    from rpp_tasks.config import find_config

    obs = find_config(args.observatory)
    print(
        f"bench_reduction: python {platform.python_version()}, {os.cpu_count()} CPU(s), "
        f"load average {os.getloadavg()[0]:.1f}, observatory '{obs.name}'"
    )
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="rpp_bench_")
        workdir = Path(tmp.name)
    else:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    all_rows = []
    try:
        for size in args.sizes:
            for psf in args.psf:
                rows = [run_one(size, psf, args.seed + i, obs, workdir) for i in range(args.repeat)]
                report(rows, size, psf)
                all_rows += rows
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(all_rows, indent=1, default=float))
        print(f"\nper-frame figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
