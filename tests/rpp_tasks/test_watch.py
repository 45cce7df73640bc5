"""Session watcher: pure readiness rules, and the real watcher (threads, inotify / polling,
a loopback HTTP server speaking the Airflow 3 REST API shape)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from airflow_peer import FITS_BLOCK, PASSWORD, USER, FakeAirflow
from airflow_peer import wait_for as _wait_for
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from rpp_tasks.exceptions import ConfigError
from rpp_tasks.ops.airflow_api import AirflowApiError, AirflowClient
from rpp_tasks.ops.readiness import (
    Declaration,
    SessionRule,
    Snapshot,
    assess_session,
    evaluate_session,
    scan_incoming,
)
from rpp_tasks.ops.session_ids import run_id_for, session_id_for
from rpp_tasks.ops.watch import SessionWatcher, WatcherLocked
from rpp_tasks.ops.watch_state import WatchState, find_ready_untriggered

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def airflow():
    fake = FakeAirflow()
    yield fake
    fake.close()


class _OpenSpy(FileSystemEventHandler):
    def __init__(self, opened):
        self.opened = opened

    def on_opened(self, event):
        if event.src_path.endswith(".fits"):
            self.opened.append(event.src_path)


def _write_session(root: Path, name: str, n=3, size=2880):
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"frame_{i:03d}.fits").write_bytes(b"\0" * size)
    return d


def _trigger(airflow, **kw):
    return AirflowClient(airflow.url, USER, PASSWORD, timeout=2.0, **kw)


def _watcher(tmp_path, trigger, rule, **kw):
    kw.setdefault("rescan_s", 2.0)
    kw.setdefault("retry_initial_s", 0.2)
    kw.setdefault("retry_max_s", 1.0)
    return SessionWatcher(
        "demo",
        tmp_path / "incoming",
        "rpp_demo",
        rule,
        tmp_path / "work" / "watch_state.json",
        trigger,
        **kw,
    )


# ------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------


def test_session_and_run_ids_are_deterministic_and_airflow_safe():
    assert session_id_for("2024-07-30") == "2024-07-30"
    assert run_id_for("2024-07-30") == "session__2024-07-30"
    sid = session_id_for("SS 433/night 1")
    assert sid == session_id_for("SS 433/night 1")
    assert sid.startswith("SS_433_night_1-") and len(sid) == len("SS_433_night_1-") + 8
    assert session_id_for("SS_433_night_1") != sid  # no collision with a real folder of that name
    import re

    for name in ("a..b", "été 2024", "x" * 300, "../up"):
        rid = run_id_for(session_id_for(name))
        assert re.fullmatch(r"[A-Za-z0-9_.~:+-]+", rid) and ".." not in rid and len(rid) < 250


# ------------------------------------------------------------------------------------------
# Pure readiness
# ------------------------------------------------------------------------------------------


def _snap(t, entries, rule=None):
    return Snapshot.from_entries(entries, taken_at=t, rule=rule)


def test_quiet_rule_waits_for_the_quiet_period():
    rule = SessionRule("quiet", quiet_seconds=60, settle_seconds=5)
    files = [("a.fits", 2880, 1000.0), ("b.fits", 5760, 1010.0)]
    first = _snap(1011.0, files)
    r = evaluate_session(first, None, rule, 1011.0)
    assert not r.ready and r.recheck_at == 1070.0  # last change 1010 + 60
    later = _snap(1069.0, files)
    assert not evaluate_session(later, first, rule, 1069.0).ready
    r = evaluate_session(_snap(1070.0, files), first, rule, 1070.0)
    assert r.ready and "quiet for 60.0 s" in r.reason and "2 files" in r.reason


def test_quiet_rule_growing_file_restarts_the_clock():
    rule = SessionRule("quiet", quiet_seconds=60, settle_seconds=5)
    prev = _snap(2000.0, [("a.fits", 2880, 1000.0)])
    grown = _snap(2001.0, [("a.fits", 14400, 1000.0)])  # same mtime (preserved), bigger
    r = evaluate_session(grown, prev, rule, 2001.0)
    # the mtime claims quiet since 1000, but it changed: wait settle_seconds from this snapshot
    assert not r.ready and r.recheck_at == 2006.0
    assert evaluate_session(_snap(2006.0, [("a.fits", 14400, 1000.0)]), grown, rule, 2006.0).ready


def test_quiet_rule_without_trusting_mtime_counts_only_observed_time():
    rule = SessionRule("quiet", quiet_seconds=60, settle_seconds=5, trust_mtime=False)
    files = [("a.fits", 2880, 0.0)]
    first = _snap(1000.0, files)
    assert not evaluate_session(_snap(1030.0, files), first, rule, 1030.0).ready
    assert evaluate_session(_snap(1060.0, files), first, rule, 1060.0).ready


def test_first_snapshot_is_never_ready():
    rule = SessionRule("quiet", quiet_seconds=0, settle_seconds=0.5)
    snap = _snap(10.0, [("a.fits", 2880, 0.0)])
    r = evaluate_session(snap, None, rule, 10.0)
    assert not r.ready and r.recheck_at == 10.5


@pytest.mark.parametrize(
    "name",
    [
        "a.fits.part",
        "b.tmp",
        "~c.fits",
        ".syncthing.d.fits.tmp",
        ".e.fits.Ab3xY9",
        "f.fits.filepart",
        "sub/.g.fits.q1w2e3",
    ],
)
def test_partial_files_block_readiness(name):
    rule = SessionRule("quiet", quiet_seconds=0, settle_seconds=0)
    entries = [("a.fits", 2880, 0.0), (name, 10, 0.0)]
    prev = _snap(100.0, entries, rule)
    assert [e.relpath for e in prev.partial] == [name]
    r = evaluate_session(_snap(200.0, entries, rule), prev, rule, 200.0)
    assert not r.ready and "still being written" in r.reason and name in r.reason


def test_hidden_and_os_litter_are_ignored():
    rule = SessionRule("quiet", quiet_seconds=0, settle_seconds=0)
    snap = _snap(
        1.0,
        [(".DS_Store", 1, 0.0), ("Thumbs.db", 1, 0.0), (".stfolder/x", 1, 0.0), ("a.fits", 1, 0.0)],
        rule,
    )
    assert [e.relpath for e in snap.files] == ["a.fits"] and snap.partial == ()
    assert not evaluate_session(_snap(1.0, [(".DS_Store", 1, 0.0)], rule), None, rule, 9.0).ready


def test_empty_session_is_not_ready():
    rule = SessionRule("quiet", quiet_seconds=0, settle_seconds=0)
    r = evaluate_session(_snap(5.0, []), _snap(1.0, []), rule, 5.0)
    assert not r.ready and r.reason == "no files yet"


def test_marker_rule():
    rule = SessionRule("marker", marker_file="transfer.done", settle_seconds=2)
    data = [("a.fits", 2880, 0.0)]
    assert (
        "waiting for marker"
        in evaluate_session(_snap(1.0, data), _snap(0.0, data), rule, 9.0).reason
    )
    with_marker = data + [("transfer.done", 0, 5.0)]
    first = _snap(5.0, with_marker)
    r = evaluate_session(first, None, rule, 5.0)
    assert not r.ready and r.recheck_at == 7.0
    assert not evaluate_session(_snap(6.0, with_marker), first, rule, 6.0).ready
    assert evaluate_session(_snap(7.0, with_marker), first, rule, 7.0).ready
    only_marker = [("transfer.done", 0, 5.0)]
    r = evaluate_session(_snap(9.0, only_marker), _snap(1.0, only_marker), rule, 9.0)
    assert not r.ready and "no data file" in r.reason


def test_rule_validation():
    with pytest.raises(ConfigError, match="ready_rule"):
        SessionRule("sometimes")
    with pytest.raises(ConfigError, match="marker_file"):
        SessionRule("marker")


LAST_OBS = """\
SS433:
- SS433
- SS433-
- 3
- SS433_Neon-
- 1
- Flat-
- 2
- Dark
- 0
- Offset
- 0
- none
"""


def test_twospot_rule_with_real_files(tmp_path):
    rule = SessionRule("twospot", settle_seconds=0.5)
    d = tmp_path / "2024-07-30"
    d.mkdir()
    for name in ("SS433-1.fits", "SS433-2.fits", "SS433_Neon-1.fits", "Flat-1.fits", "Flat-2.fits"):
        (d / name).write_bytes(FITS_BLOCK)
    c = assess_session("2024-07-30", d, rule, previous=None, now=100.0)
    assert not c.ready and "waiting for 2SPOT observation file" in c.readiness.reason

    (d / "last_obs.yaml").write_text(LAST_OBS)
    c = assess_session("2024-07-30", d, rule, previous=None, now=100.0)
    assert not c.ready and "settling" in c.readiness.reason  # not read while just written
    c = assess_session("2024-07-30", d, rule, previous=c.baseline, now=100.6)
    assert (
        not c.ready and "1 of 6 declared files missing (first: SS433-3.fits)" in c.readiness.reason
    )

    (d / "SS433-3.fits").write_bytes(FITS_BLOCK)
    c = assess_session("2024-07-30", d, rule, previous=c.baseline, now=101.0)
    assert not c.ready and "settling" in c.readiness.reason
    c = assess_session("2024-07-30", d, rule, previous=c.baseline, now=101.5)
    assert c.ready and "all 6 declared files present" in c.readiness.reason


def test_twospot_rule_uses_setup_config_extension_and_reports_bad_yaml(tmp_path):
    rule = SessionRule("twospot", settle_seconds=0.0)
    d = tmp_path / "night"
    d.mkdir()
    (d / "setup_config.yaml").write_text("batch_name: tonight\nfile_extension: 1\nbin_size: 16\n")
    (d / "tonight.yaml").write_text(LAST_OBS.replace("- 3\n", "- x3\n", 1))
    for name in (
        "SS433-1.fit",
        "SS433-2.fit",
        "SS433-3.fit",
        "SS433_Neon-1.fit",
        "Flat-1.fit",
        "Flat-2.fit",
    ):
        (d / name).write_bytes(FITS_BLOCK)
    c = assess_session("night", d, rule, previous=None, now=1.0)
    c = assess_session("night", d, rule, previous=c.baseline, now=2.0)
    assert not c.ready and c.readiness.problem
    assert "tonight.yaml" in c.readiness.reason and "SS433[2] (n_science)" in c.readiness.reason
    (d / "tonight.yaml").write_text(LAST_OBS)
    c = assess_session("night", d, rule, previous=None, now=3.0)
    c = assess_session("night", d, rule, previous=c.baseline, now=4.0)
    assert c.ready, c.readiness


def test_twospot_declaration_in_pure_form():
    rule = SessionRule("twospot", settle_seconds=0)
    files = [("last_obs.yaml", 10, 0.0), ("A-1.fits", 2880, 0.0)]
    decl = Declaration("last_obs.yaml", expected=("A-1.fits", "A-2.fits"))
    r = evaluate_session(_snap(2.0, files), _snap(1.0, files), rule, 2.0, declaration=decl)
    assert not r.ready and "1 of 2" in r.reason
    files.append(("a-2.FITS", 2880, 0.0))
    assert evaluate_session(_snap(2.0, files), _snap(1.0, files), rule, 2.0, declaration=decl).ready


def test_scan_incoming_and_find_ready_untriggered(tmp_path):
    incoming = tmp_path / "incoming"
    rule = SessionRule("quiet", quiet_seconds=0.3, settle_seconds=0.2)
    _write_session(incoming, "2024-07-29")
    _write_session(incoming, "2024-07-30")
    (incoming / ".stversions").mkdir()
    (incoming / "loose.fits").write_bytes(b"\0")
    time.sleep(0.35)
    _write_session(incoming, "2024-07-31")  # still fresh
    first = scan_incoming(incoming, rule)
    assert [c.session_id for c in first] == ["2024-07-29", "2024-07-30", "2024-07-31"]
    assert not any(c.ready for c in first)  # nothing settles in a single look
    state = WatchState(tmp_path / "state.json")
    state.sessions["2024-07-29"] = {"run_id": "session__2024-07-29", "confirmed": True}
    state.save()
    ready = find_ready_untriggered(incoming, rule, tmp_path / "state.json")
    assert [c.session_id for c in ready] == ["2024-07-30"]
    assert ready[0].conf("demo") == {
        "observatory": "demo",
        "session_id": "2024-07-30",
        "session_dir": str(incoming / "2024-07-30"),
        "revision": 1,
    }


# ------------------------------------------------------------------------------------------
# REST API client
# ------------------------------------------------------------------------------------------


def test_trigger_created_then_409_counts_as_done(airflow):
    trig = _trigger(airflow)
    out = trig.trigger("rpp_demo", "session__n1", {"session_id": "n1"})
    assert out.result == "created" and out.delivered and out.status == 200
    out = trig.trigger("rpp_demo", "session__n1", {"session_id": "n1"})
    assert out.result == "exists" and out.delivered and out.status == 409
    assert airflow.runs == {("rpp_demo", "session__n1"): {"session_id": "n1"}}
    assert trig.run_exists("rpp_demo", "session__n1") is True
    assert trig.run_exists("rpp_demo", "session__n2") is False
    assert trig.unpause("rpp_demo").delivered and airflow.paused == {"rpp_demo": False}


def test_token_fetched_once_and_refreshed_on_401(airflow):
    trig = _trigger(airflow)
    for i in range(3):
        assert trig.trigger("rpp_demo", f"session__{i}", {}).result == "created"
    assert airflow.token_requests == 1
    airflow.expire_tokens()
    assert trig.trigger("rpp_demo", "session__3", {}).result == "created"
    assert airflow.token_requests == 2 and trig.n_token_fetches == 2


def test_bad_password_fails_without_leaking_it(airflow, caplog):
    trig = AirflowClient(airflow.url, USER, "wrong-password", timeout=2.0)
    with caplog.at_level(logging.DEBUG):
        out = trig.trigger("rpp_demo", "session__x", {})
    assert out.result == "failed" and out.status == 401
    assert "RPP_AIRFLOW_USER" in out.message and "wrong-password" not in out.message
    assert "wrong-password" not in caplog.text and "wrong-password" not in repr(trig)


def test_unreachable_api_is_a_failed_outcome_not_an_exception():
    port = _refusing_socket()
    trig = AirflowClient(
        f"http://127.0.0.1:{port.getsockname()[1]}/api/v2", USER, PASSWORD, timeout=1.0
    )
    out = trig.trigger("rpp_demo", "session__x", {})
    port.close()
    assert out.result == "failed" and out.status is None and "unreachable" in out.message


def test_invalid_jwt_403_refreshes_the_token_once(airflow):
    """An API server restarted with a new JWT secret answers 403 "Invalid JWT token": one new
    login, then the call goes through (the watcher and rpp up share this path)."""
    client = _trigger(airflow)
    assert client.trigger("rpp_demo", "session__a", {}).result == "created"
    airflow.reject_as_invalid_jwt = True
    airflow.expire_tokens()
    assert client.trigger("rpp_demo", "session__b", {}).result == "created"
    airflow.expire_tokens()
    assert client.run_state("rpp_demo", "session__b") == "queued"
    assert airflow.token_requests == 3 and client.n_token_fetches == 3


def test_rpp_up_calls_health_pool_dag_and_run_state(airflow):
    client = _trigger(airflow)
    assert client.healthy() is True
    airflow.healthy = False
    assert client.healthy() is False
    client.ensure_pool("rpp_heavy", 2, "CPU-heavy")
    client.ensure_pool("rpp_heavy", 3, "CPU-heavy, resized")  # 409 -> PATCH
    assert airflow.pools == {"rpp_heavy": {"slots": 3, "description": "CPU-heavy, resized"}}
    with pytest.raises(AirflowApiError, match="cannot create pool rpp_heavy: HTTP 400") as err:
        client.ensure_pool("rpp_heavy", -1, "bad")
    assert err.value.status == 400
    assert client.dag_registered("rpp_demo") is False
    assert client.trigger("rpp_demo", "session__n1", {}).result == "created"
    assert client.dag_registered("rpp_demo") is True
    assert client.run_state("rpp_demo", "session__n1") == "queued"
    assert client.run_state("rpp_demo", "session__none") is None
    assert client.task_states("rpp_demo", "session__n1") == {"open_session": "success"}
    assert client.task_states("rpp_demo", "session__none") == {}


def test_unreachable_api_raises_one_error_type_for_the_other_calls():
    port = _refusing_socket()
    url = f"http://127.0.0.1:{port.getsockname()[1]}"
    client = AirflowClient(url, USER, PASSWORD, timeout=1.0)
    try:
        assert client.healthy() is False
        assert client.run_exists("rpp_demo", "session__x") is None
        out = client.unpause("rpp_demo")
        assert out.result == "failed" and out.status is None and "unreachable" in out.message
        with pytest.raises(AirflowApiError, match="unreachable .*connection refused") as err:
            client.dag_registered("rpp_demo")
        assert err.value.status is None
    finally:
        port.close()


def _refusing_socket():
    """A bound, non-listening TCP socket: connections to its port are refused."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


