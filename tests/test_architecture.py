"""The package layering of docs/architecture.md, checked by import-linter against the contracts in pyproject.toml:
packages import downwards only, KIP's modules import downwards only, and linalg imports no store, Ray or kernel."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_keep_the_import_linter_contracts_in_pyproject():
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True, no_logo=True))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def test_every_package_is_in_the_layering_contract():
    """A new package must be placed in a layer, or the contract silently ignores it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["name"] == "packages import downwards only")["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    pkg = ROOT / "kernelscale"
    present = {f"kernelscale.{p.name}" for p in pkg.iterdir() if (p / "__init__.py").exists()}
    present |= {f"kernelscale.{p.stem}" for p in pkg.glob("*.py") if p.stem != "__init__"}
    assert present == named, f"in the package but not layered: {present - named}; layered but absent: {named - present}"
