"""Observatory configuration: ``config/observatories/<name>.yaml`` merged over
``config/defaults.yaml``.

This module is imported by the DAG files at parse time, so it depends on the standard library and
PyYAML only. The sections themselves (frozen dataclasses with their defaults) are
`rpp_tasks.config_schema`, re-exported here; this module loads, merges and validates. A
configuration is loaded into frozen dataclasses and validated on load: an invalid file raises
`~rpp_tasks.exceptions.ConfigError` naming the file, the dotted key and what was expected. Unknown
keys are errors too (a typo must not silently fall back to a default).

Examples
--------
>>> from rpp_tasks.config import find_config
>>> obs = find_config("demo")                        # doctest: +SKIP
>>> obs.camera.gain_e_per_adu, obs.stages.detection.threshold_sigma   # doctest: +SKIP
(1.5, 3.0)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Literal

import yaml

from rpp_tasks.config_schema import (
    INSTRUMENT_KINDS,
    LAMP_ELEMENTS,
    REPO_ROOT,
    ArchiveConfig,
    AstrometryConfig,
    BackgroundConfig,
    CalibrationConfig,
    CameraConfig,
    CatalogsConfig,
    CosmicsConfig,
    DetectionConfig,
    EnsembleConfig,
    FiltersConfig,
    NotificationsConfig,
    ObservatoryConfig,
    PathsConfig,
    PhotometryConfig,
    SchedulingConfig,
    SessionConfig,
    SiteConfig,
    SpectrographConfig,
    StagesConfig,
    TargetEntry,
    TargetsConfig,
    TransientsConfig,
    ZeroPointConfig,
)
from rpp_tasks.exceptions import ConfigError

__all__ = [
    "SiteConfig",
    "CameraConfig",
    "FiltersConfig",
    "PathsConfig",
    "SessionConfig",
    "CalibrationConfig",
    "CosmicsConfig",
    "BackgroundConfig",
    "DetectionConfig",
    "PhotometryConfig",
    "AstrometryConfig",
    "ZeroPointConfig",
    "TransientsConfig",
    "CatalogsConfig",
    "TargetEntry",
    "EnsembleConfig",
    "TargetsConfig",
    "StagesConfig",
    "NotificationsConfig",
    "ArchiveConfig",
    "SpectrographConfig",
    "SchedulingConfig",
    "INSTRUMENT_KINDS",
    "LAMP_ELEMENTS",
    "ObservatoryConfig",
    "default_config_dir",
    "load_observatory_config",
    "load_observatory_configs",
    "find_config",
    "config_from_dict",
    "parse_ra_deg",
    "parse_dec_deg",
]

_SafeLoader = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)  # libyaml when available: DAG parsing stays fast


# --------------------------------------------------------------------------- validation
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_type_name(args[0])}s"
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )


def _coerce(tp, value, source: str, key: str):
    """Return ``value`` converted to annotation ``tp`` or raise ConfigError(source, key, ...)."""
    origin = typing.get_origin(tp)
    fail = ConfigError(source, key, _type_name(tp), value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail
        return _build(tp, value, source, key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise fail
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise fail
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if len(sections) == 1 and isinstance(value, dict):
            return _coerce(sections[0], value, source, key)  # errors name the inner key
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, source, key)
            except ConfigError:
                continue
        raise fail
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise fail
        return [_coerce(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise fail
        return tuple(
            _coerce(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))
        )
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise fail
        return {
            _coerce(ktp, str(k) if ktp is str else k, source, f"{key}.{k}"): _coerce(
                vtp, v, source, f"{key}.{k}"
            )
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise fail
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise fail
        return str(value)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _build(cls, data: dict, source: str, prefix: str = ""):
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name not in ("source", "config_hash")}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            source,
            prefix + str(unknown[0]),
            "one of the known keys: " + ", ".join(sorted(names)),
            "unknown key",
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], source, prefix + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(source, prefix + f.name, "a value (this key is required)", None)
    return cls(**kwargs)


def _check_spectrograph(cfg: ObservatoryConfig, source: str, positive) -> None:
    """The long-slit section: present for ``longslit``, values in range."""
    sp = cfg.spectrograph
    if cfg.instrument_kind == "longslit" and sp is None:
        raise ConfigError(
            source, "spectrograph", "a spectrograph section when instrument_kind is longslit"
        )
    if sp is None:
        return
    if not sp.dispersion_a_per_px or abs(sp.dispersion_a_per_px) > 100:
        raise ConfigError(
            source,
            "spectrograph.dispersion_a_per_px",
            "a non-zero dispersion in A/px (negative when the wavelength decreases)",
            sp.dispersion_a_per_px,
        )
    if sp.dispersion_axis not in (1, 2):
        raise ConfigError(
            source, "spectrograph.dispersion_axis", "1 (NAXIS1) or 2 (NAXIS2)", sp.dispersion_axis
        )
    if sp.central_wavelength_a is None and sp.wavelength_range_a is None:
        raise ConfigError(
            source,
            "spectrograph.central_wavelength_a",
            "the approximate central wavelength (or spectrograph.wavelength_range_a)",
        )
    if sp.central_wavelength_a is not None and not 1000 < sp.central_wavelength_a < 30000:
        raise ConfigError(
            source,
            "spectrograph.central_wavelength_a",
            "a wavelength in Angstrom between 1000 and 30000",
            sp.central_wavelength_a,
        )
    if sp.wavelength_range_a is not None:
        lo, hi = sp.wavelength_range_a
        if not 1000 < lo < hi < 30000:
            raise ConfigError(
                source,
                "spectrograph.wavelength_range_a",
                "[min, max] in Angstrom with 1000 < min < max < 30000",
                list(sp.wavelength_range_a),
            )
    if not sp.lamp_elements:
        raise ConfigError(source, "spectrograph.lamp_elements", "at least one lamp element")
    for i, el in enumerate(sp.lamp_elements):
        if el not in LAMP_ELEMENTS:
            raise ConfigError(
                source,
                f"spectrograph.lamp_elements[{i}]",
                "one of " + ", ".join(LAMP_ELEMENTS) + " (a shipped line list)",
                el,
            )
    if sp.bin_size_px < 1:
        raise ConfigError(source, "spectrograph.bin_size_px", "an integer >= 1", sp.bin_size_px)
    if not 1 <= sp.poly_degree <= 6:
        raise ConfigError(
            source, "spectrograph.poly_degree", "an integer from 1 to 6", sp.poly_degree
        )
    if sp.min_lamp_lines < sp.poly_degree + 2:
        raise ConfigError(
            source,
            "spectrograph.min_lamp_lines",
            f"at least poly_degree + 2 = {sp.poly_degree + 2}",
            sp.min_lamp_lines,
        )
    positive("spectrograph.sky_offset_px", sp.sky_offset_px)
    positive("spectrograph.sky_width_px", sp.sky_width_px)
    positive("spectrograph.resolving_power", sp.resolving_power)
    positive("spectrograph.resample_step_a", sp.resample_step_a)
    if not 0 < sp.dispersion_tolerance < 1:
        raise ConfigError(
            source,
            "spectrograph.dispersion_tolerance",
            "a fraction between 0 and 1",
            sp.dispersion_tolerance,
        )
    if not 0 <= sp.max_saturated_fraction <= 1:
        raise ConfigError(
            source,
            "spectrograph.max_saturated_fraction",
            "a fraction between 0 and 1",
            sp.max_saturated_fraction,
        )
    if sp.spectrum_y_px is not None and sp.spectrum_y_px < 0:
        raise ConfigError(
            source, "spectrograph.spectrum_y_px", "a row >= 0 or null", sp.spectrum_y_px
        )
    if (sp.reference_star is None) != (sp.reference_spectrum is None):
        raise ConfigError(
            source,
            "spectrograph.reference_spectrum",
            "both reference_star and reference_spectrum, or neither",
        )


def _check_scheduling(sc: SchedulingConfig, source: str) -> None:
    """The ``scheduling`` section: chunk size and the DAG's concurrency, in range."""
    if not 0 < sc.chunk_megapixels <= 100_000:
        raise ConfigError(
            source,
            "scheduling.chunk_megapixels",
            "a number of megapixels per chunk in (0, 100000]",
            sc.chunk_megapixels,
        )
    if sc.chunk_frames is not None and not 1 <= sc.chunk_frames <= 100_000:
        raise ConfigError(
            source, "scheduling.chunk_frames", "an integer >= 1 or null", sc.chunk_frames
        )
    for key in ("max_active_runs", "max_active_tasks"):
        v = getattr(sc, key)
        if not 1 <= v <= 1024:
            raise ConfigError(source, f"scheduling.{key}", "an integer from 1 to 1024", v)
    if not 0 <= sc.retries <= 10:
        raise ConfigError(source, "scheduling.retries", "an integer from 0 to 10", sc.retries)
    if not 0 <= sc.retry_delay_s <= 3600:
        raise ConfigError(
            source,
            "scheduling.retry_delay_s",
            "seconds from 0 to 3600 before a retry",
            sc.retry_delay_s,
        )


