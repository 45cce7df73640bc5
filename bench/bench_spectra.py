"""CPU cost of a 2SPOT-like long-slit night reduced to BeSS spectra (issue 13), per stage.

Run:  cd /work/main && .venv/bin/python bench/bench_spectra.py [--shape 2000 3000] [--keep DIR]

The night (`rpp_tasks.sim.longslit`): one target with 6 exposures of 1200 s, 1 Ar+Ne lamp, 20 flats,
5 darks, 5 offsets, 3000 x 2000 px (dispersion along the 3000 px), written as a 2SPOT session
(``last_obs.yaml``, ``setup_config.yaml``). The simulation is not timed. The reduction is the
session lifecycle the DAG's tasks call, one after the other in this process (no Airflow):
``open_session`` (validate), ``run_stage`` of the ``longslit`` table's ``masters`` and ``spectra``,
``finish`` (session summary, results database, report, products ZIP) and ``archive`` (SQLite ObsCore
rows). CPU seconds are ``time.process_time()`` of the process (all threads), per task and, inside
``spectra``, per step from the driver's timers, plus wall time. Quality figures of the same run are
printed against the truth: wavelength RMS, worst isolated absorption-line offset, median S/N.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=2, default=(2000, 3000), help="ny nx")
    ap.add_argument("--n-target", type=int, default=6)
    ap.add_argument("--n-flat", type=int, default=20)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--keep", type=Path, default=None, help="write the session/products here")
    args = ap.parse_args(argv)

    from rpp_tasks.config import find_config
    from rpp_tasks.sim.longslit import make_longslit_night, write_longslit_session

    ny, nx = args.shape
    t0 = time.perf_counter()
    night = make_longslit_night(
        shape=(ny, nx),
        targets=("SS433",),
        n_target=args.n_target,
        n_flat=args.n_flat,
        n_dark=5,
        n_offset=5,
        exptime_s=1200.0,
        star_peak_e=1.5e5,
        seed=args.seed,
    )
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_spectra_"))
    session = root / "session"
    write_longslit_session(session, night, bin_size=16)
    print(f"simulated + written in {time.perf_counter() - t0:.1f} s wall (not timed): {session}")

    obs = find_config("2spot")
    obs = dataclasses.replace(
        obs,
        camera=dataclasses.replace(obs.camera, gain_e_per_adu=1.4, read_noise_e=9.0),
        spectrograph=dataclasses.replace(
            obs.spectrograph,
            dispersion_a_per_px=float(night.truth.dispersion_coeffs[1]),
            wavelength_range_a=None,
            central_wavelength_a=5600.0,
        ),
    )
    # warm the imports (astropy coordinates, specutils, specreduce): not a per-night cost
    import os

    import astroscrappy  # noqa: F401
    import specreduce.extract  # noqa: F401
    import specutils.manipulation  # noqa: F401
    from astropy.coordinates import SkyCoord  # noqa: F401

    os.environ["RPP_DATA_ROOT"] = str(root)  # the results database under the bench folder
    from rpp_tasks.session import lifecycle

    tasks = {}

    def timed(name, fn, *a, **kw):
        c, w = time.process_time(), time.perf_counter()
        out = fn(*a, **kw)
        tasks[name] = (time.process_time() - c, time.perf_counter() - w)
        return out

    sess = timed("validate", lifecycle.open_session, session, obs, work_root=root / "work")
    timed("masters", lifecycle.run_stage, sess, obs, "masters")
    timed("spectra", lifecycle.run_stage, sess, obs, "spectra")
    summ, _ = timed("products", lifecycle.finish, sess, obs)
    timed("archive", lifecycle.archive, sess, obs, url=f"sqlite:///{root / 'archive.sqlite'}")
    red = ("validate", "masters", "spectra")
    cpu, wall = sum(tasks[k][0] for k in red), sum(tasks[k][1] for k in red)
    (sp,) = summ.spectra
    assert sp.ok, sp.reason
    stages = dict(sp.cpu_s)
    print(
        f"\nnight {ny} x {nx}: {args.n_target} exposures, 1 lamp, {args.n_flat} flats, 5 darks, "
        f"5 offsets"
    )
    print(
        f"reduction (validate + masters + spectra): {cpu:.2f} CPU-s ({wall:.2f} s wall), "
        "target <= 30 CPU-s"
    )
    for k, (c, w) in tasks.items():
        print(f"  task {k:<10} {c:6.2f} CPU-s {w:6.2f} s wall")
    print("  steps of 'spectra':")
    for k, v in stages.items():
        print(f"    {k:<13} {v:6.2f}")
    o = json.loads((sess.workdir / "spectra" / "spectra_summary.json").read_text())["outcomes"][0]
    s = o["summary"]
    w = s["wavelength"]
    print(
        f"\nwavelength: {w['n_lines']} lines, RMS {w['rms_a']:.3f} A = {w['rms_px']:.3f} px, "
        f"R = {w['resolving_power']:.0f}; S/N median {s['snr_median']:.0f}; "
        f"zero point {s['zero_point_shift_a']:+.3f} A"
    )
    from rpp_tasks.spectra.products import read_spectrum_1d

    spec = read_spectrum_1d(o["products"]["bess_fits"])
    t = night.truth
    disp = float(t.dispersion_coeffs[1])
    fwhm_a = t.line_fwhm_px * disp
    lo, hi = w["calibrated_range_a"]
    worst = 0.0
    from scipy.optimize import curve_fit

    for w0_, _ in t.metal_lines:
        if (
            not lo < w0_ < hi
            or min(abs(w0_ - v) for v, _ in t.metal_lines if v != w0_) < 4 * fwhm_a
        ):
            continue
        sel = np.abs(spec.wavelength_a - w0_) < 1.5 * fwhm_a
        cont = float(np.median(spec.flux[np.abs(spec.wavelength_a - w0_) < 5 * fwhm_a]))
        p, _ = curve_fit(
            lambda x, a, m, sg, c=cont: c * (1 - a * np.exp(-0.5 * ((x - m) / sg) ** 2)),
            spec.wavelength_a[sel],
            spec.flux[sel],
            p0=(0.2, w0_, fwhm_a / 2.35),
        )
        worst = max(worst, abs(p[1] - w0_) / disp)
    print(f"worst isolated absorption-line centre offset: {worst:.3f} px")
    print(json.dumps({"cpu_s": cpu, "wall_s": wall, "tasks": tasks, "steps": stages}))


if __name__ == "__main__":
    main()
