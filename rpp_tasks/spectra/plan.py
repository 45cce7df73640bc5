"""A long-slit night's plan: the targets' frames by role, the setup, the calibration masters.

`plan_session` reads a session folder: frames by role from ``last_obs.yaml``/``setup_config.yaml``
(`frames_from_twospot`, 2SPOT) or from IMAGETYP and file-name patterns (`frames_from_headers`),
the spectrograph setup with the night's overrides (`effective_setup`), the site and camera.
`build_masters` builds the offset, dark-rate and long-slit flat masters of each distinct set of
calibration files. `rpp_tasks.spectra.reduce` reduces the targets with them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rpp_tasks.exceptions import FrameRejected

__all__ = [
    "TargetFrames",
    "effective_setup",
    "frames_from_twospot",
    "frames_from_headers",
    "plan_session",
    "build_masters",
]


@dataclass(frozen=True)
class TargetFrames:
    """The raw files of one target of a night, by role."""

    name: str
    target: tuple[str, ...]
    lamp: tuple[str, ...] = ()
    flat: tuple[str, ...] = ()
    dark: tuple[str, ...] = ()
    offset: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
        }


# ----------------------------------------------------------------------------- frames by role
def effective_setup(spec, twospot_setup=None):
    """The spectrograph section with the night's ``setup_config.yaml`` values applied."""
    if twospot_setup is None:
        return spec
    return dataclasses.replace(spec, **twospot_setup.spectrograph_overrides())


def frames_from_twospot(folder, *, setup_file="setup_config.yaml", obs_file=None):
    """
    Frames by role from a 2SPOT session folder.

    Parameters
    ----------
    folder : str or Path
        The session folder (``last_obs.yaml``, ``setup_config.yaml`` and the frames).
    setup_file : str, optional
    obs_file : str, optional
        Observation file name; default ``<batch_name>.yaml`` of the setup, else ``last_obs.yaml``.

    Returns
    -------
    targets : dict
        Name -> `TargetFrames` (only files present; missing ones are in ``missing``).
    setup : `~rpp_tasks.inputs.twospot.TwoSpotSetup` or None
    missing : list of str
        Declared files that are not in the folder.
    """
    from rpp_tasks.inputs import twospot

    folder = Path(folder)
    setup = None
    if (folder / setup_file).is_file():
        setup = twospot.parse_setup_config(folder / setup_file)
    ext = setup.file_extension if setup else ".fits"
    obs_name = obs_file or (setup.obs_file_name if setup else "last_obs.yaml")
    targets = twospot.parse_last_obs(folder / obs_name)
    present = {p.name.lower(): p for p in folder.iterdir() if p.is_file()}
    out, missing = {}, []
    for t in targets:
        by_role = {"target": [], "lamp": [], "flat": [], "dark": [], "offset": []}
        for kind, prefix_field, count_field in twospot._KINDS:
            prefix = getattr(t, prefix_field)
            for i in range(1, getattr(t, count_field) + 1):
                name = f"{prefix}{i}{ext}"
                p = present.get(name.lower())
                if p is None:
                    missing.append(name)
                else:
                    by_role[twospot.ROLES[kind]].append(str(p))
        out[t.key or t.name] = TargetFrames(
            name=t.name, **{k: tuple(v) for k, v in by_role.items()}
        )
    return out, setup, missing


def frames_from_headers(paths, *, lamp_patterns=(), frame_types=None):
    """
    Frames by role from headers (IMAGETYP) and file-name patterns, for observatories without
    2SPOT files. Lamps: IMAGETYP ``arc``/``comp``/``lamp``/``wave`` or a ``lamp_patterns`` glob;
    offsets, darks, flats: `~rpp_tasks.inputs.frames.classify_frame`; every other frame is a
    target exposure grouped by OBJECT (else the file name without its trailing number). All
    calibration frames serve every target.

    Returns
    -------
    targets : dict
        Name -> `TargetFrames`.
    rejected : list of (path, reason)
    """
    import fnmatch
    import re

    from rpp_tasks.inputs.frames import classify_frame
    from rpp_tasks.inputs.reader import read_header

    roles = {"lamp": [], "flat": [], "dark": [], "offset": []}
    science: dict[str, list[str]] = {}
    rejected = []
    for p in sorted(str(p) for p in paths):
        name = Path(p).name.lower()
        try:
            header = read_header(p, debayer=False)[0]
        except Exception as exc:  # unreadable file: recorded, the others go on
            rejected.append((p, f"unreadable: {exc}"))
            continue
        imtyp = str(header.get("IMAGETYP", header.get("OBSTYPE", ""))).strip().lower()
        if any(w in imtyp for w in ("arc", "comp", "lamp", "wave", "neon", "thar")) or any(
            fnmatch.fnmatchcase(name, pat.lower()) for pat in lamp_patterns
        ):
            roles["lamp"].append(p)
            continue
        kind = classify_frame(imtyp or None, p, patterns=frame_types)
        if kind == "bias":
            roles["offset"].append(p)
        elif kind in ("dark", "flat"):
            roles[kind].append(p)
        else:
            obj = str(header.get("OBJECT", "")).strip()
            if not obj:
                obj = re.sub(r"[-_ ]*\d+$", "", Path(p).stem) or Path(p).stem
            science.setdefault(obj, []).append(p)
    targets = {
        name: TargetFrames(name=name, target=tuple(ps), **{k: tuple(v) for k, v in roles.items()})
        for name, ps in science.items()
    }
    return targets, rejected


