"""Session watcher: decide when an incoming session is complete and trigger its DAG run.

A *session* is a direct sub-folder of an observatory's incoming folder
(``incoming/<night or target folder>/``; files may sit in deeper sub-folders of it). It is
**ready** when, depending on the observatory's rule:

* ``quiet``   -- its files have not changed (names, sizes, modification/change times) for
  ``quiet_seconds``;
* ``marker``  -- a marker file (name or glob, e.g. ``transfer.done``) is present;
* ``twospot`` -- a 2SPOT observation file (``last_obs.yaml``) is present and every file it
  declares is present (`rpp_tasks.inputs.twospot`).

Whatever the rule, a session is never ready while a temporary / partial file of a sync tool is in
it (``*.part``, ``*.tmp``, ``~*``, Syncthing ``.syncthing.*``, rsync ``.<name>.XXXXXX`` ...), nor
before two snapshots of its files taken ``settle_seconds`` apart are identical: files still being
written are never read. Readiness is a pure function (`evaluate_session`) of two snapshots, the
rule and the clock.

The `SessionWatcher` wakes on filesystem events (watchdog: inotify, or polling for network / sync
mounts), re-evaluates periodically to cover missed events, rescans every folder at start
(catch-up), and triggers the observatory's DAG through the Airflow REST API (`AirflowTrigger`)
with a deterministic run id ``session__<session_id>``: a repeat answers 409, which counts as
done. Triggers are recorded in a small JSON state file written atomically, and queued with a
bounded exponential backoff while the API is down, so a restart never triggers a session twice
and a pending trigger survives a restart.

The module never imports Airflow; it speaks HTTP to the API server with ``requests``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fnmatch
import hashlib
import json
import logging
import os
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rpp_tasks.exceptions import ConfigError, RppError

__all__ = [
    "DEFAULT_IGNORE_PATTERNS",
    "DEFAULT_PARTIAL_PATTERNS",
    "FileEntry",
    "Snapshot",
    "SessionRule",
    "Declaration",
    "Readiness",
    "SessionCandidate",
    "TriggerOutcome",
    "AirflowTrigger",
    "WatchState",
    "SessionWatcher",
    "WatcherLocked",
    "session_id_for",
    "run_id_for",
    "take_snapshot",
    "read_declaration",
    "evaluate_session",
    "scan_incoming",
    "find_ready_untriggered",
    "watch_main",
]

log = logging.getLogger(__name__)

#: Names skipped entirely (any path component): hidden files and folders, OS litter.
DEFAULT_IGNORE_PATTERNS = (".*", "Thumbs.db", "desktop.ini", "@eaDir", "$RECYCLE.BIN")
#: Names of files a sync / copy tool is still writing. Their presence blocks readiness.
#: A pattern starting with ``re:`` is a regular expression matched against the file name.
DEFAULT_PARTIAL_PATTERNS = (
    "*.part",
    "*.partial",
    "*.tmp",
    "*.temp",
    "~*",
    "*~",
    "*.filepart",
    "*.crdownload",
    "*.!sync",
    "*.download",
    ".syncthing.*",
    ".~tmp~*",
    ".~*",
    r"re:^\..+\.[A-Za-z0-9]{6}$",  # rsync: .<name>.XXXXXX
)
_RUN_ID_OK = re.compile(r"[^A-Za-z0-9_.~:+-]+")  # Airflow's default allowed_run_id_pattern
_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz", ".fits.gz", ".fit.gz", ".fz")
STATE_VERSION = 1


class WatcherLocked(RppError):
    """Another watcher process already holds the state file of this observatory."""


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def session_id_for(relpath: str) -> str:
    """
    Deterministic session id of a session folder.

    Parameters
    ----------
    relpath : str
        Folder path relative to the incoming folder, e.g. ``"2024-07-30"``.

    Returns
    -------
    session_id : str
        ``relpath`` itself when it only uses the characters Airflow accepts in a run id
        (``[A-Za-z0-9_.~:+-]``, no ``..``); otherwise a slug plus 8 hex digits of its SHA-1, so
        two folders never share an id (``"SS 433/night 1"`` -> ``"SS_433_night_1-3f2a9c1e"``).
    """
    rel = str(relpath).replace(os.sep, "/").strip("/")
    if not rel:
        raise ValueError("session folder path is empty")
    slug = _RUN_ID_OK.sub("_", rel.replace("/", "_")).strip("_.")
    slug = re.sub(r"\.{2,}", ".", slug)
    if slug == rel and len(slug) <= 200:
        return slug
    digest = hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8]
    return f"{(slug or 'session')[:190]}-{digest}"


def run_id_for(session_id: str) -> str:
    """DAG run id of a session: ``f"session__{session_id}"``."""
    return f"session__{session_id}"


def _match(name: str, patterns) -> bool:
    for pat in patterns:
        if pat.startswith("re:"):
            if re.match(pat[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pat):
            return True
    return False


# --------------------------------------------------------------------------------------------
# Snapshots and the pure readiness rule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class FileEntry:
    """One file of a session: path relative to the session folder, size in bytes, and
    ``mtime`` = the later of its modification and inode-change times (epoch seconds): a copy
    tool that preserves the source's modification time still moves the change time."""

    relpath: str
    size: int
    mtime: float


