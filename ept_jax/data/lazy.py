"""Training examples tokenised on first use: each process of a multi-process job encodes only its own rows.

:class:`LazyEncodedTask` stands where an :class:`~ept_jax.data.tokenization.EncodedTask` of training examples
stands (``task``, ``kind``, ``pad_id``, ``len()``, ``inputs[i]``, ``targets[i]``, ``train_inputs[i]``), but holds
the raw examples and encodes an example the first time a batch needs it (:meth:`LazyEncodedTask.ensure`, called by
:class:`~ept_jax.data.batching.TrainBatches` with the rows of each batch that this process collates). Encoding one
example alone gives the ids of encoding it among others (the encoders tokenise every text independently), so a
run's batches do not depend on which process encoded what. ``encoded_indices`` is the record of what was encoded.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from ept_jax.data.spec import Example
from ept_jax.data.tokenization import EncodedTask, TruncationStats

logger = logging.getLogger(__name__)

_FIELDS = ("inputs", "targets", "train_inputs")


class _Column:
    """``task.<field>[i]``: the example's ids, encoded on first access."""

    def __init__(self, task: LazyEncodedTask, position: int):
        self._task, self._position = task, position

    def __getitem__(self, i: int) -> np.ndarray:
        return self._task.row(int(i))[self._position]

    def __len__(self) -> int:
        return len(self._task)


class LazyEncodedTask:
    """One task's training examples, encoded on first use (see the module docstring).

    Args:
      task: the task's name.
      examples: its examples (all of one task).
      encode: ``encode(examples, log=False) -> EncodedTask`` (``encode_seq2seq`` / ``encode_decoder_only`` with
        the run's static lengths bound).
      kind: the encoding ``encode`` produces (``"seq2seq"`` / ``"decoder"``).
      pad_id: its padding id (:func:`~ept_jax.data.tokenization.pad_id_of`).
    """

    def __init__(self, task: str, examples: Sequence[Example], encode: Callable[..., EncodedTask], *, kind: str,
                 pad_id: int):
        if not examples:
            raise ValueError(f"task {task!r}: no examples to encode")
        self.task, self.kind, self.pad_id = task, kind, int(pad_id)
        self._examples = examples
        self._encode = encode
        self._rows: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.stats = TruncationStats()
        self._warned = False
        self.inputs, self.targets, self.train_inputs = (_Column(self, k) for k in range(len(_FIELDS)))

    def __len__(self) -> int:
        return len(self._examples)

    @property
    def encoded_indices(self) -> frozenset[int]:
        """The indices of the examples encoded so far."""
        return frozenset(self._rows)

    def ensure(self, indices: Iterable[int]) -> None:
        """Encodes, in one call, those of ``indices`` not encoded yet."""
        missing = sorted({int(i) for i in indices} - self._rows.keys())
        if not missing:
            return
        bad = [i for i in missing if not 0 <= i < len(self._examples)]
        if bad:
            raise IndexError(f"task {self.task!r}: example indices {bad[:5]} outside [0, {len(self._examples)})")
        enc = self._encode([self._examples[i] for i in missing], log=False)
        if enc.kind != self.kind or enc.pad_id != self.pad_id:
            raise ValueError(f"task {self.task!r}: the encoder gave kind {enc.kind!r} / pad {enc.pad_id}, "
                             f"declared {self.kind!r} / {self.pad_id}")
        for j, i in enumerate(missing):
            self._rows[i] = (enc.inputs[j], enc.targets[j], enc.train_inputs[j])
        self._count(enc.stats)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(inputs, targets, train_inputs)`` of example ``i``, encoding it if needed."""
        if i not in self._rows:
            self.ensure([i])
        return self._rows[i]

    def _count(self, new: TruncationStats) -> None:
        s = self.stats
        for f in dataclasses.fields(TruncationStats):
            old, add = getattr(s, f.name), getattr(new, f.name)
            setattr(s, f.name, max(old, add) if f.name.startswith("longest") else old + add)
        if new.any and not self._warned:  # once per task: the counts grow as the run meets more examples
            self._warned = True
            logger.warning("task %s: training examples are truncated to the static lengths (first met: %s; counted "
                           "in the encoded examples as they are met)", self.task, new.as_dict())
