"""The benchmarked models, their training configs and their batches.

Every model starts as a randomly initialised Hugging Face (PyTorch) model of the architecture, built once per
model; ept_jax's models receive its exact weights through the checkpoint loader's mapping table
(:func:`ept_jax.checkpoints.hf.load_into` with the family's ``hf_rules``), so the JAX rows and the PyTorch peer
run identical base weights. Training configs are the program's own (``configs.common.base_config``) with the
model, the adapter and the task count set; the training rows then go through ``train.state`` and
``train.steps`` exactly as ``python -m train.main`` does.

Shapes: ``B`` batch, ``Ls``/``Lt`` source/target lengths (T5), ``L`` sequence length (LLaMA), ``d`` model width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from configs.archs import SMOLLM2_135M

# T5-small's architecture (d_model 512, 6 + 6 layers, 8 heads, ReLU feed-forward, tied embeddings).
T5_SMALL = {
    "model_type": "t5", "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6,
    "num_decoder_layers": 6, "num_heads": 8, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu",
    "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}
# --quick: one layer per stack, one adapted Linear name and three experts keep the ~15 compiled programs per
# model small (XLA's CPU compile time, not the run, is what the quick mode spends).
T5_TINY = {**T5_SMALL, "vocab_size": 384, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 1,
           "num_decoder_layers": 1, "num_heads": 4}
LLAMA_TINY = {**SMOLLM2_135M, "vocab_size": 384, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}

T5_TARGETS = ("q", "k", "v", "o", "wi", "wo")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model and the shapes its rows use.

    Attributes:
      name: the row prefix (``t5_small``, ``smollm2_135m``, ...).
      family: ``"t5"`` or ``"llama"``.
      arch: the Hugging Face ``config.json`` fields.
      targets: adapted Linears (the same for EPT, LoRA and PEFT).
      kernel_sizes: EPT expert kernel sizes; every one divides every adapted width, so the paper variant runs.
      batch: ``B``; seq: ``Ls`` (T5) or ``L`` (LLaMA); target_len: ``Lt`` (T5 only).
      gen_prompt / gen_new: generation prompt length and number of greedy tokens.
      seq_sweep / expert_sweep: the other sequence lengths and expert counts of the sweeps.
    """

    name: str
    family: str
    arch: dict
    targets: tuple[str, ...]
    kernel_sizes: tuple[int, ...]
    batch: int
    seq: int
    target_len: int
    gen_prompt: int
    gen_new: int
    seq_sweep: tuple[int, ...]
    expert_sweep: tuple[int, ...]

    def shapes(self, seq: int | None = None) -> dict[str, int]:
        """The training shapes at sequence length ``seq`` (default: the main one)."""
        seq = self.seq if seq is None else seq
        if self.family == "t5":
            return {"batch": self.batch, "source_len": seq, "target_len": self.target_len}
        return {"batch": self.batch, "seq_len": seq}

    def kernels(self, n_experts: int) -> tuple[int, ...]:
        """The first ``n_experts`` kernel sizes in pyramid order (one of each size before any repeat)."""
        if not 1 <= n_experts <= len(self.kernel_sizes):
            raise ValueError(f"n_experts={n_experts}: accepted 1..{len(self.kernel_sizes)} for {self.name}")
        distinct = sorted(set(self.kernel_sizes))
        rest = list(self.kernel_sizes)
        for k in distinct:
            rest.remove(k)
        return tuple(sorted((distinct + sorted(rest))[:n_experts]))


N_TASKS = 8  # the GLUE task count; every row routes a batch spread over all tasks

FULL = (
    ModelSpec("t5_small", "t5", T5_SMALL, T5_TARGETS, (2, 2, 4, 4, 8, 8, 16, 16), batch=8, seq=128, target_len=32,
              gen_prompt=128, gen_new=32, seq_sweep=(64, 256), expert_sweep=(2, 4)),
    ModelSpec("smollm2_135m", "llama", SMOLLM2_135M, LLAMA_TARGETS, (2, 2, 4, 4, 6, 6, 8, 8), batch=8, seq=128,
              target_len=0, gen_prompt=64, gen_new=32, seq_sweep=(64, 256), expert_sweep=(2, 4)),
)
QUICK = (
    ModelSpec("t5_tiny", "t5", T5_TINY, ("q",), (2, 4, 8), batch=2, seq=16, target_len=8,
              gen_prompt=8, gen_new=4, seq_sweep=(8,), expert_sweep=(2,)),
    ModelSpec("llama_tiny", "llama", LLAMA_TINY, ("q_proj",), (2, 4, 8), batch=2, seq=16,
              target_len=0, gen_prompt=8, gen_new=4, seq_sweep=(8,), expert_sweep=(2,)),
)


