"""Session ids, DAG run ids and run-conf checks: the names a session is known by, made safe.

A session id names a work folder and is part of an Airflow run id, and it comes from untrusted
places (the watcher's folder names, a run conf typed in the UI, the CLI). `validate_session_id`
refuses separators, ``..``, control characters and over-long ids; `resolve_session_dir` keeps a
run conf's folder inside the observatory's incoming folder; `check_run_conf` does both for a DAG
run. Whether a folder is ready to read is `rpp_tasks.ops.readiness`.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

__all__ = [
    "MAX_SESSION_ID_CHARS",
    "session_id_for",
    "run_id_for",
    "validate_session_id",
    "resolve_session_dir",
    "check_run_conf",
]

#: Longest session id (it names a work folder and is part of the DAG run id, at most 250 chars).
MAX_SESSION_ID_CHARS = 200
_RUN_ID_OK = re.compile(r"[^A-Za-z0-9_.~:+-]+")  # Airflow's default allowed_run_id_pattern
_SESSION_ID_RE = re.compile(r"[A-Za-z0-9_.~:+-]+")
_REVISION_SUFFIX = re.compile(r"__r\d+$")  # reserved: ``session__<id>__r2`` is revision 2


def session_id_for(relpath: str) -> str:
    """
    Deterministic session id of a session folder.

    Parameters
    ----------
    relpath : str
        Folder path relative to the incoming folder, e.g. ``"2024-07-30"``.

    Returns
    -------
    session_id : str
        ``relpath`` itself when it is a valid id (`validate_session_id`: only the characters
        Airflow accepts in a run id, ``[A-Za-z0-9_.~:+-]``, no ``..``, no leading ``.``, at most
        `MAX_SESSION_ID_CHARS`, not ending like a revision ``__r<N>``); otherwise a slug plus 8
        hex digits of its SHA-1, so two folders never share an id
        (``"SS 433/night 1"`` -> ``"SS_433_night_1-3f2a9c1e"``).
    """
    rel = str(relpath).replace(os.sep, "/").strip("/")
    if not rel:
        raise ValueError("session folder path is empty")
    slug = _RUN_ID_OK.sub("_", rel.replace("/", "_")).strip("_.")
    slug = re.sub(r"\.{2,}", ".", slug)
    if slug == rel and len(slug) <= MAX_SESSION_ID_CHARS and not _REVISION_SUFFIX.search(slug):
        return slug
    digest = hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8]
    return f"{(slug or 'session')[: MAX_SESSION_ID_CHARS - 10]}-{digest}"


def run_id_for(session_id: str, revision: int = 1) -> str:
    """DAG run id of a session: ``session__<session_id>`` for its first revision, then
    ``session__<session_id>__r<revision>`` (files changed after a run; see `rpp_tasks.ops.watch`).
    """
    revision = int(revision)
    if revision < 1:
        raise ValueError(f"revision must be >= 1, got {revision}")
    return f"session__{session_id}" if revision == 1 else f"session__{session_id}__r{revision}"


def _show(text: str, n: int = 60) -> str:
    """``repr`` of a (possibly hostile) value, shortened: control characters stay escaped."""
    r = repr(text)
    return r if len(r) <= n else r[: n - 5] + "...'"


def _control_char(text: str) -> int | None:
    for i, c in enumerate(text):
        if ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u2028\u2029":
            return i
    return None


def validate_session_id(text) -> str:
    """
    Check a session id that comes from outside (run conf, command line, state file).

    A session id names the session's work folder (``<paths.work>/<session_id>/``, which a run
    rebuilds) and is part of the DAG run id, so it must be one plain, portable folder name.

    Parameters
    ----------
    text : str

    Returns
    -------
    session_id : str
        ``text`` unchanged.

    Raises
    ------
    ValueError
        Saying what is wrong: not a string, empty, longer than `MAX_SESSION_ID_CHARS`, a NUL or
        other control character, a path separator (``/``, ``\\``), ``..``, a leading ``.``,
        a character outside ``[A-Za-z0-9_.~:+-]``, or the reserved revision ending ``__r<N>``.
    """
    if not isinstance(text, str):
        raise ValueError(f"session_id must be a string, got {type(text).__name__}")
    hint = " (leave session_id empty to derive it from the session folder)"
    if not text:
        raise ValueError("session_id is empty" + hint)
    if len(text) > MAX_SESSION_ID_CHARS:
        raise ValueError(
            f"session_id {_show(text)} is {len(text)} characters long, more than "
            f"{MAX_SESSION_ID_CHARS}" + hint
        )
    i = _control_char(text)
    if i is not None:
        raise ValueError(
            f"session_id {_show(text)} contains a control character ({text[i]!r} at "
            f"position {i})" + hint
        )
    if "/" in text or "\\" in text or os.sep in text:
        raise ValueError(f"session_id {_show(text)} contains a path separator" + hint)
    if ".." in text:
        raise ValueError(f"session_id {_show(text)} contains '..'" + hint)
    if text.startswith("."):
        raise ValueError(f"session_id {_show(text)} starts with '.' (a hidden folder)" + hint)
    if not _SESSION_ID_RE.fullmatch(text):
        bad = sorted({c for c in text if not _SESSION_ID_RE.fullmatch(c)})
        raise ValueError(
            f"session_id {_show(text)} contains {''.join(bad)!r}: use only letters, digits and "
            "_ . ~ : + - (it names the work folder and the DAG run id)" + hint
        )
    if _REVISION_SUFFIX.search(text):
        raise ValueError(
            f"session_id {_show(text)} ends like a revision ('__r<N>'), which is reserved for "
            "re-runs (run id session__<id>__r2)" + hint
        )
    return text


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def resolve_session_dir(obs, raw) -> Path:
    """
    The raw folder of a session from a run's ``session_dir``, checked.

    Rule: a **relative** ``session_dir`` is taken relative to the observatory's incoming folder
    (``paths.incoming``) and must resolve (``..`` and symbolic links followed) to a folder
    *inside* it. An **absolute** path is an operator's explicit choice and may be anywhere
    (the watcher always sends absolute paths inside the incoming folder). In both cases the
    folder must exist, must not be the incoming folder itself, and must not overlap the
    observatory's work or products folders (raw files and products never share a folder).

    Parameters
    ----------
    obs : `~rpp_tasks.config.ObservatoryConfig`
    raw : str or path-like
        The ``session_dir`` value of the run conf.

    Returns
    -------
    path : `~pathlib.Path`
        The resolved (absolute, symlink-free) folder.

    Raises
    ------
    ValueError
        Saying what to do.
    """
    text = "" if raw is None else os.fspath(raw) if isinstance(raw, os.PathLike) else raw
    if not isinstance(text, str):
        raise ValueError(f"session_dir must be a string, got {type(raw).__name__}")
    if not text.strip():
        raise ValueError(
            "no session_dir in the run conf: trigger with "
            '{"session_dir": "<folder with the night\'s frames>"}'
        )
    if text != text.strip():
        raise ValueError(f"session_dir {_show(text)} has leading or trailing white space")
    i = _control_char(text)
    if i is not None:
        raise ValueError(
            f"session_dir {_show(text)} contains a control character ({text[i]!r} at position {i})"
        )
    if len(text) > 4096:
        raise ValueError(f"session_dir is {len(text)} characters long (at most 4096)")
    incoming = Path(obs.resolve_path("incoming")).resolve()
    given = Path(text).expanduser()
    target = given.resolve() if given.is_absolute() else (incoming / given).resolve()
    if target == incoming:
        raise ValueError(
            f"session_dir {_show(text)} is the incoming folder {incoming} itself: give the "
            "sub-folder of one session (night)"
        )
    if not given.is_absolute() and incoming not in target.parents:
        raise ValueError(
            f"session_dir {_show(text)} resolves to {target}, outside the incoming folder "
            f"{incoming}: give a sub-folder of it, or an absolute path"
        )
    for kind in ("work", "products", "master_library"):
        try:
            other = Path(obs.resolve_path(kind)).resolve()
        except (KeyError, AttributeError, ValueError):
            continue
        if _overlaps(target, other):
            raise ValueError(
                f"session_dir {target} overlaps the observatory's {kind} folder {other}: a "
                "session folder holds raw frames only"
            )
    if not target.is_dir():
        what = "is not a folder" if target.exists() else "does not exist"
        raise ValueError(f"session folder {target} {what}")
    return target


def check_run_conf(obs, conf) -> tuple[Path, str | None]:
    """
    Check a DAG run's conf before anything is written: the one call of the DAG's validate step.

    Parameters
    ----------
    obs : `~rpp_tasks.config.ObservatoryConfig`
    conf : mapping
        ``observatory`` (optional, must be ``obs.name``), ``session_dir`` (`resolve_session_dir`),
        ``session_id`` (optional, `validate_session_id`), ``revision`` (optional, int >= 1).

    Returns
    -------
    raw_dir, session_id : `~pathlib.Path`, str or None
        ``session_id`` None means: derive it from the folder (``session_id_for``).

    Raises
    ------
    ValueError
        The first problem found, with what to do.
    """
    observatory = conf.get("observatory")
    if observatory not in (None, "", obs.name):
        raise ValueError(
            f"run conf is for observatory {_show(str(observatory))}, this DAG reduces {obs.name!r}"
        )
    revision = conf.get("revision")
    if revision is not None and (
        isinstance(revision, bool) or not isinstance(revision, int) or revision < 1
    ):
        raise ValueError(f"revision must be an integer >= 1, got {_show(str(revision))}")
    raw_dir = resolve_session_dir(obs, conf.get("session_dir"))
    sid = conf.get("session_id")
    return raw_dir, (validate_session_id(sid) if sid not in (None, "") else None)
