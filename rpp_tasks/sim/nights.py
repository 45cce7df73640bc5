"""Synthetic multi-night observations of one field with known truth: a periodic variable, a
constant target, a transient that exists only on some nights, variable field stars (one known to
VSX, others not), and the field's reference catalogue as a local file (the truth).

`write_nights` writes one raw session folder per night, as an observatory syncs them: calibration
frames (bias, dark, flat; on the first night only by default, later nights use the master
library) and science frames as 16-bit FITS with observatory-like headers. Each frame is rendered
by `rpp_tasks.sim.synthetic.make_star_field` (its public API) from the reference catalogue, with
what changes from frame to frame on a real night:

* the time: nights with gaps (weather), frames spread over the night; the variable's magnitude is
  ``mag_mean + amplitude * sin(2 pi (BJD_TDB - epoch) / period)`` at mid-exposure (BJD_TDB of the
  variable, so the truth has no light-time error);
* the atmosphere: the zero point falls with ``k X`` (X from the site, the time and the field,
  `rpp_tasks.stages.zeropoint.airmass`) and with thin clouds (random losses of 0-0.3 mag on some
  frames), the sky level and the seeing (FWHM) change;
* the pointing: a per-night offset and a per-frame dither.

The catalogue has Gaia DR3 archive columns (``source_id``, ``ra``, ``dec``, ``pmra``, ``pmdec``,
``phot_g_mean_mag``, ``phot_bp_mean_mag``, ``phot_rp_mean_mag``, ``phot_*_mean_flux_over_error``)
and complete down to ``catalog_mag_limit``; the frames' band magnitudes are derived from it with
the pipeline's own Gaia transformation (`rpp_tasks.stages.catalogs.gaia_transform`), so the
catalogue *is* the truth of the calibration. The transient is not in it.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from rpp_tasks.sim.synthetic import make_calibration_frames, make_camera, make_star_field

__all__ = ["VariableStar", "Transient", "NightsTruth", "make_field_catalog", "write_nights"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VariableStar:
    """A sinusoidal variable in the frames' band (``amplitude_mag`` is the semi-amplitude)::

    mag = mag_mean + amplitude_mag * sin(2 pi (bjd - epoch_bjd) / period_d)
    """

    name: str
    mag_mean: float
    amplitude_mag: float
    period_d: float
    epoch_bjd: float = 2460690.0
    in_vsx: bool = False


@dataclass(frozen=True)
class Transient:
    """A source absent from the reference catalogue, present on the given nights (0-based), from
    the frame ``first_frame`` (0-based, within each of those nights) on."""

    name: str
    mag: float
    nights: tuple[int, ...]
    first_frame: int = 0


@dataclass
class NightsTruth:
    """What `write_nights` wrote and the truth to check the pipeline against."""

    root: Path
    nights: list[Path]
    catalog: Path
    truth: Path
    targets: dict
    frames: list[dict] = field(default_factory=list)
    vsx: Path | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        return json.loads(json.dumps(d, default=str))

    def offline_config(
        self, root, *, observatory="nights", enrichment=(), resolve_online=False, **targets
    ) -> dict:
        """An observatory configuration (a dict for `rpp_tasks.config.config_from_dict`) that
        reduces these nights offline: the camera `write_nights` simulates, folders under
        ``root``, every catalogue service on a closed loopback port, the field's catalogue as
        the local one, and the three synthetic targets (``SYN-VAR``, ``SYN-CONST``,
        ``SYN-TRANSIENT``). ``targets`` adds keys to the ``targets`` section."""
        root = Path(root)
        dead = "http://127.0.0.1:9"  # nothing listens: the night is offline
        services = ("gaia_tap", "gaia_vizier", "vizier", "simbad", "skybot", "sesame")
        return {
            "observatory": observatory,
            "site": {"latitude_deg": 43.75, "longitude_deg": 6.92, "elevation_m": 1270},
            "camera": {
                "gain_e_per_adu": 1.5,
                "read_noise_e": 8.0,
                "saturation_adu": 60000,
                "pixel_scale_arcsec": 1.0,
            },
            "filters": {"aliases": {"V": "V"}},
            "paths": {
                "incoming": str(root / "incoming"),
                "work": str(root / "work"),
                "master_library": str(root / "masters"),
            },
            "stages": {"astrometry": {"solve": "never"}},
            "catalogs": {
                "services": dict.fromkeys(services, dead),
                "enrichment": list(enrichment),
                "cache_dir": str(root / "cache"),
                "timeout_s": 1.0,
                "max_retries": 0,
                "local": [str(root / "catalogs")],
            },
            "targets": {
                "objects": [
                    {
                        "name": name,
                        "ra": self.targets[key]["ra_deg"],
                        "dec": self.targets[key]["dec_deg"],
                    }
                    for name, key in (
                        ("SYN-VAR", "variable"),
                        ("SYN-CONST", "constant"),
                        ("SYN-TRANSIENT", "transient"),
                    )
                ],
                "resolve_online": resolve_online,
                **targets,
            },
        }


def make_field_catalog(
    center_deg=(150.0, 20.0),
    radius_deg=0.12,
    *,
    density_per_deg2=8000.0,
    g_range=(12.5, 19.0),
    mag_slope=0.3,
    bp_rp_range=(0.5, 1.6),
    seed=0,
):
    """A Gaia-DR3-like catalogue of a cone: uniform positions, ``dN/dG ∝ 10**(mag_slope G)``,
    BP-RP colours inside the range of the Johnson/Sloan transformations."""
    rng = np.random.default_rng(seed)
    area = 2 * math.pi * (1 - math.cos(math.radians(radius_deg))) * (180 / math.pi) ** 2
    n = int(round(density_per_deg2 * area))
    r = radius_deg * np.sqrt(rng.uniform(0, 1, n))
    th = rng.uniform(0, 2 * np.pi, n)
    dec = center_deg[1] + r * np.sin(th)
    ra = center_deg[0] + r * np.cos(th) / math.cos(math.radians(center_deg[1]))
    lo, hi = g_range
    u = rng.uniform(0, 1, n)
    a = 10 ** (mag_slope * lo)
    b = 10 ** (mag_slope * hi)
    g = np.log10(a + u * (b - a)) / mag_slope
    bprp = rng.uniform(*bp_rp_range, n)
    fe = 2000.0 * 10 ** (-0.4 * np.clip(g - 13.0, 0, None))  # flux_over_error, fainter -> noisier
    return Table(
        {
            "source_id": 6_000_000_000_000_000 + np.arange(n, dtype=np.int64) * 7,
            "ra": ra % 360.0,
            "dec": dec,
            "pmra": np.zeros(n),
            "pmdec": np.zeros(n),
            "phot_g_mean_mag": g,
            "phot_bp_mean_mag": g + 0.35 * bprp,
            "phot_rp_mean_mag": g - 0.65 * bprp,
            "phot_g_mean_flux_over_error": np.maximum(fe, 20.0),
            "phot_bp_mean_flux_over_error": np.maximum(fe / 4, 10.0),
            "phot_rp_mean_flux_over_error": np.maximum(fe / 4, 10.0),
        },
        meta={"catalog": "synthetic Gaia DR3 (rpp_tasks.sim.nights)", "seed": int(seed)},
    )


def _band_mags(cat: Table, band: str) -> np.ndarray:
    from rpp_tasks.stages.catalogs import gaia_transform, normalize_reference

    ref = normalize_reference(cat, "gaia")
    if f"mag_{band}" not in ref.colnames:
        ref = gaia_transform(ref)
    return np.asarray(ref[f"mag_{band}"], float)


def _free_position(rng, cat, center_deg, max_off_deg, min_sep_deg):
    """A position within ``max_off_deg`` of the centre with no catalogue star within ``min_sep``."""
    ra, dec = np.asarray(cat["ra"], float), np.asarray(cat["dec"], float)
    for _ in range(5000):
        r = max_off_deg * math.sqrt(rng.uniform(0, 1))
        th = rng.uniform(0, 2 * np.pi)
        d0 = center_deg[1] + r * math.sin(th)
        r0 = center_deg[0] + r * math.cos(th) / math.cos(math.radians(d0))
        d = np.hypot((ra - r0) * math.cos(math.radians(d0)), dec - d0)
        if d.min() >= min_sep_deg:
            return r0 % 360.0, d0
    raise ValueError("no free position: the field is too crowded for the targets")


def _write_uint16(path: Path, data, header) -> None:
    raw = np.clip(np.rint(data), 0, 65535).astype(np.uint16)
    fits.PrimaryHDU(data=raw, header=header).writeto(path, overwrite=True)


def write_nights(
    root,
    *,
    n_nights: int = 30,
    frames_per_night: int = 4,
    first_night: str = "2025-01-10",
    shape=(384, 384),
    band: str = "V",
    exptime_s: float = 60.0,
    center_deg=(120.0, 25.0),
    pixel_scale_arcsec: float = 1.0,
    site=(43.75, 6.92),
    zero_point_mag: float = 23.0,
    extinction_mag_per_airmass: float = 0.15,
    psf: str = "moffat",
    beta: float = 3.5,
    fwhm_range_px=(3.0, 4.4),
    sky_range_adu=(600.0, 1200.0),
    cloud_fraction: float = 0.3,
    dither_px: float = 10.0,
    night_offset_px: float = 15.0,
    variable: VariableStar | None = None,
    constant_mag: float = 15.0,
    transient: Transient | None = None,
    field_variables=(0.15, 0.25),
    vsx_variable_amplitude: float = 0.3,
    density_per_deg2: float = 8000.0,
    catalog_mag_limit: float = 19.0,
    calibration_every_night: bool = False,
    cloud_nights: dict | None = None,
    object_name: str = "SYNTH-FIELD",
    variable_position: tuple[float, float] | None = None,
    seed: int = 0,
) -> NightsTruth:
    """
    Write ``n_nights`` raw sessions of one field and its truth.

    Layout under ``root``::

        incoming/<YYYY-MM-DD>/       raw frames of each night (bias/dark/flat on the first night)
        catalogs/reference.fits      the field's reference catalogue (Gaia DR3 columns; truth)
        truth/truth.json             targets, variable parameters, transient nights, per frame:
                                     time (MJD, BJD_TDB), zero point, airmass, clouds, FWHM, the
                                     variable's and transient's magnitudes
        truth/vsx.ecsv               the field's variables known to VSX (VizieR B/vsx columns)

    Parameters
    ----------
    variable : VariableStar, optional
        Default ``VariableStar("SYN-VAR", 14.0, 0.25, 3.137)``: a catalogue star whose magnitude
        follows the sinusoid (its catalogue magnitude is the mean).
    constant_mag : float
        A catalogue star of about this magnitude is the constant target (``SYN-CONST``).
    transient : Transient, optional
        Default ``Transient("SYN-TRANSIENT", 15.5, nights=(n//3 .. n//3+3))``; placed 30-60 arcsec
        from the variable, more than 15 arcsec from any catalogue star.
    field_variables : sequence of float
        Semi-amplitudes of field stars that vary unknown to any catalogue (the ensemble must
        reject them), periods 0.4-2 d.
    vsx_variable_amplitude : float
        A field variable listed in ``truth/vsx.ecsv`` (0 for none).
    calibration_every_night : bool
        Write bias/dark/flat every night (default: first night only).
    cloud_nights : dict, optional
        ``{night index: magnitudes}``: thick clouds over every frame of those nights.
    variable_position : (ra_deg, dec_deg), optional
        Put the variable there (catalogue stars within 20 arcsec removed) instead of at a random
        free position (the demo's configured target).

    Returns
    -------
    NightsTruth
    """
    from astropy.time import Time, TimeDelta

    from rpp_tasks.stages.target import bjd_tdb
    from rpp_tasks.stages.zeropoint import airmass

    root = Path(root)
    rng = np.random.default_rng(seed)
    ny, nx = int(shape[0]), int(shape[1])
    half_diag = 0.5 * math.hypot(nx, ny) * pixel_scale_arcsec / 3600.0
    margin = (dither_px + night_offset_px) * pixel_scale_arcsec / 3600.0
    # the cone the astrometric refinement asks for: field + 120 arcsec search margin
    radius = half_diag * 1.05 + margin + 130.0 / 3600.0
    cat = make_field_catalog(
        center_deg,
        radius,
        density_per_deg2=density_per_deg2,
        g_range=(12.5, catalog_mag_limit),
        seed=seed,
    )
    variable = variable or VariableStar("SYN-VAR", 14.0, 0.25, 3.137)
    # The targets and the field variables are catalogue stars at free positions (no neighbour
    # within 20 arcsec) of the inner field (never dithered out of it); their catalogue magnitude
    # in the band is the wanted one (a variable's is its mean).
    amps = [a for a in field_variables if a > 0]
    if vsx_variable_amplitude > 0:
        amps.append(vsx_variable_amplitude)
    special = [(variable.mag_mean, 0.3), (constant_mag, 0.3)]
    special += [(15.0 + 0.4 * k, 0.4) for k in range(len(amps))]
    if variable_position is not None:
        v_ra, v_dec = (float(v) for v in variable_position)
        d = np.hypot(
            (np.asarray(cat["ra"]) - v_ra) * math.cos(math.radians(v_dec)),
            np.asarray(cat["dec"]) - v_dec,
        )
        cat = cat[d > 20.0 / 3600.0]
    first = len(cat)
    for k_sp, (want, within) in enumerate(special):
        max_off = within * min(nx, ny) * pixel_scale_arcsec / 3600.0
        if k_sp == 0 and variable_position is not None:
            p_ra, p_dec = v_ra, v_dec
        else:
            p_ra, p_dec = _free_position(rng, cat, center_deg, max_off, 20.0 / 3600.0)
        row = {c: cat[c][0] for c in cat.colnames}
        bprp = float(rng.uniform(0.7, 1.2))
        row.update(
            source_id=int(cat["source_id"].max()) + 7,
            ra=p_ra,
            dec=p_dec,
            phot_g_mean_mag=want,
            phot_bp_mean_mag=want + 0.35 * bprp,
            phot_rp_mean_mag=want - 0.65 * bprp,
            phot_g_mean_flux_over_error=2000.0,
        )
        cat.add_row(row)
        shift = want - float(_band_mags(cat[-1:], band)[0])
        for c in ("phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag"):
            cat[c][-1] += shift
    i_var, i_const = first, first + 1
    ra, dec = np.asarray(cat["ra"], float), np.asarray(cat["dec"], float)
    mags = _band_mags(cat, band)
    field_var = []
    for k, amp in enumerate(amps):
        is_vsx = vsx_variable_amplitude > 0 and k == len(amps) - 1
        field_var.append(
            {
                "index": first + 2 + k,
                "name": f"SYN-VSX-{k + 1}" if is_vsx else f"SYN-FV-{k + 1}",
                "amplitude_mag": float(amp),
                "period_d": float(rng.uniform(0.4, 2.0)),
                "epoch_bjd": 2460690.0 + float(rng.uniform(0, 1)),
                "in_vsx": is_vsx,
            }
        )
    # transient: a free position 30-60 arcsec from the variable
    n_nights = int(n_nights)
    transient = transient or Transient(
        "SYN-TRANSIENT", 15.5, tuple(range(n_nights // 3, min(n_nights, n_nights // 3 + 4)))
    )
    for _ in range(2000):
        r = rng.uniform(30, 60) / 3600.0
        th = rng.uniform(0, 2 * np.pi)
        t_dec = dec[i_var] + r * math.sin(th)
        t_ra = ra[i_var] + r * math.cos(th) / math.cos(math.radians(t_dec))
        d = np.hypot((ra - t_ra) * math.cos(math.radians(t_dec)), dec - t_dec)
        if d.min() > 15.0 / 3600.0:
            break
    else:  # pragma: no cover - the density is far below this
        raise ValueError("no free position for the transient")

    # ---- files
    inc = root / "incoming"
    (root / "catalogs").mkdir(parents=True, exist_ok=True)
    (root / "truth").mkdir(parents=True, exist_ok=True)
    cat_path = root / "catalogs" / "reference.fits"
    cat.meta.update(
        {"cone_ra_deg": center_deg[0], "cone_dec_deg": center_deg[1], "cone_radius_deg": radius}
    )
    with warnings.catch_warnings():  # long meta keys become HIERARCH cards, as intended
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        cat.write(cat_path, overwrite=True)
    vsx_path = root / "truth" / "vsx.ecsv"
    vsx = Table(
        {
            "Name": [fv["name"] for fv in field_var if fv["in_vsx"]],
            "_RAJ": [float(ra[fv["index"]]) for fv in field_var if fv["in_vsx"]],
            "_DEJ": [float(dec[fv["index"]]) for fv in field_var if fv["in_vsx"]],
            "Type": ["EW" for fv in field_var if fv["in_vsx"]],
        }
    )
    vsx.write(vsx_path, format="ascii.ecsv", overwrite=True)
    cam = make_camera((ny, nx), seed=seed + 1)
    n_rendered = {
        "catalogue": len(cat),
        "variable": int(i_var),
        "constant": int(i_const),
    }
    frames_truth = []
    night_dirs = []
    day0 = Time(f"{first_night}T12:00:00", scale="utc")
    night_index = 0
    day = 0
    seeds = np.random.SeedSequence(seed).spawn(n_nights + 1)
    while night_index < n_nights:
        if night_index > 0 and rng.uniform() < 0.25:
            day += 1  # a cloudy night: nothing observed
            continue
        date = (day0 + TimeDelta(day, format="jd")).isot[:10]
        folder = inc / date
        folder.mkdir(parents=True, exist_ok=True)
        night_dirs.append(folder)
        nrng = np.random.default_rng(seeds[night_index])
        if night_index == 0 or calibration_every_night:
            t_cal = Time(f"{date}T16:30:00", scale="utc")
            for kind, n, exp, t0 in (
                ("bias", 5, 0.0, t_cal),
                ("dark", 3, exptime_s, t_cal + TimeDelta(600, format="sec")),
                ("flat", 5, None, t_cal + TimeDelta(1800, format="sec")),
            ):
                cal = make_calibration_frames(
                    cam,
                    kind,
                    n=n,
                    exptime_s=exp,
                    filter_name=band,
                    date_obs=t0.isot,
                    seed=int(nrng.integers(2**31)),
                )
                for i, (data, hdr) in enumerate(cal, start=1):
                    name = f"flat_{band}_{i:03d}.fits" if kind == "flat" else f"{kind}_{i:03d}.fits"
                    _write_uint16(folder / name, data, hdr)
        noff = nrng.uniform(-night_offset_px, night_offset_px, 2)
        # frames spread over the night (17:00-07:00 UTC), while the field is above airmass 2.2
        midnight = Time(f"{date}T00:00:00", scale="utc").mjd
        hours = []
        for _ in range(400):
            h = float(nrng.uniform(17.0, 31.0))
            x = airmass(
                center_deg[0],
                center_deg[1],
                midnight + h / 24.0,
                latitude_deg=site[0],
                longitude_deg=site[1],
            )
            if np.isfinite(x) and x < 2.2:
                hours.append(h)
            if len(hours) == frames_per_night:
                break
        for j, h in enumerate(sorted(hours), start=1):
            start = Time(f"{date}T00:00:00", scale="utc") + TimeDelta(h * 3600.0, format="sec")
            mjd_mid = float(start.mjd) + 0.5 * exptime_s / 86400.0
            dd = noff + nrng.uniform(-dither_px, dither_px, 2)
            scale = pixel_scale_arcsec / 3600.0
            center = (
                center_deg[0] - dd[0] * scale / math.cos(math.radians(center_deg[1])),
                center_deg[1] + dd[1] * scale,
            )
            x_air = airmass(
                center[0], center[1], mjd_mid, latitude_deg=site[0], longitude_deg=site[1]
            )
            cloud = float(nrng.exponential(0.08)) if nrng.uniform() < cloud_fraction else 0.0
            cloud = min(cloud, 0.5) + float((cloud_nights or {}).get(night_index, 0.0))
            zp = zero_point_mag - extinction_mag_per_airmass * x_air - cloud
            frame_mags = mags.copy()
            bjd_var = float(
                bjd_tdb(mjd_mid, ra[i_var], dec[i_var], latitude_deg=site[0], longitude_deg=site[1])
            )
            v_mag = variable.mag_mean + variable.amplitude_mag * math.sin(
                2 * math.pi * (bjd_var - variable.epoch_bjd) / variable.period_d
            )
            frame_mags[i_var] = v_mag
            fv_mags = {}
            for fv in field_var:
                b = float(bjd_tdb(mjd_mid, ra[fv["index"]], dec[fv["index"]]))
                m = mags[fv["index"]] + fv["amplitude_mag"] * math.sin(
                    2 * math.pi * (b - fv["epoch_bjd"]) / fv["period_d"]
                )
                frame_mags[fv["index"]] = m
                fv_mags[fv["name"]] = m
            stars = Table({"ra": ra, "dec": dec, "mag": frame_mags})
            t_on = night_index in transient.nights and j - 1 >= transient.first_frame
            if t_on:
                stars.add_row({"ra": t_ra, "dec": t_dec, "mag": transient.mag})
            stars = stars[np.isfinite(np.asarray(stars["mag"], float))]
            fwhm = float(nrng.uniform(*fwhm_range_px))
            sky = float(nrng.uniform(*sky_range_adu))
            fld = make_star_field(
                (ny, nx),
                stars=stars,
                psf=psf,
                fwhm_px=fwhm,
                beta=beta,
                sky_adu=sky,
                exptime_s=exptime_s,
                zero_point_mag=zp,
                wcs_center_deg=center,
                pixel_scale_arcsec=pixel_scale_arcsec,
                camera=cam,
                filter_name=band,
                object_name=object_name,
                date_obs=start.isot,
                seed=int(nrng.integers(2**31)),
            )
            stem = f"{object_name}_{band}_{date.replace('-', '')}_{j:03d}"
            _write_uint16(folder / f"{stem}.fits", fld.data, fld.header)
            frames_truth.append(
                {
                    "night": night_index,
                    "date": date,
                    "frame": stem,
                    "mjd_mid": mjd_mid,
                    "bjd_tdb_variable": bjd_var,
                    "zero_point_mag": zp,
                    "airmass": float(x_air),
                    "cloud_mag": cloud,
                    "fwhm_px": fwhm,
                    "sky_adu": sky,
                    "center_deg": list(center),
                    "variable_mag": v_mag,
                    "constant_mag": float(mags[i_const]),
                    "transient_present": bool(t_on),
                    "field_variables": fv_mags,
                }
            )
        night_index += 1
        day += 1
    targets = {
        "variable": {
            **asdict(variable),
            "ra_deg": float(ra[i_var]),
            "dec_deg": float(dec[i_var]),
            "source_id": int(cat["source_id"][i_var]),
        },
        "constant": {
            "name": "SYN-CONST",
            "mag": float(mags[i_const]),
            "ra_deg": float(ra[i_const]),
            "dec_deg": float(dec[i_const]),
            "source_id": int(cat["source_id"][i_const]),
        },
        "transient": {**asdict(transient), "ra_deg": float(t_ra), "dec_deg": float(t_dec)},
        "field_variables": [
            {**fv, "ra_deg": float(ra[fv["index"]]), "dec_deg": float(dec[fv["index"]])}
            for fv in field_var
        ],
    }
    truth_path = root / "truth" / "truth.json"
    truth = NightsTruth(
        root=root,
        nights=night_dirs,
        catalog=cat_path,
        truth=truth_path,
        targets=targets,
        frames=frames_truth,
        vsx=vsx_path,
    )
    params = {
        "band": band,
        "shape": [ny, nx],
        "exptime_s": exptime_s,
        "center_deg": list(center_deg),
        "site": list(site),
        "zero_point_mag": zero_point_mag,
        "extinction_mag_per_airmass": extinction_mag_per_airmass,
        "psf": psf,
        "beta": beta,
        "seed": seed,
        "catalog_rows": n_rendered,
    }
    truth_path.write_text(json.dumps({**truth.to_dict(), "params": params}, indent=1))
    log.info(
        "synthetic nights: %d nights x %d frames of %s written to %s",
        len(night_dirs),
        frames_per_night,
        object_name,
        inc,
    )
    return truth
