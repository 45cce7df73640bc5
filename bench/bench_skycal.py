"""Benchmark of the sky-calibration stages (issue 3).

* warm cache: CPU seconds of astrometry (refinement) + zero point + enrichment per frame, on a synthetic
  1024x1024 frame rendered from a sky that loopback Gaia/SIMBAD/SkyBoT/VizieR peers answer with
  (first run fills the cache, the timed runs need no network);
* plate solving: wall and CPU (solve-field children) of a hinted and of a blind solve of the real
  Seestar NGC 7023 frame (our detections as x/y list), and the centre offset vs its original WCS.

Run: ``.venv/bin/python bench/bench_skycal.py``
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "rpp_tasks"))


def warm_cache(n_runs=3):
    from astropy.io import fits
    from astropy.table import Table
    from service_peers import Peer, add_gaia_routes, make_sky, votable_bytes

    from rpp_tasks.config import config_from_dict
    from rpp_tasks.session import pipeline
    from rpp_tasks.sim.synthetic import make_star_field

    tmp = Path(tempfile.mkdtemp())
    sky = make_sky(150.0, 20.0, n=4000, radius_deg=0.3, seed=4, g_range=(12.5, 18.5))
    fld = make_star_field(
        (1024, 1024),
        stars=Table({"ra": sky["ra"], "dec": sky["dec"], "mag": sky["G"]}),
        fwhm_px=3.5,
        zero_point_mag=22.0,
        exptime_s=60.0,
        wcs_center_deg=(150.0, 20.0),
        filter_name="G",
        n_cosmic_rays=0,
        seed=5,
    )
    fits.PrimaryHDU(fld.data, fld.header).writeto(tmp / "f.fits")
    peer = Peer()
    add_gaia_routes(peer, sky)
    simbad = Table({"main_id": ["A"], "ra": [150.0], "dec": [20.0], "otype": ["*"]})
    peer.routes["/simbad/sync"] = lambda q, b, m: (200, "text/xml", votable_bytes(simbad))
    peer.routes["/skybot"] = lambda q, b, m: (
        200,
        "text/xml",
        votable_bytes(
            Table(
                {
                    "Name": ["X"],
                    "_RAJ2000": [150.01],
                    "_DECJ2000": [20.01],
                    "Class": ["MB"],
                    "Mv": [18.0],
                }
            )
        ),
    )
    obs = config_from_dict(
        {
            "observatory": "bench",
            "site": {"latitude_deg": 43.75, "longitude_deg": 6.92},
            "camera": {"gain_e_per_adu": 1.5, "read_noise_e": 8.0},
            "filters": {"aliases": {"G": "G"}},
            "stages": {"astrometry": {"solve": "never"}},
            "catalogs": {
                "services": {
                    "gaia_tap": peer.url + "/tap",
                    "simbad": peer.url + "/simbad",
                    "skybot": peer.url + "/skybot",
                    "vizier": peer.url + "/viz-bin/votable",
                },
                "cache_dir": str(tmp / "cache"),
            },
        }
    )
    rows = []
    for i in range(n_runs + 1):
        s = pipeline.reduce_frame(tmp / "f.fits", obs, tmp / f"out{i}")
        st = s["stages"]
        rows.append(
            {
                k: st[k]["cpu_s"]
                for k in ("astrometry", "zero_point", "enrich", "transients", "photometry")
            }
        )
        if i == 0:
            first = s
    peer.close()
    warm = rows[1:]
    med = {k: float(np.median([r[k] for r in warm])) for k in warm[0]}
    print(
        f"synthetic 1024x1024, {first['n_sources']} sources, {first['stages']['astrometry']['n_astrometric_matches']}"
        f" astrometric matches, rms {first['astrometric_rms_arcsec']} arcsec"
    )
    print("cold (first run, loopback network):", rows[0])
    print(
        "warm cache, median of", n_runs, "runs (CPU s):", {k: round(v, 3) for k, v in med.items()}
    )
    print(
        "refinement + zero point + enrichment, warm: %.3f CPU-s"
        % (med["astrometry"] + med["zero_point"] + med["enrich"])
    )


def solve(real=None):
    real = real or Path(os.environ.get("RPP_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
    from astropy.table import Table

    from rpp_tasks.config import find_config
    from rpp_tasks.inputs.reader import read_frame
    from rpp_tasks.inputs.wcs import header_wcs
    from rpp_tasks.session import pipeline
    from rpp_tasks.stages import astrometry, catalogs

    src = real / "seestar_s50/Light_NGC7023_10.0s_IRCUT_20240730-224459.fit"
    raw = read_frame(src, bayer_pattern="GRBG")
    orig = header_wcs(raw.header)
    tmp = Path(tempfile.mkdtemp())
    obs = find_config("seestar_s50")
    pipeline.reduce_frame(src, obs, tmp / "o", keep_intermediate=True)
    src_tab = Table.read(tmp / "o" / "sources.ecsv")
    ny, nx = raw.data.shape
    for label, kw in (
        (
            "hinted (scale +-20 %, RA/Dec pointing, 3 deg)",
            dict(scale_arcsec=4.78, ra_deg=raw.header["RA"], dec_deg=raw.header["DEC"]),
        ),
        ("blind (no scale, no position)", {}),
    ):
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = astrometry.solve_field(
            src_tab["x_centroid"],
            src_tab["y_centroid"],
            src_tab["flux"],
            width=nx,
            height=ny,
            timeout_s=60,
            **kw,
        )
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
        off = float("nan")
        if r.wcs is not None:
            ra, dec = r.wcs.all_pix2world([[(nx - 1) / 2, (ny - 1) / 2]], 0)[0]
            off = (
                float(catalogs.angular_sep_deg(ra, dec, orig.center_ra_deg, orig.center_dec_deg))
                * 3600
            )
        print(
            f"NGC 7023 {label}: {r.status}, wall {r.wall_s:.2f} s, solve-field CPU {cpu:.2f} s, "
            f"centre offset {off:.2f} arcsec"
        )


if __name__ == "__main__":
    warm_cache()
    solve()
