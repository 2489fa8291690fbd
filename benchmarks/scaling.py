"""Scaling with tasks and rank: training-step time and peak memory of EPT, LoRA and MoE-LoRA (issue 29 §5).

    python -m benchmarks.scaling --out docs/results/scaling_<machine>.json     # measure
    python -m benchmarks.scaling --plot docs/results/scaling_<machine>.json    # PNGs + tables into docs/scaling.md
    python -m benchmarks.scaling --check docs/results/scaling_<machine>.json   # exit 1 when docs/scaling.md differs

Methods (every one the program's jitted training step, ``train.steps.make_train_step``, built as
:func:`benchmarks.jax_rows.train_calls` builds it, on the same random base weights and batch):

* ``ept_reference``: EPT, reference variant, fast path (the default adapter); its experts are shared by all tasks,
  only each adapted Linear's task embedding ``(n_tasks, d_in)`` grows with the task count;
* ``lora_shared``: one LoRA adapter for all tasks (``kind="lora"``): nothing in it depends on the task count;
* ``lora_per_task``: one LoRA adapter per task (:class:`PerTaskLoRAAdapter`, kind ``"lora_per_task"``, defined
  here: ept_jax has no per-task LoRA): ``A (n_tasks, r, d_in)``, ``B (n_tasks, d_out, r)``, each example's
  factors gathered by its task id; every task's adapter is a parameter the optimizer steps;
* ``moelora``: ept_jax MoE-LoRA (``kind="moelora"``: ``min(8, r)`` experts splitting the rank ``r``, dense
  softmax gate over a per-Linear task embedding ``(n_tasks, 64)``).

Sweeps: the task count ``--tasks`` at rank ``--base-rank``, and the rank ``--ranks`` at ``--base-tasks`` tasks.
The task embedding of every kind has exactly ``n_tasks`` rows (``adapter.n_task_rows = n_tasks``); the batch's
``B`` examples are spread over the tasks (example ``b`` is task ``b * n_tasks // B``), so with more tasks than
examples a batch holds ``B`` distinct tasks, as a real mixed batch does.

Each row: median of ``--reps`` timed steps after ``--warmup`` untimed ones (:func:`benchmarks.measure.time_calls`),
compile time apart, the compiled step's memory analysis (:func:`benchmarks.measure.xla_memory`; tabulated as
arguments + outputs - aliased + temporaries, :func:`total_bytes`: the arguments are the frozen weights, adapter
parameters, AdamW state and batch, the temporaries activations, gradients and optimizer scratch), the host RSS
delta of the warm-up and the trainable parameter count. Output JSON: ``schema``, ``command``, ``complete``, ``machine``
(:func:`benchmarks.measure.machine`), ``model`` (name, architecture, targets, kernel sizes, shapes), ``reps``,
``warmup``, ``base_rank``, ``base_tasks``, ``tasks``, ``ranks``, ``methods``, ``rows`` (``sweep`` "tasks" or
"rank", ``method``, ``n_tasks``, ``r``, ``median_s``, ``times_s``, ``compile_s``, ``memory``, ``params``) and
``elapsed_s``. ``--plot`` writes ``<json stem>_tasks.png`` and ``<json stem>_rank.png`` next to the JSON and the
Markdown tables between :data:`BEGIN` and :data:`END` in ``--doc`` (default ``docs/scaling.md``).
Errors a user can cause print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

SCHEMA = 1
REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "scaling.md"
BEGIN, END = "<!-- scaling:begin -->", "<!-- scaling:end -->"

METHODS = ("ept_reference", "lora_shared", "lora_per_task", "moelora")
LABELS = {"ept_reference": "EPT (reference)", "lora_shared": "LoRA shared", "lora_per_task": "LoRA per task",
          "moelora": "MoE-LoRA"}
TASKS = (1, 8, 32, 128)
RANKS = (4, 8, 16, 64)
BASE_RANK, BASE_TASKS = 8, 8
MOELORA_MAX_EXPERTS = 8
MODELS = ("t5_small", "t5_mini", "t5_tiny")


# --------------------------------------------------------------------------------------------------- arguments


def _ints(flag: str, text: str) -> tuple[int, ...]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    out = []
    for t in items:
        try:
            v = int(t)
        except ValueError:
            raise ValueError(f"{flag} {t!r}: not an integer (expected comma-separated integers >= 1)") from None
        if v < 1:
            raise ValueError(f"{flag} {v}: must be >= 1")
        out.append(v)
    if not out:
        raise ValueError(f"{flag} {text!r}: give at least one value")
    if len(set(out)) != len(out):
        raise ValueError(f"{flag} {text!r}: repeated values")
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class Options:
    """What one invocation does: ``mode`` "measure", "plot" or "check", and the measurement's settings."""

    mode: str
    path: Path
    doc: Path
    model: str
    methods: tuple[str, ...]
    tasks: tuple[int, ...]
    ranks: tuple[int, ...]
    base_rank: int
    base_tasks: int
    reps: int
    warmup: int


