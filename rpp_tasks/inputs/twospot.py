"""Reader for the 2SPOT session files (``last_obs.yaml`` and ``setup_config.yaml``).

The 2SPOT observatory's automation writes, for each night's target, files with *permanent
generic names* (``SS433-1.fits`` ... ``SS433-6.fits``, ``Flat-1.fits`` ...) and two YAML files that
declare what a complete session is (format in ``../shared/specs/2spot_session_files.md``):

* the observation ("batch") file, ``last_obs.yaml`` by default: one top-level key per target whose
  value is a list, by position: catalogue name, science prefix, number of science frames, lamp
  prefix, number of lamp frames, flat prefix, number of flats, dark prefix, number of darks,
  offset (bias) prefix, number of offsets, atmospheric transmission file (or ``none``);
* the setup file, ``setup_config.yaml``: ``batch_name`` (the observation file without ``.yaml``),
  ``file_extension`` (0: ``.fits``, 1: ``.fit``), ``bin_size``, ``calib_mode`` ...

Frame ``i`` (1-based) of a kind with prefix ``P`` is the file ``f"{P}{i}{extension}"``.

Errors raise `rpp_tasks.exceptions.ConfigError` naming the file, the target and the position /
field that is wrong. This module only reads the two small YAML files; it never opens FITS data.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from rpp_tasks.exceptions import ConfigError

__all__ = [
    "TwoSpotTarget",
    "TwoSpotSetup",
    "Completeness",
    "parse_last_obs",
    "parse_setup_config",
    "expected_files",
    "check_complete",
    "ROLES",
    "frame_roles",
]

log = logging.getLogger(__name__)

#: Position, field name and kind of each item of a target's list in ``last_obs.yaml``.
_FIELDS = (
    (0, "name", "str"),
    (1, "science_prefix", "prefix"),
    (2, "n_science", "count"),
    (3, "lamp_prefix", "prefix"),
    (4, "n_lamp", "count"),
    (5, "flat_prefix", "prefix"),
    (6, "n_flat", "count"),
    (7, "dark_prefix", "prefix"),
    (8, "n_dark", "count"),
    (9, "offset_prefix", "prefix"),
    (10, "n_offset", "count"),
    (11, "transmission_file", "optional"),
)
#: (prefix field, count field) of each frame kind, in the order of the file.
_KINDS = (
    ("science", "science_prefix", "n_science"),
    ("lamp", "lamp_prefix", "n_lamp"),
    ("flat", "flat_prefix", "n_flat"),
    ("dark", "dark_prefix", "n_dark"),
    ("offset", "offset_prefix", "n_offset"),
)
_NONE_WORDS = {"", "none", "null", "no", "aucun", "aucune"}
_EXTENSIONS = {0: ".fits", 1: ".fit"}


@dataclass(frozen=True)
class TwoSpotTarget:
    """One target of a 2SPOT observation file.

    A count of 0 means no frame of that kind is expected; its prefix is then ``None`` when the
    file gives ``none`` or nothing. ``transmission_file`` is ``None`` for ``none``.
    ``key`` is the top-level YAML key (normally equal to ``name``).
    """

    name: str
    science_prefix: str | None
    n_science: int
    lamp_prefix: str | None
    n_lamp: int
    flat_prefix: str | None
    n_flat: int
    dark_prefix: str | None
    n_dark: int
    offset_prefix: str | None
    n_offset: int
    transmission_file: str | None
    key: str = ""

    def to_dict(self) -> dict:
        """JSON-safe summary."""
        return asdict(self)


@dataclass(frozen=True)
class TwoSpotSetup:
    """The fields of ``setup_config.yaml`` this project uses; the others are kept in ``extra``."""

    batch_name: str
    file_extension: str  # ".fits" or ".fit"
    bin_size: int
    working_path: str | None = None
    calib_mode: int | None = None
    posy: int | None = None
    extra: dict = field(default_factory=dict)

    def spectrograph_overrides(self) -> dict:
        """Values of the night's setup that override the observatory's spectrograph section:
        ``bin_size`` -> ``bin_size_px``, ``posy`` -> ``spectrum_y_px`` (when given)."""
        out = {"bin_size_px": int(self.bin_size)} if self.bin_size else {}
        if self.posy is not None:
            out["spectrum_y_px"] = float(self.posy)
        return out

    @property
    def obs_file_name(self) -> str:
        """File name of the observation (batch) file, ``batch_name + ".yaml"``."""
        return f"{self.batch_name}.yaml"

    def to_dict(self) -> dict:
        """JSON-safe summary."""
        return asdict(self)


@dataclass(frozen=True)
class Completeness:
    """Result of `check_complete`: which declared files are present or still missing."""

    complete: bool
    n_expected: int
    n_present: int
    missing: tuple[str, ...]

    def to_dict(self) -> dict:
        """JSON-safe summary."""
        return {**asdict(self), "missing": list(self.missing)}


def _read_yaml(path: Path, what: str):
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        # Files written on Windows by the observatory's automation may be Latin-1 (French comments).
        text = path.read_text(encoding="latin-1")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(path, "(whole file)", f"a valid YAML {what}", got=str(exc)) from exc


def _as_count(value, source, key):
    if isinstance(value, bool):
        raise ConfigError(source, key, "a non-negative integer (number of frames)", got=value)
    if isinstance(value, int):
        count = value
    elif isinstance(value, str) and value.strip().isdigit():
        count = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        count = int(value)
    else:
        raise ConfigError(source, key, "a non-negative integer (number of frames)", got=value)
    if count < 0:
        raise ConfigError(source, key, "a non-negative integer (number of frames)", got=value)
    return count


def _as_optional_text(value):
    if value is None:
        return None
    text = str(value).strip()
    return None if text.lower() in _NONE_WORDS else text


def parse_last_obs(path) -> list[TwoSpotTarget]:
    """
    Parse a 2SPOT observation file (``last_obs.yaml``).

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The observation file.

    Returns
    -------
    targets : list of `TwoSpotTarget`
        In file order. An empty file gives an empty list.

    Raises
    ------
    ConfigError
        The file is not valid YAML, is not a mapping of target -> list, a list has the wrong
        length, a count is not a non-negative integer, or a positive count has no prefix. The
        message names the file, the target and the position (0-based) and field.
    """
    path = Path(path)
    doc = _read_yaml(path, "2SPOT observation file")
    if doc is None:
        log.warning("%s: empty 2SPOT observation file (no target declared)", path)
        return []
    if not isinstance(doc, dict):
        raise ConfigError(
            path,
            "(top level)",
            "a mapping of target name -> list of 12 items",
            got=type(doc).__name__,
        )
    targets = []
    for key, items in doc.items():
        key = str(key)
        if not isinstance(items, list):
            raise ConfigError(
                path, key, "a list of 12 items (name, science prefix, count, ...)", got=items
            )
        if len(items) not in (11, 12):
            raise ConfigError(
                path,
                key,
                "a list of 12 items (11 accepted: no transmission file)",
                got=f"{len(items)} items",
            )
        values = {}
        for pos, name, kind in _FIELDS:
            where = f"{key}[{pos}] ({name})"
            value = items[pos] if pos < len(items) else None
            if kind == "count":
                values[name] = _as_count(value, path, where)
            elif kind == "str":
                if value is None or str(value).strip() == "":
                    raise ConfigError(path, where, "the target's catalogue name", got=value)
                values[name] = str(value).strip()
            else:  # prefix or optional file name
                values[name] = _as_optional_text(value)
        for kind, prefix_field, count_field in _KINDS:
            if values[count_field] > 0 and not values[prefix_field]:
                pos = next(p for p, n, _ in _FIELDS if n == prefix_field)
                raise ConfigError(
                    path,
                    f"{key}[{pos}] ({prefix_field})",
                    f"a file-name prefix, since {values[count_field]} {kind} frame(s) are expected",
                    got=items[pos],
                )
        if values["name"] != key:
            log.info("%s: target key %r declares catalogue name %r", path, key, values["name"])
        targets.append(TwoSpotTarget(**values, key=key))
    return targets


def parse_setup_config(path) -> TwoSpotSetup:
    """
    Parse a 2SPOT setup file (``setup_config.yaml``).

    Parameters
    ----------
    path : str or `~pathlib.Path`
        The setup file.

    Returns
    -------
    setup : `TwoSpotSetup`

    Raises
    ------
    ConfigError
        Invalid YAML, a mandatory key (``batch_name``, ``bin_size``) is missing, or
        ``file_extension`` is not 0 or 1.
    """
    path = Path(path)
    doc = _read_yaml(path, "2SPOT setup file")
    if not isinstance(doc, dict):
        raise ConfigError(
            path,
            "(top level)",
            "a mapping of setup keys",
            got=None if doc is None else type(doc).__name__,
        )
    doc = dict(doc)
    batch = doc.pop("batch_name", None)
    if batch is None or str(batch).strip() == "":
        raise ConfigError(path, "batch_name", "the observation file name without .yaml (mandatory)")
    batch = str(batch).strip()
    if batch.endswith(".yaml"):
        batch = batch[: -len(".yaml")]
    if "bin_size" not in doc:
        raise ConfigError(path, "bin_size", "the binning width, an integer (mandatory)")
    bin_size = _as_count(doc.pop("bin_size"), path, "bin_size")
    ext_code = doc.pop("file_extension", 0)
    if ext_code is None:
        ext_code = 0
    if isinstance(ext_code, bool) or ext_code not in _EXTENSIONS:
        raise ConfigError(path, "file_extension", "0 (.fits) or 1 (.fit)", got=ext_code)
    calib_mode = doc.pop("calib_mode", None)
    posy = doc.pop("posy", None)
    working_path = doc.pop("working_path", None)
    return TwoSpotSetup(
        batch_name=batch,
        file_extension=_EXTENSIONS[ext_code],
        bin_size=bin_size,
        working_path=None if working_path is None else str(working_path),
        calib_mode=None if calib_mode is None else _as_count(calib_mode, path, "calib_mode"),
        posy=None if posy is None else _as_count(posy, path, "posy"),
        extra=doc,
    )


def expected_files(target: TwoSpotTarget, extension: str = ".fits") -> list[str]:
    """
    File names a complete session holds for one target.

    Parameters
    ----------
    target : `TwoSpotTarget`
    extension : str, optional
        ``".fits"`` (default) or ``".fit"`` (from ``setup_config.yaml``).

    Returns
    -------
    names : list of str
        ``f"{prefix}{i}{extension}"`` for i = 1..count of each kind, science first.
    """
    names = []
    for _kind, prefix_field, count_field in _KINDS:
        prefix = getattr(target, prefix_field)
        names.extend(f"{prefix}{i}{extension}" for i in range(1, getattr(target, count_field) + 1))
    return names


def check_complete(targets, present_names, *, extension: str = ".fits") -> Completeness:
    """
    Compare the files declared by ``targets`` with the names present.

    Parameters
    ----------
    targets : iterable of `TwoSpotTarget`
    present_names : iterable of str
        File names present in the folder of the observation file. Matching ignores case
        (files may come from a Windows machine).
    extension : str, optional
        Frame file extension.

    Returns
    -------
    result : `Completeness`
        ``missing`` lists the declared names not present, in declaration order. Calibration
        frames shared by several targets (same prefix) are counted once.
    """
    present = {str(n).lower() for n in present_names}
    expected = []
    seen = set()
    for target in targets:
        for name in expected_files(target, extension):
            if name.lower() not in seen:
                seen.add(name.lower())
                expected.append(name)
    missing = tuple(n for n in expected if n.lower() not in present)
    return Completeness(
        complete=not missing,
        n_expected=len(expected),
        n_present=len(expected) - len(missing),
        missing=missing,
    )


#: Frame role of each kind of ``last_obs.yaml`` (science frames are the target's exposures).
ROLES = {"science": "target", "lamp": "lamp", "flat": "flat", "dark": "dark", "offset": "offset"}


def frame_roles(targets, *, extension: str = ".fits") -> dict[str, list[tuple[str, str]]]:
    """
    Role of every file a 2SPOT session declares.

    Parameters
    ----------
    targets : iterable of `TwoSpotTarget`
    extension : str, optional
        ``".fits"`` or ``".fit"`` (``setup_config.yaml`` ``file_extension``).

    Returns
    -------
    roles : dict
        Lower-case file name -> list of ``(role, target key)``, role among ``target``, ``lamp``,
        ``flat``, ``dark``, ``offset``. A calibration file shared by several targets (same
        prefix) lists every target it serves.
    """
    out: dict[str, list[tuple[str, str]]] = {}
    for t in targets:
        for kind, prefix_field, count_field in _KINDS:
            prefix = getattr(t, prefix_field)
            for i in range(1, getattr(t, count_field) + 1):
                name = f"{prefix}{i}{extension}".lower()
                entry = (ROLES[kind], t.key or t.name)
                if entry not in out.setdefault(name, []):
                    out[name].append(entry)
    return out
