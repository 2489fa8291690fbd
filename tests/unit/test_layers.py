"""Code-structure checks that CI runs: no module uses another module's private name; layers point down, no
import cycle."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _checker():
    path = REPO / "scripts" / "check_private_imports.py"
    spec = importlib.util.spec_from_file_location("check_private_imports", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_private_name_crosses_a_module(tmp_path):
    mod = _checker()
    assert mod.main([]) == 0
    bad = tmp_path / "bad.py"
    bad.write_text("from ept_jax.adapters.pyramid import _secret\nfrom train import main as m\nm._flag\n"
                   "import ept_jax\n")
    found = mod.violations(bad)
    assert any("imports ept_jax.adapters.pyramid._secret" in v for v in found)
    assert any("uses train.main._flag" in v for v in found)


def test_layer_contract_and_no_import_cycle(monkeypatch):
    """The import-linter contracts of pyproject.toml hold (``lint-imports`` in .ci/run): core -> adapters -> models
    -> checkpoints | data -> eval -> train, and no package's modules import each other in a cycle."""
    from importlinter import cli

    monkeypatch.chdir(REPO)
    assert cli.lint_imports(config_filename=str(REPO / "pyproject.toml")) == 0
