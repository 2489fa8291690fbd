"""The frozen base Linear every model builds and every adapter wraps (:class:`ept_jax.adapters.base.AdaptedLinear`).

It lives in ``core`` rather than ``models/layers.py`` because both the models (which build it) and the adapters
(which find it in a built model and wrap it, :func:`ept_jax.adapters.inject.inject`) need the class, and the
adapters layer sits below the models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ept_jax.core.params import default_kernel_init, param

Array = jax.Array


class Linear(nnx.Module):
    """A frozen base Linear ``y = x @ kernel (+ bias)``; ``kernel`` is ``(d_in, d_out)`` (JAX layout).

    ``axes`` are the logical axis names of the kernel, e.g. ``("embed", "mlp")``.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool = False,
        param_dtype=jnp.float32,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.d_in, self.d_out = d_in, d_out
        self.dtype = dtype
        self.kernel = param(default_kernel_init(rngs.params(), d_in, d_out, param_dtype), axes)
        self.bias = param(jnp.zeros((d_out,), param_dtype), (axes[1],)) if use_bias else None

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or x.dtype
        y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y
