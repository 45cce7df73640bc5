"""The watcher's memory: one JSON state file per observatory, and the revision rule.

WatchState records, per session folder, what was seen, when it became ready, which run ids were
triggered and confirmed, and the content digests of the files a run read. revision_for decides
whether a ready folder is new, already triggered, or changed after its run (then a new revision,
run id session__<id>__r<N>); find_ready_untriggered is the reconciliation DAG's scan. The process
that acts on it is rpp_tasks.ops.watch.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from rpp_tasks.exceptions import ConfigError
from rpp_tasks.ops.readiness import (
    SessionCandidate,
    SessionRule,
    Snapshot,
    content_digests,
    scan_incoming,
)
from rpp_tasks.ops.session_ids import validate_session_id

__all__ = ["STATE_VERSION", "WatchState", "revision_for", "find_ready_untriggered", "iso_utc"]

log = logging.getLogger(__name__)

#: Version of the state file layout, written into the file.
STATE_VERSION = 2


def iso_utc(t: float | None) -> str | None:
    """ISO 8601 UTC text of a POSIX time (None stays None)."""
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds")


@dataclass
class WatchState:
    """The watcher's memory of one observatory, kept in a small JSON file.

    ``sessions[session_id]`` describes the session's latest revision: ``revision``, ``run_id``,
    ``previous_run_id``, ``session_dir``, ``ready_at``, ``ready_reason``, ``confirmed`` (the API
    created the run or answered 409), ``result``, ``http_status``, ``attempts``,
    ``last_attempt_at``, ``next_attempt_at`` (epoch), ``confirmed_at``, ``last_error``,
    ``waiting_for`` (the previous revision's run, while it is not finished), ``snapshot_digest``
    (the folder when it was found ready: checked again right before the trigger), ``files``
    (one digest per data file: what the revision reduces) and ``history`` (the earlier
    revisions' records). A session present with ``confirmed: false`` is queued.
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
        sessions = {}
        for sid, rec in dict(doc.get("sessions", {})).items():
            try:
                validate_session_id(sid)
                if not isinstance(rec, dict):
                    raise ValueError("its record is not a mapping")
            except ValueError as exc:
                log.error("%s: ignoring session record %r: %s", path, sid[:80], exc)
                continue
            sessions[sid] = rec
        return cls(path, sessions, doc.get("observatory"), doc.get("dag_id"))

    def save(self):
        """Write atomically (temporary file in the same folder, fsync, ``os.replace``).

        One line per session (readable with ``grep``; written by the C JSON encoder: an indented
        dump goes through the pure-Python one, 3x slower on a large state file).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        head = {
            "version": STATE_VERSION,
            "observatory": self.observatory,
            "dag_id": self.dag_id,
            "updated_at": iso_utc(time.time()),
        }
        lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()]
        rows = [
            f"  {json.dumps(sid)}: {json.dumps(self.sessions[sid], sort_keys=True)}"
            for sid in sorted(self.sessions)
        ]
        sessions = "{\n" + ",\n".join(rows) + "\n }" if rows else "{}"
        text = "{" + ", ".join(lines) + ',\n "sessions": ' + sessions + "}\n"
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def pending(self) -> list[str]:
        """Session ids queued (recorded but not confirmed), oldest ready first."""
        ids = [s for s, r in self.sessions.items() if not r.get("confirmed")]
        return sorted(ids, key=lambda s: (self.sessions[s].get("ready_at_epoch") or 0, s))


def revision_for(rec: dict | None, snapshot: Snapshot, rule: SessionRule) -> tuple[str, int]:
    """
    What a session folder's current content means for its runs.

    Parameters
    ----------
    rec : dict or None
        The session's record in the state file.
    snapshot : `Snapshot`
        The folder now.
    rule : `SessionRule`
        Its ``data_suffixes`` say which files count, ``max_revisions`` caps the revisions.

    Returns
    -------
    status, revision : str, int
        ``("new", 1)``: never triggered. ``("pending", n)``: revision ``n`` is queued.
        ``("same", n)``: the data files are those revision ``n`` was triggered with.
        ``("changed", n + 1)``: a data file was added or changed since revision ``n``: the
        next revision. ``("removed", n)``: data files were only removed (a re-run would delete
        products; not triggered by itself). ``("limit", n)``: changed, but ``n`` is
        ``rule.max_revisions``. ``("unknown", n)``: the record predates revisions (no
        ``files``).
    """
    if rec is None:
        return "new", 1
    revision = int(rec.get("revision") or 1)
    if not rec.get("confirmed"):
        return "pending", revision
    files = rec.get("files")
    if files is None:
        return "unknown", revision
    now = set(content_digests(snapshot, rule))
    before = set(files)
    if now == before:
        return "same", revision
    if now <= before:
        return "removed", revision
    if revision >= rule.max_revisions:
        return "limit", revision
    return "changed", revision + 1


def find_ready_untriggered(
    incoming_dir, rule: SessionRule, state_path, *, settle_seconds: float | None = None
) -> list[SessionCandidate]:
    """
    Ready sessions that the watcher has not delivered (safety net for the reconcile DAG).

    Scans twice, ``settle_seconds`` (default ``rule.settle_seconds``) apart, and returns the
    ready sessions whose trigger is not confirmed in the state file (absent, or still queued
    because the API was down), and those whose data files changed after their last confirmed
    revision (as the next revision, `revision_for`). Triggering them again is safe: the run id
    is deterministic, so a revision that already has a run answers 409. A candidate with a
    ``previous_run_id`` must not be triggered while that run is still queued or running.

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
        if not cand.ready:
            continue
        status, revision = revision_for(state.sessions.get(cand.session_id), cand.snapshot, rule)
        if status in ("new", "pending", "changed"):
            out.append(cand.with_revision(revision))
    return out
