"""The other systems of EPT's tables, and T-REX, behind the same interface (:class:`ept_jax.adapters.base.Adapter`).

Per adapted Linear ``d_in -> d_out``, PyTorch layout, ``x`` the Linear's input (``(B, ..., d_in)``, batch first):

* ``"more"``: **MoRE** (NLPfreshman0/MoRE, the code EPT's release forks). ``A (r, d_in)`` kaiming-uniform
  (a=sqrt 5), ``B (d_out, r)`` zero, per Linear a gate ``Linear(d_in, 8)`` + softmax (weight kaiming-uniform,
  fan_in, relu; PyTorch's bias init) and a task embedding ``(n_task_rows, d_in)`` ``N(0, 0.01^2)``. Expert ``k``
  (of 8) is the nested rank prefix ``0..k``, rank ``j`` scaled by ``(j + 1) / 8`` on both ``A``'s row and
  ``B``'s column (the release's fixed table ``[0.125, ..., 1.0]``)::

      delta(x) = (alpha / r) * sum_{j <= k_t} ((j + 1) / 8)^2 * b_j a_j^T x,   k_t = argmax(gate(E[t])).

  ``variant="reference"`` (the release): ``k_t`` is computed once, when the adapter is built (= the release's
  ``init_task_map`` at the first forward, before any update), and stored as a non-trainable
  :class:`FixedRouting` variable; the released straight-through branch is dead code, so the gate gets no
  gradient (the task embedding still trains through the contrastive loss). ``variant="paper"``: ``k_t`` is
  recomputed at every call and the output is multiplied by the straight-through value
  ``st = p[k_t] - stop_gradient(p[k_t]) + 1`` (``p = softmax(gate(E[t]))``; exactly 1 forward), as the
  release's dead branch writes it, so the gate trains. Contrastive loss: EPT's reference variant
  (:func:`ept_jax.adapters.pyramid.contrastive_loss`). Per-task merge is exact (rank ``r``).
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
    VARIANTS,
    AdapterConfig,
)
from ept_jax.core.dropout import dropout
from ept_jax.core.params import AdapterContext, AdapterParam, param

Array = jax.Array


MORE_N_EXPERTS = 8  # the release's num_experts: gate outputs, and the length of its rank-scale table


class FixedRouting(nnx.Variable):
    """A routing decision that never trains (MoRE's release: each task row's expert, fixed at first use).

    Not an :class:`~ept_jax.core.params.AdapterParam`: it gets no gradient, no optimizer state and is not written into
    adapter checkpoints; it is recomputed from the (seeded) initial gate whenever the model is built.
    """


def more_rank_scales(r: int) -> tuple[float, ...]:
    """MoRE's per-rank scales ``(j + 1) / 8`` for ``j < r`` (applied to ``A``'s row and ``B``'s column)."""
    return tuple((j + 1) / MORE_N_EXPERTS for j in range(r))


def validate_more(cfg: AdapterConfig, d_in: int, d_out: int) -> None:
    if cfg.variant not in VARIANTS:
        raise ValueError(
            f"variant={cfg.variant!r}: accepted values are {VARIANTS} (MoRE: 'reference' = the release, k_t fixed "
            "at first use; 'paper' = straight-through gate)"
        )
    if not 1 <= cfg.r <= MORE_N_EXPERTS:
        raise ValueError(
            f"r={cfg.r}: MoRE has {MORE_N_EXPERTS} nested experts and a rank-scale table of {MORE_N_EXPERTS} "
            f"entries ((j + 1) / 8), so accepted 1 <= r <= {MORE_N_EXPERTS}"
        )
    if not cfg.contrastive_tau > 0:
        raise ValueError(f"contrastive_tau={cfg.contrastive_tau!r}: must be > 0")


