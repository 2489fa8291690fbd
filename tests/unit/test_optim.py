"""train.optim against PyTorch itself: clip_grad_norm_ and AdamW, including tensors left without a gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import stacking as stacking_lib
from train.optim import AdamWTorchState, adamw_torch, clip_by_global_norm_torch, find_adamw_state

torch = pytest.importorskip("torch")


def _schedule(i):
    return 0.05 * jnp.minimum(1.0, (jnp.asarray(i, jnp.result_type(float)) + 0.0) / 2.0)


def _torch_run(params, grads, active, *, wd, clip, scales=None):
    """torch.optim.AdamW with clip_grad_norm_; inactive tensors get grad None (PyTorch then skips them); each
    tensor its own parameter group, at ``scales[name]`` (default 1) times the schedule's learning rate."""
    ps = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in params.items()}
    scales = scales or {}
    opt = torch.optim.AdamW([{"params": [p], "weight_decay": wd if p.ndim >= 2 else 0.0, "scale": scales.get(k, 1.0)}
                             for k, p in ps.items()], lr=1.0, betas=(0.8, 0.99), eps=1e-7, foreach=False)
    norms = []
    for step, (g, on) in enumerate(zip(grads, active, strict=True)):
        for group in opt.param_groups:
            group["lr"] = float(_schedule(step)) * group["scale"]
        for k, p in ps.items():
            p.grad = torch.tensor(g[k], dtype=torch.float64) if on[k] else None
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(ps.values()), clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    counts = {k: int(opt.state[p]["step"]) if p in opt.state else 0 for k, p in ps.items()}
    return {k: p.detach().numpy() for k, p in ps.items()}, norms, counts


@pytest.mark.parametrize("stacked, scaled", [(False, False), (True, False), (False, True), (True, True)])
def test_clipping_and_adamw_equal_pytorch(x64, stacked, scaled):
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 4), "b": (3, 4), "bias": (4,), "k": (2, 5)}
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    n = 6
    grads = [{k: rng.normal(size=s) * (3.0 if i % 2 else 0.1) for k, s in shapes.items()} for i in range(n)]
    # "b" (a matrix shaped like "a": one stack) and "k" sit out some steps, as unrouted expert kernels do
    active = [{"a": True, "bias": True, "b": i % 3 != 1, "k": i in (0, 4)} for i in range(n)]
    # scaled: per-tensor learning rates (train.lr_multipliers), as PyTorch's parameter groups with their own lr
    scales = {"b": 3.0, "k": 0.5} if scaled else {}
    want, want_norms, want_counts = _torch_run(params, grads, active, wd=0.1, clip=1.0, scales=scales)
    # in JAX an unused leaf's gradient is exactly zero (the step's forward did not touch it)
    grads = [{k: v if on[k] else np.zeros_like(v) for k, v in g.items()} for g, on in zip(grads, active, strict=True)]

    from train.state import lr_scales

    tx = optax.chain(clip_by_global_norm_torch(1.0),
                     adamw_torch(_schedule, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.1,
                                 mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
                                 lr_scale=(lambda p: lr_scales(p, scales)) if scaled else None))
    p = {k: jnp.asarray(v) for k, v in params.items()}
    if stacked:  # the training step's form: leaves stacked by shape (and name), per-leaf flags as (n,) vectors
        layout = stacking_lib.StackLayout.of(jax.tree.leaves(p), names=stacking_lib.leaf_names(p))
        assert len(layout.groups) == 4  # "a" and "b" share a shape, not a name
        to = lambda tree: layout.stack(jax.tree.leaves(tree))  # noqa: E731
        back = lambda st: jax.tree.unflatten(jax.tree.structure(p), layout.unstack(st))  # noqa: E731
        mask_fn = lambda st: st.layout.map_shapes(lambda s: len(s) >= 2)  # noqa: E731
        tx = optax.chain(clip_by_global_norm_torch(1.0),
                         adamw_torch(_schedule, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.1, mask=mask_fn,
                                     lr_scale=(lambda st: lr_scales(st, scales)) if scaled else None))
        state = tx.init(to(p))
        params_st = to(p)
        for g, on in zip(grads, active, strict=True):
            flags = to({k: jnp.asarray(on[k]) for k in p})
            upd, state = tx.update(to({k: jnp.asarray(v) for k, v in g.items()}), state, params_st, active=flags)
            params_st = optax.apply_updates(params_st, upd)
        got = back(params_st)
        counts = back(find_adamw_state(state).counts)
    else:
        state = tx.init(p)
        for g, on in zip(grads, active, strict=True):
            flags = {k: jnp.asarray(on[k]) for k in p}
            upd, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, p, active=flags)
            p = optax.apply_updates(p, upd)
        got = p
        counts = find_adamw_state(state).counts
    for k in shapes:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=0, atol=1e-12, err_msg=k)
        assert int(counts[k]) == want_counts[k], k
    assert isinstance(find_adamw_state(state), AdamWTorchState)
    assert want_counts == {"a": 6, "bias": 6, "b": 4, "k": 2}
    assert len(want_norms) == n


