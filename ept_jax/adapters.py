"""Adapter modules (NNX) implementing :class:`ept_jax.nn.Adapter`: EPT here, the baselines in ``baselines.py``.

Everything is selected by one frozen, hashable :class:`AdapterConfig`; :func:`make_adapter` dispatches on
``cfg.kind`` through a registry (:func:`register_adapter`) so new kinds plug in without touching callers.
The EPT formulas themselves live in :mod:`ept_jax.pyramid`; this module owns parameters, their
initialisation, logical axis names, dropout and the choice of forward path.

Parameters are stored in the PyTorch layout the issue uses (``A (r, d_in // 2)``, ``B (d_out // 2, r)``,
reference kernels ``(d_out // k, k)``, paper kernels ``(k, k)``, gate ``(n_experts, d_in)`` + bias, task
embedding ``(n_task_rows, d_in)``), so the formulas read like the paper and the release's checkpoints import
with a reshape of the kernels only (:mod:`ept_jax.checkpoints.reference`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ept_jax import pyramid, pyramid_fast
from ept_jax.dropout import DROPOUT_IMPLS, dropout
from ept_jax.nn import Adapter, AdapterContext, AdapterParam, param

Array = jax.Array

VARIANTS = ("reference", "paper")
INITS = (None, "default", "gaussian")
ZERO_INITS = (None, "kernels", "B")
KERNEL_INITS = (None, "constant")
FORWARD_PATHS = ("fast", "materialized", "conv")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """What adapter goes into each targeted Linear, and how it is built. Frozen and hashable.

    Attributes:
      kind: registry key: ``"ept"``, ``"lora"``, ``"moelora"``, ``"dcft"`` (``baselines.py``), ``"more"``,
        ``"moelora_release"``, ``"trex"`` (``competitors.py``); see :func:`registered_kinds`.
      variant: EPT/DCFT: ``"reference"`` (what the released code computes; PyTorch default init, the adapter is
        not zero at step 0) or ``"paper"`` (Kronecker expansion, Gaussian ``A``/``B``, zero kernels).
      r: rank of the meta seed (EPT/DCFT), of LoRA, or the total rank shared by MoE-LoRA experts.
      alpha: the adapter output is scaled by ``alpha / r``.
      expert_kernel_sizes: one kernel size per EPT expert. Homogeneous EPT (the paper's EPT-2/4/6/8 ablation)
        is ``(k,) * 8``. DCFT uses the single entry when there is exactly one, else its paper's kernel 2.
      top_k: experts mixed per task; None = dense softmax mixture of all experts (ablation).
      n_tasks: tasks the model is trained on (``merge``/``to_lora`` accept ``0 <= task < n_tasks``).
      n_task_rows: rows of each Linear's task embedding (the release: always 8); ``n_tasks <= n_task_rows``.
      dropout: dropout rate on the adapter's input in training (the release: 0.1).
      dropout_impl: the mask generator, ``"hash"`` (fast counter-based hash) or ``"threefry"``
        (``jax.random.bernoulli``); see :mod:`ept_jax.dropout`.
      init: None = the variant's own init; ``"default"`` (PyTorch Linear init: kaiming-uniform a=sqrt(5)) or
        ``"gaussian"`` (``N(0, (1/r)^2)``, PEFT's "gaussian" convention) for ``A`` and ``B`` (ablation). LoRA and
        MoE-LoRA apply it to ``A`` (their ``B`` is always zero); kernels always follow the variant.
      alp: Adaptive LoRA Pruner on/off (ablation). On: experts slice one shared meta seed. Off: every expert owns
        independent factors of exactly its slice's size, ``A_e (r, d_in // k)`` and ``B_e (d_out // k, r)``; so
        "off" removes the *sharing* of the meta knowledge while keeping each expert's shape and rank.
      dim_scaling: the paper's dimension-aware ``d_t / T`` scaling of each expert's output (see
        :func:`ept_jax.pyramid.expert_scales` for the interpretation); the release does not implement it.
      contrastive_tau: temperature of the contrastive task-embedding loss.
      n_moe_experts: MoE-LoRA experts; each has rank ``r // n_moe_experts`` (MOELoRA splits one rank budget
        over its experts, so MoE-LoRA costs as many parameters as LoRA of rank ``r`` plus its router).
      param_dtype: dtype of the adapter parameters (``"float32"``, ``"bfloat16"``, ``"float64"`` ...).
      forward_path: EPT/DCFT: ``"fast"`` (never materialises a delta; training), ``"materialized"`` (per-task
        deltas, then ``x @ dW.T``) or ``"conv"`` (the ``lax.conv_transpose`` definition); for benchmarks.
      paper_dense_max_k: EPT paper variant, fast path: kernel sizes up to this one are computed in one dense
        product with Kronecker factors, larger ones group by group through a transposed view of the input
        (:func:`ept_jax.pyramid_fast.paper_forward`; the same values, a speed choice; 0 = none dense).
      zero_init: EPT: ``"kernels"`` (every expert kernel zero) or ``"B"`` (the meta seed's ``B`` zero) makes the
        adapter exactly zero at step 0 whatever the variant's init (ablation; None = the variant's init).
      kernel_init: EPT: ``"constant"`` starts every kernel at 1 (an expert is then the expansion of the meta seed
        by repetition, an order-one factor; ablation of the release's small kaiming-uniform kernels).
      trex_r1, trex_r2: T-REX (``kind="trex"``): the number of down vectors ``a_i`` (rows of ``A (r1, d_in)``)
        and of up vectors ``b_j`` (columns of ``B (d_out, r2)``); ``r1 * r2`` rank-one experts (the release's
        ``--rank1_flex_rank_allocation 4 8``). Unused by the other kinds.
    """

    kind: str = "ept"
    variant: str = "reference"
    r: int = 8
    alpha: float = 32.0
    expert_kernel_sizes: tuple[int, ...] = (2, 2, 4, 4, 6, 6, 8, 8)
    top_k: int | None = 2
    n_tasks: int = 8
    n_task_rows: int = 8
    dropout: float = 0.1
    dropout_impl: str = "hash"
    init: str | None = None
    alp: bool = True
    dim_scaling: bool = False
    contrastive_tau: float = 0.05
    n_moe_experts: int = 8
    param_dtype: str = "float32"
    forward_path: str = "fast"
    paper_dense_max_k: int = pyramid_fast.PAPER_DENSE_MAX_K
    trex_r1: int = 4
    trex_r2: int = 8
    zero_init: str | None = None
    kernel_init: str | None = None

    @property
    def scale(self) -> float:
        """``alpha / r``."""
        return float(self.alpha) / self.r


# ----------------------------------------------------------------------------------------------------------
# Registry and validation.
# ----------------------------------------------------------------------------------------------------------

AdapterFactory = Callable[..., Adapter]
_REGISTRY: dict[str, tuple[AdapterFactory, Callable[[AdapterConfig, int, int], None] | None]] = {}


def register_adapter(kind: str, validator: Callable[[AdapterConfig, int, int], None] | None = None):
    """Class decorator: registers an adapter class (``cls(cfg, d_in, d_out, *, rngs, axes)``) under ``kind``.

    ``validator(cfg, d_in, d_out)`` runs after the common checks of :func:`validate` and raises ValueError.
    """

    def wrap(cls):
        if kind in _REGISTRY and _REGISTRY[kind][0] is not cls:
            raise ValueError(f"adapter kind {kind!r} is already registered to {_REGISTRY[kind][0].__name__}")
        _REGISTRY[kind] = (cls, validator)
        return cls

    return wrap


def _load_builtin_kinds() -> None:
    # baselines.py and competitors.py import this module, so they are imported lazily to register their kinds.
    from ept_jax import baselines, competitors  # noqa: F401


def registered_kinds() -> tuple[str, ...]:
    """All adapter kinds :func:`make_adapter` accepts."""
    _load_builtin_kinds()
    return tuple(sorted(_REGISTRY))


def dtype_of(name: str):
    try:
        dt = jnp.dtype(name)
    except TypeError as err:
        raise ValueError(f"param_dtype={name!r} is not a dtype; use e.g. 'float32', 'bfloat16', 'float64'") from err
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"param_dtype={name!r} must be a floating dtype (float32, bfloat16, float64, ...)")
    return dt


def validate(cfg: AdapterConfig, d_in: int, d_out: int) -> None:
    """Raises ValueError naming the bad value (and what is accepted) if ``cfg`` cannot adapt ``d_in -> d_out``."""
    kinds = registered_kinds()
    if cfg.kind not in kinds:
        raise ValueError(f"adapter kind={cfg.kind!r} is unknown; accepted: {kinds}")
    if not (isinstance(d_in, int) and isinstance(d_out, int)) or d_in < 1 or d_out < 1:
        raise ValueError(f"Linear dimensions d_in={d_in!r}, d_out={d_out!r} must be positive integers")
    if not isinstance(cfg.r, int) or cfg.r < 1:
        raise ValueError(f"r={cfg.r!r}: the rank must be an integer >= 1")
    if not (isinstance(cfg.alpha, (int, float)) and math.isfinite(cfg.alpha) and cfg.alpha > 0):
        raise ValueError(f"alpha={cfg.alpha!r}: must be a finite number > 0")
    if not (isinstance(cfg.dropout, (int, float)) and 0.0 <= cfg.dropout < 1.0):
        raise ValueError(f"dropout={cfg.dropout!r}: accepted 0 <= dropout < 1")
    if cfg.dropout_impl not in DROPOUT_IMPLS:
        raise ValueError(f"dropout_impl={cfg.dropout_impl!r}: accepted values are {DROPOUT_IMPLS}")
    if cfg.init not in INITS:
        raise ValueError(f"init={cfg.init!r}: accepted values are {INITS}")
    if cfg.zero_init not in ZERO_INITS:
        raise ValueError(f"zero_init={cfg.zero_init!r}: accepted values are {ZERO_INITS}")
    if cfg.kernel_init not in KERNEL_INITS:
        raise ValueError(f"kernel_init={cfg.kernel_init!r}: accepted values are {KERNEL_INITS}")
    if not isinstance(cfg.n_tasks, int) or cfg.n_tasks < 1:
        raise ValueError(f"n_tasks={cfg.n_tasks!r}: must be an integer >= 1")
    if not isinstance(cfg.n_task_rows, int) or cfg.n_task_rows < 1:
        raise ValueError(f"n_task_rows={cfg.n_task_rows!r}: must be an integer >= 1")
    if cfg.n_tasks > cfg.n_task_rows:
        raise ValueError(
            f"n_tasks={cfg.n_tasks} > n_task_rows={cfg.n_task_rows!r}: each task needs its own task-embedding row "
            "(the release has 8 rows; raise n_task_rows for more tasks)"
        )
    if cfg.forward_path not in FORWARD_PATHS:
        raise ValueError(f"forward_path={cfg.forward_path!r}: accepted values are {FORWARD_PATHS}")
    dense_k = cfg.paper_dense_max_k
    if isinstance(dense_k, bool) or not isinstance(dense_k, int) or dense_k < 0:
        raise ValueError(f"paper_dense_max_k={dense_k!r}: must be an integer >= 0")
    dtype_of(cfg.param_dtype)
    validator = _REGISTRY[cfg.kind][1]
    if validator is not None:
        validator(cfg, d_in, d_out)


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


# ----------------------------------------------------------------------------------------------------------
# Initialisers (PyTorch conventions, PyTorch layout).
# ----------------------------------------------------------------------------------------------------------


def shape_bound(shape: tuple[int, ...]) -> float:
    """PyTorch's default bound ``1 / sqrt(fan_in)`` for a tensor whose fan_in is its whole size."""
    return 1.0 / math.sqrt(int(np.prod(shape)))


def draw_params(
    rngs: nnx.Rngs, specs: dict[str, tuple[tuple[int, ...], str, float]], dtype
) -> dict[str, Array]:
    """Draws every parameter of a module: ``{name: (shape, dist, scale)}`` -> ``{name: array}``.

    ``dist`` is ``"uniform"`` (``U(-scale, scale)``), ``"normal"`` (``N(0, scale^2)``), ``"zeros"`` or
    ``"constant"`` (every entry ``scale``). All
    uniforms come from one ``jax.random`` call and all normals from another, sliced and scaled: each random
    call compiles per shape, and one call per module instead of one per tensor makes building models of
    many adapted Linears (eagerly or under jit) several times faster.
    """
    out: dict[str, Array] = {}
    for dist, sampler in (("uniform", lambda k, n: jax.random.uniform(k, (n,), dtype, -1.0, 1.0)),
                          ("normal", lambda k, n: jax.random.normal(k, (n,), dtype))):
        names = [name for name, (_, d, _) in specs.items() if d == dist]
        if not names:
            continue
        sizes = [int(np.prod(specs[name][0])) for name in names]
        flat = sampler(rngs.params(), sum(sizes))
        offsets = np.cumsum([0, *sizes])
        for name, lo, hi in zip(names, offsets[:-1], offsets[1:], strict=True):
            shape, _, scale = specs[name]
            out[name] = (flat[lo:hi] * jnp.asarray(scale, dtype)).reshape(shape)
    for name, (shape, dist, scale) in specs.items():
        if dist == "zeros":
            out[name] = jnp.zeros(shape, dtype)
        elif dist == "constant":
            out[name] = jnp.full(shape, scale, dtype)
        elif dist not in ("uniform", "normal"):
            raise ValueError(f"{name}: unknown init distribution {dist!r}; accepted 'uniform', 'normal', 'zeros', "
                             "'constant'")
    return out


def ab_init_spec(kind: str, shape: tuple[int, ...], r: int) -> tuple[str, float]:
    """``(dist, scale)`` of an ``A``/``B`` init for :func:`draw_params`.

    ``"default"``: PyTorch's Linear init ``kaiming_uniform_(a=sqrt(5))`` = ``U(+-1/sqrt(fan_in))`` with
    ``fan_in = shape[-1]`` (PyTorch layout); ``"gaussian"``: ``N(0, (1/r)^2)`` (PEFT's "gaussian").
    """
    if kind == "gaussian":
        return "normal", 1.0 / r
    if kind != "default":
        raise ValueError(f"init={kind!r}: accepted values are {INITS}")
    return "uniform", 1.0 / math.sqrt(shape[-1])


def adapter_axes(axes: tuple[str | None, str | None] | None) -> tuple[str | None, str | None]:
    """The base kernel's ``(input, output)`` logical axis names, or replicated when unknown."""
    if axes is None:
        return None, None
    if len(axes) != 2:
        raise ValueError(f"axes={axes!r}: expected the base kernel's (input, output) logical axis names")
    return axes[0], axes[1]


def check_task(task, n_tasks: int) -> None:
    """Range-checks a concrete task id (traced ids are left to the caller)."""
    if isinstance(task, (int, np.integer)) and not 0 <= int(task) < n_tasks:
        raise ValueError(f"task={task}: accepted 0 <= task < n_tasks={n_tasks}")


def check_input(x: Array, d_in: int, task_ids: Array | None) -> None:
    if x.ndim < 2 or x.shape[-1] != d_in:
        raise ValueError(f"adapter input of shape {x.shape}: expected (batch, ..., {d_in})")
    if task_ids is None:
        raise ValueError("the adapter needs ctx.task_ids (batch,) to route; got None")
    if task_ids.shape != x.shape[:1]:
        raise ValueError(f"task_ids of shape {task_ids.shape} do not match the batch of x {x.shape}")


def count_params(module: nnx.Module) -> int:
    """Number of trainable (``AdapterParam``) scalars in ``module``."""
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(module, AdapterParam)))


