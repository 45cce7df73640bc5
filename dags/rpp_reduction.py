"""
## RPP reduction: one DAG per observatory

One DAG per `config/observatories/*.yaml` (`rpp_<observatory>`). A run reduces one **session** (a
night's frames of one observatory, with its calibration frames), handed over by the watcher as the
run conf `{"observatory", "session_id", "session_dir"}` (run id `session__<session_id>`), or typed
into the trigger form by hand.

validate -> calibrate -> cosmic_rays -> detect -> astrometry -> photometry -> zero_point -> enrich ->
transients -> products -> (archive, notify)

Each stage task handles every frame of the session with the process pool of
`rpp_tasks.session.pipeline.run_stage` (`RPP_WORKERS`, default 2), so Airflow's per-task cost is paid once
per task and session (twelve tasks), not once per frame. A frame that fails is recorded as rejected and the
others go on. Tasks hand each other only the session work folder (a path) and a small summary dict.
All science lives in `rpp_tasks`; this file only wires tasks.

A broken YAML never hides the other observatories: it becomes a small `rpp_<file stem>` DAG whose
description and only task carry the configuration error (file and key), and
`dags/rpp_config_errors.py` shows the same text as an import error on the DAG list page.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
from pathlib import Path

from airflow.sdk import Param, dag, get_parsing_context, task

from rpp_tasks.config import ObservatoryConfig, load_observatory_config, load_observatory_configs
from rpp_tasks.exceptions import ConfigError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(os.environ.get("RPP_CONFIG_DIR", REPO / "config"))
#: Airflow pool that bounds the CPU-heavy stage tasks (created by the launcher, ``rpp up``).
HEAVY_POOL = os.environ.get("RPP_AIRFLOW_POOL", "rpp_heavy")
START_DATE = _dt.datetime(2025, 1, 1, tzinfo=_dt.UTC)

#: task id -> per-frame stages of rpp_tasks.session.pipeline.run_stage it runs.
STAGE_TASKS = {
    "calibrate": ("calibrate",),
    "cosmic_rays": ("cosmics",),
    "detect": ("background", "detect"),
    "astrometry": ("astrometry",),
    "photometry": ("photometry",),
    "zero_point": ("zero_point",),
    "enrich": ("enrich",),
    "transients": ("transients",),
}
TASK_ORDER = ("validate", *STAGE_TASKS, "products")

DEFAULT_ARGS = {
    "owner": "rpp",
    "retries": 2,
    "retry_delay": _dt.timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,  # 30 s, 60 s, ... (capped below)
    "max_retry_delay": _dt.timedelta(minutes=10),
    "execution_timeout": _dt.timedelta(hours=3),
}


def dag_id_for_stem(stem: str) -> str:
    """DAG id of a config file stem (also for a broken file whose ``observatory`` key is unusable)."""
    return "rpp_" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "unnamed")


# =============================================================================== failure seam
def failure_info(context) -> dict:
    """Plain-dict description of a failed task or run (no Airflow objects: safe to hand to rpp_tasks)."""
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    conf = dict(getattr(dag_run, "conf", None) or {})
    params = context.get("params") or {}
    exc = context.get("exception") or context.get("reason")
    return {
        "dag_id": getattr(ti, "dag_id", None) or getattr(dag_run, "dag_id", None),
        "task_id": getattr(ti, "task_id", None),
        "run_id": getattr(ti, "run_id", None) or getattr(dag_run, "run_id", None),
        "try_number": getattr(ti, "try_number", None),
        "max_tries": getattr(ti, "max_tries", None),
        "observatory": conf.get("observatory") or params.get("observatory"),
        "session_id": conf.get("session_id") or params.get("session_id"),
        "session_dir": conf.get("session_dir") or params.get("session_dir"),
        "error": f"{type(exc).__name__}: {exc}"
        if isinstance(exc, BaseException)
        else (str(exc) if exc else None),
        "log_url": getattr(ti, "log_url", None),
        "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def record_failure(info: dict, obs: ObservatoryConfig | None) -> Path | None:
    """Log a failure, append it to ``<paths.work>/failures.jsonl`` and hand it to the notifier.

    The notification seam: when ``rpp_tasks.outputs.notify`` defines ``notify_failure(info, obs)`` it is
    called with the plain dict of `failure_info` (it must not raise; errors are logged here).
    """
    log.error("RPP failure: %s", json.dumps(info, default=str))
    path = None
    if obs is not None:
        try:
            path = obs.resolve_path("work") / "failures.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(info, default=str) + "\n")
        except OSError as exc:
            log.warning("could not record the failure in %s: %s", path, exc)
            path = None
    try:  # import_module (not "from rpp_tasks.outputs import notify"): honours sys.modules, as tests patch it
        import importlib

        notify = importlib.import_module("rpp_tasks.outputs.notify")
    except ImportError:
        return path
    hook = getattr(notify, "notify_failure", None)
    if hook is not None:
        try:
            settings, errors = notify_settings(obs, operators=True) if obs is not None else ({}, {})
            for channel, err in errors.items():
                log.warning("operators' %s alert unavailable: %s", channel, err)
            hook(info, obs, **settings) if settings else hook(info, obs)
        except Exception:  # a broken notifier must not hide the original failure
            log.exception("rpp_tasks.outputs.notify.notify_failure failed")
    return path


# =============================================================================== notification settings
def _mask(secret) -> None:
    """Register a secret with Airflow's log masker (no-op outside a task)."""
    if not secret:
        return
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # pragma: no cover - older SDK
        return
    mask_secret(secret)


