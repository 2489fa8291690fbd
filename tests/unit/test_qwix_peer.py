"""The qwix LoRA peer of the benchmarks (:mod:`benchmarks.qwix_peer`) on ept_jax's tiny LLaMA: qwix intercepts
ept_jax's Linears, the LoRA model starts as the plain model, and its step differentiates the LoRA parameters only."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import qwix_peer, run, setups
from ept_jax.models import layer_scan
from train import steps


def test_qwix_lora_starts_as_the_plain_model_and_trains_only_its_lora_params():
    # llama_tiny (the T5 row runs in the quick benchmark, tests/e2e/test_benchmarks.py, with the same checks of
    # its adapted Linears and parameter counts)
    spec = setups.QUICK[1]
    assert spec.family == "llama"
    tensors = setups.hf_tensors(setups.hf_model(spec))
    config = setups.bench_config(spec, dict(run.ADAPTERS)["lora"])
    dropout = float(config.adapter.dropout)
    assert dropout > 0  # the masks are drawn (from the step's key) in every call below
    plain, model = qwix_peer.lora_model(spec, tensors, config, dtype="float32")  # raises unless ept_jax's targets
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    flat = dict(nnx.to_flat_state(lora))
    r = int(config.adapter.r)
    assert flat and {p[-1] for p in flat} == {"kernel_lora_a", "kernel_lora_b"}
    for path, v in flat.items():
        assert isinstance(v, nnx.LoRAParam)
        assert (v[...].shape[1] if path[-1] == "kernel_lora_a" else v[...].shape[0]) == r
        assert (np.count_nonzero(v[...]) == 0) == (path[-1] == "kernel_lora_b"), path  # qwix's init: B = 0
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(frozen))
    assert setups.count(frozen) == setups.count(nnx.state(plain))  # the base weights and nothing else

    batch = {k: jnp.asarray(v) for k, v in setups.train_batch(spec, spec.seq).items()}
    key = jax.random.PRNGKey(3)
    logits = qwix_peer.logits_fn(graphdef, spec.family, dropout)(lora, frozen, batch, key)  # eager: same kernels
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(steps.forward(spec.family, plain, batch, None)))

    loss = qwix_peer.loss_fn(graphdef, spec.family, dropout)
    grads = jax.jit(jax.grad(loss))(lora, frozen, batch, key)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)  # gradients of the LoRA parameters only
    for path, g in nnx.to_flat_state(grads):
        # B = 0: the loss reaches A only through B, so A's first gradient is 0 and B's is not
        assert (float(jnp.abs(g[...]).max()) > 0) == (path[-1] == "kernel_lora_b"), path

    # the benchmark's step (the same loss, clipping, optax AdamW) moves B; then A's gradient is non-zero too
    call, _, _, info = qwix_peer.train_call(spec, tensors, config, dtype="float32")
    frozen0 = jax.tree.map(np.asarray, info["frozen"])
    new_lora, metrics = call()
    assert np.isfinite(float(metrics["loss"]))
    for _, v in nnx.to_flat_state(new_lora):
        assert np.count_nonzero(v[...]) > 0
    jax.tree.map(np.testing.assert_array_equal, frozen0, jax.tree.map(np.asarray, info["frozen"]))
    grads = jax.jit(jax.grad(loss))(new_lora, info["frozen"], batch, key)
    assert all(float(jnp.abs(g[...]).max()) > 0 for _, g in nnx.to_flat_state(grads))


def test_qwix_targets_and_why_its_layers_run_unrolled():
    import qwix

    assert qwix_peer.unavailable() is None
    regex = qwix_peer.module_regex(("q", "wi"))
    assert regex == "(?:.*/)?(?:q|wi)"
    assert re.fullmatch(regex, "encoder/block/0/layer/0/SelfAttention/q")
    assert not re.fullmatch(regex, "encoder/block/0/layer/0/SelfAttention/wq")
    # two identical layers scan in the plain model; once qwix has written each module's path on it, they differ
    spec = dataclasses.replace(setups.QUICK[1], arch={**setups.LLAMA_TINY, "num_hidden_layers": 2})
    plain = setups.jax_model(setups.bench_config(spec, None), setups.hf_tensors(setups.hf_model(spec)))
    assert plain.scan_layers and layer_scan.scan_plan(list(plain.model.layers)) is not None
    batch = setups.train_batch(spec, spec.seq)
    provider = qwix.LoraProvider(module_path=qwix_peer.module_regex(("q_proj",)), rank=2, alpha=4.0)
    model = qwix.apply_lora_to_model(plain, provider, jnp.asarray(batch["input_ids"]), rngs=nnx.Rngs(0))
    assert [m.qwix_path for m in model.model.layers] == [("model", "layers", 0), ("model", "layers", 1)]
    assert layer_scan.scan_plan(list(model.model.layers)) is None
