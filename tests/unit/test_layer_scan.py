"""The layer scan (ept_jax.models.layer_scan): the same loss, gradients and dropout masks as the unrolled layers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ept_jax.adapters.config import AdapterConfig
from ept_jax.adapters.inject import Injection, inject
from ept_jax.core.params import AdapterParam
from ept_jax.models import layer_scan
from ept_jax.models.llama import LlamaModel
from ept_jax.models.llama.config import LlamaConfig
from ept_jax.models.t5 import T5Config, T5Model
from train import steps

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, rope_theta=1e4)
T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=3, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
          tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
ADAPTERS = {
    "ept_reference": dict(kind="ept", variant="reference", r=4, expert_kernel_sizes=(2, 2, 4, 4)),
    "ept_paper": dict(kind="ept", variant="paper", r=4, expert_kernel_sizes=(2, 2, 4, 4)),
    "lora": dict(kind="lora", r=4),
    "moelora_release": dict(kind="moelora_release", r=8, n_moe_experts=4),  # one router shared by every layer
}


def _model(family: str, adapter: str, *, scan: bool):
    kw = dict(n_tasks=3, dropout=0.3, alpha=8.0, **ADAPTERS[adapter])
    if family == "llama":
        inj = Injection(adapter=AdapterConfig(**kw), targets=("q_proj", "v_proj", "gate_proj", "down_proj"),
                        contrastive_stacks=("decoder",))
        model = inject(LlamaModel(LlamaConfig.from_hf(LLAMA), rngs=nnx.Rngs(0)), inj, rngs=0)
    else:
        inj = Injection(adapter=AdapterConfig(**kw), targets=("q", "v", "wi_0", "wo"),
                        contrastive_stacks=("encoder",))
        model = inject(T5Model(T5Config.from_hf(T5), rngs=nnx.Rngs(0)), inj, rngs=0)
    layer_scan.set_scan_layers(model, scan)
    # non-zero adapters everywhere (B factors start at zero), so every layer's adapter shows in the loss
    graphdef, trainable, frozen = nnx.split(model, AdapterParam, ...)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(trainable))))
    trainable = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape, x.dtype), trainable)
    return graphdef, trainable, frozen


def _batch(family: str):
    rng = np.random.default_rng(0)
    b, ls, lt = 4, 10, 6
    batch = {"task_ids": jnp.asarray([0, 1, 2, 1], jnp.int32)}
    if family == "llama":
        mask = np.ones((b, ls), np.int32)
        mask[1, :3] = 0  # left padding
        batch.update(input_ids=jnp.asarray(rng.integers(2, 64, (b, ls)), jnp.int32), attention_mask=mask,
                     labels=jnp.asarray(rng.integers(2, 64, (b, ls)), jnp.int32), label_mask=mask)
    else:
        mask = np.ones((b, ls), np.int32)
        mask[2, 7:] = 0
        batch.update(input_ids=jnp.asarray(rng.integers(2, 64, (b, ls)), jnp.int32), attention_mask=mask,
                     decoder_input_ids=jnp.asarray(rng.integers(2, 64, (b, lt)), jnp.int32),
                     decoder_attention_mask=np.ones((b, lt), np.int32),
                     labels=jnp.asarray(rng.integers(2, 64, (b, lt)), jnp.int32), label_mask=np.ones((b, lt), np.int32))
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _loss_and_grads(family, graphdef, frozen, batch):
    """The jitted ``(trainable, key) -> ((loss, parts), grads)`` of the model's training loss."""
    def f(tr, key):
        return steps.loss_fn(tr, frozen, graphdef, batch, key, family=family, contrastive_lambda=0.5)

    return jax.jit(jax.value_and_grad(f, has_aux=True))


@pytest.mark.parametrize("family,adapter", [("llama", a) for a in ADAPTERS] + [("t5", "ept_reference"),
                                                                                ("t5", "lora")])
