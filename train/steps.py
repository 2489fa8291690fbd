"""The jitted training step and the per-family forward / generation calls.

Shapes: ``B`` is the global batch, ``Ls``/``Lt`` the static source/target lengths (seq2seq), ``L`` the static
length (decoder-only), ``V`` the vocabulary. Batches follow the format documented in ``ept_jax.data``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from ept_jax.adapters.base import adapted_linears
from ept_jax.core import losses
from ept_jax.core import sharding as sharding_lib
from ept_jax.core.params import AdapterContext, pop_aux_losses
from train import stacking as stacking_lib
from train.state import TrainState

Array = jax.Array


def cross_entropy(logits: Array, labels: Array, mask: Array) -> Array:
    """Mean token cross-entropy over ``mask``: ``logits (B, L, V)``, ``labels``/``mask`` ``(B, L)`` -> scalar.

    Taken in float32 whatever the logits' dtype, with the one-pass backward of ``ept_jax.core.losses.token_nll``; a
    batch without any target token gives 0.
    """
    return losses.masked_mean_nll(logits, labels, mask)


def forward(family: str, model, batch: dict, ctx: AdapterContext | None) -> Array:
    """Teacher-forced logits: seq2seq ``(B, Lt, V)`` of ``decoder_input_ids``; decoder-only ``(B, L, V)``.

    A decoder-only batch may carry ``positions (B, L)``; without them they come from the attention mask
    (``cumsum - 1``; the same as ``arange(L)`` on the real tokens of the right-padded rows ept_jax collates).
    """
    if family == "t5":
        return model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], None, ctx)
    return model(batch["input_ids"], batch["attention_mask"], ctx, positions=batch.get("positions"))


def generate(family: str, model, input_ids: Array, attention_mask: Array, ctx: AdapterContext | None, *,
             max_new_tokens: int, eos_token_id, pad_token_id: int) -> Array:
    """Greedy generation ``(B, max_new_tokens)`` int32 of prompts ``input_ids (B, Ls)`` with the family's decoder."""
    if family == "t5":
        from ept_jax.models.t5 import generate as gen
    else:
        from ept_jax.models.llama import generate as gen
    return gen(model, input_ids, attention_mask, ctx, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
               pad_token_id=pad_token_id)


def loss_fn(trainable, frozen, graphdef, batch: dict, dropout_rng: Array, *, family: str,
            contrastive_lambda: float, contrastive_divisor: float | None = None) -> tuple[Array, dict[str, Array]]:
    """``ce + contrastive_lambda * contrastive`` of one training batch, and its parts.

    ``contrastive`` is the mean of the adapted Linears' contrastive losses (those of the stacks
    ``adapter.contrastive_stacks`` names) or, with ``contrastive_divisor``, their sum divided by it: the
    release's T5 encoder divides by a hard-coded 72 (12 blocks x 6 modules) whatever the depth.
    """
    model = nnx.merge(graphdef, trainable, frozen)
    ctx = AdapterContext(task_ids=batch["task_ids"], dropout_rng=dropout_rng, semantic=batch.get("semantic"),
                         deterministic=False)
    logits = forward(family, model, batch, ctx)
    aux = pop_aux_losses(model)
    ce = cross_entropy(logits, batch["labels"], batch["label_mask"])
    if aux:
        terms = jnp.stack([a.astype(ce.dtype) for a in aux])
        contrastive = jnp.mean(terms) if contrastive_divisor is None else jnp.sum(terms) / contrastive_divisor
    else:
        contrastive = jnp.zeros((), ce.dtype)
    loss = ce + contrastive_lambda * contrastive
    return loss, {"ce": ce, "contrastive": contrastive}


@dataclasses.dataclass
class FlatState:
    """The step's own leaves: ``trainable`` and ``opt_state`` (stacked by shape when the step stacks; see
    :class:`TrainStep`) and ``frozen`` (lists of arrays)."""

    trainable: list
    opt_state: list
    frozen: list


