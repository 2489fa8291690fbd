"""Task sampling: probabilities of the three strategies, determinism, per-task epochs, exact resumption."""

import json
import re

import numpy as np
import pytest

from ept_jax.data import Example, TrainBatches, encode_seq2seq
from ept_jax.data.sampling import MultiTaskSampler, task_probabilities

SIZES = [120, 30, 7, 300]


def test_release_probabilities_are_softmax_of_size_fractions():
    p = task_probabilities(SIZES, "release")
    # the release's formula verbatim (data/multi_task_sample.py, MultiTaskDataLoader)
    frac = np.array(SIZES) / sum(SIZES)
    expected = np.exp(frac) / np.sum(np.exp(frac))
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    assert p.max() / p.min() <= np.e
    np.testing.assert_allclose(task_probabilities(SIZES, "uniform"), np.full(4, 0.25))
    np.testing.assert_allclose(task_probabilities(SIZES, "mixed"), np.array(SIZES) / sum(SIZES))


@pytest.mark.parametrize(
    "sizes, strategy, match",
    [
        (SIZES, "proportional", "accepted: release, uniform, mixed"),
        ([10, 0], "release", "positive integers"),
        ([], "uniform", "non-empty"),
        ([2.5, 3], "mixed", "positive integers"),
    ],
)
def test_probability_errors(sizes, strategy, match):
    with pytest.raises(ValueError, match=match):
        task_probabilities(sizes, strategy)


def _batches(sampler, n):
    return [next(sampler) for _ in range(n)]


@pytest.mark.parametrize("strategy", ["release", "uniform"])
def test_one_task_per_batch_with_expected_frequencies(strategy):
    sampler = MultiTaskSampler(SIZES, 4, strategy=strategy, seed=11)
    n = 3000
    tasks = []
    for batch in _batches(sampler, n):
        assert len(batch) == 4
        assert len({t for t, _ in batch}) == 1
        tasks.append(batch[0][0])
    freq = np.bincount(tasks, minlength=4) / n
    p = task_probabilities(SIZES, strategy)
    sigma = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) < 5 * sigma), (freq, p)


def test_mixed_batches_draw_examples_proportionally():
    sampler = MultiTaskSampler(SIZES, 16, strategy="mixed", seed=5)
    batches = _batches(sampler, 400)
    tasks = np.array([t for b in batches for t, _ in b])
    assert any(len({t for t, _ in b}) > 1 for b in batches)
    freq = np.bincount(tasks, minlength=4) / tasks.size
    p = np.array(SIZES) / sum(SIZES)
    sigma = np.sqrt(p * (1 - p) / tasks.size)
    assert np.all(np.abs(freq - p) < 5 * sigma), (freq, p)


@pytest.mark.parametrize("strategy", ["release", "uniform", "mixed"])
def test_deterministic_in_seed(strategy):
    a = _batches(MultiTaskSampler(SIZES, 5, strategy=strategy, seed=3), 40)
    b = _batches(MultiTaskSampler(SIZES, 5, strategy=strategy, seed=3), 40)
    c = _batches(MultiTaskSampler(SIZES, 5, strategy=strategy, seed=4), 40)
    assert a == b
    assert a != c


def test_per_task_shuffled_epochs_and_full_batches():
    # one task of 7 examples, batches of 3: every epoch is a permutation, batches roll into the next epoch
    sampler = MultiTaskSampler([7], 3, strategy="uniform", seed=0)
    stream = [i for b in _batches(sampler, 14) for _, i in b]  # 42 indices = 6 epochs
    epochs = [stream[k : k + 7] for k in range(0, 42, 7)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(7))
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled per epoch
    assert sampler.epochs == [6] and sampler.cursors == [0]


@pytest.mark.parametrize("strategy", ["release", "uniform", "mixed"])
def test_resume_continues_exactly(strategy):
    reference = MultiTaskSampler(SIZES, 6, strategy=strategy, seed=21)
    expected = _batches(reference, 90)

    interrupted = MultiTaskSampler(SIZES, 6, strategy=strategy, seed=21)
    head = _batches(interrupted, 37)
    state = json.loads(json.dumps(interrupted.state_dict()))  # must survive a JSON round trip
    restored = MultiTaskSampler(SIZES, 6, strategy=strategy, seed=21)
    restored.load_state_dict(state)
    assert head + _batches(restored, 53) == expected


def test_state_mismatch_errors():
    sampler = MultiTaskSampler(SIZES, 6, strategy="release", seed=1)
    next(sampler)
    state = sampler.state_dict()
    with pytest.raises(ValueError, match="task_sizes"):
        MultiTaskSampler([120, 30, 7, 301], 6, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="strategy"):
        MultiTaskSampler(SIZES, 6, strategy="mixed", seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="not a MultiTaskSampler state"):
        sampler.load_state_dict({"step": 3})
    bad = dict(state, cursors=[0, 0, 7, 0])
    with pytest.raises(ValueError, match="out of range"):
        sampler.load_state_dict(bad)
    with pytest.raises(ValueError, match="batch_size"):
        MultiTaskSampler(SIZES, 0)