def _check_values(cfg: ObservatoryConfig, source: str) -> None:
    """Range checks that types alone cannot express."""

    def positive(key, v, allow_zero=False):
        if v is None:
            return
        if not (v > 0 or (allow_zero and v == 0)):
            raise ConfigError(
                source, key, "a positive number" if not allow_zero else "a number >= 0", v
            )

    if not cfg.observatory.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(
            source,
            "observatory",
            "letters, digits, '_' or '-' (it becomes the DAG id)",
            cfg.observatory,
        )
    stem = Path(source).stem if source.endswith((".yaml", ".yml")) else None
    if stem and stem != cfg.observatory:
        raise ConfigError(source, "observatory", f"the file name stem {stem!r}", cfg.observatory)
    if not -90 <= cfg.site.latitude_deg <= 90:
        raise ConfigError(
            source, "site.latitude_deg", "a latitude in [-90, 90] degrees", cfg.site.latitude_deg
        )
    if not -180 <= cfg.site.longitude_deg <= 360:
        raise ConfigError(
            source,
            "site.longitude_deg",
            "a longitude in degrees (east positive)",
            cfg.site.longitude_deg,
        )
    positive("camera.gain_e_per_adu", cfg.camera.gain_e_per_adu)
    positive("camera.read_noise_e", cfg.camera.read_noise_e, allow_zero=True)
    positive("camera.saturation_adu", cfg.camera.saturation_adu)
    positive("camera.bias_level_adu", cfg.camera.bias_level_adu, allow_zero=True)
    if (cfg.camera.bias_level_adu or 0) >= cfg.camera.saturation_adu:
        raise ConfigError(
            source,
            "camera.bias_level_adu",
            f"a level below camera.saturation_adu ({cfg.camera.saturation_adu:g})",
            cfg.camera.bias_level_adu,
        )
    positive("camera.pixel_scale_arcsec", cfg.camera.pixel_scale_arcsec)
    if any(b < 1 for b in cfg.camera.binning):
        raise ConfigError(source, "camera.binning", "two integers >= 1", list(cfg.camera.binning))
    if cfg.camera.bayer_pattern is not None and cfg.camera.bayer_pattern.upper() not in (
        "RGGB",
        "GRBG",
        "GBRG",
        "BGGR",
    ):
        raise ConfigError(
            source,
            "camera.bayer_pattern",
            "one of RGGB, GRBG, GBRG, BGGR or null",
            cfg.camera.bayer_pattern,
        )
    _check_spectrograph(cfg, source, positive)
    positive("session.quiet_seconds", cfg.session.quiet_seconds)
    if cfg.session.ready_rule == "marker" and not cfg.session.marker_file:
        raise ConfigError(
            source, "session.marker_file", "a file name when ready_rule is 'marker'", None
        )
    unknown_kinds = set(cfg.session.frame_types) - {"bias", "dark", "flat", "science"}
    if unknown_kinds:
        raise ConfigError(
            source,
            f"session.frame_types.{sorted(unknown_kinds)[0]}",
            "a frame type among bias, dark, flat, science",
            "unknown frame type",
        )
    st = cfg.stages
    positive("stages.calibration.clip_sigma", st.calibration.clip_sigma)
    positive("stages.background.box_size_px", st.background.box_size_px)
    if st.background.filter_size < 1 or st.background.filter_size % 2 == 0:
        raise ConfigError(
            source,
            "stages.background.filter_size",
            "an odd integer >= 1",
            st.background.filter_size,
        )
    positive("stages.detection.threshold_sigma", st.detection.threshold_sigma)
    positive("stages.detection.min_area_px", st.detection.min_area_px)
    positive("stages.detection.fwhm_guess_px", st.detection.fwhm_guess_px)
    positive("stages.photometry.fixed_radius_px", st.photometry.fixed_radius_px)
    inner, outer = st.photometry.annulus_fwhm
    if not 0 < inner < outer:
        raise ConfigError(
            source,
            "stages.photometry.annulus_fwhm",
            "[inner, outer] with 0 < inner < outer",
            list(st.photometry.annulus_fwhm),
        )
    if not 1 <= st.photometry.epsf_oversampling <= 8:
        raise ConfigError(
            source,
            "stages.photometry.epsf_oversampling",
            "an integer from 1 to 8",
            st.photometry.epsf_oversampling,
        )
    positive("stages.astrometry.solve_timeout_s", st.astrometry.solve_timeout_s)
    positive("stages.astrometry.hint_error_arcmin", st.astrometry.hint_error_arcmin)
    for name, (ra, dec) in st.astrometry.targets.items():
        if not (0.0 <= ra < 360.0 and -90.0 <= dec <= 90.0):
            raise ConfigError(
                source,
                f"stages.astrometry.targets.{name}",
                "[RA, Dec] in degrees (0 <= RA < 360, -90 <= Dec <= 90)",
                [ra, dec],
            )
    _check_scheduling(cfg.scheduling, source)
    positive("catalogs.timeout_s", cfg.catalogs.timeout_s)
    if cfg.catalogs.max_retries < 0 or cfg.catalogs.max_retries > 10:
        raise ConfigError(
            source, "catalogs.max_retries", "an integer from 0 to 10", cfg.catalogs.max_retries
        )
    for band, ref in cfg.catalogs.bands.items():
        if ref.split("/")[0] not in ("gaia", "ps1", "skymapper") or ref.count("/") != 1:
            raise ConfigError(
                source, f"catalogs.bands.{band}", "'<gaia|ps1|skymapper>/<band>'", ref
            )
    for i, name in enumerate(cfg.catalogs.gaia_order):
        if name not in ("local", "gaia_tap", "gaia_vizier"):
            raise ConfigError(
                source, f"catalogs.gaia_order[{i}]", "one of local, gaia_tap, gaia_vizier", name
            )
    positive("catalogs.local_fetch_radius_deg", cfg.catalogs.local_fetch_radius_deg)
    _check_targets(cfg.targets, source)
    for key, addrs in (
        ("notifications.email_to", cfg.notifications.email_to),
        ("notifications.operators_email_to", cfg.notifications.operators_email_to),
    ):
        for i, a in enumerate(addrs):
            if "@" not in a or a.startswith("@") or a.endswith("@"):
                raise ConfigError(source, f"{key}[{i}]", "an e-mail address", a)


