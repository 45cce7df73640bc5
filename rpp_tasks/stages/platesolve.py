"""Plate solvers: a local astrometry.net on an x/y list, and asterism matching on a reference cone.

* `solve_field` runs ``solve-field`` on an x/y list of our detections (no image: fast), with scale
  and position hints and a hard timeout (``--cpulimit`` and a killed process group). Index files:
  the Debian packages ``astrometry-data-tycho2-07 … -10-19`` (Tycho-2, quads of 22 arcmin to 33
  deg: fields of ~30 arcmin and wider). For smaller fields a site downloads the 4100/5200-series
  index files covering its field size (``index-52xx`` from data.astrometry.net) into a folder and
  lists it in ``stages.astrometry.index_dirs``.
* `solve_with_catalog` solves a frame of any size against reference stars we already query and
  cache (Gaia around the pointing hint): triangle matching with the scale hint
  (`rpp_tasks.stages.asterism`), then a linear TAN fit on every matched star. It needs a pointing
  hint and an approximate pixel scale; blind solving is astrometry.net's job.

Both return a `SolveResult` and never raise for a field that does not solve.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rpp_tasks.stages.wcsfit import fit_tan_sip, tan_project

__all__ = ["SolveResult", "solve_field", "solve_with_catalog"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolveResult:
    """``status``: ``solved``, ``failed`` (with reason), ``timeout``, ``unavailable``, ``skipped``.

    ``method`` names the solver (``astrometry.net``, ``gaia-asterism``); ``details`` holds what the
    solver measured (matches, RMS, scale, rotation, significance), merged into `to_dict`.
    """

    wcs: object | None
    status: str
    reason: str | None = None
    wall_s: float = 0.0
    method: str = "astrometry.net"
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {
            "method": self.method,
            "status": self.status,
            "reason": self.reason,
            "wall_s": round(self.wall_s, 3),
        }
        out.update(self.details)
        return out


# =============================================================================== solve-field
def solve_field(
    x,
    y,
    flux,
    *,
    width: int,
    height: int,
    scale_arcsec: float | None = None,
    scale_tolerance: float = 0.2,
    ra_deg: float | None = None,
    dec_deg: float | None = None,
    radius_deg: float = 3.0,
    timeout_s: float = 30.0,
    index_dirs=(),
    max_stars: int = 200,
    solve_field_cmd: str = "solve-field",
) -> SolveResult:
    """
    Blind or hinted plate solution of an x/y list with a local astrometry.net.

    Parameters
    ----------
    x, y, flux : array_like
        0-based detection positions and fluxes (the brightest ``max_stars`` are used).
    width, height : int
        Image size in pixels.
    scale_arcsec : float, optional
        Pixel-scale hint; searched within ``±scale_tolerance`` (fraction). None: blind in scale.
    ra_deg, dec_deg, radius_deg : float, optional
        Position hint and search radius.
    timeout_s : float
        Hard limit: ``--cpulimit`` and the process group is killed after ``timeout_s + 5`` s.
    index_dirs : sequence of str
        Extra index folders (added to the system ``astrometry.cfg`` paths).

    Returns
    -------
    SolveResult
        ``unavailable`` when ``solve-field`` is not installed; never raises for a failed solve.
    """
    t0 = time.perf_counter()
    exe = shutil.which(solve_field_cmd)
    if exe is None:
        return SolveResult(
            None, "unavailable", "solve-field not installed (apt-get install astrometry.net)"
        )
    x, y, flux = (np.asarray(v, float) for v in (x, y, flux))
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux)
    order = np.argsort(-flux[ok])[:max_stars]
    xs, ys, fs = x[ok][order], y[ok][order], flux[ok][order]
    if xs.size < 5:
        return SolveResult(None, "failed", f"only {xs.size} stars to solve with")
    from astropy.io import fits
    from astropy.wcs import WCS

    with tempfile.TemporaryDirectory(prefix="rpp_solve_") as tmp:
        tmp = Path(tmp)
        xyl = tmp / "xy.fits"
        cols = [
            fits.Column(name="X", format="D", array=xs + 1.0),
            fits.Column(name="Y", format="D", array=ys + 1.0),
            fits.Column(name="FLUX", format="D", array=fs),
        ]
        fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(xyl)
        cmd = [
            exe,
            str(xyl),
            "--width",
            str(int(width)),
            "--height",
            str(int(height)),
            "--x-column",
            "X",
            "--y-column",
            "Y",
            "--sort-column",
            "FLUX",
            "--no-plots",
            "--overwrite",
            "--no-verify",
            "--crpix-center",
            "--tweak-order",
            "2",
            "--cpulimit",
            str(int(math.ceil(timeout_s))),
            "--dir",
            str(tmp),
            "--wcs",
            str(tmp / "out.wcs"),
            "--new-fits",
            "none",
            "--index-xyls",
            "none",
            "--rdls",
            "none",
            "--corr",
            "none",
            "--match",
            "none",
            "--solved",
            str(tmp / "solved"),
            "--temp-dir",
            str(tmp),
            "--axy",
            str(tmp / "xy.axy"),
        ]
        if scale_arcsec and scale_arcsec > 0:
            cmd += [
                "--scale-units",
                "arcsecperpix",
                "--scale-low",
                f"{scale_arcsec * (1 - scale_tolerance):.4f}",
                "--scale-high",
                f"{scale_arcsec * (1 + scale_tolerance):.4f}",
            ]
        if (
            ra_deg is not None
            and dec_deg is not None
            and np.isfinite(ra_deg)
            and np.isfinite(dec_deg)
        ):
            cmd += [
                "--ra",
                f"{ra_deg:.6f}",
                "--dec",
                f"{dec_deg:.6f}",
                "--radius",
                f"{radius_deg:.3f}",
            ]
        dirs = [str(d) for d in index_dirs if d]
        if dirs:
            cfg = tmp / "astrometry.cfg"
            base = Path("/etc/astrometry.cfg")
            text = (
                base.read_text()
                if base.is_file()
                else "autoindex\nadd_path /usr/share/astrometry\n"
            )
            cfg.write_text(text + "\n" + "".join(f"add_path {d}\n" for d in dirs) + "autoindex\n")
            cmd += ["--config", str(cfg)]
        log.debug("solve-field: %s", " ".join(cmd))
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            out, _ = proc.communicate(timeout=timeout_s + 5.0)
        except subprocess.TimeoutExpired:
            with _suppress():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return SolveResult(
                None,
                "timeout",
                f"solve-field did not finish within {timeout_s:g} s",
                time.perf_counter() - t0,
            )
        wcs_path = tmp / "out.wcs"
        if proc.returncode != 0 or not (tmp / "solved").exists() or not wcs_path.exists():
            tail = " ".join(out.decode(errors="replace").split()[-25:])
            why = (
                "no solution within the CPU limit"
                if "cpulimit" in tail.lower() or "time limit" in tail.lower()
                else f"no solution (exit {proc.returncode}): …{tail[-200:]}"
            )
            return SolveResult(None, "failed", why, time.perf_counter() - t0)
        with fits.open(wcs_path) as hdul:
            hdr = hdul[0].header.copy()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = WCS(hdr, relax=True)
    return SolveResult(w, "solved", None, time.perf_counter() - t0)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


# =============================================================================== catalogue
def _match_pixels(x, y, xr, yr, radius_px):
    """One-to-one (closest) pairs of detections and predicted reference positions within radius."""
    from scipy.spatial import cKDTree

    d, j = cKDTree(np.column_stack([x, y])).query(
        np.column_stack([xr, yr]), distance_upper_bound=radius_px
    )
    hit = np.flatnonzero(np.isfinite(d))
    hit = hit[np.argsort(d[hit])]
    _, first = np.unique(j[hit], return_index=True)
    ri = hit[first]
    return j[ri], ri, d[ri]


def solve_with_catalog(
    x,
    y,
    flux,
    ref_ra,
    ref_dec,
    ref_mag=None,
    *,
    width: int,
    height: int,
    scale_arcsec: float,
    ra_deg: float,
    dec_deg: float,
    scale_tolerance: float = 0.2,
    match_radius_px: float = 3.0,
    min_matches: int = 6,
    max_stars: int = 200,
    max_log10_false_alarm: float = -6.0,
    timeout_s: float = 30.0,
    method: str = "gaia-asterism",
) -> SolveResult:
    """
    Plate solution of a detection list against reference stars around a pointing hint.

    Parameters
    ----------
    x, y, flux : array_like
        0-based detection positions and fluxes.
    ref_ra, ref_dec : array_like
        Reference stars (deg, at the frame's epoch), e.g. a Gaia cone around the hint whose radius
        covers the field plus the hint's error.
    ref_mag : array_like, optional
        Their magnitudes (brightest are used first); the given order when omitted.
    width, height : int
        Image size in pixels.
    scale_arcsec : float
        Pixel-scale hint, good to ``±scale_tolerance`` (fraction).
    ra_deg, dec_deg : float
        Pointing hint (need not be the field centre).
    match_radius_px : float
        Matching radius for the verification and the fit (image pixels).
    min_matches, max_log10_false_alarm : int, float
        Acceptance (see `rpp_tasks.stages.asterism.match_asterisms`).
    timeout_s : float
        Work budget of the matcher.

    Returns
    -------
    SolveResult
        ``wcs`` a TAN WCS fitted to every matched star (CRPIX at the image centre); ``details``:
        ``n_matches``, ``rms_px``, ``scale_arcsec``, ``rotation_deg``, ``flipped``,
        ``log10_false_alarm``, ``n_hypotheses``, ``n_stars``, ``n_reference``.
    """
    from rpp_tasks.stages import asterism

    t0 = time.perf_counter()

    def fail(why, status="failed", **details):
        return SolveResult(None, status, why, time.perf_counter() - t0, method, details)

    if not (scale_arcsec and scale_arcsec > 0 and math.isfinite(scale_arcsec)):
        return fail("no pixel-scale hint", "skipped")
    if ra_deg is None or dec_deg is None or not (np.isfinite(ra_deg) and np.isfinite(dec_deg)):
        return fail("no pointing hint", "skipped")
    x, y, flux = (np.asarray(v, float) for v in (x, y, flux))
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux)
    order = np.flatnonzero(ok)[np.argsort(-flux[ok], kind="stable")][:max_stars]
    xs, ys = x[order], y[order]
    ra, dec = np.asarray(ref_ra, float), np.asarray(ref_dec, float)
    rok = np.isfinite(ra) & np.isfinite(dec)
    if ref_mag is not None:
        mag = np.asarray(ref_mag, float)
        rorder = np.flatnonzero(rok)[np.argsort(np.where(np.isfinite(mag), mag, 99.0)[rok])]
    else:
        rorder = np.flatnonzero(rok)
    ra, dec = ra[rorder], dec[rorder]
    from rpp_tasks.stages.catalogs import angular_sep_deg

    near = np.asarray(angular_sep_deg(ra_deg, dec_deg, ra, dec)) < 60.0
    ra, dec = ra[near], dec[near]
    if xs.size < 3 or ra.size < 3:
        return fail(f"{xs.size} detections and {ra.size} reference stars: too few to match")
    xi, eta = tan_project(ra, dec, ra_deg, dec_deg)
    # u grows to the west: a sky image seen directly (east left when north is up) is not flipped
    uv = np.column_stack([-xi, eta]) * 3600.0 / scale_arcsec
    m, why = asterism.match_asterisms(
        np.column_stack([xs, ys]),
        uv,
        shape=(height, width),
        scale_tolerance=scale_tolerance,
        match_radius_px=match_radius_px,
        min_matches=min_matches,
        max_log10_false_alarm=max_log10_false_alarm,
        time_budget_s=timeout_s,
    )
    if m is None:
        return fail(f"no asterism match: {why}", n_reference=int(ra.size))
    crpix0 = ((width - 1) / 2.0, (height - 1) / 2.0)
    di, ri = m.det_index, m.ref_index
    wcs = fit_tan_sip(
        xs[di],
        ys[di],
        ra[ri],
        dec[ri],
        crpix0=crpix0,
        crval0=(ra_deg, dec_deg),
        degree=1,
        weights=np.ones(di.size),
    )
    # grow: every detection against every reference star predicted in the frame, then refit
    for _ in range(3):
        xr, yr = wcs.wcs_world2pix(ra, dec, 0)
        inside = (xr > -5) & (xr < width + 5) & (yr > -5) & (yr < height + 5)
        idx = np.flatnonzero(inside)
        j_det, j_ref, _ = _match_pixels(xs, ys, xr[idx], yr[idx], match_radius_px)
        if j_det.size < max(min_matches, 3):
            break
        di, ri = j_det, idx[j_ref]
        wcs = fit_tan_sip(
            xs[di],
            ys[di],
            ra[ri],
            dec[ri],
            crpix0=crpix0,
            crval0=tuple(wcs.wcs.crval),
            degree=1,
            weights=np.ones(di.size),
        )
    fx, fy = wcs.wcs_world2pix(ra[ri], dec[ri], 0)
    rms_px = float(np.sqrt(np.mean((fx - xs[di]) ** 2 + (fy - ys[di]) ** 2)))
    scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)
    details = m.to_dict()
    details.update(
        n_matches=int(di.size),
        rms_px=round(rms_px, 4),
        scale_arcsec=round(scale, 6),
        n_reference=int(ra.size),
    )
    if abs(scale / scale_arcsec - 1.0) > scale_tolerance * 1.05:
        return fail(f"solution scale {scale:.4f} arcsec/px outside the hint's tolerance", **details)
    log.debug("catalogue solve: %s", details)
    return SolveResult(wcs, "solved", None, time.perf_counter() - t0, method, details)
