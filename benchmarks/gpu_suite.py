"""``bash benchmarks/gpu.sh`` (``python -m benchmarks.gpu_suite``): the GPU suite, one results JSON in <= 8 minutes.

Two models with random weights (built as ``benchmarks.setups`` builds every model: a random transformers model,
its weights loaded into ept_jax's), computed and stored in ``--dtype`` (default bfloat16: ``model.dtype`` and
``model.param_dtype``; the adapters keep their float32 parameters, as in training):

* ``t5_base``: T5-base (``configs.archs.T5_BASE``: d_model 768, 12 + 12 layers, 12 heads, d_ff 3072, ReLU, vocab
  32128, tied embeddings), the EPT release's GLUE shapes: batch 128, source 128, target 16 tokens; EPT kernel
  sizes (2, 2, 4, 4, 6, 6, 8, 8) (the release's);
* ``llama_1b``: a LLaMA-1B-shaped decoder (hidden 2048, 16 layers, 32 query / 8 key-value heads, head 64,
  intermediate 8192, vocab 32000, tied embeddings, SiLU, RoPE 10000): 1.04 B frozen parameters; the commonsense
  config's shapes: batch 32, length 256; EPT kernel sizes (2, 2, 4, 4, 8, 8, 16, 16) (6 divides none of its widths,
  and the paper variant needs every size to divide every adapted width).

Rows per model, at those shapes only (no sweeps, no generation): ``limit`` (frozen forward + gradient to the
input embeddings), ``ept_reference`` and ``ept_paper`` (the program's EPT training step, fast path) and
``lora`` (same rank and targets): :func:`benchmarks.jax_rows.limit_rows` / :func:`~benchmarks.jax_rows.train_rows`
with the adapters of :data:`benchmarks.run.ADAPTERS`, so every field is the one ``python -m benchmarks.run``
records: median step time over ``--reps`` (default 5) after ``--warmup`` calls, tokens/s, MFU (``4 N`` FLOPs per
token for ``N`` frozen parameters against ``train.throughput.PEAK_FLOPS`` of the device and dtype), compile time
(lower + compile, apart from the timings) and memory. Then the optional peers: ``qwix_lora``
(:mod:`benchmarks.qwix_peer`) when qwix is importable, else skipped with the reason; ``torch_peft_lora`` only with
``--torch`` (its float32 PyTorch step does not fit the budget; ``python -m benchmarks.run`` runs it).

Memory: ``peak_device_bytes`` is the device's ``peak_bytes_in_use`` after the row, the process's high-water mark
so far (it never goes down; the rows run T5 first, then the larger LLaMA); ``xla_peak_bytes`` is the row's own
program (XLA's ``memory_analysis``: arguments + outputs + temporaries), the per-row figure.

Time budget: no row starts after ``--budget-s`` (default 420) seconds of the run; the rows left are recorded as
skipped with the reason. A row that raises (an out-of-memory error, say) is recorded with status ``error`` and the
exception, and the run goes on. The JSON is rewritten after every row (``complete`` false until the end), so a run
killed by ``gpu.sh``'s timeout keeps what it measured.

``--dry-run``: the same code on ``benchmarks.setups.QUICK``'s tiny models, float32, 1 repetition, no budget, the
qwix row left out unless ``--qwix`` (the CPU check that keeps this suite from rotting; its timings mean nothing).

Output: ``schema``, ``suite`` ("gpu"), ``command``, ``complete``, ``dry_run``, ``reps``, ``warmup``, ``dtype``,
``param_dtype``, ``budget_s``, ``xla_flags``, ``allocator``, ``machine`` (:func:`benchmarks.measure.machine`),
``device_kind``, ``peak_flops`` (the MFU denominator, None when the device is not in the table), ``versions``
(ml_collections, qwix, torch, peft: what the run found), ``models`` (family, arch, shapes, targets, kernel sizes,
``frozen_params``), ``planned`` (row ids in run order), ``rows`` (``benchmarks.run``'s row schema), ``summary``
(per row: ``id``, ``model``, ``row``, ``status``, ``reason``, ``step_s``, ``tokens_per_s``, ``mfu``,
``compile_s``, ``peak_device_bytes`` (the PyTorch row: ``torch.cuda.max_memory_allocated``, reset before it; None
on a CPU), ``xla_peak_bytes``, ``trainable_params``), ``ratios`` (those of
``benchmarks.run.RATIOS`` whose two rows are planned here) and ``elapsed_s``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import run as bench_run
from benchmarks import setups
from benchmarks.setups import LLAMA_TARGETS, T5_TARGETS, ModelSpec
from configs import archs

SCHEMA = 1
SUITE = "gpu"
# not benchmarks/results: benchmarks.table (docs/benchmarks.md) reads every JSON there with benchmarks.run's schema
RESULTS_DIR = Path(__file__).resolve().parent / "gpu_results"

# T5-base as configs.archs records it; dropout_rate left out (setups.hf_model sets it to 0)
T5_BASE = {k: v for k, v in archs.T5_BASE.items() if k != "dropout_rate"}
# LLaMA-1B-shaped (Llama-3.2-1B's width, depth and heads with LLaMA-2's 32k vocabulary)
LLAMA_1B = {**archs.SMOLLM2_135M, "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 2048, "rope_theta": 10000.0}

GPU_MODELS = (
    ModelSpec("t5_base", "t5", T5_BASE, T5_TARGETS, (2, 2, 4, 4, 6, 6, 8, 8), batch=128, seq=128, target_len=16,
              gen_prompt=128, gen_new=16, seq_sweep=(), expert_sweep=()),
    ModelSpec("llama_1b", "llama", LLAMA_1B, LLAMA_TARGETS, (2, 2, 4, 4, 8, 8, 16, 16), batch=32, seq=256,
              target_len=0, gen_prompt=128, gen_new=16, seq_sweep=(), expert_sweep=()),
)
DRY_MODELS = setups.QUICK

MAIN_ROWS = ("limit", "ept_reference", "ept_paper", "lora")  # per model, in run order
PEER_ROWS = ("qwix_lora", "torch_peft_lora")  # after every model's main rows
ADAPTERS = {name: adapter for name, adapter in bench_run.ADAPTERS if name in MAIN_ROWS}
DEFAULT_BUDGET_S = 420.0
DRY_NO_QWIX = ("--dry-run leaves it out (about a quarter of the check's CPU time); --dry-run --qwix runs it, "
               "benchmarks.run --quick and tests/unit/test_qwix_peer.py cover qwix_peer.qwix_row")
TORCH_OFF = "not in the GPU suite by default (its 8-minute budget): --torch runs it; python -m benchmarks.run has it"


def planned(models: tuple[ModelSpec, ...]) -> list[tuple[ModelSpec, str]]:
    """``(spec, row)`` in run order: every model's main rows, then every model's peer rows."""
    return [(s, r) for s in models for r in MAIN_ROWS] + [(s, r) for r in PEER_ROWS for s in models]


def skeleton(spec: ModelSpec, name: str, **fields) -> dict[str, Any]:
    """Row ``name`` of ``spec`` as :func:`benchmarks.jax_rows.row` makes it, with the id, kind, framework and
    expert count the row builders give it (a skipped or failed row gets it too); ``fields`` adds the rest."""
    from benchmarks import jax_rows

    return jax_rows.row(spec, name, "limit" if name == "limit" else "train", spec.shapes(),
                        framework="torch" if name == "torch_peft_lora" else "jax",
                        n_experts=len(spec.kernel_sizes) if name in ADAPTERS else None, **fields)


def budget_reason(elapsed_s: float, budget_s: float | None) -> str | None:
    """Why a row may not start ``elapsed_s`` seconds into the run (None: it may)."""
    if budget_s is None or elapsed_s <= budget_s:
        return None
    return f"time budget: {elapsed_s:.0f}s elapsed > --budget-s {budget_s:.0f} before this row started"


@contextlib.contextmanager
def base_param_dtype(param_dtype: str):
    """Within: every JAX row stores its frozen base weights in ``param_dtype`` (:data:`benchmarks.setups.PARAM_DTYPE`;
    ``dtype`` is the compute dtype)."""
    previous = setups.PARAM_DTYPE
    setups.PARAM_DTYPE = param_dtype
    try:
        yield
    finally:
        setups.PARAM_DTYPE = previous


def summary(r: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one row."""
    mem = r.get("memory") or {}
    return {"id": r["id"], "model": r["model"], "row": r["row"], "status": r["status"], "reason": r["reason"],
            "step_s": r["median_s"], "tokens_per_s": r["tokens_per_s"], "mfu": r["mfu"], "compile_s": r["compile_s"],
            "peak_device_bytes": mem.get("device_peak_bytes_in_use", mem.get("torch_cuda_max_allocated_bytes")),
            "xla_peak_bytes": mem.get("xla_peak_bytes"),
            "trainable_params": (r.get("params") or {}).get("trainable")}


