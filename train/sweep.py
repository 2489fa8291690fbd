"""``python -m train.sweep``: a grid of training runs of one config, compared on their held-out answer loss.

    python -m train.sweep --config configs/smollm2_commonsense_cpu.py --out docs/results/lr_grid \\
        --run "ept_lr1e-3: adapter.kind='ept' train.learning_rate=1e-3" \\
        --run "ept_lr1e-2: adapter.kind='ept' train.learning_rate=1e-2" \\
        --run "lora_lr1e-3: adapter.kind='lora' train.learning_rate=1e-3" \\
        --seeds 1 [--set train.steps=64 --set train.eval_every=16]

Every ``--run NAME: KEY=VALUE ...`` is one grid point (values are Python literals); ``--set`` changes every run;
``--seeds N`` trains each point with ``train.seed`` = 0 .. N-1. Runs go to ``OUT/runs/<name>_s<seed>`` (an
interrupted run resumes, a finished one is reused). The held-out answer loss of every evaluation
(``metrics.jsonl``'s ``eval_loss_mean``, :func:`train.evaluation.heldout_loss`) and the training loss are
collected into ``OUT/sweep.json`` and plotted into ``OUT/heldout_loss.png`` (mean over seeds, min..max band), and a
markdown table (``OUT/table.md``) gives each point's last held-out loss, mean over seeds with its spread.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from train.configuration import apply, parse_assignments
from train.errors import EXIT_USER_ERROR, USER_ERRORS, one_line
from train.rundir import is_writer


def parse_run(text: str) -> tuple[str, dict[str, Any]]:
    """``"NAME: KEY=VALUE ..."`` -> ``(NAME, assignments)``."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ValueError(f"--run {text!r}: expected 'NAME: KEY=VALUE ...' with a name of letters, digits, _-.")
    return name, parse_assignments(rest)


def curves(workdir: Path) -> dict[str, list]:
    """``{"step", "eval_loss", "train_step", "train_loss"}`` lists from a run's ``metrics.jsonl``."""
    from train.logger import read_metrics

    recs = read_metrics(workdir)
    ev = [r for r in recs if "eval_loss_mean" in r]
    tr = [r for r in recs if "loss" in r]
    return {"step": [r["step"] for r in ev], "eval_loss": [r["eval_loss_mean"] for r in ev],
            "train_step": [r["step"] for r in tr], "train_loss": [r["loss"] for r in tr]}


def summarise(points: dict[str, list[dict[str, list]]]) -> dict[str, dict[str, Any]]:
    """Per point: the last held-out loss of each seed, their mean, min and max."""
    out = {}
    for name, runs in points.items():
        last = [c["eval_loss"][-1] for c in runs if c["eval_loss"]]
        out[name] = {"last_eval_loss": last,
                     "mean": sum(last) / len(last) if last else None,
                     "min": min(last) if last else None, "max": max(last) if last else None}
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    lines = ["| run | seeds | held-out answer loss, last eval (mean) | min..max |", "|---|---:|---:|---|"]
    for name, s in sorted(summary.items(), key=lambda kv: (kv[1]["mean"] is None, kv[1]["mean"])):
        if s["mean"] is None:
            lines.append(f"| {name} | 0 | - | - |")
        else:
            lines.append(f"| {name} | {len(s['last_eval_loss'])} | {s['mean']:.3f} | {s['min']:.3f}..{s['max']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(points: dict[str, list[dict[str, list]]], path: Path, hline: tuple[str, float] | None = None) -> None:
    """Held-out answer loss vs step of every point (mean over seeds, min..max shaded); ``hline``: a labelled
    horizontal reference (e.g. the untrained model's loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in sorted(points.items()):
        runs = [c for c in runs if c["eval_loss"]]
        if not runs:
            continue
        n = min(len(c["eval_loss"]) for c in runs)
        steps = runs[0]["step"][:n]
        vals = np.asarray([c["eval_loss"][:n] for c in runs])
        line, = ax.plot(steps, vals.mean(0), marker="o", ms=3, label=name)
        if len(runs) > 1:
            ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.2)
    if hline is not None:
        ax.axhline(hline[1], color="grey", ls="--", lw=1, label=hline[0])
    ax.set_xlabel("step")
    ax.set_ylabel("held-out answer loss (token NLL)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--run", action="append", required=True, help="'NAME: KEY=VALUE ...' (repeatable)")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE for every run (repeatable)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--tag", default=None, help="write TAG.json / TAG.png / TAG.md instead of sweep.json, "
                   "heldout_loss.png, table.md (e.g. more seeds of some points, reusing the runs of OUT/runs)")
    args = p.parse_args(argv)
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from train import compile_cache, loop
    from train.configuration import load_config_file

    compile_cache.enable()

    out = Path(args.out)
    points: dict[str, list[dict[str, list]]] = {}
    meta: dict[str, Any] = {"config": args.config, "set": args.set, "seeds": args.seeds, "runs": {}}
    try:
        common = parse_assignments(" ".join(args.set))
        grid = [parse_run(r) for r in args.run]
        names = [n for n, _ in grid]
        if len(set(names)) != len(names):
            raise ValueError(f"--run names must differ; got {names}")
        for name, assignments in grid:
            points[name] = []
            meta["runs"][name] = {k: v if not isinstance(v, tuple) else list(v) for k, v in assignments.items()}
            for seed in range(args.seeds):
                config = load_config_file(args.config)
                apply(config, {**common, **assignments, "train.seed": seed})
                workdir = out / "runs" / f"{name}_s{seed}"
                t0 = time.time()
                if not (workdir / "results.json").is_file():
                    loop.run(config, workdir, allow_config_change=False)
                c = curves(workdir)
                c["seconds"] = round(time.time() - t0, 1)
                points[name].append(c)
                logging.info("sweep: %s seed %d: held-out loss %s", name, seed, c["eval_loss"][-1:])
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    summary = summarise(points)
    if not is_writer():  # process 0 of a multi-process job writes the sweep's files
        return 0
    out.mkdir(parents=True, exist_ok=True)
    names = (f"{args.tag}.json", f"{args.tag}.md", f"{args.tag}.png") if args.tag else \
        ("sweep.json", "table.md", "heldout_loss.png")
    (out / names[0]).write_text(json.dumps({**meta, "curves": points, "summary": summary}, indent=1) + "\n")
    (out / names[1]).write_text(table(summary))
    plot(points, out / names[2])
    print(table(summary), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
