"""Classify every file of a session and group the frames for calibration and reduction.

* `classify_frame` / `classify_frame_reason` -- ``bias``, ``dark``, ``flat``, ``science`` or
  ``unknown`` for one frame (with the reason), by the rule documented in ``docs/inputs.md``.
* `group_session` -- `SessionPlan`: every file of the session with its outcome and reason
  (`SessionPlan.files`), the frames grouped by type and by the keys that decide which master
  calibrates what (band, exposure time, binning), a unique frame stem per file
  (`assign_stems`); unreadable or unclassifiable files are rejected with their reason instead
  of stopping the grouping. Only headers are read.

The plan is what ``manifest.json`` holds (`SessionPlan.to_dict` / `SessionPlan.from_dict`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from rpp_tasks.config_schema import FITS_EXTENSIONS
from rpp_tasks.exceptions import FrameRejected
from rpp_tasks.inputs.cards import first_value, to_float
from rpp_tasks.inputs.classify import (
    FRAME_KINDS,
    classify_frame,
    classify_frame_reason,
)
from rpp_tasks.inputs.header import (
    FrameMeta,
    frame_stem,
    normalize_header,
    normalize_kwargs_from_config,
)
from rpp_tasks.inputs.reader import read_header

__all__ = [
    "FRAME_KINDS",
    "OUTCOMES",
    "DEFAULT_IGNORE",
    "DEFAULT_EXTENSIONS",
    "FrameGroup",
    "RejectedFile",
    "FileOutcome",
    "SessionPlan",
    "classify_frame",
    "classify_frame_reason",
    "assign_stems",
    "group_session",
]

log = logging.getLogger(__name__)


#: What a file of a session ends as in the plan (`FileOutcome.outcome`).
OUTCOMES = ("science", "bias", "dark", "flat", "rejected", "ignored")

#: File names read as FITS (case-insensitive): the config's default list.
DEFAULT_EXTENSIONS = FITS_EXTENSIONS

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
    """A file that could not be used, with the reason in plain words (and its frame stem)."""

    path: str
    reason: str
    stem: str | None = None

    def to_dict(self) -> dict:
        d = {"path": self.path, "reason": self.reason}
        if self.stem is not None:
            d["stem"] = self.stem
        return d


@dataclass(frozen=True)
class FileOutcome:
    """What one file of the session ends as in the plan, and why.

    Attributes
    ----------
    path : str
    outcome : str
        ``science``, ``bias``, ``dark``, ``flat`` (a frame to use), ``rejected`` (a frame that
        cannot be used) or ``ignored`` (not a frame: text, previews, a name outside
        ``session.extensions``).
    reason : str
        How the type was decided (``"header IMAGETYP='Light'"``, ``"no IMAGETYP; a 120 s exposure
        with OBJECT ...: a sky frame"``) or why the file is rejected or ignored.
    stem : str or None
        The frame's folder name under ``frames/`` (unique in the session); None when ignored.
    warnings : tuple of str
        The header normalisation warnings (guesses made).
    """

    path: str
    outcome: str
    reason: str
    stem: str | None = None
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "outcome": self.outcome,
            "reason": self.reason,
            "stem": self.stem,
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> FileOutcome:
        return cls(
            path=d["path"],
            outcome=d["outcome"],
            reason=d["reason"],
            stem=d.get("stem"),
            warnings=tuple(d.get("warnings") or ()),
        )


@dataclass(frozen=True)
class SessionPlan:
    """The files of one session, classified and grouped (see `group_session`).

    Attributes
    ----------
    groups : tuple of `FrameGroup`
        Sorted by kind (bias, dark, flat, science) then key.
    frames : tuple of `~rpp_tasks.inputs.header.FrameMeta`
        Every accepted frame, sorted by path; ``imagetyp`` is the classified kind.
    rejected : tuple of `RejectedFile`
        Files that are not usable frames (bad FITS, missing keywords, unknown type ...).
    ignored : tuple of str
        Files that are not frames (ignore patterns, names outside ``session.extensions``).
    files : tuple of `FileOutcome`
        Every file, sorted by path, with its outcome and reason.
    """

    groups: tuple[FrameGroup, ...]
    frames: tuple[FrameMeta, ...]
    rejected: tuple[RejectedFile, ...] = ()
    ignored: tuple[str, ...] = ()
    files: tuple[FileOutcome, ...] = ()

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
    def stems(self) -> dict[str, str]:
        """Path -> frame stem of every frame and rejected file (unique in the session)."""
        return {f.path: f.stem for f in self.files if f.stem is not None}

    def stem_of(self, path) -> str:
        """The frame stem of one file of the plan (`frame_stem` for a file outside it)."""
        return self.stems.get(str(path)) or frame_stem(path)

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
        """JSON-safe dict for ``manifest.json``; `from_dict` inverts it.

        ``frames`` entries carry their ``stem`` next to the `FrameMeta` fields.
        """
        stems = self.stems
        return {
            "counts": self.counts,
            "bands": list(self.bands),
            "groups": [g.to_dict() for g in self.groups],
            "frames": [
                {**m.to_dict(), "stem": stems.get(m.path) or frame_stem(m.path)}
                for m in self.frames
            ],
            "rejected": [r.to_dict() for r in self.rejected],
            "ignored": list(self.ignored),
            "files": [f.to_dict() for f in self.files],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> SessionPlan:
        return cls(
            groups=tuple(FrameGroup.from_dict(g) for g in d.get("groups", ())),
            frames=tuple(
                FrameMeta.from_dict({k: v for k, v in m.items() if k != "stem"})
                for m in d.get("frames", ())
            ),
            rejected=tuple(
                RejectedFile(r["path"], r["reason"], r.get("stem")) for r in d.get("rejected", ())
            ),
            ignored=tuple(d.get("ignored", ())),
            files=tuple(FileOutcome.from_dict(f) for f in d.get("files", ())),
        )


# ----------------------------------------------------------------------------------------------
# Frame stems
# ----------------------------------------------------------------------------------------------
_MAX_STEM = 120


def _safe_stem(text: str) -> str:
    """A folder name: letters, digits and ``._+-`` kept, anything else (separators, spaces,
    ``$``, control characters) ``_``; never empty, never ``.``/``..``, at most 120 characters."""
    out = re.sub(r"[^\w.+-]+", "_", unicodedata.normalize("NFC", text))
    if set(out) <= {"."}:
        out = "frame" + out.replace(".", "_")
    if out.startswith(("-", ".")):
        out = "_" + out
    if len(out) > _MAX_STEM:
        digest = hashlib.sha1(out.encode()).hexdigest()[:8]
        out = f"{out[: _MAX_STEM - 9]}-{digest}"
    return out


def _rel(path: Path, root: Path | None) -> str:
    if root is not None:
        with contextlib.suppress(ValueError):
            return Path(path).relative_to(root).as_posix()
    return Path(path).name


def assign_stems(paths, root=None) -> dict[str, str]:
    """
    Unique, deterministic frame stems (folder names under ``frames/``) for the files of a session.

    A file's stem is its name without the FITS/compression suffixes (`frame_stem`), made safe as a
    folder name. Files whose stems collide (``x.fits`` and ``x.fit``, ``a/x.fits`` and
    ``b/x.fits``, ``X.fits`` and ``x.fits`` on a case-insensitive disk) are told apart by their
    path relative to ``root``: first the folders (``a__x``, ``b__x``), then, for those still alike,
    the full relative name with its suffix (``x.fits``, ``x.fit``), then that plus 8 hex digits of
    its SHA-1. The result
    depends only on the set of relative paths: a re-run of the same session gives the same stems.

    Parameters
    ----------
    paths : iterable of str or Path
    root : str or Path, optional
        The session folder (default: the common folder of the paths).

    Returns
    -------
    dict
        ``str(path)`` -> stem; stems are unique case-insensitively.
    """
    paths = sorted({str(p) for p in paths})
    if not paths:
        return {}
    if root is None:
        root = os.path.commonpath([str(Path(p).parent) for p in paths])
    root = Path(root)
    rel = {p: _rel(Path(p), root) for p in paths}
    base = {p: _safe_stem(frame_stem(p)) for p in paths}
    groups: dict[str, list[str]] = {}
    for p in paths:
        groups.setdefault(base[p].casefold(), []).append(p)
    out = {p: base[p] for p in paths}

    def folders_form(p):
        parts = rel[p].split("/")[:-1]
        return "__".join([*(_safe_stem(f) for f in parts), base[p]])

    def name_form(p):
        return "__".join(_safe_stem(f) for f in rel[p].split("/"))

    def hashed_form(p):
        digest = hashlib.sha1(rel[p].encode("utf-8", "surrogateescape")).hexdigest()[:8]
        return _safe_stem(f"{name_form(p)[: _MAX_STEM - 9]}-{digest}")

    for members in groups.values():
        if len(members) == 1:
            continue
        # each form is tried on the members the previous one left ambiguous
        todo = members
        for form in (folders_form, name_form, hashed_form):
            cand = {p: form(p) for p in todo}
            counts: dict[str, int] = {}
            for c in cand.values():
                counts[c.casefold()] = counts.get(c.casefold(), 0) + 1
            for p, c in cand.items():
                out[p] = c
            todo = [p for p in todo if counts[cand[p].casefold()] > 1]
            if not todo:
                break
    # a disambiguated stem may equal another file's plain stem (a file named 'a__x.fits'): hash
    seen: dict[str, str] = {}
    for p in paths:
        key = out[p].casefold()
        if key in seen:
            out[p] = hashed_form(p)
            key = out[p].casefold()
        seen[key] = p
    return out


# ----------------------------------------------------------------------------------------------
# Session plan
# ----------------------------------------------------------------------------------------------
def _expand(paths) -> tuple[list[Path], Path | None]:
    """Files from paths and folders (recursively), sorted, without duplicates; and the root."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    out = set()
    for p in paths:
        if p.is_dir():
            out.update(q for q in p.rglob("*") if q.is_file() or q.is_symlink())
        else:
            out.add(p)
    root = None
    if len(paths) == 1 and paths[0].is_dir():
        root = paths[0]
    elif out:
        root = Path(os.path.commonpath([str(q.parent) for q in out]))
    return sorted(out), root


def _ignored(path: Path, ignore) -> str | None:
    name = path.name.lower()
    for pat in ignore:
        if fnmatch.fnmatchcase(name, str(pat).lower()):
            return str(pat)
    return None


def _hidden_folder(path: Path, root: Path | None) -> str | None:
    """The first folder below root whose name starts with '.' (``.stversions``, ``.sync``)."""
    if root is None:
        return None
    try:
        parts = path.relative_to(root).parts[:-1]
    except ValueError:
        return None
    return next((p for p in parts if p.startswith(".")), None)


def _has_extension(path: Path, extensions) -> bool:
    name = path.name.lower()
    return any(name.endswith(str(e).lower()) for e in extensions)


def _looks_like_fits(path: Path) -> bool:
    with contextlib.suppress(OSError):
        with path.open("rb") as fh:
            return fh.read(9) == b"SIMPLE  ="
    return False


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


# What each kind needs from the header: science frames a time and an exposure (magnitudes per
# second, the night, light curves), darks an exposure (scaling); biases and flats nothing more.
_REQUIRED = {
    "science": ("DATE-OBS", "EXPTIME"),
    "dark": ("EXPTIME",),
    "flat": (),
    "bias": (),
}


def _session_setting(obs, name):
    if obs is None:
        return None
    session = obs.get("session") if isinstance(obs, Mapping) else getattr(obs, "session", None)
    if session is None:
        return None
    return session.get(name) if isinstance(session, Mapping) else getattr(session, name, None)


def _classify_one(path: Path, root, kw, patterns, bayer):
    """(kind or "rejected", reason, meta or None) for one file: never raises."""
    try:
        header, _, _ = read_header(path, bayer_pattern=bayer)
        meta = normalize_header(header, path=path, required=(), **kw)
        kind, why = classify_frame_reason(meta, path, patterns=patterns, header=header, root=root)
        if kind == "unknown":
            missing = []
            for req in ("DATE-OBS", "EXPTIME"):
                try:
                    normalize_header(header, path=path, required=(req,), **kw)
                except FrameRejected as exc:
                    missing.append(exc.reason)
            return "rejected", "; ".join([*missing, why]), None
        if _REQUIRED[kind]:
            meta = normalize_header(header, path=path, required=_REQUIRED[kind], **kw)
        if kind == "science" and meta.exptime_s == 0.0:
            raw = to_float(first_value(header, "EXPTIME", "EXPOSURE", "EXP_TIME", "ITIME")[1])
            return (
                "rejected",
                f"EXPTIME={raw:g} s for a science frame ({why}): a sky frame needs a positive "
                "exposure time (a zero-second exposure is a bias)",
                None,
            )
        return kind, why, meta
    except FrameRejected as exc:
        return "rejected", exc.reason, None
    except Exception as exc:  # one odd file never stops the grouping
        log.exception("session grouping: %s", path)
        return (
            "rejected",
            f"unexpected error while reading the header ({type(exc).__name__}: {exc})",
            None,
        )


def group_session(
    paths,
    obs=None,
    *,
    normalize_kwargs=None,
    patterns=None,
    ignore=DEFAULT_IGNORE,
    extensions=None,
):
    """
    Classify every file of a session and group the frames, reading headers only.

    Parameters
    ----------
    paths : str, Path or iterable of them
        Files and/or folders (searched recursively). A single folder is the session root (frame
        stems and folder-name rules are relative to it).
    obs : `~rpp_tasks.config.ObservatoryConfig`, optional
        Supplies ``normalize_kwargs`` (camera, filter aliases), ``patterns``
        (``session.frame_types``) and ``extensions`` (``session.extensions``) when those are not
        given.
    normalize_kwargs : Mapping, optional
        Keyword arguments of `~rpp_tasks.inputs.header.normalize_header` (``filter_aliases``,
        ``default_band``, ``gain_e_per_adu``, ``bayer_pattern`` ...).
    patterns : Mapping[str, list of str], optional
        File-name globs per kind, see `classify_frame_reason`.
    ignore : iterable of str, optional
        Case-insensitive globs of file names that are not frames (``ignored``, with the pattern).
    extensions : iterable of str, optional
        File-name endings read as FITS (case-insensitive); default `DEFAULT_EXTENSIONS`. Other
        files are ``ignored`` with the reason.

    Returns
    -------
    `SessionPlan`
        Deterministic: files, groups and rejected entries are sorted. Every file is in
        ``files`` with its outcome and reason; a bad file lands in ``rejected`` with the reason,
        it never stops the grouping.
    """
    kw = dict(normalize_kwargs_from_config(obs)) if obs is not None else {}
    kw.update(normalize_kwargs or {})
    if patterns is None:
        patterns = dict(_session_setting(obs, "frame_types") or {})
    if extensions is None:
        extensions = tuple(_session_setting(obs, "extensions") or DEFAULT_EXTENSIONS)
    bayer = kw.get("bayer_pattern")

    files, root = _expand(paths)
    outcomes: list[tuple[str, str, str, FrameMeta | None]] = []  # path, outcome, reason, meta
    for path in files:
        hidden = _hidden_folder(path, root)
        if hidden is not None:
            why = f"inside the hidden folder {hidden!r} (sync-tool versions, caches)"
            outcomes.append((str(path), "ignored", why, None))
            continue
        pat = _ignored(path, ignore)
        if pat is not None:
            outcomes.append(
                (str(path), "ignored", f"file name matches the ignore pattern {pat!r}", None)
            )
            continue
        if not _has_extension(path, extensions):
            why = f"file name does not end with a FITS extension ({', '.join(extensions)})"
            if _looks_like_fits(path):
                why += ": FITS content, add its extension to session.extensions to reduce it"
            outcomes.append((str(path), "ignored", why, None))
            continue
        kind, reason, meta = _classify_one(path, root, kw, patterns, bayer)
        outcomes.append((str(path), kind, reason, meta))

    stems = assign_stems([p for p, o, _, _ in outcomes if o != "ignored"], root=root)
    groups: dict[tuple[str, tuple], list[str]] = {}
    frames, rejected, ignored, file_out = [], [], [], []
    for path, outcome, reason, meta in outcomes:
        stem = stems.get(path)
        if outcome == "ignored":
            ignored.append(path)
        elif outcome == "rejected":
            rejected.append(RejectedFile(path, reason, stem))
            log.warning("session grouping: %s rejected: %s", Path(path).name, reason)
        else:
            if outcome != meta.imagetyp:
                note = f"classified as {outcome} (header type {meta.imagetyp}): {reason}"
                meta = replace(meta, imagetyp=outcome, warnings=(*meta.warnings, note))
            frames.append(meta)
            groups.setdefault((outcome, _group_key(outcome, meta)), []).append(path)
        file_out.append(
            FileOutcome(
                path, outcome, reason, stem, tuple(meta.warnings) if meta is not None else ()
            )
        )

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
        files=tuple(sorted(file_out, key=lambda f: f.path)),
    )
    log.info("session grouping: %s", ", ".join(f"{k}={v}" for k, v in plan.counts.items()))
    return plan
