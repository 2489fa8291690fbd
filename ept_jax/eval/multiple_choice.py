"""Log-likelihood multiple-choice scoring, the protocol of lm-evaluation-harness (0.4.x).

For each example and each choice, the log-probability of the choice's continuation given the context, summed
over the continuation's tokens. ``acc`` is the argmax of the sums, ``acc_norm`` the argmax of the sums divided by
the choice's length in characters (``lm_eval/api/task.py``, ``process_results`` of ``multiple_choice``: the
lengths of the choice strings, without the delimiter).

Tokenisation as lm-eval's ``_encode_pair``: trailing spaces of the context move to the front of the continuation,
then ``whole = enc(context + continuation)``, ``ctx = enc(context)``, ``cont = whole[len(ctx):]``, so a merge of
tokens across the boundary is scored as the model would read the whole string. No special tokens are added.

Decoder-only models (LLaMA family): a row is ``(ctx + cont)[:-1]``, left-truncated to ``max_length`` (lm-eval:
``(ctx + cont)[-(max_length + 1):][:-1]``), right padded; the continuation's tokens are scored at the positions
that predict them. Seq2seq models (T5): rank classification, the context is the encoder input (with EOS), the
choice's tokens plus EOS the decoder targets.

Batched, jitted forward passes, each row's adapter routed by its task id as in training
(``AdapterContext(task_ids=...)``), or merged weights run with adapters off. Decoder-only: the choices of an
example share one row (the context once, each continuation in a segment that sees only the context and itself,
:func:`rows_decoder`), and the vocabulary projection runs only at the positions that predict a scored token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ept_jax.core.losses import token_nll
from ept_jax.core.params import TRAINABLE, AdapterContext

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ChoiceExample:
    """One multiple-choice question.

    Attributes:
      context: the prompt (lm-eval's ``doc_to_text``).
      choices: the answer texts (``doc_to_choice``); ``acc_norm`` divides by their lengths in characters.
      gold: index of the right choice.
      task_id: the task row the adapters route with.
      delimiter: put between context and choice (lm-eval's ``target_delimiter``, a space); decoder-only only.
    """

    context: str
    choices: tuple[str, ...]
    gold: int
    task_id: int = 0
    delimiter: str = " "

    def __post_init__(self):
        if not self.choices:
            raise ValueError(f"a multiple-choice example needs choices; got none for context {self.context[:60]!r}")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold={self.gold} is not an index of the {len(self.choices)} choices {self.choices}")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` as lm-eval's ``_encode_pair`` (see the module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return whole[: len(ctx)], whole[len(ctx):]


@dataclasses.dataclass
class ChoiceScores:
    """Scores of a list of :class:`ChoiceExample`.

    Attributes:
      loglik: per example, the summed log-probability of each choice (a list of arrays of that example's
        number of choices).
      n_tokens: per example, each choice's continuation length in tokens.
      acc / acc_norm: ``(n,)`` bool, whether the argmax (of the sum; of the sum over the choice's character
        length) is the gold choice.
      gold_nll: ``(n,)`` the gold continuation's mean token negative log-likelihood (the held-out answer loss).
    """

    loglik: list[np.ndarray]
    n_tokens: list[np.ndarray]
    acc: np.ndarray
    acc_norm: np.ndarray
    gold_nll: np.ndarray

    def summary(self) -> dict[str, Any]:
        """``acc``, ``acc_norm`` (percent, with 95 % Wilson intervals ``*_ci``), ``answer_nll`` and ``n``."""
        out: dict[str, Any] = {"n": int(len(self.acc))}
        for name in ("acc", "acc_norm"):
            k = int(np.sum(getattr(self, name)))
            lo, hi = wilson_interval(k, len(self.acc))
            out[name] = 100.0 * k / max(1, len(self.acc))
            out[f"{name}_ci"] = [100.0 * lo, 100.0 * hi]
        out["answer_nll"] = float(np.mean(self.gold_nll)) if len(self.gold_nll) else float("nan")
        return out


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % by default), as fractions in [0, 1]."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def decide(loglik: np.ndarray, example: ChoiceExample) -> tuple[bool, bool]:
    """``(acc, acc_norm)`` of one example: is the argmax of ``loglik`` (of ``loglik`` divided by each choice's
    length in characters) the gold choice? Ties go to the first choice, as ``np.argmax``."""
    lengths = np.asarray([float(max(1, len(c))) for c in example.choices])
    return int(np.argmax(loglik)) == example.gold, int(np.argmax(loglik / lengths)) == example.gold


@dataclasses.dataclass
class _Row:
    """One row of a decoder-only batch: its tokens, positions, segments (0 = shared prefix, c > 0 = choice
    ``c - 1`` of a packed example) and the scored tokens ``(slot predicting it, token id, example, choice)``."""

    inputs: list[int]
    positions: list[int]
    segments: list[int]
    scored: list[tuple[int, int, int, int]]


def rows_decoder(tokenizer, examples: Sequence[ChoiceExample], max_length: int, pack: bool = True):
    """The rows of every choice, and each choice's continuation length in tokens (``{(example, choice): n}``).

    An example whose choices share their context tokens (the usual case) is one packed row when it fits in
    ``max_length``: the context once, then each choice's continuation in a segment of its own that sees only the
    context and itself, at the positions it has after the context (so each choice is scored exactly as in a row
    of its own); a one-token continuation adds no token at all (it is read at the context's last position).
    Otherwise each choice is a row ``(ctx + cont)[-(max_length + 1):][:-1]`` as lm-eval builds it.
    """
    rows: list[_Row] = []
    lengths: dict[tuple[int, int], int] = {}
    for i, ex in enumerate(examples):
        pairs = []
        for j, choice in enumerate(ex.choices):
            ctx, cont = encode_pair(tokenizer, ex.context, ex.delimiter + choice)
            if not ctx:
                raise ValueError(f"example {i}: context {ex.context!r} encodes to no token; the continuation would "
                                 "have nothing to be predicted from (give a non-empty context)")
            if not cont:
                raise ValueError(f"choice {choice!r} of example {i} encodes to no token")
            if len(cont) > max_length:
                raise ValueError(f"choice {choice!r} of example {i} has {len(cont)} tokens, more than "
                                 f"max_length={max_length}")
            pairs.append((ctx, cont))
            lengths[(i, j)] = len(cont)
        ctx0 = pairs[0][0]
        packed_len = len(ctx0) + sum(len(c) - 1 for _, c in pairs)
        if pack and all(c == ctx0 for c, _ in pairs) and packed_len <= max_length:
            row = _Row(list(ctx0), list(range(len(ctx0))), [0] * len(ctx0), [])
            for j, (_, cont) in enumerate(pairs):
                start = len(row.inputs)
                row.inputs += cont[:-1]
                row.positions += list(range(len(ctx0), len(ctx0) + len(cont) - 1))
                row.segments += [j + 1] * (len(cont) - 1)
                row.scored += [(len(ctx0) - 1 if k == 0 else start + k - 1, tok, i, j) for k, tok in enumerate(cont)]
            rows.append(row)
            continue
        for j, (ctx, cont) in enumerate(pairs):
            whole = (ctx + cont)[-(max_length + 1):]
            inputs = whole[:-1]
            first = len(inputs) - len(cont)
            rows.append(_Row(inputs, list(range(len(inputs))), [0] * len(inputs),
                             [(first + k, tok, i, j) for k, tok in enumerate(cont)]))
    return rows, lengths


def _rows_seq2seq(tokenizer, examples: Sequence[ChoiceExample], max_length: int, max_target: int):
    eos = tokenizer.eos_token_id
    rows = []
    for i, ex in enumerate(examples):
        src = _encode(tokenizer, ex.context)[: max_length - 1] + [eos]
        for j, choice in enumerate(ex.choices):
            tgt = (_encode(tokenizer, choice) + [eos])[:max_target]
            rows.append((src, tgt, 0, len(tgt), i, j))
    return rows


@dataclasses.dataclass(frozen=True)
class _Static:
    family: str
    adapters: bool


def _forward_nll(graphdef, static: _Static, trainable, frozen, batch):
    """Seq2seq: ``(B,)`` summed NLL of each row's decoder targets."""
    model = nnx.merge(graphdef, trainable, frozen)
    ctx = AdapterContext(task_ids=batch["task_ids"], deterministic=True, adapters_enabled=static.adapters)
    logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], None, ctx)
    nll = token_nll(logits, batch["targets"]) * batch["target_mask"]
    return jnp.sum(nll, axis=-1)


def _forward_logprob(graphdef, static: _Static, trainable, frozen, batch):
    """Decoder-only: ``(B, K)`` log-probabilities of the scored tokens at their slots."""
    model = nnx.merge(graphdef, trainable, frozen)
    ctx = AdapterContext(task_ids=batch["task_ids"], deterministic=True, adapters_enabled=static.adapters)
    logits = model(batch["input_ids"], batch["attention_mask"], ctx, batch["positions"],
                   segment_ids=batch["segments"], logit_positions=batch["slots"])
    return -token_nll(logits, batch["tokens"])


@functools.lru_cache(maxsize=8)
def _jitted(graphdef, decoder: bool = False):
    fn = _forward_logprob if decoder else _forward_nll
    return jax.jit(lambda static, tr, fr, b: fn(graphdef, static, tr, fr, b), static_argnums=0)


def family_of_model(model) -> str:
    """``"t5"`` for ept_jax's T5 models, ``"llama"`` for the LLaMA family."""
    from ept_jax.models.t5 import T5Model

    return "t5" if isinstance(model, T5Model) else "llama"


def score(model, tokenizer, examples: Sequence[ChoiceExample], *, batch_size: int = 32, max_length: int = 512,
          max_target_length: int = 32, frozen: nnx.State | None = None, adapters: bool = True,
          pack: bool = True) -> ChoiceScores:
    """Scores every choice of ``examples`` with ``model`` (see the module docstring).

    Args:
      model: an ept_jax T5 or LLaMA model, with or without adapters.
      tokenizer: a Hugging Face tokenizer (``tokenizer(text, add_special_tokens=False)``).
      batch_size: rows (choices) per forward pass; the last batch is padded to it, so one shape compiles.
      max_length: decoder-only: tokens per row (context truncated from the left); seq2seq: encoder length.
      max_target_length: seq2seq: decoder length.
      frozen: base weights to use instead of the model's (e.g. ``train.steps.merged_frozen``'s, one task
        merged in); run them with ``adapters=False``.
      adapters: False runs the base weights alone (every adapted Linear as its base Linear).
      pack: decoder-only: an example's choices share one row when they share its context (:func:`rows_decoder`;
        the same scores, up to float rounding, for fewer tokens); False = one row per choice.
    Returns:
      :class:`ChoiceScores`.
    """
    family = family_of_model(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    graphdef, trainable, model_frozen = nnx.split(model, TRAINABLE, ...)
    frozen = model_frozen if frozen is None else frozen
    static = _Static(family, bool(adapters))
    if family == "t5":
        sums, lengths = _score_seq2seq(graphdef, static, trainable, frozen, tokenizer, examples, batch_size,
                                       max_length, max_target_length, pad)
    else:
        sums, lengths = _score_decoder(graphdef, static, trainable, frozen, tokenizer, examples, batch_size,
                                       max_length, pad, pack)
    ll = [np.asarray([sums[(i, j)] for j in range(len(ex.choices))]) for i, ex in enumerate(examples)]
    nt = [np.asarray([lengths[(i, j)] for j in range(len(ex.choices))]) for i, ex in enumerate(examples)]
    decided = [decide(v, ex) for v, ex in zip(ll, examples, strict=True)]
    acc = np.asarray([d[0] for d in decided], bool)
    acc_norm = np.asarray([d[1] for d in decided], bool)
    gold_nll = np.asarray([-v[ex.gold] / t[ex.gold] for v, t, ex in zip(ll, nt, examples, strict=True)])
    return ChoiceScores(ll, nt, acc, acc_norm, gold_nll)


def _bucket(n: int, smallest: int) -> int:
    """The smallest size >= ``n`` and >= ``smallest`` of the form ``2^i`` or ``3 * 2^i`` (at most 1.5x the
    previous one: few compiled shapes, at most a third of a row's tokens wasted on padding)."""
    size = max(smallest, 1 << max(0, int(n) - 1).bit_length())
    three = 3 * size // 4
    return three if three >= max(n, smallest) else size


def _score_decoder(graphdef, static, trainable, frozen, tokenizer, examples, batch_size, max_length, pad, pack):
    rows, lengths = rows_decoder(tokenizer, examples, max_length, pack)
    fn = _jitted(graphdef, True)
    sums = dict.fromkeys(lengths, 0.0)
    # rows sorted by length, each batch padded to a bucket size (2^i or 3 * 2^i) >= 32 tokens and >= 8 scored
    # slots: few shapes, hence few compilations (one per shape), and far less padding than max_length
    order = sorted(range(len(rows)), key=lambda r: (len(rows[r].inputs), len(rows[r].scored)))
    for start in range(0, len(rows), batch_size):
        chunk = [rows[r] for r in order[start:start + batch_size]]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n)  # static batch shape
        width = min(max_length, _bucket(max(len(r.inputs) for r in chunk), 32))
        k_max = _bucket(max(len(r.scored) for r in chunk), 8)
        b = {k: np.zeros((batch_size, width), np.int32) for k in ("input_ids", "attention_mask", "positions",
                                                                     "segments")}
        b["input_ids"][:] = pad
        b["slots"] = np.zeros((batch_size, k_max), np.int32)
        b["tokens"] = np.zeros((batch_size, k_max), np.int32)
        b["task_ids"] = np.asarray([examples[r.scored[0][2]].task_id for r in chunk], np.int32)
        for k, r in enumerate(chunk):
            m = len(r.inputs)
            b["input_ids"][k, :m] = r.inputs
            b["attention_mask"][k, :m] = 1
            b["positions"][k, :m] = r.positions
            b["segments"][k, :m] = r.segments
            b["slots"][k, :len(r.scored)] = [s[0] for s in r.scored]
            b["tokens"][k, :len(r.scored)] = [s[1] for s in r.scored]
        logprob = np.asarray(fn(static, trainable, frozen, {k: jnp.asarray(v) for k, v in b.items()}))
        for k, r in enumerate(chunk[:n]):
            for slot, (_, _, i, j) in enumerate(r.scored):
                sums[(i, j)] += float(logprob[k, slot])
    return sums, lengths


def _score_seq2seq(graphdef, static, trainable, frozen, tokenizer, examples, batch_size, max_length,
                   max_target_length, pad):
    rows = _rows_seq2seq(tokenizer, examples, max_length, max_target_length)
    width = max_target_length
    fn = _jitted(graphdef)
    sums: dict[tuple[int, int], float] = {}
    lengths = {(r[4], r[5]): r[3] for r in rows}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n)  # static batch shape
        b = {k: np.full((batch_size, width), pad, np.int32) for k in ("targets", "decoder_input_ids")}
        b["target_mask"] = np.zeros((batch_size, width), np.float32)
        b["task_ids"] = np.asarray([examples[r[4]].task_id for r in chunk], np.int32)
        b["input_ids"] = np.full((batch_size, max_length), pad, np.int32)
        b["attention_mask"] = np.zeros((batch_size, max_length), np.int32)
        for k, (inp, tgt, _, _, _, _) in enumerate(chunk):
            b["input_ids"][k, :len(inp)] = inp
            b["attention_mask"][k, :len(inp)] = 1
            b["decoder_input_ids"][k, 1:len(tgt)] = tgt[:-1]  # decoder_start_token_id = pad (T5)
            b["targets"][k, :len(tgt)] = tgt
            b["target_mask"][k, :len(tgt)] = 1
        nll = np.asarray(fn(static, trainable, frozen, {k: jnp.asarray(v) for k, v in b.items()}))
        for (_, _, _, _, i, j), v in zip(chunk[:n], nll[:n], strict=True):
            sums[(i, j)] = -float(v)
    return sums, lengths
