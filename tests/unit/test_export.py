"""Export to PyTorch: merged Hugging Face models and exact PEFT LoRA adapters reproduce ept_jax.

For T5 v1.0 (tied, ReLU), T5 v1.1 (gated-GELU, untied head, fewer decoder layers) and LLaMA (GQA, tied),
each with EPT's reference and paper variants and with LoRA: the batch mixes two tasks, both tasks are
exported to both formats, and transformers (merged) and PEFT on the unmodified base must give ept_jax's
logits to 1e-4 and its greedy generations token for token, while the adapter must change the base model's
output. Also: PEFT loads every tensor of the file (it would skip wrongly named keys with only a warning), tied
embeddings stay tied, tokenizer files are copied, exports are atomic, and ``python -m train.export --workdir``
exports a training run's checkpoints. Tiny random models built here; offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ept_jax.adapters.base import adapted_linears
from ept_jax.adapters.config import AdapterConfig  # noqa: E402
from ept_jax.adapters.inject import Injection, inject
from ept_jax.checkpoints import (  # noqa: E402
    export,  # noqa: E402
    llama_map,
    t5_map,
)
from ept_jax.checkpoints.hf import load_into, read_tensors  # noqa: E402
from ept_jax.core.params import AdapterContext, AdapterParam  # noqa: E402
from ept_jax.models import llama, t5  # noqa: E402

VOCAB = 64
TASKS = (1, 2)  # row i of every batch belongs to task TASKS[i]
N_NEW = 6
TOL = 1e-4
T5_COMMON = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
    dropout_rate=0.0,
)
# One block per stack where possible: compile time grows with depth, and the layer index mapping of deeper
# models is exercised by T5 v1.1's encoder here and by the two-layer fixtures of test_export_reference.py.
ARCHS = {
    "t5_v1_0": (
        "t5",
        dict(T5_COMMON, num_layers=1, num_decoder_layers=1, feed_forward_proj="relu"),
        ("q", "v", "wi", "wo"),
    ),
    "t5_v1_1": (
        "t5",
        dict(
            T5_COMMON,
            num_layers=2,
            num_decoder_layers=1,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
        ),
        ("k", "o", "wi_0", "wi_1"),
    ),
    "llama": (
        "llama",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ),
}
ADAPTERS = {
    # fewer experts than the release's eight keep XLA's compiles short (the release's own configuration is
    # exported in test_export_reference.py); 6 divides none of 32 / 64, which exercises the zero padding
    "ept_reference": AdapterConfig(
        kind="ept",
        variant="reference",
        r=4,
        alpha=8.0,
        expert_kernel_sizes=(2, 4, 6, 8),
        top_k=2,
        n_tasks=3,
        dropout=0.0,
    ),
    "ept_paper": AdapterConfig(
        kind="ept",
        variant="paper",
        r=2,
        alpha=4.0,
        expert_kernel_sizes=(2, 4, 8),
        top_k=2,
        n_tasks=3,
        dropout=0.0,
    ),
    "lora": AdapterConfig(kind="lora", r=4, alpha=8.0, n_tasks=3, dropout=0.0),
    # the competitors that merge per task (ept_jax.competitors); MOELoRA's router is shared by all Linears
    "more": AdapterConfig(kind="more", variant="reference", r=4, alpha=8.0, n_tasks=3, dropout=0.0),
    "moelora_release": AdapterConfig(kind="moelora_release", r=8, n_moe_experts=4, alpha=16.0, n_tasks=3,
                                     dropout=0.0),
}


# --------------------------------------------------------------------------------------------------- models


def _hf_model(arch: str):
    """A random transformers model of ``arch`` whose weights are scaled so greedy outputs vary per step."""
    family, kwargs, _ = ARCHS[arch]
    torch.manual_seed(0)
    if family == "t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**kwargs)).eval()
        if not kwargs.get("tie_word_embeddings", True):
            # transformers 5 ties T5's lm_head to the embeddings whatever the config says: untie by hand.
            model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
            model.config.tie_word_embeddings = False
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-1.5, 1.5)  # both signs: a tied head then does not just echo the input token
            elif p.ndim == 2 and not any(s in name for s in ("relative", "shared", "embed_tokens")):
                p.normal_(0.0, 1.2 / p.shape[1] ** 0.5)
            else:
                p.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """``{arch: saved base directory}``; T5 v1.0's also holds a tokenizer (to check it is copied)."""
    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(arch)
        _hf_model(arch).save_pretrained(d)
        if arch == "t5_v1_0":
            transformers.ByT5Tokenizer().save_pretrained(d)
        out[arch] = d
    return out


