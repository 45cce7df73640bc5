"""Master frames on disk: their FITS form and the library that serves them across sessions.

write_master / load_master keep a MasterFrame's data, mask and provenance in one FITS file.
MasterLibrary is a folder of masters with an index.json (camera, kind, binning, band, exposure,
MJD, number of frames, path): run_masters (rpp_tasks.stages.masters) adds every master it builds,
and when a session has no calibration frames of a kind it takes the library master of the same
camera and binning (and band, for flats) nearest in time, optionally within max_age_days.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from astropy.io import fits

from rpp_tasks.stages.calibration import MASTER_KINDS, MasterFrame

__all__ = [
    "LibraryEntry",
    "LibraryMatch",
    "MasterLibrary",
    "load_master",
    "norm_binning",
    "safe_name",
    "write_master",
]

log = logging.getLogger(__name__)

_IMAGETYP = {"bias": "MASTER BIAS", "dark": "MASTER DARK", "flat": "MASTER FLAT"}
_BUNIT = {"bias": "adu", "dark": "adu / s", "flat": ""}


# ---------------------------------------------------------------------------------- FITS helpers
def write_master(
    master, path, *, camera=None, binning=None, band=None, mjd=None, sources=(), overwrite=True
):
    """
    Write a `MasterFrame` as FITS: float32 primary image (+ ``MASK`` uint8 extension if any).

    The header carries ``IMAGETYP='MASTER BIAS'`` (DARK, FLAT), ``BUNIT``, ``NCOMBINE``,
    ``INSTRUME`` (camera), ``XBINNING``/``YBINNING``, ``FILTER``, ``MJD-OBS``, ``EXPTIME`` and
    HISTORY
    lines with the method, clipping and input file names.

    Returns
    -------
    path : Path
    """
    path = Path(path)
    hdr = fits.Header()
    hdr["IMAGETYP"] = (_IMAGETYP[master.kind], "rpp_tasks master calibration")
    hdr["RPPKIND"] = (master.kind, "master kind")
    hdr["BUNIT"] = _BUNIT[master.kind]
    hdr["NCOMBINE"] = (master.n_frames, "frames combined")
    if camera is not None:
        hdr["INSTRUME"] = str(camera)
    if binning is not None:
        bx, by = norm_binning(binning)
        hdr["XBINNING"], hdr["YBINNING"] = bx, by
    if band is not None:
        hdr["FILTER"] = str(band)
    if mjd is not None:
        hdr["MJD-OBS"] = (float(mjd), "mean MJD of the input frames")
    if master.exptime_s is not None:
        hdr["EXPTIME"] = (float(master.exptime_s), "mean exposure of the inputs [s]")
    from rpp_tasks import __version__

    hdr.add_history(
        f"rpp_tasks {__version__}: {master.kind} master from {master.n_frames} frames, "
        f"{master.method} combine, clip {master.clip_sigma} sigma (median/MAD), "
        f"{master.n_rejected_px} values rejected"
    )
    if master.kind == "dark":
        hdr.add_history("dark current rate in ADU/s (bias subtracted, divided by EXPTIME)")
    if master.kind == "flat":
        hdr.add_history("each flat bias/dark corrected and normalised by its median; median 1")
    for flag in master.flags:
        hdr.add_history(f"flag: {flag}")
    for s in sources:
        hdr.add_history(f"input: {Path(s).name}")
    hdus = [fits.PrimaryHDU(np.asarray(master.image, dtype=np.float32), header=hdr)]
    if master.mask is not None:
        hdus.append(fits.ImageHDU(master.mask.astype(np.uint8), name="MASK"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fits.HDUList(hdus).writeto(tmp, overwrite=True)
    if path.exists() and not overwrite:
        tmp.unlink()
        msg = f"{path} exists"
        raise FileExistsError(msg)
    os.replace(tmp, path)
    return path


def load_master(path):
    """
    Read a master image: the primary HDU if it holds a 2-D image, else the ``IMAGE``/``SCI``
    extension, else the first 2-D image extension (LSST-style MEF masters: the image plane).

    Returns
    -------
    image : numpy.ndarray
        float32.
    header : astropy.io.fits.Header
        The primary header updated with the image extension's keywords.
    mask : numpy.ndarray or None
        bool from a ``MASK`` extension written by `write_master` (uint8), else None.
    """
    with fits.open(path, mode="readonly", memmap=False) as hdul:
        candidates = [h for h in hdul if h.is_image and h.data is not None and h.data.ndim == 2]
        if not candidates:
            msg = f"{path}: no 2-D image HDU"
            raise ValueError(msg)
        named = [h for h in candidates if h.name in ("PRIMARY", "IMAGE", "SCI")]
        hdu = (named or candidates)[0]
        image = np.asarray(hdu.data, dtype=np.float32)
        header = hdul[0].header.copy()
        if hdu is not hdul[0]:
            for card in hdu.header.cards:
                if card.keyword not in ("", "COMMENT", "HISTORY") and not _structural(card.keyword):
                    header[card.keyword] = (card.value, card.comment)
        mask = None
        if "MASK" in hdul and hdul["MASK"].data is not None and hdul["MASK"].data.dtype == np.uint8:
            mask = np.asarray(hdul["MASK"].data, dtype=bool)
    return image, header, mask


def _structural(key):
    return (
        key in ("SIMPLE", "XTENSION", "BITPIX", "EXTEND", "PCOUNT", "GCOUNT", "BSCALE", "BZERO")
        or key.startswith("NAXIS")
        or key.startswith("Z")
        or key.startswith("TTYPE")
        or key.startswith("TFORM")
    )


def norm_binning(binning):
    """``(bx, by)`` integers from a binning given as an int, a pair or a ``"2x2"`` string."""
    if isinstance(binning, (int, np.integer)):
        return int(binning), int(binning)
    if isinstance(binning, str):
        parts = re.split(r"[x, ]+", binning.strip())
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    b = tuple(int(v) for v in binning)
    if len(b) != 2 or min(b) < 1:
        msg = f"binning must be (bx, by) with positive integers, got {binning!r}"
        raise ValueError(msg)
    return b


# ---------------------------------------------------------------------------------- library
@dataclass(frozen=True)
class LibraryEntry:
    """One master in the library index (``path`` relative to the library root)."""

    kind: str
    camera: str
    binning: tuple[int, int]
    band: str | None
    mjd: float
    path: str
    exptime_s: float | None = None
    n_frames: int | None = None
    added_utc: str = ""
    shape: tuple[int, int] | None = None  # (ny, nx); None in indexes written before it was kept

    def to_dict(self) -> dict:
        d = asdict(self)
        d["binning"] = list(self.binning)
        d["shape"] = None if self.shape is None else list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d) -> LibraryEntry:
        return cls(
            kind=d["kind"],
            camera=d["camera"],
            binning=tuple(d["binning"]),
            band=d.get("band"),
            mjd=float(d["mjd"]),
            path=d["path"],
            exptime_s=d.get("exptime_s"),
            n_frames=d.get("n_frames"),
            added_utc=d.get("added_utc", ""),
            shape=tuple(int(v) for v in d["shape"]) if d.get("shape") else None,
        )


@dataclass(frozen=True)
class LibraryMatch:
    """The master chosen by `MasterLibrary.find_nearest` (``path`` absolute)."""

    path: Path
    mjd: float
    delta_days: float
    kind: str
    camera: str
    binning: tuple[int, int]
    band: str | None = None
    exptime_s: float | None = None
    n_frames: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["binning"] = list(self.binning)
        return d


class MasterLibrary:
    """
    A folder of master calibrations with a JSON index, for sessions without calibration frames.

    Layout: ``<root>/index.json`` and
    ``<root>/<kind>/<kind>_<camera>_<bx>x<by>[_<band>]_<mjd>.fits``.
    Masters added from a path are copied in, so the library does not depend on session folders.
    The index is rewritten atomically under an exclusive file lock (concurrent tasks may add).

    Parameters
    ----------
    root : str or Path
        Library folder (created if missing).
    """

    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index_path = self.root / "index.json"

    def __repr__(self):
        return f"MasterLibrary({str(self.root)!r})"

    def entries(self) -> list[LibraryEntry]:
        """All index entries."""
        if not self.index_path.exists():
            return []
        with open(self.index_path, encoding="utf-8") as fh:
            return [LibraryEntry.from_dict(d) for d in json.load(fh).get("masters", [])]

    def add(self, source, *, kind, camera, binning, mjd, band=None, exptime_s=None, n_frames=None):
        """
        Add a master (a FITS path, a `MasterFrame` or a 2-D array) to the library.

        An entry with the same kind, camera, binning, band and MJD (to 1e-5 d) is replaced, so a
        re-run does not duplicate masters.

        Returns
        -------
        entry : `LibraryEntry`
        """
        if kind not in MASTER_KINDS:
            msg = f"kind must be one of {MASTER_KINDS}, got {kind!r}"
            raise ValueError(msg)
        if not np.isfinite(mjd):
            msg = f"mjd must be finite, got {mjd!r}"
            raise ValueError(msg)
        bx, by = norm_binning(binning)
        band = None if kind != "flat" else band
        name = (
            "_".join(
                p
                for p in (
                    kind,
                    safe_name(camera),
                    f"{bx}x{by}",
                    safe_name(band) if band else "",
                    f"{mjd:.5f}",
                )
                if p
            )
            + ".fits"
        )
        dest = self.root / kind / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, (str, os.PathLike)):
            src = Path(source)
            if src.resolve() != dest.resolve():
                tmp = dest.with_name(f".{dest.name}.tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dest)
        else:
            master = (
                source
                if isinstance(source, MasterFrame)
                else MasterFrame(
                    kind,
                    np.asarray(source, dtype=np.float32),
                    n_frames=n_frames or 0,
                    exptime_s=exptime_s,
                )
            )
            n_frames = n_frames if n_frames is not None else master.n_frames
            exptime_s = exptime_s if exptime_s is not None else master.exptime_s
            write_master(master, dest, camera=camera, binning=(bx, by), band=band, mjd=mjd)
        entry = LibraryEntry(
            shape=_fits_shape(dest),
            kind=kind,
            camera=str(camera),
            binning=(bx, by),
            band=band,
            mjd=float(mjd),
            path=str(dest.relative_to(self.root)),
            exptime_s=None if exptime_s is None else float(exptime_s),
            n_frames=None if n_frames is None else int(n_frames),
            added_utc=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        with self._locked():
            kept = [
                e
                for e in self.entries()
                if not (
                    e.kind == kind
                    and e.camera == entry.camera
                    and e.binning == entry.binning
                    and e.band == band
                    and abs(e.mjd - entry.mjd) < 1e-5
                )
            ]
            kept.append(entry)
            kept.sort(key=lambda e: (e.kind, e.camera, e.binning, e.band or "", e.mjd))
            self._write_index(kept)
        log.info(
            "master library %s: added %s (%s, %dx%d, band %s, MJD %.5f)",
            self.root,
            entry.path,
            camera,
            bx,
            by,
            band,
            mjd,
        )
        return entry

    def find_nearest(
        self, kind, *, camera, binning, mjd, band=None, max_delta_days=None, shape=None
    ):
        """
        The master of ``kind`` for this camera, binning and frame shape (and band, for flats)
        nearest in time.

        Parameters
        ----------
        kind : {"bias", "dark", "flat"}
        camera : str
        binning : (int, int) or int
        mjd : float
            Time of the session/frame.
        band : str, optional
            Required match for flats (``None`` matches only flats without band); ignored otherwise.
        max_delta_days : float, optional
            Ignore masters further than this in time.
        shape : (int, int), optional
            The science frames' (ny, nx): a master of another shape (a sub-frame, another
            region of interest) cannot calibrate them and is passed over.

        Returns
        -------
        match : `LibraryMatch` or None
            None when nothing matches (the caller records "no master").
        """
        if kind not in MASTER_KINDS:
            msg = f"kind must be one of {MASTER_KINDS}, got {kind!r}"
            raise ValueError(msg)
        bx, by = norm_binning(binning)
        best, best_key = None, None
        for e in self.entries():
            if e.kind != kind or e.camera != str(camera) or e.binning != (bx, by):
                continue
            if kind == "flat" and e.band != band:
                continue
            delta = abs(e.mjd - float(mjd))
            if max_delta_days is not None and delta > max_delta_days:
                continue
            if not (self.root / e.path).exists():
                log.warning("master library %s: %s listed but missing", self.root, e.path)
                continue
            if shape is not None and tuple(shape) != (e.shape or _fits_shape(self.root / e.path)):
                continue
            key = (delta, -(e.n_frames or 0), e.mjd)
            if best_key is None or key < best_key:
                best, best_key = e, key
        if best is None:
            return None
        return LibraryMatch(
            path=self.root / best.path,
            mjd=best.mjd,
            delta_days=abs(best.mjd - float(mjd)),
            kind=best.kind,
            camera=best.camera,
            binning=best.binning,
            band=best.band,
            exptime_s=best.exptime_s,
            n_frames=best.n_frames,
        )

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        with open(self.root / ".index.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _write_index(self, entries):
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".index.", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"masters": [e.to_dict() for e in entries]}, fh, indent=1)
        os.replace(tmp, self.index_path)


def _fits_shape(path) -> tuple[int, int] | None:
    """(ny, nx) of a master's primary image from its header, or None if unreadable."""
    from astropy.io import fits

    try:
        h = fits.getheader(path)
        return int(h["NAXIS2"]), int(h["NAXIS1"])
    except Exception:  # a damaged file: find_nearest's caller reads it and reports why
        return None


def safe_name(s):
    """``s`` reduced to characters that are safe in a file name (``x`` when nothing is left)."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(s)).strip("-") or "x"