@dataclass(frozen=True)
class Snapshot:
    """The state of a session folder at ``taken_at`` (epoch seconds).

    ``files`` are the data files (ignored and partial names excluded), ``partial`` the files a
    sync tool is still writing, ``last_change`` the latest modification / change time seen on the
    files and folders (``None`` for an empty folder).
    """

    taken_at: float
    files: tuple[FileEntry, ...] = ()
    partial: tuple[FileEntry, ...] = ()
    last_change: float | None = None

    @property
    def signature(self) -> tuple:
        """What must not change for the session to count as quiet."""
        return (self.files, self.partial)

    @classmethod
    def from_entries(cls, entries, *, taken_at, rule=None) -> Snapshot:
        """Build a snapshot from ``(relpath, size, mtime)`` tuples (classified by ``rule``)."""
        rule = rule or SessionRule()
        files, partial = [], []
        for relpath, size, mtime in entries:
            parts = str(relpath).split("/")
            if any(_match(p, rule.partial_patterns) for p in parts[-1:]):
                partial.append(FileEntry(str(relpath), int(size), float(mtime)))
            elif any(_match(p, rule.ignore_patterns) for p in parts):
                continue
            else:
                files.append(FileEntry(str(relpath), int(size), float(mtime)))
        times = [e.mtime for e in files + partial]
        return cls(
            taken_at=float(taken_at),
            files=tuple(sorted(files)),
            partial=tuple(sorted(partial)),
            last_change=max(times) if times else None,
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
    trust_mtime : bool
        ``quiet``: count quiet time from the files' own modification / change times (so a
        session that went quiet while the watcher was down is ready at start after
        ``settle_seconds``). Set ``False`` on a mount whose server clock may lag: the quiet time
        is then only what the watcher observed itself.
    ignore_patterns, partial_patterns : tuple of str
        Glob patterns (``re:`` prefix for a regex) of names to skip, and of names of files a
        sync tool is still writing (they block readiness).
    """

    kind: str = "quiet"
    quiet_seconds: float = 600.0
    marker_file: str | None = None
    twospot_obs_file: str = "last_obs.yaml"
    twospot_setup_file: str = "setup_config.yaml"
    twospot_extension: str = ".fits"
    settle_seconds: float = 5.0
    trust_mtime: bool = True
    ignore_patterns: tuple[str, ...] = DEFAULT_IGNORE_PATTERNS
    partial_patterns: tuple[str, ...] = DEFAULT_PARTIAL_PATTERNS

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
        if self.quiet_seconds < 0 or self.settle_seconds < 0:
            raise ConfigError(
                "SessionRule",
                "session.quiet_seconds",
                "non-negative durations in seconds",
                got=(self.quiet_seconds, self.settle_seconds),
            )
        object.__setattr__(self, "ignore_patterns", tuple(self.ignore_patterns))
        object.__setattr__(self, "partial_patterns", tuple(self.partial_patterns))

    def to_dict(self) -> dict:
        """JSON-safe summary."""
        return {
            **asdict(self),
            "ignore_patterns": list(self.ignore_patterns),
            "partial_patterns": list(self.partial_patterns),
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
    if snapshot_now.partial:
        names = ", ".join(e.relpath for e in snapshot_now.partial[:3])
        more = len(snapshot_now.partial) - 3
        return Readiness(
            False, f"files still being written: {names}" + (f" (+{more} more)" if more > 0 else "")
        )
    if not snapshot_now.files:
        return Readiness(False, "no files yet")
    settled, settle_due = _stable_against(snapshot_now, snapshot_prev, rule, now)

    if rule.kind == "quiet":
        observed_since = (
            snapshot_prev.taken_at
            if snapshot_prev is not None and snapshot_prev.signature == snapshot_now.signature
            else snapshot_now.taken_at
        )
        quiet_since = observed_since
        if rule.trust_mtime and snapshot_now.last_change is not None:
            quiet_since = min(quiet_since, snapshot_now.last_change)
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
            entries.append((rel, st.st_size, max(st.st_mtime, st.st_ctime)))
    snap = Snapshot.from_entries(entries, taken_at=time.time() if now is None else now, rule=rule)
    if dir_times and (snap.files or snap.partial):
        last = max([*dir_times, *([snap.last_change] if snap.last_change is not None else [])])
        snap = Snapshot(snap.taken_at, snap.files, snap.partial, last)
    return snap


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
    snapshot with the current content).
    """

    session_id: str
    relpath: str
    session_dir: str
    run_id: str
    readiness: Readiness
    snapshot: Snapshot
    baseline: Snapshot

    @property
    def ready(self) -> bool:
        return self.readiness.ready

    def conf(self, observatory: str) -> dict:
        """The DAG run conf: ``{"observatory", "session_id", "session_dir"}``."""
        return {
            "observatory": observatory,
            "session_id": self.session_id,
            "session_dir": self.session_dir,
        }

    def to_dict(self) -> dict:
        """JSON-safe summary (without the snapshots)."""
        return {
            "session_id": self.session_id,
            "relpath": self.relpath,
            "session_dir": self.session_dir,
            "run_id": self.run_id,
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
                elif name.lower().endswith(_FITS_SUFFIXES):
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


def find_ready_untriggered(
    incoming_dir, rule: SessionRule, state_path, *, settle_seconds: float | None = None
) -> list[SessionCandidate]:
    """
    Ready sessions that the watcher has not delivered (safety net for the reconcile DAG).

    Scans twice, ``settle_seconds`` (default ``rule.settle_seconds``) apart, and returns the
    ready sessions whose trigger is not confirmed in the state file (absent, or still queued
    because the API was down). Triggering them again is safe: the run id is deterministic, so
    a session that already has a run answers 409.

    Parameters
    ----------
    incoming_dir : str or `~pathlib.Path`
    rule : `SessionRule`
    state_path : str or `~pathlib.Path`
        The watcher's state file (may not exist).
    settle_seconds : float, optional

    Returns
    -------
    candidates : list of `SessionCandidate`
        Use ``c.run_id`` and ``c.conf(observatory)`` to trigger.
    """
    wait = rule.settle_seconds if settle_seconds is None else settle_seconds
    first = {c.session_id: c.baseline for c in scan_incoming(incoming_dir, rule)}
    time.sleep(wait)
    state = WatchState.load(state_path)
    out = []
    for cand in scan_incoming(incoming_dir, rule, previous=first):
        rec = state.sessions.get(cand.session_id)
        if cand.ready and not (rec and rec.get("confirmed")):
            out.append(cand)
    return out


# --------------------------------------------------------------------------------------------
# Airflow REST API
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TriggerOutcome:
    """Result of one trigger attempt.

    ``result`` is ``"created"`` (the run was created), ``"exists"`` (409: a run with this id
    already exists, which counts as done) or ``"failed"`` (retry later); ``status`` is the HTTP
    status, ``None`` when the server could not be reached.
    """

    result: str
    status: int | None
    message: str

    @property
    def delivered(self) -> bool:
        return self.result in ("created", "exists")

    def to_dict(self) -> dict:
        """JSON-safe summary."""
        return asdict(self)


class AirflowTrigger:
    """
    Trigger DAG runs through the Airflow 3 REST API (``/api/v2``).

    Authentication: a static ``token`` (env ``RPP_AIRFLOW_TOKEN``), else a JWT obtained with
    ``POST /auth/token`` ``{"username", "password"}`` (the simple auth manager of
    ``airflow standalone`` and the FAB auth manager both serve it), fetched once, cached, and
    fetched again when the API answers 401 (expired) or 403 ``Invalid JWT token`` (the API server
    was restarted with a new secret). Without credentials, ``GET /auth/token`` is tried (simple
    auth manager with ``simple_auth_manager_all_admins``). The password and the token are never
    logged.

    Parameters
    ----------
    base_url : str
        API server URL, e.g. ``http://localhost:8080`` (a trailing ``/api/v2`` is accepted).
    user, password : str, optional
    timeout : float, optional
        Seconds per HTTP request.
    token : str, optional
        A ready JWT; no login is attempted unless it is rejected and credentials are given.
    """

    def __init__(self, base_url, user=None, password=None, timeout=10.0, *, token=None):
        import requests  # only the watcher needs it

        base = str(base_url).rstrip("/")
        if base.endswith("/api/v2"):
            base = base[: -len("/api/v2")]
        self.base_url = base
        self.user = user
        self._password = password
        self.timeout = float(timeout)
        self._token = token
        self._static_token = token
        self._lock = threading.Lock()
        self._http = requests.Session()
        self._requests = requests
        self.n_token_fetches = 0

    def __repr__(self):
        return f"AirflowTrigger({self.base_url!r}, user={self.user!r})"

    @classmethod
    def from_env(cls, base_url=None, *, timeout=10.0) -> AirflowTrigger:
        """Build from ``RPP_AIRFLOW_API_URL`` (default ``http://localhost:8080``),
        ``RPP_AIRFLOW_USER``, ``RPP_AIRFLOW_PASSWORD`` and ``RPP_AIRFLOW_TOKEN``."""
        return cls(
            base_url or os.environ.get("RPP_AIRFLOW_API_URL", "http://localhost:8080"),
            os.environ.get("RPP_AIRFLOW_USER"),
            os.environ.get("RPP_AIRFLOW_PASSWORD"),
            timeout,
            token=os.environ.get("RPP_AIRFLOW_TOKEN") or None,
        )

    # -- auth --------------------------------------------------------------------------------

    def _fetch_token(self) -> str | None:
        url = f"{self.base_url}/auth/token"
        self.n_token_fetches += 1
        if self.user and self._password is not None:
            resp = self._http.post(
                url, json={"username": self.user, "password": self._password}, timeout=self.timeout
            )
        else:
            resp = self._http.get(url, timeout=self.timeout)
        if resp.status_code in (200, 201):
            try:
                token = resp.json()["access_token"]
            except (ValueError, KeyError, TypeError):
                raise _AuthError(
                    resp.status_code, "token endpoint answered without access_token"
                ) from None
            log.info("obtained an API token from %s for user %s", url, self.user or "(none)")
            return token
        if resp.status_code >= 500:
            raise _AuthError(
                resp.status_code, f"token endpoint {url} unavailable (HTTP {resp.status_code})"
            )
        who = f"user {self.user!r}" if self.user else "anonymous access"
        raise _AuthError(
            resp.status_code,
            f"login to {url} failed for {who} "
            f"(HTTP {resp.status_code}); check RPP_AIRFLOW_USER/RPP_AIRFLOW_PASSWORD",
        )

    def _headers(self, refresh=False) -> dict:
        with self._lock:
            if refresh or self._token is None:
                if refresh and self._static_token and not self.user:
                    raise _AuthError(401, "the API rejected the configured RPP_AIRFLOW_TOKEN")
                self._token = self._fetch_token()
            token = self._token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _request(self, method, path, body=None):
        url = f"{self.base_url}/api/v2{path}"
        resp = self._http.request(
            method, url, json=body, headers=self._headers(), timeout=self.timeout
        )
        if resp.status_code == 401 or (
            resp.status_code == 403 and "invalid jwt" in resp.text.lower()
        ):
            log.info(
                "API answered %s to %s %s: fetching a new token", resp.status_code, method, path
            )
            resp = self._http.request(
                method, url, json=body, headers=self._headers(refresh=True), timeout=self.timeout
            )
        return resp

    # -- calls -------------------------------------------------------------------------------

    def trigger(
        self, dag_id: str, run_id: str, conf: dict, *, note: str | None = None
    ) -> TriggerOutcome:
        """
        Create the DAG run ``run_id`` (``POST /api/v2/dags/{dag_id}/dagRuns``).

        Returns
        -------
        outcome : `TriggerOutcome`
            ``created`` on 200/201, ``exists`` on 409, ``failed`` otherwise (never raises for
            HTTP or network errors).
        """
        body = {"dag_run_id": run_id, "logical_date": None, "conf": dict(conf)}
        if note:
            body["note"] = note
        try:
            resp = self._request("POST", f"/dags/{dag_id}/dagRuns", body)
        except _AuthError as exc:
            return TriggerOutcome("failed", exc.status, str(exc))
        except self._requests.RequestException as exc:
            return TriggerOutcome(
                "failed", None, f"API unreachable at {self.base_url}: {_network_reason(exc)}"
            )
        if resp.status_code in (200, 201):
            return TriggerOutcome("created", resp.status_code, f"run {run_id} created")
        if resp.status_code == 409:
            return TriggerOutcome("exists", 409, f"run {run_id} already exists")
        detail = _short(resp.text)
        hint = {
            404: "DAG not found (not parsed yet, or wrong dag_id)",
            403: "forbidden: the user may not trigger this DAG",
            400: "rejected by the API",
            422: "request body rejected",
        }.get(resp.status_code, "API error")
        return TriggerOutcome(
            "failed", resp.status_code, f"{hint} (HTTP {resp.status_code}): {detail}"
        )

    def unpause(self, dag_id: str) -> TriggerOutcome:
        """Unpause a DAG (``PATCH /api/v2/dags/{dag_id}`` ``{"is_paused": false}``).

        A run triggered on a paused DAG is created but waits until the DAG is unpaused.
        """
        try:
            resp = self._request("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        except _AuthError as exc:
            return TriggerOutcome("failed", exc.status, str(exc))
        except self._requests.RequestException as exc:
            return TriggerOutcome("failed", None, f"API unreachable: {type(exc).__name__}")
        if resp.status_code == 200:
            return TriggerOutcome("created", 200, f"DAG {dag_id} unpaused")
        return TriggerOutcome("failed", resp.status_code, _short(resp.text))

    def run_exists(self, dag_id: str, run_id: str) -> bool | None:
        """Whether the run exists (``GET .../dagRuns/{run_id}``); ``None`` if unknown."""
        try:
            resp = self._request("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
        except (_AuthError, self._requests.RequestException):
            return None
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        return None

    def close(self):
        self._http.close()


class _AuthError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def _network_reason(exc) -> str:
    text = str(exc).lower()
    for needle, words in (
        ("refused", "connection refused"),
        ("timed out", "timed out"),
        ("name or service not known", "unknown host"),
        ("temporary failure in name resolution", "DNS failure"),
        ("reset by peer", "connection reset"),
    ):
        if needle in text:
            return f"{type(exc).__name__} ({words})"
    return f"{type(exc).__name__}: {_short(str(exc), 160)}"


def _short(text, n=300):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


# --------------------------------------------------------------------------------------------
# State file
# --------------------------------------------------------------------------------------------


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds")


@dataclass
class WatchState:
    """The watcher's memory of one observatory, kept in a small JSON file.

    ``sessions[session_id]`` holds ``run_id``, ``session_dir``, ``ready_at``, ``ready_reason``,
    ``confirmed`` (the API created the run or answered 409), ``result``, ``http_status``,
    ``attempts``, ``last_attempt_at``, ``next_attempt_at`` (epoch), ``confirmed_at`` and
    ``last_error``. A session present with ``confirmed: false`` is queued.
    """

    path: Path
    sessions: dict = field(default_factory=dict)
    observatory: str | None = None
    dag_id: str | None = None

    @classmethod
    def load(cls, path) -> WatchState:
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise ConfigError(
                path, "(whole file)", "the watcher's JSON state file", got=str(exc)
            ) from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("sessions", {}), dict):
            raise ConfigError(path, "sessions", "a mapping of session id -> record")
        return cls(path, dict(doc.get("sessions", {})), doc.get("observatory"), doc.get("dag_id"))

    def save(self):
        """Write atomically (temporary file in the same folder, fsync, ``os.replace``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "version": STATE_VERSION,
            "observatory": self.observatory,
            "dag_id": self.dag_id,
            "updated_at": _iso(time.time()),
            "sessions": self.sessions,
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def pending(self) -> list[str]:
        """Session ids queued (recorded but not confirmed), oldest ready first."""
        ids = [s for s, r in self.sessions.items() if not r.get("confirmed")]
        return sorted(ids, key=lambda s: (self.sessions[s].get("ready_at_epoch") or 0, s))


# --------------------------------------------------------------------------------------------
# The watcher
# --------------------------------------------------------------------------------------------


@dataclass
class _Track:
    baseline: Snapshot | None = None
    reason: str | None = None
    recheck_at: float | None = None


class SessionWatcher:
    """
    Watch one observatory's incoming folder and trigger one DAG run per ready session.

    Parameters
    ----------
    observatory : str
    incoming_dir : str or `~pathlib.Path`
    dag_id : str
        The observatory's DAG, e.g. ``rpp_<observatory>``.
    rule : `SessionRule`
    state_path : str or `~pathlib.Path`
        JSON state file, e.g. ``<paths.work>/watch_state.json``. One watcher per state file
        (a second `start` raises `WatcherLocked`).
    trigger : `AirflowTrigger` or object with ``trigger(dag_id, run_id, conf) -> TriggerOutcome``
    use_polling : bool, optional
        Use watchdog's polling observer (network and sync mounts, where inotify sees nothing).
    rescan_s : float, optional
        Period of the full rescan that covers missed events.
    poll_interval_s : float, optional
        Polling observer period.
    retry_initial_s, retry_max_s : float, optional
        Exponential backoff of a queued trigger: ``retry_initial_s * 2**(attempts-1)``, at most
        ``retry_max_s``.
    unpause : bool, optional
        Unpause the DAG (once, at the first trigger) so that created runs start.
    """

    def __init__(
        self,
        observatory,
        incoming_dir,
        dag_id,
        rule: SessionRule,
        state_path,
        trigger,
        *,
        use_polling=False,
        rescan_s=60.0,
        poll_interval_s=5.0,
        retry_initial_s=5.0,
        retry_max_s=300.0,
        unpause=False,
    ):
        self.observatory = str(observatory)
        self.incoming_dir = Path(incoming_dir)
        self.dag_id = str(dag_id)
        self.rule = rule
        self.state_path = Path(state_path)
        self.trigger = trigger
        self.use_polling = bool(use_polling)
        self.rescan_s = float(rescan_s)
        self.poll_interval_s = float(poll_interval_s)
        self.retry_initial_s = float(retry_initial_s)
        self.retry_max_s = float(retry_max_s)
        self.unpause = bool(unpause)
        self._unpaused = False
        self.state = WatchState.load(self.state_path)
        self.state.observatory = self.state.observatory or self.observatory
        self.state.dag_id = self.state.dag_id or self.dag_id
        self._track: dict[str, _Track] = {}
        self._dirty: set[str] = set()
        self._dirty_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        self._observer = None
        self._lock_fh = None
        self._next_full = 0.0
        self._warned_late: set[str] = set()
        self._missing_logged = False
        self.n_scans = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self):
        """Lock the state file, start the filesystem observer and the evaluation thread.

        The first pass rescans every session folder (catch-up after downtime) and retries the
        queued triggers.
        """
        if self._thread is not None:
            raise RuntimeError("watcher already started")
        self._acquire_lock()
        self._stop.clear()
        self._start_observer()
        self._thread = threading.Thread(
            target=self._loop, name=f"rpp-watch-{self.observatory}", daemon=True
        )
        self._thread.start()
        log.info(
            "watching %s for observatory %s (rule %s, %s, DAG %s, state %s)",
            self.incoming_dir,
            self.observatory,
            self.rule.kind,
            "polling" if self.use_polling else "inotify",
            self.dag_id,
            self.state_path,
        )
        return self

    def stop(self, timeout=10.0):
        """Stop the observer and the thread, then release the state-file lock."""
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            with contextlib.suppress(Exception):
                self._observer.stop()
                self._observer.join(timeout)
            self._observer = None
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._release_lock()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def wait(self):
        """Block until `stop` is called (from a signal handler or another thread)."""
        while not self._stop.wait(1.0):
            pass

    def _acquire_lock(self):
        import fcntl

        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.state_path.with_name(self.state_path.name + ".lock"), "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise WatcherLocked(
                f"{self.state_path}: another watcher is running for this observatory"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._lock_fh = fh
        # Another process may have written the state before we got the lock.
        self.state = WatchState.load(self.state_path)
        self.state.observatory = self.state.observatory or self.observatory
        self.state.dag_id = self.state.dag_id or self.dag_id

    def _release_lock(self):
        if self._lock_fh is not None:
            import fcntl

            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def _start_observer(self):
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        watcher = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                watcher._on_event(event)

        if not self.incoming_dir.is_dir():
            if not self._missing_logged:
                log.error(
                    "observatory %s: incoming folder %s does not exist (yet); rescanning "
                    "every %.0f s",
                    self.observatory,
                    self.incoming_dir,
                    self.rescan_s,
                )
                self._missing_logged = True
            return
        observer = PollingObserver(timeout=self.poll_interval_s) if self.use_polling else Observer()
        try:
            observer.schedule(_Handler(), str(self.incoming_dir), recursive=True)
            observer.start()
        except OSError as exc:
            log.warning(
                "observatory %s: cannot watch %s (%s); relying on rescans every %.0f s "
                "(raise fs.inotify.max_user_watches or set use_polling)",
                self.observatory,
                self.incoming_dir,
                exc,
                self.rescan_s,
            )
            with contextlib.suppress(Exception):
                observer.stop()
            return
        self._observer = observer

    # -- events ------------------------------------------------------------------------------

    def _on_event(self, event):
        if event.event_type in ("opened", "closed_no_write"):
            return  # reading a file changes nothing
        sessions = set()
        for p in (event.src_path, getattr(event, "dest_path", "") or ""):
            if not p:
                continue
            p = os.fsdecode(p)
            try:
                rel = os.path.relpath(p, self.incoming_dir)
            except ValueError:
                continue
            head = rel.replace(os.sep, "/").split("/", 1)[0]
            if head in (".", "..") or head.startswith("../"):
                continue
            if "/" in rel.replace(os.sep, "/") or event.is_directory:
                sessions.add(head)
        if sessions:
            with self._dirty_lock:
                self._dirty.update(sessions)
            self._wake.set()

    # -- evaluation --------------------------------------------------------------------------

    def run_once(self, now: float | None = None, *, full: bool = True) -> list[SessionCandidate]:
        """
        One evaluation pass: scan sessions, queue the ready ones, deliver due triggers.

        Parameters
        ----------
        now : float, optional
            Snapshot time stamp (tests); default the wall clock.
        full : bool, optional
            Scan every session folder (else only those with events or a due re-check).

        Returns
        -------
        candidates : list of `SessionCandidate`
            The sessions evaluated in this pass.
        """
        t0 = time.time() if now is None else now
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        if not self.incoming_dir.is_dir():
            if not self._missing_logged:
                log.error(
                    "observatory %s: incoming folder %s is missing",
                    self.observatory,
                    self.incoming_dir,
                )
                self._missing_logged = True
            self._deliver_due(t0)
            return []
        if self._missing_logged:
            log.info(
                "observatory %s: incoming folder %s is back", self.observatory, self.incoming_dir
            )
            self._missing_logged = False
            if self._thread is not None and self._observer is None:
                self._start_observer()
        try:
            folders = dict(list_session_dirs(self.incoming_dir, self.rule))
        except OSError as exc:
            log.error(
                "observatory %s: cannot list %s: %s", self.observatory, self.incoming_dir, exc
            )
            self._deliver_due(t0)
            return []
        out = []
        for rel, path in folders.items():
            sid = session_id_for(rel)
            rec = self.state.sessions.get(sid)
            if rec is not None:
                if rel in dirty and sid not in self._warned_late and rec.get("confirmed"):
                    self._warned_late.add(sid)
                    log.warning(
                        "session %s: files changed after its run %s was triggered; not "
                        "triggered again (re-run it by hand if needed)",
                        sid,
                        rec.get("run_id"),
                    )
                continue
            track = self._track.setdefault(sid, _Track())
            due = track.recheck_at is not None and track.recheck_at <= t0
            if not (full or rel in dirty or due or track.baseline is None):
                continue
            try:
                cand = assess_session(rel, path, self.rule, previous=track.baseline, now=now)
            except OSError as exc:
                log.warning("session %s: cannot scan %s: %s", sid, path, exc)
                continue
            self.n_scans += 1
            track.baseline = cand.baseline
            track.recheck_at = cand.readiness.recheck_at
            if cand.readiness.reason != track.reason:
                log.log(
                    logging.WARNING if cand.readiness.problem else logging.DEBUG,
                    "session %s: %s",
                    sid,
                    cand.readiness.reason,
                )
                track.reason = cand.readiness.reason
            out.append(cand)
            if cand.ready:
                self._enqueue(cand, cand.snapshot.taken_at)
        for sid in set(self._track) - {session_id_for(r) for r in folders}:
            del self._track[sid]  # folder removed or renamed
        self._deliver_due(time.time() if now is None else now)
        return out

    def _enqueue(self, cand: SessionCandidate, t: float):
        log.info(
            "session %s ready (%s): queueing run %s of DAG %s",
            cand.session_id,
            cand.readiness.reason,
            cand.run_id,
            self.dag_id,
        )
        self.state.sessions[cand.session_id] = {
            "run_id": cand.run_id,
            "session_dir": cand.session_dir,
            "relpath": cand.relpath,
            "ready_at": _iso(t),
            "ready_at_epoch": t,
            "ready_reason": cand.readiness.reason,
            "n_files": len(cand.snapshot.files),
            "total_bytes": sum(e.size for e in cand.snapshot.files),
            "confirmed": False,
            "result": "pending",
            "http_status": None,
            "attempts": 0,
            "last_attempt_at": None,
            "next_attempt_at": t,
            "confirmed_at": None,
            "last_error": None,
        }
        self.state.save()  # before the request: a crash in between means a retry (-> 409)
        self._track.pop(cand.session_id, None)

    def _deliver_due(self, now: float):
        pending = self.state.pending()
        if not pending:
            return
        progressed = True
        while progressed:
            progressed = False
            for sid in self.state.pending():
                rec = self.state.sessions[sid]
                if (rec.get("next_attempt_at") or 0) > now:
                    continue
                if self._deliver(sid, rec):
                    progressed = True  # the API is back: also try the others now
                    for other in self.state.pending():
                        self.state.sessions[other]["next_attempt_at"] = 0
                else:
                    return  # API down: do not hammer it with the rest of the queue

    def _deliver(self, sid: str, rec: dict) -> bool:
        conf = {
            "observatory": self.observatory,
            "session_id": sid,
            "session_dir": rec["session_dir"],
        }
        if self.unpause and not self._unpaused and hasattr(self.trigger, "unpause"):
            res = self.trigger.unpause(self.dag_id)
            if res.delivered:
                self._unpaused = True
                log.info("DAG %s unpaused", self.dag_id)
            else:
                log.warning("DAG %s: could not unpause: %s", self.dag_id, res.message)
        t0 = time.time()
        outcome = self.trigger.trigger(self.dag_id, rec["run_id"], conf)
        t1 = time.time()
        rec["attempts"] = int(rec.get("attempts") or 0) + 1
        rec["last_attempt_at"] = _iso(t1)
        rec["http_status"] = outcome.status
        rec["result"] = outcome.result
        if outcome.delivered:
            rec["confirmed"] = True
            rec["confirmed_at"] = _iso(t1)
            rec["next_attempt_at"] = None
            rec["last_error"] = None
            ready = rec.get("ready_at_epoch")
            log.info(
                "session %s: DAG %s run %s %s (HTTP %s, %.0f ms; %.2f s after ready, attempt %d)",
                sid,
                self.dag_id,
                rec["run_id"],
                "created" if outcome.result == "created" else "already existed",
                outcome.status,
                1000 * (t1 - t0),
                (t1 - ready) if ready else float("nan"),
                rec["attempts"],
            )
        else:
            delay = min(self.retry_max_s, self.retry_initial_s * 2 ** (rec["attempts"] - 1))
            rec["next_attempt_at"] = t1 + delay
            rec["last_error"] = outcome.message
            n = rec["attempts"]
            if n & (n - 1):  # not a power of two: keep the log readable during a long outage
                level = logging.DEBUG
            elif outcome.status in (400, 403, 404, 422):
                level = logging.ERROR  # needs an operator: wrong dag_id, permissions, ...
            else:
                level = logging.WARNING
            log.log(
                level,
                "session %s: trigger of run %s failed (attempt %d): %s; queued, retrying in %.1f s",
                sid,
                rec["run_id"],
                n,
                outcome.message,
                delay,
            )
        self.state.save()
        return outcome.delivered

    def _next_wake(self, now: float) -> float:
        times = [self._next_full]
        # a re-check time already past (the pass just ran) waits a little, never spins
        times += [
            max(t.recheck_at, now + 0.1) for t in self._track.values() if t.recheck_at is not None
        ]
        times += [
            max(r.get("next_attempt_at") or 0, now + 0.1)
            for r in (self.state.sessions[s] for s in self.state.pending())
        ]
        return max(0.0, min(times) - now)

    def _loop(self):
        while not self._stop.is_set():
            now = time.time()
            full = now >= self._next_full
            try:
                self.run_once(full=full)
            except Exception:  # keep watching: a bad folder must not stop the other sessions
                log.exception("observatory %s: evaluation pass failed", self.observatory)
            if full:
                self._next_full = now + self.rescan_s
            timeout = self._next_wake(time.time())
            if self._wake.wait(timeout):
                self._wake.clear()
                # coalesce a burst of events (a file copied in many writes)
                self._stop.wait(0.05)


# --------------------------------------------------------------------------------------------
# Command line (wired into ``rpp watch`` by rpp_tasks.ops.cli)
# --------------------------------------------------------------------------------------------


def rule_from_config(obs, *, settle_seconds: float | None = None) -> SessionRule:
    """The readiness rule of an `~rpp_tasks.config.ObservatoryConfig` (its ``session`` section)."""
    cfg = obs.session
    return SessionRule(
        kind=cfg.ready_rule,
        quiet_seconds=cfg.quiet_seconds,
        marker_file=cfg.marker_file,
        twospot_obs_file=cfg.twospot_obs_file,
        settle_seconds=cfg.settle_seconds if settle_seconds is None else settle_seconds,
    )


def watch_main(argv=None) -> int:
    """
    ``rpp watch`` without a config file: watch one incoming folder until SIGINT / SIGTERM.

    Credentials come from the environment only (``RPP_AIRFLOW_API_URL``, ``RPP_AIRFLOW_USER``,
    ``RPP_AIRFLOW_PASSWORD`` or ``RPP_AIRFLOW_TOKEN``), never from the command line.
    """
    p = argparse.ArgumentParser(prog="rpp watch", description=watch_main.__doc__.split("\n")[1])
    p.add_argument("--observatory", required=True)
    p.add_argument("--incoming", required=True, help="the observatory's incoming folder")
    p.add_argument("--state", required=True, help="state file, e.g. <work>/watch_state.json")
    p.add_argument("--dag-id", help="default rpp_<observatory>")
    p.add_argument("--rule", choices=("quiet", "marker", "twospot"), default="quiet")
    p.add_argument("--quiet-seconds", type=float, default=600.0)
    p.add_argument("--settle-seconds", type=float, default=5.0)
    p.add_argument("--marker-file")
    p.add_argument("--twospot-obs-file", default="last_obs.yaml")
    p.add_argument("--no-trust-mtime", action="store_true")
    p.add_argument("--polling", action="store_true", help="polling observer (network mounts)")
    p.add_argument("--rescan-s", type=float, default=60.0)
    p.add_argument("--unpause", action="store_true", help="unpause the DAG at the first trigger")
    p.add_argument(
        "--once",
        action="store_true",
        help="scan twice (settle time apart), trigger what is ready, exit",
    )
    p.add_argument("--api-url", help="default $RPP_AIRFLOW_API_URL or http://localhost:8080")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    try:
        rule = SessionRule(
            kind=args.rule,
            quiet_seconds=args.quiet_seconds,
            marker_file=args.marker_file,
            twospot_obs_file=args.twospot_obs_file,
            settle_seconds=args.settle_seconds,
            trust_mtime=not args.no_trust_mtime,
        )
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    trigger = AirflowTrigger.from_env(args.api_url)
    watcher = SessionWatcher(
        args.observatory,
        args.incoming,
        args.dag_id or f"rpp_{args.observatory}",
        rule,
        args.state,
        trigger,
        use_polling=args.polling,
        rescan_s=args.rescan_s,
        unpause=args.unpause,
    )
    if args.once:
        watcher._acquire_lock()
        try:
            watcher.run_once()
            time.sleep(rule.settle_seconds)
            watcher.run_once()
        finally:
            watcher._release_lock()
        return 1 if watcher.state.pending() else 0
    try:
        watcher.start()
    except WatcherLocked as exc:
        log.error("%s", exc)
        return 3

    def _stop(signum, _frame):
        log.info("signal %d: stopping the watcher", signum)
        watcher._stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    watcher.wait()
    watcher.stop()
    return 0
