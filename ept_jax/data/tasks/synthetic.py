"""A small synthetic multi-task text-to-text dataset for smoke runs (no downloads, deterministic from a seed).

Four tasks with learnable rules and different sizes, each generated as a ``datasets.Dataset`` of raw columns
and formatted by its registered :class:`~ept_jax.data.tasks.TaskSpec` exactly like GLUE rows:

* ``syn_copy``: ``"copy: ka lo mi"`` -> ``"ka lo mi"`` (2-3 words of a 12-word vocabulary).
* ``syn_reverse``: ``"reverse: ka lo mi"`` -> ``"mi lo ka"`` (word order reversed).
* ``syn_sort``: ``"sort: dbca"`` -> ``"abcd"`` (3-4 letters of ``a``-``f``, sorted).
* ``syn_sentiment``: ``"sentiment: blorf vop zint"`` -> ``positive`` / ``negative``: the majority polarity
  of three invented words from a fixed 16-word lexicon.

Sequences are short (sources <= 29 bytes, targets <= 9, EOS included, under ``ByT5Tokenizer``, so
``max_source_length=32`` / ``max_target_length=12`` truncate nothing). Measured with a random 2+2-layer
T5 (d_model 128) trained in full on 2 CPU cores, exact-match accuracy rises from 0 within a few hundred
steps (sentiment and sort first; copy / reverse first get the words right, then their order). Train, dev
and test rows are distinct.
"""

from __future__ import annotations

import numpy as np

from ept_jax.data.loading import check_dataset, format_dataset
from ept_jax.data.spec import Example, TaskData, TaskSpec, get_task, label_word_parser, parse_exact

SYNTHETIC_TASKS = ("syn_copy", "syn_reverse", "syn_sort", "syn_sentiment")
# Different sizes on purpose: the task samplers' probabilities depend on them.
DEFAULT_TRAIN_SIZES = {"syn_copy": 600, "syn_reverse": 400, "syn_sort": 300, "syn_sentiment": 800}

WORDS = ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti", "vo", "za", "bi", "de")
LETTERS = "abcdef"
POSITIVE_WORDS = ("blorf", "zint", "quap", "mivo", "telu", "garn", "wupa", "lisk")
NEGATIVE_WORDS = ("snerk", "vop", "drax", "kulm", "frib", "yosh", "grop", "nakt")


def _sentiment(words: str) -> str:
    positives = sum(w in POSITIVE_WORDS for w in words.split())
    negatives = sum(w in NEGATIVE_WORDS for w in words.split())
    if positives + negatives != len(words.split()):
        unknown = [w for w in words.split() if w not in POSITIVE_WORDS + NEGATIVE_WORDS]
        raise ValueError(f"syn_sentiment: words {unknown} are not in the lexicon")
    return "positive" if positives > negatives else "negative"


_RULES = {
    "syn_copy": ("copy", "words", lambda s: s),
    "syn_reverse": ("reverse", "words", lambda s: " ".join(reversed(s.split()))),
    "syn_sort": ("sort", "letters", lambda s: "".join(sorted(s))),
    "syn_sentiment": ("sentiment", "words", _sentiment),
}


def _formatter(task: str):
    prefix, column, rule = _RULES[task]

    def format_row(row) -> Example:
        text = str(row[column])
        return Example(source=f"{prefix}: {text}", target=rule(text), task=task)

    return format_row


def task_specs() -> list[TaskSpec]:
    """The family's task specs (registered by :mod:`ept_jax.data.tasks`)."""
    specs = []
    for task in SYNTHETIC_TASKS:
        words = ("negative", "positive") if task == "syn_sentiment" else None
        specs.append(
            TaskSpec(
                name=task,
                family="synthetic",
                required_columns=(_RULES[task][1],),
                format_row=_formatter(task),
                label_words=words,
                metric_names=("accuracy",),
                headline_metric="accuracy",
                parse=label_word_parser(words) if words else parse_exact,
            )
        )
    return specs


def _draw(task: str, rng: np.random.Generator) -> str:
    if task in ("syn_copy", "syn_reverse"):
        return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(2, 4))))
    if task == "syn_sort":
        return "".join(LETTERS[i] for i in rng.integers(0, len(LETTERS), size=int(rng.integers(3, 5))))
    lexicon = POSITIVE_WORDS + NEGATIVE_WORDS
    return " ".join(lexicon[i] for i in rng.integers(0, len(lexicon), size=3))


def input_space_size(task: str) -> int:
    """Number of distinct raw inputs ``task`` can generate."""
    if task in ("syn_copy", "syn_reverse"):
        return sum(len(WORDS) ** k for k in range(2, 4))
    if task == "syn_sort":
        return sum(len(LETTERS) ** k for k in range(3, 5))
    return (len(POSITIVE_WORDS) + len(NEGATIVE_WORDS)) ** 3


def synthetic_rows(task: str, n: int, seed: int) -> list[str]:
    """``n`` distinct raw inputs of ``task`` (the ``words`` / ``letters`` column), deterministic in ``seed``."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; accepted: {', '.join(SYNTHETIC_TASKS)}")
    if n < 0:
        raise ValueError(f"number of rows must be non-negative, got {n}")
    if n > 3 * input_space_size(task) // 4:
        # rejection sampling slows down near the space size; 3/4 of it is far more than smoke runs need
        raise ValueError(
            f"{task}: cannot draw {n} distinct rows; its input space is too small ({input_space_size(task)})"
        )
    rng = np.random.default_rng([int(seed), SYNTHETIC_TASKS.index(task)])
    rows: dict[str, None] = {}  # insertion ordered set
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:  # unreachable below half the space; a guard against an endless loop
            raise RuntimeError(f"{task}: drew {attempts} rows without finding {n} distinct ones")
        rows.setdefault(_draw(task, rng), None)
    return list(rows)


def synthetic_dataset(task: str, n: int, seed: int):
    """A ``datasets.Dataset`` with the raw column of ``task`` (``n`` distinct rows)."""
    import datasets

    return datasets.Dataset.from_dict({_RULES[task][1]: synthetic_rows(task, n, seed)})


def load_synthetic_task(
    task: str, *, seed: int = 0, n_train: int | None = None, n_dev: int = 64, n_test: int = 64
) -> TaskData:
    """One synthetic task's train / dev / test examples (distinct rows), deterministic in ``seed``.

    Args:
      task: one of :data:`SYNTHETIC_TASKS`.
      seed: generation seed.
      n_train: training rows; default :data:`DEFAULT_TRAIN_SIZES`.
      n_dev, n_test: rows of the model-selection and report sets (named after the task).
    """
    spec = get_task(task)
    if spec.family != "synthetic":
        raise ValueError(f"{task!r} is not a synthetic task; accepted: {', '.join(SYNTHETIC_TASKS)}")
    n_train = DEFAULT_TRAIN_SIZES[task] if n_train is None else n_train
    for name, value in (("n_train", n_train), ("n_dev", n_dev), ("n_test", n_test)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    ds = synthetic_dataset(task, n_train + n_dev + n_test, seed)
    check_dataset(ds, spec, "generated", "synthetic")
    examples = format_dataset(spec, ds)
    return TaskData(
        task=task,
        train=examples[:n_train],
        dev={task: examples[n_train : n_train + n_dev]},
        test={task: examples[n_train + n_dev :]},
    )
