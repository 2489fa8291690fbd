"""``python -m benchmarks.run [--quick] [--out benchmarks/results/<machine>.json]``: every row, one process.

Per model (``benchmarks.setups``: T5-small-sized and SmolLM2-135M, random weights; ``--quick``: two tiny ones),
all at the same batch and lengths:

1. ``limit``: frozen base forward + gradient to the input embeddings (no weight gradient);
2. ``ept_reference`` / ``ept_paper``: the program's EPT training step (fast path) of each variant;
3. ``ept_materialized``: the reference variant through materialised per-task deltas;
4. ``lora``: ept_jax LoRA at the same rank;
5. ``torch_peft_lora``: transformers + PEFT LoRA on the same weights and batch, one AdamW step;
6. ``qwix_lora``: qwix's LoRA (the LoRA of Tunix and MaxText; :mod:`benchmarks.qwix_peer`) on ept_jax's plain model
   at the same rank, targets and batch, one optax AdamW step (layers unrolled: qwix's module paths leave nothing to
   scan);
7. ``generate_base`` / ``generate_merged`` / ``generate_unmerged``: greedy tokens/s;

plus the sweeps (``--no-sweeps`` skips them): ``limit``, ``ept_reference`` and ``lora`` at the other sequence
lengths (``sweep="seq_len"``), ``ept_reference`` with fewer experts (``sweep="experts"``), and ``ept_reference``
with threefry dropout masks / without dropout (``sweep="dropout"``: where the time goes). Each time is the median of
``--reps`` (>= 5, 2 with ``--quick``) calls after a warm-up; compile time is recorded apart. ``--quick`` (tiny
models, a smoke test of the harness whose timings mean nothing) also compiles with
``--xla_backend_optimization_level=0`` unless ``XLA_FLAGS`` sets that flag. ``--compilation-cache DIR`` turns JAX's
persistent compilation cache on for every program: ``compile_s`` is then a load where ``DIR`` already holds the
program (run the same command twice for the second run's compile times; the interleaved rounds, which rebuild the
main rows' programs, load them).

Output (JSON, rewritten after every row): ``schema``, ``command``, ``complete`` (false until the run ends),
``quick``, ``reps``, ``warmup``, ``dtype``, ``xla_flags``, ``allocator`` (the C heap allocator the process ran:
glibc, tcmalloc or jemalloc; ``--allocator``), ``compilation_cache`` (``DIR`` or null), ``machine``
(``benchmarks.measure.machine``), ``models`` (architecture and shapes of each), ``rows`` (every row: ``id``,
``model``, ``row``, ``kind``, ``framework``, ``shapes``, ``status``/``reason``, ``median_s``, ``times_s``,
``compile_s``, ``memory``, ``tokens_per_s``, ``flops_per_call``, ``mfu``, ``params``, ``sweep``, ``n_experts``),
``ratios`` (each: ``name``, ``model``, ``numerator``/``denominator`` row ids, ``value`` = the medians' quotient,
``target``, ``met``), ``interleaved`` (per model, :mod:`benchmarks.interleaved`: the target ratios again, timed in
``--rounds`` interleaved rounds) and ``elapsed_s``. Errors a user can cause print one line and exit 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

SCHEMA = 1
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# (name, numerator row, denominator row, target: value <= target, or None for information only)
RATIOS: tuple[tuple[str, str, str, float | None], ...] = (
    ("ept_reference/lora", "ept_reference", "lora", 1.15),
    ("ept_paper/lora", "ept_paper", "lora", 1.15),
    ("ept_reference/limit", "ept_reference", "limit", 1.3),
    ("ept_paper/limit", "ept_paper", "limit", 1.3),
    ("lora/limit", "lora", "limit", None),
    ("ept_materialized/ept_reference", "ept_materialized", "ept_reference", None),
    ("generate_merged/generate_base", "generate_merged", "generate_base", 1.03),
    ("generate_unmerged/generate_base", "generate_unmerged", "generate_base", None),
    ("ept_reference/torch_peft_lora", "ept_reference", "torch_peft_lora", 1.0),
    ("ept_paper/torch_peft_lora", "ept_paper", "torch_peft_lora", 1.0),
    ("lora/torch_peft_lora", "lora", "torch_peft_lora", None),
    ("lora/qwix_lora", "lora", "qwix_lora", None),
    ("ept_reference/qwix_lora", "ept_reference", "qwix_lora", None),
    ("ept_reference_threefry/ept_reference", "ept_reference_threefry", "ept_reference", None),
    ("ept_reference_nodropout/limit", "ept_reference_nodropout", "limit", None),
)

ADAPTERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ept_reference", {"kind": "ept", "variant": "reference", "forward_path": "fast"}),
    ("ept_paper", {"kind": "ept", "variant": "paper", "forward_path": "fast"}),
    ("lora", {"kind": "lora"}),
    # last: by far the slowest row (a partial run, cut short, still has the others)
    ("ept_materialized", {"kind": "ept", "variant": "reference", "forward_path": "materialized"}),
)
# Where the EPT step's time goes beyond the limit (sweep "dropout"): the same step with jax.random's threefry
# dropout masks instead of the default hash, and with no dropout at all.
DROPOUT_ROWS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ept_reference_threefry", {**dict(ADAPTERS)["ept_reference"], "dropout_impl": "threefry"}),
    ("ept_reference_nodropout", {**dict(ADAPTERS)["ept_reference"], "dropout": 0.0}),
)
RATIO_SWEEPS = ("main", "dropout")
# --skip: rows a run may leave out (recorded with status "skipped"); "generate" is all three generation rows,
# which also need the ept_reference row (its trained state is what they merge).
SKIPPABLE = ("ept_reference", "ept_paper", "lora", "ept_materialized", "generate", "torch_peft_lora", "qwix_lora")
GENERATE_ROWS = ("generate_base", "generate_merged", "generate_unmerged")
SEQ_SWEPT = ("limit", "ept_reference", "lora")
QUICK_XLA_FLAG = "--xla_backend_optimization_level=0"


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The :data:`RATIOS` of every model from its main-shape rows (``value`` None, with the reason, when a row did
    not run). A generation ratio is a time ratio: merged/base > 1 means merged decoding is slower."""
    out = []
    main = {(r["model"], r["row"]): r for r in rows if r["sweep"] in RATIO_SWEEPS}
    for model in dict.fromkeys(r["model"] for r in rows):
        for name, num, den, target in RATIOS:
            a, b = main.get((model, num)), main.get((model, den))
            rec = {"name": name, "model": model, "numerator": a and a["id"], "denominator": b and b["id"],
                   "value": None, "target": target, "met": None, "reason": None}
            if a is None or b is None or a["status"] != "ok" or b["status"] != "ok":
                missing = [x for x, r in ((num, a), (den, b)) if r is None or r["status"] != "ok"]
                reasons = [r["reason"] for r in (a, b) if r is not None and r.get("reason")]
                rec["reason"] = f"row(s) {missing} did not run" + (f": {'; '.join(reasons)}" if reasons else "")
            else:
                rec["value"] = a["median_s"] / b["median_s"]
                rec["met"] = None if target is None else bool(rec["value"] <= target)
            out.append(rec)
    return out


