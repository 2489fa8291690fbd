"""``python -m train.report --workdir DIR [--out DIR]``: plots and a routing summary of a training run.

Reads what ``python -m train.main`` left in ``DIR`` (``config.json``, ``metrics.jsonl``, the checkpoints) and writes
into ``--out`` (default ``DIR/report/``):

* ``training.png``: the training loss (with its cross-entropy and contrastive parts) and the learning rate vs step;
* ``eval.png``: every evaluation set's main metric (its task's ``headline_metric``) and the mean score vs step,
  from the ``eval`` records of ``metrics.jsonl``;
* ``routing.png``: the expert allocation (the paper's figure): one panel per task, rows = adapted layers,
  columns = experts (with their kernel sizes), value = the mixing weight the task's router gives the expert
  (zero for experts outside its top-k);
* ``task_embeddings_pca.png``: a 2-D PCA of the task embeddings, one point per task. Each adapted layer's rows of
  the trained tasks are L2-normalised (the contrastive loss compares normalised embeddings) and the layers are
  *stacked* (concatenated along the feature axis), so a task is one vector over all layers; the PCA is of those
  ``n_tasks`` vectors;
* ``summary.json``: the routing table ``routing[layer][task] = {"experts": [...], "weights": [...]}`` (the top-k
  experts in descending weight and their mixing weights; all experts for a dense router), the PCA coordinates,
  the checkpoint used and notes.

The adapter parameters come from the best checkpoint (``workdir/best``), or from the latest regular checkpoint
when there is no best one, restored into a model built from abstract shapes of the run's saved config (no base
weights are read). Adapters without a router (LoRA, DCFT) get no routing map and no PCA; the notes say so.

Problems (no workdir, no ``config.json``, no metrics, no checkpoint, a checkpoint of another model) are printed
as one line on stderr and the program exits with status 2, as ``train.main`` does.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from absl import app, flags

from train.errors import EXIT_USER_ERROR, USER_ERRORS, UserError, one_line

_WORKDIR = _OUT = _VERBOSE = None  # absl flag holders, defined by _define_flags() when run as a program


def _define_flags() -> None:
    """Defines the command-line flags. Only when run as a program: importing this module (for
    :func:`make_report`) next to ``train.main``, which defines ``--workdir`` too, must not clash."""
    global _WORKDIR, _OUT, _VERBOSE
    _WORKDIR = flags.DEFINE_string("workdir", None, "directory of a run of train.main")
    _OUT = flags.DEFINE_string("out", None, "output directory (default: WORKDIR/report)")
    _VERBOSE = flags.DEFINE_bool("verbose", False, "print full tracebacks on errors")

REPORT_DIR = "report"
SUMMARY_FILE = "summary.json"
PLOTS = {"training": "training.png", "eval": "eval.png", "routing": "routing.png",
         "pca": "task_embeddings_pca.png"}


# --------------------------------------------------------------------------------------------------- inputs


def load_run_config(workdir: Path):
    """The run's config (``workdir/config.json``, as ``train.main`` saved it) as a ConfigDict.

    Raises:
      UserError: the workdir or its config.json is missing or unreadable.
    """
    import ml_collections

    from train.configuration import CONFIG_FILE

    if not workdir.is_dir():
        raise UserError(f"--workdir {str(workdir)!r} does not exist or is not a directory")
    path = workdir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: {str(workdir)!r} is not a run directory of train.main")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from e


def load_records(workdir: Path) -> list[dict]:
    """The records of ``workdir/metrics.jsonl``; raises :class:`UserError` when there are none."""
    from train.logger import METRICS_FILE, read_metrics

    records = read_metrics(workdir)
    if not records:
        raise UserError(f"{workdir / METRICS_FILE} is missing or empty: the run has logged no step yet")
    return records


def _has_checkpoint(directory: Path) -> bool:
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def restore_model(config, workdir: Path):
    """``(model, info)``: an abstract-shaped model of ``config`` whose adapter parameters are those of the best
    checkpoint (or of the latest one when no best was saved); base weights stay ``ShapeDtypeStruct`` s.

    ``info`` is ``{"source": "best" | "latest", "step": int, "score": float | None}``.

    Raises:
      UserError: no checkpoint; CheckpointMismatchError: a checkpoint of another model or adapter.
    """
    ckpt_dirs = (workdir / "best", workdir / "checkpoints")
    if not any(_has_checkpoint(d) for d in ckpt_dirs):
        raise UserError(f"no checkpoint in {ckpt_dirs[0]} or {ckpt_dirs[1]}: the run has saved no adapter yet")
    import jax
    from flax import nnx

    from ept_jax.core.params import TRAINABLE
    from train.builder import build_abstract_model
    from train.checkpointing import Checkpointer
    from train.rundir import run_identity

    model, _ = build_abstract_model(config)
    graphdef, abstract, frozen = nnx.split(model, TRAINABLE, ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    on_device = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
    target = on_device(abstract)
    identity = run_identity(config)
    ckpt = Checkpointer(workdir, int(config.train.keep_checkpoints))
    try:
        best = ckpt.restore_best(target, identity) if _has_checkpoint(ckpt_dirs[0]) else None
        if best is not None:
            trainable, host = best
            info = {"source": "best", "step": int(host["step"]), "score": host.get("score")}
        else:
            from train.state import make_optimizer

            tx, _ = make_optimizer(config)
            latest = ckpt.restore_latest(target, on_device(jax.eval_shape(tx.init, target)), identity)
            if latest is None:
                raise UserError(f"no readable checkpoint in {ckpt_dirs[0]} or {ckpt_dirs[1]}")
            trainable, _, host = latest
            info = {"source": "latest", "step": int(host["step"]), "score": None}
    finally:
        ckpt.close()
    return nnx.merge(graphdef, trainable, frozen), info


# --------------------------------------------------------------------------------------------------- analysis


def is_routed(adapter) -> bool:
    """Whether ``adapter`` has a per-task router: a ``routing()`` method and a task embedding (EPT, MoE-LoRA)."""
    return (callable(getattr(adapter, "routing", None)) and getattr(adapter, "routed", True)
            and getattr(adapter, "task_embedding", None) is not None)


def routed_layers(model) -> list[tuple[str, Any]]:
    """``[(layer name, adapter)]`` of the model's adapted Linears that route (see :func:`is_routed`)."""
    from ept_jax.adapters.base import adapted_linears

    return [(lin.name, lin.adapter) for _, lin in adapted_linears(model) if is_routed(lin.adapter)]


