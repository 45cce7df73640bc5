"""A session: one night's frames of one observatory, its work folder and its manifest.

The work folder layout is documented in ``docs/ARCHITECTURE.md``. Tasks hand each other the
session folder (a string); everything else is read from it. Writing is atomic (temporary file +
``os.replace``) so a task killed half-way never leaves a truncated JSON behind.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rpp_tasks.jsonsafe import json_safe

__all__ = ["Session", "session_id_for", "write_json_atomic", "read_json"]

log = logging.getLogger(__name__)


def session_id_for(
    raw_dir: str | os.PathLike, incoming_root: str | os.PathLike | None = None
) -> str:
    """Deterministic session id of a session folder: the watcher's id
    (`rpp_tasks.ops.session_ids.session_id_for`) of its path relative to the incoming root, or of
    its name when it is outside it. ``rpp reduce``
    and the DAG run the watcher triggers therefore share one work folder for the same night.
    """
    from rpp_tasks.ops.readiness import session_id_for as _watch_session_id

    raw_dir = Path(raw_dir).resolve()
    rel = None
    if incoming_root is not None:
        try:
            rel = raw_dir.relative_to(Path(incoming_root).resolve())
        except ValueError:
            rel = None
    return _watch_session_id(rel.as_posix() if rel is not None and rel.parts else raw_dir.name)


def _umask() -> int:
    """The process umask, read without changing it (Linux); else set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented, strict JSON (`rpp_tasks.jsonsafe.json_safe`) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(data), indent=2, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; products share the FITS mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    path = Path(path)
    if not path.is_file():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Session:
    """Handle on a session work folder. Cheap to create; holds no data.

    Parameters
    ----------
    workdir : Path
        ``<work_root>/<session_id>``.
    observatory : str
    session_id : str
    raw_dir : Path
        The synced folder with the raw frames (read-only for us).
    """

    workdir: Path
    observatory: str
    session_id: str
    raw_dir: Path

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        raw_dir,
        *,
        observatory: str,
        work_root,
        session_id: str | None = None,
        incoming_root=None,
    ) -> Session:
        raw_dir = Path(raw_dir).resolve()
        sid = session_id or session_id_for(raw_dir, incoming_root)
        workdir = Path(work_root).resolve() / sid
        workdir.mkdir(parents=True, exist_ok=True)
        s = cls(workdir=workdir, observatory=observatory, session_id=sid, raw_dir=raw_dir)
        write_json_atomic(
            workdir / "session.json",
            {
                "observatory": observatory,
                "session_id": sid,
                "raw_dir": str(raw_dir),
                "workdir": str(workdir),
            },
        )
        return s

    @classmethod
    def load(cls, workdir) -> Session:
        """Re-open a session from its work folder (what Airflow tasks receive)."""
        workdir = Path(workdir)
        info = read_json(workdir / "session.json")
        if info is None:
            raise FileNotFoundError(f"{workdir}: not a session work folder (no session.json)")
        return cls(
            workdir=workdir,
            observatory=info["observatory"],
            session_id=info["session_id"],
            raw_dir=Path(info["raw_dir"]),
        )

    # ------------------------------------------------------------------ paths and files
    def path(self, *parts: str) -> Path:
        return self.workdir.joinpath(*parts)

    def frame_dir(self, stem: str) -> Path:
        d = self.workdir / "frames" / stem
        d.mkdir(parents=True, exist_ok=True)
        return d

    def masters_dir(self) -> Path:
        d = self.workdir / "masters"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def write_json(self, name: str, data: Any) -> Path:
        return write_json_atomic(self.workdir / name, data)

    def read_json(self, name: str, default: Any = None) -> Any:
        return read_json(self.workdir / name, default)

    def frame_stems(self) -> list[str]:
        """Science frames that are still in play (not rejected), in manifest order."""
        manifest = self.read_json("manifest.json", {})
        rejected = set(self.rejected())
        return [f["stem"] for f in manifest.get("science", []) if f["stem"] not in rejected]

    def rejected(self) -> dict[str, dict]:
        """Frames that stopped, with reason and stage: files rejected while grouping the session
        (``rejected.json``) plus frames rejected by a stage (``frames/<stem>/rejected.json``)."""
        rej = dict(self.read_json("rejected.json", {}) or {})
        for p in sorted((self.workdir / "frames").glob("*/rejected.json")):
            rej[p.parent.name] = read_json(p)
        return rej

    def reject(self, stem: str, *, reason: str, stage: str, path: str | None = None) -> None:
        """Record that a frame stops here. Each frame writes its own file, so frames processed in
        parallel processes never race on a shared file."""
        write_json_atomic(
            self.frame_dir(stem) / "rejected.json", {"reason": reason, "stage": stage, "path": path}
        )
        log.warning("[%s] frame %s rejected at %s: %s", self.session_id, stem, stage, reason)

    def unreject(self, stem: str) -> None:
        """Forget a stage rejection (a re-run starts clean)."""
        (self.workdir / "frames" / stem / "rejected.json").unlink(missing_ok=True)
