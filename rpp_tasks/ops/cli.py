"""``rpp`` command line.

rpp reduce PATH --observatory NAME    reduce one frame or a session folder without Airflow
rpp demo                              write a synthetic session for the demo observatory, reduce it
rpp config [NAME]                     validate observatory configurations and print a summary
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from rpp_tasks.exceptions import ConfigError, NothingReduced
from rpp_tasks.ops import targets_cli

log = logging.getLogger("rpp")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if verbose < 2:
        # astropy installs its own Logger class: import it before touching its logger
        import astropy  # noqa: F401

        for noisy in ("astropy", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _frame_limit(f) -> tuple[float, str]:
    """The frame's 5-sigma limit and its kind: ``"c"`` calibrated when it has a zero point, else
    ``"i"`` instrumental (per second, before the zero point: often negative), ``" "`` none."""
    for v, kind in ((f.limiting_mag_cal, "c"), (f.limiting_mag_inst, "i")):
        if v is not None:
            return float(v), kind
    return float("nan"), " "


def _fit_name(name: str, width: int) -> str:
    """``name`` cut to ``width`` characters keeping its start and its end (consecutive subs of a
    night differ in their last characters: cutting the end printed them all under one name)."""
    if len(name) <= width:
        return name
    head = width // 3
    return name[:head] + "\u2026" + name[-(width - head - 1) :]


def _print_spectra(summary, made: dict) -> None:
    """A long-slit session's outcome: one line per target."""
    from rpp_tasks.outputs.spectra_notify import spectrum_line

    print(
        f"\nSession {summary.session_id} ({summary.observatory}): {summary.n_ok}/"
        f"{summary.n_science} target spectra reduced in {summary.wall_s or 0:.1f} s"
    )
    for s in summary.spectra:
        print(f"  {spectrum_line(s)}")
    print(f"\nProducts: {summary.workdir}/spectra")
    for key in ("report", "products_zip"):
        if made.get(key):
            print(f"{'Report' if key == 'report' else 'ZIP':<9} {made[key]}")


def _print_session(summary, made: dict) -> None:
    """The session's outcome as a table (``summary``: a `SessionSummary`)."""
    if summary.instrument_kind == "longslit":
        _print_spectra(summary, made)
        return
    print(
        f"\nSession {summary.session_id} ({summary.observatory}): {summary.n_ok}/"
        f"{summary.n_science} science frames reduced in {summary.wall_s or 0:.1f} s"
    )
    from rpp_tasks.outputs.report_target import target_lines

    for line in target_lines(summary):  # the observer's targets first
        print(f"  target {line}")
    print(
        "%-32s %-9s %7s %7s %7s %8s %8s %6s"  # noqa: UP031 - a table header
        % ("frame", "status", "sources", "FWHM px", 'FWHM "', "bkg ADU", "lim mag", "CPU s")
    )
    nan = float("nan")
    for f in summary.frames:
        lim, kind = _frame_limit(f)
        print(
            f"{_fit_name(f.frame, 32):32s} {f.status:9s} {f.n_sources or 0:7d} "
            f"{f.fwhm_px if f.fwhm_px is not None else nan:7.2f} "
            f"{f.fwhm_arcsec if f.fwhm_arcsec is not None else nan:7.2f} "
            f"{f.background_adu if f.background_adu is not None else nan:8.1f} "
            f"{lim:7.2f}{kind} "
            f"{f.cpu_s_total or 0:6.2f}"
        )
        if not f.ok:
            print(f"    -> {f.failed_stage}: {f.reason}")
    for name, info in (summary.rejected_files or {}).items():
        print(f"    file {name}: {info.get('reason')}")
    print("lim mag: 5-sigma point source; c = calibrated, i = instrumental (no zero point)")
    print(f"\nProducts: {summary.workdir}")
    if made.get("report"):
        print(f"Report:   {made['report']}")
    if made.get("products_zip"):
        print(f"ZIP:      {made['products_zip']}")


def cmd_reduce(args) -> int:
    from rpp_tasks.config import find_config
    from rpp_tasks.session import lifecycle, pipeline

    obs = find_config(args.observatory)
    path = Path(args.path)
    if not path.exists():
        print(f"rpp reduce: {path}: no such file or folder", file=sys.stderr)
        return 2
    work_root = Path(args.work) if args.work else obs.resolve_path("work")
    if path.is_dir():
        summary, made = lifecycle.reduce_session(
            path, obs, work_root=work_root, workers=args.workers, targets=args.target or ()
        )
        _print_session(summary, made)
        try:  # files but no science frame reduced: a failed night, with every file's reason
            lifecycle.require_reduced(summary)
        except NothingReduced as exc:
            print(f"rpp reduce: {exc}", file=sys.stderr)
            return 0 if exc.empty else 1
        return 0
    t0 = time.perf_counter()
    outdir = work_root / "single" / pipeline.frame_stem(path)
    s = pipeline.reduce_frame(path, obs, outdir)
    print(
        f"{s['frame']}: {s['status']}"
        + (
            f" at {s['failed_stage']}: {s['reason']}"
            if s["status"] != "ok"
            else f", {s['n_sources']} sources, FWHM {s['fwhm_px']:.2f} px, "
            f"{s['cpu_s_total']:.2f} CPU-s"
        )
    )
    print(f"Products: {outdir}  ({time.perf_counter() - t0:.1f} s)")
    return 0 if s["status"] == "ok" else 1


