"""Session watcher: the process that triggers a DAG run for each session that becomes ready.

The `SessionWatcher` wakes on filesystem events (watchdog: inotify, or polling for network / sync
mounts), re-evaluates periodically to cover missed events, rescans every folder at start
(catch-up), and triggers the observatory's DAG through the Airflow REST API
(`rpp_tasks.ops.airflow_api.AirflowClient`) with a deterministic run id
``session__<session_id>``: a repeat answers 409, which counts as done. Triggers are recorded in a
small JSON state file (`WatchState`) written atomically, and queued with a bounded exponential
backoff while the API is down, so a restart never triggers a session twice and a pending trigger
survives a restart. When a session is ready is decided by `rpp_tasks.ops.readiness`.

`find_ready_untriggered` is the reconcile DAG's safety net; ``rpp watch`` (`rpp_tasks.ops.cli`)
runs one watcher per configured observatory. The module never imports Airflow.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rpp_tasks.exceptions import ConfigError, RppError
from rpp_tasks.ops.readiness import (
    SessionCandidate,
    SessionRule,
    Snapshot,
    assess_session,
    list_session_dirs,
    scan_incoming,
    session_id_for,
)

__all__ = [
    "WatchState",
    "SessionWatcher",
    "WatcherLocked",
    "find_ready_untriggered",
]

log = logging.getLogger(__name__)

STATE_VERSION = 1


class WatcherLocked(RppError):
    """Another watcher process already holds the state file of this observatory."""


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
