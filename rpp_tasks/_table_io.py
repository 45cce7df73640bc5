"""Astropy Table's ``asdf`` reader and writer, registered without importing ``asdf``.

``import astropy.table`` imports asdf-astropy's Table connector whenever asdf-astropy is installed
(it is, for specutils and gwcs), and that module imports ``asdf`` and its schema machinery: about
0.07 CPU-s in every frame process, none of which reads or writes ASDF. `defer_asdf_table_io`
(called when ``rpp_tasks`` is imported) puts a stand-in in its place: the same format name,
identifier rule (a path ending in ``.asdf``) and functions, which import the real connector on
their first call. Nothing changes when ``astropy.table`` was imported before ``rpp_tasks``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

_CONNECT = "asdf_astropy.io.connect"


def _real_connect():
    """asdf-astropy's own connector module (imported on first use; its registration of the
    format is skipped by asdf-astropy itself because the stand-in holds it)."""
    mod = sys.modules.get(_CONNECT)
    if getattr(mod, "_rpp_stand_in", False):
        del sys.modules[_CONNECT]
        mod = importlib.import_module(_CONNECT)
    return mod


def read_table(*args, **kwargs):
    """asdf-astropy's ``read_table`` (imports it)."""
    return _real_connect().read_table(*args, **kwargs)


def write_table(*args, **kwargs):
    """asdf-astropy's ``write_table`` (imports it)."""
    return _real_connect().write_table(*args, **kwargs)


def asdf_identify(origin, filepath, fileobj, *args, **kwargs):
    """asdf-astropy's rule: a path ending in ``.asdf``."""
    return filepath is not None and filepath.endswith(".asdf")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the first import of the connector (the one ``astropy.table`` makes) with the
    stand-in, then leaves the import system."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _CONNECT:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        from astropy.io import registry
        from astropy.table import Table

        module._rpp_stand_in = True
        module.read_table, module.write_table = read_table, write_table
        module.asdf_identify = asdf_identify
        registry.register_reader("asdf", Table, read_table)
        registry.register_writer("asdf", Table, write_table)
        registry.register_identifier("asdf", Table, asdf_identify)


def defer_asdf_table_io():
    """Install the stand-in unless ``astropy.table`` (or the connector) is already imported."""
    if "astropy.table" in sys.modules or _CONNECT in sys.modules:
        return
    if not any(isinstance(f, _StandInFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StandInFinder())
