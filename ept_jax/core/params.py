"""The contract every layer shares: parameter kinds, logical axes, the adapter context, initialisation keys.

* Frozen base weights are :class:`flax.nnx.Param`; trainable adapter weights are :class:`AdapterParam`
  (a subclass). :data:`TRAINABLE` is the one filter that decides what trains, what gets optimizer state and
  what is written into adapter checkpoints.
* Every parameter carries logical axis names (t5x style, see :mod:`ept_jax.core.sharding`) as its
  ``out_sharding`` metadata (flax 0.12's name; read it with :func:`logical_axes`).
* A model is called with an :class:`AdapterContext` that carries per-example task ids, the dropout key and
  whether the call is deterministic; every adapted Linear receives it.
* Adapter losses (EPT's contrastive loss) are sown as :class:`AuxLoss` intermediates; the trainer pops them
  with :func:`pop_aux_losses`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
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
        :func:`ept_jax.models.layer_scan.run_layers`, where one traced layer stands for every layer.
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


def pop_aux_losses(model: nnx.Module) -> list[Array]:
    """Removes and returns every :class:`AuxLoss` sown during the last call (a flat list of scalars)."""
    state = nnx.pop(model, AuxLoss)
    return [v for v in jax.tree.leaves(state)]
