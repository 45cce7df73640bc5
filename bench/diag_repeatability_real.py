# ruff: noqa: E501  (a diagnostic printout: long table rows)
"""Star-by-star diagnosis of the Seestar M 94 pair's repeatability (real12, issue 11).

Reads the two frames as `bench_repeatability_real.py --workdir W` reduced them (``W/212046``,
``W/212057``: ``catalog.fits`` and ``calibrated.fits``) and the raw Bayer mosaics, matches the
stars on pixels (a similarity transform fitted to the matched stars: the alt-az field rotation),
and prints for each common star the frame-to-frame magnitude difference of every flux kind

* as the catalogue reports it (PSF, 1.1 / 1.3 FWHM and fixed 5 px apertures, model-corrected),
* the apertures before their PSF-model aperture correction (``flux / apcorr``),
* model-free plain apertures (sep, r = 2, 3, 4 px, sky from an annulus of 6-10 px),

the difference of the two frames' aperture corrections, and what lies in the star's aperture
on the sensor: the hot / warm pixels of a sensor-fixed outlier map (pixels that stand out of
their 5x5 raw same-colour neighbourhood by > 8 sigma in *both* frames, while the stars move), the
brightest raw pixel in each frame, the local sky. Then the correlations that test each
hypothesis (gain sign, gradient, apcorr, sky, hot pixels).

    RPP_DATA_ROOT=$(mktemp -d) .venv/bin/python bench/bench_repeatability_real.py --workdir /tmp/real12_w
    .venv/bin/python bench/diag_repeatability_real.py --workdir /tmp/real12_w
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DATA = Path("/work/shared/data/real/seestar_s50")
STAMPS = ("212046", "212057")
MAG_K = 2.5 / np.log(10.0)


def _similarity(a, b):
    """Least-squares ``b -> a``: a = s R b + t; returns a function, rotation (deg), scale, t."""
    ca, cb = a.mean(0), b.mean(0)
    za = (a[:, 0] - ca[0]) + 1j * (a[:, 1] - ca[1])
    zb = (b[:, 0] - cb[0]) + 1j * (b[:, 1] - cb[1])
    m = np.sum(za * np.conj(zb)) / np.sum(np.abs(zb) ** 2)

    def f(p):
        z = (p[:, 0] - cb[0]) + 1j * (p[:, 1] - cb[1])
        w = m * z
        return np.column_stack([w.real + ca[0], w.imag + ca[1]])

    return f, np.degrees(np.angle(m)), abs(m), f(cb[None, :])[0] - cb


def _clipped_std(z):
    """The repeatability figure's estimator (`repeatability._robust_std`: 4-sigma clipped)."""
    from rpp_tasks.stages.repeatability import _robust_std

    return _robust_std(z)


