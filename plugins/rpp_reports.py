"""Airflow UI plugin: the observers' night reports, one click from the Airflow navigation bar.

Adds a **Night reports** entry to the UI's *Browse* menu. It opens the index of every reduced
session of every observatory (newest first: frames reduced and rejected, median FWHM and zero point,
transient candidates) with links to each session's HTML report, its products ZIP and the Airflow run
that made it. Every DAG run also gets a **Night report** tab showing the report of its session.
The page and the files are served by a small FastAPI app mounted on Airflow's own API
server at ``/rpp-reports/``; they need an Airflow login (the same session cookie or bearer token as
the rest of the UI). FastAPI's own ``/docs``, ``/redoc`` and ``/openapi.json`` are switched off
(they would be served without that check). Only regular files that resolve inside the session's
``report/`` folder, and the products ZIP, are served; a malformed path answers 400, never 500.

The **Observations** dashboard (``/rpp-reports/dash/``, also in the *Browse* menu) searches every
frame of every observatory, shows frame, session and target pages, serves the products, and lets
observers validate or withdraw frames (see docs/dashboard.md). Roles come from Airflow's auth
manager: reading the observatory's DAG = viewer (browse, download), editing it = observer
(validate, withdraw), an admin role = admin (delete a session's products). Not logged in: 401.

Wiring only: the listing and the path checks are `rpp_tasks.outputs.browse`, the dashboard is
`rpp_tasks.outputs.dashboard` (no Airflow there).
"""

from __future__ import annotations

import os

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

URL_PREFIX = "/rpp-reports"
#: Online name resolution (Sesame, then SIMBAD, cached) in the dashboard's search: "1" to allow.
ONLINE_NAMES_ENV = "RPP_DASHBOARD_ONLINE_NAMES"
#: Comma-separated role names that may delete a session's products (default: admin).
ADMIN_ROLES_ENV = "RPP_DASHBOARD_ADMIN_ROLES"
CONFIG_TTL_S = 10.0


def _configs():
    from rpp_tasks.config import default_config_dir, load_observatory_configs

    configs, _errors = load_observatory_configs(default_config_dir(), strict=False)
    return configs


def _authenticated():
    """Airflow's own authentication dependency (any logged-in user may read the reports)."""
    from airflow.api_fastapi.core_api.security import requires_authenticated

    return requires_authenticated()


def _get_connection(conn_id: str):
    from airflow.sdk import BaseHook

    return BaseHook.get_connection(conn_id)


def _archive_url(obs):
    from rpp_tasks.session.connections import archive_url

    return archive_url(obs, get_connection=_get_connection)


def _actor_dependency(user_dependency=None, auth_manager=None):
    """A FastAPI dependency giving the logged-in user as a dashboard `Actor` (401 without a login).

    ``user_dependency`` / ``auth_manager`` replace Airflow's ``get_user`` and the running auth
    manager in tests; the permission checks are always the auth manager's own."""
    from rpp_tasks.outputs.dashboard.roles import DEFAULT_ADMIN_ROLES, Actor, role_names

    if user_dependency is None:
        from airflow.api_fastapi.core_api.security import get_user as user_dependency

    def actor(user=Depends(user_dependency)) -> Actor:  # noqa: B008
        from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

        if auth_manager is None:
            from airflow.api_fastapi.app import get_auth_manager

            am = get_auth_manager()
        else:
            am = auth_manager

        def can(method: str, dag_id: str | None) -> bool:
            details = DagDetails(id=dag_id) if dag_id else None
            return bool(am.is_authorized_dag(method=method, user=user, details=details))

        admin = os.environ.get(ADMIN_ROLES_ENV, "")
        admin_roles = tuple(r.strip().lower() for r in admin.split(",") if r.strip())
        return Actor(
            name=str(user.get_name()),
            roles=role_names(user),
            can=can,
            admin_roles=admin_roles or DEFAULT_ADMIN_ROLES,
        )

    return actor


def _http_errors(fn, *args, **kwargs):
    """Call a dashboard function, mapping its typed errors to HTTP statuses (never a 500)."""
    from rpp_tasks.outputs.dashboard.store import ConflictError

    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)[:500]) from None
    except PermissionError as exc:
        raise HTTPException(status_code=403, detail=str(exc)[:500]) from None
    except (LookupError, FileNotFoundError) as exc:
        raise HTTPException(status_code=404, detail=str(exc).strip("'\"")[:500]) from None
    except ConflictError as exc:
        raise HTTPException(status_code=409, detail=str(exc)[:500]) from None