def _jax_model(arch: str, adapter: AdapterConfig, base_dir: Path, seed: int = 0):
    """ept_jax's model of ``arch`` with ``base_dir``'s weights and random, clearly non-zero adapters.

    Built abstractly and filled directly (no initialiser is compiled): adapter parameters get
    ``N(0, (0.5 / sqrt(last dim))^2)`` (the paper variant's zero kernels and LoRA's zero ``B`` would otherwise
    make the exports trivially equal to the base), then the base weights are loaded strictly.
    """
    family, _, targets = ARCHS[arch]
    config = json.loads((base_dir / "config.json").read_text())
    if family == "t5":
        cfg, model_cls, table = t5.T5Config.from_hf(config), t5.T5Model, t5_map
    else:
        cfg, model_cls, table = llama.LlamaConfig.from_hf(config), llama.LlamaModel, llama_map
    # contrastive_stacks=(): the contrastive loss does not change logits; skipping it keeps compiles small
    injection = Injection(adapter=adapter, targets=targets, contrastive_stacks=())
    abstract = nnx.eval_shape(lambda: inject(model_cls(cfg, rngs=nnx.Rngs(0)), injection, rngs=0))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.5 / s.shape[-1] ** 0.5, s.shape), s.dtype), state
    )
    model = nnx.merge(graphdef, state)
    for _, lin in adapted_linears(model):
        if getattr(lin.adapter, "expert", None) is not None:
            lin.adapter.fix_routing()  # MoRE's release: k_t from the (randomised) gate, as at its first use
    load_into(model, read_tensors(base_dir), table.hf_rules(cfg), ignore=table.hf_ignore(cfg))
    return model


def _inputs(family: str) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(1)
    if family == "t5":
        dec = np.concatenate([np.zeros((2, 1), np.int64), rs.randint(2, VOCAB, (2, 4))], axis=1)
        return dict(input_ids=rs.randint(2, VOCAB, (2, 7)), decoder_input_ids=dec)
    return dict(input_ids=rs.randint(3, VOCAB, (2, 6)))


def _jax_outputs(model, family: str, inputs) -> tuple[np.ndarray, np.ndarray]:
    """ept_jax's logits and greedy generations (``N_NEW`` tokens), row ``i`` routed to task ``TASKS[i]``."""
    ids = jnp.asarray(inputs["input_ids"], jnp.int32)
    mask = jnp.ones_like(ids)
    ctx = AdapterContext(task_ids=jnp.asarray(TASKS, jnp.int32))
    graphdef, state = nnx.split(model)
    if family == "t5":
        dec = jnp.asarray(inputs["decoder_input_ids"], jnp.int32)

        def forward(state, ctx):
            return nnx.merge(graphdef, state)(ids, mask, dec, None, ctx)

        gen = t5.generate(model, ids, mask, ctx, max_new_tokens=N_NEW, eos_token_id=1, pad_token_id=0)
    else:

        def forward(state, ctx):
            return nnx.merge(graphdef, state)(ids, mask, ctx)

        gen = llama.generate(model, ids, mask, ctx, max_new_tokens=N_NEW, eos_token_id=2, pad_token_id=0)
    # XLA's CPU backend at optimisation level 0 compiles EPT's many small ops in half the time; same numbers.
    compiled = jax.jit(forward).lower(state, ctx).compile({"xla_backend_optimization_level": 0})
    return np.asarray(compiled(state, ctx)), np.asarray(gen)


def _torch_outputs(model, family: str, inputs) -> tuple[np.ndarray, np.ndarray]:
    """transformers' (or PEFT's) logits and greedy generations, padded with 0 after an early stop."""
    ids = torch.tensor(inputs["input_ids"])
    kw = dict(max_new_tokens=N_NEW, do_sample=False, num_beams=1, pad_token_id=0)
    with torch.no_grad():
        if family == "t5":
            logits = model(input_ids=ids, decoder_input_ids=torch.tensor(inputs["decoder_input_ids"])).logits
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                eos_token_id=1,
                decoder_start_token_id=0,
                **kw,
            )[:, 1:]
        else:
            logits = model(input_ids=ids).logits
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=2, **kw)[
                :, ids.shape[1] :
            ]
    gen = gen.numpy()
    return logits.numpy(), np.pad(gen, ((0, 0), (0, N_NEW - gen.shape[1])), constant_values=0)


def _auto(family: str):
    return transformers.AutoModelForSeq2SeqLM if family == "t5" else transformers.AutoModelForCausalLM


