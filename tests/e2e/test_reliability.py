"""Reliability of ``python -m train.main`` on the smoke config: faults survived, runs of another config refused.

Faults (the :mod:`train.faults` seam): ``kill -9`` in the middle of a checkpoint write (a subprocess run through
``tests/e2e/faulty.py --kill_during_checkpoint``: Orbax's temporary directory is left behind, the next start ignores
and removes it, resumes from the previous checkpoint and ends identical to an uninterrupted run), a full disk while
writing a checkpoint and a NaN loss under both ``train.nan_policy`` values (installed for a run in this process:
:func:`in_process.train_main`); a checkpoint of another adapter config (same shapes) and an existing run's workdir
with another config refused, each with one line on stderr and the workdir byte for byte unchanged. Every resume is
the same command again, in this process.

``kill -9`` during training, a truncated checkpoint file and another adapter shape are in
``tests/e2e/test_train_resume.py``; bad configs, datasets and model directories in ``tests/unit/test_refusals.py``;
exporting a task the checkpoint does not have in ``tests/unit/test_export.py``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from child_env import set_xla_flags
from e2e_helpers import SMOKE_STEPS, cache_env, shared_reference
from in_process import assert_one_line_refusal, smoke_args, train_main
from shared_runs import session_dir

from train.logger import TIMING_KEYS

REPO = Path(__file__).resolve().parents[2]
STEPS = SMOKE_STEPS


def faulty_run(workdir, cache_dir, faults) -> subprocess.CompletedProcess:
    """``python -m train.main`` on the smoke config (:func:`in_process.smoke_args`) in a subprocess, through
    ``tests/e2e/faulty.py``, which installs ``faults`` (its options) first: for the faults that end the process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", **cache_env(cache_dir))
    env.pop("EPT_STOP_AFTER_STEP", None)
    set_xla_flags(env)
    cmd = [sys.executable, str(REPO / "tests" / "e2e" / "faulty.py"), *faults, "--", "train.main", *smoke_args(workdir)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return session_dir(tmp_path_factory, "reliability_jax_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted, fault-free run (made once per session: tests/e2e/e2e_helpers.py)."""
    return shared_reference(tmp_path_factory, lambda workdir: train_main(*smoke_args(workdir)))  # in this process


def params(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a saved item, flattened to ``{"a/b/c": array}``."""
    tree = ocp.StandardCheckpointer().restore(path.absolute())

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}/")
            else:
                yield f"{prefix}{k}", np.asarray(v)

    return dict(walk(tree, ""))


def assert_same_params(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what} {k}")


def records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_identical_runs(a: Path, b: Path) -> None:
    """Metrics (without timings), results, final and best parameters are equal."""
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]  # noqa: E731
    assert strip(records(a)) == strip(records(b))
    assert json.loads((a / "results.json").read_text()) == json.loads((b / "results.json").read_text())
    assert_same_params(params(a / f"checkpoints/{STEPS}/params"), params(b / f"checkpoints/{STEPS}/params"), "final")
    best_a, best_b = ([p for p in (w / "best").iterdir() if p.name.isdigit()] for w in (a, b))
    assert [p.name for p in best_a] == [p.name for p in best_b] and len(best_a) == 1
    assert_same_params(params(best_a[0] / "params"), params(best_b[0] / "params"), "best")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(directory.rglob("*"))}


# ---------------------------------------------------------------------------------------------------- faults


def test_kill_9_during_a_checkpoint_write_resumes_from_the_previous_one(reference, cache_dir, tmp_path):
    workdir = tmp_path / "killed"
    out = faulty_run(workdir, cache_dir, ["--kill_during_checkpoint=15"])
    assert out.returncode == -9, (out.returncode, out.stderr[-3000:])
    ckpts = workdir / "checkpoints"
    partial = [p for p in ckpts.iterdir() if p.name.startswith("15.orbax-checkpoint-tmp")]
    assert len(partial) == 1  # written (at least the host record the hook waited for), never committed
    assert [f for d in partial[0].glob("host*") for f in d.iterdir() if f.is_file()], list(partial[0].rglob("*"))
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["10", "5"]
    assert records(workdir)[-1]["step"] == 15  # metrics past the last checkpoint: cut back on resume

    out = train_main(*smoke_args(workdir))  # the same command again (in this process)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"resumed from {ckpts / '10'} at step 10" in out.stderr
    assert not partial[0].exists()
    assert_identical_runs(workdir, reference)


def test_disk_full_during_a_checkpoint_is_one_line_and_the_same_command_resumes(reference, tmp_path):
    """Writing checkpoint 15 fails with ENOSPC (``--disk_full_at_checkpoint``, the seam of :mod:`train.faults`):
    exit 2 with one line naming the checkpoint's path, the bytes it needs and the intact previous checkpoint;
    checkpoint 10 is untouched, 15 never committed; the same command, with space back, resumes from 10 and ends
    identical to an uninterrupted run."""
    workdir = tmp_path / "full"
    out = train_main(*smoke_args(workdir), faults={"disk_full_at_checkpoint": 15})  # in this process
    ckpts = workdir / "checkpoints"
    line = assert_one_line_refusal(out, f"writing checkpoint 15 to {ckpts / '15'}",
                                   f"the previous checkpoint ({ckpts / '10'}) is intact", only_line=False)
    assert line.startswith("error: DiskFullError: no space left on the device") and "bytes" in line, line
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["10", "5"]
    assert_same_params(params(ckpts / "10/params"), params(reference / "checkpoints/10/params"), "10")

    out = train_main(*smoke_args(workdir))
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"resumed from {ckpts / '10'} at step 10" in out.stderr
    assert_identical_runs(workdir, reference)


def test_nan_loss_skip_policy_counts_and_finishes_finite(reference, tmp_path):
    workdir = tmp_path / "skip"
    out = train_main(*smoke_args(workdir, ["--config.train.nan_policy=skip"]), faults={"nan_at_steps": [7, 8]})
    assert out.returncode == 0, out.stderr[-4000:]
    assert "non-finite loss or gradients at step(s) [7, 8]: skipped" in out.stderr
    recs = [r for r in records(workdir) if "loss" in r]
    assert [(r["step"], r["skipped_steps"]) for r in recs] == [(5, 0), (10, 2), (15, 2), (20, 2)]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in recs)
    assert json.loads((workdir / "results.json").read_text())["skipped_steps"] == 2
    # before the fault identical to the reference; the skipped updates change what follows, never to NaN
    assert_same_params(params(workdir / "checkpoints/5/params"), params(reference / "checkpoints/5/params"), "5")
    final = params(workdir / f"checkpoints/{STEPS}/params")
    assert all(np.isfinite(v).all() for v in final.values())
    ref_final = params(reference / f"checkpoints/{STEPS}/params")
    assert any(not np.array_equal(final[k], ref_final[k]) for k in final)


def test_nan_loss_stop_policy_is_one_line_and_keeps_the_last_checkpoint(reference, tmp_path):
    workdir = tmp_path / "stop"
    out = train_main(*smoke_args(workdir, ["--config.train.nan_policy=stop"]), faults={"nan_at_steps": [13]})
    last = assert_one_line_refusal(out, only_line=False)  # after the progress logged before the fault
    assert last.startswith("error: NonFiniteLossError: the loss or gradients became NaN/Inf at step 13")
    assert f"the last checkpoint ({workdir / 'checkpoints' / '10'}) is intact" in last
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "5"]
    assert records(workdir)[-1]["step"] == 10 and not (workdir / "results.json").exists()
    assert_same_params(params(workdir / "checkpoints/10/params"), params(reference / "checkpoints/10/params"), "10")
    # nothing lost: the same command without the fault resumes there and ends as the uninterrupted run
    out = train_main(*smoke_args(workdir, ["--config.train.nan_policy=stop"]))
    assert out.returncode == 0, out.stderr[-4000:]
    assert "at step 10" in out.stderr
    assert_identical_runs(workdir, reference)


def test_checkpoint_of_another_adapter_config_is_refused(reference, tmp_path):
    # same parameter shapes, another routing: only the saved identity can tell (never a silent restore)
    work = tmp_path / "run"
    shutil.copytree(reference, work)  # the shared reference stays untouched (other tests read it meanwhile)
    before = snapshot(work)
    out = train_main(*smoke_args(work), "--config.adapter.top_k=1", "--allow_config_change")
    assert_one_line_refusal(out, "was written for another model or adapter", "adapter.top_k: checkpoint 2, run 1",
                            "nothing was restored", only_line=False)  # after the accepted change's warning
    assert snapshot(work) == before


def test_workdir_of_another_config_is_refused(reference, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(reference, work)
    before = snapshot(work)
    out = train_main(*smoke_args(work), "--config.train.learning_rate=0.5")
    assert_one_line_refusal(out, "holds a run with another config", "train.learning_rate: saved 0.01, now 0.5",
                            "--allow_config_change")
    assert snapshot(work) == before


def test_checkpoint_identity_reads_absent_adapter_options_as_their_defaults():
    """A checkpoint written before an adapter option existed restores when the run keeps that option's default,
    and is refused, naming it, when the run changes it."""
    import dataclasses

    from ept_jax.adapters.config import AdapterConfig
    from train.checkpointing import identity_mismatches

    run = {"format": 1, "family": "t5", "tasks": ["syn_copy"],
           "adapter": json.loads(json.dumps(dataclasses.asdict(AdapterConfig())))}
    old = json.loads(json.dumps(run))
    del old["adapter"]["trex_r1"]
    assert identity_mismatches(old, run) == []
    changed = json.loads(json.dumps(run))
    changed["adapter"]["trex_r1"] = 3
    assert identity_mismatches(old, changed) == ["adapter.trex_r1: checkpoint 4, run 3"]
    old["adapter"]["r"] = 4
    assert identity_mismatches(old, run) == ["adapter.r: checkpoint 4, run 8"]
