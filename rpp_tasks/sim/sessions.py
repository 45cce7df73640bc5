"""Synthetic cameras, calibration frames and whole sessions on disk, written like an observatory
writes them.

make_camera gives a camera's bias, dark current, flat response and defects; make_calibration_frames
renders bias, dark and flat frames of it; write_synthetic_session writes a night's science frames
(from rpp_tasks.sim.synthetic.make_star_field) and calibration frames as 16-bit FITS with the
headers of real camera software, and returns the truth.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from rpp_tasks.sim.synthetic import (
    SyntheticCamera,
    _add_cosmic_rays,
    _base_header,
    _draw_magnitudes,
    _make_wcs,
    _scaled_default,
    make_star_field,
)

__all__ = ["make_camera", "make_calibration_frames", "write_synthetic_session"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Public: camera, calibration frames, session
# --------------------------------------------------------------------------------------------


def make_camera(
    shape=(512, 512),
    *,
    gain_e_per_adu=1.5,
    read_noise_e=8.0,
    saturation_adu=60000.0,
    bias_level_adu=1000.0,
    bias_column_rms_adu=2.0,
    bias_gradient_adu=5.0,
    dark_current_e_per_s=0.02,
    n_hot_pixels=None,
    hot_current_e_per_s=(2.0, 200.0),
    vignetting_frac=0.15,
    prnu_frac=0.01,
    n_dust=2,
    seed=0,
) -> SyntheticCamera:
    """
    A fixed detector: bias pattern, dark current with hot pixels, flat-field response.

    Parameters
    ----------
    bias_level_adu, bias_column_rms_adu, bias_gradient_adu : float
        Bias = level + a per-column offset (Gaussian, this rms) + a linear ramp along y of this
        total amplitude.
    dark_current_e_per_s : float
        Uniform dark current; ``n_hot_pixels`` (default 200 per megapixel) get a current drawn
        log-uniformly in ``hot_current_e_per_s``.
    vignetting_frac : float
        Response drop from the optical axis (image centre) to the corners, quadratic in radius.
    prnu_frac : float
        Pixel-to-pixel response rms.
    n_dust : int
        Dust donuts: rings 12-25 px in radius, 3 % deep.
    seed : int
        Seed; the camera of a session is the same for all its frames.
    """
    ny, nx = (int(shape[0]), int(shape[1]))
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    bias = (
        bias_level_adu
        + rng.normal(0.0, bias_column_rms_adu, nx)[None, :]
        + bias_gradient_adu * (yy / max(ny - 1, 1) - 0.5)
    )
    dark = np.full((ny, nx), float(dark_current_e_per_s))
    n_hot = _scaled_default(n_hot_pixels, 200.0, (ny, nx))
    hot_mask = np.zeros((ny, nx), dtype=bool)
    if n_hot > 0:
        idx = rng.choice(ny * nx, size=min(n_hot, ny * nx), replace=False)
        lo, hi = hot_current_e_per_s
        dark.flat[idx] = np.exp(rng.uniform(math.log(lo), math.log(hi), idx.size))
        hot_mask.flat[idx] = True
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (cx**2 + cy**2)
    response = (1.0 - vignetting_frac * r2) * (1.0 + rng.normal(0.0, prnu_frac, (ny, nx)))
    for _ in range(int(n_dust)):
        dx0, dy0 = rng.uniform(0.1 * nx, 0.9 * nx), rng.uniform(0.1 * ny, 0.9 * ny)
        rad = rng.uniform(12.0, 25.0)
        d = np.hypot(xx - dx0, yy - dy0)
        response *= 1.0 - 0.03 * np.exp(-0.5 * ((d - 0.7 * rad) / (0.25 * rad)) ** 2)
    response /= np.median(response)
    return SyntheticCamera(
        shape=(ny, nx),
        gain_e_per_adu=float(gain_e_per_adu),
        read_noise_e=float(read_noise_e),
        saturation_adu=float(saturation_adu),
        bias_adu=bias.astype(np.float32),
        dark_e_per_s=dark.astype(np.float32),
        flat_response=response.astype(np.float32),
        hot_mask=hot_mask,
    )


def make_calibration_frames(
    camera,
    kind,
    *,
    n=5,
    exptime_s=None,
    flat_level_adu=(30000.0, 15000.0),
    filter_name="V",
    date_obs="2025-01-15T17:00:00.000",
    cadence_s=None,
    cosmic_rate_per_mpx_s=0.2,
    seed=0,
) -> list[tuple[np.ndarray, fits.Header]]:
    """
    Raw calibration frames of a `SyntheticCamera`.

    Parameters
    ----------
    kind : {"bias", "dark", "flat"}
        Bias: bias map + read noise (``EXPTIME=0``). Dark: + Poisson dark current (hot pixels)
        over ``exptime_s`` (default 60 s) + cosmic rays. Flat: twilight flats, the response times a
        level falling geometrically from ``flat_level_adu[0]`` to ``[1]`` over the ``n`` frames,
        Poisson noise, dark current, cosmic rays (default ``exptime_s`` 3 s).
    n : int
        Number of frames.
    date_obs, cadence_s : str, float
        Start of the first frame; frames follow every ``exptime_s + cadence_s`` (default 10 s).

    Returns
    -------
    frames : list of (data, header)
        float32 ADU clipped to ``[0, saturation_adu]``, headers with IMAGETYP ``'Bias Frame'``,
        ``'Dark Frame'`` or ``'Flat Field'``.
    """
    from astropy.time import Time, TimeDelta

    if kind not in ("bias", "dark", "flat"):
        msg = f"kind must be 'bias', 'dark' or 'flat', got {kind!r}"
        raise ValueError(msg)
    if n < 0:
        msg = f"n must be >= 0, got {n}"
        raise ValueError(msg)
    if exptime_s is None:
        exptime_s = {"bias": 0.0, "dark": 60.0, "flat": 3.0}[kind]
    rng = np.random.default_rng(seed)
    ny, nx = camera.shape
    g = camera.gain_e_per_adu
    t0 = Time(date_obs, scale="utc")
    step = float(exptime_s) + (10.0 if cadence_s is None else float(cadence_s))
    imagetyp = {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field"}[kind]
    frames = []
    for i in range(n):
        expected_e = (
            np.zeros((ny, nx)) if kind == "bias" else camera.dark_e_per_s.astype(float) * exptime_s
        )
        if kind == "flat":
            lo, hi = flat_level_adu
            level = lo * (hi / lo) ** (i / max(n - 1, 1))
            expected_e = expected_e + camera.flat_response * level * g
        e = (
            rng.poisson(expected_e).astype(np.float32)
            if kind != "bias"
            else np.zeros((ny, nx), np.float32)
        )
        e += rng.standard_normal((ny, nx), dtype=np.float32) * np.float32(camera.read_noise_e)
        data = e / np.float32(g) + camera.bias_adu
        if kind != "bias":
            n_cr = int(round(cosmic_rate_per_mpx_s * ny * nx / 1e6 * max(exptime_s, 0.0)))
            data += _add_cosmic_rays(rng, (ny, nx), n_cr, g)[0]
        np.clip(data, 0.0, camera.saturation_adu, out=data)
        date = (t0 + TimeDelta(i * step, format="sec")).isot
        hdr = _base_header(
            ny,
            nx,
            imagetyp=imagetyp,
            exptime_s=exptime_s,
            date_obs=date,
            gain=g,
            rn=camera.read_noise_e,
            sat=camera.saturation_adu,
            camera=camera,
            filter_name=filter_name if kind == "flat" else None,
        )
        hdr["SYNTHET"] = (True, "rpp_tasks.sim.synthetic frame")
        frames.append((data.astype(np.float32), hdr))
    return frames


def _write_raw(path, data, header):
    """Write as an observatory would: 16-bit unsigned integers (BITPIX=16, BZERO=32768)."""
    raw = np.clip(np.rint(data), 0, 65535).astype(np.uint16)
    fits.PrimaryHDU(data=raw, header=header).writeto(path, overwrite=True)


def write_synthetic_session(
    folder,
    *,
    truth_folder=None,
    n_science=3,
    n_bias=5,
    n_dark=3,
    n_flat=5,
    shape=(512, 512),
    filter="V",
    exptime_s=60.0,
    object_name="demo",
    n_stars=None,
    psf="gaussian",
    fwhm_px=3.5,
    beta=3.0,
    sky_adu=800.0,
    wcs_center_deg=(150.0, 2.2),
    dither_px=8.0,
    night="2025-01-15",
    camera=None,
    seed=0,
    **field_kwargs,
) -> dict:
    """
    Write a realistic raw session (calibration + science frames) and its truth.

    Frames are written as 16-bit unsigned FITS with observatory-like headers, in the order an
    observatory syncs them: ``bias_001.fits``... (``'Bias Frame'``), ``dark_001.fits``... (dark
    frames of the science exposure time), ``flat_<filter>_001.fits``... (twilight flats,
    ``'Flat Field'``), then ``<object>_<filter>_001.fits``... (``'Light Frame'``). Science frames
    share one star list on the sky (fixed ``ra, dec, mag``), are dithered by up to ``dither_px``,
    have slightly varying seeing (+-5 % FWHM) and sky (+-10 %), and carry the camera's bias
    pattern, dark current, hot pixels and flat-field response.

    Parameters
    ----------
    folder : path-like
        Data folder (created). Only FITS frames are written here.
    truth_folder : path-like, optional
        Where the truth goes (default: a ``truth`` folder next to ``folder``). Must not be inside
        ``folder``, so a watcher never mistakes truth for frames. It gets
        ``<frame stem>_truth.ecsv`` per science frame (truth of `make_star_field`, ``x, y`` in
        that frame), ``camera.fits`` (extensions BIAS, DARK in e/s, FLAT response, HOT mask) and
        ``session.json``.
    n_stars : int, optional
        Stars on the sky over the frame area (default 0.5 per 1000 px**2, 131 on 512x512).
    camera : `SyntheticCamera`, optional
        Default ``make_camera(shape, seed=seed)``.
    field_kwargs
        Passed to `make_star_field` (e.g. ``mag_range``, ``zero_point_mag``, ``n_cosmic_rays``).

    Returns
    -------
    paths : dict
        ``{"bias": [...], "dark": [...], "flat": [...], "science": [...], "truth": [...],
        "camera": Path, "session": Path, "folder": Path, "truth_folder": Path}``.
    """
    import json

    from astropy.time import Time, TimeDelta

    folder = Path(folder)
    truth_folder = Path(truth_folder) if truth_folder is not None else folder.parent / "truth"
    if (
        truth_folder.resolve() == folder.resolve()
        or folder.resolve() in truth_folder.resolve().parents
    ):
        msg = f"truth_folder {truth_folder} must not be inside the data folder {folder}"
        raise ValueError(msg)
    folder.mkdir(parents=True, exist_ok=True)
    truth_folder.mkdir(parents=True, exist_ok=True)
    ny, nx = (int(shape[0]), int(shape[1]))
    cam = camera if camera is not None else make_camera((ny, nx), seed=seed)
    seeds = np.random.SeedSequence(seed).spawn(5)
    rng = np.random.default_rng(seeds[0])
    out = {"bias": [], "dark": [], "flat": [], "science": [], "truth": []}

    t_evening = Time(f"{night}T17:30:00", scale="utc")
    for kind, n, t_start, exp, sub in (
        ("bias", n_bias, t_evening, 0.0, seeds[1]),
        ("dark", n_dark, t_evening + TimeDelta(600, format="sec"), exptime_s, seeds[2]),
        ("flat", n_flat, t_evening + TimeDelta(1800, format="sec"), None, seeds[3]),
    ):
        frames = make_calibration_frames(
            cam, kind, n=n, exptime_s=exp, filter_name=filter, date_obs=t_start.isot, seed=sub
        )
        for i, (data, hdr) in enumerate(frames, start=1):
            name = f"flat_{filter}_{i:03d}.fits" if kind == "flat" else f"{kind}_{i:03d}.fits"
            _write_raw(folder / name, data, hdr)
            out[kind].append(folder / name)

    # one star list on the sky, larger than the frame so dithers keep the density
    scale_deg = field_kwargs.get("pixel_scale_arcsec", 1.0) / 3600.0
    n_sky = int(n_stars) if n_stars is not None else int(round(0.5e-3 * ny * nx))
    pad = 2.0 * dither_px
    area_ratio = (nx + 2 * pad) * (ny + 2 * pad) / (nx * ny)
    wide = _make_wcs(
        (ny + int(2 * pad), nx + int(2 * pad)),
        wcs_center_deg,
        field_kwargs.get("pixel_scale_arcsec", 1.0),
        field_kwargs.get("rotation_deg", 0.0),
    )
    n_draw = int(round(n_sky * area_ratio))
    sx = rng.uniform(-0.5, nx + 2 * pad - 0.5, n_draw)
    sy = rng.uniform(-0.5, ny + 2 * pad - 0.5, n_draw)
    sky_ra, sky_dec = wide.pixel_to_world_values(sx, sy)
    sky_mag = _draw_magnitudes(
        rng, n_draw, field_kwargs.pop("mag_range", (13.0, 21.0)), field_kwargs.pop("mag_slope", 0.3)
    )
    star_list = Table({"ra": sky_ra, "dec": sky_dec, "mag": sky_mag})

    t_sci = t_evening + TimeDelta(3 * 3600, format="sec")
    cos_dec = math.cos(math.radians(wcs_center_deg[1]))
    sci_seeds = seeds[4].spawn(max(n_science, 1))
    frames_info = []
    for i in range(1, n_science + 1):
        ddx, ddy = rng.uniform(-dither_px, dither_px, 2)
        center = (
            wcs_center_deg[0] - ddx * scale_deg / cos_dec,
            wcs_center_deg[1] + ddy * scale_deg,
        )
        fwhm_i = fwhm_px * rng.uniform(0.95, 1.05)
        sky_i = sky_adu * rng.uniform(0.9, 1.1)
        date = (t_sci + TimeDelta((i - 1) * (exptime_s + 15.0), format="sec")).isot
        fld = make_star_field(
            (ny, nx),
            stars=star_list,
            psf=psf,
            fwhm_px=fwhm_i,
            beta=beta,
            sky_adu=sky_i,
            exptime_s=exptime_s,
            wcs_center_deg=center,
            camera=cam,
            filter_name=filter,
            object_name=object_name,
            date_obs=date,
            seed=int(sci_seeds[i - 1].generate_state(1)[0]),
            **field_kwargs,
        )
        stem = f"{object_name}_{filter}_{i:03d}"
        _write_raw(folder / f"{stem}.fits", fld.data, fld.header)
        tpath = truth_folder / f"{stem}_truth.ecsv"
        fld.truth.write(tpath, overwrite=True)
        out["science"].append(folder / f"{stem}.fits")
        out["truth"].append(tpath)
        frames_info.append(
            {
                "frame": f"{stem}.fits",
                "truth": tpath.name,
                "fwhm_px": fld.params["fwhm_px"],
                "sky_adu": fld.params["sky_adu"],
                "center_deg": list(center),
                "n_stars": len(fld.truth),
            }
        )

    cam_path = truth_folder / "camera.fits"
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(cam.bias_adu, name="BIAS"),
            fits.ImageHDU(cam.dark_e_per_s, name="DARK"),
            fits.ImageHDU(cam.flat_response, name="FLAT"),
            fits.ImageHDU(cam.hot_mask.astype(np.uint8), name="HOT"),
        ]
    ).writeto(cam_path, overwrite=True)
    session = {
        "folder": str(folder),
        "filter": filter,
        "exptime_s": float(exptime_s),
        "shape": [ny, nx],
        "gain_e_per_adu": cam.gain_e_per_adu,
        "read_noise_e": cam.read_noise_e,
        "saturation_adu": cam.saturation_adu,
        "psf": psf,
        "beta": float(beta),
        "seed": int(seed),
        "frames": frames_info,
    }
    session_path = truth_folder / "session.json"
    session_path.write_text(json.dumps(session, indent=2))
    out.update(camera=cam_path, session=session_path, folder=folder, truth_folder=truth_folder)
    log.info(
        "synthetic session written to %s: %d bias, %d dark, %d flat, %d science",
        folder,
        len(out["bias"]),
        len(out["dark"]),
        len(out["flat"]),
        len(out["science"]),
    )
    return out
