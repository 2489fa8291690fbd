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


def _torch_run(params, grads, active, *, wd, clip):
    """torch.optim.AdamW with clip_grad_norm_; inactive tensors get grad None (PyTorch then skips them)."""
    ps = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in params.items()}
    decay = [p for k, p in ps.items() if p.ndim >= 2]
    no_decay = [p for k, p in ps.items() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1.0, betas=(0.8, 0.99), eps=1e-7, foreach=False)
    norms = []
    for step, (g, on) in enumerate(zip(grads, active, strict=True)):
        for group in opt.param_groups:
            group["lr"] = float(_schedule(step))
        for k, p in ps.items():
            p.grad = torch.tensor(g[k], dtype=torch.float64) if on[k] else None
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(ps.values()), clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    counts = {k: int(opt.state[p]["step"]) if p in opt.state else 0 for k, p in ps.items()}
    return {k: p.detach().numpy() for k, p in ps.items()}, norms, counts


@pytest.mark.parametrize("stacked", [False, True])
def test_clipping_and_adamw_equal_pytorch(x64, stacked):
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 4), "b": (3, 4), "bias": (4,), "k": (2, 5)}
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    n = 6
    grads = [{k: rng.normal(size=s) * (3.0 if i % 2 else 0.1) for k, s in shapes.items()} for i in range(n)]
    # "b" (a matrix shaped like "a": one stack) and "k" sit out some steps, as unrouted expert kernels do
    active = [{"a": True, "bias": True, "b": i % 3 != 1, "k": i in (0, 4)} for i in range(n)]
    want, want_norms, want_counts = _torch_run(params, grads, active, wd=0.1, clip=1.0)
    # in JAX an unused leaf's gradient is exactly zero (the step's forward did not touch it)
    grads = [{k: v if on[k] else np.zeros_like(v) for k, v in g.items()} for g, on in zip(grads, active, strict=True)]

    tx = optax.chain(clip_by_global_norm_torch(1.0),
                     adamw_torch(_schedule, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.1,
                                 mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    p = {k: jnp.asarray(v) for k, v in params.items()}
    if stacked:  # the training step's form: leaves stacked by shape, per-leaf flags as (n,) vectors
        layout = stacking_lib.StackLayout.of(jax.tree.leaves(p))
        assert len(layout.groups) == 3
        to = lambda tree: layout.stack(jax.tree.leaves(tree))  # noqa: E731
        back = lambda st: jax.tree.unflatten(jax.tree.structure(p), layout.unstack(st))  # noqa: E731
        mask_fn = lambda st: st.layout.map_shapes(lambda s: len(s) >= 2)  # noqa: E731
        tx = optax.chain(clip_by_global_norm_torch(1.0),
                         adamw_torch(_schedule, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.1, mask=mask_fn))
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
