"""Plate-solving cases with known truth, shared by tests/rpp_tasks/test_platesolve.py and
bench/bench_skycal.py.

* `synthetic_case`: a field of 5-20 arcmin rendered (`rpp_tasks.sim.synthetic.make_star_field`,
  Moffat PSF, cosmic rays, hot pixels) from a Gaia-like sky (`gaia_sky`: power-law magnitudes to
  G = 20, colours), written without WCS and with a pointing hint off by several arcmin and a
  pixel-scale hint off by several per cent; the loopback Gaia answers with the sky.
* `real_case`: a real frame with its WCS removed. The loopback Gaia answers with a real,
  independent catalogue where one is installed (Tycho-2 stars of the astrometry.net index files,
  read with ``query-starkd``: Seestar NGC 7023), else (no Gaia offline for the Huntsman and Feder
  fields) with the frame's own stars (SEP, not our detection stage) placed on the sky by the
  frame's original WCS, their magnitudes scattered by 0.3 mag, 10 % dropped, and the rest of the
  cone filled with stars of the same brightness distribution and density plus fainter ones, so
  the matcher meets a sky as crowded as the real one.
* `wcs_error_arcsec`: RMS and max sky distance between two WCSs over a grid on the image.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

WCS_KEYS = (
    "CTYPE",
    "CRVAL",
    "CRPIX",
    "CDELT",
    "CROTA",
    "CD1_",
    "CD2_",
    "PC1_",
    "PC2_",
    "CUNIT",
    "A_",
    "B_",
    "AP_",
    "BP_",
    "EQUINOX",
    "LONPOLE",
    "LATPOLE",
    "WCSAXES",
    "RADESYS",
    "IMAGEW",
    "IMAGEH",
)
TYCHO2_INDEX = Path("/usr/share/astrometry/index-tycho2-07.littleendian.fits")


def strip_wcs(hdr: fits.Header) -> fits.Header:
    for k in list(hdr.keys()):
        if k.startswith(WCS_KEYS):
            hdr.remove(k, remove_all=True)
    return hdr


def wcs_error_arcsec(w_est, w_true, shape, n=12) -> tuple[float, float]:
    """(RMS, max) great-circle distance in arcsec between the two WCSs over an n x n pixel grid."""
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, n), np.linspace(0, ny - 1, n))
    r1, d1 = w_true.all_pix2world(gx.ravel(), gy.ravel(), 0)
    r2, d2 = w_est.all_pix2world(gx.ravel(), gy.ravel(), 0)
    from rpp_tasks.stages.catalogs import angular_sep_deg

    sep = np.asarray(angular_sep_deg(r1, d1, r2, d2)) * 3600.0
    return float(np.sqrt(np.mean(sep**2))), float(sep.max())


def offset_radec(ra, dec, dist_arcmin, pa_deg):
    """Point at ``dist_arcmin`` from (ra, dec) towards position angle ``pa_deg`` (small angles)."""
    d = dist_arcmin / 60.0
    dec2 = dec + d * math.cos(math.radians(pa_deg))
    ra2 = ra + d * math.sin(math.radians(pa_deg)) / math.cos(math.radians(dec))
    return ra2 % 360.0, dec2


def _disc(rng, ra0, dec0, radius_deg, n):
    r = radius_deg * np.sqrt(rng.uniform(0, 1, n))
    th = rng.uniform(0, 2 * np.pi, n)
    dec = dec0 + r * np.sin(th)
    return (ra0 + r * np.cos(th) / np.cos(np.radians(dec0))) % 360.0, dec


def _gaia_table(ra, dec, g, rng):
    bprp = rng.uniform(0.5, 1.8, len(ra))
    return Table(
        {
            "source_id": 5_000_000_000_000_000 + np.arange(len(ra), dtype=np.int64),
            "ra": np.asarray(ra, float),
            "dec": np.asarray(dec, float),
            "G": np.asarray(g, float),
            "BP": np.asarray(g, float) + 0.35 * bprp,
            "RP": np.asarray(g, float) - 0.65 * bprp,
        }
    )


def gaia_sky(ra0, dec0, radius_deg, *, density_per_deg2=3000.0, g_max=20.0, seed=0) -> Table:
    """Gaia-like cone: uniform positions, ``dN/dG ∝ 10**(0.3 G)`` from G = 8 to ``g_max``."""
    rng = np.random.default_rng(seed)
    n = int(density_per_deg2 * math.pi * radius_deg**2)
    ra, dec = _disc(rng, ra0, dec0, radius_deg, n)
    lo, hi = 10 ** (0.3 * 8.0), 10 ** (0.3 * g_max)
    g = np.log10(rng.uniform(lo, hi, n)) / 0.3
    return _gaia_table(ra, dec, g, rng)


@dataclass
class SolveCase:
    """A frame without WCS, its truth and the sky the loopback Gaia answers with."""

    name: str
    path: Path
    truth: object  # astropy WCS of the frame as written (after any binning by the reader)
    shape: tuple[int, int]
    sky: Table
    astrometry: dict = field(default_factory=dict)  # stages.astrometry overrides
    camera: dict = field(default_factory=dict)
    observatory: str | None = None  # config/observatories/<name>.yaml the case starts from
    stages: dict = field(default_factory=dict)  # other stages.* overrides
    hint_offset_arcmin: float = float("nan")
    note: str = ""


def synthetic_case(
    tmp: Path,
    fov_arcmin: float,
    *,
    scale_arcsec: float,
    rotation_deg: float = 0.0,
    flip: bool = False,
    hint: str = "RA/DEC",
    hint_offset_arcmin: float = 8.0,
    scale_error: float = 0.08,
    density_per_deg2: float = 3000.0,
    seed: int = 0,
) -> SolveCase:
    """
    A synthetic frame of ``fov_arcmin`` square without WCS, and its truth.

    ``hint`` says where the pointing hint is: ``"RA/DEC"`` (degrees), ``"OBJCTRA"`` (sexagesimal
    OBJCTRA/OBJCTDEC) or ``"target"`` (none in the header; OBJECT named in ``targets``). The
    pixel-scale hint is ``camera.pixel_scale_arcsec`` off by ``scale_error``.
    """
    from astropy.coordinates import Angle

    from rpp_tasks.inputs.wcs import header_wcs
    from rpp_tasks.sim.synthetic import make_star_field

    rng = np.random.default_rng(seed + 1000)
    ra0, dec0 = float(rng.uniform(20, 340)), float(rng.uniform(-60, 60))
    n = int(round(fov_arcmin * 60.0 / scale_arcsec))
    radius = fov_arcmin / 60.0 * 0.75 + hint_offset_arcmin / 60.0 + 20 / 60.0
    sky = gaia_sky(ra0, dec0, radius, density_per_deg2=density_per_deg2, seed=seed)
    # the camera's band differs from G: magnitudes scattered by 0.3 mag
    mag = np.asarray(sky["G"]) + rng.normal(0.0, 0.3, len(sky))
    fld = make_star_field(
        (n, n),
        stars=Table({"ra": sky["ra"], "dec": sky["dec"], "mag": mag}),
        psf="moffat",
        fwhm_px=3.2,
        beta=3.0,
        zero_point_mag=24.0,
        exptime_s=60.0,
        wcs_center_deg=(ra0, dec0),
        pixel_scale_arcsec=scale_arcsec,
        rotation_deg=rotation_deg,
        filter_name="V",
        object_name=f"FIELD-{seed}",
        seed=seed,
    )
    data, hdr = fld.data, fld.header.copy()
    truth = header_wcs(hdr).wcs
    if flip:  # mirror image (a diagonal, a Newtonian, a camera read out the other way)
        data = data[:, ::-1]
        from astropy.wcs import WCS

        flipped = WCS(naxis=2)
        flipped.wcs.ctype = list(truth.wcs.ctype)
        flipped.wcs.crval = list(truth.wcs.crval)
        flipped.wcs.crpix = [n + 1 - truth.wcs.crpix[0], truth.wcs.crpix[1]]
        flipped.wcs.cd = truth.pixel_scale_matrix @ np.diag([-1.0, 1.0])
        flipped.wcs.set()
        truth = flipped
    strip_wcs(hdr)
    for k in ("RA", "DEC", "OBJCTRA", "OBJCTDEC"):  # make_star_field writes the true centre
        hdr.remove(k, ignore_missing=True)
    pa = float(rng.uniform(0, 360))
    hra, hdec = offset_radec(ra0, dec0, hint_offset_arcmin, pa)
    astrometry = {"solvers": ["catalog"]}
    if hint == "RA/DEC":
        hdr["RA"], hdr["DEC"] = (round(hra, 5), "[deg] mount"), (round(hdec, 5), "[deg] mount")
    elif hint == "OBJCTRA":
        hdr["OBJCTRA"] = Angle(hra, "deg").to_string(unit="hour", sep=" ", precision=1)
        hdr["OBJCTDEC"] = Angle(hdec, "deg").to_string(unit="deg", sep=" ", precision=0)
    elif hint == "target":
        hdr["OBJECT"] = f"Field {seed}"
        astrometry["targets"] = {f"field_{seed}": [round(hra, 5), round(hdec, 5)]}
    else:
        raise ValueError(hint)
    path = tmp / f"synthetic_{fov_arcmin:g}arcmin.fits"
    fits.PrimaryHDU(data, hdr).writeto(path, overwrite=True)
    return SolveCase(
        name=f"synthetic {fov_arcmin:g}' ({n}x{n}, {scale_arcsec:g}\"/px, hint {hint})",
        path=path,
        truth=truth,
        shape=(n, n),
        sky=sky,
        astrometry=astrometry,
        camera={
            "gain_e_per_adu": 1.5,
            "read_noise_e": 8.0,
            "pixel_scale_arcsec": round(scale_arcsec * (1.0 + scale_error), 4),
        },
        hint_offset_arcmin=hint_offset_arcmin,
    )


# ----------------------------------------------------------------------------- real frames
def tycho2_cone(ra, dec, radius_deg, index=TYCHO2_INDEX) -> Table | None:
    """Tycho-2 stars (RA, Dec, VT) of an installed astrometry.net index file (``query-starkd``)."""
    exe = shutil.which("query-starkd")
    if exe is None or not Path(index).is_file():
        return None
    out = subprocess.run(
        [exe, "-T", "-r", f"{ra}", "-d", f"{dec}", "-R", f"{radius_deg}", str(index)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    rows = []
    for line in out.splitlines():  # "RA, Dec, MAG_VT" rows among "Searching ..." / "Got n results."
        try:
            rows.append([float(v) for v in line.split(",")])
        except ValueError:
            continue
    rows = [r for r in rows if len(r) == 3]
    if not rows:
        return None
    a = np.array(rows)
    rng = np.random.default_rng(7)
    return _gaia_table(a[:, 0], a[:, 1], a[:, 2] - 0.2, rng)


def image_star_sky(data, wcs, shape, centre, radius_deg, *, seed=0) -> Table:
    """The frame's own stars (SEP) on the sky through ``wcs``, in a cone filled like a real sky."""
    import sep

    rng = np.random.default_rng(seed)
    d = np.ascontiguousarray(data, dtype=np.float32)
    bkg = sep.Background(d)
    objs = sep.extract(d - bkg.back(), 5.0, err=bkg.globalrms, minarea=5)
    objs = objs[(objs["flux"] > 0) & (objs["flag"] == 0)]
    x, y = objs["x"], objs["y"]
    mag = 25.0 - 2.5 * np.log10(objs["flux"]) + rng.normal(0.0, 0.3, len(objs))
    keep = rng.uniform(0, 1, len(objs)) > 0.1
    ra, dec = wcs.all_pix2world(x[keep], y[keep], 0)
    mag = mag[keep]
    ny, nx = shape
    scale = math.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))
    area_field = nx * ny * scale**2
    density = len(objs) / area_field
    n_out = rng.poisson(density * (math.pi * radius_deg**2 - area_field))
    ra_o, dec_o = _disc(rng, centre[0], centre[1], radius_deg, n_out)
    px, py = wcs.all_world2pix(ra_o, dec_o, 0)
    out = (px < -2) | (px > nx + 1) | (py < -2) | (py > ny + 1)
    ra_o, dec_o = ra_o[out], dec_o[out]
    mag_o = rng.choice(mag, ra_o.size) + rng.normal(0, 0.1, ra_o.size)
    # fainter than the frame's limit, everywhere (Gaia goes deeper): twice the density
    n_f = rng.poisson(2 * density * math.pi * radius_deg**2)
    ra_f, dec_f = _disc(rng, centre[0], centre[1], radius_deg, n_f)
    mag_f = rng.uniform(mag.max() + 0.3, mag.max() + 2.0, n_f)
    return _gaia_table(
        np.concatenate([ra, ra_o, ra_f]),
        np.concatenate([dec, dec_o, dec_f]),
        np.concatenate([mag, mag_o, mag_f]),
        rng,
    )