def _read(paths, dispersion_axis):
    from rpp_tasks.inputs.reader import read_frame
    from rpp_tasks.spectra.calib import orient

    out = []
    for p in paths:
        fr = read_frame(p, debayer=False)
        out.append((np.ascontiguousarray(orient(fr.data, dispersion_axis)), fr.header, p))
    return out


def _meta(header, path, camera):
    from rpp_tasks.inputs.header import normalize_header

    return normalize_header(
        header,
        path=path,
        gain_e_per_adu=camera["gain_e_per_adu"],
        read_noise_e=camera["read_noise_e"],
        saturation_adu=camera["saturation_adu"],
        required=("EXPTIME",),
    )


def _masters(frames, camera, spec, timer):
    """Offset, dark-rate and long-slit flat masters (each may be None)."""
    from rpp_tasks.spectra import calib

    info = {}
    bias = dark = flat = flat_mask = None
    illum = None
    if frames["offset"]:
        with timer("masters"):
            stack = [d for d, _, _ in _read(frames["offset"], spec.dispersion_axis)]
            m = calib.make_master_bias(stack)
            bias = m.image
            info["offset"] = m.to_dict()
    if frames["dark"]:
        with timer("masters"):
            rd = _read(frames["dark"], spec.dispersion_axis)
            t = [_meta(h, p, camera).exptime_s or 0.0 for _, h, p in rd]
            if all(v > 0 for v in t):
                m = calib.make_master_dark([d for d, _, _ in rd], exptimes_s=t, master_bias=bias)
                dark = m.image
                info["dark"] = m.to_dict()
            else:
                info["dark"] = {"error": "dark without a positive EXPTIME: darks not used"}
    if frames["flat"]:
        with timer("masters"):
            rd = _read(frames["flat"], spec.dispersion_axis)
            t = [_meta(h, p, camera).exptime_s or 0.0 for _, h, p in rd]
            try:
                fr = calib.make_longslit_flat(
                    [d for d, _, _ in rd],
                    master_bias=bias,
                    master_dark_rate=dark,
                    exptimes_s=t,
                    smooth_px=spec.flat_smooth_px,
                )
                flat, flat_mask, illum = fr.master.image, fr.master.mask, fr.illuminated_rows
                info["flat"] = fr.to_dict()
            except ValueError as exc:
                info["flat"] = {"error": f"flat not usable: {exc}"}
    return bias, dark, flat, flat_mask, illum, info


def plan_session(folder, obs):
    """
    The targets of a long-slit session folder and the setup to reduce them with.

    Frames by role come from the 2SPOT files when the folder has them (``setup_config.yaml``
    overriding ``bin_size`` and ``posy``), else from headers and file-name patterns.

    Returns
    -------
    targets : dict
        Name -> `TargetFrames`.
    spec : `~rpp_tasks.config.SpectrographConfig`
        With the night's overrides.
    missing : list of str
        Declared files absent from the folder, or unreadable files with the reason.
    site, camera : dict
        What `reduce_longslit_session` takes.

    Raises
    ------
    FrameRejected
        The session has no target at all.
    """
    folder = Path(folder)
    spec = obs.spectrograph
    if spec is None:
        raise ValueError(f"observatory {obs.observatory!r} has no spectrograph section")
    obs_file = getattr(obs.session, "twospot_obs_file", "last_obs.yaml")
    setup = None
    missing: list = []
    if (folder / obs_file).is_file() or (folder / "setup_config.yaml").is_file():
        targets, setup, missing = frames_from_twospot(folder)
    else:
        paths = [p for p in folder.iterdir() if p.suffix.lower() in (".fits", ".fit", ".fts")]
        targets, rejected = frames_from_headers(
            paths, lamp_patterns=spec.lamp_patterns, frame_types=obs.session.frame_types
        )
        missing = [f"{p}: {r}" for p, r in rejected]
    if not targets:
        raise FrameRejected("no target exposure in the session", path=folder, stage="frames")
    spec = effective_setup(spec, setup)
    site = {
        "latitude_deg": obs.site.latitude_deg,
        "longitude_deg": obs.site.longitude_deg,
        "elevation_m": obs.site.elevation_m,
        "name": obs.site.name,
        "configured": (obs.site.latitude_deg, obs.site.longitude_deg) != (0.0, 0.0),
    }
    camera = {
        "gain_e_per_adu": obs.camera.gain_e_per_adu,
        "read_noise_e": obs.camera.read_noise_e,
        "saturation_adu": obs.camera.saturation_adu,
        "telescope": obs.camera.telescope,
    }
    return targets, spec, missing, site, camera


def build_masters(targets, spec, camera):
    """The masters of every distinct calibration set of ``targets`` (``masters=`` of
    `reduce_longslit_session`); a set that cannot be built is left out (its targets are then
    rejected at stage ``masters`` with the reason)."""
    out, errors = {}, {}
    timer = _Timer()
    for frames in targets.values():
        key = (frames.offset, frames.dark, frames.flat)
        if key in out or key in errors:
            continue
        try:
            *m, info = _masters(
                {"offset": frames.offset, "dark": frames.dark, "flat": frames.flat},
                dict(camera),
                spec,
                timer,
            )
            out[key] = (tuple(m), info)
        except Exception as exc:
            errors[key] = f"calibration masters: {exc}"
    return out, errors, dict(timer.t)


class _Timer:
    def __init__(self):
        self.t = {}

    def __call__(self, name):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.process_time()

            def __exit__(self, *exc):
                timer.t[name] = timer.t.get(name, 0.0) + time.process_time() - self.t0

        return _Ctx()
