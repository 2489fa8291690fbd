"""Metrics against scikit-learn / scipy on hand-made predictions, and the scoring of generated text."""

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from ept_jax.eval import metrics


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_f1_mcc_match_sklearn_random(seed):
    rng = _rng(seed)
    t = rng.integers(0, 2, size=57)
    p = rng.integers(0, 2, size=57)
    assert metrics.accuracy(p, t) == pytest.approx(sklearn.metrics.accuracy_score(t, p), abs=1e-12)
    assert metrics.f1_binary(p, t) == pytest.approx(sklearn.metrics.f1_score(t, p), abs=1e-12)
    assert metrics.matthews_corrcoef(p, t) == pytest.approx(sklearn.metrics.matthews_corrcoef(t, p), abs=1e-12)
    # multiclass, with an extra "invalid" class -1 present only in the predictions
    t3 = rng.integers(0, 3, size=80)
    p3 = rng.integers(-1, 3, size=80)
    assert metrics.matthews_corrcoef(p3, t3) == pytest.approx(sklearn.metrics.matthews_corrcoef(t3, p3), abs=1e-12)
    assert metrics.accuracy(p3, t3) == pytest.approx(sklearn.metrics.accuracy_score(t3, p3), abs=1e-12)


def test_f1_edge_cases_match_sklearn():
    cases = [
        ([0, 0, 0], [0, 0, 0]),  # no positives anywhere: 0/0 -> 0.0
        ([1, 1, 1], [1, 1, 1]),  # perfect
        ([1, 0, 1], [0, 1, 0]),  # all wrong
        ([1, 1, 1, 1], [1, 0, 0, 0]),  # constant positive prediction
    ]
    for p, t in cases:
        expected = sklearn.metrics.f1_score(t, p, zero_division=0.0)
        assert metrics.f1_binary(p, t) == pytest.approx(expected, abs=1e-12), (p, t)
    # a non-default positive label
    t = ["dup", "not", "dup", "dup", "not"]
    p = ["dup", "dup", "not", "dup", "not"]
    assert metrics.f1_binary(p, t, positive="dup") == pytest.approx(
        sklearn.metrics.f1_score(t, p, pos_label="dup"), abs=1e-12
    )


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_mcc_edge_cases_match_sklearn():
    cases = [
        ([1, 1, 1, 1], [0, 1, 0, 1]),  # constant prediction: undefined -> 0
        ([0, 1, 0, 1], [0, 1, 0, 1]),  # perfect: 1
        ([1, 0, 1, 0], [0, 1, 0, 1]),  # inverted: -1
        (["acceptable", "x", "unacceptable"], ["acceptable", "unacceptable", "unacceptable"]),  # strings
        ([2, 2, 2], [2, 2, 2]),  # single class everywhere
    ]
    for p, t in cases:
        assert metrics.matthews_corrcoef(p, t) == pytest.approx(sklearn.metrics.matthews_corrcoef(t, p), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 3])
def test_correlations_match_scipy(seed):
    rng = _rng(seed)
    x = rng.normal(size=40)
    y = 0.6 * x + rng.normal(size=40)
    assert metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
    assert metrics.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
    # STS-B-like scores on a 0.2 grid: many ties
    a = np.round(rng.uniform(0, 5, size=60) * 5) / 5
    b = np.round(np.clip(a + rng.normal(scale=0.8, size=60), 0, 5) * 5) / 5
    assert metrics.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b)[0], abs=1e-12)
    assert metrics.pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a, b)[0], abs=1e-12)
    np.testing.assert_allclose(metrics.rankdata(b), scipy.stats.rankdata(b))


def test_correlations_undefined_are_nan_like_scipy():
    x, const = [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(scipy.stats.pearsonr(x, const)[0])
        assert math.isnan(scipy.stats.spearmanr(x, const)[0])
    assert math.isnan(metrics.pearson(x, const))
    assert math.isnan(metrics.spearman(x, const))
    assert metrics.pearson([1, 2], [2, 4]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2], [4, 2]) == pytest.approx(-1.0)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="same length"):
        metrics.accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="0 examples"):
        metrics.f1_binary([], [])


