"""EPT on one Linear (both variants): parameters, initialisation, logical axes, dropout and the forward path.

The formulas live in :mod:`ept_jax.adapters.pyramid` (definitions) and :mod:`ept_jax.adapters.pyramid_fast`
(the training paths). Parameters are stored in the PyTorch layout the issue uses (``A (r, d_in // 2)``,
``B (d_out // 2, r)``, reference kernels ``(d_out // k, k)``, paper kernels ``(k, k)``, gate
``(n_experts, d_in)`` + bias, task embedding ``(n_task_rows, d_in)``), so the formulas read like the paper and
the release's checkpoints import with a reshape of the kernels only (:mod:`ept_jax.checkpoints.reference`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ept_jax.adapters import pyramid, pyramid_fast
from ept_jax.adapters.base import (
    Adapter,
    ab_init_spec,
    adapter_axes,
    check_input,
    check_task,
    draw_params,
    dtype_of,
    select_rows,
    shape_bound,
)
from ept_jax.adapters.config import (
    FORWARD_PATHS,
    VARIANTS,
    AdapterConfig,
)
from ept_jax.core.dropout import dropout
from ept_jax.core.params import AdapterContext, AdapterParam, param

Array = jax.Array


def validate_ept(cfg: AdapterConfig, d_in: int, d_out: int) -> None:
    if cfg.variant not in VARIANTS:
        raise ValueError(f"variant={cfg.variant!r}: accepted values are {VARIANTS}")
    ks = cfg.expert_kernel_sizes
    if not isinstance(ks, tuple) or not ks or not all(isinstance(k, int) for k in ks):
        raise ValueError(
            f"expert_kernel_sizes={ks!r}: must be a non-empty tuple of ints (a tuple keeps the config hashable)"
        )
    if cfg.variant == "reference":
        bad = [k for k in ks if k < 2]
        if bad:
            raise ValueError(
                f"expert_kernel_sizes={ks}: kernel size(s) {bad} < 2; the reference variant slices a meta seed of "
                "d_in // 2 columns, so every kernel size must be >= 2"
            )
        too_big = [k for k in ks if k > min(d_in, d_out)]
        if too_big:
            raise ValueError(
                f"expert_kernel_sizes={ks}: kernel size(s) {too_big} exceed min(d_in, d_out)={min(d_in, d_out)} "
                f"of the {d_in}->{d_out} Linear (the expert would read an empty slice)"
            )
    else:
        bad = [k for k in ks if k < 1 or d_in % k or d_out % k]
        if bad:
            raise ValueError(
                f"expert_kernel_sizes={ks}: kernel size(s) {bad} do not divide d_in={d_in} and d_out={d_out}; the "
                "paper variant (Kronecker expansion) needs k >= 1 with k | d_in and k | d_out"
            )
    if cfg.kind == "ept":
        if cfg.top_k is not None and not (isinstance(cfg.top_k, int) and 1 <= cfg.top_k <= len(ks)):
            raise ValueError(f"top_k={cfg.top_k!r}: accepted 1..{len(ks)} (the number of experts) or None")
        if not cfg.contrastive_tau > 0:
            raise ValueError(f"contrastive_tau={cfg.contrastive_tau!r}: must be > 0")


class EPTAdapter(Adapter):
    """Expert Pyramid Tuning on one Linear ``d_in -> d_out`` (both variants; see :mod:`ept_jax.adapters.pyramid`).

    Parameters (all :class:`~ept_jax.core.params.AdapterParam`, PyTorch layout):
      ``A (r, seed_in)``, ``B (seed_out, r)``: the meta seed (ALP off: ``nnx.List`` of per-expert factors);
      ``kernels``: ``nnx.List`` of ``(d_out // k, k)`` (reference) or ``(k, k)`` (paper) per expert;
      ``gate_w (n_experts, d_in)``, ``gate_b (n_experts,)``, ``task_embedding (n_task_rows, d_in)``: the router
      (absent when ``routed`` is False, as in DCFT: one expert with weight 1).

    Init (``variant="reference"``, as the release): ``A``, ``B`` and every kernel PyTorch's default Linear init
    (kernels with ``fan_in = h * k`` of the release's ``(1, h, k, 1)`` tensor), so the adapter is *not* zero at
    step 0; gate weight kaiming-uniform (fan_in, relu), gate bias PyTorch's Linear bias init, task embedding
    ``N(0, 0.01^2)``. ``variant="paper"``: ``A``, ``B`` Gaussian, kernels zero (no change at step 0).

    The contrastive loss uses the Linear's input *before* dropout. The EPT release is a fork of MoRE's PEFT LoRA
    layer (``NLPfreshman0/MoRE``, ``peft/tuners/lora/layer.py``), whose forward applies dropout inline in the
    adapter branch (``dropout(x) @ lora_A.t()``) and computes the similarity from the untouched
    ``F.normalize(x[:, 0, :])`` against ``F.normalize(lora_task_embedding.weight)`` with temperature 0.05.
    """

    check = staticmethod(validate_ept)

    def __init__(
        self,
        cfg: AdapterConfig,
        d_in: int,
        d_out: int,
        *,
        rngs: nnx.Rngs,
        axes: tuple[str | None, str | None] | None = None,
        expansion: str | None = None,
        kernel_sizes: tuple[int, ...] | None = None,
        routed: bool = True,
    ):
        self.validate_config(cfg, d_in, d_out)
        self.cfg = cfg
        self.d_in, self.d_out = d_in, d_out
        self.routed = routed
        ks = tuple(kernel_sizes if kernel_sizes is not None else cfg.expert_kernel_sizes)
        self.pyramid = pyramid.Pyramid(expansion or cfg.variant, d_in, d_out, ks, alp=cfg.alp)
        self.expert_scales = pyramid.expert_scales(self.pyramid) if cfg.dim_scaling else (1.0,) * len(ks)
        dtype = dtype_of(cfg.param_dtype)
        in_ax, out_ax = adapter_axes(axes)
        ab_init = cfg.init or ("default" if cfg.variant == "reference" else "gaussian")
        r, n = cfg.r, len(ks)

        def ab_spec(shape):
            return ab_init_spec(ab_init, shape, r)

        seeds = [self.pyramid.seed_shape] if cfg.alp else [(d_in // k, d_out // k) for k in ks]
        specs: dict[str, tuple[tuple[int, ...], str, float]] = {}
        for i, (seed_in, seed_out) in enumerate(seeds):
            specs[f"A{i}"] = ((r, seed_in), *ab_spec((r, seed_in)))
            specs[f"B{i}"] = ((seed_out, r), *ab_spec((seed_out, r)))
        for e in range(n):
            shape = self.pyramid.kernel_shape(e)
            # reference: the release's tensor is (1, h, k, 1) (a DCFT kernel: (1, 1, k, k)), so PyTorch's
            # fan_in is prod(shape); paper: zero, so the adapter adds nothing at step 0.
            specs[f"K{e}"] = (shape, "zeros", 0.0) if cfg.variant == "paper" else (shape, "uniform", shape_bound(shape))
            if cfg.kernel_init == "constant":
                specs[f"K{e}"] = (shape, "constant", 1.0)
            if cfg.zero_init == "kernels":
                specs[f"K{e}"] = (shape, "zeros", 0.0)
        if cfg.zero_init == "B":
            for i, (_, seed_out) in enumerate(seeds):
                specs[f"B{i}"] = ((seed_out, r), "zeros", 0.0)
        if routed:
            specs["gate_w"] = ((n, d_in), "uniform", math.sqrt(6.0 / d_in))  # kaiming-uniform, fan_in, relu
            specs["gate_b"] = ((n,), "uniform", 1.0 / math.sqrt(d_in))  # PyTorch's Linear bias init
            specs["task_embedding"] = ((cfg.n_task_rows, d_in), "normal", 0.01)
        v = draw_params(rngs, specs, dtype)

        def ap(name, axes_):
            return param(v[name], axes_, AdapterParam)

        if cfg.alp:
            self.A, self.B = ap("A0", ("lora_rank", in_ax)), ap("B0", (out_ax, "lora_rank"))
        else:
            self.A = nnx.List([ap(f"A{i}", ("lora_rank", in_ax)) for i in range(n)])
            self.B = nnx.List([ap(f"B{i}", (out_ax, "lora_rank")) for i in range(n)])
        self.kernels = nnx.List([ap(f"K{e}", (None, "kernel")) for e in range(n)])
        if routed:
            self.gate_w = ap("gate_w", ("experts", in_ax))
            self.gate_b = ap("gate_b", ("experts",))
            self.task_embedding = ap("task_embedding", ("tasks", in_ax))
        else:
            self.gate_w = self.gate_b = self.task_embedding = None

    # -- parameters as plain arrays -------------------------------------------------------------------------

    def _factors(self, dtype=None):
        cast = (lambda a: a.astype(dtype)) if dtype is not None else (lambda a: a)
        if self.cfg.alp:
            A, B = cast(self.A[...]), cast(self.B[...])
        else:
            A, B = [cast(a[...]) for a in self.A], [cast(b[...]) for b in self.B]
        return A, B, [cast(k[...]) for k in self.kernels]

    def routing(self) -> tuple[Array, Array]:
        """``(weights (n_task_rows, n_experts), idx (n_task_rows, top_k))``: the router's choice for every row."""
        if not self.routed:
            n = self.pyramid.n_experts
            return jnp.ones((1, n), self.kernels[0][...].dtype) / n, jnp.arange(n)[None]
        return pyramid.route(self.gate_w[...], self.gate_b[...], self.task_embedding[...], self.cfg.top_k)

    def row_weights(self) -> Array:
        """``(n_rows, n_experts)`` mixing weights with ``alpha / r`` and the expert scales folded in."""
        return self._scaled(self.routing()[0])

    def _scaled(self, w: Array) -> Array:
        return w * jnp.asarray(self.expert_scales, w.dtype) * self.cfg.scale

    def _task_rows(self, task_ids: Array) -> Array:
        return jnp.zeros_like(task_ids) if not self.routed else task_ids

    # -- Adapter interface ----------------------------------------------------------------------------------

    def __call__(self, x: Array, ctx: AdapterContext) -> Array:
        """The scaled adapter output: ``x (B, ..., d_in)`` -> ``(B, ..., d_out)``, routed by ``ctx.task_ids``.

        Uses ``cfg.forward_path``; see :meth:`apply`.
        """
        return self.apply(x, ctx, self.cfg.forward_path)

    def apply(self, x: Array, ctx: AdapterContext, path: str = "fast") -> Array:
        """The adapter output through a chosen path (all exact to rounding; for tests and benchmarks).

        Args:
          x: ``(B, ..., d_in)`` batch first; ``ctx.task_ids`` ``(B,)`` picks each example's task row.
          path: ``"fast"`` (never materialises a delta), ``"materialized"`` (per-task deltas, then
            ``x @ dW.T``) or ``"conv"`` (every expert's delta by its ``lax.conv_transpose`` definition).
        Returns:
          ``(B, ..., d_out)`` in ``x``'s dtype.
        """
        if path not in FORWARD_PATHS:
            raise ValueError(f"path={path!r}: accepted values are {FORWARD_PATHS}")
        check_input(x, self.d_in, ctx.task_ids)
        x = dropout(x, self.cfg.dropout, ctx, self.cfg.dropout_impl)
        A, B, kernels = self._factors(x.dtype)
        w, idx = self.routing()
        rows = self._scaled(w).astype(x.dtype)
        task_ids = self._task_rows(ctx.task_ids)
        if path == "fast":
            # top-k routing: only each example's routed experts are computed (exact: the rest weigh zero)
            experts = idx[task_ids] if self.routed and self.cfg.top_k is not None else None
            return pyramid_fast.forward_fast(
                self.pyramid, x, A, B, kernels, select_rows(rows, task_ids), experts, self.cfg.paper_dense_max_k
            )
        fn = pyramid.forward_materialized if path == "materialized" else pyramid.forward_conv
        return fn(self.pyramid, x, A, B, kernels, rows, task_ids)

    def merge(self, task: int | Array) -> Array:
        """Task ``task``'s scaled delta ``(d_out, d_in)`` (PyTorch layout) for zero-latency inference."""
        check_task(task, self.cfg.n_tasks)
        A, B, kernels = self._factors()
        row = 0 if not self.routed else task
        return _mixture_delta(self.pyramid, A, B, kernels, self.row_weights()[row])

    def to_lora(self, task: int | Array) -> tuple[Array, Array]:
        """Exact factors ``(B' (d_out, R), A' (R, d_in))`` of ``merge(task)``.

        ``R = r * top_k`` (reference; ``r * n_experts`` without top-k), ``r * sum(k_e)`` over the routed experts
        (paper). The paper variant needs a concrete ``task``.
        """
        check_task(task, self.cfg.n_tasks)
        A, B, kernels = self._factors()
        _, idx = self.routing()
        row = 0 if not self.routed else task
        w = self.row_weights()[row]
        if self.pyramid.expansion == "reference":
            return _lora_factors(self.pyramid, A, B, kernels, w, idx[row])
        try:
            experts = tuple(int(e) for e in np.asarray(idx[row]))
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError) as err:
            raise ValueError(
                "to_lora of the paper variant needs a concrete task id and parameters (its rank depends on the "
                "routed experts); call it outside jit"
            ) from err
        return _lora_factors_static_experts(self.pyramid, A, B, kernels, w, experts)

    def param_usage(self, task_ids: Array) -> dict[tuple, Array] | None:
        """With top-k routing: expert ``e``'s kernel (and, ALP off, its own ``A``/``B``) is used exactly when
        some row of ``task_ids (B,)`` routes to ``e``; None (all used) when not routed or dense."""
        if not self.routed or self.cfg.top_k is None:
            return None
        n = self.pyramid.n_experts
        _, idx = self.routing()
        used = jnp.any(jax.nn.one_hot(idx[task_ids], n, dtype=jnp.int32) > 0, axis=(0, 1))  # (n_experts,)
        out: dict[tuple, Array] = {("kernels", e): used[e] for e in range(n)}
        if not self.cfg.alp:
            out.update({(name, e): used[e] for name in ("A", "B") for e in range(n)})
        return out

    def route(self, task: int | Array) -> tuple[Array, Array]:
        """``(experts (top_k,), weights (top_k,))`` task ``task``'s router chooses, best first (dense routing:
        every expert, in index order)."""
        w, idx = self.routing()
        row = 0 if not self.routed else task
        return idx[row], w[row][idx[row]]

    def contrastive_loss(self, x: Array, task_ids: Array) -> Array | None:
        """Contrastive task-embedding loss on ``x[:, 0, :]`` (``x (B, S, d_in)``); None when not routed."""
        if not self.routed:
            return None
        if x.ndim != 3 or x.shape[-1] != self.d_in:
            raise ValueError(f"contrastive loss input of shape {x.shape}: expected (batch, seq, {self.d_in})")
        dt = jnp.promote_types(x.dtype, jnp.float32)
        return pyramid.contrastive_loss(
            x[:, 0, :].astype(dt), self.task_embedding[...].astype(dt), task_ids, self.cfg.contrastive_tau
        )


# merge / to_lora are called eagerly (export, inspection): one compiled function per pyramid, not one
# compilation per small op.
_mixture_delta = jax.jit(pyramid.mixture_delta, static_argnums=0)


_lora_factors = jax.jit(pyramid.lora_factors, static_argnums=0)


_lora_factors_static_experts = jax.jit(pyramid.lora_factors, static_argnums=(0, 5))
