"""``python -m train.export``: a task's adapter as a merged Hugging Face model or an exact PEFT LoRA adapter.

From an ept_jax training run (the best checkpoint unless ``--step N``; task names from the run's config)::

    python -m train.export --workdir DIR --task NAME|all --format merged|peft --out DIR

From an adapter saved by the released PyTorch EPT (task ids index its task-embedding rows; kernel sizes
default to what the saved kernels show, ``--top-k`` to the release's 2)::

    python -m train.export --reference-adapter DIR --base DIR --task ID|all --format merged|peft --out DIR \\
        [--expert-kernel-sizes 2 2 4 4 6 6 8 8] [--top-k 2]

``--task all`` writes one subdirectory per task (the task's name, or ``task_<id>`` for a release adapter).
The output appears atomically (a failed export leaves nothing), an existing non-empty ``--out`` is refused
unless ``--overwrite``. Errors print as one line and exit with status 2 (``--verbose`` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from train.errors import EXIT_USER_ERROR


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like every other error of this command)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {message} (see python -m train.export --help)\n")


def _top_k(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1 or 'none'") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"{k} is not an integer >= 1 or 'none'")
    return k


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (both modes; see the module docstring)."""
    from ept_jax.checkpoints.export import DTYPE_CHOICES, FORMATS

    p = _Parser(
        prog="python -m train.export",
        description="Export a task's adapter as a merged Hugging Face model or an exact PEFT LoRA adapter.",
    )
    src = p.add_argument_group("source (one of)")
    src.add_argument("--workdir", help="an ept_jax training run directory")
    src.add_argument("--reference-adapter", help="an adapter directory saved by the released PyTorch EPT")
    p.add_argument("--base", help="with --reference-adapter: the base model directory (or hub id)")
    p.add_argument(
        "--task", required=True, help="task name (--workdir) or id (--reference-adapter), or 'all'"
    )
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output directory (created atomically)")
    p.add_argument("--step", type=int, help="with --workdir: this checkpoint step instead of the best one")
    p.add_argument(
        "--expert-kernel-sizes",
        type=int,
        nargs="+",
        metavar="K",
        help="with --reference-adapter: kernel size per expert (default: read off the saved kernels)",
    )
    p.add_argument(
        "--top-k",
        type=_top_k,
        default=2,
        help="with --reference-adapter: experts mixed per task (default 2, as the release; 'none' = all)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="float32",
        help="dtype of the written weights (default float32; 'base' = the base config's dtype)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--verbose", action="store_true", help="show full tracebacks on errors")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.workdir is None) == (args.reference_adapter is None):
        p.error("give exactly one of --workdir and --reference-adapter")
    if args.workdir is not None:
        bad = [
            f for f, v in (("--base", args.base), ("--expert-kernel-sizes", args.expert_kernel_sizes)) if v
        ]
        if bad:
            p.error(f"{', '.join(bad)} only apply to --reference-adapter")
    else:
        if args.base is None:
            p.error("--reference-adapter needs --base (the base model the adapter was trained on)")
        if args.step is not None:
            p.error("--step only applies to --workdir")


def reference_tasks(task: str, n_rows: int) -> int | dict[str, int]:
    """``--task`` of a release adapter: one id, or ``{"task_<id>": id}`` for every task-embedding row."""
    from ept_jax.checkpoints.export import ExportError

    if task == "all":
        return {f"task_{i}": i for i in range(n_rows)}
    try:
        t = int(task)
    except ValueError:
        raise ExportError(
            f"--task {task!r}: a release adapter's tasks are ids 0..{n_rows - 1} or 'all'"
        ) from None
    if not 0 <= t < n_rows:
        raise ExportError(
            f"--task {t} is out of range: the adapter has {n_rows} task rows (ids 0..{n_rows - 1})"
        )
    return t


