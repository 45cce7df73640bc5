"""Classify the frames of a session and group them for calibration and reduction.

* `classify_frame` -- ``bias``, ``dark``, ``flat``, ``science`` or ``unknown`` for one frame.
* `group_session` -- `SessionPlan`: the session's files grouped by type and by the keys that
  decide which master calibrates what (band, exposure time, binning); unreadable files are listed
  with their reason instead of stopping the grouping. Only headers are read.

The plan is what ``manifest.json`` holds (`SessionPlan.to_dict` / `SessionPlan.from_dict`).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from rpp_tasks.exceptions import FrameRejected
from rpp_tasks.inputs.header import (
    FrameMeta,
    normalize_header,
    normalize_imagetyp,
    normalize_kwargs_from_config,
)
from rpp_tasks.inputs.reader import read_header

__all__ = [
    "FRAME_KINDS",
    "DEFAULT_IGNORE",
    "FrameGroup",
    "RejectedFile",
    "SessionPlan",
    "classify_frame",
    "group_session",
]

log = logging.getLogger(__name__)

FRAME_KINDS = ("bias", "dark", "flat", "science", "unknown")

DEFAULT_IGNORE = (
    "*.yaml",
    "*.yml",
    "*.txt",
    "*.json",
    "*.log",
    "*.csv",
    "*.ecsv",
    "*.xml",
    "*.vot",
    "*.pdf",
    "*.zip",
    "*.jpg",
    "*.jpeg",
    "*.png",
    "*.tif",
    "*.tiff",
    "*.md",
    "*.ini",
    "*.cfg",
    "*.db",
    "*.sqlite",
    ".*",
    "*~",
    "thumbs.db",
    "*.tmp",
    "*.part",
)

# OBJECT/FIELD values that name a calibration frame. Only flats and biases: "Dark" starts many real
# object names (Dark Doodad Nebula) and darks are reliably typed by capture software.
_OBJECT_RULES = (
    ("flat", re.compile(r"^\s*(sky|dome|twilight|twi|lamp|auto)?[\s_-]*flat", re.IGNORECASE)),
    ("bias", re.compile(r"^\s*(bias|zero|offset)([\s_\-\d]|$)", re.IGNORECASE)),
)


def _match_patterns(name: str, patterns: Mapping[str, Iterable[str]] | None) -> str | None:
    """The first kind (in bias, dark, flat order) whose case-insensitive glob matches ``name``."""
    if not patterns:
        return None
    unknown = set(patterns) - set(FRAME_KINDS)
    if unknown:
        msg = f"patterns: unknown frame kinds {sorted(unknown)} (expected some of {FRAME_KINDS})"
        raise ValueError(msg)
    low = name.lower()
    for kind in ("bias", "dark", "flat", "science"):
        for pat in patterns.get(kind, ()) or ():
            if fnmatch.fnmatchcase(low, str(pat).lower()):
                return kind
    return None


def classify_frame(meta_or_imagetyp, path, *, patterns=None):
    """
    Frame type of one file: ``bias``, ``dark``, ``flat``, ``science`` or ``unknown``.

    Order of the rules:

    1. The header type (``FrameMeta.imagetyp``, i.e. IMAGETYP/FRAME/OBSTYPE, a zero-second dark
       counting as a bias) when it is a calibration type: ``bias``, ``dark`` or ``flat`` are trusted.
    2. Otherwise (header says science, or nothing usable) a configured file-name pattern overrides
       it: ``patterns = {"bias": ["bias*", "offset*"], "dark": ["dark*"], "flat": ["flat*"]}``
       matched case-insensitively against the file name (``session.frame_types`` in the
       observatory YAML). This is how an operator fixes software that writes every frame as
       ``Light``.
    3. Otherwise an OBJECT/FIELD that names a calibration: starting with ``flat``, ``skyflat``,
       ``twilight flat``, ``domeflat`` ... -> flat; ``bias``, ``zero``, ``offset`` -> bias.
       The Huntsman flats say ``IMAGETYP='Light Frame'`` but ``FIELD='FlatDither00'``: they are
       flats by this rule. Darks are not inferred from object names ("Dark Doodad Nebula").
    4. Otherwise the header type (``science`` or ``unknown``).

    Parameters
    ----------
    meta_or_imagetyp : `~rpp_tasks.inputs.header.FrameMeta` or str or None
        The normalised header, or a raw/normalised IMAGETYP value (then rule 3 is skipped).
    path : str or Path
        The file (only its name is used).
    patterns : Mapping[str, list of str], optional
        Kind -> case-insensitive globs on the file name.

    Returns
    -------
    str
    """
    obj = None
    if isinstance(meta_or_imagetyp, FrameMeta):
        kind = meta_or_imagetyp.imagetyp
        obj = meta_or_imagetyp.object
    elif meta_or_imagetyp is None:
        kind = "unknown"
    elif isinstance(meta_or_imagetyp, str):
        kind = (
            meta_or_imagetyp
            if meta_or_imagetyp in FRAME_KINDS
            else normalize_imagetyp(meta_or_imagetyp)[0]
        )
    else:
        msg = f"meta_or_imagetyp must be a FrameMeta, a str or None, got {type(meta_or_imagetyp).__name__}"
        raise TypeError(msg)
    if kind in ("bias", "dark", "flat"):
        return kind
    by_name = _match_patterns(Path(path).name, patterns)
    if by_name is not None:
        return by_name
    if obj:
        for k, rx in _OBJECT_RULES:
            if rx.match(obj):
                return k
    return kind if kind in FRAME_KINDS else "unknown"


# ----------------------------------------------------------------------------------------------
# Session plan
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrameGroup:
    """Frames that share one calibration or reduction setting.

    Keys by kind: science ``(band, exptime_s, binning)``, bias ``(binning)``, dark
    ``(exptime_s, binning)``, flat ``(band, binning)``, unknown ``(band, exptime_s, binning)``;
    the keys that do not apply are None.
    """

    kind: str
    band: str | None
    exptime_s: float | None
    binning: tuple[int, int]
    paths: tuple[str, ...]

    @property
    def label(self) -> str:
        """Short stable name, e.g. ``science_g_300s_1x1``, ``bias_1x1``."""
        parts = [self.kind]
        if self.band is not None:
            parts.append(re.sub(r"[^A-Za-z0-9.+-]+", "-", self.band))
        if self.exptime_s is not None:
            parts.append(f"{self.exptime_s:g}s")
        parts.append(f"{self.binning[0]}x{self.binning[1]}")
        return "_".join(parts)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "label": self.label,
            "band": self.band,
            "exptime_s": self.exptime_s,
            "binning": list(self.binning),
            "paths": list(self.paths),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> FrameGroup:
        return cls(
            kind=d["kind"],
            band=d.get("band"),
            exptime_s=d.get("exptime_s"),
            binning=tuple(int(v) for v in d["binning"]),
            paths=tuple(d["paths"]),
        )


@dataclass(frozen=True)
class RejectedFile:
    """A file that could not be used, with the reason in plain words."""

    path: str
    reason: str

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class SessionPlan:
    """The frames of one session, grouped (see `group_session`).

    Attributes
    ----------
    groups : tuple of `FrameGroup`
        Sorted by kind (bias, dark, flat, science, unknown) then key.
    frames : tuple of `~rpp_tasks.inputs.header.FrameMeta`
        Every accepted frame, sorted by path; ``imagetyp`` is the classified kind.
    rejected : tuple of `RejectedFile`
        Files that are not usable frames (bad FITS, missing keywords ...).
    ignored : tuple of str
        Files skipped by the ignore patterns (text, YAML, previews ...).
    """

    groups: tuple[FrameGroup, ...]
    frames: tuple[FrameMeta, ...]
    rejected: tuple[RejectedFile, ...] = ()
    ignored: tuple[str, ...] = ()

    def by_kind(self, kind: str) -> tuple[FrameGroup, ...]:
        """The groups of one kind."""
        if kind not in FRAME_KINDS:
            msg = f"kind must be one of {FRAME_KINDS}, got {kind!r}"
            raise ValueError(msg)
        return tuple(g for g in self.groups if g.kind == kind)

    def paths(self, kind: str) -> tuple[str, ...]:
        """Every path of one kind, sorted."""
        return tuple(sorted(p for g in self.by_kind(kind) for p in g.paths))

    @property
    def counts(self) -> dict[str, int]:
        out = {k: len(self.paths(k)) for k in FRAME_KINDS}
        out["rejected"] = len(self.rejected)
        return out

    @property
    def bands(self) -> tuple[str, ...]:
        """Bands of the science frames, sorted."""
        return tuple(sorted({g.band for g in self.by_kind("science") if g.band is not None}))

    def to_dict(self) -> dict:
        """JSON-safe dict for ``manifest.json``; `from_dict` inverts it."""
        return {
            "counts": self.counts,
            "bands": list(self.bands),
            "groups": [g.to_dict() for g in self.groups],
            "frames": [m.to_dict() for m in self.frames],
            "rejected": [r.to_dict() for r in self.rejected],
            "ignored": list(self.ignored),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> SessionPlan:
        return cls(
            groups=tuple(FrameGroup.from_dict(g) for g in d.get("groups", ())),
            frames=tuple(FrameMeta.from_dict(m) for m in d.get("frames", ())),
            rejected=tuple(RejectedFile(r["path"], r["reason"]) for r in d.get("rejected", ())),
            ignored=tuple(d.get("ignored", ())),
        )


def _expand(paths) -> list[Path]:
    """Files from paths and folders (recursively), sorted, without duplicates."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out = set()
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.update(q for q in p.rglob("*") if q.is_file())
        else:
            out.add(p)
    return sorted(out)