def smtp_settings_from_connection(conn):
    """`rpp_tasks.outputs.notify.SmtpSettings` from an Airflow SMTP connection (the smtp provider's conventions:
    extras ``from_email``, ``disable_ssl``, ``disable_tls``, ``timeout``)."""
    from rpp_tasks.outputs.notify import SmtpSettings

    extra = dict(getattr(conn, "extra_dejson", None) or {})
    _mask(conn.password)
    use_ssl = not bool(extra.get("disable_ssl", False))
    return SmtpSettings(
        host=conn.host or "localhost",
        port=int(conn.port or 0),
        login=conn.login or None,
        password=conn.password or None,
        from_addr=extra.get("from_email") or conn.login or f"rpp@{conn.host or 'localhost'}",
        ssl=use_ssl,
        starttls=(not use_ssl) and not bool(extra.get("disable_tls", False)),
        timeout_s=float(extra.get("timeout", 30)),
    )


def telegram_settings_from_connection(conn):
    """`rpp_tasks.outputs.notify.TelegramSettings` from an Airflow connection: password = bot token, extra
    ``{"chat_id": ...}`` (else host = chat id), optional extra ``api_base``."""
    from rpp_tasks.outputs.notify import TELEGRAM_API, TelegramSettings

    extra = dict(getattr(conn, "extra_dejson", None) or {})
    _mask(conn.password)
    return TelegramSettings(
        token=conn.password or "",
        chat_id=str(extra.get("chat_id") or conn.host or ""),
        api_base=extra.get("api_base") or TELEGRAM_API,
        timeout_s=float(extra.get("timeout", 30)),
    )


def notify_settings(
    obs: ObservatoryConfig, *, operators: bool = False, get_connection=None
) -> tuple[dict, dict]:
    """Plain settings for `rpp_tasks.outputs.notify` from the Airflow connections named in ``obs.notifications``.

    Returns ``({"smtp": ..., "telegram": ...}, {channel: error})``: a channel is resolved only when
    it has recipients; a configured connection that cannot be read is an error (the notice is
    recorded as failed), never a silent skip.
    """
    cfg = obs.notifications
    if get_connection is None:

        def get_connection(conn_id):
            from airflow.sdk import Connection

            return Connection.get(conn_id)

    settings, errors = {}, {}
    if (cfg.operators_email_to if operators else cfg.email_to) and cfg.smtp_conn_id:
        try:
            settings["smtp"] = smtp_settings_from_connection(get_connection(cfg.smtp_conn_id))
        except Exception as exc:
            errors["email"] = (
                f"Airflow connection {cfg.smtp_conn_id!r}: {type(exc).__name__}: {exc}"
            )
    tg_id = cfg.operators_telegram_conn_id if operators else cfg.telegram_conn_id
    if tg_id:
        try:
            settings["telegram"] = telegram_settings_from_connection(get_connection(tg_id))
        except Exception as exc:
            errors["telegram"] = f"Airflow connection {tg_id!r}: {type(exc).__name__}: {exc}"
    return settings, errors


