"""Validate / withdraw round trips and ``archive.publish: on_validation`` on both backends: SQLite
(embedded default) and a real PostgreSQL with pgsphere (results database and ObsCore table in a
throw-away database ``rpp_dash_test``; skipped with the reason when PostgreSQL or pgsphere is
missing)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import pytest

from tests.pgdb import obscore_database

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ADMIN_URL = os.environ.get("RPP_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DB = "rpp_dash_test"


def _helpers():
    spec = importlib.util.spec_from_file_location(
        "_dash_helpers", REPO / "tests" / "plugins" / "test_dashboard.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("rpp_dash_pg")
    old = os.environ.get("RPP_DATA_ROOT")
    os.environ["RPP_DATA_ROOT"] = str(root)
    try:
        yield _helpers().reduce_night(root, n_science=3, archive=False)
    finally:
        if old is None:
            os.environ.pop("RPP_DATA_ROOT", None)
        else:
            os.environ["RPP_DATA_ROOT"] = old


@pytest.fixture(scope="module")
def pg_url():
    with obscore_database(DB) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, night, tmp_path):
    """(results DB URL, archive URL, ObsCore table name) of a fresh database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.sqlite'}", f"sqlite:///{tmp_path / 'arch.sqlite'}"
    url = request.getfixturevalue("pg_url")
    import sqlalchemy as sa

    eng = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://"))
    with eng.begin() as conn:  # a clean slate for each test
        conn.execute(sa.text("DELETE FROM rpp.main"))
        for t in ("rpp_decision", "rpp_decision_log", "rpp_frame_index"):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {t}"))
    eng.dispose()
    return url, url


def _dids(url):
    import sqlalchemy as sa

    from rpp_tasks.outputs.sql import make_engine

    eng = make_engine(url, one_shot=True)
    name = "rpp.main" if eng.dialect.name == "postgresql" else "rpp_main"
    try:
        with eng.connect() as c:
            if not sa.inspect(eng).has_table(
                name.split(".")[-1], schema="rpp" if "." in name else None
            ):
                return set()
            return {r[0] for r in c.execute(sa.text(f"SELECT obs_publisher_did FROM {name}"))}
    finally:
        eng.dispose()


def _obs(night, publish):
    o = night["obs"]
    return dataclasses.replace(o, archive=dataclasses.replace(o.archive, publish=publish))


def test_on_validation_publishes_only_validated_frames_and_withdraw_round_trips(night, backend):
    from rpp_tasks.outputs import db, db_decisions
    from rpp_tasks.outputs.dashboard.roles import Actor
    from rpp_tasks.outputs.dashboard.store import Store
    from rpp_tasks.session import lifecycle
    from rpp_tasks.session.workdir import Session

    results_url, archive_url = backend
    session = Session.load(night["workdir"])
    stems = [f["frame"] for f in night["summary"]["frames"]]
    obs = _obs(night, "on_validation")

    res = lifecycle.archive(session, obs, url=archive_url, results_url=results_url)
    assert res["n_rows"] == 0 and _dids(archive_url) == set()  # nobody agreed yet

    store = Store([obs], results_url=lambda o: results_url, archive_url=lambda o: archive_url)
    observer = Actor("alice", ("user",), can=lambda m, d: True)
    out = store.decide(
        observer,
        "demo",
        night["summary"]["session_id"],
        "validated",
        frames=stems[:2],
        reason="seeing fine",
    )
    assert out["archive_rows_added"] == 2
    assert _dids(archive_url) == set(out["dids"])
    # the archive task re-run publishes the same two, and only them
    res = lifecycle.archive(session, obs, url=archive_url, results_url=results_url)
    assert res["n_rows"] == 2 and res["n_updated"] == 2 and set(res["dids"]) == set(out["dids"])

    # withdraw one: gone from ObsCore, kept as a decision with who/when/why
    w = store.decide(
        observer,
        "demo",
        night["summary"]["session_id"],
        "withdrawn",
        frames=[stems[0]],
        reason="tracking error",
    )
    assert w["archive_rows_removed"] == 1
    assert _dids(archive_url) == set(out["dids"]) - set(w["dids"])
    res = lifecycle.archive(session, obs, url=archive_url, results_url=results_url)
    assert res["n_rows"] == 1  # the withdrawn frame stays out on re-archiving
    with db.ResultsDB(results_url) as rdb:
        rows = {
            r["frame_stem"]: r
            for r in db_decisions.decisions(rdb, "demo", night["summary"]["session_id"])
        }
        assert rows[stems[0]]["decision"] == "withdrawn"
        assert rows[stems[0]]["reason"] == "tracking error"
        assert rows[stems[0]]["decided_by"] == "alice"
        assert rows[stems[0]]["decided_utc"].tzinfo is not None
        assert rows[stems[1]]["decision"] == "validated" and stems[2] not in rows
        hist = db_decisions.decisions(rdb, "demo", night["summary"]["session_id"], history=True)
        assert [(h["frame_stem"], h["decision"]) for h in hist] == [
            (stems[0], "validated"),
            (stems[1], "validated"),
            (stems[0], "withdrawn"),
        ]
    # validated again: back in the table (same DID: upsert, never a duplicate)
    v = store.decide(
        observer, "demo", night["summary"]["session_id"], "validated", frames=[stems[0]]
    )
    assert v["archive_rows_added"] == 1 and _dids(archive_url) == set(out["dids"])

    # "always": every frame not withdrawn
    always = _obs(night, "always")
    store.decide(
        observer,
        "demo",
        night["summary"]["session_id"],
        "withdrawn",
        frames=[stems[1]],
        reason="clouds",
    )
    res = lifecycle.archive(session, always, url=archive_url, results_url=results_url)
    assert res["n_rows"] == 2
    assert len(_dids(archive_url)) == 2


def test_search_index_and_decisions_on_each_backend(night, backend):
    from rpp_tasks.outputs.dashboard import search
    from rpp_tasks.outputs.dashboard.roles import Actor
    from rpp_tasks.outputs.dashboard.store import Store

    results_url, archive_url = backend
    obs = night["obs"]
    store = Store([obs], results_url=lambda o: results_url, archive_url=lambda o: archive_url)
    assert store.sync_index(force=True) == 1
    assert store.sync_index(force=True) == 1 and store.sync_index() == 0  # throttled
    sid = night["summary"]["session_id"]
    stems = [f["frame"] for f in night["summary"]["frames"]]
    r = search.search(store, search.parse_query({"name": "demo"}))
    assert r.total == 3
    store.decide(
        Actor("bob", ("user",), can=lambda m, d: True), "demo", sid, "withdrawn", reason="focus"
    )
    r = search.search(store, search.parse_query({"status": "withdrawn"}))
    assert sorted(x["frame_stem"] for x in r.rows) == sorted(stems)
    assert {x["decided_by"] for x in r.rows} == {"bob"}
    assert search.search(store, search.parse_query({"status": "pending"})).total == 0
