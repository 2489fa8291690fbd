"""Adapter modules: EPT (both variants, all ablation switches) and the baselines, through the Adapter interface."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ept_jax import adapters as ad
from ept_jax.adapters.base import AdaptedLinear
from ept_jax.adapters.dcft import DCFTAdapter
from ept_jax.adapters.inject import Injection, inject
from ept_jax.adapters.lora import LoRAAdapter
from ept_jax.adapters.moelora import MoELoRAAdapter
from ept_jax.core.dropout import keep_mask
from ept_jax.core.linear import Linear
from ept_jax.core.params import AdapterContext, AdapterParam, logical_axes, pop_aux_losses

TOL = dict(atol=1e-10, rtol=1e-10)
# One pair of dimensions and kernel sizes per expansion, reused everywhere so that initialisers and paths compile
# once per shape (the default eight-expert pyramids are covered in test_pyramid.py and the release fixtures).
REF_DIMS = (64, 40)  # 6 divides neither: the padding path (64 // 6 = 10 input columns, 6 * 6 = 36 < 40 rows)
REF_KS = (2, 6, 6, 8)
PAPER_DIMS = (48, 24)  # divisible by every kernel size used
PAPER_KS = (2, 4, 4, 6)


@pytest.fixture(scope="module", autouse=True)
def x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


def _x(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float64)


# Every eager call uses inputs of this shape and four task ids: eager ops compile once per shape and process.
BATCH, SEQ = 4, 3
TASKS = jnp.array([0, 5, 2, 5])


def _inputs(seed, d_in):
    return _x(seed, (BATCH, SEQ, d_in))


@pytest.fixture(scope="module")
def ref_adapter(x64):
    return _build(_cfg(variant="reference"), *REF_DIMS)


@pytest.fixture(scope="module")
def paper_adapter(x64):
    return _build(_cfg(variant="paper"), *PAPER_DIMS, randomize_kernels=True)


def _cfg(**kw):
    base = dict(param_dtype="float64", r=4, alpha=8.0)
    if kw.get("kind", "ept") == "ept":
        base["expert_kernel_sizes"] = PAPER_KS if kw.get("variant") == "paper" else REF_KS
    base.update(kw)
    return ad.AdapterConfig(**base)


def _build(cfg, d_in, d_out, seed=0, randomize_kernels=False):
    a = ad.make_adapter(cfg, d_in, d_out, rngs=nnx.Rngs(seed))
    if randomize_kernels:  # paper kernels start at zero; the equivalences are only meaningful away from it
        for e, k in enumerate(a.kernels):
            k[...] = _x(100 + e, k.shape)
    return a


def _jitted(a, method):
    """``method(module, *args)`` under ``jax.jit`` over the module's split state."""
    graphdef, state = nnx.split(a)
    fn = jax.jit(lambda state, *args: method(nnx.merge(graphdef, state), *args))
    return lambda *args: fn(state, *args)


# ------------------------------------------------------------------------------------------- param counts


@pytest.mark.parametrize("d_in,d_out,want", [(768, 768, 24_584), (768, 3072, 52_232), (3072, 768, 70_664)])
def test_parameter_counts_match_the_release(d_in, d_out, want):
    cfg = ad.AdapterConfig(r=8, alpha=32.0, expert_kernel_sizes=(2, 2, 4, 4, 6, 6, 8, 8))
    a = nnx.eval_shape(lambda: ad.make_adapter(cfg, d_in, d_out, rngs=nnx.Rngs(0)))
    assert ad.count_params(a) == want


def test_baseline_parameter_counts():
    def count(**kw):
        cfg = ad.AdapterConfig(r=8, **kw)
        return ad.count_params(nnx.eval_shape(lambda: ad.make_adapter(cfg, 768, 3072, rngs=nnx.Rngs(0))))

    assert count(kind="lora") == 8 * (768 + 3072)
    # experts of rank 1 share LoRA's budget; router: gate (8, 64) + task embedding (8, 64)
    assert count(kind="moelora") == 8 * (768 + 3072) + 8 * 64 + 8 * 64
    assert count(kind="dcft") == 8 * (384 + 1536) + 2 * 2
    assert count(kind="dcft", expert_kernel_sizes=(4,)) == 8 * (192 + 768) + 4 * 4


# ------------------------------------------------------------------------------------ exactness of paths