def _add_dashboard(app: FastAPI, actor_dep, store_factory) -> None:
    from rpp_tasks.outputs.dashboard import views

    def store():
        return store_factory()

    @app.get("/dash/", response_class=HTMLResponse)
    def dash_search(request: Request, actor=Depends(actor_dep)) -> Response:  # noqa: B008
        online = os.environ.get(ONLINE_NAMES_ENV, "") == "1"
        params = dict(request.query_params)
        if len(request.query_params.multi_items()) != len(params):
            raise HTTPException(status_code=400, detail="repeated search parameter")
        media, body = _http_errors(
            views.search_view, store(), actor, params, base="./", online=online
        )
        headers = {}
        if media.startswith(("text/csv", "application/x-votable")):
            ext = "csv" if media.startswith("text/csv") else "vot"
            headers["Content-Disposition"] = f"attachment; filename=rpp_search.{ext}"
        return Response(body, media_type=media, headers=headers)

    @app.get("/dash/me")
    def dash_me(actor=Depends(actor_dep)) -> dict:  # noqa: B008
        from rpp_tasks.outputs.dashboard.roles import LEVEL_NAMES

        return {"name": actor.name, "roles": list(actor.roles), "level": LEVEL_NAMES[actor.level()]}

    @app.get("/dash/frame/{observatory}/{session_id}/{stem}", response_class=HTMLResponse)
    def dash_frame(observatory: str, session_id: str, stem: str, actor=Depends(actor_dep)):  # noqa: B008
        html = _http_errors(
            views.frame_view, store(), actor, observatory, session_id, stem, base="../../../"
        )
        return HTMLResponse(html)

    @app.get("/dash/files/{observatory}/{session_id}/frames/{stem}/{name}")
    def dash_file(
        observatory: str,
        session_id: str,
        stem: str,
        name: str,
        actor=Depends(actor_dep),  # noqa: B008
    ):
        from rpp_tasks.outputs.dashboard.files import FRAME_PRODUCTS

        path = _http_errors(views.frame_file, store(), actor, observatory, session_id, stem, name)
        return FileResponse(path, media_type=FRAME_PRODUCTS[name], filename=name)

    @app.get("/dash/session/{observatory}/{session_id}")
    def dash_session(
        observatory: str,
        session_id: str,
        format: str = "html",
        actor=Depends(actor_dep),  # noqa: B008
    ):
        if format not in ("html", "json"):
            raise HTTPException(status_code=400, detail="format must be html or json")
        out = _http_errors(
            views.session_view,
            store(),
            actor,
            observatory,
            session_id,
            base="../../",
            as_json=format == "json",
        )
        return out if format == "json" else HTMLResponse(out)

    @app.get("/dash/target", response_class=HTMLResponse)
    def dash_target(name: str | None = None, actor=Depends(actor_dep)):  # noqa: B008
        return HTMLResponse(_http_errors(views.target_view, store(), actor, name, base="./"))

    @app.post("/dash/decide/{observatory}/{session_id}")
    async def dash_decide(
        observatory: str,
        session_id: str,
        request: Request,
        actor=Depends(actor_dep),  # noqa: B008
    ) -> dict:
        body = await request.body()
        d = _http_errors(views.parse_decision, body, request.headers.get("content-type"))
        return _http_errors(
            store().decide,
            actor,
            observatory,
            session_id,
            d["decision"],
            frames=d["frames"],
            reason=d["reason"],
        )

    @app.get("/dash/spectrum/{observatory}/{session_id}/{relpath:path}")
    def dash_spectrum(observatory: str, session_id: str, relpath: str, actor=Depends(actor_dep)):  # noqa: B008
        depth = "../" * (relpath.count("/") + 3)
        html = _http_errors(
            views.spectrum_view, store(), actor, observatory, session_id, relpath, base=depth
        )
        return HTMLResponse(html)

    @app.get("/dash/spectrum-file/{observatory}/{session_id}/{relpath:path}")
    def dash_spectrum_file(
        observatory: str,
        session_id: str,
        relpath: str,
        actor=Depends(actor_dep),  # noqa: B008
    ):
        path, media = _http_errors(
            views.spectrum_file, store(), actor, observatory, session_id, relpath
        )
        return FileResponse(path, media_type=media, filename=path.name)

    @app.get("/dash/moc/{observatory}.json")
    def dash_moc(observatory: str, actor=Depends(actor_dep)) -> dict:  # noqa: B008
        return _http_errors(views.moc_view, store(), actor, observatory)

    @app.get("/dash/moc/{observatory}/{session_id}.json")
    def dash_moc_session(observatory: str, session_id: str, actor=Depends(actor_dep)) -> dict:  # noqa: B008
        return _http_errors(views.moc_view, store(), actor, observatory, session_id)

    @app.post("/dash/delete/{observatory}/{session_id}")
    def dash_delete(observatory: str, session_id: str, actor=Depends(actor_dep)) -> dict:  # noqa: B008
        return _http_errors(store().delete_products, actor, observatory, session_id)


