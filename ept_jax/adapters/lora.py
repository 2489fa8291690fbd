"""LoRA: ``y = (alpha / r) * dropout(x) @ A.T @ B.T`` (``A`` PyTorch Linear init, ``B`` zero)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ept_jax.adapters.base import (
    Adapter,
    ab_init_spec,
    adapter_axes,
    check_task,
    draw_params,
    dtype_of,
)
from ept_jax.adapters.config import (
    AdapterConfig,
)
from ept_jax.core.dropout import dropout
from ept_jax.core.lowrank import lowrank
from ept_jax.core.params import AdapterContext, AdapterParam, param

Array = jax.Array


class LoRAAdapter(Adapter):
    """LoRA: ``y = (alpha / r) * dropout(x) @ A.T @ B.T`` with ``A (r, d_in)``, ``B (d_out, r)``.

    Init: ``A`` PyTorch's default Linear init (or ``N(0, (1/r)^2)`` with ``init="gaussian"``), ``B`` zero.
    """

    def __init__(self, cfg: AdapterConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes=None):
        self.validate_config(cfg, d_in, d_out)
        self.cfg, self.d_in, self.d_out = cfg, d_in, d_out
        dtype = dtype_of(cfg.param_dtype)
        in_ax, out_ax = adapter_axes(axes)
        v = draw_params(rngs, {"A": ((cfg.r, d_in), *ab_init_spec(cfg.init or "default", (cfg.r, d_in), cfg.r))}, dtype)
        self.A = param(v["A"], ("lora_rank", in_ax), AdapterParam)
        self.B = param(jnp.zeros((d_out, cfg.r), dtype), (out_ax, "lora_rank"), AdapterParam)

    def __call__(self, x: Array, ctx: AdapterContext) -> Array:
        """``x (B, ..., d_in)`` -> ``(B, ..., d_out)``; the task is ignored (one adapter for all tasks)."""
        if x.ndim < 1 or x.shape[-1] != self.d_in:
            raise ValueError(f"adapter input of shape {x.shape}: expected (..., {self.d_in})")
        x = dropout(x, self.cfg.dropout, ctx, self.cfg.dropout_impl)
        a, b = self.A[...].astype(x.dtype), self.B[...].astype(x.dtype)
        return lowrank(x, a.T, b.T * jnp.asarray(self.cfg.scale, x.dtype))

    def merge(self, task: int | Array = 0) -> Array:
        """``(alpha / r) * B @ A`` ``(d_out, d_in)``, the same for every task."""
        check_task(task, self.cfg.n_tasks)
        return self.cfg.scale * self.B[...] @ self.A[...]

    def to_lora(self, task: int | Array = 0) -> tuple[Array, Array]:
        """``(scale * B (d_out, r), A (r, d_in))``."""
        check_task(task, self.cfg.n_tasks)
        return self.cfg.scale * self.B[...], self.A[...]