class _CharTokenizer:
    """Minimal tokenizer: one id per character (offset 3), pad 0, eos 1."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, None

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[3 + (ord(c) % 97) for c in t] for t in texts]}


def test_train_batches_resume_gives_identical_arrays():
    tok = _CharTokenizer()
    tasks = [
        encode_seq2seq(
            [Example(f"t{k} {i}", str(i % 3), f"task{k}") for i in range(n)],
            tok,
            max_source_length=12,
            max_target_length=4,
        )
        for k, n in enumerate([9, 4, 13])
    ]
    kwargs = dict(strategy="mixed", seed=2, max_source_length=12, max_target_length=4)
    full = TrainBatches(tasks, 5, **kwargs)
    expected = [next(full) for _ in range(12)]
    part = TrainBatches(tasks, 5, **kwargs)
    for _ in range(5):
        next(part)
    resumed = TrainBatches(tasks, 5, **kwargs)
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    for want in expected[5:]:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


class _CountingTokenizer(_CharTokenizer):
    """Records every text it tokenises (what a process materialised)."""

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, texts, add_special_tokens=False):
        self.seen.extend(texts)
        return super().__call__(texts, add_special_tokens)


@pytest.mark.parametrize("kind", ["seq2seq", "decoder"])
def test_each_process_tokenises_only_its_rows_and_together_they_make_the_global_batches(kind):
    """Two "processes" (rows 0-3 and 4-7 of every global batch of 8) with lazily encoded tasks: each tokenises
    exactly the examples of its own rows (the other's are never encoded, never passed to its tokenizer), their local
    batches stacked are the batches of one process encoding everything up front, and a resume from a saved state
    continues every process's stream (the state is the sampler's, the same on both)."""
    from ept_jax.data import DECODER, SEQ2SEQ, LazyEncodedTask, encode_decoder_only, pad_id_of

    examples = [[Example(f"t{k} q{i}", f"a{i % 3}", f"task{k}") for i in range(n)] for k, n in enumerate([40, 28, 52])]
    if kind == "seq2seq":
        lengths = dict(max_source_length=12, max_target_length=4)

        def encoder(tok):
            return lambda ex, log=True: encode_seq2seq(ex, tok, **lengths, log=log)
        enc_kind = SEQ2SEQ
    else:
        lengths = dict(max_length=14)

        def encoder(tok):
            return lambda ex, log=True: encode_decoder_only(ex, tok, max_length=14, max_prompt_length=10, log=log)
        enc_kind = DECODER
    kw = dict(strategy="release", seed=3, **lengths)
    eager_encode = encoder(_CharTokenizer())
    everything = TrainBatches([eager_encode(ex) for ex in examples], 8, **kw)
    want = [next(everything) for _ in range(6)]

    procs = []
    for rows in ([0, 1, 2, 3], [4, 5, 6, 7]):
        tok = _CountingTokenizer()
        lazy = [LazyEncodedTask(ex[0].task, ex, encoder(tok), kind=enc_kind, pad_id=pad_id_of(tok, enc_kind))
                for ex in examples]
        procs.append((rows, tok, lazy, TrainBatches(lazy, 8, rows=rows, **kw)))
    got = [[next(b) for _ in range(6)] for *_, b in procs]
    for s in range(6):
        for key in want[s]:
            np.testing.assert_array_equal(np.concatenate([got[0][s][key], got[1][s][key]]), want[s][key])

    # what each process encoded: exactly the examples of its own rows, as the sampler (integers only) draws them
    sampler = MultiTaskSampler([len(ex) for ex in examples], 8, strategy="release", seed=3)
    draws = [next(sampler) for _ in range(6)]
    for rows, tok, lazy, _ in procs:
        mine = {(t, i) for d in draws for r in rows for t, i in [d[r]]}
        encoded = {(t, i) for t, task in enumerate(lazy) for i in task.encoded_indices}
        assert encoded == mine
        # every text its tokenizer saw (sources, targets, prompt + answer) names one of its own examples
        named = {(int(m[1]), int(m[2])) for text in tok.seen for m in [re.match(r"t(\d) q(\d+)", text)] if m}
        assert named == mine
    other = {(t, i) for d in draws for r in procs[1][0] for t, i in [d[r]]} - \
        {(t, i) for d in draws for r in procs[0][0] for t, i in [d[r]]}
    assert other, "the two processes' rows overlap entirely: the test shows nothing"

    # resume: both processes restored from process 0's saved state continue with the global batches
    state = json.loads(json.dumps(procs[0][3].state_dict()))
    assert state == procs[1][3].state_dict()
    more = [next(everything) for _ in range(3)]
    for rows, _tok, lazy, _ in procs:
        resumed = TrainBatches(lazy, 8, rows=rows, **kw)
        resumed.load_state_dict(state)
        for s in range(3):
            batch = next(resumed)
            for key in batch:
                np.testing.assert_array_equal(batch[key], more[s][key][rows])


def test_rows_must_be_increasing_and_inside_the_batch():
    tasks = [encode_seq2seq([Example("a", "b", "t")], _CharTokenizer(), max_source_length=4, max_target_length=4)]
    for rows in ([], [1, 0], [0, 8], [-1, 2], [2, 2]):
        with pytest.raises(ValueError, match=r"rows=.*increasing row indices in \[0, batch_size=8\)"):
            TrainBatches(tasks, 8, max_source_length=4, max_target_length=4, rows=rows)
