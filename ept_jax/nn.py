"""Shared building blocks: parameter kinds, the adapter context, the frozen base Linear and the adapted Linear.

This module is the contract between the adapter core (``pyramid.py`` / ``adapters.py``) and the models
(``models/t5.py``, ``models/llama.py``):

* Frozen base weights are :class:`flax.nnx.Param`; trainable adapter weights are :class:`AdapterParam`
  (a subclass). :data:`TRAINABLE` is the one filter that decides what trains, what gets optimizer state and
  what is written into adapter checkpoints.
* Every parameter carries logical axis names (t5x style, see ``sharding.py``) as its ``out_sharding``
  metadata (flax 0.12's name; read it with :func:`logical_axes`).
* A model is called with an :class:`AdapterContext` that carries per-example task ids, the dropout key and
  whether the call is deterministic; every adapted Linear receives it.
* Adapter losses (EPT's contrastive loss) are sown as :class:`AuxLoss` intermediates; the trainer pops them
  with :func:`pop_aux_losses`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

Array = jax.Array


class AdapterParam(nnx.Param):
    """A trainable adapter parameter (A, B, expert kernels, gate, task embedding, ...)."""


class AuxLoss(nnx.Intermediate):
    """An auxiliary loss term sown by an adapted Linear (e.g. EPT's contrastive loss, already a scalar)."""


# The one source of truth for "what trains".
TRAINABLE = AdapterParam


def param(value: Array, axes: Sequence[str | None], kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
    """Wraps ``value`` as a variable of ``kind`` carrying logical axis names ``axes`` (one per dimension)."""
    axes = tuple(axes)
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match a value of shape {value.shape}")
    # eager_sharding=False: shardings are applied by the trainer from the rules table (sharding.py), not
    # at construction, so a model can be built (or eval_shape-d) without a mesh.
    return kind(value, out_sharding=axes, eager_sharding=False)


def logical_axes(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a variable was created with, or None."""
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    return meta.get("out_sharding", meta.get("sharding_names"))


@struct.dataclass
class AdapterContext:
    """What every adapted Linear needs to know about the current call.

    Attributes:
      task_ids: ``(batch,)`` int32 task index of each example, or None (adapters off for the call: the
        base model alone, e.g. to compute base logits).
      dropout_rng: a PRNG key for adapter dropout, or None for no dropout.
      semantic: ``(batch, n)`` per-example semantic vector for adapters that read one (T-REX's
        ``centroids @ emb(sample)``, ``n = r1 * r2``), or None (such adapters then use zeros).
      index_offset: added to an adapted Linear's ``index`` when it folds the dropout key (None: 0); set by
        :func:`ept_jax.layer_scan.run_layers`, where one traced layer stands for every layer.
      deterministic: static; True disables dropout.
      adapters_enabled: static; False makes every adapted Linear behave as its base Linear.
    """

    task_ids: Array | None = None
    dropout_rng: Array | None = None
    semantic: Array | None = None
    index_offset: Array | None = None
    deterministic: bool = struct.field(pytree_node=False, default=True)
    adapters_enabled: bool = struct.field(pytree_node=False, default=True)

    @property
    def active(self) -> bool:
        return self.adapters_enabled and self.task_ids is not None


def default_kernel_init(key: Array, d_in: int, d_out: int, dtype) -> Array:
    """PyTorch ``nn.Linear`` default init (kaiming-uniform a=sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in))), (d_in, d_out)."""
    bound = 1.0 / (d_in**0.5)
    return jax.random.uniform(key, (d_in, d_out), dtype, -bound, bound)


class KeyStream:
    """A stand-in for ``nnx.Rngs`` when building models: ``params()`` returns ``fold_in(key, n)`` for n = 0, 1, ...

    ``nnx.Rngs`` counts its draws in a Variable; under a trace (``nnx.eval_shape``, jit) every draw writes that
    Variable, and flax 0.12 then asks the traced count for its ``sharding``, which formats an error message by
    scanning the whole trace: building a model of a few hundred adapted Linears becomes quadratic (minutes for
    T5-base). Counting in Python avoids it; the keys are a deterministic function of the seed and draw order.
    """

    def __init__(self, seed: int | Array = 0):
        self.key = jax.random.key(seed) if isinstance(seed, int) else seed
        self.count = 0

    def params(self) -> Array:
        k = jax.random.fold_in(self.key, self.count)
        self.count += 1
        return k

    __call__ = params
    default = params


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


@dataclasses.dataclass(frozen=True)
class Injection:
    """Where adapters go: Hugging Face Linear names (``q``, ``wi_0``, ``q_proj`` ...) and the adapter config.

    ``adapter`` is an ``ept_jax.adapters.AdapterConfig``; ``ept_jax.adapters.make_adapter`` builds each Linear's
    adapter from it, giving the adapter the base kernel's logical axes.
    """

    adapter: Any
    targets: tuple[str, ...]
    contrastive_stacks: tuple[str, ...] = ("encoder",)


class Injector:
    """Builds the Linears of a model: adapted where the injection targets the name, frozen otherwise."""

    def __init__(self, injection: Injection | None):
        self.injection = injection
        self.count = 0
        self.seen_targets: set[str] = set()
        # State one adapter kind shares across every adapted Linear of the model (MOELoRA's router), built
        # once at the first adapted Linear; flax NNX stores a module referenced by several parents once.
        self.shared: nnx.Module | None = None
        self._shared_built = False

    def __call__(
        self,
        short_name: str,
        path: str,
        stack: str,
        d_in: int,
        d_out: int,
        *,
        axes,
        use_bias: bool = False,
        param_dtype=jnp.float32,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        base = Linear(d_in, d_out, axes=axes, use_bias=use_bias, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        inj = self.injection
        if inj is None or short_name not in inj.targets:
            return base
        from ept_jax.adapters import make_adapter, make_shared  # local import: adapters imports this module

        self.seen_targets.add(short_name)
        if not self._shared_built:
            self.shared, self._shared_built = make_shared(inj.adapter, rngs=rngs), True
        adapter = make_adapter(inj.adapter, d_in, d_out, rngs=rngs, axes=tuple(axes), shared=self.shared)
        lin = AdaptedLinear(
            base,
            adapter,
            name=path,
            stack=stack,
            contrastive=stack in inj.contrastive_stacks,
            index=self.count,
        )
        self.count += 1
        return lin

    def check_targets(self, available: Sequence[str]) -> None:
        """Raises if a target names no Linear of the model (``available`` lists the model's Linear names)."""
        if self.injection is None:
            return
        unknown = [t for t in self.injection.targets if t not in set(available)]
        if unknown:
            raise ValueError(
                f"adapter target(s) {unknown} name no Linear of this model; accepted: {sorted(set(available))}"
            )


def pop_aux_losses(model: nnx.Module) -> list[Array]:
    """Removes and returns every :class:`AuxLoss` sown during the last call (a flat list of scalars)."""
    state = nnx.pop(model, AuxLoss)
    return [v for v in jax.tree.leaves(state)]


def adapted_linears(model: nnx.Module) -> list[tuple[tuple, AdaptedLinear]]:
    """All ``(path, AdaptedLinear)`` pairs of ``model`` in a stable order."""
    return [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, AdaptedLinear)]
