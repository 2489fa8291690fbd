"""Greedy decoding of a :class:`~ept_jax.models.llama.model.LlamaModel` with a preallocated KV cache (one compiled
program per shape)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ept_jax.core.params import AdapterContext
from ept_jax.models.llama.model import LlamaModel, check_mask, positions_from_mask

Array = jax.Array



def _eos_array(eos_token_id) -> Array:
    if eos_token_id is None:
        ids: list[int] = []
    elif isinstance(eos_token_id, (int, np.integer)):
        ids = [int(eos_token_id)]
    elif isinstance(eos_token_id, Sequence) and all(isinstance(e, (int, np.integer)) for e in eos_token_id):
        ids = [int(e) for e in eos_token_id]
    else:
        raise ValueError(f"eos_token_id={eos_token_id!r}: expected None, an int or a sequence of ints")
    return jnp.asarray(ids, jnp.int32).reshape(len(ids))


def generate(
    model: LlamaModel,
    input_ids: Array,
    attention_mask: Array | None = None,
    ctx: AdapterContext | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
) -> Array:
    """Greedy decoding with a preallocated KV cache, one compiled program per shape.

    Matches transformers' ``generate(do_sample=False, num_beams=1)``: positions from the mask, a sequence that
    emitted an EOS token emits ``pad_token_id`` afterwards, the loop stops early once every sequence is done.

    Args:
      model: the model; it is split into graph definition and state, so calls with new weights or inputs of
        the same shapes reuse the compiled program.
      input_ids: ``(B, P)`` prompts, LEFT padded.
      attention_mask: ``(B, P)``, 1 for prompt tokens; None = no padding.
      ctx: adapter context (``task_ids (B,)``); None generates with the base model.
    Returns:
      ``(B, max_new_tokens)`` int32 new tokens (``pad_token_id`` after EOS).
    Raises:
      ValueError: ``max_new_tokens < 1``, bad shapes, right-padded prompts or a malformed ``eos_token_id``.
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (batch, prompt_length >= 1); got shape {input_ids.shape}")
    mask = check_mask(attention_mask, input_ids.shape)
    if not isinstance(mask, jax.core.Tracer) and not bool(np.asarray(mask[:, -1]).all()):
        raise ValueError("generate needs LEFT-padded prompts: attention_mask[:, -1] must be 1 for every sequence")
    graphdef, state = nnx.split(model)
    return _generate_jit(graphdef, state, input_ids, mask, ctx, _eos_array(eos_token_id),
                         jnp.int32(pad_token_id), max_new_tokens=int(max_new_tokens))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate_jit(graphdef, state, input_ids, mask, ctx, eos, pad, *, max_new_tokens):
    b, prompt_len = input_ids.shape
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(b, prompt_len + max_new_tokens)
    kv_mask = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), bool)], axis=1)
    logits, cache = model.decode(input_ids, positions_from_mask(mask), kv_mask, cache, 0, ctx)
    n_prompt = mask.sum(axis=-1).astype(jnp.int32)

    def emit(t, token, finished, out):
        token = jnp.where(finished, pad, token)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, t))
        return token, finished | (token[:, None] == eos[None, :]).any(-1), out

    out = jnp.full((b, max_new_tokens), pad, jnp.int32)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    token, finished, out = emit(0, first, jnp.zeros((b,), bool), out)

    def cond(carry):
        t, _, _, _, finished, _ = carry
        return (t < max_new_tokens) & ~finished.all()

    def body(carry):
        t, token, cache, kv_mask, finished, out = carry
        slot = prompt_len + t - 1  # the slot of the token emitted at step t - 1
        kv_mask = jax.lax.dynamic_update_slice(kv_mask, jnp.ones((b, 1), bool), (0, slot))
        # A fresh merge per step keeps anything the model sows (adapter losses) local to this trace.
        step_model = nnx.merge(graphdef, state)
        logits, cache = step_model.decode(token[:, None], (n_prompt + t - 1)[:, None], kv_mask, cache, slot, ctx)
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        token, finished, out = emit(t, nxt, finished, out)
        return t + 1, token, cache, kv_mask, finished, out

    carry = (jnp.int32(1), token, cache, kv_mask, finished, out)
    return jax.lax.while_loop(cond, body, carry)[-1]
