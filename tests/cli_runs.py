"""`rpp reduce` run as a user runs it (a subprocess of the project's CLI), for the tests that
compare its products with the DAG's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rpp_reduce(env: dict, night: Path, observatory: str, work: Path, *, timeout=1200):
    """Run ``rpp reduce NIGHT -o OBSERVATORY --work WORK`` and check it exited 0.

    Returns the completed process (its ``stdout`` holds the summary lines).
    """
    res = subprocess.run(
        [sys.executable, "-m", "rpp_tasks.ops.cli", "-q", "reduce", str(night), "-o", observatory]
        + ["--work", str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def tree_files(root: Path) -> set[str]:
    """The files under ``root`` (POSIX paths relative to it), hidden files left out."""
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
