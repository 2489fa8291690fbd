"""The ept_jax rows: the frozen-base limit, the real training step of every adapter, and greedy generation.

* limit: the frozen base model's forward (teacher-forced logits and the training cross-entropy) plus the
  gradient to its input embeddings, none to any weight: the work every adapter method must do at least.
* training: ``train.steps.make_train_step`` over ``train.state.create_train_state`` (the program's jitted step:
  loss, gradient to the adapter parameters, clipping, AdamW), called exactly as ``train.loop`` calls it.
* generation: ``train.steps.generate`` (the family's KV-cached greedy decoder) of the base model, of the EPT
  model with task 0's delta merged into the base weights (``train.steps.merged_frozen``, adapters disabled) and
  of the unmerged adapter path (every example routed to its task), ``gen_new`` tokens, no early stop.

Each function returns row dicts (schema in ``benchmarks.run``).
"""

from __future__ import annotations

import gc
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import measure, setups
from benchmarks.setups import ModelSpec
from ept_jax.core import sharding as sharding_lib
from ept_jax.core.params import AdapterContext
from train import state as state_lib
from train import steps


def row(spec: ModelSpec, name: str, kind: str, shapes: dict[str, int], **fields) -> dict[str, Any]:
    """A row dict with the identifying fields filled; ``fields`` adds or overrides the rest."""
    shape_id = "_".join(f"{k}{v}" for k, v in shapes.items())
    n_exp = fields.get("n_experts")
    rid = f"{spec.name}/{name}/{shape_id}" + (f"_experts{n_exp}" if n_exp else "")
    out = {"id": rid, "model": spec.name, "family": spec.family, "row": name, "kind": kind, "framework": "jax",
           "shapes": dict(shapes), "status": "ok", "reason": None, "sweep": "main", "n_experts": None,
           "median_s": None, "times_s": [], "warmup": 0, "compile_s": None, "memory": {}, "tokens": None,
           "tokens_per_s": None, "flops_per_call": None, "mfu": None, "params": {}}
    out.update(fields)
    return out


def _memory(compiled, sampler_delta: int | None) -> dict[str, Any]:
    mem: dict[str, Any] = dict(measure.xla_memory(compiled) or {})
    mem["rss_peak_delta_bytes"] = sampler_delta
    mem["device_peak_bytes_in_use"] = measure.device_peak_bytes()
    return mem


def finish_row(r: dict[str, Any], timing: dict[str, Any], compiled, compile_s: float, dtype: str) -> dict[str, Any]:
    r.update(median_s=timing["median_s"], times_s=timing["times_s"], warmup=timing["warmup"], compile_s=compile_s,
             memory=_memory(compiled, timing.get("rss_peak_delta_bytes")))
    if r["tokens"]:
        r["tokens_per_s"] = r["tokens"] / timing["median_s"]
    peak = measure.peak_flops(jax.devices()[0].device_kind, dtype)
    r["mfu"] = measure.mfu(r["flops_per_call"], timing["median_s"], peak)
    return r


def rss_sampler() -> measure.RssSampler | None:
    return measure.RssSampler() if jax.default_backend() == "cpu" else None


class _EmbeddingTap:
    """Stands in for a model's token embedding: its ``k``-th call returns the lookup plus ``offsets[k]``.

    The gradient of the loss with respect to the (zero) offsets is the gradient to the input embeddings of
    the encoder and decoder (T5: calls 0 and 1) or of the decoder-only stack (call 0), with the model's own
    forward run unchanged. ``attend`` (the tied output projection) is the embedding's own.
    """

    def __init__(self, inner, offsets):
        self.inner, self.offsets, self.calls = inner, offsets, 0

    def __call__(self, ids):
        out = self.inner(ids) + self.offsets[self.calls].astype(self.inner.dtype)
        self.calls += 1
        return out

    def attend(self, x):
        return self.inner.attend(x)


def _tap(family: str, model, offsets) -> None:
    # object.__setattr__: a traced-only stand-in, never split or stored, so NNX need not track it.
    if family == "t5":
        object.__setattr__(model, "shared", _EmbeddingTap(model.shared, offsets))
    else:
        object.__setattr__(model.model, "embed_tokens", _EmbeddingTap(model.model.embed_tokens, offsets))


