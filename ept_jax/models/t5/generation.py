"""Greedy generation for the T5 family: encoder once, cached decoder steps, one compiled program per shape.

The model enters the compiled function as ``nnx.split`` graph definition (static) and state (traced), so new
weights, new prompts or new special-token ids of the same shapes reuse the compiled program. The decoder's
self-attention cache is preallocated for ``max_new_tokens`` slots and the loop is a ``lax.while_loop`` that
stops as soon as every sequence has emitted an EOS token.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ept_jax.core.params import AdapterContext

Array = jax.Array


EOS_SLOTS = 4


def eos_array(eos_token_id) -> Array:
    """``eos_token_id`` (None, an int or a sequence of ints) as an int32 vector padded with -1 (never a token)
    to a multiple of :data:`EOS_SLOTS` entries, so that no EOS, one EOS or a few share one compiled
    program."""
    if eos_token_id is None:
        ids: list[int] = []
    elif isinstance(eos_token_id, (int, np.integer)) and not isinstance(eos_token_id, bool):
        ids = [int(eos_token_id)]
    elif isinstance(eos_token_id, Sequence) and not isinstance(eos_token_id, str) and all(
        isinstance(e, (int, np.integer)) for e in eos_token_id
    ):
        ids = [int(e) for e in eos_token_id]
    else:
        raise ValueError(f"eos_token_id={eos_token_id!r}: expected None, an int or a sequence of ints")
    if any(i < 0 for i in ids):
        raise ValueError(f"eos_token_id={eos_token_id!r}: token ids must be non-negative")
    slots = max(EOS_SLOTS, -(-len(ids) // EOS_SLOTS) * EOS_SLOTS)
    return jnp.asarray(ids + [-1] * (slots - len(ids)), jnp.int32)


def _token_id(value, what: str) -> Array:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what}={value!r}: must be a non-negative integer token id")
    return jnp.int32(value)


def generate(
    model,
    input_ids: Array,
    attention_mask: Array | None = None,
    ctx: AdapterContext | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    decoder_start_token_id: int | None = None,
) -> Array:
    """Greedy decoding of a :class:`~ept_jax.models.t5.T5Model` with a KV cache.

    Matches transformers' ``generate(do_sample=False, num_beams=1)`` for an encoder-decoder: the decoder
    starts from ``decoder_start_token_id``, each step appends the argmax token, a sequence that emitted an EOS
    token emits ``pad_token_id`` afterwards, and the loop stops early once every sequence is done (the rest
    stays padding).

    Args:
      model: a ``T5Model`` (adapters included; ``ctx`` selects each example's task).
      input_ids: ``(B, Ls)`` encoder tokens (either padding side; T5 is usually right padded).
      attention_mask: ``(B, Ls)`` 1 on real tokens; None = no padding.
      ctx: adapter context (``task_ids (B,)``); None generates with the base model.
      max_new_tokens: number of decoding steps ``N`` (static: one compiled program per value).
      eos_token_id: None (never stop), an id or a sequence of ids.
      pad_token_id: emitted after EOS.
      decoder_start_token_id: default ``model.cfg.decoder_start_token_id``.
    Returns:
      ``(B, N)`` int32 generated tokens, without the start token.
    Raises:
      ValueError: ``max_new_tokens < 1``, bad shapes, or malformed token ids.
    """
    integral = isinstance(max_new_tokens, (int, np.integer)) and not isinstance(max_new_tokens, bool)
    if not integral or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[1] < 1 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(
            f"input_ids must be integer (batch, length >= 1); got {input_ids.dtype} {input_ids.shape}"
        )
    if attention_mask is None:
        mask = jnp.ones(input_ids.shape, bool)
    else:
        mask = jnp.asarray(attention_mask)
        if mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {mask.shape} does not match input_ids shape {input_ids.shape}"
            )
        mask = mask.astype(bool)
    if decoder_start_token_id is None:
        decoder_start_token_id = model.cfg.decoder_start_token_id
    start = _token_id(decoder_start_token_id, "decoder_start_token_id")
    pad = _token_id(pad_token_id, "pad_token_id")
    graphdef, state = nnx.split(model)
    ids, eos = input_ids.astype(jnp.int32), eos_array(eos_token_id)
    return _generate_jit(graphdef, state, ids, mask, ctx, eos, pad, start, max_new_tokens=int(max_new_tokens))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate_jit(graphdef, state, input_ids, mask, ctx, eos, pad, start, *, max_new_tokens):
    b = input_ids.shape[0]
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(model.encode(input_ids, mask, ctx), mask, max_new_tokens, ctx)

    def cond(carry):
        t, _, _, finished, _ = carry
        return (t < max_new_tokens) & ~finished.all()

    def body(carry):
        t, token, cache, finished, out = carry
        # A fresh merge per step keeps anything the model sows (adapter losses) local to this trace.
        step_model = nnx.merge(graphdef, state)
        logits, cache = step_model.decode_step(token[:, None], cache, t, ctx)
        nxt = jnp.where(finished, pad, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, t))
        finished = finished | (nxt[:, None] == eos[None, :]).any(-1)
        return t + 1, nxt, cache, finished, out

    out = jnp.full((b, max_new_tokens), pad, jnp.int32)
    carry = (jnp.int32(0), jnp.full((b,), start, jnp.int32), cache, jnp.zeros((b,), bool), out)
    return jax.lax.while_loop(cond, body, carry)[-1]
