"""A session with files but no science frame reduced is a failed night (issue 12, item 1): the
library raises `NothingReduced` naming every file and its reason, the DAG's validate/products
tasks fail (not skip) and the failure callback records it and alerts the operators, ``rpp reduce``
exits non-zero with the reasons. Only an empty folder is a skip."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits

from rpp_tasks.config import find_config
from rpp_tasks.exceptions import NothingReduced
from rpp_tasks.ops.cli import main as rpp_main
from rpp_tasks.session import lifecycle
from rpp_tasks.sim import synthetic

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path))
    return tmp_path / "data"


@pytest.fixture(scope="module")
def dag_module():
    spec = importlib.util.spec_from_file_location(
        "rpp_reduction_outcome_test", REPO / "dags" / "rpp_reduction.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bad_only_folder(folder: Path) -> Path:
    """Files, none of them a science frame: text, an empty file, a corrupt gzip."""
    folder.mkdir(parents=True)
    (folder / "notes.fits").write_text("this is not a FITS file\n")
    (folder / "zero_length.fits").write_bytes(b"")
    (folder / "corrupt.fits.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 40)
    return folder


def _constant_frames_folder(folder: Path, tmp: Path) -> Path:
    """Two science frames that pass the header checks and are rejected by the frame checks
    (constant images), plus their calibration frames."""
    paths = synthetic.write_synthetic_session(
        folder, truth_folder=tmp / "truth", n_science=2, n_bias=3, n_dark=0, n_flat=0,
        shape=(128, 128), seed=5,
    )  # fmt: skip
    for p in paths["science"]:
        with fits.open(p) as hdul:
            header = hdul[0].header.copy()
            shape = hdul[0].data.shape
        fits.PrimaryHDU(np.full(shape, 1000, np.uint16), header).writeto(p, overwrite=True)
    (folder / "notes.fits").write_text("this is not a FITS file\n")
    return folder


def _validate(dag_module, obs):
    return dag_module.build_reduction_dag(obs).get_task("validate").python_callable


def test_no_science_frame_fails_validate_naming_every_file(data_root, dag_module):
    from airflow.sdk.exceptions import AirflowFailException

    obs = find_config("demo")
    raw = _bad_only_folder(obs.resolve_path("incoming") / "2025-02-01")
    with pytest.raises(NothingReduced) as info:
        lifecycle.open_from_conf({"session_dir": str(raw)}, obs)
    exc = info.value
    assert not exc.empty and exc.when == "validate"
    assert sorted(Path(f["path"]).name for f in exc.files) == [
        "corrupt.fits.gz",
        "notes.fits",
        "zero_length.fits",
    ]
    assert all(f["outcome"] == "rejected" and f["reason"] for f in exc.files)
    for name in ("notes.fits", "zero_length.fits", "corrupt.fits.gz"):
        assert name in str(exc)
    # the summary lists every file with its reason (the report reads it)
    summary = json.loads((obs.resolve_path("work") / "2025-02-01/session_summary.json").read_text())
    assert {Path(f["path"]).name: f["outcome"] for f in summary["files"]} == {
        "corrupt.fits.gz": "rejected",
        "notes.fits": "rejected",
        "zero_length.fits": "rejected",
    }
    # the DAG task fails (it used to be skipped: no alert)
    with pytest.raises(AirflowFailException, match="no science frame among 3 files"):
        _validate(dag_module, obs)(params={"session_dir": str(raw)})


def test_empty_folder_stays_a_skip(data_root, dag_module):
    from airflow.sdk.exceptions import AirflowSkipException

    obs = find_config("demo")
    raw = obs.resolve_path("incoming") / "2025-02-02"
    raw.mkdir(parents=True)
    with pytest.raises(NothingReduced) as info:
        lifecycle.open_from_conf({"session_dir": str(raw)}, obs)
    assert info.value.empty
    with pytest.raises(AirflowSkipException, match="no file in the folder"):
        _validate(dag_module, obs)(params={"session_dir": str(raw)})


def test_failure_callback_records_the_reasons_and_alerts(data_root, dag_module, monkeypatch):
    """The DAG's failure callback gets the validate failure: failures.jsonl and the operators'
    alert carry the files and their reasons."""
    from airflow.sdk.exceptions import AirflowFailException

    obs = find_config("demo")
    raw = _bad_only_folder(obs.resolve_path("incoming") / "2025-02-03")
    try:
        _validate(dag_module, obs)(params={"session_dir": str(raw)})
    except AirflowFailException as exc:
        failure = exc
    calls = []
    monkeypatch.setitem(
        sys.modules,
        "rpp_tasks.outputs.notify",
        SimpleNamespace(notify_failure=lambda info, o, **kw: calls.append(info)),
    )
    dag = dag_module.build_reduction_dag(obs)
    ctx = {
        "ti": SimpleNamespace(dag_id=dag.dag_id, task_id="validate", run_id="session__x"),
        "dag_run": SimpleNamespace(conf={"session_dir": str(raw), "session_id": "2025-02-03"}),
        "exception": failure,
        "params": {},
    }
    dag.get_task("validate").on_failure_callback[0](ctx)
    line = json.loads((obs.resolve_path("work") / "failures.jsonl").read_text().splitlines()[-1])
    assert line["task_id"] == "validate" and "notes.fits" in line["error"]
    assert "zero_length.fits" in line["error"] and "AirflowFailException" in line["error"]
    assert calls and "corrupt.fits.gz" in calls[0]["error"]


def test_every_frame_rejected_fails_products_and_rpp_reduce(data_root, dag_module, capsys):
    """Science frames found but none reduced: the summary and report are written, then the
    products task fails and ``rpp reduce`` exits 1 with each frame's reason."""
    from airflow.sdk.exceptions import AirflowFailException

    obs = find_config("demo")
    raw = _constant_frames_folder(obs.resolve_path("incoming") / "2025-02-04", data_root)
    session = lifecycle.open_session(raw, obs)
    assert lifecycle.require_science(session)["n_science"] == 2
    lifecycle.run_stage(session, obs, list(lifecycle.table_for(obs).names), workers=1)
    products = dag_module.build_reduction_dag(obs).get_task("products").python_callable
    with pytest.raises(AirflowFailException, match=r"0 of 2 science frames reduced") as info:
        products([{"workdir": str(session.workdir)}], {}, run_id="r1")
    assert "constant image" in str(info.value)
    summary = json.loads((session.workdir / "session_summary.json").read_text())
    assert summary["n_ok"] == 0 and summary["n_science"] == 2
    # the report lists every file with its outcome and reason
    page = (session.workdir / "report" / "report.html").read_text()
    section = page[page.index("Every file of the session") :]
    assert "6 files</b>: 3 rejected, 3 calibration used" in section
    for f in summary["files"]:
        assert f"<code>{Path(f['path']).name}</code>" in section
    assert "constant image" in section and "calibrate: " in section

    code = rpp_main(["-q", "reduce", str(raw), "-o", "demo", "--work", str(data_root / "cli")])
    assert code == 1
    err = capsys.readouterr().err
    assert "0 of 2 science frames reduced" in err and "constant image" in err