# ----------------------------------------------------------------------------------------------------------
# EPT.
# ----------------------------------------------------------------------------------------------------------


@register_adapter("ept", validate_ept)
class EPTAdapter(Adapter):
    """Expert Pyramid Tuning on one Linear ``d_in -> d_out`` (both variants; see :mod:`ept_jax.pyramid`).

    Parameters (all :class:`~ept_jax.nn.AdapterParam`, PyTorch layout):
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
        validate(cfg, d_in, d_out)
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
                self.pyramid, x, A, B, kernels, rows[task_ids], experts, self.cfg.paper_dense_max_k
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


def make_adapter(
    cfg: AdapterConfig,
    d_in: int,
    d_out: int,
    *,
    rngs: nnx.Rngs,
    axes: tuple[str | None, str | None] | None = None,
    shared: nnx.Module | None = None,
) -> Adapter:
    """Builds the adapter ``cfg.kind`` for a ``d_in -> d_out`` Linear.

    Args:
      axes: the base kernel's ``(input, output)`` logical axis names; ``A``'s input dimension and ``B``'s output
        dimension take them (None: replicated).
      shared: the model-wide module of kinds that share state across Linears (:func:`make_shared`); None for
        the others.
    Raises:
      ValueError: an unknown kind or a configuration that cannot adapt this Linear (see :func:`validate`).
    """
    validate(cfg, d_in, d_out)
    cls = _REGISTRY[cfg.kind][0]
    if shared is not None:
        return cls(cfg, d_in, d_out, rngs=rngs, axes=axes, shared=shared)
    return cls(cfg, d_in, d_out, rngs=rngs, axes=axes)


def make_shared(cfg: AdapterConfig, *, rngs: nnx.Rngs) -> nnx.Module | None:
    """The module that every adapter of kind ``cfg.kind`` in one model shares, or None for kinds without one.

    A kind declares it with a ``build_shared(cfg, *, rngs)`` classmethod (MOELoRA's release: one task
    embedding and one gate for the whole model). ``ept_jax.nn.Injector`` calls this once per model and hands
    the result to every :func:`make_adapter` call.
    """
    _load_builtin_kinds()
    if cfg.kind not in _REGISTRY:
        return None  # make_adapter reports the unknown kind
    build = getattr(_REGISTRY[cfg.kind][0], "build_shared", None)
    return build(cfg, rngs=rngs) if build is not None else None
