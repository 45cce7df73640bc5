"""Objects (targets, catalogue sources) and their per-frame photometry in the results database.

TargetRows is a mixin of rpp_tasks.outputs.db.ResultsDB: upsert_objects keeps one row per object
(its latest position and names), record_photometry upserts one row per object and frame (band,
magnitudes per photometry type, differential magnitude, limits, BJD), find_objects looks objects up
by name or position, and photometry_rows returns a light curve in one query.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    select,
)

from rpp_tasks.jsonsafe import json_safe
from rpp_tasks.outputs.db_schema import (
    _PHOT_FLOAT_FIELDS,
    OBJECT_KINDS,
    PHOTOMETRY_FIELDS,
    PHOTOMETRY_STATUSES,
    FrameRow,
    ObjectRow,
    PhotometryRow,
    SessionRow,
    _check_choice,
    _check_key,
    _finite_or_none,
    _utcnow,
)

__all__ = ["TargetRows"]

log = logging.getLogger(__name__)


class TargetRows:
    """Objects and their photometry: the light-curve part of `rpp_tasks.outputs.db.ResultsDB`."""

    def upsert_objects(self, objects: list[Mapping[str, Any]]) -> dict[str, int]:
        """
        Insert or update sky objects keyed by ``key``; return ``{key: primary key}``.

        Parameters
        ----------
        objects : list of mapping
            ``key``, ``name``, ``kind`` (``'target'`` or ``'source'``), ``ra_deg``, ``dec_deg``,
            optional ``ref_id`` and ``info`` (JSON-able: aliases, how it was resolved...). The last
            values written win (a target's position follows its latest resolution).
        """
        if not objects:
            return {}
        now = _utcnow()
        rows = []
        for o in objects:
            _check_key(o.get("key"), "object key")
            _check_choice(o.get("kind"), OBJECT_KINDS, "object kind")
            ra, dec = _finite_or_none(o.get("ra_deg")), _finite_or_none(o.get("dec_deg"))
            if ra is None or dec is None:
                msg = f"object {o['key']!r} needs a finite ra_deg and dec_deg"
                raise ValueError(msg)
            rows.append(
                {
                    "key": o["key"],
                    "name": str(o.get("name") or o["key"])[:160],
                    "kind": o["kind"],
                    "ra_deg": ra,
                    "dec_deg": dec,
                    "ref_id": o.get("ref_id"),
                    "info": json_safe(o.get("info")),
                    "created_utc": now,
                    "updated_utc": now,
                }
            )
        stmt = self._insert(ObjectRow)
        stmt = stmt.on_conflict_do_update(
            index_elements=[ObjectRow.key],
            set_={
                c: stmt.excluded[c]
                for c in ("name", "ra_deg", "dec_deg", "ref_id", "info", "updated_utc")
            },
        )
        keys = [r["key"] for r in rows]
        out: dict[str, int] = {}
        with self._write() as conn:
            conn.execute(stmt, rows)
            for i in range(0, len(keys), 500):
                q = select(ObjectRow.key, ObjectRow.id).where(ObjectRow.key.in_(keys[i : i + 500]))
                out.update({k: pk for k, pk in conn.execute(q)})
        return out

    def record_photometry(
        self,
        observatory: str,
        session_id: str,
        rows: list[Mapping[str, Any]],
        *,
        frames: Mapping[str, Mapping[str, Any]] | None = None,
        batch_rows: int = 500,
    ) -> int:
        """
        Insert or update the photometry of objects in the frames of one session.

        Parameters
        ----------
        observatory, session_id : str
            The session (recorded with `upsert_session`).
        rows : list of mapping
            ``object_pk`` (from `upsert_objects`), ``frame`` (frame stem) and any of
            `PHOTOMETRY_FIELDS` (``status`` required: detected, upper_limit, outside_field,
            no_wcs). NaN is stored as ``NULL``; ``by_type`` is JSON. A repeated (object, frame)
            keeps its last row.
        frames : mapping, optional
            ``{stem: {"band", "mjd_obs", "exptime_s"}}``: frames of ``rows`` the database does
            not hold yet are inserted with these values (science, status ok) in the same
            transaction; without it an unknown frame raises `ValueError`.
        batch_rows : int
            Rows per multi-row ``INSERT ... ON CONFLICT DO UPDATE`` statement.

        Returns
        -------
        n : int
            Rows written. Raises `ValueError` for an unknown session or frame.
        """
        if not rows:
            return 0
        now = _utcnow()
        t = FrameRow.__table__
        with self._write() as conn:
            session_pk = self._session_pk(conn, observatory, session_id)
            q = select(t.c.frame_stem, t.c.id).where(t.c.session_pk == session_pk)
            known = dict(conn.execute(q).all())
            missing = sorted({r["frame"] for r in rows} - set(known))
            if missing and frames is not None:
                new = []
                for stem in missing:
                    info = frames.get(stem) or {}
                    new.append(
                        {
                            "session_pk": session_pk,
                            "frame_stem": _check_key(stem, "frame_stem"),
                            "imagetyp": "science",
                            "status": "ok",
                            "band": info.get("band"),
                            "mjd_obs": _finite_or_none(info.get("mjd_obs")),
                            "exptime_s": _finite_or_none(info.get("exptime_s")),
                            "created_utc": now,
                            "updated_utc": now,
                        }
                    )
                stmt = self._insert(FrameRow).values(new)
                conn.execute(
                    stmt.on_conflict_do_nothing(index_elements=["session_pk", "frame_stem"])
                )
                known = dict(conn.execute(q).all())
            by_key: dict[tuple[int, int], dict] = {}
            for r in rows:
                unknown = set(r) - set(PHOTOMETRY_FIELDS) - {"object_pk", "frame"}
                if unknown:
                    msg = f"unknown photometry field(s) {sorted(unknown)}"
                    raise ValueError(msg)
                if r["frame"] not in known:
                    msg = f"unknown frame {r['frame']!r} of {observatory}/{session_id}"
                    raise ValueError(msg)
                v = {k: r.get(k) for k in PHOTOMETRY_FIELDS}
                _check_choice(v["status"], PHOTOMETRY_STATUSES, "photometry status")
                for k in _PHOT_FLOAT_FIELDS:
                    v[k] = _finite_or_none(v[k])
                v["by_type"] = json_safe(v["by_type"]) if v["by_type"] is not None else None
                if v["flags"] is not None and not isinstance(v["flags"], str):
                    v["flags"] = ",".join(v["flags"])[:255]
                v.update(object_pk=int(r["object_pk"]), frame_pk=known[r["frame"]])
                v["updated_utc"] = now
                by_key[(v["object_pk"], v["frame_pk"])] = v
            values = list(by_key.values())
            for i in range(0, len(values), max(1, int(batch_rows))):
                stmt = self._insert(PhotometryRow).values(values[i : i + batch_rows])
                stmt = stmt.on_conflict_do_update(
                    index_elements=[PhotometryRow.object_pk, PhotometryRow.frame_pk],
                    set_={c: stmt.excluded[c] for c in (*PHOTOMETRY_FIELDS, "updated_utc")},
                )
                conn.execute(stmt)
        log.debug(
            "results db: %d photometry rows of %s/%s recorded", len(values), observatory, session_id
        )
        return len(values)

    def find_objects(
        self,
        *,
        key: str | None = None,
        ra_deg: float | None = None,
        dec_deg: float | None = None,
        radius_arcsec: float = 2.0,
        kind: str | None = None,
    ) -> list[dict[str, Any]]:
        """
        Objects by key, or within ``radius_arcsec`` of a position (nearest first, with
        ``sep_arcsec``), or every object of ``kind``. The position search uses the
        ``(dec_deg, ra_deg)`` index.
        """
        t = ObjectRow.__table__
        stmt = select(t)
        if kind is not None:
            stmt = stmt.where(t.c.kind == _check_choice(kind, OBJECT_KINDS, "kind"))
        if key is not None:
            stmt = stmt.where(t.c.key == key)
        elif ra_deg is not None and dec_deg is not None:
            r = radius_arcsec / 3600.0
            stmt = stmt.where(t.c.dec_deg.between(dec_deg - r, dec_deg + r))
            cosd = max(math.cos(math.radians(dec_deg)), 1e-6)
            dra = min(r / cosd, 180.0)
            lo, hi = (ra_deg - dra) % 360.0, (ra_deg + dra) % 360.0
            if dra >= 180.0:
                pass
            elif lo <= hi:
                stmt = stmt.where(t.c.ra_deg.between(lo, hi))
            else:
                stmt = stmt.where((t.c.ra_deg >= lo) | (t.c.ra_deg <= hi))
        elif kind is None:
            msg = "give key, or ra_deg and dec_deg, or kind (every object of that kind)"
            raise ValueError(msg)
        with self._read() as conn:
            rows = [dict(r) for r in conn.execute(stmt).mappings()]
        if key is None and ra_deg is not None and dec_deg is not None:
            for row in rows:
                row["sep_arcsec"] = _sep_arcsec(ra_deg, dec_deg, row["ra_deg"], row["dec_deg"])
            rows = sorted(
                (r for r in rows if r["sep_arcsec"] <= radius_arcsec),
                key=lambda r: r["sep_arcsec"],
            )
        return rows

    def photometry_rows(
        self,
        object_pks: list[int],
        *,
        observatory: str | None = None,
        band: str | None = None,
        include_rejected_frames: bool = False,
        fields: tuple[str, ...] | None = None,
        columns: bool = False,
        statuses: tuple[str, ...] | None = None,
    ) -> list[dict[str, Any]] | dict[str, list]:
        """
        The photometry of objects over every session: one query, ordered by time.

        Each row has the `PHOTOMETRY_FIELDS` (or only ``fields``) plus ``object_key``,
        ``object_name``, ``frame`` (stem), ``session_id``, ``observatory``, ``night_date``,
        ``exptime_s``. Frames rejected by a later re-run are left out unless
        ``include_rejected_frames``. ``columns=True`` returns ``{name: [values]}`` instead of a
        list of row dicts (much faster for long light curves); ``statuses`` keeps only these.
        """
        p, f, s, o = (
            PhotometryRow.__table__,
            FrameRow.__table__,
            SessionRow.__table__,
            ObjectRow.__table__,
        )
        stmt = (
            select(
                *[p.c[c] for c in (fields or PHOTOMETRY_FIELDS)],
                o.c.key.label("object_key"),
                o.c.name.label("object_name"),
                f.c.frame_stem.label("frame"),
                f.c.exptime_s,
                s.c.session_id,
                s.c.observatory,
                s.c.night_date,
            )
            .select_from(p.join(o, o.c.id == p.c.object_pk).join(f, f.c.id == p.c.frame_pk))
            .join(s, s.c.id == f.c.session_pk)
            .where(p.c.object_pk.in_([int(k) for k in object_pks]))
            .order_by(p.c.mjd_mid, f.c.frame_stem)
        )
        if band is not None:
            stmt = stmt.where(p.c.band == band)
        if observatory is not None:
            stmt = stmt.where(s.c.observatory == observatory)
        if not include_rejected_frames:
            stmt = stmt.where(f.c.status == "ok")
        if statuses is not None:
            stmt = stmt.where(p.c.status.in_(list(statuses)))
        with self._read() as conn:
            result = conn.execute(stmt)
            names = list(result.keys())
            if columns:
                data = result.all()
                cols = list(zip(*data)) if data else [() for _ in names]
                return {n: list(c) for n, c in zip(names, cols)}
            return [dict(zip(names, r)) for r in result]


def _sep_arcsec(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    r1, d1, r2, d2 = (math.radians(v) for v in (ra1, dec1, ra2, dec2))
    h = math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((r2 - r1) / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h)))) * 3600.0