def _check_targets(tc: TargetsConfig, source: str) -> None:
    seen: dict[str, int] = {}
    for i, t in enumerate(tc.objects):
        key = f"targets.objects[{i}]"
        if not t.name.strip():
            raise ConfigError(source, f"{key}.name", "a non-empty name", t.name)
        for n in (t.name, *t.aliases):
            k = " ".join(n.lower().split())
            if k in seen and seen[k] != i:
                raise ConfigError(source, f"{key}.name", "a name used by one target only", n)
            seen[k] = i
        if (t.ra is None) != (t.dec is None):
            raise ConfigError(source, f"{key}.ra", "both ra and dec, or neither", [t.ra, t.dec])
        if t.ra is not None:
            try:
                parse_ra_deg(t.ra)
            except ValueError as exc:
                raise ConfigError(source, f"{key}.ra", f"an RA ({exc})", t.ra) from None
            try:
                parse_dec_deg(t.dec)
            except ValueError as exc:
                raise ConfigError(source, f"{key}.dec", f"a Dec ({exc})", t.dec) from None
    for name in ("match_radius_arcsec", "detect_min_snr"):
        if not getattr(tc, name) > 0:
            raise ConfigError(source, f"targets.{name}", "a positive number", getattr(tc, name))
    ens = tc.ensemble
    if ens.min_stars < 1 or ens.max_stars < ens.min_stars:
        raise ConfigError(
            source,
            "targets.ensemble.max_stars",
            "max_stars >= min_stars >= 1",
            [ens.min_stars, ens.max_stars],
        )
    if not 0 < ens.min_frame_fraction <= 1:
        raise ConfigError(
            source,
            "targets.ensemble.min_frame_fraction",
            "a fraction in (0, 1]",
            ens.min_frame_fraction,
        )
    for name in ("min_snr", "clip_sigma", "max_chi2"):
        if not getattr(ens, name) > 0:
            raise ConfigError(
                source, f"targets.ensemble.{name}", "a positive number", getattr(ens, name)
            )