def create_app(*, auth_dependency=None, user_dependency=None, auth_manager=None) -> FastAPI:
    """The FastAPI app of the plugin (``auth_dependency`` replaces Airflow's login of the report
    routes in tests; ``user_dependency`` and ``auth_manager`` replace Airflow's user and auth
    manager for the dashboard routes)."""
    from rpp_tasks.outputs import browse
    from rpp_tasks.outputs.dashboard.store import Store

    # no /docs, /redoc or /openapi.json: FastAPI serves them without the routes' login check
    app = FastAPI(
        title="RPP night reports",
        description="Session reports of the RPP reduction DAGs",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    deps = [Depends(auth_dependency or _authenticated())]
    stores: dict = {}

    def store_factory():
        """The dashboard's store; the configurations are re-read at most every 10 s (reading
        them costs ~0.1 s) or when ``RPP_DATA_ROOT`` changes."""
        import time

        now, root = time.monotonic(), os.environ.get("RPP_DATA_ROOT")
        cached = stores.get("current")
        if cached is not None and cached[1] == root and now - cached[0] < CONFIG_TTL_S:
            return cached[2]
        configs = _configs()
        key = tuple(sorted((o.name, str(o.resolve_path("work")), o.config_hash) for o in configs))
        store = cached[2] if cached is not None and cached[3] == key else None
        store = store or Store(configs, archive_url=_archive_url)
        stores["current"] = (now, root, store, key)
        return store

    _add_dashboard(app, _actor_dependency(user_dependency, auth_manager), store_factory)

    @app.get("/", response_class=HTMLResponse, dependencies=deps)
    def index() -> HTMLResponse:
        entries = browse.session_index(_configs())
        return HTMLResponse(browse.render_index_html(entries, airflow_base="../"))

    @app.get("/index.json", dependencies=deps)
    def index_json() -> list[dict]:
        return [e.to_dict() for e in browse.session_index(_configs())]

    @app.get("/run/{dag_id}/{run_id}", dependencies=deps)
    def report_of_run(dag_id: str, run_id: str):
        """The report of a DAG run (the *Night report* tab of a run in the UI)."""
        e = browse.session_for_run(_configs(), dag_id, run_id)
        if e is None or not e.has_report:
            return HTMLResponse(
                "<p style='font-family: sans-serif'>No night report for this run yet: it is "
                "written "
                "by the "
                "<code>products</code> task. <a href='../../'>All night reports</a></p>",
                status_code=404,
            )
        return RedirectResponse(
            f"../../{e.observatory}/{e.session_id}/{browse.REPORT_DIR}/report.html"
        )

    @app.get("/{observatory}/{session_id}/", dependencies=deps)
    def session_home(observatory: str, session_id: str):
        return RedirectResponse(f"{browse.REPORT_DIR}/report.html")

    @app.get("/{observatory}/{session_id}/{relpath:path}", dependencies=deps)
    def product(observatory: str, session_id: str, relpath: str) -> FileResponse:
        if relpath.startswith("frames/") and relpath.count("/") == 2:  # archive access_url
            return RedirectResponse(f"../../../../dash/files/{observatory}/{session_id}/{relpath}")
        try:
            path = browse.product_path(_configs(), observatory, session_id, relpath)
        except ValueError as exc:  # NUL, control characters, "..", over-long names
            raise HTTPException(status_code=400, detail=str(exc)) from None
        except PermissionError as exc:
            raise HTTPException(status_code=403, detail=str(exc)) from None
        except FileNotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        return FileResponse(path, filename=path.name if path.suffix == ".zip" else None)

    return app


class RppReportsPlugin(AirflowPlugin):
    name = "rpp_reports"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "RPP night reports"}]
    external_views = [
        {
            "name": "Night reports",
            "href": URL_PREFIX.lstrip("/") + "/",  # relative: works behind a reverse proxy
            "destination": "nav",
            "category": "browse",
            "url_route": "rpp_night_reports",
        },
        {
            "name": "Observations",
            "href": URL_PREFIX.lstrip("/") + "/dash/",
            "destination": "nav",
            "category": "browse",
            "url_route": "rpp_observations",
        },
        {
            "name": "Night report",
            "href": URL_PREFIX.lstrip("/") + "/run/{DAG_ID}/{RUN_ID}",  # the UI fills in the run
            "destination": "dag_run",
            "url_route": "rpp_night_report",
        },
    ]