def suite_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`benchmarks.run.ratios` restricted to the ratios of two rows this suite plans."""
    names = set(MAIN_ROWS) | set(PEER_ROWS)
    keep = {n for n, a, b, _ in bench_run.RATIOS if a in names and b in names}
    return [q for q in bench_run.ratios(rows) if q["name"] in keep]


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="tiny models (setups.QUICK), float32, 1 repetition, no budget: the CPU check of the suite")
    p.add_argument("--out", default=None,
                   help="results JSON (default benchmarks/gpu_results/gpu_suite_<machine>[_dry].json)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per row (default 5; --dry-run 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones (default 1)")
    p.add_argument("--dtype", default=None,
                   help="compute and base-weight dtype: bfloat16 (default) or float32 (--dry-run: float32)")
    p.add_argument("--models", default=None, help="comma-separated subset of the models (default all)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"no row starts after this many seconds (default {DEFAULT_BUDGET_S:.0f}; --dry-run: none)")
    p.add_argument("--qwix", action=argparse.BooleanOptionalAction, default=None,
                   help="run the qwix row when qwix is installed (default: yes; --dry-run: no, see DRY_NO_QWIX)")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache at DIR, every program (default off): compile_s then "
                        "records a load where DIR holds the program, so a second run gives second-run compile times")
    p.add_argument("--torch", action="store_true", help="also run the PyTorch + PEFT LoRA row (float32)")
    return p.parse_args(argv)


def _options(args) -> dict[str, Any]:
    """The run's settings from the parsed arguments. Raises ValueError on a bad one."""
    reps = args.reps if args.reps is not None else (1 if args.dry_run else 5)
    if reps < 1 or args.warmup < 0:
        raise ValueError(f"--reps={reps} --warmup={args.warmup}: need reps >= 1 and warmup >= 0")
    dtype = args.dtype or ("float32" if args.dry_run else "bfloat16")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype={dtype!r}: accepted 'float32', 'bfloat16'")
    budget = args.budget_s if args.budget_s is not None else (None if args.dry_run else DEFAULT_BUDGET_S)
    if budget is not None and budget <= 0:
        raise ValueError(f"--budget-s={budget}: need a positive number of seconds")
    pool = DRY_MODELS if args.dry_run else GPU_MODELS
    models = pool
    if args.models:
        known = {s.name: s for s in pool}
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        bad = [n for n in names if n not in known]
        if bad:
            raise ValueError(f"--models {bad}: accepted {sorted(known)}{' with --dry-run' if args.dry_run else ''}")
        models = tuple(known[n] for n in names)
    return {"reps": reps, "dtype": dtype, "budget": budget, "models": models}


