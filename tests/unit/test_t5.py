"""T5 family: config parsing, relative position buckets, parity with transformers (v1.0 tied + scaled, v1.1
gated with an untied head and fewer decoder than encoder layers), loading from safetensors / a sharded index /
a legacy Flax msgpack, strictness, export, logical axes, adapter injection and the dtype policy. Tiny random
models built here; offline. Generation is tested in ``test_t5_generate.py``."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ept_jax.adapters.base import adapted_linears
from ept_jax.adapters.config import AdapterConfig  # noqa: E402
from ept_jax.adapters.inject import Injection
from ept_jax.checkpoints import load  # noqa: E402
from ept_jax.checkpoints.hf import CheckpointError, export_from, read_safetensors, read_tensors  # noqa: E402
from ept_jax.checkpoints.t5_map import hf_rules, linear_names  # noqa: E402
from ept_jax.core.params import AdapterContext, AdapterParam, logical_axes, pop_aux_losses
from ept_jax.models import t5  # noqa: E402
from ept_jax.models.t5.config import T5Config  # noqa: E402

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, d_model=32, d_kv=6, d_ff=48, num_heads=4, relative_attention_num_buckets=8,
              relative_attention_max_distance=20, decoder_start_token_id=0, dropout_rate=0.0)
# d_kv * num_heads = 24 != d_model: attention width and model width are kept apart.
CASES = {
    "v1_0": dict(num_layers=2, feed_forward_proj="relu"),
    "v1_1": dict(
        num_layers=3, num_decoder_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False
    ),
}
# Linear weight scale per case: greedy outputs vary from step to step (test_t5_generate.py) while the model
# stays well conditioned (larger gains make float32 itself, in PyTorch as here, drift past 1e-4 from float64).
GAIN = {"v1_0": 1.5, "v1_1": 1.0}


def make_hf_model(case: str):
    """A random ``T5ForConditionalGeneration`` of ``case`` with every weight (norms included) made
    non-trivial.

    Norm weights of both signs keep the tied output projection from favouring the input token (which makes
    greedy decoding repeat one token).
    """
    torch.manual_seed(0)
    cfg = transformers.T5Config(**COMMON, **CASES[case])
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    if not CASES[case].get("tie_word_embeddings", True):
        # transformers 5 ties T5's lm_head to the embeddings whatever the config says: untie by hand.
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
        model.config.tie_word_embeddings = False
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(-1.5, 1.5)
            elif p.ndim == 2 and not any(s in name for s in ("relative", "shared")):
                p.normal_(0.0, GAIN[case] / p.shape[1] ** 0.5)
            else:
                p.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """``{case: (torch model, saved directory)}``."""
    out = {}
    for case in CASES:
        model = make_hf_model(case)
        d = tmp_path_factory.mktemp(case)
        model.save_pretrained(d)
        out[case] = (model, d)
    return out


@pytest.fixture(scope="module")
def loaded(hf_models):
    """``{case: our model loaded from the saved directory}`` (shared by read-only tests)."""
    return {case: load.from_pretrained(d) for case, (_, d) in hf_models.items()}


def batch(seed=0):
    """Encoder ids/mask (row 1 right padded) and decoder ids/mask (row 2 right padded)."""
    rs = np.random.RandomState(seed)
    ids, dec = rs.randint(2, VOCAB, (3, 11)), rs.randint(2, VOCAB, (3, 7))
    mask, dec_mask = np.ones_like(ids), np.ones_like(dec)
    mask[1, 6:] = 0
    dec_mask[2, 5:] = 0
    return ids, mask, dec, dec_mask


def torch_logits(model, ids, mask, dec, dec_mask=None):
    kw = {} if dec_mask is None else {"decoder_attention_mask": torch.tensor(dec_mask)}
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    decoder_input_ids=torch.tensor(dec), **kw)
    return out.logits.numpy()


def assert_parity(ours, hf, dec_mask=None):
    ours = np.asarray(ours)
    assert ours.dtype == np.float32
    valid = np.ones(ours.shape[:2], bool) if dec_mask is None else dec_mask.astype(bool)
    diff = np.abs(ours - hf)[valid].max()
    assert diff <= 1e-4, diff


# ------------------------------------------------------------------------------------------------ config


def test_config_from_transformers_and_round_trip():
    for case in CASES:
        hf_dict = transformers.T5Config(**COMMON, **CASES[case]).to_dict()
        cfg = T5Config.from_hf(hf_dict)
        assert T5Config.from_hf(cfg.to_hf()) == cfg
    v10 = T5Config.from_hf(transformers.T5Config(**COMMON, **CASES["v1_0"]).to_dict())
    assert (v10.is_gated, v10.dense_act_fn, v10.tie_word_embeddings, v10.scale_decoder_outputs) == (
        False, "relu", True, True)
    assert v10.num_decoder_layers == 2 and v10.inner_dim == 24
    # A Flan-T5 / T5 v1.1 config.json as the hub serves it (transformers 4: no scale_decoder_outputs key).
    flan = dict(COMMON, model_type="t5", num_layers=3, num_decoder_layers=2, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False)
    cfg = T5Config.from_hf(flan)
    assert (cfg.is_gated, cfg.dense_act_fn, cfg.tie_word_embeddings, cfg.scale_decoder_outputs) == (
        True, "gelu_new", False, False)
    assert cfg.num_layers == 3 and cfg.num_decoder_layers == 2
    mt5 = T5Config.from_hf(dict(flan, model_type="mt5", feed_forward_proj="gated-silu", pad_token_id=None))
    assert mt5.dense_act_fn == "silu" and mt5.pad_token_id == 0 and mt5.decoder_start_token_id == 0
    assert linear_names(cfg) == ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
    assert linear_names(v10) == ["q", "k", "v", "o", "wi", "wo"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"feed_forward_proj": "gated-swiglu"}, "activation 'swiglu' is not supported"),
        ({"feed_forward_proj": "gelu-gated"}, "feed_forward_proj='gelu-gated' is malformed"),
        ({"model_type": "bart"}, "model_type='bart'"),
        ({"d_kv": None}, r"lacks required key\(s\) \['d_kv'\]"),
        ({"num_heads": 0}, "num_heads=0"),
        ({"relative_attention_num_buckets": 2}, "relative_attention_num_buckets=2"),
    ],
)
def test_config_rejects_unsupported_values(change, message):
    d = {**COMMON, "num_layers": 2, "model_type": "t5", **change}
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        T5Config.from_hf(d)


bucket_jit = jax.jit(
    t5.relative_position_bucket, static_argnames=("bidirectional", "num_buckets", "max_distance")
)


@pytest.mark.parametrize("buckets, distance", [(32, 128), (8, 20), (6, 7)])
def test_relative_position_bucket_matches_transformers(buckets, distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-400, 401)
    for bidirectional in (True, False):
        ref = T5Attention._relative_position_bucket(
            torch.tensor(rel), bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
        ).numpy()
        ours = bucket_jit(
            jnp.asarray(rel), bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
        )
        np.testing.assert_array_equal(np.asarray(ours), ref)


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(hf_models, loaded, case):
    hf, d = hf_models[case]
    model = loaded[case]
    ids, mask, dec, dec_mask = batch()
    ours = model(ids, mask, dec)
    chex.assert_shape(ours, (3, 7, VOCAB))
    assert_parity(ours, torch_logits(hf, ids, mask, dec))
    # A padded decoder batch: compared where the decoder tokens are real.
    assert_parity(model(ids, mask, dec, dec_mask), torch_logits(hf, ids, mask, dec, dec_mask), dec_mask)
    # encode + decode is the same computation as __call__.
    split = model.decode(dec, model.encode(ids, mask), mask)
    np.testing.assert_array_equal(np.asarray(split), np.asarray(ours))


def test_structure_follows_config(loaded):
    v10, v11 = loaded["v1_0"], loaded["v1_1"]
    assert len(v11.encoder.block) == 3 and len(v11.decoder.block) == 2
    assert v10.lm_head is None and v11.lm_head is not None
    for model in (v10, v11):
        for stack in (model.encoder, model.decoder):
            tables = [blk.layer[0].SelfAttention.relative_attention_bias is not None for blk in stack.block]
            assert tables == [True] + [False] * (len(stack.block) - 1)  # held by the first block only
    assert hasattr(v11.encoder.block[0].layer[1].DenseReluDense, "wi_0")
    assert not hasattr(v11.encoder.block[0].layer[1].DenseReluDense, "wi")


# ------------------------------------------------------------------------------------------------ loading


def test_untied_checkpoint_really_has_its_own_head(hf_models):
    _, d = hf_models["v1_1"]
    tensors = read_safetensors(d / "model.safetensors")
    assert "lm_head.weight" in tensors
    assert np.abs(np.asarray(tensors["lm_head.weight"]) - np.asarray(tensors["shared.weight"])).max() > 0.1
    assert json.loads((d / "config.json").read_text())["tie_word_embeddings"] is False


def test_sharded_checkpoint_loads(hf_models, tmp_path):
    hf, _ = hf_models["v1_1"]
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids, mask, dec, _ = batch(1)
    assert_parity(load.from_pretrained(tmp_path)(ids, mask, dec), torch_logits(hf, ids, mask, dec))


def _flax_name(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """A PyTorch T5 state-dict entry under Hugging Face Flax naming and layout."""
    stem = key.rsplit(".", 1)[0]
    if key == "shared.weight" or key.endswith("relative_attention_bias.weight"):
        return f"{stem}.embedding", value
    if "layer_norm" in key:
        return key, value
    return f"{stem}.kernel", value.T  # Linear: (in, out)


@pytest.mark.parametrize("case", list(CASES))
def test_legacy_flax_msgpack_loads(hf_models, tmp_path, case):
    from flax import serialization

    hf, d = hf_models[case]
    tree: dict = {}
    for key, value in hf.state_dict().items():
        if key.endswith("embed_tokens.weight") or (key == "lm_head.weight" and hf.config.tie_word_embeddings):
            continue  # Flax T5 keeps only `shared` (and `lm_head` when untied)
        name, arr = _flax_name(key, value.numpy())
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = arr
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    ids, mask, dec, _ = batch(2)
    assert_parity(load.from_pretrained(tmp_path)(ids, mask, dec), torch_logits(hf, ids, mask, dec))


def test_transformers4_tied_copies_are_accepted(hf_models, tmp_path):
    # transformers 4 exports of T5 v1.0 carry the tied matrix up to four times, and some an unused
    # cross-attention bias table; all are accepted without being "unexpected".
    from safetensors.torch import save_file

    hf, d = hf_models["v1_0"]
    sd = {k: v.clone().contiguous() for k, v in hf.state_dict().items()}
    for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        sd[k] = sd["shared.weight"].clone()
    sd["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    ids, mask, dec, _ = batch(3)
    assert_parity(load.from_pretrained(tmp_path)(ids, mask, dec), torch_logits(hf, ids, mask, dec))


def _save_edited(hf, d, tmp_path, edit):
    from safetensors.torch import save_file

    sd = {k: v.clone().contiguous() for k, v in read_tensors_torch(d).items()}
    edit(sd)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())


def read_tensors_torch(d):
    return {k: torch.from_numpy(np.array(v)) for k, v in read_tensors(d).items()}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("decoder.block.1.layer.1.EncDecAttention.v.weight"),
         r"missing 1 tensor.*decoder\.block\.1\.layer\.1\.EncDecAttention\.v\.weight"),
        (lambda sd: sd.pop("lm_head.weight"), r"missing 1 tensor.*lm_head\.weight"),
        (lambda sd: sd.__setitem__("encoder.block.2.layer.1.DenseReluDense.wi_1.weight", torch.zeros(48, 31)),
         r"wrong shape.*encoder\.block\.2\.layer\.1\.DenseReluDense\.wi_1\.weight"),
        (lambda sd: sd.__setitem__("decoder.block.2.layer.0.SelfAttention.q.weight", torch.zeros(24, 32)),
         r"unexpected 1 tensor.*decoder\.block\.2\.layer\.0\.SelfAttention\.q\.weight"),
    ],
    ids=["missing", "missing_untied_head", "wrong_shape", "unexpected"],
)
def test_loading_is_strict(hf_models, tmp_path, edit, message):
    hf, d = hf_models["v1_1"]
    _save_edited(hf, d, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        load.from_pretrained(tmp_path)


def test_loading_errors_for_bad_directories(hf_models, tmp_path):
    cfg = dict(COMMON, model_type="t5", num_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no weights"):
        load.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, feed_forward_proj="gated-swiglu")))
    with pytest.raises(CheckpointError, match="activation 'swiglu'"):
        load.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype='float16'"):
        load.from_pretrained(hf_models["v1_0"][1], dtype="float16")


def test_export_round_trips_checkpoint_and_axes(hf_models, loaded):
    for case, (_, d) in hf_models.items():
        model = loaded[case]
        exported = export_from(model, hf_rules(model.cfg))
        original = read_tensors(d)
        assert set(exported) == set(original), case
        for k, v in original.items():
            np.testing.assert_array_equal(exported[k], np.asarray(v), err_msg=k)
    model = loaded["v1_1"]
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            axes = logical_axes(var)
            assert axes is not None and len(axes) == var.ndim, (path, axes)
    blk = model.decoder.block[0]
    assert logical_axes(blk.layer[1].EncDecAttention.k.kernel) == ("embed", "joined_kv")
    assert logical_axes(blk.layer[0].SelfAttention.o.kernel) == ("joined_kv", "embed")
    assert logical_axes(blk.layer[2].DenseReluDense.wi_0.kernel) == ("embed", "mlp")
    table = blk.layer[0].SelfAttention.relative_attention_bias.embedding
    assert logical_axes(table) == ("rel_buckets", "heads")
    assert logical_axes(model.shared.embedding) == ("vocab", "embed")
    assert logical_axes(model.lm_head.kernel) == ("embed", "vocab")


# ------------------------------------------------------------------------------------------------ adapters


def test_lora_injection_names_stacks_and_zero_delta(hf_models):
    hf, d = hf_models["v1_1"]
    inj = Injection(AdapterConfig(kind="lora", r=4, alpha=8.0, dropout=0.0), targets=("q", "k", "wi_1", "wo"))
    model = load.from_pretrained(d, injection=inj)
    got = sorted((m.name, m.stack) for _, m in adapted_linears(model))
    expected = [(f"encoder.block.{i}.layer.{p}", "encoder") for i in range(3) for p in (
        "0.SelfAttention.q", "0.SelfAttention.k", "1.DenseReluDense.wi_1", "1.DenseReluDense.wo")]
    expected += [(f"decoder.block.{i}.layer.{p}", "decoder") for i in range(2) for p in (
        "0.SelfAttention.q", "0.SelfAttention.k", "1.EncDecAttention.q", "1.EncDecAttention.k",
        "2.DenseReluDense.wi_1", "2.DenseReluDense.wo")]
    assert got == sorted(expected)
    ids, mask, dec, _ = batch()
    ctx = AdapterContext(task_ids=jnp.zeros((3,), jnp.int32))
    base = np.asarray(model(ids, mask, dec))
    assert_parity(base, torch_logits(hf, ids, mask, dec))  # adapters do not disturb the loaded base weights
    # LoRA starts with B = 0: the adapted model equals the base model until B moves.
    np.testing.assert_array_equal(np.asarray(model(ids, mask, dec, ctx=ctx)), base)
    for _, lin in adapted_linears(model):
        lin.adapter.B[...] = 0.1 * jnp.ones_like(lin.adapter.B[...])
    assert np.abs(np.asarray(model(ids, mask, dec, ctx=ctx)) - base).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(model(ids, mask, dec)), base)  # ctx=None: adapters off
    off = AdapterContext(task_ids=ctx.task_ids, adapters_enabled=False)
    np.testing.assert_array_equal(np.asarray(model(ids, mask, dec, ctx=off)), base)
    for path, var in nnx.iter_graph(model):  # adapter parameters carry logical axes like the base ones
        if isinstance(var, AdapterParam):
            axes = logical_axes(var)
            assert axes is not None and len(axes) == var.ndim, (path, axes)


def test_ept_injection_routes_per_example_and_sows_encoder_losses(hf_models, loaded):
    _, d = hf_models["v1_0"]
    # Two targets of one shape keep the test fast (one adapter program to compile); every name/stack case is
    # covered by LoRA above. The contrastive loss counts in the encoder only (the default, as in the paper).
    inj = Injection(AdapterConfig(kind="ept", r=4, alpha=16.0, dropout=0.0, n_tasks=2), targets=("q", "v"))
    model = load.from_pretrained(d, injection=inj)
    assert len(adapted_linears(model)) == 2 * 2 + 2 * 4  # decoder blocks adapt EncDecAttention's q, v too
    ids, mask, dec, _ = batch()
    base = np.asarray(loaded["v1_0"](ids, mask, dec))
    graphdef, trainable, frozen = nnx.split(model, AdapterParam, ...)

    def forward(tr, task_ids):
        m = nnx.merge(graphdef, tr, frozen)
        return m(ids, mask, dec, ctx=AdapterContext(task_ids=task_ids)), pop_aux_losses(m)

    # XLA's CPU backend at optimisation level 0 compiles EPT's many small ops much faster; same numbers.
    task_ids = jnp.asarray([0, 0, 0])
    forward = jax.jit(forward).lower(trainable, task_ids).compile({"xla_backend_optimization_level": 0})
    t0, _ = forward(trainable, task_ids)
    t01, losses = forward(trainable, jnp.asarray([0, 1, 0]))
    t0, t01 = np.asarray(t0), np.asarray(t01)
    assert np.abs(t0 - base).max() > 1e-3  # the reference variant is not zero at init
    np.testing.assert_allclose(t01[[0, 2]], t0[[0, 2]], atol=1e-5)  # each example follows its own task
    assert np.abs(t01[1] - t0[1]).max() > 1e-4
    assert len(losses) == 2 * 2 and all(np.isfinite(float(v)) for v in losses)  # encoder q, v in 2 blocks


@pytest.mark.parametrize(
    "targets, bad", [(("q", "wi"), "wi"), (("q", "lm_head"), "lm_head"), (("q_proj",), "q_proj")]
)
def test_injection_rejects_unknown_target(hf_models, targets, bad):
    inj = Injection(AdapterConfig(kind="lora", r=4), targets=targets)
    accepted = r"\['k', 'o', 'q', 'v', 'wi_0', 'wi_1', 'wo'\]"
    with pytest.raises(ValueError, match=rf"\['{bad}'\].*accepted: {accepted}"):
        load.from_pretrained(hf_models["v1_1"][1], injection=inj)


# ------------------------------------------------------------------------------------------------ dtype


def test_bfloat16_policy_and_overflow_guard(hf_models):
    hf, d = hf_models["v1_1"]
    model = load.from_pretrained(d, dtype="bfloat16", param_dtype="bfloat16")
    assert model.encoder.block[0].layer[0].SelfAttention.q.kernel[...].dtype == jnp.bfloat16
    ids, mask, dec, _ = batch()
    graphdef, state = nnx.split(model)  # one compiled program: cheaper than compiling bfloat16 ops eagerly
    logits = np.asarray(jax.jit(lambda st: nnx.merge(graphdef, st)(ids, mask, dec))(state))
    ref = torch_logits(hf, ids, mask, dec)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    # bfloat16 keeps 8 mantissa bits: agreement to a few percent of the logit scale.
    assert np.abs(logits - ref).max() <= 0.05 * np.abs(ref).max() + 0.05
    big = jnp.asarray([jnp.inf, -jnp.inf, 3.0], jnp.bfloat16)
    clamped = np.asarray(t5.model._clamp(big).astype(jnp.float32))
    assert np.isfinite(clamped).all() and clamped[0] > 1e38 and clamped[2] == 3.0
    f32 = jnp.asarray([jnp.inf], jnp.float32)
    assert t5.model._clamp(f32) is f32  # float32 (the safe choice) is left untouched, as transformers does
    with pytest.raises(ValueError, match="param_dtype='float16'"):
        t5.T5Model(model.cfg, param_dtype="float16", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="param_dtype='float64' needs jax_enable_x64"):
        t5.T5Model(model.cfg, param_dtype="float64", rngs=nnx.Rngs(0))


def test_bad_inputs_are_clear_errors(loaded):
    model = loaded["v1_0"]
    ids, mask, dec, _ = batch()
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids, mask[:, 1:], dec)
    with pytest.raises(ValueError, match="decoder_input_ids must be an integer array"):
        model(ids, mask, dec[0])
    with pytest.raises(ValueError, match="input_ids must be an integer array"):
        model(ids.astype(np.float32), mask, dec)