def specs(quick: bool, names: tuple[str, ...] | None = None) -> tuple[ModelSpec, ...]:
    """The models of a run, optionally only those named.

    Raises:
      ValueError: a name that is not a model of this mode.
    """
    pool = QUICK if quick else FULL
    if not names:
        return pool
    known = {s.name: s for s in pool}
    bad = [n for n in names if n not in known]
    if bad:
        other = sorted(s.name for s in (FULL if quick else QUICK))
        raise ValueError(f"--models {bad}: accepted {sorted(known)} in this mode (the {'full' if quick else '--quick'} "
                         f"mode has {other})")
    return tuple(known[n] for n in names)


# --------------------------------------------------------------------------------------------------- models


def _hf_kwargs(arch: dict) -> dict:
    return {k: v for k, v in arch.items() if k != "model_type"}


def hf_model(spec: ModelSpec, seed: int = 0):
    """A random transformers model of ``spec.arch`` in train mode with its own dropout off (the frozen base runs
    without dropout in ept_jax too); float32."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if spec.family == "t5":
        cfg = transformers.T5Config(**_hf_kwargs(spec.arch), dropout_rate=0.0)
        model = transformers.T5ForConditionalGeneration(cfg)
    else:
        cfg = transformers.LlamaConfig(**_hf_kwargs(spec.arch), attention_dropout=0.0)
        model = transformers.LlamaForCausalLM(cfg)
    return model.float().train()


def hf_tensors(model) -> dict[str, np.ndarray]:
    """``{hf_name: array}`` of a transformers model's weights (copies, so later PEFT surgery cannot alias)."""
    return {k: v.detach().cpu().float().numpy().copy() for k, v in model.state_dict().items()}


#: ``model.scan_layers`` of every JAX row (``benchmarks.run --unrolled-layers`` sets False; see
#: :mod:`ept_jax.models.layer_scan`)
SCAN_LAYERS = True
#: ``model.param_dtype`` of every JAX row (the frozen base weights' storage), None = the config's default
#: (``benchmarks.gpu_suite`` sets bfloat16)
PARAM_DTYPE: str | None = None


def bench_config(spec: ModelSpec, adapter: dict[str, Any] | None, *, dtype: str = "float32"):
    """The program's config (``configs.common.base_config``) for ``spec`` with ``adapter`` overrides.

    ``adapter``: keys of ``config.adapter`` (``kind``, ``variant``, ``forward_path``, ``expert_kernel_sizes``...);
    None = no adapter. Tasks are :data:`N_TASKS` placeholders (only their count matters to a step).
    """
    from configs.common import base_config

    c = base_config()
    c.model.family = spec.family
    c.model.name_or_path = f"random-{spec.name}"
    c.model.random_init = True
    c.model.arch = dict(spec.arch)
    c.model.dtype = dtype
    c.model.scan_layers = SCAN_LAYERS
    if PARAM_DTYPE is not None:
        c.model.param_dtype = PARAM_DTYPE
    c.adapter.targets = spec.targets
    c.adapter.expert_kernel_sizes = spec.kernel_sizes
    c.adapter.kind = "none"
    if adapter is not None:
        c.adapter.kind = "ept"
        for k, v in adapter.items():
            c.adapter[k] = v
    c.data.tasks = tuple(f"task{i}" for i in range(N_TASKS))
    return c


def jax_model(config, tensors: dict[str, np.ndarray]) -> nnx.Module:
    """The ept_jax model of ``config`` (adapters from ``train.seed``) holding the base weights ``tensors``."""
    from ept_jax.checkpoints.hf import load_into
    from ept_jax.checkpoints.load import hf_mapping
    from train.state import build_model

    model = build_model(config)
    rules, ignore = hf_mapping(str(config.model.family), model.cfg)
    load_into(model, tensors, rules, ignore=ignore, source="the HF model")
    return model