EPT_CASES = {
    "reference": dict(variant="reference"),
    "reference-no-alp": dict(variant="reference", alp=False),
    "reference-dense-scaled": dict(variant="reference", top_k=None, dim_scaling=True),
    "paper": dict(variant="paper"),
    "paper-no-alp-dense-scaled": dict(variant="paper", alp=False, top_k=None, dim_scaling=True),
}


def _dims(kw):
    return REF_DIMS if kw["variant"] == "reference" else PAPER_DIMS


MERGED_TASKS = (0, 2, 5)


def _paths(a, x, task_ids, paths):
    ctx = AdapterContext(task_ids=task_ids)
    return [a.apply(x, ctx, p) for p in paths], jnp.stack([a.merge(t) for t in MERGED_TASKS])


@pytest.mark.parametrize("name", list(EPT_CASES))
def test_ept_forward_matches_merge_and_to_lora(name):
    """The module wiring (routing, alpha / r, expert scales, task gather) agrees across forward, merge, to_lora.

    The paths' agreement with the conv_transpose definitions, eagerly and under jit, is in test_pyramid.py
    (the path dispatch of ``apply`` is exercised by the DCFT test); here the fast path runs under jit.
    """
    kw = EPT_CASES[name]
    d_in, d_out = _dims(kw)
    a = _build(_cfg(**kw), d_in, d_out, randomize_kernels=True)
    x, task_ids = _inputs(1, d_in), TASKS
    outs, merged = _jitted(a, lambda m, x, t: _paths(m, x, t, ("fast",)))(x, task_ids)
    rows = jnp.array([MERGED_TASKS.index(int(t)) for t in task_ids])
    want = jnp.einsum("bsi,boi->bso", x, merged[rows])
    assert float(jnp.abs(want).max()) > 1e-3  # not trivially zero
    for y in outs:
        chex.assert_shape(y, (BATCH, SEQ, d_out))
        chex.assert_trees_all_close(y, want, **TOL)
    # exact low-rank factors of a task's delta, with the stated rank
    top_k = kw.get("top_k", 2) or a.pyramid.n_experts
    f_b, f_a = a.to_lora(5)
    routed = np.asarray(a.routing()[1][5])
    rank = 4 * top_k if kw["variant"] == "reference" else sum(4 * a.pyramid.kernel_sizes[e] for e in routed)
    chex.assert_shape((f_b, f_a), [(d_out, rank), (rank, d_in)])
    chex.assert_trees_all_close(f_b @ f_a, merged[2], **TOL)


def test_homogeneous_ept_is_a_kernel_size_tuple():
    cfg = ad.AdapterConfig(expert_kernel_sizes=(4,) * 8)
    a = nnx.eval_shape(lambda: ad.make_adapter(cfg, 768, 768, rngs=nnx.Rngs(0)))
    assert a.pyramid.groups == ((4, tuple(range(8))),)  # one seed slice, one effective kernel per task
    assert [k.shape for k in a.kernels] == [(192, 4)] * 8


def test_reference_to_lora_under_jit_with_traced_task(ref_adapter):
    a = ref_adapter
    f_b, f_a = _jitted(a, lambda m, t: m.to_lora(t))(jnp.int32(3))
    chex.assert_shape((f_b, f_a), [(REF_DIMS[1], 8), (8, REF_DIMS[0])])
    chex.assert_trees_all_close(f_b @ f_a, a.merge(3), **TOL)


def test_paper_to_lora_needs_a_concrete_task(paper_adapter):
    a = paper_adapter
    with pytest.raises(ValueError, match="concrete task"):
        _jitted(a, lambda m, t: m.to_lora(t))(jnp.int32(1))