# ------------------------------------------------------------------------------------------
# The watcher (real threads, inotify / polling, loopback API)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_polling", [False, True], ids=["inotify", "polling"])
def test_file_written_slowly_is_not_triggered_early(tmp_path, airflow, use_polling):
    quiet = 0.8
    rule = SessionRule("quiet", quiet_seconds=quiet, settle_seconds=0.3)
    (tmp_path / "incoming").mkdir()
    w = _watcher(
        tmp_path,
        _trigger(airflow),
        rule,
        use_polling=use_polling,
        poll_interval_s=0.2,
        rescan_s=30.0,
    )
    session = tmp_path / "incoming" / "2024-07-30"
    # before the spy starts: inotify must already watch it when the writer opens the file
    session.mkdir()
    w.start()
    opened = []  # who opens the FITS file: only the writer may (the watcher only stat()s)
    spy = Observer()
    spy.schedule(_OpenSpy(opened), str(session), recursive=False)
    spy.start()
    try:
        last_write = []

        def writer():
            with open(session / "slow.fits", "wb") as fh:
                for _ in range(8):
                    fh.write(FITS_BLOCK)
                    fh.flush()
                    last_write.append(time.time())
                    time.sleep(0.25)  # longer than settle, shorter than quiet

        t = threading.Thread(target=writer)
        t.start()
        t.join()
        assert airflow.created() == []  # nothing while the file was growing
        assert _wait_for(lambda: airflow.created(), timeout=10)
        t_post = airflow.created()[0][0]
        time.sleep(0.5)
    finally:
        w.stop()
        spy.stop()
        spy.join()
    assert opened == [str(session / "slow.fits")]  # the writer's own open, nothing else
    assert len(airflow.posts_for("session__2024-07-30")) == 1
    assert t_post >= last_write[-1] + quiet - 0.05
    latency = t_post - (last_write[-1] + quiet)
    logging.getLogger(__name__).warning(
        "latency quiet rule (%s): %.3f s after the quiet period",
        "polling" if use_polling else "inotify",
        latency,
    )
    assert latency < (3.0 if use_polling else 2.0)
    conf = airflow.runs[("rpp_demo", "session__2024-07-30")]
    assert conf == {
        "observatory": "demo",
        "session_id": "2024-07-30",
        "session_dir": str(session),
        "revision": 1,
    }
    rec = WatchState.load(tmp_path / "work" / "watch_state.json").sessions["2024-07-30"]
    assert rec["confirmed"] and rec["result"] == "created" and rec["attempts"] == 1