def parse_args(argv: list[str]) -> Options:
    """The :class:`Options` of a command line.

    Raises:
      ValueError: a bad value, named in the message with what is accepted.
    """
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--out", default=None, help="measure; results JSON (default docs/results/scaling_<machine>.json)")
    mode.add_argument("--plot", default=None, help="results JSON to plot and tabulate into --doc")
    mode.add_argument("--check", default=None, help="results JSON; exit 1 when --doc's generated block differs")
    p.add_argument("--doc", default=str(DOC), help="the Markdown file holding the generated block")
    p.add_argument("--model", default="t5_mini", help=f"model shape, one of {', '.join(MODELS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--tasks", default=",".join(map(str, TASKS)), help="task counts of the task sweep")
    p.add_argument("--ranks", default=",".join(map(str, RANKS)), help="ranks of the rank sweep")
    p.add_argument("--base-rank", default=str(BASE_RANK), help="rank of the task sweep")
    p.add_argument("--base-tasks", default=str(BASE_TASKS), help="task count of the rank sweep")
    p.add_argument("--reps", default="5", help="timed steps per row (>= 1)")
    p.add_argument("--warmup", default="1", help="untimed steps before them (>= 0)")

    def error(message):  # argparse exits on its own errors; turn them into ValueError
        raise ValueError(message)

    p.error = error  # type: ignore[method-assign]
    a = p.parse_args(argv)
    if a.model not in MODELS:
        raise ValueError(f"--model {a.model!r}: accepted {', '.join(MODELS)}")
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"--methods {bad or a.methods!r}: accepted {', '.join(METHODS)}")
    tasks, ranks = _ints("--tasks", a.tasks), _ints("--ranks", a.ranks)
    (base_rank,), (base_tasks,) = _ints("--base-rank", a.base_rank), _ints("--base-tasks", a.base_tasks)
    try:
        reps, warmup = int(a.reps), int(a.warmup)
    except ValueError:
        raise ValueError(f"--reps {a.reps!r} / --warmup {a.warmup!r}: integers expected") from None
    if reps < 1:
        raise ValueError(f"--reps {reps}: must be >= 1")
    if warmup < 0:
        raise ValueError(f"--warmup {warmup}: must be >= 0")
    if "moelora" in methods:
        for r in (*ranks, base_rank):
            n = min(MOELORA_MAX_EXPERTS, r)
            if r % n:
                raise ValueError(f"rank {r}: MoE-LoRA splits it over {n} experts; use a multiple of "
                                 f"{MOELORA_MAX_EXPERTS} above {MOELORA_MAX_EXPERTS}")
    if a.plot is not None:
        mode_, path = "plot", Path(a.plot)
    elif a.check is not None:
        mode_, path = "check", Path(a.check)
    else:
        mode_, path = "measure", Path(a.out) if a.out else Path()
    if mode_ != "measure" and not path.is_file():
        raise ValueError(f"--{mode_} {str(path)!r}: no such file")
    return Options(mode_, path, Path(a.doc), a.model, methods, tasks, ranks, base_rank, base_tasks, reps, warmup)


# --------------------------------------------------------------------------------------------------- per-task LoRA