def test_rpp_reduce_of_files_without_science_exits_1(data_root, capsys):
    raw = _bad_only_folder(data_root / "elsewhere" / "n1")
    code = rpp_main(["-q", "reduce", str(raw), "-o", "demo", "--work", str(data_root / "w")])
    assert code == 1
    err = capsys.readouterr().err
    assert "no science frame among 3 files" in err and "notes.fits: rejected" in err
    empty = data_root / "elsewhere" / "empty"
    empty.mkdir()
    assert rpp_main(["-q", "reduce", str(empty), "-o", "demo", "--work", str(data_root / "w")]) == 0
    assert "no file in the folder" in capsys.readouterr().err


def test_file_outcomes_name_calibration_frames_dropped_from_their_master():
    from rpp_tasks.outputs.report_files import files_table_html
    from rpp_tasks.session.summary import SessionSummary, file_outcomes

    manifest = {
        "files": [
            {"path": "/n/bias1.fits", "outcome": "bias", "reason": "IMAGETYP"},
            {"path": "/n/bias2.fits", "outcome": "bias", "reason": "IMAGETYP"},
            {"path": "/n/flat_R.fits", "outcome": "flat", "reason": "IMAGETYP"},
        ]
    }
    masters = {
        "bias": {"inputs": ["/n/bias1.fits"]},
        "rejected": [{"path": "/n/bias2.fits", "reason": "all-NaN frame"}],
    }
    out = {o.path: (o.outcome, o.reason) for o in file_outcomes(manifest, [], masters)}
    assert out == {
        "/n/bias1.fits": ("calibration used", None),
        "/n/bias2.fits": ("calibration rejected", "all-NaN frame"),
        "/n/flat_R.fits": ("not used", "not combined into a master"),
    }
    summary = SessionSummary(
        observatory="demo",
        session_id="n",
        raw_dir="/n",
        files=file_outcomes(manifest, [], masters),
    )
    page = files_table_html(summary)
    # problems first: the dropped bias before the used one
    assert page.index("bias2.fits") < page.index("flat_R.fits") < page.index("bias1.fits")
    assert "masters: all-NaN frame" in page