def routing_table(layers, tasks) -> dict[str, dict[str, dict[str, list]]]:
    """``{layer: {task: {"experts": [e, ...], "weights": [w, ...]}}}`` from each adapter's ``routing()``.

    Task ``i`` (``tasks[i]``) uses task-embedding row ``i``. ``experts`` are the router's selected experts in
    descending probability (``top_k`` of them; every expert for a dense router); ``weights`` their mixing weights
    (they sum to 1).
    """
    import numpy as np

    out: dict[str, dict[str, dict[str, list]]] = {}
    for name, adapter in layers:
        weights, idx = (np.asarray(a) for a in adapter.routing())
        out[name] = {
            task: {"experts": [int(e) for e in idx[t]], "weights": [float(weights[t, e]) for e in idx[t]]}
            for t, task in enumerate(tasks)
        }
    return out


def dense_weights(table: dict, layer: str, task: str, n_experts: int):
    """``(n_experts,)`` mixing weights of ``task`` at ``layer`` (zeros for unselected experts)."""
    import numpy as np

    w = np.zeros(n_experts)
    entry = table[layer][task]
    w[entry["experts"]] = entry["weights"]
    return w


def task_embedding_pca(layers, tasks) -> dict | None:
    """2-D PCA of the tasks' embedding rows, stacked across layers (module docstring); None for < 2 tasks.

    Returns:
      ``{"coordinates": {task: [pc1, pc2]}, "explained_variance_ratio": [r1, r2], "method": str}``.
    """
    import numpy as np

    n = len(tasks)
    if n < 2 or not layers:
        return None
    rows = []
    for _, adapter in layers:
        e = np.asarray(adapter.task_embedding[...], np.float64)[:n]
        rows.append(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12))
    x = np.concatenate(rows, axis=1)  # (n_tasks, sum of d_in)
    x = x - x.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    k = min(2, s.size)
    coords = np.zeros((n, 2))
    coords[:, :k] = u[:, :k] * s[:k]
    total = float(np.sum(s**2))
    ratio = [float(s[i] ** 2 / total) if total > 0 and i < s.size else 0.0 for i in range(2)]
    return {"coordinates": {t: [float(c) for c in coords[i]] for i, t in enumerate(tasks)},
            "explained_variance_ratio": ratio,
            "method": f"L2-normalised task-embedding rows of {len(layers)} layers, concatenated per task"}


