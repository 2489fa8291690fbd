"""The training program end to end on the smoke config: ``python -m train.main --config configs/smoke.py``.

One real run (a subprocess, as a user runs it) is shared by the tests of this module: it must exit 0, the loss
must fall, and the workdir must hold everything the program promises. The two evaluation paths (adapters routed
per example vs. each task's adapter merged into the base weights) are compared on the trained smoke model.
"""

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from child_env import set_xla_flags
from e2e_helpers import cache_env
from in_process import smoke_args, train_main
from shared_runs import completed, once, process

REPO = Path(__file__).resolve().parents[2]


def cli(workdir, cache_dir):
    """Runs ``python -m train.main`` with the smoke config as it is; returns the CompletedProcess."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", **cache_env(cache_dir))
    set_xla_flags(env)
    cmd = [sys.executable, "-m", "train.main", *smoke_args(workdir, overrides=())]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def shared_compilation_cache(smoke_run):
    """This process compiles through the smoke run's persistent cache (restored afterwards): the routed
    generation and the model's initialisers are then loaded, not compiled again."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    if os.environ.get("EPT_COMPILATION_CACHE"):  # the session's cache (tests/conftest.py) holds the smoke run's
        yield
        return
    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(smoke_run[1].parent / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    cc.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
    cc.reset_cache()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    def make(root: Path) -> dict:
        t0 = time.time()
        out = cli(root / "run", root / "jax_cache")
        return {"out": completed(out), "workdir": str(root / "run"), "seconds": time.time() - t0}

    r = once(tmp_path_factory, "smoke_run", make)  # once for the session (every worker reads it)
    return process(r["out"]), Path(r["workdir"]), r["seconds"]


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_exits_zero_and_loss_falls(smoke_run):
    out, workdir, seconds = smoke_run
    assert out.returncode == 0, out.stderr[-4000:]
    assert "done: step 100" in out.stdout
    recs = [r for r in records(workdir) if "loss" in r]
    assert [r["step"] for r in recs] == list(range(10, 101, 10))
    first, last = recs[0]["loss"], recs[-1]["loss"]
    # the frozen random T5 starts above ln(384) = 5.95; the adapters alone must bring it down clearly
    assert first > 5.0 and last < first - 2.0, (first, last)
    for r in recs:
        assert {"loss", "ce", "contrastive", "grad_norm", "lr", "tokens_per_s", "skipped_steps"} <= set(r)
        assert r["skipped_steps"] == 0 and r["contrastive"] > 0
    # warm-up to 1e-2 over 10 steps, then linear decay to 0 at step 100
    assert recs[0]["lr"] == pytest.approx(1e-2 * 80 / 90 + 1e-2 / 90, rel=1e-5)
    assert recs[-1]["lr"] == pytest.approx(1e-2 / 90, rel=1e-4)
    print(f"smoke run: {seconds:.1f}s wall")


def test_throughput_is_timed_over_completed_steps(smoke_run):
    """Every interval's step time, summed, is training time the process really spent: at most the run's elapsed
    time, and with the first interval (compile) excluded each step takes a plausible share of the wall clock.
    (Timed before the asynchronously dispatched steps finished, the intervals summed to a small fraction of it.)"""
    out, workdir, _ = smoke_run
    assert out.returncode == 0, out.stderr[-4000:]
    recs = [r for r in records(workdir) if "loss" in r]
    prev, busy = 0, 0.0
    for r in recs:
        n = r["step"] - prev
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0
        busy += r["step_s"] * n
        prev = r["step"]
    elapsed = recs[-1]["elapsed_s"]
    assert busy <= elapsed * 1.01, (busy, elapsed)
    # after the first interval (compile), the loop does little but train: the steps are most of the wall time
    # between the first and the last record, evaluation and checkpoints aside (at most half of it here)
    later = sum(r["step_s"] * (r["step"] - p["step"]) for p, r in zip(recs, recs[1:], strict=False))
    assert later >= 0.2 * (elapsed - recs[0]["elapsed_s"]), (later, elapsed - recs[0]["elapsed_s"])


def test_workdir_contents(smoke_run):
    out, workdir, _ = smoke_run
    assert out.returncode == 0, out.stderr[-4000:]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["random_init"] is True and saved["data"]["tasks"][0] == "syn_copy"
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [50, 100]
    assert [p.name for p in (workdir / "best").iterdir() if p.name.isdigit()] == ["100"]
    # adapter parameters only: no frozen base weight is ever written
    from train.checkpointing import Checkpointer, saved_shapes

    ckpt = Checkpointer(workdir, 2)
    shapes = saved_shapes(ckpt._mgr.item_metadata(100)["params"])
    assert len(shapes) == 12 * 9  # q and v of 2 + 2 + 2 attention blocks; A, B, 4 kernels, gate (2), embedding
    assert all("/adapter/" in k for k in shapes), sorted(shapes)[:3]
    assert not any(k.endswith("kernel") or "shared" in k for k in shapes)
    ckpt.close()
    last = records(workdir)[-1]
    assert set(last["eval"]) == {"syn_copy", "syn_reverse", "syn_sort", "syn_sentiment"}
    assert all(0.0 <= m["accuracy"] <= 100.0 for m in last["eval"].values())
    assert set(last["eval_loss"]) == set(last["eval"]) and all(v > 0 for v in last["eval_loss"].values())
    assert last["eval_loss_mean"] == pytest.approx(sum(last["eval_loss"].values()) / len(last["eval_loss"]))
    results = json.loads((workdir / "results.json").read_text())
    assert results["best_step"] == 100 and set(results["test"]) == set(last["eval"])
    assert results["test_mean"] == pytest.approx(np.mean([m["accuracy"] for m in results["test"].values()]))


def test_merged_adapters_evaluate_like_routed_adapters(smoke_run, shared_compilation_cache):
    """``eval.merge_adapters``: base kernel += merge(task).T, adapters off == adapters routed by task id."""
    from flax import nnx

    from configs.smoke import get_config
    from ept_jax.core import sharding
    from ept_jax.core.params import AdapterContext
    from train import evaluation, steps
    from train import state as state_lib
    from train.checkpointing import Checkpointer
    from train.data import build_data
    from train.rundir import run_identity

    out, workdir, _ = smoke_run
    assert out.returncode == 0, out.stderr[-4000:]
    config = get_config()
    config.eval.max_examples = 16
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    model = state_lib.build_model(config)
    tokenizer = state_lib.load_tokenizer(config)
    data = build_data(config, tokenizer, 0)
    tx, _ = state_lib.make_optimizer(config)
    state = state_lib.create_train_state(model, tx, mesh)
    restored = Checkpointer(workdir, 2).restore_best(state.trainable, run_identity(config))
    assert restored is not None
    state.trainable = restored[0]

    batch = next(data.batches)

    @functools.partial(jax.jit, static_argnums=3)
    def logits(trainable, frozen, batch, merged):
        model = nnx.merge(state.graphdef, trainable, frozen)
        ctx = AdapterContext(task_ids=batch["task_ids"], adapters_enabled=not merged)
        return steps.forward("t5", model, batch, ctx)

    merge = evaluation._merge_fn(state.graphdef)
    task = int(batch["task_ids"][0])
    routed = logits(state.trainable, state.frozen, batch, False)
    merged = logits(state.trainable, merge(state.trainable, state.frozen, task), batch, True)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(routed), atol=2e-4, rtol=1e-4)

    # the smoke run's eval shapes (batch 64, 12 new tokens), so its compiled generation is reused
    kwargs = dict(family="t5", batch_size=64, max_length=32, max_new_tokens=12)
    for es in data.dev:
        plain = evaluation.predict(state, es, tokenizer, mesh, **kwargs)
        fused = evaluation.predict(state, es, tokenizer, mesh, merged_frozen=merge(state.trainable, state.frozen,
                                                                                  es.task_id), **kwargs)
        assert len(plain) == 16 and fused == plain, es.name


