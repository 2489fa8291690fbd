"""The LLaMA family (LLaMA 1/2/3, SmolLM2, TinyLlama ...) in flax NNX, with adapters injected into chosen Linears.

The module tree mirrors transformers' ``LlamaForCausalLM`` (``model.embed_tokens``, ``model.layers.{i}.self_attn.
q_proj`` ..., ``model.norm``, ``lm_head``), so parameter paths, adapted-Linear names and Hugging Face tensor names
coincide (mapping table: ``ept_jax.checkpoints.llama_map``). It computes what transformers computes:

* grouped-query attention (``num_key_value_heads``; query head ``h`` reads key/value head ``h // groups``, as
  transformers' ``repeat_kv``), plain einsum attention with a float32 softmax;
* rotary embeddings in transformers' rotate-half convention (``x * cos + rotate_half(x) * sin`` with
  ``rotate_half([x1, x2]) = [-x2, x1]``), frequencies from ``llama_config.rope_inv_freq``;
* RMS norms computed in float32, SiLU-gated MLP, tied or untied output embeddings.

Dtype policy: ``param_dtype`` (storage) and ``dtype`` (activations and matmuls) are ``"float32"`` or
``"bfloat16"``; norms, rotary angles and the softmax are always float32, attention scores accumulate in float32
and logits are returned as float32. ``"float64"`` (with ``jax_enable_x64``) computes every one of those in float64
too: the exact tests against the release's float64 trajectories (tests/test_reference_training.py) need it.

Positions: when not given they are ``cumsum(attention_mask) - 1`` (0 on padding), which is what transformers'
``generate`` uses, so left-padded batches get the same positions as unpadded rows. (transformers' plain forward
uses ``arange(L)`` when called without ``position_ids``; both agree unless a batch is left padded.)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ept_jax import layer_scan
from ept_jax.checkpoints.gguf import layer_index, read_gguf, split_gguf_path
from ept_jax.checkpoints.hf import CheckpointError, load_into, read_config, read_tensors, resolve_model_dir
from ept_jax.checkpoints.llama_map import hf_ignore, hf_rules, linear_names
from ept_jax.models.llama_config import LlamaConfig, RopeScaling, rope_inv_freq
from ept_jax.nn import AdaptedLinear, AdapterContext, AdapterParam, Injection, Injector, Linear, param

__all__ = [
    "LlamaConfig", "RopeScaling", "LlamaModel", "from_pretrained", "generate", "linear_names", "hf_rules",
    "positions_from_mask", "KVCache",
]

Array = jax.Array
# Per layer ``(keys, values)``, each ``(batch, max_length, num_key_value_heads, head_dim)`` in the compute dtype.
KVCache = tuple[tuple[Array, Array], ...]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
_MASKED = float(jnp.finfo(jnp.float32).min)  # finite, so a fully masked (padding) row gives no NaN


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


def positions_from_mask(attention_mask: Array) -> Array:
    """Token positions ``(B, L)`` int32 from a ``(B, L)`` mask: ``cumsum(mask) - 1``, 0 on padding (as HF generate)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def accum_dtype(dtype):
    """The dtype of norms, rotary angles, softmaxes and logits: float32, or float64 when computing in float64."""
    return jnp.promote_types(dtype, jnp.float32)


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


