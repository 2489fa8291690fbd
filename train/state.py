"""The model, its tokenizer, the optimizer and the sharded training state.

The model is split once: ``graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)``. Only ``trainable``
(the :class:`~ept_jax.core.params.AdapterParam` s) is differentiated, gets optimizer state and goes into checkpoints;
``frozen`` (the base weights) is an input of every step and is never written.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from ept_jax.core import sharding as sharding_lib
from ept_jax.core.params import TRAINABLE
from ept_jax.models import layer_scan
from train.errors import UserError
from train.stacking import LeafStack, leaf_name, leaf_names, stackable


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


# --------------------------------------------------------------------------------------------------- model


def build_model(config) -> nnx.Module:
    """The model of ``config`` with adapters injected: random base weights (``model.random_init``) or loaded.

    Adapters are initialised from ``train.seed``. Raises ValueError / CheckpointError naming what is wrong (a
    kernel size the variant cannot use, an unknown target, a model directory without weights, ...).
    ``model.scan_layers`` (default True) is applied with :func:`ept_jax.models.layer_scan.set_scan_layers`.
    """
    from train.builder import model_from_config

    model = model_from_config(config)
    layer_scan.set_scan_layers(model, bool(config.model.get("scan_layers", True)))
    return model


def vocab_size(model) -> int:
    return int(model.cfg.vocab_size)


def load_tokenizer(config):
    """The tokenizer: ``data.tokenizer`` (``"byt5"``, a directory or a ``.gguf`` file) or, when None, the model's
    (its directory's, or the one stored in a ``.gguf`` model file)."""
    name = config.data.tokenizer
    if name == "byt5":
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    from transformers import AutoTokenizer

    if name is None:
        if config.model.random_init:
            raise UserError(
                "data.tokenizer is None (the model's) but model.random_init=True has no model directory; set "
                "data.tokenizer to 'byt5' or a tokenizer directory"
            )
        name = str(config.model.name_or_path)
        if not name.endswith(".gguf"):
            from ept_jax.checkpoints.hf import resolve_model_dir

            name = str(resolve_model_dir(name))
    if str(name).endswith(".gguf"):
        from ept_jax.checkpoints.gguf import load_tokenizer as gguf_tokenizer

        return gguf_tokenizer(name)
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {name!r}: {str(e).splitlines()[0]}") from e


def check_tokenizer(tokenizer, model) -> None:
    """Raises :class:`UserError` when the tokenizer's ids do not fit the model's vocabulary or special ids."""
    n_model = vocab_size(model)
    n_tok = len(tokenizer)
    if n_tok > n_model:
        raise UserError(
            f"tokenizer {type(tokenizer).__name__} has {n_tok} tokens but the model's vocabulary holds "
            f"{n_model}; use the model's own tokenizer (data.tokenizer=None) or a matching one"
        )
    cfg = model.cfg
    for name in ("pad_token_id", "eos_token_id"):
        tok_id, model_id = getattr(tokenizer, name, None), getattr(cfg, name, None)
        if isinstance(model_id, tuple):
            ok = tok_id in model_id
        else:
            ok = model_id is None or tok_id == model_id
        if tok_id is not None and not ok:
            raise UserError(
                f"tokenizer {name}={tok_id} but the model's config has {name}={model_id}: the tokenizer does not "
                "belong to this model"
            )


# --------------------------------------------------------------------------------------------------- optimizer


def learning_rate_schedule(config) -> optax.Schedule:
    """transformers' ``get_linear_schedule_with_warmup``, formula for formula: optimizer step ``i`` (0-based)
    uses ``lr * i / warmup`` for ``i < warmup``, then ``lr * max(0, (steps - i) / (steps - warmup))``.

    So the first step runs with lr 0 when there is a warm-up (the release's AdamW moments still advance). Computed
    in the default float dtype (float64 with ``jax_enable_x64``: the exact tests against the release need it).
    """
    lr, warmup, steps = float(config.train.learning_rate), int(config.train.warmup_steps), int(config.train.steps)
    if warmup >= steps:
        raise UserError(f"train.warmup_steps={warmup} must be smaller than train.steps={steps}")

    def schedule(count):
        i = jnp.asarray(count).astype(jnp.result_type(float))
        warm = i / max(1, warmup)
        decay = jnp.maximum(0.0, (steps - i) / max(1, steps - warmup))
        return lr * jnp.where(i < warmup, warm, decay)

    return schedule


def decay_mask(params):
    """Weight decay on matrices only: biases and other vectors are exempt (transformers' Trainer rule).

    On leaves stacked by shape (:class:`train.stacking.LeafStack`) the rule reads each group's leaf shape.
    """
    return jax.tree.map(lambda x: x.layout.map_shapes(lambda s: len(s) >= 2) if isinstance(x, LeafStack)
                        else x.ndim >= 2, params, is_leaf=lambda x: isinstance(x, LeafStack))


def parse_lr_multipliers(text: str) -> dict[str, float]:
    """``"kernels=10 A=0.5"`` -> ``{"kernels": 10.0, "A": 0.5}`` (``train.lr_multipliers``).

    Raises:
      UserError: an item is not ``NAME=POSITIVE_NUMBER``.
    """
    out = {}
    for item in str(text or "").replace(",", " ").split():
        name, sep, value = item.partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = float("nan")
        if not sep or not name or not factor > 0:
            raise UserError(f"train.lr_multipliers: {item!r} is not NAME=FACTOR with a factor > 0 "
                            "(e.g. 'kernels=10': the parameters named kernels at 10x the learning rate)")
        out[name] = factor
    return out


def lr_scales(params, multipliers: dict[str, float]):
    """Each leaf's learning-rate multiplier: ``multipliers[name]`` for a leaf of that parameter name
    (:func:`train.stacking.leaf_name`), else 1. On leaves stacked by shape and name (:class:`LeafStack`) the rule
    reads each group's name."""

    def of_stack(x):
        return x.layout.map_names(lambda n: multipliers.get(n, 1.0))

    if any(isinstance(x, LeafStack) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, LeafStack))):
        return jax.tree.map(lambda x: of_stack(x) if isinstance(x, LeafStack) else 1.0, params,
                            is_leaf=lambda x: isinstance(x, LeafStack))
    return jax.tree_util.tree_map_with_path(lambda p, _: multipliers.get(leaf_name(p), 1.0), params)


