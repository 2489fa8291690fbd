"""The jitted training step and the per-family forward / generation calls.

Shapes: ``B`` is the global batch, ``Ls``/``Lt`` the static source/target lengths (seq2seq), ``L`` the static
length (decoder-only), ``V`` the vocabulary. Batches follow the format documented in ``ept_jax.data``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from ept_jax import sharding as sharding_lib
from ept_jax.nn import AdapterContext, adapted_linears, pop_aux_losses
from train.state import TrainState

Array = jax.Array


def cross_entropy(logits: Array, labels: Array, mask: Array) -> Array:
    """Mean token cross-entropy over ``mask``: ``logits (B, L, V)``, ``labels``/``mask`` ``(B, L)`` -> scalar.

    The log-softmax is taken in float32 whatever the logits' dtype; a batch without any target token gives 0.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


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


def make_train_step(state: TrainState, tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh, *,
                    family: str, contrastive_lambda: float, seed: int) -> Callable:
    """The jitted step ``(trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, metrics)``.

    Gradients are taken with respect to ``trainable`` only. A non-finite loss or gradient norm leaves the
    parameters and the optimizer state unchanged (``metrics["finite"]`` is then 0); the caller applies
    ``train.nan_policy``. The dropout key is ``fold_in(PRNGKey(seed), step)``, so a resumed run draws the
    same masks. ``trainable`` and ``opt_state`` are donated.
    """
    graphdef = state.graphdef
    tr_sh, opt_sh, fr_sh = state.shardings
    batch_sh = sharding_lib.batch_sharding(mesh)
    rep = sharding_lib.replicated(mesh)

    def step_fn(trainable, opt_state, frozen, batch, step):
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, parts), grads = grad_fn(trainable, frozen, graphdef, batch, rng, family=family,
                                       contrastive_lambda=contrastive_lambda)
        grad_norm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics = {
            "loss": loss,
            "ce": parts["ce"],
            "contrastive": parts["contrastive"],
            "grad_norm": grad_norm,
            "lr": jnp.asarray(schedule(step), jnp.float32),
            "finite": finite.astype(jnp.int32),
        }
        return keep(new_trainable, trainable), keep(new_opt, opt_state), metrics

    return jax.jit(
        step_fn,
        in_shardings=(tr_sh, opt_sh, fr_sh, batch_sh, rep),
        out_shardings=(tr_sh, opt_sh, rep),
        donate_argnums=(0, 1),
    )


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