def register_per_task_lora() -> None:
    """Registers :class:`PerTaskLoRAAdapter` as adapter kind ``"lora_per_task"`` (once; needs JAX)."""
    from ept_jax.adapters import registry

    if "lora_per_task" in registry.registered_kinds():
        return
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ept_jax.adapters.base import (
        Adapter,
        ab_init_spec,
        adapter_axes,
        check_input,
        check_task,
        draw_params,
        dtype_of,
    )
    from ept_jax.core.dropout import dropout
    from ept_jax.core.lowrank import lowrank_both_per_example
    from ept_jax.core.params import AdapterParam, param

    @registry.register_adapter("lora_per_task")
    class PerTaskLoRAAdapter(Adapter):
        """One LoRA per task: ``y[b] = (alpha / r) * dropout(x[b]) @ A[t_b].T @ B[t_b].T``.

        ``A (n_tasks, r, d_in)`` PyTorch Linear init (fan-in ``d_in``, as ``n_tasks`` separate LoRA adapters),
        ``B (n_tasks, d_out, r)`` zero; ``t_b = ctx.task_ids[b]``. The gather's gradient is a scatter into the
        full ``(n_tasks, ...)`` arrays, and AdamW steps all of them: that is what grows with the task count.
        """

        def __init__(self, cfg, d_in: int, d_out: int, *, rngs: nnx.Rngs, axes=None):
            self.validate_config(cfg, d_in, d_out)
            self.cfg, self.d_in, self.d_out = cfg, d_in, d_out
            dtype = dtype_of(cfg.param_dtype)
            in_ax, out_ax = adapter_axes(axes)
            n = cfg.n_tasks
            v = draw_params(rngs, {"A": ((n, cfg.r, d_in), *ab_init_spec(cfg.init or "default", (n, cfg.r, d_in),
                                                                           cfg.r))}, dtype)
            self.A = param(v["A"], ("tasks", "lora_rank", in_ax), AdapterParam)
            self.B = param(jnp.zeros((n, d_out, cfg.r), dtype), ("tasks", out_ax, "lora_rank"), AdapterParam)

        def __call__(self, x: jax.Array, ctx) -> jax.Array:
            check_input(x, self.d_in, ctx.task_ids)
            x = dropout(x, self.cfg.dropout, ctx, self.cfg.dropout_impl)
            a = self.A[...].astype(x.dtype)[ctx.task_ids]  # (B, r, d_in)
            b = self.B[...].astype(x.dtype)[ctx.task_ids]  # (B, d_out, r)
            q = jnp.transpose(b, (0, 2, 1)) * jnp.asarray(self.cfg.scale, x.dtype)  # (B, r, d_out)
            return lowrank_both_per_example(x, a, q)

        def merge(self, task):
            check_task(task, self.cfg.n_tasks)
            return self.cfg.scale * self.B[...][task] @ self.A[...][task]

        def to_lora(self, task):
            check_task(task, self.cfg.n_tasks)
            return self.cfg.scale * self.B[...][task], self.A[...][task]


def adapter_options(method: str, n_tasks: int, r: int) -> dict[str, Any]:
    """The ``config.adapter`` overrides of ``method`` at ``n_tasks`` tasks and rank ``r``."""
    common = {"r": r, "n_task_rows": n_tasks}
    if method == "ept_reference":
        return {"kind": "ept", "variant": "reference", "forward_path": "fast", **common}
    if method == "lora_shared":
        return {"kind": "lora", **common}
    if method == "lora_per_task":
        return {"kind": "lora_per_task", **common}
    if method == "moelora":
        return {"kind": "moelora", "n_moe_experts": min(MOELORA_MAX_EXPERTS, r), **common}
    raise ValueError(f"method {method!r}: accepted {', '.join(METHODS)}")


# --------------------------------------------------------------------------------------------------- measuring


def model_spec(name: str):
    """The :class:`benchmarks.setups.ModelSpec` of ``name``: ``t5_small`` and ``t5_tiny`` are the harness's;
    ``t5_mini`` is T5-small's widths (d_model 512, d_ff 2048, 8 heads, 32128 vocabulary, all six Linears adapted,
    EPT's eight experts) with 2 + 2 layers and batch 8, source 64, target 16 tokens (a 2-core CPU budget)."""
    from benchmarks import setups

    if name == "t5_small":
        return setups.FULL[0]
    if name == "t5_tiny":
        return setups.QUICK[0]
    if name == "t5_mini":
        arch = {**setups.T5_SMALL, "num_layers": 2, "num_decoder_layers": 2}
        return dataclasses.replace(setups.FULL[0], name="t5_mini", arch=arch, batch=8, seq=64, target_len=16,
                                   seq_sweep=(), expert_sweep=())
    raise ValueError(f"--model {name!r}: accepted {', '.join(MODELS)}")


