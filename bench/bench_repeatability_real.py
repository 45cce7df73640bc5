"""Repeatability of the real Seestar S50 M 94 pair (issue 11, items 3 and 7): no truth needed.

Reduces the two consecutive 10 s subs (11 s apart) with the ``seestar_s50`` configuration and
prints, per flux kind, the stars' frame-to-frame scatter against their reported errors
(`rpp_tasks.stages.photometry.repeatability`: 1 is honest, > 1 errors too small), with the PSF
model and the model-mismatch terms each frame's ``summary.json`` holds.

    .venv/bin/python bench/bench_repeatability_real.py [--code DIR] [--workdir /tmp/x]

``--code DIR``: import ``rpp_tasks`` (and its ``config``) from DIR instead (e.g. main's code from
``git archive``), to compare in one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

DATA = Path("/work/shared/data/real/seestar_s50")
STAMPS = ("212046", "212057")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", default=None, help="directory holding rpp_tasks/ to import")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--data", default=str(DATA))
    args = ap.parse_args(argv)
    if args.code:
        sys.path.insert(0, str(Path(args.code).resolve()))
    from astropy.table import Table

    import rpp_tasks
    from rpp_tasks.config import find_config
    from rpp_tasks.session import pipeline
    from rpp_tasks.stages.photometry import repeatability

    print(f"rpp_tasks from {Path(rpp_tasks.__file__).parent}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="seestar_rep_"))
    obs = find_config("seestar_s50")
    cats = []
    for stamp in STAMPS:
        path = Path(args.data) / f"Light_M94_10.0s_IRCUT_20250326-{stamp}.fit"
        s = pipeline.reduce_frame(path, obs, work / stamp)
        assert s["status"] == "ok", s.get("reason")
        cats.append(Table.read(s["catalog"]))
        summ = json.loads((work / stamp / "summary.json").read_text())
        ph = (summ.get("stages") or {}).get("photometry") or {}
        model = ph.get("psf_model") or {}
        fit = model.get("stats") or {}
        print(
            f"{stamp}: PSF model FWHM {model.get('fwhm_px')} px, order {model.get('order')}, "
            f"{model.get('n_stars')} of {fit.get('n_candidates')} PSF candidates kept, "
            f"chi2_red {fit.get('chi2_red')}; model_error_frac {ph.get('model_error_frac')}"
        )
    for kind in ("psf", "1p3fwhm", "1p1fwhm"):
        r = repeatability(cats, kind=kind)
        print(
            f"{kind:8s} scatter/error {r.ratio:.3f}  stars {r.n_stars}  "
            f"offset {r.frame_offsets_mag[1]:+.4f} mag"
        )
        for b in r.bins:
            if b["n_stars"]:
                print(
                    f"    S/N {b['snr_lo']:g}-{b['snr_hi']:g}: {b['n_stars']} stars, ratio "
                    f"{b['ratio']:.3f}, scatter {b['scatter_mag']:.4f} mag, "
                    f"reported {b['reported_mag']:.4f} mag"
                )


if __name__ == "__main__":
    main()