# --------------------------------------------------------------------------------------------------- batches


def train_batch(spec: ModelSpec, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A training batch in ``ept_jax.data``'s format, no padding (every row costs the same), tasks round robin.

    T5: ``input_ids``/``attention_mask (B, Ls)``, ``decoder_input_ids``/``labels``/``label_mask (B, Lt)``;
    LLaMA: ``input_ids``/``attention_mask``/``labels``/``label_mask (B, L)``; both ``task_ids (B,)``. int32.
    """
    rs = np.random.RandomState(seed)
    vocab, b = int(spec.arch["vocab_size"]), spec.batch
    out = {"task_ids": (np.arange(b) % N_TASKS).astype(np.int32)}
    if spec.family == "t5":
        labels = rs.randint(2, vocab, (b, spec.target_len)).astype(np.int32)
        out.update(input_ids=rs.randint(2, vocab, (b, seq)).astype(np.int32),
                   attention_mask=np.ones((b, seq), np.int32),
                   decoder_input_ids=np.concatenate([np.zeros((b, 1), np.int32), labels[:, :-1]], axis=1),
                   labels=labels, label_mask=np.ones_like(labels))
    else:
        ids = rs.randint(2, vocab, (b, seq + 1)).astype(np.int32)
        out.update(input_ids=ids[:, :-1], attention_mask=np.ones((b, seq), np.int32), labels=ids[:, 1:],
                   label_mask=np.ones((b, seq), np.int32))
    return out


def prompt_batch(spec: ModelSpec, seed: int = 1) -> dict[str, np.ndarray]:
    """Generation prompts: ``input_ids``/``attention_mask (B, gen_prompt)`` (no padding), ``task_ids (B,)``."""
    rs = np.random.RandomState(seed)
    b, p = spec.batch, spec.gen_prompt
    return {"input_ids": rs.randint(2, int(spec.arch["vocab_size"]), (b, p)).astype(np.int32),
            "attention_mask": np.ones((b, p), np.int32), "task_ids": (np.arange(b) % N_TASKS).astype(np.int32)}


def tokens(spec: ModelSpec, shapes: dict[str, int]) -> int:
    """Tokens one training step processes: ``B * (Ls + Lt)`` (T5) or ``B * L`` (LLaMA)."""
    if spec.family == "t5":
        return shapes["batch"] * (shapes["source_len"] + shapes["target_len"])
    return shapes["batch"] * shapes["seq_len"]


def count(tree) -> int:
    """Number of scalars in a pytree of arrays."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def frozen_flops(spec: ModelSpec, frozen: nnx.State, shapes: dict[str, int]) -> float:
    """``4 N`` FLOPs per token for frozen weights (forward 2N, gradient to the activations 2N), per step.

    Each parameter is counted once per token that passes through it: the T5 encoder's over ``B * Ls`` tokens,
    its decoder's and the (tied) output projection over ``B * Lt``; a LLaMA's over ``B * L``, the tied embedding
    as the output projection (the input lookup is no matmul). Attention score FLOPs are not counted.
    """
    flat = {".".join(str(p) for p in path): int(np.prod(v.shape)) for path, v in nnx.to_flat_state(frozen)}
    if spec.family == "t5":
        enc = sum(n for k, n in flat.items() if k.startswith("encoder."))
        dec = sum(n for k, n in flat.items() if not k.startswith("encoder."))  # decoder, shared (= lm_head), lm_head
        if not spec.arch.get("tie_word_embeddings", True):
            dec -= sum(n for k, n in flat.items() if k.startswith("shared."))  # an input lookup only
        return 4.0 * (enc * shapes["batch"] * shapes["source_len"] + dec * shapes["batch"] * shapes["target_len"])
    n = sum(flat.values())
    if not spec.arch.get("tie_word_embeddings", False):
        n -= sum(v for k, v in flat.items() if k.startswith("model.embed_tokens."))
    return 4.0 * n * shapes["batch"] * shapes["seq_len"]
