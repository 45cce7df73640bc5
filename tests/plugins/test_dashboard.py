"""The observers' dashboard of the Airflow UI plugin, on a night reduced as the DAG reduces it.

Roles are decided by Airflow's own simple auth manager (``is_authorized_dag``) for users of each
role; anonymous requests go through Airflow's real ``get_user`` (401). Decisions are checked in the
results database and in the ObsCore table (SQLite here; PostgreSQL in
tests/integration/test_dashboard_pg.py).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "plugins" / "rpp_reports.py"
SESSION = "2025-01-15"
RUN_ID = f"session__{SESSION}"
ROLES = ("viewer", "user", "op", "admin")

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="rpp_airflow_home_"))


def _load_plugin():
    spec = importlib.util.spec_from_file_location("rpp_reports_dash_under_test", PLUGIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def reduce_night(root: Path, *, n_science=3, session=SESSION, seed=11, archive=True):
    """A synthetic night reduced task by task as the DAG does, then archived (SQLite ObsCore)."""
    from rpp_tasks.config import find_config
    from rpp_tasks.session import connections, lifecycle
    from rpp_tasks.sim.synthetic import write_synthetic_session

    obs = find_config("demo")
    raw = root / "data" / "incoming" / "demo" / session
    write_synthetic_session(
        raw,
        truth_folder=root / "truth",
        n_science=n_science,
        n_bias=2,
        n_dark=2,
        n_flat=2,
        shape=(256, 256),
        seed=seed,
    )
    s = lifecycle.open_session(raw, obs, session_id=session)
    for stage in lifecycle.table_for(obs).names:
        lifecycle.run_stage(s, obs, stage, workers=1)
    summary, _ = lifecycle.finish(s, obs, airflow={"dag_id": obs.dag_id, "run_id": RUN_ID})
    url = connections.archive_url(obs)
    res = lifecycle.archive(s, obs, url=url) if archive else None
    return {
        "obs": obs,
        "workdir": Path(s.workdir),
        "summary": summary.to_dict(),
        "url": url,
        "archive": res,
        "raw": raw,
    }


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("rpp_dash")
    old = os.environ.get("RPP_DATA_ROOT")
    os.environ["RPP_DATA_ROOT"] = str(root)
    try:
        yield {"root": root, **reduce_night(root)}
    finally:
        if old is None:
            os.environ.pop("RPP_DATA_ROOT", None)
        else:
            os.environ["RPP_DATA_ROOT"] = old


@pytest.fixture(scope="module")
def plugin():
    return _load_plugin()


def _user_from_header(request_header: str | None = None):
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi import Header, HTTPException

    def dep(x_test_user: str | None = Header(default=None)):  # noqa: B008
        if not x_test_user:
            raise HTTPException(status_code=401, detail="Not authenticated")
        name, role = x_test_user.split(":")
        return SimpleAuthManagerUser(username=name, role=role)

    return dep


@pytest.fixture(scope="module")
def app(plugin, night):
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    return plugin.create_app(
        auth_dependency=lambda: None,
        user_dependency=_user_from_header(),
        auth_manager=SimpleAuthManager(),
    )


def client_as(app, role: str | None):
    from fastapi.testclient import TestClient

    headers = {"X-Test-User": f"{role}_1:{role}"} if role else {}
    return TestClient(app, headers=headers, follow_redirects=False, raise_server_exceptions=False)


def obscore_dids(url: str) -> set[str]:
    import sqlalchemy as sa

    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            return {r[0] for r in c.execute(sa.text("SELECT obs_publisher_did FROM rpp_main"))}
    finally:
        eng.dispose()


def _frames(night):
    return [f["frame"] for f in night["summary"]["frames"]]


def _decide(c, body, session=SESSION):
    return c.post(f"/dash/decide/demo/{session}", json=body)


def test_anonymous_gets_401_from_airflows_login_on_every_dashboard_route(plugin, night):
    from fastapi.testclient import TestClient

    anon = TestClient(plugin.RppReportsPlugin.fastapi_apps[0]["app"], follow_redirects=False)
    stem = _frames(night)[0]
    for method, url in [
        ("get", "/dash/"),
        ("get", "/dash/?format=csv"),
        ("get", "/dash/me"),
        ("get", f"/dash/frame/demo/{SESSION}/{stem}"),
        ("get", f"/dash/files/demo/{SESSION}/frames/{stem}/calibrated.fits"),
        ("get", f"/dash/session/demo/{SESSION}"),
        ("get", "/dash/target?name=demo"),
        ("get", "/dash/moc/demo.json"),
        ("post", f"/dash/decide/demo/{SESSION}"),
        ("post", f"/dash/delete/demo/{SESSION}"),
    ]:
        r = getattr(anon, method)(url)
        assert r.status_code == 401, (url, r.status_code, r.text[:200])


def test_levels_follow_the_simple_auth_managers_roles(app):
    got = {role: client_as(app, role).get("/dash/me").json()["level"] for role in ROLES}
    assert got == {"viewer": "viewer", "user": "observer", "op": "observer", "admin": "admin"}
    assert client_as(app, None).get("/dash/me").status_code == 401


def test_every_read_route_with_every_role(app, night):
    stem = _frames(night)[0]
    calibrated = (night["workdir"] / "frames" / stem / "calibrated.fits").read_bytes()
    for role in ROLES:
        c = client_as(app, role)
        r = c.get("/dash/?name=demo&format=json")
        assert r.status_code == 200 and r.json()["total"] == 3, (role, r.text[:300])
        r = c.get(f"/dash/frame/demo/{SESSION}/{stem}")
        assert r.status_code == 200 and f"Frame {stem}" in r.text
        assert ("id='withdraw'" in r.text) == (role != "viewer"), role
        r = c.get(f"/dash/files/demo/{SESSION}/frames/{stem}/calibrated.fits")
        assert r.status_code == 200 and r.content == calibrated
        r = c.get(f"/dash/session/demo/{SESSION}")
        assert r.status_code == 200 and "Every file" in r.text
        assert ("id='delete'" in r.text) == (role == "admin"), role
        assert c.get("/dash/target?name=demo").status_code == 200


def test_viewer_cannot_decide_or_delete_and_nothing_changes(app, night):
    stem = _frames(night)[0]
    before = obscore_dids(night["url"])
    c = client_as(app, "viewer")
    r = _decide(c, {"decision": "withdrawn", "reason": "clouds", "frames": [stem]})
    assert r.status_code == 403 and "observer" in r.json()["detail"]
    for role in ("viewer", "user", "op"):
        r = client_as(app, role).post(f"/dash/delete/demo/{SESSION}")
        assert r.status_code == 403 and "admin" in r.json()["detail"], role
    assert obscore_dids(night["url"]) == before and len(before) == 3
    assert (night["workdir"] / "frames" / stem / "calibrated.fits").is_file()


def test_withdraw_and_validate_round_trip_in_obscore_and_results_db(app, night):
    from rpp_tasks.outputs import db, db_decisions

    stems = _frames(night)
    all_dids = obscore_dids(night["url"])
    assert len(all_dids) == 3
    c = client_as(app, "user")
    r = _decide(c, {"decision": "withdrawn", "reason": "satellite trail", "frames": [stems[1]]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["archive_rows_removed"] == 1 and out["by"] == "user_1"
    (did,) = out["dids"]
    assert obscore_dids(night["url"]) == all_dids - {did}
    with db.ResultsDB(db.default_results_url(night["obs"].resolve_path("work"))) as rdb:
        (row,) = db_decisions.decisions(rdb, "demo", SESSION)
        assert (row["frame_stem"], row["decision"], row["reason"], row["decided_by"]) == (
            stems[1],
            "withdrawn",
            "satellite trail",
            "user_1",
        )
    # search shows it as withdrawn; the frame page shows who and why
    js = c.get("/dash/?status=withdrawn&format=json").json()
    assert [x["frame_stem"] for x in js["rows"]] == [stems[1]]
    page = c.get(f"/dash/frame/demo/{SESSION}/{stems[1]}").text
    assert "satellite trail" in page and "user_1" in page

    r = _decide(
        c, {"decision": "validated", "reason": "trail is outside the target", "frames": [stems[1]]}
    )
    assert r.status_code == 200 and r.json()["archive_rows_added"] == 1
    assert obscore_dids(night["url"]) == all_dids
    with db.ResultsDB(db.default_results_url(night["obs"].resolve_path("work"))) as rdb:
        (row,) = db_decisions.decisions(rdb, "demo", SESSION)
        assert row["decision"] == "validated"
        hist = db_decisions.decisions(rdb, "demo", SESSION, history=True)
        assert [h["decision"] for h in hist] == ["withdrawn", "validated"]

    # whole session, by an admin
    r = _decide(client_as(app, "admin"), {"decision": "withdrawn", "reason": "bad night"})
    assert r.status_code == 200 and r.json()["archive_rows_removed"] == 3
    assert obscore_dids(night["url"]) == set()
    assert client_as(app, "viewer").get("/dash/?status=withdrawn&format=json").json()["total"] == 3
    r = _decide(c, {"decision": "validated", "reason": None, "frames": None})
    assert r.status_code == 200 and obscore_dids(night["url"]) == all_dids


def test_bad_decisions_are_4xx_with_a_message_and_change_nothing(app, night):
    from rpp_tasks.outputs import db, db_decisions

    stems = _frames(night)
    c = client_as(app, "user")
    url = db.default_results_url(night["obs"].resolve_path("work"))
    with db.ResultsDB(url) as rdb:
        before = db_decisions.decisions(rdb, "demo", SESSION, history=True)
    dids = obscore_dids(night["url"])
    cases = [
        ({"decision": "withdrawn", "frames": [stems[0]]}, 400, "reason"),
        ({"decision": "deleted", "reason": "x", "frames": [stems[0]]}, 400, "decision"),
        ({"decision": "withdrawn", "reason": "x", "frames": ["nope"]}, 404, "no frame"),
        ({"decision": "withdrawn", "reason": "x", "frames": ["../x"]}, 400, "invalid"),
        ({"decision": "withdrawn", "reason": "x", "frames": ["a\x00b"]}, 400, "invalid"),
        ({"decision": "withdrawn", "reason": "x", "frames": "all"}, 400, "frames"),
        ({"decision": "withdrawn", "reason": "x", "extra": 1}, 400, "unknown"),
    ]
    for body, code, word in cases:
        r = _decide(c, body)
        assert r.status_code == code and word in r.json()["detail"], (body, r.status_code, r.text)
    r = _decide(c, {"decision": "withdrawn", "reason": "x"}, session="1999-01-01")
    assert r.status_code == 404
    r = c.post(f"/dash/decide/nowhere/{SESSION}", json={"decision": "withdrawn", "reason": "x"})
    assert r.status_code == 404
    r = c.post(
        f"/dash/decide/demo/{SESSION}",
        content="decision=withdrawn&reason=x",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 400 and "application/json" in r.json()["detail"]
    r = c.post(
        f"/dash/decide/demo/{SESSION}",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400
    with db.ResultsDB(url) as rdb:
        assert db_decisions.decisions(rdb, "demo", SESSION, history=True) == before
    assert obscore_dids(night["url"]) == dids


def test_withdrawing_a_frame_that_is_not_archived_is_409(plugin, tmp_path, monkeypatch):
    """A rejected frame (here: the summary says so) has no archive row: 409, nothing recorded."""
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    from rpp_tasks.outputs import db, db_decisions

    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path))
    n = reduce_night(tmp_path, n_science=2, archive=False)
    path = n["workdir"] / "session_summary.json"
    s = json.loads(path.read_text())
    s["frames"][0].update(status="rejected", reason="fwhm 12 px > 8 px")
    path.write_text(json.dumps(s))
    app = plugin.create_app(
        auth_dependency=lambda: None,
        user_dependency=_user_from_header(),
        auth_manager=SimpleAuthManager(),
    )
    c = client_as(app, "user")
    stem = s["frames"][0]["frame"]
    r = _decide(c, {"decision": "withdrawn", "reason": "x", "frames": [stem]})
    assert r.status_code == 409 and "not archived" in r.json()["detail"]
    with db.ResultsDB(db.default_results_url(n["obs"].resolve_path("work"))) as rdb:
        assert db_decisions.decisions(rdb, "demo", SESSION, history=True) == []
    # admin deletes the session's products: the work folder goes, the raw files stay
    raw_files = sorted(p.name for p in n["raw"].iterdir())
    r = client_as(app, "admin").post(f"/dash/delete/demo/{SESSION}")
    assert r.status_code == 200, r.text
    assert not n["workdir"].exists() and sorted(p.name for p in n["raw"].iterdir()) == raw_files
    assert c.get(f"/dash/session/demo/{SESSION}").status_code == 404
    assert c.get("/dash/?format=json").json()["total"] == 0


def test_search_filters_paging_and_exports(app, night):
    c = client_as(app, "viewer")
    stems = _frames(night)
    js = c.get("/dash/?format=json&per_page=2").json()
    assert js["total"] == 3 and [r["frame_stem"] for r in js["rows"]] == stems[::-1][:2]
    js = c.get("/dash/?format=json&per_page=2&page=2").json()
    assert [r["frame_stem"] for r in js["rows"]] == [stems[0]]
    f0 = night["summary"]["frames"][0]
    js = c.get(
        f"/dash/?format=json&ra={f0['ra_deg']}&dec={f0['dec_deg']}&radius_arcmin=0.05"
    ).json()
    assert [r["frame_stem"] for r in js["rows"]] == [stems[0]] and js["rows"][0][
        "sep_arcmin"
    ] < 0.05
    assert c.get("/dash/?format=json&band=V").json()["total"] == 3
    assert c.get("/dash/?format=json&band=R").json()["total"] == 0
    assert c.get("/dash/?format=json&date_from=2025-01-15&date_to=2025-01-15").json()["total"] == 3
    assert c.get("/dash/?format=json&date_from=2025-01-16").json()["total"] == 0
    assert c.get("/dash/?format=json&observatory=demo&status=ok").json()["total"] == 3
    js = c.get("/dash/?format=json&name=DEMO").json()  # the frames' OBJECT, case-insensitive
    assert js["total"] == 3 and js["resolved"] is None
    assert c.get("/dash/?format=json&name=M 31").json()["total"] == 0
    r = c.get("/dash/?format=csv&band=V")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [x["frame_stem"] for x in rows] == stems[::-1]
    assert float(rows[-1]["fwhm_arcsec"]) == pytest.approx(f0["fwhm_arcsec"])
    r = c.get("/dash/?format=votable")
    from astropy.io.votable import parse_single_table

    t = parse_single_table(io.BytesIO(r.content)).to_table()
    assert sorted(t["frame_stem"]) == sorted(stems)
    assert t["ra_deg"].unit == "deg"
    page = c.get("/dash/?name=demo").text
    assert page.count("<img loading='lazy'") == 3 and "3 frame(s)" in page
    thumb = c.get(f"/dash/files/demo/{SESSION}/frames/{stems[0]}/thumb.png")
    assert thumb.status_code == 200 and thumb.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_malformed_search_and_paths_are_4xx_never_500(app, night):
    c = client_as(app, "user")
    stem = _frames(night)[0]
    cases = {
        "/dash/?ra=abc&dec=1": 400,
        "/dash/?ra=10": 400,
        "/dash/?ra=400&dec=0": 400,
        "/dash/?dec=nan&ra=1": 400,
        "/dash/?radius_arcmin=-1&ra=1&dec=1": 400,
        "/dash/?date_from=2025-13-01": 400,
        "/dash/?date_from=2025-02-01&date_to=2025-01-01": 400,
        "/dash/?page=0": 400,
        "/dash/?per_page=100000": 400,
        "/dash/?status=lost": 400,
        "/dash/?format=xls": 400,
        "/dash/?observatory=nowhere": 400,
        "/dash/?name=%00": 400,
        "/dash/?name=a&name=b": 400,
        "/dash/?evil=1": 400,
        f"/dash/frame/demo/{SESSION}/nope": 404,
        f"/dash/frame/demo/{SESSION}/..": 404,
        f"/dash/frame/demo/{SESSION}/a%00b": 400,
        "/dash/frame/demo/..%2F..%2Fetc/x": 404,
        f"/dash/frame/nowhere/{SESSION}/{stem}": 404,
        f"/dash/frame/demo/1999-01-01/{stem}": 404,
        f"/dash/files/demo/{SESSION}/frames/{stem}/summary.json": 403,
        f"/dash/files/demo/{SESSION}/frames/{stem}/..%2F..%2Fmanifest.json": 404,
        f"/dash/files/demo/{SESSION}/frames/{stem}/calibrated.fits%00": 400,
        f"/dash/files/demo/{SESSION}/frames/..%2F{stem}/calibrated.fits": 404,
        f"/dash/files/demo/{SESSION}/frames/%2E%2E/calibrated.fits": 400,
        f"/dash/session/demo/{SESSION}%00": 400,
        "/dash/session/demo/%2E%2E": 400,
        f"/dash/session/demo/{SESSION}?format=xml": 400,
        "/dash/target?name=%01": 400,
    }
    got = {u: c.get(u).status_code for u in cases}
    assert got == cases
    r = c.get("/dash/?ra=abc&dec=1")
    assert "not a number" in r.json()["detail"]


def test_access_url_of_an_archived_row_downloads_the_product(plugin, tmp_path, monkeypatch):
    """archive.base_url = the dashboard's download route: the row's access_url, fetched with a
    login, gives the product's bytes (file:// stays the embedded default)."""
    import dataclasses

    import sqlalchemy as sa
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    from rpp_tasks.session import connections, lifecycle

    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path))
    n = reduce_night(tmp_path, n_science=1, archive=False)
    base = "http://testserver/rpp-reports/{observatory}/"
    obs = dataclasses.replace(
        n["obs"], archive=dataclasses.replace(n["obs"].archive, base_url=base)
    )
    from rpp_tasks.session.workdir import Session

    lifecycle.archive(Session.load(n["workdir"]), obs, url=connections.archive_url(obs))
    eng = sa.create_engine(connections.archive_url(obs))
    with eng.connect() as con:
        (access_url,) = con.execute(sa.text("SELECT access_url FROM rpp_main")).scalars().all()
    eng.dispose()
    stem = n["summary"]["frames"][0]["frame"]
    assert (
        access_url == f"http://testserver/rpp-reports/demo/{SESSION}/frames/{stem}/calibrated.fits"
    )
    app = plugin.create_app(
        auth_dependency=lambda: None,
        user_dependency=_user_from_header(),
        auth_manager=SimpleAuthManager(),
    )
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    outer = FastAPI()
    outer.mount("/rpp-reports", app)
    c = TestClient(outer, headers={"X-Test-User": "v:viewer"})
    r = c.get(access_url)
    assert r.status_code == 200
    assert r.content == (n["workdir"] / "frames" / stem / "calibrated.fits").read_bytes()
    anon = TestClient(outer)
    assert anon.get(access_url, follow_redirects=True).status_code == 401