def run_model(spec, *, reps: int, warmup: int, dtype: str, torch_peer: bool, log, sweeps: bool = True,
              rounds: int = 0, round_reps: int = 3,
              skip: frozenset[str] = frozenset()) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Every row of one model (order: limit, adapters, dropout rows, expert sweep, generation, the qwix peer, the
    PyTorch peer), then, with ``rounds > 0``, the interleaved timing of :mod:`benchmarks.interleaved` (else None).

    ``sweeps=False`` runs the main shapes only: no sequence-length, expert-count or dropout rows. ``skip``
    (names of :data:`SKIPPABLE`) leaves rows out; they are recorded as skipped, and the interleaved rounds and
    the ept_reference sweeps leave them out too.
    """
    from benchmarks import jax_rows, qwix_peer, setups
    from benchmarks import torch_peer as peer

    hf = setups.hf_model(spec)
    tensors = setups.hf_tensors(hf)
    seqs = (spec.seq, *spec.seq_sweep) if sweeps else (spec.seq,)
    kw = dict(reps=reps, warmup=warmup, dtype=dtype)
    rows = jax_rows.limit_rows(spec, tensors, seqs, **kw)
    for r in rows:
        r["sweep"] = "main" if r["shapes"] == spec.shapes() else "seq_len"
    log(rows)
    ept_state = None
    n_all = len(spec.kernel_sizes)

    def skipped(name, reason="--skip", framework="jax"):
        return jax_rows.row(spec, name, "generate" if name in GENERATE_ROWS else "train",
                            spec.shapes(), framework=framework, status="skipped", reason=reason)

    for name, adapter in ADAPTERS:
        if name in skip:
            rows.append(skipped(name))
            log(rows[-1:])
            continue
        todo = seqs if name in SEQ_SWEPT else (spec.seq,)
        new, st = jax_rows.train_rows(spec, name, adapter, tensors, todo, n_experts=n_all, **kw)
        for r in new:
            r["sweep"] = "main" if r["shapes"] == spec.shapes() else "seq_len"
        rows += new
        log(new)
        if name == "ept_reference":
            ept_state = st
        del st
        gc.collect()
    sweeps = sweeps and "ept_reference" not in skip
    for name, adapter in DROPOUT_ROWS if sweeps else ():
        new, st = jax_rows.train_rows(spec, name, adapter, tensors, (spec.seq,), n_experts=n_all, sweep="dropout",
                                      **kw)
        del st
        rows += new
        log(new)
    for n in spec.expert_sweep if sweeps else ():
        adapter = {**dict(ADAPTERS)["ept_reference"], "expert_kernel_sizes": spec.kernels(n)}
        new, st = jax_rows.train_rows(spec, "ept_reference", adapter, tensors, (spec.seq,), n_experts=n,
                                      sweep="experts", **kw)
        del st
        rows += new
        log(new)
    if "generate" in skip or ept_state is None:
        why = "--skip" if "generate" in skip else "needs the ept_reference row, skipped"
        gen = [skipped(n, why) for n in GENERATE_ROWS]
    else:
        gen = jax_rows.generation_rows(spec, tensors, ept_state, **kw)
    rows += gen
    log(gen)
    del ept_state, gen
    gc.collect()
    base = next(r for r in rows if r["row"] == "limit" and r["sweep"] == "main")
    if "qwix_lora" in skip:
        q = skipped("qwix_lora")
    else:
        q = qwix_peer.qwix_row(spec, tensors, setups.bench_config(spec, dict(ADAPTERS)["lora"], dtype=dtype),
                               reps=reps, warmup=warmup, dtype=dtype, base_row=base)
    rows.append(q)
    log([q])
    del q
    gc.collect()
    if torch_peer and "torch_peft_lora" not in skip:
        config = setups.bench_config(spec, dict(ADAPTERS)["lora"], dtype=dtype)
        t = peer.peft_row(spec, hf, config, reps=reps, warmup=warmup, base_row=base)
    else:
        t = skipped("torch_peft_lora", "--no-torch" if not torch_peer else "--skip", framework="torch")
    if dtype != "float32" and t["status"] == "ok":
        t["reason"] = f"the PyTorch peer runs float32; the JAX rows {dtype}"
    rows.append(t)
    log([t])
    inter = None
    if rounds:
        from benchmarks.interleaved import interleaved

        inter = interleaved(spec, tensors, dict(ADAPTERS), RATIOS, rounds=rounds, reps=round_reps, warmup=warmup,
                            dtype=dtype, skip=skip)
        for q in inter["ratios"]:
            print(f"  interleaved {spec.name} {q['name']}: {q['value']:.3f} (rounds "
                  f"{', '.join(f'{v:.3f}' for v in q['per_round'])})", flush=True)
    return rows, inter


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, 2 repetitions (the CI smoke of the harness)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<machine>[_quick].json)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per row (default 5; --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones (default 1)")
    p.add_argument("--models", default=None, help="comma-separated subset of the models (default all)")
    p.add_argument("--dtype", default="float32", help="compute dtype of the JAX rows: float32 or bfloat16")
    p.add_argument("--unrolled-layers", action="store_true",
                   help="the JAX rows with model.scan_layers=False (every layer compiled on its own; default: "
                        "identical layers as one jax.lax.scan)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch + PEFT row (recorded as skipped)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds for the target ratios (default 5, --quick 1; 0 = off)")
    p.add_argument("--no-sweeps", action="store_true",
                   help="main shapes only: skip the sequence-length, expert-count and dropout rows")
    p.add_argument("--skip", default="", help=f"comma-separated rows to leave out, of {', '.join(SKIPPABLE)}")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache at DIR, every program (default off): compile_s then "
                        "records a load where DIR holds the program, so a second run gives second-run compile times")
    p.add_argument("--allocator", default="default",
                   help="C heap allocator: default (the process's own, usually glibc), tcmalloc or jemalloc "
                        "(re-executes with the library in LD_PRELOAD; benchmarks.allocator says why it matters)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status (2 for a bad argument, with one line on stderr)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    from benchmarks import allocator

    try:
        allocator.ensure(args.allocator, "benchmarks.run", argv)  # first: before the imports that allocate
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    heap = allocator.loaded()
    from benchmarks import measure, setups

    try:
        reps = args.reps if args.reps is not None else (2 if args.quick else 5)
        if reps < 1 or args.warmup < 0:
            raise ValueError(f"--reps={reps} --warmup={args.warmup}: need reps >= 1 and warmup >= 0")
        if not args.quick and reps < 5:
            print(f"warning: --reps={reps} < 5: medians of fewer than 5 repetitions are a smoke test, not results",
                  file=sys.stderr)
        rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
        if rounds < 0:
            raise ValueError(f"--rounds={rounds}: need rounds >= 0")
        if args.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype={args.dtype!r}: accepted 'float32', 'bfloat16'")
        skip = frozenset(n.strip() for n in args.skip.split(",") if n.strip())
        if skip - set(SKIPPABLE):
            raise ValueError(f"--skip {sorted(skip - set(SKIPPABLE))}: accepted {', '.join(SKIPPABLE)}")
        names = tuple(n.strip() for n in args.models.split(",") if n.strip()) if args.models else None
        models = setups.specs(args.quick, names)
        setups.SCAN_LAYERS = not args.unrolled_layers
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick and QUICK_XLA_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        # Quick mode checks the harness, its timings mean nothing, and XLA's CPU compile of ~30 programs
        # is nearly all its time: LLVM at -O0 cuts that by about 40%. Read when the backend starts.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + QUICK_XLA_FLAG).strip()
    cache = measure.use_compilation_cache(args.compilation_cache)
    info = measure.machine()
    measure.settle_after_imports()
    default = RESULTS_DIR / f"{measure.machine_slug(info)}{'_quick' if args.quick else ''}.json"
    out = Path(args.out) if args.out else default
    t0 = time.time()

    rows: list[dict[str, Any]] = []
    inter: dict[str, Any] = {}

    def write(done: list[dict[str, Any]], complete: bool) -> None:
        # Rewritten after every row (atomically): a run cut short keeps the rows it measured ("complete": false).
        result = {
            "schema": SCHEMA,
            "command": "python -m benchmarks.run " + " ".join(argv),
            "complete": complete,
            "quick": args.quick,
            "reps": reps,
            "warmup": args.warmup,
            "dtype": args.dtype,
            "scan_layers": not args.unrolled_layers,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "allocator": heap,
            "compilation_cache": cache,
            "machine": info,
            "models": {s.name: {"family": s.family, "arch": s.arch, "targets": list(s.targets),
                                "kernel_sizes": list(s.kernel_sizes), "shapes": s.shapes(),
                                "n_tasks": setups.N_TASKS,
                                "generation": {"prompt_len": s.gen_prompt, "new_tokens": s.gen_new}} for s in models},
            "rows": done,
            "ratios": ratios(done),
            "interleaved": {k: v for k, v in inter.items() if v is not None},
            "elapsed_s": time.time() - t0,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)

    logged: list[dict[str, Any]] = []

    def log(new_rows):
        for r in new_rows:
            med = "skipped: " + str(r["reason"]) if r["status"] != "ok" else f"{r['median_s'] * 1e3:9.2f} ms"
            comp = f"  compile {r['compile_s']:.1f}s" if r.get("compile_s") else ""
            print(f"[{time.time() - t0:7.1f}s] {r['id']:<60} {med}{comp}", flush=True)
        logged.extend(new_rows)
        write(logged, complete=False)

    for spec in models:
        new, inter[spec.name] = run_model(spec, reps=reps, warmup=args.warmup, dtype=args.dtype,
                                          torch_peer=not args.no_torch, log=log, sweeps=not args.no_sweeps,
                                          rounds=rounds, round_reps=1 if args.quick else 3, skip=skip)
        rows += new
    write(rows, complete=True)
    print(f"wrote {out} ({len(rows)} rows, {time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