def _peft_loaded_exactly(model, adapter_dir: Path) -> None:
    """Every tensor of the adapter file is in the PEFT model unchanged, and PEFT made no other LoRA weight."""
    from safetensors.numpy import load_file

    file = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loaded = {
        n.replace(".default", ""): p.detach().numpy() for n, p in model.named_parameters() if "lora_" in n
    }
    assert set(loaded) == set(file)
    for k, v in file.items():
        np.testing.assert_array_equal(loaded[k], v, err_msg=k)


# ------------------------------------------------------------------------------------------------ round trips


# The competitors' merge / to_lora do not depend on the architecture: one architecture each keeps CI short.
COMPETITOR_ARCH = {"more": "t5_v1_1", "moelora_release": "llama"}
CASES = [(arch, a) for arch in ARCHS for a in ADAPTERS if COMPETITOR_ARCH.get(a, arch) == arch]


@pytest.mark.parametrize("arch, adapter", CASES)
def test_exports_reproduce_ept_jax(bases, tmp_path, arch, adapter):
    family = ARCHS[arch][0]
    base_dir = bases[arch]
    model = _jax_model(arch, ADAPTERS[adapter], base_dir)
    inputs = _inputs(family)
    want_logits, want_gen = _jax_outputs(model, family, inputs)
    tasks = {f"task_{t}": t for t in TASKS}
    export.export_adapter(model, tmp_path / "merged", tasks, format="merged", base_dir=base_dir)
    export.export_adapter(model, tmp_path / "peft", tasks, format="peft", base_dir=base_dir)

    auto = _auto(family)
    base_logits, _ = _torch_outputs(auto.from_pretrained(base_dir).eval(), family, inputs)
    # the adapters must matter, or the comparisons below prove nothing
    assert np.abs(want_logits - base_logits).max() > 0.05
    for row, t in enumerate(TASKS):
        merged_dir = tmp_path / "merged" / f"task_{t}"
        merged, info = auto.from_pretrained(merged_dir, output_loading_info=True)
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
        logits, gen = _torch_outputs(merged.eval(), family, inputs)
        np.testing.assert_allclose(
            logits[row], want_logits[row], atol=TOL, rtol=0, err_msg=f"merged task {t}"
        )
        np.testing.assert_array_equal(gen[row], want_gen[row], err_msg=f"merged task {t}")

        peft_dir = tmp_path / "peft" / f"task_{t}"
        on_base = peft.PeftModel.from_pretrained(auto.from_pretrained(base_dir), peft_dir).eval()
        _peft_loaded_exactly(on_base, peft_dir)
        logits, gen = _torch_outputs(on_base, family, inputs)
        np.testing.assert_allclose(logits[row], want_logits[row], atol=TOL, rtol=0, err_msg=f"peft task {t}")
        np.testing.assert_array_equal(gen[row], want_gen[row], err_msg=f"peft task {t}")

    cfg = json.loads((tmp_path / "peft" / "task_1" / "adapter_config.json").read_text())
    assert cfg["task_type"] == ("SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM")
    assert cfg["base_model_name_or_path"] == str(base_dir)
    assert cfg["target_modules"] == sorted(lin.name for _, lin in adapted_linears(model))
    if adapter == "ept_paper":
        # its rank r * (k_i + k_j) depends on each module's routing: rank_pattern / alpha_pattern are used
        assert cfg["rank_pattern"] and cfg["alpha_pattern"] == cfg["rank_pattern"]
    if arch == "t5_v1_0":
        names = {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"}
        assert names <= {p.name for p in merged_dir.iterdir()}
        for p in base_dir.iterdir():
            if p.name in export.TOKENIZER_FILES:
                assert (merged_dir / p.name).read_bytes() == p.read_bytes(), p.name
        from safetensors.numpy import load_file

        # tied T5 v1.0 stays tied: one embedding matrix, no lm_head of its own
        keys = set(load_file(str(merged_dir / "model.safetensors")))
        assert "shared.weight" in keys and "lm_head.weight" not in keys


# --------------------------------------------------------------------------------------------------- library


@pytest.fixture(scope="module")
def small(bases):
    """A cheap adapted model (LLaMA + LoRA) for the checks that do not need a forward pass."""
    return _jax_model("llama", ADAPTERS["lora"], bases["llama"])


def test_merged_state_dict_adds_exactly_the_delta(small):
    base = export.hf.export_from(small, llama_map.hf_rules(small.cfg))
    merged = export.merged_state_dict(small, 1)
    assert set(merged) == set(base)
    adapted = {f"{lin.name}.weight": lin for _, lin in adapted_linears(small)}
    for key, value in merged.items():
        if key in adapted:
            delta = np.asarray(adapted[key].adapter.merge(1))
            np.testing.assert_allclose(value - base[key], delta, atol=1e-6, err_msg=key)
            assert np.abs(delta).max() > 1e-3
        else:
            np.testing.assert_array_equal(value, base[key], err_msg=key)


def test_lora_factors_multiply_to_the_delta(small):
    tensors, ranks = export.lora_state_dict(small, 2)
    for _, lin in adapted_linears(small):
        a = tensors[f"base_model.model.{lin.name}.lora_A.weight"]
        b = tensors[f"base_model.model.{lin.name}.lora_B.weight"]
        assert (
            a.shape == (ranks[lin.name], lin.base.kernel.shape[0]) and b.shape[0] == lin.base.kernel.shape[1]
        )
        np.testing.assert_allclose(b @ a, np.asarray(lin.adapter.merge(2)), atol=1e-6)


def test_peft_config_patterns_keep_every_scale_at_one():
    cfg = export.peft_config(
        {"x.q": 4, "x.v": 4, "y.q": 8}, task_type="CAUSAL_LM", base_model_name_or_path="b"
    )
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 4)
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {"y.q": 8}
    assert cfg["target_modules"] == ["x.q", "x.v", "y.q"]
    assert (cfg["peft_type"], cfg["lora_dropout"], cfg["bias"], cfg["use_rslora"]) == (
        "LORA",
        0.0,
        "none",
        False,
    )


