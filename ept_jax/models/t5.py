"""The T5 family (T5 v1.0, T5 v1.1, Flan-T5, mT5) in flax NNX, with adapters injected into chosen Linears.

The module tree mirrors transformers' ``T5ForConditionalGeneration`` (``shared``, ``encoder.block.{i}.layer.0.
SelfAttention.q`` ..., ``decoder.block.{i}.layer.1.EncDecAttention.k``,
``decoder.block.{i}.layer.2.DenseReluDense.wi_0``, ``{encoder,decoder}.final_layer_norm``, ``lm_head``), so
parameter paths, adapted-Linear names and Hugging Face tensor names coincide (mapping table:
``ept_jax.checkpoints.t5_map``). It computes what transformers computes:

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

Generation (greedy, KV cache, one compiled program per shape) lives in ``ept_jax.models.t5_generate`` and is
re-exported here as :func:`generate`.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ept_jax import layer_scan
from ept_jax.checkpoints.hf import CheckpointError, load_into, read_config, read_tensors, resolve_model_dir
from ept_jax.checkpoints.t5_map import ff_linears, hf_ignore, hf_rules, linear_names
from ept_jax.models.t5_config import T5Config
from ept_jax.models.t5_generate import generate
from ept_jax.nn import (
    AdaptedLinear,
    AdapterContext,
    AdapterParam,
    Injection,
    Injector,
    KeyStream,
    Linear,
    adapted_linears,
    param,
)

__all__ = [
    "T5Config", "T5Model", "T5Cache", "from_pretrained", "generate", "linear_names", "hf_rules",
    "relative_position_bucket",
]

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
_MASKED = float(jnp.finfo(jnp.float32).min)  # finite, so a fully masked row gives a uniform softmax, not NaN


def _dtype(name, what: str):
    if name not in DTYPES:
        raise ValueError(f"{what}={name!r} is not supported; accepted: {sorted(DTYPES)}")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise ValueError(f"{what}='float64' needs jax_enable_x64 (jax.config.update('jax_enable_x64', True)); "
                         "without it JAX computes in float32")
    return DTYPES[name]


def _apply(lin: Linear | AdaptedLinear, x: Array, ctx: AdapterContext | None) -> Array:
    """Calls a frozen or adapted Linear the same way (only adapted ones take the context)."""
    return lin(x, ctx) if isinstance(lin, AdaptedLinear) else lin(x)


def accum_dtype(dtype):
    """The dtype of norms, softmaxes and logits: float32, or float64 when computing in float64 (exact tests)."""
    return jnp.promote_types(dtype, jnp.float32)


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


def _norm(cfg: T5Config, dtype, param_dtype) -> T5LayerNorm:
    return T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)


class T5LayerNorm(nnx.Module):
    """T5 layer norm: ``weight * x / sqrt(mean(x^2) + eps)`` computed in float32, no mean, no bias."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.weight = param(jnp.ones((dim,), param_dtype), ("embed",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        """``x (..., dim)`` -> ``(..., dim)`` in the compute dtype."""
        h = x.astype(accum_dtype(x.dtype))
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * h.astype(self.dtype)


class T5Embedding(nnx.Module):
    """A lookup table ``embedding (num, dim)``: the shared token embeddings or a relative bias table."""

    def __init__(self, num: int, dim: int, axes: tuple[str, str], std: float, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.embedding = param(std * jax.random.normal(rngs.params(), (num, dim), param_dtype), axes)
        self.dtype = dtype

    def __call__(self, ids: Array) -> Array:
        """``ids (...)`` int -> ``(..., dim)`` in the compute dtype."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """``x (B, L, dim)`` -> ``(B, L, num)`` against the table (the tied output projection)."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class T5Attention(nnx.Module):
    """Multi-head attention (self or cross) with T5's unscaled scores and an optional relative bias table."""

    def __init__(self, cfg: T5Config, path: str, stack: str, injector: Injector, *, relative_bias: bool,
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        e, inner = cfg.d_model, cfg.inner_dim

        def linear(name, d_in, d_out, axes):
            return injector(name, f"{path}.{name}", stack, d_in, d_out, axes=axes,
                            param_dtype=param_dtype, dtype=dtype, rngs=rngs)

        self.q = linear("q", e, inner, ("embed", "joined_kv"))
        self.k = linear("k", e, inner, ("embed", "joined_kv"))
        self.v = linear("v", e, inner, ("embed", "joined_kv"))
        self.o = linear("o", inner, e, ("joined_kv", "embed"))
        self.relative_attention_bias = T5Embedding(
            cfg.relative_attention_num_buckets, cfg.num_heads, ("rel_buckets", "heads"), e**-0.5,
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
        return _apply(self.k, x, ctx).reshape(shape), _apply(self.v, x, ctx).reshape(shape)

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
        q = _apply(self.q, x, ctx).reshape(b, length, cfg.num_heads, cfg.d_kv)
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
        return _apply(self.o, out, ctx), cache


class T5DenseReluDense(nnx.Module):
    """The feed-forward net: ``wo(act(wi(x)))`` or, gated, ``wo(act(wi_0(x)) * wi_1(x))``."""

    def __init__(self, cfg: T5Config, path: str, stack: str, injector: Injector, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.act = cfg.activation
        self.gated = cfg.is_gated
        for name in ff_linears(cfg):
            d_in, d_out, axes = (cfg.d_ff, cfg.d_model, ("mlp", "embed")) if name == "wo" else \
                (cfg.d_model, cfg.d_ff, ("embed", "mlp"))
            setattr(self, name, injector(name, f"{path}.{name}", stack, d_in, d_out, axes=axes,
                                         param_dtype=param_dtype, dtype=dtype, rngs=rngs))

    def __call__(self, x: Array, ctx: AdapterContext | None) -> Array:
        """``(B, L, d_model)`` -> ``(B, L, d_model)``."""
        if self.gated:
            h = self.act(_apply(self.wi_0, x, ctx)) * _apply(self.wi_1, x, ctx)
        else:
            h = self.act(_apply(self.wi, x, ctx))
        return _apply(self.wo, h, ctx)


class T5LayerSelfAttention(nnx.Module):
    """``h + SelfAttention(layer_norm(h))``."""

    def __init__(self, cfg, path, stack, injector, *, relative_bias, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.SelfAttention = T5Attention(
            cfg, f"{path}.SelfAttention", stack, injector, relative_bias=relative_bias, **kw
        )
        self.layer_norm = _norm(cfg, dtype, param_dtype)

    def __call__(self, h, mask, bias, ctx, cache=None, index=0):
        out, cache = self.SelfAttention(self.layer_norm(h), mask, bias, ctx, cache=cache, index=index)
        return h + out, cache


class T5LayerCrossAttention(nnx.Module):
    """``h + EncDecAttention(layer_norm(h), encoder states)`` (no position bias)."""

    def __init__(self, cfg, path, stack, injector, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.EncDecAttention = T5Attention(
            cfg, f"{path}.EncDecAttention", stack, injector, relative_bias=False, **kw
        )
        self.layer_norm = _norm(cfg, dtype, param_dtype)

    def __call__(self, h, mask, ctx, *, encoder_states=None, kv=None):
        out, _ = self.EncDecAttention(self.layer_norm(h), mask, None, ctx, kv_input=encoder_states, kv=kv)
        return h + out


class T5LayerFF(nnx.Module):
    """``h + DenseReluDense(layer_norm(h))``."""

    def __init__(self, cfg, path, stack, injector, *, dtype, param_dtype, rngs):
        self.DenseReluDense = T5DenseReluDense(cfg, f"{path}.DenseReluDense", stack, injector, dtype=dtype,
                                               param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = _norm(cfg, dtype, param_dtype)

    def __call__(self, h, ctx):
        return h + self.DenseReluDense(self.layer_norm(h), ctx)


class T5Block(nnx.Module):
    """One block: self-attention, cross-attention (decoder only), feed-forward; ``layer`` as transformers."""

    def __init__(self, cfg: T5Config, stack: str, i: int, injector: Injector, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        path = f"{stack}.block.{i}.layer"
        layers = [T5LayerSelfAttention(cfg, f"{path}.0", stack, injector, relative_bias=i == 0, **kw)]
        if stack == "decoder":
            layers.append(T5LayerCrossAttention(cfg, f"{path}.1", stack, injector, **kw))
        layers.append(T5LayerFF(cfg, f"{path}.{len(layers)}", stack, injector, **kw))
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

    def __init__(self, cfg: T5Config, stack: str, injector: Injector, *, dtype, param_dtype, rngs: nnx.Rngs,
                 scan_layers: bool = True):
        depth = cfg.num_layers if stack == "encoder" else cfg.num_decoder_layers
        self.scan_layers = scan_layers
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.block = nnx.List([T5Block(cfg, stack, i, injector, **kw) for i in range(depth)])
        self.final_layer_norm = _norm(cfg, dtype, param_dtype)
        self.is_decoder = stack == "decoder"

    def __call__(self, h, mask, ctx, *, q_pos, k_pos, encoder_states=None, cross_mask=None, cross_kv=None,
                 cache=None, index=0):
        """Runs every block over embedded ``h (B, L, d_model)``; returns normed states and the updated caches.

        ``q_pos (L,)`` / ``k_pos (S,)`` are the positions the relative bias is computed from; ``cross_kv`` and
        ``cache`` are per-block tuples (or None). Without them, the blocks after the first (which holds the bias
        table) run as one scan when ``scan_layers`` (:mod:`ept_jax.layer_scan`).
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
    """A T5-family encoder-decoder language model (transformers' ``T5ForConditionalGeneration``) with
    adapters.

    Args:
      cfg: the architecture.
      injection: which Linears (``q``, ``k``, ``v``, ``o``, ``wi`` / ``wi_0``, ``wi_1``, ``wo``, in both
        stacks) get which adapter; None for the plain model. ``lm_head`` is never adapted.
      dtype / param_dtype: ``"float32"`` or ``"bfloat16"`` (see the module docstring; float32 is the safe
        choice).
      scan_layers: run each stack's blocks after the first as one ``jax.lax.scan`` when there is no decoding
        cache (:mod:`ept_jax.layer_scan`: the same computation, compiled once instead of once per block).
      rngs: initialisation keys, ``nnx.Rngs`` or ``ept_jax.nn.KeyStream`` (use the latter under
        ``nnx.eval_shape``/jit); base weights are random until loaded (see :func:`from_pretrained`).
    Raises:
      ValueError: an unknown dtype name, or an injection target that names no Linear of the model.
    """

    def __init__(self, cfg: T5Config, *, injection: Injection | None = None, dtype: str = "float32",
                 param_dtype: str = "float32", scan_layers: bool = True, rngs: nnx.Rngs | KeyStream):
        self.cfg = cfg
        self.dtype = _dtype(dtype, "dtype")
        pdt = _dtype(param_dtype, "param_dtype")
        injector = Injector(injection)
        injector.check_targets(linear_names(cfg))
        kw = dict(dtype=self.dtype, param_dtype=pdt, rngs=rngs)
        self.shared = T5Embedding(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), 1.0, **kw)
        self.encoder = T5Stack(cfg, "encoder", injector, scan_layers=scan_layers, **kw)
        self.decoder = T5Stack(cfg, "decoder", injector, scan_layers=scan_layers, **kw)
        # Built directly, never through the injector: the output projection is never adapted.
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), param_dtype=pdt, dtype=self.dtype, rngs=rngs
        )

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


# --------------------------------------------------------------------------------------------------- loading

_BASE = nnx.All(nnx.Param, nnx.Not(AdapterParam))


@functools.partial(jax.jit, static_argnames=("cfg", "d_in", "d_out"))
def _adapter_values(key: Array, *, cfg, d_in: int, d_out: int) -> dict:
    """The initial values (a pure dict, no metadata) of one ``d_in -> d_out`` adapter, compiled once per
    (config, shape) and reused for every Linear of that shape; logical axes stay with the model's own
    variables."""
    from ept_jax.adapters import make_adapter  # local import, as in ept_jax.nn: adapters imports nn

    return nnx.state(make_adapter(cfg, d_in, d_out, rngs=KeyStream(key))).to_pure_dict()


def _init_for_loading(cfg: T5Config, injection, dtype, param_dtype, rngs: nnx.Rngs | KeyStream) -> T5Model:
    """A model whose base weights are zeros (about to be overwritten) and whose adapters are really
    initialised.

    Random-initialising every base weight only to overwrite it is slow for large models, so the model is built
    abstractly (``nnx.eval_shape``) and its base state allocated as zeros. Each adapter is initialised by a
    function compiled per distinct (adapter config, Linear shape): a T5 has a handful of Linear shapes but up
    to hundreds of adapted Linears, and one program initialising all of them at once takes XLA minutes to
    compile. Adapter ``j`` (in construction order, ``AdaptedLinear.index``) gets the key
    ``fold_in(rngs.params(), j)``.
    """
    key = rngs.params()
    # KeyStream, not nnx.Rngs: under eval_shape nnx.Rngs makes construction quadratic in the model size.
    model = nnx.eval_shape(
        lambda: T5Model(cfg, injection=injection, dtype=dtype, param_dtype=param_dtype, rngs=KeyStream(0))
    )
    for _, lin in adapted_linears(model):
        values = _adapter_values(jax.random.fold_in(key, lin.index), cfg=injection.adapter,
                                 d_in=lin.base.d_in, d_out=lin.base.d_out)
        state = nnx.state(lin.adapter)
        nnx.replace_by_pure_dict(state, values)
        nnx.update(lin.adapter, state)
    graphdef, base_abstract, rest = nnx.split(model, _BASE, ...)
    base = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), base_abstract)
    leftover = [s for s in jax.tree.leaves(rest) if isinstance(s, jax.ShapeDtypeStruct)]
    if leftover:  # a non-adapter, non-base variable: nothing would ever give it a value
        raise RuntimeError(f"{len(leftover)} model variable(s) are neither base weights nor adapter state")
    return nnx.merge(graphdef, base, rest)


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    injection: Injection | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    rngs: nnx.Rngs | KeyStream | None = None,
) -> T5Model:
    """Loads a T5-family checkpoint, strictly, optionally with adapters injected.

    Args:
      name_or_path: a Hugging Face model directory (``config.json`` + ``model.safetensors``, a sharded
        ``model.safetensors.index.json``, a legacy Flax ``flax_model.msgpack`` or ``pytorch_model.bin``) or a
        hub id.
      injection: adapters to inject (targets by short name: ``q``, ``k``, ``v``, ``o``, ``wi``, ``wi_0``,
        ``wi_1``, ``wo``).
      dtype / param_dtype: ``"float32"`` (safe) or ``"bfloat16"``.
      rngs: keys for the adapters' initialisation (default ``nnx.Rngs(0)``); adapter ``j`` (in construction
        order) gets ``fold_in(rngs.params(), j)``.
    Raises:
      CheckpointError: no weights, an unsupported config, or a missing / unexpected / wrongly shaped tensor
        (each named).
      ValueError: an unknown dtype or an injection target naming no Linear of the model.
    """
    _dtype(dtype, "dtype")
    _dtype(param_dtype, "param_dtype")
    model_dir = resolve_model_dir(name_or_path)
    config = read_config(model_dir)
    try:
        cfg = T5Config.from_hf(config)
    except ValueError as e:
        raise CheckpointError(f"{model_dir}: {e}") from e
    tensors = read_tensors(model_dir)
    model = _init_for_loading(cfg, injection, dtype, param_dtype, rngs or nnx.Rngs(0))
    load_into(model, tensors, hf_rules(cfg), ignore=hf_ignore(cfg), source=str(model_dir))
    return model
