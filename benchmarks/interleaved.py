"""Interleaved timing of the rows behind the target ratios, for machines whose speed drifts during a run.

A shared 2-core VM drifted by up to ~1.6 x within one run (the limit measured 440 and 830 ms in the same
process, minutes apart), so a quotient of two medians taken minutes apart can be off by that much. Here the
main-shape programs of :data:`ROWS` (training steps, qwix's LoRA step among them, and greedy generation with the
base and the EPT-merged model) are all compiled first, then timed in ``rounds`` rounds; each round times every
row ``reps`` times, the rows in a rotated order. A ratio is computed within each round (the quotient of the two rows'
medians in that round) and reported as the median over rounds, with the per-round values.

Output (``result["interleaved"][model]``): ``rounds``, ``reps``, ``rows`` (``name -> {"median_s", "times_s"}``,
``times_s`` a list per round) and ``ratios`` (``name``, ``value``, ``per_round``, ``target``, ``met``).
"""

from __future__ import annotations

import gc
import statistics
from typing import Any

from benchmarks import jax_rows, measure, qwix_peer, setups

ROWS = ("limit", "lora", "ept_reference", "ept_paper", "qwix_lora", "generate_base", "generate_merged")
#: generation rows of the rounds, built from the ept_reference row's state (:func:`jax_rows.generation_models`)
GENERATE = ("generate_base", "generate_merged")


def interleaved(spec, tensors, adapters: dict[str, dict[str, Any]], ratio_specs, *, rounds: int, reps: int,
                warmup: int, dtype: str, skip=frozenset()) -> dict[str, Any]:
    """Times :data:`ROWS` of ``spec`` at its main shapes in interleaved rounds (see the module docstring).

    Args:
      adapters: the adapter overrides of the training rows (``benchmarks.run.ADAPTERS``; ``qwix_lora`` runs at the
        ``lora`` row's settings).
      ratio_specs: ``(name, numerator, denominator, target)`` tuples; those over the timed rows are computed.
      skip: rows of :data:`ROWS` to leave out; ``generate`` (or ``ept_reference``, whose state they use) leaves out
        the generation rows. ``qwix_lora`` is left out too when qwix is not installed.
    Raises:
      ValueError: ``rounds < 1`` or ``reps < 1``.
    """
    if rounds < 1 or reps < 1:
        raise ValueError(f"rounds={rounds}, reps={reps}: need both >= 1")
    no_generation = "generate" in skip or "ept_reference" in skip
    if qwix_peer.unavailable() is not None:
        skip = frozenset(skip) | {"qwix_lora"}
    names = tuple(n for n in ROWS if n not in skip and not (n in GENERATE and no_generation))
    calls = {}
    for name in (n for n in names if n not in GENERATE):
        if name == "limit":
            gen = jax_rows.limit_calls(spec, tensors, (spec.seq,), dtype=dtype)
        elif name == "qwix_lora":
            config = setups.bench_config(spec, adapters["lora"], dtype=dtype)
            gen = iter([(None, qwix_peer.train_call(spec, tensors, config, dtype=dtype)[0])])
        else:
            gen = jax_rows.train_calls(spec, adapters[name], tensors, (spec.seq,), dtype=dtype)
        item = next(gen)
        built = {name: item[1]}
        if name == "ept_reference" and not no_generation:  # before its first step: the state's initial adapters
            for g, gd, st, ctx in jax_rows.generation_models(spec, tensors, item[4], dtype=dtype):
                if g in GENERATE:
                    built[g] = jax_rows.generate_call(spec, gd, st, ctx)[0]
                if set(GENERATE) <= built.keys():
                    break  # generate_unmerged is not in the rounds: never built
        for call in built.values():
            for _ in range(warmup):
                measure.block(call())
        calls.update(built)
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    for k in range(rounds):
        order = names[k % len(names):] + names[: k % len(names)]
        for name in order:
            times[name].append(measure.time_calls(calls[name], reps=reps, warmup=0)["times_s"])
    del calls
    gc.collect()
    rows = {n: {"median_s": statistics.median(t for r in ts for t in r), "times_s": ts} for n, ts in times.items()}
    ratios = []
    for name, num, den, target in ratio_specs:
        if num not in rows or den not in rows:
            continue
        per_round = [statistics.median(a) / statistics.median(b) for a, b in zip(times[num], times[den], strict=True)]
        value = statistics.median(per_round)
        ratios.append({"name": name, "value": value, "per_round": per_round, "target": target,
                       "met": None if target is None else bool(value <= target)})
    return {"rounds": rounds, "reps": reps, "rows": rows, "ratios": ratios}