def test_bfloat16_export_declares_its_dtype(small, bases, tmp_path):
    export.export_adapter(
        small, tmp_path / "bf16", 1, format="merged", base_dir=bases["llama"], dtype="bfloat16"
    )
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert next(m.parameters()).dtype == torch.bfloat16
    full = export.merged_state_dict(small, 1)
    w = m.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_allclose(w, full["model.layers.0.self_attn.q_proj.weight"], rtol=1e-2, atol=1e-3)
    assert export.resolve_dtype("base", {"torch_dtype": "float16"}) == "float16"
    with pytest.raises(export.ExportError, match="accepted"):
        export.resolve_dtype("int8")


@pytest.mark.parametrize(
    "task, message", [(3, "out of range"), (-1, "out of range"), ("1", "integer task id")]
)
def test_bad_tasks_are_refused_before_writing(small, tmp_path, task, message):
    with pytest.raises(export.ExportError, match=message):
        export.export_adapter(small, tmp_path / "out", {"a": 0, "b": task}, format="merged")
    assert not (tmp_path / "out").exists()
    with pytest.raises(export.ExportError, match="format"):
        export.export_adapter(small, tmp_path / "out", 0, format="gguf")


def test_non_mergeable_adapters_are_refused(small, tmp_path):
    _, lin = adapted_linears(small)[3]
    lin.adapter.mergeable = False  # what a token-routed adapter declares
    try:
        for fmt in export.FORMATS:
            with pytest.raises(export.ExportError, match=f"{lin.name}: .* not mergeable"):
                export.export_adapter(
                    small, tmp_path / fmt, 0, format=fmt, base_dir=None, base_model_name_or_path="base"
                )
    finally:
        lin.adapter.mergeable = True
    assert not list(tmp_path.iterdir())


# -------------------------------------------------------------------------------------------------- atomicity


