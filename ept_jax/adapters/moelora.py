"""MoE-LoRA: homogeneous, independently parameterised LoRA experts routed per task by a dense softmax gate.

* ``"moelora"`` (:class:`MoELoRAAdapter`): each Linear owns its gate and task embedding (``n_task_rows`` rows,
  task ids 0-based), ``A`` PyTorch's Linear init.
* ``"moelora_release"`` (:class:`MOELoRAReleaseAdapter`): MOELoRA as ``liuqidong07/MOELoRA-peft``
  (``mmoeloraS``) computes it: ``A_i`` ``N(0, 0.01^2)``, ``B_i`` zero, and ONE task embedding ``(n_tasks + 1,
  64)`` with ONE gate ``Linear(64, E, no bias)`` + softmax shared by every adapted Linear of the model
  (:class:`MOELoRARouter`, built once per model by :func:`ept_jax.adapters.inject`); task ``t`` reads row
  ``t + 1``. Dense, no top-k, no auxiliary loss; merge exact.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ept_jax.adapters import pyramid
from ept_jax.adapters.base import (
    Adapter,
    ab_init_spec,
    adapter_axes,
    check_input,
    check_task,
    draw_params,
    dtype_of,
    select_rows,
)
from ept_jax.adapters.config import (
    AdapterConfig,
)
from ept_jax.core.dropout import dropout
from ept_jax.core.params import AdapterContext, AdapterParam, param

Array = jax.Array


# MOELoRA's task-embedding width (its ``task_embedding_dim``); the gate reads this, not d_in.
MOELORA_TASK_EMBEDDING_DIM = 64


def validate_moelora(cfg: AdapterConfig, d_in: int, d_out: int) -> None:
    n = cfg.n_moe_experts
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n_moe_experts={n!r}: must be an integer >= 1")
    if cfg.r % n:
        raise ValueError(
            f"r={cfg.r} is not divisible by n_moe_experts={n}: MoE-LoRA splits the rank budget r evenly over its "
            "experts (each has rank r // n_moe_experts)"
        )


class MoELoRAAdapter(Adapter):
    """MOELoRA-style MoE-LoRA: ``n`` LoRA experts of rank ``r // n``, mixed per task by a dense softmax gate.

    ``y = (alpha / r) * sum_i g[t, i] * dropout(x) @ A_i.T @ B_i.T`` with ``g = softmax(E @ gate_w.T)`` (no
    bias, no top-k: MOELoRA's gate). Parameters: ``A (n, r // n, d_in)`` (PyTorch default init, or Gaussian),
    ``B (n, d_out, r // n)`` zero, ``gate_w (n, te)`` PyTorch default init, ``task_embedding (n_task_rows, te)``
    ``N(0, 1)`` (``nn.Embedding``'s init) with ``te = MOELORA_TASK_EMBEDDING_DIM``.
    """

    check = staticmethod(validate_moelora)

    def __init__(self, cfg: AdapterConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes=None):
        self.validate_config(cfg, d_in, d_out)
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
        g = jnp.repeat(select_rows(self._row_weights().astype(x.dtype), ctx.task_ids), re, axis=-1)  # (B, n * re)
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


class MOELoRARouter(nnx.Module):
    """MOELoRA's model-wide router: ONE ``task_embedding (n_tasks + 1, 64)`` and ONE ``gate_w (E, 64)``.

    Every ``"moelora_release"`` adapter of a model holds this same object; flax NNX stores it once (in
    ``nnx.split`` states, checkpoints and parameter counts) and sums the gradients of all its users.
    """

    def __init__(self, cfg: AdapterConfig, *, rngs: nnx.Rngs):
        te, n = MOELORA_TASK_EMBEDDING_DIM, cfg.n_moe_experts
        dtype = dtype_of(cfg.param_dtype)
        v = draw_params(
            rngs,
            {
                "gate_w": ((n, te), "uniform", 1.0 / math.sqrt(te)),  # nn.Linear(64, E, bias=False)
                "task_embedding": ((cfg.n_tasks + 1, te), "normal", 1.0),  # nn.Embedding's N(0, 1)
            },
            dtype,
        )
        self.gate_w = param(v["gate_w"], ("experts", None), AdapterParam)
        self.task_embedding = param(v["task_embedding"], ("tasks", None), AdapterParam)

    def weights(self) -> Array:
        """``(n_tasks, E)``: ``softmax(E[t + 1] @ gate_w.T)`` for our 0-based task ``t`` (row 0 is unused)."""
        return pyramid.route(self.gate_w[...], None, self.task_embedding[...], None)[0][1:]


class MOELoRAReleaseAdapter(MoELoRAAdapter):
    """MOELoRA's ``mmoeloraS`` layer: ``E`` LoRA experts of rank ``r // E`` mixed by the shared router.

    Parameters: ``A (E, r // E, d_in)`` ``N(0, 0.01^2)``, ``B (E, d_out, r // E)`` zero, and ``router``
    (:class:`MOELoRARouter`, shared; a standalone adapter built without ``shared`` owns one). Forward, merge
    and factors are :class:`~ept_jax.adapters.moelora.MoELoRAAdapter`'s with the shared router's weights.
    """

    check = staticmethod(validate_moelora)

    def __init__(self, cfg: AdapterConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes=None,
                 shared: MOELoRARouter | None = None):
        self.validate_config(cfg, d_in, d_out)
        self.cfg, self.d_in, self.d_out = cfg, d_in, d_out
        n, re = cfg.n_moe_experts, cfg.r // cfg.n_moe_experts
        dtype = dtype_of(cfg.param_dtype)
        in_ax, out_ax = adapter_axes(axes)
        v = draw_params(rngs, {"A": ((n, re, d_in), "normal", 0.01)}, dtype)
        self.A = param(v["A"], ("experts", "lora_rank", in_ax), AdapterParam)
        self.B = param(jnp.zeros((n, d_out, re), dtype), ("experts", out_ax, "lora_rank"), AdapterParam)
        self.router = shared if shared is not None else MOELoRARouter(cfg, rngs=rngs)

    @classmethod
    def build_shared(cls, cfg: AdapterConfig, *, rngs: nnx.Rngs) -> MOELoRARouter:
        """The one router of a model (``ept_jax.adapters.make_shared``)."""
        return MOELoRARouter(cfg, rngs=rngs)

    def routing(self) -> tuple[Array, Array]:
        """``(weights (n_tasks, E), idx)``: the shared router's dense weights for each 0-based task."""
        w = self.router.weights()
        return w, jnp.broadcast_to(jnp.arange(w.shape[1]), w.shape)