def main_metric(set_name: str, metrics: dict, tasks) -> str:
    """The metric plotted for an evaluation set: its task's ``headline_metric`` when reported, else the first."""
    from ept_jax.data.tasks import get_task

    candidates = [t for t in tasks if set_name == t or set_name.startswith(f"{t}_")]
    if candidates:
        try:
            headline = get_task(max(candidates, key=len)).headline_metric
        except (KeyError, ValueError):
            headline = None
        if headline in metrics:
            return headline
    return next(iter(metrics))


# --------------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(records: list[dict], path: Path) -> bool:
    """Loss (and its parts) and learning rate vs step; False (nothing written) without training records."""
    train = [r for r in records if "loss" in r]
    if not train:
        return False
    plt = _pyplot()
    steps = [r["step"] for r in train]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("loss", "-"), ("ce", "--"), ("contrastive", ":")):
        values = [r.get(key) for r in train]
        if any(v is not None for v in values):
            ax_loss.plot(steps, [math.nan if v is None else v for v in values], style, label=key)
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss")
    ax_loss.legend()
    ax_lr.plot(steps, [r.get("lr", math.nan) for r in train], color="tab:green")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _series_plot(series: dict[str, list[tuple[int, float]]], mean: list[tuple[int, float]], mean_label: str,
                 ylabel: str, path: Path) -> None:
    """One line per evaluation set and a dashed mean, vs step, saved to ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, points in series.items():
        ax.plot([s for s, _ in points], [v for _, v in points], "o-", label=label)
    if mean:
        ax.plot([s for s, _ in mean], [m for _, m in mean], "k--", label=mean_label)
    ax.set(xlabel="step", ylabel=ylabel, title="evaluation")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_eval(records: list[dict], tasks, path: Path) -> bool:
    """Each evaluation set's main metric and the mean score vs step; for a run evaluated by held-out loss alone
    (``eval.generation=False``), each set's held-out answer loss and their mean. False without evaluations."""
    evals = [r for r in records if isinstance(r.get("eval"), dict) and r["eval"]]
    if evals:
        series = {}
        for name in dict.fromkeys(name for r in evals for name in r["eval"]):
            points = [(r["step"], r["eval"][name]) for r in evals if name in r["eval"] and r["eval"][name]]
            metric = main_metric(name, points[0][1], tasks)
            series[f"{name} ({metric})"] = [(st, m.get(metric, math.nan)) for st, m in points]
        means = [(r["step"], r["eval_mean"]) for r in evals if r.get("eval_mean") is not None]
        _series_plot(series, means, "mean score", "score (%)", path)
        return True
    evals = [r for r in records if isinstance(r.get("eval_loss"), dict) and r["eval_loss"]]
    if not evals:
        return False
    series = {name: [(r["step"], r["eval_loss"][name]) for r in evals if name in r["eval_loss"]]
              for name in dict.fromkeys(name for r in evals for name in r["eval_loss"])}
    means = [(r["step"], r["eval_loss_mean"]) for r in evals if r.get("eval_loss_mean") is not None]
    _series_plot(series, means, "mean", "held-out answer loss (token NLL)", path)
    return True


