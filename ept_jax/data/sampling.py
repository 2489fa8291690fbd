"""Multi-task batch sampling: which task (or tasks) each training batch comes from, resumably.

Strategies:

* ``"release"``: every batch comes from one task, task ``i`` with probability ``softmax(n_i / N)`` where
  ``n_i`` is its training size and ``N = sum(n)``. This is the EPT release's ``MultiTaskDataLoader``
  (``data/multi_task_sample.py``: ``p = exp(n / N) / sum(exp(n / N))``). Since ``n_i / N`` lies in [0, 1],
  the probabilities are close to uniform: at most a factor ``e`` apart.
* ``"uniform"``: one task per batch, each with probability ``1 / T`` (the paper's description).
* ``"mixed"``: mixed-task batches: every example's task is drawn independently with probability
  ``n_i / N``, i.e. examples are drawn proportionally to task size.

Within each task, examples are visited in shuffled epochs: a fresh permutation of the task's examples per
epoch; a batch that reaches the end of an epoch continues into the next one, so every batch is full
(static shapes) and no example is dropped. (The release instead restarted an unshuffled iterator and
discarded the partial batch.)

Everything random is derived from ``(seed, counters)``: the task draw of step ``s`` from ``(seed, s)``, the
permutation of task ``t``'s epoch ``e`` from ``(seed, t, e)``. The state is therefore a few integers
(:meth:`MultiTaskSampler.state_dict`, JSON-serialisable) and a restored sampler continues with exactly the
batches the uninterrupted one would have produced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

STRATEGIES = ("release", "uniform", "mixed")
_STATE_VERSION = 1


def task_probabilities(task_sizes: Sequence[int], strategy: str) -> np.ndarray:
    """``(T,)`` float64 probabilities of the tasks under ``strategy`` (per batch, or per example for mixed).

    Args:
      task_sizes: number of training examples of each task (all > 0).
      strategy: one of :data:`STRATEGIES`.
    """
    sizes = np.asarray(task_sizes, dtype=np.float64)
    if sizes.ndim != 1 or sizes.size == 0:
        raise ValueError(f"task_sizes must be a non-empty 1-D sequence, got {task_sizes!r}")
    if np.any(sizes <= 0) or np.any(sizes != np.floor(sizes)):
        raise ValueError(f"task sizes must be positive integers, got {list(task_sizes)}")
    if strategy == "release":
        logits = sizes / sizes.sum()
        e = np.exp(logits - logits.max())
        return e / e.sum()
    if strategy == "uniform":
        return np.full(sizes.shape, 1.0 / sizes.size)
    if strategy == "mixed":
        return sizes / sizes.sum()
    raise ValueError(f"unknown sampling strategy {strategy!r}; accepted: {', '.join(STRATEGIES)}")


class MultiTaskSampler:
    """An endless, resumable iterator over batches of ``(task_id, example_index)`` pairs.

    Each ``next()`` returns a list of ``batch_size`` pairs: ``task_id`` indexes ``task_sizes`` and
    ``example_index`` the task's examples.

    Args:
      task_sizes: number of training examples of each task.
      batch_size: examples per batch.
      strategy: ``"release"``, ``"uniform"`` or ``"mixed"`` (module docstring).
      seed: the seed everything random derives from.
    """

    def __init__(self, task_sizes: Sequence[int], batch_size: int, *, strategy: str = "release", seed: int = 0):
        if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.probabilities = task_probabilities(task_sizes, strategy)
        self.task_sizes = [int(n) for n in task_sizes]
        self.batch_size = int(batch_size)
        self.strategy = strategy
        self.seed = int(seed)
        self.step = 0
        self.epochs = [0] * len(self.task_sizes)
        self.cursors = [0] * len(self.task_sizes)
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    def _permutation(self, task: int) -> np.ndarray:
        epoch = self.epochs[task]
        cached = self._perm_cache.get(task)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, 1, task, epoch])
            cached = (epoch, rng.permutation(self.task_sizes[task]))
            self._perm_cache[task] = cached
        return cached[1]

    def _take(self, task: int, count: int) -> list[int]:
        """The next ``count`` example indices of ``task``, rolling into new epochs as needed."""
        out: list[int] = []
        while len(out) < count:
            perm = self._permutation(task)
            start = self.cursors[task]
            stop = min(start + count - len(out), len(perm))
            out.extend(int(i) for i in perm[start:stop])
            if stop == len(perm):
                self.epochs[task] += 1
                self.cursors[task] = 0
            else:
                self.cursors[task] = stop
        return out

    def __iter__(self) -> MultiTaskSampler:
        return self

    def __next__(self) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, 0, self.step])
        if self.strategy == "mixed":
            tasks = rng.choice(self.num_tasks, size=self.batch_size, p=self.probabilities)
            counts = np.bincount(tasks, minlength=self.num_tasks)
            drawn = {t: iter(self._take(t, int(c))) for t, c in enumerate(counts) if c}
            batch = [(int(t), next(drawn[int(t)])) for t in tasks]
        else:
            task = int(rng.choice(self.num_tasks, p=self.probabilities))
            batch = [(task, i) for i in self._take(task, self.batch_size)]
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position as plain JSON-serialisable data (ints, strings, lists)."""
        return {
            "version": _STATE_VERSION,
            "strategy": self.strategy,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "task_sizes": list(self.task_sizes),
            "step": self.step,
            "epochs": list(self.epochs),
            "cursors": list(self.cursors),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a position saved by :meth:`state_dict`; the configuration must match this sampler's."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a MultiTaskSampler state (version {_STATE_VERSION}): {state!r}")
        for key in ("strategy", "seed", "batch_size", "task_sizes"):
            mine = getattr(self, key)
            if state.get(key) != mine:
                raise ValueError(
                    f"sampler state was saved with {key}={state.get(key)!r} but this sampler has {key}={mine!r}"
                )
        epochs, cursors = list(state["epochs"]), list(state["cursors"])
        if len(epochs) != self.num_tasks or len(cursors) != self.num_tasks:
            raise ValueError(
                f"sampler state has {len(epochs)} epochs / {len(cursors)} cursors for {self.num_tasks} tasks"
            )
        for t, (e, c) in enumerate(zip(epochs, cursors, strict=True)):
            if not (0 <= int(e) and 0 <= int(c) < self.task_sizes[t]):
                raise ValueError(
                    f"sampler state: task {t} epoch {e} / cursor {c} out of range (size {self.task_sizes[t]})"
                )
        self.step = int(state["step"])
        self.epochs = [int(e) for e in epochs]
        self.cursors = [int(c) for c in cursors]
        self._perm_cache.clear()
