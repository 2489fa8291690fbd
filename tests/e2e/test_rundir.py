"""One workdir, one run: the lock of train/rundir.py, held by another process, then left stale by kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.rundir import LOCK_FILE, WorkdirInUseError, WorkdirLock

REPO = Path(__file__).resolve().parents[2]


def _holder(workdir: Path) -> subprocess.Popen:
    code = ("import sys, time; from train.rundir import WorkdirLock; WorkdirLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(workdir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_command_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    workdir = tmp_path / "run"
    p = _holder(workdir)
    try:
        with pytest.raises(WorkdirInUseError, match=rf"in use by another run \(host .+, pid {p.pid}, started "):
            WorkdirLock(workdir).acquire()
        # the training program refuses too, before writing anything
        from configs.smoke import get_config
        from train import loop

        before = sorted(os.listdir(workdir))
        with pytest.raises(WorkdirInUseError, match=f"pid {p.pid}"):
            loop.run(get_config(), workdir)
        assert sorted(os.listdir(workdir)) == before
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert (workdir / LOCK_FILE).is_file()  # left behind by the killed holder: stale
    t0 = time.time()
    with WorkdirLock(workdir) as lock:
        assert lock.fd is not None and f'"pid": {os.getpid()}' in (workdir / LOCK_FILE).read_text()
    assert time.time() - t0 < 5
    assert not (workdir / LOCK_FILE).exists()  # a clean exit removes it