# --------------------------------------------------------------------------- angles
def _sexagesimal(text: str) -> tuple[float, bool]:
    """``"10:00:24.5"``, ``"10 00 24.5"``, ``"10h00m24.5s"``, ``"-02d12m00s"``
    -> (value, sexagesimal?)."""
    t = text.strip().lower()
    for ch in "hdms:'\"\u00b0":
        t = t.replace(ch, " ")
    parts = t.split()
    if not parts or len(parts) > 3:
        raise ValueError(f"cannot read {text!r}")
    sign = -1.0 if parts[0].startswith("-") else 1.0
    try:
        vals = [abs(float(p)) for p in parts]
    except ValueError:
        raise ValueError(f"cannot read {text!r}") from None
    if len(vals) > 1 and (vals[1] >= 60 or (len(vals) > 2 and vals[2] >= 60)):
        raise ValueError(f"minutes and seconds must be < 60 in {text!r}")
    value = (
        vals[0] + (vals[1] / 60 if len(vals) > 1 else 0) + (vals[2] / 3600 if len(vals) > 2 else 0)
    )
    sexa = len(vals) > 1 or any(c in text.lower() for c in "hdms:")
    return sign * value, sexa


def parse_ra_deg(value: float | str) -> float:
    """Right ascension in degrees from a number (degrees) or a string: sexagesimal hours
    (``"10:00:24.5"``, ``"10h00m24.5s"``, ``"10 00 24.5"``) or decimal degrees (``"150.102"``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        deg = float(value)
    elif isinstance(value, str):
        v, sexa = _sexagesimal(value)
        deg = v * 15.0 if sexa else v
    else:
        raise ValueError(f"expected a number or a string, got {type(value).__name__}")
    if not 0.0 <= deg < 360.0 or deg != deg:
        raise ValueError(f"RA {value!r} is outside [0, 360) degrees / [0, 24) hours")
    return deg


def parse_dec_deg(value: float | str) -> float:
    """Declination in degrees from a number or a string (``"+02:12:00"``, ``"-5d23m28s"``,
    ``"2.2"``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        deg = float(value)
    elif isinstance(value, str):
        deg, _ = _sexagesimal(value)
    else:
        raise ValueError(f"expected a number or a string, got {type(value).__name__}")
    if not -90.0 <= deg <= 90.0:
        raise ValueError(f"Dec {value!r} is outside [-90, 90] degrees")
    return deg


# --------------------------------------------------------------------------- loading
def _merge(base: dict, over: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else in ``over`` replaces ``base``."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "<file>", "an existing YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            path, "<file>", "UTF-8 text", f"undecodable byte at offset {exc.start}"
        ) from None
    try:
        data = yaml.load(text, Loader=_SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(
            path, "<syntax>", f"valid YAML ({where}: {getattr(exc, 'problem', exc)})"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, "<top level>", "a mapping of keys to values", type(data).__name__)
    return data


def default_config_dir() -> Path:
    """``RPP_CONFIG_DIR`` if set, else ``<repo>/config``."""
    return Path(os.environ.get("RPP_CONFIG_DIR", REPO_ROOT / "config"))


#: Keys that were removed, with what to do instead (a null value is accepted and ignored).
REMOVED_KEYS = {
    "schedule": "no key 'schedule' any more: runs are triggered per session by the watcher, and "
    "the rpp_reconcile DAG (every 15 minutes) triggers any ready session the watcher missed; "
    "remove the key",
}


def config_from_dict(data: dict, *, source: str = "<dict>") -> ObservatoryConfig:
    """Validate a merged mapping and build the frozen `ObservatoryConfig`."""
    for key, why in REMOVED_KEYS.items():
        if key in data:
            if data[key] is not None:
                raise ConfigError(source, key, why, data[key])
            data = {k: v for k, v in data.items() if k != key}
    cfg = _build(ObservatoryConfig, data, source)
    _check_values(cfg, source)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return dataclasses.replace(cfg, source=source, config_hash=digest)


def load_observatory_config(
    path: str | os.PathLike, *, defaults: str | os.PathLike | None = None
) -> ObservatoryConfig:
    """Load one observatory YAML, merged over ``defaults.yaml`` (by default the one in the parent of
    its folder).

    Raises
    ------
    ConfigError
        Naming the file, the dotted key and what was expected.
    """
    path = Path(path)
    if defaults is None:
        defaults = path.resolve().parent.parent / "defaults.yaml"
    base = _read_yaml(Path(defaults)) if Path(defaults).is_file() else {}
    return config_from_dict(_merge(base, _read_yaml(path)), source=str(path))


def load_observatory_configs(
    config_dir: str | os.PathLike | None = None, *, strict: bool = True
) -> list[ObservatoryConfig] | tuple[list[ObservatoryConfig], dict[str, ConfigError]]:
    """Load every ``observatories/*.yaml`` in a stable (sorted) order.

    With ``strict=False`` returns ``(configs, errors)`` where ``errors`` maps each broken file to
    its `ConfigError`, so one broken YAML never hides the other observatories (the DAG factory uses
    this).
    """
    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    defaults = config_dir / "defaults.yaml"
    configs, errors = [], {}
    for p in sorted((config_dir / "observatories").glob("*.y*ml")):
        try:
            configs.append(load_observatory_config(p, defaults=defaults))
        except ConfigError as exc:
            if strict:
                raise
            errors[str(p)] = exc
    return configs if strict else (configs, errors)


def find_config(name: str, config_dir: str | os.PathLike | None = None) -> ObservatoryConfig:
    """The configuration of observatory ``name`` (``observatories/<name>.yaml``), or a path to a
    YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return load_observatory_config(p)
    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    path = config_dir / "observatories" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(q.stem for q in (config_dir / "observatories").glob("*.yaml"))
        raise ConfigError(
            path, "observatory", "one of the configured observatories: " + ", ".join(known), name
        )
    return load_observatory_config(path, defaults=config_dir / "defaults.yaml")
