"""Evaluation metrics (numpy) and the scoring of generated answers.

Low-level metrics return fractions / coefficients in [-1, 1] with scikit-learn / scipy semantics:
:func:`accuracy`, :func:`f1_binary`, :func:`matthews_corrcoef` (multiclass, sklearn's formula),
:func:`pearson`, :func:`spearman` (average ranks for ties).

:func:`compute_task_metrics` scores generated texts of one task as the release and its ancestors report
them, in percent:

* predictions and references are parsed with the task's parser (:func:`parse_prediction`); a prediction that
  is not one of the task's label words is *invalid*;
* ``accuracy``: an invalid prediction is wrong;
* ``f1`` (MRPC, QQP; positive class ``equivalent`` / ``duplicate``): an invalid prediction is counted as the
  opposite of its reference (hyperformer's and the release's ``f1_score_with_invalid``);
* ``mcc`` (CoLA): invalid predictions form an extra class of the multiclass MCC (what the release's
  ``sklearn.metrics.matthews_corrcoef`` on strings computes);
* ``pearson`` / ``spearman`` (STS-B): unparsable scores are 0.0 (the release's fallback, see
  :func:`ept_jax.data.tasks.parse_score`); an undefined (NaN) correlation -- constant predictions -- is
  reported as 0, as the release does.

:func:`glue_average` averages per-task results: ``"paper"`` (default) takes, per task, the mean of its
metrics (MRPC/QQP: F1 and accuracy; STS-B: Pearson and Spearman) and then the mean over tasks, the
hyperformer / compacter convention for their GLUE tables; ``"release"`` is the EPT trainer's
``eval_average_metrics`` (``trainer.py``): the mean of every accuracy, MCC and Pearson value, i.e. one
number per task (MRPC/QQP accuracy, STS-B Pearson). The EPT paper's own table could not be consulted
offline; pick the mode that matches the numbers you compare with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ept_jax.data.spec import get_task, normalize_text

AVERAGE_MODES = ("paper", "release")
_RELEASE_AVERAGED = ("accuracy", "mcc", "pearson")


def _pair(predictions, targets) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(predictions), np.asarray(targets)
    if p.shape != t.shape or p.ndim != 1:
        raise ValueError(f"predictions {p.shape} and targets {t.shape} must be 1-D of the same length")
    if p.size == 0:
        raise ValueError("cannot compute a metric over 0 examples")
    return p, t


def accuracy(predictions: Sequence[Any], targets: Sequence[Any]) -> float:
    """Fraction of positions where ``predictions == targets`` (``(N,)`` each)."""
    p, t = _pair(predictions, targets)
    return float(np.mean(p == t))


def f1_binary(predictions: Sequence[Any], targets: Sequence[Any], positive: Any = 1) -> float:
    """F1 of class ``positive`` (``(N,)`` each): ``2 tp / (2 tp + fp + fn)``, 0.0 when that is 0 / 0."""
    p, t = _pair(predictions, targets)
    pp, tp_ = p == positive, t == positive
    tp = int(np.sum(pp & tp_))
    denominator = 2 * tp + int(np.sum(pp & ~tp_)) + int(np.sum(~pp & tp_))
    return 0.0 if denominator == 0 else 2.0 * tp / denominator


def matthews_corrcoef(predictions: Sequence[Any], targets: Sequence[Any]) -> float:
    """Multiclass Matthews correlation (Gorodkin's R_K, sklearn's formula); 0.0 when undefined."""
    p, t = _pair(predictions, targets)
    classes, codes = np.unique(np.concatenate([t, p]), return_inverse=True)
    k, n = len(classes), len(t)
    confusion = np.zeros((k, k), np.float64)
    np.add.at(confusion, (codes[:n], codes[n:]), 1.0)
    t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    samples, correct = confusion.sum(), np.trace(confusion)
    cov_tp = correct * samples - t_sum @ p_sum
    cov_pp = samples**2 - p_sum @ p_sum
    cov_tt = samples**2 - t_sum @ t_sum
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / math.sqrt(cov_tt * cov_pp))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of ``(N,)`` ``x`` and ``y``; NaN when undefined (N < 2 or a constant input)."""
    a, b = _pair(x, y)
    a, b = a.astype(np.float64), b.astype(np.float64)
    if a.size < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    norm = math.sqrt(float(a @ a)) * math.sqrt(float(b @ b))
    if norm == 0.0:
        return float("nan")
    return float(np.clip((a @ b) / norm, -1.0, 1.0))


