"""The Airflow UI plugin that serves the night reports, on a session reduced as the DAG reduces
it."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "plugins" / "rpp_reports.py"
SESSION = "2025-01-15"
RUN_ID = f"session__{SESSION}"

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="rpp_airflow_home_"))


def _load_plugin():
    spec = importlib.util.spec_from_file_location("rpp_reports_under_test", PLUGIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """A 2-frame synthetic night reduced task by task as the DAG does (summary with the run id,
    report, ZIP)."""
    root = tmp_path_factory.mktemp("rpp_reports")
    old = os.environ.get("RPP_DATA_ROOT")
    os.environ["RPP_DATA_ROOT"] = str(root)
    try:
        from rpp_tasks.config import find_config
        from rpp_tasks.session import lifecycle
        from rpp_tasks.sim.synthetic import write_synthetic_session

        obs = find_config("demo")
        raw = root / "data" / "incoming" / "demo" / SESSION
        write_synthetic_session(
            raw,
            truth_folder=root / "truth",
            n_science=2,
            n_bias=2,
            n_dark=2,
            n_flat=2,
            shape=(256, 256),
            seed=11,
        )
        session = lifecycle.open_session(raw, obs, session_id=SESSION)
        for stage in lifecycle.table_for(obs).names:  # task by task, as the DAG runs them
            lifecycle.run_stage(session, obs, stage, workers=1)
        summary, made = lifecycle.finish(
            session, obs, airflow={"dag_id": obs.dag_id, "run_id": RUN_ID}
        )
        summary, rep = summary.to_dict(), lifecycle.make_report(session, obs)
        yield {
            "root": root,
            "obs": obs,
            "workdir": Path(session.workdir),
            "summary": summary,
            "report": rep,
        }
    finally:
        if old is None:
            os.environ.pop("RPP_DATA_ROOT", None)
        else:
            os.environ["RPP_DATA_ROOT"] = old


@pytest.fixture(scope="module")
def plugin():
    return _load_plugin()


@pytest.fixture()
def client(plugin, reduced):
    from fastapi.testclient import TestClient

    return TestClient(plugin.create_app(auth_dependency=lambda: None), follow_redirects=False)


def test_every_route_needs_an_airflow_login(plugin, reduced):
    from fastapi.testclient import TestClient

    anon = TestClient(plugin.RppReportsPlugin.fastapi_apps[0]["app"], follow_redirects=False)
    for url in (
        "/",
        "/index.json",
        f"/demo/{SESSION}/report/report.html",
        f"/run/rpp_demo/{RUN_ID}",
    ):
        r = anon.get(url)
        assert r.status_code == 401, (url, r.status_code, r.text[:200])


def test_index_lists_the_session_with_its_figures_and_links(client, reduced):
    summary = reduced["summary"]
    entries = client.get("/index.json").json()
    (e,) = [x for x in entries if x["session_id"] == SESSION]
    assert (e["observatory"], e["dag_id"], e["run_id"]) == ("demo", "rpp_demo", RUN_ID)
    assert (
        (e["n_science"], e["n_ok"], e["n_rejected"])
        == (2, summary["n_ok"], summary["n_rejected"])
        == (2, 2, 0)
    )
    assert e["median_fwhm_arcsec"] == pytest.approx(summary["median_fwhm_arcsec"])
    assert 3.0 < e["median_fwhm_arcsec"] < 4.2  # demo: 3.5 px at 1"/px, +-5 % per frame
    assert (
        e["night"] == "2025-01-15"
        and e["has_report"]
        and e["products_zip"] == f"{SESSION}_products.zip"
    )

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert f"<td>{SESSION}</td>" in html and "<td class='n'>2/2</td>" in html
    assert f"<td class='n'>{summary['median_fwhm_arcsec']:.2f}</td>" in html
    assert f"href='demo/{SESSION}/report/report.html'" in html
    assert f"href='demo/{SESSION}/{SESSION}_products.zip'" in html
    assert f"href='../dags/rpp_demo/runs/{RUN_ID}'" in html


def test_report_and_zip_are_served_byte_for_byte(client, reduced):
    workdir = reduced["workdir"]
    r = client.get(f"/demo/{SESSION}/report/report.html")
    assert r.status_code == 200 and r.content == (workdir / "report" / "report.html").read_bytes()
    pngs = sorted(p.name for p in (workdir / "report").glob("*.png"))
    assert pngs, "the report writes its plots as PNG files"
    r = client.get(f"/demo/{SESSION}/report/{pngs[0]}")
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    r = client.get(f"/demo/{SESSION}/{SESSION}_products.zip")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert any(n.endswith("catalog.ecsv") for n in names), names
    assert client.get(f"/demo/{SESSION}/").headers["location"] == "report/report.html"


def test_run_tab_redirects_to_the_report_of_that_run(client, reduced):
    r = client.get(f"/run/rpp_demo/{RUN_ID}")
    assert (
        r.status_code == 307 and r.headers["location"] == f"../../demo/{SESSION}/report/report.html"
    )
    # a run that produced no summary (yet) says so instead of showing another night
    r = client.get("/run/rpp_demo/manual__2025-01-16T00:00:00+00:00")
    assert r.status_code == 404 and "products" in r.text
    assert client.get(f"/run/rpp_huntsman/{RUN_ID}").status_code == 404


def test_only_published_products_inside_the_session_are_served(client, reduced):
    workdir = reduced["workdir"]
    secret = reduced["root"] / "outside.txt"
    secret.write_text("not a product")
    (workdir / "report" / "escape.txt").symlink_to(secret)
    cases = {
        f"/demo/{SESSION}/manifest.json": 403,  # intermediate file, not published
        # a frame's product: to the dashboard's download route (login and role checked there)
        f"/demo/{SESSION}/frames/{reduced['summary']['frames'][0]['frame']}/catalog.ecsv": 307,
        f"/demo/{SESSION}/frames/{reduced['summary']['frames'][0]['frame']}/x/summary.json": 403,
        f"/demo/{SESSION}/report/..%2Fmanifest.json": 400,  # traversal, encoded
        f"/demo/{SESSION}/report/escape.txt": 403,  # symlink out of the work folder
        f"/demo/{SESSION}/report/missing.png": 404,
        "/demo/..%2F..%2Fincoming/report/report.html": 400,
        "/demo/1999-01-01/report/report.html": 404,
        f"/nowhere/{SESSION}/report/report.html": 404,
    }
    got = {url: client.get(url).status_code for url in cases}
    assert got == cases


def test_empty_index_explains_itself(plugin, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path))
    page = TestClient(plugin.create_app(auth_dependency=lambda: None)).get("/")
    assert page.status_code == 200 and "No reduced session yet" in page.text
    assert "0 session(s)" in page.text


def test_airflow_loads_the_plugin_and_its_ui_entries(tmp_path):
    """Airflow's own plugin manager imports plugins/ without error and validates the UI entries."""
    code = r"""
import json
from airflow import plugins_manager
from airflow.api_fastapi.core_api.datamodels.plugins import ExternalViewResponse
plugins, errors = plugins_manager._get_plugins()
p = [p for p in plugins if p.name == "rpp_reports"]
views = [ExternalViewResponse(**v).model_dump() for v in p[0].external_views] if p else []
apps = [a["url_prefix"] for a in plugins_manager.get_fastapi_plugins()[0]]
errs = {str(k): str(v) for k, v in errors.items()}
print("RESULT " + json.dumps({"errors": errs, "found": bool(p), "views": views, "apps": apps}))
"""
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stdout[-2000:] + res.stderr[-3000:]
    out = json.loads(lines[-1][7:])
    assert out["errors"] == {} and out["found"]
    assert "/rpp-reports" in out["apps"]
    by_dest = {v["destination"]: v for v in out["views"] if v["destination"] != "nav"}
    nav = {v["name"]: v for v in out["views"] if v["destination"] == "nav"}
    assert nav["Night reports"]["href"] == "rpp-reports/"
    assert nav["Observations"]["href"] == "rpp-reports/dash/"
    assert {v["category"] for v in nav.values()} == {"browse"}
    assert by_dest["dag_run"]["href"] == "rpp-reports/run/{DAG_ID}/{RUN_ID}"


