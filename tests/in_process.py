"""``python -m train.main`` run in the test's own process (:func:`train.main.cli`), for the tests of what the command
prints and refuses: a subprocess for each would spend seconds importing JAX, Flax and transformers before reading its
first flag. Subprocesses remain where the test needs one: a process that dies (``kill -9``), several processes
(multi-process jobs, simulated devices) and the command line's own start (``tests/e2e/test_train_smoke.py``)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The smoke run (configs/smoke.py) that tests/e2e/test_train_resume.py and test_reliability.py interrupt, fault and
# compare (one uninterrupted reference run serves both modules and every xdist worker: e2e_helpers.shared_reference),
# and that tests/unit/test_refusals.py gives bad values.
SMOKE_STEPS = 20
SMOKE_OVERRIDES = [
    f"--config.train.steps={SMOKE_STEPS}",
    "--config.train.checkpoint_every=5",
    "--config.train.log_every=5",
    "--config.train.eval_every=10",
    "--config.train.keep_checkpoints=4",
    "--config.eval.max_examples=16",
]


def smoke_args(workdir, args=(), *, overrides=tuple(SMOKE_OVERRIDES)) -> list[str]:
    """The arguments of ``train.main`` on the smoke config (``configs/smoke.py``) in ``workdir``: ``overrides``
    (default :data:`SMOKE_OVERRIDES`; ``()`` for the config's own values), then ``args`` (later ones win)."""
    return ["--config", str(REPO / "configs/smoke.py"), "--workdir", str(workdir), *overrides, *map(str, args)]


# The interpreter's own warning filters (``python -W`` unset): a subprocess run shows the warnings these let through
INTERPRETER_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                       ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                       ("ignore", ResourceWarning, None)]


def train_main(*args, faults: dict | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``train.main`` with ``args`` in this process: the exit status and what it printed on stdout and stderr (its
    log records and the warnings a subprocess would print included), as a ``subprocess.CompletedProcess`` of the
    command it stands for. ``faults``: :func:`train.faults.install`'s arguments, installed for the call (as
    ``tests/e2e/faulty.py`` does for a subprocess). ``env``: environment variables set for the call;
    ``EPT_STOP_AFTER_STEP`` (a clean stop) is unset unless given, as the subprocess runs drop it."""
    from train import faults as seam
    from train.loop import STOP_ENV
    from train.main import cli

    env = {STOP_ENV: None, **(env or {})}
    saved = {key: os.environ.get(key) for key in env}
    out, err = io.StringIO(), io.StringIO()
    try:
        for key, value in env.items():
            _set_env(key, value)
        seam.install(**(faults or {}))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module in reversed(INTERPRETER_FILTERS):
                warnings.filterwarnings(action, category=category, module=module or "")
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: err.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            status = cli([str(a) for a in args])
    finally:
        seam.install()
        for key, value in saved.items():
            _set_env(key, value)
    return subprocess.CompletedProcess(["python", "-m", "train.main", *map(str, args)], status, out.getvalue(),
                                       err.getvalue())


def _set_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = str(value)


def assert_one_line_refusal(out: subprocess.CompletedProcess, *needles: str, only_line: bool = True) -> str:
    """Exit status 2, no traceback, stderr ending in one ``error: ...`` line naming every needle; with
    ``only_line`` that line is all of stderr (refused before any progress was logged)."""
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert lines and lines[-1].startswith("error: "), out.stderr[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1
    if only_line:
        assert len(lines) == 1, out.stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]
