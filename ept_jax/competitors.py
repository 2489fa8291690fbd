"""The other systems of EPT's tables, and T-REX, behind the same interface (:class:`ept_jax.nn.Adapter`).

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
  (:func:`ept_jax.pyramid.contrastive_loss`). Per-task merge is exact (rank ``r``).
* ``"moelora_release"``: **MOELoRA** as ``liuqidong07/MOELoRA-peft`` (``mmoeloraS``) computes it. ``E``
  experts per Linear, ``A_i (r / E, d_in)`` ``N(0, 0.01^2)``, ``B_i (d_out, r / E)`` zero, and ONE task
  embedding ``(n_tasks + 1, 64)`` (``nn.Embedding``: ``N(0, 1)``) with ONE gate ``Linear(64, E, no bias)`` +
  softmax shared by every adapted Linear of the model (:class:`MOELoRARouter`, built once per model by
  ``ept_jax.nn.Injector``); task ids are 1-based there, so our task ``t`` reads row ``t + 1``.
  ``delta(x) = (alpha / r) * sum_i w_i(t) B_i A_i x``: dense, no top-k, no auxiliary loss; merge exact. The
  release trains with r 16, E 8, alpha 32, dropout 0.1 (``--config.adapter.r=16``). The older ``"moelora"``
  kind (``baselines.py``) differs: each Linear owns its gate and task embedding (``n_task_rows`` rows, task
  ids 0-based) and ``A`` takes PyTorch's Linear init.
* ``"trex"``: **T-REX** (RoyZry98/T-REX-Pytorch, mode ``rank1_flex``). ``A (r1, d_in)`` kaiming-uniform (the
  vectors ``a_i``), ``B (d_out, r2)`` zero (the vectors ``b_j``), a router ``Linear(d_in, r1 r2, no bias)``
  zero-initialised and two scalars ``w_omg``, ``w_g`` zero. Per token::

      omega = sigmoid(100 w_omg),   R = softmax(router(x)) * omega * c_tok + s * (1 - omega) * c_sem,
      delta(x) = sigmoid(100 w_g) * B R^T (A x),      R reshaped to (r1, r2),

  all ``r1 * r2`` rank-one experts ``b_j a_i^T`` from ``r1 + r2`` vectors. ``variant="reference"`` (the
  release): ``c_tok = 32`` and ``c_sem = 4`` whatever ``r1, r2`` (:data:`TREX_RELEASE_ROUTER_SCALE`,
  :data:`TREX_RELEASE_SEMANTIC_SCALE`; ``peft/src/peft/tuners/lora.py``, ``Linear.forward``, ``rank1_flex``:
  ``token_coefficient = 32``, ``task_coefficient = 4``). ``variant="paper"``: ``c_tok = r1 r2``, ``c_sem = r1``,
  ept_jax's generalisation, a departure from the release (see :func:`trex_routing_scales`); the two agree
  only at the release's allocation ``r1 = 4, r2 = 8``. ``s`` ``(B, r1 r2)`` is the
  per-sample semantic vector ``centroids @ emb(sample)`` passed as ``AdapterContext.semantic`` (None: zeros).
  The routing depends on every token, so nothing merges: ``mergeable = False`` and ``merge``/``to_lora``
  raise; export refuses it with the same reason.

Dropout (``cfg.dropout``) is applied to the input of ``A`` as in PEFT's LoRA layer (T-REX's router reads the
undropped ``x``). All three register in :mod:`ept_jax.adapters`' registry on import.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ept_jax import pyramid
from ept_jax.adapters import (
    VARIANTS,
    AdapterConfig,
    ab_init_spec,
    adapter_axes,
    check_input,
    check_task,
    draw_params,
    dropout,
    dtype_of,
    register_adapter,
    validate,
)
from ept_jax.baselines import MOELORA_TASK_EMBEDDING_DIM, MoELoRAAdapter, validate_moelora
from ept_jax.nn import Adapter, AdapterContext, AdapterParam, param

Array = jax.Array

MORE_N_EXPERTS = 8  # the release's num_experts: gate outputs, and the length of its rank-scale table


class FixedRouting(nnx.Variable):
    """A routing decision that never trains (MoRE's release: each task row's expert, fixed at first use).

    Not an :class:`~ept_jax.nn.AdapterParam`: it gets no gradient, no optimizer state and is not written into
    adapter checkpoints; it is recomputed from the (seeded) initial gate whenever the model is built.
    """


def more_rank_scales(r: int) -> tuple[float, ...]:
    """MoRE's per-rank scales ``(j + 1) / 8`` for ``j < r`` (applied to ``A``'s row and ``B``'s column)."""
    return tuple((j + 1) / MORE_N_EXPERTS for j in range(r))