def _make_failure_callback(obs: ObservatoryConfig | None):
    def on_failure(context):
        record_failure(failure_info(context), obs)

    on_failure.__name__ = "rpp_on_failure"
    return on_failure


# =============================================================================== reduction DAG
def _doc_md(obs: ObservatoryConfig) -> str:
    rule = obs.session.ready_rule
    ready = {
        "quiet": f"no change for {obs.session.quiet_seconds:g} s",
        "marker": f"marker file `{obs.session.marker_file}` present",
        "twospot": f"2SPOT `{obs.session.twospot_obs_file}` lists every file",
    }[rule]
    cam = obs.camera
    return f"""\
### {obs.title or obs.name} (`{obs.dag_id}`)

Reduces one session of observatory **{obs.name}** per run: validate -> calibrate -> cosmic_rays ->
detect -> astrometry -> photometry -> zero_point -> enrich -> transients -> products -> (archive, notify).

| | |
|---|---|
| configuration | `{obs.source}` (hash `{obs.config_hash}`) |
| camera | {cam.name}: gain {cam.gain_e_per_adu} e-/ADU, read noise {cam.read_noise_e} e-, saturation {cam.saturation_adu:g} ADU |
| incoming | `{obs.resolve_path("incoming")}` (session ready when: {ready}) |
| work folder | `{obs.resolve_path("work")}/<session_id>/` |
| products | `{obs.resolve_path("products")}` |

**Triggered by** the watcher (`rpp watch`, run id `session__<session_id>`) or by `rpp_reconcile`.
**By hand**: *Trigger* with `session_dir` = the session folder (absolute, or relative to the incoming
folder) and optionally `session_id`. A re-run of the same session replaces its products.
"""


