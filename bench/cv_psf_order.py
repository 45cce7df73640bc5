# ruff: noqa: E501  (a diagnostic printout)
"""Does the field PSF's order generalise to stars it was not fitted on? (real12, issue 11)

`fit_field_psf` chooses the polynomial order by AIC over the PSF stars' pixels. On the Seestar
M 94 pair (30 undersampled stars a frame) order 1 lowers chi^2 by 400-700 in both frames, yet
the two frames' order-1 models (11 s apart, same real PSF) differ by up to 0.5 mag in their
aperture corrections across the frame. This script reduces frames with `reduce_frame`,
captures the exact inputs of `fit_field_psf`, and scores each order by K-fold cross-validation
over the PSF stars: the model of each order is fitted without one fold's stars (order forced,
``criterion="max"``), then those held-out stars are PSF-fitted (`psf_photometry`: their own
flux, sky and centre) and their summed chi^2 is the order's score. It also scores each frame's
model on the *other* frame's stars (the two frames see the same PSF).

    .venv/bin/python bench/cv_psf_order.py [--gain G] [--folds 5] [--synthetic]

``--synthetic``: the four frames of the synthetic undersampled session of
``tests/rpp_tasks/test_field_photometry.py`` (FWHM 1.1 px varying by 30 % towards the corners:
there order >= 1 must win).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

DATA = Path("/work/shared/data/real/seestar_s50")
STAMPS = ("212046", "212057")


def _config(work, gain):
    from rpp_tasks.config import find_config

    obs = find_config("seestar_s50")
    if gain is None:
        return obs
    src = Path(obs.source)
    copy = work / "config" / "observatories" / src.name
    copy.parent.mkdir(parents=True, exist_ok=True)
    (work / "config" / "defaults.yaml").write_bytes(
        (src.parent.parent / "defaults.yaml").read_bytes()
    )
    copy.write_text(
        re.sub(r"gain_e_per_adu: *[0-9.eE+-]+", f"gain_e_per_adu: {gain}", src.read_text())
    )
    return find_config(str(copy))


def _captured_reductions(paths, obs, work):
    """Reduce each frame; return the arguments `fit_field_psf` got and the model it made."""
    import rpp_tasks.stages.field_psf_fit as ffp
    from rpp_tasks.session import pipeline

    calls = []
    orig = ffp.fit_field_psf

    def spy(data_sub, sources, **kw):
        model = orig(data_sub, sources, **kw)
        calls.append((np.array(data_sub, copy=True), sources.copy(), dict(kw), model))
        return model

    ffp.fit_field_psf = spy
    try:
        for k, p in enumerate(paths):
            n0 = len(calls)
            s = pipeline.reduce_frame(p, obs, work / f"f{k}")
            assert s["status"] == "ok", s.get("reason")
            del calls[n0 + 1 :]  # the first PSF fit of each frame is the frame's model
    finally:
        ffp.fit_field_psf = orig
    return calls


def _heldout_chi2(call, model, star_xy):
    """Summed chi^2 and pixels of the stars at ``star_xy`` PSF-fitted with ``model``."""
    from rpp_tasks.stages.psf_phot import psf_photometry

    data, sources, kw, _ = call
    x = np.asarray(sources["x_centroid"], float)
    y = np.asarray(sources["y_centroid"], float)
    d, j = _nearest(np.column_stack([x, y]), star_xy)
    rows = sources[j[d < 1.5]]
    t = psf_photometry(
        data, kw["rms"], rows, model, gain_e_per_adu=kw["gain_e_per_adu"], exptime_s=10.0,
        mask=kw.get("mask"),
    )  # fmt: skip
    chi = np.asarray(t["chi2_psf"], float) * np.asarray(t["npix_psf"], float)
    ok = np.isfinite(chi)
    return float(np.sum(chi[ok])), int(np.sum(np.asarray(t["npix_psf"], float)[ok])), int(ok.sum())


def _nearest(a, b):
    from scipy.spatial import cKDTree

    return cKDTree(a).query(b)


def cross_validate(call, orders=(0, 1, 2), folds=5, seed=0):
    """K-fold CV score (held-out chi^2 / pixel) of each forced order, on one frame's PSF stars."""
    from rpp_tasks.stages.field_psf_fit import fit_field_psf

    data, sources, kw, model = call
    psf_xy = np.asarray(model.stats["psf_star_xy"], float)
    x = np.asarray(sources["x_centroid"], float)
    y = np.asarray(sources["y_centroid"], float)
    d, j = _nearest(np.column_stack([x, y]), psf_xy)
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(psf_xy)) % folds
    out = {}
    for order in orders:
        chi, npx, nst = 0.0, 0, 0
        for f in range(folds):
            drop = np.zeros(len(sources), bool)
            drop[j[fold == f]] = True
            kw2 = dict(kw, max_order=order, criterion="max")
            m = fit_field_psf(data, sources[~drop], **kw2)
            if m is None or m.order != order:
                chi = float("nan")
                break
            c, n, s = _heldout_chi2(call, m, psf_xy[fold == f])
            chi, npx, nst = chi + c, npx + n, nst + s
        out[order] = (chi, npx, nst)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gain", type=float, default=None)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="real12_cv_"))
    if args.synthetic:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "rpp_tasks"))
        paths, obs = _synthetic(work, args.gain if args.gain is not None else 0.13)
    else:
        obs = _config(work, args.gain)
        paths = [DATA / f"Light_M94_10.0s_IRCUT_20250326-{s}.fit" for s in STAMPS]
    print(
        f"gain {obs.camera.gain_e_per_adu} e-/ADU; {len(paths)} frames; {args.folds}-fold CV over the PSF stars"
    )
    calls = _captured_reductions(paths, obs, work)
    for k, call in enumerate(calls):
        model = call[3]
        tried = model.stats.get("orders_tried")
        print(
            f"frame {k}: chosen order {model.order}, {model.n_stars} PSF stars, FWHM {model.fwhm_px:.3f}; AIC "
            + ", ".join(f"o{t['order']} {t['bic']:.0f}" for t in tried)
        )
        cv = cross_validate(call, folds=args.folds)
        print(
            "   CV held-out chi^2 / pixel: "
            + ", ".join(
                f"order {o}: {c / max(n, 1):.4f} ({c:.0f} over {s} stars)"
                for o, (c, n, s) in cv.items()
            )
        )
    if len(calls) >= 2:
        # each frame's own-order model against the other frame's PSF stars
        from rpp_tasks.stages.field_psf_fit import fit_field_psf

        for k in range(len(calls) - 1):
            a, b = calls[k], calls[k + 1]
            xy_b = np.asarray(b[3].stats["psf_star_xy"], float)
            for order in (0, 1):
                m = fit_field_psf(a[0], a[1], **dict(a[2], max_order=order, criterion="max"))
                c, n, s = _heldout_chi2(b, m, xy_b)
                mb = fit_field_psf(b[0], b[1], **dict(b[2], max_order=order, criterion="max"))
                cb, nb, sb = _heldout_chi2(b, mb, xy_b)
                print(
                    f"frame {k}'s order-{order} model on frame {k + 1}'s {s} PSF stars: chi^2/pixel "
                    f"{c / max(n, 1):.4f} (their own frame's order-{order} model: {cb / max(nb, 1):.4f})"
                )


def _synthetic(work, gain):
    import test_field_photometry as tf

    from rpp_tasks.config import find_config

    paths = tf.undersampled_frames(work, 2)
    cfg = work / "synthetic.yaml"
    cfg.write_text(tf._UNDERSAMPLED_YAML.format(name="synthetic", gain=gain))
    return paths, find_config(str(cfg))


if __name__ == "__main__":
    main()
