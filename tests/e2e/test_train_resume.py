"""Resuming: an interrupted run, started again with the same command and workdir, ends identical to an
uninterrupted one (every metrics record except timings, the results, the final and the best adapter parameters).

Interruptions covered: a clean stop after the checkpoint at step N of 2N (``EPT_STOP_AFTER_STEP``, the schedule
stays the 2N-step one), ``kill -9`` during training, ``kill -9`` during a checkpoint write (a temporary
checkpoint directory is left behind), and a truncated file in the latest checkpoint (a warning names it and the
previous checkpoint is used). Restoring into another adapter shape is refused, naming the entries.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from child_env import set_xla_flags
from e2e_helpers import SMOKE_STEPS, cache_env, shared_reference
from in_process import smoke_args, train_main
from shared_runs import session_dir

from train.logger import TIMING_KEYS

REPO = Path(__file__).resolve().parents[2]
STEPS = SMOKE_STEPS  # the run test_reliability.py faults


def command(workdir):
    return [sys.executable, "-m", "train.main", *smoke_args(workdir)]


def environment(cache_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", **cache_env(cache_dir))
    set_xla_flags(env)
    env.pop("EPT_STOP_AFTER_STEP", None)
    return env


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return session_dir(tmp_path_factory, "resume_jax_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2N-step run (made once per session, shared with test_reliability.py: e2e_helpers.py)."""
    return shared_reference(tmp_path_factory, lambda workdir: train_main(*smoke_args(workdir)))  # in this process


def params(path: Path) -> dict:
    return ocp.StandardCheckpointer().restore(path.absolute())


def outcome(workdir: Path) -> dict:
    """Everything that must match: metrics records without timings, results, final and best parameters."""
    recs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    best = [p for p in (workdir / "best").iterdir() if p.name.isdigit()]
    assert len(best) == 1
    return {
        "records": [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs],
        "results": json.loads((workdir / "results.json").read_text()),
        "final": params(workdir / f"checkpoints/{STEPS}/params"),
        "best": (best[0].name, params(best[0] / "params")),
    }


def assert_identical(a: dict, b: dict) -> None:
    assert [r["step"] for r in a["records"]] == [r["step"] for r in b["records"]]
    assert a["records"] == b["records"]
    assert a["results"] == b["results"]
    assert a["best"][0] == b["best"][0]
    for name in ("final", "best"):
        x = a[name] if name == "final" else a[name][1]
        y = b[name] if name == "final" else b[name][1]
        flat_x = {"/".join(map(str, k)): v for k, v in _flatten(x)}
        flat_y = {"/".join(map(str, k)): v for k, v in _flatten(y)}
        assert flat_x.keys() == flat_y.keys()
        for k in flat_x:
            np.testing.assert_array_equal(np.asarray(flat_x[k]), np.asarray(flat_y[k]), err_msg=f"{name} {k}")


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def test_clean_stop_then_same_command_is_identical(reference, tmp_path):
    workdir = tmp_path / "stopped"
    out = train_main(*smoke_args(workdir), env={"EPT_STOP_AFTER_STEP": STEPS // 2})  # in this process
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"stopped after the checkpoint at step {STEPS // 2}" in out.stdout
    recs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == STEPS // 2 and not (workdir / "results.json").exists()

    # kill -9 in the middle of writing a later checkpoint leaves Orbax's temporary directory: ignored, then removed
    partial = workdir / "checkpoints" / f"{3 * STEPS // 4}.orbax-checkpoint-tmp-1234567"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "manifest.ocdbt").write_bytes(b"\x00" * 7)
    # a truncated file in the latest checkpoint: keep a copy of the stopped run to test that on
    corrupted = tmp_path / "corrupted"
    shutil.copytree(workdir, corrupted)

    out = train_main(*smoke_args(workdir))
    assert out.returncode == 0, out.stderr[-4000:]
    assert not partial.exists()
    assert_identical(outcome(workdir), outcome(reference))

    # params/d/ holds the merged OCDBT data that restoring reads (the per-process ocdbt.process_0/d/ files are
    # not read once merged: truncating one of those changes nothing, so it would not test anything)
    victim = max((corrupted / f"checkpoints/{STEPS // 2}/params/d").iterdir(), key=lambda f: f.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    out = train_main(*smoke_args(corrupted))
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"checkpoints/{STEPS // 2} cannot be read" in out.stderr
    assert (corrupted / "checkpoints_corrupt" / str(STEPS // 2)).is_dir()
    assert_identical(outcome(corrupted), outcome(reference))


def test_kill_9_during_training_is_identical(reference, cache_dir, tmp_path):
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(command(workdir), cwd=REPO, env=environment(cache_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 500
        while not (workdir / f"checkpoints/{STEPS // 2}/commit_success.txt").exists() and proc.poll() is None:
            assert time.time() < deadline, f"the run never wrote checkpoint {STEPS // 2}"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (workdir / "results.json").exists()
    out = train_main(*smoke_args(workdir))  # the same command again (in this process)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "resumed from" in out.stderr
    assert_identical(outcome(workdir), outcome(reference))


def test_restoring_another_adapter_shape_is_refused(reference, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(reference, work)  # the shared reference stays untouched (other tests read it meanwhile)
    before = {p: p.read_bytes() for p in (work / "config.json", work / "metrics.jsonl")}
    out = train_main(*smoke_args(work, ["--config.adapter.r=4", "--allow_config_change"]))  # in this process
    assert out.returncode == 2, out.stderr[-4000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr
    assert "was written for another model or adapter" in line and "nothing was restored" in line
    assert "adapter.r: checkpoint 8, run 4" in line
    assert "adapter/A: checkpoint shape (8, 32), model shape (4, 32)" in line
    assert {p: p.read_bytes() for p in before} == before  # nothing rewritten
