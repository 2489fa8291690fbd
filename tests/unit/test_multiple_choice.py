"""Log-likelihood multiple-choice scoring (ept_jax.eval.multiple_choice) against direct forward passes."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from ept_jax.checkpoints import load  # noqa: E402
from ept_jax.eval import multiple_choice as mc


@pytest.fixture
def tok(tiny_bpe_gguf):
    from ept_jax.checkpoints.gguf import load_tokenizer

    return load_tokenizer(tiny_bpe_gguf)


def _tiny_llama(vocab: int):
    from ept_jax.models.llama import LlamaModel
    from ept_jax.models.llama.config import LlamaConfig

    cfg = LlamaConfig.from_hf({"vocab_size": vocab, "hidden_size": 16, "intermediate_size": 32,
                               "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                               "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                               "bos_token_id": 0, "eos_token_id": 1})
    return LlamaModel(cfg, rngs=nnx.Rngs(3))


def _direct_loglik(model, ids: list[int], n_cont: int) -> float:
    """Sum of log p(token) over the last ``n_cont`` tokens of ``ids``, one unpadded sequence."""
    logits = np.asarray(model(jax.numpy.asarray([ids[:-1]]), None, None))[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    tgt = ids[1:]
    return float(sum(logp[t, tgt[t]] for t in range(len(tgt) - n_cont, len(tgt))))


def test_encode_pair_moves_trailing_spaces_and_splits_merges_as_lm_eval(tok):
    assert tok("ab ab", add_special_tokens=False)["input_ids"] == [5, 7]
    # the space belongs to the continuation's merged token " ab" (7), not to the context
    assert mc.encode_pair(tok, "ab", " ab") == ([5], [7])
    assert mc.encode_pair(tok, "ab ", "ab") == ([5], [7])
    # a continuation merging into the context's last token: "a" + "b" encodes to one "ab" (5) as a whole;
    # lm-eval scores whole[len(enc(ctx)):], here nothing of the context's length survives the merge
    ctx, cont = mc.encode_pair(tok, "ca", "b")
    assert ctx + cont == tok("cab", add_special_tokens=False)["input_ids"]


def test_scorer_equals_direct_forward_with_padding_and_truncation(tok):
    model = _tiny_llama(len(tok))
    examples = [
        mc.ChoiceExample("ab", ("ab", "c", "ab ab"), gold=0),
        mc.ChoiceExample("c ab a ", ("b", "ab"), gold=1),   # trailing space moves into the continuation
        mc.ChoiceExample("ab ab ab ab ab ab ab ab", ("c",), gold=0),  # longer than max_length: left-truncated
    ]
    max_length = 6
    scores = mc.score(model, tok, examples, batch_size=4, max_length=max_length)
    for ex, ll, nt in zip(examples, scores.loglik, scores.n_tokens, strict=True):
        assert len(ll) == len(ex.choices)
        for j, choice in enumerate(ex.choices):
            ctx, cont = mc.encode_pair(tok, ex.context, " " + choice)
            ids = (ctx + cont)[-(max_length + 1):]
            assert nt[j] == len(cont)
            np.testing.assert_allclose(ll[j], _direct_loglik(model, ids, len(cont)), rtol=1e-5, atol=1e-5)
    for i, ex in enumerate(examples):
        assert scores.acc[i] == (int(np.argmax(scores.loglik[i])) == ex.gold)
        assert scores.gold_nll[i] == pytest.approx(-scores.loglik[i][ex.gold] / scores.n_tokens[i][ex.gold])
    # the batch size (padding rows) does not change a score
    again = mc.score(model, tok, examples, batch_size=3, max_length=max_length)
    for a, b in zip(scores.loglik, again.loglik, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_packed_rows_score_as_separate_rows(tok):
    """An example's choices packed in one row (shared context, one segment per choice, logits only at the scored
    positions) give the scores of one row per choice; what does not fit or does not share its context is not
    packed."""
    model = _tiny_llama(len(tok))
    examples = [
        mc.ChoiceExample("ab c", ("ab", "c", "ab ab c"), gold=2),   # multi-token continuations share a row
        mc.ChoiceExample("c ab", ("ab", "ab"), gold=0),              # one-token continuations: no token added
        mc.ChoiceExample("ab ab ab ab ab ab", ("c ab ab", "ab"), gold=1),  # too long to pack at max_length 8
    ]
    rows, lengths = mc.rows_decoder(tok, examples, 8, pack=True)
    by_example = {}
    for r in rows:
        by_example.setdefault(r.scored[0][2], []).append(r)
    assert len(by_example[0]) == 1 and len(by_example[1]) == 1 and len(by_example[2]) == 2
    for i in (0, 1):  # the context once, then each continuation but its last token
        pairs = [mc.encode_pair(tok, examples[i].context, " " + c) for c in examples[i].choices]
        assert len(by_example[i][0].inputs) == len(pairs[0][0]) + sum(len(c) - 1 for _, c in pairs)
    packed = mc.score(model, tok, examples, batch_size=2, max_length=8)
    single = mc.score(model, tok, examples, batch_size=2, max_length=8, pack=False)
    for a, b in zip(packed.loglik, single.loglik, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(packed.n_tokens[0], single.n_tokens[0])


def test_llama_segments_and_logit_positions_equal_separate_sequences():
    model = _tiny_llama(40)
    ctx, c1, c2 = [3, 4, 5], [6, 7], [8, 9, 10]
    ids = np.asarray([ctx + c1 + c2])
    seg = np.asarray([[0, 0, 0, 1, 1, 2, 2, 2]])
    pos = np.asarray([[0, 1, 2, 3, 4, 3, 4, 5]])
    at = np.asarray([[1, 4, 6]])
    out = np.asarray(model(ids, None, None, pos, segment_ids=seg, logit_positions=at))
    first = np.asarray(model(np.asarray([ctx + c1]), None, None))
    second = np.asarray(model(np.asarray([ctx + c2]), None, None))
    assert out.shape == (1, 3, 40)
    np.testing.assert_allclose(out[0, 0], first[0, 1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0, 1], first[0, 4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0, 2], second[0, 4], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="segment_ids has shape"):
        model(ids, None, None, pos, segment_ids=seg[:, :4])
    with pytest.raises(ValueError, match="logit_positions must be"):
        model(ids, None, None, pos, logit_positions=at[0])


def test_acc_and_acc_norm_disagree_on_a_hand_made_case():
    ex = mc.ChoiceExample("q", ("no", "definitely yes"), gold=1)
    loglik = np.asarray([-4.0, -6.0])  # raw: "no" wins; per character: -2.0 vs -0.43, the long answer wins
    acc, acc_norm = mc.decide(loglik, ex)
    assert (acc, acc_norm) == (False, True)
    s = mc.ChoiceScores([loglik], [np.asarray([1, 2])], np.asarray([acc]), np.asarray([acc_norm]),
                        np.asarray([3.0]))
    out = s.summary()
    assert out["acc"] == 0.0 and out["acc_norm"] == 100.0 and out["n"] == 1
    lo, hi = mc.wilson_interval(7, 10)
    assert lo == pytest.approx(0.3968, abs=1e-4) and hi == pytest.approx(0.8922, abs=1e-4)
    with pytest.raises(ValueError, match="gold=2"):
        mc.ChoiceExample("q", ("a", "b"), gold=2)


def test_smollm2_scores_equal_transformers_logits(smollm2_gguf, smollm2_transformers):
    """On the real GGUF: our scores of two cloze prompts against sums over transformers' own logits (<= 2e-3
    absolute on sums of ~5 log-probabilities; float32 on both sides, the GGUF dequantised by each library)."""
    path = smollm2_gguf
    torch = pytest.importorskip("torch")

    from ept_jax.checkpoints.gguf import load_tokenizer

    tok = load_tokenizer(path)
    examples = [mc.ChoiceExample("Question: What is the capital of France?\nAnswer:", ("Paris", "a cat"), gold=0),
                mc.ChoiceExample("The sky on a clear day is\nAnswer:", ("blue", "green", "made of cheese"), gold=0)]
    model = load.from_pretrained(path)
    scores = mc.score(model, tok, examples, batch_size=8, max_length=32)
    del model
    theirs = smollm2_transformers  # transformers' load of the same file (tests/conftest.py)
    for ex, ll in zip(examples, scores.loglik, strict=True):
        for j, choice in enumerate(ex.choices):
            ctx, cont = mc.encode_pair(tok, ex.context, " " + choice)
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(theirs(ids).logits[0, :-1].double(), -1)
            ref = sum(float(logp[t, ids[0, t + 1]]) for t in range(len(ctx) - 1, len(ctx) + len(cont) - 1))
            assert abs(ll[j] - ref) <= 2e-3, (ex.context, choice, ll[j], ref)
    assert scores.acc.all()  # Paris; blue


def test_t5_rank_classification_equals_teacher_forced_sums():
    from transformers import ByT5Tokenizer

    from ept_jax.models.t5 import T5Config, T5Model

    tok = ByT5Tokenizer()
    cfg = T5Config.from_hf({"vocab_size": 384, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 1,
                            "num_heads": 2, "feed_forward_proj": "relu", "tie_word_embeddings": True,
                            "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1})
    model = T5Model(cfg, rngs=nnx.Rngs(1))
    examples = [mc.ChoiceExample("is it so?", ("yes", "no"), gold=1, task_id=0)]
    scores = mc.score(model, tok, examples, batch_size=4, max_length=16, max_target_length=8)
    src = tok("is it so?", add_special_tokens=False)["input_ids"] + [1]
    for j, choice in enumerate(("yes", "no")):
        tgt = tok(choice, add_special_tokens=False)["input_ids"] + [1]
        dec = [0] + tgt[:-1]
        logits = np.asarray(model(jax.numpy.asarray([src]), None, jax.numpy.asarray([dec]), None, None))[0]
        logits = logits.astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        ref = sum(logp[t, tgt[t]] for t in range(len(tgt)))
        np.testing.assert_allclose(scores.loglik[0][j], ref, rtol=1e-5, atol=1e-5)
        assert scores.n_tokens[0][j] == len(tgt)


def test_score_cli_on_truncated_smollm2(tmp_path, capsys, smollm2_gguf):
    import json

    from train import score

    out = tmp_path / "s.json"
    rc = score.main(["--config", "configs/smollm2_commonsense_cpu.py", "--set", "model.num_layers=1",
                     "--tasks", "arc_c", "--format", "cloze", "--batch-size", "64", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    s = result["tasks"]["arc_c"]
    assert s["n"] == 150  # the whole evaluation half of ARC-Challenge's validation split
    assert s["acc_ci"][0] <= s["acc"] <= s["acc_ci"][1] and 0 < s["answer_nll"]
    assert "| ARC-C | 150 |" in capsys.readouterr().out
    assert score.main(["--config", "configs/smollm2_commonsense_cpu.py", "--set", "model.nope=1"]) == 2
    assert "no key 'model.nope'" in capsys.readouterr().err