def test_symlinks_in_report_resolve_inside_report_only(client, reduced):
    """A link inside report/ to a file of the session outside report/ (the summary, a raw frame's
    products) is refused, a link to a folder is no product, a link to another report file is
    served. (Before: anything inside the session folder was served through a link.)"""
    rep = reduced["workdir"] / "report"
    png = sorted(rep.glob("*.png"))[0]
    links = {
        "summary_link.json": reduced["workdir"] / "session_summary.json",
        "frames_link": reduced["workdir"] / "frames",
        "plot_link.png": png,
        "dir_link": rep / "a_folder",
    }
    (rep / "a_folder").mkdir()
    for name, target in links.items():
        (rep / name).symlink_to(target)
    try:
        got = {n: client.get(f"/demo/{SESSION}/report/{n}").status_code for n in links}
        got["a_folder"] = client.get(f"/demo/{SESSION}/report/a_folder").status_code
        assert got == {
            "summary_link.json": 403,
            "frames_link": 403,
            "plot_link.png": 200,
            "dir_link": 404,
            "a_folder": 404,
        }
        r = client.get(f"/demo/{SESSION}/report/plot_link.png")
        assert r.content == png.read_bytes()
    finally:
        for name in links:
            (rep / name).unlink()
        (rep / "a_folder").rmdir()


