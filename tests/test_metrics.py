"""Metric functions against values computed by hand, and the paired statistics against known cases."""
import math

import pytest

from finetune.evaluation import metrics as M


def test_normalize_answer_squad_style():
    assert M.normalize_answer("The  Cat, sat!\n on A mat.") == "cat sat on mat"
    assert M.normalize_answer("An apple") == "apple"
    assert M.normalize_answer("theory") == "theory"  # articles only as whole words


def test_exact_match():
    assert M.exact_match("The cat.", "cat") == 1.0
    assert M.exact_match("cat sat", "cat") == 0.0
    assert M.exact_match("", "") == 1.0


def test_token_f1_by_hand():
    # pred -> [cat, sat, on, mat], ref -> [cat, on, mat]: overlap 3, P = 3/4, R = 1, F1 = 2*.75/1.75 = 6/7
    assert M.token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # repeated tokens count with multiplicity: pred [x, x, y], ref [x, y, y]: overlap x1 + y1 = 2, P = R = 2/3
    assert M.token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert M.token_f1("dog", "cat") == 0.0
    assert M.token_f1("", "cat") == 0.0
    assert M.token_f1("the", "a") == 1.0  # both normalise to empty: SQuAD counts that as agreement


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" / "the cat on the mat" is 5 tokens: P = 5/6, R = 1, F = 10/11
    assert M.rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    # order matters for ROUGE-L but not for F1: LCS("b a c", "a b c") = 2, P = R = F = 2/3
    assert M.rouge_l("b a c", "a b c") == pytest.approx(2 / 3)
    assert M.token_f1("b a c", "a b c") == pytest.approx(1.0)
    assert M.rouge_l("Identical text.", "identical text") == pytest.approx(1.0)
    assert M.rouge_l("nothing shared", "at all") == 0.0


def test_perplexity():
    assert M.perplexity(math.log(4.0)) == pytest.approx(4.0)
    assert M.perplexity(0.0) == 1.0
    assert M.perplexity(1e6) == math.inf
    assert M.perplexity(None) is None


def test_text_scores_and_mean():
    s = M.text_scores("the cat", "cat")
    assert s == {"exact_match": 1.0, "token_f1": 1.0, "rouge_l": pytest.approx(2 / 3)}
    assert M.mean([1, 2, 3, None]) == 2.0
    assert M.mean([]) is None


def test_paired_all_wins_ci_above_zero():
    st = M.paired_stats([0, 0, 0, 0], [1, 0.5, 1, 0.25])
    assert (st["wins"], st["ties"], st["losses"]) == (4, 0, 0)
    assert st["mean_diff"] == pytest.approx(0.6875)
    # every resampled mean is a mean of differences >= 0.25
    assert 0.25 <= st["ci_low"] <= st["mean_diff"] <= st["ci_high"] <= 1.0


def test_paired_identical_all_ties_zero_ci():
    scores = [0.1, 0.7, 0.3]
    st = M.paired_stats(scores, list(scores))
    assert (st["wins"], st["ties"], st["losses"]) == (0, 3, 0)
    assert (st["mean_diff"], st["ci_low"], st["ci_high"]) == (0.0, 0.0, 0.0)


def test_paired_one_win_one_loss():
    # diffs [+1, -1]: resampled means are -1 (p=1/4), 0 (1/2), +1 (1/4), so the 95% interval is [-1, 1]
    st = M.paired_stats([0, 1], [1, 0])
    assert (st["wins"], st["ties"], st["losses"]) == (1, 0, 1)
    assert st["mean_diff"] == 0.0
    assert (st["ci_low"], st["ci_high"]) == (-1.0, 1.0)


def test_paired_tie_epsilon_and_lengths():
    st = M.paired_stats([0.5, 0.5, 0.5], [0.5 + 1e-12, 0.7, 0.2])
    assert (st["wins"], st["ties"], st["losses"]) == (1, 1, 1)
    with pytest.raises(ValueError, match="2 base scores but 1 adapter"):
        M.paired_stats([0, 1], [1])
    empty = M.paired_stats([], [])
    assert empty["n"] == 0 and empty["mean_diff"] is None


def test_bootstrap_matches_normal_approximation_and_is_reproducible():
    # 400 differences alternating 0 and 1: mean 0.5, standard error 0.5 / sqrt(400) = 0.025, so the 95% interval
    # is about 0.5 +- 1.96 * 0.025 = [0.451, 0.549]
    base = [0.0] * 400
    adapter = [float(i % 2) for i in range(400)]
    st = M.paired_stats(base, adapter)
    assert st["ci_low"] == pytest.approx(0.451, abs=0.01)
    assert st["ci_high"] == pytest.approx(0.549, abs=0.01)
    assert M.paired_stats(base, adapter) == st  # fixed seed: a cached result can be recomputed identically


def test_paired_lower_is_better_counts_reductions_as_wins():
    # losses: the adapter lowers two of three; the difference stays adapter - base (negative = better)
    st = M.paired_stats([2.0, 2.0, 2.0], [1.0, 1.5, 2.5], higher_is_better=False)
    assert (st["wins"], st["ties"], st["losses"]) == (2, 0, 1)
    assert st["mean_diff"] == pytest.approx(-1 / 3)
