"""Is the session's work folder really shared with this worker? One check, for the start of a task.

On a CeleryExecutor deployment consecutive tasks of one night run on different machines and hand
each other a path (the session work folder under ``RPP_DATA_ROOT``). That works only when every
worker, the DAG processor and the watcher see the same shared storage at the same path
(docs/airflow.md, "Shared storage"). A worker that does not would fail somewhere inside a stage
with a missing-file traceback; `check_shared_storage` fails it first, naming the worker, the
folder and what to fix.

Called by the session lifecycle (or a DAG task) before anything reads the work folder::

    from rpp_tasks.ops.shared_storage import check_shared_storage
    check_shared_storage(prev["workdir"])

Standard library only; never imports Airflow.
"""

from __future__ import annotations

import os
from pathlib import Path

from rpp_tasks.exceptions import RppError

__all__ = ["SharedStorageError", "check_shared_storage"]


class SharedStorageError(RppError):
    """This worker cannot use the session work folder that an earlier task of the run wrote."""


def _hint() -> str:
    root = os.environ.get("RPP_DATA_ROOT")
    where = f"RPP_DATA_ROOT={root}" if root else "RPP_DATA_ROOT (unset here: the repository root)"
    return (
        f"{where} must be the same shared storage, mounted at the same path, on every worker, "
        "the DAG processor and the watcher (docs/airflow.md, 'Shared storage')"
    )


def check_shared_storage(
    workdir: str | os.PathLike,
    *,
    require: tuple[str, ...] = ("manifest.json",),
    host: str | None = None,
) -> Path:
    """
    Check that this process sees and can write the session work folder an earlier task wrote.

    Parameters
    ----------
    workdir : path
        The session work folder, as the previous task handed it over (absolute).
    require : tuple of str
        Files an earlier task wrote there (default: the session manifest written by validate).
    host : str, optional
        Name of this worker in the message (default: the host name it records on task instances).

    Returns
    -------
    workdir : Path

    Raises
    ------
    SharedStorageError
        The folder is not visible here, lacks the files an earlier task wrote (another disk
        mounted at the same path), or cannot be written; the message names the worker, the
        folder and the setting to fix.
    """
    from rpp_tasks.ops.deploy import worker_hostname

    path = Path(workdir)
    host = host or worker_hostname()
    if not path.is_absolute():
        raise SharedStorageError(
            f"work folder {workdir!s} handed to worker {host} is not an absolute path"
        )
    if not path.is_dir():
        nearest = next((p for p in path.parents if p.is_dir()), Path("/"))
        root = os.environ.get("RPP_DATA_ROOT")
        elsewhere = ""
        if root and not path.is_relative_to(root):
            elsewhere = f" (it is not under this worker's RPP_DATA_ROOT {root})"
        raise SharedStorageError(
            f"worker {host} cannot see the session work folder {path}{elsewhere}; the nearest "
            f"folder that exists here is {nearest}. {_hint()}"
        )
    missing = [name for name in require if not (path / name).is_file()]
    if missing:
        raise SharedStorageError(
            f"worker {host} sees {path} but not {', '.join(missing)} that an earlier task wrote "
            f"there: a different disk is mounted at that path on this worker. {_hint()}"
        )
    probe = path / f".rpp-write-probe-{host}-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SharedStorageError(
            f"worker {host} cannot write into the session work folder {path}: "
            f"{exc.strerror or exc} (the shared storage must be writable for the user the "
            f"workers run as, uid {os.getuid()})"
        ) from None
    return path
