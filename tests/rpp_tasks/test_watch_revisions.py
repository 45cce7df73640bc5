"""Issue 12: a copy that stalls, the check right before a trigger, revisions of a session
(``session__<id>__r<N>``), and session ids / folders from outside (run conf, state file).

The watcher runs for real (threads, inotify) against the loopback Airflow API peer; the stalled
copy is a separate writer process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from airflow_peer import FITS_BLOCK, PASSWORD, USER, FakeAirflow, wait_for

from rpp_tasks.ops.airflow_api import AirflowClient
from rpp_tasks.ops.readiness import (
    SessionRule,
    Snapshot,
    content_digests,
    evaluate_session,
    implausible_size,
)
from rpp_tasks.ops.session_ids import (
    MAX_SESSION_ID_CHARS,
    check_run_conf,
    resolve_session_dir,
    run_id_for,
    session_id_for,
    validate_session_id,
)
from rpp_tasks.ops.watch import SessionWatcher
from rpp_tasks.ops.watch_state import WatchState, find_ready_untriggered, revision_for

BLOCK = 2880

# A copy tool writing one FITS file in place: the first ``first`` bytes, a pause, the rest.
WRITER = r"""
import os, sys, time
path, first, pause, total = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
cards = [b"SIMPLE  =                    T", b"BITPIX  =                   16",
         b"NAXIS   =                    1", b"NAXIS1  = %20d" % ((total - 2880) // 2), b"END"]
header = b"".join(c.ljust(80) for c in cards).ljust(2880)
data = header + bytes(range(256)) * ((total - 2880) // 256 + 1)
data = data[:total]
with open(path, "wb") as fh:
    fh.write(data[:first])
    fh.flush()
    os.fsync(fh.fileno())
    print("stalled", time.time(), flush=True)
    time.sleep(pause)
    fh.write(data[first:])
    fh.flush()
    os.fsync(fh.fileno())
print("done", time.time(), flush=True)
"""


@pytest.fixture
def airflow():
    fake = FakeAirflow()
    yield fake
    fake.close()


def _watcher(tmp_path, airflow, rule, **kw):
    kw.setdefault("rescan_s", 2.0)
    kw.setdefault("retry_initial_s", 0.2)
    kw.setdefault("retry_max_s", 1.0)
    kw.setdefault("previous_run_poll_s", 0.2)
    return SessionWatcher(
        "demo",
        tmp_path / "incoming",
        "rpp_demo",
        rule,
        tmp_path / "work" / "watch_state.json",
        AirflowClient(airflow.url, USER, PASSWORD, timeout=2.0),
        **kw,
    )


def _run_until(w, cond, timeout=10.0, step=0.1):
    """Drive a watcher that is not started: one pass every ``step`` seconds until ``cond``."""
    end = time.time() + timeout
    while time.time() < end:
        w.run_once()
        if cond():
            return True
        time.sleep(step)
    return cond()


def _stalled_copy(path: Path, first: int, total: int, pause: float):
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(first), str(pause), str(total)],
        stdout=subprocess.PIPE,
        text=True,
    )
    word, t_stall = proc.stdout.readline().split()
    assert word == "stalled"
    return proc, float(t_stall)


def _finish(proc) -> float:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    word, t_done = out.split()
    assert word == "done"
    return float(t_done)


# ------------------------------------------------------------------------------------------
# A copy that stalls longer than the quiet time (a real writer process)
# ------------------------------------------------------------------------------------------


def test_copy_stalled_on_a_block_boundary_late_bytes_end_in_a_second_run(tmp_path, airflow):
    """The copy stalls after 10 whole FITS blocks for longer than the quiet time: nothing shows
    the file is unfinished, so revision 1 runs on the half file; the late bytes then start
    revision 2 (run ``session__2024-07-30__r2``, conf ``revision: 2``), which reads all of them.
    Before issue 12 the late bytes were never reduced (one run, files changed warning)."""
    airflow.run_state = "success"  # the first run is over when the late bytes arrive
    quiet = 0.6
    rule = SessionRule("quiet", quiet_seconds=quiet, settle_seconds=0.2, stall_seconds=60)
    session = tmp_path / "incoming" / "2024-07-30"
    session.mkdir(parents=True)
    w = _watcher(tmp_path, airflow, rule, rescan_s=30.0)
    w.start()
    half, total = 10 * BLOCK, 20 * BLOCK
    proc = None
    try:
        proc, t_stall = _stalled_copy(session / "light_001.fits", half, total, pause=3.0)
        assert wait_for(lambda: airflow.posts_for("session__2024-07-30"), timeout=10)
        t_r1 = airflow.posts_for("session__2024-07-30")[0][0]
        t_done = _finish(proc)
        assert t_stall + quiet - 0.05 <= t_r1 < t_done  # triggered during the stall
        assert wait_for(lambda: airflow.posts_for("session__2024-07-30__r2"), timeout=10)
        t_r2 = airflow.posts_for("session__2024-07-30__r2")[0][0]
        time.sleep(1.0)  # no third run
    finally:
        w.stop()
        if proc is not None and proc.poll() is None:
            proc.kill()
    assert [p[2] for p in airflow.posts] == ["session__2024-07-30", "session__2024-07-30__r2"]
    assert t_r2 >= t_done + quiet - 0.05
    logging.getLogger(__name__).warning(
        "stalled copy: run 1 %.3f s after the stall began, revision 2 %.3f s after the quiet "
        "period that followed the last byte",
        t_r1 - t_stall,
        t_r2 - (t_done + quiet),
    )
    assert airflow.runs[("rpp_demo", "session__2024-07-30")]["revision"] == 1
    assert airflow.runs[("rpp_demo", "session__2024-07-30__r2")] == {
        "observatory": "demo",
        "session_id": "2024-07-30",
        "session_dir": str(session),
        "revision": 2,
    }
    assert (session / "light_001.fits").stat().st_size == total
    rec = WatchState.load(tmp_path / "work" / "watch_state.json").sessions["2024-07-30"]
    assert rec["revision"] == 2 and rec["confirmed"] and rec["total_bytes"] == total
    assert rec["previous_run_id"] == "session__2024-07-30"
    (first,) = rec["history"]
    assert first["run_id"] == "session__2024-07-30" and first["total_bytes"] == half

    # a restart does not trigger the same revision again
    w2 = _watcher(tmp_path, airflow, rule)
    w2.run_once()
    time.sleep(0.3)
    w2.run_once()
    assert len(airflow.posts) == 2


def test_copy_stalled_mid_block_is_not_triggered_until_complete(tmp_path, airflow, caplog):
    """The copy stalls 1000 bytes into a FITS block (a size no FITS file has) for longer than
    the quiet time: the session waits, and its one run starts after the file is complete.
    Before issue 12 it was triggered with the half-copied file."""
    quiet = 0.6
    rule = SessionRule("quiet", quiet_seconds=quiet, settle_seconds=0.2, stall_seconds=60)
    session = tmp_path / "incoming" / "2024-07-31"
    session.mkdir(parents=True)
    w = _watcher(tmp_path, airflow, rule, rescan_s=0.5)
    total = 20 * BLOCK
    proc = None
    with caplog.at_level(logging.DEBUG, logger="rpp_tasks.ops.watch"):
        w.start()
        try:
            proc, _ = _stalled_copy(session / "light_001.fits", 10 * BLOCK + 1000, total, 2.5)
            time.sleep(2.0)  # > quiet + settle, inside the stall
            assert airflow.posts == []
            t_done = _finish(proc)
            assert wait_for(lambda: airflow.created(), timeout=10)
            time.sleep(1.0)
        finally:
            w.stop()
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert [p[2] for p in airflow.posts] == ["session__2024-07-31"]
    assert airflow.posts[0][0] >= t_done + quiet - 0.05
    rec = w.state.sessions["2024-07-31"]
    assert rec["total_bytes"] == total and rec["revision"] == 1 and rec["n_incomplete"] == 0
    assert "light_001.fits (29800 bytes, not a multiple of 2880)" in caplog.text


# ------------------------------------------------------------------------------------------
# Pure rules: unfinished files, the stall limit, revisions
# ------------------------------------------------------------------------------------------


def _snap(t, entries, rule=None):
    return Snapshot.from_entries(entries, taken_at=t, rule=rule)


@pytest.mark.parametrize(
    "relpath, size, reason",
    [
        ("a.fits", 2880 * 3, None),
        ("a.FIT", 2880 * 3 + 1, "8641 bytes, not a multiple of 2880"),
        ("a.fts", 0, "empty"),
        ("a.fits.fz", 5760, None),  # tile-compressed: still FITS blocks
        ("a.fits.fz", 5000, "5000 bytes, not a multiple of 2880"),
        ("a.fits.gz", 1234, None),  # gzip: any size
        ("a.fits.gz", 0, "empty"),
        ("notes.txt", 17, None),  # not a data file
        ("transfer.done", 0, None),
    ],
)
def test_implausible_fits_sizes(relpath, size, reason):
    assert implausible_size(relpath, size) == reason


@pytest.mark.parametrize(
    "name",
    [
        ".~tmp~/a.fits",  # rsync --delay-updates
        ".rsync-partial/a.fits",  # rsync --partial-dir
        ".a.fits.Xy12Zq",  # rsync temporary name
        ".syncthing.a.fits.tmp",
        "~syncthing~a.fits.tmp",
        "a.sync-conflict-20240730-123456-ABCDEFG.fits",  # Syncthing conflict copy
        "a (conflicted copy 2024-07-30).fits",  # Dropbox / Nextcloud
        "a_conflict-20240730-123456.fits",  # ownCloud
        ".a.fits.~1a2b3c4d",  # Nextcloud / ownCloud download
        "a.fits.part",
        "a.fits.partial",
        "a.fits.crdownload",
        "a.fits.!sync",  # Resilio
        ".a.fits.icloud",  # iCloud placeholder
        "sub/.tmp.drivedownload/a.fits",  # Google Drive
    ],
)
def test_sync_tools_partial_names_block(name):
    rule = SessionRule("quiet", quiet_seconds=0, settle_seconds=0, stall_seconds=600)
    entries = [("b.fits", 2880, 0.0), (name, 2880, 0.0)]
    prev = _snap(100.0, entries, rule)
    assert [e.relpath for e in prev.partial] == [name]
    r = evaluate_session(_snap(200.0, entries, rule), prev, rule, 200.0)
    assert not r.ready and "still being written" in r.reason and name in r.reason
    assert r.recheck_at == 600.0  # last change 0 + stall_seconds


def test_unfinished_file_blocks_until_stall_seconds_then_goes_ahead_with_a_warning():
    rule = SessionRule("quiet", quiet_seconds=60, settle_seconds=5, stall_seconds=600)
    entries = [("a.fits", 2880, 1000.0), ("b.fits", 4000, 1010.0)]
    first = _snap(1011.0, entries, rule)
    r = evaluate_session(_snap(1100.0, entries, rule), first, rule, 1100.0)
    assert not r.ready and r.recheck_at == 1610.0
    assert "unfinished FITS files" in r.reason and "b.fits (4000 bytes" in r.reason
    r = evaluate_session(_snap(1610.0, entries, rule), first, rule, 1610.0)
    assert r.ready and r.problem
    assert "going ahead although unfinished FITS files" in r.reason and "600 s" in r.reason
    # without trusting file times, the stall is counted from what the watcher saw
    rule = SessionRule("quiet", quiet_seconds=60, settle_seconds=5, stall_seconds=600)
    rule_nt = SessionRule(**{**rule.to_dict(), "trust_mtime": False})
    assert not evaluate_session(_snap(1610.0, entries, rule_nt), first, rule_nt, 1610.0).ready
    assert evaluate_session(_snap(1611.0, entries, rule_nt), first, rule_nt, 1611.0).ready


def test_revision_for_and_content_digests():
    rule = SessionRule("quiet", max_revisions=3)
    a = _snap(1.0, [("a.fits", 2880, 10.0, 10.0), ("log.txt", 5, 10.0, 10.0)])
    files = content_digests(a, rule)
    assert len(files) == 1  # the log is not a data file
    assert revision_for(None, a, rule) == ("new", 1)
    rec = {"revision": 1, "confirmed": True, "files": files}
    assert revision_for({**rec, "confirmed": False}, a, rule) == ("pending", 1)
    assert revision_for(rec, a, rule) == ("same", 1)
    # a chmod moves the change time only; a log growing is not a data file
    b = _snap(2.0, [("a.fits", 2880, 50.0, 10.0), ("log.txt", 900, 60.0, 60.0)])
    assert revision_for(rec, b, rule) == ("same", 1)
    grown = _snap(3.0, [("a.fits", 5760, 70.0, 70.0)])
    assert revision_for(rec, grown, rule) == ("changed", 2)
    added = _snap(3.0, [("a.fits", 2880, 10.0, 10.0), ("b.fits", 2880, 70.0, 70.0)])
    assert revision_for(rec, added, rule) == ("changed", 2)
    assert revision_for({**rec, "revision": 3}, added, rule) == ("limit", 3)
    assert revision_for(rec, _snap(3.0, []), rule) == ("removed", 1)
    assert revision_for({"revision": 1, "confirmed": True}, a, rule) == ("unknown", 1)


def test_run_ids_of_revisions_never_collide_with_a_folder_name():
    assert run_id_for("n1") == "session__n1" and run_id_for("n1", 2) == "session__n1__r2"
    with pytest.raises(ValueError):
        run_id_for("n1", 0)
    # a folder whose name ends like a revision gets a hashed id: its run is not n1's r2
    sid = session_id_for("n1__r2")
    assert sid != "n1__r2" and sid.startswith("n1__r2-")
    assert run_id_for(sid) != run_id_for("n1", 2)


# ------------------------------------------------------------------------------------------
# The watcher: re-check before the trigger, revisions, restarts
# ------------------------------------------------------------------------------------------


def _session(tmp_path, name="n1", n=3):
    d = tmp_path / "incoming" / name
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"frame_{i:03d}.fits").write_bytes(FITS_BLOCK)
    return d


def test_queued_folder_that_changed_is_checked_again_before_its_trigger(tmp_path, airflow, caplog):
    """Ready, queued (the API answered 503), then a file arrives: the retry does not trigger
    the stale state; the run starts once the folder is ready again, with all 4 files.
    Before issue 12 the queued trigger was sent as it was."""
    rule = SessionRule("quiet", quiet_seconds=0.3, settle_seconds=0.2)
    d = _session(tmp_path)
    time.sleep(0.35)
    airflow.fail_next = 1
    w = _watcher(tmp_path, airflow, rule, retry_initial_s=0.5)
    assert _run_until(w, lambda: airflow.posts, timeout=5)
    assert [p[3] for p in airflow.posts] == [503] and w.state.pending() == ["n1"]
    (d / "frame_003.fits").write_bytes(FITS_BLOCK)  # arrives while the trigger is queued
    time.sleep(0.6)  # past the retry time
    with caplog.at_level(logging.INFO, logger="rpp_tasks.ops.watch"):
        w.run_once()
    assert [p[3] for p in airflow.posts] == [503]  # the stale trigger was not sent
    assert "n1" not in w.state.sessions
    assert "its files changed since it was found ready" in caplog.text
    assert _run_until(w, lambda: airflow.created(), timeout=5)
    assert [p[2:] for p in airflow.posts] == [("session__n1", 503), ("session__n1", 200)]
    rec = w.state.sessions["n1"]
    assert rec["n_files"] == 4 and rec["revision"] == 1 and rec["confirmed"]
    assert airflow.runs[("rpp_demo", "session__n1")]["revision"] == 1


def test_next_revision_waits_for_the_previous_run_and_survives_a_restart(tmp_path, airflow):
    """Revision 2 is not triggered while revision 1's run is queued/running (both would
    rebuild one work folder); a restart keeps it queued and sends it once, when run 1 ends."""
    rule = SessionRule("quiet", quiet_seconds=0.3, settle_seconds=0.2)
    d = _session(tmp_path)
    time.sleep(0.35)
    w = _watcher(tmp_path, airflow, rule)
    assert _run_until(w, lambda: airflow.created(), timeout=5)
    airflow.states[("rpp_demo", "session__n1")] = "running"
    (d / "frame_003.fits").write_bytes(FITS_BLOCK)
    assert _run_until(w, lambda: w.state.sessions["n1"]["revision"] == 2, timeout=5)
    _run_until(w, lambda: False, timeout=0.6)
    rec = w.state.sessions["n1"]
    assert not rec["confirmed"] and rec["waiting_for"] == "session__n1"
    assert airflow.posts_for("session__n1__r2") == []
    assert "session__n1" in airflow.state_requests

    w2 = _watcher(tmp_path, airflow, rule)  # restart with revision 2 queued
    _run_until(w2, lambda: False, timeout=0.5)
    assert airflow.posts_for("session__n1__r2") == []
    airflow.states[("rpp_demo", "session__n1")] = "failed"  # finished (either way)
    assert _run_until(w2, lambda: airflow.posts_for("session__n1__r2"), timeout=5)
    _run_until(w2, lambda: False, timeout=0.5)
    assert [p[2] for p in airflow.posts] == ["session__n1", "session__n1__r2"]
    doc = json.loads((tmp_path / "work" / "watch_state.json").read_text())
    assert doc["version"] == 2 and doc["sessions"]["n1"]["revision"] == 2


def test_removed_files_and_the_revision_limit_are_logged_not_triggered(tmp_path, airflow, caplog):
    airflow.run_state = "success"
    rule = SessionRule("quiet", quiet_seconds=0.3, settle_seconds=0.2, max_revisions=2)
    d = _session(tmp_path)
    time.sleep(0.35)
    w = _watcher(tmp_path, airflow, rule)
    assert _run_until(w, lambda: airflow.created(), timeout=5)
    with caplog.at_level(logging.WARNING, logger="rpp_tasks.ops.watch"):
        (d / "frame_002.fits").unlink()  # e.g. an operator removes a bad frame
        _run_until(w, lambda: False, timeout=1.0)
        assert [p[2] for p in airflow.posts] == ["session__n1"]
        assert "data files removed after run session__n1" in caplog.text
        (d / "frame_009.fits").write_bytes(FITS_BLOCK)
        assert _run_until(w, lambda: airflow.posts_for("session__n1__r2"), timeout=5)
        (d / "frame_010.fits").write_bytes(FITS_BLOCK)
        _run_until(w, lambda: False, timeout=1.0)
    assert [p[2] for p in airflow.posts] == ["session__n1", "session__n1__r2"]
    assert "its revision 2 = max_revisions: not triggered again" in caplog.text
    assert caplog.text.count("max_revisions") == 1  # logged once, not at every pass


def test_state_file_of_an_older_watcher_is_adopted_without_a_new_run(tmp_path, airflow):
    """A version-1 state file (no revisions, no file list) and an invalid record: the triggered
    session is not run again, the invalid record is ignored; later changes are revision 2."""
    airflow.run_state = "success"
    rule = SessionRule("quiet", quiet_seconds=0.3, settle_seconds=0.2)
    d = _session(tmp_path)
    state = tmp_path / "work" / "watch_state.json"
    state.parent.mkdir(parents=True)
    old = {"run_id": "session__n1", "session_dir": str(d), "confirmed": True, "attempts": 1}
    state.write_text(
        json.dumps({"version": 1, "sessions": {"n1": old, "../../x": {"confirmed": False}}})
    )
    time.sleep(0.35)
    w = _watcher(tmp_path, airflow, rule)
    assert set(w.state.sessions) == {"n1"}
    _run_until(w, lambda: False, timeout=0.8)
    assert airflow.posts == []
    assert len(w.state.sessions["n1"]["files"]) == 3
    (d / "frame_003.fits").write_bytes(FITS_BLOCK)
    assert _run_until(w, lambda: airflow.created(), timeout=5)
    assert [p[2] for p in airflow.posts] == ["session__n1__r2"]


def test_reconcile_candidates_include_the_next_revision(tmp_path, airflow):
    rule = SessionRule("quiet", quiet_seconds=0.3, settle_seconds=0.2)
    d = _session(tmp_path)
    time.sleep(0.35)
    w = _watcher(tmp_path, airflow, rule)
    assert _run_until(w, lambda: airflow.created(), timeout=5)
    state = tmp_path / "work" / "watch_state.json"
    assert find_ready_untriggered(tmp_path / "incoming", rule, state) == []
    (d / "frame_003.fits").write_bytes(FITS_BLOCK)
    time.sleep(0.35)
    (cand,) = find_ready_untriggered(tmp_path / "incoming", rule, state)
    assert cand.run_id == "session__n1__r2" and cand.previous_run_id == "session__n1"
    assert cand.conf("demo")["revision"] == 2


# ------------------------------------------------------------------------------------------
# Session ids and session folders from outside
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, match",
    [
        ("../../victim", "path separator"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("a\x00b", "control character"),
        ("night\n1", "control character"),
        ("x" * (MAX_SESSION_ID_CHARS + 1), "characters long"),
        ("", "empty"),
        (".hidden", "starts with '.'"),
        ("SS 433", "contains ' '"),
        ("été", "contains 'é'"),
        ("n1__r2", "reserved for re-runs"),
        (42, "must be a string"),
    ],
)
def test_validate_session_id_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        validate_session_id(text)


def test_every_derived_session_id_is_valid():
    names = ["2024-07-30", "SS 433/night 1", "a..b", "été 2024", "x" * 300, "../up", "n__r7"]
    names += [".x", "-x", "a\x01b", "a:b+c~d", "\u2028", "__", "a" * 200, "a" * 201]
    for name in names:
        sid = session_id_for(name)
        assert validate_session_id(sid) == sid, name


@pytest.fixture
def demo_obs(tmp_path, monkeypatch):
    from rpp_tasks.config import find_config

    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path))
    obs = find_config("demo")
    night = obs.resolve_path("incoming") / "2025-01-15"
    night.mkdir(parents=True)
    (night / "light_001.fits").write_bytes(FITS_BLOCK)
    return obs, night


def test_resolve_session_dir_rule(demo_obs, tmp_path):
    obs, night = demo_obs
    incoming = obs.resolve_path("incoming")
    assert resolve_session_dir(obs, "2025-01-15") == night.resolve()
    assert resolve_session_dir(obs, "x/../2025-01-15") == night.resolve()
    assert resolve_session_dir(obs, str(night)) == night.resolve()
    elsewhere = tmp_path / "usb" / "night"  # an operator's absolute path may be anywhere
    elsewhere.mkdir(parents=True)
    assert resolve_session_dir(obs, str(elsewhere)) == elsewhere.resolve()
    (incoming / "escape").symlink_to(elsewhere)  # but a relative one stays inside incoming
    bad = {
        "../../usb/night": "outside the incoming folder",
        "escape": "outside the incoming folder",
        ".": "incoming folder .* itself",
        str(incoming): "incoming folder .* itself",
        str(obs.resolve_path("work") / "2025-01-15"): "overlaps the observatory's work folder",
        str(tmp_path): "overlaps the observatory's work folder",
        "/": "overlaps",
        "2025-01-16": "does not exist",
        "2025-01-15/light_001.fits": "is not a folder",
        "2025-01-15\x00": "control character",
        " 2025-01-15": "white space",
        "": "no session_dir",
        None: "no session_dir",
    }
    (obs.resolve_path("work") / "2025-01-15").mkdir(parents=True)
    for raw, match in bad.items():
        with pytest.raises(ValueError, match=match):
            resolve_session_dir(obs, raw)


def test_run_conf_session_id_cannot_reach_another_folder(demo_obs, tmp_path):
    """The run conf ``session_id='../../victim'`` wrote into and deleted ``frames/`` of another
    folder: `check_run_conf` (the DAG's validate step) refuses it before anything is written."""
    obs, night = demo_obs
    victim = tmp_path / "data" / "victim" / "frames" / "x"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("someone's products")
    conf = {"observatory": "demo", "session_dir": str(night), "session_id": "../../victim"}
    with pytest.raises(ValueError, match="session_id '../../victim' contains a path separator"):
        check_run_conf(obs, conf)
    assert (victim / "keep.txt").read_text() == "someone's products"
    assert check_run_conf(obs, {**conf, "session_id": None}) == (night.resolve(), None)
    assert check_run_conf(obs, {**conf, "session_id": "n1", "revision": 2})[1] == "n1"
    for bad, match in (
        ({"observatory": "huntsman"}, "this DAG reduces 'demo'"),
        ({"revision": 0}, "revision must be an integer"),
        ({"revision": "2"}, "revision must be an integer"),
        ({"session_dir": "../.."}, "outside the incoming folder"),
    ):
        with pytest.raises(ValueError, match=match):
            check_run_conf(obs, {**conf, "session_id": None, **bad})
    assert not (tmp_path / "data" / "work" / "victim").exists()
