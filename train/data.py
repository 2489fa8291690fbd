"""From ``config.data`` to encoded tasks: resumable training batches and the evaluation sets.

Task ``i`` of ``data.tasks`` has task id ``i`` (its row of every task embedding). Each task's examples are split
by the evaluation protocol into ``train``, ``dev`` (model selection during training) and ``test`` (the final
report) sets, tokenized once to the static lengths of the config.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from ept_jax.data import (
    DECODER,
    SEQ2SEQ,
    EncodedTask,
    LazyEncodedTask,
    TaskData,
    TrainBatches,
    encode_decoder_only,
    encode_seq2seq,
    load_task,
    pad_id_of,
)
from train.errors import UserError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalSet:
    """One evaluation set: ``name`` (e.g. ``"mnli_mm"``), the ``task`` it scores, its ``task_id`` and examples.

    ``semantic``: T-REX only, ``(N, r1 * r2)`` float32 ``centroids @ emb(source)`` per example (else None).
    """

    name: str
    task: str
    task_id: int
    encoded: EncodedTask
    semantic: np.ndarray | None = None


@dataclasses.dataclass
class Data:
    """The encoded data of a run: training batches and the dev / test evaluation sets."""

    batches: TrainBatches
    dev: list[EvalSet]
    test: list[EvalSet]
    train_sizes: dict[str, int]


def load_tasks(config) -> list[TaskData]:
    """Every task of ``data.tasks`` under the configured protocol and source."""
    out = []
    source = str(config.data.source)
    for name in config.data.tasks:
        if source == "synthetic":
            td = load_task(name, seed=int(config.train.seed), max_train_examples=config.data.max_train_examples)
        else:
            td = load_task(name, protocol=str(config.data.eval_protocol), source=config.data.path,
                           seed=config.data.split_seed, max_train_examples=config.data.max_train_examples,
                           prompt_format=str(config.data.get("prompt_format", "letters")))
        if not td.train:
            raise UserError(f"task {name!r} has no training examples under protocol {config.data.eval_protocol!r}")
        out.append(td)
    return out


def _encoder(config, tokenizer):
    """``(encode(examples, log=True) -> EncodedTask, kind)`` at the config's static lengths."""
    if str(config.model.family) == "t5":
        return lambda examples, log=True: encode_seq2seq(
            examples, tokenizer, max_source_length=int(config.data.max_source_length),
            max_target_length=int(config.data.max_target_length), log=log,
        ), SEQ2SEQ
    length = int(config.data.max_source_length) + int(config.data.max_target_length)
    return lambda examples, log=True: encode_decoder_only(
        examples, tokenizer, max_length=length, max_prompt_length=int(config.data.max_source_length), log=log,
    ), DECODER


def _semantic_index(config, tasks: list[TaskData], workdir):
    """T-REX's :class:`~ept_jax.data.semantic.SemanticIndex` (centroids over the training sources), or None."""
    if str(config.adapter.kind) != "trex":
        return None
    from ept_jax.data.semantic import DEFAULT_EMBEDDER, SemanticIndex

    cache = config.data.get("semantic_cache_dir")
    if cache is None:
        if workdir is None:
            raise UserError("adapter.kind='trex' needs data.semantic_cache_dir (or a workdir) to cache its embeddings")
        cache = Path(workdir) / "semantic"
    return SemanticIndex.fit([[e.source for e in td.train] for td in tasks], task_names=[td.task for td in tasks],
                             n_clusters=int(config.adapter.trex_r1) * int(config.adapter.trex_r2),
                             seed=int(config.train.seed), cache_dir=cache,
                             embedder_name=str(config.adapter.get("trex_embedder", DEFAULT_EMBEDDER)))


def build_data(config, tokenizer, decoder_start_token_id: int, *, workdir=None, rows=None) -> Data:
    """Loads, encodes and batches the tasks of ``config`` (see the module docstring).

    Training examples are tokenised when a batch first needs them, and only those of ``rows`` (this process's
    rows of every global batch; None: all): in a multi-process job each process encodes only its own rows
    (:class:`~ept_jax.data.lazy.LazyEncodedTask`). The evaluation sets are encoded at once, on every process.

    ``adapter.kind="trex"``: every batch also carries ``semantic (B, r1 * r2)`` (see :mod:`ept_jax.data.semantic`),
    cached in ``data.semantic_cache_dir`` (None: ``<workdir>/semantic``); its centroids are fitted on every training
    source, on every process.
    """
    tasks = load_tasks(config)
    index = _semantic_index(config, tasks, workdir)
    encode, kind = _encoder(config, tokenizer)
    encoded_train = [LazyEncodedTask(td.task, td.train, encode, kind=kind, pad_id=pad_id_of(tokenizer, kind))
                     for td in tasks]
    limit = config.eval.max_examples

    def sets(kind: str) -> list[EvalSet]:
        out = []
        for task_id, td in enumerate(tasks):
            for name, examples in getattr(td, kind).items():
                if limit is not None:
                    examples = examples[: int(limit)]
                if not examples:
                    raise UserError(f"task {td.task!r}: evaluation set {name!r} ({kind}) is empty")
                sem = None if index is None else index.vectors([e.source for e in examples])
                out.append(EvalSet(name, td.task, task_id, encode(examples), semantic=sem))
        return out

    family = str(config.model.family)
    lengths = (
        dict(max_source_length=int(config.data.max_source_length), max_target_length=int(config.data.max_target_length),
             decoder_start_token_id=int(decoder_start_token_id))
        if family == "t5"
        else dict(max_length=int(config.data.max_source_length) + int(config.data.max_target_length))
    )
    batches = TrainBatches(encoded_train, int(config.train.batch_size), strategy=str(config.data.sampling),
                           seed=int(config.train.seed), rows=rows, **lengths,
                           semantic=None if index is None else [index.vectors([e.source for e in td.train])
                                                                for td in tasks])
    sizes = {td.task: len(td.train) for td in tasks}
    logger.info("training examples per task: %s", sizes)
    return Data(batches=batches, dev=sets("dev"), test=sets("test"), train_sizes=sizes)