def check_lr_multipliers(config, trainable) -> None:
    """Raises :class:`UserError` when ``train.lr_multipliers`` names a parameter the adapters do not have."""
    names = set(leaf_names(trainable))
    unknown = sorted(set(parse_lr_multipliers(config.train.get("lr_multipliers", ""))) - names)
    if unknown:
        raise UserError(f"train.lr_multipliers names {unknown}, which no trainable parameter of "
                        f"adapter.kind={config.adapter.kind!r} is called; its parameters: {sorted(names)}")


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """One optax chain, the release's (PyTorch's): global-norm clipping ``g * min(1, clip / (norm + 1e-6))``,
    then AdamW with per-leaf step counts (:func:`train.optim.adamw_torch`) on :func:`learning_rate_schedule`.

    ``train.grad_clip`` (0: none), ``train.learning_rate`` / ``warmup_steps`` / ``steps``, ``train.weight_decay``
    (matrices only, :func:`decay_mask`), ``train.adam_b1`` / ``adam_b2`` / ``adam_eps``, ``train.lr_multipliers``
    (per parameter name, e.g. ``"kernels=10"``: :func:`lr_scales`). Whether expert kernels
    that no route chose are stepped is the training step's business (``train.unrouted_experts``,
    :func:`step_options`). Marked :class:`train.stacking.StackableTransformation`: the training step runs it on
    the adapter leaves stacked by shape (the same update, far fewer XLA kernels to compile).
    """
    from train.optim import adamw_torch, clip_by_global_norm_torch

    schedule = learning_rate_schedule(config)
    t = config.train
    parts = []
    if float(t.grad_clip) > 0:
        parts.append(clip_by_global_norm_torch(float(t.grad_clip)))
    multipliers = parse_lr_multipliers(t.get("lr_multipliers", ""))
    parts.append(adamw_torch(schedule, b1=float(t.get("adam_b1", 0.9)), b2=float(t.get("adam_b2", 0.999)),
                             eps=float(t.get("adam_eps", 1e-8)), weight_decay=float(t.weight_decay),
                             mask=decay_mask,
                             lr_scale=functools.partial(lr_scales, multipliers=multipliers) if multipliers else None))
    return stackable(optax.chain(*parts)), schedule