def test_healpix_nested_numbering_matches_known_cells():
    import numpy as np

    from rpp_tasks.outputs.dashboard.moc import ang2pix_nest

    # order 0: the 12 base cells (north cap 0-3, equator 4-7, south cap 8-11)
    ra = np.array([45.0, 135, 225, 315, 0, 90, 180, 270, 45, 135, 225, 315])
    dec = np.array([60.0, 60, 60, 60, 0, 0, 0, 0, -60, -60, -60, -60])
    assert ang2pix_nest(0, ra, dec).tolist() == list(range(12))
    # a cell's 4 children are the 4 quarter-cells: the parent is the child // 4 at every order
    rng = np.random.default_rng(3)
    r, d = rng.uniform(0, 360, 500), np.degrees(np.arcsin(rng.uniform(-1, 1, 500)))
    for order in range(1, 12):
        assert (ang2pix_nest(order, r, d) // 4 == ang2pix_nest(order - 1, r, d)).all()
    assert ang2pix_nest(10, r, d).max() < 12 * 4**10


def test_moc_per_session_and_observatory_covers_the_frames(app, night):
    from rpp_tasks.outputs.dashboard.moc import contains

    c = client_as(app, "viewer")
    js = c.get(f"/dash/moc/demo/{SESSION}.json").json()
    assert js["sessions"] == [SESSION] and js["order"] == 10 and js["n_cells"] > 0
    whole = c.get("/dash/moc/demo.json").json()
    assert set(js["moc"]["10"]) <= set(whole["moc"]["10"])
    for f in night["summary"]["frames"]:
        assert contains(js["moc"], f["ra_deg"], f["dec_deg"])
    f0 = night["summary"]["frames"][0]
    assert not contains(js["moc"], f0["ra_deg"] + 1.0, f0["dec_deg"])  # 256" field: 1 deg off
    # a 256x256 1"/px field is ~0.0051 sq deg; an order-10 cell is ~0.0033 sq deg
    assert 2 <= js["n_cells"] <= 20, js["n_cells"]
    assert js["ascii"].startswith("10/")
    assert c.get("/dash/moc/demo/1999-01-01.json").status_code == 404
    assert c.get("/dash/moc/nowhere.json").status_code == 404


def test_session_page_shows_progress_while_the_dag_runs(app, night):
    """A session whose frames are half-way (no summary yet): frames done / total per stage."""
    work = night["obs"].resolve_path("work")
    run = work / "2025-01-16"
    (run / "frames").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"counts": {"science": 3}}))
    done = {"a": ["calibrate", "cosmics", "background"], "b": ["calibrate"], "c": []}
    for stem, stages in done.items():
        (run / "frames" / stem).mkdir()
        st = {s: {"finished_utc": "2026-01-01T00:00:00+00:00"} for s in stages}
        (run / "frames" / stem / "summary.json").write_text(json.dumps({"stages": st}))
    try:
        c = client_as(app, "viewer")
        js = c.get("/dash/session/demo/2025-01-16?format=json").json()
        prog = {s["stage"]: (s["done"], s["total"]) for s in js["progress"]["stages"]}
        assert prog["calibrate"] == (2, 3) and prog["cosmics"] == (1, 3)
        assert prog["background"] == (1, 3) and prog["detect"] == (0, 3)
        assert js["progress"]["finished"] is False
        page = c.get("/dash/session/demo/2025-01-16").text
        assert "<b id='run-state'>running</b>" in page and "<td class='n'>2/3</td>" in page
        fin = c.get(f"/dash/session/demo/{SESSION}?format=json").json()
        assert fin["progress"]["finished"] is True
        assert all(s["done"] == s["total"] == 3 for s in fin["progress"]["stages"]), fin
        outcomes = {Path(x["path"]).name: x["outcome"] for x in fin["files"]}
        assert outcomes["bias_001.fits"] == "calibration used"
        assert sum(o == "reduced" for o in outcomes.values()) == 3
    finally:
        import shutil

        shutil.rmtree(run)


