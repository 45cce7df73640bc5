"""Exceptions shared by every stage of ``rpp_tasks``.

* `ConfigError`   -- an observatory YAML is invalid (names the file, the key and what was expected).
* `FrameRejected` -- one frame cannot go further; the caller records the reason and the other
  frames go on.
* `RppError`      -- base class.
"""

from __future__ import annotations

__all__ = ["RppError", "ConfigError", "FrameRejected"]


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
