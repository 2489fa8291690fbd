"""GLUE as text-to-text: the EPT release's prompts and label words, loading, and the evaluation protocols.

Prompts and label words are those of the EPT release, ``data/process_data.py`` (``prompt_templates`` and
``label_map``; github.com/Yan-Zhenwei/EPT), which wrote the ``*_with_prompt`` datasets its trainer reads.
They are hyperformer / compacter's ``"<task> <field>: ..."`` inputs with label words as targets, e.g.
``"mnli hypothesis: {hypothesis} premise: {premise}"`` -> ``entailment`` / ``neutral`` / ``contradiction``.
STS-B targets are the score rounded to the nearest 0.2 written with one decimal
(``"{:.1f}".format(round(score * 5) / 5)``; Python's ``round`` rounds halves to even).
"""

from __future__ import annotations

import logging

from ept_jax.data import splits as splits_lib
from ept_jax.data.loading import check_dataset, format_dataset, load_split
from ept_jax.data.spec import (
    Example,
    TaskData,
    TaskSpec,
    get_task,
    label_word_parser,
    parse_score,
    )

logger = logging.getLogger(__name__)

GLUE_TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")
DEFAULT_GLUE_SOURCE = "nyu-mll/glue"

# EPT data/process_data.py, prompt_templates.
GLUE_TEMPLATES = {
    "cola": "cola sentence: {sentence}",
    "mnli": "mnli hypothesis: {hypothesis} premise: {premise}",
    "mrpc": "mrpc sentence1: {sentence1} sentence2: {sentence2}",
    "qnli": "qnli question: {question} sentence: {sentence}",
    "qqp": "qqp question1: {question1} question2: {question2}",
    "rte": "rte sentence1: {sentence1} sentence2: {sentence2}",
    "sst2": "sst2 sentence: {sentence}",
    "stsb": "stsb sentence1: {sentence1} sentence2: {sentence2}",
}
# EPT data/process_data.py, label_map: GLUE integer label i -> word i.
GLUE_LABEL_WORDS = {
    "cola": ("unacceptable", "acceptable"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qnli": ("entailment", "not_entailment"),
    "qqp": ("not_duplicate", "duplicate"),
    "rte": ("entailment", "not_entailment"),
    "sst2": ("negative", "positive"),
}
_TEXT_COLUMNS = {
    "cola": ("sentence",),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence",),
    "stsb": ("sentence1", "sentence2"),
}


def stsb_target(score: float) -> str:
    """STS-B score -> target text: rounded to the nearest 0.2, one decimal (``3.5`` -> ``"3.6"``)."""
    return f"{round(float(score) * 5) / 5:.1f}"


def _formatter(task: str):
    template = GLUE_TEMPLATES[task]
    columns = _TEXT_COLUMNS[task]
    words = GLUE_LABEL_WORDS.get(task)

    def format_row(row) -> Example:
        source = template.format(**{c: row[c] for c in columns})
        label = row["label"]
        if words is None:
            target = stsb_target(label)
        else:
            index = int(label)
            if not 0 <= index < len(words):
                raise ValueError(
                    f"task {task!r}: label {label!r} is not a class index in [0, {len(words)}) "
                    f"(GLUE test splits carry -1; they have no labels to train or score on)"
                )
            target = words[index]
        return Example(source=source, target=target, task=task)

    return format_row


def task_specs() -> list[TaskSpec]:
    """The family's task specs (registered by :mod:`ept_jax.data.tasks`)."""
    specs = []
    for task in GLUE_TASKS:
        words = GLUE_LABEL_WORDS.get(task)
        if task == "cola":
            metrics, headline = ("mcc",), "mcc"
        elif task == "stsb":
            metrics, headline = ("pearson", "spearman"), "pearson"
        elif task in ("mrpc", "qqp"):
            metrics, headline = ("f1", "accuracy"), "accuracy"
        else:
            metrics, headline = ("accuracy",), "accuracy"
        specs.append(
            TaskSpec(
                name=task,
                family="glue",
                required_columns=(*_TEXT_COLUMNS[task], "label"),
                format_row=_formatter(task),
                label_words=words,
                metric_names=metrics,
                headline_metric=headline,
                parse=parse_score if words is None else label_word_parser(words),
                positive_label=words[1] if task in ("mrpc", "qqp") else None,
            )
        )
    return specs


class _SplitCache:
    """Loads each split of one task at most once, checked and stripped of unlabeled (-1) rows."""

    def __init__(self, task: str, source: str):
        self.task, self.source, self.spec = task, source, get_task(task)
        self._splits: dict = {}

    def __call__(self, split: str):
        if split not in self._splits:
            ds = load_split(self.source, split, subdir=self.task, config=self.task, what=f"glue/{self.task}")
            check_dataset(ds, self.spec, split, self.source)
            labels = ds["label"]
            keep = [i for i, y in enumerate(labels) if float(y) != -1]
            if len(keep) < len(ds):
                # The release drops these too (process_data.py, remove_error_label).
                logger.warning("glue/%s %s: dropping %d unlabeled rows", self.task, split, len(ds) - len(keep))
                ds = ds.select(keep)
                if len(ds) == 0:
                    raise ValueError(f"task {self.task!r}: split {split!r} from {self.source!r} has no labeled rows")
            self._splits[split] = ds
        return self._splits[split]

    def size(self, split: str) -> int:
        return len(self(split))


def load_glue_split(task: str, split: str, source: str = DEFAULT_GLUE_SOURCE) -> list[Example]:
    """Every labeled row of one GLUE split as :class:`Example` (``split``: ``train``, ``validation``...)."""
    spec = get_task(task)
    if spec.family != "glue":
        raise ValueError(f"task {task!r} is not a GLUE task; GLUE tasks: {', '.join(GLUE_TASKS)}")
    return format_dataset(spec, _SplitCache(task, source)(split))


def load_glue_task(
    task: str,
    protocol: str = "reference",
    source: str = DEFAULT_GLUE_SOURCE,
    *,
    seed: int | None = None,
    max_train_examples: int | None = None,
) -> TaskData:
    """One GLUE task's train / dev / test examples under an evaluation protocol.

    Args:
      task: a GLUE task name.
      protocol: ``"reference"``, ``"standard"`` or ``"hyperformer"`` (see :mod:`ept_jax.data.splits`).
      source: a ``load_dataset`` id (default ``nyu-mll/glue``, configuration = task name) or a directory of
        ``save_to_disk`` output (``source/<task>/<split>``, ``source/<task>`` DatasetDict, ...).
      seed: permutation seed; default the protocol's (``reference``: 1189 as the release's evaluation).
      max_train_examples: keep only the first this many training rows (of the protocol's order), for quick
        runs; None keeps all.
    """
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; accepted: {', '.join(GLUE_TASKS)}")
    if max_train_examples is not None and max_train_examples <= 0:
        raise ValueError(f"max_train_examples must be positive or None, got {max_train_examples}")
    spec = get_task(task)
    cache = _SplitCache(task, source)
    plan = splits_lib.glue_split_plan(task, protocol, cache.size, seed)

    def materialise(selection: splits_lib.Selection, limit: int | None = None) -> list[Example]:
        ds = cache(selection.split)
        indices = selection.indices if selection.indices is not None else range(len(ds))
        if limit is not None:
            indices = list(indices)[:limit]
        if selection.indices is None and limit is None:
            return format_dataset(spec, ds)
        return format_dataset(spec, ds, indices)

    return TaskData(
        task=task,
        train=materialise(plan.train, max_train_examples),
        dev={name: materialise(sel) for name, sel in plan.dev.items()},
        test={name: materialise(sel) for name, sel in plan.test.items()},
    )