def test_lr_multipliers_parse_and_name_parameters():
    from train.errors import UserError
    from train.state import parse_lr_multipliers

    assert parse_lr_multipliers("kernels=10, A=0.5") == {"kernels": 10.0, "A": 0.5}
    assert parse_lr_multipliers("") == {}
    for bad in ("kernels", "kernels=0", "kernels=x", "=2"):
        with pytest.raises(UserError, match="is not NAME=FACTOR"):
            parse_lr_multipliers(bad)
    tree = {"adapter": {"kernels": [jnp.ones(2), jnp.ones(3)], "A": jnp.ones((2, 2))}}
    assert stacking_lib.leaf_names(tree) == ["A", "kernels", "kernels"]


def test_inactive_leaf_is_untouched_and_clip_rejects_bad_norm(x64):
    tx = adamw_torch(0.1, weight_decay=0.5, mask=lambda p: jax.tree.map(lambda _: True, p))
    p = {"w": jnp.ones((2, 2))}
    state = tx.init(p)
    upd, new = tx.update({"w": jnp.ones((2, 2))}, state, p, active={"w": jnp.asarray(False)})
    assert not np.any(np.asarray(upd["w"]))
    assert int(new.counts["w"]) == 0 and not np.any(np.asarray(new.mu["w"])) and int(new.count) == 1
    with pytest.raises(ValueError, match="max_norm=0"):
        clip_by_global_norm_torch(0)


def test_from_hf_batch_shifts_causal_labels_and_keeps_positions():
    from ept_jax.data.batching import from_hf_batch

    hf = {"input_ids": np.array([[1, 5, 6, 2, 2, 1, 7]]), "attention_mask": np.array([[1, 1, 1, 0, 0, 1, 1]]),
          "labels": np.array([[-100, -100, -100, -100, -100, 1, 7]]), "task_ids": np.array([3])}
    b = from_hf_batch(hf, family="llama", pad_id=2)
    np.testing.assert_array_equal(b["labels"][0], [2, 2, 2, 2, 1, 7, 2])
    np.testing.assert_array_equal(b["label_mask"][0], [0, 0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(b["positions"][0], np.arange(7))
    t5 = from_hf_batch({**hf, "decoder_input_ids": hf["input_ids"]}, family="t5")
    np.testing.assert_array_equal(t5["labels"][0], [0, 0, 0, 0, 0, 1, 7])
    assert "positions" not in t5
    with pytest.raises(ValueError, match="lacks \\['decoder_input_ids'\\]"):
        from_hf_batch(hf, family="t5")


def test_lr_multipliers_reach_the_training_steps_stacks():
    """``train.lr_multipliers`` on the smoke model as the training step stacks it (``train.stacking.Stacking``:
    leaves grouped by shape and parameter name): one optimizer update of the stacks equals the per-leaf update,
    whose kernels moved 4x as far as without the multiplier; an unknown name is refused."""
    from flax import nnx

    from configs import smoke
    from ept_jax.core import sharding
    from ept_jax.core.params import TRAINABLE
    from train import state as state_lib
    from train.errors import UserError

    config = smoke.get_config()
    config.train.warmup_steps = 0
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    model = state_lib.build_model(config)
    trainable = nnx.state(model, TRAINABLE)
    grads = jax.tree.map(lambda x: jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) + 1.0), trainable)

    def update(multipliers, stacked):
        config.train.lr_multipliers = multipliers
        state_lib.check_lr_multipliers(config, trainable)
        tx, _ = state_lib.make_optimizer(config)
        state = state_lib.create_train_state(model, tx, mesh)
        if not stacked:
            return jax.jit(lambda g, o, p: tx.update(g, o, p)[0])(grads, state.opt_state, state.trainable)
        st = stacking_lib.Stacking(state.trainable, state.opt_state, *state.shardings[:2])
        assert set(st.layout.names) >= {"kernels", "A", "B"}
        tr, opt = (jax.tree.unflatten(d, x) for d, x in zip((st.tr_def, st.opt_def),
                                                             st.stack(state.trainable, state.opt_state), strict=True))
        upd = jax.jit(lambda g, o, p: tx.update(g, o, p)[0])(st.layout.stack(jax.tree.leaves(grads)), opt, tr)
        return jax.tree.unflatten(jax.tree.structure(trainable), st.layout.unstack(upd))

    plain, scaled, scaled_stacked = update("", False), update("kernels=4", False), update("kernels=4", True)
    names = stacking_lib.leaf_names(trainable)
    assert "kernels" in names
    for name, a, b, c in zip(names, *(jax.tree.leaves(t) for t in (plain, scaled, scaled_stacked)), strict=True):
        np.testing.assert_allclose(np.asarray(b), (4.0 if name == "kernels" else 1.0) * np.asarray(a), rtol=1e-5,
                                   atol=1e-12, err_msg=name)
        np.testing.assert_allclose(np.asarray(c), np.asarray(b), rtol=1e-5, atol=1e-10, err_msg=name)
    config.train.lr_multipliers = "kernel=2"
    with pytest.raises(UserError, match=r"train.lr_multipliers names \['kernel'\], which no trainable"):
        state_lib.check_lr_multipliers(config, trainable)