def _hot_map(raw_a, raw_b, nsig=8.0):
    """Sensor pixels that are outliers of their same-colour 5x5 neighbourhood in both frames."""
    from scipy.ndimage import median_filter

    out = []
    for raw in (raw_a, raw_b):
        res = np.zeros_like(raw)
        for dy in (0, 1):
            for dx in (0, 1):
                sub = raw[dy::2, dx::2]
                med = median_filter(sub, size=5, mode="nearest")
                r = sub - med
                s = 1.4826 * np.median(np.abs(r - np.median(r)))
                res[dy::2, dx::2] = r / s
        out.append(res)
    return np.minimum(out[0], out[1]), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args(argv)
    import sep
    from astropy.io import fits
    from astropy.table import Table
    from scipy.spatial import cKDTree

    work = Path(args.workdir)
    cats, imgs, masks, raws = [], [], [], []
    for st in STAMPS:
        cats.append(Table.read(work / st / "catalog.fits"))
        with fits.open(work / st / "calibrated.fits") as h:
            imgs.append(np.ascontiguousarray(h[0].data, dtype=np.float64))
            masks.append(np.asarray(h[1].data) > 0)
        with fits.open(Path(args.data) / f"Light_M94_10.0s_IRCUT_20250326-{st}.fit") as h:
            raws.append(np.asarray(h[0].data, dtype=np.float64))

    def good(c):
        ok = np.isfinite(np.asarray(c["mag_psf"], float))
        for n in ("saturated", "blended", "near_edge"):
            ok &= ~np.asarray(c[n], bool)
        return ok

    xy = [
        np.column_stack([np.asarray(c["x_psf"], float), np.asarray(c["y_psf"], float)])
        for c in cats
    ]
    g = [good(c) for c in cats]
    # first pass: a pure shift from the bright stars, then a similarity transform (rotation)
    from rpp_tasks.stages.repeatability import _align_offset

    order = [
        np.argsort(np.where(g[k], np.asarray(cats[k]["mag_psf"], float), np.inf)) for k in (0, 1)
    ]
    d0 = _align_offset(
        xy[0][order[0]][g[0][order[0]]], xy[1][order[1]][g[1][order[1]]], max_shift_px=50
    )
    tree = cKDTree(xy[0])
    d, j = tree.query(xy[1] + d0, distance_upper_bound=1.5)
    hit = np.isfinite(d) & g[1]
    hit[hit] &= g[0][j[hit]]
    f, rot, scale, _ = _similarity(xy[0][j[hit]], xy[1][hit])
    d, j = tree.query(f(xy[1]), distance_upper_bound=1.0)
    hit = np.isfinite(d) & g[1]
    hit[hit] &= g[0][j[hit]]
    i1 = np.flatnonzero(hit)
    i0 = j[hit]
    f, rot, scale, _ = _similarity(xy[0][i0], xy[1][i1])
    res = f(xy[1][i1]) - xy[0][i0]
    print(f"shift (pure) frame2->frame1: ({d0[0]:+.2f}, {d0[1]:+.2f}) px (binned)")
    print(
        f"similarity: rotation {rot * 60:+.2f} arcmin, scale {scale:.5f}; {len(i0)} common stars; "
        f"position residual rms {np.sqrt(np.mean(np.sum(res**2, 1))):.3f} px"
    )
    ny, nx = imgs[0].shape
    ctr = np.array([nx / 2, ny / 2])
    mv = f(ctr[None, :])[0] - ctr
    print(
        f"  the field centre moves by ({mv[0]:+.2f}, {mv[1]:+.2f}) px; corner motion up to "
        f"{np.max(np.hypot(*(f(np.array([[0, 0], [nx, 0], [0, ny], [nx, ny]])) - np.array([[0, 0], [nx, 0], [0, ny], [nx, ny]])).T)):.2f} px"
    )

    # model-free apertures: plain sums, sky and its rms from a wide 3-sigma clipped annulus (6-10
    # px, beyond the stars' wings), errors = sky noise (aperture + annulus mean) + photon noise
    # of the star at gain G (1.0 = configured, 0.13 = sky level / rms^2 bound, 0.05)
    radii = (1.5, 2.0, 3.0, 4.0)
    gains = (1.0, 0.13, 0.05)
    free = []
    for k, idx in ((0, i0), (1, i1)):
        im = imgs[k]
        rows, errs_free = {}, {}
        bk, sd, nn = [], [], []
        for xx, yy in zip(xy[k][idx, 0], xy[k][idx, 1]):
            yg, xg = np.mgrid[
                max(0, int(yy) - 11) : int(yy) + 12, max(0, int(xx) - 11) : int(xx) + 12
            ]
            yg, xg = yg[yg < ny], xg[yg < ny]
            keep = (
                (xg < nx) & (np.hypot(xg - xx, yg - yy) >= 6) & (np.hypot(xg - xx, yg - yy) <= 10)
            )
            v = im[yg[keep], xg[keep]][~masks[k][yg[keep], xg[keep]]]
            for _ in range(5):
                m, s = np.median(v), 1.4826 * np.median(np.abs(v - np.median(v)))
                v = v[np.abs(v - m) < 3 * s]
            bk.append(np.mean(v))
            sd.append(np.std(v))
            nn.append(v.size)
        bk, sd, nn = np.array(bk), np.array(sd), np.array(nn)
        for r in radii:
            s, _, _ = sep.sum_circle(im, xy[k][idx, 0], xy[k][idx, 1], r, mask=masks[k], subpix=5)
            area = np.pi * r * r
            rows[r] = s - bk * area
            for gn in gains:
                errs_free[(r, gn)] = np.sqrt(
                    area * sd**2 * (1 + area / nn) + np.maximum(rows[r], 0) / gn
                )
        free.append((rows, bk, errs_free))

    def col(k, name, idx):
        return np.asarray(cats[k][name], float)[idx]

    kinds = ("psf", "1p1fwhm", "1p3fwhm", "fixed")
    dm = {}
    err = {}
    for kd in kinds:
        a = col(0, f"mag_{kd}", i0)
        b = col(1, f"mag_{kd}", i1)
        ea = col(0, f"mag_err_{kd}", i0)
        eb = col(1, f"mag_err_{kd}", i1)
        dm[kd] = b - a
        err[kd] = np.hypot(ea, eb)
    for kd in kinds[1:]:
        fa = col(0, f"flux_{kd}", i0) / col(0, f"apcorr_{kd}", i0)
        fb = col(1, f"flux_{kd}", i1) / col(1, f"apcorr_{kd}", i1)
        dm[f"raw_{kd}"] = -2.5 * np.log10(fb / fa)
        err[f"raw_{kd}"] = err[kd]
        dm[f"dapc_{kd}"] = 2.5 * np.log10(col(1, f"apcorr_{kd}", i1) / col(0, f"apcorr_{kd}", i0))
    for r in radii:
        fa, fb = free[0][0][r], free[1][0][r]
        with np.errstate(invalid="ignore", divide="ignore"):
            dm[f"free_r{r:g}"] = -2.5 * np.log10(fb / fa)
            for gn in gains:
                err[f"free_r{r:g}_g{gn:g}"] = MAG_K * np.hypot(
                    free[0][2][(r, gn)] / fa, free[1][2][(r, gn)] / fb
                )
    snr = np.minimum(col(0, "snr_psf", i0), col(1, "snr_psf", i1))
    sel = snr > 10
    # remove the frame offset (median over S/N > 10) per kind
    for k in dm:
        if not k.startswith("dapc"):
            dm[k] = dm[k] - np.nanmedian(dm[k][sel])
    print(f"\n{sel.sum()} common stars at S/N > 10 (of {len(i0)})")
    print("kind            robust-std(dm)  median|dm/err|-ratio (scatter/err, S/N>10)")
    for k in dm:
        if k.startswith("dapc"):
            continue
        v = dm[k][sel]
        s = 1.4826 * np.nanmedian(np.abs(v - np.nanmedian(v)))
        if k.startswith("free"):
            for gn in gains:
                z = v / err[f"{k}_g{gn:g}"][sel]
                print(
                    f"  {k:14s} {s:.4f} mag   gain {gn:4g}: scatter/error {_clipped_std(z):.3f} "
                    f"(MAD {1.4826 * np.nanmedian(np.abs(z - np.nanmedian(z))):.3f})"
                )
            continue
        z = v / err[k][sel]
        print(
            f"  {k:14s} {s:.4f} mag   scatter/error {_clipped_std(z):.3f} "
            f"(MAD {1.4826 * np.nanmedian(np.abs(z - np.nanmedian(z))):.3f})"
        )

    # the real PSF of each frame, model-free: concentration C = F(r 1.5) / F(r 4) of the stars at
    # S/N > 20 (the sub-pixel phases average out over the stars), whole frame and per half in x
    x0 = xy[0][i0, 0]
    bright = np.minimum(col(0, "snr_psf", i0), col(1, "snr_psf", i1)) > 20
    print("model-free concentration F(1.5 px) / F(4 px), S/N > 20 stars (median, its error):")
    for label, part in (
        ("all", bright),
        ("x < nx/2", bright & (x0 < nx / 2)),
        ("x > nx/2", bright & (x0 >= nx / 2)),
    ):
        cs = [free[k][0][1.5][part] / free[k][0][4.0][part] for k in (0, 1)]
        dc = cs[1] - cs[0]
        print(
            f"  {label:9s} n={part.sum():2d}: frame 1 {np.median(cs[0]):.3f}, frame 2 {np.median(cs[1]):.3f}; "
            f"paired difference {np.median(dc):+.3f} +- {1.2533 * np.std(dc) / np.sqrt(max(part.sum(), 1)):.3f}"
        )
    for k in (0, 1):
        print(
            f"  frame {k + 1} model: catalogue psf_fwhm_px median {np.nanmedian(col(k, 'psf_fwhm_px', (i0, i1)[k])):.3f}, "
            f"range {np.nanmin(col(k, 'psf_fwhm_px', (i0, i1)[k])):.2f}-{np.nanmax(col(k, 'psf_fwhm_px', (i0, i1)[k])):.2f}; "
            f"model fraction in r 1.5 / r 4 ~ 1 / apcorr ratio: "
            f"{np.nanmedian(col(k, 'apcorr_fixed', (i0, i1)[k]) / col(k, 'apcorr_1p3fwhm', (i0, i1)[k])):.3f} (1.3 FWHM vs 5 px)"
        )

    # the light each frame's model puts beyond 4 px (its wings, which the stars' pixels at S/N
    # 10-40 do not constrain: F(4 px) holds the core, so F(4) / flux_psf matches any model whose
    # core fits); the same star 11 s apart has the same wings, so the difference of the two
    # models' fractions is an error of the PSF fluxes and of every aperture correction
    import json

    from rpp_tasks.stages.field_psf import FieldPSF

    frac4 = []
    for k, idx in ((0, i0), (1, i1)):
        summ = json.loads((work / STAMPS[k] / "summary.json").read_text())
        mdl = FieldPSF.from_dict(summ["stages"]["photometry"]["psf_model"])
        frac4.append(mdl.aperture_fractions(xy[k][idx, 0], xy[k][idx, 1], {"r4": 4.0})["r4"])
        gx, gy = np.meshgrid(np.linspace(5, nx - 6, 12), np.linspace(5, ny - 6, 20))
        fg = mdl.aperture_fractions(gx.ravel(), gy.ravel(), {"r4": 4.0})["r4"]
        print(
            f"frame {k + 1} model: order {mdl.order}, fraction of the light inside 4 px: at the stars "
            f"{np.nanmin(frac4[k]):.3f}-{np.nanmax(frac4[k]):.3f}, over the frame {np.nanmin(fg):.3f}-{np.nanmax(fg):.3f}"
        )
    dwing = -2.5 * np.log10(frac4[1] / frac4[0])  # how much brighter frame 2's model makes a star
    ok = sel & np.isfinite(dwing)
    print(
        f"  the two models' difference at the same stars, 2.5 log10(f1 / f2): {np.nanmin(dwing[ok]):+.3f} .. "
        f"{np.nanmax(dwing[ok]):+.3f} mag; correlation with dm_psf r = {np.corrcoef(dwing[ok], dm['psf'][ok])[0, 1]:+.2f}"
    )
    for kd in ("psf", "1p3fwhm"):
        line = f"  {kd}: scatter/error {_clipped_std(dm[kd][sel] / err[kd][sel]):.3f}; dm_{kd} -/+ that difference:"
        for sgn in (-1, 1):
            v = dm[kd] + sgn * dwing
            v = v - np.nanmedian(v[sel])
            line += f" {_clipped_std(v[sel] / err[kd][sel]):.3f}"
            if sgn < 0:
                line += " /"
        print(line)
    for k, idx in ((0, i0), (1, i1)):
        r = col(k, "flux_psf", idx) / (col(k, "flux_fixed", idx) / col(k, "apcorr_fixed", idx))
        okk = sel & np.isfinite(r) & np.isfinite(frac4[k])
        print(
            f"  frame {k + 1}: flux_psf / uncorrected 5 px flux against the model's 4 px fraction: r = "
            f"{np.corrcoef(r[okk], frac4[k][okk])[0, 1]:+.2f}; median {np.median(r[okk]):.3f}"
        )

    # the catalogue's own fluxes with the star's photon noise re-weighted to gain G (the
    # configured 1.0 e-/ADU counts it 1/G times too small): isolates the gain from the model
    g_cat = float(cats[0].meta.get("gain_e_per_adu", 1.0))
    print(
        f"catalogue magnitudes (reduced at gain {g_cat:g}), errors with the star's photon noise at gain G:"
    )
    for kd in kinds:
        line = f"  {kd:8s}"
        for gn in gains:
            if gn > g_cat:
                continue
            ee = []
            for k, idx in ((0, i0), (1, i1)):
                fl = col(k, f"flux_{kd}", idx)
                fe = col(k, f"flux_err_{kd}", idx)
                fe = np.sqrt(fe**2 + np.maximum(fl, 0) * (1.0 / gn - 1.0 / g_cat))
                ee.append(MAG_K * fe / fl)
            z = dm[kd][sel] / np.hypot(ee[0], ee[1])[sel]
            line += f"   gain {gn:g}: {_clipped_std(z):.3f}"
        print(line)

    # hypotheses: correlations over S/N > 10
    x0, y0 = xy[0][i0, 0], xy[0][i0, 1]
    sky0, sky1 = free[0][1], free[1][1]
    err["free_r3"] = err["free_r3_g0.13"]
    err["free_r4"] = err["free_r4_g0.13"]
    print("\ncorrelations (S/N > 10) of dm_psf with:")
    tests = {
        "x": x0,
        "y": y0,
        "dapc_1p3fwhm": dm["dapc_1p3fwhm"],
        "dapc_fixed": dm["dapc_fixed"],
        "raw_fixed (uncorrected 5px)": dm["raw_fixed"],
        "free_r3 (model-free 3px)": dm["free_r3"],
        "free_r2 (model-free 2px)": dm["free_r2"],
        "local sky frame1": sky0,
        "d local sky": sky1 - sky0,
    }
    for name, v in tests.items():
        ok = sel & np.isfinite(v) & np.isfinite(dm["psf"])
        print(f"  {name:28s} r = {np.corrcoef(v[ok], dm['psf'][ok])[0, 1]:+.2f}")
    for kd in ("psf", "1p3fwhm", "fixed", "raw_fixed", "free_r2", "free_r3", "free_r4"):
        v = dm[kd]
        ok = sel & np.isfinite(v)
        A = np.column_stack([np.ones(ok.sum()), (x0[ok] - nx / 2) / nx, (y0[ok] - ny / 2) / ny])
        e = err[kd if kd in err else kd + "_g0.13"][ok]
        c, *_ = np.linalg.lstsq(A / e[:, None], v[ok] / e, rcond=None)
        chi0 = np.sum((v[ok] / e) ** 2) / ok.sum()
        chi1 = np.sum(((v[ok] - A @ c) / e) ** 2) / ok.sum()
        print(
            f"  plane fit {kd:10s}: slope x {c[1]:+.3f}, y {c[2]:+.3f} mag per frame; chi2/n {chi0:.2f} -> {chi1:.2f}"
        )

    # colour of each star from the raw mosaic (frame 1, 3 px aperture): (B - R) / (R + 2G + B)
    colour = []
    for xx, yy in zip(x0, y0):
        cx, cy = int(round(2 * xx + 0.5)), int(round(2 * yy + 0.5))
        sub = raws[0][max(cy - 6, 0) : cy + 6, max(cx - 6, 0) : cx + 6]
        bg = raws[0][max(cy - 20, 0) : cy + 20, max(cx - 20, 0) : cx + 20]
        ch = {}
        # GRBG: (0,0) G, (0,1) R, (1,0) B, (1,1) G (row 0 = first FITS row; the sum is phase-free)
        for name, (dy, dx) in (("G1", (0, 0)), ("R", (0, 1)), ("B", (1, 0)), ("G2", (1, 1))):
            oy, ox = (max(cy - 6, 0) + dy) % 2, (max(cx - 6, 0) + dx) % 2
            boy, box = (max(cy - 20, 0) + dy) % 2, (max(cx - 20, 0) + dx) % 2
            ch[name] = (
                sub[oy::2, ox::2].sum() - np.median(bg[boy::2, box::2]) * sub[oy::2, ox::2].size
            )
        tot = ch["R"] + ch["G1"] + ch["G2"] + ch["B"]
        colour.append((ch["B"] - ch["R"]) / tot)
    colour = np.array(colour)
    ok = sel & np.isfinite(colour)
    print(
        f"  colour (B-R)/L (raw, frame 1)   r = {np.corrcoef(colour[ok], dm['psf'][ok])[0, 1]:+.2f} "
        f"(range {np.percentile(colour[ok], 10):+.2f} .. {np.percentile(colour[ok], 90):+.2f})"
    )
    ok = sel & np.isfinite(dm["free_r2"])
    print(
        f"  free_r2 vs x                    r = {np.corrcoef(x0[ok], dm['free_r2'][ok])[0, 1]:+.2f}"
    )
    print(
        f"  local sky range over the stars: {sky0[sel].min():.0f} .. {sky0[sel].max():.0f} ADU (rms per px ~166)"
    )

    # cosmic rays: single-frame outliers far (> 8 raw px) from every catalogued source of either frame
    from scipy.ndimage import binary_dilation

    near = np.zeros_like(raws[0], bool)
    for k in (0, 1):
        xs = np.asarray(cats[k]["x_psf"], float)
        ys = np.asarray(cats[k]["y_psf"], float)
        okp = np.isfinite(xs) & np.isfinite(ys)
        near[
            np.clip((2 * ys[okp] + 0.5).astype(int), 0, near.shape[0] - 1),
            np.clip((2 * xs[okp] + 0.5).astype(int), 0, near.shape[1] - 1),
        ] = True
    near = binary_dilation(near, iterations=8)

    # hot pixels on the sensor
    hot, res_each = _hot_map(raws[0], raws[1])
    nh = int((hot > 8).sum())
    print(
        f"\nsensor-fixed outliers (> 8 sigma of the same-colour 5x5 median in both raw frames): {nh} px "
        f"({nh / hot.size * 1e6:.0f} per Mpx)"
    )
    for k in (0, 1):
        print(
            f"  frame {k + 1}: single-frame > 8 sigma outliers: {(res_each[k] > 8).sum()} px; in only this "
            f"frame (cosmic / moving): {((res_each[k] > 8) & (res_each[1 - k] < 3)).sum()} px"
        )

    for k in (0, 1):
        tr = (res_each[k] > 8) & (res_each[1 - k] < 3) & ~near
        print(
            f"  frame {k + 1}: one-frame > 8 sigma px away from sources (cosmic-like): {tr.sum()} "
            f"({tr.sum() / (~near).sum() * 1e6:.1f} per Mpx; a 3 px binned aperture covers 113 raw px: "
            f"expected hits per star {tr.sum() / (~near).sum() * 113:.3f})"
        )

    def aperture_content(k, idx, r=3.0):
        """Sensor-fixed hot px (count, excess ADU) and transient (one-frame) px inside r binned px."""
        out = []
        raw = raws[k]
        for xx, yy in zip(xy[k][idx, 0], xy[k][idx, 1]):
            # binned pixel (i, j) holds raw [2i:2i+2, 2j:2j+2]; pixel centres at integers
            x_lo, x_hi = int(np.floor(2 * (xx - r))), int(np.ceil(2 * (xx + r + 1)))
            y_lo, y_hi = int(np.floor(2 * (yy - r))), int(np.ceil(2 * (yy + r + 1)))
            x_lo, y_lo = max(x_lo, 0), max(y_lo, 0)
            sub_h = hot[y_lo:y_hi, x_lo:x_hi]
            yy_r, xx_r = np.mgrid[y_lo:y_hi, x_lo:x_hi]
            inside = np.hypot((xx_r + 0.5) / 2 - 0.5 - xx, (yy_r + 0.5) / 2 - 0.5 - yy) <= r
            hp = (sub_h > 8) & inside
            # excess of the hot pixels: their value in the OTHER frame minus the local same-colour median
            excess = float(np.sum(np.where(hp, res_each[1 - k][y_lo:y_hi, x_lo:x_hi], 0)))
            trans = (
                (res_each[k][y_lo:y_hi, x_lo:x_hi] > 8)
                & (res_each[1 - k][y_lo:y_hi, x_lo:x_hi] < 3)
                & inside
            )
            rawmax = float(raw[y_lo:y_hi, x_lo:x_hi][inside].max())
            out.append((int(hp.sum()), excess, int(trans.sum()), rawmax))
        return out

    # ADU excess of hot px: recompute in ADU (sigma units above -> ADU via the local MAD)
    cont = [aperture_content(0, i0), aperture_content(1, i1)]
    dev = np.abs(dm["psf"] / err["psf"])
    top = np.argsort(np.where(sel, -dev, np.inf))[: args.top]
    print(f"\nthe {args.top} most deviant stars (S/N > 10) by |dm_psf| / err:")
    print(
        "  x1     y1     x2     y2   dpos  S/N   dPSF  err   d1.1  d1.3  d5px | raw1.3 raw5px | free r2 r3 r4 | "
        "dapc1.3 dapc5 | sky1 dsky | hot1 hot2 cr1 cr2 | rawmax1 rawmax2"
    )
    for t in top:
        a, b = cont[0][t], cont[1][t]
        print(
            f"  {x0[t]:6.1f} {y0[t]:6.1f} {xy[1][i1[t], 0]:6.1f} {xy[1][i1[t], 1]:6.1f} {np.hypot(*res[t]):4.2f} {snr[t]:5.1f} "
            f"{dm['psf'][t]:+.3f} {err['psf'][t]:.3f} {dm['1p1fwhm'][t]:+.3f} {dm['1p3fwhm'][t]:+.3f} "
            f"{dm['fixed'][t]:+.3f} | {dm['raw_1p3fwhm'][t]:+.3f} {dm['raw_fixed'][t]:+.3f} | "
            f"{dm['free_r2'][t]:+.3f} {dm['free_r3'][t]:+.3f} {dm['free_r4'][t]:+.3f} | "
            f"{dm['dapc_1p3fwhm'][t]:+.3f} {dm['dapc_fixed'][t]:+.3f} | {sky0[t]:6.0f} {sky1[t] - sky0[t]:+5.0f} | "
            f"{a[0]:3d} {b[0]:3d} {a[2]:3d} {b[2]:3d} | {a[3]:6.0f} {b[3]:6.0f}"
        )
    nh_ap = np.array([c[0] for c in cont[0]]) + np.array([c[0] for c in cont[1]])
    print(
        f"\nstars (S/N>10) with a sensor-fixed hot pixel in either aperture: {(nh_ap[sel] > 0).sum()} of {sel.sum()}; "
        f"|dm/err| median with {np.median(dev[sel & (nh_ap > 0)]) if (sel & (nh_ap > 0)).any() else float('nan'):.2f}, "
        f"without {np.median(dev[sel & (nh_ap == 0)]):.2f}"
    )
    return dm, err, sel


if __name__ == "__main__":
    main()
