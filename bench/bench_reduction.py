#!/usr/bin/env python
"""Reduction benchmark: CPU, peak memory and catalogue fidelity of the whole per-frame chain.

For each field kind and size, ``--repeat`` seeded synthetic frames are made with
``rpp_tasks.sim.synthetic`` and written as 16-bit FITS like an observatory writes them; each is
reduced by ``rpp_tasks.session.pipeline.reduce_frame`` (``demo`` observatory configuration, no
master frames) **in a fresh Python process**, so the CPU time is the whole process, imports
included, and the peak memory is the process's own. The catalogue is scored against the truth with
``rpp_tasks.sim.evaluate.fidelity_report``; medians over the repeats are printed, per S/N bin.

Field kinds:

* ``optics``: built like real small-telescope data (`rpp_tasks.sim.synthetic.optics_field_kwargs`):
  a PSF varying across the field (FWHM +15 % in the corners, Moffat beta 3.3 -> 2.7, ellipticity up
  to 0.1 turning around the field), 4 % sky gradient, gain 0.8, close pairs, saturated stars with
  bleed trails and halos, cosmic rays and hot pixels;
* ``gaussian`` / ``moffat``: one circular PSF (FWHM 3.5 px, beta 3) everywhere, gain 1.5 (the
  fields of the earlier benchmarks; they must not regress).

Not a test: run it by hand, e.g.::

    .venv/bin/python bench/bench_reduction.py --quick
    .venv/bin/python bench/bench_reduction.py --sizes 2048 4096 --fields optics moffat --repeat 3
    .venv/bin/python bench/bench_reduction.py --big          # one 9576 x 6388 (61 Mpx) optics frame
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: S/N bins (truth ``snr_expected``) of the per-bin figures
SNR_BINS = (10.0, 20.0, 50.0, 200.0, 500.0, math.inf)
CPU_TARGET_S = {2048: 4.0, 4096: 15.0}
MEM_TARGET_BYTES_PER_PX = 40.0
# (label, key, comparison, threshold)
FIDELITY_TARGETS = [
    ("completeness S/N>10", "completeness", ">=", 0.99),
    ("spurious fraction (all unmatched)", "spurious_fraction_raw", "<=", 0.005),
    ("duplicate detections", "n_duplicates", "<=", 0),
    ("aperture 1.3 FWHM scatter / photon noise, max bin <= 500", "ap_scatter_max", "<=", 1.10),
    ("PSF scatter / Cramer-Rao, max bin <= 500", "psf_scatter_max", "<=", 1.10),
    ("aperture bright-star floor [mag]", "ap_bright_floor_mag", "<=", 0.003),
    ("PSF bright-star floor [mag]", "psf_bright_floor_mag", "<=", 0.003),
    ("aperture error honesty, worst |ratio-1| per bin", "ap_error_dev_max", "<=", 0.10),
    ("PSF error honesty, worst |ratio-1| per bin", "psf_error_dev_max", "<=", 0.10),
    ("FWHM |rel. error|, worst of centre/corners", "fwhm_zone_max", "<=", 0.03),
]


def make_field(shape, kind, seed):
    """One synthetic field of the given kind (see the module docstring)."""
    from rpp_tasks.sim.synthetic import make_optics_field, make_star_field

    ny, nx = shape
    name = f"bench_{kind}_{nx}x{ny}"
    if kind == "optics":
        return make_optics_field(shape, seed=seed, object_name=name)
    n_stars = int(round(2000 * ny * nx / 2048**2))
    return make_star_field(
        shape, n_stars=n_stars, psf=kind, fwhm_px=3.5, beta=3.0, seed=seed, object_name=name
    )


def _write_raw(path, field):
    from astropy.io import fits

    raw = np.clip(np.rint(field.data), 0, 65535).astype(np.uint16)
    fits.PrimaryHDU(data=raw, header=field.header).writeto(path, overwrite=True)


# ------------------------------------------------------------------------------ child process


def _rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes():
    """Peak RSS of this process image (VmHWM). ``ru_maxrss`` is not used: Linux carries the RSS
    of the forked parent into it across exec, so a child of a big bench process would report
    the parent's size."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_main(frame, outdir, observatory, use_tracemalloc, code=None):
    """Reduce one frame in this (fresh) process; print a JSON line with CPU and memory figures.

    ``code``: a folder holding another ``rpp_tasks`` (e.g. ``git archive <commit>``) to reduce
    with, for before/after figures on the same fields.
    """
    import warnings

    if code:
        sys.path.insert(0, str(Path(code).resolve()))
        for name in [m for m in sys.modules if m == "rpp_tasks" or m.startswith("rpp_tasks.")]:
            del sys.modules[name]
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    # modules the stages import on first use: loaded before the memory baseline is taken
    import astropy.io.fits  # noqa: F401
    import astropy.table  # noqa: F401
    import astropy.wcs  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import scipy.sparse.csgraph  # noqa: F401
    import scipy.spatial  # noqa: F401
    import sep  # noqa: F401

    import rpp_tasks.session.adapters  # noqa: F401
    import rpp_tasks.stages.background  # noqa: F401
    import rpp_tasks.stages.calibration  # noqa: F401
    import rpp_tasks.stages.cosmics  # noqa: F401
    import rpp_tasks.stages.detection  # noqa: F401
    import rpp_tasks.stages.photometry  # noqa: F401
    import rpp_tasks.stages.psf  # noqa: F401
    from rpp_tasks.config import find_config
    from rpp_tasks.session import pipeline

    obs = find_config(observatory)
    cpu_imports = time.process_time()
    rss_base = _rss_bytes()
    if use_tracemalloc:
        import tracemalloc

        tracemalloc.start()
    cpu0 = time.process_time()
    summary = pipeline.reduce_frame(frame, obs, outdir)
    cpu_reduce = time.process_time() - cpu0
    traced_peak = None
    if use_tracemalloc:
        traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    maxrss = _peak_rss_bytes()
    print(
        "BENCH_CHILD "
        + json.dumps(
            {
                "summary_path": str(Path(outdir) / "summary.json"),
                "status": summary.get("status"),
                "reason": summary.get("reason"),
                "cpu_imports_s": cpu_imports,
                "cpu_reduce_s": cpu_reduce,
                "rss_base_bytes": rss_base,
                "maxrss_bytes": maxrss,
                "traced_peak_bytes": traced_peak,
            }
        ),
        flush=True,
    )
    return 0


