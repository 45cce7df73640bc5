"""CPU cost and fidelity of the photometry core (detection, FWHM, ePSF, aperture + PSF photometry).

Usage::

    .venv/bin/python bench/bench_photometry_core.py [--size 2048] [--nstars 2000]
        [--psf moffat|gaussian] [--fwhm 3.5] [--beta 3.0] [--seed 1]

Renders a pixel-integrated star field with an independent brute-force renderer (sub-pixel
sampling, no rpp_tasks code), adds sky Poisson + read noise and masked cosmic rays, then times
each function with ``time.process_time`` and compares with the truth:

* detection completeness for stars with true S/N > 10 (Cramer-Rao PSF S/N) and spurious fraction;
* FWHM error vs. truth;
* aperture (1.3 FWHM) and PSF flux bias, scatter / expected noise, and error honesty
  (reported error / measured scatter), per magnitude bin, for the one-PSF ePSF and for the field
  PSF model of the pipeline (`rpp_tasks.stages.field_psf_fit.fit_field_psf`, order 0 on these
  fields).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from scipy.spatial import cKDTree


def render(shape, x, y, flux, fwhm, beta=None, over=6, half=None):
    """Brute-force pixel-integrated Gaussian/Moffat stars (unit profile normalised analytically)."""
    ny, nx = shape
    img = np.zeros(shape)
    half = half or int(math.ceil(5 * fwhm))
    s = (np.arange(over) + 0.5) / over - 0.5
    if beta is None:
        sig = fwhm / (2 * math.sqrt(2 * math.log(2)))

        def prof(r2):
            return np.exp(-0.5 * r2 / sig**2) / (2 * math.pi * sig**2)
    else:
        alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))

        def prof(r2):
            return (beta - 1) / (math.pi * alpha**2) * (1 + r2 / alpha**2) ** (-beta)

    k = np.arange(-half, half + 1)
    for xi, yi, fi in zip(x, y, flux):
        ix, iy = int(round(xi)), int(round(yi))
        px = ix + k
        py = iy + k
        ddx = (px[None, :, None, None] + s[None, None, None, :]) - xi
        ddy = (py[:, None, None, None] + s[None, None, :, None]) - yi
        st = prof(ddx**2 + ddy**2).mean(axis=(2, 3)) * fi
        y0, y1 = max(py[0], 0), min(py[-1] + 1, ny)
        x0, x1 = max(px[0], 0), min(px[-1] + 1, nx)
        if y1 > y0 and x1 > x0:
            img[y0:y1, x0:x1] += st[y0 - py[0] : y1 - py[0], x0 - px[0] : x1 - px[0]]
    return img


def make_field(size, nstars, *, fwhm, beta, sky_adu=800.0, gain=1.5, rn_e=8.0, n_cr=300, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-3, size + 2, nstars)
    y = rng.uniform(-3, size + 2, nstars)
    # power-law luminosity function, more faint than bright stars
    flux = 10 ** rng.uniform(2.6, 5.4, nstars) * rng.uniform(0.5, 1.0, nstars)
    clean = render((size, size), x, y, flux, fwhm, beta)
    noisy = (
        rng.poisson((clean + sky_adu) * gain) / gain
        + rng.normal(0, rn_e / gain, clean.shape)
        - sky_adu
    )
    mask = np.zeros(clean.shape, bool)
    cy = rng.integers(0, size, n_cr)
    cx = rng.integers(0, size, n_cr)
    for yy, xx in zip(cy, cx):
        noisy[yy, xx] += rng.uniform(500, 5000)
        mask[yy, xx] = True
        if rng.random() < 0.5 and xx + 1 < size:
            noisy[yy, xx + 1] += rng.uniform(200, 2000)
            mask[yy, xx + 1] = True
    rms = np.full(clean.shape, math.sqrt(sky_adu / gain + (rn_e / gain) ** 2), np.float32)
    return (
        noisy.astype(np.float32),
        rms,
        mask,
        dict(x=x, y=y, flux=flux, sky=sky_adu, gain=gain, rn=rn_e),
    )


def cramer_rao(truth, fwhm, beta, rms):
    """Cramer-Rao flux error of PSF photometry for each truth star (isolated, known position)."""
    from rpp_tasks.stages.psf import pixel_integrated_profile

    half = int(math.ceil(6 * fwhm))
    k = np.arange(-half, half + 1, dtype=float)
    out = np.empty(truth["flux"].size)
    for i, (xi, yi, fi) in enumerate(zip(truth["x"], truth["y"], truth["flux"])):
        fx = xi - round(xi)
        fy = yi - round(yi)
        p = pixel_integrated_profile(
            k[None, :] - fx, k[:, None] - fy, fwhm_px=fwhm, beta=math.inf if beta is None else beta
        )
        var = rms**2 + fi * p / truth["gain"]
        out[i] = 1.0 / math.sqrt(np.sum(p * p / var))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--nstars", type=int, default=2000)
    ap.add_argument("--psf", default="moffat")
    ap.add_argument("--fwhm", type=float, default=3.5)
    ap.add_argument("--beta", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    beta = None if args.psf == "gaussian" else args.beta

    from rpp_tasks.stages.detection import detect_sources
    from rpp_tasks.stages.epsf import build_epsf
    from rpp_tasks.stages.photometry import aperture_photometry, psf_photometry, quality_flags
    from rpp_tasks.stages.psf import measure_fwhm

    t = time.process_time()
    data, rms, mask, truth = make_field(
        args.size, args.nstars, fwhm=args.fwhm, beta=beta, seed=args.seed
    )
    print(
        f"field {args.size}^2, {args.nstars} stars, psf={args.psf} fwhm={args.fwhm} beta={beta}: "
        f"rendered in {time.process_time() - t:.1f} CPU-s"
    )
    gain = truth["gain"]
    cpu = {}

    t = time.process_time()
    src = detect_sources(data, rms, fwhm_px=args.fwhm, mask=mask)
    cpu["detect_sources"] = time.process_time() - t
    t = time.process_time()
    fw = measure_fwhm(data, src, rms=rms, mask=mask, saturation_adu=60000)
    cpu["measure_fwhm"] = time.process_time() - t
    t = time.process_time()
    epsf = build_epsf(data, src, fwhm_px=fw.fwhm_px, rms=rms, mask=mask, saturation_adu=60000)
    cpu["build_epsf"] = time.process_time() - t
    t = time.process_time()
    tab = aperture_photometry(
        data,
        rms,
        src,
        fwhm_px=fw.fwhm_px,
        fixed_radius_px=8.0,
        gain_e_per_adu=gain,
        exptime_s=60.0,
        mask=mask,
    )
    cpu["aperture_photometry"] = time.process_time() - t
    t = time.process_time()
    tab = psf_photometry(data, rms, tab, epsf, gain_e_per_adu=gain, exptime_s=60.0, mask=mask)
    cpu["psf_photometry"] = time.process_time() - t
    t = time.process_time()
    tab = quality_flags(tab, saturation_adu=60000, shape=data.shape, fwhm_px=fw.fwhm_px)
    cpu["quality_flags"] = time.process_time() - t
    # the PSF model of the pipeline (varying across the field; one PSF here, so order 0)
    from rpp_tasks.stages.field_psf_fit import fit_field_psf

    t = time.process_time()
    fpsf = fit_field_psf(data, src, rms=rms, mask=mask, gain_e_per_adu=gain, saturation_adu=60000)
    cpu["fit_field_psf"] = time.process_time() - t
    t = time.process_time()
    tab_f = psf_photometry(data, rms, tab, fpsf, gain_e_per_adu=gain, exptime_s=60.0, mask=mask)
    cpu["psf_photometry (FieldPSF)"] = time.process_time() - t
    tab["flux_psf_field"] = tab_f["flux_psf"]
    tab["flux_err_psf_field"] = tab_f["flux_err_psf"]
    print("CPU seconds (time.process_time):")
    for k, v in cpu.items():
        print(f"  {k:22s} {v:7.3f}")
    print(f"  {'total':22s} {sum(cpu.values()):7.3f}")

    print(
        f"field PSF model: order {fpsf.order}, FWHM {fpsf.fwhm_px:.4f} px, beta {fpsf.beta:.3f}, "
        f"{fpsf.n_stars} stars"
    )
    print(
        f"FWHM: measured {fw.fwhm_px:.4f} +- {fw.fwhm_err_px:.4f} px (truth {args.fwhm}), "
        f"error {100 * (fw.fwhm_px / args.fwhm - 1):+.2f}%, beta {fw.beta:.2f}, "
        f"e {fw.ellipticity:.3f}, "
        f"n {fw.n_stars}; ePSF from {epsf.n_stars} stars"
    )

    # --- detection fidelity
    sigma_cr = cramer_rao(truth, args.fwhm, beta, float(rms[0, 0]))
    snr_true = truth["flux"] / sigma_cr
    inside = (
        (truth["x"] > 2)
        & (truth["y"] > 2)
        & (truth["x"] < args.size - 3)
        & (truth["y"] < args.size - 3)
    )
    tt = cKDTree(np.column_stack([truth["x"], truth["y"]]))
    dist, idx = tt.query(np.column_stack([tab["x_centroid"], tab["y_centroid"]]))
    matched = dist < 1.5
    n_spur = int((~matched).sum())
    ts = cKDTree(np.column_stack([tab["x_centroid"], tab["y_centroid"]]))
    dt, _ = ts.query(np.column_stack([truth["x"], truth["y"]]))
    found = dt < 1.5
    hi = inside & (snr_true > 10)
    print(
        f"detection: {len(tab)} sources; "
        f"spurious {n_spur} ({100 * n_spur / max(len(tab), 1):.2f}%); "
        f"completeness S/N>10: {100 * found[hi].mean():.2f}% of {hi.sum()}; "
        f"S/N 5-10: {100 * found[inside & (snr_true > 5) & (snr_true <= 10)].mean():.1f}%"
    )

    # --- photometric fidelity on matched, isolated stars (no truth neighbour within 4 FWHM)
    dd, _ = tt.query(np.column_stack([truth["x"], truth["y"]]), k=2)
    isolated_truth = dd[:, 1] > 4 * args.fwhm
    m = matched & isolated_truth[idx] & inside[idx]
    ftrue = truth["flux"][idx[m]]
    rms0 = float(rms[0, 0])
    print("photometry (isolated matched stars), per S/N bin: ratio = flux/true - 1")
    r13 = 1.3 * fw.fwhm_px
    # only for the enclosed energy of the truth PSF
    from rpp_tasks.stages.psf import pixel_integrated_profile

    kk = np.arange(-int(r13) - 2, int(r13) + 3, dtype=float)
    # enclosed energy of the 1.3 FWHM aperture (centred star), for the aperture bias
    sub = (np.arange(10) + 0.5) / 10 - 0.5
    xx = kk[None, :, None, None] + sub[None, None, None, :]
    yy = kk[:, None, None, None] + sub[None, None, :, None]
    inap = ((xx**2 + yy**2) <= r13**2).mean(axis=(2, 3))
    prof = pixel_integrated_profile(
        kk[None, :], kk[:, None], fwhm_px=args.fwhm, beta=math.inf if beta is None else beta
    )
    ee = float(np.sum(inap * prof))
    n_ann = tab["n_annulus"][m]
    area = math.pi * r13**2
    exp_ap = np.sqrt(ee * ftrue / gain + area * rms0**2 + area**2 * rms0**2 / n_ann)
    exp_psf = sigma_cr[idx[m]]
    fields = [
        (
            "aperture 1p3fwhm",
            tab["flux_1p3fwhm"][m] / ee,
            tab["flux_err_1p3fwhm"][m] / ee,
            exp_ap / ee,
        ),
        ("psf", tab["flux_psf"][m], tab["flux_err_psf"][m], exp_psf),
        ("psf (FieldPSF)", tab["flux_psf_field"][m], tab["flux_err_psf_field"][m], exp_psf),
    ]
    bins = [(10, 30), (30, 100), (100, 300), (300, 1e9)]
    snr_m = snr_true[idx[m]]
    for name, f, e, expct in fields:
        print(
            f"  {name}  (aperture fluxes divided by the enclosed energy {ee:.4f})"
            if "aper" in name
            else f"  {name}"
        )
        for lo, hi_ in bins:
            b = (snr_m > lo) & (snr_m <= hi_) & np.isfinite(f)
            if b.sum() < 10:
                continue
            dev = (f[b] - ftrue[b]) / ftrue[b]
            norm = (f[b] - ftrue[b]) / expct[b]
            rep = (f[b] - ftrue[b]) / e[b]
            print(
                f"    S/N {lo:>4}-{hi_:<6g} n={b.sum():4d} bias {np.median(dev) * 100:+.3f}%  "
                f"scatter/expected {np.std(norm):.3f}  scatter/reported {np.std(rep):.3f}  "
                f"scatter {1.0857 * np.std(dev):.4f} mag"
            )
    q = tab["quality"]
    print(
        f"quality: good {np.sum(q == 'good')}, marginal {np.sum(q == 'marginal')}, "
        f"poor {np.sum(q == 'poor')}; "
        f"blended {int(np.sum(tab['blended']))}, near_edge {int(np.sum(tab['near_edge']))}"
    )


if __name__ == "__main__":
    main()
