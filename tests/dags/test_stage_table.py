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
    """As the DAG runs it: the session stages once, then the frame stages per chunk."""
    session = lifecycle.open_session(night, obs, work_root=tmp_path)
    stems = [f["stem"] for f in session.read_json("manifest.json")["science"]]
    (frame_segment,) = [names for scope, names in TOY.segments() if scope == "frame"]
    assert TOY.segments() == (
        ("session", ("masters",)),
        ("frame", frame_segment),
        ("session", ("targets",)),  # the night's targets, once every catalogue is final
    )
    assert "star_count" in frame_segment and frame_segment[0] == "calibrate"
    lifecycle.run_stage(session, obs, "masters", table=TOY, workers=1)
    # the scale-out case: this task handles one chunk of frames (the first frame only)
    out = lifecycle.run_chunk(session, obs, frame_segment, stems[:1], table=TOY, workers=1)
    assert (out["chunk"], out["n_frames"], out["n_ok"]) == (stems[:1], 1, 1)
    summary = lifecycle.summarise(session, obs)
    counted = [f.frame for f in summary.frames if "star_count" in f.stages]
    assert counted == stems[:1]
    assert (session.path("frames", stems[0], "star_count.json")).is_file()
    assert not (session.path("frames", stems[1], "star_count.json")).is_file()
    merged = lifecycle.merge_stage_runs(TOY, {"masters": {"masters": {}}, "frames": [out]})
    assert merged["frames"]["n_chunks"] == 1 and merged["frames"]["n_ok"] == 1


def test_toy_stage_is_a_task_of_the_dag(obs):
    """A frame stage runs inside the mapped ``frames`` task; a session stage after the frame
    stages is a task of its own, between two mapped frame segments."""
    mod = _dag_module("rpp_reduction_toy")
    dag = mod.build_reduction_dag(obs, table=TOY)
    assert "star_count" in dag.doc_md  # listed under the frames task
    assert dag.get_task("frames").is_mapped and dag.get_task("frames").pool == mod.HEAVY_POOL
    night_stats = Stage("night_stats", "m:f", scope="session", heavy=False, doc="toy")
    split = TOY.with_stage(night_stats, after="star_count")
    assert [s for s, _ in split.segments()] == ["session", "frame", "session", "frame", "session"]
    dag = mod.build_reduction_dag(obs, table=split)
    assert dag.get_task("frames_calibrate").is_mapped
    assert dag.get_task("frames_zero_point").is_mapped
    assert dag.get_task("night_stats").upstream_task_ids == {"validate", "frames_calibrate"}
    assert dag.get_task("frames_zero_point").upstream_task_ids == {"validate", "night_stats"}
    assert dag.get_task("night_stats").pool != mod.HEAVY_POOL  # heavy=False
    assert dag.get_task("targets").upstream_task_ids == {"validate", "frames_zero_point"}
    assert dag.get_task("products").upstream_task_ids == {
        "validate", "masters", "frames_calibrate", "night_stats", "frames_zero_point", "targets",
    }  # fmt: skip


def _dag_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "dags/rpp_reduction.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _manifest_session(tmp_path, shapes):
    from rpp_tasks.session.workdir import Session

    session = Session.create(tmp_path / "raw", observatory="demo", work_root=tmp_path / "work")
    science = [
        {"stem": f"f{i:03d}", "path": f"/raw/f{i:03d}.fits", "shape": list(sh)}
        for i, sh in enumerate(shapes)
    ]
    session.write_json("manifest.json", {"science": science})
    session.write_json("rejected.json", {})
    return session


