"""Observatory configuration: loading, merging, and errors that name the file and the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from rpp_tasks.config import (
    config_from_dict,
    find_config,
    load_observatory_config,
    load_observatory_configs,
)
from rpp_tasks.exceptions import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _write_cfg(tmp_path: Path, name: str, body: str, defaults: str = "") -> Path:
    (tmp_path / "observatories").mkdir(exist_ok=True)
    (tmp_path / "defaults.yaml").write_text(defaults)
    path = tmp_path / "observatories" / f"{name}.yaml"
    path.write_text(body)
    return path


def test_shipped_configs_load_and_merge_defaults():
    configs = load_observatory_configs(REPO / "config")
    names = [c.name for c in configs]
    assert names == sorted(names)
    assert {"demo", "huntsman", "seestar_s50"} <= set(names)
    hunts = find_config("huntsman", REPO / "config")
    assert hunts.camera.gain_e_per_adu == pytest.approx(1.145)
    assert hunts.camera.saturation_adu == 4094
    # not in huntsman.yaml: inherited from defaults.yaml
    assert hunts.stages.calibration.clip_sigma == 3.0
    assert hunts.stages.photometry.fixed_radius_px == 6.0  # observatory overrides default 8.0
    assert hunts.stages.photometry.annulus_fwhm == (3.0, 5.0)  # sibling key kept by the deep merge
    assert hunts.dag_id == "rpp_huntsman"
    assert len(hunts.config_hash) == 12


def test_filter_aliases_are_case_insensitive_with_default_band():
    from astropy.io import fits

    from rpp_tasks.inputs.header import normalize_header, normalize_kwargs_from_config

    obs = find_config("demo", REPO / "config")

    def band_for(filter_raw):  # the frame's band as the pipeline normalises its header
        hdr = fits.Header({"DATE-OBS": "2025-01-15T20:00:00", "EXPTIME": 10.0})
        if filter_raw is not None:
            hdr["FILTER"] = filter_raw
        kwargs = normalize_kwargs_from_config(obs)
        return normalize_header(hdr, required=(), **kwargs).band

    assert band_for("johnson v") == "V"
    assert band_for("LUM") == "Clear"
    assert band_for(None) == "Clear"
    # unknown filter keeps its own name (since issue 12 the header normalisation knows "Halpha"
    # as the canonical "Ha": an unknown name is taken here)
    assert band_for("MyFilter7") == "MyFilter7"


def test_schedule_key_was_removed_with_a_clear_message(tmp_path):
    """Runs come from the watcher and rpp_reconcile: a cron ``schedule`` is refused with the reason
    (it never did anything); ``schedule: null`` of older defaults files is accepted."""
    p = _write_cfg(tmp_path, "obs1", "observatory: obs1\nschedule: '*/10 * * * *'\n")
    with pytest.raises(ConfigError, match=r"obs1\.yaml: key 'schedule'.*rpp_reconcile"):
        load_observatory_config(p)
    p = _write_cfg(tmp_path, "obs1", "observatory: obs1\nschedule: null\n")
    assert load_observatory_config(p).dag_id == "rpp_obs1"
    assert not hasattr(load_observatory_config(p), "schedule")


def test_unknown_key_names_file_and_key(tmp_path):
    p = _write_cfg(tmp_path, "obs1", "observatory: obs1\ncamera: {gain_e_per_adu: 1.2, gian: 3}\n")
    with pytest.raises(
        ConfigError, match=r"obs1\.yaml: key 'camera\.gian': expected one of the known keys"
    ):
        load_observatory_config(p)


def test_wrong_type_names_expected_type(tmp_path):
    p = _write_cfg(tmp_path, "obs2", "observatory: obs2\ncamera: {gain_e_per_adu: fast}\n")
    with pytest.raises(ConfigError) as err:
        load_observatory_config(p)
    assert err.value.key == "camera.gain_e_per_adu"
    assert "a number" in str(err.value) and "'fast'" in str(err.value)


def test_value_ranges_are_checked(tmp_path):
    p = _write_cfg(tmp_path, "obs3", "observatory: obs3\nsite: {latitude_deg: 95}\n")
    with pytest.raises(ConfigError, match=r"site\.latitude_deg.*\[-90, 90\]"):
        load_observatory_config(p)
    p = _write_cfg(
        tmp_path, "obs4", "observatory: obs4\nstages: {photometry: {annulus_fwhm: [5, 3]}}\n"
    )
    with pytest.raises(ConfigError, match=r"annulus_fwhm"):
        load_observatory_config(p)
    p = _write_cfg(tmp_path, "obs5", "observatory: obs5\nsession: {ready_rule: marker}\n")
    with pytest.raises(ConfigError, match=r"session\.marker_file"):
        load_observatory_config(p)


def test_name_must_match_file_stem(tmp_path):
    p = _write_cfg(tmp_path, "alpha", "observatory: beta\n")
    with pytest.raises(
        ConfigError, match=r"alpha\.yaml: key 'observatory': expected the file name stem 'alpha'"
    ):
        load_observatory_config(p)


def test_yaml_syntax_error_gives_line(tmp_path):
    p = _write_cfg(tmp_path, "bad", "observatory: bad\ncamera: {gain_e_per_adu: 1.0\n")
    with pytest.raises(
        ConfigError, match=r"bad\.yaml: key '<syntax>': expected valid YAML \(line \d+"
    ):
        load_observatory_config(p)


def test_missing_required_key(tmp_path):
    p = _write_cfg(tmp_path, "anon", "title: no name\n")
    with pytest.raises(ConfigError, match=r"key 'observatory': expected a value"):
        load_observatory_config(p)


def test_one_broken_file_does_not_hide_the_others(tmp_path):
    _write_cfg(tmp_path, "good", "observatory: good\n")
    _write_cfg(tmp_path, "broken", "observatory: broken\ncamera: [1, 2]\n")
    configs, errors = load_observatory_configs(tmp_path, strict=False)
    assert [c.name for c in configs] == ["good"]
    assert list(errors) == [str(tmp_path / "observatories" / "broken.yaml")]
    assert errors[str(tmp_path / "observatories" / "broken.yaml")].key == "camera"
    with pytest.raises(ConfigError):
        load_observatory_configs(tmp_path)


def test_unknown_observatory_lists_known_ones():
    with pytest.raises(ConfigError, match=r"one of the configured observatories: .*demo"):
        find_config("nope", REPO / "config")


def test_config_is_frozen_and_hash_tracks_content():
    a = config_from_dict({"observatory": "x"})
    b = config_from_dict({"observatory": "x", "camera": {"gain_e_per_adu": 2.0}})
    assert a.config_hash != b.config_hash
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.observatory = "y"


def test_relative_paths_resolve_under_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("RPP_DATA_ROOT", str(tmp_path))
    obs = config_from_dict({"observatory": "x"})
    assert obs.resolve_path("incoming") == tmp_path / "data" / "incoming" / "x"


def test_config_module_is_cheap_to_import():
    code = (
        "import sys, rpp_tasks.config\n"
        "tops = {m.split('.')[0] for m in sys.modules}\n"
        "heavy = {'numpy', 'astropy', 'scipy', 'airflow', 'sqlalchemy'} & tops\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
