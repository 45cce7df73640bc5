"""2SPOT session files: last_obs.yaml / setup_config.yaml parsing and completeness."""

from __future__ import annotations

import pytest

from rpp_tasks.exceptions import ConfigError
from rpp_tasks.inputs.twospot import (
    TwoSpotTarget,
    check_complete,
    expected_files,
    parse_last_obs,
    parse_setup_config,
)

LAST_OBS = """\
SS433:
- SS433          # catalogue name of the target
- SS433-         # science prefix
- 6
- SS433_Neon-
- 1
- Flat-
- 20
- Dark
- 0
- Offset
- 0
- none
HD 37795:
- HD 37795
- HD37795-
- 2
- HD37795_Neon-
- 1
- Flat-
- 20
- Dark
- 3
- none
- 0
- trans_alpy.dat
"""


def _write(tmp_path, text, name="last_obs.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_parse_last_obs_reads_every_target_in_order(tmp_path):
    targets = parse_last_obs(_write(tmp_path, LAST_OBS))
    assert [t.name for t in targets] == ["SS433", "HD 37795"]
    ss = targets[0]
    assert ss == TwoSpotTarget(
        "SS433",
        "SS433-",
        6,
        "SS433_Neon-",
        1,
        "Flat-",
        20,
        "Dark",
        0,
        "Offset",
        0,
        None,
        key="SS433",
    )
    hd = targets[1]
    assert hd.offset_prefix is None and hd.n_offset == 0
    assert hd.transmission_file == "trans_alpy.dat"
    assert hd.to_dict()["n_dark"] == 3


def test_expected_files_follow_prefix_index_extension(tmp_path):
    ss = parse_last_obs(_write(tmp_path, LAST_OBS))[0]
    names = expected_files(ss)
    assert names[:6] == [f"SS433-{i}.fits" for i in range(1, 7)]
    assert names[6] == "SS433_Neon-1.fits"
    assert names[7:] == [f"Flat-{i}.fits" for i in range(1, 21)]
    assert len(names) == 27
    assert expected_files(ss, ".fit")[0] == "SS433-1.fit"


def test_check_complete_counts_shared_flats_once_and_ignores_case(tmp_path):
    targets = parse_last_obs(_write(tmp_path, LAST_OBS))
    all_names = {n for t in targets for n in expected_files(t)}
    assert len(all_names) == 27 + 2 + 1 + 3  # the 20 flats are shared
    present = [n.upper() for n in all_names]
    result = check_complete(targets, present)
    assert result.complete and result.n_expected == 33 and result.missing == ()
    result = check_complete(targets, sorted(all_names - {"SS433-6.fits", "Dark2.fits"}))
    assert not result.complete
    assert result.missing == ("SS433-6.fits", "Dark2.fits")
    assert result.to_dict()["n_present"] == 31


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "SS433: [SS433, SS433-, six, N-, 1, F-, 1, D, 0, O, 0, none]\n",
            r"last_obs.yaml: key 'SS433\[2\] \(n_science\)'.*non-negative integer.*'six'",
        ),
        ("SS433: [SS433, SS433-, 6, N-, -1, F-, 1, D, 0, O, 0, none]\n", r"SS433\[4\] \(n_lamp\)"),
        ("SS433: [SS433, SS433-, 6, N-, 1]\n", r"key 'SS433'.*12 items.*5 items"),
        (
            "SS433: [SS433, SS433-, 6, none, 1, F-, 1, D, 0, O, 0, none]\n",
            r"SS433\[3\] \(lamp_prefix\).*1 lamp frame",
        ),
        ("SS433: SS433-\n", r"key 'SS433'.*list of 12 items"),
        ("- a\n- b\n", r"top level.*mapping"),
        ("SS433: [unclosed\n", r"whole file.*valid YAML"),
        ("SS433: [SS433, SS433-, true, N-, 1, F-, 1, D, 0, O, 0, none]\n", r"n_science"),
    ],
)
def test_parse_last_obs_errors_name_file_target_and_position(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        parse_last_obs(_write(tmp_path, text))


def test_parse_last_obs_accepts_missing_transmission_and_empty_file(tmp_path):
    (t,) = parse_last_obs(
        _write(tmp_path, "V404: [V404 Cyg, V404-, '3', N-, 1, F-, 5, D, 0, O, 0]\n")
    )
    assert t.key == "V404" and t.name == "V404 Cyg" and t.n_science == 3
    assert t.transmission_file is None
    assert parse_last_obs(_write(tmp_path, "# nothing tonight\n")) == []


def test_parse_setup_config(tmp_path):
    path = _write(
        tmp_path,
        """\
working_path: /data/2spot/tonight   # dossier de travail
batch_name: last_obs        # nom du fichier batch (obligatoire)
file_extension: 1           # 0: .fits, 1: .fit
calib_mode: 4
# posy: 549
bin_size: 16
trim: yes
""",
        "setup_config.yaml",
    )
    setup = parse_setup_config(path)
    assert setup.batch_name == "last_obs" and setup.obs_file_name == "last_obs.yaml"
    assert setup.file_extension == ".fit" and setup.bin_size == 16 and setup.calib_mode == 4
    assert setup.posy is None and setup.working_path == "/data/2spot/tonight"
    assert setup.extra == {"trim": True}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("bin_size: 16\n", "batch_name"),
        ("batch_name: last_obs\n", "bin_size"),
        ("batch_name: last_obs\nbin_size: 16\nfile_extension: 2\n", r"file_extension.*0 \(.fits\)"),
        ("", "top level"),
    ],
)
def test_parse_setup_config_errors(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        parse_setup_config(_write(tmp_path, text, "setup_config.yaml"))


def test_latin1_file_from_windows_is_read(tmp_path):
    path = tmp_path / "setup_config.yaml"
    path.write_bytes("# répertoire de travail\nbatch_name: nuit\nbin_size: 8\n".encode("latin-1"))
    assert parse_setup_config(path).batch_name == "nuit"
