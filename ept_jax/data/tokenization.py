"""Tokenizing examples once, truncated to the static lengths of the jitted steps, with truncation counted.

Two layouts:

* seq2seq (T5): ``source`` ids + EOS and ``target`` ids + EOS. A source longer than ``max_source_length`` keeps
  its first ``max_source_length - 1`` tokens and the EOS (what Hugging Face truncation does); targets alike.
* decoder-only (LLaMA): ``prompt = [BOS] + ids(source)`` and ``answer = ids(source + separator + target)``
  minus the prompt's ids, + EOS (so the answer tokens are exactly those the model would produce after the
  prompt; if the tokenizer merges across the boundary, ``ids(separator + target)`` is used instead). A
  training sequence ``prompt + answer`` longer than ``max_length`` loses prompt tokens from the LEFT, after
  the BOS (the question sits at the end of every prompt); an answer that alone does not fit keeps its first
  ``max_length - 1`` tokens. Evaluation prompts are left-truncated the same way to ``max_prompt_length``.

Every truncation is counted in :class:`TruncationStats` and logged; nothing is cut silently.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ept_jax.data.spec import Example

logger = logging.getLogger(__name__)

SEQ2SEQ = "seq2seq"
DECODER = "decoder"


@dataclasses.dataclass
class TruncationStats:
    """Truncation counts of one encoded task.

    Attributes:
      examples: number of examples encoded.
      sources_truncated: seq2seq sources / decoder evaluation prompts cut to the static length.
      train_prompts_truncated: decoder-only training prompts cut so prompt + answer fit (0 for seq2seq).
      targets_truncated: targets / answers cut.
      longest_source, longest_target: longest source / target in tokens before truncation (incl. specials).
    """

    examples: int = 0
    sources_truncated: int = 0
    train_prompts_truncated: int = 0
    targets_truncated: int = 0
    longest_source: int = 0
    longest_target: int = 0

    @property
    def any(self) -> bool:
        return bool(self.sources_truncated or self.train_prompts_truncated or self.targets_truncated)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class EncodedTask:
    """Token ids of one task's examples (int32, unpadded, already truncated).

    Attributes:
      task: task name of the examples.
      kind: ``"seq2seq"`` or ``"decoder"``.
      inputs: per example, the evaluation input: seq2seq source ids (with EOS), or decoder prompt ids (with
        BOS) truncated to ``max_prompt_length``.
      targets: per example, the target ids (seq2seq, with EOS) or answer ids (decoder, with EOS).
      train_inputs: decoder only: the prompt ids truncated so ``train_inputs[i] + targets[i]`` fits
        ``max_length``; for seq2seq the same list as ``inputs``.
      references: the target texts (what metrics compare against).
      pad_id: padding token id.
      stats: truncation counts.
    """

    task: str
    kind: str
    inputs: list[np.ndarray]
    targets: list[np.ndarray]
    train_inputs: list[np.ndarray]
    references: list[str]
    pad_id: int
    stats: TruncationStats

    def __len__(self) -> int:
        return len(self.inputs)


def _ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return list(tokenizer(list(texts), add_special_tokens=False)["input_ids"])


def _single_task(examples: Sequence[Example]) -> str:
    if not examples:
        raise ValueError("cannot encode an empty list of examples")
    tasks = {e.task for e in examples}
    if len(tasks) != 1:
        raise ValueError(f"an EncodedTask holds one task; the examples belong to {sorted(tasks)}")
    return tasks.pop()


def _special(tokenizer: Any, name: str) -> int:
    value = getattr(tokenizer, name, None)
    if value is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no {name}; it is needed here")
    return int(value)


def _check_length(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _log(stats: TruncationStats, task: str, limits: str) -> None:
    if stats.any:
        logger.warning("task %s: truncated to %s: %s", task, limits, stats.as_dict())


def pad_id_of(tokenizer: Any, kind: str) -> int:
    """The padding id of the encoder of ``kind``: seq2seq the tokenizer's pad id; decoder-only its pad id, or the
    EOS when it has none."""
    if kind == SEQ2SEQ:
        return _special(tokenizer, "pad_token_id")
    if kind == DECODER:
        pad = getattr(tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else _special(tokenizer, "eos_token_id")
    raise ValueError(f"kind={kind!r}; accepted {SEQ2SEQ!r}, {DECODER!r}")


def encode_seq2seq(
    examples: Sequence[Example], tokenizer: Any, *, max_source_length: int, max_target_length: int, log: bool = True
) -> EncodedTask:
    """Encodes one task's examples for an encoder-decoder model (see the module docstring).

    Args:
      examples: examples of a single task.
      tokenizer: a Hugging Face tokenizer with ``eos_token_id`` and ``pad_token_id``.
      max_source_length: static encoder length ``Ls`` (>= 2).
      max_target_length: static decoder length ``Lt`` (>= 2).
      log: warn about truncated examples (False: the caller reports ``stats`` itself).
    """
    _check_length("max_source_length", max_source_length, 2)
    _check_length("max_target_length", max_target_length, 2)
    task = _single_task(examples)
    eos, pad = _special(tokenizer, "eos_token_id"), pad_id_of(tokenizer, SEQ2SEQ)
    stats = TruncationStats(examples=len(examples))

    def fit(ids: list[int], limit: int) -> tuple[np.ndarray, bool]:
        ids = ids + [eos]
        if len(ids) <= limit:
            return np.asarray(ids, np.int32), False
        return np.asarray(ids[: limit - 1] + [eos], np.int32), True

    sources, targets = [], []
    source_ids = _ids(tokenizer, [e.source for e in examples])
    target_ids = _ids(tokenizer, [e.target for e in examples])
    for src, tgt in zip(source_ids, target_ids, strict=True):
        stats.longest_source = max(stats.longest_source, len(src) + 1)
        stats.longest_target = max(stats.longest_target, len(tgt) + 1)
        s, cut_s = fit(src, max_source_length)
        t, cut_t = fit(tgt, max_target_length)
        stats.sources_truncated += cut_s
        stats.targets_truncated += cut_t
        sources.append(s)
        targets.append(t)
    if log:
        _log(stats, task, f"source {max_source_length}, target {max_target_length} tokens")
    return EncodedTask(task, SEQ2SEQ, sources, targets, sources, [e.target for e in examples], pad, stats)


def encode_decoder_only(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int,
    add_bos: bool | None = None,
    separator: str = " ",
    log: bool = True,
) -> EncodedTask:
    """Encodes one task's examples for a decoder-only model (see the module docstring).

    Args:
      examples: examples of a single task.
      tokenizer: a Hugging Face tokenizer with ``eos_token_id`` (``pad_token_id`` falls back to EOS).
      max_length: static training length ``L`` (prompt + answer + EOS), >= 2.
      max_prompt_length: static evaluation prompt length, >= 1.
      add_bos: prepend ``bos_token_id`` to prompts; default: when the tokenizer has one.
      separator: text between prompt and answer.
      log: warn about truncated examples (False: the caller reports ``stats`` itself).
    """
    _check_length("max_length", max_length, 2)
    _check_length("max_prompt_length", max_prompt_length, 1)
    task = _single_task(examples)
    eos = _special(tokenizer, "eos_token_id")
    pad = pad_id_of(tokenizer, DECODER)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if add_bos is None:
        add_bos = bos_id is not None
    elif add_bos and bos_id is None:
        raise ValueError(f"add_bos=True but tokenizer {type(tokenizer).__name__} has no bos_token_id")
    head = [int(bos_id)] if add_bos else []
    stats = TruncationStats(examples=len(examples))

    def left_truncate(prompt: list[int], limit: int) -> tuple[list[int], bool]:
        if len(head) + len(prompt) <= limit:
            return head + prompt, False
        keep = max(limit - len(head), 0)
        return (head + prompt[len(prompt) - keep :] if keep else head[:limit]), True

    prompts = _ids(tokenizer, [e.source for e in examples])
    fulls = _ids(tokenizer, [e.source + separator + e.target for e in examples])
    inputs, train_inputs, answers = [], [], []
    for example, prompt, full in zip(examples, prompts, fulls, strict=True):
        if full[: len(prompt)] == prompt and len(full) > len(prompt):
            answer = full[len(prompt) :]
        else:  # the tokenizer merged tokens across the prompt/answer boundary
            answer = _ids(tokenizer, [separator + example.target])[0]
        answer = answer + [eos]
        stats.longest_source = max(stats.longest_source, len(head) + len(prompt))
        stats.longest_target = max(stats.longest_target, len(answer))
        if len(answer) > max_length - 1:
            answer = answer[: max_length - 1]
            stats.targets_truncated += 1
        if not head and not prompt:
            raise ValueError(f"task {task}: empty prompt {example.source!r} and no BOS: the answer has no context")
        train_prompt, cut_train = left_truncate(prompt, max_length - len(answer))
        eval_prompt, cut_eval = left_truncate(prompt, max_prompt_length)
        stats.train_prompts_truncated += cut_train
        stats.sources_truncated += cut_eval
        inputs.append(np.asarray(eval_prompt, np.int32))
        train_inputs.append(np.asarray(train_prompt, np.int32))
        answers.append(np.asarray(answer, np.int32))
    if log:
        _log(stats, task, f"length {max_length}, prompt {max_prompt_length} tokens")
    return EncodedTask(task, DECODER, inputs, answers, train_inputs, [e.target for e in examples], int(pad), stats)
