"""CPU cost of background, cosmic rays and master combination on 2048 x 2048 frames.

Run:  cd /work/main && .venv/bin/python bench/bench_calibration.py [--repeat 3] [--no-full]

CPU seconds are ``time.process_time()`` (all threads of the process; astroscrappy uses OpenMP,
so whole-frame L.A.Cosmic shows more CPU than wall time). Each measurement is repeated; the minimum
and the median are printed (the machine may be shared, the minimum is the least disturbed).
Quality numbers of the cosmic-ray step are printed too: fraction of injected cosmic-ray pixels
flagged, pixels flagged within 1 FWHM of a star centre and more than 2 px from any injected hit.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy import ndimage

from rpp_tasks.stages.background import estimate_background
from rpp_tasks.stages.calibration import combine_frames, make_master_flat
from rpp_tasks.stages.cosmics import clean_cosmic_rays


def _cpu(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return out, min(times), statistics.median(times)


def _star_cores(shape, x, y, fwhm):
    core = np.zeros(shape, dtype=bool)
    for xi, yi, f in zip(x, y, fwhm):
        r = int(np.ceil(f)) + 1
        x0, y0 = int(round(xi)), int(round(yi))
        sl = (
            slice(max(0, y0 - r), min(shape[0], y0 + r + 1)),
            slice(max(0, x0 - r), min(shape[1], x0 + r + 1)),
        )
        yy, xx = np.mgrid[sl]
        core[sl] |= (yy - yi) ** 2 + (xx - xi) ** 2 <= f**2
    return core


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--no-full", action="store_true", help="skip whole-frame L.A.Cosmic (~5-8 CPU-s)"
    )
    ap.add_argument("--n-frames", type=int, default=20, help="frames in the master combination")
    args = ap.parse_args(argv)

    from rpp_tasks.sim.synthetic import make_star_field

    field = make_star_field((2048, 2048), n_stars=2000, fwhm_px=3.0, n_cosmic_rays=100, seed=7)
    p = field.params
    print(
        f"field: 2048x2048, {len(field.truth)} stars (FWHM 3.0 px), "
        f"{p['n_cosmic_rays']} cosmic rays "
        f"({int(field.cr_mask.sum())} px), {int(field.hot_mask.sum())} hot px, "
        f"gain {p['gain_e_per_adu']} e-/ADU, read noise {p['read_noise_e']} e-"
    )

    res, mn, md = _cpu(lambda: estimate_background(field.data), args.repeat)
    print(
        f"background (sep, box 64, filter 3):   min {mn:.3f}  median {md:.3f} CPU-s   "
        f"median {res.global_median_adu:.1f} ADU, rms {res.global_rms_adu:.2f} ADU"
    )

    kw = dict(
        gain_e_per_adu=p["gain_e_per_adu"],
        read_noise_e=p["read_noise_e"],
        saturation_adu=p["saturation_adu"],
    )
    core = _star_cores(
        field.data.shape, field.truth["x"], field.truth["y"], np.full(len(field.truth), 3.0)
    )
    near = ndimage.binary_dilation(field.cr_mask | field.hot_mask, iterations=2)
    methods = ["tiled"] if args.no_full else ["tiled", "full"]
    for method in methods:
        rep = args.repeat if method == "tiled" else 1
        res, mn, md = _cpu(lambda m=method: clean_cosmic_rays(field.data, method=m, **kw), rep)
        rec = np.count_nonzero(res.mask & field.cr_mask) / field.cr_mask.sum()
        print(
            f"cosmics {method:5s}:                       min {mn:.3f}  median {md:.3f} CPU-s   "
            f"recovered {100 * rec:.1f}% of CR px, star-core px flagged "
            f"{np.count_nonzero(res.mask & core & ~near)}, flagged {res.n_pixels} px, "
            f"{res.n_tiles} cells = {100 * res.tile_fraction:.1f}% of frame"
        )

    rng = np.random.default_rng(0)
    n = args.n_frames
    frames = [(1000.0 + rng.normal(0, 10, (2048, 2048))).astype(np.float32) for _ in range(n)]
    for method in ("median", "mean"):
        _, mn, md = _cpu(
            lambda m=method: combine_frames(frames, method=m, clip_sigma=3.0), args.repeat
        )
        print(f"combine {n} x 2048^2 ({method:6s}, 3 sigma): min {mn:.3f}  median {md:.3f} CPU-s")
    bias = np.zeros((2048, 2048), np.float32)
    _, mn, md = _cpu(
        lambda: make_master_flat(
            frames, master_bias=bias, master_dark_rate=None, exptimes_s=[1.0] * n
        ),
        1,
    )
    print(f"make_master_flat {n} x 2048^2:        {mn:.3f} CPU-s (normalise + combine)")


if __name__ == "__main__":
    main()