def limit_calls(spec: ModelSpec, tensors: dict[str, np.ndarray], seqs: tuple[int, ...], *, dtype: str):
    """Yields ``(shapes, call, compiled, compile_s, weights)`` of the limit at each sequence length of ``seqs``.

    The program is ``jit(value_and_grad(loss wrt input embeddings))``: the base model (no adapters) gets
    ``tensors``; its weights are an undifferentiated argument, so XLA computes no weight gradient. Offsets are
    ``(B, Ls, d)`` and ``(B, Lt, d)`` (T5) or ``(B, L, d)`` (LLaMA). ``call()`` runs it once.
    """
    config = setups.bench_config(spec, None, dtype=dtype)
    model = setups.jax_model(config, tensors)
    graphdef, weights = nnx.split(model)
    del model
    d = int(spec.arch.get("d_model", spec.arch.get("hidden_size")))
    family = spec.family
    cdt = jnp.dtype(dtype)

    def loss(offsets, weights, batch):
        m = nnx.merge(graphdef, weights)
        _tap(family, m, offsets)
        logits = steps.forward(family, m, batch, None)
        return steps.cross_entropy(logits, batch["labels"], batch["label_mask"])

    fn = jax.jit(jax.value_and_grad(loss))
    for seq in seqs:
        shapes = spec.shapes(seq)
        batch = {k: jnp.asarray(v) for k, v in setups.train_batch(spec, seq).items()}
        lengths = (shapes["source_len"], shapes["target_len"]) if family == "t5" else (shapes["seq_len"],)
        offsets = tuple(jnp.zeros((spec.batch, n, d), cdt) for n in lengths)
        compiled, compile_s = measure.compile_jit(fn, offsets, weights, batch)
        yield shapes, (lambda c=compiled, o=offsets, b=batch: c(o, weights, b)), compiled, compile_s, weights


def limit_rows(spec: ModelSpec, tensors: dict[str, np.ndarray], seqs: tuple[int, ...], *, reps: int, warmup: int,
               dtype: str) -> list[dict[str, Any]]:
    """The limit (:func:`limit_calls`) timed at each sequence length of ``seqs``."""
    rows = []
    for shapes, call, compiled, compile_s, weights in limit_calls(spec, tensors, seqs, dtype=dtype):
        timing = measure.time_calls(call, reps=reps, warmup=warmup, sampler=rss_sampler())
        r = row(spec, "limit", "limit", shapes, tokens=setups.tokens(spec, shapes),
                flops_per_call=setups.frozen_flops(spec, weights, shapes),
                params={"base": setups.count(weights), "trainable": 0})
        rows.append(finish_row(r, timing, compiled, compile_s, dtype))
    return rows


def train_calls(spec: ModelSpec, adapter: dict[str, Any], tensors: dict[str, np.ndarray], seqs: tuple[int, ...], *,
                dtype: str, config=None, task_ids: np.ndarray | None = None):
    """Yields ``(shapes, call, compiled, compile_s, st, step_fn, flat)`` of the training step at each length.

    ``call()`` runs one step of ``train.steps.make_train_step`` over ``train.state.create_train_state``, on the
    states' leaves as ``train.loop`` does (``TrainStep.advance``); ``trainable`` and ``opt_state`` are donated, so
    each call's outputs feed the next (``flat`` holds the latest; ``step_fn.sync(flat, st)`` writes them back).
    ``config``: the run's config (None: ``setups.bench_config(spec, adapter, dtype=dtype)``); ``task_ids``: the
    batch's ``(B,)`` task ids (None: ``setups.train_batch``'s).
    """
    if config is None:
        config = setups.bench_config(spec, adapter, dtype=dtype)
    model = setups.jax_model(config, tensors)
    mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    tx, schedule = state_lib.make_optimizer(config)
    st = state_lib.create_train_state(model, tx, mesh)
    del model
    step_fn = steps.make_train_step(st, tx, schedule, mesh, **state_lib.step_options(config))
    batch_sh = sharding_lib.batch_sharding(mesh)
    step = jnp.asarray(1000, jnp.int32)
    flat = step_fn.flatten(st)
    for seq in seqs:
        shapes = spec.shapes(seq)
        batch = setups.train_batch(spec, seq)
        if task_ids is not None:
            batch["task_ids"] = task_ids
        batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
        compiled, compile_s = measure.compile_jit(step_fn.jitted, flat.trainable, flat.opt_state, flat.frozen,
                                                  batch, step)

        def call(c=compiled, b=batch, f=flat):
            f.trainable, f.opt_state, metrics = c(f.trainable, f.opt_state, f.frozen, b, step)
            return f.trainable, metrics

        yield shapes, call, compiled, compile_s, st, step_fn, flat


