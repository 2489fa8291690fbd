"""Evaluation protocols: which rows of which split are trained on, used for model selection and reported.

All permutations are ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))`` reproduced
bit-exactly in numpy (:func:`torch_randperm`), so the halves and held-out slices are the very rows the
release and its ancestors used, without importing torch.

Protocols (GLUE):

``"reference"`` -- the EPT release (``data/multi_task_sample.py``, ``AbstractTaskDataset.get_dataset``; the
  trainer builds its evaluation sets with ``seed=1189`` in ``finetune.py``): train on the full train split;
  for MRPC, RTE, CoLA and STS-B the validation split is permuted and its second half
  (``perm[n // 2:]``) is the evaluation set; the other tasks use the full validation split (MNLI: matched).
  The release selects and reports on that same set; here ``dev`` is the unused first half
  (``perm[:n // 2]``) for the four halved tasks and the full validation split (= ``test``) for the rest.

``"hyperformer"`` -- ``split_validation_test=True`` of hyperformer / compacter (``AbstractTask.get``),
  default seed 42: small tasks (CoLA, RTE, MRPC, STS-B) train on the full train split, select on
  ``perm(validation)[:n // 2]`` and report on ``perm(validation)[n // 2:]``; large tasks (QQP, QNLI, SST-2)
  hold out ``perm(train)[:1000]`` for selection, train on ``perm(train)[1000:]`` and report on the full
  validation split; MNLI (in neither list) trains on all of train, selects on validation_mismatched and
  reports on validation_matched.

``"standard"`` -- full validation splits are the test sets (MNLI matched as ``"mnli"`` and mismatched as
  ``"mnli_mm"``); model selection on ``perm(train)[:h]`` held out from train, training on
  ``perm(train)[h:]``, with ``h = min(1000, n_train // 10)`` (hyperformer's 1000 for every large task; a
  tenth of train for the small ones, where 1000 rows would be a third of RTE).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

PROTOCOLS = ("reference", "standard", "hyperformer")
DEFAULT_SEEDS = {"reference": 1189, "standard": 42, "hyperformer": 42}

# Tasks the release evaluates on the second half of a seeded permutation of validation.
REFERENCE_HALVED = ("mrpc", "rte", "cola", "stsb")
# hyperformer's small_datasets_without_all_splits / large_data_without_all_splits restricted to GLUE.
HYPERFORMER_SMALL = ("cola", "rte", "mrpc", "stsb")
HYPERFORMER_LARGE = ("qqp", "qnli", "sst2")
HYPERFORMER_HOLDOUT = 1000


def torch_randperm(n: int, seed: int) -> np.ndarray:
    """``torch.randperm(n, generator=torch.Generator().manual_seed(seed))`` bit-exactly, as int64 ``(n,)``.

    PyTorch's CPU randperm (for ``n < 2**32 / 20``) is a Fisher-Yates shuffle driven by the 32-bit outputs of
    an MT19937 engine seeded with ``init_genrand(seed)``: for ``i`` in ``0..n-2`` it swaps ``r[i]`` with
    ``r[i + u_i % (n - i)]``. numpy's legacy ``RandomState(seed)`` is the same engine with the same
    seeding, and ``randint(0, 2**32, dtype=uint32)`` returns its raw outputs.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"randperm size must be a non-negative int, got {n!r}")
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed!r}")
    if n >= (2**32 - 1) // 20:
        raise ValueError(f"n={n} is beyond the range where torch.randperm uses this algorithm")
    perm = list(range(n))
    if n < 2:
        return np.asarray(perm, dtype=np.int64)
    draws = np.random.RandomState(int(seed)).randint(0, 2**32, size=n - 1, dtype=np.uint32).tolist()
    for i, u in enumerate(draws):
        j = i + u % (n - i)
        perm[i], perm[j] = perm[j], perm[i]
    return np.asarray(perm, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class Selection:
    """Rows ``indices`` of split ``split`` (None = every row, in order)."""

    split: str
    indices: tuple[int, ...] | None = None

    def size(self, n_rows: int) -> int:
        return n_rows if self.indices is None else len(self.indices)


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """Where each part of a task's data comes from.

    Attributes:
      train: the training rows.
      dev: evaluation-set name -> rows for model selection.
      test: evaluation-set name -> rows for the final report.
    """

    train: Selection
    dev: dict[str, Selection]
    test: dict[str, Selection]


def _halved_validation(task: str, val: str, perm: tuple[int, ...]) -> SplitPlan:
    n = len(perm)
    return SplitPlan(Selection("train"), {task: Selection(val, perm[: n // 2])}, {task: Selection(val, perm[n // 2 :])})


def _validation_split(task: str, which: str = "matched") -> str:
    if task == "mnli":
        return f"validation_{which}"
    return "validation"


def glue_split_plan(
    task: str,
    protocol: str,
    split_sizes: Mapping[str, int] | Callable[[str], int],
    seed: int | None = None,
) -> SplitPlan:
    """The :class:`SplitPlan` of GLUE ``task`` under ``protocol`` (see the module docstring).

    Args:
      task: a GLUE task name (``cola mnli mrpc qnli qqp rte sst2 stsb``).
      protocol: one of :data:`PROTOCOLS`.
      split_sizes: number of rows of each split the plan needs (``"train"``, ``"validation"``, for MNLI
        ``"validation_matched"``), as a mapping or a callable ``split -> rows`` (asked only for the splits
        the plan permutes, so a loader can avoid loading the others).
      seed: permutation seed; default :data:`DEFAULT_SEEDS` ``[protocol]``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; accepted: {', '.join(PROTOCOLS)}")
    seed = DEFAULT_SEEDS[protocol] if seed is None else int(seed)

    def size(split: str) -> int:
        if callable(split_sizes):
            return int(split_sizes(split))
        if split not in split_sizes:
            raise ValueError(
                f"{task}: protocol {protocol!r} needs the size of split {split!r}; given: {sorted(split_sizes)}"
            )
        return int(split_sizes[split])

    val = _validation_split(task)
    full = Selection
    if protocol == "reference":
        if task in REFERENCE_HALVED:
            n = size(val)
            perm = tuple(int(i) for i in torch_randperm(n, seed))
            return _halved_validation(task, val, perm)
        return SplitPlan(full("train"), {task: full(val)}, {task: full(val)})

    if protocol == "hyperformer":
        if task in HYPERFORMER_SMALL:
            n = size(val)
            perm = tuple(int(i) for i in torch_randperm(n, seed))
            return _halved_validation(task, val, perm)
        if task in HYPERFORMER_LARGE:
            n_train = size("train")
            if n_train <= HYPERFORMER_HOLDOUT:
                raise ValueError(
                    f"{task}: protocol 'hyperformer' holds out {HYPERFORMER_HOLDOUT} train rows but train has {n_train}"
                )
            perm = tuple(int(i) for i in torch_randperm(n_train, seed))
            return SplitPlan(
                Selection("train", perm[HYPERFORMER_HOLDOUT:]),
                {task: Selection("train", perm[:HYPERFORMER_HOLDOUT])},
                {task: full(val)},
            )
        if task == "mnli":
            return SplitPlan(full("train"), {"mnli_mm": full("validation_mismatched")}, {"mnli": full(val)})
        raise ValueError(f"protocol 'hyperformer' has no rule for task {task!r}")

    # standard
    n_train = size("train")
    holdout = min(HYPERFORMER_HOLDOUT, n_train // 10)
    if holdout == 0:
        raise ValueError(f"{task}: protocol 'standard' holds out a tenth of train, but train has only {n_train} rows")
    perm = tuple(int(i) for i in torch_randperm(n_train, seed))
    test = {task: full(val)}
    if task == "mnli":
        test["mnli_mm"] = full("validation_mismatched")
    return SplitPlan(Selection("train", perm[holdout:]), {task: Selection("train", perm[:holdout])}, test)


def half_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(first, second)`` halves of ``torch_randperm(n, seed)``: ``perm[:n // 2]`` and ``perm[n // 2:]``."""
    perm = torch_randperm(n, seed)
    return perm[: n // 2], perm[n // 2 :]
