"""Helpers of the e2e tests' subprocess runs (imported by the test modules of this directory)."""

from __future__ import annotations

import os
from pathlib import Path

from in_process import SMOKE_STEPS  # noqa: F401  (the e2e modules import it from here)
from shared_runs import once


def cache_env(own_dir: Path) -> dict[str, str]:
    """The compilation-cache environment of a subprocess run: nothing when the test session has a cache
    (``scripts/test.sh`` exports ``EPT_COMPILATION_CACHE``; inherited, it serves every module's runs), else
    ``own_dir`` with every program cached."""
    if os.environ.get("EPT_COMPILATION_CACHE"):
        return {}
    return {"JAX_COMPILATION_CACHE_DIR": str(own_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def shared_reference(tmp_path_factory, run) -> Path:
    """The uninterrupted smoke run (:func:`in_process.smoke_args`), made once per session (:func:`shared_runs.once`)
    by ``run(workdir)`` (a ``subprocess.CompletedProcess``). Tests must not write into it (copy it first)."""
    def make(root: Path) -> str:
        out = run(root / "uninterrupted")
        assert out.returncode == 0, out.stderr[-4000:]
        return str(root / "uninterrupted")

    return Path(once(tmp_path_factory, "smoke_reference", make))
