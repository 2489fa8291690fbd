"""What a run reports: ``metrics.jsonl``, TensorBoard events, and a progress bar or plain log lines.

``workdir/metrics.jsonl`` holds one JSON object per logged step: ``step``, the training metrics averaged over the
steps since the previous line (``loss``, ``ce``, ``contrastive``, ``grad_norm``), ``lr`` at the step,
``skipped_steps`` (non-finite steps so far), ``tokens_per_s`` and ``step_s`` (over the interval's steps, timed when
their results arrived; the first interval includes compiling the step), ``mfu`` (accelerators whose peak the
table ``train.throughput.PEAK_FLOPS`` knows) and ``elapsed_s`` (timings: the only fields that
differ between an interrupted-and-resumed run and an uninterrupted one), and, when the step evaluated,
``eval`` (``{set: {metric: value}}``) with ``eval_mean``. On resume the file is cut back to the restored step,
so the continued run rewrites what follows instead of duplicating it. Only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TIMING_KEYS = ("tokens_per_s", "step_s", "mfu", "elapsed_s")


def read_metrics(workdir: str | Path) -> list[dict]:
    """Every record of ``workdir/metrics.jsonl`` (a torn last line, from a killed process, is ignored)."""
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_metrics(workdir: Path, step: int) -> None:
    """Keeps only the records with ``step <= step`` (atomically)."""
    path = workdir / METRICS_FILE
    if not path.is_file():
        return
    kept = [r for r in read_metrics(workdir) if int(r.get("step", 0)) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v



def _summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without PyTorch: tensorboardX imports torch at import time when it
    is installed (1.5 s of a run's start-up, for tensor types this logger never passes: it writes Python floats).
    Where torch is already imported, it is left as it is."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes ``import torch`` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter

class _Progress:
    """A tqdm bar on a terminal; otherwise nothing (the log lines carry the progress)."""

    def __init__(self, start: int, total: int, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self.bar = None
        self.tty = enabled and sys.stderr.isatty()
        self.total = total
        self.step = start

    def update(self, step: int, text: str) -> None:
        if self.bar is not None:
            self.bar.update(step - self.step)
            self.bar.set_postfix_str(text, refresh=False)
        elif self.tty:
            sys.stderr.write(f"\rstep {step}/{self.total} {text}")
            sys.stderr.flush()
        self.step = step

    @property
    def active(self) -> bool:
        return self.tty

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            sys.stderr.write("\n")


class MetricsLogger:
    """Writes metrics records (module docstring) and shows progress.

    Args:
      workdir: the run's directory.
      start_step: the restored step (0 for a fresh run); later records are dropped from ``metrics.jsonl``.
      total_steps: ``train.steps``, for the progress bar and the ETA.
      is_main: whether this process writes (process 0).
    """

    def __init__(self, workdir: str | Path, *, start_step: int, total_steps: int, is_main: bool):
        self.workdir = Path(workdir)
        self.is_main = is_main
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.time()
        self.tb = None
        if is_main:
            truncate_metrics(self.workdir, start_step)
            try:
                SummaryWriter = _summary_writer_class()
                # purge_step: events past the restored step, written by the interrupted run, are hidden.
                self.tb = SummaryWriter(str(self.workdir / "tb"), purge_step=start_step + 1 if start_step else None)
            except ImportError:
                logger.warning("tensorboardX is not installed; no TensorBoard events are written")
        self.progress = _Progress(start_step, total_steps, is_main)

    def write(self, record: dict[str, Any]) -> None:
        """Appends ``record`` (must hold ``step``) to ``metrics.jsonl`` and TensorBoard; shows progress."""
        step = int(record["step"])
        record = {k: _finite_or_none(v) for k, v in record.items()}
        if self.is_main:
            with open(self.workdir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tb is not None:
                self._tensorboard(step, record)
        self._show(step, record)

    def _tensorboard(self, step: int, record: dict) -> None:
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(f"train/{key}" if key not in ("eval_mean",) else "eval/mean", value, step)
            elif isinstance(value, dict):
                for name, metrics in value.items():
                    for metric, v in (metrics.items() if isinstance(metrics, dict) else ()):
                        if isinstance(v, (int, float)):
                            self.tb.add_scalar(f"{key}/{name}/{metric}", v, step)
        self.tb.flush()

    def _show(self, step: int, record: dict) -> None:
        parts = []
        if isinstance(record.get("loss"), float):
            parts.append(f"loss {record['loss']:.4f}")
        if isinstance(record.get("lr"), float):
            parts.append(f"lr {record['lr']:.2e}")
        if isinstance(record.get("tokens_per_s"), (int, float)):
            parts.append(f"{record['tokens_per_s']:.0f} tok/s")
        if isinstance(record.get("mfu"), float):
            parts.append(f"MFU {record['mfu']:.1%}")
        if isinstance(record.get("eval_mean"), float):
            parts.append(f"eval {record['eval_mean']:.2f}")
        if isinstance(record.get("eval_loss_mean"), float):
            parts.append(f"eval loss {record['eval_loss_mean']:.3f}")
        if record.get("skipped_steps"):
            parts.append(f"skipped {record['skipped_steps']}")
        done = step - self.start_step
        if done > 0 and step < self.total:
            eta = (time.time() - self.t0) / done * (self.total - step)
            parts.append(f"eta {int(eta) // 60}m{int(eta) % 60:02d}s")
        text = ", ".join(parts)
        if self.progress.active:
            self.progress.update(step, text)
        elif self.is_main:
            logger.info("step %d/%d: %s", step, self.total, text)

    def close(self) -> None:
        self.progress.close()
        if self.tb is not None:
            self.tb.close()