def test_spectrum_page_lists_plots_and_serves_the_spectra_of_a_session(app, night):
    """The spectra stages write ``<base>.fits`` (BeSS), ``<base>.ecsv`` and ``<base>_spectrum.png``
    (`rpp_tasks.spectra.products`); the session page links them and the spectrum page shows them."""
    import numpy as np

    from rpp_tasks.spectra import products

    tdir = night["workdir"] / "spectra" / "hd8538"
    tdir.mkdir(parents=True)
    wl = np.linspace(6400.0, 6700.0, 300)
    flux = 1.0 + 0.5 * np.exp(-0.5 * ((wl - 6563.0) / 3.0) ** 2)
    base = tdir / "hd8538_20250115"
    try:
        from astropy.io import fits

        hdu = fits.PrimaryHDU(flux)
        hdu.header.update(CRVAL1=6400.0, CDELT1=wl[1] - wl[0], CRPIX1=1.0, OBJNAME="hd8538")
        hdu.writeto(base.with_suffix(".fits"))
        products.write_spectrum_ecsv(
            base.with_suffix(".ecsv"), wavelength_a=wl, flux=flux, error=flux * 0.01
        )
        (tdir / "hd8538_20250115_spectrum.png").write_bytes(products.plot_spectrum(wl, flux))
        (tdir / "notes.fits").write_bytes(b"not listed")
        c = client_as(app, "viewer")
        rel = "spectra/hd8538/hd8538_20250115"
        page = c.get(f"/dash/session/demo/{SESSION}").text
        assert f"spectrum/demo/{SESSION}/{rel}'" in page
        r = c.get(f"/dash/spectrum/demo/{SESSION}/{rel}")
        assert r.status_code == 200 and "Spectrum hd8538_20250115" in r.text
        assert f"src='../../../../../spectrum-file/demo/{SESSION}/{rel}_spectrum.png'" in r.text
        for suffix in (".fits", ".ecsv", "_spectrum.png"):
            r = c.get(f"/dash/spectrum-file/demo/{SESSION}/{rel}{suffix}")
            assert r.status_code == 200, suffix
            assert r.content == (night["workdir"] / f"{rel}{suffix}").read_bytes()
        bad = {
            f"/dash/spectrum-file/demo/{SESSION}/spectra/hd8538/notes.fits": 403,
            f"/dash/spectrum-file/demo/{SESSION}/session_summary.json": 403,
            f"/dash/spectrum-file/demo/{SESSION}/spectra/%2E%2E/x.fits": 400,
            f"/dash/spectrum-file/demo/{SESSION}/spectra/a%00.fits": 400,
            f"/dash/spectrum/demo/{SESSION}/spectra/hd8538/nothing": 403,
            f"/dash/spectrum/demo/{SESSION}/{rel}": 200,
        }
        assert {u: c.get(u).status_code for u in bad} == bad
        assert client_as(app, None).get(f"/dash/spectrum/demo/{SESSION}/{rel}").status_code == 401
    finally:
        import shutil

        shutil.rmtree(night["workdir"] / "spectra")


