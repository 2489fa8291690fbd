"""Runs a program with faults installed (:mod:`train.faults`, the reliability tests' seam):

    python tests/e2e/faulty.py [--nan_at_steps=7,8] [--kill_during_checkpoint=15] [--disk_full_at_checkpoint=15] \
        [--kill_before_step=7] -- train.main ARGS...

installs the faults, then runs the module (``train.main``) as ``__main__`` with ``ARGS``.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit("usage: faulty.py [--nan_at_steps=A,B] [--kill_during_checkpoint=N] "
                         "[--disk_full_at_checkpoint=N] [--kill_before_step=N] -- MODULE ARGS...")
    cut = argv.index("--")
    options, (module, *args) = argv[:cut], argv[cut + 1:]
    kw = {}
    for opt in options:
        key, _, value = opt.removeprefix("--").partition("=")
        if key == "nan_at_steps":
            kw[key] = [int(v) for v in value.split(",") if v]
        elif key in ("kill_during_checkpoint", "disk_full_at_checkpoint", "kill_before_step"):
            kw[key] = int(value)
        else:
            raise SystemExit(f"faulty.py: unknown option {opt!r}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from train import faults

    faults.install(**kw)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
