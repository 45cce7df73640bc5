"""Package-wide rules: the library never imports Airflow, and every module imports on its own."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import rpp_tasks

PKG = Path(rpp_tasks.__file__).parent


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(PKG)], "rpp_tasks."))


def test_no_module_under_rpp_tasks_imports_airflow_in_its_source():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", ""))
                in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names = [str(node.args[0].value)]
            offenders += [
                f"{path.relative_to(PKG.parent)}:{node.lineno} imports {n}"
                for n in names
                if n == "airflow" or n.startswith("airflow.")
            ]
    assert not offenders, "rpp_tasks must never import Airflow:\n" + "\n".join(offenders)


def test_importing_every_module_loads_no_airflow():
    code = (
        "import importlib, sys\n"
        f"for name in {_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))\n"
        "print('AIRFLOW', bad)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=PKG.parent
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AIRFLOW []" in proc.stdout, proc.stdout[-2000:]
    assert len(_modules()) >= 30  # the walk really found the package's modules