def test_odd_paths_give_400_or_404_never_500(plugin, reduced):
    """NUL bytes, control characters, over-long names and traversal in any part of the URL."""
    from fastapi.testclient import TestClient

    raw = TestClient(
        plugin.create_app(auth_dependency=lambda: None),
        follow_redirects=False,
        raise_server_exceptions=False,
    )
    long = "a" * 256
    cases = {
        f"/demo/{SESSION}/report/%00": 400,
        f"/demo/{SESSION}/report/report.html%00.png": 400,
        f"/demo/{SESSION}%00/report/report.html": 400,
        f"/demo%00/{SESSION}/report/report.html": 404,
        f"/demo/{SESSION}/report/{long}.png": 400,
        f"/demo/{long}/report/report.html": 400,
        f"/demo/{SESSION}/report/{'b' * 5000}": 400,
        f"/demo/{SESSION}/report/%0Aevil.png": 404,  # the route does not match a newline
        f"/demo/{SESSION}/report/a%01b.png": 400,
        f"/demo/{SESSION}/report/%2e%2e/%2e%2e/%2e%2e/etc/passwd": 400,
        f"/demo/{SESSION}/report/sub%5c..%5creport.html": 400,
        "/run/rpp_demo/session__%00": 404,
        f"/run/rpp_demo/session__{long}": 404,
        "/run/rpp_demo/session__..": 404,
    }
    got = {url: raw.get(url).status_code for url in cases}
    assert got == cases


def test_api_docs_of_the_plugin_are_not_served(plugin, client):
    """FastAPI's /docs, /redoc and /openapi.json were served without a login (they list every
    route); the plugin app has none, logged in or not."""
    from fastapi.testclient import TestClient

    anon = TestClient(plugin.RppReportsPlugin.fastapi_apps[0]["app"], follow_redirects=False)
    for url in ("/docs", "/redoc", "/openapi.json"):
        assert anon.get(url).status_code in (401, 404), url
        assert client.get(url).status_code == 404, url
    r = client.get("/docs/oauth2-redirect")  # only the session route's trailing-slash redirect
    assert r.status_code == 307 and "swagger" not in r.text.lower()
