"""Writes the result tables of README.md and docs/results.md from the runs' own files (never edited by hand).

    python scripts/readme_tables.py          # rewrite every generated block of those files
    python scripts/readme_tables.py --check  # exit 1 when a block differs from what its files give
    python scripts/readme_tables.py --collect-seeds runs/smollm2 runs/smollm2_s1 runs/smollm2_s2 \
        --out docs/results/smollm2_compare_seeds.json  # the main job's seeds, from each run's compare.json

A block is the text between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``; :data:`BLOCKS` maps each
name to the function that renders it from files under ``docs/results/``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"

# Published zero-shot scores (SmolLM2 model cards; lighteval, loglikelihood_acc_norm_nospace, ARC on its test
# split, the Instruct model with its chat template): the sanity anchor of our cloze scores.
PUBLISHED = {
    "SmolLM2-135M-Instruct": {"ARC (mean of E and C)": 37.3, "PIQA": 66.3, "HellaSwag": 40.9},
    "SmolLM2-135M (base)": {"ARC (mean of E and C)": 43.9, "OpenBookQA": 34.6, "PIQA": 68.4},
}


def _compare_table(name: str) -> str:
    import ml_collections

    from train.compare import format_table

    data = json.loads((RESULTS / name).read_text())
    return format_table(ml_collections.ConfigDict(data["config"]), data["runs"]).rstrip("\n")


def smollm2_compare() -> str:
    """The main job's table (``train.compare`` with configs/smollm2_commonsense_cpu.py; its compare.json)."""
    return _compare_table("smollm2_compare.json")


def smollm2_compare_release() -> str:
    """The same model in the release's setting (configs/smollm2_commonsense_release.py, run on 2026-12-06)."""
    return _compare_table("smollm2_compare_release.json")


def smollm2_base_cloze() -> str:
    from train.score import table

    data = json.loads((RESULTS / "smollm2_base_cloze.json").read_text())
    t = data["tasks"]
    lines = [table(data, "cloze, base SmolLM2-135M-Instruct Q4_1"), ""]
    if "arc_e" in t and "arc_c" in t:
        arc = (t["arc_e"]["acc_norm"] + t["arc_c"]["acc_norm"]) / 2
        lines.append("| anchor | ours, acc_norm | published (Instruct) | published (base) |")
        lines.append("|---|---:|---:|---:|")
        key = "ARC (mean of E and C)"
        lines.append(f"| {key} | {arc:.1f} | {PUBLISHED['SmolLM2-135M-Instruct'][key]} "
                     f"| {PUBLISHED['SmolLM2-135M (base)'][key]} |")
        if "piqa" in t:
            lines.append(f"| PIQA | {t['piqa']['acc_norm']:.1f} | {PUBLISHED['SmolLM2-135M-Instruct']['PIQA']} | "
                         f"{PUBLISHED['SmolLM2-135M (base)']['PIQA']} |")
        if "openbookqa" in t:
            lines.append(f"| OpenBookQA | {t['openbookqa']['acc_norm']:.1f} | - | "
                         f"{PUBLISHED['SmolLM2-135M (base)']['OpenBookQA']} |")
    return "\n".join(lines)


def smollm2_grid() -> str:
    from train.sweep import table

    data = json.loads((RESULTS / "smollm2_lr_init_grid" / "sweep.json").read_text())
    return table(data["summary"]).rstrip("\n")


def smollm2_finalists() -> str:
    """The grid's two finalists repeated over seeds (``train.sweep --tag finalists_3seeds``)."""
    from train.sweep import table

    data = json.loads((RESULTS / "smollm2_lr_init_grid" / "finalists_3seeds.json").read_text())
    return table(data["summary"]).rstrip("\n")