REAL = {
    # name: (file, bayer pattern, hint note)
    "huntsman": ("huntsman/raw/science_0.fits", None),
    "seestar": ("seestar_s50/Light_NGC7023_10.0s_IRCUT_20240730-224459.fit", "GRBG"),
    "feder": ("feder_observatory/thumbnail-image.fit.gz", None),
}


def real_case(
    name: str, real_data: Path, tmp: Path, *, hint_offset_arcmin: float | None = None
) -> SolveCase | None:
    """A real frame with its WCS removed (None when its reference cannot be built here).

    ``hint_offset_arcmin``: replace the header pointing by the true centre moved this far (the
    Feder thumbnail is a 256x256 cut 25 arcmin from the pointing of the 4k frame it comes from)."""
    from rpp_tasks.inputs.header import normalize_header
    from rpp_tasks.inputs.reader import read_frame
    from rpp_tasks.inputs.wcs import header_wcs
    from rpp_tasks.stages.catalogs import angular_sep_deg

    rel, bayer = REAL[name]
    src = real_data / rel
    frame = read_frame(src, bayer_pattern=bayer) if bayer else read_frame(src)
    chk = header_wcs(frame.header)
    truth, shape = chk.wcs, frame.data.shape
    with fits.open(src) as h:
        hdr, data = h[0].header.copy(), h[0].data
    strip_wcs(hdr)
    if hint_offset_arcmin is not None:
        for k in ("OBJCTRA", "OBJCTDEC", "RA", "DEC"):
            hdr.remove(k, ignore_missing=True)
        ra_h, dec_h = offset_radec(chk.center_ra_deg, chk.center_dec_deg, hint_offset_arcmin, 60)
        hdr["RA"], hdr["DEC"] = round(ra_h, 5), round(dec_h, 5)
    suffix = "" if hint_offset_arcmin is None else f"_hint{hint_offset_arcmin:g}"
    out = tmp / (Path(rel).name.replace(".gz", "").replace(".fit", suffix + ".fit"))
    fits.PrimaryHDU(data, hdr).writeto(out, overwrite=True)
    meta_hint = normalize_header(hdr)
    hint = (meta_hint.ra_deg, meta_hint.dec_deg)
    off = float(angular_sep_deg(hint[0], hint[1], chk.center_ra_deg, chk.center_dec_deg)) * 60
    astrometry = {"solvers": ["catalog"]}
    camera, observatory, hint_error, stages = {}, None, 15.0, {}
    if name == "huntsman":
        observatory = "huntsman"
        note = "hint RA-MNT/DEC-MNT; scale from the config; reference: the frame's own stars"
    elif name == "seestar":
        observatory = "seestar_s50"
        note = "hint RA/DEC; scale from the config; reference: Tycho-2 (astrometry.net index)"
    else:
        if off > 15.0:
            hint_error = 30.0
            astrometry["hint_error_arcmin"] = hint_error
        # FWHM ~2 px: L.A.Cosmic takes the star cores for cosmic rays (as on the Seestar)
        stages = {"cosmics": {"enabled": False}, "detection": {"fwhm_guess_px": 2.0}}
        note = "scale XPIXSZ/FOCALLEN; reference: the frame's own stars"
    scale = chk.pixel_scale_arcsec
    radius = 0.5 * math.hypot(*shape) * scale * 1.2 / 3600.0 + hint_error / 60.0 + 0.05
    if name == "seestar":
        sky = tycho2_cone(hint[0], hint[1], radius)
        if sky is None:
            return None
    else:
        sky = image_star_sky(frame.data, truth, shape, hint, radius, seed=3)
    sky = sky[np.argsort(sky["G"])][:5000]  # what Gaia TAP answers: TOP 5000 ORDER BY G
    return SolveCase(
        name=f'{name} ({Path(rel).name}, {shape[1]}x{shape[0]}, {scale:.3g}"/px, '
        f"hint {off:.1f} arcmin)",
        path=out,
        truth=truth,
        shape=shape,
        sky=sky,
        astrometry=astrometry,
        camera=camera,
        observatory=observatory,
        stages=stages,
        hint_offset_arcmin=off,
        note=note,
    )


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def case_config(case: SolveCase, peer_url: str, cache_dir: Path, **astrometry):
    """Observatory config (the real observatory's YAML for real frames) with the Gaia services on
    the loopback peer."""
    import yaml

    from rpp_tasks.config import config_from_dict, default_config_dir

    cdir = default_config_dir()
    base = yaml.safe_load((cdir / "defaults.yaml").read_text())
    if case.observatory:
        base = _merge(
            base, yaml.safe_load((cdir / "observatories" / f"{case.observatory}.yaml").read_text())
        )
    over = {
        "observatory": "solvetest",
        "camera": case.camera,
        "stages": {
            **case.stages,
            "astrometry": {**case.astrometry, **astrometry},
            "transients": {"enabled": False},
        },
        "catalogs": {
            "services": {
                "gaia_tap": peer_url + "/tap",
                "ps1": peer_url + "/panstarrs",
                "skymapper": peer_url + "/skymapper",
            },
            "gaia_order": ["gaia_tap"],
            "enrichment": [],
            "cache_dir": str(cache_dir),
            "timeout_s": 5.0,
        },
    }
    return config_from_dict(_merge(base, over))