class MoREAdapter(Adapter):
    """MoRE on one Linear (see the module docstring for the formula and the two variants).

    Parameters (:class:`~ept_jax.core.params.AdapterParam`): ``A (r, d_in)``, ``B (d_out, r)``, ``gate_w (8, d_in)``,
    ``gate_b (8,)``, ``task_embedding (n_task_rows, d_in)``; reference variant also ``expert``
    (:class:`FixedRouting`, ``(n_task_rows,)`` int32: ``k_t`` per task row).
    """

    check = staticmethod(validate_more)

    def __init__(self, cfg: AdapterConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes=None):
        self.validate_config(cfg, d_in, d_out)
        self.cfg, self.d_in, self.d_out = cfg, d_in, d_out
        dtype = dtype_of(cfg.param_dtype)
        in_ax, out_ax = adapter_axes(axes)
        n = MORE_N_EXPERTS
        v = draw_params(
            rngs,
            {
                "A": ((cfg.r, d_in), *ab_init_spec(cfg.init or "default", (cfg.r, d_in), cfg.r)),
                "gate_w": ((n, d_in), "uniform", math.sqrt(6.0 / d_in)),  # kaiming_uniform_(fan_in, relu)
                "gate_b": ((n,), "uniform", 1.0 / math.sqrt(d_in)),  # nn.Linear's bias init
                "task_embedding": ((cfg.n_task_rows, d_in), "normal", 0.01),
            },
            dtype,
        )
        self.A = param(v["A"], ("lora_rank", in_ax), AdapterParam)
        self.B = param(jnp.zeros((d_out, cfg.r), dtype), (out_ax, "lora_rank"), AdapterParam)
        self.gate_w = param(v["gate_w"], ("experts", in_ax), AdapterParam)
        self.gate_b = param(v["gate_b"], ("experts",), AdapterParam)
        self.task_embedding = param(v["task_embedding"], ("tasks", in_ax), AdapterParam)
        fixed = cfg.variant == "reference"
        self.expert = nnx.data(
            FixedRouting(self.gate_choice(), out_sharding=("tasks",), eager_sharding=False) if fixed else None
        )

    def gate_probs(self) -> Array:
        """``softmax(E @ gate_w.T + gate_b)``: ``(n_task_rows, 8)`` gate probabilities of every task row."""
        return pyramid.route(self.gate_w[...], self.gate_b[...], self.task_embedding[...], None)[0]

    def gate_choice(self) -> Array:
        """``(n_task_rows,)`` int32 ``k_t = argmax(gate(E[t]))`` from the current gate and task embedding."""
        return jnp.argmax(self.gate_probs(), axis=-1).astype(jnp.int32)

    def fix_routing(self) -> None:
        """Reference variant: sets ``k_t`` from the current gate, as the release's first forward does.

        Called at construction; call it again only after replacing the gate or task embedding wholesale
        (importing trained weights), never after training steps (the release keeps its first choice).
        """
        if self.expert is None:
            raise ValueError("fix_routing: only the reference variant fixes k_t; the paper variant routes each call")
        self.expert[...] = self.gate_choice()

    def rank_weights(self) -> Array:
        """``(n_task_rows, r)``: ``(alpha / r) * ((j + 1) / 8)^2 * [j <= k_t] * st`` for every task row.

        ``st`` is 1 (reference) or the straight-through value ``p[k] - stop_gradient(p[k]) + 1`` (paper),
        which equals 1 exactly and carries the gate's gradient.
        """
        r = self.cfg.r
        if self.expert is not None:
            k = self.expert[...]
            dt = self.A[...].dtype
            st = jnp.ones(k.shape, dt)
        else:
            p = self.gate_probs()
            k = jnp.argmax(p, axis=-1)
            pk = jnp.sum(p * jax.nn.one_hot(k, p.shape[-1], dtype=p.dtype), axis=-1)  # p[k]: exact, no scatter
            st = pk - jax.lax.stop_gradient(pk) + 1.0
            dt = p.dtype
        mask = (jnp.arange(r)[None, :] <= k[:, None]).astype(dt)
        c2 = jnp.asarray(more_rank_scales(r), dt) ** 2
        return mask * c2[None, :] * st[:, None] * jnp.asarray(self.cfg.scale, dt)

    def __call__(self, x: Array, ctx: AdapterContext) -> Array:
        """``x (B, ..., d_in)`` -> ``(B, ..., d_out)``, example ``b`` routed to task ``ctx.task_ids[b]``."""
        check_input(x, self.d_in, ctx.task_ids)
        x = dropout(x, self.cfg.dropout, ctx, self.cfg.dropout_impl)
        a, b = self.A[...].astype(x.dtype), self.B[...].astype(x.dtype)
        w = select_rows(self.rank_weights().astype(x.dtype), ctx.task_ids)  # (B, r)
        u = (x @ a.T) * w.reshape(w.shape[:1] + (1,) * (x.ndim - 2) + w.shape[1:])
        return u @ b.T

    def to_lora(self, task: int | Array) -> tuple[Array, Array]:
        """Exact rank-``r`` factors ``(B' (d_out, r), A (r, d_in))`` of ``merge(task)`` (weights in ``B'``)."""
        check_task(task, self.cfg.n_tasks)
        return self.B[...] * self.rank_weights()[task][None, :], self.A[...]

    def merge(self, task: int | Array) -> Array:
        """Task ``task``'s scaled delta ``(d_out, d_in)`` = ``B diag(w_t) A``."""
        f_b, f_a = self.to_lora(task)
        return f_b @ f_a

    def contrastive_loss(self, x: Array, task_ids: Array) -> Array | None:
        """EPT's reference contrastive loss on ``x[:, 0, :]`` (``x (B, S, d_in)``) against the task embedding."""
        if x.ndim != 3 or x.shape[-1] != self.d_in:
            raise ValueError(f"contrastive loss input of shape {x.shape}: expected (batch, seq, {self.d_in})")
        dt = jnp.promote_types(x.dtype, jnp.float32)
        return pyramid.contrastive_loss(
            x[:, 0, :].astype(dt), self.task_embedding[...].astype(dt), task_ids, self.cfg.contrastive_tau
        )
