"""The adapter configuration (:class:`AdapterConfig`, frozen and hashable) and the checks every kind shares."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from ept_jax.adapters.pyramid_fast import PAPER_DENSE_MAX_K
from ept_jax.core.dropout import DROPOUT_IMPLS

VARIANTS = ("reference", "paper")


INITS = (None, "default", "gaussian")


ZERO_INITS = (None, "kernels", "B")


KERNEL_INITS = (None, "constant")


FORWARD_PATHS = ("fast", "materialized", "conv")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """What adapter goes into each targeted Linear, and how it is built. Frozen and hashable.

    Attributes:
      kind: registry key: ``"ept"``, ``"lora"``, ``"moelora"``, ``"dcft"`` , ``"more"``,
        ``"moelora_release"``, ``"trex"`` ; see :func:`ept_jax.adapters.registry.registered_kinds`.
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
        (``jax.random.bernoulli``); see :mod:`ept_jax.core.dropout`.
      init: None = the variant's own init; ``"default"`` (PyTorch Linear init: kaiming-uniform a=sqrt(5)) or
        ``"gaussian"`` (``N(0, (1/r)^2)``, PEFT's "gaussian" convention) for ``A`` and ``B`` (ablation). LoRA and
        MoE-LoRA apply it to ``A`` (their ``B`` is always zero); kernels always follow the variant.
      alp: Adaptive LoRA Pruner on/off (ablation). On: experts slice one shared meta seed. Off: every expert owns
        independent factors of exactly its slice's size, ``A_e (r, d_in // k)`` and ``B_e (d_out // k, r)``; so
        "off" removes the *sharing* of the meta knowledge while keeping each expert's shape and rank.
      dim_scaling: the paper's dimension-aware ``d_t / T`` scaling of each expert's output (see
        :func:`ept_jax.adapters.pyramid.expert_scales` for the interpretation); the release does not implement it.
      contrastive_tau: temperature of the contrastive task-embedding loss.
      n_moe_experts: MoE-LoRA experts; each has rank ``r // n_moe_experts`` (MOELoRA splits one rank budget
        over its experts, so MoE-LoRA costs as many parameters as LoRA of rank ``r`` plus its router).
      param_dtype: dtype of the adapter parameters (``"float32"``, ``"bfloat16"``, ``"float64"`` ...).
      forward_path: EPT/DCFT: ``"fast"`` (never materialises a delta; training), ``"materialized"`` (per-task
        deltas, then ``x @ dW.T``) or ``"conv"`` (the ``lax.conv_transpose`` definition); for benchmarks.
      paper_dense_max_k: EPT paper variant, fast path: kernel sizes up to this one are computed in one dense
        product with Kronecker factors, larger ones group by group through a transposed view of the input
        (:func:`ept_jax.adapters.pyramid_fast.paper_forward`; the same values, a speed choice; 0 = none dense).
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
    paper_dense_max_k: int = PAPER_DENSE_MAX_K
    trex_r1: int = 4
    trex_r2: int = 8
    zero_init: str | None = None
    kernel_init: str | None = None

    @property
    def scale(self) -> float:
        """``alpha / r``."""
        return float(self.alpha) / self.r


def dtype_of(name: str):
    try:
        dt = jnp.dtype(name)
    except TypeError as err:
        raise ValueError(f"param_dtype={name!r} is not a dtype; use e.g. 'float32', 'bfloat16', 'float64'") from err
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"param_dtype={name!r} must be a floating dtype (float32, bfloat16, float64, ...)")
    return dt


def validate_common(cfg: AdapterConfig, d_in: int, d_out: int) -> None:
    """The checks every kind shares: raises ValueError naming the bad value (and what is accepted). The kind's
    own checks are its class's ``check`` (:meth:`ept_jax.adapters.base.Adapter.validate_config`)."""
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