class TrainStep:
    """The jitted training step ``(trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, metrics)``.

    The compiled program (:attr:`jitted`) takes and returns lists of arrays, not ``nnx.State`` s: flattening
    them and rebuilding their Variables costs Python time per Variable on every call (about 60 ms a step for
    T5-small EPT's ~3,700 adapter and optimizer Variables on a 2-core CPU, more than a whole accelerator step).
    With a :class:`~train.stacking.StackableTransformation` (``train.state.make_optimizer``'s) those lists are
    the adapter leaves *stacked by shape* (:mod:`train.stacking`: the optimizer then compiles to a few dozen
    kernels instead of ~10 per leaf); with any other transformation, the states' leaves themselves.

    A loop keeps the lists: ``flat = step.flatten(state)`` once, ``metrics = step.advance(flat, batch, i)``
    per step, and ``step.sync(flat, state)`` before anything reads ``state.trainable`` / ``state.opt_state``
    (evaluation, checkpoints), which keep the per-leaf layout. ``flat.trainable`` and ``flat.opt_state`` are
    donated: after a call only its outputs are valid. Stacked, ``flatten`` and ``sync`` copy, so ``state``
    stays valid; unstacked, ``flat`` holds ``state``'s own arrays, which the first step donates.
    :meth:`__call__` is the same step over ``nnx.State`` s, for one-off calls.
    """

    def __init__(self, jitted: Callable, tr_def, opt_def, stacking: stacking_lib.Stacking | None = None,
                 grads_fn: Callable | None = None):
        self.jitted, self.tr_def, self.opt_def, self.stacking = jitted, tr_def, opt_def, stacking
        self._grads_fn, self._grads_jit = grads_fn, None

    def gradients(self, state: TrainState, batch: dict, step) -> tuple[Array, dict, nnx.State]:
        """``(loss, parts, grads)`` the step would compute on ``state`` (per-leaf gradients before clipping, like
        ``state.trainable``): the same function the step differentiates, compiled on its own (for checks)."""
        if self._grads_fn is None:
            raise ValueError("this TrainStep was built without its gradient function")
        if self._grads_jit is None:
            self._grads_jit = jax.jit(self._grads_fn)
        (loss, parts), grads = self._grads_jit(state.trainable, state.frozen, batch, step)
        return loss, parts, grads

    def flatten(self, state: TrainState) -> FlatState:
        """The step's lists of ``state`` (stacked copies, or the arrays themselves when the step does not stack)."""
        tr, opt = self._lists(state.trainable, state.opt_state)
        return FlatState(tr, opt, jax.tree.leaves(state.frozen))

    def advance(self, flat: FlatState, batch: dict, step, frozen: list | None = None) -> dict:
        """One step on ``flat`` in place; returns the metrics. ``frozen`` (leaves) replaces ``flat.frozen``."""
        flat.trainable, flat.opt_state, metrics = self.jitted(
            flat.trainable, flat.opt_state, flat.frozen if frozen is None else frozen, batch, step)
        return metrics

    def sync(self, flat: FlatState, state: TrainState) -> None:
        """Writes ``flat``'s trainable and optimizer state into ``state`` (per-leaf ``nnx.State`` s)."""
        state.trainable, state.opt_state = self._trees(flat.trainable, flat.opt_state)

    def __call__(self, trainable, opt_state, frozen, batch: dict, step):
        tr, opt, metrics = self.jitted(*self._lists(trainable, opt_state), jax.tree.leaves(frozen), batch, step)
        return (*self._trees(tr, opt), metrics)

    def _lists(self, trainable, opt_state) -> tuple[list, list]:
        if self.stacking is not None:
            return self.stacking.stack(trainable, opt_state)
        return jax.tree.leaves(trainable), jax.tree.leaves(opt_state)

    def _trees(self, tr: list, opt: list):
        if self.stacking is not None:
            return self.stacking.unstack(tr, opt)
        return jax.tree.unflatten(self.tr_def, tr), jax.tree.unflatten(self.opt_def, opt)


def _key(entry) -> object:
    return getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry)))


