"""The T5 family (T5 v1.0, T5 v1.1, Flan-T5, mT5) in flax NNX, plain: adapters are applied to a built model
(:func:`ept_jax.adapters.inject.inject`).

The module tree mirrors transformers' ``T5ForConditionalGeneration`` (``shared``, ``encoder.block.{i}.layer.0.
SelfAttention.q`` ..., ``decoder.block.{i}.layer.1.EncDecAttention.k``,
``decoder.block.{i}.layer.2.DenseReluDense.wi_0``, ``{encoder,decoder}.final_layer_norm``, ``lm_head``), so
parameter paths, adapted-Linear names and Hugging Face tensor names coincide (mapping table:
``ept_jax.checkpoints.t5_map``; loading: :func:`ept_jax.checkpoints.load.from_pretrained`). It computes what
transformers computes:

* relative position bias: a ``(buckets, heads)`` table held by the first block of each stack and shared by all
  of its blocks (bidirectional buckets in the encoder, causal ones in the decoder; cross-attention has none);
  no ``1/sqrt(d)`` query scaling (T5 folds it into the initialisation);
* T5 layer norm (RMS, no mean subtraction, no bias) computed in float32, pre-norm residual sublayers;
* feed-forward ``wo(act(wi(x)))`` (v1.0, ReLU) or ``wo(act(wi_0(x)) * wi_1(x))`` (v1.1 / Flan-T5 / mT5,
  ``gelu_new``);
* tied output embeddings with the ``d_model ** -0.5`` output scaling (v1.0) or an untied ``lm_head`` (v1.1);
* encoder and decoder depths may differ (``num_decoder_layers``); dropout is off (the frozen model runs in
  eval mode; adapter dropout is the adapters' business).

Dtype policy: ``param_dtype`` (storage) and ``dtype`` (activations and matmuls) are ``"float32"`` or
``"bfloat16"``; layer norms and the softmax are always float32, attention scores accumulate in float32 and
logits are returned as float32 (``"float64"``, with ``jax_enable_x64``, computes all of them in float64: the
exact tests against the release's float64 trajectories need it). **float32 is the safe choice for T5**:
pretrained T5 checkpoints produce activations beyond the float16 range (transformers #23135). bfloat16 shares
float32's exponent range, so it does not overflow where float32 does not, but its 8-bit mantissa makes those
large activations coarse; as transformers does for float16, every sublayer output in a non-float32 compute dtype
is clamped to the dtype's finite range so an overflow cannot turn into inf/NaN further on.

Generation (greedy, KV cache, one compiled program per shape) lives in ``ept_jax.models.t5.generation`` and is
re-exported here as :func:`generate`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ept_jax.core.linear import Linear
from ept_jax.core.params import AdapterContext, KeyStream
from ept_jax.models import layer_scan
from ept_jax.models.layers import Embedding, RMSNorm, accum_dtype, apply_linear, compute_dtype
from ept_jax.models.t5.config import T5Config, ff_linears
from ept_jax.models.t5.generation import generate

__all__ = ["T5Config", "T5Model", "T5Cache", "generate", "relative_position_bucket"]

Array = jax.Array
_MASKED = float(jnp.finfo(jnp.float32).min)  # finite, so a fully masked row gives a uniform softmax, not NaN


def _clamp(h: Array) -> Array:
    """Clamps a sub-float32 activation to its dtype's finite range (see the module docstring)."""
    if jnp.finfo(h.dtype).bits >= 32:
        return h
    top = float(jnp.finfo(h.dtype).max)
    return jnp.clip(h, -top, top)


def relative_position_bucket(
    relative_position: Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
    """T5's relative position buckets (Mesh TensorFlow / transformers' ``_relative_position_bucket``).

    Args:
      relative_position: int array of ``key_position - query_position``, any shape.
      bidirectional: encoder (True: half the buckets for positive offsets) or decoder (False: future keys
        share bucket 0, they are masked anyway).
      num_buckets / max_distance: ``relative_attention_num_buckets`` / ``relative_attention_max_distance``.
    Returns:
      int32 buckets in ``[0, num_buckets)``, same shape. Half of a direction's buckets are exact offsets, the
      other half logarithmic bins up to ``max_distance``; the float32 arithmetic follows transformers step by
      step because the truncation to int makes bucket borders sensitive to rounding.
    """
    rel = relative_position.astype(jnp.int32)
    buckets = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    # maximum(.., 1): log(0) would be -inf; those positions take the exact branch anyway.
    scaled = jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact)
    scaled = scaled / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return buckets + jnp.where(is_small, rel, large)


