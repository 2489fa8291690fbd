"""LLaMA-2-7B, multi-task EPT on BoolQ, OpenBookQA, ARC-Easy and ARC-Challenge: the paper's LLaMA setting.

``python -m train.main --config configs/llama_commonsense.py --workdir runs/llama_commonsense``
(parameter counts offline: ``python -m train.inspect --config configs/llama_commonsense.py``: A + B + kernels =
16,120,320, from the recorded ``model.arch`` = the checkpoint's ``config.json`` fields).

* Model: ``meta-llama/Llama-2-7b-hf`` (a hub id, gated: log in first; or a local directory / ``.gguf`` file with
  ``--config.model.name_or_path=...``), bfloat16 weights and activations.
* Adapters: EPT "reference" variant (what the released code computes) with the release's settings: r 8,
  alpha 32, kernels [2,2,4,4,6,6,8,8], top-2 routing, dropout 0.1, and, as the release, **no contrastive
  loss** (its LLaMA modelling code is unmodified, so the task embeddings learn through routing only;
  ``--config.adapter.contrastive_lambda=0.1`` adds ept_jax's term on the decoder's Linears, mean over them);
  in ``q_proj, k_proj, v_proj, o_proj, up_proj, down_proj`` of every decoder layer (the injector's names are
  transformers' module names; ``gate_proj`` is not adapted).
* Tasks and prompts (``ept_jax.data.tasks.commonsense``): ``"boolq passage: ... question: ..."`` -> ``yes`` / ``no``;
  ``"arc question: ... choices: (A) ... (D) ..."`` -> the letter (numeric labels 1-4 mapped to A-D);
  ``"openbookqa question: ... choices: ..."`` -> the letter. PIQA is registered too: add ``piqa`` to
  ``data.tasks`` (``--config.data.tasks="('boolq','openbookqa','arc_e','arc_c','piqa')"``).
* Data: ``data.path="hub"`` reads each task's public copy (``google/boolq``, ``allenai/ai2_arc``,
  ``allenai/openbookqa``) with ``datasets.load_dataset``; a directory of ``save_to_disk`` copies (one
  ``<task>/`` sub-directory each) works offline. Protocol "reference": train on ``train``, select and report on
  ``validation``.
* Loss: cross-entropy on the answer tokens (and the EOS after them) only: the prompt tokens are inputs, never
  targets (``ept_jax.data.batching.collate_decoder_only``'s ``label_mask``). Prompts longer than 256 tokens
  lose tokens from the left (the question sits at the end).
* Accuracy: greedy generation of up to 4 tokens after the prompt, parsed into ``yes`` / ``no`` or a letter
  (``ept_jax.data.tasks.parse_yes_no`` / ``choice_letter_parser``) and compared with the answer.
* Training (our schedule: the adapter settings above are the release's, its LLaMA schedule is not recorded
  here): AdamW lr 3e-4, weight decay 0.01, batch 32, 3 epochs of the task mixture (BoolQ 9,427 + OBQA 4,957 +
  ARC-E 2,251 + ARC-C 1,119 = 17,754 training rows -> 1,665 steps), warm-up 100 steps, evaluation every 200 steps
  on the validation splits keeping the best checkpoint by the mean accuracy.
"""

from configs import archs
from configs.common import base_config

TASKS = ("boolq", "openbookqa", "arc_e", "arc_c")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def get_config():
    c = base_config()
    c.model.family = "llama"
    c.model.name_or_path = "meta-llama/Llama-2-7b-hf"
    c.model.arch = dict(archs.LLAMA2_7B)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"

    c.adapter.targets = TARGETS
    c.adapter.contrastive_lambda = 0.0  # the release's LLaMA has no contrastive term
    c.adapter.contrastive_stacks = ("decoder",)  # where it goes when turned on: LLaMA's Linears are the "decoder" stack
    c.adapter.contrastive_divisor = None  # mean over those Linears (the release's /72 is its T5 encoder's)

    c.data.source = "commonsense"
    c.data.path = "hub"
    c.data.tasks = TASKS
    c.data.eval_protocol = "reference"
    c.data.max_source_length = 256
    c.data.max_target_length = 4

    c.train.steps = 1_665
    c.train.batch_size = 32
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 100
    c.train.log_every = 20
    c.train.eval_every = 200
    c.train.checkpoint_every = 200

    c.eval.batch_size = 64
    c.eval.max_new_tokens = 4
    return c