def active_leaves(model, trainable, task_ids: Array) -> list[Array]:
    """Per leaf of ``trainable`` (``jax.tree.leaves`` order): ``() bool``, whether a forward with ``task_ids``
    uses it (:meth:`ept_jax.adapters.base.Adapter.param_usage`; unlisted parameters are always used).

    ``train.optim.adamw_torch`` steps only these leaves, as PyTorch's AdamW steps only tensors with a gradient.
    """
    flags: dict[tuple, Array] = {}
    for path, lin in adapted_linears(model):
        for rel, used in (lin.adapter.param_usage(task_ids) or {}).items():
            flags[(*path, "adapter", *rel)] = used
    out = []
    for kp, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]:
        path = tuple(_key(k) for k in kp if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value"))
        out.append(flags.get(path, jnp.ones((), bool)))
    return out


UNROUTED_EXPERTS = ("skip", "update")


def make_train_step(state: TrainState, tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh, *,
                    family: str, contrastive_lambda: float, seed: int, contrastive_divisor: float | None = None,
                    unrouted_experts: str = "update") -> TrainStep:
    """The training step of ``state``'s model (see :class:`TrainStep` for how to call it).

    Gradients are taken with respect to ``trainable`` only. A non-finite loss or gradient norm leaves the
    parameters and the optimizer state unchanged (``metrics["finite"]`` is then 0); the caller applies
    ``train.nan_policy``. The dropout key is ``fold_in(PRNGKey(seed), step)``, so a resumed run draws the
    same masks. With a :class:`~train.stacking.StackableTransformation` the optimizer, the gradient norm and
    the non-finite guard run on the adapter leaves stacked by shape (:mod:`train.stacking`).

    Args:
      contrastive_lambda / contrastive_divisor: see :func:`loss_fn`.
      unrouted_experts: ``"skip"`` passes ``tx`` the leaves this batch's forward used (:func:`active_leaves`,
        as the ``active`` extra argument of ``train.optim.adamw_torch``): expert kernels that no route chose
        are not stepped, as in the release (PyTorch leaves them without a gradient). ``"update"``: every leaf.
      (``train.state.step_options(config)`` gives all keyword arguments from a config.)
    Metrics: ``loss``, ``ce``, ``contrastive``, ``grad_norm`` (before clipping), ``lr`` (of this step),
    ``finite``.
    """
    if unrouted_experts not in UNROUTED_EXPERTS:
        raise ValueError(f"unrouted_experts={unrouted_experts!r}: accepted values are {UNROUTED_EXPERTS}")
    graphdef = state.graphdef
    tr_def, opt_def, fr_def = (jax.tree.structure(t) for t in (state.trainable, state.opt_state, state.frozen))
    tr_sh, opt_sh, fr_sh = (jax.tree.leaves(t) for t in state.shardings)
    for name, sh, tdef in (("trainable", tr_sh, tr_def), ("opt_state", opt_sh, opt_def), ("frozen", fr_sh, fr_def)):
        if len(sh) != tdef.num_leaves:
            raise ValueError(f"state.shardings: the {name} sharding tree has {len(sh)} leaves, the state "
                             f"{tdef.num_leaves}: build the state with train.state.create_train_state")
    batch_sh = sharding_lib.batch_sharding(mesh)
    rep = sharding_lib.replicated(mesh)
    stacking = None
    if isinstance(tx, stacking_lib.StackableTransformation):
        stacking = stacking_lib.Stacking(state.trainable, state.opt_state, *state.shardings[:2])
        tr_sh, opt_sh = stacking.tr_shardings, stacking.opt_shardings
    # the trees the jitted step's lists unflatten to: stacked (LeafStack nodes) or per-leaf
    step_tr_def, step_opt_def = (stacking.tr_def, stacking.opt_def) if stacking is not None else (tr_def, opt_def)
    loss_kw = dict(family=family, contrastive_lambda=contrastive_lambda, contrastive_divisor=contrastive_divisor)

    def grads_of(trainable, frozen, batch, step):
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), step)
        return jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, graphdef, batch, rng, **loss_kw)

    def step_fn(tr_leaves, opt_leaves, fr_leaves, batch, step):
        params = jax.tree.unflatten(step_tr_def, tr_leaves)
        opt_state = jax.tree.unflatten(step_opt_def, opt_leaves)
        frozen = jax.tree.unflatten(fr_def, fr_leaves)
        trainable = params if stacking is None else jax.tree.unflatten(tr_def, stacking.layout.unstack(params))
        (loss, parts), grads = grads_of(trainable, frozen, batch, step)
        extra = {}
        if unrouted_experts == "skip":
            active = active_leaves(nnx.merge(graphdef, trainable, frozen), trainable, batch["task_ids"])
            extra["active"] = (jax.tree.unflatten(tr_def, active) if stacking is None
                               else stacking.layout.stack(active))
        if stacking is not None:
            grads = stacking.layout.stack(jax.tree.leaves(grads))
        grad_norm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params, **extra)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: [jnp.where(finite, n, o) for n, o in zip(jax.tree.leaves(new), old, strict=True)]
        metrics = {
            "loss": loss,
            "ce": parts["ce"],
            "contrastive": parts["contrastive"],
            "grad_norm": grad_norm,
            "lr": jnp.asarray(schedule(step), loss.dtype),
            "finite": finite.astype(jnp.int32),
        }
        return keep(new_params, tr_leaves), keep(new_opt, opt_leaves), metrics

    jitted = jax.jit(
        step_fn,
        in_shardings=(tr_sh, opt_sh, fr_sh, batch_sh, rep),
        out_shardings=(tr_sh, opt_sh, rep),
        donate_argnums=(0, 1),
    )
    return TrainStep(jitted, tr_def, opt_def, stacking, grads_fn=grads_of)


def merged_frozen(graphdef, trainable, frozen, task: int | Array) -> nnx.State:
    """The frozen state with task ``task``'s adapter deltas added to the base kernels (``kernel += merge.T``).

    ``adapter.merge(task)`` is ``(d_out, d_in)`` (PyTorch layout); base kernels are ``(d_in, d_out)``.
    Run the result with ``AdapterContext(adapters_enabled=False)``: the adapters are then inert. ``frozen`` itself
    is left unchanged (eagerly or under jit).

    Raises:
      ValueError: an adapter that cannot be merged (its delta depends on the token).
    """
    from ept_jax.core.params import TRAINABLE

    # nnx.merge reuses the Variables of the states it is given: rebuild them, so that adding the deltas below
    # never writes into the caller's frozen state (outside jit the arrays would otherwise be replaced in place).
    model = nnx.merge(graphdef, trainable, jax.tree.map(lambda x: x, frozen))
    for path, lin in adapted_linears(model):
        if not lin.adapter.mergeable:
            raise ValueError(
                f"eval.merge_adapters=True but the adapter of {lin.name or path} ({type(lin.adapter).__name__}) "
                "cannot be merged into the base weights; set eval.merge_adapters=False"
            )
        kernel = lin.base.kernel
        kernel[...] = kernel[...] + lin.adapter.merge(task).T.astype(kernel[...].dtype)
    return nnx.split(model, TRAINABLE, ...)[2]
