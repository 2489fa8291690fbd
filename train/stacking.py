"""Adapter leaves stacked by shape inside the training step: the optimizer on a few arrays, not thousands.

An adapted model has thousands of small trainable arrays (SmolLM2-135M with EPT on seven Linears per layer: 2,730;
AdamW then keeps two moments of each). Applied leaf by leaf, the optimizer, the gradient norm and the non-finite
guard are a few small XLA kernels per leaf, ~25,000 of the ~34,000 fusions of that step, and XLA's compile time
grows faster than linearly with their number. Leaves of equal shape, dtype and sharding are *stacked* into one
array per group (SmolLM2: 20 groups), and the step runs the optimizer on the stacks:

* :class:`StackLayout` is the grouping; :class:`LeafStack` is a pytree node holding one array per group, so optax
  builds and updates its state on it like on any tree;
* the step's parameters and optimizer state live stacked between steps (``train.steps.FlatState``); the model
  reads each leaf as a slice of its stack (fused into its consumers) and the per-leaf gradients are stacked
  before the update (one concatenation per group);
* :class:`Stacking` converts a state's per-leaf ``trainable`` / ``opt_state`` to the stacked form and back, so
  :class:`~train.state.TrainState`, checkpoints and evaluation keep the per-leaf layout.

Only transformations that act on each element independently apart from reductions over the whole tree (AdamW,
global-norm clipping, masks that depend on a leaf's shape or parameter name only: leaves are grouped by name too)
give the same result on stacks; the training step
stacks only for a :class:`StackableTransformation` (what ``train.state.make_optimizer`` returns).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec


class StackableTransformation(optax.GradientTransformationExtraArgs):
    """An optax transformation whose update is the same on leaves stacked by shape as on the leaves.

    That holds for element-wise updates with reductions over the whole tree only (AdamW, ``clip_by_global_norm``)
    and for masks computed from a leaf's shape or name (``train.state.decay_mask``, ``train.state.lr_scales``
    understand :class:`LeafStack`).
    Wrapping a transformation asserts it; ``train.steps.make_train_step`` stacks leaves only for these.
    """

    __slots__ = ()


def stackable(tx: optax.GradientTransformation) -> StackableTransformation:
    """``tx`` marked as a :class:`StackableTransformation` (the caller vouches for the property)."""
    return StackableTransformation(tx.init, tx.update)


@dataclasses.dataclass(frozen=True)
class StackLayout:
    """Which leaves of a tree share a stack.

    Attributes:
      groups: per group, the indices (in ``jax.tree.leaves`` order) of its leaves.
      shapes: per group, the shape of each of its leaves.
      n_leaves: the number of leaves of the tree.
      names: per group, the parameter name its leaves share (:func:`leaf_names`), or None when the layout was
        built without names.
    """

    groups: tuple[tuple[int, ...], ...]
    shapes: tuple[tuple[int, ...], ...]
    n_leaves: int
    names: tuple[str | None, ...] | None = None

    @classmethod
    def of(cls, leaves: Sequence[Any], shardings: Sequence[Any] | None = None,
           names: Sequence[str] | None = None) -> StackLayout:
        """Groups ``leaves`` (arrays or ``ShapeDtypeStruct`` s) by shape, dtype, sharding spec and, when
        ``names`` (one per leaf) are given, parameter name (so that a rule by name, e.g. a learning-rate
        multiplier, applies to whole groups)."""
        keys: dict[Any, list[int]] = {}
        for i, x in enumerate(leaves):
            spec = _spec_key(shardings[i], x.ndim) if shardings is not None else None
            name = names[i] if names is not None else None
            keys.setdefault((tuple(x.shape), np.dtype(x.dtype).str, spec, name), []).append(i)
        groups = tuple(tuple(v) for v in keys.values())
        shapes = tuple(k[0] for k in keys)
        return cls(groups, shapes, len(leaves), None if names is None else tuple(k[3] for k in keys))

    def stack(self, leaves: Sequence[Any]) -> LeafStack:
        """One array per group, ``(n_group, *shape)``."""
        if len(leaves) != self.n_leaves:
            raise ValueError(f"stack: {len(leaves)} leaves given, the layout holds {self.n_leaves}")
        return LeafStack(tuple(jnp.stack([leaves[i] for i in g]) for g in self.groups), self)

    def unstack(self, stack: LeafStack) -> list[Any]:
        """The leaves of ``stack`` in tree order (static slices: for use under ``jit``)."""
        out: list[Any] = [None] * self.n_leaves
        for g, arr in zip(self.groups, stack.arrays, strict=True):
            for j, i in enumerate(g):
                out[i] = arr[j]
        return out

    def unstack_eager(self, stack: LeafStack, shardings: Sequence[Any] | None = None) -> list[Any]:
        """:meth:`unstack` outside ``jit``: one small compiled program per group shape, not per leaf.

        ``shardings``: the per-leaf shardings (in tree order) the leaves get; None keeps XLA's choice.
        """
        out: list[Any] = [None] * self.n_leaves
        for g, shape, arr in zip(self.groups, self.shapes, stack.arrays, strict=True):
            # a stack of per-leaf scalars (an optimizer's step counts) is not shaped like its leaves
            leaf_like = shardings is not None and arr.ndim == 1 + len(shape)
            take = _take(shardings[g[0]] if leaf_like else _replicated(shardings[g[0]]) if shardings else None)
            for j, i in enumerate(g):
                out[i] = take(arr, np.int32(j))
        return out

    def map_shapes(self, fn: Callable[[tuple[int, ...]], Any]) -> LeafStack:
        """A :class:`LeafStack` holding ``fn(leaf shape)`` per group (e.g. a weight-decay mask)."""
        return LeafStack(tuple(fn(s) for s in self.shapes), self)

    def map_names(self, fn: Callable[[str], Any]) -> LeafStack:
        """A :class:`LeafStack` holding ``fn(parameter name)`` per group (e.g. a learning-rate multiplier).

        Raises:
          ValueError: the layout was built without names.
        """
        if self.names is None:
            raise ValueError("this stack layout was built without parameter names (StackLayout.of(..., names=))")
        return LeafStack(tuple(fn(n) for n in self.names), self)

    def shardings(self, leaf_shardings: Sequence[NamedSharding]) -> LeafStack:
        """Each group's sharding: its leaves' spec behind an unsharded stack axis."""
        out = []
        for g, shape in zip(self.groups, self.shapes, strict=True):
            sh = leaf_shardings[g[0]]
            spec = tuple(sh.spec) + (None,) * (len(shape) - len(sh.spec))
            out.append(NamedSharding(sh.mesh, PartitionSpec(None, *spec)))
        return LeafStack(tuple(out), self)


@jax.tree_util.register_pytree_node_class
class LeafStack:
    """A pytree node holding one array per group of a :class:`StackLayout` (the layout is static aux data)."""

    def __init__(self, arrays: tuple, layout: StackLayout):
        self.arrays, self.layout = tuple(arrays), layout

    def tree_flatten(self):
        return self.arrays, self.layout

    @classmethod
    def tree_unflatten(cls, layout, arrays):
        return cls(tuple(arrays), layout)

    def __repr__(self) -> str:
        return f"LeafStack({len(self.arrays)} groups of {self.layout.n_leaves} leaves)"


def _spec_key(sharding, ndim: int):
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return None
    spec = tuple(spec) + (None,) * (ndim - len(spec))
    return tuple(tuple(s) if isinstance(s, list) else s for s in spec)


@functools.cache
def _take(sharding) -> Callable:
    def take(arr, j):
        return lax.dynamic_index_in_dim(arr, j, keepdims=False)

    return jax.jit(take) if sharding is None else jax.jit(take, out_shardings=sharding)


class Stacking:
    """Converts a state's per-leaf trainable / optimizer trees to the stacked leaves the step takes, and back.

    Every subtree of ``opt_state`` with ``trainable``'s structure (AdamW's moments) becomes a :class:`LeafStack`;
    everything else (step counts) is kept. The stacked leaves are what :attr:`tr_def` / :attr:`opt_def` (the
    stacked treedefs) unflatten.

    Args:
      trainable: the per-leaf trainable tree (arrays or ``ShapeDtypeStruct`` s).
      opt_state: its optimizer state (same).
      tr_shardings / opt_shardings: their per-leaf shardings (trees with the same leaves).
    """

    def __init__(self, trainable, opt_state, tr_shardings, opt_shardings):
        self.leaf_def = jax.tree.structure(trainable)
        self.leaf_opt_def = jax.tree.structure(opt_state)
        self.tr_leaf_shardings = jax.tree.leaves(tr_shardings)
        self.opt_leaf_shardings = jax.tree.leaves(opt_shardings)
        self.layout = StackLayout.of(jax.tree.leaves(trainable), self.tr_leaf_shardings, leaf_names(trainable))
        abstract = jax.eval_shape(self._stack_trees, trainable, opt_state)
        self.tr_def = jax.tree.structure(abstract[0])
        self.opt_def = jax.tree.structure(abstract[1])
        group_sh = self.layout.shardings(self.tr_leaf_shardings)
        self.tr_shardings = jax.tree.leaves(group_sh)
        rep = _replicated(self.tr_leaf_shardings[0]) if self.tr_leaf_shardings else None
        self.opt_shardings = jax.tree.leaves(jax.tree.map(
            lambda x: self._stack_shardings(x, group_sh, rep) if isinstance(x, LeafStack) else rep, abstract[1],
            is_leaf=lambda x: isinstance(x, LeafStack)))
        # copy=True: a leaf passed through unchanged (a step count) must not be the state's own buffer, which the
        # step would then donate
        self._stack_jit = jax.jit(
            lambda tr, opt: tuple([jnp.array(x, copy=True) for x in jax.tree.leaves(t)]
                                  for t in self._stack_trees(tr, opt)),
            out_shardings=(self.tr_shardings, self.opt_shardings))

    def _stack_shardings(self, stack: LeafStack, group_sh: LeafStack, rep) -> LeafStack:
        """Per group: the group's sharding, or replicated for a stack of per-leaf scalars (step counts)."""
        return LeafStack(tuple(gs if a.ndim == 1 + len(shape) else rep for a, gs, shape in
                               zip(stack.arrays, group_sh.arrays, self.layout.shapes, strict=True)), self.layout)

    def _is_params(self, x) -> bool:
        return not isinstance(x, LeafStack) and jax.tree.structure(x) == self.leaf_def

    def _stack_trees(self, trainable, opt_state):
        st = self.layout.stack(jax.tree.leaves(trainable))
        opt = jax.tree.map(lambda sub: self.layout.stack(jax.tree.leaves(sub)) if self._is_params(sub) else sub,
                           opt_state, is_leaf=self._is_params)
        return st, opt

    def stack(self, trainable, opt_state) -> tuple[list, list]:
        """``(trainable leaves, opt_state leaves)`` in the stacked form, placed with their shardings (copies)."""
        if jax.tree.structure(trainable) != self.leaf_def or jax.tree.structure(opt_state) != self.leaf_opt_def:
            raise ValueError("Stacking.stack: the state's trees differ from the ones this step was built for")
        return self._stack_jit(trainable, opt_state)

    def unstack(self, tr_leaves: Sequence[Any], opt_leaves: Sequence[Any]) -> tuple[Any, Any]:
        """The per-leaf ``(trainable, opt_state)`` trees of stacked leaves (new arrays; the inputs stay valid)."""
        st = jax.tree.unflatten(self.tr_def, tr_leaves)
        trainable = jax.tree.unflatten(self.leaf_def, self.layout.unstack_eager(st, self.tr_leaf_shardings))
        opt = jax.tree.unflatten(self.opt_def, opt_leaves)
        opt = jax.tree.map(
            lambda x: jax.tree.unflatten(self.leaf_def, self.layout.unstack_eager(x, self.tr_leaf_shardings))
            if isinstance(x, LeafStack) else jnp.array(x, copy=True),
            opt, is_leaf=lambda x: isinstance(x, LeafStack))
        if jax.tree.structure(opt) != self.leaf_opt_def:
            raise ValueError("Stacking.unstack: the optimizer state did not return to its per-leaf structure")
        return trainable, opt


def leaf_name(path) -> str:
    """A leaf's parameter name: the last named key of its path (``...['adapter']['kernels'][3].value`` ->
    ``"kernels"``; indices and ``.value`` are skipped)."""
    for key in reversed(path):
        if isinstance(key, jax.tree_util.DictKey) and isinstance(key.key, str):
            return key.key
        if isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
            return key.name
    return ""


def leaf_names(tree) -> list[str]:
    """:func:`leaf_name` of every leaf of ``tree``, in ``jax.tree.leaves`` order."""
    return [leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _replicated(sharding):
    mesh = getattr(sharding, "mesh", None)
    return NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