def reduce_in_child(path, outdir, observatory, *, use_tracemalloc=False, code=None):
    """Run `child_main` in a new interpreter; whole-process CPU from the children's rusage."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(path), str(outdir)]
    cmd += [observatory] + (["--tracemalloc"] if use_tracemalloc else [])
    cmd += ["--code", str(code)] if code else []
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_CHILD ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"child reduction of {path} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    out = json.loads(line[-1][len("BENCH_CHILD ") :])
    out["process_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out["process_wall_s"] = wall
    return out


# ------------------------------------------------------------------------------ one frame


def run_one(
    shape, kind, seed, observatory, workdir, *, use_tracemalloc=False, score=True, code=None
):
    """Make, write, reduce (child process) and score one field; a flat dict of figures."""
    from astropy.table import Table

    from rpp_tasks.sim.evaluate import fidelity_report

    ny, nx = shape
    t0 = time.perf_counter()
    field = make_field(shape, kind, seed)
    t_make = time.perf_counter() - t0
    path = Path(workdir) / f"bench_{kind}_{nx}x{ny}_{seed}.fits"
    _write_raw(path, field)
    outdir = Path(workdir) / f"work_{kind}_{nx}x{ny}_{seed}"
    child = reduce_in_child(path, outdir, observatory, use_tracemalloc=use_tracemalloc, code=code)
    summary = json.loads(Path(child["summary_path"]).read_text())
    if summary.get("status") != "ok":
        raise SystemExit(
            f"reduce_frame failed on {path.name}: {summary.get('failed_stage')}: "
            f"{summary.get('reason')}"
        )
    npx = nx * ny
    out = {
        "shape": [ny, nx],
        "kind": kind,
        "seed": seed,
        "n_stars": len(field.truth),
        "make_wall_s": t_make,
        "process_cpu_s": child["process_cpu_s"],
        "process_wall_s": child["process_wall_s"],
        "cpu_imports_s": child["cpu_imports_s"],
        "stage_cpu_s": {k: v["cpu_s"] for k, v in summary["stages"].items()},
        "cpu_s": summary["cpu_s_total"],
        "wall_s": summary["wall_s_total"],
        "maxrss_mb": child["maxrss_bytes"] / 1e6,
        "bytes_per_px_process": child["maxrss_bytes"] / npx,
        "bytes_per_px_chain": (child["maxrss_bytes"] - child["rss_base_bytes"]) / npx,
        "bytes_per_px_traced": (child["traced_peak_bytes"] / npx)
        if child.get("traced_peak_bytes")
        else float("nan"),
        "psf": summary["stages"].get("photometry", {}).get("psf_model"),
        "model_error_frac": summary["stages"].get("photometry", {}).get("model_error_frac"),
    }
    if not score:
        return out
    cat = Table.read(summary["catalog"])
    rep = fidelity_report(
        cat,
        field.truth,
        cr_mask=field.cr_mask,
        hot_mask=field.hot_mask,
        bleed_mask=field.bleed_mask,
        fwhm_measured_px=summary.get("fwhm_px"),
        snr_bins=SNR_BINS,
    )
    out["n_sources"] = len(cat)
    out["report"] = rep.to_dict()
    ap = rep.for_column("flux_1p3fwhm") if "flux_1p3fwhm" in cat.colnames else None
    ps = rep.for_column("flux_psf") if "flux_psf" in cat.colnames else None
    nan = float("nan")

    def worst(p, key, dev=False):
        if p is None:
            return nan
        vals = [
            b[key] for b in p.bins if (b["snr_hi"] <= 500 or key == "error_ratio") and b["n"] >= 15
        ]
        vals = [abs(v - 1.0) if dev else v for v in vals if v is not None and np.isfinite(v)]
        return max(vals) if vals else nan

    zones = rep.fwhm_zones or {}
    out.update(
        {
            "completeness": rep.completeness,
            "completeness_isolated": rep.completeness_isolated,
            "spurious_fraction": rep.spurious_fraction,
            "spurious_fraction_raw": rep.spurious_fraction_raw,
            "n_duplicates": rep.spurious_breakdown.get("duplicate", 0),
            "spurious_breakdown": rep.spurious_breakdown,
            "ap_scatter_ratio": ap.scatter_ratio if ap else nan,
            "ap_scatter_max": worst(ap, "scatter_ratio"),
            "ap_error_ratio": ap.error_ratio if ap else nan,
            "ap_error_dev_max": worst(ap, "error_ratio", dev=True),
            "ap_bright_floor_mag": ap.bright_floor_mag if ap else nan,
            "ap_offset_mag": ap.offset_mag if ap else nan,
            "psf_scatter_ratio": ps.scatter_ratio if ps else nan,
            "psf_scatter_max": worst(ps, "scatter_ratio"),
            "psf_error_ratio": ps.error_ratio if ps else nan,
            "psf_error_dev_max": worst(ps, "error_ratio", dev=True),
            "psf_bright_floor_mag": ps.bright_floor_mag if ps else nan,
            "psf_offset_mag": ps.offset_mag if ps else nan,
            "fwhm_measured_px": rep.fwhm_measured_px,
            "fwhm_rel_err": rep.fwhm_rel_err,
            "fwhm_zone_max": zones.get("max_abs_rel_err")
            if zones.get("max_abs_rel_err") is not None
            else abs(rep.fwhm_rel_err),
            "fwhm_zones": zones,
            "position_rms_px": rep.position_rms_px,
            "ap_bins": list(ap.bins) if ap else [],
            "psf_bins": list(ps.bins) if ps else [],
            "completeness_bins": list(rep.completeness_bins),
            "_fid": {"ap": ap, "psf": ps},  # per-star samples, pooled over the repeats
        }
    )
    return out


# ------------------------------------------------------------------------------ report


def _pooled_targets(pooled, min_n=15):
    """The per-bin target figures (worst bin, as `run_one`'s ``worst``) and the bright-star floors
    of the frames' stars pooled (`rpp_tasks.sim.evaluate.pooled_bins`)."""
    out = {}
    for key, (bins, floor) in pooled.items():
        if not bins:
            continue
        sc = [b["scatter_ratio"] for b in bins if b["snr_hi"] <= 500 and b.get("n", 0) >= min_n]
        er = [abs(b["error_ratio"] - 1.0) for b in bins if b.get("n", 0) >= min_n]
        sc = [v for v in sc if v is not None and np.isfinite(v)]
        er = [v for v in er if v is not None and np.isfinite(v)]
        out[f"{key}_scatter_max"] = max(sc) if sc else float("nan")
        out[f"{key}_error_dev_max"] = max(er) if er else float("nan")
        out[f"{key}_bright_floor_mag"] = floor
    return out


def _median(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key])]
    return float(np.median(vals)) if vals else float("nan")


