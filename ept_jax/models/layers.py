"""Layers the model families share: RMS norm (T5's layer norm is the same computation), embeddings, dtypes.

The frozen :class:`~ept_jax.core.linear.Linear` is in ``core`` (adapters wrap it); :func:`apply_linear` calls a
frozen or an adapted Linear the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ept_jax.core.params import AdapterContext, param

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def compute_dtype(name, what: str):
    """The jnp dtype named ``name`` (``"float32"``, ``"bfloat16"``, ``"float64"``); ``what`` names the setting."""
    if name not in DTYPES:
        raise ValueError(f"{what}={name!r} is not supported; accepted: {sorted(DTYPES)}")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise ValueError(f"{what}='float64' needs jax_enable_x64 (jax.config.update('jax_enable_x64', True)); "
                         "without it JAX computes in float32")
    return DTYPES[name]


def accum_dtype(dtype):
    """The dtype of norms, rotary angles, softmaxes and logits: float32, or float64 when computing in float64."""
    return jnp.promote_types(dtype, jnp.float32)


def apply_linear(lin, x: Array, ctx: AdapterContext | None) -> Array:
    """Calls a frozen Linear ``lin(x)`` or an adapted one ``lin(x, ctx)`` (only adapted ones take the context)."""
    return lin(x) if getattr(lin, "adapter", None) is None else lin(x, ctx)


class RMSNorm(nnx.Module):
    """RMS norm (LLaMA's, and T5's layer norm): ``weight * x / sqrt(mean(x^2) + eps)``, normalised in float32
    (float64 in float64 models), cast to the compute dtype, then scaled by ``weight (dim,)``; no mean, no bias."""

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
    """A lookup table ``embedding (num, dim)`` ``N(0, std^2)``: token embeddings (:meth:`attend` is the tied output
    projection) or T5's relative position bias table."""

    def __init__(self, num: int, dim: int, *, axes: tuple[str, str] = ("vocab", "embed"), std: float = 0.02, dtype,
                 param_dtype, rngs: nnx.Rngs):
        self.embedding = param(std * jax.random.normal(rngs.params(), (num, dim), param_dtype), axes)
        self.dtype = dtype

    def __call__(self, ids: Array) -> Array:
        """``ids (...)`` int -> ``(..., dim)`` in the compute dtype."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """``x (B, L, dim)`` -> ``(B, L, num)`` against the table (the tied output projection)."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)
