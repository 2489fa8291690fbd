"""The jitted training step and the per-family forward / generation calls.

Shapes: ``B`` is the global batch, ``Ls``/``Lt`` the static source/target lengths (seq2seq), ``L`` the static
length (decoder-only), ``V`` the vocabulary. Batches follow the format documented in ``ept_jax.data``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from ept_jax import losses
from ept_jax import sharding as sharding_lib
from ept_jax.nn import AdapterContext, adapted_linears, pop_aux_losses
from train.state import TrainState

Array = jax.Array


def cross_entropy(logits: Array, labels: Array, mask: Array) -> Array:
    """Mean token cross-entropy over ``mask``: ``logits (B, L, V)``, ``labels``/``mask`` ``(B, L)`` -> scalar.

    Taken in float32 whatever the logits' dtype, with the one-pass backward of ``ept_jax.losses.token_nll``; a
    batch without any target token gives 0.
    """
    return losses.masked_mean_nll(logits, labels, mask)


def forward(family: str, model, batch: dict, ctx: AdapterContext | None) -> Array:
    """Teacher-forced logits: seq2seq ``(B, Lt, V)`` of ``decoder_input_ids``; decoder-only ``(B, L, V)``."""
    if family == "t5":
        return model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], None, ctx)
    return model(batch["input_ids"], batch["attention_mask"], ctx)


def generate(family: str, model, input_ids: Array, attention_mask: Array, ctx: AdapterContext | None, *,
             max_new_tokens: int, eos_token_id, pad_token_id: int) -> Array:
    """Greedy generation ``(B, max_new_tokens)`` int32 of prompts ``input_ids (B, Ls)`` with the family's decoder."""
    if family == "t5":
        from ept_jax.models.t5 import generate as gen
    else:
        from ept_jax.models.llama import generate as gen
    return gen(model, input_ids, attention_mask, ctx, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
               pad_token_id=pad_token_id)


def loss_fn(trainable, frozen, graphdef, batch: dict, dropout_rng: Array, *, family: str,
            contrastive_lambda: float) -> tuple[Array, dict[str, Array]]:
    """``ce + contrastive_lambda * mean(contrastive losses)`` of one training batch, and its parts."""
    model = nnx.merge(graphdef, trainable, frozen)
    ctx = AdapterContext(task_ids=batch["task_ids"], dropout_rng=dropout_rng, semantic=batch.get("semantic"),
                         deterministic=False)
    logits = forward(family, model, batch, ctx)
    aux = pop_aux_losses(model)
    ce = cross_entropy(logits, batch["labels"], batch["label_mask"])
    contrastive = jnp.mean(jnp.stack([a.astype(jnp.float32) for a in aux])) if aux else jnp.zeros((), jnp.float32)
    loss = ce + contrastive_lambda * contrastive
    return loss, {"ce": ce, "contrastive": contrastive}


@dataclasses.dataclass
class FlatState:
    """The leaves of a :class:`TrainState`'s ``trainable``, ``opt_state`` and ``frozen`` (lists of arrays)."""

    trainable: list
    opt_state: list
    frozen: list


class TrainStep:
    """The jitted training step ``(trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, metrics)``.

    The compiled program (:attr:`jitted`) takes and returns the states' *leaves*: flattening ``nnx.State`` s and
    rebuilding their Variables costs Python time per Variable on every call (about 60 ms a step for T5-small
    EPT's ~3,700 adapter and optimizer Variables on a 2-core CPU, more than a whole accelerator step). A loop
    keeps the leaves instead: ``flat = step.flatten(state)`` once, ``metrics = step.advance(flat, batch, i)``
    per step, and ``step.sync(flat, state)`` before anything reads ``state.trainable`` / ``state.opt_state``
    (evaluation, checkpoints). :meth:`__call__` is the same step over ``nnx.State`` s, for one-off calls.
    ``trainable`` and ``opt_state`` are donated: after a call, only its outputs are valid.
    """

    def __init__(self, jitted: Callable, tr_def, opt_def):
        self.jitted, self.tr_def, self.opt_def = jitted, tr_def, opt_def

    def flatten(self, state: TrainState) -> FlatState:
        """The leaves of ``state`` (the arrays themselves, not copies)."""
        return FlatState(jax.tree.leaves(state.trainable), jax.tree.leaves(state.opt_state),
                         jax.tree.leaves(state.frozen))

    def advance(self, flat: FlatState, batch: dict, step, frozen: list | None = None) -> dict:
        """One step on ``flat`` in place; returns the metrics. ``frozen`` (leaves) replaces ``flat.frozen``."""
        flat.trainable, flat.opt_state, metrics = self.jitted(
            flat.trainable, flat.opt_state, flat.frozen if frozen is None else frozen, batch, step)
        return metrics

    def sync(self, flat: FlatState, state: TrainState) -> None:
        """Writes ``flat``'s trainable and optimizer leaves into ``state`` (as ``nnx.State`` s)."""
        state.trainable = jax.tree.unflatten(self.tr_def, flat.trainable)
        state.opt_state = jax.tree.unflatten(self.opt_def, flat.opt_state)

    def __call__(self, trainable, opt_state, frozen, batch: dict, step):
        tr, opt, metrics = self.jitted(jax.tree.leaves(trainable), jax.tree.leaves(opt_state),
                                       jax.tree.leaves(frozen), batch, step)
        return jax.tree.unflatten(self.tr_def, tr), jax.tree.unflatten(self.opt_def, opt), metrics