def smollm2_grid_curves() -> str:
    """Held-out answer loss at every evaluation of every grid point (mean over seeds)."""
    data = json.loads((RESULTS / "smollm2_lr_init_grid" / "sweep.json").read_text())
    steps = sorted({st for runs in data["curves"].values() for c in runs for st in c["step"]})
    lines = ["| run | " + " | ".join(f"step {st}" for st in steps) + " |", "|---" + "|---:" * len(steps) + "|"]
    for name, runs in data["curves"].items():
        cells = []
        for st in steps:
            vals = [c["eval_loss"][c["step"].index(st)] for c in runs if st in c["step"]]
            cells.append(f"{sum(vals) / len(vals):.3f}" if vals else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SEEDS_FILE = "smollm2_compare_seeds.json"


def collect_seeds(parents: list[Path]) -> dict:
    """The per-seed scores of ``train.compare`` runs of one config differing only in ``train.seed`` (each parent's
    ``compare.json``): held-out answer loss and ``acc_norm`` per task and mean, per method and seed."""
    out: dict = {"config": None, "seeds": {}}
    for parent in parents:
        data = json.loads((Path(parent) / "compare.json").read_text())
        config = json.loads(json.dumps(data["config"]))
        seed = config["train"].pop("seed")
        if out["config"] is None:
            out["config"] = config
        elif config != out["config"]:
            raise SystemExit(f"{parent}: its config differs from {parents[0]}'s in more than train.seed")
        runs = {}
        for method, run in data["runs"].items():
            if method == "base":
                continue  # no training, so no seed
            choices = run["facts"]["choices"]
            runs[method] = {"answer_loss": run["facts"]["answer_loss"], "acc_norm_mean": choices["mean"]["acc_norm"],
                            "acc_norm": {t: v["acc_norm"] for t, v in choices["tasks"].items()}}
        out["seeds"][str(seed)] = runs
    return out


def smollm2_seeds() -> str:
    """The main job over seeds (:func:`collect_seeds`): per method, every seed's mean acc_norm and held-out loss,
    their mean and sample standard deviation, and each task's mean acc_norm over the seeds."""
    import statistics

    data = json.loads((RESULTS / SEEDS_FILE).read_text())
    seeds = sorted(data["seeds"], key=int)
    methods = [m for m in ("ept", "lora") if all(m in data["seeds"][s] for s in seeds)]
    tasks = list(data["seeds"][seeds[0]][methods[0]]["acc_norm"])

    def stat(values, fmt):
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{format(statistics.mean(values), fmt)} ± {format(sd, fmt)}"

    head = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | " + " | ".join(tasks) + " |"
    lines = [head, "|---" + "|---:" * (len(seeds) + 1 + len(tasks)) + "|"]
    for m in methods:
        runs = [data["seeds"][s][m] for s in seeds]
        acc = [r["acc_norm_mean"] for r in runs]
        loss = [r["answer_loss"] for r in runs]
        per_task = [f"{statistics.mean(r['acc_norm'][t] for r in runs):.1f}" for t in tasks]
        lines.append(f"| {m} acc_norm | " + " | ".join(f"{a:.1f}" for a in acc) + f" | {stat(acc, '.1f')} | "
                     + " | ".join(per_task) + " |")
        lines.append(f"| {m} held-out loss | " + " | ".join(f"{v:.3f}" for v in loss) + f" | {stat(loss, '.3f')} | "
                     + " |" * len(tasks))
    return "\n".join(lines)


LATEST_BENCHMARKS = ("cpu-amd-epyc-2core_t5_small_heap_default.json", "cpu-amd-epyc-2core_t5_small_heap_tcmalloc.json",
                     "cpu-amd-epyc-2core_smollm2_135m_heap_default.json",
                     "cpu-amd-epyc-2core_smollm2_135m_heap_tcmalloc.json")


def benchmark_summary() -> str:
    """docs/benchmarks.md's summary rows of the latest runs (:data:`LATEST_BENCHMARKS`)."""
    from benchmarks.table import SUMMARY_HEADER, summary_rows

    lines = [SUMMARY_HEADER, "|" + "---|" * (SUMMARY_HEADER.count("|") - 1)]
    for name in LATEST_BENCHMARKS:
        lines += summary_rows(name, json.loads((REPO / "benchmarks" / "results" / name).read_text()))
    return "\n".join(lines)


BLOCKS = {"benchmark-summary": benchmark_summary, "smollm2-compare": smollm2_compare,
          "smollm2-compare-release": smollm2_compare_release, "smollm2-base-cloze": smollm2_base_cloze,
          "smollm2-grid": smollm2_grid,
          "smollm2-grid-curves": smollm2_grid_curves, "smollm2-finalists": smollm2_finalists,
          "smollm2-seeds": smollm2_seeds}


def render(readme: str) -> str:
    """``readme`` with every generated block rewritten."""
    for name, fn in BLOCKS.items():
        tag = re.escape(name)
        pattern = re.compile(rf"(<!-- generated:{tag} -->\n)(?:.*?\n)?(<!-- /generated:{tag} -->)", re.S)
        if pattern.search(readme):
            readme = pattern.sub(lambda m, fn=fn: m.group(1) + fn() + "\n" + m.group(2), readme)
    return readme


DOCUMENTS = ("README.md", "docs/results.md")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true")
    p.add_argument("--collect-seeds", nargs="+", metavar="PARENT", help="train.compare directories, one per seed")
    p.add_argument("--out", help="with --collect-seeds: the JSON file to write")
    args = p.parse_args(argv)
    if args.collect_seeds:
        if not args.out:
            p.error("--collect-seeds needs --out")
        Path(args.out).write_text(json.dumps(collect_seeds([Path(d) for d in args.collect_seeds]), indent=1,
                                             sort_keys=True) + "\n")
        return 0
    stale = []
    for name in DOCUMENTS:
        path = REPO / name
        if not path.is_file():
            continue
        old = path.read_text()
        new = render(old)
        if new != old:
            stale.append(name)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"{', '.join(stale)}: a generated block differs from its files; run python scripts/readme_tables.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
