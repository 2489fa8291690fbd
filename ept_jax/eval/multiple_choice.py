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

Every choice is one row of one batched, jitted forward pass, with each row's adapter routed by its task id as
in training (``AdapterContext(task_ids=...)``), or merged weights run with adapters off.
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

from ept_jax.losses import token_nll
from ept_jax.nn import TRAINABLE, AdapterContext

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


def _rows_decoder(tokenizer, examples: Sequence[ChoiceExample], max_length: int):
    """Per choice: ``(input ids, target ids, first scored position, continuation length, example, choice)``."""
    rows = []
    for i, ex in enumerate(examples):
        for j, choice in enumerate(ex.choices):
            ctx, cont = encode_pair(tokenizer, ex.context, ex.delimiter + choice)
            if not cont:
                raise ValueError(f"choice {choice!r} of example {i} encodes to no token")
            if len(cont) > max_length:
                raise ValueError(f"choice {choice!r} of example {i} has {len(cont)} tokens, more than "
                                 f"max_length={max_length}")
            whole = (ctx + cont)[-(max_length + 1):]
            inputs, targets = whole[:-1], whole[1:]
            rows.append((inputs, targets, len(inputs) - len(cont), len(cont), i, j))
    return rows


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
    model = nnx.merge(graphdef, trainable, frozen)
    ctx = AdapterContext(task_ids=batch["task_ids"], deterministic=True, adapters_enabled=static.adapters)
    if static.family == "t5":
        logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], None, ctx)
    else:
        logits = model(batch["input_ids"], batch["attention_mask"], ctx)
    nll = token_nll(logits, batch["targets"]) * batch["target_mask"]
    return jnp.sum(nll, axis=-1)


@functools.lru_cache(maxsize=8)
def _jitted(graphdef):
    return jax.jit(lambda static, tr, fr, b: _forward_nll(graphdef, static, tr, fr, b), static_argnums=0)


def family_of_model(model) -> str:
    """``"t5"`` for ept_jax's T5 models, ``"llama"`` for the LLaMA family."""
    from ept_jax.models.t5 import T5Model

    return "t5" if isinstance(model, T5Model) else "llama"


def score(model, tokenizer, examples: Sequence[ChoiceExample], *, batch_size: int = 32, max_length: int = 512,
          max_target_length: int = 32, frozen: nnx.State | None = None, adapters: bool = True) -> ChoiceScores:
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
    Returns:
      :class:`ChoiceScores`.
    """
    family = family_of_model(model)
    if family == "t5":
        rows = _rows_seq2seq(tokenizer, examples, max_length, max_target_length)
        width = max_target_length
    else:
        rows = _rows_decoder(tokenizer, examples, max_length)
        width = max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    graphdef, trainable, model_frozen = nnx.split(model, TRAINABLE, ...)
    frozen = model_frozen if frozen is None else frozen
    fn = _jitted(graphdef)
    static = _Static(family, bool(adapters))
    sums = np.zeros(len(rows))
    # rows sorted by length and each batch padded to a multiple of 32 tokens: far less padding than max_length
    # (one compiled program per width)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][0])) if family != "t5" else list(range(len(rows)))
    for start in range(0, len(rows), batch_size):
        idx = order[start:start + batch_size]
        chunk = [rows[r] for r in idx]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n)  # static batch shape
        if family != "t5":
            width = min(max_length, -(-max(len(r[0]) for r in chunk) // 32) * 32)
        b = {k: np.full((batch_size, width), pad, np.int32) for k in ("input_ids", "targets")}
        b["attention_mask"] = np.zeros((batch_size, width), np.int32)
        b["target_mask"] = np.zeros((batch_size, width), np.float32)
        b["task_ids"] = np.asarray([examples[r[4]].task_id for r in chunk], np.int32)
        if family == "t5":
            b["input_ids"] = np.full((batch_size, max_length), pad, np.int32)
            b["attention_mask"] = np.zeros((batch_size, max_length), np.int32)
            b["decoder_input_ids"] = np.full((batch_size, width), pad, np.int32)
        for k, (inp, tgt, first, n_cont, _, _) in enumerate(chunk):
            b["input_ids"][k, :len(inp)] = inp
            b["attention_mask"][k, :len(inp)] = 1
            if family == "t5":
                b["decoder_input_ids"][k, 1:len(tgt)] = tgt[:-1]  # decoder_start_token_id = pad (T5)
                b["targets"][k, :len(tgt)] = tgt
                b["target_mask"][k, :len(tgt)] = 1
            else:
                b["targets"][k, :len(tgt)] = tgt
                b["target_mask"][k, first:first + n_cont] = 1
        nll = np.asarray(fn(static, trainable, frozen, {k: jnp.asarray(v) for k, v in b.items()}))
        sums[idx] = -nll[:n]
    loglik: list[list[float]] = [[] for _ in examples]
    ntok: list[list[int]] = [[] for _ in examples]
    for (_, _, _, n_cont, i, _), s in zip(rows, sums, strict=True):
        loglik[i].append(s)
        ntok[i].append(n_cont)
    ll = [np.asarray(v) for v in loglik]
    nt = [np.asarray(v) for v in ntok]
    decided = [decide(v, ex) for v, ex in zip(ll, examples, strict=True)]
    acc = np.asarray([d[0] for d in decided], bool)
    acc_norm = np.asarray([d[1] for d in decided], bool)
    gold_nll = np.asarray([-v[ex.gold] / t[ex.gold] for v, t, ex in zip(ll, nt, examples, strict=True)])
    return ChoiceScores(ll, nt, acc, acc_norm, gold_nll)