def build_reduction_dag(obs: ObservatoryConfig):
    """The `rpp_<observatory>` DAG of one valid configuration."""
    on_failure = _make_failure_callback(obs)

    @dag(
        dag_id=obs.dag_id,
        description=f"Nightly reduction of {obs.title or obs.name}",
        schedule=None,  # runs come from the watcher / rpp_reconcile (one run per session)
        start_date=START_DATE,
        catchup=False,
        max_active_runs=2,  # sized for a small (2-core) host; the pool bounds the CPU work
        max_active_tasks=2,
        tags=["rpp", obs.name],
        default_args={**DEFAULT_ARGS, "on_failure_callback": on_failure},
        on_failure_callback=on_failure,
        doc_md=_doc_md(obs),
        params={
            "observatory": Param(
                obs.name,
                type="string",
                enum=[obs.name],
                description="Set by the watcher; must be this DAG's observatory.",
            ),
            "session_dir": Param(
                "",
                type="string",
                description="Session folder with the night's raw frames: absolute, or "
                "relative to the incoming folder " + str(obs.resolve_path("incoming")),
            ),
            "session_id": Param(
                None,
                type=["null", "string"],
                description="Work folder name; default derived from the folder.",
            ),
        },
        render_template_as_native_obj=False,
    )
    def reduction():
        @task(task_id="validate")
        def validate(**context) -> dict:
            """Open the session: manifest of frames by type; a re-run starts from a clean work folder."""
            import shutil

            from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

            from rpp_tasks.session import pipeline

            params = context["params"]
            if params.get("observatory") not in (None, "", obs.name):
                raise AirflowFailException(
                    f"run conf is for observatory {params['observatory']!r}, "
                    f"this DAG reduces {obs.name!r}"
                )
            raw = str(params.get("session_dir") or "").strip()
            if not raw:
                raise AirflowFailException(
                    "no session_dir in the run conf: trigger with "
                    '{"session_dir": "<folder with the night\'s frames>"}'
                )
            raw_dir = Path(raw).expanduser()
            if not raw_dir.is_absolute():
                raw_dir = obs.resolve_path("incoming") / raw_dir
            if not raw_dir.is_dir():
                raise AirflowFailException(f"session folder {raw_dir} does not exist")
            session = pipeline.open_session(
                raw_dir, obs, session_id=params.get("session_id") or None
            )
            # Products of a re-run replace the old ones: drop per-frame outputs of an earlier run.
            for stale in ("frames", "session_summary.json"):
                p = session.workdir / stale
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            manifest = session.read_json("manifest.json", {})
            n_science = len(manifest.get("science", []))
            out = {
                "workdir": str(session.workdir),
                "session_id": session.session_id,
                "raw_dir": str(raw_dir),
                "n_science": n_science,
                "n_calibration": {k: len(manifest.get(k, [])) for k in ("bias", "dark", "flat")},
                "n_rejected_files": len(manifest.get("rejected", [])),
            }
            log.info("[%s] %s", session.session_id, out)
            if n_science == 0:
                raise AirflowSkipException(
                    f"session {session.session_id}: no science frames in {raw_dir} "
                    f"({out['n_calibration']}); nothing to reduce"
                )
            return out

        def _stage_task(task_id: str, stages: tuple[str, ...]):
            @task(task_id=task_id, pool=HEAVY_POOL)
            def stage(prev: dict) -> dict:
                """Run this stage for every frame still in play (process pool inside run_stage)."""
                from rpp_tasks.session import pipeline
                from rpp_tasks.session.workdir import Session

                session = Session.load(prev["workdir"])
                _forget_rejections_of(session, stages)  # a retry / cleared task starts clean
                extra = {}
                if task_id == "enrich" and obs.catalogs.colibri_conn_id:
                    _colibri_key_to_env(obs.catalogs.colibri_conn_id)
                if task_id == "calibrate":
                    masters = pipeline.prepare_masters(session, obs)
                    extra["masters"] = _masters_brief(masters or {})
                result = pipeline.run_stage(session, obs, stages)
                log.info(
                    "[%s] %s: %d/%d frames ok, %d rejected, %d failed, %.1f s",
                    session.session_id,
                    task_id,
                    result["n_ok"],
                    result["n_frames"],
                    result["n_rejected"],
                    result["n_failed"],
                    result["wall_s"],
                )
                return {
                    "workdir": prev["workdir"],
                    "session_id": session.session_id,
                    **extra,
                    **{
                        k: result[k]
                        for k in (
                            "n_frames",
                            "n_ok",
                            "n_rejected",
                            "n_failed",
                            "wall_s",
                            "rejected",
                        )
                    },
                }

            return stage

        @task(task_id="products")
        def products(prev: dict, **context) -> dict:
            """Collect the frame summaries into session_summary.json (+ products module when present)."""
            from rpp_tasks.session import pipeline
            from rpp_tasks.session.workdir import Session

            session = Session.load(prev["workdir"])
            ti = context["ti"]
            runs = {tid: ti.xcom_pull(task_ids=tid) for tid in STAGE_TASKS}
            summary = pipeline.summarize_session(
                session,
                obs,
                extra={
                    "airflow": {"dag_id": obs.dag_id, "run_id": context["run_id"]},
                    "stage_runs": {
                        k: {kk: vv for kk, vv in (v or {}).items() if kk != "workdir"}
                        for k, v in runs.items()
                    },
                },
            )
            out = {
                "workdir": prev["workdir"],
                "session_id": session.session_id,
                "n_science": summary["n_science"],
                "n_ok": summary["n_ok"],
                "n_rejected": summary["n_rejected"],
                "median_fwhm_px": summary.get("median_fwhm_px"),
                "session_summary": str(session.path("session_summary.json")),
            }
            try:
                from rpp_tasks import products as rpp_products
            except ImportError:
                rpp_products = None
            if rpp_products is not None and hasattr(rpp_products, "run_products"):
                made = rpp_products.run_products(session, obs)
                out["products"] = made if isinstance(made, (dict, list, str)) else str(made)
            try:  # the morning report + products ZIP (notify rebuilds it if missing); never blocks the archive
                from rpp_tasks.outputs import report as rpp_report

                rep = rpp_report.run_report(session, obs)
                out.update(report=rep["html_path"], products_zip=rep["products_zip"])
            except Exception as exc:
                log.warning(
                    "[%s] session report not built: %s", session.session_id, exc, exc_info=True
                )
                out["report_error"] = str(exc)[:500]
            if summary["n_ok"] == 0:
                log.warning("[%s] no frame of the session could be reduced", session.session_id)
            return out

        @task(task_id="archive")
        def archive(prev: dict) -> dict:
            """Upsert the session's ObsCore rows (skipped until rpp_tasks.outputs.archive exists / when disabled)."""
            from airflow.sdk.exceptions import AirflowSkipException

            if not obs.archive.enabled:
                raise AirflowSkipException(f"archive disabled in {obs.source}")
            try:
                from rpp_tasks.outputs import archive as rpp_archive
            except ImportError as exc:
                raise AirflowSkipException(
                    f"rpp_tasks.outputs.archive not available: {exc}"
                ) from None
            from rpp_tasks.session.workdir import Session

            session = Session.load(prev["workdir"])
            if obs.archive.conn_id:
                from airflow.sdk import Connection

                url = Connection.get(obs.archive.conn_id).get_uri()
            else:  # the embedded SQLite archive under the products folder
                products_dir = obs.resolve_path("products")
                products_dir.mkdir(parents=True, exist_ok=True)
                url = f"sqlite:///{products_dir / 'archive.sqlite'}"
            summary = session.read_json("session_summary.json", {}) or {}
            frames = [
                str(session.path("frames", f["frame"], "summary.json"))
                for f in summary.get("frames", [])
                if f.get("status") == "ok"
            ]
            if not frames:
                raise AirflowSkipException(f"[{session.session_id}] no reduced frame to archive")
            base = obs.archive.base_url
            res = rpp_archive.run_archive(
                frames,
                url=url,
                obs_collection=obs.archive.obs_collection or obs.name,
                publisher_authority=obs.archive.publisher_authority,
                access_url_base=None if base in ("", "file://") else base,
                products_root=session.workdir if base not in ("", "file://") else None,
                session_id=session.session_id,
                facility_name=obs.camera.telescope,
                instrument_name=obs.camera.name,
            )
            res = res if isinstance(res, dict) else {"result": str(res)}
            log.info(
                "[%s] archive: %s",
                session.session_id,
                {k: v for k, v in res.items() if k.startswith("n_") or k in ("table", "dialect")},
            )
            return {k: v for k, v in res.items() if not isinstance(v, list) or len(v) <= 50}

        @task(task_id="notify")
        def notify(prev: dict, **context) -> dict:
            """Tell the observers by e-mail and Telegram (docs/notifications.md).

            Nothing configured -> skipped. A send that still fails after its retries fails this task
            only (after Airflow's own retries, which resend only what was not delivered): products and
            archive are untouched, the run shows failed, the operators are alerted.
            """
            from airflow.sdk.exceptions import AirflowSkipException

            try:
                from rpp_tasks.outputs import notify as rpp_notify
            except ImportError as exc:
                raise AirflowSkipException(
                    f"rpp_tasks.outputs.notify not available: {exc}"
                ) from None
            from rpp_tasks.session.workdir import Session

            settings, errors = notify_settings(obs)
            res = rpp_notify.run_notify(
                Session.load(prev["workdir"]),
                obs,
                **settings,
                config_errors=errors,
                run_key=context.get("run_id"),
            )
            brief = {
                k: res.get(k)
                for k in (
                    "status",
                    "n_ok",
                    "n_failed",
                    "n_skipped",
                    "failed",
                    "report",
                    "products_zip",
                    "notify_json",
                )
            }
            if res["status"] == "failed":
                raise rpp_notify.NotificationError(
                    "notification failed (the products and the archive are not affected): "
                    + "; ".join(res["failed"])
                )
            if res["status"] == "skipped":
                raise AirflowSkipException(
                    "nothing sent: "
                    + "; ".join(f"{n['channel']}: {n['error']}" for n in res["notices"])
                    if res["notices"]
                    else "nothing sent: no notification channel configured"
                )
            return brief

        prev = validate()
        for task_id, stages in STAGE_TASKS.items():
            prev = _stage_task(task_id, stages)(prev)
        made = products(prev)
        archive(made)
        notify(made)

    return reduction()