def test_parse_prediction():
    assert metrics.parse_prediction("mnli", " Entailment. ") == "entailment"
    assert metrics.parse_prediction("mnli", "entails") is None
    assert metrics.parse_prediction("qqp", "not_duplicate") == "not_duplicate"
    assert metrics.parse_prediction("stsb", "3.4") == 3.4
    assert metrics.parse_prediction("stsb", "4") == 4.0
    assert metrics.parse_prediction("stsb", "about three") == 0.0  # the release's fallback
    assert metrics.parse_prediction("stsb", "-1.0") == 0.0
    assert metrics.parse_prediction("boolq", "Yes, it does") == "yes"
    assert metrics.parse_prediction("boolq", "false") == "no"
    assert metrics.parse_prediction("boolq", "maybe") is None
    assert metrics.parse_prediction("arc_e", "(b)") == "B"
    assert metrics.parse_prediction("arc_e", "C. the moon") == "C"
    assert metrics.parse_prediction("arc_c", "the answer is (D)") == "D"
    assert metrics.parse_prediction("openbookqa", "the answer is B") is None  # no leading / bracketed letter
    assert metrics.parse_prediction("piqa", "A") == "A"
    assert metrics.parse_prediction("piqa", "C") is None
    assert metrics.parse_prediction("syn_reverse", " mi  lo ka ") == "mi lo ka"


def test_unknown_task_lists_accepted():
    with pytest.raises(ValueError, match="accepted tasks: .*mnli.*"):
        metrics.parse_prediction("mnlii", "entailment")
    with pytest.raises(ValueError, match="unknown task 'glue'"):
        metrics.compute_task_metrics("glue", ["a"], ["a"])


def test_task_metrics_mrpc_invalid_counts_as_opposite():
    refs = ["equivalent", "equivalent", "not_equivalent", "equivalent", "not_equivalent", "not_equivalent"]
    preds = ["equivalent", "garbage", "garbage", "not_equivalent", "not_equivalent", "Equivalent."]
    out = metrics.compute_task_metrics("mrpc", preds, refs)
    assert set(out) == {"f1", "accuracy"}
    t = np.array([1, 1, 0, 1, 0, 0])
    # invalid predictions (rows 1, 2) replaced by 1 - target, as f1_score_with_invalid does
    p = np.array([1, 0, 1, 0, 0, 1])
    assert out["f1"] == pytest.approx(100 * sklearn.metrics.f1_score(t, p), abs=1e-9)
    assert out["accuracy"] == pytest.approx(100 * 2 / 6, abs=1e-9)


def test_task_metrics_cola_invalid_is_extra_class():
    refs = ["acceptable", "unacceptable", "acceptable", "acceptable", "unacceptable"]
    preds = ["acceptable", "unacceptable", "huh", "unacceptable", "unacceptable"]
    out = metrics.compute_task_metrics("cola", preds, refs)
    expected = sklearn.metrics.matthews_corrcoef(
        refs, ["acceptable", "unacceptable", "huh", "unacceptable", "unacceptable"]
    )
    assert out == {"mcc": pytest.approx(100 * expected, abs=1e-9)}


def test_task_metrics_stsb():
    refs = ["3.2", "0.4", "5.0", "2.6", "1.0"]
    preds = ["3.0", "oops", "4.8", "2.6", "1.4"]
    out = metrics.compute_task_metrics("stsb", preds, refs)
    p = [3.0, 0.0, 4.8, 2.6, 1.4]
    t = [3.2, 0.4, 5.0, 2.6, 1.0]
    assert out["pearson"] == pytest.approx(100 * scipy.stats.pearsonr(t, p)[0], abs=1e-9)
    assert out["spearman"] == pytest.approx(100 * scipy.stats.spearmanr(t, p)[0], abs=1e-9)
    # constant predictions: NaN correlation reported as 0, as the release does
    assert metrics.compute_task_metrics("stsb", ["2.0"] * 5, refs) == {"pearson": 0.0, "spearman": 0.0}


def test_task_metrics_errors_and_open_answers():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        metrics.compute_task_metrics("rte", ["entailment", "entailment"], ["entailment"])
    with pytest.raises(ValueError, match="not label words"):
        metrics.compute_task_metrics("rte", ["entailment"], ["yes"])
    out = metrics.compute_task_metrics("syn_sort", ["abc", "ab c", "bca"], ["abc", "abc", "abc"])
    assert out == {"accuracy": pytest.approx(100 / 3)}
    assert metrics.count_unparsable("rte", ["entailment", "?", "not_entailment", ""]) == 2
    assert metrics.count_unparsable("syn_copy", ["anything"]) == 0


def test_glue_average_modes():
    results = {
        "mrpc": {"f1": 90.0, "accuracy": 86.0},
        "stsb": {"pearson": 91.0, "spearman": 89.0},
        "cola": {"mcc": 60.0},
        "rte": {"accuracy": 80.0},
    }
    assert metrics.glue_average(results) == pytest.approx(np.mean([88.0, 90.0, 60.0, 80.0]))
    assert metrics.glue_average(results, mode="release") == pytest.approx(np.mean([86.0, 91.0, 60.0, 80.0]))
    with pytest.raises(ValueError, match="accepted: paper, release"):
        metrics.glue_average(results, mode="mean")
    with pytest.raises(ValueError, match="no results"):
        metrics.glue_average({})
