"""Airflow UI plugin: the observers' night reports, one click from the Airflow navigation bar.

Adds a **Night reports** entry to the UI's *Browse* menu. It opens the index of every reduced
session of every observatory (newest first: frames reduced and rejected, median FWHM and zero point,
transient candidates) with links to each session's HTML report, its products ZIP and the Airflow run
that made it. Every DAG run also gets a **Night report** tab showing the report of its session. The page and the files are served by a small FastAPI app mounted on Airflow's own API
server at ``/rpp-reports/``; they need an Airflow login (the same session cookie or bearer token as
the rest of the UI). FastAPI's own ``/docs``, ``/redoc`` and ``/openapi.json`` are switched off
(they would be served without that check). Only regular files that resolve inside the session's
``report/`` folder, and the products ZIP, are served; a malformed path answers 400, never 500.

Wiring only: the listing and the path checks are `rpp_tasks.outputs.browse` (no Airflow there).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

URL_PREFIX = "/rpp-reports"


def _configs():
    from rpp_tasks.config import default_config_dir, load_observatory_configs

    configs, _errors = load_observatory_configs(default_config_dir(), strict=False)
    return configs


def _authenticated():
    """Airflow's own authentication dependency (any logged-in user may read the reports)."""
    from airflow.api_fastapi.core_api.security import requires_authenticated

    return requires_authenticated()


def create_app(*, auth_dependency=None) -> FastAPI:
    """The FastAPI app of the plugin (``auth_dependency`` replaces Airflow's login check in tests)."""
    from rpp_tasks.outputs import browse

    # no /docs, /redoc or /openapi.json: FastAPI serves them without the routes' login check
    app = FastAPI(
        title="RPP night reports",
        description="Session reports of the RPP reduction DAGs",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    deps = [Depends(auth_dependency or _authenticated())]

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
                "<p style='font-family: sans-serif'>No night report for this run yet: it is written by the "
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
            "name": "Night report",
            "href": URL_PREFIX.lstrip("/") + "/run/{DAG_ID}/{RUN_ID}",  # the UI fills in the run
            "destination": "dag_run",
            "url_route": "rpp_night_report",
        },
    ]
