"""Work that several tests read, done once per test session however many xdist workers run them.

A ``scope="module"`` fixture runs once per worker that gets a test of its module (and again when a worker's tests of
the module are not contiguous); :func:`once` runs it once for the session under a file lock: the first worker to
ask computes, the others wait and read the result. (pytest-xdist's ``--dist loadgroup`` would do it by scheduling,
but with pytest-xdist 3.8 and pytest 9 its ``xdist_group`` marks are silently ignored.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any


def session_dir(tmp_path_factory, name: str) -> Path:
    """A directory shared by the xdist workers of this session (``.../pytest-N/<name>``)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # .../pytest-N/popen-gwK: the session's directory is the parent
        base = base.parent
    root = base / name
    root.mkdir(exist_ok=True)
    return root


def once(tmp_path_factory, name: str, make: Callable[[Path], Any]) -> Any:
    """``make(directory)``'s result (JSON: lists come back as lists, tuples as lists), computed by the first worker
    of the session that asks, in a fresh ``directory`` shared by every worker; the tests must only read it. A
    ``make`` that raises leaves no result: the next worker to ask tries again, in an emptied directory."""
    from filelock import FileLock

    root = session_dir(tmp_path_factory, name)
    done, work = root / "result.json", root / "work"
    with FileLock(str(root / "once.lock")):
        if not done.is_file():
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(make(work)))
            tmp.replace(done)
    return json.loads(done.read_text())


def completed(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """A finished subprocess as JSON (for :func:`once`); :func:`process` makes it a ``CompletedProcess`` again."""
    return {"args": [str(a) for a in proc.args], "returncode": proc.returncode, "stdout": proc.stdout,
            "stderr": proc.stderr}


def process(record: dict[str, Any]) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(record["args"], record["returncode"], record["stdout"], record["stderr"])