def task_ids(batch: int, n_tasks: int):
    """``(B,)`` int32: example ``b`` is task ``b * n_tasks // B`` (spread over all tasks; ``B`` distinct when
    ``n_tasks >= B``)."""
    import numpy as np

    return (np.arange(batch) * n_tasks // batch).astype(np.int32)


def measure_row(spec, tensors, method: str, n_tasks: int, r: int, *, reps: int, warmup: int) -> dict[str, Any]:
    """One training step of ``method`` at ``n_tasks`` tasks and rank ``r``, timed (see the module docstring)."""
    from benchmarks import jax_rows, measure, setups

    register_per_task_lora()
    config = setups.bench_config(spec, adapter_options(method, n_tasks, r))
    config.data.tasks = tuple(f"task{i}" for i in range(n_tasks))
    _, call, compiled, compile_s, st, _, _ = next(jax_rows.train_calls(
        spec, None, tensors, (spec.seq,), dtype="float32", config=config, task_ids=task_ids(spec.batch, n_tasks)))
    timing = measure.time_calls(call, reps=reps, warmup=warmup, sampler=jax_rows.rss_sampler())
    mem = dict(measure.xla_memory(compiled) or {})
    mem["rss_peak_delta_bytes"] = timing.get("rss_peak_delta_bytes")
    mem["device_peak_bytes_in_use"] = measure.device_peak_bytes()
    out = {"method": method, "n_tasks": n_tasks, "r": r, "median_s": timing["median_s"], "times_s": timing["times_s"],
           "compile_s": compile_s, "memory": mem,
           "params": {"base": setups.count(st.frozen), "trainable": setups.count(st.trainable)},
           "adapter": adapter_options(method, n_tasks, r)}
    return out


def plan(opts: Options) -> list[tuple[str, str, int, int]]:
    """``(sweep, method, n_tasks, r)`` of every row, the task sweep first; a point of both sweeps is measured once
    (in the task sweep) and listed in the rank sweep from it."""
    rows = [("tasks", m, n, opts.base_rank) for n in opts.tasks for m in opts.methods]
    rows += [("rank", m, opts.base_tasks, r) for r in opts.ranks for m in opts.methods
             if not (opts.base_tasks in opts.tasks and r == opts.base_rank)]
    return rows


def measure_all(opts: Options, argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks import measure, setups

    info = measure.machine()
    out = opts.path if str(opts.path) not in ("", ".") else \
        REPO / "docs" / "results" / f"scaling_{measure.machine_slug(info)}.json"
    spec = model_spec(opts.model)
    tensors = setups.hf_tensors(setups.hf_model(spec))
    t0 = time.time()
    rows: list[dict[str, Any]] = []

    def write(complete: bool) -> None:
        result = {
            "schema": SCHEMA, "command": "python -m benchmarks.scaling " + " ".join(argv), "complete": complete,
            "machine": info, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "model": {"name": spec.name, "family": spec.family, "arch": spec.arch, "targets": list(spec.targets),
                      "kernel_sizes": list(spec.kernel_sizes), "shapes": spec.shapes()},
            "reps": opts.reps, "warmup": opts.warmup, "base_rank": opts.base_rank, "base_tasks": opts.base_tasks,
            "tasks": list(opts.tasks), "ranks": list(opts.ranks), "methods": list(opts.methods), "rows": rows,
            "elapsed_s": time.time() - t0,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)

    for sweep, method, n, r in plan(opts):
        row = {"sweep": sweep, **measure_row(spec, tensors, method, n, r, reps=opts.reps, warmup=opts.warmup)}
        gc.collect()
        rows.append(row)
        print(f"[{time.time() - t0:7.1f}s] {sweep:<5} {method:<14} tasks {n:>4} r {r:>3}  "
              f"{row['median_s'] * 1e3:9.2f} ms  memory {(total_bytes(row) or 0) / 2**20:8.1f} MiB  "
              f"compile {row['compile_s']:.1f}s", flush=True)
        write(complete=False)
    write(complete=True)
    print(f"wrote {out} ({len(rows)} rows, {time.time() - t0:.0f}s)")
    return 0


# --------------------------------------------------------------------------------------------------- tables, plots


def series(result: dict[str, Any], sweep: str) -> dict[str, dict[int, dict[str, Any]]]:
    """``{method: {x: row}}`` of a sweep, ``x`` the task count (``"tasks"``) or the rank (``"rank"``); the rank
    sweep includes the task sweep's row at its base point."""
    if sweep not in ("tasks", "rank"):
        raise ValueError(f"sweep {sweep!r}: accepted 'tasks', 'rank'")
    out: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in result["methods"]}
    for row in result["rows"]:
        if row["method"] not in out:
            continue
        if sweep == "tasks" and row["sweep"] == "tasks":
            out[row["method"]][row["n_tasks"]] = row
        elif sweep == "rank" and row["n_tasks"] == result["base_tasks"] and \
                (row["sweep"] == "rank" or row["r"] == result["base_rank"]):
            out[row["method"]][row["r"]] = row
    return out


def _ms(row) -> str:
    return "—" if row is None else f"{row['median_s'] * 1e3:.1f}"


def _ms_min(row) -> str:
    return "—" if row is None else f"{min(row['times_s']) * 1e3:.1f}"


def total_bytes(row: dict[str, Any]) -> int | None:
    """Arguments + outputs - aliased + temporaries of the compiled step (``benchmarks.measure.xla_memory``'s
    fields): every buffer the step holds at once at most. XLA's own ``peak_memory_in_bytes`` on the CPU backend
    equals the argument size alone, leaving out the temporary arena (activations, gradients, optimizer scratch)."""
    m = row["memory"]
    keys = ("xla_argument_bytes", "xla_output_bytes", "xla_alias_bytes", "xla_temp_bytes")
    if any(m.get(k) is None for k in keys):
        return None
    return m["xla_argument_bytes"] + m["xla_output_bytes"] - m["xla_alias_bytes"] + m["xla_temp_bytes"]


def _mib(row) -> str:
    return "—" if row is None or total_bytes(row) is None else f"{total_bytes(row) / 2**20:.1f}"


def _temp_mib(row) -> str:
    return "—" if row is None or row["memory"].get("xla_temp_bytes") is None else \
        f"{row['memory']['xla_temp_bytes'] / 2**20:.1f}"


def _params(row) -> str:
    return "—" if row is None else f"{row['params']['trainable'] / 1e6:.3f}"


def _ratio(a, b, key) -> str:
    if a is None or b is None:
        return "—"
    va, vb = key(a), key(b)
    return "—" if not va or not vb else f"{vb / va:.2f}×"


def tables(result: dict[str, Any]) -> str:
    """The generated Markdown: a header line of the run, then per sweep the step time (median and fastest of the
    reps), XLA peak and trainable parameters of each method at each point, with the last/first ratio."""
    m = result["model"]
    sh = ", ".join(f"{k} {v}" for k, v in m["shapes"].items())
    mach = result["machine"]
    lines = [f"Run: `{result['command']}` — model `{m['name']}` ({sh}), {result['reps']} timed steps after "
             f"{result['warmup']} warm-up, {mach['cpu_model']} ({mach['cpu_usable']} usable cores), JAX "
             f"{mach['versions'].get('jax')} on {mach['jax_backend']}; {len(result['rows'])} rows in "
             f"{result['elapsed_s']:.0f} s{'' if result.get('complete', True) else ' (INCOMPLETE run)'}.", ""]
    step = lambda r: r["median_s"]  # noqa: E731
    fast = lambda r: min(r["times_s"])  # noqa: E731
    temp = lambda r: r["memory"].get("xla_temp_bytes")  # noqa: E731
    trn = lambda r: r["params"]["trainable"]  # noqa: E731
    for sweep, xs, what, fixed in (("tasks", result["tasks"], "tasks", f"rank r = {result['base_rank']}"),
                                   ("rank", result["ranks"], "r", f"{result['base_tasks']} tasks")):
        s = series(result, sweep)
        lines.append(f"**Scaling with {'the task count' if sweep == 'tasks' else 'the rank'}** ({fixed}):")
        lines.append("")
        for title, fmt, key in (("step time, median (ms)", _ms, step), ("step time, fastest rep (ms)", _ms_min, fast),
                                ("XLA memory: arguments + temporaries (MiB)", _mib, total_bytes),
                                ("of which temporaries (MiB)", _temp_mib, temp),
                                ("trainable parameters (M)", _params, trn)):
            head = f"| {title} | " + " | ".join(f"{what} = {x}" for x in xs) + f" | {what} {xs[-1]} / {xs[0]} |"
            lines += [head, "|---" * (len(xs) + 2) + "|"]
            for meth, pts in s.items():
                cells = [fmt(pts.get(x)) for x in xs]
                lines.append(f"| {LABELS.get(meth, meth)} | " + " | ".join(cells) + " | "
                             + _ratio(pts.get(xs[0]), pts.get(xs[-1]), key) + " |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def png_paths(json_path: Path) -> tuple[Path, Path]:
    """``(<stem>_tasks.png, <stem>_rank.png)`` next to the results JSON."""
    return (json_path.with_name(json_path.stem + "_tasks.png"), json_path.with_name(json_path.stem + "_rank.png"))


def plot(result: dict[str, Any], json_path: Path) -> tuple[Path, Path]:
    """Writes the two figures (step time and XLA peak memory against the task count / the rank, log-2 x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = png_paths(json_path)
    for sweep, path in zip(("tasks", "rank"), paths, strict=True):
        s = series(result, sweep)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for meth, pts in s.items():
            xs = sorted(pts)
            med = [pts[x]["median_s"] * 1e3 for x in xs]
            lo = [m - min(pts[x]["times_s"]) * 1e3 for m, x in zip(med, xs, strict=True)]
            hi = [max(pts[x]["times_s"]) * 1e3 - m for m, x in zip(med, xs, strict=True)]
            axes[0].errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=LABELS.get(meth, meth))
            axes[1].plot(xs, [(total_bytes(pts[x]) or 0) / 2**20 for x in xs], marker="o",
                         label=LABELS.get(meth, meth))
        xlabel = "number of tasks" if sweep == "tasks" else "rank r"
        fixed = f"r = {result['base_rank']}" if sweep == "tasks" else f"{result['base_tasks']} tasks"
        for ax, ylabel in zip(axes, ("step time (ms): median, bars min..max",
                                          "XLA memory: arguments + temporaries (MiB)"),
                             strict=True):
            ax.set_xscale("log", base=2)
            ticks = result["tasks"] if sweep == "tasks" else result["ranks"]
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"{result['model']['name']}, {fixed}, {result['machine']['cpu_model']} "
                     f"({result['machine']['cpu_usable']} cores)", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return paths


def splice(doc: str, block: str) -> str:
    """``doc`` with the text between :data:`BEGIN` and :data:`END` replaced by ``block``.

    Raises:
      ValueError: the markers are missing, repeated or out of order.
    """
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise ValueError(f"the document needs exactly one {BEGIN} followed by one {END}")
    head, rest = doc.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def check(result: dict[str, Any], doc: str) -> str | None:
    """None when ``doc``'s generated block is what ``result`` generates, else a one-line description."""
    want = splice(doc, tables(result))
    if want == doc:
        return None
    return "the generated block differs from the results JSON (rerun --plot)"


def load(path: Path) -> dict[str, Any]:
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if result.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {result.get('schema')!r}, expected {SCHEMA}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Measures, plots or checks; returns the exit status (2: a bad argument or input; 1: --check found a
    difference)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        opts = parse_args(argv)
        if opts.mode == "measure":
            return measure_all(opts, argv)
        result = load(opts.path)
        if not opts.doc.is_file():
            raise ValueError(f"--doc {str(opts.doc)!r}: no such file")
        doc = opts.doc.read_text()
        if opts.mode == "check":
            why = check(result, doc)
            if why:
                print(f"{opts.doc}: {why}", file=sys.stderr)
                return 1
            print(f"{opts.doc}: up to date with {opts.path}")
            return 0
        new = splice(doc, tables(result))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = plot(result, opts.path)
    opts.doc.write_text(new)
    print(tables(result))
    print(f"wrote {', '.join(map(str, paths))} and {opts.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
