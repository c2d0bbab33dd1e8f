"""Every metric against a case computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from memeval import metrics as M


def test_token_nll_and_correct_align_with_targets():
    # vocab 3; logits at position t predict token t+1
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]]))
    ids = torch.tensor([[0, 2, 1]])
    nll = M.token_nll(logits, ids)
    assert nll.shape == (1, 3)
    torch.testing.assert_close(nll, torch.tensor([[0.0, -math.log(0.1), -math.log(0.1)]]))
    assert M.token_correct(logits, ids).tolist() == [[False, False, False]]
    assert M.greedy_tokens(logits, ids).tolist() == [[0, 0, 2]]
    assert M.token_correct(logits, torch.tensor([[1, 0, 2]])).tolist() == [[False, True, True]]


def test_masked_mean_and_perplexity():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[False, True, True], [True, False, False]])
    assert M.masked_mean(values, mask).tolist() == [2.5, 4.0]
    assert M.perplexity(math.log(5.0)) == pytest.approx(5.0)
    assert M.mempi_perplexity([3.0]) == 8.0
    assert M.mempi_perplexity([1.0, 3.0]) == 5.0  # mean of 2 and 8; 2^(mean NLL 2) would be 4


def test_levenshtein_and_similarity():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert M.levenshtein([1, 2, 3], [1, 3]) == 1


def test_ngram_jaccard():
    a, b = [1, 2, 3, 4], [2, 3, 4, 5]
    # bigrams {12,23,34} vs {23,34,45}: 2 shared of 4
    assert M.ngram_jaccard(a, b, n=2) == 0.5
    assert M.ngram_jaccard([1], [2], n=2) == 0.0


def test_recall_topk_and_ceiling_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.0], [0.2, 0.3, 0.1, 0.7]])
    gold = torch.tensor([[True, True, True, False], [False, False, False, True]])
    # per-layer top-1 picks (0,0) and (1,3): both gold, 2 of 4 gold found
    assert M.recall(M.top_k_per_layer(scores, 1), gold) == 0.5
    # layer 0 holds 3 gold, so top-1 per layer can find at most 1 + 1 of 4
    assert M.per_layer_ceiling(gold, 1) == 0.5
    assert M.per_layer_ceiling(gold, 3) == 1.0
    # global top-3: 0.9, 0.8, 0.7 -> (0,0), (0,2), (1,3): 3 of 4
    assert M.recall(M.top_k_global(scores, 3), gold) == 0.75
    assert M.per_layer_k(3072, 0.001) == 3 and M.per_layer_k(100, 0.001) == 1


def test_average_precision_and_auc_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    gold = torch.tensor([True, False, True, False])
    # ranks: hit at 1 (P=1), miss, hit at 3 (P=2/3): AP = (1 + 2/3) / 2
    assert M.average_precision(scores, gold) == pytest.approx((1 + 2 / 3) / 2)
    # positive/negative pairs ordered correctly: (0.9>0.8), (0.9>0.1), (0.7<0.8), (0.7>0.1) -> 3/4
    assert M.roc_auc(scores, gold) == pytest.approx(0.75)


def test_paired_difference_by_hand():
    # shared items x, y, z: differences 1, 0, 2 -> mean 1, sample sd 1, stderr 1/sqrt(3); w is only in a,
    # v has no finite value in b: both are left out
    a = {"x": 1.0, "y": 2.0, "z": 3.0, "w": 9.0, "v": 1.0}
    b = {"x": 0.0, "y": 2.0, "z": 1.0, "v": float("nan")}
    mean, se, n = M.paired_difference(a, b)
    assert (mean, n) == (1.0, 3) and se == pytest.approx(1 / math.sqrt(3))
    # the paired stderr is far below the marginal ones when items differ in difficulty
    hard_easy_a = {i: float(i) + 0.1 for i in range(10)}
    hard_easy_b = {i: float(i) for i in range(10)}
    mean, se, _ = M.paired_difference(hard_easy_a, hard_easy_b)
    assert mean == pytest.approx(0.1) and se == pytest.approx(0.0, abs=1e-12)
    assert M.mean_stderr(hard_easy_a.values())[1] > 0.9
    assert M.paired_difference({"x": 1.0}, {"y": 1.0})[2] == 0


def test_mean_stderr_by_hand():
    mean, se = M.mean_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert se == pytest.approx(math.sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3 / 4))
    assert M.mean_stderr([5.0]) == (5.0, 0.0)
