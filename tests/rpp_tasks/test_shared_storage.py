"""`check_shared_storage`: a worker that cannot use the session work folder says so, and why."""

from __future__ import annotations

import pytest

from rpp_tasks.config import find_config
from rpp_tasks.exceptions import RppError
from rpp_tasks.ops.shared_storage import SharedStorageError, check_shared_storage


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A session work folder as validate leaves it (open_session of a one-frame night)."""
    from rpp_tasks.session.lifecycle import open_session
    from rpp_tasks.sim.synthetic import write_synthetic_session

    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path / "shared"))
    raw = tmp_path / "shared" / "nights" / "n1"
    write_synthetic_session(raw, n_science=1, n_bias=1, n_dark=1, n_flat=1, shape=(64, 64))
    session = open_session(raw, find_config("demo"), work_root=tmp_path / "shared" / "work")
    return session.workdir


def test_a_worker_that_shares_the_storage_passes(workdir):
    assert check_shared_storage(str(workdir)) == workdir
    assert not list(workdir.glob(".rpp-write-probe-*"))  # the probe is removed


def test_work_folder_not_visible_names_worker_folder_and_setting(workdir, tmp_path, monkeypatch):
    # this worker mounts something else at RPP_DATA_ROOT: the session's folder is not there
    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path / "local"))
    (tmp_path / "local").mkdir()
    elsewhere = tmp_path / "other-host" / "work" / "demo" / "2025-01-15"
    with pytest.raises(SharedStorageError) as err:
        check_shared_storage(elsewhere, host="worker7.example")
    msg = str(err.value)
    assert "worker7.example cannot see the session work folder" in msg
    assert str(elsewhere) in msg and f"nearest folder that exists here is {tmp_path}" in msg
    assert f"not under this worker's RPP_DATA_ROOT {tmp_path / 'local'}" in msg
    assert "same shared storage, mounted at the same path" in msg
    assert isinstance(err.value, RppError)


def test_same_path_other_disk_is_told_apart(workdir):
    (workdir / "manifest.json").unlink()  # the folder exists here, but not what validate wrote
    with pytest.raises(SharedStorageError, match="sees .* but not manifest.json .* different disk"):
        check_shared_storage(workdir, host="w2")


def test_relative_path_is_refused(workdir):
    with pytest.raises(SharedStorageError, match="not an absolute path"):
        check_shared_storage("data/work/demo/x", host="w2")


def test_unwritable_folder(workdir, monkeypatch):
    # a directory where the probe file would go: writing fails for any user, root included
    monkeypatch.setattr("os.getpid", lambda: 4242)
    (workdir / ".rpp-write-probe-w3-4242").mkdir()
    with pytest.raises(SharedStorageError, match="w3 cannot write into the session work folder"):
        check_shared_storage(workdir, host="w3")
