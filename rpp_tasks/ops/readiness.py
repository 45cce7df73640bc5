"""Is a session folder complete and safe to read? Snapshots, rules and the scan.

A *session* is a direct sub-folder of an observatory's incoming folder
(``incoming/<night or target folder>/``; files may sit in deeper sub-folders of it). It is
**ready** when, depending on the observatory's rule:

* ``quiet``   -- its files have not changed (names, sizes, modification/change times) for
  ``quiet_seconds``;
* ``marker``  -- a marker file (name or glob, e.g. ``transfer.done``) is present;
* ``twospot`` -- a 2SPOT observation file (``last_obs.yaml``) is present and every file it
  declares is present (`rpp_tasks.inputs.twospot`).

Whatever the rule, a session is not ready while a temporary / partial file of a sync tool is in it
(``*.part``, ``*.tmp``, ``~*``, Syncthing ``.syncthing.*``, rsync ``.<name>.XXXXXX`` ...) or a FITS
file whose size is not a whole number of 2880-byte blocks (a copy written in place and stalled), nor
before two snapshots of its files taken ``settle_seconds`` apart are identical: files still being
written are never read. Only when such an incomplete file has not changed for ``stall_seconds`` does
the session go ahead without it (so a killed transfer never blocks a night for ever); a copy that
resumes later starts a new revision (`rpp_tasks.ops.watch`). Readiness is a pure function
(`evaluate_session`) of two snapshots, the rule and the clock; `take_snapshot` and `scan_incoming`
are the filesystem side (``os.stat`` only, no file is opened except a settled 2SPOT declaration).

The process that acts on it (events, state file, triggers) is `rpp_tasks.ops.watch`.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rpp_tasks.exceptions import ConfigError
from rpp_tasks.ops.session_ids import run_id_for, session_id_for

__all__ = [
    "DEFAULT_IGNORE_PATTERNS",
    "DEFAULT_PARTIAL_PATTERNS",
    "DEFAULT_DATA_SUFFIXES",
    "FITS_BLOCK_BYTES",
    "FileEntry",
    "Snapshot",
    "SessionRule",
    "Declaration",
    "Readiness",
    "SessionCandidate",
    "session_id_for",
    "run_id_for",
    "implausible_size",
    "content_digests",
    "take_snapshot",
    "read_declaration",
    "evaluate_session",
    "assess_session",
    "list_session_dirs",
    "scan_incoming",
    "rule_from_config",
]

log = logging.getLogger(__name__)

#: Names skipped entirely (any path component): hidden files and folders, OS litter.
DEFAULT_IGNORE_PATTERNS = (".*", "Thumbs.db", "desktop.ini", "@eaDir", "$RECYCLE.BIN")
#: Names of files a sync / copy tool is still writing (or a sync conflict to resolve). Their
#: presence blocks readiness (for ``SessionRule.stall_seconds`` at most). Matched against every
#: path component, so a tool's temporary folder (rsync ``.~tmp~/``) counts too. A pattern
#: starting with ``re:`` is a regular expression matched against the name.
DEFAULT_PARTIAL_PATTERNS = (
    "*.part",  # curl, wget, Firefox, OneDrive (Linux client), lftp
    "*.partial",  # rclone (``<name>.<hash>.partial``), OneDrive
    "*.tmp",
    "*.temp",
    "~*",  # Office, Syncthing on Windows (``~syncthing~<name>.tmp``)
    "*~",
    "*.filepart",  # WinSCP
    "*.crdownload",  # Chrome
    "*.opdownload",  # Opera
    "*.download",  # Safari
    "*.!sync",  # Resilio / BitTorrent Sync
    "*.!ut",  # uTorrent
    "*.!qb",  # qBittorrent
    "*.aspx",  # IBM Aspera
    "*.aspera-ckpt",
    "*.lftp-pget-status",
    ".syncthing.*",  # Syncthing: ``.syncthing.<name>.tmp``
    "*.sync-conflict-*",  # Syncthing conflict copies: two versions of one file
    "* (conflicted copy *",  # Dropbox, Nextcloud conflict copies
    "*_conflict-*",  # Nextcloud / ownCloud conflict copies
    ".~tmp~*",  # rsync --delay-updates folder
    ".rsync-partial",  # rsync --partial-dir default
    ".~*",
    ".*.~*",  # Nextcloud / ownCloud download: ``.<name>.~<hex>``
    ".*.icloud",  # iCloud placeholder of a file not downloaded yet
    ".tmp.drivedownload",  # Google Drive for desktop
    r"re:^\..+\.[A-Za-z0-9]{6}$",  # rsync: .<name>.XXXXXX
)
#: Names the pipeline reads (case-insensitive suffixes); only these start a new revision.
DEFAULT_DATA_SUFFIXES = (
    ".fits",
    ".fit",
    ".fts",
    ".fz",
    ".fits.gz",
    ".fit.gz",
    ".fts.gz",
)
#: A FITS file (and a tile-compressed ``.fz`` one) is a whole number of these blocks.
FITS_BLOCK_BYTES = 2880
_COMPRESSED = (".gz", ".bz2", ".xz", ".zip", ".z")


@functools.lru_cache(maxsize=64)
def _compiled(patterns: tuple[str, ...]) -> re.Pattern:
    """One regular expression for a tuple of globs (``re:`` prefix: a regex, anchored at the
    start like ``re.match``): a folder of thousands of files is classified at C speed."""
    parts = [
        f"(?:{p[3:]})" if p.startswith("re:") else f"(?:{fnmatch.translate(p)})" for p in patterns
    ]
    return re.compile("|".join(parts) or r"(?!)")


def _match(name: str, patterns) -> bool:
    return _compiled(tuple(patterns)).match(name) is not None


# --------------------------------------------------------------------------------------------
# Snapshots and the pure readiness rule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class FileEntry:
    """One file of a session: path relative to the session folder, size in bytes, and
    ``mtime`` = the later of its modification and inode-change times (epoch seconds): a copy
    tool that preserves the source's modification time still moves the change time.
    ``content_mtime`` is the modification time alone (what a revision compares: a ``chmod``
    moves the change time, not the content), ``None`` when unknown."""

    relpath: str
    size: int
    mtime: float
    content_mtime: float | None = field(default=None, compare=False)


def implausible_size(relpath: str, size: int, data_suffixes=DEFAULT_DATA_SUFFIXES) -> str | None:
    """Why a data file's size shows an unfinished copy, or None.

    A FITS file, and a tile-compressed ``.fz`` one, is a whole number of 2880-byte blocks; a
    stream-compressed one (``.gz`` ...) can have any size but not 0. Names without one of
    ``data_suffixes`` (None: any name) are not checked.
    """
    name = relpath.rsplit("/", 1)[-1].lower()
    if data_suffixes is not None and not name.endswith(tuple(s.lower() for s in data_suffixes)):
        return None
    if size <= 0:
        return "empty"
    if name.endswith(_COMPRESSED):
        return None
    if size % FITS_BLOCK_BYTES:
        return f"{size} bytes, not a multiple of {FITS_BLOCK_BYTES}"
    return None


@dataclass(frozen=True)
class Snapshot:
    """The state of a session folder at ``taken_at`` (epoch seconds).

    ``files`` are the data files (ignored and partial names excluded), ``partial`` the files a
    sync tool is still writing, ``truncated`` the ``files`` whose size shows an unfinished copy
    (`implausible_size`), ``last_change`` the latest modification / change time seen on the
    files and folders (``None`` for an empty folder).
    """

    taken_at: float
    files: tuple[FileEntry, ...] = ()
    partial: tuple[FileEntry, ...] = ()
    last_change: float | None = None
    truncated: tuple[FileEntry, ...] = ()

    @property
    def signature(self) -> tuple:
        """What must not change for the session to count as quiet."""
        return (self.files, self.partial)

    @property
    def incomplete(self) -> tuple[FileEntry, ...]:
        """Partial and truncated files: what keeps the session from being ready."""
        return self.partial + self.truncated

    def digest(self) -> str:
        """SHA-1 of `signature` (names, sizes, times of all files): equal digests, same state."""
        h = hashlib.sha1()
        for kind, entries in (("f", self.files), ("p", self.partial)):
            for e in entries:
                h.update(f"{kind}\0{e.relpath}\0{e.size}\0{e.mtime:.3f}\n".encode())
        return h.hexdigest()

    @classmethod
    def from_entries(cls, entries, *, taken_at, rule=None) -> Snapshot:
        """Build a snapshot from ``(relpath, size, mtime[, content_mtime])`` tuples (classified
        by ``rule``)."""
        rule = rule or SessionRule()
        files, partial, truncated = [], [], []
        for item in entries:
            relpath, size, mtime = item[:3]
            content = float(item[3]) if len(item) > 3 and item[3] is not None else None
            entry = FileEntry(str(relpath), int(size), float(mtime), content)
            parts = str(relpath).split("/")
            if any(_match(p, rule.partial_patterns) for p in parts):
                partial.append(entry)
            elif any(_match(p, rule.ignore_patterns) for p in parts):
                continue
            else:
                files.append(entry)
                if implausible_size(entry.relpath, entry.size, rule.data_suffixes):
                    truncated.append(entry)
        times = [e.mtime for e in files + partial]
        return cls(
            taken_at=float(taken_at),
            files=tuple(sorted(files)),
            partial=tuple(sorted(partial)),
            last_change=max(times) if times else None,
            truncated=tuple(sorted(truncated)),
        )


@dataclass(frozen=True)
class SessionRule:
    """
    How to decide that a session is complete.

    Parameters
    ----------
    kind : {"quiet", "marker", "twospot"}
        See the module docstring.
    quiet_seconds : float
        ``quiet``: how long the files must stay unchanged.
    marker_file : str or None
        ``marker``: name (or glob) of the marker file, relative to the session folder.
    twospot_obs_file : str
        ``twospot``: the observation file, relative to the session folder. When
        ``twospot_setup_file`` exists next to it, its ``batch_name`` names the observation file
        instead and its ``file_extension`` gives the frames' extension.
    twospot_setup_file : str
        ``twospot``: the setup file (optional in the folder).
    twospot_extension : str
        ``twospot``: frame extension when there is no setup file.
    settle_seconds : float
        Every rule: two snapshots this far apart must be identical before the session is ready.
    stall_seconds : float
        Every rule: a partial file, or a FITS file of an implausible size (an unfinished copy),
        blocks readiness until it is gone, or until the folder has not changed for this long:
        then the session goes ahead with a WARNING (a transfer that resumes later starts a new
        revision).
    max_revisions : int
        Revisions (runs of one session) the watcher triggers by itself; files that change
        after the last one are logged (WARNING), not triggered.
    trust_mtime : bool
        ``quiet``: count quiet time from the files' own modification / change times (so a
        session that went quiet while the watcher was down is ready at start after
        ``settle_seconds``). Set ``False`` on a mount whose server clock may lag: the quiet time
        is then only what the watcher observed itself.
    ignore_patterns, partial_patterns : tuple of str
        Glob patterns (``re:`` prefix for a regex) of names to skip, and of names of files a
        sync tool is still writing (they block readiness).
    data_suffixes : tuple of str
        File-name endings (case-insensitive) of the files the pipeline reads: their sizes are
        checked and only their changes start a new revision.
    """

    kind: str = "quiet"
    quiet_seconds: float = 600.0
    marker_file: str | None = None
    twospot_obs_file: str = "last_obs.yaml"
    twospot_setup_file: str = "setup_config.yaml"
    twospot_extension: str = ".fits"
    settle_seconds: float = 5.0
    stall_seconds: float = 3600.0
    max_revisions: int = 5
    trust_mtime: bool = True
    ignore_patterns: tuple[str, ...] = DEFAULT_IGNORE_PATTERNS
    partial_patterns: tuple[str, ...] = DEFAULT_PARTIAL_PATTERNS
    data_suffixes: tuple[str, ...] = DEFAULT_DATA_SUFFIXES

    def __post_init__(self):
        if self.kind not in ("quiet", "marker", "twospot"):
            raise ConfigError(
                "SessionRule",
                "session.ready_rule",
                "one of 'quiet', 'marker', 'twospot'",
                got=self.kind,
            )
        if self.kind == "marker" and not self.marker_file:
            raise ConfigError(
                "SessionRule",
                "session.marker_file",
                "a marker file name when ready_rule is 'marker'",
            )
        if self.kind == "twospot" and not self.twospot_obs_file:
            raise ConfigError(
                "SessionRule",
                "session.twospot_obs_file",
                "the 2SPOT observation file name when ready_rule is 'twospot'",
            )
        if self.quiet_seconds < 0 or self.settle_seconds < 0 or self.stall_seconds < 0:
            raise ConfigError(
                "SessionRule",
                "session.quiet_seconds",
                "non-negative durations in seconds",
                got=(self.quiet_seconds, self.settle_seconds, self.stall_seconds),
            )
        if int(self.max_revisions) < 1:
            raise ConfigError(
                "SessionRule", "max_revisions", "an integer >= 1", got=self.max_revisions
            )
        object.__setattr__(self, "ignore_patterns", tuple(self.ignore_patterns))
        object.__setattr__(self, "partial_patterns", tuple(self.partial_patterns))
        object.__setattr__(self, "data_suffixes", tuple(s.lower() for s in self.data_suffixes))

    def to_dict(self) -> dict:
        """JSON-safe summary."""
        return {
            **asdict(self),
            "ignore_patterns": list(self.ignore_patterns),
            "partial_patterns": list(self.partial_patterns),
            "data_suffixes": list(self.data_suffixes),
        }


@dataclass(frozen=True)
class Declaration:
    """What a 2SPOT observation file declares: the expected file names (relative to the session
    folder), or the error that prevented reading it."""

    source: str
    expected: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class Readiness:
    """Outcome of `evaluate_session`.

    ``recheck_at`` is the epoch time at which the session becomes ready if nothing changes
    (``None`` when only a new file can make it ready).
    """

    ready: bool
    reason: str
    recheck_at: float | None = None
    problem: bool = False  # needs an operator (e.g. an unreadable 2SPOT file)

    def to_dict(self) -> dict:
        """JSON-safe summary."""
        return asdict(self)


def _stable_against(
    snapshot_now: Snapshot, snapshot_prev: Snapshot | None, rule: SessionRule, now: float
):
    """Return (settled, settle_due): the files did not change since a snapshot old enough."""
    if snapshot_prev is None or snapshot_prev.signature != snapshot_now.signature:
        return False, snapshot_now.taken_at + rule.settle_seconds
    due = snapshot_prev.taken_at + rule.settle_seconds
    return now >= due, due


def evaluate_session(
    snapshot_now: Snapshot,
    snapshot_prev: Snapshot | None,
    rule: SessionRule,
    now: float,
    *,
    declaration: Declaration | None = None,
) -> Readiness:
    """
    Decide whether a session is ready (pure: no file access, no clock).

    Parameters
    ----------
    snapshot_now : `Snapshot`
        The latest snapshot of the session folder.
    snapshot_prev : `Snapshot` or None
        The *earliest* earlier snapshot with the same content (the watcher keeps it while
        nothing changes); ``None`` or a different one means "just changed".
    rule : `SessionRule`
    now : float
        Current epoch time.
    declaration : `Declaration`, optional
        ``twospot`` rule: the parsed observation file (see `read_declaration`).

    Returns
    -------
    readiness : `Readiness`
    """
    settled, settle_due = _stable_against(snapshot_now, snapshot_prev, rule, now)
    same = snapshot_prev is not None and snapshot_prev.signature == snapshot_now.signature
    quiet_since = snapshot_prev.taken_at if same else snapshot_now.taken_at
    if rule.trust_mtime and snapshot_now.last_change is not None:
        quiet_since = min(quiet_since, snapshot_now.last_change)
    stall_note = ""
    if snapshot_now.incomplete:
        what = _describe_incomplete(snapshot_now)
        stall_due = quiet_since + rule.stall_seconds
        if not (settled and now >= stall_due):
            return Readiness(False, what, recheck_at=max(stall_due, settle_due))
        stall_note = (
            f"; going ahead although {what}: unchanged for {now - quiet_since:.0f} s "
            f"(stall_seconds {rule.stall_seconds:g})"
        )
    if not snapshot_now.files:
        return Readiness(False, "no files yet")
    ready = _evaluate_rule(snapshot_now, rule, now, declaration, settled, settle_due, quiet_since)
    if ready.ready and stall_note:
        return Readiness(True, ready.reason + stall_note, problem=True)
    return ready


def _describe_incomplete(snap: Snapshot) -> str:
    parts = []
    if snap.partial:
        names = ", ".join(e.relpath for e in snap.partial[:3])
        more = len(snap.partial) - 3
        parts.append(
            f"files still being written: {names}" + (f" (+{more} more)" if more > 0 else "")
        )
    if snap.truncated:
        names = ", ".join(
            f"{e.relpath} ({implausible_size(e.relpath, e.size, None)})" for e in snap.truncated[:3]
        )
        more = len(snap.truncated) - 3
        parts.append(
            "unfinished FITS files (copy still running or stalled): "
            + names
            + (f" (+{more} more)" if more > 0 else "")
        )
    return "; ".join(parts)


def _evaluate_rule(snapshot_now, rule, now, declaration, settled, settle_due, quiet_since):
    if rule.kind == "quiet":
        due = max(quiet_since + rule.quiet_seconds, settle_due)
        if now >= due and settled:
            return Readiness(
                True,
                f"quiet for {now - quiet_since:.1f} s "
                f"(>= {rule.quiet_seconds:g} s), {len(snapshot_now.files)} files",
            )
        return Readiness(
            False,
            f"quiet for {max(0.0, now - quiet_since):.1f} s of {rule.quiet_seconds:g} s",
            recheck_at=due,
        )

    if rule.kind == "marker":
        markers = [
            e for e in snapshot_now.files if fnmatch.fnmatchcase(e.relpath, rule.marker_file)
        ]
        if not markers:
            return Readiness(False, f"waiting for marker file {rule.marker_file!r}")
        if not settled:
            return Readiness(
                False,
                f"marker {markers[0].relpath!r} present, settling ({rule.settle_seconds:g} s)",
                recheck_at=settle_due,
            )
        n_data = len(snapshot_now.files) - len(markers)
        if n_data == 0:
            return Readiness(False, f"marker {markers[0].relpath!r} present but no data file")
        return Readiness(True, f"marker {markers[0].relpath!r} present, {n_data} files")

    # twospot
    if declaration is None:
        names = {e.relpath for e in snapshot_now.files}
        folder = os.path.dirname(rule.twospot_obs_file)
        setup = f"{folder}/{rule.twospot_setup_file}" if folder else rule.twospot_setup_file
        if rule.twospot_obs_file in names or setup in names:
            return Readiness(
                False,
                f"2SPOT files present, settling ({rule.settle_seconds:g} s) before reading them",
                recheck_at=settle_due,
            )
        return Readiness(False, f"waiting for 2SPOT observation file {rule.twospot_obs_file!r}")
    if declaration.error:
        return Readiness(
            False,
            f"cannot use {declaration.source}: {declaration.error}",
            problem="not there yet" not in declaration.error,
        )
    if not declaration.expected:
        return Readiness(False, f"{declaration.source} declares no frame")
    present = {e.relpath.lower() for e in snapshot_now.files}
    missing = [n for n in declaration.expected if n.lower() not in present]
    if missing:
        return Readiness(
            False,
            f"{declaration.source}: {len(missing)} of "
            f"{len(declaration.expected)} declared files missing "
            f"(first: {missing[0]})",
        )
    if not settled:
        return Readiness(
            False,
            f"all {len(declaration.expected)} declared files present, "
            f"settling ({rule.settle_seconds:g} s)",
            recheck_at=settle_due,
        )
    return Readiness(
        True, f"{declaration.source}: all {len(declaration.expected)} declared files present"
    )


# --------------------------------------------------------------------------------------------
# Filesystem side: snapshots, 2SPOT declaration, scanning
# --------------------------------------------------------------------------------------------


def take_snapshot(session_dir, rule: SessionRule, *, now: float | None = None) -> Snapshot:
    """
    Snapshot a session folder with ``os.stat`` only (no file is opened).

    Parameters
    ----------
    session_dir : str or `~pathlib.Path`
    rule : `SessionRule`
        Supplies the ignore and partial patterns.
    now : float, optional
        Time stamp of the snapshot (default: ``time.time()`` after the walk).

    Returns
    -------
    snapshot : `Snapshot`
        Files vanishing during the walk are skipped; sub-folder times count in ``last_change``.
    """
    root = Path(session_dir)
    entries = []
    dir_times = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not _match(d, rule.ignore_patterns) or _match(d, rule.partial_patterns)
        )
        try:
            st = os.stat(dirpath)
            dir_times.append(max(st.st_mtime, st.st_ctime))
        except OSError:
            pass
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:  # vanished (renamed by a sync tool) between listdir and stat
                continue
            rel = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
            entries.append((rel, st.st_size, max(st.st_mtime, st.st_ctime), st.st_mtime))
    snap = Snapshot.from_entries(entries, taken_at=time.time() if now is None else now, rule=rule)
    if dir_times and (snap.files or snap.partial):
        last = max([*dir_times, *([snap.last_change] if snap.last_change is not None else [])])
        snap = replace(snap, last_change=last)
    return snap


def content_digests(snapshot: Snapshot, rule: SessionRule) -> list[str]:
    """One short digest per data file (name, size, modification time), sorted.

    What a run of the session read: a revision is compared with the folder through these (a
    file added or changed starts a new one). Only files with ``rule.data_suffixes`` count (a log
    or a preview image written next to the frames does not), and the modification time alone
    (``content_mtime``; a ``chmod`` does not count either).
    """
    out = []
    for e in snapshot.files:
        if not e.relpath.lower().endswith(rule.data_suffixes):
            continue
        t = e.mtime if e.content_mtime is None else e.content_mtime
        key = f"{e.relpath}\0{e.size}\0{t:.3f}".encode()
        out.append(hashlib.sha1(key).hexdigest()[:16])
    return sorted(out)


def read_declaration(
    session_dir,
    rule: SessionRule,
    snapshot_now: Snapshot,
    snapshot_prev: Snapshot | None,
    now: float,
) -> Declaration | None:
    """
    Read the 2SPOT files of a session once they have settled.

    Returns ``None`` while the observation file is absent or changed less than
    ``rule.settle_seconds`` ago (it is never read while it may still be written).
    """
    from rpp_tasks.inputs import twospot  # small module, imported only for the 2SPOT rule

    by_path = {e.relpath: e for e in snapshot_now.files}
    prev = {} if snapshot_prev is None else {e.relpath: e for e in snapshot_prev.files}

    def settled(rel):
        return (
            rel in by_path
            and prev.get(rel) == by_path[rel]
            and now >= snapshot_prev.taken_at + rule.settle_seconds
        )

    obs_rel = rule.twospot_obs_file
    folder = os.path.dirname(obs_rel)
    extension = rule.twospot_extension
    setup_rel = f"{folder}/{rule.twospot_setup_file}" if folder else rule.twospot_setup_file
    if setup_rel in by_path:
        if not settled(setup_rel):
            return None
        try:
            setup = twospot.parse_setup_config(Path(session_dir, setup_rel))
        except (ConfigError, OSError) as exc:
            return Declaration(source=setup_rel, error=str(exc))
        extension = setup.file_extension
        obs_rel = f"{folder}/{setup.obs_file_name}" if folder else setup.obs_file_name
        if obs_rel not in by_path:
            return Declaration(
                source=setup_rel,
                error=f"observation file {obs_rel!r} (its batch_name) not there yet",
            )
    if not settled(obs_rel):
        return None
    try:
        targets = twospot.parse_last_obs(Path(session_dir, obs_rel))
    except (ConfigError, OSError) as exc:
        return Declaration(source=obs_rel, error=str(exc))
    names = twospot.check_complete(targets, (), extension=extension).missing
    expected = tuple(f"{folder}/{n}" if folder else n for n in names)
    return Declaration(source=obs_rel, expected=expected)


@dataclass(frozen=True)
class SessionCandidate:
    """A session folder and its readiness at one scan.

    ``baseline`` is the snapshot to pass back as ``previous`` on the next scan (the earliest
    snapshot with the current content). ``revision`` is the run of the session this would be
    (1, or more when files changed after a run: `with_revision`); ``run_id`` follows it.
    """

    session_id: str
    relpath: str
    session_dir: str
    run_id: str
    readiness: Readiness
    snapshot: Snapshot
    baseline: Snapshot
    revision: int = 1

    @property
    def ready(self) -> bool:
        return self.readiness.ready

    @property
    def previous_run_id(self) -> str | None:
        """Run id of the revision before this one (None for the first)."""
        return run_id_for(self.session_id, self.revision - 1) if self.revision > 1 else None

    def with_revision(self, revision: int) -> SessionCandidate:
        """The same candidate as revision ``revision`` (its run id changes with it)."""
        return replace(self, revision=int(revision), run_id=run_id_for(self.session_id, revision))

    def conf(self, observatory: str) -> dict:
        """The DAG run conf: ``{"observatory", "session_id", "session_dir", "revision"}``."""
        return {
            "observatory": observatory,
            "session_id": self.session_id,
            "session_dir": self.session_dir,
            "revision": self.revision,
        }

    def to_dict(self) -> dict:
        """JSON-safe summary (without the snapshots)."""
        return {
            "session_id": self.session_id,
            "relpath": self.relpath,
            "session_dir": self.session_dir,
            "run_id": self.run_id,
            "revision": self.revision,
            "readiness": self.readiness.to_dict(),
            "n_files": len(self.snapshot.files),
        }


def list_session_dirs(incoming_dir, rule: SessionRule) -> list[tuple[str, Path]]:
    """Direct sub-folders of ``incoming_dir`` that are sessions, as ``(relpath, path)``.

    Hidden / ignored / partial names are skipped. Loose FITS files in the incoming root are not
    sessions (put each night in its own sub-folder); they are reported once at WARNING level.
    """
    root = Path(incoming_dir)
    out = []
    loose = []
    with os.scandir(root) as it:
        for entry in it:
            name = entry.name
            if _match(name, rule.ignore_patterns) or _match(name, rule.partial_patterns):
                continue
            try:
                if entry.is_dir():
                    out.append((name, Path(entry.path)))
                elif name.lower().endswith(DEFAULT_DATA_SUFFIXES):
                    loose.append(name)
            except OSError:
                continue
    if loose:
        key = (str(root), len(loose))
        if key not in _loose_warned:
            _loose_warned.add(key)
            log.warning(
                "%s: %d FITS file(s) directly in the incoming folder (e.g. %s) are not "
                "watched: put each session in its own sub-folder",
                root,
                len(loose),
                sorted(loose)[0],
            )
    return sorted(out)


_loose_warned: set = set()


def assess_session(
    relpath: str,
    session_dir,
    rule: SessionRule,
    *,
    previous: Snapshot | None,
    now: float | None = None,
) -> SessionCandidate:
    """Snapshot one session folder and evaluate it against ``previous`` (see `scan_incoming`)."""
    snap = take_snapshot(session_dir, rule, now=now)
    now_t = snap.taken_at
    baseline = previous if previous is not None and previous.signature == snap.signature else snap
    declaration = None
    if rule.kind == "twospot":
        declaration = read_declaration(
            session_dir, rule, snap, baseline if baseline is not snap else None, now_t
        )
    readiness = evaluate_session(
        snap, baseline if baseline is not snap else None, rule, now_t, declaration=declaration
    )
    sid = session_id_for(relpath)
    return SessionCandidate(
        session_id=sid,
        relpath=relpath,
        session_dir=str(session_dir),
        run_id=run_id_for(sid),
        readiness=readiness,
        snapshot=snap,
        baseline=baseline,
    )


def scan_incoming(
    incoming_dir, rule: SessionRule, *, previous: dict | None = None, now: float | None = None
) -> list[SessionCandidate]:
    """
    Evaluate every session folder of an incoming folder once.

    Parameters
    ----------
    incoming_dir : str or `~pathlib.Path`
    rule : `SessionRule`
    previous : dict, optional
        ``session_id -> Snapshot`` from an earlier scan (each candidate's ``baseline``). Without
        it no session can be ready yet (nothing has been seen to settle): scan twice,
        ``rule.settle_seconds`` apart, as `find_ready_untriggered` does.
    now : float, optional
        Time stamp for the snapshots (tests); default the wall clock.

    Returns
    -------
    candidates : list of `SessionCandidate`, sorted by folder name.
    """
    previous = previous or {}
    out = []
    for rel, path in list_session_dirs(incoming_dir, rule):
        sid = session_id_for(rel)
        try:
            out.append(assess_session(rel, path, rule, previous=previous.get(sid), now=now))
        except OSError as exc:
            log.warning("session %s: cannot scan %s: %s", sid, path, exc)
    return out


# --------------------------------------------------------------------------------------------
# From the observatory configuration
# --------------------------------------------------------------------------------------------


def rule_from_config(obs, *, settle_seconds: float | None = None) -> SessionRule:
    """The readiness rule of an `~rpp_tasks.config.ObservatoryConfig` (its ``session`` section)."""
    cfg = obs.session
    extra = tuple(e.lower() for e in (getattr(cfg, "extensions", None) or ()))
    return SessionRule(
        kind=cfg.ready_rule,
        quiet_seconds=cfg.quiet_seconds,
        marker_file=cfg.marker_file,
        twospot_obs_file=cfg.twospot_obs_file,
        settle_seconds=cfg.settle_seconds if settle_seconds is None else settle_seconds,
        stall_seconds=cfg.stall_seconds,
        data_suffixes=tuple(dict.fromkeys(DEFAULT_DATA_SUFFIXES + extra)),
    )