def test_scanned_layers_train_and_evaluate_like_unrolled_ones(tmp_path):
    """``model.scan_layers=True`` end to end: the same logged losses, gradient norms and evaluation scores as the
    unrolled layers (3 + 3 blocks, so each stack scans two; dropout on)."""
    deeper = ["--config.model.arch.num_layers=3",  # and 3 decoder blocks (num_decoder_layers defaults to it)
              "--config.train.steps=30", "--config.train.eval_every=30", "--config.train.checkpoint_every=30"]
    runs = {}
    for scan in (False, True):
        out = train_main(*smoke_args(tmp_path / f"scan_{scan}", [*deeper, f"--config.model.scan_layers={scan}"],
                                     overrides=()))  # in this process: tests/in_process.py
        assert out.returncode == 0, out.stderr[-4000:]
        runs[scan] = records(tmp_path / f"scan_{scan}")
    assert json.loads((tmp_path / "scan_True" / "config.json").read_text())["model"]["scan_layers"] is True
    for key in ("loss", "ce", "contrastive", "grad_norm"):
        a, b = ([r[key] for r in runs[s] if key in r] for s in (False, True))
        assert len(a) == 3
        np.testing.assert_allclose(b, a, rtol=1e-3, err_msg=key)
    assert runs[True][-1]["eval_mean"] == pytest.approx(runs[False][-1]["eval_mean"], abs=1e-6)