# ------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_gradients_finite_and_only_routed_kernels_learn(variant, ref_adapter, paper_adapter):
    a = ref_adapter if variant == "reference" else paper_adapter
    graphdef, params, rest = nnx.split(a, AdapterParam, ...)
    x = _inputs(2, a.d_in)

    def loss(params, task_ids):
        m = nnx.merge(graphdef, params, rest)
        y = m(x, AdapterContext(task_ids=task_ids))
        return jnp.sum(y**2) + m.contrastive_loss(x, task_ids)

    grad = jax.jit(jax.grad(loss))
    idx = np.asarray(a.routing()[1])
    for task_ids in (jnp.array([3, 3, 3, 3]), jnp.array([1, 6, 1, 1])):
        g = grad(params, task_ids)
        leaves = jax.tree.leaves(g)
        assert leaves and all(bool(jnp.all(jnp.isfinite(v))) for v in leaves)
        routed = set(idx[np.unique(np.asarray(task_ids))].reshape(-1).tolist())
        for e in range(a.pyramid.n_experts):
            norm = float(jnp.abs(g["kernels"][e][...]).max())
            if e in routed:
                assert norm > 0, f"routed expert {e} got no gradient"
            else:
                assert norm == 0.0, f"expert {e} is not routed for tasks {task_ids} but got gradient {norm}"
        for name in ("A", "B", "gate_w", "gate_b", "task_embedding"):
            assert float(jnp.abs(g[name][...]).max()) > 0, name


@pytest.mark.parametrize("kw", [dict(variant="reference"), dict(variant="paper"),
                                dict(kind="moelora_release", n_moe_experts=2), dict(kind="more", variant="reference"),
                                dict(kind="more", variant="paper")],
                         ids=["ept_reference", "ept_paper", "moelora_release", "more_reference", "more_paper"])
def test_training_gradient_has_no_scatter(kw):
    """The routed adapters select rows and routed values by products with one-hot matrices: a gather's (and
    ``top_k``'s) gradient is a scatter, which XLA compiles as a loop, one per adapted Linear of a training step
    (measured on the 3+3-block T5 of test_layer_scan: EPT's step compiled in 12.5 s with them, 8.5 s without)."""
    dims = PAPER_DIMS if kw.get("variant") == "paper" else REF_DIMS
    a = _build(_cfg(**kw), *dims)
    graphdef, params, rest = nnx.split(a, AdapterParam, ...)
    x = _inputs(2, a.d_in)

    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        aux = m.contrastive_loss(x, TASKS)
        return jnp.sum(m(x, AdapterContext(task_ids=TASKS)) ** 2) + (0.0 if aux is None else aux)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert "gather" in str(jax.make_jaxpr(lambda r: r[TASKS])(jnp.ones((8, 2)))) and "scatter" not in jaxpr


# ------------------------------------------------------------------------------------------------- init


