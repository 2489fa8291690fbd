"""The training run: build, restore, train with periodic evaluation and checkpoints, evaluate the best.

:func:`run` is what ``python -m train.main`` calls. Restarting it with the same config and workdir continues
from the latest checkpoint and ends identical to an uninterrupted run: the parameters, the optimizer state, the
step (hence the learning rate and the dropout keys, ``fold_in(seed, step)``) and the data-iterator position all
come back, and ``metrics.jsonl`` is cut back to the restored step. Metric intervals are cut at every checkpoint
step, so the records written after a resume are the ones the uninterrupted run writes.

``EPT_STOP_AFTER_STEP=N`` (environment) ends the run cleanly after the first checkpoint at a step >= N: the
interruption the resume tests (and a scheduler's preemption) need, with the schedule of the full run.

:data:`train.faults.FAULTS` (the reliability tests' seam) can run chosen updates on NaN base weights, so their
loss and gradients are NaN and ``train.nan_policy`` decides what happens.
A run whose ``_Run`` set-up fails (bad config, data or model) removes the workdir if this call created it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from ept_jax.core import sharding as sharding_lib
from ept_jax.core.params import TRAINABLE
from train import configuration, evaluation, faults, gc_policy, rundir, steps, throughput
from train import state as state_lib
from train.checkpointing import Checkpointer
from train.data import build_data
from train.errors import NonFiniteLossError, UserError
from train.logger import MetricsLogger
from train.rundir import WorkdirLock, run_identity

logger = logging.getLogger(__name__)

STOP_ENV = "EPT_STOP_AFTER_STEP"
RESULTS_FILE = "results.json"
_AVERAGED = ("loss", "ce", "contrastive", "grad_norm")


def _stop_after() -> int | None:
    value = os.environ.get(STOP_ENV)
    if not value:
        return None
    try:
        return int(value)
    except ValueError as e:
        raise UserError(f"{STOP_ENV}={value!r} is not an integer step") from e


def _poisoned(frozen):
    """``frozen`` with every floating-point array multiplied by NaN (same shapes and shardings: no recompile)."""
    return jax.tree.map(lambda x: x * np.nan if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, frozen)


def _check_batch(config, mesh) -> None:
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if int(config.train.batch_size) % ways:
        raise UserError(
            f"train.batch_size={config.train.batch_size} is not divisible by the data-parallel mesh size "
            f"mesh.data x mesh.fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {ways}"
        )


def _summarise(pending: list[dict[str, np.ndarray]]) -> tuple[dict[str, Any], list[int]]:
    """Interval means of the training metrics over the finite steps, the lr of the last step, and the indices
    (into ``pending``) of the non-finite steps."""
    bad = [i for i, m in enumerate(pending) if not int(m["finite"])]
    good = [m for i, m in enumerate(pending) if i not in set(bad)]
    record: dict[str, Any] = {}
    for key in _AVERAGED:
        record[key] = float(np.mean([float(m[key]) for m in good])) if good else float("nan")
    record["lr"] = float(pending[-1]["lr"])
    return record, bad


class _Run:
    """The state of one :func:`run` call (kept in one object so the loop body stays readable)."""

    def __init__(self, config, workdir: Path, *, allow_config_change: bool, devices):
        self.config = config
        self.workdir = workdir
        sharding_lib.maybe_initialize_distributed()
        self.is_main = rundir.is_writer()
        configuration.validate(config)
        configuration.check_same_across_processes(config)
        if self.is_main:
            workdir.mkdir(parents=True, exist_ok=True)
        # Checked now, written only once everything is built: a refused command leaves the workdir untouched.
        changes = configuration.reconcile(workdir, config, allow_change=allow_config_change, write=False)
        for change in changes:
            logger.warning("config change accepted (--allow_config_change): %s", change)
        mesh_cfg = config.mesh.to_dict() if hasattr(config.mesh, "to_dict") else dict(config.mesh)
        self.mesh = sharding_lib.make_mesh(mesh_cfg, devices)
        _check_batch(config, self.mesh)
        self.family = str(config.model.family)

        t0 = time.time()
        model = state_lib.build_model(config)
        self.tokenizer = state_lib.load_tokenizer(config)
        state_lib.check_tokenizer(self.tokenizer, model)
        # This process's rows of every global batch: only those are read, tokenised and collated here.
        self.batch_sharding = sharding_lib.batch_sharding(self.mesh)
        self.global_batch = int(config.train.batch_size)
        self.rows = sharding_lib.process_rows(self.batch_sharding, self.global_batch)
        self.data = build_data(config, self.tokenizer, getattr(model.cfg, "decoder_start_token_id", 0),
                               workdir=workdir, rows=None if len(self.rows) == self.global_batch else self.rows)
        state_lib.check_lr_multipliers(config, nnx.state(model, TRAINABLE))
        self.tx, self.schedule = state_lib.make_optimizer(config)
        self.state = state_lib.create_train_state(model, self.tx, self.mesh)
        del model
        n_train = sum(x.size for x in jax.tree.leaves(self.state.trainable))
        n_base = sum(x.size for x in jax.tree.leaves(self.state.frozen))
        self.flops_per_token = throughput.training_flops_per_token(n_base)
        self.peak_flops = throughput.peak_flops(self.mesh.devices.flat[0].device_kind, str(config.model.dtype))
        if self.peak_flops is not None:
            self.peak_flops *= self.mesh.devices.size
        logger.info("model built in %.1fs: %d trainable adapter parameters, %d frozen; mesh %s", time.time() - t0,
                    n_train, n_base, dict(self.mesh.shape))

        self.identity = run_identity(config)
        self.ckpt = Checkpointer(workdir, int(config.train.keep_checkpoints))
        self.host: dict[str, Any] = {"step": 0, "skipped_steps": 0, "best_score": None, "best_step": None}
        restored = self.ckpt.restore_latest(self.state.trainable, self.state.opt_state, self.identity)
        if restored is not None:
            self.state.trainable, self.state.opt_state, host = restored
            self.data.batches.load_state_dict(host["data_state"])
            self.host.update({k: host[k] for k in ("step", "skipped_steps", "best_score", "best_step")})
            logger.info("resumed from %s at step %d", self.ckpt.dir / str(host["step"]), host["step"])
        if self.is_main:
            configuration.reconcile(workdir, config, allow_change=True, write=True)
        self.step = int(self.host["step"])
        self.log = MetricsLogger(workdir, start_step=self.step, total_steps=int(config.train.steps),
                                 is_main=self.is_main)
        self.train_step = steps.make_train_step(self.state, self.tx, self.schedule, self.mesh,
                                                **state_lib.step_options(config))

    # -- pieces of the loop --------------------------------------------------------------------------------

    def _host_state(self) -> dict[str, Any]:
        return {**self.identity, **{k: self.host[k] for k in ("skipped_steps", "best_score", "best_step")},
                "step": self.step, "data_state": self.data.batches.state_dict()}

    def _flush(self, pending: list, first_step: int, tokens: int, t_start: float) -> dict[str, Any]:
        """Waits for the interval's steps and summarises them; throughput is over their completion (the steps are
        dispatched asynchronously, so the time is read after their results arrive, never before)."""
        fetched = jax.device_get(pending)
        seconds = time.time() - t_start
        if jax.process_count() > 1:  # each process counted the tokens of its own rows
            from jax.experimental import multihost_utils

            tokens = int(np.sum(multihost_utils.process_allgather(np.asarray(tokens, np.int32))))
        record, bad = _summarise(fetched)
        if bad:
            bad_steps = [first_step + i + 1 for i in bad]
            if self.config.train.nan_policy == "stop":
                self.ckpt.wait()
                last = self.ckpt.steps()
                raise NonFiniteLossError(
                    f"the loss or gradients became NaN/Inf at step {bad_steps[0]} (train.nan_policy='stop'); the "
                    f"parameters never took that update and the last checkpoint "
                    f"({self.ckpt.dir / str(last[-1]) if last else 'none yet'}) is intact. Set "
                    "train.nan_policy='skip' to skip such steps, or lower train.learning_rate"
                )
            self.host["skipped_steps"] += len(bad)
            logger.warning("non-finite loss or gradients at step(s) %s: skipped (parameters unchanged)", bad_steps)
        record["skipped_steps"] = int(self.host["skipped_steps"])
        record["tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0
        record["step_s"] = seconds / max(1, len(pending))
        util = throughput.mfu(self.flops_per_token * tokens, seconds, self.peak_flops)
        if util is not None:  # accelerators whose peak is known (train.throughput.PEAK_FLOPS)
            record["mfu"] = util
        record["elapsed_s"] = time.time() - self.t_start
        return record

    def _evaluate(self, record: dict[str, Any]) -> None:
        """Evaluates the dev sets into ``record``; the best step is the highest mean score of greedy generation,
        or, with ``eval.generation=False``, the lowest mean held-out answer loss (``score = -loss``)."""
        cfg = self.config
        results = None
        if cfg.eval.get("generation", True):
            results = evaluation.evaluate(self.state, self.data.dev, self.tokenizer, self.mesh, cfg)
            score = evaluation.mean_score(results, self.data.dev, str(cfg.eval.average))
            record["eval"] = results
            record["eval_mean"] = score
        if cfg.eval.get("answer_loss", True):
            losses = evaluation.heldout_loss(self.state, self.data.dev, self.mesh, cfg)
            record["eval_loss"] = losses
            record["eval_loss_mean"] = sum(losses.values()) / len(losses)
            if results is None:
                score = -record["eval_loss_mean"]
        best = self.host["best_score"]
        if best is None or (math.isfinite(score) and score > best):
            self.host["best_score"], self.host["best_step"] = score, self.step
            self.ckpt.save_best(self.step, self.state.trainable,
                                {**self.identity, "step": self.step, "score": score, "eval": results})
            record["best"] = True

    def _final_test(self) -> dict[str, Any]:
        """The best checkpoint's scores on the test sets (written to ``results.json``)."""
        self.ckpt.wait()
        best = self.ckpt.restore_best(self.state.trainable, self.identity)
        out: dict[str, Any] = {"best_step": self.host["best_step"], "best_dev_mean": self.host["best_score"],
                               "steps": int(self.config.train.steps), "skipped_steps": self.host["skipped_steps"]}
        out["selection"] = "eval_mean" if self.config.eval.get("generation", True) else "-eval_loss_mean"
        best_state = None if best is None else dataclasses.replace(self.state, trainable=best[0])
        if best_state is not None and self.config.eval.final_test and self.data.test and \
                self.config.eval.get("generation", True):
            results = evaluation.evaluate(best_state, self.data.test, self.tokenizer, self.mesh, self.config)
            out["test"] = results
            out["test_mean"] = evaluation.mean_score(results, self.data.test, str(self.config.eval.average))
            logger.info("test sets at the best step %s: mean %.2f", out["best_step"], out["test_mean"])
        if best_state is not None and self.config.eval.get("choice_format") is not None:
            from train import score

            out["choices"] = score.choice_scores(self.config, best_state.model(), self.tokenizer)
            logger.info("multiple-choice scores (%s) at the best step %s: mean acc_norm %.2f in %.0fs",
                        out["choices"]["format"], out["best_step"], out["choices"]["mean"]["acc_norm"],
                        out["choices"]["seconds"])
        if self.is_main:
            rundir.write_json_atomic(self.workdir / RESULTS_FILE, out)
        return out

    # -- the loop ------------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        cfg = self.config.train
        total, stop_after, nan_steps = int(cfg.steps), _stop_after(), faults.FAULTS.nan_at_steps
        kill_before = faults.FAULTS.kill_before_step
        pending: list = []
        interval_start, tokens, t_interval = self.step, 0, time.time()
        self.t_start = time.time()
        flat = self.train_step.flatten(self.state)  # the loop's parameters; self.state is synced when read
        while self.step < total:
            if self.step + 1 == kill_before:  # the reliability tests' seam (train/faults.py)
                self.ckpt.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            np_batch = next(self.data.batches)
            batch = {k: state_lib.put_rows(v, self.batch_sharding, self.rows, self.global_batch)
                     for k, v in np_batch.items()}
            tokens += int(np_batch["attention_mask"].sum()) + int(np_batch["label_mask"].sum())
            frozen = jax.tree.leaves(_poisoned(self.state.frozen)) if self.step + 1 in nan_steps else None
            pending.append(self.train_step.advance(flat, batch, np.int32(self.step), frozen))
            self.step += 1
            s = self.step
            is_eval = s % int(cfg.eval_every) == 0 or s == total
            is_ckpt = s % int(cfg.checkpoint_every) == 0 or s == total
            if not (s % int(cfg.log_every) == 0 or is_eval or is_ckpt):
                continue
            record = {"step": s, **self._flush(pending, interval_start, tokens, t_interval)}
            if is_eval or is_ckpt:  # the only readers of self.state's adapters (a sync unstacks every leaf)
                self.train_step.sync(flat, self.state)
            if is_eval:
                self._evaluate(record)
            self.log.write(record)
            if is_ckpt:
                self.ckpt.save(s, self.state.trainable, self.state.opt_state, self._host_state())
            pending, interval_start, tokens, t_interval = [], s, 0, time.time()
            if stop_after is not None and is_ckpt and s >= stop_after and s < total:
                logger.info("%s=%d: stopping after the checkpoint at step %d", STOP_ENV, stop_after, s)
                self._log_encoded()
                return {"step": s, "stopped": True}
        self._log_encoded()
        return {"step": self.step, "stopped": False, **self._final_test()}

    def _log_encoded(self) -> None:
        """How many training examples this process tokenised: those of its own rows of the batches it ran."""
        counts = [len(t.encoded_indices) for t in self.data.batches.tasks if hasattr(t, "encoded_indices")]
        logger.info("process %d: tokenised %d of %d training examples (its %d rows of every batch of %d)",
                    jax.process_index(), sum(counts), sum(self.data.train_sizes.values()), len(self.rows),
                    self.global_batch)

    def close(self, failed: bool = False, peer_gone: bool = False) -> None:
        """Waits for pending checkpoint writes and closes the managers and the logger; after a failure (``failed``)
        a write that fails too (the same full disk) is logged, not raised over the first error. ``peer_gone``:
        another process of the job is gone, so a pending write's commit waits on a barrier it never reaches (and
        then the heartbeat timeout aborts this process): the checkpointer is left alone, the logger closed."""
        if peer_gone:
            self.log.close()
            return
        try:
            self.ckpt.wait()
        except Exception as e:
            if not failed:
                raise
            logger.warning("a pending checkpoint write failed too: %s", str(e).splitlines()[0][:300] if str(e) else e)
        finally:
            self.ckpt.close()
            self.log.close()


