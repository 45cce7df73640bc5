"""The bad-input corpus (issue 12, item 8): 100 crafted bad or odd files in one session with a good
synthetic night, reduced by `reduce_session`; every file ends with the expected outcome and reason,
the good frames are reduced, and no raw byte changes."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from rpp_tasks.config import find_config
from rpp_tasks.session import pipeline
from rpp_tasks.session.workdir import Session
from rpp_tasks.sim import badfiles, synthetic

REPO = Path(__file__).resolve().parents[2]


def _checksums(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture(scope="module")
def corpus_night(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    raw = root / "2025-01-15"
    good = synthetic.write_synthetic_session(
        raw,
        truth_folder=root / "truth",
        n_science=3,
        n_bias=3,
        n_dark=2,
        n_flat=3,
        shape=(256, 256),
        seed=3,
    )
    cases = badfiles.write_bad_corpus(
        raw,
        science=good["science"][0],
        bias=good["bias"][0],
        dark=good["dark"][0],
        flat=good["flat"][0],
    )
    before = _checksums(raw)
    obs = find_config("demo", REPO / "config")
    summary = pipeline.reduce_session(raw, obs, work_root=root / "work", workers=2)
    return raw, good, cases, before, summary


def test_corpus_is_large_and_covers_every_outcome(corpus_night):
    _, _, cases, _, _ = corpus_night
    assert len(cases) >= 60
    assert len({c.name for c in cases}) == len(cases)
    kinds = Counter(c.expect for c in cases)
    assert set(kinds) == set(badfiles.EXPECTATIONS), kinds


def test_every_corpus_file_gets_its_outcome_and_reason(corpus_night):
    raw, good, cases, before, summary = corpus_night
    session = Session.load(summary["workdir"])
    manifest = session.read_json("manifest.json")
    files = {Path(f["path"]).relative_to(raw).as_posix(): f for f in manifest["files"]}
    frames = {f["raw_path"]: f for f in summary["frames"]}
    masters = summary["masters"]
    used = set()
    for entry in [masters["bias"], masters["dark"], *masters["flat"].values()]:
        used.update((entry or {}).get("inputs", []))
    left_out = {r["path"]: r["reason"] for r in masters["rejected"]}
    rejected_json = session.read_json("rejected.json")

    problems = []
    for c in cases:
        path = str(raw / c.name)
        f = files.get(c.name)
        if f is None:
            problems.append(f"{c.name}: not in the plan")
            continue
        said = " | ".join([f["reason"], *f["warnings"]])
        if c.expect in ("reduced", "frame_rejected"):
            s = frames.get(path)
            if f["outcome"] != "science" or s is None:
                problems.append(f"{c.name}: {f['outcome']} ({f['reason']}), expected science")
                continue
            if c.expect == "reduced":
                if s["status"] != "ok":
                    problems.append(
                        f"{c.name}: {s['status']} at {s.get('failed_stage')}: {s.get('reason')}"
                    )
                if c.band is not None and s.get("band") != c.band:
                    problems.append(f"{c.name}: band {s.get('band')!r}, expected {c.band!r}")
                if c.reason is not None and c.reason not in said:
                    problems.append(f"{c.name}: {said!r} lacks {c.reason!r}")
            elif s["status"] == "ok" or c.reason not in str(s.get("reason")):
                problems.append(
                    f"{c.name}: {s['status']} ({s.get('reason')}), expected {c.reason!r}"
                )
        elif c.expect in ("rejected", "ignored"):
            if f["outcome"] != c.expect or c.reason not in f["reason"]:
                problems.append(
                    f"{c.name}: {f['outcome']} ({f['reason']}), expected {c.expect}: {c.reason!r}"
                )
            if (
                c.expect == "rejected"
                and rejected_json.get(f["stem"], {}).get("reason") != f["reason"]
            ):
                problems.append(f"{c.name}: not in rejected.json under {f['stem']}")
        else:
            if f["outcome"] != c.kind:
                problems.append(f"{c.name}: {f['outcome']} ({f['reason']}), expected {c.kind}")
            elif c.expect == "calibration_used":
                if path not in used:
                    problems.append(f"{c.name}: not used in its master ({left_out.get(path)})")
                if c.reason not in said:
                    problems.append(f"{c.name}: {said!r} lacks {c.reason!r}")
            elif c.reason not in str(left_out.get(path)):
                problems.append(f"{c.name}: left out {left_out.get(path)!r}, expected {c.reason!r}")
    assert not problems, "\n".join(problems)


def test_every_file_of_the_folder_has_an_outcome_and_good_frames_are_reduced(corpus_night):
    raw, good, cases, before, summary = corpus_night
    manifest = Session.load(summary["workdir"]).read_json("manifest.json")
    planned = {Path(f["path"]).relative_to(raw).as_posix() for f in manifest["files"]}
    on_disk = {
        p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file() or p.is_symlink()
    }
    assert planned == on_disk
    assert all(f["reason"] for f in manifest["files"])
    by_raw = {f["raw_path"]: f for f in summary["frames"]}
    for p in good["science"]:
        assert by_raw[str(p)]["status"] == "ok", by_raw[str(p)]
    masters = summary["masters"]
    assert {str(p) for p in good["bias"]} <= set(masters["bias"]["inputs"])
    assert {str(p) for p in good["flat"]} <= set(masters["flat"]["V"]["inputs"])
    # stems are unique: every science frame has its own folder
    stems = [f["frame"] for f in summary["frames"]]
    assert len(stems) == len(set(stems))
    assert summary["n_ok"] >= 50


def test_no_raw_byte_changed(corpus_night):
    raw, _, _, before, _ = corpus_night
    assert _checksums(raw) == before
