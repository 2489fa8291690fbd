"""The PyTorch peer: transformers + PEFT LoRA at the same rank, targets, alpha and dropout, one AdamW step.

The Hugging Face model is the very one whose weights the JAX rows received (``benchmarks.setups``), the batch is
the same arrays, and the step does what ``train.steps.make_train_step`` does for LoRA: the masked token
cross-entropy (log-softmax in float32), backward, global-norm clipping at ``train.grad_clip`` and one AdamW update
with weight decay on matrices only. It runs on the device JAX runs on: on a GPU machine whose torch has no CUDA
the row is skipped with that reason.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks import measure, setups
from benchmarks.setups import ModelSpec


def torch_device(jax_backend: str) -> tuple[str | None, str | None]:
    """``(torch device, None)`` matching JAX's backend, or ``(None, reason)`` when torch cannot run there."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed (pip install -e '.[torch]')"
    if jax_backend == "cpu":
        return "cpu", None
    if jax_backend == "gpu" and torch.cuda.is_available():
        return "cuda", None
    return None, f"JAX runs on {jax_backend!r} but this torch ({torch.__version__}) cannot use that device"


def _ce(logits, labels, mask):
    """The masked token cross-entropy as transformers computes it (``F.cross_entropy`` on float32 logits, its
    fused log-softmax + NLL), averaged over ``mask``."""
    import torch

    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), labels.long().flatten(), reduction="none")
    mask = mask.float().flatten()
    return (nll * mask).sum() / mask.sum().clamp_min(1.0)


def peft_row(spec: ModelSpec, hf_model, config, *, reps: int, warmup: int, base_row: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """The ``torch_peft_lora`` row of ``spec`` (``hf_model`` is wrapped by PEFT in place; do not reuse it).

    ``config`` is the LoRA row's config (rank, alpha, dropout, targets, learning rate, clipping, weight decay).
    ``base_row`` supplies ``flops_per_call`` / ``params.base`` so the rows compare like for like.
    """
    from benchmarks.jax_rows import row

    shapes = spec.shapes()
    r = row(spec, "torch_peft_lora", "train", shapes, tokens=setups.tokens(spec, shapes))
    r["framework"] = "torch"
    import jax

    device, reason = torch_device(jax.default_backend())
    if device is None:
        r.update(status="skipped", reason=reason)
        return r
    import peft
    import torch

    a = config.adapter
    lora = peft.LoraConfig(r=int(a.r), lora_alpha=float(a.alpha), lora_dropout=float(a.dropout),
                           target_modules=list(a.targets), bias="none")
    model = peft.get_peft_model(hf_model, lora).to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    t = config.train
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(t.weight_decay)},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=float(t.learning_rate), betas=(0.9, 0.999), eps=1e-8)
    batch = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in setups.train_batch(spec, spec.seq).items()}
    clip = float(t.grad_clip)

    def step():
        opt.zero_grad(set_to_none=True)
        if spec.family == "t5":
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        decoder_input_ids=batch["decoder_input_ids"], use_cache=False)
        else:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        loss = _ce(out.logits, batch["labels"], batch["label_mask"])
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, clip)
        opt.step()
        return loss

    def sync(loss):
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # The first step (the warm-up; it also allocates the AdamW state) is timed apart, like a JAX row's compile,
    # and is the one the RSS sampler watches.
    sampler = measure.RssSampler() if device == "cpu" else None
    if sampler is not None:
        sampler.start()
    t0 = time.perf_counter()
    sync(step())
    first_s = time.perf_counter() - t0
    rss = sampler.stop() if sampler is not None else None
    timing = measure.time_calls(step, reps=reps, warmup=max(warmup - 1, 0), sync=sync)
    mem: dict[str, Any] = {"rss_peak_delta_bytes": rss}
    if device == "cuda":
        mem["torch_cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    r.update(median_s=timing["median_s"], times_s=timing["times_s"], warmup=max(warmup, 1), compile_s=None,
             first_call_s=first_s, memory=mem, tokens_per_s=r["tokens"] / timing["median_s"],
             params={"base": (base_row or {}).get("params", {}).get("base"),
                     "trainable": sum(p.numel() for p in trainable)},
             device=device, torch_threads=torch.get_num_threads())
    if base_row is not None and base_row.get("flops_per_call"):
        r["flops_per_call"] = base_row["flops_per_call"]
        dev = torch.cuda.get_device_name() if device == "cuda" else ""
        r["mfu"] = measure.mfu(r["flops_per_call"], r["median_s"], measure.peak_flops(dev, "float32"))
    return r
