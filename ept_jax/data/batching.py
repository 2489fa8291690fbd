"""Static-shape numpy batches for training and evaluation (the batch format of :mod:`ept_jax.data`).

Every array has the configured static length, whatever the examples' lengths, so a jitted step compiles once
per shape. All arrays are int32, except T-REX's optional ``semantic (B, K)`` float32 vectors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ept_jax.data.sampling import MultiTaskSampler
from ept_jax.data.tokenization import DECODER, SEQ2SEQ, EncodedTask

Batch = dict[str, np.ndarray]


def _pad_rows(
    rows: Sequence[np.ndarray], length: int, pad_id: int, *, left: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` of shape ``(B, length)``: rows padded with ``pad_id`` (on the left if ``left``)."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for b, row in enumerate(rows):
        n = len(row)
        if n > length:
            raise ValueError(f"row of {n} tokens does not fit the static length {length}; re-encode with it")
        if left:
            ids[b, length - n :], mask[b, length - n :] = row, 1
        else:
            ids[b, :n], mask[b, :n] = row, 1
    return ids, mask


def _check_kind(tasks: Sequence[EncodedTask], kind: str) -> None:
    wrong = [t.task for t in tasks if t.kind != kind]
    if wrong:
        raise ValueError(f"tasks {wrong} were not encoded as {kind!r}")


def collate_seq2seq(
    tasks: Sequence[EncodedTask],
    items: Sequence[tuple[int, int]],
    *,
    max_source_length: int,
    max_target_length: int,
    decoder_start_token_id: int = 0,
) -> Batch:
    """A seq2seq training batch from ``(task_id, example_index)`` pairs.

    Returns ``input_ids``/``attention_mask`` ``(B, Ls)``, ``decoder_input_ids``/``labels``/``label_mask``
    ``(B, Lt)`` and ``task_ids (B,)``: ``labels`` are the target ids right padded with the pad id,
    ``label_mask`` is 1 on target tokens (EOS included), ``decoder_input_ids`` are ``labels`` shifted right
    behind ``decoder_start_token_id`` (T5: the pad id 0).
    """
    _check_kind(tasks, SEQ2SEQ)
    pad = tasks[0].pad_id
    input_ids, attention_mask = _pad_rows([tasks[t].inputs[i] for t, i in items], max_source_length, pad)
    labels, label_mask = _pad_rows([tasks[t].targets[i] for t, i in items], max_target_length, pad)
    decoder_input_ids = np.full_like(labels, pad)
    decoder_input_ids[:, 0] = decoder_start_token_id
    decoder_input_ids[:, 1:] = labels[:, :-1]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
        "label_mask": label_mask,
        "task_ids": np.asarray([t for t, _ in items], np.int32),
    }


def collate_decoder_only(tasks: Sequence[EncodedTask], items: Sequence[tuple[int, int]], *, max_length: int) -> Batch:
    """A decoder-only training batch from ``(task_id, example_index)`` pairs.

    Returns ``input_ids``/``attention_mask``/``labels``/``label_mask`` ``(B, L)`` and ``task_ids (B,)``:
    ``input_ids`` = prompt + answer + EOS, right padded; ``labels[:, t] = input_ids[:, t + 1]`` (the last
    column is padding); ``label_mask[:, t]`` is 1 exactly when ``labels[:, t]`` is an answer token or the EOS.
    """
    _check_kind(tasks, DECODER)
    pad = tasks[0].pad_id
    rows, answer_spans = [], []
    for t, i in items:
        prompt, answer = tasks[t].train_inputs[i], tasks[t].targets[i]
        rows.append(np.concatenate([prompt, answer]))
        answer_spans.append((len(prompt), len(prompt) + len(answer)))
    input_ids, attention_mask = _pad_rows(rows, max_length, pad)
    labels = np.full_like(input_ids, pad)
    labels[:, :-1] = input_ids[:, 1:]
    label_mask = np.zeros_like(input_ids)
    for b, (start, stop) in enumerate(answer_spans):
        label_mask[b, start - 1 : stop - 1] = 1  # position t predicts token t + 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "label_mask": label_mask,
        "task_ids": np.asarray([t for t, _ in items], np.int32),
    }


IGNORE_INDEX = -100  # transformers' label for "no loss here"


def from_hf_batch(batch: dict[str, np.ndarray], *, family: str, pad_id: int = 0) -> Batch:
    """A training batch in transformers' conventions as an ept_jax batch (the release's collator writes these).

    Args:
      batch: ``input_ids``, ``attention_mask``, ``labels`` (``-100`` = no loss) and ``task_ids (B,)``; seq2seq
        also ``decoder_input_ids`` (taken as given). Decoder-only ``labels`` are aligned with ``input_ids``
        (transformers shifts them inside the loss).
      family: ``"t5"`` (seq2seq: no shift) or ``"llama"`` (decoder-only).
      pad_id: the id written where a label is ignored (any valid id: ``label_mask`` is 0 there).
    Returns:
      the batch format of :mod:`ept_jax.data` (int32): ``labels`` / ``label_mask``; decoder-only also
      ``positions = arange(L)``, what transformers' forward uses without ``position_ids``, so a batch whose
      attention mask has holes (the release's LLaMA batches: prompt padding, then the label) keeps its positions.
    Raises:
      ValueError: a missing array or an unknown family.
    """
    need = ["input_ids", "attention_mask", "labels", "task_ids"] + (["decoder_input_ids"] if family == "t5" else [])
    missing = [k for k in need if k not in batch]
    if missing:
        raise ValueError(f"from_hf_batch: the batch lacks {missing}; it has {sorted(batch)}")
    if family not in ("t5", "llama"):
        raise ValueError(f"from_hf_batch: family={family!r}; accepted 't5', 'llama'")
    labels = np.asarray(batch["labels"])
    out = {k: np.asarray(batch[k]).astype(np.int32) for k in ("input_ids", "attention_mask", "task_ids")}
    if family == "t5":
        out["decoder_input_ids"] = np.asarray(batch["decoder_input_ids"]).astype(np.int32)
    else:
        labels = np.concatenate([labels[:, 1:], np.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)], 1)
        out["positions"] = np.broadcast_to(np.arange(labels.shape[1], dtype=np.int32), labels.shape).copy()
    keep = labels != IGNORE_INDEX
    out["labels"] = np.where(keep, labels, pad_id).astype(np.int32)
    out["label_mask"] = keep.astype(np.int32)
    return out


def _check_semantic(semantic: np.ndarray | None, n: int, task: str) -> np.ndarray | None:
    """``semantic`` as float32 ``(n, K)``, or None; a row count other than the task's ``n`` examples raises."""
    if semantic is None:
        return None
    semantic = np.asarray(semantic, np.float32)
    if semantic.ndim != 2 or semantic.shape[0] != n:
        raise ValueError(f"task {task!r}: semantic vectors of shape {semantic.shape}; expected ({n}, K), one a row")
    return semantic


@dataclasses.dataclass
class EvalBatch:
    """One evaluation batch.

    Attributes:
      arrays: ``input_ids``/``attention_mask`` ``(B, Ls)`` (left padded for decoder-only, right for
        seq2seq) and ``task_ids (B,)``.
      references: the reference target texts of the real rows (``mask.sum()`` of them, in row order).
      mask: ``(B,)`` bool, False on rows that only pad the last batch to the static batch size (they repeat
        the batch's last real example so the model sees ordinary inputs; leave them out of metrics).
      task: task name of the rows.
    """

    arrays: Batch
    references: list[str]
    mask: np.ndarray
    task: str


def eval_batches(encoded: EncodedTask, task_id: int, batch_size: int, *, max_length: int,
                 semantic: np.ndarray | None = None) -> Iterator[EvalBatch]:
    """The evaluation batches of one task, in example order, each exactly ``batch_size`` rows.

    Args:
      encoded: the task's encoded examples.
      task_id: the task's index (its adapter routing id).
      batch_size: static batch size ``B``.
      max_length: static prompt length ``Ls`` (seq2seq: the max source length; decoder-only: the max prompt
        length).
      semantic: optional ``(N, K)`` per-example vectors (T-REX, :mod:`ept_jax.data.semantic`); the batches then
        carry ``arrays["semantic"] (B, K)`` float32.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    semantic = _check_semantic(semantic, len(encoded), encoded.task)
    left = encoded.kind == DECODER
    n = len(encoded)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        real = list(range(start, stop))
        rows = real + [stop - 1] * (batch_size - len(real))
        ids, mask = _pad_rows([encoded.inputs[i] for i in rows], max_length, encoded.pad_id, left=left)
        valid = np.zeros((batch_size,), bool)
        valid[: len(real)] = True
        arrays = {"input_ids": ids, "attention_mask": mask, "task_ids": np.full((batch_size,), task_id, np.int32)}
        if semantic is not None:
            arrays["semantic"] = semantic[rows]
        yield EvalBatch(
            arrays=arrays,
            references=[encoded.references[i] for i in real],
            mask=valid,
            task=encoded.task,
        )


class TrainBatches:
    """Endless, resumable training batches: a :class:`MultiTaskSampler` feeding a collate function.

    The sampler draws the global batch (``batch_size`` ``(task, example)`` pairs: integers only, the same on every
    process); with ``rows``, only those rows of it are collated (a process's share of a batch sharded over
    processes), and tasks given as :class:`~ept_jax.data.lazy.LazyEncodedTask` encode only the examples of those
    rows. The state (:meth:`state_dict`) is the sampler's, the same on every process.

    Args:
      tasks: the training data of each task (:class:`EncodedTask` or ``LazyEncodedTask``); task id = position.
      batch_size: static (global) batch size.
      strategy, seed: passed to :class:`MultiTaskSampler`.
      max_source_length, max_target_length: seq2seq static lengths.
      max_length: decoder-only static length.
      decoder_start_token_id: seq2seq decoder start id (T5: 0).
      semantic: optional, per task, ``(n_i, K)`` per-example vectors (T-REX, :mod:`ept_jax.data.semantic`); the
        batches then also carry ``semantic (B, K)`` float32.
      rows: the rows of every global batch to collate, increasing, in ``[0, batch_size)``; None: all.
    """

    def __init__(
        self,
        tasks: Sequence[EncodedTask],
        batch_size: int,
        *,
        strategy: str = "release",
        seed: int = 0,
        max_source_length: int | None = None,
        max_target_length: int | None = None,
        max_length: int | None = None,
        decoder_start_token_id: int = 0,
        semantic: Sequence[np.ndarray] | None = None,
        rows: Sequence[int] | None = None,
    ):
        if not tasks:
            raise ValueError("TrainBatches needs at least one task")
        if rows is not None:
            rows = [int(r) for r in rows]
            if not rows or rows != sorted(set(rows)) or rows[0] < 0 or rows[-1] >= batch_size:
                raise ValueError(f"rows={rows}: must be increasing row indices in [0, batch_size={batch_size})")
        self.rows = rows
        kinds = {t.kind for t in tasks}
        if len(kinds) != 1:
            raise ValueError(f"tasks mix encodings {sorted(kinds)}; encode them all for one model kind")
        self.kind = kinds.pop()
        self.tasks = list(tasks)
        if self.kind == SEQ2SEQ:
            if max_source_length is None or max_target_length is None:
                raise ValueError("seq2seq batches need max_source_length and max_target_length")
            self._collate = lambda items: collate_seq2seq(
                self.tasks,
                items,
                max_source_length=max_source_length,
                max_target_length=max_target_length,
                decoder_start_token_id=decoder_start_token_id,
            )
        else:
            if max_length is None:
                raise ValueError("decoder-only batches need max_length")
            self._collate = lambda items: collate_decoder_only(self.tasks, items, max_length=max_length)
        self.sampler = MultiTaskSampler([len(t) for t in tasks], batch_size, strategy=strategy, seed=seed)
        if semantic is not None and len(semantic) != len(self.tasks):
            raise ValueError(f"{len(semantic)} arrays of semantic vectors for {len(self.tasks)} tasks")
        self.semantic = None if semantic is None else [
            _check_semantic(s, len(t), t.task) for s, t in zip(semantic, self.tasks, strict=True)
        ]

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> Batch:
        items = next(self.sampler)
        if self.rows is not None:
            items = [items[r] for r in self.rows]
        for t in sorted({t for t, _ in items}):
            ensure = getattr(self.tasks[t], "ensure", None)  # LazyEncodedTask: encode this batch's examples at once
            if ensure is not None:
                ensure([i for u, i in items if u == t])
        batch = self._collate(items)
        if self.semantic is not None:
            batch["semantic"] = np.stack([self.semantic[t][i] for t, i in items])
        return batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position (the sampler's state)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