def step_options(config) -> dict[str, Any]:
    """The keyword arguments of ``train.steps.make_train_step`` that ``config`` sets (all but the state, the
    optimizer, the schedule and the mesh)."""
    divisor = config.adapter.get("contrastive_divisor")
    return {
        "family": str(config.model.family),
        "contrastive_lambda": float(config.adapter.contrastive_lambda),
        "contrastive_divisor": None if divisor is None else float(divisor),
        "unrouted_experts": str(config.train.get("unrouted_experts", "skip")),
        "seed": int(config.train.seed),
    }


# --------------------------------------------------------------------------------------------------- state


@dataclasses.dataclass
class TrainState:
    """Everything a step needs, placed on the mesh.

    Attributes:
      graphdef: the model's static structure.
      trainable: ``nnx.State`` of the adapter parameters.
      frozen: ``nnx.State`` of everything else (base weights).
      opt_state: the optax state of ``trainable``.
      shardings: ``(trainable, opt_state, frozen)`` sharding trees (prefixes of the states).
    """

    graphdef: Any
    trainable: nnx.State
    frozen: nnx.State
    opt_state: Any
    shardings: tuple[Any, Any, Any]

    def model(self) -> nnx.Module:
        """The model with the current parameters (arrays are shared, not copied)."""
        return nnx.merge(self.graphdef, self.trainable, self.frozen)


def sharding_tree(state: nnx.State, mesh: Mesh) -> nnx.State:
    """Per-Variable NamedShardings kept inside their Variables, so the tree has ``state``'s exact structure."""
    flat = sharding_lib.state_shardings(state, mesh)
    return jax.tree.map(lambda v, s: v.replace(s), state, flat, is_leaf=is_variable)


def opt_state_shardings(tx, trainable_sh: nnx.State, abstract_opt, mesh: Mesh):
    """Shardings of the optimizer state: moments like their parameters, counters (per-leaf ones too) replicated."""
    rep = sharding_lib.replicated(mesh)

    def like_param(leaf, sh):
        value = leaf.get_value() if is_variable(leaf) else leaf
        if getattr(value, "ndim", None) == 0:  # a per-leaf scalar (train.optim.adamw_torch's step counts)
            return sh.replace(rep) if is_variable(sh) else rep
        return sh

    return optax.tree_map_params(
        tx,
        like_param,
        abstract_opt,
        trainable_sh,
        transform_non_params=lambda _: sharding_lib.replicated(mesh),
        is_leaf=is_variable,
    )


def create_train_state(model: nnx.Module, tx, mesh: Mesh) -> TrainState:
    """Splits ``model``, places its states on ``mesh`` by their logical axes and initialises the optimizer."""
    graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
    if not jax.tree.leaves(trainable):
        raise UserError("the model has no trainable parameters: adapter.kind='none' or no adapter target matched")
    tr_sh, fr_sh = sharding_tree(trainable, mesh), sharding_tree(frozen, mesh)
    trainable = jax.device_put(trainable, tr_sh)
    frozen = jax.device_put(frozen, fr_sh)
    abstract_opt = jax.eval_shape(tx.init, trainable)
    opt_sh = opt_state_shardings(tx, tr_sh, abstract_opt, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    return TrainState(graphdef, trainable, frozen, opt_state, (tr_sh, opt_sh, fr_sh))


def abstract_like(tree, shardings) -> Any:
    """``jax.ShapeDtypeStruct`` s shaped like ``tree`` with the shardings of ``shardings`` (same structure)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def put_global(array, sharding: NamedSharding) -> jax.Array:
    """A global array from a host numpy array that every process holds in full (each takes its own shards)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_rows(local, sharding: NamedSharding, rows: list[int], global_rows: int) -> jax.Array:
    """A global ``(global_rows, ...)`` array from this process's ``rows`` of it (``local[j]`` is row
    ``rows[j]``; :func:`ept_jax.core.sharding.process_rows` of ``sharding``): no process holds the others' rows."""
    if len(local) != len(rows):
        raise ValueError(f"{len(local)} local rows for the {len(rows)} row indices of this process")
    position = {r: j for j, r in enumerate(rows)}

    def shard(index):
        picked = [position[r] for r in range(*index[0].indices(global_rows))]
        return local[picked][(slice(None), *index[1:])]

    return jax.make_array_from_callback((global_rows, *local.shape[1:]), sharding, shard)
