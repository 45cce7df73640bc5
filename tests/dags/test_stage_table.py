"""The stage table: adding a stage is one entry and one function (docs/ARCHITECTURE.md
walk-through).

A toy stage is added after photometry; it runs through the session lifecycle (in one process as
``rpp reduce`` does, and task by task as the DAG does, on a chunk of the frames) and appears in the
DAG's task list.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from rpp_tasks.exceptions import ConfigError
from rpp_tasks.session import lifecycle
from rpp_tasks.session.table import IMAGING, Stage, StageTable, table_for
from rpp_tasks.session.workdir import write_json_atomic

REPO = Path(__file__).resolve().parents[2]


# ---- the walk-through: one function ...
def step_star_count(fw, obs) -> dict:
    """Toy stage: count the good stars of the catalogue, note it in the catalogue and a file."""
    n_good = int(np.sum(np.asarray(fw.catalog["quality"]).astype(str) == "good"))
    fw.catalog.meta["n_good_stars"] = n_good
    write_json_atomic(fw.outdir / "star_count.json", {"n_good": n_good})
    return {"n_good": n_good}


# ---- ... and one table entry
STAR_COUNT = Stage(
    "star_count",
    step_star_count,
    reads=("check", "catalog"),
    writes=("catalog",),
    heavy=False,
    doc="count the good stars",
)
TOY = IMAGING.with_stage(STAR_COUNT, after="photometry")


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    from rpp_tasks.sim.synthetic import write_synthetic_session

    raw = tmp_path_factory.mktemp("toy") / "incoming" / "2025-01-15"
    write_synthetic_session(
        raw,
        truth_folder=raw.parent.parent / "truth",
        n_science=2,
        n_bias=1,
        n_dark=1,
        n_flat=1,
        shape=(256, 256),
        seed=4,
    )
    return raw


@pytest.fixture(scope="module")
def obs():
    from rpp_tasks.config import find_config

    return find_config("demo", REPO / "config")


def test_toy_stage_runs_in_the_one_process_lifecycle(night, obs, tmp_path):
    summary, _ = lifecycle.reduce_session(
        night, obs, work_root=tmp_path, workers=1, table=TOY, report=False
    )
    assert summary.n_ok == 2
    for f in summary.frames:
        n_good = f.stages["star_count"]["n_good"]
        assert n_good > 10
        folder = Path(f.catalog).parent
        assert json.loads((folder / "star_count.json").read_text()) == {"n_good": n_good}
        from astropy.table import Table

        cat = Table.read(f.catalog, format="ascii.ecsv")
        assert cat.meta["n_good_stars"] == n_good  # later stages kept what it wrote
        assert n_good == int(np.sum(np.asarray(cat["quality"]).astype(str) == "good"))


def test_toy_stage_runs_task_by_task_on_a_chunk(night, obs, tmp_path):
    session = lifecycle.open_session(night, obs, work_root=tmp_path)
    stems = [f["stem"] for f in session.read_json("manifest.json")["science"]]
    for name in TOY.names:
        if name == "star_count":  # the scale-out case: this task handles one chunk of frames
            out = lifecycle.run_stage(session, obs, name, frames=stems[:1], table=TOY, workers=1)
            assert (out["n_frames"], out["n_ok"]) == (1, 1)
            continue
        lifecycle.run_stage(session, obs, name, table=TOY, workers=1)
    summary = lifecycle.summarise(session, obs)
    counted = [f.frame for f in summary.frames if "star_count" in f.stages]
    assert counted == stems[:1]
    assert (session.path("frames", stems[0], "star_count.json")).is_file()
    assert not (session.path("frames", stems[1], "star_count.json")).is_file()


def test_toy_stage_is_a_task_of_the_dag(obs):
    spec = importlib.util.spec_from_file_location(
        "rpp_reduction_toy", REPO / "dags/rpp_reduction.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dag = mod.build_reduction_dag(obs, table=TOY)
    assert dag.get_task("photometry").downstream_task_ids == {"star_count"}
    assert dag.get_task("star_count").downstream_task_ids == {"zero_point"}
    assert dag.get_task("star_count").pool != mod.HEAVY_POOL  # heavy=False
    assert dag.get_task("photometry").pool == mod.HEAVY_POOL
    assert [t for t in TOY.names if t in dag.task_ids] == list(TOY.names)


def test_table_checks_what_stages_read_and_write():
    with pytest.raises(ValueError, match="reads \\['sources'\\], which no earlier stage writes"):
        StageTable("bad", (Stage("a", "m:f", reads=("sources",)),), IMAGING.artefacts)
    with pytest.raises(ValueError, match="undeclared artefacts"):
        StageTable("bad", (Stage("a", "m:f", writes=("spectrum",)),), IMAGING.artefacts)
    with pytest.raises(ValueError, match="duplicate"):
        IMAGING.with_stage(STAR_COUNT, after="photometry").with_stage(STAR_COUNT, after="detect")
    with pytest.raises(ValueError, match="consecutive"):
        IMAGING.chain(("calibrate", "detect"))
    assert [s.name for s in IMAGING.chain(("background", "detect"))] == ["background", "detect"]
    # checkpoints are what a later stage reads: background and sources, never a product
    assert {a.name for a in IMAGING.artefacts.values() if not a.product} == {
        "raw",
        "background",
        "sources",
    }


def test_instrument_kind_picks_the_table(obs, monkeypatch, tmp_path):
    """A table registered for a kind is the DAG's; a kind without one keeps the imaging DAG's
    shape but its sessions are refused, never reduced with the imaging stages."""
    import dataclasses

    from rpp_tasks.session import table as table_module

    assert table_for(obs) is IMAGING
    spectro = dataclasses.replace(obs, instrument_kind="longslit")
    assert table_for(spectro) is table_module.LONGSLIT
    monkeypatch.delitem(table_module.TABLES, "longslit")
    assert table_for(spectro) is IMAGING
    with pytest.raises(ConfigError, match="instrument_kind.*stage table: imaging"):
        table_for(spectro, strict=True)
    with pytest.raises(ValueError, match="cannot be reduced"):
        lifecycle.open_from_conf({"session_dir": str(tmp_path)}, spectro)
    one = StageTable("longslit", (Stage("masters", "m:f", scope="session"),), IMAGING.artefacts)
    monkeypatch.setitem(table_module.TABLES, "longslit", one)
    assert table_for(spectro, strict=True) is one
    spec = importlib.util.spec_from_file_location(
        "rpp_reduction_kind", REPO / "dags/rpp_reduction.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.build_reduction_dag(spectro).task_ids == [
        "validate",
        "masters",
        "products",
        "archive",
        "notify",
    ]