def _ignored(path: Path, ignore) -> bool:
    name = path.name.lower()
    return any(fnmatch.fnmatchcase(name, str(pat).lower()) for pat in ignore)


def _round_exptime(exptime_s):
    return None if exptime_s is None else round(float(exptime_s), 3)


def _group_key(kind: str, meta: FrameMeta):
    b = tuple(meta.binning)
    if kind == "bias":
        return (None, None, b)
    if kind == "dark":
        return (None, _round_exptime(meta.exptime_s), b)
    if kind == "flat":
        return (meta.band, None, b)
    return (meta.band, _round_exptime(meta.exptime_s), b)


def _sort_key(key):
    band, exptime, binning = key
    return (band is not None, band or "", exptime is not None, exptime or 0.0, binning)


def group_session(paths, obs=None, *, normalize_kwargs=None, patterns=None, ignore=DEFAULT_IGNORE):
    """
    Group a session's files by frame type and calibration key, reading headers only.

    Parameters
    ----------
    paths : str, Path or iterable of them
        Files and/or folders (searched recursively).
    obs : `~rpp_tasks.config.ObservatoryConfig`, optional
        Supplies ``normalize_kwargs`` (camera, filter aliases) and ``patterns``
        (``session.frame_types``) when those are not given.
    normalize_kwargs : Mapping, optional
        Keyword arguments of `~rpp_tasks.inputs.header.normalize_header` (``filter_aliases``,
        ``default_band``, ``gain_e_per_adu``, ``bayer_pattern`` ...).
    patterns : Mapping[str, list of str], optional
        File-name globs per kind, see `classify_frame`.
    ignore : iterable of str, optional
        Case-insensitive globs of file names that are not frames (skipped silently, listed in
        ``SessionPlan.ignored``).

    Returns
    -------
    `SessionPlan`
        Deterministic: files, groups and rejected entries are sorted. A bad file lands in
        ``rejected`` with the reason; it never stops the grouping.
    """
    kw = dict(normalize_kwargs_from_config(obs)) if obs is not None else {}
    kw.update(normalize_kwargs or {})
    if patterns is None and obs is not None:
        session = obs.get("session") if isinstance(obs, Mapping) else getattr(obs, "session", None)
        ft = (
            session.get("frame_types")
            if isinstance(session, Mapping)
            else getattr(session, "frame_types", None)
        )
        patterns = dict(ft or {})
    bayer = kw.get("bayer_pattern")

    groups: dict[tuple[str, tuple], list[str]] = {}
    frames, rejected, ignored = [], [], []
    for path in _expand(paths):
        if _ignored(path, ignore):
            ignored.append(str(path))
            continue
        try:
            header, _, _ = read_header(path, bayer_pattern=bayer)
            meta = normalize_header(header, path=path, **kw)
        except FrameRejected as exc:
            rejected.append(RejectedFile(str(path), exc.reason))
            log.warning("session grouping: %s rejected: %s", path.name, exc.reason)
            continue
        kind = classify_frame(meta, path, patterns=patterns)
        if kind != meta.imagetyp:
            warns = (*meta.warnings, f"classified as {kind} (header type {meta.imagetyp})")
            meta = FrameMeta(**{**meta.__dict__, "imagetyp": kind, "warnings": warns})
        frames.append(meta)
        groups.setdefault((kind, _group_key(kind, meta)), []).append(str(path))

    order = {k: i for i, k in enumerate(FRAME_KINDS)}
    plan_groups = tuple(
        FrameGroup(
            kind=kind, band=key[0], exptime_s=key[1], binning=key[2], paths=tuple(sorted(ps))
        )
        for (kind, key), ps in sorted(
            groups.items(), key=lambda kv: (order[kv[0][0]], _sort_key(kv[0][1]))
        )
    )
    plan = SessionPlan(
        groups=plan_groups,
        frames=tuple(sorted(frames, key=lambda m: m.path)),
        rejected=tuple(sorted(rejected, key=lambda r: r.path)),
        ignored=tuple(sorted(ignored)),
    )
    log.info("session grouping: %s", ", ".join(f"{k}={v}" for k, v in plan.counts.items()))
    return plan
