"""Parameter accounting: trainable adapter parameters by kind, the frozen base size, the paper's params/task.

Works on abstract models (``nnx.eval_shape``), so nothing is read or allocated.
"""

from __future__ import annotations

import math
from collections import defaultdict

from flax import nnx

from ept_jax.adapters.base import AdaptedLinear
from ept_jax.core.params import AdapterParam

# Attribute names of adapter parameters -> the kind reported. Names not listed fall under "other".
KIND_OF_ATTRIBUTE = {
    "A": "A",
    "B": "B",
    "kernels": "kernels",
    "gate_w": "gate",
    "gate_b": "gate",
    "gate": "gate",
    "router_w": "gate",  # T-REX's per-token router
    "task_embedding": "task_embedding",
}
# The kinds that the paper counts as "params/task" (routing parameters are excluded, as in its table).
PER_TASK_KINDS = ("A", "B", "kernels")


def _kind(path: tuple) -> str:
    for part in path:
        if isinstance(part, str) and part in KIND_OF_ATTRIBUTE:
            return KIND_OF_ATTRIBUTE[part]
    return "other"


def parameter_summary(model: nnx.Module, n_tasks: int) -> dict:
    """Counts of a model's parameters.

    Returns:
      a dict with ``trainable`` (all :class:`AdapterParam` scalars), ``by_kind`` (``{kind: count}``: A, B,
      kernels, gate, task_embedding, other), ``trainable_per_task`` ((A + B + kernels) / ``n_tasks``, the paper's
      "params/task"), ``base`` (frozen parameters), ``adapted_linears`` (how many Linears carry an adapter) and
      ``trainable_percent`` (trainable / base * 100).
    """
    if n_tasks < 1:
        raise ValueError(f"n_tasks={n_tasks!r}: must be >= 1")
    by_kind: dict[str, int] = defaultdict(int)
    base = 0
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable):
            continue
        n = math.prod(var.shape) if hasattr(var, "shape") else 0
        if isinstance(var, AdapterParam):
            by_kind[_kind(path)] += n
        elif isinstance(var, nnx.Param):
            base += n
    trainable = sum(by_kind.values())
    per_task_total = sum(by_kind.get(k, 0) for k in PER_TASK_KINDS)
    n_adapted = sum(1 for _, m in nnx.iter_graph(model) if isinstance(m, AdaptedLinear))
    return {
        "trainable": trainable,
        "by_kind": {k: by_kind.get(k, 0) for k in ("A", "B", "kernels", "gate", "task_embedding", "other")},
        "trainable_per_task": per_task_total / n_tasks,
        "base": base,
        "adapted_linears": n_adapted,
        "n_tasks": n_tasks,
        "trainable_percent": 100.0 * trainable / base if base else float("nan"),
    }
