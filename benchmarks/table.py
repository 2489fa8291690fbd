"""The Markdown tables of ``benchmarks.run`` results.

    python -m benchmarks.table RESULTS.json      # one result: its tables
    python -m benchmarks.table --docs [--check]  # docs/benchmarks.md from every file of benchmarks/results/

Per model: every main-shape row (median, tokens/s, compile time, memory, MFU when known), the target ratios, and
the sequence-length and expert-count sweeps; the machine and the exact command head the section. ``--docs``
writes ``docs/benchmarks.md``: a summary table (one row per result file and model) and then every file's tables;
``--check`` exits 1 when the file differs from what the results give (a test runs it: the page cannot drift).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

WHAT = {
    "limit": "frozen base fwd + grad to inputs (the limit)",
    "ept_reference": "EPT step, reference variant, fast path",
    "ept_paper": "EPT step, paper variant, fast path",
    "ept_materialized": "EPT step, reference, materialised delta",
    "ept_reference_threefry": "EPT reference step, threefry dropout masks",
    "ept_reference_nodropout": "EPT reference step, no dropout",
    "lora": "LoRA step (ept_jax), same rank",
    "torch_peft_lora": "PyTorch + PEFT LoRA step, same rank",
    "qwix_lora": "qwix LoRA step (Tunix's, MaxText's), same rank",
    "generate_base": "greedy generation, base model",
    "generate_merged": "greedy generation, EPT merged (task 0)",
    "generate_unmerged": "greedy generation, EPT unmerged (routed)",
}


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def machine_line(result: dict[str, Any]) -> str:
    """One line naming the machine: CPU model and cores, JAX backend and device kind, versions."""
    m = result["machine"]
    v = m.get("versions", {})
    dev = m["jax_device_kind"] if m["jax_backend"] != "cpu" else "CPU"
    return (f"{dev} ({m['jax_backend']}, {m['jax_device_count']} device(s)); host {m['cpu_model']}, "
            f"{m['cpu_usable']} of {m['cpu_count']} cores; jax {v.get('jax')}, flax {v.get('flax')}, "
            f"torch {v.get('torch')}, transformers {v.get('transformers')}, peft {v.get('peft')}")


def _shape(shapes: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in shapes.items())


def model_tables(result: dict[str, Any], model: str) -> list[str]:
    """The Markdown lines of one model: rows, ratios, sweeps."""
    rows = [r for r in result["rows"] if r["model"] == model]
    info = result["models"][model]
    lines = [f"#### {model} ({info['family']}; {_shape(info['shapes'])}; {info['n_tasks']} tasks; EPT kernels "
             f"{tuple(info['kernel_sizes'])}; adapted {', '.join(info['targets'])})", "",
             "| row | what | median ms | tokens/s | compile s | XLA peak MiB | RSS delta MiB | MFU |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["sweep"] not in ("main", "dropout"):
            continue
        mem = r.get("memory") or {}
        if r["status"] != "ok":
            lines.append(f"| {r['row']} | {WHAT.get(r['row'], '')} | skipped: {r['reason']} | | | | | |")
            continue
        comp = r.get("compile_s") if r.get("compile_s") is not None else r.get("first_call_s")
        lines.append(
            f"| {r['row']} | {WHAT.get(r['row'], '')} | {r['median_s'] * 1e3:.2f} | {_num(r['tokens_per_s'], '.0f')} "
            f"| {_num(comp, '.1f')} | {_mib(mem.get('xla_peak_bytes'))} | {_mib(mem.get('rss_peak_delta_bytes'))} "
            f"| {_num(r.get('mfu'), '.1%')} |")
    notes = [r for r in rows if r["sweep"] in ("main", "dropout") and r.get("notes")]
    if notes:
        lines += [""] + [f"{r['row']}: {r['notes']}." for r in notes]
    lines += ["", "| ratio (time / time) | value | target | met |", "| --- | ---: | ---: | --- |"]
    for q in result["ratios"]:
        if q["model"] != model:
            continue
        value = f"{q['value']:.3f}" if q["value"] is not None else f"- ({q['reason']})"
        target = f"<= {q['target']}" if q["target"] is not None else "-"
        met = "-" if q["met"] is None else ("yes" if q["met"] else "**no**")
        lines.append(f"| {q['name']} | {value} | {target} | {met} |")
    programs = {r["row"]: r.get("program") for r in rows if r["status"] == "ok" and r["kind"] == "generate"}
    base, merged = programs.get("generate_base"), programs.get("generate_merged")
    if base and merged:
        same = ("the same XLA program as" if base == merged else "**a different XLA program** from")
        lines += ["", f"generate_merged compiles to {same} generate_base (instruction digests {merged}, {base}: the "
                  "multiset of result shapes and opcodes, `benchmarks.measure.program_fingerprint`)."]
    inter = (result.get("interleaved") or {}).get(model)
    if inter:
        names = list(inter["rows"])
        lines += ["", f"Interleaved ({inter['rounds']} rounds x {inter['reps']} calls of each row, rotated order; a "
                  "ratio is the median over rounds of the in-round quotient):", "",
                  "| interleaved | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names),
                  "| median ms | " + " | ".join(f"{inter['rows'][n]['median_s'] * 1e3:.2f}" for n in names) + " |",
                  "", "| ratio, interleaved | value | min..max over rounds | target | met |",
                  "| --- | ---: | ---: | ---: | --- |"]
        for q in inter["ratios"]:
            target = f"<= {q['target']}" if q["target"] is not None else "-"
            met = "-" if q["met"] is None else ("yes" if q["met"] else "**no**")
            lines.append(f"| {q['name']} | {q['value']:.3f} | {min(q['per_round']):.3f}..{max(q['per_round']):.3f} "
                         f"| {target} | {met} |")
    seq = [r for r in rows if r["kind"] in ("limit", "train") and r["framework"] == "jax" and r["sweep"] in
           ("main", "seq_len") and r["row"] in ("limit", "ept_reference", "lora")]
    lengths = sorted({r["shapes"].get("source_len", r["shapes"].get("seq_len")) for r in seq})
    if len(lengths) > 1:
        lines += ["", "| median ms by sequence length | " + " | ".join(str(n) for n in lengths) + " |",
                  "| --- |" + " ---: |" * len(lengths)]
        for name in ("limit", "ept_reference", "lora"):
            by = {r["shapes"].get("source_len", r["shapes"].get("seq_len")): r for r in seq if r["row"] == name}
            cells = [f"{by[n]['median_s'] * 1e3:.2f}" if n in by and by[n]["status"] == "ok" else "-" for n in lengths]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    exp = sorted((r for r in rows if r["row"] == "ept_reference" and r["sweep"] in ("main", "experts")),
                 key=lambda r: r["n_experts"] or 0)
    if len(exp) > 1:
        lines += ["", "| EPT reference step by number of experts | " + " | ".join(str(r["n_experts"]) for r in exp)
                  + " |", "| --- |" + " ---: |" * len(exp),
                  "| median ms | " + " | ".join(f"{r['median_s'] * 1e3:.2f}" for r in exp) + " |"]
    return lines


def _scan_note(result: dict[str, Any]) -> str:
    scan = result.get("scan_layers")
    note = "" if scan is None else f"; layers {'scanned' if scan else 'unrolled'} (model.scan_layers={scan})"
    heap = result.get("allocator")
    return note + ("" if heap is None else f"; C heap allocator {heap}")


def markdown(result: dict[str, Any]) -> str:
    """The whole section: machine, command, then :func:`model_tables` of every model."""
    lines = [f"Machine: {machine_line(result)}.", "",
             f"Command: `{result['command']}` ({result['reps']} timed repetitions after {result['warmup']} warm-up, "
             f"medians; JAX compute dtype {result['dtype']}{_scan_note(result)}; {result['elapsed_s']:.0f} s in all). "
             "Times are one "
             "training step or one `generate` call; a ratio's value is the two medians' quotient. XLA peak: "
             "`compiled.memory_analysis()`; RSS delta: the process's resident-set growth during the warm-up call.",
             ""]
    if result.get("complete") is False:
        lines[2:2] = [f"**Partial run: cut short after {len(result['rows'])} rows; the rows below are all it "
                      "measured.**", ""]
    if result.get("quick"):
        lines[2:2] = ["**Quick mode: tiny models, the harness's smoke test; these timings measure nothing.**", ""]
    for model in result["models"]:
        lines += model_tables(result, model) + [""]
    return "\n".join(lines)


REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
DOCS_FILE = REPO / "docs" / "benchmarks.md"
SUMMARY_HEADER = ("| results file | model | allocator | layers | limit ms | LoRA ms | EPT ref. ms | EPT ref. / LoRA "
                  "| EPT ref. / limit | EPT paper / LoRA | merged / base gen. | EPT ref. / PEFT LoRA "
                  "| EPT ref. compile s | LoRA compile s |")


def _ratio(result: dict[str, Any], model: str, name: str) -> float | None:
    """The interleaved ratio when the run has it, else the sequential one."""
    inter = (result.get("interleaved") or {}).get(model) or {}
    for q in inter.get("ratios", []):
        if q["name"] == name and q.get("value") is not None:
            return q["value"]
    for q in result.get("ratios", []):
        if q["model"] == model and q["name"] == name:
            return q.get("value")
    return None


def _summary_line(name: str, result: dict[str, Any], model: str) -> str:
    rows = {r["row"]: r for r in result["rows"] if r["model"] == model and r["sweep"] == "main"
            and r["status"] == "ok"}
    inter = ((result.get("interleaved") or {}).get(model) or {}).get("rows", {})

    def ms(row):
        if row in inter:
            return f"{inter[row]['median_s'] * 1e3:,.0f}"
        return f"{rows[row]['median_s'] * 1e3:,.0f}" if row in rows else "-"

    def compile_s(row):
        return _num(rows[row].get("compile_s"), ".0f") if row in rows else "-"

    def rt(q):
        return _num(_ratio(result, model, q), ".2f")

    scan = result.get("scan_layers")
    layers = "-" if scan is None else ("scan" if scan else "unrolled")
    partial = "" if result.get("complete", True) else " (partial)"
    return (f"| `{name}`{partial} | {model} | {result.get('allocator') or '-'} | {layers} | {ms('limit')} "
            f"| {ms('lora')} | {ms('ept_reference')} | {rt('ept_reference/lora')} | "
            f"{rt('ept_reference/limit')} | {rt('ept_paper/lora')} | {rt('generate_merged/generate_base')} | "
            f"{rt('ept_reference/torch_peft_lora')} | {compile_s('ept_reference')} | {compile_s('lora')} |")


def summary_rows(name: str, result: dict[str, Any]) -> list[str]:
    """One summary line per model of a result (the columns of :data:`SUMMARY_HEADER`)."""
    return [_summary_line(name, result, model) for model in result["models"]]


def docs_page(results_dir: Path = RESULTS_DIR) -> str:
    """The whole of ``docs/benchmarks.md`` from the result files of ``results_dir`` (sorted by name)."""
    files = sorted(results_dir.glob("*.json"))
    results = {f.name: json.loads(f.read_text()) for f in files}
    lines = ["# Benchmarks", "",
             "Generated by `python -m benchmarks.table --docs` from `benchmarks/results/*.json` (each written by "
             "`python -m benchmarks.run`; the command of each is in its section); "
             "`tests/e2e/test_benchmarks.py` checks "
             "that this page is what the files give. How the runs were chosen and what they showed, run by run: "
             "[benchmarks_history.md](benchmarks_history.md).", "",
             "Targets: EPT reference step <= 1.15 x ept_jax LoRA and <= 1.3 x the limit (the frozen model's forward "
             "plus the gradient to its inputs); merged generation within 3 % of the base model's; EPT step <= the "
             "PyTorch + PEFT LoRA step. Ratios: the interleaved rounds' when the run has them, else the sequential "
             "medians'; times: the interleaved medians where measured.", "",
             "## Summary", "", SUMMARY_HEADER, "|" + "---|" * (SUMMARY_HEADER.count("|") - 1)]
    for name, result in results.items():
        lines += summary_rows(name, result)
    for name, result in results.items():
        lines += ["", f"## {name}", "", markdown(result).rstrip("\n")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Prints the tables of the results file named on the command line (or writes / checks ``docs/benchmarks.md``
    with ``--docs [--check]``); 2 with one line on a bad argument."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--docs"]:
        page = docs_page()
        if argv[1:] == ["--check"]:
            if not DOCS_FILE.is_file() or DOCS_FILE.read_text() != page:
                print(f"{DOCS_FILE} differs from benchmarks/results/: run python -m benchmarks.table --docs",
                      file=sys.stderr)
                return 1
            return 0
        if argv[1:]:
            print("usage: python -m benchmarks.table --docs [--check]", file=sys.stderr)
            return 2
        DOCS_FILE.write_text(page)
        print(f"wrote {DOCS_FILE}")
        return 0
    if len(argv) != 1:
        print("usage: python -m benchmarks.table RESULTS.json | --docs [--check]", file=sys.stderr)
        return 2
    path = Path(argv[0])
    try:
        result = json.loads(path.read_text())
        text = markdown(result)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        print(f"error: {path} is not a readable benchmarks.run result ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