def plot_routing(table: dict, tasks, kernel_sizes: dict, path: Path) -> None:
    """One heatmap per task: rows = layers, columns = experts, value = mixing weight."""
    import numpy as np

    plt = _pyplot()
    layers = list(table)
    n_experts = max(len(kernel_sizes.get(name) or []) or 0 for name in layers)
    n_experts = max(n_experts, 1 + max(e for name in layers for t in tasks for e in table[name][t]["experts"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(1.2 + 0.45 * n_experts * len(tasks) + 3.0,
                                                     min(1.5 + 0.22 * len(layers), 80)), squeeze=False)
    image = None
    for ax, task in zip(axes[0], tasks, strict=True):
        grid = np.stack([dense_weights(table, name, task, n_experts) for name in layers])
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ks = kernel_sizes.get(layers[0])
        ax.set_xticks(range(n_experts), [f"{e}\nk={ks[e]}" if ks else str(e) for e in range(n_experts)],
                      fontsize=7)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("expert")
        if ax is axes[0][0]:
            ax.set_yticks(range(len(layers)), layers, fontsize=6)
        else:
            ax.set_yticks([])
    fig.colorbar(image, ax=list(axes[0]), label="mixing weight", fraction=0.03)
    fig.suptitle("expert allocation per task and layer")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_pca(pca: dict, path: Path) -> None:
    """The tasks' points in the plane of the first two principal components, labelled by task name."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for task, (x, y) in pca["coordinates"].items():
        ax.scatter([x], [y], s=60)
        ax.annotate(task, (x, y), textcoords="offset points", xytext=(5, 5))
    r1, r2 = pca["explained_variance_ratio"]
    ax.set(xlabel=f"PC1 ({100 * r1:.0f}% of variance)", ylabel=f"PC2 ({100 * r2:.0f}% of variance)",
           title="task embeddings (stacked over layers)")
    ax.axhline(0, color="0.8", lw=0.5)
    ax.axvline(0, color="0.8", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- report


def make_report(workdir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Writes the plots and ``summary.json`` of the run in ``workdir`` into ``out`` (default
    ``workdir/report``); returns the summary.

    Raises:
      UserError (and the other :data:`train.errors.USER_ERRORS`): see the module docstring.
    """
    workdir = Path(workdir)
    config = load_run_config(workdir)
    records = load_records(workdir)
    tasks = [str(t) for t in config.data.tasks]
    model, checkpoint = restore_model(config, workdir)
    out_dir = Path(out) if out is not None else workdir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)

    notes: list[str] = []
    plots: dict[str, str | None] = {}
    plots["training"] = PLOTS["training"] if plot_training(records, out_dir / PLOTS["training"]) else None
    if plots["training"] is None:
        notes.append("metrics.jsonl has no training-loss records: no training plot")
    plots["eval"] = PLOTS["eval"] if plot_eval(records, tasks, out_dir / PLOTS["eval"]) else None
    if plots["eval"] is None:
        notes.append("metrics.jsonl has no eval records yet: no evaluation plot")

    layers = routed_layers(model)
    kind = str(config.adapter.kind)
    table = pca = None
    kernel_sizes: dict[str, list[int]] = {}
    if layers:
        table = routing_table(layers, tasks)
        for name, adapter in layers:
            pyr = getattr(adapter, "pyramid", None)
            if pyr is not None:
                kernel_sizes[name] = [int(k) for k in pyr.kernel_sizes]
        plot_routing(table, tasks, kernel_sizes, out_dir / PLOTS["routing"])
        plots["routing"] = PLOTS["routing"]
        pca = task_embedding_pca(layers, tasks)
        if pca is not None:
            plot_pca(pca, out_dir / PLOTS["pca"])
            plots["pca"] = PLOTS["pca"]
        else:
            plots["pca"] = None
            notes.append(f"{len(tasks)} task(s): a PCA of the task embeddings needs at least 2; no PCA plot")
    else:
        plots["routing"] = plots["pca"] = None
        notes.append(f"adapter.kind={kind!r} has no per-task router: no routing map and no task-embedding PCA")

    summary = {
        "workdir": str(workdir),
        "adapter_kind": kind,
        "tasks": tasks,
        "checkpoint": checkpoint,
        "routing": table,
        "expert_kernel_sizes": kernel_sizes or None,
        "task_embedding_pca": pca,
        "plots": plots,
        "notes": notes,
    }
    from train.rundir import write_json_atomic

    write_json_atomic(out_dir / SUMMARY_FILE, summary)
    return summary


def _fail(message: str) -> None:
    print(f"error: {message} (run with --verbose for the traceback)", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected positional arguments {argv[1:]}; all options are --flags")
    if not _WORKDIR.value:
        _fail("--workdir is required: the directory of a run of train.main")
    import logging

    for noisy in ("absl", "orbax", "jax._src", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        summary = make_report(_WORKDIR.value, _OUT.value)
    except USER_ERRORS as e:
        if _VERBOSE.value:
            raise
        _fail(one_line(e))
        return
    out_dir = Path(_OUT.value) if _OUT.value else Path(_WORKDIR.value) / REPORT_DIR
    written = [p for p in summary["plots"].values() if p]
    ck = summary["checkpoint"]
    print(f"report of {_WORKDIR.value} ({ck['source']} checkpoint, step {ck['step']}): {len(written)} plot(s) and "
          f"{SUMMARY_FILE} in {out_dir}")
    for note in summary["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
