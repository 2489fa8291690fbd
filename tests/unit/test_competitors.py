"""MoRE, MOELoRA (release) and T-REX (``ept_jax.competitors``) against closed-form float64 numpy, and in the harness.

Each layer's forward (under jit), merge and LoRA factors match the issue's formulas to 1e-10; MoRE's release gate
gets no gradient and its paper gate does; MOELoRA's router is one set of parameters per model that every layer
trains; T-REX refuses to merge and export; each kind trains end to end through ``train.main`` on the smoke config
and ``train.inspect`` counts its parameters (T5-base numbers for MoRE and MOELoRA).
"""

from __future__ import annotations

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ept_jax import adapters as ad
from ept_jax.adapters.base import adapted_linears
from ept_jax.adapters.inject import Injection, inject
from ept_jax.adapters.moelora import MOELoRAReleaseAdapter, MOELoRARouter
from ept_jax.adapters.more import MORE_N_EXPERTS, FixedRouting, MoREAdapter
from ept_jax.adapters.trex import (
    TREX_NOT_MERGEABLE,
    TREX_RELEASE_ROUTER_SCALE,
    TREX_RELEASE_SEMANTIC_SCALE,
    TREXAdapter,
)
from ept_jax.core.params import AdapterContext, AdapterParam

REPO = Path(__file__).resolve().parents[2]
TOL = dict(atol=1e-10, rtol=1e-10)
D_IN, D_OUT = 12, 10
BATCH, SEQ = 3, 4
TASKS = np.array([0, 2, 1])


@pytest.fixture(scope="module", autouse=True)
def x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


def _cfg(kind, **kw):
    return ad.AdapterConfig(kind=kind, **{**dict(param_dtype="float64", n_tasks=3, dropout=0.0), **kw})


