"""``python -m train.score``: log-likelihood multiple-choice scores of a base model or a trained run.

    python -m train.score --config configs/smollm2_commonsense_cpu.py --format cloze --out base.json
    python -m train.score --workdir runs/smollm2/ept [--step N] --format letters --out ept.json

Scores every example of each task's evaluation half (``data.eval_protocol="offline_halves"``: the rows the run
never trained on) or whole validation split (other protocols) with :mod:`ept_jax.eval.multiple_choice`: ``acc``
and ``acc_norm`` with 95 % Wilson intervals, and the gold answer's mean token NLL (``answer_nll``), per task and
as the mean over tasks. ``--config`` scores the configured model without adapters (the base); ``--workdir`` a
run's checkpoint (the best one, or ``--step``), each task routed by its task id. Writes the JSON to ``--out``
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ept_jax.eval import choice_formats
from ept_jax.eval import multiple_choice as mc
from train.errors import EXIT_USER_ERROR, USER_ERRORS, one_line

TASK_NAMES = {"boolq": "BoolQ", "openbookqa": "OBQA", "arc_e": "ARC-E", "arc_c": "ARC-C", "piqa": "PIQA"}


def eval_examples(config, fmt: str, tasks: list[str] | None = None) -> dict[str, list[mc.ChoiceExample]]:
    """Each task's evaluation rows of ``config`` as multiple-choice examples; a task's id is its index in
    ``config.data.tasks`` (tasks it does not list get id 0, for base-model scoring)."""
    names = list(config.data.tasks)
    half = "eval" if str(config.data.eval_protocol) == "offline_halves" else None
    seed = int(config.data.split_seed) if config.data.get("split_seed") is not None else 42
    source = None if config.data.path is None else str(config.data.path)
    out = {}
    for task in tasks or names:
        out[task] = choice_formats.load_choice_examples(
            task, fmt, source=source, half=half, seed=seed, task_id=names.index(task) if task in names else 0)
    return out


def score_tasks(model, tokenizer, examples: dict[str, list[mc.ChoiceExample]], *, adapters: bool,
                batch_size: int, max_length: int) -> dict[str, Any]:
    """``{"tasks": {task: summary}, "mean": {...}}`` (:meth:`ChoiceScores.summary`, means over tasks)."""
    per_task = {}
    for task, exs in examples.items():
        t0 = time.time()
        per_task[task] = mc.score(model, tokenizer, exs, batch_size=batch_size, max_length=max_length,
                                  adapters=adapters).summary()
        per_task[task]["seconds"] = round(time.time() - t0, 1)
    mean = {k: sum(v[k] for v in per_task.values()) / len(per_task) for k in ("acc", "acc_norm", "answer_nll")}
    return {"tasks": per_task, "mean": mean}


def choice_scores(config, model, tokenizer, *, adapters: bool = True) -> dict[str, Any]:
    """:func:`score_tasks` of ``model`` on every example of the test sets of ``config`` (its tasks' evaluation
    halves under ``offline_halves``) in the format ``eval.choice_format``, rows of ``eval.choice_max_length``
    tokens; the result also names the format and the seconds it took. What a run writes to ``results.json``'s
    ``choices`` (:mod:`train.loop`, :mod:`train.eval_only`)."""
    fmt = str(config.eval.choice_format)
    t0 = time.time()
    result = score_tasks(model, tokenizer, eval_examples(config, fmt), adapters=adapters,
                         batch_size=int(config.eval.batch_size), max_length=int(config.eval.choice_max_length))
    return {**result, "format": fmt, "seconds": round(time.time() - t0, 1)}


def table(result: dict[str, Any], title: str) -> str:
    """A markdown table of :func:`score_tasks`' result."""
    lines = [f"| task ({title}) | n | acc | acc 95% CI | acc_norm | acc_norm 95% CI | answer NLL |",
             "|---|---:|---:|---|---:|---|---:|"]
    for task, s in result["tasks"].items():
        lines.append(f"| {TASK_NAMES.get(task, task)} | {s['n']} | {s['acc']:.1f} | {s['acc_ci'][0]:.1f}-"
                     f"{s['acc_ci'][1]:.1f} | {s['acc_norm']:.1f} | {s['acc_norm_ci'][0]:.1f}-"
                     f"{s['acc_norm_ci'][1]:.1f} | {s['answer_nll']:.3f} |")
    m = result["mean"]
    lines.append(f"| **mean** | | **{m['acc']:.1f}** | | **{m['acc_norm']:.1f}** | | {m['answer_nll']:.3f} |")
    return "\n".join(lines)


def _load(args) -> tuple[Any, Any, Any, bool, str]:
    """``(model, config, tokenizer, adapters on, what)``."""
    from train import state as state_lib

    if args.workdir:
        from train.export import restore_for_export

        run = restore_for_export(args.workdir, step=args.step)
        return run.model, run.config, state_lib.load_tokenizer(run.config), True, f"{args.workdir} step {run.step}"
    from train.configuration import apply, load_config_file, parse_assignments

    config = load_config_file(args.config)
    with config.unlocked():
        config.adapter.kind = "none"
    apply(config, parse_assignments(" ".join(args.set or ())))
    model = state_lib.build_model(config)
    return model, config, state_lib.load_tokenizer(config), False, f"{Path(str(config.model.name_or_path)).name} (base)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.score", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a config file: score its model without adapters (the base)")
    src.add_argument("--workdir", help="a training run: score its checkpoint")
    p.add_argument("--step", type=int, default=None, help="with --workdir: this checkpoint (default: the best)")
    p.add_argument("--format", choices=choice_formats.FORMATS, default="cloze")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the config's tasks (or other "
                   "commonsense tasks, for the base model)")
    p.add_argument("--set", action="append", help="with --config: override a config key, KEY=VALUE (repeatable)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    try:
        model, config, tokenizer, adapters, what = _load(args)
        tasks = args.tasks.split(",") if args.tasks else None
        examples = eval_examples(config, args.format, tasks)
        t0 = time.time()
        result = score_tasks(model, tokenizer, examples, adapters=adapters, batch_size=args.batch_size,
                             max_length=args.max_length)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    result.update({"model": what, "format": args.format, "protocol": str(config.data.eval_protocol),
                   "seconds": round(time.time() - t0, 1)})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result, f"{args.format}, {what}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