def train_rows(spec: ModelSpec, name: str, adapter: dict[str, Any], tensors: dict[str, np.ndarray],
               seqs: tuple[int, ...], *, reps: int, warmup: int, dtype: str, n_experts: int | None = None,
               sweep: str = "main") -> tuple[list[dict[str, Any]], state_lib.TrainState]:
    """The training step (:func:`train_calls`) for ``adapter`` timed at each length of ``seqs``; also returns the
    state, holding the last step's parameters."""
    rows, st = [], None
    for shapes, call, compiled, compile_s, st, step_fn, flat in train_calls(spec, adapter, tensors, seqs,
                                                                           dtype=dtype):
        timing = measure.time_calls(call, reps=reps, warmup=warmup, sampler=rss_sampler())
        step_fn.sync(flat, st)
        params = {"base": setups.count(st.frozen), "trainable": setups.count(st.trainable)}
        r = row(spec, name, "train", shapes, sweep=sweep, n_experts=n_experts, tokens=setups.tokens(spec, shapes),
                flops_per_call=setups.frozen_flops(spec, st.frozen, shapes), params=params,
                adapter={k: (list(v) if isinstance(v, tuple) else v) for k, v in adapter.items()})
        rows.append(finish_row(r, timing, compiled, compile_s, dtype))
    gc.collect()
    return rows, st


def generate_call(spec: ModelSpec, graphdef, state: nnx.State, ctx: AdapterContext | None):
    """``(call, compiled, compile_s)``: greedy generation of ``gen_new`` tokens for the prompt batch under one jit.

    ``eos_token_id=None``: every call decodes exactly ``gen_new`` tokens, so all three variants do equal work.
    """
    prompts = setups.prompt_batch(spec)
    ids, mask = jnp.asarray(prompts["input_ids"]), jnp.asarray(prompts["attention_mask"])
    family, new = spec.family, spec.gen_new

    def gen(state, ids, mask, ctx):
        return steps.generate(family, nnx.merge(graphdef, state), ids, mask, ctx, max_new_tokens=new,
                              eos_token_id=None, pad_token_id=0)

    compiled, compile_s = measure.compile_jit(jax.jit(gen), state, ids, mask, ctx)
    return (lambda: compiled(state, ids, mask, ctx)), compiled, compile_s


def generate_row(spec: ModelSpec, name: str, graphdef, state: nnx.State, ctx: AdapterContext | None, *, reps: int,
                 warmup: int, dtype: str) -> dict[str, Any]:
    """The row of :func:`generate_call`; ``tokens_per_s`` counts generated tokens, ``B * gen_new`` per call
    (prefill / encoding included in the time)."""
    call, compiled, compile_s = generate_call(spec, graphdef, state, ctx)
    timing = measure.time_calls(call, reps=reps, warmup=warmup, sampler=rss_sampler())
    shapes = {"batch": spec.batch, "prompt_len": spec.gen_prompt, "new_tokens": spec.gen_new}
    r = row(spec, name, "generate", shapes, tokens=spec.batch * spec.gen_new,
            program=measure.program_fingerprint(compiled))
    return finish_row(r, timing, compiled, compile_s, dtype)


def generation_models(spec: ModelSpec, tensors: dict[str, np.ndarray], ept: state_lib.TrainState, *, dtype: str):
    """Yields ``(name, graphdef, state, ctx)`` of ``generate_base``, ``generate_merged`` (EPT, task 0 merged) and
    ``generate_unmerged`` (EPT, routed), one at a time (each state is dropped before the next is built)."""
    base = setups.jax_model(setups.bench_config(spec, None, dtype=dtype), tensors)
    gd, st = nnx.split(base)
    del base
    yield "generate_base", gd, st, None
    del st
    task_ids = jnp.asarray(setups.prompt_batch(spec)["task_ids"])
    graphdef = ept.graphdef
    # Under jit, as train.evaluation merges: called eagerly, merged_frozen writes the merged kernels into the
    # Variables of the frozen state it is given (nnx.merge shares them), and the unmerged row would then run
    # on merged weights.
    merged = jax.jit(lambda tr, fr: steps.merged_frozen(graphdef, tr, fr, 0))(ept.trainable, ept.frozen)
    # One graphdef for the whole model, so the state passed in is the merge of both parts.
    full_gd, merged_state = nnx.split(nnx.merge(graphdef, ept.trainable, merged))
    off = AdapterContext(task_ids=jnp.zeros_like(task_ids), adapters_enabled=False)
    yield "generate_merged", full_gd, merged_state, off
    del merged, merged_state
    _, unmerged_state = nnx.split(nnx.merge(graphdef, ept.trainable, ept.frozen))
    yield "generate_unmerged", full_gd, unmerged_state, AdapterContext(task_ids=task_ids)


def generation_rows(spec: ModelSpec, tensors: dict[str, np.ndarray], ept: state_lib.TrainState, *, reps: int,
                    warmup: int, dtype: str) -> list[dict[str, Any]]:
    """The rows of :func:`generation_models`."""
    return [generate_row(spec, name, gd, st, ctx, reps=reps, warmup=warmup, dtype=dtype)
            for name, gd, st, ctx in generation_models(spec, tensors, ept, dtype=dtype)]