def main(argv: list[str] | None = None) -> int:
    """Runs the suite; returns the exit status (2 for a bad argument, with one line on stderr)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    try:
        opts = _options(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.dry_run and bench_run.QUICK_XLA_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        # as benchmarks.run --quick: tiny programs, compile time is the whole cost; set before the backend starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + bench_run.QUICK_XLA_FLAG).strip()
    import jax

    from benchmarks import allocator, jax_rows, measure, qwix_peer
    from benchmarks import torch_peer as peer

    reps, dtype, budget, models = opts["reps"], opts["dtype"], opts["budget"], opts["models"]
    qwix_on = args.qwix if args.qwix is not None else not args.dry_run
    measure.settle_after_imports()
    cache = measure.use_compilation_cache(args.compilation_cache)
    info = measure.machine()
    heap = allocator.loaded()
    versions = {m: measure.package_version(m) for m in ("ml_collections", "qwix", "torch", "peft")}
    kind = info["jax_device_kind"]
    default = RESULTS_DIR / f"gpu_suite_{measure.machine_slug(info)}{'_dry' if args.dry_run else ''}.json"
    out = Path(args.out) if args.out else default
    plan = planned(models)
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    frozen: dict[str, int | None] = {s.name: None for s in models}

    def write(complete: bool) -> None:
        result = {
            "schema": SCHEMA, "suite": SUITE, "command": "python -m benchmarks.gpu_suite " + " ".join(argv),
            "complete": complete, "dry_run": args.dry_run, "reps": reps, "warmup": args.warmup, "dtype": dtype,
            "param_dtype": dtype, "budget_s": budget, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "allocator": heap, "compilation_cache": cache, "machine": info, "device_kind": kind,
            "peak_flops": measure.peak_flops(kind, dtype),
            "versions": versions,
            "models": {s.name: {"family": s.family, "arch": s.arch, "shapes": s.shapes(), "targets": list(s.targets),
                                "kernel_sizes": list(s.kernel_sizes), "n_tasks": setups.N_TASKS,
                                "frozen_params": frozen[s.name]} for s in models},
            "planned": [skeleton(s, r)["id"] for s, r in plan],
            "rows": rows, "summary": [summary(r) for r in rows], "ratios": suite_ratios(rows),
            "elapsed_s": time.time() - t0,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)

    def add(r: dict[str, Any]) -> None:
        rows.append(r)
        if r["row"] == "limit" and r["status"] == "ok":
            frozen[r["model"]] = r["params"]["base"]
        if r["status"] == "ok":
            mfu = f"  mfu {r['mfu']:.3f}" if r["mfu"] is not None else ""
            comp = f"  compile {r['compile_s']:.1f}s" if r["compile_s"] is not None else ""
            msg = f"{r['median_s'] * 1e3:9.2f} ms  {r['tokens_per_s']:12.0f} tok/s{mfu}{comp}"
        else:
            msg = f"{r['status']}: {r['reason']}"
        print(f"[{time.time() - t0:7.1f}s] {r['id']:<48} {msg}", flush=True)
        write(complete=False)

    def skipped(spec, name, reason, status="skipped"):
        return skeleton(spec, name, status=status, reason=reason)

    built: dict[str, tuple[Any, dict]] = {}  # name -> (HF model or None, tensors)

    def weights(spec):
        if spec.name not in built:
            hf = setups.hf_model(spec)
            tensors = setups.hf_tensors(hf)
            if dtype != "float32":
                # once here, not on every row's load (load_into casts to the Variables' dtype, this one): half the
                # host-to-device bytes of each row's model
                tensors = {k: v.astype(jax.numpy.dtype(dtype)) for k, v in tensors.items()}
            built[spec.name] = (hf if args.torch else None, tensors)
            del hf
            gc.collect()
        return built[spec.name]

    def one(spec, name) -> dict[str, Any]:
        limit = next((r for r in rows if r["model"] == spec.name and r["row"] == "limit" and r["status"] == "ok"),
                     None)
        if name == "qwix_lora" and not qwix_on:
            return skipped(spec, name, "--no-qwix" if args.qwix is False else DRY_NO_QWIX)
        if name == "qwix_lora" and qwix_peer.unavailable():
            return skipped(spec, name, qwix_peer.unavailable())
        if name == "torch_peft_lora" and not args.torch:
            return skipped(spec, name, TORCH_OFF)
        why = budget_reason(time.time() - t0, budget)
        if why:
            return skipped(spec, name, why)
        hf, tensors = weights(spec)
        kw = dict(reps=reps, warmup=args.warmup, dtype=dtype)
        if name == "limit":
            return jax_rows.limit_rows(spec, tensors, (spec.seq,), **kw)[0]
        if name in ADAPTERS:
            new, st = jax_rows.train_rows(spec, name, ADAPTERS[name], tensors, (spec.seq,),
                                          n_experts=len(spec.kernel_sizes), **kw)
            del st
            return new[0]
        lora_config = setups.bench_config(spec, ADAPTERS["lora"], dtype=dtype)
        if name == "qwix_lora":
            return qwix_peer.qwix_row(spec, tensors, lora_config, base_row=limit, **kw)
        r = peer.peft_row(spec, hf, lora_config, reps=reps, warmup=args.warmup, base_row=limit)
        built[spec.name] = (None, tensors)  # PEFT wrapped the HF model in place
        if dtype != "float32" and r["status"] == "ok":
            r["reason"] = f"the PyTorch peer runs float32; the JAX rows {dtype}"
        return r

    print(f"GPU suite{' (dry run)' if args.dry_run else ''}: {jax.default_backend()} {kind}, {dtype}, "
          f"{len(plan)} rows -> {out}", flush=True)
    write(complete=False)
    with base_param_dtype(dtype):
        for spec, name in plan:
            try:
                r = one(spec, name)
            except Exception as e:  # noqa: BLE001 - one failed row (OOM...) must not lose the others
                r = skipped(spec, name, f"{type(e).__name__}: {str(e)[:2000]}", status="error")
            add(r)
            gc.collect()
    write(complete=True)
    bad = [r["id"] for r in rows if r["status"] == "error"]
    print(f"wrote {out} ({len(rows)} rows, {time.time() - t0:.0f}s{f'; errors: {bad}' if bad else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