def test_burst_and_duplicate_events_give_one_run(tmp_path, airflow, caplog):
    """100 files and 100 events on one: one run. A file added after the trigger: one second
    revision (run ``session__burst__r2``), started after the first run has finished."""
    rule = SessionRule("quiet", quiet_seconds=0.5, settle_seconds=0.2)
    (tmp_path / "incoming").mkdir()
    w = _watcher(tmp_path, _trigger(airflow), rule, rescan_s=0.5, previous_run_poll_s=0.2)
    w.start()
    try:
        session = tmp_path / "incoming" / "burst"
        session.mkdir()
        for i in range(100):  # 100 files: create + modify + close events
            (session / f"f{i:03d}.fits").write_bytes(FITS_BLOCK)
        for _ in range(100):  # and 100 events on one file
            os.utime(session / "f000.fits")
        assert _wait_for(lambda: airflow.created(), timeout=10)
        with caplog.at_level(logging.INFO, logger="rpp_tasks.ops.watch"):
            (session / "late.fits").write_bytes(FITS_BLOCK)  # after the trigger
            time.sleep(1.5)  # several rescans and re-evaluations; the first run is "queued"
            assert airflow.posts_for("session__burst__r2") == []
            airflow.states[("rpp_demo", "session__burst")] = "success"
            assert _wait_for(lambda: airflow.posts_for("session__burst__r2"), timeout=10)
            time.sleep(1.0)
    finally:
        w.stop()
    assert len(airflow.posts_for("session__burst")) == 1
    assert len(airflow.posts_for("session__burst__r2")) == 1
    assert airflow.runs[("rpp_demo", "session__burst__r2")]["revision"] == 2
    assert "data files changed after run session__burst (revision 1)" in caplog.text
    assert "waits until the previous revision's run session__burst (queued)" in caplog.text
    rec = w.state.sessions["burst"]
    assert rec["revision"] == 2 and rec["n_files"] == 101 and rec["confirmed"]
    assert rec["history"][0]["run_id"] == "session__burst" and rec["history"][0]["n_files"] == 100


