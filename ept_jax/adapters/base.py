"""The adapter contract: the :class:`Adapter` interface, the adapted Linear that wraps a frozen one, and the
checks and initialisers every adapter kind shares (public, so each kind's module uses them by name)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ept_jax.adapters.config import INITS, AdapterConfig, dtype_of, validate_common  # noqa: F401 (dtype_of: re-export)
from ept_jax.core.linear import Linear
from ept_jax.core.params import AdapterContext, AdapterParam, AuxLoss

Array = jax.Array


class Adapter(nnx.Module):
    """Interface every adapter (EPT variants and baselines) implements. PyTorch layout for deltas.

    Methods:
      ``__call__(x, ctx) -> delta_y``: the adapter's additive output ``(..., d_out)`` for input ``(..., d_in)``
        (already multiplied by its scale; dropout on ``x`` applied inside when ``ctx`` asks for it).
      ``merge(task) -> (d_out, d_in)``: the materialised, scaled weight delta for integer task ``task``.
      ``to_lora(task) -> (B, A)``: exact factors with ``B @ A == merge(task)``; ``B (d_out, R)``, ``A (R, d_in)``.
      ``contrastive_loss(x, task_ids) -> scalar`` or None when the adapter has none.
      ``mergeable``: False when the delta depends on the token (nothing per task to merge).
    """

    mergeable: bool = True
    #: the kind's own checks, ``check(cfg, d_in, d_out)`` raising ValueError (None: only the common ones)
    check: Any = None

    @classmethod
    def validate_config(cls, cfg: AdapterConfig, d_in: int, d_out: int) -> None:
        """Raises ValueError naming the bad value if ``cfg`` cannot adapt a ``d_in -> d_out`` Linear with this class:
        the common checks (:func:`~ept_jax.adapters.config.validate_common`), then the class's ``check``."""
        validate_common(cfg, d_in, d_out)
        if cls.check is not None:
            cls.check(cfg, d_in, d_out)

    def __call__(self, x: Array, ctx: AdapterContext) -> Array:  # pragma: no cover - interface
        raise NotImplementedError

    def merge(self, task: int | Array) -> Array:  # pragma: no cover - interface
        raise NotImplementedError

    def to_lora(self, task: int | Array) -> tuple[Array, Array]:  # pragma: no cover - interface
        raise NotImplementedError

    def contrastive_loss(self, x: Array, task_ids: Array) -> Array | None:
        return None

    def param_usage(self, task_ids: Array) -> dict[tuple, Array] | None:
        """Which of the adapter's parameters a forward with ``task_ids (B,)`` uses, where that depends on them.

        ``{path inside the adapter, e.g. ("kernels", 3): () bool}``; parameters not listed are always used;
        None = all. EPT with top-k routing lists its expert kernels: PyTorch gives the kernels of experts that
        no route chose no gradient, and the release's AdamW then does not step them (``train.optim``).
        """
        return None


class AdaptedLinear(nnx.Module):
    """A frozen base :class:`Linear` plus an :class:`Adapter`: ``y = base(x) + adapter(x)``.

    ``name`` is the Hugging Face module path (``encoder.block.0.layer.0.SelfAttention.q``), ``stack`` the
    stack it sits in (``encoder``, ``decoder``); ``contrastive`` says whether its contrastive loss counts
    (see ``AdapterConfig.contrastive_stacks``). ``index`` is a unique integer used to fold the dropout key.
    """

    def __init__(self, base: Linear, adapter: Adapter, *, name: str, stack: str, contrastive: bool, index: int):
        self.base = base
        self.adapter = adapter
        self.name = name
        self.stack = stack
        self.counts_contrastive = contrastive
        self.index = index

    def __call__(self, x: Array, ctx: AdapterContext | None = None) -> Array:
        y = self.base(x)
        if ctx is None or not ctx.active:
            return y
        if ctx.dropout_rng is not None:
            index = self.index if ctx.index_offset is None else self.index + ctx.index_offset
            ctx = ctx.replace(dropout_rng=jax.random.fold_in(ctx.dropout_rng, index), index_offset=None)
        delta = self.adapter(x, ctx)
        if self.counts_contrastive:
            loss = self.adapter.contrastive_loss(x, ctx.task_ids)
            if loss is not None:
                self.sow(AuxLoss, "contrastive", loss)
        return y + delta.astype(y.dtype)


def adapted_linears(model: nnx.Module) -> list[tuple[tuple, AdaptedLinear]]:
    """All ``(path, AdaptedLinear)`` pairs of ``model`` in a stable order."""
    return [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, AdaptedLinear)]


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


def select_rows(rows: Array, ids: Array) -> Array:
    """``rows[ids]`` (``rows (n, ...)``, ``ids (B,)`` int) as a product with the one-hot selection.

    Exact (every other term is a zero; ``rows`` finite), and its gradient is a product too: a gather's is a
    scatter, which XLA compiles as a loop, one in every adapted Linear of a training step.
    """
    onehot = jax.nn.one_hot(ids, rows.shape[0], dtype=rows.dtype)
    return (onehot @ rows.reshape(rows.shape[0], -1)).reshape(ids.shape + rows.shape[1:])