def test_plan_chunks_shares_the_night_out_by_pixels(obs, tmp_path):
    import dataclasses

    from rpp_tasks.config import SchedulingConfig

    def plan(session, **kw):
        o = dataclasses.replace(obs, scheduling=SchedulingConfig(**kw))
        return lifecycle.plan_chunks(session, o)

    night = _manifest_session(tmp_path / "a", [(2048, 2048)] * 24)
    every = [f"f{i:03d}" for i in range(24)]
    assert plan(night) == [every]  # 24 x 4.19 Mpx = 101 Mpx, under the 256 Mpx largest chunk
    chunks = plan(night, chunk_megapixels=64)  # 101 Mpx over 64 Mpx: 2 chunks of 12
    assert [len(c) for c in chunks] == [12, 12]
    assert [s for c in chunks for s in c] == every  # manifest order
    # whole waves over the lanes (chunk tasks the deployment runs at once), one frame at least
    o = dataclasses.replace(obs, scheduling=SchedulingConfig())
    assert [len(c) for c in lifecycle.plan_chunks(night, o, lanes=2)] == [12, 12]
    assert [len(c) for c in lifecycle.plan_chunks(night, o, lanes=5)] == [5, 5, 4, 5, 5]
    assert len(lifecycle.plan_chunks(night, o, lanes=100)) == 24
    o64 = dataclasses.replace(obs, scheduling=SchedulingConfig(chunk_megapixels=40))
    # 101 Mpx / 40: 3 chunks by size -> 4 on 2 lanes (2 waves of 2), 3 on 3 lanes (1 wave)
    assert [len(c) for c in lifecycle.plan_chunks(night, o64, lanes=2)] == [6, 6, 6, 6]
    assert [len(c) for c in lifecycle.plan_chunks(night, o64, lanes=3)] == [8, 8, 8]
    eleven = [len(c) for c in plan(night, chunk_megapixels=10)]  # 101 Mpx / 10: 11 chunks
    assert len(eleven) == 11 and set(eleven) == {2, 3} and sum(eleven) == 24
    assert [len(c) for c in plan(night, chunk_frames=5)] == [5, 5, 4, 5, 5]  # at most 5, even
    assert plan(night, chunk_megapixels=1e4) == [[f"f{i:03d}" for i in range(24)]]
    # frames of different sizes: the chunks get about the same pixels, not the same frames
    mixed = _manifest_session(tmp_path / "b", [(4096, 4096)] * 4 + [(1024, 1024)] * 16)
    sizes = [len(c) for c in plan(mixed, chunk_megapixels=40)]
    # 4 x 16.8 + 16 x 1.05 = 84 Mpx over 40: 3 chunks of ~28 Mpx; by pixel mid-points the
    # chunks get 33.6, 16.8 and 33.6 Mpx (a 16.8 Mpx frame cannot be split)
    assert sizes == [2, 1, 17], sizes
    # a frame rejected before chunking is left out; no frames: no chunk
    write_json_atomic(night.path("frames", "f000", "rejected.json"), {"reason": "x", "stage": "y"})
    assert "f000" not in {s for c in plan(night) for s in c}
    assert plan(_manifest_session(tmp_path / "c", []), chunk_frames=3) == []
    assert lifecycle.chunk_label(["a", "b", "c"]) == "a .. c (3 frames)"


def test_deployment_lanes_are_the_heavy_slots_capped_by_the_dag(obs):
    """The lanes validate plans chunks for: the rpp_heavy pool's slots as the deployment sets them
    in every component's environment, capped by the DAG's max_active_tasks; 1 when unknown."""
    import dataclasses

    from rpp_tasks.config import SchedulingConfig

    o = dataclasses.replace(obs, scheduling=SchedulingConfig(max_active_tasks=4))
    assert lifecycle.deployment_lanes(o, {}) == 1  # rpp reduce, dag.test: no deployment
    assert lifecycle.deployment_lanes(o, {"RPP_HEAVY_POOL_SLOTS": "2"}) == 2
    assert lifecycle.deployment_lanes(o, {"RPP_HEAVY_POOL_SLOTS": "16"}) == 4  # max_active_tasks
    assert lifecycle.deployment_lanes(o, {"RPP_HEAVY_POOL_SLOTS": "x"}) == 1


def test_scheduling_section_is_validated(tmp_path):
    from rpp_tasks.config import config_from_dict

    base = {"observatory": "demo"}
    for key, value, expected in (
        ("chunk_megapixels", 0, "megapixels per chunk"),
        ("chunk_frames", 0, "an integer >= 1 or null"),
        ("max_active_tasks", 0, "from 1 to 1024"),
        ("max_active_runs", 2000, "from 1 to 1024"),
        ("retry_delay_s", -1, "seconds from 0 to 3600"),
        ("retries", 11, "from 0 to 10"),
        ("max_active_tasks", "many", "an integer"),
    ):
        with pytest.raises(ConfigError, match=f"scheduling.{key}.*{expected}"):
            config_from_dict({**base, "scheduling": {key: value}}, source="demo.yaml")


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
    mod = _dag_module("rpp_reduction_kind")
    assert mod.build_reduction_dag(spectro).task_ids == [
        "validate",
        "masters",
        "products",
        "archive",
        "notify",
    ]