def _validate_more(cfg: AdapterConfig, d_in: int, d_out: int) -> None:
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


@register_adapter("more", _validate_more)
class MoREAdapter(Adapter):
    """MoRE on one Linear (see the module docstring for the formula and the two variants).

    Parameters (:class:`~ept_jax.nn.AdapterParam`): ``A (r, d_in)``, ``B (d_out, r)``, ``gate_w (8, d_in)``,
    ``gate_b (8,)``, ``task_embedding (n_task_rows, d_in)``; reference variant also ``expert``
    (:class:`FixedRouting`, ``(n_task_rows,)`` int32: ``k_t`` per task row).
    """

    def __init__(self, cfg: AdapterConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes=None):
        validate(cfg, d_in, d_out)
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
            pk = jnp.take_along_axis(p, k[:, None], axis=-1)[:, 0]
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
        w = self.rank_weights().astype(x.dtype)[ctx.task_ids]  # (B, r)
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


@register_adapter("moelora_release", validate_moelora)
class MOELoRAReleaseAdapter(MoELoRAAdapter):
    """MOELoRA's ``mmoeloraS`` layer: ``E`` LoRA experts of rank ``r // E`` mixed by the shared router.

    Parameters: ``A (E, r // E, d_in)`` ``N(0, 0.01^2)``, ``B (E, d_out, r // E)`` zero, and ``router``
    (:class:`MOELoRARouter`, shared; a standalone adapter built without ``shared`` owns one). Forward, merge
    and factors are :class:`~ept_jax.baselines.MoELoRAAdapter`'s with the shared router's weights.
    """

    def __init__(self, cfg: AdapterConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes=None,
                 shared: MOELoRARouter | None = None):
        validate(cfg, d_in, d_out)
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


TREX_RELEASE_ROUTER_SCALE = 32.0  # the release's token_coefficient (rank1_flex), fixed whatever r1, r2
TREX_RELEASE_SEMANTIC_SCALE = 4.0  # the release's task_coefficient (rank1_flex), fixed whatever r1, r2


def trex_routing_scales(cfg: AdapterConfig) -> tuple[float, float]:
    """``(c_tok, c_sem)``: T-REX's coefficients of the router softmax and of the semantic vector.

    ``variant="reference"``: the release's constants ``(32, 4)`` whatever ``r1, r2``
    (``RoyZry98/T-REX-Pytorch``, ``peft/src/peft/tuners/lora.py``, ``Linear.forward``, ``rank1_flex``:
    ``token_coefficient = 32``, ``task_coefficient = 4``; the release trains ``r1 = 4, r2 = 8``).

    ``variant="paper"``: ``(r1 * r2, r1)``, a departure from the release (ept_jax's generalisation, not a formula
    of the released code; not checked against the paper's text). Reason: at the release's allocation 32 is the
    number of experts ``r1 r2`` (so the router term ``softmax * r1 r2`` has mean 1 per expert, as it does there)
    and 4 is ``r1``; scaling both with the allocation keeps that balance when ``r1, r2`` change, where the
    release's fixed constants would not. At ``r1 = 4, r2 = 8`` both variants compute the same thing.
    """
    if cfg.variant == "reference":
        return TREX_RELEASE_ROUTER_SCALE, TREX_RELEASE_SEMANTIC_SCALE
    return float(cfg.trex_r1 * cfg.trex_r2), float(cfg.trex_r1)


def _validate_trex(cfg: AdapterConfig, d_in: int, d_out: int) -> None:
    if cfg.variant not in VARIANTS:
        raise ValueError(
            f"variant={cfg.variant!r}: accepted values are {VARIANTS} (T-REX: 'reference' = the release, routing "
            f"coefficients {TREX_RELEASE_ROUTER_SCALE:g} and {TREX_RELEASE_SEMANTIC_SCALE:g}; 'paper' = r1 * r2 "
            "and r1)"
        )
    for name in ("trex_r1", "trex_r2"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r}: must be an integer >= 1 (the release uses trex_r1=4, trex_r2=8)")


TREX_NOT_MERGEABLE = (
    "T-REX routes every token (softmax(router(x)) mixes its rank-one experts per token), so no per-task weight "
    "delta exists to merge or factor; run it unmerged (the model itself, with eval.merge_adapters=False)"
)