def test_restart_mid_night_each_session_runs_exactly_once(tmp_path, airflow):
    rule = SessionRule("quiet", quiet_seconds=0.5, settle_seconds=0.2)
    incoming = tmp_path / "incoming"
    _write_session(incoming, "a")
    w1 = _watcher(tmp_path, _trigger(airflow), rule)
    w1.start()
    try:
        assert _wait_for(lambda: airflow.posts_for("session__a"), timeout=10)
        half = _write_session(incoming, "c", n=1)  # c is being copied when the watcher stops
    finally:
        w1.stop()
    # while the watcher is down: b arrives and goes quiet, c gets its last files
    _write_session(incoming, "b")
    _write_session(incoming, "c", n=3)
    time.sleep(0.7)
    w2 = _watcher(tmp_path, _trigger(airflow), rule)
    t_start = time.time()
    w2.start()
    try:
        assert _wait_for(lambda: len(airflow.created()) == 3, timeout=10)
        t_done = max(p[0] for p in airflow.created())
        time.sleep(0.6)
    finally:
        w2.stop()
    assert sorted(r for _, r in airflow.runs) == ["session__a", "session__b", "session__c"]
    for run_id in ("session__a", "session__b", "session__c"):
        assert len(airflow.posts_for(run_id)) == 1, run_id  # a was not even re-posted
    assert t_done - t_start < 4.0  # catch-up at start: settle time + one request
    assert half.is_dir()