def test_preview_marks_detections_and_the_measured_target(app, night):
    """Green circles at the catalogue's sources; the magenta square where the target stage
    measured the target (``targets.json``); redrawn when that file changes."""
    import numpy as np
    from astropy.table import Table
    from matplotlib.image import imread

    stem = _frames(night)[1]
    c = client_as(app, "viewer")
    url = f"/dash/files/demo/{SESSION}/frames/{stem}/preview.png"
    targets = night["workdir"] / "targets.json"

    def png(tmp):
        r = c.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        p = Path(tempfile.mkdtemp()) / tmp
        p.write_bytes(r.content)
        return (imread(p)[..., :3] * 255).round().astype(int)

    def count(img, rgb, tol=40):
        return int(np.count_nonzero(np.all(np.abs(img - np.array(rgb)) <= tol, axis=-1)))

    targets.unlink(missing_ok=True)  # the reduction measured the demo's target: start without
    before = png("a.png")
    n_src = len(Table.read(night["workdir"] / "frames" / stem / "catalog.ecsv"))
    assert count(before, (0, 255, 0)) > 10 * n_src and count(before, (255, 0, 255)) < 5
    time.sleep(0.01)
    targets.write_text(
        json.dumps(
            {"measurements": [{"target": "SN X", "frame": stem, "x_px": 60.0, "y_px": 190.0}]}
        )
    )
    try:
        after = png("b.png")
        mag = np.argwhere(np.all(np.abs(after - np.array([255, 0, 255])) <= 40, axis=-1))
        assert len(mag) > 100
        # 700 px image of 256 px: (60, 190) -> column ~164, row (from the top) ~180
        cy, cx = np.median(mag, axis=0)
        assert abs(cx - 60 * 700 / 256) < 40 and abs(cy - (256 - 190) * 700 / 256) < 40, (cx, cy)
    finally:
        targets.unlink()


