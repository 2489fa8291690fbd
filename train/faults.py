"""Fault injection for the reliability tests: a seam the tests install, never read from the environment.

The training loop and the checkpointer read :data:`FAULTS`; by default nothing is injected. In-process tests set its
fields (and reset them); end-to-end tests run a program through ``tests/e2e/faulty.py``, which installs the faults
named on its command line and then runs the program's module as ``__main__``.

* ``nan_at_steps``: the updates with these numbers (1-based, as the metrics' steps) run on NaN base weights, so
  their loss and gradients are NaN and ``train.nan_policy`` decides what happens.
* ``disk_full_at_checkpoint``: writing regular checkpoint ``N`` fails as a full disk fails it, with
  ``OSError(ENOSPC)`` from the write of its host record (the checkpoint is never committed).
* ``kill_during_checkpoint``: the process ``SIGKILL`` s itself in the middle of writing regular checkpoint ``N``
  (:mod:`train.checkpointing`): once its host record is in Orbax's temporary directory, before the commit.
* ``kill_before_step``: the process ``SIGKILL`` s itself before update ``N`` (1-based), once its pending checkpoint
  writes are committed: a process of a multi-process job lost between two checkpoints, at a known point.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Faults:
    nan_at_steps: frozenset[int] = frozenset()
    kill_during_checkpoint: int | None = None
    disk_full_at_checkpoint: int | None = None
    kill_before_step: int | None = None


#: the installed faults (none by default)
FAULTS = Faults()


def install(nan_at_steps=(), kill_during_checkpoint: int | None = None,
            disk_full_at_checkpoint: int | None = None, kill_before_step: int | None = None) -> Faults:
    """Replaces the installed faults; returns them."""
    FAULTS.nan_at_steps = frozenset(int(s) for s in nan_at_steps)
    FAULTS.kill_during_checkpoint = None if kill_during_checkpoint is None else int(kill_during_checkpoint)
    FAULTS.disk_full_at_checkpoint = None if disk_full_at_checkpoint is None else int(disk_full_at_checkpoint)
    FAULTS.kill_before_step = None if kill_before_step is None else int(kill_before_step)
    return FAULTS
