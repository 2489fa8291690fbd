"""Synthetic smoke tasks through the same prompt / tokenize / batch / metric machinery as GLUE, plus the
tokenization edge cases (truncation counting, decoder-only answer boundaries)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from transformers import ByT5Tokenizer  # noqa: E402

from ept_jax.data import (  # noqa: E402
    SYNTHETIC_TASKS,
    Example,
    TrainBatches,
    encode_decoder_only,
    encode_seq2seq,
    eval_batches,
    get_task,
    load_synthetic_task,
    load_task,
    task_names,
)
from ept_jax.data.tasks.synthetic import NEGATIVE_WORDS, POSITIVE_WORDS, synthetic_rows  # noqa: E402
from ept_jax.eval import metrics  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return ByT5Tokenizer()


@pytest.fixture(scope="module")
def smoke():
    return [load_synthetic_task(t, seed=0) for t in SYNTHETIC_TASKS]


def test_registry_lists_families():
    assert task_names("synthetic") == sorted(SYNTHETIC_TASKS)
    assert set(task_names("glue")) == {"cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"}
    assert set(task_names()) >= set(task_names("commonsense")) | set(SYNTHETIC_TASKS)
    with pytest.raises(ValueError, match="unknown task 'syn_add'; accepted tasks: .*syn_copy"):
        get_task("syn_add")


def test_deterministic_distinct_and_sized(smoke):
    again = [load_synthetic_task(t, seed=0) for t in SYNTHETIC_TASKS]
    assert [d.train for d in smoke] == [d.train for d in again]
    assert load_synthetic_task("syn_copy", seed=1).train != smoke[0].train
    assert [len(d.train) for d in smoke] == [600, 400, 300, 800]
    for d in smoke:
        sources = [e.source for e in d.train + d.dev[d.task] + d.test[d.task]]
        assert len(sources) == len(set(sources)) == len(d.train) + 128
    assert synthetic_rows("syn_sort", 5, seed=3) == synthetic_rows("syn_sort", 5, seed=3)
    with pytest.raises(ValueError, match="input space is too small"):
        synthetic_rows("syn_sentiment", 5000, seed=0)
    with pytest.raises(ValueError, match="n_train must be positive"):
        load_synthetic_task("syn_copy", n_train=0)
    with pytest.raises(ValueError, match="takes no protocol"):
        load_task("syn_copy", protocol="reference")


def test_rules(smoke):
    by_task = {d.task: d.train for d in smoke}
    for e in by_task["syn_copy"]:
        assert e.source == f"copy: {e.target}"
    for e in by_task["syn_reverse"]:
        assert e.source.startswith("reverse: ")
        assert e.target.split() == e.source[len("reverse: ") :].split()[::-1]
    for e in by_task["syn_sort"]:
        assert e.target == "".join(sorted(e.source[len("sort: ") :]))
    labels = []
    for e in by_task["syn_sentiment"]:
        words = e.source[len("sentiment: ") :].split()
        positive = sum(w in POSITIVE_WORDS for w in words)
        assert positive + sum(w in NEGATIVE_WORDS for w in words) == 3
        assert e.target == ("positive" if positive >= 2 else "negative")
        labels.append(e.target)
    assert 0.3 < labels.count("positive") / len(labels) < 0.7


def test_end_to_end_seq2seq(smoke, tokenizer):
    encoded = [encode_seq2seq(d.train, tokenizer, max_source_length=32, max_target_length=16) for d in smoke]
    assert not any(e.stats.any for e in encoded)
    batches = TrainBatches(encoded, 16, strategy="release", seed=0, max_source_length=32, max_target_length=16)
    seen = set()
    for _ in range(20):
        b = next(batches)
        assert b["input_ids"].shape == (16, 32) and b["labels"].shape == (16, 16)
        task = int(b["task_ids"][0])
        seen.add(task)
        spec = get_task(SYNTHETIC_TASKS[task])
        for row in range(16):
            source = tokenizer.decode(b["input_ids"][row], skip_special_tokens=True)
            target = tokenizer.decode(b["labels"][row][b["label_mask"][row] == 1], skip_special_tokens=True)
            raw_input = source.split(": ", 1)[1]
            assert spec.format({spec.required_columns[0]: raw_input}) == Example(source, target, spec.name)
    assert len(seen) > 1

    test = smoke[1].test["syn_reverse"]
    enc = encode_seq2seq(test, tokenizer, max_source_length=32, max_target_length=16)
    evals = list(eval_batches(enc, 1, 10, max_length=32))
    assert [int(e.mask.sum()) for e in evals] == [10] * 6 + [4]
    last = evals[-1]
    np.testing.assert_array_equal(last.arrays["input_ids"][4:], np.repeat(last.arrays["input_ids"][3:4], 6, 0))
    refs = [r for e in evals for r in e.references]
    preds = [" ".join(r.split()[::-1]) for r in refs]  # copying instead of reversing
    expected = 100 * np.mean([p == r for p, r in zip(preds, refs, strict=True)])
    assert metrics.compute_task_metrics("syn_reverse", preds, refs) == {"accuracy": pytest.approx(expected)}
    assert metrics.compute_task_metrics("syn_reverse", refs, refs) == {"accuracy": 100.0}


def test_seq2seq_truncation_is_counted_and_keeps_eos(tokenizer):
    examples = [Example("copy: ka lo mi nu", "ka lo mi nu", "syn_copy"), Example("copy: ka", "ka", "syn_copy")]
    enc = encode_seq2seq(examples, tokenizer, max_source_length=8, max_target_length=4)
    assert enc.stats.as_dict() == {
        "examples": 2,
        "sources_truncated": 2,
        "train_prompts_truncated": 0,
        "targets_truncated": 1,
        "longest_source": len("copy: ka lo mi nu") + 1,
        "longest_target": len("ka lo mi nu") + 1,
    }
    assert tokenizer.decode(enc.inputs[0]) == "copy: k</s>"
    assert tokenizer.decode(enc.targets[0]) == "ka </s>" and tokenizer.decode(enc.targets[1]) == "ka</s>"
    with pytest.raises(ValueError, match="max_source_length must be an int >= 2"):
        encode_seq2seq(examples, tokenizer, max_source_length=1, max_target_length=4)
    with pytest.raises(ValueError, match="belong to"):
        encode_seq2seq(
            [*examples, Example("sort: ba", "ab", "syn_sort")], tokenizer, max_source_length=8, max_target_length=4
        )


class _WordTokenizer:
    """Whitespace word tokenizer with a growing vocabulary (ids from 3); eos 1, no pad / bos."""

    eos_token_id, pad_token_id, bos_token_id = 1, None, None

    def __init__(self):
        self.vocab = {}

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[self.vocab.setdefault(w, 3 + len(self.vocab)) for w in t.split()] for t in texts]}


def test_decoder_only_answer_boundary_and_truncation():
    tok = _WordTokenizer()
    examples = [Example("q one two three", "yes", "boolq"), Example("q four", "no", "boolq")]
    # separator "" makes "three" + "yes" one word: the boundary merges and the answer is re-encoded alone
    enc = encode_decoder_only(examples, tok, max_length=4, max_prompt_length=2, separator="")
    v = tok.vocab
    assert enc.pad_id == tok.eos_token_id  # no pad token: EOS pads
    np.testing.assert_array_equal(enc.targets[0], [v["yes"], 1])
    np.testing.assert_array_equal(enc.train_inputs[0], [v["two"], v["three"]])  # left-truncated to fit 4
    np.testing.assert_array_equal(enc.inputs[0], [v["two"], v["three"]])
    np.testing.assert_array_equal(enc.train_inputs[1], [v["q"], v["four"]])
    assert enc.stats.train_prompts_truncated == 1 and enc.stats.sources_truncated == 1
    with pytest.raises(ValueError, match="has no bos_token_id"):
        encode_decoder_only(examples, tok, max_length=4, max_prompt_length=2, add_bos=True)
    # an answer longer than the whole budget is cut and counted; one prompt token always stays
    long = encode_decoder_only([Example("q", "a b c d e", "syn_copy")], tok, max_length=4, max_prompt_length=2)
    assert long.stats.targets_truncated == 1
    assert len(long.train_inputs[0]) == 1 and len(long.targets[0]) == 3