def test_target_page_shows_the_light_curve_and_name_search_uses_the_results_db(app, night):
    """Photometry of a target recorded in the results database (as the target stage does):
    the target page draws its light curve, and a name search resolves it offline from there."""
    from rpp_tasks.outputs import db, lightcurve

    frames = night["summary"]["frames"]
    f0 = frames[0]
    with db.ResultsDB(db.default_results_url(night["obs"].resolve_path("work"))) as rdb:
        n = lightcurve.record_session_photometry(
            rdb,
            "demo",
            SESSION,
            objects=[
                {
                    "key": "target:sn test",
                    "name": "SN Test",
                    "kind": "target",
                    "ra_deg": f0["ra_deg"],
                    "dec_deg": f0["dec_deg"],
                }
            ],
            rows=[
                {
                    "object_key": "target:sn test",
                    "frame": f["frame"],
                    "status": "detected",
                    "band": "V",
                    "mjd_mid": f["mjd_obs"],
                    "mag": 15.0 + 0.1 * i,
                    "mag_err": 0.02,
                }
                for i, f in enumerate(frames)
            ],
        )
    assert n == 3
    c = client_as(app, "viewer")
    page = c.get("/dash/target?name=SN Test").text
    assert "3 point(s), 3 detection(s), 0 upper limit(s), bands V, 1 night(s)" in page
    assert "<img alt='light curve' src='data:image/png;base64," in page
    js = c.get("/dash/?format=json&name=sn  TEST&radius_arcmin=0.05").json()
    assert js["resolved"]["source"] == "results database" and js["resolved"]["name"] == "SN Test"
    assert [r["frame_stem"] for r in js["rows"]] == [f0["frame"]]
    unknown = c.get("/dash/target?name=Nothing Here")
    assert unknown.status_code == 200 and "id='msg'" in unknown.text


def test_frame_page_says_which_gain_the_photometry_used(app, night):
    """The frame's facts carry the gain used and its source (``summary.json`` key ``gain``): the
    synthetic night's gain is consistent with its sky noise, so it is the configured one."""
    import re

    frame = night["summary"]["frames"][0]
    g = frame["gain"]
    assert g["source"] == "configured" and g["used_e_per_adu"] == g["configured_e_per_adu"]
    page = client_as(app, "viewer").get(f"/dash/frame/demo/{SESSION}/{frame['frame']}").text
    row = re.search(r"<th>gain \(e⁻/ADU\)</th><td>([^<]*)</td>", page)
    assert row, page[:2000]
    assert row.group(1) == f"{g['used_e_per_adu']:.3g} (configured)"
    # a frame whose configured gain was replaced says what to configure
    from rpp_tasks.outputs.dashboard.pages import _gain_fact

    said = _gain_fact(
        {"used_e_per_adu": 0.1364, "source": "sky noise bound", "configured_e_per_adu": 1.0}
    )
    assert said == (
        "gain 1 e-/ADU configured, impossible for the sky noise: 0.136 e-/ADU used "
        "(sky noise bound); set camera.gain_e_per_adu to about that value"
    )
