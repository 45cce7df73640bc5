"""Catalogue enrichment: Gaia DR3 id, SIMBAD identifier/type, SkyBoT solar-system objects, AAVSO VSX
variables, Milliquas quasars, Astro-Colibri transient events.

Every service is optional: a service that is switched off is ``skipped``, one that fails is
``failed`` with the reason (after the client's bounded retries); only its columns stay empty. The
status of each service is in ``catalog.meta["enrichment"]``. Static catalogues (SIMBAD, VSX,
Milliquas) are cached on disk like the reference catalogues; SkyBoT is cached per field and epoch;
Astro-Colibri is never cached (events are time-dependent).

Columns added (empty string / 0 / NaN when there is no match): ``gaia_source_id``,
``gaia_sep_arcsec``, ``simbad_main_id``, ``simbad_otype``, ``sso_name``, ``sso_class``,
``sso_vmag``, ``vsx_name``, ``vsx_type``, ``milliquas_name``, ``milliquas_z``.

The Astro-Colibri user id (API key) is read from the environment variable
``RPP_ASTRO_COLIBRI_UID``, which the DAG task fills from the Airflow connection
``catalogs.colibri_conn_id`` (password field); it never lives in the repository or the YAML.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from rpp_tasks.stages.catalogs import (
    CatalogCache,
    ServiceClient,
    ServiceError,
    ServicesSetup,
    ServiceStatus,
    _adql_cone,
    fetch_reference,
    match_catalogs,
    parse_service_table,
    query_vizier,
)

__all__ = ["ENRICH_SERVICES", "EnrichResult", "enrich_catalog"]

log = logging.getLogger(__name__)

ENRICH_SERVICES = ("gaia", "simbad", "skybot", "vsx", "milliquas", "colibri")


@dataclass(frozen=True)
class EnrichResult:
    statuses: tuple[ServiceStatus, ...]
    counts: dict
    events: tuple = ()

    def to_dict(self) -> dict:
        return {
            "services": {s.service: s.to_dict() for s in self.statuses},
            "counts": dict(self.counts),
            "colibri_events": list(self.events),
        }


def _strcol(tab, *names):
    lower = {c.lower(): c for c in tab.colnames}
    for n in names:
        if n.lower() in lower:
            return np.asarray([str(v).strip() for v in np.asarray(tab[lower[n.lower()]])])
    return np.full(len(tab), "")


def _numcol(tab, *names):
    lower = {c.lower(): c for c in tab.colnames}
    for n in names:
        if n.lower() in lower:
            try:
                return np.asarray(tab[lower[n.lower()]], float)
            except (TypeError, ValueError):
                continue
    return np.full(len(tab), np.nan)


def _radec(tab):
    ra = _numcol(tab, "_RAJ2000", "_RAJ", "ra", "RAJ2000", "RA_ICRS", "RA_d")
    dec = _numcol(tab, "_DECJ2000", "_DEJ", "dec", "DEJ2000", "DE_ICRS", "DEC_d")
    return ra, dec


def _cached_query(name, setup, cache, ra0, dec0, r, fetch, *, tag=None, cacheable=True):
    """Return (table | None, ServiceStatus)."""
    t0 = time.perf_counter()
    if cacheable:
        tab = cache.get(name, ra0, dec0, r, tag=tag)
        if tab is not None:
            return tab, ServiceStatus(
                name, "cached", tab.meta.get("cache_file"), len(tab), 0, time.perf_counter() - t0
            )
    try:
        tab, n = fetch()
    except ServiceError as exc:
        log.log(
            logging.INFO if getattr(exc, "circuit_open", False) else logging.WARNING,
            "enrichment %s failed (%s: %s)",
            name,
            exc.kind,
            exc,
        )
        return None, ServiceStatus(
            name,
            "failed",
            f"{exc.kind}: {exc}",
            0,
            getattr(exc, "attempts", 1),
            time.perf_counter() - t0,
        )
    if cacheable:
        cache.put(name, ra0, dec0, r, tab, tag=tag)
    return tab, ServiceStatus(name, "ok", None, len(tab), n, time.perf_counter() - t0)


def _scrub(value, secret):
    """``value`` with ``secret`` (the Astro-Colibri key) masked, so it never reaches metadata or
    logs."""
    if secret and isinstance(value, str) and secret in value:
        return value.replace(secret, "***")
    return value


def _mjd_to_jd(mjd):
    return mjd + 2400000.5


def enrich_catalog(
    cat,
    *,
    center_ra_deg: float,
    center_dec_deg: float,
    radius_deg: float,
    mjd: float | None,
    setup: ServicesSetup,
    services=ENRICH_SERVICES,
    match_radius_arcsec: float = 3.0,
    sso_radius_arcsec: float = 10.0,
    offline: bool = False,
) -> tuple:
    """
    Add cross-identifications to a catalogue with ``ra``/``dec``.

    Parameters
    ----------
    cat : astropy.table.Table
        Catalogue with ``ra``, ``dec`` (NaN rows are left unmatched).
    center_ra_deg, center_dec_deg, radius_deg : float
        Field cone queried from each service.
    mjd : float, optional
        Mid-exposure MJD (SkyBoT epoch, Astro-Colibri time window); SkyBoT is skipped without it.
    setup : ServicesSetup
        Addresses, client and cache; ``setup.enabled`` lists the switched-on services (``gaia`` is
        always tried: it is the reference catalogue).
    services : sequence of str
        Services to consider (default all).

    Returns
    -------
    (Table, EnrichResult)
    """
    out = cat.copy(copy_data=False)
    n = len(out)
    ra = np.asarray(out["ra"], float) if "ra" in out.colnames else np.full(n, np.nan)
    dec = np.asarray(out["dec"], float) if "dec" in out.colnames else np.full(n, np.nan)
    cols = {
        "gaia_source_id": np.zeros(n, np.int64),
        "gaia_sep_arcsec": np.full(n, np.nan),
        "simbad_main_id": np.full(n, "", dtype=object),
        "simbad_otype": np.full(n, "", dtype=object),
        "sso_name": np.full(n, "", dtype=object),
        "sso_class": np.full(n, "", dtype=object),
        "sso_vmag": np.full(n, np.nan),
        "vsx_name": np.full(n, "", dtype=object),
        "vsx_type": np.full(n, "", dtype=object),
        "milliquas_name": np.full(n, "", dtype=object),
        "milliquas_z": np.full(n, np.nan),
    }
    statuses: list[ServiceStatus] = []
    counts: dict = {}
    events: list = []
    cache = CatalogCache(setup.cache_dir)
    client = setup.client or ServiceClient()
    urls = setup.urls
    enabled = set(setup.enabled) | {"gaia"}
    have_pos = bool(np.isfinite(ra).any())

    def want(name):
        if name not in services or name not in enabled:
            statuses.append(ServiceStatus(name, "skipped", "not enabled in catalogs.enrichment"))
            return False
        if not have_pos:
            statuses.append(ServiceStatus(name, "skipped", "no RA/Dec (no valid WCS)"))
            return False
        if offline and name == "colibri":
            statuses.append(ServiceStatus(name, "skipped", "offline"))
            return False
        return True

    def match(tab, radius):
        tra, tdec = _radec(tab)
        return match_catalogs(ra, dec, tra, tdec, radius_arcsec=radius)

    # --- Gaia source id (from the reference catalogue, normally cached by the astrometry stage)
    if want("gaia"):
        ref = fetch_reference(
            center_ra_deg,
            center_dec_deg,
            radius_deg,
            catalog="gaia",
            band="G",
            setup=setup,
            offline=offline,
        )
        st = (
            ref.statuses[-1]
            if ref.statuses
            else ServiceStatus("gaia", "failed", "no service configured")
        )
        statuses.append(
            ServiceStatus(
                "gaia",
                st.status if ref.ok else "failed",
                None if ref.ok else "; ".join(f"{s.service}: {s.reason}" for s in ref.statuses),
                len(ref.table),
                sum(s.attempts for s in ref.statuses),
                sum(s.wall_s for s in ref.statuses),
            )
        )
        if ref.ok:
            idx, sep = match_catalogs(
                ra, dec, ref.table["ra"], ref.table["dec"], radius_arcsec=match_radius_arcsec
            )
            hit = idx >= 0
            cols["gaia_source_id"][hit] = np.asarray(ref.table["gaia_source_id"], np.int64)[
                idx[hit]
            ]
            cols["gaia_sep_arcsec"] = sep
            counts["gaia"] = int(hit.sum())

    # --- SIMBAD
    if want("simbad"):

        def q_simbad():
            q = (
                f"SELECT TOP 20000 main_id, ra, dec, otype FROM basic WHERE "
                f"{_adql_cone('ra', 'dec', center_ra_deg, center_dec_deg, radius_deg)}"
            )
            content, k = client.request(
                urls["simbad"].rstrip("/") + "/sync",
                data={"REQUEST": "doQuery", "LANG": "ADQL", "FORMAT": "votable", "QUERY": q},
            )
            return parse_service_table(content), k

        tab, st = _cached_query(
            "simbad", setup, cache, center_ra_deg, center_dec_deg, radius_deg, q_simbad
        )
        statuses.append(st)
        if tab is not None and len(tab):
            idx, _ = match(tab, match_radius_arcsec)
            hit = idx >= 0
            cols["simbad_main_id"][hit] = _strcol(tab, "main_id", "MAIN_ID")[idx[hit]]
            cols["simbad_otype"][hit] = _strcol(tab, "otype", "OTYPE", "otype_txt")[idx[hit]]
            counts["simbad"] = int(hit.sum())

    # --- SkyBoT (solar-system objects at the frame's epoch)
    if want("skybot"):
        if mjd is None or not np.isfinite(mjd):
            statuses.append(ServiceStatus("skybot", "skipped", "no observation epoch"))
        else:
            jd = _mjd_to_jd(mjd)

            def q_skybot():
                params = {
                    "-ep": f"{jd:.6f}",
                    "-ra": f"{center_ra_deg:.6f}",
                    "-dec": f"{center_dec_deg:.6f}",
                    "-rd": f"{radius_deg:.5f}",
                    "-mime": "votable",
                    "-output": "object",
                    "-loc": "500",
                    "-filter": "0",
                    "-objFilter": "111",
                    "-from": "rpp",
                }
                content, k = client.request(urls["skybot"], params=params)
                return parse_service_table(content), k

            tab, st = _cached_query(
                "skybot",
                setup,
                cache,
                center_ra_deg,
                center_dec_deg,
                radius_deg,
                q_skybot,
                tag=f"jd{jd:.4f}",
            )
            statuses.append(st)
            if tab is not None and len(tab):
                idx, _ = match(tab, sso_radius_arcsec)
                hit = idx >= 0
                cols["sso_name"][hit] = _strcol(tab, "Name")[idx[hit]]
                cols["sso_class"][hit] = _strcol(tab, "Class")[idx[hit]]
                cols["sso_vmag"][hit] = _numcol(tab, "Mv", "V")[idx[hit]]
                counts["skybot"] = int(hit.sum())
                counts["skybot_in_field"] = len(tab)

    # --- VizieR catalogues: AAVSO VSX and Milliquas
    for name, source, id_cols, extra_col, out_id, out_extra in (
        ("vsx", "B/vsx/vsx", ("Name",), ("Type",), "vsx_name", "vsx_type"),
        ("milliquas", "VII/294/catalog", ("Name",), ("z",), "milliquas_name", "milliquas_z"),
    ):
        if not want(name):
            continue

        def q_viz(source=source, id_cols=id_cols, extra_col=extra_col):
            return query_vizier(
                client,
                urls["vizier"],
                source,
                center_ra_deg,
                center_dec_deg,
                radius_deg,
                columns=("_RAJ", "_DEJ") + id_cols + extra_col,
                max_rows=setup.max_rows,
                extra={"-out.add": "_RAJ,_DEJ"},
            )

        tab, st = _cached_query(
            name, setup, cache, center_ra_deg, center_dec_deg, radius_deg, q_viz
        )
        statuses.append(st)
        if tab is not None and len(tab):
            idx, _ = match(tab, match_radius_arcsec)
            hit = idx >= 0
            cols[out_id][hit] = _strcol(tab, *id_cols)[idx[hit]]
            if out_extra.endswith("_z"):
                cols[out_extra][hit] = _numcol(tab, *extra_col)[idx[hit]]
            else:
                cols[out_extra][hit] = _strcol(tab, *extra_col)[idx[hit]]
            counts[name] = int(hit.sum())

    # --- Astro-Colibri (events in the field around the epoch)
    if want("colibri"):
        if not setup.colibri_uid:
            statuses.append(
                ServiceStatus(
                    "colibri", "skipped", "no API key (Airflow connection or RPP_ASTRO_COLIBRI_UID)"
                )
            )
        elif mjd is None or not np.isfinite(mjd):
            statuses.append(ServiceStatus("colibri", "skipped", "no observation epoch"))
        else:
            from astropy.time import Time

            t0 = time.perf_counter()
            tmin = Time(mjd - 3.0, format="mjd").isot
            tmax = Time(mjd + 0.5, format="mjd").isot
            body = {
                "uid": setup.colibri_uid,
                "filter": None,
                "time_range": {"max": tmax, "min": tmin},
                "properties": {
                    "type": "cone",
                    "position": {"ra": center_ra_deg, "dec": center_dec_deg},
                    "radius": radius_deg,
                },
            }
            try:
                import json

                content, k = client.request(
                    urls["colibri"].rstrip("/") + "/cone_search", json_body=body
                )
                doc = json.loads(content)
                evs = doc.get("voevents", []) if isinstance(doc, dict) else []
                for e in evs[:50]:
                    if isinstance(e, dict):
                        events.append(
                            {
                                kk: _scrub(e.get(kk), setup.colibri_uid)
                                for kk in (
                                    "trigger_id",
                                    "source_name",
                                    "type",
                                    "time",
                                    "ra",
                                    "dec",
                                    "err",
                                )
                            }
                        )
                statuses.append(
                    ServiceStatus("colibri", "ok", None, len(evs), k, time.perf_counter() - t0)
                )
                counts["colibri_events"] = len(evs)
            except ServiceError as exc:  # an error page may echo the request: never keep the key
                statuses.append(
                    ServiceStatus(
                        "colibri",
                        "failed",
                        _scrub(f"{exc.kind}: {exc}", setup.colibri_uid),
                        0,
                        getattr(exc, "attempts", 1),
                        time.perf_counter() - t0,
                    )
                )
            except (ValueError, AttributeError) as exc:
                statuses.append(
                    ServiceStatus(
                        "colibri",
                        "failed",
                        _scrub(f"malformed: {exc}", setup.colibri_uid)[:200],
                        0,
                        1,
                        time.perf_counter() - t0,
                    )
                )

    for k, v in cols.items():
        out[k] = v.astype(str) if v.dtype == object else v
    res = EnrichResult(tuple(statuses), counts, tuple(events))
    out.meta["enrichment"] = res.to_dict()["services"]
    if events:
        out.meta["colibri_events"] = list(events)
    return out, res
