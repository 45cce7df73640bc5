"""Exceptions shared by every stage of ``rpp_tasks``.

* `ConfigError`   -- an observatory YAML is invalid (names the file, the key and what was expected).
* `FrameRejected` -- one frame cannot go further; the caller records the reason and the other
  frames go on.
* `NothingReduced` -- a session with files but no science frame reduced: a failed night (every
  file with its outcome and reason in the message), or an empty folder (``empty``).
* `RppError`      -- base class.
"""

from __future__ import annotations

__all__ = ["RppError", "ConfigError", "FrameRejected", "NothingReduced"]


class RppError(Exception):
    """Base class of all errors raised on purpose by ``rpp_tasks``."""


class ConfigError(RppError):
    """Invalid observatory configuration.

    Parameters
    ----------
    source : str
        The YAML file (or another origin) the value came from.
    key : str
        Dotted key path, e.g. ``camera.gain_e_per_adu``.
    expected : str
        What was expected, in words an operator understands.
    got : object, optional
        The offending value (repr'd in the message).
    """

    def __init__(self, source, key, expected, got=None):
        self.source = str(source)
        self.key = key
        self.expected = expected
        self.got = got
        msg = f"{self.source}: key '{key}': expected {expected}"
        if got is not None:
            msg += f", got {got!r}"
        super().__init__(msg)


class FrameRejected(RppError):
    """A frame that must not go further.

    Parameters
    ----------
    reason : str
        Short human-readable reason, e.g. ``"missing EXPTIME"``.
    path : str, optional
        The raw file concerned; included in the message.
    stage : str, optional
        The stage that rejected it; prefixed to the message (``"[calibrate] ..."``).
    """

    def __init__(self, reason, *, path=None, stage=None):
        self.reason = reason
        self.path = None if path is None else str(path)
        self.stage = stage
        msg = reason
        if stage:
            msg = f"[{stage}] {msg}"
        if self.path:
            msg = f"{self.path}: {msg}"
        super().__init__(msg)


class NothingReduced(RppError):
    """A session of which no science frame was (or can be) reduced.

    A folder with files but no reduced science frame is a failed night, not an empty one: the
    DAG fails (the operators are alerted) and ``rpp reduce`` exits non-zero, with every file's
    outcome and reason in the message. A folder without any file is ``empty`` (nothing to do: a
    skipped run).

    Parameters
    ----------
    session_id : str
    files : sequence of dict
        Every file of the session: ``path``, ``outcome``, ``reason``.
    n_science : int
        Science frames found (0 when none was recognised).
    when : str
        The step that found it (``validate``, ``products``).
    """

    #: Files named in the message (all of them are in ``files`` and ``session_summary.json``).
    MAX_LISTED = 25

    def __init__(self, session_id, files=(), *, n_science=0, when="validate"):
        self.session_id = str(session_id)
        self.files = [dict(f) for f in files]
        self.n_science = int(n_science)
        self.when = when
        self.empty = not self.files
        super().__init__(self._message())

    def _message(self) -> str:
        if self.empty:
            return f"session {self.session_id}: no file in the folder; nothing to reduce"
        head = (
            f"session {self.session_id}: 0 of {self.n_science} science frames reduced "
            f"from {len(self.files)} files"
            if self.n_science
            else f"session {self.session_id}: no science frame among {len(self.files)} files"
        )
        items = []
        for f in self.files[: self.MAX_LISTED]:
            name = str(f.get("path") or "?").replace("\\", "/").rsplit("/", 1)[-1]
            why = f.get("reason")
            items.append(f"{name}: {f.get('outcome')}" + (f" ({why})" if why else ""))
        more = len(self.files) - len(items)
        tail = f"; ... and {more} more (session_summary.json lists every file)" if more else ""
        return f"{head}: " + "; ".join(items) + tail