def test_api_down_then_up_trigger_delivered_later_and_recorded_once(tmp_path, airflow):
    rule = SessionRule("quiet", quiet_seconds=0.3, settle_seconds=0.2)
    _write_session(tmp_path / "incoming", "n1")
    airflow.fail_next = 3  # 503 three times, then OK
    w = _watcher(tmp_path, _trigger(airflow), rule, retry_initial_s=0.2, retry_max_s=0.4)
    w.start()
    try:
        assert _wait_for(lambda: airflow.created(), timeout=10)
        time.sleep(0.5)
    finally:
        w.stop()
    statuses = [p[3] for p in airflow.posts_for("session__n1")]
    assert statuses == [503, 503, 503, 200]
    rec = WatchState.load(tmp_path / "work" / "watch_state.json").sessions["n1"]
    assert rec["confirmed"] and rec["attempts"] == 4 and rec["last_error"] is None


def test_api_refusing_connections_queue_survives_restart(tmp_path):
    rule = SessionRule("quiet", quiet_seconds=0.3, settle_seconds=0.2)
    _write_session(tmp_path / "incoming", "n1")
    _write_session(tmp_path / "incoming", "n2")
    refusing = _refusing_socket()
    port = refusing.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    w1 = _watcher(tmp_path, AirflowClient(url, USER, PASSWORD, timeout=1.0), rule)
    w1.start()
    state_path = tmp_path / "work" / "watch_state.json"
    try:
        assert _wait_for(
            lambda: state_path.exists() and len(WatchState.load(state_path).pending()) == 2,
            timeout=10,
        )
        time.sleep(0.5)  # a few refused retries
    finally:
        w1.stop()
    state = WatchState.load(state_path)
    assert state.pending() == ["n1", "n2"] or sorted(state.pending()) == ["n1", "n2"]
    assert all("unreachable" in state.sessions[s]["last_error"] for s in state.pending())
    refusing.close()
    airflow = FakeAirflow(port=port)  # the API server comes back on the same address
    try:
        w2 = _watcher(tmp_path, AirflowClient(url, USER, PASSWORD, timeout=1.0), rule)
        w2.start()
        try:
            assert _wait_for(lambda: len(airflow.created()) == 2, timeout=10)
            time.sleep(0.3)
        finally:
            w2.stop()
        assert len(airflow.posts) == 2
    finally:
        airflow.close()
    assert WatchState.load(state_path).pending() == []


