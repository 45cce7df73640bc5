"""Session watcher: the process that triggers a DAG run for each session that becomes ready.

The `SessionWatcher` wakes on filesystem events (watchdog: inotify, or polling for network / sync
mounts), re-evaluates periodically to cover missed events, rescans every folder at start
(catch-up), and triggers the observatory's DAG through the Airflow REST API
(`rpp_tasks.ops.airflow_api.AirflowClient`) with a deterministic run id
``session__<session_id>``: a repeat answers 409, which counts as done. Triggers are recorded in a
small JSON state file (`WatchState`) written atomically, and queued with a bounded exponential
backoff while the API is down, so a restart never triggers a session twice and a pending trigger
survives a restart. When a session is ready is decided by `rpp_tasks.ops.readiness`.

Right before a trigger the folder is snapshotted again: if it changed since it was found ready
(or while the trigger was queued), the trigger is withdrawn until the folder is ready again.
When data files are added or changed after a run was triggered (a copy that stalled longer than
the quiet time, a late file), the session is triggered again once ready, as a new **revision**
with its own deterministic run id ``session__<session_id>__r<N>`` (conf ``"revision": N``), after
the previous revision's run has finished. Each revision's content is kept in the state file, so a
restart never triggers the same revision twice.

`find_ready_untriggered` is the reconcile DAG's safety net; ``rpp watch`` (`rpp_tasks.ops.cli`)
runs one watcher per configured observatory. The module never imports Airflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rpp_tasks.exceptions import RppError
from rpp_tasks.ops.airflow_api import TriggerOutcome
from rpp_tasks.ops.readiness import (
    SessionCandidate,
    SessionRule,
    Snapshot,
    assess_session,
    content_digests,
    list_session_dirs,
    take_snapshot,
)
from rpp_tasks.ops.session_ids import session_id_for, validate_session_id
from rpp_tasks.ops.watch_state import WatchState, iso_utc, revision_for

__all__ = ["SessionWatcher", "WatcherLocked", "ACTIVE_RUN_STATES"]

log = logging.getLogger(__name__)

#: Airflow DAG run states of a run that is not finished: a next revision waits for it.
ACTIVE_RUN_STATES = ("queued", "running")


class WatcherLocked(RppError):
    """Another watcher process already holds the state file of this observatory."""


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
    trigger : `~rpp_tasks.ops.airflow_api.AirflowClient`
        Or any object with ``trigger(dag_id, run_id, conf) -> TriggerOutcome``.
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
    previous_run_poll_s : float, optional
        How often a next revision asks whether the previous revision's run has finished
        (``trigger.run_state``; a trigger without it does not wait).
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
        previous_run_poll_s=30.0,
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
        self.previous_run_poll_s = float(previous_run_poll_s)
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
        self._told: set = set()  # (session, what, state) already logged once
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

    def scan_once(self) -> bool:
        """Catch up without watching (``rpp watch --once``): lock the state file, scan twice
        ``rule.settle_seconds`` apart, deliver what is ready, release the lock.

        Returns True when no trigger is left queued. Raises `WatcherLocked` while a running
        watcher holds the state file.
        """
        self._acquire_lock()
        try:
            self.run_once()
            time.sleep(self.rule.settle_seconds)
            self.run_once()
        finally:
            self._release_lock()
        return not self.state.pending()

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
            if rec is not None and not rec.get("confirmed"):
                continue  # queued: checked again right before its trigger (_deliver)
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
            status, revision = revision_for(rec, cand.snapshot, self.rule)
            if status in ("same", "removed", "limit", "unknown"):
                track.recheck_at = None  # nothing to trigger until the data files change
                self._after_run(sid, rec, cand, status)
                continue
            if cand.readiness.reason != track.reason:
                log.log(
                    logging.WARNING if cand.readiness.problem else logging.DEBUG,
                    "session %s: %s",
                    sid,
                    cand.readiness.reason,
                )
                track.reason = cand.readiness.reason
            out.append(cand)
            if status == "changed":
                self._once(
                    (sid, "changed", revision),
                    logging.INFO,
                    "session %s: data files changed after run %s (revision %d) was triggered: "
                    "revision %d will be triggered once the session is ready again",
                    sid,
                    rec.get("run_id"),
                    revision - 1,
                    revision,
                )
            if cand.ready:
                self._enqueue(cand.with_revision(revision), cand.snapshot.taken_at)
        for sid in set(self._track) - {session_id_for(r) for r in folders}:
            del self._track[sid]  # folder removed or renamed
        self._deliver_due(time.time() if now is None else now)
        return out

    def _once(self, key, level, msg, *args):
        if key not in self._told:
            self._told.add(key)
            log.log(level, msg, *args)

    def _after_run(self, sid: str, rec: dict, cand: SessionCandidate, status: str):
        """A session whose data files are those of its last run, or changed in a way that is
        not triggered by itself."""
        state = cand.snapshot.digest()
        if status == "unknown":  # a record from before revisions: adopt what is there now
            rec["files"] = content_digests(cand.snapshot, self.rule)
            rec.setdefault("revision", 1)
            self.state.save()
            log.info(
                "session %s: run %s recorded without its files (older state file); its "
                "current %d files are taken as what it reduced",
                sid,
                rec.get("run_id"),
                len(rec["files"]),
            )
        elif status == "removed":
            self._once(
                (sid, "removed", state),
                logging.WARNING,
                "session %s: data files removed after run %s was triggered; not triggered "
                "again (a re-run would delete their products): re-run it by hand if needed",
                sid,
                rec.get("run_id"),
            )
        elif status == "limit":
            self._once(
                (sid, "limit", state),
                logging.WARNING,
                "session %s: data files changed after run %s, its revision %d = max_revisions: "
                "not triggered again (re-run it by hand if needed)",
                sid,
                rec.get("run_id"),
                int(rec.get("revision") or 1),
            )

    def _enqueue(self, cand: SessionCandidate, t: float):
        log.info(
            "session %s ready (%s): queueing run %s (revision %d) of DAG %s",
            cand.session_id,
            cand.readiness.reason,
            cand.run_id,
            cand.revision,
            self.dag_id,
        )
        old = self.state.sessions.get(cand.session_id)
        history = []
        if old is not None:
            history = list(old.pop("history", None) or [])
            for h in history:
                h.pop("files", None)  # only the latest earlier revision keeps its file list
            history.append(old)
        self.state.sessions[cand.session_id] = {
            "revision": cand.revision,
            "run_id": cand.run_id,
            "previous_run_id": cand.previous_run_id,
            "session_dir": cand.session_dir,
            "relpath": cand.relpath,
            "ready_at": iso_utc(t),
            "ready_at_epoch": t,
            "ready_reason": cand.readiness.reason,
            "n_files": len(cand.snapshot.files),
            "n_incomplete": len(cand.snapshot.incomplete),
            "total_bytes": sum(e.size for e in cand.snapshot.files),
            "snapshot_digest": cand.snapshot.digest(),
            "files": content_digests(cand.snapshot, self.rule),
            "confirmed": False,
            "result": "pending",
            "http_status": None,
            "attempts": 0,
            "last_attempt_at": None,
            "next_attempt_at": t,
            "confirmed_at": None,
            "last_error": None,
            "waiting_for": None,
            "history": history,
        }
        self.state.save()  # before the request: a crash in between means a retry (-> 409)
        self._track.pop(cand.session_id, None)

    def _withdraw(self, sid: str, rec: dict, why: str, level=logging.INFO):
        """Take a queued revision back (the folder changed or went away): the session returns
        to its previous revision, or to not triggered, and is evaluated afresh."""
        history = list(rec.get("history") or [])
        if history:
            prev = history.pop()
            prev["history"] = history
            self.state.sessions[sid] = prev
        else:
            del self.state.sessions[sid]
        self.state.save()
        self._track.pop(sid, None)
        with self._dirty_lock:
            self._dirty.add(rec.get("relpath") or sid)
        self._wake.set()
        log.log(level, "session %s: run %s not triggered: %s", sid, rec.get("run_id"), why)

    def _deliver_due(self, now: float):
        pending = self.state.pending()
        if not pending:
            return
        progressed = True
        while progressed:
            progressed = False
            for sid in self.state.pending():
                rec = self.state.sessions.get(sid)
                if rec is None or rec.get("confirmed"):
                    continue
                if (rec.get("next_attempt_at") or 0) > now:
                    continue
                result = self._deliver(sid, rec, now)
                if result == "delivered":
                    progressed = True  # the API is back: also try the others now
                    for other in self.state.pending():
                        if not self.state.sessions[other].get("waiting_for"):
                            self.state.sessions[other]["next_attempt_at"] = 0
                elif result == "failed":
                    return  # API down: do not hammer it with the rest of the queue

    def _recheck(self, sid: str, rec: dict) -> bool:
        """The folder right before its trigger: unchanged since it was found ready?"""
        expected = rec.get("snapshot_digest")
        if expected is None:
            return True  # queued by an older watcher: nothing to compare with
        folder = Path(rec["session_dir"])
        try:
            snap = take_snapshot(folder, self.rule) if folder.is_dir() else None
        except OSError as exc:
            log.warning("session %s: cannot check %s again: %s", sid, folder, exc)
            snap = None
        if snap is None:
            self._withdraw(sid, rec, f"its folder {folder} is gone", logging.WARNING)
            return False
        if snap.digest() != expected:
            incomplete = snap.incomplete
            why = "its files changed since it was found ready; waiting for it to be ready again"
            if incomplete:
                why += f" ({len(incomplete)} unfinished, e.g. {incomplete[0].relpath})"
            self._withdraw(sid, rec, why)
            return False
        return True

    def _previous_running(self, sid: str, rec: dict, now: float) -> TriggerOutcome | bool:
        """True while the previous revision's run is not finished (the next one waits: both
        would rebuild the same work folder); a failed outcome when its state is unknown."""
        prev_run = rec.get("previous_run_id")
        if not prev_run or not hasattr(self.trigger, "run_state"):
            return False
        try:
            state = self.trigger.run_state(self.dag_id, prev_run)
        except Exception as exc:  # AirflowApiError, or any client error: retry with backoff
            return TriggerOutcome(
                "failed",
                getattr(exc, "status", None),
                f"cannot read the state of the previous run {prev_run}: {exc}",
            )
        if state in ACTIVE_RUN_STATES:
            if rec.get("waiting_for") != prev_run:
                log.info(
                    "session %s: run %s waits until the previous revision's run %s (%s) "
                    "has finished",
                    sid,
                    rec["run_id"],
                    prev_run,
                    state,
                )
            rec["waiting_for"] = prev_run
            rec["next_attempt_at"] = now + self.previous_run_poll_s
            self.state.save()
            return True
        rec["waiting_for"] = None
        return False

    def _deliver(self, sid: str, rec: dict, now: float | None = None) -> str:
        """Trigger one queued revision: ``"delivered"``, ``"failed"`` (retry with backoff),
        ``"deferred"`` (the previous revision's run is not finished) or ``"withdrawn"``."""
        now = time.time() if now is None else now
        try:
            validate_session_id(sid)
        except ValueError as exc:
            log.error("session record %r dropped: %s", sid[:80], exc)
            del self.state.sessions[sid]
            self.state.save()
            return "withdrawn"
        if not self._recheck(sid, rec):
            return "withdrawn"
        waiting = self._previous_running(sid, rec, now)
        if waiting is True:
            return "deferred"
        conf = {
            "observatory": self.observatory,
            "session_id": sid,
            "session_dir": rec["session_dir"],
            "revision": int(rec.get("revision") or 1),
        }
        if self.unpause and not self._unpaused and hasattr(self.trigger, "unpause"):
            res = self.trigger.unpause(self.dag_id)
            if res.delivered:
                self._unpaused = True
                log.info("DAG %s unpaused", self.dag_id)
            else:
                log.warning("DAG %s: could not unpause: %s", self.dag_id, res.message)
        t0 = time.time()
        if isinstance(waiting, TriggerOutcome):
            outcome = waiting
        else:
            outcome = self.trigger.trigger(self.dag_id, rec["run_id"], conf)
        t1 = time.time()
        rec["attempts"] = int(rec.get("attempts") or 0) + 1
        rec["last_attempt_at"] = iso_utc(t1)
        rec["http_status"] = outcome.status
        rec["result"] = outcome.result
        if outcome.delivered:
            rec["confirmed"] = True
            rec["confirmed_at"] = iso_utc(t1)
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
        return "delivered" if outcome.delivered else "failed"

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