def _check(value, op, thr):
    if not np.isfinite(value):
        return "n/a"
    ok = value >= thr if op == ">=" else value <= thr
    return "PASS" if ok else "FAIL"


def _bin_label(lo, hi):
    return f">{lo:g}" if not np.isfinite(hi) else f"{lo:g}-{hi:g}"


def report(rows):
    """Print the cost, memory and fidelity tables of one (shape, kind) group."""
    r0 = rows[0]
    ny, nx = r0["shape"]
    print(
        f"\n=== {nx}x{ny}, {r0['kind']} field, {r0['n_stars']} stars, {len(rows)} frame(s) "
        f"(medians) ==="
    )
    stages = list(r0["stage_cpu_s"])
    print("  stage CPU-s: " + ", ".join(f"{s} {_median_stage(rows, s):.2f}" for s in stages))
    print(
        f"  chain CPU-s {_median(rows, 'cpu_s'):.2f} (wall {_median(rows, 'wall_s'):.2f}); "
        f"whole process {_median(rows, 'process_cpu_s'):.2f} CPU-s incl. "
        f"{_median(rows, 'cpu_imports_s'):.2f} for imports, "
        f"{_median(rows, 'process_wall_s'):.2f} s wall; "
        f"field generation {_median(rows, 'make_wall_s'):.1f} s (not part of the chain)"
    )
    print(
        f"  peak memory: process {_median(rows, 'maxrss_mb'):.0f} MB = "
        f"{_median(rows, 'bytes_per_px_process'):.1f} B/px; chain (peak RSS - RSS after imports) "
        f"{_median(rows, 'bytes_per_px_chain'):.1f} B/px; traced numpy/Python peak "
        f"{_median(rows, 'bytes_per_px_traced'):.1f} B/px"
    )
    if r0.get("psf"):
        psf = r0["psf"]
        print(
            "  PSF model: "
            + ", ".join(
                f"{k}={psf[k]}" for k in ("kind", "order", "n_stars", "fwhm_px") if k in psf
            )
        )
    lines = []
    size = max(nx, ny)
    if size in CPU_TARGET_S and nx == ny:
        lines.append(
            ("whole-process CPU-s", _median(rows, "process_cpu_s"), "<=", CPU_TARGET_S[size])
        )
    lines.append(("chain peak bytes per pixel", _median(rows, "bytes_per_px_chain"), "<=", 40.0))
    if "completeness" not in r0:
        for label, val, op, thr in lines:
            print(f"  {label:<66}{val:10.4f}  {op} {thr:<8g} {_check(val, op, thr)}")
        return
    from rpp_tasks.sim.evaluate import pooled_bins

    pooled = {}
    for key in ("ap", "psf"):
        fids = [r["_fid"][key] for r in rows if r.get("_fid", {}).get(key) is not None]
        pooled[key] = pooled_bins(fids, SNR_BINS) if fids else ([], float("nan"))
    # the per-bin figures and the floors of several frames are judged on their stars pooled (the
    # table below); a median over frames of each frame's worst bin of ~20-50 stars is biased high
    per_bin = {} if len(rows) < 2 else _pooled_targets(pooled)
    lines += [
        (
            label + (" (pooled)" if key in per_bin else ""),
            per_bin.get(key, _median(rows, key)),
            op,
            thr,
        )
        for label, key, op, thr in FIDELITY_TARGETS
    ]
    print(f"  {'figure':<66}{'value':>10}  target")
    for label, val, op, thr in lines:
        print(f"  {label:<66}{val:10.4f}  {op} {thr:<8g} {_check(val, op, thr)}")
    print(
        "  spurious breakdown (frame 1): "
        + ", ".join(f"{k} {v}" for k, v in r0["spurious_breakdown"].items())
        + f"; n_sources {r0['n_sources']}"
    )
    z = r0.get("fwhm_zones") or {}
    if z:
        print(
            f"  FWHM by zone (frame 1, {z.get('source')}): "
            + ", ".join(
                f"{k} {v['fwhm_measured_px']:.3f}/{v['fwhm_true_px']:.3f} "
                f"({100 * v['rel_err']:+.1f}%)"
                for k, v in z.items()
                if isinstance(v, dict)
            )
        )
    print(
        f"  per S/N bin, stars of all {len(rows)} frame(s) pooled; aperture = 1.3 FWHM, corrected "
        f"to total (floors: aperture {pooled['ap'][1]:.4f}, PSF {pooled['psf'][1]:.4f} mag)"
    )
    print(
        f"  {'S/N bin':<10}{'n':>6}{'compl.':>8}{'ap n':>6}{'ap sc/PN':>9}{'ap err':>8}{'+-':>6}"
        f"{'ap mag':>8}{'psf n':>6}{'psf sc/CR':>10}{'psf err':>8}{'+-':>6}{'psf mag':>8}"
        f"{'CR mag':>8}"
    )
    nan = float("nan")
    for k, (lo, hi) in enumerate(zip(SNR_BINS[:-1], SNR_BINS[1:])):
        n_true = sum(
            b["n_true"] for r in rows for b in r.get("completeness_bins", []) if b["snr_lo"] == lo
        )
        n_det = sum(
            b["n_detected"]
            for r in rows
            for b in r.get("completeness_bins", [])
            if b["snr_lo"] == lo
        )
        ab = pooled["ap"][0][k] if pooled["ap"][0] else {}
        pb = pooled["psf"][0][k] if pooled["psf"][0] else {}
        print(
            f"  {_bin_label(lo, hi):<10}{n_true:6d}{(n_det / n_true if n_true else nan):8.3f}"
            f"{ab.get('n', 0):6d}{ab.get('scatter_ratio', nan):9.3f}"
            f"{ab.get('error_ratio', nan):8.3f}{ab.get('error_ratio_sigma', nan):6.3f}"
            f"{ab.get('scatter_mag', nan):8.4f}"
            f"{pb.get('n', 0):6d}{pb.get('scatter_ratio', nan):10.3f}"
            f"{pb.get('error_ratio', nan):8.3f}{pb.get('error_ratio_sigma', nan):6.3f}"
            f"{pb.get('scatter_mag', nan):8.4f}{pb.get('expected_mag', nan):8.4f}"
        )
    extra = ("ap_offset_mag", "psf_offset_mag", "fwhm_measured_px", "position_rms_px")
    print("  also: " + ", ".join(f"{k}={_median(rows, k):.4g}" for k in extra))


