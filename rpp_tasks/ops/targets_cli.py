"""``rpp catalog fetch`` and ``rpp lightcurve``: the observer's side of issue 14.

rpp catalog fetch --observatory NAME [--radius DEG] [--target NAME|"RA DEC"]... [--force]
    While online: download the Gaia DR3 cone around each of the observatory's targets (its
    ``targets.objects`` and any ``--target``) into its local reference catalogue folder (the first
    folder of ``catalogs.local``), and the AAVSO VSX variables of the cone into the catalogue cache,
    so that a night without internet still gets a zero point, transients and known variables.

rpp lightcurve NAME | RA DEC [--observatory NAME] [--band B] [--out DIR] [--db URL]
    The target's light curve over every night recorded in the results database: an ECSV file
    (astropy TimeSeries: BJD_TDB and MJD, magnitude and error, differential magnitude, band, frame,
    airmass, flags, upper limits) and a PNG plot.

`add_parsers` registers both on the ``rpp`` command line (one line in `rpp_tasks.ops.cli`).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import sys
from pathlib import Path

__all__ = ["add_parsers", "cmd_catalog_fetch", "cmd_lightcurve"]

log = logging.getLogger("rpp")


def add_parsers(sub) -> None:
    """Add ``catalog`` (``fetch``) and ``lightcurve`` to the ``rpp`` sub-command parsers."""
    p = sub.add_parser("catalog", help="local reference catalogues (rpp catalog fetch --help)")
    csub = p.add_subparsers(dest="catalog_command", required=True)
    f = csub.add_parser(
        "fetch",
        help="download the reference-catalogue cones of an observatory's targets (while online)",
    )
    f.add_argument("--observatory", "-o", required=True, help="name, or a YAML path")
    f.add_argument(
        "--radius",
        type=float,
        default=None,
        help="cone radius in degrees (default catalogs.local_fetch_radius_deg)",
    )
    f.add_argument(
        "--target",
        "-t",
        action="append",
        default=[],
        help='also this target: a name or "RA DEC" (repeatable)',
    )
    f.add_argument("--to", help="folder to store the cones (default: the first catalogs.local)")
    f.add_argument("--max-rows", type=int, default=200_000, help="rows per cone (brightest first)")
    f.add_argument("--force", action="store_true", help="fetch even when already covered locally")
    f.add_argument("--no-vsx", action="store_true", help="do not cache the VSX variables")
    f.set_defaults(func=cmd_catalog_fetch)

    p = sub.add_parser("lightcurve", help="a target's light curve over all nights (ECSV + PNG)")
    p.add_argument("target", nargs="+", help='a target name, or RA DEC ("10:00:24 +02:12:00")')
    p.add_argument("--observatory", "-o", help="only this observatory (and its results database)")
    p.add_argument("--band", "-b", help="only this band")
    p.add_argument("--out", default=".", help="output folder (default: the current folder)")
    p.add_argument(
        "--db",
        help="results database URL (default: RPP_RESULTS_DB_URL, else each observatory's "
        "<work>/rpp_results.sqlite)",
    )
    p.add_argument("--radius-arcsec", type=float, default=2.0, help="position match radius")
    p.add_argument(
        "--plot",
        choices=("auto", "mag", "mag_diff"),
        default="auto",
        help="which magnitude to plot (default: differential when measured)",
    )
    p.set_defaults(func=cmd_lightcurve)


# =============================================================================== catalog fetch
def _local_folder(obs, explicit: str | None) -> Path | None:
    from rpp_tasks.stages.catalogs import _data_path
    from rpp_tasks.stages.localcat import _SUFFIXES

    if explicit:
        return Path(_data_path(explicit))
    for p in obs.catalogs.local:
        path = Path(_data_path(p))
        if path.is_dir() or not path.name.lower().endswith(_SUFFIXES):
            return path
    return None


def cmd_catalog_fetch(args) -> int:
    import dataclasses

    from rpp_tasks.config import find_config
    from rpp_tasks.stages import catalogs, localcat
    from rpp_tasks.stages.target import resolve_target

    obs = find_config(args.observatory)
    folder = _local_folder(obs, args.to)
    if folder is None:
        print(
            f"rpp catalog fetch: {obs.name} has no local catalogue folder: add one to "
            "catalogs.local in its YAML (e.g. data/catalogs/local) or give --to DIR",
            file=sys.stderr,
        )
        return 2
    radius = args.radius or obs.catalogs.local_fetch_radius_deg
    base = catalogs.client_from_config(obs.catalogs)
    # online only: never answer from the local catalogue we are filling
    setup = dataclasses.replace(
        base,
        gaia_order=tuple(s for s in base.gaia_order if s != "local"),
        local_paths=(),
        max_rows=int(args.max_rows),
    )
    queries = [(t.name, "config") for t in obs.targets.objects] + [
        (t, "param") for t in args.target
    ]
    if not queries:
        print(
            f"rpp catalog fetch: {obs.name} has no targets (targets.objects) and no --target given",
            file=sys.stderr,
        )
        return 2
    failures = 0
    print(f"Local reference catalogue: {folder} (cones of {radius:g} deg)")
    for q, who in queries:
        res = resolve_target(q, named_by=who, config_targets=obs.targets.objects, setup=base)
        if not res.ok:
            print(f"  {q}: not resolved: {res.reason}")
            failures += 1
            continue
        t = res.target
        where = f"{t.ra_deg:.5f} {t.dec_deg:+.5f}"
        if not args.force and folder.exists():
            ans = localcat.query_local([folder], t.ra_deg, t.dec_deg, radius)
            if ans.status == "ok":
                print(f"  {t.name} ({where}): already covered by {', '.join(ans.files)}")
                continue
        rr = catalogs.fetch_reference(t.ra_deg, t.dec_deg, radius, band="G", setup=setup)
        if not rr.ok:
            why = "; ".join(f"{s.service}: {s.reason}" for s in rr.statuses)
            print(f"  {t.name} ({where}): FAILED ({why})")
            failures += 1
            continue
        service = next((s.service for s in rr.statuses if s.status in ("ok", "cached")), "")
        path = localcat.write_local_cone(
            folder,
            t.ra_deg,
            t.dec_deg,
            radius,
            rr.table,
            provenance={
                "target": t.name,
                "service": service,
                "source": rr.source or "",
                "mag_limit": float(setup.mag_limit),
                "fetched_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            },
        )
        note = ""
        if len(rr.table) >= setup.max_rows:
            note = f" (truncated at --max-rows {setup.max_rows}: fainter stars missing)"
        print(f"  {t.name} ({where}): {len(rr.table)} stars from {service} -> {path.name}{note}")
        if not args.no_vsx:
            print(f"    VSX: {_cache_vsx(base, t.ra_deg, t.dec_deg, radius)}")
    return 1 if failures else 0


def _cache_vsx(setup, ra, dec, radius) -> str:
    """Put the VSX variables of the cone into the catalogue cache the enrichment stage reads."""
    from rpp_tasks.stages.catalogs import (
        CatalogCache,
        ServiceClient,
        ServiceError,
        query_vizier,
    )

    try:
        tab, _ = query_vizier(
            setup.client or ServiceClient(),
            setup.urls["vizier"],
            "B/vsx/vsx",
            ra,
            dec,
            radius,
            columns=("_RAJ", "_DEJ", "Name", "Type"),
            max_rows=setup.max_rows,
            extra={"-out.add": "_RAJ,_DEJ"},
        )
    except ServiceError as exc:
        return f"not cached ({exc.kind}: {exc})"
    path = CatalogCache(setup.cache_dir).put("vsx", ra, dec, radius, tab)
    return f"{len(tab)} variables cached ({path})" if path else "no cache folder configured"


# =============================================================================== light curve
def _slug(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text.strip()).strip("_") or "target"


def _db_urls(args) -> list[tuple[str, object]]:
    """(url, observatory config or None) of the results databases to read."""
    import os

    from rpp_tasks.config import default_config_dir, find_config, load_observatory_configs
    from rpp_tasks.outputs import db

    if args.db:
        return [(args.db, find_config(args.observatory) if args.observatory else None)]
    env = (os.environ.get(db.RESULTS_URL_ENV) or "").strip()
    if args.observatory:
        obs = find_config(args.observatory)
        return [(env or db.default_results_url(obs.resolve_path("work")), obs)]
    if env:
        return [(env, None)]
    configs, _ = load_observatory_configs(default_config_dir(), strict=False)
    out, seen = [], set()
    for obs in configs:
        url = db.default_results_url(obs.resolve_path("work"))
        if url not in seen and Path(url.split(":///", 1)[1]).is_file():
            seen.add(url)
            out.append((url, obs))
    return out


def cmd_lightcurve(args) -> int:
    import numpy as np

    from rpp_tasks.outputs import db, lightcurve
    from rpp_tasks.stages.target import parse_coordinates

    text = " ".join(args.target)
    coords = parse_coordinates(text)
    query = coords if coords is not None else text
    urls = _db_urls(args)
    if not urls:
        print(
            "rpp lightcurve: no results database found (reduce a night first, or give --db / "
            f"{db.RESULTS_URL_ENV})",
            file=sys.stderr,
        )
        return 2
    curves, errors = [], []
    for url, obs in urls:
        config_targets = obs.targets.objects if obs is not None else ()
        setup = None
        if obs is not None:
            from rpp_tasks.stages.catalogs import client_from_config

            setup = client_from_config(obs.catalogs)
        try:
            with db.ResultsDB(url) as rdb:
                rdb.create_schema()
                curves.append(
                    lightcurve.light_curve(
                        rdb,
                        query,
                        observatory=args.observatory,
                        band=args.band,
                        radius_arcsec=args.radius_arcsec,
                        config_targets=config_targets,
                        setup=setup,
                        online=bool(obs is not None and obs.targets.resolve_online),
                    )
                )
        except LookupError as exc:
            errors.append(str(exc))
    curves = [c for c in curves if len(c.table)] or curves
    if not curves:
        print(f"rpp lightcurve: {'; '.join(errors)}", file=sys.stderr)
        return 2
    lc = curves[0]
    if len(curves) > 1:
        from astropy.table import vstack

        tab = vstack([c.table for c in curves], metadata_conflicts="silent")
        tab.sort("time")
        lc = lightcurve.LightCurve(tab, sum((c.objects for c in curves), ()), lc.query)
    name = lc.name if lc.objects else text
    out = Path(args.out)
    stem = _slug(name) + "_lightcurve"
    ecsv = lightcurve.write_light_curve(lc, out / f"{stem}.ecsv")
    png = lightcurve.plot_light_curve(lc, out / f"{stem}.png", which=args.plot)
    t = lc.table
    info = lc.to_dict()
    print(
        f"{name}: {info['n_points']} points ({info['n_detected']} detections, "
        f"{info['n_upper_limits']} upper limits) over {info['n_nights']} nights, bands "
        f"{', '.join(info['bands']) or '-'}"
    )
    if len(t):
        det = ~np.asarray(t["upper_limit"], bool)
        if det.any():
            last = t[np.flatnonzero(det)[-1]]
            m, e = float(last["mag"]), float(last["mag_err"])
            md, ed = float(last["mag_diff"]), float(last["mag_diff_err"])
            print(
                f"  latest: {last['night_date']} {last['band']} {m:.3f} +- {e:.3f} "
                f"(differential {md:.3f} +- {ed:.3f}), S/N {float(last['snr']):.0f}"
            )
    print(f"ECSV: {ecsv}\nPNG:  {png}")
    return 0 if len(t) else 1