def cmd_demo(args) -> int:
    from rpp_tasks.config import find_config
    from rpp_tasks.session import lifecycle
    from rpp_tasks.sim.demo import write_demo_night

    obs = find_config("demo")
    night = args.night
    raw_dir = obs.resolve_path("incoming") / night
    print(f"Writing a synthetic session ({args.frames} science frames + calibrations) to {raw_dir}")
    shutil.rmtree(raw_dir, ignore_errors=True)
    write_demo_night(obs, raw_dir, night=night, n_science=args.frames, seed=args.seed)
    summary, made = lifecycle.reduce_session(raw_dir, obs, workers=args.workers)
    _print_session(summary, made)
    return 0 if summary.n_ok == summary.n_science else 1


def cmd_up(args, rest) -> int:
    from rpp_tasks.ops.up import up_main

    return up_main(rest)


def cmd_watch(args) -> int:
    """Watch every configured observatory's incoming folder (or the named ones), trigger its DAG."""
    import signal
    import threading

    from rpp_tasks.config import default_config_dir, find_config, load_observatory_configs
    from rpp_tasks.ops import watch
    from rpp_tasks.ops.airflow_api import AirflowClient
    from rpp_tasks.ops.readiness import rule_from_config

    if args.observatory:
        configs = [find_config(n) for n in args.observatory]
    else:
        configs, errors = load_observatory_configs(default_config_dir(), strict=False)
        for err in errors.values():
            log.error("skipping an observatory: %s", err)
    trigger = AirflowClient.from_env(args.api_url)
    watchers = []
    rc = 0
    for obs in configs:
        incoming = obs.resolve_path("incoming")
        incoming.mkdir(parents=True, exist_ok=True)
        w = watch.SessionWatcher(
            obs.name,
            incoming,
            obs.dag_id,
            rule_from_config(obs),
            obs.resolve_path("work") / "watch_state.json",
            trigger,
            use_polling=obs.session.use_polling,
            unpause=args.unpause,
        )
        try:
            if args.once:
                rc = max(rc, 0 if w.scan_once() else 1)  # 1: a trigger is still queued
                continue
            w.start()
        except watch.WatcherLocked as exc:
            log.error("%s", exc)
            rc = 3
            continue
        watchers.append(w)
        log.info(
            "watching %s (%s rule, %s) -> DAG %s",
            incoming,
            obs.session.ready_rule,
            "polling" if obs.session.use_polling else "inotify",
            obs.dag_id,
        )
    if args.once or not watchers:
        return rc
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    for w in watchers:
        w.stop()
    return rc


def cmd_config(args) -> int:
    from rpp_tasks.config import default_config_dir, find_config, load_observatory_configs

    if args.name:
        obs = find_config(args.name)
        configs, errors = [obs], {}
    else:
        configs, errors = load_observatory_configs(default_config_dir(), strict=False)
    for c in configs:
        print(
            f"ok     {c.name:16s} dag rpp_{c.name:16s} camera {c.camera.name} "
            f"(gain {c.camera.gain_e_per_adu} e-/ADU, RN {c.camera.read_noise_e} e-)  incoming "
            f"{c.resolve_path('incoming')}"
        )
    for err in errors.values():
        print(f"ERROR  {err}")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rpp", description="Nightly reduction of remote-telescope FITS data."
    )
    parser.add_argument("-v", "--verbose", action="count", default=1)
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reduce", help="reduce one frame or a session folder (no Airflow needed)")
    p.add_argument("path", help="a FITS frame or a folder with a night's frames and calibrations")
    p.add_argument(
        "--observatory", "-o", required=True, help="name in config/observatories, or a YAML path"
    )
    p.add_argument("--work", help="work root (default: the observatory's paths.work)")
    p.add_argument(
        "--workers", type=int, default=None, help="parallel frames (default RPP_WORKERS or 2)"
    )
    p.add_argument(
        "--target",
        action="append",
        metavar="NAME|'RA DEC'",
        help="a target of this run (name or coordinates; repeatable), besides the frames' OBJECT "
        "and the configured targets in the field",
    )
    p.set_defaults(func=cmd_reduce)

    p = sub.add_parser(
        "demo", help="write a synthetic session for the demo observatory and reduce it"
    )
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--night", default="2025-01-15")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "up",
        help="start Airflow standalone + watcher and run the demo night (rpp up --help)",
        add_help=False,
    )
    p.set_defaults(func=cmd_up, passthrough=True)

    p = sub.add_parser(
        "watch", help="watch the observatories' incoming folders and trigger their DAGs"
    )
    p.add_argument(
        "--observatory", "-o", action="append", help="only these (repeatable); default: all"
    )
    p.add_argument(
        "--api-url",
        help="Airflow API (default $RPP_AIRFLOW_API_URL); credentials from "
        "RPP_AIRFLOW_USER / RPP_AIRFLOW_PASSWORD or RPP_AIRFLOW_TOKEN",
    )
    p.add_argument("--once", action="store_true", help="scan twice, trigger what is ready, exit")
    p.add_argument("--unpause", action="store_true", help="unpause a DAG at its first trigger")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("config", help="validate observatory configurations")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_config)
    targets_cli.add_parsers(sub)  # rpp catalog fetch, rpp lightcurve

    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        return args.func(args, rest)
    if rest:
        parser.error("unrecognized arguments: " + " ".join(rest))
    _setup_logging(0 if args.quiet else args.verbose)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"rpp: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