def test_failure_mid_export_leaves_nothing(small, bases, tmp_path, monkeypatch):
    calls = []
    real = export.write_safetensors

    def failing(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the first task is fully written, the second fails half way
            Path(path).write_bytes(b"partial")
            raise OSError("disk full")
        real(path, tensors, metadata)

    monkeypatch.setattr(export, "write_safetensors", failing)
    out = tmp_path / "deep" / "er" / "out"
    with pytest.raises(OSError, match="disk full"):
        export.export_adapter(small, out, {"a": 0, "b": 1}, format="peft", base_dir=bases["llama"])
    assert len(calls) == 2
    assert not (tmp_path / "deep").exists()  # nor the parents this export created
    assert not list(tmp_path.iterdir())


def test_existing_output_is_refused_unless_overwrite(small, bases, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(export.ExportError, match="not empty.*--overwrite"):
        export.export_adapter(small, out, 0, format="peft", base_dir=bases["llama"])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export.export_adapter(small, out, 0, format="peft", base_dir=bases["llama"], overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or moved-aside directory left
    (tmp_path / "empty").mkdir()  # an existing empty directory is simply filled
    export.export_adapter(small, tmp_path / "empty", 0, format="peft", base_dir=bases["llama"])
    assert (tmp_path / "empty" / "adapter_model.safetensors").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(export.ExportError, match="not a directory"):
        export.export_adapter(small, tmp_path / "file", 0, format="peft", base_dir=bases["llama"])


# ---------------------------------------------------------------------------------------------- training runs


def _perturbed(trainable, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0.0, 0.1, x.shape), x.dtype), trainable)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A workdir as the trainer leaves it: config.json, checkpoint 5 and best checkpoint 7 (other adapters).

    The smoke config, shrunk: a random T5 base regenerated from ``train.seed`` (so the export must rebuild the
    very base the run trained on) and the ByT5 tokenizer (so the run's tokenizer must be written).
    Returns ``(workdir, {step: model with that checkpoint's adapters})``.
    """
    from configs.smoke import get_config
    from train import configuration, rundir
    from train import state as state_lib
    from train.checkpointing import Checkpointer
    from train.rundir import run_identity

    config = get_config()
    config.model.arch.update(dict(d_model=32, d_kv=8, d_ff=64, num_layers=1))
    workdir = tmp_path_factory.mktemp("run")
    rundir.write_json_atomic(workdir / configuration.CONFIG_FILE, configuration.to_dict(config))
    graphdef, trainable, frozen = nnx.split(state_lib.build_model(config), AdapterParam, ...)
    params = {5: _perturbed(trainable, 5), 7: _perturbed(trainable, 7)}
    tx, _ = state_lib.make_optimizer(config)
    identity = run_identity(config)
    ckpt = Checkpointer(workdir, keep=2)
    ckpt.save(5, params[5], tx.init(params[5]), {**identity, "step": 5, "data_state": {}})
    ckpt.save_best(7, params[7], {**identity, "step": 7, "score": 1.0})
    ckpt.wait()
    ckpt.close()
    return workdir, {s: nnx.merge(graphdef, p, frozen) for s, p in params.items()}


def _cli(argv, capsys) -> tuple[int, str]:
    from train import export as cli

    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_workdir_export_uses_the_best_checkpoint_and_the_runs_base(run_dir, tmp_path, capsys):
    from safetensors.numpy import load_file

    workdir, models = run_dir
    out = tmp_path / "all"
    assert _cli(["--workdir", workdir, "--task", "all", "--format", "merged", "--out", out], capsys)[0] == 0
    tasks = ["syn_copy", "syn_reverse", "syn_sort", "syn_sentiment"]
    assert sorted(p.name for p in out.iterdir()) == sorted(tasks)
    for t, name in enumerate(tasks):
        got = load_file(str(out / name / "model.safetensors"))
        want = export.merged_state_dict(models[7], t)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k}")
    m, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(out / "syn_sort", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    tok = transformers.AutoTokenizer.from_pretrained(out / "syn_sort")
    assert type(tok).__name__ == "ByT5Tokenizer"  # the run's tokenizer (the random base has none)

    one = tmp_path / "step5"
    code, _ = _cli(
        ["--workdir", workdir, "--task", "syn_reverse", "--step", 5, "--format", "merged", "--out", one],
        capsys,
    )
    assert code == 0
    got = load_file(str(one / "model.safetensors"))
    for k, v in export.merged_state_dict(models[5], 1).items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "qnli"], "'qnli' is not a task of this run"),
        (["--task", "syn_copy", "--step", 3], "no checkpoint of that step; available: [5, 7]"),
        (["--task", "syn_copy", "--format", "peft"], "randomly initialised"),
    ],
)
def test_workdir_user_errors_are_one_line(run_dir, tmp_path, capsys, extra, message):
    argv = ["--workdir", run_dir[0], "--out", tmp_path / "out", "--format", "merged", *extra]
    code, err = _cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_run_is_refused(run_dir, tmp_path, capsys):
    import shutil

    workdir = tmp_path / "edited"
    shutil.copytree(run_dir[0], workdir)
    cfg = json.loads((workdir / "config.json").read_text())
    cfg["adapter"]["r"] = 4
    (workdir / "config.json").write_text(json.dumps(cfg))
    code, err = _cli(
        ["--workdir", workdir, "--task", "syn_copy", "--format", "merged", "--out", tmp_path / "o"], capsys
    )
    assert code == 2 and "adapter.r: checkpoint 8, run 4" in err and err.count("\n") == 1, err
    code, err = _cli(
        ["--workdir", tmp_path / "nowhere", "--task", "all", "--format", "merged", "--out", tmp_path / "o"],
        capsys,
    )
    assert code == 2 and "not an ept_jax training run directory" in err
    assert not (tmp_path / "o").exists()