def test_reference_init_follows_the_release(ref_adapter):
    d_in, d_out = REF_DIMS
    a = ref_adapter
    seed_in, seed_out = d_in // 2, d_out // 2
    chex.assert_shape((a.A[...], a.B[...]), [(4, seed_in), (seed_out, 4)])
    assert float(jnp.abs(a.A[...]).max()) <= 1 / np.sqrt(seed_in)
    assert float(jnp.abs(a.B[...]).max()) <= 1 / np.sqrt(4)
    for e, k in enumerate(REF_KS):
        kern = a.kernels[e][...]
        chex.assert_shape(kern, (d_out // k, k))
        assert 0 < float(jnp.abs(kern).max()) <= 1 / np.sqrt(kern.size)
    assert float(jnp.abs(a.gate_w[...]).max()) <= np.sqrt(6 / d_in)
    assert float(jnp.abs(a.gate_w[...]).max()) > 1 / np.sqrt(d_in)  # relu gain: wider than the default init
    assert float(jnp.abs(a.gate_b[...]).max()) <= 1 / np.sqrt(d_in)
    assert 0.007 < float(jnp.std(a.task_embedding[...])) < 0.013
    # not zero at step 0
    y = a(_inputs(3, d_in), AdapterContext(task_ids=TASKS))
    assert float(jnp.abs(y).max()) > 0


def test_paper_init_is_zero_at_step_zero():
    d_in, d_out = PAPER_DIMS
    a = _build(_cfg(variant="paper"), d_in, d_out)
    assert all(not np.any(np.asarray(k[...])) for k in a.kernels)
    chex.assert_shape([k[...] for k in a.kernels], [(k, k) for k in PAPER_KS])
    chex.assert_shape((a.A[...], a.B[...]), [(4, d_in // 2), (d_out // 2, 4)])
    assert 0.15 < float(jnp.std(a.A[...])) < 0.35  # N(0, (1/r)^2), r = 4
    y = a(_inputs(3, d_in), AdapterContext(task_ids=TASKS))
    assert not np.any(np.asarray(y))


def test_init_switch_overrides_ab_only():
    a = _build(_cfg(variant="reference", init="gaussian"), *REF_DIMS)
    assert float(jnp.abs(a.A[...]).max()) > 1 / np.sqrt(REF_DIMS[0] // 2)  # Gaussian tails exceed the uniform bound
    assert float(jnp.abs(a.kernels[0][...]).max()) > 0  # kernels keep the variant's init
    p = _build(_cfg(variant="paper", init="default"), *PAPER_DIMS)
    assert float(jnp.abs(p.A[...]).max()) <= 1 / np.sqrt(PAPER_DIMS[0] // 2)
    assert not np.any(np.asarray(p.kernels[0][...]))


# -------------------------------------------------------------------------------- dropout and integration


@pytest.mark.parametrize("impl", ["hash", "threefry"])
def test_dropout_applies_to_the_adapter_input_only_in_training(impl):
    d_in, d_out = REF_DIMS
    a = _build(_cfg(dropout=0.5, dropout_impl=impl), d_in, d_out)
    x, t, key = _inputs(4, d_in), TASKS, jax.random.key(5)
    plain = a(x, AdapterContext(task_ids=t))
    chex.assert_trees_all_close(a(x, AdapterContext(task_ids=t, dropout_rng=key, deterministic=True)), plain, **TOL)
    dropped = a(x, AdapterContext(task_ids=t, dropout_rng=key, deterministic=False))
    keep = keep_mask(key, x.shape, 0.5, impl)
    want = a(jnp.where(keep, x / 0.5, 0.0), AdapterContext(task_ids=t))
    chex.assert_trees_all_close(dropped, want, **TOL)
    assert float(jnp.abs(dropped - plain).max()) > 1e-6


def test_injected_adapted_linear_axes_and_contrastive_loss():
    d_in, d_out = REF_DIMS
    class Stacks(nnx.Module):  # one Linear per stack, named by its stack as a T5 path begins
        def __init__(self):
            self.encoder = Linear(d_in, d_out, axes=("embed", "joined_kv"), rngs=nnx.Rngs(0))
            self.decoder = Linear(d_in, d_out, axes=("embed", "joined_kv"), rngs=nnx.Rngs(1))

        @staticmethod
        def stack_of(path):
            return path.split(".")[0]

    injection = Injection(adapter=_cfg(dropout=0.5), targets=(".*",), contrastive_stacks=("encoder",))
    model = inject(Stacks(), injection, rngs=0)
    enc, dec = model.encoder, model.decoder
    assert isinstance(enc, AdaptedLinear) and isinstance(enc.adapter, ad.EPTAdapter)
    a = enc.adapter
    assert logical_axes(a.A) == ("lora_rank", "embed")
    assert logical_axes(a.B) == ("joined_kv", "lora_rank")
    assert logical_axes(a.gate_w) == ("experts", "embed")
    assert logical_axes(a.gate_b) == ("experts",)
    assert logical_axes(a.task_embedding) == ("tasks", "embed")
    assert all(logical_axes(k) == (None, "kernel") for k in a.kernels)
    variables = jax.tree.leaves(nnx.state(a), is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert variables and all(isinstance(v, AdapterParam) for v in variables)

    x, t = _inputs(6, d_in), TASKS
    ctx = AdapterContext(task_ids=t, dropout_rng=jax.random.key(0), deterministic=False)
    enc(x, ctx)
    losses = pop_aux_losses(enc)
    assert len(losses) == 1
    # the release computes the contrastive loss on the input before dropout
    chex.assert_trees_all_close(losses[0], a.contrastive_loss(x, t), **TOL)
    dec(x, ctx)
    assert pop_aux_losses(dec) == []
    # no task ids: the base Linear alone
    chex.assert_trees_all_close(enc(x, AdapterContext()), enc.base(x), **TOL)


# ----------------------------------------------------------------------------------------------- baselines


def test_lora_baseline():
    d_in, d_out = REF_DIMS
    a = _build(_cfg(kind="lora"), d_in, d_out)
    assert isinstance(a, LoRAAdapter)
    x, ctx = _inputs(7, d_in), AdapterContext(task_ids=TASKS)
    assert not np.any(np.asarray(a(x, ctx)))  # B = 0 at init
    a.B[...] = _x(8, (d_out, 4))
    want = 2.0 * np.asarray(x) @ np.asarray(a.A[...]).T @ np.asarray(a.B[...]).T  # alpha / r = 8 / 4
    chex.assert_trees_all_close(a(x, ctx), want, **TOL)
    f_b, f_a = a.to_lora(0)
    chex.assert_shape((f_b, f_a), [(d_out, 4), (4, d_in)])
    chex.assert_trees_all_close(f_b @ f_a, a.merge(0), **TOL)
    chex.assert_trees_all_close(jnp.einsum("bsi,oi->bso", x, a.merge(1)), want, **TOL)


def test_moelora_baseline():
    d_in, d_out = REF_DIMS
    a = _build(_cfg(kind="moelora", n_moe_experts=2), d_in, d_out)
    assert isinstance(a, MoELoRAAdapter)
    chex.assert_shape((a.A[...], a.B[...]), [(2, 2, d_in), (2, d_out, 2)])
    a.B[...] = _x(9, a.B.shape)
    w, _ = a.routing()
    chex.assert_shape(w, (8, 2))
    assert bool(jnp.all(w > 0)) and np.allclose(np.asarray(w).sum(-1), 1.0)  # dense, no top-k
    x, t = _inputs(10, d_in), jnp.array([0, 4, 4, 1])
    y = _jitted(a, lambda m, x, t: m(x, AdapterContext(task_ids=t)))(x, t)
    merged = jnp.stack([a.merge(int(i)) for i in t])
    chex.assert_trees_all_close(y, jnp.einsum("bsi,boi->bso", x, merged), **TOL)
    manual = 2.0 * sum(w[4, i] * a.B[...][i] @ a.A[...][i] for i in range(2))
    chex.assert_trees_all_close(a.merge(4), manual, **TOL)
    f_b, f_a = a.to_lora(4)
    chex.assert_shape((f_b, f_a), [(d_out, 4), (4, d_in)])
    chex.assert_trees_all_close(f_b @ f_a, a.merge(4), **TOL)
    assert a.contrastive_loss(x, t) is None


@pytest.mark.parametrize("kernels,k", [((2, 2, 4, 4, 6, 6, 8, 8), 2), ((4,), 4)])
def test_dcft_baseline(kernels, k):
    d_in, d_out = PAPER_DIMS
    a = _build(_cfg(kind="dcft", variant="paper", expert_kernel_sizes=kernels), d_in, d_out, randomize_kernels=True)
    assert isinstance(a, DCFTAdapter) and a.gate_w is None and a.task_embedding is None
    chex.assert_shape((a.A[...], a.B[...], a.kernels[0][...]), [(4, d_in // k), (d_out // k, 4), (k, k)])
    want = 2.0 * np.kron(np.asarray(a.B[...]) @ np.asarray(a.A[...]), np.asarray(a.kernels[0][...]))
    chex.assert_trees_all_close(a.merge(3), want, **TOL)
    x = _inputs(11, d_in)
    paths = _jitted(a, lambda m, x, t: [m.apply(x, AdapterContext(task_ids=t), p) for p in ad.FORWARD_PATHS])
    for y in paths(x, TASKS):
        chex.assert_trees_all_close(y, jnp.einsum("bsi,oi->bso", x, want), **TOL)
    f_b, f_a = a.to_lora(0)
    chex.assert_shape((f_b, f_a), [(d_out, 4 * k), (4 * k, d_in)])
    chex.assert_trees_all_close(f_b @ f_a, want, **TOL)
    assert a.contrastive_loss(x, jnp.array([0, 1])) is None


# ------------------------------------------------------------------------------------- config and registry


@pytest.mark.parametrize(
    "kw,dims,match",
    [
        (dict(kind="nope"), REF_DIMS, "kind='nope'"),
        (dict(variant="torch"), REF_DIMS, "variant='torch'"),
        (dict(r=0), REF_DIMS, "r=0"),
        (dict(alpha=-1.0), REF_DIMS, "alpha=-1.0"),
        (dict(dropout=1.0), REF_DIMS, "dropout=1.0"),
        (dict(dropout_impl="philox"), REF_DIMS, "dropout_impl=.philox."),
        (dict(init="xavier"), REF_DIMS, "init='xavier'"),
        (dict(n_tasks=9), REF_DIMS, "n_tasks=9 > n_task_rows=8"),
        (dict(top_k=9), REF_DIMS, "top_k=9"),
        (dict(top_k=0), REF_DIMS, "top_k=0"),
        (dict(expert_kernel_sizes=(1, 2)), REF_DIMS, r"kernel size\(s\) \[1\] < 2"),
        (dict(expert_kernel_sizes=(2, 64)), REF_DIMS, r"kernel size\(s\) \[64\] exceed"),
        (dict(expert_kernel_sizes=[2, 4]), REF_DIMS, "non-empty tuple"),
        (dict(variant="paper", expert_kernel_sizes=(2, 6, 6)), (64, 64), r"\(s\) \[6, 6\] do not divide d_in=64"),
        (dict(contrastive_tau=0.0), REF_DIMS, "contrastive_tau=0.0"),
        (dict(kind="moelora", n_moe_experts=3), REF_DIMS, "r=4 is not divisible by n_moe_experts=3"),
        (dict(kind="dcft", expert_kernel_sizes=(6,)), (64, 64), r"\[6\] do not divide"),
        (dict(param_dtype="int32"), REF_DIMS, "param_dtype='int32' must be a floating dtype"),
        (dict(param_dtype="float77"), REF_DIMS, "param_dtype='float77' is not a dtype"),
        (dict(forward_path="slow"), REF_DIMS, "forward_path='slow'"),
        (dict(paper_dense_max_k=-1), REF_DIMS, "paper_dense_max_k=-1"),
        (dict(paper_dense_max_k=2.5), REF_DIMS, "paper_dense_max_k=2.5"),
        (dict(), (0, 8), "d_in=0"),
    ],
)
def test_validate_names_the_bad_value(kw, dims, match):
    with pytest.raises(ValueError, match=match):
        ad.make_adapter(_cfg(**kw), *dims, rngs=nnx.Rngs(0))


def test_calls_with_bad_inputs_raise(ref_adapter):
    a = ref_adapter
    with pytest.raises(ValueError, match="task=8"):
        a.merge(8)
    with pytest.raises(ValueError, match=r"expected \(batch, ..., 64\)"):
        a(_x(1, (2, 3, 63)), AdapterContext(task_ids=jnp.array([0, 1])))
    with pytest.raises(ValueError, match="needs ctx.task_ids"):
        a(_x(1, (2, 3, 64)), AdapterContext())
    with pytest.raises(ValueError, match="path='slow'"):
        a.apply(_x(1, (2, 3, 64)), AdapterContext(task_ids=jnp.array([0, 1])), "slow")


def test_registry_dispatches_and_guards():
    assert {"ept", "lora", "moelora", "dcft"} <= set(ad.registered_kinds())
    assert isinstance(nnx.eval_shape(lambda: ad.make_adapter(_cfg(), *REF_DIMS, rngs=nnx.Rngs(0))), ad.EPTAdapter)

    @ad.register_adapter("test-scaled-lora")
    class Scaled(LoRAAdapter):
        pass

    cfg = _cfg(kind="test-scaled-lora")
    assert isinstance(nnx.eval_shape(lambda: ad.make_adapter(cfg, *REF_DIMS, rngs=nnx.Rngs(0))), Scaled)
    with pytest.raises(ValueError, match="already registered"):
        ad.register_adapter("lora")(Scaled)
    assert hash(cfg) == hash(dataclasses.replace(cfg))  # frozen and hashable: usable as a jit static argument


@pytest.mark.parametrize("zero_init", ["kernels", "B"])
def test_zero_init_makes_the_reference_adapter_zero_at_step_0(zero_init):
    cfg = ad.AdapterConfig(kind="ept", variant="reference", r=4, alpha=8.0, expert_kernel_sizes=(2, 4), n_tasks=2,
                        zero_init=zero_init, dropout=0.0)
    a = ad.make_adapter(cfg, 16, 8, rngs=nnx.Rngs(0))
    assert not np.any(np.asarray(a.merge(0))) and not np.any(np.asarray(a.merge(1)))
    const_cfg = ad.AdapterConfig(kind="ept", r=4, expert_kernel_sizes=(2, 4), n_tasks=2, kernel_init="constant")
    const = ad.make_adapter(const_cfg, 16, 8, rngs=nnx.Rngs(0))
    assert all(np.all(np.asarray(k[...]) == 1.0) for k in const.kernels)
    with pytest.raises(ValueError, match="zero_init='A'"):
        ad.make_adapter(ad.AdapterConfig(kind="ept", zero_init="A"), 16, 8, rngs=nnx.Rngs(0))
