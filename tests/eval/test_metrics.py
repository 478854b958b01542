"""ROUGE-L and exact match against values computed by hand."""

from __future__ import annotations

import pytest

from prefkd.eval.metrics import exact_match, normalize_answer, rouge_l, score_corpus


def lcs(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length by dynamic programming (the test's own)."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def f_lcs(pred: list[str], ref: list[str]) -> float:
    n = lcs(pred, ref)
    p, r = n / len(pred), n / len(ref)
    return 0.0 if n == 0 else 2 * p * r / (p + r)


def test_rouge_l_by_hand():
    # the cat sat on the mat / the cat is on the mat: LCS "the cat on the mat" = 5 of 6 and 6 -> F = 5/6
    pred, ref = "the cat sat on the mat", "The cat is on the mat."
    assert lcs(pred.split(), ref.lower().rstrip(".").split()) == 5
    assert rouge_l(pred, ref) == pytest.approx(5 / 6)
    # a longer pair with different lengths: LCS = "police killed the gunman" = 4; P = 4/5, R = 4/6
    pred, ref = "police kill the gunman fast", "the police killed the gunman today"
    # stemming: kill / killed share the stem "kill", so the LCS is police kill the gunman (4 tokens)
    stemmed_pred, stemmed_ref = "police kill the gunman fast".split(), "the police kill the gunman today".split()
    assert lcs(stemmed_pred, stemmed_ref) == 4
    assert (rouge_l(pred, ref) == pytest.approx(f_lcs(stemmed_pred, stemmed_ref))
            == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6)))


def test_rouge_l_uses_the_porter_stemmer():
    # running dogs -> [run, dog]; the dog runs -> [the, dog, run]: LCS 1, P 1/2, R 1/3, F 0.4 (0 without stemming)
    assert rouge_l("running dogs", "the dog runs") == pytest.approx(0.4)


def test_rouge_l_maximum_over_references():
    refs = ["a completely different answer", "the cat is on the mat", "cat"]
    assert rouge_l("the cat sat on the mat", refs) == pytest.approx(5 / 6)
    assert rouge_l("the cat sat on the mat", list(reversed(refs))) == pytest.approx(5 / 6)
    scores = score_corpus(["the cat sat on the mat", "tope"], [refs, ["Rope", "Tope"]])
    assert scores["rougeL"] == pytest.approx(100 * (5 / 6 + 1) / 2)
    assert scores["exact_match"] == pytest.approx(50.0)


def test_rouge_l_empty_prediction_is_zero():
    assert rouge_l("", "anything at all") == 0.0


def test_exact_match_squad_normalisation():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("The cat!", "cat") == 1.0
    assert exact_match("a  Cat.", ["dog", "cat"]) == 1.0
    assert exact_match("cats", "cat") == 0.0
    assert exact_match("An apple", "apple pie") == 0.0
    assert score_corpus(["Hamlet.", "Macbeth", "the answer"], ["hamlet", "Othello", ["x", "Answer"]])["exact_match"] \
        == pytest.approx(200 / 3)


def test_score_corpus_checks_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        score_corpus(["a", "b"], ["a"])
