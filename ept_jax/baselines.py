"""Baseline adapters in the EPT family, with the same interface (:class:`ept_jax.nn.Adapter`) and config.

* ``"lora"``: standard LoRA (``A`` kaiming-uniform, ``B`` zero, scale ``alpha / r``, dropout on ``x``).
* ``"moelora"``: MOELoRA-style mixture of homogeneous, independently parameterised LoRA experts routed per
  task by a dense softmax gate over a task embedding.
* ``"dcft"``: DCFT (deconvolution in subspace): one expert, no routing, ``dW = ConvTranspose2d(B @ A, K,
  stride k)`` = the paper variant's Kronecker expansion with a single kernel (size 2 unless configured).

They register themselves in :mod:`ept_jax.adapters`' registry on import (which :func:`make_adapter` triggers).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ept_jax import pyramid
from ept_jax.adapters import (
    AdapterConfig,
    EPTAdapter,
    ab_init_spec,
    adapter_axes,
    check_input,
    check_task,
    draw_params,
    dropout,
    dtype_of,
    register_adapter,
    validate,
    validate_ept,
)
from ept_jax.lowrank import lowrank
from ept_jax.nn import Adapter, AdapterContext, AdapterParam, param

Array = jax.Array

DCFT_DEFAULT_KERNEL = 2
# MOELoRA's task-embedding width (its ``task_embedding_dim``); the gate reads this, not d_in.
MOELORA_TASK_EMBEDDING_DIM = 64


@register_adapter("lora")
class LoRAAdapter(Adapter):
    """LoRA: ``y = (alpha / r) * dropout(x) @ A.T @ B.T`` with ``A (r, d_in)``, ``B (d_out, r)``.

    Init: ``A`` PyTorch's default Linear init (or ``N(0, (1/r)^2)`` with ``init="gaussian"``), ``B`` zero.
    """

    def __init__(self, cfg: AdapterConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes=None):
        validate(cfg, d_in, d_out)
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


def validate_moelora(cfg: AdapterConfig, d_in: int, d_out: int) -> None:
    n = cfg.n_moe_experts
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n_moe_experts={n!r}: must be an integer >= 1")
    if cfg.r % n:
        raise ValueError(
            f"r={cfg.r} is not divisible by n_moe_experts={n}: MoE-LoRA splits the rank budget r evenly over its "
            "experts (each has rank r // n_moe_experts)"
        )


@register_adapter("moelora", validate_moelora)
class MoELoRAAdapter(Adapter):
    """MOELoRA-style MoE-LoRA: ``n`` LoRA experts of rank ``r // n``, mixed per task by a dense softmax gate.

    ``y = (alpha / r) * sum_i g[t, i] * dropout(x) @ A_i.T @ B_i.T`` with ``g = softmax(E @ gate_w.T)`` (no
    bias, no top-k: MOELoRA's gate). Parameters: ``A (n, r // n, d_in)`` (PyTorch default init, or Gaussian),
    ``B (n, d_out, r // n)`` zero, ``gate_w (n, te)`` PyTorch default init, ``task_embedding (n_task_rows, te)``
    ``N(0, 1)`` (``nn.Embedding``'s init) with ``te = MOELORA_TASK_EMBEDDING_DIM``.
    """

    def __init__(self, cfg: AdapterConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes=None):
        validate(cfg, d_in, d_out)
        self.cfg, self.d_in, self.d_out = cfg, d_in, d_out
        n, re = cfg.n_moe_experts, cfg.r // cfg.n_moe_experts
        dtype = dtype_of(cfg.param_dtype)
        in_ax, out_ax = adapter_axes(axes)
        te = MOELORA_TASK_EMBEDDING_DIM
        # fan_in of each expert's A is d_in (as n separate nn.Linear(d_in, r // n) would have).
        v = draw_params(
            rngs,
            {
                "A": ((n, re, d_in), *ab_init_spec(cfg.init or "default", (n, re, d_in), cfg.r)),
                "gate_w": ((n, te), "uniform", 1.0 / math.sqrt(te)),  # nn.Linear(te, n, bias=False)
                "task_embedding": ((cfg.n_task_rows, te), "normal", 1.0),  # nn.Embedding's N(0, 1)
            },
            dtype,
        )
        self.A = param(v["A"], ("experts", "lora_rank", in_ax), AdapterParam)
        self.B = param(jnp.zeros((n, d_out, re), dtype), ("experts", out_ax, "lora_rank"), AdapterParam)
        self.gate_w = param(v["gate_w"], ("experts", None), AdapterParam)
        self.task_embedding = param(v["task_embedding"], ("tasks", None), AdapterParam)

    def routing(self) -> tuple[Array, Array]:
        """``(weights (n_task_rows, n), idx)``: dense softmax gate weights for every task row."""
        return pyramid.route(self.gate_w[...], None, self.task_embedding[...], None)

    def _row_weights(self) -> Array:
        return self.routing()[0] * self.cfg.scale

    def __call__(self, x: Array, ctx: AdapterContext) -> Array:
        """``x (B, ..., d_in)`` -> ``(B, ..., d_out)`` routed by ``ctx.task_ids``; costs a rank-``r`` LoRA."""
        check_input(x, self.d_in, ctx.task_ids)
        x = dropout(x, self.cfg.dropout, ctx, self.cfg.dropout_impl)
        a, b = self.A[...].astype(x.dtype), self.B[...].astype(x.dtype)
        n, re, _ = a.shape
        u = x @ a.reshape(n * re, self.d_in).T  # (B, ..., n * re)
        g = jnp.repeat(self._row_weights().astype(x.dtype)[ctx.task_ids], re, axis=-1)  # (B, n * re)
        u = u * g.reshape(g.shape[:1] + (1,) * (x.ndim - 2) + g.shape[1:])
        return u @ jnp.transpose(b, (0, 2, 1)).reshape(n * re, self.d_out)

    def to_lora(self, task: int | Array) -> tuple[Array, Array]:
        """Exact rank-``r`` factors ``(B' (d_out, r), A' (r, d_in))``: experts concatenated, weights in ``B'``."""
        check_task(task, self.cfg.n_tasks)
        a, b = self.A[...], self.B[...]
        n, re, _ = a.shape
        w = self._row_weights()[task]
        f_b = jnp.transpose(b * w[:, None, None], (1, 0, 2)).reshape(self.d_out, n * re)
        return f_b, a.reshape(n * re, self.d_in)

    def merge(self, task: int | Array) -> Array:
        """Task ``task``'s scaled delta ``sum_i g_i B_i @ A_i`` ``(d_out, d_in)``."""
        check_task(task, self.cfg.n_tasks)
        w = self._row_weights()[task]
        return jnp.einsum("n,noq,nqi->oi", w, self.B[...], self.A[...])


def dcft_kernel_size(cfg: AdapterConfig) -> int:
    """DCFT's kernel: the single configured size, or DCFT's kernel 2 when ``expert_kernel_sizes`` lists several."""
    ks = cfg.expert_kernel_sizes
    return ks[0] if isinstance(ks, tuple) and len(ks) == 1 else DCFT_DEFAULT_KERNEL


def _validate_dcft(cfg: AdapterConfig, d_in: int, d_out: int) -> None:
    k = dcft_kernel_size(cfg)
    validate_ept(dataclasses.replace(cfg, variant="paper", expert_kernel_sizes=(k,), top_k=None), d_in, d_out)
    if cfg.variant not in ("reference", "paper"):
        raise ValueError(f"variant={cfg.variant!r}: accepted values are ('reference', 'paper')")


@register_adapter("dcft", _validate_dcft)
class DCFTAdapter(EPTAdapter):
    """DCFT: ``dW = (alpha / r) * (B @ A) (x) K`` with ``A (r, d_in / k)``, ``B (d_out / k, r)``, ``K (k, k)``.

    One expert, no router, no task embedding (so no contrastive loss); the expansion is always the 2-D
    transposed convolution (Kronecker product). ``variant`` selects only the init, as for EPT: ``"reference"``
    gives PyTorch-default ``A``, ``B`` and kernel (the kernel as a ``ConvTranspose2d(1, 1, k)`` weight,
    ``fan_in = k * k``; non-zero at step 0), ``"paper"`` Gaussian ``A``/``B`` and a zero kernel.
    """

    def __init__(self, cfg: AdapterConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes=None):
        validate(cfg, d_in, d_out)
        k = dcft_kernel_size(cfg)
        super().__init__(
            cfg,
            d_in,
            d_out,
            rngs=rngs,
            axes=axes,
            expansion="paper",
            kernel_sizes=(k,),
            routed=False,
        )
