"""The LLaMA family (LLaMA 1/2/3, SmolLM2, TinyLlama ...) in flax NNX, plain: adapters are applied to
a built model (:func:`ept_jax.adapters.inject.inject`).

The module tree mirrors transformers' ``LlamaForCausalLM`` (``model.embed_tokens``, ``model.layers.{i}.self_attn.
q_proj`` ..., ``model.norm``, ``lm_head``), so parameter paths, adapted-Linear names and Hugging Face tensor names
coincide (mapping table: ``ept_jax.checkpoints.llama_map``; loading:
:func:`ept_jax.checkpoints.load.from_pretrained`). It computes what transformers computes:

* grouped-query attention (``num_key_value_heads``; query head ``h`` reads key/value head ``h // groups``, as
  transformers' ``repeat_kv``), plain einsum attention with a float32 softmax;
* rotary embeddings in transformers' rotate-half convention (``x * cos + rotate_half(x) * sin`` with
  ``rotate_half([x1, x2]) = [-x2, x1]``), frequencies from ``llama_config.rope_inv_freq``;
* RMS norms computed in float32, SiLU-gated MLP, tied or untied output embeddings.

Dtype policy: ``param_dtype`` (storage) and ``dtype`` (activations and matmuls) are ``"float32"`` or
``"bfloat16"``; norms, rotary angles and the softmax are always float32, attention scores accumulate in float32
and logits are returned as float32. ``"float64"`` (with ``jax_enable_x64``) computes every one of those in float64
too: the exact tests against the release's float64 trajectories (tests/unit/test_reference_training.py) need it.

Positions: when not given they are ``cumsum(attention_mask) - 1`` (0 on padding), which is what transformers'
``generate`` uses, so left-padded batches get the same positions as unpadded rows. (transformers' plain forward
uses ``arange(L)`` when called without ``position_ids``; both agree unless a batch is left padded.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ept_jax.core.linear import Linear
from ept_jax.core.params import AdapterContext
from ept_jax.models import layer_scan
from ept_jax.models.layers import Embedding, RMSNorm, accum_dtype, apply_linear, compute_dtype
from ept_jax.models.llama.config import LlamaConfig, RopeScaling, rope_inv_freq

__all__ = [
    "LlamaConfig", "RopeScaling", "LlamaModel", "check_mask", "positions_from_mask", "KVCache", "RMSNorm", "Embedding",
]

Array = jax.Array
# Per layer ``(keys, values)``, each ``(batch, max_length, num_key_value_heads, head_dim)`` in the compute dtype.
KVCache = tuple[tuple[Array, Array], ...]

_MASKED = float(jnp.finfo(jnp.float32).min)  # finite, so a fully masked (padding) row gives no NaN


def positions_from_mask(attention_mask: Array) -> Array:
    """Token positions ``(B, L)`` int32 from a ``(B, L)`` mask: ``cumsum(mask) - 1``, 0 on padding (as HF generate)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def rope_cos_sin(cfg: LlamaConfig, positions: Array, dtype=jnp.float32) -> tuple[Array, Array]:
    """``cos, sin`` ``(B, L, head_dim)`` in ``dtype`` (float32 or float64) for integer ``positions`` ``(B, L)``
    (angles duplicated per half)."""
    dt = jnp.dtype(dtype)
    freqs = positions.astype(dt)[..., None] * jnp.asarray(rope_inv_freq(cfg, dt.type))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x`` ``(B, L, heads, head_dim)`` by angles ``(B, L, head_dim)`` (rotate-half convention)."""
    x32 = x.astype(accum_dtype(x.dtype))
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings and an optional preallocated KV cache."""

    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        e, h, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        def linear(name, d_in, d_out, axes):
            return Linear(d_in, d_out, axes=axes, use_bias=cfg.attention_bias, param_dtype=param_dtype, dtype=dtype,
                          rngs=rngs)

        self.q_proj = linear("q_proj", e, h * d, ("embed", "joined_kv"))
        self.k_proj = linear("k_proj", e, kv * d, ("embed", "joined_kv"))
        self.v_proj = linear("v_proj", e, kv * d, ("embed", "joined_kv"))
        self.o_proj = linear("o_proj", h * d, e, ("joined_kv", "embed"))

    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        mask: Array,
        ctx: AdapterContext | None,
        cache: tuple[Array, Array] | None = None,
        index: Array | int = 0,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """Attention over ``x (B, L, hidden)``.

        Args:
          cos, sin: rotary tables ``(B, L, head_dim)``.
          mask: ``(B, L, S)`` bool, True where query ``l`` may attend key ``s`` (``S = L`` without a cache, the
            cache length with one).
          cache: this layer's ``(keys, values)`` ``(B, S, kv_heads, head_dim)``; the new keys/values are written
            at ``[index, index + L)`` and attention reads the whole cache.
        Returns:
          ``(B, L, hidden)`` and the updated cache (None without one).
        """
        cfg = self.cfg
        b, length, _ = x.shape
        kv, g, d = cfg.num_key_value_heads, cfg.num_key_value_groups, cfg.head_dim
        q = apply_rope(apply_linear(self.q_proj, x, ctx).reshape(b, length, kv * g, d), cos, sin)
        k = apply_rope(apply_linear(self.k_proj, x, ctx).reshape(b, length, kv, d), cos, sin)
        v = apply_linear(self.v_proj, x, ctx).reshape(b, length, kv, d)
        if cache is not None:
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
            cache = (k, v)
        # Query head h = j * groups + i uses key/value head j (transformers' repeat_kv order).
        q = q.reshape(b, length, kv, g, d)
        scores = jnp.einsum("blkgd,bskd->bkgls", q, k, preferred_element_type=accum_dtype(q.dtype)) * (d**-0.5)
        scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgls,bskd->blkgd", probs, v).reshape(b, length, kv * g * d)
        return apply_linear(self.o_proj, out, ctx), cache