def _colibri_key_to_env(conn_id: str) -> None:
    """Astro-Colibri user id from an Airflow connection (password, else login) into the environment of
    this task process (inherited by its frame workers); nothing when the connection does not exist."""
    if os.environ.get("RPP_ASTRO_COLIBRI_UID"):
        return
    try:
        from airflow.sdk import Connection

        conn = Connection.get(conn_id)
    except Exception:  # no such connection: the service is recorded as skipped
        return
    uid = conn.password or conn.login
    if uid:
        _mask(uid)
        os.environ["RPP_ASTRO_COLIBRI_UID"] = uid


def _masters_brief(masters: dict) -> dict:
    """Which masters were used (source and frame count), small enough for XCom."""

    def brief(v):
        return (
            {"source": v.get("source"), "n_frames": v.get("n_frames")}
            if isinstance(v, dict)
            else None
        )

    flats = masters.get("flat") if isinstance(masters.get("flat"), dict) else {}
    return {
        "bias": brief(masters.get("bias")),
        "dark": brief(masters.get("dark")),
        "flat": {band: brief(v) for band, v in flats.items()},
        "flags": list(masters.get("flags") or []),
    }


def _forget_rejections_of(session, stages: tuple[str, ...]) -> None:
    """Un-reject the frames this task itself rejected in an earlier try (a retry starts clean).

    The calibrate task also owns rejections recorded under the reading/checking steps it runs.
    """
    from rpp_tasks.session.pipeline import FRAME_STAGES

    later = set(FRAME_STAGES) - set(stages)
    for stem, rec in session.rejected().items():
        stage = (rec or {}).get("stage")
        if stage == "validate":
            continue
        if stage in stages or (stages[0] == "calibrate" and stage not in later):
            session.unreject(stem)