def make_train_step(state: TrainState, tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh, *,
                    family: str, contrastive_lambda: float, seed: int) -> TrainStep:
    """The training step of ``state``'s model (see :class:`TrainStep` for how to call it).

    Gradients are taken with respect to ``trainable`` only. A non-finite loss or gradient norm leaves the
    parameters and the optimizer state unchanged (``metrics["finite"]`` is then 0); the caller applies
    ``train.nan_policy``. The dropout key is ``fold_in(PRNGKey(seed), step)``, so a resumed run draws the
    same masks.
    """
    graphdef = state.graphdef
    tr_def, opt_def, fr_def = (jax.tree.structure(t) for t in (state.trainable, state.opt_state, state.frozen))
    tr_sh, opt_sh, fr_sh = (jax.tree.leaves(t) for t in state.shardings)
    for name, sh, tdef in (("trainable", tr_sh, tr_def), ("opt_state", opt_sh, opt_def), ("frozen", fr_sh, fr_def)):
        if len(sh) != tdef.num_leaves:
            raise ValueError(f"state.shardings: the {name} sharding tree has {len(sh)} leaves, the state "
                             f"{tdef.num_leaves}: build the state with train.state.create_train_state")
    batch_sh = sharding_lib.batch_sharding(mesh)
    rep = sharding_lib.replicated(mesh)

    def step_fn(tr_leaves, opt_leaves, fr_leaves, batch, step):
        trainable = jax.tree.unflatten(tr_def, tr_leaves)
        opt_state = jax.tree.unflatten(opt_def, opt_leaves)
        frozen = jax.tree.unflatten(fr_def, fr_leaves)
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, parts), grads = grad_fn(trainable, frozen, graphdef, batch, rng, family=family,
                                       contrastive_lambda=contrastive_lambda)
        grad_norm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: [jnp.where(finite, n, o) for n, o in zip(jax.tree.leaves(new), old, strict=True)]
        metrics = {
            "loss": loss,
            "ce": parts["ce"],
            "contrastive": parts["contrastive"],
            "grad_norm": grad_norm,
            "lr": jnp.asarray(schedule(step), jnp.float32),
            "finite": finite.astype(jnp.int32),
        }
        return keep(new_trainable, tr_leaves), keep(new_opt, opt_leaves), metrics

    jitted = jax.jit(
        step_fn,
        in_shardings=(tr_sh, opt_sh, fr_sh, batch_sh, rep),
        out_shardings=(tr_sh, opt_sh, rep),
        donate_argnums=(0, 1),
    )
    return TrainStep(jitted, tr_def, opt_def)


def merged_frozen(graphdef, trainable, frozen, task: int | Array) -> nnx.State:
    """The frozen state with task ``task``'s adapter deltas added to the base kernels (``kernel += merge.T``).

    ``adapter.merge(task)`` is ``(d_out, d_in)`` (PyTorch layout); base kernels are ``(d_in, d_out)``.
    Run the result with ``AdapterContext(adapters_enabled=False)``: the adapters are then inert. ``frozen`` itself
    is left unchanged (eagerly or under jit).

    Raises:
      ValueError: an adapter that cannot be merged (its delta depends on the token).
    """
    from ept_jax.nn import TRAINABLE

    # nnx.merge reuses the Variables of the states it is given: rebuild them, so that adding the deltas below
    # never writes into the caller's frozen state (outside jit the arrays would otherwise be replaced in place).
    model = nnx.merge(graphdef, trainable, jax.tree.map(lambda x: x, frozen))
    for path, lin in adapted_linears(model):
        if not lin.adapter.mergeable:
            raise ValueError(
                f"eval.merge_adapters=True but the adapter of {lin.name or path} ({type(lin.adapter).__name__}) "
                "cannot be merged into the base weights; set eval.merge_adapters=False"
            )
        kernel = lin.base.kernel
        kernel[...] = kernel[...] + lin.adapter.merge(task).T.astype(kernel[...].dtype)
    return nnx.split(model, TRAINABLE, ...)[2]