def test_existing_run_409_is_recorded_as_done(tmp_path, airflow):
    airflow.runs[("rpp_demo", "session__n1")] = {}  # e.g. triggered by the reconcile DAG
    rule = SessionRule("quiet", quiet_seconds=0.2, settle_seconds=0.2)
    _write_session(tmp_path / "incoming", "n1")
    w = _watcher(tmp_path, _trigger(airflow), rule)
    w.run_once()
    time.sleep(0.25)
    w.run_once()
    rec = w.state.sessions["n1"]
    assert rec["confirmed"] and rec["result"] == "exists" and rec["http_status"] == 409
    assert [p[3] for p in airflow.posts] == [409]


def test_marker_rule_latency_and_unpause(tmp_path, airflow):
    rule = SessionRule("marker", marker_file="transfer.done", settle_seconds=0.3)
    (tmp_path / "incoming").mkdir()
    w = _watcher(tmp_path, _trigger(airflow), rule, rescan_s=30.0, unpause=True)
    w.start()
    try:
        _write_session(tmp_path / "incoming", "m1")
        time.sleep(0.5)
        assert airflow.created() == []
        (tmp_path / "incoming" / "m1" / "transfer.done").touch()
        t_marker = time.time()
        assert _wait_for(lambda: airflow.created(), timeout=10)
    finally:
        w.stop()
    latency = airflow.created()[0][0] - t_marker
    logging.getLogger(__name__).warning("latency marker rule: %.3f s (settle 0.3 s)", latency)
    assert 0.3 <= latency < 2.5
    assert airflow.paused == {"rpp_demo": False}