def run(config, workdir: str | os.PathLike, *, allow_config_change: bool = False, devices=None) -> dict[str, Any]:
    """Trains (or resumes) the run of ``config`` in ``workdir``; returns a summary (final step, best, test scores).

    Args:
      config: a ConfigDict with the schema of ``configs/common.py``; ``train.steps=0`` only evaluates the
        untrained model (:mod:`train.eval_only`).
      workdir: the run's directory (created; a restart with the same one resumes).
      allow_config_change: accept a config that contradicts the one saved in ``workdir``.
      devices: the devices of the mesh (default: all).
    Raises:
      UserError / ValueError / ...: bad config or input, named in the message (see ``train/errors.py``).
    """
    created = not Path(workdir).exists()
    sharding_lib.maybe_initialize_distributed()  # before anything touches a JAX backend (jax.process_index too)
    # one workdir, one run (train/rundir.py); of a multi-process job, process 0 holds it for the job
    lock = WorkdirLock(workdir) if rundir.is_writer() else None
    try:
        if lock is not None:
            lock.acquire()
        if config.train.steps == 0:  # "evaluate and stop" (train/eval_only.py): nothing trained, nothing to lose
            from train import eval_only

            out = eval_only.run(config, workdir, allow_config_change=allow_config_change, devices=devices)
            if lock is not None:
                lock.release()
            return out
        r = _Run(config, Path(workdir), allow_config_change=allow_config_change, devices=devices)
        gc_policy.settle()  # the model, data and optimizer state live as long as the run: out of the collector's way
    except BaseException:
        if lock is not None:
            lock.release()
        # Nothing was trained: a refused command leaves no empty (or config-only) workdir behind.
        if created and rundir.is_writer():
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    failed, peer_gone = True, False
    try:
        out = r.train()
        failed = False
        return out
    except jax.errors.JaxRuntimeError:
        peer_gone = jax.process_count() > 1  # a collective failed: train.main exits at once (EXIT_PEER_LOST)
        raise
    finally:
        try:
            r.close(failed=failed, peer_gone=peer_gone)
        finally:
            gc_policy.release()  # this run's model and state: collectable again once the caller drops them
            if lock is not None:
                lock.release()