# =============================================================================== broken configs
def build_config_error_dag(stem: str, source: str, error: ConfigError | Exception):
    """A placeholder ``rpp_<stem>`` DAG for a broken YAML: its description and only task carry the error.

    Keeping the DAG id alive means the watcher's trigger for that observatory fails loudly (and the
    failure callback tells the operators) instead of answering "DAG not found".
    """
    text = str(error)
    on_failure = _make_failure_callback(None)

    @dag(
        dag_id=dag_id_for_stem(stem),
        description=f"CONFIGURATION ERROR: {text}"[:200],
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        tags=["rpp", stem, "config-error"],
        default_args={"owner": "rpp", "retries": 0, "on_failure_callback": on_failure},
        doc_md=f"### Configuration error in `{source}`\n\n```\n{text}\n```\n\n"
        "Fix the YAML (`rpp config` validates it); the real DAG replaces this one at the next parse.",
        params={
            "session_dir": Param("", type="string"),
            "session_id": Param(None, type=["null", "string"]),
            "observatory": Param(stem, type="string"),
        },
    )
    def config_error():
        @task(task_id="config_error", doc_md=f"```\n{text}\n```")
        def fail():
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(f"configuration error: {text}")

        fail()

    return config_error()


# =============================================================================== factory
def build_dags(config_dir: Path = CONFIG_DIR, only_dag_id: str | None = None) -> dict:
    """Build one DAG per observatory YAML (a config-error DAG for a broken one). Returns ``{dag_id: DAG}``."""
    built = {}
    if only_dag_id is not None and only_dag_id.startswith("rpp_"):
        # Task process: parse only the YAML of the DAG being run.
        path = config_dir / "observatories" / f"{only_dag_id[4:]}.yaml"
        if path.is_file():
            try:
                obs = load_observatory_config(path, defaults=config_dir / "defaults.yaml")
                built[obs.dag_id] = build_reduction_dag(obs)
            except ConfigError as exc:
                built[dag_id_for_stem(path.stem)] = build_config_error_dag(
                    path.stem, str(path), exc
                )
            return built
    configs, errors = load_observatory_configs(config_dir, strict=False)
    for obs in configs:
        if only_dag_id in (None, obs.dag_id):
            built[obs.dag_id] = build_reduction_dag(obs)
    for source, exc in errors.items():
        stem = Path(source).stem
        dag_id = dag_id_for_stem(stem)
        if dag_id in built:
            continue
        if only_dag_id in (None, dag_id):
            built[dag_id] = build_config_error_dag(stem, source, exc)
    return built


_DAGS = build_dags(CONFIG_DIR, get_parsing_context().dag_id)
globals().update({f"dag_{k}": v for k, v in _DAGS.items()})