def rankdata(x: Sequence[float]) -> np.ndarray:
    """1-based ranks of ``(N,)`` ``x``, ties sharing their average rank (scipy's ``method="average"``)."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # Start of each run of equal values, and each element's run.
    starts = np.concatenate([[True], sorted_a[1:] != sorted_a[:-1]])
    run = np.cumsum(starts) - 1
    run_start = np.flatnonzero(starts)
    run_end = np.concatenate([run_start[1:], [a.size]])  # exclusive
    average = (run_start + run_end + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks = np.empty(a.size, np.float64)
    ranks[order] = average[run]
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation of ``(N,)`` ``x`` and ``y``; NaN when undefined."""
    _pair(x, y)
    return pearson(rankdata(x), rankdata(y))


def parse_prediction(task: str, text: str) -> Any:
    """Generated ``text`` -> the task's canonical answer.

    A label word for classification tasks (None when ``text`` is none of them), a float for STS-B (0.0 when
    unparsable), a letter for multiple choice (None when absent), a whitespace-normalised string for the
    synthetic copy/reverse/sort tasks.
    """
    return get_task(task).parse(text)


def count_unparsable(task: str, predictions: Sequence[str]) -> int:
    """How many of ``predictions`` are not a valid answer of ``task`` (0 for open-answer tasks)."""
    spec = get_task(task)
    if spec.label_words is None:
        return 0
    return sum(spec.parse(p) is None for p in predictions)


def _zero_if_nan(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def exact_match_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``{"accuracy": percent}`` of generations equal to their reference after normalisation
    (:func:`ept_jax.data.tasks.normalize_text`): the generation metric of free-text answers (cloze prompts)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no examples to score")
    hits = [normalize_text(p) == normalize_text(r) for p, r in zip(predictions, references, strict=True)]
    return {"accuracy": 100.0 * sum(hits) / len(hits)}


def compute_task_metrics(task: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Scores generated texts of one task (module docstring), in percent.

    Args:
      task: registered task name.
      predictions: ``N`` decoded generations (special tokens removed).
      references: the ``N`` reference target texts (e.g. :attr:`EvalBatch.references`).

    Returns:
      ``{metric: value}`` for the task's ``metric_names``, each in percent (correlations x 100).
    """
    spec = get_task(task)
    if len(predictions) != len(references):
        raise ValueError(f"{task}: {len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError(f"{task}: no examples to score")
    pred = [spec.parse(p) for p in predictions]
    ref = [spec.parse(r) for r in references]
    out: dict[str, float] = {}
    if spec.label_words is not None:
        index = {w: i for i, w in enumerate(spec.label_words)}
        bad = [r for r, parsed in zip(references, ref, strict=True) if parsed not in index]
        if bad:
            raise ValueError(f"{task}: references {bad[:3]} are not label words {list(spec.label_words)}")
        p = np.asarray([index.get(x, -1) for x in pred])
        t = np.asarray([index[x] for x in ref])
        for name in spec.metric_names:
            if name == "accuracy":
                out[name] = 100.0 * accuracy(p, t)
            elif name == "f1":
                positive = index[spec.positive_label]
                y = t == positive
                yhat = np.where(p < 0, ~y, p == positive)  # invalid -> the opposite of the reference
                out[name] = 100.0 * f1_binary(yhat, y, positive=True)
            elif name == "mcc":
                out[name] = 100.0 * matthews_corrcoef(p, t)
            else:
                raise ValueError(f"{task}: metric {name!r} is not defined for label-word tasks")
        return out
    for name in spec.metric_names:
        if name == "accuracy":
            out[name] = 100.0 * accuracy(np.asarray(pred, dtype=object), np.asarray(ref, dtype=object))
        elif name == "pearson":
            out[name] = 100.0 * _zero_if_nan(pearson(pred, ref))
        elif name == "spearman":
            out[name] = 100.0 * _zero_if_nan(spearman(pred, ref))
        else:
            raise ValueError(f"{task}: metric {name!r} is not defined for open-answer tasks")
    return out


def glue_average(results: Mapping[str, Mapping[str, float]], mode: str = "paper") -> float:
    """The average score over evaluation sets (module docstring for the two conventions).

    Args:
      results: evaluation-set name -> its :func:`compute_task_metrics` dict. Pass exactly the sets to
        average (GLUE tables use MNLI matched only).
      mode: ``"paper"`` (mean over tasks of each task's mean metric) or ``"release"`` (mean of every
        accuracy / MCC / Pearson value).
    """
    if mode not in AVERAGE_MODES:
        raise ValueError(f"unknown average mode {mode!r}; accepted: {', '.join(AVERAGE_MODES)}")
    if not results:
        raise ValueError("no results to average")
    if mode == "paper":
        per_task = []
        for name, metrics in results.items():
            if not metrics:
                raise ValueError(f"evaluation set {name!r} has no metrics")
            per_task.append(float(np.mean(list(metrics.values()))))
        return float(np.mean(per_task))
    values = [v for metrics in results.values() for k, v in metrics.items() if k in _RELEASE_AVERAGED]
    if not values:
        raise ValueError(f"no {'/'.join(_RELEASE_AVERAGED)} values in {dict(results)}")
    return float(np.mean(values))
