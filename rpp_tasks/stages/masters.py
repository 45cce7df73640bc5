"""The masters stage: a session's bias, dark and flat frames into master frames, or the library's.

run_masters groups the session's calibration frames by kind, binning and band (and, for darks,
exposure), reads each stack (a frame that cannot be read, has the wrong shape or is all-NaN or
constant is dropped from its master with the reason), combines them (rpp_tasks.stages.calibration),
writes the masters, adds them to the MasterLibrary (rpp_tasks.stages.master_library), and takes the
library's nearest master when the session has none of a kind. Its summary is masters.json.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
from astropy.io import fits

from rpp_tasks.stages.calibration import make_master_bias, make_master_dark, make_master_flat
from rpp_tasks.stages.master_library import (
    MasterLibrary,
    load_master,
    norm_binning,
    safe_name,
    write_master,
)

__all__ = ["run_masters"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- adapter
def run_masters(
    frames,
    *,
    out_dir,
    camera,
    binning=None,
    library=None,
    library_root=None,
    combine="median",
    clip_sigma=3.0,
    max_age_days=None,
    session_mjd=None,
    bands=None,
    read_kwargs=None,
):
    """
    Adapter: build the session's masters, fall back on the library for missing kinds.

    Parameters
    ----------
    frames : dict
        Either ``{"bias": [paths], "dark": [paths], "flat_<band>": [paths], "flat": [paths]}``
        (a plain ``"flat"`` takes its band from the FILTER keyword), or a session manifest
        (``SessionPlan.to_dict()``: its ``groups`` give kind, band, binning and paths; its
        ``frames`` give the MJDs and ``bands`` the science bands).
    out_dir : str or Path
        Where ``bias.fits``, ``dark.fits`` and ``flat_<band>.fits`` are written.
    camera : str
    binning : (int, int), optional
        Default: from the manifest groups, else (1, 1).
    library : MasterLibrary, optional
        (or ``library_root``, a folder): session masters are added to it; missing kinds are taken
        from it (nearest in time, within ``max_age_days`` if given).
    combine, clip_sigma : see `combine_frames`
    session_mjd : float, optional
        Time used for library look-ups; default the median MJD of the session's frames.
    bands : sequence of str, optional
        Science bands that need a flat; default the manifest's ``bands``.
    read_kwargs : dict, optional
        Passed to `rpp_tasks.inputs.reader.read_frame` (e.g. ``bayer_pattern`` from the camera
        config, so that calibration frames are debayered exactly like the science frames).

    Returns
    -------
    summary : dict
        ``{"bias": entry|None, "dark": entry|None, "flat": {band: entry}, "flags": [...],
        "rejected": [...]}``, each entry ``{"path", "source": "session"|"library", "n_frames",
        "mjd", ...}`` (``inputs``, the raw files used, and ``n_rejected_inputs`` for session
        masters; ``delta_days`` for library masters, and ``reason`` when the library replaces
        session frames that were all unusable). ``rejected`` lists the calibration frames left
        out, ``{"path", "kind", "band"?, "reason"}``. JSON-safe; the pipeline writes it to
        ``masters.json``.

    A bad calibration frame never stops the session: an unreadable, all-NaN, constant or
    wrongly shaped frame (not the science frames' shape) is left out with its reason and the
    master is built from the others; when none is usable, or the master cannot be built, the
    library master is used (recorded with the reason), else the kind is flagged missing.
    """
    out_dir = Path(out_dir)
    if library is None and library_root is not None:
        library = MasterLibrary(library_root)
    by_kind, bands, binning, mjd_by_path = _plan_frames(frames, binning, bands)
    binning = norm_binning(binning or (1, 1))
    summary = {
        "bias": None,
        "dark": None,
        "flat": {},
        "flags": [],
        "camera": str(camera),
        "binning": list(binning),
    }
    all_mjd = [m for m in mjd_by_path.values() if m is not None]
    read_mjds = []  # MJDs of the calibration frames read here (library time without a manifest)

    def from_library(kind, band=None):
        if library is None:
            return None
        seen = all_mjd or [m for m in read_mjds if m is not None]
        when = (
            session_mjd if session_mjd is not None else (float(np.median(seen)) if seen else None)
        )
        if when is None:
            summary["flags"].append(f"no_session_time_for_library_{kind}")
            return None
        match = library.find_nearest(
            kind,
            camera=camera,
            binning=binning,
            band=band,
            mjd=when,
            max_delta_days=max_age_days,
            shape=shape,
        )
        if match is None:
            return None
        log.info(
            "masters: %s%s from library %s (%.1f d away)",
            kind,
            f" {band}" if band else "",
            match.path,
            match.delta_days,
        )
        return {**match.to_dict(), "source": "library"}

    rejected = summary["rejected"] = []  # calibration frames left out, with the reason
    shape = _science_shape(frames)

    def build(kind, paths, make, out_name, band=None, library_ok=True):
        """Read the usable frames of one master and combine them; None when none is usable."""
        try:
            n0 = len(rejected)
            data, headers, mjds, used = _read_stack(
                paths, kind, read_kwargs, shape=shape, rejected=rejected
            )
            if band is not None:
                for r in rejected[n0:]:
                    r["band"] = band
            read_mjds.extend(mjds)
            if not data:
                return None, None
            master = make(data, headers, used)
        except Exception as exc:  # never lose the night for one master: library or none
            log.exception("masters: %s%s not built", kind, f" {band}" if band else "")
            summary["flags"].append(f"{kind}{'_' + safe_name(band) if band else ''}_not_built")
            summary.setdefault("errors", []).append(
                {"kind": kind, "band": band, "reason": f"{type(exc).__name__}: {exc}"}
            )
            return None, None
        lib = library if library_ok(master) else None
        entry = _save(master, out_dir / out_name, used, mjds, camera, binning, band, lib)
        n_bad = len(paths) - len(used)
        if n_bad:
            entry["n_rejected_inputs"] = n_bad
        return entry, master

    def fallback(kind, paths, band=None):
        entry = from_library(kind, band)
        if entry is not None and paths:
            n = sum(1 for r in rejected if r["kind"] == kind and r.get("band") == band)
            entry["reason"] = (
                f"none of the {len(paths)} session {kind} frames"
                f"{' of band ' + str(band) if band else ''} is usable ({n} rejected): "
                "library master used"
            )
        return entry

    # bias
    bias_img = None
    entry = None
    if by_kind.get("bias"):
        entry, master = build(
            "bias",
            by_kind["bias"],
            lambda data, headers, used: make_master_bias(
                data, method=combine, clip_sigma=clip_sigma
            ),
            "bias.fits",
            library_ok=lambda m: True,
        )
        bias_img = master.image if master is not None else None
    if entry is None:
        entry = fallback("bias", by_kind.get("bias"))
        if entry:
            bias_img = load_master(entry["path"])[0]
    summary["bias"] = entry
    if entry is None:
        summary["flags"].append("no_bias")

    # dark
    dark_img = None
    entry = None
    if by_kind.get("dark"):

        def make_dark(data, headers, used):
            bias = bias_img if bias_img is not None and bias_img.shape == data[0].shape else None
            t = [_exptime(h, p) for h, p in zip(headers, used)]
            return make_master_dark(
                data, exptimes_s=t, master_bias=bias, method=combine, clip_sigma=clip_sigma
            )

        entry, master = build(
            "dark",
            by_kind["dark"],
            make_dark,
            "dark.fits",
            library_ok=lambda m: "dark_includes_bias" not in m.flags,
        )
        dark_img = master.image if master is not None else None
    if entry is None:
        entry = fallback("dark", by_kind.get("dark"))
        if entry:
            dark_img = load_master(entry["path"])[0]
    summary["dark"] = entry
    if entry is None:
        summary["flags"].append("no_dark")

    # flats
    for band, paths_b in sorted(by_kind.get("flat", {}).items(), key=lambda kv: str(kv[0])):

        def make_flat(data, headers, used):
            same = data[0].shape
            t = [_exptime(h, p, default=0.0) for h, p in zip(headers, used)]
            return make_master_flat(
                data,
                master_bias=bias_img if bias_img is not None and bias_img.shape == same else None,
                master_dark_rate=dark_img
                if dark_img is not None and dark_img.shape == same
                else None,
                exptimes_s=t,
                method=combine,
                clip_sigma=clip_sigma,
            )

        name = f"flat_{safe_name(band)}.fits" if band else "flat.fits"
        entry, _ = build("flat", paths_b, make_flat, name, band=band, library_ok=lambda m: True)
        if entry is None:
            entry = fallback("flat", paths_b, band)
        if entry is not None:
            summary["flat"][band or ""] = entry
    for band in bands or ():
        if band not in summary["flat"]:
            entry = from_library("flat", band)
            if entry:
                summary["flat"][band] = entry
            else:
                summary["flags"].append(f"flat_missing_{band}")
    if rejected:
        log.warning(
            "masters: %d calibration frames left out: %s",
            len(rejected),
            "; ".join(f"{Path(r['path']).name}: {r['reason']}" for r in rejected),
        )
    return summary


def _plan_frames(frames, binning, bands):
    """Normalise the adapter input.

    Returns ({"bias": [...], "dark": [...], "flat": {band: [...]}}, bands, binning, mjd_by_path).
    """
    by_kind = {"bias": [], "dark": [], "flat": {}}
    mjd_by_path = {}
    if "groups" in frames:  # a SessionPlan manifest
        for g in frames.get("groups", []):
            kind = g.get("kind")
            if kind in ("bias", "dark"):
                by_kind[kind] += list(g["paths"])
            elif kind == "flat":
                by_kind["flat"].setdefault(g.get("band"), []).extend(g["paths"])
            if binning is None and g.get("binning") and kind in ("bias", "dark", "flat", "science"):
                binning = tuple(g["binning"])
        for m in frames.get("frames", []):
            mjd_by_path[str(m.get("path"))] = m.get("mjd_obs")
        if bands is None:
            bands = list(frames.get("bands", []))
    else:
        for key, paths in frames.items():
            paths = [str(p) for p in paths]
            if key in ("bias", "dark"):
                by_kind[key] += paths
            elif key == "flat":
                for p in paths:
                    band = fits.getval(p, "FILTER", ext=0) if _has_key(p, "FILTER") else None
                    by_kind["flat"].setdefault(
                        None if band is None else str(band).strip(), []
                    ).append(p)
            elif key.startswith("flat_"):
                by_kind["flat"].setdefault(key[5:], []).extend(paths)
            else:
                msg = f"unknown frame kind {key!r}: expected bias, dark, flat or flat_<band>"
                raise ValueError(msg)
    return by_kind, bands, binning, mjd_by_path


def _has_key(path, key):
    try:
        with fits.open(path, mode="readonly", memmap=False) as hdul:
            return key in hdul[0].header
    except Exception:  # an unreadable flat is rejected with its reason when the stack is read
        return False


def _science_shape(frames):
    """Majority (ny, nx) of the science frames of a manifest, or None."""
    if not isinstance(frames, dict) or "frames" not in frames:
        return None
    shapes = [
        tuple(int(v) for v in m["shape"])
        for m in frames.get("frames", [])
        if m.get("imagetyp") == "science" and m.get("shape") and min(m["shape"]) > 0
    ]
    if not shapes:
        return None
    return max(sorted(set(shapes)), key=shapes.count)


def _read_stack(paths, kind, read_kwargs=None, *, shape=None, rejected=None):
    """Read the usable calibration frames of one master with `~rpp_tasks.inputs.reader.read_frame`.

    A frame that cannot be read or checked (all-NaN, constant, truncated, ...), a dark without a
    positive exposure, or a frame whose shape is not ``shape`` (the science frames'; default the
    majority shape of the stack) is left out and appended to ``rejected`` as
    ``{"path", "kind", "reason"}``: one bad calibration frame never stops the master.
    """
    from rpp_tasks.exceptions import FrameRejected
    from rpp_tasks.inputs.reader import read_frame

    rejected = rejected if rejected is not None else []

    def reject(p, reason):
        rejected.append({"path": str(p), "kind": kind, "reason": reason})
        log.warning("masters: %s frame %s left out: %s", kind, Path(p).name, reason)

    data, headers, used = [], [], []
    for p in paths:
        try:
            raw = read_frame(p, imagetyp=kind, **(read_kwargs or {}))
        except FrameRejected as exc:
            reject(p, exc.reason)
            continue
        except Exception as exc:
            reject(p, f"unreadable ({type(exc).__name__}: {exc})")
            continue
        if kind == "dark":
            try:
                t = _exptime(raw.header, p)
            except ValueError:
                t = None
            if t is None or not np.isfinite(t) or t <= 0:
                reject(p, f"a dark needs a positive exposure time (EXPTIME={t})")
                continue
        data.append(raw.data)
        headers.append(raw.header)
        used.append(str(p))
    shapes = [d.shape for d in data]
    common = (
        shape
        if shape is not None
        else (max(sorted(set(shapes)), key=shapes.count) if shapes else None)
    )
    keep = []
    for i, sh in enumerate(shapes):
        if sh == tuple(common):
            keep.append(i)
        else:
            whose = "the science frames'" if shape is not None else "the other frames'"
            reject(used[i], f"shape {sh[1]}x{sh[0]} differs from {whose} {common[1]}x{common[0]}")
    mjds = [_mjd(headers[i]) for i in keep]
    return [data[i] for i in keep], [headers[i] for i in keep], mjds, [used[i] for i in keep]


def _exptime(header, path, default=None):
    for key in ("EXPTIME", "EXPOSURE", "EXP_TIME"):
        if key in header:
            try:
                return float(header[key])
            except (TypeError, ValueError):
                pass
    if default is not None:
        return default
    msg = f"{path}: no EXPTIME/EXPOSURE keyword"
    raise ValueError(msg)


def _mjd(header):
    if "MJD-OBS" in header:
        with contextlib.suppress(TypeError, ValueError):
            return float(header["MJD-OBS"])
    if "DATE-OBS" in header:
        from astropy.time import Time

        with contextlib.suppress(Exception):
            return float(Time(str(header["DATE-OBS"]).strip(), scale="utc").mjd)
    return None


def _save(master, path, paths, mjds, camera, binning, band, library):
    finite = [m for m in mjds if m is not None]
    mjd = float(np.mean(finite)) if finite else None
    write_master(master, path, camera=camera, binning=binning, band=band, mjd=mjd, sources=paths)
    log.info("masters: wrote %s (%d frames, flags %s)", path, master.n_frames, list(master.flags))
    entry = {
        "path": str(path),
        "source": "session",
        "kind": master.kind,
        "band": band,
        "mjd": mjd,
        "inputs": [str(p) for p in paths],
        **{k: v for k, v in master.to_dict().items() if k != "kind"},
    }
    if library is not None and mjd is not None:
        lib = library.add(
            path,
            kind=master.kind,
            camera=camera,
            binning=binning,
            band=band,
            mjd=mjd,
            exptime_s=master.exptime_s,
            n_frames=master.n_frames,
        )
        entry["library_path"] = str(library.root / lib.path)
    return entry
