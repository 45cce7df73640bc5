"""
## RPP configuration check

Raises an import error naming every broken `config/observatories/*.yaml` (file and key), so the
error shows on Airflow's DAG list page ("Dag Import Errors") while `rpp_reduction.py` keeps building
the DAGs of the valid observatories. This file defines no DAG: with valid configurations it imports
cleanly and Airflow shows nothing. (Airflow only parses files that mention both "airflow" and
"dag".)
"""

from __future__ import annotations

from pathlib import Path

from rpp_tasks.config import default_config_dir, load_observatory_configs
from rpp_tasks.exceptions import ConfigError

CONFIG_DIR = default_config_dir()  # RPP_CONFIG_DIR, else <repo>/config


class ObservatoryConfigErrors(ConfigError):
    """One or more observatory YAML files are invalid (their DAGs run as config-error
    placeholders)."""

    def __init__(self, errors: dict):
        self.errors = dict(errors)
        lines = [
            f"{len(errors)} observatory configuration(s) invalid; the other observatories' DAGs "
            "are unaffected. Fix the file (`rpp config` validates it):"
        ]
        lines += [f"  - {exc}" for exc in errors.values()]
        Exception.__init__(self, "\n".join(lines))


def check_configs(config_dir: Path = CONFIG_DIR) -> None:
    _, errors = load_observatory_configs(config_dir, strict=False)
    if errors:
        raise ObservatoryConfigErrors(errors)


check_configs()