@register_adapter("trex", _validate_trex)
class TREXAdapter(Adapter):
    """T-REX ``rank1_flex`` on one Linear (see the module docstring for the formula and the two variants).

    Parameters (:class:`~ept_jax.nn.AdapterParam`): ``A (r1, d_in)`` kaiming-uniform, ``B (d_out, r2)`` zero,
    ``router_w (r1 * r2, d_in)`` zero, ``w_omg ()`` and ``w_g ()`` zero.
    """

    mergeable = False

    def __init__(self, cfg: AdapterConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes=None):
        validate(cfg, d_in, d_out)
        self.cfg, self.d_in, self.d_out = cfg, d_in, d_out
        r1, r2 = cfg.trex_r1, cfg.trex_r2
        dtype = dtype_of(cfg.param_dtype)
        in_ax, out_ax = adapter_axes(axes)
        v = draw_params(rngs, {"A": ((r1, d_in), *ab_init_spec(cfg.init or "default", (r1, d_in), r1))}, dtype)
        self.A = param(v["A"], ("lora_rank", in_ax), AdapterParam)
        self.B = param(jnp.zeros((d_out, r2), dtype), (out_ax, "lora_rank"), AdapterParam)
        self.router_w = param(jnp.zeros((r1 * r2, d_in), dtype), ("experts", in_ax), AdapterParam)
        self.w_omg = param(jnp.zeros((), dtype), (), AdapterParam)
        self.w_g = param(jnp.zeros((), dtype), (), AdapterParam)

    def routing(self, x: Array, semantic: Array | None) -> Array:
        """Per-token expert weights ``R (B, ..., r1, r2)`` for ``x (B, ..., d_in)`` and ``semantic (B, r1 r2)``.

        ``R = softmax(router(x)) * omega * c_tok + s * (1 - omega) * c_sem`` with ``omega = sigmoid(100 w_omg)``
        and ``(c_tok, c_sem)`` = :func:`trex_routing_scales` (reference: the release's 32 and 4; paper:
        ``r1 r2`` and ``r1``); ``semantic`` None means zeros.
        """
        r1, r2 = self.cfg.trex_r1, self.cfg.trex_r2
        n = r1 * r2
        if semantic is None:
            semantic = jnp.zeros((x.shape[0], n), x.dtype)
        if semantic.shape != (x.shape[0], n):
            raise ValueError(
                f"ctx.semantic of shape {semantic.shape}: T-REX expects (batch, r1 * r2) = ({x.shape[0]}, {n}), "
                "or None for zeros"
            )
        omega = jax.nn.sigmoid(100.0 * self.w_omg[...].astype(x.dtype))
        probs = jax.nn.softmax(x @ self.router_w[...].astype(x.dtype).T, axis=-1)  # (B, ..., n)
        s = semantic.astype(x.dtype).reshape(semantic.shape[:1] + (1,) * (x.ndim - 2) + (n,))
        c_tok, c_sem = trex_routing_scales(self.cfg)
        mix = probs * omega * c_tok + s * (1.0 - omega) * c_sem
        return mix.reshape(mix.shape[:-1] + (r1, r2))

    def __call__(self, x: Array, ctx: AdapterContext) -> Array:
        """``x (B, ..., d_in)`` -> ``(B, ..., d_out)`` = ``sigmoid(100 w_g) * B R^T (A dropout(x))`` per token."""
        if x.ndim < 2 or x.shape[-1] != self.d_in:
            raise ValueError(f"adapter input of shape {x.shape}: expected (batch, ..., {self.d_in})")
        rr = self.routing(x, ctx.semantic)
        u = dropout(x, self.cfg.dropout, ctx, self.cfg.dropout_impl) @ self.A[...].astype(x.dtype).T  # (B, ..., r1)
        v = jnp.einsum("...i,...ij->...j", u, rr)  # (B, ..., r2)
        g = jax.nn.sigmoid(100.0 * self.w_g[...].astype(x.dtype))
        return g * (v @ self.B[...].astype(x.dtype).T)

    def merge(self, task: int | Array) -> Array:
        """Always raises: T-REX has no per-task delta (see :data:`TREX_NOT_MERGEABLE`)."""
        raise ValueError(TREX_NOT_MERGEABLE)

    def to_lora(self, task: int | Array) -> tuple[Array, Array]:
        """Always raises: T-REX has no per-task delta (see :data:`TREX_NOT_MERGEABLE`)."""
        raise ValueError(TREX_NOT_MERGEABLE)
