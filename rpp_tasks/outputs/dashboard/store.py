"""The dashboard's data: sessions in the work folders, the results database, the ObsCore archive.

* `Store.sync_index` keeps the search index (``rpp_frame_index``) in step with the sessions'
  ``session_summary.json`` (a session is re-indexed when its summary changed);
* `Store.decide` records a validation or withdrawal (``rpp_decision``, who/when/why) and applies it
  to the ObsCore table at once: a withdrawn frame's row is deleted, a validated one is upserted;
* `publishable_frames` is the rule the archive task follows too (`archive.publish`).

Errors are typed for the web layer: `ValueError` (malformed request, 400), `LookupError` (unknown
observatory/session/frame, 404), `PermissionError` (403), `ConflictError` (409: e.g. withdrawing
a frame that was never archived). Nothing is changed when one is raised.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from rpp_tasks.outputs import db as rdb_mod
from rpp_tasks.outputs import db_decisions
from rpp_tasks.outputs.browse import safe_name
from rpp_tasks.outputs.dashboard.roles import Actor

log = logging.getLogger(__name__)

PUBLISH_POLICIES = ("always", "on_validation")


class ConflictError(Exception):
    """The request is well-formed but cannot apply to this object (HTTP 409)."""


def results_url_for(obs) -> str:
    """The results database of an observatory: ``$RPP_RESULTS_DB_URL``, else the SQLite file in
    its work folder (the same rule as the pipeline's `record_results`)."""
    return rdb_mod.results_url_from_env(rdb_mod.default_results_url(obs.resolve_path("work")))


def effective_decision(stem: str, by_stem: Mapping[str, Mapping]) -> dict | None:
    """The decision that applies to a frame: its own, else the session-wide one, else None."""
    return by_stem.get(stem) or by_stem.get(db_decisions.SESSION_WIDE)


def publishable_frames(
    stems: Iterable[str], decisions: Iterable[Mapping], policy: str = "always"
) -> list[str]:
    """The frames that go to the archive: never a withdrawn one; with ``on_validation`` only
    the validated ones (the observer's agreement)."""
    if policy not in PUBLISH_POLICIES:
        msg = f"archive.publish must be one of {PUBLISH_POLICIES}, got {policy!r}"
        raise ValueError(msg)
    by_stem = {d["frame_stem"]: d for d in decisions}
    out = []
    for stem in stems:
        d = effective_decision(stem, by_stem)
        state = d["decision"] if d else "pending"
        if state == "withdrawn" or (policy == "on_validation" and state != "validated"):
            continue
        out.append(stem)
    return out


def archive_kwargs(obs, workdir: Path) -> dict:
    """Arguments of `~rpp_tasks.outputs.archive.session_rows` for a session of ``obs``.

    ``archive.base_url`` ``file://`` (default) gives ``file://`` access URLs; an HTTP base (the
    observatory's work folder as served, ``{observatory}`` filled in) gives
    ``<base>/<session>/frames/<frame>/calibrated.fits``.
    """
    base = (obs.archive.base_url or "").strip()
    http = base not in ("", "file://")
    return {
        "obs_collection": obs.archive.obs_collection or obs.name,
        "publisher_authority": obs.archive.publisher_authority,
        "access_url_base": base.replace("{observatory}", obs.name) if http else None,
        "products_root": Path(workdir).parent if http else None,
        "facility_name": obs.camera.telescope,
        "instrument_name": obs.camera.name,
    }


def _index_rows(summary: dict, mtime: float) -> list[dict]:
    from rpp_tasks.stages.target import normalize_name

    rows = []
    for f in summary.get("frames") or []:
        obj = f.get("object")
        rows.append(
            {
                "frame_stem": f["frame"],
                "night_date": summary.get("night_date"),
                "object_name": obj,
                "object_key": normalize_name(obj) if obj else None,
                "band": f.get("band"),
                "mjd_obs": f.get("mjd_obs"),
                "date_obs": f.get("date_obs"),
                "exptime_s": f.get("exptime_s"),
                "ra_deg": f.get("ra_deg"),
                "dec_deg": f.get("dec_deg"),
                "status": "ok" if f.get("status") == "ok" else "rejected",
                "fwhm_arcsec": f.get("fwhm_arcsec"),
                "zp_mag": f.get("zp_mag"),
                "limiting_mag": f.get("limiting_mag_cal") or f.get("limiting_mag_inst"),
                "summary_mtime": mtime,
            }
        )
    return rows


class Store:
    """Sessions, results databases and archives of a set of observatories.

    Parameters
    ----------
    configs : iterable of `~rpp_tasks.config.ObservatoryConfig`
    results_url : callable(obs) -> str, optional
        Results database of an observatory (default `results_url_for`).
    archive_url : callable(obs) -> str, optional
        ObsCore archive database of an observatory (default: the embedded SQLite archive, see
        `rpp_tasks.session.connections.archive_url`; the plugin passes Airflow's connections).
    sync_every_s : float
        The search index is re-synchronised with the work folders at most this often.
    """

    def __init__(
        self,
        configs,
        *,
        results_url: Callable | None = None,
        archive_url: Callable | None = None,
        sync_every_s: float = 5.0,
    ):
        self.configs = {o.name: o for o in configs}
        self._results_url = results_url or results_url_for
        if archive_url is None:
            from rpp_tasks.session.connections import archive_url as _aurl

            archive_url = _aurl
        self._archive_url = archive_url
        self._dbs: dict[str, rdb_mod.ResultsDB] = {}
        self._lock = threading.Lock()
        self._synced_at = -1e18
        self.sync_every_s = sync_every_s

    # ---- lookups -----------------------------------------------------------------------------

    def obs(self, name: str):
        o = self.configs.get(name)
        if o is None:
            raise LookupError(f"unknown observatory {name!r:.80}")
        return o

    def db(self, obs) -> rdb_mod.ResultsDB:
        url = self._results_url(obs)
        with self._lock:
            d = self._dbs.get(url)
            if d is None:
                d = rdb_mod.ResultsDB(url)
                d.create_schema()
                self._dbs[url] = d
        return d

    def groups(self) -> dict[str, tuple[rdb_mod.ResultsDB, list[str]]]:
        """Observatories by results database: ``{url: (db, [observatory names])}``."""
        out: dict[str, tuple] = {}
        for name, o in self.configs.items():
            d = self.db(o)
            out.setdefault(d.url, (d, []))[1].append(name)
        return out

    def workdir(self, obs, session_id: str) -> Path:
        """The work folder of a reduced session (LookupError when there is none)."""
        if not safe_name(session_id):
            raise ValueError(f"invalid session id {session_id!r:.80}")
        work = obs.resolve_path("work").resolve()
        d = (work / session_id).resolve()
        if d.parent != work or not (d / "session_summary.json").is_file():
            raise LookupError(f"no reduced session {session_id!r} for observatory {obs.name!r}")
        return d

    def summary(self, obs, session_id: str) -> dict:
        path = self.workdir(obs, session_id) / "session_summary.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LookupError(f"unreadable summary of session {session_id!r}: {exc}") from None

    def frame(self, obs, session_id: str, stem: str) -> dict:
        """The frame summary of ``stem`` in the session summary (LookupError when unknown)."""
        if not safe_name(stem):
            raise ValueError(f"invalid frame name {stem!r:.80}")
        for f in self.summary(obs, session_id).get("frames") or []:
            if f.get("frame") == stem:
                return f
        raise LookupError(f"no frame {stem!r} in session {obs.name}/{session_id}")

    def decisions(self, obs, session_id: str, *, history: bool = False) -> list[dict]:
        return db_decisions.decisions(self.db(obs), obs.name, session_id, history=history)

    # ---- search index ------------------------------------------------------------------------

    def sync_index(self, *, force: bool = False) -> int:
        """Re-index the sessions whose summary changed since they were indexed (at most every
        ``sync_every_s`` unless ``force``). Returns the number of sessions (re)indexed."""
        now = time.monotonic()
        if not force and now - self._synced_at < self.sync_every_s:
            return 0
        self._synced_at = now
        from sqlalchemy import func, select

        t = db_decisions.FrameIndexRow.__table__
        n = 0
        for name, o in self.configs.items():
            work = o.resolve_path("work")
            if not work.is_dir():
                continue
            d = self.db(o)
            with d.engine.connect() as conn:
                known = dict(
                    conn.execute(
                        select(t.c.session_id, func.max(t.c.summary_mtime))
                        .where(t.c.observatory == name)
                        .group_by(t.c.session_id)
                    ).all()
                )
            for sd in work.iterdir():
                path = sd / "session_summary.json"
                try:
                    mtime = path.stat().st_mtime
                except OSError:
                    continue
                if known.get(sd.name) == mtime and not force:
                    continue
                try:
                    summary = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    log.warning("dashboard: skipping %s: %s", path, exc)
                    continue
                db_decisions.upsert_frame_index(d, name, sd.name, _index_rows(summary, mtime))
                n += 1
        return n

    # ---- decisions -----------------------------------------------------------------------------

    def decide(
        self,
        actor: Actor,
        observatory: str,
        session_id: str,
        decision: str,
        *,
        frames: list[str] | None = None,
        reason: str | None = None,
    ) -> dict:
        """Validate or withdraw frames (``frames`` None: the whole session) and apply it to the
        ObsCore table. Returns what was recorded and how many archive rows were removed/added."""
        from rpp_tasks.outputs import archive

        if decision not in db_decisions.DECISIONS:
            raise ValueError(
                f"decision must be one of {db_decisions.DECISIONS}, got {decision!r:.40}"
            )
        reason = (reason or "").strip()
        if decision == "withdrawn" and not reason:
            raise ValueError("a withdrawal needs a reason")
        if len(reason) > 2000:
            raise ValueError("reason longer than 2000 characters")
        obs = self.obs(observatory)
        actor.require("decide", obs.dag_id)
        summary = self.summary(obs, session_id)
        by_stem = {f.get("frame"): f for f in summary.get("frames") or []}
        whole = frames is None
        if whole:
            stems = [
                s for s, f in by_stem.items() if f.get("status") == "ok" and f.get("calibrated")
            ]
            if not stems:
                raise ConflictError(f"session {observatory}/{session_id} has no archived frame")
        else:
            stems = list(dict.fromkeys(frames))
            if not stems:
                raise ValueError("no frame given")
            for s in stems:
                if not safe_name(s):
                    raise ValueError(f"invalid frame name {s!r:.80}")
                if s not in by_stem:
                    raise LookupError(f"no frame {s!r} in session {observatory}/{session_id}")
                f = by_stem[s]
                if f.get("status") != "ok" or not f.get("calibrated"):
                    raise ConflictError(
                        f"frame {s!r} was not reduced ({f.get('status')}: "
                        f"{f.get('reason') or 'no calibrated image'}): it is not archived"
                    )
        workdir = self.workdir(obs, session_id)
        url = self._archive_url(obs)
        pairs, _, skipped = archive.session_rows(
            summary, frames=stems, **archive_kwargs(obs, workdir)
        )
        if not pairs and skipped:
            raise ConflictError(f"no archive row can be built: {skipped[0][1]}")
        d = self.db(obs)
        when = db_decisions.record_decision(
            d,
            obs.name,
            session_id,
            [*stems, *([db_decisions.SESSION_WIDE] if whole else [])],
            decision,
            by=actor.name,
            reason=reason or None,
        )
        removed = added = 0
        if obs.archive.enabled:
            if decision == "withdrawn":
                removed = archive.delete_obscore([r.obs_publisher_did for _, r in pairs], url)
            else:
                res = archive._store(
                    [r for _, r in pairs],
                    [],
                    [],
                    url=url,
                    table=archive.DEFAULT_TABLE,
                    create_table=None,
                    session_id=session_id,
                )
                added = res["n_inserted"]
        log.info(
            "dashboard: %s %s %s/%s %s (%s)",
            actor.name,
            decision,
            observatory,
            session_id,
            "all" if whole else ",".join(stems),
            reason,
        )
        return {
            "observatory": observatory,
            "session_id": session_id,
            "frames": stems,
            "decision": decision,
            "reason": reason or None,
            "by": actor.name,
            "when_utc": when.isoformat(timespec="seconds"),
            "archive_rows_removed": removed,
            "archive_rows_added": added,
            "dids": [r.obs_publisher_did for _, r in pairs],
        }

    def delete_products(self, actor: Actor, observatory: str, session_id: str) -> dict:
        """Admin: delete a session's products (its work folder, its archive rows and its index
        rows). The raw files are never touched: refused if the raw folder is inside the work
        folder."""
        from rpp_tasks.outputs import archive

        obs = self.obs(observatory)
        actor.require("delete", obs.dag_id)
        workdir = self.workdir(obs, session_id)
        summary = self.summary(obs, session_id)
        raw = summary.get("raw_dir")
        if raw:
            rawp = Path(raw).resolve()
            if rawp == workdir or rawp.is_relative_to(workdir) or workdir.is_relative_to(rawp):
                raise ConflictError("the raw folder overlaps the work folder: nothing deleted")
        pairs, _, _ = archive.session_rows(summary, **archive_kwargs(obs, workdir))
        removed = archive.delete_obscore(
            [r.obs_publisher_did for _, r in pairs], self._archive_url(obs)
        )
        db_decisions.upsert_frame_index(self.db(obs), obs.name, session_id, [])
        shutil.rmtree(workdir)
        log.warning(
            "dashboard: %s deleted the products of %s/%s", actor.name, observatory, session_id
        )
        return {
            "observatory": observatory,
            "session_id": session_id,
            "deleted": str(workdir),
            "archive_rows_removed": removed,
            "by": actor.name,
        }