def workdir_tasks(task: str, names: Sequence[str]) -> int | dict[str, int]:
    """``--task`` of a training run: a task name (its id is its index in the run's task list), or all."""
    from ept_jax.checkpoints.export import ExportError

    if task == "all":
        return {name: i for i, name in enumerate(names)}
    if task in names:
        return list(names).index(task)
    raise ExportError(f"--task {task!r} is not a task of this run; accepted: {list(names)} or 'all'")


def export_reference(args: argparse.Namespace) -> list[Path]:
    """The ``--reference-adapter`` mode; returns the directories written."""
    from ept_jax.checkpoints.export import export_adapter
    from ept_jax.checkpoints.reference import model_from_reference

    sizes = tuple(args.expert_kernel_sizes) if args.expert_kernel_sizes else None
    model, n_rows = model_from_reference(
        args.reference_adapter, args.base, expert_kernel_sizes=sizes, top_k=args.top_k
    )
    tasks = reference_tasks(args.task, n_rows)
    base_dir = args.base if os.path.isdir(args.base) else None
    return export_adapter(
        model,
        args.out,
        tasks,
        format=args.format,
        base_dir=base_dir,
        base_model_name_or_path=str(args.base),
        dtype=args.dtype,
        overwrite=args.overwrite,
        metadata={"ept_jax.source": f"reference adapter {os.path.abspath(args.reference_adapter)}"},
    )


@dataclasses.dataclass
class RestoredRun:
    """A training run's model with the adapter parameters of one checkpoint, and what export needs to know.

    Attributes:
      model: the run's model (base weights as trained on) with the checkpoint's adapter parameters.
      config: the run's resolved config (``workdir/config.json``) as a ConfigDict.
      step: the checkpoint's step.
      task_names: the run's tasks; a task's index is its task id.
      base_dir: the base model's local directory, or None for a randomly initialised base.
    """

    model: Any
    config: Any
    step: int
    task_names: list[str]
    base_dir: Path | None


def _manager(directory: Path, items: tuple[str, ...]):
    from train.checkpointing import orbax_manager

    return orbax_manager(directory, items, read_only=True)  # exporting cannot disturb a run still training


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def load_run_config(workdir: str | os.PathLike):
    """The resolved config a run saved (``workdir/config.json``) as a ConfigDict.

    Raises:
      UserError: ``workdir`` is not a run directory, or the file is not valid JSON.
    """
    import ml_collections

    from train.configuration import CONFIG_FILE
    from train.errors import UserError

    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(
            f"--workdir {str(workdir)!r} holds no {CONFIG_FILE}: not an ept_jax training run directory"
        )
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from e


def find_checkpoint(workdir: str | os.PathLike, step: int | None) -> tuple[Path, int]:
    """``(checkpoint manager directory, step)``: the best checkpoint (``step=None``) or checkpoint ``step``.

    Raises:
      UserError: no best checkpoint yet, or no checkpoint of that step (the available steps are named).
    """
    from train.errors import UserError

    workdir = Path(workdir)
    best_dir, ckpt_dir = workdir / "best", workdir / "checkpoints"
    available = sorted(set(_steps(best_dir)) | set(_steps(ckpt_dir)))
    if step is None:
        if not _steps(best_dir):
            raise UserError(
                f"{best_dir} holds no checkpoint (the run has not evaluated yet); pass --step N, "
                f"one of {available}"
            )
        return best_dir, _steps(best_dir)[-1]
    for directory in (ckpt_dir, best_dir):
        if step in _steps(directory):
            return directory, step
    raise UserError(f"--step {step}: {workdir} has no checkpoint of that step; available: {available}")


