"""ObsCore archive: one row per product, upserted into an ObsCore-shaped table.

The table contract (see ``archive/README.md``):

* The project ships a GAVO DaCHS resource descriptor (``archive/dachs/q.rd``) declaring the
  table ``rpp.main`` with the ObsCore 1.1 columns (``//obscore#obscore-columns``) and the mixin
  ``//obscore#publishObscoreLike``. DaCHS creates the table and adds it to the ``ivoa.obscore``
  view, TAP and SIAP2. The pipeline only **upserts rows** (``INSERT ... ON CONFLICT
  (obs_publisher_did) DO UPDATE``) as the least-privilege role ``rpp_pipeline`` and never writes
  ``ivoa.*``.
* Without PostgreSQL, the same table lives in SQLite (the embedded default), with ``s_region`` as
  a DALI polygon string (``"ra1 dec1 ra2 dec2 ..."``, degrees ICRS).

Rooms: rows are built by `rpp_tasks.outputs.obscore` (`to_obscore_row`) with the footprints of
`rpp_tasks.outputs.footprint`; this module is the SQL store (`create_obscore_table`,
`upsert_obscore`, `covering_query`) and the adapters: `archive_session` (the reduced frames of a
`~rpp_tasks.session.summary.SessionSummary`, what the DAG's archive task runs) and `run_archive`
(any list of product files or frame summaries). The row and footprint names are re-exported here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import quote

from rpp_tasks.outputs.footprint import (
    Footprint,
    celestial_footprint,
    dali_to_spoly,
    dali_to_stcs,
    polygon_contains,
    spectral_range_m,
    spoly_to_dali,
)
from rpp_tasks.outputs.obscore import (
    OBSCORE_COLUMNS,
    ObsCoreRow,
    make_publisher_did,
    read_product_header,
    to_obscore_row,
)
from rpp_tasks.outputs.obscore_sql import (
    DEFAULT_TABLE,
    UpsertResult,
    _engine,
    _table_name,
    covering_query,
    create_obscore_table,
    upsert_obscore,
)

__all__ = [
    "DEFAULT_TABLE",
    "OBSCORE_COLUMNS",
    "Footprint",
    "ObsCoreRow",
    "UpsertResult",
    "ArchiveResult",
    "celestial_footprint",
    "spectral_range_m",
    "make_publisher_did",
    "to_obscore_row",
    "dali_to_spoly",
    "dali_to_stcs",
    "spoly_to_dali",
    "polygon_contains",
    "create_obscore_table",
    "upsert_obscore",
    "covering_query",
    "read_product_header",
    "run_archive",
    "archive_session",
    "session_rows",
    "delete_obscore",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Adapter
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveResult:
    """Summary of `run_archive` (JSON-safe via `to_dict`)."""

    table: str
    dialect: str
    n_rows: int
    n_inserted: int
    n_updated: int
    dids: tuple[str, ...]
    no_footprint: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict:
        """JSON-safe dictionary for XCom and the session summary."""
        return {
            **asdict(self),
            "dids": list(self.dids),
            "no_footprint": list(self.no_footprint),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


def _summary_for(product: Path) -> dict:
    for candidate in (product.parent / "summary.json", product.with_suffix(".json")):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (OSError, ValueError):
                log.warning("archive: unreadable %s", candidate)
    return {}


def _access_url(product: Path, access_url_base, products_root) -> str:
    if not access_url_base:
        return product.resolve().as_uri()
    root = Path(products_root) if products_root else product.parent
    try:
        rel = product.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        rel = product.name
    return access_url_base.rstrip("/") + "/" + quote(rel)


def _row(product: Path, spec: dict, skipped: list, **row_kwargs) -> ObsCoreRow | None:
    """The row of one product (its header gives the WCS footprint and the image size; ``spec``,
    a frame summary, gives the normalised facts); None, with the reason in ``skipped``."""
    try:
        header = read_product_header(product)
    except (OSError, ValueError) as exc:
        log.warning("archive: cannot read %s: %s", product, exc)
        skipped.append((str(product), f"unreadable FITS: {exc}"))
        return None
    try:
        return to_obscore_row(
            header,
            product_path=product,
            meta=spec,
            obs_id=spec.get("obs_id"),
            fwhm_arcsec=spec.get("fwhm_arcsec"),
            calib_level=spec.get("calib_level", row_kwargs.pop("calib_level")),
            dataproduct_type=spec.get("dataproduct_type"),
            band=spec.get("band"),
            ra_deg=spec.get("ra_deg"),
            dec_deg=spec.get("dec_deg"),
            aperture_arcsec=spec.get("aperture_arcsec"),
            **row_kwargs,
        )
    except ValueError as exc:
        log.warning("archive: %s: %s", product, exc)
        skipped.append((str(product), str(exc)))
        return None


def unique_ids(rows: list[ObsCoreRow]) -> list[ObsCoreRow]:
    """Rows whose ``obs_publisher_did`` is shared by another row of the batch (two products with
    the same default ``obs_id``, e.g. the same ``INSTRUME`` and ``DATE-OBS``) get an ``obs_id``
    suffixed with a short hash of their ``access_url`` and the DID rebuilt from it: one product,
    one row, deterministically (never one product's row silently replaced by another's)."""
    import dataclasses
    import hashlib
    from collections import Counter

    dup = Counter(r.obs_publisher_did for r in rows)
    out = []
    for r in rows:
        if dup[r.obs_publisher_did] > 1:
            tag = hashlib.sha256(str(r.access_url).encode()).hexdigest()[:8]
            obs_id = f"{r.obs_id}_{tag}"
            head, _, local = r.obs_publisher_did.partition("?")
            parts = local.split("/")
            old_id = quote(str(r.obs_id).strip(), safe="-._~:+/")
            new_local = local.replace(f"/{old_id}/", f"/{quote(obs_id, safe='-._~:+/')}/", 1)
            if new_local == local:  # (an obs_id the DID does not show as is)
                new_local = "/".join([*parts[:-1], tag, parts[-1]])
            r = dataclasses.replace(r, obs_id=obs_id, obs_publisher_did=f"{head}?{new_local}")
        out.append(r)
    return out


def _store(rows, no_fp, skipped, *, url, table, create_table, session_id) -> dict:
    """Upsert the rows (creating the SQLite table) and summarise (`ArchiveResult.to_dict`)."""
    rows = unique_ids(rows)
    engine_dialect = _engine(url).dialect.name
    if create_table is None:
        create_table = engine_dialect == "sqlite"
    if create_table:
        create_obscore_table(url, table=table)
    if rows:
        up = upsert_obscore(rows, url, table=table)
        name, n_ins, n_upd = up.table, up.n_inserted, up.n_updated
    else:
        name, n_ins, n_upd = _table_name(table, engine_dialect), 0, 0
    result = ArchiveResult(
        table=name,
        dialect=engine_dialect,
        n_rows=len(rows),
        n_inserted=n_ins,
        n_updated=n_upd,
        dids=tuple(r.obs_publisher_did for r in rows),
        no_footprint=tuple(no_fp),
        skipped=tuple(skipped),
    )
    log.info(
        "archive: session %s: %d rows (%d new, %d updated), %d without footprint, %d skipped",
        session_id,
        len(rows),
        n_ins,
        n_upd,
        len(no_fp),
        len(skipped),
    )
    return result.to_dict()


def run_archive(
    products,
    *,
    url,
    obs_collection,
    publisher_authority,
    access_url_base=None,
    products_root=None,
    table=DEFAULT_TABLE,
    session_id=None,
    facility_name=None,
    instrument_name=None,
    calib_level=2,
    create_table=None,
) -> dict:
    """
    Adapter: build one ObsCore row per product and upsert them.

    Parameters
    ----------
    products : iterable
        Paths of FITS products (a sibling ``summary.json`` gives the frame's facts), or frame
        summaries: dicts (or ``.json`` paths) with ``product_path`` (or ``calibrated``, the
        calibrated frame of a pipeline summary) and optionally ``fwhm_arcsec``, ``obs_id``,
        ``band``, ``mjd_obs``, ``exptime_s``, ``ra_deg``, ``dec_deg``, ``aperture_arcsec``,
        ``calib_level``, ``dataproduct_type``.
    url : str
        Archive database URL (see `upsert_obscore`).
    obs_collection, publisher_authority : str
        See `~rpp_tasks.outputs.obscore.to_obscore_row`.
    access_url_base : str, optional
        Public base URL of ``products_root``; ``access_url = base + relative path``. Default: the
        product's ``file://`` URI.
    products_root : path-like, optional
        Root the relative paths are taken from (default: the product's folder).
    table : str, optional
    session_id : str, optional
        Stored in ``rpp_session``.
    facility_name, instrument_name : str, optional
        Names from the observatory configuration (override the header).
    calib_level : int, optional
    create_table : bool, optional
        Create the table if missing; default True for SQLite, False for PostgreSQL (DaCHS owns
        the table there).

    Returns
    -------
    summary : dict
        `ArchiveResult.to_dict()`: counts, DIDs, products without footprint, skipped products
        with reasons.
    """
    rows, no_fp, skipped = [], [], []
    for item in products:
        spec = dict(item) if isinstance(item, dict) else {}
        if not spec:
            p = Path(item)
            if p.suffix == ".json":
                spec = json.loads(p.read_text())
                spec.setdefault("summary_dir", str(p.parent))
            else:
                spec = {"product_path": str(p)}
        product = spec.get("product_path") or spec.get("calibrated")
        if product is None and spec.get("summary_dir"):
            product = str(Path(spec["summary_dir"]) / "calibrated.fits")
        if product is None:
            skipped.append((str(item)[:200], "no product path in summary"))
            continue
        product = Path(product)
        spec = {**_summary_for(product), **spec}
        row = _row(
            product,
            spec,
            skipped,
            access_url=_access_url(product, access_url_base, products_root),
            obs_collection=obs_collection,
            publisher_authority=publisher_authority,
            facility_name=facility_name,
            instrument_name=instrument_name,
            session_id=session_id,
            calib_level=calib_level,
        )
        if row is not None:
            rows.append(row)
            if row.s_region is None:
                no_fp.append(str(product))
    return _store(
        rows, no_fp, skipped, url=url, table=table, create_table=create_table, session_id=session_id
    )


def session_rows(
    summary,
    *,
    obs_collection,
    publisher_authority,
    access_url_base=None,
    products_root=None,
    facility_name=None,
    instrument_name=None,
    calib_level=2,
    frames=None,
) -> tuple[list[tuple[str, ObsCoreRow]], list[str], list[tuple[str, str]]]:
    """The ObsCore rows of a session's reduced frames and 1-D spectra (``frames``: only these frame
    stems or spectrum targets), built but not stored: ``([(frame stem or target, row)], products
    without footprint, [(frame, why skipped)])``. The parameters are those of `archive_session`.
    A frame's ``obs_id`` is ``<session_id>/<frame stem>`` (stems are unique within a session):
    a re-run updates the session's rows and no two sessions share one."""
    from rpp_tasks.session.summary import SessionSummary

    s = SessionSummary.coerce(summary)
    wanted = None if frames is None else set(frames)
    rows, no_fp, skipped = [], [], []

    def row_for(product: Path, meta: dict) -> ObsCoreRow | None:
        return _row(
            product,
            meta,
            skipped,
            access_url=_access_url(product, access_url_base, products_root),
            obs_collection=obs_collection,
            publisher_authority=publisher_authority,
            facility_name=facility_name,
            instrument_name=instrument_name,
            session_id=s.session_id,
            calib_level=calib_level,
        )

    for f in s.ok_frames:
        if wanted is not None and f.frame not in wanted:
            continue
        if not f.calibrated:
            skipped.append((f.frame, "no calibrated image"))
            continue
        product = Path(f.calibrated)
        # one observation id per frame of a session (stems are unique within it, session ids
        # within the observatory): a re-run updates its rows, other sessions never collide
        row = row_for(product, {**f.to_dict(), "obs_id": f"{s.session_id}/{f.frame}"})
        if row is not None:
            rows.append((f.frame, row))
            if row.s_region is None:
                no_fp.append(str(product))
    for sp in s.ok_spectra:  # long-slit: one row per combined 1-D spectrum (BeSS FITS)
        if wanted is not None and sp.target not in wanted:
            continue
        if not sp.bess_fits:
            skipped.append((sp.target, "no 1-D spectrum"))
            continue
        product = Path(sp.bess_fits)
        meta = {
            "object": sp.object or sp.target,
            "date_obs": sp.date_obs,
            "mjd_obs": sp.mjd_start,
            "mjd_end": sp.mjd_end,
            "exptime_s": sp.exptime_s,
            "dataproduct_type": "spectrum",
            "ra_deg": sp.ra_deg,
            "dec_deg": sp.dec_deg,
        }
        row = row_for(product, meta)
        if row is not None:
            if sp.resolving_power:  # measured (the header's SPE_RPOW is rounded)
                row = replace(row, em_res_power=float(sp.resolving_power))
            rows.append((sp.target, row))
    return rows, no_fp, skipped


def delete_obscore(dids, url, *, table=DEFAULT_TABLE) -> int:
    """Delete the rows with these publisher DIDs (a withdrawn product); returns how many went.

    A table that does not exist yet holds no row: 0, not an error."""
    from sqlalchemy import inspect, text

    dids = list(dids)
    engine = _engine(url)
    name = _table_name(table, engine.dialect.name)
    n = 0
    try:
        schema, _, bare = name.rpartition(".")
        if not dids or not inspect(engine).has_table(bare, schema=schema or None):
            return 0
        with engine.begin() as conn:
            for did in dids:
                n += conn.execute(
                    text(f"DELETE FROM {name} WHERE obs_publisher_did = :d"), {"d": did}
                ).rowcount
    finally:
        engine.dispose()
    log.info("archive: %s: %d row(s) withdrawn", name, n)
    return n


def archive_session(
    summary,
    *,
    url,
    obs_collection,
    publisher_authority,
    access_url_base=None,
    products_root=None,
    table=DEFAULT_TABLE,
    facility_name=None,
    instrument_name=None,
    calib_level=2,
    create_table=None,
    frames=None,
) -> dict:
    """
    Adapter: one ObsCore row per reduced frame of a session, upserted (the DAG's archive task);
    for a long-slit session one row per 1-D spectrum (``dataproduct_type='spectrum'``, em_min/
    em_max from its wavelength scale, ``em_res_power`` the measured resolving power, t_min/t_max
    from the first exposure's start to the last one's end, ``t_exptime`` the total exposure).

    ``summary`` is a `~rpp_tasks.session.summary.SessionSummary` (or its dict). Each reduced
    frame's row takes its time, exposure, pointing, band, target and FWHM from the frame summary
    (the normalised header) and its footprint from the calibrated image's WCS. The other
    parameters are those of `run_archive`; the session id goes into ``rpp_session``.
    ``frames`` (frame stems), when given, limits the rows to those frames (the observers'
    decisions: `rpp_tasks.outputs.dashboard.decide.publishable_frames`).
    """
    from rpp_tasks.session.summary import SessionSummary

    s = SessionSummary.coerce(summary)
    pairs, no_fp, skipped = session_rows(
        s,
        obs_collection=obs_collection,
        publisher_authority=publisher_authority,
        access_url_base=access_url_base,
        products_root=products_root,
        facility_name=facility_name,
        instrument_name=instrument_name,
        calib_level=calib_level,
        frames=frames,
    )
    return _store(
        [row for _, row in pairs],
        no_fp,
        skipped,
        url=url,
        table=table,
        create_table=create_table,
        session_id=s.session_id,
    )