def test_second_watcher_on_same_state_is_refused(tmp_path, airflow):
    rule = SessionRule("quiet", quiet_seconds=1, settle_seconds=0.2)
    (tmp_path / "incoming").mkdir()
    w1 = _watcher(tmp_path, _trigger(airflow), rule).start()
    try:
        with pytest.raises(WatcherLocked, match="another watcher"):
            _watcher(tmp_path, _trigger(airflow), rule).start()
    finally:
        w1.stop()
    _watcher(tmp_path, _trigger(airflow), rule).start().stop()  # released


def test_missing_incoming_folder_is_waited_for(tmp_path, airflow):
    rule = SessionRule("quiet", quiet_seconds=0.2, settle_seconds=0.2)
    w = _watcher(tmp_path, _trigger(airflow), rule, rescan_s=0.3)
    w.start()
    try:
        time.sleep(0.4)
        _write_session(tmp_path / "incoming", "late-mount")
        assert _wait_for(lambda: airflow.created(), timeout=10)
    finally:
        w.stop()


def test_rpp_watch_once(tmp_path, airflow, monkeypatch):
    """``rpp watch -o demo --once``: the configured observatory's incoming folder is scanned
    twice, the ready session triggered, exit 0; a second watcher on the same state is refused."""
    from rpp_tasks.ops import cli

    cfg = tmp_path / "config"
    (cfg / "observatories").mkdir(parents=True)
    (cfg / "defaults.yaml").write_text((REPO / "config" / "defaults.yaml").read_text())
    demo = (REPO / "config" / "observatories" / "demo.yaml").read_text()
    demo = demo.replace("quiet_seconds: 30", "quiet_seconds: 0.2\n  settle_seconds: 0.2")
    (cfg / "observatories" / "demo.yaml").write_text(demo)
    monkeypatch.setenv("RPP_CONFIG_DIR", str(cfg))
    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path))
    _write_session(tmp_path / "data" / "incoming" / "demo", "2024-07-30")
    time.sleep(0.3)
    monkeypatch.setenv("RPP_AIRFLOW_API_URL", airflow.url)
    monkeypatch.setenv("RPP_AIRFLOW_USER", USER)
    monkeypatch.setenv("RPP_AIRFLOW_PASSWORD", PASSWORD)
    rc = cli.main(["watch", "-o", "demo", "--once"])
    assert rc == 0
    assert list(airflow.runs) == [("rpp_demo", "session__2024-07-30")]
    state_path = tmp_path / "data" / "work" / "demo" / "watch_state.json"
    assert WatchState.load(state_path).sessions["2024-07-30"]["confirmed"] is True
    incoming = tmp_path / "data" / "incoming" / "demo"
    with SessionWatcher("demo", incoming, "rpp_demo", SessionRule(), state_path, _trigger(airflow)):
        assert cli.main(["watch", "-o", "demo", "--once"]) == 3  # the running one holds the lock