class LlamaMLP(nnx.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size

        def linear(name, d_in, d_out, axes):
            return Linear(d_in, d_out, axes=axes, use_bias=cfg.mlp_bias, param_dtype=param_dtype, dtype=dtype,
                          rngs=rngs)

        self.gate_proj = linear("gate_proj", e, f, ("embed", "mlp"))
        self.up_proj = linear("up_proj", e, f, ("embed", "mlp"))
        self.down_proj = linear("down_proj", f, e, ("mlp", "embed"))

    def __call__(self, x: Array, ctx: AdapterContext | None) -> Array:
        """``(B, L, hidden)`` -> ``(B, L, hidden)``."""
        h = jax.nn.silu(apply_linear(self.gate_proj, x, ctx)) * apply_linear(self.up_proj, x, ctx)
        return apply_linear(self.down_proj, h, ctx)


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: ``h + attn(norm(h))``, then ``h + mlp(norm(h))``."""

    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = LlamaAttention(cfg, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = LlamaMLP(cfg, rngs=rngs, **kw)

    def __call__(self, h, cos, sin, mask, ctx, cache=None, index=0):
        """``h (B, L, hidden)`` -> ``(B, L, hidden)``, updated cache; arguments as :class:`LlamaAttention`."""
        a, cache = self.self_attn(self.input_layernorm(h), cos, sin, mask, ctx, cache, index)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h), ctx), cache


class LlamaStack(nnx.Module):
    """Embeddings, decoder layers and the final norm (transformers' ``LlamaModel``; our attribute ``model``)."""

    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = nnx.List(
            [LlamaDecoderLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)


class LlamaModel(nnx.Module):
    """A LLaMA causal language model (transformers' ``LlamaForCausalLM``).

    Its Linears (``q_proj`` ... ``down_proj``) are frozen :class:`~ept_jax.core.linear.Linear` s until
    :func:`ept_jax.adapters.inject.inject` adapts some; ``lm_head`` is never adapted.

    Args:
      cfg: the architecture.
      dtype / param_dtype: ``"float32"`` or ``"bfloat16"`` (see the module docstring).
      scan_layers: run the decoder layers as one ``jax.lax.scan`` when there is no KV cache
        (:mod:`ept_jax.models.layer_scan`: the same computation, compiled once instead of once per layer).
      rngs: initialisation keys (base weights are random until loaded,
        :func:`ept_jax.checkpoints.load.from_pretrained`).
    Raises:
      ValueError: an unknown dtype name.
    """

    #: Linears no adapter targets (the output projection)
    never_adapted = ("lm_head",)

    def __init__(
        self,
        cfg: LlamaConfig,
        *,
        dtype: str = "float32",
        param_dtype: str = "float32",
        scan_layers: bool = True,
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.scan_layers = scan_layers
        self.dtype = compute_dtype(dtype, "dtype")
        pdt = compute_dtype(param_dtype, "param_dtype")
        self.model = LlamaStack(cfg, dtype=self.dtype, param_dtype=pdt, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), param_dtype=pdt, dtype=self.dtype, rngs=rngs
        )

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        ctx: AdapterContext | None = None,
        positions: Array | None = None,
        *,
        segment_ids: Array | None = None,
        logit_positions: Array | None = None,
    ) -> Array:
        """Logits ``(B, L, vocab)`` float32 for ``input_ids (B, L)``.

        Args:
          attention_mask: ``(B, L)``, 1/True for real tokens (either padding side); None = all real.
          ctx: adapter context (task ids, dropout); None runs the base model.
          positions: ``(B, L)`` int positions; default :func:`positions_from_mask`.
          segment_ids: ``(B, L)`` int, several continuations of one shared prefix packed in a row: segment 0 is
            the prefix, which every token sees; a token of segment ``c > 0`` sees only the prefix and earlier
            tokens of its own segment (give each segment its positions after the prefix's). None = one sequence.
          logit_positions: ``(B, K)`` int, compute the logits only at these positions of each row: returns
            ``(B, K, vocab)`` (the output projection and the softmax over the vocabulary are most of the cost of
            a short row that scores a few tokens).
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length); got shape {input_ids.shape}")
        mask = check_mask(attention_mask, input_ids.shape)
        if positions is None:
            positions = positions_from_mask(mask)
        seg = None
        if segment_ids is not None:
            seg = jnp.asarray(segment_ids)
            if seg.shape != input_ids.shape:
                raise ValueError(f"segment_ids has shape {seg.shape}; input_ids {input_ids.shape}")
        if logit_positions is not None:
            logit_positions = jnp.asarray(logit_positions)
            if logit_positions.ndim != 2 or logit_positions.shape[0] != input_ids.shape[0]:
                raise ValueError(f"logit_positions must be (batch={input_ids.shape[0]}, K); got shape "
                                 f"{logit_positions.shape}")
        logits, _ = self._run(input_ids, positions, mask, ctx, None, 0, seg, logit_positions)
        return logits

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_length`` tokens (see :data:`KVCache`)."""
        cfg = self.cfg
        shape = (batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
        return tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in self.model.layers)

    def decode(
        self,
        input_ids: Array,
        positions: Array,
        kv_mask: Array,
        cache: KVCache,
        index: Array | int,
        ctx: AdapterContext | None = None,
    ) -> tuple[Array, KVCache]:
        """Cached forward of ``L`` new tokens per sequence (prefill: the prompt; decoding: one token).

        Args:
          input_ids: ``(B, L)`` new tokens, written to cache slots ``[index, index + L)``.
          positions: ``(B, L)`` their rotary positions.
          kv_mask: ``(B, S)`` bool, True for cache slots holding real tokens (the new ones included).
          cache: from :meth:`init_cache` (``S`` slots) or a previous call.
          index: scalar int, the first slot written (same for every sequence: prompts are left padded).
        Returns:
          logits ``(B, L, vocab)`` float32 and the updated cache.
        """
        return self._run(input_ids, positions, kv_mask.astype(bool), ctx, cache, index)

    def _run(self, input_ids, positions, kv_mask, ctx, cache, index, segments=None, logit_positions=None):
        cfg = self.cfg
        length = input_ids.shape[1]
        q_slot = index + jnp.arange(length)
        k_slot = jnp.arange(kv_mask.shape[1])
        mask = (k_slot[None, :] <= q_slot[:, None])[None] & kv_mask[:, None, :]
        if segments is not None:  # a token sees the shared prefix (segment 0) and its own segment
            mask = mask & ((segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None]))
        cos, sin = rope_cos_sin(cfg, positions, accum_dtype(self.dtype))
        h = self.model.embed_tokens(input_ids)
        new_cache = []
        if cache is None:
            h = layer_scan.run_layers(list(self.model.layers), h, ctx,
                                      lambda layer, h, c: layer(h, cos, sin, mask, c, None, index)[0],
                                      owner=self.model, enabled=self.scan_layers)
        else:
            for i, layer in enumerate(self.model.layers):
                h, layer_cache = layer(h, cos, sin, mask, ctx, cache[i], index)
                new_cache.append(layer_cache)
        if logit_positions is not None:
            h = jnp.take_along_axis(h, logit_positions[:, :, None].astype(jnp.int32), axis=1)
        h = self.model.norm(h)
        logits = self.model.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        return logits.astype(accum_dtype(logits.dtype)), (None if cache is None else tuple(new_cache))


def check_mask(attention_mask, shape) -> Array:
    if attention_mask is None:
        return jnp.ones(shape, bool)
    mask = jnp.asarray(attention_mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {tuple(shape)}")
    return mask.astype(bool)
