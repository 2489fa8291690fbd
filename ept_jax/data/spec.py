"""The task registry: what every task looks like as text-to-text data and how its answers are scored.

A :class:`TaskSpec` says how a raw row (a ``datasets`` row, a dict) becomes an :class:`Example`
(``source`` prompt and ``target`` answer text), which columns the raw rows must have, the closed label
vocabulary (if any), the metrics, and how generated text is parsed back into a label. GLUE, the commonsense
tasks and the synthetic smoke tasks (:mod:`ept_jax.data.tasks`) all register here, so configs name tasks as
strings and every family goes
through the same tokenization, batching and metric code.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Trailing punctuation the release strips from decoded text before comparing it with a label word
# (EPT finetune.py, compute_metrics: ``s.strip().lower().rstrip(".!,?:;")``).
_TRAILING_PUNCT = ".!,?:;"


@dataclasses.dataclass(frozen=True)
class Example:
    """One text-to-text example.

    Attributes:
      source: the prompt (encoder input for T5, the prefix for decoder-only models).
      target: the answer text the model must generate (a label word, ``"%.1f"`` score, letter, ...).
      task: the registered task name the example belongs to (selects the parser and metrics).
    """

    source: str
    target: str
    task: str


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything the pipeline needs to know about one task.

    Attributes:
      name: registry key (``"mnli"``, ``"arc_e"``, ``"syn_copy"``...).
      family: ``"glue"``, ``"commonsense"`` or ``"synthetic"``.
      required_columns: columns a raw row must have for :attr:`format_row`.
      format_row: raw row (mapping column -> value) -> :class:`Example`.
      label_words: the closed answer vocabulary in class-index order (index ``i`` is GLUE label ``i``), or
        None for open answers (STS-B scores, synthetic strings).
      metric_names: metrics :func:`ept_jax.eval.metrics.compute_task_metrics` reports, e.g. ``("f1", "accuracy")``.
      headline_metric: the one metric the release's trainer averaged for this task.
      parse: generated text -> canonical answer: a label word, a float (regression) or a normalised string;
        None when the text cannot be parsed (counted wrong by the metrics).
      positive_label: for binary F1, the label word of the positive class.
    """

    name: str
    family: str
    required_columns: tuple[str, ...]
    format_row: Callable[[Mapping[str, Any]], Example]
    label_words: tuple[str, ...] | None
    metric_names: tuple[str, ...]
    headline_metric: str
    parse: Callable[[str], Any]
    positive_label: str | None = None

    def format(self, row: Mapping[str, Any]) -> Example:
        """Formats one raw row, raising a clear error when a required column is missing."""
        missing = [c for c in self.required_columns if c not in row]
        if missing:
            raise KeyError(
                f"task {self.name!r}: row is missing column(s) {missing}; it has {sorted(row)}; "
                f"required: {list(self.required_columns)}"
            )
        return self.format_row(row)


_REGISTRY: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, *, overwrite: bool = False) -> TaskSpec:
    """Adds ``spec`` to the registry (returns it). Re-registering a name needs ``overwrite=True``."""
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"task {spec.name!r} is already registered")
    if spec.headline_metric not in spec.metric_names:
        raise ValueError(
            f"task {spec.name!r}: headline_metric {spec.headline_metric!r} is not one of {spec.metric_names}"
        )
    _REGISTRY[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` registered as ``name``; an unknown name raises listing the accepted ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; accepted tasks: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def task_names(family: str | None = None) -> list[str]:
    """Registered task names (optionally only one ``family``), sorted."""
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


@dataclasses.dataclass
class TaskData:
    """The examples of one task under one evaluation protocol.

    Attributes:
      task: registered task name.
      train: training examples.
      dev: evaluation-set name -> examples used for model selection during training.
      test: evaluation-set name -> examples of the final report (e.g. ``{"mnli": ..., "mnli_mm": ...}``).
    """

    task: str
    train: list[Example]
    dev: dict[str, list[Example]]
    test: dict[str, list[Example]]


# --------------------------------------------------------------------------------------------- parsers


def normalize_text(text: str) -> str:
    """The release's normalisation of decoded text: strip, lower-case, strip trailing ``.!,?:;``."""
    return text.strip().lower().rstrip(_TRAILING_PUNCT)


def label_word_parser(label_words: Sequence[str]) -> Callable[[str], str | None]:
    """A parser that maps normalised text to one of ``label_words`` (exact match), else None."""
    lookup = {w.lower(): w for w in label_words}

    def parse(text: str) -> str | None:
        return lookup.get(normalize_text(text))

    return parse


def parse_score(text: str) -> float:
    """STS-B: the generated score as a float; unparsable text -> 0.0.

    This is the release's fallback (finetune.py: ``float(p) if p.replace('.', '', 1).isdigit() else 0.0``):
    only plain non-negative decimals such as ``"3.4"`` / ``"4"`` parse.
    """
    s = normalize_text(text)
    return float(s) if s.replace(".", "", 1).isdigit() else 0.0


_YES = {"yes", "y", "true", "t", "1"}
_NO = {"no", "n", "false", "f", "0"}


def parse_yes_no(text: str) -> str | None:
    """BoolQ: ``"yes"`` / ``"no"`` from the first word (the release's yes/no synonyms), else None."""
    words = normalize_text(text).split()
    if not words:
        return None
    first = words[0].rstrip(_TRAILING_PUNCT)
    if first in _YES:
        return "yes"
    if first in _NO:
        return "no"
    return None


def choice_letter_parser(letters: str) -> Callable[[str], str | None]:
    """Multiple choice: the answer letter (upper case) from generated text, else None.

    Accepted: a leading letter, optionally in parentheses and followed by punctuation or text (``"B"``,
    ``"(b)"``, ``"C. the moon"``); otherwise the first parenthesised letter anywhere (``"answer: (D)"``).
    The release instead took the first of a/b/c/d occurring anywhere in the lower-cased text, which maps
    e.g. "the answer is B" to "A"; we do not reproduce that.
    """
    letters = letters.upper()
    lead = re.compile(rf"^\(?([{letters}{letters.lower()}])\)?(?=$|[\s.,:;)!?])")
    anywhere = re.compile(rf"\(([{letters}{letters.lower()}])\)")

    def parse(text: str) -> str | None:
        s = text.strip()
        m = lead.match(s) or anywhere.search(s)
        return m.group(1).upper() if m else None

    return parse


def parse_exact(text: str) -> str:
    """Open string answers (synthetic tasks): strip and collapse runs of whitespace."""
    return " ".join(text.split())