def _median_stage(rows, stage):
    return float(np.median([r["stage_cpu_s"].get(stage, np.nan) for r in rows]))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--_child":
        code = argv[argv.index("--code") + 1] if "--code" in argv else None
        return child_main(argv[1], argv[2], argv[3], "--tracemalloc" in argv, code)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2048], help="square image sizes (px)")
    p.add_argument(
        "--fields",
        "--psf",
        dest="fields",
        nargs="+",
        default=["optics", "moffat"],
        choices=["optics", "gaussian", "moffat"],
    )
    p.add_argument("--repeat", type=int, default=3, help="frames per (size, field); medians")
    p.add_argument("--quick", action="store_true", help="2048 px optics field, one frame")
    p.add_argument(
        "--big",
        action="store_true",
        help="reduce one 9576 x 6388 (61 Mpx) optics frame: CPU and peak memory",
    )
    p.add_argument("--tracemalloc", action="store_true", help="also trace numpy/Python peaks")
    p.add_argument("--observatory", default="demo", help="observatory config name or YAML path")
    p.add_argument("--workdir", default=None, help="keep frames and products here")
    p.add_argument("--json", default=None, help="write all per-frame figures to this JSON file")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument(
        "--code",
        default=None,
        help="reduce with the rpp_tasks in this folder "
        "(e.g. `git archive <commit> | tar -x -C DIR`); "
        "fields and scoring stay those of this tree (before/after figures)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.fields, args.repeat = [2048], ["optics"], 1
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    print(
        f"bench_reduction: python {platform.python_version()}, {os.cpu_count()} CPU(s), "
        f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}, "
        f"observatory '{args.observatory}'"
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
        if args.big:
            row = run_one((6388, 9576), "optics", args.seed, args.observatory, workdir, score=True)
            report([row])
            all_rows.append(row)
        else:
            for size in args.sizes:
                for kind in args.fields:
                    rows = []
                    for i in range(args.repeat):
                        rows.append(
                            run_one(
                                (size, size),
                                kind,
                                args.seed + i,
                                args.observatory,
                                workdir,
                                use_tracemalloc=args.tracemalloc,
                                code=args.code,
                            )
                        )
                        for f in workdir.glob("*.fits"):
                            f.unlink()
                    report(rows)
                    all_rows += rows
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"\nload average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if args.json:
        rows_json = [{k: v for k, v in r.items() if k != "_fid"} for r in all_rows]
        Path(args.json).write_text(json.dumps(rows_json, indent=1, default=float))
        print(f"per-frame figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