def _norm(cfg: T5Config, dtype, param_dtype) -> RMSNorm:
    return RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)


class T5Attention(nnx.Module):
    """Multi-head attention (self or cross) with T5's unscaled scores and an optional relative bias table."""

    def __init__(self, cfg: T5Config, *, relative_bias: bool,
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        e, inner = cfg.d_model, cfg.inner_dim

        def linear(name, d_in, d_out, axes):
            return Linear(d_in, d_out, axes=axes, param_dtype=param_dtype, dtype=dtype, rngs=rngs)

        self.q = linear("q", e, inner, ("embed", "joined_kv"))
        self.k = linear("k", e, inner, ("embed", "joined_kv"))
        self.v = linear("v", e, inner, ("embed", "joined_kv"))
        self.o = linear("o", inner, e, ("joined_kv", "embed"))
        self.relative_attention_bias = Embedding(
            cfg.relative_attention_num_buckets, cfg.num_heads, axes=("rel_buckets", "heads"), std=e**-0.5,
            dtype=accum_dtype(dtype), param_dtype=param_dtype, rngs=rngs,
        ) if relative_bias else None

    def position_bias(self, q_pos: Array, k_pos: Array, *, bidirectional: bool) -> Array:
        """The relative position bias ``(1, heads, L, S)`` (float32; float64 in float64 models) for query
        positions ``q_pos (L,)`` and key positions ``k_pos (S,)`` (int; ``q_pos`` may be traced, e.g. offset by
        the decoding step)."""
        cfg = self.cfg
        bucket = relative_position_bucket(
            k_pos[None, :] - q_pos[:, None],
            bidirectional=bidirectional,
            num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance,
        )
        return jnp.transpose(self.relative_attention_bias(bucket), (2, 0, 1))[None]

    def project_kv(self, x: Array, ctx: AdapterContext | None) -> tuple[Array, Array]:
        """Keys and values ``(B, S, heads, d_kv)`` of ``x (B, S, d_model)`` (cross-attention caches them)."""
        b, s, _ = x.shape
        shape = (b, s, self.cfg.num_heads, self.cfg.d_kv)
        return apply_linear(self.k, x, ctx).reshape(shape), apply_linear(self.v, x, ctx).reshape(shape)

    def __call__(
        self,
        x: Array,
        mask: Array,
        bias: Array | None,
        ctx: AdapterContext | None,
        *,
        kv_input: Array | None = None,
        kv: tuple[Array, Array] | None = None,
        cache: tuple[Array, Array] | None = None,
        index: Array | int = 0,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """Attention of ``x (B, L, d_model)`` over keys/values.

        Args:
          mask: bool, broadcastable to ``(B, L, S)``; True where query ``l`` may attend key ``s``.
          bias: float32 ``(1, heads, L, S)`` added to the scores, or None.
          kv_input: ``(B, S, d_model)`` states to attend (cross-attention); None = ``x`` (self-attention).
          kv: precomputed ``(keys, values)`` ``(B, S, heads, d_kv)`` (cached cross-attention); wins over
            kv_input.
          cache: self-attention cache ``(keys, values)`` ``(B, S, heads, d_kv)``; the new keys/values are
            written at slots ``[index, index + L)`` and attention reads the whole cache.
        Returns:
          ``(B, L, d_model)`` and the updated cache (None without one).
        """
        cfg = self.cfg
        b, length, _ = x.shape
        q = apply_linear(self.q, x, ctx).reshape(b, length, cfg.num_heads, cfg.d_kv)
        k, v = kv if kv is not None else self.project_kv(x if kv_input is None else kv_input, ctx)
        if cache is not None:
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
            cache = (k, v)
        scores = jnp.einsum("blhd,bshd->bhls", q, k, preferred_element_type=accum_dtype(q.dtype))
        if bias is not None:
            scores = scores + bias
        scores = jnp.where(mask[:, None], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhls,bshd->blhd", probs, v).reshape(b, length, cfg.inner_dim)
        return apply_linear(self.o, out, ctx), cache


class T5DenseReluDense(nnx.Module):
    """The feed-forward net: ``wo(act(wi(x)))`` or, gated, ``wo(act(wi_0(x)) * wi_1(x))``."""

    def __init__(self, cfg: T5Config, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.act = cfg.activation
        self.gated = cfg.is_gated
        for name in ff_linears(cfg):
            d_in, d_out, axes = (cfg.d_ff, cfg.d_model, ("mlp", "embed")) if name == "wo" else \
                (cfg.d_model, cfg.d_ff, ("embed", "mlp"))
            setattr(self, name, Linear(d_in, d_out, axes=axes, param_dtype=param_dtype, dtype=dtype, rngs=rngs))

    def __call__(self, x: Array, ctx: AdapterContext | None) -> Array:
        """``(B, L, d_model)`` -> ``(B, L, d_model)``."""
        if self.gated:
            h = self.act(apply_linear(self.wi_0, x, ctx)) * apply_linear(self.wi_1, x, ctx)
        else:
            h = self.act(apply_linear(self.wi, x, ctx))
        return apply_linear(self.wo, h, ctx)


class T5LayerSelfAttention(nnx.Module):
    """``h + SelfAttention(layer_norm(h))``."""

    def __init__(self, cfg, *, relative_bias, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.SelfAttention = T5Attention(cfg, relative_bias=relative_bias, **kw)
        self.layer_norm = _norm(cfg, dtype, param_dtype)

    def __call__(self, h, mask, bias, ctx, cache=None, index=0):
        out, cache = self.SelfAttention(self.layer_norm(h), mask, bias, ctx, cache=cache, index=index)
        return h + out, cache


class T5LayerCrossAttention(nnx.Module):
    """``h + EncDecAttention(layer_norm(h), encoder states)`` (no position bias)."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.EncDecAttention = T5Attention(cfg, relative_bias=False, **kw)
        self.layer_norm = _norm(cfg, dtype, param_dtype)

    def __call__(self, h, mask, ctx, *, encoder_states=None, kv=None):
        out, _ = self.EncDecAttention(self.layer_norm(h), mask, None, ctx, kv_input=encoder_states, kv=kv)
        return h + out


class T5LayerFF(nnx.Module):
    """``h + DenseReluDense(layer_norm(h))``."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs):
        self.DenseReluDense = T5DenseReluDense(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = _norm(cfg, dtype, param_dtype)

    def __call__(self, h, ctx):
        return h + self.DenseReluDense(self.layer_norm(h), ctx)


class T5Block(nnx.Module):
    """One block: self-attention, cross-attention (decoder only), feed-forward; ``layer`` as transformers."""

    def __init__(self, cfg: T5Config, stack: str, i: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        layers = [T5LayerSelfAttention(cfg, relative_bias=i == 0, **kw)]
        if stack == "decoder":
            layers.append(T5LayerCrossAttention(cfg, **kw))
        layers.append(T5LayerFF(cfg, **kw))
        self.layer = nnx.List(layers)
        self.is_decoder = stack == "decoder"

    def __call__(self, h, mask, bias, ctx, *, encoder_states=None, cross_mask=None, cross_kv=None, cache=None,
                 index=0):
        """``h (B, L, d_model)`` -> ``(B, L, d_model)``, updated self-attention cache (see T5Attention)."""
        h, cache = self.layer[0](h, mask, bias, ctx, cache, index)
        h = _clamp(h)
        if self.is_decoder:
            h = _clamp(self.layer[1](h, cross_mask, ctx, encoder_states=encoder_states, kv=cross_kv))
        return _clamp(self.layer[-1](h, ctx)), cache


class T5Stack(nnx.Module):
    """The encoder or decoder: blocks sharing the first block's position bias, then ``final_layer_norm``."""

    def __init__(self, cfg: T5Config, stack: str, *, dtype, param_dtype, rngs: nnx.Rngs,
                 scan_layers: bool = True):
        depth = cfg.num_layers if stack == "encoder" else cfg.num_decoder_layers
        self.scan_layers = scan_layers
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.block = nnx.List([T5Block(cfg, stack, i, **kw) for i in range(depth)])
        self.final_layer_norm = _norm(cfg, dtype, param_dtype)
        self.is_decoder = stack == "decoder"

    def __call__(self, h, mask, ctx, *, q_pos, k_pos, encoder_states=None, cross_mask=None, cross_kv=None,
                 cache=None, index=0):
        """Runs every block over embedded ``h (B, L, d_model)``; returns normed states and the updated caches.

        ``q_pos (L,)`` / ``k_pos (S,)`` are the positions the relative bias is computed from; ``cross_kv`` and
        ``cache`` are per-block tuples (or None). Without them, the blocks after the first (which holds the bias
        table) run as one scan when ``scan_layers`` (:mod:`ept_jax.models.layer_scan`).
        """
        table_holder = self.block[0].layer[0].SelfAttention
        bias = table_holder.position_bias(q_pos, k_pos, bidirectional=not self.is_decoder)
        if cache is None and cross_kv is None:
            def apply(blk, h, c):
                return blk(h, mask, bias, c, encoder_states=encoder_states, cross_mask=cross_mask, index=index)[0]

            h = apply(self.block[0], h, ctx)
            h = layer_scan.run_layers(list(self.block)[1:], h, ctx, apply, owner=self, enabled=self.scan_layers)
            return self.final_layer_norm(h), None
        new_cache = []
        for i, blk in enumerate(self.block):
            h, c = blk(h, mask, bias, ctx, encoder_states=encoder_states, cross_mask=cross_mask,
                       cross_kv=None if cross_kv is None else cross_kv[i],
                       cache=None if cache is None else cache[i], index=index)
            new_cache.append(c)
        return self.final_layer_norm(h), (None if cache is None else tuple(new_cache))


@struct.dataclass
class T5Cache:
    """Decoding state for :meth:`T5Model.decode_step`.

    Attributes:
      self_kv: per decoder block ``(keys, values)`` ``(B, T, heads, d_kv)``: T preallocated decoder slots.
      cross_kv: per decoder block ``(keys, values)`` ``(B, S, heads, d_kv)`` of the encoder states (computed
        once).
      encoder_mask: ``(B, S)`` bool, True on real encoder tokens.
    """

    self_kv: tuple
    cross_kv: tuple
    encoder_mask: Array


class T5Model(nnx.Module):
    """A T5-family encoder-decoder language model (transformers' ``T5ForConditionalGeneration``).

    Its Linears (``q``, ``k``, ``v``, ``o``, ``wi`` / ``wi_0``, ``wi_1``, ``wo``, in both stacks) are frozen
    :class:`~ept_jax.core.linear.Linear` s until :func:`ept_jax.adapters.inject.inject` adapts some; ``lm_head`` is
    never adapted.

    Args:
      cfg: the architecture.
      dtype / param_dtype: ``"float32"`` or ``"bfloat16"`` (see the module docstring; float32 is the safe
        choice).
      scan_layers: run each stack's blocks after the first as one ``jax.lax.scan`` when there is no decoding
        cache (:mod:`ept_jax.models.layer_scan`: the same computation, compiled once instead of once per block).
      rngs: initialisation keys, ``nnx.Rngs`` or ``ept_jax.core.params.KeyStream`` (use the latter under
        ``nnx.eval_shape``/jit); base weights are random until loaded
        (:func:`ept_jax.checkpoints.load.from_pretrained`).
    Raises:
      ValueError: an unknown dtype name.
    """

    #: Linears no adapter targets (the output projection)
    never_adapted = ("lm_head",)

    def __init__(self, cfg: T5Config, *, dtype: str = "float32",
                 param_dtype: str = "float32", scan_layers: bool = True, rngs: nnx.Rngs | KeyStream):
        self.cfg = cfg
        self.dtype = compute_dtype(dtype, "dtype")
        pdt = compute_dtype(param_dtype, "param_dtype")
        kw = dict(dtype=self.dtype, param_dtype=pdt, rngs=rngs)
        self.shared = Embedding(cfg.vocab_size, cfg.d_model, axes=("vocab", "embed"), std=1.0, **kw)
        self.encoder = T5Stack(cfg, "encoder", scan_layers=scan_layers, **kw)
        self.decoder = T5Stack(cfg, "decoder", scan_layers=scan_layers, **kw)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), param_dtype=pdt, dtype=self.dtype, rngs=rngs
        )

    @staticmethod
    def stack_of(path: str) -> str:
        """The stack (``"encoder"`` / ``"decoder"``) of the module at Hugging Face path ``path``."""
        return path.split(".", 1)[0]

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None,
        decoder_input_ids: Array,
        decoder_attention_mask: Array | None = None,
        ctx: AdapterContext | None = None,
    ) -> Array:
        """Logits ``(B, Lt, vocab)`` float32 (teacher forcing; ``decoder_input_ids`` are used as given, not
        shifted).

        Args:
          input_ids: ``(B, Ls)`` encoder tokens; attention_mask ``(B, Ls)`` 1 on real tokens (None = all
            real).
          decoder_input_ids: ``(B, Lt)``; decoder_attention_mask ``(B, Lt)`` (None = all real; causal either
            way).
          ctx: adapter context (task ids, dropout); None runs the base model.
        """
        input_ids = _check_ids(input_ids, "input_ids")
        enc_mask = _check_mask(attention_mask, input_ids, "attention_mask")
        states = self.encode(input_ids, enc_mask, ctx)
        return self.decode(decoder_input_ids, states, enc_mask, decoder_attention_mask, ctx)

    def encode(self, input_ids: Array, attention_mask: Array | None = None,
               ctx: AdapterContext | None = None) -> Array:
        """Encoder states ``(B, Ls, d_model)`` (compute dtype, after ``final_layer_norm``) of ``input_ids``
        ``(B, Ls)``."""
        input_ids = _check_ids(input_ids, "input_ids")
        mask = _check_mask(attention_mask, input_ids, "attention_mask")
        pos = jnp.arange(input_ids.shape[1])
        h, _ = self.encoder(self.shared(input_ids), mask[:, None, :], ctx, q_pos=pos, k_pos=pos)
        return h

    def decode(self, decoder_input_ids: Array, encoder_states: Array, attention_mask: Array | None = None,
               decoder_attention_mask: Array | None = None, ctx: AdapterContext | None = None) -> Array:
        """Uncached decoder: logits ``(B, Lt, vocab)`` float32 of ``decoder_input_ids (B, Lt)`` given
        ``encoder_states (B, Ls, d_model)`` and their ``attention_mask (B, Ls)``."""
        dec_ids = _check_ids(decoder_input_ids, "decoder_input_ids")
        enc_mask = _check_mask(attention_mask, encoder_states.shape[:2], "attention_mask")
        dec_mask = _check_mask(decoder_attention_mask, dec_ids, "decoder_attention_mask")
        pos = jnp.arange(dec_ids.shape[1])
        mask = (pos[None, :] <= pos[:, None])[None] & dec_mask[:, None, :]
        h, _ = self.decoder(self.shared(dec_ids), mask, ctx, q_pos=pos, k_pos=pos,
                            encoder_states=encoder_states, cross_mask=enc_mask[:, None, :])
        return self._logits(h)

    def init_cache(self, encoder_states: Array, attention_mask: Array | None, max_length: int,
                   ctx: AdapterContext | None = None) -> T5Cache:
        """A decoding cache for up to ``max_length`` decoder tokens: empty self-attention slots and every
        decoder block's cross-attention keys/values of ``encoder_states (B, Ls, d_model)`` (adapters apply to
        them)."""
        b = encoder_states.shape[0]
        cfg = self.cfg
        mask = _check_mask(attention_mask, encoder_states.shape[:2], "attention_mask")
        shape = (b, max_length, cfg.num_heads, cfg.d_kv)
        blocks = self.decoder.block
        self_kv = tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in blocks)
        cross_kv = tuple(blk.layer[1].EncDecAttention.project_kv(encoder_states, ctx) for blk in blocks)
        return T5Cache(self_kv=self_kv, cross_kv=cross_kv, encoder_mask=mask)

    def decode_step(self, decoder_input_ids: Array, cache: T5Cache, index: Array | int,
                    ctx: AdapterContext | None = None) -> tuple[Array, T5Cache]:
        """Cached decoder forward of ``L`` new tokens ``(B, L)`` at decoder positions ``[index, index + L)``.

        Returns logits ``(B, L, vocab)`` float32 and the cache with the new keys/values written.
        """
        length = decoder_input_ids.shape[1]
        q_pos = index + jnp.arange(length)
        k_pos = jnp.arange(cache.self_kv[0][0].shape[1])
        mask = (k_pos[None, :] <= q_pos[:, None])[None]
        h, self_kv = self.decoder(self.shared(decoder_input_ids), mask, ctx, q_pos=q_pos, k_pos=k_pos,
                                  cross_mask=cache.encoder_mask[:, None, :], cross_kv=cache.cross_kv,
                                  cache=cache.self_kv, index=index)
        return self._logits(h), cache.replace(self_kv=self_kv)

    def _logits(self, h: Array) -> Array:
        if self.cfg.scale_decoder_outputs:
            h = h * (self.cfg.d_model**-0.5)
        logits = self.shared.attend(h) if self.lm_head is None else self.lm_head(h)
        return logits.astype(accum_dtype(logits.dtype))


def _check_ids(ids, what: str) -> Array:
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"{what} must be an integer array (batch, length); got {ids.dtype} of shape {ids.shape}"
        )
    return ids


def _check_mask(mask, like, what: str) -> Array:
    shape = tuple(like.shape if hasattr(like, "shape") else like)
    if mask is None:
        return jnp.ones(shape, bool)
    mask = jnp.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{what} shape {mask.shape} does not match the token shape {shape}")
    return mask.astype(bool)
