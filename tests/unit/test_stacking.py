"""The training step on adapter leaves stacked by shape (``train.stacking``) equals the step leaf by leaf."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import stacking, steps
from train import state as state_lib


def test_layout_round_trip_groups_by_shape_dtype_and_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    rng = np.random.default_rng(0)
    leaves = [jnp.asarray(rng.normal(size=s).astype(d)) for s, d in
              [((3, 4), "float32"), ((5,), "float32"), ((3, 4), "float32"), ((3, 4), "bfloat16"), ((5,), "float32"),
               ((3, 4), "float32")]]
    shardings = [rep, rep, rep, rep, rep, split]
    layout = stacking.StackLayout.of(leaves, shardings)
    assert layout.groups == ((0, 2), (1, 4), (3,), (5,))
    st = layout.stack(leaves)
    assert [a.shape for a in st.arrays] == [(2, 3, 4), (2, 5), (1, 3, 4), (1, 3, 4)]
    for back in (layout.unstack(st), layout.unstack_eager(st, shardings)):
        for a, b in zip(back, leaves, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="5 leaves given, the layout holds 6"):
        layout.stack(leaves[:5])
    # the weight-decay rule reads each group's leaf shape, not the stack's
    mask = state_lib.decay_mask(st)
    assert isinstance(mask, stacking.LeafStack) and mask.arrays == (True, False, True, True)


def _smoke_state():
    from configs.smoke import get_config
    from ept_jax.core import sharding

    config = get_config()
    config.train.weight_decay = 0.1  # matrices decay, vectors (gate bias) do not: the mask matters
    config.train.grad_clip = 0.05  # small enough to clip
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    model = state_lib.build_model(config)
    tx, schedule = state_lib.make_optimizer(config)
    return config, mesh, model, tx, schedule


def _batch(config, seed):
    rng = np.random.default_rng(seed)
    b, ls, lt = 4, int(config.data.max_source_length), int(config.data.max_target_length)
    vocab = int(config.model.arch["vocab_size"])
    labels = rng.integers(1, vocab, (b, lt)).astype(np.int32)
    return {
        "input_ids": jnp.asarray(rng.integers(1, vocab, (b, ls)).astype(np.int32)),
        "attention_mask": jnp.ones((b, ls), jnp.int32),
        "decoder_input_ids": jnp.asarray(np.concatenate([np.zeros((b, 1), np.int32), labels[:, :-1]], 1)),
        "labels": jnp.asarray(labels),
        "label_mask": jnp.ones((b, lt), jnp.int32),
        "task_ids": jnp.asarray(np.arange(b) % len(config.data.tasks), jnp.int32),
    }


def test_stacked_step_equals_per_leaf_step():
    config, mesh, model, tx, schedule = _smoke_state()
    assert isinstance(tx, stacking.StackableTransformation)
    plain_tx = optax.GradientTransformationExtraArgs(tx.init, tx.update)  # same update, not marked: per leaf
    kw = dict(family="t5", contrastive_lambda=0.1, seed=0)
    st_a = state_lib.create_train_state(model, tx, mesh)
    st_b = state_lib.create_train_state(model, plain_tx, mesh)
    step_a = steps.make_train_step(st_a, tx, schedule, mesh, **kw)
    step_b = steps.make_train_step(st_b, plain_tx, schedule, mesh, **kw)
    assert step_a.stacking is not None and step_b.stacking is None
    n_leaves = len(jax.tree.leaves(st_a.trainable))
    assert len(step_a.stacking.layout.groups) < n_leaves
    before = [np.asarray(x) for x in jax.tree.leaves(st_a.trainable)]

    flat_a, flat_b = step_a.flatten(st_a), step_b.flatten(st_b)
    assert len(flat_a.trainable) == len(step_a.stacking.layout.groups)
    for i in range(3):
        batch = _batch(config, i)
        m_a = step_a.advance(flat_a, batch, np.int32(i + 1))
        m_b = step_b.advance(flat_b, batch, np.int32(i + 1))
        for k in ("loss", "grad_norm", "lr", "finite"):
            np.testing.assert_allclose(float(m_a[k]), float(m_b[k]), rtol=1e-5, err_msg=k)
    # stacked, flatten copied: the state is still readable (and unchanged) before the sync
    for a, b in zip(jax.tree.leaves(st_a.trainable), before, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    step_a.sync(flat_a, st_a)
    step_b.sync(flat_b, st_b)
    assert jax.tree.structure(st_a.trainable) == jax.tree.structure(st_b.trainable)
    assert jax.tree.structure(st_a.opt_state) == jax.tree.structure(st_b.opt_state)
    moved = 0
    for a, b, b0 in zip(jax.tree.leaves(st_a.trainable), jax.tree.leaves(st_b.trainable), before, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
        moved += int(not np.array_equal(np.asarray(a), b0))
    assert moved == n_leaves
    for a, b in zip(jax.tree.leaves(st_a.opt_state), jax.tree.leaves(st_b.opt_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9)
    # the synced state steps on (a resumed loop flattens it again)
    flat_a = step_a.flatten(st_a)
    tr, opt, metrics = step_a(st_a.trainable, st_a.opt_state, st_a.frozen, _batch(config, 9), np.int32(4))
    assert int(metrics["finite"]) == 1
    assert jax.tree.structure(opt) == jax.tree.structure(st_b.opt_state)