def restore_for_export(workdir: str | os.PathLike, step: int | None = None) -> RestoredRun:
    """Rebuilds a training run's model from ``workdir/config.json`` and restores a checkpoint's adapters.

    The model is built by the trainer's own ``train.state.build_model`` (the base loaded from
    ``model.name_or_path``, or, for ``model.random_init``, the same random base the run trained on: it is
    generated from ``train.seed``); the adapter parameters come from the best checkpoint or from ``step``.
    As on the trainer's resume, the saved identity (adapter config, tasks, family) and tree (every entry's
    path and shape) are compared with the run before any array is read: never a partial restore.

    Raises:
      UserError / ValueError / OSError: not a run directory, no such checkpoint, or a mismatching checkpoint.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    from ept_jax.core.params import TRAINABLE
    from train import checkpointing as ck
    from train import state as state_lib
    from train.errors import CheckpointMismatchError, UserError
    from train.rundir import run_identity

    config = load_run_config(workdir)
    if str(config.adapter.kind) == "none":
        raise UserError(
            f"the run in {str(workdir)!r} trained no adapter (adapter.kind='none'): nothing to export"
        )
    directory, step = find_checkpoint(workdir, step)
    items = ("params", "host") if directory.name == "best" else ("params", "opt_state", "host")
    mgr = _manager(directory, items)
    where = directory / str(step)
    try:
        host = mgr.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))["host"]
        problems = ck.identity_mismatches(host, run_identity(config))
        if problems:  # checked before the model is built: a wrong checkpoint fails fast
            raise CheckpointMismatchError(
                f"checkpoint {where} was not written by this run: {'; '.join(problems)}"
            )
        model = state_lib.build_model(config)
        graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
        # the target carries this process's shardings: a checkpoint written by another number of processes or
        # devices restores onto these (Orbax would otherwise insist on the devices it was saved from)
        target = ck.to_nested(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                           trainable))
        problems = ck.tree_mismatches("params", mgr.item_metadata(step)["params"], target)
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {where} does not fit the run's model: {'; '.join(problems[:8])}"
            )
        restored = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    finally:
        mgr.close()
    trainable = ck.from_nested(trainable, restored["params"])
    base_dir = None
    if not config.model.random_init:
        from ept_jax.checkpoints.hf import resolve_model_dir

        base_dir = resolve_model_dir(str(config.model.name_or_path))
    return RestoredRun(
        nnx.merge(graphdef, trainable, frozen), config, int(step), list(config.data.tasks), base_dir
    )


def export_workdir(args: argparse.Namespace) -> list[Path]:
    """The ``--workdir`` mode; returns the directories written."""
    from ept_jax.checkpoints.export import ExportError, export_adapter
    from train.state import load_tokenizer

    # Everything that can be checked from the saved config is checked before the model is built.
    config = load_run_config(args.workdir)
    tasks = workdir_tasks(args.task, list(config.data.tasks))
    if args.format == "peft" and config.model.random_init:
        raise ExportError(
            "the run's base model is randomly initialised (model.random_init=True) and exists only inside "
            "the run, so a LoRA adapter would have nothing to load onto; use --format merged (it writes the "
            "base too)"
        )
    find_checkpoint(args.workdir, args.step)
    run = restore_for_export(args.workdir, step=args.step)
    # The tokenizer the run trained with, when it is not the base model's own (whose files are then copied).
    tokenizer = load_tokenizer(run.config) if run.config.data.tokenizer is not None else None
    return export_adapter(
        run.model,
        args.out,
        tasks,
        format=args.format,
        base_dir=run.base_dir,
        base_model_name_or_path=str(run.config.model.name_or_path),
        dtype=args.dtype,
        overwrite=args.overwrite,
        metadata={"ept_jax.source": f"{os.path.abspath(args.workdir)} step {run.step}"},
        tokenizer=tokenizer,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit status (0, or :data:`EXIT_USER_ERROR` after a one-line error)."""
    p = build_parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    from train.errors import USER_ERRORS, one_line

    try:
        written = export_workdir(args) if args.workdir is not None else export_reference(args)
    except USER_ERRORS as e:  # bad paths, tasks, checkpoints, shapes: one line
        if args.verbose:
            raise
        print(f"error: {one_line(e)} (run with --verbose for the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR
    for d in written:
        print(f"wrote {args.format} export: {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
