"""Evaluation by greedy generation: every evaluation set of every task, its metrics, and the mean score.

Two equivalent paths: with adapters (each example routed by its task id), or with ``eval.merge_adapters=True``
each task's adapter merged into the base weights (``kernel += adapter.merge(task).T``) and the base model run
with adapters off -- the zero-latency inference the paper advertises.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ept_jax.core import sharding as sharding_lib
from ept_jax.core.losses import token_nll
from ept_jax.core.params import AdapterContext
from ept_jax.data import eval_batches
from ept_jax.data.batching import collate_decoder_only, collate_seq2seq
from ept_jax.eval.metrics import compute_task_metrics, exact_match_accuracy, glue_average
from train import steps
from train.data import EvalSet
from train.state import TrainState, put_global

logger = logging.getLogger(__name__)


def _eval_sharding(mesh: Mesh, batch_size: int):
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    return sharding_lib.batch_sharding(mesh) if batch_size % data_ways == 0 else sharding_lib.replicated(mesh)


@functools.lru_cache(maxsize=8)
def _merge_fn(graphdef):
    return jax.jit(lambda trainable, frozen, task: steps.merged_frozen(graphdef, trainable, frozen, task))


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-host sharded) array as numpy, on every process."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def predict(state: TrainState, eval_set: EvalSet, tokenizer, mesh: Mesh, *, family: str, batch_size: int,
            max_length: int, max_new_tokens: int, merged_frozen=None) -> list[str]:
    """Decoded greedy generations for every example of ``eval_set``, in order (special tokens removed).

    ``merged_frozen``: the base weights with this set's task merged in; the model then runs with adapters off.
    """
    sh = _eval_sharding(mesh, batch_size)
    if merged_frozen is None:
        model = state.model()
    else:
        from flax import nnx

        model = nnx.merge(state.graphdef, state.trainable, merged_frozen)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = eos if pad is None else pad
    out: list[str] = []
    for batch in eval_batches(eval_set.encoded, eval_set.task_id, batch_size, max_length=max_length,
                              semantic=eval_set.semantic):
        ids = put_global(batch.arrays["input_ids"], sh)
        mask = put_global(batch.arrays["attention_mask"], sh)
        task_ids = put_global(batch.arrays["task_ids"], sh)
        semantic = batch.arrays.get("semantic")  # T-REX only
        semantic = None if semantic is None else put_global(semantic, sh)
        ctx = AdapterContext(task_ids=task_ids, semantic=semantic, adapters_enabled=merged_frozen is None)
        tokens = steps.generate(family, model, ids, mask, ctx, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                pad_token_id=int(pad))
        tokens = to_host(tokens)[batch.mask]
        out.extend(tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True))
    return out


def evaluate(state: TrainState, sets: Sequence[EvalSet], tokenizer, mesh: Mesh, config) -> dict[str, dict]:
    """``{set name: {metric: value (percent)}}`` for every set, by greedy generation (module docstring)."""
    family = str(config.model.family)
    merge = bool(config.eval.merge_adapters)
    results: dict[str, dict] = {}
    merged: dict[int, object] = {}
    for es in sets:
        frozen_t = None
        if merge:
            if es.task_id not in merged:
                merged.clear()  # one merged copy of the base weights at a time
                merged[es.task_id] = _merge_fn(state.graphdef)(state.trainable, state.frozen, es.task_id)
            frozen_t = merged[es.task_id]
        predictions = predict(
            state, es, tokenizer, mesh, family=family, batch_size=int(config.eval.batch_size),
            max_length=int(config.data.max_source_length), max_new_tokens=int(config.eval.max_new_tokens),
            merged_frozen=frozen_t,
        )
        if str(config.data.get("prompt_format", "letters")) == "cloze":  # free-text answers: exact match
            results[es.name] = exact_match_accuracy(predictions, es.encoded.references)
        else:
            results[es.name] = compute_task_metrics(es.task, predictions, es.encoded.references)
        logger.info("eval %s: %s; e.g. %r -> %r", es.name, _fmt(results[es.name]), es.encoded.references[0],
                    predictions[0])
    return results


@functools.lru_cache(maxsize=8)
def _loss_fn(graphdef, family: str):
    def fn(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        ctx = AdapterContext(task_ids=batch["task_ids"], semantic=batch.get("semantic"), deterministic=True)
        logits = steps.forward(family, model, batch, ctx)
        nll = token_nll(logits, batch["labels"]) * batch["label_mask"]
        return jnp.sum(nll), jnp.sum(batch["label_mask"])

    return jax.jit(fn)


def heldout_loss(state: TrainState, sets: Sequence[EvalSet], mesh: Mesh, config) -> dict[str, float]:
    """``{set name: mean token NLL}`` of the answers (the training targets, EOS included) of every evaluation
    set, teacher-forced with each example routed by its task id: the training loss on held-out examples, the
    curve that separates methods long before accuracy does."""
    family = str(config.model.family)
    batch_size = int(config.eval.batch_size)
    fn = _loss_fn(state.graphdef, family)
    sharding = _eval_sharding(mesh, batch_size)
    out = {}
    for es in sets:
        n = len(es.encoded)
        total, count = 0.0, 0.0
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            items = [(0, i) for i in idx] + [(0, idx[-1])] * (batch_size - len(idx))
            if family == "t5":
                b = collate_seq2seq([es.encoded], items, max_source_length=int(config.data.max_source_length),
                                    max_target_length=int(config.data.max_target_length),
                                    decoder_start_token_id=0)
            else:
                b = collate_decoder_only([es.encoded], items, max_length=int(config.data.max_source_length)
                                         + int(config.data.max_target_length))
            b["label_mask"][len(idx):] = 0  # the rows that only pad the batch
            b["task_ids"][:] = es.task_id
            if es.semantic is not None:
                b["semantic"] = es.semantic[[i for _, i in items]]
            b = {k: put_global(np.asarray(v), sharding) for k, v in b.items()}
            s, c = fn(state.trainable, state.frozen, b)
            total, count = total + float(s), count + float(c)
        out[es.name] = total / max(count, 1.0)
    return out


def mean_score(results: dict[str, dict], sets: Sequence[EvalSet], mode: str) -> float:
    """The mean score (``ept_jax.eval.metrics.glue_average``) with one entry per task.

    A task's entry is its set named after the task when there is one (MNLI matched, as GLUE tables report
    it), else all of its sets.
    """
    chosen = {}
    by_task: dict[str, list[str]] = {}
    for es in sets:
        by_task.setdefault(es.task, []).append(es.name)
    for task, names in by_task.items():
        for name in [task] if task in names else names:
            chosen[name] = results[name]
    return glue_average(chosen, mode)


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v))