class RMSNorm(nnx.Module):
    """LLaMA RMS norm: normalised in float32, cast back to the compute dtype, then scaled by ``weight (dim,)``."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.weight = param(jnp.ones((dim,), param_dtype), ("embed",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        """``x (..., dim)`` -> ``(..., dim)`` in the compute dtype."""
        h = x.astype(accum_dtype(x.dtype))
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * h.astype(self.dtype)


class Embedding(nnx.Module):
    """Token embeddings ``(vocab, hidden)``; :meth:`attend` is the tied output projection."""

    def __init__(self, vocab: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.embedding = param(0.02 * jax.random.normal(rngs.params(), (vocab, dim), param_dtype), ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids: Array) -> Array:
        """``ids (B, L)`` int -> ``(B, L, hidden)``."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """``x (B, L, hidden)`` -> logits ``(B, L, vocab)`` against the embedding matrix."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings and an optional preallocated KV cache."""

    def __init__(self, cfg: LlamaConfig, layer: int, injector: Injector, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        prefix = f"model.layers.{layer}.self_attn"
        e, h, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        def linear(name, d_in, d_out, axes):
            return injector(name, f"{prefix}.{name}", "decoder", d_in, d_out, axes=axes,
                            use_bias=cfg.attention_bias, param_dtype=param_dtype, dtype=dtype, rngs=rngs)

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
        q = apply_rope(_apply(self.q_proj, x, ctx).reshape(b, length, kv * g, d), cos, sin)
        k = apply_rope(_apply(self.k_proj, x, ctx).reshape(b, length, kv, d), cos, sin)
        v = _apply(self.v_proj, x, ctx).reshape(b, length, kv, d)
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
        return _apply(self.o_proj, out, ctx), cache


class LlamaMLP(nnx.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, cfg: LlamaConfig, layer: int, injector: Injector, *, dtype, param_dtype, rngs: nnx.Rngs):
        prefix = f"model.layers.{layer}.mlp"
        e, f = cfg.hidden_size, cfg.intermediate_size

        def linear(name, d_in, d_out, axes):
            return injector(name, f"{prefix}.{name}", "decoder", d_in, d_out, axes=axes,
                            use_bias=cfg.mlp_bias, param_dtype=param_dtype, dtype=dtype, rngs=rngs)

        self.gate_proj = linear("gate_proj", e, f, ("embed", "mlp"))
        self.up_proj = linear("up_proj", e, f, ("embed", "mlp"))
        self.down_proj = linear("down_proj", f, e, ("mlp", "embed"))

    def __call__(self, x: Array, ctx: AdapterContext | None) -> Array:
        """``(B, L, hidden)`` -> ``(B, L, hidden)``."""
        h = jax.nn.silu(_apply(self.gate_proj, x, ctx)) * _apply(self.up_proj, x, ctx)
        return _apply(self.down_proj, h, ctx)


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: ``h + attn(norm(h))``, then ``h + mlp(norm(h))``."""

    def __init__(self, cfg: LlamaConfig, layer: int, injector: Injector, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = LlamaAttention(cfg, layer, injector, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = LlamaMLP(cfg, layer, injector, rngs=rngs, **kw)

    def __call__(self, h, cos, sin, mask, ctx, cache=None, index=0):
        """``h (B, L, hidden)`` -> ``(B, L, hidden)``, updated cache; arguments as :class:`LlamaAttention`."""
        a, cache = self.self_attn(self.input_layernorm(h), cos, sin, mask, ctx, cache, index)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h), ctx), cache


class LlamaStack(nnx.Module):
    """Embeddings, decoder layers and the final norm (transformers' ``LlamaModel``; our attribute ``model``)."""

    def __init__(self, cfg: LlamaConfig, injector: Injector, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = nnx.List(
            [LlamaDecoderLayer(cfg, i, injector, rngs=rngs, **kw) for i in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)


class LlamaModel(nnx.Module):
    """A LLaMA causal language model (transformers' ``LlamaForCausalLM``) with optional adapters.

    Args:
      cfg: the architecture.
      injection: which Linears (``q_proj`` ... ``down_proj``) get which adapter; None for the plain model.
      dtype / param_dtype: ``"float32"`` or ``"bfloat16"`` (see the module docstring).
      scan_layers: run the decoder layers as one ``jax.lax.scan`` when there is no KV cache
        (:mod:`ept_jax.layer_scan`: the same computation, compiled once instead of once per layer).
      rngs: initialisation keys (base weights are random until loaded, see :func:`from_pretrained`).
    Raises:
      ValueError: an unknown dtype name, or an injection target that names no Linear of the model.
    """

    def __init__(
        self,
        cfg: LlamaConfig,
        *,
        injection: Injection | None = None,
        dtype: str = "float32",
        param_dtype: str = "float32",
        scan_layers: bool = True,
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.scan_layers = scan_layers
        self.dtype = _dtype(dtype, "dtype")
        pdt = _dtype(param_dtype, "param_dtype")
        injector = Injector(injection)
        injector.check_targets(linear_names(cfg))
        self.model = LlamaStack(cfg, injector, dtype=self.dtype, param_dtype=pdt, rngs=rngs)
        # lm_head is built directly, never through the injector: it is never adapted.
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
        mask = _check_mask(attention_mask, input_ids.shape)
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


def _check_mask(attention_mask, shape) -> Array:
    if attention_mask is None:
        return jnp.ones(shape, bool)
    mask = jnp.asarray(attention_mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {tuple(shape)}")
    return mask.astype(bool)


# --------------------------------------------------------------------------------------------------- loading

_BASE = nnx.All(nnx.Param, nnx.Not(AdapterParam))


def _model_for_loading(cfg, injection, dtype, param_dtype, rngs: nnx.Rngs) -> LlamaModel:
    """A model about to receive checkpoint weights.

    Without adapters nothing needs a random initialisation: the model is built abstractly and its base weights
    allocated as zeros (drawing billions of random numbers only to overwrite them costs minutes on a host).
    With adapters it is built eagerly: adapters need their real initialisation, and compiling one initialiser
    program for hundreds of adapters takes XLA far longer than running the per-shape cached initialisers.
    """
    if injection is not None:
        return LlamaModel(cfg, injection=injection, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    abstract = nnx.eval_shape(lambda: LlamaModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, base, rest = nnx.split(abstract, _BASE, ...)
    if jax.tree.leaves(rest):
        raise AssertionError(f"a model without adapters holds non-base state: {rest}")  # a bug, not user error
    base = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), base)
    return nnx.merge(graphdef, base, rest)


def _truncated_config(config: dict, num_layers, source: str) -> dict:
    total = int(config.get("num_hidden_layers", 0))
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise CheckpointError(f"num_layers={num_layers!r}: {source} has {total} layers; accepted: 1 .. {total}")
    return {**config, "num_hidden_layers": num_layers}


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    injection: Injection | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    rngs: nnx.Rngs | None = None,
    gguf_file: str | None = None,
    num_layers: int | None = None,
) -> LlamaModel:
    """Loads a LLaMA-family checkpoint, strictly, optionally with adapters injected.

    Args:
      name_or_path: a Hugging Face model directory (``config.json`` + ``model.safetensors``, a sharded index,
        ``flax_model.msgpack`` or ``pytorch_model.bin``), a hub id, or a ``.gguf`` file.
      injection: adapters to inject (targets by short name, ``q_proj`` ... ``down_proj``).
      dtype / param_dtype: ``"float32"`` or ``"bfloat16"``.
      rngs: keys for the adapters' initialisation (default ``nnx.Rngs(0)``).
      gguf_file: a GGUF file name inside ``name_or_path`` (transformers' convention), instead of a ``.gguf`` path.
      num_layers: build and load only the first this many decoder layers (``1 .. num_hidden_layers``; None =
        all). The other layers' tensors are not read (GGUF: never dequantised; safetensors: never touched in
        the memory map); what is read is loaded as strictly as a full checkpoint. For fast tests and probes.
    Raises:
      CheckpointError: no weights, an unsupported config, or a missing / unexpected / wrongly shaped tensor
        (each named).
    """
    _dtype(dtype, "dtype")
    _dtype(param_dtype, "param_dtype")
    if gguf_file is not None and not os.path.isdir(name_or_path):
        name_or_path = resolve_model_dir(name_or_path, allow_patterns=[gguf_file, "*.json"])
    gguf_path = split_gguf_path(name_or_path, gguf_file)
    if gguf_path is not None:
        config, tensors = read_gguf(gguf_path, num_layers=num_layers)
        source = str(gguf_path)
    else:
        model_dir = resolve_model_dir(name_or_path)
        config, source = read_config(model_dir), str(model_dir)
        tensors = None  # read after the config is validated: a bad config fails before any weight is touched
    if tensors is None and num_layers is not None:
        config = _truncated_config(config, num_layers, source)
    try:
        cfg = LlamaConfig.from_hf(config)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e
    if tensors is None:
        tensors = read_tensors(model_dir)
        if num_layers is not None:  # safetensors are memory-mapped: dropping the names means never reading them
            tensors = {k: v for k, v in tensors.items() if (layer_index(k) or 0) < num_layers}
    model = _model_for_loading(cfg, injection, dtype, param_dtype, rngs or nnx.Rngs(0))
    load_into(model, tensors, hf_rules(cfg), ignore=hf_ignore(cfg), source=source)
    return model


# --------------------------------------------------------------------------------------------------- generation


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
    mask = _check_mask(attention_mask, input_ids.shape)
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
