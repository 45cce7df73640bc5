"""The demo night: a synthetic session of the demo observatory that shows the whole product offline.

`write_demo_night` writes one raw session (bias, dark, flat and science frames) of a field around
the demo observatory's configured target (``targets.objects[0]`` of ``config/observatories/
demo.yaml``) with `rpp_tasks.sim.nights.write_nights`:

* the target is a variable star (semi-amplitude 0.3 mag, period 0.3 d: it changes within the
  night) named by the frames' ``OBJECT``;
* a transient (``DEMO-TRANSIENT``, not in the reference catalogue) appears in the last frames
  only (from frame ``n_science - 2``);
* the field's reference catalogue (Gaia DR3 columns; the frames are rendered from it, so it is the
  truth of the calibration) is written into the observatory's first local catalogue folder
  (``catalogs.local``), so the first run gets zero points, calibrated limiting magnitudes and
  transient candidates without internet.

The truth (``truth/truth.json``: per frame time, zero point, the variable's and the transient's
magnitudes) goes to ``<work>/../demo_truth/<night>``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
from pathlib import Path

from rpp_tasks.config import parse_dec_deg, parse_ra_deg

__all__ = ["DEMO_CATALOG", "demo_target", "local_catalog_dir", "write_demo_night"]

log = logging.getLogger(__name__)

#: File name of the demo field's reference catalogue in the local catalogue folder.
DEMO_CATALOG = "demo_reference.fits"


def demo_target(obs) -> tuple[str, float, float]:
    """``(name, ra_deg, dec_deg)`` of the observatory's first configured target with a position."""
    for t in obs.targets.objects:
        if t.ra is not None and t.dec is not None:
            return t.name, float(parse_ra_deg(t.ra)), float(parse_dec_deg(t.dec))
    raise ValueError(f"{obs.source or obs.name}: the demo needs a target with ra/dec in targets")


def local_catalog_dir(obs) -> Path:
    """The observatory's first local catalogue folder (relative: under ``RPP_DATA_ROOT``)."""
    from rpp_tasks.config import REPO_ROOT

    if not obs.catalogs.local:
        raise ValueError(f"{obs.source or obs.name}: the demo needs catalogs.local")
    p = Path(os.path.expanduser(os.path.expandvars(obs.catalogs.local[0])))
    return p if p.is_absolute() else Path(os.environ.get("RPP_DATA_ROOT", REPO_ROOT)) / p


def write_demo_night(
    obs,
    folder: str | os.PathLike,
    *,
    night: str = "2025-01-15",
    n_science: int = 4,
    shape=(512, 512),
    seed: int = 1,
    truth_folder: str | os.PathLike | None = None,
) -> dict:
    """
    Write the demo session into ``folder`` and its reference catalogue into the local catalogue.

    Parameters
    ----------
    obs : `~rpp_tasks.config.ObservatoryConfig`
        The demo observatory (a target with a position, ``catalogs.local``, the camera).
    folder : path-like
        The raw session folder (created; only FITS frames go there).
    night : str
        The night's date (``YYYY-MM-DD``; another name gets 2025-01-15's sky).
    n_science : int
        Science frames (the transient is in the last two, or the last one of fewer than 3).

    Returns
    -------
    dict
        ``folder``, ``catalog`` (the local reference file), ``truth`` (truth.json), ``target``
        (name, ra, dec), ``transient`` (name, mag, ra, dec, frames it is in), ``frames`` (stems).
    """
    from rpp_tasks.sim.nights import Transient, VariableStar, write_nights

    try:
        date = dt.date.fromisoformat(str(night)).isoformat()
    except ValueError:
        date = "2025-01-15"
    name, ra, dec = demo_target(obs)
    folder = Path(folder)
    truth_root = Path(
        truth_folder
        if truth_folder is not None
        else obs.resolve_path("work").parent / "demo_truth" / str(night)
    )
    shutil.rmtree(truth_root, ignore_errors=True)
    n_science = max(int(n_science), 1)
    first_frame = max(n_science - 2, 1) if n_science > 1 else 0
    truth = write_nights(
        truth_root,
        n_nights=1,
        frames_per_night=n_science,
        first_night=date,
        shape=shape,
        band="V",
        center_deg=(ra - 0.02, dec - 0.015),  # the target off-centre, like a real pointing
        pixel_scale_arcsec=float(obs.camera.pixel_scale_arcsec or 1.0),
        site=(obs.site.latitude_deg, obs.site.longitude_deg),
        variable=VariableStar(name, 14.0, 0.3, 0.3),
        transient=Transient("DEMO-TRANSIENT", 15.0, (0,), first_frame=first_frame),
        variable_position=(ra, dec),
        field_variables=(),
        vsx_variable_amplitude=0.0,
        density_per_deg2=10000.0,
        calibration_every_night=True,
        cloud_fraction=0.0,
        object_name=name,
        seed=seed,
    )
    # the raw frames into the session folder, the catalogue into the local catalogue folder
    folder.mkdir(parents=True, exist_ok=True)
    src = truth.nights[0]
    for p in sorted(src.iterdir()):
        shutil.move(str(p), folder / p.name)
    shutil.rmtree(truth_root / "incoming", ignore_errors=True)
    cat_dir = local_catalog_dir(obs)
    cat_dir.mkdir(parents=True, exist_ok=True)
    cat_path = cat_dir / DEMO_CATALOG
    tmp = cat_dir / f".{DEMO_CATALOG}.{os.getpid()}.tmp"
    shutil.copyfile(truth.catalog, tmp)
    os.replace(tmp, cat_path)
    tr = truth.targets["transient"]
    frames = [f["frame"] for f in truth.frames]
    log.info(
        "demo night %s: %d science frames of %s in %s, reference catalogue %s",
        night,
        len(frames),
        name,
        folder,
        cat_path,
    )
    return {
        "folder": folder,
        "catalog": cat_path,
        "truth": truth.truth,
        "target": {"name": name, "ra_deg": ra, "dec_deg": dec},
        "transient": {
            "name": tr["name"],
            "mag": tr["mag"],
            "ra_deg": tr["ra_deg"],
            "dec_deg": tr["dec_deg"],
            "frames": [f["frame"] for f in truth.frames if f["transient_present"]],
        },
        "frames": frames,
    }