def _randomize(module, seed, skip=()):
    """Every AdapterParam of ``module`` set to N(0, 0.5^2) (B and zero-initialised routers included)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(module):
        if isinstance(var, AdapterParam) and not any(s in path for s in skip):
            var[...] = jnp.asarray(rng.normal(0.0, 0.5, var.shape), var[...].dtype)


def _x(seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((BATCH, SEQ, D_IN)), jnp.float64)


def _jit_forward(adapter, x, ctx):
    graphdef, state = nnx.split(adapter)
    return jax.jit(lambda s, x, c: nnx.merge(graphdef, s)(x, c))(state, x, ctx)


def _np(a):
    return np.asarray(a, np.float64)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------------------------------------------ MoRE


def _more_closed_form(adapter, x, tasks, k):
    """``(alpha / r) * sum_{j <= k_t} ((j + 1) / 8)^2 * b_j a_j^T x`` for every example (numpy, float64)."""
    A, B, cfg = _np(adapter.A[...]), _np(adapter.B[...]), adapter.cfg
    out = np.zeros(x.shape[:-1] + (D_OUT,))
    for n, t in enumerate(tasks):
        for j in range(min(int(k[t]), cfg.r - 1) + 1):
            out[n] += cfg.alpha / cfg.r * ((j + 1) / 8) ** 2 * np.outer(_np(x[n]) @ A[j], B[:, j])
    return out


def _more_numpy_k(adapter):
    logits = _np(adapter.task_embedding[...]) @ _np(adapter.gate_w[...]).T + _np(adapter.gate_b[...])
    return np.argmax(_softmax(logits), axis=-1)


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_more_matches_closed_form(variant):
    a = MoREAdapter(_cfg("more", variant=variant, r=6, alpha=12.0), D_IN, D_OUT, rngs=nnx.Rngs(0))
    chex.assert_shape([a.A[...], a.B[...], a.gate_w[...], a.gate_b[...], a.task_embedding[...]],
                      [(6, D_IN), (D_OUT, 6), (8, D_IN), (8,), (8, D_IN)])
    assert float(jnp.abs(a.B[...]).max()) == 0.0  # B starts at zero
    k0 = _more_numpy_k(a)
    _randomize(a, 3)
    # a wide task embedding, so that the tasks' gate logits (not the shared bias) decide the routing
    a.task_embedding[...] = jnp.asarray(np.random.default_rng(4).normal(0.0, 3.0, (8, D_IN)))
    if variant == "reference":
        # k_t stays what the gate chose at first use, whatever the gate has become since
        np.testing.assert_array_equal(np.asarray(a.expert[...]), k0)
        a.fix_routing()  # re-route from the randomised gate, so the batch's tasks take different experts
    k = _more_numpy_k(a)
    assert len(set(k[TASKS].tolist())) > 1  # the batch's tasks route differently
    x = _x()
    ctx = AdapterContext(task_ids=jnp.asarray(TASKS))
    y = _jit_forward(a, x, ctx)
    chex.assert_trees_all_close(_np(y), _more_closed_form(a, x, TASKS, k), **TOL)
    for t in range(3):
        A, B = _np(a.A[...]), _np(a.B[...])
        want = sum(12.0 / 6 * ((j + 1) / 8) ** 2 * np.outer(B[:, j], A[j]) for j in range(min(int(k[t]), 5) + 1))
        chex.assert_trees_all_close(_np(a.merge(t)), want, **TOL)
        f_b, f_a = a.to_lora(t)
        chex.assert_shape([f_b, f_a], [(D_OUT, 6), (6, D_IN)])
        chex.assert_trees_all_close(_np(f_b @ f_a), _np(a.merge(t)), **TOL)
    row = jnp.asarray(TASKS)
    per_task = jnp.stack([x[n] @ a.merge(int(t)).T for n, t in enumerate(row)])
    chex.assert_trees_all_close(_np(per_task), _np(y), **TOL)


def test_more_release_fixes_k_and_paper_routes_each_call():
    ref = MoREAdapter(_cfg("more", variant="reference"), D_IN, D_OUT, rngs=nnx.Rngs(1))
    assert isinstance(ref.expert, FixedRouting) and not isinstance(ref.expert, nnx.Param)
    k0 = np.asarray(ref.gate_choice())
    np.testing.assert_array_equal(np.asarray(ref.expert[...]), k0)  # chosen from the initial gate
    # the release's quirk: E ~ N(0, 0.01^2) is tiny, so the gate bias decides and every task takes one expert
    assert len(set(k0.tolist())) == 1
    _randomize(ref, 5)
    np.testing.assert_array_equal(np.asarray(ref.expert[...]), k0)  # a changed gate changes nothing
    assert not np.array_equal(np.asarray(ref.gate_choice()), k0)
    ref.fix_routing()  # what importing trained weights calls
    np.testing.assert_array_equal(np.asarray(ref.expert[...]), _more_numpy_k(ref))
    paper = MoREAdapter(_cfg("more", variant="paper"), D_IN, D_OUT, rngs=nnx.Rngs(1))
    assert paper.expert is None
    with pytest.raises(ValueError, match="only the reference variant"):
        paper.fix_routing()
    with pytest.raises(ValueError, match="r=9: .*accepted 1 <= r <= 8"):
        ad.make_adapter(_cfg("more", r=9), D_IN, D_OUT, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="variant='x'"):
        ad.make_adapter(_cfg("more", variant="x"), D_IN, D_OUT, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("variant, gate_trains", [("reference", False), ("paper", True)])
def test_more_gate_gradient(variant, gate_trains):
    a = MoREAdapter(_cfg("more", variant=variant), D_IN, D_OUT, rngs=nnx.Rngs(2))
    _randomize(a, 4, skip=("gate_w", "gate_b", "task_embedding"))  # keep the gate's softmax unsaturated
    graphdef, params, rest = nnx.split(a, AdapterParam, ...)
    x, ctx = _x(), AdapterContext(task_ids=jnp.asarray(TASKS))

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(x, ctx) ** 2)

    g = jax.jit(jax.grad(loss))(params)
    gate = float(jnp.abs(g["gate_w"][...]).max() + jnp.abs(g["gate_b"][...]).max())
    assert (gate > 1e-8) == gate_trains, gate
    assert float(jnp.abs(g["A"][...]).max()) > 1e-8 and float(jnp.abs(g["B"][...]).max()) > 1e-8
    # the task embedding trains through the contrastive loss (in both variants)
    ge = jax.grad(lambda e: pyramid_loss(a, x, e))(a.task_embedding[...])
    assert float(jnp.abs(ge).max()) > 1e-8


def pyramid_loss(a, x, emb):
    from ept_jax.adapters import pyramid

    return pyramid.contrastive_loss(x[:, 0, :], emb, jnp.asarray(TASKS), a.cfg.contrastive_tau)


def test_more_contrastive_loss_is_epts_reference():
    a = MoREAdapter(_cfg("more"), D_IN, D_OUT, rngs=nnx.Rngs(0))
    x = _x(7)
    x0, e = _np(x[:, 0, :]), _np(a.task_embedding[...])
    cos = (x0 / np.linalg.norm(x0, axis=1, keepdims=True)) @ (e / np.linalg.norm(e, axis=1, keepdims=True)).T
    logp = np.log(_softmax(cos / 0.05))
    want = -np.mean(logp[np.arange(BATCH), TASKS])
    chex.assert_trees_all_close(_np(a.contrastive_loss(x, jnp.asarray(TASKS))), want, **TOL)


# -------------------------------------------------------------------------------------------------- MOELoRA


def _moelora_closed_form(adapter, x, tasks):
    """``(alpha / r) * sum_i w_i(t) B_i A_i x`` with ``w(t) = softmax(E[t + 1] @ G.T)`` (numpy, float64)."""
    r = adapter.router
    w = _softmax(_np(r.task_embedding[...]) @ _np(r.gate_w[...]).T)
    A, B = _np(adapter.A[...]), _np(adapter.B[...])
    out = np.zeros(x.shape[:-1] + (B.shape[1],))
    for n, t in enumerate(tasks):
        for i in range(A.shape[0]):
            out[n] += adapter.cfg.scale * w[t + 1, i] * (_np(x[n]) @ A[i].T @ B[i].T)
    return out


def _tiny_t5(adapter_cfg, targets=("q", "v", "wi")):
    from ept_jax.models.t5 import T5Config, T5Model

    arch = dict(vocab_size=40, d_model=D_IN, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1, num_heads=3,
                relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="relu",
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    inj = Injection(adapter=adapter_cfg, targets=targets, contrastive_stacks=())
    return inject(T5Model(T5Config.from_hf(arch), dtype="float32", param_dtype="float32", rngs=nnx.Rngs(0)), inj,
                  rngs=0)


def test_moelora_release_matches_closed_form():
    cfg = _cfg("moelora_release", r=16, n_moe_experts=8, alpha=32.0)
    a = MOELoRAReleaseAdapter(cfg, D_IN, D_OUT, rngs=nnx.Rngs(0))
    chex.assert_shape([a.A[...], a.B[...], a.router.gate_w[...], a.router.task_embedding[...]],
                      [(8, 2, D_IN), (8, D_OUT, 2), (8, 64), (4, 64)])
    assert 0.005 < float(jnp.std(a.A[...])) < 0.02 and float(jnp.abs(a.B[...]).max()) == 0.0
    _randomize(a, 6)
    x, ctx = _x(), AdapterContext(task_ids=jnp.asarray(TASKS))
    y = _jit_forward(a, x, ctx)
    chex.assert_trees_all_close(_np(y), _moelora_closed_form(a, x, TASKS), **TOL)
    for t in range(3):
        f_b, f_a = a.to_lora(t)
        chex.assert_shape([f_b, f_a], [(D_OUT, 16), (16, D_IN)])
        chex.assert_trees_all_close(_np(f_b @ f_a), _np(a.merge(t)), **TOL)
    per_task = jnp.stack([x[n] @ a.merge(int(t)).T for n, t in enumerate(TASKS)])
    chex.assert_trees_all_close(_np(per_task), _np(y), **TOL)
    assert a.contrastive_loss(x, jnp.asarray(TASKS)) is None  # no auxiliary loss


def test_moelora_release_router_is_shared_once_and_trained_by_every_layer():
    from train.checkpointing import flat_paths, from_nested, to_nested

    model = _tiny_t5(_cfg("moelora_release", r=8, n_moe_experts=4))
    lins = adapted_linears(model)
    assert len(lins) == 3 + 5  # encoder: q, v, wi; decoder: q, v (self), q, v (cross), wi
    routers = {id(lin.adapter.router) for _, lin in lins}
    assert len(routers) == 1 and isinstance(lins[0][1].adapter.router, MOELoRARouter)
    graphdef, trainable, frozen = nnx.split(model, AdapterParam, ...)
    names = ["/".join(k) for k in flat_paths(trainable)]
    assert sum(n.endswith("router/gate_w") for n in names) == 1
    assert sum(n.endswith("router/task_embedding") for n in names) == 1
    assert len(names) == 2 * len(lins) + 2  # A, B per Linear + one router
    # checkpoints hold it once and restore it into the shared object
    nested = to_nested(trainable)
    back = from_nested(trainable, nested)
    restored = nnx.merge(graphdef, back, frozen)
    assert len({id(lin.adapter.router) for _, lin in adapted_linears(restored)}) == 1
    from ept_jax.adapters.inspection import parameter_summary

    s = parameter_summary(model, 3)
    assert s["by_kind"]["gate"] == 4 * 64 and s["by_kind"]["task_embedding"] == 4 * 64  # counted once

    _randomize(model, 8, skip=("gate_w", "task_embedding"))
    x, ctx = _x(), AdapterContext(task_ids=jnp.asarray(TASKS))
    for i, (_, lin) in enumerate(lins):
        d_in = lin.base.kernel.shape[0]
        xi = x if d_in == D_IN else jnp.tile(x, (1, 1, d_in // D_IN + 1))[..., :d_in]

        def loss(p, i=i, xi=xi):
            m = nnx.merge(graphdef, p, frozen)
            return jnp.sum(adapted_linears(m)[i][1].adapter(xi, ctx) ** 2)

        g = flat_paths(jax.grad(loss)(trainable))
        grads = {"/".join(k): v for k, v in g.items()}
        gate = next(v for k, v in grads.items() if k.endswith("router/gate_w"))
        assert float(jnp.abs(gate).max()) > 1e-8, lin.name  # this layer trains the one shared gate


# ---------------------------------------------------------------------------------------------------- T-REX


# The coefficients each variant must use, written out by hand: the release (peft/src/peft/tuners/lora.py,
# Linear.forward, rank1_flex) hard-codes token_coefficient = 32 and task_coefficient = 4 whatever (r1, r2);
# the paper variant scales them as r1 * r2 and r1.
def _trex_coefficients(variant, r1, r2):
    return (32.0, 4.0) if variant == "reference" else (float(r1 * r2), float(r1))


def _trex_closed_form(adapter, x, s, c_tok, c_sem):
    """Per token: ``g * B R^T (A x)``, ``R = softmax(W x) omega c_tok + s (1 - omega) c_sem`` (numpy, float64)."""
    r1, r2 = adapter.cfg.trex_r1, adapter.cfg.trex_r2
    A, B, W = _np(adapter.A[...]), _np(adapter.B[...]), _np(adapter.router_w[...])
    omega = 1.0 / (1.0 + np.exp(-100.0 * float(adapter.w_omg[...])))
    g = 1.0 / (1.0 + np.exp(-100.0 * float(adapter.w_g[...])))
    out = np.zeros(x.shape[:-1] + (D_OUT,))
    for n in range(x.shape[0]):
        for t in range(x.shape[1]):
            xt = _np(x[n, t])
            R = (_softmax(W @ xt) * omega * c_tok + s[n] * (1 - omega) * c_sem).reshape(r1, r2)
            out[n, t] = g * (B @ (R.T @ (A @ xt)))
    return out


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_trex_matches_closed_form_and_refuses_to_merge(variant):
    cfg = _cfg("trex", variant=variant, trex_r1=3, trex_r2=5)
    c_tok, c_sem = _trex_coefficients(variant, 3, 5)
    a = TREXAdapter(cfg, D_IN, D_OUT, rngs=nnx.Rngs(0))
    chex.assert_shape([a.A[...], a.B[...], a.router_w[...], a.w_omg[...], a.w_g[...]],
                      [(3, D_IN), (D_OUT, 5), (15, D_IN), (), ()])
    assert all(float(jnp.abs(v[...]).max()) == 0.0 for v in (a.B, a.router_w, a.w_omg, a.w_g))
    assert ad.count_params(a) == 3 * D_IN + D_OUT * 5 + 15 * D_IN + 2
    _randomize(a, 9)
    a.w_omg[...] = jnp.asarray(0.004)  # omega = sigmoid(0.4): both the router and the semantic term count
    a.w_g[...] = jnp.asarray(-0.003)
    x = _x()
    s = np.random.default_rng(3).standard_normal((BATCH, 15))
    y = _jit_forward(a, x, AdapterContext(task_ids=jnp.asarray(TASKS), semantic=jnp.asarray(s)))
    chex.assert_trees_all_close(_np(y), _trex_closed_form(a, x, s, c_tok, c_sem), **TOL)
    y0 = _jit_forward(a, x, AdapterContext(task_ids=jnp.asarray(TASKS)))  # semantic None = zeros
    chex.assert_trees_all_close(_np(y0), _trex_closed_form(a, x, np.zeros((BATCH, 15)), c_tok, c_sem), **TOL)
    # the delta depends on the token, not only the task: two tokens of one example do not share one matrix
    assert not a.mergeable
    for fn in (a.merge, a.to_lora):
        with pytest.raises(ValueError, match="routes every token"):
            fn(0)
    with pytest.raises(ValueError, match=r"ctx.semantic of shape \(3, 4\).*\(3, 15\)"):
        a(x, AdapterContext(task_ids=jnp.asarray(TASKS), semantic=jnp.zeros((3, 4))))
    with pytest.raises(ValueError, match="trex_r1=0"):
        ad.make_adapter(_cfg("trex", trex_r1=0), D_IN, D_OUT, rngs=nnx.Rngs(0))
    assert "no per-task weight delta" in TREX_NOT_MERGEABLE


def _trex_randomized(variant, r1, r2, seed=11):
    a = TREXAdapter(_cfg("trex", variant=variant, trex_r1=r1, trex_r2=r2), D_IN, D_OUT, rngs=nnx.Rngs(0))
    _randomize(a, seed)
    a.w_omg[...] = jnp.asarray(0.004)  # omega = sigmoid(0.4): both terms count
    a.w_g[...] = jnp.asarray(0.002)
    return a


def test_trex_reference_uses_the_release_constants_at_any_allocation():
    """At r1 = 2, r2 = 3 the release still computes 32 * softmax * omega + 4 * s * (1 - omega); paper: 6 and 2."""
    assert (TREX_RELEASE_ROUTER_SCALE, TREX_RELEASE_SEMANTIC_SCALE) == (32.0, 4.0)
    r1, r2 = 2, 3
    x = _x(5)
    s = np.random.default_rng(4).standard_normal((BATCH, r1 * r2))
    ctx = AdapterContext(task_ids=jnp.asarray(TASKS), semantic=jnp.asarray(s))
    ys = {}
    for variant, (c_tok, c_sem) in (("reference", (32.0, 4.0)), ("paper", (6.0, 2.0))):
        a = _trex_randomized(variant, r1, r2)
        ys[variant] = _np(_jit_forward(a, x, ctx))
        chex.assert_trees_all_close(ys[variant], _trex_closed_form(a, x, s, c_tok, c_sem), **TOL)
        # the routing weights themselves, token (0, 0): R = softmax(W x) omega c_tok + s (1 - omega) c_sem
        omega = 1.0 / (1.0 + np.exp(-0.4))
        xt = _np(x[0, 0])
        want = _softmax(_np(a.router_w[...]) @ xt) * omega * c_tok + s[0] * (1.0 - omega) * c_sem
        got = _np(a.routing(x, jnp.asarray(s)))[0, 0]
        chex.assert_trees_all_close(got, want.reshape(r1, r2), **TOL)
    # same parameters (same seeds), different coefficients: the variants really differ away from (4, 8)
    assert np.abs(ys["reference"] - ys["paper"]).max() > 1e-3


def test_trex_variants_agree_at_the_release_allocation():
    x = _x(6)
    s = np.random.default_rng(7).standard_normal((BATCH, 32))
    ctx = AdapterContext(task_ids=jnp.asarray(TASKS), semantic=jnp.asarray(s))
    ref, paper = (_trex_randomized(v, 4, 8) for v in ("reference", "paper"))
    y_ref, y_paper = _np(_jit_forward(ref, x, ctx)), _np(_jit_forward(paper, x, ctx))
    chex.assert_trees_all_close(y_ref, _trex_closed_form(ref, x, s, 32.0, 4.0), **TOL)
    chex.assert_trees_all_close(y_paper, y_ref, **TOL)


def test_trex_refuses_an_unknown_variant():
    with pytest.raises(ValueError, match=r"variant='release'.*\('reference', 'paper'\).*T-REX"):
        ad.make_adapter(_cfg("trex", variant="release"), D_IN, D_OUT, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="variant='x'"):
        TREXAdapter(_cfg("trex", variant="x"), D_IN, D_OUT, rngs=nnx.Rngs(0))


def test_trex_export_is_refused_with_the_reason(tmp_path):
    from ept_jax.checkpoints import export

    model = _tiny_t5(_cfg("trex"), targets=("q",))
    for fmt in export.FORMATS:
        with pytest.raises(export.ExportError, match="TREXAdapter is not mergeable .*depends on each token"):
            export.export_adapter(model, tmp_path / fmt, 0, format=fmt, base_model_name_or_path="base")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------- parameter counts


def test_parameter_counts_per_linear():
    r = 8
    more = MoREAdapter(_cfg("more", r=r), D_IN, D_OUT, rngs=nnx.Rngs(0))
    assert ad.count_params(more) == r * D_IN + D_OUT * r + MORE_N_EXPERTS * (D_IN + 1) + 8 * D_IN
    moe = MOELoRAReleaseAdapter(_cfg("moelora_release", r=16), D_IN, D_OUT, rngs=nnx.Rngs(0))
    assert ad.count_params(moe) == 16 * D_IN + D_OUT * 16 + 8 * 64 + 4 * 64  # with its own (unshared) router


def _inspect_config(kind, arch, targets, tasks, **adapter):
    import ml_collections

    c = ml_collections.ConfigDict()
    c.model = dict(family="t5", name_or_path="not-a-local-dir", arch=arch, dtype="float32", param_dtype="float32")
    c.adapter = {**dict(kind=kind, variant="reference", r=8, alpha=32.0, dropout=0.1, targets=targets,
                        contrastive_lambda=0.1), **adapter}
    c.data = dict(tasks=tasks)
    c.train = dict(seed=0)
    return c


def test_inspect_t5_base_more_and_moelora_release():
    from configs import archs
    from train.inspect import summarize

    glue = ["mnli", "qqp", "qnli", "sst2", "stsb", "mrpc", "rte", "cola"]
    targets = ("q", "k", "v", "o", "wi", "wo")
    # sum over the 192 adapted Linears of d_in (= of d_out): 12 * (5 * 768 + 3072 + 9 * 768 + 3072)
    sum_d = 202_752
    s = summarize(_inspect_config("more", archs.T5_BASE, targets, glue))
    assert s["adapted_linears"] == 192
    assert s["by_kind"] == {"A": 8 * sum_d, "B": 8 * sum_d, "kernels": 0, "gate": 8 * sum_d + 8 * 192,
                            "task_embedding": 8 * sum_d, "other": 0}
    assert s["trainable"] == 6_489_600
    assert s["trainable_per_task"] == 405_504  # (A + B) / 8 tasks, the paper's params/task: 0.41M
    m = summarize(_inspect_config("moelora_release", archs.T5_BASE, targets, glue, r=16))
    assert m["by_kind"]["A"] == m["by_kind"]["B"] == 16 * sum_d
    assert m["by_kind"]["gate"] == 8 * 64 and m["by_kind"]["task_embedding"] == 9 * 64  # one router, (8 + 1) rows
    assert m["trainable_per_task"] == 811_008  # 0.81M


# ------------------------------------------------------------------------------------------ train.inspect


@pytest.mark.parametrize("kind", ["more", "moelora_release", "trex"])
def test_inspect_counts_each_kind(kind):
    """train.inspect's summary of the smoke config with each kind (in process: the CLI is tested in
    tests/e2e/test_inspect.py; each kind's ``python -m train.main`` run: tests/e2e/test_competitors_configs.py)."""
    from configs.smoke import get_config
    from train.inspect import summarize

    config = get_config()
    config.adapter.kind = kind
    s = summarize(config)
    n_lin, d = 12, 64  # smoke: q and v (64 -> 64) of 2 encoder + 2 x 2 decoder attention blocks
    assert s["adapted_linears"] == n_lin and s["adapter"] == kind
    want = {
        "more": {"A": n_lin * 8 * d, "B": n_lin * 8 * d, "gate": n_lin * 8 * (d + 1), "task_embedding": n_lin * 8 * d},
        "moelora_release": {"A": n_lin * 8 * d, "B": n_lin * 8 * d, "gate": 8 * 64, "task_embedding": 5 * 64},
        "trex": {"A": n_lin * 4 * d, "B": n_lin * 8 * d, "gate": n_lin * 32 * d, "other": n_lin * 2},
    }[kind]
    assert {k: v for k, v in s["by_kind"].items() if v} == want
