"""One workdir, one run: an exclusive lock on the run directory.

Two ``train.main`` commands on one workdir would both train and interleave their records. The first to start holds
``WORKDIR/.lock``: an ``fcntl.flock`` on the open file (the kernel releases it when the process ends, ``kill -9``
included, so a lock left by a killed run is stale by construction and simply taken over) and, inside, who holds it
(host, pid, start time) for the refusal message. On a clean exit the file is removed. Of a multi-process job only
process 0 takes the lock, for the whole job.

flock is local to a host (on most network filesystems it is either local or emulated): two jobs on two hosts
sharing a workdir over NFS are only refused where the filesystem propagates flock.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from train.errors import UserError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class WorkdirInUseError(UserError):
    """The workdir is held by another running command."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the workdir for the block (see the module docstring).

    Raises:
      WorkdirInUseError: another process holds it; the message names host, pid and start time.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> WorkdirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                h = _holder(self.path)
                raise WorkdirInUseError(
                    f"--workdir {str(self.path.parent)!r} is in use by another run (host {h.get('host', '?')}, "
                    f"pid {h.get('pid', '?')}, started {h.get('started', '?')}); wait for it to finish, stop it, "
                    "or use another --workdir"
                ) from None
            # the file may have been removed (a clean exit) between our open and our flock: lock the live one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _holder(self.path)
        if previous.get("pid"):
            logger.warning("%s: taking over the lock of pid %s on %s (started %s), which is no longer running",
                           self.path.parent, previous.get("pid"), previous.get("host"), previous.get("started"))
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing releases the flock
            self.fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_identity(config) -> dict[str, Any]:
    """What a checkpoint must match to be restored into this run (compared field by field on restore)."""
    from train.builder import adapter_config
    from train.checkpointing import FORMAT_VERSION

    identity = {
        "format": FORMAT_VERSION,
        "family": str(config.model.family),
        "tasks": list(config.data.tasks),
        "adapter": dataclasses.asdict(adapter_config(config)),
    }
    return json.loads(json.dumps(identity))


def is_writer() -> bool:
    """Whether this process writes a run's files (metrics, TensorBoard, results, tables, plots, reports, exports):
    process 0 of a multi-process job; the others compute the same values and write nothing."""
    import jax

    return jax.process_index() == 0


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes ``data`` as JSON to ``path`` through a temporary file and a rename (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