def test_scanned_layers_equal_unrolled(family, adapter):
    batch = _batch(family)
    out = {}
    for scan in (True, False):
        graphdef, trainable, frozen = _model(family, adapter, scan=scan)
        fn = _loss_and_grads(family, graphdef, frozen, batch)
        # the program's own trace (the call below reuses it): its loss and gradient scan the layers, or nothing does
        jaxpr = str(fn.trace(trainable, jax.random.PRNGKey(7)).jaxpr)
        assert ("scan[" in jaxpr) == scan, f"scan={scan}: the layers did not run as expected"
        out[scan] = fn(trainable, jax.random.PRNGKey(7))
        if scan:
            # dropout is on (rate 0.3): a different key changes the loss, so equal losses mean equal masks
            other = fn(trainable, jax.random.PRNGKey(8))[0][0]
    (loss_s, parts_s), grads_s = out[True]
    (loss_u, parts_u), grads_u = out[False]
    chex.assert_trees_all_close(loss_s, loss_u, rtol=1e-5)
    chex.assert_trees_all_close(parts_s, parts_u, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads_s, grads_u, rtol=1e-4, atol=1e-6)
    if adapter.startswith("ept"):
        assert float(parts_s["contrastive"]) > 0
    assert abs(float(other) - float(loss_s)) > 1e-6


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_scanned_step_neither_stacks_nor_saves_the_frozen_weights(family):
    """The scan selects each layer's frozen weights (and recomputes the selection in the backward pass): no
    ``(layers, *kernel)`` array of a frozen kernel exists in the compiled gradient, as a stack or as residuals;
    the adapters' leaves are stacked."""
    graphdef, trainable, frozen = _model(family, "lora", scan=True)
    batch = _batch(family)
    n = 3 if family == "llama" else 2  # T5: the blocks after the first
    f = lambda tr: steps.loss_fn(tr, frozen, graphdef, batch, jax.random.PRNGKey(7), family=family,
                                 contrastive_lambda=0.5)[0]
    hlo = jax.jit(jax.grad(f)).lower(trainable).compile().as_text()
    stacked = lambda shape: f"f32[{n},{','.join(map(str, shape))}]"
    kernels = {tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(frozen)
               if x.ndim == 2 and "kernel" in jax.tree_util.keystr(p) and "embed" not in jax.tree_util.keystr(p)}
    adapters = {tuple(x.shape) for x in jax.tree.leaves(trainable) if x.ndim == 2}
    assert kernels and adapters and not kernels & adapters
    assert [s for s in kernels if stacked(s) in hlo] == []
    assert all(stacked(s) in hlo for s in adapters)


def test_scan_plan_covers_the_models_layers_and_refuses_different_ones():
    graphdef, trainable, frozen = _model("llama", "ept_reference", scan=True)
    model = nnx.merge(graphdef, trainable, frozen)
    layers = list(model.model.layers)
    plan = layer_scan.scan_plan(layers)
    assert plan is not None and plan[1] == 4  # four adapted Linears per layer
    assert layer_scan.scan_plan(layers[:1]) is None
    t5 = nnx.merge(*_model("t5", "lora", scan=True))
    blocks = list(t5.encoder.block)
    assert layer_scan.scan_plan(blocks[1:]) is not None
    assert layer_scan.scan_plan(blocks) is None  # the first block holds the relative-bias table
    assert layer_scan.scan_plan([t5.encoder.block[1], t5.decoder.block[1]]) is None  # no cross-attention


def test_scan_layers_config_is_validated():
    from configs import smoke
    from train import configuration
    from train.errors import UserError

    config = smoke.get_config()
    configuration.validate(config)  # the default (True) passes
    with config.ignore_type():  # a ConfigDict refuses the override itself; a plain dict config would not
        config.model.scan_layers = "yes"
    with pytest.raises(UserError, match="model.scan_layers='yes'"):
        configuration.validate(config)
