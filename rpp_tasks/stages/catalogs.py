"""Reference catalogues behind one adapter: Gaia DR3 (TAP, VizieR), Pan-STARRS DR1/DR2, SkyMapper
DR4.

Design
------
* **One normalised table** whatever the service: ``ra``, ``dec`` (deg, ICRS), ``ref_id`` (str),
  ``gaia_source_id`` (int, 0 when not Gaia), ``mag_<band>`` / ``mag_err_<band>`` for each band the
  service gives (Gaia ``G``, ``BP``, ``RP``; PS1 ``g r i z y``; SkyMapper ``g r i z``). Bands a
  catalogue does not have are derived from Gaia by `gaia_transform` (Johnson-Cousins ``B V R I``,
  Sloan ``g r i``; Riello et al. 2021 polynomials, ~0.03-0.07 mag scatter; ``B`` approximate).
* **Fallback chain.** `fetch_reference` tries the band's catalogue (PS1/SkyMapper only inside their
  sky coverage), then the Gaia services in the configured order (``gaia_tap`` ->
  ``gaia_vizier``), and transforms Gaia when the band is not native. Every attempt is recorded
  as a `ServiceStatus`.
* **Timeouts, bounded retries with exponential backoff** (timeouts, connection refused, HTTP 5xx);
  no retry for HTTP 4xx, malformed replies or name-resolution failure (offline machine); a
  per-process circuit breaker stops asking a host that just failed, so an offline night costs
  milliseconds per frame, not timeouts.
* **On-disk cache** ``<cache_dir>/<catalog>/<ra>_<dec>_<radius>.ecsv``: a request is served from any
  cached cone of the same catalogue that contains it, so a re-run or a neighbouring session with an
  overlapping pointing needs no network.

Rooms: the HTTP client (timeouts, retries, circuit breaker) is `rpp_tasks.stages.services`;
parsing replies, the normalised columns and the Gaia transformations are
`rpp_tasks.stages.reftables`; positional matching is `rpp_tasks.stages.crossmatch`. This module
holds the cache, the per-service queries and the fallback chain, and re-exports the names callers
use with it.

Every service address is configurable (``catalogs.services`` in the observatory YAML); the tests
point them at loopback servers that answer in the services' real formats.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rpp_tasks.stages.crossmatch import angular_sep_deg, match_catalogs
from rpp_tasks.stages.reftables import (
    GAIA_DERIVED,
    NATIVE_BANDS,
    gaia_transform,
    normalize_reference,
    parse_service_table,
)
from rpp_tasks.stages.services import (
    ServiceClient,
    ServiceError,
    ServiceStatus,
    reset_circuit_breaker,
)

__all__ = [
    "DEFAULT_SERVICES",
    "ServiceStatus",
    "ReferenceResult",
    "ServiceError",
    "ServiceClient",
    "parse_service_table",
    "normalize_reference",
    "gaia_transform",
    "fetch_reference",
    "CatalogCache",
    "angular_sep_deg",
    "match_catalogs",
    "client_from_config",
    "reset_circuit_breaker",
]

log = logging.getLogger(__name__)

#: Default service addresses (every one can be overridden in ``catalogs.services``).
DEFAULT_SERVICES = {
    "gaia_tap": "https://gea.esac.esa.int/tap-server/tap",
    "gaia_vizier": "https://vizier.cds.unistra.fr/viz-bin/votable",
    "vizier": "https://vizier.cds.unistra.fr/viz-bin/votable",
    "ps1": "https://catalogs.mast.stsci.edu/api/v0.1/panstarrs",
    "skymapper": "https://api.skymapper.nci.org.au/public/tap",
    "simbad": "https://simbad.cds.unistra.fr/simbad/sim-tap",
    "sesame": "https://cds.unistra.fr/cgi-bin/nph-sesame",
    "skybot": "https://ssp.imcce.fr/webservices/skybot/api/conesearch.php",
    "colibri": "https://astro-colibri.science",
}

_GAIA_SERVICES = ("gaia_tap", "gaia_vizier")


# =============================================================================== results


@dataclass(frozen=True)
class ReferenceResult:
    """A normalised reference table and how it was obtained.

    ``table`` is empty (but has ``ra``, ``dec``, ``ref_id``) with flag ``"no_reference"`` when every
    service failed; ``catalog`` names the catalogue actually used (``gaia``, ``ps1``,
    ``skymapper``), ``band``/``ref_band`` the requested band and the column used
    (``mag_<ref_band>``), ``transformed`` whether the band was derived from Gaia.
    """

    table: object
    catalog: str | None
    band: str | None
    source: str | None  # "cache" | "network" | None
    transformed: bool = False
    statuses: tuple[ServiceStatus, ...] = ()
    flags: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.catalog is not None and len(self.table) > 0

    def to_dict(self) -> dict:
        return {
            "catalog": self.catalog,
            "band": self.band,
            "source": self.source,
            "transformed": self.transformed,
            "n_rows": len(self.table),
            "services": [s.to_dict() for s in self.statuses],
            "flags": list(self.flags),
        }


# =============================================================================== cache
class CatalogCache:
    """Cones of one catalogue/service on disk: ``<root>/<name>/<ra>_<dec>_<radius>[_<tag>].ecsv``.

    `get` returns the rows inside the requested cone from any cached cone (same name and tag) that
    contains it; `put` writes atomically.
    """

    _NAME = re.compile(
        r"^(?P<ra>-?\d+\.\d+)_(?P<dec>[-+]\d+\.\d+)_(?P<r>\d+\.\d+)(?:_(?P<tag>[\w.-]+))?\.ecsv$"
    )

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root else None

    def get(
        self, name: str, ra_deg: float, dec_deg: float, radius_deg: float, *, tag: str | None = None
    ):
        if self.root is None or not (self.root / name).is_dir():
            return None
        from astropy.table import Table

        best = None
        for p in (self.root / name).iterdir():
            m = self._NAME.match(p.name)
            if not m or (m.group("tag") or None) != (tag or None):
                continue
            rc = float(m.group("r"))
            sep = float(
                angular_sep_deg(ra_deg, dec_deg, float(m.group("ra")), float(m.group("dec")))
            )
            if sep + radius_deg <= rc + 2e-5 and (
                best is None or rc < best[0]
            ):  # 2e-5 deg: name rounding
                best = (rc, p)
        if best is None:
            return None
        try:
            tab = Table.read(best[1], format="ascii.ecsv")
        except Exception as exc:  # a corrupt cache file is ignored (and re-fetched)
            log.warning("catalog cache: unreadable %s (%s), ignored", best[1], exc)
            return None
        if len(tab) and "ra" in tab.colnames:
            keep = angular_sep_deg(ra_deg, dec_deg, tab["ra"], tab["dec"]) <= radius_deg
            tab = tab[keep]
        tab.meta["cache_file"] = str(best[1])
        return tab

    def put(
        self,
        name: str,
        ra_deg: float,
        dec_deg: float,
        radius_deg: float,
        table,
        *,
        tag: str | None = None,
    ) -> Path | None:
        if self.root is None:
            return None
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        suffix = "_" + re.sub(r"[^\w.-]", "-", tag) if tag else ""
        path = d / f"{ra_deg % 360:.6f}_{dec_deg:+.6f}_{radius_deg:.6f}{suffix}.ecsv"
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        out = table.copy(copy_data=False)
        out.meta = {k: v for k, v in table.meta.items() if isinstance(v, (str, int, float, bool))}
        out.write(tmp, format="ascii.ecsv", overwrite=True)
        os.replace(tmp, path)
        return path


# =============================================================================== queries
def _adql_cone(ra_col, dec_col, ra, dec, r):
    return f"1=CONTAINS(POINT('ICRS',{ra_col},{dec_col}),CIRCLE('ICRS',{ra:.7f},{dec:.7f},{r:.6f}))"


def query_gaia_tap(
    client: ServiceClient,
    url: str,
    ra_deg,
    dec_deg,
    radius_deg,
    *,
    max_rows=5000,
    mag_limit=20.0,
    fmt="json",
):
    """Gaia DR3 cone from the ESA archive TAP sync endpoint (``<url>/sync``), brightest first."""
    cone = _adql_cone("ra", "dec", ra_deg, dec_deg, radius_deg)
    q = (
        f"SELECT TOP {int(max_rows)} source_id, ra, dec, pmra, pmdec, phot_g_mean_mag, "
        "phot_bp_mean_mag, phot_rp_mean_mag, phot_g_mean_flux_over_error, "
        "phot_bp_mean_flux_over_error, phot_rp_mean_flux_over_error "
        f"FROM gaiadr3.gaia_source WHERE {cone}"
        f" AND phot_g_mean_mag < {mag_limit:.2f} ORDER BY phot_g_mean_mag"
    )
    content, n = client.request(
        url.rstrip("/") + "/sync",
        data={"REQUEST": "doQuery", "LANG": "ADQL", "FORMAT": fmt, "QUERY": q},
    )
    return parse_service_table(content), n


def query_vizier(
    client: ServiceClient,
    url: str,
    source: str,
    ra_deg,
    dec_deg,
    radius_deg,
    *,
    columns=("**",),
    max_rows=5000,
    extra: dict | None = None,
):
    """VizieR ASU cone search (VOTable): ``-source``, ``-c``, ``-c.rd``, ``-out``, ``-out.max``."""
    params = {
        "-source": source,
        "-c": f"{ra_deg:.7f} {dec_deg:+.7f}",
        "-c.rd": f"{radius_deg:.6f}",
        "-out": ",".join(columns),
        "-out.max": str(int(max_rows)),
        "-out.add": "_r",
        "-sort": "_r",
    }
    params.update(extra or {})
    content, n = client.request(url, params=params)
    return parse_service_table(content), n


def query_ps1(
    client: ServiceClient, url: str, ra_deg, dec_deg, radius_deg, *, release="dr2", max_rows=5000
):
    """Pan-STARRS mean-object cone from the MAST Catalogs API (``<url>/<release>/mean.json``)."""
    cols = ["objID", "raMean", "decMean", "nDetections"] + [
        f"{b}MeanPSFMag{e}" for b in "grizy" for e in ("", "Err")
    ]
    params = {
        "ra": f"{ra_deg:.7f}",
        "dec": f"{dec_deg:.7f}",
        "radius": f"{radius_deg:.6f}",
        "columns": "[" + ",".join(cols) + "]",
        "nDetections.gte": "2",
        "pagesize": str(int(max_rows)),
    }
    content, n = client.request(f"{url.rstrip('/')}/{release}/mean.json", params=params)
    return parse_service_table(content), n


def query_skymapper(client: ServiceClient, url: str, ra_deg, dec_deg, radius_deg, *, max_rows=5000):
    """SkyMapper DR4 ``dr4.master`` cone from its TAP sync endpoint."""
    cols = "object_id, raj2000, dej2000, " + ", ".join(f"{b}_psf, e_{b}_psf" for b in "griz")
    q = (
        f"SELECT TOP {int(max_rows)} {cols} FROM dr4.master WHERE "
        f"{_adql_cone('raj2000', 'dej2000', ra_deg, dec_deg, radius_deg)}"
    )
    content, n = client.request(
        url.rstrip("/") + "/sync",
        data={"REQUEST": "doQuery", "LANG": "ADQL", "FORMAT": "votable", "QUERY": q},
    )
    return parse_service_table(content), n


def _in_coverage(catalog: str, dec_deg: float) -> bool:
    if catalog == "ps1":
        return dec_deg >= -30.0
    if catalog == "skymapper":
        return dec_deg <= 2.0
    return True


@dataclass(frozen=True)
class ServicesSetup:
    """Everything `fetch_reference` and `rpp_tasks.stages.enrich` need to reach services (no config
    object)."""

    urls: dict = field(default_factory=lambda: dict(DEFAULT_SERVICES))
    client: ServiceClient | None = None
    cache_dir: str | None = None
    gaia_order: tuple[str, ...] = ("local",) + _GAIA_SERVICES
    local_paths: tuple[str, ...] = ()  # local reference catalogues (files or folders)
    max_rows: int = 5000
    mag_limit: float = 20.0
    ps1_release: str = "dr2"
    gaia_tap_format: str = "json"
    enabled: tuple[str, ...] = ()  # enrichment services switched on
    colibri_uid: str | None = field(default=None, repr=False)  # a secret: never in repr/logs


def client_from_config(cfg) -> ServicesSetup:
    """`ServicesSetup` from a ``CatalogsConfig`` (``obs.catalogs``)."""
    urls = dict(DEFAULT_SERVICES)
    urls.update(cfg.services or {})
    cache = cfg.cache_dir
    if cache and not os.path.isabs(os.path.expanduser(os.path.expandvars(cache))):
        from rpp_tasks.config import REPO_ROOT

        cache = str(Path(os.environ.get("RPP_DATA_ROOT", REPO_ROOT)) / cache)
    return ServicesSetup(
        local_paths=tuple(_data_path(p) for p in getattr(cfg, "local", ()) or ()),
        urls=urls,
        client=ServiceClient(
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            backoff_s=cfg.backoff_s,
            breaker_s=cfg.breaker_s,
        ),
        cache_dir=cache,
        gaia_order=tuple(cfg.gaia_order),
        max_rows=cfg.max_rows,
        mag_limit=cfg.mag_limit,
        ps1_release=cfg.ps1_release,
        enabled=tuple(cfg.enrichment),
        colibri_uid=os.environ.get("RPP_ASTRO_COLIBRI_UID"),
    )


def _data_path(path: str) -> str:
    """``path`` with ``~``/``$VARS`` expanded; relative paths are under ``RPP_DATA_ROOT`` (else
    the repository)."""
    p = os.path.expanduser(os.path.expandvars(path))
    if os.path.isabs(p):
        return p
    from rpp_tasks.config import REPO_ROOT

    return str(Path(os.environ.get("RPP_DATA_ROOT", REPO_ROOT)) / p)


def _fetch_one(service: str, setup: ServicesSetup, ra, dec, r):
    client = setup.client or ServiceClient()
    url = setup.urls.get(service)
    if not url:
        raise ServiceError("unreachable", f"no address configured for {service}")
    if service == "gaia_tap":
        tab, n = query_gaia_tap(
            client,
            url,
            ra,
            dec,
            r,
            max_rows=setup.max_rows,
            mag_limit=setup.mag_limit,
            fmt=setup.gaia_tap_format,
        )
        return normalize_reference(tab, "gaia"), n
    if service == "gaia_vizier":
        cols = (
            "Source",
            "RA_ICRS",
            "DE_ICRS",
            "pmRA",
            "pmDE",
            "Gmag",
            "e_Gmag",
            "BPmag",
            "e_BPmag",
            "RPmag",
            "e_RPmag",
        )
        tab, n = query_vizier(
            client,
            url,
            "I/355/gaiadr3",
            ra,
            dec,
            r,
            columns=cols,
            max_rows=setup.max_rows,
            extra={"Gmag": f"<{setup.mag_limit:.2f}"},
        )
        return normalize_reference(tab, "gaia"), n
    if service == "ps1":
        tab, n = query_ps1(
            client, url, ra, dec, r, release=setup.ps1_release, max_rows=setup.max_rows
        )
        return normalize_reference(tab, "ps1"), n
    if service == "skymapper":
        tab, n = query_skymapper(client, url, ra, dec, r, max_rows=setup.max_rows)
        return normalize_reference(tab, "skymapper"), n
    raise ValueError(f"unknown reference service {service!r}")


_CATALOG_OF = {"gaia_tap": "gaia", "gaia_vizier": "gaia", "ps1": "ps1", "skymapper": "skymapper"}


def fetch_reference(
    ra_deg: float,
    dec_deg: float,
    radius_deg: float,
    *,
    catalog: str = "gaia",
    band: str = "G",
    setup: ServicesSetup | None = None,
    offline: bool = False,
) -> ReferenceResult:
    """
    Reference stars in a cone for photometric and astrometric calibration, with fallbacks and cache.

    Parameters
    ----------
    ra_deg, dec_deg, radius_deg : float
        Cone (ICRS degrees).
    catalog : {"gaia", "ps1", "skymapper"}
        Preferred catalogue for ``band``. PS1/SkyMapper are tried only inside their coverage; then
        the Gaia services in ``setup.gaia_order``; bands Gaia lacks are derived by `gaia_transform`.
    band : str
        Reference band (column ``mag_<band>`` of the result).
    setup : ServicesSetup, optional
        Addresses, HTTP client (timeouts, retries), cache folder and local catalogues.
    offline : bool
        Use the cache and the local catalogues only.

    Returns
    -------
    ReferenceResult
        With the per-service statuses; an empty table and flag ``"no_reference"`` when nothing
        answered.

    Notes
    -----
    ``"local"`` in ``setup.gaia_order`` is the local reference catalogue
    (`rpp_tasks.stages.localcat`, files in ``setup.local_paths``; no status at all when none is
    configured). It answers like
    the online Gaia (``source="local"``) when its files cover the whole cone; a missing or
    unreadable file, or a cone it does not cover, is recorded (``failed``/``partial``) and the next
    service is asked. For a PS1/SkyMapper band, a local catalogue that has the band natively
    (ATLAS-RefCat2 ``g r i z``) is asked first when ``local`` leads the order; otherwise it stands
    at its place among the Gaia services. A partial local answer is used only when no other service
    answered (status ``partial``: the transients stage then calls nothing a transient).
    """
    if not (np.isfinite(ra_deg) and np.isfinite(dec_deg)) or not radius_deg > 0:
        raise ValueError(f"invalid cone ra={ra_deg} dec={dec_deg} radius={radius_deg}")
    if catalog not in NATIVE_BANDS:
        raise ValueError(f"unknown catalogue {catalog!r}; expected one of {sorted(NATIVE_BANDS)}")
    setup = setup or ServicesSetup()
    cache = CatalogCache(setup.cache_dir)
    order = [s for s in setup.gaia_order if s in _GAIA_SERVICES or s == "local"]
    if not setup.local_paths:
        order = [s for s in order if s != "local"]
    chain: list[str] = []
    if catalog in ("ps1", "skymapper"):
        if order[:1] == ["local"]:
            chain.append("local_native")
        chain.append(catalog)
    chain += order
    statuses: list[ServiceStatus] = []
    local = _LocalLookup(setup, ra_deg, dec_deg, radius_deg)
    for service in chain:
        if service in ("local", "local_native"):
            res = local.answer(band, native_only=service == "local_native", statuses=statuses)
            if res is not None:
                return res
            continue
        cat = _CATALOG_OF[service]
        if cat != "gaia" and not _in_coverage(cat, dec_deg):
            statuses.append(
                ServiceStatus(service, "skipped", f"Dec {dec_deg:+.1f} outside {cat} coverage")
            )
            continue
        if cat != "gaia" and band not in NATIVE_BANDS[cat]:
            statuses.append(ServiceStatus(service, "skipped", f"{cat} has no band {band}"))
            continue
        t0 = time.perf_counter()
        tab = cache.get(cat, ra_deg, dec_deg, radius_deg)
        if tab is not None:
            statuses.append(
                ServiceStatus(
                    service,
                    "cached",
                    tab.meta.get("cache_file"),
                    len(tab),
                    0,
                    time.perf_counter() - t0,
                )
            )
            res = _finish(tab, cat, band, "cache", statuses)
            if res is not None:
                return res
            continue
        if offline:
            statuses.append(ServiceStatus(service, "skipped", "offline and not in the cache"))
            continue
        try:
            tab, n = _fetch_one(service, setup, ra_deg, dec_deg, radius_deg)
        except ServiceError as exc:
            statuses.append(
                ServiceStatus(
                    service,
                    "failed",
                    f"{exc.kind}: {exc}",
                    0,
                    getattr(exc, "attempts", 1),
                    time.perf_counter() - t0,
                )
            )
            log.log(
                logging.INFO if exc.circuit_open else logging.WARNING,
                "reference %s failed (%s: %s); trying the next service",
                service,
                exc.kind,
                exc,
            )
            continue
        if len(tab):
            tab = tab[angular_sep_deg(ra_deg, dec_deg, tab["ra"], tab["dec"]) <= radius_deg]
        if len(tab) == 0:
            statuses.append(
                ServiceStatus(
                    service,
                    "empty",
                    "no rows in the cone (no coverage?)",
                    0,
                    n,
                    time.perf_counter() - t0,
                )
            )
            continue
        cache.put(cat, ra_deg, dec_deg, radius_deg, tab)
        statuses.append(ServiceStatus(service, "ok", None, len(tab), n, time.perf_counter() - t0))
        res = _finish(tab, cat, band, "network", statuses)
        if res is not None:
            return res
    partial = local.partial_result(band, statuses)
    if partial is not None:
        return partial
    from astropy.table import Table

    empty = Table(
        {
            "ra": np.zeros(0),
            "dec": np.zeros(0),
            "ref_id": np.zeros(0, dtype="<U1"),
            "gaia_source_id": np.zeros(0, np.int64),
        }
    )
    return ReferenceResult(empty, None, band, None, False, tuple(statuses), ("no_reference",))


def _finish(tab, cat, band, source, statuses):
    transformed = False
    if f"mag_{band}" not in tab.colnames:
        if cat == "gaia" and band in GAIA_DERIVED:
            tab = gaia_transform(tab)
            transformed = True
        else:
            statuses.append(ServiceStatus(cat, "skipped", f"band {band} not available from {cat}"))
            return None
    return ReferenceResult(tab, cat, band, source, transformed, tuple(statuses))


#: (status, reason) of the failures of the local catalogue already warned about (see _LocalLookup)
_LOCAL_WARNED: set[tuple[str, str]] = set()


class _LocalLookup:
    """The local catalogue's answer for one cone: read once, used at its place(s) in the chain."""

    def __init__(self, setup: ServicesSetup, ra, dec, r):
        self.setup, self.cone = setup, (ra, dec, r)
        self._ans = None
        self._wall = 0.0
        self._reported = False

    def _get(self):
        if self._ans is None:
            from rpp_tasks.stages import localcat

            t0 = time.perf_counter()
            self._ans = localcat.query_local(
                self.setup.local_paths,
                *self.cone,
                mag_limit=self.setup.mag_limit,
                max_rows=self.setup.max_rows,
            )
            self._wall = time.perf_counter() - t0
            if self._ans.status in ("failed", "partial"):
                # a missing or broken folder fails the same way for every cone of every frame
                # (3 lookups per frame): warned once per process, then at INFO
                first = (self._ans.status, self._ans.reason) not in _LOCAL_WARNED
                _LOCAL_WARNED.add((self._ans.status, self._ans.reason))
                log.log(
                    logging.WARNING if self._ans.status == "failed" and first else logging.INFO,
                    "local reference catalogue %s: %s",
                    self._ans.status,
                    self._ans.reason,
                )
        return self._ans

    def answer(self, band: str, *, native_only: bool, statuses: list) -> ReferenceResult | None:
        ans = self._get()
        if native_only and (ans.status != "ok" or band not in ans.native_bands):
            return None  # asked again at its place among the Gaia services
        if self._reported:
            return None
        self._reported = True
        n = 0 if ans.table is None else len(ans.table)
        if ans.status != "ok":
            statuses.append(ServiceStatus("local", ans.status, ans.reason, n, 0, self._wall))
            return None
        statuses.append(ServiceStatus("local", "ok", ans.reason, n, 0, self._wall))
        res = _finish(ans.table, "gaia", band, "local", statuses)
        if res is None:
            statuses[-1] = ServiceStatus(
                "local", "skipped", f"band {band} not available from the local catalogue", n
            )
            return None
        return dataclasses.replace(res, catalog=ans.catalog)

    def partial_result(self, band: str, statuses: list) -> ReferenceResult | None:
        ans = self._ans
        if ans is None or ans.status != "partial" or ans.table is None or not len(ans.table):
            return None
        statuses.append(ServiceStatus("local", "partial", ans.reason, len(ans.table)))
        res = _finish(ans.table, "gaia", band, "local", statuses)
        if res is None:
            return None
        return dataclasses.replace(res, catalog=ans.catalog, flags=("partial_reference",))
